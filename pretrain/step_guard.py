"""Skip an optimizer update whose loss or gradients are non-finite on any rank (parameters and Adam state untouched)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from pretrain.distributed import comm_device
from pretrain.grad_norm import use_fused_grad_norm


class NonFiniteStepGuard:
    """Wraps `optimizer.step` (the base optimizer, before DeepSpeed wraps it) so that a step whose loss or gradients
    are non-finite on any rank changes nothing; every rank takes the same decision (one all-reduce of a flag a step).

    DeepSpeed's ZeRO optimizers step the base optimizer once per parameter group, handing it only that group's flat
    fp32 partition, after computing the global gradient norm over every group (all-reduced over data-parallel
    ranks). `attach(engine.optimizer)` lets the guard read that norm, so one bad tensor anywhere skips every group:
    this is what lets the trainer turn DeepSpeed's own bf16 overflow check off (`pretrain.trainer.deepspeed_config`),
    which runs ~35 small ops per parameter tensor. Without a norm (nothing attached, or no norm computed) the guard
    checks the gradients of the group it is handed.

    The same all-reduce carries `stop_flag()` (a preemption signal on this rank), so that a multi-rank trainer agrees
    on stopping without a collective and a host wait of its own each step: `stop_agreed` (None until decided).

    With `take_over_clipping(engine.optimizer)` (ZeRO-1/2) the guard also clips the gradients by that norm, on the
    device, instead of DeepSpeed.

    Per step: `new_step()`, then `observe_loss(loss)` for each micro-batch; then `update_dropped`."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device,
                 stop_flag: Callable[[], bool] | None = None) -> None:
        self.stop_agreed: bool | None = None
        self.loss_finite = torch.ones((), dtype=torch.bool, device=device)
        self.skipped = False
        # whether the wrapped step was called this step (DeepSpeed drops a step on its own overflow checks: fp16
        # loss scaling, ZeRO-3's invalid norm) and never calls it then
        self.reached = False
        self._norm_source = None
        self._decided: bool | None = None  # this step's decision, once taken (ok = True)
        # gradient clipping taken over from DeepSpeed (`take_over_clipping`): the max norm, and this step's divisor
        self.clip = 0.0
        self._clip_divisor: torch.Tensor | None = None
        inner_step = optimizer.step

        def guarded_step(*args, **kwargs):
            self.reached = True
            norm = getattr(self._norm_source, "_global_grad_norm", None)
            if self._decided is None or norm is None:
                ok = self.loss_finite.clone()
                if isinstance(norm, torch.Tensor):
                    # DeepSpeed's norm of every group; it writes -1 where the norm came out inf or NaN
                    ok &= torch.isfinite(norm) & (norm >= 0)
                elif norm is not None:
                    ok &= bool(math.isfinite(norm) and norm >= 0)
                else:
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            if p.grad is not None:
                                ok &= torch.isfinite(p.grad).all()
                stop = bool(stop_flag()) if stop_flag is not None else False
                flags = torch.stack([~ok, torch.tensor(stop, device=ok.device)]).to(torch.int32).to(comm_device())
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                bad, stop_any = flags.tolist()
                self._decided = not bad
                self.stop_agreed = bool(stop_any)
            if not self._decided:
                self.skipped = True
                return None
            if self.clip > 0 and isinstance(norm, torch.Tensor):
                if self._clip_divisor is None:
                    # DeepSpeed's own rule, on the device (its version reads the norm on the host once per group)
                    self._clip_divisor = torch.clamp((norm.float() + 1e-6) / self.clip, min=1.0)
                if all(group.get("fused") for group in optimizer.param_groups):
                    # the fused AdamW divides each gradient by it as it reads it: no extra pass over the gradients
                    optimizer.grad_scale = self._clip_divisor
                else:
                    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                    torch._foreach_div_(grads, self._clip_divisor)
            return inner_step(*args, **kwargs)

        optimizer.step = guarded_step

    def attach(self, engine_optimizer) -> None:
        """The DeepSpeed optimizer that wraps ours (`engine.optimizer`): its global gradient norm decides."""
        self._norm_source = engine_optimizer

    def take_over_clipping(self, engine_optimizer) -> bool:
        """Clip in the guard instead of in DeepSpeed's ZeRO-1/2 optimizer, with the same rule (divide the gradients
        by max(1, (norm + 1e-6) / max_norm)). DeepSpeed 0.19's version reads the norm on the host once per
        parameter group (two waits for the GPU a step) and then multiplies every fp32 gradient in a pass of its
        own; here the divisor stays on the device and the fused AdamW applies it while it reads the gradients.
        Only where DeepSpeed hands its global norm to this guard (ZeRO-1/2); elsewhere DeepSpeed keeps clipping."""
        if type(engine_optimizer).__name__ != "DeepSpeedZeroOptimizer" or engine_optimizer is not self._norm_source:
            return False
        if not getattr(engine_optimizer, "clip_grad", 0.0) > 0 or not getattr(engine_optimizer, "compute_grad_norm", True):
            return False
        self.clip, engine_optimizer.clip_grad = float(engine_optimizer.clip_grad), 0.0
        return True

    def new_step(self) -> None:
        self.loss_finite.fill_(True)
        self.skipped = False
        self.reached = False
        self._decided = None
        self._clip_divisor = None
        self.stop_agreed = None

    @property
    def update_dropped(self) -> bool:
        """After the step: the update did not happen, by this guard's decision (the same on every rank) or because
        DeepSpeed dropped the step before reaching the optimizer. No host sync: both are host flags."""
        return self.skipped or not self.reached

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.loss_finite &= torch.isfinite(loss.detach())


def initialize_with_guard(model, optimizer: torch.optim.Optimizer, config: dict, device: torch.device,
                          stop_flag: Callable[[], bool] | None = None, **initialize_kwargs):
    """`deepspeed.initialize` with the guard in the order it needs: wrapped around `optimizer` before DeepSpeed wraps
    it, attached to DeepSpeed's optimizer after (without that, only the fallback per-group check runs); ZeRO-1/2's
    gradient norm, which the guard reads, is swapped for the fused one (`pretrain/grad_norm.py`), and their clipping
    moves into the guard (`NonFiniteStepGuard.take_over_clipping`).
    Returns (engine, lr_scheduler, guard)."""
    import deepspeed

    guard = NonFiniteStepGuard(optimizer, device, stop_flag)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                   **initialize_kwargs)
    guard.attach(engine.optimizer)
    use_fused_grad_norm(engine.optimizer)
    guard.take_over_clipping(engine.optimizer)
    return engine, scheduler, guard
