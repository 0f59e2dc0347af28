"""Process-group start-up and small collective helpers (CPU gloo or CUDA NCCL, same code)."""

from __future__ import annotations

import functools
import gc
import importlib
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
        # torch.distributed.nn binds `group.WORLD` into its functions' default arguments when first imported
        # (DeepSpeed imports it during engine set-up): imported after the world group exists, those defaults keep the
        # group, and its gloo threads, alive into interpreter teardown (see shutdown_distributed). Before, it binds None.
        importlib.import_module("torch.distributed.nn")

        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        release_deepspeed_shm()
    return device, dist.get_rank(), dist.get_world_size()


# DeepSpeed's CPU shared-memory all-reduce (csrc/cpu/comm/shm.cpp, used when every rank is on one host) names one
# POSIX segment per rank <prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, ~69 MB, and never unlinks it
DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer"
SHM_DIR = Path("/dev/shm")


def deepspeed_shm_path(rank: int) -> Path:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_deepspeed_shm() -> None:
    """Unlink this rank's DeepSpeed shared-memory segment once every rank has mapped every peer's.

    Left alone, every CPU run leaves 69 MB a rank in /dev/shm, which is RAM: the test suite's DeepSpeed runs left
    ~6 GB a pass on this 24 GB box, until a later pass was killed for memory. DeepSpeed's init maps the peers'
    segments before it returns (each rank waits until it has opened all of them); after the barrier every rank is
    past that, so the names can go: the mappings stay valid and the memory is freed when the last rank exits,
    also when it is killed. A rank that never made a segment (GPU runs, no shm op) has nothing to unlink."""
    # the same on every rank (one host and DeepSpeed's shm op, or not), so all or none of them meet at the barrier
    mine = deepspeed_shm_path(dist.get_rank())
    if not mine.exists():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    mine.unlink(missing_ok=True)


# thread names of gloo's workers and transport loops, NCCL's watchdogs and the TCPStore server (Linux)
COMM_THREAD_PREFIXES = ("pt_gloo", "gloo_", "pt_nccl", "pt_tcpstore")
CHECK_SHUTDOWN_ENV = "METALA_CHECK_SHUTDOWN"
SHUTDOWN_LEAK = "process groups outlived the run"


def comm_threads() -> list[str]:
    """Names of this process's communication threads still running (empty where /proc is not available)."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:  # the thread ended while we looked
            continue
        if name.startswith(COMM_THREAD_PREFIXES):
            names.append(name)
    return sorted(names)


def shutdown_distributed(all_ok: bool) -> None:
    """Leave the process groups so that a finished run exits 0 on every rank.

    A gloo (or NCCL) group's C++ object runs worker threads until it is destroyed, and `destroy_process_group` only
    unregisters it: while anything still references the group, its threads keep running into interpreter teardown,
    where a rank can abort with "terminate called without an active exception" after its run finished and wrote
    everything (seen in CI). The caller drops the trainer first; here the ranks meet (on success: no rank leaves while
    another still writes its outputs), the groups are destroyed, the references DeepSpeed keeps for the life of the
    process are dropped (`_drop_deepspeed_references`) and the objects collected, which joins their threads while the
    interpreter is whole. With METALA_CHECK_SHUTDOWN=1 a thread left running is reported (the tests set it).
    """
    if not dist.is_initialized():
        return
    gc.collect()  # the trainer's reference cycles (optimizer step wrapper <-> trainer) hold the engine
    if all_ok and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
    _drop_deepspeed_references()
    gc.collect()
    if os.environ.get(CHECK_SHUTDOWN_ENV) and (left := comm_threads()):
        print(f"warning: {SHUTDOWN_LEAK}: {len(left)} threads still running ({', '.join(left)})", file=sys.stderr,
              flush=True)


def _drop_deepspeed_references() -> None:
    """DeepSpeed keeps process groups, and under ZeRO-3 the whole model (whose partitioned parameters hold their
    group), in module globals for the life of the process; cleared here once the run is over."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if isinstance(value, dist.ProcessGroup):
                setattr(groups, name, None)
            elif isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
                value.clear()
    # our ParallelLayout, given to DeepSpeed as its `mpu` under TP / SP, holds the layout's groups
    for module in (groups, sys.modules.get("deepspeed.runtime.activation_checkpointing.checkpointing")):
        if module is not None and getattr(module, "mpu", None) is not None:
            module.mpu = None
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None and isinstance(getattr(offload, "FWD_MODULE_STACK", None), list):
        offload.FWD_MODULE_STACK.clear()
    # memoised methods (e.g. ZeRO-3's parameter coordinator) keep their instances in class-level caches
    for obj in gc.get_objects():
        if isinstance(obj, functools._lru_cache_wrapper) and str(getattr(obj, "__module__", "")).startswith("deepspeed"):
            obj.cache_clear()


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
