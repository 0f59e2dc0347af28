"""One CPU process: DeepSpeed ZeRO-1 in bf16 with the trainer's DeepSpeed config (its own overflow check off) and
the trainer's non-finite step guard. Prints one JSON line of what each step did, and one of the clipping comparison
(tests/integration/test_step_guard.py)."""

from __future__ import annotations

import copy
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metala import MetaLAConfig, MetaLAForCausalLM
from metala.ops.metala.api import triton_usable
from pretrain.config import config_from_dict
from pretrain.distributed import init_distributed, shutdown_distributed
from pretrain.grad_norm import use_fused_grad_norm
from pretrain.optim import build_optimizer, param_groups
from pretrain.step_guard import NonFiniteStepGuard, initialize_with_guard
from pretrain.trainer import deepspeed_config


class DeviceWaits:
    """Counts what waits for the GPU on a CUDA device, in code that runs here on the CPU: reads of tensor values by
    the host (`bool(t)`, `t.item()`, `t.tolist()`), tensors made from host data on a device (`torch.tensor(x,
    device=...)`: a copy from pageable memory, in stream order), `masked_fill_` with a tensor value (CUDA reads it on
    the host) and DeepSpeed's accelerator `synchronize` (its throughput timer's, unless the config turns it off)."""

    # > 0 while the test's own instrumentation runs (DeepSpeed's per-tensor norm, computed for comparison)
    paused = 0

    def __init__(self):
        self.count = 0
        self._saved = []

    def _count_calls(self, owner, name, when=lambda *a, **k: True):
        original = getattr(owner, name)
        self._saved.append((owner, name, original))

        def counted(*a, **k):
            if not DeviceWaits.paused and when(*a, **k):
                self.count += 1
            return original(*a, **k)

        setattr(owner, name, counted)

    def __enter__(self):
        from deepspeed.accelerator import get_accelerator

        for name in ("__bool__", "item", "tolist"):
            self._count_calls(torch.Tensor, name)
        self._count_calls(torch, "tensor", lambda *a, **k: k.get("device") is not None)
        self._count_calls(torch.Tensor, "masked_fill_",
                          lambda t, mask, value=None, **k: isinstance(k.get("value", value), torch.Tensor))
        self._count_calls(get_accelerator(), "synchronize")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


def ds_config(grad_clip: float, accumulate: int = 1, zero_stage: int = 1) -> dict:
    """The trainer's DeepSpeed config for this tiny run: ZeRO-1 (or `zero_stage`), bf16, micro-batches of 2."""
    cfg = config_from_dict({
        "name": "guard", "model": {"preset": "tiny"}, "data": {"dir": "unused", "seq_len": 32},
        "optim": {"lr": 1e-3, "grad_clip": grad_clip},
        "train": {"steps": 10, "global_batch": 2 * accumulate, "micro_batch": 2, "out_dir": "unused",
                  "zero_stage": zero_stage},
    })
    return deepspeed_config(cfg, 1, "bf16")


def adamw(model: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    """The trainer's optimizer (fused: the guard's skip and clip then happen on the device), or a plain AdamW."""
    if fused:
        return build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)


def run(device: torch.device, fused_adamw: bool) -> dict:
    torch.manual_seed(0)
    model = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", attn_backend="chunk")).to(torch.bfloat16)
    opt = adamw(model, fused_adamw)
    engine, _, guard = initialize_with_guard(model, opt, ds_config(1.0), device)
    ids = torch.randint(0, 512, (2, 32))
    labels = torch.randint(0, 512, (2, 32))
    probe = engine.module.layers[0].mixer.q_proj.weight
    # every norm DeepSpeed asks for, from the fused swap (pretrain/grad_norm.py) and from its own per-tensor code on
    # the very same gradients
    norms = []
    fused = engine.optimizer.get_grad_norm_direct

    def both_norms(gradients, params, norm_type=2):
        ours = fused(gradients, params, norm_type)
        DeviceWaits.paused += 1
        try:
            theirs = engine.optimizer._per_tensor_grad_norm_direct(gradients, params, norm_type)
            norms.append((float(ours), float(theirs)))
        finally:
            DeviceWaits.paused -= 1
        return ours

    engine.optimizer.get_grad_norm_direct = both_norms

    def state() -> list[torch.Tensor]:
        # the bf16 weights, DeepSpeed's fp32 masters and the Adam moments
        moments = [v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
        return [t.detach().clone() for t in (*engine.module.parameters(),
                                             *engine.optimizer.single_partition_of_fp32_groups, *moments)]

    def step(fault: str | None) -> dict:
        before = state()
        guard.new_step()
        hook = probe.register_hook(lambda g: g * float("inf")) if fault == "inf_grad" else None
        loss = engine(ids, labels=labels, return_logits=False).loss
        if fault == "nan_loss":
            loss = loss * float("nan")
        guard.observe_loss(loss)
        engine.backward(loss)
        with DeviceWaits() as waits:
            engine.step()
        if hook is not None:
            hook.remove()
        after = state()
        changed = len(after) != len(before) or any(not torch.equal(a, b) for a, b in zip(before, after))
        finite = all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())
        adam_steps = sorted({int(s["step"]) for s in opt.state.values() if "step" in s})
        step_norms, norms[:] = list(norms), []
        return {"fault": fault, "skipped": guard.update_dropped, "changed": changed, "finite": finite,
                "adam_steps": adam_steps, "norms": step_norms, "device_waits": waits.count}

    steps = [step(f) for f in (None, "nan_loss", "inf_grad", None)]
    return {"check_grad_overflow": engine.optimizer.check_grad_overflow,
            "optimizer": type(engine.optimizer).__name__, "steps": steps}


def clipping(device: torch.device) -> dict:
    """Three engines from the same weights on the same batches, clipping active (max norm 0.5): DeepSpeed clipping
    as it comes, and the guard's take-over with a plain and with a fused AdamW. Their weights after three steps, and
    what waits for the device in each `engine.step()`."""
    import deepspeed

    config = ds_config(0.5)
    torch.manual_seed(0)
    init = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", attn_backend="chunk")).to(torch.bfloat16)
    batches = [(torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))) for _ in range(3)]
    out = {}
    # "unclipped": the guard with clipping off, the yardstick of how far a wrong update lands after three steps
    for name in ("deepspeed", "guard", "guard_fused", "unclipped"):
        model = copy.deepcopy(init)
        opt = adamw(model, fused=name == "guard_fused")
        if name == "unclipped":
            engine, _, guard = initialize_with_guard(model, opt, ds_config(0.0), device)
        elif name == "deepspeed":
            guard = NonFiniteStepGuard(opt, device)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            guard.attach(engine.optimizer)
            use_fused_grad_norm(engine.optimizer)
        else:
            engine, _, guard = initialize_with_guard(model, opt, config, device)
        waits, norms = [], []
        start = torch.cat([g.detach().flatten().clone() for g in engine.optimizer.single_partition_of_fp32_groups])
        for ids, labels in batches:
            guard.new_step()
            loss = engine(ids, labels=labels, return_logits=False).loss
            guard.observe_loss(loss)
            engine.backward(loss)
            with DeviceWaits() as dw:
                engine.step()
            waits.append(dw.count)
            norms.append(float(engine.optimizer._global_grad_norm))
        # the fp32 master weights (DeepSpeed's flat partitions), finer than the bf16 copies the model holds
        masters = torch.cat([g.detach().flatten() for g in engine.optimizer.single_partition_of_fp32_groups])
        out[name] = {"clip_in_guard": guard.clip, "deepspeed_clip": engine.optimizer.clip_grad, "device_waits": waits,
                     "norms": norms, "masters": masters, "change": float((masters - start).abs().max())}
    ref = out["deepspeed"].pop("masters")
    for name in ("guard", "guard_fused", "unclipped"):
        w = out[name].pop("masters")
        out[name]["max_master_diff"] = float((w - ref).abs().max())
    return out


class CountOps(TorchDispatchMode):
    """Counts the torch ops (as dispatched, below autograd) for which `counts(func, outputs)` holds."""

    def __init__(self, counts):
        super().__init__()
        self.counts, self.count = counts, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += bool(self.counts(func, out if isinstance(out, (tuple, list)) else (out,)))
        return out


def partition_sized(numel: int) -> CountOps:
    """Ops that allocate a floating tensor of at least `numel` elements (new memory only: no in-place op's result,
    no view). DeepSpeed's step makes two per parameter group and step: the flat bf16 gradient partition (copied
    from its reduction buffer) and its fp32 cast; the fused master step's kernel none (it reads a view of it)."""
    return CountOps(lambda func, outs: not func._schema.name.endswith("_") and not func.is_view and any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= numel for t in outs))


def master_step(device: torch.device) -> dict:
    """DeepSpeed's ZeRO-1 step against the fused master step (pretrain/zero_step.py) from the same weights on the
    same batches, clipping active; the fused step with its naive twin (the CPU default) and with its Triton kernel
    (the GPU's; here under the interpreter, when it is on). Per run: which step method ran, the
    partition-sized tensors allocated and the waits for the device in each `engine.step()`, and the fp32 masters, Adam state
    and bf16 weights after the first and the last of three steps."""
    config = ds_config(0.5)
    torch.manual_seed(0)
    init = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", attn_backend="chunk")).to(torch.bfloat16)
    batches = [(torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))) for _ in range(3)]
    variants = {"deepspeed": (False, "auto"), "fused": (True, "auto")}
    if triton_usable(device):
        variants["fused_kernel"] = (True, "triton")
    runs = {}
    for name, (fused, backend) in variants.items():
        model = copy.deepcopy(init)
        opt = adamw(model, fused=True)
        opt.backend = backend
        engine, _, guard = initialize_with_guard(model, opt, config, device, fused_master_step=fused)
        z = engine.optimizer
        smallest = min(t.numel() for t in z.single_partition_of_fp32_groups)
        run = {"step_method": z.step.__func__.__name__, "partition_copies": [], "device_waits": [], "after": []}
        for ids, labels in batches:
            guard.new_step()
            loss = engine(ids, labels=labels, return_logits=False).loss
            guard.observe_loss(loss)
            engine.backward(loss)
            with partition_sized(smallest) as made, DeviceWaits() as dw:
                engine.step()
            run["partition_copies"].append(made.count)
            run["device_waits"].append(dw.count)
            assert not guard.update_dropped
            run["after"].append({
                "masters": torch.cat([g.detach().flatten() for g in z.single_partition_of_fp32_groups]),
                "moments": torch.cat([st[k].flatten() for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]),
                "weights": torch.cat([p.detach().flatten().float() for p in engine.module.parameters()]),
                # each group's bf16 partition against its fp32 master (rounded to nearest: <= 2^-8 relative;
                # Triton's CPU interpreter truncates: < 2^-7)
                "lp_rel_diff": max(float(((lp[0].float() - m) / m.abs().clamp_min(1e-30)).abs().max())
                                   for lp, m in zip(z.parallel_partitioned_bit16_groups, z.single_partition_of_fp32_groups)),
                "steps": sorted(float(st["step"]) for st in opt.state.values())})
        runs[name] = run
    ref = runs["deepspeed"]["after"]
    start = torch.cat([p.detach().flatten().float() for p in init.parameters()])
    out = {}
    for name, run in runs.items():
        after = run.pop("after")
        run["steps"] = after[-1]["steps"]
        run["lp_rel_diff"] = max(a["lp_rel_diff"] for a in after)
        run["change"] = float((after[-1]["weights"] - start).abs().max())
        for i in (0, len(after) - 1):
            run[f"step{i + 1}"] = {key: float((after[i][key] - ref[i][key]).abs().max())
                                   for key in ("masters", "moments", "weights")}
        out[name] = run
    return out


def division(device: torch.device) -> dict:
    """The trainer's engine over a reduction world of one, with DeepSpeed's averaging division (by 1.0) skipped
    (`pretrain.zero_step.skip_division_by_one`) and put back: in-place divisions per backward + step, and the fp32
    masters after two steps."""
    torch.manual_seed(0)
    init = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", attn_backend="chunk")).to(torch.bfloat16)
    batches = [(torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))) for _ in range(2)]
    out = {}
    for name in ("skipped", "deepspeed"):
        model = copy.deepcopy(init)
        engine, _, guard = initialize_with_guard(model, adamw(model, fused=True), ds_config(0.5), device)
        skipped = not engine.optimizer.gradient_average
        if name == "deepspeed":
            engine.optimizer.gradient_average = True
        divisions = []
        for ids, labels in batches:
            guard.new_step()
            loss = engine(ids, labels=labels, return_logits=False).loss
            guard.observe_loss(loss)
            with CountOps(lambda func, outs: func._schema.name == "aten::div_") as div:
                engine.backward(loss)
                engine.step()
            divisions.append(div.count)
        masters = torch.cat([g.detach().flatten() for g in engine.optimizer.single_partition_of_fp32_groups])
        out[name] = {"skip_applied": skipped, "divisions": divisions, "masters": masters}
    ref = out["deepspeed"].pop("masters")
    out["skipped"]["masters_equal"] = bool(torch.equal(out["skipped"].pop("masters"), ref))
    return out


def gradient_copies(device: torch.device) -> dict:
    """The trainer's engine over a data-parallel world of one with each gradient copied once into the partition
    buffer (`pretrain.zero_step.copy_gradients_once`) and with DeepSpeed's two copies (bucket, then partition buffer)
    put back; ZeRO-1 with one and with two micro-batches a step, and ZeRO-2 (where it must not apply). Per run:
    whether it applied, the gradient-sized copies in each backward + step, and the fp32 masters after two steps."""
    torch.manual_seed(0)
    init = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", attn_backend="chunk")).to(torch.bfloat16)
    sizes = {p.numel() for p in init.parameters()}
    out = {}
    for accumulate, stage in ((1, 1), (2, 1), (1, 2)):
        batches = [(torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))) for _ in range(2 * accumulate)]
        runs = {}
        for name in ("once", "deepspeed"):
            model = copy.deepcopy(init)
            engine, _, guard = initialize_with_guard(model, adamw(model, fused=True), ds_config(0.5, accumulate, stage),
                                                     device)
            z = engine.optimizer
            applied = "reduce_independent_p_g_buckets_and_remove_grads" in vars(z)
            if name == "deepspeed" and applied:
                del z.reduce_independent_p_g_buckets_and_remove_grads  # the class's method again
                z.reduce_bucket_size = engine.zero_reduce_bucket_size()
            start = torch.cat([g.detach().flatten().clone() for g in z.single_partition_of_fp32_groups])
            # the reduction buckets DeepSpeed allocates at the first gradient of each backward and releases at its end
            buckets = []

            def setup_buckets(z=z, own=z.setup_buckets):
                own()
                buckets.extend(b.numel() for k in z.ipg_buckets.values() for b in k.buffer)

            z.setup_buckets = setup_buckets
            copies = []
            for step in range(2):
                guard.new_step()
                with CountOps(lambda func, outs: func._schema.name == "aten::copy_"
                              and outs[0].dim() == 1 and outs[0].numel() in sizes) as count:
                    for ids, labels in batches[step * accumulate:(step + 1) * accumulate]:
                        loss = engine(ids, labels=labels, return_logits=False).loss
                        guard.observe_loss(loss)
                        engine.backward(loss)
                        engine.step()
                copies.append(count.count)
            masters = torch.cat([g.detach().flatten() for g in z.single_partition_of_fp32_groups])
            runs[name] = {"applied": applied, "copies": copies, "masters": masters, "bucket": max(buckets, default=0),
                          "change": float((masters - start).abs().max())}
        ref = runs["deepspeed"].pop("masters")
        runs["once"]["masters_equal"] = bool(torch.equal(runs["once"].pop("masters"), ref))
        out[f"gas{accumulate}_zero{stage}"] = runs
    return out


def main() -> None:
    device, _, _ = init_distributed()
    # the engine and its groups go out of scope with run(), before the groups are destroyed
    print("RESULT " + json.dumps({"plain": run(device, False), "fused": run(device, True)}), flush=True)
    print("CLIPPING " + json.dumps(clipping(device)), flush=True)
    print("MASTER " + json.dumps(master_step(device)), flush=True)
    print("DIVISION " + json.dumps(division(device)), flush=True)
    print("COPIES " + json.dumps(gradient_copies(device)), flush=True)
    shutdown_distributed(True)


if __name__ == "__main__":
    sys.exit(main())
