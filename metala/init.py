"""Weight initialisation, in one place (metala.md section 5).

Every parameter is drawn from its own generator seeded by (seed, parameter name), so the result does not depend on
the order of construction, and a tensor-parallel shard can draw the full matrix and keep its slice: TP = 1 and
TP = n start from identical weights.

"neox" (default): small_init N(0, sqrt(2 / (5 d))) for input-side matrices and embeddings, wang_init
N(0, 2 / (L sqrt(d))) for branch outputs (W_o, W_down). "normal": N(0, init_std) for every matrix.
"""

from __future__ import annotations

import math
import zlib

import torch

from metala.config import MetaLAConfig

_SMALL = ("q_proj.weight", "a_proj.weight", "v_proj.weight", "g_proj.weight", "key.proj.weight", "gate_proj.weight",
          "up_proj.weight", "embed.weight", "lm_head.weight")
_OUTPUT = ("o_proj.weight", "down_proj.weight")
_ZERO = ("g_proj.bias", "w_aug", "norm.bias")
_ONE = ("norm.weight",)


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF


def init_rule(name: str, config: MetaLAConfig) -> tuple[str, float]:
    """(distribution, parameter) for a parameter name: ("normal", std), ("uniform", bound) or ("const", value)."""
    d, L = config.d_model, config.n_layers
    if name.endswith(_SMALL):
        std = math.sqrt(2 / (5 * d)) if config.init_scheme == "neox" else config.init_std
        return "normal", std
    if name.endswith(_OUTPUT):
        std = 2 / (L * math.sqrt(d)) if config.init_scheme == "neox" else config.init_std
        return "normal", std
    if name.endswith("conv.weight"):
        # PyTorch's Conv1d default for a depthwise kernel: U(-1/sqrt(k), 1/sqrt(k))
        return "uniform", config.conv_size**-0.5
    if name.endswith(_ZERO):
        return "const", 0.0
    if name.endswith(_ONE):
        return "const", 1.0
    raise KeyError(f"no init rule for parameter {name!r}")


@torch.no_grad()
def init_tensor(
    name: str,
    shape: tuple[int, ...],
    config: MetaLAConfig,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The full initial value of parameter `name`; deterministic in (seed, name, device type)."""
    kind, arg = init_rule(name, config)
    if kind == "const":
        return torch.full(shape, arg, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(param_seed(seed, name))
    out = torch.empty(shape, device=device, dtype=torch.float32)
    if kind == "normal":
        out.normal_(0.0, arg, generator=gen)
    else:
        out.uniform_(-arg, arg, generator=gen)
    return out.to(dtype)


@torch.no_grad()
def init_weights(model: torch.nn.Module, config: MetaLAConfig, seed: int = 0) -> None:
    """Initialise every parameter of a plain (unsharded) model in place."""
    for name, p in model.named_parameters():
        p.copy_(init_tensor(name, tuple(p.shape), config, seed, device=p.device, dtype=p.dtype))
