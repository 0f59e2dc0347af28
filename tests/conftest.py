"""Test configuration.

Under tests/ops and tests/modules, torch.empty / empty_like / Tensor.new_empty return NaN-filled floating tensors,
so a kernel or module that forgets to write part of an output fails loudly instead of reading stale zeros.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# without a GPU the Triton kernels run on the CPU interpreter; it must be chosen before any kernel module loads
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_POISONED_DIRS = ("ops", "modules")
DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
DEMO_INPUTS = [str(DEMO_DIR / "00.jsonl.zst"), str(DEMO_DIR / "01.jsonl.zst")]


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and t.device.type != "meta":
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_torch_memory(request, monkeypatch):
    if Path(str(request.node.fspath)).parent.name not in _POISONED_DIRS:
        yield
        return
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(new_empty(self, *a, **k)))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer integration tests (multi-process DeepSpeed runs)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 1024-piece unigram tokenizer trained once per session on part of the demo corpus."""
    from data_prep.train_tokenizer import main

    out = tmp_path_factory.mktemp("tok")
    main(["--input", *DEMO_INPUTS, "--vocab-size", "1024", "--max-chars", "3000000", "--output", str(out),
          "--num-threads", "2"])
    return out


@pytest.fixture(scope="session")
def tokenizer_model(tokenizer_dir) -> str:
    return str(tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def bpe_tokenizer_model(tmp_path_factory) -> str:
    """A 1024-piece BPE tokenizer with our options (the model type span encoding is exact for)."""
    from data_prep.train_tokenizer import main

    out = tmp_path_factory.mktemp("tok_bpe")
    main(["--input", *DEMO_INPUTS, "--vocab-size", "1024", "--max-chars", "2000000", "--model-type", "bpe",
          "--output", str(out), "--num-threads", "2"])
    return str(out / "tokenizer.model")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory, tokenizer_model) -> Path:
    """The second demo shard tokenized with a 5% validation split."""
    from data_prep.prepare import main

    out = tmp_path_factory.mktemp("demo_data")
    main(["--input", DEMO_INPUTS[1], "--tokenizer", tokenizer_model, "--output", str(out), "--workers", "1",
          "--val-fraction", "0.05", "--shard-tokens", "300000"])
    return out
