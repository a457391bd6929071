"""The one path from a public function to a kernel, written once.

Every public op (``kdkernels.hcl_loss``, ``kd_loss``, ``hint_loss``,
``abf_fuse``, ``linear_kd_loss``) is a :class:`PublicOp`: a declaration of what
differs between ops. Calling it runs the same five steps for all of them:

1. autocast: under ``torch.autocast`` the float tensors among the arguments
   (also inside lists) are promoted to their widest dtype (``"promote"``, the
   losses) or cast to the autocast dtype (``"cast"``, the conv rule of
   ``abf_fuse`` and hint's regressor); kdkernels/ops/_autocast.py has the policy;
2. ``check(*args)`` validates the arguments (errors name the argument and its
   shape; kdkernels/_checks.py) and returns them normalised (a single tensor as
   a one-element list, a temperature as a float, a default filled in);
3. the backend: ``backends.choose_backend(name, device, backend)``, the device
   being the first tensor's;
4. ``torch`` backend: ``reference(*args)``, on the float inputs cast to their
   accumulation dtype with autocast off (``reference_in_acc``), its result cast
   back to the first tensor's dtype where the op returns a feature map
   (``cast_back``);
5. any other backend: ``kernel(backend, *args)``, which calls the op's custom op
   (``torch.ops.kdkernels.<op>``); the custom op's implementation makes the
   inputs contiguous and calls the Triton launcher or the native entry point
   (kdkernels/ops/_native_args.py).

torch.compile traces all of this like any Python: nothing here reads a tensor's values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import backends
from . import _autocast
from ._common import run_reference


def _first_tensor(args) -> Optional[Tensor]:
    for a in args:
        if isinstance(a, Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


@dataclass(frozen=True)
class PublicOp:
    """What one public op declares; ``op(*args, backend=...)`` runs the shared path above.

    Attributes:
        name: the op's name (``backends.register_op``'s, and the errors' prefix).
        check: the arguments after autocast -> the checked, normalised arguments (a tuple).
        reference: the ``torch`` backend, called with the checked arguments.
        kernel: ``(backend, *checked arguments)`` -> the result, through the custom op.
        autocast: ``"promote"``, ``"cast"`` or None (autocast leaves the inputs alone).
        reference_in_acc: run the reference on inputs cast to the accumulation dtype, autocast off.
        cast_back: cast the reference's result back to the first tensor's dtype (feature maps).
    """

    name: str
    check: Callable[..., tuple]
    reference: Callable[..., Tensor]
    kernel: Callable[..., Tensor]
    autocast: Optional[str] = "promote"
    reference_in_acc: bool = True
    cast_back: bool = False

    def __call__(self, *args, backend: Optional[str] = None) -> Tensor:
        first = _first_tensor(args)
        if self.autocast is not None and first is not None:
            amp = _autocast.autocast_dtype(first.device)
            if amp is not None:
                args = _autocast.apply(args, self.autocast, amp)
        args = self.check(*args)
        first = _first_tensor(args)
        chosen = backends.choose_backend(self.name, first.device, backend)
        if chosen != "torch":
            return self.kernel(chosen, *args)
        if not self.reference_in_acc:
            return self.reference(*args)
        return run_reference(self.reference, args, first.device, first.dtype if self.cast_back else None)


def grad_enabled_for(*tensors) -> list:
    """Per tensor: whether autograd will want its gradient (grad mode on, and it requires grad; None: False)."""
    on = torch.is_grad_enabled()
    return [on and t is not None and t.requires_grad for t in tensors]


def eager_triton_backward(backend: str, *tensors: Optional[Tensor]) -> bool:
    """Whether a backward may scale its saved gradients with one Triton launch
    (kdkernels/triton/scale.py): the Triton backend, eager, on plain tensors. Traced
    graphs (fake or functional tensor subclasses) keep the torch ops of :func:`scale_grad`."""
    return backend == "triton" and not torch.compiler.is_compiling() and all(
        type(t) is Tensor for t in tensors if t is not None)


def scale_grad(g: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """The backward of an op whose forward already computed its gradients (hint, linear KD):
    the saved gradient ``g`` times ``s`` (grad_output's factor, accumulation dtype), in a fresh
    tensor of ``dtype``.

    Out of place on purpose: scaling ``g`` in place (or handing it to autograd as it is) is
    only safe when the graph is not retained, and no public torch API tells a backward that.

    One pass (one kernel on a GPU), bitwise what casting ``g`` to ``s``'s dtype, multiplying
    there and casting the product to ``dtype`` gives (python_tests/test_scale_grad.py): ``s``
    is given ``g``'s number of dimensions, so that type promotion computes in ``s``'s dtype
    (a 0-dim float32 ``s`` times a float16 ``g`` would be computed in float16, where a factor
    like 2 / numel underflows), and the product is written into a ``dtype`` tensor by the
    same op (``out=``: rounded once, on the store).
    """
    out = torch.empty_like(g, dtype=dtype)
    return torch.mul(g, s.reshape((1,) * g.dim()), out=out)
