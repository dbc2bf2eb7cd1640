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

What it leaves out: reasoning ("thinking") before the scores, generative judges, ensembles of
reward models, and sequence packing of several prompts into one row.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
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


def fit_lengths(lengths, budget):
    """Shorten the longest responses first until sum(lengths) <= budget: every response keeps
    min(len, cap) tokens for the largest cap that fits (water-filling), never dropping one."""
    if sum(lengths) <= budget:
        return list(lengths)
    lo, hi = 0, max(lengths)
    while lo < hi:  # the largest cap with sum(min(l, cap)) <= budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(l, mid) for l in lengths) <= budget else (lo, mid - 1)
    out = [min(l, lo) for l in lengths]
    spare = budget - sum(out)
    for i in sorted(range(len(out)), key=lambda i: -lengths[i]):  # hand out what is left, longest first
        if spare and out[i] < lengths[i]:
            out[i] += 1
            spare -= 1
    return out


def pack(prompt_ids, prompt_pos, response_ids, sep_id, mode="joint", max_len=None, pixel_values=None,
         grid_thw=None, where=""):
    """Prompt (ids + 3D positions from vlm.rope_positions) followed by N responses, each + separator.
    In independent mode every response's positions restart where the prompt ends."""
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
    return Pack(torch.cat(ids), torch.cat(pos, 1), torch.cat(seg), torch.tensor(seps), pixel_values, grid_thw, truncated)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (B, T), right-padded
    position_ids: torch.Tensor  # (3, B, T)
    mask: torch.Tensor  # (B, T, T) bool
    sep_index: torch.Tensor  # (B, Nmax), 0 where no response
    score_valid: torch.Tensor  # (B, Nmax) bool
    pixel_values: torch.Tensor = None
    grid_thw: torch.Tensor = None


def collate(packs, mode, pad_id=0):
    """Right-pad packs into one batch; padding keys are masked out and never scored."""
    B, T = len(packs), max(len(p.input_ids) for p in packs)
    N = max(len(p.sep_index) for p in packs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(3, B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    sep = torch.zeros(B, N, dtype=torch.long)
    score_valid = torch.zeros(B, N, dtype=torch.bool)
    for b, p in enumerate(packs):
        n = len(p.input_ids)
        ids[b, :n], pos[:, b, :n], seg[b, :n], valid[b, :n] = p.input_ids, p.position_ids, p.segment, True
        sep[b, :len(p.sep_index)], score_valid[b, :len(p.sep_index)] = p.sep_index, True
    index = torch.arange(T).expand(B, T)
    if mode == "independent":
        mask = vlm.attention_mask(index, index, valid, seg, seg)
    else:
        mask = vlm.attention_mask(index, index, valid)
    rows = [p.pixel_values for p in packs if p.pixel_values is not None]
    grids = [p.grid_thw for p in packs if p.grid_thw is not None]
    return PackedBatch(ids, pos, mask, sep, score_valid, torch.cat(rows) if rows else None,
                       torch.cat(grids) if grids else None)


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
    again and again. Ties are ordered by position (any consistent order is a valid ranking)."""
    B, N = scores.shape
    key = ranks.masked_fill(~valid, 10**9) * (N + 1) + torch.arange(N, device=ranks.device)
    order = key.argsort(-1)
    s = scores.gather(-1, order).masked_fill(~valid.gather(-1, order), float("-inf"))  # best first
    # log sum_{j >= k} exp(s_j): a reversed cumulative logsumexp
    tail = s.flip(-1).logcumsumexp(-1).flip(-1)
    ok = valid.gather(-1, order)
    nll = (tail - s).masked_fill(~ok, 0).sum(-1).mean()
    pick = scores.masked_fill(~valid, float("-inf")).argmax(-1, keepdim=True)
    acc = (best_target(ranks, valid).gather(-1, pick) > 0).float().mean()
    return nll, {"loss": nll.item(), "acc": acc.item()}


LOSSES = {"ce": listwise_ce_loss, "pl": plackett_luce_loss}

# -----------------------------------------------------------------------------
# The reward model


class RewardModel(nn.Module):
    def __init__(self, backbone, processor, head_hidden=1024, sep_token="<|im_end|>", max_len=4096,
                 max_responses=16):
        super().__init__()
        self.backbone, self.processor = backbone, processor
        self.head = ValueHead(backbone.cfg.text.hidden_size, head_hidden)
        self.sep_token, self.sep_id = sep_token, processor.tokenizer.token_id(sep_token)
        self.max_len, self.max_responses = max_len, max_responses

    @property
    def device(self):
        return self.head.fc1.weight.device

    def encode(self, prompt, responses, images=(), videos=(), mode="joint", where=""):
        """Text, media and responses -> Pack (the prompt's media go through the processor once)."""
        if len(responses) > self.max_responses:
            raise ValueError(f"{where}{len(responses)} responses, more than max_responses={self.max_responses}")
        if not responses:
            raise ValueError(f"{where}no responses to score")
        ids, rows, grids = self.processor.encode_user(images, videos, prompt)
        ids = torch.tensor(ids)
        grid = torch.tensor(grids, dtype=torch.long) if grids else None
        pos = vlm.rope_positions(ids, grid, self.backbone.cfg)
        resp = [self.processor.tokenizer.encode(r) for r in responses]
        return pack(ids, pos, resp, self.sep_id, mode, self.max_len, torch.cat(rows) if rows else None, grid, where)

    def forward(self, batch):
        """PackedBatch -> scores (B, Nmax); entries where score_valid is False are meaningless."""
        d = self.device
        pv = None if batch.pixel_values is None else batch.pixel_values.to(d)
        grid = None if batch.grid_thw is None else batch.grid_thw.to(d)
        h = self.backbone(batch.input_ids.to(d), pv, grid, batch.position_ids.to(d), batch.mask.to(d),
                          return_hidden=True)
        sep = batch.sep_index.to(d)
        h_sep = h.gather(1, sep[..., None].expand(-1, -1, h.shape[-1]))  # (B, Nmax, D)
        return self.head(h_sep)

    @torch.no_grad()
    def score(self, images=(), prompt="", responses=(), mode="joint", videos=()):
        """Scores of N responses to one prompt, from one forward pass."""
        p = self.encode(prompt, list(responses), images, videos, mode)
        return self(collate([p], mode))[0, :len(responses)].tolist()

    # --- saving and loading (adapter + head + settings; the backbone stays where it is) ---

    def settings(self):
        return {"sep_token": self.sep_token, "max_len": self.max_len, "max_responses": self.max_responses,
                "head_hidden": self.head.fc1.out_features}

    def save(self, folder, extra=None):
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        lora.save_lora(self.backbone, os.path.join(folder, "adapter.safetensors"))
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()},
                  os.path.join(folder, "head.safetensors"))
        with open(os.path.join(folder, "rm_config.json"), "w") as f:
            json.dump({**self.settings(), **(extra or {})}, f, indent=2)

    @classmethod
    def load(cls, model, adapter=None, dtype=torch.float32, device="cpu", **settings):
        """Backbone folder (Hub layout) + optional trained adapter folder (from `mrrm.py train`)."""
        from safetensors.torch import load_file
        backbone = vlm.load_model(model, dtype=dtype, device=device)
        proc = vlm.Processor(model, backbone.cfg)
        saved = {}
        if adapter is not None:
            path = os.path.join(adapter, "rm_config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: not found; --adapter must be a folder written by `mrrm.py train`")
            with open(path) as f:
                saved = json.load(f)
            cfg = saved["lora"]
            lora.inject_lora(backbone, r=cfg["r"], alpha=cfg["alpha"], dropout=0.0, targets=cfg["targets"],
                             use_rslora=cfg.get("use_rslora", False))
            lora.load_lora(backbone, os.path.join(adapter, "adapter.safetensors"))
        keep = {k: saved[k] for k in ("sep_token", "max_len", "max_responses", "head_hidden") if k in saved}
        rm = cls(backbone, proc, **{**keep, **settings})
        if adapter is not None:
            head = load_file(os.path.join(adapter, "head.safetensors"))
            rm.head.load_state_dict(head, strict=True)
        return rm.to(device).eval()


# -----------------------------------------------------------------------------
# Data: the authors' JSONL schema (prompt, responses, rankings with 1 = best, image, video, category, id)

_WS = re.compile(r"\s*")


def read_records(path, errors=None):
    """Yield (line_no, obj) for each record of a JSONL file or a file holding one JSON list.

    A malformed JSONL line raises ValueError('file:line: malformed JSON: ...'), or, when `errors`
    is a list, is appended to it as that message and skipped. A malformed JSON list always raises:
    after a syntax error there is no reliable place to resume.
    """
    path = str(path)
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            yield from _read_json_list(path, f.read())
            return
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path}:{line_no}: malformed JSON: {e.msg} at column {e.colno}"
                if errors is None:
                    raise ValueError(msg) from None
                errors.append(msg)


def _read_json_list(path, text):
    # raw_decode walks the list element by element, so each element keeps the line it starts on
    # (json.load would give us the objects but not where they came from).
    decoder = json.JSONDecoder()
    pos = _WS.match(text, 0).end() + 1  # past the '['
    line, counted = 1, 0
    pos = _WS.match(text, pos).end()
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
        yield line, obj
        pos = _WS.match(text, pos).end()
        if pos < len(text) and text[pos] == "]":
            return
        if pos >= len(text) or text[pos] != ",":
            where = line + text.count("\n", counted, pos)
            found = repr(text[pos]) if pos < len(text) else "end of file"
            raise ValueError(f"{path}:{where}: malformed JSON: expected ',' or ']' after an element, found {found}")
        pos = _WS.match(text, pos + 1).end()



def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _paths_problem(v):
    """Why v is not a path or a non-empty list of paths, or None when it is."""
    if isinstance(v, str):
        return None if v else "expected a path, found an empty string"
    if isinstance(v, list) and v and all(isinstance(p, str) and p for p in v):
        return None
    return f"expected a path or a non-empty list of paths, found {json.dumps(v)[:60]}"


def validate_sample(obj, where):
    """Every way `obj` breaks mrrm's sample schema, each as 'where: field: what is wrong'."""
    if not isinstance(obj, dict):
        return [f"{where}: expected a JSON object, found {type(obj).__name__}"]
    problems = []
    if not isinstance(obj.get("prompt"), str):
        problems.append(f"{where}: prompt: expected a string, found {type(obj.get('prompt')).__name__}")
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
    return problems


