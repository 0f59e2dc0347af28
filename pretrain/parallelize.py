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
from pretrain.parallel.sequence import SequenceParallel, apply_sequence_parallel
from pretrain.parallel.tensor import apply_tensor_parallel


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward (non-reentrant checkpoint); names unchanged."""
    for block in model.layers:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (parameter names unchanged) so Inductor fuses the norms, the conv taps,
    SwiGLU and the head-norm/gate epilogue; the Triton recurrence stays a graph break (our kernels, own autograd)."""
    import torch

    for block in model.layers:
        mixer = block.mixer
        mixer.attn_fn = torch.compiler.disable(mixer.attn_fn)
        block.compile()


def parallelize(model: nn.Module, cfg: TrainConfig, layout: ParallelLayout) -> tuple[nn.Module, SequenceParallel | None]:
    """TP -> SP -> activation checkpointing, on a model that holds its full initial weights."""
    try:
        model = apply_tensor_parallel(model, layout)
        sp = apply_sequence_parallel(model, layout)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    return model, sp
