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
    python hallucination_lens.py            # the whole comparison, seeds as jobs on every core
    python hallucination_lens.py --smoke    # the same code path at a tiny size, in seconds

Headline (6 seeds; the record: results/hallucination_lens/results.md): the lens curves differ
by outcome as the paper says (the answer is top-1 at an intermediate point in 92% of successes,
28% of failures), but on prompts never trained the curve detector (0.623 ± 0.019 balanced
accuracy) is level with a final-probability threshold (0.612), and template + curve (0.639) with
template + final p (0.635): curve_adds_information is false, the curve adds nothing beyond
phrasing and confidence in this toy.

Deviations from the paper (and its official code, dcdsf321/known_fact_hallucination):
- A synthetic knowledge base (300 subjects x 4 relations, Zipf object prior) and a 4-layer d-64
  decoder trained from scratch replace COUNTERFACT and Llama2-7B-chat: no 7B model fits the
  budget. Phrasing matters through held-out (fact, template) pairs: template 0 is always
  trained, templates 1-3 each with probability template_train; 2-3 name the subject by an alias
  (the link "alias is also known as name" is trained), 1 names a distractor subject and its
  object, a competing answer in the prompt.
- Curves after the embedding and after every attention and MLP sub-layer (the paper: after
  each layer), read at the end of training; "top-1 at some layer" counts intermediate points.
- Curves as log-odds of the output token, not raw probabilities (raw p saturates near 1).
- Detector data: `unseen_prompts` = held-out prompts of facts the model knows through some
  template, right (0) vs wrong (1), so both come from generalisation; `all_prompts` = every
  prompt of a fact mixed between right and wrong (the paper's setting; trained prompts are
  right, so it mostly separates memorised from new prompts).
- The official code fits sklearn's linear SVC on one random 80/20 split, plain accuracy. Here:
  classes weighted, subject-grouped 5-fold (a subject never on both sides), balanced accuracy,
  the bias re-set to the best training threshold, an L2 squared-hinge SVM beside logistic
  regression. `curve` in results.json is the detector fixed before the run (logreg on logit-lens
  log-odds); `curve_best`, the best of six, is picked after the fact and optimistic.
- Baselines and controls the paper never ran: final-p and entropy thresholds, the template
  alone, with final p and with the curve, AUROC inside final-p bins (and bin x template cells).
- The tuned lens is an affine map fitted in closed form (tiny ridge) on the trained prompts,
  not trained by SGD on a KL loss as in Belrose et al.
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import multiprocessing
import os
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
    """Train small decoders on a synthetic knowledge base, read their known-fact hallucinations
    with the logit and tuned lens, and detect them from the curves beside simple baselines."""

    steps: int = 800  # training steps per seed
    seed: int = 0  # the first seed; the run uses seed, seed + 1, ..., seed + n_seeds - 1
    n_seeds: int = 6  # seeds (one knowledge-base split and one model each), one job each
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines facts: subject, relation, object (one word each); empty: synthetic
    out: str = "runs/hallucination_lens"  # folder for results.json, results.md and the figure
    smoke: bool = False  # the same code path at a tiny size, in seconds
    workers: int = 0  # worker processes of one thread each (0: one per core; 1 on a GPU)
    log_every: int = 200  # steps between log lines
    n_subjects: int = 300  # subjects in the synthetic knowledge base
    n_relations: int = 4  # relations in the synthetic knowledge base
    n_objects: int = 16  # objects per relation
    zipf: float = 1.0  # object prior p(k) ∝ (k+1)^-zipf: the model's "default guess" per relation
    template_train: float = 0.5  # chance that a (fact, template 1-3) pair is trained (0: always)
    n_layer: int = 4  # decoder blocks
    n_embd: int = 64  # residual width
    n_head: int = 4  # attention heads
    batch_size: int = 128  # prompts per step
    lr: float = 3e-3  # AdamW peak learning rate (warm-up over steps / 20, cosine decay to lr / 10)
    weight_decay: float = 0.01  # AdamW weight decay
    n_folds: int = 5  # subject-grouped cross-validation folds for the detectors

    def __post_init__(self):
        positive = ("n_seeds", "log_every", "n_subjects", "n_relations", "n_objects", "n_layer",
                    "n_embd", "n_head", "batch_size")
        for name in positive:
            value = getattr(self, name)
            require(value > 0, f"--{name.replace('_', '-')} {value}: must be positive")
        require(self.n_embd % self.n_head == 0,
                f"--n-embd {self.n_embd}: must be divisible by --n-head {self.n_head}")
        require(self.zipf >= 0, f"--zipf {self.zipf}: must be >= 0")
        require(0 <= self.template_train <= 1,
                f"--template-train {self.template_train}: must be in [0, 1]")
        require(self.lr > 0, f"--lr {self.lr}: must be positive")
        require(self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be >= 0")
        require(self.n_folds >= 2, f"--n-folds {self.n_folds}: must be at least 2")
        require(self.workers >= 0, f"--workers {self.workers}: must be >= 0")


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


class Threshold(typing.NamedTuple):
    """The 1-D rule sign · (x - t) > 0 -> class 1."""

    t: float  # the threshold
    sign: float  # +1: high x means class 1; -1: low x does


def best_threshold(x, y):
    """The 1-D rule sign · (x - t) > 0 of best balanced accuracy on (x, y); t runs over the
    midpoints between sorted values and one point beyond each end. x (N,), y (N,) -> Threshold."""
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
        return Threshold(float(cand[i_up]), 1.0)
    return Threshold(float(cand[i_down]), -1.0)


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
    if kind not in ("logreg", "svm"):
        raise ValueError(f"classifier kind {kind}: choose logreg or svm")
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
    rule = best_threshold(A[:, :-1] @ theta[:-1], y)
    return LinearDetector(w=rule.sign * theta[:-1], b=-rule.sign * rule.t, mu=mu, sd=sd)


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


@dataclasses.dataclass
class PromptSet:
    """Every prompt of one seed as tensors (N prompts, T tokens each)."""

    tokens: torch.Tensor  # (N, T) long, left-padded
    answers: torch.Tensor  # (N,) long: the answer token
    fact_id: torch.Tensor  # (N,) long: the fact's index, -1 for the alias links
    template: torch.Tensor  # (N,) long: the template's index, -1 for the links
    is_train: torch.Tensor  # (N,) bool: trained (else held out)
    subjects: list  # N subject names (the groups of the cross-validation)
    n_facts: int  # facts in the knowledge base
    vocab_size: int  # tokens in the compact vocabulary


def prompt_set(facts, prompts):
    """The prompts of build_prompts as one PromptSet."""
    tokens, answers, vocab = tokenize(prompts)
    return PromptSet(tokens=tokens, answers=answers,
                     fact_id=torch.tensor([p["fact"] for p in prompts]),
                     template=torch.tensor([p["template"] for p in prompts]),
                     is_train=torch.tensor([p["train"] for p in prompts]),
                     subjects=[p["subject"] for p in prompts], n_facts=len(facts),
                     vocab_size=len(vocab))


def tokenize(prompts):
    """Closed-word tiktoken encoding, then compact ids; prompts left-padded to one length.
    Returns tokens (N, T) long, answers (N,) long and the id -> word list."""
    words = set()
    for p in prompts:
        words.update(p["text"].split()[1:] + [p["answer"]])
    enc = word_encoding(sorted(words), ["<bos>", "<pad>"])
    seqs = [enc.encode(p["text"], allowed_special="all") for p in prompts]
    answer_ids = [enc.encode(" " + p["answer"]) for p in prompts]
    require(all(len(a) == 1 for a in answer_ids), "every answer must be one word (one token)")
    pad = enc.encode("<pad>", allowed_special="all")[0]
    ids = {pad}
    for s in seqs:
        ids.update(s)
    used = sorted(ids | {a[0] for a in answer_ids})
    compact = {t: i for i, t in enumerate(used)}
    width = max(len(s) for s in seqs)
    rows = []
    for s in seqs:
        rows.append([compact[pad]] * (width - len(s)) + [compact[t] for t in s])
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


def user_facts(path):
    """The --data file's triplets as dicts of one-word strings (spaces become underscores)."""
    columns = ("subject", "relation", "object")
    rows = load_user_data(path, list(columns))
    facts = []
    for r in rows:
        facts.append({k: str(r[k]).strip().replace(" ", "_") for k in columns})
    return facts


# --- model ---


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

    def forward(self, x, residuals=None):
        """x (B, T, D) -> (B, T, D); `residuals`, a list, receives the residual between the two
        sub-layers (B, T, D), the point the lenses read after the attention."""
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)  # (B, T, D) each
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        x = x + self.c_proj(y)  # (B, T, D)
        if residuals is not None:
            residuals.append(x)
        return x + self.mlp(self.ln_2(x))


class TinyLM(nn.Module):
    """Pre-LN decoder with learned positions; predicts the token after the last position."""

    def __init__(self, vocab_size, block_size, n_embd, n_layer, n_head):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)  # the unembedding W_U (V, D)

    def hiddens(self, tokens):
        """The last position's residual after the embedding and after every sub-layer: the
        P = 1 + 2L points the lenses read. tokens (B, T) -> (B, P, D)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
        x = self.tok(tokens) + self.pos(positions)  # (B, T, D)
        residuals = [x]
        for block in self.blocks:
            x = block(x, residuals)  # appends the residual after the attention
            residuals.append(x)
        return torch.stack([r[:, -1] for r in residuals], 1)  # (B, P, D)

    def forward(self, tokens):
        h = self.hiddens(tokens)[:, -1]  # (B, D): the final residual
        return self.head(self.ln_f(h))  # (B, V) next-token logits


# --- training ---


def get_lr(step, total, lr, warmup):
    """nanoGPT's schedule: linear warm-up for `warmup` steps, then cosine decay to lr / 10."""
    # 1) linear warm-up from lr / warmup to lr
    if step < warmup:
        return lr * (step + 1) / warmup
    # 2) cosine decay from lr (progress 0) to lr / 10 (progress 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)


def train(model, tokens, answers, train_idx, cfg, seed, device, on_log):
    """AdamW on the cross-entropy of the answer token only (the token after the prompt);
    on_log() returns the metrics to add to each log line."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    warmup = max(1, cfg.steps // 20)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    seen = 0
    for step in range(1, cfg.steps + 1):
        lr = get_lr(step - 1, cfg.steps, cfg.lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(len(train_idx), (cfg.batch_size,), generator=gen)  # (B,)
        idx = train_idx[pick]  # (B,)
        x = tokens[idx].to(device)  # (B, T)
        y = answers[idx].to(device)  # (B,)
        logits = model(x)  # (B, V)
        # L = -mean_b log p(answer_b | prompt_b): the answer is the only supervised token
        loss = F.cross_entropy(logits, y)
        loss_value = loss.item()
        check_finite(step, loss=loss_value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += x.numel()
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = on_log()
            tok_per_s = seen / max(time.time() - start, 1e-9)
            log_progress(step, cfg.steps, start, seed=seed, loss=loss_value, lr=lr, **metrics,
                         tok_per_s=tok_per_s)


# --- the study: lenses, detectors, controls (a reader who came for the method may stop here) ---

PROB_BINS = [0.5, 0.9, 0.99]  # final-probability bin edges: [0, .5), [.5, .9), [.9, .99), [.99, 1]
HEADLINE = "curve_logit_logreg"  # the curve detector chosen before looking at any result
GAIN_MIN = 0.02  # the verdict rule: template + curve must beat template + final p by this much
CELL_AUROC_MIN = 0.55  # ... and the curve's AUROC inside bin x template cells must reach this
PAPER = {"top1_success": 0.776, "top1_fail": 0.313,  # Llama2-7B-chat, the paper's numbers
         "detector_accuracy_logit": 0.839, "detector_accuracy_both": 0.879}


class Arm(typing.NamedTuple):
    """One detector: which features, which classifier ("threshold": the best 1-D rule)."""

    features: str
    kind: str


DETECTORS = {
    "curve_logit_logreg": Arm("logit", "logreg"),
    "curve_logit_svm": Arm("logit", "svm"),
    "curve_tuned_logreg": Arm("tuned", "logreg"),
    "curve_tuned_svm": Arm("tuned", "svm"),
    "curve_both_logreg": Arm("both", "logreg"),
    "curve_both_svm": Arm("both", "svm"),
    "final_prob": Arm("final_prob", "threshold"),
    "entropy": Arm("entropy", "threshold"),
    "template_only": Arm("template", "logreg"),
    "template_final_prob": Arm("template_final_prob", "logreg"),
    "template_curve": Arm("template_curve", "logreg"),
}


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
    if kind == "threshold" and X.shape[1] != 1:
        raise ValueError(f"a threshold needs one feature, got {X.shape[1]}")
    score = torch.zeros(len(y), dtype=torch.float64)  # (N,)
    for k in folds.unique():
        test = folds == k  # (N,)
        train = ~test
        if kind == "threshold":
            rule = best_threshold(X[train, 0], y[train])
            score[test] = rule.sign * (X[test, 0].double() - rule.t)
        else:
            detector = train_linear_classifier(X[train], y[train], kind)
            score[test] = detector.score(X[test])
    return score, score > 0


class Readout(typing.NamedTuple):
    """One lens read at every point (P) for every prompt (N)."""

    out: torch.Tensor  # (N,) the output token o: the logit lens's argmax at the last point
    log_odds_out: torch.Tensor  # (N, P) logit p_l[o]
    log_odds_gold: torch.Tensor  # (N, P) logit p_l[gold]
    entropy: torch.Tensor  # (N, P) H_l
    top1_out: torch.Tensor  # (N, P) bool: o is the top token at point l
    top1_gold: torch.Tensor  # (N, P) bool: gold is the top token at point l


class Lenses(typing.NamedTuple):
    """Both lenses on the same prompts; the tuned lens follows the logit lens's output token."""

    logit: Readout
    tuned: Readout


@torch.no_grad()
def all_hiddens(model, tokens, device, batch=2048):
    """The last position's residual at every point for every prompt: (N, P, D) on the CPU."""
    model.eval()
    chunks = []
    for i in range(0, len(tokens), batch):
        chunks.append(model.hiddens(tokens[i:i + batch].to(device)).cpu())  # (b, P, D)
    model.train()
    return torch.cat(chunks)


@torch.no_grad()
def read_lens(H, final_norm, unembed, answers, out=None, batch=2048):
    """Read hiddens H (N, P, D) through final_norm and unembed (V, D): the output token's and
    the gold token's curves, entropy and top-1 flags. out (N,): the output token to follow;
    None: this readout's own argmax at the last point."""
    parts = []
    for i in range(0, len(H), batch):
        h = H[i:i + batch].to(unembed.device)  # (b, P, D)
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
    point), and map every point of every prompt into the final residual's space: (N, P, D)."""
    W = fit_tuned_lens(H[fit_rows], H[fit_rows, -1])  # (P, D+1, D)
    return apply_tuned_lens(W, H)


def read_lenses(model, data, device):
    """Both lenses at the end of training; the tuned lens is fitted on the trained fact prompts."""
    H = all_hiddens(model, data.tokens, device)  # (N, P, D)
    unembed = model.head.weight.detach()  # (V, D)
    logit = read_lens(H, model.ln_f, unembed, data.answers)
    fit_rows = data.is_train & (data.fact_id >= 0)  # (N,)
    tuned = read_lens(tuned_lens_hiddens(H, fit_rows), model.ln_f, unembed, data.answers,
                      out=logit.out)
    return Lenses(logit=logit, tuned=tuned)


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


def track_knowledge(model, data, device, history):
    """The share of mixed facts and the trained accuracy now, appended to history (a log line's
    metrics along training, to show where the share settles)."""
    H_last = all_hiddens(model, data.tokens, device)[:, -1:]  # (N, 1, D)
    unembed = model.head.weight.detach()  # (V, D)
    right = read_lens(H_last, model.ln_f, unembed, data.answers).out == data.answers  # (N,)
    table = fact_table(data.fact_id, data.template, right, data.n_facts, len(TEMPLATES))
    stats = knowledge_stats(table)
    acc_train = float(right[data.is_train & (data.fact_id >= 0)].float().mean())
    history.append({"mixed_share": round(stats["mixed_share"], 4),
                    "acc_train": round(acc_train, 4)})
    return history[-1]


def share_right(correct, rows):
    """The share of the prompts in rows (N,) bool that are right; None if there are none."""
    return float(correct[rows].float().mean()) if rows.any() else None


def knowledge_record(data, correct, history):
    """What the model knows at the end: shares of all-right / mixed / all-wrong facts, accuracy
    by template on trained and held-out prompts, the alias links, and the shares along training."""
    is_fact = data.fact_id >= 0  # (N,)
    table = fact_table(data.fact_id, data.template, correct, data.n_facts, len(TEMPLATES))
    by_template = {}
    for t, text in enumerate(TEMPLATES):
        rows = is_fact & (data.template == t)
        by_template[text] = {"trained": share_right(correct, rows & data.is_train),
                             "held_out": share_right(correct, rows & ~data.is_train)}
    return {**{k: round(v, 4) for k, v in knowledge_stats(table).items()},
            "by_template": by_template, "link_accuracy": share_right(correct, ~is_fact),
            "during_training": history}


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
    for name, arm in DETECTORS.items():
        scores[name], pred = cross_validate(features[arm.features], y, folds, arm.kind)
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


def detect(cfg, seed, data, lenses):
    """The three cases and every detector in both settings: `unseen_prompts` (held-out prompts of
    facts known through some template) and `all_prompts` (every prompt of a mixed fact). The
    label is 1 for a hallucination; folds by subject, so no subject is on both sides."""
    correct = lenses.logit.out == data.answers  # (N,)
    table = fact_table(data.fact_id, data.template, correct, data.n_facts, len(TEMPLATES))
    row = data.fact_id.clamp(min=0)  # (N,): the prompt's fact (links read fact 0, masked out)
    known = (data.fact_id >= 0) & table.any(1)[row]  # (N,)
    mixed = known & ~table.all(1)[row]  # (N,)
    settings = {"unseen_prompts": known & ~data.is_train, "all_prompts": mixed}
    y = (~correct).long()  # (N,)
    template = data.template.clamp(min=0)  # (N,)
    features = detector_features(lenses.logit, lenses.tuned, template, len(TEMPLATES))
    folds = grouped_folds(data.subjects, cfg.n_folds, torch.Generator().manual_seed(seed))
    cases = {}
    detector = {}
    for name, mask in settings.items():
        cases[name] = case_curves(lenses.logit, lenses.tuned, correct, mask)
        detector[name] = None
        if enough_of_each_class(y[mask], cfg.n_folds):
            subset = {k: v[mask] for k, v in features.items()}
            detector[name] = evaluate_detectors(subset, y[mask], folds[mask], data.template[mask])
        else:
            print(f"seed {seed}, {name}: fewer than {cfg.n_folds} prompts of a class; no detector")
    return {"cases": cases, "detector": detector}


@dataclasses.dataclass
class SeedJob:
    """One seed's work: its own knowledge-base split, model, lenses and detectors."""

    cfg: Config
    seed: int
    facts: typing.Optional[list]  # the --data triplets (dicts); None: a synthetic KB per seed
    device: str  # where the model trains


def run_seed(job):
    """One seed: prompts, a model trained on its trained prompts, both lenses, the three cases
    and every detector in both settings. Returns plain data (one results.json entry)."""
    cpu_start = time.process_time()
    cfg = job.cfg
    device = torch.device(job.device)
    torch.manual_seed(job.seed)  # the model's initialisation (also every CUDA device)
    rng = np.random.default_rng(job.seed)  # the knowledge base and the held-out pairs
    facts = job.facts
    if facts is None:
        facts = make_kb(cfg.n_subjects, cfg.n_relations, cfg.n_objects, cfg.zipf, rng)
    data = prompt_set(facts, build_prompts(facts, cfg.template_train, rng))
    model = TinyLM(data.vocab_size, data.tokens.shape[1], cfg.n_embd, cfg.n_layer, cfg.n_head)
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"seed {job.seed}: {data.n_facts} facts, {len(data.subjects)} prompts "
          f"({int(data.is_train.sum())} trained), vocab {data.vocab_size}, prompt length "
          f"{data.tokens.shape[1]}, {n_params / 1e6:.2f}M parameters")
    history = []
    train(model, data.tokens, data.answers, data.is_train.nonzero()[:, 0], cfg, job.seed, device,
          lambda: track_knowledge(model, data, device, history))
    lenses = read_lenses(model, data, device)
    knowledge = knowledge_record(data, lenses.logit.out == data.answers, history)
    return {"seed": job.seed, "n_params": n_params, "knowledge": knowledge,
            **detect(cfg, job.seed, data, lenses), "cpu_s": time.process_time() - cpu_start}


def seed_stat(values, reduce):
    """Reduce per-seed numbers (or dicts of them, key by key) with reduce, skipping None and
    NaN; None where no seed has a value."""
    if isinstance(values[0], dict):
        stats = {}
        for k in values[0]:
            stats[k] = seed_stat([v[k] for v in values], reduce)
        return stats
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return round(float(reduce(kept)), 4) if kept else None


def curve_adds_information(per_seed):
    """The rule fixed before the run: the curve adds information only if template + curve beats
    template + final probability by >= GAIN_MIN in every seed, and inside bin x template cells
    the curve's mean AUROC is >= CELL_AUROC_MIN and above the final probability's."""
    gains = [s["template_curve_gain"] for s in per_seed]
    cell = seed_stat([s["within_bin_template_auroc"] for s in per_seed], np.mean)
    if cell["curve"] is None or cell["final_prob"] is None:
        return False
    return (min(gains) >= GAIN_MIN and cell["curve"] >= CELL_AUROC_MIN
            and cell["curve"] > cell["final_prob"])


def mean_case(runs):
    """One case's curves and top-1 rate: the mean over the seeds in runs (those that have the
    case); n summed."""
    if not runs:
        return {"n": 0, "logit_curve": None, "tuned_curve": None, "top1_rate": None}
    return {"n": sum(r["n"] for r in runs),
            "logit_curve": np.mean([r["logit_curve"] for r in runs], 0).round(4).tolist(),
            "tuned_curve": np.mean([r["tuned_curve"] for r in runs], 0).round(4).tolist(),
            "top1_rate": seed_stat([r["top1_rate"] for r in runs], np.mean)}


def summarize_cases(per_seed):
    """The case curves and top-1 rates, means over the seeds that have the case."""
    cases = {}
    for name in ("unseen_prompts", "all_prompts"):
        cases[name] = {}
        for case in ("success", "fail", "hallucination"):
            runs = [s["cases"][name][case] for s in per_seed if s["cases"][name][case]["n"]]
            cases[name][case] = mean_case(runs)
    return cases


def summarize(per_seed):
    """Means over seeds (the std and the worst seed beside them) of the detector numbers and of
    the case curves, the arms table, and the verdict on the curve."""
    detector = {}
    for name in ("unseen_prompts", "all_prompts"):
        runs = [s["detector"][name] for s in per_seed if s["detector"][name] is not None]
        detector[name] = None
        if runs:
            detector[name] = {**seed_stat(runs, np.mean), "std": seed_stat(runs, np.std),
                              "worst": seed_stat(runs, np.min), "per_seed": runs}
    arms = {}
    for arm in DETECTORS:
        arms[arm] = {}
        for name, d in detector.items():
            if d is not None:
                arms[arm][name] = {"mean": d[arm], "std": d["std"][arm], "worst": d["worst"][arm]}
    unseen = detector["unseen_prompts"]
    verdict = unseen is not None and curve_adds_information(unseen["per_seed"])
    return {"arms": arms, "detector": detector, "curve_adds_information": verdict,
            "cases": summarize_cases(per_seed)}


def plot(results):
    """The paper's picture: mean curves of success / fail / hallucination through the logit and
    the tuned lens (unseen prompts, mean of seeds), and the detectors' balanced accuracy."""
    fig = Figure(figsize=(4.6 * 3, 3.6))
    axes = fig.subplots(1, 3, squeeze=False)[0]
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
    return fig


def fmt(value, digits=3):
    """A number for the record; '-' where there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def signed(values):
    """Per-seed differences: '+0.001, -0.004'."""
    return ", ".join(f"{v:+.3f}" for v in values)


def report_knowledge(results):
    """The gate: trained prompts are right, held-out phrasings much less, so phrasing decides."""
    lines = ["## Gate: what the model knows, by template (trained / held-out accuracy)", "",
             "| seed | mixed facts | all right | all wrong | alias links | "
             + " | ".join(f"t{t}" for t in range(len(TEMPLATES))) + " |",
             "|---" * (5 + len(TEMPLATES)) + "|"]
    trained = []
    held_out = []
    for k in results["per_seed_knowledge"]:
        cells = [f"{fmt(v['trained'])} / {fmt(v['held_out'])}" for v in k["by_template"].values()]
        trained += [v["trained"] for v in k["by_template"].values() if v["trained"] is not None]
        held_out += [v["held_out"] for v in k["by_template"].values() if v["held_out"] is not None]
        lines.append(f"| {k['seed']} | {fmt(k['mixed_share'])} | {fmt(k['all_right_share'])} | "
                     f"{fmt(k['all_wrong_share'])} | {fmt(k['link_accuracy'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Templates: " + "; ".join(f"t{t} `{text}`" for t, text in enumerate(TEMPLATES)),
              ""]
    if not held_out:
        return "\n".join(lines + ["Gate: no held-out prompt, so phrasing cannot be tested."])
    passed = min(trained) >= 0.95 and max(held_out) <= min(trained) - 0.1
    lines.append(f"Gate: trained prompts right {fmt(min(trained))} or more (worst template and "
                 f"seed), held-out phrasings {fmt(min(held_out))}-{fmt(max(held_out))}: "
                 + ("passed, the model knows its facts and phrasing decides whether it says them."
                    if passed else "failed (trained < 0.95 or held-out within 0.1 of it)."))
    return "\n".join(lines)


def report_cases(results):
    """The paper's three cases: mean probability of the token at every point, both lenses."""
    paper = results["paper"]
    lines = []
    for name, cases in results["cases"].items():
        lines += [f"## Lens curves, {name.replace('_', ' ')}: mean probability of the token "
                  "(mean of seeds)", "",
                  "| case | lens | n | top-1 early | " + " | ".join(results["points"]) + " |",
                  "|---" * (4 + len(results["points"])) + "|"]
        for case, c in cases.items():
            for lens in ("logit", "tuned"):
                curve = c[f"{lens}_curve"]
                cells = " | ".join(fmt(v, 2) for v in curve) if curve else "-"
                lines.append(f"| {case} | {lens} | {c['n']} | {fmt(c['top1_rate'], 2)} | "
                             f"{cells} |")
        success = cases["success"]["top1_rate"]
        fail = cases["fail"]["top1_rate"]
        lines.append("")
        if success is not None and fail is not None:
            agrees = success > fail + 0.1
            lines += [f"Top-1 at an intermediate point: success {success:.2f} vs fail {fail:.2f} "
                      f"(paper {paper['top1_success']} vs {paper['top1_fail']}): "
                      + ("the lens separates right from wrong answers as the paper reports."
                         if agrees else "no clear separation, unlike the paper."), ""]
    return "\n".join(lines).rstrip()


def report_detectors(results):
    """The detector table: every arm in both settings, mean ± std [worst seed]."""
    n_seeds = len(results["seeds"])
    lines = [f"## Detectors: balanced accuracy, subject-grouped {results['config']['n_folds']}-"
             f"fold, mean ± std [worst] of {n_seeds} seeds", "",
             "| arm | unseen prompts | all prompts (mixed facts) |", "|---|---|---|"]
    for arm, by_setting in results["arms"].items():
        cells = []
        for name in ("unseen_prompts", "all_prompts"):
            s = by_setting.get(name)
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f} [{s['worst']:.3f}]" if s else "-")
        lines.append(f"| {arm} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Headline detector (fixed before the run): {HEADLINE}. Controls: the final-"
              "probability and entropy thresholds, the template alone and with the final "
              "probability, on the same folds. Ceiling: balanced accuracy 1.0; chance 0.5.", ""]
    for name, d in results["detector"].items():
        if d is None:
            lines += [f"{name}: no detector (too few prompts of a class).", ""]
            continue
        runs = d["per_seed"]
        bins = d["within_bin_auroc"]
        cells = d["within_bin_template_auroc"]
        lines += [f"**{name}**: {d['n_samples']:.0f} prompts per seed, "
                  f"{d['n_hallucinations']:.0f} wrong (mean)",
                  f"- curve - best threshold, per seed: "
                  f"{signed([r['curve_minus_best_baseline'] for r in runs])}",
                  f"- template + curve - template + final p, per seed: "
                  f"{signed([r['template_curve_gain'] for r in runs])}",
                  f"- AUROC inside final-p bins: curve {fmt(bins['curve'])}, final p "
                  f"{fmt(bins['final_prob'])}; inside bin x template cells: curve "
                  f"{fmt(cells['curve'])}, final p {fmt(cells['final_prob'])}",
                  f"- confident hallucinations (final p >= 0.5): "
                  f"{fmt(d['confident_hallucination_share'])}", ""]
    return "\n".join(lines).rstrip()


def report_verdicts(results):
    """The verdict lines, each computed from the numbers of the record."""
    lines = ["## Verdicts (computed from the numbers above)", ""]
    unseen = results["detector"]["unseen_prompts"]
    if unseen is None:
        return "\n".join(lines + ["- No detector on unseen prompts: no verdict."])
    runs = unseen["per_seed"]
    worst = min(r["curve"] for r in runs)
    lines.append(f"- Curve detector vs chance (unseen prompts): worst seed {worst:.3f}: "
                 + ("above chance (0.5) clearly (>= 0.55 in every seed)." if worst >= 0.55
                    else "not clearly above chance (< 0.55 in some seed)."))
    margins = [r["curve_minus_best_baseline"] for r in runs]
    n_ahead = sum(m > 0 for m in margins)
    lines.append(f"- Curve detector vs the better of the final-probability and entropy "
                 f"thresholds: ahead in {n_ahead} of {len(runs)} seeds ({signed(margins)}): "
                 + ("the curve beats the final probability (>= +0.02 in every seed)."
                    if min(margins) >= GAIN_MIN else
                    "no clear gain over the final probability (not +0.02 in every seed)."))
    gains = [r["template_curve_gain"] for r in runs]
    n_gain = sum(g >= GAIN_MIN for g in gains)
    lines.append(f"- Template + curve vs template + final probability: {signed(gains)}: "
                 f">= +{GAIN_MIN} in {n_gain} of {len(runs)} seeds.")
    cells = unseen["within_bin_template_auroc"]  # the means over seeds, as in the rule
    bins = unseen["within_bin_auroc"]
    if cells["curve"] is not None and cells["final_prob"] is not None:
        lines.append(f"- AUROC inside final-p bins: curve {fmt(bins['curve'])} vs final p "
                     f"{fmt(bins['final_prob'])}; inside bin x template cells: curve "
                     f"{cells['curve']:.3f} vs final p {cells['final_prob']:.3f}: "
                     + ("the curve ranks better than the final probability there."
                        if cells["curve"] > cells["final_prob"] else
                        "the curve ranks no better than the final probability there."))
    verdict = curve_adds_information(runs)
    lines.append(f"- **curve_adds_information: {str(verdict).lower()}** (rule fixed before the "
                 f"run: template + curve >= template + final p + {GAIN_MIN} in every seed, and "
                 f"the curve's AUROC in bin x template cells >= {CELL_AUROC_MIN} and above the "
                 "final probability's): "
                 + ("the curve holds information beyond phrasing and confidence." if verdict else
                    "in this toy the curve adds nothing beyond phrasing and confidence, a "
                    "comparison the paper, which ran no baseline, did not make."))
    lines.append(f"- Confident hallucinations (final p >= 0.5) on unseen prompts: "
                 f"{fmt(unseen['confident_hallucination_share'])} of the wrong answers.")
    everything = results["detector"]["all_prompts"]
    if everything is not None:
        paper = results["paper"]
        lines.append(f"- All prompts of mixed facts (the paper's setting, trained prompts "
                     f"included): curve detector {everything['curve']:.3f} vs "
                     f"{unseen['curve']:.3f} on unseen prompts (paper "
                     f"{paper['detector_accuracy_logit']}-{paper['detector_accuracy_both']}); "
                     f"final-probability threshold {everything['final_prob']:.3f} there.")
    return "\n".join(lines)


def render_report(results):
    """The markdown record of one run (results.md), from its results.json alone."""
    cfg = results["config"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    header = [f"# hallucination_lens: known-fact hallucinations through the lens curves "
              "([arXiv 2403.20009](https://arxiv.org/abs/2403.20009))", "",
              f"Seeds {seeds} (one knowledge-base split and one model each), {cfg['steps']} "
              f"steps, {cfg['n_layer']} blocks of width {cfg['n_embd']}, "
              f"{results['n_params'] / 1e6:.2f}M parameters; {cfg['n_subjects']} subjects x "
              f"{cfg['n_relations']} relations x {len(TEMPLATES)} templates. Wall "
              f"{results['wall_s']:.0f} s, jobs {results['cpu_s']:.0f} CPU-s.", "",
              "![lens curves by outcome and detector accuracy](hallucination_lens.png)"]
    sections = ["\n".join(header), report_knowledge(results), report_cases(results),
                report_detectors(results), report_verdicts(results)]
    return "\n\n".join(sections) + "\n"


def run(cfg):
    """Every seed as a job on the workers, then the summary, the record and the figure."""
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 150), n_seeds=min(cfg.n_seeds, 2),
                                  n_subjects=min(cfg.n_subjects, 24),
                                  n_relations=min(cfg.n_relations, 2), n_layer=2, n_embd=32,
                                  n_head=2, batch_size=64, n_folds=2, log_every=75)
    device = pick_device(cfg.device)
    start = time.time()
    print(f"config: {dataclasses.asdict(cfg)}")
    facts = user_facts(cfg.data) if cfg.data else None
    seeds = list(range(cfg.seed, cfg.seed + cfg.n_seeds))
    jobs = [SeedJob(cfg, seed, facts, str(device)) for seed in seeds]
    per_seed = run_jobs(run_seed, jobs, cfg.workers, device)
    points = ["emb"]  # the lenses' read points: the embedding, then each sub-layer
    for i in range(cfg.n_layer):
        points += [f"attn{i + 1}", f"mlp{i + 1}"]
    results = {"config": dataclasses.asdict(cfg), "seeds": seeds, "points": points,
               "n_params": per_seed[0]["n_params"], **summarize(per_seed),
               "per_seed_knowledge": [{"seed": s["seed"], **s["knowledge"]} for s in per_seed],
               "paper": PAPER, "wall_s": time.time() - start,
               "cpu_s": sum(s["cpu_s"] for s in per_seed),
               "seed_cpu_s": [s["cpu_s"] for s in per_seed]}
    write_record(cfg.out, "hallucination_lens", results, plot(results))
    print(render_report(results))
    print(f"wrote {cfg.out}/results.json, results.md and hallucination_lens.png")
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
