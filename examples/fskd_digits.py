"""FSKD on real data: scikit-learn's bundled 8x8 digits (no download).

1. Train a small VGG-like CNN teacher (six 3x3 conv+BN+ReLU layers).
2. Make a student by pruning 50% of the filters of conv1, conv3 and conv5 by
   their L1 norm (the paper's VGG setting): the next conv loses the matching
   input channels, so conv2/conv4/conv6 keep the teacher's output width.
3. Recover the student with FSKD from k = 10, 50, 100 unlabeled samples per
   class: a 1x1 conv after bn2, bn4 and bn6 fitted to the teacher's outputs
   there, merged into conv2/4/6 (the greedy schedule, block by block, and the
   joint one: the greedy Q's refined together, end to end).
4. Baseline: fine-tune the pruned student with cross-entropy on the same
   samples, this time with their labels (Adam, 150 steps of batch 32).

Prints a markdown table of test accuracies (mean +- std over 3 draws of the
few samples). Deterministic for a given ``--seed`` and thread count (split,
initialisation, sample draws, order; deterministic algorithms): the output
names the seed and the environment, and ``--table`` prints exactly the block
the README shows (the wall time goes to stderr).

    python examples/fskd_digits.py --table
"""
from __future__ import annotations

import argparse
import copy
import time
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from kdkernels import fskd

import sys

from _digits_common import deterministic, environment, few, n_params, train_ce

WIDTHS = (16, 16, 32, 32, 64, 64)
PRUNED = (1, 3, 5)  # conv i loses half its filters; conv i+1 is aligned
BLOCKS = [(f"conv{i + 1}", f"bn{i + 1}", f"bn{i + 1}") for i in PRUNED]


def make_net(widths=WIDTHS) -> nn.Sequential:
    layers, cin = [], 1
    for i, w in enumerate(widths, 1):
        layers += [(f"conv{i}", nn.Conv2d(cin, w, 3, padding=1, bias=False)),
                   (f"bn{i}", nn.BatchNorm2d(w)), (f"relu{i}", nn.ReLU(inplace=True))]
        if i in (2, 4):
            layers.append((f"pool{i}", nn.MaxPool2d(2)))  # 8x8 -> 4x4 -> 2x2
        cin = w
    layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(cin, 10))]
    return nn.Sequential(OrderedDict(layers))


def load(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed, stratify=y)
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def prune(teacher: nn.Sequential) -> nn.Sequential:
    """Keep the half of conv_i's filters with the largest L1 norm, for i in PRUNED."""
    student = copy.deepcopy(teacher)
    for i in PRUNED:
        conv, bn, nxt = (getattr(student, f"{n}{j}") for n, j in (("conv", i), ("bn", i), ("conv", i + 1)))
        keep = conv.weight.abs().sum((1, 2, 3)).argsort(descending=True)[: conv.out_channels // 2].sort().values
        new_conv = nn.Conv2d(conv.in_channels, len(keep), 3, padding=1, bias=False)
        new_conv.weight.data = conv.weight.data[keep].clone()
        new_bn = nn.BatchNorm2d(len(keep))
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, name).data = getattr(bn, name).data[keep].clone()
        new_next = nn.Conv2d(len(keep), nxt.out_channels, 3, padding=1, bias=False)
        new_next.weight.data = nxt.weight.data[:, keep].clone()
        setattr(student, f"conv{i}", new_conv)
        setattr(student, f"bn{i}", new_bn)
        setattr(student, f"conv{i + 1}", new_next)
    return student.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shots", type=int, nargs="+", default=[10, 50, 100], help="samples per class")
    ap.add_argument("--draws", type=int, default=3, help="random draws of the few samples")
    ap.add_argument("--epochs", type=int, default=15, help="teacher training epochs")
    ap.add_argument("--finetune-steps", type=int, default=150,
                    help="baseline fine-tuning steps (batch 32), the same budget for every k")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these tiny convs)")
    ap.add_argument("--seed", type=int, default=0, help="split, teacher initialisation and order")
    ap.add_argument("--table", action="store_true", help="print only the README block (seed, environment, table)")
    args = ap.parse_args()
    t0 = time.time()
    deterministic(args.seed, args.threads)
    seed = args.seed

    x_tr, y_tr, x_te, y_te = load(seed=seed)
    teacher = train_ce(make_net(), x_tr, y_tr, args.epochs * -(-len(y_tr) // 64), 3e-3, seed=seed, batch=64)
    student = prune(teacher)
    acc_t, acc_s = accuracy(teacher, x_te, y_te), accuracy(student, x_te, y_te)

    rows = {"FSKD greedy (no labels)": {}, "FSKD joint (no labels)": {},
            "fine-tune with CE on the same samples (labels)": {}}
    for k in args.shots:
        res = {name: [] for name in rows}
        for draw in range(args.draws):
            idx = few(y_tr, k, seed=1000 * k + draw + 100 * seed)
            batches = list(x_tr[idx].split(64))  # unlabeled inputs only
            for sched in ("greedy", "joint"):
                out = fskd.distill(student, teacher, BLOCKS, batches, schedule=sched, progress=False)
                res[f"FSKD {sched} (no labels)"].append(accuracy(out, x_te, y_te))
            tuned = train_ce(copy.deepcopy(student), x_tr[idx], y_tr[idx], args.finetune_steps, 1e-3,
                             seed=draw + 100 * seed, batch=32)
            res["fine-tune with CE on the same samples (labels)"].append(accuracy(tuned, x_te, y_te))
        for name in rows:
            rows[name][k] = (np.mean(res[name]), np.std(res[name]))
    merged = fskd.distill(student, teacher, BLOCKS, [x_tr[:64]], progress=False)

    if not args.table:
        print(f"FSKD on sklearn digits (8x8; {len(y_tr)} train / {len(y_te)} test images). "
              f"Teacher: conv widths {'-'.join(map(str, WIDTHS))}; student: 50% of the filters of "
              f"conv{', conv'.join(map(str, PRUNED))} pruned by L1 norm.")
        print(f"Parameters: teacher {n_params(teacher)}, pruned student {n_params(student)}, "
              f"after FSKD {n_params(merged)}. Test accuracy (%), mean +- std over {args.draws} draws "
              f"of the samples:\n")
    cmd = "python examples/fskd_digits.py --table" + (f" --seed {seed}" if seed else "")
    print(f"`{cmd}` (seed {seed}; {environment()}):\n")
    head = "| method | " + " | ".join(f"{k}/class" for k in args.shots) + " |"
    print(head)
    print("|" + "---|" * (len(args.shots) + 1))
    print("| teacher | " + " | ".join(f"{acc_t:.1f}" for _ in args.shots) + " |")
    print("| pruned student | " + " | ".join(f"{acc_s:.1f}" for _ in args.shots) + " |")
    for name, by_k in rows.items():
        print(f"| {name} | " + " | ".join(f"{by_k[k][0]:.1f} +- {by_k[k][1]:.1f}" for k in args.shots) + " |")
    print(f"({time.time() - t0:.0f} s on {torch.get_num_threads()} CPU thread(s))", file=sys.stderr)


if __name__ == "__main__":
    main()
