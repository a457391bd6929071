"""Measuring one case: the correctness guard, the timings and the peak memory.

Nothing here writes files or formats numbers for people (that is ``report.py``);
nothing here knows which op it measures (that is a :class:`harness.Case`).

- the guard: every provider runs forward and backward on the same inputs, and
  its outputs and gradients are compared with the reference run in float64
  (relative error ||a - b|| / ||b||); a provider that fails or errors is
  reported and not timed;
- modes ``forward`` (with autograd recording, as in training), ``backward``
  (the forward runs untimed before each repetition) and ``full``; gradients are
  set to ``None`` (untimed) before each repetition;
- the providers of a case are timed interleaved, in ROUNDS rounds, so that a
  machine that drifts moves them alike; median and 20 %/80 % quantiles over the
  repetitions, warm-up excluded; on CUDA each repetition is timed with a pair of
  CUDA events (like ``triton.testing.do_bench``), on CPU with
  ``time.perf_counter``; repetitions rotate over several copies of the inputs,
  as many as it takes to exceed the last-level cache twice, so caches do not
  flatter small shapes;
- peak memory per mode beyond what exists when the timed region starts (inputs;
  for ``backward`` also the forward's graph): CUDA ``max_memory_allocated``;
  CPU the running sum of the allocation events of ``torch.profiler``
  (``profile_memory=True``), i.e. every tensor allocated through torch. Scratch
  that native code allocates itself (the C++ kernels' ``std::vector`` buffers,
  e.g. ABF's per-unit partial sums, hint's per-thread partials) is not seen
  there: :data:`CPU_MEMORY_NOTE` says so beside every CPU memory figure.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

from machine import last_level_cache_bytes

MODES = ("forward", "backward", "full")
#: timed repetitions of the providers of a case are interleaved in this many rounds
ROUNDS = 5
DEFAULT_TOL = {"fp64": 1e-10, "fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2, "fp16": 1e-2}
#: what a CPU peak-memory figure counts (and what it misses)
CPU_MEMORY_NOTE = ("CPU peak memory counts tensors allocated through torch only; the C++ kernels' own "
                   "scratch (e.g. ABF's per-unit partial sums, hint's per-thread partials) is not included")


@dataclass
class Settings:
    device: str = "cpu"
    quick: bool = False
    reps: Optional[int] = None
    backends: str = "default"  # or "all"
    providers: Optional[Sequence[str]] = None  # filter, None = all


def _timing_policy(s: Settings) -> Dict[str, float]:
    """Seconds of timed repetitions to aim for per measurement, and rep bounds."""
    if s.device == "cuda":
        return dict(target=0.01 if s.quick else 0.08, min_reps=3 if s.quick else 10, max_reps=1000, warm_s=0.025)
    return dict(target=0.02 if s.quick else 0.25, min_reps=3 if s.quick else 5, max_reps=200, warm_s=0.0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def tensor_bytes(*objs: Any) -> int:
    """Total bytes of every tensor in (nested lists/tuples/dicts of) ``objs``."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(objs) if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------- pytree helpers


def clone_args(args: Tuple[Any, ...], dtype: Optional[torch.dtype] = None) -> Tuple[Any, ...]:
    """Deep copy: tensors cloned (detached, same ``requires_grad``), modules deep-copied;
    floating tensors and modules cast to ``dtype`` when given."""

    def one(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            y = x.detach()
            y = y.to(dtype) if (dtype is not None and y.is_floating_point()) else y.clone()
            if y.data_ptr() == x.data_ptr():
                y = y.clone()
            return y.requires_grad_(x.requires_grad)
        if isinstance(x, torch.nn.Module):
            m = copy.deepcopy(x)
            return m.to(dtype) if dtype is not None else m
        return x

    return tuple(pytree.tree_map(one, list(args)))


def grad_leaves(args: Tuple[Any, ...]) -> List[torch.Tensor]:
    """Tensors (and module parameters) in ``args`` that require grad, in order."""
    out: List[torch.Tensor] = []
    for x in pytree.tree_leaves(list(args)):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            out.append(x)
        elif isinstance(x, torch.nn.Module):
            out.extend(p for p in x.parameters() if p.requires_grad)
    return out


def output_leaves(out: Any) -> List[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def rel_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    """||a - b|| / ||b|| in float64 (absolute when ||b|| = 0); None counts as zeros; NaN -> inf."""
    if a is None and b is None:
        return 0.0
    if a is None:
        a = torch.zeros_like(b)
    if b is None:
        b = torch.zeros_like(a)
    if a.shape != b.shape:
        return math.inf
    a64, b64 = a.detach().double(), b.detach().double()
    num = torch.linalg.vector_norm(a64 - b64).item()
    den = torch.linalg.vector_norm(b64).item()
    err = num / den if den > 0 else num
    return err if math.isfinite(err) else math.inf


# --------------------------------------------------------------------------- running one case


@dataclass
class Stats:
    median: float
    q20: float
    q80: float
    n: int


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats_of(times: Sequence[float]) -> Stats:
    return Stats(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C-level stderr (the profiler's start/stop log lines) inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class CaseRunner:
    """Runs the guard, the timings and the memory measurements of one case."""

    def __init__(self, case: Any, settings: Settings):
        """``case``: a :class:`harness.Case` (its inputs, reference, modes, dtype, tolerance)."""
        self.case = case
        self.s = settings
        self.dev = settings.device
        self._gouts: Dict[Tuple[Tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self.copies: List[Tuple[Any, ...]] = []
        self.grads: List[List[torch.Tensor]] = []

    # -- inputs
    def make_copies(self) -> None:
        torch.manual_seed(0)
        first = tuple(self.case.make_inputs())
        nbytes = max(tensor_bytes(first), 1)
        if self.s.quick:
            n = 2
        else:
            cache = last_level_cache_bytes(self.dev)
            budget = (4 << 30) if self.dev == "cuda" else (1 << 30)
            n = max(1, min(16, math.ceil(2 * cache / nbytes), budget // nbytes))
        self.copies = [first] + [clone_args(first) for _ in range(n - 1)]
        self.grads = [grad_leaves(c) for c in self.copies]

    def grad_out(self, t: torch.Tensor) -> torch.Tensor:
        """The fixed grad_output for an output like ``t``: 1 for scalars, seeded randn else."""
        key = (tuple(t.shape), t.dtype)
        if key not in self._gouts:
            if t.numel() == 1:
                g = torch.ones_like(t)
            else:
                gen = torch.Generator(device=t.device).manual_seed(1234)
                g = torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float64).to(t.dtype)
            self._gouts[key] = g
        return self._gouts[key]

    def _backward(self, out: Any) -> None:
        outs = [t for t in output_leaves(out) if t.requires_grad]
        if outs:
            torch.autograd.backward(outs, [self.grad_out(t) for t in outs])

    @property
    def has_backward(self) -> bool:
        return any(m in self.case.modes for m in ("backward", "full")) and bool(self.grads and self.grads[0])

    # -- correctness guard
    def _run_once(self, fn: Callable[..., Any], args: Tuple[Any, ...]):
        for g in grad_leaves(args):
            g.grad = None
        out = fn(*args)
        grads: List[Optional[torch.Tensor]] = []
        if self.has_backward and any(t.requires_grad for t in output_leaves(out)):
            self._backward(out)
            grads = [g.grad for g in grad_leaves(args)]
        return [t.detach() for t in output_leaves(out)], grads

    def oracle(self):
        args64 = clone_args(self.copies[0], torch.float64)
        return self._run_once(self.case.reference, args64)

    def check(self, fn: Callable[..., Any], ref) -> Tuple[bool, float, float, str]:
        """Run ``fn`` once against the oracle's ``ref``: (ok, max relative error, seconds of
        the first call, note). A failure is the note (``error: ...`` / ``mismatch: ...``)."""
        ref_out, ref_grads = ref
        args = clone_args(self.copies[0])
        t0 = time.perf_counter()
        try:
            out, grads = self._run_once(fn, args)
            _sync(self.dev)
        except Exception as exc:  # a provider that cannot run is a failed check (a row), not fatal
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            return False, math.nan, time.perf_counter() - t0, f"error: {msg}"
        first = time.perf_counter() - t0
        if len(out) != len(ref_out) or len(grads) != len(ref_grads):
            return False, math.inf, first, "mismatch: different number of outputs/gradients"
        errs_out = [rel_err(a, b) for a, b in zip(out, ref_out)]
        errs_grad = [rel_err(a, b) for a, b in zip(grads, ref_grads)]
        worst = max(errs_out + errs_grad + [0.0])
        tol = self.case.tol if self.case.tol is not None else DEFAULT_TOL.get(self.case.dtype, 1e-4)
        if worst <= tol:
            return True, worst, first, ""
        where = "output" if max(errs_out + [0.0]) > tol else "gradient"
        return False, worst, first, f"mismatch: {where} rel err {worst:.2e} > {tol:.0e}"

    # -- one measurement
    def _mode_fns(self, fn: Callable[..., Any], mode: str):
        copies, grads = self.copies, self.grads

        def clear(k: int) -> None:
            for g in grads[k]:
                g.grad = None

        if mode == "forward":
            def prep(k):
                clear(k)
                return None

            def body(k, st):
                return fn(*copies[k])
        elif mode == "backward":
            def prep(k):
                clear(k)
                return fn(*copies[k])

            def body(k, out):
                self._backward(out)
                return None
        elif mode == "full":
            def prep(k):
                clear(k)
                return None

            def body(k, st):
                out = fn(*copies[k])
                self._backward(out)
                return out
        else:
            raise ValueError(mode)
        return prep, body, clear

    def _time(self, prep, body, n: int, start: int = 0) -> List[float]:
        ncopy = len(self.copies)
        times: List[float] = []
        if self.dev == "cuda":
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for i in range(n):
                k = (start + i) % ncopy
                st = prep(k)
                evs[i][0].record()
                keep = body(k, st)
                evs[i][1].record()
                del keep, st
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) / 1e3 for a, b in evs]
        else:
            for i in range(n):
                k = (start + i) % ncopy
                st = prep(k)
                t0 = time.perf_counter()
                keep = body(k, st)
                t1 = time.perf_counter()
                del keep, st
                times.append(t1 - t0)
        return times

    def measure(self, fns: Sequence[Callable[..., Any]], mode: str) -> List[Stats]:
        """Time every function of ``fns`` in ``mode``, interleaved.

        Each is warmed up and gets its repetition count from its own speed; then
        the repetitions run in ROUNDS rounds, every function taking its share in
        turn. A machine that speeds up or slows down meanwhile (a shared VM
        does, by more than the differences measured) then moves every
        provider's times alike instead of whichever one ran during the drift.
        """
        pol = _timing_policy(self.s)
        plans = []
        for fn in fns:
            prep, body, clear = self._mode_fns(fn, mode)
            # warm-up (excluded): at least one pass over the copies' first entries, then by time
            warm = self._time(prep, body, 3 if self.dev == "cuda" else 1)
            est = max(statistics.median(warm), 1e-7)
            if pol["warm_s"] > 0 and sum(warm) < pol["warm_s"]:
                self._time(prep, body, min(200, int(math.ceil((pol["warm_s"] - sum(warm)) / est))))
            if self.s.reps:
                n = self.s.reps
            else:
                n = int(min(pol["max_reps"], max(pol["min_reps"], round(pol["target"] / est))))
            plans.append((prep, body, clear, n))
        times: List[List[float]] = [[] for _ in plans]
        for r in range(ROUNDS):
            for i, (prep, body, _, n) in enumerate(plans):
                share = n * (r + 1) // ROUNDS - n * r // ROUNDS
                if share:
                    times[i] += self._time(prep, body, share, start=1 + len(times[i]))
        for _, _, clear, _ in plans:
            for k in range(len(self.copies)):
                clear(k)
        return [stats_of(t) for t in times]

    def peak_memory(self, fn: Callable[..., Any], mode: str) -> float:
        """Bytes allocated at peak during one run of ``mode`` beyond what existed before it
        (on CPU: through torch only, see :data:`CPU_MEMORY_NOTE`). Raises what the run raises."""
        prep, body, clear = self._mode_fns(fn, mode)
        try:
            if self.dev == "cuda":
                st = prep(0)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                keep = body(0, st)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                del keep, st
                return float(max(peak, 0))
            from torch.profiler import ProfilerActivity, profile

            st = prep(0)
            with _quiet_stderr():
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    keep = body(0, st)
                    del keep, st
            cpu = torch.autograd.DeviceType.CPU
            evs = [e for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]" and e.device_type() == cpu]
            evs.sort(key=lambda e: e.start_ns())
            cur = peak = 0
            for e in evs:
                cur += e.nbytes()
                peak = max(peak, cur)
            return float(peak)
        finally:
            clear(0)


