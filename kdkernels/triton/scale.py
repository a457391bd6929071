r"""The backward of the ops whose forward already computed their gradients (hint, linear KD).

Up to six saved gradients g_i (accumulation dtype) are scaled by one factor

    s = grad_output * NUM / den     (hint: NUM = 2, den = numel, an int)
    s = grad_output / den           (linear KD "batchmean": den = the kept rows, a 0-dim tensor)
    s = grad_output                 (linear KD "sum")

(``-s`` for the slots flagged in NEG: hint's teacher gradient) and cast to their
inputs' dtypes, in one launch: program ``pid`` belongs to the first slot whose
running end of blocks exceeds it. The product is formed in the accumulation
dtype and rounded once on the store, as ``kdkernels.ops._dispatch.scale_grad``
does (bitwise the same; python_tests/test_scale_grad.py).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from . import launch_counts

SLOTS = 6
_BLOCK = 1024  # elements per program
# how s is formed from grad_output
DEN_NONE, DEN_INT, DEN_TENSOR = 0, 1, 2


@triton.jit
def _scale_block(src_ptr, dst_ptr, blk, n, s, BLOCK: tl.constexpr):
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(src_ptr + offs, mask=ok, other=0.0).to(s.dtype)
    tl.store(dst_ptr + offs, (x * s).to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _signed(s, i: tl.constexpr, NEG: tl.constexpr):
    if (NEG >> i) & 1:
        return -s
    return s


# the sizes that grow with the batch are not specialised (no new kernel for a last, smaller batch)
@triton.jit(do_not_specialize=["den", "n0", "e0", "n1", "e1", "n2", "e2", "n3", "e3", "n4", "e4", "n5"])
def _scale_grads_kernel(grad_ptr, den_ptr, den,
                        s0, d0, n0, e0, s1, d1, n1, e1, s2, d2, n2, e2, s3, d3, n3, e3, s4, d4, n4, e4, s5, d5, n5,
                        DEN: tl.constexpr, NUM: tl.constexpr, NEG: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Slot i: programs [e_{i-1}, e_i) scale s_i (n_i elements) into d_i."""
    pid = tl.program_id(0)
    s = tl.load(grad_ptr).to(ACC)
    if DEN == 1:
        s = s * (tl.full([], NUM, ACC) / den.to(ACC))
    elif DEN == 2:
        s = s / tl.load(den_ptr).to(ACC)
    if pid < e0:
        _scale_block(s0, d0, pid, n0, _signed(s, 0, NEG), BLOCK)
    elif pid < e1:
        _scale_block(s1, d1, pid - e0, n1, _signed(s, 1, NEG), BLOCK)
    elif pid < e2:
        _scale_block(s2, d2, pid - e1, n2, _signed(s, 2, NEG), BLOCK)
    elif pid < e3:
        _scale_block(s3, d3, pid - e2, n3, _signed(s, 3, NEG), BLOCK)
    elif pid < e4:
        _scale_block(s4, d4, pid - e3, n4, _signed(s, 4, NEG), BLOCK)
    else:
        _scale_block(s5, d5, pid - e4, n5, _signed(s, 5, NEG), BLOCK)


def scale_grads(grad: torch.Tensor, den: Union[None, int, torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
                dtypes: Sequence[Optional[torch.dtype]], *, num: float = 1.0, negate: Sequence[int] = (),
                in_place: bool = False, name: str = "scale") -> List[Optional[torch.Tensor]]:
    """``grads`` (at most 6; None where not wanted) times s (see the module docstring), as ``dtypes``.

    grad: grad_output, 0-dim; den: None (s = grad), an int (s = grad * num / den) or a
    0-dim tensor (s = grad / den). ``negate``: the slots scaled by -s. ``in_place``: a
    gradient already in its dtype is overwritten (its buffer is not read again); otherwise
    new tensors. ``name`` is the key of ``launch_counts``. One launch (none when no slot is used).
    """
    if len(grads) > SLOTS or len(grads) != len(dtypes):
        raise ValueError(f"scale_grads: up to {SLOTS} gradients with one dtype each, got {len(grads)} and "
                         f"{len(dtypes)}")
    acc = tl.float64 if grad.dtype == torch.float64 else tl.float32
    outs: List[Optional[torch.Tensor]] = []
    args: List = []
    end = 0
    slots = list(zip(grads, dtypes)) + [(None, None)] * (SLOTS - len(grads))
    for i, (t, dt) in enumerate(slots):
        if t is None:
            if i < len(grads):
                outs.append(None)
            src = dst = grad
            n = 0
        else:
            dst = t if (in_place and t.dtype == dt) else torch.empty(t.shape, dtype=dt, device=t.device)
            outs.append(dst)
            src, n = t, t.numel()
        end += triton.cdiv(n, _BLOCK)
        args += [src, dst, n] + ([end] if i < SLOTS - 1 else [])
    if end:
        mode = DEN_NONE if den is None else (DEN_INT if isinstance(den, int) else DEN_TENSOR)
        neg = sum(1 << i for i in negate)
        _scale_grads_kernel[(end,)](grad, den if mode == DEN_TENSOR else grad, den if mode == DEN_INT else 1, *args,
                                    DEN=mode, NUM=float(num), NEG=neg, ACC=acc, BLOCK=_BLOCK, num_warps=4)
        launch_counts[name] += 1
    return outs
