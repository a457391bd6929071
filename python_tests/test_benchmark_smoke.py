"""Smoke test of the benchmark harness: the quick CPU run of HCL writes its CSV and chart.

No timing assertions: only that every provider and mode produced rows, that the
correctness guard passed, and that the files appear.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

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
        cwd=ROOT, capture_output=True, text=True, timeout=300,
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


def test_floor_provider_is_timed_and_reported():
    """A case's floor is timed (not checked), and kdkernels' time is reported as a multiple of it."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import harness
    finally:
        sys.path.pop(0)

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
    assert "kdkernels forward = " in harness.format_table(rows, "toy")
    assert "toy tiny: kdkernels" in harness.markdown_summary(rows)
