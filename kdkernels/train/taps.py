r"""Feature taps: named modules' outputs (or inputs), caught with forward hooks.

A tap name is a submodule name as in ``model.named_modules()``:

* ``"layer2"`` - the module's output (post-activation for a ResNet stage);
* ``"layer2.1.bn2"`` - a BN's output, i.e. before the nonlinearity;
* ``"layer2.1.relu:input"`` - what the module receives: with ``:input`` the
  tap reads the first positional argument of the call instead of the output.
  This is how one gets the pre-activation sum of a torchvision ``BasicBlock``
  (``out += identity; out = self.relu(out)``) without editing the model.

A module that runs several times in one forward pass (torchvision's blocks
call their one ``relu`` twice) is read at its **last** call; :meth:`probe`
reports the counts in :attr:`FeatureTaps.calls`.

In-place edits. When the model later modifies the tapped tensor in place
(``ReLU(inplace=True)``, ``out += identity``), the value kept would silently
become the modified one. With ``clone="auto"`` the dry run (:meth:`probe`)
watches the tensors' version counters and switches those taps to keeping a
copy; a modification that shows up only later raises an error instead of
returning a wrong feature.

The hooks are registered once and do nothing unless the taps are armed, i.e.
inside :meth:`FeatureTaps.__call__` / :meth:`probe`: running the model on its
own (evaluation, export) is unaffected and keeps no tensors alive.

Taps on the model's output. Models that return their features (mdistiller's
``(logits, {"feats": [...], "preact_feats": [...], "pooled_feat": ...})``)
compute some of them inline - a pre-activation sum with a functional ReLU has
no module to hook. Such a feature is named by where it lies in the output: an
:class:`Output` (``Output(1, "preact_feats", 2)`` is ``out[1]["preact_feats"][2]``,
``Output(fn)`` is ``fn(out)``) or a plain callable, next to module-name taps in
the same list. The forward pass then always runs to the end (``stop=True`` has
no effect), since the output exists only there.

One process, one forward at a time: the taps keep their features on the
object, so use DistributedDataParallel (one model per process), not the
multi-threaded ``nn.DataParallel``.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..fskd._hooks import StopForward, find_module, first_tensor

INPUT_SUFFIX = ":input"

__all__ = ["FeatureTaps", "Output", "StopForward", "eval_mode", "first_input"]


def _describe(value) -> str:
    """A short description of a value inside a model's output, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"dict with keys {', '.join(repr(k) for k in value)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


class Output:
    """Where a value lies in a model's output: a path of keys and indices, or a callable.

    ``Output(0)`` is ``out[0]``; ``Output(1, "feats", 2)`` is ``out[1]["feats"][2]``;
    ``Output("logits")`` is ``out["logits"]`` (an attribute when ``out`` has no item
    of that name, e.g. a HuggingFace ``ModelOutput``); ``Output(fn)`` is ``fn(out)``.
    Used as a feature tap (in the lists that take module names) and for the
    logits (``student_logits=`` / ``teacher_logits=`` of the distillers).
    """

    def __init__(self, *path):
        if not path:
            raise ValueError("Output needs a path of keys / indices or one callable, got nothing")
        self.fn: Optional[Callable[[Any], Any]] = None
        if len(path) == 1 and callable(path[0]) and not isinstance(path[0], (str, int)):
            self.fn = path[0]
            path = ()
        for k in path:
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"Output: a path holds str keys and int indices, got {k!r} in {path!r}")
        self.path: Tuple = tuple(path)

    @classmethod
    def of(cls, where, what: str) -> "Output":
        """``where`` as an Output: an Output, a key (str), an index (int) or a callable."""
        if isinstance(where, Output):
            return where
        if isinstance(where, (str, int)) and not isinstance(where, bool) or callable(where):
            return cls(where)
        raise TypeError(f"{what} must be a key (str), an index (int), a callable or an Output, "
                        f"got {type(where).__name__}")

    def __call__(self, output):
        if self.fn is not None:
            return self.fn(output)
        value = output
        for depth, k in enumerate(self.path):
            try:
                if isinstance(k, str) and not isinstance(value, dict) and hasattr(value, k):
                    value = getattr(value, k)
                else:
                    value = value[k]
            except (KeyError, IndexError, TypeError):
                where = "out" + "".join(f"[{p!r}]" for p in self.path[:depth])
                raise ValueError(f"{self!r}: {where} is a {_describe(value)}: it has no "
                                 f"{'key' if isinstance(k, str) else 'index'} {k!r}") from None
        return value

    def __repr__(self) -> str:
        if self.fn is not None:
            return f"Output({getattr(self.fn, '__name__', repr(self.fn))})"
        return f"Output({', '.join(repr(k) for k in self.path)})"


def _tap_spec(name, i: int) -> Union[str, Output]:
    if isinstance(name, Output):
        return name
    if isinstance(name, str):
        return name
    if callable(name):
        return Output(name)
    raise TypeError(f"tap {i} must be a module name (str), or an Output / a callable that picks "
                    f"the feature from the model's output, got {type(name).__name__}")


class eval_mode:
    """Context manager: ``modules`` in eval mode, every module's flag restored on exit."""

    def __init__(self, *models: nn.Module):
        self._models = models
        self._saved: List[Tuple[nn.Module, bool]] = []

    def __enter__(self):
        self._saved = [(m, m.training) for model in self._models for m in model.modules()]
        for m, _ in self._saved:
            m.training = False
        return self

    def __exit__(self, *exc):
        for m, flag in self._saved:
            m.training = flag
        self._saved = []
        return False


def first_input(batch) -> torch.Tensor:
    """The input tensor of a batch given as a tensor or as an ``(inputs, labels, ...)`` tuple."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"expected a tensor batch or an (inputs, ...) tuple, got {type(batch).__name__}")
    return batch


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


class _Hook:
    """One tap's hook. A small object rather than a closure, so that deep copies
    of a hooked model point at the copied :class:`FeatureTaps`."""

    def __init__(self, taps: "FeatureTaps", index: int):
        self.taps = taps
        self.index = index

    def __call__(self, module, args, output=None):
        taps = self.taps
        if not taps._armed:
            return None
        i = self.index
        name = taps.names[i]
        value = first_tensor(args if taps._is_input[i] else output, f"tap {name!r}")
        if taps.clone_flags[i]:
            value = value.clone()
        taps._feats[i] = value
        taps._versions[i] = _version(value)
        taps._count[i] += 1
        if taps._stop and all(c >= need for c, need in zip(taps._count, taps.calls)):
            raise StopForward
        return None


class FeatureTaps:
    """Catch the outputs (or inputs) of ``model``'s named submodules.

    Args:
        model: the network; it is not modified except for the (dormant) hooks.
        names: tap names, see the module docstring (``"layer1"``,
            ``"layer2.1.bn2"``, ``"layer2.1.relu:input"``), or :class:`Output`
            selectors / callables that pick a feature from the model's output.
        clone: ``"auto"`` (copy only the taps that the dry run sees modified
            in place), ``True`` (always copy) or ``False`` (never; a later
            in-place modification raises).

    Example::

        taps = FeatureTaps(resnet, ["layer1", "layer2", "layer3"])
        shapes = taps.probe(images[:2])     # eval-mode dry run: [(64, 56, 56), ...]
        logits, feats = taps(images)        # feats in the order of ``names``
        _, feats = taps(images, stop=True)  # skip what runs after the last tap

    ``stop=True`` ends the forward pass as soon as every tap has been read (its
    output is then ``None``): layers after the last tap do not run, so they
    neither cost time nor update their BN statistics.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, clone: Union[str, bool] = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise ValueError(f"names must be a non-empty list of module names, got {names!r}")
        if clone not in ("auto", True, False):
            raise ValueError(f"clone must be 'auto', True or False, got {clone!r}")
        specs = [_tap_spec(n, i) for i, n in enumerate(names)]
        self.model = model
        #: per tap, the Output that picks it from the model's output (None for a module tap)
        self.outputs: List[Optional[Output]] = [s if isinstance(s, Output) else None for s in specs]
        self.names: List[str] = [s if isinstance(s, str) else repr(s) for s in specs]
        self._is_input = [o is None and n.endswith(INPUT_SUFFIX) for n, o in zip(self.names, self.outputs)]
        self.clone_flags = [clone is True] * len(self.names)
        self._auto = clone == "auto"
        #: calls of each tapped module in one forward pass (1 until :meth:`probe` ran)
        self.calls: List[int] = [1] * len(self.names)
        #: per-sample shapes (C, H, W) or (C,) found by :meth:`probe`
        self.shapes: Optional[List[torch.Size]] = None
        self._armed = False
        self._stop = False
        self._feats: List[Optional[torch.Tensor]] = []
        self._versions: List[Optional[int]] = []
        self._count: List[int] = []
        self._handles = []
        for i, name in enumerate(self.names):
            if self.outputs[i] is not None:
                continue
            mod_name = name[: -len(INPUT_SUFFIX)] if self._is_input[i] else name
            module = find_module(model, mod_name, "tap")
            hook = _Hook(self, i)
            if self._is_input[i]:
                self._handles.append(module.register_forward_pre_hook(hook))
            else:
                self._handles.append(module.register_forward_hook(hook))

    # ------------------------------------------------------------------ running
    def _reset(self):
        n = len(self.names)
        self._feats = [None] * n
        self._versions = [None] * n
        self._count = [0] * n

    def _read_outputs(self, out) -> None:
        """Fill the output taps from the model's output ``out``."""
        for i, sel in enumerate(self.outputs):
            if sel is None:
                continue
            value = sel(out)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"tap {self.names[i]} picked a {_describe(value)} from the output of "
                                f"{type(self.model).__name__}, expected a tensor")
            self._feats[i] = value
            self._count[i] += 1

    def _run(self, args, kwargs, stop: bool):
        self._reset()
        # the output taps exist only once the forward has returned: never stop early then
        self._armed, self._stop = True, stop and not any(o is not None for o in self.outputs)
        out = None
        try:
            out = self.model(*args, **kwargs)
        except StopForward:
            out = None
        finally:
            self._armed, self._stop = False, False
        if out is not None:
            self._read_outputs(out)
        missing = [n for n, f in zip(self.names, self._feats) if f is None]
        if missing:
            raise RuntimeError(f"taps {missing} did not run in the forward pass of "
                               f"{type(self.model).__name__}")
        return out

    def _modified(self) -> List[int]:
        return [i for i, (f, v) in enumerate(zip(self._feats, self._versions))
                if not self.clone_flags[i] and v is not None and _version(f) != v]

    def __call__(self, *args, stop: bool = False, **kwargs) -> Tuple[object, List[torch.Tensor]]:
        """Run the model; return ``(output, features)`` (output ``None`` when stopped)."""
        out = self._run(args, kwargs, stop)
        bad = self._modified()
        feats, self._feats = self._feats, []
        if bad:
            names = [self.names[i] for i in bad]
            raise RuntimeError(
                f"taps {names} were modified in place after they were caught (e.g. by "
                f"ReLU(inplace=True) or `out += identity`), so they no longer hold the module's "
                f"value; build the taps with clone=True (or let probe() see the same code path)")
        return out, feats

    def probe(self, *args, **kwargs) -> List[torch.Size]:
        """Dry run in eval mode under ``no_grad``: shapes, call counts, in-place checks.

        Every module's train/eval flag is restored afterwards, and because BN
        runs in eval mode its running statistics are not touched.
        Returns the per-sample shapes (without the batch dimension).
        """
        with eval_mode(self.model), torch.no_grad():
            self._reset()
            self._armed = True
            try:
                out = self.model(*args, **kwargs)
            finally:
                self._armed = False
            self._read_outputs(out)
        missing = [n for n, f in zip(self.names, self._feats) if f is None]
        if missing:
            raise RuntimeError(f"taps {missing} did not run in the forward pass of "
                               f"{type(self.model).__name__}")
        if self._auto:
            for i in self._modified():
                self.clone_flags[i] = True
        self.calls = list(self._count)
        self.shapes = [f.shape[1:] for f in self._feats]
        self._feats = []
        return list(self.shapes)

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __repr__(self) -> str:
        return f"FeatureTaps({type(self.model).__name__}, {self.names})"


def as_4d(feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """(N, C) features (a pooled vector) as (N, C, 1, 1); others unchanged."""
    return [f.view(f.shape[0], f.shape[1], 1, 1) if f.dim() == 2 else f for f in feats]


def shape_4d(shape: torch.Size) -> Tuple[int, int, int]:
    """Per-sample (C,) or (C, H, W) as (C, H, W)."""
    if len(shape) == 1:
        return int(shape[0]), 1, 1
    if len(shape) != 3:
        raise ValueError(f"expected a (C,) or (C, H, W) feature per sample, got {tuple(shape)}")
    return tuple(int(s) for s in shape)
