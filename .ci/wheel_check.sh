#!/usr/bin/env bash
# The cluster-wheel story, end to end: build one wheel with an isolated build
# (no torch in the build environment) the way tools/build_wheels.sh builds every
# Python's: `auditwheel show` must report manylinux_2_28 or older (glibc 2.28
# nodes), `auditwheel repair` tags it. Install the repaired wheel into a fresh
# virtual environment next to whatever torch is there, and check from outside
# the source tree that _C loaded and serves every CPU op. Then build an sdist
# with `python -m build --sdist` and check it rebuilds into a wheel with the
# same files.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

OUT="$work/dist" bash tools/build_wheels.sh python3
wheel=$(ls "$work"/dist/kdkernels-*.whl)
case "$(basename "$wheel")" in
  *manylinux_2_28_*) echo "built $(basename "$wheel")" ;;
  *) echo "FAIL: $(basename "$wheel") is not tagged manylinux_2_28"; exit 1 ;;
esac
python3 - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
native = [n for n in names if n.startswith("kdkernels/_C")]
assert native, f"no kdkernels/_C in the wheel: {names}"
print("wheel contains", native)
PY

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0 "$wheel"
cd "$work"  # not the source tree: import the installed package
"$work/venv/bin/python" -m kdkernels info
"$work/venv/bin/python" -m kdkernels smoke

echo "== sdist: python -m build --sdist, rebuilt into a wheel with the same files"
cd "$repo"
python3 -m pip install -q build
python3 -m build --sdist -o "$work/sdist" . >/dev/null
sdist=$(ls "$work"/sdist/kdkernels-*.tar.gz)
# Every tracked source the build reads is in the sdist (csrc/cuda included), so
# the rebuild below may skip nvcc: the wheel built above already proved the
# CUDA sources compile, and a third CUDA build would cost CI minutes.
git ls-files csrc kdkernels setup.py pyproject.toml MANIFEST.in README.md | python3 -c '
import sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
missing = [f for f in sys.stdin.read().split() if f not in names]
assert not missing, f"tracked sources missing from the sdist: {missing}"
print("the sdist holds every tracked source under csrc/ and kdkernels/")
' "$sdist"
KDKERNELS_CUDA=0 python3 -m pip wheel "$sdist" -w "$work/dist2" --no-deps -q
python3 - "$wheel" "$work"/dist2/kdkernels-*.whl <<'PY'
import sys, zipfile
# Files only: auditwheel repair writes directory entries that pip wheel does not.
a, b = (sorted(n for n in zipfile.ZipFile(p).namelist() if not n.endswith("/")) for p in sys.argv[1:3])
assert a == b, f"the sdist rebuilt into a different wheel: only in the first {set(a) - set(b)}, only in the second {set(b) - set(a)}"
print(f"sdist {sys.argv[2].rsplit('/', 1)[-1]} rebuilds into the same {len(a)} files")
PY
