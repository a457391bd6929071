"""torch.library custom ops, one module per op: schema, fake kernel, autograd, backends."""
from .hcl import hcl_loss
from .abf import abf_fuse
from .kd import kd_loss
from .hint import hint_loss
from .linear_kd import linear_kd_loss

__all__ = ["hcl_loss", "abf_fuse", "kd_loss", "hint_loss", "linear_kd_loss"]
