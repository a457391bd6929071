r"""FitNets: hints from a teacher layer to a student layer (docs/spec.md §3).

Two variants:

* the paper's two stages (``two_stage=True``, the default).
  Stage 1 trains the student *up to the guided layer* plus the regressor on
  the hint loss alone; the student's forward pass stops at the guided layer,
  so the layers after it neither train nor update their BN statistics.
  Stage 2 trains the whole student on ``CE + lambda * KD`` with lambda
  annealed linearly from ``kd_weight[0]`` (4) in the first epoch to
  ``kd_weight[1]`` (1) in the last, temperature 3; the regressor is frozen.
  As in the paper, the KD term is the soft-target cross-entropy without the
  T^2 factor: ``lambda * kd_loss(s, t, T) / T^2`` (``kd_loss`` includes T^2; the
  difference to the paper's H(p_t, p_s) is the teacher's entropy, a constant).
* the common single stage (``two_stage=False``, RepDistiller / mdistiller):
  ``ce_weight * CE + hint_weight * hint`` from the start, everything trained.

The regressor: ``"1x1"`` is a 1x1 conv (with bias) fed to the fused
:func:`kdkernels.hint_loss`, which never materialises the regressed map;
``"convreg"`` is :class:`kdkernels.nn.ConvReg` (conv + BN + ReLU, also for
different spatial sizes) with :class:`kdkernels.nn.HintLoss`; ``"auto"`` takes
``"1x1"`` when student and teacher maps have the same height and width.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .base import Distiller, Losses, check_real, device_of, nn_module, op, reachable_params, sample_input
from .taps import FeatureTaps, shape_4d

REGRESSORS = ("auto", "1x1", "convreg")


class FitNets(Distiller):
    r"""FitNets hint training for any pair of models, tapped by module name.

    Args:
        student, teacher: the networks (unchanged; the taps are forward hooks).
        student_layer: the guided layer, e.g. ``"layer2"`` (see :class:`FeatureTaps`), or an
            :class:`Output` that picks it from the model's output (``Output(1, "feats", 2)``).
        teacher_layer: the hint layer, e.g. ``"layer2"`` or ``Output(1, "preact_feats", 2)``.
        sample: a batch (or ``(inputs, labels)``) for the eval-mode shape dry run.
        two_stage: the paper's two stages (True) or the single-stage variant.
        hint_weight: weight of the hint loss; default 1 for two stages (stage 1
            is the hint loss alone), 100 for one stage (RepDistiller/mdistiller).
        ce_weight: weight of the cross-entropy.
        kd_weight: stage 2's lambda, ``(first_epoch, last_epoch)`` for a linear
            anneal (paper: (4, 1)) or one number for a constant.
        temperature: stage 2's KD temperature (paper: 3).
        regressor: ``"auto"``, ``"1x1"`` or ``"convreg"`` (module docstring).
        student_logits, teacher_logits: where the logits are in each model's output
            (see :class:`Distiller`).

    Stage 1 / stage 2 (two-stage)::

        distiller = FitNets(student, teacher, "layer2", "layer2", sample=images[:2])
        fit(distiller, loader, epochs=30, optimizer=Adam(distiller.parameters()))  # hint only
        distiller.set_stage(2)
        fit(distiller, loader, epochs=100, optimizer=Adam(distiller.parameters()))  # CE + KD

    In stage 1 ``forward`` returns ``(None, {"hint": ...})``; in stage 2
    ``(logits, {"ce", "kd"})``; single stage ``(logits, {"ce", "hint"})``.
    Parameters outside the stage get ``requires_grad=False``, so one optimiser
    over ``distiller.parameters()`` can serve both stages, and a
    DistributedDataParallel wrapper built after :meth:`set_stage` sees only the
    parameters that receive gradients.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layer: str, teacher_layer: str,
                 sample, *, two_stage: bool = True, hint_weight: Optional[float] = None,
                 ce_weight: float = 1.0, kd_weight: Union[float, Sequence[float]] = (4.0, 1.0),
                 temperature: float = 3.0, regressor: str = "auto", student_logits=None, teacher_logits=None):
        super().__init__(student, teacher, student_logits=student_logits, teacher_logits=teacher_logits)
        if regressor not in REGRESSORS:
            raise ValueError(f"regressor must be one of {REGRESSORS}, got {regressor!r}")
        self.temperature = check_real(temperature, "temperature", positive=True)
        self.two_stage = bool(two_stage)
        self.hint_weight = check_real(hint_weight if hint_weight is not None else (1.0 if two_stage else 100.0),
                                      "hint_weight")
        self.ce_weight = check_real(ce_weight, "ce_weight")
        kw = (kd_weight, kd_weight) if isinstance(kd_weight, (int, float)) else kd_weight
        if not isinstance(kw, (tuple, list)) or len(kw) != 2:
            raise ValueError(f"kd_weight must be a number or a (start, end) pair, got {kd_weight!r}")
        self.kd_weight = (check_real(kw[0], "kd_weight"), check_real(kw[1], "kd_weight"))

        self.student_taps = FeatureTaps(student, [student_layer])
        self.teacher_taps = FeatureTaps(teacher, [teacher_layer])
        x = sample_input(sample)
        s_dev, t_dev = device_of(student), device_of(teacher)
        (s_shape,) = self.student_taps.probe(x.to(s_dev) if s_dev else x)
        (t_shape,) = self.teacher_taps.probe(x.to(t_dev) if t_dev else x)
        cs, hs, ws = shape_4d(s_shape)
        ct, ht, wt = shape_4d(t_shape)
        if regressor == "auto":
            regressor = "1x1" if (hs, ws) == (ht, wt) else "convreg"
        if regressor == "1x1":
            if (hs, ws) != (ht, wt):
                raise ValueError(f"a 1x1 regressor needs equal spatial sizes: student {student_layer!r} is "
                                 f"{tuple(s_shape)}, teacher {teacher_layer!r} is {tuple(t_shape)}; "
                                 f"use regressor='convreg'")
            self.regressor = nn.Conv2d(cs, ct, 1, bias=True)
        else:
            n = x.shape[0]
            self.regressor = nn_module("ConvReg")((n, cs, hs, ws), (n, ct, ht, wt))
        self.hint_criterion = nn_module("HintLoss")()
        if s_dev is not None:
            self.regressor.to(s_dev)
        self.regressor_kind = regressor

        self._remember_trainable()
        (reach,) = reachable_params(student, self.student_taps, x.to(s_dev) if s_dev else x)
        self._stage1_params = {f"student.{n}" for n in reach} | {
            f"regressor.{n}" for n, _ in self.regressor.named_parameters()}
        self.set_stage(1 if self.two_stage else "single")

    # ---------------------------------------------------------------- stages
    def set_stage(self, stage) -> None:
        """Two-stage: 1 (hint, up to the guided layer) or 2 (CE + annealed KD)."""
        if not self.two_stage:
            if stage != "single":
                raise ValueError("this FitNets is single-stage (two_stage=False): there is no stage to set")
            self.stage = "single"
            self._train_only((n for n, _ in self.named_parameters()), [])
            return
        if stage not in (1, 2):
            raise ValueError(f"FitNets stage must be 1 or 2, got {stage!r}")
        self.stage = stage
        if stage == 1:
            self._train_only(self._stage1_params, self._frozen_by_params(self._stage1_params))
        else:
            names = {n for n, _ in self.named_parameters() if n.startswith("student.")}
            self._train_only(names, self._frozen_by_params(names))

    def current_kd_weight(self) -> float:
        """Stage 2's lambda at :attr:`epoch`."""
        a, b = self.kd_weight
        if a == b:
            return a
        if not self.epochs:
            if not getattr(self, "_warned_epochs", False):
                warnings.warn("FitNets: the KD weight is annealed over the epochs, but the number of "
                              "epochs is unknown; call set_epoch(epoch, epochs) (fit does). Using the "
                              "start value.", stacklevel=3)
                self._warned_epochs = True
            return a
        frac = min(max((self.epoch - 1) / max(self.epochs - 1, 1), 0.0), 1.0)
        return a + (b - a) * frac

    # --------------------------------------------------------------- forward
    def _hint(self, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        # nn.HintLoss calls the fused kdkernels.hint_loss for the plain 1x1 regressor
        return self.hint_criterion(fs, ft.to(fs.dtype), self.regressor)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[torch.Tensor], Losses]:
        losses: Losses = {}
        if self.stage == 1:
            _, (fs,) = self.student_taps(images, stop=True)
            _, (ft,) = self.teacher_forward(self.teacher_taps, images, stop=True)
            losses["hint"] = self.hint_weight * self._hint(fs, ft)
            return None, losses
        if self.stage == 2:
            logits = self.student_logits(self.student(images))
            logits_t = self.teacher_logits(self.teacher_forward(self.teacher, images))
            ce = self.task_loss(logits, labels)
            if ce is not None:
                losses["ce"] = self.ce_weight * ce
            t = self.temperature
            kd = op("kd_loss")(logits, logits_t.to(logits.dtype), temperature=t)
            losses["kd"] = (self.current_kd_weight() / (t * t)) * kd
            return logits, losses
        out, (fs,) = self.student_taps(images)
        logits = self.student_logits(out)
        _, (ft,) = self.teacher_forward(self.teacher_taps, images, stop=True)
        ce = self.task_loss(logits, labels)
        if ce is not None:
            losses["ce"] = self.ce_weight * ce
        losses["hint"] = self.hint_weight * self._hint(fs, ft)
        return logits, losses
