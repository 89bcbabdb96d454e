"""Former name of `rlhf_lightning.completions`, kept for one release so that imports from here keep working;
importing it warns once."""

from __future__ import annotations

import warnings

from rlhf_lightning.completions import complete

__all__ = ["complete"]

warnings.warn(
    "rlhf_lightning.sampling is deprecated and will be removed in the next release: use rlhf_lightning.completions (complete)",
    DeprecationWarning,
    stacklevel=2,
)
