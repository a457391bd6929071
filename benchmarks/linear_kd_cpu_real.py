#!/usr/bin/env python
"""``linear_kd_loss`` at the real language-model shapes on a CPU: one training step per provider.

    nice python benchmarks/linear_kd_cpu_real.py --vocab 32000,128256          # N = D = 2,048, fp32

``run.py``'s plans are sized for a minute on a 2-core machine; a step at
N = 2,048, D = 2,048 is 1.1 TFLOP (V = 32,000) to 4.3 TFLOP (V = 128,256) of
GEMMs, minutes per step there, so this script measures only what the targets
need (docs/spec.md §7): the ``full`` mode (forward + backward, the student's
h and lm_head trained, the teacher frozen, fp32) of the case in
``benchmarks/cases/linear_kd.py`` for ``eager`` (materialised logits +
``kd_loss``), ``compile`` (``torch.compile`` of eager; its first call, which
compiles, is reported apart) and ``kdkernels``.

Per provider: one step under ``torch.profiler`` (peak memory beyond the
inputs, the harness's CPU method: tensors allocated through torch), then
``--reps`` plain timed steps. The peak is split into the mandatory outputs
(the gradients the caller receives: dh_s (N, D) and dw_s (V, D)) and the
working memory (the rest). No float64 oracle (it would double the run); the
providers' loss and gradients are compared with eager's in fp32 instead.
Rows (the long format of ``results.csv``) go to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import harness  # noqa: E402
import machine  # noqa: E402
from cases import linear_kd as lkd_cases  # noqa: E402
from measure import _quiet_stderr, rel_err  # noqa: E402

FIELDS = ["op", "case", "shape", "dtype", "provider", "mode", "metric", "value", "note", "load_avg_1min", "date"]


def load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def step(fn, args):
    """One training step: loss, backward (grad_output 1); returns (loss, [grads])."""
    for a in args:
        a.grad = None
    loss = fn(*args)
    loss.backward()
    return loss.detach(), [a.grad for a in args if a.requires_grad]


def profiled_step(fn, args):
    """(seconds, peak bytes allocated beyond what existed before, loss, grads)."""
    from torch.profiler import ProfilerActivity, profile

    for a in args:
        a.grad = None
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            t0 = time.perf_counter()
            loss, grads = step(fn, args)
            secs = time.perf_counter() - t0
    cpu = torch.autograd.DeviceType.CPU
    evs = sorted((e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == cpu), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in evs:
        cur += e.nbytes()
        peak = max(peak, cur)
    return secs, peak, loss, grads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", default="32000,128256")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--providers", default="eager,kdkernels,compile")
    p.add_argument("--reps", type=int, default=1, help="plain timed steps after the profiled one")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu", "linear_kd_real.csv"))
    args = p.parse_args(argv)
    import kdkernels

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta = machine.machine_info("cpu")
    print(f"linear_kd real shapes · {meta['device_name']} · {torch.get_num_threads()} threads · torch {meta['torch']}"
          f" · commit {meta['commit']} · load {load():.2f}", flush=True)
    new = not os.path.exists(args.out)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    out = open(args.out, "a", newline="")
    writer = csv.DictWriter(out, FIELDS)
    if new:
        writer.writeheader()
    for v in [int(x) for x in args.vocab.split(",")]:
        case = lkd_cases._case(args.n, v, args.d, torch.float32, "cpu", kdkernels.linear_kd_loss, "")
        torch.manual_seed(0)
        inputs = case.make_inputs()
        mandatory = sum(a.numel() * a.element_size() for a in inputs if a.requires_grad)
        fns = {"eager": case.reference, "compile": harness._compiled(case.reference), "kdkernels": case.kdkernels}
        ref = None

        def row(provider, metric, value, note=""):
            r = dict(op="linear_kd", case=case.name, shape=case.shape, dtype="fp32", provider=provider, mode="full",
                     metric=metric, value=value, note=note, load_avg_1min=f"{load():.2f}", date=date)
            writer.writerow(r)
            out.flush()
            print(f"  {case.name:28s} {provider:10s} {metric:22s} {value:.6g} {note}", flush=True)

        row("", "mandatory_out_mib", mandatory / 2**20, "dh_s (N, D) + dw_s (V, D), fp32")
        for name in [x.strip() for x in args.providers.split(",")]:
            fn = fns[name]
            if name == "compile":  # the compiling call, apart
                t0 = time.perf_counter()
                step(fn, inputs)
                row(name, "compile_s", time.perf_counter() - t0, "first call: compile + one step")
            secs, peak, loss, grads = profiled_step(fn, inputs)
            row(name, "time_ms_profiled", secs * 1e3, "the step run under the memory profiler")
            row(name, "peak_mem_mib", peak / 2**20, "torch allocations beyond the inputs")
            row(name, "working_mem_mib", (peak - mandatory) / 2**20, "peak minus the gradients returned")
            if ref is None:
                ref = (loss, grads)
            else:
                err = max([rel_err(loss, ref[0])] + [rel_err(a, b) for a, b in zip(grads, ref[1])])
                row(name, "rel_err_vs_eager", err, "loss and gradients, fp32 vs eager's fp32")
            del loss, grads
            for i in range(args.reps):
                t0 = time.perf_counter()
                step(fn, inputs)
                row(name, "time_ms", (time.perf_counter() - t0) * 1e3, f"plain step {i + 1}")
            for a in inputs:
                a.grad = None
        del inputs, ref
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
