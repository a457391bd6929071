"""Test set-up: CPU tensors run the Triton kernels through the interpreter.

TRITON_INTERPRET must be set before anything imports triton, so it is set
here, at collection time. ``KDKERNELS_TEST_DEVICE=cuda`` (used by
gpu_check.sh) runs the suite on CUDA tensors with compiled Triton instead.
"""
import os

DEVICE = os.environ.get("KDKERNELS_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("KDKERNELS_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`-n auto`, the README's command) each worker gets its share
# of the cores: the suite is mostly single-threaded interpreter work, and one
# OpenMP pool per core per worker only oversubscribes the machine. Tests that
# need several threads set them explicitly.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_report_header(config):
    return f"kdkernels test device: {DEVICE} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"


@pytest.fixture
def device():
    return torch.device(DEVICE)
