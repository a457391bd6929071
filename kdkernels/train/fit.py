r"""``fit``: a small training loop for any distiller. Not a framework.

Each epoch: ``set_epoch``, ``train()``, then for every batch forward ->
``sum(losses.values())`` -> backward (through a GradScaler for fp16) ->
optional gradient clipping -> optimiser step; per-epoch metrics; optional
evaluation of the student; an optional checkpoint that :func:`fit` can resume
from with the same next-step losses.

The distillers need none of this: in a hand-written loop, Lightning or
accelerate, call ``logits, losses = distiller(images, labels)`` and
``sum(losses.values()).backward()``, plus ``distiller.set_epoch(epoch, epochs)``
once per epoch for the methods that schedule a weight.
"""
from __future__ import annotations

import os
import random
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from . import _ddp
from .base import device_of, logits_of
from .fskd import FSKD
from .lm import CausalLM, CausalLMKD

History = List[Dict[str, float]]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _amp_dtype(amp, device: torch.device) -> Optional[torch.dtype]:
    if amp in (None, False):
        return None
    if amp is True or amp == "auto":
        amp = "bf16" if device.type == "cpu" else "fp16"
    if amp in (torch.bfloat16, torch.float16):
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, True, 'bf16' or 'fp16', got {amp!r}")
    return AMP_DTYPES[amp]


def _split(batch, device: torch.device):
    if isinstance(batch, (tuple, list)):
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
    else:
        images, labels = batch, None
    images = images.to(device, non_blocking=True)
    if isinstance(labels, torch.Tensor):
        labels = labels.to(device, non_blocking=True)
    return images, labels


def _rng_state(loader) -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    for where, obj in (("loader", loader), ("sampler", getattr(loader, "sampler", None))):
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator):
            state[f"{where}_generator"] = gen.get_state()
    return state


def _set_rng_state(state: Dict[str, Any], loader) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    for where, obj in (("loader", loader), ("sampler", getattr(loader, "sampler", None))):
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and f"{where}_generator" in state:
            gen.set_state(state[f"{where}_generator"])


def _progress(iterable, *, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


def _log(msg: str, enabled: bool) -> None:
    if not enabled:
        return
    try:
        from tqdm.auto import tqdm

        tqdm.write(msg)
    except ImportError:
        print(msg, flush=True)


def _hits(logits: torch.Tensor, labels: torch.Tensor, causal_lm: bool, ignore_index: int):
    """(right, scored) of one batch, as device tensors (no host sync)."""
    if causal_lm:
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"evaluate: a causal LM needs logits (B, L, V) and labels (B, L), got logits "
                             f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
        # CausalLMKD's shift: position i is scored against label i + 1 (the last position has no target)
        target = labels[:, 1:]
        keep = target != ignore_index
        right = ((logits[:, :-1].argmax(-1) == target) & keep).sum()
        return right, keep.sum()
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"evaluate: top-1 classification needs logits (B, C) and labels (B,), got logits "
                         f"{tuple(logits.shape)} and labels {tuple(labels.shape)} (for a causal LM's (B, L, V) "
                         "logits pass causal_lm=True)")
    return (logits.argmax(1) == labels).sum(), labels.numel()


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: Optional[torch.device] = None, amp=None,
             causal_lm: Optional[bool] = None, ignore_index: int = -100) -> float:
    """Accuracy (%) of ``model`` (e.g. ``distiller.student``) over ``loader``, summed over ranks.

    Image classification (logits (B, C), labels (B,)): top-1 accuracy. A causal LM
    (``causal_lm=True``; by default when ``model`` is a :class:`~kdkernels.train.CausalLM`,
    as :class:`~kdkernels.train.CausalLMKD`'s student is): next-token accuracy, the share of
    positions i whose argmax over the (B, L, V) logits equals label i + 1 (labels (B, L),
    the input ids when the batch has none), over the targets that are not ``ignore_index``,
    the shift and the exclusion of CausalLMKD's loss.
    """
    device = torch.device(device) if device is not None else (device_of(model) or torch.device("cpu"))
    dtype = _amp_dtype(amp, device)
    if causal_lm is None:
        causal_lm = isinstance(model, CausalLM)
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for batch in loader:
            images, labels = _split(batch, device)
            if labels is None and causal_lm:
                labels = images  # a causal LM's labels default to its input ids
            ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
            with ctx:
                logits = logits_of(model(images))
            right, scored = _hits(logits, labels, causal_lm, ignore_index)
            correct += right
            total += scored
    finally:
        model.train(was)
    _ddp.all_reduce_sum(correct)
    _ddp.all_reduce_sum(total)
    return 100.0 * float(correct / total.clamp_min(1))


def fit(distiller: nn.Module, loader, *, epochs: int, optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler=None, amp: Union[None, bool, str] = None, device=None, grad_clip: Optional[float] = None,
        checkpoint: Optional[str] = None, resume: Union[bool, str] = False, eval_loader=None,
        scheduler_step: str = "epoch", progress: bool = True,
        on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> History:
    r"""Train ``distiller`` for ``epochs`` epochs over ``loader``; returns per-epoch metrics.

    Args:
        distiller: a distiller of this package (or any module whose
            ``forward(images, labels)`` returns ``(logits, losses)``), optionally already wrapped in
            ``DistributedDataParallel``; when ``torch.distributed`` runs with
            several processes and it is not wrapped, ``fit`` wraps it (after
            moving it to ``device``). Call ``fit`` once per stage for the
            staged methods, after ``set_stage``. An :class:`FSKD` distiller is
            not trained: ``fit`` calls its ``distill(loader)``.
        loader: batches of ``(images, labels)`` (a ``DistributedSampler`` gets
            ``set_epoch`` every epoch).
        epochs: the last epoch number (epochs are 1-based).
        optimizer: built over ``distiller.parameters()`` (or
            ``distiller.trainable_parameters()``).
        scheduler: stepped once per epoch (``scheduler_step="epoch"``) or per
            batch (``"step"``).
        amp: ``None``/``False``, ``True`` (bf16 on CPU, fp16 on CUDA), ``"bf16"``
            or ``"fp16"`` (with a GradScaler; on CPU too, though bf16 is faster there).
        device: where to train; default: where the distiller's parameters are.
        grad_clip: clip the gradients' total 2-norm to this value.
        checkpoint: a file written (atomically, by rank 0) after every epoch:
            the distiller's ``state_dict`` (no teacher), optimiser, scheduler,
            scaler, history and RNG states.
        resume: ``True`` to continue from ``checkpoint`` when it exists, or a path.
        eval_loader: evaluate the student's accuracy after every epoch (:func:`evaluate`:
            top-1; for :class:`~kdkernels.train.CausalLMKD`, next-token accuracy with its
            ``ignore_index``).
        progress: a tqdm bar and one line per epoch (rank 0 only).
        on_step: called after every optimiser step with ``{"epoch", "step",
            "loss", "losses"}`` (detached tensors; no host sync is forced).

    Returns:
        a list with one dict per epoch: ``epoch``, ``loss`` and every loss term
        (sample-weighted means over the epoch and the ranks), ``acc`` (train
        top-1 when the distiller returned logits), ``val_acc`` (with
        ``eval_loader``), ``lr`` and ``time`` (seconds).
    """
    core = _ddp.unwrap(distiller)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if scheduler_step not in ("epoch", "step"):
        raise ValueError(f"scheduler_step must be 'epoch' or 'step', got {scheduler_step!r}")
    device = torch.device(device) if device is not None else (device_of(core) or torch.device("cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    main = _ddp.rank() == 0
    show = progress and main

    if isinstance(core, FSKD):
        t0 = time.time()
        core.to(device)
        core.distill(loader, progress=show)
        row: Dict[str, float] = {"epoch": 1, "time": time.time() - t0}
        if eval_loader is not None:
            row["val_acc"] = evaluate(core.student, eval_loader, device=device)
        return [row]
    if optimizer is None:
        raise TypeError("fit needs an optimizer (built over distiller.parameters())")

    dtype = _amp_dtype(amp, device)
    if not isinstance(distiller, nn.parallel.DistributedDataParallel):
        core.to(device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    history: History = []
    start = 1
    resume_path = resume if isinstance(resume, (str, os.PathLike)) else (checkpoint if resume else None)
    if resume_path is not None and os.path.exists(resume_path):
        state = torch.load(resume_path, map_location=device, weights_only=False)
        core.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        history = list(state.get("history", []))
        start = int(state["epoch"]) + 1
        _set_rng_state(state["rng"], loader)
    model = _ddp.wrap(distiller, device)

    for epoch in range(start, epochs + 1):
        t0 = time.time()
        if hasattr(core, "set_epoch"):
            core.set_epoch(epoch, epochs)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        sums: Dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen = torch.zeros((), dtype=torch.float64, device=device)
        scored = torch.zeros((), dtype=torch.float64, device=device)
        total = len(loader) if hasattr(loader, "__len__") else None
        for step, batch in enumerate(_progress(loader, total=total, desc=f"epoch {epoch}/{epochs}",
                                               enabled=show)):
            images, labels = _split(batch, device)
            n = images.shape[0]
            ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
            with ctx:
                logits, losses = model(images, labels)
            if not losses:
                raise RuntimeError(f"{type(core).__name__} returned no loss terms")
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if grad_clip is not None:
                    scaler.unscale_(optimizer)
            else:
                loss.backward()
            if grad_clip is not None:
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None and scheduler_step == "step":
                scheduler.step()

            with torch.no_grad():
                for k, v in (("loss", loss), *losses.items()):
                    acc = sums.setdefault(k, torch.zeros((), dtype=torch.float64, device=device))
                    acc += v.detach().double() * n
                seen += n
                if logits is not None and isinstance(labels, torch.Tensor):
                    correct += (logits.argmax(1) == labels).sum()
                    scored += labels.numel()
            if on_step is not None:
                on_step({"epoch": epoch, "step": step, "loss": loss.detach(),
                         "losses": {k: v.detach() for k, v in losses.items()}})
        if scheduler is not None and scheduler_step == "epoch":
            scheduler.step()

        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys] + [seen, correct, scored])
        _ddp.all_reduce_sum(packed)
        vals = packed.tolist()
        n_seen, n_correct, n_scored = vals[-3:]
        row = {"epoch": epoch}
        for k, v in zip(keys, vals):
            row[k] = v / max(n_seen, 1)
        if n_scored:
            row["acc"] = 100.0 * n_correct / n_scored
        if eval_loader is not None:
            row["val_acc"] = evaluate(getattr(core, "student", core), eval_loader, device=device, amp=amp,
                                      ignore_index=core.ignore_index if isinstance(core, CausalLMKD) else -100)
        row["lr"] = float(optimizer.param_groups[0]["lr"])
        row["time"] = time.time() - t0
        history.append(row)
        _log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), show)

        if checkpoint is not None:
            if main:
                state = {"distiller": core.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "epoch": epoch, "history": history, "rng": _rng_state(loader)}
                tmp = f"{checkpoint}.tmp"
                torch.save(state, tmp)
                os.replace(tmp, checkpoint)
            _ddp.barrier(device)
    return history
