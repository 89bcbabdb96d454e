"""What a stage holds in memory before activations, as one line for its log."""

from __future__ import annotations

import lightning as L


def memory_estimate(pl_module: L.LightningModule) -> str:
    """What the stage holds in weights and training state before activations: parameters (trainable and
    frozen), their gradients, AdamW's two float32 moments per trainable parameter, and frozen models outside the
    models (`pl_module.frozen_models()`, e.g. PPO's reference and reward model), counted once."""

    def mb(n: float) -> str:
        for unit in ("B", "KB", "MB"):
            if n < 1024:
                return f"{n:,.1f} {unit}"
            n /= 1024
        return f"{n:,.1f} GB"

    frozen_models = pl_module.frozen_models() if hasattr(pl_module, "frozen_models") else []
    frozen_params = {id(p): p for m in frozen_models for p in m.parameters()}
    params = [p for p in pl_module.parameters() if id(p) not in frozen_params]
    trainable = [p for p in params if p.requires_grad]
    frozen = sum(p.numel() * p.element_size() for p in frozen_params.values())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = sum(2 * p.numel() * 4 for p in trainable)
    return (
        f"memory before activations: parameters {mb(weights)} ({sum(p.numel() for p in trainable):,} trainable of "
        f"{sum(p.numel() for p in params):,}), gradients {mb(grads)}, optimizer state {mb(optimizer)}, frozen models {mb(frozen)}"
    )
