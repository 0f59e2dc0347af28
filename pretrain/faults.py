"""Fault injection for the resilience tests: kill a rank at an exact point, or poison a loss.

Set METALA_FAULT to one or more ';'-separated specs; unset (the normal case), every call is a no-op:
    kill@step=5,micro=1,rank=0      SIGKILL rank 0 before micro-batch 1 of optimizer step 5 (1-based steps)
    kill_in_save@step=4,rank=0      SIGKILL rank 0 while checkpoint step 4 is being written (files staged,
                                    manifest not yet)
    nan@step=3-5,rank=1             multiply rank 1's loss by NaN during steps 3 to 5
    oom@step=2,micro=0,rank=1       raise torch.OutOfMemoryError on rank 1 before micro-batch 0 of step 2
"""

from __future__ import annotations

import os
import signal
from functools import lru_cache


@lru_cache(maxsize=1)
def _specs() -> tuple[tuple[str, dict[str, str]], ...]:
    raw = os.environ.get("METALA_FAULT", "")
    out = []
    for part in filter(None, (p.strip() for p in raw.split(";"))):
        name, _, args = part.partition("@")
        kv = dict(a.split("=", 1) for a in args.split(",") if a)
        out.append((name, kv))
    return tuple(out)


def _matches(kv: dict[str, str], step: int, rank: int, micro: int | None = None) -> bool:
    if "rank" in kv and int(kv["rank"]) != rank:
        return False
    if "micro" in kv and micro is not None and int(kv["micro"]) != micro:
        return False
    lo, _, hi = kv.get("step", "-1").partition("-")
    return int(lo) <= step <= int(hi or lo)


def _fires(name: str, step: int, rank: int, micro: int | None = None) -> bool:
    return any(spec == name and _matches(kv, step, rank, micro) for spec, kv in _specs())


def kill_point(name: str, step: int, rank: int, micro: int | None = None) -> None:
    if _fires(name, step, rank, micro):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(step: int, rank: int) -> bool:
    return _fires("nan", step, rank)


def oom_point(step: int, rank: int, micro: int | None = None) -> None:
    if _fires("oom", step, rank, micro):
        import torch

        raise torch.OutOfMemoryError(f"injected by METALA_FAULT at step {step}, micro-batch {micro}, rank {rank}")
