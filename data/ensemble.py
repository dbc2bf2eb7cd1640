"""Turn pairwise judgments into N-way rankings: the preference-graph ensemble.

For each question, the judgments between its models' responses form a weighted preference graph:
W[i, j] = how often i beat j, a tie counting half a win each way. Four classic rankers read it:
    bradley_terry  maximum likelihood strengths (Zermelo / MM iterations, a small prior so an
                   undefeated model still has a finite strength)
    copeland       pairwise majorities won minus lost
    borda          win rate over all judgments involving the model
    pagerank       stationary mass of a walk that follows loss -> win edges
The ensemble averages their ranks, then removes cycles: starting from that order (and from each
method's order), it moves one model at a time to wherever the weight of judgments that disagree
with the order (the back edges of the preference graph) drops, until no single move helps. That
cost is what Kemeny aggregation minimises, and under independent label flips it is the negative
log-likelihood of the order, which is why it beats each single method (see NOTES_ensemble.md).

Models the judgments cannot separate share a rank instead of being ordered by name: a run of
models next to each other in the final order that every method scores the same, and whose margins
among themselves cancel (all pairs even, or only cycles such as A > B > C > A), is one tie.

From the final ranking of each question it samples K-response variants, one response from each of
K equal bins of the order, so every variant spans best to worst, and writes them in mrrm's JSONL
schema (prompt, responses, rankings 1..K with ties sharing a rank, image/video, category, id). A
variant whose K responses are all tied holds no preference and is dropped (and counted).

Run:
    python data/ensemble.py JUDGMENTS.jsonl --questions SIDE.jsonl --out OUT.jsonl --k 4 --variants 3 --seed 0
    python data/ensemble.py --report      # Kendall tau vs a known truth at 10/20/30% flips

JUDGMENTS: one line per judgment, {question_id, model_a, model_b, winner: a|b|tie, annotator?}.
SIDE: one line per question, {question_id, prompt, responses: {model: text}, image? | video?,
category?}. Per-question agreement (Kendall tau between each pair of methods, and the fraction of
non-tie judgments whose winner the final ranking puts strictly ahead) goes to OUT with
`.agreement.jsonl` in place of `.jsonl`.

Left out: annotator weighting or annotator-quality models (the `annotator` field is read but
unused), exact Kemeny (NP-hard; local search is enough at ~20 models), confidence intervals, and
sharing strength across questions.
"""

import argparse
import json
import os
import sys
import zlib
from collections import defaultdict
from itertools import combinations

import numpy as np

WINNERS = ("a", "b", "tie")


# ----------------------------------------------------------------------------- the graph

def preference_matrix(judgments, models):
    """W[i, j] = wins of models[i] over models[j]; a tie adds 0.5 each way. (n, n) float."""
    index = {m: i for i, m in enumerate(models)}
    W = np.zeros((len(models), len(models)))
    for j in judgments:
        a, b = index[j["model_a"]], index[j["model_b"]]
        if j["winner"] == "a":
            W[a, b] += 1
        elif j["winner"] == "b":
            W[b, a] += 1
        else:
            W[a, b] += 0.5
            W[b, a] += 0.5
    return W


# ----------------------------------------------------------------------------- single methods
# Each takes W and returns one score per model, higher = better.

def bradley_terry(W, prior=0.1, iters=2000, tol=1e-10):
    """log-strengths maximising prod (p_i / (p_i + p_j))^W_ij, by Zermelo's MM update (Hunter 2004).

    `prior` adds that many pseudo-wins each way to every pair: without it an undefeated model's
    strength runs off to infinity and the graph may split into parts with no common scale.
    """
    n = len(W)
    Wp = W + prior * (1 - np.eye(n))
    wins, games = Wp.sum(1), Wp + Wp.T  # (n,), (n, n)
    p = np.ones(n)
    for _ in range(iters):
        new = wins / (games / (p[:, None] + p[None, :])).sum(1)
        new /= np.exp(np.log(new).mean())  # fix the scale: strengths are defined up to a factor
        if np.abs(new - p).max() < tol:
            p = new
            break
        p = new
    return np.log(p)


def copeland(W):
    """Pairwise majorities won minus majorities lost; an even or unjudged pair counts 0."""
    return np.sign(W - W.T).sum(1)


def borda(W):
    """Win rate over every judgment the model took part in; 0.5 for a model never judged."""
    games = (W + W.T).sum(1)
    return np.where(games > 0, W.sum(1) / np.maximum(games, 1e-12), 0.5)


def pagerank(W, damping=0.85, iters=200, tol=1e-12):
    """PageRank on the loss -> win graph: each loser passes its mass to whoever beat it."""
    n = len(W)
    losses = W.sum(0)  # column j: everything j lost
    # P[i, j] = share of j's losses that went to i; a model that never lost spreads evenly.
    P = np.where(losses > 0, W / np.maximum(losses, 1e-12), 1.0 / n)
    r = np.full(n, 1.0 / n)
    for _ in range(iters):
        new = (1 - damping) / n + damping * P @ r
        if np.abs(new - r).sum() < tol:
            return new
        r = new
    return r


METHODS = {"bradley_terry": bradley_terry, "copeland": copeland, "borda": borda, "pagerank": pagerank}


# ----------------------------------------------------------------------------- ranks and orders

def scores_to_ranks(scores, rtol=1e-9):
    """Ranks 1 = best; tied scores share the mean of their positions (fractional ranks).

    Scores within rtol (relative, at least 1e-9 absolute) of the one before them in sorted order are
    tied: Bradley-Terry and PageRank are iterated sums, and two models the judgments treat alike
    can come out a few ulps apart depending on where they sit in the matrix, i.e. on their names.
    """
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores))
    start = 0
    for end in range(1, len(order) + 1):
        a = scores[order[end - 1]]
        if end == len(order) or abs(a - scores[order[end]]) > rtol * max(1.0, abs(a)):
            ranks[order[start:end]] = (start + 1 + end) / 2  # mean of positions start+1..end
            start = end
    return ranks


def order_to_ranks(order):
    """order = model indices best first -> ranks 1..n per model."""
    ranks = np.empty(len(order))
    ranks[list(order)] = np.arange(1, len(order) + 1)
    return ranks


def kendall_tau(ranks_a, ranks_b):
    """Kendall's tau-b between two rank vectors (ties allowed); 1 = same order, -1 = reversed."""
    a, b = np.asarray(ranks_a, float), np.asarray(ranks_b, float)
    sa = np.sign(a[:, None] - a[None, :])  # (n, n)
    sb = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    sa, sb = sa[iu], sb[iu]
    denom = np.sqrt((sa != 0).sum() * (sb != 0).sum())
    return float((sa * sb).sum() / denom) if denom > 0 else 0.0


def back_edge_weight(W, order):
    """Judgments that disagree with `order` (a later model beating an earlier one)."""
    o = np.asarray(order)
    return float(np.triu(W[o][:, o].T, 1).sum())


def remove_cycles(W, order):
    """Local search for a feedback-arc-set order: move single models while back-edge weight drops.

    A move takes the model at position p and reinserts it at q. Its gain is read off the margins
    D[x, y] = W[x, y] - W[y, x] between the mover and the models it jumps over, so each pass is
    O(n^2). Returns an order in which no single move (adjacent swaps included) lowers the cost.
    """
    order = list(order)
    D = W - W.T
    improved = True
    while improved:
        improved = False
        for m in list(order):
            p = order.index(m)
            rest = order[:p] + order[p + 1:]
            # Inserting m at slot q of `rest`: m goes before rest[q:], after rest[:q]. Relative
            # to slot 0, every model placed ahead of m turns (m ahead of it) into (it ahead of m),
            # which changes the cost by D[m, x] (m's wins over x become back edges, x's become
            # forward). So cost(q) - cost(0) = cumsum of D[m, rest[:q]].
            delta = np.concatenate([[0.0], np.cumsum(D[m, rest])])  # (n,)
            q = int(np.argmin(delta))
            if delta[q] < delta[p] - 1e-9:
                order = rest[:q] + [m] + rest[q:]
                improved = True
    return order


def ensemble_rank(W, methods=METHODS):
    """(final order best first, {method: ranks}) for one question's preference matrix.

    The mean of the methods' ranks gives the first order; local search from it and from each
    method's own order removes cycles, and the cheapest result wins (ties go to the mean-rank
    start, so the result does not depend on which method is listed first).
    """
    method_ranks = {name: scores_to_ranks(fn(W)) for name, fn in methods.items()}
    mean = np.mean(list(method_ranks.values()), axis=0)
    bt = method_ranks.get("bradley_terry", mean)
    starts = [np.lexsort((bt, mean))] + [np.argsort(r, kind="stable") for r in method_ranks.values()]
    best, best_cost = None, np.inf
    for start in starts:
        order = remove_cycles(W, start)
        cost = back_edge_weight(W, order)
        if cost < best_cost - 1e-9:
            best, best_cost = order, cost
    return best, method_ranks


def final_ranks(W, order, method_ranks):
    """Ranks 1 = best from the final order, equal for models the judgments cannot separate.

    Where nothing in the judgments tells two models apart, the search keeps them in index order,
    i.e. by name, and a strict rank there would be made up. Walking the order, a run of adjacent
    models with the same rank under every method is one tie when each model's wins over the rest
    of the run equal its losses to them (all pairs even, or cycles like A > B > C > A): no model
    of the run is preferred within it. A run whose margins do not cancel keeps the search's order,
    since the judgments inside it favour that order. Ranks are dense: 1, 1, 2.

    Not covered, so still strict and, among equally cheap orders, by name: models the methods
    disagree on (equal mean rank, different method ranks), and twins that a local optimum keeps
    apart across a model with a margin over both. Measured: twins ranked apart in 1 of 5,000
    random 3-8 model graphs with a twin added; 12 of 3,000 random graphs rank differently under
    shuffled names, against 143 before ties were kept.
    """
    D = W - W.T
    profile = np.stack(list(method_ranks.values()), axis=1)  # (n, methods)
    # The search may leave a model with no margin over either of two twins between them (both
    # places cost the same). So each run, starting at order[i], first pulls up every later model
    # the methods cannot tell from order[i] when only models with no margin over it lie in
    # between: a move that changes no back edge.
    order, runs, i = list(order), [], 0
    while i < len(order):
        j = i + 1  # the run is order[i:j]
        for p in range(i + 1, len(order)):
            m = order[p]
            if np.array_equal(profile[m], profile[order[i]]) and not np.any(D[m, order[j:p]]):
                order.insert(j, order.pop(p))
                j += 1
        runs.append(order[i:j])
        i = j
    ranks, rank = np.empty(len(order), dtype=int), 1
    for run in runs:
        balanced = np.abs(D[np.ix_(run, run)].sum(1)).max() < 1e-9
        for group in ([run] if balanced else [[m] for m in run]):
            ranks[group] = rank
            rank += 1
    return ranks


def judgment_agreement(judgments, models, ranks):
    """Fraction of non-tie judgments whose winner `ranks` places strictly ahead of the loser.

    Counted from the judgments themselves: W cannot give it, since a tie adds half a win each way
    and W alone cannot tell that half from real wins. A judgment between two tied models does not
    agree. A question judged only as ties has nothing to disagree with and gets 1.0.
    """
    decisive = [j for j in judgments if j["winner"] != "tie"]
    if not decisive:
        return 1.0
    W = preference_matrix(decisive, models)
    r = np.asarray(ranks)
    return float(W[r[:, None] < r[None, :]].sum() / W.sum())


# ----------------------------------------------------------------------------- variants

def sample_variants(order, k, n_variants, seed, key="", ranks=None):
    """Up to n_variants lists of (model, rank 1..k) in presentation order.

    Each variant takes one model from each of k consecutive, near-equal bins of `order` (best
    first), so its ranks spread from best to worst; the k responses are then shuffled so position
    says nothing about rank. `ranks[i]` is the rank of order[i] (ties equal; default 1..n): a
    variant's ranks are its picks' ranks made dense, so they are 1..k, distinct, unless picks are
    tied. The same (seed, key) gives the same variants; key is usually the question id (crc32,
    since Python's str hash changes per process).
    """
    if k < 2 or k > len(order):
        raise ValueError(f"k must be in 2..{len(order)} for {len(order)} ranked models, got {k}")
    rng = np.random.default_rng([seed, zlib.crc32(str(key).encode())])
    bins = np.array_split(np.arange(len(order)), k)
    space = int(np.prod([len(b) for b in bins]))
    variants, seen = [], set()
    for _ in range(10 * n_variants):  # resample duplicates, but never loop forever
        if len(variants) == min(n_variants, space):
            break
        picks = tuple(int(rng.choice(b)) for b in bins)  # positions in `order`
        if picks in seen:
            continue
        seen.add(picks)
        shown = rng.permutation(k)
        picked_ranks = [i + 1 for i in range(k)] if ranks is None else [ranks[p] for p in picks]
        dense = {r: i + 1 for i, r in enumerate(sorted(set(picked_ranks)))}
        variants.append([(order[picks[i]], dense[picked_ranks[i]]) for i in shown])
    return variants


# ----------------------------------------------------------------------------- simulation

def simulate_judgments(n_questions, n_models, n_judgments_per_question, flip, tie, seed):
    """(judgments, truth): random pairs per question from a known order, with label noise.

    Each judgment picks a pair uniformly; with probability `tie` it is a tie, otherwise the truly
    better model wins with probability 1 - flip. truth[qid] = model names, best first.
    """
    rng = np.random.default_rng(seed)
    models = [f"m{i:02d}" for i in range(n_models)]
    pairs = np.array(list(combinations(range(n_models), 2)))
    judgments, truth = [], {}
    for q in range(n_questions):
        qid = f"q{q:05d}"
        order = rng.permutation(n_models)
        truth[qid] = [models[i] for i in order]
        pos = order_to_ranks(order)
        picked = pairs[rng.integers(len(pairs), size=n_judgments_per_question)]
        swap = rng.random(n_judgments_per_question) < 0.5  # which side is shown as 'a'
        u = rng.random(n_judgments_per_question)
        for (x, y), s, r in zip(picked, swap, u):
            a, b = (y, x) if s else (x, y)
            if r < tie:
                winner = "tie"
            else:
                a_better = pos[a] < pos[b]
                winner = "a" if a_better != (r < tie + flip * (1 - tie)) else "b"
            judgments.append({"question_id": qid, "model_a": models[a], "model_b": models[b], "winner": winner})
    return judgments, truth


def tau_against_truth(judgments, truth):
    """Mean Kendall tau with the true order, per method and for the ensemble, over questions."""
    by_q = defaultdict(list)
    for j in judgments:
        by_q[j["question_id"]].append(j)
    taus = defaultdict(list)
    for qid, true_order in truth.items():
        models = sorted(true_order)
        true_ranks = order_to_ranks([models.index(m) for m in true_order])
        W = preference_matrix(by_q[qid], models)
        order, method_ranks = ensemble_rank(W)
        for name, ranks in method_ranks.items():
            taus[name].append(kendall_tau(ranks, true_ranks))
        taus["ensemble"].append(kendall_tau(final_ranks(W, order, method_ranks), true_ranks))
    return {name: float(np.mean(v)) for name, v in taus.items()}


# Design of the report and of the test: the paper's 19 models and 94K judgments in all, here as
# 100 questions x 940 judgments (each of the 171 pairs judged ~5.5 times per question).
REPORT_DESIGN = dict(n_questions=100, n_models=19, n_judgments_per_question=940)


def report(flips=(0.1, 0.2, 0.3), tie=0.1, seed=0, design=REPORT_DESIGN):
    """Markdown table: mean Kendall tau vs the truth, ensemble and each method, per flip rate."""
    names = ["ensemble", *METHODS]
    lines = [f"| flips | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for flip in flips:
        judgments, truth = simulate_judgments(**design, flip=flip, tie=tie, seed=seed)
        taus = tau_against_truth(judgments, truth)
        lines.append(f"| {flip:.0%} | " + " | ".join(f"{taus[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files

def _read_jsonl(path, required):
    # Not convert.read_records: this file stays runnable on its own, and its inputs are JSONL only.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start + 1})") from None
            except (ValueError, RecursionError) as e:
                what = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                raise ValueError(f"{path}:{line_no}: malformed JSON: {what}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, found {type(obj).__name__}")
            for key in required:
                if key not in obj:
                    raise ValueError(f"{path}:{line_no}: {key}: missing")
            yield line_no, obj


def load_judgments(path):
    """{question_id: [judgment, ...]}, every judgment checked (file:line: field: what is wrong)."""
    by_q = defaultdict(list)
    for line_no, j in _read_jsonl(path, ("question_id", "model_a", "model_b", "winner")):
        for side in ("model_a", "model_b"):
            if not isinstance(j[side], str) or not j[side]:
                raise ValueError(f"{path}:{line_no}: {side}: expected a model name, found {json.dumps(j[side])[:60]}")
        if j["winner"] not in WINNERS:
            raise ValueError(f"{path}:{line_no}: winner: expected one of a, b, tie, found {j['winner']!r}")
        if j["model_a"] == j["model_b"]:
            raise ValueError(f"{path}:{line_no}: model_b: same model as model_a ({j['model_a']!r})")
        by_q[str(j["question_id"])].append(dict(j, _line=line_no))
    return by_q


def build(judgments_path, questions_path, k, n_variants, seed):
    """(samples in mrrm's schema, per-question agreement records, counts of what was dropped)."""
    by_q = load_judgments(judgments_path)
    samples, agreement, dropped, seen = [], [], defaultdict(int), {}
    for line_no, q in _read_jsonl(questions_path, ("question_id", "prompt", "responses")):
        qid = str(q["question_id"])
        where = f"{questions_path}:{line_no}"
        if qid in seen:  # its judgments were used up by the first copy: the second would be dropped silently
            raise ValueError(f"{where}: question_id: {qid} is also on line {seen[qid]}")
        seen[qid] = line_no
        responses = q["responses"]
        if not isinstance(responses, dict) or not all(isinstance(t, str) for t in responses.values()):
            raise ValueError(f"{where}: responses: expected an object model -> text")
        if not isinstance(q["prompt"], str):
            raise ValueError(f"{where}: prompt: expected text, found {json.dumps(q['prompt'])[:60]}")
        for key in ("image", "video"):  # a path or a list of paths, as mrrm reads them
            value = q.get(key)
            if value is not None and not (isinstance(value, str) and value or isinstance(value, list) and value
                                          and all(isinstance(p, str) and p for p in value)):
                raise ValueError(f"{where}: {key}: expected a path or a list of paths, found {json.dumps(value)[:60]}")
        judged = by_q.pop(qid, [])
        for j in judged:
            for side in ("model_a", "model_b"):
                if j[side] not in responses:
                    raise ValueError(f"{judgments_path}:{j['_line']}: {side}: {j[side]!r} has no response "
                                     f"for question {qid} in {questions_path}:{line_no}")
        models = sorted({j[s] for j in judged for s in ("model_a", "model_b")})
        dropped["unjudged responses"] += len(responses) - len(models)
        if len(models) < k:
            dropped["questions with fewer than k judged models"] += 1
            continue
        W = preference_matrix(judged, models)
        order, method_ranks = ensemble_rank(W)
        final = final_ranks(W, order, method_ranks)
        agreement.append({
            "question_id": qid, "n_judgments": len(judged),
            "judgments_agree": judgment_agreement(judged, models, final),
            "tau": {f"{a}~{b}": kendall_tau(method_ranks[a], method_ranks[b])
                    for a, b in combinations(method_ranks, 2)}
            | {f"{a}~ensemble": kendall_tau(method_ranks[a], final) for a in method_ranks}})
        variants = sample_variants([models[i] for i in order], k, n_variants, seed, qid, ranks=final[order])
        for v, variant in enumerate(variants):
            if len({r for _, r in variant}) == 1:
                dropped["variants with every response tied"] += 1
                continue
            sample = {"prompt": q["prompt"], "responses": [responses[m] for m, _ in variant],
                      "rankings": [r for _, r in variant], "id": f"{qid}-{v}"}
            sample.update({key: q[key] for key in ("image", "video", "category") if q.get(key) is not None})
            samples.append(sample)
    dropped["questions judged but missing from the side file"] = len(by_q)
    return samples, agreement, dict(dropped)


def rebase(paths, src, dst):
    """A path (or list of paths) relative to folder src, made relative to folder dst; absolute ones stay."""
    if isinstance(paths, list):
        return [rebase(p, src, dst) for p in paths]
    if not isinstance(paths, str) or os.path.isabs(paths):
        return paths
    return os.path.relpath(os.path.join(src, paths), dst)


def write_atomic(files):
    """{path: lines} written to temporary names, then renamed in order; nothing is replaced if a write fails."""
    tmps = {path: os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
            for path in files}
    try:
        for path, lines in files.items():
            if os.path.isdir(path):
                raise IsADirectoryError(f"{path}: is a folder; give a file name")
            with open(tmps[path], "w", encoding="utf-8") as f:
                f.writelines(lines)
        for path in files:
            os.replace(tmps[path], path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("judgments", nargs="?", help="JSONL of pairwise judgments")
    parser.add_argument("--questions", help="JSONL side file: prompt, responses {model: text}, image/video")
    parser.add_argument("--out", help="mrrm JSONL to write")
    parser.add_argument("--k", type=int, default=4, help="responses per sample")
    parser.add_argument("--variants", type=int, default=1, help="K-response samples drawn per question")
    parser.add_argument("--seed", type=int, default=0, help="seed of the variant sampling")
    parser.add_argument("--report", action="store_true", help="print tau vs truth on simulated judgments")
    args = parser.parse_args(argv)

    if args.report:
        print(report())
        return 0
    if not (args.judgments and args.questions and args.out):
        parser.error("JUDGMENTS, --questions and --out are needed (or --report)")
    agreement_path = args.out.removesuffix(".jsonl") + ".agreement.jsonl"
    try:
        samples, agreement, dropped = build(args.judgments, args.questions, args.k, args.variants, args.seed)
        # media paths are relative to the file that holds them: from the side file's folder to OUT's
        src, dst = os.path.dirname(os.path.abspath(args.questions)), os.path.dirname(os.path.abspath(args.out))
        for s in samples:
            for key in ("image", "video"):
                if key in s:
                    s[key] = rebase(s[key], src, dst)
        os.makedirs(dst, exist_ok=True)
        # both files under temporary names first: a failure leaves the previous pair as it was
        write_atomic({agreement_path: [json.dumps(a) + "\n" for a in agreement],
                      args.out: [json.dumps(s, ensure_ascii=False) + "\n" for s in samples]})
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mean_agree = np.mean([a["judgments_agree"] for a in agreement]) if agreement else float("nan")
    print(f"questions {len(agreement)} | samples {len(samples)} | judgments_agree {mean_agree:.3f} | "
          + " | ".join(f"dropped {k} {v}" for k, v in dropped.items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
