"""grpo.py: advantages, the clipped loss, masks, the reference KL, group rewards from one reward-model
pass, sampler log-probs vs a fresh forward, and the training loop / CLI on tiny random checkpoints."""

import contextlib
import itertools
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

import grpo
import lora
import mrrm
import vlm
from data import shapeworld


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models decode far faster on one thread, above all on a shared CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = str(tmp_path_factory.mktemp("tiny"))
    vlm.write_tiny_checkpoint(f, seed=0)
    return f


@pytest.fixture(scope="module")
def rm_dir(folder, tmp_path_factory):
    """A 'trained' reward model: tiny random backbone + perturbed LoRA + a head with visible scores."""
    out = str(tmp_path_factory.mktemp("rm"))
    rm = mrrm.RewardModel.load(folder)
    torch.manual_seed(0)
    lora.inject_lora(rm.backbone, r=4, alpha=8)
    with torch.no_grad():
        rm.head.fc2.weight.normal_(0, 0.05)
        for name, p in rm.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rm.save(out, extra={"lora": {"r": 4, "alpha": 8, "targets": list(lora.DEFAULT_TARGETS)}})
    return out


@pytest.fixture(scope="module")
def rm(folder, rm_dir):
    return mrrm.RewardModel.load(folder, adapter=rm_dir)


def make_policy(folder, perturb=0.05, seed=0):
    policy = vlm.load_model(folder)
    torch.manual_seed(seed)
    lora.inject_lora(policy, r=4, alpha=8)
    if perturb:
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, perturb)
    return policy


def settings(**over):
    s = dict(group_size=4, max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, iterations=1, eps_low=0.2,
             eps_high=0.28, beta=0.0, aggregation="token-mean", mask_truncated=False, clip=1.0)
    return SimpleNamespace(**{**s, **over})


def sample(seed, size=64):
    s = shapeworld.make_sample(random.Random(seed))
    if size != 64:  # a different image size: a different number of image tokens in the prompt
        s["image"] = s["image"].resize((size, size))
    return s


def rollouts(folder, policy, samples, args, seed=0, stop_ids=None):
    """Rollouts with a wide stop set, so a random model's completions end at different lengths."""
    proc = vlm.Processor(folder, policy.cfg)
    if stop_ids is not None:
        proc.stop_ids = stop_ids
    prompts, outs, texts = grpo.rollout(policy, proc, samples, args, torch.Generator().manual_seed(seed))
    return prompts, outs, texts


# ----------------------------------------------------------------------------- advantages and loss


def test_advantages_are_group_normalised_and_zero_std_groups_are_counted():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1.0, 1.0]])
    adv, m = grpo.group_advantages(rewards, scale=True, eps=1e-4)
    std0 = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # unbiased
    std2 = math.sqrt(4 * 0.25 / 3)
    want = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [0.0] * 4, [-0.5, -0.5, 0.5, 0.5]])
    want[0] /= std0 + 1e-4
    want[2] /= std2 + 1e-4
    assert torch.allclose(adv, want, atol=1e-6), f"{adv} vs {want}"
    assert m["zero_std_groups"] == 1 and abs(m["zero_std_frac"] - 1 / 3) < 1e-6, m
    assert abs(m["reward_mean"] - rewards.mean().item()) < 1e-6, m


@pytest.mark.parametrize("scale", [True, False])
def test_a_group_of_equal_rewards_gets_advantages_of_exactly_zero(scale):
    rewards = torch.full((1, 8), 0.3)  # float32's mean of eight 0.3 is an ulp off 0.3
    adv, m = grpo.group_advantages(rewards, scale=scale)
    assert torch.equal(adv, torch.zeros(1, 8)), f"scale={scale}: advantages {adv.tolist()}, want exactly 0"
    assert m["zero_std_groups"] == 1, m


@pytest.mark.parametrize("value", [13.7, 123.4])
def test_equal_rewards_of_any_size_get_advantages_of_exactly_zero(value):
    # the float32 mean of eight equal rewards near 14 is an ulp off, a std of ~1e-6: not a signal
    adv, m = grpo.group_advantages(torch.full((1, 8), value))
    assert torch.equal(adv, torch.zeros(1, 8)) and m["zero_std_groups"] == 1, (adv.tolist(), m)


def test_advantages_without_std_division_are_centred_rewards():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]])
    adv, m = grpo.group_advantages(rewards, scale=False)
    assert torch.allclose(adv, torch.tensor([[-2.0, -1.0, 3.0], [0.0, 0.0, 0.0]])), adv
    assert m["zero_std_groups"] == 1, m


# ratios [[1.5, 0.9], [0.5, (padding)]], advantages [+1, -1], clip range [0.8, 1.28]
HAND = dict(logp=torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.1]])), old=torch.zeros(2, 2),
            adv=torch.tensor([1.0, -1.0]), mask=torch.tensor([[True, True], [True, False]]))


@pytest.mark.parametrize("aggregation, want", [
    ("token-mean", (-1.28 - 0.9 + 0.8) / 3),      # per token: -min(r*A, clip(r)*A)
    ("sequence-mean", ((-1.28 - 0.9) / 2 + 0.8) / 2),
    ("constant", (-1.28 - 0.9 + 0.8) / (2 * 4)),   # Dr.GRPO: / (B * max_len), max_len = 4
])
def test_clipped_loss_matches_hand_computed_values(aggregation, want):
    loss, m = grpo.grpo_loss(HAND["logp"], HAND["old"], None, HAND["adv"], HAND["mask"], 0.2, 0.28, 0.0,
                             aggregation, max_len=4)
    assert abs(loss.item() - want) < 1e-6, f"{aggregation}: loss {loss.item()} vs hand {want}"
    assert abs(m["clip_frac"] - 2 / 3) < 1e-6, m  # 1.5 clipped at 1.28 (A>0), 0.5 clipped at 0.8 (A<0)
    assert "kl" not in m


def test_k3_kl_term_matches_hand_computed_values():
    beta = 0.1
    ref = torch.zeros(2, 2)  # ref - logp = -log r, so k3 = 1/r + log r - 1
    k3 = [1 / r + math.log(r) - 1 for r in (1.5, 0.9, 0.5)]
    loss, m = grpo.grpo_loss(HAND["logp"], HAND["old"], ref, HAND["adv"], HAND["mask"], 0.2, 0.28, beta, "token-mean")
    want = (-1.28 - 0.9 + 0.8 + beta * sum(k3)) / 3
    assert abs(loss.item() - want) < 1e-6, f"loss {loss.item()} vs hand {want}"
    assert abs(m["kl"] - sum(k3) / 3) < 1e-6, f"kl {m['kl']} vs hand {sum(k3) / 3}"


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean"])
def test_at_ratio_one_without_kl_the_gradient_is_the_plain_policy_gradient(aggregation):
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 5, generator=g) * 3).requires_grad_()
    adv = torch.randn(3, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, 0.2, 0.2, 0.0, aggregation)
    loss.backward()
    # the REINFORCE gradient: -A * grad(logp), weighted by the aggregation
    if aggregation == "token-mean":
        weight = mask.float() / mask.sum()
    else:
        weight = mask.float() / mask.sum(-1, keepdim=True) / len(mask)
    want = -adv[:, None] * weight
    assert torch.allclose(logp.grad, want, atol=1e-7), f"{logp.grad} vs {want}"


def test_values_at_masked_positions_never_reach_the_loss_or_its_gradient():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(2, 4, generator=g)
    old, ref = logp + 0.1 * torch.randn(2, 4, generator=g), logp - 0.1
    adv = torch.tensor([0.7, -1.2])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])  # padding at the end
    results, grads = [], []
    # 1e4 and -1e4: exp of the ratio's or the KL's log-difference overflows to inf; -inf: inf - inf is NaN
    for junk in (0.0, 25.0, -40.0, 1e4, -1e4, float("nan"), float("-inf")):
        lp = logp.clone()
        o, r = old.clone(), ref.clone()
        lp[~mask], o[~mask], r[~mask] = junk, -junk, junk / 2
        lp.requires_grad_()
        loss, m = grpo.grpo_loss(lp, o, r, adv, mask, 0.2, 0.28, 0.05, "token-mean")
        loss.backward()
        assert torch.all(lp.grad[~mask] == 0), f"junk {junk}: gradient at masked positions {lp.grad}"
        results.append((loss.item(), m["kl"], m["clip_frac"], m["ratio"]))
        grads.append(lp.grad[mask])
    assert all(abs(a - b) < 1e-6 for r in results[1:] for a, b in zip(r, results[0])), results
    assert all(torch.allclose(g, grads[0], atol=1e-7) for g in grads[1:]), f"real tokens' gradients: {grads}"


# ----------------------------------------------------------------------------- rollouts and log-probs


def test_sampled_logprobs_equal_a_fresh_forward_over_the_finished_sequences(folder):
    policy = make_policy(folder).eval()
    samples = [sample(0), sample(1, size=48), sample(2)]  # different prompts and image-token counts
    args = settings(group_size=4, temperature=0.7, top_k=50)  # log-probs are taken before top-k
    prompts, outs, _ = rollouts(folder, policy, samples, args, stop_ids=list(range(14, 110)))
    lengths = [len(t) for o in outs for t in o["tokens"]]
    assert len(set(lengths)) > 2, f"the test needs completions of different lengths, got {lengths}"
    r = grpo.pack_rollouts(prompts, outs)
    assert r.pixel_values.shape[0] == 4 * sum(int(p.pixel_values.shape[0]) for p in prompts), "images repeat per sequence"
    with torch.no_grad():
        logp, entropy = grpo.token_logprobs(policy, r, args.temperature)
    m = r.completion_mask
    gap = (logp - r.old_logp)[m].abs().max().item()
    assert gap < 1e-4, f"sampler vs fresh forward log-probs differ by {gap}"
    assert torch.all(entropy[m] > 0), "entropy of a sampling distribution is positive"


def test_the_image_matters_to_the_logprob_pass(folder):
    policy = make_policy(folder).eval()
    args = settings()
    prompts, outs, _ = rollouts(folder, policy, [sample(3)], args)
    r = grpo.pack_rollouts(prompts, outs)
    with torch.no_grad():
        logp, _ = grpo.token_logprobs(policy, r, 1.0)
        r.pixel_values = -r.pixel_values  # another picture, same shapes
        other, _ = grpo.token_logprobs(policy, r, 1.0)
    diff = (logp - other)[r.completion_mask].abs().max().item()
    assert diff > 1e-5, f"log-probs do not depend on the image (max change {diff})"


def test_packed_completions_continue_after_the_prompts_largest_position(folder):
    policy = make_policy(folder).eval()
    prompts, outs, _ = rollouts(folder, policy, [sample(4), sample(5, size=48)], settings(group_size=3),
                                stop_ids=list(range(14, 110)))
    r = grpo.pack_rollouts(prompts, outs)
    b = 0
    for prompt, out in zip(prompts, outs):
        P, first = prompt.input_ids.shape[1], int(prompt.position_ids.max()) + 1
        for toks, done in zip(out["tokens"], out["finished"]):
            n = len(toks)
            assert int(r.start[b]) == P
            assert r.input_ids[b, P:P + n].tolist() == toks == r.completion[b, :n].tolist()
            assert torch.equal(r.position_ids[:, b, P:P + n], torch.arange(first, first + n).expand(3, n))
            assert r.completion_mask[b].tolist() == [j < n for j in range(r.completion.shape[1])]
            assert bool(r.finished[b]) == done
            assert not r.mask[b, :P + n, P + n:].any(), "no real token attends padding"
            b += 1


def test_a_sampled_image_pad_token_cuts_the_completion_before_it():
    out = {"tokens": [[5, 6, 99, 7], [5, 8]], "finished": [True, True], "logprobs": [[-1, -2, -3, -4], [-1, -2]]}
    cut = grpo.cut_at_media_tokens(out, (99,))
    assert cut["tokens"] == [[5, 6], [5, 8]] and cut["logprobs"] == [[-1, -2], [-1, -2]], cut
    assert cut["finished"] == [False, True], cut
    assert out["tokens"][0] == [5, 6, 99, 7], "the input is not modified"


def test_kl_is_zero_when_policy_equals_reference_and_positive_after_a_lora_change(folder):
    policy = make_policy(folder, perturb=0.0)  # fresh LoRA: B = 0, the policy is the base model
    args = settings()
    prompts, outs, _ = rollouts(folder, policy, [sample(6)], args)
    r = grpo.pack_rollouts(prompts, outs)
    adv = torch.randn(len(r.completion))

    def kl():
        with torch.no_grad():
            with lora.adapter_disabled(policy):
                ref, _ = grpo.token_logprobs(policy, r, 1.0)
            logp, _ = grpo.token_logprobs(policy, r, 1.0)
        return grpo.grpo_loss(logp, r.old_logp, ref, adv, r.completion_mask, beta=0.1)[1]["kl"]

    assert kl() == 0.0
    with lora.adapter_disabled(policy), torch.no_grad():  # the reference against itself
        ref, _ = grpo.token_logprobs(policy, r, 1.0)
    assert grpo.grpo_loss(ref, r.old_logp, ref, adv, r.completion_mask, beta=0.1)[1]["kl"] == 0.0
    with torch.no_grad():
        name, p = next((n, p) for n, p in policy.named_parameters() if "lora_B" in n)
        p.normal_(0, 0.2)
    after = kl()
    assert after > 1e-6, f"KL after changing {name}: {after}"


# ----------------------------------------------------------------------------- rewards


def groups_to_score():
    samples = [sample(10), sample(11, size=48)]
    texts = [["The circle is red.", "blue", "", "It is red, I think."],
             ["There are 3 shapes.", "two", "three shapes", "The answer is 3."]]
    return [s["image"] for s in samples], [s["record"]["prompt"] for s in samples], texts


@pytest.mark.parametrize("mode", mrrm.MODES)
def test_group_rewards_equal_reward_model_score_on_the_same_group(rm, mode):
    images, questions, texts = groups_to_score()
    rewards = grpo.score_groups(rm, images, questions, texts, mode)
    for i, group in enumerate(texts):
        want = torch.tensor(rm.score(images=[images[i]], prompt=questions[i], responses=group, mode=mode))
        assert torch.allclose(rewards[i], want, atol=1e-5), f"group {i} ({mode}): {rewards[i]} vs {want}"
        if mode == "independent":  # the block mask: each score is that of the response on its own
            alone = torch.tensor([rm.score(images=[images[i]], prompt=questions[i], responses=[t])[0] for t in group])
            assert torch.allclose(rewards[i], alone, atol=1e-5), f"group {i}: {rewards[i]} vs alone {alone}"
    if mode == "joint":
        assert not torch.allclose(rewards, grpo.score_groups(rm, images, questions, texts, "independent"), atol=1e-4)


def test_shuffled_joint_scores_come_back_in_the_original_order(rm):
    images, questions, texts = groups_to_score()
    orders = [[2, 0, 3, 1], [3, 2, 1, 0]]
    rewards = grpo.score_groups(rm, images, questions, texts, "joint", orders)
    for i, order in enumerate(orders):
        packed = rm.score(images=[images[i]], prompt=questions[i], responses=[texts[i][j] for j in order])
        for k, j in enumerate(order):
            assert abs(rewards[i, j].item() - packed[k]) < 1e-5, f"group {i}, response {j}: {rewards[i]} vs {packed}"


def test_identical_responses_share_the_mean_of_their_scores():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 7.0]])
    merged = grpo.merge_duplicates(rewards, [["red", "blue", "red", "red"]])
    assert torch.allclose(merged, torch.tensor([[4.0, 2.0, 4.0, 4.0]])), merged


# ----------------------------------------------------------------------------- the loop and the CLI


def test_update_steps_lower_the_loss_on_a_fixed_batch(folder):
    policy = make_policy(folder, perturb=0.0)
    args = settings(group_size=4, iterations=6, eps_low=10.0, eps_high=10.0)  # wide clip: nothing stops the descent
    prompts, outs, _ = rollouts(folder, policy, [sample(7), sample(8)], args, stop_ids=list(range(14, 110)))
    r = grpo.pack_rollouts(prompts, outs)
    adv, _ = grpo.group_advantages(torch.randn(2, 4, generator=torch.Generator().manual_seed(0)))
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    history = grpo.update(policy, opt, params, r, adv.flatten(), None, args, contextlib.nullcontext())
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0] - 0.05, f"loss did not fall: {losses}"
    assert history[0]["logp_drift"] < 1e-4, "first iteration: the policy is the sampler"


def test_lora_dropout_is_on_in_the_update_and_off_when_sampling(folder):
    policy = vlm.load_model(folder)
    torch.manual_seed(0)
    lora.inject_lora(policy, r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a visible LoRA path, so that dropping its inputs changes the log-probs
    args = settings()
    prompts, outs, _ = rollouts(folder, policy, [sample(13)], args, stop_ids=list(range(14, 110)))
    r = grpo.pack_rollouts(prompts, outs)
    with torch.no_grad():  # rollout left the policy in eval mode: the sampler's log-probs, dropout off
        gap = (grpo.token_logprobs(policy, r, 1.0)[0] - r.old_logp)[r.completion_mask].abs().max().item()
    assert gap < 1e-4, f"eval-mode forward vs sampler log-probs differ by {gap}: the sampler ran with dropout"
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    m = grpo.update(policy, torch.optim.SGD(params.values(), lr=0.0), params, r, torch.ones(4), None, args,
                    contextlib.nullcontext())[0]
    assert m["logp_drift"] > 1e-3, f"first update pass vs sampler log-probs differ by only {m['logp_drift']}: no dropout"


def test_mask_truncated_leaves_length_limited_completions_out_of_the_loss(folder):
    policy = make_policy(folder)
    args = settings(group_size=4, max_new_tokens=6)
    prompts, outs, _ = rollouts(folder, policy, [sample(9), sample(12)], args, stop_ids=list(range(14, 110)))
    r = grpo.pack_rollouts(prompts, outs)
    finished = [len(t) for o in outs for t, done in zip(o["tokens"], o["finished"]) if done]
    assert 0 < len(finished) < 8, f"the test needs finished and truncated completions, got {r.finished.tolist()}"
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=0.0)
    adv = torch.ones(8)
    for mask_truncated, want in ((False, int(r.completion_mask.sum())), (True, sum(finished))):
        m = grpo.update(policy, opt, params, r, adv, None, settings(mask_truncated=mask_truncated),
                        contextlib.nullcontext())[0]
        assert m["tokens"] == want, f"mask_truncated={mask_truncated}: {m['tokens']} tokens in the loss, want {want}"


def cli(folder, rm_dir, out, *extra):
    return grpo.main(["--model", folder, "--rm", rm_dir, "--out", str(out), "-G", "2", "--prompts-per-step", "2",
                      "--max-new-tokens", "4", "--eval-prompts", "2", "--eval-samples", "1", "--eval-every", "2",
                      "--log-every", "1", "--lr", "1e-2", "--warmup", "0", *extra])


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_writes_metrics_and_checkpoints_and_resume_continues_exactly(folder, rm_dir, tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    cli(folder, rm_dir, full, "--steps", "3", "--profile")
    assert "joint/independent" in capsys.readouterr().out
    cli(folder, rm_dir, split, "--steps", "3", "--stop-at", "2")
    assert mrrm.latest_checkpoint(str(split)).endswith("checkpoint-000002")
    assert [m["step"] for m in read_metrics(split) if "loss" in m] == [1, 2]
    cli(folder, rm_dir, split, "--steps", "3", "--resume")
    assert "resumed from" in capsys.readouterr().out
    a, b = read_metrics(full), read_metrics(split)
    assert [m["step"] for m in b if "loss" in m] == [1, 2, 3]
    assert [m["step"] for m in b if "eval" in m] == [0, 2, 3], b
    for x, y in zip([m for m in a if "loss" in m], [m for m in b if "loss" in m]):
        assert x["reward_mean"] == y["reward_mean"] and x["loss"] == y["loss"], (x, y)
    from safetensors.torch import load_file
    wa, wb = load_file(str(full / "adapter.safetensors")), load_file(str(split / "adapter.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed run ends with different LoRA weights"
    assert any(not torch.all(wa[k] == 0) for k in wa if "lora_B" in k), "training changed nothing"


class Evaluated(Exception):
    pass


def test_held_out_prompts_are_the_splits_first_whatever_the_seed_and_none_is_in_its_training_split(
        folder, rm_dir, tmp_path, monkeypatch):
    seen = {}

    def record(policy, proc, samples, args, autocast):
        seen[args.seed] = [s["record"]["id"] for s in samples]
        raise Evaluated  # the held-out prompts are all this test needs: no training step

    monkeypatch.setattr(grpo, "heldout_accuracy", record)
    for seed in (0, 1):
        with pytest.raises(Evaluated):
            cli(folder, rm_dir, tmp_path / f"seed{seed}", "--seed", str(seed), "--eval-prompts", "64")
    # the split as data/shapeworld.py writes it with its defaults (mrrm.py's data): held-out first, then train
    d = shapeworld.build_parser().parse_args([])
    heldout = [s["record"]["id"] for s in shapeworld.heldout_samples(d.heldout, d.seed, d.image_size)]
    train = {s["record"]["id"] for s in itertools.islice(
        shapeworld.stream("train", d.seed, d.image_size, exclude=heldout, mix=shapeworld.parse_mix(d.train_mix)), d.train)}
    assert seen[0] == seen[1], f"--seed 1 evaluates {len(set(seen[1]) - set(seen[0]))} of 64 other prompts"
    assert seen[1] == heldout[:64], f"{len(set(seen[1]) - set(heldout))} of 64 not in the held-out split"
    assert not set(seen[1]) & train, f"{len(set(seen[1]) & train)} of 64 held-out prompts are in the training split"


def test_the_split_seed_is_the_one_the_data_and_the_shipped_backbones_were_made_with():
    assert shapeworld.build_parser().get_default("seed") == grpo.SPLIT_SEED
    for name in ("shapeworld-backbone", "shapeworld-policy"):
        with open(os.path.join(grpo.HERE, "data", name, "pretrain.json")) as f:
            recorded = json.load(f)["args"]
        assert recorded["seed"] == grpo.SPLIT_SEED, f"{name} left out the held-out split of seed {recorded['seed']}"


@pytest.mark.parametrize("flag, value, says", [
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1 (got 0)"),
    ("--iterations", "0", "--iterations must be >= 1 (got 0)"),
    ("--eval-samples", "0", "--eval-samples must be >= 1 (got 0)"),
    ("--prompts-per-step", "0", "--prompts-per-step must be >= 1 (got 0)"),
    ("--top-k", "-1", "--top-k must be >= 0 (got -1"),
    ("--top-p", "-0.5", "--top-p must be between 0 and 1 (got -0.5"),
    ("--clip", "-1", "--clip must be >= 0 (got -1.0"),  # a negative max norm flips every gradient
    ("--log-every", "0", "--log-every must be >= 1 (got 0)"),
    ("-G", "17", "--group-size 17: the reward model scores at most 16 responses"),
])
def test_a_bad_setting_is_one_error_line_before_any_model_is_loaded(folder, rm_dir, tmp_path, monkeypatch, capsys,
                                                                    flag, value, says):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")
    monkeypatch.setattr(grpo.vlm, "load_model", refuse)
    with pytest.raises(SystemExit):
        cli(folder, rm_dir, tmp_path / "run", "--steps", "1", flag, value)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_beta_zero_skips_the_reference_pass(folder, rm_dir, tmp_path, monkeypatch):
    def refuse(model):
        raise AssertionError("reference pass with beta = 0")
    monkeypatch.setattr(grpo.lora, "adapter_disabled", refuse)
    cli(folder, rm_dir, tmp_path / "run", "--steps", "1", "--beta", "0", "--eval-every", "0")
    assert "kl" not in read_metrics(tmp_path / "run")[0]
    with pytest.raises(AssertionError, match="reference pass"):
        cli(folder, rm_dir, tmp_path / "run2", "--steps", "1", "--beta", "0.1", "--eval-every", "0")


def test_a_missing_reward_model_says_to_train_one_first(folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(folder, str(tmp_path / "no-rm"), tmp_path / "run", "--steps", "1")
    assert "run `python mrrm.py train` first" in capsys.readouterr().err


def test_the_reward_model_loads_on_the_backbone_it_was_trained_on(folder, rm_dir, tmp_path, capsys):
    import shutil
    rm = tmp_path / "rm"
    shutil.copytree(rm_dir, rm)
    cfg = json.loads((rm / "rm_config.json").read_text())
    (rm / "rm_config.json").write_text(json.dumps({**cfg, "base_model": str(tmp_path / "rm-backbone")}))
    with pytest.raises(SystemExit):
        cli(folder, str(rm), tmp_path / "run", "--steps", "1", "--eval-every", "0")
    assert f"{tmp_path / 'rm-backbone'}: the reward model's backbone is not here" in capsys.readouterr().err
    shutil.copytree(folder, tmp_path / "rm-backbone")
    cli(folder, str(rm), tmp_path / "run", "--steps", "1", "--eval-every", "0")
    assert "loss" in read_metrics(tmp_path / "run")[0]


def test_reward_mode_defaults_to_the_mode_the_reward_model_was_trained_in(folder, rm_dir, tmp_path, capsys):
    import shutil
    rm = tmp_path / "rm"
    shutil.copytree(rm_dir, rm)
    cfg = json.loads((rm / "rm_config.json").read_text())
    (rm / "rm_config.json").write_text(json.dumps({**cfg, "mode": "independent"}))
    cli(folder, str(rm), tmp_path / "run", "--steps", "1", "--eval-every", "0")
    assert "| mode independent |" in capsys.readouterr().out
    cli(folder, str(rm), tmp_path / "run2", "--steps", "1", "--eval-every", "0", "--rm-mode", "joint")
    assert "| mode joint |" in capsys.readouterr().out
    (rm / "rm_config.json").write_text("[1, 2]")  # valid JSON, not an object
    with pytest.raises(SystemExit):
        cli(folder, str(rm), tmp_path / "run3", "--steps", "1")
    err = capsys.readouterr().err
    assert "rm_config.json: expected a JSON object, found list" in err and err.count("\n") == 1, err


def test_bench_step_runs_every_phase_at_tiny_sizes():
    t = grpo.main(["--bench", "tiny:tiny", "-G", "3", "--max-new-tokens", "5", "--bench-image-tokens", "16",
                   "--threads", "1"])
    assert 0 < t["tokens"] <= 3 * 5  # completions cut at a sampled image pad are shorter
    for phase in ("generation", "reward joint", "reward independent", "reward separate", "reference", "update"):
        assert t[phase] > 0, phase
    assert t["step"] == pytest.approx(t["generation"] + t["reward joint"] + t["reference"] + t["update"])


def test_bench_rejects_unknown_sizes():
    with pytest.raises(SystemExit):
        grpo.main(["--bench", "2b:5b"])


def test_plot_draws_each_runs_held_out_curve(tmp_path, capsys):
    from PIL import Image
    curves = {"a": [(0, 0.5), (50, 0.7), (100, 0.6)], "b": [(0, 0.5), (50, 0.55), (100, 0.9)]}
    for name, points in curves.items():
        (tmp_path / name).mkdir()
        lines = [{"step": s, "eval": {"acc_sampled": a}} for s, a in points] + [{"step": 7, "loss": 0.1}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    assert grpo.eval_curve(str(tmp_path / "a")) == curves["a"]
    out = tmp_path / "c.png"
    grpo.main(["--plot", str(tmp_path / "a") + "=joint", str(tmp_path / "b"), "--plot-out", str(out)])
    printed = capsys.readouterr().out
    assert "joint: 0:0.50 50:0.70 100:0.60" in printed and "b: 0:0.50 50:0.55 100:0.90" in printed
    im = Image.open(out).convert("RGB")
    colors = {c for _, c in im.getcolors(1 << 20)}
    assert (31, 119, 180) in colors and (214, 39, 40) in colors  # one line colour per run
    # the second run's last point (step 100, accuracy 0.9) is drawn at the top right of the frame
    W, H = im.size
    x, y = W - 20, round(H - 44 - (H - 20 - 44) * 0.9)
    assert im.getpixel((x, y)) == (214, 39, 40)
    # a run killed mid-write: its last line is cut; the finished lines still plot and the cut one is named
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 0, "eval": {"acc_sampled": 0.5}}\n{"step": 50, "eval": ')
    assert grpo.eval_curve(str(tmp_path / "a")) == [(0, 0.5)]
    assert "a/metrics.jsonl:2: malformed JSON" in capsys.readouterr().err


def test_sequence_mean_skips_sequences_with_no_completion_token():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    loss, _ = grpo.grpo_loss(logp, logp, None, torch.tensor([1.0, 5.0]), mask, aggregation="sequence-mean")
    assert loss.item() == pytest.approx(-1.0)  # the empty row is not a sequence of loss 0


def test_clip_frac_counts_only_tokens_whose_clip_binds():
    old, logp = torch.zeros(1, 2), torch.log(torch.tensor([[1.5, 1.5]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert grpo.grpo_loss(logp, old, None, torch.tensor([-1.0]), mask)[1]["clip_frac"] == 0.0  # ratio 1.5, A < 0: unclipped
    assert grpo.grpo_loss(logp, old, None, torch.tensor([1.0]), mask)[1]["clip_frac"] == 1.0


@pytest.mark.parametrize("where", ["grpo_step", "evaluate"])
def test_a_stopped_grpo_run_saves_its_last_step_and_resumes_exactly(folder, rm_dir, tmp_path, monkeypatch, where):
    # it saved nothing (steps since the last --save-every were lost; before the first, all of them)
    full, split = tmp_path / "full", tmp_path / "split"
    cli(folder, rm_dir, full, "--steps", "3")
    real, calls = getattr(grpo, where if where == "grpo_step" else "heldout_accuracy"), []

    def stopping(*a, **k):  # grpo_step: step 2; held-out accuracy: its second call, at step 2
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped")
        return real(*a, **k)
    with monkeypatch.context() as m:
        m.setattr(grpo, where if where == "grpo_step" else "heldout_accuracy", stopping)
        with pytest.raises(KeyboardInterrupt):
            cli(folder, rm_dir, split, "--steps", "3")
    saved = mrrm.latest_checkpoint(str(split))
    assert saved.endswith("checkpoint-000001" if where == "grpo_step" else "checkpoint-000002"), saved
    cli(folder, rm_dir, split, "--steps", "3", "--resume")
    untimed = lambda ms: [{k: v for k, v in x.items() if not k.startswith("t_") and k != "time"} for x in ms]
    assert untimed(read_metrics(split)) == untimed(read_metrics(full))
    from safetensors.torch import load_file
    wa, wb = load_file(str(full / "adapter.safetensors")), load_file(str(split / "adapter.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
