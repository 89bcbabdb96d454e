"""PPO loss options (loss aggregation, clip-higher, dual clip, sequence-level ratios, truncation masking) from the
module and the command line: each option reaches the loss as meant, truncated completions get no loss, and bad
values stop with one line and exit code 2."""

from __future__ import annotations

import subprocess

import pytest
import torch
from torch.testing import assert_close

from conftest import CONFIGS, QUIET, run_cli, with_groups
from tolerance import RATIO_ATOL
from rlhf_lightning.cli import main
from rlhf_lightning.data.prompts import PromptDataset, load_prompts
from rlhf_lightning.losses import aggregate_loss, cispo_loss, drop_truncated, gmpo_loss, sapo_loss
from test_losses import ppo_loss
from rlhf_lightning.modules.ppo import PPOModule, Rollout
from rlhf_lightning.policy import load_policy

PPO_YAML = str(CONFIGS / "toy" / "ppo.yaml")


def ppo(sft_ckpt, **kwargs) -> PPOModule:
    return PPOModule(policy_ckpt=str(sft_ckpt), **with_groups({"reward": {"source": "judge"}, "kl": {"beta": 0.1}}, kwargs))


def menu_rollout(module: PPOModule) -> Rollout:
    """4 rows of up to 4 tokens (lengths 4, 2, 3, 4; the last row truncated), old log-probs set so that the
    ratios sit where each option binds: 1.25 (above 1 + 0.2, below 1 + 0.3), 0.85 (above 1 - 0.2, below
    1 - 0.1) and e = 2.72 (above a dual clip of 1.5 on a negative advantage)."""
    g = torch.Generator().manual_seed(7)
    B, P, N, V = 4, 5, 4, module.tokenizer.vocab_size
    lengths = torch.tensor([4, 2, 3, 4])
    completion_mask = torch.arange(N)[None, :] < lengths[:, None]  # (B, N)
    completion_ids = torch.randint(3, V, (B, N), generator=g).masked_fill(~completion_mask, 0)
    rollout = Rollout(
        input_ids=torch.cat([torch.randint(3, V, (B, P), generator=g), completion_ids], 1),
        attention_mask=torch.cat([torch.ones(B, P, dtype=torch.bool), completion_mask], 1),
        completion_ids=completion_ids, completion_mask=completion_mask,
        old_logprobs=torch.zeros(B, N), ref_logprobs=torch.zeros(B, N),
        rewards=torch.zeros(B), advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        finished=torch.tensor([True, True, True, False]),
    )
    with torch.no_grad():
        logp = rollout.logprobs(module.model, module.cfg.rollout.temperature)  # (B, N)
    log_rho = torch.tensor([[0.2231, 0.2231, 0.0, 0.1],  # rho 1.25 on A > 0: clip-higher decides
                            [1.0, -0.1625, 0.0, 0.0],  # rho e and 0.85 on A < 0: the dual clip and clip_eps_low decide
                            [0.05, -0.3, 0.2231, 0.0],
                            [1.0, 0.1, -0.1, 0.3]])  # truncated: counts only without mask_truncated
    rollout.old_logprobs = (logp - log_rho).masked_fill(~completion_mask, 0.0)
    rollout.ref_logprobs = (logp - 0.1).masked_fill(~completion_mask, 0.0)
    return rollout


# (module options, the ppo_loss arguments they must turn into; defaults: clip 0.2 both sides, token mean)
WIRING = {
    "seq_mean_token_mean": ({"loss": {"loss_agg": "seq_mean_token_mean"}}, {"loss_agg": "seq_mean_token_mean"}),
    "seq_mean_token_sum_norm": ({"loss": {"loss_agg": "seq_mean_token_sum_norm"}, "rollout": {"max_new_tokens": 6}},
                                {"loss_agg": "seq_mean_token_sum_norm", "max_new_tokens": 6}),
    "clip_eps_high": ({"loss": {"clip_eps_high": 0.3}}, {"clip_eps_high": 0.3}),
    "clip_eps_low": ({"loss": {"clip_eps_low": 0.1}}, {"clip_eps": 0.1, "clip_eps_high": 0.2}),
    "clip_eps_sets_both": ({"loss": {"clip_eps": 0.1}}, {"clip_eps": 0.1, "clip_eps_high": 0.1}),
    "clip_c": ({"loss": {"clip_c": 1.5}}, {"clip_c": 1.5}),
    "ratio_level": ({"loss": {"ratio_level": "sequence"}}, {"ratio_level": "sequence"}),
    "mask_truncated": ({"loss": {"mask_truncated": True}}, {"mask": "truncated_dropped"}),
}


@pytest.mark.parametrize("case", list(WIRING))
def test_each_option_reaches_the_loss(sft_ckpt, case):
    options, expected_args = WIRING[case]
    module = ppo(sft_ckpt, **options)
    rollout = menu_rollout(module)
    out, logprobs, _ = module.minibatch_loss(rollout)
    args = {"clip_eps": 0.2, "beta": 0.1, "kl_estimator": "k1", "max_new_tokens": module.cfg.rollout.max_new_tokens, **expected_args}
    mask = drop_truncated(rollout.completion_mask, rollout.finished) if args.pop("mask", None) else rollout.completion_mask
    expected = ppo_loss(logprobs.detach(), rollout.old_logprobs, rollout.ref_logprobs, rollout.advantages, mask, **args)
    for name, got, want in zip(out._fields, out, expected):
        assert_close(got, want, msg=f"{case}: {name}")
    # and the option matters on this rollout: the default module's loss differs
    default, _, _ = ppo(sft_ckpt).minibatch_loss(rollout)
    assert abs(out.loss.item() - default.loss.item()) > 1e-4, case


# (the loss group's options, the variant's function and its keyword arguments)
VARIANTS = {
    "cispo": ({"policy_loss": "cispo", "cispo_clip": 0.2}, cispo_loss, {"clip_low": None, "clip_high": 0.2}),
    "sapo": ({"policy_loss": "sapo", "sapo_tau_pos": 1.0, "sapo_tau_neg": 2.0}, sapo_loss, {"tau_pos": 1.0, "tau_neg": 2.0}),
    "gmpo": ({"policy_loss": "gmpo", "gmpo_clip": 0.4, "loss_agg": "seq_mean_token_mean"}, gmpo_loss, {"clip_low": 0.4, "clip_high": 0.4}),
}


@pytest.mark.parametrize("case", list(VARIANTS))
def test_each_policy_loss_variant_reaches_the_loss(sft_ckpt, case):
    options, fn, kwargs = VARIANTS[case]
    module = ppo(sft_ckpt, loss=options)
    rollout = menu_rollout(module)
    out, logprobs, _ = module.minibatch_loss(rollout)
    mask = rollout.completion_mask
    terms = fn(logprobs.detach(), rollout.old_logprobs, rollout.advantages, mask, **kwargs)
    agg = options.get("loss_agg", "token_mean")
    assert_close(out.policy_loss, aggregate_loss(agg, terms.loss, mask))
    assert_close(out.clipfrac, terms.clipped[mask].float().mean())
    kl = aggregate_loss(agg, torch.full_like(rollout.old_logprobs, 0.1), mask)  # k1 = logp - ref = 0.1 on every token
    assert_close(out.loss, out.policy_loss + 0.1 * kl)
    default, _, _ = ppo(sft_ckpt, loss={"loss_agg": agg}).minibatch_loss(rollout)
    assert abs(out.policy_loss.item() - default.policy_loss.item()) > 1e-3, case
    # the gradient is the variant's: CISPO's reaches every token, weighted by its capped ratio (no clipped-out token)
    module.model.zero_grad()
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.model.parameters() if p.requires_grad)


def test_the_kl_clamp_bounds_k3(sft_ckpt):
    module = ppo(sft_ckpt, kl={"estimator": "k3", "beta": 1.0})
    unclamped = ppo(sft_ckpt, kl={"estimator": "k3", "beta": 1.0, "clamp": None})
    rollout = menu_rollout(module)
    rollout.ref_logprobs = torch.where(rollout.completion_mask, rollout.ref_logprobs + 3.0, 0.0)  # log p_ref - log p = 2.9
    clamped_kl = module.minibatch_loss(rollout)[0].kl
    raw_kl = unclamped.minibatch_loss(rollout)[0].kl
    x = torch.tensor(2.9)
    assert_close(raw_kl, torch.expm1(x) - x, atol=1e-4, rtol=1e-4)  # e^2.9 - 2.9 - 1 = 14.27 on every token
    assert_close(clamped_kl, torch.tensor(10.0))


@pytest.mark.parametrize("name", ["cispo", "sapo", "gmpo"])
def test_cli_fit_with_each_policy_loss(sft_ckpt, tmp_path, name):
    cli = run_cli([
        "fit", "--config", PPO_YAML, *QUIET, "--trainer.logger=false", f"--model.init_args.policy_ckpt={sft_ckpt}",
        "--model.init_args.reward.source=judge", "--model.init_args.eval.every=0", "--data.init_args.max_val_prompts=16",
        "--trainer.limit_train_batches=2", "--data.init_args.batch_size=4", "--model.init_args.eval.keep_best=false",
        f"--model.init_args.loss.policy_loss={name}", "--model.init_args.optim.lr=1e-3",
    ], tmp_path)
    module = cli.model
    assert module._rollouts == 2 and module.hparams.loss["policy_loss"] == name
    assert all(torch.isfinite(torch.tensor(v)) for v in module.last_update.values())
    start, _, _ = load_policy(str(sft_ckpt))
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(start.parameters(), module.model.parameters()))


def test_clip_range_defaults_to_clip_eps_on_each_side(sft_ckpt):
    assert ppo(sft_ckpt, loss=dict(clip_eps=0.3)).clip_range == (0.3, 0.3)
    assert ppo(sft_ckpt, loss=dict(clip_eps=0.3, clip_eps_high=0.4)).clip_range == (0.3, 0.4)
    assert ppo(sft_ckpt, loss=dict(clip_eps=0.3, clip_eps_low=0.1)).clip_range == (0.1, 0.3)


def test_truncated_completions_get_no_loss_but_keep_their_statistics(sft_ckpt):
    module = ppo(sft_ckpt, loss=dict(mask_truncated=True), rollout=dict(samples_per_prompt=2, max_new_tokens=2))
    # two new tokens fit a one-digit answer and its EOS, not a two-digit one: a mix of finished and truncated rows
    records = load_prompts("toy", "train", limit=300)
    records = [r for r in records if len(r.gold) == 1][:4] + [r for r in records if len(r.gold) == 2][:4]
    ds = PromptDataset(module.tokenizer, records, module.data_max_length)
    torch.manual_seed(0)
    rollout, _ = module.make_rollout(ds.collate([ds[i] for i in range(len(ds))]))
    eos = (rollout.completion_ids == module.tokenizer.eos_id) & rollout.completion_mask
    assert rollout.finished.tolist() == eos.any(1).tolist() and not rollout.finished.all()
    # truncated rows still take part in the advantages (batch_mean over all 16 rewards)
    assert_close(rollout.advantages, rollout.rewards - rollout.rewards.mean())
    # ... but not in the loss: changing everything the loss reads on them changes nothing
    out, _, _ = module.minibatch_loss(rollout)
    cut = ~rollout.finished
    changed = Rollout(**{**rollout.__dict__})
    changed.advantages = torch.where(cut, torch.full_like(rollout.advantages, 5.0), rollout.advantages)
    changed.old_logprobs = torch.where(cut[:, None], rollout.old_logprobs - 1.0, rollout.old_logprobs)
    changed_out, _, _ = module.minibatch_loss(changed)
    for got, want in zip(changed_out, out):
        assert torch.equal(got, want)
    unmasked, _, _ = ppo(sft_ckpt, rollout=dict(samples_per_prompt=2, max_new_tokens=2)).minibatch_loss(changed)
    assert abs(unmasked.loss.item() - out.loss.item()) > 1e-3


def test_cli_fit_with_the_options(sft_ckpt, tmp_path):
    options = {
        "loss_agg": "seq_mean_token_sum_norm", "clip_eps_low": 0.1, "clip_eps_high": 0.28, "clip_c": 3.0,
        "ratio_level": "sequence", "mask_truncated": True,
    }
    cli = run_cli([
        "fit", "--config", PPO_YAML, *QUIET, "--trainer.logger=false", f"--model.init_args.policy_ckpt={sft_ckpt}",
        "--model.init_args.reward.source=judge", "--model.init_args.eval.every=0", "--data.init_args.max_val_prompts=64",
        "--trainer.limit_train_batches=2", "--data.init_args.batch_size=8",
        "--model.init_args.eval.keep_best=false",  # the final policy is the trained one, not possibly the SFT start
        *(f"--model.init_args.loss.{k}={v}" for k, v in options.items()),
    ], tmp_path)
    module = cli.model
    assert {k: module.hparams.loss[k] for k in options} == options and module.clip_range == (0.1, 0.28)
    assert module._rollouts == 2 and module.last_update["first_ratio_error"] < RATIO_ATOL
    assert all(torch.isfinite(torch.tensor(v)) for v in module.last_update.values())
    start, _, _ = load_policy(str(sft_ckpt))
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(start.parameters(), module.model.parameters()))
    saved = torch.load(tmp_path / "checkpoints" / "toy" / "ppo.ckpt", weights_only=True)["hyper_parameters"]
    assert {k: saved["loss"][k] for k in options} == options


BAD_OPTIONS = {
    # id: (override, words the one line must contain)
    "loss_agg": ("loss.loss_agg=token_sum", ["model.init_args.loss.loss_agg", "'token_sum'", "seq_mean_token_mean, seq_mean_token_sum_norm, token_mean"]),
    "ratio_level": ("loss.ratio_level=group", ["model.init_args.loss.ratio_level", "'group'", "sequence, token"]),
    "clip_eps_high": ("loss.clip_eps_high=0.1", ["model.init_args.loss.clip_eps_high", "0.1", "clip_eps_low 0.2", "clip_eps_high >= clip_eps_low"]),
    "clip_eps_low": ("loss.clip_eps_low=0.3", ["model.init_args.loss.clip_eps_high", "0.2", "clip_eps_low 0.3"]),
    "clip_c": ("loss.clip_c=1.0", ["model.init_args.loss.clip_c", "1.0", "> 1"]),
    "advantage": ("rollout.advantage=whiten", ["model.init_args.rollout.advantage", "'whiten'", "group_mean"]),
    "max_grad_norm": ("update.max_grad_norm=0", ["model.init_args.update.max_grad_norm", "0", "> 0, or null"]),
    "policy_loss": ("loss.policy_loss=grpo", ["model.init_args.loss.policy_loss", "'grpo'", "cispo, gmpo, ppo, sapo"]),
    "cispo_dual_clip": ("loss={policy_loss: cispo, clip_c: 3.0}", ["model.init_args.loss.clip_c", "does not combine with policy_loss 'cispo'"]),
    "sapo_clip_high": ("loss={policy_loss: sapo, clip_eps_high: 0.3}", ["model.init_args.loss.clip_eps_high", "policy_loss 'sapo'"]),
    "gmpo_sequence": ("loss={policy_loss: gmpo, ratio_level: sequence}", ["model.init_args.loss.ratio_level", "policy_loss 'gmpo'"]),
    "kl_clamp": ("kl.clamp=0", ["model.init_args.kl.clamp", "0", "a number > 0, or null (unbounded)"]),
    "rollout_is_order": ("rollout={rollout_is: mis, rollout_is_threshold: 1.5, rollout_is_threshold_lower: 2.0}",
                         ["model.init_args.rollout.rollout_is_threshold_lower", "2.0 is not below rollout_is_threshold 1.5"]),
    "rollout_is_mode": ("rollout.rollout_is=clip", ["model.init_args.rollout.rollout_is", "'clip'", "mis, tis, null"]),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    override, words = BAD_OPTIONS[case]
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", PPO_YAML, *QUIET, f"--model.init_args.{override}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlhf: error:")]
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines
    assert not list(tmp_path.iterdir())  # stopped before anything was written


def test_bad_option_from_the_shell(tmp_path):
    done = subprocess.run(["rlhf", "fit", "--config", PPO_YAML, "--model.init_args.loss.loss_agg=foo"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "rlhf: error: model.init_args.loss.loss_agg: unknown value 'foo'; "
        "allowed: seq_mean_token_mean, seq_mean_token_sum_norm, token_mean"
    )
