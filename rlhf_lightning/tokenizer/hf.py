"""A Hugging Face tokenizer behind the interface of `CharTokenizer` (needs the `[hf]` extra).

`HFTokenizer({"path": folder})` opens the tokenizer saved in a local model folder. Same contract as the
character tokenizer: a prompt is BOS + text (or the folder's chat template, with `chat_template: true`),
a completion is text + EOS, `decode` stops at the first EOS. A tokenizer without a BOS token (GPT-2
has only `<|endoftext|>`) uses its EOS id as BOS; one without a PAD token uses EOS as PAD. Masks come
from lengths everywhere, so a pad id equal to EOS never hides a real EOS.

Conversations are rendered by the folder's Jinja `chat_template` (`render_chat`, whatever `chat_template` says:
that flag only wraps flat prompts in a user turn). `to_dict()` records the template and its SHA-256, and a
tokenizer rebuilt from it renders with the recorded template even if the folder's has changed since. A prompt
whose text already starts with BOS (a template that writes `{{ bos_token }}`) gets no second one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rlhf_lightning.hf_files import import_transformers, local_folder
from rlhf_lightning.tokenizer.base import require_mapping, require_text
from rlhf_lightning.tokenizer.chat_template import template_sha256

__all__ = ["HFTokenizer"]


class HFTokenizer:
    """`AutoTokenizer.from_pretrained(path, local_files_only=True)` with pad/bos/eos ids and text in, ids out."""

    def __init__(self, path: str, chat_template: bool = False, template: str | None = None) -> None:
        transformers = import_transformers()
        self.path = local_folder(path, "tokenizer")
        self.chat_template = bool(chat_template)
        self.hf = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if template is not None:  # the template recorded at training time wins over the folder's
            self.hf.chat_template = template
        self.template: str | None = getattr(self.hf, "chat_template", None) or None
        if self.hf.eos_token_id is None:
            raise ValueError(f"hf tokenizer {self.path!r} has no EOS token; completions need one to end")
        if self.chat_template and not getattr(self.hf, "chat_template", None):
            raise ValueError(f"hf tokenizer {self.path!r} has no chat template; set chat_template: false")
        self._eos = int(self.hf.eos_token_id)
        self._bos = int(self.hf.bos_token_id) if self.hf.bos_token_id is not None else self._eos
        self._pad = int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self._eos

    # ------------------------------------------------------------------ properties
    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # the base vocabulary plus added tokens

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, where: str = "") -> list[int]:
        """Ids of `text`, no special tokens added."""
        require_text(text, where)
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str, where: str = "") -> list[int]:
        """`[bos] + encode(text)` (no second BOS where the text starts with it); with `chat_template`, the
        template's user turn and generation prompt."""
        if not self.chat_template:
            ids = self.encode(text, where)
            return ids if ids[:1] == [self._bos] and self._bos != self._eos else [self._bos] + ids
        self.encode(text, where)  # the same type check
        ids = self.hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def encode_completion(self, text: str, where: str = "") -> list[int]:
        """`encode(text) + [eos]`."""
        return self.encode(text, where) + [self._eos]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: skips a leading BOS, stops at the first EOS, drops PAD and BOS."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        if ids and int(ids[0]) == self._bos:  # a leading BOS, even where BOS and EOS share an id (GPT-2)
            ids = ids[1:]
        kept: list[int] = []
        for raw in ids:
            i = int(raw)
            if i == self._eos:
                break
            if i == self._pad or i == self._bos:
                continue
            kept.append(i)
        return self.hf.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_text(self, i: int) -> str:
        """The token of id `i` as the vocabulary writes it, specials included (for error messages)."""
        return str(self.hf.convert_ids_to_tokens(int(i)))

    # ------------------------------------------------------------------ chat
    def render_chat(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The text of a conversation under the tokenizer's Jinja chat template (`apply_chat_template`)."""
        if self.template is None:
            raise ValueError(f"hf tokenizer {self.path!r} has no chat template: conversational records need one")
        return self.hf.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.template
        )

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        d = {"type": "hf", "path": self.path, "chat_template": self.chat_template}
        if self.template is not None:
            d |= {"template": self.template, "template_sha256": template_sha256(self.template)}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HFTokenizer":
        d = require_mapping(d)
        if d.get("type") != "hf":
            raise ValueError(f"tokenizer description has type {d.get('type')!r}; expected 'hf'")
        unknown = sorted(set(d) - {"type", "path", "chat_template", "template", "template_sha256"})
        if unknown:
            raise ValueError(f"hf tokenizer description: unexpected keys {unknown}")
        if "path" not in d:
            raise ValueError("hf tokenizer description lacks 'path'")
        template = d.get("template")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"hf tokenizer 'template' must be a string, got {type(template).__name__}")
        if template is not None and d.get("template_sha256") not in (None, template_sha256(template)):
            raise ValueError("hf tokenizer 'template_sha256' is not the SHA-256 of its 'template': the description was altered")
        return cls(d["path"], bool(d.get("chat_template", False)), template)

    # ------------------------------------------------------------------ comparison
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HFTokenizer):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(("hf", self.path, self.chat_template, self.template))

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, chat_template={self.chat_template})"
