"""ssrl.py: format reward (official cases), EM, pass@k, information mask, plan accuracy, GRPO, the
toy world, and the evaluation of models whose answers are fixed by hand."""
import itertools
import json
import math
import random

import pytest
import torch
import torch.nn as nn

import ssrl

T = ("<think>", "</think>")
S = ("<search>", "</search>")
I = ("<information>", "</information>")
A = ("<answer>", "</answer>")


def block(tag, body):
    return f"{tag[0]}{body}{tag[1]}"


ONE_SEARCH = block(T, "q") + block(S, "who") + block(I, "fact") + block(T, "ok") + block(A, "x")


# --- format reward: f = min(t/2, 1) · min(t, s+1) / max(t, s+1), or 0 when malformed ---

def test_format_reward_direct_answer_is_half_and_one_search_is_one():
    # t = 1, s = 0: min(1/2, 1) · min(1, 1) / max(1, 1) = 0.5
    assert ssrl.format_reward(block(T, "x") + block(A, "paris")) == 0.5
    # t = 2, s = 1: min(2/2, 1) · min(2, 2) / max(2, 2) = 1
    assert ssrl.format_reward(ONE_SEARCH) == 1.0
    assert ssrl.format_reward("  " + ONE_SEARCH + "\n") == 1.0  # stripped first


def test_format_reward_ratios():
    # two hops: t = 3, s = 2: min(3/2, 1) · 3/3 = 1
    two = block(T, "a") + block(S, "q1") + block(I, "f1") + block(T, "b") + block(S, "q2") \
        + block(I, "f2") + block(T, "c") + block(A, "x")
    assert ssrl.format_reward(two) == 1.0
    # t = 1, s = 1: min(1/2, 1) · min(1, 2) / max(1, 2) = 0.5 · 0.5 = 0.25
    assert ssrl.format_reward(block(T, "a") + block(S, "q") + block(I, "f") + block(A, "x")) == 0.25
    # t = 4, s = 1: min(2, 1) · min(4, 2) / max(4, 2) = 0.5
    four = block(T, "a") * 3 + block(S, "q") + block(I, "f") + block(T, "b") + block(A, "x")
    assert ssrl.format_reward(four) == 0.5
    # t = 8, s = 0: 1 · 1/8 = 0.125 (eight is still allowed)
    assert ssrl.format_reward(block(T, "x") * 8 + block(A, "p")) == 0.125


MALFORMED = {
    "missing information block": block(T, "q") + block(S, "w") + block(T, "ok") + block(A, "p"),
    "empty block": block(T, "q") + block(S, "w") + block(I, "  ") + block(T, "ok") + block(A, "p"),
    "empty answer": block(T, "q") + block(A, " "),
    "no leading think": block(S, "w") + block(I, "f") + block(T, "ok") + block(A, "p"),
    "does not end with </answer>": block(T, "q") + block(A, "p") + " trailing",
    "nine thinks": block(T, "x") * 9 + block(A, "p"),
    "information before search": block(T, "a") + block(I, "f") + block(T, "b") + block(A, "p"),
    "information before search, counts equal": block(T, "a") + block(I, "f") + block(S, "q")
    + block(T, "b") + block(A, "p"),
    "think between search and information": block(T, "a") + block(S, "q") + block(T, "b")
    + block(I, "f") + block(T, "c") + block(A, "p"),
    "a tag nested in a think block": block(T, "a " + block(S, "q") + " b") + block(A, "p"),
    "a tag nested in an information block": block(T, "a") + block(S, "q")
    + block(I, "f " + block(T, "x")) + block(T, "c") + block(A, "p"),
    "a foreign tag": block(T, "a") + block(A, "p <s>"),
    "a foreign closing tag": block(T, "a </s>") + block(A, "p"),
    "two information opens, one close": block(T, "a") + block(S, "q") + "<information> f"
    + block(I, "g") + block(T, "c") + block(A, "p"),
    "answer inside think": block(T, "a " + block(A, "p")) + block(A, "p"),
    "a query over two lines": block(T, "q") + block(S, "w\nx") + block(I, "f") + block(T, "ok")
    + block(A, "p"),
    "a search after the answer": block(T, "a") + block(S, "q") + block(I, "f")
    + block(A, "p") + block(S, "q"),
    "fewer than four tags": "<think></answer>",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_format_reward_malformed_is_zero(name):
    assert ssrl.format_reward(MALFORMED[name]) == 0.0


def test_answer_reward_mixes_em_and_format():
    # right direct answer: 0.9 · 1 + 0.1 · 0.5 = 0.95; wrong after one search: 0.9 · 0 + 0.1 · 1
    direct = block(T, "x") + block(A, " The Paris.")
    assert ssrl.answer_reward(direct, "paris") == pytest.approx(0.95)
    assert ssrl.answer_reward(ONE_SEARCH, "paris") == pytest.approx(0.1)
    assert ssrl.answer_reward(ONE_SEARCH, "x") == pytest.approx(1.0)
    assert ssrl.answer_reward(block(T, "x") + " paris", "paris") == 0.0  # no answer block


# --- EM normalisation ---

def test_normalize_and_exact_match():
    assert ssrl.normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert ssrl.normalize_answer("an apple, a pear") == "apple pear"
    assert ssrl.normalize_answer("a3 b7") == "a3 b7"  # "a" is dropped only as a whole word
    assert ssrl.exact_match(" C12 ", "c12") == 1.0
    assert ssrl.exact_match("c1", "c12") == 0.0
    assert ssrl.extract_answer("<answer>x</answer><answer> y </answer>") == " y "  # the last one
    assert ssrl.extract_answer("<answer>x") is None


# --- pass@k ---

def test_pass_at_k_hand_value():
    # n = 4, c = 1, k = 2: 1 − C(3, 2) / C(4, 2) = 1 − 3/6 = 0.5
    assert ssrl.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert ssrl.pass_at_k(5, 0, 3) == 0.0
    assert ssrl.pass_at_k(5, 3, 3) == 1.0  # n − c < k: every 3-subset holds a hit


def test_pass_at_k_equals_brute_force_over_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert ssrl.pass_at_k(n, c, k) == pytest.approx(brute), (n, c, k)


# --- information mask ---

O_ID = 7  # <information>
C_ID = 8  # </information>


def mask_loop(row):
    """The plain scan: inside from an open tag through its close; a stray close closes nothing."""
    out = []
    inside = False
    for t in row:
        if t == O_ID:
            inside = True
            out.append(True)
        elif t == C_ID:
            out.append(inside)
            inside = False
        else:
            out.append(inside)
    return out


def test_information_mask_two_blocks_and_an_open_one():
    ids = torch.tensor([[1, O_ID, 2, 3, C_ID, 4, O_ID, 5, C_ID, 6],
                        [O_ID, C_ID, 1, 2, 3, 4, 5, 6, 6, O_ID]])
    expected = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 0],
                             [1, 1, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(ssrl.information_mask(ids, O_ID, C_ID), expected)


def test_information_mask_after_a_stray_or_doubled_close():
    # the v1 bug: [c, 1, o, 2, c, 3] gave 000000; the stray close closes nothing: 001110
    ids = torch.tensor([[C_ID, 1, O_ID, 2, C_ID, 3]])
    assert ssrl.information_mask(ids, O_ID, C_ID).int().tolist() == [[0, 0, 1, 1, 1, 0]]
    # a doubled close, then another block: o 1 c c 2 o 3 c → 1 1 1 0 0 1 1 1
    ids = torch.tensor([[O_ID, 1, C_ID, C_ID, 2, O_ID, 3, C_ID]])
    assert ssrl.information_mask(ids, O_ID, C_ID).int().tolist() == [[1, 1, 1, 0, 0, 1, 1, 1]]
    # two opens, one close: all inside
    ids = torch.tensor([[O_ID, 1, O_ID, 2, C_ID, 5]])
    assert ssrl.information_mask(ids, O_ID, C_ID).int().tolist() == [[1, 1, 1, 1, 1, 0]]


def test_information_mask_equals_the_plain_scan():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (64, 12), generator=g)
    expected = torch.tensor([mask_loop(row) for row in ids.tolist()])
    assert torch.equal(ssrl.information_mask(ids, O_ID, C_ID), expected)
    with pytest.raises(ValueError):
        ssrl.information_mask(ids[0], O_ID, C_ID)


def test_masked_information_tokens_get_no_gradient():
    ids = torch.tensor([[1, O_ID, 2, C_ID, 4]])
    mask = (~ssrl.information_mask(ids, O_ID, C_ID)).float()  # m_t = 0 on tokens 1..3
    logp = torch.full((1, 5), -1.0, requires_grad=True)
    loss, _ = ssrl.grpo_loss(logp, logp.detach(), torch.full((1, 5), -1.2), mask,
                             torch.tensor([1.0]))
    loss.backward()
    assert torch.all(logp.grad[0, 1:4] == 0)
    assert torch.all(logp.grad[0, [0, 4]] != 0)


# --- plan accuracy (strict) ---

VERBS = ssrl.VERBS


def hop(subject, rel, obj):
    return block(S, f" {subject} {rel}") + block(I, f" {subject} {VERBS[rel]} {obj}")


def test_plan_is_correct_strict():
    chain = ("employer", "hq", "country")
    right = block(T, "e") + hop("a1 b2", "employer", "e3") + hop("e3", "hq", "c4") \
        + hop("c4", "country", "k1") + block(T, "done") + block(A, "k1")
    assert ssrl.plan_is_correct(right, "a1 b2", chain, VERBS)
    # the chain on a wrongly recalled entity is still the right plan (e9 is then queried)
    wrong_fact = hop("a1 b2", "employer", "e9") + hop("e9", "hq", "c4") + hop("c4", "country", "k1")
    assert ssrl.plan_is_correct(wrong_fact, "a1 b2", chain, VERBS)
    cases = {
        "second query not on the recalled entity": hop("a1 b2", "employer", "e3")
        + hop("e4", "hq", "c4") + hop("c4", "country", "k1"),
        "first query on another person": hop("a1 b3", "employer", "e3") + hop("e3", "hq", "c4")
        + hop("c4", "country", "k1"),
        "wrong relation": hop("a1 b2", "city", "c3") + hop("c3", "hq", "c4")
        + hop("c4", "country", "k1"),
        "a hop short": hop("a1 b2", "employer", "e3") + hop("e3", "hq", "c4"),
        "a hop too many": hop("a1 b2", "employer", "e3") + hop("e3", "hq", "c4")
        + hop("c4", "country", "k1") + hop("k1", "country", "k1"),
        "a query without information": hop("a1 b2", "employer", "e3") + hop("e3", "hq", "c4")
        + hop("c4", "country", "k1") + block(S, " x country"),
        "information with a wrong verb": block(S, " a1 b2 employer")
        + block(I, " a1 b2 lives in e3")
        + hop("e3", "hq", "c4") + hop("c4", "country", "k1"),
        "information without an object": block(S, " a1 b2 employer") + block(I, " a1 b2 works at")
        + hop("e3", "hq", "c4") + hop("c4", "country", "k1"),
    }
    for name, text in cases.items():
        assert not ssrl.plan_is_correct(text, "a1 b2", chain, VERBS), name
    assert ssrl.plan_is_correct(hop("a1 b2", "city", "c1 x"), "a1 b2", ("city",), VERBS)


# --- GRPO ---

def test_grpo_ratio_one_centred_advantages_loss_zero_gradient_not_zero():
    # ρ = 1, ref = π: pg = −Â per token; token-mean over 6 tokens: (−1·3 + 1·3)/6 = 0; KL = 0
    logp = torch.full((2, 3), -0.5, requires_grad=True)
    adv = ssrl.group_normalize(torch.tensor([[1.0, 0.0]])).reshape(2)  # ±0.7071
    loss, _ = ssrl.grpo_loss(logp, logp.detach(), logp.detach(), torch.ones(2, 3), adv)
    torch.testing.assert_close(loss, torch.tensor(0.0))
    loss.backward()
    # ∂/∂logp_t of −Â ρ_t / 6 at ρ = 1 is −Â/6 = ∓0.11785
    torch.testing.assert_close(logp.grad, (-adv[:, None] / 6).expand(2, 3))


def test_grpo_clip_stops_the_gradient():
    # ρ = e^0.4 = 1.492 > 1.2 with Â = 1: max(−1.492, −1.2) = −1.2, a constant: gradient 0
    logp = torch.tensor([[0.4]], requires_grad=True)
    loss, terms = ssrl.grpo_loss(logp, torch.zeros(1, 1), logp.detach(), torch.ones(1, 1),
                                 torch.tensor([1.0]))
    torch.testing.assert_close(loss, torch.tensor(-1.2))
    loss.backward()
    assert logp.grad.abs().item() == 0
    assert terms["clip_frac"].item() == 1.0


# --- the toy world ---

def small_world():
    """Two people, hand-made so that no wrong plan lands on a right answer by chance."""
    triples = [("a0 b0", "city", "c0"), ("a0 b0", "employer", "e0"), ("e0", "hq", "c1"),
               ("c0", "country", "k0"), ("c1", "country", "k1"),
               ("a0 b1", "city", "c1"), ("a0 b1", "employer", "e1"), ("e1", "hq", "c0")]
    kb = ssrl.KB(triples)
    words = set(ssrl.FILLER) | set(ssrl.TEMPLATES) | set(ssrl.VERBS)
    for s, r, o in triples:
        words |= set(s.split()) | set(o.split()) | set(ssrl.VERBS[r].split())
    return kb, ssrl.Tokenizer(sorted(words))


def test_world_gold_search_and_trajectories():
    kb, tok = small_world()
    assert kb.gold("a0 b0", "country") == "k0"  # a0 b0 → c0 → k0
    assert kb.gold("a0 b0", "employer country") == "k1"  # a0 b0 → e0 → c1 → k1
    assert kb.gold("a0 b1", "employer country") == "k0"  # a0 b1 → e1 → c0 → k0
    assert kb.search(" a0 b0 city ") == "a0 b0 lives in c0"
    assert kb.search("e0 hq") == "e0 is based in c1"
    assert kb.search("nobody city") == "no result"
    assert kb.search("") == "no result"
    assert ssrl.people_of(kb) == ["a0 b0", "a0 b1"]
    # a subject needs both a home city and an employer to be a person
    assert ssrl.people_of(ssrl.KB([("x y", "city", "c0"), ("z w", "employer", "e0")])) == []
    for template, chain in ssrl.TEMPLATES.items():
        text = ssrl.trajectory_text(kb, "a0 b0", chain)
        assert tok.decode(tok.encode(text)) == text
        assert ssrl.answer_reward(text, kb.gold("a0 b0", template)) == pytest.approx(1.0)
        assert ssrl.plan_is_correct(text, "a0 b0", chain, VERBS)
        for other in ssrl.PLANS:
            if other != chain:
                wrong = ssrl.trajectory_text(kb, "a0 b0", other)
                assert not ssrl.plan_is_correct(wrong, "a0 b0", chain, VERBS)
    assert len(tok.encode(" a0 b0")) == 2  # two-token names


def test_pretraining_pool_and_demo_sampling():
    kb, tok = small_world()
    pool = ssrl.pretraining_pool(kb, tok, ["a0 b0"])
    assert len(pool.bios) == len(kb.facts)
    assert tok.decode(pool.bios[0]) == ssrl.bio_text(kb, *sorted(kb.facts)[0])
    # demos[template][plan]: a right-chain demo ends with the gold answer
    right = ssrl.PLANS.index(ssrl.TEMPLATES["country"])
    text = tok.decode(pool.demos["country"][right][0])
    assert text == "<s> country of a0 b0 ?" + ssrl.trajectory_text(kb, "a0 b0", ("city", "country"))
    rng = random.Random(0)
    picks = [ssrl.sample_demo(pool, "country", 0.3, rng) for _ in range(4000)]
    share = sum(p == pool.demos["country"][right][0] for p in picks) / len(picks)
    assert abs(share - 0.3) < 0.03
    others = [tok.decode(p) for p in picks if p != pool.demos["country"][right][0]]
    plan_counts = [sum(o == tok.decode(pool.demos["country"][j][0]) for o in others)
                   for j in range(len(ssrl.PLANS)) if j != right]
    assert min(plan_counts) > 0.2 * len(others)  # the four other plans, about a quarter each
    assert all(ssrl.sample_demo(pool, "city", 1.0, rng) == pool.demos["city"][0][0]
               for _ in range(20))
    packed = [ssrl.sample_packed_bios(pool, 3, 99, rng) for _ in range(300)]
    assert all(p[0] == 99 for p in packed)
    lengths = {len(p) - 1 for p in packed}
    assert min(lengths) >= min(len(b) for b in pool.bios)
    assert max(lengths) <= 3 * max(len(b) for b in pool.bios)
    assert max(lengths) > 2 * max(len(b) for b in pool.bios)
    assert min(lengths) <= max(len(b) for b in pool.bios)  # some sequences hold one bio line


def test_stale_world_moves_the_fraction_and_keeps_the_rest():
    kb, _ = small_world()
    stale, n = ssrl.stale_kb(kb, ["a0 b0", "a0 b1"], 0.5, random.Random(0))
    assert n == 1
    changed = [p for p in ("a0 b0", "a0 b1") if stale.facts[(p, "city")] != kb.facts[(p, "city")]]
    assert len(changed) == 1
    assert stale.facts[(changed[0], "city")] in {"c0", "c1"}  # moved to another home city
    assert {k: v for k, v in stale.facts.items() if k[0] not in changed} == \
        {k: v for k, v in kb.facts.items() if k[0] not in changed}


# --- evaluation of a model whose answers are fixed by hand ---


class Scripted(nn.Module):
    """Writes a fixed response per prompt: logit 50 on the scripted next token, 0 elsewhere."""

    def __init__(self, vocab, script, pad):
        super().__init__()
        self.vocab = vocab
        self.script = script  # prompt ids (tuple, without padding) → response ids
        self.pad = pad
        self.dummy = nn.Parameter(torch.zeros(1))
        self.logit = 50.0  # on the scripted next token; every other token gets 0

    def new_cache(self, B, T, device):
        return {"rows": None, "Lp": None}

    def forward(self, idx, pos=None, attn_mask=None, cache=None, start=0):
        B, T = idx.shape
        if start == 0:
            cache["rows"] = [tuple(t for t in row if t != self.pad) for row in idx.tolist()]
            cache["Lp"] = T
        logits = torch.zeros(B, T, self.vocab)
        at = start + T - cache["Lp"]  # index of the response token to write next
        for i, row in enumerate(cache["rows"]):
            response = self.script[row]
            logits[i, -1, response[min(at, len(response) - 1)]] = self.logit
        return logits


def scripted_model(kb, tok, responses):
    """responses: (person, template) → response text."""
    script = {}
    for (person, template), text in responses.items():
        prompt = tuple(tok.encode("<s> " + ssrl.prompt_text(person, template)))
        script[prompt] = tok.encode(text)
    return Scripted(len(tok.raw), script, tok.special["<pad>"])


def fixed_responses(kb):
    """a0 b0: the right plan for every template; a0 b1: the right plan for city only, the
    employer chain for every other template, and a wrongly recalled employer (e0 instead of e1)."""
    out = {}
    for template, chain in ssrl.TEMPLATES.items():
        out[("a0 b0", template)] = ssrl.trajectory_text(kb, "a0 b0", chain)
    out[("a0 b1", "city")] = ssrl.trajectory_text(kb, "a0 b1", ("city",))
    wrong = block(T, " employer") + hop("a0 b1", "employer", "e0") + block(T, " done") \
        + block(A, " e0")
    for template in ("employer", "country", "employer country"):
        out[("a0 b1", template)] = wrong
    return out


def test_evaluate_a_model_with_fixed_answers():
    kb, tok = small_world()
    model = scripted_model(kb, tok, fixed_responses(kb))
    cfg = ssrl.Config(n_samples=3, max_new=60)
    out = ssrl.evaluate(model, kb, ["a0 b0", "a0 b1"], ["a0 b0", "a0 b1"], cfg, tok,
                        torch.device("cpu"))
    # 8 questions: a0 b0 all right (4), a0 b1 city right (1): 5/8 at every k
    for k in ("1", "2", "3"):
        assert out["pass_at_k"][k] == pytest.approx(5 / 8)
    assert out["greedy_em"] == pytest.approx(5 / 8)
    # plan: a0 b1's employer question uses the right chain on a wrong fact: 6/8
    assert out["plan_accuracy"] == pytest.approx(6 / 8)
    assert out["greedy_plan_accuracy"] == pytest.approx(6 / 8)
    assert out["copy"] == 1.0
    assert out["format_rate"] == 1.0
    # hops written: a0 b0 1+1+2+3 = 7 true; a0 b1 city 1 true, 3 × employer e0 false: 8 / 11
    assert out["info_fidelity"] == pytest.approx(8 / 11)
    assert out["hop_recall"] == {"city": 1.0, "country": 1.0, "employer": pytest.approx(2 / 5),
                                 "hq": 1.0}
    assert out["answer_follows_information"] == 1.0
    assert out["by_template"]["city"] == {"pass_at_1": 1.0, "plan_accuracy": 1.0, "greedy_em": 1.0}
    assert out["by_template"]["employer"]["plan_accuracy"] == 1.0
    assert out["by_template"]["employer"]["pass_at_1"] == 0.5
    assert out["by_template"]["country"]["plan_accuracy"] == 0.5
    assert out["by_template"]["employer country"]["greedy_em"] == 0.5


def test_summarize_pass_at_k_counts_hits_per_question():
    kb, _ = small_world()
    questions = [("a0 b0", "city"), ("a0 b1", "city")]
    right = ssrl.score_response(ssrl.trajectory_text(kb, "a0 b0", ("city",)), kb, "a0 b0", "city")
    wrong = ssrl.score_response(block(T, "x") + block(A, "c9"), kb, "a0 b1", "city")
    assert right["em"] and right["plan"] and right["copy"] and right["format"]
    assert not (wrong["em"] or wrong["plan"] or wrong["copy"] or wrong["format"])
    assert wrong["follows"] is None
    # question 1: 1 of 2 right; question 2: 0 of 2. pass@1 = (0.5 + 0) / 2, pass@2 = (1 + 0) / 2
    out = ssrl.summarize([right, wrong, wrong, wrong], questions, 2)
    assert out["pass_at_k"] == {"1": 0.25, "2": 0.5}
    assert out["by_template"]["city"]["pass_at_1"] == 0.25
    assert out["by_template"]["country"]["pass_at_1"] is None
    with pytest.raises(ValueError):
        ssrl.summarize([right], questions, 2)
    lies = ssrl.score_response(hop("a0 b1", "city", "c1") + block(A, " c0"), kb, "a0 b1", "city")
    assert lies["follows"] is False and lies["em"] is False and lies["hops"] == [("city", True)]


def test_sim_to_real_pastes_the_lookup():
    kb, tok = small_world()
    # a0 b1 writes a false fact (e0); the real lookup pastes e1 and the answer copies ... the
    # scripted answer stays e0, so EM stays 0; with the right chain for a0 b0 both are right
    responses = fixed_responses(kb)
    model = scripted_model(kb, tok, responses)
    questions = [("a0 b0", "employer"), ("a0 b1", "employer")]
    out = ssrl.sim_to_real(model, kb, questions, 2, tok, torch.device("cpu"), 60)
    assert out["em_self"] == 0.5
    assert out["em_real"] == 0.5
    assert out["info_fidelity_self"] == 0.5
    real = ssrl.sample_scores(model, kb, questions, 1, tok, torch.device("cpu"), 60,
                              search=kb.search)
    assert real[1]["hops"] == [("employer", True)]  # the pasted block is the true fact
    assert real[1]["follows"] is False


def test_hop_recall_gate_reads_the_information_block():
    kb, tok = small_world()
    script = {}
    for (s, r) in kb.facts:
        prompt = "<s>" + ssrl.bio_text(kb, s, r).split("<information>")[0] + "<information>"
        obj = kb.facts[(s, r)] if s != "e1" else "c1"  # e1's HQ recalled wrong
        script[tuple(tok.encode(prompt))] = tok.encode(f" {s} {VERBS[r]} {obj}</information>")
    model = Scripted(len(tok.raw), script, tok.special["<pad>"])
    overall, by_rel = ssrl.hop_recall_gate(model, kb, {"a0 b0", "e0", "e1"}, tok,
                                           torch.device("cpu"))
    # a0 b0: city, employer right; e0 hq right; e1 hq wrong: 3/4
    assert overall == 0.75
    assert by_rel == {"city": 1.0, "employer": 1.0, "hq": 0.5}


# --- the KV-cache sampler, pretraining and GRPO steps ---


def test_kv_cache_decoding_equals_the_full_forward_with_left_padding():
    torch.manual_seed(0)
    model = ssrl.GPT(30, 16, 2, 2, 32).eval()
    ids = torch.randint(0, 30, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # row 1 is left-padded: its first real token is at position 0
    pos = ssrl.positions(valid)  # row 1: 0 0 0 0 1 2 ...
    assert pos[1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5]
    with torch.no_grad():
        full = model(ids, pos, ssrl.full_mask(valid))  # (2, 9, V)
        cache = model.new_cache(2, 9, "cpu")
        steps = [model(ids[:, :5], pos[:, :5], ssrl.full_mask(valid[:, :5]), cache, 0)]
        for t in range(5, 9):
            steps.append(model(ids[:, t:t + 1], pos[:, t:t + 1], valid[:, None, None, :t + 1],
                               cache, t))
    inc = torch.cat(steps, 1)
    torch.testing.assert_close(inc[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(inc[1, 3:], full[1, 3:], atol=1e-5, rtol=0)


def test_generate_and_response_logp_agree_with_the_full_forward():
    kb, tok = small_world()
    torch.manual_seed(0)
    model = ssrl.GPT(len(tok.raw), 16, 1, 2, 96).eval()
    prompts = [tok.encode("<s> city of a0 b0 ?"), tok.encode("<s> employer country of a0 b1 ?")]
    rollout = ssrl.generate(model, prompts, 6, tok, torch.device("cpu"), temperature=0)
    assert rollout.Lp == len(prompts[1])
    assert rollout.valid[0, :rollout.Lp].sum() == len(prompts[0])
    logp = ssrl.response_logp(model, rollout, torch.device("cpu"))  # (2, T)
    # greedy: each generated token is the argmax, so its log-prob is the row's max log-prob
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt + rollout.seq[i, rollout.Lp:].tolist()])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids[:, :-1]), -1)[0, len(prompt) - 1:]  # (T, V)
        torch.testing.assert_close(logp[i], lp.max(-1).values, atol=1e-5, rtol=0)
        assert ids[0, len(prompt):].tolist() == lp.argmax(-1).tolist()


def test_pretraining_lowers_the_loss():
    kb, tok = small_world()
    pool = ssrl.pretraining_pool(kb, tok, ["a0 b0"])
    torch.manual_seed(0)
    model = ssrl.GPT(len(tok.raw), 32, 1, 2, 96)
    cfg = ssrl.Config(pretrain_steps=60, bio_batch=8, traj_batch=4, pack=2, pretrain_lr=3e-3)
    seqs = pool.bios + [d for plans in pool.demos.values() for ds in plans for d in ds]
    ids, valid = ssrl.pad_batch(seqs, tok.special["<pad>"], "cpu")

    def nll():
        with torch.no_grad():
            logits = model(ids[:, :-1])
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                   reduction="none")
        return float((losses * valid[:, 1:]).sum() / valid[:, 1:].sum())

    before = nll()
    unused = model.pos.weight.detach()[60:].clone()  # no sequence is longer than 55 tokens
    ssrl.pretrain(model, pool, cfg, torch.device("cpu"), tok, random.Random(0))
    assert nll() < 0.5 * before
    # AdamW with weight decay 0: a position row with zero gradient gets a zero update
    assert torch.equal(model.pos.weight.detach()[60:], unused)


def fixed_rollout(tok, prompts, texts):
    """Prompts (all one length) followed by texts[i % len(texts)], right-padded."""
    rows = [p + tok.encode(texts[i % len(texts)]) for i, p in enumerate(prompts)]
    ids, valid = ssrl.pad_batch(rows, tok.special["<pad>"], "cpu")
    return ssrl.Rollout(ids, valid, len(prompts[0]))


@pytest.mark.parametrize("info_mask", [True, False])
def test_one_grpo_step(monkeypatch, info_mask):
    """The rollout is fixed: in each group of 8, the right trajectory (r = 0.9 + 0.1 = 1.0) and a
    wrong direct answer (r = 0 + 0.1 · 0.5 = 0.05) alternate. GRPO must get Â = ±0.475 / std,
    the information tokens masked out when asked, and a step that raises Σ_i Â_i log π(y_i)."""
    kb, tok = small_world()
    torch.manual_seed(0)
    model = ssrl.GPT(len(tok.raw), 16, 1, 2, 96)
    ref = ssrl.GPT(len(tok.raw), 16, 1, 2, 96)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    right = ssrl.trajectory_text(kb, "a0 b0", ("city",))
    wrong = block(T, " done") + block(A, " c1")
    rollouts = []
    calls = []

    def fake_generate(model_, prompts, *args, **kwargs):
        rollouts.append(fixed_rollout(tok, prompts, [right, wrong]))
        return rollouts[-1]

    real_loss = ssrl.grpo_loss

    def recording_loss(logp, old_logp, ref_logp, mask, adv, **kwargs):
        calls.append((logp.detach().clone(), old_logp, ref_logp, mask, adv, kwargs))
        return real_loss(logp, old_logp, ref_logp, mask, adv, **kwargs)

    monkeypatch.setattr(ssrl, "generate", fake_generate)
    monkeypatch.setattr(ssrl, "grpo_loss", recording_loss)
    cfg = ssrl.Config(steps=1, prompts_per_step=2, group=8, max_new=30, rl_lr=1e-3, log_every=1,
                      clip_eps=0.3, kl_coef=0.01)
    history = ssrl.ssrl(model, ref, kb, [("a0 b0", "city")], cfg, tok, torch.device("cpu"),
                        info_mask, random.Random(0))
    assert history[0]["reward"] == pytest.approx((1.0 + 0.05) / 2)
    rollout = rollouts[0]
    logp, old_logp, ref_logp, mask, adv, kwargs = calls[0]
    assert kwargs == {"clip_eps": 0.3, "kl_coef": 0.01}
    # Â: mean 0.525, unbiased std of four 1.0 and four 0.05 = 0.475 · sqrt(8/7) = 0.50780
    expected = torch.tensor([1.0, -1.0] * 8) * 0.475 / (0.475 * (8 / 7) ** 0.5 + 1e-6)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(old_logp, logp)
    torch.testing.assert_close(ref_logp, logp)  # the first step starts at the reference
    resp = rollout.seq[:, rollout.Lp:]
    valid = rollout.valid[:, rollout.Lp:]
    inside = ssrl.information_mask(resp, tok.special["<information>"],
                                   tok.special["</information>"])
    assert inside[0].sum() == len(tok.encode(" a0 b0 lives in c0")) + 2
    expected_mask = (valid & ~inside) if info_mask else valid
    assert torch.equal(mask, expected_mask.float())
    with torch.no_grad():
        before = (ssrl.response_logp(ref, rollout, torch.device("cpu")) * mask).sum(1)
        after = (ssrl.response_logp(model, rollout, torch.device("cpu")) * mask).sum(1)
    assert float((adv * (after - before)).sum()) > 0
    # AdamW with weight decay 0: position rows past the rollout (zero gradient) do not move
    torch.testing.assert_close(model.pos.weight[rollout.seq.shape[1]:],
                               ref.pos.weight[rollout.seq.shape[1]:], atol=0, rtol=0)


def test_main_smoke_writes_the_issue_keys(tmp_path):
    ssrl.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [0]
    assert {"hop_recall", "copy"} <= set(results["gate"])
    for arm in ("before_rl", "after_rl", "after_rl_mask_off"):
        for group in ("heldout", "rl_people"):
            block_ = results["arms"][arm][group]
            assert list(block_["pass_at_k"]) == ["1", "2", "3", "4"]  # smoke: n_samples = 4
            assert {"greedy_em", "plan_accuracy", "by_template"} <= set(block_)
            assert set(block_["by_template"]) == set(ssrl.TEMPLATES)
    assert {"em_self", "em_real"} <= set(results["sim_to_real"]["after_rl"])
    assert "moved_people" in results["sim_to_real"]["after_rl_stale_world"]
    assert (tmp_path / "ssrl.png").exists()


def test_bad_values_exit_2(capsys):
    for argv in (["--group", "1"], ["--stale-frac", "2"], ["--n-traj", "300", "--n-heldout", "100"],
                 ["--demo-right", "1.5"]):
        with pytest.raises(SystemExit) as e:
            ssrl.main(argv)
        assert e.value.code == 2


def test_user_data_with_a_missing_hop_is_one_line(tmp_path, capsys):
    data = tmp_path / "world.jsonl"
    rows = [{"subject": "ann", "relation": "city", "object": "rome"},
            {"subject": "ann", "relation": "employer", "object": "acme"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(SystemExit) as e:
        ssrl.main(["--data", str(data), "--smoke", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "no fact" in capsys.readouterr().err


# --- seeds: the average and the headline ---


def fake_seed(before_held, after_held, after_rl_people, plan, greedy):
    def group(p1, plan_, greedy_):
        return {"pass_at_k": {"1": p1}, "plan_accuracy": plan_, "greedy_em": greedy_}

    return {"arms": {"before_rl": {"heldout": group(before_held, 0.2, 0.3),
                                   "rl_people": group(0.3, 0.2, 0.3)},
                     "after_rl": {"heldout": group(after_held, plan, greedy),
                                  "rl_people": group(after_rl_people, plan, greedy)}}}


def test_headline_mean_std_and_worst_seed():
    seeds = [fake_seed(0.3, 0.8, 0.9, 0.7, 0.9), fake_seed(0.2, 0.4, 0.7, 0.5, 0.6)]
    out = ssrl.headline(seeds)
    # gains 0.5 and 0.2: mean 0.35, population std 0.15, worst (smallest) 0.2
    assert out["heldout_pass1_gain"]["per_seed"] == pytest.approx([0.5, 0.2])
    assert out["heldout_pass1_gain"]["mean"] == pytest.approx(0.35)
    assert out["heldout_pass1_gain"]["std"] == pytest.approx(0.15)
    assert out["heldout_pass1_gain"]["worst"] == pytest.approx(0.2)
    assert out["heldout_plan_accuracy"]["worst"] == 0.5
    assert out["heldout_greedy_em"]["mean"] == pytest.approx(0.75)
    # RL people ahead of held-out: 0.1 and 0.3; the worst is the largest lead
    assert out["rl_people_lead"]["per_seed"] == pytest.approx([0.1, 0.3])
    assert out["rl_people_lead"]["worst"] == pytest.approx(0.3)


def test_average_over_seeds_is_recursive_and_keeps_none():
    seeds = [{"a": 1.0, "b": {"c": 2.0, "d": None}}, {"a": 3.0, "b": {"c": 4.0, "d": 1.0}}]
    out = ssrl.average(seeds)
    assert out == {"a": 2.0, "b": {"c": 3.0, "d": None}}


def test_user_data_runs_the_whole_pipeline(tmp_path):
    # five-word names: a packed sequence of four person bio lines (4 × 26 + 1 tokens) is longer
    # than the 96 positions the model would have without sizing them to the longest bio × pack
    triples = [(s + " van der berg" if r in ("city", "employer") else s, r, o)
               for s, r, o in ssrl.synthetic_triples(30, 5, 3, 4, random.Random(0))]
    data = tmp_path / "world.jsonl"
    rows = [{"subject": s, "relation": r, "object": o} for s, r, o in triples]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ssrl.main(["--data", str(data), "--smoke", "--out", str(tmp_path / "o")])
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["per_seed"][0]["n_params"] > 0
    cfg = ssrl.Config(data=str(data))
    kb = ssrl.load_world(cfg, random.Random(0))
    assert kb.facts == {(s, r): o for s, r, o in triples}
    assert len(ssrl.people_of(kb)) == 30


# --- survivors of mutate.py, killed by behaviour ---


def test_every_vocabulary_word_is_one_token():
    kb, tok = small_world()
    for word in ["of", "?", "a0", "b1", "c0", "k1", "e0", "hq", "employer", "country", "done"]:
        assert len(tok.encode(" " + word)) == 1, word
        assert len(tok.encode(word)) == 1, word


def test_gpt2_init_and_causal_prefill_of_two_tokens():
    torch.manual_seed(0)
    model = ssrl.GPT(500, 64, 1, 2, 32)
    std = float(model.tok.weight.detach().std())
    assert abs(std - 0.02) < 0.002  # N(0, 0.02)
    ids = torch.tensor([[3, 4]])
    with torch.no_grad():
        two = model(ids)  # (1, 2, V): causal, so position 0 must not see token 1
        one = model(ids[:, :1])
    torch.testing.assert_close(two[:, 0], one[:, 0], atol=1e-5, rtol=0)


def test_generate_writes_exactly_max_new_tokens_when_it_never_stops():
    kb, tok = small_world()
    prompt = tok.encode("<s> city of a0 b0 ?")
    model = Scripted(len(tok.raw), {tuple(prompt): tok.encode(" of" * 30)}, tok.special["<pad>"])
    rollout = ssrl.generate(model, [prompt], 7, tok, torch.device("cpu"), temperature=0)
    assert rollout.seq.shape[1] == len(prompt) + 7
    assert ssrl.decode_responses(tok, rollout) == [" of" * 7]


def test_generate_stops_when_every_row_has_answered():
    # row 0 answers in 6 tokens, row 1 in 9 (same prompt length): the rollout ends at row 1's
    # </answer>, row 0 is padding (not valid) after its own
    kb, tok = small_world()
    p0, p1 = tok.encode("<s> city of a0 b0 ?"), tok.encode("<s> city of a0 b1 ?")
    r0 = tok.encode("<think> done</think><answer> c0</answer>")
    r1 = tok.encode("<think> done</think><think> done</think><answer> c1</answer>")
    assert (len(r0), len(r1)) == (6, 9)
    model = Scripted(len(tok.raw), {tuple(p0): r0, tuple(p1): r1}, tok.special["<pad>"])
    rollout = ssrl.generate(model, [p0, p1], 20, tok, torch.device("cpu"), temperature=0)
    assert rollout.seq.shape[1] == len(p0) + 9
    assert rollout.valid[:, len(p0):].sum(1).tolist() == [6, 9]
    assert ssrl.decode_responses(tok, rollout) == [tok.decode(r0), tok.decode(r1)]


def test_grpo_kl_estimate_is_clamped_to_ten():
    # Â = 0, u = ref − logp = 30 → clamped to 20 → e^20 − 21, then the estimate clamped to 10
    zero = torch.zeros(1, 1)
    loss, _ = ssrl.grpo_loss(zero, zero, zero + 30, torch.ones(1, 1), torch.zeros(1), kl_coef=1.0)
    torch.testing.assert_close(loss, torch.tensor(10.0))


def test_the_control_arm_runs_with_the_mask_off(monkeypatch, tmp_path):
    seen = []
    rl_people = []
    evaluated = []
    real_ssrl = ssrl.ssrl
    real_evaluate = ssrl.evaluate

    def recording(model, ref, kb, questions, cfg, tok, device, info_mask, rng):
        seen.append(info_mask)
        rl_people.append({p for p, _ in questions})
        assert len(questions) == 4 * len(rl_people[-1])  # every template of every RL person
        return real_ssrl(model, ref, kb, questions, cfg, tok, device, info_mask, rng)

    def recording_evaluate(model, kb, eval_people, all_people, *args):
        evaluated.append((list(eval_people), list(all_people)))
        return real_evaluate(model, kb, eval_people, all_people, *args)

    monkeypatch.setattr(ssrl, "ssrl", recording)
    monkeypatch.setattr(ssrl, "evaluate", recording_evaluate)
    ssrl.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert seen == [True, False]
    # smoke split of 36 people: 12 with demonstrations, 8 held out, the other 16 for RL
    assert rl_people[0] == rl_people[1] and len(rl_people[0]) == 16
    assert len(evaluated) == 6  # before RL, mask on, mask off; held out and RL people each
    (held_few, held_all), (rl_few, rl_all) = evaluated[0], evaluated[1]
    assert len(held_all) == 8 and held_few == held_all[:4]  # smoke n_eval = 4
    assert set(rl_all) == rl_people[0] and rl_few == rl_all[:4]
    assert not set(held_all) & rl_people[0]


def test_pretraining_loss_is_the_mean_nll_over_real_tokens(monkeypatch):
    # at GPT-2 init the logits are near 0 (std ~0.02 · sqrt(32) ≈ 0.1), so the mean next-token
    # loss over real tokens is log V = log 58 ≈ 4.06 (+ var/2 ≈ 0.006); a sum, or a mean that
    # also counts the padding, would be far off
    kb, tok = small_world()
    pool = ssrl.pretraining_pool(kb, tok, ["a0 b0"])
    torch.manual_seed(0)
    model = ssrl.GPT(len(tok.raw), 32, 1, 2, 96)
    seen = []
    monkeypatch.setattr(ssrl, "check_finite", lambda step, **terms: seen.append(terms))
    cfg = ssrl.Config(pretrain_steps=1, bio_batch=8, traj_batch=4, pack=2)
    ssrl.pretrain(model, pool, cfg, torch.device("cpu"), tok, random.Random(0))
    assert len(tok.raw) == 58
    assert len(seen) == 1  # one step
    assert seen[0]["pretrain_loss"] == pytest.approx(math.log(58), abs=0.05)


def test_grpo_kl_log_ratio_is_clamped_before_the_exponential():
    # u = 100: unclamped, e^100 = inf in float32 and the clamped estimate's zero gradient times
    # inf is NaN; clamped to 20 first, the loss is 10 and the gradient exactly 0
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, _ = ssrl.grpo_loss(logp, logp.detach(), torch.full((1, 1), 100.0), torch.ones(1, 1),
                             torch.zeros(1), kl_coef=1.0)
    torch.testing.assert_close(loss, torch.tensor(10.0))
    loss.backward()
    assert logp.grad.item() == 0.0


def test_greedy_generation_without_padding_equals_the_full_forward():
    # one prompt (no padding): the sampler runs unmasked, one new token per step with the cache;
    # each greedy token must be the argmax of the full causal forward
    kb, tok = small_world()
    torch.manual_seed(1)
    model = ssrl.GPT(len(tok.raw), 16, 2, 2, 96).eval()
    prompt = tok.encode("<s> employer country of a0 b1 ?")
    rollout = ssrl.generate(model, [prompt, prompt], 8, tok, torch.device("cpu"), temperature=0)
    assert rollout.Lp == len(prompt) and bool(rollout.valid.all())
    ids = rollout.seq[:1]
    with torch.no_grad():
        full = model(ids[:, :-1])[0, len(prompt) - 1:]  # (T, V)
    assert ids[0, len(prompt):].tolist() == full.argmax(-1).tolist()
    assert torch.equal(rollout.seq[0], rollout.seq[1])
    # the same unmasked path by hand: prefill 5 tokens, then one token at a time with no mask;
    # a new token attends to every cached key, not only the first
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, ids.shape[1], "cpu")
        steps = [model(ids[:, :5], None, None, cache, 0)]
        for t in range(5, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], torch.tensor([[t]]), None, cache, t))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_run_averages_consecutive_seeds(monkeypatch, tmp_path):
    seen = []

    def fake_run_seed(cfg, seed, device):
        seen.append(seed)
        out = fake_seed(0.2, 0.2 + 0.1 * (seed - 5), 0.5, 0.5, 0.5)
        return {"seed": seed, "gate": {"hop_recall": float(seed)},
                "arms": out["arms"], "sim_to_real": {"after_rl": {"em_self": 0.1 * seed}}}

    monkeypatch.setattr(ssrl, "run_seed", fake_run_seed)
    monkeypatch.setattr(ssrl, "print_table", lambda results: None)
    monkeypatch.setattr(ssrl, "plot", lambda results, path: None)
    results = ssrl.run(ssrl.Config(seed=5, n_seeds=3, device="cpu", out=str(tmp_path)))
    assert seen == [5, 6, 7] and results["seeds"] == [5, 6, 7]
    assert results["gate"]["hop_recall"] == pytest.approx(6.0)  # (5 + 6 + 7) / 3
    assert results["sim_to_real"]["after_rl"]["em_self"] == pytest.approx(0.6)
    # held-out gains 0.0, 0.1, 0.2: mean 0.1, worst 0.0
    assert results["headline"]["heldout_pass1_gain"]["mean"] == pytest.approx(0.1)
    assert results["headline"]["heldout_pass1_gain"]["worst"] == pytest.approx(0.0)
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [5, 6, 7]


def test_block_residuals_add_attention_and_mlp():
    # every weight 0: q = k = v = 0, attention output 0, proj(0) = its bias 1, mlp(·) = its last
    # bias 2; so the block returns x + 1 + 2
    block_ = ssrl.Block(4, 2)
    with torch.no_grad():
        for p in block_.parameters():
            p.zero_()
        block_.proj.bias.fill_(1.0)
        block_.mlp[2].bias.fill_(2.0)
    x = torch.arange(12.0).view(1, 3, 4)
    torch.testing.assert_close(block_(x, None, None, 0), x + 3)


def test_gpt_adds_token_and_position_embeddings():
    # d = 2, blocks all zero (identity); LayerNorm of [a, b] is ±[1, −1] by the sign of a − b;
    # logits = LN(x) · tok rows [1, 0], [0, 1]. Token 1 at position 0: x = [0, 1] → [−1, 1];
    # at position 1: x = [0, 1] + [2, 0] = [2, 1] → [1, −1]
    model = ssrl.GPT(2, 2, 1, 1, 2)
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.zero_()
        model.tok.weight.copy_(torch.eye(2))
        model.pos.weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    with torch.no_grad():
        out = model(torch.tensor([[1, 1]]))
    torch.testing.assert_close(out, torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]]), atol=1e-4, rtol=0)


def test_grpo_lower_clip_and_clip_fraction():
    # token 0: ρ = e^−0.5 = 0.6065 < 0.8 with Â = −1: max(0.6065, 0.8) = 0.8, constant: no gradient
    # token 1: ρ = 1: pg = 1, gradient −Â/2 = 0.5. clip_frac = 1/2; pg_loss = (0.8 + 1) / 2 = 0.9
    logp = torch.tensor([[-0.5, 0.0]], requires_grad=True)
    loss, terms = ssrl.grpo_loss(logp, torch.zeros(1, 2), logp.detach(), torch.ones(1, 2),
                                 torch.tensor([-1.0]), kl_coef=0.0)
    torch.testing.assert_close(loss, torch.tensor(0.9))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.5]]))
    assert terms["clip_frac"].item() == pytest.approx(0.5)


def test_grpo_kl_is_a_token_mean_of_k3():
    # u = ref − logp = [0.5, 30]: k3 = e^0.5 − 0.5 − 1 = 0.148721 and (clamped) 10;
    # a masked third token (u = 1) does not count: kl = (0.148721 + 10) / 2 = 5.074361;
    # Â = 0, so loss = β · kl = 0.5 · 5.074361
    logp = torch.tensor([[-0.5, -1.0, 0.0]])
    ref = torch.tensor([[0.0, 29.0, 1.0]])
    loss, terms = ssrl.grpo_loss(logp, logp, ref, torch.tensor([[1.0, 1.0, 0.0]]), torch.zeros(1),
                                 kl_coef=0.5)
    torch.testing.assert_close(terms["kl"], torch.tensor(5.074361))
    torch.testing.assert_close(loss, torch.tensor(0.5 * 5.074361))


def test_group_normalize_epsilon_and_single_samples():
    # rewards 0 and 2e-6: mean 1e-6, unbiased std 1.41421e-6; Â = ±1e-6 / (1.41421e-6 + 1e-6)
    adv = ssrl.group_normalize(torch.tensor([[0.0, 2e-6]], dtype=torch.float64))
    torch.testing.assert_close(adv, torch.tensor([[-0.414214, 0.414214]], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    # G = 1: mean 0, std 1, as verl: Â = r / (1 + 1e-6)
    one = ssrl.group_normalize(torch.tensor([[0.5], [2.0]]))
    torch.testing.assert_close(one, torch.tensor([[0.5], [2.0]]) / (1 + 1e-6))
    torch.testing.assert_close(ssrl.group_normalize(torch.full((1, 3), 0.7)), torch.zeros(1, 3))


def test_greedy_parts_are_greedy_on_a_hesitant_model():
    # the scripted token gets logit 3, the other 57 tokens 0: it is the argmax, but a sample at
    # T = 1 picks it only e^3 / (e^3 + 57) = 26% of the time, so a sampled answer is all but never
    # whole. Greedy EM and the hop-recall gate must read the greedy answers.
    kb, tok = small_world()
    torch.manual_seed(0)
    model = scripted_model(kb, tok, fixed_responses(kb))
    model.logit = 3.0
    cfg = ssrl.Config(n_samples=1, max_new=60)
    out = ssrl.evaluate(model, kb, ["a0 b0"], ["a0 b0", "a0 b1"], cfg, tok, torch.device("cpu"))
    assert out["greedy_em"] == pytest.approx(5 / 8)
    assert out["greedy_plan_accuracy"] == pytest.approx(6 / 8)
    assert out["pass_at_k"]["1"] < 0.5  # the sampled answers of a0 b0 (greedy: 4 of 4 right)
    script = {}
    for (s, r) in kb.facts:
        prompt = "<s>" + ssrl.bio_text(kb, s, r).split("<information>")[0] + "<information>"
        script[tuple(tok.encode(prompt))] = tok.encode(f" {s} {VERBS[r]} {kb.facts[(s, r)]}"
                                                       "</information>")
    gate = Scripted(len(tok.raw), script, tok.special["<pad>"])
    gate.logit = 3.0
    overall, _ = ssrl.hop_recall_gate(gate, kb, {"a0 b0", "e0", "e1"}, tok, torch.device("cpu"))
    assert overall == 1.0


@pytest.mark.parametrize("hop, copy_, passed", [(0.95, 0.85, True), (0.94, 0.85, False),
                                                (0.95, 0.84, False)])
def test_gates_pass_at_their_thresholds(monkeypatch, hop, copy_, passed):
    # the gates: held-out hop recall >= 0.95 and copy >= 0.85, both needed (training is faked)
    monkeypatch.setattr(ssrl, "pretrain", lambda *args: None)
    monkeypatch.setattr(ssrl, "ssrl", lambda *args: [])
    monkeypatch.setattr(ssrl, "hop_recall_gate", lambda *args: (hop, {"city": hop}))
    monkeypatch.setattr(ssrl, "evaluate", lambda *args: {
        "pass_at_k": {"1": 0.0}, "plan_accuracy": 0.0, "greedy_em": 0.0, "copy": copy_})
    monkeypatch.setattr(ssrl, "sim_to_real", lambda *args: {"em_self": 0.0, "em_real": 0.0})
    cfg = ssrl.Config(n_people=36, n_traj=12, n_heldout=8, n_cities=6, n_employers=4, d_model=16,
                      n_layer=1, n_head=2)
    out = ssrl.run_seed(cfg, 0, torch.device("cpu"))
    assert out["gate"]["hop_recall"] == hop and out["gate"]["copy"] == copy_
    assert out["gate"]["passed"] is passed
