"""Crash-safe DPO: a run SIGKILLed mid-training, after a `last.ckpt` written at a validation step, and resumed
with `--ckpt_path last` ends with the checkpoint of an uninterrupted run tensor for tensor (the policy, AdamW's
state, keep_best's kept policy), with the same evaluations; the reference's table (`precompute_ref_logprobs`) is
recomputed at the resume. TensorBoard's view of the resumed run folder shows each step once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, QUIET, run_cli
from test_dpo import base, jsonl_config, pair_files  # noqa: F401  (fixtures: the tiny SFT checkpoint, JSONL pairs)
from test_resume import assert_same_checkpoint, event_steps, kill_after_next_checkpoint, next_second, start

STEPS = 12  # 64 pairs in batches of 8: 8 steps an epoch, so the resumed run crosses an epoch boundary


@pytest.fixture(scope="module")
def full_and_killed(base, pair_files, tmp_path_factory) -> tuple[Path, Path, int]:  # noqa: F811
    """(working dir of the uninterrupted run, of the run killed after its first checkpoint and resumed to the end,
    the step of that checkpoint)."""
    tmp_path = tmp_path_factory.mktemp("dpo_resume")
    # the toy config's reference table and keep_best; validation and last.ckpt every 4 steps: the checkpoint the
    # kill leaves is one written after a validation (eval_history and the kept policy in it); TensorBoard logs
    config = jsonl_config(tmp_path, base, pair_files, {"precompute_ref_logprobs": True, "eval": {"keep_best": True}},
                          {"max_steps": STEPS, "val_check_interval": 4, "log_every_n_steps": 1})
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["logger"] = yaml.safe_load((CONFIGS / "toy" / "dpo.yaml").read_text())["trainer"]["logger"]
    settings["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 4
    config.write_text(yaml.safe_dump(settings))

    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir(), killed.mkdir()
    run_cli(["fit", "--config", str(config), *QUIET], full)
    last = killed / "checkpoints" / "toy" / "dpo" / "last.ckpt"
    kill_after_next_checkpoint(start(config, killed), last)
    step = torch.load(last, weights_only=True)["global_step"]
    assert step in (4, 8)  # 4, unless this machine stalled the kill past the next checkpoint
    assert not (killed / "checkpoints" / "toy" / "dpo.ckpt").exists()
    next_second()
    assert run_cli(["fit", "--config", str(config), *QUIET, "--ckpt_path=last"], killed).trainer.global_step == STEPS
    return full, killed, step


def test_dpo_killed_mid_training_resumes_bitwise_identical(full_and_killed):
    full, killed, step = full_and_killed
    expected, final = full / "checkpoints" / "toy" / "dpo.ckpt", killed / "checkpoints" / "toy" / "dpo.ckpt"
    want, got = (torch.load(path, weights_only=True)["rlhf"] for path in (expected, final))
    assert [h["step"] for h in got["eval_history"]] == [0, 4, 8, 12]  # the checkpoint's evaluation not repeated
    assert got["eval_history"] == want["eval_history"] and got["chosen"] == want["chosen"]
    assert got["best"]["step"] == want["best"]["step"] and got["best"]["state"].keys() == want["best"]["state"].keys()
    runs = list((killed / "lightning_logs" / "toy" / "dpo").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # the resumed run logs into the same run folder
    resumed_events = max(runs[0].glob("events.out.tfevents.*"), key=lambda f: f.name)
    assert event_steps(resumed_events, "dpo/loss") == list(range(step, STEPS))  # from the step after the checkpoint
    assert_same_checkpoint(final, expected)  # every tensor, the kept policy's (rlhf/best/state) too


def test_tensorboard_shows_each_step_once_after_the_resume(full_and_killed):
    full, killed, _ = full_and_killed
    full_steps = event_steps(full / "lightning_logs" / "toy" / "dpo" / "version_0", "dpo/loss")
    assert full_steps == list(range(STEPS))
    assert event_steps(killed / "lightning_logs" / "toy" / "dpo" / "version_0", "dpo/loss") == full_steps  # none lost
