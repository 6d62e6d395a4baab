"""Fourier Position Embedding (FoPE), arXiv 2412.17739, https://arxiv.org/abs/2412.17739, with the
Positional Heads analysis of arXiv 2410.08703, https://arxiv.org/abs/2410.08703 (same group).

The idea. RoPE rotates slot k of q and k by n·ω_k, so q'_m·k'_n depends only on m − n. FoPE argues
that (CF) a slot whose period exceeds the training length never sees a full cycle, so it is clipped
to frequency zero, and (FS) linear layers and MLPs leak energy between frequencies, so every kept
slot becomes a Fourier series over all kept frequencies; attention should then keep working beyond
L_train. The Positional Heads paper asks which rotary slots carry each head's long-distance logits,
and ablates the heads whose long-distance attention sits in the high (low-frequency) slots.

Key equations (d = head_dim, slot k pairs dims k and k + d/2, n = position, H = n_head):
    RoPE   ω_k = base^(−2k/d);  x' = x ⊙ cos(nω) + rotate_half(x) ⊙ sin(nω)          (rope_rotate)
           rotate_half([x1, x2]) = [−x2, x1]
    CF     keep the K slots with ω_k ≥ 2π / L_train; the others: cos = sin = 1 (official fill)
    FS     S_{h,j}(n) = Σ_k sin(ω_k n)·A_sin[h,k,j],  C_{h,j}(n) = Σ_k cos(ω_k n)·A_cos[h,k,j]
           for the d' = min(K, d/4) rotating output slots j (the official cap);
           A = I + N(0, std²), frozen, per layer and head;  std = σ·√(2 / (d'(K + H)))
           (the official xavier_normal_ with gain σ on the (H, K, d') tensor)
           x' = x ⊙ [C, C] + rotate_half(x) ⊙ [S, S]                      (fope_tables, fope_rotate)
    ALiBi  logit_{m,n} −= slope_h·(m − n),  slope_h = 2^(−8h/H)                        (alibi_bias)
    Positional-head score (our operationalisation; the paper's full text was not available):
           g_i(m, n) = q̃_m[i]k̃_n[i] + q̃_m[i+d/2]k̃_n[i+d/2]   (signed; Σ_i g_i = q̃_m·k̃_n)
           score_h = Σ_{m−n>L_train} a_h(m,n)·Σ_{i≥d/4} g_i(m,n)/√d  /  Σ_{m−n>L_train} a_h(m,n)
           ablation: zero the top-k heads' outputs vs k random others; the rise of far-recall NLL.

The toy. Filler from an order-2 Markov chain with 4 keys per sequence, each written twice as
`KEY_i v` at random places: the second v is predictable only by retrieving the first, at any
distance. Loss = mean filler NLL + mean recall NLL. 4 pre-LN blocks, n_embd 64, 2 heads of 32,
L_train = 64, 300 AdamW steps of 16 sequences. Arms: rope, fope, cf_only (clipping alone), fs_only
(the series alone), alibi, nope, fope_small (the paper's smaller noise), 3 seeds each. Evaluation
at 64 … 512 (8x): perplexity (total, recall, far recall > 64 back, filler) and recall accuracy
("passkey", chance 1/16). Control: attention windowed to the last 64 keys. Ceilings: recall ppl 1,
passkey 1, the true chain's filler ppl. Gate: windowed far recall stays at chance or worse.

Run: `python fope.py` (arms x seeds as jobs on every core); `--seeds 5`; `--arms rope,fope
--steps 600`; `--data my.jsonl` trains on your text (column "text", byte tokens, perplexity only);
`--smoke` runs the same code path in seconds.

Headline (3 seeds per arm, at 4x L_train = 256; every number: results/fope/results.md): retrieval
beyond L_train yes, by clipping alone: recall ppl fope 1.014 ± 0.007, cf_only 1.014 ± 0.005, rope
2.18 ± 0.72 (ceiling 1); passkey 1.00 vs 0.79. Perplexity no: total ppl fope 3.35 ± 0.13 vs rope
3.30 ± 0.03 (1.37x its own at 64); attention windowed to 64 keys holds every rotary arm's filler ppl
at 2.7–3.0, so the rise is locality leakage. Positional heads (rope): ablating the top 2 raises
far-recall NLL by 2.64 vs 0.33 for random heads (2 of 3 seeds).

Deviations from the paper (and its official OLMo-based code):
- Toy scale: 4 layers, n_embd 64, 300 steps at length 64 on a synthetic corpus built so that the
  perplexity needs retrieval (paper: OLMo 60M–1.2B on C4 at 512, evaluated to 8192).
- fs_only (no clipping) rotates all d/2 slots (d' = d/2) so that FoPE(σ = 0, no clip) is exactly
  RoPE; the official code caps d' at d/4 with a stride identity. With clipping the official
  d' = min(K, d/4) is kept (= K = 5 here).
- Noise: `fope` uses the official effective std σ·√(2/(d'(K+H))) = 0.072 at σ = 0.3, d' = K = 5,
  H = 2 (3x the paper's ≈ 0.02, because H and K are small here); `fope_small` uses 0.0217, the
  official formula at head_dim 64, 8 heads, L_train 512 (K = d' = 16; our guess at the 60M
  model). The coefficients are always frozen (the official default).
- Positional heads: the score above is our operationalisation of "the correlation between a
  dimension and its contribution to long-distance dependencies"; the ablation measures far recall.
- Passkey: accuracy on the corpus's own recall targets (4 per sequence, any distance up to the
  length), not a separate needle prompt.
"""

import argparse
import contextlib
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
from typing import NamedTuple

import datasets
import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

ARMS = ("rope", "fope", "cf_only", "fs_only", "alibi", "nope", "fope_small")


@dataclasses.dataclass
class Config:
    """Train a 4-layer decoder with each position method at length 64 on filler + long-range recall;
    evaluate perplexity (total, recall, filler), a windowed control and passkey up to 8x L_train."""

    steps: int = 300  # training steps per arm and seed
    seed: int = 0  # first seed (seeds seed, seed + 1, ...)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines file with a column "text": your corpus, perplexity only
    out: str = "runs/fope"  # folder for results.json, results.md and fope.png
    smoke: bool = False  # the same code path at a tiny size, in seconds
    workers: int = 0  # worker processes of one thread each (0: one per core; 1 on a GPU)
    held_out: float = 0.1  # --data: the share of the text (its end) held out for evaluation
    log_every: int = 100  # steps between log lines
    arms: str = ",".join(ARMS)  # comma-separated subset of the arms
    seeds: int = 3  # seeds per arm
    train_len: int = 64  # training sequence length L_train
    eval_lens: str = "64,128,256,512"  # evaluation lengths (comma-separated)
    eval_seqs: int = 12  # evaluation sequences per length
    batch: int = 16  # sequences per training step
    lr: float = 5e-3  # AdamW peak learning rate (warm-up, then cosine decay to lr / 10)
    n_embd: int = 64  # model width
    n_layer: int = 4  # decoder blocks
    n_head: int = 2  # attention heads (head_dim = n_embd / n_head)
    rope_base: float = 10000.0  # RoPE base
    fope_sigma: float = 0.3  # FoPE sigma: the official xavier gain (paper, 60M model: 0.3)
    fope_small_std: float = 0.0217  # fope_small: noise std of the paper's 60M model (see docstring)
    vocab_filler: int = 16  # filler vocabulary of the order-2 Markov chain
    chain_seed: int = 12345  # seed of the chain (the same for every arm and seed)
    successors: int = 3  # successors per order-2 context
    n_keys: int = 4  # recall keys per sequence (each written twice, `KEY v` ... `KEY v`)
    values_per_key: int = 16  # values each key can take (recall chance: 1 / values_per_key)
    head_len: int = 256  # evaluation length of the positional-head analysis
    top_heads: int = 2  # heads ablated in the positional-head analysis
    random_draws: int = 3  # random head sets (of the other heads) to compare against

    def __post_init__(self):
        unknown = [a for a in self.arms.split(",") if a not in ARMS]
        require(not unknown, f"--arms {self.arms}: unknown {unknown}; choose from {','.join(ARMS)}")
        require(len(set(self.arms.split(","))) == len(self.arms.split(",")),
                f"--arms {self.arms}: an arm named twice")
        positive = ("log_every", "seeds", "eval_seqs", "batch", "n_embd", "n_layer", "n_head",
                    "vocab_filler", "successors", "n_keys", "values_per_key", "top_heads",
                    "random_draws")
        for name in positive:
            value = getattr(self, name)
            require(value > 0, f"--{name.replace('_', '-')} {value}: must be positive")
        require(self.workers >= 0, f"--workers {self.workers}: must be >= 0")
        require(self.train_len >= 8 * self.n_keys,
                f"--train-len {self.train_len}: at least 8 x --n-keys")
        require(self.n_embd % (4 * self.n_head) == 0,
                f"--n-embd {self.n_embd}: head_dim must be a multiple of 4")
        require(self.top_heads * 2 <= self.n_layer * self.n_head,
                f"--top-heads {self.top_heads}: at most half of the heads")
        require(self.successors <= self.vocab_filler, "--successors: at most --vocab-filler")
        require(self.lr > 0, f"--lr {self.lr}: must be positive")
        require(0 < self.held_out < 1, f"--held-out {self.held_out}: must be in (0, 1)")
        require(self.fope_sigma >= 0 and self.fope_small_std >= 0, "--fope-*: must be >= 0")
        require(self.rope_base > 1, f"--rope-base {self.rope_base}: must be > 1")
        require(re.fullmatch(r"\d+(,\d+)*", self.eval_lens) is not None,
                f"--eval-lens {self.eval_lens}: comma-separated lengths")
        require(min(int(n) for n in self.eval_lens.split(",")) >= self.train_len,
                f"--eval-lens {self.eval_lens}: each at least --train-len")
        require(self.head_len >= 2 * self.train_len, "--head-len: at least 2 x --train-len")


# --- the paper's method ---

def rope_frequencies(head_dim, base=10000.0):
    # ω_k = base^(−2k/d), k = 0 … d/2 − 1: slot k pairs dims k and k + d/2 (half-split layout)
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,)


def rope_rotate(x, pos, freqs):
    """RoPE: x' = x ⊙ cos(nω) + rotate_half(x) ⊙ sin(nω), x (B, H, T, d) at positions pos (T,)."""
    if x.dim() != 4 or pos.shape != (x.shape[-2],) or freqs.shape != (x.shape[-1] // 2,):
        raise ValueError(f"rope_rotate: x {tuple(x.shape)} must be (B, H, T, d), pos (T,), "
                         f"freqs (d/2,)")
    angle = pos[:, None] * freqs[None, :]  # (T, d/2): n·ω_k
    cos = angle.cos()  # (T, d/2)
    sin = angle.sin()  # (T, d/2)
    x1 = x[..., :freqs.shape[0]]  # (B, H, T, d/2)
    x2 = x[..., freqs.shape[0]:]  # (B, H, T, d/2)
    # x' = x ⊙ cos + rotate_half(x) ⊙ sin,  rotate_half([x1, x2]) = [−x2, x1]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)  # (B, H, T, d)


def fope_tables(head_dim, n_head, train_len, sigma=0.3, base=10000.0, clip_floor=True,
                noise_std=None, generator=None):
    """FoPE's kept frequencies and frozen Fourier coefficients: freqs (K,), A_sin, A_cos (H, K, d')
    (plain values in, tensors out: copy this and fope_rotate to use FoPE elsewhere)."""
    freqs = rope_frequencies(head_dim, base)  # (d/2,)
    # CF: a slot whose period 2π/ω_k is longer than L_train never sees a full cycle in training;
    # its frequency is clipped to zero (it leaves the series: cos = sin = 1 in fope_rotate)
    if clip_floor:
        freqs = freqs[freqs >= 2 * math.pi / train_len]  # (K,)
    n_kept = freqs.shape[0]
    # rotating output slots: official cap d' = min(K, d/4); no clipping: all d/2 (= RoPE at A = I)
    n_out = min(n_kept, head_dim // 4) if clip_floor else head_dim // 2
    # official init xavier_normal_(gain σ) on (H, K, d'): fan_in K·d', fan_out H·d'
    # → std = σ·√(2 / (d'·(K + H))), far below σ at these sizes
    if noise_std is None:
        noise_std = sigma * math.sqrt(2.0 / (n_out * (n_kept + n_head)))
    # the official identity for K inputs → d' outputs: output j reads input j·⌈K/d'⌉
    eye = torch.zeros(n_kept, n_out)  # (K, d')
    rows = torch.arange(n_out) * math.ceil(n_kept / n_out)  # (d',)
    eye[rows[rows < n_kept], torch.arange(n_out)[rows < n_kept]] = 1.0
    # FS: A_sin, A_cos = I + N(0, std²), separate matrices per head (and per layer), frozen
    shape = (n_head, n_kept, n_out)
    sin_coef = eye + noise_std * torch.randn(shape, generator=generator)  # (H, K, d')
    cos_coef = eye + noise_std * torch.randn(shape, generator=generator)  # (H, K, d')
    return freqs, sin_coef, cos_coef


def fope_rotate(x, pos, freqs, sin_coef, cos_coef):
    """x' = x ⊙ [C, C] + rotate_half(x) ⊙ [S, S] with per-head Fourier series S, C (B, H, T, d)."""
    if x.dim() != 4 or pos.shape != (x.shape[-2],):
        raise ValueError(f"fope_rotate: x {tuple(x.shape)} must be (B, H, T, d), pos (T,)")
    if freqs.dim() != 1 or sin_coef.shape != cos_coef.shape or sin_coef.dim() != 3:
        raise ValueError("fope_rotate: freqs (K,), sin_coef and cos_coef (H, K, d')")
    if sin_coef.shape[:2] != (x.shape[1], freqs.shape[0]):
        raise ValueError(f"fope_rotate: coefficients {tuple(sin_coef.shape)} need (H, K, d')")
    half = x.shape[-1] // 2
    angle = pos[:, None] * freqs[None, :]  # (T, K): n·ω_k
    # S_{h,j}(n) = Σ_k sin(ω_k n)·A_sin[h, k, j],  C_{h,j}(n) = Σ_k cos(ω_k n)·A_cos[h, k, j]
    s = torch.einsum("tk,hkj->htj", angle.sin(), sin_coef)  # (H, T, d')
    c = torch.einsum("tk,hkj->htj", angle.cos(), cos_coef)  # (H, T, d')
    # slots j ≥ d' have frequency zero: cos = sin = 1 (the official fill, constant in n)
    s = F.pad(s, (0, half - s.shape[-1]), value=1.0)  # (H, T, d/2)
    c = F.pad(c, (0, half - c.shape[-1]), value=1.0)  # (H, T, d/2)
    x1 = x[..., :half]  # (B, H, T, d/2)
    x2 = x[..., half:]  # (B, H, T, d/2)
    # rotate_half([x1, x2]) = [−x2, x1]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)  # (B, H, T, d)


def alibi_slopes(n_head):
    # slope_h = 2^(−8h/H), h = 1 … H (H a power of two; otherwise the ALiBi paper's interleaving)
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = [2.0 ** (-8.0 * (h + 1) / closest) for h in range(closest)]
    extra = [2.0 ** (-8.0 * (h + 1) / (2 * closest)) for h in range(0, 2 * closest, 2)]
    return torch.tensor(slopes + extra[:n_head - closest])  # (H,)


def alibi_bias(n_head, T):
    # bias_{h,m,n} = −slope_h·(m − n) for n ≤ m, −inf for n > m (causal mask included)
    m = torch.arange(T)[:, None]
    n = torch.arange(T)[None, :]
    bias = -alibi_slopes(n_head)[:, None, None] * (m - n).float()  # (H, T, T)
    return bias.masked_fill(n > m, float("-inf"))


def slot_contributions(q_rot, k_rot):
    # g_i = q̃[i]·k̃[i] + q̃[i + d/2]·k̃[i + d/2]: slot i's share of the logit (Σ_i g_i = q̃·k̃)
    if q_rot.shape[-1] != k_rot.shape[-1] or q_rot.shape[-1] % 2:
        raise ValueError("slot_contributions: q_rot and k_rot need the same even last dim")
    half = q_rot.shape[-1] // 2
    return q_rot[..., :half] * k_rot[..., :half] + q_rot[..., half:] * k_rot[..., half:]


def positional_head_scores(q_rot, k_rot, attn, min_dist):
    """Per head: the signed logit share of the high (low-frequency) slots i ≥ d/4, averaged over
    the pairs at distance ≥ `min_dist` weighted by their attention (our operationalisation)."""
    if q_rot.shape != k_rot.shape or q_rot.dim() != 4:
        raise ValueError("positional_head_scores: q_rot, k_rot (B, H, T, d)")
    B, H, T, d = q_rot.shape
    if attn.shape != (B, H, T, T):
        raise ValueError(f"positional_head_scores: attn {tuple(attn.shape)} must be (B, H, T, T)")
    if not 0 < min_dist < T:
        raise ValueError(f"positional_head_scores: min_dist {min_dist} must be in 1 … T − 1")
    # Σ_{i ≥ d/4} g_i(m, n) = q̃_hi(m)·k̃_hi(n) with the dims of the high slots (i and i + d/2)
    slot = torch.arange(d, device=q_rot.device) % (d // 2)  # (d,) slot of each dim
    high = (slot >= d // 4).to(q_rot.dtype)  # (d,)
    g_high = (q_rot * high) @ k_rot.mT / math.sqrt(d)  # (B, H, T, T)
    m = torch.arange(T, device=q_rot.device)[:, None]
    n = torch.arange(T, device=q_rot.device)[None, :]
    far = (m - n >= min_dist).to(attn.dtype)  # (T, T)
    # score_h = Σ_{m,n far} a_h(m, n)·Σ_{i high} g_i(m, n) / Σ_{m,n far} a_h(m, n)
    weight = attn * far  # (B, H, T, T)
    return (weight * g_high).sum((0, 2, 3)) / weight.sum((0, 2, 3))  # (H,)


# --- data ---

class Chain(NamedTuple):
    """An order-2 Markov chain: context (a, b) -> `successors` next tokens, their probabilities."""
    succ: torch.Tensor  # (V, V, S) successor ids
    prob: torch.Tensor  # (V, V, S) their probabilities


class Corpus(NamedTuple):
    """Token sequences and, per target x[:, 1:], which targets are filler / recall / far recall."""
    x: torch.Tensor  # (n, L) token ids
    filler: torch.Tensor  # (n, L - 1) bool: filler target whose two previous tokens are filler
    recall: torch.Tensor  # (n, L - 1) bool: the value after a key's second occurrence
    far: torch.Tensor  # (n, L - 1) bool: recall whose first occurrence is > L_train tokens back


def markov_chain(vocab, successors, gen):
    """Each context (a, b) gets `successors` distinct next tokens, Dirichlet(1) probabilities."""
    succ = torch.rand(vocab, vocab, vocab, generator=gen).argsort(-1)[..., :successors]  # (V, V, S)
    weight = -torch.rand(vocab, vocab, successors, generator=gen).clamp_min(1e-9).log()  # Exp(1)
    return Chain(succ, weight / weight.sum(-1, keepdim=True))


def markov_filler(chain, n, length, gen):
    """n sequences of `length` from the chain (a loop over positions, vectorised over n)."""
    vocab = len(chain.succ)
    cum = chain.prob.cumsum(-1)  # (V, V, S)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, :2] = torch.randint(vocab, (n, 2), generator=gen)
    for t in range(2, length):
        a = x[:, t - 2]
        b = x[:, t - 1]
        u = torch.rand(n, 1, generator=gen)  # (n, 1)
        pick = (u > cum[a, b]).sum(-1).clamp_max(chain.succ.shape[-1] - 1)  # (n,) inverse CDF
        x[:, t] = chain.succ[a, b, pick]
    return x


def recall_corpus(chain, n, length, n_keys, values_per_key, train_len, gen):
    """Filler with `n_keys` pairs `KEY_i v` each written twice at random places; v is drawn from
    key i's own values, so the second v is predictable only by retrieving the first."""
    vocab = len(chain.succ)
    n_slots = 2 * n_keys
    n_filler = length - 2 * n_slots
    filler = markov_filler(chain, n, n_filler, gen)  # (n, F)
    # slot j goes before filler token slot_at[j]; key ids: each key twice, in random order
    slot_at = torch.randint(0, n_filler + 1, (n, n_slots), generator=gen).sort(-1).values  # (n, S)
    slot_key = torch.rand(n, n_slots, generator=gen).argsort(-1) % n_keys  # (n, S)
    value = torch.randint(0, values_per_key, (n, n_keys), generator=gen)  # (n, n_keys)
    slot_pos = slot_at + 2 * torch.arange(n_slots)  # (n, S): where each KEY lands
    t = torch.arange(n_filler)  # (F,)
    shift = (slot_at[:, None, :] <= t[None, :, None]).sum(-1)  # (n, F) slots before filler t
    x = torch.empty(n, length, dtype=torch.long)
    x.scatter_(1, t + 2 * shift, filler)
    x.scatter_(1, slot_pos, vocab + slot_key)
    value_tok = vocab + n_keys + slot_key * values_per_key + value.gather(1, slot_key)  # (n, S)
    x.scatter_(1, slot_pos + 1, value_tok)
    # the two slots of each key, earlier first: distance from the first KEY to the second
    by_key = slot_key.argsort(dim=-1, stable=True)  # (n, S)
    pair = slot_pos.gather(1, by_key).view(n, n_keys, 2)  # (n, n_keys, 2)
    dist = torch.zeros(n, length, dtype=torch.long)
    dist.scatter_(1, pair[..., 1] + 1, pair[..., 1] - pair[..., 0])  # at the second value
    is_filler = x < vocab  # (n, L)
    filler_target = is_filler[:, 2:] & is_filler[:, 1:-1] & is_filler[:, :-2]  # (n, L - 2)
    filler_target = torch.cat([torch.zeros(n, 1, dtype=torch.bool), filler_target], 1)
    recall = dist[:, 1:] > 0  # (n, L - 1)
    return Corpus(x, filler_target, recall, dist[:, 1:] > train_len)


def byte_encoding():
    """An offline byte-level tiktoken encoding (the stock encodings download their files)."""
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                             special_tokens={})


def text_corpus(ids, n, length, gen):
    """n random windows of a token stream; every target counts as filler (no recall)."""
    starts = torch.randint(0, len(ids) - length + 1, (n,), generator=gen)  # (n,)
    x = ids[starts[:, None] + torch.arange(length)]  # (n, L)
    none = torch.zeros(n, length - 1, dtype=torch.bool)
    return Corpus(x, torch.ones(n, length - 1, dtype=torch.bool), none, none)


class Data(NamedTuple):
    train: Corpus  # steps·batch training sequences at L_train
    evals: dict  # eval length -> Corpus
    head: Corpus  # sequences for the positional-head analysis (length head_len)
    vocab: int  # vocabulary size
    chain: object  # the Markov chain (None for user text)


def build_data(cfg, seed):
    """The training pool (per seed) and the evaluation sets (the same for every arm and seed)."""
    gen = torch.Generator().manual_seed(seed)
    lens = [int(n) for n in cfg.eval_lens.split(",")]
    n_train = cfg.steps * cfg.batch
    if cfg.data:
        rows = load_user_data(cfg.data, ["text"])
        enc = byte_encoding()
        ids = torch.tensor([t for row in rows["text"] for t in enc.encode_ordinary(str(row))])
        split = int((1 - cfg.held_out) * len(ids))
        require(split > cfg.train_len and len(ids) - split >= max(lens),
                f"--data {cfg.data}: too little text for lengths {cfg.train_len}..{max(lens)}")
        held = torch.Generator().manual_seed(999)
        evals = {L: text_corpus(ids[split:], cfg.eval_seqs, L, held) for L in lens}
        return Data(text_corpus(ids[:split], n_train, cfg.train_len, gen), evals, None, 256, None)
    chain_gen = torch.Generator().manual_seed(cfg.chain_seed)
    chain = markov_chain(cfg.vocab_filler, cfg.successors, chain_gen)
    shape = (cfg.n_keys, cfg.values_per_key, cfg.train_len)
    train = recall_corpus(chain, n_train, cfg.train_len, *shape, gen)
    evals = {L: recall_corpus(chain, cfg.eval_seqs, L, *shape, torch.Generator().manual_seed(L))
             for L in lens}
    head_gen = torch.Generator().manual_seed(7)
    head = recall_corpus(chain, cfg.eval_seqs, cfg.head_len, *shape, head_gen)
    vocab = cfg.vocab_filler + cfg.n_keys * (1 + cfg.values_per_key)
    return Data(train, evals, head, vocab, chain)



# --- model ---

class RoPE(nn.Module):
    """Rotary position embedding as a layer: rope_rotate with the frequencies as a buffer."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        self.register_buffer("freqs", rope_frequencies(head_dim, base), persistent=False)

    def forward(self, x, pos):  # x (B, H, T, d), pos (T,)
        return rope_rotate(x, pos, self.freqs)


class FoPE(nn.Module):
    """Fourier position embedding: fope_tables once (frozen buffers), fope_rotate in forward."""

    def __init__(self, head_dim, n_head, train_len, sigma=0.3, base=10000.0, clip_floor=True,
                 noise_std=None):
        super().__init__()
        freqs, sin_coef, cos_coef = fope_tables(head_dim, n_head, train_len, sigma, base,
                                                clip_floor, noise_std)
        self.register_buffer("freqs", freqs)  # (K,)
        self.register_buffer("sin_coef", sin_coef)  # (H, K, d')
        self.register_buffer("cos_coef", cos_coef)  # (H, K, d')

    def forward(self, x, pos):  # x (B, H, T, d), pos (T,)
        return fope_rotate(x, pos, self.freqs, self.sin_coef, self.cos_coef)


def make_pe(arm, head_dim, n_head, train_len, base, sigma, small_std):
    """The position method of an arm (one module per layer: each layer has its own coefficients)."""
    if arm == "rope":
        return RoPE(head_dim, base)
    if arm == "fope":
        return FoPE(head_dim, n_head, train_len, sigma, base, clip_floor=True)
    if arm == "fope_small":
        return FoPE(head_dim, n_head, train_len, sigma, base, clip_floor=True,
                    noise_std=small_std)
    if arm == "cf_only":  # clipping alone: A = I
        return FoPE(head_dim, n_head, train_len, 0.0, base, clip_floor=True)
    if arm == "fs_only":  # the Fourier series alone: no clipping
        return FoPE(head_dim, n_head, train_len, sigma, base, clip_floor=False)
    return None  # nope, alibi: nothing rotates


def attention_bias(n_head, T, window=0, alibi=False):
    """(H or 1, T, T) additive bias: −inf where n > m (causal) or m − n ≥ window (window > 0)."""
    m = torch.arange(T)[:, None]
    n = torch.arange(T)[None, :]
    blocked = n > m  # (T, T)
    if window > 0:
        blocked = blocked | (m - n >= window)
    bias = alibi_bias(n_head, T) if alibi else torch.zeros(1, T, T)  # (H or 1, T, T)
    return bias.masked_fill(blocked, float("-inf"))


class Probe(NamedTuple):
    """What one attention layer saw in its last forward (kept for the positional-head analysis)."""
    q_rot: torch.Tensor  # (B, nh, T, hs) rotated queries
    k_rot: torch.Tensor  # (B, nh, T, hs) rotated keys
    attn: torch.Tensor  # (B, nh, T, T) attention weights


class Block(nn.Module):
    """Pre-LN transformer block: x + attention(ln_1(x)), then x + mlp(ln_2(x)); the position
    method `pe` turns q and k, `bias` (causal mask, ALiBi, window) is added to the logits."""

    def __init__(self, n_embd, n_head, pe):
        super().__init__()
        self.n_head = n_head
        self.pe = pe
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))
        self.probe = None

    def forward(self, x, bias, head_mask, keep=False):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)  # (B, T, D) each
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.pe is not None:  # the position method, on q and k, in every layer
            pos = torch.arange(T, device=x.device)  # (T,)
            q = self.pe(q, pos)
            k = self.pe(k, pos)
        # softmax(q·kᵀ/√hs + bias), written out: the positional-head analysis reads the weights
        att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1)) + bias  # (B, nh, T, T)
        att = att.softmax(-1)  # (B, nh, T, T)
        y = att @ v * head_mask[None, :, None, None]  # (B, nh, T, hs): ablated heads give 0
        if keep:
            self.probe = Probe(q.detach(), k.detach(), att.detach())
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """Token embedding, n_layer blocks with the arm's position method, tied output embedding."""

    def __init__(self, arm, vocab, cfg):
        super().__init__()
        head_dim = cfg.n_embd // cfg.n_head
        self.arm = arm
        self.n_head = cfg.n_head
        self.wte = nn.Embedding(vocab, cfg.n_embd)
        pes = [make_pe(arm, head_dim, cfg.n_head, cfg.train_len, cfg.rope_base, cfg.fope_sigma,
                       cfg.fope_small_std) for _ in range(cfg.n_layer)]
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, pe) for pe in pes)
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.register_buffer("head_mask", torch.ones(cfg.n_layer, cfg.n_head), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, window=0, keep=False):  # idx (B, T) -> logits (B, T, vocab)
        bias = attention_bias(self.n_head, idx.shape[1], window, self.arm == "alibi")
        x = self.wte(idx)  # (B, T, D)
        for block, mask in zip(self.blocks, self.head_mask):
            x = block(x, bias.to(x.device), mask, keep)
        return self.ln_f(x) @ self.wte.weight.T  # tied output embedding


# --- training ---

class LossTerms(NamedTuple):
    loss: torch.Tensor  # () what is minimised: filler + recall
    filler: torch.Tensor  # () mean NLL of filler targets
    recall: torch.Tensor  # () mean NLL of recall targets (0 when there are none)


def masked_mean(values, mask):
    # Σ values·mask / Σ mask (0 when the mask is empty)
    if values.shape != mask.shape:
        raise ValueError(f"masked_mean: values {tuple(values.shape)} vs mask {tuple(mask.shape)}")
    return (values * mask).sum() / mask.sum().clamp_min(1)


def lm_loss(logits, targets, filler, recall):
    """L = mean NLL over filler targets + mean NLL over recall targets: recall targets are few
    (n_keys per sequence), so they get their own mean instead of drowning in the filler."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)
    filler_nll = masked_mean(nll, filler)
    recall_nll = masked_mean(nll, recall)
    return LossTerms(filler_nll + recall_nll, filler_nll, recall_nll)


def get_lr(step, total, lr, warmup):
    """nanoGPT's schedule: linear warm-up for `warmup` steps, then cosine decay to lr / 10."""
    # 1) linear warm-up from lr / warmup to lr
    if step < warmup:
        return lr * (step + 1) / warmup
    # 2) cosine decay from lr (progress 0) to lr / 10 (progress 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)


def clock(device):
    """CPU: process time (robust to other jobs on the machine); CUDA: synchronised wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def train_arm(arm, cfg, data, device, seed):
    """Train one arm from seed; returns the model and its seconds per training step."""
    torch.manual_seed(seed)  # the one global generator the model draws from (init, FoPE's A)
    model = Decoder(arm, data.vocab, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            foreach=True)
    batches = data.train
    busy = 0.0
    start = time.time()
    for step in range(cfg.steps):
        rows = slice(step * cfg.batch, (step + 1) * cfg.batch)
        x = batches.x[rows].to(device)  # (B, L)
        t0 = clock(device)
        for group in opt.param_groups:
            group["lr"] = get_lr(step, cfg.steps, cfg.lr, max(1, cfg.steps // 10))
        logits = model(x[:, :-1])  # (B, L − 1, vocab)
        terms = lm_loss(logits, x[:, 1:], batches.filler[rows].to(device),
                        batches.recall[rows].to(device))
        check_finite(step, loss=terms.loss.item(), filler=terms.filler.item(),
                     recall=terms.recall.item())
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        busy += clock(device) - t0
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log_progress(step + 1, cfg.steps, start, arm=arm, seed=seed, loss=terms.loss.item(),
                         filler=terms.filler.item(), recall=terms.recall.item(),
                         tok_per_s=round((step + 1) * x.numel() / busy))
    return model.eval(), busy / cfg.steps


# --- the study: evaluation, seeds, report (a reader who came for the method may stop here) ---

def chain_nll(chain, x):
    """−log p(x_t | x_{t−2}, x_{t−1}) under the true chain, (n, L − 1) with 0 at t = 1; read it
    only at filler targets: the filler perplexity's ceiling."""
    vocab = len(chain.succ)
    a = x[:, :-2].clamp_max(vocab - 1)  # (n, L − 2)
    b = x[:, 1:-1].clamp_max(vocab - 1)  # (n, L − 2)
    hit = chain.succ[a, b] == x[:, 2:, None]  # (n, L − 2, S)
    p = (chain.prob[a, b] * hit).sum(-1)  # (n, L − 2)
    nll = -p.clamp_min(1e-12).log()  # (n, L − 2)
    return torch.cat([torch.zeros_like(nll[:, :1]), nll], 1)  # (n, L − 1)


def value_accuracy(logits, targets, first_value, values_per_key):
    """Passkey-style accuracy: at each target, argmax over the values of the target's own key
    (chance 1 / values_per_key); returns (n, L − 1) bool (read only at recall targets)."""
    key = ((targets - first_value).clamp_min(0) // values_per_key)  # (n, L − 1)
    ids = first_value + key[..., None] * values_per_key + torch.arange(values_per_key)  # (n, T, V)
    ids = ids.clamp_max(logits.shape[-1] - 1)
    pred = logits.gather(-1, ids).argmax(-1)  # (n, L − 1) index within the key's values
    return ids.gather(-1, pred[..., None])[..., 0] == targets


@torch.no_grad()
def evaluate(model, corpus, first_value, values_per_key, window=0):
    """Perplexity over all loss targets (total), recall, far recall and filler; recall accuracy."""
    x = corpus.x  # (n, L)
    logits = model(x[:, :-1], window=window).float()  # (n, L − 1, vocab)
    nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (n, L − 1)
    correct = value_accuracy(logits, x[:, 1:], first_value, values_per_key).float()
    total = corpus.filler | corpus.recall  # (n, L − 1): the targets the loss trains
    out = {"ppl": math.exp(masked_mean(nll, total)),
           "filler_ppl": math.exp(masked_mean(nll, corpus.filler))}
    if corpus.recall.any():
        out["recall_ppl"] = math.exp(masked_mean(nll, corpus.recall))
        out["passkey"] = float(masked_mean(correct, corpus.recall))
    if corpus.far.any():
        out["far_recall_ppl"] = math.exp(masked_mean(nll, corpus.far))
    return out


@torch.no_grad()
def far_recall_nll(model, corpus, heads):
    """Mean NLL at far recall targets with the given (layer, head) outputs set to zero."""
    model.head_mask.fill_(1.0)
    for layer, head in heads:
        model.head_mask[layer, head] = 0.0
    logits = model(corpus.x[:, :-1]).float()  # (n, L − 1, vocab)
    model.head_mask.fill_(1.0)
    nll = F.cross_entropy(logits.transpose(1, 2), corpus.x[:, 1:], reduction="none")
    return float(masked_mean(nll, corpus.far))


@torch.no_grad()
def positional_heads(model, corpus, min_dist, top_k, draws, seed):
    """Score every head beyond L_train; ablate the top-k vs k random other heads on far recall."""
    model(corpus.x[:, :-1], keep=True)
    scores = torch.stack([positional_head_scores(*b.probe, min_dist) for b in model.blocks])
    for block in model.blocks:
        block.probe = None
    flat = scores.flatten().argsort(descending=True)  # (layers·H,)
    n_head = scores.shape[1]
    ranked = [(int(i) // n_head, int(i) % n_head) for i in flat]
    top = ranked[:top_k]
    others = ranked[top_k:]
    rng = random.Random(seed)
    random_sets = [rng.sample(others, top_k) for _ in range(draws)]
    full = far_recall_nll(model, corpus, [])
    top_nll = far_recall_nll(model, corpus, top)
    random_nll = [far_recall_nll(model, corpus, s) for s in random_sets]
    return {"score": scores.tolist(), "top": top, "random_sets": random_sets,
            "far_recall_nll": full, "top_drop": top_nll - full,
            "random_drop": float(np.mean(random_nll)) - full}


class Job(NamedTuple):
    """One training: one arm from one seed (a worker process runs it alone)."""
    cfg: Config
    arm: str
    seed: int


def run_job(job):
    """Train one arm from one seed; evaluate it at every length with full and windowed attention
    and, for rope and fope, run the positional-head analysis. Plain data out."""
    cpu_start = time.process_time()
    cfg = job.cfg
    data = build_data(cfg, job.seed)
    model, step_time = train_arm(job.arm, cfg, data, pick_device(cfg.device), job.seed)
    model = model.cpu()
    first_value = cfg.vocab_filler + cfg.n_keys
    full = {str(L): evaluate(model, c, first_value, cfg.values_per_key)
            for L, c in data.evals.items()}
    windowed = {str(L): evaluate(model, c, first_value, cfg.values_per_key, cfg.train_len)
                for L, c in data.evals.items()}
    heads = None
    if data.head is not None and job.arm in ("rope", "fope"):
        heads = positional_heads(model, data.head, cfg.train_len + 1, cfg.top_heads,
                                 cfg.random_draws, job.seed)
    ppl = " ".join(f"{L}: {ev['ppl']:.3f}" for L, ev in full.items())
    print(f"arm {job.arm} seed {job.seed}: total ppl {ppl}")
    return {"arm": job.arm, "seed": job.seed, "eval": full, "windowed": windowed, "heads": heads,
            "step_time_s": step_time, "cpu_time_s": time.process_time() - cpu_start}


def mean_std(values):
    return float(np.mean(values)), float(np.std(values))


def over_seeds(per_seed, source, key):
    """One metric seed by seed: length -> [value per seed], at the lengths where it was measured."""
    values = {}
    for L in per_seed[0][source]:
        if key in per_seed[0][source][L]:
            values[L] = [row[source][L][key] for row in per_seed]
    return values


def summarise(per_seed, keys):
    """An arm over its seeds: for each metric, full and windowed, a dict length -> mean, and
    `<metric>_std`, `<metric>_worst` (the highest perplexity, the lowest passkey)."""
    arm = {}
    for source, prefix in (("eval", ""), ("windowed", "windowed_")):
        for key in keys:
            values = over_seeds(per_seed, source, key)
            pick = min if key == "passkey" else max
            arm[prefix + key] = {L: mean_std(v)[0] for L, v in values.items()}
            arm[prefix + key + "_std"] = {L: mean_std(v)[1] for L, v in values.items()}
            arm[prefix + key + "_worst"] = {L: float(pick(v)) for L, v in values.items()}
    return arm


def gap(per_seed_a, per_seed_b, key):
    """a − b per seed (paired by seed), then mean and std over the seeds they share."""
    lens = [L for L in per_seed_a[0]["eval"] if key in per_seed_a[0]["eval"][L]]
    pairs = list(zip(per_seed_a, per_seed_b))
    out = {}
    for L in lens:
        diffs = [a["eval"][L][key] - b["eval"][L][key] for a, b in pairs]
        out[L] = list(mean_std(diffs))
    return out


def seed_row(out):
    """A job's output as one seed of its arm (the arm and the head analysis are kept apart)."""
    return {k: out[k] for k in ("seed", "eval", "windowed", "step_time_s", "cpu_time_s")}


def collect(cfg, outputs, data):
    """results.json's content: each arm over its seeds, the oracle, the fope − cf_only gap, the
    positional heads and the FoPE/RoPE step-time ratio."""
    keys = ("ppl", "recall_ppl", "far_recall_ppl", "filler_ppl", "passkey")
    results = {"config": dataclasses.asdict(cfg), "train_len": cfg.train_len,
               "seeds": [cfg.seed + i for i in range(cfg.seeds)], "arms": {}}
    per_seed = {}
    heads = {}
    for arm in cfg.arms.split(","):
        mine = [out for out in outputs if out["arm"] == arm]
        per_seed[arm] = [seed_row(out) for out in mine]
        summary = summarise(per_seed[arm], keys)
        step_time = float(np.mean([out["step_time_s"] for out in mine]))
        summary.update(n_seeds=len(mine), per_seed=per_seed[arm], step_time_s=step_time)
        results["arms"][arm] = summary
        if mine[0]["heads"] is not None:
            heads[arm] = [out["heads"] for out in mine]
    if data.chain is not None:
        results["filler_oracle_ppl"] = {str(L): math.exp(float(masked_mean(
            chain_nll(data.chain, c.x), c.filler))) for L, c in data.evals.items()}
    if "fope" in per_seed and "cf_only" in per_seed:
        results["fope_minus_cf_only"] = {k: gap(per_seed["fope"], per_seed["cf_only"], k)
                                         for k in ("ppl", "recall_ppl", "filler_ppl")}
    if heads:
        arm = "rope" if "rope" in heads else next(iter(heads))  # the Positional Heads paper's case
        by_arm = {}
        for name, runs in heads.items():
            by_arm[name] = {"top_drop": float(np.mean([r["top_drop"] for r in runs])),
                            "random_drop": float(np.mean([r["random_drop"] for r in runs]))}
        results["positional_heads"] = {"arm": arm, **by_arm[arm], "by_arm": by_arm,
                                       "per_seed": heads}
    if "fope" in per_seed and "rope" in per_seed:
        ratio = results["arms"]["fope"]["step_time_s"] / results["arms"]["rope"]["step_time_s"]
        results["step_time_ratio_fope_rope"] = ratio
    return results


def plot(results):
    """Total perplexity, recall perplexity and passkey by evaluation length, one line per arm."""
    fig = Figure(figsize=(4.6 * 3, 3.6))
    axes = fig.subplots(1, 3, squeeze=False)[0]
    panels = (("ppl", "total perplexity (log)"), ("recall_ppl", "recall perplexity (log)"),
              ("passkey", "recall accuracy (passkey)"))
    lens = results["config"]["eval_lens"].split(",")
    for ax, (key, title) in zip(axes, panels):
        for name, arm in results["arms"].items():
            if arm[key]:
                ax.errorbar([int(L) for L in arm[key]], list(arm[key].values()),
                            yerr=list(arm[key + "_std"].values()), marker="o", capsize=2,
                            label=name)
        ax.axvline(results["train_len"], color="grey", linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(L) for L in lens], lens)
        ax.set_xlabel(f"evaluation length (trained at {results['train_len']}, dotted)")
        ax.set_title(title)
        if key != "passkey":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    return fig


def stat(arm, key, L):
    """`mean ± std [worst]` of one metric of one arm at one length (— where not measured)."""
    if L not in arm[key]:
        return "—"
    return f"{arm[key][L]:.3f} ± {arm[key + '_std'][L]:.3f} [{arm[key + '_worst'][L]:.3f}]"


def yes_no(flag):
    return "**yes**" if flag else "**no**"


def seed_values(arm, key, L):
    """One metric at one length, seed by seed."""
    return [row["eval"][L][key] for row in arm["per_seed"]]


def recall_verdicts(arms, at):
    """FoPE vs RoPE on retrieval beyond L_train, and whether clipping alone does it."""
    rope = arms["rope"]
    fope = arms["fope"]
    lines = [f"- Retrieval at {at}: FoPE's recall ppl below RoPE's: "
             f"{yes_no(fope['recall_ppl'][at] < rope['recall_ppl'][at])} (fope "
             f"{stat(fope, 'recall_ppl', at)}, rope {stat(rope, 'recall_ppl', at)}); passkey "
             f"FoPE ≥ RoPE: {yes_no(fope['passkey'][at] >= rope['passkey'][at])} (fope "
             f"{stat(fope, 'passkey', at)}, rope {stat(rope, 'passkey', at)})."]
    if "cf_only" in arms:
        cf_only = arms["cf_only"]
        pairs = zip(seed_values(fope, "recall_ppl", at), seed_values(cf_only, "recall_ppl", at))
        diffs = [f - c for f, c in pairs]
        series_helps = all(d < 0 for d in diffs)
        clipping = cf_only["recall_ppl"][at] < rope["recall_ppl"][at] and not series_helps
        lines.append(f"- Retrieval at {at} by clipping alone (cf_only, A = I): {yes_no(clipping)} "
                     f"(cf_only {stat(cf_only, 'recall_ppl', at)}; fope − cf_only "
                     f"{np.mean(diffs):+.3f} ± {np.std(diffs):.3f}, the series lowers it in "
                     f"{sum(d < 0 for d in diffs)} of {len(diffs)} seeds).")
    return lines


def perplexity_verdicts(arms, first, at):
    """FoPE vs RoPE on total perplexity beyond L_train, and FoPE's own rise from L_train."""
    rope = arms["rope"]
    fope = arms["fope"]
    lines = [f"- Perplexity at {at}: FoPE's total ppl below RoPE's: "
             f"{yes_no(fope['ppl'][at] < rope['ppl'][at])} (fope {stat(fope, 'ppl', at)}, "
             f"rope {stat(rope, 'ppl', at)})."]
    rises = {}
    for name, arm in (("fope", fope), ("rope", rope)):
        pairs = zip(seed_values(arm, "ppl", at), seed_values(arm, "ppl", first))
        rises[name] = [a / b for a, b in pairs]
    fope_rise = float(np.mean(rises["fope"]))
    lines.append(f"- Stability: FoPE's total ppl at {at} within 1.15x of its own at {first}: "
                 f"{yes_no(fope_rise <= 1.15)} ({fope_rise:.2f}x ± {np.std(rises['fope']):.2f} "
                 f"[{max(rises['fope']):.2f}x]; rope {np.mean(rises['rope']):.2f}x).")
    if "cf_only" in arms:
        pairs = zip(seed_values(fope, "ppl", at), seed_values(arms["cf_only"], "ppl", at))
        diffs = [f - c for f, c in pairs]
        lines.append(f"- The Fourier series' cost on total ppl at {at}: fope − cf_only "
                     f"{np.mean(diffs):+.3f} ± {np.std(diffs):.3f} (higher in "
                     f"{sum(d > 0 for d in diffs)} of {len(diffs)} seeds).")
    return lines


def control_verdicts(results, last):
    """The windowed control (locality leakage), the gate and the ceilings."""
    arms = results["arms"]
    rotary = [name for name in arms if name not in ("alibi", "nope")]
    moves = ", ".join(f"{name} {arms[name]['filler_ppl'][last]:.2f} → "
                      f"{arms[name]['windowed_filler_ppl'][last]:.2f}" for name in rotary)
    leak = all(arms[n]["windowed_filler_ppl"][last] < arms[n]["filler_ppl"][last] for n in rotary)
    lines = [f"- Control (attention windowed to the last {results['train_len']} keys), filler ppl "
             f"at {last}, full → windowed: {moves}. The rise beyond L_train is locality "
             f"leakage (windowed below full in every rotary arm): {yes_no(leak)}."]
    windowed_far = []  # every arm, seed and length: the gate holds for each
    for arm in arms.values():
        for row in arm["per_seed"]:
            windowed_far += [ev["far_recall_ppl"] for ev in row["windowed"].values()
                             if "far_recall_ppl" in ev]
    if windowed_far:
        chance = results["config"]["values_per_key"]
        lines.append(f"- Gate (the toy needs attention beyond L_train: with the window, far recall "
                     f"ppl stays ≥ chance/2 = {chance / 2:g}): "
                     f"{yes_no(min(windowed_far) >= chance / 2)} "
                     f"(windowed far recall ppl {min(windowed_far):.1f}–{max(windowed_far):.1f}).")
    if "filler_oracle_ppl" in results:
        oracle = results["filler_oracle_ppl"].values()
        lines.append(f"- Ceilings: recall ppl 1 and passkey 1 (the answer is in the context); "
                     f"filler ppl of the true chain {min(oracle):.2f}–{max(oracle):.2f}.")
    return lines


def top_beats_random(top_drop, random_drop):
    # the top heads matter: their ablation hurts, and at least twice as much as random heads'
    return top_drop > 0 and top_drop >= 2 * max(random_drop, 0.0)


def head_verdicts(heads, top_heads):
    """Ablating the top positional heads vs as many random heads, on far recall."""
    lines = []
    for name, runs in heads["per_seed"].items():
        by_seed = [f"{r['top_drop']:.2f} vs {r['random_drop']:.2f}" for r in runs]
        wins = sum(top_beats_random(r["top_drop"], r["random_drop"]) for r in runs)
        mean = heads["by_arm"][name]
        lines.append(f"- Positional heads ({name}): ablating the top {top_heads} raises far-recall "
                     f"NLL by {mean['top_drop']:.2f}, {top_heads} random others by "
                     f"{mean['random_drop']:.2f}; top > 0 and ≥ 2x random: "
                     f"{yes_no(top_beats_random(mean['top_drop'], mean['random_drop']))} on the "
                     f"mean, in "
                     f"{wins} of {len(runs)} seeds ({'; '.join(by_seed)}).")
    return lines


def verdicts(results):
    """Every verdict line that the arms present allow, computed from the numbers."""
    arms = results["arms"]
    lens = results["config"]["eval_lens"].split(",")
    at = str(4 * results["train_len"]) if str(4 * results["train_len"]) in lens else lens[-1]
    lines = []
    has_recall = all(arm["recall_ppl"] for arm in arms.values())
    if "rope" in arms and "fope" in arms and has_recall:
        lines += recall_verdicts(arms, at)
    if "rope" in arms and "fope" in arms:
        lines += perplexity_verdicts(arms, lens[0], at)
    lines += control_verdicts(results, lens[-1])
    if "positional_heads" in results:
        lines += head_verdicts(results["positional_heads"], results["config"]["top_heads"])
    baselines = [name for name in ("alibi", "nope") if name in arms and has_recall]
    if baselines:
        text = "; ".join(f"{name} recall ppl {stat(arms[name], 'recall_ppl', at)}, total ppl "
                         f"{stat(arms[name], 'ppl', at)}" for name in baselines)
        lines.append(f"- Baselines at {at}: {text}.")
    if "fope" in arms and "fope_small" in arms and has_recall:
        fope = arms["fope"]
        small = arms["fope_small"]
        lines.append(f"- Noise scale at {at}: fope_small (std {results['config']['fope_small_std']}"
                     f") total ppl {stat(small, 'ppl', at)}, recall {stat(small, 'recall_ppl', at)}"
                     f"; fope (official std) {stat(fope, 'ppl', at)}, recall "
                     f"{stat(fope, 'recall_ppl', at)}.")
    return lines


def metric_table(arms, key, title, lens):
    """One markdown table: an arm per row, `mean ± std [worst]` per evaluation length."""
    rows = []
    for name, arm in arms.items():
        if not arm[key]:
            continue
        cells = " | ".join(stat(arm, key, L) for L in lens)
        rows.append(f"| {name} | {arm['n_seeds']} | {cells} |")
    if not rows:
        return []
    header = ["", f"### {title}", "", "| arm | seeds | " + " | ".join(lens) + " |",
              "|---|---|" + "---|" * len(lens)]
    return header + rows


TABLES = (("ppl", "Total perplexity (all loss targets)"), ("recall_ppl", "Recall perplexity"),
          ("far_recall_ppl", "Far recall perplexity (first occurrence > L_train back)"),
          ("filler_ppl", "Filler perplexity"), ("passkey", "Passkey (recall accuracy)"),
          ("windowed_filler_ppl", "Control: filler perplexity, attention windowed to L_train"),
          ("windowed_far_recall_ppl", "Gate: far recall perplexity, attention windowed"))


def render_report(results):
    """The markdown record of a run, from results.json alone."""
    arms = results["arms"]
    lens = results["config"]["eval_lens"].split(",")
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = ["# fope: Fourier Position Embedding vs RoPE beyond the training length", "",
             f"Trained at L_train = {results['train_len']}, evaluated at {', '.join(lens)}; "
             f"seeds {seeds} for every arm; cells are mean ± std [worst seed].", "",
             "## Verdicts", ""]
    lines += verdicts(results)
    lines += ["", "## Tables"]
    for key, title in TABLES:
        lines += metric_table(arms, key, title, lens)
    if "filler_oracle_ppl" in results:
        oracle = ", ".join(f"{L}: {results['filler_oracle_ppl'][L]:.3f}" for L in lens)
        lines += ["", f"Filler ceiling (the true chain's perplexity): {oracle}."]
    cost = [f"- {name}: {1000 * arm['step_time_s']:.1f} ms CPU per training step"
            for name, arm in arms.items()]
    if "step_time_ratio_fope_rope" in results:
        cost.append(f"- FoPE / RoPE time per step: {results['step_time_ratio_fope_rope']:.2f}")
    cost.append(f"- run: {results['wall_s']:.0f} s wall, {results['cpu_time_s']:.0f} s CPU "
                f"(all processes)")
    lines += ["", "## Cost", ""] + cost
    return "\n".join(lines) + "\n"


def cpu_seconds():
    """User + system CPU time of this process and of its workers that have finished."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 4), batch=4, n_embd=32, n_layer=2,
                                  eval_lens="64,128", eval_seqs=4, head_len=128,
                                  seeds=min(cfg.seeds, 2), random_draws=2, top_heads=1,
                                  log_every=2)
    device = pick_device(cfg.device)
    start = time.time()
    cpu_start = cpu_seconds()
    print(f"config: {dataclasses.asdict(cfg)}")
    data = build_data(cfg, cfg.seed)  # checks --data before any job starts; the filler oracle
    n_params = sum(p.numel() for p in Decoder("rope", data.vocab, cfg).parameters())
    jobs = [Job(cfg, arm, cfg.seed + i) for i in range(cfg.seeds) for arm in cfg.arms.split(",")]
    print(f"parameters per model: {n_params}; {len(jobs)} jobs (arms x seeds)")
    outputs = run_jobs(run_job, jobs, cfg.workers, device)
    results = collect(cfg, outputs, data)
    results["cpu_time_s"] = cpu_seconds() - cpu_start
    results["job_cpu_time_s"] = float(np.mean([out["cpu_time_s"] for out in outputs]))
    results["wall_s"] = time.time() - start
    write_record(cfg.out, "fope", results, plot(results))
    with open(os.path.join(cfg.out, "results.md"), encoding="utf-8") as f:
        print(f.read())
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
