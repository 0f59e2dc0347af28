"""Triton kernel: one program per row; an online max/sum pass for the log-sum-exp, then a pass that overwrites the
logits with their gradient (softmax - one-hot) in the logits' dtype. Reads the row twice and writes it once, where
the unfused chain (upcast copy, logsumexp's passes, subtract, exp, scatter, cast) moves it about ten times."""

from __future__ import annotations

import triton
import triton.language as tl

import metala.ops.utils.triton_compat  # noqa: F401  (interpreter shim)


@triton.jit
def ce_loss_grad_kernel(
    logits_ptr, labels_ptr, loss_ptr, stride_row, V,
    IGNORE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != IGNORE
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # lanes that have seen only -inf keep s = 0 (exp of -inf - -inf would be NaN)
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        s = s * alpha + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.where(m == float("-inf"), 0.0, tl.exp(m - m_row)), axis=0)
    lse = m_row + tl.log(s_row)
    safe = tl.where(valid, label, 0)
    target = tl.load(base + safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, 1.0, 0.0)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(idx == safe, 1.0, 0.0)) * scale
            tl.store(base + idx, g.to(logits_ptr.dtype.element_ty), mask=idx < V)
