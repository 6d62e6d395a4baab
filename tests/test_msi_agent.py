"""Tests for msi_agent.py: hand-worked expectations for the world, the insight DB and its
operations, selection on plain rows, induction, the planner's loss and training, evaluation."""

import dataclasses
import json
import os
import random
import sqlite3

import numpy as np
import pytest
import torch

import msi_agent as m


def _rows(db):
    return {r["rule"]: (r["scale"], r["environment"], r["subtask"], r["score"]) for r in db.select()}


def _row(rid, scale, env, kind, rule, score=2):
    return {"id": rid, "scale": scale, "environment": env, "subtask": kind, "rule": rule,
            "score": score}


# plain insight rows (no database): general, two rooms' rules, three subtask rules
ROWS = [
    _row(1, "general", "", "", "before take X, goto X", 3),
    _row(2, "general", "", "", "before put X, open X"),
    _row(3, "general", "", "", "before put X, goto X"),
    _row(4, "environment", "kitchen", "", "before take X, open cabinet"),
    _row(5, "environment", "bedroom", "", "before take X, open drawer"),
    _row(6, "subtask", "", "heat", "before heat X, toggle microwave (TASK: heat)"),
    _row(7, "subtask", "", "slice", "before slice X, grab knife (TASK: slice)"),
    _row(8, "subtask", "", "brew", "before take X, rinse mug (TASK: brew)"),
]
HEAT_MUG = m.Task("kitchen", (("heat", "mug", "none"),))


# --- the world ---


def test_core_actions_query_and_hidden_rules():
    assert m.core_actions(("heat", "apple", "none")) == [("take", "apple"), ("put", "microwave"),
                                                         ("heat", "apple")]
    assert m.core_actions(("place", "book", "safe")) == [("take", "book"), ("put", "safe")]
    assert m.core_actions(("brew", "mug", "none")) == [("take", "mug"), ("brew", "mug")]
    assert m.core_actions(("look", "lamp", "none")) == [("look", "lamp")]
    task = m.Task("bedroom", (("cool", "tomato", "none"), ("place", "book", "box")))
    assert m.query_text(task) == "in the bedroom: cool the tomato, then place the book in the box"
    assert m.task_plan(task) == [("take", "tomato"), ("put", "fridge"), ("cool", "tomato"),
                                 ("take", "book"), ("put", "box")]
    # the garage keeps the slice rule, drops (flips) the heat rule, has no room rule
    assert m.hidden_rules("garage", "slice") == m.GENERAL_RULES + (("slice", "grab", "knife"),)
    assert m.hidden_rules("garage", "heat") == m.GENERAL_RULES
    assert m.hidden_rules("kitchen", "brew")[-2:] == (("take", "open", "cabinet"),
                                                       ("take", "rinse", "mug"))
    assert len(m.TRUE_SCOPE) == 13


def test_harmful_actions_by_hand():
    # a rinse of the mug spoils heating it, but is what brewing needs; bread unwrapped spoils heat
    assert m.harmful_actions("kitchen", "heat", "mug") == {("rinse", "mug"), ("unwrap", "mug")}
    assert m.harmful_actions("kitchen", "brew", "mug") == {("unwrap", "mug")}
    assert m.harmful_actions("bedroom", "toast", "bread") == {("rinse", "bread")}
    # garage: the flipped heat / clean / brew rules spoil; slice's rule does not flip
    assert ("toggle", "microwave") in m.harmful_actions("garage", "heat", "apple")
    assert ("wet", "sponge") in m.harmful_actions("garage", "clean", "plate")
    assert ("rinse", "mug") in m.harmful_actions("garage", "brew", "mug")
    assert m.harmful_actions("garage", "slice", "apple") == {("rinse", "apple"), ("unwrap", "apple")}


def test_admissible_actions_by_hand():
    task = m.Task("bathroom", (("fill", "mug", "none"), ("toast", "bread", "none")))
    valid = m.admissible(task)
    assert ("rinse", "mug") in valid and ("unwrap", "bread") in valid and ("turnon", "tap") in valid
    assert ("rinse", "bread") not in valid and ("unwrap", "mug") not in valid
    assert ("open", "cabinet") not in valid  # the kitchen's cabinet is not in a bathroom
    # 2 objects + 5 receptacles to go to, 5 to open, microwave/knife/sponge, rinse, unwrap, tap
    assert len(valid) == 7 + 5 + 3 + 1 + 1 + 1
    assert ("open", "cabinet") in m.admissible(m.Task("kitchen", (("look", "book", "none"),)))
    assert not any(v == "turnon" for v, _ in m.admissible(m.Task("garage", task.subtasks)))


def test_environment_rejects_until_precondition_holds():
    task = m.Task("kitchen", (("heat", "apple", "none"),))
    ep = m.execute(task, [("take", "apple")])  # needs goto apple (general), open cabinet (kitchen)
    assert ep["steps"] == [("take", "apple", 0, False)] and ep["met"] == 0 and ep["total"] == 3
    ep = m.execute(task, [("goto", "apple"), ("take", "apple")])
    assert ep["steps"][-1] == ("take", "apple", 0, False)
    ep = m.execute(task, [("goto", "apple"), ("open", "cabinet"), ("take", "apple")])
    assert ep["steps"][-1] == ("take", "apple", 0, True) and ep["met"] == 1
    plan = [("goto", "apple"), ("open", "cabinet"), ("take", "apple"), ("goto", "microwave"),
            ("open", "microwave"), ("put", "microwave"), ("toggle", "microwave"), ("heat", "apple")]
    assert m.execute(task, plan)["success"]
    # out of order: heat before put fails with no effect; then the right order still works
    ep = m.execute(task, plan[:3] + [("heat", "apple")] + plan[3:])
    assert ep["steps"][3] == ("heat", "apple", 0, False) and ep["success"]
    # an invalid action (no drawer in a kitchen, a core action of another task) does nothing
    ep = m.execute(task, [("open", "drawer"), ("slice", "apple")] + plan)
    assert ep["steps"][:2] == [("open", "drawer", -1, False), ("slice", "apple", -1, False)]
    assert ep["success"] and ep["met"] == 3


def test_spoiling_actions_fail_the_subtask():
    ok = [("goto", "mug"), ("open", "cabinet"), ("take", "mug"), ("goto", "microwave"),
          ("open", "microwave"), ("put", "microwave"), ("toggle", "microwave"), ("heat", "mug")]
    assert m.execute(HEAT_MUG, ok)["success"]
    ep = m.execute(HEAT_MUG, [("rinse", "mug")] + ok)  # a wet mug: every later step fails
    assert not ep["success"] and ep["met"] == 0 and ep["steps"][0] == ("rinse", "mug", -1, True)
    brew = m.Task("kitchen", (("brew", "mug", "none"),))
    prefix = [("goto", "mug"), ("open", "cabinet")]
    assert not m.execute(brew, prefix + [("take", "mug"), ("brew", "mug")])["success"]
    assert m.execute(brew, prefix + [("rinse", "mug"), ("take", "mug"), ("brew", "mug")])["success"]
    # the spoil hits only the subtask of that object
    two = m.Task("kitchen", (("slice", "apple", "none"), ("fill", "mug", "none")))
    ep = m.execute(two, [("rinse", "mug"), ("grab", "knife"), ("slice", "apple")])
    assert ep["met"] == 1
    # garage: general rules suffice for heat; the heat rule's toggle now spoils it
    garage = m.Task("garage", (("heat", "apple", "none"),))
    plan = [("goto", "apple"), ("take", "apple"), ("goto", "microwave"), ("open", "microwave"),
            ("put", "microwave"), ("heat", "apple")]
    assert m.execute(garage, plan)["success"]
    assert not m.execute(garage, plan[:5] + [("toggle", "microwave")] + plan[5:])["success"]


def test_rule_free_kinds_succeed_without_insights():
    for kind, obj in (("light", "lamp"), ("look", "book")):
        for room in m.ROOMS + (m.OOD_ROOM,):
            task = m.Task(room, ((kind, obj, "none"),))
            assert m.execute(task, m.task_plan(task))["success"]
    assert not m.execute(HEAT_MUG, m.task_plan(HEAT_MUG))["success"]


def test_true_rules_applied_solve_every_task():
    # the ceiling: the applier given the task's own hidden rules succeeds on every task
    rng = random.Random(0)
    for _ in range(300):
        task = m.sample_task(rng, rng.choice(m.ROOMS + (m.OOD_ROOM,)))
        rules = [r for kind, _, _ in task.subtasks for r in m.hidden_rules(task.room, kind)]
        assert m.execute(task, m.apply_rules(m.task_plan(task), rules))["success"], task


def test_sample_task_and_explore():
    rng = random.Random(1)
    tasks = [m.sample_task(rng, "bedroom") for _ in range(400)]
    assert {len(t.subtasks) for t in tasks} == {1, 2}
    assert {k for t in tasks for k, _, _ in t.subtasks} == set(m.KINDS)
    for t in tasks:
        objs = [o for _, o, _ in t.subtasks]
        assert len(set(objs)) == len(objs)
        assert all((r != "none") == (k == "place") for k, _, r in t.subtasks)
    task = m.Task("kitchen", (("heat", "apple", "none"),))
    # p near 0: only the core actions; p near 1: every valid action before the first core step
    ep = m.explore(random.Random(0), task, 1e-9)
    assert [st[:2] for st in ep["steps"]] == m.task_plan(task)
    ep = m.explore(random.Random(0), task, 1 - 1e-9)
    n_valid = len(m.admissible(task))
    assert {st[:2] for st in ep["steps"][:n_valid]} == m.admissible(task)
    assert ep["steps"][n_valid][:2] == ("take", "apple") and ep["success"]


def test_parse_user_tasks():
    rows = [{"room": "garage", "subtasks": ["place book safe", "brew mug"]}]
    assert m.parse_user_tasks(rows, "f") == [m.Task("garage", (("place", "book", "safe"),
                                                               ("brew", "mug", "none")))]
    for bad in ({"room": "attic", "subtasks": ["brew mug"]}, {"room": "kitchen", "subtasks": []},
                {"room": "kitchen", "subtasks": ["brew apple"]},
                {"room": "kitchen", "subtasks": ["place book"]}):
        with pytest.raises(m.BadInput, match="--data f, row 2: "):
            m.parse_user_tasks(rows + [bad], "f")


# --- the insight database ---


def test_score_bookkeeping_hand_sequence():
    db = m.InsightDB(":memory:")
    a = db.add("environment", "kitchen", "", "before take X, goto X")  # ADD -> 2
    b = db.add("subtask", "", "heat", "before heat X, toggle microwave (TASK: heat)")  # ADD -> 2
    db.agree(a)  # 2 + 1 = 3
    db.agree(a)  # 3 + 1 = 4
    db.edit(a, "before take X, goto it")  # EDIT keeps 4
    assert db.get(a)["score"] == 4 and db.get(a)["rule"] == "before take X, goto it"
    assert db.get(a)["support"] == 3  # ADD support 1, each AGREE + 1
    db.move(a, "general", "", "", "before take X, goto it")  # MOVE sets 2 whatever it had
    assert (db.get(a)["scale"], db.get(a)["score"]) == ("general", 2)
    db.remove(a)  # 2 - 1 = 1: kept
    assert db.get(a)["score"] == 1
    db.remove(a)  # a rule at score 1 removed -> 0 -> dropped
    assert db.get(a) is None
    assert _rows(db) == {"before heat X, toggle microwave (TASK: heat)": ("subtask", "", "heat", 2)}
    assert db.get(b)["support"] == 1


def test_rule_text_with_quotes_and_sql_is_stored_verbatim():
    db = m.InsightDB(":memory:")
    nasty = "he said \"open it\" and it's fine'); DROP TABLE insights; --"
    rid = db.add("environment", "kitchen'; --", "", nasty)
    db.edit(rid, nasty + " (again)")
    db.edit(rid, nasty)
    row = db.get(rid)
    assert row["rule"] == nasty and row["environment"] == "kitchen'; --"
    assert [r["rule"] for r in db.select(environment="kitchen'; --")] == [nasty]
    assert db.con.execute("SELECT count(*) FROM insights").fetchone() == (1,)


def test_a_failing_update_rolls_back():
    db = m.InsightDB(":memory:")
    rid = db.add("general", "", "", "before take X, goto X")
    with pytest.raises(sqlite3.Error):
        db._update(("UPDATE insights SET score = 9 WHERE id = ?", (rid,)),
                   ("UPDATE no_such_table SET x = 1", ()))
    assert db.get(rid)["score"] == 2  # the first statement was rolled back with the second


def test_persistence_across_close_and_reopen(tmp_path):
    path = str(tmp_path / "insights.sqlite")
    db = m.InsightDB(path)
    a = db.add("general", "", "", "before take X, goto X", evidence={"rooms": ["bedroom", "kitchen"]})
    db.agree(a)
    db.add("subtask", "", "slice", "before slice X, grab knife (TASK: slice)")
    db.add_experiences([{"room": "kitchen", "query": "q", "success": True, "steps": [["a"]]}])
    before = [(r["id"], r["rule"], r["score"], r["evidence"], r["embedding"].tolist())
              for r in db.select()]
    db.close()
    db2 = m.InsightDB(path)
    after = [(r["id"], r["rule"], r["score"], r["evidence"], r["embedding"].tolist())
             for r in db2.select()]
    assert after == before and after[0][2] == 3  # 2 (ADD) + 1 (AGREE)
    db2.close()
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM insights").fetchone() == (2,)
    assert con.execute("SELECT room, success FROM experiences").fetchall() == [("kitchen", 1)]


# --- selection on plain rows ---


def test_embed_text_by_hand():
    e = m.embed_text("mug mug cup", dim=64)
    assert e.shape == (64,) and abs(float(np.linalg.norm(e)) - 1) < 1e-6
    # "mug" twice, "cup" once (different buckets): entries 2 / sqrt(5) and 1 / sqrt(5)
    assert sorted(e[e > 0].tolist()) == pytest.approx([1 / 5 ** 0.5, 2 / 5 ** 0.5])
    assert not m.embed_text("").any()
    assert m.embed_text("mug cup", dim=1).tolist() == [1.0]  # one bucket: (2) / 2
    with pytest.raises(ValueError):
        m.embed_text("mug", dim=0)


def test_hashmap_selection_returns_the_hand_listed_rules():
    # general by score (3, then 2, 2 by id), the kitchen's rule, then the heat rule only
    want = ["before take X, goto X", "before put X, open X", "before put X, goto X",
            "before take X, open cabinet", "before heat X, toggle microwave (TASK: heat)"]
    assert m.select_insights(ROWS, HEAT_MUG, "hashmap", budget=8) == want
    assert m.select_insights(ROWS[::-1], HEAT_MUG, "hashmap", budget=8) == want  # any row order
    assert m.select_insights(ROWS, HEAT_MUG, "hashmap", budget=2) == want[:2]
    assert m.select_insights(ROWS, HEAT_MUG, "general", budget=8) == want[:3]
    assert m.select_insights(ROWS, HEAT_MUG, "none", budget=8) == []
    flat = m.select_insights(ROWS, HEAT_MUG, "flat", budget=5)
    assert flat == want[:4] + ["before take X, open drawer"]  # by score then id: other rooms too
    two = m.Task("bedroom", (("slice", "apple", "none"), ("heat", "bread", "none")))
    assert m.select_insights(ROWS, two, "hashmap", budget=8)[3:] == [
        "before take X, open drawer", "before slice X, grab knife (TASK: slice)",
        "before heat X, toggle microwave (TASK: heat)"]  # the subtask names in task order
    # the database's rows work the same
    db = m.InsightDB()
    for r in sorted(ROWS, key=lambda r: r["id"]):
        rid = db.add(r["scale"], r["environment"], r["subtask"], r["rule"])
        for _ in range(r["score"] - 2):
            db.agree(rid)
    assert m.select_insights(db.select(), HEAT_MUG, "hashmap", budget=8) == want
    with pytest.raises(ValueError):
        m.select_insights(ROWS, HEAT_MUG, "lookup", budget=8)
    with pytest.raises(ValueError):
        m.select_insights(ROWS, HEAT_MUG, "hashmap", budget=-1)


def test_vector_selection_pulls_in_the_rule_that_shares_the_object():
    # query "in the kitchen: heat the mug": |q| = sqrt(1 + 4 + 1 + 1 + 1) = sqrt(8)
    # heat rule shares "heat" (twice in it): cos = 2 / (sqrt(8) * 3) = 0.236
    # brew rule shares "mug": cos = 1 / (sqrt(8) * sqrt(7)) = 0.134;  slice rule: 0
    q = m.embed_text(m.query_text(HEAT_MUG))
    cos = [float(q @ m.embed_text(r["rule"])) for r in ROWS[5:]]
    assert cos == pytest.approx([2 / (8 ** 0.5 * 3), 0.0, 1 / (8 ** 0.5 * 7 ** 0.5)], abs=1e-6)
    vector = m.select_insights(ROWS, HEAT_MUG, "vector", budget=6)
    hashmap = m.select_insights(ROWS, HEAT_MUG, "hashmap", budget=6)
    assert vector[4:] == ["before heat X, toggle microwave (TASK: heat)",
                          "before take X, rinse mug (TASK: brew)"]
    assert hashmap[4:] == ["before heat X, toggle microwave (TASK: heat)"]
    # with the objects hidden from the query the brew rule ties at 0 with slice's (lower id first)
    hidden = m.select_insights(ROWS, m.selection_task(HEAT_MUG, True), "vector", budget=6)
    assert hidden[5] == "before slice X, grab knife (TASK: slice)"
    # the applier: hashmap's lines succeed; vector's brew line rinses the mug and spoils heating
    plan = m.task_plan(HEAT_MUG)
    results = {}
    for name, lines in (("hashmap", hashmap), ("vector", vector), ("hidden", hidden)):
        rules = [m.parse_rule(t) for t in lines]
        results[name] = m.execute(HEAT_MUG, m.apply_rules(plan, rules))["success"]
    assert results == {"hashmap": True, "vector": False, "hidden": True}


def test_apply_rules_and_success_rate_by_hand():
    rules = [m.Rule("take", "goto", "X"), m.Rule("heat", "toggle", "microwave"),
             m.Rule("take", "open", "cabinet")]
    plan = [("take", "apple"), ("put", "microwave"), ("heat", "apple")]
    # before take apple: lines 0 ('X' -> apple) and 2; before heat apple: line 1
    assert m.apply_rules(plan, rules) == [("goto", "apple"), ("open", "cabinet"), ("take", "apple"),
                                          ("put", "microwave"), ("toggle", "microwave"),
                                          ("heat", "apple")]
    eps = [{"met": 3, "total": 3}, {"met": 1, "total": 3}, {"met": 0, "total": 2}]
    sr, gc = m.success_rate_and_gc(eps)
    # SR 1 of 3; GC (3 + 1 + 0) / (3 + 3 + 2)
    torch.testing.assert_close(torch.tensor([sr, gc]), torch.tensor([1 / 3, 4 / 8]))
    assert m.success_rate_and_gc([]) == (0.0, 0.0)
    assert m.success_rate(eps) == sr


# --- induction ---


def _ep(room, kinds, steps, success):
    task = m.Task(room, tuple((k, "x", "none") for k in kinds))
    return {"room": room, "kinds": kinds, "query": m.query_text(task),
            "steps": [m.Step(*step) for step in steps], "success": success, "met": 0, "total": 1}


FAIL = _ep("kitchen", ["heat"], [("goto", "apple", -1, True), ("take", "apple", 0, False)], False)
WIN = _ep("kitchen", ["heat"], [("goto", "potato", -1, True), ("open", "drawer", -1, False),
                                ("open", "cabinet", -1, True), ("grab", "knife", -1, True),
                                ("take", "potato", 0, True)], True)
WIN2 = _ep("kitchen", ["heat"], [("goto", "apple", -1, True), ("open", "cabinet", -1, True),
                                 ("take", "apple", 0, True)], True)


def test_contrast_pair_and_success_mode_by_hand():
    # the failure failed at take apple having run goto apple; the success ran goto potato (its own
    # argument, so 'goto X', done in the failure), open cabinet and grab knife before take potato;
    # its "open drawer" did nothing (invalid) and is no candidate
    assert m.contrast_pair(WIN, FAIL) == [(("take", "open", "cabinet"), False, "heat"),
                                          (("take", "grab", "knife"), False, "heat")]
    assert m.contrast_pair(WIN) == [(("take", "goto", "potato"), True, "heat"),
                                    (("take", "open", "cabinet"), False, "heat"),
                                    (("take", "grab", "knife"), False, "heat")]
    assert m.contrast_pair(WIN, WIN2) == []  # no failing core action: nothing to contrast
    # success mode looks at every core step; the segment restarts after each
    two = _ep("kitchen", ["heat"], [("goto", "apple", -1, True), ("take", "apple", 0, True),
                                    ("open", "microwave", -1, True), ("put", "microwave", 0, True)],
              True)
    assert m.contrast_pair(two) == [(("take", "goto", "apple"), True, "heat"),
                                    (("put", "open", "microwave"), True, "heat")]
    late = _ep("kitchen", ["heat"], [("take", "apple", 0, True), ("put", "microwave", 0, False)],
               False)
    assert m.contrast_pair(two, late) == [(("put", "open", "microwave"), True, "heat")]


def test_most_similar_and_select_experiences():
    e_s = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    e_f = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    # cos rows: [0.6, 1, 0] -> 1; [0.8, 0, 1] -> 2
    assert m.most_similar(e_s, e_f).tolist() == [1, 2]
    for bad_s, bad_f in ((e_s[0], e_f), (e_s, e_f[0]), (e_s, e_f[:, :1])):
        with pytest.raises(ValueError, match="most_similar: want"):
            m.most_similar(bad_s, bad_f)
    other = _ep("bathroom", ["clean"], [("take", "mug", 0, False)], False)
    pairs = m.select_experiences([other, WIN, FAIL], "pair")  # WIN's query is FAIL's, word for word
    assert [(s is WIN, f is FAIL) for s, f in pairs] == [(True, True)]
    assert m.select_experiences([other, WIN, FAIL], "success") == [(WIN, None)]
    assert m.select_experiences([WIN, WIN2], "pair") == [(WIN, None), (WIN2, None)]


def test_generate_insights_ops_by_hand():
    db = m.InsightDB(":memory:")
    pool = m.SuccessPool()
    ops = m.generate_insights(db, [[(WIN, FAIL)]], pool)
    # one room, one kind -> environment(kitchen); both ADDed at 2, support 1 room
    assert ops == {"ADD": 2}
    assert _rows(db) == {"before take X, open cabinet": ("environment", "kitchen", "", 2),
                         "before take X, grab knife": ("environment", "kitchen", "", 2)}
    ops = m.generate_insights(db, [[(WIN, FAIL)], [(WIN2, FAIL)]], pool)
    # batch 1: AGREE both (3, 3); batch 2: WIN2 took without grab knife -> REMOVE (2);
    # its contrast gives open cabinet -> AGREE (4)
    assert ops == {"AGREE": 3, "REMOVE": 1}
    assert _rows(db) == {"before take X, open cabinet": ("environment", "kitchen", "", 4),
                         "before take X, grab knife": ("environment", "kitchen", "", 2)}
    bedroom = _ep("bedroom", ["cool"], [("open", "cabinet", -1, True), ("take", "tomato", 0, True)],
                  True)
    bed_fail = _ep("bedroom", ["cool"], [("take", "tomato", 0, False)], False)
    ops = m.generate_insights(db, [[(bedroom, bed_fail)]], pool)
    # open cabinet now holds in 2 rooms and 2 kinds -> MOVE to general (score 2); knife: 2 -> 1
    assert ops == {"MOVE": 1, "REMOVE": 1}
    assert _rows(db)["before take X, open cabinet"] == ("general", "", "", 2)
    assert _rows(db)["before take X, grab knife"][3] == 1
    # the flat store: one scale, so the knife rule is refuted anywhere and never added
    flat = m.InsightDB()
    ops = m.generate_insights(flat, [[(WIN2, FAIL)], [(WIN, FAIL)]], m.SuccessPool(), scoped=False)
    assert ops == {"ADD": 1, "AGREE": 1}
    assert _rows(flat) == {"before take X, open cabinet": ("general", "", "", 3)}


def test_edit_generalises_a_concrete_rule_when_a_second_argument_agrees():
    win_a = _ep("kitchen", ["heat"], [("goto", "apple", -1, True), ("take", "apple", 0, True)], True)
    fail_a = _ep("kitchen", ["heat"], [("take", "apple", 0, False)], False)
    win_b = _ep("bedroom", ["heat"], [("goto", "pear", -1, True), ("take", "pear", 0, True)], True)
    fail_b = _ep("bedroom", ["heat"], [("take", "pear", 0, False)], False)
    db = m.InsightDB()
    pool = m.SuccessPool()
    # "goto apple" before "take apple": the concrete version first, at the kitchen
    assert m.generate_insights(db, [[(win_a, fail_a)]], pool) == {"ADD": 1}
    assert _rows(db) == {"before take X, goto apple": ("environment", "kitchen", "", 2)}
    # the bedroom's "goto pear" before "take pear" agrees on the trigger's own argument: EDIT to X,
    # score kept at 2 (the bedroom success is outside the kitchen rule's scope: not refuted)
    assert m.generate_insights(db, [[(win_b, fail_b)]], pool) == {"EDIT": 1}
    assert _rows(db) == {"before take X, goto X": ("environment", "kitchen", "", 2)}
    # found again through its X version: its evidence now spans two rooms and one kind, so it
    # MOVEs to subtask(heat)
    assert m.generate_insights(db, [[(win_b, fail_b)]], pool) == {"MOVE": 1}
    assert _rows(db) == {"before take X, goto X (TASK: heat)": ("subtask", "", "heat", 2)}


def test_a_rule_refuted_in_its_room_goes_to_its_subtask_and_stays():
    heat_win = _ep("kitchen", ["heat"], [("goto", "mug", -1, True), ("take", "mug", 0, True)], True)
    brew_win = _ep("kitchen", ["brew"], [("goto", "mug", -1, True), ("rinse", "mug", -1, True),
                                         ("take", "mug", 0, True)], True)
    brew_fail = _ep("kitchen", ["brew"], [("goto", "mug", -1, True), ("take", "mug", 0, False)],
                    False)
    db = m.InsightDB()
    pool = m.SuccessPool()
    # the kitchen heat success took the mug unrinsed: "rinse mug" is refuted at the kitchen (both
    # the concrete and the 'X' version), not for brew tasks -> ADD at subtask(brew)
    ops = m.generate_insights(db, [[(heat_win, brew_fail), (brew_win, brew_fail)]], pool)
    assert ops == {"ADD": 1}
    assert _rows(db) == {"before take X, rinse mug (TASK: brew)": ("subtask", "", "brew", 2)}
    # more kitchen-only evidence implies the kitchen scope, where it is refuted: AGREE, no MOVE
    ops = m.generate_insights(db, [[(brew_win, brew_fail)]], pool)
    assert ops == {"AGREE": 1}
    assert _rows(db) == {"before take X, rinse mug (TASK: brew)": ("subtask", "", "brew", 3)}


def test_refuted_incremental_equals_a_plain_loop():
    rng = random.Random(3)
    pool = m.SuccessPool()
    rules = [m.Rule("take", "goto", "X"), m.Rule("take", "open", "cabinet"),
             m.Rule("put", "open", "X"), m.Rule("heat", "toggle", "microwave"),
             m.Rule("take", "rinse", "mug")]
    scopes = [m.Scope("general", "", ""), m.Scope("environment", "kitchen", ""),
              m.Scope("subtask", "", "brew"), m.Scope("subtask", "", "heat")]
    seen = []
    for _ in range(6):
        batch = [m.explore(rng, m.sample_task(rng, rng.choice(m.ROOMS)), 0.5) for _ in range(40)]
        for ep in batch:
            if ep["success"]:
                pool.add(ep)
                seen.append(ep)
        for rule in rules:
            for scale, env, kind in scopes:
                plain = False
                for ep in seen:
                    done = set()
                    for verb, arg, si, ok in ep["steps"]:
                        in_scope = (scale != "environment" or ep["room"] == env) and (
                            scale != "subtask" or ep["kinds"][max(si, 0)] == kind)
                        if si >= 0 and verb == rule[0] and in_scope:
                            plain = plain or m.needed(rule, arg) not in done
                        if ok:
                            done.add((verb, arg))
                assert m.refuted(rule, m.Scope(scale, env, kind), pool) == plain
    assert m.refuted(m.Rule("take", "goto", "X"), m.GENERAL, pool) is False
    assert m.refuted(m.Rule("take", "open", "cabinet"), m.GENERAL, pool) is True


def test_scale_of_and_rule_recall():
    assert m.scale_of({"rooms": ["a", "b"], "kinds": ["heat", "cool"]}) == ("general", "", "")
    assert m.scale_of({"rooms": ["a"], "kinds": ["heat", "cool"]}) == ("environment", "a", "")
    assert m.scale_of({"rooms": ["a", "b"], "kinds": ["heat"]}) == ("subtask", "", "heat")
    rows = m.true_rows(m.ROOMS)
    assert len(rows) == 13 and m.rule_recall(rows)["recall_right_scale"] == 1.0
    assert len(m.true_rows(("kitchen",))) == 3 + 1 + 5
    # one rule dropped, one at the wrong scale, one spurious
    rows = [dict(r) for r in rows[1:]] + [_row(99, "general", "", "", "before look X, goto X")]
    rows[2]["scale"] = "general"  # the kitchen's rule
    rows[2]["environment"] = ""
    got = m.rule_recall(rows)
    assert (got["induced"], got["spurious"]) == (13, 1)
    assert got["recall_any_scale"] == pytest.approx(12 / 13)
    assert got["recall_right_scale"] == pytest.approx(11 / 13)
    assert got["missed"] == ["before take X, goto X"] and len(got["wrong_scale"]) == 1


# --- the planner ---


def test_tiktoken_words_are_one_token_each():
    for row, word in enumerate(m.VOCAB):
        tag = word in m.SPECIALS
        ids = m.ENC.encode(word if tag else " " + word, allowed_special="all")
        assert len(ids) == 1 and m.ROW[ids[0]] == row and m.ENC.decode(ids).strip() == word
    words = [("kitchen", "<pad>", "<pad>"), ("take", "goto", "X")]
    assert m.tokenize(words) == [[m.VOCAB.index(w) for w in item] for item in words]
    with pytest.raises(m.BadInput):
        m.tokenize([("kitchenette", "<pad>", "<pad>")])


def test_encode_prompt_hides_the_room():
    rules = [("take", "goto", "X")]
    shown = m.encode_prompt(HEAT_MUG, rules)
    hidden = m.encode_prompt(HEAT_MUG, rules, hide_room=True)
    assert shown[0][0] == m.VOCAB.index("kitchen") and hidden[0][0] == m.VOCAB.index("unk")
    assert shown[1:] == hidden[1:] and len(shown) == m.LINES_AT + 1 + 1
    assert shown[m.LINES_AT] == [m.VOCAB.index(w) for w in rules[0]]
    assert shown[2] == [m.VOCAB.index("none")] * 3  # the empty second subtask


def test_pointer_logits_by_hand():
    model = m.Planner(4, 1, 1, 8)
    with torch.no_grad():
        for lin in (model.ptr_q, model.ptr_k):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    h_step = torch.tensor([[[1.0, 2.0, 0.0, 0.0]]])  # (1, 1, 4)
    h_lines = torch.tensor([[[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])  # (1, 2, 4)
    # s = (1*3 + 2*1) / sqrt(4) = 2.5 and 0 / 2 = 0
    torch.testing.assert_close(model.pointer(h_step, h_lines), torch.tensor([[[2.5, 0.0]]]))


def test_planner_loss_by_hand():
    verb = torch.zeros(1, 2, 3)  # uniform over 3 words: CE = log 3
    arg = torch.zeros(1, 2, 3)
    y = torch.tensor([[[1, 2], [-1, -1]]])  # one target position
    ptr_logits = torch.tensor([[[0.0], [2.0]]])
    ptr = torch.tensor([[[-1.0], [1.0]]])  # one pointer target: BCE(2, 1) = log(1 + e^-2)
    loss_verb, loss_arg, loss_ptr = m.planner_loss(verb, arg, ptr_logits, y, ptr)
    log3 = torch.tensor(3.0).log()
    torch.testing.assert_close(loss_verb, log3)
    torch.testing.assert_close(loss_arg, log3)
    torch.testing.assert_close(loss_ptr, torch.tensor(1 + np.exp(-2.0)).log().float())
    y2 = torch.tensor([[[1, 2], [0, 0]]])  # a second position whose targets score 0 -> same CE
    torch.testing.assert_close(m.planner_loss(verb, arg, ptr_logits, y2, ptr)[0], log3)
    assert m.planner_loss(verb, arg, ptr_logits, y, torch.full((1, 2, 1), -1.0))[2] == 0
    with pytest.raises(ValueError):
        m.planner_loss(verb, arg, ptr_logits, y, torch.zeros(1, 2, 2))
    with pytest.raises(ValueError):
        m.planner_loss(verb, arg, ptr_logits, y[..., :1], ptr)


def test_make_batch_targets():
    batch = m.make_batch(random.Random(0), 8, 6)
    x, y, ptr, n = batch
    assert x.shape[:2] == y.shape[:2] == ptr.shape[:2] and ptr.shape[2] == max(n, 1)
    start = m.LINES_AT + n + 1
    assert (y[:, :start - 1] == -1).all() and (ptr[:, :start] == -1).all()
    for i in range(x.shape[0]):
        assert x[i, start - 1, 0] == m.VOCAB.index("<plan>")
        lines = x[i, m.LINES_AT:m.LINES_AT + n, 0]  # each line's trigger verb
        for t in range(start - 1, x.shape[1] - 1):
            if y[i, t, 0] >= 0 and y[i, t, 0] != m.EOS:
                assert y[i, t].tolist() == x[i, t + 1, :2].tolist()  # the next step, shifted
                want = (lines == x[i, t + 1, 0]).float()  # lines triggering on that step
                assert ptr[i, t + 1, :n].tolist() == want.tolist()
        ends = (y[i, :, 0] == m.EOS).nonzero()
        assert len(ends) == 1 and y[i, ends[0, 0], 1] == -1


def test_planner_shapes_and_cached_generation():
    torch.manual_seed(0)
    model = m.Planner(16, 1, 2, 40).eval()
    task = m.Task("kitchen", (("heat", "apple", "none"),))
    prompts = [m.encode_prompt(task, [("take", "goto", "X")]),
               m.encode_prompt(task, [("heat", "wet", "X")])]
    x = torch.tensor(prompts)
    vl, al, h = model(x, torch.arange(6)[None])
    assert vl.shape == (2, 6, len(m.VOCAB)) and model.pointer(h, h[:, 4:5]).shape == (2, 6, 1)
    # causal: items appended on the right change nothing at the earlier positions
    padded = torch.cat([x, torch.zeros(2, 3, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded, torch.arange(9)[None])[2][:, :6], h)
    out = m.generate(model, prompts, 1, torch.device("cpu"), 3)
    assert len(out) == 2 and all(len(p) <= 3 for p in out)
    # past the last position the decoder keeps reusing it instead of indexing out of range
    short = m.Planner(16, 1, 2, 6).eval()
    assert len(m.generate(short, prompts, 1, torch.device("cpu"), 3)) == 2
    # the KV-cached decoding equals greedy decoding that re-runs the whole sequence every step
    seq = x[:1]
    for (verb, arg), chosen in out[0]:
        vl, al, h = model(seq, torch.arange(seq.shape[1])[None])
        assert (m.VOCAB[vl[0, -1].argmax()], m.VOCAB[al[0, -1].argmax()]) == (verb, arg)
        step = torch.tensor([[[m.VOCAB.index(verb), m.VOCAB.index(arg), m.PAD]]])
        seq = torch.cat([seq, step], 1)
        h = model(seq, torch.arange(seq.shape[1])[None])[2]
        assert [j for j in range(1) if model.pointer(h[:, -1:], h[:, 4:5])[0, 0, j] > 0] == chosen


def test_training_teaches_the_pointer(capsys):
    cfg = m.Config(steps=50, n_embd=32, batch_size=32, max_lines=6, budget=4, sweep="3",
                   log_every=25, lr=1e-2)
    torch.manual_seed(0)
    model, exact = m.train_planner(cfg, torch.device("cpu"), max_len=24)
    batch = m.make_batch(random.Random(9), 64, 6)
    with torch.no_grad():
        vl, al, h = model(batch.x, torch.arange(batch.x.shape[1])[None])
        ptr_logits = model.pointer(h, h[:, m.LINES_AT:m.LINES_AT + batch.ptr.shape[-1]])
        loss_verb, _, loss_ptr = m.planner_loss(vl, al, ptr_logits, batch.y, batch.ptr)
    keep = batch.ptr >= 0
    accuracy = ((ptr_logits[keep] > 0).float() == batch.ptr[keep]).float().mean()
    # untrained: BCE about log 2 = 0.69 and accuracy about the share of zeros
    assert loss_ptr < 0.35 and accuracy > 0.9, (loss_ptr, accuracy)
    assert loss_verb < 1.0
    # the share of demonstrations planned exactly over the last log_every steps: a fraction
    assert 0.0 < exact < 1.0, exact
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [line[:13] for line in logged] == ["step    25/50", "step    50/50"]  # every 25 steps


def test_plan_exact_by_hand():
    # two demonstrations, two positions, vocabulary 3, one line
    verb = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    arg = torch.zeros(2, 2, 3)  # argmax 0 everywhere
    y = torch.tensor([[[1, 0], [2, -1]], [[1, 0], [-1, -1]]])
    ptr_logits = torch.tensor([[[1.0], [-1.0]], [[1.0], [-1.0]]])
    ptr = torch.tensor([[[1.0], [-1.0]], [[1.0], [0.0]]])
    # row 0: verbs 1, 2 right, args 0 (and ignored) right, pointer bit 1 right -> exact
    # row 1: verb 0 where 1 is due -> not exact
    assert m.plan_exact(verb, arg, ptr_logits, y, ptr) == 0.5
    ptr_wrong = torch.tensor([[[0.0], [-1.0]], [[1.0], [0.0]]])  # row 0's pointer bit now wrong
    assert m.plan_exact(verb, arg, ptr_logits, y, ptr_wrong) == 0.0
    y_arg = torch.tensor([[[1, 1], [2, -1]], [[1, 0], [-1, -1]]])  # row 0 wants argument 1
    assert m.plan_exact(verb, arg, ptr_logits, y_arg, ptr) == 0.0
    y_pad = torch.tensor([[[1, 0], [0, -1]], [[1, 0], [-1, -1]]])  # verb 0 due, 2 predicted
    assert m.plan_exact(verb, arg, ptr_logits, y_pad, ptr) == 0.0
    ignored = torch.tensor([[[1.0], [-1.0]], [[1.0], [-1.0]]])
    verb[1, 0] = torch.tensor([0.0, 1.0, 0.0])  # row 1 right too; its pointer -1 is ignored
    assert m.plan_exact(verb, arg, ptr_logits, y, ignored) == 1.0


# --- evaluation ---


def _fixed_planner(monkeypatch, seen):
    """A planner whose answers are fixed: the task's steps, pointing at every line whose trigger is
    the step's verb, except that it never points before 'heat'. Records the prompts."""
    def fake_generate(model, prompts, n_lines, device, max_steps):
        out = []
        for prompt in prompts:
            seen.append(prompt)
            task_words = [m.VOCAB[i] for i in prompt[1]]
            task = m.Task("kitchen", ((task_words[0], task_words[1], task_words[2]),))
            lines = [[m.VOCAB[i] for i in row] for row in prompt[m.LINES_AT:m.LINES_AT + n_lines]]
            out.append([(act, [j for j, line in enumerate(lines)
                               if line[0] == act[0] and act[0] != "heat"])
                        for act in m.task_plan(task)])
        return out
    monkeypatch.setattr(m, "generate", fake_generate)


def test_evaluate_with_the_applier_and_a_fixed_planner(monkeypatch):
    tasks = [HEAT_MUG, m.Task("kitchen", (("look", "book", "none"),)),
             m.Task("kitchen", (("brew", "mug", "none"),))]
    # the applier with hashmap lines: all three succeed (brew finds its rinse rule by name)
    eps = m.evaluate(ROWS, tasks, "hashmap", 8)
    assert [e["success"] for e in eps] == [True, True, True]
    # vector lines add the brew rule to heat mug too: the rinsed mug spoils heating
    eps = m.evaluate(ROWS, tasks, "vector", 6)
    assert [e["success"] for e in eps] == [False, True, True]
    assert [e["success"] for e in m.evaluate(ROWS, tasks, "none", 8)] == [False, True, False]
    # vector selects per query, not per kind: heat apple ranks the brew rule below slice's
    # (both cos 0, by id), heat mug ranks it second and is spoiled
    apple_first = [m.Task("kitchen", (("heat", "apple", "none"),)), HEAT_MUG]
    assert [e["success"] for e in m.evaluate(ROWS, apple_first, "vector", 6)] == [True, False]
    # the fixed planner skips the toggle before heat: heat mug fails at its last step only
    seen = []
    _fixed_planner(monkeypatch, seen)
    eps = m.evaluate(ROWS, tasks, "hashmap", 8, model="fixed", device="cpu")
    assert [(e["met"], e["total"], e["agrees_with_applier"]) for e in eps] == [
        (2, 3, False), (1, 1, True), (2, 2, True)]
    assert all(p[0][0] == m.VOCAB.index("kitchen") for p in seen)
    seen.clear()
    m.evaluate(ROWS, tasks, "hashmap", 8, model="fixed", device="cpu", hide_room=True)
    assert len(seen) == 3 and all(p[0][0] == m.VOCAB.index("unk") for p in seen)


def test_arm_metrics_with_a_fixed_planner(monkeypatch):
    _fixed_planner(monkeypatch, [])
    test_in = [HEAT_MUG, m.Task("kitchen", (("slice", "apple", "none"),))]
    test_ood = [m.Task("garage", (("heat", "apple", "none"),)),
                m.Task("garage", (("slice", "bread", "none"),))]
    rows = ROWS + [_row(9, "subtask", "", "slice", "before take X, unwrap bread (TASK: toast)", 1)]
    got = m.arm_metrics(rows, test_in, test_ood, "hashmap", 8, "fixed", "cpu")
    # in domain: the applier solves both (SR 1, GC 4/4); the fixed planner misses the toggle:
    # heat mug 2 of 3 (SR 1/2, GC 3/4), and its plan differs from the applier's on that task
    assert (got["sr_rule_applier"], got["gc_rule_applier"]) == (1.0, 1.0)
    assert (got["sr"], got["gc"], got["plans_as_applier"]) == (0.5, 0.75, 0.5)
    # garage: the heat rule toggles the microwave off (flipped); slice fine: applier 1/2
    assert got["ood_sr_rule_applier"] == 0.5 and got["ood_gc_rule_applier"] == 0.75
    assert got["ood_sr_rule_applier_flipped"] == 0.0 and got["ood_sr_rule_applier_other"] == 1.0
    # the fixed planner skips the harmful toggle in the garage: both succeed
    assert (got["ood_sr"], got["ood_plans_as_applier"]) == (1.0, 0.5)
    assert m.needs_flipped_rule(test_ood[0]) and not m.needs_flipped_rule(test_ood[1])
    assert not m.needs_flipped_rule(HEAT_MUG)


def test_mean_tree_and_summarize():
    assert m.mean_tree([{"a": 1, "b": {"c": 2.0, "d": "x"}, "e": True},
                        {"a": 3, "b": {"c": 4.0, "d": "y"}, "e": False}]) == {
        "a": 2.0, "b": {"c": 3.0, "d": "x"}, "e": True}
    seed = {"arms": {"none": {"sr": 0.2, "gc": 0.5}}, "controls": {"c": 1.0},
            "domain_shift": {"msi": {"sr_drop": 0.1}}}
    other = {"arms": {"none": {"sr": 0.6, "gc": 0.7}}, "controls": {"c": 0.0},
             "domain_shift": {"msi": {"sr_drop": 0.3}}}
    res = m.summarize([seed, other], [0, 1000])
    arm = res["arms"]["none"]
    assert res["seeds"] == [0, 1000]
    assert arm["sr"] == pytest.approx(0.4) and arm["gc"] == pytest.approx(0.6)
    assert arm["per_seed"] == {"sr": [0.2, 0.6], "gc": [0.5, 0.7]}
    assert arm["sr_std"] == pytest.approx(0.2) and arm["sr_worst"] == 0.2
    assert res["domain_shift"]["msi"]["per_seed"] == {"sr_drop": [0.1, 0.3]}
    assert res["controls"]["c"] == 0.5 and res["controls"]["per_seed"] == {"c": [1.0, 0.0]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    data = out / "tasks.jsonl"
    tasks = [("kitchen", ["heat mug"]), ("bedroom", ["look book"]), ("bathroom", ["light lamp"]),
             ("livingroom", ["toast bread", "fill cup"])]
    data.write_text("".join(json.dumps({"room": r, "subtasks": s}) + "\n" for r, s in tasks))
    res = m.main(["--smoke", "--out", str(out), "--data", str(data), "--device", "cpu",
                  "--seeds", "1", "--workers", "1"])
    return out, res, m.parse_user_tasks([{"room": r, "subtasks": s} for r, s in tasks], "d")


def test_smoke_run_results_match_the_saved_insights(smoke):
    out, res, tasks = smoke
    data = json.load(open(out / "results.json"))
    assert os.path.exists(out / "msi_agent.png")
    assert (out / "results.md").read_text() == m.render_report(data)
    assert data["seeds"] == [0] and set(data["arms"]) == set(m.ARMS)
    for arm in m.ARMS:
        a = data["arms"][arm]
        assert {"sr", "gc", "ood_sr", "ood_gc", "sr_rule_applier", "per_seed"} <= set(a)
        assert a["per_seed"]["sr"] == [a["sr"]] and a["sr_worst"] == a["sr"]
    # none: only the rule-free tasks (look, light) succeed: 2 of 4, GC 2 / (3 + 1 + 1 + 4)
    assert data["arms"]["none"]["sr_rule_applier"] == 0.5
    assert data["arms"]["none"]["gc_rule_applier"] == pytest.approx(2 / 9)
    assert data["controls"]["ceiling_true_rules_sr"] == 1.0
    # the saved MSI store, reopened, gives the same applier numbers for the arms that read it
    db = m.InsightDB(str(out / "insights.sqlite"))
    rows = db.select()
    assert rows and db.con.execute("SELECT count(*) FROM experiences").fetchone()[0] == 300
    for arm in ("general_only", "msi_vector", "msi_hashmap"):
        eps = m.evaluate(rows, tasks, m.ARMS[arm].selection, 8)
        sr, gc = m.success_rate_and_gc(eps)
        got = data["arms"][arm]
        assert (got["sr_rule_applier"], got["gc_rule_applier"]) == (sr, gc)
        assert data["budget_sweep"]["8"][arm] == sr
    sr3 = m.success_rate_and_gc(m.evaluate(rows, tasks, "hashmap", 3))[0]
    assert data["budget_sweep"]["3"]["msi_hashmap"] == sr3
    hidden = m.success_rate(m.evaluate(rows, tasks, "vector_no_objects", 8))
    assert data["controls"]["vector_objects_hidden_sr_rule_applier"] == hidden
    for shift in data["domain_shift"].values():
        assert shift["sr_drop"] == pytest.approx(shift["sr_kitchen"] - shift["sr_plus_bedroom"])
    assert data["recall_seed0"]["msi"] == m.rule_recall(rows)
    assert res["arms"].keys() == data["arms"].keys()


def test_bad_input_exits_2(capsys):
    for argv in (["--budget", "0"], ["--explore-p", "1.5"], ["--sweep", "3,x"],
                 ["--budget", "40"], ["--n-embd", "30"]):
        with pytest.raises(SystemExit) as e:
            m.main(argv)
        assert e.value.code == 2
    assert capsys.readouterr().err.count("error:") == 5


def test_grow_db_counts_every_operation():
    db = m.InsightDB()
    info = m.grow_db(db, [WIN, FAIL, WIN2], "pair", 1, m.SuccessPool())
    # two pairs (WIN, FAIL), (WIN2, FAIL) in batches of one: ADD 2, then REMOVE knife, AGREE cabinet
    assert info == {"experiences": 2, "insights": 2,
                    "ops": {"ADD": 2, "AGREE": 1, "EDIT": 0, "REMOVE": 1, "MOVE": 0}}


def test_kv_cache_appends_along_time_and_decoding_matches_a_full_pass():
    cache = m.KVCache()
    k1 = torch.ones(1, 2, 3, 4)
    k2 = torch.zeros(1, 2, 1, 4)
    assert cache.append(k1, k1 * 2)[0] is k1  # empty before the prefill: kept as given
    k, v = cache.append(k2, k2)
    assert k.shape == (1, 2, 4, 4) and k[:, :, 3].sum() == 0 and v[:, :, :3].sum() == 2 * 24
    torch.manual_seed(0)
    model = m.Planner(16, 2, 2, 12).eval()
    idx = torch.randint(0, len(m.VOCAB), (2, 7, 3))
    with torch.no_grad():
        full = model(idx, torch.arange(7)[None])
        caches = [m.KVCache() for _ in model.blocks]
        model(idx[:, :5], torch.arange(5)[None], caches)  # prefill
        step5 = model(idx[:, 5:6], torch.tensor([[5]]), caches)
        step6 = model(idx[:, 6:7], torch.tensor([[6]]), caches)
    for whole, one, t in ((full, step5, 5), (full, step6, 6)):
        for a, b in zip(whole, one):
            torch.testing.assert_close(a[:, t:t + 1], b, atol=1e-5, rtol=1e-5)
    assert caches[0].k.shape == (2, 2, 7, 8)  # (B, n_head, T, hs)


def _arm(sr, ood_sr, seeds, ood_seeds):
    return {"sr": sr, "gc": sr, "sr_rule_applier": sr, "plans_as_applier": 1.0,
            "ood_sr": ood_sr, "ood_gc": ood_sr, "ood_sr_rule_applier": ood_sr,
            "ood_plans_as_applier": 0.99, "ood_sr_rule_applier_flipped": 0.25,
            "ood_sr_rule_applier_other": 0.75, "per_seed": {"sr": seeds, "ood_sr": ood_seeds}}


def _results():
    arms = {"none": _arm(0.1, 0.1, [0.1, 0.1], [0.1, 0.1]),
            "flat": _arm(0.3, 0.6, [0.3, 0.3], [0.6, 0.6]),
            "msi_success_mode": _arm(0.5, 0.5, [0.5, 0.5], [0.5, 0.5]),
            "general_only": _arm(0.2, 0.7, [0.2, 0.2], [0.7, 0.7]),
            "msi_vector": _arm(0.6, 0.5, [0.5, 0.7], [0.5, 0.5]),
            "msi_hashmap": _arm(0.8, 0.65, [0.7, 0.9], [0.6, 0.7])}
    controls = {"ceiling_true_rules_sr": 1.0, "ood_true_rules_hashmap_sr": 0.6,
                "ood_true_rules_general_sr": 0.7, "vector_objects_hidden_sr_rule_applier": 0.7,
                "hashmap_room_hidden_sr": 0.8}
    controls["per_seed"] = {k: [v, v] for k, v in controls.items()}
    shift = {"msi": {"sr_kitchen": 0.7, "sr_plus_livingroom": 0.7, "sr_plus_bedroom": 0.65,
                     "sr_drop": 0.05, "per_seed": {"sr_drop": [0.0, 0.1]}},
             "flat": {"sr_kitchen": 0.5, "sr_plus_livingroom": 0.3, "sr_plus_bedroom": 0.2,
                      "sr_drop": 0.3, "per_seed": {"sr_drop": [0.2, 0.4]}}}
    sweep = {"3": {"flat": 0.2, "general_only": 0.2, "msi_vector": 0.2, "msi_hashmap": 0.2},
             "8": {"flat": 0.3, "general_only": 0.2, "msi_vector": 0.6, "msi_hashmap": 0.8},
             "30": {"flat": 0.3, "general_only": 0.2, "msi_vector": 0.6, "msi_hashmap": 0.803}}
    store = {"experiences": 100, "insights": 5, "ops": dict.fromkeys(m.OPS, 1)}
    recall = {"hidden": 13, "induced": 14, "recall_any_scale": 1.0, "recall_right_scale": 0.9,
              "spurious": 1, "missed": [], "wrong_scale": ["before heat X, toggle microwave"]}
    return {"config": {"explore_episodes": 100, "eval_episodes": 10, "budget": 8, "steps": 5,
                       "workers": 2},
            "seeds": [0, 1000], "planner_plan_exact": 0.9, "arms": arms, "controls": controls,
            "domain_shift": shift, "budget_sweep": sweep, "paper_sr": m.PAPER_SR,
            "recall_seed0": {"msi": recall, "success": dict(recall, induced=40)},
            "induction": {"explore_sr": 0.2, "msi": store, "success": store, "flat": store},
            "applier_seeds": {"seeds": [0, 1000, 2000], "headline_seeds": 2, "arms": {
                name: {"sr": arm["per_seed"]["sr"] + [arm["sr"]],
                       "ood_sr": arm["per_seed"]["ood_sr"] + [arm["ood_sr"]]}
                for name, arm in arms.items()}},
            "wall_s": 12.0, "cpu_time_s": 20.0, "train_cpu_s": 5.0}


def _verdicts(report):
    return [line for line in report.splitlines() if line.startswith("- ") and ": " in line][:5]


def test_render_report_verdicts_follow_the_numbers():
    res = _results()
    report = m.render_report(res)
    # hashmap 0.8 first, vector 0.6 next; hashmap - vector per seed 0.2, 0.2; the paper's gaps
    # (12.70 - 10.05) / 100 = 0.0265 and (14.54 - 11.43) / 100 = 0.0311: 0.2 / 0.0311 = 6.4x,
    # 0.2 / 0.0265 = 7.5x; hashmap - flat 0.4, 0.6; garage best general_only 0.7; drops 0.05 < 0.3
    assert _verdicts(report) == [
        "- In domain, multi-scale + hashmap has the best SR: yes (0.800; next msi_vector 0.600).",
        "- Vector selection below hashmap on every seed: yes (hashmap - vector +0.200, per seed "
        "+0.200 .. +0.200; the paper's gap on TEACh: +0.0265 seen, +0.0311 unseen, so ours is "
        "6.4-7.5x).",
        "- Multi-scale + hashmap above the flat ExpeL-like store on every seed: yes (+0.500, "
        "worst seed +0.400).",
        "- Out of domain (garage), general_only has the best SR: yes (general_only 0.700, best "
        "general_only 0.700).",
        "- Under domain shift MSI loses less kitchen SR than the flat store: yes (drop +0.050 vs "
        "+0.300)."]
    # mean ± std [worst]: hashmap SR 0.8 ± 0.1 [0.7]; the worst drop is the largest
    assert "| msi_hashmap | 0.800 ± 0.100 [0.700] | 0.800 | 0.800 | 1.000 |" in report
    assert "| flat | 0.500 | 0.300 | 0.200 | 0.300 ± 0.100 [0.400] |" in report
    # 0.803 is the best hashmap budget; 0.8 at 8 lines is within 0.005 of it
    assert "plateau (within 0.005 of 0.803) at 8 lines; the default budget is 8 lines" in report
    assert "the toy needs insights: yes" in report and "on 0.990-1.000 of tasks" in report
    # vector applier 0.6, hidden 0.7, hashmap 0.8: the shared objects cost 0.1 of the 0.2 gap
    assert "costs 0.100 of the 0.200 hashmap - vector gap" in report
    assert "general_only wins on every seed: yes" in report  # true rules: 0.7 > 0.6, both seeds
    # three applier seeds: hashmap 0.7 0.9 0.8 vs vector 0.5 0.7 0.6 and flat 0.3: 3 of 3; garage
    # general_only 0.7 vs hashmap 0.6 0.7 0.65: above on 2 of 3 (0.7 = 0.7 is not above)
    assert "| msi_hashmap | 0.800 ± 0.082 [0.700] | 0.650 ± 0.041 [0.600] |" in report
    assert ("msi_hashmap above msi_vector on 3 of 3 seeds and above flat on 3 of 3; in the garage "
            "general_only above msi_hashmap on 2 of 3.") in report
    res["arms"]["msi_vector"]["per_seed"]["sr"] = [0.5, 0.95]  # one seed: hashmap - vector -0.05
    res["arms"]["general_only"]["ood_sr"] = 0.6
    res["domain_shift"]["msi"]["sr_drop"] = 0.4
    res["arms"]["none"]["sr"] = 0.6
    res["controls"]["per_seed"]["ood_true_rules_general_sr"] = [0.7, 0.5]
    flipped = _verdicts(m.render_report(res))
    assert [line.split(": ")[1][:3] for line in flipped] == ["yes", "NO ", "yes", "NO ", "NO "]
    assert "the toy needs insights: NO" in m.render_report(res)
    assert "general_only wins on every seed: NO" in m.render_report(res)


def test_applier_seed_equals_the_headline_seeds_applier(smoke):
    out, res, tasks = smoke
    table = res["applier_seeds"]
    # --seeds 1 in the smoke fixture: one headline seed (0) and one applier-only seed (1000)
    assert table["seeds"] == [0, 1000] and table["headline_seeds"] == 1
    for name, arm in res["arms"].items():
        assert table["arms"][name]["sr"][0] == arm["sr_rule_applier"]
        assert table["arms"][name]["ood_sr"][0] == arm["ood_sr_rule_applier"]
    # the same seed as an applier-only job gives the headline seed's applier numbers
    cfg = m.Config(**dict(res["config"], out=str(out)))
    job = m.SeedJob(cfg, 0, "cpu", None, tasks, ":memory:")
    applier = m.run_seed(job)
    assert {name: arm["sr"] for name, arm in applier["arms"].items()} == {
        name: arm["sr_rule_applier"] for name, arm in res["arms"].items()}
    assert {name: arm["ood_sr"] for name, arm in applier["arms"].items()} == {
        name: arm["ood_sr_rule_applier"] for name, arm in res["arms"].items()}
    # the extra column is what an applier-only job for seed 1000 gives
    extra = m.run_seed(job._replace(seed=1000))
    assert extra["arms"] == {name: {"sr": arm["sr"][1], "ood_sr": arm["ood_sr"][1]}
                             for name, arm in table["arms"].items()}


def test_induce_builds_three_stores_at_their_scales(tmp_path):
    cfg = m.Config(pair_batch=8)
    path = str(tmp_path / "store.sqlite")
    rows, induction = m.induce(cfg, [WIN, FAIL, WIN2], path)
    scopes = {name: {(r["rule"], r["scale"]) for r in store} for name, store in rows.items()}
    # MSI (pair mode, one batch): WIN and WIN2 each paired with FAIL; both kitchen heat -> the
    # kitchen; WIN2 took without grab knife: that rule is refuted, only open cabinet is added
    assert scopes["msi"] == {("before take X, open cabinet", "environment")}
    # success mode, scoped: every valid step before take, in the kitchen. "goto apple" (WIN2) is
    # refuted by WIN's take potato, so its 'X' version is added; "goto potato" then finds it;
    # "grab knife" is refuted by WIN2 at the kitchen and at subtask(heat)
    assert scopes["success"] == {("before take X, goto X", "environment"),
                                 ("before take X, open cabinet", "environment")}
    # the flat store has one scale
    assert scopes["flat"] == {("before take X, open cabinet", "general")}
    assert induction["explore_sr"] == 0.0  # these hand episodes meet 0 of 1 goal conditions
    assert induction["msi"]["experiences"] == 2
    assert induction["success"]["experiences"] == 2
    db = m.InsightDB(path)  # the MSI store and its three experiences are on disk
    assert [r["rule"] for r in db.select()] == ["before take X, open cabinet"]
    assert db.con.execute("SELECT count(*) FROM experiences").fetchone() == (3,)
    db.close()


def test_domain_shift_reports_each_stage_and_the_drop(monkeypatch):
    cfg = m.Config(eval_episodes=2, shift_episodes=3, pair_batch=4)
    rates = iter([0.9, 0.5, 0.2, 0.8, 0.6, 0.7])  # msi's three stages, then flat's
    monkeypatch.setattr(m, "evaluate", lambda *args: [])
    monkeypatch.setattr(m, "success_rate", lambda episodes: next(rates))
    shift = m.domain_shift(cfg, random.Random(0), None, "cpu")
    # drop = kitchen - after bedroom: 0.9 - 0.2 = 0.7; 0.8 - 0.7 = 0.1
    assert shift["msi"] == pytest.approx({"sr_kitchen": 0.9, "sr_plus_livingroom": 0.5,
                                          "sr_plus_bedroom": 0.2, "sr_drop": 0.7})
    assert shift["flat"] == pytest.approx({"sr_kitchen": 0.8, "sr_plus_livingroom": 0.6,
                                           "sr_plus_bedroom": 0.7, "sr_drop": 0.1})
