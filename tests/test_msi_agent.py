"""Tests for msi_agent.py: hand-computed expectations for the insight DB, selection, induction, env and metrics."""

import json
import os
import sqlite3

import pytest
import torch

import msi_agent as m


def _rows(db):
    return {r["rule"]: (r["scale"], r["environment"], r["subtask"], r["score"]) for r in db.select()}


def test_score_bookkeeping_hand_sequence():
    db = m.InsightDB(":memory:")
    a = db.add("environment", "kitchen", "", "before take X, goto X")  # ADD -> 2
    b = db.add("subtask", "", "heat", "before heat X, toggle microwave (TASK: heat)")  # ADD -> 2
    db.agree(a)  # 2 + 1 = 3
    db.agree(a)  # 3 + 1 = 4
    db.edit(a, "before take X, goto it")  # EDIT keeps 4
    assert db.get(a)["score"] == 4 and db.get(a)["rule"] == "before take X, goto it"
    db.move(a, "general", "", "", "before take X, goto it")  # MOVE sets 2 whatever it had
    assert (db.get(a)["scale"], db.get(a)["score"]) == ("general", 2)
    db.remove(a)  # 2 - 1 = 1: kept
    assert db.get(a)["score"] == 1
    db.remove(a)  # a rule at score 1 removed -> 0 -> dropped
    assert db.get(a) is None
    assert _rows(db) == {"before heat X, toggle microwave (TASK: heat)": ("subtask", "", "heat", 2)}
    assert db.get(b)["support"] == 1  # ADD support 1; AGREE would add 1


def test_rule_text_with_quotes_and_sql_is_stored_verbatim():
    db = m.InsightDB(":memory:")
    nasty = "he said \"open it\" and it's fine'); DROP TABLE insights; --"
    rid = db.add("environment", "kitchen'; --", "", nasty)
    db.edit(rid, nasty + " (again)")
    db.edit(rid, nasty)
    row = db.get(rid)
    assert row["rule"] == nasty and row["environment"] == "kitchen'; --"
    assert [r["rule"] for r in db.select(environment="kitchen'; --")] == [nasty]
    assert db.con.execute("SELECT count(*) FROM insights").fetchone() == (1,)  # the table is still there


def test_persistence_across_close_and_reopen(tmp_path):
    path = str(tmp_path / "insights.sqlite")
    db = m.InsightDB(path)
    a = db.add("general", "", "", "before take X, goto X", evidence={"rooms": ["bedroom", "kitchen"]})
    db.agree(a)
    db.add("subtask", "", "slice", "before slice X, grab knife (TASK: slice)")
    before = [(r["id"], r["rule"], r["score"], r["evidence"], r["embedding"].tolist()) for r in db.select()]
    db.close()
    db2 = m.InsightDB(path)
    after = [(r["id"], r["rule"], r["score"], r["evidence"], r["embedding"].tolist()) for r in db2.select()]
    assert after == before and after[0][2] == 3  # 2 (ADD) + 1 (AGREE)
    db2.close()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM insights").fetchone() == (2,)


def _hand_db():
    db = m.InsightDB(":memory:")
    g = db.add("general", "", "", "before take X, goto X")
    db.agree(g)  # score 3
    db.add("general", "", "", "before put X, open X")  # score 2
    db.add("environment", "kitchen", "", "before take X, open cabinet")
    db.add("environment", "bedroom", "", "before take X, open drawer")
    db.add("subtask", "", "heat", "before heat X, toggle microwave (TASK: heat)")
    db.add("subtask", "", "slice", "before slice X, grab knife (TASK: slice)")
    db.add("subtask", "", "light", "before light X, plug X (TASK: light)")
    return db


def test_hashmap_selection_returns_the_hand_listed_rules():
    db = _hand_db()
    task = m.Task("kitchen", (("heat", "apple", "none"), ("slice", "bread", "none")))
    # general by score (3 then 2), the kitchen's environment rule, then the subtask rules of heat and slice
    want = ["before take X, goto X", "before put X, open X", "before take X, open cabinet",
            "before heat X, toggle microwave (TASK: heat)", "before slice X, grab knife (TASK: slice)"]
    assert m.select_insights(db, task, "hashmap", budget=8) == want
    assert m.select_insights(db, task, "hashmap", budget=3) == want[:3]  # the budget truncates
    assert m.select_insights(db, task, "general", budget=8) == want[:2]
    assert m.select_insights(db, task, "none", budget=8) == []
    assert len(m.select_insights(db, task, "flat", budget=8)) == 7  # every rule, the bedroom's too
    # vector: general + environment, then the subtask rules by cosine to the query; all three fit at budget 8
    vec = m.select_insights(db, m.Task("bedroom", (("light", "lamp", "none"),)), "vector", budget=4)
    assert vec == ["before take X, goto X", "before put X, open X", "before take X, open drawer",
                   "before light X, plug X (TASK: light)"]  # 'light' is the only word shared with the query


def test_environment_rejects_until_precondition_holds():
    task = m.Task("kitchen", (("heat", "apple", "none"),))
    ep = m.execute(task, [("take", "apple")])  # kitchen: take needs goto X (general) and open cabinet (environment)
    assert ep["steps"] == [("take", "apple", 0, False)] and ep["met"] == 0 and not ep["aborted"]
    ep = m.execute(task, [("goto", "apple"), ("take", "apple")])  # still no open cabinet
    assert ep["steps"][-1] == ("take", "apple", 0, False)
    ep = m.execute(task, [("goto", "apple"), ("open", "cabinet"), ("take", "apple")])
    assert ep["steps"][-1] == ("take", "apple", 0, True) and ep["met"] == 1 and ep["total"] == 3
    plan = [("goto", "apple"), ("open", "cabinet"), ("take", "apple"), ("goto", "microwave"), ("open", "microwave"),
            ("put", "microwave"), ("toggle", "microwave"), ("heat", "apple")]
    assert m.execute(task, plan)["success"]
    ep = m.execute(task, [("open", "drawer"), ("goto", "apple")])  # no closed drawer in a kitchen: aborts
    assert ep["aborted"] and ep["steps"] == []


def test_success_rate_and_gc_by_hand():
    eps = [{"met": 3, "total": 3}, {"met": 1, "total": 3}, {"met": 0, "total": 2}]
    sr, gc = m.success_rate_and_gc(eps)
    torch.testing.assert_close(torch.tensor([sr, gc]), torch.tensor([1 / 3, 4 / 8]))  # SR 1 of 3; GC (3+1+0)/(3+3+2)
    assert m.success_rate_and_gc([]) == (0.0, 0.0)


def _ep(room, kinds, steps, success):
    return {"room": room, "kinds": kinds, "query": m.query_text(m.Task(room, tuple((k, "x", "none") for k in kinds))),
            "steps": steps, "success": success, "aborted": False, "met": 0, "total": 1}


FAIL = _ep("kitchen", ["heat"], [("goto", "apple", -1, True), ("take", "apple", 0, False)], False)
WIN = _ep("kitchen", ["heat"], [("goto", "potato", -1, True), ("open", "cabinet", -1, True), ("grab", "knife", -1, True),
                                ("take", "potato", 0, True)], True)
WIN2 = _ep("kitchen", ["heat"], [("goto", "apple", -1, True), ("open", "cabinet", -1, True), ("take", "apple", 0, True)], True)


def test_contrast_pair_and_success_mode_by_hand():
    # the failure failed at take apple having run goto apple; the success ran goto potato (its own trigger argument,
    # so 'goto X', already done in the failure), open cabinet and grab knife before take potato
    assert m.contrast_pair(WIN, FAIL) == [(("take", "open", "cabinet"), False, "heat"),
                                          (("take", "grab", "knife"), False, "heat")]
    # success mode (no failure): every step the success ran before its core action
    assert m.contrast_pair(WIN) == [(("take", "goto", "potato"), True, "heat"), (("take", "open", "cabinet"), False, "heat"),
                                    (("take", "grab", "knife"), False, "heat")]
    assert m.contrast_pair(WIN, WIN2) == []  # the "failure" has no failing core action: nothing to contrast


def test_select_experiences_pairs_most_similar_failure():
    other = _ep("bathroom", ["clean"], [("take", "mug", 0, False)], False)
    pairs = m.select_experiences([other, WIN, FAIL], "pair")  # WIN's query matches FAIL's word for word
    assert [(s is WIN, f is FAIL) for s, f in pairs] == [(True, True)]
    assert m.select_experiences([other, WIN, FAIL], "success") == [(WIN, None)]


def test_generate_insights_ops_by_hand():
    db = m.InsightDB(":memory:")
    ops = m.generate_insights(db, [[(WIN, FAIL)]])
    # one room, one kind -> environment(kitchen); both ADDed at 2
    assert ops == {"ADD": 2}
    assert _rows(db) == {"before take X, open cabinet": ("environment", "kitchen", "", 2),
                         "before take X, grab knife": ("environment", "kitchen", "", 2)}
    ops = m.generate_insights(db, [[(WIN, FAIL)], [(WIN2, FAIL)]])  # the pool now holds WIN2: take without grab knife
    # batch 1: AGREE both (3, 3); batch 2: WIN2 refutes grab knife -> REMOVE (2); contrast gives open cabinet -> AGREE (4)
    assert ops == {"AGREE": 3, "REMOVE": 1}
    assert _rows(db) == {"before take X, open cabinet": ("environment", "kitchen", "", 4),
                         "before take X, grab knife": ("environment", "kitchen", "", 2)}
    bedroom = _ep("bedroom", ["cool"], [("open", "cabinet", -1, True), ("take", "tomato", 0, True)], True)
    bed_fail = _ep("bedroom", ["cool"], [("take", "tomato", 0, False)], False)
    ops = m.generate_insights(db, [[(bedroom, bed_fail)]])  # open cabinet now holds in 2 rooms and 2 kinds -> general
    assert ops == {"MOVE": 1, "REMOVE": 1} and _rows(db)["before take X, open cabinet"] == ("general", "", "", 2)


def test_scale_of():
    assert m.scale_of({"rooms": ["a", "b"], "kinds": ["heat", "cool"]}) == ("general", "", "")
    assert m.scale_of({"rooms": ["a"], "kinds": ["heat", "cool"]}) == ("environment", "a", "")
    assert m.scale_of({"rooms": ["a"], "kinds": ["heat"]}) == ("environment", "a", "")
    assert m.scale_of({"rooms": ["a", "b"], "kinds": ["heat"]}) == ("subtask", "", "heat")


def test_plan_assembly_copies_rule_lines():
    rules = [("take", "goto", "X"), ("heat", "toggle", "microwave"), ("take", "open", "cabinet")]
    steps = [(("take", "apple"), [0, 2]), (("put", "microwave"), []), (("heat", "apple"), [1])]
    # before take apple: lines 0 ('X' -> apple) and 2; before heat apple: line 1
    assert m.assemble_plan(steps, rules) == [("goto", "apple"), ("open", "cabinet"), ("take", "apple"),
                                             ("put", "microwave"), ("toggle", "microwave"), ("heat", "apple")]


def test_tiktoken_words_are_one_token_each():
    for row, word in enumerate(m.VOCAB):  # the compact table maps each word's tiktoken id back to its own row
        tag = word in m.SPECIALS
        ids = m.ENC.encode(word if tag else " " + word, allowed_special="all")
        assert len(ids) == 1 and m.ROW[ids[0]] == row and m.ENC.decode(ids).strip() == word
    words = [("kitchen", "<pad>", "<pad>"), ("take", "goto", "X")]
    assert m.tokenize(words) == [[m.VOCAB.index(w) for w in item] for item in words]
    assert m.ENC.n_vocab > 256 + len(m.VOCAB)  # a real BPE encoding (bytes + word prefixes), not a plain table
    with pytest.raises(m.BadInput):
        m.tokenize([("kitchenette", "<pad>", "<pad>")])  # not a vocabulary word: several byte/prefix tokens


def test_planner_shapes_and_generation():
    torch.manual_seed(0)
    model = m.Planner(16, 1, 2, 40).eval()
    task = m.Task("kitchen", (("heat", "apple", "none"),))
    prompts = [m.encode_prompt(task, [("take", "goto", "X")]), m.encode_prompt(task, [("heat", "plug", "X")])]
    assert len(prompts[0]) == 6 and len(m.encode_prompt(task, [])) == 5  # room, 2 subtasks, <rules>, lines, <plan>
    x = torch.tensor(prompts)
    vl, al, h, _ = model(x, torch.arange(6)[None])
    assert vl.shape == (2, 6, len(m.VOCAB)) and model.pointer(h, h[:, 4:5]).shape == (2, 6, 1)
    # causal: items appended on the right (padding, later steps) change nothing at the earlier positions
    padded = torch.cat([x, torch.zeros(2, 3, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, torch.arange(9)[None])[2][:, :6], h)
    out = m.generate(model, prompts, 1, torch.device("cpu"), 3)
    assert len(out) == 2 and all(len(p) <= 3 for p in out)
    # the KV-cached decoding equals greedy decoding that re-runs the whole sequence at every step
    seq = x[:1]
    for (verb, arg), chosen in out[0]:
        vl, al, h, _ = model(seq, torch.arange(seq.shape[1])[None])
        assert (m.VOCAB[vl[0, -1].argmax()], m.VOCAB[al[0, -1].argmax()]) == (verb, arg)
        seq = torch.cat([seq, torch.tensor([[[m.VOCAB.index(verb), m.VOCAB.index(arg), m.PAD]]])], 1)
        h = model(seq, torch.arange(seq.shape[1])[None])[2]
        assert [j for j in range(1) if model.pointer(h[:, -1:], h[:, 4:5])[0, 0, j] > 0] == chosen


def test_smoke_run_writes_results(tmp_path):
    res = m.main(["--smoke", "--out", str(tmp_path)])
    data = json.load(open(os.path.join(tmp_path, "results.json")))
    for arm in ("none", "flat", "general_only", "msi_hashmap", "msi_vector", "msi_success_mode"):
        assert set(data["arms"][arm]) >= {"sr", "gc", "sr_ood", "gc_ood"}
    assert set(data["domain_shift"]) == {"msi", "flat"} and res["arms"].keys() == data["arms"].keys()
    assert os.path.exists(os.path.join(tmp_path, "insights.sqlite"))


def test_bad_input_exits_2(capsys):
    for argv in (["--budget", "0"], ["--explore-p", "1.5"], ["--sweep", "3,x"]):
        with pytest.raises(SystemExit) as e:
            m.main(argv)
        assert e.value.code == 2
    assert capsys.readouterr().err.count("error:") == 3
