"""metala_attn backends against the fp32 token-by-token reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metala.ops import metala_attn, naive_recurrent_metala
from metala.ops.metala import fused_recurrent_metala, naive_chunk_metala, naive_parallel_metala
from tests.utils import assert_close

FP32_RATIO = 1e-5


def make_inputs(B, T, H, K, V, logit_scale=3.0, dtype=torch.float32, with_h0=True, n_states=None):
    q = torch.randn(B, T, H, K, dtype=dtype)
    z = torch.randn(B, T, H, K) * logit_scale
    g = F.logsigmoid(z) / 16
    v = torch.randn(B, T, H, V, dtype=dtype)
    h0 = torch.randn(n_states or B, H, K, V) if with_h0 else None
    return [t.requires_grad_() if t is not None else None for t in (q, g, v, h0)]


def run(fn, q, g, v, h0, do, dht, **kw):
    o, ht = fn(q, g, v, initial_state=h0, output_final_state=True, **kw)
    loss = (o * do).sum() + (ht * dht).sum()
    leaves = [t for t in (q, g, v, h0) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return o, ht, grads


def compare(ref, tst, ratio, names=("dq", "dg", "dv", "dh0")):
    o_r, ht_r, g_r = ref
    o_t, ht_t, g_t = tst
    assert_close("o", o_r, o_t, ratio)
    assert_close("ht", ht_r, ht_t, ratio)
    for name, a, b in zip(names, g_r, g_t):
        assert_close(name, a, b, ratio)


SHAPES = [
    pytest.param(1, 1, 1, 16, 32, id="B1-T1-H1-K16-V32"),
    pytest.param(2, 2, 3, 16, 16, id="B2-T2-H3-K16-V16"),
    pytest.param(2, 63, 3, 16, 32, id="B2-T63-H3-K16-V32"),
    pytest.param(1, 64, 1, 32, 16, id="B1-T64-H1-K32-V16"),
    pytest.param(2, 65, 2, 16, 64, id="B2-T65-H2-K16-V64"),
    pytest.param(1, 200, 3, 32, 64, id="B1-T200-H3-K32-V64"),
]


@pytest.mark.parametrize("B,T,H,K,V", SHAPES)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_matches_naive(B, T, H, K, V, chunk_size):
    q, g, v, h0 = make_inputs(B, T, H, K, V)
    do = torch.randn(B, T, H, V)
    dht = torch.randn(B, H, K, V)
    ref = run(naive_recurrent_metala, q, g, v, h0, do, dht)
    tst = run(naive_chunk_metala, q, g, v, h0, do, dht, chunk_size=chunk_size)
    compare(ref, tst, FP32_RATIO)


@pytest.mark.parametrize("T", [1, 17, 80])
def test_parallel_form_matches_naive(T):
    q, g, v, _ = make_inputs(2, T, 2, 16, 32, with_h0=False)
    o_r, _ = naive_recurrent_metala(q, g, v)
    assert_close("o", o_r, naive_parallel_metala(q, g, v), FP32_RATIO)


@pytest.mark.parametrize("logit", [-30.0, 30.0])
def test_chunk_extreme_gates(logit):
    # z = -30 gives g ~ -1.9 per token (exp underflows across a chunk); z = +30 gives k ~ 6e-15
    B, T, H, K, V = 1, 100, 2, 16, 32
    q, _, v, h0 = make_inputs(B, T, H, K, V)
    z = torch.full((B, T, H, K), logit) + torch.randn(B, T, H, K)
    g = (F.logsigmoid(z) / 16).requires_grad_()
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    ref = run(naive_recurrent_metala, q, g, v, h0, do, dht)
    tst = run(naive_chunk_metala, q, g, v, h0, do, dht)
    compare(ref, tst, FP32_RATIO)


@pytest.mark.parametrize(
    "lengths",
    [pytest.param([1, 63, 1, 2, 70], id="with-1-token-docs"), pytest.param([200], id="one-doc"),
     pytest.param([16, 16, 16], id="chunk-aligned")],
)
def test_chunk_varlen_matches_naive(lengths):
    H, K, V = 2, 16, 32
    T = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, g, v, h0 = make_inputs(1, T, H, K, V, n_states=len(lengths))
    do, dht = torch.randn(1, T, H, V), torch.randn(len(lengths), H, K, V)
    ref = run(naive_recurrent_metala, q, g, v, h0, do, dht, cu_seqlens=cu)
    tst = run(metala_attn, q, g, v, h0, do, dht, cu_seqlens=cu, backend="chunk")
    compare(ref, tst, FP32_RATIO)


def test_varlen_equals_separate_documents():
    # each packed document must behave as if it ran alone from its own initial state
    H, K, V = 2, 16, 32
    lengths = [5, 1, 40]
    cu = torch.tensor([0] + lengths).cumsum(0)
    q, g, v, h0 = make_inputs(1, sum(lengths), H, K, V, n_states=3)
    o, ht = metala_attn(q, g, v, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend="chunk")
    for n in range(3):
        s, e = int(cu[n]), int(cu[n + 1])
        o_n, ht_n = metala_attn(
            q[:, s:e], g[:, s:e], v[:, s:e], initial_state=h0[n : n + 1], output_final_state=True, backend="chunk"
        )
        assert_close(f"o[{n}]", o_n, o[:, s:e], FP32_RATIO)
        assert_close(f"ht[{n}]", ht_n[0], ht[n], FP32_RATIO)


def test_explicit_key_matches_naive():
    B, T, H, K, V = 2, 37, 2, 16, 32
    q, g, v, h0 = make_inputs(B, T, H, K, V)
    k = torch.randn(B, T, H, K).requires_grad_()
    o_r, ht_r = naive_recurrent_metala(q, g, v, k=k, initial_state=h0, output_final_state=True)
    o_t, ht_t = metala_attn(q, g, v, k=k, initial_state=h0, output_final_state=True, backend="chunk")
    do, dht = torch.randn_like(o_r), torch.randn_like(ht_r)
    gr = torch.autograd.grad((o_r * do).sum() + (ht_r * dht).sum(), [q, g, v, k])
    gt = torch.autograd.grad((o_t * do).sum() + (ht_t * dht).sum(), [q, g, v, k])
    assert_close("o", o_r, o_t, FP32_RATIO)
    for name, a, b in zip(("dq", "dg", "dv", "dk"), gr, gt):
        assert_close(name, a, b, FP32_RATIO)


def test_derived_key_changes_dg():
    # with k = 1 - exp(g) the decay gradient carries the tied-key term -alpha * dk (metala.md section 2)
    B, T, H, K, V = 1, 20, 1, 16, 16
    q, g, v, _ = make_inputs(B, T, H, K, V, with_h0=False)
    k_detached = (-torch.expm1(g)).detach()
    o_tied, _ = naive_chunk_metala(q, g, v)
    o_free, _ = naive_chunk_metala(q, g, v, k=k_detached)
    assert_close("o", o_tied, o_free, FP32_RATIO)
    dg_tied = torch.autograd.grad(o_tied.sum(), g)[0]
    dg_free = torch.autograd.grad(o_free.sum(), g)[0]
    assert (dg_tied - dg_free).abs().max() > 1e-3


def test_segment_chaining_equals_one_pass():
    # run [0, 50) then [50, 120) with the carried state: identical to one pass, gradients included
    B, T, H, K, V = 2, 120, 2, 16, 32
    q, g, v, h0 = make_inputs(B, T, H, K, V)
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    ref = run(naive_recurrent_metala, q, g, v, h0, do, dht)

    def chained(q, g, v, initial_state, output_final_state):
        o1, s1 = metala_attn(q[:, :50], g[:, :50], v[:, :50], initial_state=initial_state, output_final_state=True)
        o2, s2 = metala_attn(q[:, 50:], g[:, 50:], v[:, 50:], initial_state=s1, output_final_state=True)
        return torch.cat([o1, o2], 1), s2

    tst = run(chained, q, g, v, h0, do, dht)
    compare(ref, tst, FP32_RATIO)


@pytest.mark.parametrize("T", [1, 3])
def test_recurrent_step_matches_naive(T):
    B, H, K, V = 3, 2, 16, 32
    q, g, v, h0 = make_inputs(B, T, H, K, V)
    o_r, ht_r = naive_recurrent_metala(q, g, v, initial_state=h0, output_final_state=True)
    o_t, ht_t = fused_recurrent_metala(q, g, v, initial_state=h0, output_final_state=True)
    assert_close("o", o_r, o_t, FP32_RATIO)
    assert_close("ht", ht_r, ht_t, FP32_RATIO)


def test_bf16_inputs_close_to_fp32_reference():
    B, T, H, K, V = 2, 100, 2, 32, 64
    q, g, v, h0 = make_inputs(B, T, H, K, V)
    o_ref, _ = naive_recurrent_metala(q, g, v, initial_state=h0)
    o_bf, _ = metala_attn(q.bfloat16(), g, v.bfloat16(), initial_state=h0, backend="chunk")
    assert o_bf.dtype == torch.bfloat16
    assert_close("o", o_ref, o_bf, 1e-2)


def test_final_state_optional():
    q, g, v, _ = make_inputs(1, 10, 1, 16, 16, with_h0=False)
    o, ht = metala_attn(q, g, v)
    assert ht is None and o.shape == (1, 10, 1, 16)


class TestBadInput:
    def setup_method(self):
        self.q, self.g, self.v, self.h0 = (
            t.detach() if t is not None else None for t in make_inputs(2, 10, 2, 16, 32)
        )

    def test_g_must_be_fp32(self):
        with pytest.raises(ValueError, match="g .*float32"):
            metala_attn(self.q, self.g.bfloat16(), self.v)

    def test_positive_log_decay(self):
        g = self.g.clone()
        g[0, 3, 1, 2] = 0.5
        with pytest.raises(ValueError, match="<= 0"):
            metala_attn(self.q, g, self.v)

    def test_nan_log_decay(self):
        g = self.g.clone()
        g[1, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="<= 0"):
            metala_attn(self.q, g, self.v)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="g must have the shape of q"):
            metala_attn(self.q, self.g[:, :5], self.v)
        with pytest.raises(ValueError, match="v must be"):
            metala_attn(self.q, self.g, self.v[:, :5])
        with pytest.raises(ValueError, match="4-D"):
            metala_attn(self.q[0], self.g[0], self.v[0])

    def test_dtype_mismatch(self):
        with pytest.raises(ValueError, match="v must have the dtype of q"):
            metala_attn(self.q, self.g, self.v.double())
        with pytest.raises(ValueError, match="q must be float32"):
            metala_attn(self.q.to(torch.int32), self.g, self.v.to(torch.int32))

    def test_initial_state(self):
        with pytest.raises(ValueError, match="initial_state must be \\[N, H, K, V\\]"):
            metala_attn(self.q, self.g, self.v, initial_state=self.h0[:1])
        with pytest.raises(ValueError, match="initial_state must be float32"):
            metala_attn(self.q, self.g, self.v, initial_state=self.h0.bfloat16())

    def test_cu_seqlens(self):
        q, g, v = self.q[:1], self.g[:1], self.v[:1]
        with pytest.raises(ValueError, match="B = 1"):
            metala_attn(self.q, self.g, self.v, cu_seqlens=torch.tensor([0, 10]))
        with pytest.raises(ValueError, match="end at the token count"):
            metala_attn(q, g, v, cu_seqlens=torch.tensor([0, 4, 8]))
        with pytest.raises(ValueError, match="strictly increasing"):
            metala_attn(q, g, v, cu_seqlens=torch.tensor([0, 4, 4, 10]))
        with pytest.raises(ValueError, match="int32 or int64"):
            metala_attn(q, g, v, cu_seqlens=torch.tensor([0.0, 10.0]))

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="unknown backend"):
            metala_attn(self.q, self.g, self.v, backend="cuda-magic")

    def test_triton_without_device(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="triton"):
            metala_attn(self.q, self.g, self.v, backend="triton")
