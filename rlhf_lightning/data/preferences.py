"""Preference pairs for the reward model, from a pair source: a JSONL reader or a sampler that samples an SFT
policy and judges the completions. `PreferenceDataModule(pairs=...)` takes either by `class_path`.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.data.base import TokenizedDataModule
from rlhf_lightning.data.jsonl import DataError, read_jsonl, write_jsonl
from rlhf_lightning.data.prompts import PromptRecord, encode_prompts, load_prompts
from rlhf_lightning.options import DATA, PAIRS, SEED_MAX, check_choice, check_number
from rlhf_lightning.padding import left_pad
from rlhf_lightning.policy import context_length, load_policy
from rlhf_lightning.sampling import complete
from rlhf_lightning.scoring import encode_scored_row, pad_scored
from rlhf_lightning.tasks.arithmetic import TASKS, gold_answer, judge_scores, split_of
from rlhf_lightning.tokenizer import Tokenizer

__all__ = [
    "JUDGES",
    "JsonlPairs",
    "PairDataset",
    "PairSource",
    "PreferenceDataModule",
    "PreferencePair",
    "SampleGroup",
    "SampleGroupDataset",
    "SampledPairs",
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
    """The task's judge (`tasks.arithmetic.judge_scores`): 1.0 for the exact gold answer followed by EOS, else 0.0."""
    for gold, where in zip(golds, wheres):
        if gold is None:
            raise DataError("the 'auto' judge needs a gold answer and this prompt has none", path=where, field="prompt")
    return judge_scores(completions, golds, ended).tolist()


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
    tokenizer: Tokenizer,
    records: list[PromptRecord],
    samples_per_prompt: int,
    judge_name: str = "auto",
    tie_break: str | None = None,
    max_new_tokens: int = 6,
    temperature: float = 1.0,
    top_k: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    score: Callable[[list[str], list[str], torch.Tensor, list[str | None]], torch.Tensor] | None = None,
) -> list[SampleGroup]:
    """Sample `samples_per_prompt` completions per prompt (batched, seeded), judge them, pair them up.

    `score`, a reward source (`rewards.RewardSource`: prompts, completions, EOS flags, golds -> scores (B,)),
    replaces the judge named by `judge_name` (online DPO's learned reward)."""
    K = samples_per_prompt
    if judge_name not in JUDGES:
        raise ValueError(f"unknown judge {judge_name!r}; choose one of {sorted(JUDGES)}")
    if K < 2:
        raise ValueError(f"samples_per_prompt must be >= 2 to form pairs, got {K}")
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    judge_generator = torch.Generator().manual_seed(seed + 1)
    prompt_ids = encode_prompts(tokenizer, records, context_length(policy) - max_new_tokens + 1)
    groups = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        ids, mask = left_pad(prompt_ids[start : start + batch_size], tokenizer.pad_id)  # (b, P)
        texts, gen = complete(
            policy, tokenizer, ids.to(device), mask.to(device), max_new_tokens, temperature=temperature, top_k=top_k,
            generator=generator, samples_per_prompt=K,
        )  # rows r*K .. r*K + K-1 belong to prompt r, whose forward ran once
        ended = gen.finished.tolist()
        golds = [r.gold for r in chunk for _ in range(K)]
        wheres = [r.where for r in chunk for _ in range(K)]
        if score is None:
            scores = JUDGES[judge_name](texts, golds, ended, wheres, judge_generator)
        else:
            scores = score([r.prompt for r in chunk for _ in range(K)], texts, gen.finished, golds).tolist()
        labels = judge_scores(texts, golds, ended).tolist()  # the task judge, NaN without a gold answer
        for r, record in enumerate(chunk):
            k = slice(r * K, (r + 1) * K)
            group = SampleGroup(record.prompt, record.gold, texts[k], ended[k], scores[k], labels[k], record.where)
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
        labels = judge_scores(completions, [gold, gold], ended).tolist()
        groups.append(SampleGroup(p.prompt, gold, completions, ended, [1.0, 0.0], labels, p.where, [(0, 1)]))
    return groups


# --------------------------------------------------------------------------- datasets


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


# --------------------------------------------------------------------------- pair sources


class PairSource:
    """Where preference pairs come from: `load(task, seed, device)` -> (train pairs, held-out groups)."""

    generated = False  # True: the pairs were sampled here (the DataModule writes them to the run folder)

    def load(self, task: str, seed: int, device: torch.device) -> tuple[list[PreferencePair], list[SampleGroup]]:
        raise NotImplementedError


class JsonlPairs(PairSource):
    """Pairs from JSONL files of ``{"prompt", "chosen", "rejected"[, "margin"]}`` lines."""

    def __init__(self, train_file: str, val_file: str | None = None) -> None:
        """
        Args:
            train_file: the training pairs. Without `val_file`, its pairs whose prompt hashes to `val` are held out
                (`test` ones dropped).
            val_file: held-out pairs (default: held out of `train_file`).
        """
        self.train_file, self.val_file = train_file, val_file

    def load(self, task: str, seed: int, device: torch.device) -> tuple[list[PreferencePair], list[SampleGroup]]:
        pairs = read_preferences(self.train_file)
        if self.val_file is not None:
            return pairs, pair_groups(read_preferences(self.val_file))
        held_out = [p for p in pairs if split_of(p.prompt) == "val"]
        return [p for p in pairs if split_of(p.prompt) == "train"], pair_groups(held_out)


class SampledPairs(PairSource):
    """Pairs sampled from a policy checkpoint and judged: K completions per `train` prompt (and per `val` prompt,
    held out), every two with different scores make a pair."""

    generated = True

    def __init__(
        self,
        policy_ckpt: str,
        samples_per_prompt: int = 4,
        judge: str = "auto",
        tie_break: str | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        max_new_tokens: int = 6,
        max_train_prompts: int | None = None,
        max_val_prompts: int | None = None,
        generation_batch_size: int = 256,
    ) -> None:
        """
        Args:
            policy_ckpt: SFT (or PPO) checkpoint that samples the completions.
            samples_per_prompt: completions sampled per prompt (K); every two with different scores make a pair.
            judge: "auto" (the task's judge) or "random" (noisy labels).
            tie_break: None (drop ties) or "length" (the longer completion wins a tie, as the seed did).
            temperature: sampling temperature.
            top_k: sample among the k most likely tokens only (None: all).
            max_new_tokens: completion budget; a completion without EOS within it gets 0 from the judge.
            max_train_prompts: sample from a random subset of N `train` prompts (None: all).
            max_val_prompts: sample from a random subset of N `val` prompts (None: all).
            generation_batch_size: prompts per batch of sampling (each repeated K times). 256 x K=8 rows
                sample fastest on a 2-core CPU; 2048 prompts took 40% longer and 900 MB more for the KV cache.
        """
        check_number("samples_per_prompt", samples_per_prompt, low=2, integer=True, prefix=PAIRS)  # two to form a pair
        check_choice("judge", judge, JUDGES, prefix=PAIRS)
        check_choice("tie_break", tie_break, [None, "length"], prefix=PAIRS)
        check_number("temperature", temperature, low=0, low_open=True, prefix=PAIRS)
        check_number("top_k", top_k, low=1, integer=True, allow_none="all tokens", prefix=PAIRS)
        check_number("max_new_tokens", max_new_tokens, low=1, integer=True, prefix=PAIRS)
        check_number("max_train_prompts", max_train_prompts, low=1, integer=True, allow_none="all", prefix=PAIRS)
        check_number("max_val_prompts", max_val_prompts, low=1, integer=True, allow_none="all", prefix=PAIRS)
        check_number("generation_batch_size", generation_batch_size, low=1, integer=True, prefix=PAIRS)
        self.policy_ckpt, self.samples_per_prompt, self.judge, self.tie_break = policy_ckpt, samples_per_prompt, judge, tie_break
        self.temperature, self.top_k, self.max_new_tokens = temperature, top_k, max_new_tokens
        self.max_train_prompts, self.max_val_prompts, self.generation_batch_size = max_train_prompts, max_val_prompts, generation_batch_size

    def load(self, task: str, seed: int, device: torch.device) -> tuple[list[PreferencePair], list[SampleGroup]]:
        policy, tokenizer, _ = load_policy(self.policy_ckpt, role="data.init_args.pairs.init_args.policy_ckpt")
        policy = policy.to(device).eval()
        rank_zero_info(f"[reward] sampling preferences: {self.samples_per_prompt} completions per prompt, judged by {self.judge!r}")
        train = group_pairs(self._groups(policy, tokenizer, task, "train", self.max_train_prompts, seed))
        return train, self._groups(policy, tokenizer, task, "val", self.max_val_prompts, seed)

    def _groups(self, policy, tokenizer: Tokenizer, task: str, split: str, limit: int | None, seed: int) -> list[SampleGroup]:
        """The judged groups of `split`'s prompts (a `seed`-drawn subset of `limit`); `val` samples with seed + 1."""
        records = load_prompts(task, split)
        if limit is not None and limit < len(records):
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))
            records = [records[i] for i in sorted(order[:limit].tolist())]
        return sample_groups(
            policy, tokenizer, records, self.samples_per_prompt, self.judge, self.tie_break, self.max_new_tokens,
            self.temperature, self.top_k, self.generation_batch_size, seed + (split == "val"),
        )


# --------------------------------------------------------------------------- the DataModule


class PreferenceDataModule(TokenizedDataModule):
    """Preference pairs from a pair source (`JsonlPairs` or `SampledPairs`), loaded in `setup`.

    Sampled pairs are written to `<run dir>/preferences_{train,val}.jsonl`, readable back with `JsonlPairs`.
    """

    def __init__(
        self,
        pairs: PairSource,
        task: str = "toy",
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        tokenizer: Tokenizer | None = None,
        max_length: int | None = None,
    ) -> None:
        """
        Args:
            pairs: the pair source, by class_path: `rlhf_lightning.data.preferences.JsonlPairs` (files) or
                `rlhf_lightning.data.preferences.SampledPairs` (sampled from a policy checkpoint and judged).
            task: prompts to sample from: "toy" (hash splits) or "seed" (the seed's 8 prompts).
            seed: seed of the sampling and of the prompt subsets (independent of the global seed, so a resumed
                run sees the same pairs).
            batch_size: pairs per optimizer step.
            eval_batch_size: held-out prompts (groups of completions) per batch.
            num_workers: DataLoader workers.
            tokenizer, max_length: the module's, linked by `rlhf fit` (see `TokenizedDataModule`).
        """
        super().__init__(tokenizer, max_length)
        check_choice("task", task, TASKS, prefix=DATA)
        check_number("seed", seed, low=0, high=SEED_MAX, integer=True, prefix=DATA)
        check_number("batch_size", batch_size, low=1, integer=True, prefix=DATA)
        check_number("eval_batch_size", eval_batch_size, low=1, integer=True, prefix=DATA)
        check_number("num_workers", num_workers, low=0, integer=True, prefix=DATA)
        self.save_hyperparameters(ignore=["tokenizer", "max_length", "pairs"])
        self.pairs = pairs
        self.hparams["pairs"] = {"class_path": f"{type(pairs).__module__}.{type(pairs).__qualname__}", "init_args": dict(vars(pairs))}

    def _run_dir(self) -> str:
        trainer = self.trainer
        return (trainer.log_dir if trainer.loggers else None) or trainer.default_root_dir

    def _write(self, name: str, pairs: list[PreferencePair]) -> None:
        if self.trainer is not None and self.trainer.is_global_zero:
            write_jsonl(f"{self._run_dir()}/{name}", [p.to_record() for p in pairs])

    def setup(self, stage: str) -> None:
        hp = self.hparams
        tokenizer, max_len = self.tokenizer_and_length()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        train_pairs, val_groups = self.pairs.load(hp.task, hp.seed, device)
        if self.pairs.generated:
            self._write("preferences_train.jsonl", train_pairs)
            self._write("preferences_val.jsonl", group_pairs(val_groups))
        if not train_pairs:
            where = getattr(self.pairs, "train_file", None) or f"{hp.task}:train"
            raise DataError("no preference pairs to train on (every sampled pair was a tie?)", path=where)
        self.train_set = PairDataset(tokenizer, train_pairs, max_len)
        self.val_set = SampleGroupDataset(tokenizer, val_groups, max_len)
        written = f", written to {self._run_dir()}/preferences_*.jsonl" if self.pairs.generated and self.trainer is not None else ""
        rank_zero_info(
            f"[reward] preference pairs: {len(self.train_set)} train, {sum(len(g.pairs) for g in val_groups)} held out "
            f"({sum(len(g.completions) for g in val_groups)} held-out completions){written}"
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, self.hparams.eval_batch_size)
