"""Preference records: a pair, the judged completions of one prompt, the JSONL reader, and the conversions
between pairs and groups.

A file holds TRL-style lines ``{"prompt", "chosen", "rejected"[, "margin"]}``; our generated files add
``chosen_ended`` / ``rejected_ended`` (did the completion emit EOS; default true), so they can be read back
as they are; a completion may be empty only where its ``*_ended`` field is given (EOS right away).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from rlhf_lightning.data.jsonl import DataError, read_jsonl
from rlhf_lightning.tasks.arithmetic import gold_answer, judge_scores

__all__ = ["PreferencePair", "SampleGroup", "group_pairs", "pair_groups", "read_preferences"]


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


def group_pairs(groups: list[SampleGroup]) -> list[PreferencePair]:
    """Every pair of every group, as `PreferencePair`s (chosen first)."""
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
