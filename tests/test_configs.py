"""Every shipped YAML parses against the code, and --print_config works."""

import contextlib
import io
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from conftest import CONFIGS
from rlhf_lightning.cli import lightning_cli

FIT_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if "trainer" in yaml.safe_load(p.read_text()))


def test_there_are_configs():
    assert {p.relative_to(CONFIGS).as_posix() for p in FIT_CONFIGS} >= {"toy/sft.yaml", "seed/sft.yaml"}


class ParseOnly(LightningCLI):
    """Parse and type-check a config without building it (later stages need earlier stages' checkpoints)."""

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_parses_against_the_code(path: Path):
    cli = lightning_cli(["--config", str(path)], run=False, cli_class=ParseOnly)
    assert cli.config.model.class_path.startswith("rlhf_lightning.modules")
    assert cli.config.data.class_path.startswith("rlhf_lightning.data")


@pytest.mark.parametrize("path", [p for p in FIT_CONFIGS if p.name == "sft.yaml" and p.parent.name != "hf"], ids=lambda p: p.parent.name)
def test_sft_configs_instantiate(path: Path):
    cli = lightning_cli(["--config", str(path)], run=False)
    assert type(cli.model).__name__ == "SFTModule"


@pytest.mark.parametrize("where, replace", [("init_args", "    optim:"), ("a group", "      lr:")])
def test_unknown_option_in_yaml_is_refused(tmp_path, where, replace):
    bad = tmp_path / "bad.yaml"
    indent = replace[: len(replace) - len(replace.lstrip())]
    bad.write_text((CONFIGS / "toy" / "sft.yaml").read_text().replace(replace, f"{indent}learning_rat: 0.1\n{replace}", 1))
    err = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(err):
        lightning_cli(["--config", str(bad)], run=False)
    assert "learning_rat" in err.getvalue()


def test_print_config_shows_the_resolved_model_config():
    out = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(out):
        lightning_cli(["fit", "--config", str(CONFIGS / "toy" / "sft.yaml"), "--print_config"])
    assert "rlhf_lightning.modules.SFTModule" in out.getvalue() and "n_layer: 2" in out.getvalue()
