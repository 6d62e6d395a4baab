"""Fourier Position Embedding — arXiv 2412.17739 (https://arxiv.org/abs/2412.17739), with the Positional Heads
analysis of arXiv 2410.08703 (https://arxiv.org/abs/2410.08703).

RoPE rotates each 2-D slot k of q and k by n·ω_k, so q'_m·k'_n depends only on m − n. FoPE argues that slots whose
period exceeds the training length never see a full cycle (so it clips them to frequency zero), and that linear
layers leak energy between frequencies (so every kept slot becomes a Fourier series over all kept frequencies);
attention then extends periodically beyond L_train. The Positional Heads paper (same group) asks which rotary slots
carry each head's logit at long distance, and ablates the heads whose long-distance logits sit in the high slots.

Key equations (d = head_dim, slot k pairs dims k and k + d/2, n = position):
    RoPE       ω_k = base^(−2k/d),  x' = x ⊙ cos(nω) + rotate_half(x) ⊙ sin(nω),  rotate_half([x1,x2]) = [−x2, x1]
    FoPE  CF   keep the K slots with ω_k ≥ 2π / L_train; the other d/2 − K slots: cos = sin = 1 (official fill)
          FS   S_{h,j}(n) = Σ_k sin(ω_k n) A^sin_{h,k,j},   C_{h,j}(n) = Σ_k cos(ω_k n) A^cos_{h,k,j},  j < d'
               d' = min(K, d/4) (official cap),  A = I + N(0, std²), frozen, one pair per layer,
               std = σ·√(2 / (d'·(K + H)))  (xavier_normal_ with gain σ on the (H, K, d') tensor)
               x' = x ⊙ [C, C] + rotate_half(x) ⊙ [S, S]
    ALiBi      logit_{m,n} += −slope_h·(m − n),  slope_h = 2^(−8h/H)
    Positional heads (this file's operationalisation, named "slot-distance correlation"):
               g_i(m, n) = q̃_m[i] k̃_n[i] + q̃_m[i+d/2] k̃_n[i+d/2],   s̄(m, n) = Σ_i i·|g_i| / Σ_i |g_i|
               score_h = Spearman(m − n, s̄(m, n)) over all causal pairs n < m of held-out passkey sequences;
               the top heads by score are "positional"; ablate them (zero their output) vs as many random other heads.

Run: `python fope.py` (nope, rope, alibi, fope + head analysis; ≤ 240 s CPU at 1 thread); `--ablations --seeds 2`
adds cf_only (A = I) and fs_only (no clipping), two seeds; `--methods rope,fope --steps 300`; `--data my.jsonl`
trains on your text (column "text"; perplexity only); `--smoke` runs the same code path at a tiny size, in seconds.

Result of the default run (`python fope.py`; 2-core CPU shared with other jobs, 1 thread; 175 s CPU, 373 s wall):
    method | ppl@64  @128   @256   @512   @1024 | passkey@64 @128 @256 @512 @1024 | ms/step
    nope   | 22.97  22.76  24.00  24.82  24.71 | 1.00 1.00 1.00 1.00 1.00 | 43.7
    rope   |  3.53   3.53   3.93   5.35   8.56 | 1.00 1.00 0.75 0.69 0.22 | 39.8
    alibi  | 17.17  16.95  17.89  18.61  18.57 | 1.00 0.91 0.47 0.06 0.09 | 37.8
    fope   |  3.43   3.53   4.09   5.64   9.89 | 1.00 1.00 1.00 1.00 1.00 | 38.6
    FoPE/RoPE step time 0.97 (per training step). Passkey claim holds (1.00 vs 0.75 at 256); perplexity claim does not
    (4.09 at 256 vs RoPE 3.93 and vs its own 3.43 at 64). Head analysis: top head ablated vs random, passkey at
    distance ≥ 32: rope 1.00 vs 0.95, fope 0.91 vs 1.00. Two seeds and the ablations: see the README section.

Deviations from the paper (and its official OLMo-based code):
- Toy scale: 2 layers, d_model 64, 2 heads of 32 dims, 1,000 steps at length 64 on order-2 Markov filler with one
  passkey per sequence (paper: OLMo 60M–1.2B on C4 at 512, evaluated to 8192).
- The passkey is in training (loss = filler NLL + answer NLL); a toy model sees no such task otherwise.
- FS-only (no clipping) rotates all d/2 slots (d' = d/2) so that FoPE(σ=0, no clip) is exactly RoPE; the official
  code would cap d' at d/4 with a stride-2 identity. With clipping the official d' = min(K, d/4) is kept (= K = 5 here).
- Noise: the official effective std σ·√(2/(d'(K+H))) = 0.072 at σ = 0.3 (paper's 60M value), d' = K = 5, H = 2;
  `--fope-noise plain` uses std σ as the paper's text reads.
- The Fourier coefficients are always frozen (the official default; its flag to learn them is not offered), and the
  tables are precomputed once per length (official: the einsum in every forward; same values).
- Positional heads: the full text of arXiv 2410.08703 was not available; the score is our operationalisation, and
  the ablation uses held-out passkeys at the training length with the needle at distance ≥ L/2.
- Perplexity counts filler targets whose two previous tokens are filler (the order-2 context) only.
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

METHODS = ("nope", "rope", "alibi", "fope", "cf_only", "fs_only")


@dataclasses.dataclass
class Config:
    """Train a small decoder with each position method at length 64; evaluate perplexity and passkey to 1024."""

    steps: int = 1000  # training steps (per method and seed)
    seed: int = 0  # random seed (seeds seed, seed+1, ... with --seeds)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines file with a column "text" (your corpus; perplexity only); empty: synthetic
    out: str = "runs/fope"  # folder for results.json (and fope.png under --plot)
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 250  # steps between log lines
    methods: str = "nope,rope,alibi,fope"  # comma-separated subset of nope,rope,alibi,fope,cf_only,fs_only
    ablations: bool = False  # also train cf_only (clip, A = I) and fs_only (Fourier series, no clip)
    seeds: int = 1  # number of seeds (the arms report the mean, and per-seed values when > 1)
    train_len: int = 64  # training sequence length L_train
    eval_lens: str = "64,128,256,512,1024"  # evaluation lengths
    eval_seqs: int = 32  # evaluation sequences per length
    batch: int = 16  # sequences per training step
    lr: float = 3e-3  # AdamW peak learning rate (linear warm-up, cosine decay)
    d_model: int = 64  # model width
    n_layers: int = 2  # decoder blocks
    n_heads: int = 2  # attention heads (head_dim = d_model / n_heads = 32)
    rope_base: float = 10000.0  # RoPE base
    fope_sigma: float = 0.3  # FoPE noise scale σ (the xavier gain in the official code; paper 60M: 0.3)
    fope_noise: str = "xavier"  # xavier: std σ·sqrt(2/(d'(K+H))) as the official init; plain: std σ
    vocab_filler: int = 32  # filler vocabulary of the order-2 Markov chain
    successors: int = 4  # successors per order-2 context
    top_heads: int = 1  # heads ablated in the positional-head analysis
    random_draws: int = 3  # random head sets (from the other heads) to compare against
    plot: bool = False  # write fope.png (length vs perplexity / passkey) if matplotlib is installed

    def __post_init__(self):
        bad = [m for m in self.methods.split(",") if m not in METHODS]
        require(not bad, f"--methods {self.methods}: unknown {bad}; choose from {','.join(METHODS)}")
        for name in ("log_every", "seeds", "eval_seqs", "batch", "d_model", "n_layers", "n_heads", "vocab_filler",
                     "successors", "top_heads", "random_draws"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} {getattr(self, name)}: must be positive")
        require(self.train_len >= 8, f"--train-len {self.train_len}: must be at least 8")
        require(self.d_model % (4 * self.n_heads) == 0, f"--d-model {self.d_model}: head_dim must be a multiple of 4")
        require(2 * self.top_heads <= self.n_layers * self.n_heads, f"--top-heads {self.top_heads}: at most half")
        require(self.successors <= self.vocab_filler, "--successors must be at most --vocab-filler")
        require(self.lr > 0 and self.fope_sigma >= 0 and self.rope_base > 1, "--lr, --fope-sigma, --rope-base: range")
        require(self.fope_noise in ("xavier", "plain"), f"--fope-noise {self.fope_noise}: choose xavier or plain")
        require(re.fullmatch(r"\d+(,\d+)*", self.eval_lens) and min(map(int, self.eval_lens.split(","))) >= 8,
                f"--eval-lens {self.eval_lens}: comma-separated lengths ≥ 8")


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

N_VALUES = 16  # passkey values (chance 1/16 = 6.25%)


def special_ids(vocab_filler):
    """Ids: filler 0..V−1, the 16 values V..V+15, KEY, QUERY; returns (first value, KEY, QUERY, vocab size)."""
    return vocab_filler, vocab_filler + N_VALUES, vocab_filler + N_VALUES + 1, vocab_filler + N_VALUES + 2


def markov_table(vocab, successors, gen):
    """Order-2 chain: context (a, b) → `successors` distinct next tokens with Dirichlet(1) probabilities."""
    succ = torch.rand(vocab, vocab, vocab, generator=gen).argsort(-1)[..., :successors]  # (V, V, S)
    p = -torch.rand(vocab, vocab, successors, generator=gen).clamp_min(1e-9).log()  # Exp(1) draws
    return succ, (p / p.sum(-1, keepdim=True)).cumsum(-1)  # (V, V, S) cumulative probabilities


def markov_filler(table, n, length, gen):
    """n filler sequences of `length` from the order-2 chain (a loop over positions, vectorised over n)."""
    succ, cum = table
    x = torch.empty(n, length, dtype=torch.long)
    x[:, :2] = torch.randint(succ.shape[0], (n, 2), generator=gen)
    for t in range(2, length):  # data generation only (done once, before training)
        a, b, u = x[:, t - 2], x[:, t - 1], torch.rand(n, 1, generator=gen)
        x[:, t] = succ[a, b, (u > cum[a, b]).sum(-1).clamp_max(succ.shape[-1] - 1)]  # sampled successor
    return x


def passkey_batch(table, n, length, gen, vocab_filler, key_max=None):
    """n sequences (n, length): filler, `KEY v` inserted at p ∈ [0, key_max] (returned), ending `QUERY v`."""
    first_value, key, query, _ = special_ids(vocab_filler)
    filler = markov_filler(table, n, length - 4, gen)  # (n, L−4)
    key_max = length - 4 if key_max is None else min(key_max, length - 4)
    p = torch.randint(0, key_max + 1, (n,), generator=gen)  # (n,)
    v = torch.randint(0, N_VALUES, (n,), generator=gen) + first_value  # (n,)
    t = torch.arange(length)[None]  # (1, L)
    src = torch.where(t < p[:, None], t, t - 2).clamp(0, length - 5)  # filler index at each position
    x = torch.where(t == p[:, None], key, torch.where(t == p[:, None] + 1, v[:, None], filler.gather(1, src)))  # (n, L)
    x[:, -2], x[:, -1] = query, v
    return x, p


def target_masks(x, vocab_filler):
    """For targets x[:, 1:]: ppl_mask (filler whose two previous tokens are filler) and loss_mask (+ the answer)."""
    filler = x < vocab_filler  # (n, L)
    ppl = filler[:, 2:] & filler[:, 1:-1] & filler[:, :-2]  # (n, L−2): targets t ≥ 2
    ppl = torch.cat([torch.zeros_like(ppl[:, :1]), ppl], 1)  # (n, L−1): target t = 1 has no full context
    return ppl, torch.cat([ppl[:, :-1], torch.ones_like(ppl[:, -1:])], 1)  # loss mask: + the value after QUERY


def build_data(cfg, seed):
    """Training pool and evaluation sets. Synthetic: chain and eval sets fixed, training pool per seed."""
    gen = torch.Generator().manual_seed(seed)
    n_train, lens = cfg.steps * cfg.batch, [int(x) for x in cfg.eval_lens.split(",") if x]
    if cfg.data:
        ds = load_user_data(cfg.data, ["text"])
        # offline byte-level tiktoken encoding (the stock encodings download their files)
        enc = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                special_tokens={})
        ids = torch.tensor([t for row in ds["text"] for t in enc.encode_ordinary(str(row)) + [10]])
        train, held = ids[:int(0.9 * len(ids))], ids[int(0.9 * len(ids)):]
        require(len(train) > cfg.train_len + 1, f"--data {cfg.data}: too little text for length {cfg.train_len}")
        starts = torch.randint(0, len(train) - cfg.train_len, (n_train,), generator=gen)
        x = train[starts[:, None] + torch.arange(cfg.train_len)]  # (steps·batch, L)
        ks = {L: min(cfg.eval_seqs, len(held) // L) for L in lens}  # held-out windows per length (0: skipped)
        evals = {L: (held[:k * L].view(k, L), torch.ones(k, L - 1, dtype=torch.bool), None) for L, k in ks.items() if k}
        return dict(x=x, loss_mask=torch.ones(n_train, cfg.train_len - 1, dtype=torch.bool), evals=evals,
                    vocab=256, passkey=False, table=None)
    table = markov_table(cfg.vocab_filler, cfg.successors, torch.Generator().manual_seed(12345))
    x, _ = passkey_batch(table, n_train, cfg.train_len, gen, cfg.vocab_filler)
    _, loss_mask = target_masks(x, cfg.vocab_filler)
    evals = {L: passkey_batch(table, cfg.eval_seqs, L, torch.Generator().manual_seed(999 + L), cfg.vocab_filler)
             for L in lens}
    evals = {L: (xe, target_masks(xe, cfg.vocab_filler)[0], p) for L, (xe, p) in evals.items()}
    return dict(x=x, loss_mask=loss_mask, evals=evals, vocab=special_ids(cfg.vocab_filler)[3], passkey=True, table=table)


# --- the paper's method ---

def rope_freqs(head_dim, base=10000.0):
    # ω_k = base^(−2k/d), k = 0 … d/2 − 1
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,)


def apply_rotary(x, cos, sin):
    # x' = x ⊙ cos + rotate_half(x) ⊙ sin,  rotate_half([x1, x2]) = [−x2, x1]  (slot k pairs dims k and k + d/2)
    x1, x2 = x.chunk(2, dim=-1)  # (..., d/2) each; x (B, H, T, d), cos/sin (T, d) or (H, T, d)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def kept_frequencies(head_dim, train_len, base=10000.0, clip_floor=True):
    # CF: ω_k < 2π / L_train has a period longer than the training length → set to zero (dropped here)
    freqs = rope_freqs(head_dim, base)  # (d/2,)
    return freqs[freqs >= 2 * math.pi / train_len] if clip_floor else freqs  # (K,)


def step_eye(n_in, n_out):
    # the official identity for K inputs → d' outputs: output i reads input i·⌈K/d'⌉ (plain I when K = d')
    eye, rows = torch.zeros(n_in, n_out), torch.arange(n_out) * math.ceil(n_in / n_out)
    eye[rows[rows < n_in], torch.arange(n_out)[rows < n_in]] = 1.0
    return eye  # (K, d')


class RoPE(nn.Module):
    """Rotary position embedding, half-split layout. forward(x (B, H, T, d), pos (T,) or None = 0..T−1)."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        self.register_buffer("freqs", rope_freqs(head_dim, base), persistent=False)
        self._cache = {}

    def tables(self, pos):
        ang = pos.float()[:, None] * self.freqs[None, :]  # (T, d/2): n·ω_k
        return ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)  # (T, d) each

    def forward(self, x, pos=None):  # x (B, H, T, d); pos (T,), None: 0 … T−1
        key = (x.shape[-2], x.device)
        if pos is None and key not in self._cache:  # frozen tables: computed once per length
            with torch.no_grad():
                self._cache[key] = self.tables(torch.arange(x.shape[-2], device=x.device))
        return apply_rotary(x, *(self.tables(pos) if pos is not None else self._cache[key]))


class FoPE(RoPE):
    """Fourier position embedding: clipped floor frequencies + per-head Fourier series (frozen by default)."""

    def __init__(self, head_dim, n_heads, train_len, sigma=0.3, base=10000.0, clip_floor=True, noise="xavier"):
        super().__init__(head_dim, base)
        freqs = kept_frequencies(head_dim, train_len, base, clip_floor)  # (K,)
        self.half, self.n_kept = head_dim // 2, len(freqs)
        # official cap on the rotating output slots d' = min(K, d/4); without clipping we keep d' = d/2 (Deviations)
        self.n_out = min(self.n_kept, head_dim // 4) if clip_floor else self.half
        # official xavier_normal_(gain σ) on (H, K, d'): fan_in K·d', fan_out H·d' → std = σ·√(2 / (d'(K + H)))
        self.noise_std = sigma * math.sqrt(2.0 / (self.n_out * (self.n_kept + n_heads))) if noise == "xavier" else sigma
        eye, shape = step_eye(self.n_kept, self.n_out), (n_heads, self.n_kept, self.n_out)  # (K, d'), (H, K, d')
        # A^sin, A^cos = I + N(0, std²): separate matrices, per head (and per layer: one module per layer), frozen
        self.sin_coef = nn.Parameter(eye + self.noise_std * torch.randn(shape), requires_grad=False)
        self.cos_coef = nn.Parameter(eye + self.noise_std * torch.randn(shape), requires_grad=False)
        self.freqs = freqs  # the kept frequencies replace RoPE's buffer (K,)

    def tables(self, pos):  # per-head cos/sin tables (H, T, d) for positions pos (T,)
        ang = pos.float()[:, None] * self.freqs[None, :]  # (T, K): n·ω_k
        # S_{h,j}(n) = Σ_k sin(ω_k n) A^sin_{h,k,j},  C_{h,j}(n) = Σ_k cos(ω_k n) A^cos_{h,k,j}
        s = torch.einsum("tk,hkj->htj", ang.sin(), self.sin_coef)  # (H, T, d')
        c = torch.einsum("tk,hkj->htj", ang.cos(), self.cos_coef)  # (H, T, d')
        # zero-frequency slots j ≥ d': cos = sin = 1 (the official fill; constant in n)
        s = F.pad(s, (0, self.half - s.shape[-1]), value=1.0)  # (H, T, d/2)
        c = F.pad(c, (0, self.half - c.shape[-1]), value=1.0)  # (H, T, d/2)
        return torch.cat((c, c), -1), torch.cat((s, s), -1)  # (H, T, d) each: [C, C], [S, S]


def alibi_slopes(n_heads):
    # slope_h = 2^(−8h/H), h = 1 … H (H a power of two; otherwise the ALiBi paper's interleaving)
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = [2.0 ** (-8.0 * (h + 1) / (2 * closest)) for h in range(0, 2 * closest, 2)][: n_heads - closest]
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / closest) for h in range(closest)] + extra)


def alibi_bias(n_heads, T):
    # bias_{h,m,n} = −slope_h·(m − n) for n ≤ m, −inf for n > m (causal mask included)
    m, n = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (-alibi_slopes(n_heads)[:, None, None] * (m - n).float()).masked_fill(n > m, float("-inf"))  # (H, T, T)


def slot_contributions(q_rot, k_rot):
    # g_i = q̃[i] k̃[i] + q̃[i + d/2] k̃[i + d/2]  (broadcasts; Σ_i g_i = q̃ · k̃)
    half = q_rot.shape[-1] // 2
    return q_rot[..., :half] * k_rot[..., :half] + q_rot[..., half:] * k_rot[..., half:]  # (..., d/2)


def average_ranks(x):
    # ranks 0 … n−1, ties get their mean rank
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    start = counts.cumsum(0) - counts
    return (start + (counts - 1) / 2.0).double()[inverse]


def spearman(x, y):
    # ρ = Pearson(rank(x), rank(y))
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


def slot_distance_scores(q_rot, k_rot):
    """Our operationalisation: per head, Spearman(m − n, Σ_i i|g_i| / Σ_i |g_i|) over causal pairs n < m."""
    T = q_rot.shape[-2]
    g = slot_contributions(q_rot[:, :, :, None, :], k_rot[:, :, None, :, :]).abs()  # (B, H, T, T, d/2)
    slots = torch.arange(g.shape[-1], dtype=g.dtype, device=g.device)
    s_bar = (g * slots).sum(-1) / g.sum(-1).clamp_min(1e-12)  # (B, H, T, T) contribution-weighted slot index
    m, n = torch.arange(T, device=g.device)[:, None], torch.arange(T, device=g.device)[None, :]
    pairs = (n < m)  # (T, T)
    dist = (m - n).expand(T, T)[pairs]  # (P,)
    return [spearman(dist.repeat(len(s_bar)).cpu(), s_bar[:, h][:, pairs].reshape(-1).cpu()) for h in range(s_bar.shape[1])]


# --- model ---

class Block(nn.Module):
    def __init__(self, d_model, n_heads, pe):
        super().__init__()
        self.n_heads, self.pe = n_heads, pe
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x, bias, head_mask):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        if self.pe is not None:
            q, k = self.pe(q), self.pe(k)  # position method on q and k in every layer
        self.kept = (q.detach(), k.detach())  # (q_rot, k_rot) of the last forward, for the head analysis
        # causal softmax(q·k/√hd)·v; ALiBi adds its bias (which holds the causal mask) to the logits
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                           is_causal=bias is None)  # (B, H, T, hd)
        y = y * head_mask[None, :, None, None]  # ablated heads contribute nothing
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return x + self.mlp(self.ln2(x))


def make_pe(method, cfg):
    """rope: RoPE; fope: clip + noisy series; cf_only: clip, A = I; fs_only: noisy series, no clip; else None."""
    hd = cfg.d_model // cfg.n_heads
    if method == "rope":
        return RoPE(hd, cfg.rope_base)
    if method in ("fope", "cf_only", "fs_only"):
        return FoPE(hd, cfg.n_heads, cfg.train_len, 0.0 if method == "cf_only" else cfg.fope_sigma, cfg.rope_base,
                    clip_floor=method != "fs_only", noise=cfg.fope_noise)
    return None  # nope and alibi rotate nothing


class Decoder(nn.Module):
    def __init__(self, method, vocab, cfg):
        super().__init__()
        self.method, self.n_heads = method, cfg.n_heads
        self.emb = nn.Embedding(vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, make_pe(method, cfg)) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.register_buffer("head_mask", torch.ones(cfg.n_layers, cfg.n_heads), persistent=False)
        self._bias = {}
        for name, p in self.named_parameters():
            if p.dim() == 2 and "coef" not in name:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx):  # idx (B, T) → logits (B, T, vocab)
        key = (idx.shape[1], idx.device)
        if self.method == "alibi" and key not in self._bias:  # the bias is computed once per length
            self._bias[key] = alibi_bias(self.n_heads, idx.shape[1]).to(idx.device)
        bias, x = self._bias.get(key), self.emb(idx)  # (B, T, C)
        for block, mask in zip(self.blocks, self.head_mask):
            x = block(x, bias, mask)
        return self.ln(x) @ self.emb.weight.T  # tied output embedding


# --- training and evaluation ---

def clock(device):
    """CPU: process time (robust to other processes on the machine); CUDA: synchronised wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def masked_nll(logits, targets, mask):
    # mean over masked targets of −log p(target)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def train_arm(method, cfg, data, device, seed):
    set_seed(seed)
    model = Decoder(method, data["vocab"], cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, cfg.steps // 20)  # linear warm-up over 5% of the steps, then cosine decay to 10%
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    x_all, m_all = data["x"].to(device).split(cfg.batch), data["loss_mask"].to(device).split(cfg.batch)
    busy, start = 0.0, time.time()
    for step, x, mask in zip(range(1, cfg.steps + 1), x_all, m_all):
        t0 = clock(device)
        with autocast(device):
            logits = model(x[:, :-1])  # (B, L−1, vocab)
        # L = mean NLL of filler targets + mean NLL of the passkey answer (the value after QUERY)
        k = -1 if data["passkey"] else None  # user text: every target is a filler target
        filler = masked_nll(logits[:, :k], x[:, 1:k], mask[:, :k])
        answer = masked_nll(logits[:, -1:], x[:, -1:], mask[:, -1:]) if k else torch.zeros(())
        loss = filler + answer
        check_finite(step, loss=loss.item(), filler=filler.item(), answer=answer.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        busy += clock(device) - t0
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_progress(step, cfg.steps, start, method=method, loss=loss.item(), filler=filler.item(),
                         answer=answer.item(), tok_per_s=round(step * x.numel() / busy))
    return model.eval(), busy / cfg.steps, loss.item()


@torch.no_grad()
def evaluate(model, evals, cfg, device, passkey=True):
    """Filler perplexity and passkey accuracy (argmax over the 16 values) per length, and by needle distance."""
    first_value, chunk = special_ids(cfg.vocab_filler)[0], max(1, 8192 // max(evals, default=1))
    out = {"ppl": {}, "passkey": {}, "passkey_by_distance": {}}
    for L, (x_all, ppl_all, p_all) in evals.items():
        nll_sum, count, correct = 0.0, 0, []
        for i in range(0, len(x_all), chunk):
            x, mask = x_all[i:i + chunk].to(device), ppl_all[i:i + chunk].to(device)
            with autocast(device):
                logits = model(x[:, :-1]).float()  # (b, L−1, vocab)
            nll_sum += float(masked_nll(logits, x[:, 1:], mask)) * float(mask.sum())
            count += int(mask.sum())
            if passkey:
                pred = logits[:, -1, first_value:first_value + N_VALUES].argmax(-1) + first_value  # (b,)
                correct.append((pred == x[:, -1]).cpu())
        out["ppl"][str(L)] = round(math.exp(nll_sum / max(count, 1)), 4)
        if passkey:
            correct = torch.cat(correct).float()
            out["passkey"][str(L)] = round(float(correct.mean()), 4)
            dist = L - 2 - p_all  # (n,) QUERY position − KEY position
            edges = [0] + [cfg.train_len * 2 ** i for i in range(12) if cfg.train_len * 2 ** i < L] + [L]
            out["passkey_by_distance"][str(L)] = {
                f"{lo}-{hi - 1}": round(float(correct[(dist >= lo) & (dist < hi)].mean()), 4)
                for lo, hi in zip(edges[:-1], edges[1:]) if ((dist >= lo) & (dist < hi)).any()}
    return out


@torch.no_grad()
def head_analysis(model, cfg, data, device, seed):
    """Positional heads: score every head, ablate the top ones vs random sets on long-distance passkeys."""
    L, first_value = cfg.train_len, special_ids(cfg.vocab_filler)[0]
    x, _ = passkey_batch(data["table"], 2 * cfg.eval_seqs, L, torch.Generator().manual_seed(777), cfg.vocab_filler,
                         key_max=L // 2 - 2)  # needle distance ≥ L/2
    x, ppl_mask = x.to(device), target_masks(x, cfg.vocab_filler)[0].to(device)

    def ablated(heads):  # (passkey accuracy, filler perplexity) with these heads' outputs zeroed
        for layer, h in heads:
            model.head_mask[layer, h] = 0.0
        logits = model(x[:, :-1]).float()
        model.head_mask.fill_(1.0)
        pred = logits[:, -1, first_value:first_value + N_VALUES].argmax(-1) + first_value
        return float((pred == x[:, -1]).float().mean()), math.exp(float(masked_nll(logits, x[:, 1:], ppl_mask)))
    full = ablated([])  # all heads; this pass also leaves each block's rotated q, k in block.kept
    scores = [slot_distance_scores(*b.kept) for b in model.blocks]  # (layers, H)
    ranked = sorted(((s, [layer, h]) for layer, row in enumerate(scores) for h, s in enumerate(row)), reverse=True)
    top = [lh for _, lh in ranked[:cfg.top_heads]]
    others = [[layer, h] for layer, row in enumerate(scores) for h in range(len(row)) if [layer, h] not in top]
    gen = random.Random(seed)  # random sets of as many heads, drawn from the non-top heads
    rand_sets = [gen.sample(others, cfg.top_heads) for _ in range(cfg.random_draws)]
    top_abl, rand_abl = ablated(top), [ablated(s) for s in rand_sets]
    out = {"score": [[round(s, 4) for s in row] for row in scores], "top": top, "random_sets": rand_sets}
    for i, metric in enumerate(("passkey", "ppl")):
        out.update({f"{metric}_full": round(full[i], 4), f"{metric}_top_ablated": round(top_abl[i], 4),
                    f"{metric}_random_ablated": round(float(np.mean([r[i] for r in rand_abl])), 4)})
    return out


def aggregate(per_seed):
    """An arm: the mean over seeds of each metric (std and the per-seed values when there are several seeds)."""
    arm = {m: {L: round(float(np.mean([r[m][L] for r in per_seed])), 4) for L in per_seed[0][m]} for m in ("ppl", "passkey")}
    arm.update(passkey_by_distance=per_seed[0]["passkey_by_distance"],
               step_time_s=round(float(np.mean([r["step_time_s"] for r in per_seed])), 5),
               final_loss=round(float(np.mean([r["final_loss"] for r in per_seed])), 4))
    if len(per_seed) > 1:
        arm.update({m + "_std": {L: round(float(np.std([r[m][L] for r in per_seed])), 4) for L in per_seed[0][m]}
                    for m in ("ppl", "passkey")}, per_seed=per_seed)
    return arm


def plot(arms, path):
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return log("--plot: matplotlib is not installed; no plot")
    plt.switch_backend("Agg")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="tight")
    for ax, metric in zip(axes, ("ppl", "passkey")):
        for name, a in arms.items():
            ax.plot([int(L) for L in a[metric]], list(a[metric].values()), marker="o", label=name)
        ax.set(xscale="log", xlabel="evaluation length (trained at 64)", title=metric)
        ax.legend()
    fig.savefig(path, dpi=100)
    log(f"plot: {path}")


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 6), batch=8, d_model=32, eval_lens="64,128",
                                  eval_seqs=4, random_draws=2, log_every=3)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    log(f"config: {dataclasses.asdict(cfg)}")
    methods = [m for m in cfg.methods.split(",") if m]
    methods += [m for m in ("cf_only", "fs_only") if cfg.ablations and m not in methods]
    f = make_pe("fope", cfg)
    log(f"FoPE: K = {f.n_kept} of {f.half} slots (ω ≥ 2π/{cfg.train_len}), d' = {f.n_out}, noise std {f.noise_std:.4f}")
    t_start = time.process_time()
    per_seed, heads = {m: [] for m in methods}, {}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        data = build_data(cfg, seed)
        for method in methods:
            model, step_time, final_loss = train_arm(method, cfg, data, device, seed)
            res = evaluate(model, data["evals"], cfg, device, data["passkey"])
            per_seed[method].append(dict(res, step_time_s=round(step_time, 5), final_loss=round(final_loss, 4)))
            log(f"seed {seed} {method}: ppl {res['ppl']} passkey {res['passkey']} "
                f"({sum(p.numel() for p in model.parameters() if p.requires_grad)} parameters)")
            if data["passkey"] and method in ("rope", "fope", "cf_only", "fs_only"):
                heads.setdefault(method, {})[str(seed)] = head_analysis(model, cfg, data, device, seed)
    arms = {m: aggregate(r) for m, r in per_seed.items()}
    for name, by_seed in heads.items():
        heads[name] = {"seeds": by_seed, "top_each": [r["top"] for r in by_seed.values()],
                       **{k: round(float(np.mean([r[k] for r in by_seed.values()])), 4) for k in
                          ("passkey_full", "passkey_top_ablated", "passkey_random_ablated")}}
    results = {"config": dataclasses.asdict(cfg), "arms": arms, "heads": heads}  # heads.score: slot-distance corr.
    if "rope" in arms and "fope" in arms:
        results["step_time"] = {"ratio_fope_rope": round(arms["fope"]["step_time_s"] / arms["rope"]["step_time_s"], 4)}
        log(f"FoPE/RoPE step-time ratio {results['step_time']['ratio_fope_rope']} (goal ≤ 1.15; per training step)")
        if data["passkey"] and "256" in arms["fope"]["ppl"]:
            f, r = arms["fope"], arms["rope"]
            results["claim"] = {"fope_ppl256_below_rope": f["ppl"]["256"] < r["ppl"]["256"],
                                "fope_ppl256_within_15pct_of_64": f["ppl"]["256"] <= 1.15 * f["ppl"]["64"],
                                "fope_passkey256_at_least_rope": f["passkey"]["256"] >= r["passkey"]["256"]}
            log(f"claim at 256: {results['claim']}")
    results["cpu_time_s"] = round(time.process_time() - t_start, 1)
    lens = list(next(iter(arms.values()))["ppl"])
    log("\nmethod   | " + " | ".join(" ".join(f"{m}@{L:<5}" for L in lens) for m in ("ppl", "key")) + " | ms/step")
    for name, a in arms.items():
        cells = " | ".join(" ".join(f"{a[m].get(L, math.nan):<9.3f}" for L in lens) for m in ("ppl", "passkey"))
        log(f"{name:<8} | {cells} | {1000 * a['step_time_s']:.1f}")
    for name, h in heads.items():
        log(f"heads[{name}] top {h['top_each']}; passkey at distance ≥ L/2: all heads {h['passkey_full']:.3f}, "
            f"top ablated {h['passkey_top_ablated']:.3f}, random ablated {h['passkey_random_ablated']:.3f}")
    log(f"CPU time {results['cpu_time_s']} s")
    save_json(os.path.join(cfg.out, "results.json"), results)
    if cfg.plot:
        plot(arms, os.path.join(cfg.out, "fope.png"))
    return results


def main(argv=None):
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main()
