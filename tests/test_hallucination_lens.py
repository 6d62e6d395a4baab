"""Tests for hallucination_lens.py: the lenses, the log-odds curves, the detectors and their
splits, the three cases, the knowledge base, one training step and a smoke run."""

import json
import math
import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import hallucination_lens as hl


def tiny_model(seed=0, vocab=11, block=5, d=16, layers=2, heads=2):
    torch.manual_seed(seed)
    return hl.TinyLM(vocab, block, d, layers, heads).eval()


def readout(log_odds_out, log_odds_gold, out=None, top1_out=None, top1_gold=None):
    """A hand-built Readout: entropy = 10 * index so features can be traced."""
    N, P = log_odds_out.shape
    no_top1 = torch.zeros(N, P, dtype=torch.bool)
    return hl.Readout(out=torch.zeros(N, dtype=torch.long) if out is None else out,
                      log_odds_out=log_odds_out, log_odds_gold=log_odds_gold,
                      entropy=torch.arange(N * P, dtype=torch.float).reshape(N, P) * 10,
                      top1_out=no_top1 if top1_out is None else top1_out,
                      top1_gold=no_top1 if top1_gold is None else top1_gold)


# --- the lenses ---


def test_logit_lens_last_point_is_the_model_output():
    model = tiny_model()
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs = hl.logit_lens(model.hiddens(tokens), model.ln_f, model.head.weight)
        assert probs.shape == (3, 1 + 2 * 2, 11)  # points: embedding, attn1, mlp1, attn2, mlp2
        assert_close(probs[:, -1], model(tokens).softmax(-1))
        assert_close(probs.sum(-1), torch.ones(3, 5))
        # the first point reads the embedding alone: softmax(W_U · LN_f(tok[x_T] + pos[T-1]))
        h0 = model.tok.weight[tokens[:, -1]] + model.pos.weight[4]
        assert_close(probs[:, 0], model.head(model.ln_f(h0)).softmax(-1))


def halve(x):
    return x / 2


def test_logit_lens_applies_the_final_norm_first():
    # norm = x / 2, W_U = [[1, 0], [0, 1]]: h = (ln 4, 0) -> logits (ln 2, 0) -> p = (2/3, 1/3)
    h = torch.tensor([[[math.log(4.0), 0.0]]])  # (N=1, P=1, d=2)
    probs = hl.logit_lens(h, halve, torch.eye(2))
    assert_close(probs, torch.tensor([[[2 / 3, 1 / 3]]]))
    # float32 probabilities whatever the residual's dtype (bf16 under autocast, float64 here)
    eye = torch.eye(2, dtype=torch.float64)
    assert hl.logit_lens(h.double(), halve, eye).dtype == torch.float32


def test_logit_lens_checks_shapes():
    with pytest.raises(ValueError):
        hl.logit_lens(torch.zeros(2, 3, 4), torch.nn.Identity(), torch.zeros(4))  # W_U not (V, d)
    with pytest.raises(ValueError):
        hl.logit_lens(torch.zeros(2, 3, 5), torch.nn.Identity(), torch.zeros(7, 4))  # d 5 vs 4


def test_tuned_lens_hand_example():
    # d = 1, one point: h = [0, 1, 2], final = [1, 3, 5] -> final = 2 h + 1 exactly: A = 2, b = 1
    h = torch.tensor([[[0.0]], [[1.0]], [[2.0]]])  # (N=3, P=1, d=1)
    final = torch.tensor([[1.0], [3.0], [5.0]])
    W = hl.fit_tuned_lens(h, final, ridge=0.0)
    assert_close(W, torch.tensor([[[2.0], [1.0]]]), atol=1e-5, rtol=0)
    assert_close(hl.apply_tuned_lens(W, h)[:, 0], final, atol=1e-5, rtol=0)
    # ridge 1, N = 3: X = [[0, 1], [1, 1], [2, 1]], XᵀX + 3 I = [[8, 3], [3, 6]], XᵀY = [13, 9];
    # det 39 -> A = (6·13 - 3·9) / 39 = 17/13, b = (8·9 - 3·13) / 39 = 11/13
    W_ridge = hl.fit_tuned_lens(h, final, ridge=1.0)
    assert_close(W_ridge, torch.tensor([[[17 / 13], [11 / 13]]]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        hl.fit_tuned_lens(h, final[:, 0])  # (N,) where (N, d) is meant
    with pytest.raises(ValueError):
        hl.apply_tuned_lens(W, torch.zeros(3, 2, 1))  # two points, W has one


def test_tuned_lens_recovers_known_affine_maps():
    g = torch.Generator().manual_seed(0)
    N, P, d = 300, 3, 4
    final = torch.randn(N, d, generator=g, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    A = torch.randn(P, d, d, generator=g, dtype=torch.float64) + 3 * eye
    b = torch.randn(P, d, generator=g, dtype=torch.float64)
    # build h_p so that final = h_p A_p + b_p holds exactly: h_p = (final - b_p) A_p^{-1}
    h = torch.stack([(final - b[p]) @ torch.linalg.inv(A[p]) for p in range(P)], 1)  # (N, P, d)
    W = hl.fit_tuned_lens(h, final, ridge=0.0)
    assert W.shape == (P, d + 1, d)
    assert_close(W[:, :-1], A, atol=1e-6, rtol=0)
    assert_close(W[:, -1], b, atol=1e-6, rtol=0)
    assert_close(hl.apply_tuned_lens(W, h), final[:, None].expand(N, P, d), atol=1e-6, rtol=0)


def test_tuned_lens_is_fitted_toward_the_last_point_on_the_fit_rows():
    # point 0 -> last point is h_final = 2 h_0 + 1 on the fit rows; point 1 is noise
    g = torch.Generator().manual_seed(0)
    N, d = 200, 3
    h0 = torch.randn(N, d, generator=g, dtype=torch.float64)
    H = torch.stack([h0, torch.randn(N, d, generator=g, dtype=torch.float64), 2 * h0 + 1], 1)
    fit = torch.arange(N) < 150
    H[~fit, 2] = -5.0  # the other rows break the relation: a fit on them would not recover it
    tuned = hl.tuned_lens_hiddens(H, fit)
    assert tuned.shape == (N, 3, d)
    assert_close(tuned[:, 0], 2 * h0 + 1, atol=1e-3, rtol=0)  # mapped to the final point
    assert_close(tuned[:, 2], H[:, 2], atol=1e-3, rtol=0)  # the last point maps to itself


# --- curves and scores ---


def test_token_log_odds_hand_values():
    # p = (0.5, 0.25, 0.25): logit p[0] = log(0.5 / 0.5) = 0; logit p[1] = log(0.25 / 0.75) = -log 3
    probs = torch.tensor([[[0.5, 0.25, 0.25]], [[0.5, 0.25, 0.25]]])  # (N=2, P=1, V=3)
    lo = hl.token_log_odds(probs, torch.tensor([0, 1]))
    assert_close(lo, torch.tensor([[0.0], [-math.log(3.0)]]))
    # near 1 the rest is summed, not taken as 1 - p: p = (1 - 1e-9, 1e-9) in float32 rounds the
    # first to 1, yet logit = log(1) - log(1e-9) = 20.723
    sure = torch.tensor([[[1 - 1e-9, 1e-9]]])
    assert_close(hl.token_log_odds(sure, torch.tensor([0])), torch.tensor([[20.7233]]))
    # exact 0 and 1 stay finite: log(1e-30) - log(1) = -69.0776 and its negative
    edge = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    expected = torch.tensor([[-69.0776], [69.0776]])
    assert_close(hl.token_log_odds(edge, torch.tensor([0, 0])), expected)
    with pytest.raises(ValueError):
        hl.token_log_odds(probs, torch.tensor([[0], [1]]))  # (N, 1) where (N,) is meant


def test_entropy_hand_values():
    # uniform over 4: log 4; a one-hot: 0
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert_close(hl.entropy(probs), torch.tensor([math.log(4.0), 0.0]))


def test_balanced_accuracy_hand_count():
    # pred [1,0,1,1] vs y [1,0,0,1]: TPR = 2/2 = 1, TNR = 1/2 -> (1 + 0.5) / 2 = 0.75
    assert hl.balanced_accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 1])) == 0.75
    # all predicted 0 on a 3:1 set: plain accuracy would be 0.75, balanced is (0 + 1) / 2 = 0.5
    assert hl.balanced_accuracy(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1])) == 0.5
    # a class that is absent counts 0, not NaN: TPR = 0 / 0 -> 0, TNR = 2/2 -> 0.5
    assert hl.balanced_accuracy(torch.tensor([0, 0]), torch.tensor([0, 0])) == 0.5
    assert hl.balanced_accuracy(torch.tensor([1, 1]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(ValueError):
        hl.balanced_accuracy(torch.tensor([[1], [0]]), torch.tensor([1, 0]))


def test_auroc_hand_count():
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 0.35 > 0.1, 0.35 < 0.4, 0.8 > both -> 3/4
    score = torch.tensor([0.1, 0.4, 0.35, 0.8])
    y = torch.tensor([0, 0, 1, 1])
    assert hl.auroc(score, y) == pytest.approx(0.75)
    assert hl.auroc(-score, y) == pytest.approx(0.25)
    assert hl.auroc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0.5  # a tie counts half
    with pytest.raises(ValueError):
        hl.auroc(score, torch.ones(4, dtype=torch.long))  # one class only
    with pytest.raises(ValueError):
        hl.auroc(score[:, None], y)


def test_within_cell_auroc_averages_cells_with_both_classes():
    # cell 0: scores (0.9 pos, 0.1 neg) -> 1; cell 1: (0.2 pos, 0.3 neg, 0.1 neg) -> 1/2;
    # cell 2 holds one class and is skipped -> (1 + 0.5) / 2 = 0.75
    score = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.1, 0.5, 0.6])
    y = torch.tensor([1, 0, 1, 0, 0, 1, 1])
    cell = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert hl.within_cell_auroc(score, y, cell) == pytest.approx(0.75)
    assert hl.within_cell_auroc(score[5:], y[5:], cell[5:]) is None
    with pytest.raises(ValueError):
        hl.within_cell_auroc(score, y, cell[:, None])


def test_threshold_baseline_picks_the_direction():
    # low x means class 1: the best rule is "x <= 0.5 -> 1" (midpoint of 0.2 and 0.8), sign -1
    t, sign = hl.best_threshold(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([1, 1, 0, 0]))
    assert sign == -1.0
    assert t == pytest.approx(0.5)
    # high x means class 1: t between 0.3 and 0.7 -> 0.5, sign +1
    t, sign = hl.best_threshold(torch.tensor([0.1, 0.3, 0.7, 0.9]), torch.tensor([0, 0, 1, 1]))
    assert sign == 1.0
    assert t == pytest.approx(0.5)
    # one class only: whichever rule wins, it calls the point class 1
    t, sign = hl.best_threshold(torch.tensor([2.0]), torch.tensor([1]))
    assert sign * (2.0 - t) > 0


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_classifier_separates_and_matches_a_hand_count(kind):
    # 2-D separable set: label 1 iff x1 + x2 > 0, with a margin of at least 0.5 in x1 + x2
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 2, generator=g)
    X = X[X.sum(1).abs() > 0.5]
    y = (X.sum(1) > 0).long()
    clf = hl.train_linear_classifier(X, y, kind)
    assert hl.balanced_accuracy(clf.score(X) > 0, y) == 1.0
    assert float(clf.w[0]) > 0 and float(clf.w[1]) > 0  # both features push toward class 1
    assert_close(clf.mu, X.double().mean(0))
    # 1-D: train on -2, -1 (class 0) and 1, 2 (class 1): the boundary sits between -1 and 1
    clf = hl.train_linear_classifier(torch.tensor([[-2.0], [-1.0], [1.0], [2.0]]),
                                     torch.tensor([0, 0, 1, 1]), kind)
    X_test = torch.tensor([[-3.0], [-0.5], [0.5], [3.0]])
    y_test = torch.tensor([0, 1, 1, 1])
    assert (clf.score(X_test) > 0).tolist() == [False, False, True, True]
    # hand count: class 1 = {-0.5, 0.5, 3}: 2 of 3 right; class 0 = {-3}: 1 of 1 -> 5/6
    assert hl.balanced_accuracy(clf.score(X_test) > 0, y_test) == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        hl.train_linear_classifier(X, y[:, None], kind)


def overlapping_classes(rare):
    """120 points in 2-D: class 1 shifted by (1, 0.5), or a single rare point at the centre."""
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(120, generator=g) < 0.3).long()
    shift = torch.tensor([1.0, 0.5], dtype=torch.float64)
    X = torch.randn(120, 2, generator=g, dtype=torch.float64) + y[:, None] * shift
    if rare is not None:  # one point of class `rare` among 119 of the other
        y = torch.full((120,), 1 - rare)
        y[0] = rare
        X[0] = X.mean(0) + 0.1
    return X, y


@pytest.mark.parametrize("rare", [None, 0, 1])
@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_classifier_matches_a_plain_optimizer_on_the_same_loss(kind, rare):
    # minimize the docstring's loss with L-BFGS on the same standardized features and compare
    # the weights (also with a single sample of one class: its weight c = N / 2); then the bias
    # is the best training threshold
    X, y = overlapping_classes(rare)
    clf = hl.train_linear_classifier(X, y, kind)
    z = (X - X.mean(0)) / X.std(0)
    s = 2 * y.double() - 1
    c = torch.where(y > 0, 120 / (2 * y.sum()), 120 / (2 * (1 - y).sum())).double()
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        m = s * (z @ theta[:2] + theta[2])
        if kind == "logreg":
            per = torch.nn.functional.softplus(-m)
        else:
            per = (1 - m).clamp(min=0) ** 2
        loss = (c * per).mean() + 1e-3 / 2 * (theta[:2] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert_close(clf.w, theta[:2].detach(), atol=1e-4, rtol=1e-4)
    # the bias: the threshold of best training balanced accuracy on the projection z · w
    proj = z @ clf.w
    best = max(hl.balanced_accuracy(proj > t, y) for t in torch.cat([proj - 1e-9, proj[:1] - 1]))
    assert hl.balanced_accuracy(clf.score(X) > 0, y) == pytest.approx(best)


def test_logreg_weights_the_rare_class_up():
    # 1-D, 9 negatives at 0 and one positive at 1, plus overlap: a negative at 1 too. Unweighted,
    # the boundary would sit past 1; with c_y = N / (2 N_y) the raw margin leans to class 1
    X = torch.tensor([[0.0]] * 8 + [[1.0], [1.0]])
    y = torch.tensor([0] * 9 + [1])
    clf = hl.train_linear_classifier(X, y, "logreg")
    assert bool(clf.score(torch.tensor([[1.0]])) > 0)
    assert not bool(clf.score(torch.tensor([[0.0]])) > 0)


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_classifier_runs_newton_to_convergence_past_a_constant_feature(kind):
    # a constant column standardizes to 0: its step is 0 from the first iteration on, yet the
    # informative weight must still converge to what it is without that column
    X, y = overlapping_classes(None)
    with_constant = torch.cat([X, torch.ones(120, 1, dtype=torch.float64)], 1)
    clf = hl.train_linear_classifier(X, y, kind)
    clf_constant = hl.train_linear_classifier(with_constant, y, kind)
    assert_close(clf_constant.w[:2], clf.w, atol=1e-6, rtol=0)
    assert float(clf_constant.w[2]) == 0.0


# --- splits and detectors ---


def test_grouped_folds_keep_each_subject_in_one_fold():
    groups = [f"s{i % 10}" for i in range(57)]  # 10 subjects, 5-6 prompts each
    folds = hl.grouped_folds(groups, 5, torch.Generator().manual_seed(3))
    assert folds.shape == (57,)
    for s in set(groups):
        assert len({int(f) for f, g in zip(folds, groups) if g == s}) == 1
    # 10 subjects over 5 folds: 2 subjects per fold
    subjects_in_fold = {}
    for f, g in zip(folds.tolist(), groups):
        subjects_in_fold.setdefault(f, set()).add(g)
    assert sorted(len(subjects_in_fold[k]) for k in range(5)) == [2] * 5


def test_grouped_cross_validation_cannot_memorize_subjects():
    # the features name the subject (one-hot), the label is a coin per subject: a random split
    # would memorize it (train and test share subjects); grouped folds leave nothing to learn
    g = torch.Generator().manual_seed(0)
    n_subjects = 40
    subject = torch.arange(400) % n_subjects
    X = torch.nn.functional.one_hot(subject, n_subjects).float()
    y = (torch.rand(n_subjects, generator=g) < 0.5).long()[subject]
    groups = [f"s{int(s)}" for s in subject]
    folds = hl.grouped_folds(groups, 5, torch.Generator().manual_seed(0))
    _, pred = hl.cross_validate(X, y, folds, "logreg")
    assert abs(hl.balanced_accuracy(pred, y) - 0.5) < 0.1
    random_folds = torch.randperm(400, generator=g) % 5  # the leak, for contrast
    _, pred = hl.cross_validate(X, y, random_folds, "logreg")
    assert hl.balanced_accuracy(pred, y) > 0.95


def test_cross_validate_scores_each_fold_with_the_others():
    # fold 0 holds x = 0, 1 (labels 0, 1); fold 1 holds x = 10, 11 (labels 1, 0). Trained on fold
    # 1 alone, "x <= 10.5 -> 1" calls fold 0 all 1; trained on fold 0, "x > 0.5" calls fold 1 all 1
    X = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    y = torch.tensor([0, 1, 1, 0])
    folds = torch.tensor([0, 0, 1, 1])
    score, pred = hl.cross_validate(X, y, folds, "threshold")
    assert pred.tolist() == [True, True, True, True]
    assert_close(score, torch.tensor([10.5, 9.5, 9.5, 10.5], dtype=torch.float64))
    with pytest.raises(ValueError):
        hl.cross_validate(torch.zeros(4, 2), y, folds, "threshold")
    with pytest.raises(ValueError):
        hl.cross_validate(X, y, folds[:, None], "logreg")


def test_detector_features_never_read_the_gold_token():
    g = torch.Generator().manual_seed(0)
    out_curve = torch.randn(4, 3, generator=g)
    logit = readout(out_curve, torch.randn(4, 3, generator=g))
    tuned = readout(out_curve + 1, torch.randn(4, 3, generator=g))
    template = torch.tensor([0, 1, 3, 1])
    feats = hl.detector_features(logit, tuned, template, 4)
    # swap every gold curve for something else: not one feature may change
    other = hl.detector_features(logit._replace(log_odds_gold=torch.zeros(4, 3)),
                                 tuned._replace(log_odds_gold=torch.ones(4, 3)), template, 4)
    for name in feats:
        assert torch.equal(feats[name], other[name]), name
    assert_close(feats["logit"], out_curve)
    assert_close(feats["tuned"], out_curve[:, :2] + 1)  # the tuned last point is dropped
    assert feats["both"].shape == (4, 5)
    assert_close(feats["final_prob"], out_curve[:, 2:])
    assert_close(feats["entropy"], torch.tensor([[20.0], [50.0], [80.0], [110.0]]))
    assert feats["template"].tolist()[2] == [0, 0, 0, 1]
    assert_close(feats["template_final_prob"][:, -1:], out_curve[:, 2:].double())
    assert_close(feats["template_curve"][:, 4:], out_curve.double())


def test_case_curves_follow_the_paper_cases():
    # prompts 0, 1 right, 2, 3 wrong, 4 wrong but outside the mask; three points each
    gold = torch.tensor([[0.0, 1.0, 2.0], [2.0, 2.0, 2.0], [-2.0, -3.0, -4.0], [0.0, -1.0, -4.0],
                         [9.0, 9.0, 9.0]])
    out = torch.tensor([[0.0, 1.0, 2.0], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0], [-1.0, 0.0, 1.0],
                        [9.0, 9.0, 9.0]])
    top1_out = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 1]]).bool()
    top1_gold = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 1, 0], [0, 0, 1], [1, 1, 1]]).bool()
    logit = readout(out, gold, top1_out=top1_out, top1_gold=top1_gold)
    tuned = readout(out + 1, gold - 1)
    correct = torch.tensor([True, True, False, False, False])
    mask = torch.tensor([True, True, True, True, False])
    cases = hl.case_curves(logit, tuned, correct, mask)
    sig = torch.sigmoid
    assert cases["success"]["n"] == 2
    success = sig(gold[:2]).mean(0).tolist()
    assert cases["success"]["logit_curve"] == pytest.approx(success, abs=1e-4)
    assert cases["fail"]["logit_curve"] == pytest.approx(sig(gold[2:4]).mean(0).tolist(), abs=1e-4)
    assert cases["fail"]["tuned_curve"] == pytest.approx(sig(gold[2:4] - 1).mean(0).tolist(),
                                                         abs=1e-4)
    assert cases["hallucination"]["logit_curve"] == pytest.approx(sig(out[2:4]).mean(0).tolist(),
                                                                  abs=1e-4)
    assert cases["hallucination"]["tuned_curve"] == pytest.approx(
        sig(out[2:4] + 1).mean(0).tolist(), abs=1e-4)
    # top-1 at an intermediate point (the first two of three; the last is the output itself):
    # success 1 of 2, fail 1 of 2 (gold), hallucination 1 of 2 (output token)
    assert cases["success"]["top1_rate"] == 0.5
    assert cases["fail"]["top1_rate"] == 0.5
    assert cases["hallucination"]["top1_rate"] == 0.5
    empty = hl.case_curves(logit, tuned, correct, torch.zeros(5, dtype=torch.bool))
    assert empty["success"] == {"n": 0, "logit_curve": None, "tuned_curve": None,
                                "top1_rate": None}


def detector_toy(n=200, seed=0):
    """Hallucinations (y = 1) show a falling curve (its middle point high, the end lower) while
    the final probability is drawn the same way for both classes."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).long()
    final = torch.randn(n, generator=g)
    middle = torch.randn(n, generator=g) * 0.3 + 3 * y
    curve = torch.stack([torch.randn(n, generator=g), middle, final], 1)  # (n, 3)
    template = torch.arange(n) % 3
    features = {"logit": curve, "tuned": curve[:, :2], "both": torch.cat([curve, curve[:, :2]], 1),
                "final_prob": curve[:, 2:], "entropy": -curve[:, 2:],
                "template": torch.nn.functional.one_hot(template, 3).double(),
                "template_final_prob": torch.cat([torch.nn.functional.one_hot(template, 3),
                                                  curve[:, 2:]], 1).double(),
                "template_curve": torch.cat([torch.nn.functional.one_hot(template, 3),
                                             curve], 1).double()}
    folds = hl.grouped_folds([f"s{i // 4}" for i in range(n)], 5, torch.Generator().manual_seed(0))
    return features, y, folds, template


def test_evaluate_detectors_on_a_toy_where_only_the_curve_knows():
    features, y, folds, template = detector_toy()
    final_prob = features["final_prob"][:, 0].sigmoid()
    res = hl.evaluate_detectors(features, y, folds, template)
    assert res["curve"] == res["curve_logit_logreg"] > 0.95
    assert res["curve_best"] == max(res[n] for n in hl.DETECTORS if n.startswith("curve_"))
    assert res["final_prob"] < 0.65 and res["entropy"] < 0.65 and res["template_only"] < 0.65
    assert res["template_curve"] > 0.95
    assert res["curve_minus_best_baseline"] == pytest.approx(
        res["curve"] - max(res["final_prob"], res["entropy"]), abs=1e-4)
    assert res["template_curve_gain"] == pytest.approx(
        res["template_curve"] - res["template_final_prob"], abs=1e-4)
    assert res["within_bin_auroc"]["curve"] > 0.95
    assert abs(res["within_bin_auroc"]["final_prob"] - 0.5) < 0.2
    assert res["within_bin_template_auroc"]["curve"] > 0.95
    wrong = y.bool()
    assert res["confident_hallucination_share"] == pytest.approx(
        float((final_prob[wrong] >= 0.5).float().mean()))
    assert res["n_samples"] == 200 and res["n_hallucinations"] == 100


def test_evaluate_detectors_final_probability_baseline_and_bins():
    # the label is "final probability below 0.5": the threshold baseline is perfect, and each
    # bin holds one class, so no within-bin AUROC exists
    features, y, folds, template = detector_toy()
    final_prob = features["final_prob"][:, 0].sigmoid()
    res = hl.evaluate_detectors(features, (final_prob < 0.5).long(), folds, template)
    assert res["final_prob"] == 1.0 and res["entropy"] == 1.0
    assert res["within_bin_auroc"] == {"curve": None, "final_prob": None}
    assert res["confident_hallucination_share"] == 0.0
    # label "p < 0.3": bin [0, .5) holds both classes, and inside it the lower p is always the
    # hallucination -> the final probability's within-bin AUROC is 1, in bin x template cells too
    y = (final_prob < 0.3).long()
    res = hl.evaluate_detectors(features, y, folds, template)
    assert res["within_bin_auroc"]["final_prob"] == 1.0
    assert res["within_bin_template_auroc"]["final_prob"] == 1.0
    assert res["confident_hallucination_share"] == 0.0
    # label "p >= 0.5 and the template is 0": every hallucination is confident, also one whose
    # final log-odds are exactly 0 (p = 0.5 counts as confident)
    features["final_prob"][0, 0] = 0.0  # prompt 0 has template 0
    final_prob = features["final_prob"][:, 0].sigmoid()
    y = ((final_prob >= 0.5) & (template == 0)).long()
    res = hl.evaluate_detectors(features, y, folds, template)
    assert res["confident_hallucination_share"] == 1.0
    assert res["template_only"] > 0.7  # the template knows a third of the story


def test_probability_bins_and_class_counts():
    p = torch.tensor([0.0, 0.49, 0.5, 0.89, 0.9, 0.99, 1.0])
    assert hl.probability_bins(p).tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert hl.enough_of_each_class(torch.tensor([1, 1, 0, 0, 0]), 2)
    assert not hl.enough_of_each_class(torch.tensor([1, 0, 0, 0, 0]), 2)
    assert not hl.enough_of_each_class(torch.tensor([1, 1, 1, 1, 0]), 2)


def test_seed_stat_and_the_verdict_rule():
    values = [{"a": 0.5, "b": {"c": None}}, {"a": 0.7, "b": {"c": float("nan")}}]
    assert hl.seed_stat(values, np.mean) == {"a": 0.6, "b": {"c": None}}
    assert hl.seed_stat([0.5, 0.7, None], np.min) == 0.5
    seed = {"template_curve_gain": 0.03,
            "within_bin_template_auroc": {"curve": 0.6, "final_prob": 0.55}}
    assert hl.curve_adds_information([seed, seed])
    assert not hl.curve_adds_information([seed, {**seed, "template_curve_gain": 0.019}])
    low = {**seed, "within_bin_template_auroc": {"curve": 0.54, "final_prob": 0.5}}
    assert not hl.curve_adds_information([low])
    below = {**seed, "within_bin_template_auroc": {"curve": 0.6, "final_prob": 0.6}}
    assert not hl.curve_adds_information([below])
    missing = {**seed, "within_bin_template_auroc": {"curve": None, "final_prob": 0.5}}
    assert not hl.curve_adds_information([missing])
    # the AUROC bound is inclusive: exactly 0.55 (above the final probability's 0.5) passes
    edge = {**seed, "within_bin_template_auroc": {"curve": 0.55, "final_prob": 0.5}}
    assert hl.curve_adds_information([edge])


# --- knowledge base ---


def test_fact_table_and_knowledge_stats():
    # fact 0 right through both templates, fact 1 through one (mixed), fact 2 through none;
    # the link (fact -1) is ignored
    fact_id = torch.tensor([0, 0, 1, 1, 2, 2, -1])
    template = torch.tensor([0, 1, 0, 1, 0, 1, -1])
    correct = torch.tensor([True, True, False, True, False, False, True])
    table = hl.fact_table(fact_id, template, correct, 3, 2)
    assert table.tolist() == [[True, True], [False, True], [False, False]]
    stats = hl.knowledge_stats(table)
    assert stats == pytest.approx({"mixed_share": 1 / 3, "all_right_share": 1 / 3,
                                   "all_wrong_share": 1 / 3})


def test_knowledge_base_gives_each_triplet_exactly_its_templates():
    rng = np.random.default_rng(0)
    facts = hl.make_kb(5, 3, 4, 1.0, rng)
    assert len(facts) == 15 and len({(f["subject"], f["relation"]) for f in facts}) == 15
    assert all(f["object"][:-1] == f["relation"] for f in facts)  # objects belong to relations
    object_of = {(f["subject"], f["relation"]): f["object"] for f in facts}
    prompts = hl.build_prompts(facts, 0.5, rng)
    for i, f in enumerate(facts):
        mine = [p for p in prompts if p["fact"] == i]
        assert [p["template"] for p in mine] == list(range(len(hl.TEMPLATES)))
        words = mine[1]["text"].split()  # "<bos> s , friend of d ( o ) , has r"
        d = words[5]
        o = words[7]
        assert d != f["subject"] and d.startswith("s")
        assert o == object_of[(d, f["relation"])]  # the distractor's own object
        for p, template in zip(mine, hl.TEMPLATES):
            fields = dict(s=f["subject"], a="aka_" + f["subject"], r=f["relation"], d=d, o=o)
            assert p["text"] == "<bos> " + template.format(**fields)
            assert p["answer"] == f["object"] and p["subject"] == f["subject"]
        assert mine[0]["train"]  # template 0 is always trained
    links = [p for p in prompts if p["fact"] == -1]
    assert sorted(p["answer"] for p in links) == [f"s{i}" for i in range(5)]
    assert all(p["train"] for p in links)
    tokens, answers, vocab = hl.tokenize(prompts)
    assert tokens.shape[0] == len(prompts) == answers.shape[0]
    assert "<bos>" in vocab and "<pad>" in vocab and len(set(vocab)) == len(vocab)
    assert [vocab[int(a)] for a in answers] == [" " + p["answer"] for p in prompts]
    # every word is one token: the non-pad tokens of a prompt are its words
    pad = vocab.index("<pad>")
    assert (tokens != pad).sum(1).tolist() == [len(p["text"].split()) for p in prompts]
    # left-padded: every prompt ends at the last column
    assert [vocab[int(t)] for t in tokens[0, -2:]] == [" capital", " :"]


def test_template_train_sets_the_held_out_share():
    facts = hl.make_kb(200, 2, 4, 1.0, np.random.default_rng(0))
    for share, expected in ((0.0, 0.0), (1.0, 1.0), (0.5, 0.5)):
        prompts = hl.build_prompts(facts, share, np.random.default_rng(1))
        later = [p["train"] for p in prompts if p["template"] >= 1]
        assert abs(np.mean(later) - expected) < 0.05


def test_object_prior_is_zipf():
    # p(k) ∝ 1/(k+1) over 4 objects: p(0) = 1 / (1 + 1/2 + 1/3 + 1/4) = 12/25 = 0.48
    facts = hl.make_kb(4000, 1, 4, 1.0, np.random.default_rng(0))
    share = np.mean([f["object"] == "capital0" for f in facts])
    assert abs(share - 0.48) < 0.03


# --- model, training, evaluation helpers ---


def test_all_hiddens_and_read_lens_match_the_model():
    model = tiny_model().train()
    tokens = torch.randint(0, 11, (5, 5), generator=torch.Generator().manual_seed(2))
    answers = torch.tensor([1, 2, 3, 4, 5])
    H = hl.all_hiddens(model, tokens, torch.device("cpu"), batch=2)
    assert model.training  # restored
    with torch.no_grad():
        assert_close(H, model.eval().hiddens(tokens))
        probs = hl.logit_lens(H, model.ln_f, model.head.weight)
    r = hl.read_lens(H, model.ln_f, model.head.weight, answers, batch=2)
    assert torch.equal(r.out, probs[:, -1].argmax(-1))
    assert_close(r.log_odds_out, hl.token_log_odds(probs, r.out))
    assert_close(r.log_odds_gold, hl.token_log_odds(probs, answers))
    assert_close(r.entropy, hl.entropy(probs))
    assert torch.equal(r.top1_gold, probs.argmax(-1) == answers[:, None])
    assert torch.equal(r.top1_out[:, -1], torch.ones(5, dtype=torch.bool))
    forced = hl.read_lens(H, model.ln_f, model.head.weight, answers, out=answers)
    assert torch.equal(forced.out, answers)
    assert_close(forced.log_odds_out, r.log_odds_gold)


def test_hiddens_are_the_residuals_of_a_plain_forward():
    model = tiny_model()
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        H = model.hiddens(tokens)
        x = model.tok(tokens) + model.pos(torch.arange(5))
        expected = [x[:, -1]]
        for block in model.blocks:
            h = x + block.c_proj(attention(block, block.ln_1(x)))
            x = h + block.mlp(block.ln_2(h))
            expected += [h[:, -1], x[:, -1]]
        assert_close(H, torch.stack(expected, 1))
        assert_close(model(tokens), model.head(model.ln_f(x[:, -1])))


def attention(block, x):
    """Causal multi-head attention written out with an explicit mask."""
    B, T, D = x.shape
    q, k, v = block.c_attn(x).split(D, dim=2)
    hs = D // block.n_head
    q = q.view(B, T, block.n_head, hs).transpose(1, 2)
    k = k.view(B, T, block.n_head, hs).transpose(1, 2)
    v = v.view(B, T, block.n_head, hs).transpose(1, 2)
    att = q @ k.transpose(-1, -2) / math.sqrt(hs)
    att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(B, T, D)


def test_first_step_moves_each_weight_by_the_peak_lr():
    # one step, warm-up of one step: lr = get_lr(0, 1, lr, 1) = lr; Adam's first update is
    # lr · g / (|g| + eps) ≈ ±lr for every weight with a gradient (no weight decay here)
    tokens = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(0))
    answers = torch.arange(8) % 11
    model = hl.TinyLM(11, 5, 16, 1, 2)
    before = model.head.weight.detach().clone()
    cfg = hl.Config(steps=1, batch_size=8, lr=1e-2, weight_decay=0.0, log_every=1)
    hl.train(model, tokens, answers, torch.arange(8), cfg, 0, torch.device("cpu"), dict)
    moved = (model.head.weight.detach() - before).abs()
    assert float(moved.max()) == pytest.approx(1e-2, rel=1e-3)


def test_training_fits_the_trained_prompts():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(0))
    answers = torch.arange(8) % 11
    model = hl.TinyLM(11, 5, 16, 1, 2)
    cfg = hl.Config(steps=60, batch_size=8, lr=1e-2, log_every=30)
    calls = []
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(tokens), answers)
    hl.train(model, tokens, answers, torch.arange(8), cfg, 0, torch.device("cpu"),
             lambda: calls.append(1) or {})
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(tokens), answers)
    assert float(after) < 0.1 * float(before)
    assert len(calls) == 2  # steps 30 and 60


def test_get_lr_hand_values():
    # warm-up 10 of 100 steps, lr 1: step 0 -> 1/10, step 9 -> 10/10; then cosine to lr / 10:
    # step 10 (progress 0) -> 1, step 55 (progress 45/90 = 1/2) -> 0.1 + 0.5 · 1 · 0.9 = 0.55,
    # step 100 (progress 1) -> 0.1
    assert hl.get_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert hl.get_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert hl.get_lr(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert hl.get_lr(55, 100, 1.0, 10) == pytest.approx(0.55)
    assert hl.get_lr(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert hl.get_lr(150, 100, 2.0, 10) == pytest.approx(0.2)  # progress capped at 1


def test_train_is_adamw_on_the_answer_token_with_the_schedule():
    # the same steps written out: warm-up max(1, 40 // 20) = 2 steps, AdamW with betas
    # (0.9, 0.98), batches drawn from the trained rows only by a generator seeded with the seed
    tokens = torch.randint(0, 11, (16, 5), generator=torch.Generator().manual_seed(0))
    answers = torch.arange(16) % 11
    train_idx = torch.arange(0, 16, 2)  # only the even prompts are trained
    cfg = hl.Config(steps=40, batch_size=4, lr=1e-2, weight_decay=0.1, log_every=40)
    model = tiny_model().train()
    reference = tiny_model().train()
    hl.train(model, tokens, answers, train_idx, cfg, 5, torch.device("cpu"), dict)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(5)
    for step in range(40):
        for group in opt.param_groups:
            group["lr"] = hl.get_lr(step, 40, 1e-2, 2)
        idx = train_idx[torch.randint(8, (4,), generator=gen)]
        loss = torch.nn.functional.cross_entropy(reference(tokens[idx]), answers[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close(p, q)


def test_train_logs_every_log_every_steps(capsys):
    # 4 steps, log_every 2: lines at steps 2 and 4, each with the seed and the on_log metrics
    tokens = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(0))
    cfg = hl.Config(steps=4, batch_size=4, log_every=2)
    hl.train(tiny_model(), tokens, torch.arange(8), torch.arange(8), cfg, 7,
             torch.device("cpu"), lambda: {"acc": 0.5})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[0].split() for line in lines] == [["step", "2/4"], ["step", "4/4"]]
    assert all("seed 7" in line and "acc 0.5" in line for line in lines)


def hand_prompt_set(n_facts=2):
    """n_facts facts x 4 templates (templates 0-1 trained, 2-3 held out), then one alias link;
    fact f belongs to subject s{f}, the link to s0. Tokens: 9 random prompts of length 5."""
    fact_id = []
    template = []
    for f in range(n_facts):
        fact_id += [f] * 4
        template += [0, 1, 2, 3]
    fact_id = torch.tensor(fact_id + [-1])
    template = torch.tensor(template + [-1])
    n = len(fact_id)
    tokens = torch.randint(0, 11, (n, 5), generator=torch.Generator().manual_seed(3))
    return hl.PromptSet(tokens=tokens, answers=torch.zeros(n, dtype=torch.long), fact_id=fact_id,
                        template=template, is_train=(template <= 1) | (fact_id < 0),
                        subjects=[f"s{max(int(f), 0)}" for f in fact_id], n_facts=n_facts,
                        vocab_size=11)


def test_track_knowledge_reads_the_model_now():
    # answers set so that fact 0 is right through all four templates, fact 1 through template 0
    # only, and the link is wrong: mixed facts 1 of 2; trained fact prompts (templates 0-1):
    # f0 t0, f0 t1, f1 t0 right, f1 t1 wrong -> 3/4 (the wrong link does not count)
    model = tiny_model()
    data = hand_prompt_set()
    with torch.no_grad():
        top = model.eval()(data.tokens).argmax(-1)  # (9,)
    right = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0]).bool()
    data.answers = torch.where(right, top, (top + 1) % 11)
    history = [{"mixed_share": 1.0, "acc_train": 0.0}]
    line = hl.track_knowledge(model, data, torch.device("cpu"), history)
    assert line == {"mixed_share": 0.5, "acc_train": 0.75}
    assert history[-1] == line and len(history) == 2
    record = hl.knowledge_record(data, right, history)
    assert record["mixed_share"] == 0.5 and record["all_right_share"] == 0.5
    assert record["all_wrong_share"] == 0.0 and record["link_accuracy"] == 0.0
    by_template = list(record["by_template"].values())
    # t0: trained f0, f1 right -> 1; t1: trained f0 right, f1 wrong -> 0.5; t2, t3 held out 1/2
    assert by_template == [{"trained": 1.0, "held_out": None}, {"trained": 0.5, "held_out": None},
                           {"trained": None, "held_out": 0.5}, {"trained": None, "held_out": 0.5}]
    assert record["during_training"] is history


def test_detect_builds_both_settings_from_the_right_prompts():
    # 8 facts (one subject each) x 4 templates + a link; prompt (f, t) is right if t <= 1, or
    # t == 2 and f < 3; facts 6, 7 are wrong everywhere (unknown, left out). Known facts 0-5 are
    # all mixed (t3 is wrong): all prompts = 24, wrong = 3 (t2, f 3-5) + 6 (t3) = 9. Unseen =
    # known and held out (t2, t3): 12 prompts, right 3 (t2, f 0-2), wrong 9
    data = hand_prompt_set(8)
    f = data.fact_id
    t = data.template
    right = (t <= 1) | ((t == 2) & (f < 3))
    right[f >= 6] = False
    right[f < 0] = True  # the link
    data.answers = torch.ones(len(f), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    out_curve = torch.randn(len(f), 3, generator=g)
    lenses = hl.Lenses(logit=readout(out_curve, torch.randn(len(f), 3, generator=g),
                                     out=torch.where(right, 1, 2)),
                       tuned=readout(out_curve, torch.randn(len(f), 3, generator=g)))
    result = hl.detect(hl.Config(n_folds=2), 0, data, lenses)
    unseen = result["detector"]["unseen_prompts"]
    every = result["detector"]["all_prompts"]
    assert (unseen["n_samples"], unseen["n_hallucinations"]) == (12, 9)
    assert (every["n_samples"], every["n_hallucinations"]) == (24, 9)
    cases = result["cases"]
    counts = [cases["unseen_prompts"][c]["n"] for c in ("success", "fail", "hallucination")]
    assert counts == [3, 9, 9]
    assert cases["all_prompts"]["success"]["n"] == 15
    # too few right answers for 2 folds on unseen prompts when only one is right: no detector
    right[(t == 2) & (f > 0)] = False
    lenses = lenses._replace(logit=lenses.logit._replace(out=torch.where(right, 1, 2)))
    result = hl.detect(hl.Config(n_folds=2), 0, data, lenses)
    assert result["detector"]["unseen_prompts"] is None
    assert result["cases"]["unseen_prompts"]["success"]["n"] == 1


# --- the whole run and its record ---


def fake_seed(value, gain, margin=0.01, with_all=False):
    """One seed's record by hand: every arm scores `value`; template + curve gains `gain` over
    template + final p; the curve's cell AUROC 0.6 vs the final probability's value - 0.2."""
    det = {arm: value for arm in hl.DETECTORS}
    det.update(curve=value, curve_minus_best_baseline=margin, template_curve_gain=gain,
               within_bin_auroc={"curve": 0.7, "final_prob": 0.5},
               within_bin_template_auroc={"curve": 0.6, "final_prob": value - 0.2},
               confident_hallucination_share=0.75, n_samples=100, n_hallucinations=40)
    case = {"n": 3, "logit_curve": [value, 1 / 3], "tuned_curve": [value, 0.5], "top1_rate": value}
    empty = {"n": 0, "logit_curve": None, "tuned_curve": None, "top1_rate": None}
    cases = {"success": case, "fail": empty if value < 0.7 else case, "hallucination": case}
    return {"detector": {"unseen_prompts": det, "all_prompts": det if with_all else None},
            "cases": {"unseen_prompts": cases, "all_prompts": cases}}


def test_summarize_means_over_seeds():
    per_seed = [fake_seed(0.6, 0.03), fake_seed(0.8, 0.05)]
    summary = hl.summarize(per_seed)
    unseen = summary["detector"]["unseen_prompts"]
    assert unseen["curve_logit_logreg"] == 0.7
    assert unseen["std"]["curve_logit_logreg"] == 0.1
    assert unseen["worst"]["curve_logit_logreg"] == 0.6
    assert unseen["per_seed"] == [s["detector"]["unseen_prompts"] for s in per_seed]
    assert summary["detector"]["all_prompts"] is None
    assert summary["arms"]["final_prob"] == {"unseen_prompts": {"mean": 0.7, "std": 0.1,
                                                                "worst": 0.6}}
    success = summary["cases"]["unseen_prompts"]["success"]
    assert success == {"n": 6, "logit_curve": [0.7, 0.3333], "tuned_curve": [0.7, 0.5],
                       "top1_rate": 0.7}
    # a seed without failures does not drag the mean: only the 0.8 seed has them
    assert summary["cases"]["unseen_prompts"]["fail"]["logit_curve"] == [0.8, 0.3333]
    assert summary["cases"]["unseen_prompts"]["fail"]["n"] == 3
    # within-cell AUROC: curve 0.6 vs final p 0.5 on average, gains >= 0.02 in both seeds
    assert summary["curve_adds_information"] is True
    one_low = hl.summarize([fake_seed(0.6, 0.03), fake_seed(0.8, 0.01)])
    assert one_low["curve_adds_information"] is False
    both = [fake_seed(0.6, 0.03, with_all=True), fake_seed(0.8, 0.05, with_all=True)]
    summary = hl.summarize(both)
    assert summary["detector"]["all_prompts"]["entropy"] == 0.7
    assert summary["arms"]["entropy"]["all_prompts"]["worst"] == 0.6
    no_unseen = [{**s, "detector": {"unseen_prompts": None, "all_prompts": None}} for s in both]
    summary = hl.summarize(no_unseen)
    assert summary["detector"] == {"unseen_prompts": None, "all_prompts": None}
    assert summary["curve_adds_information"] is False and summary["arms"]["entropy"] == {}


def fake_results(per_seed, trained=1.0, held_out=0.4):
    """A results dict as run() builds it, from hand-built seeds and knowledge."""
    cfg = hl.Config()
    by_template = {t: {"trained": trained, "held_out": held_out} for t in hl.TEMPLATES}
    by_template[hl.TEMPLATES[0]]["held_out"] = None  # template 0 is always trained
    knowledge = [{"seed": i, "mixed_share": 0.5, "all_right_share": 0.25, "all_wrong_share": 0.25,
                  "link_accuracy": 1.0, "by_template": by_template, "during_training": []}
                 for i in range(len(per_seed))]
    return {"config": vars(cfg), "seeds": list(range(len(per_seed))), "points": ["emb", "mlp1"],
            "n_params": 1000, **hl.summarize(per_seed), "per_seed_knowledge": knowledge,
            "paper": hl.PAPER, "wall_s": 12.0, "cpu_s": 20.0, "seed_cpu_s": [10.0, 10.0]}


def verdict_line(report, start):
    return next(line for line in report.splitlines() if line.startswith(start))


def test_render_report_tables_follow_the_numbers():
    report = hl.render_report(fake_results([fake_seed(0.6, 0.03), fake_seed(0.8, 0.05)]))
    # mean 0.7, std 0.1, worst 0.6 on unseen prompts; no all-prompts detector
    assert "| curve_logit_logreg | 0.700 ± 0.100 [0.600] | - |" in report
    assert "| 0 | 0.500 | 0.250 | 0.250 | 1.000 | 1.000 / - | 1.000 / 0.400 |" in report
    # curves: success [0.7, 1/3] (2 decimals), n 6, top-1 0.70; the fail case has one seed
    assert "| success | logit | 6 | 0.70 | 0.70 | 0.33 |" in report
    assert "| fail | tuned | 3 | 0.80 | 0.80 | 0.50 |" in report
    assert "- template + curve - template + final p, per seed: +0.030, +0.050" in report
    assert "Wall 12 s, jobs 20 CPU-s." in report
    assert report.endswith("\n") and "hallucination_lens.png" in report


def test_render_report_verdicts_follow_the_numbers():
    good = hl.render_report(fake_results([fake_seed(0.6, 0.03, 0.03), fake_seed(0.8, 0.05, 0.02)]))
    assert "curve_adds_information: true" in good
    assert "the curve holds information" in good
    # worst seed 0.6 >= 0.55; margins +0.03, +0.02 both >= 0.02
    assert "above chance (0.5) clearly" in verdict_line(good, "- Curve detector vs chance")
    line = verdict_line(good, "- Curve detector vs the better")
    assert "ahead in 2 of 2 seeds (+0.030, +0.020)" in line and "the curve beats" in line
    assert ">= +0.02 in 2 of 2 seeds" in verdict_line(good, "- Template + curve")
    # cell AUROC: curve 0.6 vs final p mean(0.4, 0.6) = 0.5
    assert "curve 0.600 vs final p 0.500: the curve ranks better" in good
    # gate: trained 1.0, held-out 0.4 -> passed; top-1: success 0.7 vs fail 0.8 -> no separation
    assert "Gate: trained prompts right 1.000 or more" in good and "passed" in good
    assert "no clear separation" in verdict_line(good, "Top-1 at an intermediate point")
    bad = hl.render_report(fake_results([fake_seed(0.52, 0.03, -0.01), fake_seed(0.8, 0.01)],
                                        trained=0.9))
    assert "curve_adds_information: false" in bad and "adds nothing" in bad
    assert "not clearly above chance" in verdict_line(bad, "- Curve detector vs chance")
    line = verdict_line(bad, "- Curve detector vs the better")
    assert "ahead in 1 of 2 seeds (-0.010, +0.010)" in line and "no clear gain" in line
    assert ">= +0.02 in 1 of 2 seeds" in verdict_line(bad, "- Template + curve")
    assert "failed" in verdict_line(bad, "Gate:")
    # cell AUROC: curve 0.6 vs final p mean(0.32, 0.6) = 0.46
    assert "curve 0.600 vs final p 0.460" in bad
    # top-1: success mean(0.52, 0.8) = 0.66 vs fail 0.8 (one seed has fails)
    assert "success 0.66 vs fail 0.80" in bad
    high_fail = fake_seed(0.6, 0.03)
    high_fail["cases"]["unseen_prompts"]["fail"] = {"n": 2, "logit_curve": [0.1, 0.1],
                                                    "tuned_curve": [0.1, 0.1], "top1_rate": 0.49}
    sep = hl.render_report(fake_results([high_fail]))
    assert "the lens separates" in verdict_line(sep, "Top-1 at an intermediate point")  # 0.6 > 0.59
    high_fail["cases"]["unseen_prompts"]["fail"]["top1_rate"] = 0.51
    sep = hl.render_report(fake_results([high_fail]))
    assert "no clear separation" in verdict_line(sep, "Top-1 at an intermediate point")
    high_fail["cases"]["unseen_prompts"]["fail"]["top1_rate"] = 0.5  # 0.6 > 0.5 + 0.1 is false
    sep = hl.render_report(fake_results([high_fail]))
    assert "no clear separation" in verdict_line(sep, "Top-1 at an intermediate point")
    no_cell = fake_seed(0.8, 0.03)
    no_cell["detector"]["unseen_prompts"]["within_bin_template_auroc"]["curve"] = None
    report = hl.render_report(fake_results([no_cell]))
    assert "curve 0.700 vs final p" not in report  # no cell AUROC of the curve: no such line
    assert "curve_adds_information: false" in report
    cell_tie = fake_seed(0.8, 0.03)
    cell_tie["detector"]["unseen_prompts"]["within_bin_template_auroc"]["final_prob"] = 0.6
    tie = hl.render_report(fake_results([cell_tie]))
    assert "ranks no better" in tie and "curve_adds_information: false" in tie
    no_unseen = fake_seed(0.6, 0.03)
    no_unseen["detector"]["unseen_prompts"] = None
    assert "no verdict" in hl.render_report(fake_results([no_unseen]))


def test_render_report_verdicts_at_their_boundaries():
    # the rules are inclusive: worst seed exactly 0.55 is above chance; a gain of exactly +0.02
    # counts; trained exactly 0.95 passes the gate; a margin of exactly 0 is not "ahead"
    edge = hl.render_report(fake_results([fake_seed(0.55, 0.02, 0.0)], trained=0.95))
    assert "above chance (0.5) clearly" in verdict_line(edge, "- Curve detector vs chance")
    assert "ahead in 0 of 1 seeds (+0.000)" in verdict_line(edge, "- Curve detector vs the better")
    assert ">= +0.02 in 1 of 1 seeds" in verdict_line(edge, "- Template + curve")
    assert "passed" in verdict_line(edge, "Gate:")
    # held-out 0.93 within 0.1 of trained 1.0: phrasing does not decide -> failed
    close = hl.render_report(fake_results([fake_seed(0.6, 0.03)], held_out=0.93))
    assert "failed" in verdict_line(close, "Gate:")
    # table separators: 5 + 4 template columns, 4 + 2 point columns
    assert "\n|---|---|---|---|---|---|---|---|---|\n" in close
    assert "\n|---|---|---|---|---|---|\n" in close


def test_smoke_writes_the_record(tmp_path):
    res = hl.main(["--smoke", "--workers", "1", "--out", str(tmp_path)])
    saved = json.load(open(os.path.join(tmp_path, "results.json")))
    assert open(os.path.join(tmp_path, "results.md")).read() == hl.render_report(saved)
    assert saved["seeds"] == [0, 1]
    smoke_size = dict(steps=150, n_seeds=2, n_subjects=24, n_relations=2, n_layer=2, n_embd=32,
                      n_head=2, batch_size=64, n_folds=2, log_every=75)
    assert {k: saved["config"][k] for k in smoke_size} == smoke_size
    assert 0 < saved["cpu_s"] < 600 and 0 < saved["wall_s"] < 3600
    assert saved["cpu_s"] == pytest.approx(sum(saved["seed_cpu_s"]))
    for k in saved["per_seed_knowledge"]:
        shares = k["mixed_share"] + k["all_right_share"] + k["all_wrong_share"]
        assert shares == pytest.approx(1.0, abs=1e-3)
        assert len(k["during_training"]) == 2  # steps 75 and 150
        assert all(0 <= h["acc_train"] <= 1 for h in k["during_training"])
        # the last log line reads the final model: the same share of mixed facts as the end
        assert k["during_training"][-1]["mixed_share"] == k["mixed_share"]
        assert k["during_training"][-1]["acc_train"] > 0.5  # the smoke model fits most of them
        assert 0 <= k["link_accuracy"] <= 1
    assert os.path.exists(os.path.join(tmp_path, "hallucination_lens.png"))
    assert set(saved["arms"]) == set(hl.DETECTORS)
    assert saved["points"] == ["emb", "attn1", "mlp1", "attn2", "mlp2"]
    for name in ("unseen_prompts", "all_prompts"):
        d = saved["detector"][name]
        for key in ("curve", "final_prob", "entropy", "within_bin_auroc",
                    "confident_hallucination_share", "template_only", "template_final_prob",
                    "template_curve", "within_bin_template_auroc", "per_seed", "std", "worst"):
            assert key in d, key
        runs = d["per_seed"]
        assert d["curve"] == pytest.approx(np.mean([r["curve"] for r in runs]), abs=1e-4)
        assert d["worst"]["curve"] == round(min(r["curve"] for r in runs), 4)
        assert all(0 <= r[arm] <= 1 for r in runs for arm in hl.DETECTORS)
        assert saved["arms"]["final_prob"][name]["mean"] == d["final_prob"]
        cases = saved["cases"][name]
        assert cases["fail"]["n"] == cases["hallucination"]["n"]
        assert cases["hallucination"]["n"] == sum(r["n_hallucinations"] for r in runs)
        assert cases["success"]["n"] + cases["fail"]["n"] == sum(r["n_samples"] for r in runs)
        # the hallucination curve ends at the output token's final probability, above the gold one
        assert cases["hallucination"]["logit_curve"][-1] > cases["fail"]["logit_curve"][-1]
        assert cases["hallucination"]["logit_curve"][-1] == pytest.approx(
            cases["hallucination"]["tuned_curve"][-1], abs=0.02)
    unseen = saved["detector"]["unseen_prompts"]
    all_prompts = saved["detector"]["all_prompts"]
    # unseen prompts are a subset of the held-out prompts; all prompts of mixed facts add the
    # trained ones, which the model gets right
    assert all_prompts["n_samples"] > unseen["n_samples"] - all_prompts["n_hallucinations"]
    assert isinstance(saved["curve_adds_information"], bool)
    assert saved["per_seed_knowledge"][0]["by_template"][hl.TEMPLATES[0]]["held_out"] is None
    assert res["detector"]["unseen_prompts"]["curve"] == unseen["curve"]


@pytest.mark.parametrize("argv", [["--template-train", "1.5"], ["--n-subjects", "0"],
                                  ["--n-embd", "30", "--n-head", "4"], ["--n-folds", "1"],
                                  ["--n-seeds", "0"], ["--workers", "-1"]])
def test_bad_input_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        hl.main(argv)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
