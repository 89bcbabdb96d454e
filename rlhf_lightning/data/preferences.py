"""Preference pairs for the reward model, from a JSONL file or sampled from an SFT policy and judged.

A file holds TRL-style lines ``{"prompt", "chosen", "rejected"[, "margin"]}``; our generated files add
``chosen_ended`` / ``rejected_ended`` (did the completion emit EOS; default true), so they can be read back
as they are; a completion may be empty only where its ``*_ended`` field is given (EOS right away).

Generated pairs: K completions per prompt are sampled in batches, scored by a judge (``auto``: the task's
judge; ``random``: noisy labels, as the seed's RANDOM mode), and every two completions of the same prompt
whose scores differ become a pair. Ties are dropped, or broken by length (longer preferred, as the seed
did) with ``tie_break="length"``. Pairs of ``train`` prompts train, pairs of ``val`` prompts are held out;
the held-out set also keeps every sampled ``val`` completion with the task judge's 0/1 label, so the
reward's AUROC and its mean and std can be measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.data.base import TokenizedDataModule
from rlhf_lightning.data.collate import left_pad, right_pad
from rlhf_lightning.data.jsonl import DataError, read_jsonl, write_jsonl
from rlhf_lightning.data.prompts import PromptRecord, encode_prompts, load_prompts
from rlhf_lightning.generation import generate
from rlhf_lightning.models.reward import completion_mask, encode_scored
from rlhf_lightning.policy import context_length, load_policy
from rlhf_lightning.tasks.arithmetic import gold_answer, judge, split_of
from rlhf_lightning.tokenizer import CharTokenizer

__all__ = [
    "JUDGES",
    "PairDataset",
    "PreferenceDataModule",
    "PreferencePair",
    "SampleGroup",
    "SampleGroupDataset",
    "pairs_from_group",
    "read_preferences",
    "sample_groups",
]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None  # TRL's optional margin: the loss wants r_chosen - r_rejected >= margin
    chosen_ended: bool = True  # the completion emitted EOS (scored with EOS appended)
    rejected_ended: bool = True
    where: str = ""  # "file:line" or "task:split", for error messages

    def to_record(self) -> dict:
        record = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        if self.margin is not None:
            record["margin"] = self.margin
        return {**record, "chosen_ended": self.chosen_ended, "rejected_ended": self.rejected_ended}


@dataclass
class SampleGroup:
    """The K sampled completions of one prompt, the judge's scores and the task judge's 0/1 labels."""

    prompt: str
    gold: str | None
    completions: list[str]
    ended: list[bool]
    scores: list[float]  # the judge that builds pairs
    labels: list[float]  # the task judge (NaN without a gold answer), for AUROC
    where: str = ""
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (chosen index, rejected index)


# --------------------------------------------------------------------------- reading files


def read_preferences(path: str) -> list[PreferencePair]:
    """Validated pairs of a JSONL file; errors name the file, the line and the field."""
    rows = read_jsonl(
        path, required=["prompt", "chosen", "rejected"],
        optional={"margin": (int, float), "chosen_ended": bool, "rejected_ended": bool}, non_empty=False,
    )
    pairs = []
    for line, r in rows:
        for name in ("prompt", "chosen", "rejected"):
            # a sampled completion may be empty (EOS right away); our files say so with "<name>_ended"
            if not r[name].strip() and f"{name}_ended" not in r:
                raise DataError(f"expected a non-empty string, got {json.dumps(r[name])}", path, line, name)
        chosen_ended, rejected_ended = r.get("chosen_ended", True), r.get("rejected_ended", True)
        if r["chosen"] == r["rejected"] and chosen_ended == rejected_ended:
            raise DataError("identical to 'chosen': a pair must compare two different completions", path, line, "rejected")
        margin = r.get("margin")
        pairs.append(PreferencePair(
            r["prompt"], r["chosen"], r["rejected"], None if margin is None else float(margin),
            chosen_ended, rejected_ended, f"{path}:{line}",
        ))
    return pairs


# --------------------------------------------------------------------------- judges and sampling

Judge = Callable[[list[str], list[str | None], list[bool], list[str], torch.Generator], list[float]]


def auto_judge(completions: list[str], golds: list[str | None], ended: list[bool], wheres: list[str], generator: torch.Generator) -> list[float]:
    """The task's judge: 1.0 for the exact gold answer followed by EOS, else 0.0."""
    for gold, where in zip(golds, wheres):
        if gold is None:
            raise DataError("the 'auto' judge needs a gold answer and this prompt has none", path=where, field="prompt")
    return [judge(c, g, e) for c, g, e in zip(completions, golds, ended)]


def random_judge(completions: list[str], golds: list[str | None], ended: list[bool], wheres: list[str], generator: torch.Generator) -> list[float]:
    """Noisy labels: a uniform random score per completion, so every preference is a coin flip."""
    return torch.rand(len(completions), generator=generator).tolist()


JUDGES: dict[str, Judge] = {"auto": auto_judge, "random": random_judge}


def pairs_from_group(scores: Sequence[float], completions: Sequence[str], tie_break: str | None = None) -> list[tuple[int, int]]:
    """(chosen, rejected) indices of every two completions whose scores differ (higher score chosen).

    >>> pairs_from_group([1.0, 0.0, 0.0], ["5", "6", "77"])
    [(0, 1), (0, 2)]
    >>> pairs_from_group([1.0, 0.0, 0.0], ["5", "6", "77"], tie_break="length")  # longer wins a tie
    [(0, 1), (0, 2), (2, 1)]
    """
    if tie_break not in (None, "length"):
        raise ValueError(f"tie_break must be None or 'length', got {tie_break!r}")
    pairs = []
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] != scores[j]:
                pairs.append((i, j) if scores[i] > scores[j] else (j, i))
            elif tie_break == "length" and len(completions[i]) != len(completions[j]):
                pairs.append((i, j) if len(completions[i]) > len(completions[j]) else (j, i))
    return pairs


@torch.no_grad()
def sample_groups(
    policy: torch.nn.Module,
    tokenizer: CharTokenizer,
    records: list[PromptRecord],
    num_samples: int,
    judge_name: str = "auto",
    tie_break: str | None = None,
    max_new_tokens: int = 6,
    temperature: float = 1.0,
    top_k: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> list[SampleGroup]:
    """Sample `num_samples` completions per prompt (batched, seeded), judge them, pair them up."""
    if judge_name not in JUDGES:
        raise ValueError(f"unknown judge {judge_name!r}; choose one of {sorted(JUDGES)}")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to form pairs, got {num_samples}")
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    judge_generator = torch.Generator().manual_seed(seed + 1)
    prompt_ids = encode_prompts(tokenizer, records, context_length(policy) - max_new_tokens + 1)
    groups = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        ids, mask = left_pad(prompt_ids[start : start + batch_size], tokenizer.pad_id)  # (b, P)
        gen = generate(
            policy, ids.repeat_interleave(num_samples, 0).to(device), mask.repeat_interleave(num_samples, 0).to(device),
            max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
            temperature=temperature, top_k=top_k, generator=generator,
        )  # rows r*K .. r*K + K-1 belong to prompt r
        texts = [tokenizer.decode(row) for row in gen.completion_ids.tolist()]
        ended = gen.finished.tolist()
        golds = [r.gold for r in chunk for _ in range(num_samples)]
        wheres = [r.where for r in chunk for _ in range(num_samples)]
        scores = JUDGES[judge_name](texts, golds, ended, wheres, judge_generator)
        for r, record in enumerate(chunk):
            k = slice(r * num_samples, (r + 1) * num_samples)
            labels = [math.nan if record.gold is None else judge(c, record.gold, e) for c, e in zip(texts[k], ended[k])]
            group = SampleGroup(record.prompt, record.gold, texts[k], ended[k], scores[k], labels, record.where)
            group.pairs = pairs_from_group(group.scores, group.completions, tie_break)
            groups.append(group)
    return groups


def group_pairs(groups: list[SampleGroup]) -> list[PreferencePair]:
    return [
        PreferencePair(g.prompt, g.completions[i], g.completions[j], None, g.ended[i], g.ended[j], g.where)
        for g in groups for i, j in g.pairs
    ]


def pair_groups(pairs: list[PreferencePair]) -> list[SampleGroup]:
    """Each pair as a group of its two completions (labels from the task judge where the prompt has one)."""
    groups = []
    for p in pairs:
        gold = gold_answer(p.prompt)
        completions, ended = [p.chosen, p.rejected], [p.chosen_ended, p.rejected_ended]
        labels = [math.nan if gold is None else judge(c, gold, e) for c, e in zip(completions, ended)]
        groups.append(SampleGroup(p.prompt, gold, completions, ended, [1.0, 0.0], labels, p.where, [(0, 1)]))
    return groups


# --------------------------------------------------------------------------- datasets


def _encode(tokenizer: CharTokenizer, prompt: str, completion: str, ended: bool, where: str, field_name: str, max_len: int) -> tuple[list[int], int]:
    """(ids, prompt length): where the completion starts, for reward models that score its likelihood."""
    ids = encode_scored(tokenizer, prompt, completion, ended, where, field_name)
    if len(ids) > max_len:
        raise DataError(f"prompt + completion is {len(ids)} tokens, the reward model's context is {max_len}", path=where, field=field_name)
    return ids, len(tokenizer.encode_prompt(prompt))


def _pad(encoded: list[tuple[list[int], int]], pad_id: int) -> dict:
    input_ids, attention_mask = right_pad([ids for ids, _ in encoded], pad_id)
    completion = completion_mask([p for _, p in encoded], [len(ids) for ids, _ in encoded], input_ids.size(1))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion}  # (B, T) each


class PairDataset(Dataset):
    """Training pairs; a batch stacks all chosen then all rejected sequences for one forward."""

    def __init__(self, tokenizer: CharTokenizer, pairs: list[PreferencePair], max_len: int) -> None:
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
            **_pad(seqs, self.pad_id),  # (2B, T): rows [0, B) chosen, [B, 2B) rejected
            "margin": torch.tensor([m for _, _, m in items], dtype=torch.float32),  # (B,)
        }


class SampleGroupDataset(Dataset):
    """Held-out groups: a batch scores every completion once, then compares the pairs by index."""

    def __init__(self, tokenizer: CharTokenizer, groups: list[SampleGroup], max_len: int) -> None:
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
            **_pad(seqs, self.pad_id),  # (N, T) every sampled completion of the batch's prompts
            "labels": torch.tensor(labels, dtype=torch.float32),  # (N,) task judge 0/1, NaN if unknown
            "pairs": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),  # (M, 2) chosen, rejected rows
            "prompts": [g.prompt for _, g in items for _ in g.completions],
            "completions": [c for _, g in items for c in g.completions],
        }


# --------------------------------------------------------------------------- the DataModule


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs from JSONL files, or sampled from an SFT policy and judged (in `setup`).

    The tokenizer belongs to the LightningModule (it travels inside the checkpoint); `setup` takes it
    from there. Generated pairs are written to `<run dir>/preferences_{train,val}.jsonl`.
    """

    def __init__(
        self,
        task: str = "toy",
        train_file: str | None = None,
        val_file: str | None = None,
        policy_ckpt: str | None = None,
        num_samples: int = 4,
        judge: str = "auto",
        tie_break: str | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        max_new_tokens: int = 6,
        max_train_prompts: int | None = None,
        max_val_prompts: int | None = None,
        seed: int = 0,
        generation_batch_size: int = 256,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            task: prompts to sample from: "toy" (hash splits) or "seed" (the seed's 8 prompts).
            train_file: JSONL of {"prompt", "chosen", "rejected"[, "margin"]} lines; replaces generation.
                Without `val_file`, its pairs whose prompt hashes to `val` are held out (`test` ones dropped).
            val_file: JSONL of held-out pairs (default: generated from `val` prompts, or held out of `train_file`).
            policy_ckpt: SFT (or PPO) checkpoint that samples the completions; default: the RewardModule's
                `sft_ckpt`.
            num_samples: completions sampled per prompt (K); every two with different scores make a pair.
            judge: "auto" (the task's judge) or "random" (noisy labels).
            tie_break: None (drop ties) or "length" (the longer completion wins a tie, as the seed did).
            temperature: sampling temperature.
            top_k: sample among the k most likely tokens only (None: all).
            max_new_tokens: completion budget; a completion without EOS within it gets 0 from the judge.
            max_train_prompts: sample from a random subset of N `train` prompts (None: all).
            max_val_prompts: sample from a random subset of N `val` prompts (None: all).
            seed: seed of the sampling and of the subsets (independent of the global seed, so a resumed
                run sees the same pairs).
            generation_batch_size: prompts per batch of sampling (each repeated K times). 256 x K=8 rows
                sample fastest on a 2-core CPU; 2048 prompts took 40% longer and 900 MB more for the KV cache.
            batch_size: pairs per optimizer step.
            eval_batch_size: held-out prompts (groups of completions) per batch.
            num_workers: DataLoader workers.
        """
        super().__init__()
        self.save_hyperparameters()
        if judge not in JUDGES:
            raise ValueError(f"data.init_args.judge: unknown judge {judge!r}; choose one of {sorted(JUDGES)}")
        if tie_break not in (None, "length"):
            raise ValueError(f"data.init_args.tie_break: must be null or 'length', got {tie_break!r}")

    # ------------------------------------------------------------------ sources
    def _subset(self, records: list[PromptRecord], limit: int | None) -> list[PromptRecord]:
        if limit is None or limit >= len(records):
            return records
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.hparams.seed))
        return [records[i] for i in sorted(order[:limit].tolist())]

    def _sampler(self) -> tuple[torch.nn.Module, CharTokenizer]:
        hp = self.hparams
        module = self.trainer.lightning_module if self.trainer is not None else None
        path, role = hp.policy_ckpt, "data.init_args.policy_ckpt"
        if path is None:
            path, role = getattr(module, "hparams", {}).get("sft_ckpt"), "model.init_args.sft_ckpt"
        if path is None:
            raise ValueError("generated preference pairs need a policy: set model.init_args.sft_ckpt or data.init_args.policy_ckpt (or give data.init_args.train_file)")
        policy, tokenizer, _ = load_policy(path, role=role)
        device = module.device if module is not None else torch.device("cpu")
        return policy.to(device).eval(), tokenizer

    def _generate(self, split: str, limit: int | None, policy, tokenizer) -> list[SampleGroup]:
        hp = self.hparams
        records = self._subset(load_prompts(hp.task, split), limit)
        return sample_groups(
            policy, tokenizer, records, hp.num_samples, hp.judge, hp.tie_break, hp.max_new_tokens,
            hp.temperature, hp.top_k, hp.generation_batch_size, hp.seed + (split == "val"),
        )

    def _run_dir(self) -> str:
        trainer = self.trainer
        return (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir

    def _write(self, name: str, pairs: list[PreferencePair]) -> None:
        if self.trainer is not None and self.trainer.is_global_zero:
            write_jsonl(f"{self._run_dir()}/{name}", [p.to_record() for p in pairs])

    def setup(self, stage: str) -> None:
        hp = self.hparams
        tokenizer, max_len = self.module_tokenizer()

        file_pairs = read_preferences(hp.train_file) if hp.train_file is not None else None
        val_pairs = read_preferences(hp.val_file) if hp.val_file is not None else None
        if file_pairs is None:  # generated pairs: one policy samples both splits
            policy, policy_tokenizer = self._sampler()
            rank_zero_info(f"[reward] sampling preferences: {hp.num_samples} completions per prompt, judged by {hp.judge!r}")

        if file_pairs is None:
            train_groups = self._generate("train", hp.max_train_prompts, policy, policy_tokenizer)
            train_pairs = group_pairs(train_groups)
            self._write("preferences_train.jsonl", train_pairs)
        elif val_pairs is None:  # hold out the file's `val` prompts
            train_pairs = [p for p in file_pairs if split_of(p.prompt) == "train"]
            val_pairs = [p for p in file_pairs if split_of(p.prompt) == "val"]
        else:
            train_pairs = file_pairs
        if val_pairs is not None:
            val_groups = pair_groups(val_pairs)
        else:
            val_groups = self._generate("val", hp.max_val_prompts, policy, policy_tokenizer)
            self._write("preferences_val.jsonl", group_pairs(val_groups))

        if not train_pairs:
            raise DataError("no preference pairs to train on (every sampled pair was a tie?)", path=hp.train_file or f"{hp.task}:train")
        self.train_set = PairDataset(tokenizer, train_pairs, max_len)
        self.val_set = SampleGroupDataset(tokenizer, val_groups, max_len)
        written = f", written to {self._run_dir()}/preferences_*.jsonl" if file_pairs is None else ""
        rank_zero_info(
            f"[reward] preference pairs: {len(self.train_set)} train, {sum(len(g.pairs) for g in val_groups)} held out "
            f"({sum(len(g.completions) for g in val_groups)} held-out completions){written}"
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, self.hparams.eval_batch_size)
