r"""ReviewKD: knowledge review with ABF fusion and the HCL loss (docs/spec.md sections 1-2).

The official wrapper (:class:`kdkernels.nn.ReviewKD`) expects a student that
returns ``(features, logits)``. :class:`ReviewKD` builds that student from
feature taps, so the user's model needs no edits: the tapped features
(shallow to deep; a pooled (N, C) vector becomes N x C x 1 x 1) and the
model's logits. The ABF channels and sizes come from one eval-mode dry run.
A level may also be picked from the model's output (:class:`Output`, e.g.
``Output(1, "preact_feats", 2)`` for mdistiller's models), next to module names.

Sizes. The ABF of a level resizes its output to the teacher level's size, so a
misnamed tap would silently train on the wrong target. The dry run therefore
requires every teacher level to be the student level upsampled by one integer
factor, the same for every level with a map: 1 when the two nets downsample
alike (the official ResNet/WRN/VGG configs), 2 for the official ShuffleNet /
MobileNet students under a ResNet32x4 teacher. A pooled (1x1) level pairs
with a pooled level.

Conventions of the reference code (CIFAR ResNets): student features are the
stage outputs *after* the ReLU plus the pooled vector (``["layer1", "layer2",
"layer3", "avgpool"]``); teacher features are the stage outputs *before* the
last ReLU (``preact=True``) plus the pooled vector. For a torchvision ResNet
the teacher's pre-activation sum is the input of the last block's ``relu``:
``"layer1.2.relu:input"`` (the module runs twice; taps read the last call).

Loss: ``ce_weight * CE + ReviewKDLoss(weight, warmup_epochs)`` where the HCL
term is weighted ``weight * min(1, epoch / warmup_epochs)`` with the 1-based
:attr:`epoch` (mdistiller's convention; the original loop counts from 0, so its
first epoch has weight 0). Optionally ``kd_weight * kd_loss`` on the logits
(the reference's ``--use-kl``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import Distiller, Losses, check_real, device_of, logits_of, nn_module, op, sample_input
from .taps import FeatureTaps, as_4d, shape_4d


class FeatureStudent(nn.Module):
    """A model seen as ``x -> (features, logits)`` through feature taps.

    ``model`` is a submodule (its parameters are the student's); the taps are
    hooks on it. Extra keyword arguments (``is_feat``, ``preact``) are accepted
    and ignored, so the official wrappers can call it as they call their own
    backbones.
    """

    def __init__(self, model: nn.Module, layers: Sequence, logits=None):
        super().__init__()
        self.model = model
        self.taps = FeatureTaps(model, list(layers))
        self.__dict__["_logits_where"] = logits  # a key, an index, a callable or an Output; None: logits_of's rules

    def forward(self, x, *args, **kwargs) -> Tuple[List[torch.Tensor], torch.Tensor]:
        out, feats = self.taps(x)
        return as_4d(feats), logits_of(out, self._logits_where, "the student")


def _check_sizes(s_shapes, t_shapes, s_names, t_names) -> None:
    """Every teacher level is its student level upsampled by one common integer factor (>= 1);
    pooled (1x1) levels pair with pooled levels."""
    factor = None
    for i, ((_, hs, ws), (_, ht, wt)) in enumerate(zip(s_shapes, t_shapes)):
        pooled_s, pooled_t = (hs, ws) == (1, 1), (ht, wt) == (1, 1)
        if pooled_s and pooled_t:
            continue
        ok = not pooled_s and not pooled_t and ht % hs == 0 and wt % ws == 0 and ht // hs == wt // ws
        level = ht // hs if ok else None
        if ok and factor is not None and level != factor:
            ok = False
        if not ok:
            expect = ("1x1 (a pooled level pairs with a pooled level)" if pooled_s else
                      f"{hs * factor}x{ws * factor} (the student level upsampled by {factor}, as the "
                      f"shallower levels)" if factor is not None else
                      f"the student level's size or an integer multiple of it")
            raise ValueError(f"ReviewKD: teacher level {i} ({t_names[i]}) is {ht}x{wt} but student level {i} "
                             f"({s_names[i]}) is {hs}x{ws}; the ABF would resize to the teacher's size and "
                             f"train on a misplaced target. Expected {expect}: check the layer names")
        factor = level


def _size(h: int, w: int):
    return h if h == w else (h, w)


class ReviewKD(Distiller):
    r"""ReviewKD on any pair of models, tapped by module name.

    Args:
        student, teacher: the networks.
        student_layers, teacher_layers: the HCL levels, shallow to deep, same
            count (module docstring for the conventions): module names or
            :class:`Output` selectors. Every teacher level must be its student
            level upsampled by one integer factor (module docstring), else
            ValueError at construction.
        sample: a batch (or ``(inputs, labels)``) for the eval-mode dry run.
        mid_channel: ABF width; default ``min(512, last student width)``.
        ce_weight: weight of the cross-entropy.
        weight, warmup_epochs: the HCL weight and its linear warm-up (reference: 1, 20).
        kd_weight, temperature: optional logit KD term (0 = off, the default).
        student_logits, teacher_logits: where the logits are in each model's output
            (see :class:`Distiller`).

    Example::

        distiller = ReviewKD(student, teacher,
                             ["layer1", "layer2", "layer3", "avgpool"],
                             ["layer1.2.relu:input", "layer2.2.relu:input",
                              "layer3.2.relu:input", "avgpool"], sample=images[:2])
        opt = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        fit(distiller, loader, epochs=240, optimizer=opt)

    ``forward`` returns ``(logits, {"ce", "reviewkd"[, "kd"]})``. The trained
    student is ``distiller.student`` (the ABFs are training-only).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: Sequence[str],
                 teacher_layers: Sequence[str], sample, *, mid_channel: Optional[int] = None,
                 ce_weight: float = 1.0, weight: float = 1.0, warmup_epochs: float = 20,
                 kd_weight: float = 0.0, temperature: float = 4.0, student_logits=None, teacher_logits=None):
        super().__init__(student, teacher, register_student=False, student_logits=student_logits,
                         teacher_logits=teacher_logits)
        student_layers, teacher_layers = list(student_layers), list(teacher_layers)
        if not student_layers or len(student_layers) != len(teacher_layers):
            raise ValueError(f"student_layers and teacher_layers must be non-empty and of equal length, "
                             f"got {len(student_layers)} and {len(teacher_layers)}")
        ce_weight, kd_weight = check_real(ce_weight, "ce_weight"), check_real(kd_weight, "kd_weight")
        temperature = check_real(temperature, "temperature", positive=True)
        weight, warmup_epochs = check_real(weight, "weight"), check_real(warmup_epochs, "warmup_epochs")
        wrapped = FeatureStudent(student, student_layers, self._logits_where[0])
        self.teacher_taps = FeatureTaps(teacher, teacher_layers)
        x = sample_input(sample)
        s_dev, t_dev = device_of(student), device_of(teacher)
        s_shapes = [shape_4d(s) for s in wrapped.taps.probe(x.to(s_dev) if s_dev else x)]
        t_shapes = [shape_4d(s) for s in self.teacher_taps.probe(x.to(t_dev) if t_dev else x)]
        _check_sizes(s_shapes, t_shapes, wrapped.taps.names, self.teacher_taps.names)
        in_channels = [c for c, _, _ in s_shapes]
        out_channels = [c for c, _, _ in t_shapes]
        shapes = [_size(h, w) for _, h, w in reversed(s_shapes)]  # deepest first, as the reference
        out_shapes = [_size(h, w) for _, h, w in reversed(t_shapes)]
        if mid_channel is None:
            mid_channel = min(512, in_channels[-1])
        self.review = nn_module("ReviewKD")(wrapped, in_channels, out_channels, shapes, out_shapes,
                                            mid_channel)
        if s_dev is not None:
            self.review.to(s_dev)
        self.criterion = nn_module("ReviewKDLoss")(weight=weight, warmup_epochs=warmup_epochs)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)
        self.stage = None
        self._remember_trainable()

    @property
    def student(self) -> nn.Module:
        """The user's student model (inside the ReviewKD wrapper)."""
        return self.review.student.model

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Losses]:
        results, logits = self.review(images)
        logits_t, feats_t = self.teacher_forward(self.teacher_taps, images, stop=not self.kd_weight)
        feats_t = [f.to(r.dtype) for f, r in zip(as_4d(feats_t), results)]
        losses: Losses = {}
        ce = self.task_loss(logits, labels)
        if ce is not None:
            losses["ce"] = self.ce_weight * ce
        losses["reviewkd"] = self.criterion(results, feats_t, self.epoch)
        if self.kd_weight:
            lt = self.teacher_logits(logits_t)
            losses["kd"] = self.kd_weight * op("kd_loss")(logits, lt.to(logits.dtype),
                                                           temperature=self.temperature)
        return logits, losses
