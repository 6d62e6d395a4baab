"""FlowRL: Matching Reward Distributions for LLM Reasoning — arXiv 2509.15207
(https://arxiv.org/abs/2509.15207)

Reward maximisers (PPO, GRPO) push all probability onto the few answers they find first. FlowRL
fits the policy to a reward-shaped target, π(y|x) ∝ π_ref(y|x) · exp(β·|y|·r̂(x, y)), with a
trajectory-balance loss and a learned partition function log Z_φ(x): answers of equal reward keep
π_ref's ratios, so the policy should keep many correct answers instead of one. The baselines
(GRPO, PPO) are the reward maximisers of the RL-for-reasoning survey (arXiv 2509.08827).

The question of this version: on-policy, FlowRL's expected gradient IS a policy gradient on r̂
with a reverse KL to π_ref of weight 1/(β|y|) (derivation in `kl_pg_loss`). So is the diversity the
flow (learned log Z, squared residual, off-policy weight) or just a strong KL? The control `kl_pg`
is that KL-regularised policy gradient, everything else equal; the frontiers sweep β and both KL
weights.

Key equations (symbols as in the code; y has |y| = 4 tokens; sums over response tokens t):
    r̂       = (r − mean_G r) / (std_G r + 1e-6)                                   group_normalize
    δ        = log_z + (1/|y|) Σ_t logp_t − β·r̂ − (1/|y|) Σ_t ref_logp_t               flowrl_loss
    w        = clip(exp(Σ_t [logp_t − old_logp_t]), 1 − ε, 1 + ε).detach()           (ε = 0.2)
    L_FlowRL = mean_i w_i · δ_i²
    kl_pg:  A = r̂ − (1/(β|y|))·Σ_t (logp_t − ref_logp_t) − b,  b = group mean of A under π_old;
            L = −mean_i w_i · A_i.detach() · (1/|y|) Σ_t logp_t                     kl_pg_loss
    GRPO:   ρ_t = exp(logp_t − old_logp_t); ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1±ε)) + c·k3_t, token
            mean; k3 = e^u − u − 1, u = ref_logp − logp clamped to ±20, k3 clamped to ±10 (verl's
            low_var_kl)                                                                grpo_loss
    PPO:    A = GAE(γ = 1, λ) of the final reward with a value head, whitened; the same surrogate
            + ½·max((V − R)², (V_old + clip(V − V_old, ±0.5) − R)²)                     ppo_loss
The task (DigitSum): prompt "ss=" with s in 10, 12, ..., 24; answer exactly 4 digits; reward 1 if
they sum to s (282 to 670 valid answers of 10,000; π_ref hits 5%). The policy factorises, so one
batched forward over the 1,000 three-digit prefixes gives π exactly: accuracy (π-mass on valid
answers), effective answers (exp of the entropy of π on the valid set) and KL(p* ‖ π) are exact;
p* = π_ref renormalised on the valid answers (the β → ∞ limit of FlowRL's target, the same for every
arm: the CEILING, accuracy 1 and KL 0). Distinct valid answers and pass@1 come from 512 samples.

Run:
    python flowrl.py                     # 5 arms × 3 seeds, 3 frontiers, the tiered task (one seed)
    python flowrl.py --beta 15           # the paper's β (kl_pg follows: weight 1/(15·4))
    python flowrl.py --task tiered       # all arms on the tiered task (first digit even 1, odd 0.5)
    python flowrl.py --kl-unclamped      # GRPO with the plain k3 (a labelled variant, not verl's)
    python flowrl.py --smoke             # the same code path at a tiny size, in seconds

Re-run at the end (one thread, other jobs running): 172 s CPU (user + sys), the same numbers.
Result of the default run (measured on a 2-core CPU shared with 7 other sessions, one thread: 192 s
CPU time in total, 635 s wall under that load, so about 3–4 min wall on a quiet machine (not
measured quiet); 25 trainings of ≈ 7 s CPU each; 3 seeds, 400 steps × 8 prompts × G 16 per arm;
exact metrics, mean over the 8 prompts; mean ± std over seeds [worst seed]):
    arm               accuracy               distinct valid     effective answers  KL(p*‖π)
    flowrl (β = 2)    0.955 ± 0.035 [0.916]  20.0 ± 13 [12.2]   7.6 ± 3.0 [5.4]    11.8 ± 2.2 [13.4]
    kl_pg (KL 0.125)  0.985 ± 0.018 [0.965]  13.3 ± 6.9 [8.4]   5.9 ± 1.2 [4.8]    15.7 ± 3.9 [18.1]
    grpo_kl (KL 0.1)  0.998 ± 0.001 [0.997]   3.6 ± 0.5 [3.2]   2.0 ± 0.3 [1.8]    23.4 ± 2.1 [25.0]
    grpo (KL 0.001)   0.791 ± 0.14  [0.625]   1.5 ± 0.7 [0.8]   1.7 ± 0.3 [1.4]    36.6 ± 4.5 [41.8]
    ppo               0.916 ± 0.072 [0.874]   2.0 ± 0.3 [1.6]   1.4 ± 0.3 [1.1]    41.7 ± 3.3 [44.3]
    target p* (ceil.) 1                       319               516                0
    initial π_ref     0.052                   25                516                3.0
    (distinct valid of 512 samples per prompt; p* keeps 319 of them. grpo's and ppo's seeds at 0.87
    ≈ 7/8 are consistent with one prompt of eight collapsing onto an invalid answer.)
Frontier (seed 0; coef = β for flowrl, the KL weight 1/(β|y|) it implies in brackets):
    flowrl β 1 [0.25]   0.138 acc   62.8 distinct  KL 2.08   kl_pg 0.25   0.251 acc   97.6  KL 1.91
    flowrl β 1.25 [0.2] 0.213       93.4           1.84      kl_pg 0.2    0.577      106.6     3.07
    flowrl β 2 [0.125]  0.965       13.1          12.75      kl_pg 0.125  0.994       10.4    18.12
    flowrl β 5 [0.05]   0.998        3.9          27.08      kl_pg 0.05   0.999        2.1    27.94
    grpo KL 0.001: 0.874 / 1.9 / 34.1;  0.1: 0.998 / 3.4 / 21.0;  0.2: 0.963 / 18.2 / 8.7;
             0.25: 0.152 / 68.6 / 2.11 (accuracy / distinct / KL(p*‖π))
What it shows, plainly: it is the KL, not the flow. At matched KL weight FlowRL and kl_pg land in
the same place or kl_pg is ahead: at the weak-reward end (β = 1, 1.25) kl_pg has both more accuracy
and more distinct answers (0.58 / 107 vs 0.21 / 93 at weight 0.2), at β = 2 and 5 the two are within
the seed spread (five-arm table: 0.955 / 20 ± 13 vs 0.985 / 13 ± 7). GRPO with verl's clamped KL
lies on the same curve once its coefficient is comparable (KL 0.2: 0.963 / 18.2, next to FlowRL
β = 2's 0.965 / 13.1); the old "GRPO keeps 3" compared FlowRL's per-sequence 0.25 with GRPO's 0.1.
All three frontiers are a sharp switch: strong KL stays near π_ref (accuracy ≤ 0.6), weaker KL
reaches 0.87–1.0 with 1–35 distinct answers of p*'s 319; no arm at this budget gets high accuracy
AND broad coverage (v1 reported FlowRL β = 1 at 0.97 / 168 after 700 steps × 16 prompts of a 3.5×
larger model; here, at 400 steps, it has not left π_ref). A guess, not tested here: the learned
log Z is a noisier baseline than kl_pg's exact group mean, so FlowRL learns slower at the same
weight. (Frontiers: one seed.)
CONTROL: kl_pg. CEILING: p*. GATE: without a KL (grpo, KL 0.001) the toy collapses to 1–2 answers,
so it does test diversity.
Tiered task (seed 0, the arms at β = 2): P(r = 0.5)/P(r = 1) is 5e-6 (flowrl) and 3e-6 (kl_pg)
against 0.96 for p* and 0.48 for a reward-proportional target. This is what FlowRL's own target
predicts: with r̂ the half-reward answers are down-weighted by exp(−β|y|·Δr̂) ≤ e^−8 per group, so
neither method "matches the reward distribution" in the proportional sense; accuracy 0.994 / 0.995.

Deviations from the paper (and its official code, Xuekai-Zhu/FlowRL; verl recipe/flowrl):
- Scale: a 36k-parameter byte-level GRU (one layer, hidden 64) instead of a 7B transformer, and a
  4-digit answer instead of a chain of thought. The output layer covers the 10 digits only, so every
  answer has |y| = 4 and all 10,000 answers can be enumerated for exact evaluation.
- Budget: 400 steps × 8 prompts × G = 16 per arm, chosen so that 25 trainings fit in 240 s of CPU
  (v1 ran 700 steps × 16 prompts with hidden 128, 55 s per arm). At this budget FlowRL at β = 1
  does not leave π_ref's neighbourhood (frontier below), so the five-arm table uses β = 2, the
  smallest frontier β whose FlowRL arm learns within the budget; kl_pg's weight follows from it.
  Neither β is the paper's 15 (`--beta 15`), which is tuned for long answers.
- Importance weight: the paper's clip(w, 1 − ε, 1 + ε), ε = 0.2, by default; `--official-clamp` is
  the official code's later clamp(w, max = 10). Each rollout batch is split into 2 minibatches, so
  the second optimizer step is off-policy and the weight acts (as verl's ppo_mini_batch_size).
- log Z head: the official 3-layer MLP (Linear → GELU → LayerNorm → Dropout 0.1, twice, then Linear)
  on the mean hidden state over ALL prompt positions (the official code drops the last prompt
  token), input not detached, the same Adam and learning rate (`--z-lr-mult 1`, as official).
- Optimiser: Adam, lr 3e-3, gradient norm clipped at 1.0, no schedule, the same for every arm.
- GRPO: verl's clamped low_var_kl as a loss term, token-mean; verl's dual-clip (clip_ratio_c = 3) is
  left out (it would fire on about 1 in 10⁴ tokens here). `--kl-unclamped` is the plain k3 (v1's
  grpo_kl, mislabelled there as verl's).
- PPO: the value head shares the GRU trunk (verl trains a separate critic), value-loss weight 0.5,
  no KL in the reward (verl's default use_kl_in_reward = False); γ = 1, λ = 1.
- kl_pg is not in the paper: it is the control the paper never ran (see the question above).
- Evaluation: pass@1 and distinct valid answers from 512 samples per prompt drawn from the exact
  distribution (the same law as autoregressive sampling); the rest are exact sums over all answers.
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

ALGOS = ("flowrl", "grpo", "grpo_kl", "ppo", "kl_pg")


@dataclasses.dataclass
class Config:
    """FlowRL vs GRPO, GRPO+KL, PPO and the KL-regularised policy gradient kl_pg on DigitSum."""

    steps: int = 400  # training steps per arm (one rollout batch of prompts × group each)
    seed: int = 0  # first random seed (the arms run on seed, seed + 1, ...)
    seeds: int = 3  # how many seeds for the five arms (the frontier and tiered runs use the first)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines, column 'target' (int 0..36, one prompt a row); empty: 10, 12..24
    out: str = "runs/flowrl"  # folder for results.json and flowrl.png
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 100  # steps between log lines
    arms: str = "flowrl,grpo,grpo_kl,ppo,kl_pg"  # comma-separated arms to train over the seeds
    task: str = "digitsum"  # digitsum (reward 1 if the digits sum to s) or tiered (0.5 / 1.0)
    betas: str = "1,1.25,2,5"  # the FlowRL frontier: β values (empty: no frontier runs)
    kl_coefs: str = "0.001,0.1,0.2,0.25"  # the GRPO frontier: KL coefficients
    kl_weights: str = "0.25,0.2,0.125,0.05"  # the kl_pg frontier: KL weights (1/(β|y|) of betas)
    tiered_arms: str = "flowrl,kl_pg"  # arms trained once on the tiered task (empty: none)
    group: int = 16  # G: samples per prompt per step
    lr: float = 3e-3  # Adam learning rate, every arm
    beta: float = 2.0  # FlowRL β (paper: 15; see Deviations); kl_pg's weight is 1/(β|y|)
    clip_eps: float = 0.2  # ε of FlowRL's clipped weight and of the clipped surrogates
    official_clamp: bool = False  # FlowRL weight clamp(w, max=10) (official code), not clip(w, 1±ε)
    z_lr_mult: float = 1.0  # learning-rate multiplier of the log Z head (official: 1)
    kl_coef: float = 0.001  # KL coefficient of the 'grpo' arm (verl's default)
    kl_coef_strong: float = 0.1  # KL coefficient of the 'grpo_kl' arm
    kl_unclamped: bool = False  # GRPO's KL as plain unclamped k3 (a labelled variant; verl clamps)
    lam: float = 1.0  # PPO's GAE λ (γ = 1); verl's default 1.0
    minibatches: int = 2  # optimizer steps per rollout batch (later ones are off-policy)
    d_model: int = 32  # token embedding width
    hidden: int = 64  # GRU hidden size
    eval_samples: int = 512  # samples per prompt for pass@1 and the distinct-valid count

    def __post_init__(self):
        require(self.log_every > 0, f"--log-every {self.log_every}: must be positive")
        require(self.seeds > 0, f"--seeds {self.seeds}: must be positive")
        bad = [a for a in self.arms.split(",") if a not in ALGOS]
        require(self.arms and not bad, f"--arms {self.arms}: unknown {bad}; choose from {ALGOS}")
        tiered = [a for a in self.tiered_arms.split(",") if a]
        bad = [a for a in tiered if a not in ALGOS]
        require(not bad, f"--tiered-arms {self.tiered_arms}: unknown {bad}; choose from {ALGOS}")
        require(self.task in ("digitsum", "tiered"), f"--task {self.task}: digitsum or tiered")
        for flag in ("betas", "kl_coefs", "kl_weights"):
            text = getattr(self, flag)
            ok = all(re.fullmatch(r"\d+(\.\d*)?(e-?\d+)?", v) for v in text.split(",") if v)
            require(ok, f"--{flag.replace('_', '-')} {text}: comma-separated numbers >= 0")
        require(self.group >= 2, f"--group {self.group}: need at least 2 samples per prompt")
        require(self.lr > 0 and self.z_lr_mult > 0, "--lr and --z-lr-mult must be positive")
        require(self.beta > 0, f"--beta {self.beta}: must be > 0")
        require(0 < self.clip_eps < 1, f"--clip-eps {self.clip_eps}: must be in (0, 1)")
        require(self.kl_coef >= 0 and self.kl_coef_strong >= 0, "--kl-coef values must be >= 0")
        require(0 <= self.lam <= 1, f"--lam {self.lam}: must be in [0, 1]")
        require(self.minibatches > 0, f"--minibatches {self.minibatches}: must be positive")
        require(self.d_model > 0 and self.hidden > 0, "--d-model and --hidden must be positive")
        require(self.eval_samples > 0, f"--eval-samples {self.eval_samples}: must be positive")


# --- data ---

# byte-level offline tiktoken encoding; an answer digit d is the byte token ord("0") + d
ENC = tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]",
                        mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
DIGIT0 = ord("0")
N_DIGITS = 4  # every answer is exactly 4 digits: |y| = 4
# answer a = 1000 d1 + 100 d2 + 10 d3 + d4, as its digits
ALL_ANSWERS = torch.stack([torch.arange(10_000) // 10 ** (3 - i) % 10 for i in range(4)], 1)


def load_targets(path, smoke):
    """The prompts: targets s (default 10, 12, ..., 24); a JSON-lines file: one 'target' a row."""
    if not path:
        return [10, 14, 18, 22] if smoke else list(range(10, 26, 2))
    rows = load_user_data(path, ["target"])
    targets = list(rows["target"])
    for s in targets:
        ok = isinstance(s, int) and 0 <= s <= 36
        require(ok, f"--data {path}: target {s!r} is not an int in 0..36")
    return targets


def encode_prompts(targets):
    """"ss=" with s in two digits → (P, 3) token ids."""
    return torch.tensor([ENC.encode(f"{s:02d}=") for s in targets])


def reward_fn(answers, targets, task):
    """answers (N, 4) digits, targets (N,) → reward (N,).

    digitsum: 1 if the digits sum to s, else 0. tiered: a valid answer pays 1.0 if its first digit
    is even and 0.5 if it is odd.
    """
    valid = (answers.sum(-1) == targets).float()  # (N,)
    if task == "tiered":
        return valid * torch.where(answers[:, 0] % 2 == 0, 1.0, 0.5)  # (N,)
    return valid


def n_valid(s):
    """N(s): how many 4-digit answers sum to s (a count over all 10,000)."""
    return int((ALL_ANSWERS.sum(-1) == s).sum())


# --- model ---


class LogZHead(nn.Module):
    """The official proj_z: (Linear → GELU → LayerNorm → Dropout 0.1) × 2, then a Linear to 1."""

    def __init__(self, d, n_layers=3, dropout=0.1):
        super().__init__()
        layers = []
        for _ in range(n_layers - 1):
            layers += [nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers, nn.Linear(d, 1))

    def forward(self, h):
        return self.net(h).squeeze(-1)  # (N, d) → (N,)


class Policy(nn.Module):
    """A byte-level GRU language model; heads: 10 digit logits, a value (PPO), log Z (FlowRL)."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.rnn = nn.GRU(d, hidden, batch_first=True)
        # logits over the digit tokens "0".."9" only: every answer is 4 digits by construction
        self.head = nn.Linear(hidden, 10)
        self.value = nn.Linear(hidden, 1)
        self.log_z = LogZHead(hidden)
        nn.init.normal_(self.head.weight, std=0.01)  # small output weights: π_ref near uniform
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, state=None):
        return self.rnn(self.tok(idx), state)  # (N, T, H) hidden states and the state (1, N, H)


class Scores(NamedTuple):
    logp: torch.Tensor  # (N, 4): log π(y_t | x, y_<t) of the given answer
    values: torch.Tensor  # (N, 4): V before each answer token
    log_z: torch.Tensor  # (N,): log Z_φ(x)
    logp_all: torch.Tensor  # (N, 4, 10): the full log-softmax at each answer position


def score(model, prompts, answers):
    """Teacher-forced pass over prompt + answer[:-1]: per-token log π, values, log Z."""
    n_prompt = prompts.shape[1]
    x = torch.cat([prompts, DIGIT0 + answers[:, :-1]], dim=1)  # (N, P + 3)
    h, _ = model(x)  # (N, P + 3, H)
    h_ans = h[:, n_prompt - 1:]  # (N, 4, H): the state before each answer token
    logp_all = F.log_softmax(model.head(h_ans).float(), dim=-1)  # (N, 4, 10)
    logp = logp_all.gather(-1, answers[..., None]).squeeze(-1)  # (N, 4)
    values = model.value(h_ans).squeeze(-1).float()  # (N, 4)
    log_z = model.log_z(h[:, :n_prompt].mean(dim=1)).float()  # (N,): on the mean prompt state
    return Scores(logp, values, log_z, logp_all)


class Sampled(NamedTuple):
    answers: torch.Tensor  # (N, 4): the sampled digits
    logp: torch.Tensor  # (N, 4): their log-probabilities under the sampling policy
    values: torch.Tensor  # (N, 4): V before each answer token


@torch.no_grad()
def sample(model, prompts):
    """Sample 4 digits autoregressively (the GRU state is the cache), with their log π and V."""
    h, state = model(prompts)  # (N, P, H)
    h = h[:, -1]  # (N, H)
    tokens = []
    logps = []
    values = []
    for t in range(N_DIGITS):
        logp_all = F.log_softmax(model.head(h).float(), dim=-1)  # (N, 10)
        digit = torch.multinomial(logp_all.exp(), 1)  # (N, 1)
        tokens.append(digit)
        logps.append(logp_all.gather(-1, digit))  # (N, 1)
        values.append(model.value(h).float())  # (N, 1)
        if t < N_DIGITS - 1:
            h, state = model(DIGIT0 + digit, state)  # one new token: (N, 1, H)
            h = h[:, -1]  # (N, H)
    return Sampled(torch.cat(tokens, 1), torch.cat(logps, 1), torch.cat(values, 1))


# --- the paper's method ---


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


def flowrl_loss(logp, old_logp, ref_logp, mask, log_z, reward, beta=15.0, clip_eps=0.2,
                w_max=None):
    """FlowRL (arXiv 2509.15207, Eq. 7): importance-weighted trajectory balance, 1/|y| normalised.

    logp, old_logp, ref_logp, mask: (N, T) over response tokens; log_z: (N,) = log Z_φ(x);
    reward: (N,) = r̂, the group-normalised reward. w_max=None: the paper's clip(w, 1 − ε, 1 + ε);
    w_max=10: the official code's later clamp(w, max=10).
    """
    if logp.dim() != 2 or log_z.shape != logp.shape[:1] or reward.shape != logp.shape[:1]:
        raise ValueError(f"flowrl_loss: logp (N, T), log_z (N,) and reward (N,) expected, got "
                         f"{tuple(logp.shape)}, {tuple(log_z.shape)} and {tuple(reward.shape)}")
    if not logp.shape == old_logp.shape == ref_logp.shape == mask.shape:
        raise ValueError("flowrl_loss: logp, old_logp, ref_logp, mask must have one shape (N, T)")
    n_tokens = mask.sum(dim=1).clamp(min=1)  # (N,): |y|
    # (1/|y|) Σ_t log π_θ(y_t | x, y_<t) and (1/|y|) Σ_t log π_ref(y_t | x, y_<t): without the 1/|y|
    # the paper's ablation trains unstably (long answers have huge log-probabilities)
    avg_logp = (logp * mask).sum(dim=1) / n_tokens  # (N,)
    avg_ref_logp = (ref_logp * mask).sum(dim=1) / n_tokens  # (N,)
    # δ = log Z_φ(x) + (1/|y|) log π_θ(y|x) − β r̂(x, y) − (1/|y|) log π_ref(y|x): zero for every y
    # exactly when π_θ(y|x) ∝ π_ref(y|x) exp(β |y| r̂) (trajectory balance with the target)
    delta = log_z + avg_logp - beta * reward - avg_ref_logp  # (N,)
    # w = clip(Π_t π_θ / π_old, 1 − ε, 1 + ε), detached: the token SUM of log-ratios is the
    # trajectory ratio that corrects for y having been sampled by π_old, not π_θ
    log_w = ((logp - old_logp) * mask).sum(dim=1).detach()  # (N,)
    w_raw = log_w.exp()  # (N,)
    if w_max is None:
        w = w_raw.clamp(1 - clip_eps, 1 + clip_eps)  # (N,)
    else:
        w = w_raw.clamp(max=w_max)  # (N,)
    # L = mean_i w_i δ_i²
    loss = (w * delta.pow(2)).mean()
    w_clip_frac = (w != w_raw).float().mean()
    stats = {"delta2": delta.detach().pow(2).mean(), "log_z": log_z.detach().mean(),
             "w_clip_frac": w_clip_frac}
    return loss, stats


def kl_pg_loss(logp, old_logp, ref_logp, mask, reward, baseline, kl_weight=0.25, clip_eps=0.2,
               w_max=None):
    """The control for FlowRL: a policy gradient on r̂ − kl_weight · log(π_θ(y|x) / π_ref(y|x)).

    logp, old_logp, ref_logp, mask: (N, T); reward: (N,) = r̂; baseline: (N,), one value a prompt.
    The sequence log-ratio log π_θ(y)/π_ref(y) is an exact one-sample estimate of the sequence-level
    KL(π_θ ‖ π_ref), since E_{y~π_θ} of it is that KL. Everything else is FlowRL's: the same 1/|y|
    normalisation and the same clipped, detached trajectory weight w.
    Why this is FlowRL's on-policy twin (w = 1): ∇δ² = 2δ ∇δ with ∇δ = (1/|y|) ∇log π_θ(y), and
    E_π[c ∇log π_θ] = 0 for any c that does not depend on y (log Z is only a baseline), while
    E_π[log(π_θ/π_ref) ∇log π_θ] = ∇KL(π_θ ‖ π_ref). So
        E[∇ δ²] = (2/|y|) ∇[−β E r̂ + KL(π_θ ‖ π_ref) / |y|] = −(2β/|y|) ∇[E r̂ − KL / (β|y|)],
    and this loss has E[∇] = −(1/|y|) ∇[E r̂ − kl_weight · KL]: the same direction when
    kl_weight = 1/(β|y|) (Adam does not see the factor 2β).
    """
    if logp.dim() != 2 or reward.shape != logp.shape[:1] or baseline.shape != logp.shape[:1]:
        raise ValueError(f"kl_pg_loss: logp (N, T), reward (N,) and baseline (N,) expected, got "
                         f"{tuple(logp.shape)}, {tuple(reward.shape)} and {tuple(baseline.shape)}")
    if not logp.shape == old_logp.shape == ref_logp.shape == mask.shape:
        raise ValueError("kl_pg_loss: logp, old_logp, ref_logp and mask must have one shape (N, T)")
    n_tokens = mask.sum(dim=1).clamp(min=1)  # (N,): |y|
    avg_logp = (logp * mask).sum(dim=1) / n_tokens  # (N,): (1/|y|) log π_θ(y|x)
    # the exact sequence-level reverse-KL sample log π_θ(y|x) − log π_ref(y|x), a reward term
    log_ratio_ref = ((logp - ref_logp) * mask).sum(dim=1).detach()  # (N,)
    # A = r̂ − kl_weight · log(π_θ/π_ref) − b: the KL-shaped reward minus the group's baseline
    adv = reward - kl_weight * log_ratio_ref - baseline  # (N,)
    # the same trajectory weight as FlowRL: clip(Π_t π_θ / π_old, 1 − ε, 1 + ε), detached
    log_w = ((logp - old_logp) * mask).sum(dim=1).detach()  # (N,)
    w_raw = log_w.exp()  # (N,)
    if w_max is None:
        w = w_raw.clamp(1 - clip_eps, 1 + clip_eps)  # (N,)
    else:
        w = w_raw.clamp(max=w_max)  # (N,)
    # L = −mean_i w_i A_i (1/|y|) log π_θ(y_i|x): REINFORCE on the shaped reward
    loss = -(w * adv * avg_logp).mean()
    stats = {"pg_loss": loss.detach(), "kl": log_ratio_ref.mean()}
    return loss, stats


def kl_pg_baseline(reward, old_logp, ref_logp, mask, kl_weight, group):
    """b = mean over the G samples of a prompt of r̂ − kl_weight · log(π_old(y)/π_ref(y)).

    reward: (N,) with N = B·G, grouped by prompt; old_logp, ref_logp, mask: (N, T) → b: (N,).
    """
    if reward.dim() != 1 or old_logp.shape != (reward.shape[0], mask.shape[1]):
        raise ValueError(f"kl_pg_baseline: reward (N,) and old_logp (N, T) expected, got "
                         f"{tuple(reward.shape)} and {tuple(old_logp.shape)}")
    log_ratio_ref = ((old_logp - ref_logp) * mask).sum(dim=1)  # (N,)
    shaped = (reward - kl_weight * log_ratio_ref).view(-1, group)  # (B, G)
    return shaped.mean(dim=1, keepdim=True).expand_as(shaped).reshape(-1)  # (N,)


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, vectorised over time with a discount matrix.

    rewards, values, mask: (N, T), right-padded; V after the last token is 0.
    Returns (advantages, returns), each (N, T).
    """
    n_steps = rewards.shape[1]
    v = values * mask  # (N, T)
    # V(s_{t+1}), 0 past the end
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # (N, T)
    # δ_t = r_t + γ V(s_{t+1}) − V(s_t)
    deltas = (rewards + gamma * next_v - v) * mask  # (N, T)
    # A_t = Σ_{k ≥ t} (γλ)^{k−t} δ_k, as A = δ Dᵀ with D[t, k] = (γλ)^{k−t} for k ≥ t, else 0
    k = torch.arange(n_steps, device=rewards.device)
    power = (k[None, :] - k[:, None]).clamp(min=0).to(rewards.dtype)  # (T, T)
    upper = k[None, :] >= k[:, None]  # (T, T)
    discount = torch.where(upper, (gamma * lam) ** power, torch.zeros_like(power))  # (T, T)
    adv = (deltas @ discount.T) * mask  # (N, T)
    returns = (adv + v) * mask  # (N, T)
    return adv, returns


def whiten(x, mask):
    """(x − mean) / (std + 1e-8) over the masked entries of the batch (PPO's whitening)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = ((x - mean).pow(2) * mask).sum() / (n - 1).clamp(min=1)
    return (x - mean) / (var.sqrt() + 1e-8) * mask


def ppo_loss(logp, old_logp, mask, adv, values, old_values, returns, clip_eps=0.2, value_clip=0.5,
             vf_coef=0.5):
    """PPO (as verl): token-mean clipped surrogate on per-token advantages + clipped value loss.

    All arguments (N, T); adv already whitened.
    """
    if not logp.shape == old_logp.shape == mask.shape == adv.shape == values.shape:
        raise ValueError("ppo_loss: logp, old_logp, mask, adv, values must have one shape (N, T)")
    n_tokens = mask.sum().clamp(min=1)
    # ρ_t = exp(log π_θ − log π_old);  ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))
    ratio = torch.exp(logp - old_logp)  # (N, T)
    pg_loss1 = -adv * ratio  # (N, T)
    pg_loss2 = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)  # (N, T)
    pg = torch.maximum(pg_loss1, pg_loss2)  # (N, T)
    pg_loss = (pg * mask).sum() / n_tokens
    # ℓ_V = ½ max((V − R)², (V_old + clip(V − V_old, ±c) − R)²): the value moves at most c per batch
    v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)  # (N, T)
    vf = 0.5 * torch.maximum((values - returns).pow(2), (v_clipped - returns).pow(2))  # (N, T)
    vf_loss = (vf * mask).sum() / n_tokens
    loss = pg_loss + vf_coef * vf_loss
    return loss, {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach()}


# --- training ---


class Arm(NamedTuple):
    name: str  # label in the tables
    algo: str  # flowrl, grpo, grpo_kl, ppo or kl_pg
    coef: float  # β (flowrl), KL coefficient (grpo, grpo_kl), KL weight (kl_pg); ppo: unused
    task: str  # digitsum or tiered


class Rollout(NamedTuple):
    prompts: torch.Tensor  # (N, 3): the prompt of each sample, each prompt G times in a row
    answers: torch.Tensor  # (N, 4): sampled digits
    mask: torch.Tensor  # (N, 4): response tokens (all ones: every answer has 4 digits)
    old_logp: torch.Tensor  # (N, 4): log π_old, the policy that sampled the answers
    old_values: torch.Tensor  # (N, 4): V_old (PPO)
    ref_logp: torch.Tensor  # (N, 4): log π_ref, the frozen initial model
    reward: torch.Tensor  # (N,): r
    r_hat: torch.Tensor  # (N,): r̂, r normalised within each group of G


def collect_rollout(model, ref, prompts, targets, task, group):
    """Sample one answer per row of prompts (N = B·G), score it under π_old and π_ref, reward it."""
    old = sample(model, prompts)  # answers, log π_old and V_old, each (N, 4)
    with torch.no_grad():
        ref_logp = score(ref, prompts, old.answers).logp  # (N, 4)
    reward = reward_fn(old.answers, targets, task)  # (N,)
    r_hat = group_normalize(reward.view(-1, group)).view(-1)  # (N,)
    mask = torch.ones_like(old.logp)  # (N, 4)
    return Rollout(prompts, old.answers, mask, old.logp, old.values, ref_logp, reward, r_hat)


def ppo_advantages(reward, values, mask, lam):
    """PPO's advantages: the outcome reward on each answer's last token, GAE (γ = 1), whitened.

    reward: (N,); values, mask: (N, T) → (advantages, returns), each (N, T).
    """
    last = mask.sum(dim=1).long() - 1  # (N,): index of the last response token
    token_rewards = torch.zeros_like(values).scatter(1, last[:, None], reward[:, None])  # (N, T)
    adv, returns = gae(token_rewards, values, mask, 1.0, lam)
    return whiten(adv, mask), returns


def update(model, opt, rollout, arm, minibatches, cfg, step):
    """One rollout batch, one optimizer step per minibatch of indices; returns each step's stats."""
    mask = rollout.mask
    w_max = 10.0 if cfg.official_clamp else None
    if arm.algo == "ppo":
        adv, returns = ppo_advantages(rollout.reward, rollout.old_values, mask, cfg.lam)
    if arm.algo == "kl_pg":
        baseline = kl_pg_baseline(rollout.r_hat, rollout.old_logp, rollout.ref_logp, mask,
                                  arm.coef, cfg.group)
    history = []
    for idx in minibatches:
        # fresh log-probs of the current policy: earlier minibatches have already moved it, while
        # old_logp stays the sampling policy's (that gap is what the clip and the weight act on)
        with autocast(rollout.answers.device):
            now = score(model, rollout.prompts[idx], rollout.answers[idx])
        old_logp = rollout.old_logp[idx]  # (n, 4)
        ref_logp = rollout.ref_logp[idx]  # (n, 4)
        m = mask[idx]  # (n, 4)
        if arm.algo == "flowrl":
            loss, stats = flowrl_loss(now.logp, old_logp, ref_logp, m, now.log_z,
                                      rollout.r_hat[idx], beta=arm.coef, clip_eps=cfg.clip_eps,
                                      w_max=w_max)
        elif arm.algo == "kl_pg":
            loss, stats = kl_pg_loss(now.logp, old_logp, ref_logp, m, rollout.r_hat[idx],
                                     baseline[idx], kl_weight=arm.coef, clip_eps=cfg.clip_eps,
                                     w_max=w_max)
        elif arm.algo == "ppo":
            loss, stats = ppo_loss(now.logp, old_logp, m, adv[idx], now.values,
                                   rollout.old_values[idx], returns[idx], clip_eps=cfg.clip_eps)
        else:
            loss, stats = grpo_loss(now.logp, old_logp, ref_logp, m, rollout.r_hat[idx],
                                    clip_eps=cfg.clip_eps, kl_coef=arm.coef,
                                    kl_clamp=not cfg.kl_unclamped)
        check_finite(step, loss=loss.detach(), **stats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # |log π_θ(y)/π_old(y)|: 0 on the first minibatch, > 0 once the policy has moved
        drift = ((now.logp.detach() - old_logp) * m).sum(dim=1).abs().mean()
        history.append({"loss": loss.item(), "drift": drift.item(),
                        **{k: float(v) for k, v in stats.items()}})
    return history


def make_optimizer(model, lr, z_lr_mult):
    """Adam; the log Z head gets its own learning rate (lr × z_lr_mult)."""
    z_params = list(model.log_z.parameters())
    z_ids = {id(p) for p in z_params}
    rest = [p for p in model.parameters() if id(p) not in z_ids]
    groups = [{"params": rest}, {"params": z_params, "lr": lr * z_lr_mult}]
    return torch.optim.Adam(groups, lr=lr)


def train_arm(arm, cfg, init_state, ref, ref_logpi, targets, seed, device):
    """Train one arm from the shared initial weights (steps × P × G rollouts); exact metrics."""
    set_seed(seed + 1)  # every arm of a seed draws from the same random stream
    model = Policy(cfg.d_model, cfg.hidden).to(device)
    model.load_state_dict(init_state)
    opt = make_optimizer(model, cfg.lr, cfg.z_lr_mult)
    n = len(targets) * cfg.group
    prompts = encode_prompts(targets).to(device).repeat_interleave(cfg.group, dim=0)  # (N, 3)
    tgt = torch.tensor(targets, device=device).repeat_interleave(cfg.group)  # (N,)
    log(f"--- {arm.name} ({arm.algo}, coef {arm.coef:g}, {arm.task}, seed {seed}): "
        f"{cfg.steps} steps × {len(targets)} prompts × G {cfg.group}")
    start = time.time()
    cpu_start = time.process_time()
    for step in range(1, cfg.steps + 1):
        model.train()
        rollout = collect_rollout(model, ref, prompts, tgt, arm.task, cfg.group)
        minibatches = torch.randperm(n, device=device).chunk(cfg.minibatches)
        history = update(model, opt, rollout, arm, minibatches, cfg, step)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_progress(step, cfg.steps, start, reward=rollout.reward.mean().item(),
                         **history[-1], samples_per_s=step * n / (time.time() - start))
    wall = time.time() - start
    cpu = time.process_time() - cpu_start
    model.eval()
    logpi = exact_logprobs(model, targets, device)  # (P, 10000)
    out = evaluate(logpi, ref_logpi, targets, arm.task, cfg.eval_samples, seed)
    return {**out, "wall_time_s": wall, "cpu_time_s": cpu}


# --- evaluation ---


@torch.no_grad()
def exact_logprobs(model, targets, device):
    """log π(y | s) for all 10,000 answers of every prompt → (P, 10000), from ONE batched forward
    over the 1,000 three-digit prefixes of each prompt:
    log π(d1 d2 d3 d4) = Σ_{t<4} log π(d_t | ·) + log π(d4 | d1 d2 d3), for all ten d4 at once."""
    n_prompts = len(targets)
    prefixes = ALL_ANSWERS[::10].to(device)  # (1000, 4): d4 = 0, only d1 d2 d3 are fed
    prompts = encode_prompts(targets).to(device).repeat_interleave(1000, dim=0)  # (P·1000, 3)
    answers = prefixes.repeat(n_prompts, 1)  # (P·1000, 4)
    logp_all = score(model, prompts, answers).logp_all  # (P·1000, 4, 10)
    prefix_lp = logp_all[:, :3].gather(-1, answers[:, :3, None]).squeeze(-1).sum(-1)  # (P·1000,)
    logpi = prefix_lp[:, None] + logp_all[:, 3]  # (P·1000, 10): answer a = 10·prefix + d4
    return logpi.reshape(n_prompts, 10_000).double()  # (P, 10000)


def renormalise_valid(logpi, valid):
    """log of π restricted to the valid answers and renormalised; −inf elsewhere.  (P, 10000)."""
    log_valid = logpi.masked_fill(~valid, -math.inf)  # (P, 10000)
    return log_valid - torch.logsumexp(log_valid, dim=1, keepdim=True)


def evaluate(logpi, ref_logpi, targets, task, n_samples, seed):
    """Exact metrics of π (logpi, (P, 10000)) against p* = π_ref renormalised on the valid answers.

    accuracy: π-mass on valid answers; effective_answers: exp(entropy of π renormalised on the
    valid set); kl_to_target: KL(p* ‖ π); kl_from_target: KL(π|valid ‖ p*); pass_at_1 and
    distinct_valid (distinct valid answers) from n_samples draws per prompt. Means over prompts.
    tiered: mass_ratio = P(r = 0.5) / P(r = 1), summed over the prompts.
    """
    device = logpi.device
    answers = ALL_ANSWERS.to(device)  # (10000, 4)
    tgt = torch.tensor(targets, device=device)  # (P,)
    valid = answers.sum(-1)[None, :] == tgt[:, None]  # (P, 10000)
    log_star = renormalise_valid(ref_logpi, valid)  # (P, 10000): log p*
    log_pv = renormalise_valid(logpi, valid)  # (P, 10000): log π(· | valid)
    pi = logpi.exp()  # (P, 10000)
    p_star = log_star.exp()  # (P, 10000)
    pv = log_pv.exp()  # (P, 10000)
    zero = torch.zeros_like(logpi)  # (P, 10000)
    accuracy = (pi * valid).sum(1)  # (P,)
    entropy_valid = -torch.where(valid, pv * log_pv, zero).sum(1)  # (P,)
    # KL(p* ‖ π) = Σ_y p*(y) log(p*(y) / π(y)): large when π drops answers that p* keeps
    kl_to = torch.where(valid, p_star * (log_star - logpi), zero).sum(1)  # (P,)
    # KL(π|valid ‖ p*) = Σ_y π(y|valid) log(π(y|valid) / p*(y))
    kl_from = torch.where(valid, pv * (log_pv - log_star), zero).sum(1)  # (P,)
    gen = torch.Generator(device=device).manual_seed(seed + 7)  # the same stream for every arm
    samples = torch.multinomial(pi.float(), n_samples, replacement=True, generator=gen)  # (P, S)
    seen = torch.zeros_like(pi).scatter(1, samples, 1.0)  # (P, 10000): drawn at least once
    out = {"accuracy": accuracy.mean().item(),
           "pass_at_1": valid.gather(1, samples).float().mean().item(),
           "distinct_valid": (seen * valid).sum(1).mean().item(),
           "effective_answers": entropy_valid.exp().mean().item(),
           "kl_to_target": kl_to.mean().item(),
           "kl_from_target": kl_from.mean().item()}
    if task == "tiered":
        full = answers[None, :, 0] % 2 == 0  # (1, 10000): an even first digit pays 1.0
        half_mass = (pi * (valid & ~full)).sum()
        full_mass = (pi * (valid & full)).sum()
        out["mass_ratio"] = (half_mass / full_mass).item()
    return out


METRICS = ("accuracy", "distinct_valid", "effective_answers", "kl_to_target")


def summarise(per_seed):
    """Means over seeds of every metric, their std and the worst seed's value (low accuracy and
    diversity, high KL are worse), beside the per-seed rows."""
    out = {}
    std = {}
    worst = {}
    for key in per_seed[0]:
        values = np.array([row[key] for row in per_seed])
        out[key] = float(values.mean())
        std[key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        worst[key] = float(values.max() if key.startswith("kl") else values.min())
    return {**out, "std": std, "worst": worst, "per_seed": per_seed}


def print_table(results):
    cols = ["accuracy", "pass_at_1", "distinct_valid", "effective_answers", "kl_to_target",
            "kl_from_target"]
    n_seeds = len(results["seeds"])
    log(f"\nexact evaluation over all 10,000 answers, mean ± std over {n_seeds} seeds "
        f"[worst seed]; distinct_valid and pass_at_1 from samples:")
    log(f"{'arm':<10}" + "".join(f"{c:>26}" for c in cols) + f"{'cpu_s':>8}")
    for name, row in results["arms"].items():
        cells = [f"{row[c]:.4g} ± {row['std'][c]:.2g} [{row['worst'][c]:.4g}]" for c in cols]
        log(f"{name:<10}" + "".join(f"{c:>26}" for c in cells) + f"{row['cpu_time_s']:>8.1f}")
    for name in ("target", "initial"):
        row = results[name]
        log(f"{name:<10}" + "".join(f"{row[c]:>26.4g}" for c in cols))
    log("\nfrontier (first seed): coef = β (flowrl), KL coefficient (grpo), KL weight (kl_pg)")
    for family, points in results["frontier"].items():
        for p in points:
            log(f"{family:<8} coef {p['coef']:<7g} accuracy {p['accuracy']:.4f}  distinct "
                f"{p['distinct_valid']:6.1f}  effective {p['effective_answers']:6.1f}  "
                f"KL(p*‖π) {p['kl_to_target']:.3f}")
    tiered = results["tiered"]
    if tiered["arms"]:
        log(f"\ntiered task (first seed): P(r=0.5)/P(r=1) of p* "
            f"{tiered['target']['mass_ratio']:.3f}, of the reward-proportional target "
            f"{tiered['reward_proportional_ratio']:.3f}")
        for name, row in tiered["arms"].items():
            log(f"{name:<10} mass_ratio {row['mass_ratio']:.4f}  accuracy {row['accuracy']:.4f}  "
                f"distinct {row['distinct_valid']:.1f}")


def plot(results, path):
    """Accuracy against distinct valid answers and against KL(p* ‖ π): the three frontiers
    (first seed, labelled by their coefficient) and the five arms (mean ± std over seeds)."""
    fig, axes = new_figure(2)
    colours = {"flowrl": "C0", "grpo": "C1", "kl_pg": "C2", "grpo_kl": "C3", "ppo": "C4"}
    for ax, x_key, x_label in ((axes[0], "distinct_valid", "distinct valid answers (of 512)"),
                               (axes[1], "kl_to_target", "KL(p* ‖ π)")):
        for family, points in results["frontier"].items():
            xs = [p[x_key] for p in points]
            ys = [p["accuracy"] for p in points]
            ax.plot(xs, ys, ".-", c=colours[family], alpha=0.5, label=f"{family} frontier")
            for p in points:
                ax.annotate(f"{p['coef']:g}", (p[x_key], p["accuracy"]), fontsize=6,
                            color=colours[family])
        for name, row in results["arms"].items():
            ax.errorbar(row[x_key], row["accuracy"], xerr=row["std"][x_key],
                        yerr=row["std"]["accuracy"], fmt="o", c=colours.get(name, "k"), label=name)
        ax.set_xscale("log")
        ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy (π-mass on valid answers)")
    axes[0].axvline(results["target"]["distinct_valid"], ls="--", c="gray", label="target p*")
    axes[0].set_title("frontiers: coef = β (flowrl), KL weight (grpo, kl_pg)", fontsize=8)
    axes[0].legend(fontsize=6)
    save_figure(fig, path)


# --- main ---


def parse_floats(text):
    return [float(v) for v in text.split(",") if v]


def main_arms(cfg):
    """The arms run over every seed; kl_pg's KL weight is 1/(β|y|), FlowRL's on-policy twin."""
    coefs = {"flowrl": cfg.beta, "grpo": cfg.kl_coef, "grpo_kl": cfg.kl_coef_strong, "ppo": 0.0,
             "kl_pg": 1 / (cfg.beta * N_DIGITS)}
    return [Arm(a, a, coefs[a], cfg.task) for a in cfg.arms.split(",")]


def frontier_arms(cfg):
    """FlowRL over β, GRPO over its KL coefficient, kl_pg over its KL weight."""
    betas = parse_floats(cfg.betas)
    kl_coefs = parse_floats(cfg.kl_coefs)
    kl_weights = parse_floats(cfg.kl_weights)
    return {"flowrl": [Arm(f"flowrl β={b:g}", "flowrl", b, cfg.task) for b in betas],
            "grpo": [Arm(f"grpo KL={c:g}", "grpo", c, cfg.task) for c in kl_coefs],
            "kl_pg": [Arm(f"kl_pg KL={c:g}", "kl_pg", c, cfg.task) for c in kl_weights]}


def tiered_arms(cfg):
    """The arms trained once on the tiered task, at the five-arm table's coefficients."""
    main = {arm.algo: arm for arm in main_arms(dataclasses.replace(cfg, arms=",".join(ALGOS)))}
    names = [a for a in cfg.tiered_arms.split(",") if a]
    return [main[a]._replace(task="tiered") for a in names]


def run_key(arm, seed):
    """grpo_kl is grpo at another coefficient: a frontier point equal to an arm is trained once."""
    algo = "grpo" if arm.algo == "grpo_kl" else arm.algo
    return (algo, arm.coef, arm.task, seed)


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 4), group=min(cfg.group, 4), d_model=8,
                                  hidden=16, eval_samples=min(cfg.eval_samples, 64), log_every=2,
                                  seeds=min(cfg.seeds, 2))
    device = pick_device(cfg.device)
    targets = load_targets(cfg.data, cfg.smoke)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    log(f"config: {dataclasses.asdict(cfg)}")
    arms = main_arms(cfg)
    frontier = frontier_arms(cfg)
    first_seed_only = [arm for points in frontier.values() for arm in points] + tiered_arms(cfg)
    runs = {}
    per_seed = {arm.name: [] for arm in arms}
    target_rows = []
    initial_rows = []
    tiered_target = None
    for seed in seeds:
        set_seed(seed)
        # π_ref = the initial model, frozen: never optimized, only scored under no_grad
        ref = Policy(cfg.d_model, cfg.hidden).to(device)
        init_state = copy.deepcopy(ref.state_dict())
        ref.eval()
        log(f"seed {seed}: policy {sum(p.numel() for p in ref.parameters()):,} parameters; "
            f"device {device}; prompts {targets}; N(s) {[n_valid(s) for s in targets]}")
        ref_logpi = exact_logprobs(ref, targets, device)  # (P, 10000)
        tgt = torch.tensor(targets, device=device)  # (P,)
        valid = ALL_ANSWERS.to(device).sum(-1)[None, :] == tgt[:, None]  # (P, 10000)
        log_star = renormalise_valid(ref_logpi, valid)  # (P, 10000): log p*
        target_rows.append(evaluate(log_star, ref_logpi, targets, cfg.task, cfg.eval_samples, seed))
        initial_rows.append(evaluate(ref_logpi, ref_logpi, targets, cfg.task, cfg.eval_samples,
                                     seed))
        todo = arms + (first_seed_only if seed == seeds[0] else [])
        for arm in todo:
            key = run_key(arm, seed)
            if key not in runs:
                runs[key] = train_arm(arm, cfg, init_state, ref, ref_logpi, targets, seed, device)
        for arm in arms:
            per_seed[arm.name].append(runs[run_key(arm, seed)])
        if seed == seeds[0]:
            tiered_target = evaluate(log_star, ref_logpi, targets, "tiered", cfg.eval_samples, seed)
    frontier_rows = {}
    for family, points in frontier.items():
        rows = [runs[run_key(arm, seeds[0])] for arm in points]
        frontier_rows[family] = [{"coef": arm.coef, **{k: row[k] for k in METRICS}}
                                 for arm, row in zip(points, rows)]
    tiered = {arm.name: runs[run_key(arm, seeds[0])] for arm in tiered_arms(cfg)}
    results = {"config": dataclasses.asdict(cfg), "seeds": seeds,
               "arms": {name: summarise(rows) for name, rows in per_seed.items()},
               "target": summarise(target_rows), "initial": summarise(initial_rows),
               "frontier": frontier_rows,
               "tiered": {"arms": tiered, "target": tiered_target,
                          "reward_proportional_ratio": 0.5 * tiered_target["mass_ratio"]},
               "n_valid": {str(s): n_valid(s) for s in targets}}
    print_table(results)
    save_json(os.path.join(cfg.out, "results.json"), results)
    plot(results, os.path.join(cfg.out, "flowrl.png"))
    log(f"wrote {os.path.join(cfg.out, 'results.json')} and flowrl.png")
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
