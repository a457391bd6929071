"""``python -m kdkernels info|smoke``.

info: versions, what _C was built with, backends per device and why.
smoke: run every op once with the compiled CPU kernels against the reference.
"""
from __future__ import annotations

import argparse
import platform
import sys


def _info() -> int:
    import torch

    import kdkernels
    from kdkernels import _native, backends

    print(f"kdkernels {kdkernels.__version__}  (python {platform.python_version()}, {platform.machine()})")
    print(f"torch     {torch.__version__}  (CUDA available: {torch.cuda.is_available()})")
    try:
        import triton

        print(f"triton    {triton.__version__}  (TRITON_INTERPRET={'1' if backends.triton_interpret() else '0'})")
    except Exception as exc:  # triton is optional
        print(f"triton    not importable: {type(exc).__name__}: {exc}")

    mod = _native.native()
    if mod is None:
        print(f"_C        NOT LOADED: {_native.load_error()}")
    else:
        info = _native.build_info()
        cuda = (f"CUDA {info.get('cuda_version')} archs {info.get('cuda_archs')}"
                if info.get("with_cuda") else "without CUDA")
        print(f"_C        {mod.__file__}")
        print(f"          compiler {info.get('compiler')}, flags {info.get('cxx_flags')!r}, "
              f"threads {info.get('threads')}, {cuda}")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = sorted(backends._OP_BACKENDS)
    for device in devices:
        print(f"\nbackends on {device} tensors (auto picks: "
              + ", ".join(f"{op}={backends.choose_backend(op, torch.device(device), 'auto')}" for op in ops) + ")")
        for op in ops:
            for name, ok, why in backends.backend_status(op, device):
                print(f"  {op:<16} {name:<7} {'yes' if ok else 'no ':<4} {why}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdkernels", description=__doc__)
    parser.add_argument("command", choices=["info", "smoke"],
                        help="info: what is built and usable here; smoke: check the compiled CPU kernels")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    from ._smoke import main as smoke

    return smoke()


if __name__ == "__main__":
    sys.exit(main())
