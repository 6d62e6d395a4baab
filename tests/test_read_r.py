"""Tests for read_r.py: the judge and the reward, the chain metric, the ad generator, the model's
previous-word feature and KV-cache decoding with its answer budget, SFT and GRPO steps, and an
evaluation of a scripted policy whose answers are known."""
import json
import random

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
