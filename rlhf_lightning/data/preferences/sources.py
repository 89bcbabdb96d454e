"""Pair sources: where `PreferenceDataModule`'s pairs come from, chosen by `class_path`.

`JsonlPairs` reads files; `SampledPairs` samples a policy checkpoint and judges the completions (`pair_sampler`).
Pairs of ``train`` prompts train, pairs of ``val`` prompts are held out; a sampled held-out set also keeps every
sampled ``val`` completion with the task judge's 0/1 label, so the reward's AUROC and its mean and std can be
measured.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.data.preferences.pair_sampler import check_pair_options, sample_groups
from rlhf_lightning.data.preferences.records import PreferencePair, SampleGroup, group_pairs, pair_groups, read_preferences
from rlhf_lightning.data.prompts import load_prompts, source_options
from rlhf_lightning.options import PAIRS, check_number
from rlhf_lightning.policy import load_policy
from rlhf_lightning.tasks.arithmetic import split_of
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["JsonlPairs", "PairSource", "SampledPairs"]


class PairSource:
    """Where preference pairs come from: `load(task, seed, device)` -> (train pairs, held-out groups)."""

    generated = False  # True: the pairs were sampled here (the DataModule writes them to the run folder)

    def load(self, task: str, seed: int, device: torch.device) -> tuple[list[PreferencePair], list[SampleGroup]]:
        raise NotImplementedError


class JsonlPairs(PairSource):
    """Pairs from files of ``{"prompt", "chosen", "rejected"[, "margin"]}`` records, or conversational ones (TRL's
    forms, `records.read_preferences`): JSONL files, or `datasets` sources (`[data]` extra)."""

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        split: str = "train",
        val_split: str = "train",
        fields: dict[str, str] | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        """
        Args:
            train_file: the training pairs. Without `val_file`, its pairs whose prompt (a conversation's last user
                turn) hashes to `val` are held out (`test` ones dropped).
            val_file: held-out pairs (default: held out of `train_file`).
            split, val_split: the split of a `datasets` source read for `train_file` and `val_file`.
            fields: record fields -> the source's column names, e.g. {"chosen": "preferred"} (`datasets` sources).
            shuffle_seed: shuffle a `datasets` source's rows with this seed (None: its order).
        """
        source_options(split, fields, shuffle_seed)
        source_options(val_split)
        self.train_file, self.val_file = train_file, val_file
        self.split, self.val_split, self.fields, self.shuffle_seed = split, val_split, fields, shuffle_seed

    def load(self, task: str, seed: int, device: torch.device) -> tuple[list[PreferencePair], list[SampleGroup]]:
        pairs = read_preferences(self.train_file, source_options(self.split, self.fields, self.shuffle_seed))
        if self.val_file is not None:
            return pairs, pair_groups(read_preferences(self.val_file, source_options(self.val_split, self.fields, self.shuffle_seed)))
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
        check_pair_options(samples_per_prompt, judge, tie_break, prefix=PAIRS)
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
