"""Tests for flowrl.py: hand-computed losses, GAE against a plain loop, the exact evaluator."""

import itertools
import json
import math

import pytest
import torch
from torch.testing import assert_close

import flowrl


def test_flowrl_loss_two_lengths_one_clipped_weight():
    # sequence A: |y| = 2 (third slot is padding, junk values must be ignored); sequence B: |y| = 3
    logp = torch.tensor([[-1.0, -2.0, 100.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.5, 100.0], [-2.0, -2.0, -2.0]])
    old = torch.tensor([[-1.0, -2.0, -100.0], [-1.1, -1.1, -1.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    log_z = torch.tensor([0.5, -0.5], requires_grad=True)
    r_hat = torch.tensor([0.2, 1.0])
    loss, stats = flowrl.flowrl_loss(logp, ref, old, mask, log_z, r_hat, beta=2.0, clip_eps=0.2)
    # A: mean logp = (−1 − 2)/2 = −1.5, mean ref = −1.5; δ = 0.5 − 1.5 − 2·0.2 + 1.5 = 0.1
    #    log w = (−1 + 1) + (−2 + 2) = 0 → w = 1 (inside [0.8, 1.2]); w δ² = 0.01
    # B: mean logp = −1, mean ref = −2; δ = −0.5 − 1 − 2·1 + 2 = −1.5
    #    log w = 3 · (−1 + 1.1) = 0.3 → e^0.3 = 1.3499 → clipped to 1.2; w δ² = 1.2 · 2.25 = 2.7
    # L = (0.01 + 2.7) / 2 = 1.355
    assert_close(loss, torch.tensor(1.355))
    assert_close(stats["w_clip_frac"], torch.tensor(0.5))
    loss.backward()
    # ∂L/∂log_z = w · 2δ / N: A 1 · 0.2 / 2 = 0.1; B 1.2 · (−3) / 2 = −1.8
    assert_close(log_z.grad, torch.tensor([0.1, -1.8]))
    # ∂L/∂logp_t = w · 2δ / (N |y|) (w is detached): A 0.2 / 4 = 0.05; B 1.2 · (−3) / 6 = −0.6; padding 0
    assert_close(logp.grad, torch.tensor([[0.05, 0.05, 0.0], [-0.6, -0.6, -0.6]]))


def test_flowrl_loss_official_clamp():
    # the same batch with clamp(w, max=10): w_B = e^0.3 = 1.3498588 stays; L = (0.01 + 1.3498588 · 2.25) / 2
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.5, 0.0], [-2.0, -2.0, -2.0]])
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.1, -1.1, -1.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = flowrl.flowrl_loss(logp, ref, old, mask, torch.tensor([0.5, -0.5]), torch.tensor([0.2, 1.0]),
                                 beta=2.0, w_max=10.0)
    assert_close(loss, torch.tensor((0.01 + math.exp(0.3) * 2.25) / 2))


def test_group_normalize():
    # mean 0.5; unbiased std = sqrt((4 · 0.25) / 3) = 0.57735; r̂ = ±0.5 / 0.57735 = ±0.866025
    out = flowrl.group_normalize(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    assert_close(out, torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]]), atol=1e-5, rtol=0)
    # an all-equal group: std 0 → r̂ = 0 / (0 + 1e-6) = 0, no NaN
    same = flowrl.group_normalize(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(same, torch.zeros(2, 4))


def test_grpo_ratio_one_zero_loss_nonzero_grad():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    old = logp.detach().clone()
    adv = torch.tensor([1.0, -1.0])  # centred
    mask = torch.ones(2, 2)
    loss, stats = flowrl.grpo_loss(logp, old, old, mask, adv, clip_eps=0.2, kl_coef=0.04)
    # ρ = 1 everywhere: ℓ_t = −Â → token mean (−1 − 1 + 1 + 1) / 4 = 0; KL k3 at ref = logp is 0
    assert_close(loss, torch.tensor(0.0))
    loss.backward()
    # ∂ℓ_t/∂logp_t = −Â ρ / 4 = ∓0.25 (the k3 gradient −e^0 + 1 vanishes)
    assert_close(logp.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))


def test_grpo_clipping_both_sides():
    # four one-token responses: (Â, ρ) = (1, 1.5), (−1, 0.5), (1, 0.5), (−1, 1.5); ε = 0.2
    ratio = torch.tensor([[1.5], [0.5], [0.5], [1.5]])
    logp = ratio.log().clone().requires_grad_(True)
    old = torch.zeros(4, 1)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats = flowrl.grpo_loss(logp, old, logp.detach(), torch.ones(4, 1), adv, clip_eps=0.2, kl_coef=0.0)
    # ℓ = max(−Âρ, −Â clip(ρ)): max(−1.5, −1.2) = −1.2 (clipped above); max(0.5, 0.8) = 0.8 (clipped below);
    #     max(−0.5, −0.8) = −0.5 (not clipped); max(1.5, 1.2) = 1.5 (not clipped) → mean 0.6 / 4 = 0.15
    assert_close(loss, torch.tensor(0.15))
    loss.backward()
    # clipped terms give no gradient; the others ∂(−Âρ)/∂logp = −Âρ / 4: −0.5 / 4, 1.5 / 4
    assert_close(logp.grad, torch.tensor([[0.0], [0.0], [-0.125], [0.375]]))
    assert_close(stats["clip_frac"], torch.tensor(1.0))


def test_gae_hand_computed_and_plain_loop():
    # T = 2, r = [0, 1], V = [0.5, 0.6], γ = λ = 1: A_1 = 1 − 0.6 = 0.4; A_0 = 0 + 0.6 − 0.5 + 0.4 = 0.5
    adv, ret = flowrl.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.6]]), torch.ones(1, 2), 1.0, 1.0)
    assert_close(adv, torch.tensor([[0.5, 0.4]]))
    assert_close(ret, torch.tensor([[1.0, 1.0]]))
    g = torch.Generator().manual_seed(0)
    N, T, gamma, lam = 5, 6, 0.9, 0.8
    rewards, values = torch.randn(N, T, generator=g), torch.randn(N, T, generator=g)
    lengths = [6, 1, 3, 5, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv, ret = flowrl.gae(rewards, values, mask, gamma, lam)
    expect = torch.zeros(N, T)
    for i, n in enumerate(lengths):  # the textbook backward loop, one sequence at a time
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            last = delta + gamma * lam * last
            expect[i, t] = last
    assert_close(adv, expect)
    assert_close(ret, (expect + values) * mask)


def test_ppo_clipped_value_loss():
    # V = 1, V_old = 0, R = 1: unclipped error 0; clipped V = 0 + clip(1, ±0.5) = 0.5 → error 0.25;
    # ℓ_V = ½ max(0, 0.25) = 0.125; ratio 1, A = 0 → pg 0; loss = 0 + 0.5 · 0.125 = 0.0625
    one = torch.ones(1, 1)
    loss, stats = flowrl.ppo_loss(torch.zeros(1, 1), torch.zeros(1, 1), one, torch.zeros(1, 1), one,
                                  torch.zeros(1, 1), one, clip_eps=0.2, value_clip=0.5, vf_coef=0.5)
    assert_close(stats["vf_loss"], torch.tensor(0.125))
    assert_close(loss, torch.tensor(0.0625))


def test_n_valid_matches_brute_count():
    counts = {}
    for digits in itertools.product(range(10), repeat=4):
        counts[sum(digits)] = counts.get(sum(digits), 0) + 1
    for s in (0, 10, 14, 18, 25, 36):
        assert flowrl.n_valid(s) == counts[s]
    assert (flowrl.n_valid(10), flowrl.n_valid(14), flowrl.n_valid(18)) == (282, 540, 670)


def test_exact_evaluator_sums_to_one_and_matches_score():
    torch.manual_seed(0)
    model = flowrl.Policy(16, 32).eval()
    targets = [10, 18]
    logpi = flowrl.exact_logprobs(model, targets, torch.device("cpu"))  # (2, 10000)
    assert logpi.shape == (2, 10_000)
    assert_close(logpi.exp().sum(1), torch.ones(2, dtype=torch.float64))
    # answer a = 1000 d1 + 100 d2 + 10 d3 + d4: its log π equals the teacher-forced sum of score()
    answers = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4], [9, 9, 9, 9], [4, 0, 7, 7]])
    index = answers @ torch.tensor([1000, 100, 10, 1])
    for p, s in enumerate(targets):
        with torch.no_grad():
            logp = flowrl.score(model, flowrl.encode_prompts([s] * 4), answers)[0].sum(1)
        assert_close(logpi[p, index], logp.double(), atol=1e-5, rtol=0)


def test_evaluate_uniform_policy():
    # uniform π and uniform π_ref: accuracy N(s)/10⁴, effective answers N(s), KL(p* ‖ π) = log(10⁴ / N(s))
    cfg = flowrl.Config(eval_samples=64)
    uniform = torch.full((1, 10_000), -math.log(10_000), dtype=torch.float64)
    out = flowrl.evaluate(uniform, cfg, [10], torch.device("cpu"), ref_logpi=uniform)
    assert math.isclose(out["accuracy"], 282 / 10_000, rel_tol=1e-9)
    assert math.isclose(out["effective_answers"], 282, rel_tol=1e-9)
    assert math.isclose(out["kl_to_target"], math.log(10_000 / 282), rel_tol=1e-9)
    assert math.isclose(out["kl_from_target"], 0.0, abs_tol=1e-9)
    assert 0 <= out["distinct_valid"] <= 64


def test_reward_tiered():
    answers = torch.tensor([[2, 3, 4, 1], [3, 3, 3, 1], [1, 1, 1, 1]])
    targets = torch.tensor([10, 10, 10])
    # 2+3+4+1 = 10, first digit even → 1.0; 3+3+3+1 = 10, odd → 0.5; 1+1+1+1 = 4 ≠ 10 → 0
    assert_close(flowrl.reward_fn(answers, targets, "tiered"), torch.tensor([1.0, 0.5, 0.0]))
    assert_close(flowrl.reward_fn(answers, targets, "digitsum"), torch.tensor([1.0, 1.0, 0.0]))


def test_smoke_writes_every_arm(tmp_path):
    flowrl.main(["--smoke", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["arms"]) == {"flowrl", "grpo", "grpo_kl", "ppo"}
    for arm in results["arms"].values():
        for key in ("accuracy", "distinct_valid", "effective_answers", "kl_to_target", "wall_time_s"):
            assert math.isfinite(arm[key])
    assert results["target"]["accuracy"] == pytest.approx(1.0)
    assert results["target"]["kl_to_target"] == pytest.approx(0.0, abs=1e-9)


def test_unknown_algo_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        flowrl.main(["--algo", "flowrl,dpo"])
    assert e.value.code == 2
    assert "dpo" in capsys.readouterr().err
