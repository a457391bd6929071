#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU (docs/design.md "Tests", tier 3):
# builds kdkernels with its CUDA kernels, runs the test suite on CUDA tensors
# (compiled Triton, the CUDA kernels and the reference), then the benchmark in
# its quick mode with --device cuda. Everything goes into the folder given:
#
#   bash python_tests/gpu_check.sh OUT_DIR
#
# Needs torch, triton, pybind11, setuptools >= 77, pytest, nvcc and the CUDA
# static runtime (libcudart_static.a); no network (the build uses
# --no-build-isolation --no-deps). A missing one is named before anything runs.
#
# Budget: GPU_CHECK_BUDGET_S (480 s = 8 minutes) for the whole script, so that
# it can run twice in a 15-minute window. Planned: checks ~5 s, build ~60-90 s
# (all cores, only the card's arch) with the Triton cache warmed in parallel
# meanwhile (<= GPU_CHECK_WARM_S, 90 s),
# tests <= GPU_CHECK_TEST_S (150 s), benchmark <= GPU_CHECK_OP_S (25 s) per op
# x 6 ops. Each step also stops when the budget is spent. A step that runs
# out of time gets SIGINT first (pytest then still writes its summary and its
# junit file; the benchmark keeps the rows already written) and SIGKILL
# GPU_CHECK_GRACE_S (15 s) later.
#
# Tests: the suite's files are split over GPU_CHECK_SHARDS (8) pytest
# processes running at once (Triton's JIT is CPU-bound, the machine has 16
# cores): every kernel and dtype of every file runs, each shard writing
# tests-<i>.log / tests-<i>.xml. GPU_CHECK_TESTS narrows the files (a glob
# under python_tests/, e.g. 'test_h*.py').
#
# A rerun in the same window: GPU_CHECK_SKIP_BUILD=1 keeps the build already
# there (saves its minute). A dry run on a machine without a GPU:
# GPU_CHECK_DEVICE=cpu GPU_CHECK_SKIP_BUILD=1 (tests on CPU tensors, the
# benchmark on cpu; everything else as on the GPU machine).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-480}
grace=${GPU_CHECK_GRACE_S:-15}
status=0
PY=${PYTHON:-python}
device=${GPU_CHECK_DEVICE:-cuda}

left() { echo $(( budget - ($(date +%s) - start) )); }
# limit SECONDS CMD...: run CMD for at most min(SECONDS, what the budget has left)
limit() {
  local s=$1; shift
  local l; l=$(left)
  [ "$l" -lt "$s" ] && s=$l
  if [ "$s" -le 0 ]; then echo "gpu_check: budget spent, skipped: $*"; return 124; fi
  timeout -s INT -k "$grace" "$s" "$@"
}

echo "== checks"
missing=()
$PY -c "import pytest" 2>/dev/null || missing+=("pytest (python -m pip install pytest)")
$PY -c "import torch, triton" 2>/dev/null || missing+=("torch and triton importable by $PY")
nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
# the build tools only when this run builds (a rerun with GPU_CHECK_SKIP_BUILD=1 needs none)
if [ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then
  $PY -c "import pybind11" 2>/dev/null || missing+=("pybind11")
  setuptools_ok=$($PY -c "import setuptools; print(int(int(setuptools.__version__.split('.')[0]) >= 77))" 2>/dev/null)
  [ "$setuptools_ok" = 1 ] || missing+=("setuptools >= 77 (have: $($PY -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || echo none))")
  if [ -x "$nvcc" ]; then
    # nvcc on PATH may be a wrapper script: ask it where it really lives (as setup.py does)
    here=$("$nvcc" --dryrun -E -x cu /dev/null 2>&1 | grep -o '_HERE_=[^ ]*' | head -1 | cut -d= -f2)
    cuda_home=${CUDA_HOME:-$(dirname "${here:-$(dirname "$(readlink -f "$nvcc")")}")}
    ls "$cuda_home"/lib64/libcudart_static.a "$cuda_home"/lib/libcudart_static.a \
       "$cuda_home"/targets/*/lib/libcudart_static.a >/dev/null 2>&1 \
      || missing+=("the CUDA static runtime libcudart_static.a under $cuda_home")
  else
    missing+=("nvcc (PATH or \$CUDA_HOME/bin)")
  fi
fi
command -v nvidia-smi >/dev/null 2>&1 || echo "note: no nvidia-smi; the card's arch is not known, building for 80;90"
if [ ${#missing[@]} -gt 0 ]; then
  printf 'gpu_check: missing: %s\n' "${missing[@]}" | tee "$out/missing.txt"
  exit 2
fi

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi || true
  "$nvcc" --version || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== build, and the Triton cache warmed meanwhile ($(left) s left)"
# The compile tier's configurations (benchmark shapes, every variant), compiled
# for this card into the Triton cache the tests and the benchmark read, in
# parallel processes while nvcc builds (kdkernels' Triton path needs no _C).
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.')
cap=${arch:-90}
[ "$cap" -ge 90 ] && cap=90 || cap=80
limit "${GPU_CHECK_WARM_S:-90}" $PY python_tests/_aot.py --warm "$cap" --workers $(( $(nproc) > 4 ? $(nproc) - 2 : 2 )) \
  > "$out/warm.log" 2>&1 &
warm_pid=$!
# only the arch of the card here, all cores: the build is part of the time budget
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  echo "build skipped (GPU_CHECK_SKIP_BUILD=1)" | tee "$out/build.log"; rc=0
else
  KDKERNELS_CUDA=1 KDKERNELS_CUDA_ARCHS="${arch:-80;90}" MAX_JOBS=$(nproc) \
    limit 240 $PY -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
  rc=$?
fi
if [ $rc -ne 0 ]; then
  echo "gpu_check: build failed (exit $rc); not testing a tree without _C"; tail -40 "$out/build.log"
  kill -INT "$warm_pid" 2>/dev/null; wait "$warm_pid" 2>/dev/null
  exit 1
fi
limit 60 $PY -m kdkernels info 2>&1 | tee "$out/info.txt"
$PY - "$device" <<'PY' || { echo "gpu_check: kdkernels._C did not load, or has no CUDA kernels: stopping"; exit 1; }
import sys
from kdkernels import _native
info = _native.build_info()
assert info.get("with_cuda") or sys.argv[1] == "cpu", info
PY

wait "$warm_pid"
echo "warm: exit $? ($(tail -1 "$out/warm.log"))"

echo "== tests on $device ($(left) s left)"
shards=${GPU_CHECK_SHARDS:-8}
mapfile -t files < <(ls python_tests/${GPU_CHECK_TESTS:-test_*.py} | grep -v test_gpu_compile.py)
pids=()
for ((i = 0; i < shards; i++)); do
  mine=()
  for ((j = i; j < ${#files[@]}; j += shards)); do mine+=("${files[j]}"); done
  [ ${#mine[@]} -gt 0 ] || continue
  # no -x: one run should show every failure; --durations says where the time went
  KDKERNELS_TEST_DEVICE=$device limit "${GPU_CHECK_TEST_S:-150}" $PY -m pytest "${mine[@]}" -q -rs \
    -p no:cacheprovider --maxfail=100 --durations=10 --junitxml="$out/tests-$i.xml" > "$out/tests-$i.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[i]}"; rc=$?
  echo "tests shard $i: exit $rc: $(tail -1 "$out/tests-$i.log")"
  [ $rc -eq 0 ] || status=1
done

echo "== benchmark, quick ($(left) s left)"
# one op at a time, each under its own limit: the CSV keeps the rows already
# written, so an op that runs out of time costs only its own remaining cases
for op in hcl kd abf hint reviewkd fskd linear_kd; do
  limit "${GPU_CHECK_OP_S:-25}" $PY benchmarks/run.py --device "$device" --quick --ops "$op" --out "$out/bench" \
    --no-progress >> "$out/bench.log" 2>&1
  rc=$?; echo "benchmark $op: exit $rc"; [ $rc -eq 0 ] || status=1
done
tail -60 "$out/bench.log"
cat "$out/bench/summary.md" 2>/dev/null

echo "gpu_check status: $status after $(( $(date +%s) - start )) s (budget $budget s)"
exit $status
