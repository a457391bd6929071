"""nn.Module drop-ins for the original repositories' classes."""
from .hcl import HCLLoss
from .abf import ABF
from .reviewkd import ReviewKD, ReviewKDLoss
from .kd import DistillKL
from .linear_kd import LinearDistillKL
from .hint import ConvReg, FitNetsRegressor, HintLoss, is_plain_1x1, least_squares_init_

__all__ = ["HCLLoss", "ABF", "ReviewKD", "ReviewKDLoss", "DistillKL", "LinearDistillKL", "ConvReg", "FitNetsRegressor",
           "HintLoss", "is_plain_1x1", "least_squares_init_"]
