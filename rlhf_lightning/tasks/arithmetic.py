"""The toy arithmetic task: prompts, gold answers, the judge, and the fixed splits.

Prompts are ``"Q: {a}{op}{b}=\\nA:"`` with operands ``0..max_operand`` (default 99), ``op`` ``+`` or ``-``
and never a negative result; 15,050 distinct prompts at 99. The completion is exactly the decimal answer
(no leading zeros, no space); the tokenizer appends EOS.

Splits (``train`` 90%, ``val`` 5%, ``test`` 5%) come from a SHA-256 of the prompt text alone, so every
stage and DataModule agrees on them whatever its seed or settings.

The ``seed`` preset is the seed notebook's eight prompts and answers; it has no held-out split, so
:func:`task_problems` returns all eight for every split.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "ALPHABET",
    "DEFAULT_MAX_OPERAND",
    "EVAL_MAX_NEW_TOKENS",
    "Problem",
    "SEED_PROBLEMS",
    "SPLITS",
    "TASKS",
    "demonstration_problems",
    "format_prompt",
    "gold_answer",
    "judge",
    "problems",
    "split_of",
    "task_problems",
]

DEFAULT_MAX_OPERAND = 99
SPLITS: tuple[str, ...] = ("train", "val", "test")
TASKS: tuple[str, ...] = ("toy", "seed", "toy_chat")  # toy_chat: the toy problems as conversations (tasks.chat)
#: The completion budget the tasks are evaluated with: the longest answer (3 digits, 99+99) and EOS, and two
#: tokens to spare, so a wrong longer answer is still read to its end.
EVAL_MAX_NEW_TOKENS = 6

#: Every character a toy prompt or answer uses (sorted, unique).
ALPHABET: str = "".join(sorted(set("0123456789" + "Q: +-=\nA")))

_SPLIT_BUCKETS = 1000
_TRAIN_END = 900  # buckets [0, 900) -> train
_VAL_END = 950  # buckets [900, 950) -> val; [950, 1000) -> test

_PROMPT_RE = re.compile(r"Q: (0|[1-9][0-9]*)([+-])(0|[1-9][0-9]*)=\nA:")


@dataclass(frozen=True)
class Problem:
    """One prompt and its gold completion text (without EOS)."""

    prompt: str
    answer: str


#: The seed's exact prompts and gold answers, in the seed's order.
SEED_PROBLEMS: tuple[Problem, ...] = (
    Problem("Q: 2+3=\nA:", "5"),
    Problem("Q: 1+4=\nA:", "5"),
    Problem("Q: 4+4=\nA:", "8"),
    Problem("Q: 3+2=\nA:", "5"),
    Problem("Q: 5+0=\nA:", "5"),
    Problem("Q: 6-1=\nA:", "5"),
    Problem("Q: 7-2=\nA:", "5"),
    Problem("Q: 9-4=\nA:", "5"),
)


def format_prompt(a: int, op: str, b: int) -> str:
    """The toy prompt text for ``a op b``."""
    return f"Q: {a}{op}{b}=\nA:"


def _hash_unit(text: str, salt: str) -> int:
    """A stable 64-bit integer from SHA-256 of ``salt`` and ``text`` (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def split_of(prompt: str) -> str:
    """``"train"`` (90%), ``"val"`` (5%) or ``"test"`` (5%), fixed by a hash of the prompt text."""
    bucket = _hash_unit(prompt, "split") % _SPLIT_BUCKETS
    if bucket < _TRAIN_END:
        return "train"
    if bucket < _VAL_END:
        return "val"
    return "test"


def _check_max_operand(max_operand: int) -> None:
    if isinstance(max_operand, bool) or not isinstance(max_operand, int) or max_operand < 0:
        raise ValueError(f"max_operand must be a non-negative integer, got {max_operand!r}")


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or None")


@lru_cache(maxsize=8)
def _all_problems(max_operand: int) -> tuple[tuple[Problem, str], ...]:
    out: list[tuple[Problem, str]] = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            for op in ("+", "-"):
                if op == "-" and a < b:
                    continue
                result = a + b if op == "+" else a - b
                prompt = format_prompt(a, op, b)
                out.append((Problem(prompt, str(result)), split_of(prompt)))
    return tuple(out)


def problems(split: str | None = None, max_operand: int = DEFAULT_MAX_OPERAND) -> list[Problem]:
    """All toy problems of ``split`` (``None``: every split), in a fixed order (a, then b, then ``+``/``-``)."""
    _check_max_operand(max_operand)
    _check_split(split)
    return [p for p, s in _all_problems(max_operand) if split is None or s == split]


def demonstration_problems(
    fraction: float, seed: int = 0, max_operand: int = DEFAULT_MAX_OPERAND
) -> list[Problem]:
    """The ``train`` problems that have SFT demonstrations: ``round(fraction * len(train))`` of them.

    Chosen by a hash of (``seed``, prompt): the same arguments always give the same set, and for a fixed
    ``seed`` a larger fraction gives a superset of a smaller one. Returned in :func:`problems` order.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    train = problems("train", max_operand)
    if not train:
        return []
    k = max(1, round(fraction * len(train)))
    if k >= len(train):
        return train
    salt = f"demo:{seed}"
    ranked = sorted(range(len(train)), key=lambda i: (_hash_unit(train[i].prompt, salt), train[i].prompt))
    chosen = set(ranked[:k])
    return [p for i, p in enumerate(train) if i in chosen]


def gold_answer(prompt: str) -> str | None:
    """The gold answer of a toy prompt (any non-negative operands), or ``None`` if it is not one."""
    if not isinstance(prompt, str):
        return None
    m = _PROMPT_RE.fullmatch(prompt)
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    result = a + b if op == "+" else a - b
    if result < 0:
        return None
    return str(result)


def judge(completion: str, gold: str, ended_with_eos: bool) -> float:
    """1.0 iff the completion ended with EOS and its text (before EOS) with all spaces removed equals
    ``gold`` exactly; else 0.0. ``"123"`` is wrong for gold ``"12"``."""
    if not ended_with_eos:
        return 0.0
    return 1.0 if completion.replace(" ", "") == gold else 0.0


def judge_scores(completions: Sequence[str], golds: Sequence[str | None], ended: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """`judge` on every row: float32 (B,), NaN where no gold answer is known. Every judged batch goes here.

    >>> judge_scores(["5", "6", "5"], ["5", "5", None], [True, True, True])
    tensor([1., 0., nan])
    """
    ended = ended.tolist() if isinstance(ended, torch.Tensor) else list(ended)
    scores = [math.nan if g is None else judge(c, g, bool(e)) for c, g, e in zip(completions, golds, ended)]
    return torch.tensor(scores, dtype=torch.float32)


def task_problems(task: str, split: str | None = None) -> list[Problem]:
    """Problems of a named task: ``"toy"`` uses the hash split; ``"seed"`` returns its 8 problems for every
    split (it has no held-out split)."""
    _check_split(split)
    if task in ("toy", "toy_chat"):
        return problems(split)
    if task == "seed":
        return list(SEED_PROBLEMS)
    raise ValueError(f"unknown task {task!r}; expected one of: {', '.join(TASKS)}")
