"""The wheel carries the configs: `rlhf fit --config toy/sft` and `rlhf pipeline` work from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

from conftest import CONFIGS, ROOT
from rlhf_lightning.cli import resolve_config, resolve_config_args


def test_pyproject_lists_every_source_package():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = find_packages(str(ROOT), include=["rlhf_lightning*"])
    assert sorted(listed) == sorted([*found, "rlhf_lightning.configs"])


def test_shipped_configs_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    sft = str(CONFIGS / "toy" / "sft.yaml")
    assert resolve_config("toy/sft") == resolve_config("toy/sft.yaml") == resolve_config("configs/toy/sft.yaml") == sft
    assert resolve_config_args(["fit", "--config=toy/ppo", "-c", "seed/sft"]) == [
        "fit", f"--config={CONFIGS / 'toy' / 'ppo.yaml'}", "-c", str(CONFIGS / "seed" / "sft.yaml"),
    ]
    (tmp_path / "mine.yaml").write_text("{}")
    assert resolve_config("mine.yaml") == "mine.yaml"  # a file in the working directory comes first
    assert resolve_config("toy/nope") == "toy/nope"  # left for the parser to report


def test_wheel_installed_elsewhere_runs_from_an_empty_directory(tmp_path):
    """Built offline, installed with --target (not editable, not site-packages), the source tree off the path."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("rlhf_lightning", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True)
    shipped = site / "rlhf_lightning" / "configs"
    assert sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*.yaml")) == sorted(
        p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")
    )
    assert (shipped / "toy" / "sft.yaml").read_bytes() == (CONFIGS / "toy" / "sft.yaml").read_bytes()

    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    printed = subprocess.run([str(site / "bin" / "rlhf"), "fit", "--config", "toy/sft", "--print_config"], cwd=run, env=env,
                             capture_output=True, text=True, check=True).stdout
    assert "rlhf_lightning.modules.SFTModule" in printed and "dirpath: checkpoints/toy/sft" in printed
    script = (
        "import rlhf_lightning, rlhf_lightning.pipeline as p; from rlhf_lightning.cli import main;"
        "print(rlhf_lightning.__file__); print(p.default_config());"
        "main(['fit', '--config', 'toy/sft', '--trainer.max_steps=1', '--trainer.enable_progress_bar=false',"
        " '--trainer.limit_val_batches=0', '--data.init_args.demo_fraction=0.01'])"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=run, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    module_file, pipeline_config = out.stdout.splitlines()[:2]
    assert Path(module_file).is_relative_to(site) and Path(pipeline_config) == shipped / "toy" / "pipeline.yaml"
    assert (run / "checkpoints" / "toy" / "sft.ckpt").is_file()  # relative paths in configs: the working directory
    assert (run / "lightning_logs" / "toy" / "sft").is_dir() and not (site / "checkpoints").exists()
