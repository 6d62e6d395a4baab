"""Tests for flowrl.py: hand-computed losses, FlowRL's on-policy equivalence with kl_pg, GAE against a
plain loop, one training update checked against the pure losses, the exact evaluator on policies
whose answers are fixed by hand, and a short training run whose direction is known."""

import copy
import itertools
import json
import math

import pytest
import torch
from torch.testing import assert_close

import flowrl


# --- the paper's method: hand-computed losses ---


def test_flowrl_loss_two_lengths_one_clipped_weight():
    # sequence A: |y| = 2 (third slot is padding, junk values must be ignored); sequence B: |y| = 3
    logp = torch.tensor([[-1.0, -2.0, 100.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, -100.0], [-1.1, -1.1, -1.1]])
    ref = torch.tensor([[-1.5, -1.5, 100.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    log_z = torch.tensor([0.5, -0.5], requires_grad=True)
    r_hat = torch.tensor([0.2, 1.0])
    loss, stats = flowrl.flowrl_loss(logp, old, ref, mask, log_z, r_hat, beta=2.0, clip_eps=0.2)
    # A: mean logp = (−1 − 2)/2 = −1.5, mean ref = −1.5; δ = 0.5 − 1.5 − 2·0.2 + 1.5 = 0.1
    #    log w = (−1 + 1) + (−2 + 2) = 0 → w = 1 (inside [0.8, 1.2]); w δ² = 0.01
    # B: mean logp = −1, mean ref = −2; δ = −0.5 − 1 − 2·1 + 2 = −1.5
    #    log w = 3 · (−1 + 1.1) = 0.3 → e^0.3 = 1.3499 → clipped to 1.2; w δ² = 1.2 · 2.25 = 2.7
    # L = (0.01 + 2.7) / 2 = 1.355
    assert_close(loss, torch.tensor(1.355))
    assert_close(stats["w_clip_frac"], torch.tensor(0.5))
    assert_close(stats["delta2"], torch.tensor((0.01 + 2.25) / 2))
    assert_close(stats["log_z"], torch.tensor(0.0))
    assert not any(v.requires_grad for v in stats.values())  # stats are detached numbers
    loss.backward()
    # ∂L/∂log_z = w · 2δ / N: A 1 · 0.2 / 2 = 0.1; B 1.2 · (−3) / 2 = −1.8
    assert_close(log_z.grad, torch.tensor([0.1, -1.8]))
    # ∂L/∂logp_t = w · 2δ / (N |y|) (w is detached): A 0.2 / 4 = 0.05; B 1.2 · (−3) / 6 = −0.6
    assert_close(logp.grad, torch.tensor([[0.05, 0.05, 0.0], [-0.6, -0.6, -0.6]]))


def test_flowrl_loss_weight_clipped_below_and_official_clamp():
    # one token, δ = log_z + logp − β r̂ − ref = 0 + (−1) − 0 − (−2) = 1 → δ² = 1
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-2.0]])
    mask = torch.ones(1, 1)
    zero = torch.zeros(1)
    for log_w, w_paper, w_official in [(-0.5, 0.8, math.exp(-0.5)), (0.3, 1.2, math.exp(0.3)),
                                       (3.0, 1.2, 10.0)]:
        old = logp - log_w  # log w = logp − old
        loss, _ = flowrl.flowrl_loss(logp, old, ref, mask, zero, zero, beta=1.0, clip_eps=0.2)
        assert_close(loss, torch.tensor(w_paper))  # clip(e^{log w}, 0.8, 1.2) · 1
        loss, _ = flowrl.flowrl_loss(logp, old, ref, mask, zero, zero, beta=1.0, w_max=10.0)
        assert_close(loss, torch.tensor(w_official))  # clamp(e^{log w}, max = 10) · 1


def test_flowrl_loss_target_has_zero_residual():
    # π_θ = the target: (1/|y|) log π − (1/|y|) log π_ref = β r̂ − log Z, so δ = 0 and L = 0
    ref = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
    r_hat = torch.tensor([0.5, -1.0])
    beta = 3.0
    log_z = torch.tensor([0.7, 0.7])
    logp = ref + (beta * r_hat - log_z)[:, None]  # per-token shift, mean shift = β r̂ − log Z
    loss, _ = flowrl.flowrl_loss(logp, logp, ref, torch.ones(2, 2), log_z, r_hat, beta=beta)
    assert_close(loss, torch.tensor(0.0))


def test_flowrl_loss_rejects_column_vectors():
    logp = torch.zeros(3, 4)
    with pytest.raises(ValueError):
        flowrl.flowrl_loss(logp, logp, logp, logp, torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError):
        flowrl.flowrl_loss(logp, logp, logp, logp, torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError):
        flowrl.flowrl_loss(logp, logp, torch.zeros(3, 5), logp, torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError):
        flowrl.kl_pg_loss(logp, logp, logp, logp, torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError):
        flowrl.kl_pg_loss(logp, logp, logp, logp, torch.zeros(3), torch.zeros(3, 1))


def test_group_normalize():
    # mean 0.5; unbiased std = sqrt((4 · 0.25) / 3) = 0.57735; r̂ = ±0.5 / 0.57735 = ±0.866025
    out = flowrl.group_normalize(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    assert_close(out, torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]]), atol=1e-5, rtol=0)
    # [3, 1]: mean 2, unbiased std sqrt(2) → ±1 / 1.41421 = ±0.707107 (a biased std would give ±1)
    out = flowrl.group_normalize(torch.tensor([[3.0, 1.0]]))
    assert_close(out, torch.tensor([[0.707107, -0.707107]]), atol=1e-5, rtol=0)
    # an all-equal group: std 0 → r̂ = 0 / (0 + 1e-6) = 0, no NaN
    same = flowrl.group_normalize(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(same, torch.zeros(2, 4))
    # the 1e-6 is added to the std: [1, 0] → ±0.5 / (√0.5 + 1e-6), checked in float64
    out = flowrl.group_normalize(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    expected = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert_close(out, torch.tensor([[expected, -expected]], dtype=torch.float64), rtol=1e-12,
                 atol=0)
    # G = 1: mean 0, std 1 as verl → r / (1 + 1e-6)
    assert_close(flowrl.group_normalize(torch.tensor([[2.0]])), torch.tensor([[2.0 / (1 + 1e-6)]]))
    with pytest.raises(ValueError):
        flowrl.group_normalize(torch.zeros(4))


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
    loss, stats = flowrl.grpo_loss(logp, old, logp.detach(), torch.ones(4, 1), adv, clip_eps=0.2,
                                   kl_coef=0.0)
    # ℓ = max(−Âρ, −Â clip(ρ)): max(−1.5, −1.2) = −1.2 (clipped above); max(0.5, 0.8) = 0.8
    # (clipped below); max(−0.5, −0.8) = −0.5 (not clipped); max(1.5, 1.2) = 1.5 → 0.6 / 4 = 0.15
    assert_close(loss, torch.tensor(0.15))
    loss.backward()
    # clipped terms give no gradient; the others ∂(−Âρ)/∂logp = −Âρ / 4: −0.5 / 4, 1.5 / 4
    assert_close(logp.grad, torch.tensor([[0.0], [0.0], [-0.125], [0.375]]))
    assert_close(stats["clip_frac"], torch.tensor(1.0))


def test_grpo_k3_direction_clamp_and_sign():
    # one token, Â = 0: loss = kl_coef · k3(u), u = ref − logp
    mask = torch.ones(1, 1)
    adv = torch.zeros(1)
    logp = torch.zeros(1, 1, requires_grad=True)
    # u = +1: e^1 − 1 − 1 = 0.718282 (the other direction, u = −1, would give e^−1 + 1 − 1 = 0.3679)
    loss, stats = flowrl.grpo_loss(logp, logp.detach(), torch.ones(1, 1), mask, adv, kl_coef=2.0)
    assert_close(loss, torch.tensor(2 * 0.718282), rtol=1e-5, atol=1e-5)
    assert_close(stats["kl"], torch.tensor(0.718282), rtol=1e-5, atol=1e-5)
    loss.backward()
    # ∂/∂logp [2 (e^{ref − logp} − (ref − logp) − 1)] = 2 (1 − e^1) = −3.43656: the penalty pulls
    # logp up towards ref (a minus sign on the KL term would push it away)
    assert_close(logp.grad, torch.tensor([[2 * (1 - math.e)]]), rtol=1e-5, atol=1e-5)
    # u = −25: e^−20 + 20 − 1 ≈ 19 after the ±20 log-ratio clamp, then the estimate clamp → 10
    zero = torch.zeros(1, 1)
    loss, _ = flowrl.grpo_loss(zero, zero, zero - 25, mask, adv, kl_coef=1.0)
    assert_close(loss, torch.tensor(10.0))
    # u = 30 → 10 as well; unclamped u = 3: e^3 − 4 = 16.0855
    loss, _ = flowrl.grpo_loss(zero, zero, zero + 30, mask, adv, kl_coef=1.0)
    assert_close(loss, torch.tensor(10.0))
    loss, _ = flowrl.grpo_loss(zero, zero, zero + 3, mask, adv, kl_coef=1.0, kl_clamp=False)
    assert_close(loss, torch.tensor(math.exp(3) - 4))
    # u = 2.5 inside both clamps: e^2.5 − 3.5 = 8.6825
    loss, _ = flowrl.grpo_loss(zero, zero, zero + 2.5, mask, adv, kl_coef=1.0)
    assert_close(loss, torch.tensor(math.exp(2.5) - 3.5))


def test_grpo_token_mean_over_the_mask():
    # two responses, lengths 1 and 3 (the padded slots hold junk); Â = (1, −2), ρ = 1:
    # Σ_t −Â over real tokens = −1 + 3 · 2 = 5, over 4 tokens → 1.25
    logp = torch.tensor([[-1.0, 50.0, 50.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = flowrl.grpo_loss(logp, logp, logp, mask, torch.tensor([1.0, -2.0]), kl_coef=0.0)
    assert_close(loss, torch.tensor(1.25))
    with pytest.raises(ValueError):
        flowrl.grpo_loss(logp, logp, logp, mask, torch.zeros(2, 1))


def test_empty_answers_give_no_nan():
    # a batch whose mask is all zero (no response tokens): every loss is finite
    logp = torch.full((2, 3), -1.0)
    empty = torch.zeros(2, 3)
    zeros = torch.zeros(2)
    losses = [flowrl.grpo_loss(logp, logp, logp, empty, zeros + 1)[0],
              flowrl.flowrl_loss(logp, logp, logp, empty, zeros, zeros + 1)[0],
              flowrl.kl_pg_loss(logp, logp, logp, empty, zeros + 1, zeros)[0],
              flowrl.ppo_loss(logp, logp, empty, logp, logp, logp, logp)[0]]
    for loss in losses:
        assert torch.isfinite(loss)


def test_kl_pg_loss_hand_computed():
    # two 2-token answers; A = r̂ − kl_weight · Σ_t (logp − ref) − b, w = clip(e^{Σ(logp − old)})
    logp = torch.tensor([[-1.0, -1.0], [-2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0], [-2.2, -0.5]])
    ref = torch.tensor([[-1.5, -1.5], [-1.0, -1.0]])
    mask = torch.ones(2, 2)
    reward = torch.tensor([1.0, -1.0])
    baseline = torch.tensor([0.1, 0.1])
    loss, stats = flowrl.kl_pg_loss(logp, old, ref, mask, reward, baseline, kl_weight=0.5,
                                    clip_eps=0.2)
    # 1: log π/π_ref = 0.5 + 0.5 = 1 → A = 1 − 0.5 − 0.1 = 0.4; log w = 0 → w = 1;
    #    (1/|y|) log π = −1 → term w A avg = −0.4
    # 2: log π/π_ref = −1 + 0.5 = −0.5 → A = −1 + 0.25 − 0.1 = −0.85; log w = 0.2 → e^0.2 = 1.2214
    #    → clipped to 1.2; (1/|y|) log π = −1.25 → term 1.2 · (−0.85) · (−1.25) = 1.275
    # L = −(−0.4 + 1.275) / 2 = −0.4375
    assert_close(loss, torch.tensor(-0.4375))
    assert_close(stats["kl"], torch.tensor(0.25))  # mean of (1, −0.5)
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    # ∂L/∂logp_t = −w A / (N |y|): 1: −0.4 / 4 = −0.1; 2: 1.2 · 0.85 / 4 = 0.255 (A is detached)
    assert_close(logp.grad, torch.tensor([[-0.1, -0.1], [0.255, 0.255]]))


def test_kl_pg_baseline_is_the_group_mean_of_the_shaped_reward():
    # G = 2: shaped = r̂ − 0.5 · Σ_t (old − ref); group 1: 1 − 0.5 · 1 = 0.5 and −1 − 0.5 · (−1) = −0.5
    # → mean 0; group 2: 0 − 0.5 · 2 = −1 and 0 − 0 = 0 → mean −0.5
    old = torch.tensor([[0.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    ref = torch.tensor([[-0.5, -0.5], [0.0, 0.0], [-1.0, -1.0], [-1.0, -1.0]])
    r_hat = torch.tensor([1.0, -1.0, 0.0, 0.0])
    b = flowrl.kl_pg_baseline(r_hat, old, ref, torch.ones(4, 2), 0.5, 2)
    assert_close(b, torch.tensor([0.0, 0.0, -0.5, -0.5]))
    with pytest.raises(ValueError):
        flowrl.kl_pg_baseline(r_hat[:, None], old, ref, torch.ones(4, 2), 0.5, 2)


def test_flowrl_expected_gradient_equals_kl_pg_on_policy():
    # the docstring's claim, exactly: a policy over 2-token answers (4 × 4 = 16 of them, each token
    # drawn from its own softmax), on-policy (w = 1), expectation taken by enumeration:
    # E[∇ flowrl_loss] = 2β · E[∇ kl_pg_loss] when kl_weight = 1/(β |y|), whatever log Z and b are
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(2, 4, generator=g).requires_grad_(True)
    ref_logits = torch.randn(2, 4, generator=g)
    answers = torch.tensor(list(itertools.product(range(4), repeat=2)))  # (16, 2)
    r_hat = torch.randn(16, generator=g)
    beta = 1.5
    grads = []
    for loss_name in ("flowrl", "kl_pg"):
        log_pi_tok = torch.log_softmax(theta, dim=-1)  # (2, 4)
        logp = torch.stack([log_pi_tok[0, answers[:, 0]], log_pi_tok[1, answers[:, 1]]], 1)  # (16, 2)
        ref_tok = torch.log_softmax(ref_logits, dim=-1)
        ref_logp = torch.stack([ref_tok[0, answers[:, 0]], ref_tok[1, answers[:, 1]]], 1)  # (16, 2)
        prob = logp.sum(1).exp().detach()  # (16,): π(y), sums to 1
        total = 0.0
        for i in range(16):  # E_π[ℓ_y] with ℓ_y the loss of the single sample y
            one = slice(i, i + 1)
            if loss_name == "flowrl":
                loss, _ = flowrl.flowrl_loss(logp[one], logp[one].detach(), ref_logp[one],
                                             torch.ones(1, 2), torch.tensor([0.3]), r_hat[one],
                                             beta=beta)
            else:
                loss, _ = flowrl.kl_pg_loss(logp[one], logp[one].detach(), ref_logp[one],
                                            torch.ones(1, 2), r_hat[one], torch.tensor([-0.7]),
                                            kl_weight=1 / (beta * 2))
            total = total + prob[i] * loss
        grads.append(torch.autograd.grad(total, theta)[0])
    assert grads[1].abs().max() > 1e-3
    assert_close(grads[0], 2 * beta * grads[1], rtol=1e-4, atol=1e-6)


def test_gae_hand_computed_and_plain_loop():
    # T = 2, r = [0, 1], V = [0.5, 0.6], γ = λ = 1: A_1 = 1 − 0.6 = 0.4; A_0 = 0 + 0.6 − 0.5 + 0.4
    adv, ret = flowrl.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.6]]), torch.ones(1, 2),
                          1.0, 1.0)
    assert_close(adv, torch.tensor([[0.5, 0.4]]))
    assert_close(ret, torch.tensor([[1.0, 1.0]]))
    g = torch.Generator().manual_seed(0)
    n_seq = 5
    n_steps = 6
    gamma = 0.9
    lam = 0.8
    rewards = torch.randn(n_seq, n_steps, generator=g)
    values = torch.randn(n_seq, n_steps, generator=g)
    lengths = [6, 1, 3, 5, 2]
    mask = torch.tensor([[1.0] * n + [0.0] * (n_steps - n) for n in lengths])
    adv, ret = flowrl.gae(rewards, values, mask, gamma, lam)
    expect = torch.zeros(n_seq, n_steps)
    for i, n in enumerate(lengths):  # the textbook backward loop, one sequence at a time
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            last = delta + gamma * lam * last
            expect[i, t] = last
    assert_close(adv, expect)
    assert_close(ret, (expect + values) * mask)


def test_whiten_centres_and_scales_over_the_mask():
    # real entries 1, 2, 3 (the 100 is padding): mean 2, unbiased var (1 + 0 + 1) / 2 = 1 → −1, 0, 1
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert_close(flowrl.whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6,
                 rtol=0)
    # 2, 4 → mean 3, var 2 → ∓1 / 1.41421
    out = flowrl.whiten(torch.tensor([[2.0, 4.0]]), torch.ones(1, 2))
    assert_close(out, torch.tensor([[-0.707107, 0.707107]]), atol=1e-5, rtol=0)


def test_ppo_advantages_put_the_reward_on_the_last_token():
    # V = 0, γ = λ = 1: every token's return is the final reward (a reward on the first token
    # would give the later tokens return 0); advantages are the whitened returns
    reward = torch.tensor([1.0, 0.0, 0.0, 2.0])
    values = torch.zeros(4, 3)
    mask = torch.ones(4, 3)
    adv, returns = flowrl.ppo_advantages(reward, values, mask, 1.0)
    assert_close(returns, reward[:, None].expand(4, 3))
    # 12 entries: three each of 1, 0, 0, 2 → mean 0.75, unbiased var (3 (0.0625 + 0.5625 · 2 +
    # 1.5625)) / 11 = 8.25 / 11 = 0.75 → std 0.866025
    expect = (reward[:, None].expand(4, 3) - 0.75) / 0.866025
    assert_close(adv, expect, atol=1e-5, rtol=0)
    # a 2-token answer in a 3-slot row: the reward sits on slot 1, slot 2 stays empty
    _, returns = flowrl.ppo_advantages(torch.tensor([1.0]), torch.zeros(1, 3),
                                       torch.tensor([[1.0, 1.0, 0.0]]), 1.0)
    assert_close(returns, torch.tensor([[1.0, 1.0, 0.0]]))


def test_ppo_loss_clipped_value_and_surrogate():
    # V = 1, V_old = 0, R = 1: unclipped error 0; clipped V = 0 + clip(1, ±0.5) = 0.5 → error 0.25;
    # ℓ_V = ½ max(0, 0.25) = 0.125; ratio 1, A = 0 → pg 0; loss = 0 + 0.5 · 0.125 = 0.0625
    one = torch.ones(1, 1)
    zero = torch.zeros(1, 1)
    loss, stats = flowrl.ppo_loss(zero, zero, one, zero, one, zero, one, clip_eps=0.2,
                                  value_clip=0.5, vf_coef=0.5)
    assert_close(stats["vf_loss"], torch.tensor(0.125))
    assert_close(loss, torch.tensor(0.0625))
    # the same on two tokens: the token mean is still 0.125 (a mean of a mean would halve it)
    two = torch.ones(1, 2)
    zeros = torch.zeros(1, 2)
    _, stats = flowrl.ppo_loss(zeros, zeros, two, zeros, two, zeros, two)
    assert_close(stats["vf_loss"], torch.tensor(0.125))
    # surrogate: A = (1, −1), ρ = (1.5, 1.5): max(−1.5, −1.2) = −1.2; max(1.5, 1.2) = 1.5 → 0.15;
    # V = R = 0.2 = V_old → no value loss
    logp = torch.tensor([[math.log(1.5), math.log(1.5)]])
    v = torch.full((1, 2), 0.2)
    loss, stats = flowrl.ppo_loss(logp, torch.zeros(1, 2), torch.ones(1, 2),
                                  torch.tensor([[1.0, -1.0]]), v, v, v, clip_eps=0.2)
    assert_close(stats["pg_loss"], torch.tensor(0.15))
    assert_close(loss, torch.tensor(0.15))
    # the stats are detached numbers, the loss carries the gradient
    v = v.clone().requires_grad_(True)
    logp = logp.clone().requires_grad_(True)
    loss, stats = flowrl.ppo_loss(logp, torch.zeros(1, 2), torch.ones(1, 2),
                                  torch.tensor([[1.0, -1.0]]), v, v.detach(), v.detach() + 1)
    assert loss.requires_grad
    assert not stats["vf_loss"].requires_grad and not stats["pg_loss"].requires_grad


# --- data, model and rollouts ---


def test_n_valid_matches_brute_count():
    counts = {}
    for digits in itertools.product(range(10), repeat=4):
        counts[sum(digits)] = counts.get(sum(digits), 0) + 1
    for s in (0, 10, 14, 18, 25, 36):
        assert flowrl.n_valid(s) == counts[s]
    assert (flowrl.n_valid(10), flowrl.n_valid(14), flowrl.n_valid(18)) == (282, 540, 670)
    assert flowrl.ALL_ANSWERS[1234].tolist() == [1, 2, 3, 4]


def test_reward_tiered():
    answers = torch.tensor([[2, 3, 4, 1], [3, 3, 3, 1], [1, 1, 1, 1]])
    targets = torch.tensor([10, 10, 10])
    # 2+3+4+1 = 10, first digit even → 1.0; 3+3+3+1 = 10, odd → 0.5; 1+1+1+1 = 4 ≠ 10 → 0
    assert_close(flowrl.reward_fn(answers, targets, "tiered"), torch.tensor([1.0, 0.5, 0.0]))
    assert_close(flowrl.reward_fn(answers, targets, "digitsum"), torch.tensor([1.0, 1.0, 0.0]))


def small_policy(seed):
    torch.manual_seed(seed)
    return flowrl.Policy(8, 16).eval()


def test_sample_follows_the_policy():
    # a head that puts almost all mass on digit 7 (then 2 second): samples are 7777
    model = small_policy(0)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0, 0, 20.0, 0, 0, 0, 0, 40.0, 0, 0]))
    answers = flowrl.sample(model, flowrl.encode_prompts([10, 20])).answers
    assert answers.tolist() == [[7, 7, 7, 7], [7, 7, 7, 7]]
    # the empirical first-digit frequencies of a random policy match π within sampling noise
    model = small_policy(1)
    with torch.no_grad():
        model.head.weight.mul_(100)
    prompts = flowrl.encode_prompts([12] * 4000)
    torch.manual_seed(2)
    drawn = flowrl.sample(model, prompts)
    first = drawn.answers[:, 0]
    # the log-probabilities and values returned with the samples are the teacher-forced ones
    with torch.no_grad():
        scores = flowrl.score(model, prompts[:50], drawn.answers[:50])
    assert_close(drawn.logp[:50], scores.logp)
    assert_close(drawn.values[:50], scores.values)
    freq = torch.bincount(first, minlength=10).float() / 4000
    with torch.no_grad():
        pi_first = flowrl.score(model, prompts[:1], torch.zeros(1, 4, dtype=torch.long)).logp_all
    assert_close(freq, pi_first[0, 0].exp(), atol=0.03, rtol=0)


def test_log_z_head_is_the_official_mlp_on_the_mean_prompt_state():
    head = flowrl.LogZHead(8)
    layers = [type(m).__name__ for m in head.net]
    assert layers == ["Linear", "GELU", "LayerNorm", "Dropout"] * 2 + ["Linear"]
    assert head.net[3].p == 0.1
    assert head(torch.zeros(5, 8)).shape == (5,)
    # log Z reads the prompt only: the mean over the prompt's hidden states, whatever the answer
    model = small_policy(0)
    prompts = flowrl.encode_prompts([10, 21])
    with torch.no_grad():
        a = flowrl.score(model, prompts, torch.tensor([[1, 2, 3, 4], [5, 5, 5, 5]])).log_z
        b = flowrl.score(model, prompts, torch.tensor([[9, 0, 0, 0], [0, 0, 0, 0]])).log_z
        h, _ = model(prompts)  # (2, 3, H)
        expected = model.log_z(h.mean(dim=1))
    assert_close(a, b)
    assert_close(a, expected)


def test_load_targets(tmp_path):
    assert flowrl.load_targets("", False) == [10, 12, 14, 16, 18, 20, 22, 24]
    assert flowrl.load_targets("", True) == [10, 14, 18, 22]
    good = tmp_path / "good.jsonl"
    good.write_text('{"target": 0}\n\n{"target": 36}\n')
    assert flowrl.load_targets(str(good), False) == [0, 36]
    for bad_value in ("37", "-1", "12.5"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"target": %s}\n' % bad_value)
        with pytest.raises(flowrl.BadInput):
            flowrl.load_targets(str(bad), False)


def test_exact_evaluator_sums_to_one_and_matches_score():
    model = small_policy(0)
    with torch.no_grad():
        model.head.weight.mul_(100)  # a far-from-uniform policy
    targets = [10, 18]
    logpi = flowrl.exact_logprobs(model, targets, torch.device("cpu"))  # (2, 10000)
    assert logpi.shape == (2, 10_000)
    assert_close(logpi.exp().sum(1), torch.ones(2, dtype=torch.float64))
    # answer a = 1000 d1 + 100 d2 + 10 d3 + d4: its log π equals the teacher-forced sum of score()
    answers = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4], [9, 9, 9, 9], [4, 0, 7, 7]])
    index = answers @ torch.tensor([1000, 100, 10, 1])
    for p, s in enumerate(targets):
        with torch.no_grad():
            logp = flowrl.score(model, flowrl.encode_prompts([s] * 4), answers).logp.sum(1)
        assert_close(logpi[p, index], logp.double(), atol=1e-5, rtol=0)


def test_collect_rollout_scores_under_old_policy_and_frozen_reference():
    model = small_policy(0)
    ref = small_policy(1)  # a different model: its log-probs must differ from the policy's
    prompts = flowrl.encode_prompts([10, 10, 10, 12, 12, 12])
    targets = torch.tensor([10, 10, 10, 12, 12, 12])
    torch.manual_seed(0)
    roll = flowrl.collect_rollout(model, ref, prompts, targets, "digitsum", 3)
    with torch.no_grad():
        assert_close(roll.old_logp, flowrl.score(model, prompts, roll.answers).logp)
        assert_close(roll.old_values, flowrl.score(model, prompts, roll.answers).values)
        assert_close(roll.ref_logp, flowrl.score(ref, prompts, roll.answers).logp)
    assert (roll.ref_logp - roll.old_logp).abs().max() > 1e-3
    assert_close(roll.reward, flowrl.reward_fn(roll.answers, targets, "digitsum"))
    assert_close(roll.r_hat, flowrl.group_normalize(roll.reward.view(2, 3)).view(-1))
    assert_close(roll.mask, torch.ones(6, 4))
    assert roll.prompts is prompts


# --- one training update, checked against the pure losses ---


def hand_rollout(model, ref):
    """Two prompts × G 4 with mixed rewards; π_old ≠ π_θ (old_logp shifted) so the clips act."""
    prompts = flowrl.encode_prompts([10] * 4 + [12] * 4)
    targets = torch.tensor([10] * 4 + [12] * 4)
    answers = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0], [4, 3, 2, 1], [9, 0, 0, 0],
                            [3, 3, 3, 3], [1, 1, 1, 1], [0, 0, 0, 0], [2, 2, 4, 4]])
    with torch.no_grad():
        now = flowrl.score(model, prompts, answers)
        ref_logp = flowrl.score(ref, prompts, answers).logp
    # log w = Σ_t (logp − old_logp) = −4 · shift: w = 1, 0.67, 1.49, 0.30, 7.39, 0.82, 1, 1.08
    shift = torch.tensor([0.0, 0.1, -0.1, 0.3, -0.5, 0.05, 0.0, -0.02])[:, None]
    old_logp = now.logp + shift  # (8, 4)
    reward = flowrl.reward_fn(answers, targets, "digitsum")  # 1, 0, 1, 0 | 1, 0, 0, 1
    r_hat = flowrl.group_normalize(reward.view(2, 4)).view(-1)
    return flowrl.Rollout(prompts, answers, torch.ones(8, 4), old_logp, now.values + 0.3,
                          ref_logp, reward, r_hat)


@pytest.mark.parametrize("algo,coef,official", [("flowrl", 2.0, False), ("flowrl", 2.0, True),
                                                ("kl_pg", 0.25, False), ("kl_pg", 0.25, True),
                                                ("grpo", 0.5, False), ("grpo_kl", 0.1, False),
                                                ("ppo", 0.0, False)])
def test_update_uses_the_right_loss_and_inputs(algo, coef, official):
    model = small_policy(0)  # eval mode: no dropout in the log Z head, so the loss is repeatable
    ref = small_policy(1)
    roll = hand_rollout(model, ref)
    assert not torch.equal(roll.reward, roll.r_hat)
    cfg = flowrl.Config(group=4, lam=0.9, clip_eps=0.1, official_clamp=official)
    w_max = 10.0 if official else None  # the official clamp(w, max = 10) keeps w = 7.39
    mask = roll.mask
    with torch.no_grad():
        now = flowrl.score(model, roll.prompts, roll.answers)
    if algo == "flowrl":
        expected, _ = flowrl.flowrl_loss(now.logp, roll.old_logp, roll.ref_logp, mask, now.log_z,
                                         roll.r_hat, beta=coef, clip_eps=0.1, w_max=w_max)
    elif algo == "kl_pg":
        b = flowrl.kl_pg_baseline(roll.r_hat, roll.old_logp, roll.ref_logp, mask, coef, 4)
        expected, _ = flowrl.kl_pg_loss(now.logp, roll.old_logp, roll.ref_logp, mask, roll.r_hat,
                                        b, kl_weight=coef, clip_eps=0.1, w_max=w_max)
    elif algo == "ppo":
        adv, returns = flowrl.ppo_advantages(roll.reward, roll.old_values, mask, 0.9)
        expected, _ = flowrl.ppo_loss(now.logp, roll.old_logp, mask, adv, now.values,
                                      roll.old_values, returns, clip_eps=0.1)
    else:
        expected, _ = flowrl.grpo_loss(now.logp, roll.old_logp, roll.ref_logp, mask, roll.r_hat,
                                       clip_eps=0.1, kl_coef=coef)
    arm = flowrl.Arm(algo, algo, coef, "digitsum")
    opt = flowrl.make_optimizer(model, 0.01, 1.0)
    before = copy.deepcopy(model.state_dict())
    history = flowrl.update(model, opt, roll, arm, [torch.arange(8)], cfg, 1)
    assert len(history) == 1
    assert history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert not torch.equal(model.head.weight, before["head.weight"])  # the optimizer stepped


def test_update_scores_each_minibatch_afresh_against_the_sampling_policy():
    model = small_policy(0).train()
    ref = small_policy(1)
    prompts = flowrl.encode_prompts([10] * 8 + [14] * 8)
    targets = torch.tensor([10] * 8 + [14] * 8)
    torch.manual_seed(0)
    roll = flowrl.collect_rollout(model, ref, prompts, targets, "digitsum", 8)
    old_logp = roll.old_logp.clone()
    cfg = flowrl.Config(group=8)
    opt = flowrl.make_optimizer(model, 0.05, 1.0)
    minibatches = [torch.arange(0, 16, 2), torch.arange(1, 16, 2)]
    arm = flowrl.Arm("grpo", "grpo", 0.001, "digitsum")
    history = flowrl.update(model, opt, roll, arm, minibatches, cfg, 1)
    # the first minibatch is on-policy; the second sees the policy the first step moved
    assert history[0]["drift"] < 1e-5
    assert history[1]["drift"] > 1e-3
    assert torch.equal(roll.old_logp, old_logp)  # π_old's log-probs stay those of the sampler


def test_make_optimizer_gives_log_z_its_learning_rate():
    model = small_policy(0)
    opt = flowrl.make_optimizer(model, 0.01, 3.0)
    assert [g["lr"] for g in opt.param_groups] == [0.01, pytest.approx(0.03)]
    n_z = sum(p.numel() for p in model.log_z.parameters())
    assert sum(p.numel() for p in opt.param_groups[1]["params"]) == n_z
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())


def test_training_raises_accuracy_for_every_arm(capsys):
    # a known direction: 40 steps on 2 prompts from a near-uniform policy (accuracy 0.05) must
    # raise the exact accuracy for each arm (measured: 0.51, 0.94, 0.99, 0.99 at a high learning
    # rate and the paper's β = 15), and leave π_ref untouched
    cfg = flowrl.Config(steps=40, group=8, d_model=8, hidden=16, lr=0.03, eval_samples=64,
                        log_every=1000)
    targets = [12, 15]
    ref = small_policy(0)
    init_state = copy.deepcopy(ref.state_dict())
    ref.requires_grad_(False)
    ref_logpi = flowrl.exact_logprobs(ref, targets, torch.device("cpu"))
    initial = flowrl.evaluate(ref_logpi, ref_logpi, targets, "digitsum", 64, 0)["accuracy"]
    for algo, coef in [("flowrl", 15.0), ("kl_pg", 1 / 60), ("grpo", 0.001), ("ppo", 0.0)]:
        arm = flowrl.Arm(algo, algo, coef, "digitsum")
        out = flowrl.train_arm(arm, cfg, init_state, ref, ref_logpi, targets, 0,
                               torch.device("cpu"))
        assert out["accuracy"] > initial + 0.3, (algo, out["accuracy"], initial)
        assert 0 < out["cpu_time_s"] < 600 and 0 < out["wall_time_s"] < 600
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, init_state[name])
    # a single step already moves the policy (step 1 is trained, not skipped)
    one = flowrl.train_arm(flowrl.Arm("grpo", "grpo", 0.001, "digitsum"),
                           flowrl.Config(**{**cfg.__dict__, "steps": 1}), init_state, ref,
                           ref_logpi, targets, 0, torch.device("cpu"))
    assert one["accuracy"] != initial
    # one progress line per arm (log_every 1000 > steps: only the last step logs), and the 1-step run
    out = capsys.readouterr().out
    assert out.count("step    40/40") == 4
    assert out.count("step ") == 5


# --- the exact evaluator ---


def test_evaluate_uniform_policy():
    # uniform π and uniform π_ref: accuracy N(s)/10⁴, effective answers N(s),
    # KL(p* ‖ π) = log(10⁴ / N(s)), KL(π|valid ‖ p*) = 0
    uniform = torch.full((1, 10_000), -math.log(10_000), dtype=torch.float64)
    out = flowrl.evaluate(uniform, uniform, [10], "digitsum", 64, 0)
    assert math.isclose(out["accuracy"], 282 / 10_000, rel_tol=1e-9)
    assert math.isclose(out["effective_answers"], 282, rel_tol=1e-9)
    assert math.isclose(out["kl_to_target"], math.log(10_000 / 282), rel_tol=1e-9)
    assert math.isclose(out["kl_from_target"], 0.0, abs_tol=1e-9)
    assert 0 <= out["distinct_valid"] <= 64


def test_evaluate_a_policy_with_known_answers():
    # s = 1: the valid answers are 0001, 0010, 0100, 1000 (indices 1, 10, 100, 1000).
    # π: 0.4 on 0001, 0.1 on 0010, 0.5 on the invalid 0000; π_ref uniform → p* = 1/4 on each valid
    pi = torch.full((1, 10_000), 1e-300, dtype=torch.float64)
    pi[0, 1] = 0.4
    pi[0, 10] = 0.1
    pi[0, 0] = 0.5
    logpi = pi.log()
    uniform = torch.full((1, 10_000), -math.log(10_000), dtype=torch.float64)
    out = flowrl.evaluate(logpi, uniform, [1], "tiered", 512, 0)
    assert math.isclose(out["accuracy"], 0.5, rel_tol=1e-9)
    # π|valid = (0.8, 0.2): effective answers exp(−0.8 ln 0.8 − 0.2 ln 0.2) = exp(0.500402) = 1.6494
    assert math.isclose(out["effective_answers"], 1.649385, rel_tol=1e-5)
    # KL(π|valid ‖ p*) = 0.8 ln(0.8 / 0.25) + 0.2 ln(0.2 / 0.25) = 0.930515 − 0.044629 = 0.885886
    assert math.isclose(out["kl_from_target"], 0.885886, rel_tol=1e-5)
    # KL(p* ‖ π) = 0.25 [ln(0.25/0.4) + ln(0.25/0.1) + 2 ln(0.25/1e-300)]: huge, π misses two answers
    expected = 0.25 * (math.log(0.25 / 0.4) + math.log(0.25 / 0.1) + 2 * math.log(0.25 / 1e-300))
    assert math.isclose(out["kl_to_target"], expected, rel_tol=1e-9)
    # 512 draws see 0000, 0001 and 0010 (each has mass ≥ 0.1): only the two valid ones count
    assert out["distinct_valid"] == 2
    assert math.isclose(out["pass_at_1"], 0.5, abs_tol=0.07)
    # tiered: first digit 0 is even → both 0001 and 0010 pay 1.0; 1000 (odd, mass ~0) pays 0.5
    assert out["mass_ratio"] < 1e-100
    # the reference p* itself: mass 0.25 at 1000 (odd) vs 0.75 even → ratio 1/3
    star = flowrl.renormalise_valid(uniform, flowrl.ALL_ANSWERS.sum(-1)[None, :] == 1)
    out = flowrl.evaluate(star, uniform, [1], "tiered", 512, 0)
    assert math.isclose(out["mass_ratio"], 1 / 3, rel_tol=1e-9)
    assert math.isclose(out["kl_to_target"], 0.0, abs_tol=1e-12)
    assert out["distinct_valid"] == 4


# --- the whole run ---


def test_summarise_mean_std_worst():
    rows = [{"accuracy": 0.9, "kl_to_target": 1.0}, {"accuracy": 0.5, "kl_to_target": 3.0},
            {"accuracy": 0.7, "kl_to_target": 2.0}]
    out = flowrl.summarise(rows)
    assert out["accuracy"] == pytest.approx(0.7)
    assert out["std"]["accuracy"] == pytest.approx(0.2)  # unbiased: sqrt((0.04 + 0.04) / 2)
    assert out["worst"] == {"accuracy": 0.5, "kl_to_target": 3.0}
    assert out["per_seed"] == rows
    # two seeds: unbiased std |a − b| / √2 = 0.2 / 1.41421; one seed: std 0
    two = flowrl.summarise(rows[:2])
    assert two["std"]["accuracy"] == pytest.approx(0.4 / math.sqrt(2))
    assert flowrl.summarise(rows[:1])["std"] == {"accuracy": 0.0, "kl_to_target": 0.0}


def test_main_arms_tie_kl_pg_to_beta():
    arms = {a.algo: a for a in flowrl.main_arms(flowrl.Config(beta=4.0))}
    assert arms["kl_pg"].coef == pytest.approx(1 / 16)  # 1/(β |y|) with |y| = 4
    assert arms["flowrl"].coef == 4.0
    assert (arms["grpo"].coef, arms["grpo_kl"].coef) == (0.001, 0.1)
    tiered = flowrl.tiered_arms(flowrl.Config(tiered_arms="kl_pg,ppo"))
    assert [(a.algo, a.coef, a.task) for a in tiered] == [("kl_pg", 0.125, "tiered"),
                                                        ("ppo", 0.0, "tiered")]


def test_run_key_trains_grpo_kl_and_grpo_once_but_keeps_algorithms_apart():
    key = flowrl.run_key
    assert key(flowrl.Arm("grpo_kl", "grpo_kl", 0.1, "digitsum"), 0) == key(
        flowrl.Arm("grpo KL=0.1", "grpo", 0.1, "digitsum"), 0)
    assert key(flowrl.Arm("flowrl", "flowrl", 0.1, "digitsum"), 0) != key(
        flowrl.Arm("grpo", "grpo", 0.1, "digitsum"), 0)
    assert key(flowrl.Arm("kl_pg", "kl_pg", 0.1, "digitsum"), 0) != key(
        flowrl.Arm("kl_pg", "kl_pg", 0.1, "tiered"), 0)
    assert key(flowrl.Arm("ppo", "ppo", 0.0, "digitsum"), 0) != key(
        flowrl.Arm("ppo", "ppo", 0.0, "digitsum"), 1)


def test_smoke_writes_every_arm_frontier_and_tiered(tmp_path):
    # one frontier point per family, each equal to an arm, keeps the test fast
    flowrl.main(["--smoke", "--out", str(tmp_path), "--seed", "5", "--betas", "0.5,2",
                 "--kl-coefs", "0.1", "--kl-weights", "0.125"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [5, 6]
    smoke = {k: results["config"][k] for k in ("steps", "group", "hidden", "eval_samples", "seeds")}
    assert smoke == {"steps": 4, "group": 4, "hidden": 16, "eval_samples": 64, "seeds": 2}
    assert list(results["arms"]) == ["flowrl", "grpo", "grpo_kl", "ppo", "kl_pg"]
    for arm in results["arms"].values():
        assert len(arm["per_seed"]) == 2
        for key in ("accuracy", "distinct_valid", "effective_answers", "kl_to_target"):
            assert math.isfinite(arm[key])
            assert arm[key] == pytest.approx(sum(r[key] for r in arm["per_seed"]) / 2)
    assert results["target"]["accuracy"] == pytest.approx(1.0)
    assert results["target"]["kl_to_target"] == pytest.approx(0.0, abs=1e-9)
    assert results["initial"]["accuracy"] < 0.2
    coefs = {family: [p["coef"] for p in points] for family, points in results["frontier"].items()}
    assert coefs == {"flowrl": [0.5, 2], "grpo": [0.1], "kl_pg": [0.125]}
    # a frontier point equal to an arm is the same run (first seed)
    first = {name: arm["per_seed"][0] for name, arm in results["arms"].items()}
    assert results["frontier"]["flowrl"][1]["accuracy"] == first["flowrl"]["accuracy"]
    assert results["frontier"]["flowrl"][0]["accuracy"] != first["flowrl"]["accuracy"]
    assert results["frontier"]["kl_pg"][0]["kl_to_target"] == first["kl_pg"]["kl_to_target"]
    assert results["frontier"]["grpo"][0]["accuracy"] == first["grpo_kl"]["accuracy"]
    # the default frontiers: FlowRL's β and the KL weights 1/(β|y|) they imply, GRPO around them
    default = flowrl.frontier_arms(flowrl.Config())
    assert [a.coef for a in default["flowrl"]] == [1, 1.25, 2, 5]
    assert [a.coef for a in default["kl_pg"]] == [0.25, 0.2, 0.125, 0.05]
    assert [a.coef for a in default["grpo"]] == [0.001, 0.1, 0.2, 0.25]
    assert {a.algo for a in default["grpo"]} == {"grpo"}
    tiered = results["tiered"]
    assert set(tiered["arms"]) == {"flowrl", "kl_pg"}
    assert all(math.isfinite(row["mass_ratio"]) for row in tiered["arms"].values())
    assert tiered["reward_proportional_ratio"] == pytest.approx(0.5 * tiered["target"]["mass_ratio"])
    assert (tmp_path / "flowrl.png").stat().st_size > 1000


def test_unknown_arm_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        flowrl.main(["--arms", "flowrl,dpo"])
    assert e.value.code == 2
    assert "dpo" in capsys.readouterr().err
