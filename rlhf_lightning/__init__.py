"""rlhf-lightning: a modular RLHF trainer (SFT -> reward model -> PPO) on PyTorch Lightning.

Each stage is a LightningModule driven by `rlhf fit --config configs/<task>/<stage>.yaml`; `rlhf pipeline`
runs all three. Importing the package imports nothing heavy: submodules load on use.
"""

__version__ = "0.1.0"
