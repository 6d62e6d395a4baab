"""Tests for fope.py: hand-computed values, RoPE/FoPE invariants, ALiBi slopes, slot contributions, data."""
import json
import math
import os
import sys

import pytest
import torch
from torch.testing import assert_close

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fope  # noqa: E402


def logit(pe, q, k, m, n):
    # q at position m, k at position n (one head, one vector each), logit after the position method
    qm = pe(q.view(1, 1, 1, -1), torch.tensor([m]))
    kn = pe(k.view(1, 1, 1, -1), torch.tensor([n]))
    return (qm * kn).sum()


def test_rope_hand_value():
    # d = 4: ω = [10000^0, 10000^(−2/4)] = [1, 0.01]; slot 0 pairs dims 0 and 2.
    # x = [1, 0, 0, 0] at n = 1: x' = x·cos + rotate_half(x)·sin, rotate_half(x) = [−x2, −x3, x0, x1] = [0, 0, 1, 0]
    # → x' = [cos 1, 0, sin 1, 0] = [0.5403, 0, 0.8415, 0]
    out = fope.RoPE(4)(torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4), torch.tensor([1]))
    assert_close(out.view(4), torch.tensor([math.cos(1.0), 0.0, math.sin(1.0), 0.0]))


def test_rope_relative():
    torch.manual_seed(0)
    pe, q, k = fope.RoPE(32), torch.randn(32), torch.randn(32)
    for m, n, c in [(5, 2, 7), (40, 3, 100), (9, 9, 33)]:
        assert_close(logit(pe, q, k, m, n), logit(pe, q, k, m + c, n + c), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logit(pe, q, k, 5, 2), logit(pe, q, k, 5, 3))  # it does depend on m − n


def test_fope_without_clip_and_noise_is_rope():
    torch.manual_seed(0)
    x, pos = torch.randn(2, 4, 50, 32), torch.arange(50)
    f = fope.FoPE(32, n_heads=4, train_len=64, sigma=0.0, clip_floor=False)
    assert_close(f(x, pos), fope.RoPE(32)(x, pos), rtol=0, atol=1e-6)
    assert_close(f(x), fope.RoPE(32)(x), rtol=0, atol=1e-6)  # the cached-table path too


def test_kept_slots_hand_count():
    # ω_k = 10000^(−k/16); floor 2π/64 = 0.0982: ω_4 = 10000^(−1/4) = 0.1 ≥ 0.0982, ω_5 = 10000^(−5/16) = 0.0562 < it
    # → k = 0 … 4 kept: K = 5; d' = min(K, d/4) = min(5, 8) = 5
    f = fope.FoPE(32, n_heads=4, train_len=64)
    assert f.n_kept == 5 and f.n_out == 5
    assert len(fope.kept_frequencies(32, 64, clip_floor=False)) == 16


def test_clipped_slots_do_not_move_and_use_the_official_fill():
    torch.manual_seed(0)
    f = fope.FoPE(32, n_heads=4, train_len=64, sigma=0.3)
    x = torch.randn(1, 4, 1, 32).expand(1, 4, 6, 32)  # the same vector at 6 positions
    y = f(x, torch.tensor([0, 1, 7, 63, 200, 1000]))
    clipped = list(range(5, 16)) + list(range(21, 32))  # slots 5..15 and their partners 21..31
    assert_close(y[..., clipped], y[:, :, :1, clipped].expand_as(y[..., clipped]))
    # cos = sin = 1: slot j → (x_j − x_{j+16}, x_{j+16} + x_j)
    assert_close(y[0, :, 0, 5], x[0, :, 0, 5] - x[0, :, 0, 21])
    assert_close(y[0, :, 0, 21], x[0, :, 0, 21] + x[0, :, 0, 5])
    kept = list(range(0, 5))
    assert not torch.allclose(y[0, 0, 0, kept], y[0, 0, 1, kept])  # kept slots do rotate


def test_fourier_noise_std():
    # official xavier_normal_(gain σ) on (H, K, d') = (4, 5, 5): std = 0.3·√(2/(5·(5+4))) = 0.3·√(0.04444) = 0.063246
    assert_close(fope.FoPE(32, n_heads=4, train_len=64, sigma=0.3).noise_std, 0.3 * math.sqrt(2 / 45))
    assert abs(fope.FoPE(32, 4, 64, 0.3).noise_std - 0.063246) < 1e-5
    assert fope.FoPE(32, 4, 64, 0.3, noise="plain").noise_std == 0.3
    # empirical: H = 400 → std = 0.3·√(2/(5·405)) = 0.009428; 400·5·5 = 10 000 draws per matrix
    torch.manual_seed(0)
    f = fope.FoPE(32, n_heads=400, train_len=64, sigma=0.3)
    for coef in (f.sin_coef, f.cos_coef):
        noise = coef.detach() - torch.eye(5)
        assert abs(noise.std().item() / 0.009428 - 1) < 0.05
        assert not coef.requires_grad  # frozen by default
    assert not torch.equal(f.sin_coef, f.cos_coef)  # separate matrices


def test_alibi_slopes_and_bias():
    # 2^(−8h/H): H = 4 → 2^−2, 2^−4, 2^−6, 2^−8; H = 8 → 2^−1 … 2^−8
    assert_close(fope.alibi_slopes(4), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625]))
    assert_close(fope.alibi_slopes(8), torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125,
                                                     0.00390625]))
    b = fope.alibi_bias(4, 3)
    # head 0 (slope 0.25): row m = 2 → [−0.25·2, −0.25·1, 0] = [−0.5, −0.25, 0]; above the diagonal −inf
    assert_close(b[0, 2], torch.tensor([-0.5, -0.25, 0.0]))
    assert b[0, 0, 1] == float("-inf") and b.shape == (4, 3, 3)


def test_slot_contributions():
    # q = [1, 2, 3, 4], k = [5, 6, 7, 8]: g_0 = 1·5 + 3·7 = 26, g_1 = 2·6 + 4·8 = 44; sum 70 = q·k
    g = fope.slot_contributions(torch.tensor([1.0, 2, 3, 4]), torch.tensor([5.0, 6, 7, 8]))
    assert_close(g, torch.tensor([26.0, 44.0]))
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 1, 32), torch.randn(2, 3, 1, 7, 32)
    assert_close(fope.slot_contributions(q, k).sum(-1), (q * k).sum(-1))


def test_spearman_hand():
    # x = [1, 2, 3], y = [1, 3, 2]: d = [0, 1, 1], ρ = 1 − 6·2/(3·8) = 0.5; ties get mean ranks
    assert abs(fope.spearman(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 3, 2])) - 0.5) < 1e-9
    assert_close(fope.average_ranks(torch.tensor([5.0, 1.0, 5.0])), torch.tensor([1.5, 0.0, 1.5], dtype=torch.float64))


def test_passkey_batch():
    gen = torch.Generator().manual_seed(0)
    table = fope.markov_table(32, 4, gen)
    x, p = fope.passkey_batch(table, 50, 64, gen, 32)
    first_value, key, query, _ = fope.special_ids(32)
    assert x.shape == (50, 64)
    assert ((x == key).sum(1) == 1).all() and ((x == query).sum(1) == 1).all()
    assert (x[:, -2] == query).all()
    assert (x[torch.arange(50), p] == key).all()
    assert (x[torch.arange(50), p + 1] == x[:, -1]).all()  # the queried value is the key's value
    assert ((x[:, -1] >= first_value) & (x[:, -1] < key)).all()
    assert ((x >= first_value) & (x < key)).sum() == 100  # values appear only after KEY and QUERY
    ppl, loss = fope.target_masks(x, 32)
    assert not ppl[:, -1].any() and loss[:, -1].all()


def test_markov_filler_follows_table():
    gen = torch.Generator().manual_seed(1)
    succ, cum = fope.markov_table(8, 2, gen)
    x = fope.markov_filler((succ, cum), 20, 30, gen)
    for row in x:
        for t in range(2, 30):
            assert row[t] in succ[row[t - 2], row[t - 1]]


def test_smoke_run_and_bad_input(tmp_path, capsys):
    res = fope.main(["--smoke", "--out", str(tmp_path)])
    saved = json.load(open(tmp_path / "results.json"))
    assert set(saved["arms"]) == {"nope", "rope", "alibi", "fope"}
    for arm in saved["arms"].values():
        assert set(arm["ppl"]) == set(arm["passkey"]) == {"64", "128"} and arm["step_time_s"] > 0
    assert {"rope", "fope"} <= set(saved["heads"]) and "ratio_fope_rope" in saved["step_time"]
    assert res["arms"]["rope"]["ppl"] == saved["arms"]["rope"]["ppl"]
    for argv in (["--methods", "rope,bogus"], ["--steps", "0"], ["--fope-noise", "huge"]):
        with pytest.raises(SystemExit) as e:
            fope.main(argv + ["--out", str(tmp_path)])
        assert e.value.code == 2
    assert "bogus" in capsys.readouterr().err
