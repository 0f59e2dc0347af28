"""The trained SentencePiece model keeps text byte-exact, splits digits and never needs <unk>."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from data_prep.tokenizer import Tokenizer
from data_prep.train_tokenizer import main as train_main
from data_prep.train_tokenizer import split_long_line
from tests.data.conftest import DEMO_INPUTS


def test_config_records_the_options(tokenizer_dir):
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    opts = cfg["options"]
    assert opts["byte_fallback"] and opts["split_digits"] and not opts["add_dummy_prefix"]
    assert opts["normalization_rule_name"] == "identity" and not opts["remove_extra_whitespaces"]
    assert cfg["vocab_size"] == 1024 and cfg["sha256"] == Tokenizer(tokenizer_dir).sha256


@pytest.mark.parametrize(
    "text",
    ["Hello   world!\n\n  indented\tcode()", "Price: 12345.67 and 0x1F", "naïve café — 中文 😀", " leading space"],
)
def test_roundtrip_is_byte_exact(tokenizer_model, text):
    tok = Tokenizer(tokenizer_model)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # byte fallback: characters outside the vocabulary become <0xNN> pieces, never <unk>
    assert tok.sp.unk_id() not in ids


def test_digits_are_split(tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    pieces = [tok.id_to_piece(i) for i in tok.encode("2024")]
    assert pieces == ["2", "0", "2", "4"]


def test_no_dummy_prefix_keeps_context_split_stable(tokenizer_model):
    # lm-eval encodes context + continuation together and splits at len(encode(context)): the continuation tokens
    # must equal the continuation encoded alone
    tok = Tokenizer(tokenizer_model)
    ctx, cont = "The king said to his daughter", " that she must leave"
    whole = tok.encode(ctx + cont)
    assert whole[: len(tok.encode(ctx))] == tok.encode(ctx)
    assert whole[len(tok.encode(ctx)) :] == tok.encode(cont)


def test_special_ids(tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_split_long_line():
    line = "word " * 3000
    parts = list(split_long_line(line, 4192))
    assert all(len(p.encode()) <= 4192 for p in parts) and " ".join(parts).split() == line.split()
    blob = "x" * 10_000
    assert "".join(split_long_line(blob, 4192)) == blob


def test_existing_model_with_other_options_loads(tmp_path):
    # a model trained elsewhere with sentencepiece defaults (dummy prefix, nmt normalisation) must load and encode
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 200),
        model_prefix=str(tmp_path / "ext"), vocab_size=31, minloglevel=2,
    )
    tok = Tokenizer(tmp_path / "ext.model")
    assert tok.eos_id == 2 and tok.decode(tok.encode("the lazy dog")) == "the lazy dog"


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="vocab-size must be >= 384"):
        train_main(["--input", DEMO_INPUTS[0], "--vocab-size", "100", "--output", str(tmp_path)])


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")


# texts whose span boundaries are easy to get wrong: space runs at either end, newlines next to spaces, characters
# outside the vocabulary (byte fallback), digits, a long word, the span separator itself
TRICKY = ["a", " a", "a ", "a  b", "   lead", "trail   ", " ", "\n", "a\nb", " \n ", "\n\n  x\n", "tab\tsep\t",
          "😀 ok 😀", "中文 字 符", "12345 678.9", "x" * 5000, "foo.bar,baz; qux!", "\u200bzero width", "crlf\r\n x",
          "ünï cödé  ß"]


def _demo_texts(n: int) -> list[str]:
    from data_prep.readers import ReadErrors, iter_records, parse_record

    texts = []
    for rec in iter_records([DEMO_INPUTS[0]], ReadErrors()):
        parsed = parse_record(rec.payload)
        if parsed.text:
            texts.append(parsed.text)
        if len(texts) == n:
            break
    return texts


def test_span_encoding_equals_whole_encoding_for_bpe(bpe_tokenizer_model):
    tok = Tokenizer(bpe_tokenizer_model)
    assert tok.span_problem is None and tok.resolve_encoder("auto") == "spans"
    assert tok.span_rule[0] == "spaces+newlines"
    for texts in (_demo_texts(300) + TRICKY, TRICKY + ["holds the separator \x00 inside"]):
        whole, lw = tok.encode_documents(texts, np.uint32, "whole")
        spans, ls = tok.encode_documents(texts, np.uint32, "spans")
        assert np.array_equal(lw, ls) and np.array_equal(whole, spans)
        # and both are sentencepiece's own ids, EOS after each document
        ref = [i for t in texts for i in tok.sp.encode(t) + [tok.eos_id]]
        assert whole.tolist() == ref


def test_span_encoding_is_refused_where_it_would_not_be_exact(tokenizer_model, tmp_path):
    uni = Tokenizer(tokenizer_model)
    assert uni.span_problem == "not a BPE model" and uni.resolve_encoder("auto") == "whole"
    with pytest.raises(ValueError, match="would not be exact: not a BPE model"):
        uni.resolve_encoder("spans")
    # a BPE model with sentencepiece's default normalisation (nmt_nfkc, dummy prefix) is refused too
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 200),
        model_prefix=str(tmp_path / "ext"), vocab_size=40, model_type="bpe", minloglevel=2,
    )
    ext = Tokenizer(tmp_path / "ext.model")
    assert "normalization 'nmt_nfkc'" in ext.span_problem and ext.resolve_encoder("auto") == "whole"
