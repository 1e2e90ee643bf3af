"""Pins the maths of docs/method.md: KD/DKD values, the swap, BE/BR/DL, the NaN-free edge cases."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kdcore.errors import DataError
from kdcore.learning.losses import (
    DKD,
    KD,
    METHODS,
    UNLABELLED,
    dkd_loss,
    dynamic_weight,
    kd_loss,
    kd_per_sample,
    method_for,
    parse_strategy,
    strategy_loss,
    swap_rectify,
    weighted_kd,
)


def mdistiller_kd(s, t, T):
    """mdistiller's documented KD: kl_div(log_softmax(s/T), softmax(t/T)).sum(1).mean() * T^2."""
    log_s = F.log_softmax(s / T, dim=1)
    p_t = F.softmax(t / T, dim=1)
    return F.kl_div(log_s, p_t, reduction="none").sum(1).mean() * T**2


def mdistiller_dkd(s, t, y, alpha, beta, T):
    """mdistiller's documented DKD (TCKD on [p_gt, p_other], NCKD with the gt masked by -1000)."""
    gt = F.one_hot(y, s.shape[1]).float()
    other = 1 - gt
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / s.shape[0]
    pt2 = F.softmax(t / T - 1000.0 * gt, 1)
    log_ps2 = F.log_softmax(s / T - 1000.0 * gt, 1)
    nckd = F.kl_div(log_ps2, pt2, reduction="sum") * T**2 / s.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_equals_mdistiller_kd(batch, T):
    s, t, _ = batch
    assert torch.allclose(kd_loss(s, t, T), mdistiller_kd(s, t, T), atol=1e-10)


@pytest.mark.parametrize(("alpha", "beta", "T"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_loss_equals_mdistiller_dkd(batch, alpha, beta, T):
    s, t, y = batch
    ours = dkd_loss(s, t, y, alpha, beta, T)
    assert torch.allclose(ours, mdistiller_dkd(s, t, y, alpha, beta, T), atol=1e-8)


def test_swap_makes_the_label_the_teacher_argmax(batch):
    _, t, y = batch
    assert (swap_rectify(t, y).argmax(1) == y).all()


def test_swap_keeps_the_multiset_of_probabilities(batch):
    _, t, y = batch
    before = F.softmax(t / 4, 1).sort(1).values
    after = F.softmax(swap_rectify(t, y) / 4, 1).sort(1).values
    assert torch.allclose(before, after)


def test_swap_leaves_right_rows_and_other_classes_untouched(batch):
    _, t, y = batch
    swapped = swap_rectify(t, y)
    right = t.argmax(1) == y
    assert right.any() and (~right).any()
    assert torch.equal(swapped[right], t[right])
    pred = t.argmax(1)
    untouched = torch.ones_like(t, dtype=torch.bool)
    untouched[torch.arange(len(y)), y] = False
    untouched[torch.arange(len(y)), pred] = False
    assert torch.equal(swapped[untouched], t[untouched])


def test_dynamic_weight_falls_from_one_to_zero():
    E = 10
    values = [dynamic_weight(e, E) for e in range(E + 1)]
    assert values[0] == 1.0 and math.isclose(values[-1], 0.0, abs_tol=1e-12)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert math.isclose(dynamic_weight(5, 10), 0.5)


def _loss(name, s, t, y, **kw):
    kw.setdefault("epoch", 0)
    kw.setdefault("epochs", 10)
    return strategy_loss(s, t, y, strategy=parse_strategy(name), temperature=4.0, lam=0.5, **kw)


def test_vanilla_kd_strategy_is_lam_ce_plus_kd(batch):
    s, t, y = batch
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * kd_loss(s, t, 4.0)
    assert torch.allclose(_loss("kd", s, t, y).total, expected)


def test_bias_elimination_drops_wrong_rows_from_distillation(batch):
    s, t, y = batch
    right = t.argmax(1) == y
    parts = _loss("kd+be", s, t, y)
    kd_right = F.kl_div(F.log_softmax(s[right] / 4, 1), F.softmax(t[right] / 4, 1),
                        reduction="none").sum(1).sum() * 16 / len(y)
    assert torch.allclose(parts.total, 0.5 * F.cross_entropy(s, y) + 0.5 * kd_right)


def test_rectification_with_batch_normalisation_is_kd_on_swapped_teacher(batch):
    s, t, y = batch
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * kd_loss(s, swap_rectify(t, y), 4.0)
    assert torch.allclose(_loss("kd+be+br", s, t, y).total, expected)


def test_subset_normalisation_averages_each_subset_over_its_own_size(batch):
    s, t, y = batch
    wrong = t.argmax(1) != y
    strategy = parse_strategy("kd+be+br", normalisation="subset")
    parts = strategy_loss(s, t, y, strategy=strategy, epoch=0, epochs=10)
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * (
        kd_loss(s[~wrong], t[~wrong], 4.0) + kd_loss(s[wrong], swap_rectify(t, y)[wrong], 4.0))
    assert torch.allclose(parts.total, expected)


def test_dynamic_learning_moves_weight_from_right_to_rectified(batch):
    s, t, y = batch
    start = _loss("kd+be+br+dl", s, t, y, epoch=0, epochs=10)
    end = _loss("kd+be+br+dl", s, t, y, epoch=10, epochs=10)
    ce = F.cross_entropy(s, y)
    assert torch.allclose(start.total, 0.5 * ce + 0.5 * torch.tensor(start.right, dtype=s.dtype))
    assert torch.allclose(end.total, 0.5 * ce + 0.5 * torch.tensor(end.rect, dtype=s.dtype))


@pytest.mark.parametrize("name", ["kd+be", "kd+be+br", "kd+be+br+dl", "btkd", "dkd+be+br+dl"])
@pytest.mark.parametrize("case", ["always_right", "always_wrong"])
def test_no_nan_when_teacher_always_right_or_always_wrong(name, case):
    s = torch.randn(8, 5, requires_grad=True)
    y = torch.arange(8) % 5
    t = F.one_hot(y, 5).float() * 5
    if case == "always_wrong":
        t = F.one_hot((y + 1) % 5, 5).float() * 5
    strategy = parse_strategy(name)
    parts = strategy_loss(s, t, y, strategy=strategy, epoch=3, epochs=10)
    assert torch.isfinite(parts.total)
    parts.total.backward()
    assert torch.isfinite(s.grad).all()


def test_unlabelled_rows_get_plain_kd_and_no_ce(batch):
    s, t, y = batch
    y = y.clone()
    y[32:] = UNLABELLED
    parts = _loss("kd+be+br+dl", s, t, y, epoch=5, epochs=10)
    transfer = F.kl_div(F.log_softmax(s[32:] / 4, 1), F.softmax(t[32:] / 4, 1),
                        reduction="none").sum(1).sum() * 16 / 64
    assert math.isclose(parts.transfer, float(transfer), rel_tol=1e-9)
    assert math.isclose(parts.ce, float(F.cross_entropy(s[:32], y[:32])), rel_tol=1e-9)


@pytest.mark.parametrize("name", ["kd", "kd+be+br+dl", "dkd+be+br"])
def test_a_batch_of_only_unlabelled_rows_is_plain_kd_with_finite_gradients(batch, name):
    s, t, _ = batch
    s = s.clone().requires_grad_()
    y = torch.full((len(s),), UNLABELLED)
    parts = _loss(name, s, t, y, epoch=5, epochs=10)
    parts.total.backward()
    warmup = 6 / 20 if name.startswith("dkd") else 1.0  # dkd's warm-up scales all of D
    assert torch.allclose(parts.total, kd_loss(s, t, 4.0) * warmup)
    assert torch.isfinite(s.grad).all() and parts.ce == 0.0


def test_ce_strategy_ignores_the_teacher(batch):
    s, t, y = batch
    assert torch.allclose(_loss("ce", s, t, y).total, F.cross_entropy(s, y))


def test_dkd_strategy_warms_up_linearly(batch):
    s, t, y = batch
    strategy = parse_strategy("dkd")
    first = strategy_loss(s, t, y, strategy=strategy, epoch=0, epochs=40, method=DKD(warmup=20))
    later = strategy_loss(s, t, y, strategy=strategy, epoch=30, epochs=40, method=DKD(warmup=20))
    ce = F.cross_entropy(s, y)
    dkd = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    assert torch.allclose(first.total, 0.5 * ce + 0.5 * dkd / 20)
    assert torch.allclose(later.total, 0.5 * ce + 0.5 * dkd)


def test_btkd_is_the_papers_exact_recipe():
    s = parse_strategy("btkd")
    assert (s.base, s.be, s.br, s.dl, s.normalisation) == ("kd", True, True, True, "subset")


@pytest.mark.parametrize("bad", ["xx", "kd+zz", "kd+be+be", "ce+be", "kd+dl"])
def test_bad_strategy_names_are_data_errors(bad):
    with pytest.raises(DataError):
        parse_strategy(bad)


def test_strategy_name_is_canonical():
    assert parse_strategy("kd+dl+br+be").name == "kd+be+br+dl"


def test_dkd_options_reach_the_loss(batch):
    s, t, y = batch
    parts = strategy_loss(s, t, y, strategy=parse_strategy("dkd"), epoch=0, epochs=40,
                          method=DKD(alpha=0.5, beta=2.0, warmup=0))
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * dkd_loss(s, t, y, 0.5, 2.0, 4.0)
    assert torch.allclose(parts.total, expected)


def test_every_distilling_base_has_a_method_with_its_defaults():
    from kdcore.learning.strategies import BASES

    assert set(METHODS) == set(BASES) - {"ce"}
    assert method_for("kd") == KD() and method_for("dkd") == DKD(1.0, 8.0, 20)
    assert method_for("dkd", {"beta": 2.0}) == DKD(beta=2.0)


@pytest.mark.parametrize(("base", "options", "message"), [
    ("dkd", {"gamma": 1.0}, "dkd has no option gamma; it takes alpha, beta, warmup"),
    ("kd", {"alpha": 1.0}, "kd has no option alpha; it takes no options"),
    ("ce", {}, "base loss 'ce' does not distil"),
])
def test_unknown_method_options_are_data_errors(base, options, message):
    with pytest.raises(DataError, match=message):
        method_for(base, options)


def test_strategy_names_are_read_without_torch():
    code = ("import sys, kdcore.learning.strategies as s; s.strategy_order(['kd', 'ce']); "
            "assert 'torch' not in sys.modules, 'strategies imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_strategy_order_and_bias_awareness_are_read_from_the_names():
    from kdcore.learning.strategies import is_bias_aware, strategy_order

    names = ["dkd+be+br+dl", "btkd", "kd+be+br", "kd", "ce", "kd+be", "dkd"]
    assert strategy_order(names) == ["ce", "kd", "kd+be", "kd+be+br", "btkd", "dkd",
                                     "dkd+be+br+dl"]
    assert [is_bias_aware(n) for n in ("ce", "kd", "kd+be", "btkd", "kd+zz", None)] == [
        False, False, True, True, False, False]


def _autograd_reference(name, s, t, y, epoch, epochs):
    """strategy_loss written with plain autograd ops (swap_rectify + kd_per_sample), batch norm."""
    strategy = parse_strategy(name)
    labelled = y != UNLABELLED
    ce = F.cross_entropy(s[labelled], y[labelled])
    wrong = labelled & (t.argmax(1) != y) if strategy.bias_aware else torch.zeros_like(labelled)
    teacher = swap_rectify(t, torch.where(wrong, y, t.argmax(1))) if strategy.br else t
    b = dynamic_weight(epoch, epochs) if strategy.dl else 1.0
    w_wrong = ((1 - b) if strategy.dl else 1.0) if strategy.br else 0.0
    w = torch.where(wrong, w_wrong, torch.where(labelled, b, 1.0))
    distill = (w * kd_per_sample(s, teacher, temperature=4.0)).mean()
    return 0.5 * ce + 0.5 * distill


@pytest.mark.parametrize("name", ["kd", "kd+be", "kd+be+br", "kd+be+br+dl"])
@pytest.mark.parametrize("with_unlabelled", [False, True])
def test_fused_kd_matches_autograd_in_value_and_gradient(batch, name, with_unlabelled):
    s, t, y = batch
    if with_unlabelled:
        y = y.clone()
        y[::5] = UNLABELLED
    ours_s, ref_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = strategy_loss(ours_s, t, y, strategy=parse_strategy(name), epoch=3, epochs=10).total
    ref = _autograd_reference(name, ref_s, t, y, epoch=3, epochs=10)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.allclose(ours_s.grad, ref_s.grad, atol=1e-12)


def test_weighted_kd_passes_gradcheck_and_returns_per_sample_kd(batch):
    s, t, y = batch
    s = s[:12].clone().requires_grad_()
    t, y = t[:12], y[:12]
    swap = (t.argmax(1), y)
    weights = torch.linspace(0.1, 1.0, 12, dtype=torch.float64)
    for w in (weights, 0.25):
        assert torch.autograd.gradcheck(
            lambda x, w=w: weighted_kd(x, t, temperature=4.0, weights=w, swap=swap)[0], (s,))
    _, per_sample = weighted_kd(s, t, temperature=4.0, weights=weights, swap=swap)
    expected = kd_per_sample(s, swap_rectify(t, y), temperature=4.0)
    assert not per_sample.requires_grad
    assert torch.allclose(per_sample, expected, atol=1e-12)


def test_weighted_kd_gives_a_teacher_that_needs_gradients_its_gradient(batch):
    s, t, y = batch
    t = t.clone().requires_grad_()
    total, _ = weighted_kd(s, t, temperature=4.0, weights=0.5, swap=(t.argmax(1), y))
    total.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_a_cached_teacher_argmax_gives_the_same_loss(batch):
    s, t, y = batch
    strategy = parse_strategy("kd+be+br+dl")
    fresh = strategy_loss(s, t, y, strategy=strategy, epoch=3, epochs=10)
    cached = strategy_loss(s, t, y, strategy=strategy, epoch=3, epochs=10,
                           teacher_predicted=t.argmax(1))
    assert torch.equal(fresh.total, cached.total) and fresh.n_wrong == cached.n_wrong > 0
