"""Reward sources: the judge, the learned reward model (normalized), weighted sums and output validation."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.checkpoints import CheckpointError
from rlhf_lightning.option_groups import REWARD_SOURCE_NAMES
from rlhf_lightning.rewards import (
    REWARD_SOURCES,
    JudgeReward,
    LearnedReward,
    RewardError,
    RewardSettings,
    WeightedSum,
    build_reward_source,
    checked_rewards,
)
from rlhf_lightning.tasks.arithmetic import ALPHABET
from rlhf_lightning.tokenizer import CharTokenizer

P = "Q: 12+30=\nA:"


def test_judge_uses_batch_gold_then_prompt_and_requires_eos():
    judge = JudgeReward()
    ended = torch.tensor([True, True, False, True, True])
    out = judge([P] * 5, ["42", "4 2", "42", "421", "7"], ended, [None, None, None, None, "7"])
    assert out.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_judge_without_any_gold_is_a_clear_error():
    with pytest.raises(RewardError, match="no gold answer for prompt 'hello'"):
        JudgeReward()(["hello"], ["1"], torch.tensor([True]), [None])


def test_checked_rewards_rejects_wrong_shape_nan_and_non_tensor():
    assert checked_rewards("x", torch.tensor([1, 2]), 2).dtype == torch.float32
    with pytest.raises(RewardError, match=r"'x' returned shape \(2, 1\), expected \(2,\)"):
        checked_rewards("x", torch.zeros(2, 1), 2)
    with pytest.raises(RewardError, match="'x' returned a non-finite reward .* row 1 for prompt 'b'"):
        checked_rewards("x", torch.tensor([0.0, float("nan")]), 2, ["a", "b"])
    with pytest.raises(RewardError, match="returned list"):
        checked_rewards("x", [0.0, 1.0], 2)


class Constant:
    name = "const"

    def __init__(self, value):
        self.value = value

    def __call__(self, prompts, completions, ended, golds):
        return torch.full((len(prompts),), self.value)


def test_weighted_sum_adds_weighted_parts_and_names_a_bad_part():
    total = WeightedSum({"judge": (0.5, JudgeReward()), "const": (2.0, Constant(0.25))})
    out = total([P, P], ["42", "0"], torch.tensor([True, True]), [None, None])
    assert out.tolist() == [0.5 * 1 + 2 * 0.25, 0.5 * 0 + 2 * 0.25]
    bad = WeightedSum({"judge": (1.0, JudgeReward()), "const": (1.0, Constant(float("inf")))})
    with pytest.raises(RewardError, match="'const' returned a non-finite"):
        bad([P], ["42"], torch.tensor([True]), [None])


def test_registry_and_builder_errors():
    assert set(REWARD_SOURCES) == {"judge", "learned", "weighted"} == set(REWARD_SOURCE_NAMES)  # RewardConfig checks the names
    assert isinstance(build_reward_source("judge", RewardSettings()), JudgeReward)
    with pytest.raises(RewardError, match="unknown reward source 'oracle'"):
        build_reward_source("oracle", RewardSettings())
    with pytest.raises(RewardError, match="needs model.init_args.reward.ckpt"):
        build_reward_source("learned", RewardSettings())
    with pytest.raises(RewardError, match="unknown reward source 'nope'"):
        build_reward_source("weighted", RewardSettings(reward_weights={"nope": 1.0}))
    weighted = build_reward_source("weighted", RewardSettings(reward_weights={"judge": 3.0}))
    assert weighted([P], ["42"], torch.tensor([True]), [None]).tolist() == [3.0]


# ----------------------------------------------------------------------------- learned reward


def save_reward_ckpt(path, alphabet=ALPHABET, mean=0.5, std=2.0, stage="reward"):
    """A tiny untrained reward checkpoint in the reward stage's format."""
    from rlhf_lightning.models.reward import RewardModel

    tok = CharTokenizer(alphabet)
    config = {"type": "gpt", "vocab_size": tok.vocab_size, "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32}
    torch.manual_seed(0)
    model = RewardModel(config)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "rlhf": {"stage": stage, "model": config, "tokenizer": tok.to_dict(), "reward_mean": mean, "reward_std": std},
    }
    torch.save(ckpt, path)
    return model, tok


def test_learned_reward_is_frozen_and_normalized(tmp_path):
    from rlhf_lightning.scoring import score_texts

    path = tmp_path / "reward.ckpt"
    model, tok = save_reward_ckpt(path, mean=0.5, std=2.0)
    prompts, completions, ended = [P, P, P], ["42", "7", "1"], torch.tensor([True, False, True])
    raw = score_texts(model.eval(), tok, prompts, completions, ended)
    source = LearnedReward(str(path), normalize=True, policy_tokenizer=CharTokenizer(ALPHABET))
    assert not any(p.requires_grad for p in source.model.parameters()) and not source.model.training
    out = source(prompts, completions, ended, [None] * 3)
    assert not out.requires_grad
    torch.testing.assert_close(out, (raw.detach() - 0.5) / 2.0)
    plain = LearnedReward(str(path), normalize=False)
    torch.testing.assert_close(plain(prompts, completions, ended, [None] * 3), raw.detach())


def test_learned_reward_rejects_a_tokenizer_that_cannot_encode_the_policy_alphabet(tmp_path):
    path = tmp_path / "narrow.ckpt"
    save_reward_ckpt(path, alphabet="0123456789")
    with pytest.raises(CheckpointError, match=r"narrow.ckpt' cannot score the outputs of the policy 'sft.ckpt'.*lacks"):
        LearnedReward(str(path), policy_tokenizer=CharTokenizer(ALPHABET), policy_ckpt="sft.ckpt")


def test_learned_reward_rejects_wrong_stage_and_missing_file(tmp_path):
    path = tmp_path / "sft_like.ckpt"
    save_reward_ckpt(path, stage="sft")
    with pytest.raises(CheckpointError, match="is a 'sft' checkpoint, expected 'reward'"):
        LearnedReward(str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        LearnedReward(str(tmp_path / "missing.ckpt"))
