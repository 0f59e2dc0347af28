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


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile the stages of each block around the recurrent operator, in place (parameter names unchanged):
    `pre` (norm, short conv, projections) and `post` (head norm, gate, output projection, residuals, SwiGLU) are each
    one whole graph, where Inductor fuses the norms, the conv taps and the epilogues; the Triton recurrence runs
    between them with its own autograd. Compiling the whole block instead cut it where dynamo met the operator, inside
    the mixer: four graphs per block, and at the cut after the norm the conv's gradient (a strided slice of its padded
    buffer) was copied to a contiguous tangent, 0.17 ms a layer at the 1.3B shape on an H200. The final norm is
    compiled too (eager, it ran as five fp32 passes over the hidden states). `backend`: torch.compile's (tests use
    "aot_eager": the same graphs and autograd, without code generation)."""
    import torch

    for block in model.layers:
        block.pre = torch.compile(block.pre, backend=backend)
        block.post = torch.compile(block.post, backend=backend)
    model.norm.compile(backend=backend)


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
