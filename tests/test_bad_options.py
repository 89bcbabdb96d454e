"""Bad option values of every stage: each is refused before any training with one line that names the option,
exit code 2, and nothing written (no half-written run under checkpoints/)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import CONFIGS, QUIET
from rlhf_lightning.cli import main

STAGES = {stage: str(CONFIGS / "toy" / f"{stage}.yaml") for stage in ("sft", "reward", "ppo")}
M, D, P = "model.init_args.", "data.init_args.", "data.init_args.pairs.init_args."
POSITIVE, AT_LEAST_0, AT_LEAST_1 = "a number > 0", "a number >= 0", "an integer >= 1"

# Through `rlhf fit`, one row per kind of bad value and per options class: (stage, option, value as typed on the
# command line, text the one line must contain). Every option's range is checked in `RANGES` below.
BAD = [
    # PPO's module: refused before its policy checkpoint is read
    ("ppo", M + "rollout.temperature", "0", "0.0 is not allowed; allowed: a number > 0"),
    ("ppo", M + "rollout.temperature", "-1", POSITIVE),
    ("ppo", M + "rollout.temperature", ".nan", "nan is not allowed; allowed: a number > 0"),
    ("ppo", M + "rollout.temperature", ".inf", "inf is not allowed"),
    ("ppo", M + "rollout.samples_per_prompt", "0", "0 is not allowed; allowed: an integer >= 1"),
    ("ppo", M + "kl.beta", "-0.1", AT_LEAST_0),
    ("ppo", M + "optim.lr", ".nan", POSITIVE),
    ("ppo", M + "loss.clip_c", ".inf", "a number > 1, or null (no dual clip)"),
    ("ppo", M + "reward.source", "oracle", "unknown value 'oracle'; allowed: judge, learned, weighted"),
    ("ppo", M + "lora", "{r: 4, alpha: high}", "lora.alpha: 'high' is not allowed; allowed: a number > 0"),
    ("ppo", M + "critic", "{gamma: 1.5}", "critic.gamma: 1.5 is not allowed; allowed: a number in [0, 1]"),
    ("ppo", M + "critic", "{lam: -0.1}", "critic.lam: -0.1 is not allowed; allowed: a number in [0, 1]"),
    ("ppo", M + "rollout.advantage", "gae", "rollout.advantage: 'gae' needs a critic (model.init_args.critic)"),
    # PPO's prompts: the module is built first, from a tiny SFT checkpoint
    ("ppo+ckpt", D + "batch_size", "0", AT_LEAST_1),
    ("ppo+ckpt", D + "task", "chess", "unknown value 'chess'; allowed: seed, toy"),
    # SFT
    ("sft", M + "optim.lr", "-.inf", POSITIVE),
    ("sft", M + "optim.min_lr_ratio", "1.5", "a number in [0, 1]"),
    ("sft", M + "lora", "{r: 4, dropout: .nan}", "lora.dropout: nan is not allowed"),
    ("sft", D + "demo_fraction", "0", "a number in (0, 1]"),
    ("sft", D + "batch_size", "-1", AT_LEAST_1),
    # reward model, its DataModule, and its pair sampler (the module without an SFT checkpoint)
    ("reward", M + "chosen_nll", ".nan", AT_LEAST_0),
    ("reward", D + "seed", "-1", "an integer in [0, 4294967295]"),
    ("reward", P + "temperature", "0", "0.0 is not allowed; allowed: a number > 0"),
    ("reward", P + "samples_per_prompt", "1", "an integer >= 2"),
    ("reward", P + "judge", "oracle", "unknown value 'oracle'; allowed: auto, random"),
]

@pytest.fixture(scope="module")
def tiny_sft_ckpt(tmp_path_factory) -> Path:
    """An SFT checkpoint after one step (1% of the demonstrations): something PPO can start from, in seconds."""
    cwd = tmp_path_factory.mktemp("tiny_sft")
    args = ["fit", "--config", STAGES["sft"], *QUIET, "--trainer.logger=false", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--data.init_args.demo_fraction=0.01", "--data.init_args.stratum_weights=null"]
    old = Path.cwd()
    try:
        os.chdir(cwd)
        assert main(args) == 0
    finally:
        os.chdir(old)
    return cwd / "checkpoints" / "toy" / "sft.ckpt"


def test_a_critic_checkpoint_of_another_stage_is_refused(tiny_sft_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [f"--model.init_args.policy_ckpt={tiny_sft_ckpt}", "--model.init_args.reward.source=judge", "--model.init_args.rollout.advantage=gae",
            f"--model.init_args.critic={{init: reward, ckpt: {tiny_sft_ckpt}}}"]
    assert main(["fit", "--config", STAGES["ppo"], *QUIET, *args]) == 2
    line = one_error_line(capsys)
    assert line.startswith("model.init_args.critic.ckpt: ") and "is a 'sft' checkpoint, expected 'reward'" in line, line
    assert not list(tmp_path.iterdir())


def stage_args(stage: str, request) -> list[str]:
    if stage == "reward":
        return ["--model.init_args.sft_ckpt=null"]  # the reward module needs no checkpoint: the data options are reached
    if stage == "ppo+ckpt":
        return [f"--model.init_args.policy_ckpt={request.getfixturevalue('tiny_sft_ckpt')}", "--model.init_args.reward.source=judge"]
    return []


def one_error_line(capsys) -> str:
    """The one `rlhf: error:` line on stderr, without its prefix (Lightning may log "Seed set to 0" before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rlhf: error: ")]
    assert len(lines) == 1, err
    return lines[0][len("rlhf: error: ") :]


@pytest.mark.parametrize("stage, option, value, words", BAD, ids=[f"{s}-{o.split('.')[-1]}={v}" for s, o, v, _ in BAD])
def test_bad_option_is_one_line_and_exit_2(stage, option, value, words, request, tmp_path, monkeypatch, capsys):
    extra = stage_args(stage, request)  # before chdir: the fixture runs in its own folder
    monkeypatch.chdir(tmp_path)
    config = STAGES[stage.split("+")[0]]
    assert main(["fit", "--config", config, *QUIET, *extra, f"--{option}={value}"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"{option}") and words in line, line
    assert not list(tmp_path.iterdir())  # refused before anything was written: no checkpoints/, no logs


@pytest.mark.parametrize("option, value", [(M + "rollout.temperature", "warm"), (D + "batch_size", "1.5"), (M + "optim.lr", "nan")])
def test_a_wrong_type_is_the_parsers_error(option, value, tmp_path, monkeypatch, capsys):
    """jsonargparse refuses a value of the wrong type itself (its message names the key), with exit code 2.
    (In YAML, `nan` is a string; the float is `.nan`.)"""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", STAGES["ppo" if option.startswith(M) else "sft"], *QUIET, f"--{option}={value}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f'Parser key "{option.split("init_args.")[-1]}"' in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--temperature", "0", "--temperature: 0.0 is not allowed; allowed: a number > 0"),
        ("--temperature", "nan", "--temperature: nan is not allowed"),
        ("--temperature", "-inf", "--temperature: -inf is not allowed"),
        ("--top_k", "0", "--top_k: 0 is not allowed; allowed: an integer >= 1"),
        ("--max_new_tokens", "0", "--max_new_tokens: 0 is not allowed"),
        ("--batch_size", "-1", "--batch_size: -1 is not allowed"),
        ("--limit", "0", "--limit: 0 is not allowed"),
        ("--seed", "-1", "--seed: -1 is not allowed"),
        ("--task", "chess", "--task: unknown value 'chess'; allowed: seed, toy"),
    ],
)
def test_eval_refuses_bad_numbers_before_reading_the_checkpoint(flag, value, words, tmp_path, capsys):
    ckpt = tmp_path / "sft.ckpt"  # never read: the options are checked first
    assert main(["eval", "--ckpt", str(ckpt), f"{flag}={value}"]) == 2
    assert words in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "arg, words",
    [
        ("--samples_per_prompt=0", "--samples_per_prompt: 0 is not allowed; allowed: an integer >= 1"),
        ("--eval_samples=-2", "--eval_samples: -2 is not allowed"),
        ("--seed=-1", "--seed: -1 is not allowed"),
        ("--task=chess", "--task: unknown value 'chess'"),
    ],
)
def test_pipeline_refuses_bad_numbers_before_the_first_stage(arg, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", arg]) == 2
    assert words in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


# Every checked option of every options class, built directly (no parser: microseconds a value):
# {class: [(option, allowed, values outside it)]}. The values are what YAML gives (`.nan` -> float("nan")).
NAN, INF = float("nan"), float("inf")
NUMBER_BAD = (NAN, INF, -INF, "1")  # refused by every numeric option
RANGES = {
    "PPOModule": [
        ("reward.missing_eos_penalty", AT_LEAST_0, (-1.0,)),
        ("rollout.samples_per_prompt", AT_LEAST_1, (0, -1, 1.5)),
        ("rollout.max_new_tokens", AT_LEAST_1, (0,)),
        ("rollout.temperature", POSITIVE, (0, 0.0, -1.0)),
        ("kl.beta", AT_LEAST_0, (-0.1,)),
        ("kl.target", "a number > 0, or null (fixed beta)", (0,)),
        ("kl.horizon", POSITIVE, (0,)),
        ("loss.clip_eps", POSITIVE, (0, -0.2)),
        ("loss.clip_eps_low", "a number > 0, or null (clip_eps)", (0,)),
        ("loss.clip_eps_high", "a number > 0, or null (clip_eps)", (-0.1,)),
        ("loss.clip_c", "a number > 1, or null (no dual clip)", (1.0, 0.5)),
        ("update.ppo_epochs", AT_LEAST_1, (0,)),
        ("update.num_minibatches", AT_LEAST_1, (0,)),
        ("optim.lr", POSITIVE, (0, -1e-4)),
        ("optim.weight_decay", AT_LEAST_0, (-0.1,)),
        ("update.max_grad_norm", "a number > 0, or null (no clipping)", (0, -1.0)),
        ("eval.every", "an integer >= 0", (-1,)),
        ("eval.num_logged_samples", "an integer >= 0", (-1,)),
        ("rollout.seed", "an integer in [0, 4294967295]", (-1, 2**32)),
        ("rollout.max_sampling_rounds", AT_LEAST_1, (0,)),
        ("optim.warmup_steps", "an integer >= 0", (-1,)),
        ("optim.min_lr_ratio", "a number in [0, 1]", (-0.5,)),
        ("rollout.micro_batch_size", "an integer >= 1, or null (all rows at once)", (0,)),
        ("rollout.generation_batch_size", "an integer >= 1, or null (all rows at once)", (-1,)),
    ],
    "SFTModule": [
        ("optim.lr", POSITIVE, (0, -1.0)),
        ("optim.weight_decay", AT_LEAST_0, (-0.1,)),
        ("optim.warmup_steps", "an integer >= 0", (-1,)),
        ("optim.min_lr_ratio", "a number in [0, 1]", (-0.1, 1.5)),
        ("max_new_tokens", AT_LEAST_1, (0,)),
        ("num_logged_samples", "an integer >= 0", (-1,)),
    ],
    "RewardModule": [
        ("chosen_nll", AT_LEAST_0, (-1.0,)),
        ("optim.lr", POSITIVE, (0,)),
        ("optim.weight_decay", AT_LEAST_0, (-1.0,)),
        ("optim.warmup_steps", "an integer >= 0", (-1,)),
        ("optim.min_lr_ratio", "a number in [0, 1]", (2.0,)),
    ],
    "DPOModule": [
        ("loss.beta", POSITIVE, (0, -0.5)),
        ("loss.label_smoothing", "a number in [0, 0.5)", (0.5, -0.1)),
        ("loss.nll_alpha", AT_LEAST_0, (-1.0,)),
        ("optim.lr", POSITIVE, (0,)),
        ("optim.min_lr_ratio", "a number in [0, 1]", (1.5,)),
        ("eval.max_new_tokens", AT_LEAST_1, (0,)),
        ("eval.max_val_prompts", "an integer >= 1, or null (all)", (0,)),
        ("eval.num_logged_samples", "an integer >= 0", (-1,)),
        ("inference_batch_size", AT_LEAST_1, (0,)),
    ],
    "SFTDataModule": [
        ("demo_fraction", "a number in (0, 1]", (0, 1.5)),
        ("batch_size", AT_LEAST_1, (0, -1)),
        ("eval_batch_size", AT_LEAST_1, (0,)),
        ("max_val_prompts", "an integer >= 1, or null (all)", (0,)),
        ("num_workers", "an integer >= 0", (-1,)),
    ],
    "PromptDataModule": [
        ("batch_size", AT_LEAST_1, (0,)),
        ("eval_batch_size", AT_LEAST_1, (0,)),
        ("max_train_prompts", "an integer >= 1, or null (all)", (0,)),
        ("max_val_prompts", "an integer >= 1, or null (all)", (-1,)),
        ("num_workers", "an integer >= 0", (-1,)),
        ("seed", "an integer in [0, 4294967295]", (-1,)),
    ],
    "PreferenceDataModule": [
        ("seed", "an integer in [0, 4294967295]", (-1,)),
        ("batch_size", AT_LEAST_1, (0,)),
        ("eval_batch_size", AT_LEAST_1, (0,)),
        ("num_workers", "an integer >= 0", (-1,)),
    ],
    "SampledPairs": [
        ("samples_per_prompt", "an integer >= 2", (1, 0)),
        ("temperature", POSITIVE, (0, -1.0)),
        ("top_k", "an integer >= 1, or null (all tokens)", (0,)),
        ("max_new_tokens", AT_LEAST_1, (0,)),
        ("max_train_prompts", "an integer >= 1, or null (all)", (0,)),
        ("max_val_prompts", "an integer >= 1, or null (all)", (0,)),
        ("generation_batch_size", AT_LEAST_1, (0,)),
    ],
}
LORA = [("r", AT_LEAST_1, (0, 2.5, "8")), ("alpha", POSITIVE, (0, -16.0)), ("dropout", "a number in [0, 1)", (1.0, -0.1))]


def build(cls: str, **kwargs):
    """`cls` with `kwargs` and whatever else it must have to reach its checks (no file is read before them)."""
    from rlhf_lightning.data.rollout_prompts import PromptDataModule
    from rlhf_lightning.data.preferences import JsonlPairs, PreferenceDataModule, SampledPairs
    from rlhf_lightning.data.sft import SFTDataModule
    from rlhf_lightning.modules.dpo import DPOModule
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.modules.reward import RewardModule
    from rlhf_lightning.modules.sft import SFTModule

    if cls == "PreferenceDataModule":
        return PreferenceDataModule(pairs=JsonlPairs("missing.jsonl"), **kwargs)
    if cls == "SampledPairs":
        return SampledPairs(policy_ckpt="missing.ckpt", **kwargs)
    kwargs = {k.split(".")[0]: {k.split(".")[1]: v} if "." in k else v for k, v in kwargs.items()}  # "group.field": a group
    if cls in ("PPOModule", "DPOModule"):
        return (PPOModule if cls == "PPOModule" else DPOModule)(policy_ckpt="missing.ckpt", **kwargs)
    classes = {"SFTModule": SFTModule, "RewardModule": RewardModule, "SFTDataModule": SFTDataModule, "PromptDataModule": PromptDataModule}
    return classes[cls](**kwargs)


PREFIX = {"SFTDataModule": D, "PromptDataModule": D, "PreferenceDataModule": D, "SampledPairs": P}
ROWS = [(cls, option, allowed, values) for cls, rows in RANGES.items() for option, allowed, values in rows]


@pytest.mark.parametrize("cls, option, allowed, values", ROWS, ids=[f"{c}.{o}" for c, o, _, _ in ROWS])
def test_every_option_refuses_values_outside_its_range(cls, option, allowed, values):
    from rlhf_lightning.options import ConfigError

    numeric = not allowed.startswith("unknown")
    for value in (*values, *(NUMBER_BAD if numeric else ())):
        with pytest.raises(ConfigError) as info:
            build(cls, **{option: value})
        assert str(info.value) == f"{PREFIX.get(cls, M)}{option}: {value if not isinstance(value, str) else repr(value)} is not allowed; allowed: {allowed}"


@pytest.mark.parametrize("cls", ["PPOModule", "SFTModule", "RewardModule"])
@pytest.mark.parametrize("key, allowed, values", LORA, ids=[k for k, _, _ in LORA])
def test_lora_numbers_are_checked_in_every_stage(cls, key, allowed, values):
    from rlhf_lightning.options import ConfigError

    for value in (*values, *NUMBER_BAD):
        with pytest.raises(ConfigError, match=rf"^model\.init_args\.lora\.{key}: .* is not allowed; allowed: {re.escape(allowed)}$"):
            build(cls, lora={"r": 4, key: value})


@pytest.mark.parametrize(
    "cls, option, value, allowed",
    [
        ("PPOModule", "rollout.advantage", "whiten", "batch_mean, batch_whiten"),
        ("PPOModule", "reference_dtype", "float16", "bfloat16, float32"),
        ("PPOModule", "reward.source", "oracle", "judge, learned, weighted"),
        ("PPOModule", "reward.dtype", "float16", "bfloat16, float32"),
        ("PPOModule", "kl.estimator", "k2", "k1, k3"),
        ("SFTDataModule", "task", "chess", "seed, toy"),
        ("PromptDataModule", "task", "chess", "seed, toy"),
        ("PreferenceDataModule", "task", "chess", "seed, toy"),
        ("SampledPairs", "judge", "oracle", "auto, random"),
        ("SampledPairs", "tie_break", "shortest", "length, null"),
    ],
)
def test_choices_are_refused_by_name(cls, option, value, allowed):
    from rlhf_lightning.options import ConfigError

    with pytest.raises(ConfigError, match=rf"^{re.escape(PREFIX.get(cls, M) + option)}: unknown value '{value}'; allowed: {allowed}"):
        build(cls, **{option: value})


def test_defaults_pass_every_check():
    for cls in ("SFTModule", "RewardModule", "SFTDataModule", "PromptDataModule", "SampledPairs"):
        build(cls)  # no ConfigError (PPOModule and PreferenceDataModule need files past their checks)


def test_bad_data_leaves_no_run_folder_behind_with_the_logger_on(tmp_path, monkeypatch, capsys):
    """Lightning creates the TensorBoard run folder (an event file, the saved config) before the DataModule reads its
    files; a run refused for bad data removes the folder it created."""
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "train.jsonl"
    bad.write_text('{"prompt": "Q: 1+2=\\nA:", "completion": "3"}\n{"prompt": "Q: 2+2=\\nA:"}\n')
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", STAGES["sft"], *QUIET, f"--data.init_args.train_file={bad}"]) == 2
    assert one_error_line(capsys).startswith(f"{bad}:2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], sorted(str(p) for p in tmp_path.rglob("*"))
