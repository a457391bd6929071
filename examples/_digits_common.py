"""What both digits examples share: few-shot sampling, a plain CE training loop, parameter counts."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def few(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` random samples of every class of the 10 digits."""
    g = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(y == c).flatten() for c in range(10)]
    return torch.cat([p[torch.randperm(len(p), generator=g)[:per_class]] for p in picks])


def train_ce(model, x, y, steps: int, lr: float, seed: int, batch: int):
    """Adam on cross-entropy for ``steps`` mini-batches (reshuffled every epoch); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    done = 0
    while done < steps:
        for idx in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model.eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def deterministic(seed: int, threads: int) -> None:
    """Fix what decides a run's numbers on a CPU: the thread count (reduction order in
    the kernels), deterministic algorithms where PyTorch has a choice, and every RNG."""
    import random

    import numpy as np

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def environment() -> str:
    """One line naming what the numbers depend on: versions, threads and the CPU model."""
    import platform

    import numpy as np
    import sklearn

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"torch {torch.__version__}, numpy {np.__version__}, scikit-learn {sklearn.__version__}, "
            f"Python {platform.python_version()}, {torch.get_num_threads()} thread(s), CPU {cpu}")
