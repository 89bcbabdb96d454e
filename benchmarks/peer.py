"""The fixed peer workload: ms per rollout+update step inside `Trainer.fit`, completions/s, and start-up to the first step.

    python benchmarks/peer.py [--accelerator cpu|gpu] [--size tiny|85m] [--prompts 8] [--compile] [--steps 40] [--warmup 5] [--threads 2]

Workload (configs/peer/ppo.yaml): all 155 single-digit toy problems (a+b for a, b in 0..9; a-b with a >= b),
the 2-layer, width-64, 4-head character transformer, 8 prompts x 8 samples per rollout, <= 4 new tokens,
judge reward, group_whiten advantages, 1 PPO epoch of 1 minibatch, beta 0, constant lr 1e-3, fp32,
2 threads, TensorBoard logging every step. The prompts (with gold answers) go to a JSONL in a temp dir;
the policy is the peer SFT config run for one step (`rlhf fit --config configs/peer/sft.yaml`).

`rlhf fit --config configs/peer/ppo.yaml` then runs in a fresh process with a timing callback
(benchmarks/peer_timer.py). Reported: median ms per step (first step's start to the next step's start,
i.e. the whole loop with data loading, hooks and logging; and the hook window on_train_batch_start ->
on_train_batch_end) over `--steps` steps after `--warmup`; completions per second; seconds from process
spawn to the first training step; and, from a separate fresh process, how long `import lightning`
takes (spawn -> import done, and the import alone), so the first step's delay after that import can
be judged (goal <= 1 s). Goal: <= 18 ms/step (TRL GRPOTrainer: about 37 ms here).

`--size 85m` swaps the policy for GPT-2's shape (12 layers, 768 wide, 12 heads; 85M parameters with the
character tokenizer) and the completion budget for 8 new tokens; `--prompts 32` draws 32 prompts per rollout
instead of 8; `--accelerator gpu` runs both stages on one GPU (`--trainer.accelerator=gpu`); `--compile` captures
PPO's decode step with CUDA graphs (`compile: true`; on CPU a warning and the eager decode). The JSON line
names the matching TRL command of `../shared/peer/trl_grpo_bench.py` (`trl_command`), to run in the same window.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import argparse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # the policy and the completion budget of each workload size
    "tiny": {"model": {"type": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 24}, "new_tokens": 4},
    "85m": {"model": {"type": "gpt", "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 24}, "new_tokens": 8},
}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def peer_problems() -> list[dict]:
    rows = [{"prompt": f"Q: {a}+{b}=\nA:", "completion": str(a + b)} for a in range(10) for b in range(10)]
    rows += [{"prompt": f"Q: {a}-{b}=\nA:", "completion": str(a - b)} for a in range(10) for b in range(a + 1)]
    assert len(rows) == 155
    return rows


def env(threads: int) -> dict:
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path, PYTHONWARNINGS="ignore")


def run(args: list[str], cwd: Path, threads: int) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning.cli", *args], cwd=cwd, env=env(threads), text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"rlhf {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def import_lightning(threads: int) -> tuple[float, float]:
    """(spawn -> `import lightning` done, the import alone) in seconds, in a fresh process."""
    code = "import time; t = time.perf_counter(); import lightning; print(time.time(), time.perf_counter() - t)"
    spawn = time.time()
    out = subprocess.run([sys.executable, "-c", code], env=env(threads), text=True, capture_output=True, check=True).stdout.split()
    return float(out[0]) - spawn, float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--import_repeats", type=int, default=2)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout (8 samples each)")
    parser.add_argument("--compile", action="store_true", help="PPO's compile: true (a captured decode step on a GPU)")
    args = parser.parse_args()
    size = SIZES[args.size]
    model = "{" + ", ".join(f"{k}: {v}" for k, v in size["model"].items()) + "}"
    sft_extra = [f"--trainer.accelerator={args.accelerator}", f"--model.init_args.model={model}"]
    ppo_extra = [f"--trainer.accelerator={args.accelerator}", f"--data.init_args.batch_size={args.prompts}",
                 f"--model.init_args.rollout.max_new_tokens={size['new_tokens']}", f"--model.init_args.rollout.compile={str(args.compile).lower()}"]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "peer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in peer_problems()))
        run(["fit", "--config", str(ROOT / "configs" / "peer" / "sft.yaml"), *QUIET, *sft_extra], cwd, args.threads)
        timer = cwd / "steps.json"
        callback = json.dumps({"class_path": "peer_timer.StepTimer", "init_args": {"out": str(timer), "threads": args.threads}})
        spawn = time.time()
        start = time.perf_counter()
        run(["fit", "--config", str(ROOT / "configs" / "peer" / "ppo.yaml"), f"--trainer.callbacks+={callback}",
             f"--trainer.max_steps={args.warmup + args.steps + 1}", *ppo_extra], cwd, args.threads)
        wall = time.perf_counter() - start
        timing = json.loads(timer.read_text())
    imports = [import_lightning(args.threads) for _ in range(args.import_repeats)]
    spawn_to_import = statistics.median(i[0] for i in imports)
    import_alone = statistics.median(i[1] for i in imports)
    intervals = timing["interval_s"][args.warmup : args.warmup + args.steps]
    windows = timing["step_s"][args.warmup : args.warmup + args.steps]
    step = statistics.median(intervals)
    to_first = timing["first_step_epoch_s"] - spawn
    m = size["model"]
    trl = (f"trl_grpo_bench.py --n-layer {m['n_layer']} --n-embd {m['n_embd']} --n-head {m['n_head']} --prompts-per-step {args.prompts} "
           f"--num-generations 8 --max-completion-length {size['new_tokens']} --threads {args.threads}" + (" --gpu" if args.accelerator == "gpu" else ""))
    emit("peer", {
        "accelerator": args.accelerator, "size": args.size, "prompts": args.prompts, "compile": args.compile, "trl_command": trl,
        "steps": len(intervals), "warmup": args.warmup, "rows_per_step": 8 * args.prompts,
        "ms_per_step": round(step * 1e3, 2),
        "ms_per_step_hook_window": round(statistics.median(windows) * 1e3, 2),
        "ms_per_step_p90": round(sorted(intervals)[int(0.9 * (len(intervals) - 1))] * 1e3, 2),
        "completions_per_s": round(8 * args.prompts / step, 1),
        # EOS counted as a token, as TRL's completion_tokens_per_step counts it
        "completion_tokens_per_step": round(8 * args.prompts * statistics.mean(timing["completion_len"][args.warmup : args.warmup + args.steps]), 2),
        **({"goal_ms_per_step": 18, "trl_grpo_ms_per_step": 37} if (args.size, args.accelerator, args.prompts) == ("tiny", "cpu", 8) else {}),
        "spawn_to_first_step_s": round(to_first, 2),
        "spawn_to_import_lightning_done_s": round(spawn_to_import, 2),
        "import_lightning_s": round(import_alone, 2),
        "first_step_after_import_s": round(to_first - spawn_to_import, 2),
        "goal_first_step_after_import_s": 1.0,
        "fit_process_wall_s": round(wall, 1),
        "fit_threads": timing["threads"],
    })


if __name__ == "__main__":
    main()
