"""PPO training options: dynamic sampling (`filter_groups`), the gold-reward monitor, the best policy on `val`, warm-up."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch

from conftest import CONFIGS, QUIET, run_cli
from rlhf_lightning.callbacks import log_step_metrics, write_step_metrics
from rlhf_lightning.data.rollout_prompts import PromptStream
from rlhf_lightning.generation import Generation
from rlhf_lightning.modules.ppo import PPOModule, Samples, informative_groups

PPO_YAML = str(CONFIGS / "toy" / "ppo.yaml")


def test_informative_groups_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.0])
    assert informative_groups(rewards, 2).tolist() == [False, True, False, True]
    assert informative_groups(rewards, 4).tolist() == [True, True]


def test_samples_cat_repads_prompts_left_and_completions_right():
    def samples(prompt_rows, completion_rows, reward):
        P, N = max(map(len, prompt_rows)), max(map(len, completion_rows))
        pid = torch.tensor([[0] * (P - len(r)) + r for r in prompt_rows])
        pmask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in prompt_rows])
        cid = torch.tensor([r + [0] * (N - len(r)) for r in completion_rows])
        cmask = torch.tensor([[True] * len(r) + [False] * (N - len(r)) for r in completion_rows])
        lengths = cmask.sum(1)
        gen = Generation(cid, cmask, cmask.float() * -0.5, lengths, torch.ones(len(lengths), dtype=torch.bool))
        n = len(prompt_rows)
        return Samples(pid, pmask, gen, torch.full((n,), reward), ["p"] * n, ["c"] * n, [None] * n)

    a = samples([[5, 6], [7, 8]], [[9], [10]], 1.0)
    b = samples([[4, 5, 6]], [[11, 12, 13]], 0.0)
    cat = Samples.cat([a, b], pad_id=0)
    assert cat.prompt_ids.tolist() == [[0, 5, 6], [0, 7, 8], [4, 5, 6]]
    assert cat.prompt_mask.tolist() == [[False, True, True], [False, True, True], [True, True, True]]
    assert cat.gen.completion_ids.tolist() == [[9, 0, 0], [10, 0, 0], [11, 12, 13]]
    assert cat.gen.completion_mask.sum(1).tolist() == [1, 1, 3] == cat.gen.lengths.tolist()
    assert cat.gen.logprobs.tolist() == [[-0.5, 0, 0], [-0.5, 0, 0], [-0.5, -0.5, -0.5]]
    assert cat.rewards.tolist() == [1.0, 1.0, 0.0]
    kept = cat.select_groups(torch.tensor([False, True, True]), 1)
    assert kept.prompt_ids.tolist() == [[0, 7, 8], [4, 5, 6]]


def test_prompt_stream_resumes_exactly():
    stream = PromptStream(size=10, seed=3)
    stream.take(7)
    state = stream.state_dict()
    expected = stream.take(25)  # crosses two epoch boundaries
    other = PromptStream(size=10, seed=99)
    other.load_state_dict(state)
    assert other.take(25) == expected
    assert sorted(expected[3:13]) == list(range(10))  # epoch 1 is a permutation


class HalfUniformReward:
    """Groups of prompts with an even first operand all get 1.0 (no signal); the others alternate 0/1 by row."""

    name = "judge"

    def __call__(self, prompts, completions, ended, golds):
        uniform = [int(p.split(" ")[1].split("+")[0].split("-")[0]) % 2 == 0 for p in prompts]
        return torch.tensor([1.0 if u else float(i % 2) for i, u in enumerate(uniform)])


class UniformReward:
    name = "judge"

    def __call__(self, prompts, completions, ended, golds):
        return torch.ones(len(prompts))


def dynamic_run(sft_ckpt, tmp_path, reward, *extra):
    """A 2-rollout PPO run with `reward` patched in; returns (cli, the rollouts given to the update)."""
    from rlhf_lightning.cli import lightning_cli
    import os

    args = [
        "--config", PPO_YAML, *QUIET, "--trainer.logger=false", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false", f"--model.init_args.policy_ckpt={sft_ckpt}",
        "--model.init_args.reward.source=judge", "--model.init_args.rollout.advantage=group_mean", "--model.init_args.rollout.filter_groups=true",
        "--model.init_args.rollout.samples_per_prompt=2", "--model.init_args.eval.every=0", "--data.init_args.batch_size=8",
        "--data.init_args.max_val_prompts=16", "--trainer.limit_train_batches=2", *extra,
    ]
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        cli = lightning_cli(args, run=False)
        cli.model.scorer.source = reward
        seen, update = [], cli.model.ppo_update
        cli.model.ppo_update = lambda rollout: seen.append(rollout) or update(rollout)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        os.chdir(old)
    return cli, seen


def test_filter_groups_keeps_only_mixed_groups_at_the_full_batch_size(sft_ckpt, tmp_path):
    cli, seen = dynamic_run(sft_ckpt, tmp_path, HalfUniformReward(), "--model.init_args.rollout.max_sampling_rounds=8")
    assert len(seen) == 2
    for rollout in seen:
        assert rollout.rewards.numel() == 8 * 2  # batch_size groups of K = 2
        assert informative_groups(rollout.rewards, 2).all()
        assert rollout.advantages.abs().min() > 0  # every kept row carries a signal
    metrics = cli.trainer.callback_metrics
    drawn = float(metrics["rollout/prompts_drawn"])
    assert drawn > 8 and float(metrics["rollout/sampling_rounds"]) == drawn / 8  # more rounds drew more prompts
    assert float(metrics["rollout/kept_groups_frac"]) == pytest.approx(8 / drawn)
    assert float(metrics["rollout/skipped_updates"]) == 0
    # the extra rounds' prompts came from the DataModule's stream, which advanced by what they drew
    stream = cli.datamodule.stream.state_dict()
    assert stream["epoch"] * len(cli.datamodule.train_set) + stream["position"] > 0


def test_all_uniform_rewards_skip_the_update(sft_ckpt, tmp_path):
    cli, seen = dynamic_run(sft_ckpt, tmp_path, UniformReward(), "--model.init_args.rollout.max_sampling_rounds=2")
    assert seen == []  # nothing to learn from: no update, no error
    module = cli.model
    assert module._rollouts == 2 and module._skipped_updates == 2 and cli.trainer.global_step == 0
    assert float(cli.trainer.callback_metrics["rollout/skipped_updates"]) == 2
    assert float(cli.trainer.callback_metrics["rollout/kept_groups_frac"]) == 0
    start = PPOModule(policy_ckpt=str(sft_ckpt), reward=dict(source="judge")).model
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), module.model.parameters()))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"filter_groups": True, "advantage": "batch_mean"}, "filter_groups: true needs an advantage with groups"),
        ({"filter_groups": True, "advantage": "batch_whiten"}, "advantage 'batch_whiten' has none"),
        ({"filter_groups": True, "advantage": "rloo", "samples_per_prompt": 1}, "needs samples_per_prompt >= 2"),
        ({"max_sampling_rounds": 0}, "max_sampling_rounds: 0 is not allowed"),
    ],
)
def test_dynamic_sampling_bad_options(sft_ckpt, options, message):
    with pytest.raises(ValueError, match=message):
        PPOModule(policy_ckpt=str(sft_ckpt), rollout=options, reward=dict(source="judge"))


def test_gold_reward_is_logged_beside_a_learned_reward(sft_ckpt, reward_ckpt, tmp_path):
    module = PPOModule(policy_ckpt=str(sft_ckpt), reward=dict(source="learned", ckpt=str(reward_ckpt)), rollout=dict(samples_per_prompt=4))
    from rlhf_lightning.data.prompts import PromptDataset, load_prompts
    from rlhf_lightning.rl.rollout import Drawn, rollout_metrics
    from rlhf_lightning.tasks.arithmetic import judge_scores

    ds = PromptDataset(module.tokenizer, load_prompts("toy", "train", limit=16), module.data_max_length)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    drawn = module.sample(batch)
    metrics = rollout_metrics(Drawn([drawn]), 4, False, module.gold_scores(Drawn([drawn])))
    gold = judge_scores(drawn.completions, drawn.golds, drawn.gen.finished).mean()
    assert float(metrics["rollout/gold_reward"]) == pytest.approx(float(gold))
    assert float(metrics["rollout/reward_mean"]) == pytest.approx(float(drawn.rewards.mean()))
    # the judge as the reward: no separate gold monitor
    judged = PPOModule(policy_ckpt=str(sft_ckpt), reward=dict(source="judge"), rollout=dict(samples_per_prompt=4))
    assert judged.gold_scores(Drawn([judged.sample(batch)])) is None


def test_dynamic_sampling_bad_option_from_the_shell(sft_ckpt, tmp_path, capsys):
    from rlhf_lightning.cli import main

    code = main(["fit", "--config", PPO_YAML, f"--model.init_args.policy_ckpt={sft_ckpt}", "--model.init_args.reward.source=judge",
                 "--model.init_args.rollout.filter_groups=true", "--model.init_args.rollout.advantage=batch_mean"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("rlhf: error: model.init_args.rollout.filter_groups: true needs an advantage with groups")


def test_keep_best_replaces_the_kept_policy_only_by_the_minimum_gain(sft_ckpt):
    module = PPOModule(policy_ckpt=str(sft_ckpt), reward=dict(source="judge"), eval=dict(keep_best_min_gain=0.25))  # binary fractions: exact
    for rollout, accuracy in enumerate([0.25, 0.375, 0.5, 0.5, 0.875]):  # kept: 0.25, then 0.5 (+0.25), then 0.875
        module._rollouts = rollout
        module.remember_if_best(accuracy)
        assert module._best["rollout"] == {0: 0, 1: 0, 2: 2, 3: 2, 4: 4}[rollout], rollout
    module.eval_cfg = dataclasses.replace(module.eval_cfg, keep_best_min_gain=0.0)  # the module's default: a tie replaces it (the latest of the best)
    module._rollouts = 5
    module.remember_if_best(0.875)
    assert module._best["rollout"] == 5 and module._best["accuracy"] == 0.875


@pytest.mark.parametrize("keep_best", [True, False])
def test_final_checkpoint_is_the_best_policy_on_val(sft_ckpt, tmp_path, keep_best):
    """A learning rate that wrecks the policy: the final checkpoint is the best evaluation (here the SFT start),
    unless `keep_best` is off."""
    from rlhf_lightning.evaluate import evaluate_policy

    cli = run_cli([
        "fit", "--config", PPO_YAML, *QUIET, "--trainer.logger=false", f"--model.init_args.policy_ckpt={sft_ckpt}",
        "--model.init_args.reward.source=judge", "--model.init_args.optim.lr=0.05", "--model.init_args.eval.every=1",
        f"--model.init_args.eval.keep_best={str(keep_best).lower()}", "--trainer.limit_train_batches=3",
        "--data.init_args.batch_size=8", "--data.init_args.max_val_prompts=128",
    ], tmp_path)
    history = [e["eval/accuracy"] for e in cli.model.eval_history]
    assert len(history) == 4 and max(history) > history[-1]  # the run did lose accuracy
    final = tmp_path / "checkpoints" / "toy" / "ppo.ckpt"
    summary, _ = evaluate_policy(str(final), split="val", limit=128, max_new_tokens=cli.model.cfg.rollout.max_new_tokens)
    best, gain = 0, cli.model.eval_cfg.keep_best_min_gain  # the start, replaced only by a gain of at least `gain`
    for i, accuracy in enumerate(history):
        best = i if accuracy >= history[best] + gain else best
    chosen = torch.load(final, weights_only=True)["rlhf"]["chosen"]
    if keep_best:
        assert summary["accuracy"] == pytest.approx(history[best], abs=1e-6) and chosen["rollout"] == best
    else:
        assert summary["accuracy"] == pytest.approx(history[-1], abs=1e-6) and chosen["rollout"] == 3


def test_warmup_raises_the_learning_rate_linearly_then_holds(sft_ckpt, tmp_path):
    cli = run_cli([
        "fit", "--config", PPO_YAML, *QUIET, "--trainer.logger=false", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false", f"--model.init_args.policy_ckpt={sft_ckpt}",
        "--model.init_args.reward.source=judge", "--model.init_args.optim.lr=1e-4", "--model.init_args.optim.warmup_steps=10",
        "--model.init_args.update.ppo_epochs=2", "--model.init_args.update.num_minibatches=2", "--model.init_args.eval.every=0",
        "--trainer.limit_train_batches=2", "--data.init_args.batch_size=8", "--data.init_args.max_val_prompts=16",
    ], tmp_path)
    steps = cli.trainer.global_step
    assert steps == 2 * 2 * 2  # rollouts x ppo_epochs x minibatches
    lr = cli.model.optimizers().param_groups[0]["lr"]
    assert lr == pytest.approx(1e-4 * (steps + 1) / 10)  # the factor of the next step
    assert isinstance(PPOModule(policy_ckpt=str(sft_ckpt), reward=dict(source="judge")).configure_optimizers(), torch.optim.AdamW)  # off by default


class _TwoWayLogging(L.LightningModule):
    """A step that logs the same values through `self.log` and through `log_step_metrics`, in manual or automatic
    optimization."""

    def __init__(self, manual: bool) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        value = batch[0].sum() * 0.5 + batch_idx
        self.log("via/self_log", value, prog_bar=True)
        log_step_metrics(self, {"via/helper": value, "via/float": float(batch_idx)}, prog_bar={"helper": "via/helper"})
        if self.automatic_optimization:
            return (self.w * batch[0]).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        write_step_metrics(self)

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(7.0)[:, None], batch_size=1)


class _StopAt(L.Callback):
    """Stops training from `on_train_batch_end` at a step, as a `max_time` Timer does."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.fit_loop.epoch_loop._batches_that_stepped == self.step:
            trainer.should_stop = True


class _BarValues(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        shown = trainer.progress_bar_callback.get_metrics(trainer, pl_module)
        self.seen.append((float(shown["via/self_log"]), float(shown["helper"])))


@pytest.mark.parametrize("manual, every, accumulate, stop", [(True, 1, 1, None), (True, 3, 1, None), (False, 3, 1, None),
                                                         (False, 1, 2, None), (True, 3, 1, 4), (False, 3, 1, 4)])
def test_step_metrics_are_written_where_and_as_self_log_writes_them(tmp_path, manual, every, accumulate, stop):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger, bar = TensorBoardLogger(str(tmp_path), name="log"), _BarValues()
    trainer = L.Trainer(max_epochs=2, log_every_n_steps=every, logger=logger, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", callbacks=[bar, _StopAt(stop)],
                        accumulate_grad_batches=accumulate if not manual else 1)
    trainer.fit(_TwoWayLogging(manual))
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    lightning = [(e.step, e.value) for e in events.Scalars("via/self_log")]
    assert lightning and len(lightning) <= 14 // every // accumulate + 1  # Lightning's cadence over 14 steps
    assert [(e.step, e.value) for e in events.Scalars("via/helper")] == lightning
    assert [e.value for e in events.Scalars("via/float")] == [pytest.approx(v / 1.5) for _, v in lightning]  # batch_idx
    if stop is not None:  # the step where a callback stopped training is written, as Lightning writes its own
        assert lightning[-1][0] == stop
    last = trainer.callback_metrics["via/self_log"]
    assert float(trainer.callback_metrics["via/helper"]) == float(trainer.callback_metrics["helper"]) == float(last)
    assert trainer.logged_metrics["via/helper"] == pytest.approx(float(trainer.logged_metrics["via/self_log"]))
    assert bar.seen and all(a == b for a, b in bar.seen)  # the bar shows the same value at every step


def test_the_steady_bar_updates_at_most_every_interval_and_at_an_epochs_end(tmp_path, monkeypatch):
    from rlhf_lightning.callbacks import SteadyRichProgressBar
    from rlhf_lightning.cli import lightning_cli

    bar = SteadyRichProgressBar(min_interval=3600.0)  # nothing but the first and the last batch of an epoch
    updates = []
    original = SteadyRichProgressBar._update_metrics
    monkeypatch.setattr(SteadyRichProgressBar, "_update_metrics", lambda self, t, m: (updates.append(t.fit_loop.epoch_loop.batch_idx), original(self, t, m)))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", callbacks=[bar])
    trainer.fit(_TwoWayLogging(manual=True))
    assert trainer.progress_bar_callback is bar
    # the bar's values are read from the device only when it draws, the last batch included: it ends on the last value
    assert trainer.progress_bar_metrics["helper"] == pytest.approx(float(trainer.callback_metrics["via/helper"]))
    # the first batch, then only each epoch's last (7th) batch and its end: 5 updates where the plain bar makes 16
    assert updates == [0, 6, 6, 6, 6]
    # stopped by max_steps mid-epoch: the bar still ends on the count reached
    counts = []
    original_update = SteadyRichProgressBar._update
    monkeypatch.setattr(SteadyRichProgressBar, "_update", lambda self, bar_id, current, **kw: (counts.append(current), original_update(self, bar_id, current, **kw)))
    L.Trainer(max_steps=4, logger=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
              callbacks=[SteadyRichProgressBar(min_interval=3600.0)]).fit(_TwoWayLogging(manual=False))  # 4 optimizer steps
    assert counts[0] == 1 and counts[-1] == 4
    # `rlhf fit` swaps in the steady bar where Lightning picked its default Rich one, and leaves an explicit choice alone
    monkeypatch.chdir(tmp_path)
    cli = lightning_cli(["--config", "toy/sft", "--trainer.max_steps=1", "--trainer.logger=false"], run=False)
    assert type(cli.trainer.progress_bar_callback) is SteadyRichProgressBar
    cli = lightning_cli(["--config", "toy/sft", "--trainer.max_steps=1", "--trainer.logger=false",
                         "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], run=False)
    assert type(cli.trainer.progress_bar_callback).__name__ == "TQDMProgressBar"
