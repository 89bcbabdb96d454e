"""The learned critic of `rollout.advantage: gae`: per-token rewards and GAE by hand, the critic's values, a rollout
with values and returns, the update's value loss and the critic's warm-up, on an in-memory policy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.losses import explained_variance, gae, masked_whiten, token_level_rewards
from rlhf_lightning.option_groups import CriticConfig, KLConfig, LossConfig, RolloutConfig, UpdateConfig
from rlhf_lightning.options import ConfigError
from rlhf_lightning.rl.critic import build_critic, completion_values, critic_advantages, critic_metrics
from rlhf_lightning.rl.rollout import RolloutCollector
from rlhf_lightning.rl.update import CriticUpdate, PPOConfig, ppo_update
from test_rl import TINY, parity, setup  # noqa: F401  (the in-memory policy, its prompts, a reward; `setup` is a fixture)
from tolerance import FORWARD_ATOL

TOL = {"atol": 1e-6, "rtol": 0}


def test_token_level_rewards_put_the_score_on_the_last_token_and_the_kl_on_every_token():
    scores = torch.tensor([1.0, -2.0, 5.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # lengths 3, 1, 0
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 9.0, 9.0, 9.0], [9.0] * 4])
    out = token_level_rewards(scores, mask, kl, beta=0.5)
    expected = torch.tensor([[-0.05, -0.10, 1.0 - 0.15, 0.0], [-2.0 - 0.2, 0.0, 0.0, 0.0], [0.0] * 4])
    assert_close(out, expected, **TOL)
    assert_close(token_level_rewards(scores, mask), torch.tensor([[0.0, 0.0, 1.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0] * 4]), **TOL)


def test_gae_with_the_kl_in_the_reward_by_hand():
    # one sequence of 3 tokens, V = (0.2, 0.4, 0.6), score 1, per-token KL (0.1, 0.2, 0.3), beta 0.5, gamma 0.9, lam 0.5
    # r = (-0.05, -0.10, 0.85)
    # t=2: delta = 0.85 + 0 - 0.6 = 0.25; A2 = 0.25
    # t=1: delta = -0.10 + 0.9 * 0.6 - 0.4 = 0.04; A1 = 0.04 + 0.45 * 0.25 = 0.1525
    # t=0: delta = -0.05 + 0.9 * 0.4 - 0.2 = 0.11; A0 = 0.11 + 0.45 * 0.1525 = 0.178625
    rewards = token_level_rewards(torch.tensor([1.0]), torch.ones(1, 3), torch.tensor([[0.1, 0.2, 0.3]]), beta=0.5)
    advantages, returns = gae(rewards, torch.tensor([[0.2, 0.4, 0.6]]), torch.ones(1, 3), gamma=0.9, lam=0.5)
    assert_close(advantages, torch.tensor([[0.178625, 0.1525, 0.25]]), **TOL)
    assert_close(returns, torch.tensor([[0.378625, 0.5525, 0.85]]), **TOL)


def test_critic_advantages_whiten_over_the_valid_tokens_and_keep_raw_returns():
    scores = torch.tensor([1.0, 0.0, 0.5])
    values = torch.tensor([[0.3, 0.1, 0.0], [0.2, 0.4, 0.6], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]).bool()
    cfg = CriticConfig(gamma=1.0, lam=0.9)
    advantages, returns = critic_advantages(scores, values, mask, cfg)
    raw, raw_returns = gae(token_level_rewards(scores, mask), values, mask, 1.0, 0.9)
    assert_close(advantages, masked_whiten(raw, mask), **TOL)
    assert_close(returns, raw_returns, **TOL)
    unwhitened, _ = critic_advantages(scores, values, mask, CriticConfig(gamma=1.0, lam=0.9, whiten_advantages=False))
    assert_close(unwhitened, raw, **TOL)
    metrics = critic_metrics(values, returns, mask)
    assert_close(metrics["critic/explained_variance"], explained_variance(values, returns, mask), **TOL)
    assert_close(metrics["critic/values_mean"], values[mask].mean(), **TOL)


def test_a_critic_from_the_policy_reads_the_state_before_each_completion_token(setup):  # noqa: F811
    policy, _, tokenizer, batch = setup
    critic, record = build_critic(CriticConfig(init="policy"), None, policy, {"model": TINY}, tokenizer, 24)
    assert record == {"init": "policy", "path": None, "sha256": None}
    assert all(p.requires_grad for p in critic.parameters())
    for name, p in critic.backbone.named_parameters():  # the policy's transformer, copied
        assert torch.equal(p, policy.get_parameter(name)) and p.data_ptr() != policy.get_parameter(name).data_ptr()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]).bool()
    with torch.no_grad():
        values = completion_values(critic, ids, mask, 2)  # (2, 2): heads at positions 2 and 3
        hidden = critic.backbone(ids, mask)
        assert_close(values, critic.head(hidden[:, 2:4]).squeeze(-1), atol=FORWARD_ATOL, rtol=0)


def test_the_critic_refuses_a_reward_model_that_pools(setup, tmp_path):  # noqa: F811
    policy, _, tokenizer, _ = setup
    with pytest.raises(ConfigError, match=r"^model\.init_args\.critic\.ckpt: init 'reward' needs a reward checkpoint"):
        build_critic(CriticConfig(init="reward"), None, policy, {"model": TINY}, tokenizer, 24)
    with pytest.raises(ConfigError, match=r"^model\.init_args\.critic\.init: 'policy' builds on the built-in transformer"):
        build_critic(CriticConfig(init="policy"), None, policy, {"model": {"type": "hf", "path": "x"}}, tokenizer, 24)


@pytest.mark.parametrize("bad, message", [
    ({"gamma": 1.01}, r"critic\.gamma: 1\.01 is not allowed; allowed: a number in \[0, 1\]"),
    ({"lam": -0.5}, r"critic\.lam: -0\.5 is not allowed; allowed: a number in \[0, 1\]"),
    ({"cliprange_value": 0}, r"critic\.cliprange_value: 0 is not allowed"),
    ({"warmup": -1}, r"critic\.warmup: -1 is not allowed"),
    ({"init": "sft"}, r"critic\.init: unknown value 'sft'"),
])
def test_critic_options_are_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        CriticConfig(**bad)


def gae_collector(policy, reference, tokenizer, critic_cfg, kl=KLConfig(beta=0.1)):
    critic, _ = build_critic(critic_cfg, None, policy, {"model": TINY}, tokenizer, 24)
    cfg = RolloutConfig(samples_per_prompt=2, max_new_tokens=4, advantage="gae")
    return critic, RolloutCollector(policy, reference, tokenizer, parity, cfg, kl, critic=(critic, critic_cfg))


def test_a_gae_rollout_holds_the_critics_values_and_per_token_advantages(setup):  # noqa: F811
    policy, reference, tokenizer, batch = setup
    critic_cfg = CriticConfig(init="policy", gamma=0.95, lam=0.9)
    with torch.no_grad():  # a reference apart from the policy: a KL per token to put in the reward
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    critic, collector = gae_collector(policy, reference, tokenizer, critic_cfg, KLConfig(beta=0.1, in_reward=True))
    rollout, _ = collector.collect(batch, torch.Generator().manual_seed(1), beta=0.1)
    mask = rollout.completion_mask
    assert rollout.advantages.shape == mask.shape == rollout.values.shape == rollout.returns.shape
    with torch.no_grad():
        values = completion_values(critic, rollout.input_ids, rollout.attention_mask, mask.size(1))
    assert_close(rollout.values[mask], values[mask], atol=FORWARD_ATOL, rtol=0)
    assert (rollout.values[~mask] == 0).all() and (rollout.advantages[~mask] == 0).all()
    kl_tokens = rollout.old_logprobs - rollout.ref_logprobs  # k1, the KL in the reward
    expected, returns = critic_advantages(rollout.rewards, rollout.values, mask, critic_cfg, kl_tokens, 0.1)
    assert_close(rollout.advantages, expected, **TOL)
    assert_close(rollout.returns, returns, **TOL)


def test_the_update_trains_the_critic_and_its_warm_up_leaves_the_policy_alone(setup):  # noqa: F811
    policy, reference, tokenizer, batch = setup
    critic_cfg = CriticConfig(init="policy", lr=1e-2)
    critic, collector = gae_collector(policy, reference, tokenizer, critic_cfg)
    rollout, _ = collector.collect(batch, torch.Generator().manual_seed(1), beta=0.1)
    cfg = PPOConfig(collector.cfg, LossConfig(), KLConfig(beta=0.1), UpdateConfig(ppo_epochs=8, num_minibatches=1))
    policy_before = copy.deepcopy(policy.state_dict())
    critic_before = copy.deepcopy(critic.state_dict())
    policy_opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=critic_cfg.lr)
    update = CriticUpdate(critic, critic_opt, critic_cfg, clip=lambda loss: None)
    losses = []
    for _ in range(3):
        metrics, first = ppo_update(
            policy, policy_opt, rollout, cfg, 0.1, torch.Generator().manual_seed(0), backward=torch.Tensor.backward,
            clip=lambda loss: None, critic=update, update_policy=False,
        )
        losses.append(float(metrics["critic/value_loss"]))
    assert first is None and set(metrics) == {"critic/value_loss", "critic/vf_clipfrac"}
    assert all(torch.equal(v, policy_before[k]) for k, v in policy.state_dict().items())  # the warm-up: policy untouched
    assert any(not torch.equal(v, critic_before[k]) for k, v in critic.state_dict().items())
    assert losses[-1] < losses[0]  # the values move toward the returns
    metrics, first = ppo_update(
        policy, policy_opt, rollout, cfg, 0.1, torch.Generator().manual_seed(0), backward=torch.Tensor.backward,
        clip=lambda loss: None, critic=update,
    )
    assert first is not None and {"ppo/loss", "critic/value_loss"} <= set(metrics)
    assert any(not torch.equal(v, policy_before[k]) for k, v in policy.state_dict().items())


def test_a_critic_with_lora_trains_its_adapters_and_head_only(setup):  # noqa: F811
    pytest.importorskip("peft")
    policy, _, tokenizer, batch = setup
    critic, _ = build_critic(CriticConfig(init="policy", lora={"r": 2}), None, policy, {"model": TINY}, tokenizer, 24)
    trained = {name for name, p in critic.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name or name.startswith("head.") for name in trained)
    assert {"head.weight", "head.bias"} <= trained
    values = completion_values(critic, batch["prompt_ids"], batch["prompt_mask"].bool(), 2)
    values.sum().backward()
    assert all(p.grad is not None for name, p in critic.named_parameters() if name in trained and "lora_B" not in name)
