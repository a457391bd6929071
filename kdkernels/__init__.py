"""kdkernels: fused kernels for knowledge distillation.

Public functional API (``torch.nn.functional`` style):

- :func:`hcl_loss` — ReviewKD's hierarchical context loss.
- :func:`abf_fuse` — ReviewKD's attention-based fusion step.
- :func:`kd_loss` — Hinton's KD loss, T² KL(p_t ‖ p_s), one streaming pass per row.
- :func:`hint_loss` — FitNets' hint loss through a fused 1×1 regressor.
- :func:`linear_kd_loss` — KD of two lm_heads' logits over token chunks, never materialising them.

Modules live in :mod:`kdkernels.nn`; few-sample KD in :mod:`kdkernels.fskd`;
backends in :mod:`kdkernels.backends`.
"""
from ._version import __version__
from .ops import hcl_loss
from .ops import abf_fuse
from .ops import kd_loss
from .ops import hint_loss
from .ops import linear_kd_loss
from . import backends, fskd, nn, reference
from . import train

__all__ = ["__version__", "hcl_loss", "abf_fuse", "kd_loss", "hint_loss", "linear_kd_loss", "backends", "fskd", "nn",
           "reference", "train"]
