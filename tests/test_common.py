"""The contract every script keeps: importable without side effects, a generated --help, a --smoke run
that writes its record (results.json, results.md rendered from it, a figure) and gives the same numbers
on one worker or two, bad input answered with one line and exit status 2, the house layout (the paper's
method first, the study next, the boilerplate last), the committed record rendered from its JSON, the
boilerplate helpers as the canonical text of tests/boilerplate.py, and GRPO tested once for all."""
import ast
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tokenize

import pytest
import torch

from conftest import ROOT

ALL_SCRIPTS = ["flowrl", "fope", "contextar", "ssrl", "read_r", "hallucination_lens", "msi_agent"]
SCRIPTS = [s for s in ALL_SCRIPTS if os.path.exists(os.path.join(ROOT, f"{s}.py"))]
GRPO_SCRIPTS = [s for s in ["flowrl", "ssrl", "read_r"] if s in SCRIPTS]
ENCODING_SCRIPTS = [s for s in ["ssrl", "read_r", "hallucination_lens", "msi_agent"] if s in SCRIPTS]


def source(name):
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        return f.read()


def drop_timing(obj):
    """Everything but timing values (keys with 'time' or 'speedup', or ending in '_s' / 'per_s')."""
    if isinstance(obj, dict):
        return {k: drop_timing(v) for k, v in obj.items()
                if not ("time" in k or "speedup" in k or k.endswith("_s"))}
    if isinstance(obj, list):
        return [drop_timing(v) for v in obj]
    return obj


def test_every_script_is_present():
    assert SCRIPTS, "no script found at the repo root"


def test_import_has_no_side_effects(tmp_path):
    # one fresh interpreter imports every script (one process keeps the suite fast): nothing is printed,
    # nothing is written
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", "import " + ", ".join(SCRIPTS)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert os.listdir(tmp_path) == []  # no runs/ folder, no files


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_zero(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--steps" in out and "--smoke" in out and "--seed" in out


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_record_is_the_same_for_one_or_two_workers(name, tmp_path):
    """--smoke with one worker and with two: the same results.json (timings aside), and results.md is
    render_report of that results.json."""
    module = importlib.import_module(name)
    results = []
    for workers in ("1", "2"):
        out = tmp_path / workers
        module.main(["--smoke", "--seed", "3", "--device", "cpu", "--workers", workers, "--out", str(out)])
        with open(out / "results.json") as f:
            results.append(json.load(f))
        assert (out / "results.md").read_text() == module.render_report(results[-1])
        assert (out / f"{name}.png").exists(), "no headline figure written"
    assert "arms" in results[0] and results[0]["arms"]
    for r in results:
        r["config"].pop("out")
        r["config"].pop("workers")
    assert drop_timing(results[0]) == drop_timing(results[1])


@pytest.mark.parametrize("name", SCRIPTS)
def test_committed_record_is_rendered_from_its_json(name):
    """results/<script>/results.md is exactly render_report(results.json): no number typed by hand."""
    module = importlib.import_module(name)
    folder = os.path.join(ROOT, "results", name)
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    with open(os.path.join(folder, "results.md"), encoding="utf-8") as f:
        assert f.read() == module.render_report(results)
    assert os.path.exists(os.path.join(folder, f"{name}.png"))
    assert not results["config"]["smoke"], "the record is the default run, not a smoke run"


BAD_INPUTS = [["--steps", "-1"], ["--device", "tpu9"], ["--data", "/no/such/file"], ["--no-such-flag"]]


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("argv", BAD_INPUTS, ids=lambda a: a[0])
def test_bad_input_exits_2_with_one_line(name, argv, capsys, tmp_path):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and argv[0].lstrip("-").split("-")[0] in err


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("text,says", [('\n{"no_such_column": 1}\n', "line 2"),
                                       ("{not json\n", "line 1"), ("\n\n", "no rows")],
                         ids=["no-column", "not-json", "empty"])
def test_malformed_data_file_names_file_and_line(name, text, says, tmp_path, capsys):
    module = importlib.import_module(name)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--data", str(bad), "--smoke", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and says in err and len(err.strip().splitlines()) == 1


BANNER = ("# --- boilerplate: CLI, seeds, device, workers, logs, files "
          "(the same helpers in every script) ---")
CANONICAL = os.path.join(ROOT, "tests", "boilerplate.py")
HISTORY = re.compile(r"\bv[123]\b|\bversion [0-9]|this version|\bsessions?\b|the issue|issue's"
                     r"|issue [0-9]|#[0-9]{2}\b", re.I)


def top_level_sources(src):
    """{name: source text} of the top-level functions and classes in src."""
    tree = ast.parse(src)
    return {node.name: ast.get_source_segment(src, node) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", SCRIPTS)
def test_boilerplate_keeps_only_used_canonical_helpers(name):
    """Below the banner: only helpers of tests/boilerplate.py, each its exact text, each one called by
    the script, at most 100 lines of code (blank lines aside), and the `__main__` guard last."""
    src = source(name)
    assert src.count(BANNER) == 1, f"{name}.py: the boilerplate banner must be exactly {BANNER!r}"
    section = src[src.index(BANNER):]
    with open(CANONICAL, encoding="utf-8") as f:
        canonical = top_level_sources(f.read())
    helpers = top_level_sources(section)
    assert set(helpers) <= set(canonical) | {"main"}, set(helpers) - set(canonical)
    for helper, text in helpers.items():
        if helper != "main":
            assert text == canonical[helper], f"{name}.py: {helper} differs from tests/boilerplate.py"
        rest = src.replace(text, "")
        assert re.search(rf"\b{helper}\b", rest), f"{name}.py: {helper} is kept but never used"
    helper_lines = [line for text in helpers.values() for line in text.splitlines() if line.strip()]
    assert len(helper_lines) <= 100, f"{name}.py: {len(helper_lines)} lines of boilerplate code"
    assert section.splitlines()[-2:] == ['if __name__ == "__main__":', "    main()"]


def nesting_depth(node, depth=0):
    """How deep compound statements (if, for, while, with, try) nest inside a function."""
    compound = (ast.If, ast.For, ast.While, ast.With, ast.Try)
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        step = 1 if isinstance(child, compound) else 0
        deepest = max(deepest, nesting_depth(child, depth + step))
    return deepest


@pytest.mark.parametrize("name", SCRIPTS)
def test_house_layout(name):
    """Docstring (<= 60 lines, no history), imports, Config, the paper's method within the first 200
    lines, the study, the boilerplate last; lines <= 100 characters; one statement per line; functions
    <= 60 lines, nesting <= 4."""
    src = source(name)
    lines = src.splitlines()
    long_lines = [i for i, line in enumerate(lines, 1) if len(line) > 100 and "http" not in line]
    assert not long_lines, f"{name}.py: lines over 100 characters: {long_lines[:10]}"
    banners = [(i, line) for i, line in enumerate(lines, 1) if line.startswith("# ---")]
    method = [i for i, line in banners if "the paper's method" in line]
    study = [i for i, line in banners if line.startswith("# --- the study")]
    assert method and method[0] <= 200, f"{name}.py: the method starts at line {method[:1]}"
    assert study and method[0] < study[0] < banners[-1][0], f"{name}.py: method, study, boilerplate"
    assert banners[-1][1] == BANNER, f"{name}.py: the boilerplate banner must be the last one"
    order = [src.index(marker) for marker in ('"""', "\nimport ", "class Config", "# --- the paper")]
    assert order == sorted(order), f"{name}.py: docstring, imports, Config, the paper's method"
    tree = ast.parse(src)
    assert tree.body[0].end_lineno <= 60, f"{name}.py: docstring of {tree.body[0].end_lineno} lines"
    history = [(tok.start[0], HISTORY.search(tok.string).group(0))
               for tok in tokenize.generate_tokens(io.StringIO(src).readline)
               if tok.type in (tokenize.COMMENT, tokenize.STRING) and HISTORY.search(tok.string)]
    assert not history, f"{name}.py: history in the teaching text: {history[:5]}"
    packed = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            packed.append((node.lineno, "lambda bound to a name"))
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple) and any(
                isinstance(t, ast.Tuple) for t in node.targets):
            packed.append((node.lineno, "a, b = x, y"))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Tuple):
            packed.append((node.lineno, "tuple used as a statement"))
        body = getattr(node, "body", None)
        if isinstance(node, ast.stmt) and isinstance(body, list) and body:
            if body[0].lineno == node.lineno:
                packed.append((node.lineno, "body on the header's line"))
        if isinstance(node, ast.FunctionDef):
            if node.end_lineno - node.lineno + 1 > 60:
                packed.append((node.lineno, f"{node.name}: over 60 lines"))
            if nesting_depth(node) > 4:
                packed.append((node.lineno, f"{node.name}: nested deeper than 4"))
    with open(os.path.join(ROOT, f"{name}.py"), "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type == tokenize.OP and tok.string == ";":
                packed.append((tok.start[0], "';'"))
    assert not packed, f"{name}.py: {packed[:10]}"


def test_top_level_holds_only_the_product():
    """README.md, requirements.txt, Makefile, tests/, results/ and the scripts (plus dot-files)."""
    proc = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    top = {path.split("/")[0] for path in proc.stdout.split()}
    allowed = {"README.md", "requirements.txt", "Makefile", "tests", "results"}
    allowed |= {f"{s}.py" for s in ALL_SCRIPTS}
    assert {t for t in top if not t.startswith(".")} <= allowed


@pytest.mark.parametrize("name", GRPO_SCRIPTS)
def test_grpo_is_the_same_function_everywhere(name):
    module, first = importlib.import_module(name), importlib.import_module(GRPO_SCRIPTS[0])
    for fn in ("group_normalize", "grpo_loss"):
        assert inspect.getsource(getattr(module, fn)) == inspect.getsource(getattr(first, fn))
    # and they agree on the same input, gradient included
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (torch.randn(6, 5, generator=g) * 0.1 - 1 for _ in range(3))
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    adv = module.group_normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])).reshape(6)
    outs = []
    for m in (module, first):
        x = logp.clone().requires_grad_(True)
        loss, _ = m.grpo_loss(x, old, ref, mask, adv, clip_eps=0.2, kl_coef=0.04)
        loss.backward()
        outs.append((loss.detach(), x.grad))
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("name", GRPO_SCRIPTS)
def test_grpo_kl_is_verls_clamped_low_var_kl(name):
    module = importlib.import_module(name)
    # one token, Â = 0, so the loss is kl_coef * k3; u = ref - logp
    # u = 1:  e^1 - 1 - 1 = 0.718282 (inside both clamps)
    # u = 30: clamped to 20, e^20 - 20 - 1 = 4.85e8, then the estimate clamped to 10
    # unclamped u = 3: e^3 - 3 - 1 = 16.0855 (the labelled kl_clamp=False variant keeps it)
    zero = torch.zeros(1, 1)
    one = torch.ones(1, 1)
    adv = torch.zeros(1)
    for u, clamp, expected in [(1.0, True, 0.718282), (30.0, True, 10.0), (3.0, False, 16.085537)]:
        loss, stats = module.grpo_loss(zero, zero, zero + u, one, adv, kl_coef=1.0, kl_clamp=clamp)
        torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # a (N, 1) advantage must not broadcast silently
    with pytest.raises(ValueError):
        module.grpo_loss(zero, zero, zero, one, torch.zeros(1, 1))


@pytest.mark.parametrize("name", GRPO_SCRIPTS)
def test_group_normalize_groups_of_one_and_equal_groups(name):
    module = importlib.import_module(name)
    # G = 1: mean 0, std 1 as verl -> r / (1 + 1e-6)
    out = module.group_normalize(torch.tensor([[2.0], [0.0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0 / (1 + 1e-6)], [0.0]]))
    # equal rewards -> 0, no NaN; [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735
    out = module.group_normalize(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(out[0], torch.zeros(3))
    out = module.group_normalize(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    expected = 0.5 / (0.5773503 + 1e-6)
    torch.testing.assert_close(out, torch.tensor([[expected, -expected, -expected, expected]]))


@pytest.mark.parametrize("name", SCRIPTS)
def test_kv_cache_is_one_class(name):
    """Every script that samples with a KV cache uses the same KVCache, appending along time."""
    module = importlib.import_module(name)
    if not hasattr(module, "KVCache"):
        pytest.skip(f"{name}.py samples without a KV cache")
    with_cache = [s for s in SCRIPTS if hasattr(importlib.import_module(s), "KVCache")]
    first = importlib.import_module(with_cache[0])
    assert inspect.getsource(module.KVCache) == inspect.getsource(first.KVCache)
    cache = module.KVCache()
    k, v = cache.append(torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4))
    k, v = cache.append(torch.ones(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))  # (B, nh, 3 + 1, hs)
    assert k.shape == (1, 2, 4, 4) and k[0, 0, :, 0].tolist() == [0, 0, 0, 1]
    assert torch.equal(cache.v, v) and v[0, 0, :, 0].tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("name", SCRIPTS)
def test_learning_rate_schedule_is_one_function(name):
    """Every script that schedules its learning rate uses the same get_lr (nanoGPT's schedule)."""
    module = importlib.import_module(name)
    with_schedule = [s for s in SCRIPTS if hasattr(importlib.import_module(s), "get_lr")]
    if not hasattr(module, "get_lr"):
        pytest.skip(f"{name}.py has no learning-rate schedule")
    first = importlib.import_module(with_schedule[0])
    assert inspect.getsource(module.get_lr) == inspect.getsource(first.get_lr)
    # warm-up 10 of 100 steps at lr 1: step 0 -> 0.1, step 10 -> 1, step 55 halfway -> 0.55, end 0.1
    for step, expected in [(0, 0.1), (10, 1.0), (55, 0.55), (100, 0.1)]:
        assert module.get_lr(step, 100, 1.0, 10) == pytest.approx(expected)


@pytest.mark.parametrize("name", ENCODING_SCRIPTS)
def test_word_encoding_is_the_same_function_everywhere(name):
    module, first = importlib.import_module(name), importlib.import_module(ENCODING_SCRIPTS[0])
    assert inspect.getsource(module.word_encoding) == inspect.getsource(first.word_encoding)
    # every vocabulary word and tag is one token, and unknown text still round-trips byte by byte
    enc = module.word_encoding(["cat", "cats"], ["<think>"])
    assert len(enc.encode("cats cat", allowed_special="all")) == 2
    assert enc.encode("<think>", allowed_special="all") == [enc.n_vocab - 1]
    assert enc.decode(enc.encode("dog!", allowed_special="all")) == "dog!"
