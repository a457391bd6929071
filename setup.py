"""Builds the native library ``kdkernels._C`` (metadata lives in pyproject.toml).

The extension includes no torch headers: it needs only pybind11 at build time,
so an isolated ``pip install .`` works and one build serves every torch version.

Environment:
  KDKERNELS_CUDA=auto|1|0     compile csrc/cuda/*.cu: when nvcc is found (auto, the
                              default), always (1: error without nvcc), never (0)
  KDKERNELS_CUDA_ARCHS=80;90  SASS for each listed arch, PTX for the highest
  CUDA_HOME / CUDA_PATH       where the toolkit is (default: from nvcc on PATH)
  MAX_JOBS                    parallel compile jobs (default: all cores)

On Linux (x86-64, aarch64, glibc) the library is built to load on glibc 2.28 and
later whatever glibc and GCC build it: libstdc++ is linked statically and the
glibc symbols that newer glibcs re-versioned are pinned to their old versions
(csrc/compat/glibc_2_28.cpp). `auditwheel repair` then tags the wheel
manylinux_2_28 (tools/build_wheels.sh does both, for every Python).
"""
from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
os.chdir(ROOT)  # sources are given relative to the project root
# Portable flags only (no -march=native): the wheel must run on any x86-64 / aarch64.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
              "--expt-relaxed-constexpr", "-DKDKERNELS_WITH_CUDA"]


# glibc 2.28 compatibility (see csrc/compat/glibc_2_28.cpp): Linux x86-64 / aarch64 with glibc.
GLIBC_COMPAT_SRC = os.path.join("csrc", "compat", "glibc_2_28.cpp")
GLIBC_FLOOR = (2, 28)


def _glibc_compat() -> bool:
    return (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")
            and platform.libc_ver()[0] == "glibc")


def _glibc_compat_link_args() -> list[str]:
    """Linker flags that pair with GLIBC_COMPAT_SRC: static libstdc++, a --wrap per pinned symbol."""
    names = sorted(set(re.findall(r"KDK_GLIBC_PIN(?:_AT)?\((\w+)", open(GLIBC_COMPAT_SRC).read())) - {"name"})
    return [
        # GCC 12's libstdc++ needs GLIBCXX_3.4.30; a RHEL 8 node has 3.4.25. Its symbols stay
        # private (--exclude-libs), so they never meet torch's libstdc++.
        "-static-libstdc++",
        "-Wl,--exclude-libs,ALL",
        *(f"-Wl,--wrap={n}" for n in names),
        # The pinned pthread/dl/rt functions live in these libraries before glibc 2.34: keep them
        # needed even where they are empty stubs today (and where gcc defaults to --as-needed).
        "-Wl,--no-as-needed", "-l:libpthread.so.0", "-l:libdl.so.2", "-l:librt.so.1",
    ]


def _glibc_needed(path: str) -> tuple[int, ...] | None:
    """Newest GLIBC_x.y symbol version ``path`` needs (via objdump; None when objdump is missing)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    out = subprocess.run([objdump, "-T", path], capture_output=True, text=True).stdout
    found = [tuple(int(x) for x in v.split(".")) for v in re.findall(r"\bGLIBC_(\d+(?:\.\d+)+)\b", out)]
    return max(found, default=(0,))


def _log(msg: str) -> None:
    print(f"kdkernels: {msg}", flush=True)


def _jobs() -> int:
    return int(os.environ.get("MAX_JOBS", "0")) or (os.cpu_count() or 1)


def _cuda_mode() -> str:
    mode = os.environ.get("KDKERNELS_CUDA", "auto").strip().lower()
    aliases = {"": "auto", "auto": "auto", "1": "1", "on": "1", "yes": "1", "true": "1",
               "0": "0", "off": "0", "no": "0", "false": "0"}
    if mode not in aliases:
        raise SystemExit(f"KDKERNELS_CUDA={mode!r}: expected auto, 1 or 0")
    return aliases[mode]


def _cuda_archs() -> list[str]:
    raw = os.environ.get("KDKERNELS_CUDA_ARCHS", "80;90")
    archs = []
    for item in re.split(r"[;,\s]+", raw.strip()):
        if not item:
            continue
        arch = item.lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise SystemExit(f"KDKERNELS_CUDA_ARCHS: cannot read {item!r} (expected e.g. 80;90)")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise SystemExit("KDKERNELS_CUDA_ARCHS is empty")
    return sorted(archs, key=lambda a: (int(re.match(r"\d+", a).group()), a))


def _find_cuda() -> tuple[str | None, str | None]:
    """(nvcc, CUDA home): $CUDA_HOME/bin/nvcc (or $CUDA_PATH), else nvcc on PATH; (None, None) if neither."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc"), home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, None
    # nvcc on PATH may be a wrapper script: ask it where it really lives.
    home = None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
        here = re.search(r"_HERE_=(\S+)", out)
        home = os.path.dirname(os.path.normpath(here.group(1))) if here else None
    except (OSError, subprocess.SubprocessError):
        pass
    if not home or not os.path.isdir(os.path.join(home, "include")):
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return nvcc, home


def _cuda_lib_dir(home: str) -> str | None:
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        if os.path.isfile(os.path.join(home, sub, "libcudart_static.a")):
            return os.path.join(home, sub)
    return None


class BuildExt(build_ext):
    """build_ext that first compiles csrc/cuda/*.cu with nvcc and links the objects in."""

    def build_extensions(self) -> None:
        ext = self.extensions[0]
        flags = list(self.compiler.compiler_so[1:]) + list(ext.extra_compile_args)
        ext.define_macros.append(("KDKERNELS_CXX_FLAGS", '"%s"' % " ".join(flags).replace('"', "'")))
        mode = _cuda_mode()
        if mode != "0":
            nvcc, home = _find_cuda()
            if nvcc is None:
                if mode == "1":
                    raise SystemExit("KDKERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
                _log("nvcc not found: building the CPU kernels only (KDKERNELS_CUDA=1 makes this an error)")
            else:
                try:
                    self._add_cuda(ext, nvcc, home)
                except (RuntimeError, OSError) as exc:
                    if mode == "1":
                        raise SystemExit(f"CUDA build failed: {exc}")
                    _log(f"CUDA build failed, building the CPU kernels only: {exc}")
        else:
            _log("KDKERNELS_CUDA=0: building the CPU kernels only")
        self._stamp_config(ext)
        super().build_extensions()
        if _glibc_compat():
            need = _glibc_needed(self.get_ext_fullpath(ext.name))
            if need is not None:
                ok = need <= GLIBC_FLOOR
                _log(f"_C needs glibc >= {'.'.join(map(str, need))}" + (
                    "" if ok else f": NEWER than {'.'.join(map(str, GLIBC_FLOOR))}; a symbol escaped "
                    f"{GLIBC_COMPAT_SRC} (objdump -T shows which), the wheel will not be manylinux_2_28"))

    def _stamp_config(self, ext) -> None:
        """Relink when the configuration changes, not only when a source does.

        setuptools skips an extension whose sources are older than the built
        library; without this, a wheel built after a CPU-only build in the same
        tree (KDKERNELS_CUDA=0, then =1) would silently reuse the CPU-only _C.
        """
        config = repr((sorted(map(str, ext.define_macros)), ext.extra_objects, ext.extra_link_args,
                       ext.libraries, ext.library_dirs, self.compiler.compiler_so, self.compiler.linker_so))
        path = os.path.join(self.build_temp, "kdkernels-config.txt")
        os.makedirs(self.build_temp, exist_ok=True)
        if not os.path.exists(path) or open(path).read() != config:
            with open(path, "w") as f:
                f.write(config)
        ext.depends = [*ext.depends, path, *ext.extra_objects]

    def _add_cuda(self, ext, nvcc: str, home: str) -> None:
        lib_dir = _cuda_lib_dir(home)
        if lib_dir is None:
            raise RuntimeError(f"libcudart_static.a not found under {home}")
        archs = _cuda_archs()
        gencode = []
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        ptx = re.match(r"\d+", archs[-1]).group()  # PTX without the a/f suffix: it must JIT on later GPUs
        gencode += ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]
        sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        headers = glob.glob(os.path.join("csrc", "common", "*.h"))
        # Shared by every Python's build (the objects do not depend on Python): building the
        # wheels of five Pythons compiles the CUDA sources once. The .cmd stamp guards reuse.
        out_dir = os.path.join(os.path.dirname(os.path.abspath(self.build_temp)), "temp.cuda")
        os.makedirs(out_dir, exist_ok=True)
        pool = max(1, min(_jobs(), len(sources)))
        threads = max(1, _jobs() // pool)
        base = [nvcc, *NVCC_FLAGS, *gencode, "--threads", str(threads), "-I", "csrc"]
        _log(f"CUDA {home}: sm_{', sm_'.join(archs)} + PTX compute_{ptx}; {len(sources)} file(s)")

        def compile_one(src: str) -> str:
            obj = os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + ".o")
            cmd = [*base, "-c", src, "-o", obj]
            stamp = obj + ".cmd"
            newest = max(os.path.getmtime(p) for p in [src, *headers])
            if (os.path.exists(obj) and os.path.getmtime(obj) >= newest and os.path.exists(stamp)
                    and open(stamp).read() == " ".join(cmd)):
                return obj
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
            if proc.stderr.strip():
                sys.stderr.write(proc.stderr)
            with open(stamp, "w") as f:
                f.write(" ".join(cmd))
            return obj

        with ThreadPoolExecutor(pool) as ex:
            objects = list(ex.map(compile_one, sources))
        ext.extra_objects += objects
        ext.include_dirs.append(os.path.join(home, "include"))
        ext.library_dirs.append(lib_dir)
        # Static runtime: importing _C needs no libcudart.so and no GPU; its
        # symbols stay private so they never mix with torch's own runtime.
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        ext.extra_link_args += ["-Wl,--exclude-libs,ALL"]
        ext.define_macros += [("KDKERNELS_WITH_CUDA", None),
                              ("KDKERNELS_CUDA_ARCHS", '"%s"' % ";".join(archs))]


ext_modules = [
    Pybind11Extension(
        "kdkernels._C",
        ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp")),
         *([GLIBC_COMPAT_SRC] if _glibc_compat() else [])],
        include_dirs=["csrc"],
        depends=sorted(glob.glob("csrc/common/*.h") + glob.glob("csrc/cpu/*.h") + glob.glob("csrc/cuda/*.cu")),
        extra_compile_args=CXX_FLAGS,
        extra_link_args=_glibc_compat_link_args() if _glibc_compat() else [],
        # dlsym (csrc/common/parallel.h finds torch's OpenMP team at run time): libdl before glibc 2.34
        libraries=["dl", "pthread"] if sys.platform.startswith("linux") else [],
        cxx_std=17,
    )
]

ParallelCompile("MAX_JOBS", default=0).install()
setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
