"""The fixed peer DPO workload: seconds per DPO optimizer step inside `Trainer.fit`, beside TRL's DPOTrainer.

    python benchmarks/peer_dpo.py [--steps 64] [--warmup 3] [--threads 2] [--peer ../shared/peer]
    python benchmarks/peer_dpo.py --trl [--repeats 3] [--trl_python ../trl-venv/bin/python]

Workload (the peer harness's, `--peer`: toy_task.py, benchutil.py): the 512 preference pairs
`toy_task.preference_pairs(512, seed=0)` (prompt "Q: a+b=\\nA:", chosen " <right>", rejected " <wrong>"), written
as TRL-style JSONL to a temp dir and read with `JsonlPairs`; the policy is GPT-2 from config with random init
(seed 0): n_layer 2, n_embd 64, n_head 4, n_positions 32, all dropout 0, the harness's 21-id character tokenizer,
103,488 parameters, the same model and weights TRL's side builds. It is saved with `save_pretrained` as an HF
folder (our `model: {type: hf}`), and an export folder (the format of `rlhf export`) around it is the DPO's
`policy_ckpt`, so the frozen reference is a copy of the initial policy, run every step
(`precompute_ref_logprobs: false`, as TRL's side). `DPOModule`: loss_type sigmoid, beta 0.1, 32 pairs per step,
AdamW lr 1e-3 constant (no warm-up, weight decay 0), grad-norm clip 1.0 (TRL's default), fp32, TensorBoard
logging every step (TRL logs every step), `max_steps` = `--steps` (64: 4 passes over the pairs), no validation
during training. Our rows carry one more token than TRL's: the tokenizer's BOS (= EOS) before the prompt
(`tokens_per_step` on both sides shows it, about 15 vs 14 per sequence).

`rlhf fit` runs in a fresh process with a timing callback (`DPOStepTimer` below) that applies the peer
harness's `benchutil.StepTimer` as TRL's side does: `begin` at the first epoch's start (after DPOModule's
greedy evaluation of the start, which `untimed_eval_s` reports), `step_end` at each `on_train_batch_end` (one
optimizer step each), `finish` at `on_train_end`. A step is one batch start to the next (data loading, the
policy's and the reference's forwards, backward, clipping, AdamW, logging). `step_s_median` excludes the first
`--warmup` steps. `foreign_cpu_cores` >= 0.3: other processes ran beside the measurement; rerun it.

The JSON line names the TRL command (`trl_command`, benchmarks/trl_dpo_bench.py in the TRL virtual environment)
to run in the same window. `--trl` runs it too, alternating ours and TRL's `--repeats` times, and reports the
medians over repeats and the ratio ours / TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEER = ROOT.parent / "shared" / "peer"
DEFAULT_TRL_PYTHON = ROOT.parent / "trl-venv" / "bin" / "python"
TRL_KEYS = ("step_s_median", "step_s_mean", "step_s_min", "step_s_max", "step_cpu_s_median", "first_step_s", "foreign_cpu_cores",
            "loadavg_1m_end", "tokens_per_step", "padded_tokens_per_step", "start_to_first_step_end_s", "train_wall_s",
            "loss_first_steps_mean", "loss_last_steps_mean", "reward_acc_last_steps_mean", "peak_rss_mb_self")


class DPOStepTimer(Callback):
    """`benchutil.StepTimer` (imported from `peer`) in Lightning's hooks; `summary(warmup)` plus per-step token
    counts, losses and reward accuracies written as JSON to `out` at the end of training."""

    def __init__(self, out: str, peer: str, warmup: int = 3, threads: int = 2) -> None:
        sys.path.insert(0, peer)
        import benchutil

        self.benchutil, self.out, self.warmup, self.threads = benchutil, out, warmup, threads
        self.timer = benchutil.StepTimer()
        self.train_start: float | None = None
        self.untimed_eval_s: float | None = None
        self.first_step_end_age_s: float | None = None
        self.tokens: list[int] = []
        self.padded: list[int] = []
        self.losses: list[float] = []
        self.accuracies: list[float] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        import torch

        torch.set_num_threads(self.threads)

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = time.perf_counter()  # DPOModule's own on_train_start (its evaluation) runs after this

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.untimed_eval_s is None:
            self.untimed_eval_s = time.perf_counter() - self.train_start
            self.timer.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.timer.step_end()
        if self.first_step_end_age_s is None:
            self.first_step_end_age_s = self.benchutil.proc_age_s()
        self.tokens.append(int(batch["attention_mask"].sum()))
        self.padded.append(batch["input_ids"].numel())
        self.losses.append(float(outputs["loss"]))
        self.accuracies.append(float(trainer.callback_metrics["dpo/rewards/accuracies"]))

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        self.timer.finish()
        summary = self.timer.summary(self.warmup)
        w = self.warmup if len(self.tokens) > self.warmup else 0
        k = max(1, min(5, len(self.losses) // 4))
        with open(self.out, "w") as f:
            json.dump({
                **summary, "steps": len(self.timer.step_s), "threads": torch.get_num_threads(),
                "tokens_per_step": round(statistics.mean(self.tokens[w:]), 2),
                "padded_tokens_per_step": round(statistics.mean(self.padded[w:]), 2),
                "untimed_eval_s": round(self.untimed_eval_s, 3),
                "train_wall_s": round(time.perf_counter() - self.train_start - self.untimed_eval_s, 3),  # the training loop
                # process start -> first step done, less the untimed evaluation (TRL's side evaluates nothing in it)
                "start_to_first_step_end_s": round(self.first_step_end_age_s - self.untimed_eval_s, 3),
                "loss_first_steps_mean": round(statistics.mean(self.losses[:k]), 4),
                "loss_last_steps_mean": round(statistics.mean(self.losses[-k:]), 4),
                "reward_acc_last_steps_mean": round(statistics.mean(self.accuracies[-k:]), 4),
                "peak_rss_mb_self": round(self.benchutil.peak_rss_mb(), 1),
            }, f)


def write_policy(peer: Path, folder: Path) -> Path:
    """The GPT-2 tiny policy of the peer workload: an HF folder (`hf/`, as TRL's side builds it) and the export
    folder (`policy/`) that DPO's `policy_ckpt` reads. Returns the export folder."""
    sys.path.insert(0, str(peer))
    import toy_task
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_lightning.checkpoints import CONFIG, TOKENIZER, WEIGHTS
    from rlhf_lightning.policy import build_policy

    tok = toy_task.build_char_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder / "hf")
    tok.save_pretrained(folder / "hf")
    model, tokenizer, config = build_policy({"type": "hf", "path": str(folder / "hf")}, None)
    out = folder / "policy"
    out.mkdir()
    # clone: GPT-2's output layer shares the embedding's tensor, which safetensors refuses to write twice
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps({"stage": "sft", "model": config}) + "\n")
    (out / TOKENIZER).write_text(json.dumps(tokenizer.to_dict()) + "\n")
    return out


def fit_config(policy: Path, pairs: Path, steps: int, timer: dict) -> dict:
    """`rlhf fit`'s config (JSON is YAML) of the workload; `timer` is the callback's class_path entry."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": -1, "max_steps": steps,
            "gradient_clip_val": 1.0, "limit_val_batches": 0, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "lightning_logs", "name": "peer/dpo"}},
            "callbacks": [timer],
        },
        "model": {
            "class_path": "rlhf_lightning.modules.dpo.DPOModule",
            "init_args": {
                "policy_ckpt": str(policy), "loss_type": "sigmoid", "beta": 0.1, "precompute_ref_logprobs": False,
                "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0, "min_lr_ratio": 1.0, "max_val_prompts": 16, "keep_best": False,
            },
        },
        "data": {
            "class_path": "rlhf_lightning.data.preferences.PreferenceDataModule",
            "init_args": {
                "task": "toy", "batch_size": 32,
                "pairs": {"class_path": "rlhf_lightning.data.preferences.JsonlPairs", "init_args": {"train_file": str(pairs), "val_file": str(pairs)}},
            },
        },
    }


def run_ours(cwd: Path, policy: Path, pairs: Path, args: argparse.Namespace, index: int) -> dict:
    """One fresh `rlhf fit` process; the timing callback's figures and the process's wall time."""
    out = cwd / f"steps_{index}.json"
    timer = {"class_path": "peer_dpo.DPOStepTimer", "init_args": {"out": str(out), "peer": str(args.peer), "warmup": args.warmup, "threads": args.threads}}
    config = cwd / f"dpo_{index}.yaml"
    config.write_text(json.dumps(fit_config(policy, pairs, args.steps, timer), indent=1) + "\n")
    path = os.pathsep.join([str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=path, PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning.cli", "fit", "--config", str(config)], cwd=cwd, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"rlhf fit --config {config} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(out.read_text()), "process_wall_s": round(time.perf_counter() - start, 2)}


def trl_command(args: argparse.Namespace) -> list[str]:
    return [str(args.trl_python), str(Path(__file__).parent / "trl_dpo_bench.py"), "--peer", str(args.peer), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--threads", str(args.threads), "--batch-size", "32", "--beta", "0.1", "--loss-type", "sigmoid", "--lr", "1e-3"]


def run_trl(cwd: Path, args: argparse.Namespace) -> dict:
    """One TRL process; its JSON line (the last stdout line) and the process's wall time."""
    start = time.perf_counter()
    proc = subprocess.run([*trl_command(args), "--workdir", str(cwd / "trl")], cwd=cwd, text=True, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(trl_command(args))} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps of each run (both sides)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="the peer harness's folder (toy_task.py, benchutil.py)")
    parser.add_argument("--trl", action="store_true", help="also run TRL's side, alternating with ours")
    parser.add_argument("--repeats", type=int, default=3, help="with --trl: runs of each side")
    parser.add_argument("--trl_python", type=Path, default=DEFAULT_TRL_PYTHON, help="the TRL virtual environment's python")
    args = parser.parse_args()
    args.peer = args.peer.resolve()
    command = shlex.join(trl_command(args))
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        sys.path.insert(0, str(args.peer))
        import toy_task

        pairs = cwd / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(r) + "\n" for r in toy_task.preference_pairs(512, seed=0)))
        policy = write_policy(args.peer, cwd)
        if not args.trl:
            ours = run_ours(cwd, policy, pairs, args, 0)
            emit("peer_dpo", {"steps": args.steps, "warmup": args.warmup, "pairs_per_step": 32, **ours, "trl_command": command})
            return
        runs = []
        for i in range(args.repeats):  # alternating, so a slow spell of the machine hits both sides
            runs.append({"ours": run_ours(cwd, policy, pairs, args, i), "trl": run_trl(cwd, args)})
    ours_median = statistics.median(r["ours"]["step_s_median"] for r in runs)
    trl_median = statistics.median(r["trl"]["step_s_median"] for r in runs)
    emit("peer_dpo", {
        "steps": args.steps, "warmup": args.warmup, "pairs_per_step": 32, "repeats": args.repeats,
        "ours_step_s_median": round(ours_median, 5), "trl_step_s_median": round(trl_median, 5), "ratio_ours_over_trl": round(ours_median / trl_median, 3),
        "foreign_cpu_cores_max": max(max(r["ours"]["foreign_cpu_cores"], r["trl"]["foreign_cpu_cores"]) for r in runs),
        "ours": [{k: r["ours"][k] for k in (*TRL_KEYS, "untimed_eval_s", "process_wall_s")} for r in runs],
        "trl": [{k: r["trl"][k] for k in (*TRL_KEYS, "trl", "transformers", "process_wall_s")} for r in runs],
        "trl_command": command,
    })


if __name__ == "__main__":
    main()
