"""FlowRL: Matching Reward Distributions for LLM Reasoning — arXiv 2509.15207 (https://arxiv.org/abs/2509.15207)

Reward maximisers (PPO, GRPO) push all probability onto the few answers they found first. FlowRL instead
fits the policy to a reward-shaped target distribution, π(y|x) ∝ π_ref(y|x) · exp(β·|y|·r̂(x, y)), with a
trajectory-balance loss and a learned partition function log Z_φ(x). Answers of equal reward keep the
reference policy's ratios, so the policy keeps many correct answers instead of one. The baselines (GRPO,
PPO, REINFORCE) are the reward-maximising methods of the RL-for-reasoning survey (arXiv 2509.08827).

Key equations (symbols as in the code; y has |y| tokens; r̂ = group-normalised reward):
    r̂      = (r − mean_G r) / (std_G r + 1e-6)                                   group_normalize
    δ(x,y)  = log_z + (1/|y|) Σ_t logp_t − β·r̂ − (1/|y|) Σ_t ref_logp_t              flowrl_loss
    w       = clip(exp(Σ_t [logp_t − old_logp_t]), 1 − ε, 1 + ε).detach()            (ε = 0.2)
    L_FlowRL = mean_i w_i · δ_i²
    GRPO:   ρ_t = exp(logp_t − old_logp_t);  ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1±ε)) + c_KL·k3_t, token mean
    PPO:    A = GAE(γ=1, λ) of the final reward with a value head, whitened; same clipped surrogate
            + ½·max((V − R)², (V_old + clip(V − V_old, ±0.5) − R)²)
The task (DigitSum): prompt "s=" with s in 10…25, answer exactly 4 digits, reward 1 if they sum to s.
The policy over the 10,000 answers factorises, so one batched forward over the 1,000 three-digit
prefixes gives π exactly: accuracy, effective answers and KL(p* ‖ π) are exact, not sampled, where
p* = π_ref renormalised on the valid answers (the β → ∞ limit of FlowRL's target).

Run:
    python flowrl.py                    # FlowRL vs GRPO vs GRPO+KL vs PPO, same init, same rollouts
    python flowrl.py --steps 200        # shorter training
    python flowrl.py --sweep            # FlowRL β ∈ {1,2,5,15}, GRPO KL ∈ {0.001,0.01,0.1}
    python flowrl.py --beta 15          # the paper's β
    python flowrl.py --task tiered      # valid answers with an even first digit pay 1.0, others 0.5
    python flowrl.py --smoke            # the same code path at a tiny size, in seconds (the tests run this)

Result of the default run (2-core CPU shared with other jobs, 1 thread; 230 s CPU time in total):
    arm             accuracy  pass@1  distinct valid  effective answers  KL(p*‖π)  KL(π‖p*)  CPU s
    flowrl (β = 1)    0.9685  0.9688           168.4              177.7     3.171     1.097   57.5
    grpo (KL 0.001)   0.9990  0.9995             2.7                1.6    41.09      5.851   53.9
    grpo_kl (KL 0.1)  0.8887  0.8914            90.8               54.6     3.760     2.275   53.7
    ppo               0.9370  0.9373             1.3                1.1    46.12      6.132   53.5
    target p*         1       1                318.9              517.5     0         0
    initial π_ref     0.0518  0.0536            26.8              517.5     2.992     0
    (accuracy, effective answers and KLs exact over all 10,000 answers; distinct valid and pass@1 from
    512 samples per prompt; mean over the 16 prompts; 700 steps × 256 rollouts per arm)

Deviations from the paper (and its official code, Xuekai-Zhu/FlowRL, verl recipe/flowrl):
- Scale: a 126k-parameter byte-level GRU (one layer, hidden 128) instead of a 7B transformer, and a 4-digit
  answer instead of a long chain of thought. The output layer covers the 10 digit tokens only, so every
  answer has |y| = 4 and the 10,000 answers can be enumerated for exact evaluation.
- β: the default is 1, chosen by `--sweep` (table in the README), not the paper's 15 (`--beta 15`). On
  average the FlowRL gradient is a policy gradient on β·r̂ plus a pull of (1/|y|)·(log π − log π_ref)
  towards π_ref, so β sets how hard the reward pushes against that anchor. At β ≥ 5 the push wins early,
  the policy concentrates on the first answers it finds, every group becomes all-correct (r̂ = 0), and the
  loss then only equalises the log-ratios of answers that are still sampled: valid answers that are no
  longer sampled get no gradient, and the collapse stays (measured: β = 5 and 15 end like GRPO).
- Importance weight: the paper's clip(w, 1 − ε, 1 + ε), ε = 0.2, by default; `--official-clamp` gives the
  official code's later clamp(w, max = 10). (verl's recipe picks one by FLOWRL_LOSS_VARIANT: unclipped by
  default, clip(w, 0.8, 1.28), or clamp(max = 10) with truncated importance sampling.)
  The weight only matters off-policy: each rollout batch is split into 2 minibatches (`--minibatches`), so
  the second optimizer step sees slightly stale samples, as with verl's ppo_mini_batch_size.
- log Z head: the official 3-layer MLP (Linear → GELU → LayerNorm → Dropout 0.1, twice, then Linear) on the
  mean of the GRU's hidden states over the prompt positions, input not detached, same Adam optimizer and
  learning rate (`--z-lr-mult 1`, the official choice).
- Optimiser: Adam, lr 3e-3, gradient norm clipped at 1.0, no warm-up or schedule, the same for every arm.
- PPO: the value head shares the GRU trunk (verl trains a separate critic), value-loss weight 0.5, no KL
  penalty in the reward (verl's default `use_kl_in_reward = False`); γ = 1, λ = 1.
- GRPO: verl's k3 KL as a loss term, 0.001 (`grpo`, verl's default) or 0.1 (`grpo_kl`); token-mean.
- Evaluation: pass@1 and distinct valid answers come from 512 samples per prompt drawn from the exact
  distribution (the same law as autoregressive sampling, far cheaper); accuracy, effective answers and
  both KLs are exact sums over the 10,000 answers.
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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken
import datasets

# --- config ---

ARMS = ("flowrl", "grpo", "grpo_kl", "ppo", "reinforce")


@dataclasses.dataclass
class Config:
    """FlowRL vs GRPO, GRPO+KL and PPO on DigitSum from the same initial model; prints one comparison table."""

    steps: int = 700  # training steps per arm (one rollout batch each)
    seed: int = 0  # random seed
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON-lines with column 'target' (int 0..36: one prompt per row); empty: targets 10..25
    out: str = "runs/flowrl"  # folder for results.json
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 50  # steps between log lines
    algo: str = "flowrl,grpo,grpo_kl,ppo"  # comma-separated arms: flowrl, grpo, grpo_kl, ppo, reinforce
    task: str = "digitsum"  # digitsum (reward 1 if the 4 digits sum to s) or tiered (1.0 even first digit, 0.5 odd)
    group: int = 16  # G: samples per prompt per step
    lr: float = 3e-3  # Adam learning rate of the policy
    beta: float = 1.0  # FlowRL β (paper: 15; the toy's default comes from --sweep, see Deviations)
    clip_eps: float = 0.2  # ε of the clipped importance weight / clipped surrogate
    official_clamp: bool = False  # FlowRL weight clamp(w, max=10) as the official code, not the paper's clip(w, 1±ε)
    z_lr_mult: float = 1.0  # learning-rate multiplier of the log Z head (official: 1, shared optimizer)
    kl_coef: float = 0.001  # KL coefficient of the 'grpo' arm (verl default)
    kl_coef_strong: float = 0.1  # KL coefficient of the 'grpo_kl' arm
    lam: float = 1.0  # PPO's GAE λ (γ = 1); verl default 1.0
    minibatches: int = 2  # optimizer steps per rollout batch (later ones are off-policy: the clip acts)
    d_model: int = 64  # token embedding width
    hidden: int = 128  # GRU hidden size
    eval_samples: int = 512  # samples per prompt for the distinct-valid-answers count
    sweep: bool = False  # run the β and KL sweep instead of the default arms
    plot: bool = False  # with --sweep: save sweep.png in --out (needs matplotlib)

    def __post_init__(self):
        require(self.log_every > 0, f"--log-every {self.log_every}: must be positive")
        bad = [a for a in self.algo.split(",") if a not in ARMS]
        require(self.algo and not bad, f"--algo {self.algo}: unknown arm {bad}; choose from {', '.join(ARMS)}")
        require(self.task in ("digitsum", "tiered"), f"--task {self.task}: choose digitsum or tiered")
        require(self.group >= 2, f"--group {self.group}: need at least 2 samples per prompt")
        require(self.lr > 0 and self.z_lr_mult > 0, "--lr and --z-lr-mult must be positive")
        require(self.beta >= 0, f"--beta {self.beta}: must be ≥ 0")
        require(0 < self.clip_eps < 1, f"--clip-eps {self.clip_eps}: must be in (0, 1)")
        require(self.kl_coef >= 0 and self.kl_coef_strong >= 0, "--kl-coef values must be ≥ 0")
        require(0 <= self.lam <= 1, f"--lam {self.lam}: must be in [0, 1]")
        require(self.minibatches > 0, f"--minibatches {self.minibatches}: must be positive")
        require(self.d_model > 0 and self.hidden > 0, "--d-model and --hidden must be positive")
        require(self.eval_samples > 0, f"--eval-samples {self.eval_samples}: must be positive")


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

# byte-level offline tiktoken encoding; an answer digit d is the byte token ord("0") + d
ENC = tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                        special_tokens={})
DIGIT0 = ord("0")
N_DIGITS = 4  # every answer is exactly 4 digits: |y| = 4
ALL_ANSWERS = torch.tensor([[a // 1000, a // 100 % 10, a // 10 % 10, a % 10] for a in range(10_000)])  # (10000, 4)


def load_targets(cfg):
    """The prompts: targets s (default 10..25); --data FILE gives one 'target' per JSON line."""
    if not cfg.data:
        return list(range(10, 26)) if not cfg.smoke else [10, 14, 18, 22]
    rows = load_user_data(cfg.data, ["target"])
    targets = list(rows["target"])
    for s in targets:
        require(isinstance(s, int) and 0 <= s <= 36, f"--data {cfg.data}: target {s!r} is not an int in 0..36")
    return targets


def encode_prompts(targets):
    """"s=" with s in two digits → (P, 3) token ids."""
    return torch.tensor([ENC.encode(f"{s:02d}=") for s in targets])


def reward_fn(answers, targets, task):
    """answers (N, 4) digits, targets (N,) → reward (N,): 1 if the digits sum to s (tiered: 0.5 if first digit odd)."""
    valid = (answers.sum(-1) == targets).float()  # (N,)
    if task == "tiered":
        return valid * torch.where(answers[:, 0] % 2 == 0, 1.0, 0.5)
    return valid


def n_valid(s):
    """N(s): how many 4-digit answers sum to s (brute count over all 10,000)."""
    return int((ALL_ANSWERS.sum(-1) == s).sum())


# --- model ---


class LogZHead(nn.Module):
    """Official proj_z: (Linear → GELU → LayerNorm → Dropout 0.1) × 2, then Linear to a scalar."""

    def __init__(self, d, n_layers=3, dropout=0.1):
        super().__init__()
        layers = []
        for _ in range(n_layers - 1):
            layers += [nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers, nn.Linear(d, 1))

    def forward(self, h):
        return self.net(h).squeeze(-1)  # (N, d) → (N,)


class Policy(nn.Module):
    """A byte-level GRU language model; heads: the 10 digit logits, a value (PPO), log Z (FlowRL)."""

    def __init__(self, d=64, hidden=128):
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.rnn = nn.GRU(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)  # logits over the digit tokens "0".."9": an answer is 4 digits by construction
        self.value = nn.Linear(hidden, 1)
        self.log_z = LogZHead(hidden)
        nn.init.normal_(self.head.weight, std=0.01)  # small output weights: π_ref starts close to uniform
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, state=None):
        h, state = self.rnn(self.tok(idx), state)  # (N, T, H): last-layer hidden states; state (1, N, H)
        return h, state


def score(model, prompts, answers):
    """Teacher-forced pass over prompt + answer[:-1]: per-token log π, values, log Z and the full log-softmax."""
    P = prompts.shape[1]
    x = torch.cat([prompts, DIGIT0 + answers[:, :-1]], dim=1)  # (N, P + 3)
    h, _ = model(x)  # (N, P + 3, H)
    h_ans = h[:, P - 1:]  # (N, 4, H): the state before each answer token
    logp_all = F.log_softmax(model.head(h_ans).float(), dim=-1)  # (N, 4, 10)
    logp = logp_all.gather(-1, answers[..., None]).squeeze(-1)  # (N, 4)
    values = model.value(h_ans).squeeze(-1).float()  # (N, 4)
    log_z = model.log_z(h[:, :P].mean(dim=1)).float()  # (N,): MLP on the mean prompt hidden state
    return logp, values, log_z, logp_all


@torch.no_grad()
def sample(model, prompts):
    """Autoregressive sampling of 4 digits (the GRU state is the cache); also π_old's log-probs and values."""
    h, state = model(prompts)  # (N, P, H)
    h, tokens, logps, values = h[:, -1], [], [], []
    for t in range(N_DIGITS):
        logp_all = F.log_softmax(model.head(h).float(), dim=-1)  # (N, 10)
        d = torch.multinomial(logp_all.exp(), 1)  # (N, 1)
        tokens.append(d)
        logps.append(logp_all.gather(-1, d))
        values.append(model.value(h).float())
        if t < N_DIGITS - 1:
            h, state = model(DIGIT0 + d, state)  # one new token: (N, 1, H)
            h = h[:, -1]
    return torch.cat(tokens, 1), torch.cat(logps, 1), torch.cat(values, 1)  # (N, 4) each


# --- the paper's method ---


def group_normalize(rewards):
    """r̂ = (r − mean_G r) / (std_G r + 1e-6), within each group of G samples of one prompt (unbiased std)."""
    # rewards: (B, G) → (B, G); a group whose rewards are all equal gets r̂ = 0
    mean = rewards.mean(dim=1, keepdim=True)  # (B, 1)
    std = rewards.std(dim=1, keepdim=True)  # (B, 1)
    return (rewards - mean) / (std + 1e-6)


def grpo_loss(logp, old_logp, ref_logp, mask, adv, clip_eps=0.2, kl_coef=0.001):
    """GRPO (arXiv 2402.03300, as verl runs it): token-mean clipped surrogate plus k3 KL to the reference.

    logp, old_logp, ref_logp, mask: (N, T) over response tokens; adv: (N,) group-normalised reward Â.
    """
    # ρ_t = exp(log π_θ(y_t) − log π_old(y_t))
    ratio = torch.exp(logp - old_logp)  # (N, T)
    a = adv[:, None]  # (N, 1): Â_i is broadcast to every token of response i
    # ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1 − ε, 1 + ε))
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_eps, 1 + clip_eps))  # (N, T)
    # k3 estimator of KL(π_θ ‖ π_ref): exp(ref − logp) − (ref − logp) − 1
    log_r = ref_logp - logp  # (N, T)
    kl = torch.exp(log_r) - log_r - 1  # (N, T)
    # token-mean: average over every response token of the batch
    n_tokens = mask.sum().clamp(min=1)
    pg_loss = (pg * mask).sum() / n_tokens
    kl_loss = (kl * mask).sum() / n_tokens
    clip_frac = ((ratio - 1).abs() > clip_eps).float().mul(mask).sum() / n_tokens
    loss = pg_loss + kl_coef * kl_loss
    return loss, {"pg_loss": pg_loss.detach(), "kl": kl_loss.detach(), "clip_frac": clip_frac.detach()}


def flowrl_loss(logp, ref_logp, old_logp, mask, log_z, reward, beta=15.0, clip_eps=0.2, w_max=None):
    """FlowRL (arXiv 2509.15207, Eq. 7): importance-weighted trajectory balance with 1/|y| normalisation.

    logp, ref_logp, old_logp, mask: (N, T) over response tokens; log_z: (N,) = log Z_φ(x); reward: (N,) = r̂.
    w_max=None: the paper's clip(w, 1 − ε, 1 + ε); w_max=10: the official code's clamp(w, max=10).
    """
    n_tok = mask.sum(dim=1).clamp(min=1)  # (N,): |y|
    # (1/|y|) Σ_t log π_θ(y_t | x, y_<t)  and  (1/|y|) Σ_t log π_ref(y_t | x, y_<t)
    avg_logp = (logp * mask).sum(dim=1) / n_tok  # (N,)
    avg_ref = (ref_logp * mask).sum(dim=1) / n_tok  # (N,)
    # δ = log Z_φ(x) + (1/|y|) log π_θ(y|x) − β r̂(x, y) − (1/|y|) log π_ref(y|x)
    delta = log_z + avg_logp - beta * reward - avg_ref  # (N,)
    # w = clip(Π_t π_θ/π_old, 1 − ε, 1 + ε), detached: the token SUM of log-ratios (the trajectory ratio)
    log_w = ((logp - old_logp) * mask).sum(dim=1).detach()  # (N,)
    w_raw = log_w.exp()  # (N,)
    w = w_raw.clamp(max=w_max) if w_max is not None else w_raw.clamp(1 - clip_eps, 1 + clip_eps)  # (N,)
    # L = mean_i w_i δ_i²
    loss = (w * delta.pow(2)).mean()
    clipped = (w != w_raw).float().mean()
    return loss, {"delta2": delta.detach().pow(2).mean(), "log_z": log_z.detach().mean(), "w": w.mean(), "w_clip_frac": clipped}


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation, vectorised over time with a discount matrix.

    rewards, values, mask: (N, T), right-padded; V after the last token is 0. → (advantages, returns), (N, T).
    """
    T = rewards.shape[1]
    v = values * mask  # (N, T)
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # (N, T): V(s_{t+1}), 0 past the end
    # δ_t = r_t + γ V(s_{t+1}) − V(s_t)
    deltas = (rewards + gamma * next_v - v) * mask  # (N, T)
    # A_t = Σ_{k ≥ t} (γλ)^{k−t} δ_k  as  A = δ Dᵀ with D[t, k] = (γλ)^{k−t} for k ≥ t
    k = torch.arange(T, device=rewards.device)
    power = (k[None, :] - k[:, None]).clamp(min=0).to(rewards.dtype)  # (T, T)
    D = torch.where(k[None, :] >= k[:, None], (gamma * lam) ** power, torch.zeros_like(power))  # (T, T)
    adv = (deltas @ D.T) * mask  # (N, T)
    return adv, (adv + v) * mask


def ppo_loss(logp, old_logp, mask, adv, values, old_values, returns, clip_eps=0.2, value_clip=0.5, vf_coef=0.5):
    """PPO (as verl): token-mean clipped surrogate with per-token advantages + clipped value loss.

    All arguments (N, T); adv already whitened.
    """
    n_tokens = mask.sum().clamp(min=1)
    # ρ_t = exp(log π_θ − log π_old);  ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))
    ratio = torch.exp(logp - old_logp)  # (N, T)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))  # (N, T)
    pg_loss = (pg * mask).sum() / n_tokens
    # ℓ_V = ½ max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)
    v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)  # (N, T)
    vf = 0.5 * torch.maximum((values - returns).pow(2), (v_clipped - returns).pow(2))  # (N, T)
    vf_loss = (vf * mask).sum() / n_tokens
    loss = pg_loss + vf_coef * vf_loss
    return loss, {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach()}


def reinforce_loss(logp, mask, adv):
    """REINFORCE with the group-mean baseline: −mean_i A_i Σ_t log π(y_t), A_i = r_i − mean_G r.  adv: (N,)."""
    loss = -(adv * (logp * mask).sum(dim=1)).mean()
    return loss, {"pg_loss": loss.detach()}


def whiten(x, mask):
    """(x − mean) / (std + 1e-8) over the masked entries of the batch."""
    mean = (x * mask).sum() / mask.sum()
    var = ((x - mean).pow(2) * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) / (var.sqrt() + 1e-8) * mask

# --- training and evaluation ---


def make_optimizer(model, cfg):
    """Adam; the log Z head gets its own learning rate (lr × z_lr_mult)."""
    z_params = list(model.log_z.parameters())
    z_ids = {id(p) for p in z_params}
    rest = [p for p in model.parameters() if id(p) not in z_ids]
    return torch.optim.Adam([{"params": rest}, {"params": z_params, "lr": cfg.lr * cfg.z_lr_mult}], lr=cfg.lr)


def train_arm(name, algo, cfg, init_state, ref, targets, device, beta, kl_coef):
    """Train one arm from the shared initial weights on steps × P × G rollouts; return its exact metrics."""
    set_seed(cfg.seed + 1)  # every arm starts from the same random stream, whatever the order of arms
    model = Policy(cfg.d_model, cfg.hidden).to(device)
    model.load_state_dict(init_state)
    opt = make_optimizer(model, cfg)
    B, G = len(targets), cfg.group
    N = B * G
    tgt = torch.tensor(targets, device=device).repeat_interleave(G)  # (N,)
    prompts = encode_prompts(targets).to(device).repeat_interleave(G, dim=0)  # (N, 3)
    mask = torch.ones(N, N_DIGITS, device=device)  # (N, 4): every answer has exactly 4 tokens
    w_max = 10.0 if cfg.official_clamp else None
    log(f"--- {name}: {algo}, β {beta}, KL {kl_coef}, {cfg.steps} steps × {B} prompts × G {G}")
    t0, c0 = time.time(), time.process_time()
    for step in range(1, cfg.steps + 1):
        model.train()
        answers, old_logp, old_values = sample(model, prompts)  # (N, 4) each: π_old = the sampling policy
        r = reward_fn(answers, tgt, cfg.task)  # (N,)
        r_hat = group_normalize(r.view(B, G)).view(-1)  # (N,)
        with torch.no_grad():
            ref_logp = score(ref, prompts, answers)[0]  # (N, 4)
        if algo == "ppo":  # reward on the last token, GAE with γ = 1, advantages whitened over the batch
            rewards = F.pad(r[:, None], (N_DIGITS - 1, 0))  # (N, 4)
            adv, returns = gae(rewards, old_values, mask, 1.0, cfg.lam)
            adv = whiten(adv, mask)
        if algo == "reinforce":
            adv_rf = (r.view(B, G) - r.view(B, G).mean(dim=1, keepdim=True)).view(-1)  # (N,)
        for idx in torch.randperm(N, device=device).chunk(cfg.minibatches):
            with autocast(device):
                logp, values, log_z, _ = score(model, prompts[idx], answers[idx])  # (n, 4), (n, 4), (n,)
            m = mask[idx]
            if algo == "flowrl":
                loss, stats = flowrl_loss(logp, ref_logp[idx], old_logp[idx], m, log_z, r_hat[idx], beta, cfg.clip_eps, w_max)
            elif algo in ("grpo", "grpo_kl"):
                loss, stats = grpo_loss(logp, old_logp[idx], ref_logp[idx], m, r_hat[idx], cfg.clip_eps, kl_coef)
            elif algo == "ppo":
                loss, stats = ppo_loss(logp, old_logp[idx], m, adv[idx], values, old_values[idx], returns[idx], cfg.clip_eps)
            else:
                loss, stats = reinforce_loss(logp, m, adv_rf[idx])
            check_finite(step, loss=loss.detach(), **stats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_progress(step, cfg.steps, t0, loss=loss.item(), reward=r.mean().item(),
                         **{k: float(v) for k, v in stats.items()}, samples_per_s=step * N / (time.time() - t0))
    wall, cpu = time.time() - t0, time.process_time() - c0
    model.eval()
    out = evaluate(exact_logprobs(model, targets, device), cfg, targets, device)
    return {**out, "wall_time_s": wall, "cpu_time_s": cpu, "samples_per_s": cfg.steps * N / wall}


@torch.no_grad()
def exact_logprobs(model, targets, device):
    """log π(y | s) for all 10,000 answers of every prompt → (P, 10000), from ONE batched forward
    over the 1,000 three-digit prefixes per prompt: log π(d1 d2 d3 d4) = Σ_{t<4} log π(d_t | ·) + log π(d4 | d1 d2 d3)."""
    P = len(targets)
    prefixes = ALL_ANSWERS[::10].to(device)  # (1000, 4): d4 = 0, only d1 d2 d3 are fed
    prompts = encode_prompts(targets).to(device).repeat_interleave(1000, dim=0)  # (P·1000, 3)
    answers = prefixes.repeat(P, 1)  # (P·1000, 4)
    _, _, _, logp_all = score(model, prompts, answers)  # (P·1000, 4, 10)
    prefix_lp = logp_all[:, :3].gather(-1, answers[:, :3, None]).squeeze(-1).sum(-1)  # (P·1000,)
    return (prefix_lp[:, None] + logp_all[:, 3]).view(P, 10_000).double()  # (P, 10000), answer a = 10·prefix + d4


def renormalise_valid(logpi, valid):
    """log of π restricted to the valid answers and renormalised; −inf elsewhere.  (P, 10000)."""
    lv = logpi.masked_fill(~valid, -math.inf)
    return lv - torch.logsumexp(lv, dim=1, keepdim=True)


def evaluate(logpi, cfg, targets, device, ref_logpi=None):
    """Exact metrics of the distribution logpi (P, 10000) against p* = π_ref renormalised on the valid answers."""
    ref_logpi = EVAL_REF["logpi"] if ref_logpi is None else ref_logpi
    answers = ALL_ANSWERS.to(device)
    tgt = torch.tensor(targets, device=device)
    valid = answers.sum(-1)[None, :] == tgt[:, None]  # (P, 10000)
    log_star = renormalise_valid(ref_logpi, valid)  # (P, 10000): log p*
    log_pv = renormalise_valid(logpi, valid)  # (P, 10000): log π(· | valid)
    pi, p_star, pv = logpi.exp(), log_star.exp(), log_pv.exp()
    zero = torch.zeros_like(logpi)
    accuracy = (pi * valid).sum(1)  # (P,)
    entropy_v = -torch.where(valid, pv * log_pv, zero).sum(1)  # (P,)
    kl_to = torch.where(valid, p_star * (log_star - logpi), zero).sum(1)  # KL(p* ‖ π), (P,)
    kl_from = torch.where(valid, pv * (log_pv - log_star), zero).sum(1)  # KL(π|valid ‖ p*), (P,)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 7)  # the same sampling stream for every arm
    samples = torch.multinomial(pi.float(), cfg.eval_samples, replacement=True, generator=gen)  # (P, S)
    hit = torch.zeros_like(pi).scatter_(1, samples, 1.0)  # (P, 10000): answer seen at least once
    out = {"accuracy": accuracy.mean().item(),
           "pass_at_1": valid.gather(1, samples).float().mean().item(),
           "distinct_valid": (hit * valid).sum(1).mean().item(),
           "effective_answers": entropy_v.exp().mean().item(),
           "kl_to_target": kl_to.mean().item(),
           "kl_from_target": kl_from.mean().item()}
    if cfg.task == "tiered":  # P(r = 0.5) / P(r = 1) of π, beside the target's
        full = answers[None, :, 0] % 2 == 0  # (1, 10000): even first digit pays 1.0
        out["mass_ratio_half_to_full"] = ((pi * (valid & ~full)).sum(1) / (pi * (valid & full)).sum(1)).mean().item()
    return out


EVAL_REF = {}  # the reference policy's exact log-probs, set by run()


def print_table(rows):
    cols = ["accuracy", "pass_at_1", "distinct_valid", "effective_answers", "kl_to_target", "kl_from_target"]
    if any("mass_ratio_half_to_full" in r for r in rows.values()):
        cols.append("mass_ratio_half_to_full")
    log(f"{'arm':<16}" + "".join(f"{c:>18}" for c in cols) + f"{'cpu_time_s':>12}")
    for name, r in rows.items():
        log(f"{name:<16}" + "".join(f"{r[c]:>18.4g}" for c in cols) + f"{r.get('cpu_time_s', float('nan')):>12.1f}")


def arm_specs(cfg):
    """(name, algo, β, KL coefficient) for every arm to train."""
    if cfg.sweep:
        return ([(f"flowrl_beta{b:g}", "flowrl", b, 0.0) for b in (1, 2, 5, 15)]
                + [(f"grpo_kl{c:g}", "grpo", 0.0, c) for c in (0.001, 0.01, 0.1)])
    kl = {"grpo": cfg.kl_coef, "grpo_kl": cfg.kl_coef_strong}
    return [(a, a, cfg.beta, kl.get(a, 0.0)) for a in cfg.algo.split(",")]


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 4), group=min(cfg.group, 4), d_model=16, hidden=32,
                                  eval_samples=min(cfg.eval_samples, 64), log_every=2)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    targets = load_targets(cfg)
    log(f"config: {dataclasses.asdict(cfg)}")
    ref = Policy(cfg.d_model, cfg.hidden).to(device)  # π_ref = the initial model, frozen
    init_state = copy.deepcopy(ref.state_dict())
    ref.eval().requires_grad_(False)
    log(f"policy: {sum(p.numel() for p in ref.parameters()):,} parameters; device {device}; "
        f"prompts {targets}; N(s) {[n_valid(s) for s in targets]}")
    EVAL_REF["logpi"] = exact_logprobs(ref, targets, device)
    valid = ALL_ANSWERS.to(device).sum(-1)[None, :] == torch.tensor(targets, device=device)[:, None]
    rows = {"target": evaluate(renormalise_valid(EVAL_REF["logpi"], valid), cfg, targets, device),
            "initial": evaluate(EVAL_REF["logpi"], cfg, targets, device)}
    arms = {}
    for name, algo, beta, kl in arm_specs(cfg):
        arms[name] = {"algo": algo, "beta": beta, "kl_coef": kl,
                      **train_arm(name, algo, cfg, init_state, ref, targets, device, beta, kl)}
    log(f"\nexact evaluation over all 10,000 answers, mean over {len(targets)} prompts "
        f"({cfg.eval_samples} samples per prompt for pass@1 and distinct_valid):")
    print_table({**arms, **rows})
    results = {"config": dataclasses.asdict(cfg), "arms": arms, "target": rows["target"], "initial": rows["initial"],
               "n_valid": {str(s): n_valid(s) for s in targets}}
    save_json(os.path.join(cfg.out, "results.json"), results)
    if cfg.sweep and cfg.plot:
        plot_sweep(arms, rows["target"], os.path.join(cfg.out, "sweep.png"))
    return results


def plot_sweep(arms, target, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot: matplotlib is not installed; no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in arms.items():
        ax.scatter(r["distinct_valid"], r["accuracy"], marker="o" if r["algo"] == "flowrl" else "s")
        ax.annotate(name, (r["distinct_valid"], r["accuracy"]), fontsize=7)
    ax.axvline(target["distinct_valid"], ls="--", c="gray", label="target p*")
    ax.set(xlabel="distinct valid answers (of 512 samples)", ylabel="accuracy (π-mass on valid)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot: {path}")


def main(argv=None):
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main()
