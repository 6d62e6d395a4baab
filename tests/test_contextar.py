"""Tests for contextar.py: the context-aware mask, 2-D RoPE, block-order invariance, KV cache, checklist."""
import json
import os

import numpy as np
import torch

import contextar as C


def tiny_model(**variant):
    torch.manual_seed(0)
    cfg = C.Config(width=32, heads=2, layers=2)
    return C.ContextAR(cfg, **variant).eval()


def scenes(n=4, seed=0):
    train, _ = C.load_scenes(C.Config(n_train=n, n_eval=1), np.random.default_rng(seed))
    return train


def test_mask_matches_hand_written_layout():
    # 2 text tokens (t), two condition blocks of 4 (a, b), image of 4 (x): S = 2 + 3 * 4 = 14.
    # text sees text; a block sees the text and itself (both ways); image sees text, a, b, and x causally.
    rows = ["11000000000000",  # t0
            "11000000000000",  # t1
            "11111100000000",  # a0..a3
            "11111100000000",
            "11111100000000",
            "11111100000000",
            "11000011110000",  # b0..b3
            "11000011110000",
            "11000011110000",
            "11000011110000",
            "11111111111000",  # x0: text, a, b, itself
            "11111111111100",
            "11111111111110",
            "11111111111111"]
    want = torch.tensor([[ch == "1" for ch in r] for r in rows])
    torch.testing.assert_close(C.build_attention_mask(["E", "K"], 4, 2), want)


def test_rope_2d_angles_and_identity_for_text():
    # head_dim 8 -> 4 pairs: 2 turn with the row, 2 with the column; base 4 -> freqs [1, 4^(-1/2)] = [1, 0.5].
    # cell (2, 3): angles [2*1, 2*0.5, 3*1, 3*0.5] = [2, 1, 3, 1.5]; a text token: all 0 (cos 1, sin 0).
    cos, sin = C.rope_2d(torch.tensor([2.0, 5.0]), torch.tensor([3.0, 5.0]), torch.tensor([False, True]), 8, 4.0)
    torch.testing.assert_close(cos[0], torch.tensor([2.0, 1.0, 3.0, 1.5]).cos())
    torch.testing.assert_close(sin[0], torch.tensor([2.0, 1.0, 3.0, 1.5]).sin())
    torch.testing.assert_close(cos[1], torch.ones(4))
    torch.testing.assert_close(sin[1], torch.zeros(4))
    # q.k depends only on the offset: cells (1, 2) and (4, 0) give the same score as (3, 5) and (6, 3)
    q, k = torch.randn(8), torch.randn(8)
    c, s = C.rope_2d(torch.tensor([1.0, 4.0, 3.0, 6.0]), torch.tensor([2.0, 0.0, 5.0, 3.0]), torch.zeros(4, dtype=torch.bool), 8, 4.0)
    rq, rk = C.apply_rope(q.expand(4, 8), c, s), C.apply_rope(k.expand(4, 8), c, s)
    torch.testing.assert_close(rq[0] @ rk[1], rq[2] @ rk[3])


def image_logits(model, data, combo):
    toks = C.build_tokens(data["text"], data["cond"], data["image"], combo)
    return model.logits(model.hidden(toks, combo, mask=model.layout(combo).mask)[:, -C.CELLS:])


def test_block_order_does_not_change_image_logits():
    data, model = scenes(), tiny_model()
    with torch.no_grad():
        a = image_logits(model, data, ("E", "D", "K"))
        b = image_logits(model, data, ("K", "E", "D"))
    assert (a - b).abs().max() < 1e-5
    base = tiny_model(rope="1d", mask="causal")  # 1-D RoPE + causal: the order matters
    with torch.no_grad():
        diff = (image_logits(base, data, ("E", "D", "K")) - image_logits(base, data, ("K", "E", "D"))).abs().max()
    assert diff > 1e-3


def test_adding_a_block_leaves_other_blocks_hidden_states_unchanged():
    data, model = scenes(), tiny_model()
    T, L = C.TEXT_LEN, C.CELLS
    with torch.no_grad():
        alone = model.hidden(C.build_tokens(data["text"], data["cond"], data["image"], ("E",)), ("E",), mask=model.layout(("E",)).mask)
        combo = ("D", "E")  # E is now the second block
        both = model.hidden(C.build_tokens(data["text"], data["cond"], data["image"], combo), combo, mask=model.layout(combo).mask)
    torch.testing.assert_close(both[:, T + L:T + 2 * L], alone[:, T:T + L], atol=1e-6, rtol=0)
    torch.testing.assert_close(both[:, :T], alone[:, :T], atol=1e-6, rtol=0)  # the text, too


def test_kv_cache_and_recomputation_give_the_same_greedy_tokens():
    data, model = scenes(), tiny_model()
    for combo, s in ((("E", "K"), 1.0), (("D",), 2.0)):  # s = 2: the CFG branch with its own cache
        a = C.sample(model, data["text"], data["cond"], combo, 0.0, s, None, use_cache=True)
        b = C.sample(model, data["text"], data["cond"], combo, 0.0, s, None, use_cache=False)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def hand_scene():
    # "night winter red square blue bar": night sky, moon at (0, 3), white ground row 7,
    # red square centred (3, 2) = rows 2..4 x cols 1..3, blue horizontal bar centred (4, 2) = row 4, cols 1..3
    img = np.full((8, 8), C.SKY_NIGHT)
    img[0, 3] = C.MOON
    img[7] = C.SNOW
    img[2:5, 1:4] = 5 + C.COLOURS.index("red")
    img[4, 1:4] = 5 + C.COLOURS.index("blue")
    return img


def test_checklist_on_hand_built_images():
    prompt = "night winter red square blue bar"
    score, items = C.checklist_score(hand_scene(), prompt)
    assert score == 1.0 and len(items) == 6  # 4 explicit + 2 implicit, all satisfied
    no_world = hand_scene()
    no_world[0, 3] = C.SKY_NIGHT  # night without a moon
    no_world[7] = C.SOIL  # winter with brown ground
    score, items = C.checklist_score(no_world, prompt)
    assert score == 4 / 6 and not items["implicit: moon iff night"] and not items["implicit: ground matches season"]
    short_bar = hand_scene()
    short_bar[4, 3] = C.SKY_NIGHT  # blue is 2 cells (no bar), and red's hidden cell (4, 3) is uncovered
    score, items = C.checklist_score(short_bar, prompt)
    assert score == (2 + 2) / 6  # colours present (2) + both implicit (2); both shapes fail
    day = hand_scene()
    day[day == C.SKY_NIGHT] = C.SKY_DAY
    assert C.checklist_score(day, "day winter red square blue bar")[0] == 5 / 6  # day with a moon: 1 item fails


def true_parts(data, images):
    labels = C.object_labels(images, C.colour_ids(data["text"]))
    return C.fidelity_parts(labels, data["cond"][:, 1], data["cond"][:, 0].bool(), data["keys"])


def test_true_images_score_perfect_fidelity():
    data = scenes(16)
    torch.testing.assert_close(true_parts(data, data["image"]), torch.ones(16, 3))
    wrong = data["image"].clone()
    wrong[wrong >= 5] = C.SKY_DAY  # no objects at all: no edges, no layers, no keypoint hits
    torch.testing.assert_close(true_parts(data, wrong), torch.zeros(16, 3))


def test_smoke_writes_the_issue_keys(tmp_path):
    res = C.main(["--smoke", "--out", str(tmp_path)])
    saved = json.load(open(os.path.join(tmp_path, "results.json")))
    assert set(saved["arms"]["full"]) == set(C.EVAL_COMBOS) and saved["unseen"] == ["E+K", "E+D+K"]
    for key in C.KEYS:
        assert key in saved["arms"]["full"]["E+K"] and key in saved["arms"]["uncond"]["uncond"]
    assert "kv_cache_speedup" in saved and res["kv_cache_identical"]
    assert os.path.getsize(os.path.join(tmp_path, "contextar.png")) > 100
