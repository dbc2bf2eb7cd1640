"""The multi-response scorer: packing, the two attention modes, the value head, the losses."""

import math
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import lora
import mrrm
import vlm

WORDS = "the red blue green circle square triangle is at left right top one two three it looks".split()


def image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


MEDIA = {
    "none": dict(),
    "one-image": dict(images=[image(45, 70, 1)]),
    "two-images": dict(images=[image(64, 40, 2), image(33, 33, 3)]),
    "video": dict(videos=[[image(40, 40, i) for i in range(4)]]),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = str(tmp_path_factory.mktemp("tiny"))
    vlm.write_tiny_checkpoint(f, min_pixels=32 * 32, max_pixels=64 * 64)
    return f


def make_rm(folder, with_lora=False, seed=0):
    rm = mrrm.RewardModel.load(folder)
    torch.manual_seed(seed)
    with torch.no_grad():  # a head with visible output scale, so 1e-5 differences mean something
        rm.head.fc2.weight.normal_(0, 0.05)  # scores of order 1
    if with_lora:
        lora.inject_lora(rm.backbone, r=4, alpha=8)
        with torch.no_grad():
            for name, p in rm.backbone.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    return rm.eval()


@pytest.fixture(scope="module")
def rm(folder):
    return make_rm(folder)


def random_responses(n, rng):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) for _ in range(n)]


def single_pass_scores(rm, prompt, responses, media):
    """The oracle: one ordinary forward per response (prompt + response + separator)."""
    return [rm.score(prompt=prompt, responses=[r], mode="joint", **media)[0] for r in responses]


@pytest.mark.parametrize("media", list(MEDIA))
def test_independent_mode_equals_separate_passes_for_n_1_to_8(rm, media):
    rng = random.Random(hash(media) % 1000)
    for n in range(1, 9):
        responses = random_responses(n, rng)
        packed = rm.score(prompt="What is shown?", responses=responses, mode="independent", **MEDIA[media])
        single = single_pass_scores(rm, "What is shown?", responses, MEDIA[media])
        diff = np.abs(np.array(packed) - np.array(single)).max()
        assert diff <= 1e-5, f"{media} N={n}: packed vs single max-abs-diff {diff:.2e}"
    assert np.std(single) > 1e-3, "scores should differ between responses"


def test_independent_mode_equals_separate_passes_with_lora(folder):
    rm = make_rm(folder, with_lora=True)
    responses = random_responses(5, random.Random(7))
    packed = rm.score(prompt="Describe.", responses=responses, mode="independent", **MEDIA["one-image"])
    single = single_pass_scores(rm, "Describe.", responses, MEDIA["one-image"])
    with lora.adapter_disabled(rm.backbone):
        base = rm.score(prompt="Describe.", responses=responses, mode="independent", **MEDIA["one-image"])
    assert np.abs(np.array(packed) - np.array(single)).max() <= 1e-5
    assert np.abs(np.array(packed) - np.array(base)).max() > 1e-4, "the adapter should change the scores"


def test_padded_batch_of_different_n_and_lengths_equals_single_samples(rm):
    rng = random.Random(3)
    samples = [("Where is it?", random_responses(n, rng), MEDIA[m]) for n, m in [(3, "one-image"), (6, "none"), (1, "two-images")]]
    for mode in mrrm.MODES:
        packs = [rm.encode(p, r, mode=mode, **m) for p, r, m in samples]
        with torch.no_grad():
            batched = rm(mrrm.collate(packs, mode))
        for b, (p, r, m) in enumerate(samples):
            alone = rm.score(prompt=p, responses=r, mode=mode, **m)
            diff = (batched[b, :len(r)] - torch.tensor(alone)).abs().max().item()
            assert diff <= 1e-5, f"{mode} sample {b}: batched vs alone {diff:.2e}"


def test_samples_sharing_a_row_score_as_they_do_alone(rm):
    # several packs in one row (place(), block-diagonal mask): the media of every pack, a video
    # included, must reach its own pad tokens, and no pack may see another
    rng = random.Random(5)
    media = ["one-image", "none", "video", "two-images", "one-image", "none", "video"]
    samples = [(f"Question {i}?", random_responses(rng.randint(1, 5), rng), MEDIA[m]) for i, m in enumerate(media)]
    for mode in mrrm.MODES:
        packs = [rm.encode(p, r, mode=mode, **m) for p, r, m in samples]
        lengths = [len(p.input_ids) for p in packs]
        budget = 2 * max(lengths)
        rows = mrrm.place(lengths, budget)
        assert len(rows) < len(packs) and sorted(i for r in rows for i in r) == list(range(len(packs)))
        assert all(sum(lengths[i] for i in r) <= budget for r in rows)
        with torch.no_grad():
            shared = rm(mrrm.collate(packs, mode, row_tokens=budget))
            alone = rm(mrrm.collate(packs, mode))
        valid = mrrm.collate(packs, mode).score_valid
        diff = (shared - alone)[valid].abs().max().item()
        assert diff <= 1e-5, f"{mode}: shared rows vs one pack per row {diff:.2e}"


def test_joint_score_ignores_later_responses_and_depends_on_earlier_ones(rm):
    responses = ["the red circle", "it looks blue", "two squares at the top", "green"]
    base = rm.score(prompt="What?", responses=responses, mode="joint", **MEDIA["one-image"])
    later = rm.score(prompt="What?", responses=responses[:2] + ["one triangle left", "right"], mode="joint", **MEDIA["one-image"])
    earlier = rm.score(prompt="What?", responses=["blue blue blue"] + responses[1:], mode="joint", **MEDIA["one-image"])
    assert np.allclose(base[:2], later[:2], atol=1e-6, rtol=0), (base, later)
    assert all(abs(a - b) > 1e-5 for a, b in zip(base[1:], earlier[1:])), (base, earlier)


def test_joint_score_equals_single_pass_over_prefix(rm):
    responses = random_responses(4, random.Random(11))
    packed = rm.score(prompt="Count them.", responses=responses, mode="joint", **MEDIA["two-images"])
    for i in range(4):
        prefix = rm.score(prompt="Count them.", responses=responses[:i + 1], mode="joint", **MEDIA["two-images"])[-1]
        assert abs(prefix - packed[i]) <= 1e-5, f"response {i}: {prefix} vs {packed[i]}"


def test_independent_positions_restart_after_the_prompt(rm):
    p = rm.encode("Q", ["a b", "c", "d e f"], mode="independent")
    starts = [int(p.position_ids[0][p.segment == r].min()) for r in (1, 2, 3)]
    assert starts[0] == starts[1] == starts[2] == int(p.position_ids[:, p.segment == 0].max()) + 1
    j = rm.encode("Q", ["a b", "c", "d e f"], mode="joint")
    assert torch.equal(j.position_ids[0], torch.arange(len(j.input_ids)))


def test_separators_close_every_response_including_empty_ones(rm):
    p = rm.encode("Q", ["", "red", ""], mode="joint")
    assert (p.input_ids[p.sep_index] == rm.sep_id).all()
    assert p.sep_index[0] + 1 < p.sep_index[1] and p.sep_index[2] == p.sep_index[1] + 1
    assert len(rm.score(prompt="Q", responses=["", "red", ""])) == 3


def test_overlong_pack_shortens_longest_responses_and_keeps_scores_aligned(folder):
    rm = make_rm(folder)
    responses = ["red " * 40, "blue", "green " * 10]
    p_full = rm.encode("Q", responses, mode="independent")
    rm.max_len = len(p_full.input_ids) - 30
    with pytest.warns(UserWarning, match="exceeds max_len"):
        p = rm.encode("Q", responses, mode="independent")
    assert p.truncated and len(p.input_ids) <= rm.max_len and len(p.sep_index) == 3
    assert (p.input_ids[p.sep_index] == rm.sep_id).all()
    short = [int((p.segment == r).sum()) - 1 for r in (1, 2, 3)]
    full = [int((p_full.segment == r).sum()) - 1 for r in (1, 2, 3)]
    assert short[1] == full[1] and short[2] == full[2] and short[0] == full[0] - 30, (short, full)
    with warnings.catch_warnings():  # the short response's score is exactly its untruncated score
        warnings.simplefilter("ignore")
        scores = rm.score(prompt="Q", responses=responses, mode="independent")
    rm.max_len = 4096
    assert abs(scores[1] - rm.score(prompt="Q", responses=["blue"])[0]) <= 1e-5


def test_fit_lengths_cuts_longest_first():
    assert mrrm.fit_lengths([10, 3, 7], 14) == [6, 3, 5]  # cap 5 fits 13; the spare token goes to the longest
    assert mrrm.fit_lengths([5, 5], 20) == [5, 5]
    assert mrrm.fit_lengths([9, 1], 2) == [1, 1]
    # equal lengths are cut alike wherever they stand (the spare token went to the first listed)
    assert mrrm.fit_lengths([6, 6], 11) == [5, 5] and mrrm.fit_lengths([6, 6, 3], 15) == [6, 6, 3]
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = [int(n) for n in rng.integers(0, 9, int(rng.integers(1, 6)))]
        budget = int(rng.integers(0, sum(lengths) + 2))
        out = mrrm.fit_lengths(lengths, budget)
        assert sum(out) <= budget
        perm = rng.permutation(len(lengths))
        assert [out[i] for i in perm] == mrrm.fit_lengths([lengths[i] for i in perm], budget), (lengths, budget)
        # longest first: a longer response never keeps fewer tokens than a shorter one
        assert all(out[i] >= out[j] for i in range(len(out)) for j in range(len(out)) if lengths[i] > lengths[j])


def test_independent_scores_do_not_depend_on_the_order_when_responses_are_cut(rm):
    rm.max_len = len(rm.encode("Q", ["red blue", "red blue"]).input_ids) - 1  # one token short
    try:
        ab = rm.score(prompt="Q", responses=["red blue", "red blue"], mode="independent")
    finally:
        rm.max_len = 4096
    assert abs(ab[0] - ab[1]) <= 1e-5, f"the same response, cut to fit, scored {ab} by where it stands"


def test_too_many_responses_and_hopeless_packs_are_clear_errors(rm):
    with pytest.raises(ValueError, match="17 responses, more than max_responses=16"):
        rm.encode("Q", ["x"] * 17)
    rm.max_len = 5
    try:
        with pytest.raises(ValueError, match=r"prompt \(\d+ tokens\) plus 3 separators exceed max_len=5"):
            rm.encode("Q", ["a", "b", "c"])
    finally:
        rm.max_len = 4096


def test_only_lora_and_head_parameters_get_gradients(folder):
    rm = make_rm(folder, with_lora=True)
    rm.train()
    p = rm.encode("Q", ["red", "blue", "green"], mode="joint", **MEDIA["one-image"])
    scores = rm(mrrm.collate([p], "joint"))
    loss, _ = mrrm.listwise_ce_loss(scores, torch.tensor([[2, 1, 3]]), torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    with_grad = {n for n, p in rm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in n or n.startswith("head.") for n in with_grad), sorted(with_grad)[:5]
    assert any(n.startswith("head.") for n in with_grad) and any("lora_A" in n for n in with_grad)


# --- losses ------------------------------------------------------------------------------------


def test_for_two_responses_ce_and_plackett_luce_equal_bradley_terry():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 2, generator=g) * 3
    ranks = torch.stack([torch.randperm(2, generator=g) + 1 for _ in range(64)])
    valid = torch.ones(64, 2, dtype=torch.bool)
    best = ranks.argmin(-1)
    bt = -F_logsigmoid(s.gather(1, best[:, None])[:, 0] - s.gather(1, (1 - best)[:, None])[:, 0]).mean()
    ce, _ = mrrm.listwise_ce_loss(s, ranks, valid)
    pl, _ = mrrm.plackett_luce_loss(s, ranks, valid)
    assert abs(ce.item() - bt.item()) < 1e-6 and abs(pl.item() - bt.item()) < 1e-6, (ce, pl, bt)


def F_logsigmoid(x):
    return torch.nn.functional.logsigmoid(x)


def test_ties_for_best_give_a_uniform_soft_target():
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    ranks = torch.tensor([[1, 1, 2, 3]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    loss, m = mrrm.listwise_ce_loss(s, ranks, valid)
    logp = s.log_softmax(-1)[0]
    assert abs(loss.item() + 0.5 * (logp[0] + logp[1]).item()) < 1e-6
    assert m["acc"] == 1.0  # the top score (index 1) is tied for best: correct


def test_plackett_luce_matches_hand_computed_likelihood_with_tied_responses_picked_together():
    s = torch.tensor([[0.3, -0.2, 1.1, 0.0]])
    ranks = torch.tensor([[2, 1, 2, 3]])  # 1 first; then 0 and 2 tied, each against {0, 2, 3}; then 3
    valid = torch.ones(1, 4, dtype=torch.bool)
    x = s[0]
    lse = lambda idx: torch.logsumexp(x[idx], 0).item()
    want = (lse([1, 0, 2, 3]) - x[1].item()) + (lse([0, 2, 3]) - x[0].item()) + (lse([0, 2, 3]) - x[2].item()) \
        + (lse([3]) - x[3].item())
    loss, _ = mrrm.plackett_luce_loss(s, ranks, valid)
    assert abs(loss.item() - want) < 1e-5, (loss.item(), want)


def test_plackett_luce_ignores_the_order_ties_are_listed_in_and_wants_equal_scores_for_a_full_tie():
    s = torch.tensor([[0.3, -0.2, 1.1, 0.0]], requires_grad=True)
    valid = torch.ones(1, 4, dtype=torch.bool)
    a, _ = mrrm.plackett_luce_loss(s, torch.tensor([[2, 1, 2, 3]]), valid)
    b, _ = mrrm.plackett_luce_loss(s[:, [2, 1, 0, 3]], torch.tensor([[2, 1, 2, 3]]), valid)
    assert abs(a.item() - b.item()) < 1e-6, (a.item(), b.item())
    tied = torch.zeros(1, 4, requires_grad=True)
    loss, _ = mrrm.plackett_luce_loss(tied, torch.ones(1, 4, dtype=torch.long), valid)
    (g,) = torch.autograd.grad(loss, tied)
    assert g.abs().max().item() < 1e-6 and abs(loss.item() - 4 * math.log(4)) < 1e-5, (g, loss.item())


def test_ce_plus_pl_is_plackett_luce_with_the_best_pick_weighted_three_times():
    s = torch.tensor([[0.3, -0.2, 1.1, 0.0]])
    ranks = torch.tensor([[3, 1, 2, 4]])  # best first: 1, 2, 0, 3
    x, order = s[0], [1, 2, 0, 3]
    picks = [torch.logsumexp(x[order[k:]], 0).item() - x[i].item() for k, i in enumerate(order)]
    loss, m = mrrm.ce_pl_loss(s, ranks, torch.ones(1, 4, dtype=torch.bool), pl_weight=0.5)
    assert abs(loss.item() - (1.5 * picks[0] + 0.5 * sum(picks[1:]))) < 1e-5
    assert m["loss"] == loss.item() and m["acc"] == 0.0  # the top score (index 2) is rank 2


def test_losses_ignore_padding_slots_and_have_finite_gradients():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):  # random shapes, random padding
        B, N = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        n = torch.randint(1, N + 1, (B,), generator=g)
        valid = torch.arange(N)[None] < n[:, None]
        ranks = torch.randint(1, 4, (B, N), generator=g)
        s = (torch.randn(B, N, generator=g) * 5).requires_grad_()
        for fn in (mrrm.listwise_ce_loss, mrrm.plackett_luce_loss, mrrm.ce_pl_loss):
            loss, _ = fn(s, ranks, valid)
            grad, = torch.autograd.grad(loss, s)
            assert torch.isfinite(loss) and torch.isfinite(grad).all() and loss.item() >= -1e-6
            assert (grad[~valid] == 0).all(), "padding slots must get no gradient"
            junk = s.detach().clone()
            junk[~valid] = 1e4  # whatever sits in the padding slots changes nothing
            assert torch.allclose(fn(junk, ranks, valid)[0], loss.detach(), atol=1e-5)


# --- public API ---------------------------------------------------------------------------------


def test_readme_api_example_runs(folder, tmp_path):
    rm = make_rm(folder, with_lora=True)
    rm.save(str(tmp_path / "rm"), extra={"lora": {"r": 4, "alpha": 8, "targets": list(lora.DEFAULT_TARGETS)}})
    loaded = mrrm.RewardModel.load(folder, adapter=str(tmp_path / "rm"))
    img = image(48, 48, 9)
    scores = loaded.score(images=[img], prompt="What color is the circle?",
                          responses=["It is red.", "Blue.", "red, I think"], mode="joint")
    want = rm.score(images=[img], prompt="What color is the circle?",
                    responses=["It is red.", "Blue.", "red, I think"], mode="joint")
    assert len(scores) == 3 and np.allclose(scores, want, atol=1e-6)


# --- pinned by a mutation audit: changes no other test noticed ---------------------------------------


def test_joint_pack_positions_are_the_whole_sequences_rope_positions(rm):
    # after an image the text continues from the largest prompt position + 1, not from the token count
    p = rm.encode("What?", ["red", "two blue"], images=[image(64, 40, 1)], mode="joint")
    assert torch.equal(p.position_ids, vlm.rope_positions(p.input_ids, p.grid_thw, rm.backbone.cfg))


def test_packs_that_exactly_fill_a_shared_row_score_as_if_alone(rm):
    packs = [rm.encode("Q", ["red circle"], mode="joint"), rm.encode("Q", ["blue square"], mode="joint")]
    n = len(packs[0].input_ids)
    assert len(packs[1].input_ids) == n
    shared = mrrm.collate(packs, "joint", row_tokens=2 * n)
    assert shared.input_ids.shape[0] == 1 and not shared.causal  # one row: the packs must not see each other
    with torch.no_grad():
        assert torch.allclose(rm(shared), rm(mrrm.collate(packs, "joint")), atol=1e-5)


def test_a_pack_that_exactly_fills_the_room_left_joins_the_row():
    assert mrrm.place([2, 2, 3], 4) == [[0, 1], [2]]
    assert mrrm.first_fit([2, 2, 3], 4) == [[0, 1], [2]]


def test_place_keeps_every_pack_within_the_budget_and_never_costs_more_than_first_fit():
    rng = random.Random(0)
    for trial in range(300):
        budget = rng.choice([64, 128, 256])
        lengths = [rng.randint(5, budget + 40) for _ in range(rng.randint(1, 20))]  # some longer than a row
        pair_cost = rng.choice([0.0, 1 / 768, 1 / 12320, 0.01])
        rows = mrrm.place(lengths, budget, pair_cost)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths))), "each pack exactly once"
        for r in rows:  # a pack longer than a row is alone; shared rows stay within the budget
            assert len(r) == 1 or sum(lengths[i] for i in r) <= budget
        first = mrrm.first_fit(lengths, budget)
        assert mrrm.layout_cost(lengths, rows, pair_cost) <= mrrm.layout_cost(lengths, first, pair_cost) + 1e-9


def test_place_pads_far_less_than_first_fit_on_shapeworld_like_batches():
    # 16 packs of 38 - 199 tokens into rows of 256, as the demo's steps: first fit pads about 13% of
    # the cells; weighing cells alone (pair_cost 0), place() should pad well under two thirds of that
    rng = random.Random(1)
    padding = {"first fit": 0, "place": 0}
    for trial in range(200):
        lengths = [rng.randint(38, 199) if rng.random() < 0.3 else rng.randint(38, 90) for _ in range(16)]
        for name, rows in (("first fit", mrrm.first_fit(lengths, 256)), ("place", mrrm.place(lengths, 256))):
            padding[name] += mrrm.layout_cost(lengths, rows, 0.0) - sum(lengths)
    assert padding["place"] < 0.6 * padding["first fit"], padding


def test_score_valid_marks_exactly_each_packs_responses(rm):
    packs = [rm.encode("Q", ["a"] * n, mode="joint") for n in (1, 3, 2)]
    assert mrrm.collate(packs, "joint").score_valid.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0]]


def test_every_query_attends_at_least_itself(rm):
    # a padded row with no key would be softmax over nothing: 0 on this CPU kernel, NaN on others
    packs = [rm.encode(f"Q{i}", ["red"] * (i + 1), mode="joint") for i in range(4)]
    for mode in mrrm.MODES:
        assert mrrm.collate(packs, mode, row_tokens=40).mask.diagonal(dim1=1, dim2=2).all()


def test_the_ce_plus_pl_loss_weighs_plackett_luce_by_the_documented_half():
    s, r, v = torch.tensor([[0.3, -0.2, 1.1, 0.0]]), torch.tensor([[3, 1, 2, 4]]), torch.ones(1, 4, dtype=torch.bool)
    want = mrrm.listwise_ce_loss(s, r, v)[0] + 0.5 * mrrm.plackett_luce_loss(s, r, v)[0]
    assert torch.allclose(mrrm.LOSSES["ce+pl"](s, r, v)[0], want)


@pytest.mark.parametrize("fn", [mrrm.listwise_ce_loss, mrrm.plackett_luce_loss])
def test_a_loss_under_any_validity_mask_is_the_loss_of_the_valid_entries(fn):
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        s, ranks = torch.randn(1, 6, generator=g), torch.randint(1, 4, (1, 6), generator=g)
        valid = torch.rand(1, 6, generator=g) < 0.6
        valid[0, int(torch.randint(0, 6, (1,), generator=g))] = True
        ranks[~valid] = 0  # a padding slot ranked above every real response must still not count
        keep = valid[0]
        want = fn(s[:, keep], ranks[:, keep], torch.ones(1, int(keep.sum()), dtype=torch.bool))[0]
        assert torch.allclose(fn(s, ranks, valid)[0], want, atol=1e-5)


def test_the_value_head_is_fc2_of_silu_of_fc1():
    head = mrrm.ValueHead(8, 16)
    h = torch.randn(3, 8)
    assert torch.allclose(head(h), head.fc2(torch.nn.functional.silu(head.fc1(h))).squeeze(-1))


def test_independent_scores_averaged_over_several_orders_equal_one_order(rm):
    # each response's score is unaffected by the others there: any order must put it back in its place
    s = mrrm.Sample(id="a", prompt="What?", responses=["red", "blue circle", "two", "green one"],
                    rankings=[1, 2, 3, 4], images=[], videos=[], category="", where="x")
    one = mrrm.evaluate(rm, [s], "independent", orders=1)[1][0]
    four = mrrm.evaluate(rm, [s], "independent", orders=4)[1][0]
    assert np.allclose(one, four, atol=1e-5)


def test_the_value_head_runs_in_fp32_under_bf16_autocast():
    # as CUDA training runs it: autocast must not round the scores that are compared to bf16
    head = mrrm.ValueHead(64, 32)
    nn_init = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.fc2.weight.copy_(torch.randn(head.fc2.weight.shape, generator=nn_init))
    h = torch.randn(5, 64, generator=nn_init).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(h)
    assert got.dtype == torch.float32 and torch.equal(got, head(h))
