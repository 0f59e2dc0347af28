"""Turn a plain `metala` model into the training model: TP -> SP -> activation checkpointing -> compile.

The model files hold architecture only; everything here wraps or patches module forwards without renaming
parameters, so checkpoint keys stay those of the plain model.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import ConfigError, TrainConfig
from pretrain.parallel.layout import ParallelLayout


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward (non-reentrant checkpoint); names unchanged."""
    for block in model.layers:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def parallelize(model: nn.Module, cfg: TrainConfig, layout: ParallelLayout) -> nn.Module:
    if layout.tp > 1 or layout.sp > 1:
        raise ConfigError("parallel.tp > 1 and parallel.sp > 1 are not available in this build")
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model
