"""Entry point: `python -m pretrain.train --config RECIPE.yaml [section.key=value ...]` (under `deepspeed` or alone).

`--dry-run` validates the recipe and prints the resolved plan (world size, parallel layout, tokens per step, steps,
checkpoint dir) without starting process groups or touching the GPU.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pretrain.config import ConfigError, TrainConfig, describe_micro_batch, largest_micro_batch, load_config
from pretrain.data import DataError

if TYPE_CHECKING:
    from pretrain.trainer import Trainer


def plan(cfg: TrainConfig, world_size: int) -> list[str]:
    """The resolved plan of a run, as lines; raises ConfigError on an impossible layout or batch."""
    from pretrain.data import load_manifest
    from pretrain.trainer import pad_vocab

    tp, sp = cfg.parallel.tp, cfg.parallel.sp
    if world_size % (tp * sp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp * parallel.sp = {tp * sp}")
    dp = world_size // (tp * sp)
    t = cfg.train
    micro_line = describe_micro_batch(t, dp)
    lines = []
    vocab_note = ""
    data_dir = Path(cfg.data.dir)
    vocab = None
    if (data_dir / "manifest.json").is_file():
        m = load_manifest(data_dir)
        vocab = pad_vocab(m["tokenizer"]["vocab_size"])
        lines.append(f"data        {data_dir}: {m['splits']['train']['tokens']:,} train tokens, "
                     f"{m['splits']['val']['tokens']:,} val tokens")
    else:
        lines.append(f"data        {data_dir}: NOT FOUND "
                     "(prepare it with `python -m data_prep.prepare` before training)")
        vocab_note = " (vocab from the preset; the data's tokenizer decides at start)"
    mcfg = cfg.model.build(vocab_size=vocab)
    if mcfg.n_heads % tp:
        raise ConfigError(f"parallel.tp={tp} must divide the head count {mcfg.n_heads}")
    if cfg.data.seq_len % sp:
        raise ConfigError(f"parallel.sp={sp} must divide data.seq_len={cfg.data.seq_len}")
    tokens_step = t.global_batch * cfg.data.seq_len
    # what train.compile_save keeps for the backward beyond what the memory budget keeps
    kept = f", saving {', '.join(t.compile_save)}" if t.compile_save else ""
    lines += [
        f"model       {mcfg.name}: {mcfg.param_count() / 1e6:,.1f}M params, d={mcfg.d_model} L={mcfg.n_layers} "
        f"H={mcfg.n_heads} vocab={mcfg.vocab_size}{vocab_note}, tied={mcfg.tie_embeddings}",
        f"world       {world_size} ranks = DP {dp} x SP {sp} x TP {tp}; ZeRO-{t.zero_stage}; precision {t.precision}",
        f"batch       global {t.global_batch} x seq {cfg.data.seq_len} = {tokens_step:,} tokens/step; {micro_line}",
        f"schedule    {t.steps:,} steps = {t.steps * tokens_step / 1e9:,.3f}B tokens; lr {cfg.optim.lr:g} warm-up "
        f"{cfg.warmup_steps()} steps, cosine to {cfg.optim.lr * cfg.optim.min_lr_ratio:g}",
        "compute     " + (f"torch.compile (mode {t.compile_mode}, activation memory budget {t.compile_memory_budget:g}"
                             f"{kept})" if t.compile else "eager (train.compile=false)")
        + f"; activation checkpointing {'on' if t.activation_checkpointing else 'off'}",
        f"checkpoint  {Path(t.out_dir) / 'checkpoints'} every {t.save_every or 'end'} steps, keep {t.keep_last}; "
        f"resume {t.resume}",
    ]
    return lines


def out_of_memory_advice(cfg: TrainConfig, trainer: Trainer | None) -> str:
    """What to change after a rank ran out of accelerator memory, from what it was running (`trainer` is None when
    the model, optimizer or engine did not fit: the Trainer was never built)."""
    t = cfg.train
    if trainer is None:
        return ("while building the model, optimizer and engine: split the weights and optimizer states over more "
                f"ranks (train.zero_stage={min(t.zero_stage + 1, 3)} or parallel.tp), or pick a smaller model")
    import torch

    peak = ""
    if trainer.device.type == "cuda":
        total = torch.cuda.get_device_properties(trainer.device).total_memory
        peak = f", peak {torch.cuda.max_memory_allocated(trainer.device) / 2**30:.1f} of {total / 2**30:.1f} GiB"
    micro, share = trainer.micro_batch, t.global_batch // trainer.layout.dp
    fixes = []
    if micro > 1:
        fixes.append(f"train.micro_batch={largest_micro_batch(share, micro - 1)} (the same global batch in more "
                     "accumulated micro-batches)")
    if t.compile and not t.activation_checkpointing and t.compile_memory_budget > 0.5:
        fixes.append(f"train.compile_memory_budget={max(0.5, round(t.compile_memory_budget - 0.2, 1)):g} (Inductor "
                     "recomputes more elementwise work in the backward)")
    if not t.activation_checkpointing:
        fixes.append("train.activation_checkpointing=true (each block recomputed in the backward)")
    if t.zero_stage < 2:
        fixes.append("train.zero_stage=2 (gradients partitioned over the data-parallel ranks)")
    where = (f"at step {trainer.step + 1}, {micro} sequences of {cfg.data.seq_len} tokens a forward on each rank"
             f"{peak}")
    if not fixes:
        return f"{where}; every memory setting is at its lowest: split the model over more GPUs (parallel.tp)"
    return f"{where}; lower the memory with " + ", or ".join(fixes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="recipe YAML (launch/configs/*.yaml)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan, do not train")
    ap.add_argument("--world-size", type=int, default=0, help="for --dry-run: ranks the launch would start")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # DeepSpeed 0.19 calls a collective that torch 2.13 marks deprecated, once per step and rank
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            print(f"recipe      {args.config} ({cfg.name})")
            for line in plan(cfg, world):
                print(line)
            print("dry run: configuration is valid")
            return 0
    except (ConfigError, DataError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import torch

    from pretrain.distributed import shutdown_distributed
    from pretrain.trainer import Trainer, TrainingDiverged

    trainer = None
    finished = False
    try:
        trainer = Trainer(cfg)
        trainer.run()
        finished = True
        return 0
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    except torch.OutOfMemoryError:
        traceback.print_exc()
        print(f"out of memory: {out_of_memory_advice(cfg, trainer)}", file=sys.stderr)
        return 4
    finally:
        if trainer is not None:
            trainer.close()
        trainer = None  # the last reference to the engine, which holds the process groups
        shutdown_distributed(all_ok=finished)


def exit_without_teardown(rc: int) -> NoReturn:
    """End a training process once its run is over: exit handlers run and output is flushed, then the process exits
    without interpreter teardown.

    `shutdown_distributed` frees every process group on the paths we test (ZeRO-1/2/3, TP, SP, gloo); a reference
    we do not know of (another DeepSpeed version, NCCL's watchdog) would leave a group's threads running while the
    interpreter and the C++ runtime tear down, which can abort a rank that finished ("terminate called without an
    active exception", exit -6) and fail the whole job. Nothing is left to do at that point, so it is skipped.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be written anyway
            pass
    os._exit(rc)


if __name__ == "__main__":
    exit_without_teardown(main())
