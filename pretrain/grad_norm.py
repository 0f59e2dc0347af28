"""DeepSpeed ZeRO-1/2's global gradient norm in a few fused kernels instead of three small ops per tensor.

DeepSpeed 0.19's `DeepSpeedZeroOptimizer.get_grad_norm_direct` takes the norm of each gradient tensor on its own,
after copying it to fp64: at 360M (265 tensors) that is ~800 kernel launches and a full fp64 copy of the gradients
every step, after the backward, with nothing to overlap (H100 profile, 2026-12-06:
`bench/results/20261206_h100_train_throughput_s13_360m_2k_profile.json`). `use_fused_grad_norm` replaces it, on one
optimizer instance, by the same quantity from `torch._foreach_norm` (multi-tensor kernels that read each fp32
gradient once and accumulate in fp64): the same tensors are counted (model-parallel shards on every rank, replicated
parameters only on model-parallel rank 0, no ZeRO padding), the sum of squares is all-reduced over the same groups,
and a non-finite norm comes back as -1 as before, which is what the step guard and DeepSpeed's clipping read.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist


def _counted(p: torch.Tensor, model_parallel_rank: int) -> bool:
    """Whether this rank adds the gradient of `p` to the norm: a tensor-parallel shard always; a parameter
    replicated over model-parallel ranks only on rank 0 of them; pipeline-replicated copies never."""
    if getattr(p, "ds_pipe_replicated", False):
        return False
    sharded = bool(getattr(p, "model_parallel", False) or getattr(p, "tensor_model_parallel", False))
    return sharded or model_parallel_rank == 0


def _fused_grad_norm_direct(self, gradients, params, norm_type=2):
    if float(norm_type) != 2.0:
        return self._per_tensor_grad_norm_direct(gradients, params, norm_type)
    from deepspeed.runtime.zero.utils import get_norm_dtype

    unpadded = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    grads = [g.detach() for g, p in zip(unpadded, params) if _counted(p, self.model_parallel_rank)]
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=get_norm_dtype())
        sum_sq = torch.stack(norms).square().sum().float()
    else:
        sum_sq = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(sum_sq, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=sum_sq, op=dist.ReduceOp.SUM)
    total = sum_sq.sqrt()
    # -1 where the norm is inf or NaN, as DeepSpeed's `mask_nan_or_inf_with_val_inplace`, but on the device: that
    # helper makes its -1 on the host and fills with a tensor value, two waits for the GPU per parameter group
    return torch.where(torch.isfinite(total), total, -1.0)


_NEEDS = ("get_grad_norm_direct", "model_parallel_rank", "dp_process_group", "_model_parallel_all_reduce", "device")


def is_zero_1_2(engine_optimizer) -> bool:
    """Whether DeepSpeed's optimizer is its ZeRO-1/2 one (not ZeRO-3's, nor its bf16 / fp16 wrappers)."""
    return type(engine_optimizer).__name__ == "DeepSpeedZeroOptimizer"


def use_fused_grad_norm(zero_optimizer) -> bool:
    """Swap the per-tensor gradient norm of a DeepSpeed ZeRO-1/2 optimizer (`engine.optimizer`) for the fused one.
    Returns False, changing nothing, for any other optimizer (ZeRO-0/3, DeepSpeed's bf16 or fp16 wrappers)."""
    if not is_zero_1_2(zero_optimizer):
        return False
    # what the fused method reads (DeepSpeed 0.19.8, the pinned version); another version without them keeps its own
    if not all(hasattr(zero_optimizer, a) for a in _NEEDS):
        return False
    zero_optimizer._per_tensor_grad_norm_direct = zero_optimizer.get_grad_norm_direct
    zero_optimizer.get_grad_norm_direct = types.MethodType(_fused_grad_norm_direct, zero_optimizer)
    return True
