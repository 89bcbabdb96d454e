"""Exact mid-epoch resume under several processes: each rank's share of the training order continues where the
checkpoint says (`ResumableDistributedSampler`), and `rlhf fit` with the sharded config, SIGKILLed after a mid-epoch
`last.ckpt` folder and resumed with `--ckpt_path last`, ends with the weights and AdamW state of an uninterrupted run.

The runs compared are the same operations in the same order on the same kernels (one machine, the same two ranks),
so they are compared exactly (tolerance policy 1)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler

from conftest import CONFIGS
from test_resume import kill_after_next_checkpoint
from rlhf_lightning.data.base import ResumableDistributedSampler, ResumableRandomSampler
from rlhf_lightning.data.stratum_weights import StratumWeightedSampler

pytestmark = pytest.mark.sharded  # two processes: `python -m pytest -m sharded` (the default run skips them)

# ---------------------------------------------------------------- the sampler


def shares(order_of, n: int, world: int, epoch: int, seed: int = 0) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(range(n), order_of(), num_replicas=world, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_plain_shuffle_is_torchs_distributed_order_and_resumes_at_a_global_batch():
    n, world, batch = 11, 2, 3  # 11 rows over 2 ranks: one padded row, as DistributedSampler pads
    for epoch in (0, 3):
        got = shares(lambda: ResumableRandomSampler(n), n, world, epoch, seed=5)
        want = []
        for rank in range(world):
            reference = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
            reference.set_epoch(epoch)
            want.append(list(reference))
        assert got == want and len(got[0]) == len(got[1]) == 6
    assert shares(lambda: ResumableRandomSampler(n), n, world, 0, seed=5) != shares(lambda: ResumableRandomSampler(n), n, world, 1, seed=5)

    # resumed at global batch 1 of epoch 3: each rank continues its own share at position 1 * batch
    for rank in range(world):
        sampler = ResumableDistributedSampler(range(n), ResumableRandomSampler(n), num_replicas=world, rank=rank, seed=5)
        sampler.set_epoch(3)
        whole = list(sampler)
        epoch_seed = sampler.epoch_seed
        assert epoch_seed == 8
        resumed = ResumableDistributedSampler(range(n), ResumableRandomSampler(n), num_replicas=world, rank=rank, seed=5)
        resumed.resume(epoch_seed, batch)
        assert list(resumed) == whole[batch:] and len(resumed) == len(whole)  # the epoch's length stays whole
        resumed.set_epoch(4)
        assert list(resumed) == shares(lambda: ResumableRandomSampler(n), n, world, 4, seed=5)[rank]  # then the next epoch


def test_stratum_weighted_order_is_dealt_to_the_ranks_and_resumes():
    weights = torch.tensor([1.0] * 30 + [5.0] * 10)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    ranks = shares(lambda: StratumWeightedSampler(weights), len(weights), 2, epoch=2, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the global RNG, which ranks may not share
    drawn = torch.multinomial(weights, len(weights), replacement=True, generator=torch.Generator().manual_seed(1 + 2))
    assert sorted(ranks[0] + ranks[1]) == sorted(drawn.tolist())  # the epoch's weighted draw, split between the ranks
    assert ranks[0] == drawn.tolist()[0::2] and ranks[1] == drawn.tolist()[1::2]
    resumed = ResumableDistributedSampler(range(40), StratumWeightedSampler(weights), num_replicas=2, rank=1, seed=1)
    resumed.resume(3, 8)
    assert list(resumed) == ranks[1][8:]


# ---------------------------------------------------------------- rlhf fit, sharded, killed and resumed

STEPS, EVERY = 12, 3  # 271 demonstrations, 9 batches of 2 x 16 an epoch: the kill lands mid-epoch, the run crosses an epoch


def tiny_sharded_config(tmp_path: Path, strategy: str | None = None) -> Path:
    """configs/toy/sft_fsdp.yaml (its stratum-weighted draw included) with a tiny model and data, last.ckpt every
    EVERY steps; `strategy` replaces the sharded strategy (e.g. "ddp")."""
    config = yaml.safe_load((CONFIGS / "toy" / "sft_fsdp.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=STEPS, enable_progress_bar=False, logger=False, val_check_interval=1.0)
    if strategy is not None:
        trainer["strategy"] = strategy
    trainer["callbacks"][0]["init_args"]["every_n_train_steps"] = EVERY
    config["model"]["init_args"]["model"].update(n_layer=2, n_head=2, n_embd=32)
    config["data"]["init_args"].update(demo_fraction=0.02, batch_size=16, max_val_prompts=8)
    path = tmp_path / "sft_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, cwd: Path, *args: str) -> subprocess.Popen:
    # its own process group: Lightning starts the second rank as a child, and a kill takes both
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(["rlhf", "fit", "--config", str(config), *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]


def train_order(last: Path) -> dict:
    """The training order a last.ckpt (folder of shards or single file) recorded."""
    meta = torch.load(last / "meta.pt" if last.is_dir() else last, weights_only=True)
    return meta["SFTDataModule"]["train_order"]


def assert_same_final(a: Path, b: Path) -> None:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert (first["global_step"], first["epoch"]) == (second["global_step"], second["epoch"]) and first["global_step"] == STEPS
    assert first["state_dict"].keys() == second["state_dict"].keys()
    different = [k for k, v in first["state_dict"].items() if not torch.equal(v, second["state_dict"][k])]
    assert not different, different[:5]
    moments = [(x, y) for x, y in zip(first["optimizer_states"][0]["state"].values(), second["optimizer_states"][0]["state"].values())]
    assert moments and all(torch.equal(x[k], y[k]) for x, y in moments for k in x)


@pytest.mark.parametrize("strategy", ["sharded", "ddp"])
def test_killed_mid_epoch_and_resumed_ends_equal_to_an_uninterrupted_run(strategy, tmp_path):
    config = tiny_sharded_config(tmp_path, None if strategy == "sharded" else "ddp")
    for name in ("full", "killed"):
        (tmp_path / name).mkdir()
    full = start(config, tmp_path / "full")  # the two runs side by side: one launch's start-up time, not two
    last = tmp_path / "killed" / "checkpoints" / "toy" / "sft_fsdp" / "last.ckpt"
    kill_after_next_checkpoint(start(config, tmp_path / "killed"), last, group=True)
    assert last.is_dir() == (strategy == "sharded")
    order = train_order(last)  # None at an epoch's end: this one was written mid-epoch, the resume continues inside it
    assert order["ranks"] == 2 and order["batches"] > 0
    assert not (tmp_path / "killed" / "checkpoints" / "toy" / "sft.ckpt").exists()
    finish(start(config, tmp_path / "killed", "--ckpt_path=last"))
    finish(full)
    final = Path("checkpoints") / "toy" / "sft.ckpt"
    assert_same_final(tmp_path / "killed" / final, tmp_path / "full" / final)


# ---------------------------------------------------------------- each rank's random generators


def _rng_worker(rank: int, init_file: str, out_dir: str) -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    from rlhf_lightning.callbacks import ResumeCheckpoint

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(10 + rank)  # ranks whose generators have parted ways
        torch.rand(3 + rank)
        trainer = SimpleNamespace(world_size=2, logger=None)
        callback = ResumeCheckpoint(dirpath=out_dir)
        checkpoint: dict = {}
        callback.on_save_checkpoint(trainer, None, checkpoint)  # every rank in step, as trainer.save_checkpoint runs
        saved = torch.get_rng_state()
        written = [checkpoint]
        dist.broadcast_object_list(written, src=0)  # the file holds what rank 0 wrote; every rank reads it
        torch.manual_seed(99)
        callback.on_load_checkpoint(trainer, None, written[0])
        torch.save({"restored": torch.equal(torch.get_rng_state(), saved), "draw": torch.rand(4)}, os.path.join(out_dir, f"rng{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_each_rank_resumes_its_own_random_generator(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rng_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rng{rank}.pt", weights_only=True) for rank in range(2)]
    assert got[0]["restored"] and got[1]["restored"]
    assert not torch.equal(got[0]["draw"], got[1]["draw"])  # rank 1 did not take rank 0's generator


# ---------------------------------------------------------------- PPO, sharded, killed and resumed

ROLLOUTS = 4


def test_sharded_ppo_killed_after_a_rollout_and_resumed_ends_equal_to_an_uninterrupted_run(tmp_path):
    """Each rank's prompts, its own sampling generator and the sharded weights and AdamW state continue exactly."""
    import json
    import shutil

    from conftest import run_cli
    from test_fsdp_ppo import SHORT_PPO, TINY_REWARD, TINY_SFT

    base = tmp_path / "base"
    base.mkdir()
    run_cli([str(CONFIGS / "toy" / "sft.yaml") if a == "SFT" else a for a in TINY_SFT], base)
    with open(base / "prefs.jsonl", "w") as f:
        for a in range(8):
            f.write(json.dumps({"prompt": f"Q: {a}+1=\nA:", "chosen": str(a + 1), "rejected": str(a + 2)}) + "\n")
    run_cli([str(CONFIGS / "toy" / "reward.yaml") if a == "REWARD" else a for a in TINY_REWARD], base)
    config = tmp_path / "ppo_fsdp.yaml"  # last.ckpt after every rollout (4 optimizer steps)
    config.write_text((CONFIGS / "toy" / "ppo_fsdp.yaml").read_text().replace("every_n_train_steps: 20 ", "every_n_train_steps: 4 "))
    args = [*SHORT_PPO, f"--trainer.limit_train_batches={ROLLOUTS}", "--model.init_args.eval.keep_best=false",
            "--model.init_args.rollout.temperature=1.5"]  # sampled answers differ: a rank given another generator would show
    for name in ("full", "killed"):
        shutil.copytree(base / "checkpoints", tmp_path / name / "checkpoints")

    def ppo(cwd: Path, *extra: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(["rlhf", "fit", "--config", str(config), *args, *extra], cwd=cwd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    full = ppo(tmp_path / "full")
    last = tmp_path / "killed" / "checkpoints" / "toy" / "ppo_fsdp" / "last.ckpt"
    kill_after_next_checkpoint(ppo(tmp_path / "killed"), last, group=True)
    meta = torch.load(last / "meta.pt", weights_only=True)
    assert 0 < meta["rlhf"]["rollouts"] < ROLLOUTS and len(meta["rlhf"]["sampling_generators"]) == 2
    finish(ppo(tmp_path / "killed", "--ckpt_path=last"))
    finish(full)
    final = Path("checkpoints") / "toy" / "ppo.ckpt"
    first, second = torch.load(tmp_path / "full" / final, weights_only=True), torch.load(tmp_path / "killed" / final, weights_only=True)
    assert first["rlhf"]["rollouts"] == second["rlhf"]["rollouts"] == ROLLOUTS
    different = [k for k, v in first["state_dict"].items() if not torch.equal(v, second["state_dict"][k])]
    assert not different, different[:5]
    assert [h["eval/accuracy"] for h in first["rlhf"]["eval_history"]] == [h["eval/accuracy"] for h in second["rlhf"]["eval_history"]]
