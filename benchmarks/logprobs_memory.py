"""Peak memory of the update's log-probs + entropy and their backward: the plain formula against the one pass
that keeps no float32 (B, N, V) copy (`losses.token_logprobs_and_entropy`).

    python benchmarks/logprobs_memory.py [--rows 256] [--tokens 8] [--vocab 50257] [--width 768]

The logits come from a hidden state (rows x (tokens + 1), width) times a trainable (width, vocab) head, as an LM
head makes them, and the update's view of them (the positions that predict the completion, `[:, :-1]`), in
float32 and under bf16 autocast, at temperature 0.7. Each arm runs in a fresh process; reported:
peak RSS above what the process held before the head's matmul, in MB, and the logits' own size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

ARM = """
import resource, sys, torch
from rlhf_lightning.losses import entropy_from_logits, logprobs_from_logits, token_logprobs_and_entropy
rows, tokens, vocab, width, arm, bf16 = {rows}, {tokens}, {vocab}, {width}, {arm!r}, {bf16}
torch.manual_seed(0)
hidden = torch.randn(rows * (tokens + 1), width)
head = (torch.randn(width, vocab) * 0.02).requires_grad_()
targets = torch.randint(0, vocab, (rows, tokens))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
    logits = (hidden @ head).view(rows, tokens + 1, vocab)[:, :-1]  # (rows, tokens, vocab), a strided view
if arm == "plain":
    logprobs = logprobs_from_logits(logits, targets, 0.7)
    with torch.no_grad():
        entropy = entropy_from_logits(logits.detach() / 0.7)
else:
    logprobs, entropy = token_logprobs_and_entropy(logits, targets, 0.7)
size = logits.numel() * logits.element_size()
del logits
logprobs.mean().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, size)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--width", type=int, default=768)
    args = parser.parse_args()
    figures = {}
    for precision, bf16 in (("float32", False), ("bf16_autocast", True)):
        for arm in ("plain", "one_pass"):
            code = ARM.format(rows=args.rows, tokens=args.tokens, vocab=args.vocab, width=args.width, arm=arm, bf16=bf16)
            peak, size = map(int, subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
            figures[f"{precision}_{arm}_peak_mb"] = round(peak / 2**20)
            figures[f"{precision}_logits_mb"] = round(size / 2**20)
    emit("logprobs_memory", {"rows": args.rows, "tokens": args.tokens, "vocab": args.vocab, "width": args.width, **figures})


if __name__ == "__main__":
    main()
