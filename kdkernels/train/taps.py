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

One process, one forward at a time: the taps keep their features on the
object, so use DistributedDataParallel (one model per process), not the
multi-threaded ``nn.DataParallel``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..fskd._hooks import StopForward, find_module, first_tensor

INPUT_SUFFIX = ":input"

__all__ = ["FeatureTaps", "StopForward", "eval_mode", "first_input"]


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
            ``"layer2.1.bn2"``, ``"layer2.1.relu:input"``).
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
        self.model = model
        self.names: List[str] = [str(n) for n in names]
        self._is_input = [n.endswith(INPUT_SUFFIX) for n in self.names]
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

    def _run(self, args, kwargs, stop: bool):
        self._reset()
        self._armed, self._stop = True, stop
        out = None
        try:
            out = self.model(*args, **kwargs)
        except StopForward:
            out = None
        finally:
            self._armed, self._stop = False, False
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
                self.model(*args, **kwargs)
            finally:
                self._armed = False
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
