"""Loads the compiled library ``kdkernels._C`` once, and says why when it cannot.

A missing or broken ``_C`` is not fatal: the ops fall back to the next backend
(ultimately the plain-PyTorch reference) after one warning at first use.
"""
from __future__ import annotations

import warnings
from types import ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_loaded = False
_warned = False


def _load() -> None:
    global _module, _error, _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from . import _C  # type: ignore[attr-defined]

        _module = _C
    except Exception as exc:  # ImportError, or an undefined symbol in a broken build
        _error = f"{type(exc).__name__}: {exc}"


def native() -> Optional[ModuleType]:
    """The ``_C`` module, or None (see :func:`load_error`)."""
    _load()
    return _module


def load_error() -> Optional[str]:
    """Why ``_C`` could not be loaded, or None when it loaded."""
    _load()
    return _error


def warn_missing_once() -> None:
    """Emit the single 'native library unavailable' warning of this process."""
    global _warned
    if _warned or native() is not None:
        return
    _warned = True
    warnings.warn(
        f"kdkernels: the compiled library kdkernels._C is unavailable ({_error}); "
        "falling back to slower backends. `python -m kdkernels info` explains.",
        RuntimeWarning,
        stacklevel=3,
    )


def build_info() -> dict:
    """What ``_C`` was built with ({} when it did not load)."""
    mod = native()
    return dict(mod.build_info()) if mod is not None else {}
