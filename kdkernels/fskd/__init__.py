r"""FSKD: few-sample knowledge distillation with a mergeable 1x1 conv (docs/spec.md §5).

After each chosen student block, a 1x1 conv Q is fitted in closed form so that
the block's pre-activation output matches the teacher's, from a few hundred
unlabeled images; Q is then merged into the block's conv, so the student keeps
its parameter count and FLOPs.

* :class:`GramStats` - streaming G = sum s s^T and Hc = sum t s^T (shifted fp32
  tile products, fp64 running sums), ``all_reduce`` across ranks.
* :func:`solve` - every block's ridge problem in batched fp64 Cholesky calls
  (one per group of similar widths, identity padding inside a group).
* :func:`absorb_into` - q o bn o conv stored in the conv and BN in place (the BN
  becomes an identity-plus-bias in eval mode): structure and keys unchanged.
* :func:`absorb` - q o bn o conv as one new conv with bias (BN folded, fp64, cast back).
* :func:`distill` - the whole pipeline with forward hooks, greedy or joint schedule.

Example::

    from kdkernels import fskd
    student = fskd.distill(student, teacher,
                           [("layer1.0.conv2", "layer1.0.bn2", "layer1.0.bn2")],
                           loader, schedule="greedy", num_samples=500)
"""
from .merge import absorb, absorb_into
from .pipeline import distill
from .solve import solve
from .stats import GramStats

__all__ = ["GramStats", "solve", "absorb", "absorb_into", "distill"]
