r"""FitNets modules (docs/spec.md §3): ``ConvReg``, ``HintLoss`` and a closed-form 1x1 regressor.

* :class:`ConvReg` is RepDistiller's / mdistiller's convolutional regressor
  (same structure, parameter keys ``conv.*``, ``bn.*`` and initialisation), with
  a ``ValueError`` naming both shapes where the original fails later or oddly.
* :class:`HintLoss` is the mean-squared error between the regressed student and
  the teacher; given a plain 1x1 ``nn.Conv2d`` regressor it calls the fused
  :func:`kdkernels.hint_loss`, which never materialises the regressed map.
* :class:`FitNetsRegressor` is the FitNets paper's own regressor rule: a conv
  of kernel (1 + Hs - Ht, 1 + Ws - Wt) (1x1 when the spatial sizes are equal)
  with a bias, followed by the hint layer's nonlinearity, and no BatchNorm.
* :func:`least_squares_init_` sets a 1x1 regressor to the least-squares map
  from student to teacher features over a few batches (docs/spec.md §5 with
  prior 0, solved by :mod:`kdkernels.fskd`), so the hint stage starts from the
  best linear map instead of noise.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.hint import hint_loss

Shape = Sequence[int]
_RELU = object()  # the default nonlinearity marker (a fresh nn.ReLU per regressor)


def _shape4(shape: Shape, arg: str, who: str = "ConvReg") -> Tuple[int, int, int, int]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{who}: {arg} must be (N, C, H, W) with positive ints, got {shape!r}") from None
    if len(dims) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise ValueError(f"{who}: {arg} must be (N, C, H, W) with positive ints, got {tuple(shape)}")
    return dims  # type: ignore[return-value]


class ConvReg(nn.Module):
    """Convolutional regressor of FitNets, as in RepDistiller and mdistiller.

    Args:
        s_shape: student feature shape (N, Cs, Hs, Ws) (N is ignored).
        t_shape: teacher feature shape (N, Ct, Ht, Wt).
        use_relu: apply ReLU after the BatchNorm (the originals' default).

    The conv, chosen from the heights as in the originals:

    * Hs == 2 Ht: ``Conv2d(Cs, Ct, 3, stride=2, padding=1)``
    * 2 Hs == Ht: ``ConvTranspose2d(Cs, Ct, 4, stride=2, padding=1)``
    * Hs >= Ht:   ``Conv2d(Cs, Ct, (1 + Hs - Ht, 1 + Ws - Wt))``

    each with a bias, then ``BatchNorm2d(Ct)`` and (``use_relu``) ReLU. Shapes
    the originals cannot map to (Ht, Wt) raise a ``ValueError`` naming both
    shapes. ``forward``: (N, Cs, Hs, Ws) -> (N, Ct, Ht, Wt).
    """

    def __init__(self, s_shape: Shape, t_shape: Shape, use_relu: bool = True):
        super().__init__()
        s = _shape4(s_shape, "s_shape")
        t = _shape4(t_shape, "t_shape")
        self.use_relu = use_relu
        self.s_shape, self.t_shape = s, t
        _, s_c, s_h, s_w = s
        _, t_c, t_h, t_w = t
        if s_h == 2 * t_h:
            out_hw = ((s_h - 1) // 2 + 1, (s_w - 1) // 2 + 1)
            conv = lambda: nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)  # noqa: E731
        elif s_h * 2 == t_h:
            out_hw = (2 * s_h, 2 * s_w)
            conv = lambda: nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)  # noqa: E731
        elif s_h >= t_h and s_w >= t_w:
            out_hw = (t_h, t_w)
            conv = lambda: nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))  # noqa: E731
        else:
            raise ValueError(f"ConvReg: no regressor maps student shape s_shape={s} to teacher shape t_shape={t} "
                             "(needs Hs == 2*Ht, 2*Hs == Ht, or Hs >= Ht and Ws >= Wt)")
        if out_hw != (t_h, t_w):
            raise ValueError(f"ConvReg: student shape s_shape={s} would be regressed to {out_hw[0]}x{out_hw[1]}, "
                             f"not to the teacher's {t_h}x{t_w} (teacher shape t_shape={t})")
        self.conv = conv()
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.s_shape[1]:
            raise ValueError(f"ConvReg: input x has shape {tuple(x.shape)} but the regressor was built for "
                             f"student shape {self.s_shape} (teacher shape {self.t_shape})")
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


class FitNetsRegressor(nn.Module):
    """The FitNets paper's regressor: ``nonlinearity(conv(x))``, no BatchNorm.

    The paper regresses the student's guided layer to the teacher's hint layer with a
    convolution of kernel (1 + Hs - Ht, 1 + Ws - Wt) (stride 1, no padding; a 1x1 conv
    when the spatial sizes are equal) carrying the *hint layer's* nonlinearity, so that
    the regressed map lives where the hint does (post-ReLU hints: ReLU; a linear or
    pre-activation hint: ``nonlinearity=None``). RepDistiller's :class:`ConvReg` adds a
    BatchNorm and always a ReLU instead.

    Args:
        s_shape: student feature shape (N, Cs, Hs, Ws) (N is ignored).
        t_shape: teacher feature shape (N, Ct, Ht, Wt); needs Hs >= Ht and Ws >= Wt.
        nonlinearity: an ``nn.Module`` applied after the conv (default ``nn.ReLU()``),
            or ``None``.

    Keys ``conv.weight``, ``conv.bias`` (PyTorch's default conv initialisation).
    ``forward``: (N, Cs, Hs, Ws) -> (N, Ct, Ht, Wt). With ``nonlinearity=None`` and equal
    sizes, :class:`HintLoss` runs the fused :func:`kdkernels.hint_loss` on ``conv``.
    """

    def __init__(self, s_shape: Shape, t_shape: Shape, nonlinearity: Optional[nn.Module] = _RELU):
        super().__init__()
        s = _shape4(s_shape, "s_shape", "FitNetsRegressor")
        t = _shape4(t_shape, "t_shape", "FitNetsRegressor")
        if nonlinearity is _RELU:
            nonlinearity = nn.ReLU()
        if nonlinearity is not None and not isinstance(nonlinearity, nn.Module):
            raise TypeError(f"FitNetsRegressor: nonlinearity must be an nn.Module or None, "
                            f"got {type(nonlinearity).__name__}")
        self.s_shape, self.t_shape = s, t
        _, s_c, s_h, s_w = s
        _, t_c, t_h, t_w = t
        if s_h < t_h or s_w < t_w:
            raise ValueError(f"FitNetsRegressor: the paper's regressor shrinks the student map, but student shape "
                             f"s_shape={s} is smaller than teacher shape t_shape={t} (needs Hs >= Ht and Ws >= Wt; "
                             f"ConvReg also upsamples 2x)")
        self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        self.nonlinearity = nonlinearity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.s_shape[1]:
            raise ValueError(f"FitNetsRegressor: input x has shape {tuple(x.shape)} but the regressor was built for "
                             f"student shape {self.s_shape} (teacher shape {self.t_shape})")
        x = self.conv(x)
        return self.nonlinearity(x) if self.nonlinearity is not None else x


def is_plain_1x1(module: nn.Module) -> bool:
    """True for an ``nn.Conv2d`` that is a plain 1x1 map (stride 1, no padding, no groups)."""
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1)


class HintLoss(nn.Module):
    """FitNets' hint loss: ``HintLoss()(f_s, f_t)`` = mean((f_s - f_t)^2), as RepDistiller's.

    ``HintLoss()(f_s, f_t, regressor)`` regresses f_s first; when ``regressor`` is a
    plain 1x1 ``nn.Conv2d`` (see :func:`is_plain_1x1`) this is the fused
    :func:`kdkernels.hint_loss` (the regressed map is never materialised), else
    ``mse(regressor(f_s), f_t)``. Either way the loss is float32 (float64 for
    float64 features), also for fp16/bf16 features (see :func:`kdkernels.hint_loss`).

    Args:
        backend: passed to :func:`kdkernels.hint_loss` (``None`` = environment/auto).
        allow_tf32: passed to :func:`kdkernels.hint_loss` (``None``: follow PyTorch's TF32 flag for convs).
        reduction: ``"mean"`` (default, RepDistiller's and mdistiller's) or ``"paper"``.

    The scale matters for learning rates. The FitNets paper's hint loss is
    L_HT = 1/2 ||f_t - r(f_s)||^2 summed over a sample's C*H*W elements (averaged
    over the batch here): ``reduction="paper"``. The mean is C*H*W/2 times smaller,
    and so are its gradients: a learning rate (or hint weight) tuned for one is off
    by that factor for the other (e.g. 2048x for a 64x8x8 hint layer). RepDistiller's
    recipes (hint weight 100, SGD lr 0.05) are tuned for the mean.

    Shapes: f_s (N, Cs, H, W) (or already regressed: like f_t), f_t (N, Ct, H, W).
    A shape mismatch is a ``ValueError`` naming both shapes (``nn.MSELoss`` would broadcast).
    """

    def __init__(self, backend: Optional[str] = None, allow_tf32: Optional[bool] = None, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "paper"):
            raise ValueError(f"HintLoss: reduction must be 'mean' or 'paper', got {reduction!r}")
        self.backend = backend
        self.allow_tf32 = allow_tf32
        self.reduction = reduction

    def _scale(self, loss: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """mean -> the paper's 1/2 sum per sample (averaged over the batch) when asked for."""
        if self.reduction == "paper":
            return loss * (f_t[0].numel() / 2.0)
        return loss

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, regressor: Optional[nn.Module] = None) -> torch.Tensor:
        for name, x in (("f_s", f_s), ("f_t", f_t)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"HintLoss: {name} must be a torch.Tensor, got {type(x).__name__}")
        if regressor is not None and not isinstance(regressor, nn.Module):
            raise TypeError(f"HintLoss: regressor must be an nn.Module or None, got {type(regressor).__name__}")
        if isinstance(regressor, FitNetsRegressor) and regressor.nonlinearity is None:
            regressor = regressor.conv  # a plain conv: fused below when it is 1x1
        if regressor is not None and is_plain_1x1(regressor):
            w, b = regressor.weight, regressor.bias
            if w.dtype != f_s.dtype:  # e.g. fp32 parameters with autocast fp16 features
                w = w.to(f_s.dtype)
                b = b.to(f_s.dtype) if b is not None else None
            return self._scale(hint_loss(f_s, f_t.to(f_s.dtype), w, b, allow_tf32=self.allow_tf32,
                                         backend=self.backend), f_t)
        if regressor is not None:
            f_s = regressor(f_s)
        if f_s.shape != f_t.shape:
            raise ValueError(f"HintLoss: the (regressed) student f_s has shape {tuple(f_s.shape)} but the teacher "
                             f"f_t has shape {tuple(f_t.shape)}")
        # in the accumulation dtype, as the fused path returns it (kdkernels/ops/_autocast.py)
        acc = torch.float64 if torch.float64 in (f_s.dtype, f_t.dtype) else torch.float32
        return self._scale(F.mse_loss(f_s.to(acc), f_t.to(acc)), f_t)


Batches = Union[Tuple[torch.Tensor, torch.Tensor], Iterable[Tuple[torch.Tensor, torch.Tensor]]]


@torch.no_grad()
def least_squares_init_(regressor: nn.Conv2d, batches: Batches, alpha: Optional[float] = None) -> nn.Conv2d:
    r"""Set a 1x1 regressor to the least-squares map from student to teacher features.

    With pixels as samples (s_p in R^Cs, t_p in R^Ct over all N*H*W pixels of all
    batches), the weight W (Ct, Cs) and bias b minimise

        sum_p ||W s_p + b - t_p||^2 + lam ||W||^2,      lam = alpha * trace(Cov) / Cs

    with Cov the centred covariance of the student features (docs/spec.md section 5
    with prior Q0 = 0; the default ``alpha=None`` is plain least squares, with a
    ridge only where the problem is singular or underdetermined). The
    statistics are streamed by :class:`kdkernels.fskd.GramStats` (fp64 sums) and
    solved by :func:`kdkernels.fskd.solve` (fp64 Cholesky). With a bias, the
    problem is solved on centred statistics, G - m_s m_s^T M and Hc - m_t m_s^T M,
    and b = m_t - W m_s (the bias is not shrunk).

    Args:
        regressor: a plain 1x1 ``nn.Conv2d(Cs, Ct, 1)`` (with or without bias).
        batches: one ``(fs, ft)`` pair or an iterable of them, fs (N, Cs, H, W),
            ft (N, Ct, H, W) (e.g. a few batches of the student's and teacher's
            hint-layer features).
        alpha: ``None`` (least squares) or an explicit relative ridge.

    Returns:
        ``regressor``, with its weight and bias overwritten (in their dtype).
    """
    from .. import fskd
    from .._checks import check_real
    from ..fskd.solve import UNDERDETERMINED_RIDGE, ridge_solve

    alpha = None if alpha is None else check_real(alpha, "alpha", bound=">= 0")

    if not is_plain_1x1(regressor):
        raise TypeError(f"least_squares_init_: regressor must be a plain 1x1 nn.Conv2d (stride 1, no padding, "
                        f"groups 1), got {regressor!r}")
    ct, cs = regressor.weight.shape[:2]
    if isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(x, torch.Tensor) for x in batches):
        batches = [batches]
    stats = fskd.GramStats(cs, ct)
    if isinstance(batches, torch.Tensor):
        raise TypeError(f"least_squares_init_: batches must be an (fs, ft) pair or an iterable of pairs, "
                        f"got a tensor of shape {tuple(batches.shape)}")
    for k, pair in enumerate(batches):
        if isinstance(pair, torch.Tensor) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"least_squares_init_: batches[{k}] must be an (fs, ft) pair of tensors, "
                            f"got {type(pair).__name__}")
        fs, ft = pair
        stats.update(fs, ft)
    if stats.count == 0:
        raise ValueError("least_squares_init_: no batches were given")
    if regressor.bias is None:
        q = fskd.solve(stats, alpha, prior="zero")
        bias = None
    else:
        m = float(stats.count)
        mean_s, mean_t = stats.sum_s / m, stats.sum_t / m
        g = stats.G - m * torch.outer(mean_s, mean_s)
        h = stats.Hc - m * torch.outer(mean_t, mean_s)
        if alpha is None and stats.count <= cs:  # centred rank <= M - 1 < Cs: the solve's underdetermined rule
            alpha = UNDERDETERMINED_RIDGE
            warnings.warn(f"least_squares_init_: {stats.count} pixels for {cs} channels and a bias: "
                          f"underdetermined, the ridge (alpha={alpha:g}) decides the solution",
                          RuntimeWarning, stacklevel=2)
        (q,) = ridge_solve([g], [h], alpha, identity_prior=False)
        bias = mean_t - q @ mean_s
    w = regressor.weight
    w.copy_(q.reshape(w.shape).to(device=w.device, dtype=w.dtype))
    if bias is not None:
        regressor.bias.copy_(bias.to(device=w.device, dtype=regressor.bias.dtype))
    return regressor
