"""Fourier Position Embedding (FoPE) — arXiv 2412.17739, https://arxiv.org/abs/2412.17739 — with the
Positional Heads analysis of arXiv 2410.08703, https://arxiv.org/abs/2410.08703 (same group).

The idea. RoPE rotates slot k of q and k by n·ω_k, so q'_m·k'_n depends only on m − n. FoPE argues
that (CF) a slot whose period exceeds the training length never sees a full cycle, so it is clipped
to frequency zero, and (FS) linear layers and MLPs leak energy between frequencies, so every kept
slot becomes a Fourier series over all kept frequencies; attention should then keep working beyond
L_train. The Positional Heads paper asks which rotary slots carry each head's long-distance logits,
and ablates the heads whose long-distance attention sits in the high (low-frequency) slots.

Key equations (d = head_dim, slot k pairs dims k and k + d/2, n = position):
    RoPE   ω_k = base^(−2k/d);  x' = x ⊙ cos(nω) + rotate_half(x) ⊙ sin(nω)
           rotate_half([x1, x2]) = [−x2, x1]
    CF     keep the K slots with ω_k ≥ 2π / L_train; the others: cos = sin = 1 (official fill)
    FS     S_{h,j}(n) = Σ_k sin(ω_k n)·A_sin[h,k,j],  C_{h,j}(n) = Σ_k cos(ω_k n)·A_cos[h,k,j]
           for the rotating output slots j < d'
           d' = min(K, d/4) (official cap);  A = I + N(0, std²), frozen, per layer and head;
           std = σ·√(2 / (d'(K + H))) (official xavier_normal_ with gain σ on the (H, K, d') tensor)
           x' = x ⊙ [C, C] + rotate_half(x) ⊙ [S, S]                      (fope_tables, fope_rotate)
    ALiBi  logit_{m,n} −= slope_h·(m − n),  slope_h = 2^(−8h/H)
    Positional-head score (our operationalisation; the paper's full text was not available):
           g_i(m, n) = q̃_m[i]k̃_n[i] + q̃_m[i+d/2]k̃_n[i+d/2]   (signed; Σ_i g_i = q̃_m·k̃_n)
           score_h = Σ_{m−n>L_train} a_h(m,n)·Σ_{i≥d/4} g_i(m,n)/√d  /  Σ_{m−n>L_train} a_h(m,n)
           at length 4·L_train: the high slots' share of the logits of what the head attends far.
           Ablation: zero the top-k heads' outputs vs k random other heads; report the rise of the
           mean NLL at far recall targets (`top_drop`, `random_drop`).

The toy. Filler from an order-2 Markov chain (16 tokens, 3 successors per context: local structure
that needs offsets 1 and 2) with 4 keys per sequence, each written twice as `KEY_i v` at random
places, v drawn from key i's own 16 values: the second v is predictable only by retrieving the
first, at any distance up to the sequence length. Loss = mean filler NLL + mean recall NLL. Model:
4 pre-LN blocks, d_model 64, 2 heads of 32, MLP 4x, the position method on q and k in every layer
(own FoPE coefficients per layer), L_train = 64, 300 AdamW steps of 16 sequences. Evaluation at
64, 128, 256, 512 (8x) on 12 fixed sequences per length, 4 pairs each as in training: perplexity
over all loss targets (total), recall targets, far recall targets (> 64 back) and filler targets;
recall accuracy ("passkey": argmax over the key's 16 values, chance 1/16); the same with attention
windowed to the last 64 keys (control: what a locality-only model gets). Ceilings: recall ppl 1 and
passkey 1 (the answer is determined); filler ppl of the true chain (oracle row). Gate: with the
window, far recall ppl is 60–910 for every arm (the toy needs attention beyond L_train).

Run: `python fope.py` (7 arms; 3 seeds for rope, fope, cf_only, 1 for fs_only, alibi, nope,
fope_small); `--seeds 5 --other-seeds 3`; `--arms rope,fope --steps 600`; `--data my.jsonl`
trains on your text (column "text", byte tokens; perplexity only); `--smoke`: seconds.

Re-run at the end (one thread, other jobs running): 197 s CPU (user + sys), the same numbers.
Measured (`python fope.py`, 2-core CPU shared with other jobs, 1 thread: 229 s CPU (user + sys),
779 s wall under load; seeds 0–2 for rope/fope/cf_only, seed 0 for the others; mean over seeds):
    arm        n | total ppl @64 128 256 512 | recall ppl              | passkey
    rope       3 |  2.46  2.75  3.30  3.96   |  1.37  1.37  2.18  5.77 |  0.92  0.92  0.79  0.62
    fope       3 |  2.44  2.87  3.35  4.27   |  1.01  1.01  1.01  1.02 |  1.00  1.00  1.00  1.00
    cf_only    3 |  2.39  2.78  3.27  4.18   |  1.01  1.01  1.01  1.01 |  1.00  1.00  1.00  1.00
    fs_only    1 |  2.42  2.80  3.09  3.42   |  1.02  1.06  1.71  5.75 |  1.00  0.98  0.88  0.65
    alibi      1 |  5.25  6.60  7.62  7.60   |  1.14  1.26  2.75  5.59 |  1.00  0.94  0.81  0.54
    nope       1 |  6.99  9.47 10.17 10.45   |  2.04  2.02  2.03  2.01 |  0.77  0.77  0.77  0.77
    fope_small 1 |  2.47  2.77  3.14  3.80   |  1.01  1.01  1.01  1.01 |  1.00  1.00  1.00  1.00
    arm          | filler ppl              | windowed filler ppl     | far recall ppl (>64 back)
    rope         |  2.66  2.83  3.33  3.95 |  2.66  2.75  2.87  2.74 |    —   1.41  3.30  9.48
    fope         |  2.71  3.00  3.42  4.32 |  2.71  2.89  2.98  2.86 |    —   1.01  1.01  1.02
    cf_only      |  2.65  2.90  3.33  4.23 |  2.65  2.81  2.89  2.79 |    —   1.01  1.01  1.01
    fs_only      |  2.69  2.92  3.13  3.40 |  2.69  2.86  2.91  2.78 |    —   1.19  2.73 10.13
    alibi        |  6.32  7.07  7.76  7.62 |  6.32  7.08  7.72  7.56 |    —   1.86  6.04  9.55
    nope         |  8.11 10.10 10.47 10.60 |  8.11 10.11 10.30 10.36 |    —   2.21  1.95  1.99
    fope_small   |  2.76  2.89  3.20  3.85 |  2.76  2.82  2.85  2.78 |    —   1.01  1.01  1.02
    oracle filler ppl  2.25  2.26  2.33  2.26 (the true chain: the filler ceiling)
At 4x L_train (256), 3 seeds, mean ± std (worst seed):
- recall ppl: fope 1.014 ± 0.007 (1.023), cf_only 1.014 ± 0.005 (1.020), rope 2.18 ± 0.72 (3.11);
  passkey fope 1.00 (1.00), rope 0.79 ± 0.11 (0.65). FoPE retrieves beyond L_train, RoPE does not;
  but clipping alone does the same: fope − cf_only recall ppl +0.000 ± 0.002.
- total ppl: fope 3.35 ± 0.13 (3.51), rope 3.30 ± 0.03 (3.33), cf_only 3.27 ± 0.14 (3.46);
  fope − cf_only +0.08 ± 0.05 (the noisy series costs a little filler perplexity). FoPE's total at
  256 is 1.37 ± 0.06 x its own at 64 (goal ≤ 1.15: not met); RoPE's 1.34 ± 0.07. The windowed
  control brings every rotary arm's filler ppl back to 2.7–3.0 at every length: the rise is
  locality leakage (local heads spreading attention over unseen distances), which clipping does not
  prevent (it removes RoPE's low frequencies, a locality prior).
- positional heads, rope (top 2 of 8 heads by score, 3 random pairs of the others), far-recall NLL
  rise at 256: top_drop 2.64, random_drop 0.33 (seeds: 3.89 vs 0.00, 4.03 vs −0.00, 0.00 vs 0.98;
  seed 2 is the seed whose rope never learned recall well: 2.07 recall ppl at 64). fope: top_drop
  1.09, random_drop 0.29 (0.00 vs 0.70, 2.75 vs 0.12, 0.51 vs 0.05).
- fope_small (noise std 0.0217, the paper's 60M effective std) vs fope (official std at this size,
  0.072): 3.14 vs 3.35 total at 256 (one seed vs three); recall identical.
- FoPE/RoPE CPU time per training step: 1.02 (1.04 in an earlier identical run).
Goals (the paper's claim in miniature): FoPE below RoPE at 4x in recall ppl: yes (cf_only too);
in total ppl: no (3.35 vs 3.30); FoPE total within 1.15x of its own at L_train: no (1.37x);
passkey ≥ RoPE: yes (1.00 vs 0.79); top positional heads ≥ 2x random: yes on the mean (2.64 vs
0.33 for rope, 1.09 vs 0.29 for fope), not in every seed. In this toy the whole gain is clipping.

Deviations from the paper (and its official OLMo-based code):
- Toy scale: 4 layers, d_model 64, 300 steps at length 64 on a synthetic corpus built so that the
  perplexity needs retrieval (paper: OLMo 60M–1.2B on C4 at 512, evaluated to 8192); one seed for
  fs_only, alibi, nope and fope_small so the default run fits 240 s of CPU at one thread.
- fs_only (no clipping) rotates all d/2 slots (d' = d/2) so that FoPE(σ = 0, no clip) is exactly
  RoPE; the official code caps d' at d/4 with a stride identity. With clipping the official
  d' = min(K, d/4) is kept (= K = 5 here).
- Noise: `fope` uses the official effective std σ·√(2/(d'(K+H))) = 0.072 at σ = 0.3, d' = K = 5,
  H = 2 (3x the paper's ≈ 0.02, because H and K are small here); `fope_small` uses 0.0217, the
  official formula at head_dim 64, 8 heads, L_train 512 (K = d' = 16; our guess at the 60M
  model). The coefficients are always frozen (the official default) and computed in every forward
  (as the official code does).
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

ARMS = ("rope", "fope", "cf_only", "fs_only", "alibi", "nope", "fope_small")
CORE_ARMS = ("rope", "fope", "cf_only")  # the arms that get `seeds` seeds; the others `other_seeds`


@dataclasses.dataclass
class Config:
    """Train a 4-layer decoder with each position method at length 64 on filler + long-range recall;
    evaluate perplexity (total, recall, filler), a windowed control and passkey up to 8x L_train."""

    steps: int = 300  # training steps per arm and seed
    seed: int = 0  # first seed (seeds seed, seed + 1, ...)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines file with a column "text": your corpus, perplexity only
    out: str = "runs/fope"  # folder for results.json and fope.png
    held_out: float = 0.1  # --data: the share of the text (its end) held out for evaluation
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 100  # steps between log lines
    arms: str = ",".join(ARMS)  # comma-separated subset of the arms
    seeds: int = 3  # seeds for rope, fope and cf_only
    other_seeds: int = 1  # seeds for fs_only, alibi, nope and fope_small
    train_len: int = 64  # training sequence length L_train
    eval_lens: str = "64,128,256,512"  # evaluation lengths (comma-separated)
    eval_seqs: int = 12  # evaluation sequences per length
    batch: int = 16  # sequences per training step
    lr: float = 5e-3  # AdamW peak learning rate (warm-up, then cosine decay to lr / 10)
    d_model: int = 64  # model width
    n_layers: int = 4  # decoder blocks
    n_heads: int = 2  # attention heads (head_dim = d_model / n_heads)
    mlp_mult: int = 4  # MLP hidden width = mlp_mult x d_model
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
        positive = ("log_every", "seeds", "other_seeds", "eval_seqs", "batch", "d_model",
                    "mlp_mult", "n_layers", "n_heads", "vocab_filler", "successors", "n_keys",
                    "values_per_key", "top_heads", "random_draws")
        for name in positive:
            value = getattr(self, name)
            require(value > 0, f"--{name.replace('_', '-')} {value}: must be positive")
        require(self.train_len >= 8 * self.n_keys,
                f"--train-len {self.train_len}: at least 8 x --n-keys")
        require(self.d_model % (4 * self.n_heads) == 0,
                f"--d-model {self.d_model}: head_dim must be a multiple of 4")
        require(self.top_heads * 2 <= self.n_layers * self.n_heads,
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


# --- model ---

class Probe(NamedTuple):
    """What one attention layer saw in its last forward (kept for the positional-head analysis)."""
    q_rot: torch.Tensor  # (B, H, T, d) rotated queries
    k_rot: torch.Tensor  # (B, H, T, d) rotated keys
    attn: torch.Tensor  # (B, H, T, T) attention weights


class Block(nn.Module):
    def __init__(self, d_model, n_heads, mlp_mult, pe):
        super().__init__()
        self.n_heads = n_heads
        self.pe = pe
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_mult * d_model), nn.GELU(),
                                 nn.Linear(mlp_mult * d_model, d_model))
        self.probe = None

    def forward(self, x, bias, head_mask, keep=False):
        B, T, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        if self.pe is not None:  # the position method, on q and k, in every layer
            pos = torch.arange(T, device=x.device)  # (T,)
            q = self.pe(q, pos)
            k = self.pe(k, pos)
        # softmax(q·k / √hd + bias): bias holds the causal mask (and ALiBi, and the window)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias  # (B, H, T, T)
        attn = logits.softmax(-1)  # (B, H, T, T)
        y = attn @ v * head_mask[None, :, None, None]  # (B, H, T, hd): ablated heads give 0
        if keep:
            self.probe = Probe(q.detach(), k.detach(), attn.detach())
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return x + self.mlp(self.ln2(x))


def make_pe(arm, head_dim, n_heads, train_len, base, sigma, small_std):
    """The position method of an arm (one module per layer: each layer has its own coefficients)."""
    if arm == "rope":
        return RoPE(head_dim, base)
    if arm == "fope":
        return FoPE(head_dim, n_heads, train_len, sigma, base, clip_floor=True)
    if arm == "fope_small":
        return FoPE(head_dim, n_heads, train_len, sigma, base, clip_floor=True,
                    noise_std=small_std)
    if arm == "cf_only":  # clipping alone: A = I
        return FoPE(head_dim, n_heads, train_len, 0.0, base, clip_floor=True)
    if arm == "fs_only":  # the Fourier series alone: no clipping
        return FoPE(head_dim, n_heads, train_len, sigma, base, clip_floor=False)
    return None  # nope, alibi: nothing rotates


class Decoder(nn.Module):
    def __init__(self, arm, vocab, cfg):
        super().__init__()
        head_dim = cfg.d_model // cfg.n_heads
        self.arm = arm
        self.n_heads = cfg.n_heads
        self.emb = nn.Embedding(vocab, cfg.d_model)
        pes = [make_pe(arm, head_dim, cfg.n_heads, cfg.train_len, cfg.rope_base, cfg.fope_sigma,
                       cfg.fope_small_std) for _ in range(cfg.n_layers)]
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.mlp_mult, pe) for pe in pes)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.register_buffer("head_mask", torch.ones(cfg.n_layers, cfg.n_heads),
                             persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, window=0, keep=False):  # idx (B, T) -> logits (B, T, vocab)
        bias = attention_bias(self.n_heads, idx.shape[1], window, self.arm == "alibi")
        x = self.emb(idx)  # (B, T, C)
        for block, mask in zip(self.blocks, self.head_mask):
            x = block(x, bias.to(x.device), mask, keep)
        return self.ln(x) @ self.emb.weight.T  # tied output embedding


def attention_bias(n_heads, T, window=0, alibi=False):
    """(H or 1, T, T) additive bias: −inf where n > m (causal) or m − n ≥ window (window > 0)."""
    m = torch.arange(T)[:, None]
    n = torch.arange(T)[None, :]
    blocked = n > m  # (T, T)
    if window > 0:
        blocked = blocked | (m - n >= window)
    bias = alibi_bias(n_heads, T) if alibi else torch.zeros(1, T, T)  # (H or 1, T, T)
    return bias.masked_fill(blocked, float("-inf"))


# --- the paper's method ---

class RoPE(nn.Module):
    """Rotary position embedding, half-split layout: slot k pairs dims k and k + d/2."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        # ω_k = base^(−2k/d), k = 0 … d/2 − 1
        freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x, pos):  # x (B, H, T, d), pos (T,)
        if x.dim() != 4 or pos.shape != (x.shape[-2],):
            raise ValueError(f"RoPE: x {tuple(x.shape)} must be (B, H, T, d), pos (T,)")
        angle = pos[:, None] * self.freqs[None, :]  # (T, d/2): n·ω_k
        cos = angle.cos()  # (T, d/2)
        sin = angle.sin()  # (T, d/2)
        x1 = x[..., :self.freqs.shape[0]]  # (B, H, T, d/2)
        x2 = x[..., self.freqs.shape[0]:]  # (B, H, T, d/2)
        # x' = x ⊙ cos + rotate_half(x) ⊙ sin,  rotate_half([x1, x2]) = [−x2, x1]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)  # (B, H, T, d)


def fope_tables(head_dim, n_heads, train_len, sigma=0.3, base=10000.0, clip_floor=True,
                noise_std=None, generator=None):
    """FoPE's kept frequencies and frozen Fourier coefficients: freqs (K,), A_sin, A_cos (H, K, d')
    (plain values in, tensors out: copy this and fope_rotate to use FoPE elsewhere)."""
    # RoPE's frequencies ω_k = base^(−2k/d), k = 0 … d/2 − 1
    freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,)
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
        noise_std = sigma * math.sqrt(2.0 / (n_out * (n_kept + n_heads)))
    # the official identity for K inputs → d' outputs: output j reads input j·⌈K/d'⌉
    eye = torch.zeros(n_kept, n_out)  # (K, d')
    rows = torch.arange(n_out) * math.ceil(n_kept / n_out)  # (d',)
    eye[rows[rows < n_kept], torch.arange(n_out)[rows < n_kept]] = 1.0
    # FS: A_sin, A_cos = I + N(0, std²), separate matrices per head (and per layer), frozen
    shape = (n_heads, n_kept, n_out)
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


class FoPE(nn.Module):
    """Fourier position embedding: fope_tables once (frozen buffers), fope_rotate in forward."""

    def __init__(self, head_dim, n_heads, train_len, sigma=0.3, base=10000.0, clip_floor=True,
                 noise_std=None):
        super().__init__()
        freqs, sin_coef, cos_coef = fope_tables(head_dim, n_heads, train_len, sigma, base,
                                                clip_floor, noise_std)
        self.register_buffer("freqs", freqs)  # (K,)
        self.register_buffer("sin_coef", sin_coef)  # (H, K, d')
        self.register_buffer("cos_coef", cos_coef)  # (H, K, d')

    def forward(self, x, pos):  # x (B, H, T, d), pos (T,)
        return fope_rotate(x, pos, self.freqs, self.sin_coef, self.cos_coef)


def alibi_slopes(n_heads):
    # slope_h = 2^(−8h/H), h = 1 … H (H a power of two; otherwise the ALiBi paper's interleaving)
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * (h + 1) / closest) for h in range(closest)]
    extra = [2.0 ** (-8.0 * (h + 1) / (2 * closest)) for h in range(0, 2 * closest, 2)]
    return torch.tensor(slopes + extra[:n_heads - closest])  # (H,)


def alibi_bias(n_heads, T):
    # bias_{h,m,n} = −slope_h·(m − n) for n ≤ m, −inf for n > m (causal mask included)
    m = torch.arange(T)[:, None]
    n = torch.arange(T)[None, :]
    bias = -alibi_slopes(n_heads)[:, None, None] * (m - n).float()  # (H, T, T)
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


def clock(device):
    """CPU: process time (robust to other jobs on the machine); CUDA: synchronised wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def train_arm(arm, cfg, data, device, seed):
    """Train one arm from seed; returns the model and its seconds per training step."""
    set_seed(seed)
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
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr, max(1, cfg.steps // 10))
        with autocast(device):
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


# --- evaluation ---

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
    n_heads = scores.shape[1]
    ranked = [(int(i) // n_heads, int(i) % n_heads) for i in flat]
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


def mean_std(values):
    return float(np.mean(values)), float(np.std(values))


def summarise(per_seed, keys):
    """An arm over its seeds: for each metric a dict length -> mean (and `<metric>_std`)."""
    arm = {}
    for key in keys:
        lens = [L for L in per_seed[0]["eval"] if key in per_seed[0]["eval"][L]]
        stats = {L: mean_std([r["eval"][L][key] for r in per_seed]) for L in lens}
        arm[key] = {L: s[0] for L, s in stats.items()}
        arm[key + "_std"] = {L: s[1] for L, s in stats.items()}
        arm["windowed_" + key] = {L: float(np.mean([r["windowed"][L][key] for r in per_seed]))
                                  for L in lens}
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


def plot(results, path):
    fig, axes = new_figure(3)
    panels = (("ppl", "total perplexity (log)"), ("recall_ppl", "recall perplexity (log)"),
              ("passkey", "recall accuracy (passkey)"))
    for ax, (key, title) in zip(axes, panels):
        for name, arm in results["arms"].items():
            if arm.get(key):
                lens = [int(L) for L in arm[key]]
                ax.plot(lens, list(arm[key].values()), marker="o", label=name)
        ax.axvline(results["train_len"], color="grey", linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lens, [str(L) for L in lens])
        ax.set_xlabel(f"evaluation length (trained at {results['train_len']}, dotted)")
        ax.set_title(title)
        if key != "passkey":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def print_table(results):
    lens = list(next(iter(results["arms"].values()))["ppl"])
    log("\nevaluation lengths: " + " ".join(f"{L:>7}" for L in lens))
    for name, arm in results["arms"].items():
        cells = []
        for key in ("ppl", "recall_ppl", "passkey", "filler_ppl", "windowed_ppl"):
            row = " ".join(f"{arm[key].get(L, math.nan):7.3f}" for L in lens)
            cells.append(f"{key} {row}")
        log(f"{name:<10} n={arm['n_seeds']} ms/step {1000 * arm['step_time_s']:.1f}")
        for cell in cells:
            log(f"    {cell}")
    for key, value in results.get("fope_minus_cf_only", {}).items():
        log(f"fope − cf_only {key}: {value}")
    heads = results.get("positional_heads")
    if heads:
        log(f"positional heads ({heads['arm']}): top_drop {heads['top_drop']:.3f} "
            f"random_drop {heads['random_drop']:.3f}; by arm {heads['by_arm']}")


# --- main ---

def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 4), batch=4, d_model=32, n_layers=2,
                                  eval_lens="64,128", eval_seqs=4, head_len=128,
                                  seeds=min(cfg.seeds, 2), other_seeds=1,
                                  random_draws=2, top_heads=1, log_every=2)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    log(f"config: {dataclasses.asdict(cfg)}")
    first_value = cfg.vocab_filler + cfg.n_keys
    arms = [a for a in cfg.arms.split(",") if a]
    per_seed = {arm: [] for arm in arms}
    heads = {}
    t_start = time.process_time()
    for i in range(max(cfg.seeds, cfg.other_seeds)):
        seed = cfg.seed + i
        data = build_data(cfg, seed)
        for arm in arms:
            if i >= (cfg.seeds if arm in CORE_ARMS else cfg.other_seeds):
                continue
            model, step_time = train_arm(arm, cfg, data, device, seed)
            ev = {str(L): evaluate(model, c, first_value, cfg.values_per_key)
                  for L, c in data.evals.items()}
            win = {str(L): evaluate(model, c, first_value, cfg.values_per_key, cfg.train_len)
                   for L, c in data.evals.items()}
            per_seed[arm].append({"seed": seed, "eval": ev, "windowed": win,
                                  "step_time_s": step_time})
            log(f"seed {seed} {arm}: " + " ".join(f"{L}: {v}" for L, v in ev.items()))
            if data.head is not None and arm in ("rope", "fope"):
                heads.setdefault(arm, []).append(positional_heads(
                    model, data.head, cfg.train_len + 1, cfg.top_heads, cfg.random_draws, seed))
    keys = ("ppl", "recall_ppl", "far_recall_ppl", "filler_ppl", "passkey")
    results = {"config": dataclasses.asdict(cfg), "train_len": cfg.train_len,
               "seeds": [cfg.seed + i for i in range(max(cfg.seeds, cfg.other_seeds))], "arms": {}}
    for arm, runs in per_seed.items():
        results["arms"][arm] = summarise(runs, keys)
        results["arms"][arm].update(n_seeds=len(runs), per_seed=runs, step_time_s=float(
            np.mean([r["step_time_s"] for r in runs])))
    if data.chain is not None:
        results["filler_oracle_ppl"] = {str(L): math.exp(float(masked_mean(
            chain_nll(data.chain, c.x), c.filler))) for L, c in data.evals.items()}
    if "fope" in per_seed and "cf_only" in per_seed:
        results["fope_minus_cf_only"] = {k: gap(per_seed["fope"], per_seed["cf_only"], k)
                                         for k in ("ppl", "recall_ppl", "filler_ppl")}
    if heads:
        arm = "rope" if "rope" in heads else next(iter(heads))  # the Positional Heads paper's case
        by_arm = {a: {k: float(np.mean([r[k] for r in runs]))
                      for k in ("top_drop", "random_drop")} for a, runs in heads.items()}
        results["positional_heads"] = {"arm": arm, **by_arm[arm], "by_arm": by_arm,
                                       "per_seed": heads}
    if "fope" in per_seed and "rope" in per_seed:
        ratio = results["arms"]["fope"]["step_time_s"] / results["arms"]["rope"]["step_time_s"]
        results["step_time_ratio_fope_rope"] = ratio
    results["cpu_time_s"] = time.process_time() - t_start
    print_table(results)
    log(f"CPU time {results['cpu_time_s']:.1f} s")
    save_json(os.path.join(cfg.out, "results.json"), results)
    plot(results, os.path.join(cfg.out, "fope.png"))
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
