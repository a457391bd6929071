r"""Distillation of causal language models through their lm_heads, logits never materialised.

A language model is given as a pair ``(model, lm_head)``: ``model(input_ids,
attention_mask=...)`` returns the final hidden states (a tensor (B, L, D), or an
object/dict with ``last_hidden_state``, or with ``hidden_states`` whose last
entry is used, as Hugging Face's base models return), and ``lm_head`` is an
``nn.Linear(D, V)`` (bias optional). For ``LlamaForCausalLM`` that is
``(m.model, m.lm_head)``.

Labels are shifted as Hugging Face's causal LMs do: the hidden state at position
i is scored against the token at i + 1, so the last position of every sequence
has no target. Positions whose target is ``ignore_index`` (-100, HF's convention),
or lies where ``attention_mask`` is 0 (padding), are left out of both terms and
of the mean.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .base import Distiller, Losses, check_real, op


def hidden_states_of(output) -> torch.Tensor:
    """The final hidden states in a base model's output: a tensor, ``.last_hidden_state``,
    ``["last_hidden_state"]`` or the last of ``.hidden_states``."""
    if isinstance(output, torch.Tensor):
        return output
    for get in (lambda o: o["last_hidden_state"] if isinstance(o, dict) else o.last_hidden_state,
                lambda o: (o["hidden_states"] if isinstance(o, dict) else o.hidden_states)[-1]):
        try:
            h = get(output)
        except (AttributeError, KeyError, TypeError, IndexError):
            continue
        if isinstance(h, torch.Tensor):
            return h
    raise TypeError(f"cannot find hidden states in a model output of type {type(output).__name__}: return a "
                    "tensor, or an object with .last_hidden_state or .hidden_states")


class CausalLM(nn.Module):
    """A (model, lm_head) pair as one module: ``model.*`` and ``lm_head.*`` in the state_dict."""

    def __init__(self, model: nn.Module, lm_head: nn.Linear):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(lm_head, nn.Linear):
            raise TypeError(f"lm_head must be an nn.Linear(D, V), got {type(lm_head).__name__}")
        self.model = model
        self.lm_head = lm_head

    def hidden(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, D) final hidden states."""
        out = self.model(input_ids) if attention_mask is None else self.model(input_ids,
                                                                               attention_mask=attention_mask)
        return hidden_states_of(out)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L, V) logits, materialised (for evaluation and generation; training never calls this)."""
        return self.lm_head(self.hidden(input_ids, attention_mask))


def _pair(pair, what: str) -> CausalLM:
    if isinstance(pair, CausalLM):
        return pair
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{what} must be a (model, lm_head) pair, got {type(pair).__name__}")
    return CausalLM(*pair)


def shifted_labels(input_ids: torch.Tensor, labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                   ignore_index: int) -> torch.Tensor:
    """(B, L - 1) next-token targets: ``labels`` (default ``input_ids``) shifted left by one,
    ``ignore_index`` where the target token is padding (``attention_mask`` 0)."""
    target = input_ids if labels is None else labels
    if target.shape != input_ids.shape:
        raise ValueError(f"labels has shape {tuple(target.shape)} but input_ids has {tuple(input_ids.shape)}")
    target = target[:, 1:]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                             f"{tuple(input_ids.shape)}")
        target = torch.where(attention_mask[:, 1:].bool(), target, torch.full_like(target, ignore_index))
    return target


class CausalLMKD(Distiller):
    r"""``kd_weight * (T^2 KL(teacher || student) + (ce_weight / kd_weight) CE)`` over the next-token positions.

    One call of :func:`kdkernels.linear_kd_loss` on the students' and teachers'
    final hidden states and lm_head weights: the (tokens, vocabulary) logits
    are never held, and the gradients of the student's model and lm_head come
    from the same pass. Tokens are averaged over the kept positions (batchmean).

    Example::

        distiller = CausalLMKD((student.model, student.lm_head), (teacher.model, teacher.lm_head),
                               temperature=2.0, ce_weight=0.5)
        opt = torch.optim.AdamW(distiller.parameters(), lr=1e-4)
        _, losses = distiller(input_ids, attention_mask=attention_mask)
        sum(losses.values()).backward()

    ``forward(input_ids, labels=None, attention_mask=None)`` returns ``(None, losses)``
    (the logits are not formed): ``"kd"`` = kd_weight T^2 KL and, when ``ce_weight > 0``,
    ``"ce"`` = ce_weight CE, both token means over the kept positions, so that ``fit``
    reports the next-token cross-entropy apart. Both come from the same single fused
    call, which computes the gradient of their sum: back-propagate
    ``sum(losses.values())`` (as ``fit`` does); a backward through one term alone raises.
    ``labels`` default to ``input_ids``; the teacher's tensors are cast to the student's
    dtype when they differ (a copy of its lm_head weight per step).
    """

    def __init__(self, student, teacher, *, temperature: float = 2.0, kd_weight: float = 1.0,
                 ce_weight: float = 0.0, ignore_index: int = -100, chunk: Optional[int] = None,
                 backend: Optional[str] = None):
        student, teacher = _pair(student, "student"), _pair(teacher, "teacher")
        super().__init__(student, teacher)
        if student.lm_head.out_features != teacher.lm_head.out_features:
            raise ValueError(f"student and teacher lm_heads have different vocabularies: "
                             f"{student.lm_head.out_features} and {teacher.lm_head.out_features}")
        self.temperature = check_real(temperature, "temperature", positive=True)
        self.kd_weight = check_real(kd_weight, "kd_weight", positive=True)
        self.ce_weight = check_real(ce_weight, "ce_weight")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        self.chunk = chunk
        self.backend = backend
        self._remember_trainable()

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> Tuple[None, Losses]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] < 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)}: causal LM distillation needs L >= 2 "
                             "(position i is scored against token i + 1)")
        target = shifted_labels(input_ids, labels, attention_mask, self.ignore_index)
        h_s = self.student.hidden(input_ids, attention_mask)[:, :-1]
        head_t = self.teacher.lm_head
        h_t = self.teacher_forward(self.teacher.hidden, input_ids, attention_mask)[:, :-1]
        w_t = head_t.weight.detach()
        b_t = head_t.bias.detach() if head_t.bias is not None else None
        if h_t.dtype != h_s.dtype:
            h_t = h_t.to(h_s.dtype)
        if w_t.dtype != h_s.dtype:
            w_t = w_t.to(h_s.dtype)
            b_t = b_t.to(h_s.dtype) if b_t is not None else None
        head_s = self.student.lm_head
        args = (h_s.reshape(-1, h_s.shape[-1]), head_s.weight, h_t.reshape(-1, h_t.shape[-1]), w_t)
        kw = dict(temperature=self.temperature, bias_s=head_s.bias, bias_t=b_t, ignore_index=self.ignore_index,
                  labels=target.reshape(-1), ce_weight=self.ce_weight / self.kd_weight, chunk=self.chunk,
                  backend=self.backend)
        if self.ce_weight == 0.0:
            return None, {"kd": self.kd_weight * op("linear_kd_loss")(*args, **kw)}
        # one fused pass, its two terms reported apart; kd_weight is applied before the split so that
        # sum(losses.values()) hands the split one grad_output (no host comparison in its backward)
        from ..ops.linear_kd import scaled_terms

        kd, ce = scaled_terms(self.kd_weight, *args, **kw)
        return None, {"kd": kd, "ce": ce}
