"""The fused master-weight AdamW step (pretrain/master_adamw): its Triton kernel (interpreter on CPU) and its naive
twin against torch's fused AdamW on fp32 masters, with the step guard's skip (`found_inf`) and clip divisor
(`grad_scale`), sizes that are not a multiple of the kernel's block, and `MasterWeightAdamW`, which runs it for
parameters handed to it through `lp_io` and is torch's fused AdamW otherwise."""

from __future__ import annotations

import pytest
import torch

from pretrain.master_adamw import BLOCK, adamw_master_step_
from pretrain.optim import MasterWeightAdamW

# the kernel on the GPU, or under Triton's CPU interpreter (tests/conftest.py turns it on without CUDA)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HP = {"lr": 3e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def torch_adamw_run(master0: torch.Tensor, grads: list[torch.Tensor], scales: list, skips: list) -> dict:
    """torch's fused AdamW on an fp32 copy of the master, fed each gradient cast to fp32 (what DeepSpeed does)."""
    p = torch.nn.Parameter(master0.clone())
    opt = torch.optim.AdamW([p], fused=True, **HP)
    for g, scale, skip in zip(grads, scales, skips):
        p.grad = g.float().clone()  # its fused kernel writes the unscaled gradient back into .grad
        opt.grad_scale = None if scale is None else torch.tensor(scale, device=p.device)
        opt.found_inf = None if skip is None else torch.tensor(float(skip), device=p.device)
        opt.step()
    st = opt.state[p]
    return {"master": p.detach(), "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"], "step": st["step"]}


def fused_run(master0: torch.Tensor, grads: list[torch.Tensor], scales: list, skips: list, lp_dtype, backend: str):
    n = master0.numel()
    master = master0.clone()
    m, v = torch.zeros(n, device=master.device), torch.zeros(n, device=master.device)
    step = torch.zeros((), device=master.device)
    lp = master0.to(lp_dtype, copy=True)
    lps = []
    for g, scale, skip in zip(grads, scales, skips):
        found_inf = None if skip is None else torch.tensor(float(skip), device=master.device)
        step.add_(1 if found_inf is None else 1 - found_inf)
        before = lp.clone()
        adamw_master_step_(master, m, v, g, lp, step, lr=HP["lr"], beta1=HP["betas"][0], beta2=HP["betas"][1],
                           eps=HP["eps"], weight_decay=HP["weight_decay"], found_inf=found_inf,
                           grad_scale=None if scale is None else torch.tensor(scale, device=master.device),
                           backend=backend)
        lps.append((before, lp.clone()))
    return {"master": master, "exp_avg": m, "exp_avg_sq": v, "step": step}, lps


@pytest.mark.parametrize("backend", ["naive", "triton"])
@pytest.mark.parametrize("lp_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 3 * BLOCK + 77])
def test_fused_step_matches_torch_fused_adamw_on_fp32_masters(backend, lp_dtype, n):
    g = torch.Generator().manual_seed(n)
    master0 = torch.randn(n, generator=g).to(DEVICE)
    grads = [(torch.randn(n, generator=g) * 0.1).to(lp_dtype).to(DEVICE) for _ in range(4)]
    # plain, clipped (divided by 2.5 as it is read), skipped (the guard's found_inf), plain again
    scales, skips = [None, 2.5, 2.5, None], [None, 0, 1, 0]
    ref = torch_adamw_run(master0, grads, scales, skips)
    got, lps = fused_run(master0, grads, scales, skips, lp_dtype, backend)
    assert float(got["step"]) == float(ref["step"]) == 3.0
    for key in ("master", "exp_avg", "exp_avg_sq"):
        # the same formula in the same order, in fp32: a few ulp apart at most (measured <= 5e-7 on O(1) masters)
        diff = float((got[key] - ref[key]).abs().max())
        assert diff <= 2e-6 * max(1.0, float(ref[key].abs().max())), (key, diff)
    assert float((got["master"] - master0).abs().max()) > 1e-3  # it trained
    for i, (before, after) in enumerate(lps):
        if skips[i] == 1:
            # a skipped step writes nothing, the low-precision weights included
            assert torch.equal(before, after), i
    # the low-precision weights are the updated master in their dtype (rounded to nearest on a GPU and in the twin;
    # Triton's CPU interpreter truncates fp32 -> bf16, one bf16 ulp at most)
    final = lps[-1][1].float()
    exact = got["master"].to(lp_dtype).float()
    if backend == "triton" and lp_dtype == torch.bfloat16 and DEVICE == "cpu":
        assert float(((final - exact).abs() / exact.abs().clamp_min(1e-30)).max()) <= 2 ** -7
    else:
        assert torch.equal(final, exact)


def test_fused_step_refuses_mismatched_inputs():
    n = 10
    good = {"master": torch.zeros(n), "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n),
            "grad": torch.zeros(n, dtype=torch.bfloat16), "lp_out": torch.zeros(n, dtype=torch.bfloat16),
            "step": torch.ones(())}
    kw = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="grad: expected a contiguous tensor of 10 elements"):
        adamw_master_step_(**{**good, "grad": torch.zeros(11)}, **kw)
    with pytest.raises(ValueError, match="lp_out: expected a contiguous tensor"):
        adamw_master_step_(**{**good, "lp_out": torch.zeros(20)[::2]}, **kw)
    with pytest.raises(ValueError, match="exp_avg must be float32"):
        adamw_master_step_(**{**good, "exp_avg": torch.zeros(n, dtype=torch.bfloat16)}, **kw)
    with pytest.raises(ValueError, match="betas must be in"):
        adamw_master_step_(**good, **{**kw, "beta1": 1.0})
    with pytest.raises(ValueError, match="backend must be"):
        adamw_master_step_(**good, **kw, backend="cuda")


def test_master_weight_adamw_steps_lp_io_params_with_torch_state_and_is_torch_adamw_without():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(300, generator=g)
    grads = [torch.randn(300, generator=g).bfloat16() for _ in range(3)]
    # without lp_io: torch's fused AdamW, bit for bit
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours, theirs = MasterWeightAdamW([a], **HP), torch.optim.AdamW([b], fused=True, **HP)
    for grad in grads:
        a.grad, b.grad = grad.float(), grad.float()
        ours.step()
        theirs.step()
    assert torch.equal(a, b)
    # with lp_io: the bf16 gradient is read directly and the bf16 weights written; the state entries are torch's
    master = torch.nn.Parameter(w0.clone())
    lp = w0.bfloat16()
    opt = MasterWeightAdamW([master], **HP)
    for grad in grads:
        opt.lp_io = {master: (grad, lp)}
        opt.step()
    st = opt.state[master]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["step"].dtype == torch.float32
    assert float(st["step"]) == 3.0
    assert float((master.detach() - b.detach()).abs().max()) < 1e-6
    assert torch.equal(lp, master.detach().bfloat16())
    # the step guard's skip: nothing moves, the step count stays
    opt.found_inf = torch.tensor(1.0)
    before = (master.detach().clone(), lp.clone(), st["exp_avg"].clone())
    opt.lp_io = {master: (grads[0], lp)}
    opt.step()
    assert float(st["step"]) == 3.0
    assert all(torch.equal(x, y) for x, y in zip(before, (master.detach(), lp, st["exp_avg"])))
    # one step takes one kind of parameter: a .grad beside lp_io parameters is a programming error
    other = torch.nn.Parameter(torch.zeros(3))
    other.grad = torch.ones(3)
    mixed = MasterWeightAdamW([master, other], **HP)
    mixed.lp_io = {master: (grads[0], lp)}
    with pytest.raises(RuntimeError, match="one step takes one kind"):
        mixed.step()


def test_back_to_back_gradients_become_one_view_and_nothing_else_does():
    from pretrain.zero_step import _as_one_view

    buf = torch.arange(20, dtype=torch.float32)
    parts = [buf[0:6].view(2, 3), buf[6:10], buf[10:20].view(5, 2)]
    flat = _as_one_view(parts, 20)
    assert flat is not None and flat.data_ptr() == buf.data_ptr() and torch.equal(flat, buf)
    flat[7] = -1.0  # a view, not a copy
    assert float(parts[1][1]) == -1.0
    assert _as_one_view(parts, 21) is None  # DeepSpeed's partition padding: the copy path
    assert _as_one_view([buf[0:6], buf[7:20]], 19) is None  # a gap
    assert _as_one_view([buf[6:10], buf[0:6]], 10) is None  # out of order
    assert _as_one_view([buf[0:6], torch.zeros(4)], 10) is None  # another storage
    assert _as_one_view([buf[0:6], buf[6:10].to(torch.float64)], 10) is None  # another dtype
    assert _as_one_view([buf.view(4, 5)[:, :2]], 8) is None  # not contiguous
    assert _as_one_view([], 0) is None
