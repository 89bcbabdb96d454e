"""Framework overhead: a stage's training step inside `Trainer.fit` against a plain PyTorch loop doing the
same work.

    python benchmarks/overhead.py [--stage sft|ppo] [--steps 200] [--repeats 3]

Both arms train the toy SFT config's model (2 layers, 64 wide) on the same demonstrations, batch 128, with the
same AdamW, warm-up + cosine schedule and gradient clipping at 1.0, from the same initial weights. The Lightning
arm is `rlhf fit --config configs/toy/sft.yaml` as shipped (TensorBoard logging every 10 steps, the progress bar,
the stage's log lines) minus checkpoint writing and validation, which are not the step's work (validation is
timed apart by the stage's own `eval/*` figures). The plain arm is a `for batch in loader` loop: forward, loss,
backward, clip, step, schedule. Each arm times `--steps` steps after 20 warm-up steps, alternating arms for
`--repeats` rounds; prints one JSON line with ms/step medians and their ratio.

`--stage ppo` times the peer workload (configs/peer/ppo.yaml: 8 prompts x 8 samples, <= 4 new tokens, judge
reward, 1 epoch of 1 minibatch, beta 0, fused AdamW, clipping at 1.0, TensorBoard logging every step) from a
one-step peer SFT policy. The plain arm calls the same `PPOModule` methods outside Lightning: `make_rollout`
(generate, score, advantages), then the minibatch's `minibatch_loss`, backward, clip and step; the Lightning arm
adds its loop, hooks, the update's metrics and their logging.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 20


class StepClock(L.Callback):
    """Wall time from the start of step `WARMUP` to the end of the last step."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def lightning_arm(steps: int, cwd: Path) -> float:
    from rlhf_lightning.cli import lightning_cli

    clock = StepClock()
    cli = lightning_cli(
        ["--config", str(ROOT / "configs" / "toy" / "sft.yaml"), f"--trainer.max_steps={WARMUP + steps}",
         "--trainer.limit_val_batches=0", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
         f"--trainer.logger.init_args.save_dir={cwd}", "--seed_everything=0"],
        run=False,
    )
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    return (clock.end - clock.start) / steps


def plain_arm(steps: int) -> float:
    from rlhf_lightning.data.sft import SFTDataModule
    from rlhf_lightning.losses import masked_mean
    from rlhf_lightning.modules.sft import SFTModule
    from rlhf_lightning.optim import adamw, warmup_cosine
    from rlhf_lightning.scoring import token_logprobs

    L.seed_everything(0, verbose=False)
    module = SFTModule(model={"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 24})
    data = SFTDataModule(stratum_weights={"digits/1+1": 10.0, "digits/1+2": 4.0, "digits/2+1": 3.0}, tokenizer=module.tokenizer, max_length=module.data_max_length)
    data.setup("fit")
    model = module.model.train()
    optimizer = adamw(model, 0.005, 0.0, fused=False)  # as SFTModule builds it: the config's lr, warm-up and final ratio; cosine over the timed run
    scheduler = warmup_cosine(optimizer, 50, WARMUP + steps, 0.05)
    start, done = 0.0, 0
    while done < WARMUP + steps:
        for batch in data.train_dataloader():
            if done == WARMUP:
                start = time.perf_counter()
            logprobs, logits = token_logprobs(model, batch["input_ids"], None, return_logits=True)
            mask = batch["loss_mask"][:, 1:]
            loss = -masked_mean(logprobs[:, 1:], mask)
            masked_mean((logits.argmax(-1) == batch["input_ids"][:, 1:]).float(), mask)  # the logged token accuracy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            done += 1
            if done == WARMUP + steps:
                break
    return (time.perf_counter() - start) / steps


def peer_files(cwd: Path) -> dict:
    """The peer prompts and a one-step peer SFT policy in `cwd`; the PPO arms' path overrides."""
    import json

    from peer import peer_problems

    from rlhf_lightning.cli import lightning_cli

    (cwd / "peer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in peer_problems()))
    sft = cwd / "sft.ckpt"
    if not sft.exists():
        cli = lightning_cli(["--config", str(ROOT / "configs" / "peer" / "sft.yaml"), "--trainer.logger=false",
                             "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                             f"--data.init_args.train_file={cwd / 'peer.jsonl'}", f"--data.init_args.val_file={cwd / 'peer.jsonl'}"], run=False)
        cli.trainer.fit(cli.model, cli.datamodule)
        cli.trainer.save_checkpoint(sft)
    return {"train_file": str(cwd / "peer.jsonl"), "val_file": str(cwd / "peer.jsonl"), "policy_ckpt": str(sft)}


def lightning_ppo_arm(steps: int, cwd: Path) -> float:
    from rlhf_lightning.cli import lightning_cli

    files = peer_files(cwd)
    clock = StepClock()
    cli = lightning_cli(
        ["--config", str(ROOT / "configs" / "peer" / "ppo.yaml"), f"--trainer.max_steps={WARMUP + steps}", "--trainer.callbacks=[]",
         f"--trainer.logger.init_args.save_dir={cwd}", f"--data.init_args.train_file={files['train_file']}",
         f"--data.init_args.val_file={files['val_file']}", f"--model.init_args.policy_ckpt={files['policy_ckpt']}"],
        run=False,
    )
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    return (clock.end - clock.start) / steps


def plain_ppo_arm(steps: int, cwd: Path) -> float:
    import yaml

    from rlhf_lightning.data.rollout_prompts import PromptDataModule
    from rlhf_lightning.modules.ppo import PPOModule
    from rlhf_lightning.rl.update import loss_counts
    from rlhf_lightning.optim import adamw

    files = peer_files(cwd)
    config = yaml.safe_load((ROOT / "configs" / "peer" / "ppo.yaml").read_text())
    L.seed_everything(0, verbose=False)
    module = PPOModule(**{**config["model"]["init_args"], "policy_ckpt": files["policy_ckpt"]})
    data = PromptDataModule(**{**config["data"]["init_args"], "train_file": files["train_file"], "val_file": files["val_file"]},
                            tokenizer=module.tokenizer, max_length=module.data_max_length)
    data.setup("fit")
    optimizer = adamw(module.model, module.optim_cfg.lr, module.optim_cfg.weight_decay)  # fused, as PPOModule builds it
    generator = module.sampling_generator()
    start, done = 0.0, 0
    while done < WARMUP + steps:
        for batch in data.train_dataloader():
            if done == WARMUP:
                start = time.perf_counter()
            rollout, _ = module.make_rollout(batch)
            mb = rollout.select(torch.randperm(rollout.completion_ids.size(0), generator=generator))  # 1 epoch, 1 minibatch
            optimizer.zero_grad()
            out, _, _ = module.minibatch_loss(mb, loss_counts(mb, module.cfg.loss))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(module.model.parameters(), module.cfg.update.max_grad_norm)
            optimizer.step()
            done += 1
            if done == WARMUP + steps:
                break
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("sft", "ppo"), default="sft")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = {"lightning": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            if args.stage == "ppo":
                times["lightning"].append(lightning_ppo_arm(args.steps, Path(tmp)))
                times["plain"].append(plain_ppo_arm(args.steps, Path(tmp)))
            else:
                times["lightning"].append(lightning_arm(args.steps, Path(tmp)))
                times["plain"].append(plain_arm(args.steps))
    ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
    emit("overhead", {
        "stage": args.stage, "steps": args.steps, "repeats": args.repeats,
        "lightning_ms_per_step": ms["lightning"], "plain_ms_per_step": ms["plain"],
        "ratio": round(ms["lightning"] / ms["plain"], 3), "goal_ratio": 1.10,
        "all_ms": {k: [round(1000 * t, 2) for t in v] for k, v in times.items()},
    })


if __name__ == "__main__":
    main()
