"""Shared bits of the benchmark scripts: timing medians and a JSON line on stdout."""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def emit(name: str, figures: dict) -> None:
    print(json.dumps({"benchmark": name, **figures, "machine": machine()}))
