"""ssrl.py: format reward, EM, pass@k, information mask, GRPO, and the toy's data, on hand-computed values."""
import itertools
import json
import math
import random

import pytest
import torch

import ssrl

T, S, I, A = ("<think>", "</think>"), ("<search>", "</search>"), ("<information>", "</information>"), ("<answer>", "</answer>")


def block(tag, body):
    return f"{tag[0]}{body}{tag[1]}"


# --- format reward: f = min(t/2, 1) · min(t, s+1) / max(t, s+1), or 0 when malformed ---

def test_format_reward_direct_answer_is_half():
    # t = 1, s = 0: min(1/2, 1) · min(1, 1) / max(1, 1) = 0.5 · 1 = 0.5
    assert ssrl.format_reward(block(T, "x") + block(A, "paris")) == 0.5


def test_format_reward_one_search_is_one():
    # t = 2, s = 1: min(2/2, 1) · min(2, 2) / max(2, 2) = 1
    text = block(T, "q") + block(S, "who") + block(I, "fact") + block(T, "ok") + block(A, "paris")
    assert ssrl.format_reward(text) == 1.0


def test_format_reward_two_searches_and_one_think_too_few():
    # two hops: t = 3, s = 2: min(3/2, 1) · min(3, 3) / max(3, 3) = 1
    two = block(T, "a") + block(S, "q1") + block(I, "f1") + block(T, "b") + block(S, "q2") + block(I, "f2") \
        + block(T, "c") + block(A, "x")
    assert ssrl.format_reward(two) == 1.0
    # t = 1, s = 1: min(1/2, 1) · min(1, 2) / max(1, 2) = 0.5 · 0.5 = 0.25
    assert ssrl.format_reward(block(T, "a") + block(S, "q") + block(I, "f") + block(A, "x")) == 0.25


@pytest.mark.parametrize("text", [
    block(T, "q") + block(S, "who") + block(T, "ok") + block(A, "paris"),  # missing information block: 0 ≠ s = 1
    block(T, "q") + block(S, "who") + block(I, "  ") + block(T, "ok") + block(A, "paris"),  # empty block
    block(S, "who") + block(I, "fact") + block(T, "ok") + block(A, "paris"),  # does not start with <think>
    block(T, "q") + block(A, "paris") + " trailing",  # does not end with </answer>
    block(T, "x") * 9 + block(A, "paris"),  # nine thinks: t > 8
])
def test_format_reward_malformed_is_zero(text):
    assert ssrl.format_reward(text) == 0.0


def test_reward_mixes_em_and_format():
    # correct direct answer: 0.9 · 1 + 0.1 · 0.5 = 0.95; wrong answer after one search: 0.9 · 0 + 0.1 · 1 = 0.1
    assert ssrl.reward(block(T, "x") + block(A, " The Paris."), "paris") == pytest.approx(0.95)
    text = block(T, "q") + block(S, "who") + block(I, "fact") + block(T, "ok") + block(A, "rome")
    assert ssrl.reward(text, "paris") == pytest.approx(0.1)


# --- EM normalisation ---

def test_normalize_and_exact_match():
    assert ssrl.normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"  # lower, drop "the" and "!", squeeze
    assert ssrl.normalize_answer("an apple, a pear") == "apple pear"
    assert ssrl.normalize_answer("a3 b7") == "a3 b7"  # "a" is dropped only as a whole word
    assert ssrl.exact_match(" C12 ", "c12") == 1.0
    assert ssrl.exact_match("c1", "c12") == 0.0
    assert ssrl.extract_answer("<answer>x</answer><answer> y </answer>") == " y "  # the last answer block counts


# --- pass@k ---

def test_pass_at_k_hand_value():
    # n = 4, c = 1, k = 2: 1 − C(3, 2) / C(4, 2) = 1 − 3/6 = 0.5
    assert ssrl.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert ssrl.pass_at_k(5, 0, 3) == 0.0 and ssrl.pass_at_k(5, 3, 3) == 1.0  # n − c < k: every 3-subset hits


def test_pass_at_k_equals_brute_force_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert ssrl.pass_at_k(n, c, k) == pytest.approx(brute), (n, c, k)


# --- information mask ---

def test_information_mask_two_blocks():
    o, c = 7, 8  # <information>, </information>
    ids = torch.tensor([[1, o, 2, 3, c, 4, o, 5, c, 6],
                        [o, c, 1, 2, 3, 4, 5, 6, 6, o]])  # second row: an empty block, then one left open
    expected = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 0],
                             [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(ssrl.information_mask(ids, o, c), expected)


def test_masked_information_tokens_get_no_gradient():
    o, c = 7, 8
    ids = torch.tensor([[1, o, 2, c, 4]])
    mask = (~ssrl.information_mask(ids, o, c)).float()  # m_t = 0 on tokens 1..3
    logp = torch.full((1, 5), -1.0, requires_grad=True)
    loss, _ = ssrl.grpo_loss(logp, logp.detach(), torch.full((1, 5), -1.2), mask, torch.tensor([1.0]))
    loss.backward()
    assert torch.all(logp.grad[0, 1:4] == 0) and torch.all(logp.grad[0, [0, 4]] != 0)


# --- GRPO ---

def test_grpo_ratio_one_centred_advantages_loss_zero_gradient_not_zero():
    # ρ = 1, ref = π: pg = −Â per token; token-mean over 6 tokens: (−1·3 + 1·3)/6 = 0; KL = 0
    logp = torch.full((2, 3), -0.5, requires_grad=True)
    adv = ssrl.group_normalize(torch.tensor([[1.0, 0.0]])).reshape(2)  # (1 − 0.5)/(0.7071 + 1e-6) = ±0.7071
    loss, terms = ssrl.grpo_loss(logp, logp.detach(), logp.detach(), torch.ones(2, 3), adv)
    torch.testing.assert_close(loss, torch.tensor(0.0))
    loss.backward()
    # ∂/∂logp_t of −Â ρ_t / 6 at ρ = 1 is −Â/6 = ∓0.11785
    torch.testing.assert_close(logp.grad, (-adv[:, None] / 6).expand(2, 3))


def test_grpo_clip_stops_the_gradient():
    # ρ = e^0.4 = 1.492 > 1.2 with Â = 1: max(−1.492, −1.2) = −1.2, a constant: gradient 0, clip_frac 1
    logp = torch.tensor([[0.4]], requires_grad=True)
    loss, terms = ssrl.grpo_loss(logp, torch.zeros(1, 1), logp.detach(), torch.ones(1, 1), torch.tensor([1.0]))
    torch.testing.assert_close(loss, torch.tensor(-1.2))
    loss.backward()
    assert logp.grad.abs().item() == 0 and terms["clip_frac"].item() == 1.0


# --- the toy ---

def toy():
    cfg = ssrl.Config(n_people=30, n_traj=5, n_heldout=5)
    rows = [dict(r) for r in ssrl.synthetic_rows(cfg, random.Random(0))]
    kb = ssrl.KB(rows)
    words = {w for r in rows for col in ssrl.COLUMNS for w in r[col].split()} | set(ssrl.FILLER) | set(ssrl.RELATIONS)
    return kb, ssrl.Tokenizer(sorted(words)), rows


def test_every_word_is_one_token_and_trajectories_earn_full_reward():
    kb, tok, rows = toy()
    person = rows[0]["person"]
    assert len(tok.encode(" " + person)) == 2  # two-token names
    for rel in ssrl.RELATIONS:
        text = ssrl.trajectory_text(kb, person, rel)
        assert tok.decode(tok.encode(text)) == text
        assert ssrl.reward(text, kb.gold(person, rel)) == pytest.approx(1.0)  # 0.9 · 1 + 0.1 · 1
    assert kb.gold(person, "country") == rows[0]["country"]  # two hops: person → city → country
    assert kb.search(f" {person} city ") == f"{person} lives in {rows[0]['city']}"
    assert kb.search("nobody city") == "no result"


def test_sim_to_real_pastes_the_lookup_after_search():
    kb, tok, rows = toy()
    torch.manual_seed(0)
    model = ssrl.GPT(len(tok.raw), 16, 1, 2, 192)
    # make the model always write "<search>": then "</search>" closes an empty query; after every "</search>"
    # the next tokens must be the forced "<information> no result</information>"
    with torch.no_grad():
        model.tok.weight.zero_()
        model.tok.weight[tok.special["</search>"]] = 1.0
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)  # logits = 1 · E: only "</search>" scores 16, the rest 0
    prompts = [tok.encode("<s> city of " + rows[0]["person"] + " ?")] * 2
    seq, valid, Lp = ssrl.generate(model, prompts, 20, tok, torch.device("cpu"), temperature=0,
                                   search=lambda q: kb.search(q))
    text = ssrl.decode_responses(tok, seq, valid, Lp)[0]
    assert text.startswith("</search><information> no result</information></search>"), text


# --- the KV-cache sampler passes the right positions and masks ---


def test_kv_cache_decoding_equals_the_full_forward_with_left_padding():
    torch.manual_seed(0)
    model = ssrl.GPT(30, 16, 2, 2, 32).eval()
    ids, valid = torch.randint(0, 30, (2, 9)), torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # row 1 is left-padded: its first real token is at position 0
    pos = ssrl.positions(valid)  # row 1: 0 0 0 0 1 2 ...
    with torch.no_grad():
        full = model(ids, pos, ssrl.full_mask(valid))  # (2, 9, V)
        cache = model.new_cache(2, 9, "cpu")
        steps = [model(ids[:, :5], pos[:, :5], ssrl.full_mask(valid[:, :5]), cache, 0)]
        steps += [model(ids[:, t:t + 1], pos[:, t:t + 1], valid[:, None, None, :t + 1], cache, t) for t in range(5, 9)]
    inc = torch.cat(steps, 1)
    torch.testing.assert_close(inc[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(inc[1, 3:], full[1, 3:], atol=1e-5, rtol=0)  # padded query rows are never used


def test_main_smoke_writes_the_issue_keys(tmp_path):
    ssrl.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    arms = json.loads((tmp_path / "results.json").read_text())["arms"]
    for arm in ("before_rl", "after_rl"):
        assert list(arms[arm]["pass_at_k"]) == [str(k) for k in range(1, 5)]  # smoke: n_samples = 4
        assert {"format_rate", "info_fidelity"} <= set(arms[arm])
    assert {"em_self", "em_real"} <= set(arms["sim2real"])


def test_bad_values_exit_2(capsys):
    for argv in (["--group", "1"], ["--stale-frac", "2"], ["--n-traj", "300", "--n-heldout", "100"]):
        with pytest.raises(SystemExit) as e:
            ssrl.main(argv)
        assert e.value.code == 2
