"""The incoming-state share (sequence parallelism's output correction): the naive twin against the definition,
the Triton kernels (interpreter on CPU) against the twin, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metala.ops.incoming_state import incoming_state_output, piece_log_decays
from metala.ops.metala.api import triton_usable
from tests.utils import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_usable(torch.device(DEVICE)),
                                  reason="needs a CUDA GPU or the Triton CPU interpreter")


def make(B, L, H, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, K, generator=g).to(DEVICE).requires_grad_()
    z = (torch.randn(B, L, H, K, generator=g) * 3 + 2).to(DEVICE).requires_grad_()
    o = torch.randn(B, L, H, V, generator=g).to(DEVICE).requires_grad_()
    S = torch.randn(B, H, K, V, generator=g).to(DEVICE).requires_grad_()
    return q, z, o, S


def run(q, z, o, S, first_len, last_start, backend):
    G_off, G_last = piece_log_decays(z, first_len, last_start, 16.0, backend=backend)
    out = incoming_state_output(o, q, z, S, G_off, first_len, 16.0, backend=backend)
    return out, G_last


def grads(out, G_last, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g).to(DEVICE)
    w_last = torch.randn(G_last.shape, generator=g).to(DEVICE)
    return torch.autograd.grad((out * w_out).sum() + (G_last * w_last).sum(), inputs)


def test_naive_matches_the_definition():
    B, L, H, K, V = 2, 150, 2, 8, 16
    q, z, o, S = make(B, L, H, K, V)
    first_len = torch.tensor([150, 70], device=DEVICE)
    last_start = torch.tensor([0, 100], device=DEVICE)
    out, G_last = run(q, z, o, S, first_len, last_start, "naive")
    g = (F.logsigmoid(z) / 16).clamp_min(-10)
    G = g.cumsum(1)
    for b in range(B):
        n = int(first_len[b])
        corr = torch.einsum("lhk,hkv->lhv", q[b, :n] * G[b, :n].exp(), S[b]) * K ** -0.5
        assert_close(f"out{b}", torch.cat([o[b, :n] + corr, o[b, n:]]), out[b], 1e-6)
        assert_close(f"G_last{b}", g[b, int(last_start[b]):].sum(0), G_last[b], 1e-6)


@needs_triton
@pytest.mark.parametrize("B,L,H,K,V,first,last", [
    pytest.param(1, 64, 1, 16, 32, [64], [0], id="one-tile-one-piece"),
    pytest.param(2, 200, 2, 16, 32, [200, 37], [0, 150], id="partial-tiles"),
    pytest.param(3, 130, 1, 64, 128, [0, 129, 65], [5, 0, 128], id="K64-V128-no-first-piece"),
    pytest.param(1, 70, 2, 32, 256, [70], [3], id="V256-two-value-tiles"),
])
def test_triton_matches_naive(B, L, H, K, V, first, last):
    q, z, o, S = make(B, L, H, K, V)
    first_len = torch.tensor(first, device=DEVICE, dtype=torch.int32)
    last_start = torch.tensor(last, device=DEVICE, dtype=torch.int32)
    ref = run(q, z, o, S, first_len, last_start, "naive")
    tri = run(q, z, o, S, first_len, last_start, "triton")
    for name, a, b in zip(("out", "G_last"), ref, tri):
        assert_close(name, a, b, 1e-5)
    for name, a, b in zip(("dq", "dz", "do", "dS"), grads(*ref, [q, z, o, S]), grads(*tri, [q, z, o, S])):
        assert_close(name, a, b, 1e-5)


@needs_triton
def test_triton_floor_and_extreme_gates():
    # logits far below zero floor the log-decay at -10 (no gradient there); the result must stay finite
    q, z, o, S = make(1, 96, 1, 16, 16)
    with torch.no_grad():
        z[0, :40] = -400.0
        z[0, 40:] = 40.0
    first_len = torch.tensor([96], device=DEVICE, dtype=torch.int32)
    last_start = torch.tensor([10], device=DEVICE, dtype=torch.int32)
    ref = run(q, z, o, S, first_len, last_start, "naive")
    tri = run(q, z, o, S, first_len, last_start, "triton")
    assert_close("out", ref[0], tri[0], 1e-5)
    for name, a, b in zip(("dq", "dz", "dS"), grads(*ref, [q, z, S]), grads(*tri, [q, z, S])):
        assert_close(name, a, b, 1e-5)


def test_bad_shapes_are_errors():
    q, z, o, S = make(1, 10, 1, 8, 8)
    with pytest.raises(ValueError, match="first_len must be"):
        piece_log_decays(z, torch.tensor([1, 2]), torch.tensor([0, 0]), 16.0)
    G_off, _ = piece_log_decays(z, torch.tensor([5]), torch.tensor([0]), 16.0)
    with pytest.raises(ValueError, match="shapes do not match"):
        incoming_state_output(o, q, z, S[:, :, :4], G_off, torch.tensor([5]), 16.0)
    with pytest.raises(ValueError, match="backend must be"):
        incoming_state_output(o, q, z, S, G_off, torch.tensor([5]), 16.0, backend="cuda")
