"""`use_fused_grad_norm` swaps only a DeepSpeed ZeRO-1/2 optimizer that has what the fused norm reads (the swap's
numbers are checked against DeepSpeed's own in test_step_guard.py and test_tp_sp_training.py)."""

from __future__ import annotations

import torch

from pretrain.grad_norm import _counted, use_fused_grad_norm


def test_other_optimizers_are_left_alone():
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    assert use_fused_grad_norm(adam) is False and not hasattr(adam, "_per_tensor_grad_norm_direct")

    class DeepSpeedZeroOptimizer:  # same name, but not the attributes of the pinned version
        def get_grad_norm_direct(self, gradients, params, norm_type=2):
            return 1.0

    other = DeepSpeedZeroOptimizer()
    assert use_fused_grad_norm(other) is False and other.get_grad_norm_direct([], []) == 1.0


def test_which_gradients_a_rank_counts():
    shard, replicated, pipe_copy = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    shard.tensor_model_parallel = True
    pipe_copy.ds_pipe_replicated = True
    assert _counted(shard, 0) and _counted(shard, 1)
    assert _counted(replicated, 0) and not _counted(replicated, 1)
    assert not _counted(pipe_copy, 0)
