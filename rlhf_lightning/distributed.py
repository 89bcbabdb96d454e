"""Cross-rank helpers over `torch.distributed`, the identity in one process: every stage's global statistics
(PPO's advantages and loss counts, DPO's pair and token shares) go through these.

>>> world_size(), rank(), float(sum_over_ranks(torch.tensor(3.0)))
(1, 0, 3.0)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_rows", "gather_uneven_rows", "max_over_ranks", "min_over_ranks", "own_entry", "per_rank", "rank", "sum_over_ranks", "world_size"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def per_rank(value: object) -> list[object]:
    """Every rank's `value` (any picklable object), rank 0 first: what a checkpoint keeps of per-rank state (random
    generators), so each rank resumes its own. A collective; `[value]` in one process."""
    if world_size() == 1:
        return [value]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def own_entry(values: list[object] | None) -> object | None:
    """This rank's entry of a `per_rank` list written by as many ranks; None when there is none (a checkpoint from
    another number of processes, or from before per-rank state was kept)."""
    return values[rank()] if isinstance(values, list) and len(values) == world_size() else None


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated (rank 0 first); equal row counts per rank. Identity in one process."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_uneven_rows(t: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """(every rank's rows of `t` concatenated, rank 0 first; this rank's slice of them), whatever each rank's number
    of rows (dynamic sampling keeps each rank's informative groups): padded to the most for the all-gather, cut back
    after. `t` itself and all of it in one process."""
    if world_size() == 1:
        return t, slice(0, t.size(0))
    sizes = gather_rows(torch.tensor([t.size(0)], device=t.device)).tolist()  # (W,)
    most = max(sizes)
    padded = torch.cat([t, t.new_zeros(most - t.size(0), *t.shape[1:])])  # (most, ...)
    parts = gather_rows(padded).split(most)  # W x (most, ...)
    start = sum(sizes[: rank()])
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), slice(start, start + t.size(0))


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.SUM) if world_size() > 1 else t


def max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MAX) if world_size() > 1 else t


def min_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MIN) if world_size() > 1 else t


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=op)
    return t
