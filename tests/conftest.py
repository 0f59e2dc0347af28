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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_POISONED_DIRS = ("ops", "modules")


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
