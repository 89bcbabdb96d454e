"""The toy task in conversational form (task `toy_chat`): the same problems, splits, gold answers and judge as
`toy`, each asked in a user turn after a short system turn; the assistant's reply is the answer.

A demonstration is one exchange, or, for one problem in four (chosen by a hash of its prompt), two: the next
`train` problem follows as a second user turn with its own assistant reply, and both replies are trained.
Prompts (for sampling and evaluation) are the system and user turns. The user turn's text is the flat prompt, so
a conversation's strata, split and gold answer are read from it exactly as the flat task's.

>>> prompt_messages(Problem("Q: 1+2=\\nA:", "3"))[1]
{'role': 'user', 'content': 'Q: 1+2=\\nA:'}
"""

from __future__ import annotations

import hashlib

from rlhf_lightning.tasks.arithmetic import ALPHABET, Problem

__all__ = ["CHAT_ALPHABET", "SYSTEM_PROMPT", "demonstrations", "prompt_messages"]

SYSTEM_PROMPT = "Solve."
#: The character tokenizer's alphabet for `toy_chat`: the toy alphabet and the system turn's characters (the role
#: tokens come with the tokenizer's chat vocabulary, `CharTokenizer(chat=True)`).
CHAT_ALPHABET: str = "".join(sorted(set(ALPHABET + SYSTEM_PROMPT)))


def prompt_messages(problem: Problem) -> tuple[dict[str, str], ...]:
    """The system and user turns asking `problem`."""
    return ({"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem.prompt})


def _has_second_turn(problem: Problem) -> bool:
    return hashlib.sha256(f"turns\x00{problem.prompt}".encode()).digest()[0] % 4 == 0


def demonstrations(problems: list[Problem]) -> list[tuple[dict[str, str], ...]]:
    """A conversation per problem: its exchange, and for one in four a second exchange with the next problem."""
    out = []
    for i, p in enumerate(problems):
        turns = (*prompt_messages(p), {"role": "assistant", "content": p.answer})
        if len(problems) > 1 and _has_second_turn(p):
            q = problems[(i + 1) % len(problems)]
            turns += ({"role": "user", "content": q.prompt}, {"role": "assistant", "content": q.answer})
        out.append(turns)
    return out
