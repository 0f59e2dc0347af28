"""Turn a plain `metala` model into the training model: TP -> SP -> activation checkpointing -> compile.

The model files hold architecture only; everything here wraps or patches module forwards without renaming
parameters, so checkpoint keys stay those of the plain model.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

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


def _post_then_pre(block: nn.Module, nxt: nn.Module, x, o, parts, cu_seqlens):
    """Block i's stage after the operator and block i+1's stage before it, as one function: compiled, the residual
    stream h between them is used inside one graph (by the next block's norm and conv) and leaves it once (as the
    next block's residual input), so its two gradient contributions add inside the compiled backward, fused into
    the norm's gradient kernel, instead of in a separate elementwise add of autograd's. The class's functions, not
    the instances' (compiled) bound stages: dynamo traces the plain code into this one graph."""
    h = type(block).post(block, x, o, parts)
    return h, type(nxt).pre(nxt, h, cu_seqlens)


def _boundary_runner(boundary: Callable) -> Callable:
    """`run_layers` for training, bound to the model: pre_0, then per block the operator and one compiled boundary
    (post_i + pre_{i+1}), the last block's post alone. Decoding (a cache) and attention masks take the per-block
    stack. Bound as a method, not closed over the model: a deep copy of the model then runs its own layers."""

    def run_layers(self, h, cu_seqlens=None, cache=None, attention_mask=None):
        if cache is not None or attention_mask is not None:
            return type(self).run_layers(self, h, cu_seqlens, cache, attention_mask)
        layers = self.layers
        parts = layers[0].pre(h, cu_seqlens)
        for i, layer in enumerate(layers):
            o = layer.mixer.attend(parts, cu_seqlens)
            if i + 1 < len(layers):
                h, parts = boundary(layer, layers[i + 1], h, o, parts, cu_seqlens)
            else:
                h = layer.post(h, o, parts)
        return h

    return run_layers


def apply_compile(model: nn.Module, backend: str = "inductor", fuse_boundaries: bool = True,
                  memory_budget: float = 1.0, mode: str = "default") -> None:
    """torch.compile the stages of each block around the recurrent operator, in place (parameter names unchanged):
    `pre` (norm, short conv, projections) and `post` (head norm, gate, output projection, residuals, SwiGLU) are each
    one whole graph, where Inductor fuses the norms, the conv taps and the epilogues; the Triton recurrence runs
    between them with its own autograd. Compiling the whole block instead cut it where dynamo met the operator, inside
    the mixer: four graphs per block, and at the cut after the norm the conv's gradient (a strided slice of its padded
    buffer) was copied to a contiguous tangent, 0.17 ms a layer at the 1.3B shape on an H200. The final norm is
    compiled too (eager, it ran as five fp32 passes over the hidden states).

    `fuse_boundaries` (training without activation checkpointing, which checkpoints whole blocks): the model runs
    one graph per boundary between blocks, post_i + pre_{i+1} (`_post_then_pre`), instead of post_i and pre_{i+1}
    apart: autograd's add of the residual stream's two gradients, one elementwise pass over [B, T, D] a layer
    (2.2 ms a step at the 1.3B shape on an H200), moves into the compiled backward. The blocks' own compiled
    stages stay for decoding. `backend`: torch.compile's (tests use "aot_eager": the same graphs and autograd,
    without code generation).

    `memory_budget` < 1 (`train.compile_memory_budget`) sets torch's activation memory budget for the graphs compiled
    from here on, process-wide (compiling is lazy, at the first call, so a scoped setting would be gone by then): the
    partitioner then recomputes elementwise outputs in the backward rather than saving them. `mode`
    (`train.compile_mode`): torch.compile's, e.g. "max-autotune-no-cudagraphs" (Triton GEMM templates, autotuned,
    with the elementwise work fused into their epilogues)."""
    import torch
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = memory_budget
    # non-Inductor backends (the tests' "aot_eager") take no mode
    kw = {} if mode == "default" else {"mode": mode}

    # each stage compiled once from the class's function and bound to every block as a method: one graph shared by
    # the layers, and a deep copy of the model (an EMA or evaluation copy) rebinds to its own modules, where a
    # compiled bound method would keep calling the original's
    block_type = type(model.layers[0])
    pre = torch.compile(block_type.pre, backend=backend, **kw)
    post = torch.compile(block_type.post, backend=backend, **kw)
    for block in model.layers:
        block.pre = types.MethodType(pre, block)
        block.post = types.MethodType(post, block)
    model.norm.forward = types.MethodType(torch.compile(type(model.norm).forward, backend=backend, **kw), model.norm)
    if fuse_boundaries and len(model.layers) > 1:
        boundary = torch.compile(_post_then_pre, backend=backend, **kw)
        model.run_layers = types.MethodType(_boundary_runner(boundary), model)


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
        # checkpointed blocks keep their per-block forward: the boundary graphs would span two checkpoints
        apply_compile(model, fuse_boundaries=not cfg.train.activation_checkpointing,
                      memory_budget=cfg.train.compile_memory_budget, mode=cfg.train.compile_mode)
    return model, sp
