"""Former name of `rlhf_lightning.data.rollout_prompts`, kept for one release so that configs naming
`rlhf_lightning.data.ppo.PromptDataModule` and imports from here keep working; importing it warns once."""

from __future__ import annotations

import warnings

from rlhf_lightning.data.rollout_prompts import PromptDataModule, PromptStream

__all__ = ["PromptDataModule", "PromptStream"]

warnings.warn(
    "rlhf_lightning.data.ppo is deprecated and will be removed in the next release: "
    "use rlhf_lightning.data.rollout_prompts (PromptDataModule, PromptStream)",
    DeprecationWarning,
    stacklevel=2,
)
