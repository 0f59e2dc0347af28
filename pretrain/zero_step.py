"""DeepSpeed ZeRO-1/2's optimizer step with the fp32 masters updated in one fused pass (`pretrain.master_adamw`).

DeepSpeed 0.19's `DeepSpeedZeroOptimizer.step`, per parameter group, casts the flat bf16 gradient partition to a
new fp32 tensor, runs the base optimizer over the fp32 master partition, and copies the master into the bf16
weights: three passes where one does (1.3B on one H100, 2026-12-06: 20.3 ms for the three, 12.2 ms fused,
`python -m bench.master_adamw`). `use_fused_master_step` replaces that method, on one optimizer
instance, by the same sequence with the cast, the update and the copy as one kernel that reads the bf16 gradient and
writes master, moments and bf16 weights. Everything else is DeepSpeed's own code, called in its order: the global
gradient norm (the step guard reads it), freeing gradients, the partition's flat gradient, the all-gather of the
updated partitions, the weights' views.

It applies only where DeepSpeed's step has nothing else to do: bf16 or fp32 weights (no loss scale), its overflow
check off and its clipping taken over by the step guard (the trainer's DeepSpeed config and guard), no offload,
no torch autocast scaler, no ZenFlow, no MoE groups, and the base optimizer a `MasterWeightAdamW`. Anything else
keeps DeepSpeed's step.
"""

from __future__ import annotations

import types

import torch

from pretrain.grad_norm import is_zero_1_2
from pretrain.optim import MasterWeightAdamW

# what the fused step calls or reads on DeepSpeed's optimizer (0.19.8, the pinned version); a version without them
# keeps its own step
_NEEDS = ("bit16_groups", "real_dp_process_group", "single_partition_of_fp32_groups",
          "parallel_partitioned_bit16_groups", "bit16_groups_flat", "averaged_gradients", "all_grad_tensors",
          "params_in_partition", "params_not_in_partition", "partition_size", "scaled_global_norm",
          "free_grad_in_param_list", "flatten_dense_tensors_aligned", "flatten", "_get_preflattened_grad_partition",
          "_release_preflattened_grad_buffers", "_optimizer_step", "_update_model_bit16_weights",
          "nccl_start_alignment_factor", "allgather_bucket_size", "compute_grad_norm", "check_grad_overflow",
          "cpu_offload", "clip_grad", "loss_scale", "dtype", "micro_step_id", "has_moe_layers")


def fused_master_step_applies(zero_optimizer) -> bool:
    """Whether `use_fused_master_step` would replace this optimizer's step (see the module docstring)."""
    if not is_zero_1_2(zero_optimizer) or not all(hasattr(zero_optimizer, a) for a in _NEEDS):
        return False
    z = zero_optimizer
    return (isinstance(z.optimizer, MasterWeightAdamW)
            and z.dtype in (torch.bfloat16, torch.float32)
            and not z.check_grad_overflow and not z.cpu_offload and float(z.clip_grad) == 0.0
            and not isinstance(z.loss_scale, torch.Tensor) and float(z.loss_scale) == 1.0
            and getattr(z, "torch_autocast_gradscaler", None) is None and not getattr(z, "zenflow", False)
            and not z.has_moe_layers
            and all(t.dtype == torch.float32 for t in z.single_partition_of_fp32_groups))


def use_fused_master_step(zero_optimizer) -> bool:
    """Swap DeepSpeed ZeRO-1/2's `step` (on `engine.optimizer`) for the fused master step where it applies; returns
    whether it did. Call after the step guard has taken over clipping (`initialize_with_guard` does)."""
    if not fused_master_step_applies(zero_optimizer):
        return False
    zero_optimizer.step = types.MethodType(_fused_master_step, zero_optimizer)
    return True


def _as_one_view(tensors: list[torch.Tensor], numel: int) -> torch.Tensor | None:
    """`tensors` as one flat view when they lie back to back in one storage, in order, and fill `numel` elements;
    else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage, end, total = first.untyped_storage().data_ptr(), first.data_ptr(), 0
    for t in tensors:
        if (t.dtype != first.dtype or not t.is_contiguous() or t.untyped_storage().data_ptr() != storage
                or t.data_ptr() != end):
            return None
        end += t.numel() * t.element_size()
        total += t.numel()
    if total != numel:
        return None
    return first.as_strided((numel,), (1,), first.storage_offset())


def _flat_grad_partition(self, i: int, partition_id: int) -> torch.Tensor:
    """This rank's flat gradient partition of group i, as DeepSpeed's step forms it (in its gradient dtype: the
    weights' unless a gradient-accumulation dtype is configured; the kernel reads either). DeepSpeed's reduction
    leaves the partition's gradients back to back in one buffer (ZeRO-1/2 with contiguous gradients): then this is
    a view of that buffer, where DeepSpeed's step copies it into a new one (1.7 ms and 2.6 GB at 1.3B)."""
    flat = self._get_preflattened_grad_partition(i)
    if flat is None:
        flat = _as_one_view(self.averaged_gradients[i], int(self.partition_size[i]))
    if flat is None:
        from deepspeed import comm as dist

        if partition_id == dist.get_world_size(group=self.real_dp_process_group[i]) - 1:
            flat = self.flatten_dense_tensors_aligned(self.averaged_gradients[i], int(self.partition_size[i]))
        else:
            flat = self.flatten(self.averaged_gradients[i])
    if flat.numel() != self.partition_size[i]:
        raise RuntimeError(f"ZeRO group {i}: flat gradient partition of {flat.numel()} elements, partition size "
                           f"{self.partition_size[i]}")
    return flat


def _fused_master_step(self, closure=None):
    """DeepSpeed 0.19.8's `DeepSpeedZeroOptimizer.step` for the configuration of `fused_master_step_applies`
    (no overflow check, no loss scale, no clipping, no offload), with the cast, update and copy-back fused."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import all_gather_dp_groups
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    self.micro_step_id = INITIAL_MICRO_STEP_ID
    self.overflow = False
    # the global norm over every group: the step guard reads it (skip and clip decided on the device)
    self._global_grad_norm = self.scaled_global_norm() if self.compute_grad_norm else None
    opt = self.optimizer
    for i in range(len(self.bit16_groups)):
        partition_id = dist.get_rank(group=self.real_dp_process_group[i])
        # ZeRO-2: gradients of parameters this rank does not update
        self.free_grad_in_param_list(self.params_not_in_partition[i])
        flat_grad = _flat_grad_partition(self, i, partition_id)
        self.free_grad_in_param_list(self.params_in_partition[i])
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = None
        self.all_grad_tensors[i] = None
        master = self.single_partition_of_fp32_groups[i]
        opt.lp_io = {master: (flat_grad, self.parallel_partitioned_bit16_groups[i][partition_id])}
        try:
            # DeepSpeed's per-group call of the base optimizer (through the step guard's wrapper)
            self._optimizer_step(i)
        finally:
            opt.lp_io = {}
        del flat_grad
    # every rank's updated partition to every rank; then the weights' views onto the flat buffers
    all_gather_dp_groups(groups_flat=self.bit16_groups_flat, partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                         dp_process_group=self.real_dp_process_group,
                         start_alignment_factor=self.nccl_start_alignment_factor,
                         allgather_bucket_size=self.allgather_bucket_size)
    for i in range(len(self.bit16_groups)):
        self._update_model_bit16_weights(i)


def skip_division_by_one(zero_optimizer) -> bool:
    """Where DeepSpeed ZeRO-1/2 reduces gradients over a world of one (one GPU, or tensor parallelism alone), its
    averaging divides every gradient bucket by world size / sequence-parallel size = 1.0 before the reduction: a
    pass over all gradients that changes no bit (3 kernels, 1.7 ms a step at 1.3B on an H100, 2026-12-06 profile).
    Turns that averaging off there (x / 1.0 == x exactly); returns whether it did. Any larger world keeps it."""
    from deepspeed import comm as dist

    z = zero_optimizer
    if not is_zero_1_2(z) or not all(hasattr(z, a) for a in ("gradient_average", "dp_process_group",
                                                                "sequence_parallel_size")):
        return False
    if not z.gradient_average or z.sequence_parallel_size != 1 or dist.get_world_size(group=z.dp_process_group) != 1:
        return False
    z.gradient_average = False
    return True


# what `copy_gradients_once` calls or reads on DeepSpeed's optimizer (0.19.8); a version without them keeps its path
_ONCE_NEEDS = ("reduce_independent_p_g_buckets_and_remove_grads", "copy_grads_in_partition", "get_param_id",
               "reduce_bucket_size", "ipg_buckets",
               "params_already_reduced", "is_param_in_current_partition", "dp_process_group", "partition_gradients",
               "contiguous_gradients", "overlap_comm", "cpu_offload", "has_moe_layers", "sequence_parallel_size",
               "_use_compact_grad_partition_buffer", "bit16_groups")


def copy_gradients_once(zero_optimizer) -> bool:
    """Over a data-parallel world of one, DeepSpeed ZeRO-1 still copies every gradient twice after the backward:
    into its reduction bucket, whose all-reduce then runs over that one rank, and from there into the partition's
    gradient buffer that the step reads (531 copies and 4.3 ms a step at 1.3B on an H100, 2026-12-06 profile;
    `bench/results/20261206_h100_train_throughput_1.3b_inplace_profile.json`). Where nothing else can happen to a
    gradient on its way, each goes straight into the partition buffer with DeepSpeed's own copy: the same values
    (an all-reduce over one rank and a copy leave a bf16 gradient as it is) in the same buffer at the same offset,
    one copy instead of two. The reduction bucket then never holds a gradient, so it shrinks to one element:
    DeepSpeed allocates it at the first gradient of every backward, 5e8 elements by default (1 GB in bf16 at the
    peak of the step's memory). Applies to ZeRO-1 only (ZeRO-2 reduces from hooks during the backward, and
    accumulates differently), with contiguous gradients, no offload, no communication overlap, no MoE or sequence-
    parallel averaging, no fp32 gradient-accumulation buffer; returns whether it did."""
    from deepspeed import comm as dist

    z = zero_optimizer
    if not is_zero_1_2(z) or not all(hasattr(z, a) for a in _ONCE_NEEDS):
        return False
    if (z.partition_gradients or not z.contiguous_gradients or z.overlap_comm or z.cpu_offload or z.has_moe_layers
            or getattr(z, "zenflow", False) or getattr(z, "autoep_folding_tp_group", None) is not None
            or z.sequence_parallel_size != 1 or dist.get_world_size(group=z.dp_process_group) != 1
            or any(z._use_compact_grad_partition_buffer(i) for i in range(len(z.bit16_groups)))):
        return False
    z.reduce_independent_p_g_buckets_and_remove_grads = types.MethodType(_copy_into_partition, z)
    # the bucket is still made (and reduced, empty) after each backward; at one element it costs nothing
    z.reduce_bucket_size = 1
    return True


def _copy_into_partition(self, param, i):
    """DeepSpeed's per-parameter reduction step over a world of one: mark the parameter reduced (as its bucket
    reduction would) and copy its gradient into the partition buffer (as that reduction then does)."""
    if param.numel() == 0 or not getattr(param, "ds_grad_is_ready", True):
        return
    param_id = self.get_param_id(param)
    if self.params_already_reduced[param_id]:
        raise RuntimeError(f"ZeRO: the gradient of parameter {param_id} was reduced twice in one step")
    self.params_already_reduced[param_id] = True
    if self.is_param_in_current_partition[param_id]:
        self.copy_grads_in_partition(param, i)
