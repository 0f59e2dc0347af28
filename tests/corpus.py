"""Access to the bundled demo corpus (data/demo, the Pile's jsonl.zst format) for tests."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
import zstandard

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "data" / "demo"


@lru_cache(maxsize=4)
def demo_documents(shard: int = 0) -> tuple[str, ...]:
    raw = zstandard.ZstdDecompressor().stream_reader((DEMO_DIR / f"{shard:02d}.jsonl.zst").open("rb")).read()
    return tuple(json.loads(line)["text"] for line in raw.decode("utf-8").splitlines())


def byte_tokens(n_tokens: int, shard: int = 0) -> torch.Tensor:
    """The first n_tokens UTF-8 bytes of the corpus as int64 ids (< 256; fits the tiny preset's 512 vocab)."""
    out = bytearray()
    for doc in demo_documents(shard):
        out += doc.encode("utf-8") + b"\n"
        if len(out) >= n_tokens:
            break
    return torch.tensor(list(out[:n_tokens]), dtype=torch.long)
