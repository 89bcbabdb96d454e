"""Preference pairs: JSONL validation, pairing rules, and pairs sampled from an SFT policy."""

from __future__ import annotations

import json
import math

import pytest

from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.preferences import (
    PairDataset,
    SampleGroupDataset,
    pair_groups,
    pairs_from_group,
    read_preferences,
    sample_groups,
)
from rlhf_lightning.data.prompts import load_prompts
from rlhf_lightning.policy import load_policy
from rlhf_lightning.tasks.arithmetic import ALPHABET, judge
from rlhf_lightning.tokenizer import CharTokenizer, UnknownCharacterError

P1, P2 = "Q: 1+2=\nA:", "Q: 10+5=\nA:"


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_file_with_blank_lines_extra_fields_and_duplicates_loads(tmp_path):
    good = {"prompt": P1, "chosen": "3", "rejected": "4"}
    path = write_lines(tmp_path / "prefs.jsonl", [
        json.dumps(good),
        "",
        "   ",
        json.dumps({**good, "source": "human", "id": 7}),  # extra fields ignored
        json.dumps(good),  # duplicate kept
        json.dumps({"prompt": P2, "chosen": "15", "rejected": "16", "margin": 2}),
        json.dumps({"prompt": P2, "chosen": "15", "rejected": "1", "rejected_ended": False}),
    ])
    pairs = read_preferences(path)
    assert len(pairs) == 5
    assert [p.where for p in pairs] == [f"{path}:{n}" for n in (1, 4, 5, 6, 7)]
    assert [p.margin for p in pairs] == [None, None, None, 2.0, None]
    assert [p.rejected_ended for p in pairs] == [True, True, True, True, False]

    tok = CharTokenizer(ALPHABET)
    data = PairDataset(tok, pairs, max_len=24)
    batch = data.collate([data[3], data[4]])
    # rows: chosen, chosen, rejected, rejected. BOS + 11 prompt chars + "15" + EOS = 15 tokens;
    # the unfinished "1" gets no EOS: 13 tokens
    assert batch["input_ids"].shape == (4, 15)
    assert batch["attention_mask"].sum(1).tolist() == [15, 15, 15, 13]
    assert batch["margin"].tolist() == [2.0, 0.0]


@pytest.mark.parametrize(
    "line, field, problem",
    [
        ('["Q: 1+2=\\nA:", "3", "4"]', None, "expected a JSON object"),
        ('{"prompt": "Q: 1+2=\\nA:", "chosen": "3"', None, "invalid JSON"),
        ('{"prompt": "Q: 1+2=\\nA:", "chosen": "3"}', "rejected", "missing"),
        ('{"prompt": "", "chosen": "3", "rejected": "4"}', "prompt", "non-empty string"),
        ('{"prompt": "Q: 1+2=\\nA:", "chosen": 3, "rejected": "4"}', "chosen", "expected a string"),
        ('{"prompt": "Q: 1+2=\\nA:", "chosen": "3", "rejected": "3"}', "rejected", "identical"),
        ('{"prompt": "Q: 1+2=\\nA:", "chosen": "3", "rejected": "4", "margin": "big"}', "margin", "expected"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, line, field, problem):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": P1, "chosen": "3", "rejected": "4"}), "", line])
    with pytest.raises(DataError, match=problem) as err:
        read_preferences(path)
    assert (err.value.path, err.value.line, err.value.field) == (path, 3, field)
    assert str(err.value).startswith(f"{path}:3: ")


def test_unknown_character_names_file_line_and_field(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [
        json.dumps({"prompt": P1, "chosen": "3", "rejected": "4"}),
        json.dumps({"prompt": "Q: 1*2=\nA:", "chosen": "2", "rejected": "3"}),
    ])
    with pytest.raises(UnknownCharacterError, match=rf"{path}:2: field 'prompt': unknown character '\*'"):
        PairDataset(CharTokenizer(ALPHABET), read_preferences(path), max_len=24)
    path = write_lines(tmp_path / "prefs2.jsonl", [json.dumps({"prompt": P1, "chosen": "3", "rejected": "x"})])
    with pytest.raises(UnknownCharacterError, match=rf"{path}:1: field 'rejected'"):
        PairDataset(CharTokenizer(ALPHABET), read_preferences(path), max_len=24)


def test_too_long_pair_is_an_error(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [json.dumps({"prompt": P1, "chosen": "3" * 20, "rejected": "4"})])
    with pytest.raises(DataError, match="context is 24") as err:
        PairDataset(CharTokenizer(ALPHABET), read_preferences(path), max_len=24)
    assert (err.value.line, err.value.field) == (None, "chosen") and f"{path}:1" in str(err.value)


def test_pairs_drop_ties_unless_broken_by_length():
    scores, texts = [1.0, 0.0, 0.0, 1.0], ["3", "4", "44", "3"]
    assert pairs_from_group(scores, texts) == [(0, 1), (0, 2), (3, 1), (3, 2)]
    # tie-break by length: "44" beats "4"; "3" vs "3" has equal length and is still dropped
    assert pairs_from_group(scores, texts, tie_break="length") == [(0, 1), (0, 2), (2, 1), (3, 1), (3, 2)]
    with pytest.raises(ValueError, match="tie_break: unknown value 'random'"):
        sample_groups(None, None, [], samples_per_prompt=2, tie_break="random")  # refused before any sampling


def test_held_out_groups_score_each_completion_once(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [
        json.dumps({"prompt": P1, "chosen": "3", "rejected": "4"}),
        json.dumps({"prompt": P2, "chosen": "15", "rejected": "5"}),
    ])
    data = SampleGroupDataset(CharTokenizer(ALPHABET), pair_groups(read_preferences(path)), max_len=24)
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"].shape[0] == 4
    assert batch["pairs"].tolist() == [[0, 1], [2, 3]]
    assert batch["labels"].tolist() == [1.0, 0.0, 1.0, 0.0]  # the task judge on toy prompts


def test_generated_pairs_have_no_ties_and_come_from_one_prompt(sft_ckpt):
    policy, tokenizer, _ = load_policy(str(sft_ckpt))
    records = load_prompts("toy", "train")[:200]
    groups = sample_groups(policy, tokenizer, records, samples_per_prompt=4, temperature=1.5, batch_size=64, seed=3)
    assert [g.prompt for g in groups] == [r.prompt for r in records]
    n_pairs = 0
    for g, r in zip(groups, records):
        assert len(g.completions) == 4
        assert g.labels == [judge(c, r.gold, e) for c, e in zip(g.completions, g.ended)]
        for i, j in g.pairs:
            assert g.scores[i] > g.scores[j]  # the auto judge: 1 for the chosen, 0 for the rejected
            assert judge(g.completions[i], r.gold, g.ended[i]) == 1.0
            assert judge(g.completions[j], r.gold, g.ended[j]) == 0.0
        n_correct = int(sum(g.labels))
        assert len(g.pairs) == n_correct * (4 - n_correct)  # every (correct, wrong) combination, no ties
        n_pairs += len(g.pairs)
    assert n_pairs > 50  # a quick SFT policy at temperature 1.5 gets some right and some wrong
    # seeded: the same call gives the same samples
    again = sample_groups(policy, tokenizer, records, samples_per_prompt=4, temperature=1.5, batch_size=64, seed=3)
    assert [g.completions for g in again] == [g.completions for g in groups]


def test_random_judge_pairs_every_distinct_score(sft_ckpt):
    policy, tokenizer, _ = load_policy(str(sft_ckpt))
    groups = sample_groups(policy, tokenizer, load_prompts("toy", "train")[:10], samples_per_prompt=3, judge_name="random")
    assert all(len(g.pairs) == 3 for g in groups)  # continuous random scores never tie
    assert all(not math.isnan(x) for g in groups for x in g.labels)


def test_auto_judge_needs_a_gold_answer(tmp_path, sft_ckpt):
    policy, tokenizer, _ = load_policy(str(sft_ckpt))
    path = write_lines(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "Q: 1+2=\nA:"}), json.dumps({"prompt": "Q: 3=\nA:"})])
    with pytest.raises(DataError, match="gold answer") as err:
        sample_groups(policy, tokenizer, load_prompts(path=path), samples_per_prompt=2)
    assert err.value.path == f"{path}:2" and err.value.field == "prompt"
