"""Distillation on real data: scikit-learn's bundled 8x8 digits (no download).

    python examples/digits.py --table                      # the README table, every method
    python examples/digits.py --method kd sskd             # per-seed tables of some methods

For every seed (default 3): a stratified 70/30 split of the 1797 images, a
small CNN teacher (a stem and three stages of two 3x3 conv+BN+ReLU, widths
16-32-64) trained with cross-entropy, and a student of the teacher's family,
4x thinner (the same stem and stages, widths 4-8-16: ~14x fewer parameters),
which SSKD assumes and the other methods accept.
The same student initialisation is trained alone (cross-entropy) and with the
chosen method, so the comparison is paired. Every run uses Adam (lr 3e-3) with
a cosine schedule over its epochs, batch 64, through ``kdkernels.train.fit``.

Methods (settings from the papers / reference code, not tuned on this data):

* kd       - Hinton KD, T = 4, 0.1 CE + 0.9 KD (RepDistiller's recipe), E epochs.
* fitnets  - the paper's two stages: hint student layer2 -> teacher layer2
             (1x1 regressor) for E/3 epochs, then CE + lambda KD, lambda 4 -> 1,
             T = 3, for E epochs.
* reviewkd - ABF + HCL on [layer1, layer2, layer3, pool], teacher features
             pre-activation (bn2 of each stage), weight 1, warm-up E/12 epochs
             (the reference's 20 of 240), E epochs.
* sskd     - stage by stage (layer1, layer2, layer3; earlier stages frozen),
             E/3 epochs each, then the head (fc) trained to convergence on the
             frozen backbone (SSKD.fit_head: full-batch L-BFGS, CE + 1e-4/2 ||W||^2).
* sskd-all - the SSKD paper's ablation baseline: all stages at once (the three
             stage losses summed) for E epochs, then the same converged head.
* fskd     - a different setting, the one FSKD is for: the student is the
             teacher with 50% of the filters of each stage's first conv pruned
             (L1 norm); FSKD recovers it from 10 unlabeled images per class
             (closed form, merged into the convs: no extra parameters). "Student alone" is
             the pruned net fine-tuned with cross-entropy on the same 100
             images with their labels (150 Adam steps, lr 1e-3, batch 32).

Prints a markdown table of test accuracies (the wall time goes to stderr).
Deterministic for given seeds and thread count (split, initialisation, order,
deterministic algorithms); the output names the seeds and the environment.
"""
from __future__ import annotations

import argparse
import copy
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from kdkernels import train

import sys

from _digits_common import deterministic, environment, few, n_params, train_ce

METHODS = ("kd", "fitnets", "reviewkd", "sskd", "sskd-all", "fskd")
TEACHER_WIDTHS = (16, 32, 64)
STUDENT_WIDTHS = (4, 8, 16)
STAGES = ["layer1", "layer2", "layer3"]


def stage(cin: int, cout: int, stride: int, convs: int) -> nn.Sequential:
    layers, c = [], cin
    for i in range(1, convs + 1):
        layers += [(f"conv{i}", nn.Conv2d(c, cout, 3, stride=stride if i == 1 else 1, padding=1, bias=False)),
                   (f"bn{i}", nn.BatchNorm2d(cout)), (f"relu{i}", nn.ReLU())]
        c = cout
    return nn.Sequential(OrderedDict(layers))


class Net(nn.Module):
    """[stem] -> layer1 (8x8) -> layer2 (4x4) -> layer3 (2x2) -> pool -> fc."""

    def __init__(self, widths, convs: int, stem: bool, classes: int = 10):
        super().__init__()
        c0 = widths[0] if stem else 1
        self.stem = stage(1, c0, 1, 1) if stem else nn.Identity()
        self.layer1 = stage(c0, widths[0], 1, convs)
        self.layer2 = stage(widths[0], widths[1], 2, convs)
        self.layer3 = stage(widths[1], widths[2], 2, convs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def teacher_net():
    return Net(TEACHER_WIDTHS, convs=2, stem=True)


def student_net():
    """The teacher's family, thinner: the same stem and stages (two convs each), widths 4-8-16."""
    return Net(STUDENT_WIDTHS, convs=2, stem=True)


class Plain(nn.Module):
    """Cross-entropy training in the distillers' interface, so that ``fit`` runs it too."""

    def __init__(self, model):
        super().__init__()
        self.student = model

    def forward(self, images, labels):
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, labels)}


# ---------------------------------------------------------------------- data
def load(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed, stratify=y)
    mean, std = x[idx_tr].mean(), x[idx_tr].std()
    x = (x - mean) / std
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def loader(x, y, seed, batch=64, shuffle=True):
    ds = torch.utils.data.TensorDataset(x, y)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=g)


# ------------------------------------------------------------------ training
def run(distiller, data, epochs, seed, lr=3e-3, params=None):
    """Adam + cosine over ``epochs`` through kdkernels.train.fit."""
    opt = torch.optim.Adam(params if params is not None else distiller.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    torch.manual_seed(seed)
    train.fit(distiller, data, epochs=epochs, optimizer=opt, scheduler=sched, progress=False)


def acc(model, x, y) -> float:
    return train.evaluate(model, [(x, y)])


def distill(method, student, teacher, data, epochs, seed, sample):
    """Train ``student`` (in place) with ``method``; returns the number of epochs spent."""
    third = max(1, epochs // 3)
    if method == "kd":
        d = train.KD(student, teacher, ce_weight=0.1, kd_weight=0.9, temperature=4.0)
        run(d, data, epochs, seed)
        return epochs
    if method == "fitnets":
        d = train.FitNets(student, teacher, "layer2", "layer2", sample=sample)
        run(d, data, third, seed, params=d.trainable_parameters())
        d.set_stage(2)
        run(d, data, epochs, seed + 1, params=d.trainable_parameters())
        return third + epochs
    if method == "reviewkd":
        d = train.ReviewKD(student, teacher, [*STAGES, "pool"], [f"{s}.bn2" for s in STAGES] + ["pool"],
                           sample=sample, warmup_epochs=epochs / 12)
        run(d, data, epochs, seed)
        return epochs
    if method in ("sskd", "sskd-all"):
        d = train.SSKD(student, teacher, STAGES, STAGES, sample=sample, freeze_previous=True)
        if method == "sskd":
            for k, st in enumerate([1, 2, 3]):
                d.set_stage(st)
                run(d, data, third, seed + k, params=d.trainable_parameters())
            spent = 3 * third
        else:  # the paper's ablation baseline: every stage at once, one run
            d.set_stage("all")
            run(d, data, epochs, seed, params=d.trainable_parameters())
            spent = epochs
        d.fit_head(data)  # the head to convergence on the frozen backbone
        d.close()
        return spent
    raise ValueError(method)


# ---------------------------------------------------------------------- FSKD
def prune(teacher: Net) -> Net:
    """Keep the half of each stage's conv1 filters with the largest L1 norm (conv2 keeps its width)."""
    student = copy.deepcopy(teacher)
    for name in STAGES:
        st = getattr(student, name)
        keep = st.conv1.weight.abs().sum((1, 2, 3)).argsort(descending=True)[: st.conv1.out_channels // 2]
        keep = keep.sort().values
        conv1 = nn.Conv2d(st.conv1.in_channels, len(keep), 3, stride=st.conv1.stride, padding=1, bias=False)
        conv1.weight.data = st.conv1.weight.data[keep].clone()
        bn1 = nn.BatchNorm2d(len(keep))
        for a in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn1, a).data = getattr(st.bn1, a).data[keep].clone()
        conv2 = nn.Conv2d(len(keep), st.conv2.out_channels, 3, padding=1, bias=False)
        conv2.weight.data = st.conv2.weight.data[:, keep].clone()
        st.conv1, st.bn1, st.conv2 = conv1, bn1, conv2
    return student.eval()


# ---------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=METHODS, nargs="+", help="per-seed tables of these methods")
    ap.add_argument("--table", action="store_true", help="the README table (every method unless --method)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30, help="E: the student-alone budget (see the docstring)")
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--shots", type=int, default=10, help="fskd: unlabeled images per class")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these tiny convs)")
    args = ap.parse_args()
    if not args.table and not args.method:
        ap.error("give --table or --method")
    methods = args.method or list(METHODS)
    deterministic(0, args.threads)
    t_start = time.time()

    res = {m: [] for m in ["teacher", "student alone", "pruned", "pruned, CE fine-tune", *methods,
                           "fskd joint"]}
    sizes = {}
    for seed in range(args.seeds):
        x_tr, y_tr, x_te, y_te = load(seed)
        data = loader(x_tr, y_tr, seed)
        torch.manual_seed(seed)
        teacher = teacher_net()
        run(Plain(teacher), data, args.teacher_epochs, seed)
        teacher.eval()
        res["teacher"].append(acc(teacher, x_te, y_te))
        sizes["teacher"] = n_params(teacher)

        torch.manual_seed(1000 + seed)
        init = student_net()
        sizes["student"] = n_params(init)
        if any(m != "fskd" for m in methods):
            alone = copy.deepcopy(init)
            run(Plain(alone), data, args.epochs, seed)
            res["student alone"].append(acc(alone, x_te, y_te))
        for method in methods:
            if method == "fskd":
                pruned = prune(teacher)
                res["pruned"].append(acc(pruned, x_te, y_te))
                idx = few(y_tr, args.shots, seed)
                tuned = train_ce(copy.deepcopy(pruned), x_tr[idx], y_tr[idx], 150, lr=1e-3, seed=seed, batch=32)
                res["pruned, CE fine-tune"].append(acc(tuned, x_te, y_te))
                blocks = [(f"{s}.conv2", f"{s}.bn2", f"{s}.bn2") for s in STAGES]
                for sched, row in (("greedy", "fskd"), ("joint", "fskd joint")):
                    d = train.FSKD(pruned, teacher, blocks, schedule=sched)
                    train.fit(d, [x_tr[idx]], epochs=1, progress=False)  # closed form, no optimiser
                    res[row].append(acc(d.student, x_te, y_te))
                sizes["pruned"] = n_params(pruned)
                continue
            student = copy.deepcopy(init)
            sizes[method] = distill(method, student, teacher, data, args.epochs, seed, sample=x_tr[:2])
            res[method].append(acc(student, x_te, y_te))
    print(f"({time.time() - t_start:.0f} s on {torch.get_num_threads()} CPU thread(s))", file=sys.stderr)

    def ms(vals):
        return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}"

    def verdict(mine, base):
        gain = np.mean(mine) - np.mean(base)
        wins = sum(a > b for a, b in zip(mine, base))
        return f"{gain:+.1f} ({'better' if gain > 0 else 'not better'}; higher on {wins} of {len(mine)} seeds)"

    seeds = f"seeds 0..{args.seeds - 1}" if args.seeds > 1 else "seed 0"
    cmd = "python examples/digits.py " + ("--table" if args.table else "--method " + " ".join(methods))
    if args.method and args.table:
        cmd += " --method " + " ".join(methods)
    for flag, value, default in (("--seeds", args.seeds, 3), ("--epochs", args.epochs, 30),
                                 ("--teacher-epochs", args.teacher_epochs, 20), ("--shots", args.shots, 10),
                                 ("--threads", args.threads, 1)):
        if value != default:
            cmd += f" {flag} {value}"
    print(f"`{cmd}` ({seeds}: split, initialisation and order; {environment()})\n")
    print(f"sklearn digits (8x8, 1257 train / 540 test images). Teacher {sizes['teacher']} parameters, "
          f"{ms(res['teacher'])} %; student (the teacher's family, 4x thinner) {sizes['student']} parameters; "
          f"student alone {args.epochs} epochs. Test accuracy (%), mean ± std over the seeds:\n")
    if not args.table:
        shown = [r for r in res if res[r]]
        print("| | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean ± std |")
        print("|---" * (args.seeds + 2) + "|")
        for name in shown:
            print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in res[name]) + f" | {ms(res[name])} |")
        return
    print("| method | epochs | student alone | with the method | gain |")
    print("|---|---|---|---|---|")
    labels = {"kd": "kd", "fitnets": "fitnets (two-stage)", "reviewkd": "reviewkd",
              "sskd": "sskd (stage by stage, converged head)", "sskd-all": "sskd, all stages at once (ablation)"}
    for m in methods:
        if m == "fskd":
            base = f"{ms(res['pruned, CE fine-tune'])} (CE fine-tune with labels; {ms(res['pruned'])} untrained)"
            for row, name, how in (("fskd", "fskd greedy", "closed form"),
                                   ("fskd joint", "fskd joint", "closed form + L-BFGS on the Q's")):
                print(f"| {name} (pruned teacher, {sizes['pruned']} parameters, {args.shots} unlabelled images "
                      f"per class) | {how} | {base} | {ms(res[row])} | "
                      f"{verdict(res[row], res['pruned, CE fine-tune'])} |")
            continue
        spent = f"{sizes[m]} + head (L-BFGS)" if m.startswith("sskd") else f"{sizes[m]}"
        print(f"| {labels[m]} | {spent} | {ms(res['student alone'])} | {ms(res[m])} | "
              f"{verdict(res[m], res['student alone'])} |")


if __name__ == "__main__":
    main()
