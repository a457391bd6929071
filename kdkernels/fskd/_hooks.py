"""Finding, hooking and replacing submodules by their dotted names."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List

import torch
from torch import nn


class StopForward(BaseException):
    """Raised by a hook once everything a pass needs is captured: the rest of the
    forward is skipped. A BaseException so that a model's ``except Exception``
    cannot swallow it."""


def find_module(model: nn.Module, name: str, what: str) -> nn.Module:
    """``model``'s submodule called ``name``, or a ValueError naming close matches."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a module name (str), got {type(name).__name__}")
    modules: Dict[str, nn.Module] = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"{what} {name!r} is not a submodule of {type(model).__name__}{hint}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def first_tensor(output, where: str) -> torch.Tensor:
    """The tensor a module returned (its first element when it returned a tuple)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{where} returned {type(output).__name__}, expected a tensor")
    return output


class Hooks:
    """A set of forward hooks removed together (use as a context manager)."""

    def __init__(self):
        self._handles: List = []

    def forward(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def pre(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False
