"""Peak memory of one PPO step, full fine-tuning vs LoRA, each arm in a fresh process with identical settings.

    python benchmarks/memory.py --accelerator cpu --size 85m [--lora-r 8] [--no-checkpointing] [--micro-batch 64]

The workload: 32 prompts x 8 samples x 8 new tokens, judge reward, one PPO epoch of one minibatch, AdamW. The
policy is a briefly trained SFT checkpoint of the project's GPT: "tiny" is the toy config (2 layers, 64 wide),
"85m" has GPT-2's shape (12 layers, 768 wide, 12 heads; 85M parameters with the character tokenizer). The arms
differ only in `lora: {r}`; the full arm's reference is a frozen copy, the LoRA arm's the policy with its
adapters off. Both recompute the policy's activations in backward (`gradient_checkpointing: true`; turn it off
in both with `--no-checkpointing`), generate and run forwards in micro-batches of 64 of the 256 rows
(`generation_batch_size` and `micro_batch_size`, gradients accumulated to one optimizer step; `--micro-batch 0`:
all rows at once) and hold frozen models in float32.

Per arm, `baseline_bytes` is the process's memory after imports, before any model is built (RSS on CPU; 0 on a
GPU) and `peak_bytes` its peak (peak RSS; `torch.cuda.max_memory_allocated` on a GPU). On CPU each arm runs with
glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_=131072`): by default glibc raises the threshold as large
buffers are freed, then serves later activations from a heap it does not give back, and peak RSS measures the
allocator's history (measured: LoRA's checkpointed forward +2.0 GB RSS with 0.2 GB of live saved tensors).
Prints one JSON line:
{"size", "accelerator", "full": {"peak_bytes", "baseline_bytes"}, "lora": {...}, "ratio", ...}, where ratio =
(lora.peak - lora.baseline) / (full.peak - full.baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {
    "tiny": {"type": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 24},
    "85m": {"type": "gpt", "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 24},
}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def arm(ckpt: str, accelerator: str, lora_r: int | None, threads: int, checkpointing: bool, micro_batch: int | None) -> dict:
    """One PPO step in this process: {"peak_bytes", "baseline_bytes", "trainable_params", "params"}."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from harness import harness_module, ppo_iteration, prompt_batch

    torch.set_num_threads(threads)
    try:  # part of the baseline in both arms: imports are not what is compared
        import peft  # noqa: F401
    except ImportError:
        pass
    gpu = accelerator == "gpu"
    baseline = 0 if gpu else rss_bytes()
    module = harness_module(
        Path(ckpt), rollout={"samples_per_prompt": 8, "max_new_tokens": 8, "micro_batch_size": micro_batch, "generation_batch_size": micro_batch},
        update={"ppo_epochs": 1, "num_minibatches": 1}, eval={"keep_best": False},
        gradient_checkpointing=checkpointing, **({"lora": {"r": lora_r}} if lora_r else {}),
    )
    if gpu:
        module.to("cuda")
        module.reference.to("cuda")
        module.on_fit_start = lambda: None
    module.train()
    batch = prompt_batch(module, 32)
    if gpu:
        batch = {k: v.to("cuda") if hasattr(v, "to") else v for k, v in batch.items()}
    ppo_iteration(module, batch)
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in module.model.parameters())
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    return {"peak_bytes": int(peak), "baseline_bytes": int(baseline), "params": params, "trainable_params": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true", help="keep activations in both arms")
    parser.add_argument("--micro-batch", type=int, default=64, help="rows per generation pass and per forward (0: all 256 at once)")
    parser.add_argument("--arm", choices=("full", "lora"), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        lora_r = args.lora_r if args.arm == "lora" else None
        print(json.dumps(arm(args.ckpt, args.accelerator, lora_r, args.threads, not args.no_checkpointing, args.micro_batch or None)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine
    from harness import sft_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = "{" + ", ".join(f"{k}: {v}" for k, v in SIZES[args.size].items()) + "}"
        ckpt = sft_checkpoint(Path(tmp), steps=1, extra=[f"--model.init_args.model={model}", "--data.init_args.batch_size=16"])
        out = {"size": args.size, "accelerator": args.accelerator}
        for name in ("full", "lora"):
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            child = subprocess.run(
                [sys.executable, __file__, "--arm", name, "--ckpt", str(ckpt), "--accelerator", args.accelerator,
                 "--size", args.size, "--lora-r", str(args.lora_r), "--threads", str(args.threads),
                 "--micro-batch", str(args.micro_batch), *(["--no-checkpointing"] if args.no_checkpointing else [])],
                check=True, capture_output=True, text=True, env=env,
            )
            out[name] = json.loads(child.stdout.strip().splitlines()[-1])
    used = {name: out[name]["peak_bytes"] - out[name]["baseline_bytes"] for name in ("full", "lora")}
    out["ratio"] = round(used["lora"] / used["full"], 3)
    out["workload"] = {"prompts": 32, "samples": 8, "new_tokens": 8, "reward": "judge", "lora_r": args.lora_r, "gradient_checkpointing": not args.no_checkpointing, "micro_batch": args.micro_batch or 256}
    print(json.dumps({"benchmark": "memory", **out, "machine": machine()}))


if __name__ == "__main__":
    main()
