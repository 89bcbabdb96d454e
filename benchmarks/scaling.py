"""Rollout and update time vs batch size, completion length and model width (a table of rows).

    python benchmarks/scaling.py [--repeats 2] [--warmup 1]

Base point: 64 rows (16 prompts x 4 samples), 8 new tokens, width 64 (2 layers, 4 heads, block 32); each
row of the table varies one of batch rows (16, 64, 256), new tokens (4, 8, 16) or width (32, 64, 128).
EOS is disabled so every completion runs the full length. Rollout = batched KV-cache generation; update
= one PPO epoch of one minibatch (forward, loss, backward, clip, AdamW step) through `PPOModule.ppo_update`.
Policies are one-step SFT checkpoints (`rlhf fit --config configs/toy/sft.yaml --trainer.max_steps=1`).
Prints one JSON line with `rows`: medians in ms plus per-token figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402
from harness import harness_module, ppo_iteration, prompt_batch, sft_checkpoint  # noqa: E402

SAMPLES = 4


def measure(ckpt: Path, rows: int, new_tokens: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    module = harness_module(ckpt, rollout={"samples_per_prompt": SAMPLES, "max_new_tokens": new_tokens, "advantage": "batch_mean"},
                            update={"ppo_epochs": 1, "num_minibatches": 1}, kl={"beta": 0.05}, optim={"lr": 1e-4})
    module.train()
    batch = prompt_batch(module, rows // SAMPLES)
    rollout, update = [], []
    for i in range(warmup + repeats):
        times, _ = ppo_iteration(module, batch, eos=False)
        if i >= warmup:
            rollout.append(times["rollout"])
            update.append(times["update"])
    r, u = statistics.median(rollout), statistics.median(update)
    tokens = rows * new_tokens
    return {"rollout_ms": round(r * 1e3, 2), "update_ms": round(u * 1e3, 2),
            "rollout_us_per_token": round(r / tokens * 1e6, 2), "update_us_per_token": round(u / tokens * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = {"rows": 64, "new_tokens": 8, "width": 64}
    points = [dict(base, rows=b) for b in (16, 64, 256)] + [dict(base, new_tokens=n) for n in (4, 8, 16)] + [dict(base, width=w) for w in (32, 64, 128)]
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {}
        for width in sorted({p["width"] for p in points}):
            cwd = Path(tmp) / f"w{width}"
            cwd.mkdir()
            ckpts[width] = sft_checkpoint(cwd, 1, [f"--model.init_args.model.n_embd={width}", "--model.init_args.model.block_size=32"])
        for varied, point in zip(["rows"] * 3 + ["new_tokens"] * 3 + ["width"] * 3, points):
            table.append({"varied": varied, **point, **measure(ckpts[point["width"]], point["rows"], point["new_tokens"], args.repeats, args.warmup)})
    emit("scaling", {"samples_per_prompt": SAMPLES, "layers": 2, "heads": 4, "repeats": args.repeats, "rows": table})


if __name__ == "__main__":
    main()
