"""Shared numeric assertions for operator and model tests."""

from __future__ import annotations

import torch

DEFAULT_RATIO = 5e-3


def err_ratio(ref: torch.Tensor, x: torch.Tensor, floor: float = 1e-6) -> float:
    """Relative RMSE ||ref - x|| / ||ref|| with an absolute floor for near-zero references (fla's metric)."""
    ref, x = ref.detach().double(), x.detach().double()
    denom = max(ref.norm().item(), floor * max(ref.numel(), 1) ** 0.5)
    return (ref - x).norm().item() / denom


def assert_close(name: str, ref: torch.Tensor, x: torch.Tensor, ratio: float = DEFAULT_RATIO, floor: float = 1e-6):
    """Fail on NaN/inf on either side or a relative RMSE above `ratio`; the numbers are printed even on pass."""
    assert ref.shape == x.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{name}: reference has NaN/inf"
    assert torch.isfinite(x).all(), f"{name}: tested tensor has NaN/inf"
    r = err_ratio(ref, x, floor)
    diff = (ref.detach().double() - x.detach().double()).abs().max().item()
    print(f"{name:>8}: max diff {diff:.3e}  ratio {r:.3e}  (tol {ratio:.1e})")
    assert r <= ratio, f"{name}: relative RMSE {r:.3e} > {ratio:.1e} (max abs diff {diff:.3e})"
