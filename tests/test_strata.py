"""Strata: names of hand-picked prompts, `group` from JSONL, per-stratum accuracy, its reports and logs, and
drawing demonstrations by stratum."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import CONFIGS, QUIET, run_cli
from rlhf_lightning.cli import main as cli_main
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.prompts import PromptDataset, load_prompts
from rlhf_lightning.data.stratum_weights import StratumWeightedSampler, check_stratum_weights, example_weights
from rlhf_lightning.tasks.arithmetic import problems
from rlhf_lightning.tasks.strata import TOY_STRATA, arithmetic_strata, prompt_strata, strata_metrics, worst_stratum


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("Q: 3+4=\nA:", ("digits/1+1", "op/+", "carry/no")),
        ("Q: 5+5=\nA:", ("digits/1+1", "op/+", "carry/yes")),
        ("Q: 7+15=\nA:", ("digits/1+2", "op/+", "carry/yes")),
        ("Q: 2+13=\nA:", ("digits/1+2", "op/+", "carry/no")),
        ("Q: 91+9=\nA:", ("digits/2+1", "op/+", "carry/yes")),
        ("Q: 95+10=\nA:", ("digits/2+2", "op/+", "carry/yes")),  # tens column carries, units do not
        ("Q: 12+34=\nA:", ("digits/2+2", "op/+", "carry/no")),
        ("Q: 40-3=\nA:", ("digits/2+1", "op/-", "carry/yes")),  # borrow
        ("Q: 45-23=\nA:", ("digits/2+2", "op/-", "carry/no")),
        ("Q: 50-50=\nA:", ("digits/2+2", "op/-", "carry/no")),
        ("Q: 9-0=\nA:", ("digits/1+1", "op/-", "carry/no")),
        ("Q: 100-1=\nA:", ("digits/3+1", "op/-", "carry/yes")),
        ("Q: 0+0=\nA:", ("digits/1+1", "op/+", "carry/no")),
    ],
)
def test_strata_of_hand_picked_prompts(prompt, expected):
    assert arithmetic_strata(prompt) == expected


def test_non_toy_prompts_have_no_strata_and_a_group_replaces_them():
    assert arithmetic_strata("Hello?") == () and arithmetic_strata("Q: 03+4=\nA:") == ()
    assert prompt_strata("Q: 3+4=\nA:", group="easy") == ("easy",)
    assert prompt_strata("Hello?") == ()


def test_every_toy_prompt_has_one_stratum_per_dimension():
    counts: dict[str, int] = {}
    for p in problems():
        names = arithmetic_strata(p.prompt)
        assert [n.split("/")[0] for n in names] == ["digits", "op", "carry"]
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    # operand lengths: 1+1 = 100 sums + 55 differences; 1+2 = 900 sums; 2+1 = 900 + 900; 2+2 = 8100 + 4095
    assert {n: counts[n] for n in TOY_STRATA[:4]} == {"digits/1+1": 155, "digits/1+2": 900, "digits/2+1": 1800, "digits/2+2": 12195}
    assert counts["op/+"] == 10_000 and counts["op/-"] == 5050
    assert counts["carry/yes"] + counts["carry/no"] == 15_050 and set(counts) == set(TOY_STRATA)


def test_per_stratum_accuracy_and_reward_of_a_fake_policy_by_hand():
    # five prompts; the fake policy is right on the 1st, 3rd and 5th; the 4th has no gold answer
    scores = [1.0, 0.0, 1.0, float("nan"), 1.0]
    strata = [("digits/1+1", "op/+"), ("digits/1+1", "op/-"), ("digits/2+2", "op/+"), ("digits/2+2", "op/-"), ("digits/2+2", "op/-")]
    rewards = [0.5, -1.0, 2.0, 1.0, 0.0]
    out = strata_metrics(scores, strata, rewards, names=["digits/1+1", "digits/1+2", "digits/2+2", "op/+", "op/-"])
    assert list(out) == ["digits/1+1", "digits/1+2", "digits/2+2", "op/+", "op/-"]
    assert out["digits/1+1"] == {"n": 2, "accuracy": 0.5, "reward": -0.25}  # (1 + 0) / 2, (0.5 - 1) / 2
    assert out["digits/1+2"] == {"n": 0, "accuracy": None, "reward": None}  # empty: no division by zero
    assert out["digits/2+2"] == {"n": 3, "accuracy": 1.0, "reward": 1.0}  # the unknown score is left out
    assert out["op/+"] == {"n": 2, "accuracy": 1.0, "reward": 1.25}
    assert out["op/-"] == {"n": 3, "accuracy": 0.5, "reward": 0.0}  # (0 + 1) / 2 known; (-1 + 1 + 0) / 3
    assert strata_metrics([], [], names=["a"]) == {"a": {"n": 0, "accuracy": None}}
    assert worst_stratum(out, min_n=3) == "op/-" and worst_stratum(out, min_n=4) is None
    with pytest.raises(ValueError, match="1 scores, 0 strata and no rewards"):
        strata_metrics([1.0], [])


# ----------------------------------------------------------------------------- `group` in JSONL


def test_group_from_jsonl_is_the_stratum(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "Q: 3+4=\nA:", "group": "warm-up"}) + "\n"
        + json.dumps({"prompt": "Q: 40-3=\nA:"}) + "\n"
        + json.dumps({"prompt": "Hi", "completion": "x", "group": "chat"}) + "\n"
    )
    records = load_prompts(path=str(path))
    assert [r.strata for r in records] == [("warm-up",), ("digits/2+1", "op/-", "carry/yes"), ("chat",)]
    batch = PromptDataset.__new__(PromptDataset)  # collate only needs the records and pad id
    batch.pad_id = 0
    assert batch.collate([([1, 2], r) for r in records])["strata"] == [r.strata for r in records]


@pytest.mark.parametrize("value, problem", [('""', "expected a non-empty string"), ('"  "', "expected a non-empty string"), ("3", "expected string")])
def test_bad_group_names_file_line_and_field(tmp_path, value, problem):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Q: 1+1=\\nA:"}\n\n{"prompt": "Q: 2+2=\\nA:", "group": ' + value + "}\n")
    with pytest.raises(DataError) as err:
        load_prompts(path=str(path))
    assert (err.value.path, err.value.line, err.value.field) == (str(path), 3, "group")
    assert str(err.value).startswith(f"{path}:3: field 'group': {problem}")


def test_bad_group_exits_2_with_one_line_from_eval_and_fit(tmp_path, sft_ckpt, capsys, monkeypatch):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "Q: 1+1=\\nA:", "completion": "2", "group": ""}\n')
    assert cli_main(["eval", "--ckpt", str(sft_ckpt), "--prompts", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rlhf: error: {path}:1: field 'group': expected a non-empty string, got ''"]
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(CONFIGS / "toy" / "sft.yaml"), *QUIET, "--trainer.logger=false", "--trainer.max_epochs=1",
           f"--data.init_args.train_file={path}", "--data.init_args.stratum_weights=null"]
    assert cli_main(fit) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"rlhf: error: {path}:1: field 'group': expected a non-empty string, got ''"


# ----------------------------------------------------------------------------- reports and logs


def test_eval_prints_a_table_and_json_per_stratum(sft_ckpt, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert cli_main(["eval", "--ckpt", str(sft_ckpt), "--split", "test", "--limit", "60", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert list(summary["strata"]) == list(TOY_STRATA)  # every toy stratum, empty ones included
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for name, m in summary["strata"].items():
        mine = [r["correct"] for r in rows if name in arithmetic_strata(r["prompt"])]
        assert m["n"] == len(mine)
        assert m["accuracy"] == (pytest.approx(sum(mine) / len(mine)) if mine else None)
    assert sum(summary["strata"][n]["n"] for n in TOY_STRATA[:4]) == 60
    table = lines[1:-1]  # after the overall line, before the JSON
    assert table[0].split() == ["stratum", "n", "accuracy"] and len(table) == 2 + len(TOY_STRATA)
    for name, row in zip(TOY_STRATA, table[2:]):
        m = summary["strata"][name]
        assert row.split() == [name, str(m["n"]), "-" if m["accuracy"] is None else f"{m['accuracy']:.4f}"]


def test_sft_logs_eval_accuracy_per_stratum(sft_ckpt, tmp_path):
    cli = run_cli(["validate", "--config", str(CONFIGS / "toy" / "sft.yaml"), *QUIET, f"--ckpt_path={sft_ckpt}",
                   "--data.init_args.max_val_prompts=300"], tmp_path)
    logged = {k: float(v) for k, v in cli.trainer.logged_metrics.items()}
    from rlhf_lightning.evaluate import evaluate_policy

    summary, _ = evaluate_policy(str(sft_ckpt), split="val", limit=300)
    expected = {f"eval/accuracy/{n}": m["accuracy"] for n, m in summary["strata"].items() if m["n"]}
    assert {k: v for k, v in logged.items() if k.startswith("eval/accuracy/")} == pytest.approx(expected)
    assert 0 < expected["eval/accuracy/digits/2+2"] and len(expected) >= 7
    n = {k: summary["strata"][k]["n"] for k in TOY_STRATA[:4]}  # the digits strata partition the prompts
    assert logged["eval/accuracy"] == pytest.approx(sum(n[k] * logged[f"eval/accuracy/{k}"] for k in n if n[k]) / 300, abs=1e-6)


def test_ppo_evaluate_returns_and_logs_accuracy_per_stratum(sft_ckpt):
    from rlhf_lightning.evaluate import evaluate_policy
    from rlhf_lightning.modules.ppo import PPOModule

    module = PPOModule(policy_ckpt=str(sft_ckpt), reward=dict(source="judge"))
    data = PromptDataset(module.tokenizer, load_prompts("toy", "val", limit=200), module.data_max_length)
    metrics = module.evaluate(DataLoader(data, batch_size=64, collate_fn=data.collate))
    summary, _ = evaluate_policy(str(sft_ckpt), split="val", limit=200, max_new_tokens=module.cfg.rollout.max_new_tokens)
    expected = {f"eval/accuracy/{n}": m["accuracy"] for n, m in summary["strata"].items() if m["n"]}
    assert {k: v for k, v in metrics.items() if k.startswith("eval/accuracy/")} == pytest.approx(expected)
    assert module.eval_history[-1]["eval/accuracy/op/+"] == pytest.approx(expected["eval/accuracy/op/+"])


# ----------------------------------------------------------------------------- drawing by stratum


def test_example_weights_multiply_over_strata_and_refuse_unknown_names():
    strata = [("digits/1+1", "op/+"), ("digits/1+1", "op/-"), ("digits/2+2", "op/-")]
    assert example_weights(strata, {"digits/1+1": 4.0, "op/-": 0.5}).tolist() == [4.0, 2.0, 0.5]
    with pytest.raises(DataError, match=r"^opt: no example belongs to stratum 'digits/9\+9'"):
        example_weights(strata, {"digits/9+9": 2.0}, "opt")
    # a stratum of the task that this data lacks (a file of single-digit demonstrations) is no error
    assert example_weights(strata, {"digits/1+2": 2.0}, "opt", known=["digits/1+2"]).tolist() == [1.0, 1.0, 1.0]
    for bad in ({"a": 0}, {"a": -1.0}, {"a": float("inf")}, {"a": True}, {"": 1.0}, [1.0]):
        with pytest.raises(DataError, match="^opt: "):
            check_stratum_weights(bad, "opt")
    assert check_stratum_weights(None, "opt") == {}


def test_weighted_sampler_draws_in_proportion_and_resumes_mid_epoch():
    torch.manual_seed(0)
    weights = torch.tensor([1.0] * 3000 + [3.0] * 1000)  # the last quarter of examples weighs 3: half the draws
    sampler = StratumWeightedSampler(weights)
    first = list(sampler)
    assert len(first) == len(sampler) == 4000
    share = sum(i >= 3000 for i in first) / len(first)
    assert abs(share - 0.5) < 0.03
    second = list(sampler)
    assert second != first  # a new draw each epoch
    sampler.resume(sampler.seed, 1500)
    assert list(sampler) == second[1500:]
    torch.manual_seed(0)
    assert list(StratumWeightedSampler(weights)) == first  # seed_everything fixes the draw


def test_sft_stratum_weights_reach_the_loader_and_bad_names_exit_2(tmp_path, monkeypatch, capsys):
    from rlhf_lightning.data.sft import SFTDataModule
    from rlhf_lightning.modules.sft import SFTModule

    module = SFTModule()
    data = SFTDataModule(task="toy", demo_fraction=0.2, stratum_weights={"digits/1+1": 50.0}, tokenizer=module.tokenizer, max_length=module.data_max_length)
    data.trainer = type("T", (), {"world_size": 1})()
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader.sampler, StratumWeightedSampler) and len(loader.sampler) == len(data.train_set)
    drawn = list(loader.sampler)
    single = [i for i, p in enumerate(data._pairs()[1]) if p[0] == "digits/1+1"]
    base_share = len(single) / len(drawn)
    share = sum(i in set(single) for i in drawn) / len(drawn)
    expected = 50 * base_share / (50 * base_share + 1 - base_share)
    assert abs(share - expected) < 0.05 and share > 10 * base_share
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(CONFIGS / "toy" / "sft.yaml"), *QUIET, "--trainer.logger=false", "--trainer.max_epochs=1"]
    assert cli_main([*fit, '--data.init_args.stratum_weights={"digits/9+9": 2}']) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "rlhf: error: data.init_args.stratum_weights: no example belongs to stratum 'digits/9+9'")
    assert cli_main([*fit, '--data.init_args.stratum_weights={"digits/1+1": -1}']) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlhf: error: data.init_args.stratum_weights: stratum 'digits/1+1': expected a finite weight > 0, got -1.0")


def test_pipeline_writes_strata_json_and_prints_the_worst_stratum(quick_pipeline):
    cwd, out = quick_pipeline
    rows = {r["stage"]: r for r in json.loads((cwd / "lightning_logs" / "toy" / "summary.json").read_text())}
    strata = json.loads((cwd / "lightning_logs" / "toy" / "strata.json").read_text())
    assert list(strata) == ["sft", "ppo"]
    test_prompts = load_prompts("toy", "test")
    for stage, metrics in strata.items():
        assert list(metrics) == list(TOY_STRATA)
        assert [metrics[n]["n"] for n in TOY_STRATA] == [sum(n in r.strata for r in test_prompts) for n in TOY_STRATA]
        # the digits strata partition `test`: their accuracies and rewards average back to the stage's row
        digits = [metrics[n] for n in TOY_STRATA[:4]]
        total = sum(m["n"] for m in digits)
        assert sum(m["n"] * m["accuracy"] for m in digits) / total == pytest.approx(rows[stage]["test_accuracy"], abs=1e-6)
        assert sum(m["n"] * m["reward"] for m in digits) / total == pytest.approx(rows[stage]["test_reward"], abs=1e-5)
        worst = worst_stratum(metrics)
        line = f"[pipeline] worst stratum (n >= 5): {stage} {worst} {metrics[worst]['accuracy']:.4f}"
        assert line in out
