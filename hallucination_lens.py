"""On Large Language Models' Hallucination with Regard to Known Facts — arXiv 2403.20009
(https://arxiv.org/abs/2403.20009), NAACL 2024.

A model can know a fact (answer it right through one phrasing) and still get another phrasing of the same
(subject, relation, object) wrong. The logit lens (final norm + unembedding applied to the last position's
residual after every sub-layer) shows *when* the output token appears: in right answers its probability
jumps mid-network and stays on top; in hallucinations it surfaces late. A linear classifier on these curves
detects hallucinations; here it sits beside two baselines the paper never ran (final probability, entropy).

Key equations (symbols as in the code):
    logit lens   p_l = softmax(W_U · LN_f(h_l)),  l = emb, attn1, mlp1, ..., attnL, mlpL  (P = 1 + 2L points)
    tuned lens   (A_l, b_l) = argmin Σ_n ||A_l h_l,n + b_l - h_final,n||²  (least squares);  q_l = p(A_l h_l + b_l)
    output       o = argmax p_final; right iff o == gold.  Cases: success p_l[gold] on right prompts,
                 fail p_l[gold] on wrong prompts, hallucination p_l[o] on wrong prompts
    detector     x = (p_l[o])_l and/or (q_l[o])_l (no gold needed); score = w · standardize(x) + b
                 logreg: mean c_y softplus(-m) + λ/2||w||²;  svm: mean c_y max(0, 1 - m)² + λ/2||w||²;
                 m = (2y - 1) score, c_y = N / (2 N_y); metric: balanced accuracy

Run:
    python hallucination_lens.py                 # the whole comparison at the defaults (≤ 5 min on 2 CPU cores)
    python hallucination_lens.py --smoke         # the same code path at a tiny size, in seconds
    python hallucination_lens.py --plot          # also draws the mean curves (needs matplotlib)

Result of the default run (2-core CPU, 1 thread: 112 s CPU, ~6.5 min wall while 8 sessions shared the cores):
    facts mixed at the end of training (right through some templates, wrong through others): 52.7%; every
    trained pair right (1.0); held-out pairs: distractor template 0.70, alias templates 0.35 / 0.36
    logit lens, mean p of the token  emb   attn1 mlp1  attn2 mlp2  attn3 mlp3  attn4 mlp4
      success (gold, n 1576)         0.03  0.15  0.19  0.41  0.47  0.70  0.81  0.93  0.97
      fail (gold, n 952)             0.03  0.11  0.13  0.11  0.11  0.10  0.09  0.07  0.05
      hallucination (output, n 952)  0.03  0.16  0.21  0.33  0.37  0.47  0.55  0.64  0.75
    top-1 at an intermediate point: success 0.98, fail 0.27, hallucination 0.83
    detector, balanced accuracy, random / subject-grouped split (mean of 5 splits, 2528 prompts):
      logreg on curves: logit 0.790 / 0.806, tuned 0.817 / 0.800, both 0.794 / 0.791
      svm on curves:    logit 0.781 / 0.797, tuned 0.807 / 0.786, both 0.786 / 0.793
      final-prob threshold 0.841 / 0.842, final-entropy threshold 0.839 / 0.841: the curve adds nothing here

Deviations from the paper (and its official code):
- A synthetic knowledge base (300 subjects x 4 relations, Zipf object prior) and a 4-layer d-64 decoder trained
  from scratch replace COUNTERFACT and Llama2-7B-chat. Phrasing matters through held-out (fact, template)
  pairs: template 0 is always trained, templates 1-3 each with probability template_train. Templates 2-3 name
  the subject by an alias; "alias is also known as name" is trained for every subject, yet the model does not
  compose alias → name → object. Template 1 puts a distractor subject nearer the answer slot.
- Curves after the embedding and after every attention and MLP sub-layer (the paper: after each layer).
  "Top-1 at some layer" counts intermediate points only (the last point is the output itself).
- Detector data: all prompts of mixed facts, right (0) vs wrong (1), class-weighted instead of subsampled;
  the paper: success vs hallucination samples, a linear SVM, one 80/20 random split. Logistic regression,
  the subject-grouped split, the two baselines and re-setting the decision threshold to the best training
  balanced accuracy (as the baselines do) are additions. The SVM uses the squared hinge.
- The tuned lens is an affine map fitted in closed form (tiny ridge) to the final residual, not trained with
  SGD on a KL loss as in Belrose et al.
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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken
import datasets

# --- config ---


@dataclasses.dataclass
class Config:
    """Train a small decoder on a synthetic knowledge base, read its known-fact hallucinations with the logit and tuned lens, and detect them from the curves."""

    steps: int = 1000  # training steps
    seed: int = 0  # random seed
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines facts with columns subject, relation, object (one word each); empty: synthetic KB
    out: str = "runs/hallucination_lens"  # folder for results.json
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 200  # steps between log lines
    n_subjects: int = 300  # subjects in the synthetic knowledge base
    n_relations: int = 4  # relations in the synthetic knowledge base
    n_objects: int = 16  # objects per relation
    zipf: float = 1.0  # object prior p(k) ∝ (k+1)^-zipf: the model's "default guess" per relation
    template_train: float = 0.5  # probability that a (fact, template) pair is trained, templates 1-3 (0: always)
    n_layers: int = 4  # decoder layers
    d_model: int = 64  # residual width
    n_heads: int = 4  # attention heads
    batch_size: int = 128  # prompts per step
    lr: float = 3e-3  # AdamW learning rate (linear warm-up over steps / 20, then cosine decay)
    weight_decay: float = 0.01  # AdamW weight decay
    test_frac: float = 0.2  # share of samples (random) or subjects (grouped) held out for the detector
    n_splits: int = 5  # random re-splits the detector's accuracy is averaged over
    plot: bool = False  # draw the mean curves to <out>/curves.png (needs matplotlib)

    def __post_init__(self):
        require(self.log_every > 0, f"--log-every {self.log_every}: must be positive")
        for name in ("n_subjects", "n_relations", "n_objects", "n_layers", "d_model", "n_heads", "batch_size", "n_splits"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} {getattr(self, name)}: must be positive")
        require(self.d_model % self.n_heads == 0, f"--d-model {self.d_model} must be divisible by --n-heads")
        require(self.zipf >= 0, f"--zipf {self.zipf}: must be >= 0")
        require(0 <= self.template_train <= 1, f"--template-train {self.template_train}: must be in [0, 1]")
        require(self.lr > 0 and self.weight_decay >= 0, "--lr must be positive and --weight-decay >= 0")
        require(0 < self.test_frac < 1, f"--test-frac {self.test_frac}: must be in (0, 1)")


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

RELATION_WORDS = ["capital", "language", "sport", "color", "religion", "genre", "team", "instrument"]
# Four templates per relation. {s}: the subject's name, {a}: its alias, {r}: the relation word,
# {d}: another subject (a distractor). Canonical names near / far-with-distractor, alias near / far.
TEMPLATES = ["{s} {r} :", "{s} , friend of {d} , has {r}", "{a} {r} :", "the {r} of {a} , they say , is"]
LINK_TEMPLATE = "{a} is also known as"  # trained for every subject: the alias → name link


def make_kb(n_subjects, n_relations, n_objects, zipf, rng):
    """Synthetic triplets: object k of relation r drawn with p(k) ∝ (k+1)^-zipf. Returns a list of dicts."""
    rel_words = RELATION_WORDS[:n_relations] + [f"rel{j}" for j in range(len(RELATION_WORDS), n_relations)]
    prior = np.arange(1, n_objects + 1, dtype=np.float64) ** -zipf
    prior /= prior.sum()
    return [{"subject": f"s{i}", "relation": r, "object": f"{r}{rng.choice(n_objects, p=prior)}"}
            for i in range(n_subjects) for r in rel_words]


def build_prompts(facts, template_train, rng):
    """Every fact through every template, plus one alias link per subject. Template 0 and the links are
    always trained; each (fact, template 1-3) pair is trained with probability template_train, else held out.
    Returns dicts: text, answer, fact (index; -1 for links), template (index; -1), subject, train (bool)."""
    subjects = sorted({f["subject"] for f in facts}, key=lambda s: (len(s), s))
    prompts = []
    for i, f in enumerate(facts):
        s = f["subject"]
        others = [x for x in subjects if x != s] or [s]
        d = others[rng.integers(len(others))]
        for t, tpl in enumerate(TEMPLATES):
            train = t == 0 or rng.random() < template_train
            text = "<bos> " + tpl.format(s=s, a="aka_" + s, r=f["relation"], d=d)
            prompts.append(dict(text=text, answer=f["object"], fact=i, template=t, subject=s, train=train))
    return prompts + [dict(text="<bos> " + LINK_TEMPLATE.format(a="aka_" + s), answer=s, fact=-1, template=-1,
                           subject=s, train=True) for s in subjects]


def tokenize(prompts):
    """Closed-word tiktoken encoding, then compact ids; prompts left-padded to one length with <pad>.
    Returns tokens (N, T) long, answers (N,) long, and the id → word list."""
    words = {w for p in prompts for w in p["text"].split()[1:] + [p["answer"]]}
    enc = word_encoding(sorted(words), ["<bos>", "<pad>"])
    seqs = [enc.encode(p["text"], allowed_special="all") for p in prompts]
    answers = [enc.encode(" " + p["answer"]) for p in prompts]
    assert all(len(a) == 1 for a in answers), "every answer must be one token"
    pad = enc.encode("<pad>", allowed_special="all")[0]
    used = sorted({t for s in seqs for t in s} | {a[0] for a in answers} | {pad})
    compact = {t: i for i, t in enumerate(used)}
    width = max(len(s) for s in seqs)
    tokens = torch.tensor([[compact[pad]] * (width - len(s)) + [compact[t] for t in s] for s in seqs])
    answers = torch.tensor([compact[a[0]] for a in answers])
    vocab = [enc.decode([t]) for t in used]
    return tokens, answers, vocab


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


# --- model ---


class Block(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        """Returns the residual after the attention sub-layer and after the MLP sub-layer, each (B, T, d)."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)  # (B, T, d)
        x_attn = x + self.proj(y)
        return x_attn, x_attn + self.mlp(self.ln2(x_attn))


class TinyLM(nn.Module):
    """Pre-LN decoder with learned positions; reads the next token at the last position only."""

    def __init__(self, vocab_size, block_size, d, n_layers, n_heads):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, d), nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab_size, bias=False)

    def hiddens(self, tokens):
        """Residual at the last position after the embedding and after each sub-layer: (B, 1 + 2L, d)."""
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))  # (B, T, d)
        points = [x[:, -1]]
        for block in self.blocks:
            x_attn, x = block(x)
            points += [x_attn[:, -1], x[:, -1]]
        return torch.stack(points, 1)  # (B, P, d)

    def readout(self, h):
        """Final norm then unembedding: logits W_U · LN_f(h) for any (..., d)."""
        return self.head(self.ln_f(h))

    def forward(self, tokens):
        return self.readout(self.hiddens(tokens)[:, -1])  # (B, V) next-token logits at the last position


# --- the paper's method ---


def logit_lens(model, tokens):
    """p_l = softmax(W_U · LN_f(h_l)) at the last position for every point l: (P, V), or (B, P, V) for a batch."""
    single = tokens.dim() == 1
    h = model.hiddens(tokens[None] if single else tokens)  # (B, P, d)
    probs = model.readout(h).float().softmax(-1)  # (B, P, V)
    return probs[0] if single else probs


def fit_tuned_lens(hiddens, final_hidden, ridge=1e-4):
    """Least squares per point: W_l = argmin ||[h_l, 1] W_l - h_final||² + ridge N ||W_l||².
    hiddens (N, P, d), final_hidden (N, d) → W (P, d + 1, d); apply with apply_tuned_lens."""
    N, P, d = hiddens.shape
    X = torch.cat([hiddens, hiddens.new_ones(N, P, 1)], -1).transpose(0, 1).double()  # (P, N, d+1)
    Y = final_hidden.double()  # (N, d)
    gram = X.transpose(1, 2) @ X + ridge * N * torch.eye(d + 1, dtype=X.dtype, device=X.device)  # (P, d+1, d+1)
    return torch.linalg.solve(gram, X.transpose(1, 2) @ Y).to(hiddens.dtype)  # (P, d+1, d)


def apply_tuned_lens(W, hiddens):
    """A_l h_l + b_l for every point: hiddens (N, P, d), W (P, d+1, d) → (N, P, d)."""
    return torch.einsum("npd,pde->npe", hiddens, W[:, :-1]) + W[:, -1]


def balanced_accuracy(pred, y):
    """(TPR + TNR) / 2 for boolean predictions and 0/1 labels."""
    pred, y = pred.bool(), y.bool()
    return float(((pred & y).sum() / y.sum().clamp(min=1) + (~pred & ~y).sum() / (~y).sum().clamp(min=1)) / 2)


def train_linear_classifier(X, y, kind="logreg", l2=1e-3, iters=50):
    """A linear classifier on standardized features z = (x - mu) / sd, predicting 1 when z · w + b > 0.

    X (N, F), y (N,) in {0, 1}; margin m = s (z · w + b), s = 2y - 1; class weights c_y = N / (2 N_y).
      logreg: L = mean c_y softplus(-m)  + λ/2 ||w||²
      svm:    L = mean c_y max(0, 1 - m)² + λ/2 ||w||²   (squared hinge, as in sklearn's LinearSVC default)
    Both are convex; Newton's method on θ = (w, b) solves them in a few steps. The bias is then re-set to the
    training threshold of best balanced accuracy, the rule the 1-D baselines use.
    Returns a function X → boolean predictions (its .w, .b, .mu, .sd hold the fit).
    """
    require(kind in ("logreg", "svm"), f"classifier kind {kind}: choose logreg or svm")
    X, y = X.double(), y.double()
    N, n_feat = X.shape
    mu, sd = X.mean(0), X.std(0).clamp(min=1e-6)
    A = torch.cat([(X - mu) / sd, X.new_ones(N, 1)], 1)  # (N, F+1): features and a bias column
    s = 2 * y - 1  # (N,)
    c = torch.where(y > 0, N / (2 * y.sum().clamp(min=1)), N / (2 * (1 - y).sum().clamp(min=1)))  # (N,)
    reg = torch.cat([torch.full((n_feat,), l2, dtype=X.dtype), torch.zeros(1, dtype=X.dtype)])  # no penalty on b
    theta = X.new_zeros(n_feat + 1)
    for _ in range(iters):
        m = s * (A @ theta)  # (N,)
        if kind == "logreg":
            # ∇L = -mean c s σ(-m) a + λ w ;  ∇²L = mean c σ(m) σ(-m) a aᵀ + λ I
            grad = -(A.T @ (c * s * torch.sigmoid(-m))) / N + reg * theta
            curv = c * torch.sigmoid(m) * torch.sigmoid(-m)
        else:
            # ∇L = -2 mean c s (1 - m)₊ a + λ w ;  ∇²L = 2 mean c [m < 1] a aᵀ + λ I (generalized Hessian)
            grad = -2 * (A.T @ (c * s * (1 - m).clamp(min=0))) / N + reg * theta
            curv = 2 * c * (m < 1)
        hess = (A.T * curv) @ A / N + torch.diag(reg + 1e-9)  # (F+1, F+1)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if step.abs().max() < 1e-9:
            break
    t, sign = best_threshold(A[:, :-1] @ theta[:-1], y)
    w, b = (sign * theta[:-1]).float(), float(-sign * t)

    def predict(Xn):
        return ((Xn.float() - mu.float()) / sd.float()) @ w + b > 0

    predict.w, predict.b, predict.mu, predict.sd = w, b, mu, sd
    return predict


def best_threshold(x, y):
    """The 1-D rule sign · (x - t) > 0 that maximizes balanced accuracy on (x, y); t runs over the midpoints
    between sorted values (and one point beyond each end). Returns (t, sign)."""
    xs = x.float().sort().values
    cand = torch.cat([xs[:1] - 1, (xs[1:] + xs[:-1]) / 2, xs[-1:] + 1])  # (N+1,)
    above = x[None, :] > cand[:, None]  # (N+1, N): the rule "x > t → 1" for every candidate t
    yb = y.bool()[None]
    bal = ((above & yb).sum(1) / y.sum().clamp(min=1) + (~above & ~yb).sum(1) / (1 - y).sum().clamp(min=1)) / 2
    i_up, i_down = int(bal.argmax()), int(bal.argmin())  # the rule "x <= t → 1" scores 1 - bal
    return (cand[i_up], 1.0) if bal[i_up] >= 1 - bal[i_down] else (cand[i_down], -1.0)


def group_split(groups, test_frac, gen):
    """Boolean test mask that puts every group (subject) entirely on one side."""
    uniq = sorted(set(groups))
    test_groups = {uniq[i] for i in torch.randperm(len(uniq), generator=gen)[: max(1, round(test_frac * len(uniq)))]}
    return torch.tensor([g in test_groups for g in groups])


def random_split(n, test_frac, gen):
    return torch.zeros(n, dtype=torch.bool).index_fill_(0, torch.randperm(n, generator=gen)[: max(1, round(test_frac * n))], True)


# --- training and evaluation ---


def train(model, tokens, answers, train_idx, cfg, device, on_log):
    """AdamW on cross-entropy of the answer token only (the next token after the prompt)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    start, seen = time.time(), 0
    for step in range(1, cfg.steps + 1):
        idx = train_idx[torch.randint(len(train_idx), (cfg.batch_size,), generator=gen)]
        x, y = tokens[idx].to(device), answers[idx].to(device)  # (B, T), (B,)
        with autocast(device):
            logits = model(x)  # (B, V) at the last position
        # L = -mean log p(answer | prompt): the answer token is the only supervised position
        loss = F.cross_entropy(logits.float(), y)
        check_finite(step, loss=loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen += x.numel()
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = on_log(step)
            log_progress(step, cfg.steps, start, loss=loss.item(), **metrics,
                         tok_per_s=seen / max(time.time() - start, 1e-9))
    return time.time() - start


@torch.no_grad()
def all_hiddens(model, tokens, device, batch=2048):
    """Last-position residuals at every point for every prompt: (N, P, d) on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(tokens), batch):
        with autocast(device):
            out.append(model.hiddens(tokens[i:i + batch].to(device)).float().cpu())
    model.train()
    return torch.cat(out)


@torch.no_grad()
def read_curves(model, H, answers, device, out_token=None, batch=2048):
    """Lens readouts of hiddens H (N, P, d): the output token o = argmax at the last point, p_l[o], p_l[gold],
    entropy per point, and whether gold / o is the top-1 token at each point. All (N, P) except out (N,)."""
    keys = ("out", "p_out", "p_gold", "entropy", "top1_gold", "top1_out")
    res = {k: [] for k in keys}
    for i in range(0, len(H), batch):
        probs = model.readout(H[i:i + batch].to(device)).float().softmax(-1)  # (b, P, V)
        o = probs[:, -1].argmax(-1) if out_token is None else out_token[i:i + batch].to(device)  # (b,)
        g, top = answers[i:i + batch].to(device), probs.argmax(-1)  # (b,), (b, P)
        pick = lambda t: probs.gather(2, t[:, None, None].expand(-1, probs.shape[1], 1))[..., 0]  # (b, P)
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)  # H_l = -Σ_v p_l[v] log p_l[v]
        for k, v in zip(keys, (o, pick(o), pick(g), entropy, top == g[:, None], top == o[:, None])):
            res[k].append(v)
    return {k: torch.cat(v).cpu() for k, v in res.items()}


def fact_table(fact_id, template, correct, n_facts):
    """(n_facts, n_templates) booleans of right answers, from the prompts that have a fact (fact_id >= 0)."""
    table, m = torch.zeros(n_facts, len(TEMPLATES), dtype=torch.bool), fact_id >= 0
    table[fact_id[m], template[m]] = correct[m]
    return table


def knowledge_stats(table):
    known, all_right = table.any(1), table.all(1)
    return {"mixed_share": float((known & ~all_right).float().mean()), "all_right_share": float(all_right.float().mean()),
            "all_wrong_share": float((~known).float().mean())}


def detector_table(feats, y, groups, cfg):
    """Balanced accuracy of the curve classifiers and the two 1-D baselines, random and grouped splits."""
    acc = {f"curve_{sp}": {name: {"logreg": [], "svm": []} for name in feats if name not in ("final_prob", "final_entropy")}
           for sp in ("random", "grouped")}
    base = {"final_prob_baseline": {"random": [], "grouped": []}, "entropy_baseline": {"random": [], "grouped": []}}
    for split in range(cfg.n_splits):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + split)
        masks = {"random": random_split(len(y), cfg.test_frac, gen), "grouped": group_split(groups, cfg.test_frac, gen)}
        for sp, test in masks.items():
            tr = ~test
            for name, X in feats.items():
                if name in ("final_prob", "final_entropy"):
                    t, sign = best_threshold(X[tr], y[tr])
                    key = "final_prob_baseline" if name == "final_prob" else "entropy_baseline"
                    base[key][sp].append(balanced_accuracy(sign * (X[test] - t) > 0, y[test]))
                    continue
                for kind in ("logreg", "svm"):
                    clf = train_linear_classifier(X[tr], y[tr], kind)
                    acc[f"curve_{sp}"][name][kind].append(balanced_accuracy(clf(X[test]), y[test]))
    mean = lambda v: round(float(np.mean(v)), 4)
    table = {k: {n: {kd: mean(v) for kd, v in d.items()} for n, d in t.items()} for k, t in acc.items()}
    table.update({k: {sp: mean(v) for sp, v in d.items()} for k, d in base.items()})
    return table


def plot_curves(arms, points, path):
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return log("--plot: matplotlib is not installed; skipping the plot")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, key, title in zip(axes, ("mean_curve", "tuned_mean_curve"), ("logit lens", "tuned lens")):
        for case, arm in arms.items():
            ax.plot(range(len(points)), arm[key], marker="o", label=case)
        ax.set(xticks=range(len(points)), xticklabels=points, title=title, ylabel="probability of the token")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot: {path}")


def case_curves(H, lens, tuned, answers, correct, in_mixed, unembed):
    """The paper's three cases on the prompts of mixed facts: success = p_l[gold] on right prompts, fail =
    p_l[gold] on wrong prompts, hallucination = p_l[o] on wrong prompts. Mean curves (logit and tuned lens),
    the share whose token is top-1 at some intermediate point, and what each sub-layer writes along W_U[token]."""
    arms, top1 = {}, {}
    for case, mask, gold in (("success", in_mixed & correct, True), ("fail", in_mixed & ~correct, True),
                             ("hallucination", in_mixed & ~correct, False)):
        key, tok = ("p_gold", answers[mask]) if gold else ("p_out", lens["out"][mask])
        push = torch.einsum("npd,nd->np", H[mask, 1:] - H[mask, :-1], unembed[tok])  # (n, P-1): Δh_l · W_U[token]
        mean = lambda x: [round(float(v), 4) for v in x.mean(0)] if mask.any() else [None] * x.shape[1]
        arms[case] = {"n": int(mask.sum()), "mean_curve": mean(lens[key][mask]),
                      "tuned_mean_curve": mean(tuned[key][mask]), "sublayer_push": mean(push)}
        hit = lens["top1_gold" if gold else "top1_out"][mask][:, :-1].any(1)  # intermediate points only
        top1[case] = round(float(hit.float().mean()), 4) if mask.any() else None
    return arms, top1


def report(res):
    k, cl, arms = res["knowledge"], res["classifier"], res["arms"]
    log(f"\nfacts: {k['mixed_share']:.1%} mixed (right through some templates, wrong through others), "
        f"{k['all_right_share']:.1%} right through all, {k['all_wrong_share']:.1%} wrong through all")
    for tpl, v in k["by_template"].items():
        log(f"  {tpl:<34} accuracy: trained pairs {v['acc_trained']}, held-out pairs {v['acc_heldout']}")
    log(f"\nmean probability curves on mixed facts (logit lens | tuned lens), n = "
        + ", ".join(f"{c} {a['n']}" for c, a in arms.items()))
    log(f"{'point':<7}" + "".join(f"{c:>14}" for c in arms) + " |" + "".join(f"{c:>14}" for c in arms))
    fmt = lambda v: f"{v:>14.3f}" if v is not None else f"{'-':>14}"
    for i, name in enumerate(res["points"]):
        log(f"{name:<7}" + "".join(fmt(a["mean_curve"][i]) for a in arms.values()) + " |"
            + "".join(fmt(a["tuned_mean_curve"][i]) for a in arms.values()))
    log("top-1 at some intermediate point: " + ", ".join(f"{c} {v}" for c, v in res["top1_rates"].items()))
    if "skipped" in cl:
        return log(f"\ndetector: {cl['skipped']}")
    log(f"\ndetector: balanced accuracy, mean of {res['config']['n_splits']} splits ({cl['n_samples']} prompts, "
        f"{cl['n_hallucination']} hallucinated)\n{'features':<22}{'random':>10}{'grouped':>10}")
    for name in ("logit", "tuned", "both"):
        for kind in ("logreg", "svm"):
            log(f"{name + ' curve, ' + kind:<22}{cl['curve_random'][name][kind]:>10.3f}"
                f"{cl['curve_grouped'][name][kind]:>10.3f}")
    for key, label in (("final_prob_baseline", "final prob threshold"), ("entropy_baseline", "final entropy thr.")):
        log(f"{label:<22}{cl[key]['random']:>10.3f}{cl[key]['grouped']:>10.3f}")


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 30), n_subjects=min(cfg.n_subjects, 24),
                                  n_relations=min(cfg.n_relations, 2), n_layers=2, d_model=32, n_heads=2,
                                  batch_size=64, n_splits=1, log_every=15)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    t0, c0 = time.time(), time.process_time()
    log(f"config: {dataclasses.asdict(cfg)}")
    rng = np.random.default_rng(cfg.seed)
    if cfg.data:
        rows = load_user_data(cfg.data, ["subject", "relation", "object"])
        facts = [{k: str(r[k]).strip().replace(" ", "_") for k in ("subject", "relation", "object")} for r in rows]
    else:
        facts = make_kb(cfg.n_subjects, cfg.n_relations, cfg.n_objects, cfg.zipf, rng)
    prompts = build_prompts(facts, cfg.template_train, rng)
    tokens, answers, vocab = tokenize(prompts)
    fact_id, template, is_train = (torch.tensor([p[k] for p in prompts]) for k in ("fact", "template", "train"))
    is_fact = fact_id >= 0
    log(f"knowledge base: {len(facts)} facts, {len(prompts)} prompts ({int(is_train.sum())} trained), "
        f"vocab {len(vocab)}, prompt length {tokens.shape[1]}")
    model = TinyLM(len(vocab), tokens.shape[1], cfg.d_model, cfg.n_layers, cfg.n_heads).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.n_layers} layers, d {cfg.d_model}, {n_params / 1e6:.2f}M parameters")
    history = []

    def on_log(step):  # the share of mixed facts along training, to show where it settles
        right = read_curves(model, all_hiddens(model, tokens, device)[:, -1:], answers, device)["out"] == answers
        stats = knowledge_stats(fact_table(fact_id, template, right, len(facts)))
        history.append({"step": step, **{k: round(v, 4) for k, v in stats.items()},
                        "acc_train": round(float(right[is_train & is_fact].float().mean()), 4)})
        return {"mixed": stats["mixed_share"], "acc_train": history[-1]["acc_train"]}

    train_time = train(model, tokens, answers, is_train.nonzero()[:, 0], cfg, device, on_log)

    # the lenses at the end of training; the tuned lens is fitted on the trained prompts
    H = all_hiddens(model, tokens, device)  # (N, P, d)
    lens = read_curves(model, H, answers, device)
    W = fit_tuned_lens(H[is_train & is_fact], H[is_train & is_fact, -1])
    tuned = read_curves(model, apply_tuned_lens(W, H), answers, device, out_token=lens["out"])
    correct = lens["out"] == answers
    table = fact_table(fact_id, template, correct, len(facts))
    in_mixed = is_fact & (table.any(1) & ~table.all(1))[fact_id.clamp(min=0)]
    arms, top1 = case_curves(H, lens, tuned, answers, correct, in_mixed, model.head.weight.detach().float().cpu())

    # the detector, on features that need no gold answer: the output token's curves, final prob, final entropy
    y = (~correct[in_mixed]).long()  # 1: hallucination
    feats = {"logit": lens["p_out"][in_mixed], "tuned": tuned["p_out"][in_mixed],
             "final_prob": lens["p_out"][in_mixed, -1], "final_entropy": lens["entropy"][in_mixed, -1]}
    feats["both"] = torch.cat([feats["logit"], feats["tuned"][:, :-1]], 1)  # the tuned last point is the logit one
    groups = [p["subject"] for p, m in zip(prompts, in_mixed.tolist()) if m]
    if min(int(y.sum()), int((1 - y).sum())) >= 4 and len(set(groups)) >= 2:
        classifier = detector_table(feats, y, groups, cfg)
        best = max(v for d in classifier["curve_grouped"].values() for v in d.values())
        classifier["curve_gain_over_final_prob_grouped"] = round(best - classifier["final_prob_baseline"]["grouped"], 4)
    else:
        classifier = {"skipped": "fewer than 4 samples of a class among the mixed facts"}
    classifier.update(n_samples=int(len(y)), n_hallucination=int(y.sum()))

    acc = lambda m: round(float(correct[m].float().mean()), 4) if m.any() else None
    knowledge = {**{k: round(v, 4) for k, v in knowledge_stats(table).items()}, "n_facts": len(facts),
                 "by_template": {tpl: {"acc_trained": acc(is_fact & (template == t) & is_train),
                                       "acc_heldout": acc(is_fact & (template == t) & ~is_train)}
                                 for t, tpl in enumerate(TEMPLATES)},
                 "link_accuracy": acc(~is_fact), "during_training": history}
    points = ["emb"] + [f"{k}{i + 1}" for i in range(cfg.n_layers) for k in ("attn", "mlp")]
    results = {"config": dataclasses.asdict(cfg), "points": points, "arms": arms, "top1_rates": top1,
               "knowledge": knowledge, "classifier": classifier, "n_params": n_params,
               "train_time_s": round(train_time, 2), "total_time_s": round(time.time() - t0, 2),
               "cpu_time_s": round(time.process_time() - c0, 2)}
    report(results)
    save_json(os.path.join(cfg.out, "results.json"), results)
    if cfg.plot:
        plot_curves(arms, points, os.path.join(cfg.out, "curves.png"))
    log(f"wrote {os.path.join(cfg.out, 'results.json')} ({time.process_time() - c0:.0f}s CPU)")
    return results


def main(argv=None):
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main()
