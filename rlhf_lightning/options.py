"""Checks of a stage's options (its module's and DataModule's `__init__` arguments, `rlhf eval`'s and
`rlhf pipeline`'s flags): one clear line, before any training.

Each check names the option as the user writes it: `prefix` + name, `model.init_args.` unless told otherwise
(`data.init_args.`, `data.init_args.pairs.init_args.`, `--` for a command's flag).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["DATA", "MODEL", "PAIRS", "SEED_MAX", "ConfigError", "check_choice", "check_lora", "check_number"]

MODEL = "model.init_args."
DATA = "data.init_args."
PAIRS = "data.init_args.pairs.init_args."
SEED_MAX = 2**32 - 1  # seeds as Lightning's `seed_everything` takes them (numpy's range)


class ConfigError(ValueError):
    """An option has a value it cannot take; `rlhf` prints the message as one line and exits with code 2."""


def check_choice(option: str, value: object, allowed: Iterable[str | None], prefix: str = MODEL) -> None:
    """Refuse a value of a by-name option that is not one of `allowed`, naming the option, value and choices
    (None among `allowed`: the option may be null).

    >>> check_choice("loss_agg", "token_mean", ["token_mean", "seq_mean_token_mean"])  # fine
    >>> check_choice("loss_agg", "foo", ["token_mean", "seq_mean_token_mean"])
    Traceback (most recent call last):
    rlhf_lightning.options.ConfigError: model.init_args.loss_agg: unknown value 'foo'; allowed: seq_mean_token_mean, token_mean
    """
    allowed = list(allowed)
    if value is None and None in allowed or value is not None and value in allowed:
        return
    names = sorted(str(a) for a in allowed if a is not None) + (["null"] if None in allowed else [])
    raise ConfigError(f"{prefix}{option}: unknown value {value!r}; allowed: {', '.join(names)}")


def check_number(
    option: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    allow_none: bool | str = False,
    prefix: str = MODEL,
) -> None:
    """Refuse a numeric option's value outside [low, high] (`low_open` / `high_open`: that bound excluded), NaN,
    infinities, a bool, a non-number, or a non-integer where `integer`; None only where `allow_none`: a string
    says what null means in the message, True lets None pass unmentioned (a command's flag left out).

    >>> check_number("temperature", 0.7, low=0, low_open=True)  # fine
    >>> check_number("temperature", 0, low=0, low_open=True)
    Traceback (most recent call last):
    rlhf_lightning.options.ConfigError: model.init_args.temperature: 0 is not allowed; allowed: a number > 0
    >>> check_number("micro_batch_size", float("nan"), low=1, integer=True, allow_none="all rows at once")
    Traceback (most recent call last):
    rlhf_lightning.options.ConfigError: model.init_args.micro_batch_size: nan is not allowed; allowed: an integer >= 1, or null (all rows at once)
    >>> check_number("min_lr_ratio", float("inf"), low=0, high=1)
    Traceback (most recent call last):
    rlhf_lightning.options.ConfigError: model.init_args.min_lr_ratio: inf is not allowed; allowed: a number in [0, 1]
    """
    if value is None and allow_none is not False:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fine = (
        number
        and math.isfinite(value)
        and (not integer or isinstance(value, int))
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if fine:
        return
    what = "an integer" if integer else "a number"
    if low is not None and high is not None:
        what += f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        what += f" {'>' if low_open else '>='} {low}"
    elif high is not None:
        what += f" {'<' if high_open else '<='} {high}"
    if isinstance(allow_none, str):
        what += f", or null ({allow_none})"
    shown = value if number else repr(value)
    raise ConfigError(f"{prefix}{option}: {shown} is not allowed; allowed: {what}")


def check_lora(lora: object, prefix: str = MODEL) -> None:
    """The numbers of a `lora` option: `r` an integer >= 1, `alpha` a number > 0, `dropout` in [0, 1) (its keys
    and `target_modules` are `lora.lora_settings`'s to check).

    >>> check_lora({"r": 4, "alpha": 8, "dropout": 0.1})  # fine
    >>> check_lora({"r": 4, "dropout": "high"})
    Traceback (most recent call last):
    rlhf_lightning.options.ConfigError: model.init_args.lora.dropout: 'high' is not allowed; allowed: a number in [0, 1)
    """
    if not isinstance(lora, dict):
        return  # None (no adapters), or refused by `lora_settings` as not a mapping
    check_number("lora.r", lora.get("r", 8), low=1, integer=True, prefix=prefix)
    check_number("lora.alpha", lora.get("alpha", 1.0), low=0, low_open=True, prefix=prefix)
    check_number("lora.dropout", lora.get("dropout", 0.0), low=0, high=1, high_open=True, prefix=prefix)
