"""ReAd-R on AdsQA: reflect, then answer — arXiv 2509.08621 (https://arxiv.org/abs/2509.08621)

AdsQA asks what an ad means, not what it shows. ReAd-R first gathers the clues in <think>…</think>,
then answers in <answer>…</answer>; GRPO trains it on a rule reward alone (no reasoning traces).
The claim in miniature: where the answer needs two hops through the ad, a base that can already
reflect (sometimes) is made to reflect, and to be right, by RL on the reward alone.

The toy ad (marks drawn fresh for every ad, so no answer can be memorised): 4 cue frames [mark, cue]
(joke, skull, crowd, trophy: humour, fear, social proof, aspiration) and a product frame [m, P]
carrying the mark m of one cue frame C. Question types: product_mark (m), mark_cue (the cue beside a
given mark), cue_theme (THEME[P][C'] for a given cue; THEME is a 4×4 Latin square), mark_theme
(THEME[P][C'] for a given mark m', trace "m' C'"), and the headline two_hop: THEME[P][C], trace
"m C". A 1-layer transformer (input: the token plus the previous word, a built-in previous-token
head) makes one attention hop per written token, so two hops need the chain written out.

Key equations (symbols as in the code):
    s = judge(pred, gold): 1 every gold slot stated; 0.5 at least half and nothing contradicted;
        0 otherwise; two values of a slot (a hedge) contradict; a 1 or 0.5 answer more than 5×
        longer than the reference scores 0.1                                  answer_reward
    r = 0.9 · s + 0.1 · 1[<think>, </think>, <answer>, </answer> all present]  total_reward
    Â_i = (r_i − mean_G r) / (std_G r + 1e-6)                                  group_normalize
    ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1 ± ε)) + c_KL · k3(π_θ ‖ π_ref), token mean    grpo_loss
    strict = mean 1[s = 1];  relaxed = mean 1[s ≥ 0.5]                         strict_relaxed
    full chain: the think block is "m C" (no other mark or cue); "m" alone apart  chain_check
The study: gates per seed (a direct model on unlimited data stays near chance; a think-SFT model
solves two-hop; the base's pass@8, full-chain rate at T = 1 and accuracy with "m C" forced), then
from one base four arms on the 24 training ads' two-hop questions: sft (direct answers), sft_trace
(traces: an upper bound), rl_think and rl_nothink (GRPO); rl_think against the best direct arm.

Run:  python read_r.py  (3 seeds, both cores);  --seeds 1;  --workers 1;  --smoke
Headline (3 seeds; gates, arms and per-seed verdicts in results/read_r/results.md): two-hop
strict rl_think 0.747 ± 0.109 [worst 0.604] vs the best arm answering at once 0.288 (chance 0.25):
margin 0.459 [0.316], full chain "m C" after RL 0.855 [0.680], scramble drop 0.584 [0.420]; every
gate and goal met on 3 of 3 seeds. RL raised two-hop above its base on seeds 0 and 2 (+0.48, +0.29);
seed 1's base, warm-started to 2048 traces, was already at 0.868 and RL lowered it to 0.768.

Deviations from the paper (and its official code: TsinghuaC3I/AdsQA on EasyR1):
- symbolic 5-frame ads and a 1-layer, 4-head, 64-wide transformer without positions, with a
  previous-word input feature, instead of 8 video frames and Qwen2.5-VL-7B: the toy isolates the
  two-hop composition that reflection is for;
- a rule judge over answer slots instead of the GPT-4o judge; over-long = 5× the reference in
  words (official: 100× in characters); no answer block → the whole response is judged (as there);
- one-word answers, closed by the environment in every arm (the same answer budget): relaxed
  equals strict here (the 0.5 rule is tested on two-slot answers);
- the base is trained here (one-hop questions with and without traces until ready, then two-hop
  traces and as many direct answers, 256 at a time, until its answer after a forced "m C" is
  ready) to stand in for a pretrained model that can reason;
- GRPO on the two-hop questions only (on all types its one-hop rewards pull the shared "<think> m"
  context towards answering a mark); lr 1e-3 (paper 1e-6); 16 questions × 8 samples a step, one
  update per batch (π_old = π_θ, so the clip never binds); c_KL 0.01 with verl's low_var_kl;
- sft_trace is an extra upper-bound arm; evaluation is greedy, chain rates are sampled at T = 1.
"""


import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
import typing

import datasets
import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure


@dataclasses.dataclass
class Config:
    """Gates, a base that sometimes reflects, then SFT vs GRPO with / without thinking on ads."""

    steps: int = 150  # steps per arm (GRPO: one rollout batch; SFT: a batch of the same questions)
    seed: int = 0  # first random seed
    seeds: int = 3  # seeds (seed, seed + 1, ...), each a set of jobs
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines: frames (10 words), type, arg, answer, chain; replaces train/test
    out: str = "runs/read_r"  # folder for results.json, results.md and read_r.png
    smoke: bool = False  # the same code path at a tiny size, in seconds
    workers: int = 0  # worker processes of one thread each (0: one per core; 1 on a GPU)
    log_every: int = 50  # steps between log lines (and between the early-stop checks)
    gate_steps: int = 3000  # steps of the direct gate model (fresh ads, answered at once)
    think_gate_steps: int = 5000  # most steps of the think-SFT gate model (fresh ads, traces)
    think_target: float = 0.95  # the think-SFT gate stops at this two-hop accuracy (64 checks)
    base_steps: int = 3000  # most steps of the base (one-hop questions, with and without think)
    base_target: float = 0.95  # the base stops at this one-hop accuracy with think (128 checks)
    warm_traces: int = 256  # two-hop traces (and as many direct answers) between warm-start checks
    warm_max: int = 2048  # most two-hop traces of the warm-start
    warm_target: float = 0.85  # the warm-start stops at this accuracy with "m C" forced (64 checks)
    warm_batch: int = 8  # two-hop traces (and as many direct answers) a warm-start step
    batch: int = 64  # sequences per step of the gates, the base and its warm-start
    n_train: int = 24  # training ads (one question of each type): small, as AdsQA's split
    n_test: int = 250  # held-out ads (one question of each type)
    rl_types: str = "two_hop"  # question types the arms train on (comma-separated, or "all")
    prompts: int = 16  # questions per arm step (GRPO prompts; SFT batch)
    group: int = 8  # G: GRPO samples per question
    pass_k: int = 8  # k of the base's pass@k gate (samples of each training two-hop question)
    temperature: float = 1.0  # GRPO sampling temperature (and of the chain-rate measurement)
    kl_coef: float = 0.01  # c_KL on verl's low_var_kl to the base (paper: 0.01)
    clip_eps: float = 0.2  # ε of the clipped surrogate
    lr_base: float = 3e-3  # Adam learning rate of the gates and the base
    lr_warm: float = 3e-4  # Adam learning rate of the warm-start (a fresh optimizer)
    lr_sft: float = 1e-3  # Adam learning rate of the SFT arms
    lr_rl: float = 1e-3  # Adam learning rate of the GRPO arms (paper: 1e-6 on a 7B model)
    n_embd: int = 64  # transformer width
    n_layer: int = 1  # transformer layers: one attention hop per written token
    n_head: int = 4  # attention heads
    max_think: int = 4  # longest think block the policy may write (words)
    answer_words: int = 1  # answer budget in words, the same for every arm (then </answer>)

    def __post_init__(self):
        require(self.log_every > 0, f"--log-every {self.log_every}: must be positive")
        positive = ("seeds", "gate_steps", "think_gate_steps", "base_steps", "warm_batch", "batch",
                    "n_train", "n_test", "prompts", "n_embd", "n_layer", "n_head", "max_think",
                    "answer_words")
        for name in positive:
            value = getattr(self, name)
            require(value > 0, f"--{name.replace('_', '-')} {value}: must be positive")
        require(self.workers >= 0, f"--workers {self.workers}: must be >= 0")
        require(self.warm_traces >= 0, f"--warm-traces {self.warm_traces}: must be >= 0")
        require(self.warm_max >= self.warm_traces,
                f"--warm-max {self.warm_max}: must be >= --warm-traces {self.warm_traces}")
        require(self.group >= 2, f"--group {self.group}: GRPO needs at least 2 samples a question")
        require(self.n_embd % self.n_head == 0,
                f"--n-embd {self.n_embd}: must be divisible by --n-head {self.n_head}")
        require(self.temperature > 0, f"--temperature {self.temperature}: must be positive")
        for name in ("base_target", "think_target", "warm_target"):
            value = getattr(self, name)
            require(0 < value <= 1, f"--{name.replace('_', '-')} {value}: must be in (0, 1]")
        for name in ("kl_coef", "clip_eps", "lr_base", "lr_warm", "lr_sft", "lr_rl"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value),
                    f"--{name.replace('_', '-')} {value}: must be a finite number >= 0")
        unknown = [t for t in self.rl_types.split(",") if t not in TYPES + ("all",)]
        require(not unknown, f"--rl-types {self.rl_types}: choose from {', '.join(TYPES)} or all")


# --- the paper's method: the judge, the reward, the chain check and GRPO ---


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


class ChainCheck(typing.NamedTuple):
    full: bool  # the whole chain "m C": the product's mark, then the cue beside it, nothing else
    mark_only: bool  # "m" alone: the first hop written, the second left to the answer token


def chain_check(think, mark, cue, slot_of):
    """Is a think block the two-hop chain? full: it names the product's mark m, then the cue C
    beside it, and no other mark or cue (a list of every mark is not a chain); mark_only: it
    names m and no other mark or cue at all."""
    marks = [w for w in think if slot_of.get(w) == "mark"]
    cues = [w for w in think if slot_of.get(w) == "cue"]
    if set(marks) != {mark}:
        return ChainCheck(False, False)
    if not cues:
        return ChainCheck(False, True)
    return ChainCheck(set(cues) == {cue} and think.index(mark) < think.index(cue), False)


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


# --- data: the toy ad and its questions ---

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
# TE (theme) given the cue or a mark, and the headline TE in two hops
TYPES = ("product_mark", "mark_cue", "cue_theme", "mark_theme", "two_hop")
ONE_HOP = TYPES[:4]
# the base learns each one-hop type with its trace and (but mark_theme, whose direct answer is a
# two-hop lookup) answered at once
BASE_MODES = {"product_mark": ["reason", "direct"], "mark_cue": ["reason", "direct"],
              "cue_theme": ["reason", "direct"], "mark_theme": ["reason"]}
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

    product_mark: the product's mark m                            trace "m"
    mark_cue:     the cue beside the mark of cue frame `asked`    trace "m' C'"
    cue_theme:    THEME[product][cue `asked`]                     trace "C'"
    mark_theme:   THEME[product][C'], C' beside the asked mark m'  trace "m' C'"
    two_hop:      THEME[product][C], C the cue beside m           trace "m C"
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
    elif qtype == "mark_theme":
        arg = ad["marks"][asked]
        answer = THEME[product][asked]
        chain = [arg, CUES[asked]]
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


# --- model: a 1-layer transformer with a previous-word input feature, KV-cache sampling ---


def previous_word(tokens, is_word, first):
    """The last word strictly before each position, tags skipped: (N, T) → (N, T).

    first (N,): the word before the sequence starts (the one before a cached step, or a pad id).
    """
    if tokens.shape != is_word.shape or first.shape != tokens.shape[:1]:
        raise ValueError(f"previous_word: tokens, is_word (N, T) and first (N,) expected, got "
                         f"{tuple(tokens.shape)}, {tuple(is_word.shape)}, {tuple(first.shape)}")
    N, T = tokens.shape
    pos = torch.arange(T, device=tokens.device).expand(N, T)  # (N, T)
    word_pos = torch.where(is_word, pos, -1)  # (N, T)
    last = torch.cummax(word_pos, dim=1).values  # (N, T): the last word at or before t
    before = F.pad(last[:, :-1], (1, 0), value=-1)  # (N, T): the last word strictly before t
    prev = tokens.gather(1, before.clamp(min=0))  # (N, T)
    return torch.where(before >= 0, prev, first[:, None])  # (N, T)


@dataclasses.dataclass
class KVCache:
    """One layer's keys and values so far, each (B, n_head, T_past, hs); empty before prefill."""
    k: typing.Optional[torch.Tensor] = None
    v: typing.Optional[torch.Tensor] = None

    def append(self, k, v):
        """Add this step's keys and values (B, n_head, T, hs); return all of them so far."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
        self.k = k
        self.v = v
        return k, v


class Block(nn.Module):
    """Pre-LN transformer block: x + attention(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, cache=None):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)  # (B, T, D) each
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, T_past + T, hs)
        # causal over the new positions; a single cached step sees every earlier position
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A small causal transformer without positions; the input at t is the token's embedding plus
    the embedding of the previous word (a built-in previous-token head), tied output embedding."""

    def __init__(self, vocab, n_specials, n_embd, n_layer, n_head):
        super().__init__()
        self.n_specials = n_specials  # ids below are tags, which the previous-word feature skips
        self.tok = nn.Embedding(vocab, n_embd)
        self.prev = nn.Embedding(vocab, n_embd)  # the previous word's embedding
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln = nn.LayerNorm(n_embd)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.prev.weight, std=0.02)

    def forward(self, idx, caches=None, first=None):
        """idx (B, T) → logits (B, T, V); caches: one KVCache per block (None: no cache);
        first (B,): the last word before idx (None: a pad id)."""
        if first is None:
            first = idx.new_zeros(idx.shape[0])  # (B,)
        prev = previous_word(idx, idx >= self.n_specials, first)  # (B, T)
        x = self.tok(idx) + self.prev(prev)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])  # (B, T, D)
        return self.ln(x) @ self.tok.weight.T  # (B, T, V)


def last_word(idx, n_specials, first):
    """The last word at or before the end of each sequence, tags skipped: (N, T) → (N,)."""
    return previous_word(F.pad(idx, (0, 1)), F.pad(idx >= n_specials, (0, 1)), first)[:, -1]


@torch.no_grad()
def generate(model, prompt, max_new, ids, answer_words, temperature=1.0, greedy=False,
             generator=None):
    """KV-cache decoding: prefill the prompt (N, P), then one token a step; → tokens, alive,
    chosen: (N, max_new) each.

    alive: the token belongs to the response (up to and incl. </answer>); chosen: alive and picked
    by the policy; the answer block is closed by the environment (a forced </answer>, not chosen)
    once it holds `answer_words` words, so every arm has the same answer budget. generator: the
    sampling's own random stream (None: torch's global one).
    """
    N = prompt.shape[0]
    caches = [KVCache() for _ in model.blocks]
    logits = model(prompt, caches)  # prefill: (N, P, V)
    word = last_word(prompt, model.n_specials, prompt.new_zeros(N))  # (N,)
    done = torch.zeros(N, dtype=torch.bool, device=prompt.device)  # (N,)
    in_answer = prompt[:, -1] == ids["<answer>"]  # (N,)
    n_answer = torch.zeros(N, dtype=torch.long, device=prompt.device)  # (N,) answer words so far
    tokens = []
    alive = []
    chosen = []
    for t in range(max_new):
        last = logits[:, -1].float()  # (N, V)
        if greedy:
            sampled = last.argmax(-1)  # (N,)
        else:
            probs = F.softmax(last / temperature, -1)  # (N, V)
            sampled = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (N,)
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
        logits = model(tok[:, None], caches, word)  # one new position: (N, 1, V)
        word = torch.where(tok >= model.n_specials, tok, word)  # (N,)
    fill = max_new - len(tokens)
    tokens = F.pad(torch.stack(tokens, 1), (0, fill), value=ids["<pad>"])  # (N, max_new)
    alive = F.pad(torch.stack(alive, 1), (0, fill), value=False)  # (N, max_new)
    chosen = F.pad(torch.stack(chosen, 1), (0, fill), value=False)  # (N, max_new)
    return tokens, alive, chosen


def response_logp(model, prompt, tokens):
    """log π(y_t | x, y_<t) of each response token: (N, T) from prompt (N, P) and tokens (N, T)."""
    logits = model(torch.cat([prompt, tokens], 1)[:, :-1])  # (N, P + T − 1, V)
    logits = logits[:, prompt.shape[1] - 1:].float()  # (N, T, V): predictions of the response
    return F.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]  # (N, T)


# --- training: SFT on traces or answers, the base and its warm-start, GRPO ---


class Tag(typing.NamedTuple):
    arm: str  # what is being trained (a gate, the base, an arm), for the log
    seed: int
    log_every: int  # steps between log lines and early-stop checks


class Responses(typing.NamedTuple):
    prompt: torch.Tensor  # (N, P)
    tokens: torch.Tensor  # (N, T)
    chosen: torch.Tensor  # (N, T): picked by the policy (not the environment's </answer>)
    texts: list  # the responses as text, from the prefill on


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
    logits = model(x[:, :-1])  # (B, L − 1, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (B, L − 1)
    mask = m[:, 1:]  # (B, L − 1): 1 on the tokens to predict
    return (ce * mask).sum() / mask.sum()


def update(opt, model, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def sft_train(model, tok, sample, steps, lr, device, tag, ready=None):
    """SFT with a fresh Adam: sample(step) → (rows, modes); cross-entropy on the response tokens.
    Stops early once ready(model) (asked every tag.log_every steps); returns the steps taken."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.time()
    n_tokens = 0
    for step in range(1, steps + 1):
        rows, modes = sample(step)
        x, m = batch_tensors(tok, rows, modes, device)
        loss = sft_loss(model, x, m)
        check_finite(step, loss=loss.detach())
        update(opt, model, loss)
        n_tokens += x.numel()
        if step % tag.log_every == 0 or step == steps:
            log_progress(step, steps, start, arm=tag.arm, seed=tag.seed, loss=loss.item(),
                         tok_per_s=n_tokens / (time.time() - start))
            if ready is not None and ready(model):
                print(f"{tag.arm} seed {tag.seed}: ready after {step} steps")
                return step
    return steps


def fresh_sampler(rng, n, types, modes):
    """sample(step) → n questions about fresh ads (unlimited data), with their modes."""
    def sample(step):
        return fresh_batch(rng, n, types, modes)
    return sample


def warm_sampler(rng, n, n_warm):
    """The warm-start's data: n one-hop questions as the base saw them, plus n_warm two-hop
    questions with their think trace and n_warm answered at once (a guess that teaches the direct
    answer's form: a theme)."""
    def sample(step):
        rows, chosen = fresh_batch(rng, n, ONE_HOP, BASE_MODES)
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


def respond(model, tok, rows, mode, cfg, device, greedy, generator=None):
    """One response per row (greedy, or sampled at cfg.temperature): Responses."""
    ids = [tok.encode(prompt_words(r, mode)) for r in rows]
    prompt = torch.tensor(ids, device=device)  # (N, P)
    budget = response_budget(mode, cfg.max_think, cfg.answer_words)
    tokens, alive, chosen = generate(model, prompt, budget, tok.id, cfg.answer_words,
                                     cfg.temperature, greedy, generator)  # (N, T) each
    prefix = tok.render(PREFILL[mode])
    texts = [prefix + tok.decode(t[a].tolist()) for t, a in zip(tokens, alive)]
    return Responses(prompt, tokens, chosen, texts)


@torch.no_grad()
def greedy_accuracy(model, tok, rows, mode, cfg, device):
    """Greedy strict accuracy over rows in one mode (the early-stop checks)."""
    was_training = model.training
    model.eval()
    texts = respond(model, tok, rows, mode, cfg, device, greedy=True).texts
    model.train(was_training)
    return strict_relaxed([judge(t, r["answer"], SLOT_OF) for t, r in zip(texts, rows)])[0]


@torch.no_grad()
def answer_after_think(model, tok, rows, thinks, cfg, device):
    """Greedy answers after a think block forced on each row (scramble, forced chain): texts."""
    texts = [""] * len(rows)
    groups = {}  # rows with one prompt length are decoded together
    for i, (row, think) in enumerate(zip(rows, thinks)):
        words = prompt_words(row, "reason") + think + ["</think>", "<answer>"]
        groups.setdefault(len(words), []).append(i)
    for members in groups.values():
        words = [prompt_words(rows[i], "reason") + thinks[i] + ["</think>", "<answer>"]
                 for i in members]
        prompt = torch.tensor([tok.encode(w) for w in words], device=device)  # (n, P)
        tokens, alive, _ = generate(model, prompt, cfg.answer_words + 1, tok.id,
                                    cfg.answer_words, greedy=True)  # (n, T) each
        for i, t, a in zip(members, tokens, alive):
            forced = tok.render(["<think>"] + thinks[i] + ["</think>", "<answer>"])
            texts[i] = forced + tok.decode(t[a].tolist())
    return texts


def strict_of(texts, rows):
    """Strict accuracy of the texts against the rows' gold answers (None for no rows)."""
    if not rows:
        return None
    return strict_relaxed([judge(t, r["answer"], SLOT_OF) for t, r in zip(texts, rows)])[0]


def forced_chain_accuracy(model, tok, two_hop, cfg, device):
    """Two-hop accuracy with the gold chain "m C" forced as the think block."""
    model.eval()
    thinks = [r["chain"].split() for r in two_hop]
    texts = answer_after_think(model, tok, two_hop, thinks, cfg, device)
    model.train()
    return strict_of(texts, two_hop)


def chain_hits(texts, rows):
    """For each two-hop row, the ChainCheck of its response's think block."""
    hits = []
    for text, row in zip(texts, rows):
        if row["type"] == "two_hop":
            mark, cue = row["chain"].split()
            hits.append(chain_check(block(text, "think") or [], mark, cue, SLOT_OF))
    return hits


def grpo_train(model, ref, tok, rows, mode, cfg, device, tag):
    """GRPO on the rule reward: G samples a question, group-normalised reward, clipped surrogate
    and k3 KL to the base; returns the reward and the chain counts of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr_rl)
    stream = question_stream(rows, cfg.prompts, tag.seed)
    curve = {"reward": [], "full_chain_hits": [], "mark_only_hits": [], "chain_n": []}
    start = time.time()
    for step in range(1, cfg.steps + 1):
        batch = repeat_rows(next(stream), cfg.group)  # B·G rows: G samples of each question
        model.eval()
        out = respond(model, tok, batch, mode, cfg, device, greedy=False)
        model.train()
        # r = 0.9 · judge + 0.1 · format, then Â = group-normalised r
        rewards = [total_reward(t, r["answer"], SLOT_OF) for t, r in zip(out.texts, batch)]
        rewards = torch.tensor(rewards, device=device)  # (B·G,)
        adv = group_normalize(rewards.view(cfg.prompts, cfg.group)).view(-1)  # (B·G,)
        logp = response_logp(model, out.prompt, out.tokens)  # (B·G, T)
        with torch.no_grad():
            ref_logp = response_logp(ref, out.prompt, out.tokens)  # (B·G, T)
        # one update per rollout batch, so π_old = π_θ (ρ = 1); the forced </answer> is no action
        loss, stats = grpo_loss(logp, logp.detach(), ref_logp, out.chosen.float(), adv,
                                cfg.clip_eps, cfg.kl_coef)
        check_finite(step, loss=loss.detach(), **stats)
        update(opt, model, loss)
        hits = chain_hits(out.texts, batch)
        curve["reward"].append(rewards.mean().item())
        curve["full_chain_hits"].append(sum(h.full for h in hits))
        curve["mark_only_hits"].append(sum(h.mark_only for h in hits))
        curve["chain_n"].append(len(hits))
        if step % tag.log_every == 0 or step == cfg.steps:
            window = slice(-tag.log_every, None)
            full = sum(curve["full_chain_hits"][window]) / max(1, sum(curve["chain_n"][window]))
            log_progress(step, cfg.steps, start, arm=tag.arm, seed=tag.seed, loss=loss.item(),
                         reward=rewards.mean().item(), kl=stats["kl"].item(), full_chain=full)
    return curve


def new_model(tok, cfg, device):
    return GPT(len(tok.vocab), tok.n_specials, cfg.n_embd, cfg.n_layer, cfg.n_head).to(device)


class Base(typing.NamedTuple):
    model: nn.Module
    steps: int  # one-hop steps until ready
    warm_traces: int  # two-hop traces of the warm-start until its answer after the chain is ready


def train_base(tok, cfg, device, seed):
    """The base: one-hop questions (each a step of the chain) with and without their traces until
    its one-hop accuracy with thinking reaches cfg.base_target; then the warm-start, two-hop traces
    and direct answers beside one-hop questions (a fresh optimizer at cfg.lr_warm), checked every
    cfg.warm_traces traces until its answer with "m C" forced reaches cfg.warm_target."""
    rng = random.Random(seed * 1000 + 2)
    base = new_model(tok, cfg, device)
    checks = [r for r in make_rows(random.Random(seed * 1000 + 4), 32) if r["type"] in ONE_HOP]

    def ready(model):
        return greedy_accuracy(model, tok, checks, "reason", cfg, device) >= cfg.base_target
    sample = fresh_sampler(rng, cfg.batch, ONE_HOP, BASE_MODES)
    steps = sft_train(base, tok, sample, cfg.base_steps, cfg.lr_base, device,
                      Tag("base", seed, cfg.log_every), ready)
    if not cfg.warm_traces:
        return Base(base, steps, 0)
    chain_checks = [r for r in make_rows(random.Random(seed * 1000 + 7), 64)
                    if r["type"] == "two_hop"]

    def chain_ready(model):
        return forced_chain_accuracy(model, tok, chain_checks, cfg, device) >= cfg.warm_target
    warm = warm_sampler(rng, cfg.batch, cfg.warm_batch)
    every = math.ceil(cfg.warm_traces / cfg.warm_batch)  # steps between the checks
    warm_steps = sft_train(base, tok, warm, math.ceil(cfg.warm_max / cfg.warm_batch), cfg.lr_warm,
                           device, Tag("warm-start", seed, every), chain_ready)
    return Base(base, steps, warm_steps * cfg.warm_batch)


def train_gate(tok, cfg, device, seed, mode):
    """A model of the arms' size trained from scratch on unlimited fresh questions of every type,
    all answered at once (direct: cfg.gate_steps) or all after their think trace (reason: until
    its two-hop accuracy reaches cfg.think_target, at most cfg.think_gate_steps)."""
    rng = random.Random(seed * 1000 + 5)
    model = new_model(tok, cfg, device)
    sample = fresh_sampler(rng, cfg.batch, TYPES, {t: [mode] for t in TYPES})
    if mode == "direct":
        return model, sft_train(model, tok, sample, cfg.gate_steps, cfg.lr_base, device,
                                Tag("gate_direct", seed, cfg.log_every))
    checks = [r for r in make_rows(random.Random(seed * 1000 + 6), 64) if r["type"] == "two_hop"]

    def ready(model):
        return greedy_accuracy(model, tok, checks, "reason", cfg, device) >= cfg.think_target
    return model, sft_train(model, tok, sample, cfg.think_gate_steps, cfg.lr_base, device,
                            Tag("gate_think_sft", seed, cfg.log_every), ready)


# --- the study: gates, arms, seeds, record (a reader who came for the method may stop here) ---

ARMS = ("sft", "sft_trace", "rl_think", "rl_nothink")
DIRECT_ARMS = ("base_direct", "sft", "rl_nothink")  # the arms that answer at once


class Check(typing.NamedTuple):
    key: str  # the number checked
    threshold: float
    at_least: bool  # True: value >= threshold passes; False: value <= threshold passes


# gates, checked on every seed before any RL: the toy needs the chain, the base can write it
GATES = (Check("base_pass_at_8", 0.5, True), Check("base_full_chain_rate", 0.05, True),
         Check("forced_chain_accuracy", 0.8, True), Check("direct_two_hop", 0.35, False),
         Check("think_sft_two_hop", 0.9, True))
# the claim on every seed: RL with reflection beats the best direct arm, via the chain
GOALS = (Check("margin", 0.2, True), Check("full_chain_rate_after", 0.5, True),
         Check("scramble_drop", 0.3, True))


def failed_checks(values, checks):
    """The checks a dict of numbers misses, as "key value (needs >= t)" lines (None misses)."""
    failed = []
    for check in checks:
        value = values.get(check.key)
        sign = ">=" if check.at_least else "<="
        passed = value is not None and (value >= check.threshold if check.at_least
                                        else value <= check.threshold)
        if not passed:
            failed.append(f"{check.key} {fmt(value)} (needs {sign} {check.threshold})")
    return failed


def fmt(value):
    return "—" if value is None else f"{value:.3f}"


def mean_or_none(values):
    if not values:
        return None
    return sum(values) / len(values)


def per_type(rows, scores):
    """{type: {"strict", "relaxed"}} over the rows of each type present."""
    out = {}
    for qtype in TYPES:
        mine = [s for s, r in zip(scores, rows) if r["type"] == qtype]
        if mine:
            strict, relaxed = strict_relaxed(mine)
            out[qtype] = {"strict": strict, "relaxed": relaxed}
    return out


def sampled_chain(model, tok, two_hop, cfg, device, seed):
    """The chain as the policy samples it (T = cfg.temperature, its own random stream): the rate
    of the full chain "m C", of "m" alone, and the accuracy given the full chain or not."""
    generator = torch.Generator(device=device).manual_seed(seed)
    texts = respond(model, tok, two_hop, "reason", cfg, device, False, generator).texts
    checks = chain_hits(texts, two_hop)
    right = [judge(t, r["answer"], SLOT_OF) == 1.0 for t, r in zip(texts, two_hop)]
    return {"full_chain_rate": mean_or_none([c.full for c in checks]),
            "mark_only_rate": mean_or_none([c.mark_only for c in checks]),
            "acc_given_full_chain": mean_or_none([x for x, c in zip(right, checks) if c.full]),
            "acc_given_no_full_chain": mean_or_none(
                [x for x, c in zip(right, checks) if not c.full])}


def scramble(model, tok, texts, two_hop, cfg, device, seed):
    """Two-hop accuracy with each greedy think block replaced by as many random frame words."""
    rng = random.Random(seed)
    scrambled = []
    for text, row in zip(texts, two_hop):
        frame_words = row["frames"].split()
        scrambled.append([rng.choice(frame_words) for _ in block(text, "think") or []])
    return strict_of(answer_after_think(model, tok, two_hop, scrambled, cfg, device), two_hop)


@torch.no_grad()
def evaluate(model, tok, train, test, mode, cfg, device, seed):
    """Greedy strict / relaxed per question type on test and train; in the think mode also the
    chain rates (at the sampling temperature), accuracy given the chain, and the scramble drop."""
    model.eval()
    texts = respond(model, tok, test, mode, cfg, device, greedy=True).texts
    scores = [judge(t, r["answer"], SLOT_OF) for t, r in zip(texts, test)]
    train_texts = respond(model, tok, train, mode, cfg, device, greedy=True).texts
    train_scores = [judge(t, r["answer"], SLOT_OF) for t, r in zip(train_texts, train)]
    strict, relaxed = strict_relaxed(scores)
    one_hop = [s for s, r in zip(scores, test) if r["type"] in ONE_HOP]
    two_hop = [r for r in test if r["type"] == "two_hop"]
    two_hop_texts = [t for t, r in zip(texts, test) if r["type"] == "two_hop"]
    res = {"strict": strict, "relaxed": relaxed, "per_task": per_type(test, scores),
           "one_hop_strict": strict_relaxed(one_hop)[0] if one_hop else None,
           "two_hop_strict": strict_of(two_hop_texts, two_hop),
           "train_strict": strict_relaxed(train_scores)[0],
           "train_per_task": {t: v["strict"] for t, v in per_type(train, train_scores).items()}}
    if mode == "reason" and two_hop:
        res.update(sampled_chain(model, tok, two_hop, cfg, device, seed))
        res["scramble_two_hop"] = scramble(model, tok, two_hop_texts, two_hop, cfg, device, seed)
        res["scramble_drop"] = res["two_hop_strict"] - res["scramble_two_hop"]
    model.train()
    return res


@torch.no_grad()
def pass_at_k(model, tok, rows, k, cfg, device, seed):
    """Share of the rows that at least one of k samples (T = cfg.temperature) answers right: how
    often GRPO's group of k sees a non-zero advantage. None for no rows."""
    if not rows:
        return None
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    texts = respond(model, tok, repeat_rows(rows, k), "reason", cfg, device, False,
                    generator).texts
    model.train()
    right = [judge(t, r["answer"], SLOT_OF) == 1.0 for t, r in zip(texts, repeat_rows(rows, k))]
    return mean_or_none([any(right[i * k:(i + 1) * k]) for i in range(len(rows))])


class Job(typing.NamedTuple):
    cfg: Config
    seed: int
    part: str  # "arms": the base, its gates and the four arms; or a gate model: PARTS[1:]


PARTS = ("arms", "gate_direct", "gate_think_sft")


def run_job(job):
    """One independent training of one seed, seeded at its start; plain data back."""
    start = time.process_time()
    set_seed(job.seed * 1000 + PARTS.index(job.part))
    device = pick_device(job.cfg.device)
    tok = Tokenizer()
    train, test = load_rows(job.cfg, job.seed)
    if job.part == "arms":
        out = arms_job(tok, job.cfg, device, job.seed, train, test)
    else:
        mode = "direct" if job.part == "gate_direct" else "reason"
        model, steps = train_gate(tok, job.cfg, device, job.seed, mode)
        two_hop = [r for r in test if r["type"] == "two_hop"]
        model.eval()
        texts = respond(model, tok, two_hop, mode, job.cfg, device, greedy=True).texts
        out = {"two_hop": strict_of(texts, two_hop), "steps": steps}
    out["cpu_s"] = time.process_time() - start
    return out


def arms_job(tok, cfg, device, seed, train, test):
    """The base, its gates (pass@k, the sampled chain, the forced chain), then the four arms from
    the base, each seeded at its start; their evaluations and GRPO curves."""
    trained = train_base(tok, cfg, device, seed)
    base = trained.model
    arms = {"base": evaluate(base, tok, train, test, "reason", cfg, device, seed),
            "base_direct": evaluate(base, tok, train, test, "direct", cfg, device, seed)}
    two_hop_train = [r for r in train if r["type"] == "two_hop"]
    two_hop_test = [r for r in test if r["type"] == "two_hop"]
    gate = {"base_pass_at_8": pass_at_k(base, tok, two_hop_train, cfg.pass_k, cfg, device, seed),
            "base_full_chain_rate": arms["base"].get("full_chain_rate"),
            "forced_chain_accuracy": forced_chain_accuracy(base, tok, two_hop_test, cfg, device),
            "base_greedy_two_hop": arms["base"]["two_hop_strict"], "base_steps": trained.steps,
            "warm_traces": trained.warm_traces}
    types = TYPES if cfg.rl_types == "all" else cfg.rl_types.split(",")
    rows = [r for r in train if r["type"] in types] or train
    curves = {}
    for k, name in enumerate(ARMS):
        set_seed(seed * 1000 + 10 + k)
        model = copy.deepcopy(base)
        mode = "reason" if name in ("sft_trace", "rl_think") else "direct"
        tag = Tag(name, seed, cfg.log_every)
        if name.startswith("sft"):
            sample = stream_sampler(question_stream(rows, cfg.prompts, seed), mode)
            sft_train(model, tok, sample, cfg.steps, cfg.lr_sft, device, tag)
        else:
            curves[name] = grpo_train(model, base, tok, rows, mode, cfg, device, tag)
        arms[name] = evaluate(model, tok, train, test, mode, cfg, device, seed)
    n_params = sum(p.numel() for p in base.parameters())
    return {"gate": gate, "arms": arms, "curves": curves, "n_params": n_params,
            "n_train": len(train), "n_test": len(test)}


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
    """mean, std (population) and the worst (lowest) value over seeds; None values skipped."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "worst": None}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "worst": min(values)}


def seed_verdict(seed, gate, arms):
    """One seed against the gates and the goals: rl_think vs the best arm answering at once (the
    direct gate model, the base answering at once, sft, rl_nothink), with what failed."""
    direct = {"gate_direct": gate["direct_two_hop"]}
    direct.update({name: arms[name]["two_hop_strict"] for name in DIRECT_ARMS})
    direct = {name: value for name, value in direct.items() if value is not None}
    best = max(direct, key=direct.get, default=None)
    rl = arms["rl_think"]
    values = {"margin": None, "full_chain_rate_after": rl.get("full_chain_rate"),
              "scramble_drop": rl.get("scramble_drop")}
    if best is not None and rl["two_hop_strict"] is not None:
        values["margin"] = rl["two_hop_strict"] - direct[best]
    failed_gates = failed_checks(gate, GATES)
    missed_goals = failed_checks(values, GOALS)
    return {"seed": seed, "best_direct_arm": best, "best_direct_two_hop": direct.get(best),
            "rl_think_two_hop": rl["two_hop_strict"], **values,
            "rl_think_one_hop": rl["one_hop_strict"], "failed_gates": failed_gates,
            "missed_goals": missed_goals, "met": not failed_gates and not missed_goals}


def summarise(cfg, jobs, outputs):
    """results.json from the jobs' outputs: per-seed gates and verdicts, arms averaged over seeds
    (with their per-seed numbers), the headline as mean, std and worst seed."""
    found = {(job.seed, job.part): out for job, out in zip(jobs, outputs)}
    seeds = sorted({job.seed for job in jobs})
    mains = [found[(seed, "arms")] for seed in seeds]
    gate_per_seed = []
    for seed, main in zip(seeds, mains):
        gate = dict(main["gate"], direct_two_hop=found[(seed, "gate_direct")]["two_hop"],
                    think_sft_two_hop=found[(seed, "gate_think_sft")]["two_hop"],
                    think_sft_steps=found[(seed, "gate_think_sft")]["steps"])
        gate_per_seed.append(gate)
    verdicts = [seed_verdict(s, g, m["arms"]) for s, g, m in zip(seeds, gate_per_seed, mains)]
    arms = {}
    for name in mains[0]["arms"]:
        evals = [main["arms"][name] for main in mains]
        arms[name] = dict(average(evals), per_seed=evals)
    arms["rl_think"]["full_chain_rate_before"] = arms["base"]["full_chain_rate"]
    headline = {key: spread([v[key] for v in verdicts]) for key in (
        "rl_think_two_hop", "best_direct_two_hop", "margin", "full_chain_rate_after",
        "scramble_drop", "rl_think_one_hop")}
    headline["base_greedy_two_hop"] = spread([g["base_greedy_two_hop"] for g in gate_per_seed])
    return {"config": dataclasses.asdict(cfg), "seeds": seeds, "gate_per_seed": gate_per_seed,
            "gate": average(gate_per_seed), "arms": arms, "headline": headline,
            "margin_per_seed": [v["margin"] for v in verdicts], "seed_verdicts": verdicts,
            "two_hop_per_seed": {name: [e["two_hop_strict"] for e in arm["per_seed"]]
                                 for name, arm in arms.items()},
            "curves": [main["curves"] for main in mains], "n_params": mains[0]["n_params"],
            "n_train": mains[0]["n_train"], "n_test": mains[0]["n_test"],
            "job_cpu_s": sum(out["cpu_s"] for out in outputs)}


def mean_std_worst(values):
    """"mean ± std [worst]" over seeds (None values skipped; "—" when there are none)."""
    s = spread(values)
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['worst']:.3f}]"


def report_arms(results):
    """The arms' tables: accuracy per question type (mean over seeds), then the two-hop numbers
    as mean ± std [worst seed]."""
    lines = ["| arm | strict | " + " | ".join(TYPES) + " | train |",
             "|---|---|" + "---|" * len(TYPES) + "---|"]
    for name, arm in results["arms"].items():
        cells = [fmt(arm["strict"])] + [fmt(arm["per_task"].get(t, {}).get("strict"))
                                        for t in TYPES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(arm['train_strict'])} |")
    lines += ["", "Two-hop, mean ± std [worst seed] (chain rates sampled at T = 1):", "",
              "| arm | two-hop strict | one-hop strict | full chain \"m C\" | \"m\" only "
              "| scramble drop |", "|---|---|---|---|---|---|"]
    keys = ("two_hop_strict", "one_hop_strict", "full_chain_rate", "mark_only_rate",
            "scramble_drop")
    for name, arm in results["arms"].items():
        cells = [mean_std_worst([e.get(k) for e in arm["per_seed"]]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def gain_over_base(verdict, gate):
    """rl_think's two-hop minus its base's greedy two-hop (None where either is missing)."""
    if verdict["rl_think_two_hop"] is None or gate["base_greedy_two_hop"] is None:
        return None
    return verdict["rl_think_two_hop"] - gate["base_greedy_two_hop"]


def report_seeds(results):
    """The gates and the verdict of every seed, each computed from the numbers."""
    names = [c.key for c in GATES] + ["base_greedy_two_hop", "base_steps", "warm_traces",
                                      "think_sft_steps"]
    needs = [(">= " if c.at_least else "<= ") + str(c.threshold) for c in GATES]
    lines = ["| seed | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| needs | " + " | ".join(needs + ["reported"] * 4) + " |"]
    for seed, gate in zip(results["seeds"], results["gate_per_seed"]):
        cells = [fmt(gate[n]) if isinstance(gate[n], float) or gate[n] is None else str(gate[n])
                 for n in names]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | rl_think two-hop | best direct (arm) | margin | gain over the base "
              "| full chain after RL | scramble drop | one-hop after RL | verdict |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v, gate in zip(results["seed_verdicts"], results["gate_per_seed"]):
        verdict = "met" if v["met"] else "missed: " + "; ".join(
            [f"gate {f}" for f in v["failed_gates"]] + v["missed_goals"])
        lines.append(f"| {v['seed']} | {fmt(v['rl_think_two_hop'])} | "
                     f"{fmt(v['best_direct_two_hop'])} ({v['best_direct_arm']}) | "
                     f"{fmt(v['margin'])} | {fmt(gain_over_base(v, gate))} | "
                     f"{fmt(v['full_chain_rate_after'])} | "
                     f"{fmt(v['scramble_drop'])} | {fmt(v['rl_think_one_hop'])} | {verdict} |")
    return lines


def render_report(results):
    """The record as markdown, from results.json alone."""
    cfg = results["config"]
    verdicts = results["seed_verdicts"]
    met = [v["seed"] for v in verdicts if v["met"]]
    base = [gate["base_greedy_two_hop"] for gate in results["gate_per_seed"]]
    gains = [gain_over_base(v, g) for v, g in zip(verdicts, results["gate_per_seed"])]
    raised = [v["seed"] for v, gain in zip(verdicts, gains) if gain is not None and gain > 0]
    lines = ["# read_r: ReAd-R on a two-hop toy of AdsQA (arXiv 2509.08621)", "",
             f"Seeds {results['seeds']}; {results['n_params']} parameters; {results['n_train']} "
             f"training and {results['n_test']} test questions; {cfg['steps']} steps per arm, "
             f"GRPO on {cfg['rl_types']} questions ({cfg['prompts']} × {cfg['group']} samples).",
             "", "## Headline (two-hop strict, test, greedy; mean ± std [worst seed])", "",
             f"- rl_think: {mean_std_worst([v['rl_think_two_hop'] for v in verdicts])}; the best "
             f"direct arm: {mean_std_worst([v['best_direct_two_hop'] for v in verdicts])}",
             f"- margin rl_think − best direct: {mean_std_worst(results['margin_per_seed'])} "
             f"(goal >= 0.2 on every seed)",
             f"- full chain \"m C\" after RL: "
             f"{mean_std_worst([v['full_chain_rate_after'] for v in verdicts])} (goal >= 0.5); "
             f"scramble drop: {mean_std_worst([v['scramble_drop'] for v in verdicts])} "
             f"(goal >= 0.3)",
             f"- rl_think's gain over its base's greedy two-hop: {mean_std_worst(gains)} (base "
             f"{mean_std_worst(base)}); one-hop after RL: "
             f"{mean_std_worst([v['rl_think_one_hop'] for v in verdicts])}",
             f"- verdict: gates and goals met on {len(met)} of {len(verdicts)} seeds {met}; RL "
             f"raised two-hop above its base's on {len(raised)} of {len(verdicts)} seeds {raised}",
             "",
             "## Arms (test, greedy; mean over seeds)", ""]
    lines += report_arms(results)
    lines += ["", "## Gates and verdict per seed", ""]
    lines += report_seeds(results)
    lines += ["", f"Wall time {results['wall_s']:.0f} s; CPU time of the jobs "
              f"{results['job_cpu_s']:.0f} s (one thread each).", ""]
    return "\n".join(lines)


def figure(results):
    """Accuracy per question type and arm; the full chain rate of rl_think's rollouts."""
    fig = Figure(figsize=(4.6 * 2, 3.6))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    names = ["base_direct", "base", "sft", "sft_trace", "rl_nothink", "rl_think"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        per_task = results["arms"][name]["per_task"]
        heights = [per_task.get(t, {}).get("strict") or 0.0 for t in TYPES]
        xs = [j + (i - len(names) / 2 + 0.5) * width for j in range(len(TYPES))]
        axes[0].bar(xs, heights, width, label=name)
    axes[0].axhline(0.25, color="gray", linestyle=":", label="chance (two_hop)")
    axes[0].set_xticks(range(len(TYPES)))
    axes[0].set_xticklabels([t.replace("_", "\n") for t in TYPES], fontsize=7)
    axes[0].set_ylabel("test accuracy (strict, greedy)")
    axes[0].set_title(f"accuracy per question type ({len(results['seeds'])} seeds)", fontsize=9)
    axes[0].legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.2), ncol=4)
    window = 10
    for seed, curves in zip(results["seeds"], results["curves"]):
        hits = curves["rl_think"]["full_chain_hits"]
        counts = curves["rl_think"]["chain_n"]
        rate = [sum(hits[max(0, s - window):s + 1]) / max(1, sum(counts[max(0, s - window):s + 1]))
                for s in range(len(hits))]
        axes[1].plot(range(1, len(rate) + 1), rate, label=f"seed {seed}")
    axes[1].set_xlabel("GRPO step (rl_think)")
    axes[1].set_ylabel(f"full chain rate, last {window} steps")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("rollouts whose think block is \"m C\" (T = 1)", fontsize=9)
    axes[1].legend(fontsize=7, loc="lower right")
    return fig


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 3), seeds=min(cfg.seeds, 2),
                                  gate_steps=3, think_gate_steps=3, base_steps=4, warm_traces=4,
                                  warm_max=8, warm_batch=4, batch=8, n_train=2, n_test=3,
                                  prompts=4, group=4, pass_k=2, log_every=2)
    device = pick_device(cfg.device)
    load_rows(cfg, cfg.seed)  # a bad --data file stops the run here, before any job starts
    print(f"config: {dataclasses.asdict(cfg)}")
    start = time.time()
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    jobs = [Job(cfg, seed, part) for part in PARTS for seed in seeds]
    results = summarise(cfg, jobs, run_jobs(run_job, jobs, cfg.workers, device))
    results["wall_s"] = time.time() - start
    print(render_report(results))
    write_record(cfg.out, "read_r", results, figure(results))
    return results


def main(argv=None):
    return run_cli(Config, run, argv)


# --- boilerplate: CLI, seeds, device, workers, logs, files (the same helpers in every script) ---

class BadInput(Exception):
    """A user error (a flag, a value, a file): one line on stderr, exit status 2."""

class NonFinite(Exception):
    """A loss term turned NaN or inf: the step and the term on stderr, exit status 1."""

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage and exits 2; we want one line
        raise BadInput(message)

def parse_config(cls, argv=None):
    """argparse from the dataclass: `foo_bar: int = 3  # text` becomes `--foo-bar 3`, help text."""
    helps = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))
    parser = _Parser(description=cls.__doc__,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(cls):
        text = helps.get(field.name, "").replace("%", "%%")  # argparse %-formats help text
        kind = {"type": field.type} if field.type is not bool else {
            "action": argparse.BooleanOptionalAction}
        parser.add_argument("--" + field.name.replace("_", "-"), default=field.default, help=text,
                            **kind)
    cfg = cls(**vars(parser.parse_args(argv)))
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
    has = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":  # cuda, then mps, then cpu
        name = "cuda" if has["cuda"] else "mps" if has["mps"] else "cpu"
    require(has.get(name), f"--device {name}: not available here (auto, cpu, cuda or mps)")
    return torch.device(name)

def log_progress(step, total, start_time, **metrics):
    """One line: step, the metrics given (loss terms, reward, throughput), elapsed time and ETA."""
    elapsed = time.time() - start_time
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
    eta = elapsed / step * (total - step)
    print(f"step {step:>5}/{total} | {' '.join(parts)} | {elapsed:.0f}s elapsed, eta {eta:.0f}s")

def check_finite(step, **terms):
    """Stop the run, naming the step and the term, as soon as a loss term is NaN or inf."""
    for name, value in terms.items():
        if not math.isfinite(float(value)):
            raise NonFinite(f"step {step}: {name} is {float(value)}; stopping")

def load_user_data(path, columns):
    """A JSON-lines file as a datasets.Dataset; a bad row is one BadInput line (file, line)."""
    with open(path, encoding="utf-8") as f:
        rows = [(line_no, line) for line_no, line in enumerate(f, 1) if line.strip()]
    require(rows, f"--data {path}: no rows")
    for line_no, line in rows:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"--data {path}, line {line_no}: not valid JSON ({e.msg})")
        missing = [c for c in columns if not isinstance(row, dict) or c not in row]
        require(not missing, f"--data {path}, line {line_no}: no column {missing[:1]}")
    datasets.disable_progress_bars()
    return datasets.load_dataset("json", data_files=path, split="train")

def run_jobs(fn, jobs, workers, device):
    """[fn(job) for job in jobs] on `workers` one-thread processes (0: one per core; 1 on a GPU)."""
    workers = 1 if device.type != "cpu" else min(workers or os.cpu_count(), len(jobs))
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    start = time.time()
    results = []
    with contextlib.ExitStack() as stack:
        finished = map(fn, jobs)
        if workers > 1:
            pool = stack.enter_context(context.Pool(workers, torch.set_num_threads, (1,)))
            finished = pool.imap(fn, jobs)
        for result in finished:
            results.append(result)
            elapsed = time.time() - start
            eta = elapsed / len(results) * (len(jobs) - len(results))
            print(f"job {len(results)}/{len(jobs)} done | {elapsed:.0f}s elapsed, eta {eta:.0f}s")
    return results

def write_record(out, name, results, fig):
    """results.json, results.md (render_report of the JSON read back) and NAME.png, each atomic."""
    os.makedirs(out, exist_ok=True)
    text = json.dumps(results, indent=2)
    report = render_report(json.loads(text))
    for filename, content in [("results.json", text), ("results.md", report)]:
        tmp = os.path.join(out, f".{filename}.tmp{os.getpid()}")  # a temp file, then os.replace
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, os.path.join(out, filename))
    tmp = os.path.join(out, f".{name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, os.path.join(out, f"{name}.png"))

def run_cli(cls, run, argv=None):
    """run(Config from argv) on one thread, so the numbers never depend on the core count."""
    torch.set_num_threads(1)
    sys.stdout.reconfigure(line_buffering=True)  # each log line shows as it is printed
    try:
        return run(parse_config(cls, argv))
    except (BadInput, NonFinite) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, BadInput) else 1)


if __name__ == "__main__":
    main()
