"""Process-group start-up and small collective helpers (CPU gloo or CUDA NCCL, same code)."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[torch.device, int, int]:
    """Start the default process group (NCCL on CUDA, gloo on CPU); works under the deepspeed launcher or alone."""
    import deepspeed

    if "RANK" not in os.environ:
        # a plain `python -m pretrain.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return device, dist.get_rank(), dist.get_world_size()


def comm_device() -> torch.device:
    """Where collective tensors must live: the GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_ok(fn: Callable[[], T], what: str) -> T:
    """Run `fn` on every rank; if it raises anywhere, raise everywhere (no rank is left waiting in a collective)."""
    err: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        err = e
    flag = torch.tensor([1 if err is not None else 0], device=comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if err is not None:
        raise err
    if int(flag) != 0:
        raise RuntimeError(f"{what} failed on another rank (see its log)")
    return result


def reduce_mean(values: list[float], group=None) -> list[float]:
    """Mean over the ranks of `group` of a few floats (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return t.tolist()


def reduce_sum(values: list[float], group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()


def format_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()
