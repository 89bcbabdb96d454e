"""Two processes (gloo) on halves of a fixed rollout compute the critic's whitened GAE advantages, its metrics and
its value-loss gradient as one process does on all of it."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from rlhf_lightning.option_groups import CriticConfig
from rlhf_lightning.policy import build_policy
from rlhf_lightning.rl.critic import build_critic, completion_values, critic_advantages, critic_metrics
from rlhf_lightning.rl.rollout import Rollout
from rlhf_lightning.rl.update import critic_minibatch_loss
from conftest import ddp_mean_gradient
from tolerance import EPS32, grad_atol

WORLD = 2
TINY = {"type": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 24}
CFG = CriticConfig(init="policy", gamma=0.95, lam=0.9, cliprange_value=0.05)


def critic_and_rollout():
    """The same critic and rollout in every process: 8 rows, uneven completion lengths (rank 1's are longer), values
    from the critic, old values a little off so the value clip binds on some tokens."""
    torch.manual_seed(0)
    policy, tokenizer, _ = build_policy(TINY, None)
    critic, _ = build_critic(CFG, None, policy, {"model": TINY}, tokenizer, 24)
    g = torch.Generator().manual_seed(7)
    B, P, N = 8, 5, 4
    prompt_ids = torch.randint(3, tokenizer.vocab_size, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    prompt_mask[::3, :2] = False
    lengths = torch.tensor([1, 2, 1, 2, 4, 2, 4, 3])
    completion_mask = torch.arange(N)[None, :] < lengths[:, None]
    completion_ids = torch.randint(3, tokenizer.vocab_size, (B, N), generator=g).masked_fill(~completion_mask, 0)
    input_ids = torch.cat([prompt_ids.masked_fill(~prompt_mask, 0), completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        values = completion_values(critic, input_ids, attention_mask, N)
    values = (values + 0.1 * torch.randn(B, N, generator=g)).masked_fill(~completion_mask, 0.0)
    scores = torch.randn(B, generator=g)
    zeros = torch.zeros(B, N)
    rollout = Rollout(input_ids, attention_mask, completion_ids, completion_mask, zeros, zeros, scores, torch.zeros(B), values=values)
    return critic, rollout


def critic_update(critic, rollout: Rollout) -> dict[str, torch.Tensor]:
    """Advantages, returns and metrics of `rollout` (this rank's rows), and the value loss's DDP-averaged gradient."""
    advantages, returns = critic_advantages(rollout.rewards, rollout.values, rollout.completion_mask, CFG)
    metrics = critic_metrics(rollout.values, returns, rollout.completion_mask)
    rollout.returns = returns
    tokens = rollout.completion_mask.sum().float()
    if dist.is_initialized():
        dist.all_reduce(tokens)
    loss, clipfrac = critic_minibatch_loss(critic, rollout, CFG.cliprange_value, tokens)
    loss.backward()
    grad = ddp_mean_gradient([p for p in critic.parameters() if p.grad is not None])
    return {"advantages": advantages, "returns": returns, "grad": grad, "clipfrac": clipfrac.reshape(1), **{k: v.reshape(1) for k, v in metrics.items()}}


def narrow(rollout: Rollout) -> Rollout:
    """`rollout` cut to its longest completion, as a rank's own rollout is: rank 0's is narrower than rank 1's."""
    width = int(rollout.completion_mask.sum(1).max())
    cut = rollout.input_ids.size(1) - rollout.completion_ids.size(1) + width
    fields = {k: v[:, :width] if k in ("completion_ids", "completion_mask", "old_logprobs", "ref_logprobs", "values") else v for k, v in rollout.__dict__.items()}
    return Rollout(**{**fields, "input_ids": rollout.input_ids[:, :cut], "attention_mask": rollout.attention_mask[:, :cut]})


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        critic, rollout = critic_and_rollout()
        half = narrow(rollout.select(torch.arange(rank * 4, (rank + 1) * 4)))
        torch.save(critic_update(critic, half), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_critic_equals_single_process(tmp_path):
    critic, rollout = critic_and_rollout()
    single = critic_update(critic, rollout)
    assert single["grad"].abs().sum() > 0 and 0 < float(single["clipfrac"]) < 1  # some tokens clipped, not all
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    tol = grad_atol(single["grad"], terms=8 * 4)
    grads, clipfracs = [], []
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(rank * 4, (rank + 1) * 4)
        width = out["advantages"].size(1)
        assert width == (2 if rank == 0 else 4)
        # whitened over both ranks' valid tokens: the same numbers as one process's
        mask = rollout.completion_mask[rows, :width]
        assert_close(out["advantages"][mask], single["advantages"][rows, :width][mask], atol=1e-5, rtol=0)
        assert_close(out["returns"][mask], single["returns"][rows, :width][mask], atol=1e-5, rtol=0)
        for name in ("critic/explained_variance", "critic/values_mean", "critic/returns_mean"):
            assert_close(out[name], single[name], atol=1e-5, rtol=0)
        grads.append(out["grad"])
        clipfracs.append(out["clipfrac"])
    assert_close(grads[0], grads[1], atol=0, rtol=0)  # all_reduce: every rank holds the same averaged gradient
    assert_close(grads[0], single["grad"], atol=tol, rtol=0)
    assert_close(sum(clipfracs) / WORLD, single["clipfrac"], atol=EPS32, rtol=0)  # per-rank shares of the global mean


def test_plain_ddp_with_a_critic_is_refused_and_ddp_finding_unused_parameters_is_not(sft_ckpt, tmp_path, monkeypatch):
    """The policy's and the critic's separate backward passes each leave the other's parameters without a gradient:
    plain DDP would fail mid-run, so `on_fit_start` refuses it with one line naming the strategy to use."""
    from types import SimpleNamespace

    import pytest
    from torch.nn.parallel import DistributedDataParallel

    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.options import ConfigError

    module = PPOModule(policy_ckpt=str(sft_ckpt), reward={"source": "judge"}, rollout={"advantage": "gae"}, critic={"init": "policy"})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for find_unused in (False, True):
            trainer = SimpleNamespace(strategy=SimpleNamespace(model=DistributedDataParallel(module, find_unused_parameters=find_unused)))
            monkeypatch.setattr(PPOModule, "trainer", property(lambda self: trainer))
            if find_unused:
                module.on_fit_start()
            else:
                with pytest.raises(ConfigError, match=r"^trainer\.strategy: PPO with a critic under DDP needs 'ddp_find_unused_parameters_true'"):
                    module.on_fit_start()
    finally:
        dist.destroy_process_group()
