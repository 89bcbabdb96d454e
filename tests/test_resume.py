"""Crash-safe training: SIGKILL at three points of a short run, resume with `--ckpt_path last`, and the final
checkpoint equals an uninterrupted run's tensor for tensor; signals write a final last.ckpt; bad resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported here, its log handler writes to the session's stderr, not one test's)
import pytest
import torch
import yaml

from conftest import CONFIGS, run_cli, with_groups
from rlhf_lightning.files import FAULT_ENV
from rlhf_lightning.cli import main


def tiny_config(tmp_path: Path, stage: str, trainer: dict, model: dict, data: dict, every: int, pairs: dict | None = None) -> Path:
    """The toy stage config, small, with a last.ckpt every `every` optimizer steps and TensorBoard logs."""
    config = yaml.safe_load((CONFIGS / "toy" / f"{stage}.yaml").read_text())
    config["trainer"].update(enable_progress_bar=False, log_every_n_steps=1, **trainer)
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    config["model"]["init_args"] = with_groups(config["model"]["init_args"], model)
    config["data"]["init_args"].update(data)
    if pairs:
        config["data"]["init_args"]["pairs"]["init_args"].update(pairs)
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a checkpoint, by its path of keys."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    x, y = tensors(first), tensors(second)
    assert x.keys() == y.keys()
    assert any(k.startswith("/state_dict/") for k in x) and any(k.startswith("/optimizer_states/") for k in x)
    assert (first["global_step"], first["epoch"]) == (second["global_step"], second["epoch"])
    different = [k for k in x if not torch.equal(x[k], y[k])]
    if different:
        # A resume bug (a batch skipped or repeated, an RNG or optimizer state not restored) moves weights by
        # about a step's update (>= 1e-3 here). Two *uninterrupted* runs of the same config in different
        # processes also end bitwise different now and then on this CPU (about 1 in 30 runs, at most ~5e-6):
        # that, and only that, is tolerated, as an expected failure that says so.
        assert all(x[k].is_floating_point() for k in different), [k for k in different if not x[k].is_floating_point()][:5]
        worst = max(float((x[k].double() - y[k].double()).abs().max()) for k in different)
        assert worst < 1e-4, (different[:5], worst)
        pytest.xfail(f"not bitwise equal, at most {worst:.1e} apart: CPU float nondeterminism across processes, not resume")


def next_second() -> None:
    """TensorBoard orders a run folder's event files by name, whose first part is the creation time in whole
    seconds: a resumed run's file must not share the second of the run it continues."""
    time.sleep(1.01 - time.time() % 1)


def start(config: Path, cwd: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
    if args:
        next_second()
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen(["rlhf", "fit", "--config", str(config), *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def identity(path: Path) -> tuple[int, int] | None:
    """Changes when a new file (or folder) is renamed onto `path`."""
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


def kill_after_next_checkpoint(proc: subprocess.Popen, last: Path, group: bool = False) -> None:
    """SIGKILL somewhere in the steps after the next last.ckpt lands (a point in the middle of training); `group`:
    the whole process group `proc` leads (a run's other ranks too; start it with `start_new_session=True`)."""
    before, deadline = identity(last), time.monotonic() + 240
    while identity(last) == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()[-2000:]


def killed_while_writing(proc: subprocess.Popen, last: Path) -> None:
    """The fault hook killed it between writing a checkpoint and renaming it: the previous last.ckpt is intact."""
    before = last.read_bytes() if last.exists() else None
    assert proc.wait(240) == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert list(last.parent.glob(".last.ckpt.*.tmp")), "the kill came before the temporary file was complete"
    if before is not None:  # still the complete file from before the kill
        torch.load(last, weights_only=True)


def kill_three_times_then_resume(config: Path, cwd: Path, stage: str) -> Path:
    """Run, SIGKILL (mid-training), resume, SIGKILL (while writing a checkpoint), resume, SIGKILL (while
    writing a later one), resume in-process to the end; returns the final checkpoint."""
    last = cwd / "checkpoints" / "toy" / stage / "last.ckpt"
    kill_after_next_checkpoint(start(config, cwd), last)
    steps = [torch.load(last, weights_only=True)["global_step"]]
    killed_while_writing(start(config, cwd, "--ckpt_path=last", fault="last.ckpt:1"), last)
    steps.append(torch.load(last, weights_only=True)["global_step"])
    killed_while_writing(start(config, cwd, "--ckpt_path=last", fault="last.ckpt:2"), last)
    steps.append(torch.load(last, weights_only=True)["global_step"])
    assert steps[0] == steps[1] < steps[2], steps  # the 2nd run died writing its first checkpoint, the 3rd its second
    assert not (cwd / "checkpoints" / "toy" / f"{stage}.ckpt").exists()
    next_second()
    run_cli(["fit", "--config", str(config), "--ckpt_path=last"], cwd)
    return cwd / "checkpoints" / "toy" / f"{stage}.ckpt"


def uninterrupted(config: Path, cwd: Path, stage: str) -> Path:
    cwd.mkdir(exist_ok=True)
    run_cli(["fit", "--config", str(config)], cwd)
    return cwd / "checkpoints" / "toy" / f"{stage}.ckpt"


def event_steps(log_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), purge_orphaned_data=True)
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def sft_config(tmp_path: Path) -> Path:
    # dropout on: the global RNG must be restored too; 30 steps of 17 batches cross an epoch boundary
    return tiny_config(
        tmp_path, "sft", {"max_steps": 30}, {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 24, "dropout": 0.1}},
        {"demo_fraction": 0.02, "batch_size": 16, "max_val_prompts": 16}, every=3,
    )


@pytest.fixture(scope="module")
def sft_full(tmp_path_factory) -> tuple[Path, Path]:
    """(config, final checkpoint) of the tiny SFT run, uninterrupted."""
    tmp_path = tmp_path_factory.mktemp("sft_full")
    config = sft_config(tmp_path)
    return config, uninterrupted(config, tmp_path / "full", "sft")


def test_sft_killed_three_times_resumes_bitwise_identical_and_logs_each_step_once(tmp_path, sft_full):
    config, expected = sft_full
    (tmp_path / "killed").mkdir()
    final = kill_three_times_then_resume(config, tmp_path / "killed", "sft")
    runs = list((tmp_path / "killed" / "lightning_logs" / "toy" / "sft").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # the resumed runs log into the same run folder
    full_steps = event_steps(expected.parents[2] / "lightning_logs" / "toy" / "sft" / "version_0", "sft/loss")
    assert event_steps(runs[0], "sft/loss") == full_steps == list(range(30))  # each step once, none lost
    assert_same_checkpoint(final, expected)


def test_reward_killed_three_times_resumes_bitwise_identical(tmp_path, sft_run):
    config = tiny_config(
        tmp_path, "reward", {"max_steps": 16, "max_epochs": 4}, {},
        {"batch_size": 16}, every=3, pairs={"max_train_prompts": 60, "max_val_prompts": 16, "samples_per_prompt": 4},
    )
    for name in ("full", "killed"):
        (tmp_path / name / "checkpoints" / "toy").mkdir(parents=True)
        shutil.copy(sft_run[1], tmp_path / name / "checkpoints" / "toy" / "sft.ckpt")
    expected = uninterrupted(config, tmp_path / "full", "reward")
    assert_same_checkpoint(kill_three_times_then_resume(config, tmp_path / "killed", "reward"), expected)


# PPO critic-free, and with a critic: its weights, its own optimizer, its warm-up crossing a checkpoint
PPO_RESUME = {
    "critic_free": {},
    "critic": {"rollout": {"advantage": "gae"}, "critic": {"init": "reward", "warmup": 2, "lr": 1e-3}},
}


@pytest.mark.parametrize("variant", PPO_RESUME)
def test_ppo_killed_three_times_resumes_bitwise_identical(variant, tmp_path, sft_ckpt, reward_ckpt):
    # 5 rollouts per epoch, 2 epochs, a checkpoint every 2 rollouts (4 optimizer steps each); with the critic every
    # rollout from the 2nd (its 4 steps in each of its 2 warm-up rollouts, then 4 more each: 4, 8, 16, 24, ...)
    model = with_groups({"eval": {"every": 3}, "rollout": {"samples_per_prompt": 4}}, PPO_RESUME[variant])
    config = tiny_config(tmp_path, "ppo", {"max_epochs": 2, "limit_train_batches": 1.0}, model, {"batch_size": 8, "max_train_prompts": 40, "max_val_prompts": 16}, every=8)
    for name in ("full", "killed"):
        (tmp_path / name / "checkpoints" / "toy").mkdir(parents=True)
        for ckpt in (sft_ckpt, reward_ckpt):
            shutil.copy(ckpt, tmp_path / name / "checkpoints" / "toy" / ckpt.name)
    expected = uninterrupted(config, tmp_path / "full", "ppo")
    final = kill_three_times_then_resume(config, tmp_path / "killed", "ppo")
    checkpoint = torch.load(final, weights_only=True)
    assert checkpoint["rlhf"]["rollouts"] == 10
    assert (variant == "critic") == any(k.startswith("critic.") for k in checkpoint["state_dict"]) == (len(checkpoint["optimizer_states"]) == 2)
    assert_same_checkpoint(final, expected)


def test_sigterm_and_ctrl_c_stop_after_the_step_with_a_last_checkpoint(tmp_path, sft_full):
    config, expected = sft_full
    cwd = tmp_path / "stopped"
    cwd.mkdir()
    last = cwd / "checkpoints" / "toy" / "sft" / "last.ckpt"
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = start(config, cwd, *(["--ckpt_path=last"] if last.exists() else []))
        before, deadline = identity(last), time.monotonic() + 240
        while identity(last) == before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = torch.load(last, weights_only=True)["global_step"]
        proc.send_signal(signum)
        assert proc.wait(120) == 128 + signum, proc.stderr.read()[-2000:]
        stopped = torch.load(last, weights_only=True)["global_step"]
        assert seen < stopped < 30  # a last.ckpt written at the stop
    assert not (cwd / "checkpoints" / "toy" / "sft.ckpt").exists()
    run_cli(["fit", "--config", str(config), "--ckpt_path=last"], cwd)
    assert_same_checkpoint(cwd / "checkpoints" / "toy" / "sft.ckpt", expected)


def test_a_resumed_tensorboard_logger_is_the_configured_one_in_the_checkpoints_run_folder(tmp_path):
    from jsonargparse import Namespace
    from lightning.pytorch.loggers import TensorBoardLogger

    from rlhf_lightning.callbacks.lightning_internals import tensorboard_prefix
    from rlhf_lightning.cli import continued_logger

    entry = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                      init_args=Namespace(save_dir=str(tmp_path), name="toy/sft", version=None, prefix="stage"), dict_kwargs={"flush_secs": 7})
    logger = continued_logger(TensorBoardLogger(str(tmp_path), name="toy/sft", prefix="stage", flush_secs=7), entry, version=2, purge_step=17)
    assert type(logger) is TensorBoardLogger and logger.log_dir == str(tmp_path / "toy" / "sft" / "version_2")
    assert (logger.experiment.flush_secs, tensorboard_prefix(logger), purged_from(logger)) == (7, "stage", 17)
    # Lightning's default logger (no class_path in the config): its folder and name
    default = continued_logger(TensorBoardLogger(str(tmp_path)), True, version=0, purge_step=3)
    assert default.log_dir == str(tmp_path / "lightning_logs" / "version_0") and purged_from(default) == 3


def purged_from(logger) -> int | None:
    """The step of the session-start event a SummaryWriter with `purge_step` writes first (TensorBoard drops the run
    folder's earlier events at or after it)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    logger.experiment.flush()
    for path in Path(logger.log_dir).glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                return event.step
    return None


# ---------------------------------------------------------------- bad resumes: one line, exit 2


def test_ckpt_path_last_without_a_last_checkpoint_names_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "toy/sft", "--ckpt_path=last"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "no last.ckpt in '" in err[0] and "checkpoints/toy/sft' to resume from" in err[0]
    assert not (tmp_path / "lightning_logs").exists()


def error_lines(capsys) -> list[str]:
    """The `rlhf: error:` lines on stderr; no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("rlhf: error:")]


def resume_args(config: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), "--ckpt_path=last", *extra]


@pytest.fixture(scope="module")
def sft_last(tmp_path_factory) -> tuple[Path, Path]:
    """(working dir, config) of a short SFT run that left checkpoints/toy/sft/last.ckpt."""
    cwd = tmp_path_factory.mktemp("sft_last")
    config = sft_config(cwd)
    run_cli(["fit", "--config", str(config), "--trainer.max_steps=3", "--trainer.logger=false"], cwd)
    assert (cwd / "checkpoints" / "toy" / "sft" / "last.ckpt").is_file()
    return cwd, config


@pytest.mark.parametrize(
    "change, words",
    [
        (["--model.init_args.model.n_embd=64"], ["model.init_args.model.n_embd", "32", "64"]),
        (["--model.init_args.optim.lr=0.001"], ["model.init_args.optim.lr", "0.005", "0.001"]),
        (["--data.init_args.task=seed"], ["data.init_args.task", "'toy'", "'seed'"]),
    ],
    ids=["model-shape", "option", "task"],
)
def test_last_checkpoint_of_a_different_config_is_refused_naming_the_field(sft_last, change, words, monkeypatch, capsys):
    cwd, config = sft_last
    monkeypatch.chdir(cwd)
    assert main(resume_args(config, "--trainer.logger=false", *change)) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "different config" in err[0], err
    for word in words:
        assert word in err[0], err[0]


def test_last_checkpoint_of_another_stage_is_refused(sft_last, sft_ckpt, reward_ckpt, tmp_path, monkeypatch, capsys):
    cwd, _ = sft_last
    (tmp_path / "checkpoints" / "toy" / "reward").mkdir(parents=True)
    shutil.copy(sft_ckpt, tmp_path / "checkpoints" / "toy" / "sft.ckpt")
    shutil.copy(cwd / "checkpoints" / "toy" / "sft" / "last.ckpt", tmp_path / "checkpoints" / "toy" / "reward" / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "toy/reward", "--ckpt_path=last", "--trainer.logger=false"]) == 2
    err = capsys.readouterr().err
    assert "'sft' checkpoint, expected 'reward'" in err and "last.ckpt" in err


def test_last_checkpoint_against_a_different_reward_model_is_refused(tmp_path, sft_ckpt, reward_ckpt, monkeypatch, capsys):
    config = tiny_config(tmp_path, "ppo", {"limit_train_batches": 2, "logger": False}, {"eval": {"every": 0}}, {"batch_size": 4, "max_val_prompts": 8}, every=4)
    (tmp_path / "checkpoints" / "toy").mkdir(parents=True)
    for ckpt in (sft_ckpt, reward_ckpt):
        shutil.copy(ckpt, tmp_path / "checkpoints" / "toy" / ckpt.name)
    run_cli(["fit", "--config", str(config)], tmp_path)
    other = torch.load(reward_ckpt, weights_only=True)
    other["rlhf"]["reward_std"] *= 2  # a different file: its SHA-256 differs
    torch.save(other, tmp_path / "checkpoints" / "toy" / "reward.ckpt")
    monkeypatch.chdir(tmp_path)
    assert main(resume_args(config)) == 2
    err = capsys.readouterr().err
    assert "model.init_args.reward.ckpt" in err and "is not the file this PPO run started from" in err


def test_truncated_last_checkpoint_is_refused_with_its_path(sft_last, tmp_path, monkeypatch, capsys):
    cwd, config = sft_last
    shutil.copytree(cwd / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "toy" / "sft.ckpt").unlink()
    last = tmp_path / "checkpoints" / "toy" / "sft" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    monkeypatch.chdir(tmp_path)
    assert main(resume_args(config, "--trainer.logger=false")) == 2
    err = capsys.readouterr().err
    assert "cannot load '" in err and "checkpoints/toy/sft/last.ckpt' as a safe checkpoint" in err
    assert not (tmp_path / "checkpoints" / "toy" / "sft.ckpt").exists()  # no fresh start


# ---------------------------------------------------------------- rlhf pipeline --resume


def pipeline_args(tmp_path: Path) -> list[str]:
    """A tiny pipeline whose PPO stage writes last.ckpt after every rollout."""
    ppo = tiny_config(tmp_path, "ppo", {"limit_train_batches": 8}, {"eval": {"every": 0}}, {"batch_size": 16, "max_val_prompts": 32}, every=4)
    return [
        f"--ppo_config={ppo}", "--ppo_args=[]", "--sft.trainer.enable_progress_bar=false", "--reward.trainer.enable_progress_bar=false",
        "--sft.trainer.max_epochs=1", "--sft.data.init_args.demo_fraction=0.1", "--sft.data.init_args.max_val_prompts=64",
        "--reward.trainer.limit_train_batches=3", "--reward.data.init_args.pairs.max_train_prompts=200", "--reward.data.init_args.pairs.max_val_prompts=50",
    ]


def test_pipeline_resume_after_a_kill_during_ppo_gives_the_same_table(tmp_path, monkeypatch, capsys):
    from rlhf_lightning.pipeline import main as pipeline_main

    args = pipeline_args(tmp_path)
    summary = Path("lightning_logs") / "toy" / "summary.json"
    for name in ("full", "killed"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "full")
    assert pipeline_main(args) == 0
    expected = json.loads(summary.read_text())

    proc = subprocess.Popen(["rlhf", "pipeline", *args], cwd=tmp_path / "killed", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_after_next_checkpoint(proc, tmp_path / "killed" / "checkpoints" / "toy" / "ppo" / "last.ckpt")
    monkeypatch.chdir(tmp_path / "killed")
    capsys.readouterr()
    assert pipeline_main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "[pipeline] sft: done before with this config and inputs, skipped" in out
    assert "[pipeline] reward: done before with this config and inputs, skipped" in out
    assert "[pipeline] ppo: start" in out
    assert [p.name for p in (tmp_path / "killed" / "lightning_logs" / "toy" / "ppo").iterdir()] == ["version_0"]  # continued
    resumed = json.loads(summary.read_text())
    # the table's means of the same checkpoints may differ in the last float bits between two evaluations in
    # one process (a relative difference of 1e-7 in test_reward has been seen)
    assert [r["stage"] for r in resumed] == [r["stage"] for r in expected]
    for got, want in zip(resumed, expected):
        for key in ("test_accuracy", "test_reward", "test_kl", "test_gold_reward"):
            assert got[key] == (None if want[key] is None else pytest.approx(want[key], rel=1e-5, abs=1e-6)), (got["stage"], key)
    assert_same_checkpoint(tmp_path / "killed" / "checkpoints" / "toy" / "ppo.ckpt", tmp_path / "full" / "checkpoints" / "toy" / "ppo.ckpt")
