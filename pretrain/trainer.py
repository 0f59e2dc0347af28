"""The training loop: DeepSpeed ZeRO engine, packed data, logging, validation, checkpoints and resume."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from metala import MetaLAConfig, MetaLAForCausalLM
from metala.ops.utils.chunk_plan import boundaries_to_device, host_to_device
from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError, TrainConfig, describe_micro_batch, rank_micro_batch
from pretrain.data import DataError, PackedDataset, PackedLoader, iter_eval_batches, load_manifest
from pretrain.distributed import all_ranks_ok, comm_device, init_distributed, reduce_mean, reduce_sum
from pretrain.faults import kill_point, oom_point, poison_loss
from pretrain.metrics import MultiSink, NullSink, build_sinks
from pretrain.optim import build_optimizer, build_scheduler, lr_multiplier
from pretrain.parallel.layout import ParallelLayout
from pretrain.parallelize import parallelize
from pretrain.step_guard import initialize_with_guard

log = logging.getLogger(__name__)

# dense bf16 peak per GPU for MFU, by device-name substring
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def pad_vocab(n: int, multiple: int = 128) -> int:
    return multiple * math.ceil(n / multiple)


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ConfigError(f"train.precision={precision} needs a GPU; use fp32 (or auto) on CPU")
    return precision


def deepspeed_config(cfg: TrainConfig, dp: int, precision: str) -> dict:
    t, o = cfg.train, cfg.optim
    micro = rank_micro_batch(t, dp)
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.global_batch // (dp * micro),
        # under ZeRO-1/2 the step guard applies this clip on the device in DeepSpeed's place
        # (`NonFiniteStepGuard.take_over_clipping`); DeepSpeed still computes the norm that it reads
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # DeepSpeed's own bf16 overflow check runs ~35 small ops per parameter tensor every step (at 360M its optimizer
        # step issues 9.6k ops with it, 1.6k without: `python -m bench.trainer_ops`): the trainer's guard
        # (`pretrain/step_guard.py`) already drops the update of every group when the loss or DeepSpeed's global
        # gradient norm is non-finite on any rank
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default, and unread: the trainer times its own steps) synchronises the
        # device at the start of every forward and the end of every step, so the GPU drained its queue and waited
        # for the host to launch the next forward each step
        "timers": {"throughput": {"enabled": False}},
    }


def build_training_model(cfg: TrainConfig, model_config: MetaLAConfig, layout: ParallelLayout,
                         device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The model exactly as the trainer runs it: built on meta, initialised, then TP -> SP -> checkpointing ->
    compile (pretrain/parallelize.py). `bench/train_throughput.py` times this same path."""
    init_device = device if cfg.parallel.tp == 1 else torch.device("cpu")
    with torch.device("meta"):
        model = MetaLAForCausalLM(model_config)
    # tensor-parallel shards are slices of the full initial matrices: build those first (on the host)
    model.to_empty(device=init_device)
    model.init_weights(seed=cfg.train.seed)
    # token ids were range-checked against the vocabulary when the data was made (manifest), not per step
    model.validate_inputs = False
    model, sp = parallelize(model, cfg, layout)
    model.to(device)
    return model, sp


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good state was saved."""


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device, self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        t = cfg.train
        try:
            self.layout = ParallelLayout(self.world, self.rank, tp=cfg.parallel.tp, sp=cfg.parallel.sp)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.precision = resolve_precision(t.precision, self.device)
        self.out_dir = Path(t.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        ckpt.seed_everything(t.seed * 100_003 + self.rank)

        def setup_data():
            tok = cfg.data.tokenizer or None
            # one full checksum pass per node is enough; the other ranks check sizes
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            verify = cfg.data.verify if local_rank == 0 else "size"
            train = PackedDataset(cfg.data.dir, "train", cfg.data.seq_len, seed=cfg.data.seed, tokenizer=tok,
                                  verify=verify)
            manifest = load_manifest(cfg.data.dir)
            val = None
            if manifest["splits"]["val"]["tokens"] > cfg.data.seq_len:
                val = PackedDataset(cfg.data.dir, "val", cfg.data.seq_len, shuffle=False, verify=verify)
            return train, val, manifest

        self.train_data, self.val_data, self.manifest = all_ranks_ok(setup_data, "data set-up")
        vocab = pad_vocab(self.train_data.info.vocab_size)
        self.model_config: MetaLAConfig = cfg.model.build(vocab_size=vocab)
        if self.model_config.vocab_size < self.train_data.info.vocab_size:
            raise ConfigError(f"model.vocab_size={self.model_config.vocab_size} is smaller than the tokenizer's "
                              f"{self.train_data.info.vocab_size}")
        model, self.sp = build_training_model(cfg, self.model_config, self.layout, self.device)
        self.model = model
        warmup = cfg.warmup_steps()
        self.warmup = warmup
        optimizer = build_optimizer(model, cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.eps,
                                    cfg.optim.weight_decay)
        scheduler = build_scheduler(optimizer, warmup, t.steps, cfg.optim.min_lr_ratio)
        self.base_optimizer = optimizer
        ds_cfg = deepspeed_config(cfg, self.layout.dp, self.precision)
        self.resume_from = self._plan_resume()
        if self.resume_from is not None and self.resume_from["universal"]:
            # a new layout: DeepSpeed's universal checkpoint re-partitions the fp32 masters and Adam moments
            ds_cfg["checkpoint"] = {"load_universal": True}
        mpu = self.layout if (cfg.parallel.tp > 1 or cfg.parallel.sp > 1) else None
        self.engine, self.scheduler, self.guard = initialize_with_guard(
            model, optimizer, ds_cfg, self.device, stop_flag=lambda: self._stop_signal is not None,
            fused_master_step=t.fused_master_step, lr_scheduler=scheduler, mpu=mpu)
        self.micro_batch = ds_cfg["train_micro_batch_size_per_gpu"]  # rank_micro_batch, as DeepSpeed runs it
        self.loader = PackedLoader(self.train_data, t.global_batch, self.micro_batch, self.layout.coords.dp,
                                   self.layout.dp, doc_reset=self.model_config.doc_reset,
                                   mask_eos_label=cfg.data.mask_eos_label)
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.tokens_per_step = t.global_batch * cfg.data.seq_len
        self._stop_signal: int | None = None
        self.sinks: MultiSink | NullSink = NullSink()
        self._previous_handlers: dict[int, object] = {}
        self.peak_flops = t.peak_flops or self._device_peak_flops()
        self.git_sha = git_sha()

    def _device_peak_flops(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)

    def print0(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def _trainer_state(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "data": self.loader.state_dict(),
                "world_size": self.world, "layout": {"dp": self.layout.dp, "sp": self.layout.sp, "tp": self.layout.tp}}

    def _client_state(self) -> dict:
        return {**self._trainer_state(), "config": self.cfg.to_dict(), "model_config": self.model_config.to_dict(),
                "git_sha": self.git_sha,
                "universal_checkpoint_info": ckpt.universal_checkpoint_info(
                    self.model_config.vocab_size, [n for n, _ in self.model.named_parameters()])}

    def save(self) -> Path:
        tok_file = Path(self.manifest["tokenizer"]["file"])
        extra = {"model_config.json": json.dumps(self.model_config.to_dict(), indent=2).encode(),
                 "train_config.yaml": yaml.safe_dump(self.cfg.to_dict(), sort_keys=False).encode(),
                 "trainer_state.json": json.dumps(self._trainer_state(), indent=2).encode()}
        if tok_file.is_file():
            extra["tokenizer.model"] = tok_file.read_bytes()
        manifest_extra = {"world_size": self.world, "layout": {"dp": self.layout.dp, "sp": self.layout.sp,
                          "tp": self.layout.tp}, "zero_stage": self.cfg.train.zero_stage,
                          "consumed_samples": self.loader.consumed_samples,
                          "tokens": self.loader.consumed_samples * self.cfg.data.seq_len,
                          "git_sha": self.git_sha, "config": self.cfg.to_dict()}
        path = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.step, self._client_state(), manifest_extra,
                                    extra, self.cfg.train.keep_last)
        self.print0(f"saved checkpoint {path}")
        return path

    def _resume_source(self) -> tuple[Path, str] | None:
        mode = self.cfg.train.resume
        if mode == "none":
            if ckpt.list_tags(self.ckpt_dir):
                raise ConfigError(f"{self.ckpt_dir} already holds checkpoints; set train.resume=auto to continue "
                                  "that run, or choose another train.out_dir")
            return None
        src = self.ckpt_dir if mode == "auto" else Path(mode)
        if ckpt.TAG_RE.match(src.name):
            src, tag = src.parent, src.name
            problem = ckpt.check_checkpoint(src / tag)
            if problem:
                raise ConfigError(f"train.resume: {problem}")
            return src, tag
        tag, warnings = ckpt.find_resumable(src)
        for w in warnings:
            log.warning(w)
            self.print0(f"WARNING {w}")
        if tag is None:
            if mode != "auto":
                raise ConfigError(f"train.resume={mode}: no complete checkpoint there")
            return None
        return src, tag

    def _plan_resume(self) -> dict | None:
        """Rank 0 picks the checkpoint (and converts it when the layout changed); every rank gets the plan."""
        def decide() -> dict | None:
            found = self._resume_source()
            if found is None:
                return None
            src, tag = found
            manifest = ckpt.read_manifest(src / tag) or {}
            saved_model = manifest.get("config", {}).get("model")
            mine = self.cfg.to_dict()["model"]
            if saved_model is not None and saved_model != mine:
                diff = {k: (saved_model.get(k), mine.get(k)) for k in set(saved_model) | set(mine)
                        if saved_model.get(k) != mine.get(k)}
                raise ConfigError(f"the checkpoint {src / tag} has a different model: {diff} (saved, now)")
            layout = {"dp": self.layout.dp, "sp": self.layout.sp, "tp": self.layout.tp}
            universal = manifest.get("world_size") != self.world or manifest.get("layout") != layout
            if universal and manifest.get("zero_stage") == 3 and self.layout.tp > 1:
                raise ConfigError("a ZeRO-3 checkpoint cannot be resharded onto tensor parallelism")
            load_dir, load_tag = src, tag
            if universal:
                self.print0(f"layout changed ({manifest.get('layout')} -> {layout}): converting {src / tag} to a "
                            "DeepSpeed universal checkpoint")
                ckpt.convert_to_universal(src / tag)
                load_dir, load_tag = src / tag, "universal"
            return {"src": str(src), "tag": tag, "load_dir": str(load_dir), "load_tag": load_tag,
                    "universal": universal}

        box = [None]
        err = None
        if self.is_main:
            try:
                box[0] = decide()
            except Exception as e:  # noqa: BLE001 - every rank must leave the broadcast
                err = e
                box[0] = {"error": f"{type(e).__name__}: {e}"}
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        if err is not None:
            raise err
        if box[0] is not None and "error" in box[0]:
            raise RuntimeError(f"resume planning failed on rank 0: {box[0]['error']}")
        return box[0]

    def maybe_resume(self) -> None:
        plan = self.resume_from
        if plan is None:
            return
        src, tag = Path(plan["src"]), plan["tag"]
        _, client = self.engine.load_checkpoint(plan["load_dir"], tag=plan["load_tag"])
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {src / tag}")
        state = json.loads((src / tag / "trainer_state.json").read_text())
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.loader.load_state_dict(state["data"])
        rng_file = src / tag / f"rng_rank{self.rank:05d}.pt"
        if not plan["universal"] and rng_file.is_file():
            ckpt.set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            # a new layout cannot reuse per-rank streams: re-seed from (seed, step, rank)
            ckpt.seed_everything((self.cfg.train.seed * 1_000_003 + self.step) * 1009 + self.rank)
        self._check_optimizer_step()
        how = " (universal checkpoint, new layout)" if plan["universal"] else ""
        self.print0(f"resumed from {src / tag} at step {self.step} "
                    f"({self.loader.consumed_samples} samples consumed){how}")

    def _check_optimizer_step(self) -> None:
        """The restored Adam step must equal the updates actually taken (lost or reset step counters break the
        bias correction: DeepSpeed PR #5289, #7786)."""
        expected = self.step - self.skipped_steps
        if self.engine.global_steps != self.step:
            raise RuntimeError(f"DeepSpeed restored global step {self.engine.global_steps}, the checkpoint is at "
                               f"step {self.step}")
        for state in self.base_optimizer.state.values():
            if "step" in state and int(state["step"]) != expected:
                raise RuntimeError(f"Adam step counter restored as {int(state['step'])}, expected {expected} "
                                   f"({self.step} steps, {self.skipped_steps} skipped)")
            break

    # --- robustness ---------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        # close() puts the previous handlers back: one left installed keeps this trainer, its engine and their
        # process groups alive into interpreter teardown (see pretrain.distributed.shutdown_distributed)
        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous_handlers.setdefault(sig, signal.signal(sig, handler))

    def _stop_requested(self) -> bool:
        """True on every rank when any rank received SIGTERM / SIGUSR1 (checked at step boundaries)."""
        if self.world == 1:
            # no peers to agree with: no device tensor, so no wait for the step's kernels to finish
            return self._stop_signal is not None
        if self.guard.stop_agreed is not None:
            # agreed this step in the guard's all-reduce (a signal after it is seen at the next step)
            return self.guard.stop_agreed
        flag = torch.tensor([1 if self._stop_signal is not None else 0], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # --- loop ------------------------------------------------------------------------------------------------

    def _to_device(self, mb: dict) -> dict:
        # no host wait on the way in (pinned copies), and the operator plans its chunks from this host copy of the
        # document boundaries instead of reading them back in the middle of the forward pass
        return {k: ((boundaries_to_device if k == "cu_seqlens" else host_to_device)(v, self.device)
                    if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}

    def _forward_loss(self, mb: dict) -> torch.Tensor:
        """This rank's loss of a micro-batch. Under sequence parallelism: its slice's token-loss sum over the whole
        micro-batch's token count, so that DeepSpeed's sum over SP ranks is the micro-batch mean."""
        total = None
        if self.sp is not None:
            mb, total = self.sp.slice_batch(mb)
            self.sp.to(self.device)
        mb = self._to_device(mb)
        out = self.engine(mb["input_ids"], labels=mb["labels"], cu_seqlens=mb["cu_seqlens"], return_logits=False)
        if total is None:
            return out.loss
        return out.loss * out.n_tokens / max(total, 1)

    def train_step(self) -> torch.Tensor:
        losses = []
        step = self.step + 1
        self.guard.new_step()
        for micro, mb in enumerate(self.loader.next_step()):
            kill_point("kill", step, self.rank, micro)
            oom_point(step, self.rank, micro)
            loss = self._forward_loss(mb)
            loss = loss * float("nan") if poison_loss(step, self.rank) else loss
            self.guard.observe_loss(loss)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        self.step = step
        return torch.stack(losses).float().mean()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.val_data is None:
            return {}
        self.engine.eval()
        dp, r = self.layout.dp, self.layout.coords.dp
        mb = self.micro_batch
        total = len(self.val_data) // mb
        # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)
        per_rank = min(self.cfg.train.eval_batches, total // dp) if total >= dp else 0
        loss_sum, count = 0.0, 0.0
        batches = list(iter_eval_batches(self.val_data, mb, per_rank * dp, self.model_config.doc_reset))
        for batch in batches[r::dp][:per_rank]:
            if self.sp is not None:
                batch, _ = self.sp.slice_batch(batch)
                self.sp.to(self.device)
            batch = self._to_device(batch)
            out = self.engine(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch["cu_seqlens"],
                              return_logits=False)
            loss_sum += float(out.loss) * float(out.n_tokens)
            count += float(out.n_tokens)
        self.engine.train()
        group = self.layout.sp_dp_group if self.sp is not None else self.layout.dp_group
        loss_sum, count = reduce_sum([loss_sum, count], group)
        if count == 0:
            return {}
        val = loss_sum / count
        return {"val/loss": val, "val/ppl": math.exp(min(val, 50.0)), "val/tokens": count}

    def _memory(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {"mem/peak_alloc_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
                    "mem/peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / 2**30}
        return {"mem/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

    def run(self) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        self.maybe_resume()
        self._install_signal_handlers()
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.sinks = build_sinks(self.out_dir, cfg.logging.tensorboard, cfg.logging.wandb,
                                     cfg.logging.wandb_project, cfg.name, cfg.to_dict())
        n_mfu = self.model_config.non_embedding_param_count()
        self.print0(f"model: {self.model_config.name} {self.model_config.param_count() / 1e6:.2f}M params "
                    f"(vocab {self.model_config.vocab_size}); {self.layout.describe()}; ZeRO-{t.zero_stage}; "
                    f"{self.precision}; {self.tokens_per_step:,} tokens/step, "
                    f"{describe_micro_batch(t, self.layout.dp)}; steps {self.step} -> {t.steps}")
        last: dict[str, float] = {}
        acc_loss = torch.zeros((), device=self.device)
        acc_n = 0
        t_log, step_log = time.perf_counter(), self.step
        start_step = self.step
        stop_at = t.stop_at_step if 0 < t.stop_at_step < t.steps else t.steps
        saved_at = -1
        while self.step < stop_at:
            step_loss = self.train_step()
            step = self.step
            # decided once for every rank in the optimizer step (pretrain/step_guard.py); read here, with the
            # optimizer's kernels already queued behind the flags
            if self.guard.update_dropped:
                self.skipped_steps += 1
                self.bad_in_a_row += 1
                self.print0(f"step {step}: non-finite loss or gradient on some rank; update skipped "
                            f"({self.bad_in_a_row} in a row)")
                self.sinks.log({"train/skipped_steps": float(self.skipped_steps)}, step)
                if self.bad_in_a_row >= t.max_bad_steps:
                    self.save()
                    raise TrainingDiverged(
                        f"{self.bad_in_a_row} consecutive non-finite steps ending at step {step} (first bad step "
                        f"{step - self.bad_in_a_row + 1}); parameters are those of step {step - self.bad_in_a_row}, "
                        f"saved in {self.ckpt_dir}. Lower the learning rate or check the data, then resume."
                    )
            else:
                self.bad_in_a_row = 0
                acc_loss += step_loss
                acc_n += 1
            if step % t.log_every == 0 or step == stop_at:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t_log
                n_steps = step - step_log
                local = float(acc_loss) / acc_n if acc_n else float("nan")
                if self.sp is not None:
                    (local,) = reduce_sum([local], self.layout.sp_group)
                (loss,) = reduce_mean([local], self.layout.dp_group)
                tok_s = self.tokens_per_step * n_steps / max(dt, 1e-9)
                metrics = {
                    "train/loss": loss,
                    "train/lr": cfg.optim.lr * lr_multiplier(step - 1, self.warmup, t.steps, cfg.optim.min_lr_ratio),
                    "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                    "perf/tokens_per_s": tok_s,
                    "perf/step_s": dt / max(n_steps, 1),
                    "train/tokens": float(self.loader.consumed_samples * cfg.data.seq_len),
                    **self._memory(),
                }
                if self.peak_flops:
                    metrics["perf/mfu"] = 6 * n_mfu * tok_s / (self.peak_flops * self.world)
                self.sinks.log(metrics, step)
                eta = (stop_at - step) * dt / max(n_steps, 1)
                mfu = f" | mfu {metrics['perf/mfu'] * 100:.1f}%" if "perf/mfu" in metrics else ""
                mem = next(v for k, v in metrics.items() if k.startswith("mem/"))
                self.print0(f"step {step:>6}/{t.steps} | loss {loss:.4f} | lr {metrics['train/lr']:.2e} | "
                            f"gnorm {metrics['train/grad_norm']:.3f} | {tok_s:,.0f} tok/s{mfu} | "
                            f"mem {mem:.2f} GiB | eta {eta:,.0f}s")
                last = metrics
                acc_loss.zero_()
                acc_n = 0
                t_log, step_log = time.perf_counter(), step
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                val = self.evaluate()
                if val:
                    self.sinks.log(val, step)
                    self.print0(f"step {step:>6} | val loss {val['val/loss']:.4f} | val ppl {val['val/ppl']:.2f}")
            if t.save_every and step % t.save_every == 0:
                self.save()
                saved_at = step
            if self._stop_requested():
                self.print0(f"stop signal received: saving at step {step} and exiting")
                break
        if self.step >= t.steps:
            val = self.evaluate()
            if val:
                self.sinks.log(val, self.step)
                self.print0(f"final | val loss {val['val/loss']:.4f} | val ppl {val['val/ppl']:.2f}")
                last.update(val)
        if saved_at != self.step and self.step > start_step:
            self.save()
        if self.is_main and cfg.logging.plot:
            from pretrain.plot import plot_loss_curve

            png = plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss_curve.png", cfg.name)
            self.print0(f"loss curve: {png}")
        state = "finished" if self.step >= t.steps else "stopped"
        if state == "stopped":
            self.print0(f"stopped at step {self.step}; rerun with train.resume=auto to continue")
        self._write_run_state(state)
        self.print0(f"outputs in {self.out_dir}: metrics.jsonl, tb/, checkpoints/, loss_curve.png")
        return last

    def _write_run_state(self, state: str) -> None:
        """{"state": "finished" | "stopped", ...} for schedulers (METALA_RUN_STATE) and humans (out_dir)."""
        if not self.is_main:
            return
        text = json.dumps({"state": state, "step": self.step, "steps": self.cfg.train.steps,
                           "checkpoint_dir": str(self.ckpt_dir)})
        targets = [self.out_dir / "run_state.json"]
        if os.environ.get("METALA_RUN_STATE"):
            targets.append(Path(os.environ["METALA_RUN_STATE"]))
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")

    def close(self) -> None:
        """Flush the sinks, restore the signal handlers and release the engine (its optimizer holds the groups)."""
        self.sinks.close()
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers.clear()
        try:
            self.engine.destroy()
        except Exception as e:  # noqa: BLE001 - never hide the error that ended the run behind this one
            log.warning("releasing the DeepSpeed engine failed: %s", e)


__all__ = ["DataError", "Trainer", "TrainingDiverged", "deepspeed_config", "pad_vocab"]
