"""Online DPO (`DPOModule(online=...)` on `PromptDataModule`): pairs sampled from the current policy and judged while
it trains, the `rollout/*` metrics, refreshes every `refresh_every` steps, a learned judge, exact resume with the
pairs in the checkpoint, and its bad options.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, QUIET, ddp_mean_gradient, run_cli, with_groups
from rlhf_lightning.cli import main
from rlhf_lightning.data.preferences import pairs_from_group
from rlhf_lightning.modules import dpo as dpo_module
from rlhf_lightning.policy import load_policy
from test_dpo import base  # noqa: F401  (the tiny SFT checkpoint fixture)

ROLLOUT = {"rollout/pairs", "rollout/pairs_kept_frac", "rollout/gold_reward", "rollout/refreshes"}


def online_config(tmp_path: Path, policy: Path, online: dict, trainer: dict, model: dict | None = None) -> Path:
    """configs/toy/online_dpo.yaml from `policy`, small: 8 prompts a step, 16 `val` prompts, a checkpoint every step."""
    config = yaml.safe_load((CONFIGS / "toy" / "online_dpo.yaml").read_text())
    config["trainer"].update(enable_progress_bar=False, logger=False, log_every_n_steps=1, **trainer)
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    config["model"]["init_args"] = with_groups(config["model"]["init_args"], dict(policy_ckpt=str(policy), optim={"lr": 3e-3, "warmup_steps": 0}, **(model or {})))
    config["model"]["init_args"]["online"].update(online)
    config["data"]["init_args"].update(batch_size=8, max_val_prompts=16, max_train_prompts=64)
    path = tmp_path / "online_dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_online_fit_samples_pairs_from_the_current_policy_and_refreshes_every_n_steps(sft_ckpt, tmp_path, monkeypatch):
    calls = []
    sample_groups = dpo_module.sample_groups

    def recording(policy, *args, **kwargs):
        groups = sample_groups(policy, *args, **kwargs)
        calls.append(({k: v.detach().clone() for k, v in policy.state_dict().items()}, groups, kwargs["score"]))
        return groups

    monkeypatch.setattr(dpo_module, "sample_groups", recording)
    config = online_config(tmp_path, sft_ckpt, {"refresh_every": 2, "eval_every": 2}, {"max_steps": 4})
    cli = run_cli(["fit", "--config", str(config), *QUIET], tmp_path)
    module, trainer = cli.model, cli.trainer
    assert trainer.global_step == 4 and module._refreshes == 2 and len(calls) == 2  # steps 0 and 2 sampled
    start, _, _ = load_policy(str(sft_ckpt))
    first, second = calls[0][0], calls[1][0]
    assert all(torch.equal(first[k], v) for k, v in start.state_dict().items())  # the start samples the first pairs
    assert any(not torch.equal(second[k], v) for k, v in start.state_dict().items())  # the trained policy the second
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), module.reference.parameters()))  # reference frozen
    groups = calls[1][1]
    assert all(g.pairs == pairs_from_group(g.scores, g.completions) for g in groups)  # every two with different scores
    assert all(g.scores[i] > g.scores[j] for g in groups for i, j in g.pairs)
    kept = sum(len(g.pairs) for g in groups)
    assert kept > 0 and module._pairs["input_ids"].size(0) == 2 * kept  # chosen and rejected rows of every pair
    assert float(trainer.logged_metrics["rollout/pairs_kept_frac"]) == pytest.approx(kept / (len(groups) * 6))  # K = 4
    gold = [x for g in groups for x in g.labels]
    assert float(trainer.logged_metrics["rollout/gold_reward"]) == pytest.approx(sum(gold) / len(gold))
    assert ROLLOUT | {"dpo/loss", "dpo/rewards/margins", "eval/accuracy"} <= set(trainer.callback_metrics)
    assert [h["step"] for h in module.eval_history] == [0, 2, 4]
    assert calls[0][2] is None  # judged by the task's judge


def test_first_step_margins_are_exactly_zero(base, tmp_path):  # noqa: F811
    config = online_config(tmp_path, base, {"judge": "random", "eval_every": 0}, {"max_steps": 1})
    cli = run_cli(["fit", "--config", str(config), *QUIET], tmp_path)
    metrics = cli.trainer.logged_metrics
    assert float(metrics["dpo/rewards/margins"]) == 0.0 and float(metrics["dpo/rewards/chosen"]) == 0.0  # policy = reference
    assert float(metrics["rollout/pairs_kept_frac"]) == 1.0  # random scores never tie
    assert float(metrics["dpo/loss"]) == pytest.approx(math.log(2) + float(metrics["dpo/nll"]), abs=1e-6)  # nll_alpha 1


def test_online_run_killed_mid_refresh_resumes_bitwise_equal_to_an_uninterrupted_run(base, tmp_path):  # noqa: F811
    from test_resume import assert_same_checkpoint, kill_after_next_checkpoint, start

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    config = online_config(tmp_path, base, {"judge": "random", "refresh_every": 3, "eval_every": 2}, {"max_steps": 6})
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2  # step 2: one step before a refresh
    config.write_text(yaml.safe_dump(settings))
    run_cli(["fit", "--config", str(config), *QUIET], tmp_path / "a")
    last = tmp_path / "b" / "checkpoints" / "toy" / "online_dpo" / "last.ckpt"
    kill_after_next_checkpoint(start(config, tmp_path / "b"), last)  # SIGKILL
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] in (2, 4) and saved["rlhf"]["online"]["steps_on_pairs"] in (2, 1)  # pairs in use
    resumed = run_cli(["fit", "--config", str(config), *QUIET, "--ckpt_path=last"], tmp_path / "b")
    assert resumed.trainer.global_step == 6 and resumed.model._refreshes == 2
    assert [h["step"] for h in resumed.model.eval_history] == [0, 2, 4, 6]
    final = Path("checkpoints") / "toy" / "online_dpo.ckpt"
    assert_same_checkpoint(tmp_path / "a" / final, tmp_path / "b" / final)


def test_learned_judge_scores_the_samples_and_a_wrong_stage_is_refused(sft_ckpt, reward_ckpt, tmp_path, capsys, monkeypatch):
    from rlhf_lightning.rewards import LearnedReward

    config = online_config(tmp_path, sft_ckpt, {"judge": "learned", "reward_ckpt": str(reward_ckpt), "eval_every": 0}, {"max_steps": 1})
    scored = []
    original = LearnedReward.__call__

    def recording(self, prompts, completions, ended, golds):
        out = original(self, prompts, completions, ended, golds)
        scored.append(out)
        return out

    monkeypatch.setattr(LearnedReward, "__call__", recording)
    cli = run_cli(["fit", "--config", str(config), *QUIET], tmp_path)
    assert len(scored) == 1 and scored[0].shape == (8 * 4,)  # every sample of the step's 8 prompts
    assert cli.model.judge_source.model in cli.model.frozen_models()
    ckpt = torch.load(tmp_path / "checkpoints" / "toy" / "online_dpo.ckpt", weights_only=True)
    assert ckpt["rlhf"]["online"]["reward_sha256"] == cli.model.reward_sha256 is not None

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["fit", "--config", str(config), *QUIET, f"--model.init_args.online.reward_ckpt={sft_ckpt}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.init_args.online.reward_ckpt" in lines[0] and "reward" in lines[0], lines


@pytest.mark.parametrize("extra, words", [
    (["--model.init_args.online.refresh_every=0"], ["model.init_args.online.refresh_every: 0 is not allowed", "an integer >= 1"]),
    (["--model.init_args.online.samples_per_prompt=1"], ["online.samples_per_prompt: 1 is not allowed", ">= 2"]),
    (["--model.init_args.online.judge=oracle"], ["online.judge: unknown value 'oracle'", "learned"]),
    (["--model.init_args.online.judge=learned"], ["online.reward_ckpt: None with judge 'learned'"]),
    (["--model.init_args.online.temperature=0"], ["online.temperature: 0.0 is not allowed"]),
    (["--model.init_args.precompute_ref_logprobs=true"], ["precompute_ref_logprobs", "online DPO"]),
    (["--model.init_args.eval.max_val_prompts=8"], ["model.init_args.eval.max_val_prompts", "data.init_args.max_val_prompts"]),
])
def test_bad_online_options_give_one_line_and_exit_2(extra, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkpoints here: each is refused before anything is read
    assert main(["fit", "--config", "toy/online_dpo", *QUIET, "--trainer.logger=false", *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlhf: error: "), lines
    assert all(w in lines[0] for w in words), lines[0]


def test_online_dpo_on_preference_pairs_is_refused(base, tmp_path, monkeypatch, capsys):  # noqa: F811
    config = yaml.safe_load((CONFIGS / "toy" / "dpo.yaml").read_text())
    config["model"]["init_args"].update(policy_ckpt=str(base), precompute_ref_logprobs=False, online={"judge": "random"})
    config["trainer"]["logger"] = False
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(path), *QUIET, f"--data.init_args.pairs.init_args.policy_ckpt={base}",
                 "--data.init_args.pairs.init_args.max_train_prompts=8", "--data.init_args.pairs.init_args.max_val_prompts=4",
                 "--data.init_args.pairs.init_args.judge=random"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.class_path" in lines[0] and "PromptDataModule" in lines[0], lines


# --------------------------------------------------------------------------- two processes

WORLD = 2
PROMPTS = ["Q: 1+2=\nA:", "Q: 3+4=\nA:", "Q: 5+1=\nA:", "Q: 2+2=\nA:"]  # rank r gets prompts 2r, 2r+1
COMPLETIONS = ["3", "4", "17", "5"]
# Per prompt, the judge's scores of its 4 samples. "uneven": rank 0 has 3 pairs, rank 1 has 6 (a mean over a
# rank's own pairs would weight rank 0's pairs twice as much); "empty": rank 0 has none (a placeholder at weight 0).
CASES = {
    "uneven": [[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1], [0.5, 0, 0, 0]],
    "empty": [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 1], [0.5, 0, 0, 0]],
}


def fixed_groups(case: str):
    """A stand-in for `sample_groups`: the same 4 completions per prompt, scored by the case's table."""
    from rlhf_lightning.data.preferences import SampleGroup

    def sample(policy, tokenizer, records, *args, **kwargs):
        groups = []
        for r in records:
            scores = [float(x) for x in CASES[case][PROMPTS.index(r.prompt)]]
            groups.append(SampleGroup(r.prompt, r.gold, COMPLETIONS, [True] * 4, scores, [0.0] * 4, r.where, pairs_from_group(scores, COMPLETIONS)))
        return groups

    return sample


def online_update(policy: str, case: str, prompts: list[str]) -> torch.Tensor:
    """The gradient of one online DPO step on `prompts`, averaged over ranks like DDP."""
    from rlhf_lightning.data.prompts import PromptDataset, PromptRecord

    dpo_module.sample_groups = fixed_groups(case)
    module = dpo_module.DPOModule(policy_ckpt=policy, online={"judge": "random", "eval_every": 0}, loss=dict(beta=0.5, nll_alpha=1.0))
    data = PromptDataset(module.tokenizer, [PromptRecord(p, None, "test") for p in prompts])
    loss = module.training_step(data.collate([data[i] for i in range(len(data))]), 0)
    loss.backward()
    return ddp_mean_gradient(list(module.model.parameters()))  # averaged over ranks, as DDP does


def _online_worker(rank: int, policy: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        grads = {case: online_update(policy, case, PROMPTS[2 * rank : 2 * rank + 2]) for case in CASES}
        torch.save(grads, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_uneven_pairs_take_the_single_process_step(base, tmp_path, monkeypatch):  # noqa: F811
    import torch.multiprocessing as mp

    from tolerance import grad_atol

    monkeypatch.setattr(dpo_module, "sample_groups", dpo_module.sample_groups)  # restored after the test
    single = {case: online_update(str(base), case, PROMPTS) for case in CASES}
    assert all(g.abs().sum() > 0 for g in single.values())
    assert (single["uneven"] - single["empty"]).abs().max() > 1e-4  # two different sets of pairs
    mp.spawn(_online_worker, args=(str(base), str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for case, grad in single.items():
            # every rank's pairs and chosen tokens summed over 2 ranks, against one pass over all 9 (6) pairs: a weight's
            # gradient sums a contribution from every position of the 18 sequences (BOS, a 10-character prompt, at most
            # 2 answer characters and EOS), not one per sequence
            positions = 1 + len(PROMPTS[0]) + 2 + 1
            torch.testing.assert_close(grads[case], grad, atol=grad_atol(grad, terms=18 * positions * WORLD), rtol=0, msg=lambda m: f"{case}: {m}")
