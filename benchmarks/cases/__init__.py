"""Benchmark cases, one module per op: ``benchmarks/cases/<op>.py``.

Adding an op = adding a file here (nothing to register). The module defines::

    from harness import Case, tensor_bytes

    def cases(device: str, quick: bool) -> list[Case]:
        ...

returning the op's configurations for ``device`` ("cpu" or "cuda"); ``quick``
asks, on CPU, for one or two tiny shapes (the CI smoke run) and, on CUDA, for
one or two real configurations at a modest batch (the GPU quick mode: every op
in well under a minute, compilation included). See :class:`harness.Case`
for the fields: label and shape, ``make_inputs`` (fresh tensors, with
``requires_grad`` on what is differentiated), ``reference`` (plain PyTorch; the
``eager`` provider, compiled for ``compile``, and the float64 oracle),
``kdkernels`` (the package's op, called with ``backend=``), ``backend_op`` (its
name in ``kdkernels.backends``) and the minimum bytes moved forward/backward.
Keep the default CPU run of all ops at about a minute on a 2-core machine.

Import what the cases measure at the top of the module, with no guard: a
module that fails to import, or whose ``cases`` raises, is reported with its
traceback, the other ops still run, and the run exits non-zero.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import List

# Display order; ops not listed follow alphabetically.
ORDER = ("hcl", "abf", "reviewkd", "hint", "kd", "fskd", "sskd")


def available_ops() -> List[str]:
    """Names of the op modules present in this folder."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def load(op: str) -> ModuleType:
    """Import ``cases.<op>`` (raises ImportError/ModuleNotFoundError like any import)."""
    return importlib.import_module(f"{__name__}.{op}")
