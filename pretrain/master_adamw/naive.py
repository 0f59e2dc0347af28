"""Naive twin of the fused master-weight AdamW step (`kernel.py`): torch's fused AdamW update (decoupled weight
decay) on an fp32 master tensor whose gradient comes in the low-precision dtype, followed by the low-precision copy
of the result. In place; nothing is read back to the host."""

from __future__ import annotations

import torch


def naive_adamw_master_step_(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                             grad: torch.Tensor, lp_out: torch.Tensor, step: torch.Tensor, *, lr: float,
                             beta1: float, beta2: float, eps: float, weight_decay: float,
                             found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW update of `master` (fp32, flat) and its moments; `lp_out` gets the updated master in its dtype.

    `step` is the fp32 step-count tensor, already counted for this step (the bias corrections read it).
    `found_inf` (fp32 scalar, 1.0 = skip): leaves master, moments and `lp_out` as they were. `grad_scale`: the
    gradient is divided by it as it is read (the step guard's clipping divisor). The order of operations is the one
    of torch's fused AdamW (ATen `fused_adam_utils.cuh`)."""
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
    p = master - lr * weight_decay * master if weight_decay != 0 else master.clone()
    m = beta1 * exp_avg + (g - beta1 * g)
    v = beta2 * exp_avg_sq + (g * g - beta2 * (g * g))
    t = step.float()
    bias_correction1 = 1 - torch.pow(beta1, t)
    bias_correction2_sqrt = torch.sqrt(1 - torch.pow(beta2, t))
    p = p - (lr / bias_correction1) * m / (torch.sqrt(v) / bias_correction2_sqrt + eps)
    if found_inf is not None:
        keep = found_inf != 0
        p, m, v = (torch.where(keep, old, new) for old, new in ((master, p), (exp_avg, m), (exp_avg_sq, v)))
        lp_new = torch.where(keep, lp_out, p.to(lp_out.dtype))
    else:
        lp_new = p.to(lp_out.dtype)
    master.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    lp_out.copy_(lp_new)
