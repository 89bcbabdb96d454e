"""The later stages on the toy_chat task: DPO (configs/toy_chat/dpo.yaml, and `rlhf pipeline --method dpo`) evaluates
the conversational `val` prompts, rendered by the policy's chat template, and the reward model records that template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, QUIET, run_cli

TINY = "{type: gpt, n_layer: 1, n_head: 2, n_embd: 16, block_size: 48}"
CHAT_PROMPT = "<|system|>Solve.<|user|>Q: "


def tiny_sft(tmp_path_factory, task: str) -> Path:
    """A tiny SFT checkpoint of `task` (a few steps: the wiring is what is tested)."""
    cwd = tmp_path_factory.mktemp(f"{task}_sft")
    run_cli(["fit", "--config", str(CONFIGS / task / "sft.yaml"), *QUIET, "--trainer.logger=false", "--trainer.max_steps=3",
             "--data.init_args.demo_fraction=0.05", "--data.init_args.max_val_prompts=8", f"--model.init_args.model={TINY}"], cwd)
    return cwd / "checkpoints" / task / "sft.ckpt"


@pytest.fixture(scope="module")
def chat_sft(tmp_path_factory) -> Path:
    return tiny_sft(tmp_path_factory, "toy_chat")


@pytest.fixture(scope="module")
def flat_sft(tmp_path_factory) -> Path:
    return tiny_sft(tmp_path_factory, "toy")


def test_dpo_fit_on_toy_chat_evaluates_the_chat_prompts(chat_sft, tmp_path):
    cli = run_cli([
        "fit", "--config", str(CONFIGS / "toy_chat" / "dpo.yaml"), *QUIET, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        f"--model.init_args.policy_ckpt={chat_sft}", f"--data.init_args.pairs.policy_ckpt={chat_sft}",
        "--model.init_args.eval.max_val_prompts=16", "--data.init_args.batch_size=8",
        "--data.init_args.pairs.judge=random", "--data.init_args.pairs.max_train_prompts=32", "--data.init_args.pairs.max_val_prompts=8",
    ], tmp_path)
    prompts = [r.prompt for r in cli.model._val_prompts.records]
    assert len(prompts) == 16 and all(p.startswith(CHAT_PROMPT) and p.endswith("\nA:<|assistant|>") for p in prompts)
    assert [h["step"] for h in cli.model.eval_history] == [0, 2]  # before the first update, and at the end
    run = tmp_path / cli.trainer.log_dir  # relative to the run's working folder
    pairs = [json.loads(line) for line in (run / "preferences_train.jsonl").read_text().splitlines()]
    assert pairs and all(p["prompt"].startswith(CHAT_PROMPT) for p in pairs)
    dpo = torch.load(tmp_path / "checkpoints" / "toy_chat" / "dpo.ckpt", weights_only=True, map_location="cpu")["rlhf"]
    sft = torch.load(chat_sft, weights_only=True, map_location="cpu")["rlhf"]
    assert dpo["stage"] == "dpo" and dpo["tokenizer"] == sft["tokenizer"] and len(dpo["tokenizer"]["template_sha256"]) == 64


def test_dpo_used_alone_evaluates_the_task_of_its_policy(chat_sft, flat_sft):
    from rlhf_lightning.modules.dpo import DPOModule

    chat = DPOModule(policy_ckpt=str(chat_sft), eval={"max_val_prompts": 4})
    flat = DPOModule(policy_ckpt=str(flat_sft), eval={"max_val_prompts": 4})
    assert (chat.task, flat.task) == ("toy_chat", "toy")
    assert 0 <= chat.evaluate()["eval/accuracy"] <= 1 and 0 <= flat.evaluate()["eval/accuracy"] <= 1
    assert all(r.prompt.startswith(CHAT_PROMPT) for r in chat._val_prompts.records)
    assert all(r.prompt.startswith("Q: ") for r in flat._val_prompts.records)


def test_reward_model_on_toy_chat_records_the_policys_template(chat_sft):
    from rlhf_lightning.modules.reward import RewardModule
    from rlhf_lightning.tokenizer import load_tokenizer

    meta = RewardModule(sft_ckpt=str(chat_sft)).checkpoint_meta()
    sft = torch.load(chat_sft, weights_only=True, map_location="cpu")["rlhf"]["tokenizer"]
    assert meta["tokenizer"] == sft and meta["tokenizer"]["template"] == load_tokenizer(sft).template


def test_pipeline_method_dpo_on_toy_chat(tmp_path, monkeypatch):
    from rlhf_lightning.pipeline import main as pipeline_main

    monkeypatch.chdir(tmp_path)
    quiet = [f"--{s}.{q[2:]}" for s in ("sft", "dpo") for q in [*QUIET, "--trainer.logger=false"]]
    assert pipeline_main([
        "--config", str(CONFIGS / "toy_chat" / "pipeline.yaml"), "--method", "dpo", "--samples_per_prompt=1", *quiet,
        "--sft.trainer.max_steps=3", f"--sft.model.init_args.model={TINY}", "--sft.data.init_args.demo_fraction=0.05",
        "--sft.data.init_args.max_val_prompts=8",
        "--dpo.trainer.max_steps=1", "--dpo.trainer.val_check_interval=1", "--dpo.data.init_args.batch_size=8",
        "--dpo.data.init_args.pairs.judge=random", "--dpo.data.init_args.pairs.max_train_prompts=16",
        "--dpo.data.init_args.pairs.max_val_prompts=4", "--dpo.model.init_args.eval.max_val_prompts=8",
    ]) == 0
    rows = json.loads((tmp_path / "lightning_logs" / "toy_chat" / "summary.json").read_text())
    assert [r["stage"] for r in rows] == ["sft", "dpo"]
    dpo = torch.load(tmp_path / "checkpoints" / "toy_chat" / "dpo.ckpt", weights_only=True, map_location="cpu")["rlhf"]
    assert dpo["policy_ckpt"] == "checkpoints/toy_chat/sft.ckpt" and dpo["tokenizer"]["chat"] is True
