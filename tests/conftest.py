"""Shared fixtures: configs, an in-process CLI runner, one small trained SFT checkpoint for all tests, and one
quick pipeline run.

Every float comparison in this suite follows the tolerance policy written in `tolerance.py` (exact only for the
same operations in the same order; otherwise a bound derived from float32's rounding and the reduction), so the
suite passes under each `ATEN_CPU_CAPABILITY` (default, avx2, avx512) a CPU runs."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Quiet, deterministic, and fast settings for every in-process run.
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run_cli(args: list[str], cwd: Path):
    """Run `rlhf fit ...` in-process (LightningCLI(args=...)) with `cwd` as the working directory."""
    from rlhf_lightning.cli import lightning_cli

    old = Path.cwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lightning_cli(args)
    finally:
        os.chdir(old)


def with_groups(base: dict, overrides: dict) -> dict:
    """Module options `base` updated by `overrides`; an option group (a mapping in both) is merged field by field."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def ddp_mean_gradient(params: list):
    """What DDP does to the gradients of `params` after backward: average them over the ranks (nothing in one
    process). Returns them flattened into one tensor."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    return torch.cat([p.grad.flatten() for p in params])


# About 1,060 steps of SFT on the toy task (about 30 s here): far above chance, shared by every test that needs a
# trained policy.
SFT_QUICK = [
    "fit", "--config", str(CONFIGS / "toy" / "sft.yaml"), *QUIET,
    "--trainer.max_epochs=10", "--trainer.logger=false", "--data.init_args.max_val_prompts=256",
    "--data.init_args.stratum_weights=null",  # demonstrations as they come: tests rely on a policy weak on single digits
]


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """(working dir, path of checkpoints/toy/sft.ckpt, the CLI object) of one quick SFT run."""
    cwd = tmp_path_factory.mktemp("sft_run")
    cli = run_cli(SFT_QUICK, cwd)
    return cwd, cwd / "checkpoints" / "toy" / "sft.ckpt", cli


@pytest.fixture(scope="session")
def sft_ckpt(sft_run) -> Path:
    return sft_run[1]


# A quick reward fit on pairs sampled from the shared SFT checkpoint, in the same working directory, so the
# stage configs' fixed paths (checkpoints/toy/sft.ckpt -> checkpoints/toy/reward.ckpt) chain as in a real run.
RM_QUICK = [
    "fit", "--config", str(CONFIGS / "toy" / "reward.yaml"), *QUIET, "--trainer.logger=false",
    "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--data.init_args.batch_size=32",
    "--data.init_args.pairs.max_train_prompts=300", "--data.init_args.pairs.max_val_prompts=100",
]


@pytest.fixture(scope="session")
def reward_ckpt(sft_run) -> Path:
    cwd = sft_run[0]
    run_cli(RM_QUICK, cwd)
    return cwd / "checkpoints" / "toy" / "reward.ckpt"


# The default pipeline (configs/toy/pipeline.yaml), each stage cut short: one SFT epoch on 10% of the demonstrations,
# 3 reward steps, 3 PPO rollouts.
QUIET_STAGES = [f"--{s}.{q[2:]}" for s in ("sft", "reward", "ppo") for q in QUIET]
PIPELINE_QUICK = [
    *QUIET_STAGES,
    "--sft.trainer.max_epochs=1", "--sft.data.init_args.demo_fraction=0.1", "--sft.data.init_args.max_val_prompts=64",
    "--reward.trainer.max_epochs=1", "--reward.trainer.limit_train_batches=3",
    "--reward.data.init_args.pairs.max_train_prompts=200", "--reward.data.init_args.pairs.max_val_prompts=50",
    "--ppo.trainer.max_epochs=1", "--ppo.trainer.limit_train_batches=3", "--ppo.data.init_args.batch_size=16",
    "--ppo.data.init_args.max_val_prompts=64",
]


def run_pipeline(cwd: Path) -> str:
    """Run `rlhf pipeline` with PIPELINE_QUICK in `cwd`; returns what it printed."""
    from rlhf_lightning.pipeline import main as pipeline_main

    out = io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            assert pipeline_main(PIPELINE_QUICK) == 0
    finally:
        os.chdir(old)
    return out.getvalue()


@pytest.fixture(scope="session")
def quick_pipeline(tmp_path_factory) -> tuple[Path, str]:
    """(working dir, printed output) of one quick pipeline run, shared by the tests that read its results."""
    cwd = tmp_path_factory.mktemp("pipeline")
    return cwd, run_pipeline(cwd)


@pytest.fixture
def traced_step(monkeypatch):
    """`compile=True`'s path on CPU: the static cache and the whole-buffer mask, its decode step traced whole by dynamo
    (`fullgraph=True`, backend "eager": no compiler, no CUDA) where a GPU would capture it with CUDA graphs."""
    import torch
    from torch._dynamo.utils import counters

    import rlhf_lightning.generation as generation

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(generation, "_can_capture", lambda model, device: True)
    traced = torch.compile(generation._decode_step, backend="eager", fullgraph=True, dynamic=False)
    monkeypatch.setattr(generation, "_compiled_step", lambda: traced)
    return counters
