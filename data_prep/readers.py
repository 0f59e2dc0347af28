"""Readers for the ways people hold the Pile: `.jsonl`, `.jsonl.zst`, `.parquet`, or a Hugging Face dataset id.

Records come out in a fixed order as `RawRecord`s. JSON lines stay undecoded bytes here (parsing happens in the
tokenizer workers, off the reader's core); parquet and HF rows arrive as dicts. Nothing here raises on bad data:
`parse_record` classifies each record as a document or a skip reason, and file-level failures (unreadable,
truncated) are collected in `ReadErrors` and reported by file name at the end of a run.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

try:
    # orjson parses the Pile's lines ~2x faster than json; both raise ValueError subclasses on bad input
    from orjson import loads as _json_loads
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    _json_loads = json.loads

SKIP_REASONS = ("invalid_json", "invalid_utf8", "missing_text", "empty_text", "filtered_subset")


@dataclass(slots=True)
class RawRecord:
    # index of the input in the run's input list, and 1-based line (or row) number inside it
    source: int
    line: int
    # bytes of one JSON line, or an already-decoded dict (parquet, HF datasets)
    payload: bytes | dict


@dataclass
class ReadErrors:
    """File-level problems (the file is named; records read before the problem are kept) and bytes read so far."""

    errors: list[dict] = field(default_factory=list)
    bytes_read: int = 0

    def add(self, path: str, kind: str, detail: str) -> None:
        self.errors.append({"file": path, "kind": kind, "detail": detail})


def is_hub_id(spec: str) -> bool:
    """An input that is not an existing path and looks like `org/name` is a Hugging Face dataset id."""
    return not Path(spec).exists() and spec.count("/") == 1 and not spec.endswith((".jsonl", ".zst", ".parquet"))


def input_kind(spec: str) -> str:
    if is_hub_id(spec):
        return "hf"
    name = spec.lower()
    if name.endswith(".jsonl.zst") or name.endswith(".json.zst"):
        return "jsonl.zst"
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"unsupported input {spec!r}: expected .jsonl, .jsonl.zst, .parquet or a HF dataset id org/name")


def _file_chunks(fh: io.BufferedIOBase, stats: ReadErrors, size: int = 1 << 22) -> Iterator[bytes]:
    while chunk := fh.read(size):
        stats.bytes_read += len(chunk)
        yield chunk


class TruncatedError(Exception):
    pass


def _zstd_chunks(fh: io.BufferedIOBase, stats: ReadErrors) -> Iterator[bytes]:
    """Decompressed bytes of every zstd frame in the file; raises TruncatedError if the last frame is cut off.

    (zstandard's stream_reader stops silently at EOF inside a frame, which would drop a truncated file's tail
    without a word.)
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, fed = dctx.decompressobj(), False
    for chunk in _file_chunks(fh, stats):
        while chunk:
            out = obj.decompress(chunk)
            fed = True
            if out:
                yield out
            if obj.eof:
                chunk = obj.unused_data
                obj, fed = dctx.decompressobj(), False
            else:
                chunk = b""
    if fed and not obj.eof:
        raise TruncatedError("zstd frame ends before its declared end (file cut off)")


def jsonl_blocks(path: str, errors: ReadErrors, zstd: bool, min_bytes: int = 1 << 22) -> Iterator[tuple[int, bytes]]:
    """(first line number, block of whole lines) of a .jsonl / .jsonl.zst file.

    A block ends at the first newline at or after `min_bytes` (independent of how the file happens to be read, so
    blocks are deterministic). On a truncated or corrupt file the complete lines before the damage are still
    yielded and the file is recorded in `errors`.
    """
    try:
        fh = open(path, "rb")
    except OSError as e:
        errors.add(path, "unreadable", str(e))
        return
    buf, line_no = b"", 1
    with fh:
        try:
            for chunk in _zstd_chunks(fh, errors) if zstd else _file_chunks(fh, errors):
                buf += chunk
                while len(buf) >= min_bytes:
                    cut = buf.find(b"\n", min_bytes - 1)
                    if cut < 0:
                        break
                    block, buf = buf[: cut + 1], buf[cut + 1 :]
                    yield line_no, block
                    line_no += block.count(b"\n")
        except (OSError, TruncatedError, ValueError) as e:
            # zstandard raises ZstdError (a ValueError subclass) on corrupt data; whole lines before it are kept
            errors.add(path, "truncated_or_corrupt", f"{type(e).__name__}: {e}")
            buf = buf[: buf.rfind(b"\n") + 1]
    if buf.strip():
        yield line_no, buf


def block_lines(first_line: int, block: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the non-blank lines of a block."""
    for i, line in enumerate(block.split(b"\n")):
        if line.strip():
            yield first_line + i, line


def iter_jsonl(path: str, source: int, errors: ReadErrors, zstd: bool) -> Iterator[RawRecord]:
    for first, block in jsonl_blocks(path, errors, zstd):
        for line_no, line in block_lines(first, block):
            yield RawRecord(source, line_no, line)


def iter_parquet(path: str, source: int, errors: ReadErrors, batch_rows: int = 4096) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
        errors.add(path, "unreadable", f"{type(e).__name__}: {e}")
        return
    names = set(pf.schema_arrow.names)
    columns = [c for c in ("text", "meta") if c in names]
    row = 0
    size, total_rows = Path(path).stat().st_size, max(pf.metadata.num_rows, 1)
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns or None):
            errors.bytes_read += size * batch.num_rows // total_rows
            for rec in batch.to_pylist():
                row += 1
                yield RawRecord(source, row, rec)
    except Exception as e:  # noqa: BLE001
        errors.add(path, "truncated_or_corrupt", f"{type(e).__name__}: {e}")


def iter_hf(spec: str, source: int, errors: ReadErrors, split: str = "train") -> Iterator[RawRecord]:
    """A Hugging Face dataset id (streamed), e.g. `monology/pile-uncopyrighted`; `id:split` picks the split."""
    from datasets import load_dataset

    name, _, chosen = spec.partition(":")
    try:
        ds = load_dataset(name, split=chosen or split, streaming=True)
        for i, rec in enumerate(ds, 1):
            yield RawRecord(source, i, dict(rec))
    except Exception as e:  # noqa: BLE001 - network and schema failures alike end this input only
        errors.add(spec, "unreadable", f"{type(e).__name__}: {e}")


def iter_local_hf(files: list[str], fmt: str, source: int, errors: ReadErrors) -> Iterator[RawRecord]:
    """Local files through `datasets.load_dataset("json" | "parquet", streaming=True)`: the HF code path offline."""
    from datasets import load_dataset

    try:
        ds = load_dataset(fmt, data_files=files, split="train", streaming=True)
        for i, rec in enumerate(ds, 1):
            yield RawRecord(source, i, dict(rec))
    except Exception as e:  # noqa: BLE001
        errors.add(",".join(files), "unreadable", f"{type(e).__name__}: {e}")


def iter_records(inputs: list[str], errors: ReadErrors) -> Iterator[RawRecord]:
    """All records of all inputs, in input order."""
    for source, spec in enumerate(inputs):
        kind = input_kind(spec)
        if kind == "hf":
            yield from iter_hf(spec, source, errors)
        elif kind == "parquet":
            yield from iter_parquet(spec, source, errors)
        else:
            yield from iter_jsonl(spec, source, errors, zstd=kind == "jsonl.zst")


class Parsed(NamedTuple):
    text: str | None
    # "" for a document, else one of SKIP_REASONS
    reason: str
    subset: str
    license: str


def parse_record(
    payload: bytes | dict, include: frozenset[str] = frozenset(), exclude: frozenset[str] = frozenset()
) -> Parsed:
    """Classify one record as a document (text set) or a skip with its reason.

    This runs once per document in the workers, so the common case makes no copy of the text: orjson validates
    UTF-8 and refuses lone surrogates itself; only records it rejects, and those parsed by the stdlib fallback, pay
    for the explicit checks.
    """
    # text from orjson is valid Unicode; the stdlib parser may return lone surrogates from "\ud800" escapes
    checked = False
    if isinstance(payload, (bytes, bytearray)):
        try:
            rec: Any = _json_loads(payload)
            checked = _json_loads is not json.loads
        except ValueError:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return Parsed(None, "invalid_utf8", "", "")
            # orjson also rejects escaped lone surrogates; the stdlib parser tells those apart from broken JSON
            try:
                rec = json.loads(payload)
            except ValueError:
                return Parsed(None, "invalid_json", "", "")
    else:
        rec = payload
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        return Parsed(None, "missing_text", "", "")
    text = rec["text"]
    meta = rec.get("meta")
    if isinstance(meta, str):
        # some Pile mirrors store meta as a JSON string
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    subset = str(meta.get("pile_set_name", "")) if isinstance(meta, dict) else ""
    lic = str(meta.get("license", "")) if isinstance(meta, dict) else ""
    if (include and subset not in include) or (exclude and subset in exclude):
        return Parsed(None, "filtered_subset", subset, lic)
    if not text or text.isspace():
        return Parsed(None, "empty_text", subset, lic)
    if not checked:
        try:
            # lone surrogates from JSON escapes (e.g. "\ud800") are not encodable text
            text.encode("utf-8")
        except UnicodeEncodeError:
            return Parsed(None, "invalid_utf8", subset, lic)
    return Parsed(text, "", subset, lic)
