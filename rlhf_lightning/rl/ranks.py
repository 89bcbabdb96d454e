"""A rollout's rows gathered from every rank when the ranks hold different numbers of them: dynamic sampling keeps
each rank's informative groups, so its global statistics (advantages, the KL controller's mean, GAE's whitening) are
taken over uneven parts."""

from __future__ import annotations

import torch

from rlhf_lightning.distributed import gather_rows, rank, world_size

__all__ = ["gather_uneven_rows"]


def gather_uneven_rows(t: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """(every rank's rows of `t` concatenated, rank 0 first; this rank's slice of them), whatever each rank's number
    of rows: padded to the most for the all-gather, cut back after. `t` itself and all of it in one process."""
    if world_size() == 1:
        return t, slice(0, t.size(0))
    sizes = gather_rows(torch.tensor([t.size(0)], device=t.device)).tolist()  # (W,)
    most = max(sizes)
    padded = torch.cat([t, t.new_zeros(most - t.size(0), *t.shape[1:])])  # (most, ...)
    parts = gather_rows(padded).split(most)  # W x (most, ...)
    start = sum(sizes[: rank()])
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), slice(start, start + t.size(0))
