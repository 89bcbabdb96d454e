"""PPO's learned value function over plain models: built from the reward model or the policy, read at every
completion token, and the GAE advantages and returns of a rollout (`rollout.advantage: gae`).

The critic is a `models.reward.RewardModel` (a transformer backbone and a scalar head) whose head reads every
position instead of the last one: the value of completion token t is the head at the position that predicts it,
the state before the token is chosen, aligned with the policy's log-probs (TRL's and verl's convention). Nothing
here knows Lightning: `PPOModule` builds the critic once (`build_critic`) and the rollout and the update call the
functions below.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn as nn

from rlhf_lightning.checkpoints import sha256_file
from rlhf_lightning.distributed import gather_uneven_rows, max_over_ranks
from rlhf_lightning.lora import add_reward_adapters, lora_settings, require_peft
from rlhf_lightning.losses import explained_variance, gae, logprobs_from_logits, masked_mean, masked_whiten, token_level_rewards
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.option_groups import CriticConfig
from rlhf_lightning.options import MODEL, ConfigError
from rlhf_lightning.padding import pad_columns
from rlhf_lightning.scoring import load_reward_model
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["build_critic", "completion_values", "critic_advantages", "critic_metrics", "read_values_as_forward"]

CRITIC = f"{MODEL}critic"


def completion_values(critic: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int) -> torch.Tensor:
    """Values (B, N) of the last `completion_len` tokens of prompt ++ completion rows (B, P + N): the head at each
    completion token's preceding position, in float32. Rows past a completion's end hold values of padding: the
    caller masks them.

    A reward model with the likelihood feature scores ``head(h) + lm_scale * sum of the completion's log-likelihood``;
    its value at token t reads the same way on what is known before the token is chosen: the head at the state,
    plus `lm_scale` times the log-likelihood of the completion tokens before t.

    A critic sharded by FSDP2 reads them inside its forward hooks (`read_values_as_forward`)."""
    sharded = getattr(critic, "sharded_values", None)
    if sharded is not None:
        return sharded(input_ids, attention_mask, completion_len)
    return _values(critic, input_ids, attention_mask, completion_len)


def _values(critic: RewardModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_len: int) -> torch.Tensor:
    hidden = critic.backbone(input_ids, attention_mask)  # (B, T, C)
    states = hidden[:, -completion_len - 1 : -1]  # (B, N, C) the state before each completion token
    values = critic.head(states).squeeze(-1).float()  # (B, N)
    if getattr(critic, "lm_feature", False):
        logp = logprobs_from_logits(critic.lm_head(states), input_ids[:, -completion_len:]).float()  # (B, N) of token t
        values = values + critic.lm_scale * (torch.cumsum(logp, dim=1) - logp)  # the tokens before t
    return values


def read_values_as_forward(critic: RewardModel) -> None:
    """Make `completion_values` of a critic sharded by FSDP2 run as its forward: the values read its backbone and
    head, not `forward`, and FSDP2 gathers the root's own weights (embeddings, head, `lm_scale`) and registers their
    gradients' reduce-scatter only around a forward (`register_fsdp_forward_method`). Nothing changes unsharded."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(critic, FSDPModule) and not hasattr(critic, "sharded_values"):
        critic.sharded_values = types.MethodType(_values, critic)
        register_fsdp_forward_method(critic, "sharded_values")


def build_critic(
    cfg: CriticConfig, reward_ckpt: str | None, policy: nn.Module, policy_meta: dict[str, Any], tokenizer: Tokenizer, context: int,
    normalize: bool = True,
) -> tuple[RewardModel, dict[str, Any]]:
    """(the critic, its record for the checkpoint: init, source path and SHA-256) for a policy of `context` tokens.

    `init: reward` reads `cfg.ckpt` (else `reward_ckpt`) as a reward checkpoint, whose tokenizer must be the
    policy's; with `normalize` (the learned reward's `reward.normalize`) its head is rescaled by the mean and std the
    checkpoint recorded, so the critic starts out predicting the reward in the units PPO is given. `init: policy`
    puts the policy's transformer (a "gpt" policy: the built-in model) under a fresh head. With `cfg.lora` only
    adapters and the head train. Every refusal is one line naming the option."""
    if cfg.init == "reward":
        path = cfg.ckpt or reward_ckpt
        if path is None:
            raise ConfigError(f"{CRITIC}.ckpt: init 'reward' needs a reward checkpoint: set critic.ckpt, or reward.ckpt with a learned reward")
        role = f"{CRITIC}.ckpt" if cfg.ckpt else f"{MODEL}reward.ckpt"
        critic, critic_tokenizer, meta = load_reward_model(path, role=role)
        if critic_tokenizer != tokenizer:
            raise ConfigError(f"{role}: {str(path)!r} has another tokenizer than the policy's; a critic reads the policy's token ids (use init: policy)")
        if critic.pooled:
            raise ConfigError(f"{role}: {str(path)!r} is a {critic.kind!r} reward model, which pools the sequence; a critic needs a value per token (a 'gpt' or 'hf' backbone)")
        if normalize:  # value = (score - mean) / std: the head's weight and bias, rescaled
            mean, std = float(meta.get("reward_mean", 0.0)), float(meta.get("reward_std", 1.0))
            head = critic.head
            if head.bias is None:  # an HF classifier's head: a bias to carry the shift
                critic.head = nn.Linear(head.in_features, 1, dtype=head.weight.dtype, device=head.weight.device)
                with torch.no_grad():
                    critic.head.weight.copy_(head.weight)
                    critic.head.bias.zero_()
            with torch.no_grad():
                critic.head.weight.div_(std)
                critic.head.bias.sub_(mean).div_(std)
                if critic.lm_feature:
                    critic.lm_scale.div_(std)
        source = {"path": str(path), "sha256": sha256_file(path)}
    else:
        kind = policy_meta["model"].get("type", "gpt")
        if kind != "gpt":
            raise ConfigError(f"{CRITIC}.init: 'policy' builds on the built-in transformer, this policy is {kind!r}; initialize from a reward model of it (init: reward)")
        config = {k: v for k, v in policy_meta["model"].items() if k != "type"}
        critic = RewardModel({"type": "gpt", **config})
        critic.load_backbone({k: v.detach() for k, v in policy.state_dict().items()})
        source = {"path": None, "sha256": None}
    if critic.block_size < context:
        raise ConfigError(f"{CRITIC}: the critic reads {critic.block_size} tokens, the policy's rows are up to {context}")
    if cfg.lora is not None:
        require_peft(f"{CRITIC}.lora")
        critic.requires_grad_(False)
        add_reward_adapters(critic, lora_settings(cfg.lora, option=f"{CRITIC}.lora"), option=f"{CRITIC}.lora")
        critic.head.requires_grad_(True)
    else:
        critic.requires_grad_(True)
    if getattr(critic, "lm_feature", False):  # the likelihood feature's LM head stays the policy's; its scale trains
        critic.lm_head.requires_grad_(False)
    return critic.train(), {"init": cfg.init, **source}


def _padded_global(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], slice]:
    """Every rank's (B, N) rows of `mask` and of each of `tensors`, padded to the widest N and stacked (rank 0 first),
    gathered in one collective, with this rank's rows' slice: the global batch a statistic is taken over, the same in
    one process and under data parallelism (ranks may hold different numbers of rows)."""
    width = int(max_over_ranks(torch.tensor(mask.size(1), device=mask.device)))
    columns = [pad_columns(t, width, 0.0) for t in (mask.to(tensors[0].dtype), *tensors)]
    gathered, own = gather_uneven_rows(torch.stack(columns, 1))  # (W * B, 1 + len(tensors), N_max)
    gathered = gathered.unbind(1)
    return gathered[0].bool(), list(gathered[1:]), own


def critic_advantages(
    scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cfg: CriticConfig, kl_tokens: torch.Tensor | None = None, beta: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, N), of this rank's rows: GAE (`losses.gae`) over the per-token rewards
    (`losses.token_level_rewards`: the score on the last token, minus beta * KL per token when the KL is in the
    reward), the advantages whitened over every rank's valid tokens (`whiten_advantages`). The returns, the
    critic's targets, are never whitened."""
    rewards = token_level_rewards(scores, mask, kl_tokens, beta)  # (B, N)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)  # (B, N) each
    if cfg.whiten_advantages:
        all_mask, (all_advantages,), own = _padded_global(mask, advantages)
        if int(all_mask.sum()) >= 2:
            advantages = masked_whiten(all_advantages, all_mask)[own, : advantages.size(1)]
    return advantages, returns


def critic_metrics(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`critic/explained_variance` (`losses.explained_variance`) and `critic/values_mean` of a rollout's values
    against its returns, over every rank's valid tokens (verl's `critic/vf_explained_var`, `critic/values/mean`)."""
    all_mask, (all_values, all_returns), _ = _padded_global(mask, values, returns)
    return {
        "critic/explained_variance": explained_variance(all_values, all_returns, all_mask),
        "critic/values_mean": masked_mean(all_values, all_mask),
        "critic/returns_mean": masked_mean(all_returns, all_mask),
    }
