"""Plain-PyTorch implementations of every op: the spec as code.

They are the CPU fallback when no faster backend serves, and the oracle the
tests compare every kernel against. Each follows docs/spec.md exactly.
"""
from .hcl import hcl_loss, hcl_level_plan
from .abf import abf_fuse
from .kd import kd_loss
from .hint import hint_loss
from .linear_kd import linear_kd_loss

__all__ = ["hcl_loss", "hcl_level_plan", "abf_fuse", "kd_loss", "hint_loss", "linear_kd_loss"]
