"""Per-rank memory of parameters + gradients + optimizer state, and step time: one process unsharded against two
processes sharded with FSDP2 (CPU, gloo).

    python benchmarks/sharded.py [--size 85m|tiny] [--rows 8] [--steps 3] [--warmup 1] [--threads 2]

The workload is one training step of the policy, as a sharded stage takes it: a next-token NLL over `--rows` rows
of 24 tokens (the global batch: 8 rows in one process, 4 on each of two ranks), backward, gradient clipping to norm
1.0, and the stages' AdamW (`optim.adamw`, the foreach implementation `adamw_warmup_cosine` uses). The sharded arm
shards the model as `StageModule.configure_model` does (`sharding.shard_model`: each transformer block, then the
root) over a 2-rank gloo mesh. "85m" has GPT-2's shape (12 layers, 768 wide, 12 heads; 85.1M parameters with the
character tokenizer), "tiny" the toy config's (2 layers, 64 wide) for a quick look.

Bytes are counted from the tensors each rank holds after a real optimizer step, before the gradients are zeroed
(so AdamW's moments exist and every gradient is still held: the persistent peak): a sharded parameter, its gradient
and its moments count their local shard (`DTensor.to_local()`), a plain tensor its whole storage. The weights FSDP2
gathers for a block's forward and backward are freed after it (`reshard_after_forward`) and are not counted, nor are
activations. `per_rank_bytes` is the largest rank's total; the sharded line's `ratio` divides it by the single
process's (target: <= 0.55 at 2 ranks). `step_s` is the median wall time of a step over `--steps` steps after
`--warmup`; each arm runs the same total threads (`--threads`: 2 in one process, 1 per rank in two).

Prints one JSON line per arm: {"benchmark": "sharded", "arm": "single"|"sharded", "size", "ranks", "params",
"rows_per_rank", "threads_per_rank", "per_rank_bytes", "param_bytes", "grad_bytes", "optimizer_bytes", "step_s",
... (the sharded line also "ratio" and "target")}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

SIZES = {
    "tiny": {"type": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 24},
    "85m": {"type": "gpt", "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 24},
}
TOKENS = 24  # a row's length: the toy task's context
TARGET = 0.55


def local_bytes(t: torch.Tensor | None) -> int:
    """Bytes this rank holds of `t`: a DTensor's local shard, a plain tensor whole."""
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    moments = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    out = {
        "param_bytes": sum(local_bytes(p) for p in params),
        "grad_bytes": sum(local_bytes(p.grad) for p in params),
        "optimizer_bytes": sum(local_bytes(v) for v in moments),
    }
    return {**out, "per_rank_bytes": sum(out.values())}


def _worker(rank: int, world: int, size: str, rows: int, steps: int, warmup: int, threads: int, out_dir: str) -> None:
    import torch.distributed as dist

    from rlhf_lightning.optim import adamw
    from rlhf_lightning.policy import build_policy
    from rlhf_lightning.scoring import token_logprobs

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    try:
        torch.manual_seed(0)
        model, tokenizer, _ = build_policy(SIZES[size], None)
        params = sum(p.numel() for p in model.parameters())
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            from rlhf_lightning.sharding import shard_model

            shard_model(model, init_device_mesh("cpu", (world,)))
        optimizer = adamw(model, lr=1e-4, weight_decay=0.1, fused=False)  # after sharding: over the shards
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(3, tokenizer.vocab_size, (rows // world, TOKENS), generator=g)  # this rank's rows

        def step() -> float:
            start = time.perf_counter()
            loss = -token_logprobs(model, ids, None)[:, 1:].mean()  # (rows, T - 1) -> ()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # over DTensor gradients when sharded
            optimizer.step()
            seconds = time.perf_counter() - start
            step.held = held_bytes(model, optimizer)  # gradients and moments all held: the persistent peak
            optimizer.zero_grad(set_to_none=True)
            return seconds

        times = [step() for _ in range(warmup + steps)][warmup:]
        result = {**step.held, "params": params, "step_s": statistics.median(times)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_arm(world: int, args: argparse.Namespace) -> dict:
    """Each arm in fresh processes (`world` of them); {figures} with the largest rank's bytes and time."""
    per_rank_threads = max(1, args.threads // world)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, args.size, args.rows, args.steps, args.warmup, per_rank_threads, tmp), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    worst = max(ranks, key=lambda r: r["per_rank_bytes"])
    return {
        "arm": "single" if world == 1 else "sharded", "size": args.size, "ranks": world, "params": ranks[0]["params"],
        "rows_per_rank": args.rows // world, "threads_per_rank": per_rank_threads,
        **{k: worst[k] for k in ("per_rank_bytes", "param_bytes", "grad_bytes", "optimizer_bytes")},
        "per_rank_bytes_each": [r["per_rank_bytes"] for r in ranks],
        "step_s": round(max(r["step_s"] for r in ranks), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="85m")
    parser.add_argument("--rows", type=int, default=8, help="the global batch (rows of 24 tokens), split over the ranks")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="threads in all: per rank, this over the number of ranks")
    args = parser.parse_args()
    if args.rows < 2 or args.rows % 2 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        print("sharded.py: --rows must be even and >= 2, --steps >= 1, --warmup >= 0, --threads >= 1", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the spawned ranks set their own thread counts
    single = run_arm(1, args)
    emit("sharded", single)
    sharded = run_arm(2, args)
    emit("sharded", {**sharded, "ratio": round(sharded["per_rank_bytes"] / single["per_rank_bytes"], 4), "target": TARGET})


if __name__ == "__main__":
    main()
