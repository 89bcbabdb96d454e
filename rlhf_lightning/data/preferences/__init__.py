"""Preference pairs for the reward model and DPO, from a pair source: a JSONL reader or a sampler that samples
a policy and judges the completions. `PreferenceDataModule(pairs=...)` takes either by `class_path`
(`rlhf_lightning.data.preferences.JsonlPairs`, `rlhf_lightning.data.preferences.SampledPairs`).

One job per file:

- `records`: `PreferencePair`, `SampleGroup`, the JSONL reader `read_preferences`, pairs <-> groups;
- `pair_sampler`: the judges (`JUDGES`) and `sample_groups` (K completions per prompt, judged, paired up),
  with the sampler's options checked in one place (`check_pair_options`);
- `datasets`: `PairDataset` (training pairs) and `SampleGroupDataset` (held-out groups);
- `sources`: the pair sources `JsonlPairs` and `SampledPairs`;
- `datamodule`: `PreferenceDataModule`.
"""

from rlhf_lightning.data.preferences.datamodule import PreferenceDataModule
from rlhf_lightning.data.preferences.datasets import PairDataset, SampleGroupDataset
from rlhf_lightning.data.preferences.pair_sampler import (
    JUDGES,
    TIE_BREAKS,
    Judge,
    auto_judge,
    check_pair_options,
    pairs_from_group,
    random_judge,
    sample_groups,
)
from rlhf_lightning.data.preferences.records import PreferencePair, SampleGroup, group_pairs, pair_groups, read_preferences
from rlhf_lightning.data.preferences.sources import JsonlPairs, PairSource, SampledPairs

__all__ = [
    "JUDGES",
    "TIE_BREAKS",
    "Judge",
    "JsonlPairs",
    "PairDataset",
    "PairSource",
    "PreferenceDataModule",
    "PreferencePair",
    "SampleGroup",
    "SampleGroupDataset",
    "SampledPairs",
    "auto_judge",
    "check_pair_options",
    "group_pairs",
    "pair_groups",
    "pairs_from_group",
    "random_judge",
    "read_preferences",
    "sample_groups",
]
