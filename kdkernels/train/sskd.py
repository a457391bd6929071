r"""SSKD: stage-by-stage knowledge distillation (docs/spec.md §6).

Stage i (1-based, shallow to deep) trains the student to mimic the teacher's
stage-i features with an L2 feature loss, ``mean((A_i s_i - t_i)^2)``, through
:class:`kdkernels.nn.HintLoss`: the fused :func:`kdkernels.hint_loss` when
``A_i`` is a trainable 1x1 adapter (the widths differ), the plain mean-squared
error when the widths agree (no adapter). The student's forward pass stops at
its stage-i tap, so deeper stages neither train nor update BN statistics.

* ``freeze_previous=True``: only stage i's own parameters (those stage i's
  output depends on and stage i-1's does not) and adapter i train; earlier
  stages are frozen and kept in eval mode.
* ``freeze_previous=False``: stages 1..i all train.

Then ``set_stage("head")``: the backbone is frozen (and in eval mode), only
the task head trains, on the task loss, to convergence. :meth:`SSKD.fit_head`
does that step in one call: with the backbone frozen the head is a classifier
on fixed features, so it caches the head module's inputs once and minimises
mean cross-entropy + weight_decay/2 ||W||^2 (W: the head's weight matrices; the
small ridge keeps the optimum finite on separable features) by full-batch
L-BFGS until the gradient vanishes, instead of a few epochs of SGD from
scratch. There is no KD weight to tune.

``set_stage("all")`` is the paper's ablation baseline: every stage at once, the
stage losses summed, in one training run (the whole backbone and every adapter
train).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from .base import (Distiller, Losses, check_real, device_of, execution_stage, logits_of, nn_module, reachable_params,
                   sample_input)
from .taps import FeatureTaps, eval_mode, shape_4d

Stage = Union[int, str]


class SSKD(Distiller):
    r"""Stage-by-stage feature mimicking, then head-only training.

    Args:
        student, teacher: the networks.
        student_layers, teacher_layers: the stage outputs to match, shallow to
            deep, e.g. ``["layer1", "layer2", "layer3"]`` for both.
        sample: a batch (or ``(inputs, labels)``) for the eval-mode dry run.
        freeze_previous: freeze the earlier stages while training stage i.
        head: module names of the task head (e.g. ``["fc"]``); default: every
            student parameter the last stage's output does not depend on.
        feature_weight: multiplier of the feature loss.

    Example::

        distiller = SSKD(student, teacher, ["layer1", "layer2", "layer3"],
                         ["layer1", "layer2", "layer3"], sample=images[:2])
        for stage in [*range(1, distiller.num_stages + 1), "head"]:
            distiller.set_stage(stage)
            fit(distiller, loader, epochs=10, optimizer=Adam(distiller.trainable_parameters()))

    ``forward`` returns ``(None, {"feat": ...})`` in stages 1..K and
    ``(logits, {"ce": ...})`` in the head stage. Parameters outside the current
    stage get ``requires_grad=False``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_layers: Sequence[str],
                 teacher_layers: Sequence[str], sample, *, freeze_previous: bool = True,
                 head: Optional[Sequence[str]] = None, feature_weight: float = 1.0):
        super().__init__(student, teacher)
        student_layers, teacher_layers = list(student_layers), list(teacher_layers)
        if not student_layers or len(student_layers) != len(teacher_layers):
            raise ValueError(f"student_layers and teacher_layers must be non-empty and of equal length, "
                             f"got {len(student_layers)} and {len(teacher_layers)}")
        self.freeze_previous = bool(freeze_previous)
        self.feature_weight = check_real(feature_weight, "feature_weight")
        self.num_stages = len(student_layers)
        self.student_layers, self.teacher_layers = student_layers, teacher_layers

        x = sample_input(sample)
        s_dev, t_dev = device_of(student), device_of(teacher)
        xs = x.to(s_dev) if s_dev else x
        xt = x.to(t_dev) if t_dev else x
        self._s_taps = [FeatureTaps(student, [n]) for n in student_layers]
        self._t_taps = [FeatureTaps(teacher, [n]) for n in teacher_layers]
        self._s_all = FeatureTaps(student, student_layers)  # stage "all"
        self._t_all = FeatureTaps(teacher, teacher_layers)
        self._s_all.probe(xs)
        self._t_all.probe(xt)
        adapters = {}
        self._widths: List[Tuple[int, int]] = []
        for i, (st, tt) in enumerate(zip(self._s_taps, self._t_taps)):
            (s_shape,), (t_shape,) = st.probe(xs), tt.probe(xt)
            cs, hs, ws = shape_4d(s_shape)
            ct, ht, wt = shape_4d(t_shape)
            if (hs, ws) != (ht, wt):
                raise ValueError(f"SSKD stage {i + 1}: student {st.names[0]!r} is {tuple(s_shape)} and teacher "
                                 f"{tt.names[0]!r} is {tuple(t_shape)}; a 1x1 adapter needs equal spatial sizes")
            if cs != ct:
                adapters[str(i)] = nn.Conv2d(cs, ct, 1, bias=True)
            self._widths.append((cs, ct))
        self.adapters = nn.ModuleDict(adapters)
        self.criterion = nn_module("HintLoss")()
        if s_dev is not None:
            self.adapters.to(s_dev)
        self._remember_trainable()

        # which parameters each stage owns, and where buffer-only modules run
        self._reach: List[Set[str]] = [
            {f"student.{n}" for n in reachable_params(student, taps, xs)[0]} for taps in self._s_taps]
        all_taps = FeatureTaps(student, student_layers)
        try:
            all_taps.probe(xs)
            self._order = {f"student.{n}" if n else "student": k
                           for n, k in execution_stage(student, all_taps, xs).items()}
        finally:
            all_taps.remove()
        student_params = {n for n, _ in self.named_parameters() if n.startswith("student.")}
        if head is None:
            self._head = student_params - self._reach[-1]
        else:
            names = [head] if isinstance(head, str) else list(head)
            mods = dict(student.named_modules())
            self._head = set()
            for h in names:
                if h not in mods:
                    raise ValueError(f"head module {h!r} is not a submodule of the student")
                self._head |= {f"student.{h}.{p}" for p, _ in mods[h].named_parameters()}
        if not self._head:
            raise ValueError("SSKD found no head parameters: name the head modules with head=[...]")
        self.set_stage(1)

    # ---------------------------------------------------------------- stages
    def _buffer_only(self, below: int) -> List[str]:
        """Buffer-only student modules that start before stage ``below + 1`` (0-based ``below``)."""
        out = []
        for name, m in self.student.named_modules():
            full = f"student.{name}" if name else "student"
            if (not any(True for _ in m.parameters(recurse=False)) and any(True for _ in m.buffers(recurse=False))
                    and self._order.get(full, self.num_stages) < below):
                out.append(full)
        return out

    def set_stage(self, stage: Stage) -> None:
        """``1..num_stages`` (feature mimicking), ``"all"`` (every stage at once, the losses
        summed) or ``"head"`` (task head only)."""
        if stage == "head":
            trainable = set(self._head)
            buffers = self._buffer_only(self.num_stages)
        elif stage == "all":
            trainable = set(self._reach[-1])
            trainable |= {f"adapters.{n}" for n, _ in self.adapters.named_parameters()}
            buffers = []
        elif isinstance(stage, int) and not isinstance(stage, bool) and 1 <= stage <= self.num_stages:
            i = stage - 1
            trainable = set(self._reach[i])
            buffers: List[str] = []
            if self.freeze_previous and i > 0:
                trainable -= self._reach[i - 1]
                buffers = self._buffer_only(i)
            trainable |= {f"adapters.{i}.{p}" for p, _ in self.adapters[str(i)].named_parameters()} \
                if str(i) in self.adapters else set()
        else:
            raise ValueError(f"SSKD stage must be 1..{self.num_stages}, 'all' or 'head', got {stage!r}")
        self.stage = stage
        self._train_only(trainable, self._frozen_by_params(trainable, buffers))

    # --------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[torch.Tensor], Losses]:
        if self.stage == "head":
            logits = logits_of(self.student(images))
            ce = self.task_loss(logits, labels)
            return logits, ({} if ce is None else {"ce": ce})
        if self.stage == "all":
            _, fss = self._s_all(images, stop=True)
            _, fts = self.teacher_forward(self._t_all, images, stop=True)
            loss = sum(self._stage_loss(i, fs, ft) for i, (fs, ft) in enumerate(zip(fss, fts)))
            return None, {"feat": self.feature_weight * loss}
        i = self.stage - 1
        _, (fs,) = self._s_taps[i](images, stop=True)
        _, (ft,) = self.teacher_forward(self._t_taps[i], images, stop=True)
        return None, {"feat": self.feature_weight * self._stage_loss(i, fs, ft)}

    def _stage_loss(self, i: int, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        fs = fs if fs.dim() == 4 else fs.view(fs.shape[0], fs.shape[1], 1, 1)
        ft = ft if ft.dim() == 4 else ft.view(ft.shape[0], ft.shape[1], 1, 1)
        adapter = self.adapters[str(i)] if str(i) in self.adapters else None
        # nn.HintLoss: the fused kdkernels.hint_loss through the 1x1 adapter, plain MSE without one
        return self.criterion(fs, ft.to(fs.dtype), adapter)

    # ------------------------------------------------------------------ head
    def fit_head(self, batches, *, weight_decay: float = 1e-4, max_iter: int = 500,
                 tolerance: float = 1e-7) -> dict:
        r"""Train the task head to convergence on the frozen backbone (stage ``"head"``).

        Minimises mean CE(head(f), y) + weight_decay / 2 * sum ||W||^2 over every
        ``(inputs, labels)`` batch at once (W: head parameters with 2+ dims) by
        full-batch L-BFGS (strong Wolfe), until the largest gradient entry is below
        ``tolerance`` or ``max_iter`` iterations. When the head is one module (e.g.
        ``fc``) its inputs are computed once, in eval mode, and cached; otherwise
        every evaluation runs the whole (frozen, eval-mode) student.

        Returns ``{"loss": final objective, "iterations": n, "converged": bool}``.
        """
        weight_decay = check_real(weight_decay, "weight_decay")
        self.set_stage("head")
        params = self.trainable_parameters()
        decayed = [p for p in params if p.dim() >= 2]
        owners = {n.rsplit(".", 1)[0] for n, p in self.named_parameters() if p.requires_grad}
        mods = dict(self.named_modules())
        head = mods[next(iter(owners))] if len(owners) == 1 else None
        xs, ys = [], []
        with eval_mode(self.student), torch.no_grad():
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError("fit_head: batches must yield (inputs, labels) pairs")
                x, y = batch[0], batch[1]
                dev = device_of(self.student)
                x = x.to(dev) if dev is not None else x
                if head is not None:
                    cache: List[torch.Tensor] = []
                    handle = head.register_forward_pre_hook(lambda m, args: cache.append(args[0].detach()))
                    try:
                        self.student(x)
                    finally:
                        handle.remove()
                    if len(cache) != 1:
                        head = None  # called more than once: not a plain head, run the student
                        xs = []
                    else:
                        x = cache[0]
                xs.append(x)
                ys.append(y.to(x.device))
        if not xs:
            raise ValueError("fit_head: batches is empty")
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        target = params
        if head is not None:  # cached features: optimise an fp64 copy (fp32 stalls short of the optimum)
            work = copy.deepcopy(head).to(torch.float64)
            x_all = x_all.to(torch.float64)
            params = [p for p in work.parameters() if p.requires_grad]
            decayed = [p for p in params if p.dim() >= 2]
            fn = work
        else:
            fn = lambda inp: logits_of(self.student(inp))  # noqa: E731

        def objective():
            loss = nn.functional.cross_entropy(fn(x_all), y_all)
            if weight_decay:
                loss = loss + 0.5 * weight_decay * sum(p.square().sum() for p in decayed)
            return loss

        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=50,
                                line_search_fn="strong_wolfe", tolerance_grad=tolerance, tolerance_change=0.0)

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        with eval_mode(self.student), torch.enable_grad():
            opt.step(closure)
            opt.zero_grad()
            loss = objective()
            loss.backward()
            worst = max(float(p.grad.abs().max()) for p in params)
        with torch.no_grad():
            for p, q in zip(params, target):
                p.grad = None
                if p is not q:
                    q.copy_(p.to(q.dtype))
        state = opt.state[opt._params[0]]
        return {"loss": float(loss.detach()), "iterations": int(state.get("n_iter", 0)),
                "converged": worst <= 10 * tolerance}
