#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU (DESIGN.md "Tests", tier 3):
# builds kdkernels with its CUDA kernels, runs the whole test suite on CUDA
# tensors (compiled Triton, the CUDA kernels and the reference), then the
# benchmark with --device cuda. Everything goes into the folder given:
#   bash python_tests/gpu_check.sh OUT_DIR
# The machine needs torch, triton, pybind11, setuptools, pytest and nvcc; it
# needs no network (the build uses --no-build-isolation --no-deps).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
status=0

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi || true
  nvcc --version || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== build"
KDKERNELS_CUDA=1 pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { echo "build failed"; tail -40 "$out/build.log"; status=1; }
python -m kdkernels info 2>&1 | tee "$out/info.txt"

echo "== tests on CUDA"
KDKERNELS_TEST_DEVICE=cuda timeout 300 python -m pytest python_tests -q -x -p no:cacheprovider \
  --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1
rc=$?; tail -30 "$out/tests.log"; [ $rc -eq 0 ] || status=1

echo "== benchmark"
timeout 240 python benchmarks/run.py --device cuda --out "$out/bench" --no-progress > "$out/bench.log" 2>&1
rc=$?; cat "$out/bench.log" | tail -80; [ $rc -eq 0 ] || status=1

echo "gpu_check status: $status"
exit $status
