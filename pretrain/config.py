"""Training configuration: typed sections loaded from a YAML recipe plus `section.key=value` overrides.

Every key maps one-to-one onto a dataclass field; an unknown key is an error that names it and suggests the
closest valid one. Values are type-checked (an int where a float is expected is accepted). The `model` section is
a preset name plus any `MetaLAConfig` field, validated by `MetaLAConfig` itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metala.config import MetaLAConfig

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# torch.compile modes the trainer runs; the CUDA-graph modes ("reduce-overhead", "max-autotune") are left out: the
# recurrent operator plans its launches from each batch's document boundaries on the host
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# what train.compile_save may name (pretrain.parallelize.apply_compile_save)
COMPILE_SAVE_CHOICES = ("swiglu", "mlp_norm", "conv_silu", "out_gate")


class ConfigError(ValueError):
    """A user error in a recipe or an override; the message names the key."""


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(sorted(choices))})"


TRAIN_LOSS_CHUNK = 8192


@dataclass(kw_only=True, slots=True)
class ModelSection:
    preset: str = "tiny"
    # MetaLAConfig fields overriding the preset; vocab_size "auto" takes the tokenizer's, padded to 128
    fields: dict[str, Any] = field(default_factory=dict)

    def build(self, vocab_size: int | None = None) -> MetaLAConfig:
        fields = dict(self.fields)
        # training uses the fused chunked cross-entropy unless a recipe says otherwise (metala/modules/loss.py)
        fields.setdefault("loss_chunk_size", TRAIN_LOSS_CHUNK)
        if fields.get("vocab_size", "auto") == "auto":
            fields.pop("vocab_size", None)
            if vocab_size is not None:
                fields["vocab_size"] = vocab_size
        try:
            return MetaLAConfig.from_preset(self.preset, **fields)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from e


@dataclass(kw_only=True, slots=True)
class DataSection:
    # folder written by `python -m data_prep.prepare` (manifest.json + shards)
    dir: str
    # optional tokenizer .model; its sha256 must match the manifest
    tokenizer: str = ""
    seq_len: int = 2048
    seed: int = 1234
    # "full" checks every shard's sha256 at start, "size" only sizes
    verify: str = "full"
    mask_eos_label: bool = False

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.verify not in ("full", "size"):
            raise ConfigError(f"data.verify must be 'full' or 'size', got {self.verify!r}")


@dataclass(kw_only=True, slots=True)
class OptimSection:
    lr: float
    # cosine floor as a fraction of lr (Pythia: 0.1)
    min_lr_ratio: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # linear warm-up over a fraction of train.steps; warmup_steps >= 0 overrides it with a step count
    warmup_fraction: float = 0.01
    warmup_steps: int = -1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("optim.grad_clip and optim.weight_decay must be >= 0")


@dataclass(kw_only=True, slots=True)
class TrainSection:
    steps: int
    # sequences per optimizer step over all data-parallel ranks
    global_batch: int
    # sequences per forward pass on one rank, at most: a rank whose share of global_batch is smaller runs its whole
    # share at once (`rank_micro_batch`), so a recipe sized for one node's GPUs also runs on more
    micro_batch: int
    out_dir: str
    seed: int = 0
    precision: str = "auto"
    zero_stage: int = 1
    activation_checkpointing: bool = False
    compile: bool = False
    # with compile (ignored without): torch.compile's activation memory budget
    # (torch._functorch.config.activation_memory_budget), process-wide. Below 1, the partitioner recomputes
    # elementwise work in the backward (norm outputs, SiLU(a) * b, the output gate) instead of saving it: about 6 of
    # 20 saved [tokens, d_model] bf16 tensors a layer fewer, no matmul recomputed at any budget in [0.6, 0.99] for
    # the presets (tests/parallel/test_compile.py)
    compile_memory_budget: float = 1.0
    # with compile (ignored without): activations kept for the backward at any budget, from COMPILE_SAVE_CHOICES:
    # "swiglu" (SiLU(a) * b), "mlp_norm" (the SwiGLU's input norm's output), "conv_silu" (SiLU of the mixer's short
    # conv), "out_gate" (the mixer's gated head-norm output); see pretrain.parallelize.apply_compile_save
    compile_save: list[str] = field(default_factory=list)
    # with compile (ignored without): torch.compile's mode, one of COMPILE_MODES; "max-autotune-no-cudagraphs" autotunes
    # Triton GEMMs with fused epilogues (minutes of compiling; +0.7 % tokens/s at 360M on an H100)
    compile_mode: str = "default"
    # under ZeRO-1/2: update the fp32 masters in one fused pass that reads the bf16 gradients and writes the bf16
    # weights (pretrain/zero_step.py) instead of DeepSpeed's cast, update and copy-back; false keeps DeepSpeed's step
    fused_master_step: bool = True
    log_every: int = 1
    # 0: evaluate only at the end
    eval_every: int = 0
    eval_batches: int = 20
    # 0: save only at the end
    save_every: int = 0
    keep_last: int = 3
    # "auto" resumes from the latest checkpoint in out_dir if there is one, "none" starts fresh, else a path
    resume: str = "auto"
    # save and exit cleanly at this step (0: never), as a time-limited job would; resume continues the same run
    stop_at_step: int = 0
    # per-GPU dense peak FLOP/s for MFU; 0 picks it from the device name (H100/H200: 989e12)
    peak_flops: float = 0.0
    # a non-finite loss or gradient skips the update; this many in a row saves and stops the run
    max_bad_steps: int = 5

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last must be >= 1, got {self.keep_last}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if not 0 < self.compile_memory_budget <= 1:
            raise ConfigError(f"train.compile_memory_budget must be in (0, 1], got {self.compile_memory_budget}")
        if not set(self.compile_save) <= set(COMPILE_SAVE_CHOICES):
            raise ConfigError(
                f"train.compile_save must hold names from {COMPILE_SAVE_CHOICES}, got {self.compile_save}")
        if self.compile and self.compile_save and self.activation_checkpointing:
            raise ConfigError("train.compile_save does not apply with activation_checkpointing (whole blocks are "
                              "recomputed); leave it empty")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"train.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"train.global_batch ({self.global_batch}) must be a multiple of train.micro_batch ({self.micro_batch})"
            )


def largest_micro_batch(share: int, at_most: int) -> int:
    """The largest micro-batch up to `at_most` that divides a rank's `share` of sequences (1 always does)."""
    return max(m for m in range(1, min(share, at_most) + 1) if share % m == 0)


def rank_micro_batch(train: TrainSection, dp: int) -> int:
    """Sequences a rank runs per forward over `dp` data-parallel ranks: train.micro_batch, or the rank's whole share
    of the global batch where that is smaller. A recipe's micro-batch is sized for one GPU's memory and one node's
    GPU count; on more GPUs each rank's share shrinks, and running it at once needs no more memory than asked for.
    Raises ConfigError, naming a micro-batch that fits, where the share is not whole or not a multiple of it."""
    if train.global_batch % dp:
        raise ConfigError(f"train.global_batch ({train.global_batch}) must be a multiple of the data-parallel size "
                          f"({dp}); no micro_batch fits")
    share = train.global_batch // dp
    micro = min(train.micro_batch, share)
    if share % micro:
        fits = largest_micro_batch(share, micro)
        raise ConfigError(f"train.global_batch ({train.global_batch}) must be a multiple of train.micro_batch "
                          f"({micro}) x data-parallel size ({dp}); each rank gets {share} sequences a step: set e.g. "
                          f"train.micro_batch={fits}")
    return micro


def describe_micro_batch(train: TrainSection, dp: int) -> str:
    """How a rank splits its share of the batch, for the plan and the training log (says where it was capped)."""
    micro = rank_micro_batch(train, dp)
    capped = f" (train.micro_batch {train.micro_batch} capped at the rank's share)" if micro < train.micro_batch else ""
    return f"micro {micro}/rank{capped}, grad accumulation {train.global_batch // (micro * dp)}"


@dataclass(kw_only=True, slots=True)
class ParallelSection:
    # tensor parallel (splits heads) and sequence parallel (splits each sequence, passes the recurrent state)
    tp: int = 1
    sp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.sp < 1:
            raise ConfigError(f"parallel.tp and parallel.sp must be >= 1, got tp={self.tp}, sp={self.sp}")


@dataclass(kw_only=True, slots=True)
class LoggingSection:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "metala-pretrain"
    plot: bool = True


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    name: str
    model: ModelSection
    data: DataSection
    optim: OptimSection
    train: TrainSection
    parallel: ParallelSection = field(default_factory=ParallelSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        if self.train.compile and self.train.compile_save and self.parallel.tp > 1:
            # tensor parallelism wraps the SwiGLU's norm with its own forward (a copy to the group), which the
            # selective-checkpoint region would have to hold: not built
            raise ConfigError("train.compile_save is not supported with parallel.tp > 1; leave it empty")

    def warmup_steps(self) -> int:
        if self.optim.warmup_steps >= 0:
            return self.optim.warmup_steps
        return int(self.optim.warmup_fraction * self.train.steps)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for section in ("model", "data", "optim", "train", "parallel", "logging"):
            obj = getattr(self, section)
            if section == "model":
                out["model"] = {"preset": obj.preset, **obj.fields}
            else:
                out[section] = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return out


_SECTIONS = {
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "parallel": ParallelSection,
    "logging": LoggingSection,
}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _build_section(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key '{where}.{key}'{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in kwargs:
            raise ConfigError(f"missing required key '{where}.{key}'")
    return cls(**kwargs)


def _model_section(data: Any) -> ModelSection:
    if not isinstance(data, dict):
        raise ConfigError(f"model must be a mapping, got {data!r}")
    data = dict(data)
    preset = data.pop("preset", "tiny")
    fields = {f.name for f in dataclasses.fields(MetaLAConfig)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key 'model.{key}'{_suggest(key, sorted(fields | {'preset'}))}")
    section = ModelSection(preset=str(preset), fields=data)
    # validate now (with a placeholder vocabulary when it comes from the data)
    section.build(vocab_size=None)
    return section


def config_from_dict(raw: dict, source: str = "<dict>") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a mapping of sections, got {type(raw).__name__}")
    allowed = ["name", "model", *_SECTIONS]
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown section '{key}'{_suggest(key, allowed)}")
    for key in ("model", "data", "optim", "train"):
        if key not in raw:
            raise ConfigError(f"{source}: missing section '{key}'")
    try:
        sections = {name: _build_section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
        return TrainConfig(name=str(raw.get("name", Path(source).stem)), model=_model_section(raw["model"]), **sections)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.key=value` (YAML-typed values, e.g. train.steps=10, optim.betas=[0.9,0.99]) applied to a raw dict."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, _, text = item.partition("=")
        value = yaml.safe_load(text) if text else ""
        parts = path.strip().split(".")
        if parts == ["name"]:
            raw["name"] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: the key must be section.key")
        section, key = parts
        allowed = ["model", *_SECTIONS]
        if section not in allowed:
            raise ConfigError(f"override {item!r}: unknown section '{section}'{_suggest(section, allowed)}")
        raw.setdefault(section, {})[key] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return config_from_dict(apply_overrides(raw, overrides or []), str(path))
