"""Two processes (gloo) with 4 pairs each take the same DPO update as one process with the 8 pairs, with the
reference's log-probs read from the precomputed table and from a forward in each step, for a loss that is a mean
over pairs and one that averages each row over its tokens first; and with RPO's chosen NLL, a mean over tokens,
where normalizing over one rank's tokens instead of every rank's shows."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_lightning.data.preferences import PairDataset
from rlhf_lightning.modules.dpo import DPOModule, WithReferenceLogps
from test_dpo import base, pair_dataset  # noqa: F401  (base: the tiny SFT checkpoint fixture)
from conftest import ddp_mean_gradient, with_groups
from tolerance import EPS32, grad_atol

WORLD = 2
# The global batch: 8 of the first 16 easy pairs, dealt to the ranks as DistributedSampler deals a batch (rank r
# takes positions r, r + 2, ...). Rank 0's chosen answers are 2, 2, 2, 3 tokens (9), rank 1's 3 each (12); both
# halves hold a 16-token row, so each rank pads to the global batch's width: the ranks run the same kernels on
# the same rows as one process, and only the order of the gradient's sums differs.
PICK = [0, 4, 1, 5, 14, 6, 2, 7]
B = len(PICK)

# Module options per case. Each pair loss is a mean over the batch's pairs: with equal per-rank batches (the
# distributed sampler pads the dataset to a multiple of the world size), DDP's average of the ranks' means,
# (1/W) sum_r (W/B) sum_{i in r} l_i, is the global mean (1/B) sum_i l_i; a rank that summed instead of averaged,
# or divided by the global count on top of DDP's average, is off by a factor W = 2, far beyond the bound.
CASES = {
    "sigmoid": {},  # the reference's forward in each step
    "sigmoid_precomputed": {"precompute_ref_logprobs": True},
    "ipo_precomputed": {"loss": {"loss_type": "ipo"}, "precompute_ref_logprobs": True},  # log-ratios averaged per row
}
# configs/toy/dpo.yaml's loss: RPO's NLL is a mean over the chosen *tokens*, 9 on rank 0 and 12 on rank 1, so a
# mean over each rank's own tokens, averaged by DDP, is not the global mean; only the global count is right.
NLL_CASES = {
    "nll": {"loss": {"nll_alpha": 1.0}, "precompute_ref_logprobs": True},
    "orpo": {"loss": {"loss_type": "orpo"}},  # reference-free; its own NLL term is the same per-token mean
}


def make_module(sft_ckpt: str, **options) -> DPOModule:
    """The DPO module on the checkpoint, its policy moved off the reference (seeded), so margins are not 0 and
    the loss reads the reference's values."""
    module = DPOModule(policy_ckpt=sft_ckpt, **with_groups({"loss": {"beta": 0.5}}, options))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def rank_batch(module: DPOModule, data: PairDataset, rows: list[int]) -> dict:
    """The batch a rank's dataloader collates from pair indices `rows`: with the reference's sums read from the
    table over the whole train set (every rank computes it in `setup`) when `precompute_ref_logprobs` is on."""
    if module.hparams.precompute_ref_logprobs:
        data = WithReferenceLogps(data, module.reference_table(data))
    return data.collate([data[i] for i in rows])


def update(module: DPOModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient, weights after one SGD step) of `training_step` on `batch`, averaged over ranks like DDP."""
    module.training_step(batch, 0).backward()
    params = list(module.model.parameters())
    grad = ddp_mean_gradient(params)  # what DDP does: average the gradients
    # plain SGD: Adam's first step is lr * sign(grad), which float noise flips where a gradient is ~0
    torch.optim.SGD(params, lr=0.1).step()
    return grad, torch.cat([p.detach().flatten() for p in params])


def all_cases() -> dict[str, dict]:
    return {**CASES, **NLL_CASES}


def _worker(rank: int, sft_ckpt: str, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case, options in all_cases().items():
            module = make_module(sft_ckpt, **options)
            batch = rank_batch(module, pair_dataset(module.tokenizer, 16), PICK[rank::WORLD])
            assert batch["input_ids"].shape[1] == 16  # the global batch's width
            grad, weights = update(module, batch)
            results[case] = {"grad": grad, "weights": weights}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_and_ranks(base, tmp_path_factory) -> tuple[dict, list[dict]]:  # noqa: F811
    """({case: (gradient, weights)} of one process on the 8 pairs, [each rank's results] of two on 4 each)."""
    single = {}
    for case, options in all_cases().items():
        module = make_module(str(base), **options)
        batch = rank_batch(module, pair_dataset(module.tokenizer, 16), PICK)
        assert batch["input_ids"].shape[1] == 16
        assert ("ref_chosen" in batch) == bool(options.get("precompute_ref_logprobs"))
        single[case] = update(module, batch)
        assert single[case][0].abs().sum() > 0
    tmp_path = tmp_path_factory.mktemp("dpo_ddp")
    mp.spawn(_worker, args=(str(base), str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    return single, [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def assert_same_update(got: dict, want: tuple[torch.Tensor, torch.Tensor], case: str) -> None:
    grad, weights = want
    # two ranks' gradients of 8 rows each, summed by all_reduce, against one pass over the 16 rows
    tol = grad_atol(grad, terms=2 * B * WORLD)
    torch.testing.assert_close(got["grad"], grad, atol=tol, rtol=0, msg=lambda m: f"{case}: {m}")
    # one SGD step (lr 0.1) from the same weights: the gradients' bound times lr, plus one rounding of a weight
    torch.testing.assert_close(got["weights"], weights, atol=0.1 * tol + EPS32 * float(weights.abs().max()), rtol=0,
                               msg=lambda m: f"{case}: {m}")


def test_two_process_update_equals_single_process_update(single_and_ranks):
    single, ranks = single_and_ranks
    # sigmoid and ipo are different losses, so the check below cannot pass by comparing one loss twice
    assert (single["ipo_precomputed"][0] - single["sigmoid_precomputed"][0]).abs().max() > 1e-4
    for results in ranks:
        for case in CASES:
            assert_same_update(results[case], single[case], case)


def test_normalizing_the_nll_per_rank_would_move_the_update_far_beyond_the_bound(base, single_and_ranks):  # noqa: F811
    # The NLL case can tell the two normalizations apart: the mean of the halves' own losses, each over
    # its own 4 pairs and its own chosen tokens (what DDP averages when each rank normalizes alone), differs
    # from the global loss's gradient by orders of magnitude more than the bound.
    single, _ = single_and_ranks
    module = make_module(str(base), **NLL_CASES["nll"])
    data = pair_dataset(module.tokenizer, 16)
    halves = [rank_batch(module, data, PICK[rank::WORLD]) for rank in range(WORLD)]
    assert [int(h["completion_mask"][: B // WORLD].sum()) for h in halves] == [9, 12]  # the ranks' chosen tokens
    for half in halves:
        (module.training_step(half, 0) / WORLD).backward()
    per_rank = torch.cat([p.grad.flatten() for p in module.model.parameters()])
    grad = single["nll"][0]
    assert (per_rank - grad).abs().max() > 100 * grad_atol(grad, terms=2 * B * WORLD)


@pytest.mark.parametrize("case", ["nll", "orpo"])
def test_two_process_update_with_a_chosen_nll_equals_single_process_update(case, single_and_ranks):
    single, ranks = single_and_ranks
    for results in ranks:
        assert_same_update(results[case], single[case], case)
