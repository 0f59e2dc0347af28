"""Cross-entropy over precomputed logits with the gradient written in place (the fused LM loss's inner step)."""

from metala.ops.cross_entropy.api import ce_loss_and_grad
from metala.ops.cross_entropy.naive import naive_ce_loss_and_grad

__all__ = ["ce_loss_and_grad", "naive_ce_loss_and_grad"]
