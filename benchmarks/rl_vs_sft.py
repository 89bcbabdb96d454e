"""What RL adds once demonstrations are used up: SFT continued vs PPO with the judge, same seconds.

For each seed:

1. an SFT start trained on demonstrations for `--demo_fraction` of the `train` prompts until its `val`
   accuracy has plateaued (less than 0.01 gained over the last 20% of its epochs; the tail is printed);
2. two arms from that same checkpoint, each given `--seconds` of training (Lightning's `max_time`):
   (a) SFT continued on the same demonstrations, fresh optimizer and schedule;
   (b) PPO with the judge's 0/1 reward on all `train` prompts (gold answers reach it only through the judge);
3. each arm's `test` accuracy at its best evaluation on `val`.

Each arm's learning rate comes from one small sweep on the first seed, scored on `val`. Prints one JSON line:
{"demo_fraction", "seeds", "sft": {"test_accuracy", "seconds", "lr"}, "rl": {...}, "start": {...}, ...}

    python benchmarks/rl_vs_sft.py                  # about 14 minutes on 2 cores
    python benchmarks/rl_vs_sft.py --seeds 0 --seconds 30 --sweep_seconds 10    # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rlhf_lightning.callbacks import FinalCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SFT_YAML = str(ROOT / "configs" / "toy" / "sft.yaml")
PPO_YAML = str(ROOT / "configs" / "toy" / "ppo.yaml")
QUIET = [
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
    "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",  # this script adds its own
]


class ValCurve(L.Callback):
    """`eval/accuracy` after each SFT validation."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if "eval/accuracy" in trainer.callback_metrics and not trainer.sanity_checking:
            self.values.append(round(float(trainer.callback_metrics["eval/accuracy"]), 4))


@contextmanager
def working_dir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def fit(args: list[str], callbacks: list[L.Callback] = ()):
    """`rlhf fit` in-process; returns (cli, wall seconds of `trainer.fit`)."""
    from rlhf_lightning.cli import lightning_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = lightning_cli(args, run=False)
        cli.trainer.callbacks.extend(callbacks)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, time.perf_counter() - start


def duration(seconds: float) -> str:
    """Lightning's `max_time` format DD:HH:MM:SS (whole seconds)."""
    s = int(round(seconds))
    return f"00:{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def test_accuracy(ckpt: Path) -> float:
    from rlhf_lightning.evaluate import evaluate_policy

    return round(evaluate_policy(str(ckpt), split="test", max_new_tokens=6)[0]["accuracy"], 4)


def sft_start(cwd: Path, fraction: float, epochs: int, seed: int) -> dict:
    """Train the SFT start; returns its val curve, the plateau check and its test accuracy."""
    curve = ValCurve()
    with working_dir(cwd):
        _, wall = fit([
            "--config", SFT_YAML, *QUIET, f"--seed_everything={seed}", f"--trainer.max_epochs={epochs}",
            "--trainer.check_val_every_n_epoch=10", f"--data.init_args.demo_fraction={fraction}",
            "--data.init_args.max_val_prompts=256",
        ], [curve, FinalCheckpoint("start.ckpt")])
    tail = curve.values[-max(2, len(curve.values) // 5):]  # the evaluations of the last 20% of the epochs
    return {
        "epochs": epochs, "seconds": round(wall, 1), "val_tail": tail, "tail_gain": round(tail[-1] - tail[0], 4),
        "plateaued": tail[-1] - tail[0] < 0.01, "test_accuracy": test_accuracy(cwd / "start.ckpt"),
    }


def sft_arm(cwd: Path, fraction: float, lr: float, seconds: float, seed: int, out: str, start: dict) -> tuple[float, float, float]:
    """(best val accuracy, wall seconds, test accuracy at the best val) of SFT continued from start.ckpt.

    The start itself is a candidate, as PPO's evaluation before its first update is."""
    curve = ValCurve()
    best = ModelCheckpoint(dirpath=cwd / out, filename="best", monitor="eval/accuracy", mode="max", save_top_k=1)
    with working_dir(cwd):
        _, wall = fit([
            "--config", SFT_YAML, *QUIET, f"--seed_everything={seed}", "--trainer.max_epochs=100000",
            f"--trainer.max_time={duration(seconds)}", "--trainer.check_val_every_n_epoch=5",
            f"--data.init_args.demo_fraction={fraction}", "--data.init_args.max_val_prompts=256",
            "--model.init_args.init_ckpt=start.ckpt", f"--model.init_args.optim.lr={lr}", "--model.init_args.optim.warmup_steps=0",
        ], [curve, best])
    if not curve.values or max(curve.values) <= start["val_tail"][-1]:
        return start["val_tail"][-1], wall, start["test_accuracy"]
    return max(curve.values), wall, test_accuracy(Path(best.best_model_path))


def rl_arm(cwd: Path, lr: float, seconds: float, seed: int, out: str, extra: tuple[str, ...] = ()) -> tuple[float, float, float]:
    """(best val accuracy, wall seconds, test accuracy of the best-on-val policy) of PPO with the judge;
    `extra` options (e.g. LoRA) come last."""
    with working_dir(cwd):
        cli, wall = fit([
            "--config", PPO_YAML, *QUIET, f"--seed_everything={seed}", f"--model.init_args.rollout.seed={seed}",
            f"--data.init_args.seed={seed}", "--trainer.max_epochs=100000",
            f"--trainer.max_time={duration(seconds)}", "--model.init_args.policy_ckpt=start.ckpt",
            "--model.init_args.reward.source=judge", f"--model.init_args.optim.lr={lr}", *RL_OPTIONS,
            "--data.init_args.max_val_prompts=256", *extra,
        ], [FinalCheckpoint(f"{out}.ckpt")])
    best = max(e["eval/accuracy"] for e in cli.model.eval_history)
    print(f"[rl_vs_sft] rl lr {lr} {' '.join(extra)}: {cli.model._rollouts} rollouts, val {[round(e['eval/accuracy'], 4) for e in cli.model.eval_history]}", file=sys.stderr, flush=True)
    return best, wall, test_accuracy(cwd / f"{out}.ckpt")


#: PPO's settings in the RL arm (besides the judge reward and the learning rate).
RL_OPTIONS = [
    "--model.init_args.rollout.advantage=group_mean", "--model.init_args.rollout.filter_groups=true", "--model.init_args.kl.beta=0.0",
    "--model.init_args.rollout.temperature=1.5", "--model.init_args.rollout.samples_per_prompt=8", "--data.init_args.batch_size=64",
    "--model.init_args.update.ppo_epochs=1", "--model.init_args.update.num_minibatches=2", "--model.init_args.optim.warmup_steps=10",
    "--model.init_args.eval.every=10",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_fraction", type=float, default=0.05)
    parser.add_argument("--start_epochs", type=int, default=300, help="SFT epochs of the start (until plateau)")
    parser.add_argument("--seconds", type=float, default=90.0, help="training seconds of each arm")
    parser.add_argument("--sweep_seconds", type=float, default=30.0)
    parser.add_argument("--sft_lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--rl_lrs", type=float, nargs="+", default=[3e-4, 6e-4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    result: dict = {"demo_fraction": args.demo_fraction, "seeds": args.seeds, "seconds_per_arm": args.seconds}
    sft = {"test_accuracy": [], "seconds": [], "val_best": []}
    rl = {"test_accuracy": [], "seconds": [], "val_best": []}
    starts = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, seed in enumerate(args.seeds):
            cwd = Path(tmp) / f"seed{seed}"
            cwd.mkdir()
            start = sft_start(cwd, args.demo_fraction, args.start_epochs, seed)
            print(f"[rl_vs_sft] seed {seed}: SFT start {start}", file=sys.stderr, flush=True)
            starts.append(start)
            if n == 0:  # one small sweep, scored on val, picks each arm's learning rate
                sweep = {
                    "sft": {lr: sft_arm(cwd, args.demo_fraction, lr, args.sweep_seconds, seed, f"sweep_sft_{lr}", start)[0] for lr in args.sft_lrs},
                    "rl": {lr: rl_arm(cwd, lr, args.sweep_seconds, seed, f"sweep_rl_{lr}")[0] for lr in args.rl_lrs},
                }
                sft["lr"] = max(sweep["sft"], key=sweep["sft"].get)
                rl["lr"] = max(sweep["rl"], key=sweep["rl"].get)
                result["sweep_val"] = {arm: {str(k): v for k, v in d.items()} for arm, d in sweep.items()}
                print(f"[rl_vs_sft] sweep on val: {result['sweep_val']}", file=sys.stderr, flush=True)
            for arm, figures, run in (
                ("sft", sft, lambda: sft_arm(cwd, args.demo_fraction, sft["lr"], args.seconds, seed, "arm_sft", start)),
                ("rl", rl, lambda: rl_arm(cwd, rl["lr"], args.seconds, seed, "arm_rl")),
            ):
                val, wall, test = run()
                figures["val_best"].append(round(val, 4))
                figures["seconds"].append(round(wall, 1))
                figures["test_accuracy"].append(test)
                print(f"[rl_vs_sft] seed {seed}: {arm} val {val:.4f} test {test:.4f} in {wall:.1f} s", file=sys.stderr, flush=True)
    result.update(
        sft=sft, rl=rl, start=starts,
        rl_minus_sft=[round(r - s, 4) for r, s in zip(rl["test_accuracy"], sft["test_accuracy"])],
        rl_options=RL_OPTIONS, total_s=round(time.perf_counter() - begin, 1),
    )
    emit("rl_vs_sft", result)


if __name__ == "__main__":
    main()
