"""Metric sinks behind one interface: `log(metrics, step)` and `close()`.

JSONL (always), TensorBoard (default) and W&B (optional) on rank 0; other ranks get the no-op sink, so call sites
stay unconditional.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON object per call: {"step": ..., **metrics}. Appends, so a resumed run continues the same file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a", buffering=1)

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.fh.write(json.dumps({"step": step, **clean}) + "\n")

    def close(self) -> None:
        self.fh.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, name: str, config: dict) -> None:
        import wandb

        self.run = wandb.init(project=project, name=name, config=config, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MultiSink:
    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def build_sinks(out_dir: Path, tensorboard: bool, wandb: bool, wandb_project: str, name: str, config: dict) -> MultiSink:
    sinks: list[Sink] = [JsonlSink(out_dir / "metrics.jsonl")]
    if tensorboard:
        try:
            sinks.append(TensorBoardSink(out_dir / "tb"))
        except ImportError:
            log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
    if wandb:
        sinks.append(WandbSink(wandb_project, name, config))
    return MultiSink(sinks)
