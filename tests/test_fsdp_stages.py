"""Two processes (gloo, CPU) with FSDP2 for the reward and DPO stages, through Lightning's Trainer and
`strategy.ShardedStrategy`: a reward step and a DPO step equal one unsharded process on the whole batch (gradients,
and weights after one clipped SGD step); a sharded reward run resumes from a single-file checkpoint; a held-out DPO
batch with no pair on one rank keeps the ranks in step; the DPO policy kept by `keep_best` goes back into the shards;
and `rlhf fit` with configs/toy/reward_fsdp.yaml and dpo_fsdp.yaml writes shard folders and a whole final checkpoint
read with no process group. (SFT and the lockstep decode: tests/test_fsdp_ranks.py.)"""

from __future__ import annotations

import json
import os
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rlhf_lightning.data.preferences import PairDataset, PreferencePair
from rlhf_lightning.modules.dpo import DPOModule
from rlhf_lightning.modules.reward import RewardModule
from rlhf_lightning.modules.sft import SFTModule
from conftest import CONFIGS
from test_fsdp_cli import SHORT, rlhf
from test_fsdp_ranks import CLIP, LR, WORLD, flat, free_port
from test_reward import easy_pairs
from tolerance import EPS32, grad_atol

pytestmark = pytest.mark.sharded  # two processes: `python -m pytest -m sharded` (the default run skips them)

GPT = {"type": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 24}
# 8 pairs, rows [0, 4) to rank 0 and [4, 8) to rank 1. Each half holds a 17-token row (the longest), so both ranks
# pad to the whole batch's width; the chosen completions (EOS included) are 4 + 3 + 3 + 3 = 13 tokens on rank 0 and
# 4 + 2 + 2 + 2 = 10 on rank 1: a per-token mean over one rank's tokens, averaged over the ranks, is not the mean
# over all 23, so only a loss normalized by every rank's token count matches one process.
PAIRS = [("Q: 99+99=\nA:", "198", "19"), ("Q: 50-25=\nA:", "25", "2"), ("Q: 31+68=\nA:", "99", "98"),
         ("Q: 12+7=\nA:", "19", "91"), ("Q: 99+98=\nA:", "197", "1"), ("Q: 3+4=\nA:", "7", "8"),
         ("Q: 8-8=\nA:", "0", "00"), ("Q: 2-1=\nA:", "1", "11")]
ROWS = 2 * len(PAIRS)  # chosen and rejected: the rows one process runs in one forward
WIDTH = 17  # tokens of the longest row, which every row pads to (above)


class OneSGDStep:
    """A stage trained with plain SGD (Adam's first step is lr * sign(g): weights after it never compare within a
    bound), recording the ranks' averaged gradient before clipping and the weights after the step, gathered whole."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=LR)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.seen_grad = flat([p.grad for p in self.model.parameters()])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.seen_weights = flat([p.detach() for p in self.model.parameters()])


class RewardStep(OneSGDStep, RewardModule):
    pass


class DPOStep(OneSGDStep, DPOModule):
    pass


def pair_batch(module, rows: slice) -> dict:
    data = PairDataset(module.tokenizer, [PreferencePair(p, c, r) for p, c, r in PAIRS[rows]], 24)
    return data.collate([data[i] for i in range(len(data))])


def make_reward() -> RewardStep:
    torch.manual_seed(0)
    return RewardStep(model={**GPT, "lm_feature": True}, chosen_nll=1.0)  # the toy recipe's loss: BT + chosen NLL


def write_sft_checkpoint(path: Path) -> Path:
    """A tiny SFT checkpoint as `FinalCheckpoint` writes one (seeded weights, the stage's metadata)."""
    torch.manual_seed(0)
    module = SFTModule(model=GPT)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def make_dpo(sft_ckpt: str) -> DPOStep:
    """DPO with the toy recipe's loss (sigmoid and RPO's per-token NLL), the reference's forward in each step, and
    the policy moved off the reference (seeded), so margins are not 0 and the loss reads the reference's values."""
    module = DPOStep(policy_ckpt=sft_ckpt, loss={"beta": 0.5, "nll_alpha": 1.0}, eval={"max_val_prompts": 4})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def single_process_step(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient, weights after one clipped SGD step) of `training_step` on all 8 pairs in one process."""
    batch = pair_batch(module, slice(None))
    assert batch["input_ids"].shape == (ROWS, WIDTH)
    module.training_step(batch, 0).backward()
    params = list(module.model.parameters())
    grad = flat([p.grad for p in params])
    assert float(grad.norm()) > CLIP  # the clipping is active (over DTensor gradients when sharded)
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    torch.optim.SGD(params, lr=LR).step()
    return grad, flat([p.detach() for p in params])


def sharded_fit(module, rank: int, max_steps: int = 1, ckpt_path: str | None = None, **strategy) -> None:
    """Steps of `module` on this rank's 4 pairs (one batch an epoch) under the sharded strategy (the process group is
    Lightning's), to `max_steps`; resumed from `ckpt_path` if given."""
    import lightning as L

    from rlhf_lightning.strategy import ShardedStrategy

    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=ShardedStrategy(timeout=timedelta(seconds=120), **strategy), max_steps=max_steps,
        gradient_clip_val=CLIP, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
    )
    batches = [pair_batch(module, slice(4 * rank, 4 * rank + 4))]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)


class RestoredOnResume(RewardModule):
    """The reward stage with its own AdamW, recording its weights, `lm_scale` and their moments once a checkpoint is
    restored."""

    def on_train_start(self) -> None:
        state = self.trainer.optimizers[0].state
        scale = self.model.lm_scale
        self.restored = {
            "weights": flat([p.detach() for p in self.model.parameters()]),
            "exp_avg": flat([state[p]["exp_avg"] for p in self.model.parameters()]),
            "scale_type": type(scale).__name__, "scale_moments": {k: tuple(v.shape) for k, v in state[scale].items()},
        }


def shard_rows(weight) -> tuple[int, int] | None:
    """(rows this rank holds, rows of the whole tensor) of a sharded weight; None when it is not sharded."""
    return (weight.to_local().shape[0], weight.shape[0]) if type(weight).__name__ == "DTensor" else None


def _worker(rank: int, port: int, sft_ckpt: str, out_dir: str) -> None:
    # a process per rank started here: Lightning's environment variables say so, and it launches nothing itself
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    out = {}
    reward = make_reward()
    sharded_fit(reward, rank)
    out["reward"] = {"grad": reward.seen_grad, "weights": reward.seen_weights, "embedding": shard_rows(reward.model.backbone.wte.weight),
                     "lm_scale": (type(reward.model.lm_scale).__name__, tuple(reward.model.lm_scale.shape))}
    out["reward_whole"] = os.path.join(out_dir, "reward_whole.ckpt")

    # a sharded run resumed from one file (`save_distributed_checkpoint: false`): the weights and AdamW moments go
    # back into the shards, `lm_scale` (0-dim, whole on every rank) with them, and the next AdamW step runs on them
    whole = os.path.join(out_dir, "reward_whole.ckpt")
    torch.manual_seed(0)
    first = RewardModule(model={**GPT, "lm_feature": True}, chosen_nll=1.0)
    sharded_fit(first, rank, save_distributed_checkpoint=False)
    first.trainer.save_checkpoint(whole)
    torch.manual_seed(1)  # other weights: all of them must come from the file
    resumed = RestoredOnResume(model={**GPT, "lm_feature": True}, chosen_nll=1.0)
    sharded_fit(resumed, rank, max_steps=2, ckpt_path=whole, save_distributed_checkpoint=False)
    out["reward_resumed"] = {**resumed.restored, "steps": resumed.trainer.global_step}

    dpo = make_dpo(sft_ckpt)
    sharded_fit(dpo, rank)  # evaluates 4 `val` prompts greedily before the step: a lockstep decode
    params = list(dpo.model.parameters())
    out["dpo"] = {"grad": dpo.seen_grad, "weights": dpo.seen_weights, "embedding": shard_rows(dpo.model.wte.weight),
                  "reference": shard_rows(dpo.reference.wte.weight)}
    # a held-out batch with no pair on rank 1 (every group's completions tied): its forwards still run, in step with
    # rank 0's (a rank that skipped them would leave rank 0 waiting in an all-gather)
    batch = pair_batch(dpo, slice(4 * rank, 4 * rank + 4))
    batch["pairs"] = torch.tensor([[i, i + 4] for i in range(4)]) if rank == 0 else torch.zeros(0, 2, dtype=torch.long)
    dpo.validation_step(batch, 0)
    out["val_updated"] = dpo.val_pair_accuracy.update_called
    # keep_best's copy (`StageModule.trainable_state`): gathered whole, put back into the shards after the weights moved on
    kept = dpo.trainable_state()
    with torch.no_grad():
        for p in params:
            p.to_local().add_(1.0)
    dpo.load_trainable_state(kept)
    out["kept"] = {"shapes": {k: tuple(v.shape) for k, v in kept.items()}, "restored": flat([p.detach() for p in params])}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def single_and_ranks(tmp_path_factory) -> tuple[dict, list[dict], DPOModule]:
    """({stage: (gradient, weights)} of one process on the 8 pairs, [each rank's results], the unsharded DPO module)."""
    folder = tmp_path_factory.mktemp("fsdp_stages")
    sft_ckpt = str(write_sft_checkpoint(folder / "sft.ckpt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training steps called by hand: `self.log` with no Trainer
        single = {"reward": single_process_step(make_reward())}
        dpo = make_dpo(sft_ckpt)
        single["dpo"] = single_process_step(dpo)
    mp.spawn(_worker, args=(free_port(), sft_ckpt, str(folder)), nprocs=WORLD, join=True)
    return single, [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)], dpo


def assert_same_step(got: dict, want: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
    grad, weights = want
    # a weight's gradient entry sums a contribution from every position of each of the 16 rows; two ranks' sums over 8
    # rows each, averaged by FSDP2's reduce-scatter, against one pass over the 16: the reordered-sum bound
    # (tolerance.grad_atol) over every position's term (a bound over the rows alone was exceeded 3x by 16 of 7,666
    # entries in one run: the terms of an entry cancel, so their magnitudes sum past the largest entry)
    tol = grad_atol(grad, terms=ROWS * WIDTH * WORLD)
    torch.testing.assert_close(got["grad"], grad, atol=tol, rtol=0, msg=lambda m: f"{stage}: {m}")
    # one clipped SGD step: the gradient's bound times lr (the clip factor is <= 1 and CLIP far below the norm, so
    # the factor's own rounding moves a weight far less), plus one rounding of a weight
    torch.testing.assert_close(got["weights"], weights, atol=LR * tol + EPS32 * float(weights.abs().max()), rtol=0,
                               msg=lambda m: f"{stage}: {m}")


def test_two_process_sharded_reward_step_equals_one_process_step(single_and_ranks):
    single, ranks, _ = single_and_ranks
    for rank, got in enumerate(ranks):
        local, full = got["reward"]["embedding"]
        assert local <= -(-full // WORLD) < full, rank  # a shard of the backbone's (vocab, C) embedding
        assert got["reward"]["lm_scale"] == ("Parameter", ())  # the likelihood feature's 0-dim scale, whole on each rank
        assert_same_step(got["reward"], single["reward"], "reward")


def test_a_sharded_reward_run_resumes_from_one_file_with_its_scalar_scale(single_and_ranks):
    _, ranks, _ = single_and_ranks
    saved = torch.load(ranks[0]["reward_whole"], weights_only=True)  # written by rank 0, read with no process group
    state = saved["state_dict"]
    moments = saved["optimizer_states"][0]["state"]  # a gathered optimizer state is keyed by module position
    assert state["model.lm_scale"].shape == ()  # the usual scalar
    weights = torch.cat([v.flatten() for v in state.values()])
    exp_avg = torch.cat([moments[i]["exp_avg"].flatten() for i in range(len(state))])
    for got in ranks:
        resumed = got["reward_resumed"]
        assert resumed["scale_type"] == "Parameter" and resumed["scale_moments"] == {"exp_avg": (), "exp_avg_sq": (), "step": ()}
        assert resumed["steps"] == 2  # the next AdamW step ran on the restored state
        # the file's values, broadcast and split into the shards: exact
        assert torch.equal(resumed["weights"], weights) and torch.equal(resumed["exp_avg"], exp_avg)


def test_two_process_sharded_dpo_step_equals_one_process_step_and_the_reference_is_its_own_root(single_and_ranks):
    single, ranks, _ = single_and_ranks
    for rank, got in enumerate(ranks):
        for name in ("embedding", "reference"):  # the policy and the frozen reference are both sharded
            local, full = got["dpo"][name]
            assert local <= -(-full // WORLD) < full, (rank, name)
        assert_same_step(got["dpo"], single["dpo"], "dpo")


def test_the_kept_dpo_policy_is_gathered_whole_and_restored_into_the_shards(single_and_ranks):
    _, ranks, dpo = single_and_ranks
    whole = {k: tuple(v.shape) for k, v in dpo.model.state_dict().items()}
    for got in ranks:
        assert got["kept"]["shapes"] == whole  # every weight, whole (a checkpoint's metadata can hold it)
        # put back exactly: the kept copy is the weights after the step, moved by +1 since
        assert torch.equal(got["kept"]["restored"], got["dpo"]["weights"])


def test_a_held_out_batch_with_no_pair_on_one_rank_keeps_the_ranks_in_step(single_and_ranks):
    _, ranks, _ = single_and_ranks  # both ranks got past the batch (and on to the collectives after it)
    assert ranks[0]["val_updated"] and not ranks[1]["val_updated"]


# ------------------------------------------------------------------ the command line

def pair_files(folder: Path) -> list[str]:
    for split, n in (("train", 32), ("val", 8)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in easy_pairs(split, n)))
    return ["--data.init_args.pairs=JsonlPairs", f"--data.init_args.pairs.train_file={folder / 'train.jsonl'}",
            f"--data.init_args.pairs.val_file={folder / 'val.jsonl'}", "--data.init_args.batch_size=4"]


CLI_SHORT = [a for a in SHORT if "max_val_prompts" not in a and "batch_size" not in a and "stratum_weights" not in a]
TINY = "{type: gpt, n_layer: 1, n_head: 2, n_embd: 16, block_size: 24"


def assert_shard_folder(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]


def test_sharded_reward_from_the_cli_writes_shards_and_a_whole_reward_checkpoint(tmp_path):
    from rlhf_lightning.scoring import load_reward_model

    done = rlhf(["fit", "--config", str(CONFIGS / "toy" / "reward_fsdp.yaml"), *CLI_SHORT, "--trainer.val_check_interval=2",
                 "--model.init_args.sft_ckpt=null", f"--model.init_args.model={TINY}, lm_feature: true}}", *pair_files(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_shard_folder(tmp_path / "checkpoints/toy/reward_fsdp/last.ckpt")
    final = tmp_path / "checkpoints/toy/reward.ckpt"
    whole = torch.load(final, weights_only=True)
    assert whole["global_step"] == 2 and whole["rlhf"]["stage"] == "reward"
    state = whole["state_dict"]
    assert state["model.lm_scale"].shape == ()  # the usual scalar, not the (1,) it was sharded as
    # the gathered AdamW moments, keyed by each parameter's position in the module, have their parameter's shape
    names = list(state)
    moments = whole["optimizer_states"][0]["state"]
    assert len(moments) == len(names) and all(m["exp_avg"].shape == state[names[i]].shape for i, m in moments.items())
    model, _, meta = load_reward_model(str(final))  # this process has no process group
    assert meta["stage"] == "reward" and torch.equal(model.lm_scale, state["model.lm_scale"])


def test_sharded_dpo_from_the_cli_writes_shards_and_a_whole_policy_checkpoint(tmp_path):
    from rlhf_lightning.policy import load_policy

    sft_ckpt = write_sft_checkpoint(tmp_path / "sft.ckpt")
    done = rlhf(["fit", "--config", str(CONFIGS / "toy" / "dpo_fsdp.yaml"), *CLI_SHORT, "--trainer.val_check_interval=2",
                 f"--model.init_args.policy_ckpt={sft_ckpt}",
                 "--model.init_args.eval.max_val_prompts=4", *pair_files(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_shard_folder(tmp_path / "checkpoints/toy/dpo_fsdp/last.ckpt")
    final = tmp_path / "checkpoints/toy/dpo.ckpt"
    whole = torch.load(final, weights_only=True)
    meta = whole["rlhf"]
    assert whole["global_step"] == 2 and meta["stage"] == "dpo"
    assert [h["step"] for h in meta["eval_history"]] == [0, 2]  # before the first update and at the end (keep_best)
    assert not any(k.startswith("model.reference.") or k.startswith("reference.") for k in whole["state_dict"])
    # keep_best's copy, gathered whole: the final weights are it (restored if the start was better, the
    # copy of the last step's otherwise)
    kept = meta["best"]["state"]
    assert set(kept) == {k[len("model."):] for k in whole["state_dict"]}
    assert all(torch.equal(kept[k[len("model."):]], v) for k, v in whole["state_dict"].items())
    model, _, _ = load_policy(str(final))  # this process has no process group
    assert all(torch.equal(model.state_dict()[k[len("model."):]], v) for k, v in whole["state_dict"].items())
