"""`ce_loss_and_grad`: per-row loss and in-place logits gradient; the Triton kernel on GPU (or under the
interpreter), the naive twin elsewhere."""

from __future__ import annotations

import torch

from metala.ops.cross_entropy.naive import IGNORE_INDEX, naive_ce_loss_and_grad
from metala.ops.metala.api import triton_usable

BLOCK_V = 4096


def ce_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, need_grad: bool = True, backend: str = "auto"):
    """logits [n, V] (overwritten with the gradient when need_grad and the kernel runs), labels [n].

    Returns (loss fp32 [n], gradient [n, V] in logits' dtype or None); see `naive_ce_loss_and_grad`.
    """
    if backend not in ("auto", "triton", "naive"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'naive', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and logits.is_cuda and triton_usable(logits.device))
    if not use_triton:
        return naive_ce_loss_and_grad(logits, labels, need_grad)
    from metala.ops.cross_entropy.kernel import ce_loss_grad_kernel

    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    block = min(BLOCK_V, max(16, 1 << (V - 1).bit_length()))
    ce_loss_grad_kernel[(n,)](logits, labels, loss, logits.stride(0), V, IGNORE=IGNORE_INDEX,
                              WRITE_GRAD=need_grad, BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
    return loss, (logits if need_grad else None)
