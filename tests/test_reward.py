"""Reward model and RewardModule: last-token scoring, bad checkpoints, a tiny fit, reload and resume.

The Bradley-Terry loss and pairwise accuracy are checked against hand computations in test_losses.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import CONFIGS, QUIET, run_cli
from tolerance import FORWARD_ATOL
from rlhf_lightning.checkpoints import CheckpointError, read_checkpoint, submodule_state
from rlhf_lightning.padding import left_pad, right_pad
from rlhf_lightning.data.jsonl import DataError, read_jsonl
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.scoring import encode_scored, load_reward_model, score_texts
from rlhf_lightning.modules.reward import RewardModule, binary_auroc
from rlhf_lightning.tasks.arithmetic import ALPHABET, gold_answer, judge, split_of
from rlhf_lightning.tokenizer import CharTokenizer, UnknownCharacterError

TOK = CharTokenizer(ALPHABET)
PROMPTS = ["Q: 1+2=\nA:", "Q: 10+25=\nA:", "Q: 7-7=\nA:"]
COMPLETIONS = ["3", "35", "00000"]
ENDED = [True, True, False]

# Generated pairs from a few train and val prompts: exercises sampling, files, checkpoints and resume.
RM_QUICK = [
    "fit", "--config", str(CONFIGS / "toy" / "reward.yaml"), *QUIET,
    "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--data.init_args.batch_size=32",
    "--data.init_args.pairs.max_train_prompts=300", "--data.init_args.pairs.max_val_prompts=100",
]
# The held-out pairs of `easy_pairs` that a tiny fit must rank right; chance is 0.5.
HELD_OUT_ACCURACY = 0.9


def easy_pairs(split: str, n: int) -> list[dict]:
    """Gold answers preferred to the same answer cut off before EOS or followed by a stray '='."""
    from rlhf_lightning.tasks.arithmetic import problems

    rows = []
    for i, p in enumerate(problems(split)[::7][:n]):
        bad = {"rejected": p.answer, "rejected_ended": False} if i % 2 else {"rejected": p.answer + "="}
        rows.append({"prompt": p.prompt, "chosen": p.answer, **bad})
    return rows


@pytest.mark.parametrize("config", [{"type": "gpt", "block_size": 24}, {"type": "mean_embedding", "n_embd": 16}])
def test_score_is_read_at_the_last_real_token_whatever_the_padding(config):
    torch.manual_seed(0)
    model = RewardModel({**config, "vocab_size": TOK.vocab_size}).eval()
    seqs = [encode_scored(TOK, p, c, e) for p, c, e in zip(PROMPTS, COMPLETIONS, ENDED)]
    right_ids, right_mask = right_pad(seqs, TOK.pad_id)
    left_ids, left_mask = left_pad(seqs, TOK.pad_id)
    with torch.no_grad():
        scores = model(right_ids, right_mask)  # (3,)
        torch.testing.assert_close(model(left_ids, left_mask), scores, atol=FORWARD_ATOL, rtol=0)
        # what sits in padded positions never matters
        noisy = right_ids.masked_fill(~right_mask, TOK.eos_id)
        torch.testing.assert_close(model(noisy, right_mask), scores, atol=1e-6, rtol=0)
        # each row alone scores the same as in the batch
        alone = torch.stack([model(*right_pad([s], TOK.pad_id)) for s in seqs]).squeeze(-1)
        torch.testing.assert_close(alone, scores, atol=FORWARD_ATOL, rtol=0)
        torch.testing.assert_close(score_texts(model, TOK, PROMPTS, COMPLETIONS, torch.tensor(ENDED)), scores)
        # the EOS of an ended completion is scored: dropping it changes the score
        assert not torch.allclose(score_texts(model, TOK, PROMPTS, COMPLETIONS, [False] * 3), scores)


def test_score_texts_names_an_unknown_character():
    model = RewardModel({"type": "gpt", "vocab_size": TOK.vocab_size, "block_size": 24})
    with pytest.raises(UnknownCharacterError, match=r"rollout: field 'completion': unknown character 'x'"):
        score_texts(model, TOK, ["Q: 1+2=\nA:"], ["x"], [True], where="rollout")
    with pytest.raises(ValueError, match="unknown reward model type 'lstm'"):
        RewardModel({"type": "lstm", "vocab_size": 5})


def test_binary_auroc_by_hand():
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert binary_auroc(torch.tensor([0.1, 0.4, 0.4, 0.9]), labels) == 0.875  # (1 + 0.5 + 1 + 1) / 4
    assert binary_auroc(torch.tensor([0.0, 1.0, 2.0, 3.0]), labels) == 1.0
    assert binary_auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), labels) == 0.0
    assert math.isnan(binary_auroc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])))  # one class only: undefined


def test_missing_or_wrong_stage_sft_checkpoint_fails_at_construction(tmp_path, sft_ckpt):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match=rf"model.init_args.sft_ckpt: checkpoint '{missing}' does not exist"):
        RewardModule(sft_ckpt=str(missing))
    wrong = tmp_path / "reward.ckpt"
    torch.save({"rlhf": {"stage": "reward"}, "state_dict": {}}, wrong)
    with pytest.raises(CheckpointError, match=rf"model.init_args.sft_ckpt: '{wrong}' is a 'reward' checkpoint"):
        RewardModule(sft_ckpt=str(wrong))
    with pytest.raises(CheckpointError, match=rf"reward_ckpt: '{sft_ckpt}' is a 'sft' checkpoint, expected 'reward'"):
        load_reward_model(str(sft_ckpt))


def test_backbone_and_tokenizer_come_from_the_sft_checkpoint(sft_ckpt):
    module = RewardModule(sft_ckpt=str(sft_ckpt))
    sft = read_checkpoint(sft_ckpt, ("sft",), "test")
    assert module.tokenizer == CharTokenizer.from_dict(sft["rlhf"]["tokenizer"])
    assert module.hparams.model == {**sft["rlhf"]["model"], "type": "gpt"}
    torch.testing.assert_close(module.model.backbone.blocks[1].mlp[0].weight, submodule_state(sft, "model")["blocks.1.mlp.0.weight"])
    fresh = RewardModule(sft_ckpt=str(sft_ckpt), init_from_sft=False)
    assert not torch.equal(fresh.model.backbone.wte.weight, module.model.backbone.wte.weight)
    with pytest.raises(ValueError, match=r"\['n_embd'\] differ"):
        RewardModule(model={"n_embd": 32}, sft_ckpt=str(sft_ckpt))


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, sft_ckpt):
    """One quick reward fit from generated pairs: (working dir, the CLI object)."""
    cwd = tmp_path_factory.mktemp("reward_run")
    cli = run_cli([*RM_QUICK, f"--model.init_args.sft_ckpt={sft_ckpt}", f"--data.init_args.pairs.init_args.policy_ckpt={sft_ckpt}",
                   "--trainer.log_every_n_steps=1"], cwd)
    return cwd, cli


def test_step_metrics_reach_tensorboard_and_the_bar(reward_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd, cli = reward_run
    events = EventAccumulator(str(cwd / cli.trainer.log_dir))
    events.Reload()
    metrics = cli.trainer.callback_metrics
    for name in ("rm/loss", "rm/accuracy", "rm/margin", "rm/chosen_nll"):
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == [0, 1, 2], name  # every step of the 3
        assert scalars[-1].value == pytest.approx(float(metrics[name])), name
    assert 0.0 <= float(metrics["rm/accuracy"]) <= 1.0 and float(metrics["rm/chosen_nll"]) > 0


def test_tiny_fit_ranks_held_out_chosen_above_rejected(tmp_path):
    for split, n in (("train", 600), ("val", 100)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in easy_pairs(split, n))
    cli = run_cli([
        "fit", "--config", str(CONFIGS / "toy" / "reward.yaml"), *QUIET, "--trainer.logger=false",
        "--trainer.max_epochs=3", "--model.init_args.sft_ckpt=null", "--model.init_args.optim.lr=0.003",
        "--model.init_args.model={type: gpt, n_layer: 1, n_embd: 32, block_size: 24}", "--model.init_args.chosen_nll=0",
        "--data.init_args.pairs=JsonlPairs", f"--data.init_args.pairs.train_file={tmp_path / 'train.jsonl'}",
        f"--data.init_args.pairs.val_file={tmp_path / 'val.jsonl'}",
        "--data.init_args.batch_size=32",
    ], tmp_path)
    metrics = cli.trainer.callback_metrics
    assert float(metrics["eval/rm_accuracy"]) >= HELD_OUT_ACCURACY
    assert float(metrics["rm/loss"]) < 0.5  # chance is log 2 = 0.693
    # the chosen answers are the judge's right answers, the rejected ones wrong: AUROC follows accuracy
    assert float(metrics["eval/rm_auroc"]) >= HELD_OUT_ACCURACY
    assert (tmp_path / "checkpoints" / "toy" / "reward.ckpt").is_file()


def test_generated_pairs_are_written_to_the_run_dir(reward_run):
    cwd, cli = reward_run
    run_dir = cwd / "lightning_logs" / "toy" / "reward" / "version_0"
    assert cwd / cli.trainer.log_dir == run_dir  # log_dir is relative to the working directory
    for name, split in (("preferences_train.jsonl", "train"), ("preferences_val.jsonl", "val")):
        rows = read_jsonl(run_dir / name, ["prompt", "chosen", "rejected"], {"chosen_ended": bool, "rejected_ended": bool}, non_empty=False)
        assert len(rows) > 20
        for _, r in rows:
            gold = gold_answer(r["prompt"])
            assert split_of(r["prompt"]) == split
            assert judge(r["chosen"], gold, r["chosen_ended"]) == 1.0  # both judged against the pair's own prompt
            assert judge(r["rejected"], gold, r["rejected_ended"]) == 0.0
    assert len(cli.datamodule.train_set) == len(read_jsonl(run_dir / "preferences_train.jsonl", ["prompt"]))


def test_checkpoint_reload_gives_identical_scores(reward_run):
    cwd, cli = reward_run
    path = str(cwd / "checkpoints" / "toy" / "reward.ckpt")
    model, tokenizer, meta = load_reward_model(path)
    assert meta["stage"] == "reward" and meta["model"]["type"] == "gpt"
    assert meta["reward_mean"] == cli.model.reward_mean and meta["reward_std"] == cli.model.reward_std
    assert isinstance(meta["reward_std"], float) and meta["reward_std"] > 0
    assert not model.training and tokenizer == cli.model.tokenizer
    trained = cli.model.model.eval()
    with torch.no_grad():
        expected = score_texts(trained, tokenizer, PROMPTS, COMPLETIONS, ENDED)
        torch.testing.assert_close(score_texts(model, tokenizer, PROMPTS, COMPLETIONS, ENDED), expected, atol=0, rtol=0)
        # self-describing: the LightningModule reloads with no config and without reading the SFT file again
        module = RewardModule.load_from_checkpoint(path)
        assert module.hparams.sft_ckpt is None
        torch.testing.assert_close(score_texts(module.model.eval(), module.tokenizer, PROMPTS, COMPLETIONS, ENDED), expected, atol=0, rtol=0)
    assert module.reward_mean == meta["reward_mean"]


def test_resume_from_last(reward_run, sft_ckpt):
    cwd, cli = reward_run
    steps = cli.trainer.global_step
    resumed = run_cli([
        *RM_QUICK, f"--model.init_args.sft_ckpt={sft_ckpt}", f"--data.init_args.pairs.init_args.policy_ckpt={sft_ckpt}",
        "--trainer.max_epochs=2", "--trainer.logger=false",
        "--ckpt_path", "last",
    ], cwd)
    assert steps == 3 and resumed.trainer.global_step == 2 * steps  # the first epoch was not repeated


def test_fit_from_jsonl_files(reward_run, tmp_path):
    cwd, _ = reward_run
    run_dir = cwd / "lightning_logs" / "toy" / "reward" / "version_0"
    cli = run_cli([
        "fit", "--config", str(CONFIGS / "toy" / "reward.yaml"), *QUIET, "--trainer.logger=false",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.num_sanity_val_steps=0",
        "--model.init_args.sft_ckpt=null", "--model.init_args.model={type: mean_embedding, n_embd: 16}",
        "--model.init_args.chosen_nll=0",
        "--data.init_args.pairs=JsonlPairs", f"--data.init_args.pairs.train_file={run_dir / 'preferences_train.jsonl'}",
        f"--data.init_args.pairs.val_file={run_dir / 'preferences_val.jsonl'}",
    ], tmp_path)
    assert cli.trainer.global_step == 2
    held_out = len(read_jsonl(run_dir / "preferences_val.jsonl", ["prompt"]))
    assert len(cli.datamodule.val_set) == held_out  # one group per pair
    model, tokenizer, meta = load_reward_model(str(tmp_path / "checkpoints" / "toy" / "reward.ckpt"))
    assert meta["model"] == {"type": "mean_embedding", "n_embd": 16, "vocab_size": TOK.vocab_size}
    # the logged held-out accuracy is the saved model's: the fraction of val pairs it ranks chosen above rejected
    rows = [r for _, r in read_jsonl(run_dir / "preferences_val.jsonl", ["prompt", "chosen", "rejected"],
                                     {"chosen_ended": bool, "rejected_ended": bool}, non_empty=False)]
    with torch.no_grad():
        chosen = score_texts(model, tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                             [r.get("chosen_ended", True) for r in rows])
        rejected = score_texts(model, tokenizer, [r["prompt"] for r in rows], [r["rejected"] for r in rows],
                               [r.get("rejected_ended", True) for r in rows])
    accuracy = float((chosen > rejected).float().mean())
    assert float(cli.trainer.callback_metrics["eval/rm_accuracy"]) == pytest.approx(accuracy, abs=1e-6)


def test_bad_input_fails_before_training(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "Q: 1+2=\nA:", "chosen": "3", "rejected": "4"}) + "\n\n" + json.dumps({"prompt": "Q: 1+2=\nA:", "chosen": "3"}) + "\n")
    base = ["fit", "--config", str(CONFIGS / "toy" / "reward.yaml"), *QUIET, "--trainer.logger=false"]
    with pytest.raises(DataError, match=rf"{bad}:3: field 'rejected': missing"):
        run_cli([*base, "--model.init_args.sft_ckpt=null", "--data.init_args.pairs=JsonlPairs", f"--data.init_args.pairs.train_file={bad}"], tmp_path)
    with pytest.raises(CheckpointError, match=r"model.init_args.sft_ckpt: checkpoint 'checkpoints/toy/sft.ckpt' does not exist"):
        run_cli(base, tmp_path)  # the default config, with no SFT run in this directory
    assert not (tmp_path / "checkpoints").exists()


def test_lm_feature_adds_the_completions_log_likelihood_under_the_policy():
    from rlhf_lightning.scoring import token_logprobs
    from rlhf_lightning.models import GPT, GPTConfig

    torch.manual_seed(0)
    sizes = {"vocab_size": TOK.vocab_size, "block_size": 24, "n_layer": 1, "n_head": 2, "n_embd": 16}
    policy = GPT(GPTConfig(**sizes)).eval()
    model = RewardModel({"type": "gpt", "lm_feature": True, **sizes}).eval()
    model.load_backbone(policy.state_dict())
    with torch.no_grad():
        model.head.weight.zero_(), model.head.bias.fill_(0.5)
        scores = score_texts(model, TOK, PROMPTS, COMPLETIONS, ENDED)  # (3,)
        for i, (p, c, e) in enumerate(zip(PROMPTS, COMPLETIONS, ENDED)):
            ids = torch.tensor([encode_scored(TOK, p, c, e)])
            start = len(TOK.encode_prompt(p))  # the completion's first token
            expected = token_logprobs(policy, ids, torch.ones_like(ids, dtype=torch.bool))[0, start:].sum() + 0.5
            torch.testing.assert_close(scores[i], expected, atol=FORWARD_ATOL, rtol=0)
    with pytest.raises(ValueError, match="completion_mask"):
        model(ids, torch.ones_like(ids, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a training_step called by hand
def test_chosen_nll_adds_the_chosen_completions_mean_token_nll():
    from rlhf_lightning.data.preferences import PairDataset, PreferencePair
    from rlhf_lightning.losses import bradley_terry_loss
    from rlhf_lightning.scoring import token_logprobs
    from rlhf_lightning.models import GPT, GPTConfig

    torch.manual_seed(0)
    sizes = {"vocab_size": TOK.vocab_size, "block_size": 24, "n_layer": 1, "n_head": 2, "n_embd": 16}
    module = RewardModule(model={"type": "gpt", "lm_feature": True, **sizes}, chosen_nll=0.5)
    pairs = [PreferencePair(PROMPTS[0], "3", "4"), PreferencePair(PROMPTS[1], "35", "5", chosen_ended=False)]
    data = PairDataset(TOK, pairs, max_len=24)
    batch = data.collate([data[0], data[1]])
    loss = module.training_step(batch, 0)

    # by hand: the same weights as a plain policy; chosen "3"+EOS is 2 tokens, the unfinished "35" is 2
    policy = GPT(GPTConfig(**sizes)).eval()
    policy.load_state_dict({**module.model.backbone.state_dict(), "lm_head.weight": module.model.lm_head.weight})
    total = 0.0
    for p in pairs:
        ids = torch.tensor([encode_scored(TOK, p.prompt, p.chosen, p.chosen_ended)])
        start = len(TOK.encode_prompt(p.prompt))
        total += token_logprobs(policy, ids, torch.ones_like(ids, dtype=torch.bool))[0, start:].sum()
    with torch.no_grad():
        scores = module.model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])  # (4,)
    expected = bradley_terry_loss(scores[:2], scores[2:]) + 0.5 * (-total / 4)
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=FORWARD_ATOL, rtol=0)
    with pytest.raises(ValueError, match="chosen_nll needs"):
        RewardModule(model={"type": "gpt", **sizes}, chosen_nll=1.0)
