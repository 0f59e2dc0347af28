"""`metala_attn`: the functional API of the MetaLA operator, with argument checks and backend dispatch.

Backends are plain functions with the signature of `naive_recurrent_metala`. "naive" and "chunk" are pure PyTorch;
"triton" registers itself from `metala.ops.metala.chunk` when Triton can run (CUDA, or TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, NamedTuple

import torch

from metala.ops.metala.fused_recurrent import fused_recurrent_metala
from metala.ops.metala.naive import naive_chunk_metala, naive_recurrent_metala, naive_self_augmentation
from metala.ops.utils.varlen import check_cu_seqlens

Backend = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]

BACKENDS: dict[str, Backend] = {
    "naive": naive_recurrent_metala,
    "chunk": naive_chunk_metala,
    "recurrent": fused_recurrent_metala,
}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SplitOutput(NamedTuple):
    """The operator's fp32 output as two bf16 tensors, `hi` (the output rounded) and `lo` (the remainder, rounded):
    hi + lo keeps ~16 of fp32's 24 mantissa bits (relative error ~2^-17, against 2^-9 for hi alone). Only `hi`
    carries a gradient, which is the whole output's: the operator's backward then reads dO in bf16, and the caller's
    backward writes it in bf16, half the bytes of an fp32 gradient. `merge()` is the fp32 output; call it where the
    output is consumed (inside a compiled graph, where it fuses into the consumer)."""

    hi: torch.Tensor
    lo: torch.Tensor

    def merge(self) -> torch.Tensor:
        return self.hi.float() + self.lo.float()


def triton_usable(device: torch.device) -> bool:
    """True when the Triton backend can run on `device` (a GPU, or any device under TRITON_INTERPRET=1)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _triton_backend() -> Backend:
    if "triton" not in BACKENDS:
        mod = importlib.import_module("metala.ops.metala.chunk")
        BACKENDS["triton"] = mod.chunk_metala_backend
    return BACKENDS["triton"]


def resolve_backend_name(backend: str, device: torch.device, seq_len: int, needs_grad: bool, varlen: bool) -> str:
    """ "triton", "triton_recurrent", "chunk", "naive" or "recurrent": "auto" is triton on CUDA (its recurrent
    kernel for single-token decoding), chunk elsewhere (the recurrent step for decoding)."""
    decode = seq_len == 1 and not needs_grad and not varlen
    if backend == "auto":
        if device.type == "cuda" and triton_usable(device):
            return "triton_recurrent" if decode else "triton"
        return "recurrent" if decode else "chunk"
    if backend == "triton":
        if not triton_usable(device):
            raise ValueError(
                f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 and the triton package (device={device})"
            )
        return "triton"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {['auto', 'triton', *BACKENDS]}")
    return backend


def resolve_backend(
    backend: str, device: torch.device, seq_len: int, needs_grad: bool, varlen: bool = False
) -> Backend:
    """The implementation `metala_attn` runs for these arguments (see `resolve_backend_name`)."""
    name = resolve_backend_name(backend, device, seq_len, needs_grad, varlen)
    if name == "triton":
        return _triton_backend()
    if name == "triton_recurrent":
        from metala.ops.metala.fused_recurrent import fused_recurrent_metala_triton

        return lambda q, g, v, k=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None: (
            fused_recurrent_metala(q, g, v, k=k, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state)
            if k is not None
            else fused_recurrent_metala_triton(q, g, v, scale=scale, initial_state=initial_state,
                                               output_final_state=output_final_state)
        )
    return BACKENDS[name]


def check_metala_args(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    k: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> None:
    """Shape and dtype checks: no host synchronisation."""
    for name, t in (("q", q), ("g", g), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D seq-first [B, T, H, D], got shape {tuple(t.shape)}")
    if g.shape != q.shape:
        raise ValueError(f"g must have the shape of q {tuple(q.shape)}, got {tuple(g.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H of q {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    if v.dtype != q.dtype:
        raise ValueError(f"v must have the dtype of q ({q.dtype}), got {v.dtype}")
    if g.dtype != torch.float32:
        # in half precision 1 - exp(g) rounds to 0 once the decay is within 2^-8 of 1
        raise ValueError(f"g (log-decay) must be float32, got {g.dtype}")
    if k is not None and k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    B, T, H, K = q.shape
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed to B = 1, got B = {B}")
    if initial_state is not None:
        n = B if cu_seqlens is None else cu_seqlens.numel() - 1
        want = (n, H, K, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [N, H, K, V] = {want}, got {tuple(initial_state.shape)}")
        if initial_state.dtype != torch.float32:
            raise ValueError(f"initial_state must be float32, got {initial_state.dtype}")


def check_w_aug(w_aug: torch.Tensor | None, q: torch.Tensor) -> None:
    """The self-augmentation weight: H * K float values ([H * K] or [H, K]) on q's device."""
    if w_aug is None:
        return
    H, K = q.shape[2], q.shape[3]
    if not isinstance(w_aug, torch.Tensor) or not w_aug.is_floating_point():
        raise ValueError(f"w_aug must be a float tensor, got {getattr(w_aug, 'dtype', type(w_aug).__name__)}")
    if w_aug.numel() != H * K or w_aug.dim() not in (1, 2) or (w_aug.dim() == 2 and tuple(w_aug.shape) != (H, K)):
        raise ValueError(f"w_aug must be [H * K] = [{H * K}] or [H, K] = [{H}, {K}], got {tuple(w_aug.shape)}")
    if w_aug.device != q.device:
        raise ValueError(f"w_aug must be on q's device {q.device}, got {w_aug.device}")


def metala_attn(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    *,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MetaLA decayed linear attention, seq-first layout.

    Computes, per head, S_t = diag(exp g_t) S_{t-1} + k_t^T v_t and o_t = scale * q_t S_t, with the key derived from
    the decay, k_t = 1 - exp(g_t), unless `k` is given (the `use_key` ablation). The state is fp32 throughout.

    Args:
        q: queries [B, T, H, K] (fp32, bf16 or fp16).
        g: log-decay [B, T, H, K], fp32, every entry <= 0 (logsigmoid(z) / 16 in the model).
        v: values [B, T, H, V], dtype of q.
        k: optional explicit keys [B, T, H, K]; default 1 - exp(g) computed in fp32.
        scale: multiplier of q S; default K ** -0.5.
        initial_state: fp32 [N, H, K, V]; N = B, or the number of documents with `cu_seqlens`.
        output_final_state: also return the fp32 final state [N, H, K, V].
        cu_seqlens: int [N + 1] document boundaries of a packed B = 1 batch; the state restarts from
            `initial_state[n]` (or zero) at every document start.
        backend: "auto" (triton on CUDA, chunk elsewhere), "naive", "chunk" or "triton".
        check_values: verify g <= 0 and cu_seqlens (one host sync); the model layer, whose g is <= 0 by
            construction, turns it off.

    Returns:
        (o [B, T, H, V] in q's dtype, final state or None).

    Examples::

        >>> q, z, v = torch.randn(2, 100, 4, 64), torch.randn(2, 100, 4, 64), torch.randn(2, 100, 4, 128)
        >>> g = torch.nn.functional.logsigmoid(z) / 16
        >>> o, ht = metala_attn(q, g, v, output_final_state=True)
        >>> cu = torch.tensor([0, 30, 200])  # two packed documents
        >>> o, ht = metala_attn(q.flatten(0, 1)[None], g.flatten(0, 1)[None], v.flatten(0, 1)[None], cu_seqlens=cu)
    """
    check_metala_args(q, g, v, k, initial_state, cu_seqlens)
    if check_values:
        if not bool((g <= 0).all()):
            raise ValueError(f"g is a log-decay and must be <= 0 everywhere (no NaN), max is {g.max().item():.4g}")
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, q.shape[1])
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, g, v, k, initial_state)
    )
    fn = resolve_backend(backend, q.device, q.shape[1], needs_grad, varlen=cu_seqlens is not None)
    return fn(
        q,
        g,
        v,
        k=k,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


def metala_attn_from_logits(
    q: torch.Tensor,
    z: torch.Tensor,
    v: torch.Tensor,
    *,
    decay_normalizer: float = 16.0,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    w_aug: torch.Tensor | None = None,
    split_output: bool = False,
) -> tuple[torch.Tensor | SplitOutput, torch.Tensor | None]:
    """`metala_attn` from the gate logits z: g = logsigmoid(z) / decay_normalizer.

    On the Triton path the log-decay, the key and dz are computed inside the kernels from z (no fp32 g tensor is
    written or read); the PyTorch backends compute g in fp32 first. Used by the model layer.

    w_aug (the self-augmentation weight, [H * K] or [H, K]): the output also holds sigmoid(a v) with
    a = sum_K q w_aug k (paper Eq. 22). The chunked Triton path fuses it into its output and backward kernels;
    every other path adds `naive_self_augmentation` in fp32 after the operator. The output is then fp32 (as the
    layer's unfused o + term): rounded to bf16, o + ~0.5 would keep little of the recurrent part's precision, which
    is what the head norm keeps after centring. `split_output`: where the Triton kernels produce that fp32 output
    from bf16 inputs, return it as a `SplitOutput` (its gradient comes back in bf16); everywhere else a tensor.
    """
    check_w_aug(w_aug, q)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, z, v, k, initial_state, w_aug)
    )
    name = resolve_backend_name(backend, q.device, q.shape[1], needs_grad, cu_seqlens is not None)
    if k is None and name == "triton":
        from metala.ops.metala.chunk import chunk_metala_from_logits

        return chunk_metala_from_logits(q, z, v, decay_normalizer, scale=scale, initial_state=initial_state,
                                        output_final_state=output_final_state, cu_seqlens=cu_seqlens, w_aug=w_aug,
                                        split_output=split_output)
    g = None
    if k is None and name == "triton_recurrent":
        from metala.ops.metala.fused_recurrent import fused_recurrent_metala_triton

        o, final = fused_recurrent_metala_triton(q, z, v, scale=scale, initial_state=initial_state,
                                                 output_final_state=output_final_state, gate_logits=True,
                                                 decay_normalizer=decay_normalizer)
    else:
        g = torch.nn.functional.logsigmoid(z.float()) / decay_normalizer
        check_metala_args(q, g, v, k, initial_state, cu_seqlens)
        fn = resolve_backend(backend, q.device, q.shape[1], needs_grad, cu_seqlens is not None)
        o, final = fn(q, g, v, k=k, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=cu_seqlens)
    if w_aug is not None:
        if k is None:
            k = -torch.expm1(torch.nn.functional.logsigmoid(z.float()) / decay_normalizer if g is None else g)
        o = o.float() + naive_self_augmentation(q, k, v, w_aug)
    return o, final
