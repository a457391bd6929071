r"""The few-sample pipeline: capture, solve, merge (docs/spec.md §5).

For each block (student conv, its BN or None, teacher module), the aligned
signal S is the output of the student BN (or of the conv when there is no BN),
i.e. before the nonlinearity, and the target T is the output of the teacher
module; both are (N, C, H, W) with equal C, H, W and are caught with forward
hooks. FSKD fits a 1x1 conv Q with Q S ~ T (:func:`solve`) and merges it into
the conv (:func:`absorb_into`: the weight in the conv, the BN turned into an
exact identity-plus-bias in eval mode), so the student keeps its class,
state_dict keys, parameter count and FLOPs.

Pruned students: a block given as ``(conv, bn, teacher, keep)`` is aligned to
the teacher's kept channels only, ``T[:, keep]`` (the official code's
``origin_output[:, mask]``), with ``keep`` a boolean mask over the teacher's
channels or an index of them.

Schedules:

* ``"greedy"`` (the paper's order): blocks one by one, in the order the student
  runs them; block k's S is computed with blocks < k already merged. One pass
  over the data per block, each stopped right after the block's point.
* ``"joint"`` (the paper's estimation of all added 1x1 layers together, end to
  end): the greedy solution, then the Q's alone are refined jointly through the
  corrected student by full-batch L-BFGS (``joint_steps`` iterations, strong
  Wolfe line search) on the same samples, minimising the sum of the blocks'
  relative losses

      J = sum_k ||S_k - T_k||^2 / ||T_k - mean(T_k)||^2

  where S_k already depends on the refined Q's of the blocks before k, so an
  early block may give up some of its own fit for the blocks after it. The
  student's weights stay frozen (eval mode); every refined Q is merged like a
  greedy one. J never ends above greedy's: the best Q's seen are kept, and
  greedy's are the first. The teacher's targets are kept in memory for the
  refinement (a few samples: that is the setting).

An "independent" schedule (every block fitted on the uncorrected student's
features, which the merged network never produces) is not FSKD's and compounds
the errors of the blocks before; asking for it raises.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .._checks import check_choice, check_real, shape_str
from ._hooks import Hooks, StopForward, find_module, first_tensor, replace_module
from ._progress import progress as progress_bar
from .merge import absorb, absorb_into, check_bn, plain_conv_class
from .solve import solve
from .stats import GramStats

SCHEDULES = ("greedy", "joint")
#: default L-BFGS iterations of the joint refinement
JOINT_STEPS = 50


@dataclass
class _Block:
    """One aligned point: resolved modules and the names to report."""

    conv_name: str
    bn_name: Optional[str]
    teacher_name: str
    conv: nn.Module
    bn: Optional[nn.Module]
    target: nn.Module
    keep: Optional[torch.Tensor] = None  # the teacher's kept channels (a pruned student), as an index

    def teacher_value(self, out) -> torch.Tensor:
        t = first_tensor(out, self.teacher_name)
        if self.keep is None:
            return t
        return t.index_select(1, self.keep.to(t.device))

    @property
    def point(self) -> nn.Module:
        return self.bn if self.bn is not None else self.conv

    @property
    def label(self) -> str:
        return f"block ({self.bn_name or self.conv_name!r} -> teacher {self.teacher_name!r})"


def distill(student: nn.Module, teacher: nn.Module, blocks: Sequence[tuple], batches: Iterable, *,
            schedule: str = "greedy", alpha: Optional[float] = None, num_samples: Optional[int] = None,
            inplace: bool = False, progress: bool = True, all_reduce: bool = False,
            keep_structure: bool = True, joint_steps: int = JOINT_STEPS) -> nn.Module:
    """Align student blocks to the teacher from a few unlabeled samples, and merge.

    Args:
        student, teacher: the networks (any devices; inputs are moved to each).
        blocks: ``(student_conv_name, student_bn_name_or_None, teacher_module_name)``
            triples, module names as in ``named_modules()``; for a pruned student, a
            fourth entry ``keep``: the teacher channels the student block kept, as a
            boolean mask over the teacher module's channels or an index (tensor or
            list of ints), one per student channel.
        batches: a re-iterable of input tensors (N, ...) or of tuples whose first
            element is the input (e.g. a DataLoader); a one-shot iterator is
            read into a list first.
        schedule: ``"greedy"`` or ``"joint"`` (module docstring).
        alpha: ``None`` (default): least squares, a ridge toward Q = I only where a
            block needs one; a float: explicit relative ridge (see :func:`solve`).
        num_samples: use only the first ``num_samples`` inputs of ``batches``.
        inplace: modify ``student`` itself instead of a deep copy (needed when the
            student holds tensors that cannot be deep-copied, e.g. cached features
            with an autograd graph).
        progress: show a progress bar over batches.
        all_reduce: sum the statistics over ``torch.distributed`` ranks before solving
            (and, for the joint refinement, the losses and gradients).
        keep_structure: True (default): merge with :func:`absorb_into`, so the student keeps
            its modules and state_dict keys and loads strictly into a fresh instance of its
            class; each aligned BN becomes ``x + b`` in eval mode and is left in eval mode
            (put back in train mode it normalises again). False: replace each conv by a new
            conv with bias and each BN by ``nn.Identity`` (:func:`absorb`; fewer layers,
            different keys).
        joint_steps: L-BFGS iterations of the joint refinement (0: greedy's Q's).

    Returns:
        the student with every Q merged.
        Both models run in eval mode under ``no_grad``; their train/eval flags
        are restored afterwards.

    Raises ``ValueError`` for unknown names, a point whose channels or spatial
    size differ from the teacher's, a module that is never (or more than once)
    called, or anything between the conv and its BN (e.g. a ReLU, also an
    in-place one) that would make the merge wrong.
    """
    for model, what in ((student, "student"), (teacher, "teacher")):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{what} must be an nn.Module, got {type(model).__name__}")
    check_schedule(schedule)
    if isinstance(joint_steps, bool) or not isinstance(joint_steps, int) or joint_steps < 0:
        raise ValueError(f"joint_steps must be an int >= 0, got {joint_steps!r}")
    alpha = None if alpha is None else check_real(alpha, "alpha", bound=">= 0")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be an int >= 1 or None, got {num_samples!r}")
    specs = _parse_blocks(blocks)
    data = _reiterable(batches)

    if not inplace:
        student = _copy_student(student)
    resolved = [_resolve(student, teacher, *spec) for spec in specs]
    modes: Dict[nn.Module, bool] = {m: m.training for m in (*student.modules(), *teacher.modules())}
    student.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            resolved = _probe(student, teacher, resolved, _first_input(data))
            for k, blk in enumerate(resolved):
                stats = _collect(student, teacher, [blk], data, num_samples, progress,
                                 f"fskd greedy {k + 1}/{len(resolved)}")
                _merge(student, [blk], stats, alpha, all_reduce, modes, keep_structure)
            if schedule == "joint" and joint_steps > 0:
                _joint(student, teacher, resolved, data, num_samples, joint_steps, progress, modes, all_reduce,
                       keep_structure)
    finally:
        for m in (*student.modules(), *teacher.modules()):
            if m in modes:
                m.training = modes[m]
    return student


# ------------------------------------------------------------------ arguments
def check_schedule(schedule) -> str:
    """``schedule`` must be one of SCHEDULES; the removed "independent" gets its own message."""
    if schedule == "independent":
        raise ValueError("schedule='independent' is not FSKD's (it fits every block on features the merged "
                         "student never produces, and compounds their errors): use 'greedy' (block by block) "
                         "or 'joint' (all blocks estimated together, end to end)")
    return check_choice(schedule, "schedule", SCHEDULES)


def _parse_blocks(blocks) -> List[tuple]:
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, (list, tuple)):
        raise TypeError("blocks must be a list of (student_conv, student_bn_or_None, teacher_module) "
                        f"tuples, got {type(blocks).__name__}")
    if not blocks:
        raise ValueError("blocks is empty: name at least one (student_conv, student_bn, teacher) triple")
    specs = []
    for i, b in enumerate(blocks):
        if not isinstance(b, (list, tuple)) or len(b) not in (3, 4):
            raise ValueError(f"blocks[{i}] must be a (student_conv, student_bn_or_None, "
                             f"teacher_module) triple, or a quadruple with the kept teacher channels, got {b!r}")
        specs.append(tuple(b) if len(b) == 4 else tuple(b) + (None,))
    convs = [s[0] for s in specs]
    for name in convs:
        if convs.count(name) > 1:
            raise ValueError(f"student conv {name!r} appears in more than one block")
    return specs


def _reiterable(batches):
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of input tensors, got {type(batches).__name__}") from None
    data = list(it) if it is batches else batches  # a one-shot iterator: keep what it yields
    if isinstance(data, (list, tuple)) and not data:
        raise ValueError("batches is empty")
    return data


def _resolve(student, teacher, conv_name, bn_name, teacher_name, keep=None) -> _Block:
    conv = find_module(student, conv_name, "student conv")
    plain_conv_class(conv)
    if conv.groups != 1:
        raise ValueError(f"student conv {conv_name!r} is grouped (groups={conv.groups}): a dense Q "
                         f"cannot be merged into it")
    bn = None
    if bn_name is not None:
        bn = find_module(student, bn_name, "student BN")
        check_bn(bn, conv.out_channels, name=f"student BN {bn_name!r}")
    target = find_module(teacher, teacher_name, "teacher module")
    return _Block(conv_name, bn_name, teacher_name, conv, bn, target, _as_keep(keep, teacher_name))


def _inputs(data, num_samples: Optional[int]):
    """Input tensors from ``data``, cut to ``num_samples`` samples in total."""
    seen = 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"batches must yield tensors or (input, ...) tuples, got {type(x).__name__}")
        if num_samples is not None:
            x = x[: num_samples - seen]
        seen += x.shape[0]
        yield x
        if num_samples is not None and seen >= num_samples:
            return


def _first_input(data) -> torch.Tensor:
    for x in _inputs(data, None):
        if x.shape[0] > 0:
            return x
    raise ValueError("batches holds no samples")


def _run(model: nn.Module, x: torch.Tensor) -> None:
    param = next(model.parameters(), None)
    try:
        model(x if param is None else x.to(param.device))
    except StopForward:
        pass


# --------------------------------------------------------------------- probe
def _probe(student, teacher, blocks: List[_Block], x: torch.Tensor) -> List[_Block]:
    """Run two samples through both models with checking hooks.

    Checks that every point and target runs exactly once, that each BN reads
    its conv's output unmodified, and that S and T agree in channels and size.
    Returns the blocks in the order the student runs them.
    """
    x = x[:2]
    calls: Dict[int, List[int]] = {}  # id(module) -> call positions
    shapes: Dict[int, torch.Size] = {}
    conv_out: Dict[int, tuple] = {}
    errors: List[str] = []
    clock = [0]

    def record(module, _inp, out):
        clock[0] += 1
        calls.setdefault(id(module), []).append(clock[0])
        shapes[id(module)] = first_tensor(out, type(module).__name__).shape

    with Hooks() as hooks:
        seen = set()
        for b in blocks:
            for m in (b.target, b.point):
                if id(m) not in seen:
                    seen.add(id(m))
                    hooks.forward(m, record)
            if b.bn is not None:
                hooks.forward(b.conv, _remember_output(conv_out))
                hooks.pre(b.bn, _check_bn_input(conv_out, b, errors))
        _run(teacher, x)
        _run(student, x)
    if errors:
        raise ValueError(errors[0])

    for b in blocks:
        for m, where in ((b.point, f"student module {b.bn_name or b.conv_name!r}"),
                         (b.target, f"teacher module {b.teacher_name!r}")):
            n = len(calls.get(id(m), []))
            if n != 1:
                raise ValueError(f"{where} ran {n} times in one forward pass; FSKD needs exactly one call")
        s, t = shapes[id(b.point)], shapes[id(b.target)]
        if b.keep is not None:
            t = _kept_shape(b, t, s)
        if len(s) != len(t) or s[1] != t[1] or s[2:] != t[2:]:
            raise ValueError(
                f"{b.label}: student output {shape_str(s)} and teacher output {shape_str(t)} "
                f"must have the same channels and spatial size")
    return sorted(blocks, key=lambda b: calls[id(b.point)][0])


def _remember_output(conv_out):
    def hook(module, _inp, out):
        conv_out[id(module)] = (out, out._version)
    return hook


def _check_bn_input(conv_out, block: _Block, errors: List[str]):
    def hook(_module, args):
        rec = conv_out.get(id(block.conv))
        inp = args[0] if args else None
        between = f"between conv {block.conv_name!r} and BN {block.bn_name!r}"
        if rec is None:
            errors.append(f"BN {block.bn_name!r} ran before conv {block.conv_name!r}: "
                          f"it does not normalise that conv's output")
        elif inp is not rec[0]:
            errors.append(f"something runs {between} (e.g. a ReLU or pooling): the BN does not read "
                          f"the conv's output, so Q cannot be merged into the conv")
        elif inp._version != rec[1]:
            errors.append(f"the conv output is modified in place {between} (e.g. ReLU(inplace=True)): "
                          f"Q cannot be merged through a nonlinearity")
    return hook


# ------------------------------------------------------------ collect, merge
def _collect(student, teacher, blocks: List[_Block], data, num_samples, show, desc) -> List[GramStats]:
    """One pass over the data: teacher targets, then student points, into GramStats."""
    stats = [GramStats(b.conv.out_channels) for b in blocks]
    targets: Dict[int, torch.Tensor] = {}
    count = {"t": 0, "s": 0}
    n = len(blocks)

    def teacher_hook(j, b):
        def hook(_m, _inp, out):
            targets[j] = b.teacher_value(out).detach().clone()
            count["t"] += 1
            if count["t"] == n:
                raise StopForward
        return hook

    def student_hook(j, b):
        def hook(_m, _inp, out):
            s = first_tensor(out, b.bn_name or b.conv_name)
            if j not in targets:
                raise ValueError(f"{b.label}: the teacher module did not run on this batch")
            t = targets[j].to(s.device)
            if s.shape != t.shape:
                raise ValueError(f"{b.label}: student output {shape_str(s)} and teacher output "
                                 f"{shape_str(t)} differ in this batch")
            stats[j].update(s, t)
            count["s"] += 1
            if count["s"] == n:
                raise StopForward
        return hook

    total = len(data) if num_samples is None and hasattr(data, "__len__") else None
    with Hooks() as hooks:
        for j, b in enumerate(blocks):
            hooks.forward(b.target, teacher_hook(j, b))
            hooks.forward(b.point, student_hook(j, b))
        for x in progress_bar(_inputs(data, num_samples), total=total, desc=desc, enabled=show):
            if x.shape[0] == 0:
                continue
            targets.clear()
            count["t"] = count["s"] = 0
            _run(teacher, x)
            _run(student, x)
    return stats


def _merge(student, blocks: List[_Block], stats: List[GramStats], alpha, all_reduce, modes,
           keep_structure: bool = True) -> None:
    if all_reduce:
        for st in stats:
            st.all_reduce()
    qs = solve(stats, alpha=alpha, prior="identity", names=[b.label for b in blocks])
    _absorb_all(student, blocks, qs, modes, keep_structure)


def _absorb_all(student, blocks: List[_Block], qs: List[torch.Tensor], modes, keep_structure: bool = True) -> None:
    """Merge Q_b into block b's conv (and BN) of ``student``, in place."""
    for b, q in zip(blocks, qs):
        if keep_structure:
            absorb_into(b.conv, q, b.bn)
            if b.bn is not None:
                modes[b.bn] = False  # an identity-plus-bias only in eval mode: left there
            continue
        merged = absorb(b.conv, q, b.bn)
        merged.training = modes.get(b.conv, False)
        modes[merged] = merged.training
        replace_module(student, b.conv_name, merged)
        if b.bn_name is not None:
            ident = nn.Identity()
            modes[ident] = modes.get(b.bn, False)
            replace_module(student, b.bn_name, ident)


# -------------------------------------------------- copies and pruned students
def _copy_student(student: nn.Module) -> nn.Module:
    """``copy.deepcopy(student)``, with an error that names the cause when it fails."""
    try:
        return copy.deepcopy(student)
    except RuntimeError as exc:
        held = [f"{name + '.' if name else ''}{attr} ({_held_what(value)})"
                for name, m in student.named_modules() for attr, value in vars(m).items()
                if not attr.startswith("_") and _holds_graph(value)]
        where = (f"it holds tensors with an autograd graph: {', '.join(held[:5])}"
                 if held else "copy.deepcopy failed")
        raise RuntimeError(
            f"fskd.distill cannot copy the student ({type(student).__name__}): {where}. Such tensors "
            f"are usually features cached by a forward pass run with grad (e.g. a model built with "
            f"save_feature=True). Clear them (or run that forward under torch.no_grad()), or pass "
            f"inplace=True to merge into the student itself. (deepcopy said: {exc})") from exc


def _holds_graph(value, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return value.grad_fn is not None
    if depth < 2 and isinstance(value, (list, tuple)):
        return any(_holds_graph(v, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict):
        return any(_holds_graph(v, depth + 1) for v in value.values())
    return False


def _held_what(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {shape_str(value)}"
    return f"a {type(value).__name__} of {len(value)}"


def _as_keep(keep, teacher_name: str) -> Optional[torch.Tensor]:
    """A pruned block's kept teacher channels as a 1-D int64 index (a mask stays a mask
    until its length can be checked against the teacher in :func:`_kept_shape`)."""
    if keep is None:
        return None
    where = f"the kept channels of teacher module {teacher_name!r}"
    if not isinstance(keep, torch.Tensor):
        try:
            keep = torch.as_tensor(keep)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{where} must be a boolean mask or an integer index, got "
                            f"{type(keep).__name__}") from None
    if keep.dim() != 1 or not (keep.dtype == torch.bool or not keep.is_floating_point() and not keep.is_complex()):
        raise TypeError(f"{where} must be a 1-D boolean mask or an integer index, got a "
                        f"{keep.dtype} tensor {shape_str(keep)}")
    return keep.detach().cpu() if keep.dtype == torch.bool else keep.detach().cpu().long()


def _kept_shape(block: _Block, t: torch.Size, s: torch.Size) -> torch.Size:
    """The teacher's output shape after keeping ``block.keep``; turns a mask into an index."""
    keep, channels = block.keep, t[1]
    where = f"{block.label}: the kept channels"
    if keep.dtype == torch.bool:
        if keep.numel() != channels:
            raise ValueError(f"{where} are a mask of {keep.numel()} entries but the teacher module has "
                             f"{channels} channels")
        keep = keep.nonzero().flatten()
    elif keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= channels):
        bad = int(keep.max()) if int(keep.max()) >= channels else int(keep.min())
        raise ValueError(f"{where}: index {bad} is out of range for the {channels} channels of the "
                         f"teacher module")
    elif keep.unique().numel() != keep.numel():
        raise ValueError(f"{where}: the index repeats a channel")
    if keep.numel() != s[1]:
        raise ValueError(f"{where}: the block keeps {keep.numel()} teacher channels but the student has "
                         f"{s[1]} (student output {shape_str(s)})")
    block.keep = keep
    return torch.Size((t[0], keep.numel(), *t[2:]))


# -------------------------------------------------------------------- joint
def _current(student, b: _Block) -> _Block:
    """Block ``b`` as it is in ``student`` now (after a merge: the new conv, and the module now
    at the BN's name when it is still a BN, else None)."""
    conv = find_module(student, b.conv_name, "student conv")
    bn = None
    if b.bn_name is not None:
        m = find_module(student, b.bn_name, "student BN")
        bn = m if isinstance(m, nn.modules.batchnorm._BatchNorm) else None
    return _Block(b.conv_name, b.bn_name, b.teacher_name, conv, bn, b.target, b.keep)


def _joint(student, teacher, blocks: List[_Block], data, num_samples, steps: int, show, modes,
           all_reduce: bool = False, keep_structure: bool = True) -> None:
    """Refine every block's Q together (module docstring), starting from the merged greedy ones.

    Each block's aligned output gets a trainable P_k (C, C) = I through a forward hook; the
    student's own parameters are frozen. L-BFGS minimises J (the sum of the blocks' relative
    losses) over all samples at once; the best P's seen are merged into the convs.
    """
    inputs = [x for x in _inputs(data, num_samples) if x.shape[0] > 0]
    n = len(blocks)
    points = [find_module(student, b.bn_name or b.conv_name, "student module") for b in blocks]

    # the teacher's targets, once, and each block's centred energy ||T - mean(T)||^2
    targets: List[List[torch.Tensor]] = []
    sums = [None] * n
    sq = [0.0] * n
    count = [0] * n
    for x in progress_bar(inputs, total=len(inputs), desc="fskd joint: teacher targets", enabled=show):
        got: Dict[int, torch.Tensor] = {}

        def grab(j, blk):
            def hook(_m, _inp, out):
                got[j] = blk.teacher_value(out).detach().clone()
                if len(got) == n:
                    raise StopForward
            return hook
        with Hooks() as hooks:
            for j, b in enumerate(blocks):
                hooks.forward(b.target, grab(j, b))
            _run(teacher, x)
        targets.append([got[j] for j in range(n)])
        for j in range(n):
            t = got[j].double()
            dims = [d for d in range(t.dim()) if d != 1]
            s1 = t.sum(dims)
            sums[j] = s1 if sums[j] is None else sums[j] + s1
            sq[j] += float(t.square().sum())
            count[j] += t.numel() // t.shape[1]
    if all_reduce:
        import torch.distributed as dist

        dev = blocks[0].conv.weight.device
        for j in range(n):
            packed = torch.cat([sums[j].to(dev), torch.tensor([sq[j], float(count[j])], dtype=torch.float64,
                                                              device=dev)])
            dist.all_reduce(packed)
            sums[j], sq[j], count[j] = packed[:-2], float(packed[-2]), int(round(float(packed[-1])))
    energy = [max(sq[j] - float(sums[j].square().sum()) / count[j], 1e-30) for j in range(n)]

    ref = [b.conv.weight for b in (_current(student, b) for b in blocks)]
    ps = [torch.eye(w.shape[0], dtype=w.dtype, device=w.device, requires_grad=True) for w in ref]
    frozen = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)

    def objective(backward: bool) -> float:
        total = 0.0
        for x, ts in zip(inputs, targets):
            terms: List[torch.Tensor] = []

            def apply(j):
                def hook(_m, _inp, out):
                    y = torch.einsum("oc,nc...->no...", ps[j], out)
                    t = ts[j].to(y.device, y.dtype)
                    terms.append((y - t).square().sum() / energy[j])
                    if len(terms) == n:
                        raise StopForward
                    return y
                return hook
            with Hooks() as hooks:
                for j, m in enumerate(points):
                    hooks.forward(m, apply(j))
                _run(student, x)
            loss = torch.stack([t.to(torch.float64) for t in terms]).sum()
            if backward:
                loss.backward()
            total += float(loss.detach())
        return total

    best = {"J": float("inf"), "P": None, "first": None, "evals": 0}

    def closure():
        for p in ps:
            p.grad = None
        j = objective(True)
        if all_reduce:
            import torch.distributed as dist

            total = torch.tensor([j], dtype=torch.float64, device=ps[0].device)
            dist.all_reduce(total)
            j = float(total)
            for p in ps:
                dist.all_reduce(p.grad)
        best["evals"] += 1
        if best["first"] is None:
            best["first"] = j  # greedy's Q's: P = I
        if j < best["J"]:
            best["J"], best["P"] = j, [p.detach().clone() for p in ps]
        return j

    opt = torch.optim.LBFGS(ps, lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    if show:
        print(f"fskd joint: J = sum of the blocks' relative losses, greedy {best['first']:.6g} -> "
              f"joint {best['J']:.6g} ({best['evals']} evaluations)", file=sys.stderr, flush=True)
    qs = [p.to(torch.float64) for p in best["P"]]
    _absorb_all(student, [_current(student, b) for b in blocks], qs, modes, keep_structure)
