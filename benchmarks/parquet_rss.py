"""Peak memory of SFT on a Parquet source larger than what the run may hold: a ~1 GB file of conversations, trained
from with `rlhf fit` (configs/toy_chat/sft.yaml) in a fresh process.

    python benchmarks/parquet_rss.py [--gb 1.0] [--steps 5] [--batch-size 4] [--chars 4000] [--keep DIR]

The file (written into a temporary folder, removed afterwards unless `--keep`) holds conversations of the toy_chat
form: a system turn, then two exchanges whose user turn is `Q: ` + random digits and operators + `=\\nA:` and whose
reply is random digits, `--chars` characters per conversation in all (random text: Parquet's compression finds
little to remove, so the file's size is about the text's). Rows are written until the file reaches `--gb` GB
(10^9 bytes).

The training process is a child (`rlhf fit` through `rlhf_lightning.cli.lightning_cli`, its working folder and
`HF_DATASETS_CACHE` in the temporary folder), so its peak RSS is the run's alone: `datasets` converts the Parquet
file once into its Arrow cache (`convert_s`); `SFTDataModule.setup` streams every row once to check it as training
reads it (`check_s`); then `--steps` optimizer steps of `--batch-size` conversations drawn at random from the whole
file, each row read from the memory-mapped table and tokenized when drawn (`train_s`). The model is the toy_chat
SFT model with `block_size` the longest conversation (the conversations all have the same length: no padding).

Measured on 2 CPU cores (torch 2.13, datasets 5.2, pyarrow 26): a 1.00 GB file of 272,000 conversations (1.11 GB of
Arrow cache) trains with a peak RSS of 0.97 GB, of which 0.51 GB is the imports' baseline and about 0.25 GB the
steps' activations (4,008 tokens x 4 rows); 0.71 GB when the first step starts. About 2 minutes in all (check 80 s).
The steps read 20 rows: RSS also counts the memory map's pages a run has read, file-backed pages the kernel reclaims
under pressure, so a run over most of a large file shows more of them.

Prints one JSON line: {"benchmark": "parquet_rss", "file_bytes", "rows", "arrow_cache_bytes", "peak_rss_bytes"
(the child's ru_maxrss, the whole run: conversion, check and steps), "baseline_rss_bytes" (after importing torch,
Lightning, datasets and the package), "rss_at_train_start_bytes" (peak so far when the first step starts), the
phases' seconds, "target_bytes": 1.5e9, "meets_target", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
TARGET_BYTES = 1.5e9
SYSTEM = "Solve."
SYMBOLS = b"0123456789+-"  # in the toy_chat alphabet


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# ---------------------------------------------------------------- the file


def conversation_sizes(chars: int) -> tuple[int, int]:
    """(random characters of each user turn, of each reply) for conversations of about `chars` characters."""
    reply = max(1, chars // 20)
    user = max(1, (chars - len(SYSTEM) - 2 * (reply + len("Q: =\nA:"))) // 2)
    return user, reply


def write_parquet(path: Path, gb: float, chars: int, seed: int = 0) -> tuple[int, int]:
    """Conversations written in row groups of 2,000 until the file holds `gb` GB; (rows, longest in tokens).

    Every conversation has the same shape (the turns' lengths), so a row group is built as Arrow buffers at once."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    symbols = np.frombuffer(SYMBOLS, dtype=np.uint8)
    user_len, reply_len = conversation_sizes(chars)
    # the five turns' texts, each a fixed prefix, `random` characters and a fixed suffix
    turns = [("system", SYSTEM, 0, ""), ("user", "Q: ", user_len, "=\nA:"), ("assistant", "", reply_len, ""),
             ("user", "Q: ", user_len, "=\nA:"), ("assistant", "", reply_len, "")]
    lengths = [len(head) + n + len(tail) for _, head, n, tail in turns]
    width, group, rows = sum(lengths), 2000, 0
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    roles = pa.array([role for role, *_ in turns] * group, type=pa.string())
    content_offsets = pa.array(np.concatenate([[0], np.cumsum(np.tile(lengths, group))]).astype(np.int32))
    list_offsets = pa.array(np.arange(0, len(turns) * group + 1, len(turns), dtype=np.int32))
    with pq.ParquetWriter(str(path), schema) as writer:
        while not path.exists() or path.stat().st_size < gb * 1e9:
            text = symbols[rng.integers(0, len(symbols), size=(group, width), dtype=np.uint8)]  # (group, width) random characters
            at = 0
            for (_, head, n, tail), length in zip(turns, lengths):  # the fixed parts over the random ones
                text[:, at : at + len(head)] = np.frombuffer(head.encode(), dtype=np.uint8)
                text[:, at + len(head) + n : at + length] = np.frombuffer(tail.encode(), dtype=np.uint8)
                at += length
            contents = pa.StringArray.from_buffers(len(turns) * group, content_offsets.buffers()[1], pa.py_buffer(text.tobytes()))
            messages = pa.ListArray.from_arrays(list_offsets, pa.StructArray.from_arrays([roles, contents], names=["role", "content"]))
            writer.write_table(pa.Table.from_arrays([messages], schema=schema))  # one row group, written through
            rows += group
    # the character tokenizer's tokens: BOS, a role token per turn, the text, EOS after each reply
    return rows, 1 + len(turns) + width + 2


# ---------------------------------------------------------------- the training process


class TrainStart(Callback):
    """Records when training starts (the source converted and checked) and the peak RSS by then, in `PHASES`."""

    def on_train_start(self, trainer, pl_module) -> None:
        PHASES["train_start"] = time.perf_counter()
        PHASES["rss_at_train_start_bytes"] = peak_rss_bytes()


PHASES: dict[str, float] = {}


def child(file: str, steps: int, batch_size: int, block_size: int) -> dict:
    """Convert, check and train in this process; the figures of each phase."""
    sys.path.insert(0, str(ROOT))
    import datasets  # noqa: F401  (imports are the baseline, not what is measured)
    import lightning  # noqa: F401
    import torch  # noqa: F401

    from rlhf_lightning.cli import lightning_cli
    from rlhf_lightning.data.datasets_source import SourceOptions, open_dataset

    baseline = rss_bytes()
    start = time.perf_counter()
    table = open_dataset(file, SourceOptions())  # the one-time conversion to `datasets`' Arrow cache
    converted = time.perf_counter()
    cache_bytes = sum(os.path.getsize(f["filename"]) for f in table.split.cache_files)
    rows = len(table)
    del table
    lightning_cli([
        "fit", "--config", str(ROOT / "configs" / "toy_chat" / "sft.yaml"),
        f"--data.init_args.train_file={file}", "--data.init_args.stratum_weights=null",
        f"--data.init_args.batch_size={batch_size}", "--data.init_args.max_val_prompts=16",
        f"--model.init_args.model.block_size={block_size}",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=parquet_rss.TrainStart",
    ])
    done = time.perf_counter()
    train_start = PHASES.get("train_start", done)
    return {
        "rows": rows, "arrow_cache_bytes": cache_bytes,
        "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline,
        "rss_at_train_start_bytes": int(PHASES.get("rss_at_train_start_bytes", 0)),
        "convert_s": round(converted - start, 1), "check_s": round(train_start - converted, 1), "train_s": round(done - train_start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the Parquet file, in GB (10^9 bytes)")
    parser.add_argument("--chars", type=int, default=4000, help="characters per conversation")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="conversations per step")
    parser.add_argument("--keep", help="write the file (and the Arrow cache) here and keep them")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from common import machine

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="parquet_rss_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        file = folder / "sft.parquet"
        start = time.perf_counter()
        rows, longest = write_parquet(file, args.gb, args.chars)
        written = time.perf_counter() - start
        env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "hf_cache"), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        # the child imports this file as `parquet_rss` (the callback's class_path), not as __main__
        code = f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import parquet_rss; " \
            f"print(json.dumps(parquet_rss.child({str(file)!r}, {args.steps}, {args.batch_size}, {longest})))"
        run = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"the training process failed:\n{run.stderr[-4000:]}")
        figures = json.loads(run.stdout.strip().splitlines()[-1])
        if figures["rows"] != rows:
            sys.exit(f"the training process read {figures['rows']} rows of the {rows} written")
        out = {
            "file_bytes": file.stat().st_size, **figures, "write_s": round(written, 1),
            "target_bytes": TARGET_BYTES, "meets_target": figures["peak_rss_bytes"] < TARGET_BYTES,
            "workload": {"chars_per_conversation": args.chars, "longest_tokens": longest, "steps": args.steps, "batch_size": args.batch_size, "config": "configs/toy_chat/sft.yaml"},
        }
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"benchmark": "parquet_rss", **out, "machine": machine()}))


if __name__ == "__main__":
    main()
