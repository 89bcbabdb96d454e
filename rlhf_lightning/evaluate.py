"""`rlhf eval`: answer held-out prompts with a trained policy, report accuracy, write completions."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlhf_lightning.data.jsonl import write_jsonl
from rlhf_lightning.data.prompts import PromptDataset, load_prompts
from rlhf_lightning.options import SEED_MAX, check_choice, check_number
from rlhf_lightning.policy import context_length, load_policy
from rlhf_lightning.evaluation import evaluate_batches
from rlhf_lightning.tasks.arithmetic import EVAL_MAX_NEW_TOKENS, TASKS
from rlhf_lightning.tasks.strata import task_strata_names


def evaluate_policy(
    ckpt: str,
    task: str = "toy",
    split: str = "test",
    prompts: str | None = None,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    batch_size: int = 1024,
    seed: int = 0,
    limit: int | None = None,
) -> tuple[dict, list[dict]]:
    """Return ({"accuracy", "num_prompts", "strata", ...}, one record per prompt)."""
    model, tokenizer, _ = load_policy(ckpt, role="--ckpt")
    model.eval()
    records = load_prompts(task, split, prompts, limit)
    dataset = PromptDataset(tokenizer, records, context_length(model))
    generator = torch.Generator().manual_seed(seed)
    evaluation = evaluate_batches(
        model, tokenizer, dataset.batches(batch_size), max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k, generator=generator,
    )
    rows = [
        {"prompt": p, "completion": c, "gold": g, "eos": e, "correct": None if g is None else bool(s)}
        for a in evaluation.parts
        for p, c, g, e, s in zip(a.prompts, a.completions, a.golds, a.finished.tolist(), a.scores.tolist())
    ]
    accuracy = evaluation.accuracy()
    summary = {
        "ckpt": ckpt,
        "source": prompts or f"{task}:{split}",
        "num_prompts": len(rows),
        "num_with_gold": int((~evaluation.scores.isnan()).sum()),
        "accuracy": None if accuracy != accuracy else accuracy,
        "eos_rate": sum(r["eos"] for r in rows) / len(rows),
        "strata": evaluation.strata(task_strata_names(task) if prompts is None else ()),
    }
    return summary, rows


def format_strata(strata: dict[str, dict]) -> str:
    """One row per stratum: name, n, accuracy and (where known) mean reward; "-" for an empty mean."""
    show_reward = any("reward" in m for m in strata.values())
    head = ["stratum", "n", "accuracy"] + (["reward"] if show_reward else [])
    lines = [head]
    for name, m in strata.items():
        cells = [name, str(m["n"])] + [("-" if m.get(k) is None else f"{m[k]:.4f}") for k in head[2:]]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))) for line in lines]
    return "\n".join([out[0], "  ".join("-" * w for w in widths), *out[1:]])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf eval", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="an SFT, PPO or DPO checkpoint, or an exported folder")
    parser.add_argument("--task", default="toy", help="toy or seed (default: toy)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--prompts", default=None, help='JSONL of {"prompt"[, "completion" as gold]} lines')
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=EVAL_MAX_NEW_TOKENS)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    parser.add_argument("--out", default=None, help="completions JSONL (default: beside the checkpoint)")
    args = parser.parse_args(argv)
    check_choice("task", args.task, TASKS, prefix="--")
    check_number("temperature", args.temperature, low=0, low_open=True, prefix="--")
    check_number("top_k", args.top_k, low=1, integer=True, allow_none=True, prefix="--")
    check_number("max_new_tokens", args.max_new_tokens, low=1, integer=True, prefix="--")
    check_number("batch_size", args.batch_size, low=1, integer=True, prefix="--")
    check_number("seed", args.seed, low=0, high=SEED_MAX, integer=True, prefix="--")
    check_number("limit", args.limit, low=1, integer=True, allow_none=True, prefix="--")
    start = time.perf_counter()
    summary, rows = evaluate_policy(
        args.ckpt, args.task, args.split, args.prompts, not args.sample, args.temperature, args.top_k,
        args.max_new_tokens, args.batch_size, args.seed, args.limit,
    )
    source = Path(args.prompts).stem if args.prompts else args.split
    out = Path(args.out) if args.out else Path(args.ckpt).with_name(f"{Path(args.ckpt).stem}.eval_{source}.jsonl")
    write_jsonl(out, rows)
    summary["out"] = str(out)
    summary["wall_s"] = round(time.perf_counter() - start, 3)
    accuracy = "n/a (no gold answers)" if summary["accuracy"] is None else f"{summary['accuracy']:.4f}"
    print(f"{summary['source']}: accuracy {accuracy} on {summary['num_prompts']} prompts; completions in {out}")
    if summary["strata"]:
        print(format_strata(summary["strata"]))
    print(json.dumps(summary))
    return 0
