"""Rollout speed: batched KV-cache generation against the seed's per-sample, per-token loop.

    python benchmarks/rollout.py [--accelerator cpu|gpu] [--compile] [--size tiny|85m] [--batch 64] [--new_tokens 8]

Both sample the same number of tokens from the same model and prompts (EOS disabled so every row runs
the full length). The seed's loop is re-implemented faithfully: one prompt at a time, the whole sequence
re-run through the model for every new token. Prints one JSON line: tokens/s of each and the ratio.
`--accelerator gpu` runs both on one GPU (each timed call ends with a device synchronization); `--compile`
decodes on the captured step (`generate(..., compile=True)`: CUDA graphs; on CPU a warning and the eager decode).

`--size 85m` swaps the 2-layer, 64-wide model for GPT-2's shape (12 layers, 768 wide, 12 heads: 85.1M parameters).
The JSON also gives the memory-bandwidth bound of a decode step: every weight plus the KV cache it attends over
is read once per step (bytes_per_decode_step), so at B rows a step cannot beat bytes / bandwidth, i.e.
B x bandwidth / bytes tokens/s. The bandwidth is `--bandwidth_gbs`, or on a GPU the H100's 3,350 GB/s and the
H200's 4,800 GB/s from the device name. `decode_tokens_per_s` times the decode steps alone (the prompt's forward
and the first sampled token excluded) for that comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, median_time  # noqa: E402

from rlhf_lightning.padding import left_pad  # noqa: E402
from rlhf_lightning.generation import generate  # noqa: E402
from rlhf_lightning.policy import build_policy  # noqa: E402
from rlhf_lightning.tasks.arithmetic import problems  # noqa: E402


@torch.no_grad()
def seed_sample_completion(model, prompt_ids: list[int], max_new: int, temperature: float = 1.0) -> list[int]:
    """The seed's `sample_completion`: re-run the whole sequence for every new token, one prompt at a time."""
    model.eval()
    ids = prompt_ids[:]
    for _ in range(max_new):
        x = torch.tensor(ids, dtype=torch.long, device=model.lm_head.weight.device).unsqueeze(0)  # (1, t)
        logits = model(x, torch.ones_like(x, dtype=torch.bool))[:, -1, :] / max(1e-6, temperature)
        probs = F.softmax(logits, dim=-1)
        ids.append(torch.multinomial(probs, num_samples=1).item())
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--size", choices=("tiny", "85m"), default="tiny")
    parser.add_argument("--bandwidth_gbs", type=float, default=None, help="memory bandwidth for the bound (default: from the GPU's name)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = {"tiny": {"n_layer": 2, "n_head": 4, "n_embd": 64}, "85m": {"n_layer": 12, "n_head": 12, "n_embd": 768}}[args.size]
    model, tokenizer, _ = build_policy({**shape, "block_size": 32}, None)
    model.eval().to(device)
    prompts = [tokenizer.encode_prompt(p.prompt) for p in problems("train")[: args.batch]]
    ids, mask = (t.to(device) for t in left_pad(prompts, tokenizer.pad_id))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens = args.batch * args.new_tokens

    def batched():
        generate(model, ids, mask, max_new_tokens=args.new_tokens, eos_id=-1, pad_id=tokenizer.pad_id, compile=args.compile)
        synchronize()

    def seed_loop():
        for p in prompts:
            seed_sample_completion(model, p, args.new_tokens)

    def prefill_only():
        generate(model, ids, mask, max_new_tokens=1, eos_id=-1, pad_id=tokenizer.pad_id, compile=args.compile)
        synchronize()

    t_batched = median_time(batched, args.repeats)
    t_decode = max(1e-9, t_batched - median_time(prefill_only, args.repeats)) / max(1, args.new_tokens - 1)  # one decode step
    t_seed = median_time(seed_loop, max(1, args.repeats // 2), warmup=1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    keys = ids.size(1) + args.new_tokens  # positions attended at the last step (a static cache's are rounded up to 16)
    if args.compile and device.type == "cuda":
        keys = -(-keys // 16) * 16
    kv = 2 * cfg.n_layer * args.batch * keys * cfg.n_embd * model.lm_head.weight.element_size()
    bandwidth = args.bandwidth_gbs
    if bandwidth is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bandwidth = 4800.0 if "H200" in name else 3350.0 if "H100" in name else None
    bound = None if bandwidth is None else args.batch * bandwidth * 1e9 / (weights + kv)
    decode_tokens_per_s = args.batch / t_decode
    emit("rollout", {
        "accelerator": args.accelerator, "compile": args.compile, "batch": args.batch, "new_tokens": args.new_tokens,
        "batched_tokens_per_s": round(tokens / t_batched, 1),
        "seed_loop_tokens_per_s": round(tokens / t_seed, 1),
        "speedup": round(t_seed / t_batched, 1),
        "size": args.size, "decode_tokens_per_s": round(decode_tokens_per_s, 1),
        "bytes_per_decode_step": {"weights": weights, "kv_cache": kv},
        "bandwidth_gbs": bandwidth,
        "bandwidth_bound_tokens_per_s": None if bound is None else round(bound, 1),
        "bound_over_measured": None if bound is None else round(bound / decode_tokens_per_s, 2),
        "goal_speedup": 50,
    })


if __name__ == "__main__":
    main()
