"""benchmarks/roofline.py: the floors are the stated formulas at the benchmark shapes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import roofline  # noqa: E402


def test_hcl_bytes_by_hand():
    # resnet32x4 -> resnet8x4, batch 64, fp32: 64 * (64*32*32 + 128*16*16 + 256*8*8 + 256) elements
    elems = 64 * (64 * 1024 + 128 * 256 + 256 * 64 + 256)
    (row,) = [r for r in roofline.rows(["hcl"]) if r.case == "resnet32x4→resnet8x4 b64 fp32"]
    assert row.bytes_fwd == 2 * 4 * elems and row.bytes_bwd == 3 * 4 * elems
    assert row.fwd == (pytest.approx(2 * 4 * elems / roofline.HBM), "memory")


def test_hint_is_compute_bound_in_fp32_and_not_in_tf32():
    rows = {r.case: r for r in roofline.rows(["hint"])}
    ieee = rows["resnet8x4 layer3 b64 256→256 8² fp32 ieee"]
    tf32 = rows["resnet8x4 layer3 b64 256→256 8² fp32 tf32"]
    q = 64 * 8 * 8
    assert ieee.flops_fwd == 6 * q * 256 * 256
    assert ieee.fwd[1] == "fp32" and ieee.fwd[0] == pytest.approx(ieee.flops_fwd / roofline.FP32)
    assert tf32.fwd[0] < ieee.fwd[0]


def test_every_op_has_rows_and_the_script_prints_them():
    ops = {r.op for r in roofline.rows()}
    assert ops == {"hcl", "abf", "kd", "hint"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "roofline.py")],
                         capture_output=True, text=True, check=True).stdout
    assert "| hcl |" in out and "| abf |" in out and "µs" in out
