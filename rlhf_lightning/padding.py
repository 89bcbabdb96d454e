"""Padding to tensors. Masks come from lengths, never from `ids != pad` (pad may equal EOS)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5], [6, 7]] -> ids [[pad, 5], [6, 7]], mask [[0, 1], [1, 1]]: the layout generation expects.

    >>> left_pad([[5], [6, 7]], 0)
    (tensor([[0, 5],
            [6, 7]]), tensor([[False,  True],
            [ True,  True]]))
    """
    return _pad(seqs, pad_id, left=True)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5], [6, 7]] -> ids [[5, pad], [6, 7]], mask [[1, 0], [1, 1]].

    >>> right_pad([[5], [6, 7]], 0)
    (tensor([[5, 0],
            [6, 7]]), tensor([[ True, False],
            [ True,  True]]))
    """
    return _pad(seqs, pad_id, left=False)


def pad_columns(t: torch.Tensor, width: int, value, left: bool = False) -> torch.Tensor:
    """A (B, T) tensor widened to (B, width) with `value` on the right (or the left).

    >>> pad_columns(torch.tensor([[5, 6]]), 3, 0), pad_columns(torch.tensor([[5, 6]]), 3, 0, left=True)
    (tensor([[5, 6, 0]]), tensor([[0, 5, 6]]))
    """
    fill = t.new_full((t.size(0), width - t.size(1)), value)
    return torch.cat([fill, t] if left else [t, fill], 1)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), bool mask (B, T)) with the padding on the left or the right, in one copy from Python lists."""
    width = max(len(s) for s in seqs)
    fill = [[pad_id] * (width - len(s)) for s in seqs]
    rows = [f + list(s) for f, s in zip(fill, seqs)] if left else [list(s) + f for f, s in zip(fill, seqs)]
    real = torch.arange(width) < torch.tensor([len(s) for s in seqs])[:, None]  # (B, T) as if right-padded
    return torch.tensor(rows, dtype=torch.long), real.flip(1) if left else real
