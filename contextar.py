"""ContextAR: multi-conditional autoregressive image generation, judged by a knowledge checklist.

ContextAR: arXiv 2505.12274 (https://arxiv.org/abs/2505.12274). The checklist score: WorldGenBench,
arXiv 2505.01490 (https://arxiv.org/abs/2505.01490).

One AR transformer reads [text][condition block]...[condition block][image] and predicts the image
tokens. Each condition (edges E, a depth-like layer map D, keypoints K) is a grid of tokens from ONE
shared vocabulary, the size of the image. Any subset, in any order, even one never trained on, works
because (1) every block and the image share 2-D RoPE positions (token j at (j // W, j % W)), text
gets the identity rotation, and a learnable type embedding tells the blocks apart; (2) blocks do not
see each other, are bidirectional inside, and the image sees the text, every present block and its
own past; (3) training samples random condition subsets and drops all conditions and the text now
and then (CFG). WorldGenBench scores an image by yes/no checklist items, many implied by world
knowledge; here a pixel-rule judge, and toy-world rules the text implies (night => moon).
The test: training sees single maps and the pairs E+D, D+K, never E+K or E+D+K. D alone pins the
layout, so 96 needs-both scenes (two bars) are drawn where, by enumeration, neither E nor K alone
can and E+K can; a seed's margin is its unseen E+K fidelity minus the best single-map ceiling.
Binding colours to objects comes first: seen pairs >= 0.9, and a binding probe logged in training.

Key equations (symbols as in the code):
    angle(cell (r, c), pair i) = r f_i (i < n/2) or c f_(i-n/2) (i >= n/2),
        f_i = rope_base^(-i/(n/2)); text: angle 0 (the identity rotation)
    => q_j . k_m depends on (r_j - r_m, c_j - c_m) only: a condition token and the image token of
       its cell meet at offset 0 whatever the number and order of blocks
    mask[i, m] = 1 iff m is text, or i and m share a block,
                   or i is image and (m is a block or m <= i)
    h_0 = tok_emb(x) + type_emb(block type) [condition tokens];  text_emb(slot j, word) [text]
    loss = - mean_j log p(x_j | text, conditions, x_<j)   (image tokens; bits/token = loss / ln 2)
    CFG: l = l_uncond + s (l_cond - l_uncond);   checklist score = satisfied items / all items

Run:
    python contextar.py              # 4 model seeds on both cores: 8 combos, ceilings, needs-both
    python contextar.py --seed 4 --seeds 4 --out results/contextar/seeds4to7   # 4 more seeds
    python contextar.py --ablate     # + no type embedding, 1-D RoPE, plain causal mask
    python contextar.py --smoke      # the same code path at a tiny size, in seconds

Headline (results/contextar/results.md: 4 model seeds, data seed 0, 1,200 steps): every seed binds
colours (seen pairs 0.995 ± 0.006 [worst 0.987]) and composes: unseen E+K on the 96 needs-both
scenes 0.940 ± 0.039 [0.893] vs the best single-map ceiling 0.823 (K), margin +0.118 ± 0.039
[+0.071]. Seeds 4-7 (results/contextar/seeds4to7/results.md) do worse: 5 and 6 bind too late, 4
binds but fails to compose (margin -0.036); over the 8 seeds the margin is +0.044 ± 0.106 [-0.167].

Deviations from the paper (no official code was found):
- Toy data: 8x8 drawn scenes, one token per cell (8 colours), not VQ tokens of MultiGen-20M images;
  conditions come from the scene's layout, not from canny / depth / pose detectors. A 3-layer
  width-64 decoder trained from scratch, not a retrained LlamaGen-XL.
- Text: six words of a closed vocabulary, one learned vector per (slot, word), standing in for the
  FLAN-T5 features LlamaGen reads, which carry each word's role (a word embedding plus a position
  embedding leaves "object 2 -> the second colour" to a two-hop circuit that often never forms).
- Half of each head's dimensions rotate (rotary_frac 0.5, as GPT-NeoX's rotary_pct): text keys are
  unrotated, and with every pair rotated a query's score against a text token depends on its cell.
- Image slot j holds x_(j-1) (a start token at j = 0) but sits at cell j, the cell it predicts.
- One condition subset per batch (round-robin, no padding); CFG dropout per sample hides the blocks
  from the image and swaps the text for a null token. The dense boolean mask saves no FLOPs.
- The checklist judge is a set of pixel rules, not a vision-language model.
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
import typing

import datasets
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure


@dataclasses.dataclass
class Config:
    """Train ContextAR on toy scenes; evaluate seen and unseen condition combos."""

    steps: int = 1200  # training steps per seed (and per arm)
    seed: int = 0  # first model seed; the run trains seeds seed .. seed + seeds - 1
    data_seed: int = 0  # seed of the training, test and needs-both scenes (fixed across seeds)
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda or mps
    data: str = ""  # JSON lines with prompt and layout (see load_scenes); empty: built-in scenes
    out: str = "runs/contextar"  # folder for results.json, results.md and contextar.png
    smoke: bool = False  # the same code path at a tiny size, in seconds
    workers: int = 0  # worker processes of one thread each (0: one per core; 1 on a GPU)
    log_every: int = 100  # steps between log lines
    probe_every: int = 50  # steps between readings of the binding probe
    seeds: int = 4  # model seeds to train and evaluate (two rounds of jobs on two cores)
    batch: int = 16  # scenes per training step
    width: int = 64  # model width
    layers: int = 3  # transformer layers
    heads: int = 4  # attention heads
    lr: float = 3e-3  # peak AdamW learning rate
    warmup: int = 80  # linear warm-up steps, then cosine decay to a tenth
    rope_base: float = 10.0  # 2-D RoPE frequencies base^(-i/n): a small base suits an 8-cell axis
    rope_base_1d: float = 10000.0  # base of the 1-D RoPE ablation, suited to a ~262-token sequence
    rotary_frac: float = 0.5  # share of each head's dims that rotate; the rest see content only
    p_uncond: float = 0.1  # probability of dropping all conditions and the text of a sample (CFG)
    cfg_scale: float = 1.0  # classifier-free guidance scale s at sampling (1 = no guidance)
    temperature: float = 1.0  # sampling temperature for every evaluated sample
    n_train: int = 8192  # scenes in the training pool
    n_eval: int = 96  # test scenes (all kinds) per condition combo
    n_needs_both: int = 96  # test scenes that need both E and K (two bars), drawn apart
    samples_per_scene: int = 2  # samples per needs-both scene and combo (T = temperature)
    p_bar: float = 0.5  # probability that a drawn object is a bar (before rejecting bad layouts)
    ablate: bool = False  # also train no-type-embedding, 1-D RoPE and plain causal arms

    def __post_init__(self):
        positive = ("log_every", "probe_every", "seeds", "batch", "width", "layers", "heads",
                    "n_train", "n_eval", "n_needs_both", "samples_per_scene")
        for name in positive:
            value = getattr(self, name)
            require(value > 0, f"--{name.replace('_', '-')} {value}: must be positive")
        require(self.warmup >= 0, f"--warmup {self.warmup}: must be >= 0")
        require(self.workers >= 0, f"--workers {self.workers}: must be >= 0")
        require(self.width % (4 * self.heads) == 0,
                f"--width {self.width}: must be a multiple of 4 * heads")
        require(self.lr > 0, f"--lr {self.lr}: must be positive")
        require(self.rope_base > 1, f"--rope-base {self.rope_base}: must be > 1")
        require(self.rope_base_1d > 1, f"--rope-base-1d {self.rope_base_1d}: must be > 1")
        rotary_dims = self.rotary_frac * self.width / self.heads
        require(0 < self.rotary_frac <= 1 and rotary_dims == int(rotary_dims)
                and rotary_dims % 4 == 0,
                f"--rotary-frac {self.rotary_frac}: must make the rotary dims of a head a "
                f"positive multiple of 4")
        require(0 <= self.p_uncond < 1, f"--p-uncond {self.p_uncond}: must be in [0, 1)")
        require(0 <= self.p_bar <= 1, f"--p-bar {self.p_bar}: must be in [0, 1]")
        require(self.cfg_scale >= 0, f"--cfg-scale {self.cfg_scale}: must be >= 0")
        require(self.temperature >= 0,
                f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")


# --- the paper's method ---


def build_attention_mask(block_types, block_len, text_len):
    """Conditional context-aware mask for [text][block 1]..[block N][image], (S, S), True = may
    attend: text -> text; block b -> text and block b (both ways); image i -> text, every block,
    image m <= i. Blocks never see each other, so a block's states do not depend on the others."""
    n = len(block_types)
    S = text_len + (n + 1) * block_len
    blocks = torch.arange(n + 1).repeat_interleave(block_len)  # n = the image
    segment = torch.cat([torch.full((text_len,), -1), blocks])  # (S,) -1 = text
    q = segment[:, None]  # (S, 1) the query's segment
    k = segment[None, :]  # (1, S) the key's segment
    idx = torch.arange(S)
    mask = k == -1  # every token sees the text
    mask = mask | ((q == k) & (q < n))  # a block sees itself, bidirectionally
    mask = mask | ((q == n) & (k >= 0) & (k < n))  # the image sees every condition block
    mask = mask | ((q == n) & (k == n) & (idx[None, :] <= idx[:, None]))  # image: causal
    return mask  # (S, S)


def rope_2d(rows, cols, is_text, head_dim, base):
    """2-D RoPE tables cos, sin (S, head_dim / 2): the first half of the rotary pairs turns with
    the token's row, the second half with its column; text tokens get the identity rotation.
    angle(r, c, pair i) = r f_i (i < n/2), c f_(i - n/2) (i >= n/2), f_i = base^(-i / (n/2)),
    so q_j . k_m depends only on (r_j - r_m, c_j - c_m): every block meets the image at offset 0."""
    if rows.dim() != 1 or rows.shape != cols.shape or rows.shape != is_text.shape:
        raise ValueError(f"rows, cols, is_text must be (S,): {rows.shape} {cols.shape} "
                         f"{is_text.shape}")
    if head_dim % 4 != 0:
        raise ValueError(f"head_dim {head_dim}: must be a multiple of 4 (two axes, pairs)")
    n = head_dim // 2  # rotary pairs
    freqs = base ** (-torch.arange(n // 2, dtype=torch.float32) / (n // 2))  # (n/2,)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], 1)  # (S, n)
    angles = torch.where(is_text[:, None], torch.zeros_like(angles), angles)  # text: angle 0
    return angles.cos(), angles.sin()


def rope_1d(S, head_dim, base):
    """Plain sequence RoPE (the ablation): cos, sin (S, head_dim / 2), angle(j, i) = j f_i,
    f_i = base^(-i/n)."""
    n = head_dim // 2
    freqs = base ** (-torch.arange(n, dtype=torch.float32) / n)  # (n,)
    angles = torch.arange(S, dtype=torch.float32)[:, None] * freqs  # (S, n)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the pairs (x_i, x_(i+n)) by their token's angle. x (..., T, 2n), cos/sin (T, n)."""
    if cos.shape != sin.shape or x.shape[-2:] != (cos.shape[0], 2 * cos.shape[1]):
        raise ValueError(f"x {tuple(x.shape)} does not fit cos/sin {tuple(cos.shape)}")
    x1, x2 = x.chunk(2, -1)  # each (..., T, n)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def type_embedding(type_ids, table):
    """The learnable condition-type embedding, added to every token of a condition block so that
    blocks sharing one vocabulary can be told apart. type_ids (T,) with 0 = no condition (text,
    image: adds nothing), 1 + i = type i; table (1 + n_types, d) -> (T, d)."""
    if type_ids.dim() != 1 or table.dim() != 2:
        raise ValueError(f"type_ids must be (T,), table (n, d): {type_ids.shape} {table.shape}")
    is_condition = (type_ids > 0).to(table.dtype)  # (T,)
    return table[type_ids] * is_condition[:, None]  # (T, d)


def cfg_dropout_mask(mask, drop, text_len, n_image):
    """Classifier-free guidance training: for the samples with drop = True the image queries lose
    sight of every condition block (their text is swapped for the null token by the caller).
    mask (S, S), drop (B,) bool -> (B, 1, S, S), one mask per sample (broadcast over heads)."""
    if mask.dim() != 2 or drop.dim() != 1:
        raise ValueError(f"mask must be (S, S), drop (B,): {mask.shape} {drop.shape}")
    S = mask.shape[0]
    pos = torch.arange(S, device=mask.device)
    image_query = (pos >= S - n_image)[None, :, None]  # (1, S, 1)
    cond_key = ((pos >= text_len) & (pos < S - n_image))[None, None, :]  # (1, 1, S)
    hidden = drop[:, None, None] & image_query & cond_key  # (B, S, S)
    return (mask[None] & ~hidden)[:, None]  # (B, 1, S, S)


def cfg_logits(cond, uncond, scale):
    """Classifier-free guidance: l = l_uncond + s (l_cond - l_uncond); s = 1 gives l_cond."""
    if cond.shape != uncond.shape:
        raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ")
    return uncond + scale * (cond - uncond)


# --- data ---

W = 8  # the image is W x W cells, one token each; every condition block is a W x W grid too
CELLS = W * W
TEXT_LEN = 6  # time, season, colour 1, shape 1, colour 2, shape 2 (object 2 is drawn over object 1)
TIMES = ("day", "night")
SEASONS = ("winter", "summer")
COLOURS = ("red", "blue", "green")
SHAPES = ("square", "plus", "bar")
WORDS = TIMES + SEASONS + COLOURS + SHAPES
SKY_DAY = 0  # palette ids
SKY_NIGHT = 1
MOON = 2
SNOW = 3
SOIL = 4
FIRST_COLOUR = 5  # colour k of COLOURS is palette id FIRST_COLOUR + k
N_COLOURS = 8
RGB = [(135, 206, 235), (20, 24, 82), (250, 230, 90), (245, 245, 245), (140, 90, 40),
       (220, 40, 40), (40, 80, 220), (40, 170, 60)]
COND_TYPES = ("E", "D", "K")  # edges, layer order ("depth"), keypoints: one shared vocabulary 0..2
SQUARE_CELLS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
SHAPE_CELLS = {("square", 0): SQUARE_CELLS,
               ("plus", 0): [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)],
               ("bar", 0): [(0, -1), (0, 0), (0, 1)],
               ("bar", 1): [(-1, 0), (0, 0), (1, 0)]}
OBJ_ROWS = (2, 6)  # objects in rows 2..6: the moon (rows 0..1) and the ground (row 7) stay clear
def encode_prompt(prompt):
    """Six words -> six text ids: a closed word vocabulary, one token per word."""
    words = prompt.split()
    require(len(words) == TEXT_LEN and all(w in WORDS for w in words),
            f"prompt {prompt!r}: need {TEXT_LEN} words from {WORDS}")
    kinds = (TIMES, SEASONS, COLOURS, SHAPES, COLOURS, SHAPES)
    require(all(w in kind for w, kind in zip(words, kinds)) and words[2] != words[4],
            f"prompt {prompt!r}: want time season colour shape colour shape, two colours")
    return [WORDS.index(w) for w in words]


def place(shape, r, c, vertical, rows=(0, W - 1)):
    """The cells of a shape centred at (r, c), or None if one leaves rows[0]..rows[1] or W."""
    offsets = SHAPE_CELLS[(shape, int(vertical) if shape == "bar" else 0)]
    cells = [(r + dr, c + dc) for dr, dc in offsets]
    inside = all(rows[0] <= rr <= rows[1] and 0 <= cc < W for rr, cc in cells)
    return cells if inside else None


def edges_of(labels):
    """Edge maps (N, W, W) of label maps (N, W, W), the E condition (canny-like): a foreground
    cell with a 4-neighbour of another label (outside the grid counts as label 0)."""
    padded = F.pad(labels, (1, 1, 1, 1))  # (N, W + 2, W + 2)
    differs = torch.zeros_like(labels)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = padded[:, 1 + dr:1 + dr + W, 1 + dc:1 + dc + W]  # (N, W, W)
        differs = differs + (neighbour != labels).long()
    return (labels > 0) & (differs > 0)


def layer_map(shapes, layout):
    """The layer map (W, W) of two shapes at [(row, col, vertical)] x 2: 1 = the back object, 2 =
    the front one (drawn over it). None if invalid: a cell outside the object rows or the grid,
    one centre on the other, or the back object's centre hidden (its keypoint must be visible)."""
    cells = [place(s, r, c, v, OBJ_ROWS) for s, (r, c, v) in zip(shapes, layout)]
    centres = [(r, c) for r, c, _ in layout]
    if None in cells or centres[0] == centres[1] or centres[0] in cells[1]:
        return None
    layers = np.zeros((W, W), np.int64)
    for k in range(2):
        for rc in cells[k]:
            layers[rc] = k + 1
    return layers


def render(words, layout, moon):
    """A scene -> (image, layer map, object centres), or None if the layout is invalid."""
    time_, season, c1, s1, c2, s2 = words
    layers = layer_map((s1, s2), layout)
    if layers is None:
        return None
    img = np.full((W, W), SKY_NIGHT if time_ == "night" else SKY_DAY)
    img[W - 1] = SNOW if season == "winter" else SOIL
    if time_ == "night":
        img[moon] = MOON
    img[layers == 1] = FIRST_COLOUR + COLOURS.index(c1)
    img[layers == 2] = FIRST_COLOUR + COLOURS.index(c2)
    return img, layers, [(r, c) for r, c, _ in layout]


def random_scene(rng, p_bar):
    """Prompt, and a scene with a valid layout (centre row, column, vertical?) and a moon cell.
    Each object is a bar with probability p_bar (square and plus share the rest): two bars are
    the scenes where neither the edges nor the keypoints alone pin the layout."""
    shape_probs = [(1 - p_bar) / 2, (1 - p_bar) / 2, p_bar]  # square, plus, bar
    while True:
        c1, c2 = rng.choice(COLOURS, 2, replace=False)
        s1 = rng.choice(SHAPES, p=shape_probs)
        s2 = rng.choice(SHAPES, p=shape_probs)
        words = (str(rng.choice(TIMES)), str(rng.choice(SEASONS)), str(c1), str(s1), str(c2),
                 str(s2))
        layout = [(int(rng.integers(OBJ_ROWS[0], OBJ_ROWS[1] + 1)), int(rng.integers(W)),
                   int(rng.integers(2))) for _ in range(2)]
        moon = (int(rng.integers(2)), int(rng.integers(W)))  # rows 0..1: 16 cells
        scene = render(words, layout, moon)
        if scene is not None:
            return " ".join(words), scene


def condition_maps(layers, keys):
    """The three conditions of layer maps (N, W, W) with centre cells keys (N, 2), in the shared
    vocabulary, (N, 3, 64): E 1 on edges; D 1 on the back object, 2 on the front one; K a labelled
    mark per centre (1 back, 2 front), like pose joints."""
    n = layers.shape[0]
    marks = torch.tensor([[1, 2]]).expand(n, 2)  # (N, 2)
    kmap = torch.zeros(n, CELLS, dtype=torch.long).scatter_(1, keys, marks)  # (N, 64)
    return torch.stack([edges_of(layers).long().flatten(1), layers.flatten(1), kmap], 1)


def make_dataset(pairs):
    """(prompt, scene) pairs -> text (N, 6), image (N, 64), conditions (N, 3, 64) in the shared
    vocabulary, keys (N, 2) (the centre cells, back object then front), prompts."""
    prompts = [p for p, _ in pairs]
    scenes = [s for _, s in pairs]
    layers = torch.from_numpy(np.stack([s[1] for s in scenes]))  # (N, 8, 8)
    keys = torch.tensor([[r * W + c for r, c in s[2]] for s in scenes])  # (N, 2)
    cond = condition_maps(layers, keys)  # (N, 3, 64)
    image = torch.tensor(np.stack([s[0].reshape(-1) for s in scenes]))  # (N, 64)
    text = torch.tensor([encode_prompt(p) for p in prompts])  # (N, 6)
    return {"text": text, "image": image, "cond": cond, "keys": keys, "prompts": prompts}


def load_scenes(cfg, rng):
    """(train, test) dicts: fresh random scenes, or the --data rows split 80/20 (moon drawn)."""
    if not cfg.data:
        pairs = [random_scene(rng, cfg.p_bar) for _ in range(cfg.n_train + cfg.n_eval)]
        return make_dataset(pairs[:cfg.n_train]), make_dataset(pairs[cfg.n_train:])
    pairs = []
    for i, row in enumerate(load_user_data(cfg.data, ["prompt", "layout"])):
        lay = row["layout"]
        ok = isinstance(lay, list) and len(lay) == 2
        ok = ok and all(isinstance(o, list) and len(o) == 3 for o in lay)
        words = tuple(WORDS[t] for t in encode_prompt(row["prompt"]))
        moon = (int(rng.integers(2)), int(rng.integers(W)))
        scene = render(words, [tuple(map(int, o)) for o in lay], moon) if ok else None
        require(scene is not None, f"--data {cfg.data}, row {i + 1}: layout {lay} is not valid")
        pairs.append((row["prompt"], scene))
    require(len(pairs) >= 2, f"--data {cfg.data}: need at least 2 rows")
    cut = max(1, int(0.8 * len(pairs)))
    return make_dataset(pairs[:cut]), make_dataset(pairs[cut:])



# --- model ---

NULL_TEXT = len(WORDS)  # the text token of a dropped prompt (CFG)
N_TEXT_IDS = NULL_TEXT + 1  # the words and the null token
COND_OFF = N_TEXT_IDS  # condition value v -> token COND_OFF + v (one vocabulary for E, D, K)
IMG_OFF = COND_OFF + 3  # colour x -> token IMG_OFF + x
SOI = IMG_OFF + N_COLOURS  # start-of-image token in image slot 0
VOCAB = SOI + 1


class Layout(typing.NamedTuple):
    """Everything position-like about one sequence [text][blocks of a combo][image] (S tokens)."""
    cos: torch.Tensor  # (S, head_dim / 2) rotary cosines
    sin: torch.Tensor  # (S, head_dim / 2) rotary sines
    types: torch.Tensor  # (S,) 0 = text or image, 1 + i = condition type COND_TYPES[i]
    text_pos: torch.Tensor  # (S,) 1..6 on the text, 0 elsewhere
    mask: torch.Tensor  # (S, S) bool, True = may attend
    S: int


def make_layout(combo, rope, mask_kind, head_dim, rotary_dims, base, device):
    """The Layout of [text][blocks of combo][image]; rope '2d' | '1d', mask 'context' | 'causal'.
    The first rotary_dims / 2 pairs of a head rotate; the others keep angle 0 (cos 1, sin 0)."""
    n = len(combo)
    S = TEXT_LEN + (n + 1) * CELLS
    cell = torch.arange(CELLS)
    no_text_pos = torch.zeros(TEXT_LEN, dtype=torch.long)
    rows = torch.cat([no_text_pos, (cell // W).repeat(n + 1)])  # (S,)
    cols = torch.cat([no_text_pos, (cell % W).repeat(n + 1)])  # (S,)
    if rope == "2d":
        is_text = torch.arange(S) < TEXT_LEN  # (S,)
        cos, sin = rope_2d(rows.float(), cols.float(), is_text, rotary_dims, base)
    else:  # the ablation: plain sequence RoPE, the pairs turn with the token's index
        cos, sin = rope_1d(S, rotary_dims, base)
    still = (head_dim - rotary_dims) // 2  # pairs that do not rotate
    cos = torch.cat([cos, torch.ones(S, still)], 1)  # (S, head_dim / 2)
    sin = torch.cat([sin, torch.zeros(S, still)], 1)  # (S, head_dim / 2)
    type_blocks = [torch.full((CELLS,), 1 + COND_TYPES.index(t)) for t in combo]
    types = torch.cat([no_text_pos] + type_blocks + [torch.zeros(CELLS, dtype=torch.long)])  # (S,)
    not_text = torch.zeros(S - TEXT_LEN, dtype=torch.long)
    text_pos = torch.cat([torch.arange(1, TEXT_LEN + 1), not_text])  # (S,)
    if mask_kind == "context":
        mask = build_attention_mask(combo, CELLS, TEXT_LEN)
    else:
        mask = torch.ones(S, S, dtype=torch.bool).tril()
    return Layout(cos.to(device), sin.to(device), types.to(device), text_pos.to(device),
                  mask.to(device), S)


def build_tokens(text, cond, image, combo):
    """[text][blocks][SOI, x_0 .. x_62]: image slot j holds x_(j-1) and sits at cell j. (B, S)."""
    blocks = [COND_OFF + cond[:, COND_TYPES.index(t)] for t in combo]  # each (B, 64)
    start = torch.full_like(image[:, :1], SOI)  # (B, 1)
    shifted = torch.cat([start, IMG_OFF + image[:, :-1]], 1)  # (B, 64)
    return torch.cat([text] + blocks + [shifted], 1)  # (B, S)


@dataclasses.dataclass
class KVCache:
    """One layer's keys and values so far, each (B, n_head, T_past, hs); empty before prefill."""
    k: typing.Optional[torch.Tensor] = None
    v: typing.Optional[torch.Tensor] = None

    def append(self, k, v):
        """Add this step's keys and values (B, n_head, T, hs); return all of them so far."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
        self.k = k
        self.v = v
        return k, v


class Block(nn.Module):
    """Pre-LN transformer block: x + attention(ln_1(x)), then x + mlp(ln_2(x)); RoPE on q and k."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)  # (B, T, D) each
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, T_past + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class ContextAR(nn.Module):
    """Decoder over [text][condition blocks][image]; variants: rope '2d' | '1d', mask 'context' |
    'causal', type embedding on or off."""

    def __init__(self, cfg, rope="2d", mask="context", type_emb=True):
        super().__init__()
        n_embd = cfg.width
        self.rope = rope
        self.mask_kind = mask
        self.use_type = type_emb
        self.head_dim = n_embd // cfg.heads
        self.rotary_dims = int(cfg.rotary_frac * self.head_dim)
        self.base = cfg.rope_base if rope == "2d" else cfg.rope_base_1d
        self.tok = nn.Embedding(VOCAB, n_embd)
        self.type_table = nn.Parameter(torch.randn(1 + len(COND_TYPES), n_embd))  # row 0 unused
        self.text_emb = nn.Embedding(TEXT_LEN * N_TEXT_IDS, n_embd)  # one vector per (slot, word)
        self.blocks = nn.ModuleList(Block(n_embd, cfg.heads) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, N_COLOURS)
        self.layouts = {}

    def layout(self, combo):
        """The Layout of combo, built once per combo on the model's device."""
        if combo not in self.layouts:
            self.layouts[combo] = make_layout(combo, self.rope, self.mask_kind, self.head_dim,
                                              self.rotary_dims, self.base, self.tok.weight.device)
        return self.layouts[combo]

    def hidden(self, tokens, combo, start=0, mask=None, caches=None):
        """Hidden states (B, T, D) of tokens at sequence positions start .. start+T-1 of combo."""
        lay = self.layout(combo)
        at = slice(start, start + tokens.shape[1])
        slot = lay.text_pos[at]  # (T,) 1..6 on the text, 0 elsewhere
        text_ids = (slot - 1).clamp(min=0) * N_TEXT_IDS + tokens.clamp(max=N_TEXT_IDS - 1)
        is_text = (slot > 0)[None, :, None]  # (1, T, 1)
        x = torch.where(is_text, self.text_emb(text_ids), self.tok(tokens))  # (B, T, D)
        if self.use_type:
            x = x + type_embedding(lay.types[at], self.type_table)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x = block(x, lay.cos[at], lay.sin[at], mask, cache)
        return x

    def logits(self, h):
        return self.head(self.ln_f(h))  # (B, T, 8)


@dataclasses.dataclass
class Branch:
    """One sampling stream: the conditional one, or CFG's unconditional one (null text, no
    blocks)."""
    text: torch.Tensor  # (B, 6)
    combo: tuple  # the condition blocks this stream reads
    prefix: int  # tokens before image slot 1: text, blocks, SOI
    caches: typing.Optional[list]  # one KVCache per block, or None (recompute every step)
    logits: torch.Tensor  # (B, 8) logits of the next image token


def start_branch(model, text, cond, image, combo, use_cache):
    """Prefill [text][blocks][SOI] once; the Branch holds the logits of x_0."""
    lay = model.layout(combo)
    prefix = lay.S - CELLS + 1
    caches = [KVCache() for _ in model.blocks] if use_cache else None
    tokens = build_tokens(text, cond, image, combo)[:, :prefix]  # (B, prefix)
    h = model.hidden(tokens, combo, mask=lay.mask[:prefix, :prefix], caches=caches)
    return Branch(text, combo, prefix, caches, model.logits(h[:, -1]).float())


def advance_branch(model, branch, cond, image, j):
    """After x_j is written into image: the logits of x_(j+1)."""
    if branch.caches is not None:  # slot j+1 holds x_j: one new token against the cached keys
        new = (IMG_OFF + image[:, j])[:, None]  # (B, 1)
        h = model.hidden(new, branch.combo, start=branch.prefix + j, caches=branch.caches)
    else:  # recompute the whole sequence so far
        length = branch.prefix + j + 1
        tokens = build_tokens(branch.text, cond, image, branch.combo)[:, :length]
        mask = model.layout(branch.combo).mask[:length, :length]
        h = model.hidden(tokens, branch.combo, mask=mask)
    branch.logits = model.logits(h[:, -1]).float()  # (B, 8)


@torch.no_grad()
def sample(model, text, cond, combo, temperature, cfg_scale, gen, use_cache=True):
    """64 image tokens (B, 64): prefill the prompt with one KVCache per block, then one token a
    step; temperature 0 = greedy. With cfg_scale != 1 a second, unconditional branch runs beside
    the conditional one and the two logits are combined (CFG)."""
    image = torch.zeros(text.shape[0], CELLS, dtype=torch.long, device=text.device)
    branches = [start_branch(model, text, cond, image, combo, use_cache)]
    if cfg_scale != 1:
        null = torch.full_like(text, NULL_TEXT)
        branches.append(start_branch(model, null, cond, image, (), use_cache))
    for j in range(CELLS):
        logits = branches[0].logits  # (B, 8)
        if cfg_scale != 1:
            logits = cfg_logits(branches[0].logits, branches[1].logits, cfg_scale)
        if temperature == 0:
            x = logits.argmax(-1)  # (B,)
        else:
            probs = F.softmax(logits / temperature, -1)  # (B, 8)
            x = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (B,)
        image[:, j] = x
        if j + 1 < CELLS:
            for branch in branches:
                advance_branch(model, branch, cond, image, j)
    return image


# --- training ---

TRAIN_COMBOS = ((), ("E",), ("D",), ("K",), ("E", "D"), ("D", "K"))
EVAL_COMBOS = {"E": ("E",), "D": ("D",), "K": ("K",), "E+D": ("E", "D"), "D+K": ("D", "K"),
               "E+K": ("E", "K"), "E+D+K": ("E", "D", "K"), "text": ()}
UNSEEN = ["E+K", "E+D+K"]


def image_nll(model, text, cond, image, combo, mask=None):
    """Teacher-forced -log p(x_j | text, conditions, x_<j) per image token, in nats. (B, 64)."""
    tokens = build_tokens(text, cond, image, combo)  # (B, S)
    mask = model.layout(combo).mask if mask is None else mask
    h = model.hidden(tokens, combo, mask=mask)[:, -CELLS:]  # (B, 64, D)
    logits = model.logits(h).float()  # (B, 64, 8)
    nll = F.cross_entropy(logits.flatten(0, 1), image.flatten(), reduction="none")  # (B * 64,)
    return nll.view(image.shape)


def get_lr(step, total, lr, warmup):
    """nanoGPT's schedule: linear warm-up for `warmup` steps, then cosine decay to lr / 10."""
    # 1) linear warm-up from lr / warmup to lr
    if step < warmup:
        return lr * (step + 1) / warmup
    # 2) cosine decay from lr (progress 0) to lr / 10 (progress 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - lr / 10)


def colour_ids(text):
    """Palette ids (N, 2) of the two objects from the text ids (N, 6)."""
    first_colour_word = WORDS.index(COLOURS[0])
    return FIRST_COLOUR + text[:, [2, 4]] - first_colour_word


def binding_probe(logits, layers, colours):
    """Has the model bound each colour word to its object? The share of objects whose first cell
    (raster order) prefers the object's own colour to the other object's, teacher-forced.
    logits (N, 64, 8), layers (N, 64) in {0, 1, 2}, colours (N, 2) palette ids -> float."""
    if logits.shape[:2] != layers.shape or colours.shape != (layers.shape[0], 2):
        raise ValueError(f"logits (N, 64, 8), layers (N, 64), colours (N, 2): {logits.shape} "
                         f"{layers.shape} {colours.shape}")
    rows = torch.arange(layers.shape[0])
    hits = []
    for k in (1, 2):
        first = (layers == k).long().argmax(1)  # (N,) the first cell of object k
        at = logits[rows, first]  # (N, 8)
        own = at[rows, colours[:, k - 1]]  # (N,)
        other = at[rows, colours[:, 2 - k]]  # (N,)
        hits.append(own > other)
    return torch.cat(hits).float().mean().item()


@torch.no_grad()
def measure_binding(model, data, device):
    """The binding probe on the data's scenes with the layer map D alone (it shows where each
    object is, not which colour it has)."""
    tokens = build_tokens(data["text"], data["cond"], data["image"], ("D",)).to(device)  # (N, S)
    h = model.hidden(tokens, ("D",), mask=model.layout(("D",)).mask)[:, -CELLS:]  # (N, 64, D)
    logits = model.logits(h).cpu()  # (N, 64, 8)
    return binding_probe(logits, data["cond"][:, 1], colour_ids(data["text"]))


def train(model, data, probe_data, cfg, device, **ident):
    """Each step: one condition subset (round-robin over TRAIN_COMBOS), a batch of scenes, and
    CFG dropout per sample (null text, condition blocks hidden from the image). Returns the
    binding probe on probe_data over training, [{step, probe}]."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    start = time.time()
    n_tokens = 0
    probes = [{"step": 0, "probe": measure_binding(model, probe_data, device)}]
    for step in range(cfg.steps):
        combo = TRAIN_COMBOS[step % len(TRAIN_COMBOS)]
        idx = torch.randint(len(data["image"]), (cfg.batch,))
        text = data["text"][idx].to(device)  # (B, 6)
        cond = data["cond"][idx].to(device)  # (B, 3, 64)
        image = data["image"][idx].to(device)  # (B, 64)
        drop = torch.rand(cfg.batch, device=device) < cfg.p_uncond  # (B,)
        text = torch.where(drop[:, None], torch.full_like(text, NULL_TEXT), text)
        lay = model.layout(combo)
        lr = get_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        mask = cfg_dropout_mask(lay.mask, drop, TEXT_LEN, CELLS)  # (B, 1, S, S)
        loss = image_nll(model, text, cond, image, combo, mask).mean()
        check_finite(step, loss=loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n_tokens += cfg.batch * lay.S
        done = step + 1
        if done % cfg.probe_every == 0 or done == cfg.steps:
            probes.append({"step": done, "probe": measure_binding(model, probe_data, device)})
        if done % cfg.log_every == 0 or done == cfg.steps:
            log_progress(done, cfg.steps, start, **ident, bits_per_token=loss.item() / math.log(2),
                         combo="+".join(combo) or "text", lr=lr, probe=probes[-1]["probe"],
                         tokens_per_s=n_tokens / (time.time() - start))
    return probes


# --- the study: evaluation, ceilings, seeds (a reader who came for the method may stop here) ---


def object_labels(images, colour_ids):
    """Label maps of palette images: 1 where a cell has object 1's colour, 2 for object 2, else 0.
    images (N, 64), colour_ids (N, 2) palette ids of the two objects -> (N, 64)."""
    if images.dim() != 2 or colour_ids.shape != (images.shape[0], 2):
        raise ValueError(f"images (N, 64), colour_ids (N, 2): {images.shape} {colour_ids.shape}")
    first = (images == colour_ids[:, :1]).long()  # (N, 64)
    second = (images == colour_ids[:, 1:]).long()  # (N, 64)
    return first + 2 * second


def fidelity_parts(labels, layers, edges, keys):
    """Per-scene scores of label maps against the scene's true maps, (N, 3):
    edge F1 of the generated edges against E; layer accuracy (cells where either map has an
    object, labels equal) against D; keypoint hit (each centre in K has its object's label).
    labels, layers (N, 64) in {0, 1, 2}; edges (N, 64) bool; keys (N, 2) centre cells."""
    if labels.shape != layers.shape or labels.shape != edges.shape or keys.shape[1:] != (2,):
        raise ValueError(f"labels, layers, edges (N, 64), keys (N, 2): {labels.shape} "
                         f"{layers.shape} {edges.shape} {keys.shape}")
    n = labels.shape[0]
    drawn = edges_of(labels.view(n, W, W)).flatten(1)  # (N, 64)
    true_pos = (drawn & edges).sum(1).float()  # (N,)
    total = drawn.sum(1) + edges.sum(1)  # (N,)
    f1 = torch.where(total > 0, 2 * true_pos / total.clamp(min=1), torch.ones(n))  # (N,)
    union = (labels > 0) | (layers > 0)  # (N, 64)
    agree = ((labels == layers) & union).sum(1).float()  # (N,)
    layer_acc = agree / union.sum(1).clamp(min=1)  # (N,)
    hit = (labels.gather(1, keys) == torch.tensor([1, 2])).float().mean(1)  # (N,)
    return torch.stack([f1, layer_acc, hit], 1)


def fidelity(parts):
    """The fidelity of a generated image: the MEAN of its three condition scores. (N, 3) -> (N,)."""
    if parts.dim() != 2 or parts.shape[1] != 3:
        raise ValueError(f"parts must be (N, 3): {parts.shape}")
    return parts.mean(1)


PLACEMENTS = {}  # shape -> (n, 8, 8) bool, every placement of it on the grid


def placements(shape):
    """Every placement of a shape on the grid as boolean masks (n, 8, 8) (computed once)."""
    if shape not in PLACEMENTS:
        masks = []
        for vertical in (0, 1):
            for r, c in np.ndindex(W, W):
                cells = place(shape, r, c, vertical)
                if cells is not None:
                    grid = np.zeros((W, W), bool)
                    grid[tuple(np.array(cells).T)] = True
                    masks.append(grid)
        PLACEMENTS[shape] = np.unique(np.stack(masks), axis=0)
    return PLACEMENTS[shape]


def has_shape(shape, mine, cover):
    """Some placement P of the shape holds every `mine` cell, and P's other cells are `cover`ed."""
    P = placements(shape)  # (n, 8, 8)
    inside = ~(mine & ~P).any((1, 2))  # (n,)
    hidden_ok = ~(P & ~mine & ~cover).any((1, 2))  # (n,)
    return bool(mine.any() and (inside & hidden_ok).any())


def checklist_score(image, prompt):
    """WorldGenBench-style checklist on an (8, 8) palette image -> (score, {item: bool}).
    Explicit items (said in the prompt): each colour present; each object has its shape (object 2
    exactly a placement; object 1 one whose missing cells object 2 covers). Implicit items (world
    rules no condition shows): night => a moon in rows 0..1, day => none; winter => a white ground
    row, summer => brown. Score = satisfied items / all items."""
    image = np.asarray(image).reshape(W, W)
    time_, season, c1, s1, c2, s2 = prompt.split()
    mine1 = image == FIRST_COLOUR + COLOURS.index(c1)
    mine2 = image == FIRST_COLOUR + COLOURS.index(c2)
    if time_ == "night":
        moon_ok = bool((image[:2] == MOON).any())
    else:
        moon_ok = not bool((image == MOON).any())
    ground = SNOW if season == "winter" else SOIL
    items = {f"explicit: {c1} present": bool(mine1.any()),
             f"explicit: {c2} present": bool(mine2.any()),
             f"explicit: {c1} {s1}": has_shape(s1, mine1, mine2),
             f"explicit: {c2} {s2}": has_shape(s2, mine2, np.zeros_like(mine2)),
             "implicit: moon iff night": moon_ok,
             "implicit: ground matches season": bool((image[W - 1] == ground).all())}
    return sum(items.values()) / len(items), items


def checklist_means(samples, prompts):
    """Mean share of satisfied explicit and implicit items over samples (N, 64)."""
    kinds = {"explicit": [], "implicit": []}
    for image, prompt in zip(samples, prompts):
        items = checklist_score(image.numpy(), prompt)[1]
        for kind in kinds:
            kinds[kind].append(np.mean([v for k, v in items.items() if k.startswith(kind)]))
    return {f"checklist_{kind}": float(np.mean(v)) for kind, v in kinds.items()}


def standard_error(values):
    """Standard error of the mean of values (N,) (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    return values.std().item() / math.sqrt(len(values))


@torch.no_grad()
def evaluate(model, data, combo, cfg, device, gen, null=False, group=1):
    """All metrics of one combo on the test scenes (null: no text, no conditions) -> (metrics,
    samples): bits/token (teacher-forced), the three condition scores, fidelity (and its standard
    error over scenes, each scene `group` consecutive rows), checklist items."""
    text = data["text"].to(device)
    cond = data["cond"].to(device)
    image = data["image"].to(device)
    if null:
        text = torch.full_like(text, NULL_TEXT)
    nll = torch.cat([image_nll(model, text[i:i + 64], cond[i:i + 64], image[i:i + 64], combo)
                     for i in range(0, len(text), 64)])  # (N, 64)
    samples = sample(model, text, cond, combo, cfg.temperature, cfg.cfg_scale, gen).cpu()
    labels = object_labels(samples, colour_ids(data["text"]))  # (N, 64)
    parts = fidelity_parts(labels, data["cond"][:, 1], data["cond"][:, 0].bool(), data["keys"])
    per_scene = fidelity(parts).view(-1, group).mean(1)  # (N / group,)
    metrics = {"edge_f1": parts[:, 0].mean().item(), "depth_acc": parts[:, 1].mean().item(),
               "keypoint_hit": parts[:, 2].mean().item(),
               "fidelity": per_scene.mean().item(),
               "fidelity_se": standard_error(per_scene),
               "bits_per_token": nll.mean().item() / math.log(2)}
    metrics.update(checklist_means(samples, data["prompts"]))
    return metrics, samples


class LayoutTable(typing.NamedTuple):
    """Every valid layout of one pair of shapes, with the maps it shows."""
    cond: torch.Tensor  # (n, 3, 64) E, D, K maps
    keys: torch.Tensor  # (n, 2) centre cells


LAYOUT_TABLES = {}  # (shape 1, shape 2) -> LayoutTable
CEILINGS = {}  # (shapes, condition types, their maps) -> ceiling


def layout_table(shapes):
    """Every layout random_scene can draw for two shapes (row, column, vertical? of each; a square
    or plus twice, as the generator draws `vertical` for them too), computed once per pair."""
    rows = range(OBJ_ROWS[0], OBJ_ROWS[1] + 1)
    options = [(r, c, v) for r in rows for c in range(W) for v in (0, 1)]
    if shapes not in LAYOUT_TABLES:
        layers = []
        keys = []
        for back in options:
            for front in options:
                layer = layer_map(shapes, [back, front])
                if layer is not None:
                    layers.append(layer)
                    keys.append([back[0] * W + back[1], front[0] * W + front[1]])
        keys = torch.tensor(keys)  # (n, 2)
        cond = condition_maps(torch.from_numpy(np.stack(layers)), keys)  # (n, 3, 64)
        LAYOUT_TABLES[shapes] = LayoutTable(cond, keys)
    return LAYOUT_TABLES[shapes]


def scene_at(data, i):
    """Row i of a dataset as a scene: its prompt and its maps (3, 64)."""
    return {"prompt": data["prompts"][i], "cond": data["cond"][i]}


def ceiling(combo, scene, cap=256):
    """The best mean fidelity any sampler can reach from the prompt and combo's maps, found by
    enumeration. Given them, the true layout is equally likely to be any layout of the prompt's
    shapes whose maps match (random_scene draws layouts uniformly); drawing layout i when the truth
    is j scores fidelity(i, j), so the ceiling is max_i mean_j fidelity(i, j) over the matching
    layouts (the best single layout; an image that is no layout is not considered). With more than
    `cap` matches (only without E, D or K: the text alone) an evenly spaced `cap` are used."""
    words = scene["prompt"].split()
    shapes = (words[3], words[5])
    table = layout_table(shapes)
    types = [COND_TYPES.index(t) for t in combo]
    maps = scene["cond"][types]  # (len(combo), 64)
    key = (shapes, tuple(types), maps.numpy().tobytes())
    if key not in CEILINGS:
        match = (table.cond[:, types] == maps).flatten(1).all(1)  # (n,)
        idx = match.nonzero()[:, 0]  # (m,)
        if len(idx) > cap:
            idx = idx[torch.linspace(0, len(idx) - 1, cap).long()]
        m = len(idx)
        drawn = table.cond[idx, 1].repeat_interleave(m, 0)  # (m * m, 64) layout i's labels
        truth = idx.repeat(m)  # (m * m,) against truth j
        parts = fidelity_parts(drawn, table.cond[truth, 1], table.cond[truth, 0].bool(),
                               table.keys[truth])  # (m * m, 3)
        scores = fidelity(parts).view(m, m)  # [i, j]
        CEILINGS[key] = scores.mean(1).max().item()
    return CEILINGS[key]


def needs_both(scene):
    """Neither E alone nor K alone pins the layout (ceiling < 1), and E and K together do."""
    pinned = [ceiling(combo, scene) > 1 - 1e-6 for combo in (("E",), ("K",), ("E", "K"))]
    return not pinned[0] and not pinned[1] and pinned[2]


def needs_both_scenes(data, rng, n, p_bar):
    """The needs-both test subset: the rows of data that need both, or (data None) n fresh scenes
    from random_scene that do."""
    if data is not None:
        rows = [i for i in range(len(data["prompts"])) if needs_both(scene_at(data, i))]
        return {k: v[rows] if torch.is_tensor(v) else [v[i] for i in rows]
                for k, v in data.items()}
    pairs = []
    while len(pairs) < n:
        prompt, scene = random_scene(rng, p_bar)
        layers = torch.from_numpy(scene[1])[None]  # (1, 8, 8)
        keys = torch.tensor([[r * W + c for r, c in scene[2]]])  # (1, 2)
        if needs_both({"prompt": prompt, "cond": condition_maps(layers, keys)[0]}):
            pairs.append((prompt, scene))
    return make_dataset(pairs)


def mean_ceiling(combo, data):
    """The mean ceiling of a combo over the scenes of a dataset."""
    return float(np.mean([ceiling(combo, scene_at(data, i)) for i in range(len(data["prompts"]))]))


def repeat_rows(data, k):
    """Every scene of a dataset k times in a row (k samples per scene in one batch)."""
    out = {}
    for key, value in data.items():
        if torch.is_tensor(value):
            out[key] = value.repeat_interleave(k, 0)
        else:
            out[key] = [x for x in value for _ in range(k)]
    return out


def kv_cache_speedup(model, data, device, n=8, repeats=3):
    """Greedy E+D+K samples with the KV cache vs recomputing the sequence each step:
    {kv_cache_speedup_repeats: speed-up of each repeat, kv_cache_identical: the same tokens in
    every repeat?}."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    text = data["text"][:n].to(device)
    cond = data["cond"][:n].to(device)
    ratios = []
    identical = True
    for _ in range(repeats):
        seconds = []
        outs = []
        for use_cache in (True, False):
            t0 = clock()
            outs.append(sample(model, text, cond, COND_TYPES, 0.0, 1.0, None, use_cache).cpu())
            seconds.append(clock() - t0)
        ratios.append(seconds[1] / max(seconds[0], 1e-9))
        identical = identical and bool(torch.equal(outs[0], outs[1]))
    return {"kv_cache_speedup_repeats": ratios, "kv_cache_identical": identical}



class SceneSets(typing.NamedTuple):
    """The scenes of one data seed: training pool, test scenes of every kind, needs-both scenes."""
    train: dict
    test: dict
    needs: dict


SCENE_SETS = {}  # data key -> SceneSets, built once per process (forked workers inherit them)


def scene_sets(cfg):
    """The scenes of cfg.data_seed (or the --data rows): the same sets whatever the model seed."""
    key = (cfg.data, cfg.data_seed, cfg.n_train, cfg.n_eval, cfg.n_needs_both, cfg.p_bar)
    if key not in SCENE_SETS:
        rng = np.random.default_rng(cfg.data_seed)
        train_set, test_set = load_scenes(cfg, rng)
        needs = needs_both_scenes(test_set if cfg.data else None, rng, cfg.n_needs_both,
                                  cfg.p_bar)
        require(len(needs["prompts"]) > 0,
                "no test scene needs both E and K: use more test rows with two bars")
        SCENE_SETS[key] = SceneSets(train_set, test_set, needs)
    return SCENE_SETS[key]


def data_facts(sets):
    """How the test scenes relate to training: the share of bars among drawn objects, and how many
    needs-both scenes repeat a training scene (same prompt and maps) or its layer map."""
    shapes = [p.split()[3::2] for p in sets.train["prompts"]]  # [shape 1, shape 2] per scene
    bars = [s.count("bar") for s in shapes]
    train_scenes = {p + bytes(c.numpy()).hex() for p, c in
                    zip(sets.train["prompts"], sets.train["cond"])}
    train_layers = {bytes(c.numpy()) for c in sets.train["cond"][:, 1]}
    needs = sets.needs
    repeats = [p + bytes(c.numpy()).hex() in train_scenes for p, c in
               zip(needs["prompts"], needs["cond"])]
    layers_seen = [bytes(c.numpy()) in train_layers for c in needs["cond"][:, 1]]
    return {"train_bar_share": float(np.mean(bars)) / 2,
            "train_bar_bar_share": float(np.mean([b == 2 for b in bars])),
            "needs_both_bar_bar": sum(s.split()[3::2] == ["bar", "bar"] for s in needs["prompts"]),
            "needs_both_repeating_a_training_scene": int(sum(repeats)),
            "needs_both_layer_map_in_training": int(sum(layers_seen))}


class Ceilings(typing.NamedTuple):
    """The mean ceiling of every combo on the test scenes and on the needs-both scenes."""
    test: dict
    needs: dict


ARMS = {"full": {}, "no_type": {"type_emb": False}, "rope_1d": {"rope": "1d"},
        "causal": {"mask": "causal"}}
SHOWN = ("E", "K", "E+K", "text")  # the combos whose samples the figure shows
SHOWN_ROWS = 6  # needs-both scenes in the figure


class Job(typing.NamedTuple):
    """One training: an arm of the model with one model seed."""
    cfg: Config
    seed: int
    arm: str


def run_job(job):
    """Train one arm with one model seed on the data seed's scenes and evaluate every combo on the
    test scenes and the needs-both scenes -> plain data (metrics, probe, a few samples, CPU s)."""
    cfg = job.cfg
    cpu_start = time.process_time()
    device = pick_device(cfg.device)
    sets = scene_sets(cfg)
    set_seed(job.seed)  # every arm: the same initial draw (where shapes agree) and the same batches
    model = ContextAR(cfg, **ARMS[job.arm]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"arm {job.arm}, seed {job.seed}: {n_params} parameters")
    probes = train(model.train(), sets.train, sets.test, cfg, device, arm=job.arm, seed=job.seed)
    train_cpu = time.process_time() - cpu_start
    model.eval()
    gen = torch.Generator(device=device).manual_seed(job.seed + 1)
    k = cfg.samples_per_scene
    needs = repeat_rows(sets.needs, k)
    out = {"seed": job.seed, "arm": job.arm, "binding_probe": probes, "test": {},
           "needs_both": {}, "shown": {}}
    for name, combo in EVAL_COMBOS.items():
        out["test"][name] = evaluate(model, sets.test, combo, cfg, device, gen)[0]
    for name, combo in EVAL_COMBOS.items():
        metrics, samples = evaluate(model, needs, combo, cfg, device, gen, group=k)
        out["needs_both"][name] = metrics
        out["shown"][name] = samples[::k][:SHOWN_ROWS].tolist()
    out["test"]["uncond"] = evaluate(model, sets.test, (), cfg, device, gen, null=True)[0]
    if job.arm == "full" and job.seed == cfg.seed:
        out.update(kv_cache_speedup(model, sets.test, device))
    out["train_cpu_time_s"] = train_cpu
    out["cpu_time_s"] = time.process_time() - cpu_start
    return out


def mean_over_seeds(per_seed):
    """[{combo: {key: value}}] per seed -> {combo: {key: mean, key_per_seed: [...]}}."""
    out = {}
    for combo in per_seed[0]:
        out[combo] = {}
        for key in per_seed[0][combo]:
            values = [one_seed[combo][key] for one_seed in per_seed]
            out[combo][key] = float(np.mean(values))
            out[combo][f"{key}_per_seed"] = values
    return out


def needs_both_summary(per_seed, n_scenes, k, ceilings):
    """The needs-both block of results.json from the per-seed metrics of every combo there. The
    margin of a seed: its E+K fidelity minus the larger single-condition ceiling (E or K)."""
    best_single = max(ceilings["E"], ceilings["K"])
    margins = [one_seed["E+K"]["fidelity"] - best_single for one_seed in per_seed]
    margin_std = float(np.std(margins, ddof=1)) if len(margins) > 1 else 0.0
    return {"n_scenes": n_scenes, "samples_per_scene": k,
            "fidelity": {c: float(np.mean([m[c]["fidelity"] for m in per_seed])) for c in ceilings},
            "fidelity_min_seed": {c: min(m[c]["fidelity"] for m in per_seed) for c in ceilings},
            "fidelity_per_seed": {c: [m[c]["fidelity"] for m in per_seed] for c in ceilings},
            "ceiling": ceilings, "best_single_ceiling": best_single,
            "margin_per_seed": margins,
            "margin_se_per_seed": [one_seed["E+K"]["fidelity_se"] for one_seed in per_seed],
            "margin_mean": float(np.mean(margins)), "margin_std": margin_std}


def health_summary(outcomes, needs_ceilings):
    """Per seed: seen pairs (mean of E+D and D+K, all test scenes: did the colours bind?), the
    binding probe over training, and E alone and K alone minus their ceilings on the needs-both
    scenes (did each map work alone? neither includes the layer map)."""
    seen = [(o["test"]["E+D"]["fidelity"] + o["test"]["D+K"]["fidelity"]) / 2 for o in outcomes]
    singles = [{c: o["needs_both"][c]["fidelity"] - needs_ceilings[c] for c in ("E", "K")}
               for o in outcomes]
    return {"seen_pairs_per_seed": seen,
            "binding_probe_per_seed": [o["binding_probe"] for o in outcomes],
            "single_vs_ceiling_per_seed": singles}


def arm_summary(outcomes, cfg, ceilings):
    """The results of one arm over its seeds: every combo on the test scenes, the needs-both
    block and the health of each seed."""
    arm = mean_over_seeds([o["test"] for o in outcomes])
    uncond = arm.pop("uncond")
    for combo, metrics in arm.items():
        metrics["ceiling"] = ceilings.test[combo]
    n_scenes = len(scene_sets(cfg).needs["prompts"])
    needs = needs_both_summary([o["needs_both"] for o in outcomes], n_scenes,
                               cfg.samples_per_scene, ceilings.needs)
    return {"test": arm, "uncond": uncond, "needs_both": needs,
            "health": health_summary(outcomes, ceilings.needs)}


def collect(cfg, outcomes, sets, ceilings):
    """results.json from the jobs' plain data: the full model's tables, health and needs-both
    block over its seeds, the ablation arms beside it, the KV-cache timing of the first seed."""
    full = [o for o in outcomes if o["arm"] == "full"]
    summary = arm_summary(full, cfg, ceilings)
    results = {"config": dataclasses.asdict(cfg), "seeds": [o["seed"] for o in full],
               "data_seed": cfg.data_seed, "unseen": UNSEEN,
               "arms": {"full": summary["test"], "uncond": {"uncond": summary["uncond"]}},
               "needs_both": summary["needs_both"], "health": summary["health"],
               "data": data_facts(sets)}
    kv_repeats = full[0]["kv_cache_speedup_repeats"]
    results["kv_cache_speedup"] = float(np.median(kv_repeats))
    results["kv_cache_speedup_repeats"] = kv_repeats
    results["kv_cache_identical"] = full[0]["kv_cache_identical"]
    ablations = {}
    for arm in [a for a in ARMS if a != "full"]:
        runs = [o for o in outcomes if o["arm"] == arm]
        if runs:
            arm_result = arm_summary(runs, cfg, ceilings)
            margins = arm_result["needs_both"]["margin_per_seed"]
            ablations[arm] = {"seeds": [o["seed"] for o in runs],
                              "fidelity": {c: m["fidelity"] for c, m in arm_result["test"].items()},
                              "needs_both_EK": arm_result["needs_both"]["fidelity"]["E+K"],
                              "needs_both_margin": arm_result["needs_both"]["margin_mean"],
                              "needs_both_margin_per_seed": margins,
                              "seen_pairs_per_seed": arm_result["health"]["seen_pairs_per_seed"]}
    if ablations:
        results["ablations"] = ablations
    results["train_cpu_time_s_per_seed"] = [o["train_cpu_time_s"] for o in full]
    return results


def sample_grid(needs, shown, rows):
    """An RGB picture (H, W, 3): per needs-both scene the true image, its E and K maps, then one
    sample of each shown combo; and the column names."""
    px = 5
    gap = 4
    size = W * px + gap
    palette = np.array(RGB, np.uint8)
    names = ["true", "E map", "K map"] + list(shown)
    grid = np.full((rows * size + gap, len(names) * size + gap, 3), 255, np.uint8)
    for r in range(rows):
        maps = [needs["cond"][r, 0].numpy() * 255, needs["cond"][r, 2].numpy() * 127]
        tiles = [palette[needs["image"][r].numpy()]]
        tiles += [np.repeat(m.astype(np.uint8)[:, None], 3, 1) for m in maps]
        tiles += [palette[np.array(s[r])] for s in shown.values()]
        for c, tile in enumerate(tiles):
            y = gap + r * size
            x = gap + c * size
            grid[y:y + W * px, x:x + W * px] = tile.reshape(W, W, 3).repeat(px, 0).repeat(px, 1)
    ticks = [gap + c * size + W * px / 2 for c in range(len(names))]
    return grid, ticks, names


def plot(results, needs, shown):
    """Left: needs-both test scenes with samples of the first seed. Middle: the binding probe over
    training, one line per seed. Right: fidelity on the needs-both scenes per combo (bars: mean
    over seeds, dots: seeds) beside its ceiling and the best single-condition ceiling."""
    fig = Figure(figsize=(4.6 * 3, 3.6))
    axes = fig.subplots(1, 3, squeeze=False)[0]
    rows = min(SHOWN_ROWS, len(needs["image"]))
    grid, ticks, names = sample_grid(needs, {c: shown[c] for c in SHOWN}, rows)
    axes[0].imshow(grid)
    axes[0].set_xticks(ticks)
    axes[0].set_xticklabels(names, fontsize=7, rotation=30)
    axes[0].set_yticks([])
    axes[0].set_title(f"needs-both scenes, seed {results['seeds'][0]} (T = 1)", fontsize=9)
    for seed, probes in zip(results["seeds"], results["health"]["binding_probe_per_seed"]):
        axes[1].plot([p["step"] for p in probes], [p["probe"] for p in probes], label=f"{seed}")
    axes[1].axhline(BINDING_FLOOR, color="k", ls=":", lw=1)
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("binding probe (D alone, teacher-forced)")
    axes[1].set_ylim(0, 1.05)
    axes[1].legend(fontsize=6, title="seed", title_fontsize=6, ncol=2)
    nb = results["needs_both"]
    combos = list(EVAL_COMBOS)
    x = np.arange(len(combos))
    axes[2].bar(x, [nb["fidelity"][c] for c in combos], color="tab:blue", alpha=0.6,
                label="fidelity (mean over seeds)")
    for i, combo in enumerate(combos):
        per_seed = nb["fidelity_per_seed"][combo]
        axes[2].plot([i] * len(per_seed), per_seed, "k.", markersize=4)
    axes[2].plot(x, [nb["ceiling"][c] for c in combos], "r_", markersize=14, mew=2,
                 label="ceiling (best valid layout)")
    axes[2].axhline(nb["best_single_ceiling"], color="r", ls=":", lw=1,
                    label="best single-condition ceiling")
    axes[2].set_xticks(x)
    axes[2].set_xticklabels(combos, fontsize=7)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_ylabel("fidelity (edge F1, layer acc., keypoint hit)")
    axes[2].set_title(f"{nb['n_scenes']} needs-both scenes x {nb['samples_per_scene']} samples",
                      fontsize=9)
    axes[2].legend(fontsize=6, loc="lower right")
    return fig


BINDING_FLOOR = 0.9  # seen pairs (and the probe) at or above it: the seed bound the colours
MARGIN_GOAL = 0.05  # the mean needs-both margin the toy should reach over the seeds


def spread(values, sign=""):
    """'mean ± std [worst]' of a list (std with ddof 1; worst = the smallest value)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):{sign}.3f} ± {std:.3f} [{min(values):{sign}.3f}]"


def failure(seen_pairs, margin):
    """What a seed failed at: 'binding' (colours not bound to objects: seen pairs below the floor),
    'composition' (bound, but unseen E+K does not beat the best single map's ceiling), or ''."""
    if seen_pairs < BINDING_FLOOR:
        return "binding"
    if margin <= 0:
        return "composition"
    return ""


def first_step_at(probes, floor):
    """The first training step at which the binding probe reached floor, or None."""
    steps = [p["step"] for p in probes if p["probe"] >= floor]
    return steps[0] if steps else None


def verdict_lines(results):
    """The verdict, computed from the per-seed numbers."""
    nb = results["needs_both"]
    seen = results["health"]["seen_pairs_per_seed"]
    margins = nb["margin_per_seed"]
    n = len(margins)
    bound = sum(s >= BINDING_FLOOR for s in seen)
    composed = sum(m > 0 for m in margins)
    sd = float(np.std(margins, ddof=1)) if n > 1 else 0.0
    se_mean = sd / math.sqrt(n)
    ratio = f"{nb['margin_mean'] / se_mean:.1f}" if se_mean > 0 else "n/a"
    failures = [f"seed {seed} ({failure(s, m)})" for seed, s, m in
                zip(results["seeds"], seen, margins) if failure(s, m)]
    goal_met = nb["margin_mean"] >= MARGIN_GOAL
    return [f"- Colour binding (seen pairs E+D, D+K >= {BINDING_FLOOR}): {bound} of {n} seeds "
            f"(seen pairs {spread(seen)}).",
            f"- Composition (unseen E+K on the needs-both scenes minus the best single-condition "
            f"ceiling {nb['best_single_ceiling']:.3f}): margin > 0 in {composed} of {n} seeds; "
            f"margin {spread(margins, '+')} (mean ± SD between seeds [worst]); mean / (SD / "
            f"sqrt({n})) = {ratio} standard errors of the between-seed mean.",
            f"- Mean margin >= {MARGIN_GOAL:+.2f}: {'met' if goal_met else 'not met'}.",
            f"- Failures: {', '.join(failures) if failures else 'none'}."]


def seed_table(results):
    """One row per seed: binding, the single maps against their ceilings, composition."""
    nb = results["needs_both"]
    health = results["health"]
    lines = ["| seed | seen pairs | E − ceiling | K − ceiling | E+K | margin | within-seed SE "
             "| margin / SE | probe at end | probe >= 0.9 from step | failure |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, seed in enumerate(results["seeds"]):
        seen = health["seen_pairs_per_seed"][i]
        singles = health["single_vs_ceiling_per_seed"][i]
        margin = nb["margin_per_seed"][i]
        se = nb["margin_se_per_seed"][i]
        probes = health["binding_probe_per_seed"][i]
        ratio = f"{margin / se:+.1f}" if se > 0 else "n/a"
        lines.append(f"| {seed} | {seen:.3f} | {singles['E']:+.3f} | {singles['K']:+.3f} "
                     f"| {nb['fidelity_per_seed']['E+K'][i]:.3f} | {margin:+.3f} | {se:.3f} "
                     f"| {ratio} | {probes[-1]['probe']:.3f} "
                     f"| {first_step_at(probes, BINDING_FLOOR) or 'never'} "
                     f"| {failure(seen, margin) or '-'} |")
    return lines


def combo_tables(results):
    """Every combo on all test scenes (with its condition scores and checklist) and on the
    needs-both scenes, each fidelity as mean ± std [worst seed] beside its ceiling."""
    nb = results["needs_both"]
    lines = ["| combo | | fidelity | ceiling | edge F1 | layer acc. | keypoint hit | bits/token "
             "| checklist explicit | checklist implicit | needs-both fidelity | its ceiling |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for combo, m in results["arms"]["full"].items():
        tag = "unseen" if combo in results["unseen"] else "seen"
        lines.append(f"| {combo} | {tag} | {spread(m['fidelity_per_seed'])} | {m['ceiling']:.3f} "
                     f"| {m['edge_f1']:.3f} | {m['depth_acc']:.3f} | {m['keypoint_hit']:.3f} "
                     f"| {m['bits_per_token']:.3f} | {m['checklist_explicit']:.3f} "
                     f"| {m['checklist_implicit']:.3f} | {spread(nb['fidelity_per_seed'][combo])} "
                     f"| {nb['ceiling'][combo]:.3f} |")
    uncond = results["arms"]["uncond"]["uncond"]
    lines.append(f"| uncond | control | {spread(uncond['fidelity_per_seed'])} | | "
                 f"{uncond['edge_f1']:.3f} | {uncond['depth_acc']:.3f} "
                 f"| {uncond['keypoint_hit']:.3f} | {uncond['bits_per_token']:.3f} "
                 f"| {uncond['checklist_explicit']:.3f} | {uncond['checklist_implicit']:.3f} | | |")
    return lines


def probe_table(results):
    """The binding probe over training: one row per reading, one column per seed."""
    per_seed = results["health"]["binding_probe_per_seed"]
    lines = ["| step | " + " | ".join(f"seed {s}" for s in results["seeds"]) + " |",
             "|---" * (1 + len(per_seed)) + "|"]
    for i, reading in enumerate(per_seed[0]):
        probes = [f"{seed_probes[i]['probe']:.3f}" for seed_probes in per_seed]
        lines.append(f"| {reading['step']} | " + " | ".join(probes) + " |")
    return lines


def ablation_lines(results):
    """The ablation arms beside the full model, if they ran."""
    if "ablations" not in results:
        return []
    lines = ["", "## Ablations (same seeds and budget)", "",
             "| arm | " + " | ".join(EVAL_COMBOS) + " | needs-both E+K | margin | seen pairs |",
             "|---" * (len(EVAL_COMBOS) + 4) + "|"]
    for arm, table in results["ablations"].items():
        cells = [f"{table['fidelity'][c]:.3f}" for c in EVAL_COMBOS]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {table['needs_both_EK']:.3f} "
                     f"| {spread(table['needs_both_margin_per_seed'], '+')} "
                     f"| {spread(table['seen_pairs_per_seed'])} |")
    return lines


def render_report(results):
    """The markdown record of a run, from its results.json alone."""
    cfg = results["config"]
    nb = results["needs_both"]
    facts = results["data"]
    n_seeds = len(results["seeds"])
    train_cpu = np.mean(results["train_cpu_time_s_per_seed"])
    pairs = results["attention_pairs"]
    lines = ["# contextar: ContextAR on toy scenes, seen and unseen condition combinations", "",
             f"Model seeds {results['seeds']}, data seed {results['data_seed']} (the training, "
             f"test and needs-both scenes are the same for every model seed); {cfg['steps']} "
             f"steps of {cfg['batch']} scenes; every sample at temperature {cfg['temperature']}, "
             f"guidance scale {cfg['cfg_scale']}. Wall {results['wall_s']:.0f} s, CPU "
             f"{results['cpu_time_s']:.0f} s (training one seed: {train_cpu:.0f} CPU-s).",
             "", "## Verdict", ""]
    lines += verdict_lines(results)
    lines += ["", f"## Per seed: binding, each map alone, composition ({nb['n_scenes']} needs-both "
              f"scenes x {nb['samples_per_scene']} samples)", ""]
    lines += seed_table(results)
    lines += ["", "Seen pairs: mean fidelity of E+D and D+K on all test scenes; they include the "
              "layer map, which pins the layout alone, so they show binding, not composition. "
              "E − ceiling and K − ceiling: each map alone on the needs-both scenes against its "
              "ceiling (no layer map). The within-seed SE is over the needs-both scenes of one "
              "seed's samples; the spread between seeds (verdict) is what a new seed would see.",
              "", f"## Every combo ({n_seeds} seeds: mean ± std [worst seed])", ""]
    lines += combo_tables(results)
    lines += ["", f"Left: {cfg['n_eval']} test scenes of every kind; right: the needs-both scenes. "
              "Fidelity: the mean of edge F1, layer accuracy and keypoint hit of the generated "
              "image against the scene's maps. Ceiling: the best mean fidelity of any single "
              "valid layout consistent with the prompt and the combo's maps, by enumeration (an "
              "image that is no valid layout can score slightly higher). uncond: null text and "
              "no conditions (the CFG branch).", "", "## What \"unseen\" means", "",
              f"E+K and E+D+K are never trained on as condition combinations; the scenes are not "
              f"all new: {facts['needs_both_repeating_a_training_scene']} of {nb['n_scenes']} "
              f"needs-both scenes repeat a training scene (prompt and maps) and "
              f"{facts['needs_both_layer_map_in_training']} have a layer map that occurs in "
              f"training. {facts['needs_both_bar_bar']} of them are bar-bar scenes. In training, "
              f"{facts['train_bar_share']:.3f} of the objects are bars (p_bar {cfg['p_bar']} "
              f"before rejecting invalid layouts) and {facts['train_bar_bar_share']:.3f} of the "
              f"scenes are bar-bar.", "", "## Binding probe over training", "",
              "Teacher-forced, the layer map D alone, on the test scenes: the share of objects "
              "whose first cell prefers the object's colour to the other object's.", ""]
    lines += probe_table(results)
    lines += ablation_lines(results)
    lines += ["", "## Cost", "",
              f"Attention pairs of an E+D+K sequence (S = {pairs['S']}): context-aware mask "
              f"{pairs['context']}, causal {pairs['causal']}, dense {pairs['dense']} (a dense "
              f"boolean mask computes them all). KV-cache sampling against recomputing the "
              f"sequence each step (E+D+K, greedy): {results['kv_cache_speedup']:.1f}x (median of "
              f"{len(results['kv_cache_speedup_repeats'])}), identical tokens: "
              f"{results['kv_cache_identical']}."]
    return "\n".join(lines) + "\n"


def run(cfg):
    """The whole study: scenes and ceilings, the seeds (and arms) as jobs, the record."""
    wall_start = time.time()
    if cfg.smoke:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 6), batch=8, width=32, layers=1,
                                  heads=2, n_train=64, n_eval=6, n_needs_both=4,
                                  samples_per_scene=2, log_every=3, probe_every=3)
    device = pick_device(cfg.device)
    print(f"config: {dataclasses.asdict(cfg)}")
    sets = scene_sets(cfg)
    print(f"data: {len(sets.train['image'])} train / {len(sets.test['image'])} test scenes "
          f"(+ {len(sets.needs['prompts'])} needing both E and K), e.g. "
          f"'{sets.test['prompts'][0]}'")
    mask3 = build_attention_mask(COND_TYPES, CELLS, TEXT_LEN)  # E+D+K: the pairs each mask keeps
    S = len(mask3)
    pairs = {"S": S, "context": int(mask3.sum()), "causal": S * (S + 1) // 2, "dense": S * S}
    ceilings = Ceilings({c: mean_ceiling(combo, sets.test) for c, combo in EVAL_COMBOS.items()},
                        {c: mean_ceiling(combo, sets.needs) for c, combo in EVAL_COMBOS.items()})
    print(f"ceilings, all test scenes: {ceilings.test}\nneeds-both scenes: {ceilings.needs}")
    arms = ["full"] + (["no_type", "rope_1d", "causal"] if cfg.ablate else [])
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    jobs = [Job(cfg, seed, arm) for arm in arms for seed in seeds]
    setup_cpu = time.process_time()
    outcomes = run_jobs(run_job, jobs, cfg.workers, device)
    results = collect(cfg, outcomes, sets, ceilings)
    results["attention_pairs"] = pairs
    results["cpu_time_s"] = setup_cpu + sum(o["cpu_time_s"] for o in outcomes)
    results["wall_s"] = time.time() - wall_start
    fig = plot(results, sets.needs, outcomes[0]["shown"])
    write_record(cfg.out, "contextar", results, fig)
    print(render_report(results))
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
