"""The LightningModules: one per stage, on one base (`stage.StageModule`).

Each is imported when first asked for, so `rlhf fit` of one stage does not import the others."""

from __future__ import annotations

__all__ = ["DPOModule", "PPOModule", "RewardModule", "SFTModule", "StageModule"]


def __getattr__(name: str):
    if name == "SFTModule":
        from rlhf_lightning.modules.sft import SFTModule

        return SFTModule
    if name == "RewardModule":
        from rlhf_lightning.modules.reward import RewardModule

        return RewardModule
    if name == "PPOModule":
        from rlhf_lightning.modules.ppo import PPOModule

        return PPOModule
    if name == "DPOModule":
        from rlhf_lightning.modules.dpo import DPOModule

        return DPOModule
    if name == "StageModule":
        from rlhf_lightning.modules.stage import StageModule

        return StageModule
    raise AttributeError(f"module 'rlhf_lightning.modules' has no attribute {name!r}")
