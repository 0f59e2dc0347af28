"""Turn a plain `metala` model into the training model: TP -> SP -> activation checkpointing -> compile.

The model files hold architecture only; everything here wraps or patches module forwards without renaming
parameters, so checkpoint keys stay those of the plain model.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
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


# Selective-checkpoint policies, module-level functions (dynamo takes them as constants; a closure made while
# tracing would break the graph). Every op but the kept one is prefer-save: the partitioner decides as before.
_HALF = (torch.bfloat16, torch.float16)


def _must_save_if(keep: bool):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_SAVE


def _product_policy(ctx, op, *args, **kwargs):
    # SiLU(a) * b, the region's one elementwise product: the SwiGLU's (the matmuls' outputs are saved at any budget)
    # and the mixer's output gate; SiLU(a) is recomputed from a in the backward's elementwise kernel either way
    return _must_save_if(op is torch.ops.aten.mul.Tensor)


def _cast_to_half_policy(ctx, op, *args, **kwargs):
    # a 16-bit region computed in fp32 (the norms; the conv's SiLU, `_silu_in_fp32`): its output is the cast back
    # to the input's 16-bit dtype; its fp32 intermediates are not kept (twice the bytes)
    return _must_save_if(op is torch.ops.aten._to_copy.default and kwargs.get("dtype") in _HALF)


def _norm_policy_fp32(ctx, op, *args, **kwargs):
    # fp32 input: no casts; the output is RMSNorm's one product or LayerNorm's native_layer_norm
    return _must_save_if(op in (torch.ops.aten.mul.Tensor, torch.ops.aten.native_layer_norm.default))


def _silu_policy_fp32(ctx, op, *args, **kwargs):
    # the short conv's SiLU, the input of the mixer's four projections (the conv's padded input is kept at any budget)
    return _must_save_if(op is torch.ops.aten.silu.default)


def _silu_in_fp32(self, x):
    """SiLU of a 16-bit tensor as F.silu computes it (in fp32, rounded once at the end), with the rounding as an op
    of its own. Marking aten.silu must-save would tag every op of its 16-bit decomposition, and the partitioner then
    also kept the fp32 copy of the conv's output that SiLU's backward reads; marking the final cast keeps the
    16-bit output alone."""
    return F.silu(x.float()).to(x.dtype)


def _product_policy_for(x):
    return _product_policy


def _silu_policy_for(x):
    return _cast_to_half_policy if x.dtype in _HALF else _silu_policy_fp32


def _norm_policy_for(x):
    return _cast_to_half_policy if x.dtype in _HALF else _norm_policy_fp32


def _save_output(module: nn.Module, policy_for: Callable, half_forward: Callable | None = None) -> None:
    """Run `module` as a selective-checkpoint region whose policy marks its output must-save (every other op is
    prefer-save: the partitioner decides as before). Compiled, the region traces into the surrounding graph (no graph
    break) and the partitioner keeps the tensor at any `activation_memory_budget`. Bound to the module as a method,
    not closed over it: a deep copy of the model keeps the region, bound to its own module and weights.
    `half_forward`: what the region computes for 16-bit inputs instead of the module's forward (the same values)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    def forward(self, x, *rest):
        context = functools.partial(create_selective_checkpoint_contexts, policy_for(x))
        fn = half_forward if half_forward is not None and x.dtype in _HALF else type(self).forward
        return checkpoint(fn, self, x, *rest, use_reentrant=False, context_fn=context)

    module.forward = types.MethodType(forward, module)


# compile_save name -> (the block's module whose output is kept, its policy chooser, its 16-bit forward or None)
_SAVE_REGIONS = {
    "swiglu": ("mlp", _product_policy_for, None),
    "mlp_norm": ("mlp_norm", _norm_policy_for, None),
    "conv_silu": ("mixer.conv_act", _silu_policy_for, _silu_in_fp32),
    "out_gate": ("mixer.out_gate", _product_policy_for, None),
}


def apply_compile_save(model: nn.Module, save: tuple[str, ...] | list[str]) -> None:
    """`train.compile_save`: activations the compiled graphs keep for the backward whatever the memory budget.
    "swiglu": SiLU(a) * b, the input of the down projection ([tokens, ffn], 2.75 [tokens, d_model] at the presets);
    "mlp_norm": the SwiGLU's input norm's output, the input of its gate and up projections ([tokens, d_model]);
    "conv_silu": SiLU of the mixer's short conv, the input of its four projections ([tokens, d_model]);
    "out_gate": SiLU(gate) * head-norm(o), the input of the mixer's output projection ([tokens, d_model]).
    Below budget 1 the partitioner recomputes all four in the backward; keeping them trades memory for that work.
    (The mixer's norm output needs no choice: its copy padded for the short conv is kept at any budget.) The names
    are checked where the config is (`TrainSection`, COMPILE_SAVE_CHOICES)."""
    for block in model.layers:
        for name in save:
            path, policy_for, half_forward = _SAVE_REGIONS[name]
            _save_output(block.get_submodule(path), policy_for, half_forward)


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
                  memory_budget: float = 1.0, mode: str = "default", save: tuple[str, ...] = ()) -> None:
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
    with the elementwise work fused into their epilogues). `save` (`train.compile_save`): see `apply_compile_save`."""
    import torch._functorch.config as functorch_config

    if save:
        apply_compile_save(model, save)

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
                      memory_budget=cfg.train.compile_memory_budget, mode=cfg.train.compile_mode,
                      save=tuple(cfg.train.compile_save))
    return model, sp
