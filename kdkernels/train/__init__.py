r"""The thin training API: feature taps, distillers and a small ``fit`` loop.

A distiller is an ``nn.Module`` holding the student (and any adapters) as
submodules and the teacher outside its module tree; ``forward(images,
labels)`` returns ``(logits, losses)`` with already-weighted loss terms, and
``distiller.parameters()`` is exactly what the optimiser should train.

* :class:`KD` - Hinton (``kd_loss``).
* :class:`CausalLMKD` - causal language models as (model, lm_head) pairs (``linear_kd_loss``).
* :class:`FitNets` - the paper's two stages, or the single-stage variant (``hint_loss``).
* :class:`ReviewKD` - ABF fusion + HCL with warm-up (``nn.ReviewKD``, ``hcl_loss``).
* :class:`SSKD` - stage-by-stage feature mimicking, then head-only training.
* :class:`FSKD` - closed-form few-sample alignment (``kdkernels.fskd.distill``).
* :func:`fit` - epochs, AMP, clipping, metrics, checkpoint/resume, DDP.
* :class:`FeatureTaps` - named modules' outputs (or ``"name:input"``) via hooks.
* :class:`Output` - a feature or the logits picked from a model's output (a key,
  an index, a path of both, or a callable), e.g. ``Output(1, "preact_feats", 2)``.

Ten lines::

    from kdkernels.train import KD, fit
    distiller = KD(student, teacher, temperature=4.0)
    opt = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)
    fit(distiller, train_loader, epochs=240, optimizer=opt, eval_loader=test_loader)
"""
from .base import Distiller
from .fit import evaluate, fit
from .fitnets import FitNets
from .fskd import FSKD
from .kd import KD
from .lm import CausalLM, CausalLMKD
from .reviewkd import FeatureStudent, ReviewKD
from .sskd import SSKD
from .taps import FeatureTaps, Output

__all__ = ["Distiller", "FeatureTaps", "Output", "FeatureStudent", "KD", "CausalLM", "CausalLMKD", "FitNets", "ReviewKD",
           "SSKD", "FSKD",
           "fit", "evaluate"]
