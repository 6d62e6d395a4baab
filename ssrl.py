"""SSRL: Self-Search Reinforcement Learning — arXiv 2508.10874 (https://arxiv.org/abs/2508.10874)

An LLM can be its own search engine: in one generation it thinks (<think>), writes a query
(<search>), writes the "retrieved" text itself (<information>) and answers (<answer>). Self-Search:
sampled many times, pass@k climbs with k (the knowledge is in the weights, poorly elicited). SSRL:
GRPO with an exact-match plus format reward sharpens it, the information tokens masked out of the
loss. Sim-to-real: stop at </search>, paste a real search result, continue.

The toy ("plan bottleneck"): people with an employer and a home city, employers with an HQ city,
cities with a country. Four question templates, each with one right chain of searches, the same for
every person: city (person → city), employer (person → employer), country (person → city →
country) and employer country (person → employer → HQ → country). A small decoder is pretrained on
(a) "bio" lines for every subject, `<s> P ?<think> city</think><search> P city</search>
<information> P lives in c3</information>`: one hop in the search format, no question, no template,
no plan, no answer; they put every fact in the weights and teach copying a name into a query;
(b) demonstration trajectories of the trajectory people only, where each template uses its right
chain 30% of the time and one of the four other chains (five plans in all) otherwise. RL (GRPO) runs
on questions about other people (the RL people); held-out people appear only in bio lines. What the
bio lines give away: the facts of held-out people and the query form. What they do not: which
chain answers which template. So the held-out gap sits in the plan, which is person-independent:
if GRPO moves plan mass, the gain transfers to people RL never saw. The toy is easy by construction
(five discrete plans, near-perfect recall); it tests that mechanism, not open-domain QA.

Key equations (symbols as in the code):
    reward   r = 0.9 · EM(answer, gold) + 0.1 · f
    format   f = min(t/2, 1) · min(t, s+1) / max(t, s+1), t = #<think>, s = #<search>; f = 0 if the
             text does not start <think>…</think> and end <answer>…</answer>, a search is not
             followed at once by its information block, #<information> ≠ s, t > 8, a block is
             empty, or a tag other than the eight appears (the official checks)
    GRPO     Â_i = (r_i − mean_G r) / (std_G r + 1e-6);  ρ_t = π_θ(y_t) / π_old(y_t)
             L = token-mean over m_t of max(−Â ρ_t, −Â clip(ρ_t, 1−ε, 1+ε)) + β · k3-KL(π_θ ‖ π_ref)
    mask     m_t = 1 on response tokens, 0 on every token of an <information>…</information> span
    pass@k   = 1 − C(n−c, k) / C(n, k)  (unbiased, n samples of which c are correct)
    plan     strict: the template's chain of relations, the first query on the asked person, each
             later query on the entity the previous information block recalled

Run: `python ssrl.py` (per seed: pretrain, gates, pass@k before RL, SSRL with the mask on and off,
pass@k after, sim-to-real, stale world); `--n-seeds 1`; `--steps 60`; `--smoke`.

Re-run at the end on an otherwise idle core (one thread): 221 s wall, the same numbers.
Default run (`python ssrl.py`: seeds 0 and 1; 90 people, 30 each for demonstrations, RL and held
out; a 0.12M-parameter decoder; 236 s CPU at one thread, 802 s wall on a 2-core machine shared with
other jobs, so no quiet wall time was measured). Mean ± std over the 2 seeds (3 did not fit the
240 s CPU budget); pass@k from 32 samples at T = 1 on 10 people × 4 templates per group; plan =
strict plan accuracy of those samples; greedy EM over all 30 people of the group:
                                 pass@1      pass@4      pass@32     plan        greedy EM
    before RL, held out          0.22±0.00   0.59±0.01   1.00±0.00   0.20±0.01   0.21±0.07
    before RL, RL people         0.21±0.02   0.57±0.03   0.97±0.03   0.21±0.01   0.20±0.05
    SSRL mask on, held out       0.32±0.14   0.58±0.13   0.91±0.01   0.33±0.24   0.37±0.25
    SSRL mask on, RL people      0.35±0.09   0.64±0.11   0.93±0.05   0.38±0.24   0.35±0.15
    SSRL mask off, held out      0.73±0.02   0.94±0.03   1.00±0.00   0.84±0.01   0.88±0.01
    SSRL mask off, RL people     0.88±0.05   0.99±0.01   0.99±0.01   0.86±0.01   0.97±0.01
  Gates before RL (both seeds): held-out per-hop recall with the right query 1.000 (>= 0.95); copy
  (first query names the asked person) 0.995 (>= 0.85). Ceiling: EM 1.0 (every fact recallable,
  one right chain); before RL pass@32 is already 1.00 on held-out people: the knowledge is there.
  Held-out pass@1 by template (before → mask on → mask off): city .25 → .41 → .68, employer .13 →
  .10 → .76, country .24 → .37 → .69, employer country .28 → .40 → .80.
  Mask on, per seed: held-out pass@1 0.228 → 0.465 (seed 0) and 0.220 → 0.177 (seed 1); plan 0.57
  and 0.09; greedy EM 0.62 and 0.13; RL people ahead of held out by −0.02 and +0.08.
  Per-hop recall in the sampled trajectories (T = 1, held out; city / employer / hq / country):
  before .93/.86/.97/.97, mask on .42/.31/.78/.86, mask off .75/.75/.96/.88. Format rate .99 → .48
  (mask on) / .97 (off); the answer repeats the last information block .97 → .67 / .95.
  Sim-to-real (after SSRL with the mask on, 4 samples, held out): EM with self-written information
  0.30, with the true lookup pasted after each </search> 0.73 (plan accuracy 0.31 → 0.74); stale
  world (half of those people moved city): 0.22 and 0.74.

What this shows. Self-Search reproduces: pass@k climbs from 0.22 (k = 1) to 1.00 (k = 32) before
any RL. The goal in miniature (held-out pass@1 +0.3, plan >= 0.7, greedy EM >= 0.9, RL people at
most 0.15 ahead) is NOT met with the information mask on, the paper's setting: +0.10 ± 0.14 (worst
seed −0.04), plan 0.33, greedy EM 0.37. Transfer itself is there (RL people are only 0.03 ahead),
but with the mask on nothing anchors the self-written information block and the updates to the
think, search and answer tokens of this small model drift it: per-hop recall in the trajectories
falls from 0.93 to 0.42 (city), so right plans end on wrong facts, and on seed 1 the plan itself
collapsed (0.09). With the true lookup pasted in, the same model answers 0.73: the plan moved more
than the self-search EM shows. The mask-off control meets the held-out goals (+0.51 ± 0.01, plan
0.84, greedy EM 0.88, just under 0.9) but RL people pull 0.15 ahead (0.18, 0.11): unmasked, RL
also trains the RL people's facts, i.e. memorises. So here the mask trades memorisation for drift;
the paper, with 3B-8B models and lr 1e-6, reports that masking helps.

Deviations from the paper (and its official code, TsinghuaC3I/SSRL):
- A small decoder on a synthetic world, not Llama/Qwen 3B-8B on NQ, HotpotQA, ...; the format is
  taught by pretraining (bio lines, demonstrations), not by an instruction prompt.
- 90 people (the spec: 240) and 2 seeds, to fit the CPU budget; the think blocks name the next
  relation ("done" before the answer), so the plan is written out; templated questions.
- GRPO with one update per batch (π_old = π_θ: ρ = 1, the clip never fires), group 5 as the paper,
  16 questions × 100 steps, lr 5e-4 (paper: lr 1e-6 on 3B-8B models); no entropy bonus.
- format_reward follows the official `format_reward` check by check, except its placeholder checks
  ("your query", "your thoughts", ...), which the toy cannot write.
- Information masking by token ids. The official `create_information_loss_mask` (ray_trainer.py)
  finds blocks with a regex on decoded text without re.S (it misses multi-line blocks) and maps
  characters back to tokens by re-encoding prefixes. Here a stray </information> closes nothing
  (the v1 mask stopped masking every later block after one).
- The "real search engine" is an exact lookup ("subject relation" → the fact line, else
  "no result").
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
import string
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken
import datasets


@dataclasses.dataclass
class Config:
    """Pretrain a toy LM on a multi-hop world; Self-Search pass@k; SSRL (GRPO); pass@k again."""

    steps: int = 100  # GRPO steps per arm
    seed: int = 0  # first seed; seeds are seed, seed+1, ...
    n_seeds: int = 2  # independent runs (world, split, pretraining, RL)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON lines subject, relation (city/employer/hq/country), object; "": synthetic
    out: str = "runs/ssrl"  # folder for results.json and ssrl.png
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 25  # RL steps between log lines
    n_people: int = 90  # synthetic people (two-token names a{i} b{j})
    n_cities: int = 16  # synthetic cities
    n_countries: int = 8  # synthetic countries
    n_employers: int = 12  # synthetic employers
    n_traj: int = 30  # people with demonstration trajectories in pretraining
    n_heldout: int = 30  # held-out people: bio lines only, never in a trajectory or in RL
    demo_right: float = 0.3  # chance that a demonstration uses its template's right chain
    pack: int = 4  # bio lines per pretraining sequence: 1..pack at random
    d_model: int = 64  # transformer width
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads
    pretrain_steps: int = 450  # next-token pretraining steps
    pretrain_lr: float = 1e-2  # AdamW peak learning rate for pretraining (cosine decay)
    bio_batch: int = 32  # packed bio sequences per pretraining step
    traj_batch: int = 16  # demonstration trajectories per pretraining step
    prompts_per_step: int = 16  # RL questions per GRPO step
    group: int = 5  # samples per question (G), as the paper
    rl_lr: float = 5e-4  # AdamW learning rate for GRPO
    clip_eps: float = 0.2  # GRPO clip ε
    kl_coef: float = 0.001  # β, weight of the k3 KL to the reference model
    n_eval: int = 10  # people per group (held out, RL) for pass@k; greedy EM uses every one
    n_samples: int = 32  # samples per question for pass@k, k = 1..n_samples
    n_small: int = 4  # samples per question for sim-to-real and the stale world
    max_new: int = 56  # longest response in tokens
    stale_frac: float = 0.5  # fraction of held-out people who move to another city (stale world)

    def __post_init__(self):
        positive = ("n_seeds", "log_every", "n_people", "n_cities", "n_countries", "n_employers",
                    "n_traj", "n_heldout", "pack", "d_model", "n_layer", "n_head",
                    "pretrain_steps", "bio_batch", "traj_batch", "prompts_per_step", "n_eval",
                    "n_samples", "n_small", "max_new")
        for name in positive:
            value = getattr(self, name)
            require(value > 0, f"--{name.replace('_', '-')} {value}: must be positive")
        require(self.group >= 2, f"--group {self.group}: GRPO needs at least 2 samples a question")
        require(self.d_model % self.n_head == 0, f"--d-model {self.d_model}: % --n-head != 0")
        require(self.pretrain_lr > 0 and self.rl_lr > 0, "--pretrain-lr, --rl-lr: must be positive")
        require(self.clip_eps > 0 and self.kl_coef >= 0, "--clip-eps > 0 and --kl-coef >= 0 needed")
        require(0 <= self.demo_right <= 1, f"--demo-right {self.demo_right}: must be in [0, 1]")
        require(0 <= self.stale_frac <= 1, f"--stale-frac {self.stale_frac}: must be in [0, 1]")
        require(self.data or self.n_traj + self.n_heldout < self.n_people,
                "--n-traj + --n-heldout must leave people for RL (< --n-people)")


# --- data ---

COLUMNS = ("subject", "relation", "object")
SPECIALS = ["<s>", "<pad>", "<think>", "</think>", "<search>", "</search>", "<information>",
            "</information>", "<answer>", "</answer>"]
# a fact line reads "{subject} {verb} {object}"; a query reads "{subject} {relation}"
VERBS = {"city": "lives in", "employer": "works at", "hq": "is based in", "country": "is in"}
# the question templates and the one right chain of searches for each, the same for every person
TEMPLATES = {
    "city": ("city",),
    "employer": ("employer",),
    "country": ("city", "country"),
    "employer country": ("employer", "hq", "country"),
}
# every chain a demonstration may use: the four right ones and the employer's HQ city
PLANS = list(TEMPLATES.values()) + [("employer", "hq")]
FILLER = ["of", "?", "done", "no", "result"]


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
    """tiktoken word encoding, remapped to the compact ids of the tokens the vocabulary produces."""

    def __init__(self, words):
        self.enc = word_encoding(words, SPECIALS)
        raw = set()
        for word in words:
            raw |= set(self.enc.encode(word)) | set(self.enc.encode(" " + word))
        raw |= {self.enc.encode_single_token(s) for s in SPECIALS}
        self.raw = sorted(raw)
        self.to_id = {r: i for i, r in enumerate(self.raw)}
        self.special = {s: self.to_id[self.enc.encode_single_token(s)] for s in SPECIALS}

    def encode(self, text):
        return [self.to_id[t] for t in self.enc.encode(text, allowed_special="all")]

    def decode(self, ids):
        return self.enc.decode([self.raw[i] for i in ids])


class KB:
    """The world: (subject, relation) → object, for relations city, employer, hq and country."""

    def __init__(self, triples):
        self.facts = {(s, r): o for s, r, o in triples}

    def gold(self, person, template):
        """The answer to a template: follow its right chain from the person."""
        subject = person
        for rel in TEMPLATES[template]:
            subject = self.facts[(subject, rel)]
        return subject

    def search(self, query):
        """The "real" search engine: "subject words relation" → the fact line, or "no result"."""
        words = query.split()
        subject = " ".join(words[:-1])
        rel = words[-1] if words else ""
        obj = self.facts.get((subject, rel))
        if obj is None:
            return "no result"
        return f"{subject} {VERBS[rel]} {obj}"


def synthetic_triples(n_people, n_cities, n_countries, n_employers, rng):
    """People a{i} b{j} (two-token names: one-token names broke copying into a query) with a home
    city and an employer; employers with an HQ city; cities with a country."""
    width = max(2, math.isqrt(n_people))
    triples = [(f"c{c}", "country", f"k{rng.randrange(n_countries)}") for c in range(n_cities)]
    triples += [(f"e{e}", "hq", f"c{rng.randrange(n_cities)}") for e in range(n_employers)]
    for p in range(n_people):
        person = f"a{p // width} b{p % width}"
        triples.append((person, "city", f"c{rng.randrange(n_cities)}"))
        triples.append((person, "employer", f"e{rng.randrange(n_employers)}"))
    return triples


def people_of(kb):
    """Subjects with both a home city and an employer, in first-seen order."""
    subjects = dict.fromkeys(s for s, _ in kb.facts)
    return [s for s in subjects if (s, "city") in kb.facts and (s, "employer") in kb.facts]


def prompt_text(person, template):
    return f"{template} of {person} ?"


def trajectory_text(kb, person, chain):
    """think → search → information per hop of `chain`, then think → answer (the last object)."""
    text = ""
    subject = person
    for rel in chain:
        obj = kb.facts[(subject, rel)]
        text += f"<think> {rel}</think><search> {subject} {rel}</search>"
        text += f"<information> {subject} {VERBS[rel]} {obj}</information>"
        subject = obj
    return text + f"<think> done</think><answer> {subject}</answer>"


def bio_text(kb, subject, rel):
    """One hop in the search format, with no question, template, plan or answer."""
    return f" {subject} ?<think> {rel}</think><search> {subject} {rel}</search>" \
        f"<information> {subject} {VERBS[rel]} {kb.facts[(subject, rel)]}</information>"


class Pool(NamedTuple):
    bios: list  # token ids of one bio line per fact of the world (without <s>)
    demos: list  # per template: per plan: token ids of every trajectory person's demonstration


def pretraining_pool(kb, tok, traj_people):
    bios = [tok.encode(bio_text(kb, s, r)) for (s, r) in sorted(kb.facts)]
    demos = {}
    for template in TEMPLATES:
        demos[template] = []
        for chain in PLANS:
            texts = [prompt_text(p, template) + trajectory_text(kb, p, chain) for p in traj_people]
            demos[template].append([tok.encode("<s> " + text) for text in texts])
    return Pool(bios, demos)


def sample_demo(pool, template, demo_right, rng):
    """Right chain with chance demo_right, else one of the four other plans (uniform)."""
    right = PLANS.index(TEMPLATES[template])
    others = [i for i in range(len(PLANS)) if i != right]
    plan = right if rng.random() < demo_right else rng.choice(others)
    return rng.choice(pool.demos[template][plan])


def sample_packed_bios(pool, pack, start_id, rng):
    """<s> then 1..pack bio lines, so facts are learned at many positions."""
    ids = [start_id]
    for _ in range(rng.randint(1, pack)):
        ids += rng.choice(pool.bios)
    return ids


def pad_batch(seqs, pad, device):
    """Right-pad lists of ids: (B, T) ids and (B, T) bool valid."""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs], device=device)  # (B, T)
    return ids, ids != pad


# --- model ---


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, attn_mask, cache, start):
        B, T, D = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, D // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        if cache is not None:  # write keys/values at [start, start+T), attend to all so far
            cache.k[:, :, start:start + T] = k
            cache.v[:, :, start:start + T] = v
            k = cache.k[:, :, :start + T].to(q.dtype)  # (B, nh, start+T, hs)
            v = cache.v[:, :, :start + T].to(q.dtype)  # (B, nh, start+T, hs)
        # no mask given: causal over a full sequence (or a prefill), nothing for one new token
        causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        return x + self.mlp(self.ln2(x))


class KVCache(NamedTuple):
    k: torch.Tensor  # (B, nh, T, hs)
    v: torch.Tensor  # (B, nh, T, hs)


class GPT(nn.Module):
    def __init__(self, vocab, d, n_layer, n_head, max_len):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.n_head = n_head
        for m in self.modules():  # GPT-2 init: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx, pos=None, attn_mask=None, cache=None, start=0):
        """idx, pos: (B, T); attn_mask: (B, 1, T, T_keys) bool, or None: causal; cache: per layer"""
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device)[None]  # (1, T)
        x = self.tok(idx) + self.pos(pos)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if cache is None else cache[i], start)
        return self.ln_f(x) @ self.tok.weight.T  # (B, T, vocab), tied embeddings

    def new_cache(self, B, T, device):
        d = self.tok.weight.shape[1]
        shape = (B, self.n_head, T, d // self.n_head)
        return [KVCache(torch.zeros(shape, device=device), torch.zeros(shape, device=device))
                for _ in self.blocks]


def full_mask(valid):
    """(B, T) valid → (B, 1, T, T): causal, keys must be valid; the diagonal is always open."""
    T = valid.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=valid.device))  # (T, T)
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)  # (T, T)
    return ((causal[None] & valid[:, None, :]) | eye)[:, None]  # (B, 1, T, T)


def positions(valid):
    """(B, T) → (B, T): left padding does not shift the positions of the real tokens."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


# --- the paper's method ---


def normalize_answer(s):
    """SQuAD normalisation: lower-case, drop punctuation and articles, squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred, gold):
    """EM = 1 if the normalised prediction equals the normalised gold answer, else 0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def extract_answer(text):
    """The text of the last <answer>…</answer> block, or None."""
    found = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    if not found:
        return None
    return found[-1]


def format_reward(text):
    """f = min(t/2, 1) · min(t, s+1) / max(t, s+1); 0 for a malformed text (the official checks)."""
    text = text.strip()
    allowed = {"think", "search", "information", "answer"}
    # any tag other than the eight (e.g. <s>) → 0
    eight = allowed | {"/" + tag for tag in allowed}
    if any(tag not in eight for tag in re.findall(r"<([^>]+)>", text)):
        return 0.0
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return 0.0
    tags = re.findall(r"<(/?(?:think|search|information|answer))>", text)  # in order
    if len(tags) < 4:
        return 0.0
    for tag in allowed:  # no empty block; a query is one line
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S):
            if not body.strip() or (tag == "search" and "\n" in body):
                return 0.0
    # first a think block, last an answer block
    if tags[:2] != ["think", "/think"] or tags[-2:] != ["answer", "/answer"]:
        return 0.0
    # in between, every <search> is followed at once by </search> <information> </information>
    middle = tags[2:-2]
    i = 0
    while i < len(middle):
        if middle[i] == "search":
            if middle[i + 1:i + 4] != ["/search", "information", "/information"]:
                return 0.0
            i += 4
        else:
            i += 1
    t = text.count("<think>")
    s = text.count("<search>")
    if text.count("<information>") != s or t > 8:
        return 0.0
    return min(t / 2, 1.0) * min(t, s + 1) / max(t, s + 1)


def answer_reward(text, gold):
    """r = 0.9 · EM(last answer, gold) + 0.1 · format_reward(text)."""
    pred = extract_answer(text)
    em = 0.0 if pred is None else exact_match(pred, gold)
    return 0.9 * em + 0.1 * format_reward(text)


def pass_at_k(n, c, k):
    """Unbiased pass@k = 1 − C(n−c, k) / C(n, k): the chance that k of n samples hold a hit."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def information_mask(token_ids, open_id, close_id):
    """(N, T) ids → (N, T) bool, True on every token of an <information>…</information> span.

    A token is inside when the last <information> at or before it comes after the last
    </information> strictly before it: the open tag counts itself, the close tag is still inside,
    and a stray or doubled </information> closes nothing (later blocks stay masked).
    """
    if token_ids.dim() != 2:
        raise ValueError(f"information_mask: (N, T) ids expected, got {tuple(token_ids.shape)}")
    T = token_ids.shape[1]
    t = torch.arange(T, device=token_ids.device).expand_as(token_ids)  # (N, T)
    none = torch.full_like(t, -1)  # (N, T)
    # last_open_t = max{s ≤ t : ids_s = open}, −1 if none
    last_open = torch.where(token_ids == open_id, t, none).cummax(1).values  # (N, T)
    # last_close_t = max{s ≤ t : ids_s = close}; shifted right by one: s < t
    last_close = torch.where(token_ids == close_id, t, none).cummax(1).values  # (N, T)
    close_before = torch.cat([none[:, :1], last_close[:, :-1]], 1)  # (N, T)
    return last_open > close_before


def plan_is_correct(text, person, chain, verbs):
    """Strict plan accuracy of one response: exactly len(chain) search → information pairs, query i
    is "{subject} {chain[i]}", the first subject is the asked person and each later subject is the
    object the previous information block wrote ("{subject} {verb} {object}"), right or wrong."""
    pairs = re.findall(r"<search>(.*?)</search><information>(.*?)</information>", text, re.S)
    if len(pairs) != len(chain) or text.count("<search>") != len(chain):
        return False
    subject = person
    for (query, info), rel in zip(pairs, chain):
        if query.split() != f"{subject} {rel}".split():
            return False
        head = f"{subject} {verbs[rel]} ".split()
        words = info.split()
        if words[:len(head)] != head or len(words) == len(head):
            return False
        subject = " ".join(words[len(head):])
    return True


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


class Rollout(NamedTuple):
    seq: torch.Tensor  # (B, Lp + T) prompt (left-padded) and response ids
    valid: torch.Tensor  # (B, Lp + T) bool: a real token
    Lp: int  # prompt length: the response starts at Lp


@torch.no_grad()
def generate(model, prompts, max_new, tok, device, temperature=1.0, search=None):
    """Sample with a KV cache from prompts (lists of ids, left-padded here), up to </answer>.

    search: None (self-search), or query text → information text, forced into a row after each
    </search> (sim-to-real: the pasted tokens replace what the model would have written)."""
    B = len(prompts)
    Lp = max(len(p) for p in prompts)
    L = Lp + max_new
    pad = tok.special["<pad>"]
    seq = torch.full((B, L), pad, dtype=torch.long, device=device)  # (B, L)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)  # (B, L)
    for i, p in enumerate(prompts):
        seq[i, Lp - len(p):Lp] = torch.tensor(p, device=device)
        valid[i, Lp - len(p):Lp] = True
    cache = model.new_cache(B, L, device)
    padded = any(len(p) != Lp for p in prompts)  # left padding needs key masks
    prefill_mask = full_mask(valid[:, :Lp]) if padded else None
    with autocast(device):
        logits = model(seq[:, :Lp], positions(valid[:, :Lp]), prefill_mask, cache, 0)[:, -1]
    n_valid = valid.sum(1)  # (B,) position of the next token
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    forced = [[] for _ in range(B)]
    t = Lp
    for t in range(Lp, L):
        logits = logits.float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1)  # (B,)
        else:
            nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1)[:, 0]  # (B,)
        for i in range(B):
            if forced[i]:
                nxt[i] = forced[i].pop(0)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)  # (B,)
        seq[:, t] = nxt
        valid[:, t] = ~done
        if search is not None:  # a row that just closed a query gets the search result next
            closed = ~done & (nxt == tok.special["</search>"])  # (B,)
            for i in closed.nonzero()[:, 0].tolist():
                written = tok.decode(seq[i, Lp:t + 1].tolist())
                query = written.rsplit("<search>", 1)[-1][:-len("</search>")]
                forced[i] = tok.encode(f"<information> {search(query)}</information>")
        done = done | (nxt == tok.special["</answer>"])
        if bool(done.all()) or t == L - 1:
            break
        step_mask = valid[:, None, None, :t + 1] if padded else None  # (B, 1, 1, t+1)
        with autocast(device):
            logits = model(seq[:, t:t + 1], n_valid[:, None], step_mask, cache, t)[:, -1]
        n_valid = n_valid + valid[:, t]
    return Rollout(seq[:, :t + 1], valid[:, :t + 1], Lp)


def response_logp(model, rollout, device):
    """log π(y_t) of the response tokens seq[:, Lp:]: (N, T)."""
    seq = rollout.seq
    valid = rollout.valid
    Lp = rollout.Lp
    padded = not bool(valid[:, :Lp].all())  # left padding needs key masks
    mask = full_mask(valid[:, :-1]) if padded else None
    with autocast(device):
        logits = model(seq[:, :-1], positions(valid[:, :-1]), mask)  # (N, L-1, V)
    logp = F.log_softmax(logits.float()[:, Lp - 1:], -1)  # (N, T, V)
    return logp.gather(-1, seq[:, Lp:, None])[..., 0]  # (N, T)


def decode_responses(tok, rollout):
    seqs = rollout.seq[:, rollout.Lp:].cpu()
    valids = rollout.valid[:, rollout.Lp:].cpu()
    return [tok.decode(s[v].tolist()) for s, v in zip(seqs, valids)]


def pretrain(model, pool, cfg, device, tok, rng):
    """Next-token loss on packed bio lines plus demonstration trajectories."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.98),
                            weight_decay=0.0)
    pad = tok.special["<pad>"]
    start = time.time()
    n_tok = 0
    templates = list(TEMPLATES)
    for step in range(1, cfg.pretrain_steps + 1):
        lr = cosine_lr(step - 1, cfg.pretrain_steps, cfg.pretrain_lr, warmup=20)
        opt.param_groups[0]["lr"] = lr
        seqs = [sample_packed_bios(pool, cfg.pack, tok.special["<s>"], rng)
                for _ in range(cfg.bio_batch)]
        seqs += [sample_demo(pool, rng.choice(templates), cfg.demo_right, rng)
                 for _ in range(cfg.traj_batch)]
        ids, valid = pad_batch(seqs, pad, device)  # (B, T)
        with autocast(device):
            logits = model(ids[:, :-1])  # (B, T-1, V), causal
        # L = mean over real tokens of −log p(x_{t+1} | x_≤t)
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        target_valid = valid[:, 1:].float()  # (B, T-1)
        loss = (nll * target_valid).sum() / target_valid.sum()
        check_finite(step, pretrain_loss=loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n_tok += int(valid.sum())
        if step % max(1, cfg.pretrain_steps // 4) == 0:
            log_progress(step, cfg.pretrain_steps, start, pretrain_loss=loss.item(),
                         tok_per_s=n_tok / (time.time() - start))


def ssrl(model, ref, kb, questions, cfg, tok, device, info_mask, rng):
    """GRPO on self-search rollouts of `questions` ((person, template) of RL people only)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = time.time()
    history = []
    for step in range(1, cfg.steps + 1):
        batch = [rng.choice(questions) for _ in range(cfg.prompts_per_step)]
        flat = [q for q in batch for _ in range(cfg.group)]
        prompts = [tok.encode("<s> " + prompt_text(p, t)) for p, t in flat]
        model.eval()
        rollout = generate(model, prompts, cfg.max_new, tok, device)  # (N, L), N = B·G
        texts = decode_responses(tok, rollout)
        rewards = [answer_reward(text, kb.gold(p, t)) for text, (p, t) in zip(texts, flat)]
        r = torch.tensor(rewards, device=device).view(len(batch), cfg.group)  # (B, G)
        adv = group_normalize(r).reshape(-1)  # (N,)
        resp = rollout.seq[:, rollout.Lp:]  # (N, T)
        mask = rollout.valid[:, rollout.Lp:]  # (N, T)
        if info_mask:  # m_t = 0 on the information tokens: "retrieved", not chosen
            inside = information_mask(resp, tok.special["<information>"],
                                      tok.special["</information>"])  # (N, T)
            mask = mask & ~inside
        model.train()
        with torch.no_grad():
            ref_logp = response_logp(ref, rollout, device)  # (N, T)
        logp = response_logp(model, rollout, device)  # (N, T)
        loss, terms = grpo_loss(logp, logp.detach(), ref_logp, mask.float(), adv,
                                clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef)
        check_finite(step, loss=loss.item(), pg_loss=terms["pg_loss"], kl=terms["kl"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append({"step": step, "reward": float(r.mean()), "kl": float(terms["kl"])})
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_progress(step, cfg.steps, start, loss=loss.item(), pg=float(terms["pg_loss"]),
                         kl=float(terms["kl"]), reward=float(r.mean()),
                         samples_per_s=step * len(flat) / (time.time() - start))
    return history


# --- evaluation ---


def mean_or_none(xs):
    return float(np.mean(xs)) if len(xs) else None


def parse_pairs(text):
    """Each search → information pair as (query, information text)."""
    return re.findall(r"<search>(.*?)</search><information>(.*?)</information>", text, re.S)


def score_response(text, kb, person, template):
    """What one response did: EM, strict plan, copy, per-hop recall, answer follows information."""
    pred = extract_answer(text)
    pairs = parse_pairs(text)
    queries = re.findall(r"<search>(.*?)</search>", text, re.S)
    hops = []
    for query, info in pairs:  # per-hop recall: the written fact is the true one for the query
        rel = query.split()[-1] if query.split() else ""
        hops.append((rel, info.split() == kb.search(query).split()))
    follows = None
    if pred is not None and pairs:
        last = pairs[-1][1].split()
        follows = bool(last) and normalize_answer(pred) == normalize_answer(last[-1])
    return {
        "em": pred is not None and exact_match(pred, kb.gold(person, template)) == 1.0,
        "plan": plan_is_correct(text, person, TEMPLATES[template], VERBS),
        "copy": bool(queries) and queries[0].split()[:len(person.split())] == person.split(),
        "format": format_reward(text) == 1.0,
        "hops": hops,
        "follows": follows,
    }


def summarize(scores, questions, n):
    """scores: n per question, in order → pass@k, plan accuracy, rates, by template."""
    if len(scores) != len(questions) * n:
        raise ValueError(f"summarize: {len(scores)} scores for {len(questions)} x {n} samples")
    hits = np.array([s["em"] for s in scores]).reshape(len(questions), n).sum(1)  # (Q,)
    hop_hits = {}
    for s in scores:
        for rel, ok in s["hops"]:
            hop_hits.setdefault(rel, []).append(ok)
    by_template = {}
    for template in TEMPLATES:
        rows = [i for i, (_, t) in enumerate(questions) if t == template]
        mine = [scores[i * n + j] for i in rows for j in range(n)]
        by_template[template] = {
            "pass_at_1": mean_or_none([hits[i] / n for i in rows]),
            "plan_accuracy": mean_or_none([s["plan"] for s in mine]),
        }
    return {
        "pass_at_k": {str(k): float(np.mean([pass_at_k(n, c, k) for c in hits]))
                      for k in range(1, n + 1)},
        "plan_accuracy": mean_or_none([s["plan"] for s in scores]),
        "copy": mean_or_none([s["copy"] for s in scores]),
        "format_rate": mean_or_none([s["format"] for s in scores]),
        "hop_recall": {rel: mean_or_none(hop_hits.get(rel, [])) for rel in VERBS},
        "info_fidelity": mean_or_none([ok for s in scores for _, ok in s["hops"]]),
        "answer_follows_information": mean_or_none([s["follows"] for s in scores
                                                    if s["follows"] is not None]),
        "by_template": by_template,
    }


@torch.no_grad()
def sample_scores(model, kb, questions, n, tok, device, max_new, temperature=1.0, search=None,
                  chunk=2048):
    """n responses per question (at `temperature`; 0 = greedy), each scored."""
    model.eval()
    flat = [q for q in questions for _ in range(n)]
    scores = []
    for lo in range(0, len(flat), chunk):
        part = flat[lo:lo + chunk]
        prompts = [tok.encode("<s> " + prompt_text(p, t)) for p, t in part]
        rollout = generate(model, prompts, max_new, tok, device, temperature, search)
        for (p, t), text in zip(part, decode_responses(tok, rollout)):
            scores.append(score_response(text, kb, p, t))
    return scores


def evaluate(model, kb, eval_people, all_people, cfg, tok, device):
    """pass@k etc. from n_samples at T = 1 on eval_people; greedy EM and plan on all_people."""
    questions = [(p, t) for p in eval_people for t in TEMPLATES]
    out = summarize(sample_scores(model, kb, questions, cfg.n_samples, tok, device, cfg.max_new),
                    questions, cfg.n_samples)
    every = [(p, t) for p in all_people for t in TEMPLATES]
    greedy = sample_scores(model, kb, every, 1, tok, device, cfg.max_new, temperature=0)
    out["greedy_em"] = mean_or_none([s["em"] for s in greedy])
    out["greedy_plan_accuracy"] = mean_or_none([s["plan"] for s in greedy])
    for template in TEMPLATES:
        mine = [s for s, (_, t) in zip(greedy, every) if t == template]
        out["by_template"][template]["greedy_em"] = mean_or_none([s["em"] for s in mine])
    return out


@torch.no_grad()
def hop_recall_gate(model, kb, subjects, tok, device):
    """Greedy recall of each fact of `subjects` in the bio form, with the right query given:
    "<s> S ?<think> r</think><search> S r</search><information>" → "S verb O</information>"."""
    keys = [(s, r) for (s, r) in sorted(kb.facts) if s in subjects]
    prompts = []
    for s, r in keys:
        prompts.append(tok.encode(f"<s>{bio_text(kb, s, r).split('<information>')[0]}"
                                  f"<information>"))
    rollout = generate(model, prompts, 10, tok, device, temperature=0)
    by_rel = {}
    for (s, r), text in zip(keys, decode_responses(tok, rollout)):
        info = text.split("</information>")[0]
        by_rel.setdefault(r, []).append(info.split() == kb.search(f"{s} {r}").split())
    overall = mean_or_none([ok for oks in by_rel.values() for ok in oks])
    return overall, {r: mean_or_none(oks) for r, oks in sorted(by_rel.items())}


def sim_to_real(model, kb, questions, n, tok, device, max_new):
    """EM with self-written information vs with the real lookup pasted after each </search>."""
    own = sample_scores(model, kb, questions, n, tok, device, max_new)
    real = sample_scores(model, kb, questions, n, tok, device, max_new, search=kb.search)
    return {
        "em_self": mean_or_none([s["em"] for s in own]),
        "em_real": mean_or_none([s["em"] for s in real]),
        "info_fidelity_self": mean_or_none([ok for s in own for _, ok in s["hops"]]),
        "plan_accuracy_self": mean_or_none([s["plan"] for s in own]),
        "plan_accuracy_real": mean_or_none([s["plan"] for s in real]),
    }


def stale_kb(kb, people, frac, rng):
    """The world after pretraining: a fraction of `people` moved to another home city."""
    moved = rng.sample(people, int(round(frac * len(people))))
    cities = sorted({o for (s, r), o in kb.facts.items() if r == "city"})
    facts = dict(kb.facts)
    for person in moved:
        facts[(person, "city")] = rng.choice([c for c in cities if c != facts[(person, "city")]])
    return KB([(s, r, o) for (s, r), o in facts.items()]), len(moved)


# --- main ---


def load_world(cfg, rng):
    if not cfg.data:
        return KB(synthetic_triples(cfg.n_people, cfg.n_cities, cfg.n_countries, cfg.n_employers,
                                    rng))
    triples = []
    for row in load_user_data(cfg.data, COLUMNS):
        rel = str(row["relation"]).strip()
        require(rel in VERBS, f"--data {cfg.data}: relation '{rel}' is not one of {list(VERBS)}")
        triples.append((" ".join(str(row["subject"]).split()), rel,
                        " ".join(str(row["object"]).split())))
    kb = KB(triples)
    for person in people_of(kb):
        for template in TEMPLATES:
            try:
                kb.gold(person, template)
            except KeyError as missing:
                raise BadInput(f"--data {cfg.data}: no fact {missing} for '{person}'")
    return kb


def run_seed(cfg, seed, device):
    """One seed: world, split, pretraining, gates, before / after RL (mask on, off), sim-to-real."""
    set_seed(seed)
    rng = random.Random(seed)
    kb = load_world(cfg, rng)
    people = people_of(kb)
    require(cfg.n_traj + cfg.n_heldout < len(people),
            f"--data {cfg.data}: needs more than --n-traj + --n-heldout people")
    rng.shuffle(people)
    traj_people = people[:cfg.n_traj]
    heldout = people[cfg.n_traj:cfg.n_traj + cfg.n_heldout]
    rl_people = people[cfg.n_traj + cfg.n_heldout:]
    words = set(FILLER) | set(TEMPLATES) | set(VERBS)
    for (s, r), o in kb.facts.items():
        words |= set(s.split()) | set(o.split()) | set(VERBS[r].split())
    tok = Tokenizer(sorted(words))
    pool = pretraining_pool(kb, tok, traj_people)
    longest = max(len(b) for b in pool.bios) * cfg.pack + 1
    model = GPT(len(tok.raw), cfg.d_model, cfg.n_layer, cfg.n_head, max(longest, 96)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"== seed {seed}: {len(people)} people ({len(traj_people)} with demonstrations, "
        f"{len(rl_people)} for RL, {len(heldout)} held out); {len(kb.facts)} facts; "
        f"vocab {len(tok.raw)}; {n_params / 1e6:.2f}M parameters")
    pretrain(model, pool, cfg, device, tok, rng)
    ref = copy.deepcopy(model).eval().requires_grad_(False)

    # gates: the facts are in the weights, and a held-out name is copied into the first query
    entities = {s for (s, r) in kb.facts if r in ("hq", "country")}
    hop, hop_by_rel = hop_recall_gate(model, kb, set(heldout) | entities, tok, device)
    groups = {"heldout": (heldout[:cfg.n_eval], heldout),
              "rl_people": (rl_people[:cfg.n_eval], rl_people)}

    def measure(name, policy):
        arm = {g: evaluate(policy, kb, few, every, cfg, tok, device)
               for g, (few, every) in groups.items()}
        parts = [f"{g} pass@1 {arm[g]['pass_at_k']['1']:.3f} plan {arm[g]['plan_accuracy']:.3f} "
                 f"greedy EM {arm[g]['greedy_em']:.3f}" for g in groups]
        log(f"{name}: " + " | ".join(parts))
        return arm

    arms = {"before_rl": measure("before RL", model)}
    gate = {"hop_recall": hop, "hop_recall_by_relation": hop_by_rel,
            "copy": arms["before_rl"]["heldout"]["copy"]}
    gate["passed"] = gate["hop_recall"] >= 0.95 and gate["copy"] >= 0.85
    log(f"gates: held-out hop recall {hop:.3f} (>= 0.95), copy {gate['copy']:.3f} (>= 0.85): "
        f"{'passed' if gate['passed'] else 'FAILED'}")
    questions = [(p, t) for p in rl_people for t in TEMPLATES]  # RL people only
    histories = {}
    for name, info_mask in (("after_rl", True), ("after_rl_mask_off", False)):
        policy = copy.deepcopy(ref).requires_grad_(True)
        log(f"-- SSRL ({name}): {cfg.steps} steps x {cfg.prompts_per_step} questions x "
            f"{cfg.group} samples, information mask {'on' if info_mask else 'off'}")
        set_seed(seed + 10)  # both arms start from the same sampling noise
        rl_rng = random.Random(seed + 10)
        histories[name] = ssrl(policy, ref, kb, questions, cfg, tok, device, info_mask, rl_rng)
        arms[name] = measure(name, policy)
        if info_mask:
            trained = policy

    held_q = [(p, t) for p in heldout[:cfg.n_eval] for t in TEMPLATES]
    sim = {"after_rl": sim_to_real(trained, kb, held_q, cfg.n_small, tok, device, cfg.max_new)}
    stale, n_moved = stale_kb(kb, heldout[:cfg.n_eval], cfg.stale_frac, random.Random(seed + 3))
    sim["after_rl_stale_world"] = sim_to_real(trained, stale, held_q, cfg.n_small, tok, device,
                                              cfg.max_new)
    sim["after_rl_stale_world"]["moved_people"] = n_moved
    for name, block in sim.items():
        log(f"sim-to-real {name}: self-search EM {block['em_self']:.3f}, "
            f"real lookup EM {block['em_real']:.3f}")
    return {"seed": seed, "gate": gate, "arms": arms, "sim_to_real": sim,
            "rl_history": histories, "n_params": n_params}


def average(values):
    """Mean over seeds of numbers, dicts of numbers (recursively); None stays None."""
    if isinstance(values[0], dict):
        return {k: average([v[k] for v in values]) for k in values[0]}
    if any(v is None for v in values):
        return None
    return float(np.mean(values))


def headline(per_seed):
    """The goal metrics per seed, with mean, std and the worst seed."""
    rows = {
        "heldout_pass1_gain": [r["arms"]["after_rl"]["heldout"]["pass_at_k"]["1"]
                               - r["arms"]["before_rl"]["heldout"]["pass_at_k"]["1"]
                               for r in per_seed],
        "heldout_plan_accuracy": [r["arms"]["after_rl"]["heldout"]["plan_accuracy"]
                                  for r in per_seed],
        "heldout_greedy_em": [r["arms"]["after_rl"]["heldout"]["greedy_em"] for r in per_seed],
        "rl_people_lead": [r["arms"]["after_rl"]["rl_people"]["pass_at_k"]["1"]
                           - r["arms"]["after_rl"]["heldout"]["pass_at_k"]["1"]
                           for r in per_seed],
    }
    out = {}
    for name, xs in rows.items():
        worst = max(xs) if name == "rl_people_lead" else min(xs)
        out[name] = {"per_seed": xs, "mean": float(np.mean(xs)), "std": float(np.std(xs)),
                     "worst": worst}
    return out


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def print_table(results):
    arms = results["arms"]
    measured = arms["before_rl"]["heldout"]["pass_at_k"]
    ks = [k for k in ("1", "2", "4", "8", "16", "32") if k in measured]
    log(f"\nmean over seeds {results['seeds']}")
    log(f"{'pass@k':<32}" + "".join(f"{k:>7}" for k in ks) + "   plan  greedy")
    for name, arm in arms.items():
        for group, block in arm.items():
            cells = "".join(f"{block['pass_at_k'][k]:7.3f}" for k in ks)
            log(f"{name + ' ' + group:<32}{cells} {block['plan_accuracy']:6.3f} "
                f"{block['greedy_em']:6.3f}")
    log("by template (held out, pass@1 before -> after RL):")
    for template in TEMPLATES:
        before = arms["before_rl"]["heldout"]["by_template"][template]["pass_at_1"]
        after = arms["after_rl"]["heldout"]["by_template"][template]["pass_at_1"]
        log(f"  {template:<18} {before:.3f} -> {after:.3f}")
    gate = results["gate"]
    log(f"gates: hop recall {gate['hop_recall']:.3f}, copy {gate['copy']:.3f}")
    for name, h in results["headline"].items():
        log(f"{name}: {h['mean']:.3f} ± {h['std']:.3f} (worst seed {h['worst']:.3f})")
    for name, block in results["sim_to_real"].items():
        log(f"sim-to-real {name}: " + ", ".join(f"{k} {fmt(v)}" for k, v in block.items()))


def plot(results, path):
    fig, axes = new_figure(2)
    styles = {"before_rl": ("tab:gray", "-", "before RL"),
              "after_rl": ("tab:blue", "-", "after SSRL (information mask on)"),
              "after_rl_mask_off": ("tab:orange", "--", "after SSRL, mask off (control)")}
    for ax, group in zip(axes, ("heldout", "rl_people")):
        for name, (color, style, label) in styles.items():
            curve = results["arms"][name][group]["pass_at_k"]
            ks = [int(k) for k in curve]
            ax.plot(ks, list(curve.values()), style, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        title = "held-out people (never in RL)" if group == "heldout" else "RL people"
        ax.set_title(f"{title}, {len(results['seeds'])} seeds")
        ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 2), n_seeds=1, n_people=36, n_traj=12,
                                  n_heldout=8, n_cities=6, n_employers=4, d_model=32, n_layer=1,
                                  n_head=2, pretrain_steps=10, bio_batch=8, traj_batch=4,
                                  prompts_per_step=4, group=2, n_eval=4, n_samples=4,
                                  n_small=2, max_new=24, log_every=1)
    device = pick_device(cfg.device)
    wall0 = time.time()
    cpu0 = time.process_time()
    log(f"config: {dataclasses.asdict(cfg)}")
    seeds = [cfg.seed + i for i in range(cfg.n_seeds)]
    per_seed = [run_seed(cfg, seed, device) for seed in seeds]
    results = {
        "config": dataclasses.asdict(cfg),
        "seeds": seeds,
        "gate": average([r["gate"] for r in per_seed]),
        "arms": average([r["arms"] for r in per_seed]),
        "sim_to_real": average([r["sim_to_real"] for r in per_seed]),
        "headline": headline(per_seed),
        "per_seed": per_seed,
        "cpu_time_s": time.process_time() - cpu0,
        "wall_time_s": time.time() - wall0,
    }
    print_table(results)
    log(f"cpu time {results['cpu_time_s']:.0f}s, wall {results['wall_time_s']:.0f}s")
    save_json(os.path.join(cfg.out, "results.json"), results)
    plot(results, os.path.join(cfg.out, "ssrl.png"))
    return results


def main(argv=None):
    run_cli(Config, run, argv)


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
