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
            return inner_step(*args, **kwargs)

        optimizer.step = guarded_step

    def attach(self, engine_optimizer) -> None:
        """The DeepSpeed optimizer that wraps ours (`engine.optimizer`): its global gradient norm decides."""
        self._norm_source = engine_optimizer

    def new_step(self) -> None:
        self.loss_finite.fill_(True)
        self.skipped = False
        self.reached = False
        self._decided = None
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
    gradient norm, which the guard reads, is swapped for the fused one (`pretrain/grad_norm.py`).
    Returns (engine, lr_scheduler, guard)."""
    import deepspeed

    guard = NonFiniteStepGuard(optimizer, device, stop_flag)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                   **initialize_kwargs)
    guard.attach(engine.optimizer)
    use_fused_grad_norm(engine.optimizer)
    return engine, scheduler, guard
