"""Two processes (gloo) on halves of a fixed rollout compute the same update as one process on all of it,
for every loss aggregation, and with the other loss options on."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_lightning.modules.ppo import PPOModule, Rollout
from conftest import ddp_mean_gradient, with_groups
from tolerance import EPS32, grad_atol

WORLD = 2
K = 2  # samples per prompt: 4 prompts x 2 = 8 rows, 4 per rank, groups never split

# The loss options per case; the first is the seed's loss. Without truncation both ranks hold 4 sequences, so a
# sequence mean over the rank's own rows would pass too: `mask_truncated` leaves rank 0 with 2 sequences that
# have tokens and rank 1 with 4, which only the global sequence count gets right.
CASES = {
    "token_mean": {},
    "seq_mean_token_mean": {"loss_agg": "seq_mean_token_mean"},
    "seq_mean_token_sum_norm": {"loss_agg": "seq_mean_token_sum_norm"},
    "seq_mean_token_mean_truncated": {"loss_agg": "seq_mean_token_mean", "mask_truncated": True},
    "token_mean_truncated_clips": {"mask_truncated": True, "clip_eps_high": 0.15, "clip_c": 1.05},
    "seq_mean_token_sum_norm_truncated_sequence_ratio": {
        "loss_agg": "seq_mean_token_sum_norm", "mask_truncated": True, "ratio_level": "sequence",
        "clip_eps_high": 0.15, "clip_c": 1.05,
    },
}


def fixed_rollout(module: PPOModule) -> Rollout:
    """A deterministic rollout with uneven completion lengths, ratios != 1 and non-trivial advantages' stats."""
    g = torch.Generator().manual_seed(123)
    B, P, N, V = 8, 6, 4, module.tokenizer.vocab_size
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    prompt_mask[::3, :2] = False  # some left padding
    lengths = torch.tensor([1, 4, 2, 4, 4, 1, 3, 2])
    finished = torch.tensor([True, False, True, False, True, True, True, True])  # rows 1 and 3 hit the budget
    completion_mask = torch.arange(N)[None, :] < lengths[:, None]
    completion_ids = torch.randint(3, V, (B, N), generator=g).masked_fill(~completion_mask, 0)
    rollout = Rollout(
        input_ids=torch.cat([prompt_ids.masked_fill(~prompt_mask, 0), completion_ids], 1),
        attention_mask=torch.cat([prompt_mask, completion_mask], 1),
        completion_ids=completion_ids, completion_mask=completion_mask,
        old_logprobs=torch.zeros(B, N), ref_logprobs=torch.zeros(B, N),
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 1.0, 0.25]), advantages=torch.zeros(B), finished=finished,
    )
    with torch.no_grad():  # old and reference log-probs near the policy's own: ratios around 1, some clipped
        logp = rollout.logprobs(module.model, module.cfg.rollout.temperature)
    rollout.old_logprobs = (logp + 0.2 * torch.randn(B, N, generator=g)).masked_fill(~completion_mask, 0.0)
    rollout.ref_logprobs = (logp - 0.3 * torch.rand(B, N, generator=g)).masked_fill(~completion_mask, 0.0)
    return rollout


def update(module: PPOModule, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient, weights after one SGD step) of `minibatch_loss` on `rollout`, averaged over ranks like DDP."""
    rollout.advantages = module.global_advantages(rollout.rewards)
    out, _, _ = module.minibatch_loss(rollout)
    out.loss.backward()
    params = list(module.model.parameters())
    grad = ddp_mean_gradient(params)  # what DDP does: average the gradients
    # plain SGD: Adam's first step is lr * sign(grad), which float noise flips where a gradient is ~0
    torch.optim.SGD(params, lr=0.1).step()
    return grad, torch.cat([p.detach().flatten() for p in params])


def make_module(sft_ckpt: str, **options) -> PPOModule:
    base = dict(reward=dict(source="judge"), rollout=dict(samples_per_prompt=K, advantage="batch_whiten", temperature=0.8, max_new_tokens=4),
                kl=dict(beta=0.2, estimator="k3"), loss=dict(clip_eps=0.1))
    return PPOModule(policy_ckpt=sft_ckpt, **with_groups(base, options))


def _worker(rank: int, sft_ckpt: str, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case, options in CASES.items():
            module = make_module(sft_ckpt, loss=options)
            full = fixed_rollout(module)
            rows = torch.arange(rank * 4, (rank + 1) * 4)
            grad, weights = update(module, full.select(rows))
            results[case] = {"grad": grad, "weights": weights}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_update_equals_single_process_update(sft_ckpt, tmp_path):
    single = {}
    for case, options in CASES.items():
        module = make_module(str(sft_ckpt), loss=options)
        single[case] = update(module, fixed_rollout(module))
        assert single[case][0].abs().sum() > 0
    for case in CASES:  # each case is a different loss, so the check below cannot pass by comparing one loss twice
        if case != "token_mean":
            assert (single[case][0] - single["token_mean"][0]).abs().max() > 1e-4, case
    mp.spawn(_worker, args=(str(sft_ckpt), str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for case, (grad, weights) in single.items():
            # two ranks' gradients of 4 rows each, summed by all_reduce, against one pass over the 8 rows
            tol = grad_atol(grad, terms=8 * WORLD)
            torch.testing.assert_close(results[case]["grad"], grad, atol=tol, rtol=0, msg=lambda m: f"{case}: {m}")
            # one SGD step (lr 0.1) from the same weights: the gradients' bound times lr, plus one rounding of a weight
            torch.testing.assert_close(results[case]["weights"], weights, atol=0.1 * tol + EPS32 * float(weights.abs().max()), rtol=0,
                                       msg=lambda m: f"{case}: {m}")
