"""End-to-end training throughput on one GPU (shared/spec/performance.md sections 1 and 2.3): our model through the
trainer's own code path against fla GLA and HF Llama (SDPA) of the same size, same batch tokens and optimizer.

    python -m bench.train_throughput [--presets 360m,1.3b] [--seqlens 2048,8192,16384] [--peers gla,llama]
                                     [--harness trainer,plain] [--compile] [--profile] [--micro-batch N]
                                     [--doc-len N] [--tokens-per-step N]

Harnesses (both are run when asked; each row says which):
  trainer  ours: `pretrain.trainer.build_training_model` + the DeepSpeed engine from `deepspeed_config` (bf16
           weights with fp32 masters, ZeRO-1, fused torch AdamW, grad clipping) + the trainer's non-finite step
           guard, micro-batch = whole step unless --micro-batch (then DeepSpeed accumulates B / N of them).
           Peers go through the same DeepSpeed config and optimizer.
  plain    the spec's anchor harness for every model: `model.to(bfloat16)`, `AdamW(fused=True)`, no grad clipping
           (with --micro-batch, each micro-batch's loss scaled by N / B before its backward).
Every run: 32,768 tokens per optimizer step unless --tokens-per-step (B = tokens / T), random tokens (packed into
documents of mean length N with cu_seqlens under --doc-len; otherwise no boundaries), 3 warm-up steps, then 8 timed
steps between `cuda.synchronize()` calls; peak memory is `max_memory_allocated` over the timed steps.

Correctness gate (a model that fails it gets no time; the script exits non-zero): ours at the bench preset, one
batch of T = 1024 with two packed documents: loss and every parameter gradient of the Triton path against the
pure-PyTorch chunked reference (fp32 weights, fp32 inputs) within 2 % relative error; and every timed step's loss is
finite and near ln(V) for random tokens.

MFU = 6 * N_nonemb * tokens/s / 989 TFLOP/s; N_nonemb counts every matmul weight (all parameters except the input
embedding lookup, LM head counted once) and leaves out the recurrence / attention-score FLOPs, as the anchors do.
`--profile` adds a per-op CUDA-time breakdown of one step of ours (torch.profiler) to the JSON, under each --harness.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch

from bench import gpu_tag, merge_sections, result_path

ROOT = Path(__file__).resolve().parents[1]
# tokens per optimizer step (--tokens-per-step; the anchors' 32,768 by default). With --micro-batch, a larger
# step is the recipes' form: several micro-batches accumulated per optimizer step, so the step's fixed cost (the
# optimizer, the gradient copies and norm) spreads over more tokens
TOKENS = {"n": 32768}
H100_PEAK = 989e12
WARMUP, TIMED = 3, 8
PEER_SIZES = {  # the anchors' peers (performance.md 2.3 / 2.4)
    "360m": dict(d=1024, layers=24, llama_heads=16, llama_ffn=2816, gla_heads=4),
    "1.3b": dict(d=2048, layers=24, llama_heads=16, llama_ffn=5632, gla_heads=4),
}


# MetaLAConfig fields over the presets for our rows (--model-overrides), e.g. {"fuse_self_aug": false}
MODEL_OVERRIDES: dict = {}
# TrainConfig `train` fields over the benchmark's for our rows (--train-overrides), e.g. {"compile_memory_budget": 0.9}
TRAIN_OVERRIDES: dict = {}
# changes to the trainer's DeepSpeed config for trainer-harness rows (--ds-config), e.g.
# {"bf16": {"check_grad_overflow": true}}: an A/B of a DeepSpeed setting on one machine in one run
DS_CONFIG_CHANGES: dict = {}
# sequences per forward/backward (--micro-batch; 0: the whole batch at once): the same tokens per optimizer step,
# in B / MICRO_BATCH accumulated micro-batches, in every harness (what a model that does not fit at B needs)
MICRO_BATCH = {"n": 0}
# mean document length in tokens (--doc-len; 0: no boundaries): each step's batch then packs documents like the
# trainer's loader, with `cu_seqlens` moved to the GPU as the trainer moves it (a fresh tensor every step, so the
# operator plans its chunks every step, as in training). The peers ignore the boundaries.
DOC_LEN = {"n": 0}


def doc_boundaries(B: int, T: int, mean_len: int, seed: int) -> torch.Tensor:
    """cu_seqlens over the B * T flattened tokens: every row starts a document, and documents of exponentially
    distributed length (mean `mean_len`, at least 1 token) follow each other within a row."""
    import numpy as np

    rng = np.random.default_rng(seed)
    starts = []
    for row in range(B):
        pos, end = row * T, (row + 1) * T
        while pos < end:
            starts.append(pos)
            pos += max(1, int(rng.exponential(mean_len)))
    return torch.tensor([*starts, B * T], dtype=torch.int32)


def run_boundaries(B: int, T: int) -> torch.Tensor | None:
    """The host boundaries every step of a run uses (None without --doc-len)."""
    return doc_boundaries(B, T, DOC_LEN["n"], seed=T) if DOC_LEN["n"] else None


def step_boundaries(cu_host: torch.Tensor | None) -> torch.Tensor | None:
    """This step's boundaries on the GPU, moved the way `pretrain.trainer.Trainer._to_device` moves them."""
    if cu_host is None:
        return None
    from metala.ops.utils.chunk_plan import boundaries_to_device

    return boundaries_to_device(cu_host, torch.device("cuda"))


def options() -> dict:
    """The run's option globals, as handed to each row's process (`run_row_isolated`)."""
    return {"model_overrides": MODEL_OVERRIDES, "train_overrides": TRAIN_OVERRIDES, "ds_config": DS_CONFIG_CHANGES,
            "micro_batch": MICRO_BATCH["n"], "doc_len": DOC_LEN["n"]}


def set_options(opts: dict) -> None:
    MODEL_OVERRIDES.update(opts.get("model_overrides", {}))
    TRAIN_OVERRIDES.update(opts.get("train_overrides", {}))
    DS_CONFIG_CHANGES.update(opts.get("ds_config", {}))
    MICRO_BATCH["n"] = opts.get("micro_batch", 0)
    DOC_LEN["n"] = opts.get("doc_len", 0)


def micro_batch(B: int) -> int:
    n = MICRO_BATCH["n"] or B
    if B % n:
        raise SystemExit(f"--micro-batch {n} must divide the batch ({B} sequences)")
    return n


def train_config(preset: str, T: int, B: int, compile_: bool, activation_checkpointing: bool):
    from pretrain.config import config_from_dict

    return config_from_dict({
        "name": f"bench-{preset}",
        "model": {"preset": preset, "vocab_size": 32000, **MODEL_OVERRIDES},
        "data": {"dir": "unused", "seq_len": T},
        "optim": {"lr": 3e-4},
        "train": {"steps": 1000, "global_batch": B, "micro_batch": micro_batch(B), "out_dir": "unused", "precision": "bf16",
                  "zero_stage": 1, "compile": compile_, "activation_checkpointing": activation_checkpointing,
                  **TRAIN_OVERRIDES},
    })


def n_nonemb(model: torch.nn.Module, embed: torch.nn.Embedding, head_tied: bool) -> int:
    total = sum(p.numel() for p in model.parameters())
    return total - embed.weight.numel() + (embed.weight.numel() if head_tied else 0)


# --- models ---------------------------------------------------------------------------------------------------


def build_ours(preset: str, T: int, B: int, harness: str, compile_: bool, ac: bool):
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.trainer import build_training_model

    cfg = train_config(preset, T, B, compile_, ac)
    mcfg = cfg.model.build(vocab_size=32000)
    model, _ = build_training_model(cfg, mcfg, ParallelLayout(1, 0), torch.device("cuda"))
    n = n_nonemb(model, model.embed, True if mcfg.tie_embeddings else False)

    def loss_fn(m, ids, labels, cu):
        return m(ids, labels=labels, cu_seqlens=cu, return_logits=False).loss

    return model, n, loss_fn, cfg


def build_gla(preset: str):
    from fla.models import GLAConfig, GLAForCausalLM

    s = PEER_SIZES[preset]
    cfg = GLAConfig(hidden_size=s["d"], num_hidden_layers=s["layers"], num_heads=s["gla_heads"], expand_k=0.5,
                    expand_v=1, vocab_size=32000, fuse_cross_entropy=True, tie_word_embeddings=False)
    model = GLAForCausalLM(cfg).cuda()
    return model, n_nonemb(model, model.get_input_embeddings(), False), _hf_loss


def build_llama(preset: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = PEER_SIZES[preset]
    cfg = LlamaConfig(hidden_size=s["d"], num_hidden_layers=s["layers"], num_attention_heads=s["llama_heads"],
                      intermediate_size=s["llama_ffn"], vocab_size=32000, max_position_embeddings=16384,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).cuda()
    return model, n_nonemb(model, model.get_input_embeddings(), False), _hf_loss


def _hf_loss(m, ids, labels, cu):
    # HF models shift labels themselves: hand them the inputs as labels
    return m(input_ids=ids, labels=ids).loss


# --- harnesses ------------------------------------------------------------------------------------------------


def make_engine(model, harness: str, cfg=None):
    """(step_fn(loss_fn, batch) -> loss, model) for a harness."""
    from pretrain.optim import build_optimizer

    dev = torch.device("cuda")
    if harness == "plain":
        model = model.to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)

        def step(loss_fn, ids, labels, cu):
            n = micro_batch(ids.shape[0])
            for mb_ids, mb_labels in zip(ids.split(n), labels.split(n)):
                loss = loss_fn(model, mb_ids, mb_labels, cu)
                (loss if n == ids.shape[0] else loss * (n / ids.shape[0])).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step
    from pretrain.step_guard import initialize_with_guard
    from pretrain.trainer import deepspeed_config

    opt = build_optimizer(model, 3e-4, (0.9, 0.95), 1e-8, 0.1)
    ds_cfg = merge_sections(deepspeed_config(cfg, 1, "bf16"), DS_CONFIG_CHANGES)
    # with the trainer's own skip of non-finite updates and clipping (pretrain/step_guard.py)
    engine, _, guard = initialize_with_guard(model, opt, ds_cfg, dev, fused_master_step=cfg.train.fused_master_step)

    def step(loss_fn, ids, labels, cu):
        guard.new_step()
        # DeepSpeed accumulates (and scales by 1 / accumulation steps) until the last micro-batch's step
        n = micro_batch(ids.shape[0])
        for mb_ids, mb_labels in zip(ids.split(n), labels.split(n)):
            loss = loss_fn(engine, mb_ids, mb_labels, cu)
            guard.observe_loss(loss)
            engine.backward(loss)
            engine.step()
        # the trainer reads the guard's decision after each step (its bookkeeping of skipped steps): so does this
        guard.update_dropped  # noqa: B018
        return loss.detach()

    return step


def random_batch(B: int, T: int, vocab: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T + 1), device="cuda", generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def time_model(name: str, build, harness: str, B: int, T: int, cfg=None) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t_build = time.time()
    model, n, loss_fn, *_ = build()
    step = make_engine(model, harness, cfg)
    ids, labels = random_batch(B, T, 32000, seed=T)
    cu_host = run_boundaries(B, T)
    losses = []
    for _ in range(WARMUP):
        losses.append(step(loss_fn, ids, labels, step_boundaries(cu_host)))
    torch.cuda.synchronize()
    warm_s = time.time() - t_build
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(TIMED):
        losses.append(step(loss_fn, ids, labels, step_boundaries(cu_host)))
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / TIMED
    losses = [float(x) for x in losses]
    ok = all(math.isfinite(x) for x in losses) and abs(losses[0] - math.log(32000)) < 1.5
    tps = B * T / dt
    row = {"model": name, "harness": harness, "T": T, "B": B, "micro_batch": micro_batch(B),
           "documents_per_step": 0 if cu_host is None else len(cu_host) - 1, "tokens_per_step": B * T, "step_s": dt,
           "tokens_per_s": tps, "mfu": 6 * n * tps / H100_PEAK, "n_nonemb": n,
           "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
           # reserved - allocated is the caching allocator's slack (fragmentation); the setting that shapes it
           "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "loss_first": losses[0],
           "loss_last": losses[-1], "loss_ok": ok, "build_and_warmup_s": warm_s}
    print(f"{name:14s} {harness:7s} T={T:6d} B={B:3d}  {dt * 1e3:8.1f} ms  {tps / 1e3:7.1f}k tok/s  "
          f"MFU {100 * row['mfu']:5.1f}%  mem {row['peak_memory_gb']:5.1f} GB ({row['peak_reserved_gb']:.1f} reserved)  "
          f"loss {losses[0]:.3f}->{losses[-1]:.3f}"
          f"{'' if ok else '  LOSS CHECK FAILED'}", flush=True)
    del model, step
    torch.cuda.empty_cache()
    return row


# --- correctness gate -----------------------------------------------------------------------------------------


def gate(preset: str, compiled: bool = False) -> dict:
    """Triton path (with --model-overrides) vs the PyTorch chunked reference (self-augmentation as its own
    module), fp32, loss + every gradient, packed documents; with `compiled`, the Triton model also as
    `train.compile` runs it (pretrain.parallelize.apply_compile, Inductor) against itself eager."""
    from metala import MetaLAConfig, MetaLAForCausalLM

    T = 1024
    torch.backends.cuda.matmul.allow_tf32 = False
    ids, labels = random_batch(1, T, 32000, seed=1)
    cu = torch.tensor([0, 300, T], device="cuda", dtype=torch.int32)
    res = {}
    for backend in ("chunk", "triton") + (("compiled",) if compiled else ()):
        over = MODEL_OVERRIDES if backend != "chunk" else {"fuse_self_aug": False}
        cfg = MetaLAConfig.from_preset(preset, **{**over, "vocab_size": 32000, "n_layers": 2,
                                                  "attn_backend": "chunk" if backend == "chunk" else "triton"})
        m = MetaLAForCausalLM(cfg, seed=0).cuda()
        if backend == "compiled":
            from pretrain.parallelize import apply_compile

            # the budget and mode the timed rows get (--train-overrides), resolved by the trainer's own config (its
            # batch fields are those of a timed row at this T; only the compile fields are read)
            t = train_config(preset, T, TOKENS["n"] // T, True, False).train
            apply_compile(m, memory_budget=t.compile_memory_budget, mode=t.compile_mode, save=tuple(t.compile_save))
        with torch.no_grad():  # non-zero w_aug so the self-augmentation path is exercised
            gen = torch.Generator().manual_seed(0)
            for layer in m.layers:
                w = layer.mixer.self_aug.w_aug
                w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
        loss = m(ids, labels=labels, cu_seqlens=cu).loss
        loss.backward()
        res[backend] = (loss.detach(), {k: p.grad.detach().clone() for k, p in m.named_parameters()})
    (l0, g0), (l1, g1) = res["chunk"], res["triton"]
    errs = {k: float((g1[k] - g0[k]).norm() / g0[k].norm().clamp(min=1e-12)) for k in g0}
    worst = max(errs, key=errs.get)
    out = {"loss_ref": float(l0), "loss_triton": float(l1), "loss_rel_err": float(abs(l1 - l0) / abs(l0)),
           "worst_grad": worst, "worst_grad_rel_err": errs[worst]}
    out["correct"] = out["loss_rel_err"] < 0.02 and errs[worst] < 0.02
    if compiled:  # the same model and kernels: Inductor's fusions may only reorder fp32 arithmetic
        l2, g2 = res["compiled"]
        cerr = {k: float((g2[k] - g1[k]).norm() / g1[k].norm().clamp(min=1e-12)) for k in g1}
        cworst = max(cerr, key=cerr.get)
        out.update(compiled_loss_rel_err=float(abs(l2 - l1) / abs(l1)), compiled_worst_grad=cworst,
                   compiled_worst_grad_rel_err=cerr[cworst])
        out["correct"] &= out["compiled_loss_rel_err"] < 1e-4 and cerr[cworst] < 1e-3
    torch.backends.cuda.matmul.allow_tf32 = True
    print("gate:", json.dumps(out), flush=True)
    return out


# --- profile --------------------------------------------------------------------------------------------------


def busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(length of the union of [start, end) intervals, first start to last end); (0, 0) for none."""
    busy, cur_s, cur_e, last = 0.0, None, None, None
    for a, b in sorted(intervals):
        if cur_e is None or a > cur_e:
            busy += 0.0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
        last = b if last is None else max(last, b)
    if cur_e is None:
        return 0.0, 0.0
    return busy + cur_e - cur_s, last - min(intervals)[0]


def profile_ours(preset: str, T: int, B: int, compile_: bool, harness: str = "plain") -> dict:
    """One step under `harness`: CUDA time per kernel (top 40), and per PyTorch op and input shapes (top 40:
    which layer's add or copy a generic elementwise kernel is)."""
    from torch.profiler import ProfilerActivity, profile

    model, _, loss_fn, cfg = build_ours(preset, T, B, harness, compile_, False)
    step = make_engine(model, harness, cfg)
    ids, labels = random_batch(B, T, 32000, seed=T)
    cu_host = run_boundaries(B, T)
    for _ in range(2):
        step(loss_fn, ids, labels, step_boundaries(cu_host))
    torch.cuda.synchronize()
    # GPU-only first (little host overhead): the step's GPU idle time; then with host ops and shapes for attribution
    with profile(activities=[ProfilerActivity.CUDA]) as prof_gpu:
        step(loss_fn, ids, labels, step_boundaries(cu_host))
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step(loss_fn, ids, labels, step_boundaries(cu_host))
        torch.cuda.synchronize()

    def device_ms(e) -> float:
        return (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) / 1e3

    def is_kernel(e) -> bool:
        # GPU-side annotations ("## Call CompiledFxGraph ...", "Optimizer.step#...") span kernels: not kernels
        name = getattr(e, "key", None) or e.name
        return e.device_type == torch.autograd.DeviceType.CUDA and not name.startswith(("##", "Optimizer."))

    kernels, ops = [], []
    for e in prof.key_averages():
        if device_ms(e) > 0 and is_kernel(e):
            kernels.append({"op": e.key[:120], "cuda_ms": device_ms(e), "calls": e.count})
    for e in prof.key_averages(group_by_input_shape=True):
        # PyTorch ops that launched kernels (device time of their kernels; an op that calls others counts theirs)
        if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::") and device_ms(e) > 0:
            ops.append({"op": e.key, "shapes": str(e.input_shapes)[:160], "cuda_ms": device_ms(e), "calls": e.count})
    kernels.sort(key=lambda r: -r["cuda_ms"])
    ops.sort(key=lambda r: -r["cuda_ms"])
    total = sum(r["cuda_ms"] for r in kernels)
    # GPU idle inside the step: the span from the first kernel's start to the last one's end, less the union of
    # kernel intervals; and the host calls that wait for the GPU (each one drains the queue: a bubble after it)
    busy, span = busy_and_span([(e.time_range.start, e.time_range.end) for e in prof_gpu.events() if is_kernel(e)])
    busy, span_ms = busy / 1e3, span / 1e3
    sync_names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
                  "cudaMemcpy", "cudaMemcpyAsync")
    syncs = {e.key: e.count for e in prof.key_averages() if e.key in sync_names}
    gpu = {"span_ms": span_ms, "busy_ms": busy, "idle_ms": span_ms - busy, "host_waits": syncs}
    print(f"profile ({preset}, T={T}, {harness}): GPU busy {gpu['busy_ms']:.1f} of {span_ms:.1f} ms (idle {gpu['idle_ms']:.1f});"
          f" host waits {syncs}")
    print(f"profile ({preset}, T={T}, {harness}): {total:.1f} ms of kernels in one step; top kernels:")
    for r in kernels[:25]:
        print(f"  {r['cuda_ms']:8.2f} ms {r['calls']:5d}x  {r['op']}")
    print("  top PyTorch ops by input shapes:")
    for r in ops[:25]:
        print(f"  {r['cuda_ms']:8.2f} ms {r['calls']:5d}x  {r['op']} {r['shapes']}")
    del model, step
    torch.cuda.empty_cache()
    return {"kernel_ms_total": total, "gpu": gpu, "kernels": kernels[:40], "ops": ops[:40]}


ROW_TIMEOUT_S = 240


def run_row_isolated(spec: dict, timeout_s: float = ROW_TIMEOUT_S) -> dict:
    """One timed row in a fresh process: DeepSpeed engines and compiled graphs keep GPU memory alive otherwise."""
    import subprocess
    import sys

    spec = {**spec, **options()}
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--row", json.dumps(spec)],
                              capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"{spec['name']} {spec['harness']} T={spec['T']}: over {timeout_s:.0f} s (build, autotune or run); "
              "skipped", flush=True)
        return {"model": spec["name"], "harness": spec["harness"], "T": spec["T"], "timeout": True}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-1500:]
        oom = "OutOfMemoryError" in tail
        print(f"{spec['name']} {spec['harness']} T={spec['T']}: {'out of memory' if oom else 'failed'}\n"
              + ("" if oom else tail), flush=True)
        return {"model": spec["name"], "harness": spec["harness"], "T": spec["T"], "oom": oom, "failed": True}
    if spec.get("profile"):
        print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith(("profile", "  "))), flush=True)
    else:
        print(lines[-2][4:], flush=True)
    return json.loads(lines[-1][4:])


def row_main(spec: dict) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    preset, T, B, h = spec["preset"], spec["T"], spec["B"], spec["harness"]
    cfg = train_config(preset, T, B, spec.get("compile", False), spec.get("ac", False))
    if spec["kind"] == "ours":
        build = lambda: build_ours(preset, T, B, h, spec.get("compile", False), spec.get("ac", False))  # noqa: E731
    else:
        build = lambda: {"gla": build_gla, "llama": build_llama}[spec["kind"]](preset)  # noqa: E731
    if spec.get("profile"):
        print("ROW " + json.dumps(profile_ours(preset, T, B, spec.get("compile", False), h)))
        return
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        row = time_model(spec["name"], build, h, B, T, cfg)
    print("ROW " + buf.getvalue().strip().splitlines()[-1])
    print("ROW " + json.dumps(row))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="360m,1.3b")
    ap.add_argument("--seqlens", default="2048,8192,16384")
    ap.add_argument("--peers", default="gla,llama", help="comma list of gla, llama (skipped if not importable)")
    ap.add_argument("--peer-presets", default="360m", help="peers run at these sizes only")
    ap.add_argument("--harness", default="trainer,plain")
    ap.add_argument("--peer-harness", default="plain,trainer", help="harnesses the peers run under")
    ap.add_argument("--compile", action="store_true", help="also time ours with train.compile=true")
    ap.add_argument("--no-eager", action="store_true", help="time ours only in the --compile / --ac variants")
    ap.add_argument("--ac", action="store_true", help="also time ours with activation checkpointing")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only-profile", action="store_true", help="profiles (and the gate) without the timed rows")
    ap.add_argument("--row-timeout", type=float, default=ROW_TIMEOUT_S,
                    help="seconds one row may take, including compile and autotuning (default %(default)s)")
    ap.add_argument("--model-overrides", default="{}", type=json.loads,
                    help='JSON of MetaLAConfig fields for our rows, e.g. \'{"fuse_self_aug": false}\'')
    ap.add_argument("--train-overrides", default="{}", type=json.loads,
                    help='JSON of the train section for our rows, e.g. \'{"compile_memory_budget": 0.9}\'')
    ap.add_argument("--ds-config", default="{}", type=json.loads,
                    help='JSON merged into the trainer harness\'s DeepSpeed config, e.g. \'{"bf16": {"check_grad_overflow": true}}\'')
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="sequences per forward/backward, accumulated to the full batch (default: all at once)")
    ap.add_argument("--tokens-per-step", type=int, default=TOKENS["n"],
                    help="tokens per optimizer step (B = this / T); with --micro-batch, accumulated micro-batches")
    ap.add_argument("--doc-len", type=int, default=0,
                    help="pack documents of this mean length (tokens) into each step's batch, with cu_seqlens as the "
                         "trainer passes them (default: no boundaries)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        spec = json.loads(args.row)
        set_options(spec)
        row_main(spec)
        return 0
    set_options({"model_overrides": args.model_overrides, "train_overrides": args.train_overrides,
                 "ds_config": args.ds_config, "micro_batch": args.micro_batch, "doc_len": args.doc_len})
    TOKENS["n"] = args.tokens_per_step
    if args.tokens_per_step < 1 or any(args.tokens_per_step % T for T in map(int, args.seqlens.split(","))):
        raise SystemExit(f"--tokens-per-step {args.tokens_per_step} must be a positive multiple of every --seqlens")
    if args.doc_len and args.micro_batch:
        raise SystemExit("--doc-len and --micro-batch together are not supported (boundaries span the whole batch)")
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name()
    result = {"bench": "train_throughput", "gpu": gpu, "torch": torch.__version__,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tokens_per_step": TOKENS["n"],
              "peak_flops": H100_PEAK, "model_overrides": MODEL_OVERRIDES, "train_overrides": TRAIN_OVERRIDES,
              "ds_config_changes": DS_CONFIG_CHANGES, "micro_batch": MICRO_BATCH["n"], "doc_len": DOC_LEN["n"], "gates": {}, "rows": [], "profiles": {}}
    # the operator's launch configuration (METALA_TRITON_CONFIG reaches the row processes through the environment)
    from metala.ops.metala.chunk import CONFIG

    result["kernel_config"] = CONFIG
    # Inductor and operator settings given by environment variable (they reach the row processes the same way)
    result["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("TORCHINDUCTOR_", "METALA_"))
                     and k != "TORCHINDUCTOR_CACHE_DIR"}
    all_ok = True
    path = result_path(args.out, gpu_tag(gpu), "train_throughput", args.tag)

    def save():  # after every row, so a cut-off run keeps what it measured
        path.write_text(json.dumps(result, indent=2))

    peers = [p for p in args.peers.split(",") if p]
    harnesses = args.harness.split(",")
    for preset in args.presets.split(","):
        g = gate(preset, compiled=args.compile)
        result["gates"][preset] = g
        all_ok &= g["correct"]
        for T in map(int, args.seqlens.split(",")):
            B = TOKENS["n"] // T
            variants = ([] if args.no_eager else [(False, False)]) + ([(True, False)] if args.compile else []) + ([(False, True)] if args.ac else [])
            for h in ([] if args.only_profile else harnesses):
                for comp, ac in variants:
                    if not g["correct"]:
                        continue
                    name = f"metala-{preset}" + ("+compile" if comp else "") + ("+ac" if ac else "")
                    row = run_row_isolated({"kind": "ours", "name": name, "preset": preset, "T": T, "B": B,
                                            "harness": h, "compile": comp, "ac": ac}, args.row_timeout)
                    result["rows"].append(row)
                    save()
                    all_ok &= row.get("loss_ok", True)
                if preset not in args.peer_presets.split(",") or h not in args.peer_harness.split(","):
                    continue
                for peer in peers:
                    if importlib.util.find_spec({"gla": "fla", "llama": "transformers"}[peer]) is None:
                        print(f"{peer}: not importable; skipped", flush=True)
                        continue
                    result["rows"].append(run_row_isolated({"kind": peer, "name": f"{peer}-{preset}",
                                                            "preset": preset, "T": T, "B": B, "harness": h},
                                                           args.row_timeout))
                    save()
            if (args.profile or args.only_profile) and T == int(args.seqlens.split(",")[0]):
                # one profile per harness asked for (the plain one keeps the key it always had), per variant timed
                for h in harnesses:
                    for comp in ([] if args.no_eager else [False]) + ([True] if args.compile else []):
                        key = f"{preset}-T{T}" + ("-compile" if comp else "") + ("" if h == "plain" else f"-{h}")
                        result["profiles"][key] = run_row_isolated(
                            {"kind": "ours", "name": "profile", "preset": preset, "T": T, "B": B, "harness": h,
                             "compile": comp, "profile": True}, args.row_timeout)
                        save()
    save()
    print(f"wrote {path}; all correct: {all_ok}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
