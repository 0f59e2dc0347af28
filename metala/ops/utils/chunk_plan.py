"""Index tables that map chunked kernels onto documents, segments and chunks.

Every input, dense [B, T] or packed with `cu_seqlens`, is seen as N documents laid back to back along the token
axis. A document is cut into chunks of C tokens (the last one partial), and consecutive chunks of one document
are grouped into segments of at most `seg_chunks` chunks. Segments are the unit of the two-level state pass: each
segment runs its chunks sequentially from a zero state (in parallel with every other segment), then a short scan
over the segments of each document composes their states exactly (decay-aware), so the sequential depth is
seg_chunks + segments-per-document instead of T / C.

Tables are int32 on the kernels' device and cached: per (B, T) for dense input, per `cu_seqlens` tensor object
for packed input (one host read of the boundaries per tensor, shared by every layer of a forward pass). A caller
that already holds the boundaries on the host (a trainer moving its batches to the GPU) hands them over with
`remember_host_boundaries`, and the plan then reads nothing back from the device: that read would make the host
wait for the queued work in the middle of the forward pass.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ChunkPlan:
    chunk_size: int
    seg_chunks: int
    n_docs: int
    n_chunks: int
    n_segs: int
    # per chunk: first token, valid length, segment
    chunk_start: torch.Tensor
    chunk_len: torch.Tensor
    chunk_seg: torch.Tensor
    # per segment: first chunk, number of chunks
    seg_first_chunk: torch.Tensor
    seg_n_chunks: torch.Tensor
    # per document: first segment, number of segments
    doc_first_seg: torch.Tensor
    doc_n_segs: torch.Tensor


def _tables(lengths: np.ndarray, chunk_size: int, seg_chunks: int) -> dict[str, np.ndarray]:
    lengths = lengths.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    doc_chunks = -(-lengths // chunk_size)
    doc_segs = -(-doc_chunks // seg_chunks)
    n_chunks, n_segs = int(doc_chunks.sum()), int(doc_segs.sum())
    chunk_doc = np.repeat(np.arange(len(lengths)), doc_chunks)
    first_chunk_of_doc = np.concatenate([[0], np.cumsum(doc_chunks)[:-1]])
    chunk_in_doc = np.arange(n_chunks) - first_chunk_of_doc[chunk_doc]
    chunk_start = starts[chunk_doc] + chunk_in_doc * chunk_size
    chunk_len = np.minimum(chunk_size, lengths[chunk_doc] - chunk_in_doc * chunk_size)
    first_seg_of_doc = np.concatenate([[0], np.cumsum(doc_segs)[:-1]])
    chunk_seg = first_seg_of_doc[chunk_doc] + chunk_in_doc // seg_chunks
    seg_first_chunk = np.searchsorted(chunk_seg, np.arange(n_segs), side="left")
    seg_n_chunks = np.diff(np.concatenate([seg_first_chunk, [n_chunks]]))
    return {
        "chunk_start": chunk_start, "chunk_len": chunk_len, "chunk_seg": chunk_seg,
        "seg_first_chunk": seg_first_chunk, "seg_n_chunks": seg_n_chunks,
        "doc_first_seg": first_seg_of_doc, "doc_n_segs": doc_segs,
    }


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host wait: a copy from pageable memory makes the host wait for the
    stream's queued work before it starts; from pinned memory it is queued behind that work instead."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def make_plan(lengths: np.ndarray, chunk_size: int, seg_chunks: int, device: torch.device) -> ChunkPlan:
    t = _tables(np.asarray(lengths), chunk_size, seg_chunks)
    dev = {k: host_to_device(torch.from_numpy(v.astype(np.int32)), device) for k, v in t.items()}
    return ChunkPlan(chunk_size=chunk_size, seg_chunks=seg_chunks, n_docs=len(lengths),
                     n_chunks=len(t["chunk_start"]), n_segs=len(t["seg_first_chunk"]), **dev)


_DENSE: dict[tuple, ChunkPlan] = {}
_VARLEN: dict[int, tuple[weakref.ref, int, tuple, ChunkPlan]] = {}
_HOST_BOUNDARIES: dict[int, tuple[weakref.ref, int, np.ndarray]] = {}


def remember_host_boundaries(cu_seqlens: torch.Tensor, host: torch.Tensor | np.ndarray) -> None:
    """The values of `cu_seqlens` (on the device), which the caller holds on the host as `host`: plans for that
    tensor object are built from them (until it is modified in place) instead of reading it back."""
    if len(_HOST_BOUNDARIES) > 64:
        _HOST_BOUNDARIES.clear()
    values = np.asarray(host.detach().cpu() if isinstance(host, torch.Tensor) else host, dtype=np.int64)
    _HOST_BOUNDARIES[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, values)


def boundaries_to_device(cu_host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`cu_seqlens` moved to `device` the way a trainer should: without a host wait, and remembered, so that its
    plan reads nothing back."""
    cu = host_to_device(cu_host, device)
    remember_host_boundaries(cu, cu_host)
    return cu


def _host_boundaries(cu_seqlens: torch.Tensor) -> np.ndarray:
    known = _HOST_BOUNDARIES.get(id(cu_seqlens))
    if known is not None and known[0]() is cu_seqlens and known[1] == cu_seqlens._version:
        return known[2]
    return cu_seqlens.detach().to("cpu", torch.int64).numpy()


def default_seg_chunks(n_chunks_per_doc: int, n_docs: int, n_heads: int, n_value_tiles: int) -> int:
    """Segment length in chunks: enough segments to fill the GPU (~512 programs), at least 8 chunks each."""
    programs_per_seg = max(1, n_heads * n_value_tiles)
    want_segs = max(1, 512 // programs_per_seg)
    per_doc = max(1, -(-want_segs // max(1, n_docs)))
    seg = -(-n_chunks_per_doc // per_doc)
    return int(max(8, min(64, seg)))


def plan_for(
    batch: int, seq_len: int, cu_seqlens: torch.Tensor | None, chunk_size: int, seg_chunks: int, device: torch.device
) -> ChunkPlan:
    if cu_seqlens is None:
        key = (batch, seq_len, chunk_size, seg_chunks, str(device))
        if key not in _DENSE:
            if len(_DENSE) > 64:
                _DENSE.clear()
            _DENSE[key] = make_plan(np.full(batch, seq_len), chunk_size, seg_chunks, device)
        return _DENSE[key]
    entry = _VARLEN.get(id(cu_seqlens))
    cfg = (chunk_size, seg_chunks, str(device))
    if entry is not None and entry[0]() is cu_seqlens and entry[1] == cu_seqlens._version and entry[2] == cfg:
        return entry[3]
    plan = make_plan(np.diff(_host_boundaries(cu_seqlens)), chunk_size, seg_chunks, device)
    if len(_VARLEN) > 64:
        _VARLEN.clear()
    _VARLEN[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, cfg, plan)
    return plan
