"""Tests for contextar.py: the context-aware mask, 2-D RoPE, block-order invariance, KV cache,
checklist, ceilings, the binding probe, training, the per-seed summaries and the record."""
import json
import os

import numpy as np
import pytest
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
    # text sees text; a block sees the text and itself (both ways); image sees text, a, b, and x
    # causally.
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
    # head_dim 8 -> 4 pairs: 2 turn with the row, 2 with the column; base 4 -> freqs
    # [1, 4^(-1/2)] = [1, 0.5]. Cell (2, 3): angles [2*1, 2*0.5, 3*1, 3*0.5] = [2, 1, 3, 1.5];
    # a text token: all 0 (cos 1, sin 0).
    is_text = torch.tensor([False, True])
    cos, sin = C.rope_2d(torch.tensor([2.0, 5.0]), torch.tensor([3.0, 5.0]), is_text, 8, 4.0)
    torch.testing.assert_close(cos[0], torch.tensor([2.0, 1.0, 3.0, 1.5]).cos())
    torch.testing.assert_close(sin[0], torch.tensor([2.0, 1.0, 3.0, 1.5]).sin())
    torch.testing.assert_close(cos[1], torch.ones(4))
    torch.testing.assert_close(sin[1], torch.zeros(4))
    # q.k depends only on the offset: cells (1, 2) and (4, 0) score as (3, 5) and (6, 3)
    q = torch.randn(8)
    k = torch.randn(8)
    rows = torch.tensor([1.0, 4.0, 3.0, 6.0])
    cols = torch.tensor([2.0, 0.0, 5.0, 3.0])
    c, s = C.rope_2d(rows, cols, torch.zeros(4, dtype=torch.bool), 8, 4.0)
    rq = C.apply_rope(q.expand(4, 8), c, s)
    rk = C.apply_rope(k.expand(4, 8), c, s)
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
        diff = (image_logits(base, data, ("E", "D", "K"))
                - image_logits(base, data, ("K", "E", "D"))).abs().max()
    assert diff > 1e-3


def test_adding_a_block_leaves_other_blocks_hidden_states_unchanged():
    data, model = scenes(), tiny_model()
    T = C.TEXT_LEN
    L = C.CELLS
    combo = ("D", "E")  # E is now the second block
    with torch.no_grad():
        alone = model.hidden(C.build_tokens(data["text"], data["cond"], data["image"], ("E",)),
                             ("E",), mask=model.layout(("E",)).mask)
        both = model.hidden(C.build_tokens(data["text"], data["cond"], data["image"], combo),
                            combo, mask=model.layout(combo).mask)
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
    # red square centred (3, 2) = rows 2..4 x cols 1..3, blue horizontal bar centred (4, 2) =
    # row 4, cols 1..3
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
    assert score == 4 / 6 and not items["implicit: moon iff night"]
    assert not items["implicit: ground matches season"]
    short_bar = hand_scene()
    short_bar[4, 3] = C.SKY_NIGHT  # blue is 2 cells (no bar); red's hidden cell (4, 3) uncovered
    score, items = C.checklist_score(short_bar, prompt)
    assert score == (2 + 2) / 6  # colours present (2) + both implicit (2); both shapes fail
    day = hand_scene()
    day[day == C.SKY_NIGHT] = C.SKY_DAY
    day_prompt = "day winter red square blue bar"
    assert C.checklist_score(day, day_prompt)[0] == 5 / 6  # day with a moon: 1 item fails


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


def test_training_drops_conditions_and_never_sees_unseen_combos(monkeypatch, capsys):
    # spy on the loss: which combos train, and how many samples lose text and blocks
    calls = []
    real = C.image_nll

    def spy(model, text, cond, image, combo, mask=None):
        calls.append((combo, text.clone(), mask.clone()))
        return real(model, text, cond, image, combo, mask)

    monkeypatch.setattr(C, "image_nll", spy)
    torch.manual_seed(0)
    cfg = C.Config(steps=60, batch=8, width=16, heads=2, layers=1, p_uncond=0.25, log_every=25,
                   probe_every=20)
    model = C.ContextAR(cfg)
    probes = C.train(model, scenes(16), scenes(4), cfg, torch.device("cpu"), seed=9)
    assert [p["step"] for p in probes] == [0, 20, 40, 60]  # before training, then every 20
    assert all(p["probe"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
               for p in probes)  # 4 scenes x 2 objects
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in logged] == ["25/60", "50/60", "60/60"]
    assert all("seed 9" in line for line in logged)
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
    # margins 0.1, 0.05: mean 0.075, std with ddof 1 = 0.05 / sqrt(2)
    torch.testing.assert_close(out["margin_mean"], 0.075)
    torch.testing.assert_close(out["margin_std"], 0.05 / 2 ** 0.5)
    assert out["margin_se_per_seed"] == [0.01, 0.01] and out["n_scenes"] == 40


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
    layout = [(3, 1, 0), (4, 5, 0)]
    two_bars = ("day", "summer", "red", "bar", "blue", "bar")
    square_bar = ("day", "summer", "red", "square", "blue", "bar")
    pairs = [(" ".join(two_bars), C.render(two_bars, layout, (0, 0))),
             (" ".join(square_bar), C.render(square_bar, layout, (0, 0)))]
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
    # [1, 3]: sample std sqrt(2) -> se sqrt(2) / sqrt(2) = 1
    torch.testing.assert_close(C.standard_error(torch.tensor([1.0, 3.0])), 1.0)
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
    assert metrics["fidelity_se"] == 0.0
    with torch.no_grad():
        nll = C.image_nll(model, data["text"], data["cond"], data["image"], ("E",))
    torch.testing.assert_close(metrics["bits_per_token"], nll.mean().item() / np.log(2))
    wrong = data["image"].clone()
    wrong[wrong >= 5] = C.SKY_DAY  # objects gone: fidelity 0; pairs of rows form one scene
    monkeypatch.setattr(C, "sample", lambda model, text, *args, **kw: wrong)
    metrics = C.evaluate(model, data, ("E",), cfg, torch.device("cpu"), None, group=2)[0]
    assert metrics["fidelity"] == 0.0 and metrics["checklist_explicit"] == 0.0
    # the true image again, two rows a scene: each scene's fidelity is the MEAN of its rows, 1
    monkeypatch.setattr(C, "sample", lambda model, text, *args, **kw: data["image"])
    metrics = C.evaluate(model, data, ("E",), cfg, torch.device("cpu"), None, group=2)[0]
    assert metrics["fidelity"] == 1.0 and metrics["fidelity_se"] == 0.0


def test_a_few_training_steps_lower_the_loss():
    data = scenes(16)
    torch.manual_seed(0)
    cfg = C.Config(steps=30, batch=16, width=32, heads=2, layers=1, warmup=5, log_every=100,
                   p_uncond=0.0)
    model = C.ContextAR(cfg)
    with torch.no_grad():
        before = C.image_nll(model, data["text"], data["cond"], data["image"], ("D",)).mean()
    C.train(model, data, data, cfg, torch.device("cpu"))
    with torch.no_grad():
        after = C.image_nll(model, data["text"], data["cond"], data["image"], ("D",)).mean()
    assert after < 0.7 * before


def test_kv_cache_speedup_is_a_speedup_with_identical_tokens():
    data, model = scenes(), tiny_model()
    out = C.kv_cache_speedup(model, data, torch.device("cpu"), n=4, repeats=2)
    # CPU seconds with the cache / without: recomputing 64 growing sequences costs several times
    # the cached steps, even for this tiny model
    assert len(out["kv_cache_speedup_repeats"]) == 2 and min(out["kv_cache_speedup_repeats"]) > 2
    assert out["kv_cache_identical"]


def test_binding_probe_by_hand():
    # scene 0: object 1 at cells 3, 4 (colour 5), object 2 at cell 10 (colour 6);
    # scene 1: object 1 at cell 0 (colour 7), object 2 at cells 1, 2 (colour 5)
    layers = torch.zeros(2, 64, dtype=torch.long)
    layers[0, [3, 4]] = 1
    layers[0, 10] = 2
    layers[1, 0] = 1
    layers[1, [1, 2]] = 2
    colours = torch.tensor([[5, 6], [7, 5]])
    logits = torch.zeros(2, 64, 8)
    logits[0, 3, 5] = 1.0  # first cell of object 1 prefers its own colour: hit
    logits[0, 4, 6] = 5.0  # not a first cell: ignored
    logits[0, 10, 5] = 1.0  # object 2's first cell prefers the other colour (5 over 6): miss
    logits[1, 0, 7] = 2.0
    logits[1, 0, 5] = 1.0  # 2 > 1: hit
    # scene 1, object 2 (cell 1): logits of 5 and 7 tie at 0: not preferred, a miss -> 2 of 4
    assert C.binding_probe(logits, layers, colours) == 0.5
    logits[1, 1, 5] = 0.5  # now it prefers its colour: 3 of 4
    assert C.binding_probe(logits, layers, colours) == 0.75
    with pytest.raises(ValueError):
        C.binding_probe(logits, layers, colours[:, :1])


def test_schedule_by_hand():
    # lr 1, warm-up 4, 14 steps: (step + 1) / 4 while warming; then 0.1 + 0.45 (1 + cos(pi p)),
    # p = (step - 4) / 10: step 4 -> 1.0, step 9 -> 0.55, step 14 and later -> 0.1
    got = [C.get_lr(step, 14, 1.0, 4) for step in (0, 3, 4, 9, 14, 20)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor([0.25, 1.0, 1.0, 0.55, 0.1, 0.1]))
    assert C.get_lr(0, 10, 2.0, 0) == 2.0  # no warm-up: the peak at once


def test_kv_cache_append_and_block_against_hand_attention():
    cache = C.KVCache()
    k1 = torch.ones(1, 2, 3, 4)
    values = 2 * torch.ones(1, 2, 3, 4)
    k, v = cache.append(k1, values)
    assert torch.equal(k, k1) and torch.equal(v, values)
    k, v = cache.append(3 * torch.ones(1, 2, 1, 4), 4 * torch.ones(1, 2, 1, 4))
    assert k.shape == (1, 2, 4, 4) and k[0, 0, 3, 0] == 3 and v[0, 1, 0, 0] == 2
    assert cache.k.shape == (1, 2, 4, 4)
    # one block, no rotation (cos 1, sin 0), causal mask: x + proj(softmax(q k^T / sqrt(hs)) v),
    # then x + mlp(ln_2(x)), written out by hand per head
    torch.manual_seed(0)
    block = C.Block(8, 2)
    x = torch.randn(2, 3, 8)
    cos = torch.ones(3, 2)
    sin = torch.zeros(3, 2)
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    with torch.no_grad():
        got = block(x, cos, sin, causal)
        qkv = block.c_attn(block.ln_1(x))  # (2, 3, 24)
        heads = []
        for h in range(2):
            q = qkv[..., 4 * h:4 * h + 4]
            k = qkv[..., 8 + 4 * h:8 + 4 * h + 4]
            v = qkv[..., 16 + 4 * h:16 + 4 * h + 4]
            scores = (q @ k.transpose(1, 2) / 2.0).masked_fill(~causal, float("-inf"))
            heads.append(scores.softmax(-1) @ v)
        x1 = x + block.c_proj(torch.cat(heads, -1))
        want = x1 + block.mlp(block.ln_2(x1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_failure_first_step_and_spread_by_hand():
    assert C.failure(0.89, 0.1) == "binding"  # below the 0.9 floor, whatever the margin
    assert C.failure(0.9, 0.0) == "composition"  # bound, margin not above 0
    assert C.failure(0.95, -0.1) == "composition"
    assert C.failure(0.9, 0.001) == ""
    probes = [{"step": 0, "probe": 0.5}, {"step": 50, "probe": 0.9}, {"step": 100, "probe": 0.95}]
    assert C.first_step_at(probes, 0.9) == 50
    assert C.first_step_at(probes[:1], 0.9) is None
    # [0.1, 0.3]: mean 0.2, std (ddof 1) sqrt(0.01 + 0.01) = 0.141, worst 0.1
    assert C.spread([0.1, 0.3]) == "0.200 ± 0.141 [0.100]"
    assert C.spread([0.1, -0.3], "+") == "-0.100 ± 0.283 [-0.300]"
    assert C.spread([0.5]) == "0.500 ± 0.000 [0.500]"


def test_health_summary_by_hand():
    # seen pairs = (E+D + D+K) / 2 on all test scenes; singles = needs-both fidelity - ceiling
    outcomes = []
    for ed, dk, e, k in ((0.9, 1.0, 0.6, 0.8), (0.5, 0.7, 0.7, 0.9)):
        outcomes.append({"test": {"E+D": {"fidelity": ed}, "D+K": {"fidelity": dk}},
                         "needs_both": {"E": {"fidelity": e}, "K": {"fidelity": k}},
                         "binding_probe": [{"step": 0, "probe": ed}]})
    out = C.health_summary(outcomes, {"E": 0.65, "K": 0.85, "D": 1.0})
    torch.testing.assert_close(torch.tensor(out["seen_pairs_per_seed"]), torch.tensor([0.95, 0.6]))
    singles = [[s["E"], s["K"]] for s in out["single_vs_ceiling_per_seed"]]
    torch.testing.assert_close(torch.tensor(singles), torch.tensor([[-0.05, -0.05], [0.05, 0.05]]))
    assert out["binding_probe_per_seed"] == [[{"step": 0, "probe": 0.9}],
                                             [{"step": 0, "probe": 0.5}]]


def test_data_facts_by_hand():
    words_a = ("day", "summer", "red", "bar", "blue", "bar")
    words_b = ("day", "summer", "red", "square", "blue", "bar")
    words_c = ("day", "summer", "green", "bar", "blue", "bar")
    lay_a = [(3, 1, 0), (4, 5, 0)]
    lay_b = [(3, 2, 0), (5, 5, 1)]
    train = C.make_dataset([(" ".join(words_a), C.render(words_a, lay_a, (0, 0))),
                            (" ".join(words_b), C.render(words_b, lay_b, (0, 0)))])
    # needs: scene a again (a repeat) and scene a's layout with other colours (its layer map
    # occurs in training, the scene does not)
    needs = C.make_dataset([(" ".join(words_a), C.render(words_a, lay_a, (1, 1))),
                            (" ".join(words_c), C.render(words_c, lay_a, (0, 0)))])
    facts = C.data_facts(C.SceneSets(train, train, needs))
    # training objects: bar, bar, square, bar -> 3 of 4 bars; bar-bar scenes 1 of 2
    assert facts == {"train_bar_share": 0.75, "train_bar_bar_share": 0.5, "needs_both_bar_bar": 2,
                     "needs_both_repeating_a_training_scene": 1,
                     "needs_both_layer_map_in_training": 2}


def test_scene_sets_depend_on_the_data_seed_only():
    cfg = C.Config(n_train=8, n_eval=4, n_needs_both=2, seed=0)
    first = C.scene_sets(cfg)
    C.SCENE_SETS.clear()
    again = C.scene_sets(C.Config(n_train=8, n_eval=4, n_needs_both=2, seed=7))  # model seed
    assert torch.equal(first.train["cond"], again.train["cond"])
    assert first.needs["prompts"] == again.needs["prompts"]
    other = C.scene_sets(C.Config(n_train=8, n_eval=4, n_needs_both=2, data_seed=1))
    assert not torch.equal(first.train["cond"], other.train["cond"])
    assert len(other.needs["prompts"]) == 2
    assert all(C.needs_both(C.scene_at(other.needs, i)) for i in range(2))


def hand_results(seen, margins, probes_at_end=(0.95, 0.5, 0.97)):
    # three seeds; best single ceiling 0.8; E+K fidelity = 0.8 + margin
    combos = list(C.EVAL_COMBOS)
    metrics = {"ceiling": 1.0, "edge_f1": 0.9, "depth_acc": 0.8, "keypoint_hit": 0.7,
               "bits_per_token": 0.1, "checklist_explicit": 0.9, "checklist_implicit": 0.95,
               "fidelity_per_seed": [0.8, 0.8, 0.8], "fidelity": 0.8}
    e_plus_k = [0.8 + m for m in margins]
    return {"config": {"steps": 10, "batch": 4, "temperature": 1.0, "cfg_scale": 1.0,
                       "n_eval": 6, "p_bar": 0.5},
            "seeds": [0, 1, 2], "data_seed": 4, "unseen": ["E+K", "E+D+K"],
            "arms": {"full": {c: dict(metrics) for c in combos}, "uncond": {"uncond": metrics}},
            "needs_both": {"n_scenes": 5, "samples_per_scene": 2,
                           "fidelity_per_seed": {c: e_plus_k for c in combos},
                           "ceiling": {c: 0.8 for c in combos}, "best_single_ceiling": 0.8,
                           "margin_per_seed": margins, "margin_se_per_seed": [0.01, 0.02, 0.01],
                           "margin_mean": sum(margins) / 3},
            "health": {"seen_pairs_per_seed": seen,
                       "single_vs_ceiling_per_seed": [{"E": -0.01, "K": 0.02}] * 3,
                       "binding_probe_per_seed": [[{"step": 0, "probe": 0.5},
                                                   {"step": 100, "probe": p}]
                                                  for p in probes_at_end]},
            "data": {"train_bar_share": 0.63, "train_bar_bar_share": 0.4, "needs_both_bar_bar": 5,
                     "needs_both_repeating_a_training_scene": 1,
                     "needs_both_layer_map_in_training": 3},
            "train_cpu_time_s_per_seed": [1.0, 2.0, 3.0], "attention_pairs": {
                "S": 14, "context": 100, "causal": 105, "dense": 196},
            "kv_cache_speedup": 12.0, "kv_cache_speedup_repeats": [11.0, 12.0, 13.0],
            "kv_cache_identical": True, "wall_s": 5.0, "cpu_time_s": 9.0}


def test_render_report_verdicts_follow_the_numbers():
    # seed 1 does not bind (0.85), seed 2 binds but does not compose (margin -0.02); margins
    # [0.1, 0.05, -0.02]: mean 0.0433, SD (ddof 1) 0.0603, SE of the mean 0.0348 -> 1.2
    report = C.render_report(hand_results([0.95, 0.85, 0.97], [0.1, 0.05, -0.02]))
    assert "2 of 3 seeds (seen pairs 0.923 ± 0.064 [0.850])" in report
    assert "margin > 0 in 2 of 3 seeds" in report
    assert "+0.043 ± 0.060 [-0.020]" in report and "= 1.2 standard errors" in report
    assert ">= +0.05: not met" in report
    assert "Failures: seed 1 (binding), seed 2 (composition)." in report
    # per-seed rows: margin / SE, the step the probe reached 0.9 (never for seed 1)
    assert "| 1 | 0.850 | -0.010 | +0.020 | 0.850 | +0.050 | 0.020 | +2.5 | 0.500 | never " \
           "| binding |" in report
    assert "| 0 | 0.950 | -0.010 | +0.020 | 0.900 | +0.100 | 0.010 | +10.0 | 0.950 | 100 | - |" \
        in report
    assert "1 of 5 needs-both scenes repeat a training scene" in report
    good = C.render_report(hand_results([0.95, 0.91, 0.97], [0.1, 0.05, 0.03]))
    assert "3 of 3 seeds" in good and "margin > 0 in 3 of 3" in good
    assert ">= +0.05: met" in good and "Failures: none." in good
    assert "Ablations" not in good
    # the combo table: fidelity mean ± std [worst] beside its ceiling, the scores; needs-both
    # E+K [0.9, 0.85, 0.83]: mean 0.86, std sqrt((.04^2 + .01^2 + .03^2) / 2) = 0.036
    assert "| E+K | unseen | 0.800 ± 0.000 [0.800] | 1.000 | 0.900 | 0.800 | 0.700 | 0.100 " \
           "| 0.900 | 0.950 | 0.860 ± 0.036 [0.830] | 0.800 |" in good
    assert "| 100 | 0.950 | 0.500 | 0.970 |" in good  # the probe table: step, then each seed
    assert "| uncond | control | 0.800 ± 0.000 [0.800] |" in good
    with_arms = hand_results([0.95, 0.91, 0.97], [0.1, 0.05, 0.03])
    with_arms["ablations"] = {"causal": {"fidelity": {c: 0.5 for c in C.EVAL_COMBOS},
                                         "needs_both_EK": 0.6,
                                         "needs_both_margin_per_seed": [-0.2, -0.1, -0.3],
                                         "seen_pairs_per_seed": [0.6, 0.7, 0.8]}}
    assert "| -0.200 ± 0.100 [-0.300] | 0.700 ± 0.100 [0.600] |" in C.render_report(with_arms)


def test_smoke_run_record_is_consistent(tmp_path, capsys):
    # two model seeds on one data seed: every summary agrees with the per-seed numbers
    res = C.main(["--smoke", "--seeds", "2", "--seed", "3", "--data-seed", "1", "--workers", "1",
                  "--out", str(tmp_path)])
    saved = json.load(open(os.path.join(tmp_path, "results.json")))
    logged = [line.split()[1] for line in capsys.readouterr().out.splitlines()
              if line.startswith("step")]
    assert logged == ["3/6", "6/6"] * 2  # every 3 steps, each seed
    assert saved["seeds"] == [3, 4] and saved["data_seed"] == 1 and saved["unseen"] == C.UNSEEN
    full = saved["arms"]["full"]
    assert set(full) == set(C.EVAL_COMBOS)
    for key in C_KEYS + ("ceiling",):
        assert key in full["E+K"]
    needs = saved["needs_both"]
    assert needs["n_scenes"] == 4 and needs["samples_per_scene"] == 2
    assert needs["ceiling"]["E+K"] == 1.0 and needs["ceiling"]["E"] < 1
    best = max(needs["ceiling"]["E"], needs["ceiling"]["K"])
    assert needs["best_single_ceiling"] == best
    margins = [f - best for f in needs["fidelity_per_seed"]["E+K"]]
    torch.testing.assert_close(torch.tensor(needs["margin_per_seed"]), torch.tensor(margins))
    health = saved["health"]
    seen = [(a + b) / 2 for a, b in zip(full["E+D"]["fidelity_per_seed"],
                                        full["D+K"]["fidelity_per_seed"])]
    torch.testing.assert_close(torch.tensor(health["seen_pairs_per_seed"]), torch.tensor(seen))
    for i, singles in enumerate(health["single_vs_ceiling_per_seed"]):
        for c in ("E", "K"):
            want = needs["fidelity_per_seed"][c][i] - needs["ceiling"][c]
            torch.testing.assert_close(singles[c], want)
    assert [[p["step"] for p in probes] for probes in health["binding_probe_per_seed"]] == [
        [0, 3, 6]] * 2
    assert res["kv_cache_identical"] and len(res["kv_cache_speedup_repeats"]) == 3
    assert saved["kv_cache_speedup"] == float(np.median(saved["kv_cache_speedup_repeats"]))
    smoke = {"steps": 6, "batch": 8, "width": 32, "layers": 1, "heads": 2, "n_train": 64,
             "n_eval": 6, "n_needs_both": 4, "samples_per_scene": 2}
    assert {k: saved["config"][k] for k in smoke} == smoke
    assert len(saved["train_cpu_time_s_per_seed"]) == 2 and saved["cpu_time_s"] > 0
    # E+D+K: S = 6 + 4 * 64 = 262; causal 262 * 263 / 2 = 34453; dense 262^2 = 68644; context:
    # every token sees the 6 text tokens (1572), each block token its own block (3 * 64 * 64),
    # each image token the 3 blocks (64 * 192) and itself causally (64 * 65 / 2):
    # 1572 + 12288 + 12288 + 2080 = 28228
    assert saved["attention_pairs"] == {"S": 262, "context": 28228, "causal": 34453,
                                        "dense": 68644}
    assert full["D"]["ceiling"] == 1.0 and full["E"]["ceiling"] < 1 and full["text"]["ceiling"] < 1
    assert open(os.path.join(tmp_path, "results.md")).read() == C.render_report(saved)
    assert os.path.getsize(os.path.join(tmp_path, "contextar.png")) > 1000


C_KEYS = ("edge_f1", "depth_acc", "keypoint_hit", "fidelity", "bits_per_token",
          "checklist_explicit", "checklist_implicit")


def test_sample_grid_places_each_tile():
    # two needs-both rows, one shown combo: columns true image, E map, K map, sample; tiles of
    # 8 cells x 5 px with a 4 px gap, so tile (r, c) starts at (4 + 44 r, 4 + 44 c)
    data = scenes(2)
    shown = {"E+K": [[C.MOON] * 64, [C.SNOW] * 64]}
    grid, ticks, names = C.sample_grid(data, shown, 2)
    assert grid.shape == (2 * 44 + 4, 4 * 44 + 4, 3) and names == ["true", "E map", "K map", "E+K"]
    assert ticks == [4 + 44 * c + 20 for c in range(4)]
    assert tuple(grid[4 + 44, 4 + 3 * 44]) == C.RGB[C.SNOW]  # row 1's sample: snow everywhere
    assert tuple(grid[4, 4 + 3 * 44 + 39]) == C.RGB[C.MOON]  # row 0's sample, last pixel column
    first_cell = C.RGB[int(data["image"][1, 0])]
    assert tuple(grid[4 + 44 + 4, 4 + 4]) == first_cell  # row 1's true image, cell (0, 0)
    edge = int(data["cond"][0, 0, 0]) * 255  # the E map: 255 on an edge cell, else 0
    assert tuple(grid[4, 4 + 44]) == (edge, edge, edge)
    assert tuple(grid[0, 0]) == (255, 255, 255)  # the gap stays white


def test_apply_rope_by_hand():
    # one pair (x_0, x_1) = (1, 2) turned by 90 degrees: (1 cos - 2 sin, 1 sin + 2 cos) = (-2, 1)
    x = torch.tensor([[1.0, 2.0]])
    got = C.apply_rope(x, torch.tensor([[0.0]]), torch.tensor([[1.0]]))
    torch.testing.assert_close(got, torch.tensor([[-2.0, 1.0]]))
    with pytest.raises(ValueError):
        C.apply_rope(x, torch.ones(2, 1), torch.zeros(2, 1))


def test_greedy_sample_is_the_argmax_of_its_teacher_forced_logits():
    # a greedy sample x, fed back teacher-forced: the logits of cell j (after x_<j) pick x_j;
    # a tiny temperature samples the same tokens
    data, model = scenes(), tiny_model()
    combo = ("E", "K")
    x = C.sample(model, data["text"], data["cond"], combo, 0.0, 1.0, None)
    with torch.no_grad():
        toks = C.build_tokens(data["text"], data["cond"], x, combo)
        h = model.hidden(toks, combo, mask=model.layout(combo).mask)[:, -C.CELLS:]
    assert torch.equal(model.logits(h).argmax(-1), x)
    cold = C.sample(model, data["text"], data["cond"], combo, 1e-4, 1.0,
                    torch.Generator().manual_seed(0))
    assert torch.equal(cold, x)


def test_measure_binding_reads_the_layer_map_and_the_first_cells():
    # a stand-in model whose logits prefer each object's own colour at its first cell (from the
    # layer map D) and the other object's colour everywhere else: the probe is 1
    data = scenes(6)
    layers = data["cond"][:, 1]
    colours = C.colour_ids(data["text"])
    logits = torch.zeros(6, 64, 8)
    for i in range(6):
        logits[i, :, colours[i, 0]] = 1.0
        logits[i, layers[i] == 1, colours[i, 1]] = 2.0  # object 1's cells prefer colour 2
        logits[i, layers[i] == 2, colours[i, 0]] = 3.0  # object 2's cells prefer colour 1
        for k in (1, 2):
            first = int((layers[i] == k).nonzero()[0])
            logits[i, first, colours[i, k - 1]] = 9.0

    class StandIn:
        def layout(self, combo):
            assert combo == ("D",)
            return C.Layout(None, None, None, None, torch.ones(1, 1), C.TEXT_LEN + 2 * 64)

        def hidden(self, tokens, combo, mask):
            assert tokens.shape == (6, C.TEXT_LEN + 2 * 64)
            return torch.zeros(6, tokens.shape[1], 1)

        def logits(self, h):
            assert h.shape == (6, 64, 1)
            return logits

    assert C.measure_binding(StandIn(), data, torch.device("cpu")) == 1.0


def test_scenes_from_a_data_file(tmp_path):
    rows = [{"prompt": "day summer red bar blue bar", "layout": [[3, 1, 0], [4, 5, 0]]}] * 4
    rows.append({"prompt": "night winter red square blue plus", "layout": [[3, 2, 0], [5, 6, 0]]})
    path = tmp_path / "scenes.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = C.Config(data=str(path))
    train, test = C.load_scenes(cfg, np.random.default_rng(0))
    assert len(train["prompts"]) == 4 and test["prompts"] == [rows[4]["prompt"]]  # 80 / 20
    assert test["image"][0].view(8, 8)[7].eq(C.SNOW).all()  # winter: white ground
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": rows[0]["prompt"], "layout": [[3, 1, 0], [3, 1, 0]]}))
    with pytest.raises(C.BadInput, match="row 1"):
        C.load_scenes(C.Config(data=str(bad)), np.random.default_rng(0))
