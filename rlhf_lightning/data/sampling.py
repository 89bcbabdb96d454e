"""Former name of `rlhf_lightning.data.stratum_weights`, kept for one release so that imports from here keep
working; importing it warns once."""

from __future__ import annotations

import warnings

from rlhf_lightning.data.stratum_weights import StratumWeightedSampler, check_stratum_weights, example_weights

__all__ = ["StratumWeightedSampler", "check_stratum_weights", "example_weights"]

warnings.warn(
    "rlhf_lightning.data.sampling is deprecated and will be removed in the next release: "
    "use rlhf_lightning.data.stratum_weights (StratumWeightedSampler, check_stratum_weights, example_weights)",
    DeprecationWarning,
    stacklevel=2,
)
