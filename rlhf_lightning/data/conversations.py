"""Conversational records (TRL's form: lists of `{"role", "content"}` messages) and their tokens through the
tokenizer's chat template.

Three rules hold for every conversation, each refused with a `DataError` naming the record and the field:

* messages are well formed: an object with a `role` (`system`, `user` or `assistant`; `system` only first) and a
  non-empty string `content`;
* the template keeps the prefix property: the tokens of the conversation up to an assistant turn, with the
  generation prompt, are a prefix of the tokens of the conversation through that turn, and those of the whole
  conversation (the error names the first differing token);
* an assistant turn ends with EOS, and is trained up to and including it (a template that writes a newline after
  EOS leaves that newline untrained, as context): a completion is text + EOS in every stage.

A prompt is encoded as the tokenizer encodes any prompt (BOS + text, no second BOS where the template writes one),
so a rendered prompt can travel as a string: to the reward model, into a JSONL of sampled pairs, and back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.tokenizer import Tokenizer
from rlhf_lightning.tokenizer.chat_template import ROLES

__all__ = [
    "Messages", "check_messages", "check_reply", "encode_conversation", "is_conversation", "last_user_text",
    "render_prompt", "split_implicit_prompt",
]

Messages = tuple[dict[str, str], ...]


def is_conversation(value: Any) -> bool:
    """A field's value is in conversational form: a list (of messages), not a string."""
    return isinstance(value, (list, tuple))


def check_messages(
    value: Any, where: str, field: str, *, ends_with: str | None = None, needs_assistant: bool = False, roles: Sequence[str] = ROLES
) -> Messages:
    """Validated messages of a record's `field` (`{"role", "content"}` each; other keys dropped).

    `ends_with`: the role the last message must have; `needs_assistant`: at least one assistant turn;
    `roles`: the roles allowed in this field. Errors name the message: ``field 'messages[2].role'``.
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"expected a non-empty list of messages, got {_show(value)}", path=where, field=field)
    messages = []
    for i, m in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise DataError(f"expected a message object {{\"role\", \"content\"}}, got {_show(m)}", path=where, field=at)
        for key in ("role", "content"):
            if key not in m or m[key] is None:
                raise DataError("missing required field", path=where, field=f"{at}.{key}")
        role, content = m["role"], m["content"]
        if role not in roles:
            raise DataError(f"unknown role {_show(role)}; allowed: {', '.join(roles)}", path=where, field=f"{at}.role")
        if role == "system" and i > 0:
            raise DataError("a system message must come first", path=where, field=f"{at}.role")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"expected a non-empty string, got {_show(content)}", path=where, field=f"{at}.content")
        messages.append({"role": role, "content": content})
    if ends_with is not None and messages[-1]["role"] != ends_with:
        raise DataError(
            f"the last message must be a {ends_with} turn, got {messages[-1]['role']!r}", path=where, field=f"{field}[{len(messages) - 1}].role"
        )
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn: nothing to train on", path=where, field=field)
    return tuple(messages)


def last_user_text(messages: Messages) -> str:
    """The content of the last user turn: what a task's gold answer, strata and split are read from."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def split_implicit_prompt(chosen: Messages, rejected: Messages, where: str) -> tuple[Messages, str, str]:
    """(prompt, chosen reply, rejected reply) of the implicit-prompt form: two whole conversations that share
    every message but their last, an assistant turn each."""
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise DataError(f"the last message must be an assistant turn, got {conv[-1]['role']!r}", path=where, field=f"{name}[{len(conv) - 1}].role")
        if len(conv) < 2:
            raise DataError("the implicit-prompt form needs the prompt's messages before the reply", path=where, field=name)
    if chosen[:-1] != rejected[:-1]:
        i = next((k for k, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b), min(len(chosen), len(rejected)) - 1)
        raise DataError(
            f"'chosen' and 'rejected' must share their prompt (every message but the last); they differ at message {i}",
            path=where, field=f"rejected[{i}]",
        )
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def render_prompt(tokenizer: Tokenizer, messages: Messages, where: str, field: str = "prompt") -> str:
    """The prompt's text under the tokenizer's chat template, with the generation prompt."""
    return _render(tokenizer, messages, True, where, field)


def _render(tokenizer: Tokenizer, messages: Messages, generation_prompt: bool, where: str, field: str) -> str:
    render = getattr(tokenizer, "render_chat", None)
    if render is None:
        raise DataError(f"conversational records need a tokenizer with a chat template; {type(tokenizer).__name__} has none", path=where, field=field)
    try:
        return render(messages, add_generation_prompt=generation_prompt)
    except ValueError as e:  # no template, or a template error
        raise DataError(str(e), path=where, field=field) from None


def _ids(tokenizer: Tokenizer, text: str, where: str, field: str) -> list[int]:
    return tokenizer.encode_prompt(text, where=f"{where}: field {field!r}")


def _first_difference(tokenizer: Tokenizer, a: list[int], b: list[int]) -> tuple[int, str, str]:
    """(index, token of `a`, token of `b`) at the first position where the two id lists differ ("the end" past one)."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shown = lambda ids: repr(_token(tokenizer, ids[i])) if i < len(ids) else "the end"  # noqa: E731
    return i, shown(a), shown(b)


def _check_prefix(tokenizer: Tokenizer, prefix: list[int], full: list[int], what: str, where: str, field: str) -> None:
    if full[: len(prefix)] == prefix:
        return
    i, ours, theirs = _first_difference(tokenizer, prefix, full)
    raise DataError(
        f"the chat template breaks the prefix property: {what} is not a prefix of the conversation's tokens; "
        f"first difference at token {i}: {ours} vs {theirs}",
        path=where, field=field,
    )


def _token(tokenizer: Tokenizer, i: int) -> str:
    text = getattr(tokenizer, "token_text", None)
    return text(i) if text is not None else str(i)


def encode_conversation(tokenizer: Tokenizer, messages: Messages, where: str, field: str = "messages") -> tuple[list[int], list[bool]]:
    """(ids, trained) of a conversation: the ids of its rendering (BOS first), and True on every assistant turn's
    tokens through its EOS, False elsewhere (system and user turns, role headers, the generation prompt).

    Each assistant turn i is located by rendering the turns before it with the generation prompt (where the turn
    starts) and the turns through it (where it ends); both must be prefixes of the whole conversation's tokens.
    """
    full = _ids(tokenizer, _render(tokenizer, messages, False, where, field), where, field)
    trained = [False] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _ids(tokenizer, _render(tokenizer, messages[:i], True, where, field), where, field)
        _check_prefix(tokenizer, start, full, f"the prompt of turn {i} (turns 0..{i - 1} and the generation prompt)", where, f"{field}[{i}]")
        if i + 1 < len(messages):  # through the last turn is the whole conversation
            through = _ids(tokenizer, _render(tokenizer, messages[: i + 1], False, where, field), where, field)
            _check_prefix(tokenizer, through, full, f"the conversation through turn {i}", where, f"{field}[{i}]")
        else:
            through = full
        turn = full[len(start) : len(through)]
        if tokenizer.eos_id not in turn:
            raise DataError(
                f"the chat template does not end the assistant turn with EOS ({_token(tokenizer, tokenizer.eos_id)!r}): generation could not stop there",
                path=where, field=f"{field}[{i}]",
            )
        end = len(start) + turn.index(tokenizer.eos_id) + 1
        trained[len(start) : end] = [True] * (end - len(start))
    return full, trained


def check_reply(tokenizer: Tokenizer, prompt: Messages, prompt_text: str, reply: str, where: str, field: str) -> None:
    """Refuse a template under which BOS + rendered prompt + reply + EOS, the ids every stage scores and samples,
    are not the template's own tokens of the conversation with the reply as its last assistant turn (through EOS)."""
    flat = _ids(tokenizer, prompt_text, where, field) + tokenizer.encode_completion(reply, where=f"{where}: field {field!r}")
    ids, trained = encode_conversation(tokenizer, (*prompt, {"role": "assistant", "content": reply}), where, field)
    templated = ids[: max(i for i, t in enumerate(trained) if t) + 1]
    if flat != templated:
        i, ours, theirs = _first_difference(tokenizer, flat, templated)
        raise DataError(
            f"the chat template writes the reply otherwise than prompt + reply + EOS, as the stages encode them; "
            f"first difference at token {i}: {ours} vs the template's {theirs}",
            path=where, field=field,
        )


def _show(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
