"""The `rlhf` command: `fit` (LightningCLI, any stage by YAML config), `eval`, and later subcommands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on use: `rlhf --help` and `rlhf eval` start without Lightning
    import lightning as L

COMMANDS = {
    "pipeline": ("rlhf_lightning.pipeline", "SFT -> reward model -> PPO in one go, then a test-split table."),
    "eval": ("rlhf_lightning.evaluate", "Answer held-out prompts with an SFT, PPO or DPO checkpoint, report accuracy."),
    "export": ("rlhf_lightning.export", "Write the policy of an SFT, PPO or DPO checkpoint as safetensors + JSON (no code can ride along)."),
}


def config_root() -> Path:
    """The shipped configs: `rlhf_lightning/configs` in an installed wheel, the top-level `configs/` in a source tree."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def resolve_config(name: str) -> str:
    """A config file path as given, or a shipped config by name: `toy/sft`, `toy/sft.yaml`, `configs/toy/sft.yaml`.

    Only the config file is looked up; relative paths inside it (checkpoints, logs, data) stay relative to the
    working directory.
    """
    if Path(name).is_file():
        return name
    relative = name[len("configs/") :] if name.startswith("configs/") else name
    for candidate in (config_root() / relative, config_root() / f"{relative}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return name  # the parser reports the missing file


def resolve_config_args(args: list[str]) -> list[str]:
    """`--config NAME` / `--config=NAME` / `-c NAME` with NAME resolved by `resolve_config`."""
    out, it = [], iter(args)
    for arg in it:
        if arg in ("--config", "-c"):
            out += [arg, resolve_config(next(it, ""))]
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def moved_options(args: list[str]) -> list[str]:
    """`args` with the module's flat options of earlier releases moved into their groups (`option_groups.MOVED`),
    in `--model.init_args.<name>` flags and in the config files they name, each with one warning naming the new key.

    The stage is the last `model.class_path` the config files and flags set. A config file with a moved key is
    given to the parser as its regrouped text."""
    import warnings

    import yaml

    from rlhf_lightning.option_groups import MOVED, regroup

    def flag(i: int) -> tuple[str, str | None, bool]:  # (name, value, value in the next arg)
        name, eq, value = args[i].partition("=")
        return (name, value, False) if eq else (name, args[i + 1] if i + 1 < len(args) else None, True)

    configs: dict[int, dict] = {}  # arg index -> the config file it names, parsed
    stage = None
    for i, arg in enumerate(args):
        name, value, _ = flag(i)
        if name in ("--config", "-c") and value and Path(value).is_file():
            config = yaml.safe_load(Path(value).read_text())
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict):
                configs[i] = config
                stage = str(model.get("class_path") or stage).rsplit(".", 1)[-1]
        elif name in ("--model", "--model.class_path") and value:
            stage = value.rsplit(".", 1)[-1]
    moved = MOVED.get(stage or "", {})
    if not moved:
        return args
    out, renamed = list(args), []
    for i, arg in enumerate(args):
        name, value, separate = flag(i)
        if i in configs and isinstance(configs[i]["model"].get("init_args"), dict):
            init_args, pairs = regroup(stage, configs[i]["model"]["init_args"])
            if pairs:
                renamed += [(f"{value}: model.init_args.{old}", new) for old, new in pairs]
                text = yaml.safe_dump({**configs[i], "model": {**configs[i]["model"], "init_args": init_args}}, sort_keys=False)
                out[i + 1 if separate else i] = text if separate else f"{name}={text}"
        elif name.startswith("--model.init_args."):
            option, _, rest = name[len("--model.init_args."):].partition(".")
            if option in moved and not (rest and option == moved[option].partition(".")[0]):  # `--model.init_args.reward.source`: a group's field, the new form
                new = moved[option] + (f".{rest}" if rest else "")
                out[i] = f"--model.init_args.{new}" + ("" if separate else f"={value}")
                renamed.append((f"--model.init_args.{option}", moved[option]))
    for old, new in renamed:
        warnings.warn(f"{old} is deprecated: it is now model.init_args.{new} ({stage}'s options are grouped)", FutureWarning, stacklevel=2)
    return out


def nested_nulls(args: list[str]) -> list[str]:
    """`--model.init_args.<group>.<field>=null` as `--model.init_args.<group>={<field>: null}`: jsonargparse refuses
    a dotted null inside a dataclass group of a subclass-mode module (the mapping form merges with the group's other
    fields the same way)."""
    from rlhf_lightning.option_groups import MOVED

    groups = {new.split(".")[0] for moved in MOVED.values() for new in moved.values() if "." in new} | {"online"}
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        parts = name[len("--model.init_args."):].split(".") if name.startswith("--model.init_args.") else []
        if eq and len(parts) == 2 and parts[0] in groups and value.strip() in ("null", "None", "~"):
            arg = f"--model.init_args.{parts[0]}={{{parts[1]}: null}}"
        out.append(arg)
    return out


# Library output we cannot fix at its source, dropped by exact text; everything else is shown.
QUIET_LOG_MESSAGES = (
    "💡 Tip: For seamless cloud logging and experiment tracking,",  # an advertisement printed by every Trainer
    "`Trainer(val_check_interval=1.0)` was configured so validation will run at the end of the training epoch..",
    "Loading `train_dataloader` to estimate number of stepping batches.",
)
QUIET_WARNINGS = (
    # raised inside Lightning's own pytree helper under torch >= 2.10, not by our calls
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead.",
    # Lightning checks the DataLoader for state; ours lives in the DataModule (data/base.py), which it restores
    "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable.",
    # PPO checkpoints after a rollout's updates on purpose: that is the state a resumed run continues from
    "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state was saved.",
)


def _keep_log_record(record) -> bool:
    return not str(record.msg).startswith(QUIET_LOG_MESSAGES)


def quiet_library_output() -> None:
    """Filter the messages above from Lightning's log handlers and Python's warnings (idempotent)."""
    import logging
    import re
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if _keep_log_record not in handler.filters:
                handler.addFilter(_keep_log_record)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message))


def check_output_paths(trainer) -> None:
    """Refuse, before any training, output locations that cannot be folders (an existing file in the way)."""
    from rlhf_lightning.callbacks import FinalCheckpoint

    places = []
    if trainer.logger is not None and getattr(trainer.logger, "save_dir", None):
        places.append(("trainer.logger.init_args.save_dir", Path(trainer.logger.save_dir)))
    for callback in trainer.callbacks:
        if isinstance(callback, FinalCheckpoint):
            places.append((f"{type(callback).__name__}.path", Path(callback.path).parent))
        elif getattr(callback, "dirpath", None):
            places.append((f"{type(callback).__name__}.dirpath", Path(callback.dirpath)))
    for option, folder in places:
        for p in (folder, *folder.parents):
            if p.exists() and not p.is_dir():
                raise NotADirectoryError(f"{option}: {str(p)!r} is an existing file, not a folder (output goes under {str(folder)!r})")


def prepare_resume(trainer, model, datamodule, ckpt_path: str, logger_config=None) -> str:
    """The checkpoint `--ckpt_path` names (`last`: the checkpoint folder's last.ckpt), checked before any training.

    Refused with one line: no last.ckpt, a file that does not load (e.g. truncated), another stage's checkpoint,
    or one written with a different config (the first differing field is named); never a silent fresh start.
    A TensorBoard logger continues the run folder the checkpoint was logging to, from the first step the
    resumed run logs (TensorBoard drops the interrupted run's points from that step on: no duplicates): it is
    built again with `version=` and `purge_step=` (`logger_config`: the config's `trainer.logger`, whose
    `class_path`, `init_args` and `dict_kwargs` built it).
    """
    from rlhf_lightning.callbacks.lightning_internals import first_logged_step
    from rlhf_lightning.checkpoints import CheckpointError, check_resume

    if ckpt_path == "last":
        folders = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        if not folders:
            raise CheckpointError("ckpt_path: 'last' needs a ModelCheckpoint callback with a dirpath in the config")
        found = last_checkpoint(trainer)
        if found is None:
            raise CheckpointError(f"ckpt_path: no last.ckpt in {str(folders[0])!r} to resume from (leave out --ckpt_path to start a new run)")
        ckpt_path = str(found)
    expected = {"hyper_parameters": dict(model.hparams), "state_dict": {}}
    model.on_save_checkpoint(expected)  # what this run would write: stage, model, tokenizer, input hashes
    checkpoint = check_resume(ckpt_path, expected, dict(datamodule.hparams) if datamodule is not None else {})
    resume = checkpoint.get("resume", {})
    if resume.get("logger_version") is not None:
        purge_step = first_logged_step(checkpoint, uncounted=bool(resume.get("uncounted_step", False)))
        loggers = list(trainer.loggers)  # the version recorded is the first logger's (`trainer.logger`)
        if loggers:
            entry = logger_config[0] if isinstance(logger_config, list) and logger_config else logger_config
            trainer.loggers = [continued_logger(loggers[0], entry, resume["logger_version"], purge_step), *loggers[1:]]
    return ckpt_path


def continued_logger(logger, entry, version, purge_step: int):
    """A TensorBoard logger built as `logger` was, writing into run folder `version` from step `purge_step` on
    (TensorBoard drops the folder's earlier events at or after that step); any other logger as it is.

    `entry`: the config's `trainer.logger` entry that built `logger` (`class_path`, `init_args`, `dict_kwargs`);
    without one (Lightning's default logger), it is built from `logger`'s save folder, name and sub-folder.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(logger, TensorBoardLogger):
        return logger
    class_path = entry.get("class_path") if hasattr(entry, "get") else None
    if class_path is not None and class_path.rsplit(".", 1)[-1] == type(logger).__name__:
        kwargs = {**_as_dict(entry.get("init_args")), **_as_dict(entry.get("dict_kwargs"))}
    else:
        kwargs = {"save_dir": logger.save_dir, "name": logger.name, "sub_dir": logger.sub_dir, "log_graph": logger.log_graph}
    return type(logger)(**{**kwargs, "version": version, "purge_step": purge_step})


def _as_dict(options) -> dict:
    if options is None:
        return {}
    return options.as_dict() if hasattr(options, "as_dict") else dict(options)


def last_checkpoint(trainer) -> Path | None:
    """`last.ckpt` in the folder of the first checkpoint callback that has one (a file, or a sharded run's folder)."""
    folders = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return next((f / "last.ckpt" for f in folders if (f / "last.ckpt").exists()), None)


def _project_error(err: BaseException) -> BaseException | None:
    """The first of this project's input errors in `err`'s chain of causes, if any."""
    from rlhf_lightning.checkpoints import CheckpointError
    from rlhf_lightning.data.jsonl import DataError
    from rlhf_lightning.options import ConfigError
    from rlhf_lightning.rewards import RewardError
    from rlhf_lightning.tokenizer import UnknownCharacterError

    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, (CheckpointError, ConfigError, DataError, RewardError, UnknownCharacterError)):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def lightning_cli(args: list[str] | None = None, run: bool = True, cli_class: type | None = None, resume_last: bool = False):
    """The LightningCLI behind `rlhf fit|validate|...`: any LightningModule/DataModule by class_path.

    `resume_last`: continue from the checkpoint folder's last.ckpt when there is one (`rlhf pipeline --resume`).
    """
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    quiet_library_output()

    class RLHFCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # A DataModule is given the module's tokenizer (it travels in the module's checkpoint) and length limit.
            parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")
            parser.link_arguments("model.data_max_length", "data.init_args.max_length", apply_on="instantiate")

        def parse_arguments(self, parser, args) -> None:
            # `args` is always this command's own argv (resolved): no warning about also having sys.argv
            self.config = parser.parse_args(args)
            # LightningCLI reads the hyperparameters of a checkpoint `ckpt_path` names into the config once the
            # arguments are parsed; a resumed run keeps this run's config instead (`prepare_resume` refuses a
            # checkpoint of another one), so the path is set aside until the classes are built
            self.resume_from = None
            subcommand = self.config.get("subcommand")
            if subcommand and self.config[subcommand].get("ckpt_path"):
                self.resume_from, self.config[subcommand]["ckpt_path"] = self.config[subcommand]["ckpt_path"], None

        def before_instantiate_classes(self) -> None:
            if self.resume_from is not None:
                self.config[self.subcommand]["ckpt_path"] = self.resume_from

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except ValueError as err:  # jsonargparse wraps errors raised in __init__: surface ours as they are
                raise _project_error(err) or err from None

        def instantiate_trainer(self, **kwargs):
            from rlhf_lightning.callbacks import steady_progress_bar

            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            given = config.get("trainer", {}).get("callbacks") or []  # (the Trainer adds its defaults to this list)
            given = [*(given if isinstance(given, list) else [given]), *(kwargs.get("callbacks") or [])]
            trainer = super().instantiate_trainer(**kwargs)
            steady_progress_bar(trainer, given)  # Lightning's default Rich bar, updated at most every 0.1 s
            return trainer

        def before_fit(self) -> None:
            from lightning.pytorch.strategies import ModelParallelStrategy

            from rlhf_lightning.callbacks import StageLog
            from rlhf_lightning.models.hf import check_rank0_loading

            check_rank0_loading(self.model, sharded=isinstance(self.trainer.strategy, ModelParallelStrategy))
            check_output_paths(self.trainer)
            self.trainer.callbacks.append(StageLog())
            self.trainer.callbacks.append(_discard_new_run_on_bad_input(self.trainer))
            config = self.config_init[self.subcommand]
            if resume_last and not config.get("ckpt_path") and last_checkpoint(self.trainer) is not None:
                config["ckpt_path"] = "last"
            if config.get("ckpt_path"):
                logger_config = self.config[self.subcommand].get("trainer", {}).get("logger")
                config["ckpt_path"] = prepare_resume(self.trainer, self.model, self.datamodule, config["ckpt_path"], logger_config)

    return (cli_class or RLHFCLI)(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=nested_nulls(moved_options(resolve_config_args(sys.argv[1:] if args is None else args))),
        run=run,
    )


def _bad_input_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input (one line, exit 2)."""
    from rlhf_lightning.checkpoints import CheckpointError
    from rlhf_lightning.data.jsonl import DataError
    from rlhf_lightning.options import ConfigError
    from rlhf_lightning.rewards import RewardError
    from rlhf_lightning.tokenizer import UnknownCharacterError

    return (DataError, CheckpointError, ConfigError, UnknownCharacterError, RewardError, NotADirectoryError)


def _discard_new_run_on_bad_input(trainer) -> L.Callback:
    """A callback that removes the logger's run folder when bad input stops `fit` before any optimizer step, if this run
    created that folder: Lightning creates it (an empty event file, the saved config) before the DataModule reads
    its files, and a refused run leaves nothing behind. A resumed run's folder, or one with steps, is never removed."""
    import shutil

    import lightning as L

    created = None  # the topmost folder of the run's log folder that does not exist yet (this run would create it)
    if trainer.logger is not None and trainer.logger.log_dir is not None:
        folder = Path(trainer.logger.log_dir).absolute()
        while not folder.exists():
            created, folder = folder, folder.parent

    class DiscardNewRunOnBadInput(L.Callback):
        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            if created is not None and trainer.global_step == 0 and isinstance(exception, _bad_input_errors()) and trainer.is_global_zero:
                shutil.rmtree(created, ignore_errors=True)

    return DiscardNewRunOnBadInput()


def main(argv: list[str] | None = None) -> int:
    """Bad input (data, checkpoints, options, output paths) ends with one clear line and exit code 2."""
    try:
        return _dispatch(sys.argv[1:] if argv is None else argv)
    except _bad_input_errors() as err:
        if not _reported_by_rank_0(err):
            print(f"rlhf: error: {err}", file=sys.stderr)
        return 2


def _reported_by_rank_0(err: BaseException) -> bool:
    """An option's error on a process a launcher started beside rank 0 (every rank parses the same options, so every
    rank refuses alike): rank 0 prints it, once. Data and checkpoint errors print on every rank that meets them."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    from rlhf_lightning.options import ConfigError

    return isinstance(err, ConfigError) and (_get_rank() or 0) > 0


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        import importlib

        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rlhf {fit,validate," + ",".join(COMMANDS) + "} ...\n")
        print("  fit         train a stage: rlhf fit --config configs/toy/sft.yaml (LightningCLI)")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<11} {text}")
        if not argv:
            return 2
    lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
