"""Tests for hallucination_lens.py: lenses, the linear detector, the splits and the knowledge base."""

import json
import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import hallucination_lens as hl


def tiny_model(seed=0, vocab=11, block=5, d=16, layers=2, heads=2):
    torch.manual_seed(seed)
    return hl.TinyLM(vocab, block, d, layers, heads).eval()


def test_logit_lens_last_point_is_the_model_output():
    model = tiny_model()
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    probs = hl.logit_lens(model, tokens)
    assert probs.shape == (3, 1 + 2 * 2, 11)  # points: embedding, attn1, mlp1, attn2, mlp2
    assert_close(probs[:, -1], model(tokens).softmax(-1))
    assert_close(probs.sum(-1), torch.ones(3, 5))
    # the first point reads the embedding alone: softmax(W_U · LN_f(tok[x_T] + pos[T-1]))
    h0 = model.tok.weight[tokens[:, -1]] + model.pos.weight[4]
    assert_close(probs[:, 0], model.head(model.ln_f(h0)).softmax(-1))
    # one sequence in, (P, V) out, equal to its row of the batch
    assert_close(hl.logit_lens(model, tokens[1]), probs[1])


def test_tuned_lens_hand_example():
    # d = 1, one point: h = [0, 1, 2], final = [1, 3, 5] → final = 2 h + 1 exactly, so A = 2, b = 1
    h = torch.tensor([[[0.0]], [[1.0]], [[2.0]]])  # (N=3, P=1, d=1)
    final = torch.tensor([[1.0], [3.0], [5.0]])
    W = hl.fit_tuned_lens(h, final, ridge=0.0)
    assert_close(W, torch.tensor([[[2.0], [1.0]]]), atol=1e-5, rtol=0)
    assert_close(hl.apply_tuned_lens(W, h)[:, 0], final, atol=1e-5, rtol=0)


def test_tuned_lens_recovers_known_affine_maps():
    g = torch.Generator().manual_seed(0)
    N, P, d = 300, 3, 4
    final = torch.randn(N, d, generator=g, dtype=torch.float64)
    A = torch.randn(P, d, d, generator=g, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64)
    b = torch.randn(P, d, generator=g, dtype=torch.float64)
    # build h_p so that final = h_p A_p + b_p holds exactly: h_p = (final - b_p) A_p^{-1}
    h = torch.stack([(final - b[p]) @ torch.linalg.inv(A[p]) for p in range(P)], 1)  # (N, P, d)
    W = hl.fit_tuned_lens(h, final, ridge=0.0)
    assert W.shape == (P, d + 1, d)
    assert_close(W[:, :-1], A, atol=1e-6, rtol=0)
    assert_close(W[:, -1], b, atol=1e-6, rtol=0)
    assert_close(hl.apply_tuned_lens(W, h), final[:, None].expand(N, P, d), atol=1e-6, rtol=0)


def test_balanced_accuracy_hand_count():
    # pred [1,0,1,1] vs y [1,0,0,1]: TPR = 2/2 = 1, TNR = 1/2 → (1 + 0.5) / 2 = 0.75
    assert hl.balanced_accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 1])) == pytest.approx(0.75)
    # all predicted 0 on a 3:1 set: plain accuracy would be 0.75, balanced is (0 + 1) / 2 = 0.5
    assert hl.balanced_accuracy(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1])) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_classifier_separates_and_matches_a_hand_count(kind):
    # 2-D separable set: label 1 iff x1 + x2 > 0, with a margin of at least 0.5 in x1 + x2
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 2, generator=g)
    X = X[(X.sum(1)).abs() > 0.5]
    y = (X.sum(1) > 0).long()
    clf = hl.train_linear_classifier(X, y, kind)
    assert hl.balanced_accuracy(clf(X), y) == 1.0
    # 1-D: train on -2, -1 (class 0) and 1, 2 (class 1) → the boundary sits near 0 (symmetric data)
    clf = hl.train_linear_classifier(torch.tensor([[-2.0], [-1.0], [1.0], [2.0]]), torch.tensor([0, 0, 1, 1]), kind)
    X_test, y_test = torch.tensor([[-3.0], [-0.5], [0.5], [3.0]]), torch.tensor([0, 1, 1, 1])
    assert clf(X_test).tolist() == [False, False, True, True]
    # hand count: class 1 = {-0.5, 0.5, 3} → 2 of 3 right; class 0 = {-3} → 1 of 1 → (2/3 + 1) / 2 = 5/6
    assert hl.balanced_accuracy(clf(X_test), y_test) == pytest.approx(5 / 6)


def test_threshold_baseline_picks_the_direction():
    # low x means class 1 here: the best rule is "x <= 0.5 → 1" (0.5: the midpoint of 0.2 and 0.8), sign -1
    t, sign = hl.best_threshold(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([1, 1, 0, 0]))
    assert sign == -1.0
    assert_close(t, torch.tensor(0.5))


def test_grouped_split_keeps_each_subject_on_one_side():
    groups = [f"s{i % 10}" for i in range(57)]  # 10 subjects, 5-6 prompts each
    test = hl.group_split(groups, 0.2, torch.Generator().manual_seed(3))
    test_subjects = {g for g, t in zip(groups, test.tolist()) if t}
    train_subjects = {g for g, t in zip(groups, test.tolist()) if not t}
    assert not test_subjects & train_subjects
    assert len(test_subjects) == 2  # round(0.2 * 10)
    assert int(test.sum()) == sum(g in test_subjects for g in groups)


def test_knowledge_base_gives_each_triplet_exactly_its_templates():
    rng = np.random.default_rng(0)
    facts = hl.make_kb(5, 3, 4, 1.0, rng)
    assert len(facts) == 15 and len({(f["subject"], f["relation"]) for f in facts}) == 15
    assert all(f["object"][:-1] == f["relation"] for f in facts)  # objects belong to their relation
    prompts = hl.build_prompts(facts, 0.5, rng)
    for i, f in enumerate(facts):
        mine = [p for p in prompts if p["fact"] == i]
        assert [p["template"] for p in mine] == list(range(len(hl.TEMPLATES)))
        d = mine[1]["text"].split()[5]  # "<bos> s , friend of d , has r": the distractor
        assert d != f["subject"] and d.startswith("s")
        for p, tpl in zip(mine, hl.TEMPLATES):
            assert p["text"] == "<bos> " + tpl.format(s=f["subject"], a="aka_" + f["subject"], r=f["relation"], d=d)
            assert p["answer"] == f["object"] and p["subject"] == f["subject"]
        assert mine[0]["train"]  # template 0 is always trained
    links = [p for p in prompts if p["fact"] == -1]
    assert sorted(p["answer"] for p in links) == [f"s{i}" for i in range(5)] and all(p["train"] for p in links)
    tokens, answers, vocab = hl.tokenize(prompts)
    assert tokens.shape[0] == len(prompts) == answers.shape[0]
    assert [vocab[int(a)] for a in answers] == [" " + p["answer"] for p in prompts]


def test_object_prior_is_zipf():
    # p(k) ∝ 1/(k+1) over 4 objects: p(0) = 1 / (1 + 1/2 + 1/3 + 1/4) = 12/25 = 0.48
    facts = hl.make_kb(4000, 1, 4, 1.0, np.random.default_rng(0))
    share = np.mean([f["object"] == "capital0" for f in facts])
    assert abs(share - 0.48) < 0.03


def test_smoke_writes_results(tmp_path):
    res = hl.main(["--smoke", "--out", str(tmp_path)])
    saved = json.load(open(os.path.join(tmp_path, "results.json")))
    assert set(saved["arms"]) == {"success", "fail", "hallucination"}
    assert all(len(a["mean_curve"]) == 1 + 2 * 2 for a in saved["arms"].values())
    assert set(saved["top1_rates"]) == {"success", "fail", "hallucination"}
    assert {"curve_random", "curve_grouped", "final_prob_baseline", "entropy_baseline"} <= set(saved["classifier"])
    assert saved["knowledge"]["mixed_share"] == res["knowledge"]["mixed_share"]


@pytest.mark.parametrize("argv", [["--template-train", "1.5"], ["--n-subjects", "0"], ["--d-model", "30", "--n-heads", "4"]])
def test_bad_input_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        hl.main(argv)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
