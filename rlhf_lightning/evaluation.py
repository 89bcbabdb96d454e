"""The one evaluator: a policy answers prompts (greedy or sampled), the task's judge scores the answers, and
optionally a reward source scores them and the exact KL to a reference is measured on them.

SFT's validation, PPO's and DPO's evaluations on `val`, `rlhf eval` and the pipeline's test table all call
`answer` per batch of prompts (`evaluate_batches` over a loader) and read their figures from an `Evaluation` of the
batches:

- `eval/accuracy`: the judge's mean over prompts with a gold answer (float32, as `Tensor.mean`);
- `eval/accuracy/<stratum>`: the same per stratum (`tasks.strata.strata_metrics`);
- `eval/reward`: the reward source's mean over every answer;
- `eval/kl`: KL(policy || reference) per completion token, summed over the answers' tokens (`scoring.completion_kl`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from rlhf_lightning.completions import complete
from rlhf_lightning.losses import masked_sum
from rlhf_lightning.scoring import completion_kl
from rlhf_lightning.tasks.arithmetic import judge_scores
from rlhf_lightning.tasks.strata import strata_metrics
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["Answers", "Evaluation", "answer", "evaluate_batches"]

#: (prompts, completions, EOS flags (B,), gold answers) -> scores (B,): a reward source
Score = Callable[[list[str], list[str], torch.Tensor, list[str | None]], torch.Tensor]


@dataclass
class Answers:
    """One batch of prompts answered and judged."""

    prompts: list[str]
    golds: list[str | None]
    strata: list[tuple[str, ...]]
    completions: list[str]
    finished: torch.Tensor  # (B,) bool: the answer emitted EOS within the budget
    scores: torch.Tensor  # (B,) the task judge: 1.0 / 0.0, NaN without a gold answer
    rewards: torch.Tensor | None = None  # (B,) the reward source's, when one was given
    kl_sum: torch.Tensor | None = None  # () the per-token KL to the reference summed over the answers' tokens
    tokens: torch.Tensor | None = None  # () the answers' completion tokens (EOS included where emitted)


@torch.no_grad()
def answer(
    policy: nn.Module,
    tokenizer: Tokenizer,
    batch: dict,
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    score: Score | None = None,
    reference: nn.Module | None = None,
    kl_temperature: float = 1.0,
) -> Answers:
    """`policy`'s answers to a prompt batch (`PromptDataset.collate`, on the policy's device), judged; with `score`
    also rewarded, with `reference` also the KL to it at `kl_temperature` (the rollouts' temperature for PPO)."""
    completions, gen = complete(
        policy, tokenizer, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens, greedy=greedy, temperature=temperature,
        top_k=top_k, generator=generator, compile=compile,
    )
    out = Answers(
        list(batch["prompts"]), list(batch["golds"]), list(batch.get("strata", [()] * len(completions))), completions,
        gen.finished, judge_scores(completions, batch["golds"], gen.finished),
    )
    if score is not None:
        out.rewards = score(out.prompts, completions, gen.finished, out.golds)
    if reference is not None:
        ids, mask = gen.joined(batch["prompt_ids"], batch["prompt_mask"])  # (B, P + N) each
        kl = completion_kl(policy, reference, ids, mask, gen.completion_ids.size(1), kl_temperature)  # (B, N)
        out.kl_sum, out.tokens = masked_sum(kl, gen.completion_mask), gen.completion_mask.sum()
    return out


@torch.no_grad()
def evaluate_batches(
    policy: nn.Module, tokenizer: Tokenizer, batches: Iterable[dict], max_new_tokens: int,
    first: Callable[["Answers"], None] | None = None, **options,
) -> "Evaluation":
    """`answer` (with `options`) to every batch, the policy in eval mode (its mode put back after): their
    `Evaluation`. `first(answers)` sees the first batch's answers (to log a few as samples)."""
    was_training = policy.training
    policy.eval()
    evaluation = Evaluation()
    try:
        for i, batch in enumerate(batches):
            evaluation.add(answer(policy, tokenizer, batch, max_new_tokens, **options))
            if i == 0 and first is not None:
                first(evaluation.parts[0])
    finally:
        policy.train(was_training)
    return evaluation


@dataclass
class Evaluation:
    """The answers of every batch (every rank's after `gather`), and the figures over them."""

    parts: list[Answers] = field(default_factory=list)

    def add(self, answers: Answers) -> None:
        self.parts.append(answers)

    def gather(self) -> "Evaluation":
        """Every rank's answers, in rank order (the identity in one process): for evaluations that split the
        prompts over ranks (SFT's validation loop)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        cpu = [Answers(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(a).items()}) for a in self.parts]
        gathered: list[list[Answers] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, cpu)
        return Evaluation([a for parts in gathered for a in parts])

    @property
    def scores(self) -> torch.Tensor:
        return torch.cat([a.scores.float().cpu() for a in self.parts]) if self.parts else torch.zeros(0)

    def accuracy(self) -> float:
        """The judge's mean over the answers whose prompt has a gold answer; NaN when none has."""
        scores = self.scores
        known = ~scores.isnan()
        return float(scores[known].mean()) if known.any() else float("nan")

    def reward(self) -> float | None:
        if not self.parts or any(a.rewards is None for a in self.parts):
            return None
        return float(torch.cat([a.rewards.float().cpu() for a in self.parts]).mean())

    def kl(self) -> float | None:
        """KL(policy || reference) per completion token over every answer."""
        if not self.parts or any(a.kl_sum is None for a in self.parts):
            return None
        if len(self.parts) == 1:  # `losses.masked_mean`'s operations, for one batch
            return float(self.parts[0].kl_sum / self.parts[0].tokens.clamp(min=1).to(self.parts[0].kl_sum.dtype))
        total = sum(float(a.kl_sum) for a in self.parts)
        return total / max(sum(int(a.tokens) for a in self.parts), 1)

    def strata(self, names: Iterable[str] = ()) -> dict[str, dict]:
        """Accuracy (and mean reward) per stratum (`tasks.strata.strata_metrics`)."""
        rewards = None
        if self.parts and all(a.rewards is not None for a in self.parts):
            rewards = [r for a in self.parts for r in a.rewards.tolist()]
        return strata_metrics(self.scores.tolist(), [s for a in self.parts for s in a.strata], rewards, names)

    def metrics(self, prefix: str = "eval", names: Sequence[str] = ()) -> dict[str, float]:
        """`<prefix>/accuracy`, `<prefix>/accuracy/<stratum>` (strata with a known score), and `<prefix>/reward`,
        `<prefix>/kl` where measured."""
        out = {f"{prefix}/accuracy": self.accuracy()}
        reward, kl = self.reward(), self.kl()
        if reward is not None:
            out[f"{prefix}/reward"] = reward
        if kl is not None:
            out[f"{prefix}/kl"] = kl
        for name, m in self.strata(names).items():
            if m["accuracy"] is not None:
                out[f"{prefix}/accuracy/{name}"] = m["accuracy"]
        return out
