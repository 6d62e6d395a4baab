"""SSRL: Self-Search Reinforcement Learning — arXiv 2508.10874 (https://arxiv.org/abs/2508.10874)

An LLM can be its own search engine: in one generation it writes a query (<search>), the "retrieved" text itself
(<information>), thinks (<think>) and answers (<answer>). Self-Search: pass@k climbs with k (the knowledge is in
the weights but poorly elicited). SSRL: GRPO with an exact-match plus format reward sharpens it, information
tokens masked out of the loss. Sim-to-real: stop at </search>, paste a real search result, continue.
Toy: a synthetic knowledge base (person → city → country, person → employer); a small decoder pretrained on fact
lines (each repeated 1..max_rep times, so recall is imperfect) and on self-search trajectories of some people;
one-hop (city, employer) and two-hop (country via city) questions about held-out people (only fact lines).

Key equations (symbols as in the code):
    reward   r = 0.9 · EM(answer, gold) + 0.1 · f
    format   f = min(t/2, 1) · min(t, s+1) / max(t, s+1), t = #<think> blocks, s = #<search> blocks; f = 0 if
             #<information> ≠ s, t > 8, a block is empty, or the text does not start <think> and end </answer>
    GRPO     Â_i = (r_i − mean_G r) / (std_G r + 1e-6);  ρ_t = π_θ(y_t) / π_old(y_t)
             L = token-mean over m_t of max(−Â ρ_t, −Â clip(ρ_t, 1−ε, 1+ε)) + β · k3-KL(π_θ ‖ π_ref)
    mask     m_t = 1 on response tokens, 0 on every token of an <information>…</information> span (tags included)
    pass@k   = 1 − C(n−c, k) / C(n, k)  (unbiased, n samples of which c are correct)

Run: `python ssrl.py` (pretrain, pass@k, SSRL mask on and off, pass@k, sim-to-real, stale KB); `--steps 20`;
`--no-info-mask` (the ablation as the main arm); `--pack-facts 6 --fact-batch 28` (facts at many positions); `--smoke`.

Default run (2-core shared CPU, 1 thread, seed 0: 210 s CPU, 222 s wall; earlier runs gave the same values):
    held-out pass@k            1      2      4      8     16     32
    before_rl               0.319  0.439  0.550  0.657  0.759  0.840
    after_rl                0.328  0.456  0.572  0.674  0.770  0.860   (information mask on, as the paper)
    after_rl_info_mask_off  0.327  0.476  0.619  0.739  0.827  0.880   (the ablation)
    pass@1 on RL people 0.310 → 0.321 (mask on) / 0.383 (off); greedy recall of held-out facts 0.943 (T=1: 0.837);
    information fidelity 0.459 → 0.460; sim-to-real EM self-search 0.321, real lookup 0.851 (stale KB: 0.224, 0.845)
  pass@k climbs with k, but RL does not raise held-out pass@1 by 0.1 (+0.009). The model writes a true fact in its
  information block 46% of the time, though it recalls the bare fact line 84% of the time; with the mask on RL gets
  no gradient there, with it off it sharpens only the RL people's facts. Facts packed 1–6 to a sequence
  (`--pack-facts 6 --fact-batch 28 --no-info-mask`): mask-off held-out 0.304 → 0.366. RoPE in place of the learned
  position embedding (tried, not kept): mask on 0.276 → 0.269, off → 0.309, fidelity 0.419 though greedy recall is
  0.967; RoPE with packing: 0.270 → 0.279 (on), → 0.339 (off): context, more than position, limits it.

Deviations from the paper (and its official code):
- A 0.37M-parameter decoder on a synthetic knowledge base, not Llama/Qwen 3B–8B; templated questions, not NQ,
  HotpotQA, …; formatted trajectories of some people in pretraining instead of an instruction prompt.
- GRPO with one update per batch (π_old = π_θ: ρ = 1, the clip never fires), group 8, 24 questions × 25 steps
  (each RL question seen about once), lr 1e-4 (paper: group 5, lr 1e-6 on 3B–8B); no entropy bonus.
- Information masking by token ids (the official regex misses multi-line blocks).
- The "real search engine" is an exact knowledge-base lookup ("subject words relation"; else "no result").
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
import string
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
    """Pretrain a toy LM on a knowledge base, measure Self-Search pass@k, run SSRL (GRPO), measure again, sim-to-real."""

    steps: int = 25  # GRPO steps
    seed: int = 0  # random seed
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON lines with columns person, city, employer, country (a city's country: its first row); empty: synthetic
    out: str = "runs/ssrl"  # folder for results.json
    smoke: bool = False  # the same code path at a tiny size, in seconds
    log_every: int = 10  # RL steps between log lines
    n_people: int = 360  # synthetic people (two-token names a{i} b{j})
    n_cities: int = 24  # synthetic cities
    n_countries: int = 6  # synthetic countries
    n_employers: int = 16  # synthetic employers
    n_traj: int = 90  # people whose self-search trajectories are in pretraining
    n_heldout: int = 50  # held-out people: facts only, never in a trajectory or in RL
    max_rep: int = 4  # each fact line is repeated 1..max_rep times (uniform) in the pretraining pool
    pack_facts: int = 1  # fact lines per pretraining sequence: 1, or 1..N at random (facts at many positions)
    d_model: int = 96  # transformer width
    n_layer: int = 3  # transformer blocks
    n_head: int = 4  # attention heads
    pretrain_steps: int = 600  # next-token pretraining steps
    pretrain_lr: float = 3e-3  # AdamW peak learning rate for pretraining (cosine decay)
    fact_batch: int = 96  # fact lines per pretraining step
    traj_batch: int = 12  # trajectories per pretraining step
    prompts_per_step: int = 24  # RL questions per GRPO step
    group: int = 8  # samples per question (G)
    rl_lr: float = 1e-4  # AdamW learning rate for GRPO
    clip_eps: float = 0.2  # GRPO clip ε
    kl_coef: float = 0.001  # β, weight of the k3 KL to the reference model
    info_mask: bool = True  # mask information tokens out of the loss (--no-info-mask: the ablation)
    n_samples: int = 32  # samples per held-out question for pass@k, k = 1..n_samples
    max_new: int = 48  # longest response in tokens
    stale: bool = True  # also run sim-to-real after facts changed (the stale knowledge base)
    stale_frac: float = 0.5  # fraction of held-out people who move to another city in the stale knowledge base
    ablation: bool = True  # also run SSRL with the other --info-mask setting, from the same pretrained model

    def __post_init__(self):
        for name in ("log_every", "n_people", "n_cities", "n_countries", "n_employers", "n_traj", "n_heldout", "max_rep",
                     "pack_facts", "d_model", "n_layer", "n_head", "pretrain_steps", "fact_batch", "traj_batch", "prompts_per_step",
                     "n_samples", "max_new"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} {getattr(self, name)}: must be positive")
        require(self.group >= 2, f"--group {self.group}: GRPO needs at least 2 samples per question")
        require(self.d_model % self.n_head == 0, f"--d-model {self.d_model}: must be divisible by --n-head")
        require(self.pretrain_lr > 0 and self.rl_lr > 0 and self.clip_eps > 0 and self.kl_coef >= 0,
                "--pretrain-lr, --rl-lr, --clip-eps must be positive, --kl-coef non-negative")
        require(0 <= self.stale_frac <= 1, f"--stale-frac {self.stale_frac}: must be in [0, 1]")
        require(self.data or self.n_traj + self.n_heldout < self.n_people,
                "--n-traj + --n-heldout must leave people for RL (< --n-people)")


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

COLUMNS = ("person", "city", "employer", "country")
SPECIALS = ["<s>", "<pad>", "<think>", "</think>", "<search>", "</search>", "<information>", "</information>",
            "<answer>", "</answer>"]
RELATIONS = {"city": "lives in", "employer": "works at", "country": "is in"}  # fact line: "{subject} {verb} {object}"
FILLER = ["of", "?", "need", "done", "no", "result"] + [w for v in RELATIONS.values() for w in v.split()]


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


class Tokenizer:
    """tiktoken word encoding, remapped to the compact id range of the tokens the vocabulary can produce."""

    def __init__(self, words):
        self.enc = word_encoding(words, SPECIALS)
        raw = {t for w in words for s in (w, " " + w) for t in self.enc.encode(s)}
        raw |= {self.enc.encode_single_token(s) for s in SPECIALS}
        self.raw = sorted(raw)
        self.to_id = {r: i for i, r in enumerate(self.raw)}
        self.special = {s: self.to_id[self.enc.encode_single_token(s)] for s in SPECIALS}

    def encode(self, text):
        return [self.to_id[t] for t in self.enc.encode(text, allowed_special="all")]

    def decode(self, ids):
        return self.enc.decode([self.raw[i] for i in ids])


class KB:
    """The knowledge base: (subject, relation) → object; person → (city, employer); city → country."""

    def __init__(self, rows):
        self.facts = {}
        for r in rows:
            self.facts[(r["person"], "city")] = r["city"]
            self.facts[(r["person"], "employer")] = r["employer"]
            self.facts.setdefault((r["city"], "country"), r["country"])

    def gold(self, person, rel):
        """The answer to "rel of person ?"; country is two-hop: the country of the person's city."""
        return self.facts[(self.facts[(person, "city")], "country")] if rel == "country" else self.facts[(person, rel)]

    def search(self, query):
        """The "real" search engine: "subject words relation" → the fact line, or "no result"."""
        *subject, rel = query.split() or ["?"]
        obj = self.facts.get((" ".join(subject), rel))
        return "no result" if obj is None else f"{' '.join(subject)} {RELATIONS[rel]} {obj}"


def synthetic_rows(cfg, rng):
    """People a{i} b{j} (two-token names: copying one-token names into a query failed) with city and employer."""
    width = max(2, math.isqrt(cfg.n_people))
    country_of = [rng.randrange(cfg.n_countries) for _ in range(cfg.n_cities)]
    rows = []
    for p in range(cfg.n_people):
        c = rng.randrange(cfg.n_cities)
        rows.append({"person": f"a{p // width} b{p % width}", "city": f"c{c}",
                     "employer": f"e{rng.randrange(cfg.n_employers)}", "country": f"k{country_of[c]}"})
    return datasets.Dataset.from_list(rows)


def prompt_text(person, rel):
    return f"{rel} of {person} ?"


def trajectory_text(kb, person, rel):
    """The self-search format: think → search → information (→ think → search → information) → think → answer."""
    hop = "city" if rel == "country" else rel
    obj = kb.facts[(person, hop)]
    text = f"<think> need {hop}</think><search> {person} {hop}</search><information> {kb.search(f'{person} {hop}')}</information>"
    if rel == "country":
        city, obj = obj, kb.facts[(obj, "country")]
        text += f"<think> need country</think><search> {city} country</search><information> {kb.search(city + ' country')}</information>"
    return text + f"<think> done</think><answer> {obj}</answer>"


def pretraining_pool(kb, tok, traj_people, rng, max_rep, pack=1):
    """Fact lines of everyone, each repeated 1..max_rep times (pack > 1: 1..pack random lines to a sequence, so
    facts are also learned away from the start); full trajectories of traj_people only."""
    facts = []
    for (subj, rel), obj in sorted(kb.facts.items()):
        line = tok.encode(f"<s> {subj} {RELATIONS[rel]} {obj}")
        facts += [line] * rng.randint(1, max_rep)
    if pack > 1:
        facts = [facts[0][:1] + [t for _ in range(rng.randint(1, pack)) for t in rng.choice(facts)[1:]]
                 for _ in range(3 * len(facts))]
    trajs = [tok.encode("<s> " + prompt_text(p, r) + trajectory_text(kb, p, r))
             for p in traj_people for r in RELATIONS]
    return facts, trajs


def pad_batch(seqs, pad, device):
    """Right-pad lists of ids: (B, T) ids and (B, T) bool valid."""
    ids = torch.tensor([s + [pad] * (max(map(len, seqs)) - len(s)) for s in seqs], device=device)
    return ids, ids != pad


# --- model ---


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, attn_mask, cache, start):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        if cache is not None:  # write this step's keys/values at [start, start+T), attend to everything so far
            cache[0][:, :, start:start + T], cache[1][:, :, start:start + T] = k, v
            k, v = cache[0][:, :, :start + T].to(q.dtype), cache[1][:, :, :start + T].to(q.dtype)  # (B, nh, start+T, hs)
        causal = attn_mask is None and T > 1  # no mask: causal for a full sequence (or a prefill), none for one new token
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, d, n_layer, n_head, max_len):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.n_head = n_head
        for m in self.modules():  # GPT-2 init: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx, pos=None, attn_mask=None, cache=None, start=0):
        """idx, pos: (B, T); attn_mask: (B, 1, T, T_keys) bool or None (causal); cache: per-layer (k, v) buffers."""
        if pos is None:
            pos = torch.arange(idx.shape[1], device=idx.device)[None]
        x = self.tok(idx) + self.pos(pos)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if cache is None else cache[i], start)
        return self.ln_f(x) @ self.tok.weight.T  # (B, T, vocab), tied embeddings

    def new_cache(self, B, T, device):
        d = self.tok.weight.shape[1]
        shape = (B, self.n_head, T, d // self.n_head)
        return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in self.blocks]


def full_mask(valid):
    """(B, T) valid → (B, 1, T, T): causal, keys must be valid; the diagonal is always open (no empty rows)."""
    T = valid.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=valid.device))
    return ((causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device))[:, None]


def positions(valid):
    return (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, T): left padding does not shift positions


# --- the paper's method ---


def normalize_answer(s):
    """SQuAD normalisation: lower-case, drop punctuation, drop articles (a, an, the), squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred, gold):
    """EM = 1 if the normalised prediction equals the normalised gold answer, else 0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def extract_answer(text):
    """The text of the last <answer>…</answer> block, or None."""
    found = re.findall(r"<answer>(.*?)</answer>", text, re.S)
    return found[-1] if found else None


def format_reward(text):
    """f = min(t/2, 1) · min(t, s+1) / max(t, s+1); 0 for a malformed text (see the module docstring)."""
    text = text.strip()
    if not (text.startswith("<think>") and text.endswith("</answer>")):
        return 0.0
    blocks = {tag: re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S) for tag in ("think", "search", "information", "answer")}
    if any(not b.strip() for found in blocks.values() for b in found):
        return 0.0  # an empty block
    t, s = len(blocks["think"]), len(blocks["search"])
    if len(blocks["information"]) != s or t > 8:
        return 0.0
    return min(t / 2, 1.0) * min(t, s + 1) / max(t, s + 1)


def reward(text, gold):
    """r = 0.9 · EM + 0.1 · format."""
    pred = extract_answer(text)
    return 0.9 * (exact_match(pred, gold) if pred is not None else 0.0) + 0.1 * format_reward(text)


def pass_at_k(n, c, k):
    """Unbiased pass@k = 1 − C(n−c, k) / C(n, k): the chance that k of the n samples include a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def information_mask(token_ids, open_id, close_id):
    """(N, T) ids → (N, T) bool, True on every token of an <information>…</information> span, tags included.

    depth_t = #open in ids[:t+1] − #close in ids[:t]: the open tag already counts, the close tag not yet.
    """
    opens = (token_ids == open_id).long().cumsum(1)  # (N, T)
    closes_before = (token_ids == close_id).long().cumsum(1) - (token_ids == close_id).long()  # (N, T)
    return (opens - closes_before) > 0


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


# --- training and evaluation ---


@torch.no_grad()
def generate(model, prompts, max_new, tok, device, temperature=1.0, search=None):
    """Sample with a KV cache from prompts (lists of ids, left-padded here) → seq (B, Lp+T), valid (B, Lp+T), Lp.
    search: None (self-search), or query text → information text, forced into a row after each </search>."""
    B, Lp = len(prompts), max(len(p) for p in prompts)
    L, pad, stop = Lp + max_new, tok.special["<pad>"], tok.special["</answer>"]
    seq = torch.full((B, L), pad, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seq[i, Lp - len(p):Lp], valid[i, Lp - len(p):Lp] = torch.tensor(p, device=device), True
    cache = model.new_cache(B, L, device)
    padded = any(len(p) != Lp for p in prompts)  # left padding needs key masks; else plain causal attention
    with autocast(device):
        logits = model(seq[:, :Lp], positions(valid[:, :Lp]), full_mask(valid[:, :Lp]) if padded else None, cache, 0)[:, -1]
    n_valid = valid.sum(1)  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    forced = [[] for _ in range(B)]
    t = Lp
    for t in range(Lp, L):
        logits = logits.float()
        nxt = logits.argmax(-1) if temperature == 0 else torch.multinomial(F.softmax(logits / temperature, -1), 1)[:, 0]
        for i in [i for i in range(B) if forced[i]] if search is not None else []:
            nxt[i] = forced[i].pop(0)  # sim-to-real: the pasted information replaces what the model sampled
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)  # (B,)
        seq[:, t], valid[:, t] = nxt, ~done
        if search is not None:  # sim-to-real: a row that just closed a query gets the real search result next
            for i in (~done & (nxt == tok.special["</search>"])).nonzero()[:, 0].tolist():
                query = tok.decode(seq[i, Lp:t + 1].tolist()).rsplit("<search>", 1)[-1][:-len("</search>")]
                forced[i] = tok.encode(f"<information> {search(query)}</information>")
        done = done | (nxt == stop)
        if bool(done.all()) or t == L - 1:
            break
        with autocast(device):
            mask = valid[:, None, None, :t + 1] if padded else None  # (B, 1, 1, t+1); finished rows are ignored
            logits = model(seq[:, t:t + 1], n_valid[:, None], mask, cache, t)[:, -1]
        n_valid = n_valid + valid[:, t]
    return seq[:, :t + 1], valid[:, :t + 1], Lp


def response_logp(model, seq, valid, Lp, device):
    """log π(y_t) of the response tokens seq[:, Lp:]: (N, T)."""
    with autocast(device):
        padded = not bool(valid[:, :Lp].all())  # left padding needs key masks; pads after the answer do not
        logits = model(seq[:, :-1], positions(valid[:, :-1]), full_mask(valid[:, :-1]) if padded else None)  # (N, L-1, V)
    logp = F.log_softmax(logits.float()[:, Lp - 1:], -1)  # (N, T, V)
    return logp.gather(-1, seq[:, Lp:, None])[..., 0]  # (N, T)


def decode_responses(tok, seq, valid, Lp):
    return [tok.decode(s[v].tolist()) for s, v in zip(seq[:, Lp:].cpu(), valid[:, Lp:].cpu())]


def pretrain(model, facts, trajs, cfg, device, tok):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.98), weight_decay=0.0)
    pad, start, n_tok = tok.special["<pad>"], time.time(), 0
    for step in range(1, cfg.pretrain_steps + 1):
        # lr: 20 warm-up steps, then cosine to 10% of the peak
        lr = cfg.pretrain_lr * min(1.0, step / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * (step / cfg.pretrain_steps))))
        opt.param_groups[0]["lr"] = lr
        loss = 0.0
        for pool, size in ((facts, cfg.fact_batch), (trajs, cfg.traj_batch)):
            ids, valid = pad_batch([pool[random.randrange(len(pool))] for _ in range(size)], pad, device)
            with autocast(device):
                logits = model(ids[:, :-1])  # (B, T-1, V), causal
            # L = mean over real tokens of −log p(x_{t+1} | x_≤t)
            nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            loss = loss + (nll * valid[:, 1:]).sum() / valid[:, 1:].sum()
            n_tok += int(valid.sum())
        check_finite(step, pretrain_loss=loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, cfg.pretrain_steps // 5) == 0 or step == cfg.pretrain_steps:
            log_progress(step, cfg.pretrain_steps, start, pretrain_loss=loss.item(),
                         tok_per_s=n_tok / (time.time() - start))


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def parse_information(text):
    """Each <information> block as (subject, relation, object), or None when it is not a fact line."""
    out = []
    for block in re.findall(r"<information>(.*?)</information>", text, re.S):
        m = re.fullmatch(r"\s*(.+?) (lives in|works at|is in) (.+?)\s*", block)
        out.append(None if m is None else (m[1], {v: k for k, v in RELATIONS.items()}[m[2]], m[3]))
    return out


@torch.no_grad()
def evaluate(model, kb, questions, n, tok, device, max_new, search=None, chunk=2048):
    """n samples per (person, relation): pass@k, format rate, searches, information fidelity, consistency."""
    model.eval()
    correct, stats = [], {k: [] for k in ("format_rate", "searches_per_answer", "info_fidelity", "query_names_person",
                                          "answer_info_consistency", "true_info", "false_info")}
    flat = [(p, r) for p, r in questions for _ in range(n)]
    for lo in range(0, len(flat), chunk):
        part = flat[lo:lo + chunk]
        seq, valid, Lp = generate(model, [tok.encode("<s> " + prompt_text(p, r)) for p, r in part], max_new, tok, device,
                                  temperature=1.0, search=search)
        for (p, r), text in zip(part, decode_responses(tok, seq, valid, Lp)):
            pred, info = extract_answer(text), parse_information(text)
            ok = pred is not None and exact_match(pred, kb.gold(p, r)) == 1.0
            correct.append(ok)
            stats["format_rate"].append(format_reward(text) == 1.0)
            stats["searches_per_answer"].append(text.count("<search>"))
            if info:  # fidelity: the written facts that are true in the knowledge base
                true = [f is not None and kb.facts.get(f[:2]) == f[2] for f in info]
                stats["info_fidelity"] += true
                stats["true_info" if all(true) else "false_info"].append(ok)
                if pred is not None and info[-1] is not None:
                    stats["answer_info_consistency"].append(normalize_answer(pred) == normalize_answer(info[-1][2]))
            queries = re.findall(r"<search>(.*?)</search>", text, re.S)
            stats["query_names_person"].append(bool(queries) and queries[0].strip().startswith(p + " "))
    c = np.array(correct).reshape(len(questions), n).sum(1)  # (Q,) correct samples per question
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None  # None: nothing to average
    stats["all_info_true_rate"] = [1.0] * len(stats["true_info"]) + [0.0] * len(stats["false_info"])
    stats["p_correct_given_true_info"], stats["p_correct_given_false_info"] = stats.pop("true_info"), stats.pop("false_info")
    return {"pass_at_k": {str(k): mean([pass_at_k(n, ci, k) for ci in c]) for k in range(1, n + 1)},
            "pass1_by_relation": {r: mean([ci / n for (_, q), ci in zip(questions, c) if q == r]) for r in RELATIONS},
            **{name: mean(values) for name, values in stats.items()}}


@torch.no_grad()
def recall(model, kb, people, tok, device):
    """Fact recall after "<s> {subject} {verb}" over the people's facts: greedy (argmax = the object) and at
    temperature 1 (mean p(object)), i.e. the knowledge in the weights without the self-search format."""
    model.eval()
    keys = [(p, r) for p in people for r in ("city", "employer")]
    keys += sorted({(kb.facts[(p, "city")], "country") for p in people})
    prompts = [tok.encode(f"<s> {s} {RELATIONS[r]}") for s, r in keys]
    seq, valid, Lp = generate(model, prompts, 1, tok, device, temperature=0)  # left-padded prompts, one greedy token
    with autocast(device):
        logits = model(seq[:, :Lp], positions(valid[:, :Lp]), full_mask(valid[:, :Lp]))[:, -1]  # (K, V)
    target = torch.tensor([tok.encode(" " + kb.facts[k])[0] for k in keys], device=device)  # (K,)
    p = F.softmax(logits.float(), -1).gather(1, target[:, None])[:, 0]  # (K,)
    return float((seq[:, Lp] == target).float().mean()), float(p.mean())


def ssrl(model, ref, kb, rl_people, cfg, tok, device):
    """GRPO on self-search rollouts of questions about rl_people; each question seen about once."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.99), weight_decay=0.0)
    questions = [(p, r) for p in rl_people for r in RELATIONS]
    random.shuffle(questions)
    start, n_seen, history = time.time(), 0, []
    for step in range(1, cfg.steps + 1):
        batch = [questions[(n_seen + i) % len(questions)] for i in range(cfg.prompts_per_step)]
        n_seen += len(batch)
        model.eval()
        prompts = [tok.encode("<s> " + prompt_text(p, r)) for p, r in batch for _ in range(cfg.group)]
        seq, valid, Lp = generate(model, prompts, cfg.max_new, tok, device)  # (N, L), N = B·G
        texts = decode_responses(tok, seq, valid, Lp)
        golds = [kb.gold(p, r) for p, r in batch for _ in range(cfg.group)]
        r = torch.tensor([reward(t, g) for t, g in zip(texts, golds)], device=device).view(len(batch), cfg.group)
        adv = group_normalize(r).reshape(-1)  # (N,)
        resp = seq[:, Lp:]  # (N, T)
        mask = valid[:, Lp:].clone()
        if cfg.info_mask:  # m_t = 0 on information tokens
            mask &= ~information_mask(resp, tok.special["<information>"], tok.special["</information>"])
        model.train()
        with torch.no_grad():
            ref_logp = response_logp(ref, seq, valid, Lp, device)
        logp = response_logp(model, seq, valid, Lp, device)
        loss, terms = grpo_loss(logp, logp.detach(), ref_logp, mask.float(), adv, cfg.clip_eps, cfg.kl_coef)
        check_finite(step, loss=loss.item(), pg_loss=terms["pg_loss"], kl=terms["kl"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        em = float(np.mean([exact_match(extract_answer(t) or "", g) for t, g in zip(texts, golds)]))
        history.append({"step": step, "reward": float(r.mean()), "em": em, "kl": float(terms["kl"])})
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_progress(step, cfg.steps, start, loss=loss.item(), pg=float(terms["pg_loss"]), kl=float(terms["kl"]),
                         reward=float(r.mean()), em=em, samples_per_s=step * len(prompts) / (time.time() - start))
    return history


def sim_to_real(model, kb, questions, n, tok, device, max_new):
    """EM with self-written information vs with the real lookup pasted after each </search> (same model)."""
    own = evaluate(model, kb, questions, n, tok, device, max_new)
    real = evaluate(model, kb, questions, n, tok, device, max_new, search=kb.search)
    keys = ("info_fidelity", "all_info_true_rate", "p_correct_given_true_info", "p_correct_given_false_info")
    return {"em_self": own["pass_at_k"]["1"], "em_real": real["pass_at_k"]["1"], **{k + "_self": own[k] for k in keys},
            "query_names_person_real": real["query_names_person"]}


def stale_kb(rows, kb, people, frac, seed):
    """The world after pretraining: a fraction of `people` moved to another city (cities keep their country)."""
    moved = set(random.Random(seed).sample(people, int(round(frac * len(people)))))
    cities = sorted({r["city"] for r in rows})
    new = [dict(r, city=random.Random(r["person"]).choice([c for c in cities if c != r["city"]]))
           if r["person"] in moved else dict(r) for r in rows]
    new = [dict(r, country=kb.facts[(r["city"], "country")]) for r in new]
    return KB(new), len(moved)


def run(cfg):
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 2), n_people=40, n_traj=12, n_heldout=8, d_model=32,
                                  n_layer=1, n_head=2, pretrain_steps=10, fact_batch=16, traj_batch=4,
                                  prompts_per_step=4, group=2, n_samples=4, n_cities=6, n_employers=4, max_new=20)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    t0, c0 = time.time(), time.process_time()
    log(f"config: {dataclasses.asdict(cfg)}")
    rows = load_user_data(cfg.data, COLUMNS) if cfg.data else synthetic_rows(cfg, random.Random(cfg.seed))
    rows = [{c: str(row[c]).strip() for c in COLUMNS} for row in rows]
    kb = KB(rows)
    people = list(dict.fromkeys(r["person"] for r in rows))  # shuffled: trajectories | held out | RL
    require(cfg.n_traj + cfg.n_heldout < len(people), f"--data {cfg.data}: needs more than --n-traj + --n-heldout people")
    random.Random(cfg.seed + 1).shuffle(people)
    traj_people, heldout = people[:cfg.n_traj], people[cfg.n_traj:cfg.n_traj + cfg.n_heldout]
    rl_people = people[cfg.n_traj + cfg.n_heldout:]
    tok = Tokenizer(sorted({w for r in rows for c in COLUMNS for w in r[c].split()} | set(FILLER) | set(RELATIONS)))
    facts, trajs = pretraining_pool(kb, tok, traj_people, random.Random(cfg.seed + 2), cfg.max_rep, cfg.pack_facts)
    model = GPT(len(tok.raw), cfg.d_model, cfg.n_layer, cfg.n_head, 192).to(device)
    log(f"{len(people)} people: {len(traj_people)} with trajectories, {len(rl_people)} for RL, {len(heldout)} held out; "
        f"{len(facts)} fact lines, {len(trajs)} trajectories; vocab {len(tok.raw)}; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    log("== pretraining")
    pretrain(model, facts, trajs, cfg, device, tok)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    held_q = [(p, r) for p in heldout for r in RELATIONS]
    rl_slice = rl_people[:len(heldout)]  # a same-size slice of the RL people
    n_small = max(2, cfg.n_samples // 4)

    def measure(name, m):
        out = evaluate(m, kb, held_q, cfg.n_samples, tok, device, cfg.max_new)
        out["pass1_rl_people"] = evaluate(m, kb, [(p, r) for p in rl_slice for r in RELATIONS], n_small, tok, device,
                                          cfg.max_new)["pass_at_k"]["1"]
        out["greedy_recall_heldout"], out["sampled_recall_heldout"] = recall(m, kb, heldout, tok, device)
        out["greedy_recall_rl_people"], out["sampled_recall_rl_people"] = recall(m, kb, rl_slice, tok, device)
        keys = ("pass1_rl_people", "greedy_recall_heldout", "sampled_recall_heldout", "format_rate", "info_fidelity")
        log(f"{name}: held-out pass@1 {fmt(out['pass_at_k']['1'])} | " + " | ".join(f"{k} {fmt(out[k])}" for k in keys))
        return out

    arms, histories = {"before_rl": measure("before RL", model)}, {}
    masks = [cfg.info_mask] + ([not cfg.info_mask] if cfg.ablation else [])
    for i, info_mask in enumerate(masks):  # the main arm, then the ablation from the same pretrained model
        name = "after_rl" if i == 0 else f"after_rl_info_mask_{'on' if info_mask else 'off'}"
        policy = model if i == 0 else copy.deepcopy(ref).requires_grad_(True)
        log(f"== SSRL ({name}): GRPO, {cfg.steps} steps x {cfg.prompts_per_step} questions x {cfg.group} samples, "
            f"information mask {'on' if info_mask else 'off'}")
        set_seed(cfg.seed + 10)  # both arms see the same question order and sampling noise at the start
        histories[name] = ssrl(policy, ref, kb, rl_people, dataclasses.replace(cfg, info_mask=info_mask), tok, device)
        arms[name] = measure(name, policy)

    log("== sim-to-real: the true knowledge-base lookup pasted after each </search> (after-RL model)")
    arms["sim2real"] = sim_to_real(model, kb, held_q, n_small, tok, device, cfg.max_new)
    if cfg.stale:  # the world changed after pretraining
        kb2, n_moved = stale_kb(rows, kb, heldout, cfg.stale_frac, cfg.seed + 3)
        arms["sim2real_stale"] = dict(sim_to_real(model, kb2, held_q, n_small, tok, device, cfg.max_new), moved_people=n_moved)
    for name in ("sim2real", "sim2real_stale")[:1 + cfg.stale]:
        log(f"{name}: " + ", ".join(f"{k} {fmt(v)}" for k, v in arms[name].items()))
    results = {"config": dataclasses.asdict(cfg), "arms": arms, "rl_history": histories,
               "cpu_time_s": time.process_time() - c0, "wall_time_s": time.time() - t0}
    ks = [k for k in arms["before_rl"]["pass_at_k"] if k in ("1", "2", "4", "8", "16", "32")]
    log("\nheld-out pass@k      " + "".join(f"{k:>7}" for k in ks))
    for name in [a for a in arms if a.startswith(("before", "after"))]:
        log(f"{name:<22}" + "".join(f"{arms[name]['pass_at_k'][k]:7.3f}" for k in ks))
    log(f"cpu time {results['cpu_time_s']:.0f}s, wall {results['wall_time_s']:.0f}s")
    save_json(os.path.join(cfg.out, "results.json"), results)
    return results


def main(argv=None):
    return run_cli(Config, run, argv)


if __name__ == "__main__":
    main()
