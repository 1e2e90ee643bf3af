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
import numbers
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


class _Standardize(torch.autograd.Function):
    """Z-score of each row, ``(x - mean) / (eps + unbiased std)``, with its closed-form backward
    (torch's ``std`` and its autograd cost several times a softmax on one CPU thread)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        centred = x - x.mean(1, keepdim=True)
        std = torch.linalg.vecdot(centred, centred).div_(x.shape[1] - 1).sqrt_().unsqueeze(1)
        scale = std + eps
        ctx.save_for_backward(centred, std, scale)
        return centred / scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple:
        centred, std, scale = ctx.saved_tensors
        # d std / d x_i = centred_i / ((K - 1) std); a constant row (std 0) has centred 0
        along = torch.linalg.vecdot(grad, centred).unsqueeze(1).div_(
            std.clamp(min=torch.finfo(std.dtype).tiny).mul(scale) * (centred.shape[1] - 1))
        out = (grad - grad.mean(1, keepdim=True)).addcmul_(centred, along, value=-1.0)
        return out.div_(scale), None


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row, as the LS authors' ``normalize``: (z - mean) / (eps + unbiased std)."""
    return _Standardize.apply(logits, eps)


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Pearson correlation of ``a`` with ``b`` along ``dim`` (1: per row, 0: per column), DIST's
    eps added to the product of the norms as in the authors' ``cosine_similarity``; and its
    gradient in ``a`` as ``direction / scale`` (the backward folds the division into its own
    factor). Columns are reduced in place, not through a transposed copy."""
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    norm_a = torch.linalg.vecdot(a, a, dim=dim).sqrt_().unsqueeze(dim)
    norm_b = torch.linalg.vecdot(b, b, dim=dim).sqrt_().unsqueeze(dim)
    scale = norm_a * norm_b + eps
    rho = torch.linalg.vecdot(a, b, dim=dim).unsqueeze(dim) / scale
    # d rho / d a = (b - rho |b| a / |a|) / scale, whose mean along dim is 0: no centring needed
    along = rho * norm_b / norm_a.clamp(min=torch.finfo(a.dtype).tiny)
    return rho.squeeze(dim), torch.addcmul(b, a, along, value=-1.0), scale


class _DIST(torch.autograd.Function):
    """DIST per row (see :func:`dist_per_sample`) with its closed-form backward to the student."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, tau: float, beta: float, gamma: float,
                rows: Tensor | None) -> Tensor:
        p_s, p_t = F.softmax(student / tau, dim=1), F.softmax(teacher / tau, dim=1)
        rho, grad_inter, scale_inter = _pearson(p_s, p_t, 1)
        kept_s, kept_t = (p_s, p_t) if rows is None else (p_s[rows], p_t[rows])
        if len(kept_s):
            rho_c, grad_intra, scale_intra = _pearson(kept_s, kept_t, 0)
            intra = 1.0 - rho_c.mean()
        else:
            intra, grad_intra, scale_intra = p_s.new_zeros(()), None, None
        ctx.save_for_backward(p_s, grad_inter, scale_inter, grad_intra, scale_intra, rows)
        ctx.tau, ctx.beta, ctx.gamma = tau, beta, gamma
        return (beta * (1.0 - rho) + gamma * intra) * tau**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple:
        p_s, grad_inter, scale_inter, grad_intra, scale_intra, rows = ctx.saved_tensors
        scale = -ctx.tau  # tau^2 from the loss, 1 / tau from the softmax at tau
        grad_p = grad_inter * (grad.unsqueeze(1) * (scale * ctx.beta) / scale_inter)
        if grad_intra is not None:  # every row carries the intra term: its weight is sum(grad)
            weight = grad.sum() * (scale * ctx.gamma / p_s.shape[1]) / scale_intra
            if rows is None:
                grad_p.addcmul_(grad_intra, weight)
            else:
                grad_p[rows] += grad_intra * weight
        along = torch.linalg.vecdot(grad_p, p_s).unsqueeze(1)  # the softmax's backward
        return grad_p.sub_(along).mul_(p_s), None, None, None, None, None


def _dist_autograd(student: Tensor, teacher: Tensor, *, tau: float, beta: float, gamma: float,
                   rows: Tensor | None) -> Tensor:
    """:func:`dist_per_sample` through autograd, for a teacher that needs gradients too."""
    p_s, p_t = F.softmax(student / tau, dim=1), F.softmax(teacher / tau, dim=1)
    inter = 1.0 - _pearson(p_s, p_t, 1)[0]
    if rows is not None:
        p_s, p_t = p_s[rows], p_t[rows]
    intra = (1.0 - _pearson(p_s, p_t, 0)[0].mean()) if len(p_s) else p_s.new_zeros(())
    return (beta * inter + gamma * intra) * tau**2


def dist_per_sample(student: Tensor, teacher: Tensor, *, tau: float, beta: float = 1.0,
                    gamma: float = 1.0, rows: Tensor | None = None) -> Tensor:
    """DIST (Huang et al. 2022) per row: ``tau^2 * (beta * (1 - rho_i) + gamma * intra)``.

    ``rho_i`` correlates row i's class probabilities (at tau) with the teacher's (inter-class);
    ``intra`` is one minus the mean over classes of the correlation down the batch, a batch
    term that every row carries, so the batch mean is the authors' loss. ``rows`` (bool) limits
    the batch of the intra term (rows a part leaves out); with none, the intra term is 0.
    """
    if teacher.requires_grad:
        return _dist_autograd(student, teacher, tau=tau, beta=beta, gamma=gamma, rows=rows)
    return _DIST.apply(student, teacher, tau, beta, gamma, rows)


def _row_lse(z: Tensor, p: Tensor) -> Tensor:
    """log-sum-exp of each row of ``z`` from its softmax ``p``: max(z) - log(max(p)); max(p) is
    at least 1/K, so this is exact where an exp of the masked entries would crawl."""
    return z.amax(1, keepdim=True) - p.amax(1, keepdim=True).log()


class _RLD(torch.autograd.Function):
    """RLD per row (see :func:`rld_per_sample`) with its closed-form backward to the student.

    The masked logits are never passed to ``exp`` (an exp of -1e9 takes the slow path on CPU);
    SCD reads the student's label probability as the authors do, clamped to the smallest
    positive float so that it stays finite where it underflows.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, targets: Tensor, temperature: float,
                alpha: float, beta: float, alpha_temperature: float) -> Tensor:
        def at(logits: Tensor) -> Tensor:  # the default alpha_temperature 1 costs no pass
            return logits if alpha_temperature == 1 else logits / alpha_temperature

        y, tiny = targets.unsqueeze(1), torch.finfo(student.dtype).tiny
        rest = F.softmax(at(student), dim=1)
        bs_y = rest.gather(1, y)
        bs_rest = rest.scatter_(1, y, 0.0).sum(1, keepdim=True).clamp_(min=tiny)
        bt_y = F.softmax(at(teacher), dim=1).amax(1, keepdim=True)
        bt_rest = 1.0 - bt_y
        scd = (torch.xlogy(bt_y, bt_y) - bt_y * bs_y.clamp(min=tiny).log()
               + torch.xlogy(bt_rest, bt_rest) - bt_rest * bs_rest.log()) * alpha_temperature**2
        keep = torch.lt(teacher, teacher.gather(1, y), out=torch.empty_like(student))
        fill = (keep - 1.0).mul_(1e9)  # the label and the classes over it: -1e9, the others 0
        s2 = torch.addcmul(fill, student, keep, value=1 / temperature)
        t2 = torch.addcmul(fill, teacher, keep, value=1 / temperature)
        p_s2, p_t2 = F.softmax(s2, dim=1), F.softmax(t2, dim=1)
        mcd = (torch.linalg.vecdot(p_t2, t2 - s2).unsqueeze(1) - _row_lse(t2, p_t2)
               + _row_lse(s2, p_s2)) * temperature**2
        # SCD's gradient: alpha_T (p_y - bt_y) (onehot_y - rest / bs_rest)
        coef = (bs_y - bt_y).mul_(alpha_temperature * alpha)
        ctx.save_for_backward(rest, coef, coef / bs_rest, y, p_s2, p_t2)
        ctx.scale = beta * temperature
        return (alpha * scd + beta * mcd).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple:
        rest, coef, coef_rest, y, p_s2, p_t2 = ctx.saved_tensors
        grad = grad.unsqueeze(1)
        out = (p_s2 - p_t2).mul_(grad * ctx.scale)  # MCD: T (q_s - q_t) on the unmasked classes
        out.addcmul_(rest, coef_rest * grad, value=-1.0).scatter_add_(1, y, coef * grad)
        return out, None, None, None, None, None, None


def _rld_autograd(student: Tensor, teacher: Tensor, targets: Tensor, *, temperature: float,
                  alpha: float, beta: float, alpha_temperature: float) -> Tensor:
    """:func:`rld_per_sample` through autograd (SCD in log space), for a teacher that needs
    gradients too."""
    gt = F.one_hot(targets, student.shape[1]).bool()
    top = F.one_hot(teacher.argmax(1), student.shape[1]).bool()
    s, t = student / alpha_temperature, teacher / alpha_temperature
    lse_s, lse_t = torch.logsumexp(s, 1), torch.logsumexp(t, 1)
    log_bs = torch.stack([s[gt] - lse_s, torch.logsumexp(s.masked_fill(gt, -math.inf), 1) - lse_s],
                         1)
    log_bt = torch.stack([t[top] - lse_t,
                          torch.logsumexp(t.masked_fill(top, -math.inf), 1) - lse_t], 1)
    scd = (log_bt.exp() * (log_bt - log_bs)).sum(1) * alpha_temperature**2
    above = teacher >= teacher.gather(1, targets.unsqueeze(1))  # the label and the classes over it
    log_ms = F.log_softmax((student / temperature).masked_fill(above, -1e9), dim=1)
    log_mt = F.log_softmax((teacher / temperature).masked_fill(above, -1e9), dim=1)
    mcd = (log_mt.exp() * (log_mt - log_ms)).sum(1) * temperature**2
    return alpha * scd + beta * mcd


def rld_per_sample(student: Tensor, teacher: Tensor, targets: Tensor, *, temperature: float,
                   alpha: float = 1.0, beta: float = 8.0, alpha_temperature: float = 1.0
                   ) -> Tensor:
    """Refined-logit KD (Sun et al. 2024, zju-SWJ/RLD) per row: alpha * SCD + beta * MCD.

    SCD: binary KL at ``alpha_temperature`` from the teacher's (top class, rest) to the
    student's (label, rest), times alpha_temperature^2: the teacher's confidence, put on the
    label. MCD: KL at ``temperature`` over the classes the teacher ranks below the label (the
    label and those above it masked with -1e9 as the authors do), times temperature^2.
    """
    if teacher.requires_grad:
        return _rld_autograd(student, teacher, targets, temperature=temperature, alpha=alpha,
                             beta=beta, alpha_temperature=alpha_temperature)
    return _RLD.apply(student, teacher, targets, temperature, alpha, beta, alpha_temperature)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD, batch mean (equals mdistiller's ``kd_loss``)."""
    return kd_per_sample(student_logits, teacher_logits, temperature=temperature).mean()


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float,
             beta: float, temperature: float) -> Tensor:
    """Decoupled KD, batch mean (equals mdistiller's ``dkd_loss``)."""
    return dkd_per_sample(student_logits, teacher_logits, labels, temperature=temperature,
                          alpha=alpha, beta=beta).mean()


def ls_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Logit-standardised KD (Sun et al., CVPR 2024), batch mean: Hinton KD on z-scored logits,
    times T^2 (equals the authors' ``kd_loss`` with ``logit_stand``)."""
    total, per_sample = weighted_kd(standardize(student_logits), standardize(teacher_logits),
                                    temperature=temperature, weights=1.0)
    return total / len(per_sample)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0,
              gamma: float = 1.0, tau: float = 1.0) -> Tensor:
    """DIST, inter- plus intra-class correlation loss times tau^2 (equals the authors' DIST)."""
    return dist_per_sample(student_logits, teacher_logits, tau=tau, beta=beta,
                           gamma=gamma).mean()


def rld_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0, alpha_temperature: float = 1.0
             ) -> Tensor:
    """Refined-logit KD, batch mean, without the warm-up factor that belongs to training
    (equals the authors' ``rld_loss`` without ``logit_stand``)."""
    return rld_per_sample(student_logits, teacher_logits, labels, temperature=temperature,
                          alpha=alpha, beta=beta, alpha_temperature=alpha_temperature).mean()


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


def linear_warmup(epoch: int, warmup: int) -> float:
    """mdistiller's 1-based warm-up of DKD and RLD, ``min((epoch + 1) / warmup, 1)``; 0: none."""
    return min((epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0


@dataclass(frozen=True)
class Method:
    """A distillation method; its dataclass fields are its options, with their defaults.

    ``distill`` gives the batch's weighted distillation term: each labelled row distilled with
    :meth:`per_sample` from the teacher (rectified where ``swap`` says), each unlabelled row with
    plain Hinton KD from the original teacher (no bias can be identified there), unless the
    method needs no label (``labelled_only`` False), which then distils those rows itself.
    ``dropped`` marks the rows the parts leave out (BE without BR); they weigh 0 already, so
    only a method with a term over the whole batch (DIST) reads it.
    """

    labelled_only = True  # per_sample reads the label (a class attribute, not an option)

    def per_sample(self, student: Tensor, teacher: Tensor, targets: Tensor, *,
                   temperature: float) -> Tensor:
        raise NotImplementedError

    def weight(self, epoch: int) -> float:
        """A factor on the whole distillation term at ``epoch`` (e.g. a warm-up)."""
        return 1.0

    def distill(self, student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float,
                weights: Tensor | float, swap: tuple[Tensor, Tensor] | None,
                dropped: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``sum_i w_i * D_i`` and the detached per-sample ``D_i``."""
        labelled = labels != UNLABELLED
        rectified = swap_rectify(teacher, swap[1], swap[0]) if swap else teacher
        per_sample = self.per_sample(student, rectified, labels.clamp(min=0),
                                     temperature=temperature)
        if self.labelled_only and not bool(labelled.all()):
            transfer = kd_per_sample(student, teacher, temperature=temperature)
            per_sample = torch.where(labelled, per_sample, transfer)
        return (per_sample * weights).sum(), per_sample.detach()


@dataclass(frozen=True)
class KD(Method):
    """Hinton KD (2015). Its options, temperature and lam, are every method's (TrainConfig)."""

    labelled_only = False

    def per_sample(self, student: Tensor, teacher: Tensor, targets: Tensor, *,
                   temperature: float) -> Tensor:
        return kd_per_sample(student, teacher, temperature=temperature)

    def distill(self, student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float,
                weights: Tensor | float, swap: tuple[Tensor, Tensor] | None,
                dropped: Tensor | None = None) -> tuple[Tensor, Tensor]:
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
        return linear_warmup(epoch, self.warmup)


@dataclass(frozen=True)
class LS(KD):
    """Logit standardisation (Sun et al., CVPR 2024) on Hinton KD at ``--temperature`` (the base
    temperature): both sides z-scored per row first. It needs no label, so unlabelled rows get
    it too, and the parts act row by row as for kd (z-scoring commutes with the swap)."""

    def per_sample(self, student: Tensor, teacher: Tensor, targets: Tensor, *,
                   temperature: float) -> Tensor:
        return kd_per_sample(standardize(student), standardize(teacher), temperature=temperature)

    def distill(self, student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float,
                weights: Tensor | float, swap: tuple[Tensor, Tensor] | None,
                dropped: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return super().distill(standardize(student), standardize(teacher), labels,
                               temperature=temperature, weights=weights, swap=swap)


@dataclass(frozen=True)
class DIST(Method):
    """DIST (Huang et al., NeurIPS 2022): inter- and intra-class correlation, ``beta`` and
    ``gamma`` their weights, tau = ``--temperature``. It needs no label, so unlabelled rows are
    part of its batch. The intra term runs down the batch, so it has no per-row value: it is
    computed over the rows the parts keep (all but those BE drops; BR rows enter rectified), each
    counting once, and every kept row carries it (:func:`dist_per_sample`). So the weights of the
    parts (DL's schedule, the normalisation) weigh each row's inter term and, through their sum,
    the intra term; they never change which rows form the batch.
    """

    beta: float = 1.0
    gamma: float = 1.0
    labelled_only = False

    def per_sample(self, student: Tensor, teacher: Tensor, targets: Tensor, *,
                   temperature: float) -> Tensor:
        return dist_per_sample(student, teacher, tau=temperature, beta=self.beta,
                               gamma=self.gamma)

    def distill(self, student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float,
                weights: Tensor | float, swap: tuple[Tensor, Tensor] | None,
                dropped: Tensor | None = None) -> tuple[Tensor, Tensor]:
        rectified = swap_rectify(teacher, swap[1], swap[0]) if swap else teacher
        rows = ~dropped if dropped is not None and bool(dropped.any()) else None
        per_sample = dist_per_sample(student, rectified, tau=temperature, beta=self.beta,
                                     gamma=self.gamma, rows=rows)
        return (per_sample * weights).sum(), per_sample.detach()


@dataclass(frozen=True)
class RLD(Method):
    """Refined-logit KD (Sun et al. 2024) with the authors' defaults: alpha * SCD + beta * MCD
    (:func:`rld_per_sample`), SCD at ``alpha_temperature``, MCD at ``--temperature``, the whole
    term warmed up over ``warmup`` epochs as their code does. It already treats the label
    specially, which is why ``rld+br`` is refused (:data:`strategies.REFUSED_PARTS`)."""

    alpha: float = 1.0
    beta: float = 8.0
    alpha_temperature: float = 1.0
    warmup: int = 20

    def __post_init__(self) -> None:
        if not self.alpha_temperature > 0:
            raise DataError(f"rld option alpha_temperature = {self.alpha_temperature!r} is out "
                            "of range; give a number above 0")

    def per_sample(self, student: Tensor, teacher: Tensor, targets: Tensor, *,
                   temperature: float) -> Tensor:
        return rld_per_sample(student, teacher, targets, temperature=temperature,
                              alpha=self.alpha, beta=self.beta,
                              alpha_temperature=self.alpha_temperature)

    def weight(self, epoch: int) -> float:
        return linear_warmup(epoch, self.warmup)


# one per distilling base
METHODS: dict[str, type[Method]] = {"kd": KD, "dkd": DKD, "ls": LS, "dist": DIST, "rld": RLD}


def method_for(base: str, options: Mapping | None = None) -> Method:
    """The method of base loss ``base`` with ``options`` over its defaults.

    Raises DataError for a base that does not distil or an option the method does not have.
    """
    if base not in METHODS:
        raise DataError(f"base loss {base!r} does not distil; use one of {', '.join(METHODS)}")
    cls = METHODS[base]
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        takes = f"takes {', '.join(known)}" if known else "takes no options"
        raise DataError(f"{base} has no option {', '.join(unknown)}; it {takes}")
    return cls(**{k: _option(base, k, known[k].default, v) for k, v in (options or {}).items()})


def _option(base: str, name: str, default: object, value: object) -> object:
    """``value`` as the type of the option's default: a stored or typed 2 for a float option is
    2.0, so equal settings give equal configs; anything else is one DataError line."""
    whole = isinstance(default, int)
    if (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and (not whole or (float(value).is_integer() and value >= 0))):
        return int(value) if whole else float(value)
    what = "a whole number, 0 or more" if whole else "a finite number"
    raise DataError(f"{base} option {name} = {value!r} is out of range; give {what}")


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
    dropped = wrong if strategy.bias_aware and not strategy.br else None  # BE alone drops them
    distill, per_sample = method.distill(student_logits, teacher_logits, labels,
                                         temperature=temperature, weights=weights, swap=swap,
                                         dropped=dropped)
    scale = method.weight(epoch)
    if scale != 1.0:
        distill = distill * scale
    total = torch.where(n_labelled > 0, lam * ce + (1.0 - lam) * distill, distill)
    return LossParts(total, b, per_sample, ce.detach(), labelled, wrong, scales)
