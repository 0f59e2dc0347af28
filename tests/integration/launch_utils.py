"""Helpers to run real multi-process trainings through launch/pretrain.sh (DeepSpeed launcher, gloo, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from pretrain.distributed import DEEPSPEED_SHM_PREFIX, SHM_DIR, SHUTDOWN_LEAK

REPO = Path(__file__).resolve().parents[2]

# a small, fast MetaLA on 64-token windows; 2 ranks x micro 2 x grad-accumulation 2 = global batch 8
TINY = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
    "data.seq_len=64", "data.tokenizer=",
    "train.global_batch=8", "train.micro_batch=2", "train.steps=8", "train.log_every=1",
    "train.eval_every=4", "train.eval_batches=2", "train.save_every=4", "train.keep_last=3",
    "optim.lr=3e-3", "optim.warmup_steps=1", "logging.tensorboard=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(data_dir: Path, out_dir: Path, *overrides: str, ranks: int = 2, recipe: str = "tiny-cpu",
           env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "NUM_GPUS": str(ranks), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
                "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore::FutureWarning",
                "METALA_CHECK_SHUTDOWN": "1", **(env or {})}
    cmd = ["bash", str(REPO / "launch/pretrain.sh"), recipe, f"data.dir={data_dir}", f"train.out_dir={out_dir}",
           *TINY, *overrides]
    r = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    r.master_port = full_env["MASTER_PORT"]
    return r


def shm_left(port: str) -> list[str]:
    """DeepSpeed shared-memory segments of the run on `port` still in /dev/shm (RAM): none once its ranks are up."""
    return sorted(p.name for p in SHM_DIR.glob(f"{DEEPSPEED_SHM_PREFIX}_*_{port}_*"))


def step_losses(out_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """Train loss (or another logged `key`) per step from metrics.jsonl (a step logged twice, before a kill and after
    resume, keeps the last)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get(key) is not None:
            out[row["step"]] = row[key]
    return out


def check_ok(r: subprocess.CompletedProcess) -> None:
    """The run exited 0 and every rank freed its process groups (METALA_CHECK_SHUTDOWN, set by `launch`)."""
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"
    assert SHUTDOWN_LEAK not in r.stderr, r.stderr[-6000:]
    assert shm_left(r.master_port) == []
