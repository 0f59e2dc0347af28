"""The launch cache's keying: a signature seen once goes straight to the compiled kernel with its constexprs in
signature order; anything Triton specialises on (dtype, 16-byte alignment, int value, constexprs) misses."""

import torch

from metala.ops.utils import launch_cache


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *params: self.log.append(("compiled", grid, params))


class FakeKernel:
    """Stands in for a triton JITFunction: `arg_names` and `kernel[grid](*args, **kw)` returning the compiled one."""

    arg_names = ["x", "y", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("binder", grid, args, kw))
            return FakeCompiled(self.log)

        return run


def _enable(monkeypatch):
    monkeypatch.setattr(launch_cache, "ENABLED", True)
    monkeypatch.setattr(launch_cache, "_device", lambda: 0)
    monkeypatch.setattr(launch_cache, "_COMPILED", {})


def test_second_call_replays_compiled_kernel_with_constexprs_in_order(monkeypatch):
    _enable(monkeypatch)
    k = FakeKernel()
    x, y = torch.zeros(8), torch.zeros(8)
    kw = dict(BLOCK=64, FLAG=True, num_warps=4)
    launch_cache.launch(k, (3, 1, 1), (x, y, 5, 0.5), kw)
    launch_cache.launch(k, (7, 2, 1), (x, y, 5, 0.25), kw)
    assert [e[0] for e in k.log] == ["binder", "compiled"]
    assert k.log[1][1] == (7, 2, 1)
    # runtime args first, then the constexprs in signature order; launch options are not parameters
    assert k.log[1][2] == (x, y, 5, 0.25, 64, True)


def test_replay_pads_the_grid_to_three_dimensions(monkeypatch):
    # Triton's compiled runner indexes grid[0..2]; the binder accepts shorter grids, so the replay must too
    _enable(monkeypatch)
    k = FakeKernel()
    x = torch.zeros(8)
    for grid in ((4, 2), (4, 2), (5,)):
        launch_cache.launch(k, grid, (x, x, 5, 0.5), dict(BLOCK=64, FLAG=True))
    assert [e[1] for e in k.log] == [(4, 2), (4, 2, 1), (5, 1, 1)]


def test_every_specialised_property_misses(monkeypatch):
    _enable(monkeypatch)
    k = FakeKernel()
    base = torch.zeros(16)
    kw = dict(BLOCK=64, FLAG=True)
    calls = [
        ((base, base, 5, 0.5), kw),
        ((base.double(), base, 5, 0.5), kw),  # dtype
        ((base[1:], base, 5, 0.5), kw),  # a pointer off 16-byte alignment
        ((base, base, 16, 0.5), kw),  # an int multiple of 16
        ((base, base, 1, 0.5), kw),  # the int 1 (a constant to Triton)
        ((base, base, 2**40, 0.5), kw),  # a 64-bit int
        ((base, base, 5, 0.5), dict(BLOCK=32, FLAG=True)),  # constexpr
        ((base, base, 5, 0.5), dict(kw, num_warps=8)),  # launch option
    ]
    for args, kwargs in calls:
        launch_cache.launch(k, (1,), args, kwargs)
    assert [e[0] for e in k.log] == ["binder"] * len(calls)
    assert launch_cache.cache_size() == len(calls)
    # an int Triton would not specialise differently (7 vs 5) replays the compiled kernel
    launch_cache.launch(k, (1,), (base, base, 7, 0.5), kw)
    assert k.log[-1][0] == "compiled"


def test_disabled_always_binds(monkeypatch):
    monkeypatch.setattr(launch_cache, "ENABLED", False)
    k = FakeKernel()
    for _ in range(2):
        launch_cache.launch(k, (1,), (torch.zeros(4), torch.zeros(4), 1, 1.0), dict(BLOCK=8, FLAG=False))
    assert [e[0] for e in k.log] == ["binder", "binder"]


def test_signature_not_replayable_stays_uncached(monkeypatch):
    # a parameter left to its default (FLAG here) is not known to the cache: never replayed
    _enable(monkeypatch)
    k = FakeKernel()
    args = (torch.zeros(4), torch.zeros(4), 1, 1.0)
    for _ in range(2):
        launch_cache.launch(k, (1,), args, dict(BLOCK=64))
    assert [e[0] for e in k.log] == ["binder", "binder"]
