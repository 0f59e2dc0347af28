"""Readers: every format yields the same documents; bad records are classified, bad files reported by name."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep import readers
from data_prep.readers import (
    ReadErrors,
    input_kind,
    is_hub_id,
    iter_local_hf,
    iter_records,
    parse_record,
)
from tests.corpus import demo_documents

DOCS = [{"text": t, "meta": {"pile_set_name": "Demo"}} for t in demo_documents(0)[:40]]


def texts_of(records):
    out = []
    for rec in records:
        parsed = parse_record(rec.payload)
        assert parsed.reason == "", parsed
        out.append((parsed.text, parsed.subset))
    return out


@pytest.fixture
def corpus_files(tmp_path):
    lines = "".join(json.dumps(d) + "\n" for d in DOCS).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.Table.from_pylist(DOCS), tmp_path / "a.parquet", row_group_size=7)
    return tmp_path


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.zst", "a.parquet"])
def test_formats_yield_the_documents(corpus_files, name):
    errors = ReadErrors()
    got = texts_of(iter_records([str(corpus_files / name)], errors))
    assert got == [(d["text"], "Demo") for d in DOCS]
    assert errors.errors == [] and errors.bytes_read > 0


@pytest.mark.parametrize("fmt,name", [("json", "a.jsonl"), ("parquet", "a.parquet")])
def test_hf_datasets_path_on_local_files(corpus_files, fmt, name):
    # the same `datasets.load_dataset(..., streaming=True)` code the hub path uses, fed local files
    errors = ReadErrors()
    got = texts_of(iter_local_hf([str(corpus_files / name)], fmt, 0, errors))
    assert got == [(d["text"], "Demo") for d in DOCS]


def test_input_kinds(tmp_path):
    assert input_kind("monology/pile-uncopyrighted") == "hf" and is_hub_id("EleutherAI/the_pile_deduplicated")
    assert input_kind("x/00.jsonl.zst") == "jsonl.zst" and input_kind("x.parquet") == "parquet"
    with pytest.raises(ValueError, match="unsupported input"):
        input_kind(str(tmp_path / "notes.txt"))


def test_multi_frame_zstd(tmp_path):
    # concatenated frames (as some tools write them) must all be read
    c = zstandard.ZstdCompressor()
    part1 = "".join(json.dumps(d) + "\n" for d in DOCS[:10]).encode()
    part2 = "".join(json.dumps(d) + "\n" for d in DOCS[10:]).encode()
    (tmp_path / "m.jsonl.zst").write_bytes(c.compress(part1) + c.compress(part2))
    errors = ReadErrors()
    assert len(texts_of(iter_records([str(tmp_path / "m.jsonl.zst")], errors))) == len(DOCS)
    assert errors.errors == []


@pytest.mark.parametrize("parser", ["orjson", "stdlib"])
def test_bad_records_are_classified(parser, monkeypatch):
    # the fast path trusts orjson's own UTF-8 and surrogate checks; the stdlib fallback must classify the same way
    if parser == "stdlib":
        monkeypatch.setattr(readers, "_json_loads", json.loads)
    else:
        pytest.importorskip("orjson")
    cases = {
        b'{"text": "fine", "meta": {"pile_set_name": "A"}}': "",
        b'{"text": "cut off': "invalid_json",
        b'{"meta": {}}': "missing_text",
        b'{"text": null}': "missing_text",
        b'[1, 2]': "missing_text",
        b'{"text": "\xff\xfe bad bytes"}': "invalid_utf8",
        b'{"text": "\\ud800 lone surrogate"}': "invalid_utf8",
        b'{"text": ""}': "empty_text",
        b'{"text": "  \\n\\t "}': "empty_text",
        b'{"text": "\\u00e9t\\u00e9 \\ud83d\\ude00"}': "",
    }
    for payload, reason in cases.items():
        assert parse_record(payload).reason == reason, payload


def test_subset_filter_and_string_meta():
    rec = b'{"text": "x", "meta": "{\\"pile_set_name\\": \\"Github\\"}"}'
    assert parse_record(rec).subset == "Github"
    assert parse_record(rec, include=frozenset({"ArXiv"})).reason == "filtered_subset"
    assert parse_record(rec, exclude=frozenset({"Github"})).reason == "filtered_subset"
    assert parse_record(rec, include=frozenset({"Github"})).reason == ""


def test_truncated_zstd_keeps_good_records_and_names_the_file(tmp_path):
    lines = "".join(json.dumps(d) + "\n" for d in DOCS).encode()
    blob = zstandard.ZstdCompressor().compress(lines)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    errors = ReadErrors()
    got = texts_of(r for r in iter_records([str(path)], errors) if parse_record(r.payload).reason == "")
    assert 0 < len(got) < len(DOCS)
    assert got == [(d["text"], "Demo") for d in DOCS[: len(got)]]
    assert errors.errors[0]["file"] == str(path) and errors.errors[0]["kind"] == "truncated_or_corrupt"


def test_unreadable_inputs_are_reported(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    errors = ReadErrors()
    assert list(iter_records([str(tmp_path / "dir.jsonl"), str(tmp_path / "bad.parquet")], errors)) == []
    assert [(e["file"], e["kind"]) for e in errors.errors] == [
        (str(tmp_path / "dir.jsonl"), "unreadable"),
        (str(tmp_path / "bad.parquet"), "unreadable"),
    ]
