"""The shard format: Arrow IPC files with one row per document (`input_ids` list of uint16/uint32, `source`).

Each shard is written as a single record batch, so its token ids form one contiguous buffer that a reader can
memory-map and view as a numpy array without copying.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.tokenizer import file_sha256


# The columns are built from numpy buffers, not with `pa.array`: its first call imports pandas (when installed) to
# check for pandas inputs, 0.15-0.18 s here at the end of every run, after the last worker is done.


def _numeric(values: np.ndarray) -> pa.Array:
    """A numpy array as an Arrow array of the same type (zero-copy where contiguous)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _strings(names: list[str]) -> pa.Array:
    data = [n.encode("utf-8") for n in names]
    offsets = np.zeros(len(data) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in data], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def _dictionary(names: list[str]) -> pa.DictionaryArray:
    """Dictionary-encoded strings, the dictionary in order of first appearance (as Arrow's `dictionary_encode`)."""
    order = list(dict.fromkeys(names))
    index = {name: i for i, name in enumerate(order)}
    codes = np.fromiter((index[n] for n in names), dtype=np.int32, count=len(names))
    return pa.DictionaryArray.from_arrays(_numeric(codes), _strings(order))


def write_shard(path: Path, tokens: np.ndarray, lengths: np.ndarray, subsets: list[str], dtype: type) -> dict:
    """Write atomically (temp file, fsync, rename) and return the manifest entry."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = _numeric(tokens.astype(dtype, copy=False))
    if offsets[-1] < 2**31:
        ids = pa.ListArray.from_arrays(_numeric(offsets.astype(np.int32)), values)
    else:
        ids = pa.LargeListArray.from_arrays(_numeric(offsets), values)
    table = pa.table({"input_ids": ids, "source": _dictionary(subsets)})
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_batch(table.to_batches(max_chunksize=len(lengths) or 1)[0] if len(lengths) else
                               pa.RecordBatch.from_pylist([], schema=table.schema))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return {
        "file": path.name,
        "rows": int(len(lengths)),
        "tokens": int(tokens.size),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


class ShardView:
    """A memory-mapped shard: `tokens` (all documents back to back, EOS included) and document `offsets`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mmap = pa.memory_map(str(self.path), "r")
        reader = pa.ipc.open_file(self._mmap)
        if reader.num_record_batches != 1:
            raise ValueError(f"{self.path}: expected one record batch, found {reader.num_record_batches}")
        batch = reader.get_batch(0)
        col = batch.column(batch.schema.get_field_index("input_ids"))
        # zero-copy views into the mapped file
        self.tokens = col.values.to_numpy(zero_copy_only=True)
        self.offsets = col.offsets.to_numpy(zero_copy_only=True).astype(np.int64)
        if col.offset != 0 or self.offsets[0] != 0:
            raise ValueError(f"{self.path}: unexpected sliced list array")

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)
