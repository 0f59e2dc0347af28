"""Triton kernel of the fused master-weight AdamW step: one pass reads the low-precision gradient and the fp32
master and moments, and writes the master, the moments and the master's low-precision copy (the weights the model
computes with). DeepSpeed's ZeRO-1/2 step does the same in three passes: the gradient cast to a new fp32 tensor,
AdamW over fp32 tensors, and a copy of the fp32 master into the bf16 weights (`pretrain/zero_step.py`)."""

from __future__ import annotations

import triton
import triton.language as tl

import metala.ops.utils.triton_compat  # noqa: F401  (interpreter shim)


@triton.jit
def adamw_master_kernel(
    master, exp_avg, exp_avg_sq, grad, lp_out, step, found_inf, grad_scale,
    n, lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
    HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:  # noqa: SIM102  (a compile-time branch around a run-time one: no load without the flag)
        # a skipped step writes nothing (torch's fused AdamW: parameters, moments and step counts stay)
        if tl.load(found_inf) != 0:
            return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(step).to(tl.float32)
    # beta ** t on the device (the step count is a device tensor: no host read); log2(beta) comes from the host
    bias_correction1 = 1.0 - tl.exp2(t * log2_beta1)
    bias_correction2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(t * log2_beta2))
    g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale).to(tl.float32))
    p = tl.load(master + offs, mask=mask, other=0.0)
    m = tl.load(exp_avg + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq + offs, mask=mask, other=0.0)
    p -= lr * weight_decay * p
    m = beta1 * m + (g - beta1 * g)
    v = beta2 * v + (g * g - beta2 * (g * g))
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p -= tl.div_rn(tl.div_rn(lr, bias_correction1) * m, denom)
    tl.store(master + offs, p, mask=mask)
    tl.store(exp_avg + offs, m, mask=mask)
    tl.store(exp_avg_sq + offs, v, mask=mask)
    tl.store(lp_out + offs, p.to(lp_out.dtype.element_ty), mask=mask)
