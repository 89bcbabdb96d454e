"""Sample completions as a table in TensorBoard's Text tab."""

from __future__ import annotations

import lightning as L

from rlhf_lightning.callbacks.step_metrics import logging_step


def log_samples(module: L.LightningModule, tag: str, prompts: list[str], completions: list[str], golds: list[str | None], limit: int = 8) -> None:
    """A few prompt/completion/gold rows as a Markdown table in TensorBoard's Text tab."""
    logger = module.logger
    experiment = getattr(logger, "experiment", None) if logger is not None else None
    if experiment is None or not hasattr(experiment, "add_text") or limit <= 0:
        return

    def cell(text: str | None) -> str:
        return "" if text is None else text.replace("\n", "\\n").replace("|", "\\|")

    rows = ["| prompt | completion | gold |", "| --- | --- | --- |"]
    rows += [f"| {cell(p)} | {cell(c)} | {cell(g)} |" for p, c, g in list(zip(prompts, completions, golds))[:limit]]
    experiment.add_text(tag, "\n".join(rows), global_step=logging_step(module))
