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
    width = max(len(s) for s in seqs)
    lengths = torch.tensor([len(s) for s in seqs])  # (B,)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)  # one copy from Python
    return ids, torch.arange(width) >= (width - lengths)[:, None]  # (B, T), (B, T)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[[5], [6, 7]] -> ids [[5, pad], [6, 7]], mask [[1, 0], [1, 1]].

    >>> right_pad([[5], [6, 7]], 0)
    (tensor([[5, 0],
            [6, 7]]), tensor([[ True, False],
            [ True,  True]]))
    """
    width = max(len(s) for s in seqs)
    lengths = torch.tensor([len(s) for s in seqs])  # (B,)
    ids = torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.long)  # one copy from Python
    return ids, torch.arange(width) < lengths[:, None]  # (B, T), (B, T)
