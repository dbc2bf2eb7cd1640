"""Tests of data/convert.py: each converter on hand-written records in its published format."""

import base64
import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import convert  # noqa: E402


def png_bytes(color=(255, 0, 0), size=(4, 3)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp_path, name, records, **kw):
    src = write_jsonl(tmp_path / f"{name}.in.jsonl", records)
    out = tmp_path / f"{name}.out.jsonl"
    stats = convert.convert(name, src, out, **kw)
    return stats, read_jsonl(out), out


def best(sample):
    return sample["responses"][sample["rankings"].index(1)]


VLRB = {"id": "RLAIF-V-7", "query": "How many cats?", "response": ["Two cats.", "Three cats."],
        "human_ranking": [1, 0], "image_path": "img/7.jpg", "query_source": "RLAIF-V",
        "models": ["m1", "m2"]}


# ----------------------------------------------------------------------------- converters

def test_vlrewardbench_turns_human_ranking_zero_into_rank_one(tmp_path):
    _, [s], _ = run(tmp_path, "vlrewardbench", [VLRB])
    assert best(s) == "Three cats." and sorted(s["rankings"]) == [1, 2], \
        f"human_ranking [1, 0] prefers the second response; got {s['responses']} ranked {s['rankings']}"
    assert (s["prompt"], s["image"], s["category"], s["id"]) == ("How many cats?", "img/7.jpg", "RLAIF-V", "RLAIF-V-7")


def test_vlrewardbench_writes_image_bytes_as_a_png_beside_out(tmp_path):
    raw = png_bytes()
    rec = dict(VLRB, image={"bytes": base64.b64encode(raw).decode(), "path": None})
    _, [s], out = run(tmp_path, "vlrewardbench", [rec])
    png = out.parent / s["image"]
    assert s["image"].startswith("vlrewardbench.out_images/"), f"image path {s['image']} is not beside OUT"
    assert png.exists(), f"no PNG written at {png}"
    with Image.open(png) as img:
        assert (img.format, img.size) == ("PNG", (4, 3)), f"wrote {img.format} {img.size}, expected PNG (4, 3)"


def test_base64_strings_are_images_and_paths_that_look_alike_stay_paths(tmp_path):
    b64 = base64.b64encode(png_bytes()).decode()
    records = [dict(VLRB, image=b64), dict(VLRB, image=f"data:image/png;base64,{b64}"), dict(VLRB, image="Qk/7.jpg")]
    _, out, _ = run(tmp_path, "vlrewardbench", records)
    images = [s["image"] for s in out]
    assert images[0] == images[1] and images[0].endswith(".png") and images[2] == "Qk/7.jpg", images


def test_mmrewardbench_reads_a_json_list_with_better_and_category(tmp_path):
    records = [{"ID": "nocaps_1", "Text": "Caption it.", "Image": "images/nocaps/1.jpg", "Output1": "A dog.",
                "Output2": "A cat.", "Better": "Output2", "Category": "open_generation/correctness_task"},
               {"ID": "mathvista_2", "Text": "Solve.", "Image": "images/m/2.jpg", "Output1": "4",
                "Output2": "5", "Better": "Output1", "Meta": {"Category": "reasoning"}}]
    src = tmp_path / "all_data.json"
    src.write_text(json.dumps(records, indent=2))
    stats = convert.convert("mmrewardbench", src, tmp_path / "out.jsonl")
    a, b = read_jsonl(tmp_path / "out.jsonl")
    assert (a["rankings"], b["rankings"]) == ([2, 1], [1, 2]), f"rankings {a['rankings']}, {b['rankings']}"
    assert (a["category"], b["category"]) == ("open_generation/correctness_task", "reasoning/math")
    assert stats["samples_out"] == 2, f"expected 2 samples, got {stats['samples_out']}"


def test_mmrewardbench_splits_safety_and_reasoning_by_id_as_the_authors_script_does(tmp_path):
    # scripts/2_get_accuracy.py: safety -> safety/bias for IDs starting 'pairs' else safety/toxicity;
    # reasoning -> reasoning/math for IDs starting 'math' else reasoning/coding (IDs lowercased).
    base = {"Text": "q", "Image": "i.jpg", "Output1": "a", "Output2": "b", "Better": "Output1"}
    ids = [("PAIRS_3", "safety"), ("hateful_memes_1", "safety"), ("mathvista_2", "reasoning"),
           ("EMMA-Coding_4", "reasoning"), ("nocaps_5", "general_correctness")]
    _, out, _ = run(tmp_path, "mmrewardbench", [dict(base, ID=i, Category=c) for i, c in ids])
    got = [s["category"] for s in out]
    assert got == ["safety/bias", "safety/toxicity", "reasoning/math", "reasoning/coding", "general_correctness"], got


def test_mmrlhf_numbers_pairs_that_share_an_id(tmp_path):
    base = {"id": "073712_6", "image": "mcq/073712.png", "prompt": "Length of CB?", "chosen": "Cannot tell."}
    video = {"id": "v1", "video": "video/clip_1", "prompt": "What happens?", "chosen": "A run.", "rejected": "A swim."}
    _, out, _ = run(tmp_path, "mmrlhf", [dict(base, rejected="12"), dict(base, rejected="B"), video])
    assert [(s["id"], s["pair"]) for s in out] == [("073712_6", 0), ("073712_6", 1), ("v1", 0)], out
    assert [best(s) for s in out] == ["Cannot tell.", "Cannot tell.", "A run."], [s["rankings"] for s in out]
    assert (out[0]["category"], out[2]["category"], out[2]["video"]) == ("mcq", "video", "video/clip_1")


def test_chosen_is_not_always_shown_first(tmp_path):
    recs = [{"question": f"q{i}", "chosen": "good", "rejected": "bad", "image_path": "x.jpg", "idx": f"i{i}"}
            for i in range(40)]
    _, out, _ = run(tmp_path, "rlaifv", recs)
    first = sum(s["rankings"] == [1, 2] for s in out)
    assert 8 <= first <= 32, f"chosen shown first in {first}/40 samples; expected about half"
    assert all(best(s) == "good" for s in out), "the chosen response must keep rank 1"


def test_vlrewardbench_preferred_response_is_not_always_shown_first(tmp_path):
    # as published, nearly every record lists the preferred response first
    recs = [dict(VLRB, id=f"RLAIF-V-{i}", human_ranking=[0, 1]) for i in range(40)]
    _, out, _ = run(tmp_path, "vlrewardbench", recs)
    first = sum(s["rankings"] == [1, 2] for s in out)
    assert 8 <= first <= 32, f"preferred shown first in {first}/40 samples; expected about half"
    assert all(best(s) == "Two cats." for s in out), "the preferred response must keep rank 1"
    again = run(tmp_path, "vlrewardbench", recs)[1]
    assert again == out, "the order must be the same on every run"


def test_pairs_sharing_an_id_are_ordered_independently(tmp_path):
    # each id's pairs are keyed id/0, id/1, ...: a CRC of such keys gave all pairs of an id one order
    recs = [{"id": f"q{i}", "image": "a.png", "prompt": "p", "chosen": "c", "rejected": f"r{k}"}
            for i in range(60) for k in range(4)]
    _, out, _ = run(tmp_path, "mmrlhf", recs)
    firsts = [[s["rankings"] == [1, 2] for s in out[4 * i:4 * i + 4]] for i in range(60)]
    same = sum(len(set(f)) == 1 for f in firsts)
    assert same <= 20, f"{same} of 60 ids show all four pairs in one order (independent orders: about 7)"


def test_rlaifv_order_without_idx_does_not_depend_on_the_input_file_name(tmp_path):
    rec = {"question": "q", "chosen": "C", "rejected": "R", "image_path": "i.jpg"}
    shown = {}
    for name in ("a", "bb", "ccc", "dddd", "e5", "f6", "g7", "h8"):
        src = write_jsonl(tmp_path / f"{name}.jsonl", [rec])
        convert.convert("rlaifv", src, tmp_path / f"{name}.out.jsonl")
        shown[name] = tuple(read_jsonl(tmp_path / f"{name}.out.jsonl")[0]["rankings"])
    assert len(set(shown.values())) == 1, f"the same record got different orders by file name: {shown}"


def test_rlaifv_keeps_idx_as_id_and_decodes_bytes_given_as_ints(tmp_path):
    rec = {"ds_name": "RLAIF-V", "image": {"bytes": list(png_bytes((0, 9, 9))), "path": "a.jpg"},
           "question": "Describe.", "chosen": "Teal square.", "rejected": "Red circle.",
           "origin_dataset": "OK-VQA", "origin_split": "{}", "idx": "OK-VQA_5", "image_path": "a.jpg"}
    _, [s], out = run(tmp_path, "rlaifv", [rec])
    assert (s["id"], s["category"], best(s)) == ("OK-VQA_5", "OK-VQA", "Teal square.")
    with Image.open(out.parent / s["image"]) as img:
        assert img.getpixel((0, 0)) == (0, 9, 9), f"pixel {img.getpixel((0, 0))}, expected (0, 9, 9)"


def completion(text, h, e, v):
    return {"model": "m", "response": text, "annotations": {
        "Helpfulness": {"Rating": h, "Rationale": "."}, "Ethical Considerations": {"Rating": e, "Rationale": "."},
        "Visual Faithfulness": {"Rating": v, "Rationale": "."}}}


def test_vlfeedback_ranks_by_mean_rating_with_dense_ties(tmp_path):
    rec = {"id": "svit-1", "prompt": "What is it?", "img_path": "svit/1.jpg", "models": ["a", "b", "c", "d"],
           "completions": [completion("w", "2", "5", "2"), completion("x", "5", "5", "5"),
                           completion("y", "3", "5", "1"), completion("z", "4", "N/A", "4")]}
    _, [s], _ = run(tmp_path, "vlfeedback", [rec])
    # means: w 3.0, x 5.0, y 3.0, z 4.0 (N/A ignored)
    assert s["rankings"] == [3, 1, 3, 2], f"expected [3, 1, 3, 2] from means 3, 5, 3, 4; got {s['rankings']}"


def test_vlfeedback_nan_and_inf_ratings_count_as_no_rating(tmp_path):
    # float("nan") parses: a NaN mean made the sort, and so the ranking, arbitrary
    rec = {"id": "svit-2", "prompt": "What is it?", "img_path": "svit/1.jpg", "models": ["a", "b", "c"],
           "completions": [completion("w", "nan", "2", "2"), completion("x", "1", "inf", "1"),
                           completion("y", "5", "5", "5")]}
    _, [s], _ = run(tmp_path, "vlfeedback", [rec])
    assert s["rankings"] == [2, 3, 1], f"means 2, 1, 5 with nan/inf ignored give [2, 3, 1]; got {s['rankings']}"


def test_embedded_jpeg_is_saved_upright_by_its_exif_orientation(tmp_path):
    # 40 x 20 pixels, left half red and right half blue, tagged "rotate 90 degrees clockwise to
    # show" (orientation 6): shown, it is 20 wide and 40 tall with red on top.
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))
    rec = {"question": "q", "chosen": "a", "rejected": "b", "idx": 1,
           "image": {"bytes": base64.b64encode(buf.getvalue()).decode(), "path": None}}
    _, [s], out = run(tmp_path, "rlaifv", [rec])
    with Image.open(out.parent / s["image"]) as png:
        size, top, bottom = png.size, png.getpixel((10, 5)), png.getpixel((10, 35))
    assert size == shown.size == (20, 40), f"PNG is {size}, shown upright the JPEG is {shown.size}"
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0], f"top pixel {top}, bottom pixel {bottom}"


def test_base64_with_line_breaks_and_base64_tiff_are_images(tmp_path):
    tiff = io.BytesIO()
    Image.new("RGB", (4, 3), (0, 0, 255)).save(tiff, "TIFF")
    mime = base64.encodebytes(png_bytes(size=(40, 30))).decode()  # a line break every 76 characters
    records = [dict(VLRB, image=mime), dict(VLRB, image=base64.b64encode(tiff.getvalue()).decode())]
    assert "\n" in mime.strip(), "the PNG is too small to wrap"
    _, out, _ = run(tmp_path, "vlrewardbench", records)
    images = [s["image"] for s in out]
    assert all(i.startswith("vlrewardbench.out_images/") for i in images), f"not decoded to PNGs: {images}"


def test_output_file_has_the_umask_permissions_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        _, _, out = run(tmp_path, "vlrewardbench", [VLRB])
    finally:
        os.umask(old)
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode == 0o644, f"OUT has mode {oct(mode)}, expected 0o644 under umask 022"


def test_null_in_an_optional_field_of_a_passthrough_record_means_absent(tmp_path):
    rec = {"prompt": "p", "responses": ["a", "b"], "rankings": [1, 2], "video": "v/1.mp4",
           "image": None, "category": None, "id": None, "pair": None, "fps": None}
    _, [s], _ = run(tmp_path, "mr2bench", [rec])
    assert s == {"prompt": "p", "responses": ["a", "b"], "rankings": [1, 2], "video": "v/1.mp4"}, s


def test_videorewardbench_passes_valid_samples_through(tmp_path):
    rec = {"prompt": "Who wins?", "responses": ["a", "b", "c"], "rankings": [2, 1, 2], "video": "v/1.mp4",
           "id": 17, "category": "perception"}
    _, [s], _ = run(tmp_path, "videorewardbench", [rec])
    assert s == rec, f"pass-through changed the sample: {s}"


# ----------------------------------------------------------------------------- errors

def test_mr2bench_bad_rankings_stop_conversion_naming_file_line_and_field(tmp_path):
    good = {"prompt": "p", "responses": ["a", "b"], "rankings": [1, 2], "image": "i.png"}
    src = write_jsonl(tmp_path / "mr2.jsonl", [good, dict(good, rankings=[1, 2, 3])])
    with pytest.raises(convert.BadRecord) as e:
        convert.convert("mr2bench", src, tmp_path / "out.jsonl")
    assert f"{src}:2: rankings:" in str(e.value), str(e.value)


@pytest.mark.parametrize("line, said", [("[" * 100_000, "malformed JSON"), ('{"id": ' + "9" * 5000 + "}", "malformed JSON"),
                                        ('{"id": "x", "query": "\\ud800", "response": ["a", "b"], "human_ranking": [0, 1], '
                                         '"image_path": "i.png"}', "text that is not valid Unicode")],
                         ids=["deep-nesting", "5000-digits", "lone-surrogate"])
def test_pathological_lines_are_named_bad_records(tmp_path, line, said):
    # deep nesting (RecursionError), an over-long integer (ValueError) and a lone surrogate (which UTF-8
    # cannot write) were tracebacks or errors naming no line, and --skip-bad could not skip them
    src = write_jsonl(tmp_path / "in.jsonl", [VLRB, line, VLRB])
    with pytest.raises(ValueError) as e:
        convert.convert("vlrewardbench", src, tmp_path / "out.jsonl")
    assert f"{src}:2: " in str(e.value) and said in str(e.value), str(e.value)[:200]
    stats = convert.convert("vlrewardbench", src, tmp_path / "out.jsonl", skip_bad=True)
    assert (stats["samples_out"], stats["skipped"]) == (2, 1), stats


def test_a_data_url_without_its_comma_is_a_bad_record(tmp_path):
    with pytest.raises(convert.BadRecord, match=r":1: image: image bytes do not decode \(a data URL with no ','"):
        run(tmp_path, "vlrewardbench", [dict(VLRB, image="data:image/png")])


def test_out_equal_to_in_is_refused_and_the_published_file_kept(tmp_path):
    src = write_jsonl(tmp_path / "same.jsonl", [VLRB])
    before = src.read_bytes()
    with pytest.raises(ValueError, match="OUT is IN"):
        convert.convert("vlrewardbench", src, src)
    assert src.read_bytes() == before


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_an_images_path_that_is_not_a_folder_stops_before_out_is_replaced(tmp_path, kind):
    out = tmp_path / "out.jsonl"
    out.write_text("PREVIOUS\n")
    images = tmp_path / "out_images"
    if kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        images.symlink_to(tmp_path / "elsewhere")
    else:
        images.write_text("not a folder")
    src = write_jsonl(tmp_path / "in.jsonl", [dict(VLRB, image={"bytes": base64.b64encode(png_bytes()).decode()})])
    with pytest.raises(ValueError, match="out_images: exists and is not a folder"):
        convert.convert("vlrewardbench", src, out)
    assert out.read_text() == "PREVIOUS\n", "OUT was replaced by a conversion that failed"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "temporary files left"


def test_a_killed_runs_leftover_images_are_not_committed(tmp_path):
    (tmp_path / ".out_images.tmp").mkdir()
    (tmp_path / ".out_images.tmp" / "stale.png").write_bytes(png_bytes())
    rec = dict(VLRB, image={"bytes": base64.b64encode(png_bytes((0, 255, 0))).decode()})
    src = write_jsonl(tmp_path / "in.jsonl", [rec])
    convert.convert("vlrewardbench", src, tmp_path / "out.jsonl")
    [s] = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(p.name for p in (tmp_path / "out_images").iterdir()) == [Path(s["image"]).name]


def test_malformed_json_stops_conversion_before_anything_is_written(tmp_path):
    rec = dict(VLRB, image={"bytes": base64.b64encode(png_bytes()).decode()})
    src = write_jsonl(tmp_path / "in.jsonl", [rec, '{"id": "x", "query": '])
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError) as e:
        convert.convert("vlrewardbench", src, out)
    assert f"{src}:2: malformed JSON" in str(e.value), str(e.value)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["in.jsonl"], f"a failed conversion left files behind: {left}"


def test_missing_field_is_reported_with_file_line_and_field(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [VLRB, {k: v for k, v in VLRB.items() if k != "query"}])
    with pytest.raises(convert.BadRecord) as e:
        convert.convert("vlrewardbench", src, tmp_path / "out.jsonl")
    assert str(e.value) == f"{src}:2: query: missing", str(e.value)


def test_undecodable_image_bytes_are_reported_with_the_field(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [dict(VLRB, image={"bytes": "iVBORw0KGgoAAAAA"})])
    with pytest.raises(convert.BadRecord) as e:
        convert.convert("vlrewardbench", src, tmp_path / "out.jsonl")
    assert f"{src}:1: image: image bytes do not decode" in str(e.value), str(e.value)


def test_skip_bad_skips_and_counts_every_bad_record(tmp_path):
    records = [VLRB, "not json", dict(VLRB, human_ranking=[0]), dict(VLRB, id="ok-2")]
    stats, out, _ = run(tmp_path, "vlrewardbench", records, skip_bad=True)
    assert (stats["records_in"], stats["samples_out"], stats["skipped"]) == (4, 2, 2), stats
    assert any(":2: malformed JSON" in m for m in stats["bad"]) and any(":3: human_ranking" in m for m in stats["bad"])
    assert [s["id"] for s in out] == ["RLAIF-V-7", "ok-2"]


def test_image_root_maps_paths_relative_to_out_and_reports_missing_files(tmp_path):
    root = tmp_path / "bench"
    (root / "img").mkdir(parents=True)
    (root / "img/7.jpg").write_bytes(b"")
    (tmp_path / "conv").mkdir()
    src = write_jsonl(tmp_path / "in.jsonl", [VLRB])
    convert.convert("vlrewardbench", src, tmp_path / "conv/out.jsonl", image_root=root)
    [s] = read_jsonl(tmp_path / "conv/out.jsonl")
    assert s["image"] == "../bench/img/7.jpg", s["image"]
    src = write_jsonl(tmp_path / "in2.jsonl", [dict(VLRB, image_path="img/8.jpg")])
    with pytest.raises(convert.BadRecord, match=r"in2.jsonl:1: image_path: no file at"):
        convert.convert("vlrewardbench", src, tmp_path / "conv/out2.jsonl", image_root=root)


# ----------------------------------------------------------------------------- reader and validator

def test_read_records_gives_the_line_each_json_list_element_starts_on(tmp_path):
    src = tmp_path / "list.json"
    src.write_text('[\n  {"a": 1},\n  {"b":\n    2},\n  {"c": 3}\n]\n')
    got = list(convert.read_records(src))
    assert got == [(2, {"a": 1}), (3, {"b": 2}), (5, {"c": 3})], got


def test_read_records_reports_a_broken_json_list_with_its_line(tmp_path):
    src = tmp_path / "list.json"
    src.write_text('[\n  {"a": 1}\n  {"b": 2}\n]\n')
    with pytest.raises(ValueError, match=r"list.json:3: malformed JSON: expected ',' or ']'"):
        list(convert.read_records(src))


def test_validate_sample_accepts_a_good_sample():
    good = {"prompt": "p", "responses": ["a", "b", "c"], "rankings": [1, 1, 3], "image": ["x.png", "y.png"],
            "category": "c", "id": "q-1", "pair": 0}
    assert convert.validate_sample(good, "f:1") == []


@pytest.mark.parametrize("field,value", [
    ("prompt", None), ("responses", ["only one"]), ("rankings", [1, 2, 3]), ("rankings", [2, 3]),
    ("rankings", [1, True]), ("image", ""), ("video", []), ("category", 3), ("id", 1.5), ("pair", -1)])
def test_validate_sample_names_the_broken_field(field, value):
    sample = {"prompt": "p", "responses": ["a", "b"], "rankings": [1, 2], field: value}
    problems = convert.validate_sample(sample, "f.jsonl:9")
    assert len(problems) == 1 and problems[0].startswith(f"f.jsonl:9: {field}:"), problems


# ----------------------------------------------------------------------------- command line

def test_command_line_prints_a_one_line_summary(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [VLRB, "{"])
    rc = convert.main(["vlrewardbench", str(src), str(tmp_path / "out.jsonl"), "--skip-bad"])
    line = capsys.readouterr().out.strip()
    assert rc == 0 and line.startswith("vlrewardbench | records_in 2 | samples_out 1 | skipped 1 |"), line


def test_bench_reports_a_positive_rate_per_converter():
    rates = convert.bench(n=200)
    assert set(rates) == {"rlaifv", "vlrewardbench"} and min(rates.values()) > 0, rates


def test_a_conversion_that_yields_no_sample_leaves_an_earlier_out_as_it_was(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("PREVIOUS\n")
    for records in ([], ['{"id": 1}']):  # an empty file; every record bad (skipped)
        src = write_jsonl(tmp_path / "in.jsonl", records)
        with pytest.raises(ValueError, match="no sample converted"):
            convert.convert("vlrewardbench", src, out, skip_bad=True)
        assert out.read_text() == "PREVIOUS\n"


def test_a_wrong_optional_field_is_named_as_published_not_as_written(tmp_path):
    # the error said 'category' (mrrm's field) for a bad query_source, 'id' for a bad idx
    for name, rec, field in [("vlrewardbench", dict(VLRB, query_source=["COCO"]), "query_source"),
                             ("vlrewardbench", dict(VLRB, id={"a": 1}), "id"),
                             ("rlaifv", {"question": "q", "chosen": "c", "rejected": "r", "image_path": "i.jpg",
                                         "idx": [1]}, "idx")]:
        with pytest.raises(convert.BadRecord, match=rf":1: {field}: expected"):
            convert.CONVERTERS[name](rec, "f.jsonl:1", convert.Context(tmp_path / "out.jsonl"))
