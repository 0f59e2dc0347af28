"""Launch Triton kernels without re-running Triton's argument binder on every call.

`kernel[grid](*args, **kw)` binds and specialises every argument, builds a cache key from the specialisation and
the options, checks the kernel's globals and only then launches: tens of microseconds of Python per launch, which
at the 360M benchmark shape added up to as much host time as the operator's kernels take on the GPU. `launch`
keys the compiled kernel on what Triton specialises on (the kernel, its constexprs and launch options, each
tensor's dtype and 16-byte alignment, each scalar's type, and for integers whether they are 1, a multiple of 16,
and their width) and calls the
compiled kernel directly from the second call of a signature on.

Off under the CPU interpreter (no compiled kernels) and with METALA_LAUNCH_CACHE=0 (every launch through the
binder, for comparison and as the fallback if a Triton upgrade changes the compiled-kernel interface).
"""

from __future__ import annotations

import os

import torch

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") != "1" and os.environ.get("METALA_LAUNCH_CACHE", "1") != "0"


ENABLED = _enabled()
_COMPILED: dict[tuple, tuple] = {}


def _device() -> int:
    return torch.cuda.current_device()


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        # Triton specialises pointers on 16-byte alignment ("tt.divisibility")
        return a.dtype, a.data_ptr() & 15 == 0
    if isinstance(a, int):
        # ints (Triton's native specialize_impl): the value 1 becomes a constant, multiples of 16 are marked
        # divisible, and the width follows the range; any other value shares the compiled kernel
        return type(a), a == 1, a % 16 == 0, -(2**31) <= a < 2**31, 0 <= a < 2**64
    return type(a)


def cache_key(kernel, args: tuple, kw: dict) -> tuple:
    """What a launch's compiled kernel is keyed on (module docstring)."""
    return kernel, _device(), tuple(kw.items()), tuple(_arg_key(a) for a in args)


def launch(kernel, grid: tuple, args: tuple, kw: dict) -> None:
    """`kernel[grid](*args, **kw)`: runtime arguments positional (in signature order), constexprs and launch
    options as keywords."""
    if not ENABLED:
        kernel[grid](*args, **kw)
        return
    key = cache_key(kernel, args, kw)
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kw)
        if hasattr(compiled, "result"):  # Triton's asynchronous compile mode hands back a future
            compiled = compiled.result()
        names = kernel.arg_names
        tail = names[len(args):]
        if compiled is None or not all(n in kw for n in tail):
            return  # launched through the binder; a signature this module cannot replay stays uncached
        _COMPILED[key] = (compiled, tuple(kw[n] for n in tail))
        return
    compiled, consts = hit
    # the compiled kernel's runner takes exactly three grid dimensions (the binder pads them itself)
    compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *consts)


def cache_size() -> int:
    return len(_COMPILED)
