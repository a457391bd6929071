"""Reporting: the long CSV, the tables, the markdown summary and the charts.

Everything here reads rows (dicts with :data:`CSV_COLUMNS`), fresh or read back
from the CSV, and measures nothing. The CSV is written case by case as the
benchmark goes (:class:`CsvSink`), so a run that is stopped keeps every case it
finished.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from measure import CPU_MEMORY_NOTE, MODES

CSV_COLUMNS = (
    "op", "case", "shape", "dtype", "provider", "mode", "metric", "value", "q20", "q80",
    "note", "device", "device_name", "threads", "torch", "triton", "kdkernels", "commit", "date",
)
FLOOR_PREFIX = "floor: "


# --------------------------------------------------------------------------- CSV


class CsvSink:
    """The long CSV, written as the benchmark goes.

    Opening it rewrites ``path`` with its header and the rows of the ops *not*
    in ``ops_run`` that were already there (a partial run keeps the others'
    results); :meth:`append` then adds rows and closes the file each time, so
    a run killed half-way leaves every row appended before the kill. A file
    with other columns, or none, is started afresh (``replaced`` says why).
    """

    def __init__(self, path: str, ops_run: Iterable[str]):
        self.path = path
        self.replaced = ""
        ops_run = set(ops_run)
        kept: List[Dict[str, Any]] = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                rd = csv.DictReader(f)
                if tuple(rd.fieldnames or ()) == CSV_COLUMNS:
                    kept = [r for r in rd if r["op"] not in ops_run]
                else:
                    self.replaced = f"{path} had other columns ({rd.fieldnames}); started afresh"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for r in kept:
                w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})

    def append(self, rows: Sequence[Dict[str, Any]]) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            for r in rows:
                w.writerow({k: _fmt_csv(r.get(k, "")) for k in CSV_COLUMNS})
            f.flush()
            os.fsync(f.fileno())


def write_csv(path: str, rows: List[Dict[str, Any]], ops_run: Iterable[str]) -> None:
    """Write ``rows`` at once; rows of other ops already in ``path`` (same columns) are kept."""
    CsvSink(path, ops_run).append(rows)


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
    if meta["device"] == "cpu":
        lines.append(f"(peak MiB: {CPU_MEMORY_NOTE})")
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
             f"median of the timed repetitions; memory = peak of the step's own allocations"
             + (f" ({CPU_MEMORY_NOTE})." if meta["device"] == "cpu" else "."),
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
        lines += ["", "Against a floor (a lower bound of the same size, timed the same way):"] + floors
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- chart


def plot_op(csv_path: str, op: str, png_path: str) -> Optional[str]:
    """Speed-up vs eager per case, one bar per provider, one panel per mode, from the CSV alone.

    Returns a note when matplotlib is missing or there is nothing to plot, else None.
    """
    try:
        import matplotlib
    except ImportError as exc:
        return f"no chart for {op}: matplotlib is not installed ({exc})"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
