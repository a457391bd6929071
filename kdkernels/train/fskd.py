r"""FSKD as a distiller: a call into :func:`kdkernels.fskd.distill` (docs/spec.md section 5).

There is no optimiser and no loss: :meth:`FSKD.distill` reads a few unlabeled
batches, fits one 1x1 conv per block in closed form and merges it into the
block's conv. :func:`~kdkernels.train.fit` recognises it and calls
:meth:`~FSKD.distill` on the loader instead of training.

Which features: FSKD aligns each block *before its nonlinearity* - name the
student's conv and the BN right after it (or ``None`` without BN), and the
teacher module at the matching point, e.g. ``("layer1.0.conv2",
"layer1.0.bn2", "layer1.0.bn2")`` for a pruned torchvision ResNet. A pruned
block names the teacher channels it kept as a fourth entry (a boolean mask
over the teacher's channels or an index): ``("layer1.0.conv2", "layer1.0.bn2",
"layer1.0.bn2", mask)`` aligns the student to ``T[:, mask]``.

The merged student keeps its class and state_dict keys (each aligned BN
becomes ``x + b`` in eval mode; back in train mode it would normalise again),
so it loads strictly into a fresh instance of the user's model class.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .base import Distiller, Losses


class FSKD(Distiller):
    r"""Few-sample KD: closed-form 1x1 alignment, merged into the student.

    Args:
        student, teacher: the networks; the student's aligned blocks must have
            the teacher's widths (or, pruned, the kept channels') and sizes at the
            matching points.
        blocks: ``(student_conv, student_bn_or_None, teacher_module)`` names, with an
            optional fourth entry: the teacher's kept channels (mask or index).
        schedule: ``"greedy"`` (block by block) or ``"joint"`` (all Q's refined together,
            end to end, from the greedy ones; see :func:`kdkernels.fskd.distill`).
        alpha: ``None`` (default): least squares (a ridge only where a block needs
            one); a float: explicit relative ridge toward Q = I (see :func:`kdkernels.fskd.solve`).
        num_samples: use only this many inputs (per process).
        inplace: modify the given student instead of a copy.
        keep_structure: merge into the existing conv and BN (default) or replace them
            by one conv with bias and ``nn.Identity`` (see :func:`kdkernels.fskd.distill`).
        student_logits: where the logits are in the student's output (see :class:`Distiller`).

    Example::

        distiller = FSKD(student, teacher, [("conv2", "bn2", "bn2"), ("conv4", "bn4", "bn4")])
        student = distiller.distill(few_sample_loader)      # no labels are read

    ``forward(images, labels)`` runs the (merged) student and returns
    ``(logits, {"ce": ...})`` for evaluation.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, blocks: Sequence[Tuple], *,
                 schedule: str = "greedy", alpha: Optional[float] = None, num_samples: Optional[int] = None,
                 inplace: bool = False, keep_structure: bool = True, student_logits=None):
        from .._checks import check_real
        from ..fskd.pipeline import check_schedule

        super().__init__(student, teacher, student_logits=student_logits)
        self.blocks = [tuple(b) for b in blocks]
        self.schedule = check_schedule(schedule)
        self.alpha = None if alpha is None else check_real(alpha, "alpha", bound=">= 0")
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                        or num_samples < 1):
            raise ValueError(f"num_samples must be an int >= 1 or None, got {num_samples!r}")
        self.num_samples = num_samples
        self.inplace = inplace
        self.keep_structure = bool(keep_structure)
        self.distilled = False
        self._remember_trainable()

    def distill(self, batches: Iterable, *, progress: bool = True,
                all_reduce: Optional[bool] = None) -> nn.Module:
        """Align and merge; returns the new student (also ``self.student``).

        ``all_reduce`` (default: when ``torch.distributed`` runs with more than
        one process) sums the statistics of every rank before solving, so each
        rank may read its own shard of the few samples.
        """
        from .. import fskd

        if all_reduce is None:
            all_reduce = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        merged = fskd.distill(self.student, self.teacher, self.blocks, batches, schedule=self.schedule,
                              alpha=self.alpha, num_samples=self.num_samples, inplace=self.inplace,
                              progress=progress, all_reduce=all_reduce, keep_structure=self.keep_structure)
        self.student = merged
        self.distilled = True
        self._remember_trainable()
        return merged

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Losses]:
        logits = self.student_logits(self.student(images))
        ce = self.task_loss(logits, labels)
        return logits, ({} if ce is None else {"ce": ce})
