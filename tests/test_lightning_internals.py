"""What `rlhf_lightning.callbacks.lightning_internals` relies on in Lightning's private state, one test per behaviour,
on a tiny model: a Lightning upgrade that changes one fails here by name. Also the protected members the package's
subclasses of `ModelCheckpoint` and `RichProgressBar` override or call, and the SIGTERM path `ResumeCheckpoint` takes."""

from __future__ import annotations

import inspect
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from rlhf_lightning.callbacks.lightning_internals import (
    as_written_after_the_step,
    batches_that_stepped,
    first_logged_step,
    tensorboard_prefix,
    uncount_step,
)

STEPS = 6


class Tiny(L.LightningModule):
    """A linear layer on 8 one-row batches; records (batch_idx, batches_that_stepped, global_step) per training step
    and the count at each validation. Manual: two optimizer steps per batch, as PPO takes several per rollout."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.automatic_optimization = not manual
        self.seen: list[tuple[int, int, int]] = []
        self.validations: list[int] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.seen.append((batch_idx, batches_that_stepped(self.trainer), self.trainer.global_step))
        loss = self.layer(x).pow(2).mean()
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        for _ in range(2):
            opt.zero_grad()
            self.manual_backward(self.layer(x).pow(2).mean())
            opt.step()
        return None

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch[0]).pow(2).mean())

    def on_validation_epoch_end(self) -> None:
        self.validations.append(batches_that_stepped(self.trainer))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2, generator=torch.Generator().manual_seed(0))), batch_size=1)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 2)), batch_size=1)


class Recorder(Logger):
    """The steps at which Lightning hands each metric to its loggers."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[str, list[int]] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for name in metrics:
            self.steps.setdefault(name, []).append(step)


def trainer(logger: Logger | bool = False, val_every: int | None = None, callbacks=(), checkpointing: bool = False) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=logger, log_every_n_steps=1, callbacks=list(callbacks),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpointing, num_sanity_val_steps=0,
        limit_val_batches=0 if val_every is None else 1.0, val_check_interval=val_every,
    )


class SaveAtBatchStart(L.Callback):
    """`trainer.save_checkpoint` in the `on_train_batch_start` of the batch after `after` training batches, as
    `ResumeCheckpoint` writes a step's checkpoint, with the given internals applied to it."""

    def __init__(self, path: Path, after: int, rewind: bool = True, uncount: bool = False) -> None:
        self.path, self.after, self.rewind, self.uncount = path, after, rewind, uncount
        self.saving = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.total.completed == self.after and not self.path.exists():
            self.saving = True
            trainer.save_checkpoint(self.path)
            self.saving = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.saving and self.rewind:
            as_written_after_the_step(checkpoint)
        if self.saving and self.uncount:
            assert uncount_step(checkpoint)


def resumed(path: Path, val_every: int | None = None) -> tuple[Tiny, Recorder, L.Trainer]:
    module, logger = Tiny(), Recorder()
    fit = trainer(logger, val_every)
    fit.fit(module, ckpt_path=str(path))
    return module, logger, fit


# ---------------------------------------------------------------- batches_that_stepped


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_batches_that_stepped_is_the_step_lightnings_loggers_put_a_training_step_at(manual):
    module, logger = Tiny(manual=manual), Recorder()
    trainer(logger).fit(module)  # max_steps counts optimizer steps: 3 batches under manual optimization
    batches = STEPS // 2 if manual else STEPS
    assert [stepped for _, stepped, _ in module.seen] == list(range(batches)) == logger.steps["train_loss"]
    # global_step counts optimizer steps: two a batch under manual optimization
    assert [step for *_, step in module.seen] == [2 * i if manual else i for i in range(batches)]


def test_validation_logs_at_the_count_before_its_step_is_counted():
    module, logger = Tiny(), Recorder()
    trainer(logger, val_every=3).fit(module)
    assert module.validations == [2, 5] == logger.steps["val_loss"]


# ---------------------------------------------------------------- checkpoints written after a step


def test_a_checkpoint_of_the_next_batch_start_rewound_resumes_at_the_next_logging_step(tmp_path):
    path = tmp_path / "after3.ckpt"
    trainer(callbacks=[SaveAtBatchStart(path, after=3)]).fit(Tiny())
    checkpoint = torch.load(path, weights_only=True)
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert {k: progress["total"][k] for k in ("ready", "started", "processed", "completed")} == dict.fromkeys(
        ("ready", "started", "processed", "completed"), 3)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] == 3
    module, logger, fit = resumed(path)
    assert module.seen[0][1:] == (3, 3) and logger.steps["train_loss"] == [3, 4, 5]  # as the uninterrupted run
    assert first_logged_step(checkpoint) == 3 and fit.global_step == STEPS


def test_without_the_rewind_lightning_would_count_the_step_again(tmp_path):
    # what `as_written_after_the_step` corrects: the batch counted `ready` makes Lightning's restore count a step
    path = tmp_path / "after3.ckpt"
    trainer(callbacks=[SaveAtBatchStart(path, after=3, rewind=False)]).fit(Tiny())
    progress = torch.load(path, weights_only=True)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["ready"] == progress["started"] + 1
    _, logger, _ = resumed(path)
    assert logger.steps["train_loss"][0] == 4


def test_after_a_validation_the_uncounted_step_resumes_at_the_next_logging_step_without_validating_again(tmp_path):
    path = tmp_path / "after3.ckpt"
    full = Tiny()
    trainer(val_every=3, callbacks=[SaveAtBatchStart(path, after=3, uncount=True)]).fit(full)
    assert full.validations == [2, 5]
    checkpoint = torch.load(path, weights_only=True)
    module, logger, _ = resumed(path, val_every=3)
    assert logger.steps["train_loss"] == [3, 4, 5] and module.validations == [5]  # step 3's validation not repeated
    assert first_logged_step(checkpoint, uncounted=True) == 3


def test_after_a_validation_without_uncounting_lightning_would_count_the_step_again(tmp_path):
    # what `uncount_step` corrects: Lightning skips the validation done in an iteration that counts a step
    path = tmp_path / "after3.ckpt"
    trainer(val_every=3, callbacks=[SaveAtBatchStart(path, after=3)]).fit(Tiny())
    _, logger, _ = resumed(path, val_every=3)
    assert logger.steps["train_loss"][0] == 4


def test_first_logged_step_of_a_checkpoint_written_at_a_batch_end(tmp_path):
    # ModelCheckpoint's own point (on_train_batch_end): the batch is processed, not completed
    trainer(callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)], checkpointing=True).fit(Tiny())
    path = tmp_path / "epoch=0-step=3.ckpt"
    _, logger, _ = resumed(path)
    assert first_logged_step(torch.load(path, weights_only=True)) == logger.steps["train_loss"][0] == 3


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_prefix_is_the_prefix_of_the_tags_log_metrics_writes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run", prefix="stage")
    assert tensorboard_prefix(logger) == "stage" and tensorboard_prefix(TensorBoardLogger(tmp_path)) == ""
    logger.log_metrics({"loss": 1.0}, step=0)
    assert logger.experiment.file_writer is not None  # torch's writer of the event file: one event, many scalars
    logger.finalize("success")
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert events.Tags()["scalars"] == ["stage-loss"]


# ---------------------------------------------------------------- what the subclasses and ResumeCheckpoint use


def test_model_checkpoint_writes_every_file_through_save_checkpoint(tmp_path):
    # ResumeCheckpoint overrides `_save_checkpoint` (to defer and write atomically) and calls `_save_last_checkpoint`
    # with `_monitor_candidates`, and reads `_last_global_step_saved`
    class Recording(ModelCheckpoint):
        def _save_checkpoint(self, trainer, filepath) -> None:
            self._last_global_step_saved = trainer.global_step
            written.append(Path(filepath).name)

    written: list[str] = []
    trainer(callbacks=[Recording(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, save_last=True)], checkpointing=True).fit(Tiny())
    assert written[:3] == ["epoch=0-step=3.ckpt", "last.ckpt", "epoch=0-step=6.ckpt"] and set(written[3:]) == {"last.ckpt"}
    assert not list(tmp_path.glob("*.ckpt"))  # nothing else wrote them
    assert list(inspect.signature(ModelCheckpoint._save_last_checkpoint).parameters) == ["self", "trainer", "monitor_candidates"]
    assert list(inspect.signature(ModelCheckpoint._monitor_candidates).parameters) == ["self", "trainer"]
    assert ModelCheckpoint()._last_global_step_saved == 0


def test_rich_progress_bar_update_takes_a_bar_and_a_count():
    # SteadyRichProgressBar calls `_update(bar_id, count)` to end an epoch's bar on the count reached
    assert list(inspect.signature(RichProgressBar._update).parameters)[:3] == ["self", "progress_bar_id", "current"]


def test_sigterm_ends_the_step_then_raises_one_exception_whose_exit_code_a_callback_sets():
    # ResumeCheckpoint writes last.ckpt in `on_exception` and sets the exit code on the exception Lightning re-raises
    class Terminate(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 2:
                assert callable(signal.getsignal(signal.SIGTERM)), "Lightning installed no SIGTERM handler"
                os.kill(os.getpid(), signal.SIGTERM)

        def on_exception(self, trainer, pl_module, exception) -> None:
            self.seen = (exception, trainer.validating, trainer.fit_loop.epoch_loop.batch_progress.total.completed, trainer.global_step)
            exception.code = 128 + signal.SIGTERM

    callback, before = Terminate(), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException) as raised:
        trainer(callbacks=[callback]).fit(Tiny())
    assert raised.value.code == 143 and callback.seen == (raised.value, False, 3, 3)  # after step 3, complete
    assert signal.getsignal(signal.SIGTERM) == before  # Lightning put the previous handler back
