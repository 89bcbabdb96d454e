"""Checkpoints cannot run code: weights_only loading refuses pickled objects; exports are safetensors + JSON."""

import json
import os
import pickle

import pytest
import torch

from rlhf_lightning.checkpoints import CheckpointError, read_checkpoint
from rlhf_lightning.evaluate import evaluate_policy
from rlhf_lightning.export import export_policy
from rlhf_lightning.modules import SFTModule
from rlhf_lightning.policy import load_policy


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious_ckpt(tmp_path, sft_ckpt):
    checkpoint = torch.load(sft_ckpt, weights_only=True)
    marker = tmp_path / "code-ran"
    checkpoint["rlhf"]["payload"] = RunsCode(str(marker))
    path = tmp_path / "malicious.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_a_checkpoint_carrying_code_is_refused_everywhere(malicious_ckpt):
    path, marker = malicious_ckpt
    with pytest.raises(CheckpointError, match="safe checkpoint"):
        read_checkpoint(path, ("sft",), "ckpt")
    with pytest.raises(CheckpointError, match="safe checkpoint"):
        load_policy(str(path))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        SFTModule.load_from_checkpoint(path)  # Lightning's loader: torch's weights_only=True default
    assert not marker.exists()  # the payload never ran


def test_wrong_stage_and_missing_checkpoint_errors(tmp_path, sft_ckpt):
    with pytest.raises(CheckpointError, match=r"is a 'sft' checkpoint, expected 'reward'"):
        read_checkpoint(sft_ckpt, ("reward",), "model.init_args.reward.ckpt")
    with pytest.raises(CheckpointError, match=r"policy_ckpt: checkpoint .*nope\.ckpt' does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt", ("sft",), "policy_ckpt")


def test_export_round_trip_gives_identical_logits_and_eval(tmp_path, sft_ckpt):
    out = export_policy(str(sft_ckpt), str(tmp_path / "policy"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["stage"] == "sft"
    original, tokenizer, _ = load_policy(str(sft_ckpt))
    exported, tokenizer2, _ = load_policy(str(out))
    assert tokenizer2 == tokenizer
    ids = torch.tensor([tokenizer.encode_prompt("Q: 3+4=\nA:")])
    mask = torch.ones_like(ids, dtype=torch.bool)
    torch.testing.assert_close(exported.eval()(ids, mask), original.eval()(ids, mask), rtol=0, atol=0)
    a, _ = evaluate_policy(str(sft_ckpt), split="val")
    b, _ = evaluate_policy(str(out), split="val")
    assert a["accuracy"] == b["accuracy"]
    with pytest.raises(ValueError, match="not a folder"):
        export_policy(str(sft_ckpt), str(tmp_path / "policy" / "config.json"))
