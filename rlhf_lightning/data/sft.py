"""SFT demonstrations: (prompt, completion) pairs or conversations (`messages`, loss on every assistant turn),
from the toy tasks or a file (JSONL, or a `datasets` source)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.data.base import TokenizedDataModule
from rlhf_lightning.data.conversations import Messages, check_messages, encode_conversation, last_user_text
from rlhf_lightning.padding import right_pad
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.prompts import PromptDataset, load_prompts, read_group, source_options
from rlhf_lightning.data.sources import RecordSpec, read_rows
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
        input_ids, attention_mask = right_pad([ids for ids, _ in items], self.pad_id)  # (B, T) each
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
                a JSONL file, or a `datasets` source (.json, .parquet, .csv, a `save_to_disk` folder; `[data]` extra).
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
        """The demonstrations, flat or conversational, and their strata."""
        hp = self.hparams
        if hp.train_file is not None:
            source = read_rows(hp.train_file, SFT_RECORDS, source_options(hp.split, hp.fields, hp.shuffle_seed))
            if source.conversational:
                demos = [(check_messages(r["messages"], where, "messages", needs_assistant=True), where) for where, r in source.rows]
                questions = [last_user_text(m[: next(i for i, t in enumerate(m) if t["role"] == "assistant")] or m) for m, _ in demos]
            else:
                demos = [(r["prompt"], r["completion"], where) for where, r in source.rows]
                questions = [r["prompt"] for _, r in source.rows]
            return demos, [prompt_strata(q, read_group(where, None, r)) for q, (where, r) in zip(questions, source.rows)]
        problems = demonstration_problems(hp.demo_fraction) if hp.task in ("toy", "toy_chat") else task_problems(hp.task, "train")
        strata = [prompt_strata(p.prompt) for p in problems]
        if hp.task == "toy_chat":
            return [(m, f"{hp.task}:train") for m in demonstrations(problems)], strata
        return [(p.prompt, p.answer, f"{hp.task}:train") for p in problems], strata

    def setup(self, stage: str) -> None:
        tokenizer, context = self.tokenizer_and_length()
        hp = self.hparams
        if stage == "fit":
            pairs, strata = self._pairs()
            self.train_set = SFTDataset(tokenizer, pairs, context)
            weights = check_stratum_weights(hp.stratum_weights, "data.init_args.stratum_weights")
            option, known = "data.init_args.stratum_weights", task_strata_names(hp.task)
            self.train_sampler = StratumWeightedSampler(example_weights(strata, weights, option, known)) if weights else None
        records = load_prompts(hp.task, "val", hp.val_file, hp.max_val_prompts, source_options(hp.val_split, hp.fields, hp.shuffle_seed))
        self.val_set = PromptDataset(tokenizer, records, context)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, self.hparams.batch_size, shuffle=self.train_sampler is None, sampler=self.train_sampler)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, self.hparams.eval_batch_size)
