"""torch.library custom ops, one module per op: schema, fake kernel, autograd, backends."""
from .hcl import hcl_loss

__all__ = ["hcl_loss"]
