import dataclasses
import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from rlhf_lightning.tasks import arithmetic as A
from rlhf_lightning.tasks.arithmetic import (
    ALPHABET,
    SEED_PROBLEMS,
    Problem,
    demonstration_problems,
    gold_answer,
    judge,
    problems,
    split_of,
    task_problems,
)

REPO = Path(__file__).resolve().parents[1]


def test_prompt_count_and_format():
    ps = problems()
    assert len(ps) == 15050
    assert len({p.prompt for p in ps}) == 15050
    assert ps[0] == Problem("Q: 0+0=\nA:", "0")
    by_prompt = {p.prompt: p.answer for p in ps}
    assert by_prompt["Q: 7-2=\nA:"] == "5"
    assert by_prompt["Q: 99+99=\nA:"] == "198"
    assert by_prompt["Q: 99-99=\nA:"] == "0"
    assert by_prompt["Q: 10-3=\nA:"] == "7"
    assert "Q: 2-7=\nA:" not in by_prompt
    assert "Q: 100+0=\nA:" not in by_prompt
    for p in ps:
        assert int(p.answer) >= 0
        assert p.answer == str(int(p.answer))  # no leading zeros, no sign
        assert gold_answer(p.prompt) == p.answer
        assert set(p.prompt + p.answer) <= set(ALPHABET)
    assert problems() == ps  # deterministic order


def test_max_operand():
    ps = problems(max_operand=9)
    assert len(ps) == 100 + 55
    assert max(int(p.answer) for p in ps) == 18
    with pytest.raises(ValueError, match="max_operand must be a non-negative integer, got -1"):
        problems(max_operand=-1)


def test_alphabet_is_exactly_what_prompts_use():
    used = set()
    for p in problems():
        used |= set(p.prompt + p.answer)
    assert used == set(ALPHABET)
    assert ALPHABET == "".join(sorted(set(ALPHABET)))


def test_gold_answer_parsing():
    assert gold_answer("Q: 7-2=\nA:") == "5"
    assert gold_answer("Q: 99+99=\nA:") == "198"
    assert gold_answer("Q: 2-7=\nA:") is None  # negative result
    assert gold_answer("Q: 07+1=\nA:") is None  # leading zero
    assert gold_answer("Q: 7*2=\nA:") is None
    assert gold_answer("Q: 7-2=\nA: ") is None
    assert gold_answer("hello") is None


def test_judge():
    assert judge("12", "12", True) == 1.0
    assert judge(" 12", "12", True) == 1.0
    assert judge("1 2 ", "12", True) == 1.0
    assert judge("123", "12", True) == 0.0
    assert judge("1", "12", True) == 0.0
    assert judge("12", "12", False) == 0.0
    assert judge("", "12", True) == 0.0
    assert judge("012", "12", True) == 0.0


def test_splits_disjoint_cover_and_proportions():
    all_ = problems()
    parts = {s: problems(s) for s in ("train", "val", "test")}
    sets = {s: {p.prompt for p in ps} for s, ps in parts.items()}
    assert not (sets["train"] & sets["val"])
    assert not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == {p.prompt for p in all_}
    n = len(all_)
    assert abs(len(parts["train"]) / n - 0.90) < 0.01
    assert abs(len(parts["val"]) / n - 0.05) < 0.01
    assert abs(len(parts["test"]) / n - 0.05) < 0.01
    for s, ps in parts.items():
        assert all(split_of(p.prompt) == s for p in ps)
    # the split depends on the prompt text only, not on max_operand
    small = problems("val", max_operand=20)
    assert {p.prompt for p in small} <= sets["val"]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        problems("dev")


def _val_digest(ps):
    return hashlib.sha256("\x1e".join(p.prompt for p in ps).encode()).hexdigest()


def test_splits_stable_across_processes():
    code = (
        "import hashlib; from rlhf_lightning.tasks.arithmetic import problems; "
        "print(hashlib.sha256('\\x1e'.join(p.prompt for p in problems('val')).encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == _val_digest(problems("val"))


def test_demonstration_problems():
    train = problems("train")
    train_set = {p.prompt for p in train}
    fractions = (0.01, 0.1, 0.25, 0.5, 1.0)
    subsets = [demonstration_problems(f) for f in fractions]
    for f, sub in zip(fractions, subsets):
        assert len(sub) == round(f * len(train))
        assert {p.prompt for p in sub} <= train_set
        assert len({p.prompt for p in sub}) == len(sub)
    for small, large in zip(subsets, subsets[1:]):
        assert {p.prompt for p in small} < {p.prompt for p in large}
    assert subsets[-1] == train
    assert demonstration_problems(0.1) == subsets[1]  # deterministic
    other = demonstration_problems(0.1, seed=1)
    assert len(other) == len(subsets[1]) and other != subsets[1]
    # no val/test prompt ever gets a demonstration
    assert all(split_of(p.prompt) == "train" for p in subsets[2])
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"fraction must be in \(0, 1\], got {bad}"):
            demonstration_problems(bad)


def test_seed_preset():
    expected = [
        ("Q: 2+3=\nA:", "5"), ("Q: 1+4=\nA:", "5"), ("Q: 4+4=\nA:", "8"), ("Q: 3+2=\nA:", "5"),
        ("Q: 5+0=\nA:", "5"), ("Q: 6-1=\nA:", "5"), ("Q: 7-2=\nA:", "5"), ("Q: 9-4=\nA:", "5"),
    ]
    assert [(p.prompt, p.answer) for p in SEED_PROBLEMS] == expected
    for split in (None, "train", "val", "test"):
        assert task_problems("seed", split) == [Problem(*e) for e in expected]
    assert task_problems("toy", "val") == problems("val")
    assert len(task_problems("toy", None)) == 15050
    with pytest.raises(ValueError, match="toy.*seed"):
        task_problems("chess", "train")


def test_problem_is_frozen():
    p = Problem("Q: 1+1=\nA:", "2")
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'answer'"):
        p.answer = "3"
    assert Counter([p, Problem("Q: 1+1=\nA:", "2")])[p] == 2
    assert A.TASKS == ("toy", "seed", "toy_chat")
