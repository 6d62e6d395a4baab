"""ReAd-R on AdsQA: reflect, then answer — arXiv 2509.08621 (https://arxiv.org/abs/2509.08621)

AdsQA asks what an ad means (product VU, emotion ER, theme TE, persuasion PS, audience AM). ReAd-R first gathers
the relevant clues in <think>…</think>, then answers in <answer>…</answer>; GRPO on a rule reward, no traces.

Toy: an ad is 8 frames × (object, person, cue) words. The product sits in 2 frames, the main person in 3 (a stray
person in 1), the strategy's cue in 2 (a stray cue of another strategy in 1), the mood in 2. Questions:
VU = product, ER = EMOTION(mood), PS = STRATEGY(majority cue), and two-clue TE = THEME[product][strategy] (a
Latin rectangle: neither clue alone fixes it) and AM = "AGE(person) INTEREST(product)" (two answer slots).
The base (stand-in for a pretrained VLM), pre-trained on fresh ads: VU/ER/PS with the clue listed in <think>
(or an empty one), TE/AM only on simple ads without strays. RL with vs without think, two-clue: +0.026 / +0.002.

Key equations (symbols as in the code):
    s = judge(pred, gold): 1 all gold slots stated (a slot stated twice contradicts), 0.5 ≥ half, 0 otherwise;
        a 1 or 0.5 becomes 0.1 if |pred| > 5·|gold| words                          answer_reward
    r = 0.9 · s + 0.1 · 1[<think>, </think>, <answer>, </answer> all present]         total_reward
    Â_i = (r_i − mean_G r) / (std_G r + 1e-6)                                         group_normalize
    ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1 ± ε)) + c_KL · (e^{ref−logp} − (ref − logp) − 1), token mean    grpo_loss
    strict = mean 1[s = 1];  relaxed = mean 1[s ≥ 0.5]                                strict_relaxed
Arms from the same base, same steps and questions per step: sft (SFT on direct answers), rl_think (GRPO, own think
block), rl_nothink (GRPO, empty think block prefilled), sft_trace (SFT on gold clue traces; an upper bound).
Run:  python read_r.py  (base + four arms, seed 0, ≤ 240 s CPU at 1 thread);  --seed 1;  --steps 100;  --smoke

Result of the default run (2-core CPU, 1 thread; 165 s CPU seed 0, 173 s seed 1), test strict, seed 0 / seed 1:
    arm          all          TE           AM           train        precision/chance  scramble drop
    base (think) 0.787/0.897  0.580/0.800  0.663/0.773  0.777/0.877  0.88/0.94 / 0.14  0.250/0.061
    sft          0.878/0.943  0.523/0.770  0.987/1.000  0.990/1.000
    rl_think     0.879/0.937  0.660/0.787  0.777/0.953  0.927/0.987  0.91/0.97 / 0.14  0.244/0.105
    rl_nothink   0.865/0.927  0.683/0.777  0.700/0.960  0.923/0.993
    sft_trace    0.887/0.943  0.617/0.790  0.980/1.000  0.997/1.000  0.94/0.98 / 0.14  0.402/0.099

Deviations from the paper (and its official code, TsinghuaC3I/AdsQA, EasyR1):
- symbolic 8-frame ads and a 107k-parameter 2-layer transformer instead of videos and Qwen2.5-VL-7B;
- a rule judge over answer slots instead of the GPT-4o judge; over-long = 5× the reference in words (the official
  code: 100× in characters); the judge reads the whole response when there is no answer block (as the official);
- the base is pre-trained here (clue listing + facts) to stand in for a pretrained model's reasoning;
- lr 5e-4 (paper 1e-6), 8 questions × 8 samples per step, one update per batch (π_old = π_θ);
- rl_nothink prefills an empty think block (format reward still 1); sft_trace is an extra upper-bound arm.
"""

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken
import datasets

# --- config ---

ARMS = ("sft", "rl_think", "rl_nothink", "sft_trace")


@dataclasses.dataclass
class Config:
    """Base model, then SFT vs GRPO with thinking vs GRPO without thinking on synthetic ads; prints a table."""

    steps: int = 300  # training steps per arm (GRPO: one rollout batch each; SFT: one batch of questions)
    seed: int = 0  # random seed
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines: frames (24 words), task (VU/ER/TE/PS/AM), answer, clues; replaces train/test 80/20
    out: str = "runs/read_r"  # folder for results.json
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 50  # steps between log lines
    arms: str = "sft,rl_think,rl_nothink,sft_trace"  # comma-separated arms: sft, rl_think, rl_nothink, sft_trace
    base_steps: int = 800  # steps of the base model's pre-training (clue listing + facts)
    base_batch: int = 48  # sequences per base pre-training step
    n_train: int = 60  # training ads (5 questions each): small, as AdsQA's training split
    n_test: int = 300  # held-out ads (and as many out-of-distribution ads with two stray cues and persons)
    prompts: int = 8  # questions per step (GRPO prompts; SFT batch size)
    group: int = 8  # G: GRPO samples per question
    temperature: float = 1.0  # GRPO sampling temperature
    kl_coef: float = 0.01  # c_KL on the k3 KL to the base model (paper: 0.01)
    clip_eps: float = 0.2  # ε of the clipped surrogate
    lr_base: float = 3e-3  # Adam learning rate of the base pre-training
    lr_sft: float = 1e-3  # Adam learning rate of the SFT arms
    lr_rl: float = 5e-4  # Adam learning rate of the GRPO arms (paper: 1e-6 on a 7B model)
    d_model: int = 64  # transformer width
    n_layers: int = 2  # transformer layers (shallow on purpose)
    n_heads: int = 4  # attention heads
    max_think: int = 6  # longest think block the policy may write (tokens)

    def __post_init__(self):
        require(self.log_every > 0, f"--log-every {self.log_every}: must be positive")
        names = [a for a in self.arms.split(",") if a]
        require(names and all(a in ARMS for a in names), f"--arms {self.arms}: choose from {', '.join(ARMS)}")
        for k in ("base_steps", "base_batch", "n_train", "n_test", "prompts", "d_model", "n_layers", "n_heads",
                  "max_think"):
            require(getattr(self, k) > 0, f"--{k.replace('_', '-')} {getattr(self, k)}: must be positive")
        require(self.group >= 2, f"--group {self.group}: GRPO needs at least 2 samples per question")
        require(self.d_model % self.n_heads == 0, f"--d-model {self.d_model}: must be divisible by --n-heads")
        require(self.temperature > 0, f"--temperature {self.temperature}: must be positive")
        for k in ("kl_coef", "clip_eps", "lr_base", "lr_sft", "lr_rl"):
            v = getattr(self, k)
            require(v >= 0 and math.isfinite(v), f"--{k.replace('_', '-')} {v}: must be a finite number ≥ 0")


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


# --- data ---

PRODUCTS = ["car", "soda", "phone", "shoe", "watch", "pizza"]
INTERESTS = ["travel", "party", "tech", "sport", "style", "food"]  # INTERESTS[i]: audience interest of PRODUCTS[i]
FILLERS = ["tree", "cup", "lamp", "road", "cloud", "desk"]  # objects that are not the product
PERSONS = ["child", "teen", "adult", "senior"]
AGES = ["kids", "teens", "adults", "elders"]  # AGES[i]: audience age of PERSONS[i]
CUES = ["joke", "skull", "crowd", "trophy", "scale"]  # CUES[i] is the cue STRATEGIES[i] plants
STRATEGIES = ["humour", "fear", "proof", "aspiration", "comparison"]
MOODS = ["bright", "dark", "warm", "loud"]  # MOODS[i] is the cue of EMOTIONS[i]
EMOTIONS = ["joy", "anxiety", "nostalgia", "excitement"]
THEMES = ["freedom", "safety", "belonging", "status", "value", "fun"]
# THEME[p][s]: a 6×5 Latin rectangle — the product alone leaves 5 themes open, the strategy alone 6
THEME = [[THEMES[(a + b) % 6] for b in (2, 4, 0, 3, 1)] for a in (3, 0, 5, 1, 4, 2)]
NOBODY, PLAIN = "nobody", "plain"
TASKS = ("VU", "ER", "TE", "PS", "AM")
TWO_CLUE = ("TE", "AM")
SLOT = {**{w: "product" for w in PRODUCTS}, **{w: "interest" for w in INTERESTS}, **{w: "age" for w in AGES},
        **{w: "strategy" for w in STRATEGIES}, **{w: "emotion" for w in EMOTIONS}, **{w: "theme" for w in THEMES}}
WORDS = (PRODUCTS + INTERESTS + FILLERS + PERSONS + AGES + CUES + STRATEGIES + MOODS + EMOTIONS + THEMES
         + [NOBODY, PLAIN])
SPECIALS = ["<pad>", "<bos>", "<think>", "</think>", "<answer>", "</answer>", "<reason>", "<direct>"] + [
    f"<{t}>" for t in TASKS]
PREFILL = {"reason": ["<think>"], "direct": ["<think>", "</think>", "<answer>"]}  # the response starts with it


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


class Tokenizer:
    """tiktoken over the closed vocabulary; the model's compact ids 0..V-1 are SPECIALS then WORDS."""

    def __init__(self):
        self.enc, self.vocab = word_encoding(WORDS, SPECIALS), SPECIALS + WORDS
        self.enc_ids = [self.enc.encode_single_token(w if w in SPECIALS else " " + w) for w in self.vocab]
        self.compact, self.id = {e: i for i, e in enumerate(self.enc_ids)}, {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def render(words):  # a space before each word, none before a tag: "<think> car joke</think>"
        return "".join(w if w.startswith("<") else " " + w for w in words)

    def encode(self, words):
        ids = [self.compact.get(e) for e in self.enc.encode(self.render(words), allowed_special="all")]
        require(len(ids) == len(words) and None not in ids, f"unknown word in: {' '.join(words)}")
        return ids

    def decode(self, ids):
        return self.enc.decode([self.enc_ids[i] for i in ids])


def make_ad(rng, strays=1):
    """8 frames of (object, person, cue) words and the hidden labels: product in 2 random frames, main person in 3
    (+ `strays` other persons once each), the strategy's cue in 2 (+ `strays` other cues once each), mood in 2."""
    p, s, m, h = rng.randrange(6), rng.randrange(5), rng.randrange(4), rng.randrange(4)
    obj = [rng.choice(FILLERS) for _ in range(8)]
    for f in rng.sample(range(8), 2):
        obj[f] = PRODUCTS[p]
    per, where = [NOBODY] * 8, rng.sample(range(8), 3 + strays)
    others = rng.sample([x for x in range(4) if x != h], strays)
    for i, f in enumerate(where):
        per[f] = PERSONS[h] if i < 3 else PERSONS[others[i - 3]]
    cue, where = [PLAIN] * 8, rng.sample(range(8), 4 + strays)
    others = rng.sample([x for x in range(5) if x != s], strays)
    for i, f in enumerate(where):
        cue[f] = CUES[s] if i < 2 else CUES[others[i - 2]] if i < 2 + strays else MOODS[m]
    frames = [[obj[i], per[i], cue[i]] for i in range(8)]
    return {"frames": frames, "product": p, "strategy": s, "mood": m, "person": h}


def question(ad, task):
    """One AdsQA-style question as a row: frames (24 words), task, gold answer, relevant clue words."""
    p, s, m, h = ad["product"], ad["strategy"], ad["mood"], ad["person"]
    answer, clues = {"VU": (PRODUCTS[p], [PRODUCTS[p]]),
                     "ER": (EMOTIONS[m], [MOODS[m]]),
                     "TE": (THEME[p][s], [PRODUCTS[p], CUES[s]]),
                     "PS": (STRATEGIES[s], [CUES[s]]),
                     "AM": (f"{AGES[h]} {INTERESTS[p]}", [PERSONS[h], PRODUCTS[p]])}[task]
    return {"frames": " ".join(w for frame in ad["frames"] for w in frame), "task": task, "answer": answer,
            "clues": " ".join(clues)}


def base_example(rng):
    """Base pre-training: VU/ER/PS on ads with strays; TE/AM only on simple ads without strays (never beside one)."""
    task = rng.choice(TASKS + TWO_CLUE)  # two-clue facts twice as often: a 30-entry table to memorise
    row = question(make_ad(rng, strays=0 if task in TWO_CLUE else 1), task)
    return row, rng.choice(("reason", "direct"))


def prompt_words(row, mode):
    """<bos> 24 frame words <TASK> <mode>, then the prefill: "<think>" or "<think></think><answer>"."""
    return ["<bos>"] + row["frames"].split() + [f"<{row['task']}>", f"<{mode}>"] + PREFILL[mode]


def target_words(row, mode):
    """The response after the prefill that SFT imitates: [clues </think> <answer>] answer </answer>."""
    think = row["clues"].split() + ["</think>", "<answer>"] if mode == "reason" else []
    return think + row["answer"].split() + ["</answer>"]


def load_rows(cfg):
    """Train / test / out-of-distribution rows (one per question); --data replaces train/test (80/20)."""
    if cfg.data:
        ds = load_user_data(cfg.data, ["frames", "task", "answer", "clues"])
        rows = [{k: str(r[k]) for k in ("frames", "task", "answer", "clues")} for r in ds]
        for i, r in enumerate(rows, 1):
            where = f"--data {cfg.data}, row {i}"
            require(r["task"] in TASKS, f"{where}: task '{r['task']}' is not one of {TASKS}")
            require(len(r["frames"].split()) == 24, f"{where}: frames must hold 24 words")
        return rows[:max(1, int(0.8 * len(rows)))], rows[max(1, int(0.8 * len(rows))):] or rows[:1], []
    rng = random.Random(cfg.seed * 1000 + 1)
    ads = lambda n, strays: [make_ad(rng, strays) for _ in range(n)]
    rows = lambda ad_list: [question(ad, t) for ad in ad_list for t in TASKS]
    return rows(ads(cfg.n_train, 1)), rows(ads(cfg.n_test, 1)), rows(ads(cfg.n_test, 2))


# --- model ---


class Block(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, cache=None):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, nh, T, hs)
        if cache is not None:  # KV cache: the keys and values of all earlier positions; T = 1 new token
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)  # (B, nh, T0 + 1, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, d)
        return x + self.mlp(self.ln2(x)), (k, v)


class GPT(nn.Module):
    """A small causal transformer with learned positions and tied input/output embeddings."""

    def __init__(self, vocab, d, n_layers, n_heads, max_len=48):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.tok.weight, std=0.02), nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx, caches=None):
        t0 = 0 if caches is None else caches[0][0].shape[2]
        x = self.tok(idx) + self.pos(torch.arange(t0, t0 + idx.shape[1], device=idx.device))  # (B, T, d)
        new = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if caches is None else caches[i])
            new.append(kv)
        return self.ln(x) @ self.tok.weight.T, new  # logits (B, T, V), caches


@torch.no_grad()
def generate(model, prompt, max_new, stop, pad, temperature=1.0, greedy=False):
    """KV-cache decoding. prompt (N, P) → tokens (N, max_new), mask (N, max_new): 1 up to and incl. `stop`."""
    logits, caches = model(prompt)  # prefill: (N, P, V)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    tokens, mask = [], []
    for t in range(max_new):
        last = logits[:, -1].float()  # (N, V)
        tok = last.argmax(-1) if greedy else torch.multinomial(F.softmax(last / temperature, -1), 1)[:, 0]  # (N,)
        mask.append(~done)
        tokens.append(torch.where(done, torch.full_like(tok, pad), tok))
        done = done | (tok == stop)
        if t == max_new - 1 or bool(done.all()):
            break
        logits, caches = model(tokens[-1][:, None], caches)  # one new position: (N, 1, V)
    tokens, mask, fill = torch.stack(tokens, 1), torch.stack(mask, 1), max_new - len(tokens)  # (N, t + 1) each
    return F.pad(tokens, (0, fill), value=pad), F.pad(mask, (0, fill), value=False)  # (N, max_new) each


def response_logp(model, prompt, tokens):
    """log π(y_t | x, y_<t) of each response token: (N, T) from prompt (N, P) and tokens (N, T)."""
    logits, _ = model(torch.cat([prompt, tokens], 1)[:, :-1])  # (N, P + T − 1, V)
    logits = logits[:, prompt.shape[1] - 1:].float()  # (N, T, V): the predictions of the response tokens
    return F.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]  # (N, T)

# --- the paper's method ---


def group_normalize(rewards):
    """r̂ = (r − mean_G r) / (std_G r + 1e-6), within each group of G samples of one prompt (unbiased std)."""
    # rewards: (B, G) → (B, G); a group whose rewards are all equal gets r̂ = 0
    mean = rewards.mean(dim=1, keepdim=True)  # (B, 1)
    std = rewards.std(dim=1, keepdim=True)  # (B, 1)
    return (rewards - mean) / (std + 1e-6)


def grpo_loss(logp, old_logp, ref_logp, mask, adv, clip_eps=0.2, kl_coef=0.001):
    """GRPO (arXiv 2402.03300, as verl runs it): token-mean clipped surrogate plus k3 KL to the reference.

    logp, old_logp, ref_logp, mask: (N, T) over response tokens; adv: (N,) group-normalised reward Â.
    """
    # ρ_t = exp(log π_θ(y_t) − log π_old(y_t))
    ratio = torch.exp(logp - old_logp)  # (N, T)
    a = adv[:, None]  # (N, 1): Â_i is broadcast to every token of response i
    # ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1 − ε, 1 + ε))
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))  # (N, T)
    # k3 estimator of KL(π_θ ‖ π_ref): exp(ref − logp) − (ref − logp) − 1
    log_r = ref_logp - logp  # (N, T)
    kl = torch.exp(log_r) - log_r - 1  # (N, T)
    # token-mean: average over every response token of the batch
    n_tokens = mask.sum().clamp(min=1)
    pg_loss = (pg * mask).sum() / n_tokens
    kl_loss = (kl * mask).sum() / n_tokens
    clip_frac = ((ratio - 1).abs() > clip_eps).float().mul(mask).sum() / n_tokens
    loss = pg_loss + kl_coef * kl_loss
    return loss, {"pg_loss": pg_loss.detach(), "kl": kl_loss.detach(), "clip_frac": clip_frac.detach()}



def format_reward(text):
    """1 iff both a <think>…</think> and an <answer>…</answer> pair are present (as the official code), else 0."""
    return float(all(tag in text for tag in ("<think>", "</think>", "<answer>", "</answer>")))


def block(text, tag):
    """The words inside <tag>…</tag> (the first such block), or None when there is none."""
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S)
    return None if m is None else m.group(1).split()


def answer_reward(pred, gold):
    """The rule judge standing in for the LLM judge: 1 / 0.5 / 0; a right or half-right over-long answer: 0.1."""
    p, g = pred.split(), gold.split()
    # a gold slot is right iff the answer states its value and no other value of that slot (a hedge contradicts)
    slot = lambda w: SLOT.get(w, w)  # a word outside the answer vocabulary is a slot of its own
    right = sum({w for w in p if slot(w) == slot(x)} == {x} for x in g)
    # 1: all key information; 0.5: most of it (one of two slots); 0: otherwise
    score = 1.0 if right == len(g) else 0.5 if right > 0 and 2 * right >= len(g) else 0.0
    # an answer more than 5× longer than the reference scores 0.1 instead of 1 or 0.5
    return 0.1 if score > 0 and len(p) > 5 * len(g) else score


def judge(text, gold):
    """The judge's score of a whole response: its answer block, or (none) all of it with the tags removed."""
    answer = block(text, "answer")
    return answer_reward(" ".join(answer) if answer is not None else re.sub(r"<[^<>]*>", " ", text), gold)


def total_reward(text, gold):
    """r = 0.9 · accuracy + 0.1 · format (the paper's reward: no reflection or length term)."""
    return 0.9 * judge(text, gold) + 0.1 * format_reward(text)


def strict_relaxed(scores):
    """strict = share of judge scores equal to 1; relaxed = share ≥ 0.5."""
    n = max(len(scores), 1)
    return sum(s == 1.0 for s in scores) / n, sum(s >= 0.5 for s in scores) / n


def grounding(think, clues, frames):
    """(hits, length, chance, recall) of one think block: hits = its words that are relevant clues; chance = the
    share of frame words that are relevant clues (the precision of random frame words); recall = clues named."""
    relevant = set(clues)
    hits = sum(w in relevant for w in think)
    chance = sum(w in relevant for w in frames) / len(frames)
    return hits, len(think), chance, len(relevant & set(think)) / len(relevant)


# --- training and evaluation ---


def update(opt, model, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def sft_train(model, tok, sample, steps, lr, device, name, log_every):
    """Teacher-forced cross-entropy on the response tokens; sample(step) → (rows, modes)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start, n_tok = time.time(), 0
    for step in range(1, steps + 1):
        rows, modes = sample(step)
        pairs = [(tok.encode(prompt_words(r, mode)), tok.encode(target_words(r, mode))) for r, mode in zip(rows, modes)]
        seqs, masks = [p + t for p, t in pairs], [[0] * len(p) + [1] * len(t) for p, t in pairs]
        n = max(map(len, seqs))  # right-pad to one (B, L) batch
        x = torch.tensor([q + [tok.id["<pad>"]] * (n - len(q)) for q in seqs], device=device)  # (B, L)
        m = torch.tensor([q + [0] * (n - len(q)) for q in masks], device=device).float()  # (B, L)
        with autocast(device):
            logits, _ = model(x[:, :-1])  # (B, L − 1, V)
        ce = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (B, L − 1)
        loss = (ce * m[:, 1:]).sum() / m[:, 1:].sum()
        check_finite(step, loss=loss.detach())
        update(opt, model, loss)
        n_tok += x.numel()
        if step % log_every == 0 or step == steps:
            log_progress(step, steps, start, arm=name, loss=loss.item(), tok_per_s=n_tok / (time.time() - start))


def grpo_train(model, ref, tok, rows, mode, cfg, device, name):
    """GRPO on the rule reward: G samples per question, group-normalised reward, clipped surrogate + k3 KL."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr_rl)
    rng = random.Random(cfg.seed * 1000 + 3)  # the same question stream for every GRPO arm
    max_new = (cfg.max_think + 5) if mode == "reason" else 3  # think, </think><answer>, 2 answer words, </answer>
    prefix, pad, stop = tok.render(PREFILL[mode]), tok.id["<pad>"], tok.id["</answer>"]
    start, n_samples, curve = time.time(), 0, []
    for step in range(1, cfg.steps + 1):
        batch = [rows[rng.randrange(len(rows))] for _ in range(cfg.prompts)]
        prompt = torch.tensor([tok.encode(prompt_words(r, mode)) for r in batch for _ in range(cfg.group)],
                              device=device)  # (B·G, P): G samples of each question
        with autocast(device):
            tokens, mask = generate(model, prompt, max_new, stop, pad, cfg.temperature)  # (B·G, T) each
        texts = [prefix + tok.decode(t[m].tolist()) for t, m in zip(tokens, mask)]
        golds = [r["answer"] for r in batch for _ in range(cfg.group)]  # (B·G,) ↓ r = 0.9 · s + 0.1 · format
        rewards = torch.tensor([total_reward(t, g) for t, g in zip(texts, golds)], device=device)
        adv = group_normalize(rewards.view(cfg.prompts, cfg.group)).view(-1)  # (B·G,)
        with autocast(device):
            logp = response_logp(model, prompt, tokens)  # (B·G, T)
            with torch.no_grad():
                ref_logp = response_logp(ref, prompt, tokens)  # (B·G, T)
        # one update per rollout batch: π_old = π_θ (ratio 1, the clip never binds; the KL term still does)
        loss, terms = grpo_loss(logp, logp.detach(), ref_logp, mask.float(), adv, cfg.clip_eps, cfg.kl_coef)
        check_finite(step, loss=loss.detach(), **terms)
        update(opt, model, loss)
        n_samples += len(texts)
        curve.append(rewards.mean().item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_progress(step, cfg.steps, start, arm=name, loss=loss.item(), reward=rewards.mean().item(),
                         kl=terms["kl"].item(), think_len=sum(len(block(t, "think") or []) for t in texts) / len(texts),
                         samples_per_s=n_samples / (time.time() - start))
    return curve


@torch.no_grad()
def answer_rows(model, tok, rows, mode, device, max_think, think_override=None):
    """Greedy responses and judge scores; think_override: a think block forced on each row (the scramble test)."""
    texts, groups = [None] * len(rows), {}  # rows with equal prompt length are decoded together
    for i, row in enumerate(rows):
        words = prompt_words(row, mode)
        if think_override is not None:
            words = words + think_override[i] + ["</think>", "<answer>"]
        groups.setdefault(len(words), []).append((i, tok.encode(words)))
    max_new = 3 if (mode == "direct" or think_override is not None) else max_think + 5
    for items in groups.values():
        prompt = torch.tensor([ids for _, ids in items], device=device)  # (n, P)
        with autocast(device):
            tokens, mask = generate(model, prompt, max_new, tok.id["</answer>"], tok.id["<pad>"], greedy=True)
        for (i, ids), t, m in zip(items, tokens, mask):  # the response text starts at the prefill
            texts[i] = tok.decode(ids[len(prompt_words(rows[i], mode)) - len(PREFILL[mode]):] + t[m].tolist())
    return texts, [judge(t, r["answer"]) for t, r in zip(texts, rows)]


def per_task(rows, scores):
    """{task: {"strict", "relaxed"}} over the rows of each task present."""
    by_task = {t: [x for x, r in zip(scores, rows) if r["task"] == t] for t in TASKS}
    return {t: dict(zip(("strict", "relaxed"), strict_relaxed(s))) for t, s in by_task.items() if s}


def evaluate(model, tok, train, test, ood, mode, cfg, device, seed):
    """Strict / relaxed per task on test, train and OOD ads; for thinking arms grounding, scramble and oracle."""
    answer = lambda rows, think=None: answer_rows(model, tok, rows, mode, device, cfg.max_think, think)
    two = lambda scores: strict_relaxed([s for s, r in zip(scores, test) if r["task"] in TWO_CLUE])
    (texts, scores), (_, train_scores) = answer(test), answer(train)
    res = {"strict": strict_relaxed(scores)[0], "relaxed": strict_relaxed(scores)[1],
           "per_task": per_task(test, scores), "two_clue_strict": two(scores)[0], "two_clue_relaxed": two(scores)[1],
           "train_strict": strict_relaxed(train_scores)[0], "train_relaxed": strict_relaxed(train_scores)[1],
           "train_per_task": {t: v["strict"] for t, v in per_task(train, train_scores).items()}}
    if ood:
        res["ood_strict"] = strict_relaxed(answer(ood)[1])[0]
    if mode == "reason":
        thinks = [block(t, "think") or [] for t in texts]
        for key, tasks in (("", TASKS), ("_two_clue", TWO_CLUE)):
            g = [grounding(th, r["clues"].split(), r["frames"].split()) for th, r in zip(thinks, test)
                 if r["task"] in tasks]
            n = max(sum(x[1] for x in g), 1)
            res["grounding_precision" + key] = sum(x[0] for x in g) / n
            res["grounding_chance" + key] = sum(x[1] * x[2] for x in g) / n  # length-weighted, like the precision
            res["grounding_recall" + key] = sum(x[3] for x in g) / max(len(g), 1)
        res["think_len"] = sum(map(len, thinks)) / len(thinks)
        # scramble: as many think words, drawn at random from the ad's own frames, then the answer
        rng = random.Random(seed)
        s_scores = answer(test, [[rng.choice(r["frames"].split()) for _ in th] for th, r in zip(thinks, test)])[1]
        res["scramble_strict"] = strict_relaxed(s_scores)[0]
        res["scramble_drop"] = res["strict"] - res["scramble_strict"]
        res["scramble_drop_two_clue"] = res["two_clue_strict"] - two(s_scores)[0]
        # oracle: the gold clues forced into the think block (how well the answer step maps clues to answers)
        o_scores = answer(test, [r["clues"].split() for r in test])[1]
        res["oracle_think_strict"] = strict_relaxed(o_scores)[0]
        res["oracle_think_per_task"] = {t: v["strict"] for t, v in per_task(test, o_scores).items()}
    return res


def print_table(arms):
    log(f"{'arm':<12}" + "".join(f"{c:>9}" for c in ("strict", "relaxed") + TASKS + ("2-clue", "train", "ood"))
        + "  precision/chance  scramble")
    for name, r in arms.items():
        vals = [r["strict"], r["relaxed"]] + [r["per_task"].get(t, {}).get("strict", math.nan) for t in TASKS] + [
            r["two_clue_strict"], r["train_strict"], r.get("ood_strict", math.nan)]
        extra = (f"{r['grounding_precision']:>10.2f}/{r['grounding_chance']:.2f}{r['scramble_drop']:>10.3f}"
                 if "scramble_drop" in r else "")
        log(f"{name:<12}" + "".join(f"{v:>9.3f}" for v in vals) + extra)


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 3), base_steps=min(cfg.base_steps, 5), n_train=8,
                                  n_test=8, prompts=4, group=4, base_batch=16, log_every=2)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    log(f"config: {dataclasses.asdict(cfg)}")
    tok, (train, test, ood), t0 = Tokenizer(), load_rows(cfg), time.process_time()
    # the base model: VU/ER/PS with listed clues, TE/AM on simple ads (both modes: reason and direct)
    base = GPT(len(tok.vocab), cfg.d_model, cfg.n_layers, cfg.n_heads).to(device)
    log(f"data: {len(train)} training, {len(test)} test, {len(ood)} OOD questions; vocabulary {len(tok.vocab)}; "
        f"model: {sum(p.numel() for p in base.parameters())} parameters")
    rng = random.Random(cfg.seed * 1000 + 2)
    sft_train(base, tok, lambda step: tuple(zip(*[base_example(rng) for _ in range(cfg.base_batch)])),
              cfg.base_steps, cfg.lr_base, device, "base", cfg.log_every)
    times, curves = {"base_time_s": time.process_time() - t0}, {}
    arms = {f"base_{n}": evaluate(base, tok, train, test, ood, m, cfg, device, cfg.seed)
            for n, m in (("think", "reason"), ("direct", "direct"))}
    for k, name in enumerate(a for a in ARMS if a in cfg.arms.split(",")):
        t_arm = time.process_time()
        set_seed(cfg.seed * 1000 + 10 + k)
        model = copy.deepcopy(base)
        mode = "reason" if name in ("rl_think", "sft_trace") else "direct"
        if name.startswith("sft"):
            rng = random.Random(cfg.seed * 1000 + 3)  # the same question stream as the GRPO arms
            sample = lambda step: ([train[rng.randrange(len(train))] for _ in range(cfg.prompts)], [mode] * cfg.prompts)
            sft_train(model, tok, sample, cfg.steps, cfg.lr_sft, device, name, cfg.log_every)
        else:
            curves[name] = grpo_train(model, base, tok, train, mode, cfg, device, name)
        arms[name] = evaluate(model, tok, train, test, ood, mode, cfg, device, cfg.seed)
        times[f"{name}_time_s"] = time.process_time() - t_arm
    times["cpu_time_s"] = time.process_time() - t0
    print_table(arms)
    log(f"CPU time {times['cpu_time_s']:.1f} s (process time)")
    results = {"config": dataclasses.asdict(cfg), "arms": arms, "reward_curves": curves, "timing": times}
    save_json(os.path.join(cfg.out, "results.json"), results)
    return results


def main(argv=None):
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main()
