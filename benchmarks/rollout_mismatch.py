"""Rollout/training mismatch: PPO whose rollouts decode in bf16 autocast (a lower-precision rollout engine) while
the update runs in fp32, with and without the importance-sampling correction (`rollout.rollout_is`).

    python benchmarks/rollout_mismatch.py [--rollouts 60] [--seed 0]

One SFT start (5% of the demonstrations, 150 epochs), then three PPO arms from it with the judge's reward, the
same seed and settings: `fp32` (the decode in fp32: no mismatch), `bf16` (the decode in bf16, uncorrected) and
`bf16_tis` (the decode in bf16, truncated importance weights pi_train / pi_rollout capped at 2). For each arm: the mean
`rollout/logprob_mismatch` (mean |log p_train - log p_rollout| per token), the largest
`rollout/logprob_mismatch_max_ratio`, the mean first-minibatch |ratio - 1| (the PPO ratio a mismatch moves off 1
before any update), the share of tokens whose weight was truncated, and the `val` accuracy every 10 rollouts.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUIET = [
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
    "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
]
ARMS = {
    "fp32": [],
    "bf16": ["--model.init_args.rollout.dtype=bfloat16"],
    "bf16_tis": ["--model.init_args.rollout.dtype=bfloat16", "--model.init_args.rollout.rollout_is=tis"],
}


class StepFigures(L.Callback):
    """The mismatch figures of every rollout, from the step's logged metrics."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        update = dict(pl_module.last_update)
        metrics = trainer.callback_metrics
        self.rows.append({
            "mismatch": float(metrics["rollout/logprob_mismatch"]),
            "max_ratio": float(metrics["rollout/logprob_mismatch_max_ratio"]),
            "first_ratio_error": update.get("first_ratio_error", float("nan")),
            "affected": float(metrics["rollout/is_affected_frac"]) if "rollout/is_affected_frac" in metrics else 0.0,
        })


def cli(args: list[str], callbacks: list[L.Callback]):
    from rlhf_lightning.cli import lightning_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = lightning_cli(args, run=False)
        for callback in callbacks:
            run.trainer.callbacks.append(callback)
        run.trainer.fit(run.model, datamodule=run.datamodule)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            from rlhf_lightning.callbacks import FinalCheckpoint

            cli([
                "--config", str(ROOT / "configs" / "toy" / "sft.yaml"), *QUIET, f"--seed_everything={args.seed}",
                "--trainer.max_epochs=150", "--trainer.check_val_every_n_epoch=150", "--data.init_args.demo_fraction=0.05",
                "--data.init_args.max_val_prompts=64",
            ], [FinalCheckpoint("start.ckpt")])
            arms = {}
            for name, extra in ARMS.items():
                figures = StepFigures()
                run = cli([
                    "--config", str(ROOT / "configs" / "toy" / "ppo.yaml"), *QUIET, f"--seed_everything={args.seed}",
                    f"--model.init_args.rollout.seed={args.seed}", f"--data.init_args.seed={args.seed}",
                    "--model.init_args.policy_ckpt=start.ckpt", "--model.init_args.reward.source=judge",
                    "--model.init_args.reward.ckpt=null", "--model.init_args.optim.lr=4e-4", "--model.init_args.optim.warmup_steps=10",
                    "--model.init_args.rollout.advantage=group_mean", "--model.init_args.rollout.samples_per_prompt=8",
                    "--model.init_args.kl.beta=0.0", "--model.init_args.update.ppo_epochs=1", "--model.init_args.update.num_minibatches=2",
                    "--model.init_args.eval.every=10", "--data.init_args.batch_size=64", "--data.init_args.max_val_prompts=256",
                    f"--trainer.limit_train_batches={args.rollouts}", *extra,
                ], [figures])
                rows = figures.rows
                arms[name] = {
                    "logprob_mismatch_mean": round(statistics.fmean(r["mismatch"] for r in rows), 6),
                    "logprob_mismatch_max_ratio": round(max(r["max_ratio"] for r in rows), 4),
                    "first_ratio_error_mean": round(statistics.fmean(r["first_ratio_error"] for r in rows), 6),
                    "truncated_frac_mean": round(statistics.fmean(r["affected"] for r in rows), 4),
                    "val_accuracy": [[h["rollout"], round(h["eval/accuracy"], 4)] for h in run.model.eval_history],
                }
        finally:
            os.chdir(old)
    emit("rollout_mismatch", {"rollouts": args.rollouts, "seed": args.seed, "arms": arms})


if __name__ == "__main__":
    main()
