"""The fused master-weight AdamW step (`adamw_master_step_`): the Triton kernel on a GPU (or when asked for, under
the interpreter), the naive twin elsewhere."""

from __future__ import annotations

import math

import torch

from pretrain.master_adamw.naive import naive_adamw_master_step_

__all__ = ["adamw_master_step_", "naive_adamw_master_step_"]

# elements per program: 8 per thread at 8 warps (two 16-byte fp32 vectors); 2,985 GB/s at 1.3B parameters on an H100
# (`python -m bench.master_adamw`, 2026-12-06), ~89 % of its HBM peak: no other size was tried
BLOCK = 2048
NUM_WARPS = 8


def adamw_master_step_(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                       lp_out: torch.Tensor, step: torch.Tensor, *, lr: float, beta1: float, beta2: float,
                       eps: float, weight_decay: float, found_inf: torch.Tensor | None = None,
                       grad_scale: torch.Tensor | None = None, backend: str = "auto") -> None:
    """In place: one AdamW update of the flat fp32 `master` and its moments from `grad` (any float dtype), and
    `lp_out` (the low-precision weights, same numel) set to the result. See `naive_adamw_master_step_` for the
    arguments. backend: "auto" (the kernel on CUDA tensors, the twin elsewhere: under the CPU interpreter the kernel
    is a test vehicle, too slow for a whole model's step), "triton" or "naive"."""
    if backend not in ("auto", "triton", "naive"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'naive', got {backend!r}")
    tensors = {"master": master, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "grad": grad, "lp_out": lp_out}
    n = master.numel()
    for name, t in tensors.items():
        if t.numel() != n or not t.is_contiguous() or t.device != master.device:
            raise ValueError(f"{name}: expected a contiguous tensor of {n} elements on {master.device}, got "
                             f"{tuple(t.shape)} (contiguous={t.is_contiguous()}) on {t.device}")
    for name in ("master", "exp_avg", "exp_avg_sq"):
        if tensors[name].dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {tensors[name].dtype}")
    if not 0.0 < beta1 < 1.0 or not 0.0 < beta2 < 1.0:
        raise ValueError(f"betas must be in (0, 1), got ({beta1}, {beta2})")
    kwargs = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
              "found_inf": found_inf, "grad_scale": grad_scale}
    if backend == "naive" or (backend == "auto" and not master.is_cuda):
        naive_adamw_master_step_(master, exp_avg, exp_avg_sq, grad, lp_out, step, **kwargs)
        return
    if n == 0:
        return
    import triton

    from pretrain.master_adamw.kernel import adamw_master_kernel

    adamw_master_kernel[(triton.cdiv(n, BLOCK),)](
        master, exp_avg, exp_avg_sq, grad, lp_out, step,
        found_inf if found_inf is not None else step, grad_scale if grad_scale is not None else step,
        n, float(lr), float(beta1), float(beta2), math.log2(beta1), math.log2(beta2), float(eps),
        float(weight_decay), HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None,
        BLOCK=BLOCK, num_warps=NUM_WARPS)
