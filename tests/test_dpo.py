"""DPOModule: zero margins at the start, a short `rlhf fit` on sampled pairs whose checkpoint `rlhf eval`, `rlhf export`
and PPO read, precomputed reference log-probs, LoRA with the adapters-off reference, exact resume, bad options.

The losses themselves are checked against hand computations in test_dpo_losses.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from conftest import CONFIGS, QUIET, run_cli, with_groups
from test_reward import easy_pairs
from rlhf_lightning.cli import main
from rlhf_lightning.data.preferences import PairDataset, PreferencePair
from rlhf_lightning.losses import dpo_loss
from rlhf_lightning.modules.dpo import DPOModule, WithReferenceLogps
from rlhf_lightning.policy import load_policy
from tolerance import FORWARD_ATOL

TINY = {"type": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 24}
DPO_METRICS = {"dpo/loss", "dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/accuracies", "dpo/rewards/margins",
               "dpo/logps/chosen", "dpo/logps/rejected"}


def pair_dataset(tokenizer, n: int) -> PairDataset:
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], None, True, r.get("rejected_ended", True)) for r in easy_pairs("train", n)]
    return PairDataset(tokenizer, pairs, 24)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny SFT checkpoint (a few steps: any trained weights will do for JSONL pairs)."""
    cwd = tmp_path_factory.mktemp("dpo_base")
    run_cli(["fit", "--config", "toy/sft", *QUIET, "--trainer.logger=false", "--trainer.max_steps=3",
             "--data.init_args.max_val_prompts=8", "--model.init_args.model=" + str(TINY).replace("'", "")], cwd)
    return cwd / "checkpoints" / "toy" / "sft.ckpt"


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dpo_pairs")
    train, val = folder / "train.jsonl", folder / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in easy_pairs("train", 64)))
    val.write_text("".join(json.dumps(r) + "\n" for r in easy_pairs("val", 16)))
    return train, val


def jsonl_config(tmp_path: Path, base: Path, pair_files: tuple[Path, Path], model: dict, trainer: dict) -> Path:
    """configs/toy/dpo.yaml on `base` with JSONL pairs, small: 8 pairs a step, 16 greedy `val` prompts."""
    config = yaml.safe_load((CONFIGS / "toy" / "dpo.yaml").read_text())
    config["trainer"].update(enable_progress_bar=False, logger=False, max_epochs=3, **trainer)
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
    small = dict(policy_ckpt=str(base), eval={"max_val_prompts": 16}, optim={"lr": 3e-3, "warmup_steps": 0})
    config["model"]["init_args"] = with_groups(with_groups(config["model"]["init_args"], small), model)
    config["data"]["init_args"].update(batch_size=8, pairs={
        "class_path": "rlhf_lightning.data.preferences.JsonlPairs",
        "init_args": {"train_file": str(pair_files[0]), "val_file": str(pair_files[1])},
    })
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_margins_are_exactly_zero_at_the_start_and_reference_free_losses_load_no_reference(base):
    module = DPOModule(policy_ckpt=str(base), loss=dict(beta=0.1))
    data = pair_dataset(module.tokenizer, 8)
    batch = data.collate([data[i] for i in range(8)])
    with torch.no_grad():
        out = dpo_loss(module.pair_logps(batch), "sigmoid", beta=0.1)
    # the policy and its frozen copy run the same ops on the same weights: the same bits
    assert torch.equal(out.chosen_rewards, torch.zeros(8)) and torch.equal(out.rejected_rewards, torch.zeros(8))
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-6)
    assert not any(p.requires_grad for p in module.reference.parameters())

    simpo = DPOModule(policy_ckpt=str(base), loss=dict(loss_type="simpo", beta=2.0))
    assert simpo.reference is None and all(k.startswith("model.") for k in simpo.state_dict())
    loss = simpo.training_step(batch, 0)  # no trainer: the step's loss alone
    loss.backward()
    assert math.isfinite(loss.item()) and any(p.grad is not None for p in simpo.model.parameters())


def test_precomputed_reference_logprobs_equal_the_on_the_fly_ones(base):
    module = DPOModule(policy_ckpt=str(base), precompute_ref_logprobs=True, inference_batch_size=8)
    data = pair_dataset(module.tokenizer, 20)
    table = module.reference_table(data)  # (20, 2): forwards of pairs 0-7, 8-15, 16-19
    assert table.shape == (20, 2)
    for start in (0, 8, 16):  # the same batches on the fly: the same ops in the same order, the same bits
        batch = data.collate([data[i] for i in range(start, min(start + 8, 20))])
        assert torch.equal(table[start : start + 8], module.reference_logps(batch))
    wrapped = WithReferenceLogps(data, table)
    rows = [3, 17, 5]
    batch = wrapped.collate([wrapped[i] for i in rows])
    assert torch.equal(batch["ref_chosen"], table[rows, 0]) and torch.equal(batch["ref_rejected"], table[rows, 1])
    logps = module.pair_logps(batch)  # read from the table
    assert torch.equal(logps.ref_chosen, table[rows, 0])
    # another batch composition pads to another width (another kernel path): each of a completion's at most 7
    # token log-probs within FORWARD_ATOL, so their sum within 7 times it
    on_the_fly = module.reference_logps({k: v for k, v in batch.items() if not k.startswith("ref_")})
    assert_close(on_the_fly, table[rows], atol=7 * FORWARD_ATOL, rtol=0)


def test_fit_on_sampled_pairs_trains_the_policy_logs_and_writes_a_policy_checkpoint(sft_ckpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf_lightning.evaluate import evaluate_policy
    from rlhf_lightning.export import export_policy
    from rlhf_lightning.modules.ppo import PPOModule

    cli = run_cli([
        "fit", "--config", "toy/dpo", *QUIET, f"--model.init_args.policy_ckpt={sft_ckpt}",
        f"--data.init_args.pairs.init_args.policy_ckpt={sft_ckpt}", "--trainer.max_steps=4", "--trainer.max_epochs=5",
        "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", "--data.init_args.batch_size=16",
        "--data.init_args.pairs.max_train_prompts=200", "--data.init_args.pairs.max_val_prompts=40",
        "--model.init_args.eval.max_val_prompts=64", "--model.init_args.precompute_ref_logprobs=false",
        "--model.init_args.eval.keep_best=false", "--model.init_args.optim.lr=1e-3",
    ], tmp_path)
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == 4
    start, _, _ = load_policy(str(sft_ckpt))
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), module.reference.parameters()))  # frozen
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), module.model.parameters()))  # trained
    assert DPO_METRICS | {"eval/accuracy", "eval/rm_accuracy"} <= set(trainer.logged_metrics)
    assert [h["step"] for h in module.eval_history] == [0, 2, 4]

    events = EventAccumulator(str(tmp_path / trainer.logger.log_dir)).Reload()
    assert DPO_METRICS | {"eval/accuracy", "eval/rm_accuracy"} <= set(events.Tags()["scalars"])
    first = {tag: events.Scalars(tag)[0] for tag in ("dpo/rewards/margins", "dpo/rewards/chosen", "dpo/loss", "dpo/nll")}
    assert all(e.step == 0 for e in first.values())
    assert first["dpo/rewards/margins"].value == 0.0 and first["dpo/rewards/chosen"].value == 0.0  # policy = reference
    # -logsigmoid(0) plus the config's nll_alpha (1.0) times the chosen NLL
    assert first["dpo/loss"].value == pytest.approx(math.log(2) + module.loss_cfg.nll_alpha * first["dpo/nll"].value, abs=1e-6)
    assert module.loss_cfg.nll_alpha == 1.0 and module.hparams.loss["nll_alpha"] == 1.0

    final = tmp_path / "checkpoints" / "toy" / "dpo.ckpt"
    ckpt = torch.load(final, weights_only=True)
    assert ckpt["rlhf"]["stage"] == "dpo" and all(k.startswith("model.") for k in ckpt["state_dict"])  # no reference
    summary, _ = evaluate_policy(str(final), split="val", limit=64)
    assert summary["accuracy"] == pytest.approx(module.eval_history[-1]["eval/accuracy"], abs=1e-9)
    exported, _, _ = load_policy(str(export_policy(str(final), str(tmp_path / "export"))))
    assert all(torch.equal(a, b) for a, b in zip(exported.parameters(), module.model.parameters()))
    ppo = PPOModule(policy_ckpt=str(final), reward=dict(source="judge"))  # a DPO policy is a PPO start
    assert all(torch.equal(a, b) for a, b in zip(ppo.model.parameters(), module.model.parameters()))


def test_lora_reference_is_the_base_with_adapters_off_and_adapters_round_trip(base, pair_files, tmp_path):
    from rlhf_lightning.lora import BaseOfAdapters

    pytest.importorskip("peft", reason="needs the [peft] extra")
    config = jsonl_config(tmp_path, base, pair_files, {"lora": {"r": 4}, "precompute_ref_logprobs": False, "eval": {"keep_best": True}},
                          {"max_steps": 3, "val_check_interval": 3})
    cli = run_cli(["fit", "--config", str(config), *QUIET], tmp_path)
    module = cli.model
    assert isinstance(module.reference, BaseOfAdapters) and module.frozen_models() == [module.reference]
    plain, _, _ = load_policy(str(base))
    ids = torch.randint(0, plain.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_close(module.reference(ids, None), plain(ids, None), atol=FORWARD_ATOL, rtol=0)  # adapters off: the base
    assert all(torch.equal(p, module.model.get_parameter(n)) for n, p in plain.named_parameters() if n in dict(module.model.named_parameters()))

    final = tmp_path / "checkpoints" / "toy" / "dpo.ckpt"
    ckpt = torch.load(final, weights_only=True)
    assert ckpt["rlhf"]["base"]["path"] == str(base.resolve()) and all("lora_" in k for k in ckpt["state_dict"])
    history = ckpt["rlhf"]["eval_history"]
    assert ckpt["rlhf"]["chosen"]["eval/accuracy"] == max(h["eval/accuracy"] for h in history)  # keep_best
    read, _, _ = load_policy(str(final))
    trained = {n: p for n, p in module.model.named_parameters() if "lora_" in n}
    assert trained and all(torch.equal(read.get_parameter(n), p) for n, p in trained.items())
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)  # the adapters trained


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(base, pair_files, tmp_path):
    from test_resume import assert_same_checkpoint

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    model = {"precompute_ref_logprobs": True, "eval": {"keep_best": True}}
    config = jsonl_config(tmp_path, base, pair_files, model, {"max_steps": 6, "val_check_interval": 3})
    run_cli(["fit", "--config", str(config), *QUIET], tmp_path / "a")
    run_cli(["fit", "--config", str(config), *QUIET, "--trainer.max_steps=4"], tmp_path / "b")
    assert torch.load(tmp_path / "b" / "checkpoints" / "toy" / "dpo" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = run_cli(["fit", "--config", str(config), *QUIET, "--ckpt_path=last"], tmp_path / "b")
    assert resumed.trainer.global_step == 6 and [h["step"] for h in resumed.model.eval_history] == [0, 3, 6]
    assert_same_checkpoint(tmp_path / "a" / "checkpoints" / "toy" / "dpo.ckpt", tmp_path / "b" / "checkpoints" / "toy" / "dpo.ckpt")


@pytest.mark.parametrize("extra, words", [
    (["--model.init_args.loss.beta=0"], ["model.init_args.loss.beta: 0.0 is not allowed", "a number > 0"]),
    (["--model.init_args.loss.beta=.nan"], ["model.init_args.loss.beta: nan is not allowed", "a number > 0"]),
    (["--model.init_args.loss.beta=.inf"], ["model.init_args.loss.beta: inf"]),
    (["--model.init_args.loss.loss_type=[sigmoid, hinge]", "--model.init_args.loss.loss_weights=[1.0]"], ["loss_weights: [1.0]", "2 finite number(s)"]),
    (["--model.init_args.loss.loss_type=kto"], ["loss_type: unknown value 'kto'", "sigmoid", "simpo"]),
    (["--model.init_args.policy_ckpt=null"], ["policy_ckpt", "needs a reference model", "simpo"]),
    (["--model.init_args.loss.label_smoothing=0.5"], ["label_smoothing: 0.5 is not allowed", "[0, 0.5)"]),
    (["--model.init_args.optim.lr=-1"], ["model.init_args.optim.lr: -1.0 is not allowed"]),
])
def test_bad_options_give_one_line_and_exit_2(extra, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkpoints here: each is refused before anything is read
    assert main(["fit", "--config", "toy/dpo", *QUIET, "--trainer.logger=false", *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlhf: error: "), lines
    assert all(w in lines[0] for w in words), lines[0]


def test_pipeline_method_dpo_runs_sft_then_dpo_and_reports_a_dpo_row(tmp_path, monkeypatch, capsys):
    from rlhf_lightning.pipeline import main as pipeline_main

    monkeypatch.chdir(tmp_path)
    quiet = [f"--{s}.{q[2:]}" for s in ("sft", "dpo") for q in [*QUIET, "--trainer.logger=false"]]
    # a few SFT steps answer nothing right: the pairs are judged at random (the wiring is what is tested here)
    assert pipeline_main([
        "--method", "dpo", "--samples_per_prompt=2", *quiet, "--sft.trainer.max_steps=5", "--sft.data.init_args.max_val_prompts=16",
        "--dpo.trainer.max_steps=2", "--dpo.trainer.val_check_interval=2", "--dpo.data.init_args.batch_size=8",
        "--dpo.data.init_args.pairs.judge=random", "--dpo.data.init_args.pairs.max_train_prompts=32",
        "--dpo.data.init_args.pairs.max_val_prompts=8", "--dpo.model.init_args.eval.max_val_prompts=16",
    ]) == 0
    rows = json.loads((tmp_path / "lightning_logs" / "toy" / "summary.json").read_text())
    assert [r["stage"] for r in rows] == ["sft", "dpo"]
    assert all(set(r) == {"stage", "test_accuracy", "test_reward", "test_kl", "test_gold_reward", "wall_s"} for r in rows)
    assert rows[1]["test_reward"] is None and rows[0]["test_kl"] == pytest.approx(0.0, abs=1e-6) and rows[1]["test_kl"] >= 0
    assert not (tmp_path / "checkpoints" / "toy" / "reward.ckpt").exists()
    dpo = torch.load(tmp_path / "checkpoints" / "toy" / "dpo.ckpt", weights_only=True)
    assert dpo["rlhf"]["policy_ckpt"] == "checkpoints/toy/sft.ckpt" and "dpo " in capsys.readouterr().out


def test_a_pair_longer_than_the_context_names_its_file_line_and_field(base, pair_files, tmp_path, monkeypatch, capsys):
    rows = easy_pairs("train", 4)
    rows[2]["chosen"] = "1" * 40  # prompt + completion beyond the tiny policy's 24-token context
    train = tmp_path / "long.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = jsonl_config(tmp_path, base, (train, pair_files[1]), {"precompute_ref_logprobs": False}, {"max_steps": 1})
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(config), *QUIET]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{train}:3: field 'chosen': prompt + completion is" in lines[0] and "context is 24" in lines[0], lines


def test_gradient_checkpointing_gives_the_same_gradient_and_bf16_mixed_starts_at_zero_margins(base, pair_files, tmp_path):
    from tolerance import grad_atol

    grads = []
    for checkpointing in (False, True):
        module = DPOModule(policy_ckpt=str(base), gradient_checkpointing=checkpointing, loss=dict(beta=0.5, nll_alpha=1.0))
        assert module.model.config.gradient_checkpointing is checkpointing and not module.reference.config.gradient_checkpointing
        data = pair_dataset(module.tokenizer, 8)
        module.training_step(data.collate([data[i] for i in range(8)]), 0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.model.parameters()]))
    # the blocks' forwards recomputed in backward: the same operations again, so the same gradient to rounding
    assert_close(grads[1], grads[0], atol=grad_atol(grads[0], terms=8), rtol=0)

    # bf16 autocast on CPU: the policy and its per-step reference run the same bf16 forward, so margins start at 0
    import rlhf_lightning.modules.dpo as dpo

    config = jsonl_config(tmp_path, base, pair_files, {"precompute_ref_logprobs": False, "eval": {"keep_best": False}},
                          {"max_steps": 2, "val_check_interval": 2, "precision": "bf16-mixed"})
    calls = []
    original = dpo.dpo_loss

    def recording(logps, *args):
        calls.append((logps.chosen.dtype, torch.is_autocast_enabled("cpu"), logps.chosen - logps.ref_chosen))
        return original(logps, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dpo, "dpo_loss", recording)
        cli = run_cli(["fit", "--config", str(config), *QUIET], tmp_path)
    assert cli.trainer.global_step == 2 and len(calls) == 2
    assert calls[0][1] and torch.equal(calls[0][2], torch.zeros_like(calls[0][2]))  # under autocast; policy = reference
    assert calls[1][2].abs().max() > 0  # the first step moved the policy
