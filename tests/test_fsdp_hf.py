"""A Hugging Face model under 2-rank FSDP2 (gloo, CPU) read from its folder on rank 0 only (`load_on_rank0`): rank 1
builds it on the meta device, and after sharding holds rank 0's weights and its rotary `inv_freq` (a non-persistent
buffer no checkpoint holds), so the ranks' SGD step equals one process's."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_fsdp_ranks import CLIP, LR, WORLD, flat, free_port, sft_batch
from test_hf import VOCAB, save_char_tokenizer
from tolerance import EPS32, grad_atol

pytestmark = pytest.mark.sharded  # two processes: `python -m pytest -m sharded` (the default run skips them)

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")


def save_tiny_llama(folder: Path) -> Path:
    """A 2-layer, 32-wide Llama (rotary positions) and the character-level tokenizer."""
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=64, vocab_size=len(VOCAB), bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


def make_module(folder: Path, on_rank0: bool):
    from test_fsdp_ranks import SGDStep

    return SGDStep(model={"type": "hf", "path": str(folder), "load_on_rank0": on_rank0, "static_cache": False})


def _worker(rank: int, port: int, folder: str, out_dir: str) -> None:
    import lightning as L

    from rlhf_lightning.strategy import ShardedStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    module = make_module(Path(folder), on_rank0=True)
    built_on_meta = all(p.is_meta for p in module.model.parameters())
    start = {}

    class Before(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            start["start"] = flat([p.detach() for p in pl_module.model.parameters()])
            start["inv_freq"] = [b.clone() for n, b in pl_module.model.named_buffers() if n.endswith("inv_freq")]

    batches = [sft_batch(module, slice(4 * rank, 4 * rank + 4))]
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=ShardedStrategy(timeout=timedelta(seconds=120)), max_steps=1,
        gradient_clip_val=CLIP, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False, callbacks=[Before()],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    sharded = any(type(p).__name__ == "DTensor" for p in module.model.parameters())
    torch.save({"meta": built_on_meta, "sharded": sharded, **start, "grad": module.seen_grad, "weights": module.seen_weights},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_a_folder_read_on_rank_0_reaches_every_rank_and_steps_as_one_process(tmp_path):
    folder = save_tiny_llama(tmp_path / "llama")
    module = make_module(folder, on_rank0=True)  # one process: nothing on the meta device
    assert not any(p.is_meta for p in module.model.parameters())
    want_start = flat([p.detach() for p in module.model.parameters()])
    want_inv_freq = [b.clone() for n, b in module.model.named_buffers() if n.endswith("inv_freq")]
    assert want_inv_freq
    loss = module.training_step(sft_batch(module, slice(None)), 0)
    loss.backward()
    grad = flat([p.grad for p in module.model.parameters()])
    torch.nn.utils.clip_grad_norm_(module.model.parameters(), CLIP)
    torch.optim.SGD(module.model.parameters(), lr=LR).step()
    weights = flat([p.detach() for p in module.model.parameters()])

    mp.spawn(_worker, args=(free_port(), str(folder), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["meta"] == (rank > 0) and got["sharded"]
        assert torch.equal(got["start"], want_start)  # broadcast and kept as shards: exact
        assert len(got["inv_freq"]) == len(want_inv_freq) and all(torch.equal(a, b) for a, b in zip(got["inv_freq"], want_inv_freq))
        # the ranks' token sums over 4 rows each, averaged by FSDP2's reduce-scatter, against one pass over 8 rows
        tol = grad_atol(grad, terms=8 * 24 * WORLD)  # every position (at most the 24 of the context) of every row
        torch.testing.assert_close(got["grad"], grad, atol=tol, rtol=0)
        torch.testing.assert_close(got["weights"], weights, atol=LR * tol + EPS32 * float(weights.abs().max()), rtol=0)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_load_on_rank0_without_the_sharded_strategy_is_refused_with_one_line(rank, tmp_path, monkeypatch):
    from conftest import CONFIGS, QUIET
    from test_fsdp import run_main

    folder = save_tiny_llama(tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    # rank 0 (its weights read) refuses before it starts any other process; rank 1 (built on the meta device) alike
    monkeypatch.setenv("RANK", rank)
    code, err = run_main([
        "fit", "--config", str(CONFIGS / "hf" / "sft.yaml"), *QUIET, "--trainer.logger=false", "--trainer.max_steps=1",
        f"--model.init_args.model={{type: hf, path: {folder}, load_on_rank0: true, static_cache: false}}",
        "--data.init_args.batch_size=4", "--data.init_args.max_val_prompts=4",
    ])
    lines = [line for line in err.splitlines() if line.startswith("rlhf: error:")]
    # an option's error is printed by rank 0 alone (every rank refuses alike)
    assert code == 2 and len(lines) == (1 if rank == "0" else 0), err[-2000:]
    assert rank != "0" or "model.init_args.model.load_on_rank0: true needs the sharded strategy" in lines[0]
    assert not (tmp_path / "checkpoints").exists()
