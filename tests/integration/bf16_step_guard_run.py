"""One CPU process: DeepSpeed ZeRO-1 in bf16 with the trainer's DeepSpeed config (its own overflow check off) and
the trainer's non-finite step guard. Prints one JSON line of what each step did (tests/integration/test_step_guard.py)."""

from __future__ import annotations

import json
import sys

import torch

from metala import MetaLAConfig, MetaLAForCausalLM
from pretrain.config import config_from_dict
from pretrain.distributed import init_distributed, shutdown_distributed
from pretrain.optim import build_optimizer
from pretrain.step_guard import initialize_with_guard
from pretrain.trainer import deepspeed_config


def run(device: torch.device) -> dict:
    cfg = config_from_dict({
        "name": "guard", "model": {"preset": "tiny"}, "data": {"dir": "unused", "seq_len": 32}, "optim": {"lr": 1e-3},
        "train": {"steps": 10, "global_batch": 2, "micro_batch": 2, "out_dir": "unused", "zero_stage": 1},
    })
    torch.manual_seed(0)
    model = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", attn_backend="chunk")).to(torch.bfloat16)
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1, device)
    engine, _, guard = initialize_with_guard(model, opt, deepspeed_config(cfg, 1, "bf16"), device)
    ids = torch.randint(0, 512, (2, 32))
    labels = torch.randint(0, 512, (2, 32))
    probe = engine.module.layers[0].mixer.q_proj.weight
    # every norm DeepSpeed asks for, from the fused swap (pretrain/grad_norm.py) and from its own per-tensor code on
    # the very same gradients
    norms = []
    fused = engine.optimizer.get_grad_norm_direct

    def both_norms(gradients, params, norm_type=2):
        ours = fused(gradients, params, norm_type)
        norms.append((float(ours), float(engine.optimizer._per_tensor_grad_norm_direct(gradients, params, norm_type))))
        return ours

    engine.optimizer.get_grad_norm_direct = both_norms

    def step(fault: str | None) -> dict:
        before = [p.detach().clone() for p in engine.module.parameters()]
        guard.new_step()
        hook = probe.register_hook(lambda g: g * float("inf")) if fault == "inf_grad" else None
        loss = engine(ids, labels=labels, return_logits=False).loss
        if fault == "nan_loss":
            loss = loss * float("nan")
        guard.observe_loss(loss)
        engine.backward(loss)
        engine.step()
        if hook is not None:
            hook.remove()
        changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, engine.module.parameters()))
        finite = all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())
        adam_steps = sorted({int(s["step"]) for s in opt.state.values() if "step" in s})
        step_norms, norms[:] = list(norms), []
        return {"fault": fault, "skipped": guard.update_dropped, "changed": changed, "finite": finite,
                "adam_steps": adam_steps, "norms": step_norms}

    steps = [step(f) for f in (None, "nan_loss", "inf_grad", None)]
    return {"check_grad_overflow": engine.optimizer.check_grad_overflow,
            "optimizer": type(engine.optimizer).__name__, "steps": steps}


def main() -> None:
    device, _, _ = init_distributed()
    # the engine and its groups go out of scope with run(), before the groups are destroyed
    print("RESULT " + json.dumps(run(device)), flush=True)
    shutdown_distributed(True)


if __name__ == "__main__":
    sys.exit(main())
