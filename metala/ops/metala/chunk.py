"""Chunked MetaLA operator on Triton: launchers, the autograd Function and the functional API.

Levels (fla layout): kernels in `chunk_fwd.py` / `chunk_bwd.py` -> launchers `chunk_metala_fwd` /
`chunk_metala_bwd` (allocate, pick grids, launch) -> `ChunkMetaLAFunction` (bookkeeping) -> `chunk_metala` and
`chunk_metala_from_logits` (documented, validated) -> the `MetaLAAttention` layer.
"""

from __future__ import annotations

import logging
import os

import torch
import triton.language as tl

from metala.ops.metala.api import BACKENDS, SplitOutput, check_metala_args, check_w_aug
from metala.ops.metala.chunk_bwd import (
    FLAT_ITEMS,
    GRID_ITEMS,
    LOOP_ITEMS,
    NO_FLAGS,
    WALK_FLAGS,
    WRITE_FLAGS,
    chunk_metala_bwd_kernel_dh,
    chunk_metala_bwd_kernel_dkg,
    chunk_metala_bwd_kernel_dq,
    chunk_metala_bwd_kernel_dqk,
    chunk_metala_bwd_kernel_dv,
    chunk_metala_bwd_kernel_seg,
)
from metala.ops.metala.chunk_fwd import (
    ANY_PATH,
    BC,
    BT,
    ONE_REF,
    SUB_CHUNKS,
    chunk_metala_fwd_kernel_h,
    chunk_metala_fwd_kernel_o,
    chunk_metala_fwd_kernel_seg,
)
from metala.ops.utils.chunk_plan import ChunkPlan, default_seg_chunks, plan_for
from metala.ops.utils.launch_cache import launch

log = logging.getLogger(__name__)
MAX_K, MAX_V = 128, 256
# (chunk, head, K-tile) records per program of the dq/dk kernel's sub-chunk launch (chunk_bwd.WALK_FLAGS): few
# programs when no chunk needs that path, and still a full GPU's worth when every chunk does
FLAG_BLOCK = 16
BWD_FORMS = ("joint", "joint_dA", "split", "split_dA")
DQK_ITEMS = {"grid": GRID_ITEMS.value, "flat": FLAT_ITEMS.value, "loop": LOOP_ITEMS.value}
GAM_CUMSUMS = ("scan", "matmul")


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # per-chunk states: bf16 next to bf16 inputs (half the traffic), fp32 otherwise (never fp16: it overflows)
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _cdiv(a: int, b: int) -> int:
    # host-side grid arithmetic: `triton.cdiv` is a @triton.jit function, and calling one from Python goes through
    # JITFunction.__call__ (1.6 us a call on the 2-core CPU box against 4 ns; 12 calls a forward + backward)
    return -(-a // b)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_prec(dtype: torch.dtype) -> str:
    """fp32 operands: exact on the interpreter, 3xTF32 on GPUs (fp32-level accuracy; "ieee" products compile to
    kernels that spill tens of KB per thread); tf32 for the fp32 accumulators of half-precision inputs."""
    if _interpreted():
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of the tensor-core products: the inputs' half type, fp32 for fp32 inputs and under the CPU
    interpreter (whose tl.dot mishandles bf16 operands in Triton 3.6)."""
    if dtype == torch.float32 or _interpreted():
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _scores_dtype(dtype: torch.dtype):
    """Operand dtype of the intra-chunk products in fwd_o and dv: as `_dot_dtype`, except fp32 for fp16 inputs.
    Those products scale queries and keys by up to exp(SPAN / 2) (chunk_fwd.py), past fp16's range (65504 =
    exp(11.1)) once a chunk's decay spans more than ~22 nats; bf16 has fp32's range."""
    return tl.float32 if dtype == torch.float16 else _dot_dtype(dtype)


INTRA_DTYPES = ("fp32", "input")


def _intra_dtype(dtype: torch.dtype):
    """Operand dtype of the dq/dk kernels' intra-chunk dA products (CONFIG["bwd_dqk"]["intra_dtype"]): "input" is
    `_scores_dtype` (bf16 for bf16 inputs; fp16 inputs keep fp32 for range)."""
    choice = CONFIG["bwd_dqk"]["intra_dtype"]
    if choice not in INTRA_DTYPES:
        raise ValueError(f"CONFIG['bwd_dqk']['intra_dtype'] must be one of {INTRA_DTYPES}, got {choice!r}")
    return _scores_dtype(dtype) if choice == "input" else tl.float32


def _gam_matmul() -> bool:
    """Whether the dq/dk kernels form their running log-decay as a triangular matmul (CONFIG["bwd_dqk"]["gam_cumsum"]
    "matmul") rather than a scan."""
    choice = CONFIG["bwd_dqk"]["gam_cumsum"]
    if choice not in GAM_CUMSUMS:
        raise ValueError(f"CONFIG['bwd_dqk']['gam_cumsum'] must be one of {GAM_CUMSUMS}, got {choice!r}")
    return choice == "matmul"


def _tiles(K: int, V: int) -> tuple[int, int]:
    return min(64, K), min(64, V)


# launch options a CONFIG entry may carry; maxnreg caps the registers a thread (ptxas spills the rest), which lets
# more programs share an SM: 65,536 registers an SM hold two 4-warp programs at 255 a thread, three at <= 168, four
# at <= 128. For dq/dk, 200 did not pay (H100, 1.3B shape, backward 1.838 ms without: 2.052 at 4 warps / 200,
# still two programs an SM, with 568 B of spills a thread; 3.110 at 8 warps / 128;
# 20261206_h100_kernel_tune_aug_s18_new.json); none is set
_LAUNCH_KEYS = ("num_warps", "num_stages", "maxnreg")


# launch configuration per kernel: warps, software-pipelining stages, tiles (bench/kernel_tune.py sweeps these)
CONFIG = {
    # fwd_h: 4 warps measured 0.353 vs 0.402 ms forward with 8 (H200, 360M shape; H100: 0.360 vs 0.410)
    "fwd_h": {"num_warps": 4, "num_stages": 2, "BV": 128},
    # fwd_o and bwd_dv with the fused self-augmentation (w_aug) keep these warps: at 8, fwd 0.367 -> 0.428 ms and
    # dv 0.31 -> 0.36 (H200, 360M shape, 20261202_h200_kernel_tune_aug.json).
    # fwd_o at <= 168 registers (maxnreg; 239 without, 96 B of spills with) runs three programs an SM instead of
    # two: forward 0.688 -> 0.664 ms at the 1.3B shape, 0.366 -> 0.355 at 360M (H100, session 19,
    # 20261206_h100_kernel_tune_aug_s19_sweep.json). The same cap for dv (with 64-wide V tiles, which it needs to
    # stay near 168: backward 1.800 -> 1.902 ms) and for dq/dk (2.11 ms; 4-wide K tiles with it 2.01-2.05) was slower
    "fwd_o": {"num_warps": 4, "num_stages": 2, "BV": 128, "maxnreg": 168},
    # bwd_dh: one program per full V row (BV 128): backward 1.051 vs 1.080 ms on ordinary gates and 1.329 vs 1.368
    # with every chunk on the sub-chunk form (H200, 360M shape, 20261202_h200_kernel_tune_dispatch*.json).
    # 4 warps, not 8: 199 registers a thread, so two programs share an SM where one 8-warp program (163 registers)
    # filled its register file, and the 256 programs of the 1.3B and 360M shapes (16 segments x 16 heads, 32 x 8) run
    # in one wave on 132 SMs instead of two. H100, session 20, with gam_cumsum "matmul"
    # (20261206_h100_kernel_tune_aug_s20b.json): backward 1.799 -> 1.637 ms at the 1.3B shape and 0.947 -> 0.870 at
    # 360M against 8 warps with "scan"; 8 warps capped at 128 registers (no spills) 1.664 / 0.877; 4 warps capped at
    # 128 (74 B of spills) 1.778 / 0.937. Alone (..._s20a.json), fwd+bwd: 4 warps -4.1 % (1.3B) / -3.1 % (360M),
    # the cap -3.2 / -2.1 %
    "bwd_dh": {"num_warps": 4, "num_stages": 2, "BV": 128},
    "bwd_dv": {"num_warps": 4, "num_stages": 2, "BV": 128},
    # form: how dq, dk and dg are computed after dv.
    #   "joint": one kernel per (chunk, head, K-tile) recomputes dA = dO v^T and the products over V with the
    #       states (dO h^T, v dS^T, rowsum(h dS)), then the intra-chunk terms;
    #   "joint_dA": the same, reading the masked dA that the dv kernel stores (STORE_DA) instead of recomputing it;
    #   "split" / "split_dA": dq and (dk, dg) in two kernels (bwd_dq, bwd_dkg), recomputing dA or reading it from
    #       the dv kernel.
    # H100, 1.3B shape (B16 T2048 H16, fused self-augmentation), backward: joint 1.838 ms, joint_dA 1.956
    # (20261206_h100_kernel_tune_aug_s18_new.json). The joint kernel there took 1.021 ms against 1.093 before its
    # session-17 changes (the sub-chunk launch walking the one-reference launch's skip records, the tail's decay
    # factors from two exponentials, sigmoid(-z) from g), backward 1.838 vs 1.905 (the old code in the same call,
    # 20261206_h100_kernel_tune_aug_s18_old.json; forward 0.693 vs 0.690, fwd_o and dv unchanged at 0.448 / 0.526).
    # H200, 360M shape, T=2k, backward: joint 0.918 ms; split_dA 1.40 (its kernels' sum; both in
    # 20261202_h200_kernel_tune_cumsum_reverse.json).
    # Also measured and not kept: the products over V stored by the dv kernel (0.994 ms) or by a kernel of their own
    # (1.086 ms) for a lean dq/dk/dg kernel, which alone took 0.49 ms: its dk/dg tail is latency-bound without any
    # state load (bench/intra_ablation.py; 20261202_h200_kernel_tune_backward_forms.json). One kernel per (chunk,
    # head) for dv, dq and dg together measured 2.06 ms: it spills 0.7-1.1 KB per thread.
    # Register relief that did not pay (H100, 2026-12-06, `bench.kernel_tune --aug`, twice each against the code
    # without it, 20261206_h100_kernel_tune_aug_s15_*.json): the masked dA cast to bf16 once before its two products
    # (spills 50 -> 32 B) took the joint kernel 0.552 -> 0.569 ms at 360M and 1.076 -> 1.099 ms at 1.3B; the reverse
    # running sum as three bf16 products instead of two TF32 ones on top of it, 0.568 / 1.100 ms.
    # intra_dtype: operands of the dq/dk kernels' intra-chunk dA products. "input" (default): bf16 for bf16 inputs
    # (fp32 accumulation), as fwd_o and dv use for theirs (`_scores_dtype`: fp16 inputs keep fp32 operands, for
    # range); "fp32": tf32 on the tensor cores (fp32 inputs: 3xTF32 either way). An earlier kernel (2026-12-01)
    # was wrong with bf16 operands (relative difference 1.8): a Triton 3.6 miscompile of the direct bf16 form
    # (bench/triton_bf16_dot_repro.py), which chunk_fwd.dot_intra avoids with the transposed form. H200, with the
    # fused self-augmentation: backward 1.076 -> 0.995 ms at the 360M shape, 2.055 -> 1.908 at 1.3B
    # (20261205_h200_kernel_tune_aug_new.json); bench.ops gate passed (dq 0.29 %, dz 0.30 % vs 0.20 % with fp32;
    # limit 0.5 %).
    # num_warps 8 was 40-50 % slower: it still takes 255 registers a thread (no spills), so one program fills an
    # SM's register file (at 4 warps two programs fit, with 212 B of spills a thread when the self-augmentation is
    # fused; `python -m bench.aot_check --quick --heads 16`). More programs an SM did not pay either (H100, 1.3B
    # shape, session 19, backward 1.800 ms with the defaults, 20261206_h100_kernel_tune_aug_s19_sweep.json): BK 16
    # (236 registers with the self-augmentation) 2.29 ms, BK 16 capped at 168 (three programs) 2.01-2.05, at 128
    # (four) 2.08, BK 32 capped at 168 2.11: the extra K-tiles each recompute dA and reload v and dO, and the cap
    # spills. The loop over V as a run-time loop instead of an unrolled one: dq/dk 0.995 -> 1.104 ms
    # (20261206_h100_kernel_tune_aug_s19_v19b.json, the code of that time). Taking the key's share of dg before the
    # reverse running sum (dq_dk_from_products): dq/dk 1.019 -> 0.995 ms, backward 1.816 -> 1.800 (spills 212 -> 136 B
    # a thread; 20261206_h100_kernel_tune_aug_s19_{base,sweep}.json, one call).
    # gam_cumsum: how the dq/dk kernels form the chunk's running log-decay Gam: "scan" (as every kernel, METALA_CUMSUM)
    # or "matmul" (a triangular matmul, as their reverse sum): that choice for the dq/dk kernels alone. With every
    # running sum a matmul (METALA_CUMSUM=all) the joint kernel took 0.585 ms against 0.592 with the default, while
    # every other kernel got slower (H200, 360M shape, 20261202_h200_kernel_tune_cumsum_{all,reverse}.json). On the
    # current kernel the matmul form issues 13.6 % fewer instructions (`python -m bench.aot_check --quick --heads 16
    # --only bwd_dqk/one+aug --sass`: 5,584 -> 4,824; fp32 arithmetic 2,440 -> 1,960, spill traffic 68 -> 26).
    # H100, session 20 (20261206_h100_kernel_tune_aug_s20a.json): fwd+bwd -4.0 % at the 1.3B shape (backward 1.811
    # -> 1.719 ms), -3.1 % at 360M (0.948 -> 0.908); the default since. Its sub-chunk launch (chunks past the
    # one-reference span) spills more with it (468 -> 612 B a thread with the self-augmentation, aligned AOT); that
    # launch's time with every chunk on it (METALA_ONE_REFERENCE_SPAN=-1) is not measured yet.
    # items: how the full-grid launches map programs to (chunk, head, K-tile) items (chunk_bwd.GRID_ITEMS and the
    # rest): "grid", "flat" (a K-tile's neighbour is the other K-tile of its (chunk, head)), or "loop" (a fixed grid
    # of programs_per_sm programs an SM looping over the flat items, loop_stages software-pipelining stages).
    # "flat" is the default: the second K-tile of a (chunk, head) then reads its v and dO from L2. H100, session 24,
    # `python -m bench.kernel_tune --aug --shapes 16x2048x16,16x2048x8 --segs "" --variants '[{"bwd_dqk": {"items":
    # "flat"}}]'` (20261207_h100_kernel_tune_aug_s24k.json; outputs bit-identical): backward 1.660 -> 1.590 ms at
    # the 1.3B shape (-4.2 %), 0.870 -> 0.841 at 360M (-3.3 %); forward unchanged. "loop" not timed. Aligned AOT
    # compile for sm_90 at the 1.3B shape with the self-augmentation (`METALA_TRITON_CONFIG='{"bwd_dqk":
    # {"items": ...}}' python -m bench.aot_check --quick --heads 16 --only bwd_dqk/one+aug`), 255 registers each:
    # grid 52 B of spills a thread, flat 56 B, loop 556 / 648 / 764 B at 1 / 2 / 3 stages (the loop keeps its state
    # live across items)
    "bwd_dqk": {"num_warps": 4, "num_stages": 2, "BK": 32, "BV": 64, "form": "joint", "intra_dtype": "input",
                "gam_cumsum": "matmul", "items": "flat", "programs_per_sm": 2, "loop_stages": 1},
    "bwd_dq": {"num_warps": 4, "num_stages": 2, "BK": 32},
    "bwd_dkg": {"num_warps": 8, "num_stages": 2, "BK": 64},
    "seg": {"num_warps": 4, "num_stages": 2},
    # intra-chunk products (fwd_o, bwd_dv, bwd_dqk; bwd_dq/bwd_dkg follow bwd_dqk): a kernel named in two_launches
    # is compiled once for chunks within the one-reference span and once for the rest (chunk_fwd.py INTRA_PATH),
    # and both are launched; the others choose per chunk at run time and hold the registers of both forms
    # (True / False: every kernel / none). Only dq/dk pays for holding both forms: with every chunk on the sub-chunk
    # form its branching kernel doubled the backward (1.96 vs 1.30 ms), while fwd_o and dv branch for free.
    # H200, 360M shape, fwd / bwd ms, ordinary gates: 0.310 / 1.023 (this) vs 0.354 / 1.080 (all two-launch) and
    # 0.309 / 1.034 (none); every chunk on the sub-chunk form: 0.374 / 1.298 vs 0.423 / 1.368 and 0.376 / 1.959
    # (20261202_h200_kernel_tune_dispatch.json, ..._dispatch_sub_chunks_only.json).
    "intra": {"two_launches": ("bwd_dqk",)},
}


def _apply_env_overrides() -> None:
    """METALA_TRITON_CONFIG='{"bwd_dqk": {"BK": 64, "num_warps": 8}}' updates CONFIG entries (tuning without code
    edits); an unknown kernel or key is an error, so a typo cannot silently run the defaults."""
    raw = os.environ.get("METALA_TRITON_CONFIG", "").strip()
    if not raw:
        return
    import json

    for name, change in json.loads(raw).items():
        if name not in CONFIG:
            raise ValueError(f"METALA_TRITON_CONFIG: unknown kernel {name!r}; known: {sorted(CONFIG)}")
        unknown = set(change) - set(CONFIG[name]) - set(_LAUNCH_KEYS)
        if unknown:
            raise ValueError(f"METALA_TRITON_CONFIG: {name} has no {sorted(unknown)}; keys: {sorted(CONFIG[name])}")
        CONFIG[name].update(change)


_apply_env_overrides()


def _intra_paths(name: str) -> tuple[int, ...]:
    """INTRA_PATH values to launch the intra-chunk kernel `name` with (see CONFIG["intra"])."""
    two = CONFIG["intra"]["two_launches"]
    if two is True or (two is not False and name in two):
        return ONE_REF.value, SUB_CHUNKS.value
    return (ANY_PATH.value,)


def _bv(name: str, V: int) -> int:
    return min(CONFIG[name].get("BV", 64), V)


def _launch(name: str) -> dict:
    return {k: v for k, v in CONFIG[name].items() if k in _LAUNCH_KEYS}


def _dqk_items(n_items: int, grid3: tuple[int, int, int], dev: torch.device) -> tuple[int, tuple]:
    """The dq/dk kernel's ITEMS and its full-grid launch's grid (CONFIG["bwd_dqk"]["items"])."""
    choice = CONFIG["bwd_dqk"]["items"]
    if choice not in DQK_ITEMS:
        raise ValueError(f"CONFIG['bwd_dqk']['items'] must be one of {sorted(DQK_ITEMS)}, got {choice!r}")
    if choice == "grid":
        return GRID_ITEMS.value, grid3
    if choice == "flat":
        return FLAT_ITEMS.value, (n_items,)
    # the interpreter's "SMs": a few, so that its programs loop too
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 3
    return LOOP_ITEMS.value, (min(n_items, sms * CONFIG["bwd_dqk"]["programs_per_sm"]),)


def _stores_dA(V: int) -> bool:
    """Whether the dv kernel stores the masked dA for the dq/dk kernels (CONFIG["bwd_dqk"]["form"] "joint_dA" or
    "split_dA"): only when one dv program covers all of V."""
    return CONFIG["bwd_dqk"]["form"] in ("split_dA", "joint_dA") and _bv("bwd_dv", V) >= V


def _splittable(q: torch.Tensor, w_aug: torch.Tensor | None) -> bool:
    """Whether the output can come split (`SplitOutput`): it is fp32 (the fused self-augmentation) from bf16 inputs."""
    return w_aug is not None and q.dtype == torch.bfloat16


def chunk_metala_fwd(q, gate, v, scale, inv_tau, initial_state, output_final_state, plan: ChunkPlan,
                     gate_logits: bool, w_aug: torch.Tensor | None = None, split: bool = False):
    """(o, o_lo, ht, saved): with `split` (w_aug and bf16 inputs only) the fp32 output comes as o + o_lo, two bf16
    tensors; o_lo is None otherwise."""
    T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _tiles(K, V)
    NK, NV = _cdiv(K, BK), _cdiv(V, BV)
    dev = q.device
    prec, DT = _dot_prec(q.dtype), _dot_dtype(q.dtype)
    h_local = torch.empty(plan.n_chunks, H, K, V, device=dev, dtype=_state_dtype(q.dtype))
    cdec = torch.empty(plan.n_chunks, H, K, device=dev, dtype=torch.float32)
    E = torch.empty(plan.n_segs, H, K, V, device=dev, dtype=torch.float32)
    G = torch.empty(plan.n_segs, H, K, device=dev, dtype=torch.float32)
    BVh = _bv("fwd_h", V)
    launch(chunk_metala_fwd_kernel_h, (NK * _cdiv(V, BVh), plan.n_segs, H),
           (gate, v, h_local, cdec, E, G, plan.chunk_start, plan.chunk_len, plan.seg_first_chunk, plan.seg_n_chunks,
            inv_tau),
           dict(H=H, K=K, V=V, BT_=BT, BK=BK, BV=BVh, GATE_LOGITS=gate_logits, DT=DT, DOT_PREC=prec,
                **_launch("fwd_h")))
    S_in = torch.empty(plan.n_segs, H, K, V, device=dev, dtype=torch.float32)
    ht = torch.empty(plan.n_docs, H, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    launch(chunk_metala_fwd_kernel_seg, (NK * NV, plan.n_docs, H),
           (E, G, initial_state if initial_state is not None else E, S_in, ht if ht is not None else E,
            plan.doc_first_seg, plan.doc_n_segs),
           dict(H=H, K=K, V=V, BK=BK, BV=BV, HAS_H0=initial_state is not None, STORE_HT=output_final_state,
                **_launch("seg")))
    # with the self-augmentation the output is fp32, as the unfused layer's o + term: in bf16, rounding o + ~0.5 would
    # cost the small recurrent part (what the head norm keeps after centring) most of its precision
    if split and not _splittable(q, w_aug):
        raise ValueError("a split output is the fp32 output (w_aug given) of bf16 inputs")
    o = torch.empty_like(v, dtype=torch.float32 if w_aug is not None and not split else v.dtype)
    o_lo = torch.empty_like(o) if split else None
    BVo = _bv("fwd_o", V)
    for path in _intra_paths("fwd_o"):
        launch(chunk_metala_fwd_kernel_o, (plan.n_chunks, H, _cdiv(V, BVo)),
               (q, gate, v, h_local, cdec, S_in, o, o if o_lo is None else o_lo, q if w_aug is None else w_aug,
                plan.chunk_start, plan.chunk_len, plan.chunk_seg, scale, inv_tau),
               dict(H=H, K=K, V=V, BT_=BT, BC_=BC, BV=BVo, GATE_LOGITS=gate_logits, DT=DT, DOT_PREC=prec,
                    INTRA_DT=_scores_dtype(q.dtype), INTRA_PATH=path, AUG=w_aug is not None, SPLIT=split,
                    **_launch("fwd_o")))
    return o, o_lo, ht, (h_local, cdec, S_in, G)


def chunk_metala_bwd(q, gate, v, do, dht, scale, inv_tau, saved, plan: ChunkPlan, gate_logits: bool,
                     need_dh0: bool, w_aug: torch.Tensor | None = None):
    """(dq, dgate, dv, dh0, dw_aug): dh0 None unless need_dh0, dw_aug (fp32 [H, K]) None without w_aug."""
    h_local, cdec, S_in, G = saved
    T, H, K = q.shape
    V = v.shape[-1]
    BK, BV = _tiles(K, V)
    NK, NV = _cdiv(K, BK), _cdiv(V, BV)
    dev = q.device
    prec, DT = _dot_prec(q.dtype), _dot_dtype(q.dtype)
    dS_local = torch.empty(plan.n_chunks, H, K, V, device=dev, dtype=_state_dtype(q.dtype))
    Dseg = torch.empty(plan.n_segs, H, K, V, device=dev, dtype=torch.float32)
    BVd = _bv("bwd_dh", V)
    launch(chunk_metala_bwd_kernel_dh, (NK * _cdiv(V, BVd), plan.n_segs, H),
           (q, gate, do, dS_local, Dseg, plan.chunk_start, plan.chunk_len, plan.seg_first_chunk, plan.seg_n_chunks,
            scale, inv_tau),
           dict(H=H, K=K, V=V, BT_=BT, BK=BK, BV=BVd, GATE_LOGITS=gate_logits, DT=DT, DOT_PREC=prec,
                **_launch("bwd_dh")))
    Dout = torch.empty(plan.n_segs, H, K, V, device=dev, dtype=torch.float32)
    dh0 = torch.empty(plan.n_docs, H, K, V, device=dev, dtype=torch.float32) if need_dh0 else None
    launch(chunk_metala_bwd_kernel_seg, (NK * NV, plan.n_docs, H),
           (Dseg, G, dht if dht is not None else Dseg, Dout, dh0 if dh0 is not None else Dseg,
            plan.doc_first_seg, plan.doc_n_segs),
           dict(H=H, K=K, V=V, BK=BK, BV=BV, HAS_DHT=dht is not None, STORE_DH0=need_dh0, **_launch("seg")))
    dq = torch.empty_like(q)
    dv = torch.empty_like(v)
    dgate = torch.empty_like(gate)
    intra = dict(INTRA_PREC="ieee" if _interpreted() else "tf32x3" if q.dtype == torch.float32 else "tf32",
                 INTRA_DT=_intra_dtype(q.dtype))
    BVv = _bv("bwd_dv", V)
    form = CONFIG["bwd_dqk"]["form"]
    if form not in BWD_FORMS:
        raise ValueError(f"CONFIG['bwd_dqk']['form'] must be one of {BWD_FORMS}, got {form!r}")
    gam_matmul = _gam_matmul()
    store_dA = _stores_dA(V)
    dA = torch.empty(plan.n_chunks, H, BT, BT, device=dev, dtype=torch.float32) if store_dA else dS_local
    aug = w_aug is not None
    # fused self-augmentation: the scalar's gradient da [T, H] (V-tiles add into it when one does not cover V),
    # and dw_aug per (chunk, head), summed here: every entry is written by exactly one program, so no atomics
    nv = _cdiv(V, BVv)
    da = (torch.zeros if nv > 1 else torch.empty)(T, H, device=dev, dtype=torch.float32) if aug else dS_local
    dw_part = torch.empty(plan.n_chunks, H, K, device=dev, dtype=torch.float32) if aug else dS_local
    w = w_aug if aug else dS_local
    for path in _intra_paths("bwd_dv"):
        launch(chunk_metala_bwd_kernel_dv, (plan.n_chunks, H, nv),
               (q, gate, v, do, h_local, cdec, S_in, G, dS_local, Dout, dv, dA, w, da, plan.chunk_start,
                plan.chunk_len, plan.chunk_seg, scale, inv_tau),
               dict(H=H, K=K, V=V, BT_=BT, BC_=BC, BV=BVv, GATE_LOGITS=gate_logits, DT=DT, DOT_PREC=prec,
                    STORE_DA=store_dA, INTRA_DT=_scores_dtype(q.dtype), INTRA_PATH=path, AUG=aug, DA_ATOMIC=nv > 1,
                    **_launch("bwd_dv")))
    tables = (plan.chunk_start, plan.chunk_len, plan.chunk_seg, scale, inv_tau)
    BK_dqk = min(CONFIG["bwd_dqk"]["BK"], K)
    common = dict(
        H=H, K=K, V=V, BT_=BT, BC_=BC, BK=BK_dqk, BV=_bv("bwd_dqk", V), GATE_LOGITS=gate_logits, DT=DT, DOT_PREC=prec,
        GAM_MATMUL=gam_matmul, **intra, **_launch("bwd_dqk"),
    )
    if form in ("split", "split_dA"):
        for name, kernel, outs in (("bwd_dq", chunk_metala_bwd_kernel_dq, (dq, dA, w, da)),
                                   ("bwd_dkg", chunk_metala_bwd_kernel_dkg, (dq, dgate, dA, w, da, dw_part))):
            bk = min(CONFIG[name]["BK"], K)
            kw = {**common, "BK": bk, **_launch(name)}
            for path in _intra_paths("bwd_dqk"):
                launch(kernel, (plan.n_chunks, H, K // bk),
                       (q, gate, v, do, h_local, cdec, S_in, G, dS_local, Dout, *outs, *tables),
                       dict(kw, LOAD_DA=store_dA, INTRA_PATH=path, AUG=aug))
    else:
        # with a launch per intra path, the sub-chunk launch walks the records of the chunks the first one skipped
        # (chunk_bwd.WALK_FLAGS) instead of a full grid of programs that would return at once
        paths = _intra_paths("bwd_dqk")
        n_items = plan.n_chunks * H * (K // BK_dqk)
        flags = torch.empty(n_items, device=dev, dtype=torch.int8) if len(paths) > 1 else dS_local
        items, full_grid = _dqk_items(n_items, (plan.n_chunks, H, K // BK_dqk), dev)
        for path in paths:
            walk = path == SUB_CHUNKS.value and len(paths) > 1
            grid = (_cdiv(n_items, FLAG_BLOCK),) if walk else full_grid
            mode = WALK_FLAGS if walk else WRITE_FLAGS if len(paths) > 1 else NO_FLAGS
            launch(chunk_metala_bwd_kernel_dqk, grid,
                   (q, gate, v, do, h_local, cdec, S_in, G, dS_local, Dout, dq, dgate, dA, w, da, dw_part, flags,
                    n_items, *tables),
                   dict(common, INTRA_PATH=path, AUG=aug, LOAD_DA=store_dA, PATH_FLAGS=mode.value,
                        FLAG_BLOCK=FLAG_BLOCK, ITEMS=items, LOOP_STAGES=CONFIG["bwd_dqk"]["loop_stages"]))
    return dq, dgate, dv, dh0, dw_part.sum(0) if aug else None


class ChunkMetaLAFunction(torch.autograd.Function):
    """Outputs (o, o_lo, ht). With `split`, o_lo holds the remainder of the fp32 output rounded into o (bf16); it
    carries no gradient (o + o_lo has o's gradient), so the backward receives dO in bf16: half the bytes that the
    state-gradient, dv and dq/dk kernels read, and half what the caller's backward writes."""

    @staticmethod
    def forward(ctx, q, gate, v, scale, inv_tau, initial_state, output_final_state, plan, gate_logits, w_aug, split):
        B, T, H, K = q.shape
        flat = [t.reshape(B * T, H, t.shape[-1]).contiguous() for t in (q, gate, v)]
        h0 = initial_state.contiguous() if initial_state is not None else None
        w = w_aug.reshape(H, K).contiguous() if w_aug is not None else None
        o, o_lo, ht, saved = chunk_metala_fwd(*flat, scale, inv_tau, h0, output_final_state, plan, gate_logits, w,
                                              split)
        ctx.save_for_backward(*flat, *saved, *(() if w is None else (w,)))
        ctx.meta = (B, T, scale, inv_tau, plan, gate_logits, initial_state is not None,
                    None if w_aug is None else (w_aug.shape, w_aug.dtype))
        shape = (B, T, H, v.shape[-1])
        if o_lo is not None:
            o_lo = o_lo.view(shape)
            ctx.mark_non_differentiable(o_lo)
        # outputs without a gradient reach the backward as None, not as zeros made for it: the split's remainder
        # (a [B, T, H, V] fill every layer) and an unused final state (the state-gradient pass then starts at zero)
        ctx.set_materialize_grads(False)
        return o.view(shape), o_lo, ht

    @staticmethod
    def backward(ctx, do, do_lo, dht):
        q, gate, v, *saved = ctx.saved_tensors
        B, T, scale, inv_tau, plan, gate_logits, has_h0, aug = ctx.meta
        w = saved.pop() if aug is not None else None
        H = q.shape[1]
        if do is None:  # only the final state was differentiated: a zero dO (the kernels read it in any dtype)
            do = torch.zeros_like(v)
        do = do.reshape(B * T, H, do.shape[-1]).contiguous()
        dht = dht.contiguous() if dht is not None else None
        dq, dgate, dv, dh0, dw = chunk_metala_bwd(q, gate, v, do, dht, scale, inv_tau, saved, plan, gate_logits,
                                                  has_h0, w)
        shape = (B, T, H)
        dw = dw.reshape(aug[0]).to(aug[1]) if aug is not None else None
        return (dq.view(*shape, -1), dgate.view(*shape, -1), dv.view(*shape, -1), None, None, dh0, None, None,
                None, dw, None)


def _plan(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, seg_chunks: int | None) -> ChunkPlan:
    B, T, H, K = q.shape
    n_docs = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if seg_chunks is None:
        per_doc = _cdiv(B * T // max(n_docs, 1), BT)
        seg_chunks = default_seg_chunks(per_doc, n_docs, H, _cdiv(v.shape[-1], 64) * _cdiv(K, 64))
    return plan_for(B, T, cu_seqlens, BT, seg_chunks, q.device)


def _check_sizes(q: torch.Tensor, v: torch.Tensor) -> None:
    K, V = q.shape[-1], v.shape[-1]
    for name, d, cap in (("K", K, MAX_K), ("V", V, MAX_V)):
        if d < 16 or d > cap or d & (d - 1):
            raise ValueError(f"the Triton MetaLA kernel needs {name} a power of two in [16, {cap}], got {d}")


def chunk_metala(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    seg_chunks: int | None = None,
    w_aug: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton chunked MetaLA with the fp32 log-decay g (<= 0); the key k = 1 - exp(g) is derived in-kernel.

    Args:
        q: [B, T, H, K], K a power of two in [16, 128]; v: [B, T, H, V], V a power of two in [16, 256].
        g: [B, T, H, K] fp32 log-decay (floored at -10 in-kernel, see chunk_fwd.py).
        scale: default K ** -0.5. initial_state: fp32 [N, H, K, V]. cu_seqlens: int [N + 1] with B = 1.
        seg_chunks: chunks per segment of the two-level state pass (default: sized to fill the GPU).
        w_aug: the self-augmentation weight, H * K values ([H * K] or [H, K]); when given the output also holds
            sigmoid(a v) with a = sum_K q w_aug k (paper Eq. 22), computed in the output kernel, the output is fp32,
            and w_aug gets its gradient.

    Returns:
        (o [B, T, H, V] in q's dtype (fp32 with w_aug), final fp32 state [N, H, K, V] or None).

    Examples::

        >>> o, ht = chunk_metala(q, g, v, output_final_state=True)
        >>> o, ht = chunk_metala(q1, g1, v1, cu_seqlens=torch.tensor([0, 100, 356], device="cuda"))
    """
    check_metala_args(q, g, v, None, initial_state, cu_seqlens)
    check_w_aug(w_aug, q)
    _check_sizes(q, v)
    # a Python float: an int scale would be specialised (and the launch cache keyed) on its value
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    plan = _plan(q, v, cu_seqlens, seg_chunks)
    o, _, ht = ChunkMetaLAFunction.apply(q, g, v, scale, 1.0, initial_state, output_final_state, plan, False, w_aug,
                                         False)
    return o, ht


def chunk_metala_from_logits(
    q: torch.Tensor,
    z: torch.Tensor,
    v: torch.Tensor,
    decay_normalizer: float = 16.0,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    seg_chunks: int | None = None,
    w_aug: torch.Tensor | None = None,
    split_output: bool = False,
) -> tuple[torch.Tensor | SplitOutput, torch.Tensor | None]:
    """As `chunk_metala`, from the gate logits z (any float dtype): g = logsigmoid(z) / decay_normalizer, and the
    key, the cumulative sums and dz are all computed in fp32 inside the kernels (no g tensor is ever stored).
    `split_output` (with w_aug and bf16 inputs; ignored otherwise): the fp32 output as a `SplitOutput` of two bf16
    tensors, whose gradient then comes back in bf16 (api.py `SplitOutput`)."""
    if z.shape != q.shape:
        raise ValueError(f"z must have the shape of q {tuple(q.shape)}, got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"z (gate logits) must be a float tensor, got {z.dtype}")
    check_metala_args(q, _as_g_like(z), v, None, initial_state, cu_seqlens)
    check_w_aug(w_aug, q)
    _check_sizes(q, v)
    # a Python float: an int scale would be specialised (and the launch cache keyed) on its value
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    plan = _plan(q, v, cu_seqlens, seg_chunks)
    split = split_output and _splittable(q, w_aug)
    o, o_lo, ht = ChunkMetaLAFunction.apply(q, z, v, scale, 1.0 / float(decay_normalizer), initial_state,
                                            output_final_state, plan, True, w_aug, split)
    return (SplitOutput(o, o_lo) if split else o), ht


def _as_g_like(z: torch.Tensor) -> torch.Tensor:
    # shape/dtype checks only look at metadata: an fp32 view-alike on the meta device stands in for g
    return torch.empty(z.shape, dtype=torch.float32, device="meta")


_warned_key = False


def chunk_metala_backend(q, g, v, k=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The `metala_attn(backend="triton")` entry; explicit keys (the use_key ablation) fall back to "chunk"."""
    global _warned_key
    if k is not None:
        if not _warned_key:
            log.warning("the Triton MetaLA kernel derives k = 1 - exp(g); explicit keys run on the PyTorch chunk form")
            _warned_key = True
        return BACKENDS["chunk"](q, g, v, k=k, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return chunk_metala(q, g, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens)
