"""FlowRL: Matching Reward Distributions for LLM Reasoning — arXiv 2509.15207
(https://arxiv.org/abs/2509.15207)

Reward maximisers (PPO, GRPO) push all probability onto the few answers they find first. FlowRL fits
the policy to a reward-shaped target, π(y|x) ∝ π_ref(y|x) · exp(β·|y|·r̂(x, y)), with a
trajectory-balance loss and a learned partition function log Z_φ(x): answers of equal reward
keep π_ref's ratios, so the policy should keep many correct answers. On-policy, FlowRL's expected
gradient is 2β × that of a policy gradient on r̂ with a reverse KL to π_ref of weight 1/(β|y|)
(derivation in `kl_pg_loss`). The control `kl_pg` is that policy gradient, everything else
equal; `flowrl_detached` cuts the one path by which the flow reaches the policy beyond it (log Z's
regression training the shared trunk). GRPO and PPO are the survey's reward maximisers (arXiv
2509.08827).

Key equations (symbols as in the code; y has |y| = 4 tokens; sums over response tokens t):
    r̂       = (r − mean_G r) / (std_G r + 1e-6)                                   group_normalize
    δ        = log_z + (1/|y|) Σ_t logp_t − β·r̂ − (1/|y|) Σ_t ref_logp_t               flowrl_loss
    w        = clip(exp(Σ_t [logp_t − old_logp_t]), 1 − ε, 1 + ε).detach()           (ε = 0.2)
    L_FlowRL = mean_i w_i · δ_i²
    kl_pg:  A = r̂ − (1/(β|y|))·Σ_t (logp_t − ref_logp_t) − b,  b = group mean of A under π_old;
            L = −mean_i w_i · A_i.detach() · (1/|y|) Σ_t logp_t                     kl_pg_loss
    GRPO:   ρ_t = exp(logp_t − old_logp_t); ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1±ε)) + c·k3_t, token
            mean; k3 = e^u − u − 1, u = ref_logp − logp clamped to ±20, k3 to ±10        grpo_loss
    PPO:    A = GAE(γ = 1, λ) of the final reward with a value head, whitened; the same surrogate
            + ½·max((V − R)², (V_old + clip(V − V_old, ±0.5) − R)²)                     ppo_loss
The task (DigitSum): prompt "ss=" with s in 10, 12, ..., 24; answer exactly 4 digits; reward 1 if
they sum to s (282 to 670 valid answers of 10,000). The policy factorises, so one batched forward
over the 1,000 three-digit prefixes gives π exactly: accuracy (π-mass on valid answers), effective
answers and KL(p* ‖ π) to p* = π_ref renormalised on the valid answers (the CEILING: accuracy 1,
KL 0). Distinct valid answers come from 512 samples per prompt.

Run:
    python flowrl.py              # 6 arms × 3 seeds, 3 frontiers × 3 points × 2 seeds, tiered task
    python flowrl.py --beta 15    # the paper's β (kl_pg follows: weight 1/(15·4))
    python flowrl.py --smoke      # the same code path at a tiny size, in seconds

Headline (3 seeds; tables and the generated verdict: results/flowrl/results.md): at matched KL
weight FlowRL (β = 1) and its twin kl_pg (0.25) keep 140 vs 152 distinct valid answers of p*'s 319
(inside the seed spread) at accuracy 0.955 vs 0.970 (kl_pg ahead by 0.014, seed std 0.010): the
diversity is the KL's. GRPO with verl's KL at that weight keeps 114; without a KL GRPO keeps 1.1,
PPO 1.6. What only the flow does, log Z's regression training the shared trunk, costs: detached,
FlowRL keeps 178.

Deviations from the paper (and its official code, Xuekai-Zhu/FlowRL; verl recipe/flowrl):
- Scale: a 36k-parameter byte-level GRU (hidden 64) instead of a 7B transformer, a 4-digit answer
  instead of a chain of thought, so that all 10,000 answers can be enumerated for exact evaluation.
- β = 1, not the paper's 15 (tuned for long answers; on a 4-token answer it collapses). 1,200 steps
  × 8 prompts × G 16: the budget at which both FlowRL and kl_pg reach accuracy > 0.9 with > 100
  distinct valid answers.
- Importance weight: the paper's clip(w, 1 − ε, 1 + ε), ε = 0.2; `--official-clamp` is the official
  code's later clamp(w, max = 10). Each rollout batch is split into 2 minibatches, so the second
  optimizer step is off-policy and the weight acts (as verl's ppo_mini_batch_size).
- log Z head: the official 3-layer MLP on the mean hidden state over ALL prompt positions (the
  official code drops the last prompt token), input not detached, the same Adam and learning rate.
- Optimiser: Adam, lr 3e-3, gradient norm clipped at 1.0, no schedule, the same for every arm.
- GRPO: verl's clamped low_var_kl, token-mean, without verl's dual-clip (it would fire on about 1 in
  10⁴ tokens); `--kl-unclamped` is the plain k3, a labelled variant.
- PPO: the value head shares the GRU trunk (verl trains a separate critic), no KL in the reward.
- kl_pg and flowrl_detached are not in the paper: they are the controls it never ran.
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
from typing import NamedTuple, Optional

import datasets
import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

ALGOS = ("flowrl", "flowrl_detached", "kl_pg", "grpo", "grpo_kl", "ppo")


@dataclasses.dataclass
class Config:
    """FlowRL vs its on-policy twin kl_pg, GRPO, GRPO+KL and PPO on DigitSum, evaluated exactly."""

    steps: int = 1200  # training steps per arm (one rollout batch of prompts × group each)
    seed: int = 0  # first random seed (the arms run on seed, seed + 1, ...)
    seeds: int = 3  # seeds for every arm of the main table
    frontier_seeds: int = 2  # seeds for every frontier point (seed, seed + 1, ...)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines, column 'target' (int 0..36, one prompt a row); empty: 10, 12..24
    out: str = "runs/flowrl"  # folder for results.json, results.md and flowrl.png
    smoke: bool = False  # the same code path at a tiny size, in seconds
    workers: int = 0  # worker processes of one thread each (0: one per core; 1 on a GPU)
    log_every: int = 300  # steps between log lines
    arms: str = "flowrl,flowrl_detached,kl_pg,grpo,grpo_kl,ppo"  # arms of the main table
    task: str = "digitsum"  # digitsum (reward 1 if the digits sum to s) or tiered (0.5 / 1.0)
    betas: str = "1,1.5,2"  # the FlowRL frontier: β values (empty: no frontier runs)
    kl_weights: str = ""  # the kl_pg frontier: KL weights (empty: 1/(β|y|) of each β in --betas)
    kl_coefs: str = ""  # the GRPO frontier: KL coefficients (empty: the kl_pg frontier's weights)
    tiered_arms: str = "flowrl,kl_pg"  # arms trained once on the tiered task (empty: none)
    group: int = 16  # G: samples per prompt per step
    lr: float = 3e-3  # Adam learning rate, every arm
    beta: float = 1.0  # FlowRL β (paper: 15; see Deviations); kl_pg's weight is 1/(β|y|)
    clip_eps: float = 0.2  # ε of FlowRL's clipped weight and of the clipped surrogates
    official_clamp: bool = False  # FlowRL weight clamp(w, max=10) (official code), not clip(w, 1±ε)
    z_lr_mult: float = 1.0  # learning-rate multiplier of the log Z head (official: 1)
    kl_coef: float = 0.001  # KL coefficient of the 'grpo' arm (verl's default)
    kl_coef_strong: float = 0.25  # KL coefficient of the 'grpo_kl' arm (kl_pg's weight at β = 1)
    kl_unclamped: bool = False  # GRPO's KL as plain unclamped k3 (a labelled variant; verl clamps)
    lam: float = 1.0  # PPO's GAE λ (γ = 1); verl's default 1.0
    minibatches: int = 2  # optimizer steps per rollout batch (later ones are off-policy)
    d_model: int = 32  # token embedding width
    hidden: int = 64  # GRU hidden size
    eval_samples: int = 512  # samples per prompt for pass@1 and the distinct-valid count

    def __post_init__(self):
        require(self.log_every > 0, f"--log-every {self.log_every}: must be positive")
        require(self.seeds > 0, f"--seeds {self.seeds}: must be positive")
        require(self.frontier_seeds > 0, f"--frontier-seeds {self.frontier_seeds}: must be > 0")
        require(self.workers >= 0, f"--workers {self.workers}: must be >= 0")
        bad = [a for a in self.arms.split(",") if a not in ALGOS]
        require(self.arms and not bad, f"--arms {self.arms}: unknown {bad}; choose from {ALGOS}")
        bad = [a for a in self.tiered_arms.split(",") if a and a not in ALGOS]
        require(not bad, f"--tiered-arms {self.tiered_arms}: unknown {bad}; choose from {ALGOS}")
        require(self.task in ("digitsum", "tiered"), f"--task {self.task}: digitsum or tiered")
        for flag in ("betas", "kl_coefs", "kl_weights"):
            text = getattr(self, flag)
            ok = all(re.fullmatch(r"\d+(\.\d*)?(e-?\d+)?", v) for v in text.split(",") if v)
            require(ok, f"--{flag.replace('_', '-')} {text}: comma-separated numbers >= 0")
        positive = all(float(b) > 0 for b in self.betas.split(",") if b)
        require(positive, f"--betas {self.betas}: every β must be > 0")
        require(self.group >= 2, f"--group {self.group}: need at least 2 samples per prompt")
        require(self.lr > 0 and self.z_lr_mult > 0, "--lr and --z-lr-mult must be positive")
        require(self.beta > 0, f"--beta {self.beta}: must be > 0")
        require(0 < self.clip_eps < 1, f"--clip-eps {self.clip_eps}: must be in (0, 1)")
        require(self.kl_coef >= 0 and self.kl_coef_strong >= 0, "--kl-coef values must be >= 0")
        require(0 <= self.lam <= 1, f"--lam {self.lam}: must be in [0, 1]")
        require(self.minibatches > 0, f"--minibatches {self.minibatches}: must be positive")
        require(self.d_model > 0 and self.hidden > 0, "--d-model and --hidden must be positive")
        require(self.eval_samples > 0, f"--eval-samples {self.eval_samples}: must be positive")


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


def ppo_advantages(reward, values, mask, lam):
    """PPO's advantages: the outcome reward on each answer's last token, GAE (γ = 1), whitened.

    reward: (N,); values, mask: (N, T) → (advantages, returns), each (N, T).
    """
    last = mask.sum(dim=1).long() - 1  # (N,): index of the last response token
    token_rewards = torch.zeros_like(values).scatter(1, last[:, None], reward[:, None])  # (N, T)
    adv, returns = gae(token_rewards, values, mask, 1.0, lam)
    return whiten(adv, mask), returns


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


def score(model, prompts, answers, detach_z=False):
    """Teacher-forced pass over prompt + answer[:-1]: per-token log π, values, log Z.

    detach_z: log Z reads a detached prompt state, so its regression trains the log Z head only and
    never the shared trunk (embedding and GRU) that the policy also uses.
    """
    n_prompt = prompts.shape[1]
    x = torch.cat([prompts, DIGIT0 + answers[:, :-1]], dim=1)  # (N, P + 3)
    h, _ = model(x)  # (N, P + 3, H)
    h_ans = h[:, n_prompt - 1:]  # (N, 4, H): the state before each answer token
    logp_all = F.log_softmax(model.head(h_ans).float(), dim=-1)  # (N, 4, 10)
    logp = logp_all.gather(-1, answers[..., None]).squeeze(-1)  # (N, 4)
    values = model.value(h_ans).squeeze(-1).float()  # (N, 4)
    prompt_state = h[:, :n_prompt].mean(dim=1)  # (N, H): log Z's input, the mean prompt state
    if detach_z:
        prompt_state = prompt_state.detach()
    log_z = model.log_z(prompt_state).float()  # (N,)
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


# --- training ---


class Arm(NamedTuple):
    name: str  # label in the tables
    algo: str  # one of ALGOS
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


class BatchTerms(NamedTuple):
    """What an arm computes once per rollout batch, before its minibatches (None where unused)."""
    adv: Optional[torch.Tensor]  # (N, 4): PPO's whitened GAE advantages
    returns: Optional[torch.Tensor]  # (N, 4): PPO's value targets
    baseline: Optional[torch.Tensor]  # (N,): kl_pg's group baseline


def collect_rollout(model, ref, prompts, targets, task, group):
    """Sample one answer per row of prompts (N = B·G), score it under π_old and π_ref, reward it."""
    old = sample(model, prompts)  # answers, log π_old and V_old, each (N, 4)
    with torch.no_grad():
        ref_logp = score(ref, prompts, old.answers).logp  # (N, 4)
    reward = reward_fn(old.answers, targets, task)  # (N,)
    r_hat = group_normalize(reward.view(-1, group)).view(-1)  # (N,)
    mask = torch.ones_like(old.logp)  # (N, 4)
    return Rollout(prompts, old.answers, mask, old.logp, old.values, ref_logp, reward, r_hat)


def batch_terms(rollout, arm, cfg):
    """PPO's advantages and returns, kl_pg's baseline: computed once from π_old's rollout."""
    adv = None
    returns = None
    baseline = None
    if arm.algo == "ppo":
        adv, returns = ppo_advantages(rollout.reward, rollout.old_values, rollout.mask, cfg.lam)
    if arm.algo == "kl_pg":
        baseline = kl_pg_baseline(rollout.r_hat, rollout.old_logp, rollout.ref_logp,
                                  rollout.mask, arm.coef, cfg.group)
    return BatchTerms(adv, returns, baseline)


def arm_loss(arm, now, rollout, terms, idx, cfg):
    """The arm's loss on minibatch idx, from the current policy's scores `now`."""
    old_logp = rollout.old_logp[idx]  # (n, 4)
    ref_logp = rollout.ref_logp[idx]  # (n, 4)
    m = rollout.mask[idx]  # (n, 4)
    w_max = 10.0 if cfg.official_clamp else None
    if arm.algo in ("flowrl", "flowrl_detached"):
        return flowrl_loss(now.logp, old_logp, ref_logp, m, now.log_z, rollout.r_hat[idx],
                           beta=arm.coef, clip_eps=cfg.clip_eps, w_max=w_max)
    if arm.algo == "kl_pg":
        return kl_pg_loss(now.logp, old_logp, ref_logp, m, rollout.r_hat[idx], terms.baseline[idx],
                          kl_weight=arm.coef, clip_eps=cfg.clip_eps, w_max=w_max)
    if arm.algo == "ppo":
        return ppo_loss(now.logp, old_logp, m, terms.adv[idx], now.values,
                        rollout.old_values[idx], terms.returns[idx], clip_eps=cfg.clip_eps)
    return grpo_loss(now.logp, old_logp, ref_logp, m, rollout.r_hat[idx], clip_eps=cfg.clip_eps,
                     kl_coef=arm.coef, kl_clamp=not cfg.kl_unclamped)


def update(model, opt, rollout, arm, minibatches, cfg, step):
    """One rollout batch, one optimizer step per minibatch of indices; returns each step's stats.

    `clipped` is 1 when the gradient norm exceeded 1.0, so that clipping rescaled the step.
    """
    terms = batch_terms(rollout, arm, cfg)
    history = []
    for idx in minibatches:
        # fresh log-probs of the current policy: earlier minibatches have already moved it, while
        # old_logp stays the sampling policy's (that gap is what the clip and the weight act on)
        now = score(model, rollout.prompts[idx], rollout.answers[idx],
                    detach_z=arm.algo == "flowrl_detached")
        loss, stats = arm_loss(arm, now, rollout, terms, idx, cfg)
        check_finite(step, loss=loss.detach(), **stats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # |log π_θ(y)/π_old(y)|: 0 on the first minibatch, > 0 once the policy has moved
        drift = ((now.logp.detach() - rollout.old_logp[idx]) * rollout.mask[idx]).sum(dim=1)
        history.append({"loss": loss.item(), "drift": drift.abs().mean().item(),
                        "clipped": float(grad_norm > 1.0),
                        **{k: float(v) for k, v in stats.items()}})
    return history


def make_optimizer(model, lr, z_lr_mult):
    """Adam; the log Z head gets its own learning rate (lr × z_lr_mult)."""
    z_params = list(model.log_z.parameters())
    z_ids = {id(p) for p in z_params}
    rest = [p for p in model.parameters() if id(p) not in z_ids]
    groups = [{"params": rest}, {"params": z_params, "lr": lr * z_lr_mult}]
    return torch.optim.Adam(groups, lr=lr)


class Trained(NamedTuple):
    model: nn.Module  # the trained policy, in eval mode
    wall_time_s: float  # training only, evaluation excluded
    cpu_time_s: float
    clip_share: float  # share of optimizer steps whose gradient norm was clipped


def train_arm(arm, cfg, init_state, ref, targets, seed, device):
    """Train one arm from the shared initial weights (steps × P × G rollouts)."""
    set_seed(seed + 1)  # every arm of a seed draws from the same random stream
    model = Policy(cfg.d_model, cfg.hidden).to(device)
    model.load_state_dict(init_state)
    opt = make_optimizer(model, cfg.lr, cfg.z_lr_mult)
    n = len(targets) * cfg.group
    prompts = encode_prompts(targets).to(device).repeat_interleave(cfg.group, dim=0)  # (N, 3)
    tgt = torch.tensor(targets, device=device).repeat_interleave(cfg.group)  # (N,)
    start = time.time()
    cpu_start = time.process_time()
    n_clipped = 0.0
    n_updates = 0
    for step in range(1, cfg.steps + 1):
        model.train()
        rollout = collect_rollout(model, ref, prompts, tgt, arm.task, cfg.group)
        minibatches = torch.randperm(n, device=device).chunk(cfg.minibatches)
        history = update(model, opt, rollout, arm, minibatches, cfg, step)
        n_clipped += sum(h["clipped"] for h in history)
        n_updates += len(history)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_progress(step, cfg.steps, start, arm=arm.name, seed=seed,
                         reward=rollout.reward.mean().item(), loss=history[-1]["loss"],
                         clip_share=n_clipped / n_updates,
                         samples_per_s=step * n / (time.time() - start))
    wall = time.time() - start
    cpu = time.process_time() - cpu_start
    model.eval()
    return Trained(model, wall, cpu, n_clipped / n_updates)


# --- the study: evaluation, seeds, the record (a reader who came for the method may stop here) ---


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
FRONTIER_KEYS = ("accuracy", "distinct_valid", "kl_to_target")  # per seed, in the record
HIGHER_IS_WORSE = ("kl_to_target", "kl_from_target", "clip_share", "wall_time_s", "cpu_time_s")


def summarise(per_seed):
    """Means over seeds of every metric, their std (unbiased) and the worst seed's value (low
    accuracy and diversity are worse; high KL, clip share and time are worse), beside the rows."""
    out = {}
    std = {}
    worst = {}
    for key in per_seed[0]:
        values = np.array([row[key] for row in per_seed])
        out[key] = float(values.mean())
        std[key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        worst[key] = float(values.max() if key in HIGHER_IS_WORSE else values.min())
    return {**out, "std": std, "worst": worst, "per_seed": per_seed}


# --- seeds, arms and frontiers as jobs ---


class Reference(NamedTuple):
    model: nn.Module  # π_ref: the initial model, frozen (never optimized, scored under no_grad)
    init_state: dict  # its weights, every arm's starting point
    logpi: torch.Tensor  # (P, 10000): its exact log π


class Job(NamedTuple):
    cfg: Config
    arm: Arm
    seed: int
    targets: list  # the prompts' targets s


class RunKey(NamedTuple):
    algo: str  # grpo_kl counts as grpo: it is grpo at another coefficient
    coef: float
    task: str
    seed: int


def reference(cfg, targets, seed, device):
    """The seed's initial model, which every arm of that seed starts from and is scored against."""
    set_seed(seed)
    model = Policy(cfg.d_model, cfg.hidden).to(device)
    init_state = copy.deepcopy(model.state_dict())
    model.eval()
    return Reference(model, init_state, exact_logprobs(model, targets, device))


def run_job(job):
    """One training (an arm on a seed) from its seed's π_ref, evaluated exactly: plain numbers."""
    device = pick_device(job.cfg.device)
    ref = reference(job.cfg, job.targets, job.seed, device)
    trained = train_arm(job.arm, job.cfg, ref.init_state, ref.model, job.targets, job.seed,
                        device)
    logpi = exact_logprobs(trained.model, job.targets, device)  # (P, 10000)
    row = evaluate(logpi, ref.logpi, job.targets, job.arm.task, job.cfg.eval_samples, job.seed)
    print(f"done arm={job.arm.name} seed={job.seed}: accuracy {row['accuracy']:.3f}, distinct "
          f"valid {row['distinct_valid']:.1f}, clip share {trained.clip_share:.2f}")
    return {**row, "clip_share": trained.clip_share, "wall_time_s": trained.wall_time_s,
            "cpu_time_s": trained.cpu_time_s}


def main_arms(cfg):
    """The arms run over every seed; kl_pg's KL weight is 1/(β|y|), FlowRL's on-policy twin."""
    coefs = {"flowrl": cfg.beta, "flowrl_detached": cfg.beta, "kl_pg": 1 / (cfg.beta * N_DIGITS),
             "grpo": cfg.kl_coef, "grpo_kl": cfg.kl_coef_strong, "ppo": 0.0}
    return [Arm(a, a, coefs[a], cfg.task) for a in cfg.arms.split(",")]


def frontier_arms(cfg):
    """FlowRL over β; kl_pg and GRPO over KL weights, by default the 1/(β|y|) of each β."""
    betas = parse_floats(cfg.betas)
    kl_weights = parse_floats(cfg.kl_weights) or [1 / (b * N_DIGITS) for b in betas]
    kl_coefs = parse_floats(cfg.kl_coefs) or kl_weights
    return {"flowrl": [Arm(f"flowrl β={b:g}", "flowrl", b, cfg.task) for b in betas],
            "kl_pg": [Arm(f"kl_pg KL={c:.4g}", "kl_pg", c, cfg.task) for c in kl_weights],
            "grpo": [Arm(f"grpo KL={c:.4g}", "grpo", c, cfg.task) for c in kl_coefs]}


def tiered_arms(cfg):
    """The arms trained once on the tiered task, at the main table's coefficients."""
    main = {arm.algo: arm for arm in main_arms(dataclasses.replace(cfg, arms=",".join(ALGOS)))}
    names = [a for a in cfg.tiered_arms.split(",") if a]
    return [main[a]._replace(task="tiered") for a in names]


def run_key(arm, seed):
    """A frontier point or tiered arm equal to a main-table run is that run, trained once."""
    algo = "grpo" if arm.algo == "grpo_kl" else arm.algo
    return RunKey(algo, arm.coef, arm.task, seed)


def seed_list(first, count):
    return [first + i for i in range(count)]


def plan(cfg, targets):
    """Every training of the study once, {RunKey: Job}: the main arms on every seed, each
    frontier point on the frontier seeds, the tiered arms on the first seed."""
    wanted = []
    for seed in seed_list(cfg.seed, cfg.seeds):
        wanted += [Job(cfg, arm, seed, targets) for arm in main_arms(cfg)]
    for seed in seed_list(cfg.seed, cfg.frontier_seeds):
        for points in frontier_arms(cfg).values():
            wanted += [Job(cfg, arm, seed, targets) for arm in points]
    wanted += [Job(cfg, arm, cfg.seed, targets) for arm in tiered_arms(cfg)]
    jobs = {}
    for job in wanted:
        jobs.setdefault(run_key(job.arm, job.seed), job)
    return jobs


def frontier_rows(cfg, runs):
    """Each frontier point: the mean over the frontier seeds, its std, and every seed's point."""
    seeds = seed_list(cfg.seed, cfg.frontier_seeds)
    out = {}
    for family, points in frontier_arms(cfg).items():
        out[family] = []
        for arm in points:
            per_seed = [runs[run_key(arm, seed)] for seed in seeds]
            mean = summarise(per_seed)
            seed_points = [{k: row[k] for k in FRONTIER_KEYS} for row in per_seed]
            out[family].append({"coef": arm.coef, **{k: mean[k] for k in METRICS},
                                "std": {k: mean["std"][k] for k in METRICS},
                                "per_seed": seed_points})
    return out


def collect(cfg, targets, runs, device):
    """The record: the main table, the ceiling p* and π_ref per seed, frontiers, tiered task."""
    seeds = seed_list(cfg.seed, cfg.seeds)
    arms = {}
    for arm in main_arms(cfg):
        arms[arm.name] = {"coef": arm.coef, **summarise([runs[run_key(arm, s)] for s in seeds])}
    tgt = torch.tensor(targets, device=device)  # (P,)
    valid = ALL_ANSWERS.to(device).sum(-1)[None, :] == tgt[:, None]  # (P, 10000)
    target_rows = []
    initial_rows = []
    tiered_rows = []
    for seed in seeds:
        ref = reference(cfg, targets, seed, device)
        log_star = renormalise_valid(ref.logpi, valid)  # (P, 10000): log p*
        target_rows.append(evaluate(log_star, ref.logpi, targets, cfg.task, cfg.eval_samples, seed))
        initial_rows.append(evaluate(ref.logpi, ref.logpi, targets, cfg.task, cfg.eval_samples,
                                     seed))
        tiered_rows.append(evaluate(log_star, ref.logpi, targets, "tiered", cfg.eval_samples, seed))
    tiered_target = tiered_rows[0]  # the tiered arms train on the first seed
    tiered = {arm.name: runs[run_key(arm, cfg.seed)] for arm in tiered_arms(cfg)}
    return {"config": dataclasses.asdict(cfg), "seeds": seeds, "arms": arms,
            "target": summarise(target_rows), "initial": summarise(initial_rows),
            "frontier": frontier_rows(cfg, runs),
            "tiered": {"arms": tiered, "target": tiered_target,
                       "reward_proportional_ratio": 0.5 * tiered_target["mass_ratio"]},
            "n_valid": {str(s): n_valid(s) for s in targets}}


def parse_floats(text):
    """'1,1.5,2' → [1.0, 1.5, 2.0]."""
    return [float(v) for v in text.split(",") if v]


# --- the figure and the report ---

COLOURS = {"flowrl": "C0", "flowrl_detached": "C5", "kl_pg": "C2", "grpo": "C1", "grpo_kl": "C3",
           "ppo": "C4"}


def plot(results):
    """Accuracy against distinct valid answers and against KL(p* ‖ π): the frontiers (mean over
    seeds, each seed a small dot, labelled by coefficient) and the main arms (mean ± std)."""
    fig = Figure(figsize=(4.6 * 2, 3.6))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    panels = [("distinct_valid", "distinct valid answers (of 512 samples)"),
              ("kl_to_target", "KL(p* ‖ π)")]
    for ax, panel in zip(axes, panels):
        x_key = panel[0]
        for family, points in results["frontier"].items():
            colour = COLOURS[family]
            ax.plot([p[x_key] for p in points], [p["accuracy"] for p in points], ".-", c=colour,
                    alpha=0.5, label=f"{family} frontier")
            for p in points:
                seeds = p["per_seed"]
                ax.scatter([s[x_key] for s in seeds], [s["accuracy"] for s in seeds], s=6,
                           c=colour, alpha=0.4)
                ax.annotate(f"{p['coef']:.3g}", (p[x_key], p["accuracy"]), fontsize=6, color=colour)
        for name, row in results["arms"].items():
            ax.errorbar(row[x_key], row["accuracy"], xerr=row["std"][x_key],
                        yerr=row["std"]["accuracy"], fmt="o", c=COLOURS[name], label=name)
        ax.set_xscale("log")
        ax.tick_params(axis="x", which="minor", labelbottom=False)
        ax.set_xlabel(panel[1])
        ax.set_ylabel("accuracy (π-mass on valid answers)")
    axes[0].axvline(results["target"]["distinct_valid"], ls="--", c="gray", label="target p*")
    axes[0].set_title("frontiers: coef = β (flowrl), KL weight (kl_pg, grpo)", fontsize=8)
    axes[0].legend(fontsize=6)
    return fig


class Gap(NamedTuple):
    diff: float  # mean of one arm − mean of the other
    spread: float  # the larger of the two arms' seed std (0 with one seed)

    @property
    def beyond(self):
        """The difference exceeds the seed spread (never, with one seed)."""
        return abs(self.diff) > self.spread > 0


def gap(a, b, key):
    return Gap(a[key] - b[key], max(a["std"][key], b["std"][key]))


def gap_text(g, digits):
    if g.spread == 0:
        return f"{g.diff:+.{digits}f} (no seed spread to compare with)"
    side = "beyond" if g.beyond else "inside"
    return f"{g.diff:+.{digits}f}, {side} the seed spread (std {g.spread:.{digits}f})"


def matched_lines(results):
    """FlowRL against kl_pg at the KL weight 1/(β|y|) its target implies: the main table."""
    flow = results["arms"]["flowrl"]
    twin = results["arms"]["kl_pg"]
    gaps = {"accuracy": gap(flow, twin, "accuracy"),
            "distinct valid answers": gap(flow, twin, "distinct_valid")}
    lines = [f"Matched weight (FlowRL β = {flow['coef']:g}, kl_pg KL weight {twin['coef']:.4g}, "
             f"seeds: {len(flow['per_seed'])}): accuracy {flow['accuracy']:.3f} vs "
             f"{twin['accuracy']:.3f}, FlowRL − kl_pg {gap_text(gaps['accuracy'], 3)}; distinct "
             f"valid {flow['distinct_valid']:.1f} vs {twin['distinct_valid']:.1f}, "
             f"{gap_text(gaps['distinct valid answers'], 1)}."]
    if any(g.beyond for g in gaps.values()):
        parts = []
        for metric, g in gaps.items():
            leader = "FlowRL" if g.diff > 0 else "kl_pg"
            parts.append(f"{leader} is ahead on {metric} by {abs(g.diff):.3g}" if g.beyond
                         else f"on {metric} neither is ahead")
        lines.append("Beyond the seed spread: " + "; ".join(parts) + ".")
    else:
        lines.append("Neither is ahead beyond the seed spread: at matched weight the flow and the "
                     "KL-regularised policy gradient land in the same place.")
    grpo = results["arms"].get("grpo_kl")
    if grpo and math.isclose(grpo["coef"], twin["coef"]):
        lines.append(f"GRPO with verl's KL at the same weight (grpo_kl): accuracy "
                     f"{grpo['accuracy']:.3f}, distinct valid {grpo['distinct_valid']:.1f}, "
                     f"grpo_kl − kl_pg {gap_text(gap(grpo, twin, 'distinct_valid'), 1)}.")
    return lines


def flow_part_lines(results):
    """What only the flow has: log Z training the trunk (the detached arm) and the clip share."""
    arms = results["arms"]
    lines = []
    if "flowrl" in arms and "flowrl_detached" in arms:
        cut = arms["flowrl_detached"]
        flow = arms["flowrl"]
        gaps = [gap(cut, flow, "accuracy"), gap(cut, flow, "distinct_valid")]
        lines.append(f"Log Z input detached (flowrl_detached − flowrl): accuracy "
                     f"{gap_text(gaps[0], 3)}; distinct valid {gap_text(gaps[1], 1)}.")
        if any(g.beyond and g.diff > 0 for g in gaps):
            lines.append("Only the flow trains the shared trunk through log Z's regression, and "
                         "cutting that path helps beyond the seed spread: a cost, not a gain.")
        elif any(g.beyond for g in gaps):
            lines.append("Only the flow trains the shared trunk through log Z's regression, and "
                         "cutting that path hurts beyond the seed spread: the coupling helps.")
        else:
            lines.append("Only the flow trains the shared trunk through log Z's regression; "
                         "cutting that path changes nothing beyond the seed spread.")
    shares = [f"{name} {row['clip_share']:.0%}" for name, row in arms.items()]
    lines.append("Gradient clipped at norm 1.0 on this share of optimizer steps: "
                 + ", ".join(shares) + ".")
    return lines


def frontier_lines(results):
    """At each β with a kl_pg point at 1/(β|y|): FlowRL − kl_pg, and who keeps more answers."""
    frontier = results["frontier"]
    twins = {round(p["coef"], 9): p for p in frontier.get("kl_pg", [])}
    lines = []
    n_more = 0
    n_beyond = 0
    for p in frontier.get("flowrl", []):
        twin = twins.get(round(1 / (p["coef"] * N_DIGITS), 9))
        if twin is None:
            continue
        dist = gap(p, twin, "distinct_valid")
        n_more += dist.diff > 0
        n_beyond += dist.beyond
        lines.append(f"Frontier β = {p['coef']:g} vs kl_pg {twin['coef']:.4g} "
                     f"(seeds: {len(p['per_seed'])}): accuracy {p['accuracy']:.3f} vs "
                     f"{twin['accuracy']:.3f}, {gap_text(gap(p, twin, 'accuracy'), 3)}; distinct "
                     f"{p['distinct_valid']:.1f} vs {twin['distinct_valid']:.1f}, "
                     f"{gap_text(dist, 1)}.")
    if lines:
        lines.append(f"FlowRL keeps more distinct valid answers than kl_pg at {n_more} of "
                     f"{len(lines)} matched weights, beyond the seed spread at {n_beyond}.")
    return lines


def evidence_lines(results):
    """The gate (no KL: does the toy collapse?), the ceiling p*, and the tiered task."""
    arms = results["arms"]
    ceiling = results["target"]["distinct_valid"]
    best = max(arms, key=lambda name: arms[name]["distinct_valid"])
    lines = [f"CEILING: p* keeps {ceiling:.1f} distinct valid answers of 512 samples (accuracy 1, "
             f"KL 0); the most diverse arm, {best}, keeps {arms[best]['distinct_valid']:.1f}."]
    if "grpo" in arms:
        kept = arms["grpo"]["distinct_valid"]
        verdict = "collapses" if kept < 0.1 * ceiling else "does not collapse"
        lines.append(f"GATE: GRPO at KL {arms['grpo']['coef']:g} keeps {kept:.1f} distinct valid "
                     f"answers: without a KL the toy {verdict}.")
    tiered = results["tiered"]
    ratios = [f"{name} {row['mass_ratio']:.2g}" for name, row in tiered["arms"].items()]
    if ratios:
        lines.append(f"Tiered task: P(r = 0.5)/P(r = 1) is {', '.join(ratios)} against "
                     f"{tiered['target']['mass_ratio']:.3f} for p* and "
                     f"{tiered['reward_proportional_ratio']:.3f} for a reward-proportional target.")
    return lines


def verdict_lines(results):
    """The verdict, computed from the numbers of the record."""
    lines = []
    if "flowrl" in results["arms"] and "kl_pg" in results["arms"]:
        lines += matched_lines(results)
    return lines + frontier_lines(results) + flow_part_lines(results) + evidence_lines(results)


def cell(row, key, digits):
    """mean ± std [worst seed]."""
    return (f"{row[key]:.{digits}f} ± {row['std'][key]:.{digits}f} "
            f"[{row['worst'][key]:.{digits}f}]")


def main_table(results):
    columns = [("accuracy", 3), ("pass_at_1", 3), ("distinct_valid", 1),
               ("effective_answers", 1), ("kl_to_target", 2), ("clip_share", 2)]
    lines = ["| arm | coef | " + " | ".join(c for c, _ in columns) + " | CPU s |",
             "|---" * (len(columns) + 3) + "|"]
    for name, row in results["arms"].items():
        cells = [cell(row, key, digits) for key, digits in columns]
        lines.append(f"| {name} | {row['coef']:.4g} | " + " | ".join(cells)
                     + f" | {row['cpu_time_s']:.1f} |")
    for name in ("target", "initial"):
        row = results[name]
        cells = [cell(row, key, digits) for key, digits in columns[:-1]]
        label = "target p* (ceiling)" if name == "target" else "initial π_ref"
        lines.append(f"| {label} | | " + " | ".join(cells) + " | | |")
    return lines


def frontier_table(results):
    header = ("| family | coef | accuracy | distinct valid | KL(p*‖π) | "
              "per seed: accuracy / distinct |")
    lines = [header, "|---|---|---|---|---|---|"]
    for family, points in results["frontier"].items():
        for p in points:
            seeds = ", ".join(f"{s['accuracy']:.3f} / {s['distinct_valid']:.1f}"
                              for s in p["per_seed"])
            lines.append(f"| {family} | {p['coef']:.4g} | {p['accuracy']:.3f} | "
                         f"{p['distinct_valid']:.1f} | {p['kl_to_target']:.2f} | {seeds} |")
    return lines


def render_report(results):
    """The markdown record, from results.json alone."""
    cfg = results["config"]
    prompts = len(results["n_valid"])
    lines = ["# FlowRL vs its KL twin kl_pg, GRPO and PPO on DigitSum", "",
             f"{cfg['steps']} steps × {prompts} prompts × G {cfg['group']} per training; exact "
             f"metrics over all 10,000 answers, mean over prompts; distinct valid and pass@1 from "
             f"{cfg['eval_samples']} samples per prompt. Seeds {results['seeds']}: mean ± std "
             f"[worst seed]. coef: β (flowrl), KL weight (kl_pg), KL coefficient (grpo).", "",
             "## Arms", ""] + main_table(results)
    lines += ["", "## Frontiers (coef = β for flowrl, KL weight for kl_pg and grpo)", ""]
    lines += frontier_table(results)
    lines += ["", "## Verdict", ""] + [f"- {line}" for line in verdict_lines(results)]
    lines += ["", f"Whole run: {results['wall_s']:.0f} s wall."]
    return "\n".join(lines) + "\n"


def run(cfg):
    start = time.time()
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 4), group=min(cfg.group, 4), d_model=8,
                                  hidden=16, eval_samples=min(cfg.eval_samples, 64), log_every=2,
                                  seeds=min(cfg.seeds, 2), frontier_seeds=1)
    device = pick_device(cfg.device)
    targets = load_targets(cfg.data, cfg.smoke)
    print(f"config: {dataclasses.asdict(cfg)}")
    print(f"prompts {targets}; N(s) {[n_valid(s) for s in targets]}; device {device}")
    jobs = plan(cfg, targets)
    print(f"{len(jobs)} trainings of {cfg.steps} steps")
    rows = run_jobs(run_job, list(jobs.values()), cfg.workers, device)
    results = collect(cfg, targets, dict(zip(jobs, rows)), device)
    results["verdict"] = "\n".join(verdict_lines(results))
    results["wall_s"] = time.time() - start
    print(render_report(results))
    write_record(cfg.out, "flowrl", results, plot(results))
    print(f"wrote {cfg.out}/results.json, results.md and flowrl.png")
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
    torch.manual_seed(seed)

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
