"""SFT demonstrations: (prompt, completion) pairs or conversations (`messages`, loss on every assistant turn),
from the toy tasks or a file (JSONL, or a `datasets` source).

A JSONL file or a task is tokenized whole in `setup` (`SFTDataset`). A `datasets` source (Parquet, a `save_to_disk`
folder, ...) stays in its memory-mapped Arrow table (`ArrowSFTDataset`): `setup` streams every row once to check it
as training will read it (fields, messages, template, length), keeping only each row's token count, and a row is
read and tokenized again when a batch draws it; a file of several GB trains in the memory of a few batches.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.data.base import TokenizedDataModule
from rlhf_lightning.data.conversations import Messages, check_messages, encode_conversation, last_user_text
from rlhf_lightning.padding import right_pad
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.prompts import PromptDataset, load_prompts, read_group, source_options
from rlhf_lightning.data.sources import LazyRows, RecordSpec, read_rows, through_datasets
from rlhf_lightning.data.stratum_weights import StratumWeightedSampler, check_stratum_weights, example_weights
from rlhf_lightning.options import DATA, check_choice, check_number
from rlhf_lightning.tasks.arithmetic import TASKS, demonstration_problems, task_problems
from rlhf_lightning.tasks.chat import demonstrations
from rlhf_lightning.tasks.strata import prompt_strata, task_strata_names
from rlhf_lightning.tokenizer import Tokenizer

#: A demonstration: (prompt, completion, where) in flat form, or (messages, where) in conversational form.
Demonstration = tuple[str, str, str] | tuple[Messages, str]

SFT_RECORDS = RecordSpec(flat_required=("prompt", "completion"), chat_required=("messages",), optional={"group": str})


def encode_demonstration(tokenizer: Tokenizer, demo: Demonstration, max_len: int) -> tuple[list[int], list[bool]]:
    """(ids, trained): BOS + prompt + completion + EOS with the completion trained, or a conversation's tokens
    under the chat template with every assistant turn trained (`encode_conversation`)."""
    if len(demo) == 3:
        prompt, completion, where = demo
        p = tokenizer.encode_prompt(prompt, where=f"{where}: field 'prompt'")
        c = tokenizer.encode_completion(completion, where=f"{where}: field 'completion'")
        ids, trained, last = p + c, [False] * len(p) + [True] * len(c), "completion"
    else:
        messages, where = demo
        ids, trained = encode_conversation(tokenizer, messages, where)
        last = "messages"
    if len(ids) > max_len:
        what = "prompt + completion" if last == "completion" else "the conversation"
        raise DataError(f"{what} is {len(ids)} tokens, the model's context is {max_len}", path=where, field=last)
    return ids, trained


def demonstration(where: str, record: dict, conversational: bool) -> tuple[Demonstration, tuple[str, ...]]:
    """A file's checked record as a demonstration, and its strata (its `group`, or the arithmetic strata of its
    prompt: a conversation's last user turn before its first reply)."""
    if conversational:
        messages = check_messages(record["messages"], where, "messages", needs_assistant=True)
        question = last_user_text(messages[: next(i for i, t in enumerate(messages) if t["role"] == "assistant")] or messages)
        demo: Demonstration = (messages, where)
    else:
        question, demo = record["prompt"], (record["prompt"], record["completion"], where)
    return demo, prompt_strata(question, read_group(where, None, record))


def collate_examples(items: list[tuple[list[int], list[bool]]], pad_id: int) -> dict:
    """Right-padded (B, T) tensors of examples (ids, trained): `input_ids`, `attention_mask`, `loss_mask` (the
    trained tokens) and `prompt_loss_mask` (every other token after BOS)."""
    input_ids, attention_mask = right_pad([ids for ids, _ in items], pad_id)  # (B, T) each
    trained, _ = right_pad([[int(t) for t in mask] for _, mask in items], 0)  # (B, T)
    trained = trained.bool() & attention_mask
    pos = torch.arange(input_ids.size(1))[None, :]  # (1, T)
    # token t is predicted from tokens < t; BOS (t = 0) is never a target
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": trained,  # (B, T) the completion (EOS included), or every assistant turn
        "prompt_loss_mask": attention_mask & (pos > 0) & ~trained,  # (B, T) every other token after BOS
    }


class SFTDataset(Dataset):
    """Each example is its tokens (BOS first) and a mask of the tokens the loss predicts: the completion (text +
    EOS), or every assistant turn of a conversation (through its EOS)."""

    def __init__(self, tokenizer: Tokenizer, demos: list[Demonstration], max_len: int) -> None:
        self.pad_id = tokenizer.pad_id
        self.examples = [encode_demonstration(tokenizer, d, max_len) for d in demos]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], list[bool]]:
        return self.examples[i]

    def collate(self, items: list[tuple[list[int], list[bool]]]) -> dict:
        return collate_examples(items, self.pad_id)


class ArrowSFTDataset(Dataset):
    """The examples of a `datasets` source, read from its memory-mapped Arrow table and tokenized when drawn; as
    `SFTDataset`'s, item for item.

    Building it streams every row of the source once (`LazyRows.scan`, a batch of rows in memory at a time) and
    checks it as `__getitem__` will read it, so bad input is refused before training starts; what it keeps is each
    row's token count (`lengths`, (N,) int32) and, with `strata`, each row's strata as a code into `strata_names`.
    """

    def __init__(self, tokenizer: Tokenizer, rows: LazyRows, max_len: int, strata: bool = False) -> None:
        self.tokenizer, self.rows, self.max_len, self.pad_id = tokenizer, rows, max_len, tokenizer.pad_id
        self.lengths = np.zeros(len(rows), dtype=np.int32)  # (N,) tokens of the split's row i
        codes: dict[tuple[str, ...], int] = {}
        self.strata_codes = np.zeros(len(rows) if strata else 0, dtype=np.int32)  # (N,) into strata_names
        for index, where, record in rows.scan():
            demo, row_strata = demonstration(where, record, rows.conversational)
            self.lengths[index] = len(encode_demonstration(tokenizer, demo, max_len)[0])
            if strata:
                self.strata_codes[index] = codes.setdefault(row_strata, len(codes))
        self.strata_names = list(codes)  # distinct strata tuples, by code

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[list[int], list[bool]]:
        where, record = self.rows[k]
        demo, _ = demonstration(where, record, self.rows.conversational)
        return encode_demonstration(self.tokenizer, demo, self.max_len)

    def collate(self, items: list[tuple[list[int], list[bool]]]) -> dict:
        return collate_examples(items, self.pad_id)


class SFTDataModule(TokenizedDataModule):
    """Demonstrations for `train`, the task's `val` prompts (or a JSONL file) for greedy evaluation.

    Each example carries two masks of predicted tokens, the completion's (`loss_mask`) and the prompt's
    (`prompt_loss_mask`): the module chooses which it trains on (`SFTModule(prompt_loss=...)`).
    """

    def __init__(
        self,
        task: str = "toy",
        train_file: str | None = None,
        val_file: str | None = None,
        demo_fraction: float = 1.0,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        max_val_prompts: int | None = None,
        stratum_weights: dict[str, float] | None = None,
        num_workers: int = 0,
        split: str = "train",
        val_split: str = "train",
        fields: dict[str, str] | None = None,
        shuffle_seed: int | None = None,
        tokenizer: Tokenizer | None = None,
        max_length: int | None = None,
    ) -> None:
        """
        Args:
            task: "toy" (two-digit arithmetic with hash splits), "toy_chat" (the same in conversational form) or
                "seed" (the seed task's 8 prompts).
            train_file: demonstrations replacing the task's: {"prompt", "completion"[, "group"]} records, or
                conversations {"messages": [{"role", "content"}, ...][, "group"]} (loss on every assistant turn);
                a JSONL file, or a `datasets` source (.json, .parquet, .csv, a `save_to_disk` folder; `[data]` extra),
                which stays in its memory-mapped Arrow table (`ArrowSFTDataset`: files larger than memory train).
            val_file: evaluation prompts, {"prompt"[, "completion"]} records or conversational ones (`prompt` as
                messages ending in a user turn, or `messages` ending in the gold reply); default: the task's `val`.
            demo_fraction: fraction of `train` prompts that have a demonstration (toy task only).
            batch_size: demonstrations per optimizer step.
            eval_batch_size: prompts per batch of greedy evaluation.
            max_val_prompts: evaluate on the first N `val` prompts only (None: all).
            stratum_weights: draw demonstrations by stratum (`rlhf_lightning.tasks.strata`), e.g.
                {"digits/1+1": 8, "digits/2+2": 0.5}: a demonstration's weight is the product of its strata's
                weights (1 where none is given); each epoch draws as many demonstrations as there are, with
                replacement, in proportion. None: every demonstration once per epoch, shuffled.
            num_workers: DataLoader workers.
            split, val_split: the split of a `datasets` source read for `train_file` and `val_file`.
            fields: record fields -> the source's column names, e.g. {"messages": "conversation"} (`datasets` sources).
            shuffle_seed: shuffle a `datasets` source's rows with this seed (None: its order).
            tokenizer, max_length: the module's, linked by `rlhf fit` (see `TokenizedDataModule`).
        """
        super().__init__(tokenizer, max_length)
        check_choice("task", task, TASKS, prefix=DATA)
        source_options(split, fields, shuffle_seed)
        source_options(val_split)
        check_number("demo_fraction", demo_fraction, low=0, high=1, low_open=True, prefix=DATA)
        check_number("batch_size", batch_size, low=1, integer=True, prefix=DATA)
        check_number("eval_batch_size", eval_batch_size, low=1, integer=True, prefix=DATA)
        check_number("max_val_prompts", max_val_prompts, low=1, integer=True, allow_none="all", prefix=DATA)
        check_number("num_workers", num_workers, low=0, integer=True, prefix=DATA)
        self.save_hyperparameters(ignore=["tokenizer", "max_length"])
        check_stratum_weights(stratum_weights, "data.init_args.stratum_weights")

    def _pairs(self) -> tuple[list[Demonstration], list[tuple[str, ...]]]:
        """The demonstrations, flat or conversational, and their strata: the task's, or a JSONL file's."""
        hp = self.hparams
        if hp.train_file is not None:
            source = read_rows(hp.train_file, SFT_RECORDS, source_options(hp.split, hp.fields, hp.shuffle_seed))
            demos = [demonstration(where, r, source.conversational) for where, r in source.rows]
            return [d for d, _ in demos], [strata for _, strata in demos]
        problems = demonstration_problems(hp.demo_fraction) if hp.task in ("toy", "toy_chat") else task_problems(hp.task, "train")
        strata = [prompt_strata(p.prompt) for p in problems]
        if hp.task == "toy_chat":
            return [(m, f"{hp.task}:train") for m in demonstrations(problems)], strata
        return [(p.prompt, p.answer, f"{hp.task}:train") for p in problems], strata

    def _train_set(self, tokenizer: Tokenizer, context: int, weighted: bool) -> tuple[Dataset, torch.Tensor | None]:
        """The training examples, and with `weighted` their stratum weights (N,): a `datasets` source left in its
        Arrow table (`ArrowSFTDataset`), anything else tokenized whole (`SFTDataset`)."""
        hp = self.hparams
        option, known = "data.init_args.stratum_weights", task_strata_names(hp.task)
        weights = check_stratum_weights(hp.stratum_weights, option)
        options = source_options(hp.split, hp.fields, hp.shuffle_seed)
        if hp.train_file is not None and through_datasets(hp.train_file, options):
            data = ArrowSFTDataset(tokenizer, LazyRows(hp.train_file, SFT_RECORDS, options), context, strata=weighted)
            if not weighted:
                return data, None
            per_strata = example_weights(data.strata_names, weights, option, known)  # (D,) per distinct strata
            order = data.rows.table.indices
            codes = data.strata_codes if order is None else data.strata_codes[order]  # (N,) in the dataset's order
            return data, per_strata[torch.from_numpy(codes.astype(np.int64))]
        pairs, strata = self._pairs()
        return SFTDataset(tokenizer, pairs, context), example_weights(strata, weights, option, known) if weighted else None

    def setup(self, stage: str) -> None:
        tokenizer, context = self.tokenizer_and_length()
        hp = self.hparams
        if stage == "fit":
            weighted = bool(check_stratum_weights(hp.stratum_weights, "data.init_args.stratum_weights"))
            self.train_set, weights = self._train_set(tokenizer, context, weighted)
            self.train_sampler = StratumWeightedSampler(weights) if weights is not None else None
        records = load_prompts(hp.task, "val", hp.val_file, hp.max_val_prompts, source_options(hp.val_split, hp.fields, hp.shuffle_seed))
        self.val_set = PromptDataset(tokenizer, records, context)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, self.hparams.batch_size, shuffle=self.train_sampler is None, sampler=self.train_sampler)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, self.hparams.eval_batch_size)
