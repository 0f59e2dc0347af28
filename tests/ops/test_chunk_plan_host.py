"""Plans for packed batches from boundaries the caller holds on the host (`remember_host_boundaries`): the trainer
hands them over so that the operator reads nothing back from the GPU in the forward pass."""

from __future__ import annotations

import torch

from metala.ops.utils.chunk_plan import plan_for, remember_host_boundaries


def lengths(plan) -> list[int]:
    return plan.chunk_len.tolist()


def test_remembered_boundaries_are_used_instead_of_reading_the_tensor():
    cpu = torch.device("cpu")
    cu = torch.tensor([0, 10, 20], dtype=torch.int32)
    assert lengths(plan_for(1, 20, cu, 8, 8, cpu)) == [8, 2, 8, 2]
    # a new tensor object, remembered with other values: the plan follows what was remembered (which proves the
    # tensor itself was not read; the trainer always remembers the host copy it moved)
    cu2 = torch.tensor([0, 10, 20], dtype=torch.int32)
    remember_host_boundaries(cu2, torch.tensor([0, 5, 20]))
    assert lengths(plan_for(1, 20, cu2, 8, 8, cpu)) == [5, 8, 7]
    # modified in place: the remembered values are stale and the tensor is read again
    cu3 = torch.tensor([0, 10, 20], dtype=torch.int32)
    remember_host_boundaries(cu3, [0, 5, 20])
    cu3[1] = 12
    assert lengths(plan_for(1, 20, cu3, 8, 8, cpu)) == [8, 4, 8]
