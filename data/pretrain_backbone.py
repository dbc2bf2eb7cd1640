"""
data/pretrain_backbone.py: pretrain the tiny Qwen3-VL that mrrm's default demo starts from.

What it does: builds a byte-level BPE tokenizer on shape-world text (data/shapeworld.py), a small
Qwen3-VL config (text 128 wide x 4 layers, vision 64 wide x 2 blocks, 8 px patches, so a 64x64
image is 16 LLM tokens), and trains every weight with next-token loss on the assistant turn only:

    <|im_start|>user\\n<|vision_start|>16 x <|image_pad|><|vision_end|>QUESTION<|im_end|>\\n
    <|im_start|>assistant\\nANSWER<|im_end|>          <- loss on ANSWER and its <|im_end|>

Questions come from shapeworld.balanced_question (colour, count, position, describe; a describe
answer is a caption), answers in the rank-1 wording, so the policy's answers parse with
shapeworld.parse_answer. The result is saved in the Hub layout (config.json, model.safetensors,
tokenizer.json, preprocessor/video_preprocessor/generation configs) plus pretrain.json holding this
run's settings and its final held-out accuracies.

The backbone has two jobs:
  1. the reward model's backbone: captions and QA teach the language model to read the vision
     tower's features (which colour, kind, size and cell each shape has), so LoRA + a value head
     can rank responses. The vision tower stays at its random init unless --train-vision: trained
     end to end from scratch this tiny tower drifted and colour answers stayed at chance, so it is
     trained only in a second stage, once the language model reads it (below).
  2. the start of the GRPO demo's policy, which should be imperfect. --answer-noise (off by
     default) replaces, after the first --clean-frac of the steps, a target by the sample's rank-2
     (hedged) or rank-3 (near miss) response with that probability; --init continues from an
     existing backbone, e.g. to make the noisier policy from this one (below).

Run (once, by developers; the folder is committed), in stages on a 2-core machine:
    python data/pretrain_backbone.py --out data/shapeworld-backbone --seed 0 --threads 2      # 9,000 steps, 1,237 s
    python data/pretrain_backbone.py --init data/shapeworld-backbone --out data/shapeworld-backbone \
        --train-vision --steps 4000 --lr 1e-3 --threads 2                                       # 4,000 steps, 590 s
    python data/pretrain_backbone.py --init data/shapeworld-backbone --out data/shapeworld-backbone \
        --train-vision --steps 3000 --lr 1e-3 --threads 1                                       # 3,000 more, 713 s
Greedy answers on the 1,000 held-out questions (the shape-world split's held-out samples, which no
stage trains on), right overall / colour / count / describe / position:
    stage 1: 0.796 / 1.00 / 0.97 / 0.77 / 0.44   the language model learns to read the frozen random tower
    stage 2: 0.904 / 1.00 / 0.99 / 0.98 / 0.64   the tower unfreezes, at a third of the learning rate
    stage 3: 0.973 / 1.00 / 0.99 / 0.99 / 0.91   the same again (sampled at T=1: 0.95)
Stage 1 is slow (loss 0.49 after 1,000 steps, 0.36 after 2,500, 0.24 after 4,000; the previous
backbone's sat near 0.42 for thousands of steps). Stage 2 works now that the language model gives
the tower useful gradients; positions are what it fixes, and they needed the third stage: the previous backbone,
made with only 200 held-out samples left out, reached position 0.96 on those 200 after 4,000 steps
of stage 2, this one 0.64. pretrain.json holds the last stage's settings and accuracies,
metrics.jsonl its loss curve.

The GRPO demo's policy (data/shapeworld-policy; 142 s): greedy still 0.94, but sampled at T=1
only 0.47 of its answers are exact (the rest hedge or miss by one rung):
    python data/pretrain_backbone.py --init data/shapeworld-backbone --out data/shapeworld-policy \
        --answer-noise 0.5 --clean-frac 0 --steps 800 --lr 1e-3 --threads 2

Data: every step draws fresh scenes from a stream seeded by --seed, which restarts with each run: the
stage commands above all use seed 0, so stages 2 and 3 trained on stage 1's first 4,000 and 3,000
batches again (that is how the committed backbone was made; give a stage another --seed for new
scenes). Whatever --seed is, the (image, question) pairs of the default split's 1,000 held-out
samples (--split-seed 0) are never trained on; their images are, under other questions (a world of
324 one-shape scenes repeats: 327 of the 1,000 held-out images appear in stage 1's stream, 162 of
them with "Describe the image.", whose caption states the held-out answer).

Left out: a separate caption-only stage, learning-rate search, mixed precision, and checkpointing
mid-run (a run is minutes).
"""

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mrrm  # noqa: E402  (the repo root holds mrrm.py and vlm.py)
import vlm  # noqa: E402
from data import shapeworld as sw  # noqa: E402

IMAGE_SIDE = 48  # shape-world images: 6x6 patches of 8 px, merged 2x2 into 3x3 tokens, one per grid cell


def tokenizer_corpus(n, seed):
    """Shape-world text for the BPE: questions, every response rank, captions and the chat words."""
    rng = random.Random(f"pretrain-corpus:{seed}")
    lines = ["user\n", "assistant\n", "system\n"]
    for _ in range(n):
        scene, question = sw.balanced_question(rng)
        lines.append(question.text)
        lines += [text for text, _ in sw.make_responses(scene, question, rng)]
        lines += [f"{q} {a}" for q, a in sw.qa_pairs(scene, rng)]
    return lines


def draw_example(rng, proc, answer_noise, exclude):
    """One training sequence: (ids, positions (3, T), pixel rows, grid, index where the answer starts)."""
    while True:
        scene, question = sw.balanced_question(rng)
        if sw.sample_id(scene, question) not in exclude:
            break
    responses = dict((rank, text) for text, rank in sw.make_responses(scene, question, rng))
    target = responses[1]
    if rng.random() < answer_noise:
        target = responses[rng.choice((2, 3))]  # vague or near miss: plausible, parseable, not exact
    image = sw.render(scene, IMAGE_SIDE)
    ids, rows, grids = proc.encode_user([image], (), question.text)
    start = len(ids)
    ids = ids + proc.tokenizer.encode(target) + [proc.tok["<|im_end|>"]]
    ids = torch.tensor(ids)
    grid = torch.tensor(grids, dtype=torch.long)
    return ids, vlm.rope_positions(ids, grid, proc.cfg), rows[0], grid, start


def make_batch(examples, pad_id):
    """Right-pad a list of examples. With causal attention a real token never sees a later pad, so
    no mask is needed; the loss ignores pads and the prompt (target -100)."""
    B, T = len(examples), max(len(e[0]) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(3, B, T, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    for b, (x, p, _, _, start) in enumerate(examples):
        n = len(x)
        ids[b, :n], pos[:, b, :n] = x, p
        # position t predicts token t+1: targets are the answer tokens and the closing <|im_end|>
        targets[b, start - 1:n - 1] = x[start:]
    rows = torch.cat([e[2] for e in examples])  # (B * 64, C*T*p*p)
    grids = torch.cat([e[3] for e in examples])  # (B, 3)
    return ids, pos, rows, grids, targets


@torch.no_grad()
def evaluate(model, proc, samples, temperature, seed, max_new_tokens=80):
    """Exact-answer accuracy per category (shapeworld.is_correct) and the fraction that parse."""
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for s in samples:
        rec = s["record"]
        batch = proc.chat(images=[s["image"]], text=rec["prompt"])
        out = vlm.generate(model, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_ids=proc.stop_ids, generator=g)
        text = proc.tokenizer.decode(out["tokens"][0])
        c = stats.setdefault(rec["category"], [0, 0, 0])
        c[0] += sw.is_correct(rec, text)
        c[1] += sw.parse_answer(rec["category"], text) is not None
        c[2] += 1
    total = [sum(c[i] for c in stats.values()) for i in range(3)]
    result = {"acc": total[0] / total[2], "parsed": total[1] / total[2]}
    result.update({f"acc_{k}": round(c[0] / c[2], 4) for k, c in sorted(stats.items())})
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain the tiny shape-world Qwen3-VL backbone.")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="data/shapeworld-backbone", help="checkpoint folder (Hub layout)")
    g.add_argument("--seed", type=int, default=0, help="seeds the tokenizer corpus, weights and data stream")
    g.add_argument("--init", default="", help="start from this pretrained backbone folder instead of random weights")
    g.add_argument("--split-seed", type=int, default=0,
                   help="the shape-world split (data/shapeworld.py --seed) whose held-out pairs are left out and scored")
    g = parser.add_argument_group("model")
    g.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary, special tokens included")
    g.add_argument("--hidden", type=int, default=128, help="text hidden size")
    g.add_argument("--layers", type=int, default=4, help="text decoder layers")
    g.add_argument("--intermediate", type=int, default=384, help="text MLP width")
    g.add_argument("--v-hidden", type=int, default=64, help="vision hidden size")
    g.add_argument("--v-depth", type=int, default=2, help="vision blocks")
    g = parser.add_argument_group("training")
    g.add_argument("--steps", type=int, default=9000, help="optimizer steps")
    g.add_argument("--batch", type=int, default=32, help="sequences per step (fresh scenes each step)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps, then cosine to lr/10")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--answer-noise", type=float, default=0.0,
                   help="chance that a target is the rank-2 (vague) or rank-3 (near miss) response "
                        "instead of the exact answer: 0 gives the best policy, higher a worse one")
    g.add_argument("--clean-frac", type=float, default=0.5,
                   help="fraction of steps, at the start, trained on exact answers only (no noise)")
    g.add_argument("--train-vision", action="store_true", help="train the vision tower too (default: frozen at init)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--heldout", type=int, default=1000,
                   help="held-out samples: never trained on, scored at the end (the shape-world split's first N)")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    if args.init:  # continue from a pretrained backbone (e.g. a noisier policy made from the RM's backbone)
        if os.path.abspath(args.init) != os.path.abspath(args.out):
            shutil.copytree(args.init, args.out, dirs_exist_ok=True)
    else:  # tokenizer + config + random weights, in the Hub layout; min/max pixels keep 48x48 at 48x48
        corpus = tokenizer_corpus(2000, args.seed)
        head_dim = 32
        vlm.write_tiny_checkpoint(
            args.out, seed=args.seed, vocab_size=args.vocab_size, corpus=corpus, min_pixels=32 * 32,
            max_pixels=128 * 128, t_hidden_size=args.hidden, t_intermediate_size=args.intermediate,
            t_num_hidden_layers=args.layers, t_num_attention_heads=args.hidden // head_dim,
            t_num_key_value_heads=max(1, args.hidden // head_dim // 2), t_head_dim=head_dim,
            # (t, h, w) frequency split of head_dim / 2 = 16, in Qwen3-VL's proportion (24, 20, 20)
            t_mrope_section=(6, 5, 5), v_hidden_size=args.v_hidden, v_intermediate_size=4 * args.v_hidden,
            v_num_heads=2, v_depth=args.v_depth, v_num_position_embeddings=36, v_deepstack_visual_indexes=(0,))
    torch.manual_seed(args.seed)
    model = vlm.load_model(args.out).train()
    proc = vlm.Processor(args.out, model.cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    print(f"params {n_params} | vision {n_vision} | vocab {model.cfg.text.vocab_size} | out {args.out}")

    heldout = sw.heldout_samples(args.heldout, args.split_seed, IMAGE_SIDE)
    exclude = {s["record"]["id"] for s in heldout}
    rng = random.Random(f"pretrain:{args.seed}")
    pad_id = proc.tokenizer.token_id("<|endoftext|>")
    if not args.train_vision:
        # The vision tower keeps its random init: random patch features already separate flat colours and
        # grid cells, and the language model learns to read them fast (colour of a lone shape: 0.88 after
        # 400 steps). Trained end to end from scratch, this tiny tower drifted and the colour answers
        # stayed at chance for 1,200 steps, even at a tenth of the learning rate (its gradients do match
        # transformers'); the reward model's LoRA leaves it frozen too.
        model.model.visual.requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    log_path = os.path.join(args.out, "metrics.jsonl")
    losses, history, t_train = [], [], time.perf_counter()
    with open(log_path, "w") as log:
        for step in range(args.steps):
            lr = mrrm.lr_at(step, args.steps, args.lr, args.warmup, "cosine", min_ratio=0.1)
            for group in opt.param_groups:
                group["lr"] = lr
            noise = args.answer_noise if step >= args.clean_frac * args.steps else 0.0
            ids, pos, rows, grids, targets = make_batch(
                [draw_example(rng, proc, noise, exclude) for _ in range(args.batch)], pad_id)
            logits = model(ids, rows, grids, pos)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                mean = sum(losses) / len(losses)
                elapsed = time.perf_counter() - t_train
                eta = elapsed / (step + 1) * (args.steps - step - 1)
                print(f"step {step + 1}/{args.steps} | loss {mean:.4f} | lr {lr:.2e} | "
                      f"elapsed {elapsed:.0f}s | eta {eta:.0f}s", flush=True)
                history.append({"step": step + 1, "loss": mean, "lr": lr, "seconds": round(elapsed, 1)})
                log.write(json.dumps(history[-1]) + "\n")
                losses = []
    train_seconds = time.perf_counter() - t_train

    model.eval()
    vlm.save_model(model, args.out)
    greedy = evaluate(model, proc, heldout, 0.0, args.seed)
    sampled = evaluate(model, proc, heldout, 1.0, args.seed)
    for name, r in (("greedy", greedy), ("T=1", sampled)):
        print(f"heldout {name} | " + " | ".join(f"{k} {v:.3f}" for k, v in r.items()))
    record = {"script": "data/pretrain_backbone.py", "args": vars(args), "params": n_params,
              "vision_params": n_vision, "train_seconds": round(train_seconds, 1),
              "total_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
              "final_loss": history[-1]["loss"] if history else None,
              "heldout_greedy": greedy, "heldout_sampled_t1": sampled}
    with open(os.path.join(args.out, "pretrain.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"saved {args.out} | train {train_seconds:.0f}s | total {record['total_seconds']:.0f}s")
    return record, history


if __name__ == "__main__":
    main()
