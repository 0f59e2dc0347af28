"""The naive twin of the in-place cross-entropy kernel: the same outputs through fp32 PyTorch ops."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def naive_ce_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, need_grad: bool = True):
    """logits [n, V], labels [n] (-100 ignored) -> (per-row loss fp32 [n], d logits [n, V] in logits' dtype or None).

    d logits is softmax(logits) - one_hot(label) on scored rows and 0 on ignored ones (the gradient of the loss sum).
    """
    x = logits.float()
    valid = labels != IGNORE_INDEX
    safe = labels.masked_fill(~valid, 0)
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, safe[:, None]).squeeze(1)) * valid
    if not need_grad:
        return loss, None
    grad = x.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(labels), device=labels.device), safe] -= 1.0
    grad.mul_(valid[:, None])
    return loss, grad.to(logits.dtype)
