"""Numerically careful elementwise helpers for Triton kernels (fp32 in, fp32 out); no libdevice, so they also run
under TRITON_INTERPRET=1."""

import triton
import triton.language as tl


@triton.jit
def neg_expm1(g):
    """1 - exp(g) for g <= 0, accurate near 0 (where 1 - exp(g) loses every digit to rounding)."""
    small = g * (1.0 + g * (0.5 + g * (0.16666666666666666 + g * (0.041666666666666664 + g * 0.008333333333333333))))
    return tl.where(g > -0.0625, -small, 1.0 - tl.exp(g))


@triton.jit
def log1p_small(x):
    """log(1 + x) for x in [0, 1]."""
    return tl.where(x < 1e-4, x * (1.0 - 0.5 * x), tl.log(1.0 + x))


@triton.jit
def logsigmoid(z):
    """log(sigmoid(z)) = min(z, 0) - log(1 + exp(-|z|))."""
    return tl.minimum(z, 0.0) - log1p_small(tl.exp(-tl.abs(z)))


@triton.jit
def sigmoid_neg(z):
    """sigmoid(-z) = d logsigmoid(z) / dz, without overflow."""
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, e / (1.0 + e), 1.0 / (1.0 + e))
