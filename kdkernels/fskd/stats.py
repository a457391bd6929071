r"""Streaming second moments for FSKD (docs/spec.md §5).

For one block, the student signal ``s`` (N, Cs, H, W) and the teacher target
``t`` (N, Ct, H, W) are read as M = N*H*W samples ("pixels are samples"). The
normal equations of the 1x1 conv Q need only

    G  = sum_p s_p s_p^T      (Cs, Cs)
    Hc = sum_p t_p s_p^T      (Ct, Cs)

and the pixel count, all of which are sums over batches and over ranks.

Numerics. Pre-activation features have channel means that are large next to
their spread, so a plain fp32 ``s @ s.T`` loses the spread to rounding and the
Gram matrix it gives is not even positive definite. Here every update

1. subtracts a per-channel shift c (the first batch's channel means), giving
   z = x - c, exact in fp32 when x is near c (Sterbenz);
2. copies the shifted rows into one stacked (K, M) buffer
   Z = [z_s; 1; z_t] with K = Cs + 1 + Ct (the row of ones carries the counts
   and the channel sums through the same product);
3. computes, tile by tile over the pixels, Z @ Z[:Cs].T in fp32 with TF32
   off: ONE batched GEMM that reads s and t once and yields, as blocks of the
   (K, Cs) result, sum z_s z_s^T, sum z_s (the row of ones) and sum z_t z_s^T;
   sum z_t is a row sum of the t half of the buffer. (Z[:Cs+1] as the right
   operand would give sum z_t from the GEMM too, but an odd width of Cs+1
   columns makes MKL's GEMM ~20% slower than the reduction costs.) With the
   column of sums sum z = [sum z_s; M; sum z_t] appended this is P (K, Cs+1).
   A batch whose buffer would not fit in the cache goes through steps 2-3 in
   chunks of whole samples, one GEMM each: s and t are still read once, and Z
   never leaves the cache;
4. adds the tiles in fp64 and restores the uncentred sums in fp64:
   with row shift a = [c_s; 0; c_t] and column shift b = [c_s; 0],

       sum (z + a)(z' + b)^T = P + P[:, Cs] b^T + a P[Cs, :] + M a b^T,

   accumulated into one fp64 (K, Cs+1) running sum.

Because the running sums are uncentred fp64, ranks with different shifts can
simply add them (``all_reduce``). fp64 inputs are multiplied in fp64.

What the fp32 products cost. On ill-conditioned pre-ReLU-like features (64
channels around mean 50, cond(S - mean) = 4e3, an exactly linear fp32 target,
4096 pixels) the least-squares Q from these statistics fits T to within
8.7e-5 of ||T - mean(T)|| (residual 0.069 against 0.0006 for fp64 ``lstsq``
of the same fp32 values): the rounding of the fp32 products, amplified by
cond^2 = 1.6e7, is the limit, ~11x inside the 1e-3 the solve promises.
``compute_dtype=torch.float64`` multiplies in fp64 instead and matches
``lstsq`` (7.5e-7); on a CPU it costs 2-2.5x the fp32 time of an update (and
far more on GPUs with slow fp64), so it is an option, not the default.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch

from .._checks import check_count, check_float_dtype, shape_str

#: pixels per fp32 tile product; tile sums are added in fp64
TILE_PIXELS = 4096
#: a batch whose stacked buffer Z would pass CHUNK_MIN_BYTES is processed in chunks
#: of whole samples of about CHUNK_BYTES, so that Z is written and read in the cache
#: instead of memory (ResNet-18's first blocks at batch 16: 26 MB, ~20 % faster)
CHUNK_MIN_BYTES = 16 << 20
CHUNK_BYTES = 8 << 20


@contextlib.contextmanager
def ieee_fp32_matmul(device: torch.device):
    """Full-precision fp32 matmul on ``device`` (TF32 / bf16 off, autocast off), restored afterwards.

    Only the new per-backend precision flags are touched (read, set, restored),
    so a program that uses either the legacy or the new API keeps working.
    Autocast is switched off inside: statistics updated within a user's
    ``torch.autocast`` region would otherwise be multiplied in fp16/bf16.
    """
    if device.type in ("cpu", "cuda"):
        with torch.autocast(device.type, enabled=False), _precision_flags(device):
            yield
    else:
        with _precision_flags(device):
            yield


@contextlib.contextmanager
def _precision_flags(device: torch.device):
    if device.type == "cuda":
        backend = torch.backends.cuda.matmul
    elif device.type == "cpu":
        backend = getattr(torch.backends, "mkldnn", None)
        backend = getattr(backend, "matmul", None)
    else:
        backend = None
    if backend is not None and hasattr(backend, "fp32_precision"):
        saved = backend.fp32_precision
        backend.fp32_precision = "ieee"
        try:
            yield
        finally:
            backend.fp32_precision = saved
    elif device.type == "cuda":  # torch without the per-backend flags
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
    else:
        yield


class GramStats:
    r"""Running G = sum s s^T, Hc = sum t s^T and pixel count for one block.

    Args:
        c_in: student channels Cs.
        c_out: teacher channels Ct (default: ``c_in``).
        device: where the fp64 sums live; default the device of the first
            ``update``.
        compute_dtype: ``None`` (default): tile products in fp32 (fp64 when an
            input is fp64); ``torch.float64``: always in fp64 (exact to fp64
            rounding on ill-conditioned features, 2-2.5x slower on a CPU).

    Attributes (fp64, views of one running buffer):
        G (Cs, Cs), Hc (Ct, Cs), sum_s (Cs,), sum_t (Ct,), and ``count`` (int, M).

    ``update`` reads s and t once (see the module docstring for the numerics)
    and never synchronises with the device.
    """

    def __init__(self, c_in: int, c_out: Optional[int] = None, *,
                 device: Union[str, torch.device, None] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        if compute_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, torch.float32 or torch.float64, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self.c_in = check_count(c_in, "c_in")
        self.c_out = check_count(c_in if c_out is None else c_out, "c_out")
        self._device = None if device is None else torch.device(device)
        self._acc: Optional[torch.Tensor] = None  # (K, Cs + 1) fp64, uncentred sums
        self._shift64: Optional[torch.Tensor] = None  # (K,) row shift [c_s; 0; c_t]
        self._work: Optional[torch.Tensor] = None  # stacked work buffer, reused
        self.count = 0
        if self._device is not None:
            self._allocate(self._device)

    # ---------------------------------------------------------------- state
    @property
    def device(self) -> Optional[torch.device]:
        """Device of the sums (None until the first update when not given)."""
        return self._device

    def _allocate(self, device: torch.device) -> torch.Tensor:
        k = self.c_in + 1 + self.c_out
        self._acc = torch.zeros(k, self.c_in + 1, dtype=torch.float64, device=device)
        self._device = device
        return self._acc

    def _sums(self) -> torch.Tensor:
        return self._allocate(self._device or torch.device("cpu")) if self._acc is None else self._acc

    @property
    def G(self) -> torch.Tensor:
        """(Cs, Cs) fp64: sum over pixels of s s^T."""
        return self._sums()[: self.c_in, : self.c_in]

    @property
    def Hc(self) -> torch.Tensor:
        """(Ct, Cs) fp64: sum over pixels of t s^T."""
        return self._sums()[self.c_in + 1:, : self.c_in]

    @property
    def sum_s(self) -> torch.Tensor:
        """(Cs,) fp64: sum over pixels of s."""
        return self._sums()[: self.c_in, self.c_in]

    @property
    def sum_t(self) -> torch.Tensor:
        """(Ct,) fp64: sum over pixels of t."""
        return self._sums()[self.c_in + 1:, self.c_in]

    def __repr__(self) -> str:
        return (f"GramStats(c_in={self.c_in}, c_out={self.c_out}, count={self.count}, "
                f"device={self._device})")

    # --------------------------------------------------------------- update
    def _check(self, s, t):
        check_float_dtype(s, "s")
        check_float_dtype(t, "t")
        if s.dim() not in (2, 4):
            raise ValueError(f"s must be (N, C, H, W) or (N, C), got shape {shape_str(s)}")
        if t.dim() != s.dim() or t.shape[0] != s.shape[0] or t.shape[2:] != s.shape[2:]:
            raise ValueError(
                f"s and t must have the same batch and spatial sizes, got s {shape_str(s)} "
                f"and t {shape_str(t)}")
        if s.shape[1] != self.c_in:
            raise ValueError(f"s has {s.shape[1]} channels (shape {shape_str(s)}), "
                             f"but GramStats(c_in={self.c_in})")
        if t.shape[1] != self.c_out:
            raise ValueError(f"t has {t.shape[1]} channels (shape {shape_str(t)}), "
                             f"but GramStats(c_out={self.c_out})")
        if s.device != t.device:
            raise ValueError(f"s and t must be on one device, got s on {s.device} and t on {t.device}")
        if self._device is not None and s.device != self._device:
            raise ValueError(f"s and t are on {s.device}, but these statistics live on {self._device}")
        for name, x in (("s", s), ("t", t)):
            if x.numel() == 0:
                raise ValueError(f"{name} is empty (shape {shape_str(x)}); zero-size inputs are not accepted")

    def update(self, s: torch.Tensor, t: torch.Tensor) -> "GramStats":
        """Add one batch: s (N, Cs, H, W) and t (N, Ct, H, W) (or (N, C) each).

        fp16/bf16/fp32 inputs are multiplied in fp32, fp64 in fp64; the sums are fp64.
        A zero-size s or t (an empty batch) raises ``ValueError``, as every kdkernels op does.
        Returns ``self``.
        """
        self._check(s, t)
        cs, ct = self.c_in, self.c_out
        n = s.shape[0]
        hw = math.prod(s.shape[2:])
        m = n * hw
        s3 = s.detach().reshape(n, cs, hw)
        t3 = t.detach().reshape(n, ct, hw)
        acc = self._acc if self._acc is not None else self._allocate(s.device)
        wide = self.compute_dtype == torch.float64 or torch.float64 in (s.dtype, t.dtype)
        dtype = torch.float64 if wide else torch.float32
        k = cs + 1 + ct
        if self._shift64 is None:
            # first batch's channel means, rounded once to the compute dtype so that
            # the value subtracted and the value restored are the same number
            shift = torch.zeros(k, dtype=dtype, device=s.device)
            shift[:cs] = s3.mean(dim=(0, 2), dtype=dtype)
            shift[cs + 1:] = t3.mean(dim=(0, 2), dtype=dtype)
            self._shift64 = shift.to(torch.float64)
        shift = self._shift64.to(dtype)

        # P = sum z_s-column products (K, Cs) and sum z_t (Ct,), over chunks of whole
        # samples: one chunk unless Z would not fit in the cache (see CHUNK_BYTES)
        per_sample = k * hw * shift.element_size()
        chunks = 1 if per_sample * n <= CHUNK_MIN_BYTES else -(-n // max(1, CHUNK_BYTES // per_sample))
        q = -(-n // chunks)  # samples per chunk, near-equal
        if chunks == 1:
            p, sum_zt = self._products(s3, t3, shift)
        else:
            p = torch.zeros(k, cs, dtype=torch.float64, device=s.device)
            sum_zt = torch.zeros(ct, dtype=torch.float64, device=s.device)
            for n0 in range(0, n, q):
                pc, zc = self._products(s3[n0:n0 + q], t3[n0:n0 + q], shift)
                p.add_(pc)
                sum_zt.add_(zc)
        # added straight into the running sums (a single fp32 tile casts inside add_:
        # no fp64 temporary); row Cs of p is sum z_s
        acc[:, :cs].add_(p)
        m64 = torch.full((1,), float(m), dtype=torch.float64, device=s.device)
        row = torch.cat((p[cs].to(torch.float64), m64))  # (Cs+1,): [sum z_s; M]
        col = torch.cat((row, sum_zt))  # (K,): [sum z_s; M; sum z_t], the column Cs of P

        # restore the uncentred sums in fp64, the correction as one rank-2 update:
        # P[:, Cs] b^T + a P[Cs, :] + M a b^T = [P[:, Cs] + M a, a] @ [b, P[Cs, :]]^T
        a = shift.to(torch.float64)  # row shift (K,)
        b = a[: cs + 1]  # column shift [c_s; 0]
        u = torch.stack((col + m * a, a), dim=1)  # (K, 2)
        v = torch.stack((b, row), dim=0)  # (2, Cs+1)
        acc[:, cs].add_(col)
        acc.addmm_(u, v)
        self.count += m
        return self

    def _products(self, s3: torch.Tensor, t3: torch.Tensor, shift: torch.Tensor):
        """(P, sum z_t) of the samples s3 (n, Cs, HW), t3 (n, Ct, HW): P = sum_tiles Z Z[:Cs]^T
        (K, Cs), fp32 for one tile else the fp64 sum of the tiles, and sum z_t (Ct,) fp64."""
        n, cs, hw = s3.shape
        ct = t3.shape[1]
        k, m = cs + 1 + ct, n * hw
        # stacked, shifted buffer Z = [z_s; 1; z_t], (K, tiles * tile)
        tiles = -(-m // TILE_PIXELS)
        tile = -(-m // tiles)
        buf = self._buffer(k, tiles * tile, shift.dtype, s3.device)
        torch.sub(s3.transpose(0, 1), shift[:cs, None, None], out=buf[:cs, :m].view(cs, n, hw))
        buf[cs, :m] = 1
        torch.sub(t3.transpose(0, 1), shift[cs + 1:, None, None], out=buf[cs + 1:, :m].view(ct, n, hw))
        buf[:, m:] = 0
        # one batched GEMM over the pixel tiles: (tiles, K, tile) @ (tiles, tile, Cs)
        zt = buf.view(k, tiles, tile).transpose(0, 1)
        with ieee_fp32_matmul(s3.device):
            prod = torch.bmm(zt, zt[:, :cs].transpose(1, 2))
        p = prod[0] if tiles == 1 else prod.sum(0, dtype=torch.float64)
        return p, zt[:, cs + 1:].sum(2).sum(0, dtype=torch.float64)

    def _buffer(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The stacked (rows, cols) work buffer, kept between updates of one shape
        (a fresh CPU allocation costs as much as filling it, in page faults)."""
        buf = self._work
        if buf is None or buf.shape[0] != rows or buf.shape[1] < cols or buf.dtype != dtype or buf.device != device:
            buf = self._work = torch.empty(rows, cols, dtype=dtype, device=device)
        return buf if buf.shape[1] == cols else buf[:, :cols]

    # ----------------------------------------------------------- distributed
    def all_reduce(self, group=None) -> "GramStats":
        """Sum G, Hc, the channel sums and the count over the ranks of ``group``.

        One ``all_reduce`` of one fp64 buffer, then one host read of the count.
        Call it once, after the last ``update`` and before ``solve``. A rank that
        saw no data takes part with zeros (on CUDA for NCCL, else on the CPU).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("GramStats.all_reduce needs an initialised torch.distributed process group")
        if self._acc is None:
            dev = self._device
            if dev is None:
                nccl = dist.get_backend(group) == "nccl"
                dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            self._allocate(dev)
        dist.all_reduce(self._acc, op=dist.ReduceOp.SUM, group=group)
        self.count = int(round(float(self._acc[self.c_in, self.c_in])))
        return self

