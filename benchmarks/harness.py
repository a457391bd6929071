"""The benchmark harness: what a case is, which providers run it, and one op's run.

It knows nothing about any op. An op is a module ``benchmarks/cases/<op>.py``
with one function::

    def cases(device: str, quick: bool) -> list[Case]

Each :class:`Case` says what to run (a configuration label and shape, a function
making fresh inputs, the plain-PyTorch reference, the package's op, the minimum
bytes it must move); the rest is done by three modules, each readable alone:

- ``machine.py``: the device's name, cache size, copy bandwidth, versions;
- ``measure.py``: the correctness guard, the interleaved timings and the peak
  memory of one case (how: see its docstring);
- ``report.py``: the long CSV (one value per row, appended case by case), the
  tables, the markdown summary and the charts, drawn from rows alone.

Providers: ``eager`` (the reference as it is), ``compile`` (``torch.compile``
of the reference; the first call, which compiles, is reported as ``compile_s``
and kept out of the timings), ``kdkernels`` (the package's op, default backend)
and, with ``--backends all``, ``kdkernels[<name>]`` for every backend available
on the device; a case may add a floor (a lower bound of the same size, timed but
not checked). Achieved bandwidth = the case's minimum bytes / time, also as a %
of the machine's copy bandwidth.

Failures are rows, never gaps: a case that cannot be set up, a provider that
errors or disagrees with the oracle, a measurement that raises, each writes a
row whose note starts with ``error:`` or ``mismatch:``; :func:`failures` lists
them, and ``run.py`` exits non-zero when there are any.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from machine import machine_info  # noqa: F401  (re-exported for callers of the harness)
from measure import MODES, CaseRunner, Settings, tensor_bytes  # noqa: F401
from report import FLOOR_PREFIX

#: how a row's note starts when something did not run or did not agree with the oracle
FAILURE_PREFIXES = ("error", "mismatch")


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
        kdkernels: the package's op, ``kdkernels(*args, backend=None | name)``.
        backend_op: the op's name in ``kdkernels.backends`` (for
            ``--backends all``); ``None`` when it has no backends.
        bytes_fwd, bytes_bwd: minimum bytes the forward / backward must move
            (``None``: not memory-bound, no bandwidth reported).
        dtype: label of the inputs' dtype.
        modes: modes to run; drop ``backward``/``full`` for ops without gradients.
        tol: relative error the guard accepts (default by ``dtype``).
        note: shown in the table under the case.
        floor: optional ``(label, fn)``: a lower bound of the same size that
            kdkernels is measured against (e.g. one fp32 GEMM of the same size), timed like the
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


def shape_label(shape: Sequence[int]) -> str:
    """(64, 128, 16, 16) -> '64×128×16²' (a square tail is written as a power)."""
    dims = list(shape)
    if len(dims) >= 2 and dims[-1] == dims[-2]:
        return "×".join(str(d) for d in dims[:-2]) + ("×" if len(dims) > 2 else "") + f"{dims[-1]}²"
    return "×".join(str(d) for d in dims)


DTYPE_LABEL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_suffix(dtype: torch.dtype) -> str:
    """Case names must differ between dtypes of one configuration: ' bf16' etc., '' for fp32."""
    return "" if dtype == torch.float32 else f" {DTYPE_LABEL[dtype]}"


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
    """(available backends, default backend) for ``op`` on ``device``; ([], '') without ``op``."""
    if op is None:
        return [], ""
    from kdkernels import backends as kb

    with warnings.catch_warnings():  # the one "_C unavailable" warning is the op's to give
        warnings.simplefilter("ignore")
        return list(kb.available_backends(op, device)), kb.choose_backend(op, torch.device(device))


def build_providers(case: Case, settings: Settings) -> Tuple[List[Provider], List[str]]:
    """The providers for ``case``, and notes on the ones that are missing."""
    provs = [Provider("eager", case.reference, "eager"), Provider("compile", _compiled(case.reference), "compile")]
    notes = []
    if case.kdkernels is None:
        notes.append(f"kdkernels: the case names no op ({case.note or 'no reason given'})")
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


def _error(exc: BaseException, limit: int = 200) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:limit]


def run_op(op: str, cases: Sequence[Case], settings: Settings, meta: Dict[str, str],
           copy_bw: float, progress: Progress,
           sink: Optional[Callable[[List[Dict[str, Any]]], None]] = None) -> List[Dict[str, Any]]:
    """Guard, time and measure every case of ``op``; returns CSV rows.

    ``sink`` receives each case's rows as soon as that case is measured (the
    CSV appends them), so a run stopped half-way keeps the cases it finished.
    """
    rows: List[Dict[str, Any]] = []
    for ci, case in enumerate(cases):
        case_rows = _run_case(op, case, f"{op} {ci + 1}/{len(cases)} {case.name}", settings, meta, copy_bw,
                              progress)
        rows += case_rows
        if sink is not None:
            sink(case_rows)
        if settings.device == "cuda":
            torch.cuda.empty_cache()
    progress(f"{op}: done", final=True)
    return rows


def _run_case(op: str, case: Case, tag: str, settings: Settings, meta: Dict[str, str], copy_bw: float,
              progress: Progress) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []

    def row(provider: str, mode: str, metric: str, value: Any, q20: Any = "", q80: Any = "", note: str = ""):
        rows.append(dict(op=op, case=case.name, shape=case.shape, dtype=case.dtype, provider=provider,
                         mode=mode, metric=metric, value=value, q20=q20, q80=q80, note=note, **meta))

    progress(f"{tag}: inputs")
    runner = CaseRunner(case, settings)
    try:
        runner.make_copies()
        providers, notes = build_providers(case, settings)
        progress(f"{tag}: float64 oracle")
        ref = runner.oracle()
    except Exception as exc:  # reported as a failed case (a row), and run.py exits non-zero
        row("", "check", "ok", 0, note=f"error: case could not be set up: {_error(exc)}")
        progress(f"{tag}: could not be set up ({_error(exc)})", final=True)
        return rows
    for n in notes:
        row("kdkernels", "check", "ok", 0, note=f"error: {n}")
    modes = [m for m in MODES if m in case.modes and (m == "forward" or runner.has_backward)]
    timed: List[Provider] = []
    for prov in providers:
        progress(f"{tag} · {prov.name}: check" + (" (compiling)" if prov.kind == "compile" else ""))
        ok = True
        if prov.checked:
            ok, err, first, note = runner.check(prov.fn, ref)
            row(prov.name, "check", "rel_err", err, note=note or prov.note)
            row(prov.name, "check", "ok", int(ok), note=note or prov.note)
            row(prov.name, "setup", "compile_s" if prov.kind == "compile" else "first_call_s", first)
        if ok and prov.timed:
            timed.append(prov)
    mem_note = "torch allocations only" if settings.device == "cpu" else ""
    for mode in modes:
        progress(f"{tag} · {mode}: {', '.join(p.name for p in timed)} interleaved")
        try:
            all_stats: List[Any] = runner.measure([p.fn for p in timed], mode)
        except Exception:  # find which provider fails (its row says why); time the others on their own
            all_stats = []
            for prov in timed:
                try:
                    all_stats.append(runner.measure([prov.fn], mode)[0])
                except Exception as exc:
                    all_stats.append(exc)
        for prov, st in zip(timed, all_stats):
            if isinstance(st, Exception):
                row(prov.name, mode, "time_ms", "", note=f"error: {_error(st, 160)}")
                continue
            row(prov.name, mode, "time_ms", st.median * 1e3, st.q20 * 1e3, st.q80 * 1e3)
            row(prov.name, mode, "reps", st.n)
            try:
                mem = runner.peak_memory(prov.fn, mode)
            except Exception as exc:
                row(prov.name, mode, "peak_mem_mib", "", note=f"error: {_error(exc, 160)}")
            else:
                row(prov.name, mode, "peak_mem_mib", mem / 2**20, note=mem_note)
            full_bytes = (case.bytes_fwd + case.bytes_bwd
                          if case.bytes_fwd is not None and case.bytes_bwd is not None else None)
            nbytes = {"forward": case.bytes_fwd, "backward": case.bytes_bwd, "full": full_bytes}[mode]
            if nbytes:
                bw = nbytes / st.median
                row(prov.name, mode, "bandwidth_gbs", bw / 1e9, nbytes / st.q80 / 1e9, nbytes / st.q20 / 1e9)
                if copy_bw > 0:
                    row(prov.name, mode, "bandwidth_pct", 100.0 * bw / copy_bw)
    # speed-ups from the medians
    med = {(r["provider"], r["mode"]): r["value"] for r in rows if r["metric"] == "time_ms" and r["value"] != ""}
    for (pname, mode), t in list(med.items()):
        for base in ("eager", "compile"):
            if (base, mode) in med and t:
                row(pname, mode, f"speedup_vs_{base}", med[(base, mode)] / t)
        floor = case.floor and (FLOOR_PREFIX + case.floor[0], mode)
        if pname == "kdkernels" and floor in med and med[floor]:
            row(pname, mode, "x_floor", t / med[floor])
    return rows


def failures(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """'op / case / provider [mode]: note' for every row that reports a failure."""
    return [f"{r['op']} / {r['case']} / {r['provider'] or '(case)'}"
            + (f" [{r['mode']}]" if r["mode"] not in ("check", "") else "") + f": {r['note']}"
            for r in rows if r["metric"] != "rel_err" and str(r.get("note", "")).startswith(FAILURE_PREFIXES)]
