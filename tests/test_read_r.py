"""Tests for read_r.py: the judge and the reward, the chain metric, the ad generator, the model's
previous-word feature and KV-cache decoding with its answer budget, SFT and GRPO steps, and an
evaluation of a scripted policy whose answers are known."""
import json
import random
import time

import pytest
import torch

import read_r

SLOT = read_r.SLOT_OF


# --- the judge and the reward ---


def test_answer_reward_exact_partial_hedge_contradiction_length():
    # one slot, exact → 1; a word of no slot in the gold beside it does not matter → 1
    assert read_r.answer_reward("safety", "safety", SLOT) == 1.0
    assert read_r.answer_reward("m3 safety", "safety", SLOT) == 1.0
    # a hedge: two values of the theme slot → {safety, status} ≠ {safety} → 0
    assert read_r.answer_reward("safety status", "safety", SLOT) == 0.0
    # a hedge over every theme (4 words ≤ 5 × 1, so not over-long) → 0
    assert read_r.answer_reward("freedom safety belonging status", "safety", SLOT) == 0.0
    # a contradiction → 0; an empty answer → 0
    assert read_r.answer_reward("status", "safety", SLOT) == 0.0
    assert read_r.answer_reward("", "safety", SLOT) == 0.0
    # two slots: both right → 1; one right, the other missing → 1 of 2 = half, nothing contradicts → 0.5
    assert read_r.answer_reward("car m3", "car m3", SLOT) == 1.0
    assert read_r.answer_reward("car", "car m3", SLOT) == 0.5
    # one right, the other contradicted (m4 for m3) → 0 (the paper: 0.5 only if nothing contradicts)
    assert read_r.answer_reward("car m4", "car m3", SLOT) == 0.0
    # one right, the other hedged (m3 and m4) → the mark slot contradicts → 0
    assert read_r.answer_reward("car m3 m4", "car m3", SLOT) == 0.0
    # three slots, one right: 1 of 3 is less than half → 0; two of three, nothing wrong → 0.5
    assert read_r.answer_reward("car", "car m3 safety", SLOT) == 0.0
    assert read_r.answer_reward("car m3", "car m3 safety", SLOT) == 0.5
    # over-long: 6 words > 5 × 1 and right → 0.1; exactly 5 × 1 → 1
    assert read_r.answer_reward("safety " * 6, "safety", SLOT) == 0.1
    assert read_r.answer_reward("safety " * 5, "safety", SLOT) == 1.0
    # over-long and half right → 0.1 instead of 0.5: 11 words > 5 × 2
    assert read_r.answer_reward("car " * 11, "car m3", SLOT) == 0.1
    # over-long and wrong stays 0
    assert read_r.answer_reward("status " * 6, "safety", SLOT) == 0.0
    with pytest.raises(ValueError):
        read_r.answer_reward("safety", "", SLOT)


def test_format_judge_and_total_reward():
    good = "<think> m3 joke</think><answer> safety</answer>"
    assert read_r.format_reward(good) == 1.0
    assert read_r.format_reward("<think></think><answer> safety</answer>") == 1.0
    assert read_r.format_reward("<answer> safety</answer>") == 0.0
    assert read_r.format_reward("<think> m3</think> safety") == 0.0
    # r = 0.9 · 1 + 0.1 · 1 = 1; wrong with format: 0.9 · 0 + 0.1 = 0.1
    torch.testing.assert_close(read_r.total_reward(good, "safety", SLOT), 1.0)
    torch.testing.assert_close(read_r.total_reward(good, "status", SLOT), 0.1)
    # no answer block: the judge reads the whole response, tags removed ("m3 safety") → 0.9 · 1
    torch.testing.assert_close(read_r.total_reward("<think> m3</think> safety", "safety", SLOT),
                               0.9)
    # the answer block is what is judged, not the think block: "joke" holds no theme → 0.1
    text = "<think> safety</think><answer> joke</answer>"
    torch.testing.assert_close(read_r.total_reward(text, "safety", SLOT), 0.1)
    assert read_r.block(good, "think") == ["m3", "joke"]
    assert read_r.block("<think></think>", "think") == []
    assert read_r.block("no tags", "answer") is None


def test_strict_relaxed_hand_list():
    # 1, 0.5, 0, 1, 0.1, 0.3 → strict 2/6, relaxed (≥ 0.5) 3/6
    strict, relaxed = read_r.strict_relaxed([1.0, 0.5, 0.0, 1.0, 0.1, 0.3])
    torch.testing.assert_close(strict, 2 / 6)
    torch.testing.assert_close(relaxed, 3 / 6)
    assert read_r.strict_relaxed([]) == (0.0, 0.0)


def test_chain_correct():
    check = read_r.chain_correct
    assert check(["m3", "joke"], "m3", "joke", SLOT) == (True, True)  # the whole chain
    assert check(["m3"], "m3", "joke", SLOT) == (True, False)  # the first hop only
    assert check(["car", "m3", "joke"], "m3", "joke", SLOT) == (True, True)  # a product is harmless
    assert check(["joke", "m3"], "m3", "joke", SLOT) == (False, False)  # the cue before the mark
    assert check(["m3", "skull"], "m3", "joke", SLOT) == (False, False)  # the wrong cue
    assert check(["m4", "joke"], "m3", "joke", SLOT) == (False, False)  # the wrong mark
    assert check(["m3", "m4", "joke"], "m3", "joke", SLOT) == (False, False)  # two marks: a list
    assert check(["m3", "joke", "skull"], "m3", "joke", SLOT) == (False, False)  # two cues
    assert check([], "m3", "joke", SLOT) == (False, False)


def test_chain_hits_reads_two_hop_rows_only():
    rows = [{"type": "two_hop", "chain": "m3 joke"}, {"type": "mark_cue", "chain": "m3 joke"},
            {"type": "two_hop", "chain": "m5 crowd"}, {"type": "two_hop", "chain": "m1 skull"}]
    texts = ["<think> m3 joke</think><answer> safety</answer>", "<think> m3 joke</think>",
             "<think> m5</think><answer> safety</answer>", "<answer> safety</answer>"]
    hits = read_r.chain_hits(texts, rows)
    assert [tuple(h) for h in hits] == [(True, True), (True, False), (False, False)]


# --- the generator ---


def test_make_ad_each_cue_once_fresh_marks_product_shares_one_mark():
    rng = random.Random(0)
    seen_marks = set()
    for _ in range(200):
        ad = read_r.make_ad(rng)
        frames = ad["frames"]
        assert len(frames) == 5 and all(len(f) == 2 for f in frames)
        items = [f[1] for f in frames]
        marks = [f[0] for f in frames]
        # each cue exactly once, one product frame, every word in the vocabulary
        assert sorted(i for i in items if i in read_r.CUES) == sorted(read_r.CUES)
        assert [i for i in items if i in read_r.PRODUCTS] == [read_r.PRODUCTS[ad["product"]]]
        # the cue frames' marks are distinct; the product's mark is that of exactly one cue frame,
        # the frame of cue ad["cue"]
        cue_marks = [f[0] for f in frames if f[1] in read_r.CUES]
        assert len(set(cue_marks)) == 4 and all(m in read_r.MARKS for m in marks)
        product_mark = next(f[0] for f in frames if f[1] in read_r.PRODUCTS)
        assert cue_marks.count(product_mark) == 1
        assert [f[1] for f in frames if f[0] == product_mark and f[1] in read_r.CUES] == [
            read_r.CUES[ad["cue"]]]
        seen_marks |= set(marks)
    assert seen_marks == set(read_r.MARKS)  # marks are drawn fresh: every mark turns up
    # and shuffled: the product frame is not always in one place
    rng = random.Random(1)
    places = {[f[1] in read_r.PRODUCTS for f in read_r.make_ad(rng)["frames"]].index(True)
              for _ in range(50)}
    assert len(places) == 5


def test_questions_answers_and_traces_by_hand():
    ad = {"frames": [["m7", "skull"], ["m2", "car"], ["m2", "joke"], ["m9", "crowd"],
                     ["m4", "trophy"]], "product": 0, "cue": 0,
          "marks": ["m2", "m7", "m9", "m4"]}
    # product car (0), its mark m2, the cue beside m2 is joke (0): THEME[0][0] = THEMES[0] freedom
    two = read_r.question(ad, "two_hop", 3)
    assert (two["arg"], two["answer"], two["chain"]) == ("none", "freedom", "m2 joke")
    assert two["frames"] == "m7 skull m2 car m2 joke m9 crowd m4 trophy"
    one = read_r.question(ad, "product_mark", 3)
    assert (one["arg"], one["answer"], one["chain"]) == ("none", "m2", "m2")
    # asked = 1: the mark of skull is m7 → answer skull
    cue = read_r.question(ad, "mark_cue", 1)
    assert (cue["arg"], cue["answer"], cue["chain"]) == ("m7", "skull", "m7 skull")
    # asked = 3 (trophy): THEME[0][3] = THEMES[LATIN[0][3]] = THEMES[3] = status
    theme = read_r.question(ad, "cue_theme", 3)
    assert (theme["arg"], theme["answer"], theme["chain"]) == ("trophy", "status", "trophy")
    # the Latin square: neither the product nor the cue alone fixes the theme
    assert all(len(set(row)) == 4 for row in read_r.THEME)
    assert all(len({read_r.THEME[p][c] for p in range(4)}) == 4 for c in range(4))
    # prompt and target words
    assert read_r.prompt_words(two, "reason")[-4:] == ["<two_hop>", "none", "<reason>", "<think>"]
    assert read_r.prompt_words(two, "direct")[-3:] == ["<think>", "</think>", "<answer>"]
    assert len(read_r.prompt_words(two, "direct")) == 1 + 10 + 3 + 3
    assert read_r.target_words(two, "reason") == ["m2", "joke", "</think>", "<answer>", "freedom",
                                                  "</answer>"]
    assert read_r.target_words(two, "direct") == ["freedom", "</answer>"]


def test_make_rows_and_samplers():
    rows = read_r.make_rows(random.Random(0), 3)
    assert [r["type"] for r in rows] == list(read_r.TYPES) * 3
    # the base's sampler: one-hop questions only, then n_warm two-hop ones in each mode
    sample = read_r.base_sampler(random.Random(0), 6, 2, 2)
    rows, modes = sample(2)
    assert len(rows) == 6 and "two_hop" not in {r["type"] for r in rows}
    rows, modes = sample(3)
    assert len(rows) == 10
    warm = [(r["type"], m) for r, m in zip(rows, modes) if r["type"] == "two_hop"]
    assert sorted(warm) == [("two_hop", "direct")] * 2 + [("two_hop", "reason")] * 2
    # every arm sees the same question stream
    a = read_r.question_stream(list(range(50)), 4, seed=1)
    b = read_r.question_stream(list(range(50)), 4, seed=1)
    assert [next(a) for _ in range(3)] == [next(b) for _ in range(3)]
    assert read_r.response_budget("reason", 4, 1) == 4 + 2 + 1 + 1
    assert read_r.response_budget("direct", 4, 2) == 2 + 1
    assert read_r.repeat_rows(["a", "b"], 2) == ["a", "a", "b", "b"]


def test_tokenizer_round_trip():
    tok = read_r.Tokenizer()
    row = read_r.question(read_r.make_ad(random.Random(0)), "two_hop", 0)
    words = read_r.prompt_words(row, "reason") + read_r.target_words(row, "reason")
    ids = tok.encode(words)
    assert len(ids) == len(words)
    assert tok.decode(ids) == tok.render(words)
    assert all((i >= tok.n_specials) == (w in read_r.WORDS) for i, w in zip(ids, words))


# --- the model ---


def test_previous_word_skips_tags():
    # ids: tags are < 3 here; sequence [5, 1, 6, 2, 2, 7]: previous words (strictly before)
    # pos 0: first (9); 1: 5; 2: 5; 3: 6; 4: 6; 5: 6
    tokens = torch.tensor([[5, 1, 6, 2, 2, 7]])
    prev = read_r.previous_word(tokens, tokens >= 3, torch.tensor([9]))
    assert prev.tolist() == [[9, 5, 5, 6, 6, 6]]
    with pytest.raises(ValueError):
        read_r.previous_word(tokens, tokens >= 3, torch.tensor([[9]]))


def test_kv_cache_decoding_equals_full_recompute():
    torch.manual_seed(0)
    model = read_r.GPT(30, 8, 16, 1, 2)
    model.eval()
    prompt = torch.randint(0, 30, (3, 7))
    ids = {"<answer>": 29, "</answer>": 28, "<pad>": 0}
    tokens, alive, chosen = read_r.generate(model, prompt, 6, ids, answer_words=9, greedy=True)
    seq = prompt
    for _ in range(6):  # greedy without a cache: recompute the whole sequence each step
        nxt = model(seq)[0][:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    ref = seq[:, 7:]
    assert torch.equal(tokens[alive], ref[alive])
    # the log-probs of the response equal those of a step-by-step loop
    lp = read_r.response_logp(model, prompt, ref)
    steps = [torch.log_softmax(model(seq[:, :7 + t])[0][:, -1], -1).gather(-1, ref[:, t:t + 1])[:, 0]
             for t in range(6)]
    torch.testing.assert_close(lp, torch.stack(steps, 1), atol=1e-5, rtol=1e-5)


class Scripted(torch.nn.Module):
    """A policy whose next word is policy(words so far); generate() passes the words as the cache."""

    def __init__(self, tok, policy):
        super().__init__()
        self.tok = tok
        self.policy = policy
        self.n_specials = tok.n_specials

    def forward(self, idx, cache=None):
        seq = idx if cache is None else torch.cat([cache, idx], 1)
        logits = torch.full((idx.shape[0], idx.shape[1], len(self.tok.vocab)), -30.0)
        for i, row in enumerate(seq.tolist()):
            words = [self.tok.vocab[j] for j in row]
            logits[i, -1, self.tok.id[self.policy(words)]] = 30.0
        return logits, seq


def solve(words, think_override=None):
    """The right next word of a response: chain "m C", then the theme of the last think cue."""
    frames = words[1:11]
    pairs = list(zip(frames[0::2], frames[1::2]))
    product = next(i for m, i in pairs if i in read_r.PRODUCTS)
    mark = next(m for m, i in pairs if i in read_r.PRODUCTS)
    think = words[words.index("<think>") + 1:]
    last = words[-1]
    if last == "<think>":
        return mark
    if last in read_r.MARKS and "</think>" not in words:
        return next(i for m, i in pairs if m == last and i in read_r.CUES)
    if last in read_r.CUES and "</think>" not in words:
        return "</think>"
    if last == "</think>":
        return "<answer>"
    if last == "<answer>":
        cues = [w for w in think if w in read_r.CUES]
        if not cues:
            return "m0"
        return read_r.THEME[read_r.PRODUCTS.index(product)][read_r.CUES.index(cues[-1])]
    return "</answer>"


def test_generate_closes_the_answer_after_its_budget():
    tok = read_r.Tokenizer()
    row = read_r.question(read_r.make_ad(random.Random(0)), "two_hop", 0)

    def chatty(words):  # writes themes forever once the answer block is open
        return "safety" if "<answer>" in words[-3:] or words[-1] == "safety" else "<answer>"
    prompt = torch.tensor([tok.encode(read_r.prompt_words(row, "direct"))])
    tokens, alive, chosen = read_r.generate(Scripted(tok, chatty), prompt, 5, tok.id, 2)
    words = [tok.vocab[i] for i in tokens[0].tolist()]
    # two answer words, then the environment's </answer> (alive, not chosen), then padding
    assert words == ["safety", "safety", "</answer>", "<pad>", "<pad>"]
    assert alive[0].tolist() == [True, True, True, False, False]
    assert chosen[0].tolist() == [True, True, False, False, False]


def test_evaluate_a_scripted_policy():
    tok = read_r.Tokenizer()
    cfg = read_r.Config(n_train=2, n_test=6, answer_words=1)
    rng = random.Random(0)
    train = read_r.make_rows(rng, 2)
    test = read_r.make_rows(rng, 6)
    model = Scripted(tok, solve)
    res = read_r.evaluate(model, tok, train, test, "reason", cfg, torch.device("cpu"), 0)
    # the scripted policy writes "m C" and the theme of C: every two-hop answer right, chain 1
    assert res["per_task"]["two_hop"] == {"strict": 1.0, "relaxed": 1.0}
    assert res["chain_rate"] == 1.0 and res["full_chain_rate"] == 1.0
    assert res["chain_rate_greedy"] == 1.0
    assert res["acc_given_chain"] == {"chain": 1.0, "no_chain": None}
    # the other types get the two-hop answer: product_mark wants m, mark_cue C' → wrong
    assert res["per_task"]["product_mark"]["strict"] == 0.0
    assert res["train_per_task"]["two_hop"] == 1.0
    torch.testing.assert_close(res["strict"], 0.25 + 0.25 * res["per_task"]["cue_theme"]["strict"]
                               + 0.25 * res["per_task"]["mark_cue"]["strict"])
    # the readiness check: right with thinking, "m0" when answering at once → 1/2
    two_hop = [r for r in test if r["type"] == "two_hop"]
    assert read_r.one_hop_accuracy(model, tok, two_hop, cfg, torch.device("cpu")) == 0.5
    # scramble: two random frame words replace "m C"; the answer follows the scrambled cue
    assert res["scramble_two_hop"] < 1.0
    torch.testing.assert_close(res["scramble_drop"], 1.0 - res["scramble_two_hop"])


# --- the paper's method: GRPO (the same text as flowrl.py and ssrl.py) ---


def test_group_normalize_hand():
    # [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 · 0.25 / 3) = 0.57735 → ±0.5 / 0.57735 = ±0.86603
    out = read_r.group_normalize(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3]]))
    torch.testing.assert_close(out[0], torch.tensor([0.86603, -0.86603, -0.86603, 0.86603]),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], torch.zeros(4))


def test_grpo_loss_hand():
    # ratios 1.5 and 0.5, Â = 1, ε = 0.2: max(−1.5, −1.2) = −1.2, max(−0.5, −0.8) = −0.5 → −0.85
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    ref = torch.zeros(1, 2)
    # k3 with u = ref − logp = (−ln 1.5, −ln 0.5): (1/1.5 + ln 1.5 − 1 + 2 − ln 2 − 1) / 2
    k3 = ((1 / 1.5 + torch.log(torch.tensor(1.5)) - 1) + (2 + torch.log(torch.tensor(0.5)) - 1)) / 2
    loss, terms = read_r.grpo_loss(logp, old, ref, torch.ones(1, 2), torch.tensor([1.0]), 0.2, 0.01)
    torch.testing.assert_close(terms["pg_loss"], torch.tensor(-0.85))
    torch.testing.assert_close(terms["kl"], k3)
    torch.testing.assert_close(loss, torch.tensor(-0.85) + 0.01 * k3)
    torch.testing.assert_close(terms["clip_frac"], torch.tensor(1.0))  # both outside [0.8, 1.2]
    # Â = −1: max(1.5, 1.2) = 1.5 and max(0.5, 0.8) = 0.8 (the clip's lower end binds) → 1.15
    _, terms = read_r.grpo_loss(logp, old, ref, torch.ones(1, 2), torch.tensor([-1.0]), 0.2, 0.0)
    torch.testing.assert_close(terms["pg_loss"], torch.tensor(1.15))


# --- training ---


def test_batch_tensors_and_sft_loss_by_hand():
    tok = read_r.Tokenizer()
    row = read_r.question(read_r.make_ad(random.Random(0)), "two_hop", 0)
    x, m = read_r.batch_tensors(tok, [row, row], ["direct", "reason"], torch.device("cpu"))
    n_prompt = len(read_r.prompt_words(row, "direct"))
    # direct: 17 prompt tokens and 2 target tokens, padded to the reason row's 15 + 6 = 21
    assert x.shape == (2, 21)
    assert m[0].tolist() == [0.0] * n_prompt + [1.0] * 2 + [0.0] * 2
    assert m[1].sum().item() == 6 and x[0, -1].item() == tok.id["<pad>"]

    class Uniform(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(idx.shape[0], idx.shape[1], 49), None
    # uniform logits over 49 tokens: the cross-entropy of every target is ln 49
    torch.testing.assert_close(read_r.sft_loss(Uniform(), x, m), torch.log(torch.tensor(49.0)))


def test_one_sft_step_and_one_grpo_step_move_the_right_way():
    tok = read_r.Tokenizer()
    cfg = read_r.Config(steps=1, prompts=2, group=4, lr_rl=1e-2, kl_coef=0.0, log_every=1)
    rows = read_r.make_rows(random.Random(0), 2)
    torch.manual_seed(0)
    model = read_r.GPT(len(tok.vocab), tok.n_specials, 16, 1, 2)
    x, m = read_r.batch_tensors(tok, rows, ["reason"] * len(rows), torch.device("cpu"))
    before = read_r.sft_loss(model, x, m).item()

    seen = []

    def sample(step):
        seen.append(step)
        return rows, ["reason"] * len(rows)
    opt, steps = read_r.sft_train(model, tok, sample, 3, 1e-2, torch.device("cpu"), "t", 10)
    assert steps == 3 and seen == [1, 2, 3]
    assert read_r.sft_loss(model, x, m).item() < before
    # early stop: ready() is asked every log_every steps; the optimizer carries on
    asked = []

    def ready(m):
        asked.append(True)
        return len(asked) == 2
    same, steps = read_r.sft_train(model, tok, sample, 9, 1e-2, torch.device("cpu"), "t", 2,
                                   opt=opt, ready=ready)
    assert same is opt and steps == 4 and len(asked) == 2
    # GRPO: rewards come from the judge; one step raises the log-prob of the rewarded samples
    ref = read_r.GPT(len(tok.vocab), tok.n_specials, 16, 1, 2)
    curve = read_r.grpo_train(model, ref, tok, rows, "reason", cfg, torch.device("cpu"), "t", 0)
    assert len(curve["reward"]) == 1 and len(curve["chain_n"]) == 1
    assert 0.0 <= curve["reward"][0] <= 1.0


def test_average_and_spread():
    a = {"x": 1.0, "y": {"z": 2.0}, "n": None}
    b = {"x": 3.0, "y": {"z": 4.0}, "n": 5.0}
    assert read_r.average([a, b]) == {"x": 2.0, "y": {"z": 3.0}, "n": 5.0}
    s = read_r.spread([0.2, 0.6])
    torch.testing.assert_close(s["mean"], 0.4)
    torch.testing.assert_close(s["std"], 0.2)
    assert s["worst"] == 0.2
    assert read_r.mean_or_none([]) is None


def test_per_type():
    rows = [{"type": "two_hop"}, {"type": "two_hop"}, {"type": "mark_cue"}]
    assert read_r.per_type(rows, [1.0, 0.5, 0.0]) == {
        "mark_cue": {"strict": 0.0, "relaxed": 0.0}, "two_hop": {"strict": 0.5, "relaxed": 1.0}}


# --- the script ---


def test_smoke_writes_results(tmp_path):
    res = read_r.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for arm in ("base", "sft", "sft_trace", "rl_think", "rl_nothink"):
        for key in ("strict", "relaxed", "per_task", "train_strict"):
            assert key in saved["arms"][arm]
        assert set(saved["arms"][arm]["per_task"]) == set(read_r.TYPES)
    for key in ("chain_rate_before", "chain_rate_after", "scramble_drop", "acc_given_chain"):
        assert key in saved["arms"]["rl_think"]
    for key in ("direct_two_hop", "think_sft_two_hop", "base_chain_rate"):
        assert key in saved["gate"]
    assert saved["seeds"] == [0, 1]
    # --smoke runs the tiny sizes it promises, and records them
    tiny = {"steps": 3, "seeds": 2, "gate_steps": 3, "base_steps": 4, "warm_traces": 4,
            "warm_batch": 4, "batch": 8, "n_train": 2, "n_test": 3, "prompts": 4, "group": 4,
            "log_every": 2}
    assert {k: saved["config"][k] for k in tiny} == tiny
    assert res["arms"]["sft"]["strict"] == saved["arms"]["sft"]["strict"]
    # the summaries agree with the per-seed numbers they summarise
    arms = saved["arms"]
    per_seed = saved["two_hop_per_seed"]
    for arm in ("base", "sft", "sft_trace", "rl_think", "rl_nothink"):
        torch.testing.assert_close(arms[arm]["per_task"]["two_hop"]["strict"],
                                   sum(per_seed[arm]) / 2)
    head = saved["headline"]
    torch.testing.assert_close(head["rl_think_two_hop"]["mean"], sum(per_seed["rl_think"]) / 2)
    assert head["rl_nothink_two_hop"]["worst"] == min(per_seed["rl_nothink"])
    gains = [a - b for a, b in zip(per_seed["rl_think"], per_seed["rl_nothink"])]
    torch.testing.assert_close(head["rl_think_minus_rl_nothink_two_hop"]["mean"], sum(gains) / 2)
    gate = saved["gate"]
    torch.testing.assert_close(gate["direct_two_hop"], sum(gate["per_seed"]["direct_two_hop"]) / 2)
    assert gate["base_chain_rate"] == arms["rl_think"]["chain_rate_before"] == arms["base"][
        "chain_rate"]
    assert arms["rl_think"]["chain_rate_after"] == arms["rl_think"]["chain_rate"]
    assert len(saved["curves"]) == 2 and len(saved["curves"][0]["rl_think"]["reward"]) == 3
    assert "chain_rate" not in arms["rl_nothink"] and "scramble_drop" in arms["sft_trace"]
    assert (tmp_path / "read_r.png").exists()


@pytest.mark.parametrize("argv", [["--group", "1"], ["--n-train", "0"], ["--d-model", "30"],
                                  ["--temperature", "0"], ["--warm-traces", "-1"],
                                  ["--base-target", "1.5"]])
def test_bad_input_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        read_r.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_data_file(tmp_path, capsys):
    rows = read_r.make_rows(random.Random(0), 3)
    path = tmp_path / "ads.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = read_r.Config(data=str(path))
    train, test = read_r.load_rows(cfg, 0)
    assert train == rows[:9] and test == rows[9:]  # 80/20 of 12 rows
    path.write_text(json.dumps(dict(rows[0], type="XX")) + "\n")
    with pytest.raises(SystemExit) as e:
        read_r.main(["--data", str(path), "--smoke"])
    assert e.value.code == 2
    assert "type 'XX'" in capsys.readouterr().err


# --- more behaviour: the loss's corners, sampling temperature, summaries over seeds ---


def test_grpo_loss_token_mean_clip_fraction_and_gradient_direction():
    ratio = torch.tensor([[1.1, 1.5]])
    # π_old is not uniform: ρ = exp(logp − old_logp), both shifted by −0.3
    logp = torch.log(ratio) - 0.3
    old = torch.full((1, 2), -0.3)
    # Â = 1, ε = 0.2: 1.1 is inside the clip (ℓ = −1.1), 1.5 outside (max(−1.5, −1.2) = −1.2);
    # token mean −1.15; one of two tokens clipped → clip fraction 0.5
    _, terms = read_r.grpo_loss(logp, old, logp, torch.ones(1, 2), torch.tensor([1.0]), 0.2, 0.0)
    torch.testing.assert_close(terms["pg_loss"], torch.tensor(-1.15))
    torch.testing.assert_close(terms["clip_frac"], torch.tensor(0.5))
    # mask [1, 0]: only the first token counts → −1.1, nothing clipped
    _, terms = read_r.grpo_loss(logp, old, logp, torch.tensor([[1.0, 0.0]]), torch.tensor([1.0]),
                                0.2, 0.0)
    torch.testing.assert_close(terms["pg_loss"], torch.tensor(-1.1))
    torch.testing.assert_close(terms["clip_frac"], torch.tensor(0.0))
    # an all-zero mask (no action taken) is a loss of 0, not 0 / 0
    loss, _ = read_r.grpo_loss(logp, old, logp, torch.zeros(1, 2), torch.tensor([1.0]), 0.2, 0.1)
    assert loss.item() == 0.0
    # the gradient: at ρ = 1 (π_old = π_θ) dℓ/dlogp = −Â / n_tokens: rows Â = +1, −1, one token each
    # → −0.5 (raise the rewarded response), +0.5 (lower the other)
    lp = torch.zeros(2, 1, requires_grad=True)
    loss, terms = read_r.grpo_loss(lp, lp.detach(), lp.detach(), torch.ones(2, 1),
                                   torch.tensor([1.0, -1.0]), 0.2, 0.0)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5], [0.5]]))
    # the logged terms carry no graph
    assert loss.requires_grad and not any(v.requires_grad for v in terms.values())


def test_grpo_loss_kl_clamps():
    # u = ref − logp = +30 and −30; clamped to ±20: e^20 − 21 and e^−20 + 19, each clamped to 10
    logp = torch.zeros(1, 2)
    ref = torch.tensor([[30.0, -30.0]])
    _, terms = read_r.grpo_loss(logp, logp, ref, torch.ones(1, 2), torch.tensor([0.0]), 0.2, 1.0)
    torch.testing.assert_close(terms["kl"], torch.tensor(10.0))
    # unclamped k3: (e^30 − 31 + e^−30 + 29) / 2
    _, terms = read_r.grpo_loss(logp, logp, ref, torch.ones(1, 2), torch.tensor([0.0]), 0.2, 1.0,
                                kl_clamp=False)
    want = (torch.exp(torch.tensor(30.0, dtype=torch.float64)) - 2) / 2
    torch.testing.assert_close(terms["kl"].double(), want, rtol=1e-5, atol=0)
    # u = 10 (inside ±20): e^10 − 11 = 22015.5 > 10 → the estimate's clamp alone gives 10
    _, terms = read_r.grpo_loss(logp[:, :1], logp[:, :1], torch.tensor([[10.0]]), torch.ones(1, 1),
                                torch.tensor([0.0]), 0.2, 1.0)
    torch.testing.assert_close(terms["kl"], torch.tensor(10.0))
    # a token the policy gives probability 0 (logp = −inf): u = +inf is clamped to 20 first, so
    # the estimate stays 10 instead of inf − inf = NaN
    _, terms = read_r.grpo_loss(torch.tensor([[-float("inf")]]), torch.zeros(1, 1),
                                torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([0.0]), 0.2, 1.0)
    torch.testing.assert_close(terms["kl"], torch.tensor(10.0))


def test_group_normalize_single_sample_groups():
    # G = 1: mean 0 and std 1 (verl), so r̂ = r / (1 + 1e-6)
    out = read_r.group_normalize(torch.tensor([[0.5], [2.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.5], [2.0]]) / (1 + 1e-6))


class Fixed(torch.nn.Module):
    """Logits [−100, 0, ln 9, −100] at every position; no tags (n_specials 0)."""
    n_specials = 0

    def forward(self, idx, cache=None):
        row = torch.tensor([-100.0, 0.0, torch.log(torch.tensor(9.0)).item(), -100.0])
        return row.expand(idx.shape[0], idx.shape[1], 4).clone(), None


def test_generate_samples_at_its_temperature():
    ids = {"<pad>": 0, "<answer>": 3, "</answer>": 3}
    prompt = torch.ones(4000, 1, dtype=torch.long)
    # T = 2: p ∝ (1, 9^(1/2)) = (1, 3) → P(token 2) = 0.75 (T = 1 would give 0.9, T = 1/2 0.988)
    torch.manual_seed(0)
    tokens, alive, chosen = read_r.generate(Fixed(), prompt, 1, ids, 1, temperature=2.0)
    share = (tokens[:, 0] == 2).float().mean().item()
    assert abs(share - 0.75) < 0.03
    assert set(tokens[:, 0].tolist()) == {1, 2}
    # T = 1 → 0.9; greedy → always 2
    tokens, _, _ = read_r.generate(Fixed(), prompt, 1, ids, 1, temperature=1.0)
    assert abs((tokens[:, 0] == 2).float().mean().item() - 0.9) < 0.03
    tokens, _, _ = read_r.generate(Fixed(), prompt[:3], 1, ids, 1, greedy=True)
    assert tokens[:, 0].tolist() == [2, 2, 2]


def test_gpt_embeddings_start_small():
    # both embeddings are drawn from N(0, 0.02²) (3136 values each: the sample std within 10 %)
    torch.manual_seed(0)
    model = read_r.GPT(49, 12, 64, 1, 4)
    for weight in (model.tok.weight, model.prev.weight):
        assert abs(weight.std().item() - 0.02) < 0.002
        assert abs(weight.mean().item()) < 0.002


class ScriptedAll(Scripted):
    """Scripted at every position (response_logp needs them all), plus one parameter, so an
    optimiser can be built; positions where the policy has no answer (the prompt) are uniform."""

    def __init__(self, tok, policy):
        super().__init__(tok, policy)
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx, cache=None):
        seq = idx if cache is None else torch.cat([cache, idx], 1)
        n_new = idx.shape[1]
        logits = torch.zeros(idx.shape[0], n_new, len(self.tok.vocab))
        for i, row in enumerate(seq.tolist()):
            words = [self.tok.vocab[j] for j in row]
            for k in range(n_new):
                upto = len(words) - n_new + k + 1
                try:
                    nxt = self.policy(words[:upto])
                except (ValueError, StopIteration, IndexError):
                    continue
                logits[i, k] = -30.0
                logits[i, k, self.tok.id[nxt]] = 30.0
        return logits + self.bias, seq


def test_grpo_train_curve_of_a_policy_that_always_solves():
    # every sample writes "m C", then the right theme: reward 0.9 · 1 + 0.1 · 1 = 1 for each of the
    # 2 × 4 samples; every sample is a two-hop chain, whole
    tok = read_r.Tokenizer()
    cfg = read_r.Config(steps=2, prompts=2, group=4, log_every=1)
    rows = [r for r in read_r.make_rows(random.Random(3), 2) if r["type"] == "two_hop"]
    model = ScriptedAll(tok, solve)
    curve = read_r.grpo_train(model, ScriptedAll(tok, solve), tok, rows, "reason", cfg,
                              torch.device("cpu"), "t", 0)
    assert curve["reward"] == [1.0, 1.0]
    assert curve["chain_hits"] == [8, 8] and curve["full_chain_hits"] == [8, 8]
    assert curve["chain_n"] == [8, 8]


def by_length(words):
    """solve, except the answer: right iff the think block holds exactly 2 words, else "m0"."""
    if words[-1] != "<answer>":
        return solve(words)
    frames = words[1:11]
    pairs = list(zip(frames[0::2], frames[1::2]))
    product, mark = next((i, m) for m, i in pairs if i in read_r.PRODUCTS)
    cue = next(i for m, i in pairs if m == mark and i in read_r.CUES)
    think = words[words.index("<think>") + 1:words.index("</think>")]
    if len(think) != 2:
        return "m0"
    return read_r.THEME[read_r.PRODUCTS.index(product)][read_r.CUES.index(cue)]


def test_scramble_keeps_the_think_blocks_length():
    # the scramble replaces "m C" by 2 frame words: a policy that is right whenever its think block
    # holds 2 words stays right → scramble accuracy 1, drop 0 (an emptied block would give 0)
    tok = read_r.Tokenizer()
    cfg = read_r.Config(n_train=1, n_test=4, answer_words=1)
    rng = random.Random(1)
    train = read_r.make_rows(rng, 1)
    test = read_r.make_rows(rng, 4)
    res = read_r.evaluate(Scripted(tok, by_length), tok, train, test, "reason", cfg,
                          torch.device("cpu"), 0)
    assert res["per_task"]["two_hop"]["strict"] == 1.0
    assert res["scramble_two_hop"] == 1.0 and res["scramble_drop"] == 0.0
    # answer_after_think by hand: a 2-word block → right; 1 or 3 words → "m0" → 0
    two_hop = [r for r in test if r["type"] == "two_hop"][:3]
    thinks = [["m1", "joke"], ["joke"], ["m1", "m2", "joke"]]
    texts = read_r.answer_after_think(Scripted(tok, by_length), tok, two_hop, thinks, cfg,
                                      torch.device("cpu"))
    assert [read_r.judge(t, r["answer"], SLOT) for t, r in zip(texts, two_hop)] == [1.0, 0.0, 0.0]
    assert texts[1] == "<think> joke</think><answer> m0</answer>"


def fake_seed(cfg, seed, tok, device):
    """A run_seed stand-in with hand-set numbers: seed 5 → column 0, seed 6 → column 1."""
    k = seed - 5
    two = {"base": 0.0, "base_direct": 0.1, "sft": 0.2, "sft_trace": 0.5,
           "rl_think": [0.8, 0.2][k], "rl_nothink": [0.2, 0.4][k]}
    arms = {name: {"strict": v, "relaxed": v, "train_strict": v,
                   "per_task": {t: {"strict": v, "relaxed": v} for t in read_r.TYPES}}
            for name, v in two.items()}
    arms["rl_think"].update(chain_rate=[0.95, 0.3][k], chain_rate_before=[0.9, 0.5][k],
                            chain_rate_after=[0.95, 0.3][k], full_chain_rate=0.0,
                            acc_given_chain={"chain": 0.5, "no_chain": None},
                            acc_given_chain_before={"chain": 0.1, "no_chain": None},
                            scramble_drop=[0.6, 0.0][k])
    gate = {"direct_two_hop": [0.25, 0.5][k], "think_sft_two_hop": 1.0, "base_chain_rate": 0.9,
            "base_two_hop": 0.0, "base_steps": [400, 600][k]}
    curve = {"reward": [0.1, 0.2], "chain_hits": [1, 2], "full_chain_hits": [0, 0],
             "chain_n": [4, 4]}
    return {"gate": gate, "arms": arms, "curves": {"rl_think": curve, "rl_nothink": curve},
            "n_params": 10, "n_train": 4, "n_test": 8}


def test_run_summarises_seeds_by_hand(tmp_path, monkeypatch):
    monkeypatch.setattr(read_r, "run_seed", fake_seed)
    t0 = time.process_time()
    res = read_r.run(read_r.Config(seed=5, seeds=2, out=str(tmp_path), device="cpu"))
    # the CPU time is that of the run alone
    assert 0 <= res["cpu_time_s"] <= time.process_time() - t0
    assert res["seeds"] == [5, 6]
    head = res["headline"]

    def close(got, mean, std, worst):
        torch.testing.assert_close([got["mean"], got["std"], got["worst"]], [mean, std, worst])
    # rl_think − rl_nothink: 0.8 − 0.2 = 0.6, 0.2 − 0.4 = −0.2 → mean 0.2, std 0.4, worst −0.2
    close(head["rl_think_minus_rl_nothink_two_hop"], 0.2, 0.4, -0.2)
    # best direct: max(0.2, 0.25) = 0.25, max(0.4, 0.5) = 0.5 → 0.55, −0.3: mean 0.125, std 0.425
    close(head["rl_think_minus_best_direct_two_hop"], 0.125, 0.425, -0.3)
    close(head["rl_think_two_hop"], 0.5, 0.3, 0.2)
    close(head["rl_nothink_two_hop"], 0.3, 0.1, 0.2)
    # chain rate after − before: 0.05, −0.2 → mean −0.075, std 0.125
    close(head["chain_rate_after_minus_before"], -0.075, 0.125, -0.2)
    close(head["scramble_drop"], 0.3, 0.3, 0.0)
    gate = res["gate"]
    torch.testing.assert_close([gate["direct_two_hop"], gate["base_steps"]], [0.375, 500.0])
    assert gate["per_seed"]["base_steps"] == [400, 600]
    torch.testing.assert_close(res["arms"]["rl_think"]["strict"], 0.5)
    assert res["arms"]["rl_think"]["acc_given_chain"] == {"chain": 0.5, "no_chain": None}
    assert res["two_hop_per_seed"]["rl_nothink"] == [0.2, 0.4]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["headline"] == json.loads(json.dumps(head))


def test_run_seed_wiring(monkeypatch):
    # run_seed with stand-ins for training and evaluation that record what they were asked to do
    cfg = read_r.Config(steps=7, gate_steps=5, base_steps=11, warm_traces=5, warm_batch=2,
                        batch=6, n_train=1, n_test=1, d_model=16, n_heads=2)
    calls, grpo_calls, ready_answers, checked_types = [], [], [], set()
    accuracy = [cfg.base_target]

    def fake_sft(model, tok, sample, steps, lr, device, name, log_every, opt=None, ready=None):
        rows, modes = sample(1)
        calls.append((name, steps, lr, sorted(set(modes)), sum(r["type"] == "two_hop" for r in rows)))
        if ready is not None:
            ready_answers.append(ready(model))
            accuracy[0] = cfg.base_target - 0.01
            ready_answers.append(ready(model))
        return "opt", 9

    def fake_grpo(model, ref, tok, rows, mode, cfg, device, name, seed):
        grpo_calls.append((name, mode, ref is base_seen[0], model is ref))
        return {"reward": [0.5]}

    def fake_one_hop(model, tok, rows, cfg, device):
        checked_types.update(r["type"] for r in rows)
        return accuracy[0]

    evals = []
    base_seen = []

    def fake_eval(model, tok, train, test, mode, cfg, device, seed):
        evals.append(mode)
        if len(evals) == 3:
            base_seen.append(model)
        v = len(evals) / 10
        return {"per_task": {t: {"strict": v} for t in read_r.TYPES}, "chain_rate": v,
                "acc_given_chain": {"chain": v}}
    monkeypatch.setattr(read_r, "sft_train", fake_sft)
    monkeypatch.setattr(read_r, "grpo_train", fake_grpo)
    monkeypatch.setattr(read_r, "one_hop_accuracy", fake_one_hop)
    monkeypatch.setattr(read_r, "evaluate", fake_eval)
    res = read_r.run_seed(cfg, 0, read_r.Tokenizer(), torch.device("cpu"))
    lr, lr_sft = cfg.lr_base, cfg.lr_sft
    # gates on fresh ads of every type (direct / think traces), the base on one-hop questions, the
    # warm-start ceil(5 / 2) = 3 steps adding 2 + 2 two-hop questions, then the SFT arms
    assert [c[:4] for c in calls] == [
        ("gate_direct", 5, lr, ["direct"]), ("gate_think_sft", 5, lr, ["reason"]),
        ("base", 11, lr, ["direct", "reason"]), ("warm-start", 3, lr, ["direct", "reason"]),
        ("sft", 7, lr_sft, ["direct"]), ("sft_trace", 7, lr_sft, ["reason"])]
    assert calls[2][4] == 0 and calls[3][4] == 4
    # the base is ready at exactly the target one-hop accuracy, not below; checks are one-hop
    assert ready_answers == [True, False]
    assert checked_types == {"product_mark", "mark_cue", "cue_theme"}
    # GRPO from a copy of the base, with the base as π_ref; think / answer at once
    assert grpo_calls == [("rl_think", "reason", True, False), ("rl_nothink", "direct", True, False)]
    # evaluations: gates (direct, reason), base (reason, direct), the 4 arms
    assert evals == ["direct", "reason", "reason", "direct", "direct", "reason", "reason", "direct"]
    gate = res["gate"]
    assert gate["base_steps"] == 9
    torch.testing.assert_close([gate["direct_two_hop"], gate["think_sft_two_hop"],
                                gate["base_chain_rate"], gate["base_two_hop"]], [0.1, 0.2, 0.3, 0.3])
    rl = res["arms"]["rl_think"]
    torch.testing.assert_close([rl["chain_rate_before"], rl["chain_rate_after"]], [0.3, 0.7])
    assert rl["acc_given_chain_before"] == {"chain": 0.3}
    assert set(res["curves"]) == {"rl_think", "rl_nothink"}
    assert (res["n_train"], res["n_test"]) == (4, 4)


def test_generate_counts_the_first_word_id_as_an_answer_word():
    # "m0" is the first word id (= n_specials): it fills the answer budget like any other word
    tok = read_r.Tokenizer()
    assert tok.id["m0"] == tok.n_specials
    row = read_r.question(read_r.make_ad(random.Random(0)), "two_hop", 0)
    prompt = torch.tensor([tok.encode(read_r.prompt_words(row, "direct"))])
    tokens, alive, chosen = read_r.generate(Scripted(tok, lambda words: "m0"), prompt, 4, tok.id, 1)
    assert [tok.vocab[i] for i in tokens[0].tolist()] == ["m0", "</answer>", "<pad>", "<pad>"]
    assert chosen[0].tolist() == [True, False, False, False]


def test_gpt_cache_carries_the_last_word():
    # n_specials 8: ids 0–7 are tags, 8 (the first word id) and up are words
    torch.manual_seed(0)
    model = read_r.GPT(12, 8, 16, 1, 2)
    # [8, 2]: the last token is a tag, so the last word is 8; [2, 9] → 9; [3, 2] (tags only) → 0
    _, cache = model(torch.tensor([[8, 2], [2, 9], [3, 2]]))
    assert cache.last_word.tolist() == [8, 9, 0]
    # through the cache: a tag after [8, 2] keeps 8; a word replaces it
    _, step = model(torch.tensor([[5], [10], [11]]), cache)
    assert step.last_word.tolist() == [8, 10, 11]


def test_data_file_of_one_and_two_rows(tmp_path):
    rows = read_r.make_rows(random.Random(0), 1)
    path = tmp_path / "ads.jsonl"
    cfg = read_r.Config(data=str(path))
    # 2 rows: int(0.8 · 2) = 1 training row, 1 test row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert read_r.load_rows(cfg, 0) == (rows[:1], rows[1:2])
    # 1 row: it is both the training and the test set (there is nothing else to test on)
    path.write_text(json.dumps(rows[0]) + "\n")
    assert read_r.load_rows(cfg, 0) == (rows[:1], rows[:1])


class Coin(ScriptedAll):
    """solve, except the answer: the right theme with logit w (a parameter, 0 at first: a fair
    coin) or "m0" with logit 0."""

    def __init__(self, tok):
        super().__init__(tok, solve)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx, cache=None):
        logits, seq = super().forward(idx, cache)
        logits = logits.detach()
        pick = torch.zeros_like(logits)
        n_new = idx.shape[1]
        for i, row in enumerate(seq.tolist()):
            for k in range(n_new):
                words = [self.tok.vocab[j] for j in row[:len(row) - n_new + k + 1]]
                if words[-1] == "<answer>":
                    right = solve(words)
                    logits[i, k] = -30.0
                    logits[i, k, self.tok.id[right]] = 0.0
                    logits[i, k, self.tok.id["m0"]] = 0.0
                    pick[i, k, self.tok.id[right]] = 1.0
        return logits + self.w * pick, seq


def test_one_grpo_step_raises_the_rewarded_answer():
    # right answers score 1, "m0" 0.1 (format only): within a mixed group the right samples get
    # Â > 0, so one step raises w, the logit of the right theme (a uniform group teaches nothing)
    tok = read_r.Tokenizer()
    cfg = read_r.Config(steps=1, prompts=2, group=4, lr_rl=0.1, log_every=1)
    rows = [r for r in read_r.make_rows(random.Random(3), 2) if r["type"] == "two_hop"]
    torch.manual_seed(1)
    model = Coin(tok)
    curve = read_r.grpo_train(model, Coin(tok), tok, rows, "reason", cfg, torch.device("cpu"), "t", 0)
    assert 0.1 < curve["reward"][0] < 1.0  # some right, some wrong
    # Adam's first step moves w by about lr = 0.1 in the direction of the gradient's sign
    assert 0.05 < model.w.item() < 0.15


def test_evaluate_samples_the_chain_rate_at_temperature_one():
    # Coin at w = ln 4: greedy always takes the right theme → two-hop strict 1; sampled at T = 1
    # P(right) = 4 / (4 + 1) = 0.8 (32 samples: sd 0.07), every sample after the whole chain
    tok = read_r.Tokenizer()
    cfg = read_r.Config(n_train=1, n_test=32, answer_words=1)
    rng = random.Random(2)
    train = read_r.make_rows(rng, 1)
    test = read_r.make_rows(rng, 32)
    model = Coin(tok)
    with torch.no_grad():
        model.w.fill_(torch.log(torch.tensor(4.0)).item())
    res = read_r.evaluate(model, tok, train, test, "reason", cfg, torch.device("cpu"), 0)
    assert res["per_task"]["two_hop"]["strict"] == 1.0
    assert res["chain_rate"] == 1.0 and res["full_chain_rate"] == 1.0
    assert 0.55 < res["acc_given_chain"]["chain"] < 1.0
    assert res["acc_given_chain"]["no_chain"] is None
    # the readiness check is greedy: right after thinking, "m0" answering at once → exactly 1/2
    two_hop = [r for r in test if r["type"] == "two_hop"]
    torch.manual_seed(0)
    assert read_r.one_hop_accuracy(model, tok, two_hop, cfg, torch.device("cpu")) == 0.5
