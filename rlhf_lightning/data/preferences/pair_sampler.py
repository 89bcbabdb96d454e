"""The pair sampler: K completions per prompt sampled from a policy, scored by a judge, paired up.

Judges by name (``auto``: the task's judge; ``random``: noisy labels, as the seed's RANDOM mode), or any reward
source in their place. Every two completions of the same prompt whose scores differ become a pair; ties are
dropped, or broken by length (longer preferred, as the seed did) with ``tie_break="length"``. `SampledPairs`
(offline pairs for the reward model and DPO) and online DPO's refreshes sample through `sample_groups`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from rlhf_lightning.completions import complete
from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.preferences.records import SampleGroup
from rlhf_lightning.data.prompts import PromptRecord, encode_prompts, render_records
from rlhf_lightning.options import check_choice, check_number
from rlhf_lightning.padding import left_pad
from rlhf_lightning.policy import context_length
from rlhf_lightning.tasks.arithmetic import judge_scores
from rlhf_lightning.tokenizer import Tokenizer

__all__ = ["JUDGES", "TIE_BREAKS", "Judge", "auto_judge", "check_pair_options", "pairs_from_group", "random_judge", "sample_groups"]

Judge = Callable[[list[str], list[str | None], list[bool], list[str], torch.Generator], list[float]]


def auto_judge(completions: list[str], golds: list[str | None], ended: list[bool], wheres: list[str], generator: torch.Generator) -> list[float]:
    """The task's judge (`tasks.arithmetic.judge_scores`): 1.0 for the exact gold answer followed by EOS, else 0.0."""
    for gold, where in zip(golds, wheres):
        if gold is None:
            raise DataError("the 'auto' judge needs a gold answer and this prompt has none", path=where, field="prompt")
    return judge_scores(completions, golds, ended).tolist()


def random_judge(completions: list[str], golds: list[str | None], ended: list[bool], wheres: list[str], generator: torch.Generator) -> list[float]:
    """Noisy labels: a uniform random score per completion, so every preference is a coin flip."""
    return torch.rand(len(completions), generator=generator).tolist()


JUDGES: dict[str, Judge] = {"auto": auto_judge, "random": random_judge}
TIE_BREAKS = (None, "length")  # None: a tie makes no pair; "length": the longer completion wins it


def check_pair_options(
    samples_per_prompt: int, judge: str, tie_break: str | None, prefix: str = "", judges: Iterable[str] = JUDGES
) -> None:
    """The pair sampler's own options, checked in this one place (`prefix`: how the caller's user writes them;
    `judges`: the judge names the caller accepts). A `ConfigError` (a ValueError) names the first bad one.

    >>> check_pair_options(4, "auto", "length")  # fine
    >>> check_pair_options(4, "auto", "random")
    Traceback (most recent call last):
    rlhf_lightning.options.ConfigError: tie_break: unknown value 'random'; allowed: length, null
    """
    check_number("samples_per_prompt", samples_per_prompt, low=2, integer=True, prefix=prefix)  # two to form a pair
    check_choice("judge", judge, judges, prefix=prefix)
    check_choice("tie_break", tie_break, TIE_BREAKS, prefix=prefix)


def pairs_from_group(scores: Sequence[float], completions: Sequence[str], tie_break: str | None = None) -> list[tuple[int, int]]:
    """(chosen, rejected) indices of every two completions whose scores differ (higher score chosen);
    `tie_break` is one of `TIE_BREAKS` (checked by `check_pair_options`).

    >>> pairs_from_group([1.0, 0.0, 0.0], ["5", "6", "77"])
    [(0, 1), (0, 2)]
    >>> pairs_from_group([1.0, 0.0, 0.0], ["5", "6", "77"], tie_break="length")  # longer wins a tie
    [(0, 1), (0, 2), (2, 1)]
    """
    pairs = []
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] != scores[j]:
                pairs.append((i, j) if scores[i] > scores[j] else (j, i))
            elif tie_break == "length" and len(completions[i]) != len(completions[j]):
                pairs.append((i, j) if len(completions[i]) > len(completions[j]) else (j, i))
    return pairs


@torch.no_grad()
def sample_groups(
    policy: torch.nn.Module,
    tokenizer: Tokenizer,
    records: list[PromptRecord],
    samples_per_prompt: int,
    judge_name: str = "auto",
    tie_break: str | None = None,
    max_new_tokens: int = 6,
    temperature: float = 1.0,
    top_k: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    score: Callable[[list[str], list[str], torch.Tensor, list[str | None]], torch.Tensor] | None = None,
) -> list[SampleGroup]:
    """Sample `samples_per_prompt` completions per prompt (batched, seeded), judge them, pair them up.

    `score`, a reward source (`rewards.RewardSource`: prompts, completions, EOS flags, golds -> scores (B,)),
    replaces the judge named by `judge_name` (online DPO's learned reward)."""
    K = samples_per_prompt
    check_pair_options(K, judge_name, tie_break)
    records = render_records(tokenizer, records)  # conversations: the chat template's text is the prompt from here on
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    judge_generator = torch.Generator().manual_seed(seed + 1)
    prompt_ids = encode_prompts(tokenizer, records, context_length(policy) - max_new_tokens + 1)
    groups = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        ids, mask = left_pad(prompt_ids[start : start + batch_size], tokenizer.pad_id)  # (b, P)
        texts, gen = complete(
            policy, tokenizer, ids.to(device), mask.to(device), max_new_tokens, temperature=temperature, top_k=top_k,
            generator=generator, samples_per_prompt=K,
        )  # rows r*K .. r*K + K-1 belong to prompt r, whose forward ran once
        ended = gen.finished.tolist()
        golds = [r.gold for r in chunk for _ in range(K)]
        wheres = [r.where for r in chunk for _ in range(K)]
        if score is None:
            scores = JUDGES[judge_name](texts, golds, ended, wheres, judge_generator)
        else:
            scores = score([r.prompt for r in chunk for _ in range(K)], texts, gen.finished, golds).tolist()
        labels = judge_scores(texts, golds, ended).tolist()  # the task judge, NaN without a gold answer
        for r, record in enumerate(chunk):
            k = slice(r * K, (r + 1) * K)
            group = SampleGroup(record.prompt, record.gold, texts[k], ended[k], scores[k], labels[k], record.where)
            group.pairs = pairs_from_group(group.scores, group.completions, tie_break)
            groups.append(group)
    return groups
