"""Tests for fope.py: hand-computed RoPE / FoPE / ALiBi values, the floor comparison, the corpus, the
loss, the positional-head score and ablation, evaluation of models whose answers are fixed, a run."""
import dataclasses
import json
import math
import os
import sys
import time

import pytest
import torch
from torch.testing import assert_close

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fope  # noqa: E402


def logit(pe, q, k, m, n):
    # q at position m, k at position n (one head, one vector each): the logit after the method
    qm = pe(q.view(1, 1, 1, -1), torch.tensor([m]))
    kn = pe(k.view(1, 1, 1, -1), torch.tensor([n]))
    return (qm * kn).sum()


def tiny_cfg(**kw):
    base = dict(n_embd=16, n_layer=2, n_head=2, train_len=32, n_keys=2, values_per_key=4,
                vocab_filler=8, successors=2, steps=40, batch=8, lr=1e-2, log_every=1000,
                head_len=64, eval_lens="32")
    base.update(kw)
    return fope.Config(**base)


# --- RoPE ---

def test_rope_hand_value():
    # d = 4: ω = [1, 10000^(−1/2)] = [1, 0.01]; slot 0 pairs dims 0 and 2.
    # x = [1, 0, 0, 0] at n = 1: x' = [x0 cos1 − x2 sin1, ., x2 cos1 + x0 sin1, .] = [cos1, 0, sin1, 0]
    out = fope.RoPE(4)(torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4), torch.tensor([1]))
    assert_close(out.view(4), torch.tensor([math.cos(1.0), 0.0, math.sin(1.0), 0.0]))
    # x = [0, 1, 0, 1] at n = 100: slot 1 turns by 100·0.01 = 1 rad: [0, cos1 − sin1, 0, cos1 + sin1]
    out = fope.RoPE(4)(torch.tensor([0.0, 1, 0, 1]).view(1, 1, 1, 4), torch.tensor([100]))
    c = math.cos(1.0)
    s = math.sin(1.0)
    assert_close(out.view(4), torch.tensor([0.0, c - s, 0.0, c + s]))


def test_rope_relative_and_shape_check():
    torch.manual_seed(0)
    pe = fope.RoPE(32)
    q = torch.randn(32)
    k = torch.randn(32)
    for m, n, c in [(5, 2, 7), (40, 3, 100), (9, 9, 33)]:
        assert_close(logit(pe, q, k, m, n), logit(pe, q, k, m + c, n + c), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logit(pe, q, k, 5, 2), logit(pe, q, k, 5, 3))
    with pytest.raises(ValueError):
        pe(torch.randn(1, 1, 3, 32), torch.arange(3)[:, None])  # (T, 1) where (T,) is meant


# --- FoPE ---

def test_fope_rotate_hand_value_with_non_identity_coefficients():
    # d = 8 (slots 0..3), K = 2 frequencies ω = [1, 0.5], d' = 2 rotating slots, one head, n = 1.
    # A_sin = [[1, 0.5], [0.25, 1]], A_cos = [[1, 0], [0.5, 2]] (rows k, columns j):
    # S_0 = sin1·1 + sin0.5·0.25 = 0.961327,  S_1 = sin1·0.5 + sin0.5·1 = 0.900161
    # C_0 = cos1·1 + cos0.5·0.5 = 0.979094,   C_1 = cos1·0 + cos0.5·2 = 1.755165
    # slots 2, 3: S = C = 1.  x = [1..8]: x1 = [1, 2, 3, 4], x2 = [5, 6, 7, 8]
    # x'[:4] = x1·C − x2·S = [0.979094 − 5·0.961327, 2·1.755165 − 6·0.900161, 3 − 7, 4 − 8]
    # x'[4:] = x2·C + x1·S = [5·0.979094 + 0.961327, 6·1.755165 + 2·0.900161, 7 + 3, 8 + 4]
    freqs = torch.tensor([1.0, 0.5])
    sin_coef = torch.tensor([[[1.0, 0.5], [0.25, 1.0]]])
    cos_coef = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    x = torch.arange(1.0, 9.0).view(1, 1, 1, 8)
    out = fope.fope_rotate(x, torch.tensor([1]), freqs, sin_coef, cos_coef)
    expected = torch.tensor([-3.827543, -1.890636, -4.0, -4.0, 5.856795, 12.331313, 10.0, 12.0])
    assert_close(out.view(8), expected, rtol=0, atol=1e-5)
    # the same through the module, with its buffers replaced by these coefficients
    module = fope.FoPE(8, 1, 1000, sigma=0.0)
    module.freqs = freqs
    module.sin_coef = sin_coef
    module.cos_coef = cos_coef
    assert_close(module(x, torch.tensor([1])).view(8), expected, rtol=0, atol=1e-5)


def test_fope_rotate_checks_shapes():
    freqs, sin_coef, cos_coef = fope.fope_tables(32, 2, 64)
    x = torch.randn(1, 2, 5, 32)
    with pytest.raises(ValueError):
        fope.fope_rotate(x, torch.arange(5)[:, None], freqs, sin_coef, cos_coef)
    with pytest.raises(ValueError):
        fope.fope_rotate(torch.randn(1, 3, 5, 32), torch.arange(5), freqs, sin_coef, cos_coef)
    with pytest.raises(ValueError):
        fope.fope_rotate(x, torch.arange(5), freqs, sin_coef, cos_coef[:, :, :2])


def test_fope_without_clip_and_noise_is_rope():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 50, 32)
    pos = torch.arange(50) * 3
    f = fope.FoPE(32, n_head=4, train_len=64, sigma=0.0, clip_floor=False)
    assert_close(f(x, pos), fope.RoPE(32)(x, pos), rtol=0, atol=1e-5)
    assert list(f.parameters()) == []  # coefficients are frozen buffers


def test_floor_comparison_kept_slots():
    # ω_k = 10000^(−k/16), floor 2π/L.  L = 64: 0.0982; ω_4 = 0.1 ≥ it, ω_5 = 0.0562 < it → K = 5
    # L = 63: floor 0.0997, ω_4 = 0.1 still kept → K = 5;  L = 62: floor 0.1013 > 0.1 → K = 4
    # L = 1000: floor 0.00628; ω_8 = 0.01 kept, ω_9 = 0.0056 not → K = 9
    for train_len, k in [(64, 5), (63, 5), (62, 4), (1000, 9)]:
        freqs, sin_coef, _ = fope.fope_tables(32, 2, train_len)
        assert len(freqs) == k and sin_coef.shape == (2, k, min(k, 8))
    # the floor is inclusive: at L = 2π the floor is 2π/2π = 1 = ω_0 exactly, which is kept
    freqs, _, _ = fope.fope_tables(4, 1, 2 * math.pi, sigma=0.0)
    assert_close(freqs, torch.tensor([1.0]))
    freqs, sin_coef, _ = fope.fope_tables(32, 2, 64, clip_floor=False)
    assert len(freqs) == 16 and sin_coef.shape == (2, 16, 16)


def test_fope_identity_layout_and_noise_std():
    # d = 16, L = 10000: ω_7 = 10000^(−7/8) = 3.2e-4 < 2π/10000 = 6.3e-4 → K = 7; d' = min(7, 4) = 4;
    # the official identity: output j reads input j·⌈7/4⌉ = 2j → ones at (0,0), (2,1), (4,2), (6,3)
    _, sin_coef, cos_coef = fope.fope_tables(16, 1, 10000, sigma=0.0)
    eye = torch.zeros(7, 4)
    eye[[0, 2, 4, 6], [0, 1, 2, 3]] = 1.0
    assert_close(sin_coef[0], eye)
    assert_close(cos_coef[0], eye)
    # L = 3000: floor 2π/3000 = 0.0021 keeps ω_5 = 10000^(−5/8) = 0.0032, not ω_6 = 0.001 → K = 6;
    # d' = 4, stride ⌈6/4⌉ = 2 → rows 0, 2, 4 and 6; row 6 is past K, so output 3 reads no input
    _, sin_coef, _ = fope.fope_tables(16, 1, 3000, sigma=0.0)
    eye = torch.zeros(6, 4)
    eye[[0, 2, 4], [0, 1, 2]] = 1.0
    assert_close(sin_coef[0], eye)
    # official xavier_normal_(gain σ) on (H, K, d') = (400, 5, 5): std = 0.3·√(2/(5·405)) = 0.009428
    torch.manual_seed(0)
    _, sin_coef, cos_coef = fope.fope_tables(32, 400, 64, sigma=0.3)
    for coef in (sin_coef, cos_coef):
        assert abs((coef - torch.eye(5)).std().item() / 0.009428 - 1) < 0.05
    assert not torch.equal(sin_coef, cos_coef)  # separate matrices
    _, sin_coef, _ = fope.fope_tables(32, 400, 64, sigma=0.3, noise_std=0.05)
    assert abs((sin_coef - torch.eye(5)).std().item() / 0.05 - 1) < 0.05


def test_clipped_slots_do_not_move_and_use_the_official_fill():
    torch.manual_seed(0)
    f = fope.FoPE(32, n_head=4, train_len=64, sigma=0.3)
    x = torch.randn(1, 4, 1, 32).expand(1, 4, 6, 32)  # the same vector at 6 positions
    y = f(x, torch.tensor([0, 1, 7, 63, 200, 1000]))
    clipped = list(range(5, 16)) + list(range(21, 32))
    assert_close(y[..., clipped], y[:, :, :1, clipped].expand_as(y[..., clipped]))
    # cos = sin = 1: slot j → (x_j − x_{j+16}, x_{j+16} + x_j)
    assert_close(y[0, :, 0, 5], x[0, :, 0, 5] - x[0, :, 0, 21])
    assert_close(y[0, :, 0, 21], x[0, :, 0, 21] + x[0, :, 0, 5])
    assert not torch.allclose(y[0, 0, 0, :5], y[0, 0, 1, :5])  # kept slots rotate


def test_make_pe_arms():
    torch.manual_seed(0)
    cf = fope.make_pe("cf_only", 32, 2, 64, 1e4, 0.3, 0.02)
    assert_close(cf.sin_coef, torch.eye(5).expand(2, 5, 5))  # clipping alone: A = I
    fs = fope.make_pe("fs_only", 32, 2, 64, 1e4, 0.3, 0.02)
    assert len(fs.freqs) == 16 and not torch.allclose(fs.sin_coef, torch.eye(16).expand(2, 16, 16))
    small = fope.make_pe("fope_small", 32, 300, 64, 1e4, 0.3, 0.02)
    assert abs((small.sin_coef - torch.eye(5)).std().item() / 0.02 - 1) < 0.05
    official = fope.make_pe("fope", 32, 300, 64, 1e4, 0.3, 0.02)
    std = 0.3 * math.sqrt(2 / (5 * 305))
    assert abs((official.cos_coef - torch.eye(5)).std().item() / std - 1) < 0.05
    assert isinstance(fope.make_pe("rope", 32, 2, 64, 1e4, 0.3, 0.02), fope.RoPE)
    assert fope.make_pe("nope", 32, 2, 64, 1e4, 0.3, 0.02) is None
    assert fope.make_pe("alibi", 32, 2, 64, 1e4, 0.3, 0.02) is None


# --- ALiBi and masks ---

def test_alibi_slopes_and_bias():
    # 2^(−8h/H): H = 4 → 2^−2, 2^−4, 2^−6, 2^−8; H = 8 → 2^−1 … 2^−8
    assert_close(fope.alibi_slopes(4), torch.tensor([0.25, 0.0625, 0.015625, 0.00390625]))
    assert_close(fope.alibi_slopes(8), 2.0 ** -torch.arange(1.0, 9.0))
    # H = 6: closest power 4 → 2^−2, 2^−4, 2^−6, 2^−8, then from 8: 2^−1, 2^−3
    assert_close(fope.alibi_slopes(6), torch.tensor([2.0 ** -e for e in (2, 4, 6, 8, 1, 3)]))
    b = fope.alibi_bias(4, 3)
    # head 0 (slope 0.25), row m = 2 → [−0.5, −0.25, 0]; above the diagonal −inf
    assert_close(b[0, 2], torch.tensor([-0.5, -0.25, 0.0]))
    assert b[0, 0, 1] == float("-inf") and b.shape == (4, 3, 3)


def test_attention_bias_window():
    # T = 4, window 2: key n visible from m iff 0 ≤ m − n < 2
    b = fope.attention_bias(2, 4, window=2)
    visible = torch.isfinite(b[0])
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]).bool()
    assert torch.equal(visible, expected) and b.shape == (1, 4, 4)
    assert torch.equal(torch.isfinite(fope.attention_bias(2, 4)[0]), torch.ones(4, 4).tril().bool())
    alibi = fope.attention_bias(2, 4, window=3, alibi=True)
    assert alibi.shape == (2, 4, 4) and alibi[0, 3, 0] == float("-inf")
    assert_close(alibi[0, 3, 1], torch.tensor(-2 * 2.0 ** -4))


# --- positional heads ---

def test_slot_contributions():
    # q = [1, 2, 3, 4], k = [5, 6, 7, 8]: g_0 = 1·5 + 3·7 = 26, g_1 = 2·6 + 4·8 = 44; sum 70 = q·k
    g = fope.slot_contributions(torch.tensor([1.0, 2, 3, 4]), torch.tensor([5.0, 6, 7, 8]))
    assert_close(g, torch.tensor([26.0, 44.0]))
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 1, 32)
    k = torch.randn(2, 3, 1, 7, 32)
    assert_close(fope.slot_contributions(q, k).sum(-1), (q * k).sum(-1))


def test_positional_head_score_hand_value():
    # d = 4: high slots i ≥ 1 → slot 1 (dims 1, 3); g_high(m, n) = (q1 k1 + q3 k3) / √4
    # q[1] = [0, 1, 0, 2], q[2] = [0, 3, 0, −1]; k[0] = [5, 1, 5, 1], k[1] = [5, 2, 5, 0]
    # (1,0): (1 + 2)/2 = 1.5;  (2,0): (3 − 1)/2 = 1.0;  (2,1): (6 + 0)/2 = 3.0
    # attention a(1,0) = 0.5, a(2,0) = 0.2, a(2,1) = 0.3
    # min_dist 1: (0.5·1.5 + 0.2·1 + 0.3·3) / (0.5 + 0.2 + 0.3) = 1.85;  min_dist 2: only (2,0) → 1.0
    q = torch.tensor([[0.0, 0, 0, 0], [0, 1, 0, 2], [0, 3, 0, -1]]).view(1, 1, 3, 4)
    k = torch.tensor([[5.0, 1, 5, 1], [5, 2, 5, 0], [9, 9, 9, 9]]).view(1, 1, 3, 4)
    attn = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]).view(1, 1, 3, 3)
    assert_close(fope.positional_head_scores(q, k, attn, 1), torch.tensor([1.85]))
    assert_close(fope.positional_head_scores(q, k, attn, 2), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        fope.positional_head_scores(q, k, attn[0], 1)
    with pytest.raises(ValueError):
        fope.positional_head_scores(q, k, attn, 3)  # no pair that far


def test_positional_head_score_equals_plain_loop():
    torch.manual_seed(0)
    B, H, T, d = 2, 3, 9, 8
    q = torch.randn(B, H, T, d)
    k = torch.randn(B, H, T, d)
    attn = torch.rand(B, H, T, T).tril()
    for h in range(H):
        num = 0.0
        den = 0.0
        for b in range(B):
            for m in range(T):
                for n in range(m - 3 + 1):
                    g = fope.slot_contributions(q[b, h, m], k[b, h, n])  # (d/2,)
                    num += attn[b, h, m, n] * g[d // 4:].sum() / math.sqrt(d)
                    den += attn[b, h, m, n]
        assert_close(fope.positional_head_scores(q, k, attn, 3)[h], num / den)


def test_ablating_a_head_equals_zeroing_its_output_projection():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = fope.Decoder("rope", 20, cfg)
    corpus = fope.recall_corpus(fope.markov_chain(8, 2, torch.Generator().manual_seed(0)), 6, 64,
                                2, 4, 16, torch.Generator().manual_seed(1))
    assert corpus.far.any()
    ablated = fope.far_recall_nll(model, corpus, [(1, 1)])
    assert torch.equal(model.head_mask, torch.ones(2, 2))  # restored afterwards
    full = fope.far_recall_nll(model, corpus, [])
    with torch.no_grad():
        model.blocks[1].c_proj.weight[:, 8:] = 0.0  # head 1 of layer 1 reads dims 8..15
    assert_close(fope.far_recall_nll(model, corpus, []), ablated)
    assert abs(full - ablated) > 1e-6
    assert "head_mask" not in model.state_dict()  # checkpoints hold weights, not ablations


def test_positional_heads_picks_the_top_scores_and_random_others():
    torch.manual_seed(0)
    cfg = tiny_cfg(n_layer=3)
    model = fope.Decoder("rope", 20, cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.c_attn.weight.mul_(30.0)  # sharp attention: scores far from 0
    corpus = fope.recall_corpus(fope.markov_chain(8, 2, torch.Generator().manual_seed(0)), 6, 64,
                                2, 4, 16, torch.Generator().manual_seed(1))
    out = fope.positional_heads(model, corpus, 17, 2, 3, seed=0)
    scores = torch.tensor(out["score"])  # (layers, H)
    assert scores.shape == (3, 2)
    best = sorted(((s, (i // 2, i % 2)) for i, s in enumerate(scores.flatten().tolist())),
                  reverse=True)
    assert [tuple(t) for t in out["top"]] == [lh for _, lh in best[:2]]
    assert len(out["random_sets"]) == 3
    for heads in out["random_sets"]:
        assert len(heads) == 2 and not set(map(tuple, heads)) & set(map(tuple, out["top"]))
    full = fope.far_recall_nll(model, corpus, [])
    assert_close(out["far_recall_nll"], full)
    assert_close(out["top_drop"], fope.far_recall_nll(model, corpus, out["top"]) - full)
    rand = [fope.far_recall_nll(model, corpus, s) - full for s in out["random_sets"]]
    assert_close(out["random_drop"], sum(rand) / 3)
    # the score is computed on attention at distance ≥ min_dist: compare with a direct call
    model(corpus.x[:, :-1], keep=True)
    direct = fope.positional_head_scores(*model.blocks[2].probe, 17)
    assert not any(t.requires_grad for t in model.blocks[2].probe)  # kept without the graph
    assert_close(scores[2], direct)
    assert direct.abs().min() > 1e-2


# --- data ---

def test_recall_corpus_structure():
    gen = torch.Generator().manual_seed(0)
    chain = fope.markov_chain(8, 2, gen)
    n_keys = 3
    c = fope.recall_corpus(chain, 40, 48, n_keys, 5, 10, gen)
    assert c.x.shape == (40, 48) and c.filler.shape == c.recall.shape == c.far.shape == (40, 47)
    for row in range(40):
        x = c.x[row].tolist()
        for key in range(n_keys):
            at = [t for t, tok in enumerate(x) if tok == 8 + key]
            assert len(at) == 2  # each key written twice
            v = [x[t + 1] for t in at]
            assert v[0] == v[1] and 8 + n_keys + 5 * key <= v[0] < 8 + n_keys + 5 * (key + 1)
            assert c.recall[row, at[1]]  # target at position at[1] + 1 ↔ index at[1]
            assert not c.recall[row, at[0]]
            assert bool(c.far[row, at[1]]) == (at[1] - at[0] > 10)
        assert c.recall[row].sum() == n_keys
        for t in range(1, 48):
            want = t >= 2 and all(tok < 8 for tok in x[t - 2:t + 1])
            assert bool(c.filler[row, t - 1]) == want
    assert c.far.any() and (c.far <= c.recall).all()
    # pairs land anywhere, the first and the last two positions included
    keys = (c.x >= 8) & (c.x < 8 + n_keys)  # (n, L)
    assert keys[:, 0].any() and keys[:, -2].any()
    # filler targets follow the chain: positive probability under it
    assert torch.isfinite(fope.chain_nll(chain, c.x)[c.filler]).all()
    assert (fope.chain_nll(chain, c.x)[c.filler] < 20).all()


def test_markov_filler_and_chain_nll():
    gen = torch.Generator().manual_seed(1)
    chain = fope.markov_chain(6, 2, gen)
    assert_close(chain.prob.sum(-1), torch.ones(6, 6))
    x = fope.markov_filler(chain, 20, 30, gen)
    for row in x:
        for t in range(2, 30):
            assert row[t] in chain.succ[row[t - 2], row[t - 1]]
    # chain_nll by hand at one target: −log prob of the successor that occurred
    nll = fope.chain_nll(chain, x)
    a = x[3, 4]
    b = x[3, 5]
    j = (chain.succ[a, b] == x[3, 6]).nonzero()[0, 0]
    assert_close(nll[3, 5], -chain.prob[a, b, j].log())
    assert (nll[:, 0] == 0).all()


# --- loss and evaluation ---

def test_lm_loss_composition():
    # vocab 2. t0: logits [0, 0], target 0 → ln 2;  t1: [ln 3, 0], target 1 → −ln(1/4) = ln 4;
    # t2: [0, 0], target 0 → ln 2.  filler = t0, t2 → ln 2; recall = t1 → ln 4; loss = ln 8
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    targets = torch.tensor([[0, 1, 0]])
    filler = torch.tensor([[True, False, True]])
    recall = torch.tensor([[False, True, False]])
    terms = fope.lm_loss(logits, targets, filler, recall)
    assert_close(terms.filler, torch.tensor(math.log(2.0)))
    assert_close(terms.recall, torch.tensor(math.log(4.0)))
    assert_close(terms.loss, torch.tensor(math.log(8.0)))
    none = fope.lm_loss(logits, targets, filler, torch.zeros_like(recall))
    assert none.recall == 0 and none.loss == none.filler
    with pytest.raises(ValueError):
        fope.masked_mean(torch.ones(3), torch.ones(3, 1))


def test_value_accuracy_takes_argmax_within_the_key():
    # first value 2, 2 values per key: key 0 → ids 2, 3; key 1 → ids 4, 5
    # t0 target 3: logits over {2, 3} = (1, 5) → 3 ✓ (the global argmax, id 0, is not a value)
    # t1 target 4: logits over {4, 5} = (8, 9) → 5 ✗
    logits = torch.tensor([[[9.0, 9, 1, 5, 8, 8], [0, 0, 0, 0, 8, 9]]])
    out = fope.value_accuracy(logits, torch.tensor([[3, 4]]), 2, 2)
    assert out.tolist() == [[True, False]]


class FixedModel(torch.nn.Module):
    """A model whose answers are fixed: uniform logits, or near-certain on the true next token."""

    def __init__(self, x, vocab, oracle):
        super().__init__()
        self.x = x
        self.vocab = vocab
        self.oracle = oracle
        self.windows = []

    def forward(self, idx, window=0, keep=False):
        self.windows.append(window)
        logits = torch.zeros(*idx.shape, self.vocab)
        if self.oracle:
            logits.scatter_(-1, self.x[:, 1:, None], 30.0)
        return logits


def test_evaluate_on_models_with_fixed_answers():
    gen = torch.Generator().manual_seed(0)
    chain = fope.markov_chain(8, 2, gen)
    c = fope.recall_corpus(chain, 8, 64, 2, 4, 16, gen)
    vocab = 8 + 2 * 5
    uniform = FixedModel(c.x, vocab, oracle=False)
    out = fope.evaluate(uniform, c, 10, 4, window=7)
    assert uniform.windows == [7]
    for key in ("ppl", "filler_ppl", "recall_ppl", "far_recall_ppl"):
        assert_close(out[key], float(vocab), rtol=1e-5, atol=0)
    # ties → argmax picks each key's first value: accuracy = share of recall targets that are it
    targets = c.x[:, 1:][c.recall]
    assert_close(out["passkey"], ((targets - 10) % 4 == 0).float().mean().item())
    oracle = fope.evaluate(FixedModel(c.x, vocab, oracle=True), c, 10, 4)
    assert oracle["passkey"] == 1.0 and oracle["ppl"] < 1.001 and oracle["recall_ppl"] < 1.001


def test_block_is_residual_attention_then_residual_mlp():
    # with q = k = v = 0 (qkv weights zero) attention outputs 0: block(x) = x + mlp(ln2(x))
    torch.manual_seed(0)
    block = fope.Block(8, 2, None)
    with torch.no_grad():
        block.c_attn.weight.zero_()
    x = torch.randn(2, 5, 8)
    out = block(x, fope.attention_bias(2, 5), torch.ones(2))
    assert_close(out, x + block.mlp(block.ln_2(x)))
    # with v only: block(x) = h + mlp(ln2(h)), h = x + proj(causal mean of v per head)
    with torch.no_grad():
        block.c_attn.weight[16:] = torch.eye(8)
    v = block.ln_1(x)  # (B, T, C): v = ln1(x), q = k = 0 → uniform causal attention
    mean_v = v.cumsum(1) / torch.arange(1, 6)[None, :, None]
    h = x + block.c_proj(mean_v)
    assert_close(block(x, fope.attention_bias(2, 5), torch.ones(2)), h + block.mlp(block.ln_2(h)))


def test_nope_sees_a_set_and_alibi_sees_order():
    # without positions, causal attention over a prefix is a function of the set of earlier tokens:
    # swapping tokens 0 and 1 leaves the logits at position 3 unchanged for nope, not for alibi
    x = torch.tensor([[1, 2, 3, 4]])
    y = torch.tensor([[2, 1, 3, 4]])
    for arm, invariant in (("nope", True), ("alibi", False)):
        torch.manual_seed(0)
        model = fope.Decoder(arm, 20, tiny_cfg(n_layer=1, top_heads=1)).eval()
        with torch.no_grad():
            model.blocks[0].c_attn.weight.mul_(30.0)
            same = torch.allclose(model(x)[0, 3], model(y)[0, 3], atol=1e-6)
        assert same == invariant


def test_decoder_is_causal_and_window_limits_what_it_sees():
    torch.manual_seed(0)
    model = fope.Decoder("rope", 20, tiny_cfg(n_layer=1, top_heads=1)).eval()
    x = torch.randint(0, 20, (1, 12))
    y = x.clone()
    y[0, 2] = (x[0, 2] + 1) % 20
    with torch.no_grad():
        full_x = model(x)
        full_y = model(y)
        win_x = model(x, window=4)
        win_y = model(y, window=4)
    assert_close(full_x[0, :2], full_y[0, :2])  # the future does not leak
    assert not torch.allclose(full_x[0, 8:], full_y[0, 8:])  # full attention sees position 2
    assert_close(win_x[0, 6:], win_y[0, 6:])  # position 2 is ≥ 4 back from 6 onwards
    assert not torch.allclose(win_x[0, 5], win_y[0, 5])
    assert_close(win_x[0, :4], full_x[0, :4])


def test_get_lr_warms_up_then_decays_to_a_tenth():
    # warm-up 10 steps: (step + 1)/10;  then lr/10 + ½(1 + cos(π·progress))·0.9·lr
    assert_close(fope.get_lr(0, 100, 1.0, 10), 0.1)
    assert_close(fope.get_lr(9, 100, 1.0, 10), 1.0)
    assert_close(fope.get_lr(10, 100, 1.0, 10), 1.0)  # progress 0 → 0.1 + 0.9
    assert_close(fope.get_lr(55, 100, 1.0, 10), 0.55)  # progress ½ → 0.1 + ½·0.9
    assert_close(fope.get_lr(100, 100, 2.0, 10), 0.2)  # progress 1 → lr / 10
    assert_close(fope.get_lr(200, 100, 2.0, 10), 0.2)  # past the end: stays at lr / 10


def test_training_learns_recall(capsys, monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_cfg(log_every=15)
    data = fope.build_data(cfg, 0)
    vocab = data.vocab
    assert vocab == 8 + 2 * 5
    before = fope.evaluate(fope.Decoder("cf_only", vocab, cfg).eval(), data.evals[32], 10, 4)
    schedule = []
    get_lr = fope.get_lr

    def logged_lr(*args):
        schedule.append(args)
        return get_lr(*args)
    monkeypatch.setattr(fope, "get_lr", logged_lr)
    t0 = time.process_time()
    model, step_time = fope.train_arm("cf_only", cfg, data, torch.device("cpu"), 0)
    # one call per step: (step, 40 steps, lr 0.01, warm-up 40 // 10 = 4 steps)
    assert schedule == [(step, 40, 1e-2, 4) for step in range(40)]
    assert 0 < step_time * 40 <= time.process_time() - t0  # seconds per step, not in total
    after = fope.evaluate(model, data.evals[32], 10, 4)
    assert step_time > 0 and not model.training
    assert after["filler_ppl"] < 0.8 * before["filler_ppl"]
    assert after["recall_ppl"] < 0.8 * before["recall_ppl"]
    logged = [line.split("|")[0].split()[1] for line in capsys.readouterr().out.splitlines()
              if line.startswith("step")]
    assert logged == ["15/40", "30/40", "40/40"]  # every log_every steps and the last


# --- aggregation and the run ---

def test_summarise_and_gap():
    def seed_row(ppl):
        ev = {"64": {"ppl": ppl}, "128": {"ppl": 2 * ppl}}
        return {"eval": ev, "windowed": ev}
    a = [seed_row(3.0), seed_row(5.0)]
    b = [seed_row(2.0), seed_row(2.0)]
    arm = fope.summarise(a, ("ppl",))
    assert arm["ppl"] == {"64": 4.0, "128": 8.0} and arm["ppl_std"] == {"64": 1.0, "128": 2.0}
    assert arm["windowed_ppl"] == {"64": 4.0, "128": 8.0}
    # paired differences: 64 → [1, 3] → mean 2, std 1;  128 → [2, 6] → mean 4, std 2
    assert fope.gap(a, b, "ppl") == {"64": [2.0, 1.0], "128": [4.0, 2.0]}


def test_smoke_run_results_and_bad_input(tmp_path, capsys):
    t0 = time.process_time()
    res = fope.main(["--smoke", "--seeds", "2", "--workers", "1", "--out", str(tmp_path)])
    assert 0 < res["cpu_time_s"] <= time.process_time() - t0 + 0.1  # one process: all of it here
    saved = json.load(open(tmp_path / "results.json"))
    assert (tmp_path / "fope.png").exists()
    assert (tmp_path / "results.md").read_text() == fope.render_report(saved)
    assert saved["seeds"] == [0, 1] and saved["train_len"] == 64 and saved["wall_s"] > 0
    assert set(saved["arms"]) == set(fope.ARMS)
    for name, arm in saved["arms"].items():
        for key in ("ppl", "recall_ppl", "filler_ppl", "passkey", "windowed_ppl"):
            assert set(arm[key]) == {"64", "128"}
        assert arm["n_seeds"] == 2 == len(arm["per_seed"])
        assert [r["seed"] for r in arm["per_seed"]] == [0, 1]
        assert arm["step_time_s"] > 0
        for L in ("64", "128"):
            ppl = [r["eval"][L]["ppl"] for r in arm["per_seed"]]
            assert abs(arm["ppl"][L] - sum(ppl) / 2) < 1e-9
            assert arm["ppl_worst"][L] == max(ppl)
            passkey = [r["eval"][L]["passkey"] for r in arm["per_seed"]]
            assert arm["passkey_worst"][L] == min(passkey)
    fope_runs = saved["arms"]["fope"]["per_seed"]
    cf_runs = saved["arms"]["cf_only"]["per_seed"]
    diffs = [f["eval"]["128"]["recall_ppl"] - c["eval"]["128"]["recall_ppl"]
             for f, c in zip(fope_runs, cf_runs)]
    assert abs(saved["fope_minus_cf_only"]["recall_ppl"]["128"][0] - sum(diffs) / 2) < 1e-9
    heads = saved["positional_heads"]
    assert heads["arm"] == "rope" and len(heads["per_seed"]["fope"]) == 2
    assert set(heads["per_seed"]) == {"rope", "fope"}
    assert [len(r["random_sets"]) for r in heads["per_seed"]["rope"]] == [2, 2]  # smoke: 2 draws
    top = [r["top_drop"] for r in heads["per_seed"]["rope"]]
    assert abs(heads["top_drop"] - sum(top) / 2) < 1e-9
    assert set(saved["filler_oracle_ppl"]) == {"64", "128"}
    assert 1.0 < saved["filler_oracle_ppl"]["64"] < 3.0
    ratio = saved["arms"]["fope"]["step_time_s"] / saved["arms"]["rope"]["step_time_s"]
    assert_close(saved["step_time_ratio_fope_rope"], ratio)
    assert res["arms"]["rope"]["ppl"] == saved["arms"]["rope"]["ppl"]
    for argv in (["--arms", "rope,bogus"], ["--steps", "0"], ["--eval-lens", "32,64"],
                 ["--workers", "-1"], ["--arms", "rope,rope"]):
        with pytest.raises(SystemExit) as e:
            fope.main(argv + ["--out", str(tmp_path)])
        assert e.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_a_job_is_its_own_seed_and_evaluates_its_model():
    # a job seeds itself: the same job twice, with other work between, gives the same numbers
    cfg = tiny_cfg(steps=3, eval_lens="64", head_len=64, top_heads=1, random_draws=1)
    first = fope.run_job(fope.Job(cfg, "rope", 1))
    fope.run_job(fope.Job(cfg, "fope", 2))
    again = fope.run_job(fope.Job(cfg, "rope", 1))
    for out in (first, again):
        assert out.pop("cpu_time_s") > 0 and out.pop("step_time_s") > 0
    assert first == again and first["arm"] == "rope" and first["seed"] == 1
    assert fope.run_job(fope.Job(cfg, "cf_only", 1))["heads"] is None  # heads: rope and fope
    # what it reports is the evaluation of the model train_arm gives for that seed: full
    # attention, attention windowed to L_train = 32, heads scored beyond L_train (≥ 33 back)
    data = fope.build_data(cfg, 1)
    model = fope.train_arm("rope", cfg, data, torch.device("cpu"), 1)[0]
    corpus = data.evals[64]
    assert first["eval"]["64"] == fope.evaluate(model, corpus, 8 + 2, 4)
    assert first["windowed"]["64"] == fope.evaluate(model, corpus, 10, 4, window=32)
    assert first["windowed"]["64"] != first["eval"]["64"]
    heads = fope.positional_heads(model, data.head, 33, 1, 1, 1)
    assert first["heads"] == heads


# --- the report ---

KEYS = ("ppl", "recall_ppl", "far_recall_ppl", "filler_ppl", "passkey")


def seed_row(seed, ppl, recall, passkey=1.0, windowed_filler=2.5, windowed_far=20.0):
    """One seed of one arm: at 64 total ppl 2, recall 1; at 256 the values given."""
    at_64 = {"ppl": 2.0, "filler_ppl": 2.0, "recall_ppl": 1.0, "passkey": 1.0}
    at_256 = {"ppl": ppl, "filler_ppl": ppl, "recall_ppl": recall, "passkey": passkey,
              "far_recall_ppl": recall}
    windowed = dict(at_256, filler_ppl=windowed_filler, far_recall_ppl=windowed_far)
    return {"seed": seed, "eval": {"64": at_64, "256": at_256},
            "windowed": {"64": at_64, "256": windowed}, "step_time_s": 0.01}


def hand_results(arms, heads=None):
    results = {"config": {"eval_lens": "64,256", "values_per_key": 16, "top_heads": 2,
                          "fope_small_std": 0.02},
               "train_len": 64, "seeds": [0, 1, 2], "arms": {}, "wall_s": 1.0, "cpu_time_s": 2.0}
    for name, rows in arms.items():
        arm = fope.summarise(rows, KEYS)
        arm.update(n_seeds=len(rows), per_seed=rows, step_time_s=0.01)
        results["arms"][name] = arm
    if heads:
        results["positional_heads"] = heads
    return results


def verdict(report, start):
    lines = [line for line in report.splitlines() if line.startswith("- " + start)]
    assert len(lines) == 1, (start, report)
    return lines[0]


def test_render_report_verdicts_follow_the_numbers():
    rope = [seed_row(0, 3.3, 2.0, 0.8), seed_row(1, 3.3, 3.0, 0.7), seed_row(2, 3.3, 1.6, 0.9)]
    fope_rows = [seed_row(0, 3.4, 1.0), seed_row(1, 3.5, 1.02), seed_row(2, 3.3, 1.01)]
    cf_only = [seed_row(0, 3.3, 1.01), seed_row(1, 3.3, 1.0), seed_row(2, 3.3, 1.01)]
    nope = [seed_row(s, 10.0, 1.4, 0.9) for s in range(3)]
    report = fope.render_report(hand_results(
        {"rope": rope, "fope": fope_rows, "cf_only": cf_only, "nope": nope}))
    assert "- Baselines at 256: nope recall ppl 1.400 ± 0.000 [1.400], total ppl 10.000" in report
    # fope recall 1.0, 1.02, 1.01: mean 1.01, std √(2·0.01²/3) = 0.008, worst 1.02; rope 2.2
    line = verdict(report, "Retrieval at 256: ")
    assert "below RoPE's: **yes** (fope 1.010 ± 0.008 [1.020], rope 2.200" in line
    assert "passkey FoPE ≥ RoPE: **yes**" in line and "rope 0.800 ± 0.082 [0.700]" in line
    # fope − cf_only: −0.01, +0.02, 0 → mean +0.003, std 0.012; lower in 1 of 3 → clipping alone
    line = verdict(report, "Retrieval at 256 by clipping alone")
    assert "**yes**" in line and "+0.003 ± 0.012" in line and "1 of 3 seeds" in line
    # total ppl at 256: fope 3.4 > rope 3.3 → no; fope 3.4 / 2 = 1.70x of its own at 64 → no
    assert "**no** (fope 3.400" in verdict(report, "Perplexity at 256")
    assert "**no** (1.70x ± 0.04 [1.75x]; rope 1.65x)" in verdict(report, "Stability")
    assert "+0.100 ± 0.082 (higher in 2 of 3 seeds)" in verdict(report, "The Fourier series")
    # windowed filler 2.5 below full 3.3–3.5 in every rotary arm; windowed far 20 ≥ 16/2
    assert "**yes**" in verdict(report, "Control") and "rope 3.30 → 2.50" in report
    assert "**yes** (windowed far recall ppl 20.0–20.0)" in verdict(report, "Gate")
    assert "| fope | 3 | 2.000 ± 0.000 [2.000] | 3.400 ± 0.082 [3.500] |" in report
    # the other way round: the series helps in every seed, fope beats rope on perplexity, the
    # window does not help rope, one windowed far recall is below chance / 2 = 8
    fope_rows = [seed_row(0, 2.1, 1.0), seed_row(1, 2.2, 1.0), seed_row(2, 2.3, 1.0)]
    cf_only = [seed_row(0, 3.3, 1.2), seed_row(1, 3.3, 1.3), seed_row(2, 3.3, 1.1, 1.0, 2.5, 5.0)]
    rope = [seed_row(s, 2.4, 1.5, 0.9, 3.0) for s in range(3)]
    report = fope.render_report(hand_results(
        {"rope": rope, "fope": fope_rows, "cf_only": cf_only}))
    assert "**no**" in verdict(report, "Retrieval at 256 by clipping alone")
    assert "the series lowers it in 3 of 3 seeds" in report
    assert "**yes** (fope 2.200" in verdict(report, "Perplexity at 256")
    # 2.1, 2.2, 2.3 over 2.0: 1.05, 1.10, 1.15 → mean 1.10x ≤ 1.15, worst 1.15x
    assert "**yes** (1.10x ± 0.04 [1.15x]; rope 1.20x)" in verdict(report, "Stability")
    assert "**no**" in verdict(report, "Control") and "rope 2.40 → 3.00" in report
    assert "**no** (windowed far recall ppl 5.0–20.0)" in verdict(report, "Gate")
    # a tie is not help: fope − cf_only = −0.1, 0, −0.1 → lower in 2 of 3 → clipping alone
    cf_only = [seed_row(0, 3.3, 1.1), seed_row(1, 3.3, 1.0), seed_row(2, 3.3, 1.1)]
    report = fope.render_report(hand_results(
        {"rope": rope, "fope": fope_rows, "cf_only": cf_only}))
    assert "**yes**" in verdict(report, "Retrieval at 256 by clipping alone")
    assert "lowers it in 2 of 3 seeds" in report


def test_positional_head_verdict():
    # the top heads count when their ablation hurts (> 0) and at least twice the random heads
    assert fope.top_beats_random(2.0, 0.5) and fope.top_beats_random(0.1, -0.5)
    assert not fope.top_beats_random(0.5, 0.3) and not fope.top_beats_random(-0.01, -0.02)
    runs = [{"top_drop": 3.0, "random_drop": 0.5}, {"top_drop": 0.0, "random_drop": 1.0}]
    heads = {"arm": "rope", "top_drop": 1.5, "random_drop": 0.75,
             "by_arm": {"rope": {"top_drop": 1.5, "random_drop": 0.75}}, "per_seed": {"rope": runs}}
    line = verdict(fope.render_report(hand_results({"rope": [seed_row(0, 3.0, 1.0)]}, heads)),
                   "Positional heads (rope)")
    assert "by 1.50, 2 random others by 0.75" in line
    assert "**yes** on the mean, in 1 of 2 seeds (3.00 vs 0.50; 0.00 vs 1.00)" in line


def test_text_corpus_windows():
    ids = torch.arange(10)
    c = fope.text_corpus(ids, 3, 10, torch.Generator().manual_seed(0))  # the only window: all
    assert torch.equal(c.x, ids.expand(3, 10)) and c.filler.all() and not c.recall.any()
    c = fope.text_corpus(ids, 50, 4, torch.Generator().manual_seed(0))
    assert set(c.x[:, 0].tolist()) == set(range(7))  # every start 0 … 6 is drawn
    assert torch.equal(c.x[:, 1:] - c.x[:, :-1], torch.ones(50, 3, dtype=torch.long))


def test_user_text_gives_perplexity_only(tmp_path):
    path = tmp_path / "text.jsonl"
    rows = [json.dumps({"text": f"row {i:03d}: the cat sat on the mat; the dog sat. " * 3})
            for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    res = fope.main(["--smoke", "--data", str(path), "--arms", "rope,fope", "--out",
                     str(tmp_path / "out")])
    arm = res["arms"]["rope"]
    assert set(arm["ppl"]) == {"64", "128"} and arm["recall_ppl"] == {}
    assert "positional_heads" not in res and "filler_oracle_ppl" not in res
    assert arm["ppl"] == arm["filler_ppl"] and 1.0 < arm["ppl"]["64"] < 1000
    cfg = fope.Config(data=str(path), steps=2, batch=2, eval_lens="64,128", eval_seqs=2)
    data = fope.build_data(cfg, 0)
    assert data.vocab == 256 and data.head is None and data.chain is None
    ids = torch.tensor(list(("".join(json.loads(r)["text"] for r in rows)).encode()))
    held = ids[int(0.9 * len(ids)):]
    starts = [int((held[:len(held) - 63].unfold(0, 64, 1) == row).all(1).nonzero()[0, 0])
              for row in data.evals[64].x]  # each eval window is found in the held-out tail
    assert len(starts) == 2
    assert data.train.x.shape == (4, 64) and data.evals[128].x.shape == (2, 128)
