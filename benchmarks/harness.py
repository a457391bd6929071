"""The benchmark harness: timing, memory, bandwidth, correctness guard, CSV, table, chart.

It knows nothing about any op. An op is a module ``benchmarks/cases/<op>.py``
with one function::

    def cases(device: str, quick: bool) -> list[Case]

Each :class:`Case` says what to run (a configuration label and shape, a function
making fresh inputs, the plain-PyTorch reference, the package's op, the minimum
bytes it must move); the harness does the rest:

- providers: ``eager`` (the reference as it is), ``compile`` (``torch.compile``
  of the reference; the first call, which compiles, is reported as
  ``compile_s`` and kept out of the timings), ``kdkernels`` (the package's op,
  default backend) and, with ``--backends all``, ``kdkernels[<name>]`` for every
  backend available on the device;
- a correctness guard before timing: every provider runs forward and backward
  on the same inputs and its outputs and gradients are compared with the
  reference run in float64 (relative error ||a - b|| / ||b||); a provider that
  fails or errors is reported and not timed;
- modes ``forward`` (with autograd recording, as in training), ``backward``
  (the forward runs untimed before each repetition) and ``full``;
  gradients are set to ``None`` (untimed) before each repetition;
- median and 20 %/80 % quantiles over the repetitions, warm-up excluded; on CUDA
  each repetition is timed with a pair of CUDA events (like
  ``triton.testing.do_bench``), on CPU with ``time.perf_counter``; repetitions
  rotate over several copies of the inputs, as many as it takes to exceed the
  last-level cache twice, so caches do not flatter small shapes;
- peak memory per mode beyond what exists when the timed region starts (inputs;
  for ``backward`` also the forward's graph): CUDA ``max_memory_allocated``;
  CPU the running sum of the allocation events of ``torch.profiler``
  (``profile_memory=True``), i.e. every tensor allocated through torch;
- achieved bandwidth = the case's minimum bytes / time, also as a % of the
  machine's copy bandwidth measured once at start (a large tensor copy,
  bytes read + written / time);
- a long CSV (one value per row), a table on stdout and a PNG chart per op drawn
  from the CSV alone.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import datetime as _dt
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

MODES = ("forward", "backward", "full")
#: timed repetitions of the providers of a case are interleaved in this many rounds
ROUNDS = 5
CSV_COLUMNS = (
    "op", "case", "shape", "dtype", "provider", "mode", "metric", "value", "q20", "q80",
    "note", "device", "device_name", "threads", "torch", "triton", "kdkernels", "commit", "date",
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One configuration of one op.

    Attributes:
        name: configuration label, e.g. ``"resnet32x4→resnet8x4 b64"``.
        shape: shape label, e.g. ``"64×[64×32², 128×16², 256×8², 256×1²]"``.
        make_inputs: returns a fresh tuple of positional arguments (tensors on
            the device, those to differentiate with ``requires_grad=True``;
            lists of tensors and ``nn.Module`` objects are fine). Called once;
            the harness clones the result for the rotation copies.
        reference: the plain-PyTorch reference, ``reference(*args)``; it is the
            ``eager`` provider, is compiled for ``compile`` and, on float64
            copies of the inputs, is the oracle of the correctness guard.
        kdkernels: the package's op, ``kdkernels(*args, backend=None | name)``;
            ``None`` when the op cannot be imported (say why in ``note``).
        backend_op: the op's name in ``kdkernels.backends`` (for
            ``--backends all``); ``None`` when it has no backends.
        bytes_fwd, bytes_bwd: minimum bytes the forward / backward must move
            (``None``: not memory-bound, no bandwidth reported).
        dtype: label of the inputs' dtype.
        modes: modes to run; drop ``backward``/``full`` for ops without gradients.
        tol: relative error the guard accepts (default by ``dtype``).
        note: shown in the table under the case (e.g. why kdkernels is missing).
        floor: optional ``(label, fn)``: a lower bound the issue measures kdkernels
            against (e.g. one fp32 GEMM of the same size), timed like the
            providers as ``floor: <label>`` but not checked against the oracle
            (it computes something else); the tables report kdkernels' time as
            a multiple of it.
    """

    name: str
    shape: str
    make_inputs: Callable[[], Tuple[Any, ...]]
    reference: Callable[..., Any]
    kdkernels: Optional[Callable[..., Any]] = None
    backend_op: Optional[str] = None
    bytes_fwd: Optional[int] = None
    bytes_bwd: Optional[int] = None
    dtype: str = "fp32"
    modes: Tuple[str, ...] = MODES
    tol: Optional[float] = None
    note: str = ""
    floor: Optional[Tuple[str, Callable[..., Any]]] = None


DEFAULT_TOL = {"fp64": 1e-10, "fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2, "fp16": 1e-2}


def tensor_bytes(*objs: Any) -> int:
    """Total bytes of every tensor in (nested lists/tuples/dicts of) ``objs``."""
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(objs) if isinstance(t, torch.Tensor))


def shape_label(shape: Sequence[int]) -> str:
    """(64, 128, 16, 16) -> '64×128×16²' (a square tail is written as a power)."""
    dims = list(shape)
    if len(dims) >= 2 and dims[-1] == dims[-2]:
        return "×".join(str(d) for d in dims[:-2]) + ("×" if len(dims) > 2 else "") + f"{dims[-1]}²"
    return "×".join(str(d) for d in dims)


# --------------------------------------------------------------------------- settings & machine


@dataclass
class Settings:
    device: str = "cpu"
    quick: bool = False
    reps: Optional[int] = None
    backends: str = "default"  # or "all"
    providers: Optional[Sequence[str]] = None  # filter, None = all
    verbose_progress: bool = True


def _timing_policy(s: Settings) -> Dict[str, float]:
    """Seconds of timed repetitions to aim for per measurement, and rep bounds."""
    if s.device == "cuda":
        return dict(target=0.01 if s.quick else 0.08, min_reps=3 if s.quick else 10, max_reps=1000, warm_s=0.025)
    return dict(target=0.02 if s.quick else 0.25, min_reps=3 if s.quick else 5, max_reps=200, warm_s=0.0)


def last_level_cache_bytes(device: str) -> int:
    """L2 of the GPU, or the largest CPU cache listed in sysfs (32 MiB if unknown)."""
    if device == "cuda":
        try:
            return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)
        except Exception:
            return 50 * 2**20
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    txt = f.read().strip()
            except OSError:
                continue
            m = re.match(r"(\d+)([KMG]?)", txt)
            if m:
                mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
                best = max(best, int(m.group(1)) * mult)
    except OSError:
        pass
    return best or 32 * 2**20


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "cpu"


def device_tag(device: str) -> str:
    """Folder name for results: 'cpu', or the card's name ('nvidia-h100-80gb-hbm3')."""
    if device != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def git_commit() -> str:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "none"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               env=env, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "none"


def machine_info(device: str) -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    try:
        import kdkernels

        kd_version = getattr(kdkernels, "__version__", "?")
    except Exception:
        kd_version = "none"
    return {
        "device": device,
        "device_name": device_name(device),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "kdkernels": kd_version,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """Bytes read + written per second of a large ``dst.copy_(src)`` (median of several)."""
    cache = last_level_cache_bytes(device)
    if device == "cuda":
        nbytes = 256 * 2**20 if quick else max(1 << 30, 8 * cache)
        reps = 10 if quick else 30
    else:
        nbytes = 64 * 2**20 if quick else min(512 * 2**20, max(256 * 2**20, 2 * cache))
        reps = 3 if quick else 5
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch / warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)


# --------------------------------------------------------------------------- pytree helpers


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


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


# --------------------------------------------------------------------------- providers


@dataclass
class Provider:
    name: str
    fn: Callable[..., Any]
    kind: str  # eager | compile | kdkernels | floor
    note: str = ""
    timed: bool = True  # False: correctness guard only (e.g. the Triton interpreter on CPU)
    checked: bool = True  # False: a floor, which computes something else than the op


_COMPILED: Dict[int, Callable[..., Any]] = {}


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One ``torch.compile`` wrapper per reference function, specialised per shape."""
    key = id(fn)
    if key not in _COMPILED:
        import torch._dynamo as dynamo

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
        if hasattr(dynamo.config, "accumulated_recompile_limit"):
            dynamo.config.accumulated_recompile_limit = max(dynamo.config.accumulated_recompile_limit, 4096)
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    return _COMPILED[key]


def _kdkernels_backends(op: Optional[str], device: str) -> Tuple[List[str], str]:
    """(available backends, default backend or '') for ``op`` on ``device``."""
    if op is None:
        return [], ""
    try:
        from kdkernels import backends as kb
    except Exception:
        return [], ""
    try:
        avail = list(kb.available_backends(op, device))
    except Exception:
        avail = []
    default = ""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            default = kb.choose_backend(op, torch.device(device))
    except Exception:
        pass
    return avail, default


FLOOR_PREFIX = "floor: "


def build_providers(case: Case, settings: Settings) -> Tuple[List[Provider], List[str]]:
    """The providers for ``case``, and notes on the ones that are missing."""
    provs = [Provider("eager", case.reference, "eager"), Provider("compile", _compiled(case.reference), "compile")]
    notes = []
    if case.kdkernels is None:
        notes.append(f"kdkernels: not available ({case.note or 'op missing'})")
    else:
        avail, default = _kdkernels_backends(case.backend_op, settings.device)
        kd = case.kdkernels
        provs.append(Provider("kdkernels", lambda *a, _kd=kd: _kd(*a), "kdkernels",
                              note=f"default backend: {default}" if default else ""))
        if settings.backends == "all":
            for b in avail:
                interp = b == "triton" and settings.device == "cpu"
                provs.append(Provider(f"kdkernels[{b}]", lambda *a, _kd=kd, _b=b: _kd(*a, backend=_b), "kdkernels",
                                      note="Triton interpreter: checked, not timed" if interp else "",
                                      timed=not interp))
    if case.floor is not None:
        label, fn = case.floor
        provs.append(Provider(f"{FLOOR_PREFIX}{label}", fn, "floor", note="a floor: timed, not checked",
                              checked=False))
    if settings.providers:
        wanted = set(settings.providers)
        provs = [p for p in provs if p.name in wanted or p.kind in wanted]
    return provs, notes


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
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except Exception:
        yield
        return
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

    def __init__(self, case: Case, settings: Settings):
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

    def check(self, prov: Provider, ref) -> Tuple[bool, float, float, str]:
        """(ok, max relative error, seconds of the first call, note)."""
        ref_out, ref_grads = ref
        args = clone_args(self.copies[0])
        t0 = time.perf_counter()
        try:
            out, grads = self._run_once(prov.fn, args)
            _sync(self.dev)
        except Exception as exc:  # a provider that cannot run is reported, not fatal
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

    def peak_memory(self, fn: Callable[..., Any], mode: str) -> Optional[float]:
        """Bytes allocated at peak during one run of ``mode`` beyond what existed before it."""
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
        except Exception:
            return None
        finally:
            clear(0)


# --------------------------------------------------------------------------- running an op


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.width = 0
        self.t0 = time.perf_counter()

    def __call__(self, msg: str, final: bool = False) -> None:
        if not self.enabled:
            return
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        if self.tty:
            pad = max(0, self.width - len(line))
            sys.stderr.write("\r" + line + " " * pad + ("\n" if final else ""))
            self.width = 0 if final else len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.width = 0


def run_op(op: str, cases: Sequence[Case], settings: Settings, meta: Dict[str, str],
           copy_bw: float, progress: Progress) -> List[Dict[str, Any]]:
    """Guard, time and measure every case of ``op``; returns CSV rows."""
    rows: List[Dict[str, Any]] = []

    def row(case: Case, provider: str, mode: str, metric: str, value: Any,
            q20: Any = "", q80: Any = "", note: str = "") -> None:
        rows.append(dict(op=op, case=case.name, shape=case.shape, dtype=case.dtype, provider=provider,
                         mode=mode, metric=metric, value=value, q20=q20, q80=q80, note=note, **meta))

    for ci, case in enumerate(cases):
        tag = f"{op} {ci + 1}/{len(cases)} {case.name}"
        progress(f"{tag}: inputs")
        runner = CaseRunner(case, settings)
        try:
            runner.make_copies()
            providers, notes = build_providers(case, settings)
            for n in notes:
                row(case, "kdkernels", "check", "ok", 0, note=n)
            progress(f"{tag}: float64 oracle")
            ref = runner.oracle()
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            row(case, "", "check", "ok", 0, note=f"case skipped: {msg}")
            progress(f"{tag}: skipped ({msg})", final=True)
            continue
        modes = [m for m in MODES if m in case.modes and (m == "forward" or runner.has_backward)]
        timed: List[Provider] = []
        for prov in providers:
            progress(f"{tag} · {prov.name}: check" + (" (compiling)" if prov.kind == "compile" else ""))
            if prov.checked:
                ok, err, first, note = runner.check(prov, ref)
                row(case, prov.name, "check", "rel_err", err, note=note or prov.note)
                row(case, prov.name, "check", "ok", int(ok), note=note or prov.note)
                row(case, prov.name, "setup", "compile_s" if prov.kind == "compile" else "first_call_s", first)
            else:
                ok = True
            if ok and prov.timed:
                timed.append(prov)
        for mode in modes:
            progress(f"{tag} · {mode}: {', '.join(p.name for p in timed)} interleaved")
            try:
                all_stats = runner.measure([p.fn for p in timed], mode)
            except Exception:  # find which provider fails, and time the others on their own
                all_stats = []
                for prov in timed:
                    try:
                        all_stats.append(runner.measure([prov.fn], mode)[0])
                    except Exception as exc:
                        all_stats.append(exc)
            for prov, st in zip(timed, all_stats):
                try:
                    if isinstance(st, Exception):
                        raise st
                    mem = runner.peak_memory(prov.fn, mode)
                except Exception as exc:
                    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
                    row(case, prov.name, mode, "time_ms", "", note=f"error: {msg}")
                    continue
                row(case, prov.name, mode, "time_ms", st.median * 1e3, st.q20 * 1e3, st.q80 * 1e3)
                row(case, prov.name, mode, "reps", st.n)
                if mem is not None:
                    row(case, prov.name, mode, "peak_mem_mib", mem / 2**20)
                full_bytes = (case.bytes_fwd + case.bytes_bwd
                              if case.bytes_fwd is not None and case.bytes_bwd is not None else None)
                nbytes = {"forward": case.bytes_fwd, "backward": case.bytes_bwd, "full": full_bytes}[mode]
                if nbytes:
                    bw = nbytes / st.median
                    row(case, prov.name, mode, "bandwidth_gbs", bw / 1e9, nbytes / st.q80 / 1e9, nbytes / st.q20 / 1e9)
                    if copy_bw > 0:
                        row(case, prov.name, mode, "bandwidth_pct", 100.0 * bw / copy_bw)
        # speed-ups from the medians
        med = {(r["provider"], r["mode"]): r["value"] for r in rows
               if r["case"] == case.name and r["metric"] == "time_ms" and r["value"] != ""}
        for (pname, mode), t in list(med.items()):
            for base in ("eager", "compile"):
                if (base, mode) in med and t:
                    row(case, pname, mode, f"speedup_vs_{base}", med[(base, mode)] / t)
            floor = case.floor and (FLOOR_PREFIX + case.floor[0], mode)
            if pname == "kdkernels" and floor in med and med[floor]:
                row(case, pname, mode, "x_floor", t / med[floor])
        del runner
        if settings.device == "cuda":
            torch.cuda.empty_cache()
    progress(f"{op}: done", final=True)
    return rows


# --------------------------------------------------------------------------- CSV


def write_csv(path: str, rows: List[Dict[str, Any]], ops_run: Iterable[str]) -> None:
    """Write ``rows``; rows of other ops already in ``path`` (same columns) are kept."""
    ops_run = set(ops_run)
    kept: List[Dict[str, Any]] = []
    if os.path.exists(path):
        try:
            with open(path, newline="") as f:
                rd = csv.DictReader(f)
                if tuple(rd.fieldnames or ()) == CSV_COLUMNS:
                    kept = [r for r in rd if r["op"] not in ops_run]
        except Exception:
            kept = []
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in kept + rows:
            w.writerow({k: _fmt_csv(r.get(k, "")) for k in CSV_COLUMNS})


def _fmt_csv(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        return f"{v:.6g}"
    return v


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- table


def _num(v: Any) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _mib(x: Optional[float]) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "0"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def _ordered(seq: Iterable[str]) -> List[str]:
    out: List[str] = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out


def format_table(rows: Sequence[Dict[str, Any]], op: str, copy_bw_gbs: Optional[float] = None) -> str:
    """A readable table of one op's rows (works from CSV rows as well as fresh ones)."""
    rows = [r for r in rows if r["op"] == op]
    if not rows:
        return f"{op}: no results\n"
    meta = rows[0]
    lines = []
    head = f"== {op} · {meta['device']} ({meta['device_name']}, {meta['threads']} threads)"
    if copy_bw_gbs:
        head += f" · copy bandwidth {copy_bw_gbs:.1f} GB/s"
    lines.append(head + f" · torch {meta['torch']} · commit {meta['commit']} ==")
    get: Dict[Tuple[str, str, str, str], Dict[str, Any]] = {}
    for r in rows:
        get[(r["case"], r["provider"], r["mode"], r["metric"])] = r
    hdr = (f"  {'provider':<18} {'mode':<9} {'median ms':>10} {'q20–q80 ms':>17} {'×eager':>7} {'×compile':>9}"
           f" {'peak MiB':>9} {'GB/s':>7} {'%copy':>6}")
    for case in _ordered(r["case"] for r in rows):
        crow = [r for r in rows if r["case"] == case]
        lines.append("")
        lines.append(f"{case}  [{crow[0]['shape']} {crow[0]['dtype']}]")
        checks = []
        for prov in _ordered(r["provider"] for r in crow if r["mode"] == "check"):
            okr = get.get((case, prov, "check", "ok"))
            err = _num((get.get((case, prov, "check", "rel_err")) or {}).get("value"))
            note = (okr or {}).get("note", "")
            if not prov:
                checks.append(note)
            elif okr and _num(okr["value"]) == 1:
                checks.append(f"{prov} ok ({err:.0e})" if err is not None else f"{prov} ok")
            else:
                checks.append(f"{prov} NOT TIMED: {note}")
        setup = []
        for prov in _ordered(r["provider"] for r in crow if r["mode"] == "setup"):
            r = get.get((case, prov, "setup", "compile_s"))
            if r and _num(r["value"]) is not None:
                setup.append(f"compile (first call) {_num(r['value']):.1f} s")
        notes = [r["note"] for r in crow if r["metric"] == "ok" and r["note"] and _num(r["value"]) == 1]
        lines.append("  check vs float64 reference: " + "; ".join(checks)
                     + ("; " + "; ".join(setup) if setup else "")
                     + ("; " + "; ".join(_ordered(notes)) if notes else ""))
        timed = [(p, m) for p in _ordered(r["provider"] for r in crow) for m in MODES
                 if (case, p, m, "time_ms") in get]
        if not timed:
            continue
        lines.append(hdr)
        for mode in MODES:
            for prov in _ordered(r["provider"] for r in crow):
                t = get.get((case, prov, mode, "time_ms"))
                if t is None:
                    continue
                if _num(t["value"]) is None:
                    lines.append(f"  {prov:<18} {mode:<9} {'error':>10}  {t['note']}")
                    continue

                def val(metric: str) -> Optional[float]:
                    x = get.get((case, prov, mode, metric))
                    return _num(x["value"]) if x else None

                q = f"{_ms(_num(t['q20']))}–{_ms(_num(t['q80']))}"
                se, sc, mem, bw, pct = (val("speedup_vs_eager"), val("speedup_vs_compile"), val("peak_mem_mib"),
                                        val("bandwidth_gbs"), val("bandwidth_pct"))
                lines.append(
                    f"  {prov:<18} {mode:<9} {_ms(_num(t['value'])):>10} {q:>17}"
                    f" {(f'{se:.2f}' if se is not None else '—'):>7} {(f'{sc:.2f}' if sc is not None else '—'):>9}"
                    f" {_mib(mem):>9} {(f'{bw:.1f}' if bw is not None else '—'):>7}"
                    f" {(f'{pct:.0f}%' if pct is not None else '—'):>6}"
                )
        fl = next((p for p in _ordered(r["provider"] for r in crow) if p.startswith(FLOOR_PREFIX)), None)
        for mode in MODES:
            xf = get.get((case, "kdkernels", mode, "x_floor"))
            if xf and fl:
                lines.append(f"  kdkernels {mode} = {_num(xf['value']):.2f}× the {fl}")
    # summary: speed-up of the full step, vs eager / vs compile
    provs = [p for p in _ordered(r["provider"] for r in rows if r["metric"] == "time_ms") if p != "eager"]
    cases = [c for c in _ordered(r["case"] for r in rows) if any((c, p, "full", "time_ms") in get for p in provs)]
    if provs and cases:
        lines.append("")
        lines.append("Summary — full step (forward + backward), speed-up vs eager / vs compile:")
        w = max(len(c) for c in cases) + 2
        lines.append(" " * (w + 2) + "".join(f"{p:>22}" for p in provs))
        for c in cases:
            cells = []
            for p in provs:
                se = get.get((c, p, "full", "speedup_vs_eager"))
                sc = get.get((c, p, "full", "speedup_vs_compile"))
                a = f"{_num(se['value']):.2f}×" if se else "—"
                b = f"{_num(sc['value']):.2f}×" if sc else "—"
                cells.append(f"{a + ' / ' + b:>22}")
            lines.append(f"  {c:<{w}}" + "".join(cells))
    return "\n".join(lines) + "\n"


def markdown_summary(rows: Sequence[Dict[str, Any]], provider: str = "kdkernels") -> str:
    """One markdown table over every op in ``rows`` (CSV rows): the full step
    (forward + backward) of ``provider`` against eager and compile, with peak memory."""
    get: Dict[Tuple[str, str, str, str, str], Dict[str, Any]] = {}
    for r in rows:
        get[(r["op"], r["case"], r["provider"], r["mode"], r["metric"])] = r
    ops = [o for o in _ordered(r["op"] for r in rows) if not o.startswith("_")]
    meta = next((r for r in rows if r["op"] in ops), None)
    if meta is None:
        return "no results\n"
    machine = next((r for r in rows if r["metric"] == "copy_bandwidth_gbs"), None)
    bw = f", copy bandwidth {_num(machine['value']):.1f} GB/s" if machine else ""
    lines = [f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads{bw}), torch {meta['torch']}, "
             f"triton {meta['triton']}, commit {meta['commit']}, {meta['date']}. Full step = forward + backward "
             f"(forward only for ops without a backward: FSKD statistics and solve); "
             f"median of the timed repetitions; memory = peak of the step's own allocations.",
             "",
             "| op | case | shape | eager ms | compile ms | kdkernels ms | × eager | × compile | peak MiB eager → kdkernels |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    floors: List[str] = []
    for op in ops:
        for case in _ordered(r["case"] for r in rows if r["op"] == op):
            # ops without a backward (FSKD statistics, solve) are timed forward only
            mode = "full" if (op, case, provider, "full", "time_ms") in get else "forward"

            def v(prov, metric):
                r = get.get((op, case, prov, mode, metric))
                return _num(r["value"]) if r else None
            t = v(provider, "time_ms")
            if t is None:
                continue
            shape = next(r["shape"] for r in rows if r["op"] == op and r["case"] == case)
            se, sc = v(provider, "speedup_vs_eager"), v(provider, "speedup_vs_compile")
            me, mk = v("eager", "peak_mem_mib"), v(provider, "peak_mem_mib")
            lines.append(f"| {op} | {case} | {shape} | {_ms(v('eager', 'time_ms'))} | {_ms(v('compile', 'time_ms'))}"
                         f" | {_ms(t)} | {f'{se:.2f}' if se is not None else '—'}"
                         f" | {f'{sc:.2f}' if sc is not None else '—'} | {_mib(me)} → {_mib(mk)} |")
            xf = v(provider, "x_floor")
            fl = next((r["provider"] for r in rows if r["op"] == op and r["case"] == case
                       and r["provider"].startswith(FLOOR_PREFIX) and r["metric"] == "time_ms"), None)
            if xf is not None and fl is not None:
                floors.append(f"- {op} {case}: {provider} {_ms(t)} ms = {xf:.2f}× the {fl[len(FLOOR_PREFIX):]} "
                              f"of the same size ({_ms(v(fl, 'time_ms'))} ms)")
    if floors:
        lines += ["", "Against a floor the issue names:"] + floors
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- chart


def plot_op(csv_path: str, op: str, png_path: str) -> Optional[str]:
    """Speed-up vs eager per case, one bar per provider, one panel per mode, from the CSV alone.

    Returns a note when matplotlib is missing or there is nothing to plot, else None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no chart for {op}: matplotlib is not importable ({type(exc).__name__})"
    rows = [r for r in read_csv(csv_path) if r["op"] == op and r["metric"] == "time_ms" and _num(r["value"])]
    if not rows:
        return f"no chart for {op}: no timings"
    t = {(r["case"], r["provider"], r["mode"]): float(r["value"]) for r in rows}
    cases = _ordered(r["case"] for r in rows)
    provs = [p for p in _ordered(r["provider"] for r in rows) if p != "eager"]
    modes = [m for m in MODES if any(k[2] == m for k in t)]
    if not provs or not any((c, "eager", m) in t for c in cases for m in modes):
        return f"no chart for {op}: no eager baseline"
    meta = rows[0]
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(7.0, 1.3 * len(cases) * max(1, len(provs)) / 2 + 3),
                                                      3.2 * len(modes)), squeeze=False)
    width = 0.8 / len(provs)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    for ax, mode in zip(axes[:, 0], modes):
        ymin = ymax = 1.0
        ax.set_yscale("log")
        for j, p in enumerate(provs):
            xs, ys = [], []
            for i, c in enumerate(cases):
                if (c, "eager", mode) in t and (c, p, mode) in t:
                    xs.append(i + (j - (len(provs) - 1) / 2) * width)
                    ys.append(t[(c, "eager", mode)] / t[(c, p, mode)])
            if not xs:
                continue
            # bars start at 1×: up for a speed-up, down for a slow-down
            bars = ax.bar(xs, [y - 1.0 for y in ys], bottom=1.0, width=width * 0.9, label=p,
                          color=colors[j % len(colors)])
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.2g}×", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom" if y >= 1 else "top", fontsize=7)
            ymax, ymin = max(ymax, max(ys)), min(ymin, min(ys))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(ymin / 1.8, ymax * 1.8)
        ax.set_xlim(-0.6, len(cases) - 0.4)
        ax.set_ylabel(f"{mode}\nspeed-up vs eager")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=15, ha="right", fontsize=8)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no "6×10^0" labels between decades
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.suptitle(f"{op} — {meta['device_name']} ({meta['device']}, {meta['threads']} threads) · "
                 f"torch {meta['torch']} · {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return None
