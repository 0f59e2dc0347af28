"""Benchmarks; each writes JSON to bench/results/<yyyymmdd>_<gpu tag>_<bench>[_<tag>].json."""

import time
from pathlib import Path


def gpu_tag(name: str) -> str:
    """Short device name for result files: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200'."""
    for chip in ("H100", "H200", "B200", "A100"):
        if chip in name:
            return chip.lower()
    return name.replace("NVIDIA", "").strip().replace(" ", "_").lower() or "gpu"


def merge_sections(base: dict, change: dict) -> dict:
    """`base` with `change` applied: a dict-valued section is updated key by key, anything else replaced.
    {"bf16": {"enabled": True}} + {"bf16": {"check_grad_overflow": True}} keeps bf16 enabled."""
    out = dict(base)
    for k, v in change.items():
        out[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def result_path(out: Path, device: str, bench: str, tag: str = "") -> Path:
    """`out`/<yyyymmdd>_<device>_<bench>[_<tag>].json (the folder made if missing); `device`: `gpu_tag(...)` or
    "cpu"."""
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{time.strftime('%Y%m%d')}_{device}_{bench}{'_' + tag if tag else ''}.json"
