"""Interpreter shim: lets ``range()`` take scalar tensors under ``TRITON_INTERPRET=1`` with numpy >= 2.3.

The Triton interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``, which
numpy 2.3+ rejects for arrays of ndim > 0; compiled kernels are unaffected. Importing this module (only
done when the interpreter is on) wraps the interpreter's tensor patch so ``__index__`` reads the element.
"""

from __future__ import annotations

import os


def install() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    from triton.runtime import interpreter as _interp

    if getattr(_interp, "_sala_index_fix", False):
        return
    original = _interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = patched
    _interp._sala_index_fix = True


install()
