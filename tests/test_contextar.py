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


def bar_bar_scene():
    # two horizontal bars far apart: object 1 centred (3, 1), object 2 centred (4, 5); every
    # orientation of either fits and none overlaps, so the maps are easy to reason about
    layers = torch.from_numpy(C.layer_map(("bar", "bar"), [(3, 1, 0), (4, 5, 0)]))[None]
    keys = torch.tensor([[3 * 8 + 1, 4 * 8 + 5]])
    return {"prompt": "day summer red bar blue bar", "cond": C.condition_maps(layers, keys)[0]}


def test_ceilings_of_a_two_bar_scene_by_hand():
    scene = bar_bar_scene()
    # E: both bars' cells are edges, so E cannot say which bar is object 1: two layouts. Drawing
    # the swapped one scores edge F1 1, layer accuracy 0, keypoint hit 0 -> 1/3; best: (1 + 1/3) / 2
    torch.testing.assert_close(C.ceiling(("E",), scene), 2 / 3)
    # K: centres known, orientations not: 4 layouts. One bar turned: F1 (2 * 4) / 12 = 2/3, layer
    # accuracy 4/8, hit 1 -> 13/18; both turned: F1 4/12, accuracy 2/10, hit 1 -> 23/45;
    # best = (1 + 2 * 13/18 + 23/45) / 4
    torch.testing.assert_close(C.ceiling(("K",), scene), (1 + 2 * 13 / 18 + 23 / 45) / 4)
    for combo in (("E", "K"), ("D",), ("E", "D", "K")):
        assert C.ceiling(combo, scene) == 1.0
    assert C.ceiling((), scene) < C.ceiling(("K",), scene)
    assert C.needs_both(scene)
    square = dict(scene, prompt="day summer red square blue bar")  # E tells a square from a bar
    layers = torch.from_numpy(C.layer_map(("square", "bar"), [(3, 1, 0), (4, 5, 0)]))[None]
    square["cond"] = C.condition_maps(layers, torch.tensor([[25, 37]]))[0]
    assert C.ceiling(("E",), square) == 1.0 and not C.needs_both(square)


def test_fidelity_is_the_mean_of_its_three_parts():
    parts = torch.tensor([[1.0, 0.5, 0.0], [0.9, 0.6, 0.3]])
    torch.testing.assert_close(C.fidelity(parts), torch.tensor([0.5, 0.6]))
    try:
        C.fidelity(torch.ones(3))
        raise AssertionError("a (3,) input must raise")
    except ValueError:
        pass


def test_fidelity_parts_by_hand():
    # one scene: object 1 = cells 0, 1; object 2 = cell 9; edges: all three; keys (0, 9)
    layers = torch.zeros(1, 64, dtype=torch.long)
    layers[0, [0, 1]] = 1
    layers[0, 9] = 2
    edges = layers > 0
    keys = torch.tensor([[0, 9]])
    # drawn: object 1 only at cell 0, object 2 at cell 9: drawn edges {0, 9}, TP 2,
    # F1 = 2 * 2 / (2 + 3) = 0.8; union {0, 1, 9}, agree {0, 9} -> 2/3; both keys hit -> 1
    drawn = torch.zeros(1, 64, dtype=torch.long)
    drawn[0, 0] = 1
    drawn[0, 9] = 2
    got = C.fidelity_parts(drawn, layers, edges, keys)
    torch.testing.assert_close(got, torch.tensor([[0.8, 2 / 3, 1.0]]))
    swapped = drawn.clone()
    swapped[0, 0] = 2
    swapped[0, 9] = 1  # labels swapped: edges unchanged, agree 0 of 3, keypoints 0 of 2
    got = C.fidelity_parts(swapped, layers, edges, keys)
    torch.testing.assert_close(got, torch.tensor([[0.8, 0.0, 0.0]]))


def test_type_embedding_by_hand_and_in_the_model():
    table = torch.tensor([[5.0, 5.0], [1.0, 2.0], [3.0, 4.0]])
    # ids [0, 2, 1]: id 0 (text, image) adds nothing whatever row 0 holds
    got = C.type_embedding(torch.tensor([0, 2, 1]), table)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 2.0]]))
    data, model = scenes(), tiny_model()
    toks = C.build_tokens(data["text"], data["cond"], data["image"], ("E",))
    with torch.no_grad():
        before = model.hidden(toks, ("E",), mask=model.layout(("E",)).mask)
        model.type_table[1] += 1.0  # the E row
        after = model.hidden(toks, ("E",), mask=model.layout(("E",)).mask)
    T = C.TEXT_LEN
    assert (after[:, T:] - before[:, T:]).abs().max() > 1e-3  # the E block (and the image) move
    torch.testing.assert_close(after[:, :T], before[:, :T])  # the text does not see the block


def test_cfg_logits_by_hand():
    # l = l_u + s (l_c - l_u): cond [1, 2], uncond [0, 4], s = 3 -> [0 + 3, 4 - 6] = [3, -2]
    got = C.cfg_logits(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]), 3.0)
    torch.testing.assert_close(got, torch.tensor([3.0, -2.0]))
    torch.testing.assert_close(C.cfg_logits(torch.tensor([1.0]), torch.tensor([7.0]), 1.0),
                               torch.tensor([1.0]))


def test_cfg_scale_0_samples_the_unconditional_branch():
    # s = 0: l = l_uncond, so CFG sampling equals sampling from null text and no blocks (same
    # random draws at T = 1); s = 1 samples the conditional branch, which differs
    data, model = scenes(), tiny_model()

    def draw(text, combo, scale):
        gen = torch.Generator().manual_seed(0)
        return C.sample(model, text, data["cond"], combo, 1.0, scale, gen)

    null = torch.full_like(data["text"], C.NULL_TEXT)
    plain = draw(null, (), 1.0)
    torch.testing.assert_close(draw(data["text"], ("E", "K"), 0.0), plain, rtol=0, atol=0)
    assert not torch.equal(draw(data["text"], ("E", "K"), 1.0), plain)


def test_cfg_dropout_mask_by_hand():
    # text 1, one block of 2, image 2: S = 5; sample 0 dropped, sample 1 kept
    mask = C.build_attention_mask(["E"], 2, 1)
    got = C.cfg_dropout_mask(mask, torch.tensor([True, False]), 1, 2)
    assert got.shape == (2, 1, 5, 5)
    want = mask.clone()
    want[3:, 1:3] = False  # the image rows lose the block columns; the text stays
    assert torch.equal(got[0, 0], want) and torch.equal(got[1, 0], mask)


def test_training_drops_conditions_and_never_sees_unseen_combos(monkeypatch):
    # spy on the loss: which combos train, and how many samples lose text and blocks
    calls = []
    real = C.image_nll

    def spy(model, text, cond, image, combo, mask=None):
        calls.append((combo, text.clone(), mask.clone()))
        return real(model, text, cond, image, combo, mask)

    monkeypatch.setattr(C, "image_nll", spy)
    torch.manual_seed(0)
    cfg = C.Config(steps=60, batch=8, width=16, heads=2, layers=1, p_uncond=0.25, log_every=100)
    model = C.ContextAR(cfg)
    C.train(model, scenes(16), cfg, torch.device("cpu"))
    combos = {combo for combo, _, _ in calls}
    assert combos == set(C.TRAIN_COMBOS)
    assert all(not ("E" in c and "K" in c) for c in combos)  # E+K and E+D+K stay unseen
    dropped = torch.cat([(text == C.NULL_TEXT).all(1) for _, text, _ in calls])
    assert 0.15 < dropped.float().mean() < 0.35  # about p_uncond of the samples
    for combo, text, mask in calls:
        if combo:
            S = mask.shape[-1]
            sees_blocks = mask[:, 0, S - C.CELLS:, C.TEXT_LEN:S - C.CELLS].any(-1).any(-1)
            assert torch.equal(sees_blocks, ~(text == C.NULL_TEXT).all(1))


def test_needs_both_summary_margin_by_hand():
    ceilings = {c: 0.5 for c in C.EVAL_COMBOS}
    ceilings["E"] = 0.6
    ceilings["K"] = 0.8
    seeds = []
    for fid in (0.9, 0.85):
        seeds.append({c: {"fidelity": fid, "fidelity_se": 0.01} for c in C.EVAL_COMBOS})
    out = C.needs_both_summary(seeds, 40, 4, ceilings)
    # margin = E+K fidelity - max(ceiling E, ceiling K) = 0.9 - 0.8, 0.85 - 0.8
    torch.testing.assert_close(torch.tensor(out["margin_per_seed"]), torch.tensor([0.1, 0.05]))
    assert out["fidelity_min_seed"]["E+K"] == 0.85 and out["best_single_ceiling"] == 0.8
    torch.testing.assert_close(out["fidelity"]["E"], 0.875)


def test_smoke_writes_the_issue_keys(tmp_path):
    res = C.main(["--smoke", "--seeds", "2", "--out", str(tmp_path)])
    saved = json.load(open(os.path.join(tmp_path, "results.json")))
    assert set(saved["arms"]["full"]) == set(C.EVAL_COMBOS) and saved["unseen"] == ["E+K", "E+D+K"]
    for key in C.KEYS + ("ceiling",):
        assert key in saved["arms"]["full"]["E+K"]
    needs = saved["needs_both"]
    assert needs["n_scenes"] == 4 and len(needs["margin_per_seed"]) == len(saved["seeds"]) == 2
    assert needs["samples_per_scene"] == 2
    for key in ("fidelity", "fidelity_min_seed", "ceiling"):
        assert set(needs[key]) == set(C.EVAL_COMBOS)
    assert needs["ceiling"]["E+K"] == 1.0 and needs["ceiling"]["E"] < 1
    assert "kv_cache_speedup" in saved and res["kv_cache_identical"]
    assert os.path.getsize(os.path.join(tmp_path, "contextar.png")) > 100


def test_embeddings_text_by_slot_and_word_conditions_by_type():
    # with no transformer blocks, hidden() returns h_0: text slot j with word w reads row
    # j * N_TEXT_IDS + w of text_emb; a condition token reads tok_emb + the type row
    data, model = scenes(2), tiny_model()
    model.blocks = torch.nn.ModuleList()
    combo = ("K",)
    toks = C.build_tokens(data["text"], data["cond"], data["image"], combo)
    with torch.no_grad():
        h0 = model.hidden(toks, combo, mask=model.layout(combo).mask)
    for j in range(C.TEXT_LEN):
        row = j * C.N_TEXT_IDS + data["text"][:, j]  # (B,)
        torch.testing.assert_close(h0[:, j], model.text_emb.weight[row])
    k_token = C.TEXT_LEN + 5  # the 6th cell of the K block
    want = model.tok.weight[toks[:, k_token]] + model.type_table[1 + C.COND_TYPES.index("K")]
    torch.testing.assert_close(h0[:, k_token], want)
    image_token = C.TEXT_LEN + C.CELLS + 3  # no type embedding on the image
    torch.testing.assert_close(h0[:, image_token], model.tok.weight[toks[:, image_token]])
    # the same colour in the two colour slots is two different vectors
    assert not torch.equal(model.text_emb.weight[2 * C.N_TEXT_IDS + 4],
                           model.text_emb.weight[4 * C.N_TEXT_IDS + 4])


def test_edges_and_condition_maps_by_hand():
    # a 2-cell object 1 at (0, 0), (0, 1) and object 2 at (0, 2): every cell borders another
    # label (or 0), so all three are edges; a lone background cell never is
    layers = torch.zeros(1, 8, 8, dtype=torch.long)
    layers[0, 0, 0] = 1
    layers[0, 0, 1] = 1
    layers[0, 0, 2] = 2
    layers[0, 5, 5] = 0
    edges = C.edges_of(layers)
    assert edges.sum() == 3 and edges[0, 0, :3].all()
    # a 3x3 block of one label: only its centre (1, 1)... is inside; the 8 ring cells are edges
    block = torch.zeros(1, 8, 8, dtype=torch.long)
    block[0, 2:5, 2:5] = 1
    assert C.edges_of(block).sum() == 8 and not C.edges_of(block)[0, 3, 3]
    cond = C.condition_maps(layers, torch.tensor([[0, 2]]))
    assert cond.shape == (1, 3, 64)
    assert cond[0, 2, 0] == 1 and cond[0, 2, 2] == 2 and cond[0, 2].sum() == 3  # K: marks 1, 2
    assert torch.equal(cond[0, 1], layers.flatten(1)[0])  # D: the layer map itself


def test_rope_1d_and_the_unrotated_pairs():
    # head_dim 4 -> 2 pairs, base 100: f = [1, 100^(-1/2)] = [1, 0.1]; token 3: angles [3, 0.3]
    cos, sin = C.rope_1d(4, 4, 100.0)
    torch.testing.assert_close(cos[3], torch.tensor([3.0, 0.3]).cos())
    torch.testing.assert_close(sin[3], torch.tensor([3.0, 0.3]).sin())
    # rotary_dims 8 of head_dim 16: pairs 0..3 rotate, pairs 4..7 keep angle 0 everywhere
    lay = C.make_layout(("E",), "2d", "context", 16, 8, 10.0, torch.device("cpu"))
    assert lay.cos.shape == (lay.S, 8)
    assert torch.equal(lay.cos[:, 4:], torch.ones(lay.S, 4))
    assert torch.equal(lay.sin[:, 4:], torch.zeros(lay.S, 4))
    cell = C.TEXT_LEN + 8 * 2 + 3  # E block, cell (2, 3): row pairs f = [1, 10^(-1/2)]
    rows_cols = torch.tensor([2.0, 2.0 * 10 ** -0.5, 3.0, 3.0 * 10 ** -0.5])
    torch.testing.assert_close(lay.cos[cell, :4], rows_cols.cos())
    image_cell = C.TEXT_LEN + 64 + 8 * 2 + 3  # the image token of the same cell: same angles
    torch.testing.assert_close(lay.cos[image_cell], lay.cos[cell])
    assert torch.equal(lay.types[cell - 1:cell + 1], torch.tensor([1, 1]))
    assert torch.equal(lay.text_pos[:C.TEXT_LEN], torch.arange(1, 7))


def test_scene_generator_bar_probability():
    rng = np.random.default_rng(0)
    bars = [C.random_scene(rng, 1.0)[0].split() for _ in range(20)]
    assert all(w[3] == "bar" and w[5] == "bar" for w in bars)
    no_bars = [C.random_scene(rng, 0.0)[0].split() for _ in range(20)]
    assert not any("bar" in w for w in no_bars)


def test_needs_both_subset_of_given_rows_and_repeat_rows():
    pairs = [("day summer red bar blue bar", C.render(("day", "summer", "red", "bar", "blue", "bar"),
                                                    [(3, 1, 0), (4, 5, 0)], (0, 0))),
             ("day summer red square blue bar",
              C.render(("day", "summer", "red", "square", "blue", "bar"), [(3, 1, 0), (4, 5, 0)],
                       (0, 0)))]
    data = C.make_dataset(pairs)
    subset = C.needs_both_scenes(data, None, 0, 0.5)
    assert subset["prompts"] == [pairs[0][0]] and subset["cond"].shape == (1, 3, 64)
    twice = C.repeat_rows(data, 2)
    assert twice["prompts"] == [pairs[0][0]] * 2 + [pairs[1][0]] * 2
    assert torch.equal(twice["cond"][1], data["cond"][0]) and torch.equal(twice["cond"][2],
                                                                          data["cond"][1])
    torch.testing.assert_close(C.mean_ceiling(("E",), data), (2 / 3 + 1) / 2)
    drawn = C.needs_both_scenes(None, np.random.default_rng(1), 3, 0.5)
    assert len(drawn["prompts"]) == 3
    assert all(C.needs_both(C.scene_at(drawn, i)) for i in range(3))


def test_standard_error_and_mean_over_seeds_by_hand():
    # [1, 2, 3]: sample std 1 -> se 1 / sqrt(3)
    torch.testing.assert_close(C.standard_error(torch.tensor([1.0, 2.0, 3.0])), 3 ** -0.5)
    assert C.standard_error(torch.tensor([5.0])) == 0.0
    out = C.mean_over_seeds([{"E": {"fidelity": 0.5}}, {"E": {"fidelity": 0.7}}])
    torch.testing.assert_close(out["E"]["fidelity"], 0.6)
    assert out["E"]["fidelity_per_seed"] == [0.5, 0.7]


def test_evaluate_a_model_whose_answers_are_fixed(monkeypatch):
    # a sampler that draws the true image: every condition score 1, explicit items all true
    data = scenes(6)
    model = tiny_model()
    monkeypatch.setattr(C, "sample", lambda model, text, *args, **kw: data["image"])
    cfg = C.Config()
    metrics, samples = C.evaluate(model, data, ("E",), cfg, torch.device("cpu"), None)
    assert torch.equal(samples, data["image"])
    for key in ("edge_f1", "depth_acc", "keypoint_hit", "fidelity", "checklist_explicit",
                "checklist_implicit"):
        assert metrics[key] == 1.0, key
    assert metrics["fidelity_se"] == 0.0 and metrics["bits_per_token"] > 0
    wrong = data["image"].clone()
    wrong[wrong >= 5] = C.SKY_DAY  # objects gone: fidelity 0; pairs of rows form one scene
    monkeypatch.setattr(C, "sample", lambda model, text, *args, **kw: wrong)
    metrics = C.evaluate(model, data, ("E",), cfg, torch.device("cpu"), None, group=2)[0]
    assert metrics["fidelity"] == 0.0 and metrics["checklist_explicit"] == 0.0


def test_a_few_training_steps_lower_the_loss():
    data = scenes(16)
    torch.manual_seed(0)
    cfg = C.Config(steps=30, batch=16, width=32, heads=2, layers=1, warmup=5, log_every=100,
                   p_uncond=0.0)
    model = C.ContextAR(cfg)
    with torch.no_grad():
        before = C.image_nll(model, data["text"], data["cond"], data["image"], ("D",)).mean()
    C.train(model, data, cfg, torch.device("cpu"))
    with torch.no_grad():
        after = C.image_nll(model, data["text"], data["cond"], data["image"], ("D",)).mean()
    assert after < 0.7 * before


def test_kv_cache_speedup_is_a_speedup_with_identical_tokens():
    data, model = scenes(), tiny_model()
    ratios, identical = C.kv_cache_speedup(model, data, torch.device("cpu"), n=4, repeats=2)
    assert len(ratios) == 2 and min(ratios) > 1 and identical


def test_goals_by_hand():
    res = {"needs_both": {"n_scenes": 40, "margin_per_seed": [0.1, 0.02], "margin_mean": 0.06},
           "health": {"seen_pairs_per_seed": [0.95, 0.91]},
           "kv_cache_speedup": 12.0, "kv_cache_identical": True}
    assert all(C.goals(res).values())
    res["needs_both"]["margin_per_seed"] = [0.1, 0.0]
    res["health"]["seen_pairs_per_seed"] = [0.95, 0.89]
    res["kv_cache_speedup"] = 9.9
    goals = C.goals(res)
    assert not goals["margin_positive_in_every_seed"] and not goals["seen_pairs_ge_0.9_every_seed"]
    assert not goals["kv_cache_speedup_ge_10_identical"] and goals["margin_mean_ge_0.05"]
    res["needs_both"]["margin_mean"] = 0.05  # the bound itself counts
    res["health"]["seen_pairs_per_seed"] = [0.9, 0.9]
    res["kv_cache_speedup"] = 10.0
    goals = C.goals(res)
    assert goals["margin_mean_ge_0.05"] and goals["seen_pairs_ge_0.9_every_seed"]
    assert goals["kv_cache_speedup_ge_10_identical"]
