"""SFT stage end to end: learning, checkpoints, CLI (in-process and once as a subprocess), bad input."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, QUIET, run_cli
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.evaluate import evaluate_policy
from rlhf_lightning.modules import SFTModule
from rlhf_lightning.policy import load_policy
from rlhf_lightning.tokenizer import UnknownCharacterError

SFT_YAML = str(CONFIGS / "toy" / "sft.yaml")


def test_quick_sft_fit_reaches_val_accuracy_far_above_chance(sft_run):
    _, ckpt, cli = sft_run
    # Chance is about 1/200 (answers 0..198): 0.1 is 20 times that.
    accuracy = float(cli.trainer.callback_metrics["eval/accuracy"])
    assert accuracy >= 0.1, accuracy
    assert ckpt.is_file()
    assert not list(ckpt.parent.glob("*.tmp"))  # written under a temporary name, then renamed


def test_checkpoint_reload_gives_identical_logits(sft_ckpt):
    module = SFTModule.load_from_checkpoint(sft_ckpt)  # no config needed
    model, tokenizer, meta = load_policy(str(sft_ckpt))
    assert meta["stage"] == "sft" and tokenizer == module.tokenizer
    ids = torch.tensor([tokenizer.encode_prompt("Q: 12+34=\nA:") + tokenizer.encode("46")])
    mask = torch.ones_like(ids, dtype=torch.bool)
    module.eval()
    torch.testing.assert_close(module(ids, mask), model.eval()(ids, mask), rtol=0, atol=0)


def test_eval_reports_accuracy_consistent_with_the_written_completions(sft_ckpt, tmp_path):
    summary, rows = evaluate_policy(str(sft_ckpt), split="test")
    assert summary["num_prompts"] == len(rows) > 700
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    assert summary["accuracy"] >= 0.05
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Q: 1+1=\nA:", "completion": "2"}) + "\n" + json.dumps({"prompt": "Q: 9-9=\nA:"}) + "\n")
    summary, rows = evaluate_policy(str(sft_ckpt), prompts=str(prompts))
    assert [r["gold"] for r in rows] == ["2", "0"]  # a toy prompt without "completion" still has a gold answer


def test_resume_from_last_checkpoint_continues_the_step_count(tmp_path):
    args = ["fit", "--config", SFT_YAML, *QUIET, "--trainer.logger=false", "--data.init_args.demo_fraction=0.05",
            "--data.init_args.max_val_prompts=64"]
    first = run_cli([*args, "--trainer.max_epochs=1"], tmp_path)
    steps = first.trainer.global_step
    assert (tmp_path / "checkpoints" / "toy" / "sft" / "last.ckpt").is_file()
    second = run_cli([*args, "--trainer.max_epochs=2", "--ckpt_path=last"], tmp_path)
    assert second.trainer.global_step == 2 * steps  # resumed at epoch 1, not from scratch


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "lines, error, words",
    [
        (['{"prompt": "Q: 1+1=\\nA:", "completion": "2"}', '{"prompt": "Q: 1+1=\\nA:", "completion": "2x"}'],
         UnknownCharacterError, ["bad.jsonl:2", "'completion'", "'x'"]),
        (['{"prompt": "Q: 1+1=\\nA:", "completion": "2"}', '{"prompt": "Q: 1+1'], DataError, ["bad.jsonl:2"]),
        (['{"prompt": "Q: 1+1=\\nA:"}'], DataError, ["bad.jsonl:1", "'completion'"]),
        (['["Q: 1+1=", "2"]'], DataError, ["bad.jsonl:1", "object"]),
    ],
    ids=["unknown-character", "malformed-json", "missing-field", "not-an-object"],
)
def test_bad_sft_data_fails_before_training_naming_file_line_field(tmp_path, lines, error, words):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(error) as info:
        run_cli(["fit", "--config", SFT_YAML, *QUIET, "--trainer.logger=false", f"--data.init_args.train_file={path}"], tmp_path)
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "checkpoints" / "toy" / "sft.ckpt").exists()  # nothing written


def test_seed_parity_config_trains_the_bigram_to_the_seeds_87_5_percent(tmp_path):
    cli = run_cli(["fit", "--config", str(CONFIGS / "seed" / "sft.yaml"), *QUIET, "--trainer.logger=false"], tmp_path)
    # a bigram cannot see the question: "5" everywhere is its best, 7 of the 8 seed prompts
    assert float(cli.trainer.callback_metrics["eval/accuracy"]) == pytest.approx(0.875)


def test_cli_subprocess_fit_and_eval(tmp_path):
    """The installed console script, once for real: fit the seed preset, then eval the checkpoint."""
    fit = subprocess.run(
        ["rlhf", "fit", "--config", str(CONFIGS / "seed" / "sft.yaml"), *QUIET, "--trainer.max_steps=20"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert list((tmp_path / "lightning_logs" / "seed" / "sft").glob("version_*/events.out.tfevents.*"))
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_lightning.cli", "eval", "--ckpt", "checkpoints/seed/sft.ckpt", "--task", "seed", "--split", "train"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (tmp_path / summary["out"]).read_text().splitlines()]
    assert summary["num_prompts"] == len(rows) == 8
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 8)  # the printed score is the file's
