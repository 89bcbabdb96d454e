"""Sharding in one process: distributed checkpoint folders read safely and consolidated, the sharded strategy's and
the sharding policy's refusals, and what the sharding finds to shard. (Two processes: tests/test_fsdp_ranks.py.)"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from rlhf_lightning.checkpoints import CheckpointError, consolidate, read_checkpoint, read_dcp_metadata
from rlhf_lightning.cli import main
from rlhf_lightning.models import build_model
from rlhf_lightning.modules.sft import SFTModule
from rlhf_lightning.options import ConfigError
from rlhf_lightning.policy import load_policy
from rlhf_lightning.sharding import ShardingPolicy, blocks_of, shard_model
from test_fsdp_ranks import free_port

MODEL = {"type": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 24}


def write_folder(folder: Path, extra: dict | None = None) -> SFTModule:
    """A distributed checkpoint folder as a sharded run writes it (DCP's files and Lightning's meta.pt), written by
    this one process; returns the module whose state it holds."""
    from torch.distributed.checkpoint import save

    torch.manual_seed(0)
    module = SFTModule(model=MODEL)
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": {}, "sharded": {"world_size": 2}}
    module.on_save_checkpoint(checkpoint)
    state = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}, **(extra or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save(state, checkpoint_id=folder, no_dist=True)
    del checkpoint["state_dict"]
    torch.save(checkpoint, folder / "meta.pt")
    return module


class CreatesAFile:
    """What a crafted pickle holds: unpickling it calls open(path, "w")."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def run_main(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    return code, err.getvalue()


def test_a_distributed_folder_is_consolidated_into_the_usual_checkpoint(tmp_path):
    folder = tmp_path / "last.ckpt"
    module = write_folder(folder, extra={"optimizer_0": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]}})
    checkpoint = consolidate(folder)
    assert checkpoint["rlhf"]["stage"] == "sft" and checkpoint["sharded"] == {"world_size": 2}
    want = module.model.state_dict()
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in want}
    for k, v in want.items():
        assert torch.equal(checkpoint["state_dict"][f"model.{k}"], v)  # read back: exact
    model, _, meta = load_policy(str(folder))  # what rlhf eval and a next stage's policy_ckpt do
    assert meta["stage"] == "sft" and all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    code, err = run_main(["export", "--ckpt", str(folder), "--out", str(tmp_path / "export")])
    assert code == 0, err
    exported, _, _ = load_policy(str(tmp_path / "export"))
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in want.items())


def test_crafted_dcp_metadata_is_refused_with_one_line_and_runs_nothing(tmp_path):
    folder = tmp_path / "last.ckpt"
    write_folder(folder)
    assert read_dcp_metadata(folder).state_dict_metadata  # the genuine file reads
    target = tmp_path / "created_by_unpickling"
    (folder / ".metadata").write_bytes(pickle.dumps(CreatesAFile(target)))
    for argv in (["export", "--ckpt", str(folder), "--out", str(tmp_path / "out")], ["eval", "--ckpt", str(folder), "--limit", "2"]):
        code, err = run_main(argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "refusing" in err and ".metadata" in err and "not one of torch DCP's metadata classes" in err
    with pytest.raises(CheckpointError, match="ckpt_path: refusing"):  # what checking a run to resume reads
        read_checkpoint(folder, ("sft",), "ckpt_path", weights=False)
    assert not target.exists() and not (tmp_path / "out").exists()


def test_a_crafted_non_tensor_item_is_refused_and_runs_nothing(tmp_path):
    # DCP's own planner loads non-tensor items (optimizer settings) with weights_only=False
    folder = tmp_path / "last.ckpt"
    target = tmp_path / "created_by_unpickling"
    write_folder(folder, extra={"optimizer_0": {"param_groups": [{"lr": CreatesAFile(target)}]}})
    with pytest.raises(CheckpointError, match="refusing 'optimizer_0.param_groups.0.lr'"):
        read_checkpoint(folder, ("sft",), "ckpt_path", weights=False)
    code, err = run_main(["export", "--ckpt", str(folder), "--out", str(tmp_path / "out")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and not target.exists()


def test_blocks_of_finds_the_transformer_blocks_and_a_bigram_is_refused():
    gpt = build_model({**MODEL, "vocab_size": 21})
    assert blocks_of(gpt) == list(gpt.blocks)
    bigram = build_model({"type": "bigram", "vocab_size": 21})
    assert blocks_of(bigram) == []
    with pytest.raises(ConfigError, match=r"^trainer.strategy: model \(BigramLM\) has no transformer block to shard"):
        shard_model(bigram, mesh=None)


def test_a_small_frozen_model_stays_whole():
    gpt = build_model({**MODEL, "vocab_size": 21})
    assert not shard_model(gpt, mesh=None, policy=ShardingPolicy(replicate_frozen_below=10**9), frozen=True)
    assert type(gpt).__name__ == "GPT"


@pytest.mark.parametrize("option, value, message", [
    ("param_dtype", "fp8", r"trainer.strategy.init_args.param_dtype: unknown dtype 'fp8'"),
    ("replicate_frozen_below", -1, r"trainer.strategy.init_args.replicate_frozen_below: must be an integer >= 0"),
])
def test_bad_sharding_options_are_refused(option, value, message):
    with pytest.raises(ConfigError, match=message):
        ShardingPolicy(**{option: value})


def test_mixed_precision_policy_computes_in_bf16_and_reduces_in_float32():
    policy = ShardingPolicy(param_dtype="bfloat16").mp_policy()
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert ShardingPolicy().mp_policy().param_dtype is None


@pytest.mark.parametrize("options, message", [
    ({"tensor_parallel_size": 2}, "trainer.strategy.init_args.tensor_parallel_size: only 1 is implemented"),
    ({"data_parallel_size": 0}, "trainer.strategy.init_args.data_parallel_size: 'auto' or an integer >= 1"),
    ({"param_dtype": "fp8"}, "trainer.strategy.init_args.param_dtype: unknown dtype 'fp8'"),
])
def test_bad_sharded_strategy_options_are_refused_with_one_line(options, message):
    from rlhf_lightning.strategy import ShardedStrategy

    with pytest.raises(ConfigError) as err:
        ShardedStrategy(**options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cpu_offload_on_the_cpu_is_refused_with_one_line(monkeypatch):
    """FSDP2's CPU offload pins host memory for a GPU; on a CPU run torch fails with an unrelated message."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = build_model(MODEL)
        with pytest.raises(ConfigError) as err:
            shard_model(model, init_device_mesh("cpu", (1,)), ShardingPolicy(cpu_offload=True))
        assert str(err.value).startswith("trainer.strategy.init_args.cpu_offload: true keeps a GPU's shards")
        assert "\n" not in str(err.value) and not any(type(p).__name__ == "DTensor" for p in model.parameters())
    finally:
        dist.destroy_process_group()
