"""The one-command pipeline, reproducibility, crash-safe resume after SIGKILL, and the bad-input table."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, QUIET, run_cli, run_pipeline
from rlhf_lightning.checkpoints import CheckpointError
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.pipeline import split_stage_overrides
from rlhf_lightning.tokenizer import UnknownCharacterError

def test_stage_overrides_are_routed_to_their_stage():
    rest, overrides = split_stage_overrides(["--seed=1", "--sft.trainer.max_epochs", "2", "--ppo.model.init_args.optim.lr=1e-5"])
    assert rest == ["--seed=1"]
    assert overrides == {"sft": ["--trainer.max_epochs=2"], "reward": [], "ppo": ["--model.init_args.optim.lr=1e-5"]}


def test_seed_seeds_every_stage():
    from rlhf_lightning.pipeline import seed_args

    assert seed_args("sft", 3) == ["--seed_everything=3"]
    assert seed_args("reward", 3) == ["--seed_everything=3", "--data.init_args.seed=3"]
    assert seed_args("ppo", 3) == ["--seed_everything=3", "--data.init_args.seed=3", "--model.init_args.rollout.seed=3"]


def summary_rows(cwd: Path) -> list[dict]:
    return json.loads((cwd / "lightning_logs" / "toy" / "summary.json").read_text())


def test_same_seed_same_config_gives_identical_metrics(quick_pipeline, tmp_path):
    cwd, out = quick_pipeline
    first = summary_rows(cwd)
    run_pipeline(tmp_path)  # again, in another folder
    second = summary_rows(tmp_path)
    assert [r["stage"] for r in first] == ["sft", "reward", "ppo"]
    assert set(first[0]) == {"stage", "test_accuracy", "test_reward", "test_kl", "test_gold_reward", "wall_s"}
    assert first[1]["test_gold_reward"] is None and all(0 <= first[i]["test_gold_reward"] <= 1 for i in (0, 2))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)
    assert first[0]["test_kl"] == pytest.approx(0.0, abs=1e-6)  # the SFT row is its own reference
    assert "[pipeline] sft: start" in out and "[pipeline] ppo: done" in out and "test_accuracy" in out


def ppo_config(tmp_path: Path, rollouts: int) -> Path:
    """The toy PPO config, small, checkpointing after every rollout (4 optimizer steps each)."""
    config = yaml.safe_load((CONFIGS / "toy" / "ppo.yaml").read_text())
    config["trainer"].update(limit_train_batches=rollouts, logger=False, enable_progress_bar=False)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith(("ModelCheckpoint", "ResumeCheckpoint")):
            callback["init_args"]["every_n_train_steps"] = config["model"]["init_args"]["update"]["ppo_epochs"]
    config["model"]["init_args"]["eval"].update(every=0)
    config["data"]["init_args"].update(batch_size=16, max_val_prompts=32)
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigkill_during_ppo_then_resume_runs_exactly_the_configured_rollouts(tmp_path, sft_ckpt, reward_ckpt):
    (tmp_path / "checkpoints" / "toy").mkdir(parents=True)
    for ckpt in (sft_ckpt, reward_ckpt):
        shutil.copy(ckpt, tmp_path / "checkpoints" / "toy" / ckpt.name)
    rollouts, config = 20, ppo_config(tmp_path, 20)
    proc = subprocess.Popen(["rlhf", "fit", "--config", str(config)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "checkpoints" / "toy" / "ppo" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (tmp_path / "checkpoints" / "toy" / "ppo.ckpt").exists()  # the final checkpoint was never reached
    for path in (tmp_path / "checkpoints").rglob("*.ckpt"):  # no truncated file under a final name
        torch.load(path, map_location="cpu", weights_only=True)
    done_before = torch.load(last, weights_only=True)["rlhf"]["rollouts"]
    assert 1 <= done_before < rollouts

    cli = run_cli(["fit", "--config", str(config), "--ckpt_path=last"], tmp_path)
    assert cli.model._rollouts == rollouts  # none skipped, none repeated
    assert cli.trainer.global_step == rollouts * cli.model.cfg.update.ppo_epochs
    final = torch.load(tmp_path / "checkpoints" / "toy" / "ppo.ckpt", weights_only=True)
    assert final["rlhf"]["rollouts"] == rollouts


# ---------------------------------------------------------------- bad input: each row an input and its error


def sft_args(path: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "toy" / "sft.yaml"), *QUIET, "--trainer.logger=false", f"--data.init_args.train_file={path}"]


def jsonl(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = '{"prompt": "Q: 1+1=\\nA:", "completion": "2"}'


def nan_reward_ckpt(tmp_path: Path, reward_ckpt: Path) -> Path:
    checkpoint = torch.load(reward_ckpt, weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("model.head"):
            value.fill_(float("nan"))
    path = tmp_path / "nan_reward.ckpt"
    torch.save(checkpoint, path)
    return path


BAD_INPUTS = {
    # id: (build args from (tmp_path, sft_ckpt, reward_ckpt), error type, words the message must contain)
    "malformed-jsonl": (lambda t, s, r: sft_args(jsonl(t, GOOD, '{"prompt": "Q: 1+')), DataError, ["data.jsonl:2", "JSON"]),
    "not-an-object": (lambda t, s, r: sft_args(jsonl(t, GOOD, '["Q: 1+1=", "2"]')), DataError, ["data.jsonl:2", "object"]),
    "missing-field": (lambda t, s, r: sft_args(jsonl(t, '{"prompt": "Q: 1+1=\\nA:"}')), DataError, ["data.jsonl:1", "'completion'"]),
    "wrong-type": (lambda t, s, r: sft_args(jsonl(t, '{"prompt": 3, "completion": "2"}')), DataError, ["data.jsonl:1", "'prompt'"]),
    "empty-prompt": (lambda t, s, r: sft_args(jsonl(t, GOOD, '{"prompt": " ", "completion": "2"}')), DataError, ["data.jsonl:2", "'prompt'"]),
    "unknown-character": (lambda t, s, r: sft_args(jsonl(t, '{"prompt": "Q: 1*1=\\nA:", "completion": "1"}')), UnknownCharacterError, ["data.jsonl:1", "'prompt'", "'*'"]),
    "too-long": (lambda t, s, r: sft_args(jsonl(t, GOOD, '{"prompt": "Q: 1+1=\\nA:", "completion": "' + "1" * 40 + '"}')), DataError, ["data.jsonl:2", "context"]),
    "sft-ckpt-as-reward": (
        lambda t, s, r: ["fit", "--config", str(CONFIGS / "toy" / "ppo.yaml"), *QUIET, f"--model.init_args.policy_ckpt={s}", f"--model.init_args.reward.ckpt={s}"],
        CheckpointError, ["reward.ckpt", "'sft' checkpoint", "'reward'"],
    ),
    "missing-ckpt": (
        lambda t, s, r: ["fit", "--config", str(CONFIGS / "toy" / "reward.yaml"), *QUIET, f"--model.init_args.sft_ckpt={t / 'nope.ckpt'}"],
        CheckpointError, ["sft_ckpt", "nope.ckpt", "does not exist"],
    ),
    "nan-reward": (
        lambda t, s, r: ["fit", "--config", str(CONFIGS / "toy" / "ppo.yaml"), *QUIET, "--trainer.logger=false", f"--model.init_args.policy_ckpt={s}",
                         f"--model.init_args.reward.ckpt={nan_reward_ckpt(t, r)}", "--trainer.limit_train_batches=2", "--data.init_args.batch_size=8"],
        ValueError, ["'learned'", "non-finite"],
    ),
    "log-dir-is-a-file": (
        lambda t, s, r: [*sft_args(jsonl(t, GOOD)), "--trainer.logger=true", f"--trainer.default_root_dir={a_file(t)}"],
        NotADirectoryError, ["afile", "existing file"],
    ),
    "unknown-yaml-option": (lambda t, s, r: ["fit", "--config", str(bad_yaml(t))], SystemExit, []),
}


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


def bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text((CONFIGS / "toy" / "sft.yaml").read_text().replace("    optim:", "    lrate: 0.1\n    optim:", 1))
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_table(case, tmp_path, sft_ckpt, reward_ckpt, capsys):
    build, error, words = BAD_INPUTS[case]
    args = build(tmp_path, sft_ckpt, reward_ckpt)
    outputs = {p for p in tmp_path.rglob("*")}
    with pytest.raises(error) as info:
        run_cli(args, tmp_path)
    message = str(info.value) + (capsys.readouterr().err if error is SystemExit else "")
    for word in words:
        assert word in message, message
    if case == "unknown-yaml-option":
        assert "lrate" in message
    written = {p for p in tmp_path.rglob("*")} - outputs
    assert not [p for p in written if p.suffix in (".ckpt", ".tmp") or p.name.startswith("events.")], written
