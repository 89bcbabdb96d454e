"""`rlhf pipeline`: SFT -> reward model -> PPO (or SFT -> DPO) in one process, then a table on the `test` split.

    rlhf pipeline                                   # the embedded toy task, configs/toy/pipeline.yaml
    rlhf pipeline --method dpo                      # SFT -> DPO on pairs sampled from the SFT policy: no reward model
    rlhf pipeline --config configs/toy/pipeline.yaml --sft.trainer.max_epochs=2 --ppo.model.init_args.optim.lr=1e-4
    rlhf pipeline --resume                          # after an interruption: skip done stages, continue the one cut off

Each stage is the same `rlhf fit --config <stage yaml>` run in-process; `--<stage>.<option>=<value>`
passes `--<option>=<value>` to that stage. Each stage's final checkpoint is passed to the next stage's options
explicitly (`stage_inputs`): the reward stage gets `model.init_args.sft_ckpt` (and its pair sampler's
`policy_ckpt`), PPO gets `policy_ckpt` and `reward_ckpt`, DPO gets `policy_ckpt` (and its pair sampler's).
The table (and `summary.json`, one row per stage: `stage`, `test_accuracy`, `test_reward`, `test_kl`,
`wall_s`) reports for each policy its greedy accuracy on `test`, the learned reward's mean (normalized)
on those answers, and `test_kl`: the per-token KL to the SFT reference on those answers, with `eval/kl`'s
definition (`scoring.completion_kl`, at temperature 1); the reward row reports the reward model's pairwise
accuracy against the judge on sampled `test` completions. With `--method dpo` there is no reward model: the rows are
`sft` and `dpo`, and `test_reward` is empty.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Literal

import torch

from rlhf_lightning.files import atomic_write_text

STAGES = ("sft", "reward", "ppo", "dpo")  # every stage a pipeline YAML can name
METHODS = {"ppo": ("sft", "reward", "ppo"), "dpo": ("sft", "dpo")}  # the stages each method runs, in order


def default_config() -> Path:
    from rlhf_lightning.cli import config_root

    return config_root() / "toy" / "pipeline.yaml"


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="rlhf pipeline", description="SFT -> reward model -> PPO (or SFT -> DPO) on one task, then a test-split table.")
    parser.add_argument("--config", action=ActionConfigFile, help="pipeline YAML (default: configs/toy/pipeline.yaml)")
    parser.add_argument("--task", type=str, default="toy", help="task whose test split is reported")
    parser.add_argument("--method", type=Literal["ppo", "dpo"], default="ppo", help="ppo: SFT -> reward model -> PPO; dpo: SFT -> DPO")
    for stage in STAGES:
        parser.add_argument(f"--{stage}_config", type=str, default=f"{stage}.yaml", help=f"{stage} stage YAML, relative to the pipeline YAML")
        parser.add_argument(f"--{stage}_args", type=list[str], default=[], help=f"extra `rlhf fit` options for the {stage} stage")
    parser.add_argument("--summary", type=str, default="lightning_logs/toy/summary.json", help="where summary.json goes")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="sampled completions per test prompt (K) for the reward row and test_gold_reward")
    parser.add_argument("--eval_samples", type=int | None, default=None, help="deprecated name of --samples_per_prompt")
    parser.add_argument("--seed", type=int, default=0, help="seeds every stage (training, sampling) and the table's sampling")
    parser.add_argument("--resume", action="store_true", help="skip stages already done with this config and inputs; continue an interrupted one from its last.ckpt")
    return parser


def check_options(cfg) -> None:
    """Refuse the pipeline's own bad numbers and task before any stage runs (each stage checks its options)."""
    from rlhf_lightning.options import SEED_MAX, check_choice, check_number
    from rlhf_lightning.tasks.arithmetic import TASKS

    check_choice("task", cfg.task, TASKS, prefix="--")
    check_number("samples_per_prompt", cfg.samples_per_prompt, low=1, integer=True, prefix="--")
    check_number("eval_samples", cfg.eval_samples, low=1, integer=True, allow_none=True, prefix="--")
    check_number("seed", cfg.seed, low=0, high=SEED_MAX, integer=True, prefix="--")


def split_stage_overrides(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`--ppo.model.init_args.optim.lr=1e-4` -> {"ppo": ["--model.init_args.optim.lr=1e-4"]}; other args returned as they are.
    The default method's stages are always keys; another stage's (`--dpo.`) only when it has overrides."""
    rest, overrides = [], {s: [] for s in METHODS["ppo"]}
    it = iter(argv)
    for arg in it:
        stage = next((s for s in STAGES if arg.startswith(f"--{s}.")), None)
        if stage is None:
            rest.append(arg)
            continue
        option = "--" + arg[len(stage) + 3 :]
        if "=" not in option:  # "--sft.trainer.max_epochs 3"
            option = f"{option}={next(it)}"
        overrides.setdefault(stage, []).append(option)
    return rest, overrides


def final_checkpoint_path(cli) -> str:
    from rlhf_lightning.callbacks import FinalCheckpoint

    for callback in cli.trainer.callbacks:
        if isinstance(callback, FinalCheckpoint):
            return callback.path
    raise ValueError("the stage config has no rlhf_lightning.callbacks.FinalCheckpoint callback")


def stage_key(config: Path, args: list[str], inputs: list[str]) -> str:
    """SHA-256 of what determines a stage's result: its config file, its options, the checkpoints it reads."""
    from rlhf_lightning.checkpoints import sha256_file

    digest = hashlib.sha256(Path(config).read_bytes())
    for part in [*args, *(sha256_file(path) for path in inputs)]:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def run_recorded_stage(stage: str, config: Path, args: list[str], inputs: list[str], records: Path, resume: bool) -> tuple[str, float]:
    """`run_stage`, recorded in `records` (JSON: per stage its key, "running" or "done", checkpoint, SHA-256, wall).

    With `resume`, a stage done with the same key whose checkpoint still has the recorded SHA-256 is skipped,
    and a stage that was running with the same key continues from its last.ckpt; anything else runs anew.
    """
    from rlhf_lightning.checkpoints import sha256_file

    state = json.loads(records.read_text()) if records.is_file() else {}
    key, record = stage_key(config, args, inputs), state.get(stage, {})
    same = resume and record.get("key") == key
    if same and record.get("status") == "done" and Path(record["ckpt"]).is_file() and sha256_file(record["ckpt"]) == record["sha256"]:
        print(f"[pipeline] {stage}: done before with this config and inputs, skipped -> {record['ckpt']}", flush=True)
        return record["ckpt"], record["wall_s"]
    atomic_write_text(records, [json.dumps({**state, stage: {"key": key, "status": "running"}}, indent=2) + "\n"])
    path, wall = run_stage(stage, config, args, resume=same)
    state[stage] = {"key": key, "status": "done", "ckpt": path, "sha256": sha256_file(path), "wall_s": wall}
    atomic_write_text(records, [json.dumps(state, indent=2) + "\n"])
    return path, wall


def run_stage(stage: str, config: Path, args: list[str], resume: bool = False) -> tuple[str, float]:
    from rlhf_lightning.cli import lightning_cli

    print(f"[pipeline] {stage}: start ({config})", flush=True)
    start = time.perf_counter()
    cli = lightning_cli(["fit", "--config", str(config), *args], resume_last=resume)
    if cli.trainer.interrupted:
        raise SystemExit(f"[pipeline] {stage}: interrupted")
    wall = time.perf_counter() - start
    path = final_checkpoint_path(cli)
    print(f"[pipeline] {stage}: done in {wall:.1f} s -> {path}", flush=True)
    return path, wall


def test_batch(tokenizer, policy, task: str) -> dict:
    """Every `test` prompt in one `PromptDataset` batch."""
    from rlhf_lightning.data.prompts import PromptDataset, load_prompts
    from rlhf_lightning.policy import context_length

    data = PromptDataset(tokenizer, load_prompts(task, "test"), context_length(policy))
    return data.collate([data[i] for i in range(len(data))])


def repeat_rows(batch: dict, k: int) -> dict:
    """Each row of a prompt batch (tensors and lists alike) `k` times, consecutively."""
    return {key: v.repeat_interleave(k, 0) if torch.is_tensor(v) else [x for x in v for _ in range(k)] for key, v in batch.items()}


@torch.no_grad()
def policy_row(stage: str, ckpt: str, reference_ckpt: str, reward_ckpt: str | None, task: str, samples: int, seed: int) -> tuple[dict, dict]:
    """Greedy test accuracy, mean normalized learned reward of those answers (None without a reward model), KL to
    the reference (`evaluation.answer`); the judge on `samples` sampled answers per prompt; and the accuracy and
    reward per stratum."""
    from rlhf_lightning.evaluation import Evaluation, answer
    from rlhf_lightning.policy import load_policy
    from rlhf_lightning.rewards import LearnedReward
    from rlhf_lightning.tasks.arithmetic import EVAL_MAX_NEW_TOKENS
    from rlhf_lightning.tasks.strata import task_strata_names

    policy, tokenizer, _ = load_policy(ckpt)
    reference, _, _ = load_policy(reference_ckpt)
    reward = LearnedReward(reward_ckpt, normalize=True, policy_tokenizer=tokenizer, policy_ckpt=ckpt) if reward_ckpt else None
    policy.eval(), reference.eval()
    batch = test_batch(tokenizer, policy, task)
    greedy = Evaluation([answer(policy, tokenizer, batch, EVAL_MAX_NEW_TOKENS, score=reward, reference=reference)])
    generator = torch.Generator().manual_seed(seed)
    sampled = Evaluation([answer(policy, tokenizer, repeat_rows(batch, samples), EVAL_MAX_NEW_TOKENS, greedy=False, generator=generator)])
    row = {
        "stage": stage, "test_accuracy": greedy.accuracy(), "test_reward": greedy.reward(), "test_kl": greedy.kl(),
        "test_gold_reward": sampled.accuracy(),  # the judge on K samples per prompt
    }
    return row, greedy.strata(task_strata_names(task))


@torch.no_grad()
def reward_row(reward_ckpt: str, sft_ckpt: str, task: str, samples: int, seed: int) -> dict:
    """Pairwise accuracy of the reward model against the judge on sampled test completions of the SFT policy."""
    from rlhf_lightning.evaluation import answer
    from rlhf_lightning.policy import load_policy
    from rlhf_lightning.scoring import load_reward_model, score_texts
    from rlhf_lightning.tasks.arithmetic import EVAL_MAX_NEW_TOKENS

    policy, tokenizer, _ = load_policy(sft_ckpt)
    reward_model, reward_tokenizer, _ = load_reward_model(reward_ckpt)
    repeated = repeat_rows(test_batch(tokenizer, policy, task), samples)
    score = lambda prompts, completions, ended, golds: score_texts(reward_model, reward_tokenizer, prompts, completions, ended)  # noqa: E731
    answers = answer(policy.eval(), tokenizer, repeated, EVAL_MAX_NEW_TOKENS, greedy=False, generator=torch.Generator().manual_seed(seed), score=score)
    labels = answers.scores.view(-1, samples)  # (prompts, K) the judge
    scores = answers.rewards.view(-1, samples)  # (prompts, K) the reward model
    better = labels[:, :, None] > labels[:, None, :]  # (prompts, K, K): pair (i, j) where i is judged better
    agree = (scores[:, :, None] > scores[:, None, :]) & better
    accuracy = agree.sum() / better.sum().clamp_min(1)
    return {"stage": "reward", "test_accuracy": float(accuracy), "test_reward": None, "test_kl": None, "test_gold_reward": None}


def format_table(rows: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    head = ["stage", "test_accuracy", "test_reward", "test_kl", "test_gold_reward", "wall_s"]
    lines = [head] + [[cell(r[k]) if k != "wall_s" else f"{r[k]:.1f}" for k in head] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines]
    return "\n".join([out[0], "  ".join("-" * w for w in widths), *out[1:]])


def format_worst_strata(rows: list[dict], strata: dict[str, dict], min_n: int = 5) -> str:
    """One line per policy stage: its least accurate stratum with at least `min_n` test prompts."""
    from rlhf_lightning.tasks.strata import worst_stratum

    overall = {r["stage"]: r["test_accuracy"] for r in rows}
    parts = []
    for stage, metrics in strata.items():
        name = worst_stratum(metrics, min_n)
        if name is not None:
            m = metrics[name]
            parts.append(f"[pipeline] worst stratum (n >= {min_n}): {stage} {name} {m['accuracy']:.4f} on {m['n']} prompts (overall {overall[stage]:.4f})")
    return "\n".join(parts)


def samples_pairs(config: Path) -> bool:
    """Whether a reward stage config samples its preference pairs from a policy (`SampledPairs`)."""
    import yaml

    pairs = ((yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}).get("init_args", {}).get("pairs") or {}
    return isinstance(pairs, dict) and str(pairs.get("class_path", "")).endswith("SampledPairs")


def stage_inputs(stage: str, config: Path, ckpts: dict[str, str]) -> list[str]:
    """The options that hand the earlier stages' checkpoints to `stage`: the pipeline's explicit wiring."""
    if stage == "reward":
        args = [f"--model.init_args.sft_ckpt={ckpts['sft']}"]
        if samples_pairs(config):
            args.append(f"--data.init_args.pairs.init_args.policy_ckpt={ckpts['sft']}")
        return args
    if stage == "ppo":
        return [f"--model.init_args.policy_ckpt={ckpts['sft']}", f"--model.init_args.reward.ckpt={ckpts['reward']}"]
    if stage == "dpo":
        args = [f"--model.init_args.policy_ckpt={ckpts['sft']}"]
        if samples_pairs(config):
            args.append(f"--data.init_args.pairs.init_args.policy_ckpt={ckpts['sft']}")
        return args
    return []


def seed_args(stage: str, seed: int) -> list[str]:
    """`--seed N` seeds every stage: the global seed, and the sampling seeds of the reward, PPO and DPO stages
    (the stage's own options and `--<stage>.` overrides come after, so they win)."""
    args = [f"--seed_everything={seed}"]
    if stage in ("reward", "ppo", "dpo"):
        args.append(f"--data.init_args.seed={seed}")
    if stage == "ppo":
        args.append(f"--model.init_args.rollout.seed={seed}")
    return args


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    argv, overrides = split_stage_overrides(argv)
    config = next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv) if a.split("=")[0] == "--config"), None)
    if config is None:
        config = str(default_config())
        argv = ["--config", config, *argv]
    else:  # a file, or a shipped config by name (`toy/pipeline`)
        from rlhf_lightning.cli import resolve_config, resolve_config_args

        config, argv = resolve_config(config), resolve_config_args(argv)
    cfg = build_parser().parse_args(argv)
    check_options(cfg)
    if cfg.eval_samples is not None:
        warnings.warn("rlhf pipeline: eval_samples is deprecated, use samples_per_prompt", DeprecationWarning, stacklevel=1)
        cfg.samples_per_prompt = cfg.eval_samples
    base = Path(config).resolve().parent
    ckpts, walls = {}, {}
    for stage in METHODS[cfg.method]:
        stage_config = base / cfg[f"{stage}_config"]
        stage_args = [*stage_inputs(stage, stage_config, ckpts), *seed_args(stage, cfg.seed), *cfg[f"{stage}_args"], *overrides.get(stage, [])]
        records = Path(cfg.summary).with_name("pipeline_state.json")
        ckpts[stage], walls[stage] = run_recorded_stage(stage, stage_config, stage_args, list(ckpts.values()), records, cfg.resume)
    print("[pipeline] evaluating on the test split", flush=True)
    reward = ckpts.get("reward")  # none with --method dpo
    rows, strata = [], {}
    for stage in METHODS[cfg.method]:
        if stage == "reward":
            rows.append(reward_row(reward, ckpts["sft"], cfg.task, cfg.samples_per_prompt, cfg.seed))
            continue
        row, strata[stage] = policy_row(stage, ckpts[stage], ckpts["sft"], reward, cfg.task, cfg.samples_per_prompt, cfg.seed)
        rows.append(row)
    for row in rows:
        row["wall_s"] = round(walls[row["stage"]], 2)
    summary = Path(cfg.summary)
    summary.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(summary, [json.dumps(rows, indent=2) + "\n"])
    strata_path = atomic_write_text(summary.with_name("strata.json"), [json.dumps(strata, indent=2) + "\n"])
    print()
    print(format_table(rows))
    print(format_worst_strata(rows, strata))
    print(f"\n[pipeline] total {time.perf_counter() - start:.1f} s; summary in {summary}, per stratum in {strata_path}", flush=True)
    return 0
