"""The LightningModules: one per stage."""

from rlhf_lightning.modules.sft import SFTModule

__all__ = ["SFTModule"]
