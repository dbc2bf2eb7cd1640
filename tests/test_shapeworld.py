"""Tests for data/shapeworld.py: determinism, pixels, the ranking ladder, is_correct, the split.

The text-only tests guard the data set's one promise: the rank of responses 1, 3 and 4 cannot be
read from their words, only from the image.
"""

import doctest
import json
import math
import random
from collections import Counter

import pytest

from data import shapeworld as sw
from data.shapeworld import COLORS, Question, Scene, Shape, is_correct, make_sample, render, write_split

N = 3000  # samples for the statistical tests


def tolerance(n):
    """Four standard errors of a difference of two frequencies over n samples, at worst (p = 1/2)."""
    return 4 * math.sqrt(2 * 0.25 / n)


@pytest.fixture(scope="module")
def records():
    rng = random.Random(123)
    return [make_sample(rng)["record"] for _ in range(N)]


def by_rank(record):
    return {rank: text for text, rank in zip(record["responses"], record["rankings"])}


def skeleton(text):
    """The response with every answer-bearing word masked: what is left is the template."""
    content = set(COLORS) | set(sw.KINDS) | set(sw.SIZES) | set(sw.ROWS) | set(sw.COLS) | set(sw.NUMBER_WORDS)
    words = sw._words(text)
    return " ".join("#" if w in content or w.isdigit() or w.rstrip("s") in sw.KINDS else w for w in words)


def test_the_module_docstring_example_runs():
    result = doctest.testmod(sw)
    assert result.failed == 0 and result.attempted > 0, f"doctest: {result}"


def test_the_same_seed_writes_byte_identical_files(tmp_path):
    write_split(tmp_path / "a", "train", 40, seed=7)
    write_split(tmp_path / "b", "train", 40, seed=7)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 40, f"{len(files_a)} vs {len(files_b)} files"
    differ = [p for p in files_a if (tmp_path / "a" / p).read_bytes() != (tmp_path / "b" / p).read_bytes()]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:3]}"


def test_a_different_seed_gives_different_samples(tmp_path):
    a = write_split(tmp_path / "a", "train", 20, seed=0)
    b = write_split(tmp_path / "b", "train", 20, seed=1)
    assert len(set(a) & set(b)) < 5, f"{len(set(a) & set(b))} of 20 ids shared"


def test_each_shape_centre_pixel_has_its_colour():
    rng = random.Random(0)
    for _ in range(200):
        scene = sw.make_scene(rng)
        for size in (48, 64, 96):
            pixels = render(scene, size).load()
            for s in scene.shapes:
                x, y = int((s.col + 0.5) * size / 3), int((s.row + 0.5) * size / 3)
                assert pixels[x, y] == COLORS[s.color], f"{s} at ({x}, {y}) in {size}px is {pixels[x, y]}"


def test_empty_cells_stay_background():
    rng = random.Random(1)
    for _ in range(200):
        scene = sw.make_scene(rng)
        pixels = render(scene).load()
        taken = {(s.row, s.col) for s in scene.shapes}
        for row, col in set(sw.CELLS) - taken:
            x, y = int((col + 0.5) * 48 / 3), int((row + 0.5) * 48 / 3)
            assert pixels[x, y] == sw.BACKGROUND, f"empty cell ({row}, {col}) is {pixels[x, y]}"


def test_render_is_deterministic():
    scene = sw.make_scene(random.Random(5))
    assert render(scene).tobytes() == render(scene).tobytes()


def test_every_record_passes_the_schema_check(records):
    for r in records:
        assert isinstance(r["prompt"], str) and r["prompt"], r
        assert len(r["responses"]) == 4 and all(isinstance(t, str) and t for t in r["responses"]), r
        assert sorted(r["rankings"]) == [1, 2, 3, 4], f"rankings {r['rankings']}"
        assert r["category"] in sw.QTYPES and isinstance(r["answer"], str), r
        assert r["image"] == f"images/{r['id']}.png", r["image"]
        assert json.loads(json.dumps(r)) == r, "record is not JSON-serialisable as is"


def test_the_four_responses_are_all_different(records):
    same = sum(len(set(r["responses"])) < 4 for r in records)
    assert same == 0, f"{same} of {len(records)} records repeat a response"


def test_rank_1_is_always_correct(records):
    wrong = [r for r in records if not is_correct(r, by_rank(r)[1])]
    assert not wrong, f"{len(wrong)} rank-1 responses judged wrong, e.g. {wrong[:1]}"


def test_ranks_3_and_4_are_always_incorrect(records):
    for rank in (3, 4):
        right = [r for r in records if is_correct(r, by_rank(r)[rank])]
        assert not right, f"{len(right)} rank-{rank} responses judged correct, e.g. {right[:1]}"


def test_rank_2_is_never_judged_correct(records):
    right = [r for r in records if is_correct(r, by_rank(r)[2])]
    assert not right, f"{len(right)} rank-2 responses judged correct, e.g. {right[:1]}"


def test_rank_2_names_the_true_colour_or_count_among_two(records):
    numbers = {str(i): i for i in range(10)} | {w: i for i, w in enumerate(sw.NUMBER_WORDS)}
    for r in records:
        words = sw._words(by_rank(r)[2])
        if r["category"] == "color":
            truth, named = r["answer"], [w for w in words if w in COLORS]
        elif r["category"] == "count":
            truth, named = int(r["answer"]), [numbers[w] for w in words if w in numbers]
        else:
            continue
        assert len(set(named)) == 2 and truth in named, f"{r['answer']!r} vs {by_rank(r)[2]!r}"


def test_every_question_type_is_asked_about_equally_often(records):
    counts = Counter(r["category"] for r in records)
    for qtype in sw.QTYPES:
        assert abs(counts[qtype] / N - 0.25) < 0.04, f"{qtype}: {counts[qtype]} of {N}"


def test_train_mix_weights_the_question_types():
    rng = random.Random(5)
    counts = Counter(make_sample(rng, mix=sw.parse_mix("position=2"))["record"]["category"] for _ in range(N))
    for qtype in sw.QTYPES:
        want = 0.4 if qtype == "position" else 0.2
        assert abs(counts[qtype] / N - want) < 0.04, f"{qtype}: {counts[qtype]} of {N}, want {want}"
    rng = random.Random(5)
    counts = Counter(make_sample(rng, mix={"describe": 0})["record"]["category"] for _ in range(300))
    assert counts["describe"] == 0 and len(counts) == 3, counts


@pytest.mark.parametrize("text, message", [("place=2", "unknown question type 'place'"),
                                           ("position=x", "'position=x' is not TYPE=WEIGHT"),
                                           ("position=-1", "0 or more"),
                                           ("color=0,count=0,position=0,describe=0", "every question type weighs 0")])
def test_a_bad_train_mix_is_named(text, message):
    with pytest.raises(ValueError, match="--train-mix") as e:
        sw.parse_mix(text)
    assert message in str(e.value)


def test_templates_are_equally_frequent_at_ranks_1_3_and_4(records):
    freq = {rank: Counter(skeleton(by_rank(r)[rank]) for r in records) for rank in (1, 3, 4)}
    for template in freq[1] | freq[3] | freq[4]:
        f1, f3, f4 = (freq[rank][template] / N for rank in (1, 3, 4))
        assert max(abs(f1 - f3), abs(f1 - f4)) < tolerance(N), f"{template!r}: rank 1 {f1:.3f}, 3 {f3:.3f}, 4 {f4:.3f}"


def test_a_bag_of_words_classifier_cannot_find_rank_1():
    # Naive Bayes over word counts, rank 1 vs ranks 3/4, fitted on one half, asked on the other
    # half to pick rank 1 among the three: chance is 1/3.
    rng = random.Random(9)
    fit, test = ([make_sample(rng)["record"] for _ in range(N // 2)] for _ in range(2))
    counts = {True: Counter(), False: Counter()}
    for r in fit:
        for rank in (1, 3, 4):
            counts[rank == 1].update(sw._words(by_rank(r)[rank]))
    totals = {k: sum(c.values()) + len(counts[True] | counts[False]) for k, c in counts.items()}

    def score(text):
        return sum(math.log((counts[True][w] + 1) / totals[True]) - math.log((counts[False][w] + 1) / totals[False])
                   for w in sw._words(text))

    hits = sum(max((1, 3, 4), key=lambda rank: score(by_rank(r)[rank])) == 1 for r in test)
    assert hits / len(test) < 0.40, f"picked rank 1 in {hits} of {len(test)} ({hits / len(test):.3f}), chance 0.333"
    hits = sum(score(by_rank(r)[1]) > score(by_rank(r)[3]) for r in test)
    assert hits / len(test) < 0.55, f"rank 1 over rank 3 in {hits} of {len(test)} ({hits / len(test):.3f}), chance 0.5"


def answer_frequencies(records, qtype, rank):
    """({answer: frequency} at `rank`, the number of `qtype` records)."""
    subset = [r for r in records if r["category"] == qtype]
    counts = Counter(sw.parse_answer(qtype, by_rank(r)[rank]) for r in subset)
    return {answer: n / len(subset) for answer, n in counts.items()}, len(subset)


def test_every_answer_is_equally_frequent_at_ranks_1_and_3(records):
    for qtype in ("color", "count", "position"):
        (f1, n), (f3, _) = answer_frequencies(records, qtype, 1), answer_frequencies(records, qtype, 3)
        for answer in f1 | f3:
            assert abs(f1.get(answer, 0) - f3.get(answer, 0)) < tolerance(n), \
                f"{qtype} {answer}: rank 1 {f1.get(answer, 0):.3f}, rank 3 {f3.get(answer, 0):.3f}"


def test_colour_and_position_answers_are_equally_frequent_at_rank_4(records):
    # Not counts: on a set of four counts the only far misses are its ends (see the module doc).
    # Among the far misses: an off-topic rank 4 states no answer (None), counted apart.
    for qtype in ("color", "position"):
        (f1, n), (f4, _) = answer_frequencies(records, qtype, 1), answer_frequencies(records, qtype, 4)
        f4 = {answer: f / (1 - f4.get(None, 0)) for answer, f in f4.items() if answer is not None}
        for answer in f1 | f4:
            assert abs(f1.get(answer, 0) - f4.get(answer, 0)) < tolerance(n), \
                f"{qtype} {answer}: rank 1 {f1.get(answer, 0):.3f}, rank 4 {f4.get(answer, 0):.3f}"


def test_a_quarter_of_rank_4s_are_off_topic_and_nothing_else_changes():
    on, off = random.Random(4), random.Random(4)
    kinds = {q: [] for q in sw.QTYPES}
    for _ in range(N):
        a, b = make_sample(on)["record"], make_sample(off, off_topic_rate=0.0)["record"]
        rank4 = by_rank(a)[4]
        is_off = sw.parse_answer(a["category"], rank4) is None  # states no answer to its question
        kinds[a["category"]].append(is_off)
        assert {k: v for k, v in a.items() if k != "responses"} == {k: v for k, v in b.items() if k != "responses"}
        assert [by_rank(a)[r] for r in (1, 2, 3)] == [by_rank(b)[r] for r in (1, 2, 3)]
        assert is_off or rank4 == by_rank(b)[4]
        if is_off:  # it answers another question type plainly
            assert any(sw.parse_answer(q, rank4) is not None for q in ("color", "count", "position")), rank4
    assert not any(kinds["describe"])
    for q in ("color", "count", "position"):
        rate = sum(kinds[q]) / len(kinds[q])
        assert abs(rate - 0.25) < tolerance(len(kinds[q])), f"{q}: {rate:.3f} off-topic"


def test_truth_and_near_miss_are_exchangeable(records):
    # Seeing the pair (rank 1, rank 3) without the image, neither is more likely the truth.
    for qtype in sw.QTYPES:
        subset = [r for r in records if r["category"] == qtype]
        first = sum(str(sw.parse_answer(qtype, by_rank(r)[1])) < str(sw.parse_answer(qtype, by_rank(r)[3]))
                    for r in subset)
        assert abs(first / len(subset) - 0.5) < tolerance(len(subset)) / math.sqrt(2), f"{qtype}: rank 1 sorts first in {first} of {len(subset)}"


def test_the_vocabulary_stays_small(records):
    words = set()
    for r in records:
        words.update(sw._words(r["prompt"] + " " + " ".join(r["responses"])))
    assert len(words) < 120, f"{len(words)} distinct words: {sorted(words)}"


def test_is_correct_ignores_case_and_punctuation():
    q = Question("position", "Where is the blue circle?", "top left")
    assert is_correct(q, "TOP-LEFT!!") and is_correct(q, "it's at the top, left.")


def test_is_correct_rejects_a_response_naming_two_colours():
    q = Question("color", "What color is the triangle?", "red")
    assert is_correct(q, "Red.") and not is_correct(q, "It is red, or maybe orange.")


def test_is_correct_reads_number_words_and_digits():
    q = Question("count", "How many shapes are there?", "3")
    assert is_correct(q, "There are three shapes.") and is_correct(q, "3") and not is_correct(q, "3 or 4")


def test_is_correct_needs_both_row_and_column():
    q = Question("position", "Where is the red square?", "middle center")
    assert is_correct(q, "In the middle centre.") and not is_correct(q, "In the center.")


def test_is_correct_accepts_a_description_in_any_order():
    scene = Scene([Shape("circle", "red", "large", 0, 0), Shape("square", "blue", "small", 1, 1)])
    q = Question("describe", "Describe the image.", sw.caption(scene))
    assert is_correct(q, "A small blue square in the middle center; a large red circle at the top left.")
    assert not is_correct(q, "A small blue square in the middle center.")  # one shape missing
    assert not is_correct(q, "A small blue square at the middle center and a large red circle.")  # no position


def test_make_question_answers_match_the_scene():
    rng = random.Random(4)
    for _ in range(300):
        scene = sw.make_scene(rng)
        q = sw.make_question(scene, rng)
        if q.qtype == "color":
            assert [s.color for s in scene.shapes if s.kind == q.subject] == [q.answer], (scene, q)
        elif q.qtype == "count" and q.subject == "shapes":
            assert int(q.answer) == len(scene.shapes), (scene, q)
        elif q.qtype == "position":
            cells = [sw.position_phrase((s.row, s.col)) for s in scene.shapes if f"{s.color} {s.kind}" == q.subject]
            assert cells == [q.answer], (scene, q)


def test_qa_pairs_are_all_judged_correct():
    rng = random.Random(6)
    for _ in range(100):
        scene = sw.make_scene(rng)
        for asked, (text, answer) in zip(sw.askable(scene), sw.qa_pairs(scene, rng)):
            q = sw._question(asked, rng)
            assert is_correct(q, answer), f"{text!r} -> {answer!r}, truth {q.answer!r}"


def test_train_and_heldout_share_no_image_question_pair(tmp_path):
    sw.main(["--out", str(tmp_path), "--train", "400", "--heldout", "100", "--seed", "0"])
    keys = {}
    for name in ("train", "heldout"):
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        keys[name] = [json.dumps([r["scene"], r["category"], r["subject"]], sort_keys=True)
                      for r in map(json.loads, lines)]
    assert len(keys["train"]) == 400 and len(keys["heldout"]) == 100, {k: len(v) for k, v in keys.items()}
    leaked = set(keys["train"]) & set(keys["heldout"])
    assert not leaked, f"{len(leaked)} held-out (scene, question) pairs are in train"
    assert len(set(keys["train"])) == 400, f"train repeats {400 - len(set(keys['train']))} pairs"


def test_heldout_is_the_same_whatever_the_train_mix(tmp_path):
    sw.main(["--out", str(tmp_path / "a"), "--train", "300", "--heldout", "100", "--train-mix", ""])
    sw.main(["--out", str(tmp_path / "b"), "--train", "300", "--heldout", "100", "--train-mix", "position=3"])
    held = [(tmp_path / x / "heldout.jsonl").read_text() for x in "ab"]
    assert held[0] == held[1], "the held-out file depends on the train split's mix"
    cats = [Counter(json.loads(line)["category"] for line in (tmp_path / x / "train.jsonl").read_text().splitlines())
            for x in "ab"]
    assert cats[1]["position"] > cats[0]["position"] + 40, cats


def test_split_json_says_whether_a_folder_is_the_default_split(tmp_path):
    sw.main(["--out", str(tmp_path), "--train", "30", "--heldout", "10"])
    assert not sw.is_default_split(tmp_path), "a 30 / 10 split passed for the default"
    recorded = json.loads((tmp_path / "split.json").read_text())
    assert recorded["train"] == 30 and recorded["train_mix"] == "position=2", recorded
    (tmp_path / "split.json").write_text(json.dumps({**recorded, "train": 10000, "heldout": 1000}))
    assert sw.is_default_split(tmp_path)
    (tmp_path / "split.json").unlink()  # a folder from before split.json: regenerated
    assert not sw.is_default_split(tmp_path)


def test_a_split_cut_short_is_not_taken_for_the_default(tmp_path, monkeypatch):
    # a default folder being rewritten (by a newer version, say) and stopped half way must not keep
    # the old split.json: mrrm would then train on the truncated files without a word
    sw.main(["--out", str(tmp_path), "--train", "30", "--heldout", "10"])
    recorded = json.loads((tmp_path / "split.json").read_text())
    (tmp_path / "split.json").write_text(json.dumps({**recorded, "train": 10000, "heldout": 1000}))
    assert sw.is_default_split(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sw, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sw.main(["--out", str(tmp_path)])
    assert not sw.is_default_split(tmp_path)
