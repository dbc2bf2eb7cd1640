"""Tests of data/ensemble.py: the rankers, cycle removal, variants, and recovery of a known order."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import convert, ensemble  # noqa: E402


def round_robin(n, noise_free_order):
    """W of a full round robin, one judgment per pair, the earlier model in the order winning."""
    W = np.zeros((n, n))
    for i, a in enumerate(noise_free_order):
        for b in noise_free_order[i + 1:]:
            W[a, b] = 1
    return W


def cost_of_best_single_move(W, order):
    best = ensemble.back_edge_weight(W, order)
    for p in range(len(order)):
        rest = order[:p] + order[p + 1:]
        for q in range(len(order)):
            best = min(best, ensemble.back_edge_weight(W, rest[:q] + [order[p]] + rest[q:]))
    return best


# ----------------------------------------------------------------------------- single methods

@pytest.mark.parametrize("method", list(ensemble.METHODS))
def test_every_method_recovers_a_noiseless_round_robin(method):
    truth = [3, 0, 4, 1, 2]
    ranks = ensemble.scores_to_ranks(ensemble.METHODS[method](round_robin(5, truth)))
    assert list(np.argsort(ranks)) == truth, f"{method} ranks {ranks}, true order {truth}"


def test_bradley_terry_gives_an_undefeated_model_a_finite_top_strength():
    W = np.array([[0, 3, 2], [0, 0, 1], [0, 1, 0.0]])
    s = ensemble.bradley_terry(W)
    assert np.all(np.isfinite(s)) and s[0] == s.max(), f"strengths {s}"


def test_ties_count_half_a_win_each_way():
    W = ensemble.preference_matrix([{"model_a": "x", "model_b": "y", "winner": "tie"},
                                    {"model_a": "y", "model_b": "x", "winner": "a"}], ["x", "y"])
    assert W.tolist() == [[0, 0.5], [1.5, 0]], W.tolist()


def judgment(a, b, winner, qid="q"):
    return {"question_id": qid, "model_a": a, "model_b": b, "winner": winner}


def test_judgment_agreement_is_the_share_of_non_tie_judgments_the_ranking_follows():
    # A beat B 3 times, B beat A once, and 2 ties: the order A > B follows 3 of the 4 decisive ones.
    judged = [judgment("A", "B", "a")] * 3 + [judgment("A", "B", "b")] + [judgment("B", "A", "tie")] * 2
    W = ensemble.preference_matrix(judged, ["A", "B"])
    order, method_ranks = ensemble.ensemble_rank(W)
    ranks = ensemble.final_ranks(W, order, method_ranks)
    got = ensemble.judgment_agreement(judged, ["A", "B"], ranks)
    assert list(ranks) == [1, 2] and got == pytest.approx(0.75), f"ranks {list(ranks)}, agreement {got}, expected 0.75"


def test_bradley_terry_ranks_models_judged_alike_equal_wherever_they_sit():
    # models 1 and 3 each beat 0 twice and 2 once, and 2 beat 0: the same strength, which the MM
    # iterations used to return a few ulps apart (ranks 1 and 2, by index)
    W = np.zeros((4, 4))
    W[1, 0] = W[3, 0] = 2
    W[1, 2] = W[3, 2] = W[2, 0] = 1
    ranks = ensemble.scores_to_ranks(ensemble.bradley_terry(W))
    assert ranks[1] == ranks[3] == 1.5, f"ranks {ranks}, scores {ensemble.bradley_terry(W)}"


def wins(*pairs, winner="a", qid="q"):
    """One judgment per "xy" pair (model x against model y), each won by `winner`."""
    return [judgment(p[0], p[1], winner, qid) for p in pairs]


@pytest.mark.parametrize("case,judged,expected", [
    ("all ties", wins("ab", "ac", "bc", "ad", "bd", "cd", winner="tie"), {"a": 1, "b": 1, "c": 1, "d": 1}),
    ("a three-cycle under a clear winner", wins("ab", "bc", "ca", "da", "db", "dc"), {"d": 1, "a": 2, "b": 2, "c": 2}),
    ("twins", wins("ax", "bx", "xc") + wins("ab", winner="tie"), {"a": 1, "b": 1, "x": 2, "c": 3}),
    ("a clear order", wins("ab", "bc", "ac"), {"a": 1, "b": 2, "c": 3}),
])
def test_models_the_judgments_cannot_separate_share_a_rank(case, judged, expected):
    models = sorted(expected)
    W = ensemble.preference_matrix(judged, models)
    order, method_ranks = ensemble.ensemble_rank(W)
    got = dict(zip(models, ensemble.final_ranks(W, order, method_ranks).tolist()))
    assert got == expected, f"{case}: ranks {got}, expected {expected}"


def test_a_model_and_its_exact_twin_share_a_rank_whatever_their_names():
    # Random judgments plus a twin of one model (the same wins and losses against everyone, even
    # between the two), under shuffled names: ordering the twins would mean ordering by name.
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(2, 7))
        W = np.zeros((n + 1, n + 1))
        W[:n, :n] = rng.poisson(0.6, (n, n)) * (1 - np.eye(n))
        k = int(rng.integers(n))
        W[n, :n], W[:n, n] = W[k, :n], W[:n, k]
        W[n, k] = W[k, n] = rng.choice([0, 0.5, 1])
        P = rng.permutation(n + 1)  # shuffled names: new index i is old model P[i]
        shuffled = W[np.ix_(P, P)]
        ranks = np.empty(n + 1, dtype=int)
        ranks[P] = ensemble.final_ranks(shuffled, *ensemble.ensemble_rank(shuffled))
        assert ranks[k] == ranks[n], f"trial {trial}: twins {k} and {n} ranked {ranks[k]} and {ranks[n]}; ranks {ranks}"


def test_kendall_tau_is_one_for_equal_and_minus_one_for_reversed_ranks():
    r = [1, 2, 3, 4]
    got = (ensemble.kendall_tau(r, r), ensemble.kendall_tau(r, r[::-1]), ensemble.kendall_tau(r, [2, 1, 3, 4]))
    assert got == pytest.approx((1.0, -1.0, 4 / 6)), got


# ----------------------------------------------------------------------------- cycles

def test_remove_cycles_breaks_a_three_cycle_at_its_weakest_edge():
    W = np.zeros((3, 3))
    W[0, 1], W[1, 2], W[2, 0] = 5, 4, 1  # 0 > 1 > 2 > 0, the last edge weakest
    order = ensemble.remove_cycles(W, [2, 1, 0])
    assert order == [0, 1, 2], f"order {order}, cost {ensemble.back_edge_weight(W, order)}; expected [0, 1, 2] cost 1"


def test_remove_cycles_leaves_no_single_move_that_lowers_back_edges():
    rng = np.random.default_rng(3)
    for trial in range(20):
        W = rng.poisson(1.0, (8, 8)) * (1 - np.eye(8))
        order = ensemble.remove_cycles(W, list(rng.permutation(8)))
        cost = ensemble.back_edge_weight(W, order)
        assert cost_of_best_single_move(W, order) == cost, f"trial {trial}: a move beats cost {cost}"


def test_ensemble_order_never_has_more_back_edges_than_any_single_method():
    rng = np.random.default_rng(5)
    for trial in range(20):
        W = rng.poisson(2.0, (9, 9)) * (1 - np.eye(9))
        order, method_ranks = ensemble.ensemble_rank(W)
        cost = ensemble.back_edge_weight(W, order)
        for name, ranks in method_ranks.items():
            single = ensemble.back_edge_weight(W, list(np.argsort(ranks, kind="stable")))
            assert cost <= single, f"trial {trial}: ensemble cost {cost} > {name} cost {single}"


# ----------------------------------------------------------------------------- recovery of the truth

def test_ensemble_recovers_the_true_order_better_than_every_single_method():
    # The paper's 19 models, 94K judgments overall; 20% of non-tie judgments flipped, 10% ties.
    judgments, truth = ensemble.simulate_judgments(**ensemble.REPORT_DESIGN, flip=0.2, tie=0.1, seed=0)
    assert len(judgments) == 94_000 and len(next(iter(truth.values()))) == 19
    taus = ensemble.tau_against_truth(judgments, truth)
    assert taus["ensemble"] >= 0.9, f"ensemble tau {taus['ensemble']:.4f} < 0.9; all: {taus}"
    for name in ensemble.METHODS:
        assert taus["ensemble"] >= taus[name], f"ensemble {taus['ensemble']:.4f} < {name} {taus[name]:.4f}"


def test_simulated_judgments_flip_and_tie_at_the_requested_rates():
    judgments, truth = ensemble.simulate_judgments(20, 19, 1000, flip=0.2, tie=0.1, seed=1)
    ties = sum(j["winner"] == "tie" for j in judgments) / len(judgments)
    wrong = [truth[j["question_id"]].index(j["model_" + j["winner"]]) >
             truth[j["question_id"]].index(j["model_" + ("b" if j["winner"] == "a" else "a")])
             for j in judgments if j["winner"] != "tie"]
    assert abs(ties - 0.1) < 0.01 and abs(np.mean(wrong) - 0.2) < 0.01, f"ties {ties:.3f}, flips {np.mean(wrong):.3f}"


# ----------------------------------------------------------------------------- variants

def test_sample_variants_gives_k_distinct_ranks_one_from_each_bin():
    order = [f"m{i:02d}" for i in range(19)]
    for variant in ensemble.sample_variants(order, 4, 5, seed=0, key="q1"):
        assert sorted(r for _, r in variant) == [1, 2, 3, 4], variant
        positions = [order.index(m) for m, _ in sorted(variant, key=lambda x: x[1])]
        bins = [p * 4 // 19 for p in positions]  # array_split bins of 19 into 5, 5, 5, 4
        assert positions == sorted(positions) and len(set(bins)) == 4, f"positions {positions}"


def test_sample_variants_is_deterministic_per_seed():
    order = list(range(19))
    a = ensemble.sample_variants(order, 4, 3, seed=7, key="q1")
    b = ensemble.sample_variants(order, 4, 3, seed=7, key="q1")
    c = ensemble.sample_variants(order, 4, 3, seed=8, key="q1")
    assert a == b and a != c, f"seed 7 twice: {a} / {b}; seed 8: {c}"


# ----------------------------------------------------------------------------- files

def write_inputs(tmp_path, n_questions=3):
    judgments, truth = ensemble.simulate_judgments(n_questions, 6, 60, flip=0.1, tie=0.1, seed=2)
    jpath, qpath = tmp_path / "judgments.jsonl", tmp_path / "questions.jsonl"
    jpath.write_text("".join(json.dumps(dict(j, annotator="h1")) + "\n" for j in judgments))
    qpath.write_text("".join(json.dumps({"question_id": q, "prompt": f"prompt {q}", "video": f"v/{q}.mp4",
                                         "category": "sports", "responses": {m: f"{m} says" for m in order}}) + "\n"
                             for q, order in truth.items()))
    return jpath, qpath, truth


def test_command_line_writes_valid_mrrm_samples_and_agreement(tmp_path, capsys):
    jpath, qpath, truth = write_inputs(tmp_path)
    out = tmp_path / "out.jsonl"
    rc = ensemble.main([str(jpath), "--questions", str(qpath), "--out", str(out), "--k", "4", "--variants", "2"])
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0 and len(samples) == 6, f"rc {rc}, {len(samples)} samples, expected 6"
    problems = [p for i, s in enumerate(samples) for p in convert.validate_sample(s, f"out:{i + 1}")]
    assert problems == [], problems
    assert samples[0]["id"] == "q00000-0" and samples[0]["video"] == "v/q00000.mp4"
    agreement = [json.loads(line) for line in (tmp_path / "out.agreement.jsonl").read_text().splitlines()]
    assert len(agreement) == 3 and all(0.5 < a["judgments_agree"] <= 1 for a in agreement), agreement
    assert capsys.readouterr().out.startswith("questions 3 | samples 6 |")


def test_build_gives_tied_models_one_rank_and_drops_variants_that_are_all_tied(tmp_path):
    # "twins": 1 beats everyone; 2 and 3 tie and beat 4 and 5 alike; 4 beats 5. "flat": 1-4 all tie.
    judged = wins("12", "13", "14", "15", "24", "25", "34", "35", "45", qid="twins")
    judged += wins("23", winner="tie", qid="twins")
    judged += wins("12", "13", "23", "14", "24", "34", winner="tie", qid="flat")
    jpath, qpath = tmp_path / "j.jsonl", tmp_path / "q.jsonl"
    jpath.write_text("".join(json.dumps(dict(j, model_a=f"m{j['model_a']}", model_b=f"m{j['model_b']}")) + "\n"
                             for j in judged))
    responses = {f"m{i}": f"m{i}" for i in range(1, 6)}
    qpath.write_text("".join(json.dumps({"question_id": q, "prompt": "p", "responses": responses}) + "\n"
                             for q in ("twins", "flat")))
    samples, agreement, dropped = ensemble.build(jpath, qpath, k=4, n_variants=4, seed=0)
    ranks = [dict(zip(s["responses"], s["rankings"])) for s in samples]
    both = [r for r in ranks if "m2" in r and "m3" in r]
    # 5 models in 4 bins ([m1, m2], [m3], [m4], [m5] by position) allow only 2 distinct variants
    assert [s["id"] for s in samples] == ["twins-0", "twins-1"], [s["id"] for s in samples]
    assert both and all(r["m2"] == r["m3"] for r in both), f"m2 and m3 ranked apart: {both}"
    assert all(sorted(r.values()) == [1, 2, 3, 4] for r in ranks if r not in both), ranks
    assert dropped["variants with every response tied"] == 1, dropped
    assert [a["judgments_agree"] for a in agreement] == [1.0, 1.0], agreement


def test_a_bad_winner_is_reported_with_file_line_and_field(tmp_path):
    jpath, qpath, _ = write_inputs(tmp_path)
    lines = jpath.read_text().splitlines()
    lines[4] = json.dumps(dict(json.loads(lines[4]), winner="A"))
    jpath.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        ensemble.build(jpath, qpath, 4, 1, 0)
    assert str(e.value) == f"{jpath}:5: winner: expected one of a, b, tie, found 'A'", str(e.value)


def test_a_judged_model_without_a_response_is_reported(tmp_path):
    jpath, qpath, _ = write_inputs(tmp_path, n_questions=1)
    q = json.loads(qpath.read_text())
    del q["responses"]["m03"]
    qpath.write_text(json.dumps(q) + "\n")
    with pytest.raises(ValueError, match=r"judgments.jsonl:\d+: model_[ab]: 'm03' has no response"):
        ensemble.build(jpath, qpath, 4, 1, 0)


def test_media_paths_still_point_at_the_files_when_out_is_in_another_folder(tmp_path):
    # mrrm reads a relative path from the folder of the file holding it: the side file's folder here,
    # OUT's there; the output folder is made if missing
    jpath, qpath, truth = write_inputs(tmp_path)
    out = tmp_path / "new" / "deeper" / "out.jsonl"
    assert ensemble.main([str(jpath), "--questions", str(qpath), "--out", str(out), "--k", "4"]) == 0
    video = json.loads(out.read_text().splitlines()[0])["video"]
    assert not os.path.isabs(video) and os.path.normpath(out.parent / video) == str(tmp_path / "v" / "q00000.mp4")


@pytest.mark.parametrize("edit, said", [
    (lambda j, q: (j[:4] + [dict(j[4], model_a=["m1"])] + j[5:], q), r"judgments.jsonl:5: model_a: expected a model name"),
    (lambda j, q: (j, q + [q[0]]), r"questions.jsonl:4: question_id: q00000 is also on line 1"),
    (lambda j, q: (j, [dict(q[0], prompt=None)] + q[1:]), r"questions.jsonl:1: prompt: expected text"),
    (lambda j, q: (j, [dict(q[0], video=5)] + q[1:]), r"questions.jsonl:1: video: expected a path"),
    (lambda j, q: (j, [dict(q[0], responses={"m00": 7})] + q[1:]), r"questions.jsonl:1: responses: expected an object"),
])
def test_malformed_judgments_and_questions_are_named_not_crashes_or_silent_drops(tmp_path, edit, said):
    # a list as a model name was a TypeError; a repeated question dropped silently; a null prompt or a
    # number as a video path was written into samples mrrm then refused
    jpath, qpath, _ = write_inputs(tmp_path)
    j, q = edit([json.loads(l) for l in jpath.read_text().splitlines()],
                [json.loads(l) for l in qpath.read_text().splitlines()])
    jpath.write_text("".join(json.dumps(x) + "\n" for x in j))
    qpath.write_text("".join(json.dumps(x) + "\n" for x in q))
    with pytest.raises(ValueError, match=said):
        ensemble.build(jpath, qpath, 4, 1, 0)


def test_a_non_utf8_line_is_named_and_an_unwritable_out_replaces_nothing(tmp_path, capsys):
    jpath, qpath, _ = write_inputs(tmp_path)
    out = tmp_path / "out.jsonl"
    assert ensemble.main([str(jpath), "--questions", str(qpath), "--out", str(out)]) == 0
    before = out.read_bytes()
    # the agreement file's path is a folder: neither file may change, and the error is one line
    (tmp_path / "out.agreement.jsonl").unlink()
    (tmp_path / "out.agreement.jsonl").mkdir()
    capsys.readouterr()
    assert ensemble.main([str(jpath), "--questions", str(qpath), "--out", str(out), "--k", "3"]) == 1
    err = capsys.readouterr().err
    assert "out.agreement.jsonl: is a folder" in err and err.count("\n") == 1, err
    assert out.read_bytes() == before and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    jpath.write_bytes(jpath.read_bytes() + b'{"question_id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"judgments.jsonl:\d+: not UTF-8 text"):
        ensemble.build(jpath, qpath, 4, 1, 0)
