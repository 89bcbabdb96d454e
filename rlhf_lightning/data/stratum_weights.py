"""Drawing examples by stratum: per-stratum weights, and a sampler that draws an epoch by them.

An example's weight is the product of the weights of its strata (1 for a stratum without one), so
``{"digits/1+1": 8}`` makes each single-digit problem 8 times as likely to be drawn as before, whatever its
operation. The sampler draws as many examples per epoch as the dataset holds, so an epoch costs the same.
SFT draws its demonstrations through it (`stratum_weights`); any DataModule with per-example strata can.
Formerly `rlhf_lightning.data.sampling`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from rlhf_lightning.data.base import ResumableRandomSampler
from rlhf_lightning.data.jsonl import DataError

__all__ = ["StratumWeightedSampler", "check_stratum_weights", "example_weights"]


def check_stratum_weights(weights: Mapping[str, float] | None, option: str) -> dict[str, float]:
    """``weights`` as a plain dict; a name that is not a string or a weight that is not a finite number > 0
    is a :class:`DataError` naming ``option``."""
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise DataError(f"expected a mapping of stratum name to weight, got {weights!r}", path=option)
    out = {}
    for name, w in weights.items():
        if not isinstance(name, str) or not name:
            raise DataError(f"stratum names are non-empty strings, got {name!r}", path=option)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise DataError(f"stratum {name!r}: expected a finite weight > 0, got {w!r}", path=option)
        out[name] = float(w)
    return out


def example_weights(
    strata: Sequence[Sequence[str]], weights: Mapping[str, float], option: str = "stratum_weights", known: Sequence[str] = ()
) -> torch.Tensor:
    """Per example (N,): the product of ``weights`` of its strata. A weighted stratum that is neither in
    ``known`` (the task's strata) nor one that an example belongs to is a :class:`DataError` naming ``option``
    (a misspelt name would otherwise do nothing).

    >>> example_weights([("a", "x"), ("b", "x"), ("b", "y")], {"b": 2.0, "y": 3.0}).tolist()
    [1.0, 2.0, 6.0]
    """
    present = {name for row in strata for name in row} | set(known)
    missing = sorted(set(weights) - present)
    if missing:
        known = ", ".join(sorted(present)) or "none"
        raise DataError(f"no example belongs to stratum {missing[0]!r} (strata: {known})", path=option)
    return torch.tensor([math.prod(weights.get(name, 1.0) for name in row) for row in strata], dtype=torch.float64)


class StratumWeightedSampler(ResumableRandomSampler):
    """``len(weights)`` indices per epoch, drawn with replacement with probability proportional to ``weights``.

    Each epoch's draw comes from a seed taken from torch's global RNG when the epoch's iteration starts (so
    ``seed_everything`` fixes every epoch). The epoch's ``seed`` and ``resume(seed, start)`` are the resumable
    shuffle's: the next iteration continues that epoch's draw at index ``start``. Under several processes the
    DataModule deals each epoch's draw (`epoch_order`, seeded by `seed + epoch` instead) to the ranks through a
    `ResumableDistributedSampler`, which resumes the same way.
    """

    def __init__(self, weights: torch.Tensor) -> None:
        if weights.ndim != 1 or len(weights) == 0 or not bool((weights > 0).all()):
            raise ValueError("weights must be a non-empty 1-D tensor of positive numbers")
        super().__init__(len(weights))
        self.weights = weights  # (N,)

    def draw_epoch_seed(self) -> int:
        return int(torch.empty((), dtype=torch.int64).random_().item())  # one draw: no DataLoader seed to mirror

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator)  # (N,)
