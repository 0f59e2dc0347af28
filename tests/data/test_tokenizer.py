"""The trained SentencePiece model keeps text byte-exact, splits digits and never needs <unk>."""

from __future__ import annotations

import json

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
