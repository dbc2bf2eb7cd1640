"""`mrrm.py train | eval | score` on a tiny random checkpoint and a few shape-world samples:
data validation, exact resume, atomic checkpoints, exports, metrics, and the CLI end to end."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch

import lora
import mrrm
import vlm
from data import shapeworld


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    vlm.write_tiny_checkpoint(str(root / "m"), seed=0, min_pixels=64 * 64, max_pixels=64 * 64)
    shapeworld.main(["--out", str(root / "d"), "--train", "24", "--heldout", "8", "--seed", "3"])
    return root


def args_for(world, out, *extra):
    return ["train", "--model", str(world / "m"), "--train", str(world / "d" / "train.jsonl"),
            "--heldout", str(world / "d" / "heldout.jsonl"), "--out", str(out), "--head-hidden", "32",
            "--lora-r", "4", "--batch-size", "4", "--micro-batch", "2", "--log-every", "1", *extra]


# --- data validation ---------------------------------------------------------


def write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(path)


def test_every_bad_line_is_reported_with_file_line_and_field(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    good = {"prompt": "q", "responses": ["a", "b"], "rankings": [1, 2], "image": "ok.png"}
    path = write_jsonl(tmp_path / "d.jsonl", [
        good,
        '{"prompt": "q", "responses": ["a", "b"]',  # 2: malformed JSON
        {**good, "rankings": [2, 3]},  # 3: no rank 1
        {**good, "image": "missing.png"},  # 4: media not found
        {**good, "responses": ["a"] * 5, "rankings": [1, 2, 3, 4, 5]},  # 5: too many
        {**good, "prompt": 7},  # 6: wrong type
    ])
    with pytest.raises(ValueError) as e:
        mrrm.load_samples(path, max_responses=4)
    msg = str(e.value)
    assert "5 bad record(s)" in msg and "--skip-bad" in msg
    for where in (":2: malformed JSON", ":3: rankings", ":4: image:", "missing.png", ":5: responses: 5 responses",
                  ":6: prompt"):
        assert where in msg, where
    kept = mrrm.load_samples(path, max_responses=4, skip_bad=True)
    assert [s.where for s in kept] == [f"{path}:1"]
    assert kept[0].images == [str(tmp_path / "ok.png")]  # relative to the JSONL's folder


def test_image_root_and_absolute_paths(tmp_path):
    from PIL import Image
    (tmp_path / "media").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "media" / "x.png")
    rec = {"prompt": "q", "responses": ["a", "b"], "rankings": [1, 1]}
    path = write_jsonl(tmp_path / "d.jsonl", [{**rec, "image": "x.png"}, {**rec, "image": str(tmp_path / "media" / "x.png")}])
    s = mrrm.load_samples(path, image_root=str(tmp_path / "media"))
    assert [x.images for x in s] == [[str(tmp_path / "media" / "x.png")]] * 2


def test_frame_folders_take_their_rate_from_fps_or_sampling_interval(world, tmp_path):
    from PIL import Image
    (tmp_path / "clip").mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(tmp_path / "clip" / f"{i:03d}.png")
    rec = {"prompt": "q", "responses": ["a", "b"], "rankings": [1, 2], "video": "clip"}
    path = write_jsonl(tmp_path / "d.jsonl", [{**rec, "sampling_interval": 4}, {**rec, "fps": 1}, rec,
                                              {**rec, "fps": 0}, {**rec, "sampling_interval": "4s"}])
    with pytest.raises(ValueError) as e:
        mrrm.load_samples(path)
    assert ":4: fps: expected a positive number" in str(e.value) and ":5: sampling_interval:" in str(e.value)
    samples = mrrm.load_samples(path, skip_bad=True)
    assert [s.video_fps for s in samples] == [0.25, 1.0, None]
    rm = mrrm.RewardModel.load(str(world / "m"))
    tok = rm.processor.tokenizer
    # frame pairs (0, 1) and (2, 3) are stamped with their mean time: 4 s apart gives 2 s and 10 s
    stamps = [tok.decode(mrrm.PromptCache(rm, 0)(s)[0][0].tolist()) for s in samples]
    assert "<2.0 seconds>" in stamps[0] and "<10.0 seconds>" in stamps[0]
    assert "<0.5 seconds>" in stamps[1] and "<2.5 seconds>" in stamps[1]
    assert "<0.2 seconds>" in stamps[2] and "<1.2 seconds>" in stamps[2]  # the processor's 2 fps


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        mrrm.load_samples(str(tmp_path / "nope.jsonl"))


def test_bad_data_stops_the_cli_before_training(world, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": 1}'])
    with pytest.raises(SystemExit):
        mrrm.main(args_for(world, tmp_path / "out", "--steps", "1") + ["--train", bad])
    assert f"{bad}:1:" in capsys.readouterr().err
    assert not (tmp_path / "out" / "latest.json").exists()


# --- metrics ------------------------------------------------------------------


def kendall_tau_b(x, y):
    """Textbook tau-b, written independently of mrrm.sample_metrics."""
    n = len(x)
    pairs = [(np.sign(x[i] - x[j]), np.sign(y[i] - y[j])) for i in range(n) for j in range(i + 1, n)]
    c = sum(a * b > 0 for a, b in pairs)
    d = sum(a * b < 0 for a, b in pairs)
    n0 = len(pairs)
    return (c - d) / math.sqrt((n0 - sum(a == 0 for a, _ in pairs)) * (n0 - sum(b == 0 for _, b in pairs)))


def test_sample_metrics_match_hand_counts_and_tau_b():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 7))
        ranks = [int(r) for r in rng.integers(1, n + 1, n)]
        ranks = [r - min(ranks) + 1 for r in ranks]
        scores = [float(s) for s in rng.integers(0, 4, n)]  # many score ties
        m = mrrm.sample_metrics(scores, ranks)
        pairs = [(i, j) for i in range(n) for j in range(n) if ranks[i] < ranks[j]]
        assert m["pairs"] == len(pairs) and m["pairs_right"] == sum(scores[i] > scores[j] for i, j in pairs)
        top = [i for i in range(n) if scores[i] == max(scores)]
        assert m["best"] == float(all(ranks[i] == 1 for i in top))
        if len(set(ranks)) > 1 and len(set(scores)) > 1:
            assert m["tau"] == pytest.approx(kendall_tau_b(scores, [-r for r in ranks]))


def test_ties_for_best_are_correct_and_equal_scores_are_not():
    assert mrrm.sample_metrics([0.5, 0.9, 0.1], [1, 1, 2])["best"] == 1.0
    assert mrrm.sample_metrics([0.9, 0.9, 0.1], [1, 2, 3])["best"] == 0.0
    assert mrrm.sample_metrics([0.3, 0.3], [1, 2])["pairs_right"] == 0


def test_protocols_follow_each_benchmarks_rule():
    rows = [{"best": b, "category": c, "id": i} for b, c, i in
            [(1.0, "a", "x"), (0.0, "a", "x"), (1.0, "b", "y"), (1.0, "b", "z")]]
    mb = mrrm.protocol_report("mmrewardbench", rows)
    assert mb["overall_accuracy"] == 0.75 and mb["per_category"] == {"a": 0.5, "b": 1.0}
    mm = mrrm.protocol_report("mmrlhf", rows)
    assert mm["accuracy"] == 0.75 and mm["acc_plus"] == pytest.approx(2 / 3)  # id x has a wrong pair
    # MM-RLHF's script reports accuracy and ACC+ per category (mcq, long, short, safety, video) too
    assert mm["per_category"] == {"a": {"accuracy": 0.5, "acc_plus": 0.0}, "b": {"accuracy": 1.0, "acc_plus": 1.0}}
    # a sample without a category is grouped, not a crash when names are sorted
    none = mrrm.protocol_report("mmrewardbench", rows + [{"best": 1.0, "category": None, "id": "w"}])
    assert none["per_category"] == {"-": 1.0, "a": 0.5, "b": 1.0}


def test_samples_with_different_numbers_of_responses_are_also_reported_apart():
    # the authors' file holds N-way rankings and pairs: one pooled best-of-N mixes chance 1/4 and 1/2
    rows = [dict(mrrm.sample_metrics(sc, rk), category="", id=str(i)) for i, (sc, rk) in enumerate(
        [([0.9, 0.1], [1, 2]), ([0.1, 0.9], [1, 2]), ([0.9, 0.5, 0.2, 0.1], [1, 2, 3, 4])])]
    report = mrrm.protocol_report("mr2bench", rows)
    assert report["best_of_n"] == pytest.approx(2 / 3)
    assert {k: v["best_of_n"] for k, v in report["per_n"].items()} == {"N=2": 0.5, "N=4": 1.0}, report
    assert "per_n" not in mrrm.summarize(rows[:2])  # one size: nothing to split


def test_tau_counts_a_sample_scored_all_equal_as_zero_not_left_out():
    # one sample ranked perfectly, one where the model gave every response the same score
    rows = [mrrm.sample_metrics([3.0, 2.0, 1.0], [1, 2, 3]), mrrm.sample_metrics([0.5, 0.5, 0.5], [1, 2, 3])]
    assert [r["tau"] for r in rows] == [1.0, 0.0]
    assert mrrm.summarize([dict(r, category="c") for r in rows])["kendall_tau"] == 0.5
    assert math.isnan(mrrm.sample_metrics([0.1, 0.2], [1, 1])["tau"])  # nothing to order: left out


def test_vlrewardbench_macro_average_is_over_its_three_domains_not_its_sources():
    # ids as the benchmark publishes them: the source is the prefix, and six sources make three domains
    ids = ["RLAIF-V-14", "RLHF-V-2", "hallucination_pair-3", "mathverse_4", "mmmu_pro_5", "wildvision-battle-6",
           "LRVInstruction-000000007746"]
    best = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    rows = [{"best": b, "category": "COCO", "id": i} for b, i in zip(best, ids)]
    vl = mrrm.protocol_report("vlrewardbench", rows)
    assert vl["per_domain"] == {"general": 0.5, "hallucination": 1.0, "reasoning": 0.0}, vl["per_domain"]
    assert vl["macro_average"] == pytest.approx(0.5), vl  # the mean over the 7 source groups would be 4 / 7
    # the datasets of its scoring script (its image folders), whatever the record's query_source says
    assert vl["per_dataset"] == {"povid": 1.0, "reasoning_tasks": 0.0, "rlaif-v": 1.0, "rlhf-v": 1.0,
                                 "vlfeedback": 0.0, "wildvision-battle": 1.0}, vl["per_dataset"]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [mrrm.lr_at(s, 100, 1.0, 10, "cosine", 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert mrrm.lr_at(55, 100, 1.0, 10, "linear") == pytest.approx(0.5)
    # warmup-stable-decay: flat from the warmup to the last quarter, then a straight line to the floor
    wsd = [mrrm.lr_at(s, 100, 1.0, 10, "wsd", 0.1, cooldown=0.25) for s in range(101)]
    assert wsd[9] == wsd[75] == 1.0 and wsd[76] < 1.0
    assert wsd[85] == pytest.approx(0.1 + 0.9 * 15 / 25) and wsd[100] == pytest.approx(0.1)


def test_every_use_of_a_sample_gets_its_own_response_order():
    orders = {tuple(torch.randperm(4, generator=mrrm.sample_order(3, u, 0)[1]).tolist()) for u in range(24)}
    assert len(orders) > 8
    epoch = sorted(mrrm.sample_order(5, u, 0)[0] for u in range(5, 10))
    assert epoch == [0, 1, 2, 3, 4]  # each epoch is a permutation


@pytest.mark.parametrize("targets", ["lm", "lm+vision"])
def test_a_cached_sample_scores_as_the_uncached_one_in_every_order(world, targets):
    # PromptCache keeps the prompt, each response's token ids and, when LoRA leaves the vision tower
    # frozen ("lm"), the tower's outputs in place of the pixel rows. A reshuffled use must pack the
    # tokens that encoding its text afresh packs, and score what the pixel path scores (the tower run
    # over other samples beside it: the same up to rounding), short packs sharing rows included; so
    # must the outputs a cache with no room holds for one batch.
    samples = mrrm.load_samples(str(world / "d" / "train.jsonl"))[:5]
    rm = mrrm.RewardModel.load(str(world / "m"))
    lora.inject_lora(rm.backbone, r=4, targets=mrrm._targets(targets))
    cached, tight = mrrm.PromptCache(rm, 2**24), mrrm.PromptCache(rm, 1)  # tight: keeps nothing, holds a batch
    orders = ([0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0])
    cached.fill(samples[:3])  # the tower once for three samples; the other two one at a time, below
    tight.fill(samples)
    assert len(cached.store) == 3 and not tight.store and len(tight.recent) == 5
    for order in orders:
        got, want, held = [], [], []
        for s in samples:
            held.append(mrrm.encode_sample(rm, s, order, "independent", tight)[0])
            assert (held[-1].vision is not None) == (targets == "lm"), targets
            cached(s)  # from the second use on, the stored encoding
            g, ranks = mrrm.encode_sample(rm, s, order, "independent", cached)
            w = rm.encode(s.prompt, [s.responses[i] for i in order], mrrm.open_images(s), mode="independent")
            assert torch.equal(ranks, torch.tensor([s.rankings[i] for i in order]))
            for field in ("input_ids", "position_ids", "segment", "sep_index", "grid_thw"):
                assert torch.equal(getattr(g, field), getattr(w, field)), (s.where, order, field)
            assert (g.vision is not None, g.pixel_values is None) == ((targets == "lm",) * 2), targets
            got.append(g), want.append(w)
        with torch.no_grad():
            a, b, h = (rm(mrrm.collate(p, "independent", row_tokens=256)) for p in (got, want, held))
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        assert torch.allclose(h, b, atol=1e-5), (h - b).abs().max()
    assert len(cached.store) == 5
    tight.fill([])
    assert not tight.recent  # a fill lets the last batch's go
    if targets == "lm":
        with pytest.raises(ValueError, match="mixes packs with pixel rows and packs with precomputed vision"):
            mrrm.collate([got[0], want[1]], "joint")


def test_kept_and_held_vision_outputs_of_mixed_media_score_as_pixel_rows(world, tmp_path):
    # several media per prompt, of different sizes, a video, and a text-only prompt: the tower's outputs
    # are split per sample by merged-token count and joined back in order of appearance, kept (host
    # memory) and held (over the budget) ones in one batch, short packs sharing a row
    from PIL import Image
    (tmp_path / "clip").mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 20, 0)).save(tmp_path / "clip" / f"{i:03d}.png")
    Image.new("RGB", (96, 48), (0, 200, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (40, 80), (0, 0, 200)).save(tmp_path / "tall.png")
    rec = {"prompt": "which?", "responses": ["a red one", "b", "the green c"], "rankings": [2, 1, 3]}
    path = write_jsonl(tmp_path / "d.jsonl", [{**rec, "image": ["wide.png", "tall.png"]},
                                              {**rec, "image": "tall.png", "video": "clip", "fps": 2},
                                              {**rec, "video": "clip", "fps": 2}, rec, {**rec, "image": "wide.png"}])
    samples = mrrm.load_samples(path)
    rm = mrrm.RewardModel.load(str(world / "m"))
    lora.inject_lora(rm.backbone, r=4)
    sizing = mrrm.PromptCache(rm, 2**24)
    sizing.fill(samples[:2])
    cache = mrrm.PromptCache(rm, sizing.used)  # room for the first two: the other three are held
    cache.fill(samples)
    assert list(cache.store) == [s.where for s in samples[:2]] and len(cache.recent) == 3
    for mode in ("joint", "independent"):
        got = [mrrm.encode_sample(rm, s, [2, 0, 1], mode, cache)[0] for s in samples]
        want = [rm.encode(s.prompt, [s.responses[i] for i in (2, 0, 1)], mrrm.open_images(s), s.videos, mode)
                for s in samples]
        assert [g.vision is None for g in got] == [False, False, False, True, False]  # text-only: no media
        with torch.no_grad():
            a = rm(mrrm.collate(got, mode, row_tokens=512))
            b = rm(mrrm.collate(want, mode, row_tokens=512))
        assert torch.allclose(a, b, atol=1e-5), (mode, (a - b).abs().max())


# --- training, resume, checkpoints --------------------------------------------


def trainable(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(mrrm.latest_checkpoint(str(out)), "trainable.safetensors"))


def test_resume_equals_an_uninterrupted_run(world, tmp_path):
    # dropout > 0 so resume must also restore the RNG stream, not only parameters and optimizer
    common = ["--steps", "6", "--lora-dropout", "0.1", "--heldout", "", "--export", "off"]
    mrrm.main(args_for(world, tmp_path / "full", *common))
    mrrm.main(args_for(world, tmp_path / "split", *common, "--stop-at", "3"))
    assert json.loads((tmp_path / "split" / "latest.json").read_text())["step"] == 3
    mrrm.main(args_for(world, tmp_path / "split", *common, "--resume"))
    a, b = trainable(tmp_path / "full"), trainable(tmp_path / "split")
    assert set(a) == set(b) and any("lora_B" in k for k in a) and any("head." in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("targets", ["lm", "lm+vision"])  # lm+vision: gradients through the compiled vision halves
def test_compiled_training_equals_eager(world, tmp_path, monkeypatch, targets):
    # aot_eager: dynamo's tracing and AOT autograd (with activation checkpointing) without inductor's C++
    # codegen, which a CI machine may lack a compiler for and which takes ~40 s here; the GPU bench
    # measures the real thing
    # (nn.Module.compile calls torch.compile too: this catches the decoder layers and the vision halves)
    compile, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or compile(fn, backend="aot_eager", **kw))
    common = ["--steps", "2", "--heldout", "", "--export", "off", "--grad-checkpointing", "on", "--lora-targets", targets]
    mrrm.main(args_for(world, tmp_path / "eager", *common))
    mrrm.main(args_for(world, tmp_path / "compiled", *common, "--compile"))
    cfg = vlm.load_model(str(world / "m")).cfg
    # each decoder layer twice (its forward, and checkpointed: the checkpoint inside), each vision block in two halves
    assert len(compiled) == 2 * cfg.text.num_hidden_layers + 2 * cfg.vision.depth
    a, b = trainable(tmp_path / "eager"), trainable(tmp_path / "compiled")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    assert any("lora_B" in k and a[k].abs().max() > 0 for k in a)  # B starts at 0: the runs did train
    assert any("visual" in k for k in a) == (targets == "lm+vision")


def test_resume_refuses_changed_settings(world, tmp_path, capsys):
    mrrm.main(args_for(world, tmp_path / "r", "--steps", "2", "--stop-at", "1", "--heldout", ""))
    with pytest.raises(SystemExit):
        mrrm.main(args_for(world, tmp_path / "r", "--steps", "2", "--heldout", "", "--lr", "1", "--resume"))
    assert "lr" in capsys.readouterr().err


def test_a_killed_save_leaves_the_previous_checkpoint_loadable(world, tmp_path, monkeypatch):
    import safetensors.torch
    real, calls = safetensors.torch.save_file, []

    def dying(tensors, path, *a, **k):
        calls.append(path)
        if "checkpoint-000002" in path and path.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt("killed mid-save")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        mrrm.main(args_for(world, tmp_path / "k", "--steps", "3", "--save-every", "1", "--heldout", ""))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert mrrm.latest_checkpoint(str(tmp_path / "k")).endswith("checkpoint-000001")
    assert not (tmp_path / "k" / "checkpoint-000002").exists()  # only the .tmp folder, never the final name
    mrrm.main(args_for(world, tmp_path / "k", "--steps", "3", "--save-every", "1", "--heldout", "", "--resume"))
    assert json.loads((tmp_path / "k" / "latest.json").read_text())["step"] == 3


def test_nan_loss_stops_with_step_and_sample_ids(world, tmp_path, monkeypatch, capsys):
    def nan_loss(scores, ranks, valid):
        loss = scores.sum() * float("nan")
        return loss, {"loss": float("nan"), "acc": 0.0}
    for name in list(mrrm.LOSSES):  # whichever the default is
        monkeypatch.setitem(mrrm.LOSSES, name, nan_loss)
    with pytest.raises(SystemExit):
        mrrm.main(args_for(world, tmp_path / "n", "--steps", "2", "--heldout", ""))
    err = capsys.readouterr().err
    assert re.search(r"error: step 1: loss is nan on samples \['sw-", err) and "Traceback" not in err, err


def test_train_eval_score_and_exports_agree(world, tmp_path, capsys):
    out = tmp_path / "rm"
    mrrm.main(args_for(world, out, "--steps", "4", "--lr", "1e-2"))
    log = capsys.readouterr().out
    assert "step 4/4 | loss" in log and "| tok/s" in log and "| ETA" in log and "held-out (8 samples)" in log
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4] and metrics[-1]["final"]
    heldout = str(world / "d" / "heldout.jsonl")
    pred = tmp_path / "pred.jsonl"
    report = mrrm.main(["eval", "--model", str(world / "m"), "--adapter", str(out), "--data", heldout,
                        "--predictions", str(pred)])
    assert report["best_of_n"] == pytest.approx(metrics[-1]["eval"]["best_of_n"])
    rows = [json.loads(l) for l in pred.read_text().splitlines()]
    assert len(rows) == 8 and all(sorted(r["predicted_rankings"]) == [1, 2, 3, 4] for r in rows)
    # the merged Hub-layout export scores like base + adapter
    merged = mrrm.main(["eval", "--model", str(out / "merged"), "--adapter", "", "--data", heldout, "--predictions", ""])
    assert merged["best_of_n"] == report["best_of_n"]
    sample = mrrm.load_samples(heldout)[0]
    args = ["score", "--image", *sample.images, "--prompt", sample.prompt, "--responses", *sample.responses]
    s_adapter = mrrm.main(args + ["--model", str(world / "m"), "--adapter", str(out)])
    s_merged = mrrm.main(args + ["--model", str(out / "merged"), "--adapter", ""])
    assert np.allclose(s_adapter, s_merged, atol=1e-5)
    assert np.allclose(s_adapter, rows[0]["scores"], atol=1e-5)
    printed = capsys.readouterr().out
    assert "rank     score  response" in printed and sample.responses[0] in printed


def test_eval_and_score_use_the_backbone_the_adapter_was_trained_on(world, tmp_path, capsys, monkeypatch):
    # world's backbone is not the default one: without --model, eval must find it in rm_config.json
    out = tmp_path / "rm"
    mrrm.main(args_for(world, out, "--steps", "3", "--lr", "1e-2", "--heldout", "", "--export", "0"))
    heldout = str(world / "d" / "heldout.jsonl")
    want = mrrm.main(["eval", "--model", str(world / "m"), "--adapter", str(out), "--data", heldout, "--predictions", ""])
    monkeypatch.chdir(tmp_path)
    got = mrrm.main(["eval", "--adapter", str(out), "--data", heldout])
    assert got == want
    # predictions go next to the adapter evaluated, not into the default run's folder
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8
    assert not (tmp_path / mrrm.DEFAULT_OUT).exists()
    sample = mrrm.load_samples(heldout)[0]
    args = ["score", "--image", *sample.images, "--prompt", sample.prompt, "--responses", *sample.responses]
    assert np.allclose(mrrm.main(args + ["--adapter", str(out)]), mrrm.main(args + ["--model", str(world / "m"), "--adapter", str(out)]))
    config = json.loads((out / "rm_config.json").read_text())
    (out / "rm_config.json").write_text(json.dumps({**config, "base_model": str(tmp_path / "moved")}))
    with pytest.raises(SystemExit):
        mrrm.main(["eval", "--adapter", str(out), "--data", heldout, "--predictions", ""])
    assert re.search(r"rm_config.json: base_model .*moved: not found; pass --model", capsys.readouterr().err)


def test_merged_export_loads_in_transformers_and_peft_export_in_peft(world, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import Qwen3VLForConditionalGeneration
    out = tmp_path / "rm"
    mrrm.main(args_for(world, out, "--steps", "3", "--lr", "5e-2", "--heldout", ""))
    ours = vlm.load_model(str(out / "merged"))
    proc = vlm.Processor(str(out / "merged"))
    sample = mrrm.load_samples(str(world / "d" / "train.jsonl"))[0]
    b = proc.chat(images=mrrm.open_images(sample), text=sample.prompt)
    tt = (b.input_ids == proc.cfg.image_token_id).int()
    with torch.no_grad():
        want = ours(b.input_ids, b.pixel_values, b.grid_thw, b.position_ids)
        base = Qwen3VLForConditionalGeneration.from_pretrained(str(world / "m")).eval()
        assert (base(input_ids=b.input_ids, pixel_values=b.pixel_values, image_grid_thw=b.grid_thw,
                     mm_token_type_ids=tt).logits - want).abs().max() > 1e-4  # training changed the model
        ref = Qwen3VLForConditionalGeneration.from_pretrained(str(out / "merged")).eval()
        got = ref(input_ids=b.input_ids, pixel_values=b.pixel_values, image_grid_thw=b.grid_thw, mm_token_type_ids=tt).logits
        assert (got - want).abs().max() <= 1e-4
        peft = PeftModel.from_pretrained(base, str(out / "peft")).eval()
        got = peft(input_ids=b.input_ids, pixel_values=b.pixel_values, image_grid_thw=b.grid_thw, mm_token_type_ids=tt).logits
        assert (got - want).abs().max() <= 1e-4


def test_readme_python_example_runs(world, tmp_path, capsys):
    import pathlib
    import re
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    out = tmp_path / "rm"
    mrrm.main(args_for(world, out, "--steps", "2", "--heldout", "", "--export", "off"))
    code = block.replace('"data/shapeworld-backbone"', repr(str(world / "m"))).replace('"runs/rm"', repr(str(out)))
    assert code != block
    scope = {}
    exec(code, scope)
    assert len(scope["scores"]) == 3 and all(math.isfinite(s) for s in scope["scores"])
    assert str(scope["scores"]) in capsys.readouterr().out


def test_the_authors_json_layout_and_question_field_load(tmp_path):
    # their loader takes one JSON object of lists (ranking_data, pair_data, ...) and `question` for `prompt`
    data = {"ranking_data": [{"question": "q1", "responses": ["a", "b", "c"], "rankings": [2, 1, 3]}],
            "pair_data": [{"prompt": "q2", "responses": ["x", "y"], "rankings": [1, 2]},
                          {"prompt": "q3", "responses": ["x"], "rankings": [1]}]}
    path = tmp_path / "authors.json"
    path.write_text(json.dumps(data, indent=1))
    with pytest.raises(ValueError, match=r"authors.json:pair_data\[1\]: responses"):
        mrrm.load_samples(str(path))
    kept = mrrm.load_samples(str(path), skip_bad=True)
    assert [(s.prompt, s.rankings) for s in kept] == [("q1", [2, 1, 3]), ("q2", [1, 2])]


def test_epochs_when_given_replace_steps(world, tmp_path, capsys):
    n = len(mrrm.load_samples(str(world / "d" / "train.jsonl")))
    mrrm.main(args_for(world, tmp_path / "rm", "--epochs", "1.5", "--heldout", "", "--export", "off"))
    assert json.loads((tmp_path / "rm" / "rm_config.json").read_text())["steps"] == math.ceil(1.5 * n / 4)
    with pytest.raises(SystemExit):
        mrrm.main(args_for(world, tmp_path / "rm0", "--steps", "0", "--heldout", ""))
    assert "--steps 0 / --epochs 0: no step to train" in capsys.readouterr().err


def test_independent_warmup_trains_the_first_steps_on_block_masked_packs(world, tmp_path, monkeypatch):
    modes, encode = [], mrrm.encode_sample
    monkeypatch.setattr(mrrm, "encode_sample", lambda rm, s, order, mode, cache:
                        modes.append(mode) or encode(rm, s, order, mode, cache))
    mrrm.main(args_for(world, tmp_path / "rm", "--steps", "4", "--independent-warmup", "0.5", "--heldout", "",
                       "--export", "off"))
    assert modes == ["independent"] * 8 + ["joint"] * 8  # 2 of 4 steps, 4 samples each
    assert json.loads((tmp_path / "rm" / "rm_config.json").read_text())["mode"] == "joint"


def test_the_shapeworld_default_learns_in_a_shortened_run(tmp_path):
    # the default data and backbone, cut to 200 steps of 8 samples (~20 s). Independent mode: joint needs
    # about four times the steps to leave chance (0.36 after 200 steps of 8). Measured on 300 held-out
    # samples, seeds 0 - 3, with two roundings of the same attention: 0.527 - 0.603 (at 150 steps
    # 0.397 - 0.527: too early, where a change of summation order alone moved a seed by 0.05).
    # The full default run (best-of-4 0.894 - 0.957 over four seeds on 1,000 held-out samples) is a benchmark in the README, not a test.
    result = mrrm.main(["train", "--steps", "200", "--batch-size", "8", "--micro-batch", "8", "--mode", "independent",
                        "--eval-every", "0", "--eval-samples", "300", "--export", "off", "--out", str(tmp_path / "rm")])
    # chance is 0.25; on 300 samples its standard deviation is 0.025, so 0.45 is 8 of them above
    assert result["best_of_n"] >= 0.45, result


def test_the_cli_flushes_denormal_floats():
    # denormals slowed a CPU training step 3.8x once the loss neared 0; run_cli turns them off
    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-39])
    assert (tiny * 1.0).item() != 0.0  # a denormal survives by default
    assert mrrm.run_cli(lambda a: (tiny * 1.0).item(), None) == 0.0


def test_output_piped_into_a_reader_that_leaves_ends_quietly():
    # `python mrrm.py eval | head`: the closed pipe is the reader's choice, not an error to report
    import subprocess
    import sys
    code = "import mrrm; mrrm.run_cli(lambda a: [print(i, flush=True) for i in range(10 ** 6)], None)"
    done = subprocess.run(f"{sys.executable} -c '{code}' | head -n 2", shell=True, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert done.stdout == "0\n1\n" and done.stderr == "", done.stderr[-500:]


# --- bad input found before training, and a stopped run that loses nothing ----------------------


def test_samples_of_a_one_line_json_list_keep_their_own_location_and_prompt(world, tmp_path):
    # json.dump writes a list on one line: every element starts on line 1, but each sample must still
    # be told apart (errors, default ids and the prompt cache key on the location)
    recs = [{"prompt": f"question {i}", "responses": ["a", "b"], "rankings": [1, 2]} for i in range(3)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    samples = mrrm.load_samples(str(path))
    assert [s.where for s in samples] == [f"{path}:1[{i}]" for i in range(3)], [s.where for s in samples]
    assert len({s.id for s in samples}) == 3
    rm = mrrm.RewardModel.load(str(world / "m"))
    cache = mrrm.PromptCache(rm, 2**20)
    decoded = [rm.processor.tokenizer.decode(cache(s)[0][0].tolist()) for s in samples]
    assert all(f"question {i}" in d for i, d in enumerate(decoded)), decoded


def test_text_after_a_json_lists_end_is_an_error_not_dropped_records(tmp_path):
    rec = {"prompt": "q", "responses": ["a", "b"], "rankings": [1, 2]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([rec]) + "\n" + json.dumps([rec, rec]))
    with pytest.raises(ValueError, match=r"d\.json:2: malformed JSON: text after the list's closing"):
        mrrm.load_samples(str(path))


def test_a_byte_order_mark_is_read_and_a_non_utf8_line_is_a_bad_record(tmp_path):
    rec = json.dumps({"prompt": "q", "responses": ["a", "b"], "rankings": [1, 2]}).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + rec + b"\n" + b'{"prompt": "caf\xe9"}\n' + rec + b"\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8 text"):
        mrrm.load_samples(str(path))
    assert [s.where for s in mrrm.load_samples(str(path), skip_bad=True)] == [f"{path}:1", f"{path}:3"]


def test_jsonl_in_a_file_named_json_and_null_optional_fields_load(tmp_path):
    rec = {"prompt": "q", "responses": ["a", "b"], "rankings": [1, 2], "image": None, "category": None, "id": None}
    path = write_jsonl(tmp_path / "d.json", [rec, rec])
    samples = mrrm.load_samples(path)
    assert [(s.images, s.category) for s in samples] == [([], ""), ([], "")]


def test_an_unreadable_image_or_an_empty_frame_folder_is_a_bad_record_before_training(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "clip").mkdir()
    rec = {"prompt": "q", "responses": ["a", "b"], "rankings": [1, 2]}
    path = write_jsonl(tmp_path / "d.jsonl", [{**rec, "image": "ok.png"}, {**rec, "image": "broken.png"},
                                              {**rec, "video": "clip"}, {**rec, "video": ["ok.png", "broken.png"]}])
    with pytest.raises(ValueError) as e:
        mrrm.load_samples(path)
    msg = str(e.value)
    assert "3 bad record(s)" in msg and ":2: image:" in msg and "broken.png: cannot be read as an image" in msg, msg
    assert ":3: video:" in msg and "holds no" in msg and ":4: video: frame:" in msg, msg
    assert [s.where for s in mrrm.load_samples(path, skip_bad=True)] == [f"{path}:1"]


def test_a_bad_frame_in_a_folder_an_extreme_aspect_and_a_decompression_bomb_are_bad_records(tmp_path, monkeypatch):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    Image.new("RGB", (201, 1)).save(tmp_path / "wide.png")  # Qwen3-VL refuses an aspect ratio above 200
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    (tmp_path / "clip").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "clip" / "frame_1.png")
    (tmp_path / "clip" / "frame_2.png").write_bytes(b"not a png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # big.png is over twice that: Pillow refuses it
    rec = {"prompt": "q", "responses": ["a", "b"], "rankings": [1, 2]}
    path = write_jsonl(tmp_path / "d.jsonl", [{**rec, "image": "ok.png"}, {**rec, "image": "wide.png"},
                                              {**rec, "video": "clip"}, {**rec, "image": "big.png"}])
    with pytest.raises(ValueError) as e:
        mrrm.load_samples(path)
    msg = str(e.value)
    assert "3 bad record(s)" in msg and ":2: image:" in msg and "201x1: aspect ratio above 200" in msg, msg
    assert ":3: video: frame:" in msg and "frame_2.png: cannot be read as an image" in msg, msg
    assert ":4: image:" in msg and "big.png: cannot be read as an image" in msg, msg
    with pytest.raises(ValueError, match=r"--image: .*big\.png: cannot be read as an image"):
        mrrm.read_image(str(tmp_path / "big.png"), "--image")


def test_a_nan_score_never_counts_as_the_best():
    assert mrrm.sample_metrics([float("nan"), 0.2, 0.1], [2, 1, 3])["best"] == 0.0
    assert mrrm.sample_metrics([0.3, float("nan"), 0.1], [1, 2, 3])["best"] == 0.0


def test_a_fresh_run_replaces_a_finished_run_and_refuses_to_overwrite_an_unfinished_one(world, tmp_path, capsys):
    common = ["--heldout", "", "--export", "off"]
    mrrm.main(args_for(world, tmp_path / "o", "--steps", "4", *common))
    mrrm.main(args_for(world, tmp_path / "o", "--steps", "2", *common))  # finished before: starts over
    names = sorted(n for n in os.listdir(tmp_path / "o") if n.startswith("checkpoint-"))
    assert names == ["checkpoint-000002"], names  # the earlier run's checkpoint-000004 would outrank it
    assert mrrm.latest_checkpoint(str(tmp_path / "o")).endswith("checkpoint-000002")
    mrrm.main(args_for(world, tmp_path / "o", "--steps", "4", "--stop-at", "1", *common))
    with pytest.raises(SystemExit):
        mrrm.main(args_for(world, tmp_path / "o", "--steps", "4", *common))
    assert "unfinished run (checkpoint at step 1 of 4): --resume continues it" in capsys.readouterr().err
    assert mrrm.latest_checkpoint(str(tmp_path / "o")).endswith("checkpoint-000001")


def test_a_run_stopped_by_an_error_saves_its_last_step_and_resumes_exactly(world, tmp_path, monkeypatch):
    common = ["--steps", "5", "--lora-dropout", "0.1", "--heldout", "", "--export", "off"]
    mrrm.main(args_for(world, tmp_path / "full", *common))
    real, calls = mrrm.collate, []

    def failing(*a, **k):  # 2 micro-batches per step: the 7th call is step 4's first
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt("stopped in step 4")
        return real(*a, **k)
    monkeypatch.setattr(mrrm, "collate", failing)
    with pytest.raises(KeyboardInterrupt):
        mrrm.main(args_for(world, tmp_path / "split", *common))
    monkeypatch.setattr(mrrm, "collate", real)
    assert json.loads((tmp_path / "split" / "latest.json").read_text())["step"] == 3
    mrrm.main(args_for(world, tmp_path / "split", *common, "--resume"))
    a, b = trainable(tmp_path / "full"), trainable(tmp_path / "split")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), (k, (a[k] - b[k]).abs().max().item())


def test_resume_drops_a_metrics_line_cut_short_by_the_kill(world, tmp_path, capsys):
    common = ["--steps", "3", "--heldout", "", "--export", "off"]
    mrrm.main(args_for(world, tmp_path / "m", *common, "--stop-at", "2"))
    with open(tmp_path / "m" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')
    mrrm.main(args_for(world, tmp_path / "m", *common, "--resume"))
    steps = [json.loads(l)["step"] for l in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], steps
    assert "dropped an unreadable line" in capsys.readouterr().err


@pytest.mark.parametrize("flags, said", [(["--log-every", "0"], "--log-every: expected an integer of at least 1"),
                                         (["--micro-batch", "0"], "--micro-batch: expected an integer of at least 1"),
                                         (["--clip", "-1"], "--clip -1.0: a gradient norm, at least 0"),
                                         (["--sep-token", "<nope>"], "'<nope>' (--sep-token) is not a token"),
                                         (["--sep-token", "<|image_pad|>"], "is the image/video pad token"),
                                         (["--threads", "-1"], "--threads: expected an integer of at least 0"),
                                         (["--row-tokens", "-1"], "--row-tokens: expected an integer of at least 0"),
                                         (["--device", "nonsense"], "--device nonsense: not a device name")])
def test_bad_flags_end_with_one_readable_line(world, tmp_path, capsys, flags, said):
    with pytest.raises(SystemExit):
        mrrm.main(args_for(world, tmp_path / "f", "--steps", "1", "--heldout", "", *flags))
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


# --- a trained reward model is loaded the way it was trained ------------------------------------


@pytest.fixture(scope="module")
def indep_run(world, tmp_path_factory):
    """A short independent-mode run (adapter + merged export) on a copy of world's backbone."""
    import shutil
    root = tmp_path_factory.mktemp("indep")
    shutil.copytree(world / "m", root / "bb")
    mrrm.main(args_for(world, root / "rm", "--steps", "3", "--lr", "1e-2", "--heldout", "", "--mode", "independent")
              + ["--model", str(root / "bb")])
    return root


def test_score_and_eval_use_the_mode_the_model_was_trained_in(world, indep_run):
    heldout = str(world / "d" / "heldout.jsonl")
    sample = mrrm.load_samples(heldout)[0]
    args = ["score", "--image", *sample.images, "--prompt", sample.prompt, "--responses", *sample.responses]
    default = mrrm.main(args + ["--adapter", str(indep_run / "rm")])
    assert np.allclose(default, mrrm.main(args + ["--adapter", str(indep_run / "rm"), "--mode", "independent"]))
    assert not np.allclose(default, mrrm.main(args + ["--adapter", str(indep_run / "rm"), "--mode", "joint"]))
    # the merged export remembers its mode too
    rm = mrrm.RewardModel.load(str(indep_run / "rm" / "merged"))
    assert rm.mode == "independent" and np.allclose(rm.score([mrrm.read_image(p, "test") for p in sample.images],
                                                             sample.prompt, sample.responses), default, atol=1e-5)


def test_an_adapter_on_a_merged_model_or_a_bare_backbone_without_a_head_is_refused(world, indep_run, capsys):
    with pytest.raises(ValueError, match="merged reward model .* would apply it twice"):
        mrrm.RewardModel.load(str(indep_run / "rm" / "merged"), adapter=str(indep_run / "rm"))
    heldout = str(world / "d" / "heldout.jsonl")
    with pytest.raises(SystemExit):
        mrrm.main(["eval", "--model", str(indep_run / "bb"), "--adapter", "", "--data", heldout])
    assert "no head.safetensors, so not a trained reward model" in capsys.readouterr().err
    assert not (indep_run / "bb" / "predictions.jsonl").exists()


def test_an_adapter_is_refused_on_a_backbone_whose_weights_were_replaced(world, indep_run, tmp_path):
    import shutil
    shutil.copytree(indep_run / "bb", tmp_path / "bb")
    vlm.write_tiny_checkpoint(str(tmp_path / "bb"), seed=1, min_pixels=64 * 64, max_pixels=64 * 64)  # same shapes
    with pytest.raises(ValueError, match="trained on other weights than"):
        mrrm.RewardModel.load(str(tmp_path / "bb"), adapter=str(indep_run / "rm"))
    mrrm.RewardModel.load(str(indep_run / "bb"), adapter=str(indep_run / "rm"))  # its own backbone loads


@pytest.mark.parametrize("targets", [None, r".*self_attn\.(q|v)_proj"])  # all projections; q and v of the fused qkv
def test_save_then_load_gives_the_same_scores(world, tmp_path, targets):
    rm = mrrm.RewardModel.load(str(world / "m"), head_hidden=32)
    import lora
    lora.inject_lora(rm.backbone, r=4, alpha=8, **({"targets": targets} if targets else {}))
    for _, layer in lora.lora_layers(rm.backbone):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    rm.save(str(tmp_path / "saved"))
    again = mrrm.RewardModel.load(str(world / "m"), adapter=str(tmp_path / "saved"))
    args = dict(prompt="What color is the circle?", responses=["Red.", "Blue.", "Green."])
    assert np.allclose(rm.score(**args), again.score(**args), atol=1e-6)


def test_score_takes_image_paths_and_refuses_a_bare_string_for_a_list(world, tmp_path):
    from PIL import Image
    rm = mrrm.RewardModel.load(str(world / "m"), head_hidden=32)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    args = dict(prompt="What color is the circle?", responses=["Red.", "Blue."])
    assert rm.score(images=[str(tmp_path / "a.png")], **args) == rm.score(images=[vlm.open_image(tmp_path / "a.png")], **args)
    with pytest.raises(TypeError, match="responses: expected a list"):  # it scored each character
        rm.score(prompt="q", responses="Red.")
    with pytest.raises(TypeError, match="videos: expected a list"):
        rm.score(prompt="q", responses=["a", "b"], videos=str(tmp_path))


# --- problems that show only when a sample is used, and files that are not what they claim ----------


def with_a_late_bad_record(world, tmp_path, kind):
    """world's training split (read with --image-root) with record 3 broken in a way the check before
    training cannot see: its image cut short after a valid header, or a prompt longer than --max-len."""
    lines = (world / "d" / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    if kind == "image":
        data = (world / "d" / rec["image"]).read_bytes()
        (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
        rec["image"] = str(tmp_path / "cut.png")
    elif kind == "frame":  # a video frame folder whose second frame is cut short after its header
        data = (world / "d" / rec["image"]).read_bytes()
        (tmp_path / "clip").mkdir()
        (tmp_path / "clip" / "1.png").write_bytes(data)
        (tmp_path / "clip" / "2.png").write_bytes(data[:len(data) // 2])
        rec["video"] = str(tmp_path / "clip")
    else:
        rec["prompt"] = "why " * 5000
    lines[2] = json.dumps(rec)
    return write_jsonl(tmp_path / "train.jsonl", lines)


@pytest.mark.parametrize("kind, said", [("image", r":3: image: .*cut\.png: cannot be read as an image \(image file is truncated"),
                                        ("frame", r":3: .*clip/2\.png: cannot be read as an image \(image file is truncated"),
                                        ("prompt", r":3: prompt \(\d+ tokens\) plus 4 separators exceed max_len=4096")])
def test_a_record_found_bad_only_when_used_is_skipped_with_skip_bad_or_stops_the_run(world, tmp_path, capsys, kind, said):
    data = with_a_late_bad_record(world, tmp_path, kind)
    assert len(mrrm.load_samples(data, str(world / "d"))) == 24  # the check before training passes it
    run = lambda out, *extra: mrrm.main(args_for(world, tmp_path / out, "--train", data, "--heldout", data, "--image-root",
                                                 str(world / "d"), "--steps", "6", "--export", "off", *extra))
    run("rm", "--skip-bad")
    err = capsys.readouterr().err
    assert len(re.findall("skipped a bad record", err)) == 1 and re.search(said, err), err  # once: train and eval
    metrics = [json.loads(l) for l in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and metrics[-1].get("final")

    with pytest.raises(SystemExit):  # without --skip-bad: one line naming the record; the steps done are kept
        run("stop")
    err = capsys.readouterr().err
    assert re.search(said, err) and "Traceback" not in err, err
    step = next(use // 4 + 1 for use in range(24) if mrrm.sample_order(24, use, 0)[0] == 2)
    assert ("fix or remove the record named below, or add --skip-bad; then --resume" in err) == (step > 1), (step, err)


def test_eval_with_skip_bad_scores_the_rest_when_a_record_fails_late(world, tmp_path, capsys):
    mrrm.main(args_for(world, tmp_path / "rm", "--steps", "1", "--heldout", "", "--export", "off"))
    data = with_a_late_bad_record(world, tmp_path, "image")
    report = mrrm.main(["eval", "--adapter", str(tmp_path / "rm"), "--data", data, "--skip-bad",
                        "--image-root", str(world / "d")])
    out = capsys.readouterr()
    assert f"{data}: 23 samples" in out.out and "skipped a bad record" in out.err, out
    ids = [json.loads(l)["id"] for l in (tmp_path / "rm" / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == 23 and json.loads(open(data).read().splitlines()[2])["id"] not in ids
    assert 0 <= report["best_of_n"] <= 1


def test_skip_bad_does_not_change_a_clean_run(world, tmp_path):
    # the skip path must not change which samples a clean run trains on, or in what order
    mrrm.main(args_for(world, tmp_path / "a", "--steps", "3", "--heldout", "", "--export", "off"))
    mrrm.main(args_for(world, tmp_path / "b", "--steps", "3", "--heldout", "", "--export", "off", "--skip-bad"))
    ta, tb = trainable(tmp_path / "a"), trainable(tmp_path / "b")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("name", ["head.safetensors", "rm_config.json"])
def test_a_corrupt_file_in_a_trained_folder_is_named(world, tmp_path, capsys, name):
    mrrm.main(args_for(world, tmp_path / "rm", "--steps", "1", "--heldout", "", "--export", "off"))
    path = tmp_path / "rm" / name
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(SystemExit):
        mrrm.main(["score", "--adapter", str(tmp_path / "rm"), "--prompt", "q", "--responses", "a", "b"])
    err = capsys.readouterr().err
    assert f"error: {path}: " in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", ["trainable.safetensors", "state.json", "latest.json"])
def test_resume_names_a_corrupt_checkpoint_file(world, tmp_path, capsys, name):
    argv = args_for(world, tmp_path / "rm", "--steps", "3", "--heldout", "", "--export", "off")
    mrrm.main(argv + ["--stop-at", "1"])
    folder = tmp_path / "rm" if name == "latest.json" else tmp_path / "rm" / "checkpoint-000001"
    (folder / name).write_bytes((folder / name).read_bytes()[:10])
    with pytest.raises(SystemExit):
        mrrm.main(argv + ["--resume"])
    err = capsys.readouterr().err
    assert f"error: {folder / name}: " in err and "Traceback" not in err, err


def test_a_corrupt_tokenizer_is_named(world, tmp_path):
    import shutil
    shutil.copytree(world / "m", tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text('{"version": "1.0", "model":')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizer\.json"):
        vlm.Tokenizer(str(tmp_path / "m" / "tokenizer.json"))


def test_a_non_utf8_line_is_counted_among_the_bad_records(tmp_path):
    rec = json.dumps({"prompt": "q", "responses": ["a", "b"], "rankings": [1, 2]}).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(rec + b"\n" + b'{"prompt": "caf\xe9"}\n' + b"{oops\n" + rec + b"\n")
    with pytest.raises(ValueError, match=r"2 bad record\(s\)"):
        mrrm.load_samples(str(path))


def test_a_null_prompt_beside_a_question_is_absent(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": None, "question": "What?", "responses": ["a", "b"], "rankings": [1, 2]}])
    assert [s.prompt for s in mrrm.load_samples(path)] == ["What?"]


def test_bench_refuses_a_model_folder_that_does_not_exist(tmp_path, capsys):
    with pytest.raises(SystemExit):
        mrrm.main(["bench", "--model", str(tmp_path / "typo")])
    assert f"{tmp_path / 'typo'}/config.json: not found" in capsys.readouterr().err


def test_threads_sets_torchs_cpu_threads(world, tmp_path):
    before = torch.get_num_threads()
    try:
        mrrm.main(args_for(world, tmp_path / "t", "--steps", "1", "--heldout", "", "--export", "off", "--threads", "1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- pinned by a mutation audit: changes no other test noticed ---------------------------------------


def test_pairwise_accuracy_is_pooled_over_all_pairs_not_averaged_per_sample():
    rows = [dict(mrrm.sample_metrics([3, 2, 1, 0], [1, 2, 3, 4]), category=""),  # 6 of 6 pairs
            dict(mrrm.sample_metrics([0, 1], [1, 2]), category="")]  # 0 of 1
    assert mrrm.summarize(rows)["pairwise"] == pytest.approx(6 / 7)


def test_each_epoch_visits_every_sample_once_in_a_new_order():
    n = 20
    epochs = [[mrrm.sample_order(n, e * n + i, 0)[0] for i in range(n)] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n)) and epochs[0] != epochs[1]


def test_keep_checkpoints_keeps_exactly_the_newest_k(tmp_path):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    for step in range(1, 5):
        mrrm.save_checkpoint(str(tmp_path), step, {"p": p}, opt, {}, keep=2)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-000003", "checkpoint-000004"]


def test_micro_batches_do_not_change_the_gradient(world, tmp_path):
    # Adam hides the loss's scale from the weights; the logged gradient norm does not
    norms = []
    for micro in ("2", "4"):
        mrrm.main(args_for(world, tmp_path / micro, "--steps", "1", "--heldout", "", "--export", "off", "--micro-batch", micro))
        norms.append(json.loads((tmp_path / micro / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"])
    assert norms[0] == pytest.approx(norms[1], rel=1e-4), norms


def test_cuda_asked_for_on_a_machine_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: this torch .* sees no CUDA GPU"):
        mrrm.pick_device("cuda")
    assert mrrm.pick_device("auto") == "cpu" and mrrm.pick_device("cpu") == "cpu"


def test_eval_checks_its_protocol_and_predictions_path_before_scoring(world, tmp_path, capsys, monkeypatch):
    mrrm.main(args_for(world, tmp_path / "rm", "--steps", "1", "--heldout", "", "--export", "off"))
    scored = []
    monkeypatch.setattr(mrrm, "evaluate", lambda *a, **k: scored.append(1))  # must not be reached
    eval_args = ["eval", "--adapter", str(tmp_path / "rm"), "--data", str(world / "d" / "heldout.jsonl")]
    (tmp_path / "p").mkdir()
    for extra, said in [(["--predictions", str(tmp_path / "p")], "is a folder; give a file name"),
                        (["--protocol", "vlrewardbench"], "--protocol vlrewardbench scores pairs; this sample has 4"),
                        (["--protocol", "mmrlhf"], "--protocol mmrlhf scores pairs")]:
        with pytest.raises(SystemExit):
            mrrm.main(eval_args + extra)
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "responses": ["a", "b"], "rankings": [1, 2]}])
    with pytest.raises(SystemExit):
        mrrm.main(eval_args[:3] + ["--data", pairs, "--protocol", "vlrewardbench"])
    assert "reads each sample's id (its dataset); this one has none" in capsys.readouterr().err
    assert scored == []


# --- a run stopped anywhere loses nothing: fault injection ------------------------------------------


def records(out):
    """metrics.jsonl without the timing fields, which differ from run to run."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k not in ("time", "tokens_per_s")} for l in lines]


def fail_at(k, real, always=False):
    """real(), except that call k (1-based) raises KeyboardInterrupt (and every later one if always)."""
    calls = []

    def fn(*a, **kw):
        calls.append(1)
        if len(calls) == k or always and len(calls) > k:
            raise KeyboardInterrupt(f"stopped at call {len(calls)}")
        return real(*a, **kw)
    return fn


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    mrrm.main(args_for(world, out, *INTERRUPTED))
    return out


# 4 steps of 2 micro-batches, a log line and an evaluation every 2 steps, no periodic checkpoint (the
# default): each point below stopped a run, and --resume had to end exactly as the uninterrupted run
INTERRUPTED = ["--steps", "4", "--log-every", "2", "--eval-every", "2", "--lora-dropout", "0.1"]


@pytest.mark.parametrize("point", ["loss of step 2", "clipping of step 2", "step 2's log line", "step 2's evaluation",
                                   "the final checkpoint", "the final checkpoint's pointer", "the export"])
def test_a_run_stopped_anywhere_resumes_to_the_same_weights_and_metrics(world, tmp_path, monkeypatch, uninterrupted,
                                                                        point):
    # before: a stop in clipping saved nothing; one in a log line or evaluation lost that line; one in
    # the only checkpoint's save lost the run; the first loss logged after a resume averaged only the
    # steps since it; a stop in the export logged the final evaluation twice
    patch = {"loss of step 2": lambda: monkeypatch.setitem(mrrm.LOSSES, "ce+pl", fail_at(3, mrrm.LOSSES["ce+pl"])),
             "clipping of step 2": lambda: monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                                                               fail_at(2, torch.nn.utils.clip_grad_norm_)),
             "step 2's log line": lambda: monkeypatch.setattr(mrrm, "log_metrics", fail_at(1, mrrm.log_metrics)),
             "step 2's evaluation": lambda: monkeypatch.setattr(mrrm, "evaluate", fail_at(1, mrrm.evaluate)),
             "the final checkpoint": lambda: monkeypatch.setattr(mrrm, "save_checkpoint", fail_at(1, mrrm.save_checkpoint)),
             "the final checkpoint's pointer": lambda: monkeypatch.setattr(
                 mrrm, "_write_json", lambda path, obj, real=mrrm._write_json: (
                     (_ for _ in ()).throw(KeyboardInterrupt("no pointer")) if path.endswith("latest.json")
                     else real(path, obj))),
             "the export": lambda: monkeypatch.setattr(mrrm, "export", fail_at(1, mrrm.export))}
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        monkeypatch = m
        patch[point]()
        with pytest.raises(KeyboardInterrupt):
            mrrm.main(args_for(world, out, *INTERRUPTED))
    mrrm.main(args_for(world, out, *INTERRUPTED, "--resume"))
    a, b = trainable(uninterrupted), trainable(out)
    assert all(torch.equal(a[k], b[k]) for k in a), point
    assert records(out) == records(uninterrupted), (point, records(out))


def test_checkpoints_are_pruned_by_step_not_by_name(tmp_path):
    # "checkpoint-1000000" sorts before "checkpoint-999999" as text: pruning deleted the newest
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([w])
    for step in (999_998, 999_999, 1_000_000):
        mrrm.save_checkpoint(str(tmp_path), step, {"w": w}, opt, {}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1000000", "checkpoint-999999", "latest.json"]
    assert mrrm.latest_checkpoint(str(tmp_path)).endswith("checkpoint-1000000")


def test_stop_at_then_resume_keeps_the_evaluation_at_the_stop(world, tmp_path, uninterrupted):
    # the stopped run's evaluation was logged as "final", which a resume drops: step 2's was lost
    mrrm.main(args_for(world, tmp_path / "run", *INTERRUPTED, "--stop-at", "2"))
    mrrm.main(args_for(world, tmp_path / "run", *INTERRUPTED, "--resume"))
    assert records(tmp_path / "run") == records(uninterrupted)


def test_steps_whose_samples_were_all_skipped_log_no_line_and_the_run_goes_on(world, tmp_path, capsys):
    # one sample per step and record 3 bad: its step has no loss to average (a division by zero that a
    # resume then repeated for ever)
    data = with_a_late_bad_record(world, tmp_path, "prompt")
    mrrm.main(args_for(world, tmp_path / "rm", "--train", data, "--heldout", "", "--image-root", str(world / "d"),
                       "--steps", "24", "--batch-size", "1", "--micro-batch", "1", "--export", "off", "--skip-bad"))
    steps = [r["step"] for r in records(tmp_path / "rm") if "loss" in r]
    bad_step = next(use + 1 for use in range(24) if mrrm.sample_order(24, use, 0)[0] == 2)
    assert bad_step not in steps and len(steps) == 23, (bad_step, steps)
