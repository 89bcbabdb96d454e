"""Prompts with optional gold answers, from the toy task's splits or a JSONL file, and their batches.

Shared by every stage: SFT's and PPO's held-out evaluation, PPO's rollout prompts and `rlhf eval`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from rlhf_lightning.padding import left_pad
from rlhf_lightning.data.jsonl import DataError, read_jsonl
from rlhf_lightning.tasks.arithmetic import gold_answer, task_problems
from rlhf_lightning.tasks.strata import prompt_strata
from rlhf_lightning.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    gold: str | None  # the answer the judge compares with, when known
    where: str  # "file:line" or "task:split", for error messages
    strata: tuple[str, ...] = ()  # one stratum per dimension (`tasks.strata`), or the record's `group`


def read_group(path: str, line: int, record: dict) -> str | None:
    """A record's optional `group` (its stratum): a non-empty string, else a `DataError` naming file, line, field."""
    group = record.get("group")
    if group is not None and not group.strip():
        raise DataError(f"expected a non-empty string, got {group!r}", path=path, line=line, field="group")
    return group


def load_prompts(task: str = "toy", split: str = "val", path: str | None = None, limit: int | None = None) -> list[PromptRecord]:
    """The task's `split` prompts, or the `{"prompt"[, "completion"][, "group"]}` lines of a JSONL file."""
    if path is not None:
        rows = read_jsonl(path, required=["prompt"], optional={"completion": str, "group": str})
        records = [
            PromptRecord(r["prompt"], r.get("completion", gold_answer(r["prompt"])), f"{path}:{n}", prompt_strata(r["prompt"], read_group(path, n, r)))
            for n, r in rows
        ]
    else:
        records = [PromptRecord(p.prompt, p.answer, f"{task}:{split}", prompt_strata(p.prompt)) for p in task_problems(task, split)]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError("no prompts", path=path or f"{task}:{split}")
    return records


def encode_prompts(tokenizer: Tokenizer, records: list[PromptRecord], max_len: int | None = None) -> list[list[int]]:
    """BOS + prompt ids per record; errors name the record's file, line and field."""
    out = []
    for r in records:
        ids = tokenizer.encode_prompt(r.prompt, where=f"{r.where}: field 'prompt'")
        if max_len is not None and len(ids) >= max_len:
            raise DataError(f"prompt is {len(ids)} tokens, the model's context is {max_len}", path=r.where, field="prompt")
        out.append(ids)
    return out


class PromptDataset(Dataset):
    """Encoded prompts; batches are left-padded for generation."""

    def __init__(self, tokenizer: Tokenizer, records: list[PromptRecord], max_len: int | None = None) -> None:
        self.records = records
        self.ids = encode_prompts(tokenizer, records, max_len)
        self.pad_id = tokenizer.pad_id

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[list[int], PromptRecord]:
        return self.ids[i], self.records[i]

    def batches(self, size: int, device: torch.device | str = "cpu"):
        """The prompts in order, `size` a batch, collated and on `device` (an evaluation's loader without a DataLoader)."""
        for start in range(0, len(self), size):
            yield move_batch(self.collate([self[i] for i in range(start, min(start + size, len(self)))]), device)

    def collate(self, items: list[tuple[list[int], PromptRecord]]) -> dict:
        prompt_ids, prompt_mask = left_pad([ids for ids, _ in items], self.pad_id)
        return {
            "prompt_ids": prompt_ids,  # (B, P) left-padded
            "prompt_mask": prompt_mask,  # (B, P)
            "prompts": [r.prompt for _, r in items],
            "golds": [r.gold for _, r in items],
            "strata": [r.strata for _, r in items],
        }


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
