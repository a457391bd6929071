"""Smoke test of the benchmark harness: the quick CPU run of HCL writes its CSV and chart.

No timing assertions: only that every provider and mode produced rows, that the
correctness guard passed, and that the files appear; that a run killed half-way
keeps the cases it finished; that failures are rows and a non-zero exit, never
gaps; and that the GPU quick mode has real cases for every op.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")
COLUMNS = ["op", "case", "shape", "dtype", "provider", "mode", "metric", "value", "q20", "q80",
           "note", "device", "device_name", "threads", "torch", "triton", "kdkernels", "commit", "date"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, RUN, "--quick", "--ops", "hcl", "--device", "cpu", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,  # ~15 s warm; minutes cold on a loaded 2-core VM
    )
    return proc, out


def test_quick_run_succeeds(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "hcl" in proc.stdout and "Summary" in proc.stdout


def test_csv_has_every_provider_and_mode(quick_run):
    _, out = quick_run
    path = out / "results.csv"
    assert path.exists()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    hcl = [r for r in rows if r["op"] == "hcl"]
    assert hcl and all(r["device"] == "cpu" for r in hcl)
    for provider in ("eager", "compile", "kdkernels"):
        ok = [r for r in hcl if r["provider"] == provider and r["metric"] == "ok"]
        assert ok and all(r["value"] == "1" for r in ok), (provider, ok)
        for mode in ("forward", "backward", "full"):
            times = [r for r in hcl if (r["provider"], r["mode"], r["metric"]) == (provider, mode, "time_ms")]
            assert times, (provider, mode)
            for r in times:
                assert float(r["value"]) > 0 and float(r["q20"]) <= float(r["value"]) <= float(r["q80"])
            assert any(r["provider"] == provider and r["mode"] == mode and r["metric"] == "peak_mem_mib"
                       for r in hcl), (provider, mode)
    assert any(r["metric"] == "speedup_vs_eager" for r in hcl)
    assert any(r["metric"] == "speedup_vs_compile" for r in hcl)
    assert any(r["provider"] == "compile" and r["metric"] == "compile_s" for r in hcl)
    assert any(r["op"] == "_machine" and r["metric"] == "copy_bandwidth_gbs" and float(r["value"]) > 0 for r in rows)


def test_chart_and_table_written(quick_run):
    _, out = quick_run
    pytest.importorskip("matplotlib")
    png = out / "hcl.png"
    assert png.exists() and png.stat().st_size > 1000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "hcl.txt").exists()


def test_markdown_summary_lists_every_case(quick_run):
    _, out = quick_run
    text = (out / "summary.md").read_text()
    with open(out / "results.csv", newline="") as f:
        cases = {r["case"] for r in csv.DictReader(f) if r["op"] == "hcl" and r["metric"] == "time_ms"}
    assert cases
    for case in cases:
        assert f"| hcl | {case} |" in text, (case, text)


def _bench_modules():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import cases
        import harness
        import report
    finally:
        sys.path.pop(0)
    return cases, harness, report


def test_floor_provider_is_timed_and_reported():
    """A case's floor is timed (not checked), and kdkernels' time is reported as a multiple of it."""
    import torch

    _, harness, report = _bench_modules()

    def make_inputs():
        return (torch.randn(64, 64),)

    case = harness.Case(name="tiny", shape="64×64", make_inputs=make_inputs, reference=lambda x: x @ x,
                        kdkernels=lambda x, backend=None: torch.mm(x, x), modes=("forward",),
                        floor=("one GEMM", lambda x: torch.zeros(3)))  # computes something else: not checked
    meta = harness.machine_info("cpu")
    rows = harness.run_op("toy", [case], harness.Settings(device="cpu", quick=True, providers=None), meta, 0.0,
                          harness.Progress(enabled=False))
    floor = "floor: one GEMM"
    assert not any(r["provider"] == floor and r["mode"] == "check" for r in rows)
    times = {r["provider"]: r["value"] for r in rows if r["metric"] == "time_ms"}
    assert set(times) == {"eager", "compile", "kdkernels", floor}
    ratio = [r["value"] for r in rows if r["metric"] == "x_floor"]
    assert len(ratio) == 1 and abs(ratio[0] - times["kdkernels"] / times[floor]) < 1e-12
    assert "kdkernels forward = " in report.format_table(rows, "toy")
    assert "toy tiny: kdkernels" in report.markdown_summary(rows)
    assert harness.failures(rows) == []


def test_failures_are_rows_not_gaps():
    """A case that cannot be set up and a provider that raises each leave a row that says why."""
    import torch

    _, harness, _ = _bench_modules()

    def broken_inputs():
        raise RuntimeError("no inputs today")

    def broken_op(x, backend=None):
        raise ValueError("kernel exploded")

    bad_case = harness.Case(name="bad", shape="-", make_inputs=broken_inputs, reference=lambda x: x,
                            kdkernels=lambda x, backend=None: x, modes=("forward",))
    bad_op = harness.Case(name="bad op", shape="8", make_inputs=lambda: (torch.randn(8),),
                          reference=lambda x: x * 2, kdkernels=broken_op, modes=("forward",))
    rows = harness.run_op("toy", [bad_case, bad_op], harness.Settings(device="cpu", quick=True),
                          harness.machine_info("cpu"), 0.0, harness.Progress(enabled=False))
    bad = harness.failures(rows)
    assert len(bad) == 2, bad
    assert "toy / bad / (case): error: case could not be set up: RuntimeError: no inputs today" in bad
    assert any("bad op / kdkernels" in b and "ValueError: kernel exploded" in b for b in bad), bad
    # the providers that work are still timed
    assert {r["provider"] for r in rows if r["case"] == "bad op" and r["metric"] == "time_ms"} == {"eager", "compile"}


def test_unknown_op_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, RUN, "--quick", "--ops", "no_such_op", "--device", "cpu",
                           "--out", str(tmp_path), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no_such_op: no benchmark cases" in proc.stdout


def test_csv_keeps_other_ops_and_appends(tmp_path):
    _, _, report = _bench_modules()
    path = str(tmp_path / "results.csv")
    old = [dict(op=op, case="c", metric="time_ms", value=1.0) for op in ("kept", "rerun")]
    report.write_csv(path, old, ["kept", "rerun"])
    sink = report.CsvSink(path, ["rerun"])
    assert [r["op"] for r in report.read_csv(path)] == ["kept"]
    sink.append([dict(op="rerun", case="c1", metric="time_ms", value=2.0)])
    sink.append([dict(op="rerun", case="c2", metric="time_ms", value=3.0)])
    assert [(r["op"], r["case"], r["value"]) for r in report.read_csv(path)] == [
        ("kept", "c", "1"), ("rerun", "c1", "2"), ("rerun", "c2", "3")]


def test_killed_run_keeps_the_cases_it_finished(tmp_path):
    """Rows are appended case by case: SIGKILL right after the first case's rows appear in the
    CSV, and they are all there, complete, with nothing half-written."""
    csv_path = tmp_path / "results.csv"
    proc = subprocess.Popen(
        [sys.executable, RUN, "--quick", "--ops", "kd,hcl", "--providers", "eager,kdkernels", "--device", "cpu",
         "--out", str(tmp_path), "--no-progress"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if csv_path.exists() and any(r["op"] == "kd" for r in report_rows(csv_path)):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed half-way"
    with open(csv_path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == COLUMNS and all(len(line) == len(COLUMNS) for line in lines)
    rows = report_rows(csv_path)
    assert any(r["op"] == "_machine" and r["metric"] == "copy_bandwidth_gbs" for r in rows)
    first = [r for r in rows if r["op"] == "kd" and r["case"] == "CIFAR-100 b8"]
    for provider in ("eager", "kdkernels"):
        for mode in ("forward", "backward", "full"):
            assert any((r["provider"], r["mode"], r["metric"]) == (provider, mode, "time_ms") for r in first)
    assert not any(r["op"] == "hcl" for r in rows), "hcl ran before the kill: the run was not stopped half-way"


def report_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_gpu_quick_mode_has_real_cases_for_every_op():
    """``--quick --device cuda``: every op, one to three cases each, real configurations (no 'tiny'),
    distinct names. Built without a GPU: cases make their tensors only when measured."""
    cases, _, _ = _bench_modules()
    ops = cases.available_ops()
    assert {"hcl", "abf", "reviewkd", "hint", "kd", "fskd"} <= set(ops)
    for op in ops:
        quick = cases.load(op).cases("cuda", True)
        names = [c.name for c in quick]
        assert 1 <= len(quick) <= 3, (op, names)
        assert len(set(names)) == len(names), (op, names)
        assert not any("tiny" in n for n in names), (op, names)
        full = {c.name for c in cases.load(op).cases("cuda", False)}
        assert len(full) == len(cases.load(op).cases("cuda", False)), (op, "case names must be distinct")
