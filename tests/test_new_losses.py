"""Pins LS, DIST and RLD (issue 17) to their authors' formulas, and how the bias-aware parts
compose with them: the invariants, the refusals, the plain names and the method options."""

import json

import pytest
import torch
import torch.nn.functional as F

from kdcore.errors import DataError
from kdcore.learning.losses import (
    DIST,
    LS,
    METHODS,
    RLD,
    UNLABELLED,
    dist_per_sample,
    dynamic_weight,
    kd_per_sample,
    method_for,
    parse_strategy,
    rld_per_sample,
    standardize,
    strategy_loss,
    swap_rectify,
)
from kdcore.learning.strategies import CATALOGUE, REFUSED_PARTS, plain_name, strategy_order
from kdcore.losses import dist_loss, ls_kd_loss, rld_loss


def authors_ls_kd(s, t, T):
    """sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py: ``normalize`` (mean,
    unbiased std, 1e-7 added to the std), then ``kd_loss`` with logit_stand: kl_div(...,
    reduction="none").sum(1).mean() * T^2."""
    def normalize(z):
        return (z - z.mean(dim=-1, keepdims=True)) / (1e-7 + z.std(dim=-1, keepdims=True))

    log_pred_student = F.log_softmax(normalize(s) / T, dim=1)
    pred_teacher = F.softmax(normalize(t) / T, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * T**2


def authors_dist(s, t, beta, gamma, tau):
    """hunto/image_classification_sota, lib/models/losses/dist_kd.py (``cosine_similarity`` with
    eps 1e-8, ``pearson_correlation``, inter/intra relation), with tau as in the DIST authors'
    tau version and torchdistill's DISTLoss: both terms times tau^2 on softmax(z / tau)."""
    def cosine_similarity(a, b, eps=1e-8):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def pearson_correlation(a, b):
        return cosine_similarity(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))

    def inter_class_relation(y_s, y_t):
        return 1 - pearson_correlation(y_s, y_t).mean()

    y_s, y_t = (s / tau).softmax(dim=1), (t / tau).softmax(dim=1)
    inter = tau**2 * inter_class_relation(y_s, y_t)
    intra = tau**2 * inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))
    return beta * inter + gamma * intra


def authors_rld(s, t, target, alpha, beta, T, alpha_T):
    """zju-SWJ/RLD, mdistiller/distillers/RLD.py ``rld_loss`` (logit_stand off): SCD, the binary
    (label vs rest) student against the binary (teacher's max vs rest) teacher at alpha_T,
    batchmean, times alpha_T^2; MCD, KL over the classes the teacher ranks below the label (the
    ``>=`` mask filled with -1e9), batchmean, times T^2; alpha * SCD + beta * MCD."""
    def gt_mask(z, index):
        return torch.zeros_like(z).scatter_(1, index.unsqueeze(1), 1).bool()

    def cat_mask(p, mask1, mask2):
        return torch.cat([(p * mask1).sum(1, keepdim=True), (p * mask2).sum(1, keepdim=True)], 1)

    student_gt, teacher_max = gt_mask(s, target), gt_mask(t, t.argmax(1))
    pred_student = cat_mask(F.softmax(s / alpha_T, 1), student_gt, ~student_gt)
    pred_teacher = cat_mask(F.softmax(t / alpha_T, 1), teacher_max, ~teacher_max)
    scd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="batchmean") * alpha_T**2
    mask = t >= torch.gather(t, 1, target.unsqueeze(1))
    log_s2 = F.log_softmax((s / T).masked_fill(mask, -1e9), dim=1)
    p_t2 = F.softmax((t / T).masked_fill(mask, -1e9), dim=1)
    mcd = F.kl_div(log_s2, p_t2, reduction="batchmean") * T**2
    return alpha * scd + beta * mcd


@pytest.fixture
def right_batch(batch):
    """The same logits, every row labelled with the teacher's argmax: no row is wrong."""
    s, t, _ = batch
    return s, t, t.argmax(1)


def _loss(name, s, t, y, **kw):
    kw.setdefault("epoch", 3)
    kw.setdefault("epochs", 10)
    kw.setdefault("method", method_for(parse_strategy(name).base, {"warmup": 0}
                                       if parse_strategy(name).base == "rld" else None))
    return strategy_loss(s, t, y, strategy=parse_strategy(name), temperature=4.0, lam=0.5, **kw)


# ---------------------------------------------------------------- the authors' formulas

@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_ls_kd_loss_equals_the_authors_kd_with_logit_standardisation(batch, T):
    s, t, _ = batch
    torch.testing.assert_close(ls_kd_loss(s, t, T), authors_ls_kd(s, t, T), rtol=1e-12, atol=0)


def test_ls_kd_loss_ignores_each_rows_shift_and_scale(batch):
    s, t, _ = batch
    shifted = s * torch.rand(len(s), 1, dtype=s.dtype).add(0.5) + torch.randn(len(s), 1)
    torch.testing.assert_close(ls_kd_loss(shifted, t, 4.0), ls_kd_loss(s, t, 4.0))


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_loss_equals_the_authors_dist(batch, beta, gamma, tau):
    s, t, _ = batch
    torch.testing.assert_close(dist_loss(s, t, beta, gamma, tau),
                               authors_dist(s, t, beta, gamma, tau), rtol=1e-12, atol=1e-14)


def test_dist_loss_defaults_are_the_authors():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    torch.testing.assert_close(dist_loss(s, t), authors_dist(s, t, 1.0, 1.0, 1.0))


@pytest.mark.parametrize(("alpha", "beta", "T", "alpha_T"),
                         [(1.0, 8.0, 4.0, 1.0), (0.5, 2.0, 2.0, 3.0)])
def test_rld_loss_equals_the_authors_rld(batch, alpha, beta, T, alpha_T):
    s, t, y = batch
    torch.testing.assert_close(rld_loss(s, t, y, alpha, beta, T, alpha_T),
                               authors_rld(s, t, y, alpha, beta, T, alpha_T),
                               rtol=1e-10, atol=1e-12)


def test_rld_loss_defaults_are_the_authors_and_edge_rows_stay_finite():
    """A label at the teacher's top (MCD over every other class) and at its bottom (every
    class masked: MCD 0, as the authors' -1e9 fill gives), in float32."""
    t = torch.tensor([[3.0, 1.0, 0.0, -2.0], [3.0, 1.0, 0.0, -2.0], [0.5, 2.0, 1.0, 0.0]])
    s = torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.0, 1.0, 0.0, 1.0], [2.0, 1.0, 0.0, 1.0]],
                     requires_grad=True)
    y = torch.tensor([0, 3, 2])
    ours = rld_loss(s, t, y)
    torch.testing.assert_close(ours, authors_rld(s, t, y, 1.0, 8.0, 4.0, 1.0))
    ours.backward()
    assert torch.isfinite(s.grad).all()


def _per_row(name, s, t, y, rows=None, *, autograd=False):
    """The closed-form path (a frozen teacher), or with ``autograd`` autograd's: a teacher that
    needs gradients for DIST and RLD, torch's own mean and std for LS's z-score."""
    if name == "ls":
        def z(x):
            return (x - x.mean(1, keepdim=True)) / (1e-7 + x.std(1, keepdim=True))
        scored = z if autograd else standardize
        return kd_per_sample(scored(s), scored(t), temperature=2.0)
    t = t.clone().requires_grad_() if autograd else t
    if name == "dist":
        return dist_per_sample(s, t, tau=2.0, beta=0.7, gamma=1.3, rows=rows)
    return rld_per_sample(s, t, y, temperature=2.0, alpha=0.7, beta=3.0, alpha_temperature=1.5)


@pytest.mark.parametrize("name", ["ls", "dist", "rld"])
@pytest.mark.parametrize("kept", [None, "some"])
def test_the_closed_form_backward_matches_autograd_and_passes_gradcheck(batch, name, kept):
    s, t, y = batch
    y = y.clone()
    y[0], y[1] = t[0].argmin(), t[1].argmax()  # RLD: every class masked; none over the label
    rows = None if kept is None else torch.arange(len(y)) % 3 != 0
    w = torch.rand(len(y), dtype=s.dtype, generator=torch.Generator().manual_seed(2))
    fused_s, plain_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    fused = _per_row(name, fused_s, t, y, rows)
    plain = _per_row(name, plain_s, t, y, rows, autograd=True)
    (fused * w).sum().backward()
    (plain * w).sum().backward()
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_s.grad, plain_s.grad, rtol=1e-10, atol=1e-12)
    small = s[:6].clone().requires_grad_()
    part = None if rows is None else rows[:6]
    assert torch.autograd.gradcheck(lambda z: _per_row(name, z, t[:6], y[:6], part), (small,))


# ---------------------------------------------------------------- the bases in training

@pytest.mark.parametrize(("name", "reference"), [
    ("ls", lambda s, t, y: ls_kd_loss(s, t, 4.0)),
    ("dist", lambda s, t, y: dist_loss(s, t, tau=4.0)),
    ("rld", lambda s, t, y: rld_loss(s, t, y, temperature=4.0)),
])
def test_each_base_strategy_is_lam_ce_plus_its_loss_at_the_temperature(batch, name, reference):
    s, t, y = batch
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * reference(s, t, y)
    torch.testing.assert_close(_loss(name, s, t, y).total, expected)


def test_the_ls_gradient_through_the_fused_kd_equals_autograd(batch):
    s, t, y = batch
    fused = s.clone().requires_grad_()
    _loss("ls+be+br+dl", fused, t, y).total.backward()
    plain = s.clone().requires_grad_()
    right = t.argmax(1) == y
    b = dynamic_weight(3, 10)
    per_row = LS().per_sample(plain, swap_rectify(t, y), y, temperature=4.0)
    weights = torch.where(right, b, 1 - b) / len(y)
    (0.5 * F.cross_entropy(plain, y) + 0.5 * (per_row * weights).sum()).backward()
    torch.testing.assert_close(fused.grad, plain.grad)


def test_rld_warms_up_over_20_epochs_like_the_authors(batch):
    s, t, y = batch
    ce, rld = F.cross_entropy(s, y), rld_loss(s, t, y)
    first = _loss("rld", s, t, y, epoch=0, method=RLD())
    later = _loss("rld", s, t, y, epoch=19, method=RLD())
    torch.testing.assert_close(first.total, 0.5 * ce + 0.5 * rld / 20)
    torch.testing.assert_close(later.total, 0.5 * ce + 0.5 * rld)


def test_unlabelled_rows_get_ls_and_dist_themselves_and_kd_under_rld(batch):
    s, t, y = batch
    y = y.clone()
    y[40:] = UNLABELLED
    ce = F.cross_entropy(s[:40], y[:40])
    torch.testing.assert_close(_loss("ls", s, t, y).total, 0.5 * ce + 0.5 * ls_kd_loss(s, t, 4.0))
    torch.testing.assert_close(_loss("dist", s, t, y).total,
                               0.5 * ce + 0.5 * dist_loss(s, t, tau=4.0))
    per_row = torch.cat([RLD().per_sample(s[:40], t[:40], y[:40], temperature=4.0),
                         kd_per_sample(s[40:], t[40:], temperature=4.0)])
    torch.testing.assert_close(_loss("rld", s, t, y).total, 0.5 * ce + 0.5 * per_row.mean())


# ---------------------------------------------------------------- the parts on each base

@pytest.mark.parametrize("name", ["ls+be", "ls+be+br", "dist+be", "dist+be+br", "rld+be",
                                  "ls+be+br+lq", "dist+br"])
def test_on_a_batch_of_right_rows_be_and_br_equal_the_base(right_batch, name):
    s, t, y = right_batch
    base = name.split("+")[0]
    assert torch.equal(_loss(name, s, t, y).total, _loss(base, s, t, y).total)


@pytest.mark.parametrize("name", ["ls+be+br", "dist+be+br", "rld+be", "ls+be", "dist+be"])
@pytest.mark.parametrize("normalisation", ["batch", "subset"])
def test_dl_only_reweights_the_rows(batch, name, normalisation):
    """With +dl each row's distillation value is the same as without; only the weights move:
    b on right rows, 1 - b on rectified ones (0 on the rows BE drops)."""
    s, t, y = batch
    y = y.clone()
    y[56:] = UNLABELLED
    epoch = 4
    b = dynamic_weight(epoch, 10)
    plain = strategy_loss(s, t, y, strategy=parse_strategy(name, normalisation=normalisation),
                          epoch=epoch, epochs=10, method=_method(name))
    scheduled = strategy_loss(s, t, y, strategy=parse_strategy(name + "+dl",
                                                               normalisation=normalisation),
                              epoch=epoch, epochs=10, method=_method(name))
    assert torch.equal(plain.per_sample, scheduled.per_sample)
    labelled, wrong = y != UNLABELLED, (t.argmax(1) != y) & (y != UNLABELLED)
    right = labelled & ~wrong
    w_wrong = (1 - b) if "br" in name else 0.0
    if normalisation == "batch":
        weights = torch.where(wrong, w_wrong, torch.where(right, b, 1.0)) / len(y)
    else:
        weights = torch.where(wrong, w_wrong / wrong.sum(),
                              torch.where(right, b / right.sum(), 1.0 / (~labelled).sum()))
    ce = F.cross_entropy(s, y, ignore_index=UNLABELLED)
    torch.testing.assert_close(scheduled.total, 0.5 * ce + 0.5 * (weights * plain.per_sample).sum())


def _method(name):
    return method_for(name.split("+")[0], {"warmup": 0} if name.startswith("rld") else None)


def test_dist_be_drops_the_wrong_rows_from_both_terms(batch):
    s, t, y = batch
    right = t.argmax(1) == y
    ce = F.cross_entropy(s, y)
    only_right = dist_loss(s[right], t[right], tau=4.0)
    torch.testing.assert_close(_loss("dist+be", s, t, y).total,
                               0.5 * ce + 0.5 * only_right * right.sum() / len(y))
    subset = strategy_loss(s, t, y, strategy=parse_strategy("dist+be", normalisation="subset"),
                           epoch=3, epochs=10, temperature=4.0)
    torch.testing.assert_close(subset.total, 0.5 * ce + 0.5 * only_right)


def test_dist_br_rectifies_the_teacher_before_the_softmax(batch):
    s, t, y = batch
    expected = 0.5 * F.cross_entropy(s, y) + 0.5 * dist_loss(s, swap_rectify(t, y), tau=4.0)
    torch.testing.assert_close(_loss("dist+be+br", s, t, y).total, expected)


@pytest.mark.parametrize("name", ["ls+be+br+dl", "dist+be+br+dl", "dist+be", "rld+be+dl"])
@pytest.mark.parametrize("case", ["always_right", "always_wrong"])
def test_no_nan_when_the_teacher_is_always_right_or_always_wrong(name, case):
    s = torch.randn(8, 5, requires_grad=True)
    y = torch.arange(8) % 5
    t = F.one_hot(y if case == "always_right" else (y + 1) % 5, 5).float() * 5
    parts = strategy_loss(s, t, y, strategy=parse_strategy(name), epoch=3, epochs=10)
    parts.total.backward()
    assert torch.isfinite(parts.total) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- names, refusals, options

@pytest.mark.parametrize("bad", ["rld+br", "rld+be+br", "rld+br+dl", "rld+be+br+dl+lq"])
def test_rld_with_rectification_is_refused_with_the_reason(bad):
    with pytest.raises(DataError, match=r"rld\+br is refused: rld already moves the teacher's "
                                        "top confidence onto the label") as caught:
        parse_strategy(bad)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("good", ["ls+be+br+dl+lq", "dist+be+br+dl+lq", "dist+br", "rld+be+dl",
                                  "rld+be+lq"])
def test_the_parts_that_apply_are_accepted(good):
    assert parse_strategy(good).name == good


def test_every_refusal_names_a_base_and_a_part():
    from kdcore.learning.strategies import BASES, PARTS

    assert all(base in BASES and part in PARTS for base, part in REFUSED_PARTS)


@pytest.mark.parametrize(("code", "words"), [
    ("kd+be+br+dl", "KD, bias removed, rectified, scheduled"),
    ("kd+dl+br+be", "KD, bias removed, rectified, scheduled"),
    ("ce", "labels only"),
    ("btkd", "the paper's exact recipe"),
    ("ls", "logit-standardised KD"),
    ("dist", "DIST (correlation KD)"),
    ("rld", "refined-logit KD"),
    ("dist+be+br+dl+lq", "DIST (correlation KD), bias removed, rectified, scheduled, "
                         "label-error aware"),
])
def test_plain_names_are_composed_from_the_table(code, words):
    assert plain_name(code) == words


def test_every_catalogue_entry_has_a_plain_name_and_bad_names_are_refused():
    assert len({plain_name(name) for name in CATALOGUE}) == len(CATALOGUE)
    with pytest.raises(DataError):
        plain_name("kd+zz")


def test_the_new_bases_are_in_the_catalogue_and_in_reading_order():
    assert {"ls", "dist", "rld"} <= set(CATALOGUE)
    names = ["rld", "dist+be", "ls", "dkd", "kd", "ce", "dist", "btkd", "rld+be"]
    assert strategy_order(names) == ["ce", "kd", "btkd", "dkd", "ls", "dist", "dist+be", "rld",
                                     "rld+be"]


def test_each_method_owns_its_options_with_the_authors_defaults():
    assert {"ls": LS, "dist": DIST, "rld": RLD} == {k: METHODS[k] for k in ("ls", "dist", "rld")}
    assert method_for("ls") == LS()
    assert method_for("dist") == DIST(beta=1.0, gamma=1.0)
    assert method_for("rld") == RLD(alpha=1.0, beta=8.0, alpha_temperature=1.0, warmup=20)
    typed = method_for("rld", {"alpha_temperature": 2, "warmup": 10.0})
    assert typed == RLD(alpha_temperature=2.0, warmup=10)
    assert isinstance(typed.alpha_temperature, float) and isinstance(typed.warmup, int)


@pytest.mark.parametrize(("base", "options", "message"), [
    ("ls", {"beta": 1.0}, "ls has no option beta; it takes no options"),
    ("dist", {"tau": 2.0}, "dist has no option tau; it takes beta, gamma"),
    ("rld", {"alpha_temperature": 0.0}, "alpha_temperature = 0.0 is out of range; give a number "
                                        "above 0"),
    ("rld", {"warmup": 1.5}, "rld option warmup = 1.5 is out of range; give a whole number"),
    ("dist", {"beta": float("nan")}, "dist option beta = nan is out of range"),
])
def test_bad_method_options_are_one_line_data_errors(base, options, message):
    with pytest.raises(DataError, match=message):
        method_for(base, options)


def test_cli_method_option_reaches_the_stored_config(workspace, capsys):
    from kdcore.cli import main
    from kdcore.store.runs import RunStore

    ws = ["--workspace", str(workspace)]
    assert main(["train", "--strategy", "rld", "--epochs", "1", "--method-option",
                 "alpha_temperature=2", "--json", *ws]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    assert RunStore(workspace).get(run_id).config["method_options"] == {
        "alpha": 1.0, "beta": 8.0, "alpha_temperature": 2.0, "warmup": 20}
    for args, message in ((["--strategy", "rld+br"], "rld+br is refused"),
                          (["--strategy", "dist", "--method-option", "tau=2"],
                           "dist has no option tau"),
                          (["--strategy", "rld", "--method-option", "alpha=x"],
                           "--method-option 'alpha=x': give KEY=NUMBER")):
        assert main(["train", *args, "--epochs", "1", *ws]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert len(RunStore(workspace).list()) == 1  # nothing half-written by the refusals
