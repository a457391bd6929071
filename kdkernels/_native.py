"""Loads the compiled library ``kdkernels._C`` once, and says why when it cannot.

A missing or broken ``_C`` is not fatal: the ops fall back to the next backend
(ultimately the plain-PyTorch reference) after one warning at first use.

A ``_C`` that cannot load because this system's C/C++ runtime is older than the
one it was built against (``version `GLIBC_2.34' not found``, ``version
`GLIBCXX_3.4.30' not found``) is a wheel built for a different kind of node:
that is said once at ``import kdkernels``, with the missing version and what to
do, instead of only as the fallback warning at the first op.
"""
from __future__ import annotations

import os
import platform
import re
import sys
import warnings
from types import FrameType, ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
_error: Optional[str] = None
_loaded = False
_warned = False

# What the dynamic loader says when a library needs a symbol version this system lacks:
#   /lib64/libstdc++.so.6: version `GLIBCXX_3.4.30' not found (required by .../_C.cpython-311-x86_64-linux-gnu.so)
_VERSION_NOT_FOUND = re.compile(r"(?P<lib>[^\s:]+): version [`'](?P<version>[^']+)' not found")

REMEDY = ("What to do: install a wheel built by `tools/build_wheels.sh` (tagged manylinux_2_28: "
          "libstdc++ linked in, needs glibc >= 2.28 only), or build from source on this node "
          "(`pip install .` in a kdkernels checkout; needs a C++17 compiler). Until then kdkernels falls "
          "back to its Triton and plain-PyTorch backends (slower on CPU); `python -m kdkernels info` "
          "shows what runs where.")


def _import_native() -> ModuleType:
    from . import _C  # type: ignore[attr-defined]

    return _C


def explain(message: str) -> Optional[str]:
    """A runtime-mismatch explanation of the loader's ``message``, or None when it is not one."""
    match = _VERSION_NOT_FOUND.search(message)
    if match is None:
        return None
    lib, version = match.group("lib"), match.group("version")
    libc, libc_version = platform.libc_ver()
    here = f"this system has {libc} {libc_version}" if libc else "this system's C library is older"
    if version.startswith("GLIBC_"):
        need = version[len("GLIBC_"):]
        what = (f"it needs glibc {need} ({version} in {lib}) but {here}: the wheel was built on a newer "
                "Linux than this node")
    elif version.startswith(("GLIBCXX_", "CXXABI_")):
        what = (f"it needs the C++ runtime version {version}, which {lib} here lacks (the system's "
                "libstdc++ is older than the GCC that built the wheel; "
                f"{here})")
    else:
        what = f"it needs the symbol version {version}, which {lib} here lacks"
    return (f"kdkernels._C cannot load on this system: {what}. Loader message: {message}. {REMEDY}")


def _load() -> None:
    global _module, _error, _loaded
    if _loaded:
        return
    _loaded = True
    try:
        _module = _import_native()
    except Exception as exc:  # ImportError, or an undefined symbol in a broken build
        _error = explain(str(exc)) or f"{type(exc).__name__}: {exc}"


def native() -> Optional[ModuleType]:
    """The ``_C`` module, or None (see :func:`load_error`)."""
    _load()
    return _module


def load_error() -> Optional[str]:
    """Why ``_C`` could not be loaded, or None when it loaded."""
    _load()
    return _error


def _package_dirs() -> tuple:
    """Directories whose frames are not the user's: kdkernels itself and torch (nn.Module.__call__, torch.ops)."""
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        dirs.append(os.path.dirname(os.path.abspath(torch.__file__)))
    return tuple(d + os.sep for d in dirs)


def _is_importlib(frame: FrameType) -> bool:
    # warnings.warn skips these frames when it counts stacklevel (e.g. during `import kdkernels`).
    name = frame.f_code.co_filename
    return "importlib" in name and "_bootstrap" in name


def _user_stacklevel() -> int:
    """``stacklevel`` for a warnings.warn made by our caller that names the first frame outside kdkernels and torch."""
    inside = _package_dirs()
    frame = sys._getframe(1)  # the function that calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame = frame.f_back
        while frame is not None and _is_importlib(frame):
            frame = frame.f_back
        level += 1
    return level


def warn_if_incompatible() -> None:
    """At import: warn when ``_C`` is there but this system's C/C++ runtime is too old for it."""
    _load()
    if _error is not None and _error.startswith("kdkernels._C cannot load on this system"):
        warnings.warn(_error, RuntimeWarning, stacklevel=_user_stacklevel())


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
        stacklevel=_user_stacklevel(),
    )


def build_info() -> dict:
    """What ``_C`` was built with ({} when it did not load)."""
    mod = native()
    return dict(mod.build_info()) if mod is not None else {}


warn_if_incompatible()
