"""Prompts with optional gold answers, from the toy tasks' splits or a file (JSONL, or a `datasets` source), and
their batches.

Shared by every stage: SFT's and PPO's held-out evaluation, PPO's rollout prompts and `rlhf eval`.

A conversational prompt is a list of messages ending in a user turn (`prompt`), or a conversation ending in the
assistant's reply (`messages`: the reply is the gold answer). Its record keeps the messages and, as `prompt`, the
last user turn's text (what strata and the gold answer are read from) until a tokenizer renders it:
`render_records` (called by `PromptDataset`) makes `prompt` the chat template's text with the generation prompt,
the string every later stage scores and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from rlhf_lightning.padding import left_pad
from rlhf_lightning.data.conversations import Messages, check_messages, last_user_text, render_prompt
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.sources import RecordSpec, SourceOptions, data_error, read_rows
from rlhf_lightning.options import DATA, SEED_MAX, ConfigError, check_number
from rlhf_lightning.tasks.arithmetic import gold_answer, task_problems
from rlhf_lightning.tasks.chat import prompt_messages
from rlhf_lightning.tasks.strata import prompt_strata
from rlhf_lightning.tokenizer import Tokenizer

PROMPT_RECORDS = RecordSpec(
    flat_required=("prompt",), chat_required=("prompt", "messages"), chat_any=True,
    optional={"completion": str, "gold": str, "group": str},
)


@dataclass(frozen=True)
class PromptRecord:
    prompt: str  # the text; for a conversation not yet rendered, its last user turn
    gold: str | None  # the answer the judge compares with, when known
    where: str  # "file:line", "file:row N" or "task:split", for error messages
    strata: tuple[str, ...] = ()  # one stratum per dimension (`tasks.strata`), or the record's `group`
    messages: Messages | None = None  # a conversation's turns, until `render_records` renders them into `prompt`


def read_group(path: str, line: int | None, record: dict) -> str | None:
    """A record's optional `group` (its stratum): a non-empty string, else a `DataError` naming file, line, field
    (`path` may be a row's "file:line" or "file:row N", with `line` None)."""
    group = record.get("group")
    if group is not None and not group.strip():
        problem = f"expected a non-empty string, got {group!r}"
        raise data_error(problem, path, "group") if line is None else DataError(problem, path=path, line=line, field="group")
    return group


def source_options(split: str = "train", fields: dict[str, str] | None = None, shuffle_seed: int | None = None) -> SourceOptions:
    """A DataModule's `split`, `fields` and `shuffle_seed` options (how a `datasets` source is read), checked."""
    if not isinstance(split, str) or not split:
        raise ConfigError(f"{DATA}split: expected a split name, got {split!r}")
    if fields is not None and not (isinstance(fields, dict) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in fields.items())):
        raise ConfigError(f"{DATA}fields: expected a mapping of record fields to column names, got {fields!r}")
    check_number("shuffle_seed", shuffle_seed, low=0, high=SEED_MAX, integer=True, allow_none="the source's order", prefix=DATA)
    return SourceOptions(split, dict(fields) if fields else None, shuffle_seed)


def prompt_record(where: str, r: dict[str, Any]) -> PromptRecord:
    """A prompt record of a file's row: flat `{"prompt"[, "completion"]}`, or conversational `{"prompt": [...]}`
    (ending in a user turn) or `{"messages": [...]}` (ending in the assistant's reply, the gold answer)."""
    group = read_group(where, None, r)
    prompt = r.get("prompt")
    if isinstance(prompt, str):
        gold = r.get("completion", r.get("gold", gold_answer(prompt)))
        return PromptRecord(prompt, gold, where, prompt_strata(prompt, group))
    if prompt is not None:
        messages = check_messages(prompt, where, "prompt", ends_with="user", roles=("system", "user", "assistant"))
        gold = r.get("gold", r.get("completion"))
    else:
        conversation = check_messages(r["messages"], where, "messages", ends_with="assistant")
        messages, gold = conversation[:-1], r.get("gold", conversation[-1]["content"])
        if not messages or messages[-1]["role"] != "user":
            raise DataError("the reply must follow a user turn", path=where, field=f"messages[{len(conversation) - 1}]")
    question = last_user_text(messages)
    return PromptRecord(question, gold if gold is not None else gold_answer(question), where, prompt_strata(question, group), messages)


def render_records(tokenizer: Tokenizer, records: list[PromptRecord]) -> list[PromptRecord]:
    """The records with every conversation rendered by the tokenizer's chat template into `prompt` (idempotent)."""
    return [r if r.messages is None else replace(r, prompt=render_prompt(tokenizer, r.messages, r.where), messages=None) for r in records]


def task_prompts(task: str, split: str) -> list[PromptRecord]:
    """The prompts of a task's split; `toy_chat` asks them in conversational form (`tasks.chat`)."""
    problems = task_problems(task, split)
    if task == "toy_chat":
        return [PromptRecord(p.prompt, p.answer, f"{task}:{split}", prompt_strata(p.prompt), prompt_messages(p)) for p in problems]
    return [PromptRecord(p.prompt, p.answer, f"{task}:{split}", prompt_strata(p.prompt)) for p in problems]


def load_prompts(
    task: str = "toy", split: str = "val", path: str | None = None, limit: int | None = None, options: SourceOptions | None = None
) -> list[PromptRecord]:
    """The task's `split` prompts, or the records of a file (JSONL, or a `datasets` source read with `options`):
    `{"prompt"[, "completion"][, "group"]}`, or conversational (`prompt_record`)."""
    if path is not None:
        records = [prompt_record(where, r) for where, r in read_rows(path, PROMPT_RECORDS, options).rows]
    else:
        records = task_prompts(task, split)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError("no prompts", path=path or f"{task}:{split}")
    return records


def encode_prompts(tokenizer: Tokenizer, records: list[PromptRecord], max_len: int | None = None) -> list[list[int]]:
    """BOS + prompt ids per record (conversations rendered first); errors name the record's file, line and field."""
    out = []
    for r in render_records(tokenizer, records):
        ids = tokenizer.encode_prompt(r.prompt, where=f"{r.where}: field 'prompt'")
        if max_len is not None and len(ids) >= max_len:
            raise DataError(f"prompt is {len(ids)} tokens, the model's context is {max_len}", path=r.where, field="prompt")
        out.append(ids)
    return out


class PromptDataset(Dataset):
    """Encoded prompts; batches are left-padded for generation."""

    def __init__(self, tokenizer: Tokenizer, records: list[PromptRecord], max_len: int | None = None) -> None:
        self.records = records = render_records(tokenizer, records)
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
