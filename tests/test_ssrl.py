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
    "think between the second search and its information": block(T, "a") + block(S, "q")
    + block(I, "f") + block(S, "r") + block(T, "b") + block(I, "g") + block(T, "c")
    + block(A, "p"),
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
    # a stray close closes nothing: [c, 1, o, 2, c, 3] → 001110 (not 000000)
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
    """Writes a fixed response per prompt: logit 50 on the scripted next token, 0 elsewhere; an
    unknown prompt gets `default` (a bare </information>)."""

    def __init__(self, vocab, script, pad, default=()):
        super().__init__()
        self.vocab = vocab
        self.script = script  # prompt ids (tuple, without padding) → response ids
        self.pad = pad
        self.default = list(default) or [0]
        self.blocks = [None]  # one KVCache: it counts the tokens seen so far
        self.dummy = nn.Parameter(torch.zeros(1))
        self.logit = 50.0  # on the scripted next token; every other token gets 0

    def forward(self, idx, pos=None, attn_mask=None, cache=None):
        B, T = idx.shape
        past = 0 if cache[0].k is None else cache[0].k.shape[2]
        if past == 0:
            cache[0].rows = [tuple(t for t in row if t != self.pad) for row in idx.tolist()]
            cache[0].Lp = T
        cache[0].append(torch.zeros(B, 1, T, 1), torch.zeros(B, 1, T, 1))
        logits = torch.zeros(B, T, self.vocab)
        at = past + T - cache[0].Lp  # index of the response token to write next
        for i, row in enumerate(cache[0].rows):
            response = self.script.get(row, self.default)
            logits[i, -1, response[min(at, len(response) - 1)]] = self.logit
        return logits


def scripted_model(kb, tok, responses):
    """responses: (person, template) → response text."""
    script = {}
    for (person, template), text in responses.items():
        prompt = tuple(tok.encode("<s> " + ssrl.prompt_text(person, template)))
        script[prompt] = tok.encode(text)
    return Scripted(len(tok.raw), script, tok.special["<pad>"], tok.encode("</information>"))


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


def bio_script(kb, tok, wrong=()):
    """The bio-form recall prompts of every fact → the true fact line (a subject in `wrong`
    recalls c1 instead)."""
    script = {}
    for (s, r) in kb.facts:
        prompt = "<s>" + ssrl.bio_text(kb, s, r).split("<information>")[0] + "<information>"
        obj = "c1" if s in wrong else kb.facts[(s, r)]
        script[tuple(tok.encode(prompt))] = tok.encode(f" {s} {VERBS[r]} {obj}</information>")
    return script


def test_evaluate_a_model_with_fixed_answers():
    kb, tok = small_world()
    model = scripted_model(kb, tok, fixed_responses(kb))
    model.script.update(bio_script(kb, tok, wrong={"e1"}))
    cfg = ssrl.Config(n_samples=3, max_new=60)
    out = ssrl.evaluate(model, kb, ["a0 b0", "a0 b1"], ["a0 b0", "a0 b1"], cfg, tok,
                        torch.device("cpu"), {"e1"})
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
    assert out["hop_recall_sampled"] == pytest.approx(8 / 11)
    assert out["hop_recall_sampled_by_relation"] == {
        "city": 1.0, "country": 1.0, "employer": pytest.approx(2 / 5), "hq": 1.0}
    # greedy recall with the right query: 4 person facts right, e1's HQ wrong (c1 for c0): 4/5
    assert out["hop_recall"] == pytest.approx(4 / 5)
    assert out["hop_recall_by_relation"] == {"city": 1.0, "employer": 1.0, "hq": 0.0}
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
    # a0 b1 writes a false fact (e0); the real lookup pastes e1, but the scripted answer stays
    # e0, so EM stays 0; with the right chain for a0 b0 both are right
    model = scripted_model(kb, tok, fixed_responses(kb))
    questions = [("a0 b0", "employer"), ("a0 b1", "employer")]
    out = ssrl.em_self_and_real(model, kb, questions, 2, tok, torch.device("cpu"), 60)
    assert out["em_self"] == 0.5
    assert out["em_real"] == 0.5
    assert out["hop_recall_self"] == 0.5
    real = ssrl.sample_scores(model, kb, questions, 1, tok, torch.device("cpu"), 60,
                              search=kb.search)
    assert real[1]["hops"] == [("employer", True)]  # the pasted block is the true fact
    assert real[1]["follows"] is False


def test_sim_to_real_blocks_greedy_sampled_and_stale():
    kb, tok = small_world()
    model = scripted_model(kb, tok, fixed_responses(kb))
    world = ssrl.World(kb, tok, None, [], ["a0 b0", "a0 b1"], [], {"e0", "e1"})
    cfg = ssrl.Config(n_eval=1, n_small=2, max_new=60, stale_frac=1.0)
    out = ssrl.sim_to_real(model, world, cfg, torch.device("cpu"), 0)
    # greedy over both people: 5 of 8 right with its own information, and with the lookup
    assert out["heldout"]["greedy_em_self"] == pytest.approx(5 / 8)
    assert out["heldout"]["greedy_em"] == pytest.approx(5 / 8)
    assert out["heldout"]["em_self"] == 1.0  # n_eval = 1: a0 b0 only, all right
    # stale world: a0 b0 moved city, so its city and country answers (c0, k0) are now wrong
    assert out["stale_world"]["moved_people"] == 1
    assert out["stale_world"]["em_self"] == 0.5
    assert out["stale_world"]["em_real"] == 0.5


def test_the_stale_world_is_drawn_from_seed_plus_3(monkeypatch):
    kb, tok = small_world()
    model = scripted_model(kb, tok, fixed_responses(kb))
    world = ssrl.World(kb, tok, None, [], ["a0 b0", "a0 b1"], [], {"e0", "e1"})
    real_stale_kb = ssrl.stale_kb
    seen = []

    def spy(kb_, people, frac, rng):
        seen.append((people, frac, rng.getstate()))
        return real_stale_kb(kb_, people, frac, rng)

    monkeypatch.setattr(ssrl, "stale_kb", spy)
    cfg = ssrl.Config(n_eval=1, n_small=1, max_new=60, stale_frac=0.25)
    ssrl.sim_to_real(model, world, cfg, torch.device("cpu"), 7)
    assert seen == [(["a0 b0"], 0.25, random.Random(10).getstate())]


def test_hop_recall_gate_reads_the_information_block():
    kb, tok = small_world()
    model = Scripted(len(tok.raw), bio_script(kb, tok, wrong={"e1"}), tok.special["<pad>"])
    overall, by_rel = ssrl.hop_recall_gate(model, kb, {"a0 b0", "e0", "e1"}, tok,
                                           torch.device("cpu"))
    # a0 b0: city, employer right; e0 hq right (c1 is its true HQ); e1 hq wrong: 3/4
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
        cache = [ssrl.KVCache() for _ in model.blocks]
        steps = [model(ids[:, :5], pos[:, :5], ssrl.full_mask(valid[:, :5]), cache)]
        for t in range(5, 9):
            steps.append(model(ids[:, t:t + 1], pos[:, t:t + 1], valid[:, None, None, :t + 1],
                               cache))
    assert cache[0].k.shape == (2, 2, 9, 8)  # (B, nh, T, hs)
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
    logp = ssrl.response_logp(model, rollout)  # (2, T)
    # greedy: each generated token is the argmax, so its log-prob is the row's max log-prob
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt + rollout.seq[i, rollout.Lp:].tolist()])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids[:, :-1]), -1)[0, len(prompt) - 1:]  # (T, V)
        torch.testing.assert_close(logp[i], lp.max(-1).values, atol=1e-5, rtol=0)
        assert ids[0, len(prompt):].tolist() == lp.argmax(-1).tolist()


def test_pretraining_lowers_the_loss(capsys):
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
    capsys.readouterr()
    ssrl.pretrain(model, pool, cfg, torch.device("cpu"), tok, random.Random(0))
    # a log line every 60 // 4 = 15 steps
    logged = [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().out.splitlines()]
    assert logged == [15, 30, 45, 60]
    assert nll() < 0.5 * before
    # AdamW with weight decay 0: a position row with zero gradient gets a zero update
    assert torch.equal(model.pos.weight.detach()[60:], unused)


def fixed_rollout(tok, prompts, texts):
    """Prompts (all one length) followed by texts[i % len(texts)], right-padded."""
    rows = [p + tok.encode(texts[i % len(texts)]) for i, p in enumerate(prompts)]
    ids, valid = ssrl.pad_batch(rows, tok.special["<pad>"], "cpu")
    return ssrl.Rollout(ids, valid, len(prompts[0]))


def no_probe(policy):
    return {}


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
    arm = ssrl.Arm(info_mask=info_mask, anchored=False)
    curve = ssrl.ssrl(model, ref, kb, [("a0 b0", "city")], cfg, tok, torch.device("cpu"), arm,
                      random.Random(0), no_probe, {})
    assert [point["step"] for point in curve] == [0, 1]
    assert curve[1]["reward"] == pytest.approx((1.0 + 0.05) / 2)
    rollout = rollouts[0]
    logp, old_logp, ref_logp, mask, adv, kwargs = calls[0]
    assert kwargs == {"clip_eps": 0.3, "kl_coef": 0.01}
    # Â: mean 0.525, unbiased std of four 1.0 and four 0.05 = 0.475 · sqrt(8/7) = 0.50780
    expected = torch.tensor([1.0, -1.0] * 8) * 0.475 / (0.475 * (8 / 7) ** 0.5 + 1e-6)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(old_logp, logp)
    torch.testing.assert_close(ref_logp, logp)  # the first step starts at the reference
    assert curve[1]["info_kl"] == 0.0  # π_θ = π_ref when the loss is taken
    resp = rollout.seq[:, rollout.Lp:]
    valid = rollout.valid[:, rollout.Lp:]
    inside = ssrl.information_mask(resp, tok.special["<information>"],
                                   tok.special["</information>"])
    assert inside[0].sum() == len(tok.encode(" a0 b0 lives in c0")) + 2
    expected_mask = (valid & ~inside) if info_mask else valid
    assert torch.equal(mask, expected_mask.float())
    with torch.no_grad():
        before = (ssrl.response_logp(ref, rollout) * mask).sum(1)
        after = (ssrl.response_logp(model, rollout) * mask).sum(1)
    assert float((adv * (after - before)).sum()) > 0
    # AdamW with weight decay 0: position rows past the rollout (zero gradient) do not move
    torch.testing.assert_close(model.pos.weight[rollout.seq.shape[1]:],
                               ref.pos.weight[rollout.seq.shape[1]:], atol=0, rtol=0)


def test_information_kl_is_a_token_mean_of_k3_over_the_information_tokens():
    # u = ref − logp = [0.5, 30, 1]: k3 = e^0.5 − 0.5 − 1 = 0.148721, (clamped) 10, and
    # e − 2 = 0.718282 on a token outside the information: (0.148721 + 10) / 2 = 5.074361
    logp = torch.tensor([[-0.5, -1.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 29.0, 1.0]])
    kl = ssrl.information_kl(logp, ref, torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor(5.074361))
    kl.backward()
    # ∂k3/∂logp = 1 − e^u on the first token (/2 for the mean): (1 − e^0.5) / 2 = −0.324361;
    # the clamped token and the one outside get none
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.324361, 0.0, 0.0]]))
    assert ssrl.information_kl(logp, ref, torch.zeros(1, 3)).item() == 0.0  # no information
    with pytest.raises(ValueError):
        ssrl.information_kl(logp, ref, torch.ones(3))


def anchor_run(monkeypatch, anchored):
    """Six GRPO steps with the mask on, on a fixed rollout where a wrong trajectory (its
    information block wrong, r = 0.1) and the right one (r = 1) alternate; lr 3e-2 so the
    shared weights move. Returns the information tokens' k3 KL to π_ref afterwards."""
    kb, tok = small_world()
    torch.manual_seed(0)
    policy = ssrl.GPT(len(tok.raw), 16, 1, 2, 96)
    ref = ssrl.GPT(len(tok.raw), 16, 1, 2, 96)
    ref.load_state_dict(policy.state_dict())
    ref.requires_grad_(False)
    right = ssrl.trajectory_text(kb, "a0 b0", ("city",))
    wrong = block(T, " city") + hop("a0 b0", "city", "c1") + block(T, " done") + block(A, " c1")
    rollouts = []

    def fake_generate(model_, prompts, *args, **kwargs):
        rollouts.append(fixed_rollout(tok, prompts, [right, wrong]))
        return rollouts[-1]

    monkeypatch.setattr(ssrl, "generate", fake_generate)
    cfg = ssrl.Config(steps=6, prompts_per_step=2, group=4, max_new=40, rl_lr=3e-2, log_every=6,
                      info_kl_coef=1.0)
    arm = ssrl.Arm(info_mask=True, anchored=anchored)
    ssrl.ssrl(policy, ref, kb, [("a0 b0", "city")], cfg, tok, torch.device("cpu"), arm,
              random.Random(0), no_probe, {})
    rollout = rollouts[0]
    resp = rollout.seq[:, rollout.Lp:]
    inside = ssrl.information_mask(resp, tok.special["<information>"],
                                   tok.special["</information>"]) & rollout.valid[:, rollout.Lp:]
    with torch.no_grad():
        return float(ssrl.information_kl(ssrl.response_logp(policy, rollout),
                                         ssrl.response_logp(ref, rollout), inside.float()))


def test_the_anchor_keeps_the_information_tokens_near_the_reference(monkeypatch):
    # the mask gives the information tokens no gradient, but the updates of the other tokens move
    # them; the anchor pulls them back: their KL to π_ref stays well below the unanchored run's
    unanchored = anchor_run(monkeypatch, anchored=False)
    anchored = anchor_run(monkeypatch, anchored=True)
    assert unanchored > 0.01
    assert anchored < 0.5 * unanchored


def test_recall_probe_leaves_the_training_noise_alone():
    kb, tok = small_world()
    torch.manual_seed(0)
    model = ssrl.GPT(len(tok.raw), 16, 1, 2, 96)
    world = ssrl.World(kb, tok, None, [], ["a0 b0", "a0 b1"], [], {"e0"})
    probe = ssrl.recall_probe(world, ssrl.Config(max_new=20), torch.device("cpu"), 5)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = probe(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert probe(model) == first  # its own seed: the same samples each time
    scripted = scripted_model(kb, tok, fixed_responses(kb))
    scripted.script.update(bio_script(kb, tok, wrong={"a0 b1"}))
    out = ssrl.recall_probe(world, ssrl.Config(max_new=60), torch.device("cpu"), 5)(scripted)
    # greedy: facts of a0 b0 (2), a0 b1 (2, both recalled as c1: the city is right) and e0's HQ:
    # a0 b1's employer is wrong: 4/5. sampled: a0 b0 7 hops right, a0 b1 1 of 4: 8/11
    assert out == {"greedy": pytest.approx(4 / 5), "sampled": pytest.approx(8 / 11)}


def test_bad_values_exit_2(capsys):
    for argv in (["--group", "1"], ["--stale-frac", "2"], ["--n-traj", "300", "--n-heldout", "100"],
                 ["--demo-right", "1.5"], ["--info-kl-coef", "-1"]):
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


# --- seeds, the record and its report ---


def groups(held_p1, rl_p1, recall=0.95, sampled=0.92, plan=0.8, greedy=0.9):
    """One seed's evaluation of the two groups (only what seed_metrics and render_report read)."""
    def group(p1):
        return {"pass_at_k": {"1": p1, "2": min(1.0, 2 * p1)}, "plan_accuracy": plan,
                "greedy_em": greedy, "hop_recall": recall, "hop_recall_sampled": sampled,
                "copy": 0.99, "format_rate": 1.0, "answer_follows_information": 0.97,
                "hop_recall_by_relation": {"city": recall},
                "hop_recall_sampled_by_relation": {r: sampled for r in VERBS},
                "by_template": {t: {"pass_at_1": p1} for t in ssrl.TEMPLATES}}
    return {"heldout": group(held_p1), "rl_people": group(rl_p1)}


def test_seed_metrics_by_hand():
    out = ssrl.seed_metrics(groups(0.2, 0.25), groups(0.7, 0.8, recall=0.93, sampled=0.91))
    # gain 0.7 − 0.2 = 0.5; RL people ahead by 0.8 − 0.7 = 0.1
    assert out == {"pass_at_1": 0.7, "pass_at_1_gain": pytest.approx(0.5), "hop_recall": 0.93,
                   "hop_recall_sampled": 0.91, "plan_accuracy": 0.8, "greedy_em": 0.9,
                   "rl_people_lead": pytest.approx(0.1)}


def test_average_over_seeds_is_recursive_and_keeps_none():
    seeds = [{"a": 1.0, "b": {"c": 2.0, "d": None}}, {"a": 3.0, "b": {"c": 4.0, "d": 1.0}}]
    out = ssrl.average(seeds)
    assert out == {"a": 2.0, "b": {"c": 3.0, "d": None}}


def sim_block(own, real):
    held = {"em_self": own, "em_real": real, "greedy_em_self": own, "greedy_em": real,
            "hop_recall_self": 0.9, "plan_accuracy_self": 0.8, "plan_accuracy_real": 0.9}
    return {"heldout": held, "stale_world": {**held, "moved_people": 5}}


def hand_jobs(gains, recalls, leads, unanchored_recall=0.6):
    """Fake job outputs: before RL held-out pass@1 0.2 in every seed; SSRL with the given
    per-seed gains, sampled recalls and RL-people leads."""
    pretrained = []
    trained = []
    for seed, (gain, recall, lead) in enumerate(zip(gains, recalls, leads)):
        gate = {"hop_recall": 1.0, "copy": 0.99, "hop_recall_by_relation": {}, "passed": True}
        pretrained.append({"seed": seed, "n_params": 1000, "gate": gate, "cpu_s": 1.0,
                           "groups": groups(0.2, 0.2), "sim_to_real": sim_block(0.3, 0.7)})
        arms = {"after_rl": groups(0.2 + gain, 0.2 + gain + lead, sampled=recall),
                "unanchored": groups(0.3, 0.3, sampled=unanchored_recall),
                "mask_off": groups(0.8, 0.95)}
        for name, out in arms.items():
            curve = [{"step": 0, "greedy": 1.0, "sampled": 0.95},
                     {"step": 5, "greedy": 0.9, "sampled": recall, "info_kl": 0.1}]
            trained.append({"seed": seed, "arm": name, "groups": out, "cpu_s": 2.0,
                            "sim_to_real": sim_block(0.5, 0.9), "recall_curve": curve})
    return pretrained, trained


def hand_results(gains, recalls, leads, unanchored_recall=0.6):
    """A results dict built by collect() from hand_jobs."""
    pretrained, trained = hand_jobs(gains, recalls, leads, unanchored_recall)
    results = ssrl.collect(ssrl.Config(), pretrained, trained)
    results["wall_s"] = 10.0
    return results


def test_run_trains_consecutive_seeds_and_every_arm_from_each(monkeypatch, tmp_path):
    pretrained, trained = hand_jobs([0.5, 0.3, 0.4], [0.95, 0.91, 0.93], [0.0, 0.1, 0.12])
    seen = []

    def fake_pretrain_seed(job):
        return {**pretrained[job.seed - 5], "seed": job.seed, "weights": {"w": job.seed}}

    def fake_train_arm(job):
        seen.append((job.seed, job.arm, job.weights))
        index = (job.seed - 5) * 3 + list(ssrl.ARMS).index(job.arm)
        return {**trained[index], "seed": job.seed}

    monkeypatch.setattr(ssrl, "pretrain_seed", fake_pretrain_seed)
    monkeypatch.setattr(ssrl, "train_arm", fake_train_arm)
    results = ssrl.run(ssrl.Config(seed=5, n_seeds=3, device="cpu", workers=1, out=str(tmp_path)))
    assert results["seeds"] == [5, 6, 7]
    assert seen == [(s, arm, {"w": s}) for s in (5, 6, 7) for arm in ssrl.ARMS]
    assert results["arms"]["after_rl"]["per_seed"][1]["pass_at_1_gain"] == pytest.approx(0.3)
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [5, 6, 7]
    assert (tmp_path / "results.md").read_text() == ssrl.render_report(results)


def test_collect_means_per_seed_and_curves():
    results = hand_results([0.5, 0.3, 0.4], [0.95, 0.91, 0.93], [0.0, 0.1, -0.05])
    assert results["seeds"] == [0, 1, 2]
    gains = [s["pass_at_1_gain"] for s in results["arms"]["after_rl"]["per_seed"]]
    assert gains == pytest.approx([0.5, 0.3, 0.4])
    assert results["arms"]["after_rl"]["heldout"]["pass_at_k"]["1"] == pytest.approx(0.6)
    assert results["arms"]["before_rl"]["per_seed"][0]["pass_at_1_gain"] == 0.0
    assert results["gate"]["passed"] is True and results["gate"]["hop_recall"] == 1.0
    assert results["sim_to_real"]["heldout"]["greedy_em"] == pytest.approx(0.9)  # SSRL's
    assert results["sim_to_real"]["other_arms"]["before_rl"]["heldout"]["greedy_em"] == \
        pytest.approx(0.7)
    assert len(results["recall_curve"]["unanchored"]) == 3
    assert results["cpu_time_s"] == 3 * 1.0 + 9 * 2.0


def test_render_report_verdicts_follow_the_numbers():
    good = ssrl.render_report(hand_results([0.5, 0.3, 0.4], [0.95, 0.91, 0.93], [0.0, 0.1, 0.12]))
    # gains 0.5, 0.3, 0.4: mean 0.4, population std 0.0816, worst 0.3 (≥ 0.3: met)
    assert "gain 0.400 ± 0.082 [0.300]: goal ≥ +0.3 in every seed met" in good
    # recall: the lower of greedy 0.95 and sampled: 0.95, 0.91, 0.93 → worst 0.91
    assert "(the lower of greedy and sampled, all hops) 0.930 ± 0.016 [0.910]" in good
    assert "goal ≥ 0.9 in every seed met" in good
    # leads 0, 0.1, 0.12: mean 0.0733, population std 0.0525, worst (largest) 0.12
    assert "lead 0.073 ± 0.052 [0.120]: goal ≤ 0.15 in every seed met" in good
    assert "it drifts below the goal in some seed" in good  # unanchored sampled recall 0.6
    assert "greedy held-out EM is 0.500 with its own information and 0.900" in good
    assert "(+0.400)" in good
    assert "pass@1 0.200 → pass@2 0.400: pass@k barely climbs" in good  # climbs by 0.2 < 0.3
    bad = ssrl.render_report(hand_results([0.5, 0.29, 0.4], [0.95, 0.89, 0.93], [0.0, 0.1, 0.16],
                                          unanchored_recall=0.95))
    assert "goal ≥ +0.3 in every seed NOT met" in bad
    assert "goal ≥ 0.9 in every seed NOT met" in bad
    assert "goal ≤ 0.15 in every seed NOT met" in bad
    assert "it holds without the anchor too" in bad
    assert "| 5 | 0.900 | 0.930 |" in good  # the recall curve's last row, SSRL first


def test_user_data_runs_the_whole_pipeline(tmp_path):
    # five-word names: a packed sequence of four person bio lines (4 × 26 + 1 tokens) is longer
    # than the 96 positions the model would have without sizing them to the longest bio × pack
    triples = [(s + " van der berg" if r in ("city", "employer") else s, r, o)
               for s, r, o in ssrl.synthetic_triples(30, 5, 3, 4, random.Random(0))]
    data = tmp_path / "world.jsonl"
    rows = [{"subject": s, "relation": r, "object": o} for s, r, o in triples]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ssrl.main(["--data", str(data), "--smoke", "--workers", "1", "--out", str(tmp_path / "o")])
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["n_params"] > 0
    cfg = ssrl.Config(data=str(data))
    kb = ssrl.load_world(cfg, random.Random(0))
    assert kb.facts == {(s, r): o for s, r, o in triples}
    assert len(ssrl.people_of(kb)) == 30


# --- more behaviour: the sampler, the model, the arms and the gates ---


def test_every_vocabulary_word_is_one_token():
    kb, tok = small_world()
    for word in ["of", "?", "a0", "b1", "c0", "k1", "e0", "hq", "employer", "country", "done"]:
        assert len(tok.encode(" " + word)) == 1, word
        assert len(tok.encode(word)) == 1, word


def test_the_model_has_positions_for_the_longest_packed_sequence():
    kb, tok = small_world()
    pool = ssrl.pretraining_pool(kb, tok, ["a0 b0"])
    world = ssrl.World(kb, tok, pool, ["a0 b0"], [], [], set())
    longest = max(len(b) for b in pool.bios)  # the employer bio line of a0 b0 or a0 b1
    assert longest == len(tok.encode(ssrl.bio_text(kb, "a0 b0", "employer")))
    # pack 4: 4 · longest + 1 (<s>) < 96, so 96 positions; pack 6: more than 96
    assert 4 * longest + 1 < 96 < 6 * longest + 1
    small = ssrl.new_model(ssrl.Config(pack=4, d_model=16, n_head=2), world, "cpu")
    assert small.pos.weight.shape[0] == 96
    big = ssrl.new_model(ssrl.Config(pack=6, d_model=16, n_head=2), world, "cpu")
    assert big.pos.weight.shape[0] == 6 * longest + 1


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
    p0 = tok.encode("<s> city of a0 b0 ?")
    p1 = tok.encode("<s> city of a0 b1 ?")
    r0 = tok.encode("<think> done</think><answer> c0</answer>")
    r1 = tok.encode("<think> done</think><think> done</think><answer> c1</answer>")
    assert (len(r0), len(r1)) == (6, 9)
    model = Scripted(len(tok.raw), {tuple(p0): r0, tuple(p1): r1}, tok.special["<pad>"])
    rollout = ssrl.generate(model, [p0, p1], 20, tok, torch.device("cpu"), temperature=0)
    assert rollout.seq.shape[1] == len(p0) + 9
    assert rollout.valid[:, len(p0):].sum(1).tolist() == [6, 9]
    assert ssrl.decode_responses(tok, rollout) == [tok.decode(r0), tok.decode(r1)]


def test_every_arm_runs_with_its_mask_and_anchor_and_writes_the_record(monkeypatch, tmp_path):
    seen = {}
    rl_people = []
    evaluated = []
    real_ssrl = ssrl.ssrl
    real_evaluate = ssrl.evaluate

    def recording(policy, ref, kb, questions, cfg, tok, device, arm, rng, probe, tag):
        seen[tag["arm"]] = arm
        rl_people.append({p for p, _ in questions})
        assert len(questions) == 4 * len(rl_people[-1])  # every template of every RL person
        return real_ssrl(policy, ref, kb, questions, cfg, tok, device, arm, rng, probe, tag)

    def recording_evaluate(model, kb, eval_people, all_people, *args):
        evaluated.append((list(eval_people), list(all_people)))
        return real_evaluate(model, kb, eval_people, all_people, *args)

    monkeypatch.setattr(ssrl, "ssrl", recording)
    monkeypatch.setattr(ssrl, "evaluate", recording_evaluate)
    ssrl.main(["--smoke", "--device", "cpu", "--workers", "1", "--out", str(tmp_path)])
    assert seen == {"after_rl": ssrl.Arm(info_mask=True, anchored=True),
                    "unanchored": ssrl.Arm(info_mask=True, anchored=False),
                    "mask_off": ssrl.Arm(info_mask=False, anchored=False)}
    # smoke split of 36 people: 12 with demonstrations, 8 held out, the other 16 for RL
    assert all(people == rl_people[0] for people in rl_people) and len(rl_people[0]) == 16
    assert len(evaluated) == 8  # before RL and three arms; held out and RL people each
    (held_few, held_all), (rl_few, rl_all) = evaluated[0], evaluated[1]
    assert len(held_all) == 8 and held_few == held_all[:4]  # smoke n_eval = 4
    assert set(rl_all) == rl_people[0] and rl_few == rl_all[:4]
    assert not set(held_all) & rl_people[0]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [0]
    assert {"hop_recall", "copy", "passed"} <= set(results["gate"])
    for arm in ("before_rl", "after_rl", "unanchored", "mask_off"):
        for group in ("heldout", "rl_people"):
            block_ = results["arms"][arm][group]
            assert list(block_["pass_at_k"]) == ["1", "2", "3", "4"]  # smoke: n_samples = 4
            assert {"greedy_em", "plan_accuracy", "by_template", "hop_recall"} <= set(block_)
            assert set(block_["by_template"]) == set(ssrl.TEMPLATES)
        assert set(results["arms"][arm]["per_seed"][0]) >= {
            "pass_at_1_gain", "hop_recall", "plan_accuracy", "greedy_em"}
    assert {"em_self", "em_real", "greedy_em"} <= set(results["sim_to_real"]["heldout"])
    assert "moved_people" in results["sim_to_real"]["stale_world"]
    curve = results["recall_curve"]["after_rl"][0]
    assert [p["step"] for p in curve] == [0, 1, 2]  # smoke: 2 steps, a point every step
    assert {"greedy", "sampled"} <= set(curve[0])
    assert (tmp_path / "results.md").read_text() == ssrl.render_report(results)
    assert (tmp_path / "ssrl.png").exists()


def test_arms_start_from_the_seed_s_pretrained_weights_and_the_same_noise(monkeypatch):
    cfg = ssrl.Config(n_people=36, n_traj=12, n_heldout=8, n_cities=6, n_employers=4, d_model=16,
                      n_layer=1, n_head=2, steps=1, log_every=1)
    seen = []

    def fake_ssrl(policy, ref, kb, questions, cfg_, tok, device, arm, rng, probe, tag):
        seen.append((policy.tok.weight.detach().clone(), ref.tok.weight.detach().clone(),
                     rng.random(), torch.rand(1).item()))
        return []

    probe_seeds = []
    monkeypatch.setattr(ssrl, "ssrl", fake_ssrl)
    monkeypatch.setattr(ssrl, "recall_probe",
                        lambda world, cfg_, device, seed: probe_seeds.append(seed))
    monkeypatch.setattr(ssrl, "measure", lambda *args: {})
    monkeypatch.setattr(ssrl, "sim_to_real", lambda *args: {})
    world = ssrl.build_world(cfg, random.Random(4))
    torch.manual_seed(9)
    weights = {k: v.numpy() for k, v in ssrl.new_model(cfg, world, "cpu").state_dict().items()}
    for arm in ("after_rl", "mask_off"):
        out = ssrl.train_arm(ssrl.ArmJob(cfg, 4, arm, weights))
        assert out["arm"] == arm and out["seed"] == 4
    for policy, ref, draw, noise in seen:
        assert torch.equal(policy, torch.from_numpy(weights["tok.weight"]))
        assert torch.equal(ref, policy)
    assert seen[0][2:] == seen[1][2:]  # both arms: the same python and torch noise
    assert probe_seeds == [34, 34]  # the probe's own noise: seed + 30


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
        cache = [ssrl.KVCache() for _ in model.blocks]
        steps = [model(ids[:, :5], None, None, cache)]
        for t in range(5, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], torch.tensor([[t]]), None, cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_block_residuals_add_attention_and_mlp():
    # every weight 0: q = k = v = 0, attention output 0, c_proj(0) = its bias 1, mlp(·) = its
    # last bias 2; so the block returns x + 1 + 2
    block_ = ssrl.Block(4, 2)
    with torch.no_grad():
        for p in block_.parameters():
            p.zero_()
        block_.c_proj.bias.fill_(1.0)
        block_.mlp[2].bias.fill_(2.0)
    x = torch.arange(12.0).view(1, 3, 4)
    torch.testing.assert_close(block_(x), x + 3)


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


def test_greedy_parts_are_greedy_on_a_hesitant_model():
    # the scripted token gets logit 3, the other 57 tokens 0: it is the argmax, but a sample at
    # T = 1 picks it only e^3 / (e^3 + 57) = 26% of the time, so a sampled answer is all but never
    # whole. Greedy EM and the hop-recall gate must read the greedy answers.
    kb, tok = small_world()
    torch.manual_seed(0)
    model = scripted_model(kb, tok, fixed_responses(kb))
    model.script.update(bio_script(kb, tok))
    model.logit = 3.0
    cfg = ssrl.Config(n_samples=1, max_new=60)
    out = ssrl.evaluate(model, kb, ["a0 b0"], ["a0 b0", "a0 b1"], cfg, tok, torch.device("cpu"),
                        {"e0", "e1"})
    assert out["greedy_em"] == pytest.approx(5 / 8)
    assert out["greedy_plan_accuracy"] == pytest.approx(6 / 8)
    assert out["pass_at_k"]["1"] < 0.5  # the sampled answers of a0 b0 (greedy: 4 of 4 right)
    assert out["hop_recall"] == 1.0


@pytest.mark.parametrize("hop_, copy_, passed", [(0.95, 0.85, True), (0.94, 0.85, False),
                                                 (0.95, 0.84, False)])
def test_gates_pass_at_their_thresholds(monkeypatch, hop_, copy_, passed):
    # the gates: held-out hop recall >= 0.95 and copy >= 0.85, both needed (training is faked)
    monkeypatch.setattr(ssrl, "pretrain", lambda *args, **kwargs: None)
    monkeypatch.setattr(ssrl, "measure", lambda *args: {
        "heldout": {"hop_recall": hop_, "hop_recall_by_relation": {}, "copy": copy_}})
    monkeypatch.setattr(ssrl, "sim_to_real", lambda *args: {})
    cfg = ssrl.Config(n_people=36, n_traj=12, n_heldout=8, n_cities=6, n_employers=4, d_model=16,
                      n_layer=1, n_head=2)
    out = ssrl.pretrain_seed(ssrl.SeedJob(cfg, 0))
    assert out["gate"]["hop_recall"] == hop_ and out["gate"]["copy"] == copy_
    assert out["gate"]["passed"] is passed
    assert set(out["weights"]) >= {"tok.weight", "pos.weight"}
