"""The machine a benchmark runs on: what it is, and how fast it copies memory.

Probes only: the device's name and its results-folder tag, the last-level cache
size (how many input copies the timing rotates over), the copy bandwidth the
achieved bandwidths are compared with, and the versions and commit written
beside every row.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import time
from typing import Dict

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_level_cache_bytes(device: str) -> int:
    """L2 of the GPU, or the largest CPU cache listed in sysfs (32 MiB if sysfs does not say)."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    txt = f.read().strip()
            except OSError:
                continue
            m = re.match(r"(\d+)([KMG]?)", txt)
            if m:
                mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
                best = max(best, int(m.group(1)) * mult)
    except OSError:
        pass
    return best or 32 * 2**20


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "cpu"


def device_tag(device: str) -> str:
    """Folder name for results: 'cpu', or the card's name ('nvidia-h100-80gb-hbm3')."""
    if device != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def git_commit() -> str:
    """Short hash of HEAD, '+dirty' when tracked files changed; 'none' outside a git checkout."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "none"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               env=env, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):  # no git here: the rows say "none"
        return "none"


def machine_info(device: str) -> Dict[str, str]:
    """The columns written beside every row: device, versions, commit, date."""
    import kdkernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # a CPU-only install without Triton: its rows say "none"
        triton_version = "none"
    kd_version = kdkernels.__version__
    return {
        "device": device,
        "device_name": device_name(device),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "kdkernels": kd_version,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """Bytes read + written per second of a large ``dst.copy_(src)`` (median of several)."""
    cache = last_level_cache_bytes(device)
    if device == "cuda":
        nbytes = 256 * 2**20 if quick else max(1 << 30, 8 * cache)
        reps = 10 if quick else 30
    else:
        nbytes = 64 * 2**20 if quick else min(512 * 2**20, max(256 * 2**20, 2 * cache))
        reps = 3 if quick else 5
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch / warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)

