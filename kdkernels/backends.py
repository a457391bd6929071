"""Which backends exist here, why the others do not, and which one an op uses.

Backends, per device (docs/design.md "Ops and backends"):

- CUDA tensors: ``triton`` (default), ``cuda`` (csrc, where built), ``torch``.
- CPU tensors: ``cpp`` (default), ``torch``, and ``triton`` only when
  ``TRITON_INTERPRET=1`` (the interpreter runs the GPU kernels on CPU tensors).

The choice depends on the device, the op and the environment only, never on
tensor values. A backend named explicitly (``backend=`` or
``KDKERNELS_BACKEND``) either serves or raises saying why; ``auto`` takes the
first that can serve, silently.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from . import _native

BACKENDS = ("triton", "cuda", "cpp", "torch")
ENV_VAR = "KDKERNELS_BACKEND"
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

# op name -> backends it implements; filled by kdkernels.ops.<op> at import.
_OP_BACKENDS: Dict[str, Tuple[str, ...]] = {}


def register_op(op: str, backends: Tuple[str, ...]) -> None:
    """Declare which backends ``op`` implements (called once per op module)."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"register_op({op!r}): unknown backends {sorted(unknown)}")
    _OP_BACKENDS[op] = tuple(backends)


def triton_interpret() -> bool:
    """True when the Triton interpreter is switched on (CPU tensors can run Triton kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_ERROR: List[Optional[str]] = []  # filled once; a plain global so torch.compile traces it cheaply


def _triton_import_error() -> Optional[str]:
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_ERROR.append(None)
        except Exception as exc:
            _TRITON_ERROR.append(f"triton is not importable ({type(exc).__name__}: {exc})")
    return _TRITON_ERROR[0]


def _status(backend: str, device_type: str) -> Tuple[bool, str]:
    """(usable, reason) for ``backend`` on tensors of ``device_type``, for any op."""
    if backend == "torch":
        return True, "plain PyTorch reference"
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return False, err
        if device_type == "cuda":
            return True, "Triton kernels on CUDA"
        if device_type == "cpu":
            if triton_interpret():
                return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
            return False, "Triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
        return False, f"Triton kernels are not built for {device_type} tensors"
    mod = _native.native()
    if mod is None:
        return False, f"kdkernels._C did not load ({_native.load_error()})"
    if backend == "cpp":
        if device_type == "cpu":
            return True, "fused C++ kernels in kdkernels._C"
        return False, f"the C++ kernels serve CPU tensors only, not {device_type}"
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the CUDA kernels serve CUDA tensors only, not {device_type}"
        if not mod.build_info().get("with_cuda"):
            return False, "kdkernels._C was built without CUDA (no nvcc at build time, or KDKERNELS_CUDA=0)"
        return True, "CUDA kernels in kdkernels._C"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'")


def implemented_backends(op: str) -> Tuple[str, ...]:
    """The backends ``op`` implements (whether or not they can run here)."""
    return _OP_BACKENDS.get(op, ())


def backend_status(op: str, device: torch.device | str) -> List[Tuple[str, bool, str]]:
    """For each backend: (name, usable for ``op`` on ``device``, reason)."""
    device_type = torch.device(device).type
    implemented = _OP_BACKENDS.get(op, ())
    rows = []
    for name in BACKENDS:
        if name not in implemented:
            rows.append((name, False, f"{op} has no {name} implementation"))
            continue
        ok, why = _status(name, device_type)
        rows.append((name, ok, why))
    return rows


def available_backends(op: str, device: torch.device | str) -> List[str]:
    """Names of the backends that can run ``op`` on ``device`` here."""
    return [name for name, ok, _ in backend_status(op, device) if ok]


def choose_backend(op: str, device: torch.device, requested: Optional[str] = None) -> str:
    """The backend ``op`` runs with: ``requested``, else $KDKERNELS_BACKEND, else auto."""
    name = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if not isinstance(name, str):
        raise TypeError(f"{op}: backend must be a string such as 'auto' or one of {BACKENDS}, "
                        f"got {type(name).__name__}")
    name = name.lower()
    device_type = device.type
    implemented = _OP_BACKENDS[op]
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ()):
            if candidate in implemented and _status(candidate, device_type)[0]:
                if candidate == "torch" and device_type == "cpu" and "cpp" in implemented:
                    _native.warn_missing_once()
                return candidate
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    if name not in implemented:
        raise ValueError(f"{op}: backend {name!r} is not implemented (it has {implemented})")
    ok, why = _status(name, device_type)
    if not ok:
        raise RuntimeError(f"{op}: backend {name!r} cannot run on {device_type} tensors here: {why}")
    return name
