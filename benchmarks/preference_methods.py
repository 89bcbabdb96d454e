"""Preference methods from the same weak start: offline DPO, online DPO, PPO with the judge, PPO with a learned reward.

For each seed:

1. the few-demonstration SFT start of `rl_vs_sft.py` (`--demo_fraction` of the `train` prompts, trained until its
   `val` accuracy has plateaued; the demonstrations are used up);
2. four arms from that same checkpoint, each given `--seconds` of training (Lightning's `max_time`):
   (a) offline DPO (`configs/toy/dpo.yaml`): pairs sampled once from the start (its `SampledPairs`) and judged by
       the task's judge, then DPO on those fixed pairs;
   (b) online DPO (`configs/toy/online_dpo.yaml`): every step the current policy samples K completions per prompt
       of the step's prompt batch, the judge scores them, pairs whose scores differ train;
   (c) PPO with the judge's 0/1 reward (`rl_vs_sft.py`'s RL arm, its settings);
   (d) PPO with a learned reward: a reward model (`configs/toy/reward.yaml`) trained on pairs sampled from the
       start and judged, with its own budget `--reward_seconds`, then PPO as (c) with `reward: learned`;
3. each arm's kept policy (`keep_best`: the best greedy `val` accuracy among its evaluations, the start included)
   on `test`: greedy accuracy, and the gold reward (the judge's mean on 4 completions sampled at temperature 1 per
   `test` prompt: `pipeline.policy_row`, the `test_gold_reward` of `rlhf pipeline`'s table), with the KL to the start.

What the clock includes: Lightning's `max_time` starts at `on_train_start`, so it counts every step, every `val`
evaluation (the one before the first update included) and, for online DPO and PPO, all sampling and judging during
training; it does not count `setup`: offline DPO's pair sampling and reference pass, and the reward model's pair
sampling, are reported apart (`setup_s`: the fit's wall time minus its training time). The budget is checked after
each step, so a run ends with the step under way, then the final evaluation and the checkpoint. The reward model's
`--reward_seconds` are not part of PPO-learned's `--seconds`.

Each arm's learning rate comes from a small sweep on the first seed, scored by its best `val` accuracy (the reward
model for that sweep is the first seed's). The DPO configs' lr 3e-5 (tuned for a near-perfect start) barely moves a
weak one in 20 s; online DPO at 1e-3 falls from 0.49 to 0.30-0.40 on `val` before recovering. The reward model gets
pairs from every `train` prompt and 45 s (pairwise `test` accuracy 0.94-0.98 over seeds 0-2); from 3,000 prompts
and 15 s it reached 0.72 and PPO gamed it (`val` 0.51 -> 0.38). Since the budget is wall-clock time, the number of
steps an arm gets follows the machine's load: each run reports its steps (rollouts for PPO). Prints one JSON line:
{"seeds", "seconds_per_arm", "lr": {arm: lr}, "sweep_val", "start": {...}, "arms": {arm: {"test_accuracy": [per seed],
"test_gold_reward", "test_kl", "mean": {...}, "runs": [per seed: {"val_best", "eval_history", "steps", ...}]}},
"reward_model": [per seed], "checks": {...}, "total_s"}

    python benchmarks/preference_methods.py         # about 16 minutes on 2 cores (15.5 measured, on a shared machine)
    OMP_NUM_THREADS=1 python benchmarks/preference_methods.py --seeds 0 --seconds 10 --sweep_seconds 5 --reward_seconds 5 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Timer

from rlhf_lightning.callbacks import FinalCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402
from rl_vs_sft import QUIET, duration, fit, rl_arm, sft_start, working_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DPO_YAML = str(ROOT / "configs" / "toy" / "dpo.yaml")
ONLINE_DPO_YAML = str(ROOT / "configs" / "toy" / "online_dpo.yaml")
REWARD_YAML = str(ROOT / "configs" / "toy" / "reward.yaml")
ARMS = ("offline_dpo", "online_dpo", "ppo_judge", "ppo_learned")
VAL_PROMPTS = 256  # greedy val evaluation of every arm, as rl_vs_sft.py


def log(message: str) -> None:
    print(f"[preference_methods] {message}", file=sys.stderr, flush=True)


def train_seconds(cli) -> float:
    """Seconds of the training loop as Lightning's `max_time` counts them (from `on_train_start`)."""
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, Timer))
    return timer.time_elapsed("train")


def test_row(ckpt: Path, start: Path, seed: int) -> dict:
    """Greedy `test` accuracy, gold reward of 4 samples per `test` prompt, and KL to the start: `rlhf pipeline`'s row."""
    from rlhf_lightning.pipeline import policy_row

    row, _ = policy_row("arm", str(ckpt), str(start), None, "toy", 4, seed)
    return {k: round(row[k], 4) for k in ("test_accuracy", "test_gold_reward", "test_kl")}


def dpo_arm(cwd: Path, online: bool, lr: float, seconds: float, seed: int, out: str, extra: tuple[str, ...] = ()) -> dict:
    """Offline or online DPO from start.ckpt for `seconds`; its val curve and what keep_best kept (in `{out}.ckpt`)."""
    common = [
        *QUIET, f"--seed_everything={seed}", "--trainer.max_epochs=100000", "--trainer.max_steps=-1",
        f"--trainer.max_time={duration(seconds)}", "--model.init_args.policy_ckpt=start.ckpt", f"--model.init_args.optim.lr={lr}",
        f"--data.init_args.seed={seed}",
    ]
    if online:
        args = [
            "--config", ONLINE_DPO_YAML, *common, f"--model.init_args.online.seed={seed}",
            f"--data.init_args.max_val_prompts={VAL_PROMPTS}",
        ]
    else:
        args = [
            "--config", DPO_YAML, *common, "--data.init_args.pairs.init_args.policy_ckpt=start.ckpt",
            f"--model.init_args.eval.max_val_prompts={VAL_PROMPTS}",
        ]
    with working_dir(cwd):
        cli, wall = fit([*args, *extra], [FinalCheckpoint(f"{out}.ckpt")])
    model, train_s = cli.model, train_seconds(cli)
    curve = [[h["step"], round(h["eval/accuracy"], 4)] for h in model.eval_history]
    figures = {
        "val_best": max(acc for _, acc in curve), "kept_step": model.chosen["step"] if model.chosen else None,
        "steps": cli.trainer.global_step, "seconds": round(wall, 1), "train_s": round(train_s, 1),
        "setup_s": round(wall - train_s, 1), "eval_history": curve,
    }
    if not online:
        figures["pairs"] = len(cli.datamodule.train_set)
    log(f"{out} lr {lr}: {figures['steps']} steps in {train_s:.1f} s (+{wall - train_s:.1f} s setup), val {curve}")
    return figures


def reward_model(cwd: Path, seconds: float, prompts: int | None, seed: int) -> dict:
    """The reward model (configs/toy/reward.yaml) on pairs sampled from start.ckpt, `seconds` of training; reward.ckpt."""
    subset = [f"--data.init_args.pairs.init_args.max_train_prompts={prompts}"] if prompts else []  # the YAML's null: all
    with working_dir(cwd):
        cli, wall = fit([
            "--config", REWARD_YAML, *QUIET, f"--seed_everything={seed}", "--trainer.max_epochs=100000",
            f"--trainer.max_time={duration(seconds)}", "--trainer.limit_val_batches=0", "--model.init_args.sft_ckpt=start.ckpt",
            "--data.init_args.pairs.init_args.policy_ckpt=start.ckpt", "--data.init_args.pairs.init_args.max_val_prompts=1",
            f"--data.init_args.seed={seed}", *subset,
        ], [FinalCheckpoint("reward.ckpt")])
    train_s = train_seconds(cli)
    from rlhf_lightning.pipeline import reward_row

    accuracy = reward_row(str(cwd / "reward.ckpt"), str(cwd / "start.ckpt"), "toy", 4, seed)["test_accuracy"]
    figures = {
        "pairs": len(cli.datamodule.train_set), "steps": cli.trainer.global_step, "seconds": round(wall, 1),
        "train_s": round(train_s, 1), "setup_s": round(wall - train_s, 1), "test_pair_accuracy": round(accuracy, 4),
    }
    log(f"seed {seed}: reward model {figures}")
    return figures


def ppo_arm(cwd: Path, learned: bool, lr: float, seconds: float, seed: int, out: str) -> dict:
    """rl_vs_sft.py's RL arm (PPO with the judge), or the same with the learned reward of reward.ckpt."""
    extra = ("--model.init_args.reward.source=learned", "--model.init_args.reward.ckpt=reward.ckpt") if learned else ()
    val, wall, _ = rl_arm(cwd, lr, seconds, seed, out, extra)
    meta = torch.load(cwd / f"{out}.ckpt", map_location="cpu", weights_only=False)["rlhf"]
    curve = [[h["rollout"], round(h["eval/accuracy"], 4)] for h in meta["eval_history"]]
    return {"val_best": round(val, 4), "kept_rollout": (meta["chosen"] or {}).get("rollout"), "rollouts": meta["rollouts"],
            "seconds": round(wall, 1), "eval_history": curve}


def run_arm(arm: str, cwd: Path, lr: float, seconds: float, seed: int, out: str) -> dict:
    if arm in ("offline_dpo", "online_dpo"):
        return dpo_arm(cwd, arm == "online_dpo", lr, seconds, seed, out)
    return ppo_arm(cwd, arm == "ppo_learned", lr, seconds, seed, out)


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo_fraction", type=float, default=0.05)
    parser.add_argument("--start_epochs", type=int, default=300, help="SFT epochs of the start (until plateau)")
    parser.add_argument("--seconds", type=float, default=30.0, help="training seconds of each arm")
    parser.add_argument("--sweep_seconds", type=float, default=20.0)
    parser.add_argument("--reward_seconds", type=float, default=45.0, help="training seconds of the reward model")
    parser.add_argument("--reward_prompts", type=int, default=None, help="train prompts the reward model's pairs come from (default: all)")
    parser.add_argument("--offline_dpo_lrs", type=float, nargs="+", default=[3e-5, 3e-4, 1e-3])
    parser.add_argument("--online_dpo_lrs", type=float, nargs="+", default=[3e-5, 3e-4, 1e-3])
    parser.add_argument("--ppo_judge_lrs", type=float, nargs="+", default=[3e-4, 6e-4])
    parser.add_argument("--ppo_learned_lrs", type=float, nargs="+", default=[1e-4, 3e-4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    lrs: dict[str, float] = {}
    sweep: dict[str, dict[str, float]] = {}
    starts, rewards = [], []
    arms: dict[str, dict[str, list]] = {arm: {"test_accuracy": [], "test_gold_reward": [], "test_kl": [], "runs": []} for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for n, seed in enumerate(args.seeds):
            cwd = Path(tmp) / f"seed{seed}"
            cwd.mkdir()
            start = sft_start(cwd, args.demo_fraction, args.start_epochs, seed)
            start.update(test_row(cwd / "start.ckpt", cwd / "start.ckpt", seed))
            log(f"seed {seed}: SFT start {start}")
            starts.append(start)
            rewards.append(reward_model(cwd, args.reward_seconds, args.reward_prompts, seed))
            if n == 0:  # one small sweep, scored on val, picks each arm's learning rate
                for arm in ARMS:
                    sweep[arm] = {str(lr): run_arm(arm, cwd, lr, args.sweep_seconds, seed, f"sweep_{arm}_{lr}")["val_best"] for lr in getattr(args, f"{arm}_lrs")}
                    lrs[arm] = float(max(sweep[arm], key=sweep[arm].get))  # the first of equal scores: the smaller lr
                log(f"sweep on val: {sweep}; chosen {lrs}")
            for arm in ARMS:
                run = run_arm(arm, cwd, lrs[arm], args.seconds, seed, f"arm_{arm}")
                row = test_row(cwd / f"arm_{arm}.ckpt", cwd / "start.ckpt", seed)
                for k, v in row.items():
                    arms[arm][k].append(v)
                arms[arm]["runs"].append(run)
                log(f"seed {seed}: {arm} val {run['val_best']:.4f} test {row} (start {start['test_accuracy']:.4f})")
    for figures in arms.values():
        figures["mean"] = {k: mean(figures[k]) for k in ("test_accuracy", "test_gold_reward", "test_kl")}
    start_test = [s["test_accuracy"] for s in starts]
    beats = {arm: all(a > s for a, s in zip(arms[arm]["test_accuracy"], start_test)) for arm in ARMS}
    checks = {
        "offline_dpo_beats_start_every_seed": beats["offline_dpo"],
        "online_dpo_beats_start_every_seed": beats["online_dpo"],
        "online_beats_offline_mean": arms["online_dpo"]["mean"]["test_accuracy"] > arms["offline_dpo"]["mean"]["test_accuracy"],
        "beats_start_every_seed": beats,
    }
    log(f"checks: {checks}")
    emit("preference_methods", {
        "demo_fraction": args.demo_fraction, "seeds": args.seeds, "seconds_per_arm": args.seconds,
        "sweep_seconds": args.sweep_seconds, "reward_seconds": args.reward_seconds, "lr": lrs, "sweep_val": sweep,
        "start": {
            "test_accuracy": start_test, "test_gold_reward": [s["test_gold_reward"] for s in starts],
            "mean": {"test_accuracy": mean(start_test), "test_gold_reward": mean([s["test_gold_reward"] for s in starts])},
            "runs": starts,
        },
        "arms": arms, "reward_model": rewards, "checks": checks, "total_s": round(time.perf_counter() - begin, 1),
    })


if __name__ == "__main__":
    main()
