"""Every bad input of conversational data and `datasets` sources, through `rlhf fit`: one line naming the file, the
line (or row) and the field, exit code 2, and nothing written (no checkpoint, no config, no run folder).

The runs have no logger: Lightning creates a logger's writer (TensorBoard's event file) before any DataModule's
`setup`, so with one, a refused run leaves that empty file in its version folder."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch  # noqa: F401  (Lightning's log handler binds to stderr on import: not to one test's capture)
import pytest

from conftest import CONFIGS
from conftest import QUIET as _QUIET
from rlhf_lightning.cli import main
from rlhf_lightning.tasks.chat import CHAT_ALPHABET, SYSTEM_PROMPT

datasets = pytest.importorskip("datasets", reason="needs the [data] extra")
datasets.disable_progress_bars()

SYSTEM = {"role": "system", "content": SYSTEM_PROMPT}
USER = {"role": "user", "content": "Q: 1+2=\nA:"}
REPLY = {"role": "assistant", "content": "3"}
GOOD_SFT = {"messages": [SYSTEM, USER, REPLY]}
QUIET = [*_QUIET, "--trainer.logger=false"]


def jsonl(records):
    return lambda folder: _write(folder / "data.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def parquet(records):
    def make(folder):
        datasets.Dataset.from_list(records).to_parquet(str(folder / "data.parquet"))
        return str(folder / "data.parquet")

    return make


def disk(records):
    def make(folder):
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(folder / "data"))
        return str(folder / "data")

    return make


def broken_folder(folder):
    (folder / "data").mkdir()
    (folder / "data" / "dataset_info.json").write_text("{")
    return str(folder / "data")


def csv(folder):
    return _write(folder / "data.csv", 'prompt,completion\n"Q: 1+2=\nA:",3\n')


def json_array(folder):
    return _write(folder / "data.json", json.dumps([{"prompt": "Q: 1+2=\nA:", "completion": "3"}]))


# (name, the source, options beside its path, the error line after "rlhf: error: " with {path} for the source)
SFT_CASES = [
    ("message-without-role", jsonl([GOOD_SFT, {"messages": [{"content": "Q: 1+2=\nA:"}, REPLY]}]), [],
     "{path}:2: field 'messages[0].role': missing required field"),
    ("message-without-content", parquet([{"messages": [USER, {"role": "assistant"}]}]), [],
     "{path}:row 0: field 'messages[1].content': missing required field"),
    ("unknown-role", jsonl([{"messages": [{"role": "bot", "content": "x"}, REPLY]}]), [],
     "{path}:1: field 'messages[0].role': unknown role \"bot\"; allowed: system, user, assistant"),
    ("empty-content", disk([GOOD_SFT, {"messages": [SYSTEM, {"role": "user", "content": " "}, REPLY]}]), [],
     "{path}:row 1: field 'messages[1].content': expected a non-empty string, got \" \""),
    ("no-assistant-turn", jsonl([{"messages": [SYSTEM, USER]}]), [],
     "{path}:1: field 'messages': no assistant turn: nothing to train on"),
    ("parquet-column-of-the-wrong-type", parquet([{"prompt": "Q: 1+2=\nA:", "completion": 3}]), [],
     "{path}:row 0: field 'completion': expected a non-empty string, got 3"),
    ("parquet-messages-as-text", parquet([{"messages": "Q: 1+2=\nA: 3"}]), [],
     "{path}:row 0: field 'messages': expected a list of messages (the file's first record is conversational)"),
    ("missing-split-of-a-folder", disk([GOOD_SFT]), ["--data.init_args.split=validation"],
     "{path}: field 'split': no split 'validation'; the source has: train"),
    ("missing-split-of-jsonl", jsonl([GOOD_SFT]), ["--data.init_args.split=validation"],
     "{path}: field 'split': no split 'validation'; the source has: train"),
    ("missing-split-of-parquet", parquet([GOOD_SFT]), ["--data.init_args.split=test"],
     "{path}: field 'split': no split 'test'; the source has: train"),
    ("missing-split-of-csv", csv, ["--data.init_args.split=test"], "{path}: field 'split': no split 'test'; the source has: train"),
    ("missing-split-of-json", json_array, ["--data.init_args.split=test"], "{path}: field 'split': no split 'test'; the source has: train"),
    ("unreadable-datasets-folder", broken_folder, [], "{path}: cannot read as a datasets folder (save_to_disk): "),
    ("too-long-conversation", parquet([GOOD_SFT, {"messages": [SYSTEM, {"role": "user", "content": "1" * 60}, REPLY]}]), [],
     "{path}:row 1: field 'messages': the conversation is 72 tokens, the model's context is 48"),
    ("unknown-character", parquet([{"messages": [{"role": "user", "content": "Q: 1*2=\nA:"}, REPLY]}]), [],
     "{path}:row 0: field 'messages': unknown character '*'"),
]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("rlhf: error: ")]
    assert len(lines) == 1, err
    return lines[0][len("rlhf: error: "):]


def assert_nothing_written(folder: Path, inputs: set[str]) -> None:
    assert sorted(p.name for p in folder.iterdir() if p.name not in inputs) == [], "written despite bad input"


@pytest.mark.parametrize("name, source, options, expected", SFT_CASES, ids=[c[0] for c in SFT_CASES])
def test_bad_sft_source_is_one_line_exit_2_and_nothing_written(name, source, options, expected, tmp_path, monkeypatch, capsys):
    data = tmp_path / "in"
    data.mkdir()
    path = source(data)
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(CONFIGS / "toy_chat" / "sft.yaml"), *QUIET, f"--data.init_args.train_file={path}", *options])
    line = error_line(capsys)
    assert code == 2 and line.startswith(expected.format(path=path)), line
    assert_nothing_written(tmp_path, {"in"})


def test_a_prompt_conversation_ending_in_an_assistant_turn(tmp_path, monkeypatch, capsys):
    path = jsonl([{"prompt": [SYSTEM, USER]}, {"prompt": [USER, REPLY]}])(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(CONFIGS / "toy_chat" / "sft.yaml"), *QUIET, "--data.init_args.demo_fraction=0.01", f"--data.init_args.val_file={path}"])
    line = error_line(capsys)
    assert code == 2 and line.startswith(f"{path}:2: field 'prompt[1].role': the last message must be a user turn, got 'assistant'"), line
    assert_nothing_written(tmp_path, {"data.jsonl"})


REWARD_MODEL = f"""
model:
  init_args:
    sft_ckpt: null
    tokenizer: {{type: char, alphabet: {json.dumps(CHAT_ALPHABET)}, chat: true}}
    model: {{type: gpt, n_layer: 1, n_head: 2, n_embd: 16, block_size: 48, lm_feature: true}}
"""


def test_implicit_prompt_pairs_with_different_prompts(tmp_path, monkeypatch, capsys):
    other = {"role": "user", "content": "Q: 2+2=\nA:"}
    path = jsonl([
        {"chosen": [SYSTEM, USER, REPLY], "rejected": [SYSTEM, USER, {"role": "assistant", "content": "4"}]},
        {"chosen": [SYSTEM, USER, REPLY], "rejected": [SYSTEM, other, {"role": "assistant", "content": "4"}]},
    ])(tmp_path)
    model = _write(tmp_path / "model.yaml", REWARD_MODEL)
    monkeypatch.chdir(tmp_path)
    code = main([
        "fit", "--config", str(CONFIGS / "toy_chat" / "reward.yaml"), "--config", model, *QUIET,
        "--data.init_args.pairs=JsonlPairs", f"--data.init_args.pairs.train_file={path}",
    ])
    line = error_line(capsys)
    assert code == 2 and line.startswith(f"{path}:2: field 'rejected[1]': 'chosen' and 'rejected' must share their prompt"), line
    assert_nothing_written(tmp_path, {"data.jsonl", "model.yaml"})
