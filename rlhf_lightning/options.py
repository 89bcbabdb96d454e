"""Checks of a stage's options (its module's `__init__` arguments): one clear line, before any training."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigError", "check_choice"]


class ConfigError(ValueError):
    """An option has a value it cannot take; `rlhf` prints the message as one line and exits with code 2."""


def check_choice(option: str, value: object, allowed: Iterable[str]) -> None:
    """Refuse a value of a by-name option that is not one of `allowed`, naming the option, value and choices.

    >>> check_choice("loss_agg", "token_mean", ["token_mean", "seq_mean_token_mean"])  # fine
    >>> # check_choice("loss_agg", "foo", ["token_mean"]) raises
    >>> # ConfigError("model.init_args.loss_agg: unknown value 'foo'; allowed: token_mean")
    """
    allowed = sorted(allowed)
    if value not in allowed:
        raise ConfigError(f"model.init_args.{option}: unknown value {value!r}; allowed: {', '.join(allowed)}")
