#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU (docs/design.md "Tests", tier 3):
# builds kdkernels with its CUDA kernels, runs the whole test suite on CUDA
# tensors (compiled Triton, the CUDA kernels and the reference), then the
# benchmark with --device cuda. Everything goes into the folder given:
#   bash python_tests/gpu_check.sh OUT_DIR
# The machine needs torch, triton, pybind11, setuptools, pytest and nvcc; it
# needs no network (the build uses --no-build-isolation --no-deps). Budget:
# build ~1-2 min, tests <= GPU_CHECK_TEST_S (210 s), benchmark <= 6 x
# GPU_CHECK_OP_S (60 s): at most about 11 minutes; never run yet on a GPU.
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
# only the arch of the card here, all cores: the build is part of the time budget
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
KDKERNELS_CUDA=1 KDKERNELS_CUDA_ARCHS="${arch:-80;90}" MAX_JOBS=$(nproc) \
  pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 || { echo "build failed"; tail -40 "$out/build.log"; status=1; }
python -m kdkernels info 2>&1 | tee "$out/info.txt"

echo "== tests on CUDA"
# no -x: one run should show every failure; --durations says where the time went
KDKERNELS_TEST_DEVICE=cuda timeout "${GPU_CHECK_TEST_S:-210}" python -m pytest python_tests -q -rs -p no:cacheprovider \
  --maxfail=100 --durations=20 --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1
rc=$?; tail -60 "$out/tests.log"; [ $rc -eq 0 ] || status=1

echo "== benchmark"
# one op at a time, each under its own limit: the CSV keeps the rows of the ops
# already run, so a slow op costs only its own results
for op in hcl kd abf hint reviewkd fskd; do
  timeout "${GPU_CHECK_OP_S:-60}" python benchmarks/run.py --device cuda --ops "$op" --out "$out/bench" \
    --no-progress >> "$out/bench.log" 2>&1
  rc=$?; echo "benchmark $op: exit $rc"; [ $rc -eq 0 ] || status=1
done
tail -120 "$out/bench.log"
cat "$out/bench/summary.md" 2>/dev/null

echo "gpu_check status: $status"
exit $status
