"""The `rlhf` command: `fit` (LightningCLI, any stage by YAML config), `eval`, and later subcommands."""

from __future__ import annotations

import sys

COMMANDS = {
    "pipeline": ("rlhf_lightning.pipeline", "SFT -> reward model -> PPO in one go, then a test-split table."),
    "eval": ("rlhf_lightning.evaluate", "Answer held-out prompts with a checkpoint, report accuracy."),
    "export": ("rlhf_lightning.export", "Write a policy as safetensors + JSON (no code can ride along)."),
}


def check_output_paths(trainer) -> None:
    """Refuse, before any training, output locations that cannot be folders (an existing file in the way)."""
    from pathlib import Path

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


def lightning_cli(args: list[str] | None = None, run: bool = True, cli_class: type | None = None):
    """The LightningCLI behind `rlhf fit|validate|...`: any LightningModule/DataModule by class_path."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class RLHFCLI(LightningCLI):
        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except ValueError as err:  # jsonargparse wraps errors raised in __init__: surface ours as they are
                raise _project_error(err) or err from None

        def before_fit(self) -> None:
            check_output_paths(self.trainer)

    return (cli_class or RLHFCLI)(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    """Bad input (data, checkpoints, options, output paths) ends with one clear line and exit code 2."""
    from rlhf_lightning.checkpoints import CheckpointError
    from rlhf_lightning.data.jsonl import DataError
    from rlhf_lightning.options import ConfigError
    from rlhf_lightning.rewards import RewardError
    from rlhf_lightning.tokenizer import UnknownCharacterError

    try:
        return _dispatch(sys.argv[1:] if argv is None else argv)
    except (DataError, CheckpointError, ConfigError, UnknownCharacterError, RewardError, NotADirectoryError) as err:
        print(f"rlhf: error: {err}", file=sys.stderr)
        return 2


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
