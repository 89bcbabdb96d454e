"""`rlhf fit --config configs/toy/sft_fsdp.yaml` end to end: 2 processes (Lightning launches the second), a sharded
last.ckpt folder, a final single-file checkpoint that `rlhf eval` reads, a resume from the folder that restores the
weights exactly, and a resume with another number of processes refused with one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS

pytestmark = pytest.mark.sharded  # two processes: `python -m pytest -m sharded` (the default run skips them)

SHORT = [
    "--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
    "--data.init_args.max_val_prompts=8", "--data.init_args.batch_size=16", "--data.init_args.stratum_weights=null",
]


def rlhf(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # the `rlhf` script itself: Lightning starts the second process by running the same command line again
    return subprocess.run(["rlhf", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_sharded_sft_from_the_cli_writes_shards_a_whole_final_checkpoint_and_resumes(tmp_path):
    config = tmp_path / "sft_fsdp.yaml"
    config.write_text((CONFIGS / "toy" / "sft_fsdp.yaml").read_text().replace("every_n_train_steps: 100", "every_n_train_steps: 2"))
    done = rlhf(["fit", "--config", str(config), *SHORT], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    last, final = tmp_path / "checkpoints/toy/sft_fsdp/last.ckpt", tmp_path / "checkpoints/toy/sft.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert final.is_file()
    whole = torch.load(final, weights_only=True)
    assert whole["global_step"] == 2 and whole["rlhf"]["stage"] == "sft"

    evaluated = rlhf(["eval", "--ckpt", str(final), "--limit", "4"], tmp_path)  # one process, no process group
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    # resumed at its last step there is nothing left to train: the final checkpoint holds the weights read back
    os.rename(final, tmp_path / "first.ckpt")
    resumed = rlhf(["fit", "--config", str(config), *SHORT, "--ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = torch.load(final, weights_only=True)
    assert again["global_step"] == 2
    for k, v in whole["state_dict"].items():
        assert torch.equal(again["state_dict"][k], v), k
    for a, b in zip(whole["optimizer_states"][0]["state"].values(), again["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    other = rlhf(["fit", "--config", str(config), *SHORT, "--trainer.devices=1", "--ckpt_path=last"], tmp_path)
    assert other.returncode == 2, other.stderr[-3000:]
    error = [line for line in other.stderr.splitlines() if line.startswith("rlhf: error:")]
    assert len(error) == 1 and "holds the shards of 2 ranks and this run has 1" in error[0], other.stderr[-3000:]


def test_a_model_with_no_block_is_refused_with_one_line_from_two_processes(tmp_path):
    """Refused in `configure_model`, after the second process has started: each rank refuses, rank 0 alone prints."""
    done = rlhf(["fit", "--config", str(CONFIGS / "toy" / "sft_fsdp.yaml"), *SHORT, "--model.init_args.model={type: bigram}"], tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("rlhf: error:")]
    assert len(lines) == 1 and "model (BigramLM) has no transformer block to shard" in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()
