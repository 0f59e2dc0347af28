"""The fused LM loss (chunked, gradient formed in the forward) and its in-place Triton kernel against the naive
twins: per-row loss and gradient, ignored labels, -inf logits, and the full loss's forward and backward."""

from __future__ import annotations

import pytest
import torch

from metala.modules.loss import IGNORE_INDEX, fused_lm_cross_entropy, lm_cross_entropy, plain_lm_cross_entropy
from metala.ops.cross_entropy import ce_loss_and_grad, naive_ce_loss_and_grad
from metala.ops.metala.api import triton_usable
from tests.utils import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_usable(torch.device(DEVICE)),
                                  reason="needs a CUDA GPU or the Triton CPU interpreter")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [37, 300, 5000])
def test_kernel_matches_naive_twin(dtype, V):
    g = torch.Generator().manual_seed(V)
    x = (torch.randn(9, V, generator=g) * 4).to(dtype).to(DEVICE)
    y = torch.randint(0, V, (9,), generator=g).to(DEVICE)
    y[2] = IGNORE_INDEX
    x[4, : V // 3] = float("-inf")  # masked-out vocabulary entries
    y[4] = V - 1
    loss0, grad0 = naive_ce_loss_and_grad(x.clone(), y)
    buf = x.clone()
    loss1, grad1 = ce_loss_and_grad(buf, y, backend="triton")
    assert grad1.data_ptr() == buf.data_ptr(), "the gradient must overwrite the logits"
    assert_close("loss", loss0, loss1, 1e-6)
    assert float(loss1[2]) == 0.0 and torch.all(grad1[2] == 0)
    # bf16: one rounding step of the stored gradient
    assert float((grad0.float() - grad1.float()).abs().max()) <= (1e-6 if dtype == torch.float32 else 4e-3)
    loss_only, none = ce_loss_and_grad(x.clone(), y, need_grad=False, backend="triton")
    assert none is None
    assert_close("loss only", loss0, loss_only, 1e-6)


def test_naive_twin_is_the_cross_entropy_gradient():
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, IGNORE_INDEX, 10, 5, 5])
    ref = torch.nn.functional.cross_entropy(x, y, ignore_index=IGNORE_INDEX, reduction="sum")
    (dx,) = torch.autograd.grad(ref, x)
    loss, grad = naive_ce_loss_and_grad(x.detach().clone(), y)
    assert_close("loss", ref, loss.sum(), 1e-6)
    assert_close("grad", dx, grad, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied_weight_grad", [True, False])
def test_fused_loss_forward_and_backward_match_plain(dtype, tied_weight_grad):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(70, 24, generator=g).to(dtype).requires_grad_()
    w = torch.randn(45, 24, generator=g).requires_grad_(tied_weight_grad)
    y = torch.randint(0, 45, (70,), generator=g)
    y[::9] = IGNORE_INDEX
    a, n_a = plain_lm_cross_entropy(h, w, y)
    grads_a = torch.autograd.grad(a / n_a, [h, w] if tied_weight_grad else [h])
    b, n_b = fused_lm_cross_entropy(h, w, y, chunk_size=16)
    grads_b = torch.autograd.grad(b / n_b, [h, w] if tied_weight_grad else [h])
    assert int(n_a) == int(n_b) == int((y != IGNORE_INDEX).sum())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close("loss", a, b, tol)
    for name, ga, gb in zip(("d hidden", "d weight"), grads_a, grads_b):
        assert gb.dtype == ga.dtype
        assert_close(name, ga.float(), gb.float(), tol)


def test_fused_loss_without_grad_is_loss_only():
    h, w = torch.randn(50, 8), torch.randn(20, 8)
    y = torch.randint(0, 20, (50,))
    with torch.no_grad():
        a, _ = plain_lm_cross_entropy(h, w, y)
        b, _ = lm_cross_entropy(h, w, y, chunk_size=16)
    assert not b.requires_grad
    assert_close("loss", a, b, 1e-6)
