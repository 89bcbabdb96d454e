"""Pieces shared by the PPO benchmarks: a quick SFT checkpoint via the CLI, and one PPO iteration timed part by part.

Not a benchmark itself. `ppo_iteration` runs the same calls as `PPOModule.make_rollout` and
`PPOModule.ppo_update` (generation, reward source, reference forward, advantages, update) with a timer
around each; the module runs outside a Trainer, so `optimizers`, `manual_backward` and `clip_gradients`
are bound to plain torch equivalents (no Lightning loop overhead: `peer.py` measures that inside fit).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from rlhf_lightning.data.prompts import PromptDataset, load_prompts
from rlhf_lightning.generation import generate
from rlhf_lightning.modules.ppo import PPOModule, Rollout

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def rlhf(args: list[str], cwd: Path, threads: int = 2, **kwargs) -> subprocess.CompletedProcess:
    """`rlhf <args>` in a fresh process with `cwd` as working directory; raises with its stderr on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning.cli", *args], cwd=cwd, env=env, text=True, capture_output=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"rlhf {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def sft_checkpoint(cwd: Path, steps: int = 5, extra: list[str] = (), config: Path | None = None) -> Path:
    """Train the toy SFT config for `steps` optimizer steps in `cwd`; returns checkpoints/toy/sft.ckpt there."""
    config = config or ROOT / "configs" / "toy" / "sft.yaml"
    rlhf(["fit", "--config", str(config), *QUIET, f"--trainer.max_steps={steps}", "--trainer.num_sanity_val_steps=0",
          "--trainer.limit_val_batches=0", *extra], cwd)
    return cwd / "checkpoints" / "toy" / "sft.ckpt"


def harness_module(ckpt: Path, **options) -> PPOModule:
    """A PPOModule (judge reward by default) usable outside a Trainer; `options` as `PPOModule` takes them (option
    groups as mappings: `rollout={"samples_per_prompt": 8}`)."""
    module = PPOModule(policy_ckpt=str(ckpt), **{"reward": {"source": "judge"}, **options})
    opt = module.configure_optimizers()
    object.__setattr__(module, "optimizers", lambda: opt)
    object.__setattr__(module, "manual_backward", lambda loss: loss.backward())
    object.__setattr__(module, "lr_schedulers", lambda: None)  # constant lr (no warmup_steps)
    object.__setattr__(module, "clip_gradients", lambda o, gradient_clip_val, gradient_clip_algorithm: torch.nn.utils.clip_grad_norm_(module.model.parameters(), gradient_clip_val))
    return module


def prompt_batch(module: PPOModule, prompts: int, split: str = "train") -> dict:
    data = PromptDataset(module.tokenizer, load_prompts("toy", split, limit=prompts), module.data_max_length)
    return data.collate([data[i] for i in range(len(data))])


def ppo_iteration(module: PPOModule, batch: dict, eos: bool = True) -> tuple[dict[str, float], Rollout]:
    """One rollout + update with wall seconds per part: rollout, reward, reference, advantages, update."""
    hp = module.cfg.rollout
    K = hp.samples_per_prompt
    times = {}
    t = time.perf_counter()
    with torch.no_grad():
        prompt_ids = batch["prompt_ids"].repeat_interleave(K, 0)
        prompt_mask = batch["prompt_mask"].bool().repeat_interleave(K, 0)
        prompts = [p for p in batch["prompts"] for _ in range(K)]
        golds = [g for g in batch["golds"] for _ in range(K)]
        gen = generate(  # as PPOModule.sample: each prompt's forward once, K samples from it
            module.model, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens=hp.max_new_tokens,
            eos_id=module.tokenizer.eos_id if eos else -1, pad_id=module.tokenizer.pad_id, temperature=hp.temperature,
            generator=module.sampling_generator(), batch_size=hp.generation_batch_size, samples_per_prompt=K,
        )
        completions = [module.tokenizer.decode(row) for row in gen.completion_ids.tolist()]
        times["rollout"] = time.perf_counter() - t
        t = time.perf_counter()
        rewards = module.score(prompts, completions, gen.finished, golds)
        times["reward"] = time.perf_counter() - t
        t = time.perf_counter()
        rollout = Rollout(*gen.joined(prompt_ids, prompt_mask), gen.completion_ids, gen.completion_mask, gen.logprobs, gen.logprobs, rewards, rewards)
        ref = module.collector.reference_logprobs(rollout.input_ids, rollout.attention_mask, gen.completion_mask)
        times["reference"] = time.perf_counter() - t
        t = time.perf_counter()
        rollout = replace(rollout, ref_logprobs=ref, advantages=module.global_advantages(rewards))
        times["advantages"] = time.perf_counter() - t
    t = time.perf_counter()
    module.ppo_update(rollout)
    times["update"] = time.perf_counter() - t
    return times, rollout


def plain_step(model, rollout: Rollout, optimizer=None) -> None:
    """A plain forward + backward (next-token NLL of the completion tokens) of the same batch; optional step."""
    loss = -(rollout.logprobs(model, 1.0) * rollout.completion_mask).sum() / rollout.completion_mask.sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    if optimizer is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
