"""PPO with LoRA adapters (rank 8) against full-weight PPO, same seconds, from the same full SFT start.

The start and the PPO settings are `rl_vs_sft.py`'s (an SFT policy trained on 5% of the demonstrations until
`val` plateaus; PPO with the judge's reward, `group_mean`, dynamic sampling, K = 8). Full PPO runs at the
learning rate `rl_vs_sft.py`'s sweep chose (6e-4); LoRA's adapters take a larger step, so its learning rate comes
from a short sweep on `val`. Each arm reports `test` accuracy at its best evaluation on `val`. Prints one JSON line.

    python benchmarks/lora_vs_full.py                     # about 8 minutes on 2 cores
    python benchmarks/lora_vs_full.py --seconds 30 --sweep_seconds 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402
from rl_vs_sft import RL_OPTIONS, rl_arm, sft_start  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_fraction", type=float, default=0.05)
    parser.add_argument("--start_epochs", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=90.0, help="training seconds of each arm")
    parser.add_argument("--sweep_seconds", type=float, default=30.0)
    parser.add_argument("--full_lr", type=float, default=6e-4)
    parser.add_argument("--lora_lrs", type=float, nargs="+", default=[2e-3, 6e-3])
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    lora = (f"--model.init_args.lora={{r: {args.lora_r}}}",)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        start = sft_start(cwd, args.demo_fraction, args.start_epochs, args.seed)
        print(f"[lora_vs_full] SFT start {start}", file=sys.stderr, flush=True)
        sweep = {lr: rl_arm(cwd, lr, args.sweep_seconds, args.seed, f"sweep_lora_{lr}", lora)[0] for lr in args.lora_lrs}
        lora_lr = max(sweep, key=sweep.get)
        arms = {}
        for name, lr, extra in (("full", args.full_lr, ()), ("lora", lora_lr, lora)):
            val, wall, test = rl_arm(cwd, lr, args.seconds, args.seed, f"arm_{name}", extra)
            arms[name] = {"test_accuracy": test, "val_best": round(val, 4), "seconds": round(wall, 1), "lr": lr}
            print(f"[lora_vs_full] {name}: val {val:.4f} test {test:.4f} in {wall:.1f} s", file=sys.stderr, flush=True)
    emit("lora_vs_full", {
        "seed": args.seed, "seconds_per_arm": args.seconds, "lora_r": args.lora_r, "start": start,
        "lora_sweep_val": {str(k): v for k, v in sweep.items()}, **arms,
        "lora_minus_full": round(arms["lora"]["test_accuracy"] - arms["full"]["test_accuracy"], 4),
        "rl_options": RL_OPTIONS, "total_s": round(time.perf_counter() - begin, 1),
    })


if __name__ == "__main__":
    main()
