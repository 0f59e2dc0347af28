"""Megatron-style tensor parallelism for a plain `metala` model, applied in place.

Heads are split across the TP group (rank r owns heads [r H/T, (r+1) H/T)):
  - W_q, W_a, W_v, W_g (+ b_g), W_K (use_key), w_aug: column-parallel (row slices), no communication;
  - the short conv runs on the full (replicated) input; its output passes `copy_to_group`, so the input gradient
    coming back from the local heads is summed over TP before the conv: the conv weight's gradient is then
    complete and identical on every rank;
  - recurrence, self-augmentation, head LayerNorm and the SiLU gate act on local heads;
  - W_o: row-parallel (column slice) + all-reduce; SwiGLU: W_gate, W_up column, W_down row;
  - the embedding is vocabulary-parallel (rows [r V/T, (r+1) V/T), out-of-range ids give zero rows, all-reduce);
    the LM head shares that slice (tied) or has its own, and the loss is a vocabulary-parallel cross-entropy:
    full logits are never gathered.
Parameters keep their names (forwards are patched, modules are not wrapped), every shard is a slice of the full
initialised matrix (so TP = 1 and TP = n start from identical weights), and sharded parameters carry
`tensor_model_parallel = True` so DeepSpeed counts them once per TP group in the gradient norm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.parallel.comm import copy_to_group, reduce_from_group
from pretrain.parallel.layout import ParallelLayout

IGNORE_INDEX = -100


def _shard(module: nn.Module, name: str, dim: int, rank: int, size: int) -> None:
    full = getattr(module, name)
    if full.shape[dim] % size:
        raise ValueError(f"{name} of shape {tuple(full.shape)} cannot be split {size} ways along dim {dim}")
    part = full.detach().chunk(size, dim=dim)[rank].clone()
    p = nn.Parameter(part, requires_grad=full.requires_grad)
    p.tensor_model_parallel = True
    p.partition_dim = dim
    setattr(module, name, p)


def _column(linear: nn.Linear, rank: int, size: int) -> None:
    _shard(linear, "weight", 0, rank, size)
    if linear.bias is not None:
        _shard(linear, "bias", 0, rank, size)
    linear.out_features //= size


def _row(linear: nn.Linear, rank: int, size: int, group) -> None:
    _shard(linear, "weight", 1, rank, size)
    linear.in_features //= size

    def forward(x, _lin=linear):
        return reduce_from_group(F.linear(x, _lin.weight), group)

    linear.forward = forward


def _copy_after(module: nn.Module, group) -> None:
    inner = module.forward

    def forward(*args, _inner=inner, **kwargs):
        out = _inner(*args, **kwargs)
        if isinstance(out, tuple):
            return (copy_to_group(out[0], group), *out[1:])
        return copy_to_group(out, group)

    module.forward = forward


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary: three all-reduces of one value per token, no gathered logits
    (Megatron `vocab_parallel_cross_entropy`). Returns per-token losses (0 where the label is ignored)."""

    @staticmethod
    def forward(ctx, logits, target, start, group):
        logits = logits.float()
        m = logits.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        logits = logits - m[:, None]
        V = logits.shape[-1]
        ignored = target == IGNORE_INDEX
        outside = (target < start) | (target >= start + V) | ignored
        local = (target - start).masked_fill(outside, 0)
        picked = logits.gather(-1, local[:, None]).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(picked, group=group)
        exp = logits.exp()
        total = exp.sum(-1)
        dist.all_reduce(total, group=group)
        loss = (total.log() - picked).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp.div_(total[:, None]), local, outside, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside, ignored = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, local] -= (~outside).float()
        g *= (grad * (~ignored).float())[:, None]
        return g, None, None, None


def vocab_parallel_loss(group, start: int, chunk: int = 0):
    """A `MetaLAForCausalLM.loss_fn` for a head sharded by vocabulary: (hidden, weight shard, labels) -> (sum, n)."""

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
        hidden = copy_to_group(hidden, group)
        count = (labels != IGNORE_INDEX).sum()
        step = chunk if chunk > 0 else hidden.shape[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[0], step):
            logits = F.linear(hidden[s : s + step], weight.to(hidden.dtype))
            total = total + _VocabParallelCE.apply(logits, labels[s : s + step], start, group).sum()
        return total, count

    return loss_fn


def apply_tensor_parallel(model: nn.Module, layout: ParallelLayout) -> nn.Module:
    size, rank, group = layout.tp, layout.coords.tp, layout.tp_group
    if size == 1:
        return model
    cfg = model.config
    if cfg.n_heads % size:
        raise ValueError(f"parallel.tp={size} must divide the head count {cfg.n_heads}")
    if cfg.vocab_size % size:
        raise ValueError(f"parallel.tp={size} must divide vocab_size {cfg.vocab_size} (pad it to a multiple of 128)")
    if cfg.intermediate_size % size:
        raise ValueError(f"parallel.tp={size} must divide intermediate_size {cfg.intermediate_size}")
    for block in model.layers:
        mixer = block.mixer
        _copy_after(mixer.conv, group)
        for lin in (mixer.q_proj, mixer.a_proj, mixer.v_proj, mixer.g_proj):
            _column(lin, rank, size)
        if hasattr(mixer.key, "proj"):
            _column(mixer.key.proj, rank, size)
        if hasattr(mixer.self_aug, "w_aug"):
            _shard(mixer.self_aug, "w_aug", 0, rank, size)
        _row(mixer.o_proj, rank, size, group)
        _copy_after(block.mlp_norm, group)
        _column(block.mlp.gate_proj, rank, size)
        _column(block.mlp.up_proj, rank, size)
        _row(block.mlp.down_proj, rank, size, group)
    # vocabulary-parallel embedding and head
    start = rank * (cfg.vocab_size // size)
    _shard(model.embed, "weight", 0, rank, size)
    model.embed.num_embeddings //= size

    def embed_forward(ids, _emb=model.embed, _start=start):
        local = ids - _start
        outside = (local < 0) | (local >= _emb.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), _emb.weight)
        return reduce_from_group(out.masked_fill(outside[..., None], 0.0), group)

    model.embed.forward = embed_forward
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    else:
        _shard(model.lm_head, "weight", 0, rank, size)
    model.lm_head.out_features //= size
    model.loss_fn = vocab_parallel_loss(group, start, cfg.loss_chunk_size)
    return model


def merge_tp_state_dicts(shards: list[dict[str, torch.Tensor]], model_config: dict) -> dict[str, torch.Tensor]:
    """Full state dict from per-TP-rank module states (the inverse of `apply_tensor_parallel`'s slicing)."""
    row = ("o_proj.weight", "down_proj.weight")
    replicated = ("conv.weight", "norm.weight", "norm.bias")
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        if name.endswith(replicated):
            out[name] = parts[0]
        elif name.endswith(row):
            out[name] = torch.cat(parts, dim=1)
        else:
            out[name] = torch.cat(parts, dim=0)
    return out
