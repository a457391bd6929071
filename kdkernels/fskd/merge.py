r"""Merging a 1x1 conv Q (and a BatchNorm) into the conv before it (docs/spec.md section 5).

A conv is linear in its input and acts on every output position with the same
(O, I/g, k...) weight, so a 1x1 conv Q (P, O) applied after it is the conv

    W'[:, :, k...] = Q W[:, :, k...],        b' = Q b,

exact for any stride, padding, padding mode and dilation. An eval-mode BN in
between is folded first, with its running statistics:

    sigma = sqrt(running_var + eps),
    W_bn = diag(gamma / sigma) W,     b_bn = gamma (b - running_mean) / sigma + beta,

after which the BN must no longer normalise (the official FSKD code keeps it
unchanged, which is wrong). Two ways to store the result:

* :func:`absorb_into` (the default of :func:`~kdkernels.fskd.distill`) keeps the
  model's structure and state_dict keys: W' goes into the conv's weight, and
  the BN becomes an identity-plus-bias in eval mode (weight 1, running_mean 0,
  running_var 1 - eps, bias b'), so a merged model loads strictly into a fresh
  instance of its own class. A conv without bias and without BN keeps no
  bias: b' = Q 0 = 0. A conv with a bias followed by a BN gets bias 0 (the BN
  carries b'); a BN without affine parameters carries b' as running_mean = -b'.
  Put back in train mode, such a BN normalises with batch statistics again and
  the merge is lost: fine-tune a merged model with its BNs in eval mode (or
  after :func:`absorb` instead).
* :func:`absorb` returns one new conv with bias (the BN is then dropped by the
  caller): fewer layers, but a different module structure.

For a grouped conv, output channel o only sees input group o // (O/g), so Q may
only mix channels of one group: it must be block-diagonal, with g blocks of
(P/g, O/g). Everything is computed in fp64 and cast back to the conv's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._checks import check_float_dtype, shape_str

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def plain_conv_class(conv) -> type:
    """The nn.ConvNd class whose math ``conv`` runs, or TypeError.

    Subclasses that override ``forward``/``_conv_forward`` (weight standardisation,
    quantisation, ...) compute something else and are refused.
    """
    for base in _PLAIN_CONVS:
        if isinstance(conv, base):
            cls = type(conv)
            if cls.forward is base.forward and cls._conv_forward is base._conv_forward:
                return base
            raise TypeError(f"{cls.__name__} overrides the convolution of {base.__name__}: "
                            f"a 1x1 conv cannot be merged into it")
    raise TypeError(f"conv must be an nn.Conv1d/2d/3d, got {type(conv).__name__}")


def check_bn(bn, channels: int, name: str = "bn") -> None:
    """``bn`` must be a BatchNorm over ``channels`` channels with running statistics."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"{name} must be a BatchNorm module, got {type(bn).__name__}")
    if bn.num_features != channels:
        raise ValueError(f"{name} has {bn.num_features} features but the conv has {channels} "
                         f"output channels")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{name} has no running statistics (track_running_stats=False): "
                         f"it cannot be folded")


def absorb(conv: nn.Module, q: torch.Tensor, bn: Optional[nn.Module] = None) -> nn.Module:
    """A new conv (with bias) equal to ``q o bn o conv``.

    Args:
        conv: ``nn.Conv1d/2d/3d`` with weight (O, I/g, k...).
        q: (P, O) float tensor: the 1x1 conv to merge (any dtype and device).
        bn: optional BatchNorm over O channels, folded with its eval statistics.

    Returns:
        a conv of the same class, geometry and dtype/device as ``conv`` with P
        output channels, bias=True and the conv's training flag; ``conv``, ``bn``
        and ``q`` are left untouched.

    Raises ``ValueError`` when the shapes disagree, ``q`` is not finite, or the
    conv is grouped and ``q`` is not block-diagonal along its groups.
    """
    base = plain_conv_class(conv)
    w_new, b_new = _merged(conv, q, bn)
    w = conv.weight
    new = base(conv.in_channels, q.shape[0], conv.kernel_size, stride=conv.stride,
               padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
               padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w_new)
        new.bias.copy_(b_new)
    new.weight.requires_grad_(w.requires_grad)
    new.bias.requires_grad_(w.requires_grad)
    new.train(conv.training)
    return new


def absorb_into(conv: nn.Module, q: torch.Tensor, bn: Optional[nn.Module] = None) -> None:
    """``q o bn o conv`` stored in place, in the same modules and state_dict keys.

    Args:
        conv: ``nn.Conv1d/2d/3d`` with weight (O, I/g, k...).
        q: (O, O) float tensor: the 1x1 conv to merge (square: the conv keeps its width).
        bn: optional BatchNorm over O channels, folded with its eval statistics.

    Afterwards ``conv.weight`` holds W' = Q diag(gamma/sigma) W; in eval mode ``bn``
    is exactly ``x + b'`` (weight 1, running_mean 0, running_var 1 - eps, bias b';
    without affine parameters running_mean = -b'); ``conv.bias`` (if any) is 0
    when a BN carries b', else Q b. Without BN and without conv bias, b' = 0 and
    no bias is needed. ``bn.num_batches_tracked`` and every training flag are kept;
    a BN switched to train mode renormalises (module docstring).
    """
    plain_conv_class(conv)
    out_ch = conv.weight.shape[0]
    if q.dim() != 2 or tuple(q.shape) != (out_ch, out_ch):
        raise ValueError(f"q must be ({out_ch}, {out_ch}) to be merged into a conv with weight "
                         f"{shape_str(conv.weight)} in place, got q of shape {shape_str(q)}")
    w_new, b_new = _merged(conv, q, bn)
    with torch.no_grad():
        conv.weight.copy_(w_new)
        if bn is None:
            if conv.bias is not None:
                conv.bias.copy_(b_new)
            return
        if conv.bias is not None:
            conv.bias.zero_()
        # 1 - eps in the BN's dtype; eval BN computes (x - 0) / sqrt((1 - eps) + eps) * 1 + b'
        bn.running_var.fill_(1.0 - bn.eps)
        if bn.weight is not None:
            bn.weight.fill_(1.0)
        if bn.bias is not None:
            bn.running_mean.zero_()
            bn.bias.copy_(b_new)
        else:
            bn.running_mean.copy_(-b_new)


def _merged(conv: nn.Module, q: torch.Tensor, bn: Optional[nn.Module]):
    """(W', b') of ``q o bn o conv`` in fp64, after checking shapes, finiteness and groups."""
    check_float_dtype(q, "q")
    w = conv.weight
    out_ch = w.shape[0]
    if q.dim() != 2 or q.shape[1] != out_ch:
        raise ValueError(f"q must be (P, {out_ch}) for a conv with weight {shape_str(w)}, "
                         f"got q of shape {shape_str(q)}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError(f"q {shape_str(q)} contains NaN or inf")
    if bn is not None:
        check_bn(bn, out_ch)
    groups = conv.groups
    q64 = q.detach().to(device=w.device, dtype=torch.float64)
    if groups > 1:
        _check_block_diagonal(q64, groups, w)

    with torch.no_grad():
        w64 = w.detach().to(torch.float64)
        b64 = (conv.bias.detach().to(torch.float64) if conv.bias is not None
               else torch.zeros(out_ch, dtype=torch.float64, device=w.device))
        if bn is not None:
            gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else 1.0
            beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else 0.0
            scale = gamma / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
            scale = scale * torch.ones(out_ch, dtype=torch.float64, device=w.device)
            w64 = w64 * scale.view(-1, *([1] * (w.dim() - 1)))
            b64 = (b64 - bn.running_mean.detach().to(torch.float64)) * scale + beta
        w_new = (q64 @ w64.reshape(out_ch, -1)).reshape(q.shape[0], *w.shape[1:])
        b_new = q64 @ b64
    return w_new, b_new


def _check_block_diagonal(q64: torch.Tensor, groups: int, w: torch.Tensor) -> None:
    """q (P, O) must be blockdiag of ``groups`` (P/g, O/g) blocks, exactly."""
    p, o = q64.shape
    if p % groups:
        raise ValueError(f"a conv with groups={groups} (weight {shape_str(w)}) needs q with a "
                         f"multiple of {groups} rows, got q of shape {shape_str(q64)}")
    blocks = q64.reshape(groups, p // groups, groups, o // groups).abs().amax(dim=(1, 3))  # (g, g)
    off = blocks.masked_fill(torch.eye(groups, dtype=torch.bool, device=q64.device), 0.0)
    worst = float(off.max())
    if worst != 0.0:
        raise ValueError(
            f"conv has groups={groups} (weight {shape_str(w)}): q {shape_str(q64)} must be "
            f"block-diagonal with {groups} blocks of {p // groups}x{o // groups}, but an "
            f"off-diagonal block has entries up to {worst:.3g}; the merged conv would mix groups")
