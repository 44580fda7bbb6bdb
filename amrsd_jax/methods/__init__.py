"""Methods: one file each, registered by name, holding everything method-specific.

The loop (:mod:`amrsd_jax.train.trainer`), the update step (:mod:`amrsd_jax.update`),
the scorer and the dry run never branch on a method: they call the hooks of the
:class:`~amrsd_jax.methods.base.Method` object they are given (see its module docstring).

Adding a method ``x``:

1. ``amrsd_jax/credit/x.py`` -- the math: pure, jit-compatible functions of arrays
   (``A [B]`` and per-token signals ``[B, N]`` -> ``Ahat [B, N]``) and a frozen config
   dataclass;
2. ``amrsd_jax/methods/x.py`` -- a ``Method`` subclass decorated with ``@register``:
   ``name``, ``config_type``, the optional batch ``fields`` it fills, and the hooks it
   changes (``teacher_inputs`` / ``score`` on the host, ``token_advantages`` /
   ``extra_loss`` / ``refresh_teacher`` traced, ``init_teacher`` / ``extra_programs`` at
   build time). Every module of this folder is imported (and so registered) when the
   package is, so nothing else changes;
3. a test (``tests/test_methods.py`` registers a toy method from the test file and trains
   a step with it, without touching the library);
4. ``configs/methods/x.yaml`` -- ``method: x`` and its ``method_config.x`` defaults.
"""

import importlib
import pkgutil

from .base import (METHODS, Method, MethodContext, TeacherInputs, get_method, make_method,
                   method_settings, register)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registers its methods

__all__ = ["METHODS", "Method", "MethodContext", "TeacherInputs", "get_method", "make_method",
           "method_settings", "register"]
