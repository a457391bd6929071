#!/usr/bin/env bash
# The cluster-wheel story, end to end: build one wheel with an isolated build
# (no torch in the build environment), install it into a fresh virtual
# environment next to whatever torch is there, and check from outside the
# source tree that _C loaded and serves every CPU op.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip wheel . -w "$work/dist" --no-deps -q
wheel=$(ls "$work"/dist/kdkernels-*.whl)
echo "built $(basename "$wheel")"
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
