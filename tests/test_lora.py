"""Tests for lora.py: exactness at init, merge/unmerge, disable, freezing, save/load, peft parity.

Model-level tests use a tiny random transformers Qwen3VLForConditionalGeneration (its module names
are the ones our backbone copies); unit tests use a toy nn.Sequential and need nothing but torch.
"""

import doctest
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import lora
from lora import (DEFAULT_TARGETS, VISION_TARGETS, LoRALinear, adapter_disabled, count_parameters,
                  export_peft, inject_lora, load_lora, lora_state_dict, merge_lora, save_lora,
                  set_adapter_enabled, strip_lora, unmerge_lora)

IMAGE_TOKEN = 290


def tiny_vlm(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         # mrope_section sums to head_dim / 2
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[4, 2, 2], mrope_interleaved=True)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                           out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=IMAGE_TOKEN, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
    torch.manual_seed(seed)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


def vlm_inputs() -> dict:
    """One text+image sequence: a 1x4x4 patch grid merges 2x2 into 4 image tokens."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.tensor([[5, 292] + [IMAGE_TOKEN] * 4 + [293, 17, 42, 99, 7]])
    return dict(input_ids=input_ids,
                pixel_values=torch.randn(16, 3 * 2 * 8 * 8, generator=g),  # (patches, C*T*p*p)
                image_grid_thw=torch.tensor([[1, 4, 4]]),
                mm_token_type_ids=(input_ids == IMAGE_TOKEN).int())


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(**vlm_inputs()).logits


def randomize_lora_B(model, seed: int = 2, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)


def toy(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).to(dtype)


def test_zero_B_leaves_the_model_output_exactly_unchanged():
    model = tiny_vlm()
    before = logits(model)
    inject_lora(model, r=4, alpha=8, targets=DEFAULT_TARGETS + VISION_TARGETS)
    after = logits(model)
    assert torch.equal(before, after), f"max |diff| {(before - after).abs().max().item():.3g}"


def test_default_targets_wrap_every_language_model_projection():
    model = tiny_vlm()
    names = inject_lora(model)
    expected = [f"model.language_model.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert names == expected, f"wrapped {len(names)} modules: {names}"
    assert isinstance(model.get_submodule("model.language_model.layers.0.self_attn.q_proj.base_layer"), nn.Linear)


def test_vision_targets_wrap_the_four_linears_of_each_vision_block():
    names = inject_lora(tiny_vlm(), targets=VISION_TARGETS)
    assert len(names) == 2 * 4, f"wrapped {len(names)}: {names}"
    assert all(n.startswith("model.visual.blocks.") for n in names), names


def test_targets_that_match_nothing_raise_and_list_the_patterns():
    with pytest.raises(ValueError, match=r"matched no nn.Linear") as err:
        inject_lora(toy(), targets=DEFAULT_TARGETS)
    assert DEFAULT_TARGETS[0] in str(err.value), str(err.value)


def test_injecting_twice_raises():
    model = toy()
    inject_lora(model, targets=[r"0"])
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, targets=[r"2"])


def test_injected_layers_keep_the_eval_mode_of_the_model():
    model = tiny_vlm()
    inject_lora(model, r=4, alpha=8, dropout=0.5)
    randomize_lora_B(model)
    training = [n for n, m in model.named_modules() if m.training]
    assert not training, f"{len(training)} modules in training mode: {training[:3]}"
    first, second = logits(model), logits(model)
    assert torch.equal(first, second), f"max |diff| between two eval passes {(first - second).abs().max().item():.3g}"


def test_merged_and_unmerged_adapters_give_the_same_logits():
    model = tiny_vlm()
    inject_lora(model, r=4, alpha=8, targets=DEFAULT_TARGETS + VISION_TARGETS)
    randomize_lora_B(model)
    unmerged = logits(model)
    merge_lora(model)
    merged = logits(model)
    diff = (merged - unmerged).abs().max().item()
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0), f"max |merged - unmerged| {diff:.3g}"


def test_unmerge_restores_the_original_weights():
    model = tiny_vlm()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, r=4, alpha=8)
    randomize_lora_B(model)
    merge_lora(model)
    unmerge_lora(model)
    restored = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert restored.keys() == original.keys()
    worst = max((restored[k] - original[k]).abs().max().item() for k in original)
    assert worst <= 1e-6, f"max |restored - original| weight {worst:.3g}"
    # only close, not equal ((w + d) - d != w in floating point): such a model is no exact reference
    with pytest.raises(RuntimeError, match="merged and unmerged"):
        set_adapter_enabled(model, False)
    assert all(layer.enabled for _, layer in lora.lora_layers(model))


def test_disabled_adapter_gives_the_base_output_exactly():
    model = tiny_vlm()
    base = logits(model)
    inject_lora(model, r=4, alpha=8, targets=DEFAULT_TARGETS + VISION_TARGETS)
    randomize_lora_B(model)
    with adapter_disabled(model):
        disabled = logits(model)
    assert torch.equal(disabled, base), f"max |disabled - base| {(disabled - base).abs().max().item():.3g}"


def test_reenabled_adapter_gives_the_adapted_output_again():
    model = tiny_vlm()
    inject_lora(model, r=4, alpha=8)
    randomize_lora_B(model)
    adapted = logits(model)
    set_adapter_enabled(model, False)
    disabled = logits(model)
    set_adapter_enabled(model, True)
    again = logits(model)
    assert (adapted - disabled).abs().max() > 1e-3, "the random B should change the logits"
    assert torch.equal(again, adapted), f"max |re-enabled - adapted| {(again - adapted).abs().max().item():.3g}"


def test_disabling_a_merged_adapter_raises():
    model = toy()
    inject_lora(model, targets=[r"0"])
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_adapter_enabled(model, False)


def lora_snapshot(model):
    """Everything a failed call could change: module types, per-layer flags and every tensor."""
    flags = [(name, layer.enabled, layer.merged) for name, layer in lora.lora_layers(model)]
    return [type(m).__name__ for m in model], flags, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, what):
    types, flags, tensors = lora_snapshot(model)
    assert types == before[0], f"{what}: modules {before[0]} became {types}"
    assert flags == before[1], f"{what}: (layer, enabled, merged) {before[1]} became {flags}"
    changed = [k for k in tensors if not torch.equal(tensors[k], before[2][k])]
    assert tensors.keys() == before[2].keys() and not changed, f"{what}: tensors changed: {changed}"


def test_disabling_an_adapter_with_one_merged_layer_raises_and_leaves_every_layer_as_it_was():
    model = toy()
    inject_lora(model, r=2, targets=[r"0", r"2"])
    model[2].merge()  # the last layer: a layer-by-layer disable would have switched layer 0 off first
    before = lora_snapshot(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with adapter_disabled(model):
            pass
    assert_unchanged(model, before, "adapter_disabled")
    with pytest.raises(RuntimeError, match="unmerge"):
        set_adapter_enabled(model, False)
    assert_unchanged(model, before, "set_adapter_enabled(False)")


def test_stripping_or_merging_an_adapter_with_one_disabled_layer_raises_and_changes_nothing():
    model = toy()
    inject_lora(model, r=2, targets=[r"0", r"2"])
    randomize_lora_B(model)  # a merge would change the base weights
    model[2].set_enabled(False)
    before = lora_snapshot(model)
    with pytest.raises(RuntimeError, match="enable it first"):
        strip_lora(model)
    assert_unchanged(model, before, "strip_lora")
    with pytest.raises(RuntimeError, match="enable it first"):
        merge_lora(model)
    assert_unchanged(model, before, "merge_lora")


def test_only_lora_parameters_require_grad_after_injection():
    model = tiny_vlm()
    inject_lora(model, targets=DEFAULT_TARGETS + VISION_TARGETS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable), trainable
    assert len(trainable) == 2 * (14 + 8), f"{len(trainable)} trainable tensors"


def test_backward_reaches_only_the_lora_parameters_and_the_added_head():
    model = tiny_vlm()
    inject_lora(model, r=4, alpha=8)
    randomize_lora_B(model)  # with B = 0 the gradient of A would be exactly zero
    model.score_head = nn.Linear(64, 1)  # the caller's own head, trainable by default
    hidden = model(**vlm_inputs(), output_hidden_states=True).hidden_states[-1]  # (B, T, hidden)
    model.score_head(hidden[:, -1]).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("score_head.")}
    assert with_grad == expected, f"unexpected {sorted(with_grad - expected)}, missing {sorted(expected - with_grad)}"
    zero = [n for n in with_grad if model.get_parameter(n).grad.abs().max() == 0]
    assert not zero, f"zero gradients on {zero}"


def test_count_parameters_counts_r_times_in_plus_out_per_wrapped_layer():
    model = tiny_vlm()
    total_before = sum(p.numel() for p in model.parameters())
    inject_lora(model, r=4)
    expected = sum(4 * (m.base_layer.in_features + m.base_layer.out_features) for _, m in lora.lora_layers(model))
    trainable, total = count_parameters(model)
    assert (trainable, total) == (expected, total_before + expected), f"got {(trainable, total)}, expected {(expected, total_before + expected)}"
    assert f"{trainable:,}" in lora.parameter_report(model), lora.parameter_report(model)


def test_rslora_scales_by_alpha_over_sqrt_r():
    layer = LoRALinear(nn.Linear(8, 8), r=16, alpha=32, use_rslora=True)
    assert math.isclose(layer.scaling, 32 / 4), f"scaling {layer.scaling}, expected 8.0"
    assert math.isclose(LoRALinear(nn.Linear(8, 8), r=16, alpha=32).scaling, 2.0)


def test_lora_path_runs_in_fp32_and_returns_the_base_dtype():
    model = toy(torch.bfloat16)
    inject_lora(model, targets=[r"0"])
    randomize_lora_B(model)
    layer = model[0]
    assert layer.lora_A.weight.dtype == torch.float32, layer.lora_A.weight.dtype
    x = torch.randn(3, 8).to(torch.bfloat16)
    out = layer(x)
    # the base in bf16, the LoRA path in fp32, one rounding of the sum back to bf16
    lora_out = layer.lora_B(layer.lora_A(x.float())) * layer.scaling  # (3, 6) fp32
    expected = (layer.base_layer(x) + lora_out).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16, out.dtype
    assert torch.equal(out, expected), f"max |diff| {(out.float() - expected.float()).abs().max().item():.3g}"


def test_under_autocast_the_lora_path_is_the_plain_low_precision_sum_and_copies_no_activation():
    # under autocast both LoRA matmuls run in bf16 whatever goes in: an fp32 detour for x or the
    # base output would give the same values through extra copies of those activations
    from torch.utils._python_dispatch import TorchDispatchMode

    class CopiedShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    model = toy(torch.bfloat16)
    inject_lora(model, targets=[r"0"])
    randomize_lora_B(model)
    layer = model[0]
    x = torch.randn(5, 8).to(torch.bfloat16).requires_grad_(True)
    with CopiedShapes() as copies, torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out.square().sum().backward()
    # autocast casts the fp32 LoRA weights (r = 16, in 8, out 6); nothing of the 5 tokens' activations
    assert copies.shapes and not [s for s in copies.shapes if 5 in s], f"copies made: {copies.shapes}"
    with torch.no_grad():
        a = x.detach() @ layer.lora_A.weight.to(torch.bfloat16).t()  # (5, r) bf16
        expected = torch.addmm(layer.base_layer(x.detach()), a, layer.lora_B.weight.to(torch.bfloat16).t(),
                               alpha=layer.scaling)
    assert out.dtype == torch.bfloat16, out.dtype
    assert torch.equal(out, expected), f"max |diff| {(out.float() - expected.float()).abs().max().item():.3g}"


def test_the_update_is_added_in_place_into_the_base_output_with_no_view_to_rebase():
    # an out-of-place addmm would first copy the (tokens, out) base output into a new tensor; in place
    # on a view of it, autograd would add copies (CopySlices) to rebase the view; neither happens
    layer = LoRALinear(nn.Linear(8, 6), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    base_out = []
    layer.base_layer.register_forward_hook(lambda m, i, o: base_out.append(o))
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 5, 6) and out.data_ptr() == base_out[0].data_ptr()
    assert base_out[0].shape == (10, 6) and base_out[0]._base is None
    assert "CopySlices" not in type(out.grad_fn).__name__ + type(out.grad_fn.next_functions[0][0]).__name__


def test_compiled_the_update_is_a_matmul_and_a_pointwise_add_with_the_eager_values():
    # torch.compile traces functional code: the in-place addmm_ would come back as an out-of-place
    # addmm, which copies the base output first. Compiled, forward() adds a scaled matmul instead, a
    # pointwise add inductor can fuse into the next op. aot_eager runs the traced aten graph as it is.
    from torch.profiler import ProfilerActivity, profile
    layer = LoRALinear(nn.Linear(8, 6, bias=False), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 8, requires_grad=True)
    params = (x, layer.lora_A.weight, layer.lora_B.weight)

    def run(fn):  # -> output, gradients, aten ops called
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn(x)
            grads = torch.autograd.grad(out.square().sum(), params)
        return out, grads, {e.key for e in prof.key_averages()}
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    run(compiled)  # compiles
    (out, grads, ops), (want, want_grads, eager_ops) = run(compiled), run(layer)
    assert "aten::addmm_" in eager_ops and not {"aten::addmm", "aten::addmm_"} & ops, ops
    assert torch.allclose(out, want, atol=1e-6), (out - want).abs().max()
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()
    # under bf16 autocast (training on CUDA) the compiled update is rounded to bf16 before the add, the
    # eager sum once: they may differ by a bf16 step (2^-7 of a value) or so, not by more than two
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, _, _), (want, _, _) = run(compiled), run(layer)
    assert out.dtype == want.dtype == torch.bfloat16
    assert (out.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max(), (out - want).abs().max()


@pytest.mark.parametrize("shape", [(8,), (3, 8), (2, 3, 5, 8), (0, 8), (2, 0, 8)])
def test_the_fused_update_equals_base_plus_scaled_B_of_A_for_any_leading_shape(shape):
    # forward() adds the update with one addmm_ over the flattened tokens; it must keep x's leading
    # dimensions and give what the textbook formula gives, values and gradients
    layer = LoRALinear(nn.Linear(8, 6), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    expected = layer.base_layer(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
    assert out.shape == (*shape[:-1], 6), out.shape
    assert torch.allclose(out, expected, atol=1e-6), (out - expected).abs().max()
    grads = torch.autograd.grad(out.square().sum(), (x, layer.lora_A.weight, layer.lora_B.weight))
    want = torch.autograd.grad(expected.square().sum(), (x, layer.lora_A.weight, layer.lora_B.weight))
    for g, w in zip(grads, want):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()


def test_strip_lora_leaves_plain_linears_with_the_adapted_output():
    model = tiny_vlm()
    inject_lora(model, r=4, alpha=8)
    randomize_lora_B(model)
    adapted = logits(model)
    strip_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    diff = (logits(model) - adapted).abs().max().item()
    assert diff <= 1e-5, f"max |stripped - adapted| {diff:.3g}"


def test_save_then_load_restores_the_adapter_weights_and_config(tmp_path):
    path = str(tmp_path / "adapter.safetensors")
    model = tiny_vlm()
    inject_lora(model, r=4, alpha=8)
    randomize_lora_B(model)
    save_lora(model, path, config={"step": 7, "lr": 1e-4})
    fresh = tiny_vlm()
    inject_lora(fresh, r=4, alpha=8)
    config = load_lora(fresh, path)
    ours, theirs = lora_state_dict(model), lora_state_dict(fresh)
    assert config == {"step": 7, "lr": 1e-4}, config
    assert ours.keys() == theirs.keys()
    unequal = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not unequal, f"{len(unequal)} tensors differ: {unequal[:3]}"


def test_load_lists_every_missing_unexpected_and_misshaped_key_and_names_the_file(tmp_path):
    path = str(tmp_path / "adapter.safetensors")
    saved = toy()
    inject_lora(saved, r=2, targets=[r"0"])
    save_lora(saved, path)
    other = toy()
    inject_lora(other, r=3, targets=[r"2"])
    with pytest.raises(ValueError) as err:
        load_lora(other, path)
    msg = str(err.value)
    assert path in msg, msg
    assert "missing key 2.lora_A.weight" in msg and "unexpected key 0.lora_B.weight" in msg, msg
    mis = toy()
    inject_lora(mis, r=3, targets=[r"0"])
    with pytest.raises(ValueError, match=r"mis-shaped key 0\.lora_A\.weight: file \(2, 8\), model \(3, 8\)"):
        load_lora(mis, path)


@pytest.mark.parametrize("key", ["alpha", "use_rslora"])
def test_load_of_a_file_whose_lora_metadata_lacks_a_hyperparameter_names_the_file_and_the_key(tmp_path, key):
    from safetensors.torch import save_file
    path = str(tmp_path / "adapter.safetensors")
    model = toy()
    inject_lora(model, r=2, targets=[r"0"])
    hp = {"r": 2, "alpha": 32, "dropout": 0.0, "use_rslora": False}
    del hp[key]
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, path, metadata={"lora": json.dumps(hp), "config": "{}"})
    with pytest.raises(ValueError, match=f"hyperparameter {key}: missing from the file's lora metadata") as err:
        load_lora(model, path)
    assert path in str(err.value), str(err.value)


def test_load_of_a_truncated_file_gives_an_error_naming_the_file(tmp_path):
    path = str(tmp_path / "adapter.safetensors")
    model = toy()
    inject_lora(model, targets=[r"0"])
    save_lora(model, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="not a readable safetensors file") as err:
        load_lora(model, path)
    assert path in str(err.value), str(err.value)


def test_export_peft_writes_peft_key_names_and_config(tmp_path):
    model = tiny_vlm()
    names = inject_lora(model, r=4, alpha=8, dropout=0.05, use_rslora=True)
    export_peft(model, str(tmp_path), base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8, config
    assert config["use_rslora"] is True and config["lora_dropout"] == 0.05, config
    assert config["target_modules"] == sorted(names), config["target_modules"]
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys, sorted(keys)[:3]
    assert len(keys) == 2 * len(names), f"{len(keys)} keys for {len(names)} modules"


def peft_model_from_export(tmp_path, use_rslora: bool):
    """Our adapted model and peft's model loaded from our export onto the same base weights."""
    peft = pytest.importorskip("peft")
    model = tiny_vlm()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, r=4, alpha=8, dropout=0.05, targets=DEFAULT_TARGETS + VISION_TARGETS, use_rslora=use_rslora)
    randomize_lora_B(model)
    export_peft(model, str(tmp_path))
    fresh = tiny_vlm(seed=123)  # different random init, then the same base weights
    fresh.load_state_dict(base_state)
    return model, peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_loads_our_export_and_gives_the_same_logits(tmp_path, use_rslora):
    model, peft_model = peft_model_from_export(tmp_path, use_rslora)
    ours, theirs = logits(model), logits(peft_model)
    diff = (ours - theirs).abs().max().item()
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), f"max |ours - peft| {diff:.3g}"


def test_peft_holds_exactly_the_lora_weights_we_exported(tmp_path):
    model, peft_model = peft_model_from_export(tmp_path, use_rslora=False)
    theirs = {k.removeprefix("base_model.model.").replace(".default.", "."): v
              for k, v in peft_model.state_dict().items() if ".lora_" in k}
    ours = lora_state_dict(model)
    assert theirs.keys() == ours.keys(), f"only ours {sorted(ours.keys() - theirs.keys())[:3]}, only peft {sorted(theirs.keys() - ours.keys())[:3]}"
    unequal = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not unequal, f"{len(unequal)} tensors differ: {unequal[:3]}"


def test_the_module_docstring_example_runs():
    result = doctest.testmod(lora)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


def test_dropout_never_touches_the_base_path():
    base = nn.Linear(8, 8)
    layer = LoRALinear(base, r=2, alpha=4, dropout=0.5).train()
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), base(x))  # B = 0: only the base path is left, and it is not dropped


def test_load_refuses_an_adapter_saved_with_another_rslora_setting(tmp_path):
    a, b = toy(), toy()
    lora.inject_lora(a, r=2, alpha=4, targets=["0"], use_rslora=True)
    lora.inject_lora(b, r=2, alpha=4, targets=["0"], use_rslora=False)
    lora.save_lora(a, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="use_rslora"):
        lora.load_lora(b, str(tmp_path / "a.safetensors"))


def test_adapter_disabled_leaves_a_disabled_adapter_disabled():
    m = toy()
    lora.inject_lora(m, r=2, alpha=4, targets=["0"])
    lora.set_adapter_enabled(m, False)
    with adapter_disabled(m):
        pass
    assert not m[0].enabled


def fused_and_separate(seed: int = 0, r: int = 3, targets=(r"q_proj", r"k_proj", r"v_proj")):
    """A vlm.FusedLinear of three parts (sizes 6, 2, 2, like q/k/v under GQA) with LoRA on the parts
    `targets` name, and three plain layers, the same ones with LoRA, holding the same base rows and the
    same A/B pieces: peft's layout."""
    import vlm
    torch.manual_seed(seed)
    fused = nn.Sequential()
    fused.add_module("qkv_proj", vlm.FusedLinear(5, [("q_proj", 6), ("k_proj", 2), ("v_proj", 2)], bias=True))
    separate = nn.Sequential()
    for name, rows in zip(("q_proj", "k_proj", "v_proj"), fused.qkv_proj.weight.split([6, 2, 2])):
        separate.add_module(name, nn.Linear(5, rows.shape[0]))
    with torch.no_grad():
        for layer, w, b in zip(separate, fused.qkv_proj.weight.split([6, 2, 2]), fused.qkv_proj.bias.split([6, 2, 2])):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    assert inject_lora(fused, r=r, alpha=2 * r, targets=list(targets)) == ["qkv_proj"]
    inject_lora(separate, r=r, alpha=2 * r, targets=list(targets))
    randomize_lora_B(fused)
    with torch.no_grad():  # the separate layers get the fused layer's pieces, by their checkpoint names
        for k, v in lora_state_dict(fused).items():
            separate.get_parameter(k).copy_(v)
    return fused, separate


def test_a_fused_layer_adapts_each_part_exactly_as_separate_layers_and_gets_their_gradients():
    fused, separate = fused_and_separate()
    x = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(4, 7, 10, generator=torch.Generator().manual_seed(4))
    got = fused.qkv_proj(x)
    want = torch.cat([layer(x) for layer in separate], dim=-1)  # (4, 7, 6 + 2 + 2)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    parts = ("q_proj", "k_proj", "v_proj")
    layer = fused.qkv_proj
    # the fused A stacks the parts' A's, the fused B their B's: each part's rows of the gradients must
    # be that part's own, so nothing leaks through the zero blocks of B into another part
    for name in ("lora_A", "lora_B"):
        want_grad = torch.cat([getattr(separate.get_submodule(p), name).weight.grad for p in parts])
        got_grad = getattr(layer, name).weight.grad
        assert torch.allclose(got_grad, want_grad, atol=1e-6), (name, (got_grad - want_grad).abs().max())


def test_a_fused_layer_merges_saves_and_exports_under_each_parts_name(tmp_path):
    fused, separate = fused_and_separate()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
    keys = sorted(lora_state_dict(fused))
    assert keys == sorted(lora_state_dict(separate)), keys  # q_proj.lora_A.weight, ... as peft names them
    save_lora(fused, str(tmp_path / "a.safetensors"))
    other, _ = fused_and_separate(seed=1)
    load_lora(other, str(tmp_path / "a.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(other).values(), lora_state_dict(fused).values()))
    export_peft(fused, str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "q_proj", "v_proj"], config["target_modules"]
    want = torch.cat([layer(x) for layer in separate], dim=-1)
    merge_lora(fused)  # block-diagonal B: each part's rows get only their own B @ A
    with torch.no_grad():
        assert torch.allclose(fused.qkv_proj(x), want, atol=1e-5)


def test_targets_naming_some_parts_of_a_fused_layer_adapt_only_those():
    # LoRA on q and v alone, as in the LoRA paper: k's rows of the fused output stay the base's exactly
    fused, separate = fused_and_separate(targets=[r"q_proj", r"v_proj"])
    assert sorted(lora_state_dict(fused)) == sorted(lora_state_dict(separate)), sorted(lora_state_dict(fused))
    assert not any(k.startswith("k_proj") for k in lora_state_dict(fused))
    assert fused.qkv_proj.lora_A.weight.shape == (2 * 3, 5) and fused.qkv_proj.lora_B.weight.shape == (6 + 2, 3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(4, 10, generator=torch.Generator().manual_seed(4))
    got = fused.qkv_proj(x)
    want = torch.cat([layer(x) for layer in separate], dim=-1)  # (4, 6 + 2 + 2)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    assert torch.equal(got[:, 6:8], fused.qkv_proj.base_layer(x)[:, 6:8])
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for name in ("lora_A", "lora_B"):
        want_grad = torch.cat([getattr(separate.get_submodule(p), name).weight.grad for p in ("q_proj", "v_proj")])
        assert torch.allclose(getattr(fused.qkv_proj, name).weight.grad, want_grad, atol=1e-6), name
    merge_lora(fused)
    with torch.no_grad():
        assert torch.allclose(fused.qkv_proj(x), want, atol=1e-5)


def test_a_loose_pattern_adapts_the_parts_it_names_not_every_part_of_the_fused_name_it_also_matches():
    # `.*(q|v)_proj` also matches "qkv_proj" (and `.*up_proj` "gate_up_proj"); peft would adapt q and v only
    fused, _ = fused_and_separate(targets=[r".*(q|v)_proj"])
    assert [name for name, _ in fused.qkv_proj.parts] == ["q_proj", "v_proj"]
    fused, separate = fused_and_separate(targets=[r"k_proj"])  # the first and last parts left out
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    want = torch.cat([layer(x) for layer in separate], dim=-1)
    assert torch.allclose(fused.qkv_proj(x), want, atol=1e-6)


def test_a_fused_adapter_in_bf16_and_under_autocast_is_the_separate_layers_result():
    fused, separate = fused_and_separate()
    fused, separate = fused.to(torch.bfloat16), separate.to(torch.bfloat16)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want = torch.cat([layer(x) for layer in separate], dim=-1)
    got = fused.qkv_proj(x)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), atol=2e-2)
    fused, separate = fused_and_separate()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused.qkv_proj(x.float()), torch.cat([layer(x.float()) for layer in separate], dim=-1)
    assert got.dtype == want.dtype and torch.allclose(got.float(), want.float(), atol=2e-2)


def test_naming_a_part_a_fused_layer_does_not_have_raises():
    import vlm
    with pytest.raises(ValueError, match=r"\['up_proj', 'w_proj'\]: name at least one of this layer's parts \(gate_proj, up_proj\)"):
        LoRALinear(vlm.FusedLinear(4, [("gate_proj", 3), ("up_proj", 3)]), r=2, alpha=4, parts=["up_proj", "w_proj"])
    with pytest.raises(ValueError, match=r"\[\]: name at least one"):
        LoRALinear(vlm.FusedLinear(4, [("gate_proj", 3), ("up_proj", 3)]), r=2, alpha=4, parts=[])
    model = nn.Sequential()
    model.add_module("gate_up_proj", vlm.FusedLinear(4, [("gate_proj", 3), ("up_proj", 3)]))
    assert inject_lora(model, targets=[r"gate_up_proj"]) == ["gate_up_proj"]  # its own name: every part
    assert model.gate_up_proj.lora_A.weight.shape == (2 * 16, 4)


def test_peft_loads_our_fused_vlm_adapter_on_some_parts_and_gives_our_logits(tmp_path):
    # our model runs q/k/v and gate/up fused; an adapter on q, v and gate alone must export under
    # those names and give, through peft on transformers' separate layers, our logits
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import vlm
    from transformers import Qwen3VLForConditionalGeneration
    vlm.write_tiny_checkpoint(str(tmp_path / "m"))
    ours = vlm.load_model(str(tmp_path / "m"))
    inject_lora(ours, r=4, alpha=8, targets=[r"model\.language_model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.gate_proj)"])
    randomize_lora_B(ours)
    export_peft(ours, str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {m.rsplit(".", 1)[1] for m in config["target_modules"]} == {"q_proj", "v_proj", "gate_proj"}
    base = Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path / "m")).eval()
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    ids = torch.randint(20, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        got = ours(ids)
        assert (got - vlm.load_model(str(tmp_path / "m"))(ids)).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_with_dropout_each_part_of_a_fused_layer_draws_its_own_mask():
    # peft's separate q/k/v layers drop their input independently. Give two parts the same A and B:
    # under one shared mask their updates would be equal; with a mask each they differ, and in eval
    # mode (no dropout) they are equal again
    import vlm
    torch.manual_seed(0)
    layer = LoRALinear(vlm.FusedLinear(64, [("k_proj", 8), ("v_proj", 8)]), r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_A.weight[4:] = layer.lora_A.weight[:4]
        layer.lora_B.weight.normal_()
        layer.lora_B.weight[8:] = layer.lora_B.weight[:8]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    update = layer(x) - layer.base_layer(x)  # (5, 16)
    assert not torch.allclose(update[:, :8], update[:, 8:], atol=1e-3)
    kept = (update[:, :8] != 0).float().mean()  # the dropped input is rescaled, not lost: a real update
    assert kept > 0.9, kept
    layer.eval()
    update = layer(x) - layer.base_layer(x)
    assert torch.allclose(update[:, :8], update[:, 8:], atol=1e-6)
    # the per-part (batched) path, masks aside, is the one-matmul path: parts in the same columns
    fused, _ = fused_and_separate()
    want = fused.qkv_proj(x[:, :5])
    fused.qkv_proj.dropout_p, fused.qkv_proj.dropout = 0.5, nn.Identity()
    assert fused.qkv_proj.training and torch.allclose(fused.qkv_proj(x[:, :5]), want, atol=1e-6)
