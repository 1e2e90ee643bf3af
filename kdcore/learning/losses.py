"""Distillation losses and the bias-aware wrapper: elimination, rectification, dynamic learning.

Every distilling base loss is a :class:`Method` in ``METHODS``: a frozen dataclass whose fields
are the method's own options (as an mdistiller distiller owns its config) and whose
``per_sample`` loss has a batch mean equal to the usual reduced loss. Per-sample values let one
wrapper apply bias elimination (BE), rectification (BR) and the dynamic schedule (DL) to any
base loss with either normalisation in a single pass. Adding a method is one class here, one
line in ``METHODS`` and its name in :data:`kdcore.learning.strategies.BASES`.

Normalisation of the distillation term over a batch of B rows:

* ``batch`` (default): every row weighs 1/B, wrong rows included; a batch with few wrong rows
  gives each of them a small, stable weight. The study in docs/method.md found it equal or better
  than ``subset`` everywhere it mattered.
* ``subset`` (the paper's code): the right and the wrong rows are each averaged over their own
  count, so a lone wrong row weighs as much as all right rows together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcore.errors import DataError
from kdcore.learning.strategies import (  # noqa: F401  (moved there; kept importable here)
    PARTS,
    Strategy,
    is_bias_aware,
    parse_strategy,
    strategy_order,
)

UNLABELLED = -1  # label value of transfer rows that carry teacher outputs only


def kd_per_sample(student: Tensor, teacher: Tensor, targets: Tensor | None = None, *,
                  temperature: float) -> Tensor:
    """Hinton KD per sample: KL(softmax(t/T) || softmax(s/T)) * T^2."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2


def dkd_per_sample(student: Tensor, teacher: Tensor, targets: Tensor, *, temperature: float,
                   alpha: float = 1.0, beta: float = 8.0) -> Tensor:
    """Decoupled KD per sample (Zhao et al. 2022): alpha * TCKD + beta * NCKD, times T^2.

    TCKD is the binary KL over (target, all others); NCKD the KL over the non-target classes
    renormalised. Computed in log space, so it stays finite where a probability underflows.
    """
    gt = F.one_hot(targets, student.shape[1]).bool()
    s, t = student / temperature, teacher / temperature
    log_s, log_t = F.log_softmax(s, 1), F.log_softmax(t, 1)
    s_other, t_other = s.masked_fill(gt, -math.inf), t.masked_fill(gt, -math.inf)
    # binary distributions [p_target, p_other] in log space
    lse_s, lse_t = torch.logsumexp(s, 1), torch.logsumexp(t, 1)
    log_bs = torch.stack([log_s[gt], torch.logsumexp(s_other, 1) - lse_s], 1)
    log_bt = torch.stack([log_t[gt], torch.logsumexp(t_other, 1) - lse_t], 1)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1)
    log_ns, log_nt = F.log_softmax(s_other, 1), F.log_softmax(t_other, 1)
    nckd = torch.where(gt, 0.0, log_nt.exp() * (log_nt - log_ns)).sum(1)
    return (alpha * tckd + beta * nckd) * temperature**2


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD, batch mean (equals mdistiller's ``kd_loss``)."""
    return kd_per_sample(student_logits, teacher_logits, temperature=temperature).mean()


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float,
             beta: float, temperature: float) -> Tensor:
    """Decoupled KD, batch mean (equals mdistiller's ``dkd_loss``)."""
    return dkd_per_sample(student_logits, teacher_logits, labels, temperature=temperature,
                          alpha=alpha, beta=beta).mean()


def swap_rectify(teacher_logits: Tensor, labels: Tensor, predicted: Tensor | None = None) -> Tensor:
    """Swap each row's top logit with its ground-truth logit (vectorised, one copy).

    After softmax the two probabilities trade places: the label becomes the argmax and every
    other class keeps its probability. Rows the teacher already gets right are unchanged.
    ``predicted`` (the rows' argmax) may be passed when it is already known.
    """
    if predicted is None:
        predicted = teacher_logits.argmax(1)
    predicted, target = predicted.unsqueeze(1), labels.unsqueeze(1)
    top = teacher_logits.gather(1, predicted)
    at_label = teacher_logits.gather(1, target)
    return teacher_logits.clone().scatter_(1, target, top).scatter_(1, predicted, at_label)


class _WeightedKD(torch.autograd.Function):
    """Weighted sum of per-sample Hinton KD, the teacher rectified in place: one autograd node.

    Forward: log-softmax of both sides at T, the swap of :func:`swap_rectify` done on the
    teacher's log-probabilities (a permutation commutes with softmax, so no copy of the logits
    is needed), one KL per row, one weighted sum. Backward: the closed form
    ``T * w_i * (softmax(s/T) - p_t)``, instead of autograd replaying every op.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float,
                weights: Tensor | float, swap_from: Tensor | None,
                swap_to: Tensor | None) -> tuple[Tensor, Tensor]:
        log_p_s = F.log_softmax(student / temperature, dim=1)
        log_p_t = F.log_softmax(teacher / temperature, dim=1)
        if swap_from is not None:
            source, target = swap_from.unsqueeze(1), swap_to.unsqueeze(1)
            top, at_label = log_p_t.gather(1, source), log_p_t.gather(1, target)
            log_p_t.scatter_(1, target, top).scatter_(1, source, at_label)
        p_t = log_p_t.exp()
        per_sample = torch.linalg.vecdot(p_t, log_p_t - log_p_s).mul_(temperature**2)
        weighted = weights if isinstance(weights, Tensor) else None
        total = (per_sample * weights).sum() if weighted is not None else per_sample.sum() * weights
        ctx.save_for_backward(log_p_s, p_t, weighted)
        ctx.temperature, ctx.weight = temperature, weights if weighted is None else None
        ctx.mark_non_differentiable(per_sample)
        return total, per_sample

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: Tensor, _grad_per_sample: Tensor) -> tuple:
        log_p_s, p_t, weights = ctx.saved_tensors
        scale = grad_total * ctx.temperature
        scale = (scale * weights).unsqueeze(1) if weights is not None else scale * ctx.weight
        grad = log_p_s.exp().sub_(p_t).mul_(scale)
        return grad, None, None, None, None, None


def weighted_kd(student: Tensor, teacher: Tensor, *, temperature: float,
                weights: Tensor | float, swap: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
    """``sum_i w_i * KD_i`` and the detached per-sample ``KD_i`` (as :func:`kd_per_sample`).

    ``swap = (predicted, target)`` rectifies row i of the teacher by swapping its classes
    ``predicted[i]`` and ``target[i]`` first (a no-op where they are equal). ``weights`` is one
    weight per row or one number for all. Gradients flow to ``student`` only; a teacher that
    needs gradients takes the autograd path.
    """
    if teacher.requires_grad:
        if swap is not None:
            teacher = swap_rectify(teacher, swap[1], swap[0])
        per_sample = kd_per_sample(student, teacher, temperature=temperature)
        return (per_sample * weights).sum(), per_sample.detach()
    swap_from, swap_to = swap if swap is not None else (None, None)
    return _WeightedKD.apply(student, teacher, temperature, weights, swap_from, swap_to)


def dynamic_weight(epoch: int, epochs: int) -> float:
    """b(e) = cos^2(pi/2 * e/E): the weight of the right-knowledge term, 1 -> 0 over training."""
    return math.cos(math.pi / 2 * epoch / max(epochs, 1)) ** 2


@dataclass(frozen=True)
class Method:
    """A distillation method; its dataclass fields are its options, with their defaults.

    ``distill`` gives the batch's weighted distillation term: each labelled row distilled with
    :meth:`per_sample` from the teacher (rectified where ``swap`` says), each unlabelled row with
    plain Hinton KD from the original teacher (no bias can be identified there).
    """

    def per_sample(self, student: Tensor, teacher: Tensor, targets: Tensor, *,
                   temperature: float) -> Tensor:
        raise NotImplementedError

    def weight(self, epoch: int) -> float:
        """A factor on the whole distillation term at ``epoch`` (e.g. a warm-up)."""
        return 1.0

    def distill(self, student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float,
                weights: Tensor | float, swap: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, Tensor]:
        """``sum_i w_i * D_i`` and the detached per-sample ``D_i``."""
        labelled = labels != UNLABELLED
        rectified = swap_rectify(teacher, swap[1], swap[0]) if swap else teacher
        per_sample = self.per_sample(student, rectified, labels.clamp(min=0),
                                     temperature=temperature)
        if not bool(labelled.all()):
            transfer = kd_per_sample(student, teacher, temperature=temperature)
            per_sample = torch.where(labelled, per_sample, transfer)
        return (per_sample * weights).sum(), per_sample.detach()


@dataclass(frozen=True)
class KD(Method):
    """Hinton KD (2015). Its options, temperature and lam, are every method's (TrainConfig)."""

    def per_sample(self, student: Tensor, teacher: Tensor, targets: Tensor, *,
                   temperature: float) -> Tensor:
        return kd_per_sample(student, teacher, temperature=temperature)

    def distill(self, student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float,
                weights: Tensor | float, swap: tuple[Tensor, Tensor] | None
                ) -> tuple[Tensor, Tensor]:
        """One autograd node (:func:`weighted_kd`); unlabelled rows are never swapped."""
        return weighted_kd(student, teacher, temperature=temperature, weights=weights, swap=swap)


@dataclass(frozen=True)
class DKD(Method):
    """Decoupled KD (Zhao et al. 2022) with mdistiller's defaults: alpha * TCKD + beta * NCKD,
    the whole term warmed up linearly over ``warmup`` epochs (0: no warm-up)."""

    alpha: float = 1.0
    beta: float = 8.0
    warmup: int = 20

    def per_sample(self, student: Tensor, teacher: Tensor, targets: Tensor, *,
                   temperature: float) -> Tensor:
        return dkd_per_sample(student, teacher, targets, temperature=temperature,
                              alpha=self.alpha, beta=self.beta)

    def weight(self, epoch: int) -> float:
        """mdistiller's 1-based warm-up: ``min((epoch + 1) / warmup, 1)``."""
        return min((epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0


METHODS: dict[str, type[Method]] = {"kd": KD, "dkd": DKD}  # one per distilling base


def method_for(base: str, options: Mapping | None = None) -> Method:
    """The method of base loss ``base`` with ``options`` over its defaults.

    Raises DataError for a base that does not distil or an option the method does not have.
    """
    if base not in METHODS:
        raise DataError(f"base loss {base!r} does not distil; use one of {', '.join(METHODS)}")
    cls = METHODS[base]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        takes = f"takes {', '.join(known)}" if known else "takes no options"
        raise DataError(f"{base} has no option {', '.join(unknown)}; it {takes}")
    return cls(**(options or {}))


@dataclass(frozen=True)
class LossParts:
    """The loss to optimise, plus what is needed to log its parts on demand.

    The parts are computed only when read (detached), so the training step pays for one
    weighted per-sample sum and nothing else.
    """

    total: Tensor
    b: float
    per_sample: Tensor | None = None  # detached distillation loss per row
    ce_value: Tensor | None = None
    labelled: Tensor | None = None
    wrong: Tensor | None = None  # teacher-wrong rows that the strategy treats as its bias
    scales: tuple[Tensor, Tensor, Tensor] | None = None  # right, wrong, unlabelled; None: 1/B

    def _term(self, i: int) -> float:
        if self.per_sample is None:
            return 0.0
        mask = (self.labelled & ~self.wrong, self.wrong, ~self.labelled)[i]
        scale = 1.0 / len(self.per_sample) if self.scales is None else self.scales[i]
        return float((self.per_sample * mask).sum() * scale)

    @property
    def ce(self) -> float:
        value = float(self.ce_value if self.ce_value is not None else self.total.detach())
        return 0.0 if math.isnan(value) else value  # a batch without a (trusted) label

    @property
    def right(self) -> float:
        return self._term(0)

    @property
    def rect(self) -> float:
        return self._term(1)

    @property
    def transfer(self) -> float:
        return self._term(2)

    @property
    def n_wrong(self) -> int:
        return 0 if self.wrong is None else int(self.wrong.sum())


def strategy_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
                  strategy: Strategy, epoch: int, epochs: int, temperature: float = 4.0,
                  lam: float = 0.5, method: Method | None = None,
                  suspect: Tensor | None = None, drop_ce: bool = False,
                  teacher_predicted: Tensor | None = None) -> LossParts:
    """``lam * CE + (1 - lam) * D`` for one batch; rows with label -1 are unlabelled transfer data.

    D is the base distillation loss (``method``, by default the strategy's base with its
    default options) with the strategy's parts: right rows weigh ``b``, wrong rows (teacher
    argmax != label) are dropped (BE) or distilled from the swapped teacher (BR) with weight
    ``1 - b``; ``b`` follows ``dynamic_weight`` with DL and both weights are 1 without it.
    Unlabelled rows always get plain Hinton KD (no bias can be identified there). It is one
    weighted sum of one per-sample loss, whatever the parts (see :meth:`Method.distill`).

    ``teacher_predicted`` is the teacher's argmax per row, if the caller has it: a frozen
    teacher's logits and so its argmax do not change, so training computes it once per run.

    With ``+lq``, ``suspect`` (bool per row) marks likely label errors: a wrong row that is
    suspect is not rectified nor eliminated but distilled from the original teacher like a
    right row (the teacher is probably right there); with ``drop_ce`` its CE weight is 0 too.
    """
    labelled = labels != UNLABELLED
    doubted, predicted = None, None
    if strategy.bias_aware or strategy.lq:
        predicted = teacher_logits.argmax(1) if teacher_predicted is None else teacher_predicted
    if strategy.lq and suspect is not None:
        doubted = labelled & suspect.bool() & (predicted != labels)
    n_labelled = labelled.sum()
    if doubted is not None and drop_ce:  # the mean over trusted rows, 0 if there are none
        trusted = labelled & ~doubted
        ce_rows = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
        ce = (ce_rows * trusted).sum() / trusted.sum().clamp(min=1)
    else:  # the mean over labelled rows; NaN if there are none (then unused, see below)
        ce = F.cross_entropy(student_logits, labels, ignore_index=UNLABELLED)
    if not strategy.distills:
        return LossParts(ce, 1.0)

    wrong, swap = torch.zeros_like(labelled), None
    if strategy.bias_aware:
        wrong = labelled & (predicted != labels)
        if doubted is not None:
            wrong &= ~doubted
        if strategy.br:  # swapping a row's argmax with itself leaves it as it is
            swap = (predicted, torch.where(wrong, labels, predicted))

    b = dynamic_weight(epoch, epochs) if strategy.dl else 1.0
    w_right = b
    w_wrong = (1.0 - b if strategy.dl else 1.0) if strategy.br else 0.0
    n = len(labels)
    scales = None  # batch normalisation: every row weighs 1/B times its part's weight
    if not strategy.bias_aware:  # vanilla: wrong rows distilled from the original teacher
        weights: Tensor | float = 1.0 / n
    elif strategy.normalisation == "subset":  # each part averaged over its own rows
        scales = tuple(1.0 / m.sum().clamp(min=1)  # an empty part weighs 0, never NaN
                       for m in (labelled & ~wrong, wrong, ~labelled))
        weights = torch.where(wrong, w_wrong * scales[1],
                              torch.where(labelled, w_right * scales[0], scales[2]))
    else:  # right rows w_right, wrong rows w_wrong, unlabelled rows 1
        weights = torch.where(wrong, w_wrong / n, torch.where(labelled, w_right / n, 1.0 / n))

    method = method if method is not None else method_for(strategy.base)
    distill, per_sample = method.distill(student_logits, teacher_logits, labels,
                                         temperature=temperature, weights=weights, swap=swap)
    scale = method.weight(epoch)
    if scale != 1.0:
        distill = distill * scale
    total = torch.where(n_labelled > 0, lam * ce + (1.0 - lam) * distill, distill)
    return LossParts(total, b, per_sample, ce.detach(), labelled, wrong, scales)
