"""One PPO iteration split into rollout (generation), reward, reference forward and update; update cost vs plain fwd+bwd.

    python benchmarks/ppo_step.py [--prompts 64] [--samples 4] [--ppo_epochs 4] [--repeats 5] [--sft_steps 5]

Makes a briefly trained toy SFT checkpoint in a temp dir (`rlhf fit --config configs/toy/sft.yaml
--trainer.max_steps=N`), builds a PPOModule on it with the judge reward (the toy PPO config otherwise:
64 prompts x 4 samples, 5 new tokens, 4 PPO epochs of 1 minibatch), and times each part of an iteration
directly around the calls `make_rollout` / `ppo_update` make. The update is compared per token with a
plain forward + backward (and with fwd + bwd + clip + AdamW step) of the same rollout batch, per
minibatch step (goal: <= 1.5x). Prints one JSON line of medians (ms) after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, median_time  # noqa: E402
from harness import harness_module, plain_step, ppo_iteration, prompt_batch, sft_checkpoint  # noqa: E402
from rlhf_lightning.optim import adamw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=5)
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sft_steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = sft_checkpoint(Path(tmp), args.sft_steps)
        module = harness_module(
            ckpt, rollout={"samples_per_prompt": args.samples, "max_new_tokens": args.new_tokens, "advantage": "batch_mean"},
            update={"ppo_epochs": args.ppo_epochs, "num_minibatches": args.minibatches}, kl={"beta": 0.05}, optim={"lr": 1e-4},
        )
    module.train()
    batch = prompt_batch(module, args.prompts)
    parts: dict[str, list[float]] = {}
    tokens = []
    rollout = None
    for i in range(args.warmup + args.repeats):
        times, rollout = ppo_iteration(module, batch)
        if i >= args.warmup:
            for k, v in times.items():
                parts.setdefault(k, []).append(v)
            tokens.append(int(rollout.completion_mask.sum()))
    med = {k: statistics.median(v) for k, v in parts.items()}
    steps = args.ppo_epochs * args.minibatches
    per_step = med["update"] / steps  # one minibatch: forward + loss + backward + clip + optimizer step (+ metrics)
    # Plain baselines on the last rollout, split as the update splits it (one minibatch = rows / minibatches).
    mb = rollout.select(torch.arange(rollout.completion_ids.size(0) // args.minibatches))
    model = module.model
    optimizer = adamw(model, 0.0, 0.0)  # the modules' AdamW; lr 0: same arithmetic, weights unchanged
    fwd_bwd = median_time(lambda: plain_step(model, mb), args.repeats * 2)
    fwd_bwd_step = median_time(lambda: plain_step(model, mb, optimizer), args.repeats * 2)
    mb_tokens = int(mb.completion_mask.sum())
    total = sum(med[k] for k in ("rollout", "reward", "reference", "advantages", "update"))
    emit("ppo_step", {
        "rows": args.prompts * args.samples, "new_tokens": args.new_tokens, "ppo_epochs": args.ppo_epochs,
        "minibatches": args.minibatches, "completion_tokens": int(statistics.median(tokens)),
        **{f"{k}_ms": round(v * 1e3, 2) for k, v in med.items()},
        "iteration_ms": round(total * 1e3, 2),
        "update_per_minibatch_ms": round(per_step * 1e3, 2),
        "update_us_per_token": round(per_step / mb_tokens * 1e6, 3),
        "plain_fwd_bwd_us_per_token": round(fwd_bwd / mb_tokens * 1e6, 3),
        "plain_fwd_bwd_step_us_per_token": round(fwd_bwd_step / mb_tokens * 1e6, 3),
        "update_vs_fwd_bwd": round(per_step / fwd_bwd, 2),
        "update_vs_fwd_bwd_step": round(per_step / fwd_bwd_step, 2),
        "goal_update_vs_fwd_bwd": 1.5,
        "repeats": args.repeats,
    })


if __name__ == "__main__":
    main()
