"""SSRL: Self-Search Reinforcement Learning — arXiv 2508.10874 (https://arxiv.org/abs/2508.10874)

An LLM can be its own search engine: in one generation it thinks (<think>), writes a query
(<search>), writes the "retrieved" text itself (<information>) and answers (<answer>). Self-Search:
sampled many times, pass@k climbs with k (the knowledge is in the weights, poorly elicited). SSRL:
GRPO with an exact-match plus format reward sharpens it, the information tokens masked out of the
loss. Sim-to-real: stop at </search>, paste a real search result, continue.

The toy: people with an employer and a home city, employers with an HQ city, cities with a country;
four question templates, each with one right chain of searches (city: person → city; employer;
country: person → city → country; employer country: person → employer → HQ → country). A small
decoder is pretrained on "bio" lines for everyone (` P ?<think> city</think><search> P city</search>
<information> P lives in c3</information>`: every fact, and copying a name into a query; no
question, template, plan or answer) and on demonstrations of the trajectory people, which use the
right chain 30% of the time and one of the four other plans otherwise. GRPO runs on other people
(the RL people); held-out people appear only in bio lines. So the held-out gap sits in the plan,
which is person-independent: if GRPO moves plan mass, the gain transfers to people RL never saw.

Key equations (symbols as in the code):
    reward   r = 0.9 · EM(answer, gold) + 0.1 · f
    format   f = min(t/2, 1) · min(t, s+1) / max(t, s+1), t = #<think>, s = #<search>; f = 0 for a
             malformed text (the official checks)
    GRPO     Â_i = (r_i − mean_G r) / (std_G r + 1e-6);  ρ_t = π_θ(y_t) / π_old(y_t)
             L = token-mean over m_t of max(−Â ρ_t, −Â clip(ρ_t, 1−ε, 1+ε)) + β · k3(π_θ ‖ π_ref)
    mask     m_t = 1 on response tokens, 0 on every token of an <information>…</information> span
    anchor   L += β_info · token-mean over the information tokens of k3(π_θ ‖ π_ref)
    pass@k   = 1 − C(n−c, k) / C(n, k)  (unbiased, n samples of which c are correct)

Run: `python ssrl.py` (3 seeds; per seed one pretraining, then three GRPO arms from it: SSRL with
the mask and the anchor, SSRL without the anchor, mask off); `--workers 1`; `--steps 60`; `--smoke`.

Headline (results/ssrl/results.md; 3 seeds, mean ± std [worst]): before RL, held-out pass@k climbs
0.23 (k = 1) → 0.99 (k = 32). SSRL (mask on, anchored) lifts held-out pass@1 by +0.55 ± 0.10 [+0.41]
with RL people not ahead (−0.02); greedy per-hop recall stays 1.00, sampled 0.92 [0.88: under the
0.9 goal in one seed]. Without the anchor sampled recall drifts to 0.84 [0.82]; mask off: +0.63, RL
people 0.09 [0.16] ahead. Sim-to-real: greedy EM 0.89 with its own information, 0.92 real lookup.

Deviations from the paper (and its official code, TsinghuaC3I/SSRL):
- A 0.12M-parameter decoder on a synthetic world, not Llama/Qwen 3B-8B on NQ, HotpotQA, ...; the
  format is taught by pretraining (bio lines, demonstrations), not by an instruction prompt; 90
  people; templated questions; the think blocks name the next relation ("done" before the answer).
- GRPO with one update per batch (π_old = π_θ: ρ = 1, the clip never fires), group 5 as the paper,
  16 questions × 200 steps at lr 2e-4 (official: 1e-6 on 3B-8B models; a toy must move in 200
  steps), no warm-up (official 2%: 4 of 200 steps here), AdamW weight decay 0 (official 0.01; here
  a weight with no gradient stays where pretraining left it), no entropy bonus.
- The anchor (β_info = 1) is not in the paper. The official loss mask zeroes the policy-gradient,
  KL and entropy terms on the information tokens, so nothing holds them; here the updates of the
  other tokens move the weights that recall the facts, and recall drifts below 0.9 even at the lower
  learning rate (the `unanchored` arm shows it). The anchor trains no information token towards a
  reward: it only pulls them back to π_ref, the pretrained model that wrote them.
- The base KL (β = 0.001, `low_var_kl`) is masked on the information tokens (as official).
- format_reward follows the official `format_reward` check by check, except its placeholder checks
  ("your query", "your thoughts", ...), which the toy cannot write.
- Information masking by token ids. The official `create_information_loss_mask` finds blocks with a
  regex on decoded text without re.S (it misses multi-line blocks); a stray </information> here
  closes nothing.
- The "real search engine" is an exact lookup ("subject relation" → its fact line, or "no result").
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
import string
import sys
import time
import typing

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken
import datasets
from matplotlib.figure import Figure


@dataclasses.dataclass
class Config:
    """Pretrain a toy LM on a multi-hop world; Self-Search pass@k; SSRL (GRPO); pass@k again."""

    steps: int = 200  # GRPO steps per arm
    seed: int = 0  # first seed; seeds are seed, seed+1, ...
    n_seeds: int = 3  # independent runs (world, split, pretraining, RL)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON lines subject, relation (city/employer/hq/country), object; "": synthetic
    out: str = "runs/ssrl"  # folder for results.json, results.md and ssrl.png
    smoke: bool = False  # the same code path at a tiny size, in seconds
    workers: int = 0  # worker processes of one thread each (0: one per core; 1 on a GPU)
    log_every: int = 25  # RL steps between log lines and points of the recall curve
    n_people: int = 90  # synthetic people (two-token names a{i} b{j})
    n_cities: int = 16  # synthetic cities
    n_countries: int = 8  # synthetic countries
    n_employers: int = 12  # synthetic employers
    n_traj: int = 30  # people with demonstration trajectories in pretraining
    n_heldout: int = 30  # held-out people: bio lines only, never in a trajectory or in RL
    demo_right: float = 0.3  # chance that a demonstration uses its template's right chain
    pack: int = 4  # bio lines per pretraining sequence: 1..pack at random
    d_model: int = 64  # transformer width (n_embd)
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads
    pretrain_steps: int = 450  # next-token pretraining steps
    pretrain_lr: float = 1e-2  # AdamW peak learning rate for pretraining (cosine decay)
    bio_batch: int = 32  # packed bio sequences per pretraining step
    traj_batch: int = 16  # demonstration trajectories per pretraining step
    prompts_per_step: int = 16  # RL questions per GRPO step
    group: int = 5  # samples per question (G), as the paper
    rl_lr: float = 2e-4  # AdamW learning rate for GRPO
    clip_eps: float = 0.2  # GRPO clip ε
    kl_coef: float = 0.001  # β, weight of the k3 KL to the reference model (masked tokens only)
    info_kl_coef: float = 1.0  # β_info, the anchor: k3 KL to π_ref on the information tokens
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
        require(self.clip_eps > 0 and self.kl_coef >= 0 and self.info_kl_coef >= 0,
                "--clip-eps > 0, --kl-coef >= 0 and --info-kl-coef >= 0 needed")
        require(0 <= self.demo_right <= 1, f"--demo-right {self.demo_right}: must be in [0, 1]")
        require(0 <= self.stale_frac <= 1, f"--stale-frac {self.stale_frac}: must be in [0, 1]")
        require(self.data or self.n_traj + self.n_heldout < self.n_people,
                "--n-traj + --n-heldout must leave people for RL (< --n-people)")


# --- the paper's method: rewards, pass@k, the information mask, GRPO and the anchor ---


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


def information_kl(logp, ref_logp, inside):
    """The anchor: token-mean k3 estimate of KL(π_θ ‖ π_ref) over the information tokens only.

    logp, ref_logp: (N, T) log-probs of the sampled tokens under π_θ and π_ref; inside: (N, T),
    1 on the real tokens of the <information> spans. The loss mask gives these tokens no gradient,
    yet the updates of the other tokens move the weights that write them; this term pulls them
    back to the pretrained model that wrote them, with no reward on them. Clamped as verl's
    low_var_kl (log-ratio to ±20, the estimate to ±10).
    """
    if not logp.shape == ref_logp.shape == inside.shape or logp.dim() != 2:
        raise ValueError("information_kl: logp, ref_logp and inside must have one shape (N, T)")
    # u = log π_ref − log π_θ; k3 = e^u − u − 1 ≥ 0, an unbiased estimate of KL(π_θ ‖ π_ref)
    u = (ref_logp - logp).clamp(-20, 20)  # (N, T)
    kl = (torch.exp(u) - u - 1).clamp(-10, 10)  # (N, T)
    return (kl * inside).sum() / inside.sum().clamp(min=1)


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

# --- data: the world, its text and the tokenizer ---

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


class Pool(typing.NamedTuple):
    bios: list  # token ids of one bio line per fact of the world (without <s>)
    demos: dict  # template → per plan: token ids of every trajectory person's demonstration


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


def load_world(cfg, rng):
    """The synthetic world, or the user's JSON-lines facts (every template answerable)."""
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


@dataclasses.dataclass
class World:
    """One seed's world, its three groups of people and the text machinery."""
    kb: KB
    tok: Tokenizer
    pool: Pool
    traj_people: list  # demonstrations in pretraining
    heldout: list  # bio lines only: never in a trajectory or in RL
    rl_people: list  # the GRPO questions
    entities: set  # employers and cities (the subjects of the later hops)


def build_world(cfg, rng):
    """The world, the split of its people, the tokenizer and the pretraining pool."""
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
    entities = {s for (s, r) in kb.facts if r in ("hq", "country")}
    return World(kb, tok, pool, traj_people, heldout, rl_people, entities)


# --- model: a small GPT with a KV-cache sampler ---


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
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, attn_mask=None, cache=None):
        """attn_mask: (B, 1, T, T_keys) bool, or None: causal (one new token sees every key)."""
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)  # (B, T, D) each
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, T_past + T, hs)
        causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab, n_embd, n_layer, n_head, max_len):
        super().__init__()
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(max_len, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for m in self.modules():  # GPT-2 init: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx, pos=None, attn_mask=None, cache=None):
        """idx, pos: (B, T); attn_mask: (B, 1, T, T_keys) bool, or None; cache: a KVCache a block"""
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device)[None]  # (1, T)
        x = self.tok(idx) + self.pos(pos)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if cache is None else cache[i])
        return self.ln_f(x) @ self.tok.weight.T  # (B, T, vocab), tied embeddings


def full_mask(valid):
    """(B, T) valid → (B, 1, T, T): causal, keys must be valid; the diagonal is always open."""
    T = valid.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=valid.device))  # (T, T)
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)  # (T, T)
    return ((causal[None] & valid[:, None, :]) | eye)[:, None]  # (B, 1, T, T)


def positions(valid):
    """(B, T) → (B, T): left padding does not shift the positions of the real tokens."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)


class Rollout(typing.NamedTuple):
    seq: torch.Tensor  # (B, Lp + T) prompt (left-padded) and response ids
    valid: torch.Tensor  # (B, Lp + T) bool: a real token
    Lp: int  # prompt length: the response starts at Lp


def left_pad(prompts, max_new, pad, device):
    """Prompts left-padded to Lp, with room for max_new tokens: (B, Lp + max_new) ids and valid."""
    Lp = max(len(p) for p in prompts)
    seq = torch.full((len(prompts), Lp + max_new), pad, dtype=torch.long, device=device)  # (B, L)
    valid = torch.zeros(seq.shape, dtype=torch.bool, device=device)  # (B, L)
    for i, p in enumerate(prompts):
        seq[i, Lp - len(p):Lp] = torch.tensor(p, device=device)
        valid[i, Lp - len(p):Lp] = True
    return Rollout(seq, valid, Lp)


def paste_search(seq, row, Lp, t, tok, search):
    """The real search (sim-to-real): the ids to force after the query row just closed at t."""
    written = tok.decode(seq[row, Lp:t + 1].tolist())
    query = written.rsplit("<search>", 1)[-1][:-len("</search>")]
    return tok.encode(f"<information> {search(query)}</information>")


@torch.no_grad()
def generate(model, prompts, max_new, tok, device, temperature=1.0, search=None):
    """Sample with a KV cache from prompts (lists of ids, left-padded here), up to </answer>.

    search: None (self-search), or query text → information text, forced into a row after each
    </search> (sim-to-real: the pasted tokens replace what the model would have written)."""
    pad = tok.special["<pad>"]
    seq, valid, Lp = left_pad(prompts, max_new, pad, device)
    B, L = seq.shape
    cache = [KVCache() for _ in model.blocks]
    padded = any(len(p) != Lp for p in prompts)  # left padding needs key masks
    prefill_mask = full_mask(valid[:, :Lp]) if padded else None
    logits = model(seq[:, :Lp], positions(valid[:, :Lp]), prefill_mask, cache)[:, -1]  # (B, V)
    n_valid = valid.sum(1)  # (B,) position of the next token
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    forced = [[] for _ in range(B)]
    t = Lp
    for t in range(Lp, L):
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
                forced[i] = paste_search(seq, i, Lp, t, tok, search)
        done = done | (nxt == tok.special["</answer>"])
        if bool(done.all()) or t == L - 1:
            break
        step_mask = valid[:, None, None, :t + 1] if padded else None  # (B, 1, 1, t+1)
        logits = model(seq[:, t:t + 1], n_valid[:, None], step_mask, cache)[:, -1]  # (B, V)
        n_valid = n_valid + valid[:, t]
    return Rollout(seq[:, :t + 1], valid[:, :t + 1], Lp)


def response_logp(model, rollout):
    """log π(y_t) of the response tokens seq[:, Lp:]: (N, T)."""
    seq = rollout.seq
    valid = rollout.valid
    Lp = rollout.Lp
    padded = not bool(valid[:, :Lp].all())  # left padding needs key masks
    mask = full_mask(valid[:, :-1]) if padded else None
    logits = model(seq[:, :-1], positions(valid[:, :-1]), mask)  # (N, L-1, V)
    logp = F.log_softmax(logits[:, Lp - 1:], -1)  # (N, T, V)
    return logp.gather(-1, seq[:, Lp:, None])[..., 0]  # (N, T)


def decode_responses(tok, rollout):
    seqs = rollout.seq[:, rollout.Lp:].cpu()
    valids = rollout.valid[:, rollout.Lp:].cpu()
    return [tok.decode(s[v].tolist()) for s, v in zip(seqs, valids)]


def new_model(cfg, world, device):
    """The decoder sized for the world: positions for the longest packed pretraining sequence."""
    longest = max(len(b) for b in world.pool.bios) * cfg.pack + 1
    model = GPT(len(world.tok.raw), cfg.d_model, cfg.n_layer, cfg.n_head, max(longest, 96))
    return model.to(device)


# --- training: next-token pretraining, then GRPO with the mask and the anchor ---


def get_lr(step, total, lr, warmup):
    """nanoGPT's schedule: linear warm-up for `warmup` steps, then cosine decay to lr / 10."""
    # 1) linear warm-up from lr / warmup to lr
    if step < warmup:
        return lr * (step + 1) / warmup
    # 2) cosine decay from lr (progress 0) to lr / 10 (progress 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)


def pretrain(model, pool, cfg, device, tok, rng, seed=0):
    """Next-token loss on packed bio lines plus demonstration trajectories."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.98),
                            weight_decay=0.0)
    pad = tok.special["<pad>"]
    start = time.time()
    n_tok = 0
    templates = list(TEMPLATES)
    for step in range(1, cfg.pretrain_steps + 1):
        lr = get_lr(step - 1, cfg.pretrain_steps, cfg.pretrain_lr, warmup=20)
        opt.param_groups[0]["lr"] = lr
        seqs = [sample_packed_bios(pool, cfg.pack, tok.special["<s>"], rng)
                for _ in range(cfg.bio_batch)]
        seqs += [sample_demo(pool, rng.choice(templates), cfg.demo_right, rng)
                 for _ in range(cfg.traj_batch)]
        ids, valid = pad_batch(seqs, pad, device)  # (B, T)
        logits = model(ids[:, :-1])  # (B, T-1, V), causal
        # L = mean over real tokens of −log p(x_{t+1} | x_≤t)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        target_valid = valid[:, 1:].float()  # (B, T-1)
        loss = (nll * target_valid).sum() / target_valid.sum()
        check_finite(step, pretrain_loss=loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n_tok += int(valid.sum())
        if step % max(1, cfg.pretrain_steps // 4) == 0:
            log_progress(step, cfg.pretrain_steps, start, seed=seed, pretrain_loss=loss.item(),
                         tok_per_s=n_tok / (time.time() - start))


class Arm(typing.NamedTuple):
    """One GRPO arm: which tokens the loss masks and whether the information tokens are anchored."""
    info_mask: bool  # m_t = 0 on the information tokens (the paper's setting)
    anchored: bool  # + β_info · k3(π_θ ‖ π_ref) on the information tokens


ARMS = {"after_rl": Arm(info_mask=True, anchored=True),  # SSRL: mask on, anchored
        "unanchored": Arm(info_mask=True, anchored=False),  # SSRL without the anchor
        "mask_off": Arm(info_mask=False, anchored=False)}  # the control: information trained


def grpo_step(policy, ref, opt, rollout, rewards, arm, cfg, tok, step):
    """One GRPO update from a rollout and its (B, G) rewards; returns the loss terms."""
    adv = group_normalize(rewards).reshape(-1)  # (N,)
    resp = rollout.seq[:, rollout.Lp:]  # (N, T)
    valid = rollout.valid[:, rollout.Lp:]  # (N, T)
    inside = information_mask(resp, tok.special["<information>"],
                              tok.special["</information>"]) & valid  # (N, T)
    mask = valid & ~inside if arm.info_mask else valid  # m_t: "retrieved", not chosen
    policy.train()
    with torch.no_grad():
        ref_logp = response_logp(ref, rollout)  # (N, T)
    logp = response_logp(policy, rollout)  # (N, T)
    loss, terms = grpo_loss(logp, logp.detach(), ref_logp, mask.float(), adv,
                            clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef)
    info_kl = information_kl(logp, ref_logp, inside.float())
    if arm.anchored:
        loss = loss + cfg.info_kl_coef * info_kl
    check_finite(step, loss=loss.item(), pg_loss=terms["pg_loss"], kl=terms["kl"],
                 info_kl=info_kl.item())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return {"loss": loss.item(), "pg": float(terms["pg_loss"]), "kl": float(terms["kl"]),
            "info_kl": info_kl.item()}


def ssrl(policy, ref, kb, questions, cfg, tok, device, arm, rng, probe, tag):
    """GRPO on self-search rollouts of `questions` ((person, template) of RL people only).

    probe(policy) → a dict of measurements, taken at step 0 and every log_every steps; tag: the
    arm and seed shown in the log. Returns those points (with the mean reward since the last)."""
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = time.time()
    curve = [{"step": 0, **probe(policy)}]
    rewards_seen = []
    for step in range(1, cfg.steps + 1):
        batch = [rng.choice(questions) for _ in range(cfg.prompts_per_step)]
        flat = [q for q in batch for _ in range(cfg.group)]
        prompts = [tok.encode("<s> " + prompt_text(p, t)) for p, t in flat]
        policy.eval()
        rollout = generate(policy, prompts, cfg.max_new, tok, device)  # (N, L), N = B·G
        texts = decode_responses(tok, rollout)
        rewards = [answer_reward(text, kb.gold(p, t)) for text, (p, t) in zip(texts, flat)]
        r = torch.tensor(rewards, device=device).view(len(batch), cfg.group)  # (B, G)
        terms = grpo_step(policy, ref, opt, rollout, r, arm, cfg, tok, step)
        rewards_seen += rewards
        if step % cfg.log_every == 0 or step == cfg.steps:
            point = {"step": step, "reward": float(np.mean(rewards_seen)), **terms,
                     **probe(policy)}
            curve.append(point)
            rewards_seen = []
            metrics = {k: v for k, v in point.items() if k != "step"}
            log_progress(step, cfg.steps, start, **tag, **metrics,
                         samples_per_s=step * len(flat) / (time.time() - start))
    return curve


# --- the study: arms, seeds, the record (a reader who came for the method may stop here) ---

GATE_RECALL = 0.95  # greedy per-hop recall of the held-out facts before RL, the right query given
GATE_COPY = 0.85  # the first query names the asked (held-out) person
GOAL_GAIN = 0.3  # held-out pass@1 gain of SSRL, every seed
GOAL_RECALL = 0.9  # per-hop recall after SSRL (greedy and sampled, all hops), every seed
GOAL_LEAD = 0.15  # RL people's pass@1 ahead of held-out people, every seed


def mean_or_none(xs):
    return float(np.mean(xs)) if len(xs) else None


def parse_pairs(text):
    """Each search → information pair as (query, information text)."""
    return re.findall(r"<search>(.*?)</search><information>(.*?)</information>", text, re.S)


def plan_is_correct(text, person, chain, verbs):
    """Strict plan accuracy of one response: exactly len(chain) search → information pairs, query i
    is "{subject} {chain[i]}", the first subject is the asked person and each later subject is the
    object the previous information block wrote ("{subject} {verb} {object}"), right or wrong."""
    pairs = parse_pairs(text)
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
        "hop_recall_sampled": mean_or_none([ok for s in scores for _, ok in s["hops"]]),
        "hop_recall_sampled_by_relation": {rel: mean_or_none(hop_hits.get(rel, []))
                                           for rel in VERBS},
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


def evaluate(model, kb, eval_people, all_people, cfg, tok, device, entities=frozenset()):
    """pass@k etc. from n_samples at T = 1 on eval_people; greedy EM and plan on all_people; greedy
    per-hop recall (the right query given) of all_people's and the entities' facts."""
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
    recall = hop_recall_gate(model, kb, set(all_people) | set(entities), tok, device)
    out["hop_recall"] = recall[0]
    out["hop_recall_by_relation"] = recall[1]
    return out


def measure(policy, world, cfg, device, label):
    """evaluate() on the held-out people and on the RL people; one log line."""
    groups = {"heldout": (world.heldout[:cfg.n_eval], world.heldout),
              "rl_people": (world.rl_people[:cfg.n_eval], world.rl_people)}
    out = {}
    for name, (few, every) in groups.items():
        out[name] = evaluate(policy, world.kb, few, every, cfg, world.tok, device, world.entities)
    parts = [f"{g} pass@1 {b['pass_at_k']['1']:.3f} plan {b['plan_accuracy']:.3f} greedy EM "
             f"{b['greedy_em']:.3f} recall {b['hop_recall']:.3f}" for g, b in out.items()]
    print(f"{label}: " + " | ".join(parts))
    return out


def recall_probe(world, cfg, device, seed):
    """probe(policy): recall of the self-written information on the held-out people, two ways.

    greedy: the fact written greedily after the right query in the pretraining form (the weights);
    sampled: the facts written in self-search trajectories at T = 1, one per question (what the
    policy writes). Its samples use their own noise, so probing leaves the RL run unchanged."""
    questions = [(p, t) for p in world.heldout for t in TEMPLATES]
    subjects = set(world.heldout) | world.entities
    cuda = [device.index or 0] if device.type == "cuda" else []

    def probe(policy):
        greedy = hop_recall_gate(policy, world.kb, subjects, world.tok, device)[0]
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            scores = sample_scores(policy, world.kb, questions, 1, world.tok, device, cfg.max_new)
        sampled = mean_or_none([ok for s in scores for _, ok in s["hops"]])
        return {"greedy": greedy, "sampled": sampled}

    return probe


def stale_kb(kb, people, frac, rng):
    """The world after pretraining: a fraction of `people` moved to another home city."""
    moved = rng.sample(people, int(round(frac * len(people))))
    cities = sorted({o for (s, r), o in kb.facts.items() if r == "city"})
    facts = dict(kb.facts)
    for person in moved:
        facts[(person, "city")] = rng.choice([c for c in cities if c != facts[(person, "city")]])
    return KB([(s, r, o) for (s, r), o in facts.items()]), len(moved)


def em_self_and_real(model, kb, questions, n, tok, device, max_new, temperature=1.0):
    """EM with self-written information vs with the real lookup pasted after each </search>."""
    own = sample_scores(model, kb, questions, n, tok, device, max_new, temperature)
    real = sample_scores(model, kb, questions, n, tok, device, max_new, temperature, kb.search)
    return {
        "em_self": mean_or_none([s["em"] for s in own]),
        "em_real": mean_or_none([s["em"] for s in real]),
        "hop_recall_self": mean_or_none([ok for s in own for _, ok in s["hops"]]),
        "plan_accuracy_self": mean_or_none([s["plan"] for s in own]),
        "plan_accuracy_real": mean_or_none([s["plan"] for s in real]),
    }


def sim_to_real(model, world, cfg, device, seed):
    """Held out: greedy EM on every person and n_small samples on n_eval people, self-search vs
    the real lookup; the same in a stale world where some of those people moved city."""
    set_seed(seed + 20)
    few = [(p, t) for p in world.heldout[:cfg.n_eval] for t in TEMPLATES]
    every = [(p, t) for p in world.heldout for t in TEMPLATES]
    greedy = em_self_and_real(model, world.kb, every, 1, world.tok, device, cfg.max_new, 0)
    heldout = em_self_and_real(model, world.kb, few, cfg.n_small, world.tok, device, cfg.max_new)
    heldout["greedy_em"] = greedy["em_real"]
    heldout["greedy_em_self"] = greedy["em_self"]
    stale, n_moved = stale_kb(world.kb, world.heldout[:cfg.n_eval], cfg.stale_frac,
                              random.Random(seed + 3))
    stale_world = em_self_and_real(model, stale, few, cfg.n_small, world.tok, device, cfg.max_new)
    stale_world["moved_people"] = n_moved
    return {"heldout": heldout, "stale_world": stale_world}


class SeedJob(typing.NamedTuple):
    cfg: Config
    seed: int


class ArmJob(typing.NamedTuple):
    cfg: Config
    seed: int
    arm: str  # a key of ARMS
    weights: dict  # the seed's pretrained weights: name → numpy array


def pretrain_seed(job):
    """Job: one seed's world, pretraining, gates, evaluation before RL, sim-to-real, the weights."""
    cpu_start = time.process_time()
    cfg = job.cfg
    device = pick_device(cfg.device)
    set_seed(job.seed)
    rng = random.Random(job.seed)
    world = build_world(cfg, rng)
    model = new_model(cfg, world, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"seed {job.seed}: {len(people_of(world.kb))} people ({len(world.traj_people)} with "
          f"demonstrations, {len(world.rl_people)} for RL, {len(world.heldout)} held out); "
          f"{len(world.kb.facts)} facts; vocab {len(world.tok.raw)}; {n_params / 1e6:.2f}M params")
    pretrain(model, world.pool, cfg, device, world.tok, rng, seed=job.seed)
    groups = measure(model, world, cfg, device, f"seed {job.seed} before RL")
    held = groups["heldout"]
    # gates: the facts are in the weights, and a held-out name is copied into the first query
    gate = {"hop_recall": held["hop_recall"], "copy": held["copy"],
            "hop_recall_by_relation": held["hop_recall_by_relation"]}
    gate["passed"] = gate["hop_recall"] >= GATE_RECALL and gate["copy"] >= GATE_COPY
    print(f"seed {job.seed} gates: held-out hop recall {gate['hop_recall']:.3f} "
          f"(>= {GATE_RECALL}), copy {gate['copy']:.3f} (>= {GATE_COPY}): "
          f"{'passed' if gate['passed'] else 'FAILED'}")
    sim = sim_to_real(model, world, cfg, device, job.seed)
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return {"seed": job.seed, "n_params": n_params, "gate": gate, "groups": groups,
            "sim_to_real": sim, "weights": weights, "cpu_s": time.process_time() - cpu_start}


def train_arm(job):
    """Job: one arm of one seed: GRPO from the pretrained weights, the recall curve, evaluation."""
    cpu_start = time.process_time()
    cfg = job.cfg
    device = pick_device(cfg.device)
    set_seed(job.seed)
    world = build_world(cfg, random.Random(job.seed))
    policy = new_model(cfg, world, device)
    policy.load_state_dict({k: torch.from_numpy(v) for k, v in job.weights.items()})
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    arm = ARMS[job.arm]
    print(f"seed {job.seed}, {job.arm}: {cfg.steps} steps x {cfg.prompts_per_step} questions x "
          f"{cfg.group} samples, information mask {'on' if arm.info_mask else 'off'}, anchor "
          f"{cfg.info_kl_coef if arm.anchored else 0}")
    set_seed(job.seed + 10)  # every arm starts from the same sampling noise
    rl_rng = random.Random(job.seed + 10)
    questions = [(p, t) for p in world.rl_people for t in TEMPLATES]  # RL people only
    probe = recall_probe(world, cfg, device, job.seed + 30)
    curve = ssrl(policy, ref, world.kb, questions, cfg, world.tok, device, arm, rl_rng, probe,
                 {"arm": job.arm, "seed": job.seed})
    groups = measure(policy, world, cfg, device, f"seed {job.seed} {job.arm}")
    sim = sim_to_real(policy, world, cfg, device, job.seed)
    return {"seed": job.seed, "arm": job.arm, "groups": groups, "sim_to_real": sim,
            "recall_curve": curve, "cpu_s": time.process_time() - cpu_start}


def average(values):
    """Mean over seeds of numbers, dicts of numbers (recursively); None stays None."""
    if isinstance(values[0], dict):
        return {k: average([v[k] for v in values]) for k in values[0]}
    if any(v is None for v in values):
        return None
    return float(np.mean(values))


def seed_metrics(before, after):
    """One seed's headline numbers for one arm (held out unless named); before, after: groups."""
    held = after["heldout"]
    pass1 = held["pass_at_k"]["1"]
    pass1_before = before["heldout"]["pass_at_k"]["1"]
    pass1_rl_people = after["rl_people"]["pass_at_k"]["1"]
    return {"pass_at_1": pass1, "pass_at_1_gain": pass1 - pass1_before,
            "hop_recall": held["hop_recall"], "hop_recall_sampled": held["hop_recall_sampled"],
            "plan_accuracy": held["plan_accuracy"], "greedy_em": held["greedy_em"],
            "rl_people_lead": pass1_rl_people - pass1}


def collect(cfg, pretrained, trained):
    """results.json from the jobs: seed means, per-seed numbers, recall curves, sim-to-real."""
    befores = [p["groups"] for p in pretrained]
    arms = {"before_rl": {**average(befores), "per_seed": [seed_metrics(b, b) for b in befores]}}
    sims = {"before_rl": average([p["sim_to_real"] for p in pretrained])}
    curves = {}
    for name in ARMS:
        runs = [t for t in trained if t["arm"] == name]  # in seed order
        per_seed = [seed_metrics(b, t["groups"]) for b, t in zip(befores, runs)]
        arms[name] = {**average([t["groups"] for t in runs]), "per_seed": per_seed}
        sims[name] = average([t["sim_to_real"] for t in runs])
        curves[name] = [t["recall_curve"] for t in runs]
    gates = [p["gate"] for p in pretrained]
    gate = {**average([{k: v for k, v in g.items() if k != "passed"} for g in gates]),
            "passed": all(g["passed"] for g in gates), "per_seed": gates}
    sim_to_real = {**sims.pop("after_rl"), "other_arms": sims}
    return {"config": dataclasses.asdict(cfg), "seeds": [p["seed"] for p in pretrained],
            "n_params": pretrained[0]["n_params"], "gate": gate, "arms": arms,
            "sim_to_real": sim_to_real, "recall_curve": curves,
            "cpu_time_s": sum(job["cpu_s"] for job in pretrained + trained)}


ARM_LABELS = {"before_rl": "before RL", "after_rl": "SSRL (mask on, anchored)",
              "unanchored": "SSRL without the anchor", "mask_off": "mask off (control)"}
SHORT_LABELS = {"before_rl": "before RL", "after_rl": "SSRL", "unanchored": "no anchor",
                "mask_off": "mask off"}
COLORS = {"before_rl": "tab:gray", "after_rl": "tab:blue", "unanchored": "tab:red",
          "mask_off": "tab:orange"}


def curve_mean(runs, key):
    """Mean over seeds of one measurement along the RL steps: (steps, values)."""
    steps = [point["step"] for point in runs[0]]
    values = [average([run[i][key] for run in runs]) for i in range(len(steps))]
    return steps, values


def plot(results):
    """Held-out pass@k per arm; recall of the self-written information over RL; sim-to-real."""
    fig = Figure(figsize=(4.6 * 3, 3.6))
    axes = fig.subplots(1, 3, squeeze=False)[0]
    n_seeds = len(results["seeds"])
    for name, arm in results["arms"].items():
        curve = arm["heldout"]["pass_at_k"]
        axes[0].plot([int(k) for k in curve], list(curve.values()), color=COLORS[name],
                     label=ARM_LABELS[name])
    axes[0].set_xscale("log", base=2)
    axes[0].set(ylim=(0, 1.02), xlabel="k", ylabel="pass@k",
                title=f"held-out people (never in RL), {n_seeds} seeds")
    axes[0].legend(loc="lower right", fontsize=7)
    for name, runs in results["recall_curve"].items():
        for key, style in (("greedy", "-"), ("sampled", "--")):
            steps, values = curve_mean(runs, key)
            axes[1].plot(steps, values, style, color=COLORS[name], label=f"{name}, {key}")
    axes[1].axhline(GOAL_RECALL, color="black", lw=0.6, ls=":")
    axes[1].set(ylim=(0.6, 1.01), xlabel="GRPO step", ylabel="per-hop recall (held out)",
                title="self-written information: greedy (—), sampled (--)")
    axes[1].legend(loc="lower left", fontsize=7)
    sims = {"before_rl": results["sim_to_real"]["other_arms"]["before_rl"],
            "after_rl": results["sim_to_real"]}
    sims.update({n: results["sim_to_real"]["other_arms"][n] for n in ("unanchored", "mask_off")})
    xs = np.arange(len(sims))
    own = [block["heldout"]["greedy_em_self"] for block in sims.values()]
    real = [block["heldout"]["greedy_em"] for block in sims.values()]
    axes[2].bar(xs - 0.2, own, 0.4, color="tab:gray", label="self-search (own information)")
    axes[2].bar(xs + 0.2, real, 0.4, color="tab:green", label="real lookup pasted")
    axes[2].set_xticks(xs, [SHORT_LABELS[n] for n in sims], fontsize=8)
    axes[2].set(ylim=(0, 1.02), ylabel="greedy EM (held out)", title="sim-to-real")
    axes[2].legend(loc="upper left", fontsize=7)
    return fig


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def spread(values, worst_is_max=False):
    """mean ± std [worst] over seeds."""
    if None in values:
        return "n/a"
    worst = max(values) if worst_is_max else min(values)
    return f"{np.mean(values):.3f} ± {np.std(values):.3f} [{worst:.3f}]"


def met(ok):
    return "met" if ok else "NOT met"


def render_verdicts(results):
    """The verdict lines, each computed from the per-seed numbers."""
    arms = results["arms"]
    before = arms["before_rl"]["heldout"]["pass_at_k"]
    k_max = list(before)[-1]
    ssrl_seeds = arms["after_rl"]["per_seed"]
    gains = [s["pass_at_1_gain"] for s in ssrl_seeds]
    # no fact written counts as none recalled
    recalls = [min(s["hop_recall"] or 0.0, s["hop_recall_sampled"] or 0.0) for s in ssrl_seeds]
    leads = [s["rl_people_lead"] for s in ssrl_seeds]
    unanchored = [s["hop_recall_sampled"] or 0.0 for s in arms["unanchored"]["per_seed"]]
    sim = results["sim_to_real"]["heldout"]
    climbs = before[k_max] - before["1"]
    lines = [
        f"- Self-Search before RL: held-out pass@1 {before['1']:.3f} → pass@{k_max} "
        f"{before[k_max]:.3f}: " + ("pass@k climbs with k, the knowledge is in the weights."
                                    if climbs >= 0.3 else "pass@k barely climbs with k."),
        f"- Gates before RL: {'passed' if results['gate']['passed'] else 'FAILED'} in every seed "
        f"(greedy per-hop recall ≥ {GATE_RECALL}, copy ≥ {GATE_COPY}).",
        f"- SSRL held-out pass@1 gain {spread(gains)}: goal ≥ +{GOAL_GAIN} in every seed "
        f"{met(min(gains) >= GOAL_GAIN)}.",
        f"- SSRL per-hop recall after RL (the lower of greedy and sampled, all hops) "
        f"{spread(recalls)}: goal ≥ {GOAL_RECALL} in every seed "
        f"{met(min(recalls) >= GOAL_RECALL)}.",
        f"- SSRL RL-people lead {spread(leads, worst_is_max=True)}: goal ≤ {GOAL_LEAD} in every "
        f"seed {met(max(leads) <= GOAL_LEAD)}.",
        f"- Without the anchor, sampled per-hop recall after RL {spread(unanchored)}: "
        + ("it drifts below the goal in some seed." if min(unanchored) < GOAL_RECALL
           else "it holds without the anchor too."),
        f"- Sim-to-real: the SSRL policy's greedy held-out EM is {sim['greedy_em_self']:.3f} with "
        f"its own information and {sim['greedy_em']:.3f} with the real lookup pasted in "
        f"({sim['greedy_em'] - sim['greedy_em_self']:+.3f}).",
    ]
    return lines


def render_headline_table(arms):
    """Per arm, held out: mean ± std [worst] over seeds of the headline numbers."""
    keys = ["pass_at_1", "pass_at_1_gain", "hop_recall", "hop_recall_sampled", "plan_accuracy",
            "greedy_em", "rl_people_lead"]
    lines = ["| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, arm in arms.items():
        cells = [spread([s[k] for s in arm["per_seed"]], worst_is_max=k == "rl_people_lead")
                 for k in keys]
        lines.append(f"| {ARM_LABELS[name]} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (held out):", "", "| arm | seed | " + " | ".join(keys) + " |",
              "|---" * (len(keys) + 2) + "|"]
    for name, arm in arms.items():
        for seed, s in zip(arm["seeds"], arm["per_seed"]):
            lines.append(f"| {name} | {seed} | " + " | ".join(fmt(s[k]) for k in keys) + " |")
    return lines


def render_groups_table(arms):
    """Means over seeds per arm and group: pass@k, plan, greedy EM, recall, format, follows."""
    ks = [k for k in ("1", "4", "32") if k in arms["before_rl"]["heldout"]["pass_at_k"]]
    head = [f"pass@{k}" for k in ks] + ["plan", "greedy EM", "recall greedy", "recall sampled",
                                        "format", "answer follows info"]
    lines = ["| arm | people | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for name, arm in arms.items():
        for group in ("heldout", "rl_people"):
            block = arm[group]
            cells = [block["pass_at_k"][k] for k in ks] + [
                block["plan_accuracy"], block["greedy_em"], block["hop_recall"],
                block["hop_recall_sampled"], block["format_rate"],
                block["answer_follows_information"]]
            lines.append(f"| {name} | {group} | " + " | ".join(fmt(c) for c in cells) + " |")
    return lines


def render_by_relation_and_template(arms):
    """Held out: pass@1 by template, and per-hop recall by relation (greedy / sampled)."""
    lines = ["| arm | " + " | ".join(TEMPLATES) + " | " + " | ".join(VERBS) + " |",
             "|---" * (len(TEMPLATES) + len(VERBS) + 1) + "|"]
    for name, arm in arms.items():
        held = arm["heldout"]
        cells = [fmt(held["by_template"][t]["pass_at_1"]) for t in TEMPLATES]
        cells += [f"{fmt(held['hop_recall_by_relation'].get(r))} / "
                  f"{fmt(held['hop_recall_sampled_by_relation'][r])}" for r in VERBS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_curve(curves):
    """Recall of the self-written information over RL steps, mean over seeds, per arm."""
    names = list(curves)
    head = [f"{n} {key}" for n in names for key in ("greedy", "sampled")]
    head += [f"{n} info KL" for n in names]
    lines = ["| step | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    series = [curve_mean(curves[n], key)[1] for n in names for key in ("greedy", "sampled")]
    series += [curve_mean([run[1:] for run in curves[n]], "info_kl")[1] for n in names]
    steps = curve_mean(curves[names[0]], "greedy")[0]
    for i, step in enumerate(steps):
        cells = [fmt(values[i]) for values in series[:2 * len(names)]]
        cells += [fmt(values[i - 1]) if i else "—" for values in series[2 * len(names):]]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def render_sim_to_real(sim_to_real):
    """Per arm, held out: EM with its own information vs with the real lookup pasted."""
    blocks = {"before_rl": sim_to_real["other_arms"]["before_rl"], "after_rl": sim_to_real}
    blocks.update({n: sim_to_real["other_arms"][n] for n in ("unanchored", "mask_off")})
    head = ["greedy EM own", "greedy EM real", "sampled EM own", "sampled EM real",
            "plan own", "plan real", "recall own", "stale world EM own", "stale world EM real"]
    lines = ["| arm | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, block in blocks.items():
        held = block["heldout"]
        stale = block["stale_world"]
        cells = [held["greedy_em_self"], held["greedy_em"], held["em_self"], held["em_real"],
                 held["plan_accuracy_self"], held["plan_accuracy_real"], held["hop_recall_self"],
                 stale["em_self"], stale["em_real"]]
        lines.append(f"| {name} | " + " | ".join(fmt(c) for c in cells) + " |")
    return lines


def render_report(results):
    """The markdown record, from results.json alone."""
    cfg = results["config"]
    arms = {name: {**arm, "seeds": results["seeds"]} for name, arm in results["arms"].items()}
    gate = results["gate"]
    lines = [
        "# SSRL: Self-Search RL on a toy multi-hop world (arXiv 2508.10874)", "",
        f"Seeds {results['seeds']}; {cfg['n_people']} people ({cfg['n_traj']} with "
        f"demonstrations, {cfg['n_heldout']} held out, the rest for RL); a "
        f"{results['n_params'] / 1e6:.2f}M-parameter decoder; GRPO {cfg['steps']} steps × "
        f"{cfg['prompts_per_step']} questions × {cfg['group']} samples at lr {cfg['rl_lr']}; "
        f"anchor β_info = {cfg['info_kl_coef']}. pass@k from {cfg['n_samples']} samples at T = 1 "
        f"on {cfg['n_eval']} people × 4 templates per group; greedy EM and greedy per-hop recall "
        "(the right query given, in the pretraining form) over every person of the group; sampled "
        "per-hop recall: the facts written in the T = 1 trajectories. mean ± std [worst seed].",
        "", "## Verdicts", "", *render_verdicts(results), "",
        f"Gates per seed: greedy per-hop recall "
        f"{[round(g['hop_recall'], 3) for g in gate['per_seed']]}, copy "
        f"{[round(g['copy'], 3) for g in gate['per_seed']]}.", "",
        "## Held out, per arm", "", *render_headline_table(arms), "",
        "## Every group (means over seeds)", "", *render_groups_table(arms), "",
        "## Held out: pass@1 by template; per-hop recall by relation (greedy / sampled)", "",
        *render_by_relation_and_template(arms), "",
        "## Recall of the self-written information over RL steps (held out, mean over seeds)", "",
        "greedy: with the right query, in the pretraining form; sampled: in self-search "
        "trajectories at T = 1; info KL: the k3 KL to π_ref on the information tokens of the "
        "rollouts (the anchor's term).", "", *render_curve(results["recall_curve"]), "",
        "## Sim-to-real (held out): own information vs the real lookup pasted after </search>", "",
        *render_sim_to_real(results["sim_to_real"]), "",
        f"Cost: {results['wall_s']:.0f} s wall, {results['cpu_time_s']:.0f} s CPU in the jobs.", ""]
    return "\n".join(lines)


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 2), n_seeds=1, n_people=36, n_traj=12,
                                  n_heldout=8, n_cities=6, n_employers=4, d_model=32, n_layer=1,
                                  n_head=2, pretrain_steps=10, bio_batch=8, traj_batch=4,
                                  prompts_per_step=4, group=2, n_eval=4, n_samples=4,
                                  n_small=2, max_new=24, log_every=1)
    device = pick_device(cfg.device)
    start = time.time()
    print(f"config: {dataclasses.asdict(cfg)}")
    seeds = [cfg.seed + i for i in range(cfg.n_seeds)]
    pretrained = run_jobs(pretrain_seed, [SeedJob(cfg, s) for s in seeds], cfg.workers, device)
    jobs = [ArmJob(cfg, p["seed"], name, p["weights"]) for p in pretrained for name in ARMS]
    trained = run_jobs(train_arm, jobs, cfg.workers, device)
    results = collect(cfg, pretrained, trained)
    results["wall_s"] = time.time() - start
    print(render_report(results))
    write_record(cfg.out, "ssrl", results, plot(results))
    return results


def main(argv=None):
    run_cli(Config, run, argv)


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
