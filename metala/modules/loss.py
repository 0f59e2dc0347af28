"""Next-token cross-entropy over the LM head.

Two implementations of the same sum of token losses:
- `plain_lm_cross_entropy` (the naive twin): full logits, fp32 softmax.
- `fused_lm_cross_entropy`: position chunks; each chunk's logits live only inside the forward, where its gradient
  (softmax - one-hot) is turned at once into d hidden and accumulated into d weight. Neither the full logits nor
  their fp32 copy nor their gradient ever exist, and no logits are recomputed in the backward
  (shared/spec/performance.md 5.1: at 32k tokens x 32k vocab the unfused logits are GBs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metala.ops.cross_entropy import ce_loss_and_grad
from metala.ops.cross_entropy.naive import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "fused_lm_cross_entropy", "lm_cross_entropy", "plain_lm_cross_entropy"]


def plain_lm_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    logits = F.linear(hidden, weight.to(hidden.dtype))
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def _chunk_loss_and_grad(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, need_grad: bool):
    """Loss sum of one chunk and, if asked, d logits (softmax - one-hot, zero on ignored rows) in h's dtype; on GPU
    the Triton kernel turns the chunk's logits into their gradient in place (metala/ops/cross_entropy)."""
    loss, grad = ce_loss_and_grad(F.linear(h, w), y, need_grad)
    return loss.sum(), grad


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. On CUDA with bf16/fp16 operands one GEMM accumulates into fp32 in place (1.13 against
    1.45 ms for mm + cast + add at the 1.3B vocab shape on an H200, and no bf16 rounding of each chunk's product:
    relative error 7e-6 against 1.7e-3)."""
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += torch.mm(a, b).float()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
        w = weight.to(hidden.dtype)
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = hidden.new_zeros((), dtype=torch.float32)
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[s : s + chunk_size], labels[s : s + chunk_size]
            loss, g = _chunk_loss_and_grad(h, w, y, need)
            total += loss
            if d_hidden is not None:
                torch.mm(g, w, out=d_hidden[s : s + chunk_size])
            if d_weight is not None:
                _accumulate_mm(d_weight, g.t(), h)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        d_hidden, d_weight = ctx.saved_tensors
        dh = d_hidden * grad_out.to(d_hidden.dtype) if d_hidden is not None else None
        dw = None
        if d_weight is not None:
            # scaled and cast in one pass: mul computes in fp32 and writes the weight's dtype into `out`
            dw = torch.empty(d_weight.shape, dtype=ctx.weight_dtype, device=d_weight.device)
            torch.mul(d_weight, grad_out, out=dw)
        return dh, dw, None, None


def fused_lm_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
    """Sum of token losses and the number of scored tokens; hidden [N, D], weight [V, D], labels [N]."""
    count = (labels != IGNORE_INDEX).sum()
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        # evaluation: chunked loss only, no gradients computed
        w = weight.to(hidden.dtype)
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk_size):
            total = total + _chunk_loss_and_grad(hidden[s : s + chunk_size], w, labels[s : s + chunk_size], False)[0]
        return total, count
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size), count


def lm_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 0):
    """chunk_size > 0: the fused chunked loss (gradient formed in the forward); 0: the plain loss."""
    if chunk_size <= 0 or hidden.shape[0] <= chunk_size:
        return plain_lm_cross_entropy(hidden, weight, labels)
    return fused_lm_cross_entropy(hidden, weight, labels, chunk_size)
