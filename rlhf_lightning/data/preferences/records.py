"""Preference records: a pair, the judged completions of one prompt, the JSONL reader, and the conversions
between pairs and groups.

A file holds TRL-style lines ``{"prompt", "chosen", "rejected"[, "margin"]}``; our generated files add
``chosen_ended`` / ``rejected_ended`` (did the completion emit EOS; default true), so they can be read back
as they are; a completion may be empty only where its ``*_ended`` field is given (EOS right away).

Conversational pairs (detected per file) come in TRL's two forms: ``{"prompt": [messages ending in a user turn],
"chosen": [one assistant message], "rejected": [one assistant message]}``, or the implicit-prompt form
``{"chosen": [...], "rejected": [...]}``, two whole conversations that share every message but their last
assistant reply. A pair keeps the prompt's messages until `render_pair` renders them with the tokenizer's chat
template (the `PreferenceDataModule` does, in `setup`); until then `prompt` is the last user turn's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from rlhf_lightning.data.conversations import Messages, check_messages, check_reply, last_user_text, render_prompt, split_implicit_prompt
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.sources import RecordSpec, SourceOptions, data_error, read_rows
from rlhf_lightning.tasks.arithmetic import gold_answer, judge_scores
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["PreferencePair", "SampleGroup", "group_pairs", "pair_groups", "read_preferences", "render_group", "render_pair"]

PREFERENCE_RECORDS = RecordSpec(
    flat_required=("prompt", "chosen", "rejected"), chat_required=("chosen", "rejected"), chat_fields=("prompt",),
    optional={"margin": (int, float), "chosen_ended": bool, "rejected_ended": bool}, non_empty=False,
)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None  # TRL's optional margin: the loss wants r_chosen - r_rejected >= margin
    chosen_ended: bool = True  # the completion emitted EOS (scored with EOS appended)
    rejected_ended: bool = True
    where: str = ""  # "file:line" or "task:split", for error messages
    messages: Messages | None = None  # a conversational prompt's turns, until `render_pair` renders them

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
    messages: Messages | None = None  # a conversational prompt's turns, until `render_group` renders them


def read_preferences(path: str, options: SourceOptions | None = None) -> list[PreferencePair]:
    """Validated pairs of a file (JSONL, or a `datasets` source read with `options`), flat or conversational;
    errors name the file, the line (or row) and the field."""
    source = read_rows(path, PREFERENCE_RECORDS, options)
    pairs = []
    for where, r in source.rows:
        if source.conversational:
            r = {**r, **_conversational_pair(where, r)}
        else:
            for name in ("prompt", "chosen", "rejected"):
                # a sampled completion may be empty (EOS right away); our files say so with "<name>_ended"
                if not r[name].strip() and f"{name}_ended" not in r:
                    raise data_error(f"expected a non-empty string, got {json.dumps(r[name])}", where, name)
        chosen_ended, rejected_ended = r.get("chosen_ended", True), r.get("rejected_ended", True)
        if r["chosen"] == r["rejected"] and chosen_ended == rejected_ended:
            raise data_error("identical to 'chosen': a pair must compare two different completions", where, "rejected")
        margin = r.get("margin")
        pairs.append(PreferencePair(
            r["prompt"], r["chosen"], r["rejected"], None if margin is None else float(margin),
            chosen_ended, rejected_ended, where, r.get("messages"),
        ))
    return pairs


def _conversational_pair(where: str, r: dict) -> dict:
    """prompt (its last user turn's text), messages, chosen and rejected (the replies' texts) of a conversational record."""
    if "prompt" in r:
        messages = check_messages(r["prompt"], where, "prompt", ends_with="user")
        replies = []
        for name in ("chosen", "rejected"):
            reply = check_messages(r[name], where, name, ends_with="assistant", roles=("assistant",))
            if len(reply) != 1:
                raise DataError(f"expected one assistant message, got {len(reply)}", where, None, name)
            replies.append(reply[0]["content"])
        chosen, rejected = replies
    else:
        messages, chosen, rejected = split_implicit_prompt(
            check_messages(r["chosen"], where, "chosen"), check_messages(r["rejected"], where, "rejected"), where
        )
        if messages[-1]["role"] != "user":
            raise DataError("the replies must follow a user turn", where, None, f"chosen[{len(messages)}]")
    return {"prompt": last_user_text(messages), "messages": messages, "chosen": chosen, "rejected": rejected}


def render_pair(tokenizer: Tokenizer, pair: PreferencePair) -> PreferencePair:
    """The pair with a conversational prompt rendered by the tokenizer's chat template (idempotent); the template
    must write each reply as prompt + reply + EOS (`check_reply`)."""
    if pair.messages is None:
        return pair
    prompt = render_prompt(tokenizer, pair.messages, pair.where)
    for name, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        check_reply(tokenizer, pair.messages, prompt, reply, pair.where, name)
    return replace(pair, prompt=prompt, messages=None)


def render_group(tokenizer: Tokenizer, group: SampleGroup) -> SampleGroup:
    """The group with a conversational prompt rendered by the tokenizer's chat template (idempotent)."""
    if group.messages is None:
        return group
    return replace(group, prompt=render_prompt(tokenizer, group.messages, group.where), messages=None)


def group_pairs(groups: list[SampleGroup]) -> list[PreferencePair]:
    """Every pair of every group, as `PreferencePair`s (chosen first)."""
    return [
        PreferencePair(g.prompt, g.completions[i], g.completions[j], None, g.ended[i], g.ended[j], g.where, g.messages)
        for g in groups for i, j in g.pairs
    ]


def pair_groups(pairs: list[PreferencePair]) -> list[SampleGroup]:
    """Each pair as a group of its two completions (labels from the task judge where the prompt has one)."""
    groups = []
    for p in pairs:
        gold = gold_answer(p.prompt)
        completions, ended = [p.chosen, p.rejected], [p.chosen_ended, p.rejected_ended]
        labels = judge_scores(completions, [gold, gold], ended).tolist()
        groups.append(SampleGroup(p.prompt, gold, completions, ended, [1.0, 0.0], labels, p.where, [(0, 1)], p.messages))
    return groups
