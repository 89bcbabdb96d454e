"""The `rlhf` command: `fit` (LightningCLI, any stage by YAML config), `eval`, and later subcommands."""

from __future__ import annotations

import sys

COMMANDS = {
    "pipeline": ("rlhf_lightning.pipeline", "SFT -> reward model -> PPO in one go, then a test-split table."),
    "eval": ("rlhf_lightning.evaluate", "Answer held-out prompts with a checkpoint, report accuracy."),
    "export": ("rlhf_lightning.export", "Write a policy as safetensors + JSON (no code can ride along)."),
}


def lightning_cli(args: list[str] | None = None, run: bool = True, cli_class: type | None = None):
    """The LightningCLI behind `rlhf fit|validate|...`: any LightningModule/DataModule by class_path."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    return (cli_class or LightningCLI)(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
