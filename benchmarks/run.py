#!/usr/bin/env python
"""Speed and memory of every kdkernels op against the PyTorch reference and torch.compile.

    python benchmarks/run.py                    # every op, CPU (or CUDA when present), 2-5 min on 2 CPU cores
    python benchmarks/run.py --quick --ops hcl  # tiny shapes, seconds (CI smoke run)
    python benchmarks/run.py --device cuda --backends all

Prints a table per op, writes ``results.csv`` (long format, one value per row)
and ``<op>.png`` (speed-up vs eager) to ``benchmarks/results/<device-tag>/``
(``--out`` overrides). Rows of ops not run this time are kept in the CSV; the
rows of each case are appended as soon as it is measured, so a run stopped by a
time limit keeps the cases it finished. ``--quick --device cuda`` is a GPU
quick mode: every op at one or two real but small configurations.
Exit status 1 when an op could not run, a case could not be set up, a provider
failed its correctness check or a measurement raised (what ran is still
written, and the reasons are printed).
How it measures: ``benchmarks/measure.py``; what a case is: ``benchmarks/harness.py``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
# Prefer an installed kdkernels (it carries the compiled library); else this checkout.
if importlib.util.find_spec("kdkernels") is None:
    sys.path.append(REPO_ROOT)

import torch  # noqa: E402

import cases as case_modules  # noqa: E402
import harness  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--ops", default=None,
                   help=f"comma-separated ops (default: all present: {','.join(case_modules.available_ops())})")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions: seconds, 1-2 min on CPU while torch.compile fills its cache")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<device-tag>/)")
    p.add_argument("--backends", choices=("default", "all"), default="default",
                   help="'all' also times every available kdkernels backend on its own")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per measurement (default: adaptive, by time)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset, e.g. eager,kdkernels (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    present = case_modules.available_ops()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else present
    settings = harness.Settings(
        device=device, quick=args.quick, reps=args.reps, backends=args.backends,
        providers=[p.strip() for p in args.providers.split(",")] if args.providers else None,
    )
    out_dir = args.out or os.path.join(HERE, "results", machine.device_tag(device))
    progress = harness.Progress(enabled=not args.no_progress)

    import kdkernels  # a kdkernels that does not import is not benchmarked: the traceback says why

    meta = machine.machine_info(device)
    kd_where = os.path.dirname(os.path.abspath(kdkernels.__file__ or "."))
    print(f"kdkernels benchmark · {device}: {meta['device_name']} · {meta['threads']} threads · "
          f"torch {meta['torch']} · triton {meta['triton']} · kdkernels {meta['kdkernels']} ({kd_where}) · "
          f"commit {meta['commit']} · {meta['date']}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} CPUs before starting: other processes "
              f"compete for the cores, so CPU timings will be noisy")
    progress("measuring copy bandwidth")
    copy_bw = machine.copy_bandwidth(device, quick=args.quick)
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s (bytes read + written per second of a large tensor copy)")

    rows = [dict(op="_machine", case="", shape="", dtype="", provider="", mode="", metric="copy_bandwidth_gbs",
                 value=copy_bw / 1e9, q20="", q80="", note="", **meta),
            dict(op="_machine", case="", shape="", dtype="", provider="", mode="", metric="load_avg_1min",
                 value=load, q20="", q80="", note="load average when the run started", **meta)]
    csv_path = os.path.join(out_dir, "results.csv")
    sink = report.CsvSink(csv_path, [o for o in ops if o in present] + ["_machine"])
    if sink.replaced:
        print(f"note: {sink.replaced}")
    sink.append(rows)
    failed_ops, ran_ops = [], []
    for op in ops:
        if op not in present:
            print(f"\n{op}: no benchmark cases (benchmarks/cases/{op}.py is missing)")
            failed_ops.append(op)
            continue
        try:
            op_cases = case_modules.load(op).cases(device, args.quick)
        except Exception:  # a broken case module must not take the other ops down: say why, go on
            print(f"\n{op}: its cases could not be set up:\n{traceback.format_exc()}")
            failed_ops.append(op)
            continue
        if not op_cases:
            print(f"\n{op}: no cases for {device}{' (quick)' if args.quick else ''}")
            failed_ops.append(op)
            continue
        op_rows = harness.run_op(op, op_cases, settings, meta, copy_bw, progress, sink=sink.append)
        rows.extend(op_rows)
        ran_ops.append(op)
    progress.done()

    for op in ran_ops:
        table = report.format_table(rows, op, copy_bw / 1e9)
        print("\n" + table, end="")
        with open(os.path.join(out_dir, f"{op}.txt"), "w") as f:
            f.write(table)
        note = report.plot_op(csv_path, op, os.path.join(out_dir, f"{op}.png"))
        if note:
            print(note)

    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(report.markdown_summary(report.read_csv(csv_path)))
    print(f"\nwrote {csv_path}, summary.md and the tables/charts beside it · total {time.perf_counter() - t_start:.1f} s")
    if failed_ops:
        print(f"ops that did not run: {', '.join(failed_ops)}")
    bad = harness.failures(rows)
    if bad:
        print("failures (not timed, or not measured):\n  " + "\n  ".join(bad))
    return 1 if (bad or failed_ops) else 0


if __name__ == "__main__":
    sys.exit(main())
