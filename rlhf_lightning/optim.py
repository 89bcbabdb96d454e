"""AdamW with linear warm-up then cosine decay, shared by every stage."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), fused: bool = True) -> torch.optim.AdamW:
    """No weight decay on biases, norms and embeddings' 1-D parameters (nanoGPT's grouping).

    `fused`: one kernel over every parameter where they are on a CPU or CUDA device, 4.5x faster than the
    per-parameter loop on CPU for the toy model (1.05 -> 0.23 ms a step) and for an 85M one (262 -> 57 ms); the
    same update up to float rounding. False: the multi-tensor (`foreach`) implementation, bitwise the
    per-parameter loop's update (tested) and 1.35x faster on the toy model (0.78 ms).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = fused and bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None, foreach=None if fused else True)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Factor 0 -> 1 linearly over `warmup_steps`, then cosine down to `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_warmup_cosine(opt, model: nn.Module, total_steps: int | float) -> dict:
    """`configure_optimizers` result for `opt` (`option_groups.OptimConfig`: lr, weight_decay, warmup_steps,
    min_lr_ratio): the cosine ends at `total_steps` (the trainer's `estimated_stepping_batches`)."""
    # not fused: the shipped SFT and reward recipes were tuned on the per-parameter loop's rounding, which the
    # foreach implementation keeps bitwise (with the fused kernel the toy pipeline's SFT ends at test 0.9973
    # instead of 1.0000, its reward model at 0.9732)
    optimizer = adamw(model, opt.lr, opt.weight_decay, fused=False)
    scheduler = warmup_cosine(optimizer, opt.warmup_steps, max(1, int(total_steps)), opt.min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
