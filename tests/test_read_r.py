"""Tests for read_r.py: the judge and the reward, the chain check, the ad generator, the model's
previous-word feature and KV-cache decoding with its answer budget, SFT and GRPO steps, the base's
training and warm-start, evaluations of scripted policies whose answers are known, the gates, the
per-seed verdicts and the rendered record."""
import json
import math
import random

import pytest
import torch

import read_r

SLOT = read_r.SLOT_OF
CPU = torch.device("cpu")


# --- the judge, the reward and the chain ---


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


def test_chain_check_full_chain_and_mark_only():
    check = read_r.chain_check
    # (full, mark_only)
    assert check(["m3", "joke"], "m3", "joke", SLOT) == (True, False)  # "m C": the whole chain
    assert check(["m3"], "m3", "joke", SLOT) == (False, True)  # "m" alone, reported apart
    assert check(["car", "m3", "joke"], "m3", "joke", SLOT) == (True, False)  # a product: harmless
    assert check(["joke", "m3"], "m3", "joke", SLOT) == (False, False)  # the cue before the mark
    assert check(["m3", "skull"], "m3", "joke", SLOT) == (False, False)  # the wrong cue
    assert check(["m4", "joke"], "m3", "joke", SLOT) == (False, False)  # the wrong mark
    assert check(["m4"], "m3", "joke", SLOT) == (False, False)
    assert check(["m3", "m4", "joke"], "m3", "joke", SLOT) == (False, False)  # two marks: a list
    assert check(["m3", "joke", "skull"], "m3", "joke", SLOT) == (False, False)  # two cues
    assert check([], "m3", "joke", SLOT) == (False, False)


def test_chain_hits_reads_two_hop_rows_only():
    rows = [{"type": "two_hop", "chain": "m3 joke"}, {"type": "mark_cue", "chain": "m3 joke"},
            {"type": "two_hop", "chain": "m5 crowd"}, {"type": "two_hop", "chain": "m1 skull"}]
    texts = ["<think> m3 joke</think><answer> safety</answer>", "<think> m3 joke</think>",
             "<think> m5</think><answer> safety</answer>", "<answer> safety</answer>"]
    hits = read_r.chain_hits(texts, rows)
    assert [tuple(h) for h in hits] == [(True, False), (False, True), (False, False)]


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
    # mark_theme, asked = 2 (crowd, mark m9): trace "m9 crowd", THEME[0][2] = THEMES[2] belonging
    mark_theme = read_r.question(ad, "mark_theme", 2)
    assert (mark_theme["arg"], mark_theme["answer"], mark_theme["chain"]) == (
        "m9", "belonging", "m9 crowd")
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
    # the base's one-hop data: no two-hop question, and mark_theme only with its trace
    sample = read_r.fresh_sampler(random.Random(0), 400, read_r.ONE_HOP, read_r.BASE_MODES)
    rows, modes = sample(1)
    seen = {(r["type"], m) for r, m in zip(rows, modes)}
    assert seen == {(t, m) for t in read_r.ONE_HOP for m in ("reason", "direct")} - {
        ("mark_theme", "direct")}
    # the warm-start: 6 one-hop questions, then 2 two-hop ones with their trace, 2 answered at once
    rows, modes = read_r.warm_sampler(random.Random(0), 6, 2)(1)
    assert len(rows) == 10 and "two_hop" not in {r["type"] for r in rows[:6]}
    assert [(r["type"], m) for r, m in zip(rows[6:], modes[6:])] == [
        ("two_hop", "reason")] * 2 + [("two_hop", "direct")] * 2
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


def test_previous_word_skips_tags():
    # ids: tags are < 3 here; sequence [5, 1, 6, 2, 2, 7]: previous words (strictly before)
    # pos 0: first (9); 1: 5; 2: 5; 3: 6; 4: 6; 5: 6
    tokens = torch.tensor([[5, 1, 6, 2, 2, 7]])
    prev = read_r.previous_word(tokens, tokens >= 3, torch.tensor([9]))
    assert prev.tolist() == [[9, 5, 5, 6, 6, 6]]
    with pytest.raises(ValueError):
        read_r.previous_word(tokens, tokens >= 3, torch.tensor([[9]]))


# --- the model ---


def test_last_word_and_block_shapes():
    # n_specials 3: [5, 1, 6, 2] → 6; [2, 1, 0, 0] (tags only) → first (9); [7] → 7
    idx = torch.tensor([[5, 1, 6, 2], [2, 1, 0, 0], [7, 0, 0, 0]])
    assert read_r.last_word(idx, 3, torch.tensor([9, 9, 9])).tolist() == [6, 9, 7]
    block = read_r.Block(16, 4)
    x = torch.randn(2, 5, 16)
    assert block(x).shape == (2, 5, 16)
    # the cache holds (B, n_head, T, hs) and grows by one position a step
    cache = read_r.KVCache()
    block(x, cache)
    assert cache.k.shape == (2, 4, 5, 4)
    block(x[:, :1], cache)
    assert cache.k.shape == cache.v.shape == (2, 4, 6, 4)


def test_kv_cache_decoding_equals_full_recompute():
    # a prompt with tags (ids < 8) and words; decoding with the cache (which must carry the last
    # word across steps for the previous-word feature) equals recomputing the whole sequence
    torch.manual_seed(0)
    model = read_r.GPT(30, 8, 16, 2, 2)
    model.eval()
    prompt = torch.randint(0, 30, (5, 7))
    prompt[:, -1] = 3  # the prompt ends with a tag, so the last word is further back
    ids = {"<answer>": 29, "</answer>": 28, "<pad>": 0}
    tokens, alive, chosen = read_r.generate(model, prompt, 6, ids, answer_words=9, greedy=True)
    seq = prompt
    for _ in range(6):  # greedy without a cache: recompute the whole sequence each step
        nxt = model(seq)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    ref = seq[:, 7:]
    assert torch.equal(tokens[alive], ref[alive])
    # the log-probs of the response equal those of a step-by-step loop
    lp = read_r.response_logp(model, prompt, ref)
    steps = [torch.log_softmax(model(seq[:, :7 + t])[:, -1], -1).gather(-1, ref[:, t:t + 1])[:, 0]
             for t in range(6)]
    torch.testing.assert_close(lp, torch.stack(steps, 1), atol=1e-5, rtol=1e-5)


def test_gpt_embeddings_start_small():
    # both embeddings are drawn from N(0, 0.02²) (3136 values each: the sample std within 10 %)
    torch.manual_seed(0)
    model = read_r.GPT(49, 12, 64, 1, 4)
    for weight in (model.tok.weight, model.prev.weight):
        assert abs(weight.std().item() - 0.02) < 0.002
        assert abs(weight.mean().item()) < 0.002


def test_gpt_input_is_the_token_plus_the_previous_word():
    # the block sees tok(x_t) + prev(the last word before t): captured at the block's input
    torch.manual_seed(0)
    model = read_r.GPT(12, 8, 16, 1, 2)
    idx = torch.tensor([[8, 2, 9, 3, 10]])  # words 8, 9, 10; tags 2, 3
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(idx)
    prev = torch.tensor([[0, 8, 8, 9, 9]])  # pad, then the last word strictly before each position
    torch.testing.assert_close(seen[0], model.tok(idx) + model.prev(prev))


class Scripted(torch.nn.Module):
    """A policy whose next word is policy(words so far); the first KVCache keeps the words."""

    def __init__(self, tok, policy):
        super().__init__()
        self.tok = tok
        self.policy = policy
        self.n_specials = tok.n_specials
        self.blocks = [None]  # one KVCache

    def words_of(self, idx, caches):
        seq = idx
        if caches is not None:
            seq = caches[0].append(idx[:, None, :, None], idx[:, None, :, None])[0][:, 0, :, 0]
        return seq

    def forward(self, idx, caches=None, first=None):
        seq = self.words_of(idx, caches)
        logits = torch.full((idx.shape[0], idx.shape[1], len(self.tok.vocab)), -30.0)
        for i, row in enumerate(seq.tolist()):
            words = [self.tok.vocab[j] for j in row]
            logits[i, -1, self.tok.id[self.policy(words)]] = 30.0
        return logits


def solve(words):
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


class Fixed(torch.nn.Module):
    """Logits [−100, 0, ln 9, −100] at every position; no tags (n_specials 0)."""
    n_specials = 0
    blocks = []

    def forward(self, idx, caches=None, first=None):
        row = torch.tensor([-100.0, 0.0, torch.log(torch.tensor(9.0)).item(), -100.0])
        return row.expand(idx.shape[0], idx.shape[1], 4).clone()


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
    # "m0" is the first word id (= n_specials): it fills the answer budget like any other word
    assert tok.id["m0"] == tok.n_specials
    tokens, alive, chosen = read_r.generate(Scripted(tok, lambda words: "m0"), prompt, 4, tok.id, 1)
    assert [tok.vocab[i] for i in tokens[0].tolist()] == ["m0", "</answer>", "<pad>", "<pad>"]
    assert chosen[0].tolist() == [True, False, False, False]


def test_generate_samples_at_its_temperature_from_its_own_stream():
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
    # a generator of its own: the same draws from the same seed, torch's global stream untouched
    state = torch.get_rng_state()
    draws = [read_r.generate(Fixed(), prompt[:50], 1, ids, 1,
                             generator=torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and torch.equal(torch.get_rng_state(), state)


# --- training ---


def test_batch_tensors_and_sft_loss_by_hand():
    tok = read_r.Tokenizer()
    row = read_r.question(read_r.make_ad(random.Random(0)), "two_hop", 0)
    x, m = read_r.batch_tensors(tok, [row, row], ["direct", "reason"], CPU)
    n_prompt = len(read_r.prompt_words(row, "direct"))
    # direct: 17 prompt tokens and 2 target tokens, padded to the reason row's 15 + 6 = 21
    assert x.shape == (2, 21)
    assert m[0].tolist() == [0.0] * n_prompt + [1.0] * 2 + [0.0] * 2
    assert m[1].sum().item() == 6 and x[0, -1].item() == tok.id["<pad>"]

    class Uniform(torch.nn.Module):
        def forward(self, idx):
            return torch.zeros(idx.shape[0], idx.shape[1], 50)
    # uniform logits over the 50 tokens: the cross-entropy of every target is ln 50
    assert len(tok.vocab) == 50
    torch.testing.assert_close(read_r.sft_loss(Uniform(), x, m), torch.log(torch.tensor(50.0)))


def test_sft_train_steps_early_stop_and_a_fresh_optimizer_each_call():
    tok = read_r.Tokenizer()
    rows = read_r.make_rows(random.Random(0), 2)
    torch.manual_seed(0)
    model = read_r.GPT(len(tok.vocab), tok.n_specials, 16, 1, 2)
    x, m = read_r.batch_tensors(tok, rows, ["reason"] * len(rows), CPU)
    before = read_r.sft_loss(model, x, m).item()
    seen = []

    def sample(step):
        seen.append(step)
        return rows, ["reason"] * len(rows)
    assert read_r.sft_train(model, tok, sample, 3, 1e-2, CPU, read_r.Tag("t", 0, 10)) == 3
    assert seen == [1, 2, 3] and read_r.sft_loss(model, x, m).item() < before
    # early stop: ready() is asked every log_every steps
    asked = []

    def ready(m):
        asked.append(True)
        return len(asked) == 2
    assert read_r.sft_train(model, tok, sample, 9, 1e-2, CPU, read_r.Tag("t", 0, 2), ready) == 4
    assert len(asked) == 2
    # each call starts a fresh Adam at its own lr: its first step equals a new Adam's first step
    # from the same weights (a reused Adam state would move the weights differently)
    twin = read_r.GPT(len(tok.vocab), tok.n_specials, 16, 1, 2)
    twin.load_state_dict(model.state_dict())
    read_r.sft_train(model, tok, sample, 1, 3e-4, CPU, read_r.Tag("t", 0, 10))
    opt = torch.optim.Adam(twin.parameters(), lr=3e-4)
    read_r.update(opt, twin, read_r.sft_loss(twin, x, m))
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want)


def test_a_non_finite_loss_stops_the_run_at_its_step():
    tok = read_r.Tokenizer()
    rows = read_r.make_rows(random.Random(0), 1)

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, idx):
            return torch.full((idx.shape[0], idx.shape[1], len(tok.vocab)), float("nan")) + self.w
    with pytest.raises(read_r.NonFinite, match="step 1: loss is nan"):
        read_r.sft_train(Broken(), tok, lambda step: (rows, ["reason"] * len(rows)), 3, 1e-3, CPU,
                         read_r.Tag("t", 0, 1))


def test_train_base_readiness_with_thinking_then_warm_start_with_a_fresh_optimizer(monkeypatch):
    # stand-ins record what the base's training asks for
    cfg = read_r.Config(base_steps=11, warm_traces=5, warm_max=13, warm_batch=2, batch=6,
                        n_embd=16, n_head=2)
    calls = []
    asked_modes = set()
    asked_types = set()
    accuracy = [cfg.base_target]
    forced = [cfg.warm_target]

    def fake_sft(model, tok, sample, steps, lr, device, tag, ready=None):
        rows, modes = sample(1)
        calls.append((tag.arm, steps, lr, tag.log_every,
                      sorted({(r["type"], m) for r, m in zip(rows, modes)})))
        accuracy[0] = cfg.base_target
        forced[0] = cfg.warm_target
        answers = [ready(model)]
        accuracy[0] = cfg.base_target - 0.01
        forced[0] = cfg.warm_target - 0.01
        answers.append(ready(model))
        assert answers == [True, False]  # ready at exactly the target, not below
        return 9 if tag.arm == "base" else 4

    def fake_accuracy(model, tok, rows, mode, cfg, device):
        asked_modes.add(mode)
        asked_types.update(r["type"] for r in rows)
        assert len(rows) == 32 * 4  # 32 fresh ads, their 4 one-hop questions
        return accuracy[0]

    def fake_forced(model, tok, rows, cfg, device):
        asked_types.update("forced " + r["type"] for r in rows)
        assert len(rows) == 64  # 64 fresh ads, their two-hop question
        return forced[0]
    monkeypatch.setattr(read_r, "sft_train", fake_sft)
    monkeypatch.setattr(read_r, "greedy_accuracy", fake_accuracy)
    monkeypatch.setattr(read_r, "forced_chain_accuracy", fake_forced)
    base = read_r.train_base(read_r.Tokenizer(), cfg, CPU, 0)
    # 9 one-hop steps; the warm-start's 4 steps of 2 two-hop traces = 8 traces
    assert (base.steps, base.warm_traces) == (9, 8) and isinstance(base.model, read_r.GPT)
    # readiness: one-hop questions answered after their trace only (answering at once is no part
    # of the chain), 32 ads × 4 one-hop types; the warm-start's: two-hop with "m C" forced
    assert asked_modes == {"reason"} and asked_types == set(read_r.ONE_HOP) | {"forced two_hop"}
    # the base: one-hop only at lr_base; the warm-start: at most ceil(13 / 2) = 7 steps at lr_warm
    # (a fresh optimizer), checked every ceil(5 / 2) = 3 steps, two-hop questions in both modes
    # beside the one-hop ones
    assert [c[:4] for c in calls] == [("base", 11, cfg.lr_base, cfg.log_every),
                                      ("warm-start", 7, cfg.lr_warm, 3)]
    assert "two_hop" not in {t for t, m in calls[0][4]}
    assert {("two_hop", "reason"), ("two_hop", "direct")} <= set(calls[1][4])
    # no warm-start when warm_traces is 0
    calls.clear()
    base = read_r.train_base(read_r.Tokenizer(), read_r.Config(warm_traces=0, base_steps=2,
                                                               batch=2, n_embd=16, n_head=2), CPU, 0)
    assert [c[0] for c in calls] == ["base"] and base.warm_traces == 0


def test_train_gate_direct_fixed_steps_think_until_target(monkeypatch):
    cfg = read_r.Config(gate_steps=7, think_gate_steps=13, batch=40, n_embd=16, n_head=2)
    calls = []
    asked = []

    def fake_sft(model, tok, sample, steps, lr, device, tag, ready=None):
        rows, modes = sample(1)
        calls.append((tag.arm, steps, lr, set(modes), ready is None))
        if ready is not None:
            assert ready(model) and not ready(model)
        return steps

    def fake_accuracy(model, tok, rows, mode, cfg, device):
        asked.append((mode, {r["type"] for r in rows}, len(rows)))
        return [cfg.think_target, cfg.think_target - 0.01][len(asked) - 1]
    monkeypatch.setattr(read_r, "sft_train", fake_sft)
    monkeypatch.setattr(read_r, "greedy_accuracy", fake_accuracy)
    tok = read_r.Tokenizer()
    assert read_r.train_gate(tok, cfg, CPU, 0, "direct")[1] == 7
    assert read_r.train_gate(tok, cfg, CPU, 0, "reason")[1] == 13
    assert calls == [("gate_direct", 7, cfg.lr_base, {"direct"}, True),
                     ("gate_think_sft", 13, cfg.lr_base, {"reason"}, False)]
    # the think gate stops once its two-hop accuracy (64 fresh ads) reaches think_target
    assert asked[0] == ("reason", {"two_hop"}, 64)


# --- GRPO training ---


class ScriptedAll(Scripted):
    """Scripted at every position (response_logp needs them all), plus one parameter, so an
    optimiser can be built; positions where the policy has no answer (the prompt) are uniform."""

    def __init__(self, tok, policy):
        super().__init__(tok, policy)
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx, caches=None, first=None):
        return self.scores(self.words_of(idx, caches), idx.shape[1])

    def scores(self, seq, n_new):
        """Logits (B, n_new, V) of the last n_new positions of the words so far seq (B, T)."""
        logits = torch.zeros(seq.shape[0], n_new, len(self.tok.vocab))
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
        return logits + self.bias


class Coin(ScriptedAll):
    """solve, except the answer: the right theme with logit w (a parameter, 0 at first: a fair
    coin) or "m0" with logit 0."""

    def __init__(self, tok):
        super().__init__(tok, solve)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def scores(self, seq, n_new):
        logits = super().scores(seq, n_new).detach()
        pick = torch.zeros_like(logits)
        for i, row in enumerate(seq.tolist()):
            for k in range(n_new):
                words = [self.tok.vocab[j] for j in row[:len(row) - n_new + k + 1]]
                if words[-1] == "<answer>":
                    right = solve(words)
                    logits[i, k] = -30.0
                    logits[i, k, self.tok.id[right]] = 0.0
                    logits[i, k, self.tok.id["m0"]] = 0.0
                    pick[i, k, self.tok.id[right]] = 1.0
        return logits + self.w * pick


def two_hop_rows(seed, n_ads):
    return [r for r in read_r.make_rows(random.Random(seed), n_ads) if r["type"] == "two_hop"]


def test_grpo_train_curve_of_a_policy_that_always_solves():
    # every sample writes "m C", then the right theme: reward 0.9 · 1 + 0.1 · 1 = 1 for each of the
    # 2 × 4 samples; every sample is the full chain, none "m" alone
    tok = read_r.Tokenizer()
    cfg = read_r.Config(steps=2, prompts=2, group=4, log_every=1)
    model = ScriptedAll(tok, solve)
    curve = read_r.grpo_train(model, ScriptedAll(tok, solve), tok, two_hop_rows(3, 2), "reason",
                              cfg, CPU, read_r.Tag("t", 0, 1))
    assert curve == {"reward": [1.0, 1.0], "full_chain_hits": [8, 8], "mark_only_hits": [0, 0],
                     "chain_n": [8, 8]}


def test_one_grpo_step_raises_the_rewarded_answer():
    # right answers score 1, "m0" 0.1 (format only): within a mixed group the right samples get
    # Â > 0, so one step raises w, the logit of the right theme (a uniform group teaches nothing)
    tok = read_r.Tokenizer()
    cfg = read_r.Config(steps=1, prompts=2, group=4, lr_rl=0.1, log_every=1)
    torch.manual_seed(1)
    model = Coin(tok)
    curve = read_r.grpo_train(model, Coin(tok), tok, two_hop_rows(3, 2), "reason", cfg, CPU,
                              read_r.Tag("t", 0, 1))
    assert 0.1 < curve["reward"][0] < 1.0  # some right, some wrong
    # Adam's first step moves w by about lr = 0.1 in the direction of the gradient's sign
    assert 0.05 < model.w.item() < 0.15


# --- evaluation ---


def by_length(words):
    """solve, except the answer: right iff the think block holds exactly 2 words, else "m0"."""
    if words[-1] != "<answer>":
        return solve(words)
    frames = words[1:11]
    pairs = list(zip(frames[0::2], frames[1::2]))
    product = next(i for m, i in pairs if i in read_r.PRODUCTS)
    mark = next(m for m, i in pairs if i in read_r.PRODUCTS)
    cue = next(i for m, i in pairs if m == mark and i in read_r.CUES)
    think = words[words.index("<think>") + 1:words.index("</think>")]
    if len(think) != 2:
        return "m0"
    return read_r.THEME[read_r.PRODUCTS.index(product)][read_r.CUES.index(cue)]


def test_evaluate_a_scripted_policy_leaves_the_global_random_stream_alone():
    tok = read_r.Tokenizer()
    cfg = read_r.Config(n_train=2, n_test=6, answer_words=1)
    rng = random.Random(0)
    train = read_r.make_rows(rng, 2)
    test = read_r.make_rows(rng, 6)
    model = Scripted(tok, solve)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    res = read_r.evaluate(model, tok, train, test, "reason", cfg, CPU, 0)
    # its samples come from a stream of its own: what is trained next does not depend on them
    assert torch.equal(torch.get_rng_state(), state)
    # the scripted policy writes "m C" and the theme of C: every two-hop answer right, full chain
    assert res["per_task"]["two_hop"] == {"strict": 1.0, "relaxed": 1.0}
    assert res["two_hop_strict"] == 1.0 and res["full_chain_rate"] == 1.0
    assert res["mark_only_rate"] == 0.0
    assert res["acc_given_full_chain"] == 1.0 and res["acc_given_no_full_chain"] is None
    # the other types get the two-hop answer: product_mark wants m, mark_cue C' → wrong; the two
    # theme types are right when their cue is the product's
    assert res["per_task"]["product_mark"]["strict"] == 0.0
    assert res["per_task"]["mark_cue"]["strict"] == 0.0
    assert res["train_per_task"]["two_hop"] == 1.0
    torch.testing.assert_close(res["train_strict"], sum(res["train_per_task"].values()) / 5)
    theme = [res["per_task"][t]["strict"] for t in ("cue_theme", "mark_theme")]
    torch.testing.assert_close(res["one_hop_strict"], sum(theme) / 4)
    torch.testing.assert_close(res["strict"], (1 + sum(theme)) / 5)
    # scramble: two random frame words replace "m C"; the answer follows the scrambled cue
    assert res["scramble_two_hop"] < 1.0
    torch.testing.assert_close(res["scramble_drop"], 1.0 - res["scramble_two_hop"])
    # "m" alone, then "m0": no full chain, every chain "m" only, nothing right
    def mark_only(words):
        if words[-1] in read_r.MARKS and "</think>" not in words:
            return "</think>"
        return solve(words)
    res = read_r.evaluate(Scripted(tok, mark_only), tok, train, test, "reason", cfg, CPU, 0)
    assert (res["full_chain_rate"], res["mark_only_rate"]) == (0.0, 1.0)
    assert res["acc_given_full_chain"] is None and res["acc_given_no_full_chain"] == 0.0
    # answering at once: "m0" everywhere → 0, and no chain numbers
    direct = read_r.evaluate(model, tok, train, test, "direct", cfg, CPU, 0)
    assert direct["strict"] == 0.0 and "full_chain_rate" not in direct
    # the early-stop check is greedy, in the mode asked: 1 with thinking, 0 answering at once
    two_hop = [r for r in test if r["type"] == "two_hop"]
    assert read_r.greedy_accuracy(model, tok, two_hop, "reason", cfg, CPU) == 1.0
    assert read_r.greedy_accuracy(model, tok, two_hop, "direct", cfg, CPU) == 0.0


def test_scramble_keeps_the_think_blocks_length():
    # the scramble replaces "m C" by 2 frame words: a policy that is right whenever its think block
    # holds 2 words stays right → scramble accuracy 1, drop 0 (an emptied block would give 0)
    tok = read_r.Tokenizer()
    cfg = read_r.Config(n_train=1, n_test=4, answer_words=1)
    rng = random.Random(1)
    train = read_r.make_rows(rng, 1)
    test = read_r.make_rows(rng, 4)
    res = read_r.evaluate(Scripted(tok, by_length), tok, train, test, "reason", cfg, CPU, 0)
    assert res["per_task"]["two_hop"]["strict"] == 1.0
    assert res["scramble_two_hop"] == 1.0 and res["scramble_drop"] == 0.0
    # answer_after_think by hand: a 2-word block → right; 1 or 3 words → "m0" → 0
    two_hop = [r for r in test if r["type"] == "two_hop"][:3]
    thinks = [["m1", "joke"], ["joke"], ["m1", "m2", "joke"]]
    texts = read_r.answer_after_think(Scripted(tok, by_length), tok, two_hop, thinks, cfg, CPU)
    assert [read_r.judge(t, r["answer"], SLOT) for t, r in zip(texts, two_hop)] == [1.0, 0.0, 0.0]
    assert texts[1] == "<think> joke</think><answer> m0</answer>"


def test_evaluate_samples_the_chain_at_temperature_one():
    # Coin at w = ln 4: greedy always takes the right theme → two-hop strict 1; sampled at T = 1
    # P(right) = 4 / (4 + 1) = 0.8 (32 samples: sd 0.07), every sample after the whole chain
    tok = read_r.Tokenizer()
    cfg = read_r.Config(n_train=1, n_test=32, answer_words=1)
    rng = random.Random(2)
    train = read_r.make_rows(rng, 1)
    test = read_r.make_rows(rng, 32)
    model = Coin(tok)
    with torch.no_grad():
        model.w.fill_(math.log(4.0))
    res = read_r.evaluate(model, tok, train, test, "reason", cfg, CPU, 0)
    assert res["per_task"]["two_hop"]["strict"] == 1.0
    assert res["full_chain_rate"] == 1.0 and res["mark_only_rate"] == 0.0
    assert 0.55 < res["acc_given_full_chain"] < 1.0
    assert res["acc_given_no_full_chain"] is None


def test_pass_at_k_and_the_forced_chain():
    tok = read_r.Tokenizer()
    cfg = read_r.Config()
    rows = two_hop_rows(4, 40)
    # always right → 1; never right ("m0") → 0; no rows → None
    assert read_r.pass_at_k(Scripted(tok, solve), tok, rows, 8, cfg, CPU, 0) == 1.0
    assert read_r.pass_at_k(Scripted(tok, lambda w: by_length(w) if w[-1] != "<answer>" else "m0"),
                            tok, rows, 8, cfg, CPU, 0) == 0.0
    assert read_r.pass_at_k(Scripted(tok, solve), tok, [], 8, cfg, CPU, 0) is None
    # right only on the car ads: pass@8 is the share of car ads, each question judged on its own
    # 8 samples
    def car_only(words):
        return solve(words) if words[-1] != "<answer>" or "car" in words else "m0"
    cars = sum("car" in r["frames"].split() for r in rows) / len(rows)
    assert 0 < cars < 1
    assert read_r.pass_at_k(Scripted(tok, car_only), tok, rows, 8, cfg, CPU, 0) == cars
    # a fair coin (Coin at w = 0): pass@1 ≈ 0.5 and pass@8 = 1 − 2^−8 ≈ 0.996 over 40 questions
    torch.manual_seed(5)
    state = torch.get_rng_state()
    one = read_r.pass_at_k(Coin(tok), tok, rows, 1, cfg, CPU, 0)
    eight = read_r.pass_at_k(Coin(tok), tok, rows, 8, cfg, CPU, 0)
    assert 0.25 < one < 0.75 and eight >= 0.95
    assert torch.equal(torch.get_rng_state(), state)
    # the gold chain "m C" forced: solve answers the theme of the forced cue → 1; by_length (right
    # after any 2 words) → 1; a policy that ignores the block and answers "m0" → 0
    assert read_r.forced_chain_accuracy(Scripted(tok, solve), tok, rows, cfg, CPU) == 1.0
    assert read_r.forced_chain_accuracy(Scripted(tok, by_length), tok, rows, cfg, CPU) == 1.0

    def wrong_cue(words):  # answers as if the think block named the cue after the right one
        if words[-1] != "<answer>":
            return solve(words)
        cue = words[words.index("</think>") - 1]
        shifted = read_r.CUES[(read_r.CUES.index(cue) + 1) % 4]
        return solve(words[:-3] + [shifted] + words[-2:])
    assert read_r.forced_chain_accuracy(Scripted(tok, wrong_cue), tok, rows, cfg, CPU) == 0.0


# --- gates, verdicts, the record ---


def test_failed_checks_at_the_thresholds():
    at_least = read_r.Check("a", 0.5, True)
    at_most = read_r.Check("b", 0.35, False)
    assert read_r.failed_checks({"a": 0.5, "b": 0.35}, [at_least, at_most]) == []
    assert read_r.failed_checks({"a": 0.499, "b": 0.351}, [at_least, at_most]) == [
        "a 0.499 (needs >= 0.5)", "b 0.351 (needs <= 0.35)"]
    assert read_r.failed_checks({"a": None}, [at_least]) == ["a — (needs >= 0.5)"]
    # the gates and goals the study states
    gates = {c.key: (c.threshold, c.at_least) for c in read_r.GATES}
    assert gates == {"base_pass_at_8": (0.5, True), "base_full_chain_rate": (0.05, True),
                     "forced_chain_accuracy": (0.8, True), "direct_two_hop": (0.35, False),
                     "think_sft_two_hop": (0.9, True)}
    goals = {c.key: (c.threshold, c.at_least) for c in read_r.GOALS}
    assert goals == {"margin": (0.2, True), "full_chain_rate_after": (0.5, True),
                     "scramble_drop": (0.3, True)}


def gate_of(**changes):
    gate = {"base_pass_at_8": 0.6, "base_full_chain_rate": 0.1, "forced_chain_accuracy": 0.9,
            "direct_two_hop": 0.3, "think_sft_two_hop": 0.95, "base_greedy_two_hop": 0.2,
            "base_steps": 400, "warm_traces": 256}
    gate.update(changes)
    return gate


def arm_of(two_hop, **extra):
    return {"strict": two_hop, "relaxed": two_hop, "two_hop_strict": two_hop,
            "one_hop_strict": 0.9, "train_strict": two_hop,
            "per_task": {t: {"strict": two_hop, "relaxed": two_hop} for t in read_r.TYPES},
            **extra}


def arms_of(rl_think, sft=0.32, full=0.7, scramble=0.4):
    chain = {"full_chain_rate": 0.2, "mark_only_rate": 0.5, "scramble_drop": 0.1}
    return {"base": arm_of(0.2, **chain), "base_direct": arm_of(0.25), "sft": arm_of(sft),
            "sft_trace": arm_of(0.9, **chain), "rl_nothink": arm_of(0.28),
            "rl_think": arm_of(rl_think, full_chain_rate=full, mark_only_rate=0.1,
                               scramble_drop=scramble)}


def test_seed_verdict_against_the_best_direct_arm():
    # direct: gate 0.30, base_direct 0.25, sft 0.32, rl_nothink 0.28 → best sft 0.32;
    # margin 0.60 − 0.32 = 0.28 ≥ 0.2, full chain 0.7 ≥ 0.5, scramble 0.4 ≥ 0.3: met
    v = read_r.seed_verdict(3, gate_of(), arms_of(0.6))
    assert (v["best_direct_arm"], v["best_direct_two_hop"]) == ("sft", 0.32)
    torch.testing.assert_close(v["margin"], 0.28)
    assert v["met"] and v["failed_gates"] == [] and v["missed_goals"] == []
    # the direct gate model is a direct arm too: at 0.34 it is the best → margin 0.26
    v = read_r.seed_verdict(3, gate_of(direct_two_hop=0.34), arms_of(0.6))
    assert v["best_direct_arm"] == "gate_direct"
    torch.testing.assert_close(v["margin"], 0.26)
    # a margin of 0.15 (0.47 − 0.32), a think-SFT gate of 0.5 and a scramble of 0.2 are named
    v = read_r.seed_verdict(3, gate_of(think_sft_two_hop=0.5), arms_of(0.47, scramble=0.2))
    assert not v["met"]
    assert v["failed_gates"] == ["think_sft_two_hop 0.500 (needs >= 0.9)"]
    assert v["missed_goals"] == ["margin 0.150 (needs >= 0.2)", "scramble_drop 0.200 (needs >= 0.3)"]


def fake_outputs(seeds):
    """The jobs' outputs for two seeds, by hand: rl_think 0.6 / 0.4, sft 0.32 / 0.30."""
    jobs = [read_r.Job(read_r.Config(), seed, part) for part in read_r.PARTS for seed in seeds]
    outs = []
    for job in jobs:
        k = seeds.index(job.seed)
        if job.part == "arms":
            gate = gate_of(base_greedy_two_hop=[0.2, 0.1][k], base_steps=[400, 600][k])
            del gate["direct_two_hop"]
            del gate["think_sft_two_hop"]
            curve = {"reward": [0.5], "full_chain_hits": [1], "mark_only_hits": [0], "chain_n": [2]}
            outs.append({"gate": gate, "arms": arms_of([0.6, 0.4][k], sft=[0.32, 0.30][k]),
                         "curves": {"rl_think": curve, "rl_nothink": curve}, "n_params": 10,
                         "n_train": 4, "n_test": 8, "cpu_s": 1.0})
        elif job.part == "gate_direct":
            outs.append({"two_hop": 0.3, "steps": 7, "cpu_s": 2.0})
        else:
            outs.append({"two_hop": [0.95, 0.5][k], "steps": [300, 900][k], "cpu_s": 3.0})
    return jobs, outs


def test_summarise_seeds_by_hand():
    jobs, outs = fake_outputs([5, 6])
    res = read_r.summarise(read_r.Config(seed=5, seeds=2), jobs, outs)
    assert res["seeds"] == [5, 6]
    gates = res["gate_per_seed"]
    assert [g["think_sft_two_hop"] for g in gates] == [0.95, 0.5]
    assert [g["think_sft_steps"] for g in gates] == [300, 900]
    assert [g["direct_two_hop"] for g in gates] == [0.3, 0.3]
    torch.testing.assert_close(res["gate"]["base_steps"], 500.0)
    # margins: 0.6 − 0.32 = 0.28; 0.4 − 0.30 (the direct gate ties sft) = 0.10
    torch.testing.assert_close(res["margin_per_seed"], [0.28, 0.10])
    head = res["headline"]
    torch.testing.assert_close([head["margin"]["mean"], head["margin"]["std"],
                                head["margin"]["worst"]], [0.19, 0.09, 0.10])
    torch.testing.assert_close([head["rl_think_two_hop"]["mean"],
                                head["base_greedy_two_hop"]["mean"]], [0.5, 0.15])
    verdicts = res["seed_verdicts"]
    assert [v["met"] for v in verdicts] == [True, False]
    assert verdicts[1]["failed_gates"] == ["think_sft_two_hop 0.500 (needs >= 0.9)"]
    # arms: the mean over seeds, and each seed's numbers
    torch.testing.assert_close(res["arms"]["rl_think"]["two_hop_strict"], 0.5)
    assert [e["two_hop_strict"] for e in res["arms"]["rl_think"]["per_seed"]] == [0.6, 0.4]
    assert res["two_hop_per_seed"]["sft"] == [0.32, 0.30]
    assert res["arms"]["rl_think"]["full_chain_rate_before"] == 0.2
    assert res["job_cpu_s"] == 2 * (1.0 + 2.0 + 3.0)
    assert len(res["curves"]) == 2


def test_render_report_follows_the_numbers():
    jobs, outs = fake_outputs([5, 6])
    res = read_r.summarise(read_r.Config(seed=5, seeds=2), jobs, outs)
    res["wall_s"] = 12.0
    text = read_r.render_report(json.loads(json.dumps(res)))
    assert "margin rl_think − best direct: 0.190 ± 0.090 [0.100]" in text
    assert "gates and goals met on 1 of 2 seeds [5]" in text
    assert "| 5 | 0.600 | 0.320 (sft) | 0.280 | 0.400 | 0.700 | 0.400 | 0.900 | met |" in text
    assert "RL raised two-hop above its base's on 2 of 2 seeds [5, 6]" in text
    assert "missed: gate think_sft_two_hop 0.500 (needs >= 0.9); margin 0.100 (needs >= 0.2)" in text
    assert "| rl_think | 0.500 ± 0.100 [0.400] |" in text
    # RL's gain over the base's greedy two-hop: 0.6 − 0.2 = 0.4 and 0.4 − 0.1 = 0.3
    assert "gain over its base's greedy two-hop: 0.350 ± 0.050 [0.300]" in text
    # a seed that meets everything reads "met" on every seed
    res["seed_verdicts"][1].update(met=True, failed_gates=[], missed_goals=[])
    assert "met on 2 of 2 seeds [5, 6]" in read_r.render_report(res)
    # a seed whose base was already above rl_think (0.4 < 0.45) is not counted as raised
    res["gate_per_seed"][1]["base_greedy_two_hop"] = 0.45
    assert "RL raised two-hop above its base's on 1 of 2 seeds [5]" in read_r.render_report(res)


def test_figure_draws_the_numbers():
    jobs, outs = fake_outputs([5, 6])
    res = read_r.summarise(read_r.Config(seed=5, seeds=2), jobs, outs)
    res["arms"]["rl_think"]["per_task"]["two_hop"]["strict"] = 0.77
    res["curves"][1]["rl_think"].update(full_chain_hits=[1, 4, 0], chain_n=[2, 4, 4])
    bars, curves = read_r.figure(res).axes
    # 6 arms × 5 types; rl_think (the last arm) at two_hop (the last type) is 0.77 high
    heights = [patch.get_height() for patch in bars.patches]
    assert len(heights) == 30 and heights[-1] == 0.77
    assert heights[:5] == [0.25] * 5  # base_direct, every type
    # the chance line at 0.25; seed 6's full chain rate over a 10-step window: cumulative
    # 1/2, (1 + 4)/(2 + 4) = 5/6, 5/10
    assert list(bars.lines[0].get_ydata()) == [0.25, 0.25]
    torch.testing.assert_close(list(curves.lines[1].get_ydata()), [0.5, 5 / 6, 0.5])
    assert list(curves.lines[1].get_xdata()) == [1, 2, 3]
    assert curves.get_ylim() == (0, 1)


# --- the jobs and the script ---


def test_run_job_gate_parts(monkeypatch):
    # a gate job trains its model (here: a scripted policy) and scores the test two-hop questions
    # greedily in its own mode: solve answers right after thinking and "m0" at once
    asked = []

    def fake_gate(tok, cfg, device, seed, mode):
        asked.append((seed, mode))
        return Scripted(tok, solve), 5
    monkeypatch.setattr(read_r, "train_gate", fake_gate)
    cfg = read_r.Config(n_train=1, n_test=4)
    think = read_r.run_job(read_r.Job(cfg, 2, "gate_think_sft"))
    direct = read_r.run_job(read_r.Job(cfg, 2, "gate_direct"))
    assert asked == [(2, "reason"), (2, "direct")]
    assert (think["two_hop"], think["steps"], direct["two_hop"]) == (1.0, 5, 0.0)
    assert think["cpu_s"] >= 0


def test_arms_job_wiring(monkeypatch):
    # stand-ins record what each arm was trained on; the evaluations return numbers by hand
    cfg = read_r.Config(steps=7, n_train=3, n_test=2, n_embd=16, n_head=2)
    tok = read_r.Tokenizer()
    torch.manual_seed(0)
    base = read_r.GPT(len(tok.vocab), tok.n_specials, 16, 1, 2)
    sft_calls = []
    grpo_calls = []
    evals = []

    def fake_sft(model, tok, sample, steps, lr, device, tag, ready=None):
        rows, modes = sample(1)
        sft_calls.append((tag.arm, steps, lr, set(modes), {r["type"] for r in rows}))
        return steps

    def fake_grpo(model, ref, tok, rows, mode, cfg, device, tag):
        grpo_calls.append((tag.arm, mode, ref is base, model is base, {r["type"] for r in rows}))
        return {"reward": [0.5]}

    def fake_eval(model, tok, train, test, mode, cfg, device, seed):
        evals.append(mode)
        v = len(evals) / 10
        return {"two_hop_strict": v, "full_chain_rate": v + 0.01}
    monkeypatch.setattr(read_r, "train_base",
                        lambda tok, cfg, device, seed: read_r.Base(base, 9, 24))
    monkeypatch.setattr(read_r, "sft_train", fake_sft)
    monkeypatch.setattr(read_r, "grpo_train", fake_grpo)
    monkeypatch.setattr(read_r, "evaluate", fake_eval)
    monkeypatch.setattr(read_r, "pass_at_k", lambda model, tok, rows, k, *a: len(rows) * k)
    monkeypatch.setattr(read_r, "forced_chain_accuracy", lambda model, tok, rows, *a: len(rows))
    train, test = read_r.load_rows(cfg, 0)
    res = read_r.arms_job(tok, cfg, CPU, 0, train, test)
    # the base's gates: pass@8 over the 3 training two-hop questions (3 · 8 here), the chain
    # forced on the 2 test ones, its sampled full-chain rate and greedy two-hop
    assert res["gate"] == {"base_pass_at_8": 24, "base_full_chain_rate": 0.11,
                           "forced_chain_accuracy": 2, "base_greedy_two_hop": 0.1,
                           "base_steps": 9, "warm_traces": 24}
    # every arm trains on the two-hop training questions only, from a copy of the base
    assert sft_calls == [("sft", 7, cfg.lr_sft, {"direct"}, {"two_hop"}),
                         ("sft_trace", 7, cfg.lr_sft, {"reason"}, {"two_hop"})]
    assert grpo_calls == [("rl_think", "reason", True, False, {"two_hop"}),
                          ("rl_nothink", "direct", True, False, {"two_hop"})]
    # evaluations: base (reason, direct), then the 4 arms in their modes
    assert evals == ["reason", "direct", "direct", "reason", "reason", "direct"]
    assert res["arms"]["rl_think"]["two_hop_strict"] == 0.5
    assert set(res["curves"]) == {"rl_think", "rl_nothink"}
    # --rl-types all: every training question
    grpo_calls.clear()
    read_r.arms_job(tok, read_r.Config(steps=7, rl_types="all"), CPU, 0, train, test)
    assert grpo_calls[0][4] == set(read_r.TYPES)


def test_run_wires_seeds_jobs_and_the_record(tmp_path, monkeypatch):
    # run with run_jobs replaced by the hand-made outputs: seeds 3 and 4 (--smoke: 2 seeds), one
    # job per seed and part, the record written from them
    asked = []
    by_key = dict(zip(*[[(j.seed, j.part) for j in fake_outputs([3, 4])[0]],
                        fake_outputs([3, 4])[1]]))

    def fake_run_jobs(fn, jobs, workers, device):
        asked.append((fn, workers, [(j.seed, j.part, j.cfg.smoke) for j in jobs]))
        return [by_key[(j.seed, j.part)] for j in jobs]
    monkeypatch.setattr(read_r, "run_jobs", fake_run_jobs)
    res = read_r.run(read_r.Config(seed=3, smoke=True, workers=5, out=str(tmp_path)))
    assert asked == [(read_r.run_job, 5, [(seed, part, True) for part in read_r.PARTS
                                          for seed in (3, 4)])]
    assert res["seeds"] == [3, 4] and res["config"]["seeds"] == 2
    torch.testing.assert_close(res["margin_per_seed"], [0.28, 0.10])
    assert res["wall_s"] >= 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text() == read_r.render_report(saved)


def test_smoke_writes_its_record(tmp_path):
    res = read_r.main(["--smoke", "--seeds", "1", "--workers", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text() == read_r.render_report(saved)
    assert (tmp_path / "read_r.png").exists()
    for arm in ("base", "base_direct", "sft", "sft_trace", "rl_think", "rl_nothink"):
        assert set(saved["arms"][arm]["per_task"]) == set(read_r.TYPES)
        assert len(saved["arms"][arm]["per_seed"]) == 1
    assert set(saved["gate_per_seed"][0]) >= {c.key for c in read_r.GATES} | {
        "base_greedy_two_hop"}
    tiny = {"steps": 3, "seeds": 1, "gate_steps": 3, "think_gate_steps": 3, "base_steps": 4,
            "warm_traces": 4, "warm_max": 8,
            "batch": 8, "n_train": 2, "n_test": 3, "prompts": 4, "group": 4, "pass_k": 2}
    assert {k: saved["config"][k] for k in tiny} == tiny
    assert len(saved["curves"][0]["rl_think"]["reward"]) == 3
    assert res["margin_per_seed"] == saved["margin_per_seed"]


@pytest.mark.parametrize("argv", [["--group", "1"], ["--n-train", "0"], ["--n-embd", "30"],
                                  ["--temperature", "0"], ["--warm-traces", "-1"],
                                  ["--base-target", "1.5"], ["--rl-types", "three_hop"],
                                  ["--workers", "-1"]])
def test_bad_input_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        read_r.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_generated_rows_follow_the_seed():
    # seed s: train then test from random.Random(1000 s + 1); another seed, other ads
    cfg = read_r.Config(n_train=3, n_test=2)
    rng = random.Random(2001)
    assert read_r.load_rows(cfg, 2) == (read_r.make_rows(rng, 3), read_r.make_rows(rng, 2))
    assert read_r.load_rows(cfg, 3)[0] != read_r.load_rows(cfg, 2)[0]


def test_data_file(tmp_path, capsys):
    rows = read_r.make_rows(random.Random(0), 3)
    path = tmp_path / "ads.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = read_r.Config(data=str(path))
    train, test = read_r.load_rows(cfg, 0)
    assert train == rows[:12] and test == rows[12:]  # 80/20 of 15 rows
    # 2 rows: 1 training row, 1 test row; 1 row: both (there is nothing else to test on)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert read_r.load_rows(cfg, 0) == (rows[:1], rows[1:2])
    path.write_text(json.dumps(rows[0]) + "\n")
    assert read_r.load_rows(cfg, 0) == (rows[:1], rows[:1])
    path.write_text(json.dumps(dict(rows[0], type="XX")) + "\n")
    with pytest.raises(SystemExit) as e:
        read_r.main(["--data", str(path), "--smoke"])
    assert e.value.code == 2
    assert "type 'XX'" in capsys.readouterr().err
