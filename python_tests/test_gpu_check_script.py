"""python_tests/gpu_check.sh as far as a machine without a GPU can run it.

The script is meant for a short slot on a GPU machine, where a mistake costs
the slot: these tests check its argument handling, that a missing tool is
named before anything runs, that a step cut by its time limit still leaves its
junit file (pytest writes it on SIGINT, the signal the script sends first), and
that a spent budget skips the remaining steps with a message instead of running
them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "python_tests", "gpu_check.sh")


def _run(args, env_extra, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(env_extra)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def test_no_output_folder_is_a_usage_error():
    proc = _run([], {})
    assert proc.returncode != 0
    assert "usage: gpu_check.sh OUT_DIR" in proc.stderr


def test_missing_tools_are_named_before_anything_runs(tmp_path):
    # a "python" that has nothing (every import fails) and no nvcc anywhere
    fake_py = tmp_path / "python"
    fake_py.write_text("#!/bin/sh\nexit 1\n")
    fake_py.chmod(0o755)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    proc = _run([str(out)], {"PYTHON": str(fake_py), "PATH": f"{empty}:/usr/bin:/bin",
                             "CUDA_HOME": str(tmp_path / "no-cuda")})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    missing = (out / "missing.txt").read_text()
    for tool in ("pytest", "torch and triton", "pybind11", "setuptools >= 77", "nvcc"):
        assert tool in missing, f"{tool} not named in:\n{missing}"
    # nothing ran: no build log, no test logs
    assert sorted(p.name for p in out.iterdir()) == ["missing.txt"]


def test_a_pytest_step_cut_by_sigint_keeps_its_junit(tmp_path):
    """The script's `limit` sends SIGINT first (timeout -s INT -k GRACE): pytest then
    stops, writes its summary and its junit file with the tests it finished."""
    test_file = tmp_path / "test_slow.py"
    test_file.write_text(textwrap.dedent("""
        import time

        def test_fast_one():
            pass

        def test_fast_two():
            pass

        def test_slow():
            time.sleep(60)
    """))
    junit = tmp_path / "junit.xml"
    t0 = time.monotonic()
    proc = subprocess.run(["timeout", "-s", "INT", "-k", "15", "8", sys.executable, "-m", "pytest", str(test_file),
                           "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"],
                          capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert time.monotonic() - t0 < 40, "pytest did not stop on SIGINT before the kill"
    assert proc.returncode != 0
    assert junit.exists(), proc.stdout + proc.stderr
    suite = ET.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    names = {case.get("name") for case in suite.iter("testcase")}
    assert {"test_fast_one", "test_fast_two"} <= names, names


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    """With the budget spent before the tests (a 1-second budget), every later step is
    skipped and says so, and the script fails instead of claiming success."""
    out = tmp_path / "out"
    proc = _run([str(out)], {"PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_SKIP_BUILD": "1",
                             "GPU_CHECK_BUDGET_S": "1", "GPU_CHECK_TESTS": "test_roofline.py"}, timeout=300)
    text = proc.stdout + proc.stderr
    # GPU_CHECK_SKIP_BUILD=1: the build tools (pybind11, setuptools, nvcc) are not required
    assert "gpu_check: missing:" not in text, text
    assert proc.returncode != 0, text
    assert "budget spent, skipped" in text, text
    assert "gpu_check status: 1" in text, text
