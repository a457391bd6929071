"""kdkernels: fused kernels for knowledge distillation.

Public functional API (``torch.nn.functional`` style):

- :func:`hcl_loss` — ReviewKD's hierarchical context loss.

Modules live in :mod:`kdkernels.nn`; few-sample KD in :mod:`kdkernels.fskd`;
backends in :mod:`kdkernels.backends`.
"""
from ._version import __version__
from .ops import hcl_loss
from . import backends, fskd, nn, reference

__all__ = ["__version__", "hcl_loss", "backends", "fskd", "nn", "reference"]
