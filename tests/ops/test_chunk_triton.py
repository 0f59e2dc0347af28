"""The Triton kernels (forward, backward, decode) against the fp32 token-by-token reference.

On a CPU machine these run under TRITON_INTERPRET=1 (tests/conftest.py), on small shapes; on a GPU the same tests
run compiled, plus bf16 checks at the benchmark shapes in bench/ops.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from metala.ops import metala_attn, naive_recurrent_metala
from metala.ops.metala import metala_attn_from_logits
from metala.ops.metala.api import triton_usable
from metala.ops.metala.fused_recurrent import fused_recurrent_metala_triton
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not triton_usable(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                                reason="needs a CUDA GPU or the Triton CPU interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_RATIO = 2e-5


def inputs(B, T, H, K, V, logit=0.0, n_states=None, dtype=torch.float32):
    q = torch.randn(B, T, H, K, device=DEVICE, dtype=dtype).requires_grad_()
    z = (torch.randn(B, T, H, K, device=DEVICE) * 3 + logit).requires_grad_()
    v = torch.randn(B, T, H, V, device=DEVICE, dtype=dtype).requires_grad_()
    h0 = torch.randn(n_states or B, H, K, V, device=DEVICE).requires_grad_()
    return q, z, v, h0


def fwd_bwd(fn, q, z, v, h0, do, dht):
    o, ht = fn(q, z, v, h0)
    grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), [q, z, v, h0])
    return (o, ht, *grads)


def compare(ref, tst, ratio):
    for name, a, b in zip(("o", "ht", "dq", "dz", "dv", "dh0"), ref, tst):
        assert_close(name, a.float(), b.float(), ratio)


def reference(q, z, v, h0, cu=None):
    return naive_recurrent_metala(q.float(), F.logsigmoid(z) / 16, v.float(), initial_state=h0,
                                  output_final_state=True, cu_seqlens=cu)


@pytest.mark.parametrize(
    "B,T,H,K,V,seg",
    [
        pytest.param(1, 1, 1, 16, 16, 8, id="B1-T1-H1-K16-V16"),
        pytest.param(2, 63, 2, 16, 32, 8, id="B2-T63-H2-K16-V32"),
        pytest.param(1, 65, 1, 32, 64, 1, id="B1-T65-H1-K32-V64-seg1"),
        pytest.param(2, 200, 1, 16, 32, 1, id="B2-T200-H1-K16-V32-seg1"),
        pytest.param(1, 130, 1, 64, 128, 2, id="B1-T130-H1-K64-V128-seg2"),
    ],
)
@pytest.mark.parametrize("gate", ["g", "logits"])
def test_triton_matches_naive(B, T, H, K, V, seg, gate):
    from metala.ops.metala.chunk import chunk_metala, chunk_metala_from_logits

    q, z, v, h0 = inputs(B, T, H, K, V)
    do, dht = torch.randn(B, T, H, V, device=DEVICE), torch.randn(B, H, K, V, device=DEVICE)
    ref = fwd_bwd(lambda q, z, v, h0: reference(q, z, v, h0), q, z, v, h0, do, dht)
    if gate == "g":
        fn = lambda q, z, v, h0: chunk_metala(q, F.logsigmoid(z) / 16, v, initial_state=h0, output_final_state=True,
                                              seg_chunks=seg)
    else:
        fn = lambda q, z, v, h0: chunk_metala_from_logits(q, z, v, 16.0, initial_state=h0, output_final_state=True,
                                                          seg_chunks=seg)
    compare(ref, fwd_bwd(fn, q, z, v, h0, do, dht), FP32_RATIO)


@pytest.mark.parametrize("logit", [-30.0, 30.0])
def test_triton_extreme_gates(logit):
    from metala.ops.metala.chunk import chunk_metala_from_logits

    q, z, v, h0 = inputs(1, 150, 2, 32, 32, logit=logit)
    do, dht = torch.randn(1, 150, 2, 32, device=DEVICE), torch.randn(1, 2, 32, 32, device=DEVICE)
    ref = fwd_bwd(lambda q, z, v, h0: reference(q, z, v, h0), q, z, v, h0, do, dht)
    fn = lambda q, z, v, h0: chunk_metala_from_logits(q, z, v, 16.0, initial_state=h0, output_final_state=True,
                                                      seg_chunks=1)
    compare(ref, fwd_bwd(fn, q, z, v, h0, do, dht), 1e-4)


def chunk_spans(z: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Per (batch, chunk, head): the largest log-decay span over channels (nats), the kernels' path switch."""
    g = (F.logsigmoid(z.detach().float()) / 16).clamp_min(-10.0)
    B, T, H, K = g.shape
    g = F.pad(g, (0, 0, 0, 0, 0, -T % chunk)).view(B, -1, chunk, H, K)
    return (-g.sum(2)).amax(-1)


def mixed_gate_inputs(T=192, H=2, K=64, V=128):
    """Gate logits that send some chunks (and single channels) past the one-reference span and keep others
    within it, so that both intra-chunk paths of every kernel run in one call."""
    from metala.ops.metala.chunk_fwd import SPAN

    q, z, v, h0 = inputs(1, T, H, K, V)
    with torch.no_grad():
        z[:, :64] -= 60.0  # first chunk: every channel strongly closed (span ~240: one reference would overflow)
        z[:, 64:128, :, :3] -= 80.0  # second chunk: three channels closed, the tile's minimum decides
    spans = chunk_spans(z)
    assert (spans > SPAN.value).any() and (spans <= SPAN.value).any()
    return q, z, v, h0


@pytest.mark.parametrize("two_launches", [True, False, ("bwd_dqk",)],
                         ids=["two-launches", "runtime-branch", "two-launches-dqk-only"])
@pytest.mark.parametrize("gate", ["g", "logits"])
def test_triton_mixed_span_chunks(gate, two_launches, monkeypatch):
    """Chunks past the one-reference span take the sub-chunk path, the rest one matmul; both exact, whether each
    path is its own launch or one kernel branches per chunk (or some kernels one way and the rest the other)."""
    from metala.ops.metala import chunk as C
    from metala.ops.metala.chunk import chunk_metala, chunk_metala_from_logits

    monkeypatch.setitem(C.CONFIG, "intra", {"two_launches": two_launches})

    q, z, v, h0 = mixed_gate_inputs()
    do, dht = torch.randn(1, 192, 2, 128, device=DEVICE), torch.randn(1, 2, 64, 128, device=DEVICE)
    ref = fwd_bwd(lambda q, z, v, h0: reference(q, z, v, h0), q, z, v, h0, do, dht)
    if gate == "g":
        fn = lambda q, z, v, h0: chunk_metala(q, F.logsigmoid(z) / 16, v, initial_state=h0, output_final_state=True)
    else:
        fn = lambda q, z, v, h0: chunk_metala_from_logits(q, z, v, 16.0, initial_state=h0, output_final_state=True)
    compare(ref, fwd_bwd(fn, q, z, v, h0, do, dht), 1e-4)


def test_sub_chunk_launch_walks_the_skipped_chunks_only(monkeypatch):
    """With a launch per intra path, the dq/dk kernel's sub-chunk launch runs one program per FLAG_BLOCK records of
    what the one-reference launch skipped: strongly closed chunks in the first and last blocks of records and none
    in the middle one; every chunk's gradients must come out (dq and dz start as uninitialised memory)."""
    from metala.ops.metala import chunk as C
    from metala.ops.metala.chunk_fwd import SPAN

    monkeypatch.setitem(C.CONFIG, "intra", {"two_launches": ("bwd_dqk",)})
    T, H, K, V = 64 * 20, 2, 32, 32
    q, z, v, h0 = inputs(1, T, H, K, V)
    with torch.no_grad():
        z[:, 64:128] -= 60.0  # chunk 1, both heads: records 2 and 3 (one K-tile: record = chunk * H + head)
        z[:, 17 * 64 : 18 * 64, 1] -= 60.0  # chunk 17, head 1: record 35, in the third block of 16
    spans = chunk_spans(z)
    assert [tuple(x) for x in (spans > SPAN.value).nonzero()[:, 1:].tolist()] == [(1, 0), (1, 1), (17, 1)]
    assert C.FLAG_BLOCK == 16 and T // 64 * H > 2 * C.FLAG_BLOCK
    do, dht = torch.randn(1, T, H, V, device=DEVICE), torch.randn(1, H, K, V, device=DEVICE)
    ref = fwd_bwd(lambda q, z, v, h0: reference(q, z, v, h0), q, z, v, h0, do, dht)
    fn = lambda q, z, v, h0: C.chunk_metala_from_logits(q, z, v, 16.0, initial_state=h0, output_final_state=True)
    compare(ref, fwd_bwd(fn, q, z, v, h0, do, dht), 1e-4)


@pytest.mark.parametrize("seg", [1, 8])
def test_triton_varlen_matches_naive(seg):
    lengths = [1, 63, 1, 2, 70, 130]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    T = sum(lengths)
    q, z, v, h0 = inputs(1, T, 2, 16, 32, n_states=len(lengths))
    do, dht = torch.randn(1, T, 2, 32, device=DEVICE), torch.randn(len(lengths), 2, 16, 32, device=DEVICE)
    ref = fwd_bwd(lambda q, z, v, h0: reference(q, z, v, h0, cu), q, z, v, h0, do, dht)
    fn = lambda q, z, v, h0: metala_attn_from_logits(q, z, v, initial_state=h0, output_final_state=True,
                                                     cu_seqlens=cu, backend="triton")
    compare(ref, fwd_bwd(fn, q, z, v, h0, do, dht), FP32_RATIO)


def test_triton_without_initial_state_through_metala_attn():
    q, z, v, _ = inputs(2, 70, 1, 16, 16)
    o_r, _ = naive_recurrent_metala(q, F.logsigmoid(z) / 16, v)
    o_t, ht = metala_attn(q, F.logsigmoid(z) / 16, v, backend="triton")
    assert ht is None
    assert_close("o", o_r, o_t, FP32_RATIO)
    dq_r, dg_r = torch.autograd.grad(o_r.sum(), [q, z])
    dq_t, dg_t = torch.autograd.grad(o_t.sum(), [q, z])
    assert_close("dq", dq_r, dq_t, FP32_RATIO)
    assert_close("dz", dg_r, dg_t, FP32_RATIO)


def test_triton_bf16_inputs():
    q, z, v, h0 = inputs(1, 130, 2, 32, 64)
    do, dht = torch.randn(1, 130, 2, 64, device=DEVICE), torch.randn(1, 2, 32, 64, device=DEVICE)
    ref = fwd_bwd(lambda q, z, v, h0: reference(q, z, v, h0), q, z, v, h0, do, dht)
    qb, vb = q.detach().bfloat16().requires_grad_(), v.detach().bfloat16().requires_grad_()
    fn = lambda q, z, v, h0: metala_attn_from_logits(q, z, v, initial_state=h0, output_final_state=True,
                                                     backend="triton")
    o, ht, dq, dz, dv, dh0 = fwd_bwd(fn, qb, z, vb, h0, do, dht)
    assert o.dtype == torch.bfloat16 and dq.dtype == torch.bfloat16 and dz.dtype == torch.float32
    compare(ref, (o, ht, dq, dz, dv, dh0), 1e-2)


@pytest.mark.parametrize("T", [1, 3])
def test_triton_decode_step(T):
    q, z, v, h0 = (t.detach() for t in inputs(3, T, 2, 16, 32))
    o_r, ht_r = reference(q, z, v, h0)
    o_t, ht_t = fused_recurrent_metala_triton(q, z, v, initial_state=h0, output_final_state=True, gate_logits=True)
    assert_close("o", o_r, o_t, FP32_RATIO)
    assert_close("ht", ht_r, ht_t, FP32_RATIO)


def test_triton_rejects_unsupported_sizes():
    from metala.ops.metala.chunk import chunk_metala

    q = torch.randn(1, 8, 1, 24, device=DEVICE)
    with pytest.raises(ValueError, match="K a power of two"):
        chunk_metala(q, torch.zeros_like(q) - 0.1, torch.randn(1, 8, 1, 16, device=DEVICE))


def test_model_on_triton_matches_model_on_chunk():
    from metala import MetaLAConfig, MetaLAForCausalLM, next_token_labels

    torch.manual_seed(0)
    chunk = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", attn_backend="chunk")).to(DEVICE)
    tri = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", attn_backend="triton")).to(DEVICE)
    tri.load_state_dict(chunk.state_dict())
    for m in (chunk, tri):
        for layer in m.layers:
            torch.manual_seed(1)
            torch.nn.init.normal_(layer.mixer.self_aug.w_aug, 0, 0.5)
    lengths = [5, 1, 70, 20]
    ids = torch.randint(0, 512, (1, sum(lengths)), device=DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    outs = []
    for m in (chunk, tri):
        out = m(ids, labels=next_token_labels(ids), cu_seqlens=cu)
        outs.append((out, torch.autograd.grad(out.loss, list(m.parameters()))))
    assert_close("logits", outs[0][0].logits, outs[1][0].logits, FP32_RATIO)
    for (name, _), a, b in zip(chunk.named_parameters(), outs[0][1], outs[1][1]):
        assert_close(name, a, b, 1e-4)


@pytest.mark.parametrize("form", [
    pytest.param({"form": "joint", "intra_dtype": "fp32"}, id="joint-dqk"),
    pytest.param({"form": "split_dA", "intra_dtype": "fp32"}, id="dv-stores-dA"),
    pytest.param({"form": "joint_dA", "intra_dtype": "fp32"}, id="joint-dqk-dA-from-dv"),
    pytest.param({"form": "split", "intra_dtype": "fp32"}, id="split-recompute-dA"),
    # intra_dtype "input": the interpreter runs half-precision products in fp32 (see chunk.py _dot_dtype), so this
    # checks the cast path traces and stays exact (its bf16 accuracy is the GPU gate's: bench/ops.py,
    # bench/kernel_tune.py); each with the dq/dk kernels' running log-decay as a triangular matmul (the default:
    # exact under the interpreter, fp32-accurate TF32 on a GPU) and as a scan, on chunks of both intra paths
    pytest.param({"form": "joint", "intra_dtype": "input", "gam_cumsum": "matmul"}, id="joint-dqk-gam-matmul"),
    pytest.param({"form": "split", "intra_dtype": "input", "gam_cumsum": "matmul"}, id="split-gam-matmul"),
    pytest.param({"form": "joint", "intra_dtype": "input", "gam_cumsum": "scan"}, id="joint-dqk-gam-scan"),
    pytest.param({"form": "split", "intra_dtype": "input", "gam_cumsum": "scan"}, id="split-gam-scan"),
    # the joint kernel's program-to-item maps besides the default 1-D grid ("flat"): the 3-D grid, and a fixed grid
    # of looping programs (3 "SMs" under the interpreter: 6 programs over 3 chunks x 2 heads x 2 K-tiles, two items
    # each; 2 and 3 stages of the loop)
    pytest.param({"form": "joint", "items": "grid"}, id="joint-grid-items"),
    pytest.param({"form": "joint", "items": "loop", "loop_stages": 2}, id="joint-loop-items"),
    pytest.param({"form": "joint", "items": "loop", "programs_per_sm": 1, "loop_stages": 3}, id="joint-loop-items-4"),
])
def test_every_backward_form_matches_naive(form, monkeypatch):
    """The backward can run as one joint dq/dk kernel or as dq + dk kernels (with dA from the dv kernel or
    recomputed), with their running log-decay as a scan or a matmul; the default is whichever measured fastest, and
    the others must stay correct to be tunable."""
    from metala.ops.metala import chunk as C

    monkeypatch.setitem(C.CONFIG, "bwd_dqk", {**C.CONFIG["bwd_dqk"], **form})
    q, z, v, h0 = mixed_gate_inputs()
    do, dht = torch.randn(1, 192, 2, 128, device=DEVICE), torch.randn(1, 2, 64, 128, device=DEVICE)
    ref = fwd_bwd(lambda q, z, v, h0: reference(q, z, v, h0), q, z, v, h0, do, dht)
    fn = lambda q, z, v, h0: C.chunk_metala_from_logits(q, z, v, 16.0, initial_state=h0, output_final_state=True,
                                                        seg_chunks=1)
    compare(ref, fwd_bwd(fn, q, z, v, h0, do, dht), 1e-4)


def test_half_precision_intra_products_are_bf16_only(monkeypatch):
    """The intra-chunk products (fwd_o and dv scores; dq/dk with intra_dtype "input") run in bf16 for bf16 inputs;
    fp16 keeps fp32 operands (the products scale by up to exp(SPAN / 2), past fp16's range), as does "fp32"."""
    import triton.language as tl

    from metala.ops.metala import chunk as C

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the choice made for a GPU (the interpreter always takes fp32)
    assert [C._scores_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == [tl.bfloat16, tl.float32,
                                                                                            tl.float32]
    monkeypatch.setitem(C.CONFIG, "bwd_dqk", {**C.CONFIG["bwd_dqk"], "intra_dtype": "input"})
    assert [C._intra_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == [tl.bfloat16, tl.float32,
                                                                                           tl.float32]
    monkeypatch.setitem(C.CONFIG, "bwd_dqk", {**C.CONFIG["bwd_dqk"], "intra_dtype": "fp32"})
    assert C._intra_dtype(torch.bfloat16) == tl.float32


@pytest.mark.parametrize("bad", [{"form": "fused"}, {"intra_dtype": "bf16"}, {"gam_cumsum": "tree"},
                                 {"items": "persistent"}])
def test_unknown_backward_form_is_an_error(bad, monkeypatch):
    from metala.ops.metala import chunk as C

    monkeypatch.setitem(C.CONFIG, "bwd_dqk", {**C.CONFIG["bwd_dqk"], **bad})
    q, z, v, h0 = mixed_gate_inputs()
    o, _ = C.chunk_metala_from_logits(q.requires_grad_(), z, v)
    with pytest.raises(ValueError, match="must be one of"):
        o.sum().backward()


def test_config_overrides_from_the_environment(monkeypatch):
    from metala.ops.metala import chunk as C

    monkeypatch.setattr(C, "CONFIG", {k: dict(v) for k, v in C.CONFIG.items()})
    monkeypatch.setenv("METALA_TRITON_CONFIG", '{"bwd_dqk": {"BK": 16, "num_warps": 8, "maxnreg": 128}}')
    C._apply_env_overrides()
    assert C.CONFIG["bwd_dqk"]["BK"] == 16 and C.CONFIG["bwd_dqk"]["num_warps"] == 8
    # launch options reach the launch, tiles and forms do not
    launch = C._launch("bwd_dqk")
    assert launch["maxnreg"] == 128 and launch["num_warps"] == 8 and not {"BK", "form"} & set(launch)
    for bad, match in (('{"bwd_dqkk": {}}', "unknown kernel"), ('{"bwd_dqk": {"BKK": 1}}', "has no")):
        monkeypatch.setenv("METALA_TRITON_CONFIG", bad)
        with pytest.raises(ValueError, match=match):
            C._apply_env_overrides()


@pytest.mark.parametrize("mode", ["all", "none"])
def test_every_running_sum_form_matches_naive(mode):
    """METALA_CUMSUM is read when the kernels' module is imported, so each form runs in a fresh interpreter: the
    running sums as scans ("none"), or as triangular matmuls ("all"; the default "reverse" runs everywhere else)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch, tests.ops.test_chunk_triton as t\n"
        "torch.manual_seed(0)\n"
        "t.test_triton_matches_naive(1, 130, 1, 64, 128, 2, 'logits')\n"
        "from metala.ops.metala import chunk_fwd\n"
        "print('cumsum', chunk_fwd.CUMSUM_MATMUL.value, chunk_fwd.REVCUMSUM_MATMUL.value)\n"
    )
    env = {**os.environ, "METALA_CUMSUM": mode}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == (["True", "True"] if mode == "all" else ["False", "False"])


def test_unknown_running_sum_form_is_an_error():
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import metala.ops.metala.chunk_fwd"], capture_output=True, text=True,
                       env={**os.environ, "METALA_CUMSUM": "matmul"}, timeout=300)
    assert r.returncode != 0 and "METALA_CUMSUM must be" in r.stderr


def aug_reference(q, z, v, w, h0, cu=None):
    """The operator plus the self-augmentation sigmoid(a v), a = sum_K q w k, in fp32 (the fused kernels' target)."""
    from metala.ops.metala.naive import naive_self_augmentation

    g = F.logsigmoid(z) / 16
    o, ht = naive_recurrent_metala(q.float(), g, v.float(), initial_state=h0, output_final_state=True, cu_seqlens=cu)
    return o + naive_self_augmentation(q, -torch.expm1(g), v, w), ht


@pytest.mark.parametrize("form,bv", [("joint", 128), ("joint", 32), ("joint_dA", 128), ("split_dA", 32), ("split", 128)],
                         ids=["joint", "joint-dv-tiles-add-da", "joint_dA", "split_dA-dv-tiles-add-da", "split"])
def test_fused_self_augmentation_matches_naive(form, bv, monkeypatch):
    """w_aug fused into the output and backward kernels: o, dq, dz, dv, dh0 and dw_aug match the reference on
    chunks of both intra paths, for every backward form, and when several dv programs add into da."""
    from metala.ops.metala import chunk as C

    monkeypatch.setitem(C.CONFIG, "bwd_dqk", {**C.CONFIG["bwd_dqk"], "form": form})
    monkeypatch.setitem(C.CONFIG, "bwd_dv", {**C.CONFIG["bwd_dv"], "BV": bv})
    q, z, v, h0 = mixed_gate_inputs()
    w = (torch.randn(2 * 64, device=DEVICE) * 0.5).requires_grad_()
    do = torch.randn(1, 192, 2, 128, device=DEVICE)
    o_r, _ = aug_reference(q, z, v, w, h0)
    o_t, _ = C.chunk_metala_from_logits(q, z, v, 16.0, initial_state=h0, w_aug=w, seg_chunks=1)
    assert o_t.dtype == torch.float32
    assert_close("o", o_r, o_t, 1e-4)
    names = ("dq", "dz", "dv", "dh0", "dw_aug")
    for name, a, b in zip(names, torch.autograd.grad((o_r * do).sum(), [q, z, v, h0, w]),
                          torch.autograd.grad((o_t * do).sum(), [q, z, v, h0, w])):
        assert_close(name, a, b, 1e-4)


def test_fused_self_augmentation_varlen_and_bf16():
    """Packed documents through metala_attn_from_logits (w_aug as [H, K]); and bf16 inputs with a bf16 weight,
    whose gradient comes back in its dtype."""
    lengths = [1, 63, 70, 2]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    T = sum(lengths)
    q, z, v, h0 = inputs(1, T, 2, 16, 32, n_states=len(lengths))
    w = (torch.randn(2, 16, device=DEVICE) * 0.5).requires_grad_()
    do = torch.randn(1, T, 2, 32, device=DEVICE)
    o_r, _ = aug_reference(q, z, v, w, h0, cu)
    o_t, _ = metala_attn_from_logits(q, z, v, initial_state=h0, cu_seqlens=cu, backend="triton", w_aug=w)
    assert_close("o", o_r, o_t, FP32_RATIO)
    for name, a, b in zip(("dq", "dz", "dv", "dh0", "dw_aug"),
                          torch.autograd.grad((o_r * do).sum(), [q, z, v, h0, w]),
                          torch.autograd.grad((o_t * do).sum(), [q, z, v, h0, w])):
        assert_close(name, a, b, FP32_RATIO)
    # bf16 inputs in the regime of a model at init: small values and w_aug, so the term is ~0.5 and o is small.
    # The output is fp32: rounded to bf16, o + ~0.5 keeps little of o, the part the head norm keeps after centring
    # (measured here: 5.8 % centred error with a bf16 output, 0.07 % with fp32)
    qb, vb = q.detach().bfloat16().requires_grad_(), (v.detach() * 0.05).bfloat16().requires_grad_()
    wb = (w.detach() * 0.1).bfloat16().requires_grad_()
    o_b, _ = metala_attn_from_logits(qb, z, vb, cu_seqlens=cu, backend="triton", w_aug=wb)
    (dw_b,) = torch.autograd.grad((o_b * do).sum(), [wb])
    assert o_b.dtype == torch.float32 and dw_b.dtype == torch.bfloat16
    o_r, _ = aug_reference(qb, z, vb, wb, None, cu)
    centred = lambda o: o - o.mean(-1, keepdim=True)  # noqa: E731
    assert_close("o bf16, centred per head", centred(o_r), centred(o_b), 5e-3)
    assert_close("dw_aug bf16", torch.autograd.grad((o_r * do).sum(), [wb])[0], dw_b, 2e-2)


def test_split_output_is_the_fp32_output_with_a_bf16_gradient():
    """split_output: the fused fp32 output of bf16 inputs as two bf16 halves. Their sum is the fp32 output to ~2^-17
    of each value; only the first half carries a gradient, and the backward then computes from dO rounded to bf16:
    the same gradients as the fp32 output's backward given that rounded dO."""
    from metala.ops.metala import SplitOutput

    lengths = [63, 70, 2]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    T = sum(lengths)
    q, z, v, _ = inputs(1, T, 2, 16, 32, dtype=torch.bfloat16)
    w = (torch.randn(2, 16, device=DEVICE) * 0.05).bfloat16().requires_grad_()
    do = torch.randn(1, T, 2, 32, device=DEVICE)
    o, _ = metala_attn_from_logits(q, z, v, cu_seqlens=cu, backend="triton", w_aug=w)
    so, _ = metala_attn_from_logits(q, z, v, cu_seqlens=cu, backend="triton", w_aug=w, split_output=True)
    assert isinstance(so, SplitOutput) and o.dtype == torch.float32
    assert so.hi.dtype == so.lo.dtype == torch.bfloat16 and not so.lo.requires_grad
    merged = so.merge()
    # the first half is the output rounded to nearest on GPUs (the CPU interpreter's bf16 conversion truncates,
    # whatever the rounding asked for): within one bf16 step of it either way
    assert ((so.hi.float() - o).abs() <= o.abs() * 2.0**-7).all()
    if DEVICE == "cuda":
        assert torch.equal(so.hi, o.bfloat16())
    # rounded to nearest, each half's error is at most half a step: 2^-9 of the value, then 2^-9 of the remainder
    assert ((merged - o).abs() <= o.abs() * (2.0**-16 if DEVICE == "cuda" else 2.0**-14)).all()
    assert (merged - o).abs().max() < (so.hi.float() - o).abs().max() / 32  # the second half adds 5+ bits
    do_bf16 = do.bfloat16().float()
    names = ("dq", "dz", "dv", "dw_aug")
    for name, a, b in zip(names, torch.autograd.grad((o * do_bf16).sum(), [q, z, v, w]),
                          torch.autograd.grad((merged * do).sum(), [q, z, v, w])):
        assert a.dtype == b.dtype
        assert_close(name, a.float(), b.float(), FP32_RATIO)
    # fp32 inputs (and every path without the fused term) return the output as it is
    q32, z32, v32, _ = inputs(1, 8, 2, 16, 16)
    out, _ = metala_attn_from_logits(q32, z32, v32, backend="triton", w_aug=torch.zeros(32, device=DEVICE),
                                     split_output=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


class _ZeroFills(TorchDispatchMode):
    """Records the shapes of the tensors that ops fill with zeros (what autograd makes for an output's missing
    gradient when the Function asks it to)."""

    FILLS = ("aten.zeros.", "aten.zeros_like.", "aten.zero_.", "aten.new_zeros.", "aten.fill_.")

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func).startswith(self.FILLS) and isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def test_outputs_without_a_gradient_get_no_zero_gradient():
    """The split's remainder carries no gradient: the backward is handed nothing for it (before, autograd made a
    [B, T, H, V] tensor of zeros every layer). With only the final state differentiated, the output's gradient is
    zero, as in the reference."""
    q, z, v, h0 = inputs(1, 70, 2, 16, 32, dtype=torch.bfloat16)
    w = (torch.randn(2, 16, device=DEVICE) * 0.05).bfloat16()
    so, _ = metala_attn_from_logits(q, z, v, backend="triton", w_aug=w, split_output=True)
    loss = (so.merge() * torch.randn(so.hi.shape, device=DEVICE)).sum()
    with _ZeroFills() as fills:
        loss.backward()
    assert q.grad is not None
    assert tuple(so.lo.shape) not in fills.shapes, fills.shapes
    # only the final state: the operator's backward runs with a zero dO of its own
    q, z, v, h0 = inputs(1, 70, 2, 16, 32)
    dht = torch.randn(1, 2, 16, 32, device=DEVICE)
    ref = torch.autograd.grad((reference(q, z, v, h0)[1] * dht).sum(), [z, v, h0])
    _, ht = metala_attn_from_logits(q, z, v, initial_state=h0, output_final_state=True, backend="triton")
    dq, *tst = torch.autograd.grad((ht * dht).sum(), [q, z, v, h0])
    assert not dq.any()  # queries only read the state
    for name, a, b in zip(("dz", "dv", "dh0"), ref, tst):
        assert_close(name, a, b, FP32_RATIO)


def test_bad_self_augmentation_weight_is_an_error():
    q, z, v, _ = inputs(1, 8, 2, 16, 16)
    for bad, match in ((torch.zeros(31), r"\[H \* K\] = \[32\]"), (torch.zeros(4, 8), r"\[H, K\] = \[2, 16\]"),
                       (torch.zeros(32, dtype=torch.int64), "float tensor")):
        with pytest.raises(ValueError, match=match):
            metala_attn_from_logits(q, z, v, backend="triton", w_aug=bad.to(DEVICE))
        with pytest.raises(ValueError, match=match):
            metala_attn_from_logits(q, z, v, backend="chunk", w_aug=bad.to(DEVICE))


@pytest.mark.parametrize("backend", ["triton", "chunk"])
def test_model_with_fused_self_augmentation_matches_the_module(backend):
    """config.fuse_self_aug hands w_aug to the operator; the model's loss and every gradient equal the unfused
    model's (self-augmentation as its own module), on packed documents."""
    from metala import MetaLAConfig, MetaLAForCausalLM, next_token_labels

    models = []
    for fuse in (False, True):
        torch.manual_seed(0)
        m = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", attn_backend=backend, fuse_self_aug=fuse)).to(DEVICE)
        for layer in m.layers:
            torch.manual_seed(1)
            torch.nn.init.normal_(layer.mixer.self_aug.w_aug, 0, 0.5)
        models.append(m)
    assert [layer.mixer.fuse_self_aug for layer in models[1].layers] == [True] * len(models[1].layers)
    lengths = [5, 1, 70, 20]
    ids = torch.randint(0, 512, (1, sum(lengths)), device=DEVICE)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    outs = []
    for m in models:
        out = m(ids, labels=next_token_labels(ids), cu_seqlens=cu)
        outs.append((out.loss, torch.autograd.grad(out.loss, list(m.parameters()))))
    assert_close("loss", outs[0][0], outs[1][0], FP32_RATIO)
    for (name, _), a, b in zip(models[0].named_parameters(), outs[0][1], outs[1][1]):
        assert_close(name, a, b, 1e-4)


def test_model_with_split_operator_output():
    """config.split_op_output: in a bf16 model the layer gets a SplitOutput from the operator and merges it in
    `finish`. Against the same model in fp32, its loss and gradients are as close as those of the bf16 model that
    takes the fp32 output (the two differ by the output's ~2^-17 and the gradient's bf16 rounding)."""
    from metala import MetaLAConfig, MetaLAForCausalLM, next_token_labels
    from metala.ops.metala import SplitOutput
    from tests.utils import err_ratio

    lengths = [40, 1, 30]
    ids = torch.randint(0, 512, (1, sum(lengths)), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    outs, kinds = {}, []
    for name, split, dtype in (("fp32", True, torch.float32), ("bf16", False, torch.bfloat16),
                               ("bf16 split", True, torch.bfloat16)):
        torch.manual_seed(0)
        cfg = MetaLAConfig.from_preset("tiny", attn_backend="triton", split_op_output=split)
        m = MetaLAForCausalLM(cfg).to(DEVICE)
        for layer in m.layers:
            torch.manual_seed(1)
            torch.nn.init.normal_(layer.mixer.self_aug.w_aug, 0, 0.05)
        m = m.to(dtype)
        attend = m.layers[0].mixer.attend
        m.layers[0].mixer.attend = lambda *a, _f=attend, **k: kinds.append(type(r := _f(*a, **k))) or r
        out = m(ids, labels=next_token_labels(ids), cu_seqlens=cu)
        outs[name] = [out.loss.float()] + [g.float() for g in torch.autograd.grad(out.loss, list(m.parameters()))]
    assert kinds == [torch.Tensor, torch.Tensor, SplitOutput]
    # compiled as training runs it (pretrain.parallelize.apply_compile): the pair crosses into the boundary graphs
    import copy

    from pretrain.parallelize import apply_compile

    torch._dynamo.reset()
    compiled = copy.deepcopy(m)
    del compiled.layers[0].mixer.attend  # the recording wrapper above would call the original's layer
    apply_compile(compiled, backend="aot_eager")
    out = compiled(ids, labels=next_token_labels(ids), cu_seqlens=cu)
    grads = torch.autograd.grad(out.loss, list(compiled.parameters()))
    torch._dynamo.reset()
    assert torch.equal(out.loss.float(), outs["bf16 split"][0])
    for name, a, b in zip([n for n, _ in m.named_parameters()], outs["bf16 split"][1:], grads):
        assert_close(name, a, b.float(), 1e-2)
    names = ["loss"] + [n for n, _ in m.named_parameters()]
    for i, name in enumerate(names):
        ref = outs["fp32"][i]
        plain, split = err_ratio(ref, outs["bf16"][i]), err_ratio(ref, outs["bf16 split"][i])
        print(f"{name}: bf16 {plain:.3e}, bf16 split {split:.3e}")
        assert split <= 1.25 * plain + 2e-3, (name, plain, split)
