"""Turn a training checkpoint (DeepSpeed ZeRO files, possibly tensor-parallel shards) into one full fp32 state dict.

Accepts a run's out_dir, its checkpoints/ folder (the newest complete checkpoint is used) or one step_* folder.
The fp32 master weights are rebuilt from the ZeRO optimizer partitions (DeepSpeed's zero_to_fp32) when the run had
TP = 1; with TP > 1 the per-TP-rank module states are merged by `pretrain.parallel.tensor.merge_tp_state_dicts`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pretrain import checkpoint as ckpt

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """The step_* folder a path designates; raises FileNotFoundError with the reason if there is none."""
    p = Path(path)
    if ckpt.TAG_RE.match(p.name):
        problem = ckpt.check_checkpoint(p)
        if problem:
            raise FileNotFoundError(problem)
        return p
    for root in (p / "checkpoints", p):
        tag, warnings = ckpt.find_resumable(root)
        for w in warnings:
            log.warning(w)
        if tag is not None:
            return root / tag
    raise FileNotFoundError(f"no complete checkpoint under {p}")


def load_consolidated(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(full fp32 state dict, model config dict, checkpoint folder)."""
    folder = resolve_checkpoint(path)
    manifest = ckpt.read_manifest(folder)
    model_config = json.loads((folder / "model_config.json").read_text())
    tp = int(manifest.get("layout", {}).get("tp", 1))
    if tp == 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        from pretrain.parallel.tensor import merge_tp_state_dicts

        shards = [torch.load(folder / f"mp_rank_{r:02d}_model_states.pt", map_location="cpu", weights_only=False)["module"]
                  for r in range(tp)]
        state = merge_tp_state_dicts(shards, model_config)
    state = {k: v.float() for k, v in state.items()}
    if model_config.get("tie_embeddings", True):
        state.pop("lm_head.weight", None)
    return state, model_config, folder
