"""What RL adds once demonstrations are used up: SFT continued vs PPO, critic-free and with a critic (GAE), with the
judge's reward and with a learned one, same seconds.

For each seed:

1. an SFT start trained on demonstrations for `--demo_fraction` of the `train` prompts until its `val`
   accuracy has plateaued (less than 0.01 gained over the last 20% of its epochs; the tail is printed);
2. a reward model on pairs the start samples on `--reward_prompts` `train` prompts, judged (configs/toy/reward.yaml;
   its pairwise accuracy on held-out pairs is printed), when a learned-reward arm runs;
3. arms from that same checkpoint, each given `--seconds` of training (Lightning's `max_time`):
   - `sft`: SFT continued on the same demonstrations, fresh optimizer and schedule;
   - `rl`: PPO with the judge's 0/1 reward on all `train` prompts (gold answers reach it only through the judge),
     critic-free: `group_mean` advantages with dynamic sampling (`filter_groups`);
   - `rl_gae`: the same with a learned critic and GAE (`rollout.advantage: gae`, the critic a fresh head on the start
     policy's transformer: there is no reward model in a judge arm);
   - `rl_learned`, `rl_learned_gae`: the two above rewarded by the reward model of step 2 instead of the judge (the
     critic then starts as that reward model, InstructGPT's choice);
4. each arm's `test` accuracy at its best evaluation on `val`.

SFT's and PPO's learning rates come from one small sweep on the first seed, scored on `val` (PPO's on the `rl` arm);
every PPO arm uses PPO's. GAE arms cannot drop groups (`filter_groups` needs a group advantage), so they train on
every sample. Prints one JSON line: {"demo_fraction", "seeds", "sft": {"test_accuracy", "seconds", "lr"}, "rl": {...},
"rl_gae": {...}, "rl_learned": {...}, "rl_learned_gae": {...}, "reward": {...}, "start": {...}, ...}

    python benchmarks/rl_vs_sft.py                  # about 30 minutes on 2 cores
    python benchmarks/rl_vs_sft.py --arms sft rl    # the judge arms only: about 14 minutes
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
REWARD_YAML = str(ROOT / "configs" / "toy" / "reward.yaml")
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


def reward_model(cwd: Path, prompts: int, seed: int) -> dict:
    """Train reward.ckpt on pairs start.ckpt samples on `prompts` train prompts, judged; returns its wall seconds and
    pairwise accuracy on held-out pairs (`val`)."""
    with working_dir(cwd):
        cli, wall = fit([
            "--config", REWARD_YAML, *QUIET, f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
            "--model.init_args.sft_ckpt=start.ckpt", "--data.init_args.pairs.init_args.policy_ckpt=start.ckpt",
            f"--data.init_args.pairs.init_args.max_train_prompts={prompts}",
        ], [FinalCheckpoint("reward.ckpt")])
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if "accuracy" in k}
    return {"seconds": round(wall, 1), "prompts": prompts, **metrics}


def rl_arm(cwd: Path, lr: float, seconds: float, seed: int, out: str, extra: tuple[str, ...] = ()) -> tuple[float, float, float]:
    """(best val accuracy, wall seconds, test accuracy of the best-on-val policy) of PPO, with the judge unless
    `extra` says otherwise; `extra` options (an arm's, e.g. a learned reward, a critic, LoRA) come last."""
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

#: A learned critic with GAE in place of the group baseline (no dynamic sampling: it needs groups). The critic trains
#: alone for 2 rollouts, then beside the policy with its own AdamW (configs/toy/ppo_gae.yaml's settings).
GAE = (
    "--model.init_args.rollout.advantage=gae", "--model.init_args.rollout.filter_groups=false",
    "--model.init_args.critic.lr=1e-4", "--model.init_args.critic.warmup=2", "--model.init_args.critic.lam=0.95",
)
LEARNED = ("--model.init_args.reward.source=learned", "--model.init_args.reward.ckpt=reward.ckpt")
#: Each PPO arm's options beside RL_OPTIONS.
RL_ARMS = {
    "rl": (),
    "rl_gae": (*GAE, "--model.init_args.critic.init=policy"),
    "rl_learned": LEARNED,
    "rl_learned_gae": (*LEARNED, *GAE, "--model.init_args.critic.init=reward", "--model.init_args.critic.ckpt=reward.ckpt"),
}
ARMS = ("sft", *RL_ARMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_fraction", type=float, default=0.05)
    parser.add_argument("--start_epochs", type=int, default=300, help="SFT epochs of the start (until plateau)")
    parser.add_argument("--seconds", type=float, default=90.0, help="training seconds of each arm")
    parser.add_argument("--sweep_seconds", type=float, default=30.0)
    parser.add_argument("--sft_lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--rl_lrs", type=float, nargs="+", default=[3e-4, 6e-4])
    parser.add_argument("--reward_prompts", type=int, default=4000, help="train prompts the reward model's pairs come from")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    arms = [a for a in ARMS if a in args.arms]
    result: dict = {"demo_fraction": args.demo_fraction, "seeds": args.seeds, "seconds_per_arm": args.seconds, "arms": arms}
    figures = {arm: {"test_accuracy": [], "seconds": [], "val_best": []} for arm in arms}
    lrs: dict[str, float] = {}
    starts, rewards = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n, seed in enumerate(args.seeds):
            cwd = Path(tmp) / f"seed{seed}"
            cwd.mkdir()
            start = sft_start(cwd, args.demo_fraction, args.start_epochs, seed)
            print(f"[rl_vs_sft] seed {seed}: SFT start {start}", file=sys.stderr, flush=True)
            starts.append(start)
            if any(arm.startswith("rl_learned") for arm in arms):
                rewards.append(reward_model(cwd, args.reward_prompts, seed))
                print(f"[rl_vs_sft] seed {seed}: reward model {rewards[-1]}", file=sys.stderr, flush=True)
            if n == 0:  # one small sweep, scored on val, picks SFT's and PPO's learning rates
                sweep = {}
                if "sft" in arms:
                    sweep["sft"] = {lr: sft_arm(cwd, args.demo_fraction, lr, args.sweep_seconds, seed, f"sweep_sft_{lr}", start)[0] for lr in args.sft_lrs}
                if any(arm in RL_ARMS for arm in arms):
                    sweep["rl"] = {lr: rl_arm(cwd, lr, args.sweep_seconds, seed, f"sweep_rl_{lr}")[0] for lr in args.rl_lrs}
                lrs = {kind: max(scores, key=scores.get) for kind, scores in sweep.items()}
                result["sweep_val"] = {kind: {str(k): v for k, v in d.items()} for kind, d in sweep.items()}
                print(f"[rl_vs_sft] sweep on val: {result['sweep_val']}", file=sys.stderr, flush=True)
            for arm in arms:
                if arm == "sft":
                    val, wall, test = sft_arm(cwd, args.demo_fraction, lrs["sft"], args.seconds, seed, "arm_sft", start)
                else:
                    val, wall, test = rl_arm(cwd, lrs["rl"], args.seconds, seed, f"arm_{arm}", RL_ARMS[arm])
                figures[arm]["val_best"].append(round(val, 4))
                figures[arm]["seconds"].append(round(wall, 1))
                figures[arm]["test_accuracy"].append(test)
                print(f"[rl_vs_sft] seed {seed}: {arm} val {val:.4f} test {test:.4f} in {wall:.1f} s", file=sys.stderr, flush=True)
    for arm in arms:
        figures[arm]["lr"] = lrs["sft" if arm == "sft" else "rl"]
        if arm in RL_ARMS and "sft" in arms:
            figures[arm]["minus_sft"] = [round(r - s, 4) for r, s in zip(figures[arm]["test_accuracy"], figures["sft"]["test_accuracy"])]
    result.update(
        figures, start=starts, rl_options=RL_OPTIONS, arm_options={arm: list(RL_ARMS[arm]) for arm in arms if arm in RL_ARMS},
        total_s=round(time.perf_counter() - begin, 1),
    )
    if rewards:
        result["reward"] = rewards
    emit("rl_vs_sft", result)


if __name__ == "__main__":
    main()
