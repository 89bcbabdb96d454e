"""PPO under FSDP2 on two processes (gloo, CPU) against one process on the whole batch.

- An update (3 epochs of 2 shuffled minibatches, micro-batches of 2 rows, gradient clipping active) on a fixed
  rollout whose rows the ranks hold unevenly, as dynamic sampling leaves them (6 and 2 rows; 8 and none), and one with
  a critic trained by its own optimizer: every optimizer step's gradients and the weights after it equal those of one
  process running the same global minibatches. The frozen micro-batched forwards (reference log-probs, the critic's
  values) of each rank's rows equal one process's.
- Dynamic sampling on sharded models (generation, scoring, the reference in lockstep) where the ranks keep different
  numbers of groups, then an update over them; the keep-best copy of a sharded policy, gathered and loaded back.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from rlhf_lightning.data.prompts import PromptDataset, load_prompts
from rlhf_lightning.lora import BaseOfAdapters, add_adapters, lora_settings
from rlhf_lightning.losses import group_mean
from rlhf_lightning.option_groups import CriticConfig, KLConfig, LossConfig, RolloutConfig, UpdateConfig
from rlhf_lightning.policy import build_policy
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.rl.critic import completion_values, critic_advantages
from rlhf_lightning.rl.rollout import Rollout, RolloutCollector
from rlhf_lightning.rl.update import CriticUpdate, PPOConfig, clip_and_check, critic_minibatch_loss, minibatch_loss, ppo_update
from rlhf_lightning.scoring import token_logprobs
from test_fsdp_ranks import WORLD, flat
from tolerance import EPS32, FORWARD_ATOL, RATIO_ATOL, grad_atol

pytestmark = pytest.mark.sharded  # two processes: `python -m pytest -m sharded` (the default run skips them)

MODEL = {"type": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 24}
K = 2  # samples per prompt: a group is 2 consecutive rows
LR = 0.5
MAX_NORM = 0.02  # below every step's gradient norm (asserted): the clip over the ranks' DTensor gradients is active
# rows each rank holds after dynamic sampling (whole groups), whether a critic (GAE) trains beside the policy, and
# whether LoRA adapters train (the reference: the sharded policy with its adapters off)
CASES = {"uneven": ((6, 2), False, False), "one_rank_empty": ((8, 0), False, False), "critic": ((4, 4), True, False), "lora": ((6, 2), False, True)}


def config(critic: bool) -> PPOConfig:
    rollout = RolloutConfig(samples_per_prompt=K, max_new_tokens=4, temperature=0.8, micro_batch_size=2, advantage="gae" if critic else "group_mean")
    return PPOConfig(rollout, LossConfig(clip_eps=0.1), KLConfig(beta=0.2, estimator="k3"), UpdateConfig(ppo_epochs=3, num_minibatches=2, max_grad_norm=MAX_NORM))


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps each step's (clipped) gradient and the weights after it, whole (gathered when sharded)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.grads: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.grads.append(flat([p.grad for p in params]))
        super().step(closure)
        self.weights.append(flat([p.detach() for p in params]))


def models(dtype: torch.dtype = torch.float64, lora: bool = False):
    """(policy, reference, critic, tokenizer), the same in every process (seeded). The critic is the policy's
    transformer under a head, with a reward model's likelihood feature: a frozen LM head inside the trained root, and
    the 0-dim `lm_scale`, which FSDP2 leaves whole (its gradient averaged over the ranks). With `lora`, adapters on
    the policy (B not zero: the policy is not its base) and the reference is the policy with them off."""
    torch.manual_seed(0)
    policy, tokenizer, meta = build_policy(MODEL, None)
    critic = RewardModel({**meta, "lm_feature": True})
    critic.load_backbone({k: v.detach() for k, v in policy.state_dict().items()})
    with torch.no_grad():
        critic.lm_scale.fill_(0.3)
    critic.lm_head.requires_grad_(False)  # the policy's LM head, as `build_critic` keeps it
    if lora:
        add_adapters(policy, lora_settings({"r": 4}))
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        return policy.to(dtype), BaseOfAdapters(policy), critic.to(dtype), tokenizer
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy.to(dtype), reference.to(dtype), critic.to(dtype), tokenizer


def fixed_rollout(policy, reference, critic, vocab: int, cfg: PPOConfig) -> Rollout:
    """8 rows (4 groups) with uneven completion lengths, ratios away from 1 and mixed group rewards (float64)."""
    g = torch.Generator().manual_seed(123)
    B, P, N = 8, 6, 4
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    prompt_mask[::3, :2] = False  # some left padding
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g).masked_fill(~prompt_mask, 0)
    lengths = torch.tensor([1, 4, 2, 4, 4, 1, 3, 2])
    completion_mask = torch.arange(N)[None, :] < lengths[:, None]
    completion_ids = torch.randint(3, vocab, (B, N), generator=g).masked_fill(~completion_mask, 0)
    input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 1.0, 0.75, 0.0], dtype=torch.float64)
    with torch.no_grad():
        logp = token_logprobs(policy, input_ids, attention_mask, cfg.rollout.temperature, N)
        ref = token_logprobs(reference, input_ids, attention_mask, cfg.rollout.temperature, N).masked_fill(~completion_mask, 0.0)
    old = (logp + 0.2 * torch.randn(B, N, generator=g, dtype=torch.float64)).masked_fill(~completion_mask, 0.0)  # ratios around 1
    rollout = Rollout(input_ids, attention_mask, completion_ids, completion_mask, old, ref, rewards, group_mean(rewards, K),
                      finished=torch.tensor([True, False, True, False, True, True, True, True]))
    if critic is not None:
        with torch.no_grad():
            rollout.values = completion_values(critic, input_ids, attention_mask, N).masked_fill(~completion_mask, 0.0)
        rollout.advantages, rollout.returns = critic_advantages(rewards, rollout.values, completion_mask, CriticConfig(init="policy"))
    return rollout


def one_process_update(policy, critic, rollout: Rollout, rows: tuple[int, ...], cfg: PPOConfig):
    """The update one process runs on the whole rollout with the ranks' global minibatches: in each epoch each rank
    shuffles its own rows (its generator: seed 5 + rank) into `num_minibatches` parts; minibatch k is every rank's part k."""
    policy_opt = RecordingSGD([p for p in policy.parameters() if p.requires_grad], LR)
    critic_opt = RecordingSGD([p for p in critic.parameters() if p.requires_grad], LR) if critic is not None else None
    generators = [torch.Generator().manual_seed(5 + r) for r in range(WORLD)]
    starts = [sum(rows[:r]) for r in range(WORLD)]
    norms = []
    for _ in range(cfg.update.ppo_epochs):
        parts = [list(torch.randperm(n, generator=g).chunk(max(1, min(cfg.update.num_minibatches, n)))) for n, g in zip(rows, generators)]
        for k in range(max(len(p) for p in parts)):
            mb = rollout.select(torch.cat([start + p[k] for start, p in zip(starts, parts) if k < len(p) and len(p[k])]))
            if critic is not None:
                critic_opt.zero_grad()
                tokens = mb.completion_mask.sum().double().clamp(min=1)
                critic_minibatch_loss(critic, mb, CriticConfig().cliprange_value, tokens)[0].backward()
                torch.nn.utils.clip_grad_norm_(list(critic.parameters()), CriticConfig().max_grad_norm)
                critic_opt.step()
            policy_opt.zero_grad()
            minibatch_loss(policy, mb, cfg, cfg.kl.beta)[0].loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(policy.parameters()), MAX_NORM)))
            policy_opt.step()
    return policy_opt, critic_opt, norms


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from rlhf_lightning.modules.stage import StageModule
    from rlhf_lightning.rl.critic import read_values_as_forward
    from rlhf_lightning.sharding import ShardingPolicy, shard_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    try:
        fixed = torch.load(os.path.join(out_dir, "fixed.pt"), weights_only=False)
        for case, (rows, with_critic, lora) in CASES.items():
            cfg = config(with_critic)
            policy, reference, critic, tokenizer = models(lora=lora)
            critic = critic if with_critic else None
            frozen_roots = () if lora else ((reference, True),)  # LoRA's reference has no weights of its own
            for root, frozen in ((policy, False), *frozen_roots, *(((critic, False),) if critic is not None else ())):
                assert shard_model(root, mesh, ShardingPolicy(), frozen=frozen)
            if critic is not None:
                read_values_as_forward(critic)
            mine = fixed[case].select(slice(sum(rows[:rank]), sum(rows[: rank + 1])))
            # the frozen forwards, micro-batched in lockstep over uneven rows (none on a rank: forwards of no rows)
            collector = RolloutCollector(policy, reference, tokenizer, None, cfg.rollout, cfg.kl, critic=None if critic is None else (critic, CriticConfig()))
            got = {"ref": collector.reference_logprobs(mine.input_ids, mine.attention_mask, mine.completion_mask)}
            if critic is not None:
                got["values"] = collector.values(mine.input_ids, mine.attention_mask, mine.completion_mask)
            stage = SimpleNamespace(model=policy, lora={"lora": {"r": 4}} if lora else None)
            kept = StageModule.trainable_state(stage)  # keep-best's copy: whole tensors (the adapters only with LoRA)
            policy_opt = RecordingSGD([p for p in policy.parameters() if p.requires_grad], LR)
            update = None
            if critic is not None:
                critic_opt = RecordingSGD([p for p in critic.parameters() if p.requires_grad], LR)
                update = CriticUpdate(critic, critic_opt, CriticConfig(), lambda loss: clip_and_check([p for p in critic.parameters() if p.grad is not None], loss, CriticConfig().max_grad_norm))
            ppo_update(policy, policy_opt, mine, cfg, cfg.kl.beta, torch.Generator().manual_seed(5 + rank), backward=torch.Tensor.backward,
                       clip=lambda loss: clip_and_check([p for p in policy.parameters() if p.grad is not None], loss, MAX_NORM), critic=update)
            got.update(grads=policy_opt.grads, weights=policy_opt.weights)
            if critic is not None:
                got.update(critic_grads=critic_opt.grads, critic_weights=critic_opt.weights)
            StageModule.load_trainable_state(stage, kept)  # back into the shards
            got["kept"] = {k: (v.shape, type(v).__name__) for k, v in kept.items()}  # the copy itself stays whole
            got["restored"] = flat([p.detach() for p in policy.parameters()])
            got["sharded"] = type(policy.wte.weight).__name__
            out[case] = got
        out["sampled"] = dynamic_sampling(rank, mesh)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def prompts(tokenizer, rank: int) -> dict:
    """4 training prompts a rank (rank 1 the next 4)."""
    data = PromptDataset(tokenizer, load_prompts("toy", "train", limit=8))
    return data.collate([data[i] for i in range(4 * rank, 4 * rank + 4)])


def informative_on(rank: int):
    """Rewards that differ within every group on rank 0 and within the first prompt's group only on rank 1."""

    def score(prompt_texts, completions, ended, golds):
        first = prompt_texts[0]
        return torch.tensor([float(i % K == 0 and (rank == 0 or p == first)) for i, p in enumerate(prompt_texts)])

    return score


def dynamic_sampling(rank: int, mesh) -> dict:
    """Dynamic sampling on a sharded policy and reference (float32): rank 0 keeps 4 groups in its first round, rank 1
    finds 1 a round, so both sample a second round (in lockstep) and rank 1 keeps 2; then an update over them."""
    from rlhf_lightning.sharding import ShardingPolicy, shard_model

    policy, reference, _, tokenizer = models(torch.float32)
    shard_model(policy, mesh, ShardingPolicy())
    shard_model(reference, mesh, ShardingPolicy(), frozen=True)
    batch = prompts(tokenizer, rank)
    cfg = PPOConfig(
        RolloutConfig(samples_per_prompt=K, max_new_tokens=4, temperature=0.8, advantage="group_mean", filter_groups=True, max_sampling_rounds=2,
                      micro_batch_size=3),
        LossConfig(), KLConfig(beta=0.1, estimator="k3"), UpdateConfig(ppo_epochs=2, num_minibatches=2),
    )
    collector = RolloutCollector(policy, reference, tokenizer, informative_on(rank), cfg.rollout, cfg.kl, draw_prompts=lambda n: batch)
    rollout, drawn = collector.collect(batch, torch.Generator().manual_seed(11 + rank), beta=0.1)
    before = flat([p.detach() for p in policy.parameters()])
    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    ppo_update(policy, optimizer, rollout, cfg, 0.1, torch.Generator().manual_seed(5 + rank), backward=torch.Tensor.backward,
               clip=lambda loss: clip_and_check([p for p in policy.parameters() if p.grad is not None], loss, 1.0))
    return {"rounds": drawn.rounds, "kept_groups": drawn.kept_groups, "rollout": dict(vars(rollout)),
            "moved": float((flat([p.detach() for p in policy.parameters()]) - before).abs().max())}


def test_sharded_ppo_update_with_uneven_ranks_equals_one_process(tmp_path):
    fixed, want = {}, {}
    for case, (rows, with_critic, lora) in CASES.items():
        cfg = config(with_critic)
        policy, reference, critic, tokenizer = models(lora=lora)
        critic = critic if with_critic else None
        fixed[case] = fixed_rollout(policy, reference, critic, tokenizer.vocab_size, cfg)
        if lora:  # the adapters change the policy: a reference read with them on would not pass below
            with torch.no_grad():
                on = fixed[case].logprobs(policy, cfg.rollout.temperature)
            assert (on - fixed[case].ref_logprobs)[fixed[case].completion_mask].abs().max() > 1e-2
        start = flat([p.detach().clone() for p in policy.parameters()])
        trained = flat([p.detach().clone() for p in policy.parameters() if p.requires_grad])
        want[case] = (*one_process_update(policy, critic, fixed[case], rows, cfg), start, trained)
        assert min(want[case][2]) > MAX_NORM  # every step's norm is clipped
    torch.save(fixed, tmp_path / "fixed.pt")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for case, (rows, with_critic, lora) in CASES.items():
            policy_opt, critic_opt, _, start, trained = want[case]
            mine = fixed[case].select(slice(sum(rows[:rank]), sum(rows[: rank + 1])))
            r = got[case]
            assert r["sharded"] == "DTensor"
            # float64 forwards of the same weights in other groupings: far inside float32's forward bound
            assert_close(r["ref"], mine.ref_logprobs, atol=FORWARD_ATOL, rtol=0)
            if with_critic:
                assert_close(r["values"], mine.values, atol=FORWARD_ATOL, rtol=0)
            pairs = [("grads", "weights", policy_opt)] + ([("critic_grads", "critic_weights", critic_opt)] if with_critic else [])
            for grads, weights, opt in pairs:
                assert len(r[grads]) == len(opt.grads) == 3 * 2, (case, grads)  # epochs x minibatches steps on every rank
                for step, (g, w, g1, w1) in enumerate(zip(r[grads], r[weights], opt.grads, opt.weights)):
                    # float64 sums of up to 8 rows' terms in another order (ranks, micro-batches), compounded over the
                    # earlier steps: checked against float32's reordering bound, which float64's rounding (2^-52) stays
                    # below by a factor of 2^29 at any step; a miscounted token or a lost micro-batch moves it by > 1e-3
                    tol = grad_atol(g1, terms=8 * WORLD)
                    assert_close(g, g1, atol=tol, rtol=0, msg=lambda m: f"{case} {grads} step {step}: {m}")
                    assert_close(w, w1, atol=LR * tol * (step + 1) + EPS32 * float(w1.abs().max()), rtol=0, msg=lambda m: f"{case} {weights} step {step}: {m}")
            assert (r["weights"][-1] - trained).abs().max() > 1e-3  # the update moved the policy (its adapters with LoRA)
            # keep-best under sharding: whole tensors kept, loaded back into the shards exactly
            assert all(kind == "Tensor" for _, kind in r["kept"].values())
            assert all("lora_" in k for k in r["kept"]) if lora else r["kept"]["wte.weight"][0] == torch.Size([tokenizer.vocab_size, 16])
            assert torch.equal(r["restored"], start)

    # dynamic sampling: ranks keep different numbers of groups, each rank's rows read by the unsharded models agree
    policy, reference, _, tokenizer = models(torch.float32)
    for rank, groups in ((0, 4), (1, 2)):
        s = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)["sampled"]
        rollout = Rollout(**s["rollout"])
        assert s["rounds"] == 2 and s["kept_groups"] == groups and rollout.completion_ids.size(0) == groups * K
        assert torch.equal(rollout.rewards, torch.tensor([1.0, 0.0] * groups))  # informative groups only
        assert_close(rollout.advantages, group_mean(rollout.rewards, K), atol=0, rtol=0)
        with torch.no_grad():
            logp = rollout.logprobs(policy, 0.8)
            ref = rollout.logprobs(reference, 0.8)
        mask = rollout.completion_mask
        assert_close(rollout.old_logprobs[mask], logp[mask], atol=RATIO_ATOL, rtol=0)  # generation's, in lockstep
        assert_close(rollout.ref_logprobs[mask], ref[mask], atol=FORWARD_ATOL, rtol=0)
        assert s["moved"] > 0


# ------------------------------------------------------------------ the command line

TINY_SFT = [
    "fit", "--config", "SFT", "--trainer.max_steps=2", "--trainer.max_epochs=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    "--model.init_args.model.n_embd=16", "--model.init_args.model.n_head=2", "--data.init_args.max_val_prompts=8",
    "--data.init_args.demo_fraction=0.01", "--data.init_args.stratum_weights=null",
]
TINY_REWARD = [
    "fit", "--config", "REWARD", "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    "--data.init_args.batch_size=8", "--data.init_args.pairs=JsonlPairs", "--data.init_args.pairs.train_file=prefs.jsonl",
    "--data.init_args.pairs.val_file=prefs.jsonl",
]
SHORT_PPO = [
    "--trainer.limit_train_batches=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=4",
    "--data.init_args.max_val_prompts=8", "--model.init_args.rollout.samples_per_prompt=4",
    "--model.init_args.eval.keep_best_min_gain=1.0",  # the start is kept: restored into the shards at the end
]


def test_sharded_ppo_from_the_cli_writes_shards_and_a_whole_final_checkpoint(tmp_path):
    import json

    from conftest import CONFIGS, run_cli
    from test_fsdp_cli import rlhf

    # a 2-step SFT policy and a 1-step reward model on 8 hand-written pairs (a policy this weak samples only ties)
    run_cli([str(CONFIGS / "toy" / "sft.yaml") if a == "SFT" else a for a in TINY_SFT], tmp_path)
    with open(tmp_path / "prefs.jsonl", "w") as f:
        for a in range(8):
            f.write(json.dumps({"prompt": f"Q: {a}+1=\nA:", "chosen": str(a + 1), "rejected": str(a + 2)}) + "\n")
    run_cli([str(CONFIGS / "toy" / "reward.yaml") if a == "REWARD" else a for a in TINY_REWARD], tmp_path)

    config = tmp_path / "ppo_fsdp.yaml"  # last.ckpt every rollout (4 optimizer steps), not every 5
    config.write_text((CONFIGS / "toy" / "ppo_fsdp.yaml").read_text().replace("every_n_train_steps: 20 ", "every_n_train_steps: 4 "))
    done = rlhf(["fit", "--config", str(config), *SHORT_PPO], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    last, final = tmp_path / "checkpoints/toy/ppo_fsdp/last.ckpt", tmp_path / "checkpoints/toy/ppo.ckpt"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    whole = torch.load(final, weights_only=True)
    meta = whole["rlhf"]
    assert whole["global_step"] == 2 * 4 and meta["stage"] == "ppo" and meta["rollouts"] == 2
    assert [h["rollout"] for h in meta["eval_history"]] == [0, 2] and meta["chosen"]["rollout"] == 0
    sft = torch.load(tmp_path / "checkpoints/toy/sft.ckpt", weights_only=True)["state_dict"]
    # the kept start, gathered whole during the run and loaded back into the shards, is the SFT policy exactly
    assert whole["state_dict"].keys() == sft.keys()
    assert all(torch.equal(whole["state_dict"][k], v) for k, v in sft.items())
    # while the sharded last.ckpt holds the policy after its 8 steps
    from rlhf_lightning.checkpoints import consolidate

    trained = consolidate(last)["state_dict"]
    assert any(not torch.equal(trained[k], v) for k, v in sft.items())
