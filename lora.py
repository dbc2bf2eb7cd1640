"""Hand-rolled LoRA (Hu et al. 2021, arXiv 2106.09685) for the nn.Linear layers of a model.

What it does: `inject_lora` swaps each targeted nn.Linear for a `LoRALinear` that keeps the frozen
layer as `base_layer` and adds `B(A(dropout(x))) * scaling`, then freezes everything else. Module
paths become `...o_proj.base_layer`, as in peft. vlm's fused q/k/v and gate/up layers get one adapter
per part, saved under the part's own name, so `export_peft` writes an adapter that
`peft.PeftModel.from_pretrained` loads onto transformers' Qwen3VLForConditionalGeneration.
Also: disable the adapter (GRPO's reference model), merge/unmerge/strip for export, save/load the
adapter with safetensors (strict), and count parameters.

How to use it (targets are regexes matched with `re.fullmatch` against full module names, the
checkpoint's: `...self_attn.q_proj` picks q out of vlm's fused qkv_proj; for the backbone use
DEFAULT_TARGETS, or DEFAULT_TARGETS + VISION_TARGETS to adapt the vision tower too):

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> inject_lora(model, r=2, alpha=4, targets=[r"0", r"2"])
    ['0', '2']
    >>> count_parameters(model)
    (28, 58)
    >>> with adapter_disabled(model):
    ...     reference = model(torch.ones(1, 4))

What it leaves out: several adapters per model, DoRA and other variants, LoRA on Embedding/Conv
layers, bias training, quantized base layers, loading peft's own files back (we only export).

Decisions worth knowing:
- LoRA weights are created in fp32 whatever the base dtype (like peft's default
  `autocast_adapter_dtype`): tiny A/B updates vanish in bf16. The LoRA path runs in the dtype of
  the LoRA weights; the sum is cast back to the base output's dtype. Under autocast (mrrm's CUDA
  path) the matmuls run in autocast's dtype anyway, so x goes in uncast.
- Disabling a merged adapter, or merging a disabled one, raises: subtracting the delta again is not
  bit-exact, and a "reference model" that is only close to the base would be a silent lie. The
  model-wide calls check every layer first, so the error leaves the model as it was.
- Merge computes B@A in fp32 and rounds once into the base dtype. Unmerge subtracts it again, which
  restores the base weight only up to rounding ((w + d) - d != w in floating point, fp32 included:
  ~1e-7 there, ~1e-3 in bf16), so a layer that was merged and unmerged refuses to be disabled too.
- With dropout, each part of a fused layer (q/k/v, gate/up) draws its own mask, as peft's separate
  layers do; their A's then run as one batched matmul instead of one matmul.
"""

import json
import math
import os
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

# every attention and MLP projection of the language model (the checkpoint's Qwen3-VL module names)
DEFAULT_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",)
# opt-in: the vision tower's transformer blocks (not the patch mergers), e.g. DEFAULT_TARGETS + VISION_TARGETS
VISION_TARGETS = (r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))",)


class LoRALinear(nn.Module):
    """y = base(x) + B(A(dropout(x))) * scaling; A (r, in), B (out, r) per part; the base layer stays frozen."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 parts=None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got r={r}")
        self.base_layer = base_layer
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, alpha, dropout, use_rslora
        # rsLoRA (Kalajdzievski 2023): alpha/sqrt(r) keeps the update's scale stable as r grows
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base_layer.weight.device
        # A base layer with `parts` ((name, out_features), ...: vlm.FusedLinear, q/k/v or gate/up stacked
        # by rows) gets one rank-r adapter per adapted part (`parts`: their names; default all), as peft
        # puts one on each separate layer: lora_A stacks the n adapted parts' A's (n r, in), so all of
        # them are one matmul, and lora_B their B's by rows; each part's output rows only see its own r
        # columns of A's output, and a part left out gets no update (block_B()).
        fused = getattr(base_layer, "parts", None)
        if parts is not None:
            known = [name for name, _ in fused or ()]
            if not parts or set(parts) - set(known):
                raise ValueError(f"LoRA parts {list(parts)}: name at least one of this layer's parts "
                                 f"({', '.join(known) or 'it has none'})")
        self.parts = fused and tuple((name, rows) for name, rows in fused if parts is None or name in parts)
        n = len(self.parts) if self.parts else 1
        self.lora_A = nn.Linear(base_layer.in_features, n * r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, sum(rows for _, rows in self.parts) if self.parts else base_layer.out_features,
                                bias=False, device=device, dtype=torch.float32)
        # A like nn.Linear's own init, B zero: the wrapped model starts exactly equal to the base. A's
        # bound depends only on in_features, so the stacked A's of a fused layer draw as separate ones would
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self.rounded = False  # merged and unmerged: the base weight is only close to the original now
        # a fresh module is in training mode; inherit the wrapped layer's so an eval model stays eval
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base_layer(x)
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (tokens, in): the base output below is then no view (see addmm_)
        result = self.base_layer(x)  # (tokens, out)
        # autocast runs both LoRA matmuls in its low dtype whatever goes in: there, casting x up to
        # fp32 first would only add a copy of x and autocast's cast straight back (both again in
        # backward), four passes over x per layer for the same values
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) else self.lora_A.weight.dtype
        if self.parts and self.dropout_p > 0 and self.training:
            # peft drops each projection's input on its own: one dropout mask per part, and each part's
            # A on its own dropped copy of x, as one batched matmul (without dropout one matmul serves all)
            n = len(self.parts)
            xs = self.dropout(x.to(dtype).expand(n, *x.shape))  # (n, tokens, in): n independent masks
            a = torch.bmm(xs, self.lora_A.weight.view(n, self.r, -1).transpose(1, 2).to(xs.dtype))  # (n, tokens, r)
            a = a.transpose(0, 1).reshape(x.shape[0], n * self.r)  # (tokens, n r), parts side by side as A's rows
        else:
            a = self.lora_A(self.dropout(x.to(dtype)))  # (tokens, n r)
        # result += scaling * a @ B^T as one in-place addmm: no separate scale and add passes over the
        # (tokens, out) activations (forward and backward), which on CPU cost more than the rank-r
        # matmul itself, and no copy of the base output either (an out-of-place addmm first copies its
        # input into the new tensor). In place is safe: nothing else needs the base output, its matmul's
        # backward included (a forward hook on base_layer would see base + update); and it is no view,
        # or autograd would add copies to rebase the view.
        # Without autocast the sum is in the (wider) LoRA dtype, rounded once into the base output's dtype.
        B = self.block_B().t().to(a.dtype)  # (n r, out)
        if torch.compiler.is_compiling():
            # torch.compile traces functional code: addmm_ would come back as an out-of-place addmm,
            # whose kernel first copies the base output (a "Memcpy DtoD" per projection on CUDA). Written
            # as base + scaled matmul, the add is a pointwise op, which inductor on CUDA fuses into the
            # pointwise ops that read the sum (silu * up, the residual adds); only where something else
            # reads it (q/k/v: v goes straight into attention) does it fold it into a copying addmm again.
            # Under bf16 autocast the matmul's result is rounded before the add (as peft's own forward
            # does): up to one bf16 step from the eager sum, rounded once.
            out = result.to(a.dtype) + (a @ B) * self.scaling
        else:
            out = result.to(a.dtype)
            out.addmm_(a, B, alpha=self.scaling)  # autocast skips in-place ops
        return out.view(*shape[:-1], out.shape[-1]).to(result.dtype)  # not -1: 0 tokens leave nothing to infer

    def block_B(self) -> torch.Tensor:
        """B as (out, n r) for A's (tokens, n r) output: each part's rows keep their B in that part's r
        columns and are zero elsewhere (block diagonal), so one matmul adds every part's own update.
        The zeros cost (n - 1) r extra multiply-adds per output, small beside the base matmul's `in`,
        and get no gradient: B's own gradient is exactly each part's."""
        B = self.lora_B.weight
        if not self.parts:
            return B  # (out, r)
        own = {name: B_part for name, _, B_part in self.part_weights()}
        # a part left out is a (rows, 0) block: zero rows in the output, no columns of A's output
        return torch.block_diag(*(own.get(name, B.new_zeros(rows, 0)) for name, rows in self.base_layer.parts))

    def part_weights(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(part name, its A (r, in), its B (rows, r)) for each adapted part: row views of lora_A and lora_B."""
        A_parts = self.lora_A.weight.split(self.r)
        B_parts = self.lora_B.weight.split([rows for _, rows in self.parts])
        return [(name, A_part, B_part) for (name, _), A_part, B_part in zip(self.parts, A_parts, B_parts)]

    def delta_weight(self) -> torch.Tensor:
        # (out, n r) @ (n r, in) -> (out, in), in fp32 so bf16 weights lose nothing before the single rounding
        return (self.block_B().float() @ self.lora_A.weight.float()) * self.scaling

    def set_enabled(self, enabled: bool) -> None:
        if not enabled and self.merged:
            raise RuntimeError("cannot disable a merged LoRA adapter: call unmerge_lora(model) first")
        if not enabled and self.rounded:
            raise RuntimeError("cannot disable a LoRA adapter that was merged and unmerged: its base weights are "
                               "only close to the original (rounding); reload the base model for a reference")
        self.enabled = enabled

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not self.enabled:
            raise RuntimeError("cannot merge a disabled LoRA adapter: enable it first")
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged, self.rounded = False, True

    def extra_repr(self) -> str:
        parts = f", parts={'/'.join(name for name, _ in self.parts)}" if self.parts else ""
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{parts}, merged={self.merged}, "
                f"enabled={self.enabled}")


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("model has no LoRALinear layers: call inject_lora(model) first")
    return layers


def inject_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                targets=DEFAULT_TARGETS, use_rslora: bool = False) -> list[str]:
    """Wrap every nn.Linear whose full name fullmatches a pattern; freeze all but lora_A/lora_B.
    A layer with `parts` (vlm.FusedLinear) is also matched by its parts' names (`...self_attn.q_proj`
    for qkv_proj, as in the checkpoint and peft): only the parts matched get an adapter (q and v alone,
    as in the LoRA paper); when no part's name matches but the fused name does, all of them.
    Returns the wrapped modules' names."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers; inject_lora is applied once per model")
    if isinstance(targets, str):
        targets = [targets]
    patterns = [re.compile(t) for t in targets]
    chosen = {}  # module name -> the names of its parts to adapt (None: all, or not fused)
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        fused = getattr(m, "parts", ())
        hits = [part for part, _ in fused if any(p.fullmatch(_part_name(name, part)) for p in patterns)]
        if hits:  # the parts' names first: `.*(q|v)_proj` also matches "qkv_proj" but means q and v, as in peft
            chosen[name] = None if len(hits) == len(fused) else hits
        elif any(p.fullmatch(name) for p in patterns):
            chosen[name] = None
    names = list(chosen)
    if not names:
        raise ValueError("LoRA targets matched no nn.Linear module; patterns (re.fullmatch on full "
                         "module names, or the checkpoint's names of fused parts): " + ", ".join(targets))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout, use_rslora, parts=chosen[name]))
    return names


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    layers = lora_layers(model)
    merged = [name for name, layer in layers if layer.merged]
    # every layer is checked before any changes: an error never leaves the model half disabled
    if not enabled and merged:
        raise RuntimeError(f"cannot disable a merged LoRA adapter ({len(merged)} of {len(layers)} layers merged, "
                           f"first {merged[0]}): call unmerge_lora(model) first")
    rounded = [name for name, layer in layers if layer.rounded]
    if not enabled and rounded:
        raise RuntimeError(f"cannot disable a LoRA adapter that was merged and unmerged ({len(rounded)} layers, first "
                           f"{rounded[0]}): its base weights are only close to the original; reload the base model")
    for _, layer in layers:
        layer.set_enabled(enabled)


@contextmanager
def adapter_disabled(model: nn.Module):
    """The base model for the duration of the block (GRPO's reference policy, with no copy)."""
    layers = lora_layers(model)
    was_enabled = [layer.enabled for _, layer in layers]
    set_adapter_enabled(model, False)
    try:
        yield model
    finally:
        for (_, layer), enabled in zip(layers, was_enabled):
            layer.set_enabled(enabled)


def merge_lora(model: nn.Module) -> None:
    layers = lora_layers(model)
    disabled = [name for name, layer in layers if not layer.enabled]
    # every layer is checked before any changes: an error never leaves the model half merged
    if disabled:
        raise RuntimeError(f"cannot merge a disabled LoRA adapter ({len(disabled)} of {len(layers)} layers disabled, "
                           f"first {disabled[0]}): enable it first")
    for _, layer in layers:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def strip_lora(model: nn.Module) -> nn.Module:
    """Merge, then put each base nn.Linear back in its place: a plain model for a merged export.
    The base weights stay frozen (requires_grad False), as inject_lora left them."""
    merge_lora(model)  # all or nothing: raises before any layer is replaced
    for name, layer in lora_layers(model):
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer.base_layer)
    return model


def _part_name(name: str, part: str) -> str:
    """The checkpoint name of one part of the fused layer `name`: its sibling (a.qkv_proj -> a.q_proj)."""
    parent = name.rpartition(".")[0]
    return f"{parent}.{part}" if parent else part


def adapted_modules(model: nn.Module) -> list[str]:
    """The checkpoint's names of the adapted projections (a fused layer's parts each by their own)."""
    return sorted({key.rsplit(".lora_", 1)[0] for key in lora_state_dict(model)})


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r) for every LoRA layer, under
    peft's names: a fused layer's parts each under their own (row views of its A and B, no copies)."""
    sd = {}
    for name, layer in lora_layers(model):
        if not layer.parts:
            sd[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
            sd[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
            continue
        for part, A_part, B_part in layer.part_weights():
            sd[f"{_part_name(name, part)}.lora_A.weight"] = A_part.detach()  # (r, in)
            sd[f"{_part_name(name, part)}.lora_B.weight"] = B_part.detach()  # (rows, r)
    return sd


def _hyperparameters(model: nn.Module) -> dict:
    layers = [layer for _, layer in lora_layers(model)]
    hp = {"r": layers[0].r, "alpha": layers[0].alpha, "dropout": layers[0].dropout_p, "use_rslora": layers[0].use_rslora}
    # inject_lora uses one setting for all layers; anything else was built by hand and is not exportable as-is
    for layer in layers:
        other = {"r": layer.r, "alpha": layer.alpha, "dropout": layer.dropout_p, "use_rslora": layer.use_rslora}
        if other != hp:
            raise ValueError(f"LoRA layers disagree on hyperparameters: {hp} vs {other}")
    return hp


def save_lora(model: nn.Module, path: str, config: dict | None = None) -> None:
    """The adapter weights to one safetensors file; `config` (any JSON-able dict) rides in its metadata."""
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    metadata = {"lora": json.dumps(_hyperparameters(model)), "config": json.dumps(config or {})}
    save_file(tensors, path, metadata=metadata)


def load_lora(model: nn.Module, path: str) -> dict:
    """Strictly load an adapter saved by save_lora into an injected model; returns the saved config."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    expected = lora_state_dict(model)
    problems = [f"missing key {k} {tuple(v.shape)}" for k, v in expected.items() if k not in tensors]
    problems += [f"unexpected key {k} {tuple(v.shape)}" for k, v in tensors.items() if k not in expected]
    problems += [f"mis-shaped key {k}: file {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
                 for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if "lora" in metadata:
        saved, ours = json.loads(metadata["lora"]), _hyperparameters(model)
        # both set the scaling: a file that does not say them cannot be checked, so it is refused
        problems += [f"hyperparameter {k}: missing from the file's lora metadata, model {ours[k]}"
                     for k in ("alpha", "use_rslora") if k not in saved]
        problems += [f"hyperparameter {k}: file {saved[k]}, model {ours[k]}"
                     for k in ("alpha", "use_rslora") if k in saved and saved[k] != ours[k]]
    if problems:
        raise ValueError(f"{path}: adapter does not fit the model ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError(f"{path}: cannot load into a merged model; call unmerge_lora(model) first")
    with torch.no_grad():
        for k, param in expected.items():
            param.copy_(tensors[k])
    return json.loads(metadata.get("config", "{}"))


def export_peft(model: nn.Module, folder: str, base_model_name_or_path: str = "") -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` that peft.PeftModel.from_pretrained reads.

    peft wraps the transformers model as `PeftModel.base_model (LoraModel).model`, hence the
    "base_model.model." prefix; it drops the adapter name ("default") from keys when saving."""
    hp = _hyperparameters(model)
    names = adapted_modules(model)
    os.makedirs(folder, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": hp["r"],
        "lora_alpha": hp["alpha"],
        "lora_dropout": hp["dropout"],
        "use_rslora": hp["use_rslora"],
        # full module names: peft matches a list entry exactly (or as a ".suffix"), so it wraps
        # precisely the layers we wrapped and nothing a looser pattern might also catch
        "target_modules": names,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "exclude_modules": None,
        "revision": None,
    }
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {f"base_model.model.{k}": v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_report(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params {trainable:,} | total params {total:,} | trainable {100 * trainable / max(total, 1):.4f}%"
