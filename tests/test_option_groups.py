"""Option groups (`option_groups`): each a dataclass that checks its own fields, nested under `model.init_args` in a
config, stored as plain dicts, and the flat names of earlier releases read with a warning naming the new key."""

from __future__ import annotations

import dataclasses
import inspect
import typing
import warnings

import pytest
import torch
import yaml

from conftest import CONFIGS, QUIET
from rlhf_lightning.cli import lightning_cli, main, moved_options
from rlhf_lightning.modules import DPOModule, PPOModule, RewardModule, SFTModule
from rlhf_lightning.option_groups import (
    MOVED, DPOEvalConfig, DPOLossConfig, EvalConfig, KLConfig, LossConfig, OptimConfig, RewardConfig, RolloutConfig,
    UpdateConfig, as_group, regroup,
)
from rlhf_lightning.options import ConfigError

GROUPS = [RolloutConfig, RewardConfig, LossConfig, KLConfig, UpdateConfig, OptimConfig, EvalConfig, DPOLossConfig, DPOEvalConfig]
STAGES = {"PPOModule": PPOModule, "DPOModule": DPOModule, "SFTModule": SFTModule, "RewardModule": RewardModule}


def group_params(cls) -> dict[str, type]:
    """A stage's `__init__` parameters that are option groups: {name: dataclass}."""
    hints = typing.get_type_hints(cls.__init__)
    return {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_every_field_is_documented_and_the_defaults_pass_their_own_checks(group):
    doc = inspect.getdoc(group)
    for field in dataclasses.fields(group):
        assert f"    {field.name}: " in doc, f"{group.__name__}.{field.name} has no line in the docstring's Args"
    group()  # the defaults are valid


@pytest.mark.parametrize("group, field, value, words", [
    (RolloutConfig, "samples_per_prompt", 0, "model.init_args.rollout.samples_per_prompt: 0 is not allowed"),
    (RolloutConfig, "temperature", float("nan"), "model.init_args.rollout.temperature: nan is not allowed"),
    (RewardConfig, "source", "oracle", "model.init_args.reward.source: unknown value 'oracle'"),
    (RewardConfig, "dtype", "float16", "model.init_args.reward.dtype: unknown value 'float16'"),
    (RewardConfig, "weights", {"judge": float("nan")}, "model.init_args.reward.weights.judge: nan is not allowed; allowed: a number"),
    (LossConfig, "loss_agg", "token_sum", "model.init_args.loss.loss_agg: unknown value 'token_sum'"),
    (KLConfig, "estimator", "k2", "model.init_args.kl.estimator: unknown value 'k2'"),
    (UpdateConfig, "ppo_epochs", 1.5, "model.init_args.update.ppo_epochs: 1.5 is not allowed"),
    (OptimConfig, "min_lr_ratio", 2.0, "model.init_args.optim.min_lr_ratio: 2.0 is not allowed"),
    (EvalConfig, "every", -1, "model.init_args.eval.every: -1 is not allowed"),
    (DPOLossConfig, "loss_type", [], "model.init_args.loss.loss_type: an empty list"),
    (DPOEvalConfig, "max_val_prompts", 0, "model.init_args.eval.max_val_prompts: 0 is not allowed"),
])
def test_a_group_refuses_a_bad_field_naming_it_as_written_in_the_config(group, field, value, words):
    with pytest.raises(ConfigError) as err:
        group(**{field: value})
    assert str(err.value).startswith(words) and "\n" not in str(err.value)


def test_as_group_takes_the_dataclass_a_mapping_or_none():
    assert as_group(KLConfig, None) == KLConfig()
    assert as_group(OptimConfig, None, OptimConfig(lr=3e-3)).lr == 3e-3
    assert as_group(KLConfig, {"beta": 0.2, "estimator": "k3"}) == KLConfig(beta=0.2, estimator="k3")
    cfg = LossConfig(clip_eps=0.1)
    assert as_group(LossConfig, cfg) is cfg
    with pytest.raises(ConfigError, match=r"^model.init_args.kl.kl_estimator: no such option; allowed: beta, estimator, in_reward"):
        as_group(KLConfig, {"kl_estimator": "k3"})


@pytest.mark.parametrize("stage", list(STAGES))
def test_no_stage_takes_more_than_twelve_options_and_every_moved_key_lands_on_a_field(stage):
    cls = STAGES[stage]
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    assert len(params) <= 12, (stage, params)
    groups = group_params(cls)
    for old, new in MOVED[stage].items():
        group, _, field = new.partition(".")
        assert group in groups and field in {f.name for f in dataclasses.fields(groups[group])}, (stage, old, new)
        assert old not in params or old == group  # the old flat option is gone (or is the group's own name)


def test_regroup_moves_flat_keys_and_a_grouped_value_wins():
    init_args = {"policy_ckpt": "a.ckpt", "beta": 0.1, "kl": {"estimator": "k3", "beta": 0.3}, "reward": "judge",
                 "reward_ckpt": None, "lr": 1e-5, "eval_every": 5}
    grouped, renamed = regroup("PPOModule", init_args)
    assert grouped == {"policy_ckpt": "a.ckpt", "kl": {"estimator": "k3", "beta": 0.3}, "reward": {"source": "judge", "ckpt": None},
                       "optim": {"lr": 1e-5}, "eval": {"every": 5}}
    assert dict(renamed) == {"beta": "kl.beta", "reward": "reward.source", "reward_ckpt": "reward.ckpt", "lr": "optim.lr", "eval_every": "eval.every"}
    assert regroup("DPOModule", {"beta": 0.5, "max_new_tokens": 4})[0] == {"loss": {"beta": 0.5}, "eval": {"max_new_tokens": 4}}
    assert regroup("PPOModule", {"reward": {"source": "judge"}}) == ({"reward": {"source": "judge"}}, [])


def test_moved_flags_and_config_keys_are_rewritten_with_one_warning_each(tmp_path):
    old = tmp_path / "old.yaml"
    config = yaml.safe_load((CONFIGS / "toy" / "ppo.yaml").read_text())
    config["model"]["init_args"] = {"policy_ckpt": "sft.ckpt", "reward": "judge", "samples_per_prompt": 2, "beta": 0.2}
    old.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.warns(FutureWarning) as caught:
        args = moved_options(["fit", "--config", str(old), "--model.init_args.lr=1e-5", "--model.init_args.kl.estimator", "k3"])
    messages = [str(w.message) for w in caught]
    assert messages == [
        f"{old}: model.init_args.reward is deprecated: it is now model.init_args.reward.source (PPOModule's options are grouped)",
        f"{old}: model.init_args.samples_per_prompt is deprecated: it is now model.init_args.rollout.samples_per_prompt (PPOModule's options are grouped)",
        f"{old}: model.init_args.beta is deprecated: it is now model.init_args.kl.beta (PPOModule's options are grouped)",
        "--model.init_args.lr is deprecated: it is now model.init_args.optim.lr (PPOModule's options are grouped)",
    ]
    assert args[3:] == ["--model.init_args.optim.lr=1e-5", "--model.init_args.kl.estimator", "k3"]
    assert yaml.safe_load(args[2])["model"]["init_args"] == {
        "policy_ckpt": "sft.ckpt", "reward": {"source": "judge"}, "rollout": {"samples_per_prompt": 2}, "kl": {"beta": 0.2},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped configs use the groups: nothing to rewrite, no warning
        assert moved_options(["fit", "--config", str(CONFIGS / "toy" / "ppo.yaml"), "--model.init_args.kl.beta=0"])[-1] == "--model.init_args.kl.beta=0"


def test_a_run_with_the_old_flat_names_trains_with_the_grouped_values(sft_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(FutureWarning, match="model.init_args.beta is deprecated: it is now model.init_args.kl.beta"):
        cli = lightning_cli([
            "fit", "--config", str(CONFIGS / "toy" / "ppo.yaml"), *QUIET, "--trainer.logger=false", "--trainer.limit_train_batches=1",
            f"--model.init_args.policy_ckpt={sft_ckpt}", "--model.init_args.reward=judge", "--model.init_args.reward_ckpt=null",
            "--model.init_args.beta=0.25", "--model.init_args.samples_per_prompt=2", "--model.init_args.eval_every=0",
            "--data.init_args.batch_size=4", "--data.init_args.max_val_prompts=8",
        ])
    module = cli.model
    assert module.cfg.kl.beta == 0.25 and module.cfg.rollout.samples_per_prompt == 2 and module.reward_cfg.source == "judge"
    assert module.cfg.kl.estimator == "k3"  # the config's other kl field is kept
    saved = torch.load(tmp_path / "checkpoints" / "toy" / "ppo.ckpt", weights_only=True)["hyper_parameters"]  # plain values only
    assert saved["kl"] == dataclasses.asdict(module.cfg.kl) and saved["reward"]["source"] == "judge"


def test_print_config_shows_the_groups_nested(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS / "toy" / "ppo.yaml"), "--model.init_args.rollout.temperature=0.5", "--print_config"])
    assert done.value.code in (0, None)
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init_args["rollout"]["temperature"] == 0.5 and init_args["rollout"]["samples_per_prompt"] == 8
    assert init_args["kl"] == {"beta": 0.05, "estimator": "k3", "in_reward": False, "target": None, "horizon": 10000.0, "clamp": 10.0}
    assert set(init_args) == set(inspect.signature(PPOModule.__init__).parameters) - {"self"}


def test_a_null_inside_a_group_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "toy" / "ppo.yaml"), "--model.init_args.update.max_grad_norm=null",
              "--model.init_args.kl.target=null", "--model.init_args.update.ppo_epochs=2", "--print_config"])
    init_args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init_args["update"] == {"ppo_epochs": 2, "num_minibatches": 1, "max_grad_norm": None}
    assert init_args["kl"]["target"] is None and init_args["kl"]["estimator"] == "k3"

