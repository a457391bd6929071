"""Count the device launches and catch the host work of an op's GPU path.

The ops run with their real launchers on CPU tensors (Triton through the
interpreter); a recorder watches everything between the public call and the
end of its backward:

* Triton launches: every ``kernel[grid](...)`` call, hooked on the kernel
  object's class (``InterpretedFunction`` here, ``JITFunction`` on a GPU), so a
  launcher that forgets to report itself is still counted.
* torch launches: every ATen op (seen by a TorchDispatchMode, which also walks
  into the bodies of the kdkernels custom ops) that computes new data on the
  device: fills (zeros, full), reductions (sum), elementwise arithmetic, dtype
  conversions, copies. Not counted: allocations without contents (empty,
  empty_like, ...), ops whose result aliases an input (views, reshapes of
  contiguous tensors, ``.to`` of the same dtype, which return the input), and
  reads of a Python scalar (``_local_scalar_dense``, which is host work). An
  ``out=`` op is a launch (its result lands in a tensor it was given), and so
  is an in-place op that writes data (``add_``, ``copy_`` of a slice
  assignment, ``addmm_``, ``zero_``): its result aliases its input, but it runs
  a kernel. In-place ops that change only metadata (``resize_``, ``t_``,
  ``as_strided_``...) are free.
  On a GPU each counted op is one kernel launch (a copy is one cudaMemcpy).
* Host work: ``.item()``/``float(t)`` (ATen ``_local_scalar_dense``: a device
  synchronisation on CUDA), tensors made from Python data (``torch.tensor``,
  ``torch.as_tensor``: ATen ``lift_fresh``; a CPU tensor, or a host-to-device
  copy, per call), comparisons answered on the host (``torch.equal``: a Python
  bool, so a device synchronisation on CUDA), and copies between devices. Factories with an explicit
  device are fine; a factory left on the default (CPU) device would make the
  kernel launch fail on a GPU, which the GPU suite catches, so it is not
  checked here.

Ops run inside a Triton kernel (the interpreter's own torch calls) are neither
launches nor host work of the launcher, and are ignored.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that allocate without writing (no kernel on a GPU)
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
# in-place ATen ops that change a tensor's metadata only (no kernel)
_METADATA_INPLACE = {"resize_", "resize_as_", "set_", "detach_", "as_strided_", "t_", "transpose_", "squeeze_",
                     "unsqueeze_", "swapdims_", "swapaxes_", "requires_grad_", "_coalesced_"}
# ATen ops that are host work on a GPU path
_HOST = {"_local_scalar_dense": "reads a tensor element on the host (.item()/float(): a device sync)",
         "lift_fresh": "builds a tensor from Python data (torch.tensor/as_tensor)",
         "lift_fresh_copy": "builds a tensor from Python data (torch.tensor/as_tensor)",
         "equal": "compares two tensors into a Python bool (torch.equal: a device sync)"}


def _tensors(tree) -> List[torch.Tensor]:
    out = []
    for leaf in torch.utils._pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
    return out


def _storages(ts) -> set:
    return {t.untyped_storage().data_ptr() for t in ts if t.device.type != "meta"}


class Recorder(TorchDispatchMode):
    """Records ``launches`` (names, in order) and ``host`` (what host work was done, where)."""

    def __init__(self):
        super().__init__()
        self.launches: List[str] = []
        self.host: List[str] = []
        self._in_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_kernel:
            return func(*args, **kwargs)
        if func.namespace == "kdkernels":
            from torch._library.custom_ops import OPDEFS

            # run the custom op's body with the recorder on, so its own ops are seen
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        given = _tensors(kwargs.get("out"))  # an out= op writes its result there: still a launch
        inputs = [t for t in _tensors((args, kwargs)) if not any(t is o for o in given)]
        out = func(*args, **kwargs)
        if name in _HOST:
            self.host.append(f"{func}: {_HOST[name]}")
            return out
        outputs = _tensors(out)
        devices_in = {t.device for t in inputs}
        if devices_in and any(t.device not in devices_in for t in outputs):
            self.host.append(f"{func}: copies between devices {devices_in} -> {[t.device for t in outputs]}")
        if name in _ALLOCATIONS or not outputs:
            return out
        writes = func._schema.is_mutable and name not in _METADATA_INPLACE
        if not writes and _storages(outputs) <= _storages(inputs):  # a view or the input itself
            return out
        self.launches.append(f"torch:{name}")
        return out

    @contextlib.contextmanager
    def kernel(self, name: str):
        self.launches.append(f"triton:{name}")
        self._in_kernel += 1
        try:
            yield
        finally:
            self._in_kernel -= 1


@contextlib.contextmanager
def recording():
    """``with recording() as rec:`` count launches and host work of what runs inside."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    rec = Recorder()
    classes = [InterpretedFunction, triton.runtime.jit.JITFunction]
    originals: Dict[type, object] = {cls: cls.run for cls in classes}

    def hooked(original):
        def run(self, *args, **kwargs):
            fn = getattr(self, "fn", self)
            with rec.kernel(getattr(fn, "__name__", repr(fn))):
                return original(self, *args, **kwargs)
        return run

    for cls in classes:
        cls.run = hooked(originals[cls])
    try:
        with rec:
            yield rec
    finally:
        for cls in classes:
            cls.run = originals[cls]
