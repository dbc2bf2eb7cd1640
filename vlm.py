"""
vlm.py: a hand-written Qwen3-VL (2B/4B/8B dense) that loads Hub checkpoints as downloaded.

What is here, top to bottom:
  - Config: dataclasses read from a checkpoint folder's config.json (defaults = Qwen3-VL-4B).
  - The vision tower (patch embed, interpolated learned positions, 2D rotary, per-image attention,
    2x2 merger, DeepStack mergers) and the Qwen3 decoder (RMSNorm, q/k-norm, GQA, SwiGLU,
    interleaved M-RoPE, DeepStack injection). Module names equal the checkpoint's tensor names,
    except that q/k/v and gate/up run fused (FusedLinear; split back by hub_state_dict()).
  - attention_mask(): the ONE function that builds every boolean attention mask in mrrm
    (causal, padding, cached decoding, and the reward model's independent-response blocks).
  - A strict safetensors loader (single file or sharded) that builds the model on the meta device
    and assigns tensors in the requested dtype, so a bf16 4B model never exists in fp32.
  - Processor: images (Pillow + numpy) and videos (frames, folder, GIF) into pixel rows + grids,
    a hand-written Qwen3-VL chat format, and 3D (t, h, w) position ids. to_rgb() and open_image()
    are how images enter, as in transformers: transparency onto white, files turned by their EXIF tag.
  - A KV cache and generation: greedy / temperature / top-k / top-p, G samples from one prefill.
  - write_tiny_checkpoint(): a random Qwen3-VL of any small size in the real Hub layout, with a
    small byte-level BPE tokenizer holding the Qwen special tokens, so everything runs on a CPU.

Usage:
    model = load_model("path/to/Qwen3-VL-4B-Instruct", dtype=torch.bfloat16, device="cuda")
    proc = Processor("path/to/Qwen3-VL-4B-Instruct")
    batch = proc.chat(images=[Image.open("x.png")], text="What is in the image?")
    out = generate(model, batch, max_new_tokens=64, stop_ids=proc.stop_ids)

What it leaves out: MoE variants (Qwen3-VL-30B-A3B/235B), flash-attention varlen kernels, sliding
windows, beam search, mp4 decoding without PyAV (give frames instead), and tensor parallelism.
"""

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


def read_json(path):
    """A JSON file's value; malformed JSON is a ValueError naming the file."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


@dataclass
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 2560  # = the text model's hidden size
    num_position_embeddings: int = 2304  # a 48x48 learned table, interpolated to each image's grid
    deepstack_visual_indexes: tuple = (5, 11, 17)  # vision blocks whose outputs feed LLM layers 0,1,2
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple = (24, 20, 20)  # frequencies given to (t, h, w); sums to head_dim / 2
    mrope_interleaved: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144


@dataclass
class Config:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, d, where="config.json"):
        if d.get("model_type") != "qwen3_vl":
            raise ValueError(f"{where}: model_type is {d.get('model_type')!r}; mrrm supports only 'qwen3_vl' "
                             "(the dense Qwen3-VL 2B/4B/8B checkpoints)")
        td, vd = dict(d.get("text_config") or {}), dict(d.get("vision_config") or {})
        # RoPE settings live under rope_scaling (older writers) or rope_parameters (transformers >= 5)
        rope = td.get("rope_parameters") or td.get("rope_scaling") or {}
        if "rope_theta" in rope:
            td["rope_theta"] = rope["rope_theta"]
        if "mrope_section" in rope:
            td["mrope_section"] = tuple(rope["mrope_section"])
        if rope.get("mrope_interleaved") is False:
            raise ValueError(f"{where}: mrope_interleaved=false is the Qwen2.5-VL layout; Qwen3-VL interleaves")
        vrope = vd.get("rope_parameters") or {}
        if "rope_theta" in vrope:
            vd["rope_theta"] = vrope["rope_theta"]
        if "deepstack_visual_indexes" in vd:
            vd["deepstack_visual_indexes"] = tuple(vd["deepstack_visual_indexes"])
        if td.get("num_key_value_heads") is None:
            td["num_key_value_heads"] = td.get("num_attention_heads", TextConfig.num_attention_heads)
        if td.get("head_dim") is None:
            td["head_dim"] = td["hidden_size"] // td["num_attention_heads"]
        pick = lambda dc, src: {f.name: src[f.name] for f in fields(dc) if f.name in src}
        top = pick(cls, d)
        top.pop("text", None), top.pop("vision", None)
        tie = d.get("tie_word_embeddings", td.get("tie_word_embeddings", False))
        top["tie_word_embeddings"] = bool(tie)
        return cls(text=TextConfig(**pick(TextConfig, td)), vision=VisionConfig(**pick(VisionConfig, vd)), **top)

    @classmethod
    def from_folder(cls, folder):
        path = os.path.join(folder, "config.json")
        if os.path.isfile(folder):
            raise FileNotFoundError(f"{folder}: is a file; expected a Qwen3-VL checkpoint folder as downloaded from the Hub")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found; expected a Qwen3-VL checkpoint folder as downloaded from the Hub")
        return cls.from_dict(read_json(path), where=path)

    def to_dict(self):
        """config.json in the Hub layout (readable by transformers and by from_dict)."""
        t, v = self.text, self.vision
        text = {k: getattr(t, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                           "attention_bias", "hidden_act", "max_position_embeddings")}
        text.update(model_type="qwen3_vl_text", tie_word_embeddings=self.tie_word_embeddings,
                    rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                     "mrope_section": list(t.mrope_section), "mrope_interleaved": True})
        vision = {k: getattr(v, k) for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                                             "patch_size", "spatial_merge_size", "temporal_patch_size",
                                             "out_hidden_size", "num_position_embeddings", "hidden_act")}
        vision.update(model_type="qwen3_vl_vision", deepstack_visual_indexes=list(v.deepstack_visual_indexes),
                      rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
        return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
                "text_config": text, "vision_config": vision, "image_token_id": self.image_token_id,
                "video_token_id": self.video_token_id, "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id, "tie_word_embeddings": self.tie_word_embeddings}


# -----------------------------------------------------------------------------
# Shared pieces


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32 whatever the activation dtype; the weight multiplies after the cast back.
        # F.rms_norm is x * rsqrt(mean(x^2) + eps), one kernel on CUDA where the plain ops take five
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def attention_mask(q_index, k_index, k_valid=None, q_segment=None, k_segment=None):
    """The one place masks are built. Returns bool (B, Tq, Tk): True where query i may attend key j.

    q_index, k_index: (B, Tq), (B, Tk) positions of queries and keys in the sequence order
        (for cached decoding the queries' indices start at the cache length: the offset is here).
    k_valid: (B, Tk) False at padding keys.
    q_segment, k_segment: (B, Tq), (B, Tk) segment ids for the reward model's independent mode:
        0 = shared prompt, r >= 1 = response r. A key is visible if it is in the prompt or in the
        query's own response. None means plain causal attention (the paper's joint mode).
    Every query may attend itself, so a padding row never has an empty softmax (its output is unused).
    """
    mask = k_index[:, None, :] <= q_index[:, :, None]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    if q_segment is not None:
        mask = mask & ((k_segment[:, None, :] == 0) | (k_segment[:, None, :] == q_segment[:, :, None]))
    return mask | (k_index[:, None, :] == q_index[:, :, None])


def flex_block_mask(mask):
    """The boolean (B, T, S) mask from attention_mask() as a FlexAttention BlockMask. The mask_mod only
    indexes that mask, so both paths see the same mask; the kernel then skips every 128 x 128 block of
    (query, key) that is all False: an independent-mode pack does not pay for the response x response blocks."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, T, S = mask.shape
    return create_block_mask(lambda b, h, q, k: mask[b, q, k], B, None, T, S, device=mask.device)


@functools.cache
def flex_kernel(device_type):
    """flex_attention is a fused kernel only when compiled (eager it is a dense reference). On CPU the
    compile costs more than it saves, so CPU runs it eagerly (tests, parity checks)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


# -----------------------------------------------------------------------------
# Vision tower


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, rows):
        # stride == kernel, so the Conv3d is a Linear on each flattened (C, T, p, p) pixel row
        return F.linear(rows.to(self.proj.weight.dtype), self.proj.weight.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def qkv_rotary(self, x, cos, sin):
        """x (N, C) -> q, k, v, each (N, nh, hd), q and k rotated (in fp32, then back to x's dtype)."""
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.n_head, C // self.n_head).unbind(1)  # each (N, nh, hd)
        return apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype), v


def grouped_attention(q, k, v, groups):
    """q, k, v (N, nh, hd) -> (N, nh, hd): one SDPA call per group length, each group of L rows
    attending only to itself (see attention_groups)."""
    _, nh, hd = q.shape
    y = torch.zeros_like(q) if len(groups) > 1 else None  # one length: yg below is all of y
    for L, rows in groups:
        qg, kg, vg = ((t if rows is None else t[rows]).view(-1, L, nh, hd).transpose(1, 2)
                      for t in (q, k, v))  # (G, nh, L, hd)
        yg = F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(-1, nh, hd)  # (G*L, nh, hd)
        y = yg if rows is None else y.index_copy(0, rows, yg)  # rows None: the groups are x in order
    return y


class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class CompiledSteps(nn.Module):
    """A module some of whose methods, named in `compiled_steps`, Qwen3VL.compile_layers replaces with
    torch.compile'd copies bound to this instance."""

    compiled_steps = ()

    def __getstate__(self):
        # a deepcopy would keep the compiled copies, bound to this module's weights, and pickle cannot
        # take them. A copy runs uncompiled, as nn.Module drops its own compiled forward.
        state = super().__getstate__()
        for name in self.compiled_steps:
            state.pop(name, None)
        return state


class VisionBlock(CompiledSteps):
    """Pre-norm attention + MLP, in three steps: the grouped attention in the middle loops over Python
    lists that change with every batch's images, so torch.compile (Qwen3VL.compile_layers) compiles
    only the two steps around it, which see tensors alone: after one recompile for dynamic shapes, a
    new image layout reuses them."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, groups):
        y = grouped_attention(*self.attention_inputs(x, cos, sin), groups)  # (N, nh, hd)
        return self.attention_output_mlp(x, y)

    def attention_inputs(self, x, cos, sin):
        return self.attn.qkv_rotary(self.norm1(x), cos, sin)

    def attention_output_mlp(self, x, y):
        x = x + self.attn.proj(y.flatten(1))  # heads concatenated: (N, C)
        return x + self.mlp(self.norm2(x))

    compiled_steps = ("attention_inputs", "attention_output_mlp")


class PatchMerger(nn.Module):
    """2x2 neighbouring patches -> one LLM token. The main merger normalises each patch before the
    concat; the DeepStack mergers normalise the concatenated 4H vector ("postshuffle")."""

    def __init__(self, cfg, postshuffle):
        super().__init__()
        self.dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.dim if postshuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.dim, self.dim)
        self.linear_fc2 = nn.Linear(self.dim, cfg.out_hidden_size)

    def forward(self, x):
        x = self.norm(x.view(-1, self.dim)) if self.postshuffle else self.norm(x).view(-1, self.dim)  # (N/4, 4H)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def patch_coords(grid_thw, merge, total):
    """Row, column and grid size of every patch, in the processor's merge-block order
    (t, block_row, block_col, row_in_block, col_in_block). Vectorised over all images. `total`: the
    number of patches (the pixel rows): known, it sizes the outputs without reading a GPU grid back."""
    counts = grid_thw.prod(-1)
    h, w, starts = (torch.repeat_interleave(v, counts, output_size=total)
                    for v in (grid_thw[:, 1], grid_thw[:, 2], counts.cumsum(0) - counts))
    i = (torch.arange(total, device=grid_thw.device) - starts) % (h * w)  # index within its frame
    blocks_w = w // merge
    row = (i // (merge * merge * blocks_w)) * merge + (i // merge) % merge
    col = ((i // (merge * merge)) % blocks_w) * merge + i % merge
    return row, col, h, w


def attention_groups(grid, device):
    """Attention stays inside each image and each temporal slice of a video (h*w patches). Groups of
    one length run as one batch: [(L, rows)], rows (G*L,) indexing the patch rows, or None when every
    group has length L. No (N, N) block-diagonal mask: for 16 images of 4,096 patches it would
    take 4 GiB, and attention would compute every block the mask then throws away.
    grid: [[t, h, w], ...], on the host (the groups' shapes depend on it)."""
    lens = [h * w for t, h, w in grid for _ in range(t)]
    if len(set(lens)) == 1:
        return [(lens[0], None)]
    by_len, start = {}, 0
    for L in lens:
        by_len.setdefault(L, []).append(torch.arange(start, start + L))
        start += L
    return [(L, torch.cat(r).to(device)) for L, r in by_len.items()]


class VisionModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList(
            [PatchMerger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes])

    def positions(self, grid_thw, total):
        """Learned position embedding (bilinear, align-corners resampling of the square table to each
        image's patch grid) and the 2D rotary cos/sin, for every one of the `total` patches."""
        side = int(self.cfg.num_position_embeddings ** 0.5)
        row, col, h, w = patch_coords(grid_thw, self.cfg.spatial_merge_size, total)
        table = self.pos_embed.weight

        def taps(i, n):  # source coordinate in the table, its two neighbours and their weights
            src = i.float() * (side - 1) / (n - 1).clamp(min=1)
            lo = src.floor().long().clamp(max=side - 1)
            hi = (lo + 1).clamp(max=side - 1)
            frac = src - lo.float()
            return lo, hi, 1 - frac, frac
        r0, r1, wr0, wr1 = taps(row, h)
        c0, c1, wc0, wc1 = taps(col, w)
        pos = sum(table[r * side + c] * (a * b)[:, None].to(table.dtype)
                  for r, a in ((r0, wr0), (r1, wr1)) for c, b in ((c0, wc0), (c1, wc1)))
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, head_dim // 2, 2, device=row.device).float() / (head_dim // 2))
        freqs = torch.cat([row[:, None] * inv_freq, col[:, None] * inv_freq], dim=-1)  # (N, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # (N, 1, hd), broadcast over heads
        return pos, emb.cos(), emb.sin()

    def forward(self, rows, grid_thw):
        """rows (N, C*T*p*p), grid_thw (n_images, 3) -> LLM tokens (N/4, D) and DeepStack features."""
        grid = grid_thw.tolist()  # the one read of a GPU grid: the attention groups' shapes need it
        if sum(t * h * w for t, h, w in grid) != rows.shape[0]:
            raise ValueError(f"{rows.shape[0]} pixel rows but grid_thw={grid} makes "
                             f"{sum(t * h * w for t, h, w in grid)} patches")
        pos, cos, sin = self.positions(grid_thw, rows.shape[0])
        x = self.patch_embed(rows) + pos.to(self.patch_embed.proj.weight.dtype)
        groups = attention_groups(grid, rows.device)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, groups)
            if i in self.cfg.deepstack_visual_indexes:
                feats.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), feats


# -----------------------------------------------------------------------------
# Language model


def mrope_cos_sin(position_ids, cfg, dtype):
    """Interleaved M-RoPE. position_ids (3, B, T) holds (t, h, w) per token. Frequency j takes its
    angle from axis t, except j = 1, 4, 7, ... (height) and j = 2, 5, 8, ... (width) up to 3*section."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, device=position_ids.device).float() / D)
    freqs = position_ids[..., None].float() * inv_freq  # (3, B, T, D/2)
    f = freqs[0].clone()
    for axis in (1, 2):
        idx = slice(axis, cfg.mrope_section[axis] * 3, 3)
        f[..., idx] = freqs[axis, ..., idx]
    emb = torch.cat([f, f], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class FusedLinear(nn.Linear):
    """Several projections of the same input kept as one weight, so they run as one matmul (and
    backward's input gradient as one, with no sum of three): the checkpoint's q_proj, k_proj and
    v_proj rows stacked in that order, as gpt-fast's wqkv. `parts` are (checkpoint name, out_features)
    in row order; hub_state_dict() and load_model() split and join the weight by them, so checkpoints
    and module names elsewhere stay the Hub's."""

    def __init__(self, in_features, parts, bias=False):
        super().__init__(in_features, sum(n for _, n in parts), bias=bias)
        self.parts = tuple(parts)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.qkv_sizes = [self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
        self.qkv_proj = FusedLinear(cfg.hidden_size, list(zip(("q_proj", "k_proj", "v_proj"), self.qkv_sizes)), bias=b)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=b)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, at=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)  # column slices of (B, T, (nh + 2 nkv) hd)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(k.view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if at is not None:  # only the queries at positions `index` (S, K) of rows `rows` (S,), each against its row
            rows, index = at
            q = q.transpose(1, 2)[rows[:, None], index].transpose(1, 2)  # (S, K, nh, hd) -> (S, nh, K, hd)
            k, v = k.index_select(0, rows), v.index_select(0, rows)  # (S, nkv, T, hd)
            keys = torch.arange(k.shape[2], device=x.device)
            mask = index[:, :, None] >= keys if mask is None else mask[rows[:, None], index]  # (S, K, T), causal
            B, T = index.shape
        gqa = self.n_kv != self.n_head
        if mask is not None and not isinstance(mask, torch.Tensor):  # a BlockMask from flex_block_mask()
            y = flex_kernel(q.device.type)(q, k, v, block_mask=mask, enable_gqa=gqa)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        if mask is not None and gqa:
            # SDPA's fused CUDA kernels take a mask or enable_gqa, not both: with both it silently runs
            # the math kernel (fp32 T x T scores). Repeating the kv heads keeps the fused kernel.
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))  # (B, nh, S, hd)
        if mask is not None and q.device.type == "cpu" and T >= 128 and at is None:
            # Masks are causal (attention_mask): no query sees a key past its own position. SDPA leaves
            # those keys out for is_causal but scores them all under an explicit mask; run on its own, the
            # first half of the queries leaves out the keys past it: 3/4 of the scores, the same result
            # up to rounding. On the CPU the shape-world demo's step ran 5% faster (an Intel machine;
            # a micro-benchmark on the AMD one since finds it within noise); not tried on CUDA.
            h, e = T // 2, k.shape[2] - T + T // 2  # e: the keys up to the first half's last query
            y = torch.cat([F.scaled_dot_product_attention(q[:, :, :h], k[:, :, :e], v[:, :, :e],
                                                          attn_mask=mask[:, None, :h, :e]),
                           F.scaled_dot_product_attention(q[:, :, h:], k, v, attn_mask=mask[:, None, h:])], dim=2)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        # SDPA gets either the boolean mask or is_causal, never both. With no mask, the keys are exactly
        # the queries (causal) or a single new token follows the cache (it may see every key).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                           is_causal=mask is None and T > 1, enable_gqa=gqa and mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = FusedLinear(cfg.hidden_size, [("gate_proj", cfg.intermediate_size),
                                                          ("up_proj", cfg.intermediate_size)])
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., 2 * inter) -> two (..., inter)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(CompiledSteps):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, at=None):
        y = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, at)
        if at is not None:
            x = x[at[0][:, None], at[1]]  # (S, K, D): the residual stream at the positions read
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x))

    def checkpointed(self, x, cos, sin, mask, at=None):
        """forward with activation checkpointing: only the inputs are kept, backward recomputes the rest.
        compile_layers compiles this method whole, checkpoint included, so the recompute happens inside
        the compiled backward and only what backward needs is recomputed (not down_proj, whose output
        only joins the residual stream); a compiled forward inside an eager checkpoint reruns all of it."""
        if torch.compiler.is_compiling():  # the form dynamo traces into the graph
            return torch.utils.checkpoint.checkpoint(self.forward, x, cos, sin, mask, at=at, use_reentrant=False)
        # Eager, the reentrant form: one autograd node per layer, whose backward reruns the layer and
        # backpropagates through it in one go. The other form hooks every tensor the layer saves (~50
        # here, each packed and unpacked by Python), host work a GPU waits on: `bench --config 4b-thin
        # --train` (the 4B's depths, toy widths) on the CPU ran the step in 179 ms, now 125 (92 without
        # checkpointing). Both forms replay the RNG (dropout) and autocast state. The reentrant one needs
        # .backward() (not torch.autograd.grad), and an input that requires grad: layer 0's, from the
        # frozen embedding, does not, and without one the layer's LoRA would get no gradient.
        if not x.requires_grad:
            x = x.detach().requires_grad_()
        return torch.utils.checkpoint.checkpoint(self.forward, x, cos, sin, mask, None, 0, at, use_reentrant=True)

    compiled_steps = ("checkpointed",)


class TextModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Body(nn.Module):
    """Holds `visual` and `language_model` so parameter names read model.visual.* / model.language_model.*"""

    def __init__(self, cfg):
        super().__init__()
        self.visual = VisionModel(cfg.vision)
        self.language_model = TextModel(cfg.text)


class Qwen3VL(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)
        # a tied checkpoint has no lm_head.weight: the output projection reuses embed_tokens
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.grad_checkpointing = False
        # "flex": masked (non-causal) attention through FlexAttention block masks, compiled on CUDA, so
        # an independent-mode pack skips the blocks its mask rules out; "sdpa": the boolean mask to SDPA
        self.attn_impl = "sdpa"

    @property
    def output_weight(self):
        return self.model.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        return F.linear(hidden, self.output_weight)

    def compile_layers(self, mode="default"):
        """torch.compile each decoder layer (its forward, and its forward under activation checkpointing:
        DecoderLayer.checkpointed) and the two halves of each vision block around its grouped attention
        (see VisionBlock); the code between them, with its data-dependent shapes, stays eager.
        A batch of new length recompiles once, then the layers run with dynamic shapes. `mode` is
        torch.compile's: "reduce-overhead" replays each compiled piece as a CUDA graph, meant for where the
        CPU cannot launch kernels as fast as the GPU runs them; it records a graph per input shape."""
        # The layers share each compiled function, which training meets in several variants (layer 0's input
        # needs no grad, the others' does; a mask or none; the first, static, shape; evaluation runs the
        # forward without grad). Past dynamo's default limit of 8 it would fall back to eager without a word.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        kw = {} if mode == "default" else {"mode": mode}
        for layer in self.model.language_model.layers:
            layer.compile(**kw)
        for m in self.modules():
            for name in getattr(m, "compiled_steps", ()):
                setattr(m, name, torch.compile(getattr(m, name), **kw))

    def forward(self, input_ids, pixel_values=None, grid_thw=None, position_ids=None, mask=None,
                cache=None, return_hidden=False, at=None, vision=None):
        """input_ids (B, T); pixel_values (N, C*T*p*p) with grid_thw (n, 3) for every image / video
        group in the batch, in order of appearance; position_ids (3, B, T) (text-only 1D positions if
        None); mask bool (B, T, T+cached) from attention_mask() or None for causal.
        Returns logits (B, T, V), or final-norm hidden states (B, T, D) with return_hidden=True.
        at=(rows (S,), index (S, K)): the outputs at those positions only, (S, K, V or D). The last layer
        then runs its attention queries, o_proj and MLP for them alone (keys and values for every token):
        a reward model reads K separators of a T-token pack (counted by mrrm.forward_flops: 2% of the
        4B model's forward on a 2,102-token pack, a fifth of the 4-layer shape-world backbone's).
        vision=(tokens (N/4, D), [DeepStack features (N/4, D)]): model.visual's outputs for the batch's
        media, computed already (a frozen tower's, kept by mrrm's PromptCache), in place of pixel_values."""
        if at is not None and cache is not None:
            raise ValueError("at= reads final positions of a whole sequence; it does not combine with a KV cache")
        lm = self.model.language_model
        B, T = input_ids.shape
        x = lm.embed_tokens(input_ids)
        feats = []
        if pixel_values is not None or vision is not None:
            vis, feats = vision if vision is not None else self.model.visual(pixel_values, grid_thw)
            # the image/video pad tokens, as flat indices into (B T), found once (a host sync on a GPU, for
            # their count; the vision tower's read of the grid is the other): the vision tokens and each
            # DeepStack level then go in by index, with no further sync
            visual = ((input_ids == self.cfg.image_token_id) | (input_ids == self.cfg.video_token_id)).flatten()
            where = visual.nonzero().squeeze(1)  # (n_visual,), in order
            if vis.shape[0] != where.numel():
                raise ValueError(f"{where.numel()} image/video pad tokens in input_ids but the pixel rows "
                                 f"give {vis.shape[0]} visual tokens (grid_thw={grid_thw.tolist()})")
            x = x.flatten(0, 1).index_copy(0, where, vis.to(x.dtype)).view(B, T, -1)  # (B T, D) -> (B, T, D)
        start = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = (torch.arange(T, device=x.device) + start).view(1, 1, T).expand(3, B, T)
        if mask is None and start > 0 and T > 1:  # a chunk after cached tokens: causal with an offset
            q_index = torch.arange(start, start + T, device=x.device).expand(B, T)
            mask = attention_mask(q_index, torch.arange(start + T, device=x.device).expand(B, start + T))
        dense = mask  # the last layer's few queries take the boolean mask, whichever kernel the others use
        if self.attn_impl == "flex" and mask is not None and cache is None:
            mask = flex_block_mask(mask)
        cos, sin = mrope_cos_sin(position_ids, lm.cfg, x.dtype)
        # the last layer reads only `at`, unless a DeepStack level still joins after it (a model of fewer
        # layers than levels: then every position is computed and `at` picked at the end)
        last = len(lm.layers) - 1 if at is not None and len(feats) < len(lm.layers) else None
        for i, layer in enumerate(lm.layers):
            a, m = (at, dense) if i == last else (None, mask)
            if self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = layer.checkpointed(x, cos, sin, m, a)
            else:
                x = layer(x, cos, sin, m, cache, i, a)
            if i < len(feats):  # DeepStack: vision features of block k join the residual after layer k
                x = x.flatten(0, 1).index_add(0, where, feats[i].to(x.dtype)).view(B, T, -1)
        if cache is not None:
            cache.length += T
        if at is not None and last is None:
            x = x[at[0][:, None], at[1]]  # (S, K, D)
        x = lm.norm(x)
        return x if return_hidden else self.logits(x)


# -----------------------------------------------------------------------------
# Loading (strict, meta device, safetensors only)


def read_checkpoint_index(folder):
    """tensor name -> shard file path, for single-file and sharded checkpoints."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        d = read_json(index)
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict):
            found = f"'weight_map' is {type(weight_map).__name__}" if isinstance(d, dict) else f"a {type(d).__name__}"
            raise ValueError(f"{index}: not a safetensors index (need an object with a 'weight_map' object; "
                             f"found {found})")
        bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{index}: not a safetensors index: weight_map maps {bad[0]!r} to "
                             f"{weight_map[bad[0]]!r}, not a shard file name")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        present = (sorted(os.listdir(folder)) if os.path.isdir(folder) else
                   "a file, not a folder" if os.path.exists(folder) else "folder does not exist")
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                                f"(found: {present}); only safetensors checkpoints are loaded")
    return {k: single for k in _safetensor_keys(single)}


def open_safetensors(path, device="cpu"):
    """A safetensors file opened for reading. Opening reads its header (and checks the file's size
    against it), so a truncated or garbled file is a ValueError naming it here; an error in a later
    get_tensor is the device's (no CUDA, out of memory)."""
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise ValueError(f"{path}: cannot read safetensors file ({e}); it may be truncated or corrupt") from None


def load_safetensors(path):
    """{name: tensor} of a safetensors file, on the CPU."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _safetensor_keys(path):
    with open_safetensors(path) as f:
        return list(f.keys())


def hub_layout(model):
    """checkpoint tensor name -> (state_dict key, first row, rows). A FusedLinear's weight (and bias)
    holds several checkpoint tensors stacked along dim 0; any other tensor is its own (0, None).
    For a model without LoRA layers (what load_model builds and save_model writes)."""
    fused = {name: m for name, m in model.named_modules() if isinstance(m, FusedLinear)}
    keys = list(model.state_dict())
    if any(".lora_" in k for k in keys):  # base_layer.* and lora_* are not checkpoint tensors
        raise ValueError("the model has LoRA layers: merge them into plain weights first (lora.strip_lora)")
    layout = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module not in fused:
            layout[key] = (key, 0, None)
            continue
        parent, start = module.rpartition(".")[0], 0
        for part, rows in fused[module].parts:
            layout[f"{parent}.{part}.{param}" if parent else f"{part}.{param}"] = (key, start, rows)
            start += rows
    return layout


def hub_state_dict(model):
    """model.state_dict() under the checkpoint's names and shapes (fused weights as row views, no copies)."""
    state = model.state_dict()
    return {name: state[key] if rows is None else state[key].narrow(0, start, rows)
            for name, (key, start, rows) in hub_layout(model).items()}


def load_model(folder, dtype=torch.float32, device="cpu"):
    """Build Qwen3VL on the meta device and assign each tensor once, in `dtype` on `device`;
    q/k/v and gate/up are copied into their fused weights as they are read (no second full copy)."""
    cfg = Config.from_folder(folder)
    with torch.device("meta"):
        model = Qwen3VL(cfg)
    layout, shapes = hub_layout(model), {k: v.shape for k, v in model.state_dict().items()}
    expected = {k: v.shape for k, v in hub_state_dict(model).items()}
    where = read_checkpoint_index(folder)
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    problems = [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]
    state, found = {}, set()
    for path in sorted(set(where.values())):
        if not os.path.isfile(path):
            problems.append(f"missing shard file: {path}")
            continue
        with open_safetensors(path, device) as f:
            for name in f.keys():
                if name not in expected or where.get(name) != path:
                    continue
                found.add(name)
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name]):
                    problems.append(f"shape mismatch: {name} is {tuple(t.shape)} in {os.path.basename(path)}, "
                                    f"the config needs {tuple(expected[name])}")
                    continue
                key, start, rows = layout[name]
                if rows is None:
                    state[key] = t.to(dtype)
                    continue
                if key not in state:
                    state[key] = torch.empty(shapes[key], dtype=dtype, device=device)
                state[key][start:start + rows] = t
    problems += [f"not in its shard: {k} (the index names {os.path.basename(p)}, which does not hold it)"
                 for k, p in sorted(where.items()) if k in expected and k not in found and os.path.isfile(p)]
    if problems:
        raise ValueError(f"{folder}: checkpoint does not match config.json ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_model(model, folder, shard_bytes=None):
    """Write config.json + safetensors in the Hub layout (sharded with an index when shard_bytes is given)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=2)
    state = {k: v.detach().contiguous() for k, v in hub_state_dict(model).items()}
    if shard_bytes is None:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for k, v in state.items():
        if cur and size + v.numel() * v.element_size() > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * v.element_size()
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


# -----------------------------------------------------------------------------
# Tokenizer, processor, chat format, 3D positions

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def smart_resize(h, w, factor, min_pixels, max_pixels):
    """Sides -> multiples of `factor` near the original aspect, pixel count inside [min, max]."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"image of {w}x{h}: aspect ratio above 200 is not supported by Qwen3-VL")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def video_smart_resize(t, h, w, factor, min_pixels, max_pixels, temporal=2):
    """The video variant budgets pixels over all frames and first scales up frames below `factor`."""
    if h < factor or w < factor:
        s = max(factor / h, factor / w)
        h, w = int(h * s), int(w * s)
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"video of {w}x{h}: aspect ratio above 200 is not supported by Qwen3-VL")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    tb = round(t / temporal) * temporal
    if tb * hb * wb > max_pixels:
        beta = math.sqrt(t * h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif tb * hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (t * h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def sample_frame_indices(total, video_fps, fps=2.0, min_frames=4, max_frames=768):
    """Qwen3-VL's rule: fps frames per second of video, clamped to [min_frames, max_frames] and the total."""
    n = int(total / video_fps * fps)
    n = min(max(n, min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def frame_pair_timestamps(indices, video_fps, temporal=2):
    """Each group of `temporal` frames is stamped with the mean time of its first and last frame."""
    idx = list(indices)
    idx += [idx[-1]] * (-len(idx) % temporal)
    ts = [i / video_fps for i in idx]
    return [(ts[i] + ts[i + temporal - 1]) / 2 for i in range(0, len(ts), temporal)]


def to_rgb(image):
    """A PIL image as RGB with any transparency (alpha band, or a palette/colour-key `transparency`)
    composited onto white, as transformers' convert_to_rgb does: a plain convert("RGB") drops the
    alpha and shows whatever colour the transparent pixels happen to hold, often black."""
    from PIL import Image
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def open_image(path):
    """An image file as an upright RGB image: EXIF orientation applied (a camera stores the pixels
    sideways plus a tag saying how to show them; transformers' load_image applies it too), then to_rgb.
    A file that is not an image, is cut short, or is over Pillow's decompression-bomb limit (which is
    not an OSError) is a ValueError naming it; a missing one stays FileNotFoundError."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            return to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot be read as an image ({e})") from None


FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the files of a frame folder


def frame_names(folder):
    """A frame folder's image files in natural order: frame_2 before frame_10, which a plain sort
    puts after it."""
    return sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)),
                  key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def load_video_frames(source, video_fps=None):
    """A video as (list of RGB PIL frames, fps). `source`: a list of images/paths, a folder of frames
    (in natural order), a GIF, or an mp4 read with PyAV when it is installed. Frame lists and folders
    carry no timing: `video_fps` says their rate (default 2, i.e. already sampled at Qwen's 2 fps).
    A GIF or mp4 keeps its own timing; video_fps is ignored for it. Paths open with open_image."""
    from PIL import Image
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("video given as an empty frame list")
        return [open_image(f) if isinstance(f, (str, os.PathLike)) else to_rgb(f) for f in source], video_fps or 2.0
    path = str(source)
    if os.path.isdir(path):
        names = frame_names(path)
        if not names:
            raise ValueError(f"{path}: video folder holds no {'/'.join(FRAME_EXTENSIONS)} frames")
        return [open_image(os.path.join(path, n)) for n in names], video_fps or 2.0
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: video not found")
    if path.lower().endswith(".gif"):
        frames, durations = [], []
        with Image.open(path) as im:
            for i in range(getattr(im, "n_frames", 1)):
                im.seek(i)
                frames.append(to_rgb(im))
                durations.append(im.info.get("duration", 100) or 100)
        return frames, 1000.0 / (sum(durations) / len(durations))
    try:
        import av
    except ImportError:
        raise ValueError(f"{path}: decoding this video needs PyAV (pip install av), which is not installed; "
                         "or give the video as a folder of frames, a list of frame paths, or a GIF") from None
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [to_rgb(f.to_image()) for f in container.decode(stream)]
        fps = float(stream.average_rate or 24)
    if not frames:
        raise ValueError(f"{path}: no video frames decoded")
    return frames, fps


class Tokenizer:
    """tokenizer.json through the `tokenizers` package. Special tokens are looked up by name."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        try:
            self.tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"{path}: not a tokenizer.json the tokenizers package can read ({e})") from None

    def encode(self, text):
        """Text -> ids, as text: a special token's spelling in it ("<|im_end|>", "<|image_pad|>") stays
        plain characters, as with transformers' split_special_tokens=True, so a prompt or response
        can never forge a turn end, a reward-model separator or an image slot. Special tokens enter
        the sequence only by id (Processor.tok); self.tok.encode still parses them, for templates."""
        # a flag on the shared tokenizer: set for this call only, so self.tok.encode keeps its default
        before, self.tok.encode_special_tokens = self.tok.encode_special_tokens, True
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = before

    def decode(self, ids, skip_special=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, name):
        i = self.tok.token_to_id(name)
        if i is None:
            raise KeyError(f"token {name!r} is not in the tokenizer's vocabulary")
        return i


@dataclass
class Batch:
    """One or more encoded prompts: what Qwen3VL.forward and generate() take."""
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (3, B, T)
    pixel_values: torch.Tensor = None  # (N, C*T*p*p)
    grid_thw: torch.Tensor = None  # (n_groups, 3)


def read_processor_settings(folder):
    """(image settings, video settings) of a checkpoint folder, looked up in transformers' order: the
    "image_processor" / "video_processor" objects of processor_config.json (the layout transformers v5
    saves), else preprocessor_config.json / video_preprocessor_config.json; video settings fall back
    to the image settings (older checkpoints kept both in one file)."""
    def read(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return None
        d = read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, found a {type(d).__name__}")
        return d
    nested = read("processor_config.json") or {}
    image = nested.get("image_processor") or read("preprocessor_config.json")
    if image is None:
        # silent defaults would preprocess differently from the model's training without a word
        raise FileNotFoundError(f"{folder}: no image processor settings: expected preprocessor_config.json, or "
                                "processor_config.json holding an 'image_processor' object, as downloaded from the Hub")
    video = nested.get("video_processor") or read("video_preprocessor_config.json") or image
    return image, video


class Processor:
    """Images, videos and text -> token ids, pixel rows, grids and 3D positions (one prompt)."""

    def __init__(self, folder, cfg=None):
        self.cfg = cfg or Config.from_folder(folder)
        self.tokenizer = Tokenizer(os.path.join(folder, "tokenizer.json"))
        pp, vp = read_processor_settings(folder)
        size = pp.get("size") or {}
        self.min_pixels = pp.get("min_pixels") or size.get("shortest_edge", 65536)
        self.max_pixels = pp.get("max_pixels") or size.get("longest_edge", 16777216)
        self.patch = pp.get("patch_size", self.cfg.vision.patch_size)
        self.merge = pp.get("merge_size", self.cfg.vision.spatial_merge_size)
        self.temporal = pp.get("temporal_patch_size", self.cfg.vision.temporal_patch_size)
        self.mean = np.array(pp.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.std = np.array(pp.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)
        vsize = vp.get("size") or {}
        self.video_min_pixels = vsize.get("shortest_edge", 128 * 32 * 32)
        self.video_max_pixels = vsize.get("longest_edge", 768 * 32 * 32)
        self.video_fps = vp.get("fps", 2.0)
        # TODO: num_frames / do_sample_frames=false (sample by count, or not at all) and cap_pixels_per_frame
        # (transformers' opt-in qwen-vl-utils budget) are not read: Qwen3-VL's own configs hold
        # do_sample_frames=true (what we do) and leave the other two unset
        self.video_min_frames = vp.get("min_frames", 4)
        self.video_max_frames = vp.get("max_frames", 768)
        self.video_mean = np.array(vp.get("image_mean", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.video_std = np.array(vp.get("image_std", [0.5, 0.5, 0.5]), dtype=np.float32)
        self.tok = {name: self.tokenizer.token_id(name) for name in
                    ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
        if self.tok["<|image_pad|>"] != self.cfg.image_token_id or self.tok["<|video_pad|>"] != self.cfg.video_token_id:
            raise ValueError(f"{folder}: tokenizer.json and config.json disagree on the image/video pad token ids")
        self.stop_ids = [self.tok["<|im_end|>"]] + [i for i in [self.tokenizer.tok.token_to_id("<|endoftext|>")] if i is not None]

    def _rows(self, frames, h, w, video=False):
        """frames: list of PIL images (1 for an image, 2 per group for a video) -> (rows, (t, gh, gw))."""
        from PIL import Image
        x = np.stack([np.asarray(to_rgb(f).resize((w, h), Image.BICUBIC)) for f in frames])  # (F, H, W, C)
        mean, std = (self.video_mean, self.video_std) if video else (self.mean, self.std)
        x = (x.astype(np.float32) / 255.0 - mean) / std
        x = x.transpose(0, 3, 1, 2)  # (F, C, H, W)
        if len(x) % self.temporal:  # an image becomes `temporal` equal frames; a video repeats its last
            x = np.concatenate([x, np.repeat(x[-1:], self.temporal - len(x) % self.temporal, axis=0)])
        p, m, T = self.patch, self.merge, self.temporal
        t, gh, gw = len(x) // T, h // p, w // p
        x = x.reshape(t, T, 3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/m, gw/m, m, m, C, T, p, p): merge-block order
        return torch.from_numpy(np.ascontiguousarray(x).reshape(t * gh * gw, 3 * T * p * p)), (t, gh, gw)

    def image(self, img):
        """PIL image -> (pixel rows (gh*gw, C*T*p*p), grid (1, gh, gw)). The image is used as given, as
        transformers does with a PIL input: open files with open_image to apply their EXIF orientation."""
        w, h = img.size
        h2, w2 = smart_resize(h, w, self.patch * self.merge, self.min_pixels, self.max_pixels)
        return self._rows([img], h2, w2)

    def video(self, source, video_fps=None):
        """-> list of (rows, grid (1, gh, gw), seconds): one entry per pair of frames."""
        frames, fps = load_video_frames(source, video_fps)
        idx = sample_frame_indices(len(frames), fps, self.video_fps, self.video_min_frames, self.video_max_frames)
        frames = [frames[i] for i in idx]
        w, h = frames[0].size
        h2, w2 = video_smart_resize(max(len(frames), self.temporal), h, w, self.patch * self.merge,
                                    self.video_min_pixels, self.video_max_pixels, self.temporal)
        stamps = frame_pair_timestamps(idx, fps, self.temporal)
        groups = []
        for g, s in enumerate(stamps):
            rows, grid = self._rows(frames[g * self.temporal:(g + 1) * self.temporal], h2, w2, video=True)
            groups.append((rows, grid, s))
        return groups

    def encode_user(self, images=(), videos=(), text="", video_fps=None):
        """The user turn and the assistant header as (ids, rows, grids): Qwen3-VL's chat format
        `<|im_start|>user\\n[vision blocks]TEXT<|im_end|>\\n<|im_start|>assistant\\n`, no system prompt.
        A video is one `<t seconds><|vision_start|>pads<|vision_end|>` block per frame pair, as Qwen's
        release code lays it out (transformers 5.10+ keeps one more vision_start/end around the blocks);
        video_fps is the frame rate of frame folders and lists (load_video_frames). The text between two special
        tokens is encoded as one string, as tokenizing the whole template does: "user\\n" + a text that
        starts with "\\n" can merge into one "\\n\\n" token under Qwen's pre-tokenizer."""
        t = self.tok
        ids, text_run = [t["<|im_start|>"]], "user\n"
        rows, grids = [], []
        n_merge = self.merge ** 2
        for img in images:
            r, g = self.image(img)
            ids += self.tokenizer.encode(text_run)
            ids += [t["<|vision_start|>"]] + [t["<|image_pad|>"]] * (g[0] * g[1] * g[2] // n_merge) + [t["<|vision_end|>"]]
            rows.append(r), grids.append(g)
            text_run = ""
        for vid in videos:
            for r, g, s in self.video(vid, video_fps):
                ids += self.tokenizer.encode(text_run + f"<{s:.1f} seconds>")
                ids += [t["<|vision_start|>"]] + [t["<|video_pad|>"]] * (g[1] * g[2] // n_merge) + [t["<|vision_end|>"]]
                rows.append(r), grids.append(g)
                text_run = ""
        ids += self.tokenizer.encode(text_run + text) + [t["<|im_end|>"]] + self.tokenizer.encode("\n")
        ids += [t["<|im_start|>"]] + self.tokenizer.encode("assistant\n")
        return ids, rows, grids

    def chat(self, images=(), videos=(), text=""):
        """One prompt, ready for Qwen3VL.forward / generate()."""
        ids, rows, grids = self.encode_user(images, videos, text)
        input_ids = torch.tensor([ids])
        grid_thw = torch.tensor(grids, dtype=torch.long) if grids else None
        pos = rope_positions(input_ids[0], grid_thw, self.cfg)[:, None, :]
        return Batch(input_ids, pos, torch.cat(rows) if rows else None, grid_thw)


def rope_positions(ids, grid_thw, cfg):
    """3D (t, h, w) position ids (3, T) for one sequence. Text advances all three axes by one; a
    vision group starting at s gives its merged token (r, c) the ids (s, s + r, s + c), and the text
    after it resumes at s + max(rows, cols)."""
    is_vis = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    pos = torch.zeros(3, len(ids), dtype=torch.long)
    m = cfg.vision.spatial_merge_size
    grid_list = grid_thw.tolist() if grid_thw is not None else []
    i, cur, T = 0, 0, len(ids)
    starts = torch.nonzero(is_vis[1:] & ~is_vis[:-1]).flatten().add(1).tolist() + ([0] if T and is_vis[0] else [])
    if len(starts) != len(grid_list):
        raise ValueError(f"{len(starts)} vision groups (runs of image/video pad tokens) in the ids but "
                         f"{len(grid_list)} grids in grid_thw; each group needs its own (1, h, w) grid "
                         "(a video: one per frame pair)")
    grids = iter(grid_list)
    for s in sorted(starts) + [T]:  # text run [i, s), then the vision group starting at s
        pos[:, i:s] = torch.arange(cur, cur + s - i)
        cur += s - i
        if s == T:
            break
        t, gh, gw = next(grids)
        lh, lw = gh // m, gw // m
        n = lh * lw
        if t != 1 or not bool(is_vis[s:s + n].all()):
            raise ValueError(f"vision group at token {s}: grid {t, gh, gw} does not match its pad tokens")
        r = torch.arange(lh).repeat_interleave(lw)
        c = torch.arange(lw).repeat(lh)
        pos[0, s:s + n] = cur
        pos[1, s:s + n] = cur + r
        pos[2, s:s + n] = cur + c
        cur += max(lh, lw)
        i = s + n
    return pos


# -----------------------------------------------------------------------------
# KV cache and generation


class KVCache:
    """Preallocated keys/values per layer: (B, n_kv, max_len, head_dim). `length` tokens are filled.
    With `index` set (a (1,) long tensor on the device) the cache is static: update() writes at
    `index` and returns the whole buffer, so a decoding step has the same shapes every time and can
    be captured once as a CUDA graph; the caller masks the slots past `index`."""

    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0
        self.index = None

    def update(self, layer, k, v):
        if self.index is not None:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
        T = k.shape[2]
        self.k[layer][:, :, self.length:self.length + T] = k
        self.v[layer][:, :, self.length:self.length + T] = v
        return self.k[layer][:, :, :self.length + T], self.v[layer][:, :, :self.length + T]

    def expand(self, n):
        """Prefill once with batch 1, then copy it for n samples."""
        self.k = [k.expand(n, -1, -1, -1).contiguous() for k in self.k]
        self.v = [v.expand(n, -1, -1, -1).contiguous() for v in self.v]


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class DecodeStep:
    """One decoding step for n samples over a static cache: (tokens (n,), position) -> logits (n, V).
    Eager it is a plain forward. With graph=True (CUDA) the step is captured once as a CUDA graph and
    replayed: a 2B model's ~1,000 small kernels per token then cost one launch instead of ~1,000
    Python dispatches, which is what bounds decoding at small batch. Shapes never change: the new key
    and value land at cache.index and attention runs over the whole buffer, masked past the index."""

    def __init__(self, model, cache, n, graph=False):
        self.model, self.cache, self.graph = model, cache, None
        d = cache.k[0].device
        self.slots = torch.arange(cache.k[0].shape[2], device=d)
        cache.index = torch.tensor([cache.length], device=d)
        self.tok = torch.zeros(n, 1, dtype=torch.long, device=d)  # inputs the graph reads
        self.pos = torch.zeros(3, n, 1, dtype=torch.long, device=d)
        if graph:
            # autocast's cache of cast weights must not live in the graph's memory pool
            amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                 enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
            side = torch.cuda.Stream(d)
            side.wait_stream(torch.cuda.current_stream(d))
            with torch.cuda.stream(side), amp:  # warm-up outside the graph (lazy inits, kernel selection)
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream(d).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), amp:
                self.logits = self._forward()
        # the warm-up and capture wrote at cache.index = the next free slot: the first real step overwrites it

    def _forward(self):
        mask = (self.slots <= self.cache.index).expand(self.tok.shape[0], 1, -1)  # (n, 1, max_len)
        h = self.model(self.tok, position_ids=self.pos, mask=mask, cache=self.cache, return_hidden=True)
        return self.model.logits(h[:, -1]).float()

    def __call__(self, tok, position):
        self.tok.copy_(tok[:, None])
        self.pos.fill_(position)
        if self.graph is None:
            out = self._forward()
        else:
            self.graph.replay()
            out = self.logits.clone()  # the next replay overwrites the graph's output
        self.cache.index += 1
        return out


@torch.no_grad()
def generate(model, batch, max_new_tokens=64, n=1, temperature=0.0, top_k=0, top_p=1.0, stop_ids=(),
             generator=None, return_logits=False, cuda_graph=None):
    """n completions of one prompt from a single prefill. Returns a dict with `tokens` (list of n
    lists, stop token included when hit), `finished` (n bools: stopped before the length limit),
    `logprobs` (per sampled token, of log_softmax(logits / temperature), before top-k/top-p) and,
    with return_logits, the raw next-token logits of every step (n, steps, V). cuda_graph (default:
    on for CUDA) replays each decoding step as one captured CUDA graph (DecodeStep); off, each step
    is a plain forward over the cache. max_new_tokens below 1 is a ValueError, as in transformers."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens is {max_new_tokens}; generate() samples at least one token")
    T = batch.input_ids.shape[1]
    p = next(model.parameters())
    if cuda_graph is None:
        cuda_graph = p.device.type == "cuda"
    cache = KVCache(model.cfg.text, 1, T + max_new_tokens, p.dtype, p.device)
    h = model(batch.input_ids, batch.pixel_values, batch.grid_thw, batch.position_ids, cache=cache, return_hidden=True)
    cache.expand(n)
    logits = model.logits(h[:, -1]).float().expand(n, -1)
    next_pos = int(batch.position_ids.max()) + 1
    # CPU: the plain cached forward (slicing the cache to its length beats masking the whole buffer)
    decode = DecodeStep(model, cache, n, graph=True) if cuda_graph and max_new_tokens > 1 else None
    stop = torch.tensor(list(stop_ids) or [-1], device=p.device)
    tokens, logps, all_logits = [], [], []
    done = torch.zeros(n, dtype=torch.bool, device=p.device)
    for step in range(max_new_tokens):
        if return_logits:
            all_logits.append(logits)
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        scaled = logits / temperature if temperature > 0 else logits
        logps.append(scaled.log_softmax(-1).gather(-1, tok[:, None])[:, 0])
        tokens.append(tok)
        done = done | torch.isin(tok, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if decode is not None:
            logits = decode(tok, next_pos + step)
        else:
            pos = torch.full((3, n, 1), next_pos + step, device=p.device)
            h = model(tok[:, None], position_ids=pos, cache=cache, return_hidden=True)
            logits = model.logits(h[:, -1]).float()
    tokens, logps = torch.stack(tokens, 1), torch.stack(logps, 1)  # (n, steps)
    out_tokens, finished = [], []
    for i in range(n):
        hit = torch.nonzero(torch.isin(tokens[i], stop)).flatten()
        end = int(hit[0]) + 1 if len(hit) else tokens.shape[1]
        out_tokens.append(tokens[i, :end].tolist())
        finished.append(bool(len(hit)))
    out = {"tokens": out_tokens, "finished": finished,
           "logprobs": [logps[i, :len(t)].tolist() for i, t in enumerate(out_tokens)]}
    if return_logits:
        out["logits"] = torch.stack(all_logits, 1)
    return out


# -----------------------------------------------------------------------------
# Tiny checkpoints in the real Hub layout

TINY_CORPUS = [
    "the red circle is on the left. the blue square is at the top right. a green triangle in the middle.",
    "What color is the triangle? How many shapes are there? Where is the yellow circle? Describe the image.",
    "There are two shapes: a small purple square and a large orange circle. I think it is reddish.",
    "yes no maybe one two three four five six seven eight nine zero 0 1 2 3 4 5 6 7 8 9 seconds",
    "user assistant system The answer is correct. The response is wrong, partly right, vague, complete.",
]


def build_tiny_tokenizer(vocab_size=512, corpus=None):
    """A byte-level BPE trained on a small corpus, holding the Qwen special tokens (ids 0..13)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((corpus or TINY_CORPUS) * 4, trainer)
    return tok


def tiny_config(vocab_size, special, **over):
    """A small Qwen3-VL config; keyword overrides go to text (t_*) or vision (v_*) or the top level."""
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0, mrope_section=(4, 2, 2))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=(0,))
    top = dict(tie_word_embeddings=True)
    for k, v in over.items():
        (text if k.startswith("t_") else vision if k.startswith("v_") else top)[k[2:] if k[:2] in ("t_", "v_") else k] = v
    vision["out_hidden_size"] = text["hidden_size"]
    return Config(text=TextConfig(**text), vision=VisionConfig(**vision), image_token_id=special["<|image_pad|>"],
                  video_token_id=special["<|video_pad|>"], vision_start_token_id=special["<|vision_start|>"],
                  vision_end_token_id=special["<|vision_end|>"], **top)


def init_weights(model, std=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    # in checkpoint order and shapes (each fused part drawn on its own), so the tensors a seed
    # writes do not depend on how the model stores them
    for name, p in hub_state_dict(model).items():
        with torch.no_grad():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def write_tiny_checkpoint(folder, seed=0, vocab_size=512, corpus=None, min_pixels=32 * 32, max_pixels=128 * 128,
                          shard_bytes=None, **config_overrides):
    """A random Qwen3-VL in the Hub layout: config.json, model.safetensors (or shards + index),
    tokenizer.json, preprocessor_config.json, video_preprocessor_config.json, generation_config.json."""
    os.makedirs(folder, exist_ok=True)
    tok = build_tiny_tokenizer(vocab_size, corpus)
    tok.save(os.path.join(folder, "tokenizer.json"))
    special = {s: tok.token_to_id(s) for s in QWEN_SPECIAL_TOKENS}
    cfg = tiny_config(tok.get_vocab_size(), special, **config_overrides)
    model = Qwen3VL(cfg)
    init_weights(model, seed=seed)
    save_model(model, folder, shard_bytes)
    v = cfg.vision
    common = {"patch_size": v.patch_size, "merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_rescale": True, "do_normalize": True,
              "do_resize": True, "resample": 3, "rescale_factor": 1 / 255, "do_convert_rgb": True}
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({**common, "image_processor_type": "Qwen2VLImageProcessor",
                   "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}, f, indent=2)
    with open(os.path.join(folder, "video_preprocessor_config.json"), "w") as f:
        json.dump({**common, "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2.0,
                   "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels * 8}}, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]],
                   "pad_token_id": special["<|endoftext|>"]}, f, indent=2)
    return cfg
