"""nn.Module drop-ins for the original repositories' classes."""
from .hcl import HCLLoss

__all__ = ["HCLLoss"]
