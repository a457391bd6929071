"""The dtypes every public op takes and returns, inside and outside ``torch.autocast``, in one place.

Losses (``hcl_loss``, ``hint_loss``, ``kd_loss`` and the modules and
distillers built on them) return their accumulation dtype: float32 for
float32, fp16 and bf16 inputs, float64 for float64 inputs, inside autocast and
outside it. The kernels read fp16/bf16 as they are (no up-cast copies) and
accumulate in float32; the loss is never rounded to fp16/bf16 on the way out.
That matters twice:

* fp16 training with a gradient scaler: the loss's grad_output is the scale
  (65,536 at first, growing from there). A loss returned in fp16 would make
  autograd hand its backward an fp16 grad_output, where 65,536 is already
  infinite, and every gradient would come back inf/NaN (a skipped step). A
  float32 grad_output reaches the kernels, which compute each gradient in
  float32 and round it once to its input's dtype: the gradients overflow only
  where the true value exceeds fp16's range.
* logs and schedules read the loss: a bf16 loss keeps 3 significant digits.

Outside autocast this differs from the eager code it replaces, whose
``mse_loss``/``kl_div`` return fp16 for fp16 inputs: a float32 loss is what the
eager code gives under autocast, the only place fp16 inputs normally meet a
loss, and it is never less precise (``loss.half()`` recovers the old dtype).

Under autocast, inputs of different float dtypes (a bf16 student next to an
fp32 teacher) are promoted to the widest, as autocast promotes them for the
reference's losses. Outside autocast mixed dtypes are an error, as everywhere
else in kdkernels.

``abf_fuse`` and the 1x1 regressor inside ``hint_loss`` follow the conv rule:
their floating inputs are cast to the autocast dtype (as ``nn.Conv2d`` does to
its input and weight), and ``abf_fuse`` returns that dtype (its gradients are
computed in float32 from whatever grad_output the next layer sends).

The ``torch`` backend (the plain-PyTorch reference) follows the same rules: it
runs the reference on the inputs cast to the accumulation dtype, with autocast
switched off, and casts a feature-map result back to the inputs' dtype.

The policy lives in the public functions (``kdkernels.hcl_loss`` and the rest),
which torch.compile traces like any Python; the raw ``torch.ops.kdkernels.*``
ops register no autocast kernel, so called directly they take whatever dtype
they are given (and still return losses in the accumulation dtype).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    kind = device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _nested_floats(args) -> List[Tensor]:
    out: List[Tensor] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_nested_floats(a))
        elif isinstance(a, Tensor) and a.is_floating_point():
            out.append(a)
    return out


def _map_floats(args, fn) -> list:
    return [_map_floats(a, fn) if isinstance(a, (list, tuple))
            else fn(a) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]


def apply(args: Sequence, rule: str, amp: torch.dtype) -> tuple:
    """A public op's arguments under autocast ``amp``: ``rule`` "promote" (losses: every float
    tensor, also inside lists, to the widest of them) or "cast" (the conv rule: to ``amp``)."""
    if rule == "promote":
        floats = _nested_floats(args)
        if not floats:
            return tuple(args)
        widest = floats[0].dtype
        for t in floats[1:]:
            widest = torch.promote_types(widest, t.dtype)
        return tuple(_map_floats(args, lambda t: t.to(widest)))
    if rule == "cast":
        return tuple(_map_floats(args, lambda t: t if t.dtype == torch.float64 else t.to(amp)))
    raise ValueError(f"unknown autocast rule {rule!r}; expected 'promote' or 'cast'")
