"""The toy pipeline's table over seeds and CPU kernel sets: each row's mean and range, and whether PPO fell below SFT.

    python benchmarks/pipeline_spread.py                          # seeds 0 1 2, every kernel set this CPU runs
    python benchmarks/pipeline_spread.py --seeds 0 --caps default   # one run

torch chooses its CPU kernels by `ATEN_CPU_CAPABILITY` (`default`: no vector instructions; `avx2`; `avx512`);
kernels of another vector width sum in another order, so training lands on other weights. Each (seed, kernel
set) runs `rlhf pipeline --seed S` in a fresh process and a fresh temp working dir. Prints one JSON line per run
(every row of `summary.json`, and PPO's evaluations on `val` with the one `keep_best` chose, from its checkpoint),
then one summary line: per stage and column the mean, min and max over the runs, and the runs where PPO's
`test_accuracy` is below SFT's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402
from pipeline import rlhf  # noqa: E402  (benchmarks/pipeline.py: `rlhf` in a child process, failures raised)

COLUMNS = ("test_accuracy", "test_reward", "test_kl", "test_gold_reward", "wall_s")
CAPABILITIES = ("default", "avx2", "avx512")


def supported_capabilities() -> list[str]:
    """The kernel sets this CPU runs: torch's own choice and every one below it."""
    native = torch.backends.cpu.get_cpu_capability().lower()  # e.g. "AVX512"
    if native not in CAPABILITIES:
        return ["default"]
    return list(CAPABILITIES[: CAPABILITIES.index(native) + 1])


def run(seed: int, cap: str, threads: int, extra: list[str]) -> dict:
    os.environ["ATEN_CPU_CAPABILITY"] = cap  # read by the child `rlhf` process that `rlhf()` starts
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        start = time.perf_counter()
        rlhf(["pipeline", f"--seed={seed}", *extra, *(f"--{s}.trainer.enable_progress_bar=false" for s in ("sft", "reward", "ppo"))],
             cwd, threads)
        wall = time.perf_counter() - start
        rows = {r["stage"]: r for r in json.loads((cwd / "lightning_logs" / "toy" / "summary.json").read_text())}
        meta = torch.load(cwd / "checkpoints" / "toy" / "ppo.ckpt", map_location="cpu", weights_only=True)["rlhf"]
    evals = [(h["rollout"], h["eval/accuracy"]) for h in meta["eval_history"]]
    return {"seed": seed, "cap": cap, "process_wall_s": round(wall, 1), "rows": rows,
            "ppo_val_evaluations": evals, "ppo_chosen": meta["chosen"]}


def spread(runs: list[dict]) -> dict:
    """{stage: {column: {mean, min, max}}} over the runs, for the numeric columns present."""
    out: dict = {}
    for stage in runs[0]["rows"]:
        for col in COLUMNS:
            values = [r["rows"][stage].get(col) for r in runs]
            if all(isinstance(v, (int, float)) for v in values):
                out.setdefault(stage, {})[col] = {"mean": round(statistics.fmean(values), 4), "min": min(values), "max": max(values)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--caps", nargs="+", choices=CAPABILITIES, default=None, help="kernel sets (default: all this CPU runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more `rlhf pipeline` options, after --")
    args = parser.parse_args()
    caps = args.caps or supported_capabilities()
    runs = []
    for cap in caps:
        for seed in args.seeds:
            result = run(seed, cap, args.threads, args.extra)
            print(json.dumps(result), flush=True)
            runs.append(result)
    below = [(r["seed"], r["cap"]) for r in runs if r["rows"]["ppo"]["test_accuracy"] < r["rows"]["sft"]["test_accuracy"]]
    emit("pipeline_spread", {"seeds": args.seeds, "caps": caps, "runs": len(runs), "spread": spread(runs),
                             "ppo_below_sft": below, "native_capability": torch.backends.cpu.get_cpu_capability()})


if __name__ == "__main__":
    main()
