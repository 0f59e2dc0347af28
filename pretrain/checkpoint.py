"""Checkpoints that survive kills: staged writes, a manifest, an atomic `latest` pointer, torn-write detection.

Layout of CKPT_DIR:
    latest                      the tag of the newest complete checkpoint (written last, atomically)
    step_00000100/              one checkpoint: DeepSpeed's files (model states, ZeRO optimizer shards),
        rng_rank00000.pt ...    every rank's RNG states,
        model_config.json       the MetaLA architecture (for eval/export without DeepSpeed),
        tokenizer.model         the tokenizer the data was made with,
        metala_checkpoint.json  the manifest: step, layout, config, and every file with its size (written last)

A save goes to `.staging-<tag>/<tag>` first; rank 0 fsyncs every file, writes the manifest, renames the folder into
place and only then moves `latest`. A checkpoint whose manifest is missing or whose files do not match it is torn:
resuming skips it, with a warning, for the newest good one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MANIFEST = "metala_checkpoint.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def universal_checkpoint_info(vocab_size: int, param_names: list[str]) -> dict:
    """What DeepSpeed's universal-checkpoint converter needs to merge tensor-parallel slices of MetaLA
    (distributed.md section 2.5): column-parallel weights concatenate on dim 0 (the default), W_o and W_down on
    dim 1, the conv weight and affine norm weights are replicated, the vocabulary is padded. Only patterns that
    match a parameter of this model are listed (the converter's strict mode rejects unused ones)."""
    import re as _re

    def used(patterns: list[str]) -> list[str]:
        return [p for p in patterns if any(_re.match(p, n) for n in param_names)]

    return {
        "universal_checkpoint_version": 0.4,
        "parameter_with_row_parallelism_patterns": used([r".*o_proj\.weight$", r".*down_proj\.weight$"]),
        "tp_replicated_parameter_patterns": used([r".*conv\.weight$", r".*norm\.weight$", r".*norm\.bias$"]),
        "vocabulary_parameter_patterns": used([r"^embed\.weight$", r"^lm_head\.weight$"]),
        "original_vocab_size": vocab_size,
    }


def convert_to_universal(folder: Path) -> Path:
    """DeepSpeed universal checkpoint of `folder` (rank 0 only), in folder/universal; done once, reused after."""
    out = folder / "universal"
    if (out / "zero").is_dir() and (out / "mp_rank_00_model_states.pt").is_file():
        return out
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    tmp = folder / "universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(tmp), num_extract_workers=2,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    os.replace(tmp, out)
    return out


def save_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    client_state: dict,
    manifest_extra: dict,
    extra_files: dict[str, bytes],
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    from pretrain.faults import kill_point

    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    staging = ckpt_dir / f".staging-{tag}"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), staging / tag / f"rng_rank{rank:05d}.pt")
    kill_point("kill_in_save", step, rank)
    _barrier()
    final = ckpt_dir / tag
    if rank == 0:
        for name, data in extra_files.items():
            (staging / tag / name).write_bytes(data)
        files = {
            str(p.relative_to(staging / tag)): p.stat().st_size for p in sorted((staging / tag).rglob("*")) if p.is_file()
        }
        manifest = {"tag": tag, "step": step, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": files, **manifest_extra}
        _fsync_tree(staging)
        _write_atomic(staging / tag / MANIFEST, json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        shutil.rmtree(staging, ignore_errors=True)
        _write_atomic(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep_last)
    _barrier()
    return final


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def check_checkpoint(path: Path) -> str:
    """"" if the checkpoint at `path` is complete, else why it is not."""
    manifest = read_manifest(path)
    if manifest is None:
        return f"{path}: no readable {MANIFEST} (the save did not finish)"
    for rel, size in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            return f"{path}: {rel} is missing"
        if f.stat().st_size != size:
            return f"{path}: {rel} has {f.stat().st_size} bytes, the manifest says {size}"
    return ""


def list_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def find_resumable(ckpt_dir: Path) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint (preferring `latest`), and warnings about torn ones skipped."""
    warnings: list[str] = []
    tags = list_tags(ckpt_dir)
    latest_file = ckpt_dir / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    order = sorted(tags, reverse=True)
    if latest in tags:
        order.remove(latest)
        order.insert(0, latest)
    for tag in order:
        problem = check_checkpoint(ckpt_dir / tag)
        if not problem:
            return tag, warnings
        warnings.append(f"skipping torn checkpoint {problem}")
    return None, warnings


def prune(ckpt_dir: Path, keep_last: int) -> None:
    good = [t for t in list_tags(ckpt_dir) if not check_checkpoint(ckpt_dir / t)]
    for tag in good[:-keep_last]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    for stale in ckpt_dir.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
