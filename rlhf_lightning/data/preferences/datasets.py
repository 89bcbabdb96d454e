"""Tokenized preference data: training pairs (chosen and rejected in one batch) and held-out groups (every
completion scored once, the pairs compared by row index)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.preferences.records import PreferencePair, SampleGroup
from rlhf_lightning.scoring import encode_scored_row, pad_scored
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["PairDataset", "SampleGroupDataset"]


def _encode(tokenizer: Tokenizer, prompt: str, completion: str, ended: bool, where: str, field_name: str, max_len: int) -> tuple[list[int], int]:
    """(ids, prompt length): where the completion starts, for reward models that score its likelihood."""
    ids, prompt_len = encode_scored_row(tokenizer, prompt, completion, ended, where, field_name)
    if len(ids) > max_len:
        raise DataError(f"prompt + completion is {len(ids)} tokens, the model's context is {max_len}", path=where, field=field_name)
    return ids, prompt_len


class PairDataset(Dataset):
    """Training pairs; a batch stacks all chosen then all rejected sequences for one forward."""

    def __init__(self, tokenizer: Tokenizer, pairs: list[PreferencePair], max_len: int) -> None:
        self.pad_id = tokenizer.pad_id
        self.examples = [
            (
                _encode(tokenizer, p.prompt, p.chosen, p.chosen_ended, p.where, "chosen", max_len),
                _encode(tokenizer, p.prompt, p.rejected, p.rejected_ended, p.where, "rejected", max_len),
                0.0 if p.margin is None else p.margin,
            )
            for p in pairs
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], float]:
        return self.examples[i]

    def collate(self, items: list[tuple[tuple[list[int], int], tuple[list[int], int], float]]) -> dict:
        seqs = [c for c, _, _ in items] + [r for _, r, _ in items]  # one width for both halves
        return {
            **pad_scored(seqs, self.pad_id),  # (2B, T): rows [0, B) chosen, [B, 2B) rejected
            "margin": torch.tensor([m for _, _, m in items], dtype=torch.float32),  # (B,)
        }


class SampleGroupDataset(Dataset):
    """Held-out groups: a batch scores every completion once, then compares the pairs by index."""

    def __init__(self, tokenizer: Tokenizer, groups: list[SampleGroup], max_len: int) -> None:
        self.pad_id = tokenizer.pad_id
        self.groups = groups
        self.ids = [
            [_encode(tokenizer, g.prompt, c, e, g.where, "completion", max_len) for c, e in zip(g.completions, g.ended)]
            for g in groups
        ]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> tuple[list[list[int]], SampleGroup]:
        return self.ids[i], self.groups[i]

    def collate(self, items: list[tuple[list[list[int]], SampleGroup]]) -> dict:
        seqs, labels, pairs, offset = [], [], [], 0
        for ids, g in items:
            seqs += ids
            labels += g.labels
            pairs += [(offset + i, offset + j) for i, j in g.pairs]
            offset += len(ids)
        return {
            **pad_scored(seqs, self.pad_id),  # (N, T) every sampled completion of the batch's prompts
            "labels": torch.tensor(labels, dtype=torch.float32),  # (N,) task judge 0/1, NaN if unknown
            "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),  # (M, 2) chosen, rejected rows
            "prompts": [g.prompt for _, g in items for _ in g.completions],
            "completions": [c for _, g in items for c in g.completions],
        }
