"""The toy pipeline end to end: wall time, peak RSS, PPO test accuracy; and SFT continued for the same extra seconds.

    python benchmarks/pipeline.py            # the default pipeline (about 70 s, then the baseline's seconds)
    python benchmarks/pipeline.py --config toy/pipeline_full_demos   # SFT on every demonstration
    python benchmarks/pipeline.py --quick    # small stage overrides, to check the script quickly
    python benchmarks/pipeline.py --accelerator gpu   # every stage's Trainer on one GPU

Runs `rlhf pipeline --config CONFIG` (default configs/toy/pipeline.yaml) in a fresh process and a fresh temp working
dir, and reports its wall time (spawn to exit, start-up included), the child's peak RSS
(`getrusage(RUSAGE_CHILDREN).ru_maxrss`, read before any other child runs) and the test accuracies from
`lightning_logs/toy/summary.json`. The default pipeline's goals: <= 90 s, <= 1.5 GB, PPO's test accuracy at least
0.15 above SFT's.

Baseline "what RL adds": the SFT run is resumed from its last checkpoint (`checkpoints/toy/sft/last.ckpt`), with the
pipeline's SFT options, for as many extra epochs as the reward and PPO stages' seconds buy at the SFT stage's seconds
per epoch, then `rlhf eval --split test` scores it. PPO should beat both its SFT start and this baseline. (On resume
the cosine schedule is recomputed for the longer run, so the learning rate rises again from its minimum.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--sft.trainer.max_epochs=2", "--sft.data.init_args.max_val_prompts=128",
    "--reward.trainer.max_epochs=1", "--reward.data.init_args.pairs.max_train_prompts=300", "--reward.data.init_args.pairs.max_val_prompts=100",
    "--ppo.trainer.limit_train_batches=3", "--ppo.data.init_args.max_val_prompts=64",
]


def rlhf(args: list[str], cwd: Path, threads: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning.cli", *args], cwd=cwd, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"rlhf {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def sft_stage(config: str) -> tuple[Path, list[str], int]:
    """The pipeline's SFT stage: its config file, the pipeline's `sft_args` and its `trainer.max_epochs` (the run the
    baseline continues)."""
    import yaml

    from rlhf_lightning.cli import resolve_config

    path = Path(resolve_config(config))
    pipeline = yaml.safe_load(path.read_text())
    sft_yaml = path.parent / pipeline["sft_config"]
    sft_args = [str(a) for a in pipeline.get("sft_args") or []]
    epochs = int(yaml.safe_load(sft_yaml.read_text())["trainer"]["max_epochs"])
    for arg in sft_args:
        if arg.startswith("--trainer.max_epochs="):
            epochs = int(arg.split("=", 1)[1])
    return sft_yaml, sft_args, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "toy" / "pipeline.yaml"), help="pipeline YAML (a file, or a shipped name)")
    parser.add_argument("--quick", action="store_true", help="small stage overrides (not the goal's workload)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no_baseline", action="store_true", help="skip SFT continued for the same seconds")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args()
    overrides = (QUICK if args.quick else []) + [f"--{stage}.trainer.accelerator={args.accelerator}" for stage in ("sft", "reward", "ppo")]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        start = time.perf_counter()
        rlhf(["pipeline", "--config", args.config, *overrides, "--sft.trainer.enable_progress_bar=false", "--reward.trainer.enable_progress_bar=false",
              "--ppo.trainer.enable_progress_bar=false"], cwd, args.threads)
        wall = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        rows = {r["stage"]: r for r in json.loads((cwd / "lightning_logs" / "toy" / "summary.json").read_text())}
        figures = {
            "accelerator": args.accelerator, "quick": args.quick, "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
            "stage_wall_s": {k: r["wall_s"] for k, r in rows.items()},
            "sft_test_accuracy": rows["sft"]["test_accuracy"], "reward_test_pairwise_accuracy": rows["reward"]["test_accuracy"],
            "ppo_test_accuracy": rows["ppo"]["test_accuracy"], "ppo_test_kl": rows["ppo"]["test_kl"],
            "ppo_minus_sft": round(rows["ppo"]["test_accuracy"] - rows["sft"]["test_accuracy"], 4),
            "ppo_test_gold_reward": rows["ppo"]["test_gold_reward"], "sft_test_gold_reward": rows["sft"]["test_gold_reward"],
            "config": args.config, "goal_wall_s": 90, "goal_peak_rss_mb": 1536, "goal_ppo_minus_sft": 0.15,
        }
        if not args.no_baseline:
            sft_yaml, sft_args, sft_epochs = sft_stage(args.config)
            sft_epochs = 2 if args.quick else sft_epochs
            extra_s = rows["reward"]["wall_s"] + rows["ppo"]["wall_s"]
            per_epoch = rows["sft"]["wall_s"] / sft_epochs
            extra_epochs = max(1, round(extra_s / per_epoch))
            start = time.perf_counter()
            cont = ["fit", "--config", str(sft_yaml), *sft_args, "--ckpt_path", "checkpoints/toy/sft/last.ckpt",
                    f"--trainer.max_epochs={sft_epochs + extra_epochs}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                    f"--trainer.accelerator={args.accelerator}"]
            if args.quick:
                cont.append("--data.init_args.max_val_prompts=128")
            rlhf(cont, cwd, args.threads)
            cont_wall = time.perf_counter() - start
            out = rlhf(["eval", "--ckpt", "checkpoints/toy/sft.ckpt", "--split", "test"], cwd, args.threads).stdout
            summary = json.loads(out.strip().splitlines()[-1])
            figures.update({
                "baseline_extra_s": round(extra_s, 1), "baseline_extra_epochs": extra_epochs,
                "baseline_process_wall_s": round(cont_wall, 1), "sft_continued_test_accuracy": summary["accuracy"],
                "ppo_beats_sft": rows["ppo"]["test_accuracy"] > rows["sft"]["test_accuracy"],
                "ppo_beats_sft_continued": rows["ppo"]["test_accuracy"] > summary["accuracy"],
            })
    emit("pipeline", figures)


if __name__ == "__main__":
    main()
