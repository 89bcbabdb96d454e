"""Chat templates: rendering a conversation to text with a Jinja template, as Hugging Face tokenizers do, and the
template's SHA-256 (recorded in checkpoints, so evaluation and export render as training did).

A conversation is a sequence of `{"role", "content"}` messages (roles `system`, `user`, `assistant`). The
character tokenizer's chat mode uses `CHAR_CHAT_TEMPLATE`: a role token before each turn, EOS after each
assistant turn, and the assistant's role token as the generation prompt.

>>> render_chat(CHAR_CHAT_TEMPLATE, [{"role": "user", "content": "Q: 1+2=\\nA:"}], add_generation_prompt=True, eos_token="<eos>")
'<|user|>Q: 1+2=\\nA:<|assistant|>'
>>> template_sha256("x")[:12]
'2d711642b726'
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

__all__ = ["CHAR_CHAT_TEMPLATE", "ROLES", "render_chat", "template_sha256"]

ROLES: tuple[str, ...] = ("system", "user", "assistant")

#: The character tokenizer's built-in template. `<|system|>`, `<|user|>`, `<|assistant|>` are single tokens of its
#: chat vocabulary (`CharTokenizer(chat=True)`), and `eos_token` is the EOS token's text, so an assistant turn is its
#: content followed by EOS: exactly a completion (text + EOS) after the generation prompt.
CHAR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def template_sha256(template: str) -> str:
    """Hex SHA-256 of a template's UTF-8 text."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


@lru_cache(maxsize=16)
def _compiled(template: str):
    # the environment Hugging Face's apply_chat_template uses: sandboxed, trim_blocks and lstrip_blocks
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def render_chat(
    template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **special_tokens: str
) -> str:
    """The text of `messages` under the Jinja `template`; `special_tokens` (e.g. `eos_token`, `bos_token`) are
    passed to the template as variables."""
    return _compiled(template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **special_tokens
    )
