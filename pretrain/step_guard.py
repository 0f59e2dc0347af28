"""Skip an optimizer update whose loss or gradients are non-finite on any rank (parameters and Adam state untouched)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from pretrain.distributed import comm_device
from pretrain.grad_norm import is_zero_1_2, use_fused_grad_norm
from pretrain.zero_step import copy_gradients_once, skip_division_by_one, use_fused_master_step


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

    With DeepSpeed's norm on the device and a fused AdamW (the trainer's optimizer) nothing in the step waits for the
    device: the flags go to the AdamW as its `found_inf` (its kernel then leaves parameters, moments and step
    counters alone), and the host reads them only when asked (`update_dropped`, `stop_agreed`), by which time the
    optimizer's kernels are queued behind them. Otherwise the guard reads its decision before stepping.

    With `take_over_clipping(engine.optimizer)` (ZeRO-1/2) the guard also clips the gradients by that norm, on the
    device, instead of DeepSpeed.

    Per step: `new_step()`, then `observe_loss(loss)` for each micro-batch; then `update_dropped`."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device,
                 stop_flag: Callable[[], bool] | None = None) -> None:
        self.loss_finite = torch.ones((), dtype=torch.bool, device=device)
        # whether the wrapped step was called this step (DeepSpeed drops a step on its own overflow checks: fp16
        # loss scaling, ZeRO-3's invalid norm) and never calls it then
        self.reached = False
        self._norm_source = None
        # this step's [bad, stop] flags, all-reduced (on the device until read), and their host values once read
        self._flags: torch.Tensor | None = None
        self._bad: bool | None = None
        self._stop: bool | None = None
        self._found_inf: torch.Tensor | None = None
        # gradient clipping taken over from DeepSpeed (`take_over_clipping`): the max norm, and this step's divisor
        self.clip = 0.0
        self._clip_divisor: torch.Tensor | None = None
        inner_step = optimizer.step

        def guarded_step(*args, **kwargs):
            self.reached = True
            # set below for this call only: nothing of an earlier step may linger on the optimizer
            optimizer.found_inf = optimizer.grad_scale = None
            norm = getattr(self._norm_source, "_global_grad_norm", None)
            fused = all(group.get("fused") for group in optimizer.param_groups)
            # DeepSpeed's global norm on the device and a fused AdamW: the skip happens on the device (its
            # `found_inf`), and the host reads the flags only when the trainer asks, after the step is enqueued
            on_device = isinstance(norm, torch.Tensor) and fused
            if self._flags is None or norm is None:
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
                # the stop flag filled in on the device: a host tensor copied there would wait for the GPU
                flags = torch.stack([~ok, torch.full_like(ok, stop)]).to(torch.int32).to(comm_device())
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                self._flags, self._bad = flags, None
                if not on_device:
                    self._read_flags()
            if on_device:
                if self._found_inf is None:
                    device = optimizer.param_groups[0]["params"][0].device
                    self._found_inf = self._flags[0].to(device=device, dtype=torch.float32)
                # the fused AdamW leaves parameters, moments and step counters alone where this is 1
                optimizer.found_inf = self._found_inf
            elif self._bad:
                return None
            if self.clip > 0 and isinstance(norm, torch.Tensor):
                if self._clip_divisor is None:
                    # DeepSpeed's own rule, on the device (its version reads the norm on the host once per group)
                    self._clip_divisor = torch.clamp((norm.float() + 1e-6) / self.clip, min=1.0)
                if fused:
                    # the fused AdamW divides each gradient by it as it reads it: no extra pass over the gradients
                    optimizer.grad_scale = self._clip_divisor
                else:
                    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                    torch._foreach_div_(grads, self._clip_divisor)
            return inner_step(*args, **kwargs)

        optimizer.step = guarded_step

    def _read_flags(self) -> None:
        """The host values of this step's flags, once (a wait for the device where they are still on it)."""
        if self._bad is None:
            bad, stop = self._flags.tolist()
            self._bad, self._stop = bool(bad), bool(stop)

    def attach(self, engine_optimizer) -> None:
        """The DeepSpeed optimizer that wraps ours (`engine.optimizer`): its global gradient norm decides."""
        self._norm_source = engine_optimizer

    def take_over_clipping(self, engine_optimizer) -> bool:
        """Clip in the guard instead of in DeepSpeed's ZeRO-1/2 optimizer, with the same rule (divide the gradients
        by max(1, (norm + 1e-6) / max_norm)). DeepSpeed 0.19's version reads the norm on the host once per
        parameter group (two waits for the GPU a step) and then multiplies every fp32 gradient in a pass of its
        own; here the divisor stays on the device and the fused AdamW applies it while it reads the gradients.
        Only where DeepSpeed hands its global norm to this guard (ZeRO-1/2); elsewhere DeepSpeed keeps clipping."""
        if not is_zero_1_2(engine_optimizer) or engine_optimizer is not self._norm_source:
            return False
        if not getattr(engine_optimizer, "clip_grad", 0.0) > 0 or not getattr(engine_optimizer, "compute_grad_norm", True):
            return False
        self.clip, engine_optimizer.clip_grad = float(engine_optimizer.clip_grad), 0.0
        return True

    def new_step(self) -> None:
        self.loss_finite.fill_(True)
        self.reached = False
        self._flags = self._bad = self._stop = None
        self._found_inf = None
        self._clip_divisor = None

    @property
    def update_dropped(self) -> bool:
        """After the step: the update did not happen, by this guard's decision (the same on every rank) or because
        DeepSpeed dropped the step before reaching the optimizer. Where the skip happened on the device this reads
        the flags: the optimizer's kernels are already enqueued behind them, so the device keeps working meanwhile."""
        if not self.reached:
            return True
        self._read_flags()
        return self._bad

    @property
    def stop_agreed(self) -> bool | None:
        """Whether any rank asked to stop, agreed in this step's all-reduce (None where the step never got there)."""
        if self._flags is None:
            return None
        self._read_flags()
        return self._stop

    def observe_loss(self, loss: torch.Tensor) -> None:
        self.loss_finite &= torch.isfinite(loss.detach())


def initialize_with_guard(model, optimizer: torch.optim.Optimizer, config: dict, device: torch.device,
                          stop_flag: Callable[[], bool] | None = None, fused_master_step: bool = True,
                          **initialize_kwargs):
    """`deepspeed.initialize` with the guard in the order it needs: wrapped around `optimizer` before DeepSpeed wraps
    it, attached to DeepSpeed's optimizer after (without that, only the fallback per-group check runs); ZeRO-1/2's
    gradient norm, which the guard reads, is swapped for the fused one (`pretrain/grad_norm.py`), and their clipping
    moves into the guard (`NonFiniteStepGuard.take_over_clipping`). With `fused_master_step`, ZeRO-1/2's update of
    the fp32 masters then becomes one fused pass where it applies (`pretrain/zero_step.py`); over a reduction world
    of one, its division of every gradient by 1.0 is skipped (`skip_division_by_one`), and over a data-parallel world
    of one ZeRO-1 copies each gradient once instead of twice (`copy_gradients_once`).
    Returns (engine, lr_scheduler, guard)."""
    import deepspeed

    guard = NonFiniteStepGuard(optimizer, device, stop_flag)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                   **initialize_kwargs)
    guard.attach(engine.optimizer)
    use_fused_grad_norm(engine.optimizer)
    guard.take_over_clipping(engine.optimizer)
    if fused_master_step:
        use_fused_master_step(engine.optimizer)
    skip_division_by_one(engine.optimizer)
    copy_gradients_once(engine.optimizer)
    return engine, scheduler, guard
