"""MSI-Agent: Multi-Scale Insight for embodied planning — arXiv 2409.16686 (https://arxiv.org/abs/2409.16686)

An agent turns past trajectories into insights (rules) for its planner's context. MSI keeps them at three scales —
general, environment (a room type), subtask (a kind of task) — in an insight database and selects by scale, so the
limited context holds the rules that apply, not a flat list (ExpeL) with other rooms' rules. Here: a text household
with action preconditions hidden at the three scales; exploration; the experience selector (success / pair mode);
LLM-free insight generation with the paper's operations and scores; a SQLite insight database; hashmap and vector
selection; a small transformer planner trained to follow the rule lines in its context (its demonstrations carry
random rules: it knows a rule only by reading it). Its words are tokenized by an offline tiktoken encoding in which
every vocabulary word is one token; a compact table (ROW) maps the ~60 token ids in use to its embedding rows.

Key equations (symbols as in the code):
    pair mode     f*(s) = argmax_f cos(e(q_s), e(q_f)),   e(q) = hashed bag of words / ||.||
    contrast      C(s, f) = {(v, p): p ran in s right before its v-action and had not run in f before f failed at v}
    scale         general if |rooms| >= 2 and |kinds| >= 2;  environment(room) if |rooms| = 1;  else subtask(kind)
    scores        ADD: s = 2;  AGREE: s += 1;  EDIT: s kept;  REMOVE: s -= 1, dropped at 0;  MOVE: s = 2
    selection     ctx = [general ; environment(room) ; subtask part][:budget], each part by score; the subtask part by
                  subtask-name lookup (hashmap) or ranked by cos(e(query), e(rule)) (vector)
    planner       L = CE(next core verb) + CE(next core argument) + BCE(s_tj, 1[rule line j applies to step t]),
                  s_tj = (W_q h_t) . (W_k h_j) / sqrt(d)
    metrics       SR = mean 1[met = total];  GC = sum met / sum total  (goal conditions = core actions achieved)

Run:
    python msi_agent.py                  # the whole comparison at the defaults (<= 240 s CPU at 1 thread)
    python msi_agent.py --steps 200      # shorter planner training
    python msi_agent.py --smoke          # the same code path at a tiny size, in seconds (the tests run this)

Result of the default run (2-core CPU, 1 thread: 110 s CPU, 35 s of it the planner, 119 s wall, quiet machine;
mean of 3 exploration seeds, 1000 test tasks each):
    arm               SR in domain  GC    | held-out room SR  (tasks whose rules are shared / need a new rule)
    none              0.000         0.000 | 0.000  (0.000 / 0.000)
    flat (ExpeL-like) 0.279         0.304 | 0.184  (0.401 / 0.000)
    general_only      0.042         0.149 | 0.000  (0.000 / 0.000)
    msi_hashmap       0.820         0.935 | 0.184  (0.401 / 0.000)   seeds 0.861 / 0.753 / 0.847
    msi_vector        0.822         0.936 | 0.184  (0.401 / 0.000)
    msi_success_mode  0.388         0.750 | 0.184  (0.401 / 0.000)
    flat_msi_rules    0.191         0.110 | 0.184  (0.401 / 0.000)   (MSI's own rules, unscoped)
    msi_hashmap with the room hidden from the planner: SR 0.820 (0.820 shown)
    budget 3 / 5 / 8 / 12 / 30 lines: msi_hashmap 0.042 0.422 0.820 0.820 0.820, flat 0.191 0.234 0.279 0.279 0.279
    domain shift (kitchen SR; kitchen -> + living room -> + bedroom): MSI 0.670 -> 0.668, flat 0.670 -> 0.193
    hidden rules recovered (of 12): pair mode 0.94 (0.89 at the right scale, 2.3 spurious);
    success mode 1.00 (29 spurious, 8 of them redundant chained rules: a step another rule already requires)

Deviations from the paper (and its official code):
- No LLM. A rule contrasts the failure's first failing action with the steps the paired success ran right before it.
  REMOVE when a success seen so far (the whole pool: without an LLM's prior a batch cannot refute chance) ran the
  trigger inside the rule's scope without the precondition; EDIT turns a concrete argument into "X" once a second
  argument agrees; MOVE when the rooms/kinds supporting a rule change its scale. One operation per rule per batch.
- One room and one kind of evidence puts a rule at the environment scale (the paper's LLM chooses).
- Hashmap selection reads the subtask names off the task (the paper asks an LLM). Embeddings: 64-dim hashed words.
- The planner is a 2-layer transformer with a pointer head that copies the rule lines applying to each core step,
  not an LLM; the context budget counts rule lines (one position each).
- The flat baseline is an ExpeL-like store: the same generator with one scale, so a rule is refuted anywhere.
- TEACh/ALFWorld are replaced by the toy; out of domain is a held-out room type (office) with one environment rule
  shared with the living room and one new one. The planner is trained once; seeds vary exploration and test tasks.
"""

import argparse
import collections
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sqlite3
import sys
import time
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken
import datasets

# --- config ---


@dataclasses.dataclass
class Config:
    """Collect experience in a toy household, build a multi-scale insight DB, compare insight selection for a planner."""

    steps: int = 400  # planner behaviour-cloning steps
    seed: int = 0  # random seed
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON lines with columns room, subtasks (list of "kind object [receptacle]"): in-domain test tasks
    out: str = "runs/msi_agent"  # folder for results.json and insights.sqlite
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 100  # steps between log lines
    batch_size: int = 64  # demonstrations per planner step
    lr: float = 3e-3  # AdamW learning rate (warmup, then cosine down to a tenth)
    d_model: int = 64  # planner width
    n_layer: int = 2  # planner transformer blocks
    n_head: int = 4  # attention heads
    max_lines: int = 30  # most rule lines the planner is trained to read
    seeds: int = 3  # exploration / test-task seeds (the planner is trained once)
    explore_episodes: int = 2000  # exploration episodes in the four training rooms
    explore_p: float = 0.6  # chance the explorer inserts each admissible extra action before a core action
    pair_batch: int = 16  # experiences per insight-generation batch
    eval_episodes: int = 1000  # test tasks per condition (in domain and out of domain each)
    budget: int = 8  # context budget in rule lines (chosen from the sweep: the smallest at which hashmap plateaus)
    sweep: str = "3,5,8,12,30"  # budgets for the context-budget sweep
    shift_episodes: int = 700  # exploration episodes per room in the sequential domain-shift test

    def __post_init__(self):
        for name in ("log_every", "batch_size", "d_model", "n_layer", "n_head", "max_lines", "seeds",
                     "explore_episodes", "pair_batch", "eval_episodes", "budget", "shift_episodes", "lr"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} {getattr(self, name)}: must be positive")
        require(self.d_model % self.n_head == 0, f"--d-model {self.d_model}: must be a multiple of --n-head")
        require(0 < self.explore_p < 1, f"--explore-p {self.explore_p}: must be in (0, 1)")
        require(re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", self.sweep) is not None,
                f"--sweep {self.sweep}: a comma-separated list of positive numbers")
        require(self.budget <= self.max_lines and max(map(int, self.sweep.split(","))) <= self.max_lines,
                f"--budget/--sweep: at most --max-lines {self.max_lines} lines")


# --- boilerplate: CLI, seeding, device, logging, files (the same text in every script) ---


class BadInput(Exception):
    """A user error (bad flag, value or file): main() prints this one line and exits with status 2."""


class NonFinite(Exception):
    """A loss term turned NaN or inf: main() prints the step and the term and exits with status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line
        raise BadInput(message)


def field_help(cls):
    """The `# comment` after each Config field is its --help text (% escaped for argparse)."""
    found = re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M)
    return {name: text.replace("%", "%%") for name, text in found}


def parse_config(cls, argv=None):
    """argparse built from the dataclass fields: `foo_bar: int = 3` becomes `--foo-bar 3`."""
    helps = field_help(cls)
    parser = _Parser(description=(cls.__doc__ or "").strip(),
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helps.get(f.name))
        else:
            parser.add_argument(flag, type=f.type, default=f.default, metavar=f.type.__name__.upper(),
                                help=helps.get(f.name))
    cfg = cls(**vars(parser.parse_args(argv)))
    require(cfg.device in ("auto", "cpu", "cuda", "mps"), f"--device {cfg.device}: choose auto, cpu, cuda or mps")
    require(cfg.steps > 0, f"--steps {cfg.steps}: must be a positive number of steps")
    require(not cfg.data or os.path.isfile(cfg.data), f"--data {cfg.data}: no such file")
    return cfg


def require(condition, message):
    if not condition:
        raise BadInput(message)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name):
    """auto: cuda, then mps, then cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    require(name != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device on this machine")
    require(name != "mps" or torch.backends.mps.is_available(), "--device mps: no MPS device on this machine")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on a CUDA device that supports it; fp32 everywhere else."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def log(message):
    print(message, flush=True)


def log_progress(step, total, start_time, **metrics):
    """One line: step, the metrics given (loss terms, reward, throughput), elapsed time and ETA."""
    elapsed = time.time() - start_time
    eta = elapsed / step * (total - step)
    values = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    log(f"step {step:>5}/{total} | {values} | {elapsed:.0f}s elapsed, eta {eta:.0f}s")


def check_finite(step, **terms):
    """Stop the run, naming the step and the term, as soon as a loss term is NaN or inf."""
    for name, value in terms.items():
        if not math.isfinite(float(value)):
            raise NonFinite(f"step {step}: {name} is {float(value)}; stopping")


def load_user_data(path, columns):
    """A user's JSON-lines file as a datasets.Dataset; a bad file is one BadInput line (file, line, column)."""
    n_rows = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"--data {path}, line {line_no}: not valid JSON ({e.msg})")
            for column in columns:
                require(isinstance(row, dict) and column in row, f"--data {path}, line {line_no}: missing column '{column}'")
            n_rows += 1
    require(n_rows > 0, f"--data {path}: no rows")
    datasets.disable_progress_bars()
    return datasets.load_dataset("json", data_files=path, split="train")


def save_json(path, obj):
    """Write atomically: a temp file in the same folder, then os.replace."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def run_cli(cls, run, argv=None):
    """Parse argv into a Config and call run(cfg); a user error exits 2, a non-finite loss exits 1."""
    try:
        return run(parse_config(cls, argv))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFinite as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# --- end of boilerplate ---

# --- data: a text household whose preconditions are hidden at three scales ---

ROOMS = ("kitchen", "livingroom", "bedroom", "bathroom")  # training room types
OOD_ROOM = "office"  # held out: its take-rule is the living room's, its put-rule is new
KIND_OBJECTS = {"heat": ("apple", "potato", "bread", "mug"), "cool": ("apple", "tomato", "bread", "bottle"),
                "clean": ("mug", "plate", "cloth"), "slice": ("apple", "bread", "tomato", "potato"),
                "place": ("book", "mug", "plate", "cloth"), "light": ("lamp", "lantern"),
                "fill": ("mug", "cup", "kettle", "bottle")}
KINDS, RECEPTACLES, PLACE_RECEPTACLES = tuple(KIND_OBJECTS), ("microwave", "fridge", "box", "safe", "crate"), ("box", "safe", "crate")
CORE_VERBS = ("take", "put", "heat", "cool", "clean", "slice", "light", "fill")
PRE_VERBS = ("goto", "open", "toggle", "turnon", "grab", "wet", "plug", "unlock")
OBJECTS = tuple(sorted({o for objs in KIND_OBJECTS.values() for o in objs}))
PRE_ARGS = ("X",) + OBJECTS + RECEPTACLES + ("cabinet", "drawer", "tap", "switch", "knife", "sponge")
# hidden rules: (trigger verb, precondition verb, precondition argument); "X" is the trigger's own argument
GENERAL_RULES = (("take", "goto", "X"), ("put", "open", "X"), ("put", "goto", "X"))
ENV_RULES = {"kitchen": (("take", "open", "cabinet"),), "livingroom": (("take", "toggle", "switch"),),
             "bedroom": (("take", "open", "drawer"),), "bathroom": (("clean", "turnon", "tap"), ("fill", "turnon", "tap")),
             "office": (("take", "toggle", "switch"), ("put", "unlock", "X"))}
SUBTASK_RULES = {"heat": (("heat", "toggle", "microwave"),), "slice": (("slice", "grab", "knife"),),
                 "clean": (("clean", "wet", "sponge"),), "light": (("light", "plug", "X"),)}
ROOM_ACTIONS = {"kitchen": {("open", "cabinet")}, "livingroom": {("toggle", "switch")}, "bedroom": {("open", "drawer")},
                "bathroom": {("turnon", "tap")}, "office": {("toggle", "switch")} | {("unlock", r) for r in RECEPTACLES}}
TRUE_SCOPE = {**{r: ("general", "", "") for r in GENERAL_RULES},
              **{r: ("environment", room, "") for room in ROOMS for r in ENV_RULES[room]},
              **{r: ("subtask", "", k) for k, rs in SUBTASK_RULES.items() for r in rs}}  # the 12 training rules
Task = collections.namedtuple("Task", "room subtasks")  # subtasks: ((kind, object, receptacle or "none"), ...)


def sample_task(rng, room):
    subs, used = [], set()
    for _ in range(rng.choice((1, 2))):
        kind = rng.choice(KINDS)
        obj = rng.choice([o for o in KIND_OBJECTS[kind] if o not in used] or KIND_OBJECTS[kind])
        used.add(obj)
        subs.append((kind, obj, rng.choice(PLACE_RECEPTACLES) if kind == "place" else "none"))
    return Task(room, tuple(subs))


def query_text(task):
    return f"in the {task.room}: " + ", then ".join(f"{k} the {o}" + (f" in the {r}" if r != "none" else "")
                                                   for k, o, r in task.subtasks)


def core_actions(sub):
    kind, obj, rec = sub
    return {"heat": [("take", obj), ("put", "microwave"), ("heat", obj)], "clean": [("take", obj), ("clean", obj)],
            "cool": [("take", obj), ("put", "fridge"), ("cool", obj)], "slice": [("slice", obj)],
            "place": [("take", obj), ("put", rec)], "light": [("light", obj)], "fill": [("take", obj), ("fill", obj)]}[kind]


def hidden_rules(room, kind):
    return GENERAL_RULES + ENV_RULES[room] + SUBTASK_RULES.get(kind, ())


def needed(rule, arg):
    """The action a rule asks for before a trigger whose argument is `arg`."""
    return (rule[1], arg if rule[2] == "X" else rule[2])


def admissible(task):
    """Precondition-type actions valid in this episode (any other action that is not a step of the task aborts it)."""
    objs = {o for _, o, _ in task.subtasks}
    acts = {("goto", x) for x in objs | set(RECEPTACLES)} | {("open", r) for r in RECEPTACLES}
    acts |= {("toggle", "microwave"), ("grab", "knife"), ("wet", "sponge")} | {("plug", o) for o in objs & {"lamp", "lantern"}}
    return acts | ROOM_ACTIONS[task.room]


def needs_new_rule(task):
    """Some rule this task triggers holds in no training scope (the out-of-domain 'new' group)."""
    return any(r not in TRUE_SCOPE for s in task.subtasks for v, _ in core_actions(s)
               for r in hidden_rules(task.room, s[0]) if r[0] == v)


def execute(task, plan):
    """Run a plan. A core action whose hidden precondition has not run fails with an error and no effect; an action
    that is neither admissible nor a step of the task aborts. steps: (verb, arg, subtask index or -1, ok)."""
    adm, cores = admissible(task), [core_actions(s) for s in task.subtasks]
    ptr, done, steps, aborted = [0] * len(cores), set(), [], False
    for v, a in plan:
        if v in PRE_VERBS and (v, a) in adm:
            done.add((v, a))
            steps.append((v, a, -1, True))
            continue
        si = next((i for i, c in enumerate(cores) if ptr[i] < len(c) and c[ptr[i]] == (v, a)), None)
        if si is None:  # out of order (an earlier step of its subtask failed): an error; not in the task: abort
            si = next((i for i, c in enumerate(cores) if (v, a) in c), None)
            if si is None:
                aborted = True
                break
            steps.append((v, a, si, False))
            continue
        ok = all(needed(r, a) in done for r in hidden_rules(task.room, task.subtasks[si][0]) if r[0] == v)
        ptr[si] += ok
        done |= {(v, a)} if ok else set()
        steps.append((v, a, si, ok))
    return {"room": task.room, "kinds": [s[0] for s in task.subtasks], "query": query_text(task), "steps": steps,
            "met": sum(ptr), "total": sum(map(len, cores)), "success": sum(ptr) == sum(map(len, cores)), "aborted": aborted}


def explore(rng, task, p):
    """Exploration policy: the task's core actions, each preceded by every admissible action with probability p."""
    adm, plan = sorted(admissible(task)), []
    for act in (c for s in task.subtasks for c in core_actions(s)):
        extra = [x for x in adm if rng.random() < p]
        rng.shuffle(extra)
        plan += extra + [act]
    return execute(task, plan)


def parse_user_tasks(ds, path):
    tasks = []
    for i, row in enumerate(ds, 1):
        words = [str(s).split() for s in row["subtasks"]]
        ok = row["room"] in ROOMS + (OOD_ROOM,) and 1 <= len(words) <= 2 and all(
            len(w) in (2, 3) and w[0] in KIND_OBJECTS and w[1] in KIND_OBJECTS[w[0]] and (len(w) == 3) == (w[0] == "place")
            and (len(w) == 2 or w[2] in PLACE_RECEPTACLES) for w in words)
        require(ok, f"--data {path}, row {i}: room {row['room']!r}, subtasks {row['subtasks']!r}: unknown room or subtask")
        tasks.append(Task(row["room"], tuple((w[0], w[1], w[2] if len(w) == 3 else "none") for w in words)))
    return tasks


# --- the paper's method: experience selector, insight generator, insight database, insight selector ---


def embed_text(text, dim=64):
    """e(t) = v / ||v||,  v[crc32(w) mod dim] += 1 for each word w of t  (a hashed bag of words)."""
    v = np.zeros(dim, dtype=np.float32)
    for w in re.findall(r"[a-z]+", text.lower()):
        v[zlib.crc32(w.encode()) % dim] += 1
    return v / max(float(np.linalg.norm(v)), 1e-12)


def rule_text(rule, kind=""):
    text = f"before {rule[0]} X, {rule[1]} {rule[2]}"
    return f"{text} (TASK: {kind})" if kind else text  # subtask rules are named "<rule> (TASK: <name>)"


def parse_rule(text):
    m = re.match(r"^before (\w+) X, (\w+) (\w+)(?: \(TASK: \w+\))?$", text)
    return m.groups() if m else None


class InsightDB:
    """Insights by scale in SQLite, one row per rule. Scores: ADD and MOVE set 2, AGREE adds 1, EDIT keeps it,
    REMOVE subtracts 1 and a rule at 0 is dropped. Every update is one transaction; every query is parameterised."""

    COLS = "id, scale, environment, subtask, rule, score, support, evidence, embedding"

    def __init__(self, path=":memory:"):
        self.con, self.pool = sqlite3.connect(path), collections.defaultdict(list)  # pool: index of the successes seen
        with self.con:
            self.con.executescript("""
            CREATE TABLE IF NOT EXISTS insights (id INTEGER PRIMARY KEY, scale TEXT NOT NULL, environment TEXT NOT NULL,
                subtask TEXT NOT NULL, rule TEXT NOT NULL, score INTEGER NOT NULL, support INTEGER NOT NULL,
                evidence TEXT NOT NULL, embedding BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS insights_scope ON insights (scale, environment, subtask);
            CREATE TABLE IF NOT EXISTS experiences (id INTEGER PRIMARY KEY, room TEXT NOT NULL, query TEXT NOT NULL,
                success INTEGER NOT NULL, trajectory TEXT NOT NULL);""")

    def _update(self, *statements):
        """(sql, params) pairs as one transaction: committed together, or rolled back on error."""
        with self.con:
            return [self.con.execute(sql, params) for sql, params in statements][-1]

    def close(self):
        self.con.close()

    def select(self, scale=None, environment=None, subtask=None, rid=None):
        """Rows matching the given keys (None: any), best score first."""
        keys = [(c, v) for c, v in (("scale", scale), ("environment", environment), ("subtask", subtask), ("id", rid))
                if v is not None]
        where = " WHERE " + " AND ".join(f"{c} = ?" for c, _ in keys) if keys else ""
        rows = self.con.execute(f"SELECT {self.COLS} FROM insights{where} ORDER BY score DESC, id",
                                [v for _, v in keys])
        return [dict(zip(self.COLS.split(", "), r[:7]), evidence=json.loads(r[7]),
                     embedding=np.frombuffer(r[8], np.float32)) for r in rows]

    def get(self, rid):
        return next(iter(self.select(rid=rid)), None)

    def add(self, scale, environment, subtask, rule, support=1, evidence=None):
        sql = "INSERT INTO insights (scale, environment, subtask, rule, score, support, evidence, embedding) VALUES " \
              "(?, ?, ?, ?, 2, ?, ?, ?)"
        args = (scale, environment, subtask, rule, support, json.dumps(evidence or {}), embed_text(rule).tobytes())
        return self._update((sql, args)).lastrowid

    def agree(self, rid, evidence=None):
        self._update(("UPDATE insights SET score = score + 1, support = support + 1, evidence = COALESCE(?, evidence) "
                      "WHERE id = ?", (None if evidence is None else json.dumps(evidence), rid)))

    def edit(self, rid, rule):
        self._update(("UPDATE insights SET rule = ?, embedding = ? WHERE id = ?",
                      (rule, embed_text(rule).tobytes(), rid)))

    def remove(self, rid):
        self._update(("UPDATE insights SET score = score - 1 WHERE id = ?", (rid,)),
                     ("DELETE FROM insights WHERE id = ? AND score <= 0", (rid,)))

    def move(self, rid, scale, environment, subtask, rule, evidence=None):
        sql = "UPDATE insights SET scale = ?, environment = ?, subtask = ?, rule = ?, embedding = ?, score = 2, " \
              "evidence = COALESCE(?, evidence) WHERE id = ?"
        evidence = None if evidence is None else json.dumps(evidence)
        self._update((sql, (scale, environment, subtask, rule, embed_text(rule).tobytes(), evidence, rid)))

    def add_experiences(self, episodes):
        with self.con:
            self.con.executemany("INSERT INTO experiences (room, query, success, trajectory) VALUES (?, ?, ?, ?)",
                                 [(e["room"], e["query"], int(e["success"]), json.dumps(e["steps"])) for e in episodes])


def select_experiences(episodes, mode="pair"):
    """success: [(s, None)] per success. pair: each success s with f*(s) = argmax_f cos(e(q_s), e(q_f))."""
    wins, fails = [e for e in episodes if e["success"]], [e for e in episodes if not e["success"] and not e["aborted"]]
    if mode == "success" or not fails or not wins:
        return [(s, None) for s in wins]
    sim = np.stack([embed_text(s["query"]) for s in wins]) @ np.stack([embed_text(f["query"]) for f in fails]).T  # (S, F)
    return [(s, fails[j]) for s, j in zip(wins, sim.argmax(1))]  # ties: the first failure


def contrast_pair(success, failure=None):
    """Candidate rules: the steps a success ran right before each of its core actions (since the previous one).
    Pair mode: only before the failure's first failing core action v, and only steps the failure had not run before
    failing. Success mode (failure None): every core action. Returns [(rule with the success's argument,
    argument == the trigger's, subtask kind)]."""
    steps_f = [] if failure is None else failure["steps"]
    i = next((i for i, st in enumerate(steps_f) if st[2] >= 0 and not st[3]), None)
    if failure is not None and i is None:
        return []
    (v_f, a_f), done_f = steps_f[i][:2] if steps_f else (None, None), {st[:2] for st in steps_f[:i] if st[3]}
    out, seg = [], []
    for v, a, si, ok in success["steps"]:
        if si >= 0 and v_f in (None, v):
            out += [((v, qv, qa), qa == a, success["kinds"][si]) for qv, qa in dict.fromkeys(seg)
                    if (qv, a_f if qa == a else qa) not in done_f]
            if v_f is not None:
                return out
        seg = seg + [(v, a)] if si < 0 else []
    return [] if v_f is not None else out


def scale_of(evidence):
    """general if seen in >= 2 rooms and >= 2 kinds; environment if in one room; else subtask."""
    rooms, kinds = evidence["rooms"], evidence["kinds"]
    if len(rooms) >= 2 and len(kinds) >= 2:
        return "general", "", ""
    return ("environment", rooms[0], "") if len(rooms) == 1 else ("subtask", "", kinds[0])


def refuted(rule, scope, index):
    """Some success inside the scope ran the trigger without the precondition having run before it.
    index: trigger verb -> [(room, kind, argument, actions done before it)] over the successes seen so far."""
    scale, env, kind = scope
    return any(needed(rule, a) not in done for room, k, a, done in index.get(rule[0], ())
               if (scale != "environment" or room == env) and (scale != "subtask" or k == kind))


def generate_insights(db, batches, scoped=True):
    """ADD / AGREE / EDIT / REMOVE / MOVE for each batch of (success, failure or None), one operation per rule per
    batch. scoped=False: the ExpeL-like flat store (one scale). Returns the operation counts."""
    ops, flat, index = collections.Counter(), ("general", "", ""), db.pool
    for batch in batches:
        cands, touched = collections.defaultdict(lambda: {"rooms": set(), "kinds": set()}), set()
        for s, f in batch:
            done = set()  # the pool index gains this success's core actions
            for v, a, si, ok in s["steps"]:
                if si >= 0:
                    index[v].append((s["room"], s["kinds"][si], a, frozenset(done)))
                done.add((v, a))
            for rule, same, kind in contrast_pair(s, f):
                cands[rule, same]["rooms"].add(s["room"])
                cands[rule, same]["kinds"].add(kind)
        for r in db.select():  # REMOVE: refuted by a success of the pool inside the rule's scope
            if refuted(parse_rule(r["rule"]), (r["scale"], r["environment"], r["subtask"]), index):
                db.remove(r["id"])
                touched.add(r["id"])
                ops["REMOVE"] += 1
        rows = {parse_rule(r["rule"]): r for r in db.select()}
        for (rule, same), ev in sorted(cands.items()):
            general = (rule[0], rule[1], "X")
            target = (rows.get(general) if same else None) or rows.get(rule)
            sibling = same and target is None and next((r for k, r in sorted(rows.items()) if k[:2] == rule[:2] and
                                                        k[2] not in ("X", rule[2]) and r["evidence"].get("same")), None)
            if sibling:  # EDIT: a concrete rule whose argument was its trigger's; a second argument agrees -> "X"
                if sibling["id"] not in touched:
                    db.edit(sibling["id"], rule_text(general, sibling["subtask"]))
                    rows[general] = rows.pop(parse_rule(sibling["rule"]))
                    touched.add(sibling["id"])
                    ops["EDIT"] += 1
            elif target is None:  # ADD at the scale its evidence implies, unless a success already refutes it there
                ev = {"rooms": sorted(ev["rooms"]), "kinds": sorted(ev["kinds"]), "same": same}
                scope = scale_of(ev) if scoped else flat
                cand = next((c for c in ((rule, general) if same else (rule,)) if not refuted(c, scope, index)), None)
                if cand:
                    rows[cand] = db.get(db.add(*scope, rule_text(cand, scope[2]), len(ev["rooms"]), ev))
                    touched.add(rows[cand]["id"])
                    ops["ADD"] += 1
            elif target["id"] not in touched:  # AGREE, or MOVE to the scale its evidence now implies
                old = target["evidence"]
                ev = {"rooms": sorted(set(old["rooms"]) | ev["rooms"]), "kinds": sorted(set(old["kinds"]) | ev["kinds"]),
                      "same": old["same"]}
                scope = scale_of(ev) if scoped else flat
                if scope != (target["scale"], target["environment"], target["subtask"]):
                    db.move(target["id"], *scope, rule_text(parse_rule(target["rule"]), scope[2]), ev)
                    ops["MOVE"] += 1
                else:
                    db.agree(target["id"], ev)
                    ops["AGREE"] += 1
                touched.add(target["id"])
                rows[parse_rule(target["rule"])] = db.get(target["id"])
    return dict(ops)


def select_insights(db, task, mode="hashmap", budget=8):
    """Rule texts for the planner's context, at most `budget` lines. hashmap / vector: general + environment(room) by
    score, then subtask rules looked up by the task's subtask names (hashmap) or ranked by cos(e(query), e(rule))
    (vector). general: general rules only. flat: every rule by score. none: nothing."""
    require(mode in ("none", "flat", "general", "hashmap", "vector"), f"unknown selection mode {mode}")
    if mode in ("none", "flat"):
        return [r["rule"] for r in db.select()][:budget] if mode == "flat" else []
    rules = db.select("general", "", "") + (db.select("environment", task.room, "") if mode != "general" else [])
    if mode == "hashmap":
        rules += sorted((r for k in dict.fromkeys(s[0] for s in task.subtasks) for r in db.select("subtask", "", k)),
                        key=lambda r: (-r["score"], r["id"]))
    elif mode == "vector":
        q = embed_text(query_text(task))  # (64,)
        rules += sorted(db.select("subtask"), key=lambda r: (-float(q @ r["embedding"]), r["id"]))
    return [r["rule"] for r in rules][:budget]


def success_rate_and_gc(episodes):
    """SR = mean over episodes of 1[met == total];  GC = sum(met) / sum(total)."""
    if not episodes:
        return 0.0, 0.0
    return (sum(e["met"] == e["total"] for e in episodes) / len(episodes),
            sum(e["met"] for e in episodes) / sum(e["total"] for e in episodes))


# --- model: the planner reads the task and the rule lines, writes the plan ---


def word_encoding(words, specials):
    """An offline tiktoken.Encoding over a closed vocabulary (the stock ones download their files).

    Ranks: the 256 single bytes, then every prefix of every word (with and without a leading space), so
    BPE merges each vocabulary word into one token; unknown text still encodes, byte by byte. `specials`
    (tags such as "<think>") become special tokens: encode with allowed_special="all".
    """
    ranks = {bytes([i]): i for i in range(256)}
    for word in sorted(set(words)):
        for w in (word.encode(), b" " + word.encode()):
            for end in range(2, len(w) + 1):
                ranks.setdefault(w[:end], len(ranks))
    special_tokens = {s: len(ranks) + i for i, s in enumerate(specials)}
    return tiktoken.Encoding(name="closed_words", pat_str=r" ?[^\s<>]+| ?<[^\s<>]*>?|\s+",
                             mergeable_ranks=ranks, special_tokens=special_tokens)


SPECIALS = ("<pad>", "<rules>", "<plan>", "<eos>")
VOCAB = SPECIALS + tuple(dict.fromkeys(ROOMS + (OOD_ROOM, "unk", "none") + KINDS + CORE_VERBS + PRE_VERBS + PRE_ARGS))
ENC = word_encoding(VOCAB[len(SPECIALS):], SPECIALS)  # each " word" and each tag is one tiktoken token
# tiktoken id -> planner embedding row: the ~60 ids in use get rows 0..59 (row r is the word VOCAB[r]), so the
# embedding and output tables stay vocabulary-sized instead of spanning all ~1,000 ranks of the encoding
ROW = {ENC.encode_single_token(w if w in SPECIALS else " " + w): r for r, w in enumerate(VOCAB)}
PAD, RULES_TOK, PLAN_TOK, EOS = range(4)


def tokenize(items):
    """Planner rows of word triples: one tiktoken call on " w1 w2<tag> w3 ..." (every word is one token), then ROW."""
    words = [w for item in items for w in item]
    ids = ENC.encode("".join(w if w in SPECIALS else " " + w for w in words), allowed_special="all")
    require(len(ids) == len(words), f"words outside the planner's vocabulary: {words}")
    return [[ROW[i] for i in ids[k:k + 3]] for k in range(0, len(ids), 3)]


def encode_prompt(task, rules, hide_room=False):
    """One position per item, three rows each: (room), (kind, object, receptacle) x 2, <rules>,
    (trigger, pre-verb, pre-argument) per rule line, <plan>."""
    subs = list(task.subtasks) + [("none", "none", "none")] * (2 - len(task.subtasks))
    items = [("unk" if hide_room else task.room, "<pad>", "<pad>")] + subs + [("<rules>", "<pad>", "<pad>")]
    return tokenize(items + list(rules) + [("<plan>", "<pad>", "<pad>")])


def assemble_plan(steps, rules):
    """The executed plan: for each written core step, the pointed rule lines' actions ('X': its argument), then it."""
    return [act for (v, a), chosen in steps for act in [needed(rules[j], a) for j in chosen] + [(v, a)]]


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head, self.ln1, self.ln2 = n_head, nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # decoding one step: it sees every cached position
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x)), (k, v)


class Planner(nn.Module):
    """Decoder-only transformer over item triples: heads write the next core action's verb and argument, and a pointer
    head picks the rule lines to carry out before the core step just written."""

    def __init__(self, d, n_layer, n_head, max_len):
        super().__init__()
        self.fields = nn.ModuleList(nn.Embedding(len(VOCAB), d) for _ in range(3))
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln, self.verb_head, self.arg_head = nn.LayerNorm(d), nn.Linear(d, len(VOCAB)), nn.Linear(d, len(VOCAB))
        self.ptr_q, self.ptr_k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, idx, pos, cache=None):
        x = sum(emb(idx[..., i]) for i, emb in enumerate(self.fields)) + self.pos(pos)  # (B, T, d)
        new_cache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if cache is None else cache[i])
            new_cache.append(kv)
        h = self.ln(x)  # (B, T, d)
        return self.verb_head(h), self.arg_head(h), h, new_cache

    def pointer(self, h_step, h_lines):
        """s_tj = (W_q h_t) . (W_k h_j) / sqrt(d): the logit that rule line j applies before step t.  (B, T, L)"""
        return self.ptr_q(h_step) @ self.ptr_k(h_lines).transpose(1, 2) / math.sqrt(h_step.shape[-1])


@torch.no_grad()
def generate(model, prompts, n_lines, device, max_steps):
    """Greedy decoding with a KV cache; all prompts hold n_lines rule lines (one length, no padding).
    Returns per prompt [((verb, arg), [indices of the rule lines pointed at]), ...] up to <eos>."""
    idx = torch.tensor(prompts, device=device)  # (B, P, 3)
    B, P, _ = idx.shape
    with autocast(device):
        vl, al, h, cache = model(idx, torch.arange(P, device=device)[None])
    h_lines = h[:, 4:4 + n_lines].float()  # (B, n, d): rule lines sit at positions 4 .. 4+n-1
    out, alive = [[] for _ in range(B)], torch.ones(B, dtype=torch.bool, device=device)
    for t in range(max_steps):
        verb, arg = vl[:, -1].argmax(-1), al[:, -1].argmax(-1)  # (B,) each
        alive &= verb != EOS
        if not bool(alive.any()):
            break
        pos = torch.full((1, 1), min(P + t, model.pos.num_embeddings - 1), device=device)
        with autocast(device):
            vl, al, h, cache = model(torch.stack([verb, arg, torch.zeros_like(verb)], 1)[:, None], pos, cache)
        chosen = (model.pointer(h.float(), h_lines)[:, 0] > 0).tolist()  # (B, n): lines to run before this step
        for i, v, a in zip(alive.nonzero()[:, 0].tolist(), verb[alive].tolist(), arg[alive].tolist()):
            out[i].append(((VOCAB[v], VOCAB[a]), [j for j, c in enumerate(chosen[i]) if c]))
    return out


# --- training and evaluation ---


def make_batch(rng, cfg):
    """Demonstrations with n random rule lines (about half trigger on one of the task's core verbs). Targets: the next
    core action (verb, argument) and, at each core step, which lines it triggers. One n per batch, so the lines sit at
    positions 4 .. 4+n-1 in every row."""
    n = min(cfg.max_lines, rng.randint(0, 12) if rng.random() < 0.7 else rng.randint(13, max(13, cfg.max_lines)))
    rows = []
    for _ in range(cfg.batch_size):
        task, rules = sample_task(rng, rng.choice(ROOMS + (OOD_ROOM,))), []
        core = [c for s in task.subtasks for c in core_actions(s)]
        while len(rules) < n:
            r = (rng.choice([v for v, _ in core] if rng.random() < 0.5 else CORE_VERBS), rng.choice(PRE_VERBS),
                 rng.choice(PRE_ARGS))
            rules += [r] if r not in rules else []
        plan = tokenize([(v, a, "<pad>") for v, a in core] + [("<eos>", "<pad>", "<pad>")])
        rows.append((encode_prompt(task, rules, rng.random() < 0.15) + plan, core, rules))
    P, T = 5 + n, max(len(s) for s, _, _ in rows)  # the plan starts at position P
    x = torch.zeros(len(rows), T - 1, 3, dtype=torch.long)
    y = torch.full((len(rows), T - 1, 2), -1, dtype=torch.long)
    ptr = torch.full((len(rows), T - 1, max(n, 1)), -1.0)
    for i, (s, core, rules) in enumerate(rows):
        s = torch.tensor(s)  # (len, 3)
        x[i, :len(s) - 1], y[i, P - 1:len(s) - 1] = s[:-1], s[P:, :2]  # next core action or <eos>
        for t, (v, _) in enumerate(core):  # position P + t holds core step t
            ptr[i, P + t, :n] = torch.tensor([float(r[0] == v) for r in rules])
    y[..., 1][y[..., 0] == EOS] = -1  # <eos> has no argument
    return x, y, ptr, n


def train_planner(cfg, device, max_len):
    rng = random.Random(cfg.seed + 1)
    model = Planner(cfg.d_model, cfg.n_layer, cfg.n_head, max_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    log(f"planner: {sum(p.numel() for p in model.parameters())} parameters")
    start, hits = time.time(), []
    for step in range(1, cfg.steps + 1):
        x, y, ptr, n = make_batch(rng, cfg)
        x, y, ptr = x.to(device), y.to(device), ptr.to(device)
        with autocast(device):
            vl, al, h, _ = model(x, torch.arange(x.shape[1], device=device)[None])  # (B, T, V), (B, T, V), (B, T, d)
            logits_ptr = model.pointer(h, h[:, 4:4 + max(n, 1)])  # (B, T, L)
        # L = CE(verb) + CE(argument) of the next core action + BCE(pointer), plan steps only (targets -1 elsewhere)
        loss_verb = F.cross_entropy(vl.float().flatten(0, 1), y[..., 0].flatten(), ignore_index=-1)
        loss_arg = F.cross_entropy(al.float().flatten(0, 1), y[..., 1].flatten(), ignore_index=-1)
        keep = ptr >= 0
        loss_ptr = F.binary_cross_entropy_with_logits(logits_ptr.float()[keep], ptr[keep]) if n else loss_verb * 0
        check_finite(step, loss_verb=loss_verb.item(), loss_arg=loss_arg.item(), loss_ptr=loss_ptr.item())
        opt.zero_grad(set_to_none=True)
        (loss_verb + loss_arg + loss_ptr).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # a demonstration is planned exactly when every verb, argument and pointer decision is right
        ok = (vl.argmax(-1) == y[..., 0]) | (y[..., 0] < 0), (al.argmax(-1) == y[..., 1]) | (y[..., 1] < 0)
        hits.append((ok[0] & ok[1] & (((logits_ptr > 0).float() == ptr) | ~keep).all(-1)).all(1).float().mean().item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_progress(step, cfg.steps, start, loss_verb=loss_verb.item(), loss_arg=loss_arg.item(),
                         loss_ptr=loss_ptr.item(), plan_exact=float(np.mean(hits[-cfg.log_every:])),
                         samples_per_s=step * cfg.batch_size / (time.time() - start))
    return model.eval(), float(np.mean(hits[-cfg.log_every:]))


def evaluate(model, device, db, tasks, mode, budget, hide_room=False, max_steps=8):
    """Select insights, plan each task with them in context, execute; returns the episodes in task order. The store
    is frozen here, so tasks with one selection key share one selection; tasks are batched by their number of lines."""
    memo, groups, eps = {}, collections.defaultdict(list), [None] * len(tasks)
    for i, t in enumerate(tasks):
        key = query_text(t) if mode == "vector" else (t.room, tuple(s[0] for s in t.subtasks))
        if key not in memo:
            memo[key] = [p for p in map(parse_rule, select_insights(db, t, mode, budget)) if p]
        groups[len(memo[key])].append((i, t, memo[key]))
    for n, group in groups.items():
        for lo in range(0, len(group), 512):
            chunk = group[lo:lo + 512]
            plans = generate(model, [encode_prompt(t, r, hide_room) for _, t, r in chunk], n, device, max_steps)
            for (i, t, rules), steps in zip(chunk, plans):
                eps[i] = execute(t, assemble_plan(steps, rules))
    return eps


def grow_db(db, episodes, mode, batch, scoped=True):
    """Select experiences (pair or success mode) and run the insight generator over them in batches."""
    pairs = select_experiences(episodes, mode)
    ops = generate_insights(db, [pairs[i:i + batch] for i in range(0, len(pairs), batch)], scoped)
    return {"experiences": len(pairs), "ops": ops, "insights": len(db.select())}


def implied(rule):
    """A redundant chained rule: wherever its trigger occurs, the action it asks for is already required earlier."""
    hits = []
    for room, kind in ((r, k) for r in ROOMS for k in KINDS):
        core = core_actions((kind, KIND_OBJECTS[kind][0], "box"))
        for t, (v, a) in enumerate(core):
            if v == rule[0]:
                before = {needed(r, b) for w, b in core[:t] for r in hidden_rules(room, kind) if r[0] == w}
                hits.append(needed(rule, a) in before | set(core[:t]))
    return bool(hits) and all(hits)


def rule_recall(db):
    """Induced rules (score >= 1) against the 12 hidden training rules."""
    got = {parse_rule(r["rule"]): (r["scale"], r["environment"], r["subtask"]) for r in db.select()}
    spurious = [r for r in got if r not in TRUE_SCOPE]
    return {"hidden": len(TRUE_SCOPE), "induced": len(got),
            "recall_any_scale": sum(r in got for r in TRUE_SCOPE) / len(TRUE_SCOPE),
            "recall_right_scale": sum(got.get(r) == s for r, s in TRUE_SCOPE.items()) / len(TRUE_SCOPE),
            "spurious_redundant_chained": sum(map(implied, spurious)),
            "spurious_other": sum(not implied(r) for r in spurious),
            "missed": [rule_text(r) for r in TRUE_SCOPE if r not in got],
            "wrong_scale": [rule_text(r) for r, s in TRUE_SCOPE.items() if r in got and got[r] != s]}


ARMS = {"none": ("msi", "none"), "flat": ("flat", "flat"), "general_only": ("msi", "general"),
        "msi_hashmap": ("msi", "hashmap"), "msi_vector": ("msi", "vector"), "msi_success_mode": ("success", "hashmap"),
        "flat_msi_rules": ("msi", "flat")}  # arm: (insight store, selection); flat_msi_rules: MSI's rules, unscoped


def run_seed(cfg, model, device, seed, test_in, out_db):
    """Exploration, three insight stores, every arm in and out of domain, the budget sweep and the domain shift."""
    rng, sr_gc = random.Random(seed), success_rate_and_gc
    episodes = [explore(rng, sample_task(rng, rng.choice(ROOMS)), cfg.explore_p) for _ in range(cfg.explore_episodes)]
    if out_db != ":memory:" and os.path.exists(out_db):
        os.remove(out_db)
    dbs, info = {"msi": InsightDB(out_db), "success": InsightDB(), "flat": InsightDB()}, {}
    for name, mode, scoped in (("msi", "pair", True), ("success", "success", True), ("flat", "pair", False)):
        info[name] = grow_db(dbs[name], episodes, mode, cfg.pair_batch, scoped)
    dbs["msi"].add_experiences(episodes)
    test_in = test_in or [sample_task(rng, rng.choice(ROOMS)) for _ in range(cfg.eval_episodes)]
    test_ood = [sample_task(rng, OOD_ROOM) for _ in range(cfg.eval_episodes)]
    new = [needs_new_rule(t) for t in test_ood]
    res = {"arms": {}, "induction": {"explore_sr": sr_gc(episodes)[0], **info},
           "recall": {n: rule_recall(db) for n, db in dbs.items()}}
    for arm, (store, mode) in ARMS.items():
        ins, ood = (evaluate(model, device, dbs[store], ts, mode, cfg.budget) for ts in (test_in, test_ood))
        (sr, gc), (sr_o, gc_o) = sr_gc(ins), sr_gc(ood)
        res["arms"][arm] = {"sr": sr, "gc": gc, "sr_ood": sr_o, "gc_ood": gc_o,
                            "sr_ood_shared": sr_gc([e for e, b in zip(ood, new) if not b])[0],
                            "sr_ood_new": sr_gc([e for e, b in zip(ood, new) if b])[0]}
    sr_h, gc_h = sr_gc(evaluate(model, device, dbs["msi"], test_in, "hashmap", cfg.budget, hide_room=True))
    res["room_hidden"] = {"sr": sr_h, "gc": gc_h, "sr_room_shown": res["arms"]["msi_hashmap"]["sr"]}
    res["budget_sweep"] = {b: {arm: sr_gc(evaluate(model, device, dbs[s], test_in, m, int(b)))[0]
                               for arm, (s, m) in ARMS.items() if arm not in ("none", "msi_success_mode")}
                           for b in cfg.sweep.split(",")}
    for db in dbs.values():
        db.close()
    # sequential domain shift: insights built kitchen -> livingroom -> bedroom, tested on the kitchen each time
    test_k, res["domain_shift"] = [sample_task(rng, "kitchen") for _ in range(cfg.eval_episodes)], {}
    stages = [[explore(rng, sample_task(rng, room), cfg.explore_p) for _ in range(cfg.shift_episodes)]
              for room in ("kitchen", "livingroom", "bedroom")]
    for name, scoped, mode in (("msi", True, "hashmap"), ("flat", False, "flat")):
        db, srs = InsightDB(), []
        for eps in stages:
            grow_db(db, eps, "pair", cfg.pair_batch, scoped)
            srs.append(sr_gc(evaluate(model, device, db, test_k, mode, cfg.budget))[0])
        res["domain_shift"][name] = dict(zip(("sr_kitchen", "sr_plus_livingroom", "sr_plus_bedroom"), srs),
                                         sr_drop=srs[0] - srs[2])
        db.close()
    return res


def mean_tree(trees):
    """Average the numbers of several results trees with the same shape; anything else is taken from the first."""
    if isinstance(trees[0], dict):
        return {k: mean_tree([t[k] for t in trees]) for k in trees[0]}
    return float(np.mean(trees)) if isinstance(trees[0], (int, float)) and not isinstance(trees[0], bool) else trees[0]


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 15), batch_size=16, d_model=32, seeds=1, explore_episodes=150,
                                  eval_episodes=16, sweep="3,8", shift_episodes=50, log_every=5)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    log(f"config: {dataclasses.asdict(cfg)}")
    t0, cpu0 = time.time(), time.process_time()
    os.makedirs(cfg.out, exist_ok=True)
    test_in = parse_user_tasks(load_user_data(cfg.data, ["room", "subtasks"]), cfg.data) if cfg.data else None
    model, plan_exact = train_planner(cfg, device, max_len=5 + cfg.max_lines + 10)
    train_cpu = time.process_time() - cpu0
    seeds = [run_seed(cfg, model, device, cfg.seed + 1000 * k, test_in,
                      os.path.join(cfg.out, "insights.sqlite") if k == 0 else ":memory:") for k in range(cfg.seeds)]
    res = mean_tree(seeds)
    for arm in ARMS:  # spread over seeds
        res["arms"][arm].update({f"{m}_seeds": [s["arms"][arm][m] for s in seeds] for m in ("sr", "sr_ood")})
    for name in ("msi", "flat"):
        res["domain_shift"][name]["sr_drop_seeds"] = [s["domain_shift"][name]["sr_drop"] for s in seeds]
    res.update(recall_seed0=seeds[0]["recall"], planner_plan_exact=plan_exact, config=dataclasses.asdict(cfg),
               train_cpu_s=train_cpu, cpu_time_s=time.process_time() - cpu0, wall_time_s=time.time() - t0)
    log(f"{'arm':>16} | {'SR':>5} {'GC':>5} | {'SR_ood':>6} {'GC_ood':>6} | SR per seed")
    for arm, a in res["arms"].items():
        log(f"{arm:>16} | {a['sr']:.3f} {a['gc']:.3f} | {a['sr_ood']:.4f} {a['gc_ood']:.4f} | "
            + " ".join(f"{x:.3f}" for x in a["sr_seeds"]))
    for key in ("room_hidden", "budget_sweep", "domain_shift", "recall"):
        log(f"{key}: {json.dumps(res[key])}")
    log(f"CPU {res['cpu_time_s']:.0f}s (planner {train_cpu:.0f}s), wall {res['wall_time_s']:.0f}s")
    save_json(os.path.join(cfg.out, "results.json"), res)
    return res


def main(argv=None):
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main()
