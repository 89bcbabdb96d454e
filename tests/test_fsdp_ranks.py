"""Two processes (gloo, CPU) with FSDP2: an SFT step through Lightning's Trainer and `strategy.ShardedStrategy` equals
one unsharded process on the whole batch, and a sharded decode runs in lockstep with the tokens of one process."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_lightning.data.sft import collate_examples, encode_demonstration
from rlhf_lightning.generation import generate
from rlhf_lightning.modules.sft import SFTModule
from tolerance import EPS32, FORWARD_ATOL, grad_atol

pytestmark = pytest.mark.sharded  # two processes: `python -m pytest -m sharded` (the default run skips them)

WORLD = 2
MODEL = {"type": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 24}
CLIP = 0.05  # far below the step's gradient norm: the clipping is active, over DTensor gradients when sharded
LR = 0.1
# 8 demonstrations of uneven lengths: rank 0 gets the first 4 (more completion tokens), rank 1 the last 4
DEMOS = [("Q: 12+7=\nA:", "19"), ("Q: 99+99=\nA:", "198"), ("Q: 50-25=\nA:", "25"), ("Q: 31+68=\nA:", "99"),
         ("Q: 3+4=\nA:", "7"), ("Q: 8-8=\nA:", "0"), ("Q: 9+1=\nA:", "10"), ("Q: 2-1=\nA:", "1")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SGDStep(SFTModule):
    """SFT with plain SGD: one step's weights compare within a bound (Adam's first step is lr * sign(g))."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=LR)

    def on_before_optimizer_step(self, optimizer) -> None:  # the ranks' averaged gradient, before clipping
        self.seen_grad = flat([p.grad for p in self.model.parameters()])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.seen_weights = flat([p.detach() for p in self.model.parameters()])


def flat(tensors) -> torch.Tensor:
    """The full tensors, flattened into one (a sharded DTensor is gathered: a collective)."""
    return torch.cat([(t.full_tensor() if hasattr(t, "full_tensor") else t).flatten() for t in tensors])


def sft_batch(module: SFTModule, rows: slice) -> dict:
    tok = module.tokenizer
    return collate_examples([encode_demonstration(tok, (p, c, "test"), 24) for p, c in DEMOS[rows]], tok.pad_id)


def make_module() -> SGDStep:
    torch.manual_seed(0)
    return SGDStep(model=MODEL)


def single_process_step() -> tuple[torch.Tensor, torch.Tensor]:
    module = make_module()
    loss = module.training_step(sft_batch(module, slice(None)), 0)
    loss.backward()
    grad = flat([p.grad for p in module.model.parameters()])
    torch.nn.utils.clip_grad_norm_(module.model.parameters(), CLIP)
    torch.optim.SGD(module.model.parameters(), lr=LR).step()
    return grad, flat([p.detach() for p in module.model.parameters()])


def _sft_worker(rank: int, port: int, out_dir: str) -> None:
    import lightning as L

    from rlhf_lightning.strategy import ShardedStrategy

    # a process per rank started here: Lightning's environment variables say so, and it launches nothing itself
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    module = make_module()
    batches = [sft_batch(module, slice(4 * rank, 4 * rank + 4))]
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=ShardedStrategy(timeout=timedelta(seconds=120)), max_steps=1,
        gradient_clip_val=CLIP, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    sharded = type(module.model.wte.weight).__name__ == "DTensor"
    torch.save({"grad": module.seen_grad, "weights": module.seen_weights, "sharded": sharded,
                "rows": (module.model.wte.weight.to_local().shape[0], module.model.wte.weight.shape[0]) if sharded else None}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_sharded_sft_step_equals_one_process_step(tmp_path):
    grad, weights = single_process_step()
    mp.spawn(_sft_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        local, full = got["rows"]
        assert got["sharded"] and local <= -(-full // WORLD) < full  # a shard of the (vocab, C) embedding
        # the ranks' token sums over 4 rows each, averaged by FSDP2's reduce-scatter, against one pass over 8 rows
        # (a weight's entry sums a term from every position of every row: at most 24 positions, the context)
        tol = grad_atol(grad, terms=8 * 24 * WORLD)
        torch.testing.assert_close(got["grad"], grad, atol=tol, rtol=0)
        # one clipped SGD step: the gradient's bound times lr (the clip factor is <= 1), plus a weight's rounding
        torch.testing.assert_close(got["weights"], weights, atol=LR * tol + EPS32 * float(weights.abs().max()), rtol=0)


# ------------------------------------------------------------------ lockstep decode

EOS, PAD, V = 1, 0, 12
FAR = 10  # from this position on the model's greedy token is EOS


def eos_from_position(far: int = FAR) -> torch.nn.Module:
    """A GPT whose greedy next token is EOS exactly at positions >= `far` (and 5 before): its blocks add nothing,
    so the final norm sees token + position embeddings, whose first coordinate the position's sign dominates."""
    from rlhf_lightning.models import build_model

    torch.manual_seed(0)
    model = build_model({"type": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 32, "vocab_size": V})
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp[2].weight.zero_()
        model.wpe.weight[:, 0] = torch.where(torch.arange(32) >= far, 3.0, -3.0)
        model.lm_head.weight.mul_(0.1)
        model.lm_head.weight[EOS, 0], model.lm_head.weight[5, 0] = 10.0, -10.0
    return model


def prompts_of(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: 3 short prompts (EOS after a few tokens); rank 1: one long prompt (EOS at once): its only row
    ends at the first step while rank 0 keeps decoding, and it has fewer passes at batch_size=1."""
    if rank == 0:
        ids = torch.tensor([[PAD, 2, 3, 4], [2, 3, 4, 6], [PAD, PAD, 7, 8]])
    else:
        ids = torch.tensor([[2, 3, 4, 6, 7, 8, 9, 2, 3, 4, 6]])
    return ids, ids != PAD


def decode(model: torch.nn.Module, rank: int, batch_size: int | None, greedy: bool):
    ids, mask = prompts_of(rank)
    g = torch.Generator().manual_seed(7 + rank)
    return generate(model, ids, mask, max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.7, greedy=greedy, generator=g,
                    batch_size=batch_size, samples_per_prompt=1 if greedy else 2)


CASES = {"greedy": (None, True), "sampled": (None, False), "passes": (1, True)}


def _decode_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from rlhf_lightning.sharding import ShardingPolicy, shard_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        out = {}
        for gather in GATHER:
            model = eos_from_position()
            assert shard_model(model, init_device_mesh("cpu", (WORLD,)), ShardingPolicy(gather_for_generation=gather))
            for case, (batch_size, greedy) in CASES.items():
                g = decode(model, rank, batch_size, greedy)
                out[(gather, case)] = {"ids": g.completion_ids, "logprobs": g.logprobs, "lengths": g.lengths}
        torch.save(out, os.path.join(out_dir, f"decode{rank}.pt"))
    finally:
        dist.destroy_process_group()


GATHER = (False, True)  # weights resharded after each forward; kept gathered through the decode


def test_sharded_decode_keeps_the_ranks_in_lockstep_with_one_process_tokens(tmp_path):
    model = eos_from_position()
    want = {rank: {case: decode(model, rank, *CASES[case]) for case in CASES} for rank in range(WORLD)}
    assert int(want[1]["greedy"].lengths.max()) == 1 < int(want[0]["greedy"].lengths.min())  # rank 1 ends first
    mp.spawn(_decode_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"decode{rank}.pt", weights_only=True)
        for gather in GATHER:
            for case in CASES:
                where = (rank, gather, case)
                assert torch.equal(got[(gather, case)]["ids"], want[rank][case].completion_ids), where
                assert torch.equal(got[(gather, case)]["lengths"], want[rank][case].lengths), where
                # the same weights, gathered: another kernel path at most (tolerance.FORWARD_ATOL)
                torch.testing.assert_close(got[(gather, case)]["logprobs"], want[rank][case].logprobs, atol=FORWARD_ATOL, rtol=0)
