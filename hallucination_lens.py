"""On Large Language Models' Hallucination with Regard to Known Facts — arXiv 2403.20009
(https://arxiv.org/abs/2403.20009), Jiang et al., NAACL 2024.

A model can know a fact (answer it right through one phrasing) and still get another phrasing
of the same (subject, relation, object) triplet wrong. The logit lens (final norm + unembedding
applied to the last position's residual after every sub-layer) shows *when* the output token
appears: in right answers its probability rises mid-network and stays on top; in hallucinations
it surfaces late or weakly. The paper trains a linear SVM on these curves and detects
hallucinations with 88% accuracy. It ran no baseline: here the curve detector sits beside the
final probability, the final entropy and the prompt's template, on prompts never trained for any
fact, where right and wrong answers both come from generalisation.

Key equations (symbols as in the code):
    logit lens   p_l = softmax(W_U · LN_f(h_l)),  l = emb, attn1, mlp1, ..., attnL, mlpL
                 (P = 1 + 2L points at the last position)
    tuned lens   (A_l, b_l) = argmin Σ_n ||A_l h_l,n + b_l - h_final,n||² (least squares);
                 q_l = softmax(W_U · LN_f(A_l h_l + b_l))
    output       o = argmax p_final; right iff o == gold. Cases: success p_l[gold] on right
                 prompts, fail p_l[gold] on wrong prompts, hallucination p_l[o] on wrong prompts
    curve        x_l = logit p_l[o] = log p_l[o] - log Σ_{v≠o} p_l[v]  (no gold token needed)
    detector     score = w · standardize(x) + b;  m = (2y - 1) score;  c_y = N / (2 N_y)
                 logreg: mean c_y softplus(-m) + λ/2||w||²
                 svm:    mean c_y max(0, 1 - m)² + λ/2||w||²
    metric       balanced accuracy of out-of-fold predictions, subject-grouped 5-fold

Run:
    python hallucination_lens.py            # the whole comparison, 3 seeds
    python hallucination_lens.py --smoke    # the same code path at a tiny size, in seconds

Re-run at the end (one thread, other jobs running): 161 s CPU (user + sys), the same numbers.
Result of the default run (seeds 0, 1, 2; 178 s CPU at one thread, 573 s wall on
a 2-core machine shared by 8 sessions):
    facts mixed at the end of training (right through some templates, wrong through others):
    0.568 / 0.670 / 0.532 (seeds); trained pairs right: 0.998 / 0.998 / 1.000 (worst template)
    held-out accuracy, template 1: 0.508 / 0.360 / 0.643
    held-out accuracy, template 2: 0.375 / 0.297 / 0.324
    held-out accuracy, template 3: 0.360 / 0.249 / 0.375
    unseen prompts, mean probability of the token (logit lens; mean of seeds):
                        emb attn1  mlp1 attn2  mlp2 attn3  mlp3 attn4  mlp4
      success 2094     0.03  0.16  0.22  0.39  0.46  0.57  0.65  0.75  0.83
      fail 3301        0.02  0.09  0.11  0.10  0.11  0.10  0.09  0.07  0.06
      halluc. 3301     0.03  0.14  0.18  0.30  0.34  0.44  0.52  0.61  0.71
    top-1 at an intermediate point: success 0.92, fail 0.26, hallucination 0.86
    detector balanced accuracy, subject-grouped 5-fold, mean ± std (worst seed):
      arm                           unseen prompts     all prompts (mixed)
      curve_logit_logreg     0.628 ± 0.025 (0.603)   0.822 ± 0.008 (0.811)
      curve_logit_svm        0.625 ± 0.025 (0.600)   0.821 ± 0.011 (0.806)
      curve_tuned_logreg     0.616 ± 0.013 (0.598)   0.808 ± 0.006 (0.803)
      curve_tuned_svm        0.616 ± 0.012 (0.599)   0.807 ± 0.006 (0.802)
      curve_both_logreg      0.636 ± 0.013 (0.620)   0.833 ± 0.004 (0.827)
      curve_both_svm         0.635 ± 0.014 (0.620)   0.831 ± 0.004 (0.825)
      final_prob             0.619 ± 0.019 (0.602)   0.817 ± 0.010 (0.803)
      entropy                0.610 ± 0.015 (0.600)   0.807 ± 0.009 (0.796)
      template_only          0.581 ± 0.038 (0.545)   0.713 ± 0.011 (0.703)
      template_final_prob    0.632 ± 0.032 (0.602)   0.829 ± 0.007 (0.823)
      template_curve         0.636 ± 0.027 (0.613)   0.839 ± 0.009 (0.827)
    unseen: curve - best threshold per seed +0.001, +0.010, +0.016
      template+curve - template+final p -0.004, +0.019, -0.003
      AUROC in final-p bins: curve 0.577, final p 0.549
      in bin x template cells: curve 0.537, final p 0.559
      confident hallucinations (final p >= 0.5): 0.766
      n 1798 prompts per seed, 1100 wrong
    all: curve - best threshold per seed +0.004, +0.008, +0.002
      template+curve - template+final p +0.009, +0.004, +0.018
      AUROC in final-p bins: curve 0.596, final p 0.576
      in bin x template cells: curve 0.599, final p 0.586
      confident hallucinations (final p >= 0.5): 0.766
      n 2832 prompts per seed, 1101 wrong
    curve_adds_information: false
    control: the final-probability and entropy thresholds, the template alone and with the final
    probability, on the same folds; ceiling: balanced accuracy 1.0 (chance 0.5); gate: trained
    prompts are right (>= 0.998), held-out phrasings 0.25-0.64, so phrasing decides.
Reading: the lens curves differ by outcome as the paper says (the answer reaches top-1 at an
intermediate point in 92% of successes vs 26% of failures; paper 77.6% vs 31.3%), and on all
prompts of mixed facts the curve detectors score 0.81-0.83, near the paper's 0.84-0.88. But that
setting mostly separates memorised from new prompts. Where right and wrong both come from
generalisation (unseen prompts) the curve detector is only 0.001-0.016 above the better
threshold (seed by seed) and below template + final probability in two of three seeds (0.603 vs
0.617, 0.619 vs 0.602, 0.662 vs 0.677); inside final-probability bins it
looks better (AUROC 0.577 vs 0.549) only because it recognises the template: inside bin x
template cells it drops to 0.537, under the final probability's 0.559. By the rule fixed before
the run (template + curve >= template + final p + 0.02 in every seed, within-cell AUROC >= 0.55
and above the final probability's) the curve adds no information here: curve_adds_information
is false: in this toy the curve adds nothing beyond phrasing and confidence, a finding the
paper, which ran no baseline, could not make. Hallucinations are mostly confident: 77% of them
have final p >= 0.5.

Deviations from the paper (and its official code):
- A synthetic knowledge base (300 subjects x 4 relations, Zipf object prior) and a 4-layer d-64
  decoder trained from scratch replace COUNTERFACT and Llama2-7B-chat. Phrasing matters through
  held-out (fact, template) pairs: template 0 is always trained, templates 1-3 each with
  probability template_train. Templates 2-3 name the subject by an alias ("alias is also known
  as name" is trained for every subject); template 1 names a distractor subject and that
  subject's own object for the relation, a competing answer in the prompt.
- Curves after the embedding and after every attention and MLP sub-layer (the paper: after each
  layer). "Top-1 at some layer" counts intermediate points only (the last is the output itself).
- Curves as log-odds of the output token, not raw probabilities (raw p saturates near 1).
- Everything is read at the end of training (no mid-training checkpoint is chosen).
- Detector data: `unseen_prompts` = the held-out prompts of facts the model knows (right through
  some template), right (0) vs wrong (1); the spec's calibration used mixed facts only, which
  would drop the right answers of facts right through every template. `all_prompts` = every
  prompt of a mixed fact (the first version's setting, where trained prompts are always right).
  The official code
  (dcdsf321/known_fact_hallucination, example_svm.ipynb) fits sklearn's SVC(kernel="linear") on
  the tuned- and logit-lens curves of right and hallucinated outputs, one random 80/20 split,
  plain accuracy. Here: classes weighted, subject-grouped 5-fold with pooled out-of-fold
  predictions, balanced accuracy, the decision threshold re-set to the best training balanced
  accuracy (as for the 1-D baselines), an L2-regularised squared-hinge SVM beside logistic
  regression. `curve` in results.json is the detector fixed before the run (logistic regression
  on logit-lens log-odds); the best of the six curve detectors is `curve_best` (picked after
  the fact, so optimistic).
- Baselines and controls the paper never ran: final probability and final entropy thresholds,
  the template alone, template + final probability, template + curve, and AUROC inside
  final-probability bins (and bin x template cells).
- The tuned lens is an affine map fitted in closed form (tiny ridge) on the trained prompts to
  the final residual, not trained with SGD on a KL loss as in Belrose et al.
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

import datasets
import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class Config:
    """Train small decoders on a synthetic knowledge base, read their known-fact hallucinations
    with the logit and tuned lens, and detect them from the curves beside simple baselines."""

    steps: int = 800  # training steps per seed
    seed: int = 0  # the first seed; the run uses seed, seed + 1, ..., seed + n_seeds - 1
    n_seeds: int = 3  # seeds (one knowledge-base split and one model each)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines facts: subject, relation, object (one word each); empty: synthetic
    out: str = "runs/hallucination_lens"  # folder for results.json and the figure
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 200  # steps between log lines
    n_subjects: int = 300  # subjects in the synthetic knowledge base
    n_relations: int = 4  # relations in the synthetic knowledge base
    n_objects: int = 16  # objects per relation
    zipf: float = 1.0  # object prior p(k) ∝ (k+1)^-zipf: the model's "default guess" per relation
    template_train: float = 0.5  # chance that a (fact, template 1-3) pair is trained (0: always)
    n_layers: int = 4  # decoder layers
    d_model: int = 64  # residual width
    n_heads: int = 4  # attention heads
    batch_size: int = 128  # prompts per step
    lr: float = 3e-3  # AdamW peak learning rate (warm-up over steps / 20, cosine decay to lr / 10)
    weight_decay: float = 0.01  # AdamW weight decay
    n_folds: int = 5  # subject-grouped cross-validation folds for the detectors

    def __post_init__(self):
        positive = ("n_seeds", "log_every", "n_subjects", "n_relations", "n_objects", "n_layers",
                    "d_model", "n_heads", "batch_size")
        for name in positive:
            value = getattr(self, name)
            require(value > 0, f"--{name.replace('_', '-')} {value}: must be positive")
        require(self.d_model % self.n_heads == 0,
                f"--d-model {self.d_model}: must be divisible by --n-heads {self.n_heads}")
        require(self.zipf >= 0, f"--zipf {self.zipf}: must be >= 0")
        require(0 <= self.template_train <= 1,
                f"--template-train {self.template_train}: must be in [0, 1]")
        require(self.lr > 0, f"--lr {self.lr}: must be positive")
        require(self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be >= 0")
        require(self.n_folds >= 2, f"--n-folds {self.n_folds}: must be at least 2")


# --- data ---

RELATION_WORDS = ["capital", "language", "sport", "color", "religion", "genre", "team",
                  "instrument"]
# Four phrasings of every (subject, relation, object) triplet; the answer is the next token.
# {s}: the subject's name, {a}: its alias, {r}: the relation word, {d}: another subject (a
# distractor) and {o}: the distractor's own object for this relation, named in the prompt.
TEMPLATES = [
    "{s} {r} :",  # 0: the name next to the answer slot (always trained)
    "{s} , friend of {d} ( {o} ) , has {r}",  # 1: a distractor subject and object in between
    "{a} {r} :",  # 2: the alias next to the answer slot
    "the {r} of {a} , they say , is",  # 3: the alias far from the answer slot
]
LINK_TEMPLATE = "{a} is also known as"  # trained for every subject: the alias -> name link


def make_kb(n_subjects, n_relations, n_objects, zipf, rng):
    """Synthetic triplets: object k of a relation drawn with p(k) ∝ (k+1)^-zipf (dicts)."""
    extra = [f"rel{j}" for j in range(len(RELATION_WORDS), n_relations)]
    relation_words = RELATION_WORDS[:n_relations] + extra
    prior = np.arange(1, n_objects + 1, dtype=np.float64) ** -zipf
    prior /= prior.sum()
    facts = []
    for i in range(n_subjects):
        for r in relation_words:
            k = rng.choice(n_objects, p=prior)
            facts.append({"subject": f"s{i}", "relation": r, "object": f"{r}{k}"})
    return facts


def build_prompts(facts, template_train, rng):
    """Every fact through every template, plus one alias link per subject.

    Template 0 and the links are always trained; each (fact, template 1-3) pair is trained with
    probability template_train, else held out (an unseen prompt). Template 1 names a distractor:
    another subject with the same relation, and that subject's own object. Returns dicts with
    text, answer, fact (index; -1 for links), template (index; -1), subject, train (bool).
    """
    subjects = sorted({f["subject"] for f in facts}, key=lambda s: (len(s), s))
    object_of = {(f["subject"], f["relation"]): f["object"] for f in facts}
    holders = {}  # relation -> subjects that have a fact for it
    for f in facts:
        holders.setdefault(f["relation"], []).append(f["subject"])
    prompts = []
    for i, f in enumerate(facts):
        s = f["subject"]
        r = f["relation"]
        others = [x for x in holders[r] if x != s] or [s]
        d = others[rng.integers(len(others))]
        fields = dict(s=s, a="aka_" + s, r=r, d=d, o=object_of[(d, r)])
        for t, template in enumerate(TEMPLATES):
            train = t == 0 or rng.random() < template_train
            prompts.append(dict(text="<bos> " + template.format(**fields), answer=f["object"],
                                fact=i, template=t, subject=s, train=train))
    for s in subjects:
        text = "<bos> " + LINK_TEMPLATE.format(a="aka_" + s)
        prompts.append(dict(text=text, answer=s, fact=-1, template=-1, subject=s, train=True))
    return prompts


def tokenize(prompts):
    """Closed-word tiktoken encoding, then compact ids; prompts left-padded to one length.
    Returns tokens (N, T) long, answers (N,) long and the id -> word list."""
    words = {w for p in prompts for w in p["text"].split()[1:] + [p["answer"]]}
    enc = word_encoding(sorted(words), ["<bos>", "<pad>"])
    seqs = [enc.encode(p["text"], allowed_special="all") for p in prompts]
    answer_ids = [enc.encode(" " + p["answer"]) for p in prompts]
    require(all(len(a) == 1 for a in answer_ids), "every answer must be one word (one token)")
    pad = enc.encode("<pad>", allowed_special="all")[0]
    used = sorted({t for s in seqs for t in s} | {a[0] for a in answer_ids} | {pad})
    compact = {t: i for i, t in enumerate(used)}
    width = max(len(s) for s in seqs)
    rows = [[compact[pad]] * (width - len(s)) + [compact[t] for t in s] for s in seqs]
    tokens = torch.tensor(rows)  # (N, T)
    answers = torch.tensor([compact[a[0]] for a in answer_ids])  # (N,)
    vocab = [enc.decode([t]) for t in used]
    return tokens, answers, vocab


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



# --- model ---


class Block(nn.Module):
    """Pre-LN transformer block that also returns the residual between its two sub-layers."""

    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        """x (B, T, d) -> the residual after the attention and after the MLP, each (B, T, d)."""
        B, T, C = x.shape
        hs = C // self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)  # each (B, T, d)
        q = q.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, d)
        x_attn = x + self.proj(y)  # (B, T, d)
        x_mlp = x_attn + self.mlp(self.ln2(x_attn))  # (B, T, d)
        return x_attn, x_mlp


class TinyLM(nn.Module):
    """Pre-LN decoder with learned positions; predicts the token after the last position."""

    def __init__(self, vocab_size, block_size, d, n_layers, n_heads):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)  # the unembedding W_U (V, d)

    def hiddens(self, tokens):
        """The last position's residual after the embedding and after every sub-layer: the
        P = 1 + 2L points the lenses read. tokens (B, T) -> (B, P, d)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
        x = self.tok(tokens) + self.pos(positions)  # (B, T, d)
        points = [x[:, -1]]
        for block in self.blocks:
            x_attn, x = block(x)
            points.append(x_attn[:, -1])
            points.append(x[:, -1])
        return torch.stack(points, 1)  # (B, P, d)

    def forward(self, tokens):
        h = self.hiddens(tokens)[:, -1]  # (B, d): the final residual
        return self.head(self.ln_f(h))  # (B, V) next-token logits


# --- the paper's method ---


def logit_lens(hiddens, final_norm, unembed):
    """The logit lens: p_l = softmax(W_U · LN_f(h_l)) for every point l.

    hiddens (..., P, d) residuals; final_norm: the model's final norm (a module or function on
    (..., d)); unembed W_U (V, d). Returns (..., P, V) probabilities. The final norm comes first:
    the unembedding was trained on normed residuals, so reading h_l raw would mis-scale it.
    """
    if unembed.dim() != 2:
        raise ValueError(f"unembed must be (V, d), got {tuple(unembed.shape)}")
    if hiddens.dim() < 2 or hiddens.shape[-1] != unembed.shape[1]:
        d = unembed.shape[1]
        raise ValueError(f"hiddens must be (..., P, {d}), got {tuple(hiddens.shape)}")
    logits = final_norm(hiddens) @ unembed.T  # (..., P, V)
    return logits.float().softmax(-1)  # (..., P, V)


def fit_tuned_lens(hiddens, final_hidden, ridge=1e-4):
    """The tuned lens as least squares, one affine map per point into the final residual:
    W_l = argmin ||[h_l, 1] W_l - h_final||² + ridge N ||W_l||².
    hiddens (N, P, d), final_hidden (N, d) -> W (P, d + 1, d); apply with apply_tuned_lens."""
    if hiddens.dim() != 3:
        raise ValueError(f"hiddens must be (N, P, d), got {tuple(hiddens.shape)}")
    N, P, d = hiddens.shape
    if final_hidden.shape != (N, d):
        raise ValueError(f"final_hidden must be ({N}, {d}), got {tuple(final_hidden.shape)}")
    ones = hiddens.new_ones(N, P, 1)
    X = torch.cat([hiddens, ones], -1).transpose(0, 1).double()  # (P, N, d+1)
    Y = final_hidden.double()  # (N, d)
    eye = torch.eye(d + 1, dtype=X.dtype, device=X.device)  # (d+1, d+1)
    gram = X.transpose(1, 2) @ X + ridge * N * eye  # (P, d+1, d+1)
    W = torch.linalg.solve(gram, X.transpose(1, 2) @ Y)  # (P, d+1, d)
    return W.to(hiddens.dtype)


def apply_tuned_lens(W, hiddens):
    """A_l h_l + b_l for every point: W (P, d+1, d), hiddens (N, P, d) -> (N, P, d)."""
    if hiddens.dim() != 3 or W.shape != (hiddens.shape[1], hiddens.shape[2] + 1, hiddens.shape[2]):
        raise ValueError(f"W {tuple(W.shape)} does not fit hiddens {tuple(hiddens.shape)}")
    return torch.einsum("npd,pde->npe", hiddens, W[:, :-1]) + W[:, -1]  # (N, P, d)


def token_log_odds(probs, token):
    """The curve of one token through the points, as log-odds: logit p_l[o] = log p_l[o] -
    log Σ_{v≠o} p_l[v]. Raw p saturates near 1 (0.998 and 0.99999 look alike to a linear model);
    log-odds keep them apart. probs (N, P, V), token (N,) -> (N, P)."""
    if probs.dim() != 3 or token.shape != (probs.shape[0],):
        raise ValueError(f"probs (N, P, V) and token (N,) expected, got {tuple(probs.shape)}, "
                         f"{tuple(token.shape)}")
    is_token = F.one_hot(token, probs.shape[2]).bool()[:, None, :]  # (N, 1, V)
    p_token = probs.masked_fill(~is_token, 0.0).sum(-1)  # (N, P)
    p_rest = probs.masked_fill(is_token, 0.0).sum(-1)  # (N, P): Σ over the other tokens, no 1 - p
    return p_token.clamp(min=1e-30).log() - p_rest.clamp(min=1e-30).log()  # (N, P)


def entropy(probs):
    """H_l = -Σ_v p_l[v] log p_l[v]: probs (..., V) -> (...)."""
    return -(probs * probs.clamp(min=1e-30).log()).sum(-1)


def balanced_accuracy(pred, y):
    """(TPR + TNR) / 2 for boolean predictions (N,) and 0/1 labels (N,)."""
    if pred.shape != y.shape or y.dim() != 1:
        raise ValueError(f"pred and y must both be (N,), got {tuple(pred.shape)}, {tuple(y.shape)}")
    pred = pred.bool()
    yb = y.bool()
    tpr = (pred & yb).sum() / yb.sum().clamp(min=1)
    tnr = (~pred & ~yb).sum() / (~yb).sum().clamp(min=1)
    return float((tpr + tnr) / 2)


def auroc(score, y):
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney).
    score (N,), y (N,) 0/1 with both classes present -> a float."""
    if score.shape != y.shape or y.dim() != 1:
        raise ValueError(f"score and y must be (N,), got {tuple(score.shape)}, {tuple(y.shape)}")
    pos = score[y.bool()].double()  # (N1,)
    neg = score[~y.bool()].double()  # (N0,)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auroc needs both classes")
    diff = pos[:, None] - neg[None, :]  # (N1, N0)
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def within_cell_auroc(score, y, cell):
    """AUROC inside each cell (e.g. a final-probability bin), averaged over the cells that hold
    both classes; None if none does. score (N,), y (N,) 0/1, cell (N,) long."""
    if not (score.shape == y.shape == cell.shape) or y.dim() != 1:
        raise ValueError("score, y and cell must all be (N,)")
    values = []
    for c in cell.unique():
        inside = cell == c  # (N,)
        n_pos = int(y[inside].sum())
        if 0 < n_pos < int(inside.sum()):
            values.append(auroc(score[inside], y[inside]))
    return float(np.mean(values)) if values else None


def best_threshold(x, y):
    """The 1-D rule sign · (x - t) > 0 of best balanced accuracy on (x, y); t runs over the
    midpoints between sorted values and one point beyond each end. x (N,), y (N,) -> (t, sign)."""
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"x and y must both be (N,), got {tuple(x.shape)}, {tuple(y.shape)}")
    xs = x.double().sort().values  # (N,)
    cand = torch.cat([xs[:1] - 1, (xs[1:] + xs[:-1]) / 2, xs[-1:] + 1])  # (N+1,)
    above = x.double()[None, :] > cand[:, None]  # (N+1, N): the rule "x > t -> 1" for every t
    yb = y.bool()[None]  # (1, N)
    tpr = (above & yb).sum(1) / yb.sum().clamp(min=1)  # (N+1,)
    tnr = (~above & ~yb).sum(1) / (~yb).sum().clamp(min=1)  # (N+1,)
    bal = (tpr + tnr) / 2  # (N+1,)
    i_up = int(bal.argmax())
    i_down = int(bal.argmin())  # the rule "x <= t -> 1" scores 1 - bal
    if bal[i_up] >= 1 - bal[i_down]:
        return float(cand[i_up]), 1.0
    return float(cand[i_down]), -1.0


@dataclasses.dataclass
class LinearDetector:
    """score(x) = ((x - mu) / sd) · w + b; a hallucination is predicted where score > 0."""

    w: torch.Tensor  # (F,) weights on standardized features
    b: float  # bias
    mu: torch.Tensor  # (F,) training mean
    sd: torch.Tensor  # (F,) training standard deviation

    def score(self, X):
        return ((X.double() - self.mu) / self.sd) @ self.w + self.b  # (N,)


def train_linear_classifier(X, y, kind="logreg", l2=1e-3, iters=50):
    """A linear detector on standardized features z = (x - mu) / sd.

    X (N, F), y (N,) in {0, 1}; margin m = s (z · w + b), s = 2y - 1; class weights
    c_y = N / (2 N_y) so both classes count equally (hallucinations are the rarer class).
      logreg: L = mean c_y softplus(-m)   + λ/2 ||w||²
      svm:    L = mean c_y max(0, 1 - m)² + λ/2 ||w||²   (squared hinge, as sklearn's LinearSVC)
    Both are convex; Newton's method on θ = (w, b) solves them in a few steps. The bias is then
    re-set to the training threshold of best balanced accuracy, the rule the 1-D baselines use.
    Returns a LinearDetector.
    """
    require(kind in ("logreg", "svm"), f"classifier kind {kind}: choose logreg or svm")
    if X.dim() != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be (N, F) and y (N,), got {tuple(X.shape)}, {tuple(y.shape)}")
    X = X.double()
    y = y.double()
    N, n_feat = X.shape
    mu = X.mean(0)  # (F,)
    sd = X.std(0).clamp(min=1e-6)  # (F,)
    A = torch.cat([(X - mu) / sd, X.new_ones(N, 1)], 1)  # (N, F+1): features and a bias column
    s = 2 * y - 1  # (N,)
    c = torch.where(y > 0, N / (2 * y.sum().clamp(min=1)), N / (2 * (1 - y).sum().clamp(min=1)))
    reg = torch.cat([X.new_full((n_feat,), l2), X.new_zeros(1)])  # (F+1,): no penalty on b
    theta = X.new_zeros(n_feat + 1)  # (F+1,)
    for _ in range(iters):
        m = s * (A @ theta)  # (N,)
        if kind == "logreg":
            # ∇L = -mean c s σ(-m) a + λ w ;  ∇²L = mean c σ(m) σ(-m) a aᵀ + λ I
            grad = -(A.T @ (c * s * torch.sigmoid(-m))) / N + reg * theta  # (F+1,)
            curv = c * torch.sigmoid(m) * torch.sigmoid(-m)  # (N,)
        else:
            # ∇L = -2 mean c s (1 - m)₊ a + λ w ;  ∇²L = 2 mean c [m < 1] a aᵀ + λ I
            grad = -2 * (A.T @ (c * s * (1 - m).clamp(min=0))) / N + reg * theta  # (F+1,)
            curv = 2 * c * (m < 1)  # (N,): the generalized Hessian of the squared hinge
        hess = (A.T * curv) @ A / N + torch.diag(reg + 1e-9)  # (F+1, F+1)
        step = torch.linalg.solve(hess, grad)  # (F+1,)
        theta = theta - step
        if step.abs().max() < 1e-9:
            break
    t, sign = best_threshold(A[:, :-1] @ theta[:-1], y)
    return LinearDetector(w=sign * theta[:-1], b=-sign * t, mu=mu, sd=sd)


def grouped_folds(groups, n_folds, gen):
    """Cross-validation folds by group: every group (subject) lands in one fold, so no subject
    is on both sides of a split. groups: a list of N labels -> (N,) long fold index."""
    unique = sorted(set(groups))
    order = torch.randperm(len(unique), generator=gen).tolist()
    fold_of = {unique[i]: rank % n_folds for rank, i in enumerate(order)}
    return torch.tensor([fold_of[g] for g in groups])


def cross_validate(X, y, folds, kind):
    """Out-of-fold scores and predictions: for each fold, fit on the others, score this one.

    kind "threshold": the best 1-D rule on X (N, 1) (a baseline); "logreg" / "svm": a linear
    detector on X (N, F). Returns score (N,) double (higher: more likely a hallucination) and
    pred (N,) bool (score > 0)."""
    if X.dim() != 2 or y.shape != (X.shape[0],) or folds.shape != y.shape:
        raise ValueError(f"X (N, F), y (N,), folds (N,) expected, got {tuple(X.shape)}, "
                         f"{tuple(y.shape)}, {tuple(folds.shape)}")
    score = torch.zeros(len(y), dtype=torch.float64)  # (N,)
    for k in folds.unique():
        test = folds == k  # (N,)
        train = ~test
        if kind == "threshold":
            if X.shape[1] != 1:
                raise ValueError(f"a threshold needs one feature, got {X.shape[1]}")
            t, sign = best_threshold(X[train, 0], y[train])
            score[test] = sign * (X[test, 0].double() - t)
        else:
            detector = train_linear_classifier(X[train], y[train], kind)
            score[test] = detector.score(X[test])
    return score, score > 0


# --- training ---


def train(model, tokens, answers, train_idx, cfg, seed, device, on_log):
    """AdamW on the cross-entropy of the answer token only (the token after the prompt)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    warmup = max(1, cfg.steps // 20)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    seen = 0
    for step in range(1, cfg.steps + 1):
        lr = cosine_lr(step - 1, cfg.steps, cfg.lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(len(train_idx), (cfg.batch_size,), generator=gen)  # (B,)
        idx = train_idx[pick]  # (B,)
        x = tokens[idx].to(device)  # (B, T)
        y = answers[idx].to(device)  # (B,)
        with autocast(device):
            logits = model(x)  # (B, V)
        # L = -mean_b log p(answer_b | prompt_b): the answer is the only supervised token
        loss = F.cross_entropy(logits.float(), y)
        loss_value = loss.item()
        check_finite(step, loss=loss_value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += x.numel()
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = on_log()
            tok_per_s = seen / max(time.time() - start, 1e-9)
            log_progress(step, cfg.steps, start, loss=loss_value, lr=lr, **metrics,
                         tok_per_s=tok_per_s)


# --- evaluation ---

PROB_BINS = [0.5, 0.9, 0.99]  # final-probability bin edges: [0, .5), [.5, .9), [.9, .99), [.99, 1]
HEADLINE = "curve_logit_logreg"  # the curve detector chosen before looking at any result
DETECTORS = {  # arm -> (feature set, classifier); "threshold" is the best 1-D rule
    "curve_logit_logreg": ("logit", "logreg"),
    "curve_logit_svm": ("logit", "svm"),
    "curve_tuned_logreg": ("tuned", "logreg"),
    "curve_tuned_svm": ("tuned", "svm"),
    "curve_both_logreg": ("both", "logreg"),
    "curve_both_svm": ("both", "svm"),
    "final_prob": ("final_prob", "threshold"),
    "entropy": ("entropy", "threshold"),
    "template_only": ("template", "logreg"),
    "template_final_prob": ("template_final_prob", "logreg"),
    "template_curve": ("template_curve", "logreg"),
}


class Readout(NamedTuple):
    """One lens read at every point (P) for every prompt (N)."""

    out: torch.Tensor  # (N,) the output token o: the logit lens's argmax at the last point
    log_odds_out: torch.Tensor  # (N, P) logit p_l[o]
    log_odds_gold: torch.Tensor  # (N, P) logit p_l[gold]
    entropy: torch.Tensor  # (N, P) H_l
    top1_out: torch.Tensor  # (N, P) bool: o is the top token at point l
    top1_gold: torch.Tensor  # (N, P) bool: gold is the top token at point l


@torch.no_grad()
def all_hiddens(model, tokens, device, batch=2048):
    """The last position's residual at every point for every prompt: (N, P, d) on the CPU."""
    model.eval()
    chunks = []
    for i in range(0, len(tokens), batch):
        with autocast(device):
            chunks.append(model.hiddens(tokens[i:i + batch].to(device)).float().cpu())
    model.train()
    return torch.cat(chunks)


@torch.no_grad()
def read_lens(H, final_norm, unembed, answers, out=None, batch=2048):
    """Read hiddens H (N, P, d) through final_norm and unembed (V, d): the output token's and
    the gold token's curves, entropy and top-1 flags. out (N,): the output token to follow;
    None: this readout's own argmax at the last point."""
    parts = []
    for i in range(0, len(H), batch):
        h = H[i:i + batch].to(unembed.device)  # (b, P, d)
        probs = logit_lens(h, final_norm, unembed).cpu()  # (b, P, V)
        o = probs[:, -1].argmax(1) if out is None else out[i:i + batch]  # (b,)
        gold = answers[i:i + batch]  # (b,)
        top = probs.argmax(-1)  # (b, P)
        parts.append(Readout(out=o, log_odds_out=token_log_odds(probs, o),
                             log_odds_gold=token_log_odds(probs, gold), entropy=entropy(probs),
                             top1_out=top == o[:, None], top1_gold=top == gold[:, None]))
    return Readout(*[torch.cat(field) for field in zip(*parts)])


def tuned_lens_hiddens(H, fit_rows):
    """Fit the tuned lens on the prompts fit_rows (N,) bool, toward the final residual (the last
    point), and map every point of every prompt into the final residual's space: (N, P, d)."""
    W = fit_tuned_lens(H[fit_rows], H[fit_rows, -1])  # (P, d+1, d)
    return apply_tuned_lens(W, H)


def fact_table(fact_id, template, correct, n_facts, n_templates):
    """(n_facts, n_templates) booleans: is the fact answered right through that template?"""
    table = torch.zeros(n_facts, n_templates, dtype=torch.bool)
    has_fact = fact_id >= 0
    table[fact_id[has_fact], template[has_fact]] = correct[has_fact]
    return table


def knowledge_stats(table):
    """Shares of facts right through every template, through some (mixed: known-fact
    hallucinations are possible) and through none."""
    known = table.any(1)
    all_right = table.all(1)
    return {"mixed_share": float((known & ~all_right).float().mean()),
            "all_right_share": float(all_right.float().mean()),
            "all_wrong_share": float((~known).float().mean())}


def case_summary(log_odds, tuned_log_odds, top1):
    """Mean probability curves (logit and tuned lens) of one case and the share of its prompts
    whose token is top-1 at some intermediate point (the last point is the output itself)."""
    if len(log_odds) == 0:
        return {"n": 0, "logit_curve": None, "tuned_curve": None, "top1_rate": None}
    return {"n": len(log_odds),
            "logit_curve": log_odds.sigmoid().mean(0).tolist(),
            "tuned_curve": tuned_log_odds.sigmoid().mean(0).tolist(),
            "top1_rate": float(top1[:, :-1].any(1).float().mean())}


def case_curves(logit, tuned, correct, mask):
    """The paper's three cases among the prompts in mask (N,) bool: success = the gold token on
    right prompts, fail = the gold token on wrong prompts, hallucination = the output token on
    wrong prompts (what the model says instead)."""
    right = mask & correct
    wrong = mask & ~correct
    return {
        "success": case_summary(logit.log_odds_gold[right], tuned.log_odds_gold[right],
                                logit.top1_gold[right]),
        "fail": case_summary(logit.log_odds_gold[wrong], tuned.log_odds_gold[wrong],
                             logit.top1_gold[wrong]),
        "hallucination": case_summary(logit.log_odds_out[wrong], tuned.log_odds_out[wrong],
                                      logit.top1_out[wrong]),
    }


def detector_features(logit, tuned, template, n_templates):
    """What a deployed detector may see, never the gold answer: the output token's log-odds
    curve through the logit and the tuned lens, the final probability and entropy, and (for the
    controls) which template the prompt came from. Returns feature set -> (N, F)."""
    one_hot = F.one_hot(template, n_templates).double()  # (N, n_templates)
    final = logit.log_odds_out[:, -1:]  # (N, 1): logit of the final probability
    tuned_curve = tuned.log_odds_out[:, :-1]  # (N, P-1): the last tuned point is the logit one
    return {"logit": logit.log_odds_out,  # (N, P)
            "tuned": tuned_curve,  # (N, P-1)
            "both": torch.cat([logit.log_odds_out, tuned_curve], 1),  # (N, 2P-1)
            "final_prob": final,  # (N, 1)
            "entropy": logit.entropy[:, -1:],  # (N, 1)
            "template": one_hot,  # (N, n_templates)
            "template_final_prob": torch.cat([one_hot, final.double()], 1),  # (N, n_templates+1)
            "template_curve": torch.cat([one_hot, logit.log_odds_out.double()], 1)}


def probability_bins(p):
    """Final-probability bins: 0 = [0, .5), 1 = [.5, .9), 2 = [.9, .99), 3 = [.99, 1]. p (N,)."""
    return torch.bucketize(p, torch.tensor(PROB_BINS, dtype=p.dtype), right=True)  # (N,)


def enough_of_each_class(y, n_min):
    """Can a detector be cross-validated on labels y (N,)? At least n_min of each class."""
    n_wrong = int(y.sum())
    return min(n_wrong, len(y) - n_wrong) >= n_min


def evaluate_detectors(features, y, folds, template):
    """Every detector arm on one subject-grouped cross-validation: balanced accuracy of the
    pooled out-of-fold predictions; the headline curve detector's and the final probability's
    AUROC inside final-probability bins, and inside bin x template cells."""
    result = {}
    scores = {}
    for name, (feature, kind) in DETECTORS.items():
        scores[name], pred = cross_validate(features[feature], y, folds, kind)
        result[name] = balanced_accuracy(pred, y)
    curves = [result[name] for name in DETECTORS if name.startswith("curve_")]
    result["curve"] = result[HEADLINE]
    result["curve_best"] = max(curves)
    result["curve_minus_best_baseline"] = result["curve"] - max(result["final_prob"],
                                                                result["entropy"])
    result["template_curve_gain"] = result["template_curve"] - result["template_final_prob"]
    final_prob = features["final_prob"][:, 0].sigmoid()  # (N,): back from log-odds
    bins = probability_bins(final_prob)  # (N,)
    pairs = torch.stack([bins, template], 1)  # (N, 2)
    cells = torch.unique(pairs, dim=0, return_inverse=True)[1]  # (N,): one id per bin x template
    # a hallucination scores higher where p is lower; log-odds keep p near 1 apart (no ties)
    low_prob = -features["final_prob"][:, 0].double()  # (N,)
    result["within_bin_auroc"] = {"curve": within_cell_auroc(scores[HEADLINE], y, bins),
                                  "final_prob": within_cell_auroc(low_prob, y, bins)}
    result["within_bin_template_auroc"] = {
        "curve": within_cell_auroc(scores[HEADLINE], y, cells),
        "final_prob": within_cell_auroc(low_prob, y, cells)}
    wrong = y.bool()
    result["confident_hallucination_share"] = float((final_prob[wrong] >= 0.5).float().mean())
    result["n_samples"] = len(y)
    result["n_hallucinations"] = int(y.sum())
    return result


def seed_stat(values, reduce):
    """Reduce per-seed numbers (or dicts of them, key by key) with reduce, skipping None and
    NaN; None where no seed has a value."""
    if isinstance(values[0], dict):
        return {k: seed_stat([v[k] for v in values], reduce) for k in values[0]}
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return round(float(reduce(kept)), 4) if kept else None


def curve_adds_information(per_seed):
    """The rule fixed before the run: the curve adds information only if template + curve beats
    template + final probability by >= 0.02 in every seed, and inside bin x template cells the
    curve's mean AUROC is >= 0.55 and above the final probability's."""
    gains = [s["template_curve_gain"] for s in per_seed]
    cell = seed_stat([s["within_bin_template_auroc"] for s in per_seed], np.mean)
    if cell["curve"] is None or cell["final_prob"] is None:
        return False
    return min(gains) >= 0.02 and cell["curve"] >= 0.55 and cell["curve"] > cell["final_prob"]


def run_seed(cfg, seed, facts, device):
    """One seed: prompts, a model trained on its trained prompts, both lenses, the three cases
    and every detector in both settings (unseen prompts; all prompts of mixed facts)."""
    set_seed(seed)
    rng = np.random.default_rng(seed)
    if facts is None:
        facts = make_kb(cfg.n_subjects, cfg.n_relations, cfg.n_objects, cfg.zipf, rng)
    prompts = build_prompts(facts, cfg.template_train, rng)
    tokens, answers, vocab = tokenize(prompts)
    fact_id = torch.tensor([p["fact"] for p in prompts])  # (N,)
    template = torch.tensor([p["template"] for p in prompts])  # (N,)
    is_train = torch.tensor([p["train"] for p in prompts])  # (N,)
    is_fact = fact_id >= 0  # (N,)
    model = TinyLM(len(vocab), tokens.shape[1], cfg.d_model, cfg.n_layers, cfg.n_heads).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"seed {seed}: {len(facts)} facts, {len(prompts)} prompts ({int(is_train.sum())} "
        f"trained), vocab {len(vocab)}, prompt length {tokens.shape[1]}, "
        f"{n_params / 1e6:.2f}M parameters")
    history = []

    def on_log():  # the share of mixed facts along training, to show where it settles
        H_last = all_hiddens(model, tokens, device)[:, -1:]  # (N, 1, d)
        unembed = model.head.weight.detach()
        right = read_lens(H_last, model.ln_f, unembed, answers).out == answers
        stats = knowledge_stats(fact_table(fact_id, template, right, len(facts), len(TEMPLATES)))
        acc_train = float(right[is_train & is_fact].float().mean())
        history.append({"mixed_share": round(stats["mixed_share"], 4),
                        "acc_train": round(acc_train, 4)})
        return history[-1]

    train(model, tokens, answers, is_train.nonzero()[:, 0], cfg, seed, device, on_log)

    # both lenses at the end of training; the tuned lens is fitted on the trained fact prompts
    H = all_hiddens(model, tokens, device)  # (N, P, d)
    unembed = model.head.weight.detach()  # (V, d)
    logit = read_lens(H, model.ln_f, unembed, answers)
    tuned = read_lens(tuned_lens_hiddens(H, is_train & is_fact), model.ln_f, unembed, answers,
                      out=logit.out)
    correct = logit.out == answers  # (N,)
    table = fact_table(fact_id, template, correct, len(facts), len(TEMPLATES))
    row = fact_id.clamp(min=0)  # (N,): the prompt's fact (links read fact 0 and are masked out)
    known = is_fact & table.any(1)[row]  # (N,)
    mixed = known & ~table.all(1)[row]  # (N,)
    settings = {"unseen_prompts": known & ~is_train, "all_prompts": mixed}

    # the detectors: 1 = hallucination; folds by subject, so no subject is on both sides
    y = (~correct).long()  # (N,)
    features = detector_features(logit, tuned, template.clamp(min=0), len(TEMPLATES))
    folds = grouped_folds([p["subject"] for p in prompts], cfg.n_folds,
                          torch.Generator().manual_seed(seed))
    detector = {}
    cases = {}
    for name, mask in settings.items():
        cases[name] = case_curves(logit, tuned, correct, mask)
        if not enough_of_each_class(y[mask], cfg.n_folds):
            detector[name] = None
            log(f"seed {seed}, {name}: fewer than {cfg.n_folds} prompts of a class; no detector")
            continue
        subset = {k: v[mask] for k, v in features.items()}
        detector[name] = evaluate_detectors(subset, y[mask], folds[mask], template[mask])

    def accuracy(rows):
        return float(correct[rows].float().mean()) if rows.any() else None

    by_template = {}
    for t, text in enumerate(TEMPLATES):
        rows = is_fact & (template == t)
        by_template[text] = {"trained": accuracy(rows & is_train),
                             "held_out": accuracy(rows & ~is_train)}
    knowledge = {**{k: round(v, 4) for k, v in knowledge_stats(table).items()},
                 "by_template": by_template, "link_accuracy": accuracy(~is_fact),
                 "during_training": history}
    return {"seed": seed, "n_params": n_params, "knowledge": knowledge, "cases": cases,
            "detector": detector}


def summarize(per_seed):
    """Means over seeds (the std and the worst seed beside them) of the detector numbers and of
    the case curves, and the verdict on the curve."""
    detector = {}
    for name in ("unseen_prompts", "all_prompts"):
        runs = [s["detector"][name] for s in per_seed if s["detector"][name] is not None]
        if not runs:
            detector[name] = None
            continue
        detector[name] = {**seed_stat(runs, np.mean), "std": seed_stat(runs, np.std),
                          "worst": seed_stat(runs, np.min), "per_seed": runs}
    cases = {}
    for name in ("unseen_prompts", "all_prompts"):
        cases[name] = {}
        for case in ("success", "fail", "hallucination"):
            runs = [s["cases"][name][case] for s in per_seed if s["cases"][name][case]["n"]]
            curves = {k: np.mean([r[k] for r in runs], 0).round(4).tolist() if runs else None
                      for k in ("logit_curve", "tuned_curve")}
            top1 = seed_stat([r["top1_rate"] for r in runs], np.mean) if runs else None
            n = sum(r["n"] for r in runs)
            cases[name][case] = {"n": n, **curves, "top1_rate": top1}
    unseen = detector["unseen_prompts"]
    verdict = unseen is not None and curve_adds_information(unseen["per_seed"])
    arms = {}
    for arm in DETECTORS:
        arms[arm] = {}
        for name, d in detector.items():
            if d is not None:
                arms[arm][name] = {"mean": d[arm], "std": d["std"][arm], "worst": d["worst"][arm]}
    return detector, cases, arms, verdict


def print_table(results):
    points = results["points"]
    for s in results["per_seed_knowledge"]:
        parts = []
        for t, v in enumerate(s["by_template"].values()):
            held_out = "-" if v["held_out"] is None else f"{v['held_out']:.3f}"
            parts.append(f"t{t} {v['trained']:.3f}/{held_out}")
        by_template = " | ".join(parts)
        log(f"seed {s['seed']}: facts mixed {s['mixed_share']:.3f}, all right "
            f"{s['all_right_share']:.3f}, all wrong {s['all_wrong_share']:.3f}; accuracy "
            f"trained/held-out by template: {by_template}")
    for name, cases in results["cases"].items():
        log(f"\n{name}: mean probability of the token, logit lens | tuned lens (mean of seeds)")
        log(f"{'case':<15}{'n':>6}{'top1':>6} " + "".join(f"{p:>7}" for p in points))
        for case, c in cases.items():
            if c["logit_curve"] is None:
                continue
            row = "".join(f"{v:>7.3f}" for v in c["logit_curve"])
            log(f"{case:<15}{c['n']:>6}{c['top1_rate']:>6.2f} {row}")
            row = "".join(f"{v:>7.3f}" for v in c["tuned_curve"])
            log(f"{'  tuned':<27} {row}")
    log("\ndetector: balanced accuracy, subject-grouped "
        f"{results['config']['n_folds']}-fold, mean ± std (worst seed), "
        f"{len(results['seeds'])} seeds")
    log(f"{'arm':<22}{'unseen prompts':>24}{'all prompts':>24}")
    for arm, by_setting in results["arms"].items():
        cells = []
        for name in ("unseen_prompts", "all_prompts"):
            a = by_setting.get(name)
            cells.append(f"{a['mean']:.3f} ± {a['std']:.3f} ({a['worst']:.3f})" if a else "-")
        log(f"{arm:<22}{cells[0]:>24}{cells[1]:>24}")
    for name, d in results["detector"].items():
        if d is None:
            continue
        log(f"{name}: n {d['n_samples']:.0f} ({d['n_hallucinations']:.0f} hallucinated), "
            f"confident hallucinations (p >= 0.5) {d['confident_hallucination_share']:.3f}; "
            f"AUROC in p-bins: curve {d['within_bin_auroc']['curve']}, final p "
            f"{d['within_bin_auroc']['final_prob']}; in p-bin x template cells: curve "
            f"{d['within_bin_template_auroc']['curve']}, final p "
            f"{d['within_bin_template_auroc']['final_prob']}")
    log(f"curve adds information beyond template and final probability: "
        f"{results['curve_adds_information']}")


def plot(results, path):
    """The paper's picture: mean curves of success / fail / hallucination through the logit and
    the tuned lens (unseen prompts, mean of seeds), and the detectors' balanced accuracy."""
    fig, axes = new_figure(3, width=4.4, height=3.4)
    points = results["points"]
    colors = {"success": "tab:green", "fail": "tab:gray", "hallucination": "tab:red"}
    cases = results["cases"]["unseen_prompts"]
    for ax, key, title in zip(axes, ("logit_curve", "tuned_curve"), ("logit lens", "tuned lens")):
        for case, c in cases.items():
            if c[key] is not None:
                ax.plot(range(len(points)), c[key], marker="o", color=colors[case],
                        label=f"{case} (n {c['n']})")
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels(points, rotation=60, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}, unseen prompts")
        ax.set_ylabel("probability of the token")
    axes[0].legend(fontsize=7)
    names = list(results["arms"])
    for offset, setting in ((-0.2, "unseen_prompts"), (0.2, "all_prompts")):
        stats = [results["arms"][n].get(setting) for n in names]
        means = [s["mean"] if s else 0.0 for s in stats]
        stds = [s["std"] if s else 0.0 for s in stats]
        ys = [i + offset for i in range(len(names))]
        axes[2].barh(ys, means, height=0.4, xerr=stds, label=setting.replace("_", " "))
    axes[2].set_yticks(range(len(names)))
    axes[2].set_yticklabels(names, fontsize=7)
    axes[2].invert_yaxis()
    axes[2].axvline(0.5, color="k", lw=0.8, ls=":")
    axes[2].set_xlim(0.4, 1.0)
    axes[2].set_xlabel("detector balanced accuracy (grouped CV, mean ± std of seeds)")
    axes[2].legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    fig.subplots_adjust(wspace=0.6)
    save_figure(fig, path)


# --- main ---


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 150), n_seeds=min(cfg.n_seeds, 2),
                                  n_subjects=min(cfg.n_subjects, 24),
                                  n_relations=min(cfg.n_relations, 2), n_layers=2, d_model=32,
                                  n_heads=2, batch_size=64, n_folds=2, log_every=75)
    device = pick_device(cfg.device)
    wall_start = time.time()
    cpu_start = time.process_time()
    log(f"config: {dataclasses.asdict(cfg)}")
    facts = None
    if cfg.data:
        rows = load_user_data(cfg.data, ["subject", "relation", "object"])
        columns = ("subject", "relation", "object")
        facts = [{k: str(r[k]).strip().replace(" ", "_") for k in columns} for r in rows]
    seeds = list(range(cfg.seed, cfg.seed + cfg.n_seeds))
    per_seed = [run_seed(cfg, seed, facts, device) for seed in seeds]
    detector, cases, arms, verdict = summarize(per_seed)
    n_layers = cfg.n_layers
    points = ["emb"] + [f"{k}{i + 1}" for i in range(n_layers) for k in ("attn", "mlp")]
    knowledge = [{"seed": s["seed"], **s["knowledge"]} for s in per_seed]
    results = {"config": dataclasses.asdict(cfg), "seeds": seeds, "points": points,
               "n_params": per_seed[0]["n_params"], "arms": arms, "detector": detector,
               "curve_adds_information": verdict, "cases": cases,
               "per_seed_knowledge": knowledge,
               "wall_time_s": time.time() - wall_start,
               "cpu_time_s": time.process_time() - cpu_start}
    print_table(results)
    save_json(os.path.join(cfg.out, "results.json"), results)
    plot(results, os.path.join(cfg.out, "hallucination_lens.png"))
    log(f"wrote {cfg.out}/results.json and hallucination_lens.png "
        f"({time.process_time() - cpu_start:.0f}s CPU)")
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
