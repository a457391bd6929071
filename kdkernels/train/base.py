r"""What every distiller shares: the teacher kept out of the module tree, the
teacher's no-grad eval-mode forward, stage-wise freezing, epoch bookkeeping.

Where the teacher lives. A distiller holds the student (and its adapters) as
ordinary submodules and the teacher as a plain attribute, outside the module
tree. So:

* ``distiller.parameters()`` is exactly the student's and the adapters'
  parameters: hand it to the optimiser as is;
* ``distiller.state_dict()`` (and so a checkpoint) holds no teacher weights;
* DistributedDataParallel neither broadcasts nor all-reduces the teacher;
* ``distiller.train()`` does not switch the teacher to training mode.

``distiller.to(...)`` / ``.cuda()`` / ``.half()`` still move the teacher along
(``_apply`` is forwarded to it). The alternative, a registered but frozen
teacher filtered out of ``parameters()``, would leak the teacher into
``state_dict``, DDP's buffer broadcast and ``train()``; keeping it out avoids all
three with one rule.

The teacher always runs in eval mode under ``torch.no_grad()``: its BN
statistics never change, and the train/eval flags the caller left on its
modules are restored after every call.
"""
from __future__ import annotations

import importlib
from typing import Dict, Iterable, List, Optional, Sequence, Set

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as checks
from .taps import FeatureTaps, Output, eval_mode, first_input

Losses = Dict[str, torch.Tensor]


def check_real(value, name: str, *, positive: bool = False) -> float:
    """A constructor argument that must be a finite real number ``>= 0`` (``> 0`` when ``positive``)."""
    return checks.check_real(value, name, bound="> 0" if positive else ">= 0")


def _lazy(module: str, name: str):
    mod = importlib.import_module(module)
    try:
        return getattr(mod, name)
    except AttributeError:
        raise ImportError(f"{module}.{name} is not available in this build of kdkernels") from None


def op(name: str):
    """``kdkernels.<name>``, imported when first needed (the ops may load after this package)."""
    return _lazy("kdkernels", name)


def nn_module(name: str):
    """``kdkernels.nn.<name>``, imported when first needed."""
    return _lazy("kdkernels.nn", name)


def logits_of(output, where=None, what: str = "the model") -> torch.Tensor:
    """The logits in a model's output.

    ``where`` (an :class:`~kdkernels.train.Output`, a key, an index or a callable)
    says where they are; without it: a tensor, a ``{"logits": ...}`` dict, an object
    with ``.logits``, or a ``(logits, dict)`` pair (mdistiller's ``(logits,
    {"feats": ...})``; a distiller's own ``(logits, losses)``).
    """
    if where is not None:
        try:
            value = Output.of(where, "logits")(output)
        except ValueError as exc:
            raise ValueError(f"the logits of {what}: {exc}") from None
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the logits of {what} ({where!r}) are a {type(value).__name__}, expected a tensor")
        return value
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if (isinstance(output, (tuple, list)) and len(output) >= 2 and isinstance(output[0], torch.Tensor)
            and all(isinstance(o, dict) for o in output[1:])):
        return output[0]
    raise TypeError(f"cannot find logits in the output of {what}, a {type(output).__name__}: return a "
                    f"tensor, a dict with 'logits', an object with .logits or a (logits, dict) pair, or "
                    f"say where they are with student_logits= / teacher_logits= (a key, an index, a "
                    f"callable or an Output)")


def sample_input(sample, n: int = 2) -> torch.Tensor:
    """A small slice of a sample batch (tensor or (inputs, ...) tuple) for dry runs."""
    x = first_input(sample)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError("sample must hold at least one input")
    return x[:n]


def device_of(module: nn.Module) -> Optional[torch.device]:
    p = next(module.parameters(), None)
    if p is None:
        p = next(module.buffers(), None)
    return None if p is None else p.device


class Distiller(nn.Module):
    """Base class: ``forward(images, labels)`` -> ``(logits, losses)``.

    ``losses`` maps names to already-weighted 0-dim terms; the training loss is
    ``sum(losses.values())``. ``logits`` are the student's (``None`` in stages
    that do not run the whole student). Subclasses implement :meth:`forward`.

    ``student_logits`` / ``teacher_logits`` (keyword arguments of KD,
    FitNets, ReviewKD and FSKD) say where the logits are in a model's output: a key, an index, a
    callable or an :class:`~kdkernels.train.Output` path; by default
    :func:`logits_of` finds them in a tensor, a ``{"logits": ...}`` dict, an
    object with ``.logits`` or a ``(logits, dict)`` pair.

    Schedules that depend on the epoch (ReviewKD's warm-up, FitNets' annealed
    KD weight) read :attr:`epoch` (1-based, set by :meth:`set_epoch`;
    :func:`~kdkernels.train.fit` calls it at the start of every epoch, a
    hand-written loop calls it itself).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, register_student: bool = True,
                 student_logits=None, teacher_logits=None):
        super().__init__()
        for model, what in ((student, "student"), (teacher, "teacher")):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{what} must be an nn.Module, got {type(model).__name__}")
        if student is teacher:
            raise ValueError("student and teacher are the same module")
        if register_student:
            self.student = student
        self.__dict__["_teacher"] = teacher  # outside the module tree: see the module docstring
        # where the logits are in each model's output (None: found by logits_of's rules)
        self._logits_where = tuple(None if w is None else Output.of(w, name) for w, name in
                                   ((student_logits, "student_logits"), (teacher_logits, "teacher_logits")))
        self.epoch = 1
        self.epochs: Optional[int] = None
        self.stage = None
        self._base_requires_grad: Dict[str, bool] = {}
        self._frozen_modules: List[str] = []

    # ---------------------------------------------------------------- teacher
    @property
    def teacher(self) -> nn.Module:
        return self.__dict__["_teacher"]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.teacher._apply(fn)
        return self

    def teacher_forward(self, fn, *args, **kwargs):
        """``fn(*args)`` with the teacher in eval mode under ``no_grad`` (flags restored)."""
        with eval_mode(self.teacher), torch.no_grad():
            return fn(*args, **kwargs)

    # ------------------------------------------------------------- schedules
    def set_epoch(self, epoch: int, epochs: Optional[int] = None) -> None:
        """Tell epoch-dependent schedules where training is (``epoch`` 1-based, of ``epochs``)."""
        self.epoch = epoch
        if epochs is not None:
            self.epochs = epochs

    def get_extra_state(self):
        return {"epoch": self.epoch, "epochs": self.epochs, "stage": self.stage}

    def set_extra_state(self, state):
        self.epoch, self.epochs = state["epoch"], state["epochs"]
        if state.get("stage") is not None and state["stage"] != self.stage:
            self.set_stage(state["stage"])

    def set_stage(self, stage) -> None:
        raise ValueError(f"{type(self).__name__} has no stages")

    # --------------------------------------------------------------- freezing
    def _remember_trainable(self) -> None:
        """Record which parameters were trainable at construction; stages only ever freeze those."""
        self._base_requires_grad = {n: p.requires_grad for n, p in self.named_parameters()}

    def _train_only(self, param_names: Iterable[str], frozen_modules: Sequence[str]) -> None:
        """Make exactly ``param_names`` (names in this distiller) trainable, and keep the
        modules named in ``frozen_modules`` in eval mode while the distiller trains."""
        keep = set(param_names)
        for n, p in self.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, False) and n in keep)
        before, self._frozen_modules = self._frozen_modules, list(frozen_modules)
        if self.training:  # switch only what the stage change concerns
            modules = dict(self.named_modules())
            for n in before:
                if n not in self._frozen_modules:
                    modules[n].training = True
            for n in self._frozen_modules:
                modules[n].training = False

    def _frozen_by_params(self, trainable: Set[str], buffer_only: Sequence[str] = ()) -> List[str]:
        """Names of modules to keep in eval mode: those owning parameters that were
        trainable at construction, none of which is in ``trainable``; plus ``buffer_only``."""
        out = []
        for name, m in self.named_modules():
            own = [f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)]
            if (own and any(self._base_requires_grad.get(n, False) for n in own)
                    and not any(n in trainable for n in own)):
                out.append(name)
        return out + [n for n in buffer_only if n not in out]

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self._frozen_modules:
            modules = dict(self.named_modules())
            for n in self._frozen_modules:  # frozen parts keep their BN statistics
                modules[n].training = False
        return self

    def close(self) -> None:
        """Remove every feature tap's hooks and give each parameter back the
        ``requires_grad`` it had when the distiller was built (stages change it)."""
        for n, p in self.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))
        self._frozen_modules = []
        for value in list(vars(self).values()) + [m.__dict__.get("taps") for m in self.modules()]:
            for taps in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(taps, FeatureTaps):
                    taps.remove()

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters the current stage trains (``requires_grad``)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- helpers
    def student_logits(self, output) -> torch.Tensor:
        """The logits in the student's ``output`` (``student_logits=`` says where)."""
        return logits_of(output, self._logits_where[0], "the student")

    def teacher_logits(self, output) -> torch.Tensor:
        """The logits in the teacher's ``output`` (``teacher_logits=`` says where)."""
        return logits_of(output, self._logits_where[1], "the teacher")

    def task_loss(self, logits: torch.Tensor, labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if labels is None:
            return None
        return F.cross_entropy(logits, labels)

    def extra_repr(self) -> str:
        return f"teacher={type(self.teacher).__name__} (not a submodule), stage={self.stage}"


def reachable_params(model: nn.Module, taps: FeatureTaps, x: torch.Tensor) -> List[Set[str]]:
    """For each tap, names (in ``model``) of the trainable parameters its value depends on.

    One eval-mode forward (flags restored, BN statistics untouched) stopped at
    the last tap, then ``autograd.grad`` of each feature: a parameter belongs
    to a tap's set exactly when it is in that feature's autograd graph.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    sets: List[Set[str]] = []
    with eval_mode(model), torch.enable_grad():
        _, feats = taps(x, stop=True)
        for f in feats:
            if not f.requires_grad or not params:
                sets.append(set())
                continue
            grads = torch.autograd.grad(f.float().sum(), params, allow_unused=True, retain_graph=True)
            sets.append({n for (n, _), g in zip(named, grads) if g is not None})
    return sets


def execution_stage(model: nn.Module, taps: FeatureTaps, x: torch.Tensor) -> Dict[str, int]:
    """module name -> how many taps had been read when the module first started.

    A module that starts before the first tap is read gets 0; one that starts
    after the last gets ``len(taps.names)``; a module that never runs is absent.
    """
    order: Dict[str, int] = {}
    handles = []

    def pre_for(name):
        def pre(_module, _args):
            if name not in order:
                order[name] = sum(1 for f in taps._feats if f is not None)
        return pre

    try:
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(pre_for(name)))
        with eval_mode(model), torch.no_grad():
            taps(x)
    finally:
        for h in handles:
            h.remove()
    return order
