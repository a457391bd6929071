"""Hinton's knowledge distillation (docs/spec.md §4)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .base import Distiller, Losses, check_real, op


class KD(Distiller):
    r"""``ce_weight * CE(student, labels) + kd_weight * kd_loss(student, teacher, T)``.

    ``kd_loss`` is :func:`kdkernels.kd_loss` (T^2 * KL(p_t || p_s), batch mean),
    i.e. RepDistiller's ``DistillKL`` and mdistiller's ``KD`` with their default
    weights ``ce_weight=1``, ``kd_weight=1`` (mdistiller: 0.1 / 9 for CIFAR-100).

    Example::

        distiller = KD(student, teacher, temperature=4.0)
        opt = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)
        logits, losses = distiller(images, labels)
        sum(losses.values()).backward()

    Losses: ``"ce"`` (absent when ``labels`` is ``None``) and ``"kd"``.
    ``student_logits`` / ``teacher_logits``: where the logits are in each model's
    output (a key, an index, a callable or an :class:`Output`; see :class:`Distiller`).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float = 1.0,
                 kd_weight: float = 1.0, temperature: float = 4.0, student_logits=None, teacher_logits=None):
        super().__init__(student, teacher, student_logits=student_logits, teacher_logits=teacher_logits)
        self.ce_weight = check_real(ce_weight, "ce_weight")
        self.kd_weight = check_real(kd_weight, "kd_weight")
        self.temperature = check_real(temperature, "temperature", positive=True)
        self._remember_trainable()

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Losses]:
        logits = self.student_logits(self.student(images))
        logits_t = self.teacher_logits(self.teacher_forward(self.teacher, images))
        losses: Losses = {}
        ce = self.task_loss(logits, labels)
        if ce is not None:
            losses["ce"] = self.ce_weight * ce
        losses["kd"] = self.kd_weight * op("kd_loss")(logits, logits_t.to(logits.dtype),
                                                       temperature=self.temperature)
        return logits, losses
