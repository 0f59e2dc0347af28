"""Train a SentencePiece tokenizer on a sample of a corpus.

Input: the same inputs as `data_prep.prepare` (.jsonl, .jsonl.zst, .parquet, HF dataset ids).
Output: `OUT/tokenizer.model`, `OUT/tokenizer.vocab` and `OUT/tokenizer_config.json` (options, checksum).

Options follow `shared/spec/data_eval.md` section 2: byte fallback (no <unk> in practice), split digits, whitespace
kept verbatim (identity normalisation, no extra-whitespace removal, no dummy prefix, so encode/decode round-trips and
lm-eval's context/continuation split is stable), EOS = 2 separates documents. Documents are fed line by line and
over-long lines are cut at whitespace below `max_sentence_length` bytes, because SentencePiece silently skips longer
sentences (which would drop long Pile documents from training).

Example:
    python -m data_prep.train_tokenizer --input data/demo/*.jsonl.zst --vocab-size 8000 --output runs/tok
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Iterator

import sentencepiece as spm
from tqdm import tqdm

from data_prep.readers import ReadErrors, iter_records, parse_record
from data_prep.tokenizer import file_sha256

# byte_fallback needs the 256 byte pieces plus the specials inside the vocabulary
MIN_VOCAB = 384


def split_long_line(line: str, max_bytes: int) -> Iterator[str]:
    """Cut a line into pieces of at most max_bytes UTF-8 bytes, at whitespace where possible."""
    if len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    words = line.split(" ")
    piece: list[str] = []
    size = 0
    for w in words:
        wb = len(w.encode("utf-8")) + 1
        if piece and size + wb > max_bytes:
            yield " ".join(piece)
            piece, size = [], 0
        if wb > max_bytes:
            # a single giant "word" (e.g. base64): cut it by characters
            step = max(1, max_bytes // 4)
            for i in range(0, len(w), step):
                yield w[i : i + step]
            continue
        piece.append(w)
        size += wb
    if piece:
        yield " ".join(piece)


def sample_sentences(
    inputs: list[str], max_chars: int, doc_rate: float, seed: int, max_sentence_length: int, errors: ReadErrors
) -> Iterator[str]:
    rng = random.Random(seed)
    seen = 0
    with tqdm(total=max_chars, unit="char", unit_scale=True, desc="tokenizer sample", file=sys.stderr) as bar:
        for rec in iter_records(inputs, errors):
            if doc_rate < 1.0 and rng.random() >= doc_rate:
                continue
            text = parse_record(rec.payload).text
            if text is None:
                continue
            for line in text.split("\n"):
                if line.strip():
                    yield from split_long_line(line, max_sentence_length)
            seen += len(text)
            bar.update(len(text))
            if seen >= max_chars:
                return


def train(args: argparse.Namespace) -> Path:
    if args.vocab_size < MIN_VOCAB:
        raise SystemExit(f"--vocab-size must be >= {MIN_VOCAB} (256 byte-fallback pieces + specials), got {args.vocab_size}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    errors = ReadErrors()
    options = dict(
        model_type=args.model_type,
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        byte_fallback=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=args.max_sentence_length,
        num_threads=args.num_threads,
    )
    sentences = sample_sentences(
        args.input, args.max_chars, args.doc_sample_rate, args.seed, args.max_sentence_length, errors
    )
    prefix = out / "tokenizer"
    spm.set_random_generator_seed(args.seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_prefix=str(prefix), minloglevel=1, **options)
    except RuntimeError as e:
        raise SystemExit(
            f"sentencepiece training failed: {e}\n(a vocabulary too large for the sample? try a smaller "
            f"--vocab-size or a larger --max-chars)"
        ) from e
    model = prefix.with_suffix(".model")
    config = {
        "model_file": model.name,
        "sha256": file_sha256(model),
        "vocab_size": spm.SentencePieceProcessor(model_file=str(model)).get_piece_size(),
        "inputs": args.input,
        "max_chars": args.max_chars,
        "options": options,
        "read_errors": errors.errors,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    for err in errors.errors:
        print(f"warning: {err['file']}: {err['kind']}: {err['detail']}", file=sys.stderr)
    print(f"tokenizer written to {model} (vocab {config['vocab_size']}, sha256 {config['sha256'][:12]})")
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="input files or HF dataset ids")
    ap.add_argument("--vocab-size", type=int, default=32000, help="pieces, specials included (< 65536 keeps uint16 shards)")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram", help="unigram encodes ~3x faster")
    ap.add_argument("--max-chars", type=int, default=1_000_000_000, help="characters of text to sample")
    ap.add_argument("--doc-sample-rate", type=float, default=1.0, help="keep each document with this probability")
    ap.add_argument("--input-sentence-size", type=int, default=10_000_000, help="lines sentencepiece trains on")
    ap.add_argument("--max-sentence-length", type=int, default=4192, help="bytes; longer lines are cut at whitespace")
    ap.add_argument("--character-coverage", type=float, default=1.0, help="0.9995 for CJK-heavy corpora")
    ap.add_argument("--num-threads", type=int, default=os.cpu_count() or 1, help="trainer threads")
    ap.add_argument("--seed", type=int, default=1234, help="sampling and trainer seed")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
