"""``python -m kdkernels info`` and ``smoke``: what a user runs after installing a wheel."""
from __future__ import annotations

import subprocess
import sys

from kdkernels import _native


def _run(*args):
    return subprocess.run([sys.executable, "-m", "kdkernels", *args], capture_output=True, text=True, timeout=300)


def test_info_names_every_op_and_backend():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    for op in ("hcl_loss", "abf_fuse", "hint_loss", "kd_loss", "linear_kd_loss"):
        assert op in out.stdout, f"{op} missing from `python -m kdkernels info`:\n{out.stdout}"
    assert "_C" in out.stdout


def test_smoke_checks_every_op_against_the_reference():
    out = _run("smoke")
    if _native.native() is None:
        assert out.returncode == 1 and "did not load" in out.stdout
        return
    assert out.returncode == 0, out.stdout + out.stderr
    for op in ("hcl_loss", "abf_fuse", "hint_loss", "kd_loss", "linear_kd_loss"):
        assert f"ok   {op}" in out.stdout, out.stdout
