"""Strata: named subsets of prompts, so accuracy can be reported (and demonstrations drawn) per kind of problem.

A prompt belongs to one stratum per dimension. Names are ``"<dimension>/<value>"``, readable as TensorBoard tags
(``eval/accuracy/digits/1+2``) and table rows. The toy task has three dimensions:

- ``digits/<a>+<b>``: the operands' lengths in digits (``digits/1+1``, ``digits/1+2``, ``digits/2+1``,
  ``digits/2+2``), whatever the operation;
- ``op/+`` or ``op/-``;
- ``carry/yes`` or ``carry/no``: whether any column carries (``+``) or borrows (``-``).

A JSONL record may name its stratum in an optional string field ``group``, for any task; it then replaces the
task's strata (one dimension, named as written). A prompt that is not a toy prompt and has no ``group`` has
no stratum.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

__all__ = ["TOY_STRATA", "arithmetic_strata", "prompt_strata", "strata_metrics", "task_strata_names", "worst_stratum"]

_PROMPT_RE = re.compile(r"Q: (0|[1-9][0-9]*)([+-])(0|[1-9][0-9]*)=\nA:")

#: Every stratum of the toy task (operands 0..99), in report order.
TOY_STRATA: tuple[str, ...] = (
    "digits/1+1", "digits/1+2", "digits/2+1", "digits/2+2",
    "op/+", "op/-",
    "carry/yes", "carry/no",
)


def _regroups(a: int, op: str, b: int) -> bool:
    """Whether column-wise ``a op b`` carries (``+``) or borrows (``-``) in any column."""
    carry = 0
    while a or b:
        da, db = a % 10, b % 10
        column = da + db + carry if op == "+" else da - db - carry
        carry = int(column >= 10) if op == "+" else int(column < 0)
        if carry:
            return True
        a, b = a // 10, b // 10
    return False


def arithmetic_strata(prompt: str) -> tuple[str, ...]:
    """The toy strata of an arithmetic prompt, one per dimension; ``()`` if it is not one.

    >>> arithmetic_strata("Q: 7+15=\\nA:")
    ('digits/1+2', 'op/+', 'carry/yes')
    >>> arithmetic_strata("Q: 40-3=\\nA:")
    ('digits/2+1', 'op/-', 'carry/yes')
    """
    m = _PROMPT_RE.fullmatch(prompt) if isinstance(prompt, str) else None
    if m is None:
        return ()
    a, op, b = m.group(1), m.group(2), m.group(3)
    regroups = _regroups(int(a), op, int(b))
    return (f"digits/{len(a)}+{len(b)}", f"op/{op}", f"carry/{'yes' if regroups else 'no'}")


def prompt_strata(prompt: str, group: str | None = None) -> tuple[str, ...]:
    """``(group,)`` when a record names its group, else the prompt's arithmetic strata (``()`` if none)."""
    return (group,) if group is not None else arithmetic_strata(prompt)


def task_strata_names(task: str) -> tuple[str, ...]:
    """Strata always reported for a task, even with no prompts (n = 0): the toy strata for arithmetic tasks."""
    return TOY_STRATA if task in ("toy", "seed", "toy_chat") else ()


def strata_metrics(
    scores: Sequence[float],
    strata: Sequence[Sequence[str]],
    rewards: Sequence[float] | None = None,
    names: Iterable[str] = (),
) -> dict[str, dict[str, float | int | None]]:
    """Per stratum: ``n`` (prompts), ``accuracy`` (mean score over its prompts with a known score) and, with
    ``rewards``, ``reward`` (mean reward over its prompts).

    ``scores`` (B,) holds 1.0/0.0 per prompt, NaN where no gold answer is known; ``strata`` (B,) the names of
    each prompt's strata; ``names`` are strata reported even when empty. An empty mean is ``None`` (no
    division by zero). Strata come in the order of ``names``, then in order of first appearance.

    >>> strata_metrics([1.0, 0.0, 1.0], [("a", "x"), ("a", "y"), ("b", "x")], names=["a", "b", "c"])["a"]
    {'n': 2, 'accuracy': 0.5}
    """
    scores = [float(s) for s in scores]
    if len(strata) != len(scores) or (rewards is not None and len(rewards) != len(scores)):
        raise ValueError(f"{len(scores)} scores, {len(strata)} strata and {'no' if rewards is None else len(rewards)} rewards")
    totals: dict[str, list[float]] = {name: [0, 0, 0.0, 0.0] for name in names}  # n, known, correct, reward sum
    for i, (score, row_strata) in enumerate(zip(scores, strata)):
        for name in row_strata:
            t = totals.setdefault(name, [0, 0, 0.0, 0.0])
            t[0] += 1
            if not math.isnan(score):
                t[1] += 1
                t[2] += score
            if rewards is not None:
                t[3] += float(rewards[i])
    out: dict[str, dict[str, float | int | None]] = {}
    for name, (n, known, correct, reward) in totals.items():
        out[name] = {"n": n, "accuracy": correct / known if known else None}
        if rewards is not None:
            out[name]["reward"] = reward / n if n else None
    return out


def worst_stratum(metrics: dict[str, dict], min_n: int = 5) -> str | None:
    """The name of the stratum with the lowest accuracy among those with at least ``min_n`` prompts (ties: the
    first in ``metrics`` order); ``None`` if no stratum qualifies.

    >>> worst_stratum({"a": {"n": 9, "accuracy": 0.5}, "b": {"n": 2, "accuracy": 0.0}, "c": {"n": 5, "accuracy": 0.9}})
    'a'
    """
    eligible = [(m["accuracy"], i, name) for i, (name, m) in enumerate(metrics.items()) if m["n"] >= min_n and m["accuracy"] is not None]
    return min(eligible)[2] if eligible else None
