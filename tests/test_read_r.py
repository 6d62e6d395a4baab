"""Tests for read_r.py: the judge and reward, strict/relaxed, the ad generator, GRPO, KV-cache decoding."""
import json
import random

import pytest
import torch

import read_r


# --- the judge and the reward ---


def test_answer_reward_exact_partial_contradicting_overlong():
    # exact: both gold slots stated, nothing else of their slots → 1
    assert read_r.answer_reward("teens travel", "teens travel") == 1.0
    # word order and a non-slot word do not matter → 1
    assert read_r.answer_reward("travel teens nobody", "teens travel") == 1.0
    # partial: age right, interest missing → 1 of 2 slots → 0.5
    assert read_r.answer_reward("teens", "teens travel") == 0.5
    # partial: age right, interest wrong → 1 of 2 slots → 0.5 (the toy's partial credit)
    assert read_r.answer_reward("teens food", "teens travel") == 0.5
    # a hedge (two values of one slot) contradicts that slot: {teens, kids} ≠ {teens} → 0 of 2 → 0
    assert read_r.answer_reward("teens kids food", "teens travel") == 0.0
    # contradicting one-slot answer → 0
    assert read_r.answer_reward("fear", "humour") == 0.0
    # a hedge over all strategies in 5 words (≤ 5 × 1) is not over-long but contradicts → 0
    assert read_r.answer_reward("humour fear proof aspiration comparison", "humour") == 0.0
    # over-long: 6 words > 5 × 1 and right → 0.1 instead of 1
    assert read_r.answer_reward("humour humour humour humour humour humour", "humour") == 0.1
    # over-long and wrong stays 0 (the penalty only lowers a 1 or a 0.5)
    assert read_r.answer_reward("fear fear fear fear fear fear", "humour") == 0.0
    # over-long two-slot, half right: 11 words > 5 × 2 → 0.1 instead of 0.5
    assert read_r.answer_reward(" ".join(["teens food"] * 5 + ["teens"]), "teens travel") == 0.1
    # exactly 5× is not over-long: 10 words = 5 × 2 → 1
    assert read_r.answer_reward(" ".join(["teens travel"] * 5), "teens travel") == 1.0
    # empty answer → 0 slots → 0
    assert read_r.answer_reward("", "fun") == 0.0


def test_format_and_total_reward():
    good = "<think> car joke</think><answer> fun</answer>"
    assert read_r.format_reward(good) == 1.0
    assert read_r.format_reward("<think></think><answer> fun</answer>") == 1.0  # an empty think block counts
    assert read_r.format_reward("<answer> fun</answer>") == 0.0  # no think block
    assert read_r.format_reward("<think> car joke</think> fun") == 0.0  # no answer block
    assert read_r.format_reward("<think> car joke<answer> fun</answer>") == 0.0  # think never closed
    torch.testing.assert_close(read_r.total_reward(good, "fun"), 0.9 * 1.0 + 0.1 * 1.0)  # 1.0
    # partial AM answer with format: 0.9 · 0.5 + 0.1 = 0.55
    torch.testing.assert_close(read_r.total_reward("<think></think><answer> teens food</answer>", "teens travel"), 0.55)
    # answer right but no think block: 0.9 · 1 + 0.1 · 0 = 0.9
    torch.testing.assert_close(read_r.total_reward("<answer> fun</answer>", "fun"), 0.9)
    # wrong answer with format: 0.9 · 0 + 0.1 = 0.1
    torch.testing.assert_close(read_r.total_reward(good, "safety"), 0.1)
    # missing answer tags: the judge reads the whole response ("car fun" holds the theme) → 0.9 · 1 + 0 = 0.9;
    # it reads "car skull" (no theme) → 0
    torch.testing.assert_close(read_r.total_reward("<think> car</think> fun", "fun"), 0.9)
    assert read_r.total_reward("<think> car</think> skull", "fun") == 0.0
    # over-long with format: 0.9 · 0.1 + 0.1 = 0.19
    torch.testing.assert_close(read_r.total_reward("<think></think><answer>" + " fun" * 6 + "</answer>", "fun"), 0.19)


def test_strict_relaxed_hand_list():
    # scores 1, 0.5, 0, 1, 0.1 → strict 2/5 = 0.4, relaxed (≥ 0.5) 3/5 = 0.6
    strict, relaxed = read_r.strict_relaxed([1.0, 0.5, 0.0, 1.0, 0.1])
    torch.testing.assert_close(strict, 0.4)
    torch.testing.assert_close(relaxed, 0.6)


def test_grounding_hand():
    frames = ["car", "teen", "joke", "tree", "nobody", "skull", "car", "teen", "joke", "cup", "nobody", "plain"]
    # think "car skull car": clues {car, joke} → hits 2 (car, car) of 3; chance = (2 car + 2 joke) / 12 = 1/3;
    # recall: {car} of {car, joke} named = 1/2
    hits, n, chance, recall = read_r.grounding(["car", "skull", "car"], ["car", "joke"], frames)
    assert (hits, n) == (2, 3)
    torch.testing.assert_close(chance, 4 / 12)
    torch.testing.assert_close(recall, 0.5)


# --- data ---


@pytest.mark.parametrize("strays", [0, 1, 2])
def test_ad_generator_plants_cues_where_labels_say(strays):
    rng = random.Random(strays)
    for _ in range(50):
        ad = read_r.make_ad(rng, strays)
        obj, per, cue = zip(*ad["frames"])
        assert len(ad["frames"]) == 8 and all(len(f) == 3 for f in ad["frames"])
        # the product is in exactly 2 object slots, no other product anywhere
        assert obj.count(read_r.PRODUCTS[ad["product"]]) == 2
        assert sum(w in read_r.PRODUCTS for w in obj) == 2
        # the main person in 3 frames; `strays` other persons once each
        assert per.count(read_r.PERSONS[ad["person"]]) == 3
        others = [w for w in per if w in read_r.PERSONS and w != read_r.PERSONS[ad["person"]]]
        assert len(others) == len(set(others)) == strays
        # the strategy's cue in 2 frames; `strays` cues of other strategies once each; the mood in 2
        assert cue.count(read_r.CUES[ad["strategy"]]) == 2
        stray_cues = [w for w in cue if w in read_r.CUES and w != read_r.CUES[ad["strategy"]]]
        assert len(stray_cues) == len(set(stray_cues)) == strays
        assert cue.count(read_r.MOODS[ad["mood"]]) == 2
        assert sum(w in read_r.MOODS for w in cue) == 2


def test_questions_answers_and_clues():
    ad = {"frames": [["car", "teen", "joke"]] + [["tree", "nobody", "plain"]] * 7, "product": 0, "strategy": 0,
          "mood": 0, "person": 1}
    te, am = read_r.question(ad, "TE"), read_r.question(ad, "AM")
    # THEME[0][0] = THEMES[(3 + 2) % 6] = THEMES[5] = "fun"
    assert te["answer"] == "fun" and te["clues"] == "car joke"
    assert am["answer"] == "teens travel" and am["clues"] == "teen car"
    # the theme table is a Latin rectangle: each row 5 distinct themes, each column 6 distinct themes
    assert all(len(set(row)) == 5 for row in read_r.THEME)
    assert all(len({read_r.THEME[p][s] for p in range(6)}) == 6 for s in range(5))


def test_tokenizer_round_trip():
    tok = read_r.Tokenizer()
    words = read_r.prompt_words(read_r.question(read_r.make_ad(random.Random(0)), "PS"), "reason")
    ids = tok.encode(words)
    assert len(ids) == len(words) == 1 + 24 + 2 + 1  # <bos>, 24 frame words, <PS>, <reason>, <think>
    assert tok.decode(ids) == tok.render(words)


# --- GRPO (as in flowrl.py) ---


def test_group_normalize_hand():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 · 0.25 / 3) = 0.57735 → ±0.5 / 0.57735 = ±0.86603
    out = read_r.group_normalize(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3]]))
    torch.testing.assert_close(out[0], torch.tensor([0.86603, -0.86603, -0.86603, 0.86603]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], torch.zeros(4))  # equal rewards → 0


def test_grpo_loss_hand():
    # one response of two tokens, Â = 1; log-ratios ln 1.5 and ln 0.5 (ratios 1.5, 0.5), ε = 0.2:
    # ℓ = max(−ρ, −clip(ρ)) = max(−1.5, −1.2) = −1.2 and max(−0.5, −0.8) = −0.5 → token mean −0.85
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    ref = torch.zeros(1, 2)
    # k3 with log r = ref − logp = (−ln 1.5, −ln 0.5): (1/1.5 + ln 1.5 − 1) + (2 − ln 2 − 1)... token mean
    k3 = ((1 / 1.5 + torch.log(torch.tensor(1.5)) - 1) + (1 / 0.5 + torch.log(torch.tensor(0.5)) - 1)) / 2
    loss, terms = read_r.grpo_loss(logp, old, ref, torch.ones(1, 2), torch.tensor([1.0]), 0.2, 0.01)
    torch.testing.assert_close(terms["pg_loss"], torch.tensor(-0.85))
    torch.testing.assert_close(terms["kl"], k3)
    torch.testing.assert_close(loss, torch.tensor(-0.85) + 0.01 * k3)
    torch.testing.assert_close(terms["clip_frac"], torch.tensor(1.0))  # both ratios outside [0.8, 1.2]


def test_grpo_loss_on_policy_zero_but_gradient():
    # ratio 1 and centred advantages (+1, −1): loss 0, but the gradient is −Â/n_tokens on each token
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    loss, _ = read_r.grpo_loss(logp, logp.detach(), logp.detach(), torch.ones(2, 2), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(loss, torch.tensor(0.0))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))


def test_grpo_loss_mask_drops_padding():
    # the masked token (ratio e²) must not change anything: same as the unpadded one-token batch
    logp = torch.tensor([[0.1, 2.0]])
    a, _ = read_r.grpo_loss(logp, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([2.0]))
    b, _ = read_r.grpo_loss(logp[:, :1], torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([2.0]))
    torch.testing.assert_close(a, b)


# --- model ---


def test_kv_cache_decoding_equals_full_recompute():
    torch.manual_seed(0)
    model = read_r.GPT(20, 16, 2, 2)
    prompt = torch.randint(2, 20, (3, 5))
    tokens, mask = read_r.generate(model, prompt, 6, stop=1, pad=0, greedy=True)
    seq = prompt
    for t in range(6):  # greedy without cache: recompute the whole sequence each step
        nxt = model(seq)[0][:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    ref = seq[:, 5:]
    keep = mask.bool()
    torch.testing.assert_close(tokens[keep], ref[keep])
    # the log-probs of a sampled response equal those of a step-by-step loop
    lp = read_r.response_logp(model, prompt, ref)
    step = torch.stack([torch.log_softmax(model(seq[:, :5 + t])[0][:, -1], -1).gather(-1, ref[:, t:t + 1])[:, 0]
                        for t in range(6)], 1)
    torch.testing.assert_close(lp, step, atol=1e-5, rtol=1e-5)


# --- the script ---


def test_smoke_writes_results(tmp_path):
    res = read_r.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    for arm in ("sft", "rl_think", "rl_nothink"):
        for key in ("strict", "relaxed", "per_task", "train_strict"):
            assert key in saved["arms"][arm]
    for key in ("grounding_precision", "scramble_drop"):
        assert key in saved["arms"]["rl_think"]
    assert set(saved["arms"]["sft"]["per_task"]) == set(read_r.TASKS)
    assert res["arms"]["sft"]["strict"] == saved["arms"]["sft"]["strict"]


@pytest.mark.parametrize("argv", [["--arms", "dpo"], ["--group", "1"], ["--n-train", "0"], ["--d-model", "30"]])
def test_bad_input_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        read_r.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bad_data_file_exits_2(tmp_path, capsys):
    path = tmp_path / "ads.jsonl"
    path.write_text(json.dumps({"frames": "car " * 24, "task": "XX", "answer": "fun", "clues": "car"}) + "\n")
    with pytest.raises(SystemExit) as e:
        read_r.main(["--data", str(path), "--smoke"])
    assert e.value.code == 2
    assert "task 'XX'" in capsys.readouterr().err
