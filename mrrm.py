"""
mrrm.py: a multi-response reward model ("You Only Judge Once", arXiv 2604.10966) on Qwen3-VL.

One prompt (images / video + question) and N candidate responses go into ONE sequence, each response
closed by a separator token; an MLP value head reads the final hidden state at every separator and
gives N scores; training is cross-entropy over the N scores with the best response as the target.

    prompt tokens | response 1 <sep> | response 2 <sep> | ... | response N <sep>
                                   ^ score 1          ^ score 2             ^ score N

Two attention modes, built by vlm.attention_mask():
  joint        the paper: plain causal attention, response i also sees responses 1..i-1.
  independent  a block mask (each response sees the prompt and itself) and position ids that restart
               after the prompt for every response: score i equals a separate pass over
               prompt + response i, for the cost of one pass over the prompt.

This file holds the packing, the value head, the listwise losses and the RewardModel API:

    rm = RewardModel.load("data/shapeworld-backbone", adapter="runs/rm")
    rm.score(images=[Image.open("x.png")], prompt="What color is the circle?",
             responses=["It is red.", "Blue.", "red, I think"], mode="joint")   # -> [2.1, -1.3, 0.4]

Short packs may share a row (collate's row_tokens): a block-diagonal mask keeps them apart, so the
scores are the ones each gets alone, with less padding; place() picks the layout of least work.

What it leaves out: reasoning ("thinking") before the scores, generative judges, and ensembles of
reward models.
"""

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import random
import re
import resource
import shutil
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import vlm

MODES = ("joint", "independent")

# -----------------------------------------------------------------------------
# Packing


@dataclass
class Pack:
    """One prompt and its N responses as one sequence."""
    input_ids: torch.Tensor  # (T,)
    position_ids: torch.Tensor  # (3, T)
    segment: torch.Tensor  # (T,) 0 = prompt, r = response r (1-based), separator included
    sep_index: torch.Tensor  # (N,) where each response's separator sits
    pixel_values: torch.Tensor = None
    grid_thw: torch.Tensor = None
    truncated: bool = False
    vision: tuple = None  # the prompt's vision-tower outputs (tokens, [DeepStack]), in place of pixel_values


def fit_lengths(lengths, budget):
    """Shorten the longest responses first until sum(lengths) <= budget: every response keeps
    min(len, cap) tokens for the largest cap that fits (water-filling), never dropping one. A response's
    cut depends on the lengths alone, never on its place in the list: in independent mode its score
    must not change when the order does."""
    if sum(lengths) <= budget:
        return list(lengths)
    lo, hi = 0, max(lengths)
    while lo < hi:  # the largest cap with sum(min(l, cap)) <= budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(l, mid) for l in lengths) <= budget else (lo, mid - 1)
    out = [min(l, lo) for l in lengths]
    spare = budget - sum(out)
    # hand out what is left, longest first, to all responses of one length or to none: giving it to the
    # first of two equal responses would cut the same text two ways by where it stands
    for n in sorted({l for l in lengths if l > lo}, reverse=True):
        group = [i for i, l in enumerate(lengths) if l == n]
        if len(group) > spare:
            break
        for i in group:
            out[i] += 1
        spare -= len(group)
    return out


def pack(prompt_ids, prompt_pos, response_ids, sep_id, mode="joint", max_len=None, pixel_values=None,
         grid_thw=None, where="", vision=None):
    """Prompt (ids + 3D positions from vlm.rope_positions) followed by N responses, each + separator.
    In independent mode every response's positions restart where the prompt ends. The prompt's media
    come as pixel_values, or as their vision-tower outputs (`vision`, PromptCache's)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    P, N = len(prompt_ids), len(response_ids)
    lengths = [len(r) for r in response_ids]
    truncated = False
    if max_len is not None and P + N + sum(lengths) > max_len:
        budget = max_len - P - N  # the prompt and every separator are kept
        if budget < 0:
            raise ValueError(f"{where}prompt ({P} tokens) plus {N} separators exceed max_len={max_len}")
        new = fit_lengths(lengths, budget)
        warnings.warn(f"{where}pack of {P + N + sum(lengths)} tokens exceeds max_len={max_len}: responses "
                      f"shortened from {lengths} to {new} tokens (longest first)")
        response_ids = [r[:n] for r, n in zip(response_ids, new)]
        lengths, truncated = new, True
    start = int(prompt_pos.max()) + 1 if P else 0
    ids, pos, seg, seps = [prompt_ids], [prompt_pos], [torch.zeros(P, dtype=torch.long)], []
    offset, t = start, P
    for r, resp in enumerate(response_ids, 1):
        n = len(resp) + 1
        ids.append(torch.tensor(list(resp) + [sep_id], dtype=torch.long))
        pos.append(torch.arange(offset, offset + n).expand(3, n))
        seg.append(torch.full((n,), r, dtype=torch.long))
        seps.append(t + n - 1)
        t += n
        offset = start if mode == "independent" else offset + n
    return Pack(torch.cat(ids), torch.cat(pos, 1), torch.cat(seg), torch.tensor(seps), pixel_values, grid_thw, truncated,
                vision)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (R, T) rows, right-padded
    position_ids: torch.Tensor  # (3, R, T)
    mask: torch.Tensor  # (R, T, T) bool
    sep_index: torch.Tensor  # (S, Nmax) per sample (pack): its separators' offsets in its row, 0 where none
    score_valid: torch.Tensor  # (S, Nmax) bool
    row: torch.Tensor  # (S,) the row that holds each sample's pack
    pixel_values: torch.Tensor = None
    grid_thw: torch.Tensor = None
    causal: bool = False  # mask is plain causal with no padding: the model may use SDPA's is_causal path
    vision: tuple = None  # precomputed vision-tower outputs of every pack, in place of pixel_values


def first_fit(lengths, row_tokens):
    """Each pack joins the first row with room for it within row_tokens, else opens a row (a pack
    longer than row_tokens has a row to itself). row_tokens = 0: one pack per row."""
    rows, room = [], []
    for i, n in enumerate(lengths):
        k = next((k for k, r in enumerate(room) if n <= r), None) if row_tokens else None
        if k is None:
            rows.append([]), room.append(row_tokens - n)
            k = len(rows) - 1
        else:
            room[k] -= n
        rows[k].append(i)
    return rows


def layout_cost(lengths, rows, pair_cost):
    """R rows padded to T tokens: R T tokens through the linear layers and R T^2 (query, key) pairs in
    attention, the pairs weighted by pair_cost (attention_pair_cost())."""
    T = max(sum(lengths[i] for i in r) for r in rows)
    return len(rows) * T * (1 + pair_cost * T)


def place(lengths, row_tokens, pair_cost=0.0):
    """Rows for packs of these lengths: a list of rows, each the indices of the packs it holds.
    row_tokens = 0: one pack per row. Otherwise packs share rows of at most row_tokens tokens (a longer
    pack gets a row to itself), and of the candidate layouts the one of least layout_cost() is kept.
    The candidates: first fit in the order given, and longest-first to the least-filled row (LPT
    scheduling) for each row count from the fewest that could hold the packs to three more. On the
    shape-world demo's batches first fit pads 13% of the cells, the cheapest layout 6%: forward,
    backward and AdamW take 0.90x the time (the whole demo 4 - 7% less), for 70 us of Python a step."""
    best = first_fit(lengths, row_tokens)
    if not row_tokens:
        return best
    best_cost = layout_cost(lengths, best, pair_cost)
    alone = [[i] for i, n in enumerate(lengths) if n > row_tokens]
    short = sorted((i for i, n in enumerate(lengths) if n <= row_tokens), key=lambda i: -lengths[i])
    fewest = math.ceil(sum(lengths[i] for i in short) / row_tokens)
    for R in range(max(fewest, 1), min(fewest + 3, len(short)) + 1):
        rows, load = [[] for _ in range(R)], [0] * R
        for i in short:  # longest first, each to the row with the fewest tokens so far
            k = load.index(min(load))
            rows[k].append(i)
            load[k] += lengths[i]
        if max(load) > row_tokens:
            continue
        c = layout_cost(lengths, alone + rows, pair_cost)
        if c < best_cost:  # a tie keeps first fit
            best, best_cost = alone + rows, c
    return best


def attention_pair_cost(cfg):
    """FLOPs of one (query, key) attention pair over those of one token through the decoder's linear
    layers (forward_flops' own terms): how place() weighs a row's T^2 pairs against its T tokens.
    1/768 for the shape-world backbone; about 1/12,000 for Qwen3-VL-4B, whose rows of a few hundred
    tokens cost their linear layers almost alone."""
    return forward_flops(cfg, 0, 1)["text_attention"] / forward_flops(cfg, 1, 0)["text_linear"]


def collate(packs, mode, pad_id=0, row_tokens=0, pair_cost=0.0):
    """Packs into one right-padded batch; padding keys are masked out and never scored. With
    row_tokens, several short packs share a row (place(), weighing attention by pair_cost) and a
    block-diagonal mask keeps them apart:
    their positions already start at 0 each, so every score is the one they get alone, for less
    padding (shape-world's packs of 50 - 200 tokens waste half a batch padded to the longest)."""
    rows = place([len(p.input_ids) for p in packs], row_tokens, pair_cost)
    R, S, N = len(rows), len(packs), max(len(p.sep_index) for p in packs)
    T = max(sum(len(packs[i].input_ids) for i in r) for r in rows)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros(3, R, T, dtype=torch.long)
    seg = torch.full((R, T), -1, dtype=torch.long)
    doc = torch.full((R, T), -1, dtype=torch.long)  # which pack a token belongs to
    sep = torch.zeros(S, N, dtype=torch.long)
    score_valid = torch.zeros(S, N, dtype=torch.bool)
    row = torch.zeros(S, dtype=torch.long)
    for b, r in enumerate(rows):
        t = 0
        for i in r:
            p, n = packs[i], len(packs[i].input_ids)
            ids[b, t:t + n], pos[:, b, t:t + n], seg[b, t:t + n], doc[b, t:t + n] = p.input_ids, p.position_ids, p.segment, i
            sep[i, :len(p.sep_index)], score_valid[i, :len(p.sep_index)], row[i] = p.sep_index + t, True, b
            t += n
    valid = doc >= 0
    index = torch.arange(T).expand(R, T)
    if mode == "independent":
        mask = vlm.attention_mask(index, index, valid, seg, seg)
    else:
        mask = vlm.attention_mask(index, index, valid)
    if R < S:
        mask = mask & (doc[:, :, None] == doc[:, None, :])  # packs sharing a row never see each other
    order = [packs[i] for r in rows for i in r]  # media in order of appearance, row by row
    media = [p.pixel_values for p in order if p.pixel_values is not None]
    grids = [p.grid_thw for p in order if p.grid_thw is not None]
    vision = [p.vision for p in order if p.vision is not None]
    if media and vision:  # the model takes one or the other for the whole batch
        raise ValueError("a batch mixes packs with pixel rows and packs with precomputed vision outputs")
    if vision:  # tokens, then each DeepStack level, in order of appearance: (sum n, D) each
        # kept ones live in host memory, ones PromptCache only held for this batch on the device: join there
        d = next((v[0].device for v in vision if v[0].device.type != "cpu"), torch.device("cpu"))
        vision = (torch.cat([v[0].to(d) for v in vision]),
                  [torch.cat([f.to(d) for f in level]) for level in zip(*(v[1] for v in vision))])
    return PackedBatch(ids, pos, mask, sep, score_valid, row, torch.cat(media) if media else None,
                       torch.cat(grids) if grids else None, causal=mode == "joint" and bool(valid.all()) and R == S,
                       vision=vision or None)


# -----------------------------------------------------------------------------
# Value head and losses


class ValueHead(nn.Module):
    """hidden -> 1024 -> 1 with SiLU, kept and run in fp32 (scores are compared across responses,
    and bf16 rounding of nearly equal scores would pick the winner at random)."""

    def __init__(self, dim, hidden=1024):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.normal_(self.fc1.weight, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.fc2.weight, std=1e-3)  # small: start with near-equal scores
        nn.init.zeros_(self.fc1.bias), nn.init.zeros_(self.fc2.bias)

    def forward(self, h):
        # autocast off: under CUDA's bf16 autocast fc1 and fc2 would run in bf16 and round the scores
        with torch.autocast(h.device.type, enabled=False):
            return self.fc2(F.silu(self.fc1(h.float()))).squeeze(-1)


def best_target(ranks, valid):
    """Uniform distribution over the best-ranked responses (1 = best; ties share the mass)."""
    r = ranks.masked_fill(~valid, 10**9)
    best = (r == r.min(-1, keepdim=True).values) & valid
    return best.float() / best.sum(-1, keepdim=True)


def listwise_ce_loss(scores, ranks, valid):
    """Cross-entropy of softmax(scores) against the best response (soft target over ties).
    scores (B, N) float, ranks (B, N) int (1 = best), valid (B, N) bool. Returns (loss, metrics)."""
    logp = scores.masked_fill(~valid, float("-inf")).log_softmax(-1)
    target = best_target(ranks, valid)
    loss = -(target * logp.masked_fill(~valid, 0)).sum(-1).mean()
    pick = scores.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)
    acc = (target.gather(-1, pick) > 0).float().mean()  # the top score is one of the best
    return loss, {"loss": loss.item(), "acc": acc.item()}


def plackett_luce_loss(scores, ranks, valid):
    """Negative log-likelihood of the full ranking under Plackett-Luce: pick the best of the rest,
    again and again. Tied responses are picked together, each against everything not ranked above
    the tie (Breslow's rule for ties in survival models): the loss does not depend on the order ties
    are listed in, and for an all-tied sample it is smallest when the scores are equal."""
    B, N = scores.shape
    r = ranks.masked_fill(~valid, 10**9)
    order = torch.argsort(r, dim=-1, stable=True)
    s = scores.gather(-1, order).masked_fill(~valid.gather(-1, order), float("-inf"))  # best first
    # log sum_{j >= k} exp(s_j): a reversed cumulative logsumexp
    tail = s.flip(-1).logcumsumexp(-1).flip(-1)
    r_sorted = r.gather(-1, order).contiguous()
    first = torch.searchsorted(r_sorted, r_sorted)  # (B, N): where each response's tie group starts
    ok = valid.gather(-1, order)
    nll = (tail.gather(-1, first) - s).masked_fill(~ok, 0).sum(-1).mean()
    pick = scores.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)
    acc = (best_target(ranks, valid).gather(-1, pick) > 0).float().mean()
    return nll, {"loss": nll.item(), "acc": acc.item()}


def ce_pl_loss(scores, ranks, valid, pl_weight=0.5):
    """CE + pl_weight x Plackett-Luce. CE alone trains only the top pick (shape-world: pairwise 0.66),
    PL alone the whole order at some cost to the top pick; PL's first factor is CE itself, so this is
    Plackett-Luce with the pick of the best weighted 1 + 1 / pl_weight times as much as each later pick."""
    loss, m = listwise_ce_loss(scores, ranks, valid)
    loss = loss + pl_weight * plackett_luce_loss(scores, ranks, valid)[0]
    return loss, {**m, "loss": loss.item()}


LOSSES = {"ce": listwise_ce_loss, "pl": plackett_luce_loss, "ce+pl": ce_pl_loss}

# -----------------------------------------------------------------------------
# The reward model


class RewardModel(nn.Module):
    def __init__(self, backbone, processor, head_hidden=1024, sep_token="<|im_end|>", max_len=4096,
                 max_responses=16, mode="joint"):
        super().__init__()
        self.backbone, self.processor = backbone, processor
        self.mode = mode  # the attention mode it was trained in: score() uses it unless told otherwise
        self.head = ValueHead(backbone.cfg.text.hidden_size, head_hidden)
        try:
            self.sep_token, self.sep_id = sep_token, processor.tokenizer.token_id(sep_token)
        except KeyError:
            raise ValueError(f"separator {sep_token!r} (--sep-token) is not a token of this tokenizer") from None
        cfg = backbone.cfg
        if self.sep_id in (cfg.image_token_id, cfg.video_token_id):  # the model fills those slots with pixels
            raise ValueError(f"separator {sep_token!r} (--sep-token) is the image/video pad token; choose another")
        self.max_len, self.max_responses = max_len, max_responses

    @property
    def device(self):
        return self.head.fc1.weight.device

    def encode_prompt(self, prompt, images=(), videos=(), video_fps=None):
        """The user turn through the processor: (ids (P,), positions (3, P), pixel rows or None,
        grid_thw or None). Training caches this: it does not depend on the responses or their order."""
        ids, rows, grids = self.processor.encode_user(images, videos, prompt, video_fps)
        ids = torch.tensor(ids)
        grid = torch.tensor(grids, dtype=torch.long) if grids else None
        return ids, vlm.rope_positions(ids, grid, self.backbone.cfg), torch.cat(rows) if rows else None, grid

    def encode(self, prompt, responses, images=(), videos=(), mode="joint", where="", encoded_prompt=None,
               encoded_responses=None, vision=None):
        """Text, media and responses -> Pack (the prompt's media go through the processor once).
        encoded_prompt / encoded_responses / vision: encode_prompt's output, the responses' token ids and
        the media's vision-tower outputs (PromptCache's encoded prompt then has no pixel rows), when the
        caller has them already (PromptCache)."""
        if len(responses) > self.max_responses:
            raise ValueError(f"{where}{len(responses)} responses, more than max_responses={self.max_responses}")
        if not responses:
            raise ValueError(f"{where}no responses to score")
        ids, pos, rows, grid = encoded_prompt or self.encode_prompt(prompt, images, videos)
        resp = encoded_responses or [self.processor.tokenizer.encode(r) for r in responses]
        return pack(ids, pos, resp, self.sep_id, mode, self.max_len, rows, grid, where, vision)

    def forward(self, batch):
        """PackedBatch -> scores (S, Nmax), a line per pack; entries where score_valid is False are meaningless."""
        d = self.device
        pv = None if batch.pixel_values is None else batch.pixel_values.to(d)
        grid = None if batch.grid_thw is None else batch.grid_thw.to(d)
        vision = None if batch.vision is None else (batch.vision[0].to(d), [f.to(d) for f in batch.vision[1]])
        # a joint pack without padding is plain causal: no mask lets SDPA take its is_causal kernel
        mask = None if batch.causal else batch.mask.to(d)
        # only the separators' hidden states, (S, Nmax, D): the last layer computes nothing else
        h_sep = self.backbone(batch.input_ids.to(d), pv, grid, batch.position_ids.to(d), mask, return_hidden=True,
                              at=(batch.row.to(d), batch.sep_index.to(d)), vision=vision)
        return self.head(h_sep)

    @torch.no_grad()
    def score(self, images=(), prompt="", responses=(), mode=None, videos=()):
        """Scores of N responses to one prompt, from one forward pass; mode None: the trained one.
        images: PIL images or image file paths; videos: frame folders, frame lists or files."""
        for name, value in (("responses", responses), ("images", images), ("videos", videos)):
            if isinstance(value, (str, os.PathLike)):  # a bare string would be read character by character
                raise TypeError(f"{name}: expected a list, found the single {type(value).__name__} {str(value)[:40]!r}")
        images = [read_image(i, "images") if isinstance(i, (str, os.PathLike)) else i for i in images]
        mode = mode or self.mode
        p = self.encode(prompt, list(responses), images, videos, mode)
        with precision(self.device.type)[1]:  # as train and eval run it: the same scores from each
            return self(collate([p], mode))[0, :len(responses)].tolist()

    # --- saving and loading (adapter + head + settings; the backbone stays where it is) ---

    def settings(self):
        return {"sep_token": self.sep_token, "max_len": self.max_len, "max_responses": self.max_responses,
                "head_hidden": self.head.fc1.out_features, "mode": self.mode}

    def save(self, folder, extra=None):
        """adapter.safetensors + the head and settings (save_head) into `folder`; rm_config.json says how
        to rebuild the adapter (`lora`), unless `extra` says it (train records its target patterns)."""
        os.makedirs(folder, exist_ok=True)
        lora.save_lora(self.backbone, os.path.join(folder, "adapter.safetensors"))
        hp = lora._hyperparameters(self.backbone)
        # the checkpoint's names of what is adapted (q_proj, not a fused qkv_proj): fullmatch finds exactly them again
        names = [re.escape(n) for n in lora.adapted_modules(self.backbone)]
        self.save_head(folder, {"lora": {"r": hp["r"], "alpha": hp["alpha"], "use_rslora": hp["use_rslora"],
                                         "targets": names}, **(extra or {})})

    def save_head(self, folder, extra=None):
        """head.safetensors and rm_config.json: with an adapter (save) or beside merged weights (export)."""
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  os.path.join(folder, "head.safetensors"))
        _write_json(os.path.join(folder, "rm_config.json"), {**self.settings(), **(extra or {})})

    @classmethod
    def load(cls, model, adapter=None, dtype=torch.float32, device="cpu", **settings):
        """A backbone folder (Hub layout) plus the adapter folder `mrrm.py train` wrote, or one merged
        folder (`train --export`) that holds head.safetensors and rm_config.json itself."""
        merged = os.path.isfile(os.path.join(model, "head.safetensors"))
        if adapter is not None and merged:
            raise ValueError(f"{model} is a merged reward model (it holds head.safetensors): its LoRA is already "
                             f"in its weights, and adding {adapter} would apply it twice; load it without an "
                             "adapter (--adapter ''), or give the adapter the backbone it was trained on")
        if adapter is not None:
            check_backbone(adapter, model)
        backbone = vlm.load_model(model, dtype=dtype, device=device)
        proc = vlm.Processor(model, backbone.cfg)
        if adapter is None and merged:
            head_dir, saved = model, _read_rm_config(model)
        elif adapter is not None:
            head_dir, saved = adapter, _read_rm_config(adapter)
            cfg = saved.get("lora")
            if cfg is None:
                raise ValueError(f"{adapter}/rm_config.json: no 'lora' entry; is this a merged export? "
                                 f"then pass it as the model folder without --adapter")
            lora.inject_lora(backbone, r=cfg["r"], alpha=cfg["alpha"], dropout=0.0, targets=cfg["targets"],
                             use_rslora=cfg.get("use_rslora", False))
            lora.load_lora(backbone, os.path.join(adapter, "adapter.safetensors"))
        else:
            head_dir, saved = None, {}  # a bare backbone: random head, for tests and benchmarks
        keep = {k: saved[k] for k in ("sep_token", "max_len", "max_responses", "head_hidden", "mode") if k in saved}
        rm = cls(backbone, proc, **{**keep, **settings})
        if head_dir is not None:
            path = os.path.join(head_dir, "head.safetensors")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: not found")
            try:
                rm.head.load_state_dict(vlm.load_safetensors(path), strict=True)
            except RuntimeError as e:
                raise ValueError(f"{path}: does not fit a value head of hidden size "
                                 f"{rm.head.fc1.out_features} on a {backbone.cfg.text.hidden_size}-wide backbone: {e}") from None
        return rm.to(device).eval()


def backbone_fingerprint(folder):
    """A short hash of a checkpoint's weights: each safetensors file's header and first MiB of tensor
    data. A LoRA fits any backbone of the same shapes, so a path alone cannot tell that the files there
    were replaced by other weights; reading a few MiB can, without hashing gigabytes."""
    import hashlib
    h = hashlib.sha256()
    for path in sorted(set(vlm.read_checkpoint_index(folder).values())):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")  # safetensors: 8-byte header length, JSON header, data
            h.update(f.read(n))
            h.update(f.read(2**20))
    return h.hexdigest()[:16]


def check_backbone(adapter, model):
    """Refuse an adapter on a backbone whose weights differ from those it was trained on (when it recorded them)."""
    want = _read_rm_config(adapter).get("base_fingerprint")
    found = backbone_fingerprint(model) if want else None
    if want and found != want:
        raise ValueError(f"{adapter} was trained on other weights than {model} holds (fingerprint {want}, found "
                         f"{found}): a LoRA and head on the wrong backbone give scores "
                         "without meaning; give --model the backbone it was trained on")


def _read_rm_config(folder):
    path = os.path.join(folder, "rm_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; expected a folder written by `mrrm.py train`")
    config = vlm.read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


# -----------------------------------------------------------------------------
# Data: the authors' JSONL schema (prompt, responses, rankings with 1 = best, image, video, category, id)

_WS = re.compile(r"\s*")


def read_records(path, errors=None):
    """Yield (where, obj) for each record of a JSONL file, a file holding one JSON list, or the
    authors' one JSON object of lists. `where` is the line number a record starts on (for a JSON
    list whose elements share a line, 'line[index]'; for the object of lists, 'key[index]').

    A malformed or non-UTF-8 JSONL line raises ValueError('file:line: ...'), or, when `errors` is a
    list, is appended to it as that message and skipped. A malformed JSON list or object always
    raises: after a syntax error there is no reliable place to resume.
    """
    path = str(path)
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Windows editors write one)
        data = data[3:]
    head = data.lstrip()[:1]
    if head == b"[":
        yield from _read_json_list(path, _decode(path, data))
        return
    # a .json file holding one object is the authors' {"ranking_data": [...], ...}; else it is JSONL
    # (parsed leniently first: a JSONL line that is not UTF-8 is that line's problem, reported below)
    if head == b"{" and path.endswith(".json"):
        try:
            obj = json.loads(data.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": more than one value, i.e. JSONL under a .json name
                _decode(path, data)
                raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
        else:
            _decode(path, data)  # one object: all of it must be UTF-8
            yield from _read_json_dict(path, obj)
            return
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # also: nesting too deep, an integer of 5,000 digits
            what = (f"malformed JSON: {e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError)
                    else f"not UTF-8 text ({e.reason} at byte {e.start + 1})" if isinstance(e, UnicodeDecodeError)
                    else f"malformed JSON: {e}")
            if errors is None:
                raise ValueError(f"{path}:{line_no}: {what}") from None
            errors.append(f"{path}:{line_no}: {what}")
            continue
        yield line_no, obj


def _decode(path, data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def _read_json_dict(path, obj):
    """One JSON object whose list values hold the samples; each is located as `key[i]`."""
    lists = {k: v for k, v in obj.items() if isinstance(v, list)}
    if not lists:
        raise ValueError(f"{path}: expected JSONL, a JSON list, or a JSON object holding lists of samples; "
                         f"found an object with keys {sorted(obj)[:8]}")
    for key, items in lists.items():
        for i, item in enumerate(items):
            yield f"{key}[{i}]", item


def _read_json_list(path, text):
    # raw_decode walks the list element by element, so each element keeps the line it starts on
    # (json.load would give us the objects but not where they came from).
    decoder = json.JSONDecoder()
    pos = _WS.match(text, 0).end() + 1  # past the '['
    line, counted, items = 1, 0, []
    pos = _WS.match(text, pos).end()
    while pos >= len(text) or text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
        items.append((line, obj))
        pos = _WS.match(text, pos).end()
        if pos < len(text) and text[pos] == "]":
            break
        if pos >= len(text) or text[pos] != ",":
            where = line + text.count("\n", counted, pos)
            found = repr(text[pos]) if pos < len(text) else "end of file"
            raise ValueError(f"{path}:{where}: malformed JSON: expected ',' or ']' after an element, found {found}")
        pos = _WS.match(text, pos + 1).end()
    end = _WS.match(text, pos + 1).end()
    if end < len(text):  # a second list, or anything, after the closing ']' would be silently dropped
        where = line + text.count("\n", counted, end)
        raise ValueError(f"{path}:{where}: malformed JSON: text after the list's closing ']' "
                         f"(one JSON list per file, or one record per line)")
    # a list written on one line (json.dump's default) puts every element on line 1: number them there,
    # so each sample keeps a location of its own (errors, default ids and the prompt cache key on it)
    per_line = Counter(ln for ln, _ in items)
    for i, (ln, obj) in enumerate(items):
        yield (f"{ln}[{i}]" if per_line[ln] > 1 else ln), obj


OPTIONAL_FIELDS = ("image", "video", "category", "id", "pair", "fps", "sampling_interval")


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _paths_problem(v):
    """Why v is not a path or a non-empty list of paths, or None when it is."""
    if isinstance(v, str):
        return None if v else "expected a path, found an empty string"
    if isinstance(v, list) and v and all(isinstance(p, str) and p for p in v):
        return None
    return f"expected a path or a non-empty list of paths, found {json.dumps(v)[:60]}"


def prompt_of(obj):
    """The authors' files name the prompt `prompt` or `question`."""
    return obj["prompt"] if "prompt" in obj else obj.get("question")


def validate_sample(obj, where):
    """Every way `obj` breaks mrrm's sample schema, each as 'where: field: what is wrong'."""
    if not isinstance(obj, dict):
        return [f"{where}: expected a JSON object, found {type(obj).__name__}"]
    problems = []
    if not isinstance(prompt_of(obj), str):
        problems.append(f"{where}: prompt: expected a string, found {type(prompt_of(obj)).__name__}")
    responses, rankings = obj.get("responses"), obj.get("rankings")
    if not (isinstance(responses, list) and len(responses) >= 2 and all(isinstance(r, str) for r in responses)):
        problems.append(f"{where}: responses: expected a list of 2 or more strings, found {json.dumps(responses)[:60]}")
    elif not (isinstance(rankings, list) and all(is_int(r) for r in rankings)):
        problems.append(f"{where}: rankings: expected a list of ints, found {json.dumps(rankings)[:60]}")
    elif len(rankings) != len(responses):
        problems.append(f"{where}: rankings: expected {len(responses)} ints (one per response), found {len(rankings)}")
    elif min(rankings) != 1 or max(rankings) > len(rankings):
        problems.append(f"{where}: rankings: expected ranks in 1..{len(rankings)}, 1 = best present, "
                        f"found {rankings}")
    for key in ("image", "video"):
        if key in obj and (why := _paths_problem(obj[key])):
            problems.append(f"{where}: {key}: {why}")
    if "category" in obj and not isinstance(obj["category"], str):
        problems.append(f"{where}: category: expected a string, found {type(obj['category']).__name__}")
    if "id" in obj and not (isinstance(obj["id"], str) or is_int(obj["id"])):
        problems.append(f"{where}: id: expected a string or int, found {type(obj['id']).__name__}")
    if "pair" in obj and not (is_int(obj["pair"]) and obj["pair"] >= 0):
        problems.append(f"{where}: pair: expected an int >= 0, found {obj['pair']!r}")
    for key in ("fps", "sampling_interval"):
        v = obj.get(key)
        if v is not None and not ((is_int(v) or isinstance(v, float)) and 0 < v < float("inf")):
            problems.append(f"{where}: {key}: expected a positive number, found {v!r}")
    return problems


def frame_rate(obj):
    """Frames per second of a record's frame folder or frame list: `fps`, else 1 / `sampling_interval`
    (seconds between frames), else None (the processor's 2 fps). The authors' loader reads either field
    as seconds between frames and assumes 4 s when both are absent; a rate named fps is read as a rate here."""
    if obj.get("fps") is not None:
        return float(obj["fps"])
    return 1.0 / obj["sampling_interval"] if obj.get("sampling_interval") is not None else None




# -----------------------------------------------------------------------------
# Checkpoints: safetensors + JSON only (no pickle), written to a temp folder and renamed, so a run
# killed mid-save leaves the previous checkpoint and the `latest` pointer intact.


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def rng_state():
    """Every random stream training draws from, as safetensors-ready tensors + JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"python": [version, list(state), gauss]}


def set_rng_state(tensors, info):
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))])
    version, state, gauss = info["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(out, step, named_params, optimizer, state, keep=0, rng=None):
    """out/checkpoint-{step:06d}/ with the trainable tensors, the optimizer's state (tensors in
    safetensors, hyperparameters in JSON), the RNG streams (`rng`, a rng_state() taken earlier, or
    now) and `state` (a JSON dict: settings, total steps). Keeps the newest `keep` checkpoints
    (0: all), never the one just written. Returns the folder."""
    from safetensors.torch import save_file
    final = os.path.join(out, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous().cpu() for k, v in named_params.items()}, os.path.join(tmp, "trainable.safetensors"))
    opt = optimizer.state_dict()
    save_file({f"{i}.{k}": v.contiguous().cpu() for i, s in opt["state"].items() for k, v in s.items()},
              os.path.join(tmp, "optimizer.safetensors"))
    rng_tensors, rng_info = rng or rng_state()
    save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "param_groups": opt["param_groups"], "rng": rng_info, **state}, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_json(os.path.join(out, "latest.json"), {"checkpoint": os.path.basename(final), "step": step})
    if keep:  # only once the new one is in place and pointed at
        done = [folder for at, folder in complete_checkpoints(out) if at <= step]
        for folder in done[:-keep]:
            shutil.rmtree(folder, ignore_errors=True)
    return final


def save_at_stop(error, then, out, step, named_params, optimizer, state, keep=0, rng=None):
    """A run stopped by `error` saves its last finished step and says so, with `then` (what to do next).
    If that save fails too (the disk is full), it says so and the first error stops the run."""
    try:
        folder = save_checkpoint(out, step, named_params, optimizer, state, keep, rng)
    except BaseException as again:
        print(f"stopped during step {step + 1}; could not save step {step} ({again!r:.120})", file=sys.stderr)
        raise error from None
    print(f"stopped during step {step + 1}; saved {folder}: {then}", file=sys.stderr)


def complete_checkpoints(out):
    """[(step, folder)] of out's checkpoints, oldest first: by step, not name (step 1,000,000 has 7
    digits). Only a finished save renames a folder to this name (checkpoint-N.tmp until then)."""
    names = [n for n in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", n)] if os.path.isdir(out) else []
    return sorted((int(n[11:]), os.path.join(out, n)) for n in names)


def latest_checkpoint(out):
    """The folder `out/latest.json` points at, or None when the run has none. A run stopped between a
    checkpoint's rename and the pointer's update left a newer complete checkpoint: that one."""
    path = os.path.join(out, "latest.json")
    done = complete_checkpoints(out)
    if not os.path.isfile(path):
        return done[-1][1] if done else None
    pointer = vlm.read_json(path)
    if not isinstance(pointer, dict) or not isinstance(pointer.get("checkpoint"), str):
        raise ValueError(f"{path}: expected {{\"checkpoint\": NAME, ...}}, found {pointer!r:.80}")
    folder = os.path.join(out, pointer["checkpoint"])
    if done and done[-1][0] > pointer.get("step", -1):
        return done[-1][1]
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path} points at {folder}, which does not exist")
    return folder


def load_checkpoint(folder, named_params, optimizer):
    """Restore parameters, optimizer and RNG streams in place; returns the saved state dict."""
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder}: checkpoint is missing {name}")
    saved = vlm.load_safetensors(os.path.join(folder, "trainable.safetensors"))
    if set(saved) != set(named_params):
        missing, extra = sorted(set(named_params) - set(saved)), sorted(set(saved) - set(named_params))
        raise ValueError(f"{folder}: checkpoint does not match the model being trained; missing {missing[:5]}, "
                         f"unexpected {extra[:5]} (different LoRA targets or head size, or a run of mrrm before "
                         f"q/k/v and gate/up were fused?)")
    with torch.no_grad():
        for k, p in named_params.items():
            p.copy_(saved[k])
    state = vlm.read_json(os.path.join(folder, "state.json"))
    dev = next(iter(named_params.values())).device
    opt = {}
    for key, v in vlm.load_safetensors(os.path.join(folder, "optimizer.safetensors")).items():
        i, k = key.split(".", 1)
        opt.setdefault(int(i), {})[k] = v if k == "step" else v.to(dev)
    optimizer.load_state_dict({"state": opt, "param_groups": state.pop("param_groups")})
    set_rng_state(vlm.load_safetensors(os.path.join(folder, "rng.safetensors")), state.pop("rng"))
    return state


# -----------------------------------------------------------------------------
# Samples: validated records with their media paths resolved


@dataclass
class Sample:
    id: str
    prompt: str
    responses: list
    rankings: list
    images: list  # absolute paths
    videos: list  # each a video file, a folder of frames, or a list of frame paths
    category: str
    where: str  # "file:line", for every later error about this sample
    pair: int = None
    video_fps: float = None  # frame rate of a frame folder / list (the record's fps or 1 / sampling_interval)
    id_given: bool = True  # False: the record had no id, and `id` is its file:line


def _resolve(p, base):
    return p if os.path.isabs(p) else os.path.join(base, p)


def load_samples(path, image_root=None, skip_bad=False, max_responses=None):
    """Every record of a JSONL (or JSON list) file as a Sample. Each bad line is reported as
    'file:line: field: what is wrong'; any bad line stops here (before training starts) unless
    skip_bad, which skips and counts them. Media paths are relative to the file's folder unless
    absolute or image_root is given; each must exist."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: data file not found")
    base = image_root or os.path.dirname(os.path.abspath(path))
    errors, samples, bad, found_here = [], [], 0, 0
    for line, obj in read_records(path, errors):
        where = f"{path}:{line}"
        if isinstance(obj, dict):  # null in an optional field means absent, as converters write unpublished ones
            obj = {k: v for k, v in obj.items() if v is not None or k not in OPTIONAL_FIELDS + ("prompt", "question")}
        problems = validate_sample(obj, where)
        images, videos = [], []
        if not problems:
            if max_responses and len(obj["responses"]) > max_responses:
                problems.append(f"{where}: responses: {len(obj['responses'])} responses, more than "
                                f"max_responses={max_responses}")
            img = obj.get("image", [])
            images = [_resolve(p, base) for p in ([img] if isinstance(img, str) else img)]
            problems += [f"{where}: image: {p}: file not found" for p in images if not os.path.isfile(p)]
            vid = obj.get("video")
            if isinstance(vid, str):
                videos = [_resolve(vid, base)]
                if not os.path.exists(videos[0]):
                    problems.append(f"{where}: video: {videos[0]}: not found")
            elif isinstance(vid, list):
                videos = [[_resolve(p, base) for p in vid]]
                problems += [f"{where}: video: frame {p}: file not found" for p in videos[0] if not os.path.isfile(p)]
            if not problems:
                problems += media_problems(images, videos, where)
        if problems:
            errors += problems
            bad, found_here = bad + 1, found_here + len(problems)
            continue
        samples.append(Sample(str(obj.get("id", f"{os.path.basename(path)}:{line}")), prompt_of(obj), obj["responses"],
                              obj["rankings"], images, videos, obj.get("category", ""), where, obj.get("pair"),
                              frame_rate(obj) if videos and (isinstance(videos[0], list) or os.path.isdir(videos[0])) else None,
                              "id" in obj))
    bad += len(errors) - found_here  # read_records' lines: one message each (malformed JSON, not UTF-8)
    shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
    if errors and not skip_bad:
        raise ValueError(f"{path}: {bad} bad record(s); fix them or pass --skip-bad to skip them:\n  {shown}")
    if errors:
        print(f"{path}: skipped {bad} bad record(s) (--skip-bad):\n  {shown}", file=sys.stderr)
    if not samples:
        raise ValueError(f"{path}: no usable samples")
    return samples


def media_problems(images, videos, where):
    """What stops an image or video of a sample from being read, found before training starts (a bad
    file met at step 5,000 would stop the run there): each image file's header must open, a frame
    folder must hold frames, a video file other than a GIF needs PyAV."""
    from PIL import Image
    frames = [p for v in videos if isinstance(v, list) for p in v]
    frames += [os.path.join(v, n) for v in videos if isinstance(v, str) and os.path.isdir(v) for n in vlm.frame_names(v)]
    problems = []
    for p in images + frames:
        what = "image" if p in images else "video: frame"
        try:
            with Image.open(p) as im:
                w, h = im.size
        except (OSError, Image.DecompressionBombError) as e:  # a bomb (too many pixels) is not an OSError
            problems.append(f"{where}: {what}: {p}: cannot be read as an image ({e})")
            continue
        if what == "image" and max(w, h) > 200 * min(w, h):
            problems.append(f"{where}: image: {p}: {w}x{h}: aspect ratio above 200 is not supported by Qwen3-VL")
    for v in videos:
        if isinstance(v, list):
            continue
        if os.path.isdir(v):
            if not vlm.frame_names(v):
                problems.append(f"{where}: video: {v}: folder holds no {'/'.join(vlm.FRAME_EXTENSIONS)} frames")
        elif not v.lower().endswith(".gif") and importlib.util.find_spec("av") is None:
            problems.append(f"{where}: video: {v}: decoding a video file needs PyAV (pip install av); "
                            "or give a folder of frames, a list of frame paths, or a GIF")
    return problems


def read_image(path, where):
    """An image file as upright RGB (vlm.open_image); a file that is not one is a ValueError naming
    `where` (a sample or a flag)."""
    try:
        return vlm.open_image(path)
    except FileNotFoundError:  # checked before training; gone since: this record's problem (--skip-bad skips it)
        raise ValueError(f"{where}: {path}: file not found") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def open_images(sample):
    return [read_image(p, f"{sample.where}: image") for p in sample.images]


class PromptCache:
    """Each sample encoded once, up to a byte budget: the prompt (ids, positions, pixel rows, grid) and
    each response's token ids, so a sample is processed once however often its responses are
    reshuffled (tokenizing the 4 responses again cost ~0.1 ms a use, 2 ms a shape-world step).
    When the vision tower is frozen (LoRA on the language model only, the default) its outputs for a
    sample never change: those are kept instead of the pixel rows, and the tower runs once per sample,
    not at every use (shape-world: 6.7 of a step's 101 ms). fill() encodes a batch's new samples with
    one run of the tower, as the forward would; one at a time it ran 3x slower on shape-world.
    A budget of 0 keeps nothing, and packs pixel rows as an uncached encode does."""

    def __init__(self, rm, budget_bytes):
        self.rm, self.budget, self.used, self.store, self.recent = rm, budget_bytes, 0, {}, {}
        visual = rm.backbone.model.visual
        self.vision = budget_bytes > 0 and not any(p.requires_grad for p in visual.parameters())

    def __call__(self, s):
        """-> ((ids, positions, pixel rows or None, grid), [token ids of each response], vision outputs or None)."""
        hit = self.store.get(s.where) or self.recent.get(s.where)
        if hit:
            return hit
        enc, resp = self._encode(s)
        return self._keep(s.where, enc, resp, self._tower([enc])[0] if self._uses_tower(enc, len(resp)) else None)

    def fill(self, samples, skipped=()):
        """Encode those of `samples` not kept yet, the tower running once over all their media. A sample
        that fails to encode is left out: __call__ raises its error, where the caller handles bad records
        (`skipped`: those already found bad, encode_or_skip's). What the budget cannot keep is held until
        the next fill (this batch's uses). A sample's outputs depend on its own media only, but which
        samples share the tower's run does depend on what is kept: on a GPU a resumed run may round
        them differently from the run it continues (on the CPU the tests find them equal)."""
        new, self.recent = {}, {}
        for s in samples:
            if s.where not in self.store and s.where not in new and s.where not in (skipped or ()):
                try:
                    new[s.where] = self._encode(s)
                except ValueError:
                    pass
        media = [w for w, (enc, resp) in new.items() if self._uses_tower(enc, len(resp))]
        vision = dict(zip(media, self._tower([new[w][0] for w in media]))) if media else {}
        for w, (enc, resp) in new.items():
            self._keep(w, enc, resp, vision.get(w), hold=True)

    def _encode(self, s):
        try:
            enc = self.rm.encode_prompt(s.prompt, open_images(s), s.videos, s.video_fps)
        except ValueError as e:  # a video frame that does not open, ...: the message names the record
            raise (e if str(e).startswith(s.where) else ValueError(f"{s.where}: {e}")) from None
        return enc, [self.rm.processor.tokenizer.encode(r) for r in s.responses]

    def _uses_tower(self, enc, n_responses):
        # a prompt that leaves no room for the separators fails in pack(): no tower run for it
        fits = self.rm.max_len is None or len(enc[0]) + n_responses <= self.rm.max_len
        return self.vision and enc[2] is not None and fits

    def _tower(self, encs):
        """The frozen tower over several samples' pixel rows at once -> each sample's (tokens, [DeepStack])."""
        d, merge = self.rm.device, self.rm.backbone.cfg.vision.spatial_merge_size
        rows, grid = torch.cat([e[2] for e in encs]).to(d), torch.cat([e[3] for e in encs]).to(d)
        with torch.no_grad(), precision(d.type)[1]:  # as the forward would run it: under train's autocast
            tokens, feats = self.rm.backbone.model.visual(rows, grid)
        counts = [int(e[3].prod(-1).sum()) // merge ** 2 for e in encs]  # each sample's merged tokens
        parts = [t.split(counts) for t in [tokens, *feats]]
        return [(p[0], list(p[1:])) for p in zip(*parts)]

    def _keep(self, where, enc, resp, vision, hold=False):
        if vision is not None:
            enc = enc[:2] + (None,) + enc[3:]  # the tower's outputs replace the pixel rows
        kept = [t for t in enc if t is not None] + ([vision[0], *vision[1]] if vision else [])
        size = sum(t.numel() * t.element_size() for t in kept) + 36 * sum(map(len, resp))  # a list's int: ~36 bytes
        if self.used + size <= self.budget:  # kept with the rest, in host memory, as copies: a slice of the
            # tower's batch output would keep the whole of it alive
            vision = vision and (vision[0].to("cpu", copy=True), [f.to("cpu", copy=True) for f in vision[1]])
            self.store[where], self.used = (enc, resp, vision), self.used + size
        elif hold:  # for this batch only: left on the device, no round trip through the host
            self.recent[where] = (enc, resp, vision)
        return enc, resp, vision


def encode_sample(rm, s, order, mode, cache):
    """Sample with its responses in `order` -> (Pack, ranks (N,))."""
    prompt, resp, vision = cache(s)
    return (rm.encode(s.prompt, [s.responses[i] for i in order], mode=mode, where=f"{s.where}: ",
                      encoded_prompt=prompt, encoded_responses=[resp[i] for i in order], vision=vision),
            torch.tensor([s.rankings[i] for i in order]))


def encode_or_skip(rm, s, order, mode, cache, skipped=None):
    """encode_sample, for a sample whose problem can show only now: only image headers are read before
    training, so an image whose data is cut short fails here, as does a prompt over max_len. Without
    `skipped` the ValueError naming the sample stops the run; with it (a dict, --skip-bad) the sample is
    recorded there, reported once and None returned, now and whenever it comes up again."""
    if skipped is not None and s.where in skipped:
        return None
    try:
        return encode_sample(rm, s, order, mode, cache)
    except ValueError as e:
        if skipped is None:
            raise
        skipped[s.where] = str(e)
        print(f"skipped a bad record (--skip-bad): {e}", file=sys.stderr)
        return None


# -----------------------------------------------------------------------------
# Evaluation: best-of-N, pairwise, Kendall tau-b, exact ranking; each benchmark's own rule


def sample_metrics(scores, ranks):
    """One sample's metrics. Rank 1 = best, ties allowed. Equal scores never count as a win."""
    n = len(scores)
    top = max(scores)
    # ties for best are all correct; a NaN or infinite score is never right (max() would skip past a NaN)
    best = all(math.isfinite(s) for s in scores) and all(r == min(ranks) for s, r in zip(scores, ranks) if s == top)
    right = pairs = conc = disc = tie_s = tie_r = 0
    for i in range(n):
        for j in range(i + 1, n):
            ds, dr = scores[i] - scores[j], ranks[j] - ranks[i]  # dr > 0: i is better
            tie_s += ds == 0
            tie_r += dr == 0
            if dr:
                pairs += 1
                right += ds * dr > 0
            conc += ds * dr > 0
            disc += ds * dr < 0
    n0 = n * (n - 1) / 2
    # tau-b is undefined when either side is all ties. All rankings tied: nothing to order, the sample is
    # left out of the mean (NaN). All scores tied: the model ordered nothing, which counts 0 (leaving it
    # out would let a model that scores everything equal lift its own mean tau).
    if n0 == tie_r:
        tau = float("nan")
    elif n0 == tie_s:
        tau = 0.0
    else:
        tau = (conc - disc) / math.sqrt((n0 - tie_s) * (n0 - tie_r))
    return {"best": float(best), "pairs": pairs, "pairs_right": right, "tau": tau, "exact": float(right == pairs),
            "responses": n}


def summarize(rows):
    """Rows of sample_metrics (+ 'category') -> overall and per-category figures."""
    def agg(rs):
        taus = [r["tau"] for r in rs if not math.isnan(r["tau"])]
        pairs = sum(r["pairs"] for r in rs)
        return {"n": len(rs), "best_of_n": sum(r["best"] for r in rs) / len(rs),
                "pairwise": sum(r["pairs_right"] for r in rs) / pairs if pairs else float("nan"),
                "kendall_tau": sum(taus) / len(taus) if taus else float("nan"),
                "exact_ranking": sum(r["exact"] for r in rs) / len(rs)}
    out = agg(rows)
    cats = group_by([r for r in rows if r["category"]], lambda r: r["category"])
    if cats:
        out["per_category"] = {c: agg(g) for c, g in cats.items()}
    sizes = sorted({r["responses"] for r in rows})
    if len(sizes) > 1:  # best-of-2 and best-of-4 have different chance levels (1/2, 1/4): also apart
        out["per_n"] = {f"N={k}": agg([r for r in rows if r["responses"] == k]) for k in sizes}
    return out


PROTOCOLS = ("default", "vlrewardbench", "mmrewardbench", "mmrlhf", "mr2bench")


def group_by(rows, key):
    """{name: rows} for the groups key(row), sorted by name (a row with no category goes to '-')."""
    groups = {}
    for r in rows:
        k = key(r)
        groups.setdefault("-" if k is None else str(k), []).append(r)
    return dict(sorted(groups.items()))


def mean_by(rows, key):
    """Mean `best` of the rows in each group key(row)."""
    return {k: sum(r["best"] for r in g) / len(g) for k, g in group_by(rows, key).items()}


# VL-RewardBench's scoring script (cal.py) groups samples by dataset (the image folder) and datasets into
# three domains. The published ids start with the source: RLAIF-V-, RLHF-V-, hallucination_pair- (POVID),
# mathverse_, mmmu_pro_, wildvision-battle-; the rest (LRVInstruction-, ...) are the VLFeedback set.
VLRB_DATASET_OF_PREFIX = {"RLAIF": "rlaif-v", "RLHF": "rlhf-v", "hallucination": "povid",
                          "mathverse": "reasoning_tasks", "mmmu": "reasoning_tasks", "wildvision": "wildvision-battle"}
VLRB_DOMAIN_OF_DATASET = {"rlaif-v": "hallucination", "rlhf-v": "hallucination", "povid": "hallucination",
                          "reasoning_tasks": "reasoning", "wildvision-battle": "general", "vlfeedback": "general"}


def vlrewardbench_dataset(sample_id):
    """VL-RewardBench's dataset of a sample, from its id's prefix (the text before the first '_' or '-')."""
    return VLRB_DATASET_OF_PREFIX.get(re.split(r"[_-]", str(sample_id), maxsplit=1)[0], "vlfeedback")


def acc_plus(rows):
    """MM-RLHF's ACC+: the share of ids (questions) whose pairs are all right."""
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r["best"])
    return sum(all(v) for v in by_id.values()) / len(by_id), len(by_id)


def protocol_report(name, rows):
    """Each benchmark the way its authors report it. Pairwise benchmarks are N = 2 samples, so a
    sample's `best` is its accuracy (equal scores count as wrong, as MM-RLHF asks)."""
    if name == "default":
        return summarize(rows)
    if name == "mmrewardbench":
        return {"n": len(rows), "overall_accuracy": sum(r["best"] for r in rows) / len(rows),
                "per_category": mean_by(rows, lambda r: r["category"])}
    if name == "vlrewardbench":
        # the macro average is over its 3 domains, not its 6 datasets (over the domains present: cal.py
        # divides by 3 always, which only differs on a subset missing a domain)
        dataset = lambda r: vlrewardbench_dataset(r["id"])
        per_domain = mean_by(rows, lambda r: VLRB_DOMAIN_OF_DATASET[dataset(r)])
        return {"n": len(rows), "overall_accuracy": sum(r["best"] for r in rows) / len(rows),
                "macro_average": sum(per_domain.values()) / len(per_domain), "per_domain": per_domain,
                "per_dataset": mean_by(rows, dataset)}
    if name == "mmrlhf":
        plus, n_ids = acc_plus(rows)
        per_category = {c: {"accuracy": sum(r["best"] for r in g) / len(g), "acc_plus": acc_plus(g)[0]}
                        for c, g in group_by(rows, lambda r: r["category"]).items()}
        return {"n": len(rows), "accuracy": sum(r["best"] for r in rows) / len(rows), "acc_plus": plus,
                "n_ids": n_ids, "per_category": per_category}
    if name == "mr2bench":
        return {"n": len(rows), "best_of_n": sum(r["best"] for r in rows) / len(rows), **{
            k: v for k, v in summarize(rows).items() if k in ("pairwise", "kendall_tau", "per_category", "per_n")}}
    raise ValueError(f"unknown protocol {name!r}; choose from {PROTOCOLS}")


def check_protocol(name, samples):
    """The pairwise benchmarks' rules need pairs, and VL-RewardBench / MM-RLHF read the ids (dataset,
    ACC+'s question): data that does not fit would be reported under the wrong rule without a word."""
    for s in samples:
        if name in ("vlrewardbench", "mmrewardbench", "mmrlhf") and len(s.responses) != 2:
            raise ValueError(f"{s.where}: --protocol {name} scores pairs; this sample has {len(s.responses)} responses")
        if name in ("vlrewardbench", "mmrlhf") and not s.id_given:
            raise ValueError(f"{s.where}: --protocol {name} reads each sample's id "
                             f"({'its dataset' if name == 'vlrewardbench' else 'the question ACC+ groups by'}); this one has none")


def shifts(n, orders):
    """`orders` cyclic shifts of n responses, spread evenly (orders=2, n=2: both orders)."""
    k = max(1, min(orders, n))
    return [[(i + round(j * n / k)) % n for i in range(n)] for j in range(k)]


@torch.no_grad()
def evaluate(rm, samples, mode="joint", orders=1, batch_size=8, cache=None, autocast=None, row_tokens=0,
             skipped=None):
    """Score every sample (averaged over `orders` cyclic shifts) -> (rows, scores per sample). With
    `skipped` (encode_or_skip), samples found bad only now are left out of both."""
    was_training = rm.training
    rm.eval()
    cache = cache or PromptCache(rm, 0)
    pair_cost = attention_pair_cost(rm.backbone.cfg)  # how collate weighs attention when packs share rows
    jobs = [(i, order) for i, s in enumerate(samples) for order in shifts(len(s.responses), orders)]
    sums = [[0.0] * len(s.responses) for s in samples]
    counts = [0] * len(samples)
    for b in range(0, len(jobs), batch_size):
        cache.fill([samples[i] for i, _ in jobs[b:b + batch_size]], skipped)
        encoded = [encode_or_skip(rm, samples[i], order, mode, cache, skipped) for i, order in jobs[b:b + batch_size]]
        chunk = [job for job, e in zip(jobs[b:b + batch_size], encoded) if e is not None]
        packs = [e[0] for e in encoded if e is not None]
        if not packs:
            continue
        with autocast or contextlib.nullcontext():
            scores = rm(collate(packs, mode, row_tokens=row_tokens, pair_cost=pair_cost)).float().cpu()
        for (i, order), sc in zip(chunk, scores):
            for pos, orig in enumerate(order):
                sums[i][orig] += float(sc[pos])
            counts[i] += 1
    rm.train(was_training)
    scored = [i for i in range(len(samples)) if counts[i]]
    out_scores = [[v / counts[i] for v in sums[i]] for i in scored]
    rows = [{**sample_metrics(sc, samples[i].rankings), "category": samples[i].category, "id": samples[i].id}
            for sc, i in zip(out_scores, scored)]
    return rows, out_scores


# -----------------------------------------------------------------------------
# Training

SHAPEWORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_MODEL = os.path.join(SHAPEWORLD, "shapeworld-backbone")
DEFAULT_TRAIN = os.path.join(SHAPEWORLD, "shapeworld", "train.jsonl")
DEFAULT_HELDOUT = os.path.join(SHAPEWORLD, "shapeworld", "heldout.jsonl")
DEFAULT_OUT = "runs/rm"
# settings that must not change between a run and its --resume (the rest, e.g. logging, may)
RESUME_KEYS = ("model", "train", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "rslora", "head_hidden",
               "loss", "mode", "max_responses", "max_len", "lr", "min_lr_ratio", "warmup", "decay", "cooldown",
               "weight_decay", "batch_size", "micro_batch", "epochs", "steps", "clip", "seed", "sep_token",
               "independent_warmup")


def ensure_shapeworld(path):
    """The default data is generated on first use (deterministic, about 5 s), and again when the
    folder was written by another version of data/shapeworld.py (its split.json says how)."""
    if path not in (DEFAULT_TRAIN, DEFAULT_HELDOUT):
        return
    from data import shapeworld
    folder = os.path.dirname(path)
    if os.path.isfile(path) and shapeworld.is_default_split(folder):
        return
    print(f"{folder}: written by another version of data/shapeworld.py; writing the current split ..."
          if os.path.isfile(path) else f"generating the shape-world data in {folder} ...")
    shapeworld.main(["--out", folder])


def lr_at(step, total, base, warmup, decay="wsd", min_ratio=0.0, cooldown=0.25):
    """Linear warmup over `warmup` steps, then down to min_ratio * base at `total`: linear or cosine
    decay, or "wsd" (warmup-stable-decay): flat, then linear over the last `cooldown` of all steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if decay == "linear":
        scale = 1 - frac
    elif decay == "cosine":
        scale = 0.5 * (1 + math.cos(math.pi * frac))
    elif decay == "wsd":
        scale = min(1.0, (total - step) / max(1.0, cooldown * total))
    else:
        scale = 1.0
    return base * (min_ratio + (1 - min_ratio) * scale)


def sample_order(n_samples, use, seed):
    """The `use`-th sample drawn by training, and the order of its responses: a fresh permutation of
    the data every epoch, a fresh response order every use (position-bias augmentation). Both are
    derived from (seed, use), so a resumed run draws exactly what the uninterrupted run would."""
    epoch, i = divmod(use, n_samples)
    return epoch_permutation(n_samples, seed, epoch)[i], torch.Generator().manual_seed(seed * 7_919 + 2**40 + use)


@functools.lru_cache(maxsize=2)
def epoch_permutation(n_samples, seed, epoch):
    """One epoch's order of the data, drawn once: every sample of a step used to redraw all of it
    (16 randperms of 10,000 per shape-world step, ~1% of the demo's time)."""
    return torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def pick_device(name):
    """--device: auto (CUDA when there is one), cpu, cuda, cuda:1, ...; one that cannot run is a ValueError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this torch ({torch.__version__}) sees no Apple GPU here")
    return name


def precision(device):
    """(weights dtype, autocast context) for a device: bf16 weights and bf16 autocast on CUDA (LoRA,
    the head and the losses stay fp32), plain fp32 on CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16, torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.float32, contextlib.nullcontext()


def build_rm(args, device):
    """Backbone (bf16 on CUDA, fp32 on CPU) + LoRA (fp32) + value head (fp32)."""
    backbone = vlm.load_model(args.model, dtype=precision(device)[0], device=device)
    proc = vlm.Processor(args.model, backbone.cfg)
    torch.manual_seed(args.seed)  # LoRA A and the head start the same every time
    rm = RewardModel(backbone, proc, args.head_hidden, args.sep_token, args.max_len, args.max_responses, args.mode)
    lora.inject_lora(backbone, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                     targets=args.lora_targets, use_rslora=args.rslora)
    backbone.grad_checkpointing = args.grad_checkpointing if args.grad_checkpointing is not None else device.startswith("cuda")
    if args.compile:
        backbone.compile_layers()
    return rm.to(device)


def log_metrics(out, record):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def start_or_resume(out, resume, named_params, optimizer, settings):
    """A fresh run starts a new metrics.jsonl at step 0; --resume restores parameters, optimizer and
    RNG from out's latest checkpoint, refuses changed `settings`, forgets what the interrupted run
    logged after that checkpoint, and returns the checkpoint's state ({"step": 0} for a fresh run).
    Used by mrrm.py train and grpo.py."""
    path = os.path.join(out, "metrics.jsonl")
    if not resume:
        clear_finished_run(out)
        return {"step": 0}
    folder = latest_checkpoint(out)
    if folder is None:
        raise FileNotFoundError(f"--resume: {out} has no checkpoint (no latest.json)")
    state = load_checkpoint(folder, named_params, optimizer)
    changed = {k: (state["settings"].get(k), v) for k, v in settings.items()
               if json.dumps(state["settings"].get(k)) != json.dumps(v)}
    if changed:
        raise ValueError(f"--resume: settings differ from the checkpoint's (saved, now): {changed}")
    if os.path.isfile(path):
        with open(path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the run was killed mid-write
                print(f"{path}: dropped an unreadable line: {line.strip()[:60]}", file=sys.stderr)
                continue
            # records after the checkpoint, the final evaluation (it is made again), and the checkpoint
            # step's own records when its log and evaluation were still pending (they are redone)
            at = record.get("step", 0)
            if at < state["step"] or at == state["step"] and not state.get("pending") and not record.get("final"):
                keep.append(line if line.endswith("\n") else line + "\n")
        with open(path, "w") as f:
            f.writelines(keep)
    print(f"resumed from {folder} at step {state['step']}")
    return state


def clear_finished_run(out):
    """A fresh run in `out` starts clean: the earlier run's metrics, checkpoints and `latest` pointer go
    (a stale pointer would make a later --resume continue the earlier run). An earlier run that stopped
    before its last step is kept, and the fresh run refused: it was most likely meant to be resumed."""
    try:
        folder = latest_checkpoint(out)
    except FileNotFoundError:  # the pointer names a removed checkpoint: nothing left to resume
        folder = None
    if folder is not None:
        state_path = os.path.join(folder, "state.json")
        if os.path.isfile(state_path):
            saved = vlm.read_json(state_path)
            if saved.get("total") and saved["step"] < saved["total"]:
                raise ValueError(f"{out} holds an unfinished run (checkpoint at step {saved['step']} of "
                                 f"{saved['total']}): --resume continues it; to start over, delete it or "
                                 "choose another --out")
    for name in os.listdir(out):
        if re.fullmatch(r"checkpoint-\d+(\.tmp)?", name):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in ("latest.json", "metrics.jsonl"):
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def export(rm, out, model_folder, settings):
    """out/peft: the adapter in PEFT's format; out/merged: base + LoRA merged, a Hub-layout checkpoint
    that our loader and transformers both read, with the value head beside it. Merges in place, so
    this is the last thing a run does."""
    lora.export_peft(rm.backbone, os.path.join(out, "peft"), base_model_name_or_path=os.path.abspath(model_folder))
    merged = os.path.join(out, "merged")
    lora.strip_lora(rm.backbone)
    vlm.save_model(rm.backbone, merged)
    for name in os.listdir(model_folder):  # tokenizer and processor files; config and weights are new
        if name.endswith((".json", ".txt", ".jinja")) and name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(model_folder, name), os.path.join(merged, name))
    rm.save_head(merged, settings)
    return merged


def train(args):
    device = pick_device(args.device)
    for path in (args.train, args.heldout):
        if path:
            ensure_shapeworld(path)
    samples = load_samples(args.train, args.image_root, args.skip_bad, args.max_responses)
    heldout = load_samples(args.heldout, args.image_root, args.skip_bad, args.max_responses) if args.heldout else []
    if args.eval_samples:
        heldout = heldout[:args.eval_samples]
    if args.batch_size % args.micro_batch:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch}")
    if not 0 <= args.independent_warmup <= 1:
        raise ValueError(f"--independent-warmup {args.independent_warmup}: a fraction of the steps, 0 to 1")
    if not 0 < args.cooldown <= 1:
        raise ValueError(f"--cooldown {args.cooldown}: a fraction of the steps, above 0 and at most 1")
    if args.clip < 0:  # a negative max norm would flip every gradient: training would climb the loss
        raise ValueError(f"--clip {args.clip}: a gradient norm, at least 0 (0: no clipping)")
    accum = args.batch_size // args.micro_batch
    total = math.ceil(args.epochs * len(samples) / args.batch_size) if args.epochs else args.steps
    if total < 1:
        raise ValueError(f"--steps {args.steps} / --epochs {args.epochs}: no step to train")
    warmup = args.warmup if args.warmup >= 1 else int(args.warmup * total)
    os.makedirs(args.out, exist_ok=True)

    rm = build_rm(args, device)
    rm.train()
    params = {n: p for n, p in rm.named_parameters() if p.requires_grad}
    # fused: the whole update in one kernel (CPU and CUDA), where the default runs each of Adam's elementwise
    # steps as its own multi-tensor op (shape-world: clipping + step 2.3 -> 0.9 ms)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=True)
    settings = {k: getattr(args, k) for k in RESUME_KEYS}
    resumed = start_or_resume(args.out, args.resume, params, opt, settings)
    step = resumed["step"]
    if not args.resume:
        torch.manual_seed(args.seed)
    trainable, count = lora.count_parameters(rm)
    print(f"{len(samples)} train / {len(heldout)} held-out samples | {total} steps of {args.batch_size} "
          f"({accum} x {args.micro_batch}) | mode {args.mode} | loss {args.loss} | {device} | "
          f"trainable {trainable:,} of {count:,} parameters")

    autocast = precision(device)[1]
    cache = PromptCache(rm, int(args.cache_gb * 2**30))
    loss_fn = LOSSES[args.loss]
    pair_cost = attention_pair_cost(rm.backbone.cfg)  # how collate weighs attention when packs share rows
    stop = min(total, args.stop_at or total)
    t0, tokens = time.time(), 0
    steps_timed, time_timed = 0, 0.0  # optimizer steps only, not evaluation or checkpoints
    # anything that stops the run (a bad sample, out of memory, Ctrl-C) first saves the last finished
    # step with the random streams as they were right after it, so --resume continues exactly there.
    # The checkpoint also holds the finished steps' metrics not yet logged (window) and whether that
    # step's log line and evaluation were still to come (pending): a resumed run does them first.
    window, pending, last = resumed.get("window", []), resumed.get("pending", False), resumed.get("last", {})
    state, saved, updating, rng = {"settings": settings, "total": total}, step, False, rng_state()
    skipped = {} if args.skip_bad else None  # samples found bad only when used (encode_or_skip)
    try:
        while step < stop or pending:
            if not pending:
                t_step = time.time()
                lr_now = lr_at(step, total, args.lr, warmup, args.decay, args.min_lr_ratio, args.cooldown)
                for g in opt.param_groups:
                    g["lr"] = lr_now
                # a mask curriculum: the first --independent-warmup of the steps see each response alone
                mode = "independent" if step < args.independent_warmup * total else args.mode
                step_metrics = []
                for micro in range(accum):
                    first = step * args.batch_size + micro * args.micro_batch
                    packs, ranks, ids = [], [], []
                    picks = [sample_order(len(samples), use, args.seed) for use in range(first, first + args.micro_batch)]
                    cache.fill([samples[i] for i, _ in picks], skipped)  # new samples' media: one run of a frozen tower
                    for i, gen in picks:
                        s = samples[i]
                        order = torch.randperm(len(s.responses), generator=gen).tolist()
                        encoded = encode_or_skip(rm, s, order, mode, cache, skipped)
                        if encoded is not None:
                            packs.append(encoded[0]), ranks.append(encoded[1]), ids.append(s.id)
                    if not packs:
                        continue
                    batch = collate(packs, mode, row_tokens=args.row_tokens, pair_cost=pair_cost)
                    rk = torch.nn.utils.rnn.pad_sequence(ranks, batch_first=True, padding_value=10**6).to(device)
                    with autocast:
                        scores = rm(batch)
                    loss, m = loss_fn(scores.float(), rk, batch.score_valid.to(device))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"step {step + 1}: loss is {loss.item()} on samples {ids}; stopping "
                                                 "(a lower --lr, or --clip if it is 0?)")
                    (loss / accum).backward()
                    step_metrics.append(m)
                    tokens += sum(len(p.input_ids) for p in packs)
                rng_after = rng_state()  # clipping and the update draw no random numbers
                norm = torch.nn.utils.clip_grad_norm_(params.values(), args.clip) if args.clip else torch.tensor(0.0)
                updating = True  # until the step is counted the parameters are half-way: no checkpoint of them
                opt.step()
                step, updating, rng, pending = step + 1, False, rng_after, True
                opt.zero_grad(set_to_none=True)
                window += step_metrics
                last = {"lr": lr_now, "grad_norm": float(norm)}
                steps_timed, time_timed = steps_timed + 1, time_timed + time.time() - t_step
            logged = step % args.log_every == 0 or step == stop
            if logged and window:  # empty when every sample of these steps was skipped (--skip-bad)
                elapsed = time.time() - t0
                loss_avg = sum(m["loss"] for m in window) / len(window)
                acc_avg = sum(m["acc"] for m in window) / len(window)
                tok_s = tokens / time_timed if time_timed else 0.0
                eta = time_timed / steps_timed * (stop - step) if steps_timed else 0.0
                print(f"step {step}/{total} | loss {loss_avg:.4f} | acc {acc_avg:.3f} | lr {last['lr']:.2e} | "
                      f"tok/s {tok_s:,.0f} | grad {last['grad_norm']:.2f} | ETA {eta:.0f}s", flush=True)
                log_metrics(args.out, {"step": step, "loss": loss_avg, "acc": acc_avg, "lr": last["lr"],
                                       "grad_norm": last["grad_norm"], "tokens_per_s": tok_s, "time": elapsed})
            if heldout and args.eval_every and step % args.eval_every == 0 and step < stop:
                rows, _ = evaluate(rm, heldout, args.mode, 1, args.eval_batch, cache, autocast, args.row_tokens, skipped)
                res = summarize(rows)
                print(f"eval step {step} | best-of-N {res['best_of_n']:.3f} | pairwise {res['pairwise']:.3f} | "
                      f"tau {res['kendall_tau']:.3f}", flush=True)
                log_metrics(args.out, {"step": step, "eval": {k: v for k, v in res.items() if k != "per_category"}})
            pending, window = False, [] if logged else window  # one statement: no interruption in between
            if args.save_every and step % args.save_every == 0 or step == stop:
                state.update(window=window, pending=False, last=last)
                save_checkpoint(args.out, step, params, opt, state, args.keep_checkpoints)
                saved = step  # after: a save that was itself interrupted is made again below
    except BaseException as e:
        if step > saved and not updating:
            state.update(window=window, pending=pending, last=last)
            then = ("--resume would diverge again (it keeps --lr and --clip): start over with other settings"
                    if isinstance(e, FloatingPointError) else
                    "fix or remove the record named below, or add --skip-bad; then --resume continues from there"
                    if isinstance(e, ValueError) else "--resume continues from there")
            save_at_stop(e, then, args.out, step, params, opt, state, args.keep_checkpoints, rng)
        raise

    extra = {"lora": {"r": args.lora_r, "alpha": args.lora_alpha, "targets": list(args.lora_targets),
                      "use_rslora": args.rslora}, "base_model": os.path.abspath(args.model), "mode": args.mode,
             "base_fingerprint": backbone_fingerprint(args.model), "steps": step}
    rm.save(args.out, extra)
    result = None
    if heldout:
        rows, _ = evaluate(rm, heldout, args.mode, 1, args.eval_batch, cache, autocast, args.row_tokens, skipped)
        result = summarize(rows)
        print(f"held-out ({len(heldout)} samples): best-of-N {result['best_of_n']:.3f} | pairwise "
              f"{result['pairwise']:.3f} | Kendall tau {result['kendall_tau']:.3f} | exact ranking "
              f"{result['exact_ranking']:.3f} (chance best-of-N ~ {sum(1 / len(s.responses) for s in heldout) / len(heldout):.2f})")
        # "final" only at the schedule's end: a --stop-at evaluation stays, like an in-loop one, when resumed
        log_metrics(args.out, {"step": step, "eval": {k: v for k, v in result.items() if k != "per_category"},
                               **({"final": True} if step >= total else {})})
    if step < total:
        print(f"stopped at step {step} of {total} (--stop-at); continue with --resume")
    elif args.export:
        print(f"merged export: {export(rm, args.out, args.model, {'mode': args.mode})}; PEFT adapter: {args.out}/peft")
    print(f"done in {time.time() - t0:.0f}s; reward model in {args.out} "
          f"(score with: python mrrm.py score --adapter {args.out} ...)")
    return result


# -----------------------------------------------------------------------------
# Command line: train | eval | score | bench


def load_trained(args, device):
    """--adapter (a `train` output folder) on the backbone it was trained on (its rm_config.json's
    base_model) or on --model; or a merged export as --model with --adapter ''.
    Returns (reward model, the adapter folder used or None, the backbone folder)."""
    adapter, model = args.adapter or None, args.model
    merged = bool(model) and os.path.isfile(os.path.join(model, "head.safetensors"))
    if adapter == DEFAULT_OUT and merged:
        adapter = None  # --model is a merged export and --adapter was left at its default: use it as is
    if adapter is None and model and not merged:
        raise FileNotFoundError(f"{model}: no head.safetensors, so not a trained reward model (a bare backbone "
                                "would score with a random value head); give --adapter the folder train wrote")
    if adapter and not os.path.isfile(os.path.join(adapter, "rm_config.json")):
        if adapter == DEFAULT_OUT:
            raise FileNotFoundError(f"{adapter}: no trained reward model here; run `python mrrm.py train` first")
        else:
            raise FileNotFoundError(f"{adapter}/rm_config.json: not found; --adapter must be a folder written by "
                                    f"`mrrm.py train`")
    if model is None:
        # a LoRA fits any backbone of the same shapes, so the wrong one would load silently: use the recorded one
        recorded = _read_rm_config(adapter).get("base_model") if adapter else None
        if recorded and not os.path.isdir(recorded):
            raise FileNotFoundError(f"{adapter}/rm_config.json: base_model {recorded}: not found; pass --model "
                                    f"with the backbone this adapter was trained on")
        model = recorded or DEFAULT_MODEL
    return RewardModel.load(model, adapter=adapter, dtype=precision(device)[0], device=device), adapter, model


def evaluate_cmd(args):
    device = pick_device(args.device)
    ensure_shapeworld(args.data)
    rm, adapter, model = load_trained(args, device)
    samples = load_samples(args.data, args.image_root, args.skip_bad, rm.max_responses)
    check_protocol(args.protocol, samples)
    if args.predictions is None:  # next to the model evaluated, never into another run's folder
        args.predictions = os.path.join(adapter or model, "predictions.jsonl")
    if args.predictions:  # found unwritable now, not after the whole evaluation
        if os.path.isdir(args.predictions):
            raise ValueError(f"--predictions {args.predictions}: is a folder; give a file name")
        os.makedirs(os.path.dirname(os.path.abspath(args.predictions)), exist_ok=True)
    mode = args.mode or rm.mode
    autocast = precision(device)[1]
    t0 = time.time()
    skipped = {} if args.skip_bad else None
    rows, scores = evaluate(rm, samples, mode, args.orders, args.batch_size, autocast=autocast,
                            row_tokens=args.row_tokens, skipped=skipped)
    samples = [s for s in samples if s.where not in (skipped or {})]
    report = protocol_report(args.protocol, rows)
    print(f"{args.data}: {len(samples)} samples, mode {mode}, {args.orders} order(s), protocol {args.protocol}, "
          f"{time.time() - t0:.1f}s")
    _print_report(report)
    if args.predictions:
        with open(args.predictions, "w") as f:
            for s, sc, row in zip(samples, scores, rows):
                ranking = [1 + sorted(range(len(sc)), key=lambda j: -sc[j]).index(i) for i in range(len(sc))]
                f.write(json.dumps({"id": s.id, "category": s.category, "scores": sc, "predicted_rankings": ranking,
                                    "rankings": s.rankings, "best_correct": bool(row["best"])}) + "\n")
        print(f"predictions: {args.predictions}")
    return report


def _print_report(report, indent=""):
    for k, v in report.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            _print_report(v, indent + "  ")
        else:
            print(f"{indent}{k:<16} {v:.4f}" if isinstance(v, float) else f"{indent}{k:<16} {v}")


def score_cmd(args):
    device = pick_device(args.device)
    rm = load_trained(args, device)[0]
    images = []
    for p in args.image:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--image {p}: file not found")
        images.append(read_image(p, "--image"))
    scores = rm.score(images=images, prompt=args.prompt, responses=args.responses, mode=args.mode,
                      videos=args.video)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    print(f"{'rank':>4}  {'score':>8}  response")
    for rank, i in enumerate(order, 1):
        print(f"{rank:>4}  {scores[i]:>8.4f}  {args.responses[i]}")
    return scores


# -----------------------------------------------------------------------------
# Bench: what packing buys. One prompt (image + text) and N responses scored four ways: one forward
# per response (sequential), the N responses as a padded batch (batched), one packed pass with plain
# causal attention (joint) and one packed pass with the block mask (independent). Also one LoRA
# training step (--train) and GRPO-style decoding from one prefill (--generate). Weights are random:
# latency and FLOPs do not depend on them, and --config 2b/4b/8b needs no download.

BENCH_SIZES = {  # text and vision sizes of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json; 4B = dataclass defaults
    "2b": (dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
           dict(), True),
    "4b": (dict(), dict(), True),
    "8b": (dict(hidden_size=4096, intermediate_size=12288),
           dict(depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=(8, 16, 24)), False),
    # the 4B's depths (36 decoder layers, 24 vision blocks, 3 DeepStack levels) at toy widths: on the CPU a
    # step's time is then almost all host work (Python, dispatch, autograd), which a GPU run must keep
    # ahead of its kernels. Not in it: the CUDA side of each launch (cuBLAS, Triton's launcher)
    "4b-thin": (dict(hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                     mrope_section=(2, 3, 3)), dict(hidden_size=16, intermediate_size=16, num_heads=1), True),
}
BENCH_SEP = "<|im_end|>"  # the separator RewardModel uses by default


def bench_model(args, device, dtype):
    """(model, sep_id, description). --config builds random weights on the meta device and
    materialises them on `device` in `dtype` (a bf16 8B never exists in fp32); otherwise --model loads."""
    if args.config is None:
        model = vlm.load_model(args.model, dtype=dtype, device=device)
        return model, vlm.Tokenizer(os.path.join(args.model, "tokenizer.json")).token_id(BENCH_SEP), args.model
    name = args.config
    special = {s: i for i, s in enumerate(vlm.QWEN_SPECIAL_TOKENS, start=151643)}  # the real Qwen ids
    if name == "tiny":
        special = {s: i for i, s in enumerate(vlm.QWEN_SPECIAL_TOKENS)}
        cfg = vlm.tiny_config(512, special)
    else:
        text, vision, tie = BENCH_SIZES[name]
        cfg = vlm.Config(text=vlm.TextConfig(**text),
                         vision=vlm.VisionConfig(**vision, out_hidden_size=text.get("hidden_size", 2560)),
                         tie_word_embeddings=tie)
    with torch.device("meta"):
        model = vlm.Qwen3VL(cfg)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():  # init in place on the device, as vlm.init_weights does on the CPU (but per stored tensor)
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.fill_(1.0)
            elif n.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval(), special[BENCH_SEP], f"random {name}"


def synthetic_prompt(cfg, image_tokens, prompt_len, gen):
    """ids (P,) with P = image_tokens + prompt_len: <vision_start> pads <vision_end> then random text;
    positions (3, P); pixel rows and grid (1, 3) sized so the vision tower yields `image_tokens` tokens."""
    v, m = cfg.vision, cfg.vision.spatial_merge_size
    text_ids = lambda n: torch.randint(20, min(cfg.text.vocab_size, 150_000), (n,), generator=gen)
    if image_tokens == 0:
        ids = text_ids(prompt_len)
        return ids, vlm.rope_positions(ids, None, cfg), None, None
    rows = max(d for d in range(1, int(image_tokens ** 0.5) + 1) if image_tokens % d == 0)  # near-square grid
    grid = torch.tensor([[1, rows * m, image_tokens // rows * m]])
    ids = torch.cat([torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * image_tokens
                                  + [cfg.vision_end_token_id]), text_ids(max(prompt_len - 2, 0))])
    pixels = torch.randn(int(grid.prod()), v.in_channels * v.temporal_patch_size * v.patch_size ** 2, generator=gen)
    return ids, vlm.rope_positions(ids, grid, cfg), pixels, grid


# --- FLOPs -------------------------------------------------------------------------------------


def forward_flops(cfg, tokens, attn_pairs, grids=(), vision_pairs=None, scored=0, head_hidden=1024,
                  read=None, read_pairs=None):
    """Analytic forward FLOPs (multiply-adds x 2) of Qwen3VL on `tokens` decoder tokens (all rows of a
    batch together) whose attention computes `attn_pairs` (query, key) pairs per layer and head, plus
    the vision tower on `grids` and the value head on `scored` separators. Matmuls only: norms,
    activations, RoPE and softmax are O(tokens x hidden), under 1% here. `vision_pairs` overrides the
    vision attention's pairs (a block-diagonal mask computed densely costs (sum n)^2, not sum n^2).
    read: the positions whose output is read (Qwen3VL's at=); the last layer then projects q/k/v for
    every token (k and v are needed; q rides in the same fused matmul) but runs attention (`read_pairs`
    pairs) and o_proj + MLP for `read` positions only. None: every position, as a plain forward."""
    t, v = cfg.text, cfg.vision
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    L = t.num_hidden_layers
    qkv, rest = 2 * t.hidden_size * (q + 2 * kv), 2 * (q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    read, read_pairs = (tokens, attn_pairs) if read is None else (read, read_pairs)
    text_linear = L * qkv * tokens + rest * ((L - 1) * tokens + read)
    text_attention = 4 * q * ((L - 1) * attn_pairs + read_pairs)  # QK^T and PV: 2 x head_dim each per pair and head
    H, patch_in = v.hidden_size, v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    n = sum(a * b * c for a, b, c in grids)
    if vision_pairs is None:
        vision_pairs = sum(a * (b * c) ** 2 for a, b, c in grids)  # attention stays inside each frame group
    merged = n // v.spatial_merge_size ** 2
    d4 = H * v.spatial_merge_size ** 2
    vision = (2 * n * patch_in * H + v.depth * (2 * n * (4 * H * H + 2 * H * v.intermediate_size) + 4 * H * vision_pairs)
              + (1 + len(v.deepstack_visual_indexes)) * 2 * merged * (d4 * d4 + d4 * v.out_hidden_size))
    head = 2 * scored * (t.hidden_size * head_hidden + head_hidden)
    return {"vision": vision, "text_linear": text_linear, "text_attention": text_attention, "head": head,
            "total": vision + text_linear + text_attention + head}


def attention_pairs(mask, lengths, impl):
    """(useful, kernel) (query, key) pairs: `useful` counts what the mask allows for real queries;
    `kernel` what the kernel computes: SDPA with a mask every pair of the padded batch, causal SDPA the
    lower triangle, flex every 128 x 128 block holding one allowed pair. mask (B, T, T) bool or None
    (causal, rows of `lengths` tokens, no padding)."""
    if mask is None:
        causal = sum(n * (n + 1) // 2 for n in lengths)
        return causal, causal
    B, T, S = mask.shape
    real = torch.arange(T, device=mask.device)[None, :] < torch.tensor(lengths, device=mask.device)[:, None]
    useful = int((mask & real[:, :, None]).sum())
    if impl != "flex":
        return useful, B * T * S
    pad = (-T) % 128, (-S) % 128
    blocks = nn.functional.pad(mask, (0, pad[1], 0, pad[0])).view(B, (T + pad[0]) // 128, 128, (S + pad[1]) // 128, 128)
    return useful, int(blocks.any(4).any(2).sum()) * 128 * 128


def separator_pairs(b):
    """(useful, kernel) (query, key) pairs of the separators' queries, which are all the last layer runs
    when only they are read (Qwen3VL's at=): `useful` what the mask lets them see, `kernel` every key of
    their row (SDPA with the explicit mask, as that layer runs them)."""
    seen = b.mask[b.row[:, None], b.sep_index].sum(-1)  # (S, Nmax)
    return int(seen[b.score_valid].sum()), b.sep_index.numel() * b.input_ids.shape[1]


# --- timing ------------------------------------------------------------------------------------


def sync(device):
    """Wait for the GPU before reading a clock; `device` is a torch.device or its name."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device):
    """GPU: max_memory_allocated since the last reset. CPU: the process's peak RSS (it never goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def graph_steps(fn, args):
    """fn, or under CUDA graphs (--compile reduce-overhead) fn starting a new graph step at each call, whose
    replays may then reuse the memory of the last call's graph outputs (the rows keep eager results only)."""
    if args.compile != "reduce-overhead":
        return fn

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        return fn()
    return step


def timed(fn, device, warmup, repeats):
    """(median seconds over `repeats` calls after `warmup` calls, peak memory in GiB, last result)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak_memory_gb(device), out


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def profile_once(fn, device, label, top, row):
    """Print the `top` operators that took most of one call's time (self time, on the GPU where there is
    one), so a row's milliseconds can be traced to the kernels that spend them. On CUDA, also sets
    row["GPU ms"], the call's summed kernel time (as the table's "Self CUDA time total"): a row whose
    wall-clock ms is well above it waits on the CPU launching kernels, not on the GPU; and
    row["kernels"], how many kernels that call launched. On any device, row["matmuls"]: its matmul calls."""
    if top <= 0:
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    where = "device" if device.type == "cuda" else "cpu"
    try:  # a profiler that fails (no CUPTI, out of memory) must not cost the row its timings
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            sync(device)
        events = prof.key_averages()
        table = events.table(sort_by=f"self_{where}_time_total", row_limit=top)
    except Exception as e:
        print(f"--- profile: {label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return
    print(f"--- profile: {label}, one call, top {top} operators by self {where} time")
    print(table)
    # matmul calls, on any device: what fusing q/k/v and gate/up (and LoRA's A's) cuts
    row["matmuls"] = sum(e.count for e in events if e.key in MATMUL_OPS)
    if device.type == "cuda":
        # the kernels' own events (an operator's CPU event also carries its kernels' time: not counted twice)
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)]
        row["GPU ms"] = sum(e.self_device_time_total for e in kernels) / 1e3  # us -> ms
        # launches: where the CPU sets the pace, fewer kernels (fused weights, CUDA graphs) is what pays
        row["kernels"] = sum(e.count for e in kernels)


def matmul_peak_tflops(device, dtype, repeats=5):
    """Measured dense-matmul throughput in `dtype`: the ceiling MFU is quoted against."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sec, _, _ = timed(lambda: a @ b, device, 2, repeats)
    return 2 * n ** 3 / sec / 1e12


# --- the four ways to score N responses ---------------------------------------------------------


def score_fn(model, head, batch, device, causal):
    """A closure running one PackedBatch -> scores (S, N). `causal`: pass mask=None (SDPA is_causal,
    the fast path) because the batch is plain causal attention without padding."""
    to = lambda x: None if x is None else x.to(device)
    ids, pos, pv, grid = to(batch.input_ids), to(batch.position_ids), to(batch.pixel_values), to(batch.grid_thw)
    row, sep, mask = to(batch.row), to(batch.sep_index), None if causal else to(batch.mask)

    def run():
        return head(model(ids, pv, grid, pos, mask, return_hidden=True, at=(row, sep)))  # (S, N, D) -> (S, N)
    return run


def transformers_model(cfg, device, dtype):
    """transformers' Qwen3VLForConditionalGeneration of our config, built (randomly initialised) on `device`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    with torch.device(device):
        return Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(**cfg.to_dict()), dtype=dtype)


def transformers_twin(model):
    """transformers' Qwen3VLForConditionalGeneration with our weights copied in, or None when
    transformers is not installed. hub_state_dict gives our weights under the checkpoint's names."""
    if importlib.util.find_spec("transformers") is None:
        return None
    p = next(model.parameters())
    hf = transformers_model(model.cfg, p.device, p.dtype)
    missing, unexpected = hf.load_state_dict(vlm.hub_state_dict(model), strict=False)
    tied = {"lm_head.weight"} if model.cfg.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"transformers twin: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def transformers_score_fn(hf, head, batch, device, mode):
    """Same packed sequence through transformers: joint as plain causal, independent with our 4D mask."""
    cfg = hf.config
    ids, pos, sep = batch.input_ids.to(device), batch.position_ids.to(device), batch.sep_index.to(device)
    row = batch.row.to(device)[:, None]
    kw = dict(pixel_values=batch.pixel_values.to(device), image_grid_thw=batch.grid_thw.to(device),
              mm_token_type_ids=(ids == cfg.image_token_id).int()) if batch.pixel_values is not None else {}
    if mode == "independent":
        kw["attention_mask"] = batch.mask.to(device)[:, None]  # (B, 1, T, T), passed through as is

    def run():
        h = hf.model(input_ids=ids, position_ids=pos, **kw).last_hidden_state
        return head(h[row, sep])
    return run


def bench_forward(args, model, sep_id, device, dtype, peak, progress=lambda rows: None):
    cfg, gen = model.cfg, torch.Generator().manual_seed(0)
    ids, pos, pixels, grid = synthetic_prompt(cfg, args.image_tokens, args.prompt_len, gen)
    responses = [torch.randint(20, min(cfg.text.vocab_size, 150_000), (args.resp_len,), generator=gen).tolist()
                 for _ in range(args.n)]
    head = ValueHead(cfg.text.hidden_size).to(device)
    nn.init.normal_(head.fc2.weight, std=head.fc1.out_features ** -0.5)  # O(1) scores, so differences show
    grids = [] if grid is None else grid.tolist()
    one = lambda rs, mode: pack(ids, pos, rs, sep_id, mode, pixel_values=pixels, grid_thw=grid)
    lone = [collate([one([r], "joint")], "joint") for r in responses]
    batched = collate([one([r], "joint") for r in responses], "joint")
    padded = len({len(r) for r in responses}) > 1
    cases = [  # name, batches, masked (False: causal without padding, SDPA's is_causal), images encoded, attention
        ("sequential", lone, False, args.n, "sdpa"),
        ("batched", [batched], padded, args.n, "sdpa"),
        ("joint", [collate([one(responses, "joint")], "joint")], False, 1, "sdpa"),
        ("independent", [collate([one(responses, "independent")], "independent")], True, 1, "sdpa")]
    if args.flex:
        cases.append(("independent flex", cases[-1][1], True, 1, "flex"))
    if args.compile:
        model.compile_layers(args.compile)
    hf = transformers_twin(model) if args.transformers else None
    rows, scores = [], {}
    for name, batches, masked, images, impl in cases:
        row = {"row": name}
        try:
            model.attn_impl = impl
            fns = [score_fn(model, head, b, device, causal=not masked) for b in batches]
            run = graph_steps(lambda: [f() for f in fns], args)
            with torch.no_grad():
                sec, mem, out = timed(run, device, args.warmup, args.repeats)
                profile_once(run, device, name, args.profile, row)
            scores[name] = torch.cat([o[:, :args.n].flatten() for o in out]).float().cpu()
            row.update(measure(cfg, batches, masked, images, impl, grids, sec, mem, peak))
        except Exception as e:  # one failing row (OOM, a kernel missing) must not cost the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        finally:
            model.attn_impl = "sdpa"
        rows.append(row)
        progress(rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for mode in MODES if hf is not None else ():
        name, b = f"transformers {mode}", cases[2 if mode == "joint" else 3][1]
        row = {"row": name}
        try:
            with torch.no_grad():
                fn = transformers_score_fn(hf, head, b[0], device, mode)
                sec, mem, out = timed(fn, device, args.warmup, args.repeats)
                profile_once(fn, device, name, args.profile, row)
            scores[name] = out[0, :args.n].float().cpu()
            row.update(measure(cfg, b, mode == "independent", 1, "sdpa", grids, sec, mem, peak, reads_all=True))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
        progress(rows)
    add_speedups(rows, next((r for r in rows if r["row"] == "sequential"), None), "ms")
    ref = {"batched": "sequential", "independent": "sequential", "independent flex": "sequential",
           "transformers joint": "joint", "transformers independent": "sequential"}
    for r in rows:
        if r["row"] in ref and r["row"] in scores and ref[r["row"]] in scores:
            r["max_diff"] = float((scores[r["row"]] - scores[ref[r["row"]]]).abs().max())
    # independent mode's promise: score i equals a separate pass over prompt + response i
    diff = next((r.get("max_diff") for r in rows if r["row"] == "independent"), None)
    if dtype == torch.float32 and diff is not None and diff > 1e-3:
        raise AssertionError(f"independent-mode scores differ from sequential ones by {diff:.2e} (fp32, tolerance 1e-3)")
    return rows


def measure(cfg, batches, masked, images, impl, grids, sec, mem, peak, reads_all=False):
    """A forward row's figures. Useful FLOPs count the last layer at the separators only (all a reward
    model reads), for every row alike; kernel FLOPs count what the row's kernels compute: the last layer
    at every position for `reads_all` (transformers), else at the separators (ours, at=)."""
    tokens = useful = kernel = vis_pairs = scored = slots = sep_u = sep_k = 0
    n_img = sum(a * b * c for a, b, c in grids)
    for b in batches:
        lengths = (b.sep_index.max(1).values + 1).tolist()  # a pack ends with its last separator
        u, k = attention_pairs(b.mask if masked else None, lengths, impl)
        tokens, useful, kernel = tokens + sum(lengths), useful + u, kernel + k
        per_call = b.input_ids.shape[0] if grids else 0  # every row of a batch carries the image
        vis_pairs += per_call * n_img ** 2  # vision attention runs per image (vlm.attention_groups)
        scored += int(b.score_valid.sum())  # real separators; a padded slot is computed but not needed
        slots += b.sep_index.numel()
        u, k = separator_pairs(b)
        sep_u, sep_k = sep_u + u, sep_k + k
    flops_u = forward_flops(cfg, tokens, useful, grids * images, scored=scored, read=scored, read_pairs=sep_u)
    flops_k = forward_flops(cfg, tokens, kernel, grids * images, vision_pairs=vis_pairs, scored=slots,
                            **({} if reads_all else {"read": slots, "read_pairs": sep_k}))
    tflops = flops_u["total"] / sec / 1e12
    return {"tokens": tokens, "ms": sec * 1e3, "tok/s": tokens / sec, "TFLOP": flops_u["total"] / 1e12,
            "kernel TFLOP": flops_k["total"] / 1e12, "TFLOP/s": tflops, "MFU %": 100 * tflops / peak, "mem GiB": mem}


# --- training step and decoding ------------------------------------------------------------------


def train_inputs(args, cfg, sep_id, device):
    """The one packed sequence and ranks every train-step row uses (the same seed: the same tokens)."""
    gen = torch.Generator().manual_seed(1)
    ids, pos, pixels, grid = synthetic_prompt(cfg, args.image_tokens, args.prompt_len, gen)
    responses = [torch.randint(20, min(cfg.text.vocab_size, 150_000), (args.resp_len,), generator=gen).tolist()
                 for _ in range(args.n)]
    b = collate([pack(ids, pos, responses, sep_id, args.mode, pixel_values=pixels, grid_thw=grid)], args.mode)
    ranks = torch.randperm(args.n, generator=gen)[None].to(device) + 1
    return b, ranks, torch.ones(1, args.n, dtype=torch.bool, device=device)


def time_train_step(name, forward, params, b, ranks, valid, cfg, args, device, peak, impl):
    """One row: median time of forward -> listwise CE -> backward -> AdamW, and its FLOPs and memory."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as `train` and grpo.py step
    autocast = precision(device.type)[1]  # as `train` runs it: bf16 autocast on CUDA (LoRA takes its bf16 path)

    def step():
        with autocast:
            scores = forward()
        loss, _ = listwise_ce_loss(scores.float(), ranks, valid)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    row = {"row": name}
    step = graph_steps(step, args)
    try:
        sec, mem, _ = timed(step, device, args.warmup, args.repeats)
        profile_once(step, device, name, args.profile, row)
        T, grid = b.input_ids.shape[1], b.grid_thw
        pairs = attention_pairs(None if args.mode == "joint" else b.mask, [T], impl)[0]
        f = forward_flops(cfg, T, pairs, grid.tolist() if grid is not None else [], scored=args.n,
                          read=args.n, read_pairs=separator_pairs(b)[0])  # the needed work, for either row
        # the base weights are frozen: backward is the input gradient (one more forward's matmuls) through
        # the decoder only; no weight gradients except LoRA's (r / hidden of that), no recompute counted
        flops = f["vision"] + 2 * (f["total"] - f["vision"])
        tflops = flops / sec / 1e12
        row.update({"tokens": T, "ms": sec * 1e3, "tok/s": T / sec, "TFLOP": flops / 1e12, "TFLOP/s": tflops,
                    "MFU %": 100 * tflops / peak, "mem GiB": mem, "trainable M": sum(p.numel() for p in params) / 1e6})
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return row


def compiled_label(args):
    return "" if not args.compile else " compile" if args.compile == "default" else f" compile {args.compile}"


def bench_train(args, model, sep_id, device, dtype, peak):
    """One optimizer step of LoRA + value head on one packed sequence: forward, listwise CE, backward, AdamW."""
    cfg = model.cfg
    b, ranks, valid = train_inputs(args, cfg, sep_id, device)
    lora.inject_lora(model, r=args.lora_r, alpha=2 * args.lora_r, targets=lora.DEFAULT_TARGETS)
    head = ValueHead(cfg.text.hidden_size).to(device)
    model.train()
    model.grad_checkpointing = args.grad_ckpt
    model.attn_impl = "flex" if args.flex and args.mode == "independent" else "sdpa"
    if args.compile:
        model.compile_layers(args.compile)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    name = f"train r={args.lora_r} {args.mode}" + (" ckpt" if args.grad_ckpt else "") + compiled_label(args)
    return [time_train_step(name, score_fn(model, head, b, device, causal=args.mode == "joint"), params,
                            b, ranks, valid, cfg, args, device, peak, model.attn_impl)]


def bench_train_reference(args, cfg, sep_id, device, dtype, peak):
    """The same step through transformers' Qwen3-VL + peft's LoRA (same targets, rank, alpha, activation
    checkpointing), built alone on the device after our model is freed, so peak memory compares fairly.
    [] when transformers or peft is not installed."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None:
        return []
    from peft import LoraConfig, get_peft_model
    b, ranks, valid = train_inputs(args, cfg, sep_id, device)
    config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                        target_modules=lora.DEFAULT_TARGETS[0])  # a str: one regex, matched in full
    hf = get_peft_model(transformers_model(cfg, device, dtype), config)
    if args.grad_ckpt:
        if hasattr(hf, "activation_checkpointing_enable"):  # newer transformers; the old name warns there
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()
    head = ValueHead(cfg.text.hidden_size).to(device)
    # the wrapped Qwen3VLForConditionalGeneration, its LoRA layers in place: the forward rows' function
    forward = transformers_score_fn(hf.base_model.model, head, b, device, args.mode)
    params = [p for p in hf.parameters() if p.requires_grad] + list(head.parameters())
    name = f"transformers+peft r={args.lora_r} {args.mode}" + (" ckpt" if args.grad_ckpt else "")
    return [time_train_step(name, forward, params, b, ranks, valid, cfg, args, device, peak, "sdpa")]


@torch.no_grad()
def nocache_decode(model, batch, steps, n):
    """The baseline generate() replaces: n samples, and the full forward re-run at every step."""
    ids = batch.input_ids.expand(n, -1)
    pos = batch.position_ids.expand(-1, n, -1)
    pv = None if batch.pixel_values is None else batch.pixel_values.repeat(n, 1)
    grid = None if batch.grid_thw is None else batch.grid_thw.repeat(n, 1)
    nxt = int(batch.position_ids.max()) + 1
    for s in range(steps):
        h = model(ids, pv, grid, pos, return_hidden=True)
        logits = model.logits(h[:, -1]).float()
        # a sampled image pad would ask the next full forward for pixels it does not have (random weights)
        logits[:, [model.cfg.image_token_id, model.cfg.video_token_id]] = float("-inf")
        tok = vlm.sample_next(logits, temperature=1.0)
        ids = torch.cat([ids, tok[:, None]], 1)
        pos = torch.cat([pos, torch.full((3, n, 1), nxt + s, device=pos.device)], 2)
    return ids


def bench_generate(args, model, device):
    cfg, gen = model.cfg, torch.Generator().manual_seed(2)
    ids, pos, pixels, grid = synthetic_prompt(cfg, args.image_tokens, args.prompt_len, gen)
    batch = vlm.Batch(ids[None].to(device), pos[:, None].to(device), None if pixels is None else pixels.to(device),
                      None if grid is None else grid.to(device))
    G, new, steps = args.samples, args.new_tokens, min(args.new_tokens, args.nocache_steps)
    ways = [(f"generate G={G} kv-cache", False, G * new)]
    if device.type == "cuda":  # each step one CUDA graph replay (vlm.DecodeStep), capture included in the time
        ways.insert(0, (f"generate G={G} kv-cache + CUDA graph", True, G * new))
    rows = []
    for name, graph, tokens in ways:
        rows.append({"row": name, "fn": lambda g=graph: vlm.generate(model, batch, new, n=G, temperature=1.0, cuda_graph=g),
                     "tokens": tokens})
    rows.append({"row": f"no-cache G={G} ({steps} steps)", "fn": lambda: nocache_decode(model, batch, steps, G),
                 "tokens": G * steps})
    for row in rows:
        fn, tokens = row.pop("fn"), row["tokens"]
        try:
            sec, mem, _ = timed(fn, device, min(args.warmup, 1), max(1, min(args.repeats, 3)))
            row.update({"ms": sec * 1e3, "tok/s": tokens / sec, "ms/step": sec * 1e3 / (tokens // G), "mem GiB": mem})
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    add_speedups(rows, rows[-1], "tok/s")
    if device.type == "cuda" and "error" not in rows[0]:
        # the graph replays what the eager step computes: greedy logits agree until the tokens first differ
        a, b = (vlm.generate(model, batch, min(new, 32), n=G, return_logits=True, cuda_graph=g) for g in (True, False))
        same = [next((j for j, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t)))
                for s, t in zip(a["tokens"], b["tokens"])]
        rows[0]["max_diff"] = max(float((a["logits"][i, :k + 1] - b["logits"][i, :k + 1]).abs().max()) for i, k in enumerate(same))
        rows[0]["same tokens"] = sum(same) / sum(len(t) for t in a["tokens"])
    return rows


# --- the command ---------------------------------------------------------------------------------


def add_speedups(rows, base, key):
    """Each row's speedup over the row `base`: by time for key 'ms' (rows that process different
    token counts), by throughput for 'tok/s'."""
    if base is None or key not in base:
        return
    for r in rows:
        if key in r:
            r["speedup"] = base[key] / r[key] if key == "ms" else r[key] / base[key]


def gpu_note(rows):
    return ("; GPU ms: the kernels' summed time in one profiled call, kernels: how many it launched"
            if any("GPU ms" in r for r in rows) else "")


def print_table(title, rows):
    if not rows:
        print(f"{title}\n(no rows)")
        return
    cols = ["row"] + [c for c in ("tokens", "ms", "GPU ms", "kernels", "matmuls", "tok/s", "ms/step", "TFLOP", "kernel TFLOP", "TFLOP/s", "MFU %",
                                  "speedup", "mem GiB", "max_diff", "same tokens", "trainable M") if any(c in r for r in rows)]
    fmt = lambda c, v: (v if isinstance(v, str) else f"{v:.2e}" if c == "max_diff" else f"{v:,.0f}" if c in ("tokens", "tok/s", "kernels", "matmuls")
                        else f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}")
    cells = [[fmt(c, r[c]) if c in r else "" for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print(title)
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, width))))
    for r, line in zip(rows, cells):
        print("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, width)))
              + (f"  ERROR {r['error']}" if "error" in r else ""))


def bench(args):
    if args.compile and args.warmup < 1:
        raise ValueError("--compile needs --warmup 1 or more: the first call compiles, and would be timed")
    if args.image_tokens and args.prompt_len < 2:
        raise ValueError(f"--prompt-len {args.prompt_len}: with an image it counts <|vision_start|> and "
                         "<|vision_end|>, so at least 2")
    device = torch.device(pick_device(args.device))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.flex is None:
        args.flex = device.type == "cuda"
    if args.transformers is None:
        args.transformers = not args.generate
    torch.manual_seed(0)
    model, sep_id, source = bench_model(args, device, dtype)
    peak = matmul_peak_tflops(device, dtype)
    t, v = model.cfg.text, model.cfg.vision
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"bench | {source} | {params:.3g}B params | text {t.num_hidden_layers}x{t.hidden_size} | vision "
          f"{v.depth}x{v.hidden_size} | {device.type} {str(dtype)[6:]} | measured matmul peak {peak:.3g} TFLOP/s")
    print(f"image {args.image_tokens} tokens | prompt {args.prompt_len} | N {args.n} x {args.resp_len} + sep | "
          f"median of {args.repeats} after {args.warmup} warm-up" + (" |" + compiled_label(args) if args.compile else ""))
    out = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "source": source, "params_b": params,
           "device": device.type, "dtype": str(dtype), "peak_tflops": peak}

    def save(section=None, rows=None):  # after every row: a run cut short by a time limit keeps what it measured
        if section:
            out[section] = rows
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
    if not args.train and not args.generate:
        out["forward"] = bench_forward(args, model, sep_id, device, dtype, peak, lambda rows: save("forward", rows))
        print_table("forward: scores of N responses (TFLOP = useful, kernel TFLOP = what the kernels compute; "
                    "max_diff: scores vs sequential, transformers joint vs joint" + gpu_note(out["forward"]) + ")",
                    out["forward"])
    if args.generate:
        out["generate"] = bench_generate(args, model, device)
        print_table(f"decoding: {args.samples} samples x {args.new_tokens} tokens, temperature 1", out["generate"])
    if args.train:
        out["train"] = bench_train(args, model, sep_id, device, dtype, peak)
        save()
        if args.transformers:
            print_table("train step, ours (the reference follows)", out["train"])
            cfg = model.cfg
            del model  # freed first: the reference's peak memory must not include our copy
            if args.compile:  # compiled code, and under CUDA graphs the memory pools its replays write to
                torch.compiler.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            out["train"] += bench_train_reference(args, cfg, sep_id, device, dtype, peak)
            add_speedups(out["train"], out["train"][-1], "tok/s")
        print_table("train step: LoRA + value head, forward + backward + AdamW "
                    "(TFLOP: vision forward + 2 x decoder forward, recompute not counted" + gpu_note(out["train"]) + ")",
                    out["train"])
    save()
    return out


def add_bench_args(subparsers):
    b = subparsers.add_parser("bench", help="latency, FLOPs and memory: packed vs one pass per response")
    g = b.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="backbone folder (unless --config is given)")
    g.add_argument("--config", choices=["tiny"] + sorted(BENCH_SIZES), default=None,
                   help="random weights of this size instead of --model (2b/4b/8b: real Qwen3-VL sizes; "
                   "4b-thin: the 4B's depths at toy widths, to measure a step's host work on the CPU)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--threads", type=nonnegative_int, default=0, help="CPU threads (0: torch's default; 1 is steadier on a busy machine)")
    g.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"), metavar="MODE",
                   help="torch.compile our decoder layers and vision blocks (forward rows and --train); MODE is "
                        "torch.compile's: default (when not given), reduce-overhead (each piece replayed as a "
                        "CUDA graph) or max-autotune-no-cudagraphs")
    g.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                   help="also run independent mode through FlexAttention block masks (default: on CUDA)")
    g.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=None,
                   help="side-by-side rows from transformers' Qwen3-VL, same weights (default: on when installed)")
    g = b.add_argument_group("inputs")
    g.add_argument("--image-tokens", type=nonnegative_int, default=64, help="merged image tokens in the prompt (0: text only)")
    g.add_argument("--prompt-len", type=nonnegative_int, default=50,
                   help="prompt tokens besides the image pads (with an image, vision start and end included)")
    g.add_argument("--n", type=positive_int, default=4, help="responses per prompt")
    g.add_argument("--resp-len", type=nonnegative_int, default=128, help="tokens per response (the separator comes on top)")
    g = b.add_argument_group("timing")
    g.add_argument("--warmup", type=nonnegative_int, default=1)
    g.add_argument("--repeats", type=positive_int, default=3)
    g.add_argument("--json", default="", help="write every figure to this file")
    g.add_argument("--profile", type=nonnegative_int, default=0, metavar="K",
                   help="after timing each forward / train row, profile one more call and print its top K operators "
                        "(on CUDA also a 'GPU ms' column: that call's summed kernel time)")
    g = b.add_argument_group("--train: one LoRA training step")
    g.add_argument("--train", action="store_true")
    g.add_argument("--mode", choices=MODES, default="joint")
    g.add_argument("--lora-r", type=positive_int, default=16, help="alpha = 2r")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing")
    g = b.add_argument_group("--generate: G samples from one prefill vs re-running the full forward")
    g.add_argument("--generate", action="store_true")
    g.add_argument("--samples", type=positive_int, default=8, help="G")
    g.add_argument("--new-tokens", type=positive_int, default=32)
    g.add_argument("--nocache-steps", type=positive_int, default=16, help="steps the no-cache baseline is timed over "
                   "(its cost per step grows with length, so this flatters the baseline)")
    b.set_defaults(func=bench)
    return b


def _targets(text):
    return {"lm": list(lora.DEFAULT_TARGETS), "lm+vision": list(lora.DEFAULT_TARGETS + lora.VISION_TARGETS)}.get(text, [text])


def positive_int(text):
    """argparse type for counts that must be at least 1 (0 would fail later, mid-run)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text}")
    return value


def nonnegative_int(text):
    """argparse type for sizes and counts where 0 means none (or: off, torch's default)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 0, got {text}")
    return value


def parser():
    ap = argparse.ArgumentParser(description="mrrm: multi-response reward models on Qwen3-VL (YOJO)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train LoRA + value head (defaults: the shape-world demo on CPU)")
    t.add_argument("--model", default=DEFAULT_MODEL, help="backbone folder in the Hub layout")
    t.add_argument("--train", default=DEFAULT_TRAIN, help="JSONL: prompt, responses, rankings, image/video")
    t.add_argument("--heldout", default=DEFAULT_HELDOUT, help="JSONL for periodic and final evaluation ('' for none)")
    t.add_argument("--image-root", default=None, help="media paths are relative to this (default: each file's folder)")
    t.add_argument("--skip-bad", action="store_true", help="skip and count malformed records instead of stopping")
    t.add_argument("--out", default=DEFAULT_OUT)
    t.add_argument("--mode", choices=MODES, default="joint")
    t.add_argument("--independent-warmup", type=float, default=0.33, metavar="F",
                   help="train the first F of the steps in independent mode, then in --mode: a mask curriculum "
                        "for the shape-world demo (previous recipe: joint best-of-4 0.80 -> 0.88); 0: the paper's")
    t.add_argument("--loss", choices=sorted(LOSSES), default="ce+pl",
                   help="ce: the best response; pl: the whole ranking; ce+pl: both (ce + 0.5 pl)")
    t.add_argument("--lora-r", type=positive_int, default=16)
    t.add_argument("--lora-alpha", type=float, default=32)
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--lora-targets", type=_targets, default=_targets("lm"),
                   help="'lm' (language-model projections), 'lm+vision', or one regex on the checkpoint's module names "
                        "(e.g. '.*self_attn\\.(q|v)_proj')")
    t.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    t.add_argument("--head-hidden", type=positive_int, default=1024)
    t.add_argument("--sep-token", default="<|im_end|>")
    t.add_argument("--max-responses", type=positive_int, default=16)
    t.add_argument("--max-len", type=positive_int, default=4096)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr-ratio", type=float, default=0.0)
    t.add_argument("--warmup", type=float, default=0.05, help="steps, or a fraction of all steps when < 1")
    t.add_argument("--decay", choices=("wsd", "cosine", "linear", "constant"), default="wsd",
                   help="wsd: flat after the warmup, then linear over the last --cooldown of the steps")
    t.add_argument("--cooldown", type=float, default=0.25, metavar="F",
                   help="the fraction of steps --decay wsd decays over")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--batch-size", type=positive_int, default=16, help="effective batch (samples per optimizer step)")
    t.add_argument("--micro-batch", type=positive_int, default=16, help="samples per forward; the rest is gradient accumulation")
    t.add_argument("--row-tokens", type=nonnegative_int, default=256, help="short samples share a row of up to this many tokens "
                   "(block-diagonal mask; the same scores, less padding; 0: one sample per row)")
    t.add_argument("--steps", type=int, default=2400, help="optimizer steps (shape-world: 3.8 passes over its 10,000 samples)")
    t.add_argument("--epochs", type=float, default=0, help="passes over --train instead of --steps (the paper: 3)")
    t.add_argument("--stop-at", type=int, default=0, help="stop (with a checkpoint) at this step; the schedule still spans all steps")
    t.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    t.add_argument("--grad-checkpointing", type=on_off, default=None,
                   help="activation checkpointing (default: on for CUDA, off on CPU)")
    t.add_argument("--compile", action="store_true", help="torch.compile the decoder layers and vision blocks "
                   "(GPU: a 4B LoRA step's kernels take 0.65x the eager step's; the first steps pay for compiling)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--log-every", type=positive_int, default=50)
    t.add_argument("--eval-every", type=int, default=1000, help="evaluate on --heldout every K steps (0: only at the end)")
    t.add_argument("--eval-samples", type=int, default=0, help="evaluate on the first K held-out samples (0: all)")
    t.add_argument("--eval-batch", type=positive_int, default=16)
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (always at the end)")
    t.add_argument("--keep-checkpoints", type=int, default=2, help="keep the newest K checkpoints (0: all)")
    t.add_argument("--resume", action="store_true", help="continue exactly from --out's latest checkpoint")
    t.add_argument("--export", type=on_off, default=True,
                   help="write OUT/merged (Hub layout, base + LoRA merged) and OUT/peft at the end (default: on)")
    t.add_argument("--cache-gb", type=float, default=1.0, help="memory for encoded samples reused across epochs "
                   "(prompt, response tokens, and a frozen vision tower's outputs or else the pixel rows)")

    e = sub.add_parser("eval", help="best-of-N, pairwise, Kendall tau, exact ranking (or a benchmark's own rule)")
    e.add_argument("--model", default=None, help="backbone folder (default: the one --adapter was trained on)")
    e.add_argument("--adapter", default=DEFAULT_OUT, help="the folder `train` wrote ('' with a merged --model)")
    e.add_argument("--data", default=DEFAULT_HELDOUT)
    e.add_argument("--image-root", default=None)
    e.add_argument("--skip-bad", action="store_true")
    e.add_argument("--mode", choices=MODES, default=None, help="default: the mode the model was trained in")
    e.add_argument("--orders", type=positive_int, default=1, help="average each score over K cyclic shifts of the responses")
    e.add_argument("--protocol", choices=PROTOCOLS, default="default")
    e.add_argument("--predictions", default=None,
                   help="default: predictions.jsonl in the --adapter folder (in a merged --model's with --adapter ''); '' for none")
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--row-tokens", type=nonnegative_int, default=256, help="as in train")
    e.add_argument("--device", default="auto")

    s = sub.add_parser("score", help="score N responses to one prompt")
    s.add_argument("--model", default=None, help="backbone folder (default: the one --adapter was trained on)")
    s.add_argument("--adapter", default=DEFAULT_OUT)
    s.add_argument("--image", nargs="*", default=[])
    s.add_argument("--video", nargs="*", default=[], help="a video file, a folder of frames or a GIF")
    s.add_argument("--prompt", required=True)
    s.add_argument("--responses", nargs="+", required=True)
    s.add_argument("--mode", choices=MODES, default=None, help="default: the mode the model was trained in")
    s.add_argument("--device", default="auto")
    for p in (t, e, s):  # run_cli applies it
        p.add_argument("--threads", type=nonnegative_int, default=0,
                       help="CPU threads (0: torch's default, one per core; 1 on a machine where something else runs)")
    add_bench_args(sub)
    return ap


def on_off(text):
    """argparse type for switches given a value (`--export off`); type=bool would read 'off' as True."""
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected on/off, found {text!r}")
    return text.lower() in ("1", "true", "yes", "on")


def run_cli(fn, args):
    """Bad input (missing file, malformed data, wrong key) and a diverged run (a NaN loss) end with one
    readable line and exit code 1; MRRM_DEBUG=1 shows the traceback instead."""
    # A confident model's softmax and Adam moments underflow into denormal floats, which CPUs handle
    # far slower: without this an independent-mode shape-world run's steps take 3.8x longer once its
    # loss nears 0 (300 vs 80 ms). Flushing them to zero only changes values below 1.2e-38.
    torch.set_flush_denormal(True)
    # torch's threads wait for each other at every op: with one of two cores kept busy by another process,
    # two threads ran the shape-world step at 620 tokens/s and one thread at 3,400 (idle: 9,000 with two)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        return fn(args)
    except BrokenPipeError:  # `mrrm.py eval | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or Python's exit flush fails again
        sys.exit(1)
    except (OSError, ValueError, FloatingPointError) as e:  # OSError: a missing file, an output path that is a folder
        if os.environ.get("MRRM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    args = parser().parse_args(argv)
    return run_cli({"train": train, "eval": evaluate_cmd, "score": score_cmd, "bench": bench}[args.cmd], args)


if __name__ == "__main__":
    main()
