"""PPO's phases on an in-memory policy, without Lightning or a trained checkpoint: a rollout
(`rl.rollout.RolloutCollector`) and an update (`rl.update.ppo_update`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.data.prompts import PromptDataset, load_prompts
from rlhf_lightning.losses import batch_mean, group_mean, kl_penalty, masked_sum, ppo_loss, rollout_is_weights
from rlhf_lightning.option_groups import KLConfig, LossConfig, RolloutConfig, UpdateConfig
from rlhf_lightning.policy import build_policy
from rlhf_lightning.rl.rollout import RolloutCollector
from rlhf_lightning.rl.update import PPOConfig, minibatch_loss, ppo_update
from tolerance import FORWARD_ATOL, RATIO_ATOL

TINY = {"type": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 24}


def parity(prompts, completions, ended, golds):
    """A reward that differs within most groups: the completion's length is even."""
    return torch.tensor([float(len(c) % 2 == 0) for c in completions])


@pytest.fixture
def setup():
    torch.manual_seed(0)
    policy, tokenizer, _ = build_policy(TINY, None)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    data = PromptDataset(tokenizer, load_prompts("toy", "train", limit=4))
    batch = data.collate([data[i] for i in range(4)])
    return policy, reference, tokenizer, batch


def test_a_rollout_holds_generations_log_probs_the_references_and_batch_advantages(setup):
    policy, reference, tokenizer, batch = setup
    cfg = RolloutConfig(samples_per_prompt=2, max_new_tokens=4, temperature=0.7)
    collector = RolloutCollector(policy, reference, tokenizer, parity, cfg, KLConfig(beta=0.1, estimator="k3"))
    rollout, drawn = collector.collect(batch, torch.Generator().manual_seed(1), beta=0.1)
    assert rollout.completion_ids.size(0) == 8 and drawn.rounds == 1 and drawn.kept_groups is None
    assert drawn.samples[0].prompts[:2] == [batch["prompts"][0]] * 2  # a prompt's K samples are consecutive rows
    with torch.no_grad():
        again = rollout.logprobs(policy, 0.7)  # the update's log-probs at the same weights
    mask = rollout.completion_mask
    assert_close(again[mask], rollout.old_logprobs[mask], atol=RATIO_ATOL, rtol=0)
    assert_close(rollout.ref_logprobs[mask], rollout.old_logprobs[mask], atol=FORWARD_ATOL, rtol=0)  # reference = copy
    assert (rollout.ref_logprobs[~mask] == 0).all()
    assert_close(rollout.kl, masked_sum(kl_penalty("k3", rollout.old_logprobs, rollout.ref_logprobs), mask, dim=-1))
    assert torch.equal(rollout.rewards, parity(None, drawn.samples[0].completions, None, None))
    assert torch.equal(rollout.advantages, batch_mean(rollout.rewards, 2))


def test_without_the_reference_the_old_log_probs_stand_in_and_no_kl_is_measured(setup):
    policy, _, tokenizer, batch = setup
    collector = RolloutCollector(policy, None, tokenizer, parity, RolloutConfig(samples_per_prompt=2), KLConfig(beta=0.0))
    rollout, _ = collector.collect(batch, torch.Generator().manual_seed(1), beta=0.0, use_reference=False)
    assert rollout.kl is None and torch.equal(rollout.ref_logprobs, rollout.old_logprobs)


def test_dynamic_sampling_draws_more_prompts_until_groups_are_informative(setup):
    policy, reference, tokenizer, batch = setup
    drawn_sizes = []

    def draw(n):
        drawn_sizes.append(n)
        return batch

    calls = iter([torch.zeros(8), torch.tensor([1.0, 0.0] * 4)])  # round 1: every group flat; round 2: all differ
    cfg = RolloutConfig(samples_per_prompt=2, advantage="group_mean", filter_groups=True, max_sampling_rounds=3)
    collector = RolloutCollector(policy, reference, tokenizer, lambda *a: next(calls), cfg, KLConfig(beta=0.0), draw_prompts=draw)
    rollout, drawn = collector.collect(batch, torch.Generator().manual_seed(1), beta=0.0, use_reference=False)
    assert drawn_sizes == [4] and drawn.rounds == 2 and drawn.kept_groups == 4
    assert torch.equal(rollout.rewards, torch.tensor([1.0, 0.0] * 4))  # the second round's groups only
    assert torch.equal(rollout.advantages, group_mean(rollout.rewards, 2))


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        CountingSGD.steps += 1
        return super().step(closure)


def update_config(**update) -> PPOConfig:
    return PPOConfig(RolloutConfig(samples_per_prompt=2, max_new_tokens=4), LossConfig(), KLConfig(beta=0.1), UpdateConfig(**update))


def test_an_update_is_the_losses_gradient_step_and_takes_epochs_times_minibatches_steps(setup):
    policy, reference, tokenizer, batch = setup
    cfg = update_config(ppo_epochs=1, num_minibatches=1)
    rollout, _ = RolloutCollector(policy, reference, tokenizer, parity, cfg.rollout, cfg.kl).collect(batch, torch.Generator().manual_seed(1), 0.1)
    # the loss by hand on the whole rollout (one minibatch of every row, in the update's shuffled order)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    mb = rollout.select(order)
    logprobs = mb.logprobs(policy, 1.0)
    expected = ppo_loss(logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages, mb.completion_mask, cfg.loss, beta=0.1, max_new_tokens=4)
    expected.loss.backward()
    grad = [p.grad.clone() for p in policy.parameters()]
    before = [p.detach().clone() for p in policy.parameters()]
    policy.zero_grad()
    CountingSGD.steps = 0
    optimizer = CountingSGD(policy.parameters(), lr=0.5)
    metrics, ratio_error = ppo_update(policy, optimizer, rollout, cfg, 0.1, torch.Generator().manual_seed(5),
                                      backward=torch.Tensor.backward, clip=lambda loss: None)
    assert CountingSGD.steps == 1 and float(ratio_error) < RATIO_ATOL  # the first ratio is 1
    for p, b, g in zip(policy.parameters(), before, grad):
        assert_close(p.detach(), b - 0.5 * g)  # one SGD step along the hand loss's gradient
    assert_close(metrics["ppo/loss"], expected.loss.detach())
    assert set(metrics) == {"ppo/loss", "ppo/policy_loss", "ppo/kl", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy",
                            "rollout/logprob_mismatch", "rollout/logprob_mismatch_max_ratio"}
    assert metrics["rollout/logprob_mismatch"] < RATIO_ATOL  # fp32 decode: the trainer's log-probs are generation's

    CountingSGD.steps = 0
    ppo_update(policy, CountingSGD(policy.parameters(), lr=0.0), rollout, update_config(ppo_epochs=3, num_minibatches=2), 0.1,
               torch.Generator().manual_seed(5), backward=torch.Tensor.backward, clip=lambda loss: None)
    assert CountingSGD.steps == 6


def test_micro_batches_sum_to_the_minibatch_gradient(setup):
    policy, reference, tokenizer, batch = setup
    cfg = update_config()
    rollout, _ = RolloutCollector(policy, reference, tokenizer, parity, cfg.rollout, cfg.kl).collect(batch, torch.Generator().manual_seed(1), 0.1)
    minibatch_loss(policy, rollout, cfg, 0.1)[0].loss.backward()
    whole = torch.cat([p.grad.flatten() for p in policy.parameters()])
    policy.zero_grad()
    from rlhf_lightning.rl.update import loss_counts

    counts = loss_counts(rollout, cfg.loss)
    for rows in (slice(0, 3), slice(3, 8)):
        minibatch_loss(policy, rollout.select(rows), cfg, 0.1, counts)[0].loss.backward()
    parts = torch.cat([p.grad.flatten() for p in policy.parameters()])
    from tolerance import grad_atol

    assert_close(parts, whole, atol=grad_atol(whole, terms=8 * 4), rtol=0)


@pytest.mark.parametrize("mode, lower", [("tis", False), ("mis", True)])
def test_a_bf16_rollout_is_measured_and_corrected_by_importance_weights(setup, mode, lower):
    """The decode in bf16 (a lower-precision rollout engine): its log-probs differ from the trainer's fp32 ones. With
    `rollout_is` the old log-probs are the trainer's (the first ratio is 1 again) and the weights are
    pi_train / pi_rollout, truncated or masked, on the policy loss."""
    policy, reference, tokenizer, batch = setup
    kl = KLConfig(beta=0.1)
    plain = RolloutConfig(samples_per_prompt=2, max_new_tokens=4, dtype="bfloat16")
    raw, _ = RolloutCollector(policy, reference, tokenizer, parity, plain, kl).collect(batch, torch.Generator().manual_seed(1), 0.1)
    mask = raw.completion_mask
    with torch.no_grad():
        trainer = raw.logprobs(policy, 1.0)  # fp32
    gap = (trainer - raw.old_logprobs).abs()[mask]
    assert gap.max() > 1e-4  # bf16 and fp32 disagree on some token
    ratios = (trainer - raw.old_logprobs).exp()[mask]
    upper = float(ratios.quantile(0.75))  # bounds that bind on some tokens, whatever this CPU's bf16 rounding
    lower = float(ratios.quantile(0.25)) if lower else None
    corrected = RolloutConfig(samples_per_prompt=2, max_new_tokens=4, dtype="bfloat16", rollout_is=mode,
                              rollout_is_threshold=upper, rollout_is_threshold_lower=lower)
    cfg = PPOConfig(corrected, LossConfig(), kl, UpdateConfig(ppo_epochs=1))
    fixed, _ = RolloutCollector(policy, reference, tokenizer, parity, corrected, kl).collect(batch, torch.Generator().manual_seed(1), 0.1)
    assert torch.equal(raw.completion_ids, fixed.completion_ids)  # the same draws: only the old log-probs differ
    assert_close(fixed.old_logprobs[mask], trainer[mask], atol=RATIO_ATOL, rtol=0)
    assert torch.equal(fixed.rollout_logprobs, raw.old_logprobs)  # generation's, kept for the weights
    expected = rollout_is_weights(fixed.old_logprobs, fixed.rollout_logprobs, mask, mode, "token", lower, upper)
    assert torch.equal(fixed.is_weights, expected.weights) and fixed.is_affected == expected.affected and expected.affected > 0
    # the loss weighs each token's term by its weight
    out, logprobs, _ = minibatch_loss(policy, fixed, cfg, 0.1)
    by_hand = ppo_loss(logprobs, fixed.old_logprobs, fixed.ref_logprobs, fixed.advantages, mask, cfg.loss, beta=0.1,
                       max_new_tokens=4, is_weights=expected.weights)
    assert_close(out.loss, by_hand.loss)
    # the update reports the mismatch the weights correct: the mean |trainer - rollout| gap and its largest ratio
    metrics, first_ratio_error = ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), fixed, cfg, 0.1,
                                            torch.Generator().manual_seed(5), backward=lambda loss: loss.backward(), clip=lambda loss: None)
    assert first_ratio_error < RATIO_ATOL  # the old log-probs are the trainer's
    assert_close(metrics["rollout/logprob_mismatch"], gap.mean(), atol=RATIO_ATOL, rtol=0)
    assert_close(metrics["rollout/logprob_mismatch_max_ratio"], gap.max().exp(), atol=RATIO_ATOL, rtol=0)
    assert metrics["rollout/is_affected_frac"] == expected.affected
