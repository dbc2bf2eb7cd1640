"""`mrrm.py bench`: analytic FLOPs against torch's FLOP counter, and smoke runs of the forward table,
the LoRA training step and decoding on a tiny random checkpoint (CPU, a few seconds each)."""

import argparse
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mrrm
import vlm
from mrrm import add_bench_args, attention_pairs, bench_model, forward_flops, separator_pairs, synthetic_prompt
from mrrm import collate, pack

SIZES = ["--image-tokens", "16", "--prompt-len", "12", "--n", "3", "--resp-len", "9", "--threads", "1",
         "--warmup", "1", "--repeats", "2"]


def run_bench(argv):
    ap = argparse.ArgumentParser()
    add_bench_args(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["bench"] + argv)
    return args.func(args)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "m"
    vlm.write_tiny_checkpoint(folder, seed=0)
    return str(folder)


@pytest.fixture(scope="module")
def forward_run(tiny, tmp_path_factory):
    """One forward-table run shared by the tests below: (returned figures, printed text, json)."""
    import contextlib
    import io
    path = tmp_path_factory.mktemp("json") / "bench.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        out = run_bench(["--model", tiny, "--flex", "--json", str(path)] + SIZES)
    return out, text.getvalue(), json.loads(path.read_text())


def tiny_model():
    args = argparse.Namespace(config="tiny", model="")
    return bench_model(args, torch.device("cpu"), torch.float32)


def test_forward_flops_equal_flop_counter_with_math_attention():
    # the math SDPA backend is plain matmuls, so FlopCounterMode sees every term, attention included;
    # math attention computes the full T x T square (the causal mask is applied after the matmul)
    model, _, _ = tiny_model()
    ids, pos, pixels, grid = synthetic_prompt(model.cfg, 16, 30, torch.Generator().manual_seed(0))
    T = len(ids)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(ids[None], pixels, grid, pos[:, None], return_hidden=True)
    expect = forward_flops(model.cfg, T, T * T, grid.tolist())["total"]
    got = fc.get_total_flops()
    assert abs(got - expect) / expect < 0.01, f"FlopCounterMode {got:,} vs analytic {expect:,}"


def test_forward_flops_of_a_read_at_the_separators_equal_flop_counter_with_math_attention():
    # with at= the last layer runs attention, o_proj and the MLP for the read positions only, against
    # every key of their row (an explicit mask, which the math backend computes whole)
    model, _, _ = tiny_model()
    ids, pos, pixels, grid = synthetic_prompt(model.cfg, 16, 30, torch.Generator().manual_seed(0))
    b = collate([pack(ids, pos, [[40] * 7, [41] * 12, [42] * 3], 2, "joint", pixel_values=pixels, grid_thw=grid)], "joint")
    T = b.input_ids.shape[1]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(b.input_ids, b.pixel_values, b.grid_thw, b.position_ids, return_hidden=True, at=(b.row, b.sep_index))
    expect = forward_flops(model.cfg, T, T * T, grid.tolist(), read=3, read_pairs=separator_pairs(b)[1])
    got = fc.get_total_flops()
    assert abs(got - expect["total"]) / expect["total"] < 0.01, f"FlopCounterMode {got:,} vs analytic {expect['total']:,}"
    assert expect["total"] < 0.9 * forward_flops(model.cfg, T, T * T, grid.tolist())["total"]  # 2 layers: one mostly skipped
    # term by term, exactly: the decoder's linears are the counter's aten.mm (the vision tower's are
    # addmm), and the last layer's attention (its bmm) is the 3 separators' queries against all T keys
    flops = fc.get_flop_counts()
    t = model.cfg.text
    layers = [flops[f"Qwen3VL.model.language_model.layers.{i}"] for i in range(t.num_hidden_layers)]
    last = layers[-1]
    assert flops["Global"][torch.ops.aten.mm] == expect["text_linear"]
    assert sum(layer[torch.ops.aten.bmm] for layer in layers) == expect["text_attention"]
    assert separator_pairs(b)[1] == 3 * T
    assert last[torch.ops.aten.bmm] == 4 * t.num_attention_heads * t.head_dim * 3 * T
    # useful pairs: each separator sees the keys up to itself (joint mode is causal)
    assert separator_pairs(b)[0] == int((b.sep_index + 1).sum())


def test_forward_flops_linear_terms_equal_flop_counter_with_default_sdpa():
    # the CPU's fused SDPA kernel has no FLOP formula registered, so the counter sees only the linear layers
    model, _, _ = tiny_model()
    ids, pos, pixels, grid = synthetic_prompt(model.cfg, 16, 30, torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids[None], pixels, grid, pos[:, None], return_hidden=True)
    f = forward_flops(model.cfg, len(ids), 0, grid.tolist(), vision_pairs=0)
    got, expect = fc.get_total_flops(), f["vision"] + f["text_linear"]
    assert abs(got - expect) / expect < 0.01, f"FlopCounterMode {got:,} vs analytic linear {expect:,}"


def test_independent_useful_attention_is_prompt_once_plus_each_response_on_it():
    P, lens = 20, [5, 9, 3]
    ids = torch.arange(P) + 20
    p = pack(ids, torch.arange(P).expand(3, P), [[30] * n for n in lens], 2, "independent")
    b = collate([p], "independent")
    useful, kernel = attention_pairs(b.mask, [len(p.input_ids)], "sdpa")
    tri = lambda n: n * (n + 1) // 2
    expect = tri(P) + sum(P * (n + 1) + tri(n + 1) for n in lens)  # each response + its separator
    assert useful == expect, f"useful pairs {useful} vs {expect}"
    assert kernel == len(p.input_ids) ** 2, f"SDPA with a mask computes every pair, got {kernel}"


def test_flex_kernel_pairs_count_only_blocks_the_mask_touches():
    T = 384  # 3 x 3 blocks of 128; causal touches the 6 on and below the diagonal
    idx = torch.arange(T)[None]
    mask = vlm.attention_mask(idx, idx)
    useful, kernel = attention_pairs(mask, [T], "flex")
    assert useful == T * (T + 1) // 2 and kernel == 6 * 128 * 128, f"useful {useful}, kernel {kernel}"


def test_flex_attention_path_equals_sdpa_on_an_independent_pack(tiny):
    model = vlm.load_model(tiny)
    ids, pos, pixels, grid = synthetic_prompt(model.cfg, 16, 12, torch.Generator().manual_seed(0))
    b = collate([pack(ids, pos, [[40] * 7, [41] * 150, [42] * 3], 2, "independent", pixel_values=pixels,
                      grid_thw=grid)], "independent")
    with torch.no_grad():
        ref = model(b.input_ids, b.pixel_values, b.grid_thw, b.position_ids, b.mask, return_hidden=True)
        model.attn_impl = "flex"
        got = model(b.input_ids, b.pixel_values, b.grid_thw, b.position_ids, b.mask, return_hidden=True)
    diff = (got - ref).abs().max().item()
    assert diff < 1e-5, f"flex vs SDPA hidden states max-abs-diff {diff:.2e}"


def test_bench_prints_one_row_per_way_with_finite_positive_figures(forward_run):
    out, text, _ = forward_run
    for name in ("sequential", "batched", "joint", "independent", "independent flex"):
        assert any(line.startswith(name + " ") for line in text.splitlines()), f"no row {name!r} in:\n{text}"
    for r in out["forward"]:
        assert "error" not in r, f"row {r['row']} failed: {r.get('error')}"
        for key in ("tokens", "ms", "tok/s", "TFLOP", "kernel TFLOP", "TFLOP/s", "speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, f"row {r['row']}: {key} = {r[key]}"


def test_bench_independent_scores_equal_sequential_scores(forward_run):
    rows = {r["row"]: r for r in forward_run[0]["forward"]}
    for name in ("batched", "independent", "independent flex"):
        assert rows[name]["max_diff"] < 1e-4, f"{name}: scores differ from sequential by {rows[name]['max_diff']:.2e}"


def test_bench_packed_rows_process_fewer_tokens_and_flops_than_sequential(forward_run):
    rows = {r["row"]: r for r in forward_run[0]["forward"]}
    P, N, R = 16 + 12, 3, 9 + 1
    assert rows["sequential"]["tokens"] == N * (P + R) and rows["joint"]["tokens"] == P + N * R, rows
    assert rows["independent"]["TFLOP"] < rows["joint"]["TFLOP"] < rows["sequential"]["TFLOP"], rows


def test_bench_has_transformers_rows_with_equal_scores(forward_run):
    pytest.importorskip("transformers")
    rows = {r["row"]: r for r in forward_run[0]["forward"]}
    for name in ("transformers joint", "transformers independent"):
        assert name in rows and "error" not in rows[name], f"{name}: {rows.get(name)}"
        assert rows[name]["max_diff"] < 1e-4, f"{name}: scores differ by {rows[name]['max_diff']:.2e}"


def test_bench_json_holds_the_printed_rows(forward_run):
    out, _, saved = forward_run
    assert [r["row"] for r in saved["forward"]] == [r["row"] for r in out["forward"]]
    assert saved["peak_tflops"] > 0 and saved["settings"]["n"] == 3


def test_bench_train_step_reports_throughput_and_trainable_parameters(tiny, capsys):
    out = run_bench(["--model", tiny, "--train", "--lora-r", "4", "--mode", "independent"] + SIZES)
    row = out["train"][0]
    assert "error" not in row, row.get("error")
    assert row["tok/s"] > 0 and row["TFLOP"] > 0 and 0 < row["trainable M"] < 1, row
    assert "train r=4 independent ckpt" in capsys.readouterr().out


def test_the_thin_config_has_the_4b_depths_and_runs_a_train_step():
    # 4b-thin stands for the 4B's host work per step: its layers, blocks and DeepStack levels, toy widths
    text, vision, _ = mrrm.BENCH_SIZES["4b"]
    text, vision = vlm.TextConfig(**text), vlm.VisionConfig(**vision)
    model, _, _ = bench_model(argparse.Namespace(config="4b-thin", model=""), torch.device("cpu"), torch.float32)
    thin = model.cfg
    assert (thin.text.num_hidden_layers, thin.vision.depth, thin.vision.deepstack_visual_indexes) == \
        (text.num_hidden_layers, vision.depth, vision.deepstack_visual_indexes)
    assert thin.text.hidden_size * 64 <= text.hidden_size
    out = run_bench(["--config", "4b-thin", "--train", "--lora-r", "4", "--no-transformers", "--image-tokens", "4",
                     "--prompt-len", "8", "--n", "2", "--resp-len", "4", "--threads", "1", "--warmup", "0", "--repeats", "1"])
    assert "error" not in out["train"][0], out["train"][0].get("error")


def test_bench_profile_prints_the_operators_of_each_timed_row(tiny, capsys):
    run_bench(["--model", tiny, "--train", "--lora-r", "4", "--no-transformers", "--profile", "3"] + SIZES)
    text = capsys.readouterr().out
    head = "--- profile: train r=4 joint ckpt, one call, top 3 operators by self cpu time"
    assert head in text, text[:2000]
    table = text.split(head)[1]
    # the step's matmuls (forward and the backward's input gradients) are among the costliest operators
    assert "aten::" in table and "Self CPU" in table, table[:1500]


def test_bench_train_reference_is_transformers_plus_peft_on_the_same_modules(tiny):
    pytest.importorskip("peft")
    out = run_bench(["--model", tiny, "--train", "--lora-r", "4", "--transformers"] + SIZES)
    ours, ref = out["train"]
    assert ref["row"].startswith("transformers+peft") and "error" not in ref, ref
    # the same target modules and rank, so the same number of trainable parameters (LoRA + value head)
    assert ref["trainable M"] == ours["trainable M"] and ref["tokens"] == ours["tokens"], (ours, ref)
    assert ours["speedup"] == pytest.approx(ours["tok/s"] / ref["tok/s"]) and ref["speedup"] == 1.0


def test_bench_generate_times_cached_decoding_against_the_no_cache_baseline(tiny):
    out = run_bench(["--model", tiny, "--generate", "--samples", "3", "--new-tokens", "4", "--nocache-steps", "2"] + SIZES)
    cached, baseline = out["generate"]
    assert "error" not in cached and "error" not in baseline, (cached, baseline)
    assert cached["tokens"] == 3 * 4 and baseline["tokens"] == 3 * 2, (cached, baseline)
    assert cached["tok/s"] > 0 and baseline["speedup"] == 1.0 and cached["speedup"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernel needs CUDA")
def test_flex_attention_on_cuda_equals_sdpa(tiny):
    model = vlm.load_model(tiny, device="cuda")
    ids, pos, pixels, grid = synthetic_prompt(model.cfg, 16, 12, torch.Generator().manual_seed(0))
    b = collate([pack(ids, pos, [[40] * 7, [41] * 150], 2, "independent", pixel_values=pixels, grid_thw=grid)],
                "independent")
    args = [t.cuda() for t in (b.input_ids, b.pixel_values, b.grid_thw, b.position_ids, b.mask)]
    with torch.no_grad():
        ref = model(*args, return_hidden=True)
        model.attn_impl = "flex"
        got = model(*args, return_hidden=True)
    assert (got - ref).abs().max().item() < 1e-4


def test_a_bench_cut_short_keeps_the_rows_it_finished_in_its_json(tiny, tmp_path, monkeypatch):
    # a GPU session's time limit kills a run mid-way: what it measured must already be on disk
    real, calls = mrrm.timed, []

    def killed_on_the_third_row(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # the first call measures the matmul peak
            raise KeyboardInterrupt("time limit")
        return real(*a, **k)
    monkeypatch.setattr(mrrm, "timed", killed_on_the_third_row)
    path = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        run_bench(["--model", tiny, "--no-flex", "--no-transformers", "--json", str(path)] + SIZES)
    rows = json.loads(path.read_text())["forward"]
    assert [r["row"] for r in rows] == ["sequential", "batched"] and all(r["ms"] > 0 for r in rows), rows


def test_a_failing_profiler_costs_the_row_nothing(tiny, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("CUPTI unavailable")
    monkeypatch.setattr(torch.profiler, "profile", broken)
    out = run_bench(["--model", tiny, "--train", "--lora-r", "4", "--no-transformers", "--profile", "3"] + SIZES)
    assert "error" not in out["train"][0] and out["train"][0]["ms"] > 0, out["train"]
    assert "--- profile: train r=4 joint ckpt: failed (RuntimeError: CUPTI unavailable)" in capsys.readouterr().out


def test_profile_gpu_ms_sums_kernel_events_once(monkeypatch, capsys):
    # the "GPU ms" column: the kernels' own events; an operator's CPU event carries the same kernel time
    # (counting it too would double the figure) and a user annotation on the GPU timeline spans others
    from types import SimpleNamespace as E
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [E(key="aten::mm", device_type=cpu, self_device_time_total=900.0, is_user_annotation=False, count=7),
              E(key="ampere_sgemm", device_type=cuda, self_device_time_total=400.0, is_user_annotation=False, count=7),
              E(key="aten::linear", device_type=cpu, self_device_time_total=0.0, is_user_annotation=False, count=7),
              E(key="vectorized_kernel", device_type=cuda, self_device_time_total=250.0, is_user_annotation=False, count=2),
              E(key="## step ##", device_type=cuda, self_device_time_total=1000.0, is_user_annotation=True, count=1)]

    class Events(list):
        def table(self, **kw):
            return "(table)"

    class Profile:
        def __init__(self, **kw):
            pass
        __enter__ = lambda self: self
        __exit__ = lambda self, *a: None
        key_averages = lambda self: Events(events)
    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(mrrm, "sync", lambda device: None)
    rows = {kind: {} for kind in ("cuda", "cpu", "not profiled")}
    mrrm.profile_once(lambda: None, torch.device("cuda"), "row", 3, rows["cuda"])
    mrrm.profile_once(lambda: None, torch.device("cpu"), "row", 3, rows["cpu"])
    mrrm.profile_once(lambda: None, torch.device("cuda"), "row", 0, rows["not profiled"])
    # aten::linear is not counted as a matmul: it calls aten::mm (counted), so it would count twice
    assert rows == {"cuda": {"GPU ms": pytest.approx(0.65), "kernels": 9, "matmuls": 7}, "cpu": {"matmuls": 7},
                    "not profiled": {}}  # CPU: no GPU columns
    assert "(table)" in capsys.readouterr().out


def test_print_table_of_no_rows_says_so(capsys):
    mrrm.print_table("all runs", [])
    assert capsys.readouterr().out == "all runs\n(no rows)\n"


def test_train_rows_run_under_the_autocast_train_uses(tiny, monkeypatch):
    # on CUDA `train` runs bf16 autocast, and LoRA takes its bf16 path there: the timed step must too
    cpu_bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    monkeypatch.setattr(mrrm, "precision", lambda device: (torch.float32, cpu_bf16))
    seen, real = [], mrrm.score_fn

    def recording(*a, **k):
        fn = real(*a, **k)
        return lambda: seen.append(torch.is_autocast_enabled("cpu")) or fn()
    monkeypatch.setattr(mrrm, "score_fn", recording)
    out = run_bench(["--model", tiny, "--train", "--lora-r", "4", "--no-transformers"] + SIZES)
    assert "error" not in out["train"][0] and seen and all(seen), (out["train"], seen)


@pytest.mark.parametrize("flags, said", [(["--n", "0"], "--n: expected an integer of at least 1"),
                                         (["--resp-len", "-1"], "--resp-len: expected an integer of at least 0"),
                                         (["--repeats", "0"], "--repeats: expected an integer of at least 1"),
                                         (["--compile", "--warmup", "0"], "--compile needs --warmup 1 or more"),
                                         (["--prompt-len", "1"], "--prompt-len 1: with an image it counts")])
def test_bench_settings_that_would_fail_or_mislead_are_one_line(flags, said, capsys):
    with pytest.raises(SystemExit):
        mrrm.main(["bench", "--config", "tiny", *flags])
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_a_compile_mode_reaches_every_compiled_piece_and_names_the_train_row(tiny, monkeypatch):
    # --compile reduce-overhead (CUDA graphs) is torch.compile's mode for each decoder layer (forward and
    # checkpointed) and each vision half; aot_eager here, which takes no mode (CUDA graphs need CUDA)
    # (each timed call then begins a new CUDA-graph step: 1 warm-up + 2 repeats in SIZES)
    compile, modes, steps = torch.compile, [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or compile(fn, backend="aot_eager"))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    out = run_bench(["--model", tiny, "--train", "--lora-r", "4", "--no-transformers", "--compile", "reduce-overhead"]
                    + SIZES)
    assert "error" not in out["train"][0] and out["train"][0]["row"].endswith(" compile reduce-overhead"), out["train"]
    cfg = vlm.Config.from_folder(tiny)
    assert modes == ["reduce-overhead"] * (2 * cfg.text.num_hidden_layers + 2 * cfg.vision.depth), modes
    assert len(steps) == 3, steps


def test_the_reference_train_row_runs_after_our_model_and_compiled_state_are_freed(tiny, monkeypatch):
    # peak memory is compared between the two train rows, so ours must be gone when the reference is
    # built, compiled too (under CUDA graphs torch.compile's memory pools hold what its replays wrote)
    import gc
    import weakref
    compile, ours, alive, resets = torch.compile, [], [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend="aot_eager"))
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(ours[0]() is not None))
    build = mrrm.bench_model
    monkeypatch.setattr(mrrm, "bench_model", lambda *a: (lambda r: ours.append(weakref.ref(r[0])) or r)(build(*a)))
    monkeypatch.setattr(mrrm, "bench_train_reference", lambda *a: alive.append(ours[0]() is not None) or [])
    gc.disable()  # no collection by chance in between: the bench must free the model itself
    try:
        out = run_bench(["--model", tiny, "--train", "--lora-r", "4", "--transformers", "--compile"] + SIZES)
    finally:
        gc.enable()
    assert "error" not in out["train"][0] and alive == [False] and resets == [False], (out["train"], alive, resets)


def test_measure_counts_real_separators_as_useful_and_the_skipped_last_layer_as_kernel_work():
    # two packs, 3 and 2 responses: the batch has 2 x 3 separator slots, one of them padding
    cfg = tiny_model()[0].cfg
    P = 10
    packs = [pack(torch.arange(P) + 20, torch.arange(P).expand(3, P), r, 2, "joint")
             for r in ([[30] * 4, [31] * 6, [32] * 2], [[33] * 5, [34] * 3])]
    b = collate(packs, "joint")
    tokens = sum(len(p.input_ids) for p in packs)
    ours = mrrm.measure(cfg, [b], False, 1, "sdpa", [], 1.0, 0.0, 1.0)
    theirs = mrrm.measure(cfg, [b], False, 1, "sdpa", [], 1.0, 0.0, 1.0, reads_all=True)
    pairs = sum(n * (n + 1) // 2 for n in (len(p.input_ids) for p in packs))
    seen = sum(int(s) + 1 for p in packs for s in p.sep_index)  # causal: a separator sees up to itself
    useful = forward_flops(cfg, tokens, pairs, scored=5, read=5, read_pairs=seen)["total"]
    assert ours["TFLOP"] == theirs["TFLOP"] == pytest.approx(useful / 1e12, rel=1e-12)
    T = b.input_ids.shape[1]
    kernel = forward_flops(cfg, tokens, pairs, scored=6, read=6, read_pairs=6 * T)["total"]
    assert ours["kernel TFLOP"] == pytest.approx(kernel / 1e12, rel=1e-12)
    # transformers runs the last layer at every token: more kernel work than ours, by what at= skips
    full = forward_flops(cfg, tokens, pairs, scored=6)["total"]
    assert theirs["kernel TFLOP"] == pytest.approx(full / 1e12, rel=1e-12) and full > kernel
