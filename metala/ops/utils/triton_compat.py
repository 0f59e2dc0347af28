"""Compatibility shims for running our Triton kernels under the CPU interpreter (TRITON_INTERPRET=1).

Triton 3.6's interpreter converts a loaded scalar to a Python index with `int(array)`, which numpy >= 2 refuses
for the 1-element arrays the interpreter produces; loops whose trip count is loaded from memory (segments and
chunks of packed documents) then fail on CPU although they compile and run on GPUs. The shim makes that
conversion take the single element. It touches nothing when the interpreter is off.
"""

from __future__ import annotations

import os


def patch_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    import numpy as np
    import triton.runtime.interpreter as interp

    if getattr(interp._patch_lang_tensor, "_metala_patched", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._metala_patched = True
    interp._patch_lang_tensor = patched


patch_interpreter()
