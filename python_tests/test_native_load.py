"""Loading ``kdkernels._C``: what a user sees when it cannot load, and where the warnings point.

The failures are simulated: a finder placed before the real one answers
``import kdkernels._C`` with the ImportError the dynamic loader gives on a node
whose glibc or libstdc++ is older than the build machine's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import kdkernels
from kdkernels import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SO = "/opt/venv/lib/python3.11/site-packages/kdkernels/_C.cpython-311-x86_64-linux-gnu.so"
GLIBCXX_ERROR = f"/lib64/libstdc++.so.6: version `GLIBCXX_3.4.30' not found (required by {SO})"
GLIBC_ERROR = f"/lib64/libc.so.6: version `GLIBC_2.34' not found (required by {SO})"


@pytest.fixture
def fresh_loader(monkeypatch):
    """_native as if nothing had been loaded or warned yet in this process."""
    for name, value in (("_module", None), ("_error", None), ("_loaded", False), ("_warned", False)):
        monkeypatch.setattr(_native, name, value)
    return monkeypatch


def _fail_with(monkeypatch, message):
    def raise_import_error():
        raise ImportError(message)

    monkeypatch.setattr(_native, "_import_native", raise_import_error)


def test_glibcxx_mismatch_names_the_symbol_and_the_remedy(fresh_loader):
    _fail_with(fresh_loader, GLIBCXX_ERROR)
    assert _native.native() is None
    err = _native.load_error()
    assert "GLIBCXX_3.4.30" in err and "/lib64/libstdc++.so.6" in err, err
    assert "C++ runtime" in err, err
    assert "tools/build_wheels.sh" in err and "pip install ." in err, err  # what to do
    assert "falls back" in err or "fall back" in err, err


def test_glibc_mismatch_names_the_version_and_this_systems_glibc(fresh_loader):
    _fail_with(fresh_loader, GLIBC_ERROR)
    err = _native.load_error()
    assert "GLIBC_2.34" in err and "glibc 2.34" in err, err
    import platform

    libc, version = platform.libc_ver()
    if libc == "glibc":
        assert f"this system has glibc {version}" in err, err


def test_other_import_errors_are_reported_as_they_are(fresh_loader):
    _fail_with(fresh_loader, "No module named 'kdkernels._C'")
    assert _native.load_error() == "ImportError: No module named 'kdkernels._C'"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _native.warn_if_incompatible()
    assert caught == [], "a missing _C (a source checkout) is not a runtime mismatch: no import-time warning"


def test_runtime_mismatch_warns_at_import_and_points_at_the_import(tmp_path):
    # A real `import kdkernels` in a fresh interpreter, with _C failing as on an old node.
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.abc, sys, warnings

        class OldNode(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "kdkernels._C":
                    raise ImportError({GLIBCXX_ERROR!r})
                return None

        sys.meta_path.insert(0, OldNode())
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kdkernels  # the line the warning must point at
        mine = [w for w in caught if "kdkernels._C" in str(w.message)]
        assert len(mine) == 1, [str(w.message) for w in caught]
        print("FILE", mine[0].filename, mine[0].lineno)
        print("MESSAGE", mine[0].message)
    """))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    line = script.read_text().splitlines().index("    import kdkernels  # the line the warning must point at") + 1
    assert f"FILE {script} {line}" in out.stdout, out.stdout
    assert "GLIBCXX_3.4.30" in out.stdout and "tools/build_wheels.sh" in out.stdout, out.stdout


def _missing(monkeypatch):
    """As in a checkout where _C was never built."""
    monkeypatch.setattr(_native, "_loaded", True)
    monkeypatch.setattr(_native, "_error", "ImportError: No module named 'kdkernels._C'")


def test_fallback_warning_points_at_the_users_call(fresh_loader):
    _missing(fresh_loader)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kdkernels.kd_loss(s, t, temperature=4.0)  # auto picks the reference on CPU: the fallback warning
    mine = [w for w in caught if "falling back" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert mine[0].filename == __file__, f"the warning points at {mine[0].filename}:{mine[0].lineno}"


def test_fallback_warning_through_a_module_points_at_the_users_call(fresh_loader):
    # nn modules add torch.nn.Module.__call__ frames between the user and kdkernels.
    _missing(fresh_loader)
    criterion = kdkernels.nn.DistillKL(4.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        criterion(torch.randn(3, 5), torch.randn(3, 5))
    mine = [w for w in caught if "falling back" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert mine[0].filename == __file__, f"the warning points at {mine[0].filename}:{mine[0].lineno}"
