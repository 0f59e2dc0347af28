"""Next-token cross-entropy over the LM head, optionally in position chunks so full fp32 logits never exist."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight.to(hidden.dtype))
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def lm_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token losses and the number of scored tokens; hidden [N, D], weight [V, D], labels [N].

    With chunk_size > 0 each chunk's logits are recomputed in the backward instead of stored, so peak memory holds
    one chunk of logits rather than all of them.
    """
    count = (labels != IGNORE_INDEX).sum()
    if chunk_size <= 0 or hidden.shape[0] <= chunk_size:
        return _chunk_loss_sum(hidden, weight, labels), count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss_sum, hidden[sl], weight, labels[sl], use_reentrant=False)
    return total, count
