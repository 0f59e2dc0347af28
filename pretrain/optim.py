"""AdamW with the GPT-NeoX weight-decay rule and the warm-up + cosine schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every parameter except biases and norm parameters (GPT-NeoX `get_params_for_weight_decay_optimization`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if name.endswith(".bias") or "norm" in owner:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total` (flat after)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    # fused on every device (torch has a CPU kernel too): one kernel per step, and the step guard's skip and clip
    # ride on its `found_inf` / `grad_scale` (pretrain/step_guard.py), so CPU tests run the GPU's code path; under
    # DeepSpeed ZeRO-1/2 its fused master step also takes over the fp32 masters' update (pretrain/zero_step.py)
    return MasterWeightAdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, warmup, total, min_ratio))


class MasterWeightAdamW(torch.optim.AdamW):
    """torch's fused AdamW, plus a fused step for flat fp32 master tensors whose gradient comes in the weights'
    low-precision dtype and whose low-precision copy it writes in the same pass (`pretrain.master_adamw`).

    A ZeRO step (`pretrain/zero_step.py`) puts `{master: (lp_grad, lp_weights)}` in `lp_io` before it calls
    `step()`; parameters listed there take the fused step, with the same state entries (`step`, `exp_avg`,
    `exp_avg_sq`), the same skip (`found_inf`) and gradient divisor (`grad_scale`) as torch's fused AdamW, so
    checkpoints and the step guard see no difference. Without `lp_io` this is torch's fused AdamW."""

    def __init__(self, params, backend: str = "auto", **kwargs) -> None:
        super().__init__(params, fused=True, **kwargs)
        self.lp_io: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        # the fused step's implementation (`adamw_master_step_`): "auto" is the kernel on a GPU, the twin elsewhere
        self.backend = backend

    @torch.no_grad()
    def step(self, closure=None):
        if not self.lp_io:
            return super().step(closure)
        if closure is not None:
            raise ValueError("MasterWeightAdamW: a closure is not supported with low-precision gradients (lp_io)")
        from pretrain.master_adamw import adamw_master_step_

        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or isinstance(group["lr"], torch.Tensor):
                raise ValueError("MasterWeightAdamW's fused master step supports neither amsgrad, maximize nor a "
                                 "tensor learning rate")
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                io = self.lp_io.get(p)
                if io is None:
                    if p.grad is not None:
                        raise RuntimeError("MasterWeightAdamW: a parameter with a .grad beside parameters stepped "
                                           "through lp_io; one step takes one kind")
                    continue
                state = self.state[p]
                if not state:
                    # torch's fused AdamW's entries, so that checkpoints and a later torch step read them alike
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # counted on the device, and not counted where the step is skipped (as torch's fused AdamW)
                state["step"].add_(1 if found_inf is None else 1 - found_inf)
                adamw_master_step_(p, state["exp_avg"], state["exp_avg_sq"], io[0], io[1], state["step"],
                                   lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                   weight_decay=group["weight_decay"], found_inf=found_inf, grad_scale=grad_scale,
                                   backend=self.backend)
        return None
