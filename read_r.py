"""ReAd-R on AdsQA: reflect, then answer — arXiv 2509.08621 (https://arxiv.org/abs/2509.08621)

AdsQA asks what an ad means, not what it shows (tasks: visual concepts VU, emotion ER, theme TE,
persuasion PS, audience AM). ReAd-R first gathers the clues in <think>…</think>, then answers in
<answer>…</answer>; GRPO trains it on a rule reward alone (no reasoning traces). The claim in
miniature: where the answer needs two hops through the ad, reflection is needed, and RL (not SFT on
answers) is what makes a base that can reflect use its reflection.

The toy ad (marks redrawn for every ad, so no answer can be memorised): 4 cue frames [mark, cue],
each cue once (joke, skull, crowd, trophy: humour, fear, social proof, aspiration), and a product
frame [m, P] carrying the mark m of one cue frame; the 5 frames are shuffled. Question types (the
AdsQA task each stands for):
    product_mark (VU)  the product's mark m                     one hop
    mark_cue     (PS)  the cue beside a given mark              one hop
    cue_theme    (TE)  THEME[P][C] for a given cue C            one hop (THEME: a 4×4 Latin square)
    two_hop      (TE)  THEME[P][C], C the cue beside m          P → m → C, then the table (headline)
The model: a 1-layer transformer whose input at t adds the embedding of the previous word (a
built-in previous-token head), so a token can make one attention hop. The two-hop think trace is
"m C"; the answer token after "m" can make the second hop itself, so m is the part of the chain
the answer cannot do without. chain rate: the think block holds m and no other mark and no wrong
cue (so "m" and "m C" count); full chain rate: "m C".

Key equations (symbols as in the code):
    s = judge(pred, gold): 1 every gold slot stated; 0.5 at least half and nothing contradicted;
        0 otherwise; a slot stated with two values (a hedge) is contradicted; a 1 or 0.5 answer
        more than 5× longer than the reference scores 0.1                        answer_reward
    r = 0.9 · s + 0.1 · 1[<think>, </think>, <answer>, </answer> all present]     total_reward
    Â_i = (r_i − mean_G r) / (std_G r + 1e-6)                                     group_normalize
    ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1 ± ε)) + c_KL · k3(π_θ ‖ π_ref), token mean  grpo_loss
    strict = mean 1[s = 1];  relaxed = mean 1[s ≥ 0.5]                            strict_relaxed
Gates, measured before any RL on every seed: the model trained from scratch on fresh ads (600 × 64
questions of every type) answering at once vs after the think traces; the base's chain rate at
temperature 1 and its two-hop accuracy. The base: one-hop questions with and without their traces
until its one-hop accuracy reaches 0.95 (at most 1500 steps), then a warm-start step that adds 4
two-hop traces and 4 direct two-hop answers. Arms from the base, 150 steps each of one question
stream (16 questions a step) over 24 training ads (96 questions): sft (SFT on direct answers),
sft_trace (SFT on the traces: the upper bound), rl_think (GRPO, 8 samples a question, its own think
block), rl_nothink (GRPO answering at once: an empty think block prefilled). Every arm has the same
answer budget: one word, then the environment closes the answer block (that token is no action).
Run:  python read_r.py  (3 seeds, 0-2);  --seeds 1;  --steps 300;  --smoke

Re-run at the end on an otherwise idle core (one thread): 173 s wall, the same numbers.
Measured (default run, 3 seeds, 1 thread on a 2-core CPU shared with 7 other jobs: 195 s CPU
(user + sys), 11 min wall; not timed on a quiet machine, where the CPU time suggests ~3.5 min).
Test: 250 ads, one question of each type; greedy; mean of 3 seeds.
    arm          strict  prod_mark  mark_cue  cue_theme  two_hop  train   chain  full  scramble
    base          0.753     1.000     0.999      1.000    0.012  0.753   0.968  0.003   -0.051
    base_direct   0.687     1.000     0.741      1.000    0.007  0.677       —      —        —
    sft           0.718     0.964     0.728      0.985    0.193  0.983       —      —        —
    sft_trace     0.861     0.976     0.979      0.991    0.497  0.927   0.796  0.644    0.375
    rl_think      0.806     0.995     0.977      0.969    0.283  0.837   0.927  0.000    0.171
    rl_nothink    0.683     0.985     0.736      0.937    0.072  0.778       —      —        —
(relaxed = strict: every answer is one slot; chain rates at T = 1 on the test two-hop questions;
scramble = two-hop accuracy minus that with the think block replaced by random frame words.)
Two-hop accuracy per seed (0, 1, 2): rl_think 0.824 / 0.000 / 0.024; rl_nothink 0.216 / 0.000 /
0.000; sft 0.200 / 0.164 / 0.216; sft_trace 0.968 / 0.360 / 0.164; base 0.032 / 0.000 / 0.004.
Gates per seed: answering at once 0.256 / 0.264 / 0.228 (chance 0.25: met); after think traces
1.000 / 0.284 / 1.000 (seed 1 still on its plateau at 600 steps); base chain rate 0.988 / 0.984 /
0.932 (≥ 0.05: met) with two-hop accuracy 0.032 / 0.000 / 0.004 (low: met); base steps 450 / 1500
(not ready at the cap) / 700.
Headline, two-hop strict: rl_think − rl_nothink = 0.211 ± 0.281 (worst seed 0.000); rl_think
0.283 ± 0.383 (worst 0.000); scramble drop 0.171 ± 0.256 (worst −0.016); chain rate 0.968 → 0.927
(−0.041 ± 0.051); full chain "m C" 0.003 → 0.000; accuracy given the chain 0.021 → 0.262.
Goals: +0.2 over rl_nothink met on the mean, not on the worst seed; scramble drop ≥ 0.3 met on
seed 0 only (0.53, from the mean, std and worst); chain rate rising: not met. Reproduced on seed 0
only (two-hop 0.824 vs 0.216, chain 0.99 in its last rollouts); seeds 1 and 2 stay at 0.0–0.02.
Why, with numbers: the base writes m at once on 93–99 % of two-hop questions (the product_mark
trace "m" transfers), so the chain rate has no room to rise; what the base lacks is the answer
after m — its accuracy given the chain is 0.02 (it answers with a mark, as product_mark does). On
seed 0 a few theme answers give GRPO a signal and accuracy given the chain climbs to 0.8; on seeds
1 and 2 every sample of a two-hop group scores 0, so the group-normalised advantage is 0 and
nothing is learnt. RL never writes "m C": the answer token makes the second hop itself. sft on 96
direct answers overfits (train 0.98, two-hop test 0.19: it memorised the training ads).
Found while building (facts, not tuned away): answering at once, a 1-layer model did not learn
mark_cue in 1000 steps alone (0.2–0.3) but did when trained beside the think traces; unsolvable
direct two-hop questions in the base's mix stalled cue_theme; with the product_mark trace "P"
instead of "m" the base wrote the chain 0.8 % of the time and RL did not find it (0 after 150
steps).

Deviations from the paper (and its official code: TsinghuaC3I/AdsQA on EasyR1):
- symbolic 5-frame ads and a 1-layer, 4-head, d = 64 transformer without positions, with a
  previous-word input feature, instead of 8 video frames and Qwen2.5-VL-7B;
- a rule judge over answer slots instead of the GPT-4o judge; over-long = 5× the reference in
  words (official: 100× in characters); no answer block → the whole response is judged (as there);
- one-word answers: relaxed equals strict here (the 0.5 rule is tested on two-slot answers);
- the base is trained here (one-hop questions + a 4-trace warm-start) to stand in for a pretrained
  model that can reason; it stops at 0.95 one-hop accuracy;
- GRPO: lr 1e-3 (paper 1e-6), 16 questions × 8 samples a step, one update per batch (π_old = π_θ,
  so the clip never binds), c_KL 0.01 with verl's clamped low_var_kl; temperature 1;
- the answer block is closed by the environment after one word in every arm; rl_nothink prefills
  an empty think block (format reward 1); sft_trace is an extra upper-bound arm;
- evaluation is greedy; chain rates are measured at temperature 1.
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
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken
import datasets

ARMS = ("sft", "sft_trace", "rl_think", "rl_nothink")


@dataclasses.dataclass
class Config:
    """Gates, a base that sometimes reflects, then SFT vs GRPO with / without thinking on ads."""

    steps: int = 150  # steps per arm (GRPO: one rollout batch; SFT: a batch of the same questions)
    seed: int = 0  # first random seed
    seeds: int = 3  # seeds run one after another (seed, seed + 1, ...)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines: frames (10 words), type, arg, answer, chain; replaces train/test
    out: str = "runs/read_r"  # folder for results.json and read_r.png
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 50  # steps between log lines
    gate_steps: int = 600  # steps of each gate model (direct / think traces, fresh ads)
    base_steps: int = 1500  # most steps of the base (one-hop questions, with and without think)
    base_target: float = 0.95  # the base stops once its one-hop accuracy (96 checks) reaches it
    warm_traces: int = 4  # two-hop think traces of the base's warm-start (fresh ads)
    warm_batch: int = 4  # two-hop traces (and as many direct answers) a warm-start step
    batch: int = 64  # sequences per step of the gates, the base and its warm-start
    n_train: int = 24  # training ads (one question of each type): small, as AdsQA's split
    n_test: int = 250  # held-out ads (one question of each type)
    prompts: int = 16  # questions per arm step (GRPO prompts; SFT batch)
    group: int = 8  # G: GRPO samples per question
    temperature: float = 1.0  # GRPO sampling temperature (and of the chain-rate measurement)
    kl_coef: float = 0.01  # c_KL on verl's low_var_kl to the base (paper: 0.01)
    clip_eps: float = 0.2  # ε of the clipped surrogate
    lr_base: float = 3e-3  # Adam learning rate of the gates, the base and its warm-start
    lr_sft: float = 1e-3  # Adam learning rate of the SFT arms
    lr_rl: float = 1e-3  # Adam learning rate of the GRPO arms (paper: 1e-6 on a 7B model)
    d_model: int = 64  # transformer width
    n_layers: int = 1  # transformer layers: one attention hop per written token
    n_heads: int = 4  # attention heads
    max_think: int = 4  # longest think block the policy may write (words)
    answer_words: int = 1  # answer budget in words, the same for every arm (then </answer>)

    def __post_init__(self):
        require(self.log_every > 0, f"--log-every {self.log_every}: must be positive")
        positive = ("seeds", "gate_steps", "base_steps", "warm_batch", "batch", "n_train",
                    "n_test", "prompts", "d_model", "n_layers", "n_heads", "max_think",
                    "answer_words")
        for name in positive:
            value = getattr(self, name)
            require(value > 0, f"--{name.replace('_', '-')} {value}: must be positive")
        require(self.warm_traces >= 0, f"--warm-traces {self.warm_traces}: must be >= 0")
        require(self.group >= 2, f"--group {self.group}: GRPO needs at least 2 samples a question")
        require(self.d_model % self.n_heads == 0,
                f"--d-model {self.d_model}: must be divisible by --n-heads {self.n_heads}")
        require(self.temperature > 0, f"--temperature {self.temperature}: must be positive")
        require(0 < self.base_target <= 1, f"--base-target {self.base_target}: must be in (0, 1]")
        for name in ("kl_coef", "clip_eps", "lr_base", "lr_sft", "lr_rl"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value),
                    f"--{name.replace('_', '-')} {value}: must be a finite number >= 0")


# --- data ---

N_MARKS = 24
MARKS = [f"m{i}" for i in range(N_MARKS)]  # frame marks, drawn fresh for every ad
PRODUCTS = ["car", "soda", "phone", "shoe"]
CUES = ["joke", "skull", "crowd", "trophy"]  # the cues of humour, fear, social proof, aspiration
THEMES = ["freedom", "safety", "belonging", "status"]
# THEME[p][c]: a 4×4 Latin square, so neither the product alone nor the cue alone tells the theme
LATIN = [[0, 1, 2, 3], [1, 3, 0, 2], [2, 0, 3, 1], [3, 2, 1, 0]]
THEME = [[THEMES[j] for j in row] for row in LATIN]
NONE = "none"  # the question's argument when it has none
# question types, with the AdsQA task each stands for: VU (visual concept), PS (persuasion),
# TE (theme) given the cue, and the headline TE in two hops
TYPES = ("product_mark", "mark_cue", "cue_theme", "two_hop")
SLOT_OF = {**{w: "mark" for w in MARKS}, **{w: "product" for w in PRODUCTS},
           **{w: "cue" for w in CUES}, **{w: "theme" for w in THEMES}}
WORDS = MARKS + PRODUCTS + CUES + THEMES + [NONE]
SPECIALS = ["<pad>", "<bos>", "<think>", "</think>", "<answer>", "</answer>", "<reason>",
            "<direct>"] + [f"<{t}>" for t in TYPES]
PREFILL = {"reason": ["<think>"], "direct": ["<think>", "</think>", "<answer>"]}


def word_encoding(words, specials):
    """An offline tiktoken.Encoding over a closed vocabulary (the stock ones download their files).

    Ranks: the 256 single bytes, then every prefix of every word (with and without a leading
    space), so BPE merges each vocabulary word into one token; unknown text still encodes, byte by
    byte. `specials` (tags such as "<think>") become special tokens: encode with
    allowed_special="all".
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
    """tiktoken over the closed vocabulary; the model's compact ids are SPECIALS, then WORDS."""

    def __init__(self):
        self.enc = word_encoding(WORDS, SPECIALS)
        self.vocab = SPECIALS + WORDS
        self.n_specials = len(SPECIALS)  # ids >= n_specials are words, the rest are tags
        self.enc_ids = [self.enc.encode_single_token(self.render([w])) for w in self.vocab]
        self.compact = {e: i for i, e in enumerate(self.enc_ids)}
        self.id = {w: i for i, w in enumerate(self.vocab)}

    @staticmethod
    def render(words):
        """A space before each word, none before a tag: "<think> m3 joke</think>"."""
        return "".join(w if w.startswith("<") else " " + w for w in words)

    def encode(self, words):
        raw = self.enc.encode(self.render(words), allowed_special="all")
        ids = [self.compact.get(e) for e in raw]
        require(len(ids) == len(words) and None not in ids, f"unknown word in: {' '.join(words)}")
        return ids

    def decode(self, ids):
        return self.enc.decode([self.enc_ids[i] for i in ids])


def make_ad(rng):
    """One ad: 4 cue frames (each cue once, a fresh mark each) and a product frame that carries
    the mark of one cue frame; frames are [mark, item] pairs in random order."""
    marks = rng.sample(MARKS, len(CUES))  # marks[c]: the mark beside cue c
    product = rng.randrange(len(PRODUCTS))
    cue = rng.randrange(len(CUES))  # the cue frame that shares its mark with the product
    frames = [[marks[c], CUES[c]] for c in range(len(CUES))] + [[marks[cue], PRODUCTS[product]]]
    rng.shuffle(frames)
    return {"frames": frames, "product": product, "cue": cue, "marks": marks}


def question(ad, qtype, asked):
    """One question as a row: frames (10 words), type, arg, gold answer and the think trace.

    product_mark: the product's mark m                          trace "m"
    mark_cue:     the cue beside the mark of cue frame `asked`  trace "m' C'"
    cue_theme:    THEME[product][cue `asked`]                   trace "C'"
    two_hop:      THEME[product][C], C the cue beside m         trace "m C"
    """
    m = ad["marks"][ad["cue"]]
    product = ad["product"]
    frames = " ".join(w for frame in ad["frames"] for w in frame)
    arg = NONE
    if qtype == "product_mark":
        answer = m
        chain = [m]
    elif qtype == "mark_cue":
        arg = ad["marks"][asked]
        answer = CUES[asked]
        chain = [arg, CUES[asked]]
    elif qtype == "cue_theme":
        arg = CUES[asked]
        answer = THEME[product][asked]
        chain = [arg]
    else:
        answer = THEME[product][ad["cue"]]
        chain = [m, CUES[ad["cue"]]]
    return {"frames": frames, "type": qtype, "arg": arg, "answer": answer, "chain": " ".join(chain)}


def prompt_words(row, mode):
    """<bos>, 10 frame words, <type>, arg, <mode>, then the prefill: <think> (or an empty think
    block and <answer>: the direct mode answers at once)."""
    question_words = [f"<{row['type']}>", row["arg"], f"<{mode}>"]
    return ["<bos>"] + row["frames"].split() + question_words + PREFILL[mode]


def target_words(row, mode):
    """The response after the prefill, as SFT imitates it:
    [chain </think> <answer>] answer </answer>."""
    think = []
    if mode == "reason":
        think = row["chain"].split() + ["</think>", "<answer>"]
    return think + row["answer"].split() + ["</answer>"]


def make_rows(rng, n_ads):
    """One question of each type about each of n_ads fresh ads."""
    rows = []
    for _ in range(n_ads):
        ad = make_ad(rng)
        for qtype in TYPES:
            rows.append(question(ad, qtype, rng.randrange(len(CUES))))
    return rows


def fresh_batch(rng, n, types, modes):
    """n questions about fresh ads: a type from `types`, a mode from `modes` (two_hop: its own)."""
    rows = []
    chosen = []
    for _ in range(n):
        qtype = rng.choice(types)
        rows.append(question(make_ad(rng), qtype, rng.randrange(len(CUES))))
        chosen.append(rng.choice(modes[qtype]))
    return rows, chosen


def load_rows(cfg, seed):
    """Train and test rows: generated ads, or --data (a JSON-lines file, split 80/20)."""
    if not cfg.data:
        rng = random.Random(seed * 1000 + 1)
        train = make_rows(rng, cfg.n_train)
        test = make_rows(rng, cfg.n_test)
        return train, test
    columns = ["frames", "type", "arg", "answer", "chain"]
    dataset = load_user_data(cfg.data, columns)
    rows = [{k: str(r[k]) for k in columns} for r in dataset]
    for i, row in enumerate(rows, 1):
        where = f"--data {cfg.data}, row {i}"
        require(row["type"] in TYPES, f"{where}: type '{row['type']}' is not one of {TYPES}")
        require(len(row["frames"].split()) == 10, f"{where}: frames must hold 10 words")
        words = row["frames"].split() + [row["arg"]] + row["answer"].split() + row["chain"].split()
        unknown = [w for w in words if w not in WORDS]
        require(not unknown, f"{where}: unknown word '{unknown[0] if unknown else ''}'")
    n_train = max(1, int(0.8 * len(rows)))
    return rows[:n_train], rows[n_train:] or rows[:1]


# --- model ---


class KV(NamedTuple):
    k: torch.Tensor  # (B, nh, T, hs)
    v: torch.Tensor  # (B, nh, T, hs)


class Cache(NamedTuple):
    kv: list  # one KV per layer
    last_word: torch.Tensor  # (B,): the last word seen so far (tags are skipped)


def previous_word(tokens, is_word, first):
    """The last word strictly before each position, tags skipped: (N, T) → (N, T).

    first (N,): the word before the sequence starts (the cache's last word, or a pad id).
    """
    if tokens.shape != is_word.shape or first.shape != tokens.shape[:1]:
        raise ValueError(f"previous_word: tokens, is_word (N, T) and first (N,) expected, got "
                         f"{tuple(tokens.shape)}, {tuple(is_word.shape)}, {tuple(first.shape)}")
    n, t = tokens.shape
    pos = torch.arange(t, device=tokens.device).expand(n, t)  # (N, T)
    word_pos = torch.where(is_word, pos, -1)  # (N, T)
    last = torch.cummax(word_pos, dim=1).values  # (N, T): the last word at or before t
    before = F.pad(last[:, :-1], (1, 0), value=-1)  # (N, T): the last word strictly before t
    prev = tokens.gather(1, before.clamp(min=0))  # (N, T)
    return torch.where(before >= 0, prev, first[:, None])  # (N, T)


class Block(nn.Module):
    """Pre-LN attention and MLP."""

    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, kv=None):
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x))  # (B, T, 3d)
        qkv = qkv.view(b, t, 3, self.n_heads, d // self.n_heads)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        if kv is not None:  # KV cache: keys and values of all earlier positions; T = 1 new token
            k = torch.cat([kv.k, k], 2)  # (B, nh, T0 + 1, hs)
            v = torch.cat([kv.v, v], 2)  # (B, nh, T0 + 1, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=kv is None)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, d)
        return x + self.mlp(self.ln2(x)), KV(k, v)


class GPT(nn.Module):
    """A small causal transformer without positions; the input at t is the token's embedding plus
    the embedding of the previous word (a built-in previous-token head), tied output embedding."""

    def __init__(self, vocab, n_specials, d, n_layers, n_heads):
        super().__init__()
        self.n_specials = n_specials  # ids below are tags, which the previous-word feature skips
        self.tok = nn.Embedding(vocab, d)
        self.prev = nn.Embedding(vocab, d)  # the previous word's embedding
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.prev.weight, std=0.02)

    def forward(self, idx, cache=None):
        is_word = idx >= self.n_specials  # (B, T)
        first = idx.new_zeros(idx.shape[0]) if cache is None else cache.last_word  # (B,) 0 = pad
        prev = previous_word(idx, is_word, first)  # (B, T)
        x = self.tok(idx) + self.prev(prev)  # (B, T, d)
        new_kv = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if cache is None else cache.kv[i])
            new_kv.append(kv)
        last_word = torch.where(is_word[:, -1], idx[:, -1], prev[:, -1])  # (B,)
        logits = self.ln(x) @ self.tok.weight.T  # (B, T, V)
        return logits, Cache(new_kv, last_word)


@torch.no_grad()
def generate(model, prompt, max_new, ids, answer_words, temperature=1.0, greedy=False):
    """KV-cache decoding. prompt (N, P) → tokens, alive, chosen: (N, max_new) each.

    alive: the token belongs to the response (up to and incl. </answer>); chosen: alive and picked
    by the policy; the answer block is closed by the environment (a forced </answer>, not chosen)
    once it holds `answer_words` words, so every arm has the same answer budget.
    """
    logits, cache = model(prompt)  # prefill: (N, P, V)
    n = prompt.shape[0]
    done = torch.zeros(n, dtype=torch.bool, device=prompt.device)  # (N,)
    in_answer = prompt[:, -1] == ids["<answer>"]  # (N,)
    n_answer = torch.zeros(n, dtype=torch.long, device=prompt.device)  # (N,) answer words so far
    tokens = []
    alive = []
    chosen = []
    for t in range(max_new):
        last = logits[:, -1].float()  # (N, V)
        if greedy:
            sampled = last.argmax(-1)  # (N,)
        else:
            sampled = torch.multinomial(F.softmax(last / temperature, -1), 1)[:, 0]  # (N,)
        forced = in_answer & (n_answer >= answer_words)  # (N,)
        tok = torch.where(forced, torch.full_like(sampled, ids["</answer>"]), sampled)  # (N,)
        tok = torch.where(done, torch.full_like(tok, ids["<pad>"]), tok)  # (N,)
        alive.append(~done)
        chosen.append(~done & ~forced)
        tokens.append(tok)
        n_answer = n_answer + (in_answer & (tok >= model.n_specials)).long()
        in_answer = in_answer | (tok == ids["<answer>"])
        done = done | (tok == ids["</answer>"])
        if t == max_new - 1 or bool(done.all()):
            break
        logits, cache = model(tok[:, None], cache)  # one new position: (N, 1, V)
    fill = max_new - len(tokens)
    tokens = F.pad(torch.stack(tokens, 1), (0, fill), value=ids["<pad>"])  # (N, max_new)
    alive = F.pad(torch.stack(alive, 1), (0, fill), value=False)  # (N, max_new)
    chosen = F.pad(torch.stack(chosen, 1), (0, fill), value=False)  # (N, max_new)
    return tokens, alive, chosen


def response_logp(model, prompt, tokens):
    """log π(y_t | x, y_<t) of each response token: (N, T) from prompt (N, P) and tokens (N, T)."""
    logits, _ = model(torch.cat([prompt, tokens], 1)[:, :-1])  # (N, P + T − 1, V)
    logits = logits[:, prompt.shape[1] - 1:].float()  # (N, T, V): predictions of the response
    return F.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]  # (N, T)


# --- the paper's method ---


class ChainCheck(NamedTuple):
    chain: bool  # the think block holds m, and names no other mark and no wrong cue
    full: bool  # ... and names C after m: the whole chain "m C"


def format_reward(text):
    """1 iff <think>, </think>, <answer> and </answer> all appear (as the official code), else 0."""
    return float(all(tag in text for tag in ("<think>", "</think>", "<answer>", "</answer>")))


def block(text, tag):
    """The words inside the first <tag>…</tag>, or None when there is none."""
    found = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S)
    if found is None:
        return None
    return found.group(1).split()


def answer_reward(pred, gold, slot_of):
    """The rule judge standing in for the LLM judge: 1 / 0.5 / 0, and 0.1 for a right (or half
    right) answer more than 5× longer than the reference.

    slot_of: word → slot ("theme", "mark", ...); a word outside it is a slot of its own.
    """
    said = pred.split()
    wanted = gold.split()
    if not wanted:
        raise ValueError("answer_reward: the gold answer is empty")
    right = 0
    contradicted = 0
    for x in wanted:
        # the values the answer states for x's slot; two of them (a hedge) count as a contradiction
        stated = {w for w in said if slot_of.get(w, w) == slot_of.get(x, x)}
        right += stated == {x}
        contradicted += bool(stated - {x})
    # 1: all key information; 0.5: at least half of it and nothing contradicts; 0 otherwise
    score = 0.0
    if right == len(wanted):
        score = 1.0
    elif 2 * right >= len(wanted) and contradicted == 0:
        score = 0.5
    # an answer more than 5× longer than the reference scores 0.1 instead of 1 or 0.5
    if score > 0 and len(said) > 5 * len(wanted):
        return 0.1
    return score


def judge(text, gold, slot_of):
    """The judge's score of a response: its answer block, or (none) all of it, tags removed."""
    answer = block(text, "answer")
    if answer is None:
        return answer_reward(re.sub(r"<[^<>]*>", " ", text), gold, slot_of)
    return answer_reward(" ".join(answer), gold, slot_of)


def total_reward(text, gold, slot_of):
    """r = 0.9 · judge + 0.1 · format (the paper's reward: no reflection or length term)."""
    return 0.9 * judge(text, gold, slot_of) + 0.1 * format_reward(text)


def strict_relaxed(scores):
    """strict = share of judge scores equal to 1; relaxed = share >= 0.5."""
    if not scores:
        return 0.0, 0.0
    strict = sum(s == 1.0 for s in scores) / len(scores)
    relaxed = sum(s >= 0.5 for s in scores) / len(scores)
    return strict, relaxed


def chain_correct(think, mark, cue, slot_of):
    """Does a think block hold the two-hop chain: the product's mark m (the hop the answer token
    cannot make), then at most the cue C beside it, and no other mark or cue (a list of every
    mark is not a chain)? full: the whole chain "m C" (both hops written out)."""
    marks = [w for w in think if slot_of.get(w) == "mark"]
    cues = [w for w in think if slot_of.get(w) == "cue"]
    if set(marks) != {mark} or not set(cues) <= {cue}:
        return ChainCheck(False, False)
    full = cues != [] and think.index(mark) < think.index(cue)
    return ChainCheck(not cues or full, full)


def group_normalize(rewards):
    """GRPO's advantage: r̂ = (r − mean_G r) / (std_G r + 1e-6) within each group of one prompt.

    rewards: (B, G) → (B, G), std unbiased as in verl. A group of equal rewards gets r̂ = 0; a group
    of one sample (G = 1) gets mean 0 and std 1, as verl does, so r̂ = r / (1 + 1e-6).
    """
    if rewards.dim() != 2:
        raise ValueError(f"group_normalize: rewards must be (B, G), got {tuple(rewards.shape)}")
    if rewards.shape[1] == 1:
        mean = torch.zeros_like(rewards)  # (B, 1)
        std = torch.ones_like(rewards)  # (B, 1)
    else:
        mean = rewards.mean(dim=1, keepdim=True)  # (B, 1)
        std = rewards.std(dim=1, keepdim=True)  # (B, 1)
    return (rewards - mean) / (std + 1e-6)


def grpo_loss(logp, old_logp, ref_logp, mask, adv, clip_eps=0.2, kl_coef=0.001, kl_clamp=True):
    """GRPO (arXiv 2402.03300) as verl computes it: token-mean clipped surrogate + k3 KL to π_ref.

    logp, old_logp, ref_logp, mask: (N, T) over response tokens; adv: (N,) = Â, the group-normalised
    reward, broadcast to every token of its response. kl_clamp=True is verl's `low_var_kl`;
    kl_clamp=False is the plain, unclamped k3 (a labelled variant, not what verl runs).
    """
    if logp.dim() != 2 or adv.shape != logp.shape[:1]:
        raise ValueError(f"grpo_loss: logp (N, T) and adv (N,) expected, got "
                         f"{tuple(logp.shape)} and {tuple(adv.shape)}")
    if not logp.shape == old_logp.shape == ref_logp.shape == mask.shape:
        raise ValueError("grpo_loss: logp, old_logp, ref_logp and mask must have one shape (N, T)")
    # ρ_t = π_θ(y_t) / π_old(y_t): how far this update has moved from the policy that sampled y
    ratio = torch.exp(logp - old_logp)  # (N, T)
    a = adv[:, None]  # (N, 1): Â_i for every token of response i
    # ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1 − ε, 1 + ε)): the pessimistic of the two, so the update gains
    # nothing from pushing ρ_t past 1 ± ε in the direction Â favours
    pg_loss1 = -a * ratio  # (N, T)
    pg_loss2 = -a * ratio.clamp(1 - clip_eps, 1 + clip_eps)  # (N, T)
    pg = torch.maximum(pg_loss1, pg_loss2)  # (N, T)
    # k3 estimate of KL(π_θ ‖ π_ref) from tokens sampled by π_θ: e^u − u − 1 ≥ 0,
    # u = log π_ref − log π_θ
    u = ref_logp - logp  # (N, T)
    if kl_clamp:
        u = u.clamp(-20, 20)  # verl low_var_kl: log-ratio clamped to ±20 ...
    kl = torch.exp(u) - u - 1  # (N, T)
    if kl_clamp:
        kl = kl.clamp(-10, 10)  # ... and the estimate to ±10
    # token-mean: every response token of the batch weighs the same
    n_tokens = mask.sum().clamp(min=1)
    pg_loss = (pg * mask).sum() / n_tokens
    kl_loss = (kl * mask).sum() / n_tokens
    clipped = ((ratio - 1).abs() > clip_eps).float()  # (N, T)
    clip_frac = (clipped * mask).sum() / n_tokens
    loss = pg_loss + kl_coef * kl_loss
    stats = {"pg_loss": pg_loss.detach(), "kl": kl_loss.detach(), "clip_frac": clip_frac.detach()}
    return loss, stats


# --- training ---


def batch_tensors(tok, rows, modes, device):
    """Prompt + SFT target of each row, right-padded: tokens x (B, L), response mask m (B, L)."""
    seqs = []
    masks = []
    for row, mode in zip(rows, modes):
        prompt = tok.encode(prompt_words(row, mode))
        target = tok.encode(target_words(row, mode))
        seqs.append(prompt + target)
        masks.append([0] * len(prompt) + [1] * len(target))
    longest = max(len(s) for s in seqs)
    pad = tok.id["<pad>"]
    x = torch.tensor([s + [pad] * (longest - len(s)) for s in seqs], device=device)  # (B, L)
    m = torch.tensor([s + [0] * (longest - len(s)) for s in masks], device=device)  # (B, L)
    return x, m.float()


def sft_loss(model, x, m):
    """Teacher-forced cross-entropy, a mean over the response tokens. x, m: (B, L)."""
    logits, _ = model(x[:, :-1])  # (B, L − 1, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (B, L − 1)
    mask = m[:, 1:]  # (B, L − 1): 1 on the tokens to predict
    return (ce * mask).sum() / mask.sum()


def update(opt, model, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def fresh_sampler(rng, n, types, modes):
    """sample(step) → n questions about fresh ads (unlimited data), with their modes."""
    def sample(step):
        return fresh_batch(rng, n, types, modes)
    return sample


def base_sampler(rng, n, one_hop_steps, n_warm):
    """The base's data: n one-hop questions a step (with or without their think trace); after
    one_hop_steps, the warm-start adds n_warm two-hop questions with their think trace and
    n_warm answered at once (a guess, which teaches the direct answer's form)."""
    modes = {t: ["reason", "direct"] for t in TYPES}
    def sample(step):
        rows, chosen = fresh_batch(rng, n, TYPES[:3], modes)
        if step > one_hop_steps:
            for mode in ("reason", "direct"):
                warm_rows, warm_modes = fresh_batch(rng, n_warm, ["two_hop"], {"two_hop": [mode]})
                rows += warm_rows
                chosen += warm_modes
        return rows, chosen
    return sample


def question_stream(rows, prompts, seed):
    """The training questions every arm sees, in one order: `prompts` rows a step."""
    rng = random.Random(seed * 1000 + 3)
    while True:
        yield [rows[rng.randrange(len(rows))] for _ in range(prompts)]


def stream_sampler(stream, mode):
    """sample(step) → the stream's next questions, all in one mode."""
    def sample(step):
        rows = next(stream)
        return rows, [mode] * len(rows)
    return sample


def sft_train(model, tok, sample, steps, lr, device, name, log_every, opt=None, ready=None):
    """SFT: sample(step) → (rows, modes); Adam on the response tokens' cross-entropy. Stops
    early when ready(model) (checked every log_every steps); returns the optimizer and the steps
    taken."""
    if opt is None:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.time()
    n_tokens = 0
    for step in range(1, steps + 1):
        rows, modes = sample(step)
        x, m = batch_tensors(tok, rows, modes, device)
        with autocast(device):
            loss = sft_loss(model, x, m)
        check_finite(step, loss=loss.detach())
        update(opt, model, loss)
        n_tokens += x.numel()
        if step % log_every == 0 or step == steps:
            log_progress(step, steps, start, arm=name, loss=loss.item(),
                         tok_per_s=n_tokens / (time.time() - start))
            if ready is not None and ready(model):
                log(f"{name}: ready after {step} steps")
                return opt, step
    return opt, steps


def response_budget(mode, max_think, answer_words):
    """Tokens a response may take: [think words, </think>, <answer>,] answer words, </answer>."""
    answer = answer_words + 1
    if mode == "reason":
        return max_think + 2 + answer
    return answer


def repeat_rows(rows, times):
    repeated = []
    for row in rows:
        repeated += [row] * times
    return repeated


def respond(model, tok, rows, mode, cfg, device, greedy):
    """One response per row: prompt (N, P), tokens (N, T), chosen (N, T) and the texts (from the
    prefill on)."""
    ids = [tok.encode(prompt_words(r, mode)) for r in rows]
    prompt = torch.tensor(ids, device=device)  # (N, P)
    budget = response_budget(mode, cfg.max_think, cfg.answer_words)
    with autocast(device):
        tokens, alive, chosen = generate(model, prompt, budget, tok.id, cfg.answer_words,
                                         cfg.temperature, greedy)  # (N, T) each
    prefix = tok.render(PREFILL[mode])
    texts = [prefix + tok.decode(t[a].tolist()) for t, a in zip(tokens, alive)]
    return prompt, tokens, chosen, texts


def chain_hits(texts, rows):
    """For each two-hop row, the ChainCheck of its response's think block."""
    hits = []
    for text, row in zip(texts, rows):
        if row["type"] == "two_hop":
            mark, cue = row["chain"].split()
            hits.append(chain_correct(block(text, "think") or [], mark, cue, SLOT_OF))
    return hits


def grpo_train(model, ref, tok, rows, mode, cfg, device, name, seed):
    """GRPO on the rule reward: G samples a question, group-normalised reward, clipped surrogate
    and k3 KL to the base; returns the reward and the chain counts of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr_rl)
    stream = question_stream(rows, cfg.prompts, seed)
    curve = {"reward": [], "chain_hits": [], "full_chain_hits": [], "chain_n": []}
    start = time.time()
    n_samples = 0
    for step in range(1, cfg.steps + 1):
        batch = repeat_rows(next(stream), cfg.group)  # B·G rows: G samples of each question
        model.eval()
        prompt, tokens, chosen, texts = respond(model, tok, batch, mode, cfg, device, greedy=False)
        model.train()
        # r = 0.9 · judge + 0.1 · format, then Â = group-normalised r
        rewards = [total_reward(t, r["answer"], SLOT_OF) for t, r in zip(texts, batch)]
        rewards = torch.tensor(rewards, device=device)  # (B·G,)
        adv = group_normalize(rewards.view(cfg.prompts, cfg.group)).view(-1)  # (B·G,)
        with autocast(device):
            logp = response_logp(model, prompt, tokens)  # (B·G, T)
            with torch.no_grad():
                ref_logp = response_logp(ref, prompt, tokens)  # (B·G, T)
        # one update per rollout batch, so π_old = π_θ (ρ = 1); the forced </answer> is no action
        loss, stats = grpo_loss(logp, logp.detach(), ref_logp, chosen.float(), adv,
                                cfg.clip_eps, cfg.kl_coef)
        check_finite(step, loss=loss.detach(), **stats)
        update(opt, model, loss)
        hits = chain_hits(texts, batch)
        curve["reward"].append(rewards.mean().item())
        curve["chain_hits"].append(sum(h.chain for h in hits))
        curve["full_chain_hits"].append(sum(h.full for h in hits))
        curve["chain_n"].append(len(hits))
        n_samples += len(texts)
        if step % cfg.log_every == 0 or step == cfg.steps:
            window = slice(-cfg.log_every, None)
            chain = sum(curve["chain_hits"][window]) / max(1, sum(curve["chain_n"][window]))
            log_progress(step, cfg.steps, start, arm=name, loss=loss.item(),
                         reward=rewards.mean().item(), kl=stats["kl"].item(), chain_rate=chain,
                         samples_per_s=n_samples / (time.time() - start))
    return curve


# --- evaluation ---


def one_hop_accuracy(model, tok, rows, cfg, device):
    """Greedy strict accuracy over rows, with and without thinking (the base's readiness)."""
    scores = []
    for mode in ("reason", "direct"):
        texts = respond(model, tok, rows, mode, cfg, device, greedy=True)[3]
        scores += [judge(t, r["answer"], SLOT_OF) for t, r in zip(texts, rows)]
    return strict_relaxed(scores)[0]


def per_type(rows, scores):
    """{type: {"strict", "relaxed"}} over the rows of each type present."""
    out = {}
    for qtype in TYPES:
        mine = [s for s, r in zip(scores, rows) if r["type"] == qtype]
        if mine:
            strict, relaxed = strict_relaxed(mine)
            out[qtype] = {"strict": strict, "relaxed": relaxed}
    return out


def mean_or_none(values):
    if not values:
        return None
    return sum(values) / len(values)


@torch.no_grad()
def answer_after_think(model, tok, rows, thinks, cfg, device):
    """Greedy answers after a think block forced on each row (the scramble test): texts."""
    texts = [""] * len(rows)
    groups = {}  # rows with one prompt length are decoded together
    for i, (row, think) in enumerate(zip(rows, thinks)):
        words = prompt_words(row, "reason") + think + ["</think>", "<answer>"]
        groups.setdefault(len(words), []).append(i)
    for members in groups.values():
        words = [prompt_words(rows[i], "reason") + thinks[i] + ["</think>", "<answer>"]
                 for i in members]
        prompt = torch.tensor([tok.encode(w) for w in words], device=device)  # (n, P)
        with autocast(device):
            tokens, alive, _ = generate(model, prompt, cfg.answer_words + 1, tok.id,
                                        cfg.answer_words, greedy=True)  # (n, T) each
        for i, t, a in zip(members, tokens, alive):
            forced = tok.render(["<think>"] + thinks[i] + ["</think>", "<answer>"])
            texts[i] = forced + tok.decode(t[a].tolist())
    return texts


@torch.no_grad()
def evaluate(model, tok, train, test, mode, cfg, device, seed):
    """Greedy strict / relaxed per question type on test and train; in the think mode also the
    chain rate (greedy and at the sampling temperature), accuracy given the chain, scramble."""
    model.eval()
    texts = respond(model, tok, test, mode, cfg, device, greedy=True)[3]
    scores = [judge(t, r["answer"], SLOT_OF) for t, r in zip(texts, test)]
    train_texts = respond(model, tok, train, mode, cfg, device, greedy=True)[3]
    train_scores = [judge(t, r["answer"], SLOT_OF) for t, r in zip(train_texts, train)]
    strict, relaxed = strict_relaxed(scores)
    res = {"strict": strict, "relaxed": relaxed, "per_task": per_type(test, scores),
           "train_strict": strict_relaxed(train_scores)[0],
           "train_per_task": {t: v["strict"] for t, v in per_type(train, train_scores).items()}}
    two_hop = [r for r in test if r["type"] == "two_hop"]
    if mode == "reason" and two_hop:
        res["chain_rate_greedy"] = mean_or_none([h.chain for h in chain_hits(texts, test)])
        # the chain rate as the policy samples it (temperature cfg.temperature)
        torch.manual_seed(seed)
        sampled = respond(model, tok, two_hop, mode, cfg, device, greedy=False)[3]
        checks = chain_hits(sampled, two_hop)
        hits = [h.chain for h in checks]
        right = [judge(t, r["answer"], SLOT_OF) == 1.0 for t, r in zip(sampled, two_hop)]
        res["chain_rate"] = mean_or_none(hits)
        res["full_chain_rate"] = mean_or_none([h.full for h in checks])
        res["acc_given_chain"] = {
            "chain": mean_or_none([x for x, h in zip(right, hits) if h]),
            "no_chain": mean_or_none([x for x, h in zip(right, hits) if not h])}
        # scramble: the greedy think block replaced by as many words drawn from the ad's frames
        rng = random.Random(seed)
        thinks = [block(t, "think") or [] for t, r in zip(texts, test) if r["type"] == "two_hop"]
        scrambled = []
        for think, row in zip(thinks, two_hop):
            frame_words = row["frames"].split()
            scrambled.append([rng.choice(frame_words) for _ in think])
        s_texts = answer_after_think(model, tok, two_hop, scrambled, cfg, device)
        s_scores = [judge(t, r["answer"], SLOT_OF) for t, r in zip(s_texts, two_hop)]
        s_strict = strict_relaxed(s_scores)[0]
        res["scramble_two_hop"] = s_strict
        res["scramble_drop"] = res["per_task"]["two_hop"]["strict"] - s_strict
    model.train()
    return res


def average(dicts):
    """The mean over seeds of every number in a list of equally shaped dicts (None skipped)."""
    out = {}
    for key, first in dicts[0].items():
        values = [d[key] for d in dicts]
        if isinstance(first, dict):
            out[key] = average(values)
        else:
            out[key] = mean_or_none([v for v in values if v is not None])
    return out


def spread(values):
    """mean, std (population) and the worst (lowest) value over seeds."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "worst": min(values)}


# --- main ---


def run_seed(cfg, seed, tok, device):
    """Gates, the base, its warm-start, then the four arms from the base; one seed."""
    set_seed(seed)
    train, test = load_rows(cfg, seed)
    rng = random.Random(seed * 1000 + 2)
    n_params = 0
    gate = {}
    for name, mode in (("direct", "direct"), ("think_sft", "reason")):
        # a model of the arms' size trained from scratch on unlimited fresh questions of every
        # type, all answered at once, or all after their think trace
        model = GPT(len(tok.vocab), tok.n_specials, cfg.d_model, cfg.n_layers, cfg.n_heads)
        model = model.to(device)
        n_params = sum(p.numel() for p in model.parameters())
        sample = fresh_sampler(rng, cfg.batch, TYPES, {t: [mode] for t in TYPES})
        sft_train(model, tok, sample, cfg.gate_steps, cfg.lr_base, device, f"gate_{name}",
                  cfg.log_every)
        gate[name] = evaluate(model, tok, train, test, mode, cfg, device, seed)["per_task"]
    # the base: the one-hop questions (each a step of the chain), with and without thinking,
    # then a warm-start that adds a few two-hop questions to the last steps
    base = GPT(len(tok.vocab), tok.n_specials, cfg.d_model, cfg.n_layers, cfg.n_heads).to(device)
    sample = base_sampler(rng, cfg.batch, cfg.base_steps, cfg.warm_batch)
    checks = [r for r in make_rows(random.Random(seed * 1000 + 4), 32) if r["type"] != "two_hop"]

    def ready(model):
        return one_hop_accuracy(model, tok, checks, cfg, device) >= cfg.base_target
    opt, base_steps = sft_train(base, tok, sample, cfg.base_steps, cfg.lr_base, device, "base",
                                cfg.log_every, ready=ready)
    if cfg.warm_traces:
        warm = base_sampler(rng, cfg.batch, 0, cfg.warm_batch)
        sft_train(base, tok, warm, math.ceil(cfg.warm_traces / cfg.warm_batch), cfg.lr_base,
                  device, "warm-start", cfg.log_every, opt=opt)
    arms = {"base": evaluate(base, tok, train, test, "reason", cfg, device, seed),
            "base_direct": evaluate(base, tok, train, test, "direct", cfg, device, seed)}
    curves = {}
    for k, name in enumerate(ARMS):
        set_seed(seed * 1000 + 10 + k)
        model = copy.deepcopy(base)
        mode = "reason" if name in ("sft_trace", "rl_think") else "direct"
        if name.startswith("sft"):
            sample = stream_sampler(question_stream(train, cfg.prompts, seed), mode)
            sft_train(model, tok, sample, cfg.steps, cfg.lr_sft, device, name, cfg.log_every)
        else:
            curves[name] = grpo_train(model, base, tok, train, mode, cfg, device, name, seed)
        arms[name] = evaluate(model, tok, train, test, mode, cfg, device, seed)
    arms["rl_think"]["chain_rate_before"] = arms["base"]["chain_rate"]
    arms["rl_think"]["chain_rate_after"] = arms["rl_think"]["chain_rate"]
    arms["rl_think"]["acc_given_chain_before"] = arms["base"]["acc_given_chain"]
    gates = {"direct_two_hop": gate["direct"]["two_hop"]["strict"],
             "think_sft_two_hop": gate["think_sft"]["two_hop"]["strict"],
             "base_chain_rate": arms["base"]["chain_rate"],
             "base_two_hop": arms["base"]["per_task"]["two_hop"]["strict"],
             "base_steps": base_steps,
}
    return {"gate": gates, "arms": arms, "curves": curves, "n_params": n_params,
            "n_train": len(train), "n_test": len(test)}


def print_table(results):
    arms = results["arms"]
    heads = ("strict", "relaxed") + TYPES + ("train", "chain", "full chain", "scramble")
    log(f"{'arm (test, greedy)':<12}" + "".join(f"{h[:11]:>12}" for h in heads))
    for name, r in arms.items():
        values = [r["strict"], r["relaxed"]]
        values += [r["per_task"].get(t, {}).get("strict", math.nan) for t in TYPES]
        values += [r["train_strict"], r.get("chain_rate", math.nan)]
        values += [r.get("full_chain_rate", math.nan), r.get("scramble_drop", math.nan)]
        log(f"{name:<12}" + "".join(f"{v if v is not None else math.nan:>12.3f}" for v in values))
    gate = results["gate"]
    log(f"gates: direct two_hop {gate['direct_two_hop']:.3f} (chance 0.25), think traces two_hop "
        f"{gate['think_sft_two_hop']:.3f}, base chain rate {gate['base_chain_rate']:.3f}, base "
        f"two_hop {gate['base_two_hop']:.3f}")
    rl = results["arms"]["rl_think"]
    log(f"rl_think two_hop accuracy given the chain (T = 1): before RL "
        f"{rl['acc_given_chain_before']['chain']}, after {rl['acc_given_chain']['chain']}")
    head = results["headline"]
    for key, value in head.items():
        log(f"{key}: mean {value['mean']:.3f} ± {value['std']:.3f}, "
            f"worst seed {value['worst']:.3f}")


def plot(results, path):
    fig, axes = new_figure(2, width=5.4)
    names = ["base_direct", "base", "sft", "sft_trace", "rl_nothink", "rl_think"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        per_task = results["arms"][name]["per_task"]
        heights = [per_task[t]["strict"] for t in TYPES]
        xs = [j + (i - len(names) / 2 + 0.5) * width for j in range(len(TYPES))]
        axes[0].bar(xs, heights, width, label=name)
    axes[0].axhline(0.25, color="gray", linestyle=":", label="chance (two_hop)")
    axes[0].set_xticks(range(len(TYPES)))
    axes[0].set_xticklabels(TYPES, fontsize=8)
    axes[0].set_ylabel("test accuracy (strict, greedy)")
    axes[0].set_title(f"accuracy per question type ({len(results['seeds'])} seeds)")
    axes[0].legend(fontsize=7, loc="lower left")
    window = 10
    for seed, curves in zip(results["seeds"], results["curves"]):
        hits = curves["rl_think"]["chain_hits"]
        counts = curves["rl_think"]["chain_n"]
        rate = [sum(hits[max(0, s - window):s + 1]) / max(1, sum(counts[max(0, s - window):s + 1]))
                for s in range(len(hits))]
        axes[1].plot(range(1, len(rate) + 1), rate, label=f"seed {seed}")
    axes[1].set_xlabel("GRPO step (rl_think)")
    axes[1].set_ylabel(f"chain rate on two-hop rollouts (last {window} steps)")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("think block holds the product's mark m, T = 1")
    axes[1].legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 3), seeds=min(cfg.seeds, 2),
                                  gate_steps=3, base_steps=4, warm_traces=4, warm_batch=4,
                                  batch=8, n_train=2, n_test=3, prompts=4, group=4, log_every=2)
    device = pick_device(cfg.device)
    log(f"config: {dataclasses.asdict(cfg)}")
    tok = Tokenizer()
    start = time.process_time()
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    per_seed = []
    for seed in seeds:
        log(f"--- seed {seed} ---")
        per_seed.append(run_seed(cfg, seed, tok, device))
        if seed == seeds[0]:
            log(f"model: {per_seed[0]['n_params']} parameters; data: {per_seed[0]['n_train']} "
                f"training, {per_seed[0]['n_test']} test questions; vocabulary {len(tok.vocab)}")
    arms = average([r["arms"] for r in per_seed])
    gate_keys = ("direct_two_hop", "think_sft_two_hop", "base_chain_rate", "base_two_hop",
                 "base_steps")
    gate = average([{k: r["gate"][k] for k in gate_keys} for r in per_seed])
    gate["per_seed"] = {k: [r["gate"][k] for r in per_seed] for k in gate_keys}
    two_hop = {name: [r["arms"][name]["per_task"]["two_hop"]["strict"] for r in per_seed]
               for name in arms}
    gain = [a - b for a, b in zip(two_hop["rl_think"], two_hop["rl_nothink"])]
    # the best any arm answering at once reached: rl_nothink, or the direct gate (≈ chance)
    best_direct = [max(n, r["gate"]["direct_two_hop"])
                   for n, r in zip(two_hop["rl_nothink"], per_seed)]
    headline = {"rl_think_minus_rl_nothink_two_hop": spread(gain),
                "rl_think_minus_best_direct_two_hop": spread(
                    [a - b for a, b in zip(two_hop["rl_think"], best_direct)]),
                "rl_think_two_hop": spread(two_hop["rl_think"]),
                "rl_nothink_two_hop": spread(two_hop["rl_nothink"]),
                "chain_rate_after_minus_before": spread(
                    [r["arms"]["rl_think"]["chain_rate_after"] - r["arms"]["rl_think"][
                        "chain_rate_before"] for r in per_seed]),
                "scramble_drop": spread([r["arms"]["rl_think"]["scramble_drop"] for r in per_seed])}
    results = {"config": dataclasses.asdict(cfg), "seeds": seeds, "gate": gate, "arms": arms,
               "headline": headline, "two_hop_per_seed": two_hop,
               "curves": [r["curves"] for r in per_seed],
               "cpu_time_s": time.process_time() - start}
    print_table(results)
    log(f"CPU time {results['cpu_time_s']:.1f} s (process time, {torch.get_num_threads()} threads)")
    save_json(os.path.join(cfg.out, "results.json"), results)
    plot(results, os.path.join(cfg.out, "read_r.png"))
    return results


def main(argv=None):
    return run_cli(Config, run, argv)


# --- boilerplate: CLI, seeds, device, logs, files, figures (same in every script; skip it) ---


class BadInput(Exception):
    """A user error (bad flag, value or file): one line on stderr, exit status 2."""


class NonFinite(Exception):
    """A loss term turned NaN or inf: the step and the term on stderr, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit 2; we want one line
        raise BadInput(message)


def parse_config(cls, argv=None):
    """argparse from the dataclass: `foo_bar: int = 3  # text` becomes `--foo-bar 3`, help text."""
    source = inspect.getsource(cls)
    helps = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", source, re.M))
    parser = _Parser(description=(cls.__doc__ or "").strip(),
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        text = helps.get(field.name, "").replace("%", "%%")  # argparse %-formats help text
        if field.type is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=field.default, help=text)
        else:
            metavar = field.type.__name__.upper()
            parser.add_argument(flag, type=field.type, default=field.default, help=text,
                                metavar=metavar)
    cfg = cls(**vars(parser.parse_args(argv)))
    devices = ("auto", "cpu", "cuda", "mps")
    require(cfg.device in devices, f"--device {cfg.device}: choose one of {', '.join(devices)}")
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
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    require(name != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device here")
    require(name != "mps" or has_mps, "--device mps: no MPS device here")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on a CUDA device that supports it; fp32 everywhere else."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cosine_lr(step, total, lr, warmup):
    """nanoGPT's schedule: linear warm-up for `warmup` steps, then cosine decay to lr / 10."""
    # 1) linear warm-up from lr / warmup to lr
    if step < warmup:
        return lr * (step + 1) / warmup
    # 2) cosine decay from lr (progress 0) to lr / 10 (progress 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)


def log(message):
    print(message, flush=True)


def log_progress(step, total, start_time, **metrics):
    """One line: step, the metrics given (loss terms, reward, throughput), elapsed time and ETA."""
    elapsed = time.time() - start_time
    eta = elapsed / step * (total - step)
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
    log(f"step {step:>5}/{total} | {' '.join(parts)} | {elapsed:.0f}s elapsed, eta {eta:.0f}s")


def check_finite(step, **terms):
    """Stop the run, naming the step and the term, as soon as a loss term is NaN or inf."""
    for name, value in terms.items():
        if not math.isfinite(float(value)):
            raise NonFinite(f"step {step}: {name} is {float(value)}; stopping")


def load_user_data(path, columns):
    """A JSON-lines file as a datasets.Dataset; a bad file is one BadInput line (file, line)."""
    n_rows = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--data {path}, line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{where}: not valid JSON ({e.msg})")
            for column in columns:
                require(isinstance(row, dict) and column in row, f"{where}: no column '{column}'")
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


def new_figure(n_panels, width=4.6, height=3.6):
    """A row of matplotlib axes on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path):
    """Write a PNG atomically (temp file, then os.replace) and close the figure."""
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def run_cli(cls, run, argv=None):
    """Parse argv into a Config and call run(cfg); a user error exits 2, a non-finite loss 1."""
    try:
        return run(parse_config(cls, argv))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFinite as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
