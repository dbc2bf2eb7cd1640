"""vlm.py against the reference implementation (transformers' Qwen3-VL) and against itself.

The reference is an oracle for tests only: every test that needs it skips when transformers is not
installed, and CI installs it."""

import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vlm

IMG, VID, VS, VE = 290, 291, 292, 293  # token ids of the transformers-written tiny checkpoints


def ref_config(tie=False, kv_heads=2, deepstack=(0,), depth=3, layers=3):
    from transformers import Qwen3VLConfig
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    return Qwen3VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, rope_parameters=rope),
        vision_config=dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                           out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=list(deepstack)),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=tie)


def make_reference(folder, **kw):
    """A random transformers Qwen3-VL written with save_pretrained; large init so errors would show."""
    pytest.importorskip("transformers")
    from transformers import Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    ref = Qwen3VLForConditionalGeneration(ref_config(**kw)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    ref.save_pretrained(folder)
    return ref


CONFIGS = {  # (tied embeddings, GQA ratio, DeepStack layers) covered across the cases
    "tied-mha-1ds": dict(tie=True, kv_heads=4, deepstack=(1,)),
    "untied-gqa2-3ds": dict(tie=False, kv_heads=2, deepstack=(0, 1, 2)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    ref = make_reference(folder, **CONFIGS[request.param])
    return ref, vlm.load_model(folder)


def vision_seq(groups, text_between=(7, 8), video=False):
    """Token ids for vision groups [(t,h,w)...] wrapped in vision start/end with text around them."""
    seq = [5, 6]
    for g in groups:
        n = int(np.prod(g)) // 4 if not video else g[1] * g[2] // 4
        reps = g[0] if video else 1
        for _ in range(reps):
            seq += [11, 12] if video else []  # stands in for the "<t seconds>" text before each frame pair
            seq += [VS] + [VID if video else IMG] * n + [VE]
        seq += list(text_between)
    return torch.tensor([seq + [9, 10, 3]])


def compare(ref, ours, ids, rows=None, grid=None, video=False):
    tt = ((ids == IMG).int() + 2 * (ids == VID).int())
    kw = {}
    if rows is not None:
        kw = {"pixel_values_videos": rows, "video_grid_thw": grid} if video else {"pixel_values": rows, "image_grid_thw": grid}
    with torch.no_grad():
        a = ref(input_ids=ids, mm_token_type_ids=tt, **kw).logits
        if video:  # ours: one (1, h, w) group per frame pair, in order
            grid = torch.repeat_interleave(grid, grid[:, 0], dim=0)
            grid[:, 0] = 1
        pos = vlm.rope_positions(ids[0], grid, ours.cfg)[:, None]
        b = ours(ids, rows, grid, pos)
    return (a - b).abs().max().item()


def test_text_only_logits_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(0, 280, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ref(input_ids=ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, f"text-only max-abs-diff {diff:.2e}"


def test_one_odd_sized_image_logits_match_transformers(pair):
    ref, ours = pair
    grid = torch.tensor([[1, 6, 10]])  # 48x80 pixels after resize: not square, not a power of two
    rows = torch.randn(60, 3 * 2 * 8 * 8, generator=torch.Generator().manual_seed(2))
    diff = compare(ref, ours, vision_seq(grid.tolist()), rows, grid)
    assert diff <= 1e-4, f"one-image max-abs-diff {diff:.2e}"


def test_two_images_logits_match_transformers(pair):
    ref, ours = pair
    grid = torch.tensor([[1, 6, 10], [1, 4, 2]])
    rows = torch.randn(68, 384, generator=torch.Generator().manual_seed(3))
    diff = compare(ref, ours, vision_seq(grid.tolist()), rows, grid)
    assert diff <= 1e-4, f"two-image max-abs-diff {diff:.2e}"


def test_images_of_repeated_and_distinct_sizes_match_transformers(pair):
    # two sizes: the two 6x10 images run as one batched attention call, the 4x2 one as another
    ref, ours = pair
    grid = torch.tensor([[1, 6, 10], [1, 4, 2], [1, 6, 10]])
    assert [(L, None if r is None else r.tolist()) for L, r in vlm.attention_groups(grid.tolist(), "cpu")] == [
        (60, list(range(60)) + list(range(68, 128))), (8, list(range(60, 68)))]
    rows = torch.randn(128, 384, generator=torch.Generator().manual_seed(6))
    diff = compare(ref, ours, vision_seq(grid.tolist()), rows, grid)
    assert diff <= 1e-4, f"three-image max-abs-diff {diff:.2e}"


def tiny_random_model():
    torch.manual_seed(0)
    model = vlm.Qwen3VL(vlm.tiny_config(300, {n: i for i, n in enumerate(vlm.QWEN_SPECIAL_TOKENS)}))
    vlm.init_weights(model)
    return model


def tiny_random_model_compiling_aot_eager(monkeypatch):
    """A random tiny Qwen3VL, with torch.compile patched to aot_eager: dynamo's tracing and AOT autograd
    as torch.compile does them, without inductor's C++ codegen (CI may lack a compiler)."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend="aot_eager", **kw))
    return tiny_random_model()


def test_compiled_vision_tower_equals_eager_and_does_not_recompile_for_new_image_layouts(monkeypatch):
    # compile_layers compiles the two halves of each vision block around the grouped attention, so a new
    # set of image sizes (other groups, other lengths) reuses the compiled code once it is dynamic
    from torch._dynamo.utils import counters
    model = tiny_random_model_compiling_aot_eager(monkeypatch)
    layouts = [[[1, 8, 8]], [[1, 8, 8], [1, 4, 6]], [[1, 4, 6], [2, 8, 8], [1, 4, 6]], [[1, 12, 8]],
               [[1, 6, 6], [1, 4, 4], [1, 8, 4], [1, 2, 2]]]
    inputs = [(torch.randn(sum(t * h * w for t, h, w in g), 384), torch.tensor(g)) for g in layouts]
    with torch.no_grad():
        want = [model.model.visual(rows, grid) for rows, grid in inputs]
        model.compile_layers()
        torch._dynamo.reset()
        counters.clear()
        got = [model.model.visual(rows, grid) for rows, grid in inputs]
    for (a, fa), (b, fb) in zip(want, got):
        assert torch.allclose(a, b, atol=1e-6) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(fa, fb))
    # each half: one static graph for the first length, one dynamic for all the rest; no guard on groups
    assert counters["stats"]["unique_graphs"] == 4


def test_compiled_checkpointed_layers_recompute_only_what_backward_needs(monkeypatch):
    # compile_layers compiles DecoderLayer.checkpointed with the checkpoint inside, so backward recomputes
    # only what it needs: not down_proj (its output only joins the residual, which needs no recompute).
    # An eager checkpoint around a compiled forward would rerun all of it. Same gradients either way.
    import lora
    from torch.profiler import ProfilerActivity, profile
    model = tiny_random_model_compiling_aot_eager(monkeypatch)
    lora.inject_lora(model, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.train()
    model.grad_checkpointing = True
    ids, w = torch.randint(20, 290, (2, 24)), torch.randn(2, 24, 64)
    at = (torch.tensor([0, 1]), torch.tensor([[5, 23], [23, 11]]))  # as the reward model reads separators

    def step(at=None):  # -> (matmuls run, LoRA gradients)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            (model(ids, return_hidden=True, at=at) * (w if at is None else w[:, :2])).sum().backward()
        calls = {e.key: e.count for e in prof.key_averages()}
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return sum(calls.get(k, 0) for k in ("aten::mm", "aten::addmm", "aten::addmm_")), grads
    (eager, want), (_, want_at) = step(), step(at)
    model.compile_layers()
    step(), step(at)  # the first calls compile
    (compiled, got), (_, got_at) = step(), step(at)
    assert compiled <= eager - 2 * model.cfg.text.num_hidden_layers, (compiled, eager)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want_at, got_at))


@pytest.mark.parametrize("targets", ["lm", "lm+vision"])
def test_checkpointed_training_has_the_gradients_of_plain_training(targets):
    # Eager checkpointing (reentrant: one autograd node per layer) must give every LoRA weight the gradient
    # plain backprop gives it: layer 0 too, whose input (the frozen embedding's output, and with "lm" the
    # frozen tower's) requires no grad, and with dropout, whose masks the recompute must draw again.
    import lora
    model = tiny_random_model()
    cfg = model.cfg
    lora.inject_lora(model, r=4, dropout=0.1,
                     targets=lora.DEFAULT_TARGETS + (lora.VISION_TARGETS if targets == "lm+vision" else ()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.train()
    grid = torch.tensor([[1, 4, 4]])  # 16 patches -> 4 merged tokens
    ids = torch.tensor([[5, 6, cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
                        + list(range(20, 36))])
    rows, w = torch.randn(16, 384), torch.randn(1, 24, 64)
    at = (torch.tensor([0]), torch.tensor([[9, 23]]))

    def run(ckpt, at=None):  # -> (tensors autograd saved in forward, LoRA gradients)
        model.grad_checkpointing, saved = ckpt, []
        torch.manual_seed(1)  # the same dropout masks for both runs
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            h = model(ids, rows, grid, return_hidden=True, at=at)
        (h * (w if at is None else w[:, :2])).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return len(saved), grads
    for where in (None, at):
        (n_plain, want), (n_ckpt, got) = run(False, where), run(True, where)
        # a decoder layer saves ~50 tensors for backward, checkpointed only its inputs
        assert n_plain - n_ckpt > 40 * cfg.text.num_hidden_layers, (n_plain, n_ckpt)
        assert want.keys() == got.keys() and all(g is not None for g in got.values())
        for n in want:
            assert torch.allclose(want[n], got[n], atol=1e-6), n
        assert any("layers.0." in n and got[n].abs().max() > 0 for n in got)
        assert any("visual" in n for n in got) == (targets == "lm+vision")


def test_a_copy_of_a_compiled_model_runs_its_own_weights_and_pickles(monkeypatch):
    # compile_layers binds compiled steps to each vision block and decoder layer; a deepcopy must not keep
    # running the original's weights, and the model must still pickle (both worked before the vision compile)
    import copy
    import pickle
    model = tiny_random_model_compiling_aot_eager(monkeypatch)
    model.compile_layers()
    pickle.loads(pickle.dumps(model))
    block = copy.deepcopy(model.model.visual.blocks[0])
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()  # the attention output and MLP now add zero: the block returns its input
        x, cos, sin = torch.randn(64, 32), torch.ones(64, 1, 16), torch.zeros(64, 1, 16)
        assert torch.equal(block(x, cos, sin, [(64, None)]), x)
        assert not torch.equal(model.model.visual.blocks[0](x, cos, sin, [(64, None)]), x)
    layer = copy.deepcopy(model.model.language_model.layers[0])
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    x, cos, sin = torch.randn(1, 8, 64, requires_grad=True), torch.ones(1, 1, 8, 16), torch.zeros(1, 1, 8, 16)
    assert torch.equal(layer.checkpointed(x, cos, sin, None), x)
    assert not torch.equal(model.model.language_model.layers[0].checkpointed(x, cos, sin, None), x)


def test_video_logits_match_transformers(pair):
    ref, ours = pair
    grid = torch.tensor([[3, 4, 6]])  # three frame pairs of 4x6 patches
    rows = torch.randn(72, 384, generator=torch.Generator().manual_seed(4))
    diff = compare(ref, ours, vision_seq(grid.tolist(), video=True), rows, grid, video=True)
    assert diff <= 1e-4, f"video max-abs-diff {diff:.2e}"


def test_position_ids_equal_transformers_rope_index(pair):
    ref, ours = pair
    grid = torch.tensor([[1, 6, 10], [1, 4, 2]])
    ids = vision_seq(grid.tolist())
    tt = (ids == IMG).int()
    want, _ = ref.model.get_rope_index(ids, tt, image_grid_thw=grid)
    got = vlm.rope_positions(ids[0], grid, ours.cfg)
    assert torch.equal(want[:, 0], got)


# --- processor ---------------------------------------------------------------------------------


def reference_image_processor(patch, min_pixels, max_pixels):
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


def random_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    vlm.write_tiny_checkpoint(folder, min_pixels=32 * 32, max_pixels=96 * 96)
    return folder


@pytest.mark.parametrize("w,h", [(37, 53), (100, 61), (250, 31), (64, 64)])
def test_image_rows_and_grid_match_reference_processor(tiny, w, h):
    ref = reference_image_processor(8, 32 * 32, 96 * 96)
    img = random_image(w, h, seed=w * h)
    want = ref(images=[img], return_tensors="np")
    rows, grid = vlm.Processor(tiny).image(img)
    assert list(want["image_grid_thw"][0]) == list(grid)
    diff = np.abs(want["pixel_values"] - rows.numpy()).max()
    assert diff <= 1e-5, f"{w}x{h}: pixel rows differ by {diff:.2e}"


def test_qwen3vl_sized_patches_match_reference_processor(tmp_path):
    vlm.write_tiny_checkpoint(str(tmp_path), v_patch_size=16, min_pixels=65536, max_pixels=16777216 // 64)
    img = random_image(333, 517, seed=5)
    want = reference_image_processor(16, 65536, 16777216 // 64)(images=[img], return_tensors="np")
    rows, grid = vlm.Processor(str(tmp_path)).image(img)
    assert list(want["image_grid_thw"][0]) == list(grid)
    assert np.abs(want["pixel_values"] - rows.numpy()).max() <= 1e-5


def test_video_rows_equal_image_path_on_paired_frames(tiny):
    frames = [random_image(40, 72, seed=i) for i in range(6)]
    proc = vlm.Processor(tiny)
    groups = proc.video(frames, video_fps=2.0)
    assert len(groups) == 3
    h, w = vlm.video_smart_resize(6, 72, 40, 16, proc.video_min_pixels, proc.video_max_pixels)
    for g, (rows, grid, _) in enumerate(groups):
        want, want_grid = proc._rows(frames[2 * g:2 * g + 2], h, w)
        assert grid == want_grid == (1, h // 8, w // 8)
        assert torch.equal(rows, want)
    # an image is the same frame twice: its rows are one video group of two equal frames
    img_rows, _ = proc._rows([frames[0]], h, w)
    assert torch.equal(img_rows, proc._rows([frames[0], frames[0]], h, w)[0])


def test_frame_sampling_and_timestamps_follow_reference_rules():
    pytest.importorskip("transformers")
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    for total, fps in [(300, 30.0), (7, 2.0), (1000, 24.0), (3, 10.0)]:
        idx = vlm.sample_frame_indices(total, fps)
        n = min(max(int(total / fps * 2), 4), 768, total)  # the documented rule, restated
        assert len(idx) == n and idx[0] == 0 and idx[-1] == total - 1
        want = Qwen3VLProcessor._calculate_timestamps(None, list(idx), fps, 2)
        assert np.allclose(vlm.frame_pair_timestamps(idx, fps), want)


def test_video_prompt_has_timestamp_text_and_pad_counts(tiny):
    proc = vlm.Processor(tiny)
    frames = [random_image(64, 64, seed=i) for i in range(4)]
    batch = proc.chat(videos=[frames], text="what happens?")
    text = proc.tokenizer.decode(batch.input_ids[0].tolist(), skip_special=False)
    assert "<0.2 seconds><|vision_start|>" in text and "<1.2 seconds><|vision_start|>" in text, text[:200]
    per_group = int(batch.grid_thw[0, 1] * batch.grid_thw[0, 2]) // 4
    assert int((batch.input_ids == proc.cfg.video_token_id).sum()) == 2 * per_group
    assert batch.pixel_values.shape[0] == 2 * 4 * per_group  # two groups, four patches per token


def test_chat_ids_equal_tokenizing_the_whole_template_string(tiny):
    proc = vlm.Processor(tiny)
    img = random_image(50, 70, 1)
    batch = proc.chat(images=[img, img], text="What color is the circle?")
    n = int(batch.grid_thw[0].prod()) // 4
    vis = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
    s = f"<|im_start|>user\n{vis}{vis}What color is the circle?<|im_end|>\n<|im_start|>assistant\n"
    assert batch.input_ids[0].tolist() == proc.tokenizer.tok.encode(s, add_special_tokens=False).ids


def transparent_images():
    """Each way Pillow marks transparency: an alpha band (RGBA, LA) and a palette index (P + transparency)."""
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    alpha = np.zeros((50, 70), np.uint8)
    alpha[:, :35] = 255  # the right half fully transparent
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    return {"RGBA": Image.fromarray(np.dstack([rgb, alpha])), "LA": Image.fromarray(np.dstack([rgb[..., 0], alpha])),
            "P+transparency": palette}


def test_to_rgb_composites_transparency_onto_white_like_transformers_convert_to_rgb():
    pytest.importorskip("transformers")
    from transformers.image_transforms import convert_to_rgb
    for name, img in transparent_images().items():
        want = convert_to_rgb(img, return_numpy=True)
        diff = np.abs(np.asarray(vlm.to_rgb(img), dtype=int) - want).max()
        assert diff == 0, f"{name}: to_rgb differs from convert_to_rgb by {diff} levels"
    clear_red = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert vlm.to_rgb(clear_red).getpixel((0, 0)) == (255, 255, 255)


def test_transparent_images_and_frames_give_reference_rows(tiny, tmp_path):
    ref = reference_image_processor(8, 32 * 32, 96 * 96)
    proc = vlm.Processor(tiny)
    for name, img in transparent_images().items():
        want = ref(images=[img], return_tensors="np")["pixel_values"]
        diff = np.abs(want - proc.image(img)[0].numpy()).max()
        assert diff <= 1e-5, f"{name}: image rows differ from the reference by {diff:.3f}"
    clear_red = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    clear_red.save(tmp_path / "f0.png")
    for source in ([clear_red], [str(tmp_path / "f0.png")], str(tmp_path)):
        frames, _ = vlm.load_video_frames(source)
        assert frames[0].getpixel((0, 0)) == (255, 255, 255), f"{source}: frame pixel {frames[0].getpixel((0, 0))}"


def test_image_files_are_turned_upright_by_their_exif_orientation_like_load_image(tmp_path):
    pytest.importorskip("transformers")
    from transformers.image_utils import load_image
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: stored sideways, show rotated by 90 degrees
    os.makedirs(tmp_path / "frames")
    path = str(tmp_path / "frames" / "0.jpg")
    img.save(path, exif=exif)
    for source in ([path, path], str(tmp_path / "frames")):
        frames, _ = vlm.load_video_frames(source)
        assert frames[0].size == (40, 80), f"{source}: frame (w, h) {frames[0].size}, want (40, 80)"
    want = np.asarray(load_image(path))
    got = np.asarray(vlm.open_image(path))
    assert got.shape == want.shape == (80, 40, 3), f"open_image {got.shape}, load_image {want.shape}"
    assert np.array_equal(got, want)


def nested_processor_folder(tiny, folder):
    """The tiny checkpoint with its two processor files moved into processor_config.json, as
    transformers v5 saves them."""
    shutil.copytree(tiny, folder)
    nested = {"processor_class": "Qwen3VLProcessor"}
    for key, name in (("image_processor", "preprocessor_config.json"),
                      ("video_processor", "video_preprocessor_config.json")):
        nested[key] = json.load(open(os.path.join(folder, name)))
        os.remove(os.path.join(folder, name))
    json.dump(nested, open(os.path.join(folder, "processor_config.json"), "w"))
    return folder


def test_processor_reads_settings_nested_in_processor_config_json(tiny, tmp_path):
    folder = nested_processor_folder(tiny, str(tmp_path / "nested"))
    keys = ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels", "video_fps", "patch", "merge")
    files, nested = vlm.Processor(tiny), vlm.Processor(folder)
    got, want = [getattr(nested, k) for k in keys], [getattr(files, k) for k in keys]
    assert got == want, f"nested layout gives {dict(zip(keys, got))}, the two files {dict(zip(keys, want))}"
    pytest.importorskip("transformers")
    from transformers import AutoImageProcessor
    size = AutoImageProcessor.from_pretrained(folder).size
    assert (nested.min_pixels, nested.max_pixels) == (size.shortest_edge, size.longest_edge)


def test_processor_without_any_processor_settings_names_the_files(tiny, tmp_path):
    folder = str(tmp_path / "bare")
    shutil.copytree(tiny, folder)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        os.remove(os.path.join(folder, name))
    with pytest.raises(FileNotFoundError, match="no image processor settings: expected preprocessor_config.json"):
        vlm.Processor(folder)


def test_video_fps_does_not_override_a_gif_timing(tiny, tmp_path):
    proc = vlm.Processor(tiny)
    frames = [Image.fromarray(np.full((64, 64, 3), i * 10, np.uint8)) for i in range(20)]
    path = str(tmp_path / "v.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)  # 10 fps, 2 seconds
    own = [s for _, _, s in proc.video(path)]
    given = [s for _, _, s in proc.video(path, video_fps=2.0)]
    assert given == own and own[-1] < 2.0, f"stamps with video_fps=2: {given}; the GIF's own: {own}"


def video_config_folder(tiny, folder, **settings):
    shutil.copytree(tiny, folder)
    path = os.path.join(folder, "video_preprocessor_config.json")
    json.dump({**json.load(open(path)), **settings}, open(path, "w"))
    return folder


def test_video_config_min_and_max_frames_bound_the_sampled_frames(tiny, tmp_path):
    proc = vlm.Processor(video_config_folder(tiny, str(tmp_path / "v"), min_frames=2, max_frames=8))
    many = [random_image(32, 32, seed=i) for i in range(40)]  # 20 seconds at 2 fps: 40 frames wanted
    few = many[:6]  # 0.6 seconds at 10 fps: 1 frame wanted
    got = (len(proc.video(many, video_fps=2.0)), len(proc.video(few, video_fps=10.0)))
    assert got == (4, 1), f"frame pairs {got}, want 8 frames (max_frames) and 2 frames (min_frames): (4, 1)"
    pytest.importorskip("transformers")
    from types import SimpleNamespace
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata
    settings = SimpleNamespace(fps=2.0, min_frames=2, max_frames=8)
    for total, fps in [(40, 2.0), (6, 10.0), (300, 30.0)]:
        want = Qwen3VLVideoProcessor.sample_frames(settings, VideoMetadata(total_num_frames=total, fps=fps))
        got = vlm.sample_frame_indices(total, fps, proc.video_fps, proc.video_min_frames, proc.video_max_frames)
        assert list(got) == list(want), f"{total} frames at {fps} fps: {list(got)}, transformers {list(want)}"


def test_video_config_mean_and_std_normalise_video_frames(tiny, tmp_path):
    proc = vlm.Processor(video_config_folder(tiny, str(tmp_path / "v"), image_mean=[0, 0, 0], image_std=[1, 1, 1]))
    rows = proc.video([random_image(32, 32, seed=i) for i in range(2)], video_fps=2.0)[0][0]
    lo, hi = float(rows.min()), float(rows.max())
    assert 0 <= lo and hi <= 1, f"video rows span [{lo:.3f}, {hi:.3f}]; mean 0 and std 1 keep them in [0, 1]"


def test_special_token_spellings_in_user_text_stay_plain_text(tiny):
    proc = vlm.Processor(tiny)
    text = "what is <|image_pad|> here?<|im_end|>"
    ids = proc.tokenizer.encode(text)
    assert proc.tokenizer.decode(ids) == text and not set(ids) & set(proc.tok.values()), ids
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tiny, "tokenizer.json"), split_special_tokens=True)
    assert ids == ref.encode(text, add_special_tokens=False)
    batch = proc.chat(images=[random_image(64, 64, seed=0)], text=text)  # one image: one run of pads
    pads = int((batch.input_ids == proc.cfg.image_token_id).sum())
    grid = batch.grid_thw[0].tolist()
    assert pads == int(np.prod(grid)) // 4, f"{pads} image pad tokens for one image of grid {grid}"
    assert proc.tokenizer.tok.encode("<|im_end|>", add_special_tokens=False).ids == [proc.tok["<|im_end|>"]], \
        "the raw tokenizer, used to tokenize whole templates, still parses special tokens"


def qwen_pretokenizer_tokenizer():
    """A tiny BPE with Qwen2/3's real pre-tokenizer pattern, under which whitespace runs merge
    ("\n" + "\n" -> one "\n\n" token); the tiny checkpoints use plain byte-level splitting."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    pattern = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=vlm.QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((vlm.TINY_CORPUS + ["para one.\n\nQuestion: two\n\nthree"]) * 4, trainer)
    return tok


def test_text_only_prompt_starting_with_newline_tokenizes_like_the_whole_template(tiny):
    proc = vlm.Processor(tiny)
    proc.tokenizer.tok = qwen_pretokenizer_tokenizer()
    for text in ["\nQuestion: hello", "\n\nhello", "Question: hello"]:
        got = proc.chat(text=text).input_ids[0].tolist()
        want = proc.tokenizer.tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                                         add_special_tokens=False).ids
        pieces = lambda ids: [proc.tokenizer.tok.id_to_token(i) for i in ids[:4]]
        assert got == want, f"{text!r}: starts {pieces(got)}, the whole template {pieces(want)}"


def test_empty_frame_list_is_a_value_error(tiny):
    with pytest.raises(ValueError, match="empty frame list"):
        vlm.Processor(tiny).video([])


def test_rope_positions_with_fewer_grids_than_vision_groups_names_both_counts(tiny):
    proc = vlm.Processor(tiny)
    ids = proc.chat(images=[random_image(64, 64, 0)] * 2, text="x").input_ids[0]
    with pytest.raises(ValueError, match="2 vision groups .* but 1 grids in grid_thw"):
        vlm.rope_positions(ids, torch.tensor([[1, 8, 8]]), proc.cfg)


# --- tiny checkpoints ---------------------------------------------------------------------------


def test_tiny_checkpoint_loads_in_transformers_with_equal_logits(tiny):
    pytest.importorskip("transformers")
    from transformers import Qwen3VLForConditionalGeneration
    ref = Qwen3VLForConditionalGeneration.from_pretrained(tiny).eval()
    ours = vlm.load_model(tiny)
    proc = vlm.Processor(tiny)
    b = proc.chat(images=[random_image(45, 77, 2)], text="Describe the image.")
    tt = (b.input_ids == proc.cfg.image_token_id).int()
    with torch.no_grad():
        a = ref(input_ids=b.input_ids, pixel_values=b.pixel_values, image_grid_thw=b.grid_thw, mm_token_type_ids=tt).logits
        diff = (a - ours(b.input_ids, b.pixel_values, b.grid_thw, b.position_ids)).abs().max().item()
    assert diff <= 1e-5, f"max-abs-diff {diff:.2e}"


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    vlm.write_tiny_checkpoint(str(tmp_path / "one"))
    vlm.write_tiny_checkpoint(str(tmp_path / "many"), shard_bytes=40_000)
    assert os.path.isfile(tmp_path / "many" / "model.safetensors.index.json")
    a, b = vlm.load_model(str(tmp_path / "one")), vlm.load_model(str(tmp_path / "many"))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_fused_weights_hold_the_checkpoints_tensors_in_order_and_save_back_to_them(tiny, tmp_path):
    # q/k/v and gate/up run as one matmul each; the files keep the Hub's separate tensors
    ours = vlm.load_model(tiny)
    files = vlm.load_safetensors(os.path.join(tiny, "model.safetensors"))
    layer = "model.language_model.layers.1."
    attn, mlp = ours.get_submodule(layer + "self_attn"), ours.get_submodule(layer + "mlp")
    assert isinstance(attn.qkv_proj, vlm.FusedLinear) and isinstance(mlp.gate_up_proj, vlm.FusedLinear)
    want = torch.cat([files[layer + f"self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attn.qkv_proj.weight, want)
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([files[layer + "mlp.gate_proj.weight"],
                                                           files[layer + "mlp.up_proj.weight"]]))
    vlm.save_model(ours, str(tmp_path))
    saved = vlm.load_safetensors(str(tmp_path / "model.safetensors"))
    assert saved.keys() == files.keys()
    assert all(torch.equal(saved[k], files[k]) for k in files)
    import lora
    lora.inject_lora(ours)
    with pytest.raises(ValueError, match="LoRA layers: merge them into plain weights first"):
        vlm.save_model(ours, str(tmp_path / "with_lora"))  # would write base_layer and lora_* tensors


def test_loader_assigns_requested_dtype_without_fp32_copies(tiny):
    m = vlm.load_model(tiny, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in m.parameters())


# --- loader errors name the culprit -------------------------------------------------------------


def rewrite_tensors(folder, edit):
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def test_missing_unexpected_and_misshaped_tensors_are_listed_in_one_error(tmp_path):
    folder = str(tmp_path)
    vlm.write_tiny_checkpoint(folder)

    def edit(sd):
        del sd["model.language_model.layers.0.mlp.up_proj.weight"]
        sd["model.language_model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        sd["model.visual.pos_embed.weight"] = torch.zeros(3, 3)
    rewrite_tensors(folder, edit)
    with pytest.raises(ValueError) as e:
        vlm.load_model(folder)
    msg = str(e.value)
    assert "missing: model.language_model.layers.0.mlp.up_proj.weight" in msg
    assert "unexpected: model.language_model.layers.0.mlp.extra.weight" in msg
    assert "shape mismatch: model.visual.pos_embed.weight is (3, 3)" in msg


def test_truncated_safetensors_file_gives_clear_error(tmp_path):
    folder = str(tmp_path)
    vlm.write_tiny_checkpoint(folder)
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors file .*truncated or corrupt"):
        vlm.load_model(folder)


def test_garbage_header_gives_clear_error(tmp_path):
    folder = str(tmp_path)
    vlm.write_tiny_checkpoint(folder)
    open(os.path.join(folder, "model.safetensors"), "wb").write(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors: cannot read"):
        vlm.load_model(folder)


def test_missing_shard_file_is_named(tmp_path):
    folder = str(tmp_path)
    vlm.write_tiny_checkpoint(folder, shard_bytes=40_000)
    os.remove(os.path.join(folder, next(n for n in os.listdir(folder) if n.startswith("model-00002-of-"))))
    with pytest.raises(ValueError, match="missing shard file: .*model-00002-of-"):
        vlm.load_model(folder)


def test_tensor_missing_from_the_shard_the_index_names_is_listed(tmp_path):
    folder = str(tmp_path)
    vlm.write_tiny_checkpoint(folder, shard_bytes=40_000)
    path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(path))
    key = "model.language_model.norm.weight"
    wrong = next(v for v in sorted(set(index["weight_map"].values())) if v != index["weight_map"][key])
    index["weight_map"][key] = wrong
    json.dump(index, open(path, "w"))
    with pytest.raises(ValueError) as e:
        vlm.load_model(folder)
    assert f"(1 problems):\n  not in its shard: {key} (the index names {wrong}," in str(e.value), str(e.value)


@pytest.mark.parametrize("index", [{"weight_map": ["a"]}, [1, 2], {"weight_map": {"a": 3}}])
def test_malformed_index_is_a_value_error_naming_the_index_file(tmp_path, index):
    folder = str(tmp_path)
    vlm.write_tiny_checkpoint(folder, shard_bytes=40_000)
    json.dump(index, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not a safetensors index"):
        vlm.load_model(folder)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_error_is_not_labelled_a_corrupt_file(tiny):
    with pytest.raises(Exception) as e:
        vlm.load_model(tiny, device="cuda")
    assert "truncated or corrupt" not in str(e.value), str(e.value)


def test_other_model_type_is_refused_naming_what_is_supported(tmp_path):
    folder = str(tmp_path)
    vlm.write_tiny_checkpoint(folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["model_type"] = "qwen2_5_vl"
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match="model_type is 'qwen2_5_vl'; mrrm supports only 'qwen3_vl'"):
        vlm.load_model(folder)


def test_missing_folder_and_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        vlm.load_model(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    json.dump(vlm.Config().to_dict(), open(tmp_path / "empty" / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        vlm.load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.safetensors").write_bytes(b"")  # a file given where a folder belongs
    with pytest.raises(FileNotFoundError, match=r"weights\.safetensors: is a file; expected a Qwen3-VL checkpoint folder"):
        vlm.load_model(str(tmp_path / "weights.safetensors"))


def test_config_reads_rope_scaling_and_rope_parameters_alike():
    d = vlm.Config().to_dict()
    a = vlm.Config.from_dict(d)
    d["text_config"]["rope_scaling"] = d["text_config"].pop("rope_parameters")
    b = vlm.Config.from_dict(d)
    assert a == b == vlm.Config()  # defaults are Qwen3-VL-4B, and they round-trip


# --- generation --------------------------------------------------------------------------------


def uncached_greedy(model, batch, steps):
    ids, pos = batch.input_ids, batch.position_ids
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, batch.pixel_values, batch.grid_thw, pos)
        tok = logits[0, -1].argmax()
        out.append(int(tok))
        ids = torch.cat([ids, tok.view(1, 1)], 1)
        pos = torch.cat([pos, (pos.max() + 1).view(1, 1, 1).expand(3, 1, 1)], 2)
    return out


def test_cached_greedy_decoding_equals_uncached(tiny):
    model, proc = vlm.load_model(tiny), vlm.Processor(tiny)
    batch = proc.chat(images=[random_image(40, 60, 3)], text="What color is it?")
    got = vlm.generate(model, batch, max_new_tokens=12)["tokens"][0]
    assert got == uncached_greedy(model, batch, 12)


def test_each_of_g_samples_sees_logits_of_its_own_prefix(tiny):
    model, proc = vlm.load_model(tiny), vlm.Processor(tiny)
    batch = proc.chat(images=[random_image(40, 60, 4)], text="Describe the image.")
    g = torch.Generator().manual_seed(0)
    out = vlm.generate(model, batch, max_new_tokens=6, n=4, temperature=1.5, top_k=50, generator=g, return_logits=True)
    assert len({tuple(t) for t in out["tokens"]}) > 1, "samples should differ at temperature 1.5"
    for i, toks in enumerate(out["tokens"]):
        ids = torch.cat([batch.input_ids, torch.tensor([toks])], 1)
        T0 = batch.input_ids.shape[1]
        pos = torch.cat([batch.position_ids, (batch.position_ids.max() + 1 + torch.arange(len(toks))).view(1, 1, -1).expand(3, 1, -1)], 2)
        with torch.no_grad():
            full = model(ids, batch.pixel_values, batch.grid_thw, pos)[0, T0 - 1:T0 - 1 + len(toks)]
        diff = (full - out["logits"][i, :len(toks)]).abs().max().item()
        assert diff <= 1e-4, f"sample {i}: cached vs uncached logits differ by {diff:.2e}"


def test_static_decode_step_equals_plain_cached_step(tiny):
    # DecodeStep is what generate() captures as a CUDA graph; here it runs eagerly on the CPU: writing
    # at cache.index and masking the whole buffer must give the logits of slicing the cache to its length
    model, proc = vlm.load_model(tiny), vlm.Processor(tiny)
    assert model.cfg.text.num_key_value_heads < model.cfg.text.num_attention_heads  # the GQA path too
    batch = proc.chat(images=[random_image(40, 60, 5)], text="How many shapes?")
    T, n, steps = batch.input_ids.shape[1], 3, 5
    caches = [vlm.KVCache(model.cfg.text, 1, T + steps + 2, torch.float32, "cpu") for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(batch.input_ids, batch.pixel_values, batch.grid_thw, batch.position_ids, cache=c)
            c.expand(n)
        step = vlm.DecodeStep(model, caches[1], n)
        first = int(batch.position_ids.max()) + 1
        tok = torch.tensor([5, 9, 17])
        for s in range(steps):
            h = model(tok[:, None], position_ids=torch.full((3, n, 1), first + s), cache=caches[0], return_hidden=True)
            want, got = model.logits(h[:, -1]), step(tok, first + s)
            assert (want - got).abs().max() <= 1e-5, f"step {s}"
            tok = want.argmax(-1) if s % 2 else torch.randint(20, 200, (n,))  # samples diverge, as in sampling
    assert int(caches[1].index) == T + steps


def test_generation_stops_at_stop_token_and_flags_length_limit(tiny):
    model, proc = vlm.load_model(tiny), vlm.Processor(tiny)
    batch = proc.chat(text="hello")
    first = vlm.generate(model, batch, max_new_tokens=3)["tokens"][0]
    stopped = vlm.generate(model, batch, max_new_tokens=10, stop_ids=[first[0]])
    assert stopped["tokens"][0] == first[:1] and stopped["finished"] == [True]
    capped = vlm.generate(model, batch, max_new_tokens=3, stop_ids=[10**6])
    assert len(capped["tokens"][0]) == 3 and capped["finished"] == [False]


def test_generate_with_max_new_tokens_0_is_a_value_error(tiny):
    model, proc = vlm.load_model(tiny), vlm.Processor(tiny)
    with pytest.raises(ValueError, match="max_new_tokens is 0"):
        vlm.generate(model, proc.chat(text="hello"), max_new_tokens=0)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(vlm.sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert seen == {0, 1}
    seen = {int(vlm.sample_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("grid", [[[1, 6, 10]], [[1, 6, 10], [1, 4, 2], [1, 6, 10]]])
def test_gradients_match_transformers(tmp_path, grid):
    # training (the reward model's LoRA, the backbone pretraining) trusts our backward as much as our forward
    ref = make_reference(str(tmp_path), **CONFIGS["untied-gqa2-3ds"])
    ours = vlm.load_model(str(tmp_path))
    grid = torch.tensor(grid)
    rows = torch.randn(int(grid.prod(1).sum()), 384, generator=torch.Generator().manual_seed(2))
    ids = vision_seq(grid.tolist())
    weights = torch.randn(ids.shape[1], 300, generator=torch.Generator().manual_seed(5))
    (ref(input_ids=ids, mm_token_type_ids=(ids == IMG).int(), pixel_values=rows, image_grid_thw=grid).logits[0] * weights).sum().backward()
    (ours(ids, rows, grid, vlm.rope_positions(ids[0], grid, ours.cfg)[:, None])[0] * weights).sum().backward()
    theirs, params = dict(ref.named_parameters()), dict(ours.named_parameters())
    # each checkpoint tensor's gradient, fused q/k/v and gate/up split back into their rows
    grads = {n: params[key].grad if rows is None else params[key].grad[start:start + rows]
             for n, (key, start, rows) in vlm.hub_layout(ours).items()}
    assert len(grads) == len(theirs) - ("lm_head.weight" in theirs and ours.cfg.tie_word_embeddings), sorted(set(theirs) - set(grads))
    worst = max((((g - theirs[n].grad).abs().max() / theirs[n].grad.abs().max().clamp(min=1e-12)).item(), n)
                for n, g in grads.items())
    assert worst[0] <= 1e-4, f"relative gradient difference {worst[0]:.2e} at {worst[1]}"


def test_a_forward_and_backward_with_images_has_one_data_dependent_op_whatever_the_deepstack_levels():
    # on a GPU an op whose output size depends on values (nonzero, .item(), a boolean index) waits for
    # every kernel queued before it. The image tokens are found once; the vision tokens and every
    # DeepStack level then go in by index, and the vision tower sizes its patches from the pixel rows.
    from torch.utils._python_dispatch import TorchDispatchMode

    class DataDependent(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            bool_index = name.startswith(("aten::index", "aten::masked_select")) and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool
                for a in args[1:] for t in (a if isinstance(a, (list, tuple)) else [a]))
            unsized = name == "aten::repeat_interleave" and (kwargs or {}).get("output_size") is None
            if bool_index or unsized or name in ("aten::nonzero", "aten::_local_scalar_dense"):
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    special = {n: i for i, n in enumerate(vlm.QWEN_SPECIAL_TOKENS)}
    cfg = vlm.tiny_config(300, special, t_num_hidden_layers=3, v_depth=3, v_deepstack_visual_indexes=(0, 1, 2))
    torch.manual_seed(0)
    model = vlm.Qwen3VL(cfg)
    vlm.init_weights(model)
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])
    seq = [40, 41]
    for t, h, w in grid.tolist():
        seq += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id, 42]
    ids = torch.tensor([seq])
    rows = torch.randn(int(grid.prod(1).sum()), 384)
    pos = vlm.rope_positions(ids[0], grid, cfg)[:, None]
    with DataDependent() as seen:
        model(ids, rows, grid, pos, return_hidden=True).square().sum().backward()
    assert seen.ops == ["aten::nonzero"], seen.ops
    with DataDependent() as seen:  # as the reward model runs it: only the separators read (at=)
        model(ids, rows, grid, pos, return_hidden=True, at=(torch.tensor([0]), torch.tensor([[3, 13]]))).square().sum().backward()
    assert seen.ops == ["aten::nonzero"], seen.ops
    # pixel rows that do not match the grid are named as such, before any patch is sized from them
    with pytest.raises(ValueError, match=r"40 pixel rows but grid_thw=\[\[1, 4, 4\], \[1, 2, 4\]\] makes 24 patches"):
        model(ids, torch.randn(40, 384), grid, pos)


def test_a_frame_folder_is_read_in_natural_order(tmp_path):
    from PIL import Image
    for i in (1, 2, 10, 11):  # a plain sort would read frame_10 and frame_11 before frame_2
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(tmp_path / f"frame_{i}.png")
    frames, _ = vlm.load_video_frames(str(tmp_path))
    assert [f.getpixel((0, 0))[0] // 20 for f in frames] == [1, 2, 10, 11]


def test_a_chunk_after_a_filled_cache_equals_the_same_tokens_in_one_pass(tiny):
    # a multi-token chunk on top of the cache (chunked prefill) must continue at the cache's length
    model = vlm.load_model(tiny).eval()
    ids = torch.randint(20, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = vlm.KVCache(model.cfg.text, 1, 12, torch.float32, "cpu")
        model(ids[:, :5], cache=cache)
        rest = model(ids[:, 5:], cache=cache)
    assert torch.allclose(rest, full[:, 5:], atol=1e-5)


def test_masked_attention_in_two_query_halves_equals_causal_attention_with_and_without_a_cache(tiny):
    # on the CPU a masked pass of >= 128 queries runs its first half against the keys up to that half
    # only (masks are causal); a causal mask must then give what is_causal gives (no mask), and a long
    # chunk after a filled cache (its mask offset by the cache) what one pass over everything gives
    model = vlm.load_model(tiny).eval()
    ids = torch.randint(20, 200, (2, 170), generator=torch.Generator().manual_seed(1))
    index = torch.arange(170).expand(2, 170)
    with torch.no_grad():
        full = model(ids)
        masked = model(ids, mask=vlm.attention_mask(index, index))
        cache = vlm.KVCache(model.cfg.text, 2, 170, torch.float32, "cpu")
        model(ids[:, :37], cache=cache)
        rest = model(ids[:, 37:], cache=cache)  # 133 queries after 37 cached keys
    assert torch.allclose(masked, full, atol=1e-5), (masked - full).abs().max()
    assert torch.allclose(rest, full[:, 37:], atol=1e-5), (rest - full[:, 37:]).abs().max()


def test_attention_mask_equals_its_definition_entry_by_entry():
    # the docstring's rule, one (query, key) at a time: causal, not a padding key, prompt or own
    # response in independent mode, and always itself
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, T = 2, 9
        k_index = torch.arange(T).expand(B, T)
        q_index = k_index[:, -5:]  # the last 5 as queries, as cached decoding has them
        k_valid = torch.rand(B, T, generator=g) < 0.8
        k_segment = torch.randint(0, 3, (B, T), generator=g)
        q_segment = k_segment[:, -5:]
        for segments in ((None, None), (q_segment, k_segment)):
            got = vlm.attention_mask(q_index, k_index, k_valid, *segments)
            for b, i, j in itertools.product(range(B), range(5), range(T)):
                qi, kj = int(q_index[b, i]), int(k_index[b, j])
                want = kj <= qi and bool(k_valid[b, j])
                if segments[0] is not None:
                    want = want and int(k_segment[b, j]) in (0, int(q_segment[b, i]))
                assert bool(got[b, i, j]) == (want or kj == qi), (b, i, j, segments[0] is None)


@pytest.mark.parametrize("deepstack_levels,masked,reads", [(1, False, 3), (1, True, 3), (3, True, 3), (1, True, 130)])
def test_reading_some_positions_equals_reading_them_from_the_full_forward_values_and_gradients(deepstack_levels, masked, reads):
    # at=(rows, index) runs the last layer's queries and MLP at those positions only. Rows may repeat
    # (two packs in one row) and index may repeat (padding slots point at 0). With as many DeepStack levels
    # as layers the last layer is computed whole and the positions picked after it. Checked against picking
    # them from the full forward: values, and gradients of every weight (the last layer's k/v included).
    # 130 reads at random positions of 187-token rows: as many queries as the CPU's split-causal path
    # takes (T >= 128), which must not run on them (it assumes the queries are the last T positions).
    from torch.utils.flop_counter import FlopCounterMode
    special = {n: i for i, n in enumerate(vlm.QWEN_SPECIAL_TOKENS)}
    cfg = vlm.tiny_config(300, special, t_num_hidden_layers=3, v_depth=3,
                          v_deepstack_visual_indexes=tuple(range(deepstack_levels)))
    torch.manual_seed(0)
    model = vlm.Qwen3VL(cfg)
    vlm.init_weights(model, std=0.1)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    gen = torch.Generator().manual_seed(3)
    seqs = [[40] + [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
            + torch.randint(20, 200, (30 if reads == 3 else 180,), generator=gen).tolist() for _ in range(2)]
    ids = torch.tensor(seqs)
    rows_px = torch.randn(32, 384, generator=gen)
    pos = torch.stack([vlm.rope_positions(ids[b], grid[b:b + 1], cfg) for b in range(2)], 1)  # (3, B, T)
    T = ids.shape[1]
    index = torch.arange(T).expand(2, T)
    segment = (torch.arange(T) >= 20).long().expand(2, T) * (1 + (torch.arange(T) >= 28).long())
    mask = vlm.attention_mask(index, index, q_segment=segment, k_segment=segment) if masked else None
    rows, at = torch.tensor([0, 0, 1]), torch.tensor([[27, 36, 0], [19, 5, 5], [36, 30, 0]])
    if reads > 3:
        at = torch.stack([torch.randperm(T, generator=gen)[:reads] for _ in range(3)])  # (3, reads)
    w = torch.randn(3, reads, cfg.text.hidden_size, generator=gen)

    def run(read):
        with FlopCounterMode(display=False) as fc:
            h = model(ids, rows_px, grid, pos, mask, return_hidden=True, at=(rows, at) if read else None)
            h = h if read else h[rows[:, None], at]
            (h * w).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return h.detach(), grads, fc.get_total_flops()
    want, want_grads, full_flops = run(False)
    got, got_grads, read_flops = run(True)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    worst = max(((got_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in want_grads.items())
    assert worst < 1e-4, worst
    if deepstack_levels == cfg.text.num_hidden_layers:
        assert read_flops == full_flops
    elif reads == 3:  # the last layer's queries and MLP ran for 9 of 2 x 38 rows (390 of 2 x 187 save nothing)
        assert read_flops < 0.9 * full_flops, (read_flops, full_flops)
