"""Tests for flowrl.py: hand-computed losses, FlowRL's exact on-policy equivalence with kl_pg (and
where log Z's trunk coupling breaks it), GAE against a plain loop, one training update checked
against the pure losses and their gradients, the exact evaluator on policies whose answers are fixed
by hand, short trainings whose direction is known, and the record rendered from hand-built numbers.
GRPO's loss and group_normalize are tested once, in test_common."""

import copy
import dataclasses
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


def test_empty_answers_give_no_nan():
    # a batch whose mask is all zero (no response tokens): every loss is finite
    logp = torch.full((2, 3), -1.0)
    empty = torch.zeros(2, 3)
    zeros = torch.zeros(2)
    losses = [flowrl.flowrl_loss(logp, logp, logp, empty, zeros, zeros + 1)[0],
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
    # the official clamp(w, max = 1.1): 2's w = min(1.2214, 1.1) = 1.1 → term 1.16875, 1's w = 1
    # (no lower clip) → L = −(−0.4 + 1.16875) / 2 = −0.384375
    loss, _ = flowrl.kl_pg_loss(logp, old, ref, mask, reward, baseline, kl_weight=0.5, w_max=1.1)
    assert_close(loss, torch.tensor(-0.384375))


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


def test_expected_gradient_is_2beta_kl_pg_only_when_log_z_leaves_the_trunk_alone():
    # The docstring's claim, exactly, on the real model: the expectation over ALL 10,000 answers of
    # one prompt under π. With the official clamp (w_max huge) and old_logp = logp − log(N π)/4 per
    # token, w_i = exp(Σ_t (logp − old)) = N π(y_i), so each loss's batch mean (1/N) Σ_i w_i ℓ_i is
    # E_π[ℓ] (w detached, as on-policy). Then, with kl_weight = 1/(β|y|):
    #   log Z's input detached: ∇_θ E[flowrl] = 2β ∇_θ E[kl_pg] for every policy parameter θ;
    #   not detached: the trunk (embedding, GRU) also gets 2 E_π[δ] ∇ log Z (its regression), the
    #   output layer does not.
    model = small_policy(0)
    with torch.no_grad():
        model.head.weight.mul_(40)  # a far-from-uniform policy
    n = 10_000
    prompts = flowrl.encode_prompts([10] * n)
    answers = flowrl.ALL_ANSWERS
    with torch.no_grad():
        ref_logp = flowrl.score(small_policy(1), prompts, answers).logp  # (N, 4)
    r_hat = flowrl.reward_fn(answers, torch.full((n,), 10), "digitsum") - 0.3  # (N,)
    beta = 1.5
    mask = torch.ones(n, 4)
    trunk = list(model.tok.parameters()) + list(model.rnn.parameters())
    policy = trunk + list(model.head.parameters())

    def expected_grad(loss_name, detach_z):
        now = flowrl.score(model, prompts, answers, detach_z=detach_z)
        n_pi = now.logp.detach().sum(1).exp() * n  # (N,): N π(y), sums to N
        old = now.logp.detach() - n_pi.log()[:, None] / 4
        if loss_name == "flowrl":
            loss, _ = flowrl.flowrl_loss(now.logp, old, ref_logp, mask, now.log_z, r_hat,
                                         beta=beta, w_max=1e9)
        else:
            loss, _ = flowrl.kl_pg_loss(now.logp, old, ref_logp, mask, r_hat, torch.full((n,), 0.2),
                                        kl_weight=1 / (beta * 4), w_max=1e9)
        return torch.autograd.grad(loss, policy), now

    flow_cut, _ = expected_grad("flowrl", True)
    flow, now = expected_grad("flowrl", False)
    twin, _ = expected_grad("kl_pg", False)
    assert now.logp.detach().sum(1).exp().sum() == pytest.approx(1, rel=1e-4)  # π sums to 1
    for a, b in zip(flow_cut, twin):
        assert_close(a, 2 * beta * b, rtol=2e-3, atol=2e-6)
    # E_π[δ] and ∇_trunk log Z (every row's log Z is the same prompt's)
    with torch.no_grad():
        avg = (now.logp.mean(1) - ref_logp.mean(1))  # (N,)
        delta = now.log_z + avg - beta * r_hat  # (N,)
        mean_delta = (now.logp.sum(1).exp() * delta).sum()
    assert abs(mean_delta) > 0.05  # log Z is far from its optimum: the coupling is visible
    log_z = flowrl.score(model, prompts[:1], answers[:1]).log_z.sum()
    dz = torch.autograd.grad(log_z, trunk)
    for a, b, g in zip(flow, flow_cut, dz):
        assert_close(a - b, 2 * mean_delta * g, rtol=2e-3, atol=2e-6)
    assert max((a - b).abs().max() for a, b in zip(flow, flow_cut)) > 1e-3
    n_trunk = len(trunk)
    for a, b in zip(flow[n_trunk:], flow_cut[n_trunk:]):
        assert_close(a, b)  # the output layer never sees log Z


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


def expected_loss(model, roll, algo, coef, official):
    """The arm's loss from the pure functions, on model's scores, with its gradient graph."""
    w_max = 10.0 if official else None  # the official clamp(w, max = 10) keeps w = 7.39
    mask = roll.mask
    now = flowrl.score(model, roll.prompts, roll.answers, detach_z=algo == "flowrl_detached")
    if algo in ("flowrl", "flowrl_detached"):
        return flowrl.flowrl_loss(now.logp, roll.old_logp, roll.ref_logp, mask, now.log_z,
                                  roll.r_hat, beta=coef, clip_eps=0.1, w_max=w_max)[0]
    if algo == "kl_pg":
        b = flowrl.kl_pg_baseline(roll.r_hat, roll.old_logp, roll.ref_logp, mask, coef, 4)
        return flowrl.kl_pg_loss(now.logp, roll.old_logp, roll.ref_logp, mask, roll.r_hat, b,
                                 kl_weight=coef, clip_eps=0.1, w_max=w_max)[0]
    if algo == "ppo":
        adv, returns = flowrl.ppo_advantages(roll.reward, roll.old_values, mask, 0.9)
        return flowrl.ppo_loss(now.logp, roll.old_logp, mask, adv, now.values, roll.old_values,
                               returns, clip_eps=0.1)[0]
    return flowrl.grpo_loss(now.logp, roll.old_logp, roll.ref_logp, mask, roll.r_hat,
                            clip_eps=0.1, kl_coef=coef)[0]


@pytest.mark.parametrize("algo,coef,official", [("flowrl", 2.0, False), ("flowrl", 2.0, True),
                                                ("flowrl_detached", 2.0, False),
                                                ("kl_pg", 0.25, False), ("kl_pg", 0.25, True),
                                                ("grpo", 0.5, False), ("grpo_kl", 0.1, False),
                                                ("ppo", 0.0, False)])
def test_update_uses_the_right_loss_inputs_and_gradient(algo, coef, official):
    # update() must take one optimizer step on exactly the pure loss's gradient, clipped to norm 1
    model = small_policy(0)  # eval mode: no dropout in the log Z head, so the loss is repeatable
    ref = small_policy(1)
    roll = hand_rollout(model, ref)
    assert not torch.equal(roll.reward, roll.r_hat)
    if algo.startswith("grpo"):
        # one token with u = ref − logp ≈ −15: k3 = e^u − u − 1 ≈ 14, so verl's clamp to 10 acts
        roll = roll._replace(ref_logp=roll.ref_logp - 15 * (torch.arange(32) == 0).view(8, 4))
    cfg = flowrl.Config(group=4, lam=0.9, clip_eps=0.1, official_clamp=official)
    twin = copy.deepcopy(model)
    expected = expected_loss(twin, roll, algo, coef, official)
    expected.backward()
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)  # the norm before clipping
    arm = flowrl.Arm(algo, algo, coef, "digitsum")
    opt = flowrl.make_optimizer(model, 0.01, 1.0)
    before = copy.deepcopy(model.state_dict())
    history = flowrl.update(model, opt, roll, arm, [torch.arange(8)], cfg, 1)
    assert len(history) == 1
    assert history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert history[0]["clipped"] == float(norm > 1.0)
    # drift = mean_i |Σ_t (logp − old_logp)| = 4 · mean |shift| = 4 · 1.07 / 8 = 0.535
    assert history[0]["drift"] == pytest.approx(0.535, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert not torch.equal(model.head.weight, before["head.weight"])  # the optimizer stepped


def test_update_flags_a_clipped_gradient():
    # the same batch, the FlowRL loss at β = 50 (|∇| ≫ 1: clipped) and kl_pg at lr-free weight 0
    # with r̂ scaled down 1000× (|∇| ≪ 1: not clipped)
    model = small_policy(0)
    roll = hand_rollout(model, small_policy(1))
    cfg = flowrl.Config(group=4)
    opt = flowrl.make_optimizer(model, 1e-6, 1.0)
    big = flowrl.update(model, opt, roll, flowrl.Arm("f", "flowrl", 50.0, "digitsum"),
                        [torch.arange(8)], cfg, 1)
    small = flowrl.update(model, opt, roll._replace(r_hat=roll.r_hat * 1e-3),
                          flowrl.Arm("k", "kl_pg", 0.0, "digitsum"), [torch.arange(8)], cfg, 1)
    assert big[0]["clipped"] == 1.0
    assert small[0]["clipped"] == 0.0


def test_update_stops_on_a_non_finite_loss():
    model = small_policy(0)
    roll = hand_rollout(model, small_policy(1))
    roll = roll._replace(r_hat=roll.r_hat * float("nan"))
    opt = flowrl.make_optimizer(model, 0.01, 1.0)
    with pytest.raises(flowrl.NonFinite, match="step 7: loss is nan; stopping"):
        flowrl.update(model, opt, roll, flowrl.Arm("f", "flowrl", 1.0, "digitsum"),
                      [torch.arange(8)], flowrl.Config(group=4), 7)


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
    # raise the exact accuracy for each arm at a high learning rate and the paper's β = 15
    cfg = flowrl.Config(steps=40, group=8, d_model=8, hidden=16, lr=0.03, eval_samples=64,
                        log_every=1000)
    targets = [12, 15]
    ref = flowrl.reference(cfg, targets, 0, torch.device("cpu"))
    initial = flowrl.evaluate(ref.logpi, ref.logpi, targets, "digitsum", 64, 0)["accuracy"]
    rows = {}
    for algo, coef in [("flowrl", 15.0), ("kl_pg", 1 / 60), ("ppo", 0.0)]:
        row = flowrl.run_job(flowrl.Job(cfg, flowrl.Arm(algo, algo, coef, "digitsum"), 0, targets))
        assert row["accuracy"] > initial + 0.3, (algo, row["accuracy"], initial)
        assert 0 < row["cpu_time_s"] < 600 and 0 < row["wall_time_s"] < 600
        rows[algo] = row
    # FlowRL's gradient carries the factor 2β = 30: clipped on most steps, kl_pg's on few
    assert rows["flowrl"]["clip_share"] > 0.5 > rows["kl_pg"]["clip_share"]
    out = capsys.readouterr().out
    assert out.count("step    40/40") == 3  # log_every 1000 > steps: only the last step logs
    assert "arm=flowrl seed=0" in out
    # a single step already moves the policy (step 1 is trained, not skipped), and π_ref stays
    one_step = flowrl.Config(**{**cfg.__dict__, "steps": 1})
    trained = flowrl.train_arm(flowrl.Arm("grpo", "grpo", 0.001, "digitsum"), one_step,
                               ref.init_state, ref.model, targets, 0, torch.device("cpu"))
    logpi = flowrl.exact_logprobs(trained.model, targets, torch.device("cpu"))
    assert not torch.equal(logpi, ref.logpi)
    assert trained.clip_share in (0.0, 0.5, 1.0)  # 1 step × 2 minibatches
    for name, tensor in ref.model.state_dict().items():
        assert torch.equal(tensor, ref.init_state[name])


def test_a_job_is_the_same_whatever_ran_before_it():
    # each job seeds itself: the same job twice, with other random draws between, gives one row
    cfg = flowrl.Config(steps=3, group=4, d_model=8, hidden=16, eval_samples=32)
    job = flowrl.Job(cfg, flowrl.Arm("flowrl", "flowrl", 1.0, "digitsum"), 4, [10, 14])
    first = flowrl.run_job(job)
    torch.rand(100)
    again = flowrl.run_job(job)
    assert {k: v for k, v in first.items() if "time" not in k} == {
        k: v for k, v in again.items() if "time" not in k}
    other_seed = flowrl.run_job(job._replace(seed=5))
    assert other_seed["kl_to_target"] != first["kl_to_target"]


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
    # two prompts (s = 1 twice, the same π): every metric is the mean over prompts, not the sum
    two = flowrl.evaluate(logpi.repeat(2, 1), uniform.repeat(2, 1), [1, 1], "digitsum", 512, 0)
    one = flowrl.evaluate(logpi, uniform, [1], "digitsum", 512, 0)
    assert two["distinct_valid"] == 2 and two["accuracy"] == pytest.approx(0.5)
    for key in ("effective_answers", "kl_to_target", "kl_from_target"):
        assert two[key] == pytest.approx(one[key])


# --- seeds, jobs and the record ---


def test_summarise_mean_std_worst():
    rows = [{"accuracy": 0.9, "kl_to_target": 1.0, "clip_share": 0.2, "cpu_time_s": 5.0},
            {"accuracy": 0.5, "kl_to_target": 3.0, "clip_share": 0.6, "cpu_time_s": 9.0},
            {"accuracy": 0.7, "kl_to_target": 2.0, "clip_share": 0.4, "cpu_time_s": 7.0}]
    out = flowrl.summarise(rows)
    assert out["accuracy"] == pytest.approx(0.7)
    assert out["std"]["accuracy"] == pytest.approx(0.2)  # unbiased: sqrt((0.04 + 0.04) / 2)
    # the worst seed: lowest accuracy; highest KL, clip share and time (the slowest seed)
    assert out["worst"] == {"accuracy": 0.5, "kl_to_target": 3.0, "clip_share": 0.6,
                            "cpu_time_s": 9.0}
    assert out["per_seed"] == rows
    # two seeds: unbiased std |a − b| / √2 = 0.4 / 1.41421; one seed: std 0
    two = flowrl.summarise(rows[:2])
    assert two["std"]["accuracy"] == pytest.approx(0.4 / math.sqrt(2))
    assert set(flowrl.summarise(rows[:1])["std"].values()) == {0.0}


def test_main_arms_tie_kl_pg_to_beta():
    cfg = flowrl.Config(beta=4.0, kl_coef=0.01, kl_coef_strong=0.3)
    arms = {a.algo: a for a in flowrl.main_arms(cfg)}
    assert arms["kl_pg"].coef == pytest.approx(1 / 16)  # 1/(β |y|) with |y| = 4
    assert arms["flowrl"].coef == arms["flowrl_detached"].coef == 4.0
    assert (arms["grpo"].coef, arms["grpo_kl"].coef, arms["ppo"].coef) == (0.01, 0.3, 0.0)
    tiered = flowrl.tiered_arms(flowrl.Config(beta=2.0, tiered_arms="kl_pg,ppo"))
    assert [(a.algo, a.coef, a.task) for a in tiered] == [("kl_pg", 0.125, "tiered"),
                                                        ("ppo", 0.0, "tiered")]


def test_frontier_weights_follow_the_betas():
    # kl_pg's and GRPO's frontier weights are 1/(β|y|) of the FlowRL frontier's β unless given
    front = flowrl.frontier_arms(flowrl.Config(betas="2,4,0.5"))
    assert [a.coef for a in front["flowrl"]] == [2.0, 4.0, 0.5]
    assert [a.coef for a in front["kl_pg"]] == [0.125, 0.0625, 0.5]
    assert [a.coef for a in front["grpo"]] == [0.125, 0.0625, 0.5]
    assert [a.algo for a in front["grpo"]] == ["grpo"] * 3
    front = flowrl.frontier_arms(flowrl.Config(betas="2", kl_weights="0.3,0.1", kl_coefs="0.2"))
    assert [a.coef for a in front["kl_pg"]] == [0.3, 0.1]
    assert [a.coef for a in front["grpo"]] == [0.2]
    assert flowrl.frontier_arms(flowrl.Config(betas=""))["grpo"] == []


def test_plan_trains_every_run_once():
    # 6 arms × 2 seeds = 12; frontier (β 1, 2 on 2 seeds): β = 1, kl_pg 0.25 and grpo 0.25 are
    # main-table runs (grpo_kl is grpo at 0.25), β = 2, 0.125, 0.125 are new: 3 × 2 = 6; the
    # tiered flowrl run on the first seed: 1 → 19 jobs
    cfg = flowrl.Config(seeds=2, frontier_seeds=2, betas="1,2", kl_coef_strong=0.25, seed=7,
                        tiered_arms="flowrl")
    jobs = flowrl.plan(cfg, [10])
    assert len(jobs) == 19
    assert sorted({job.seed for job in jobs.values()}) == [7, 8]
    assert all(key == flowrl.run_key(job.arm, job.seed) for key, job in jobs.items())
    tiered = [job for job in jobs.values() if job.arm.task == "tiered"]
    assert [(job.arm.algo, job.seed) for job in tiered] == [("flowrl", 7)]
    assert flowrl.RunKey("grpo", 0.125, "digitsum", 8) in jobs


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
    assert key(flowrl.Arm("flowrl", "flowrl", 1.0, "digitsum"), 0) != key(
        flowrl.Arm("flowrl_detached", "flowrl_detached", 1.0, "digitsum"), 0)


def test_unknown_arm_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        flowrl.main(["--arms", "flowrl,dpo"])
    assert e.value.code == 2
    assert "dpo" in capsys.readouterr().err


def seed_row(accuracy, distinct, clip_share=0.1):
    return {"accuracy": accuracy, "pass_at_1": accuracy, "distinct_valid": distinct,
            "effective_answers": distinct / 2, "kl_to_target": 1.0, "kl_from_target": 0.5,
            "clip_share": clip_share, "wall_time_s": 10.0, "cpu_time_s": 9.0}


def hand_results(flow_accuracy, detached_distinct):
    """A record built by hand: 3 seeds per arm, a 2-seed frontier at β = 1, 2, a tiered arm."""
    summarise = flowrl.summarise
    arms = {"flowrl": {"coef": 1.0, **summarise([seed_row(a, d, 0.6) for a, d in
                                                  zip(flow_accuracy, [100, 140, 120])])},
            "flowrl_detached": {"coef": 1.0, **summarise([seed_row(a, d, 0.5) for a, d in
                                                           zip(flow_accuracy, detached_distinct)])},
            "kl_pg": {"coef": 0.25, **summarise([seed_row(0.96, 130, 0.01),
                                                 seed_row(0.97, 110, 0.01),
                                                 seed_row(0.98, 150, 0.01)])},
            "grpo": {"coef": 0.001, **summarise([seed_row(0.99, d) for d in (1, 2, 3)])},
            "grpo_kl": {"coef": 0.25, **summarise([seed_row(0.9, d) for d in (90, 100, 110)])}}
    cfg = flowrl.Config(betas="1,2", frontier_seeds=2)
    runs = {}
    for family, points in flowrl.frontier_arms(cfg).items():
        for arm in points:
            # flowrl keeps 50 more distinct answers than kl_pg at β = 2 (seeds 60 ± 10 vs 10 ± 10)
            more = 50 if (family, arm.coef) == ("flowrl", 2.0) else 0
            runs[flowrl.run_key(arm, 0)] = seed_row(0.9, 10 + more)
            runs[flowrl.run_key(arm, 1)] = seed_row(0.9, 20 + more)
    ref_row = {"accuracy": 1.0, "pass_at_1": 1.0, "distinct_valid": 300.0,
               "effective_answers": 500.0, "kl_to_target": 0.0, "kl_from_target": 0.0}
    return {"config": dataclasses.asdict(cfg), "seeds": [0, 1, 2], "arms": arms,
            "target": summarise([ref_row]), "initial": summarise([ref_row]),
            "frontier": flowrl.frontier_rows(cfg, runs),
            "tiered": {"arms": {"flowrl": {"mass_ratio": 0.001}}, "target": {"mass_ratio": 0.96},
                       "reward_proportional_ratio": 0.48},
            "n_valid": {"10": 282, "12": 415}, "wall_s": 42.0}


def test_frontier_rows_keep_the_mean_and_every_seed():
    point = hand_results([0.9, 0.92, 0.94], [100, 140, 120])["frontier"]["flowrl"][1]
    assert point["coef"] == 2.0
    assert point["distinct_valid"] == pytest.approx(65.0)  # (60 + 70) / 2
    assert point["std"]["distinct_valid"] == pytest.approx(50 ** 0.5)  # |60 − 70| / √2
    assert [p["distinct_valid"] for p in point["per_seed"]] == [60, 70]
    assert set(point["per_seed"][0]) == {"accuracy", "distinct_valid", "kl_to_target"}


def test_render_report_verdict_follows_the_numbers():
    # flowrl accuracy 0.92 ± 0.02 vs kl_pg 0.97 ± 0.01: −0.05, beyond the spread 0.02;
    # distinct 120 ± 20 vs 130 ± 20: −10, inside; detached distinct 180 ± 10 vs 120: +60, beyond
    results = hand_results([0.90, 0.92, 0.94], [170, 180, 190])
    report = flowrl.render_report(results)
    assert report == flowrl.render_report(json.loads(json.dumps(results)))
    assert "| flowrl | 1 | 0.920 ± 0.020 [0.900] |" in report
    assert "120.0 ± 20.0 [100.0]" in report and "0.60 ± 0.00 [0.60]" in report
    assert "| target p* (ceiling) | | 1.000 ± 0.000 [1.000] |" in report
    assert "| flowrl | 2 | 0.900 | 65.0 | 1.00 | 0.900 / 60.0, 0.900 / 70.0 |" in report
    verdict = flowrl.verdict_lines(results)
    assert "- " + verdict[0] + "\n" in report
    assert "FlowRL − kl_pg -0.050, beyond the seed spread (std 0.020)" in verdict[0]
    assert "-10.0, inside the seed spread (std 20.0)" in verdict[0]
    assert verdict[1] == ("Beyond the seed spread: kl_pg is ahead on accuracy by 0.05; on distinct "
                          "valid answers neither is ahead.")
    # grpo_kl at kl_pg's weight 0.25: distinct 100 ± 10 vs 130 ± 20 → −30, beyond the spread 20
    assert verdict[2].endswith("distinct valid 100.0, grpo_kl − kl_pg -30.0, beyond the seed "
                               "spread (std 20.0).")
    assert verdict[5] == ("FlowRL keeps more distinct valid answers than kl_pg at 1 of 2 matched "
                          "weights, beyond the seed spread at 1.")
    assert "+60.0, beyond the seed spread (std 20.0)" in verdict[6]
    assert "cutting that path helps beyond the seed spread" in verdict[7]
    assert "flowrl 60%, flowrl_detached 50%, kl_pg 1%, grpo 10%, grpo_kl 10%." in verdict[8]
    assert "the most diverse arm, flowrl_detached, keeps 180.0" in verdict[9]
    assert "keeps 2.0 distinct valid answers: without a KL the toy collapses" in verdict[10]
    assert "flowrl 0.001 against 0.960 for p* and 0.480" in verdict[11]
    # equal accuracy, detached no different: neither is ahead, cutting log Z changes nothing
    verdict = flowrl.verdict_lines(hand_results([0.96, 0.97, 0.98], [100, 140, 120]))
    assert verdict[1].startswith("Neither is ahead beyond the seed spread")
    assert "changes nothing beyond the seed spread" in verdict[7]


def test_smoke_writes_the_record(tmp_path):
    # three arms, a 2-point frontier, one tiered arm: 3 × 2 + 3 + 1 = 10 trainings
    flowrl.main(["--smoke", "--out", str(tmp_path), "--seed", "5", "--betas", "1,2",
                 "--arms", "flowrl,kl_pg,grpo_kl", "--tiered-arms", "kl_pg", "--workers", "1"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text() == flowrl.render_report(results)
    assert results["verdict"] == "\n".join(flowrl.verdict_lines(results))
    assert (tmp_path / "flowrl.png").stat().st_size > 1000
    assert results["seeds"] == [5, 6] and results["wall_s"] > 0
    assert list(results["arms"]) == ["flowrl", "kl_pg", "grpo_kl"]
    for arm in results["arms"].values():
        assert len(arm["per_seed"]) == 2
        assert 0 <= arm["clip_share"] <= 1
        for key in ("accuracy", "distinct_valid", "effective_answers", "kl_to_target"):
            assert arm[key] == pytest.approx(sum(r[key] for r in arm["per_seed"]) / 2)
    assert results["target"]["accuracy"] == pytest.approx(1.0)
    assert results["target"]["kl_to_target"] == pytest.approx(0.0, abs=1e-9)
    assert results["initial"]["accuracy"] < 0.2
    # a frontier point equal to an arm is the same run (first seed)
    first = {name: arm["per_seed"][0] for name, arm in results["arms"].items()}
    front = results["frontier"]
    assert [len(p["per_seed"]) for p in front["flowrl"]] == [1, 1]
    assert front["flowrl"][0]["accuracy"] == first["flowrl"]["accuracy"]
    assert front["kl_pg"][0]["kl_to_target"] == first["kl_pg"]["kl_to_target"]
    assert front["grpo"][0]["accuracy"] == first["grpo_kl"]["accuracy"]
    assert front["flowrl"][1]["accuracy"] != first["flowrl"]["accuracy"]
    tiered = results["tiered"]
    assert set(tiered["arms"]) == {"kl_pg"}
    assert all(math.isfinite(row["mass_ratio"]) for row in tiered["arms"].values())
    assert tiered["reward_proportional_ratio"] == pytest.approx(0.5 * tiered["target"]["mass_ratio"])
