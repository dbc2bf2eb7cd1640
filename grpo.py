"""
grpo.py: GRPO (Shao et al. 2024, arXiv 2402.03300) whose group rewards come from ONE multi-response
reward-model pass ("You Only Judge Once"): the G answers sampled for a prompt are packed into one
sequence and mrrm.RewardModel scores all of them at once.

One step, top to bottom:
  1. rollouts   for each of --prompts-per-step prompts, G completions from one prefill (vlm.generate,
                KV cache copied G times); the sampler's log-probs are kept as the "old" policy's.
  2. rewards    every group is one packed sequence; all groups go through the reward model in one
                batched pass. --rm-mode joint is the paper (response i sees 1..i-1), independent is
                the single-response baseline, computed exactly by a block mask in the same pass.
  3. advantages (r - group mean) / (group std + eps), or without the std (--no-adv-std, Dr.GRPO).
  4. update     --iterations (mu) optimizer steps on the batch: clipped importance ratio with
                eps_low / eps_high (DAPO's clip-higher when they differ), plus beta * k3 KL to the
                reference = the same weights with the LoRA adapter disabled (no second copy).

Run (the embedded default: shape-world on CPU; needs `python mrrm.py train` first for runs/rm). The
policy is data/shapeworld-policy, the backbone made deliberately imperfect (it samples a hedged or
near-miss answer about half the time); the reward model runs on the backbone it was trained on.
    python grpo.py                                   # joint reward passes, the paper
    python mrrm.py train --mode independent --out runs/rm-indep     # the single-response baseline RM,
    python grpo.py --rm runs/rm-indep --rm-mode independent --out runs/grpo-indep   # all else equal
    python grpo.py --resume                          # continue runs/grpo from its last checkpoint
    python grpo.py --plot runs/grpo=joint runs/grpo-indep=independent   # both curves -> grpo_curves.png
    python grpo.py --bench 2b:4b -G 8 --max-new-tokens 256 --grad-ckpt   # one step at real sizes (GPU)
Every --eval-every steps it prints the policy's exact-answer accuracy on held-out shape-world prompts
(the held-out split's first: never in the policy's pretraining or the reward model's data), checked
against the generator's ground truth by shapeworld.is_correct, not by the reward model, sampled at
the training temperature and greedy. metrics.jsonl in --out holds every step; the step
line splits the time into generation / reward / update, and --profile ends the run with the mean
split and the reward pass timed joint vs independent vs G separate sequences. The reward model is a
second backbone in memory (its own LoRA and head); the reference model is not.

What it leaves out: micro-batching (a step's sequences go through one forward, fine for the demo,
not for a 4B policy with long answers), vLLM-style fast rollouts, a learned value baseline (that is
PPO), reward-model updates during RL, multi-turn rollouts, sequence packing of the policy batch, and
the vocabulary-chunked log-softmax a 150k vocabulary would want.
"""

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass

import torch

import lora
import mrrm
import vlm
from data import shapeworld

AGGREGATIONS = ("token-mean", "sequence-mean", "constant")
HERE = os.path.dirname(os.path.abspath(__file__))
# the policy: the shape-world backbone fine-tuned with noisy answers (hedged or near-miss targets half the
# time; data/pretrain_backbone.py --answer-noise), so it samples the right answer only about half the time
DEFAULT_MODEL = os.path.join(HERE, "data", "shapeworld-policy")
# the seed of the shape-world split: mrrm.py writes data/shapeworld with data/shapeworld.py's default
# --seed 0, and data/pretrain_backbone.py --seed 0 left that split's held-out pairs out of the backbone.
# The held-out prompts use it whatever --seed is: another seed's held-out stream is a different set,
# partly in the reward model's training split and in the policy's pretraining.
SPLIT_SEED = 0
# settings that must not change between a run and its --resume
RESUME_KEYS = ("model", "rm", "rm_model", "rm_mode", "rm_shuffle", "merge_duplicates", "group_size",
               "prompts_per_step", "max_new_tokens", "temperature", "top_k", "top_p", "lora_r", "lora_alpha",
               "lora_dropout", "lr", "warmup", "steps", "iterations", "eps_low", "eps_high", "beta",
               "aggregation", "adv_std", "mask_truncated", "clip", "seed")

# -----------------------------------------------------------------------------
# Advantages and the loss: pure functions


def group_advantages(rewards, scale=True, eps=1e-4):
    """rewards (n_groups, G) -> (advantages (n_groups, G), metrics). A group whose rewards are all
    equal carries no signal: its advantages are 0 and it is counted in zero_std."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)  # unbiased, as in TRL's GRPOTrainer
    adv = rewards - mean
    if scale:
        adv = adv / (std + eps)
    # equal rewards carry no signal, so their advantages are exactly 0. Compared as values, not by std:
    # the float32 mean can be an ulp off the value, so equal rewards near 14 have a std near 1e-6
    zero = rewards.amax(-1) == rewards.amin(-1)
    adv = adv.masked_fill(zero[:, None], 0.0)
    return adv, {"reward_mean": rewards.mean().item(), "reward_std": std.mean().item(),
                 "zero_std_groups": int(zero.sum()), "zero_std_frac": zero.float().mean().item()}


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
              aggregation="token-mean", max_len=None):
    """The GRPO objective, to be minimized. Returns (loss, metrics).

    logp (B, L): per-token log-probs of the sampled completion tokens under the policy (with grad);
    old_logp (B, L): the same under the policy that sampled them; ref_logp (B, L) or None when beta=0;
    advantages (B,); mask (B, L) bool, True at completion tokens that count (not padding, not a
    masked-out truncated completion). Values where mask is False never reach the loss.
    aggregation: token-mean (all valid tokens of the batch weigh the same), sequence-mean (each
    sequence's mean, then the mean over sequences: the GRPO paper), constant (sum / (B * max_len):
    Dr.GRPO, no length bias)."""
    adv = advantages[:, None]
    # masked entries may hold anything (padding, NaN, inf): set them to 0 before exp. A where on the
    # per-token loss alone keeps them out of its value, not its gradient: exp's backward turns the 0
    # it gets there into 0 * inf or 0 * NaN = NaN
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp, old_logp = torch.where(mask, logp, zero), torch.where(mask, old_logp, zero)
    if ref_logp is not None:
        ref_logp = torch.where(mask, ref_logp, zero)
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # pessimistic bound: no gain from moving past the clip
    kl = None
    if beta:
        # k3 (Schulman 2020): unbiased for KL(policy || ref) under samples from the policy, always >= 0
        d = ref_logp - logp
        kl = d.exp() - d - 1
        per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, zero)  # masked tokens (ratio 1, loss -A there) count nothing
    n_tokens = mask.sum()
    if aggregation == "token-mean":
        loss = per_token.sum() / n_tokens.clamp(min=1)
    elif aggregation == "sequence-mean":
        lengths = mask.sum(-1)
        has = lengths > 0  # a fully masked sequence (truncated, masked out) is not averaged in
        loss = (per_token.sum(-1)[has] / lengths[has]).sum() / has.sum().clamp(min=1)
    elif aggregation == "constant":
        if not max_len:
            raise ValueError("aggregation 'constant' needs max_len (the completion length limit)")
        loss = per_token.sum() / (mask.shape[0] * max_len)
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    with torch.no_grad():
        n = n_tokens.clamp(min=1)
        # a token is clipped when the clipped branch is the smaller one and carries no gradient
        is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        metrics = {"loss": loss.item(), "clip_frac": ((is_clipped & mask).sum() / n).item(),
                   "ratio": (torch.where(mask, ratio, zero).sum() / n).item(), "tokens": int(n_tokens)}
        if kl is not None:
            metrics["kl"] = (torch.where(mask, kl, zero).sum() / n).item()
    return loss, metrics


# -----------------------------------------------------------------------------
# Rollouts, the padded policy batch, log-probs


@dataclass
class Rollouts:
    """n prompts x G completions as B = n*G right-padded sequences (prompt + completion), one per
    row, each with its own copy of its prompt's image rows: images travel with every sequence."""
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (3, B, T)
    mask: torch.Tensor  # (B, T, T) bool
    pixel_values: torch.Tensor  # (sum of rows, C*T*p*p) or None
    grid_thw: torch.Tensor  # (B * images per prompt, 3) or None
    start: torch.Tensor  # (B,) index of the first completion token (= the prompt's length)
    completion: torch.Tensor  # (B, L) the sampled tokens, 0 after the end
    completion_mask: torch.Tensor  # (B, L) bool: a real completion token
    finished: torch.Tensor  # (B,) bool: stopped before the length limit
    old_logp: torch.Tensor  # (B, L) the sampler's log-probs (0 after the end)


def pack_rollouts(prompts, outs, pad_id=0):
    """prompts: n vlm.Batch (one prompt each); outs: n dicts from vlm.generate -> Rollouts.
    Completion token j sits at position max(prompt positions) + 1 + j on all three M-RoPE axes,
    exactly where vlm.generate fed it, so a fresh forward reproduces the sampler's log-probs."""
    rows = []
    for prompt, out in zip(prompts, outs):
        p_ids, p_pos = prompt.input_ids[0], prompt.position_ids[:, 0]  # (P,), (3, P)
        first = int(p_pos.max()) + 1
        for toks, done, lps in zip(out["tokens"], out["finished"], out["logprobs"]):
            n = len(toks)
            ids = torch.cat([p_ids.cpu(), torch.tensor(toks, dtype=torch.long)])
            pos = torch.cat([p_pos.cpu(), torch.arange(first, first + n).expand(3, n)], 1)  # (3, P + n)
            rows.append((ids, pos, len(p_ids), toks, done, lps, prompt))
    B, T = len(rows), max(len(r[0]) for r in rows)
    L = max(max(len(r[3]) for r in rows), 1)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(3, B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    completion = torch.zeros(B, L, dtype=torch.long)
    completion_mask = torch.zeros(B, L, dtype=torch.bool)
    old_logp = torch.zeros(B, L)
    for b, (i, p, start, toks, _, lps, _) in enumerate(rows):
        ids[b, :len(i)], pos[:, b, :len(i)], valid[b, :len(i)] = i, p, True
        completion[b, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        completion_mask[b, :len(toks)] = True
        old_logp[b, :len(toks)] = torch.tensor(lps)
    index = torch.arange(T).expand(B, T)
    media = [r[6] for r in rows if r[6].pixel_values is not None]
    return Rollouts(ids, pos, vlm.attention_mask(index, index, valid),
                    torch.cat([m.pixel_values.cpu() for m in media]) if media else None,
                    torch.cat([m.grid_thw.cpu() for m in media]) if media else None,
                    torch.tensor([r[2] for r in rows]), completion, completion_mask,
                    torch.tensor([r[4] for r in rows]), old_logp)


def token_logprobs(model, r, temperature):
    """Log-probs (B, L) of the completion tokens under log_softmax(logits / temperature), the
    sampler's distribution before top-k/top-p, and the per-token entropy (B, L) (no grad)."""
    d = next(model.parameters()).device
    pv = None if r.pixel_values is None else r.pixel_values.to(d)
    grid = None if r.grid_thw is None else r.grid_thw.to(d)
    (B, T), L = r.input_ids.shape, r.completion.shape[1]
    assert bool((r.start >= 1).all()), "a completion needs at least one prompt token before it"
    # the hidden state at t predicts token t + 1: completion token j is read at start + j - 1; only these
    # rows go through the last layer's queries and MLP and the output projection (a prompt's logits over
    # the vocabulary are never used)
    at = (r.start.to(d)[:, None] - 1 + torch.arange(L, device=d)).clamp(max=T - 1)  # (B, L)
    h = model(r.input_ids.to(d), pv, grid, r.position_ids.to(d), r.mask.to(d), return_hidden=True,
              at=(torch.arange(B, device=d), at))  # (B, L, D)
    logp_all = (model.logits(h).float() / temperature).log_softmax(-1)  # (B, L, V)
    logp = logp_all.gather(-1, r.completion.to(d)[..., None]).squeeze(-1)  # (B, L)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def cut_at_media_tokens(out, media_ids):
    """Cut each completion before its first image/video pad token and mark it unfinished. A full
    forward takes such a token for an image slot (vlm.generate fed it as text), so the log-prob pass
    could not reproduce it; a trained model never says one, a random one may. The kept prefix's
    log-probs are unchanged: each token depends only on the tokens before it."""
    out = dict(out, tokens=list(out["tokens"]), finished=list(out["finished"]), logprobs=list(out["logprobs"]))
    for i, toks in enumerate(out["tokens"]):
        cut = next((j for j, t in enumerate(toks) if t in media_ids), None)
        if cut is not None:
            out["tokens"][i], out["logprobs"][i], out["finished"][i] = toks[:cut], out["logprobs"][i][:cut], False
    return out


@torch.no_grad()
def rollout(policy, proc, samples, args, generator):
    """G completions for each shape-world sample -> (prompts as vlm.Batch, generate outputs, texts)."""
    policy.eval()
    d = next(policy.parameters()).device
    prompts, outs, texts = [], [], []
    for s in samples:
        b = proc.chat(images=[s["image"]], text=s["record"]["prompt"])
        b = vlm.Batch(b.input_ids.to(d), b.position_ids.to(d), b.pixel_values.to(d), b.grid_thw.to(d))
        out = vlm.generate(policy, b, args.max_new_tokens, n=args.group_size, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, stop_ids=proc.stop_ids, generator=generator)
        out = cut_at_media_tokens(out, (policy.cfg.image_token_id, policy.cfg.video_token_id))
        prompts.append(b), outs.append(out)
        texts.append([proc.tokenizer.decode(t) for t in out["tokens"]])  # the stop token is special: dropped
    return prompts, outs, texts


# -----------------------------------------------------------------------------
# Rewards: one multi-response pass per group, all groups batched


@torch.no_grad()
def score_groups(rm, images, questions, texts, mode="joint", orders=None):
    """texts: n groups of G responses -> rewards (n, G), from ONE batched reward-model forward in
    which each group is one packed sequence. orders[i], a permutation of range(G), is the order
    group i's responses are packed in (joint mode sees order); scores come back in the original order."""
    packs, used = [], []
    for i, (img, q, group) in enumerate(zip(images, questions, texts)):
        order = list(orders[i]) if orders is not None else list(range(len(group)))
        packs.append(rm.encode(q, [group[j] for j in order], images=[img], mode=mode))
        used.append(order)
    scores = rm(mrrm.collate(packs, mode)).float().cpu()  # (n, Nmax), packed order
    rewards = torch.zeros(len(texts), max(len(g) for g in texts))
    for i, order in enumerate(used):
        rewards[i, order] = scores[i, :len(order)]
    return rewards


def merge_duplicates(rewards, texts):
    """Identical responses in a group get the mean of their scores. Joint mode scores a repeated
    answer differently at each position (it sees different predecessors); once the policy agrees
    with itself, std normalisation would blow those small differences up into +-1 advantages."""
    out = rewards.clone()
    for i, group in enumerate(texts):
        seen = {}
        for j, t in enumerate(group):
            seen.setdefault(t, []).append(j)
        for idx in seen.values():
            out[i, idx] = rewards[i, idx].mean()
    return out


# -----------------------------------------------------------------------------
# Prompts and the held-out accuracy


@torch.no_grad()
def heldout_accuracy(policy, proc, samples, args, autocast):
    """Exact-answer accuracy against the generator's ground truth: args.eval_samples answers per
    prompt at the training temperature, and one greedy answer."""
    policy.eval()
    d = next(policy.parameters()).device
    gen = torch.Generator(d).manual_seed(args.seed + 12345)  # the same draws at every evaluation
    right = {"sampled": [], "greedy": []}
    per_category = {}
    for s in samples:
        b = proc.chat(images=[s["image"]], text=s["record"]["prompt"])
        b = vlm.Batch(b.input_ids.to(d), b.position_ids.to(d), b.pixel_values.to(d), b.grid_thw.to(d))
        for kind, n, temp in (("sampled", args.eval_samples, args.temperature), ("greedy", 1, 0.0)):
            with autocast:
                out = vlm.generate(policy, b, args.max_new_tokens, n=n, temperature=temp, top_k=args.top_k,
                                   top_p=args.top_p, stop_ids=proc.stop_ids, generator=gen)
            ok = [shapeworld.is_correct(s["record"], proc.tokenizer.decode(t)) for t in out["tokens"]]
            right[kind] += ok
            if kind == "greedy":
                per_category.setdefault(s["record"]["category"], []).extend(ok)
    res = {f"acc_{k}": sum(v) / len(v) for k, v in right.items()}
    res["acc_greedy_by_category"] = {k: sum(v) / len(v) for k, v in sorted(per_category.items())}
    return res


# -----------------------------------------------------------------------------
# Training


def load_models(args, device):
    """The policy (backbone + fresh LoRA) and the trained reward model, with clear errors."""
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"{args.model}: no policy backbone here (config.json missing); the shape-world "
                                "demo expects data/shapeworld-policy (python data/pretrain_backbone.py)")
    if args.rm and not os.path.isfile(os.path.join(args.rm, "rm_config.json")):
        raise FileNotFoundError(f"{args.rm}: no trained reward model here (rm_config.json missing); "
                                "run `python mrrm.py train` first")
    # the reward model's backbone: --rm-model, else the one it was trained on, else the policy's
    rm_model = args.rm_model or (args.rm and mrrm._read_rm_config(args.rm).get("base_model")) or args.model
    if not os.path.isfile(os.path.join(rm_model, "config.json")):
        raise FileNotFoundError(f"{rm_model}: the reward model's backbone is not here (config.json missing); "
                                "pass its folder with --rm-model")
    if not args.rm and not os.path.isfile(os.path.join(rm_model, "head.safetensors")):
        raise FileNotFoundError(f"{rm_model}: --rm '' needs a merged reward model (`mrrm.py train --export`) "
                                "with head.safetensors; this folder has none")
    # a group is one packed sequence: more responses than the reward model takes would stop step 1.
    # A merged reward model (--rm '') keeps its rm_config.json beside its weights.
    rm_dir = args.rm or rm_model
    max_responses = mrrm._read_rm_config(rm_dir).get("max_responses")
    if max_responses is not None and args.group_size > max_responses:
        raise ValueError(f"--group-size {args.group_size}: the reward model scores at most {max_responses} "
                         f"responses in one pass (max_responses in {os.path.join(rm_dir, 'rm_config.json')})")
    dtype = mrrm.precision(device)[0]
    policy = vlm.load_model(args.model, dtype=dtype, device=device)
    proc = vlm.Processor(args.model, policy.cfg)
    torch.manual_seed(args.seed)  # LoRA's A matrices start the same every run
    lora.inject_lora(policy, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    rm = mrrm.RewardModel.load(rm_model, adapter=args.rm or None, dtype=dtype, device=device)
    if args.rm_mode is None:  # score the way the reward model was trained, as `mrrm.py score` does
        args.rm_mode = rm.mode
    for p in rm.parameters():
        p.requires_grad_(False)
    return policy, proc, rm


def update(policy, opt, params, r, advantages, ref_logp, args, autocast):
    """--iterations optimizer steps on one batch of rollouts -> metrics of each iteration."""
    policy.train()
    d = next(policy.parameters()).device
    mask = r.completion_mask.clone()
    if args.mask_truncated:
        mask &= r.finished[:, None]
    old, mask, adv = r.old_logp.to(d), mask.to(d), advantages.to(d)
    history = []
    for it in range(args.iterations):
        with autocast:
            logp, entropy = token_logprobs(policy, r, args.temperature)
        loss, m = grpo_loss(logp, old, ref_logp, adv, mask, args.eps_low, args.eps_high, args.beta,
                            args.aggregation, args.max_new_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params.values(), args.clip or float("inf")))
        opt.step()
        m["entropy"] = entropy[mask].mean().item() if mask.any() else 0.0
        if it == 0 and mask.any():
            # policy == sampler here: the gap is cached decoding vs a full forward (0 in fp32, small in bf16),
            # plus --lora-dropout's noise: as in standard GRPO/PPO the update passes run in train mode
            # (dropout on) while the sampler's "old" and the reference log-probs were taken without it
            m["logp_drift"] = (logp.detach() - old).abs()[mask].max().item()
        history.append(m)
    return history


def grpo_step(policy, proc, rm, opt, params, samples, step, args, autocast):
    """One GRPO step on a list of shape-world samples: rollouts, one reward pass for all groups,
    advantages, the reference pass (beta > 0), --iterations updates. Returns (metrics, the groups
    (images, questions, texts) as scored)."""
    device = str(next(policy.parameters()).device)
    gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step)
    t_start = time.time()
    with autocast:
        prompts, outs, texts = rollout(policy, proc, samples, args, gen)
    mrrm.sync(device)
    t_gen = time.time()
    orders = None
    if args.rm_shuffle:
        g = torch.Generator().manual_seed(args.seed * 7_919 + step)
        orders = [torch.randperm(args.group_size, generator=g).tolist() for _ in samples]
    images, questions = [s["image"] for s in samples], [s["record"]["prompt"] for s in samples]
    with autocast:
        rewards = score_groups(rm, images, questions, texts, args.rm_mode, orders)
    if args.merge_duplicates:
        rewards = merge_duplicates(rewards, texts)
    mrrm.sync(device)
    t_rm = time.time()
    adv, metrics = group_advantages(rewards, args.adv_std)
    r = pack_rollouts(prompts, outs)
    ref_logp = None
    if args.beta:
        with torch.no_grad(), lora.adapter_disabled(policy), autocast:
            ref_logp, _ = token_logprobs(policy, r, args.temperature)
    history = update(policy, opt, params, r, adv.flatten(), ref_logp, args, autocast)
    mrrm.sync(device)
    correct = [shapeworld.is_correct(s["record"], t) for s, group in zip(samples, texts) for t in group]
    metrics.update(history[-1])
    metrics.update(loss=history[0]["loss"], logp_drift=history[0].get("logp_drift", 0.0),  # the on-policy pass
                   train_acc=sum(correct) / len(correct), length=r.completion_mask.sum(-1).float().mean().item(),
                   truncated=1 - r.finished.float().mean().item(),
                   t_gen=t_gen - t_start, t_rm=t_rm - t_gen, t_update=time.time() - t_rm)
    return metrics, (images, questions, texts)


def optimizer_updates(opt):
    """How many updates the optimizer has applied (Adam counts them per parameter). It changes as a
    step starts to write the parameters, so an unchanged count means they are untouched."""
    return max((int(st["step"]) for st in opt.state.values() if "step" in st), default=0)


def check_args(args):
    """Settings that would fail only later (in a step, an evaluation, a division) fail here, before
    any model is loaded, with one line that names the flag."""
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 for training (got {args.temperature}): the loss uses "
                         "log_softmax(logits / temperature)")
    if args.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 (got {args.group_size}): advantages compare within a group")
    for flag, value in (("--prompts-per-step", args.prompts_per_step), ("--max-new-tokens", args.max_new_tokens),
                        ("--iterations", args.iterations), ("--eval-samples", args.eval_samples)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1 (got {value})")
    if args.eval_prompts < 0:
        raise ValueError(f"--eval-prompts must be >= 0 (got {args.eval_prompts}; 0: no held-out evaluation)")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (got {args.top_k}; 0: no top-k cut)")
    if not 0 <= args.top_p <= 1:
        raise ValueError(f"--top-p must be between 0 and 1 (got {args.top_p}; 1: no top-p cut)")
    if args.clip < 0:  # a negative max norm would flip every gradient: training would climb the loss
        raise ValueError(f"--clip must be >= 0 (got {args.clip}; 0: no clipping)")
    if args.log_every < 1:
        raise ValueError(f"--log-every must be >= 1 (got {args.log_every})")


def train(args):
    check_args(args)
    device = mrrm.pick_device(args.device)
    policy, proc, rm = load_models(args, device)
    policy.grad_checkpointing = args.grad_ckpt
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)
    autocast = mrrm.precision(device)[1]
    # the shape-world held-out split's first prompts: neither the policy's pretraining nor the RM's data has them
    heldout = shapeworld.heldout_samples(args.eval_prompts, SPLIT_SEED)
    heldout_ids = {s["record"]["id"] for s in heldout}
    os.makedirs(args.out, exist_ok=True)
    settings = {k: getattr(args, k) for k in RESUME_KEYS}
    resumed = mrrm.start_or_resume(args.out, args.resume, params, opt, settings)
    step = resumed["step"]
    print(f"policy {args.model} | {lora.parameter_report(policy)}")
    print(f"reward model {args.rm or args.rm_model} | mode {args.rm_mode} | G {args.group_size} x "
          f"{args.prompts_per_step} prompts | {args.steps} steps | beta {args.beta} | {device}")

    def evaluate(at):
        t = time.time()
        res = heldout_accuracy(policy, proc, heldout, args, autocast)
        print(f"eval step {at} | held-out acc sampled {res['acc_sampled']:.3f} | greedy {res['acc_greedy']:.3f} | "
              f"{' '.join(f'{k} {v:.2f}' for k, v in res['acc_greedy_by_category'].items())} | "
              f"{time.time() - t:.1f}s", flush=True)
        mrrm.log_metrics(args.out, {"step": at, "eval": res})
        return res

    stop = min(args.steps, args.stop_at or args.steps)
    result = evaluate(step) if args.eval_every and step == 0 and heldout else None
    t0, timed = time.time(), []  # timed: (generation, reward, update) seconds per step
    # As in mrrm.py train: anything that stops the run first saves the last finished step, with the
    # step's metrics and whether its log and evaluation were still to come (a resumed run does them).
    # A step whose update had begun is not saved: its parameters are neither step k's nor step k+1's.
    window, pending, m = resumed.get("window", []), resumed.get("pending", False), resumed.get("last", {})
    state, saved, updates = {"settings": settings, "total": args.steps}, step, optimizer_updates(opt)
    try:
        while step < stop or pending:
            if not pending:
                lr = mrrm.lr_at(step, args.steps, args.lr, args.warmup, "constant")
                for g in opt.param_groups:
                    g["lr"] = lr
                # everything a step draws is seeded by (seed, step): a resumed run repeats the uninterrupted one
                samples = list(itertools.islice(shapeworld.stream(f"train:{step}", args.seed, exclude=heldout_ids,
                                                                  space="grpo"), args.prompts_per_step))
                m, groups = grpo_step(policy, proc, rm, opt, params, samples, step, args, autocast)
                step, updates, pending = step + 1, optimizer_updates(opt), True
                m["lr"] = lr
                window.append(m)
                timed.append((m["t_gen"], m["t_rm"], m["t_update"]))
            mrrm.log_metrics(args.out, {"step": step, **m, "time": time.time() - t0})
            logged = step % args.log_every == 0 or step == stop
            if logged:
                avg = {k: sum(w[k] for w in window) / len(window)
                       for k in ("loss", "reward_mean", "reward_std", "zero_std_frac", "train_acc", "clip_frac",
                                 "length", "truncated", "entropy", "t_gen", "t_rm", "t_update")}
                kl = f"kl {sum(w['kl'] for w in window) / len(window):.4f} | " if args.beta else ""
                eta = sum(map(sum, timed)) / len(timed) * (stop - step) if timed else 0.0
                print(f"step {step}/{args.steps} | loss {avg['loss']:.4f} | reward {avg['reward_mean']:.3f} "
                      f"std {avg['reward_std']:.3f} | zero-std {avg['zero_std_frac']:.2f} | train-acc {avg['train_acc']:.3f} | "
                      f"{kl}clip {avg['clip_frac']:.3f} | len {avg['length']:.1f} | trunc {avg['truncated']:.2f} | "
                      f"entropy {avg['entropy']:.3f} | lr {m['lr']:.1e} | gen {avg['t_gen']:.2f}s rm {avg['t_rm']:.2f}s "
                      f"upd {avg['t_update']:.2f}s | ETA {eta:.0f}s", flush=True)
            if args.eval_every and heldout and (step % args.eval_every == 0 or step == args.steps):
                result = evaluate(step)
            pending, window = False, [] if logged else window  # one statement: no interruption in between
            if args.save_every and step % args.save_every == 0 or step == stop:
                state.update(window=window, pending=False, last=m)
                mrrm.save_checkpoint(args.out, step, params, opt, state)
                saved = step
    except BaseException as e:
        if step > saved and optimizer_updates(opt) == updates:
            state.update(window=window, pending=pending, last=m)
            mrrm.save_at_stop(e, "--resume continues from there", args.out, step, params, opt, state)
        raise
    lora.save_lora(policy, os.path.join(args.out, "adapter.safetensors"),
                   {"base_model": os.path.abspath(args.model), "steps": step, "r": args.lora_r, "alpha": args.lora_alpha})
    if args.profile and timed:
        profile(rm, *groups, timed)
    if step < args.steps:
        print(f"stopped at step {step} of {args.steps} (--stop-at); continue with --resume")
    print(f"done in {time.time() - t0:.0f}s; policy adapter in {args.out}/adapter.safetensors")
    return result


def profile(rm, images, questions, texts, timed, repeats=5):
    """Mean seconds per step split into generation / reward / update (timed: one tuple per step),
    and the reward pass on the last step's groups timed three ways: joint and independent (the same
    sequences, only the mask and positions differ, so equal FLOPs) and G separate prompt+response
    sequences per group (the single-response reward model's cost)."""
    gen, rew, upd = (sum(t[i] for t in timed) / max(len(timed), 1) for i in range(3))
    print(f"profile | {len(timed)} steps | s/step {gen + rew + upd:.3f} | generation {gen:.3f} | "
          f"reward {rew:.3f} | update {upd:.3f}")
    def separate():  # the baseline the block mask replaces: one sequence per (prompt, response)
        packs = [rm.encode(q, [t], images=[img]) for img, q, group in zip(images, questions, texts) for t in group]
        with torch.no_grad():
            rm(mrrm.collate(packs, "joint"))

    cost = {}
    for name, fn in (("joint", lambda: score_groups(rm, images, questions, texts, "joint")),
                     ("independent", lambda: score_groups(rm, images, questions, texts, "independent")),
                     ("separate", separate)):
        fn()  # warm-up
        t = time.time()
        for _ in range(repeats):
            fn()
        cost[name] = (time.time() - t) / repeats
    print(f"profile | reward pass joint {cost['joint'] * 1e3:.1f} ms | independent {cost['independent'] * 1e3:.1f} ms | "
          f"joint/independent {cost['joint'] / cost['independent']:.2f} | G separate sequences "
          f"{cost['separate'] * 1e3:.1f} ms (joint/separate {cost['joint'] / cost['separate']:.2f})")
    return (gen, rew, upd), cost


def bench(args):
    """--bench POLICY:RM (sizes from `mrrm.py bench --config`, e.g. 2b:4b): one GRPO step at real
    Qwen3-VL sizes with random weights, no download. One prompt with a --bench-image-tokens image,
    G = --group-size samples of exactly --max-new-tokens tokens (no stop token), the reward pass over
    the group three ways (joint, independent, G separate sequences), the reference pass (beta > 0)
    and one policy update. A warm-up step first; prints seconds per phase and the step's peak memory."""
    check_args(args)
    args.rm_mode = args.rm_mode or "joint"  # random weights: no trained mode to follow
    device = mrrm.pick_device(args.device)
    dtype, autocast = mrrm.precision(device)
    sizes = args.bench.split(":")
    if len(sizes) != 2 or any(s not in ("tiny", *mrrm.BENCH_SIZES) for s in sizes):
        raise ValueError(f"--bench {args.bench!r}: expected POLICY:RM, each one of tiny, {', '.join(mrrm.BENCH_SIZES)}")
    build = lambda size: mrrm.bench_model(argparse.Namespace(config=size, model=""), torch.device(device), dtype)
    policy, sep_id, _ = build(sizes[0])
    rm_backbone, _, _ = build(sizes[1])
    head = mrrm.ValueHead(rm_backbone.cfg.text.hidden_size).to(device)
    torch.manual_seed(args.seed)
    lora.inject_lora(policy, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    policy.grad_checkpointing = args.grad_ckpt
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=args.lr)
    ids, pos, pixels, grid = mrrm.synthetic_prompt(policy.cfg, args.bench_image_tokens, 50, torch.Generator().manual_seed(0))
    prompt = vlm.Batch(ids[None].to(device), pos[:, None].to(device), None if pixels is None else pixels.to(device),
                       None if grid is None else grid.to(device))
    gen = torch.Generator(device).manual_seed(args.seed)
    media = (policy.cfg.image_token_id, policy.cfg.video_token_id)

    def reward_fn(texts, mode):
        one = lambda rs, m: mrrm.pack(ids, pos, rs, sep_id, m, pixel_values=pixels, grid_thw=grid)
        if mode == "separate":  # the single-response reward model: one padded row per (prompt, response)
            b = mrrm.collate([one([t], "joint") for t in texts], "joint")
        else:
            b = mrrm.collate([one(texts, mode)], mode)
        return mrrm.score_fn(rm_backbone, head, b, torch.device(device), causal=mode == "joint")

    for _ in range(2):  # a warm-up step, then the timed one
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = {}
        mrrm.sync(device)
        t0 = time.time()
        with torch.no_grad(), autocast:
            policy.eval()
            out = vlm.generate(policy, prompt, args.max_new_tokens, n=args.group_size, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, generator=gen)
        out = cut_at_media_tokens(out, media)
        mrrm.sync(device)
        t["generation"] = time.time() - t0
        texts = [toks or [sep_id] for toks in out["tokens"]]
        for mode in ("joint", "independent", "separate"):
            fn = reward_fn(texts, mode)
            mrrm.sync(device)
            t0 = time.time()
            with torch.no_grad(), autocast:
                rewards = fn()[:, :args.group_size].float().reshape(1, -1)
            mrrm.sync(device)
            t[f"reward {mode}"] = time.time() - t0
        r = pack_rollouts([prompt], [out])
        t0 = time.time()
        ref_logp = None
        if args.beta:
            with torch.no_grad(), lora.adapter_disabled(policy), autocast:
                ref_logp, _ = token_logprobs(policy, r, args.temperature)
        mrrm.sync(device)
        t["reference"] = time.time() - t0
        t0 = time.time()
        adv, _ = group_advantages(rewards.cpu(), args.adv_std)
        update(policy, opt, params, r, adv.flatten(), ref_logp, args, autocast)
        mrrm.sync(device)
        t["update"] = time.time() - t0
    mem = mrrm.peak_memory_gb(torch.device(device))
    tokens = int(r.completion_mask.sum())
    step = t["generation"] + t[f"reward {args.rm_mode}"] + t["reference"] + t["update"]
    print(f"grpo bench | policy {sizes[0]} ({sum(p.numel() for p in policy.parameters()) / 1e9:.3g}B) + LoRA r {args.lora_r} | "
          f"reward model {sizes[1]} ({sum(p.numel() for p in rm_backbone.parameters()) / 1e9:.3g}B) | {device} {str(dtype)[6:]} | "
          f"image {args.bench_image_tokens} tokens | G {args.group_size} x {args.max_new_tokens} new tokens "
          f"({tokens} sampled) | activation checkpointing {'on' if args.grad_ckpt else 'off'}")
    print(f"grpo bench | step {step:.3f}s ({args.rm_mode} reward) | generation {t['generation']:.3f}s "
          f"({tokens / t['generation']:,.0f} tok/s) | reward joint {t['reward joint'] * 1e3:.1f} ms, independent "
          f"{t['reward independent'] * 1e3:.1f} ms, {args.group_size} separate sequences {t['reward separate'] * 1e3:.1f} ms "
          f"(separate/joint {t['reward separate'] / t['reward joint']:.2f}x) | reference {t['reference']:.3f}s | "
          f"update {t['update']:.3f}s | peak memory {mem:.2f} GiB")
    return {**t, "step": step, "tokens": tokens, "peak_gib": mem}


# -----------------------------------------------------------------------------
# The accuracy curves of finished runs as one PNG (Pillow only: no plotting library at run time)


def eval_curve(run):
    """[(step, held-out sampled accuracy)] from a run folder's metrics.jsonl (its last entry per step)."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; expected a folder written by grpo.py")
    # a run killed mid-write leaves its last line cut: the finished lines still plot, as --resume keeps them
    errors = []
    points = {rec["step"]: rec["eval"]["acc_sampled"] for _, rec in mrrm.read_records(path, errors) if "eval" in rec}
    for e in errors:
        print(f"{e} (line skipped)", file=sys.stderr)
    if not points:
        raise ValueError(f"{path}: no held-out evaluations (was --eval-every 0?)")
    return sorted(points.items())


def plot(specs, out, size=(720, 420)):
    """specs: 'RUN' or 'RUN=LABEL' -> a line chart of held-out sampled accuracy against step in `out`."""
    from PIL import Image, ImageDraw
    runs = [(s.split("=", 1) + [os.path.basename(os.path.normpath(s))])[:2] for s in specs]
    curves = [(label, eval_curve(run)) for run, label in runs]
    W, H = size
    left, right, top, bottom = 56, 20, 20, 44
    last = max(step for _, c in curves for step, _ in c) or 1
    x = lambda step: left + (W - left - right) * step / last
    y = lambda acc: H - bottom - (H - top - bottom) * acc
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    for k in range(6):  # accuracy gridlines 0, 0.2, ..., 1
        d.line([(left, y(k / 5)), (W - right, y(k / 5))], fill=(225, 225, 225))
        d.text((left - 30, y(k / 5) - 6), f"{k / 5:.1f}", fill="black")
    tick = max(1, last // 8)
    for step in range(0, last + 1, tick):
        d.text((x(step) - 8, H - bottom + 6), str(step), fill="black")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    d.text((W // 2 - 110, H - 18), "GRPO step (held-out sampled accuracy)", fill="black")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for i, (label, c) in enumerate(curves):
        col = colors[i % len(colors)]
        pts = [(x(s), y(a)) for s, a in c]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
        d.line([(left + 10, top + 12 + 16 * i), (left + 30, top + 12 + 16 * i)], fill=col, width=3)
        d.text((left + 36, top + 6 + 16 * i), f"{label}: {c[0][1]:.2f} -> max {max(a for _, a in c):.2f}", fill="black")
    im.save(out)
    for label, c in curves:
        print(f"{label}: " + " ".join(f"{s}:{a:.2f}" for s, a in c))
    print(f"wrote {out}")


# -----------------------------------------------------------------------------
# Command line


def parser():
    ap = argparse.ArgumentParser(description="GRPO with group rewards from one multi-response reward-model pass")
    g = ap.add_argument_group("models")
    g.add_argument("--model", default=DEFAULT_MODEL, help="policy backbone folder (Hub layout); LoRA is trained on it")
    g.add_argument("--rm", default="runs/rm", help="reward model folder written by `mrrm.py train` ('' for a merged --rm-model)")
    g.add_argument("--rm-model", default="", help="the reward model's backbone folder (default: the one --rm was trained on, from its rm_config.json)")
    g.add_argument("--rm-mode", choices=mrrm.MODES, default=None,
                   help="joint: one pass, responses see each other (the paper); independent: the single-response "
                        "baseline (default: the mode the reward model was trained in)")
    g.add_argument("--rm-shuffle", action=argparse.BooleanOptionalAction, default=False,
                   help="pack each group in a fresh random order (joint mode sees order; samples are i.i.d. already)")
    g.add_argument("--merge-duplicates", action=argparse.BooleanOptionalAction, default=True,
                   help="identical responses in a group share the mean of their scores")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.0,
                   help="on in the update passes only: sampling and the old/reference log-probs run without it")
    g = ap.add_argument_group("sampling")
    g.add_argument("--group-size", "-G", type=int, default=8, help="completions per prompt (G)")
    g.add_argument("--prompts-per-step", type=int, default=4)
    g.add_argument("--max-new-tokens", type=int, default=48, help="completion length limit (a shape-world "
                   "description takes up to 42 tokens)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g = ap.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=400, help="about 3.5 minutes on 2 CPU cores with the shape-world policy")
    g.add_argument("--stop-at", type=int, default=0, help="stop (with a checkpoint) at this step; continue with --resume")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=5, help="linear warmup steps, then constant")
    g.add_argument("--iterations", type=int, default=1, help="mu: optimizer steps per batch of rollouts")
    g.add_argument("--eps-low", type=float, default=0.2, help="ratio clipped below at 1 - eps_low")
    g.add_argument("--eps-high", type=float, default=0.28, help="ratio clipped above at 1 + eps_high (DAPO clip-higher)")
    g.add_argument("--beta", type=float, default=0.1, help="k3 KL coefficient to the adapter-disabled reference (0: no reference pass)")
    g.add_argument("--aggregation", choices=AGGREGATIONS, default="token-mean",
                   help="token-mean, sequence-mean (GRPO paper) or constant (Dr.GRPO: sum / (B * max_new_tokens))")
    g.add_argument("--adv-std", action=argparse.BooleanOptionalAction, default=True,
                   help="divide advantages by the group std (--no-adv-std: Dr.GRPO)")
    g.add_argument("--mask-truncated", action=argparse.BooleanOptionalAction, default=False,
                   help="leave completions that hit --max-new-tokens out of the loss")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing in the policy update (recompute instead of storing; for long completions)")
    g = ap.add_argument_group("run")
    g.add_argument("--out", default="runs/grpo")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto: cuda if available (bf16 autocast), else cpu")
    g.add_argument("--threads", type=mrrm.nonnegative_int, default=1,
                   help="torch CPU threads; a tiny model decodes fastest on one, above all on a shared machine (0: torch's default)")
    g.add_argument("--log-every", type=int, default=5)
    g.add_argument("--eval-every", type=int, default=50, help="held-out accuracy every K steps, and before step 1 (0: never)")
    g.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts: the first of the shape-world held-out split")
    g.add_argument("--eval-samples", type=int, default=4, help="sampled answers per held-out prompt")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps (always at the end)")
    g.add_argument("--resume", action="store_true", help="continue from --out's latest checkpoint")
    g.add_argument("--profile", action="store_true", help="print the time split and the joint/independent reward cost")
    g = ap.add_argument_group("bench: one timed step at real sizes with random weights (nothing is saved)")
    g.add_argument("--bench", default="", metavar="POLICY:RM",
                   help="e.g. 2b:4b (sizes of `mrrm.py bench --config`); with -G, --max-new-tokens, --grad-ckpt, --beta")
    g.add_argument("--bench-image-tokens", type=int, default=1024, help="merged image tokens in the bench prompt")
    g = ap.add_argument_group("plot: the held-out accuracy curves of finished runs (nothing is trained)")
    g.add_argument("--plot", nargs="+", default=[], metavar="RUN[=LABEL]", help="run folders written by grpo.py")
    g.add_argument("--plot-out", default="grpo_curves.png")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.plot:
        return mrrm.run_cli(lambda a: plot(a.plot, a.plot_out), args)
    return mrrm.run_cli(bench if args.bench else train, args)


if __name__ == "__main__":
    main()
