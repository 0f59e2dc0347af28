"""The MetaLA token mixer (`shared/spec/metala.md` section 2).

Shapes: B batch, T time, D = d_model, H heads, K = qk_dim / H, V = D / H.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metala.cache import LayerCache
from metala.config import MetaLAConfig
from metala.modules.conv import NoConv, ShortConv
from metala.modules.norm import head_layer_norm
from metala.ops.metala.api import SplitOutput, metala_attn_from_logits
from metala.ops.metala.naive import naive_self_augmentation


class DerivedKey(nn.Module):
    """k = 1 - alpha = -expm1(g): the key is tied to the decay, no projection (the MetaLA design)."""

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        # None lets the operator derive k in fp32 itself, without reading or storing a key tensor
        return None


class ProjectedKey(nn.Module):
    """The `use_key` ablation (paper Table 8, "w/ key"): an extra W_K d -> qk_dim replaces k = 1 - alpha."""

    def __init__(self, d_model: int, qk_dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.proj = nn.Linear(d_model, qk_dim, bias=False)

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        return self.proj(u).view(z.shape)


class SelfAugmentation(nn.Module):
    """o += sigmoid(a * v) with the per-head scalar a = sum_j q_j w_aug_j k_j (paper Eq. 22), in fp32.

    w_aug starts at 0, so the added 0.5 is removed exactly by the mean-centring head LayerNorm at init.
    """

    def __init__(self, n_heads: int, head_qk_dim: int, decay_normalizer: float) -> None:
        super().__init__()
        self.n_heads, self.head_qk_dim = n_heads, head_qk_dim
        self.decay_normalizer = decay_normalizer
        self.w_aug = nn.Parameter(torch.zeros(n_heads * head_qk_dim))

    def forward(
        self, o: torch.Tensor, q: torch.Tensor, z: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor
    ) -> torch.Tensor:
        k32 = -torch.expm1(F.logsigmoid(z.float()) / self.decay_normalizer) if k is None else k.float()
        return o.float() + naive_self_augmentation(q, k32, v, self.w_aug)


class NoSelfAugmentation(nn.Module):
    """The `self_aug=False` ablation."""

    def forward(
        self, o: torch.Tensor, q: torch.Tensor, z: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor
    ) -> torch.Tensor:
        return o.float()


class MixerParts(NamedTuple):
    """What the projections hand to the operator (q, z, k, v) and to the output gate (gt); conv_state is the short
    conv's new decoding state."""

    q: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor
    gt: torch.Tensor
    conv_state: torch.Tensor | None


class OutputGate(nn.Module):
    """SiLU(gate) * x, the mixer's output gate. A module of its own (no parameters), like `conv_act`, so that a
    trainer can mark its output as kept for the backward (pretrain/parallelize.py, `train.compile_save`)."""

    def forward(self, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * x


class MetaLAAttention(nn.Module):
    """MetaLA token mixer: Chou, Yao et al., "MetaLA: Unified Optimal Linear Approximation to Softmax Attention
    Map", NeurIPS 2024 (arXiv 2411.10741).

    u = SiLU(conv(x)); q = u W_q; g = logsigmoid(u W_a) / 16; k = 1 - exp(g); v = u W_v; gt = u W_g + b_g;
    o = LayerNorm_head(scale * q S + sigmoid((q w_aug k) v)); y = (SiLU(gt) * o) W_o.

    Args (forward):
        x: [B, T, D] block input after the first norm.
        cu_seqlens: int [N + 1] boundaries of packed documents (B = 1): state and conv history restart at each.
        cache: decoding cache of this layer; read as the initial state and updated in place.
        attention_mask: [B, T] 1 for real tokens, 0 for left padding; padded inputs are zeroed before the conv,
            which keeps the state at exactly zero through the padding.
    """

    def __init__(self, config: MetaLAConfig, layer_idx: int) -> None:
        super().__init__()
        d, dk, H = config.d_model, config.qk_dim, config.n_heads
        self.layer_idx = layer_idx
        self.n_heads, self.head_qk_dim, self.head_v_dim = H, config.head_qk_dim, config.head_v_dim
        self.decay_normalizer = config.decay_normalizer
        self.head_norm_eps = config.head_norm_eps
        self.backend = config.attn_backend
        self.scale = self.head_qk_dim**-0.5
        self.conv = ShortConv(d, config.conv_size) if config.use_conv else NoConv()
        self.conv_act = nn.SiLU()
        self.q_proj = nn.Linear(d, dk, bias=False)
        self.a_proj = nn.Linear(d, dk, bias=False)
        self.key = ProjectedKey(d, dk, H) if config.use_key else DerivedKey()
        self.v_proj = nn.Linear(d, d, bias=False)
        self.g_proj = nn.Linear(d, d, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.out_gate = OutputGate()
        self.self_aug = SelfAugmentation(H, self.head_qk_dim, config.decay_normalizer) if config.self_aug else NoSelfAugmentation()
        self.fuse_self_aug = config.fuse_self_aug and config.self_aug
        self.split_op_output = config.split_op_output
        # the operator; sequence parallelism swaps in a state-passing version (pretrain/parallel/sequence.py)
        self.attn_fn = metala_attn_from_logits

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = self.project(x, cu_seqlens, cache, attention_mask)
        o = self.attend(parts, cu_seqlens, cache)
        return self.finish(o, parts)

    # The three stages of forward. Only `attend` runs the recurrent operator: compiling the model means compiling the
    # stages around it (pretrain/parallelize.py), so that no compiled graph ends inside this module.

    def project(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> MixerParts:
        """x [B, T, D] -> the operator's inputs and the gate, with the short conv's new state."""
        B, T, _ = x.shape
        # head counts follow the projections' widths, so the same code runs on tensor-parallel shards
        K, V = self.head_qk_dim, self.head_v_dim
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        u, conv_state = self.conv(x, cu_seqlens, None if cache is None else cache.conv_state)
        u = self.conv_act(u)
        q = self.q_proj(u).view(B, T, -1, K)
        z = self.a_proj(u).view(B, T, -1, K)
        k = self.key(u, z)
        v = self.v_proj(u).view(B, T, -1, V)
        # the conv state is a view into the conv's padded input: handed on only where a cache will keep it
        return MixerParts(q, z, k, v, self.g_proj(u), conv_state if cache is not None else None)

    def attend(self, parts: MixerParts, cu_seqlens: torch.Tensor | None = None,
               cache: LayerCache | None = None) -> torch.Tensor:
        """The recurrence: o [B, T, H, V]; updates the decoding cache."""
        # the gate math (g = logsigmoid(z) / 16, k = 1 - exp(g), cumulative sums) runs in fp32 inside the
        # operator: in bf16, 1 - exp(g) is 0 for logits above ~3.5 (metala.md section 11.1). Fused, the operator
        # also adds the self-augmentation: q, z and v then feed one consumer, and no second pass reads them.
        o, final_state = self.attn_fn(
            parts.q,
            parts.z,
            parts.v,
            decay_normalizer=self.decay_normalizer,
            k=parts.k,
            scale=self.scale,
            initial_state=None if cache is None else cache.state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
            w_aug=self.self_aug.w_aug if self.fuse_self_aug else None,
            # during training only: decoding keeps the plain output
            split_output=self.split_op_output and cache is None,
        )
        if cache is not None:
            cache.state, cache.conv_state = final_state, parts.conv_state
        return o

    def finish(self, o: torch.Tensor, parts: MixerParts) -> torch.Tensor:
        """Self-augmentation (when not fused), head norm, output gate and projection -> [B, T, D]."""
        if isinstance(o, SplitOutput):
            o = o.merge()  # here, in the compiled graph: fused into the head norm's read
        B, T = o.shape[:2]
        if not self.fuse_self_aug:
            o = self.self_aug(o, parts.q, parts.z, parts.k, parts.v)
        o = head_layer_norm(o, self.head_norm_eps)
        gt = parts.gt
        return self.o_proj(self.out_gate(gt, o.reshape(B, T, -1).to(gt.dtype)))
