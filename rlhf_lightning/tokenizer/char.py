"""Character-level tokenizer with BOS/EOS/PAD specials.

Ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``; the characters of the alphabet (sorted, unique) follow.
A prompt is encoded as BOS + text, a completion as text + EOS. The tokenizer is described by plain
JSON-able values (:meth:`CharTokenizer.to_dict`), so it can travel inside a checkpoint's hyperparameters.

The chat vocabulary (``chat=True``) is an explicit extension: the three role tokens `CHAT_TOKENS` get the ids
after the characters (so every flat id is unchanged), and in a text the strings ``<|system|>``, ``<|user|>``,
``<|assistant|>`` and ``<eos>`` are read as those tokens and EOS. Conversations are rendered by a chat template
(default `CHAR_CHAT_TEMPLATE`), recorded with its SHA-256 in `to_dict()`. A flat tokenizer's `to_dict()` is
what it always was, so flat checkpoints are unchanged.

>>> tok = CharTokenizer("0123456789")
>>> tok.encode_prompt("12"), tok.decode(tok.encode_completion("12"))
([1, 4, 5], '12')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import re

from rlhf_lightning.tokenizer.base import UnknownCharacterError, require_mapping, require_text
from rlhf_lightning.tokenizer.chat_template import CHAR_CHAT_TEMPLATE, ROLES, render_chat, template_sha256

__all__ = ["CHAT_TOKENS", "CharTokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
CHAT_TOKENS: tuple[str, ...] = tuple(f"<|{role}|>" for role in ROLES)
_PAD_ID, _BOS_ID, _EOS_ID = 0, 1, 2
_NOT_IN_ALPHABET = 255  # in the ASCII translation table: a character without an id
_CHAT_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in CHAT_TOKENS + ("<eos>",)) + ")")


class CharTokenizer:
    """Maps characters of a fixed alphabet to ids, after three specials (pad=0, bos=1, eos=2)."""

    def __init__(self, alphabet: Iterable[str], chat: bool = False, template: str | None = None) -> None:
        if isinstance(alphabet, str):
            chars = list(alphabet)
        else:
            chars = list(alphabet)
            for c in chars:
                if not isinstance(c, str) or len(c) != 1:
                    raise ValueError(f"alphabet entries must be single characters, got {c!r}")
        unique = sorted(set(chars))
        if not unique:
            raise ValueError("alphabet must contain at least one character")
        self._alphabet = "".join(unique)
        self._itos: tuple[str, ...] = SPECIAL_TOKENS + tuple(unique)
        self._stoi: dict[str, int] = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(unique)}
        self.chat = bool(chat)
        if template is not None and not self.chat:
            raise ValueError("a chat template needs the chat vocabulary (chat: true)")
        self.template = (template or CHAR_CHAT_TEMPLATE) if self.chat else None
        self._markers: dict[str, int] = {}
        if self.chat:
            self._markers = {t: len(self._itos) + i for i, t in enumerate(CHAT_TOKENS)} | {"<eos>": _EOS_ID}
            self._itos = self._itos + CHAT_TOKENS
        # while every id fits a byte: ASCII code -> id as a bytes translation table (_NOT_IN_ALPHABET where none)
        self._ascii_ids: bytes | None = None
        self._marker_bytes: dict[str, bytes] = {}
        if len(self._itos) < _NOT_IN_ALPHABET:
            self._marker_bytes = {t: bytes([i]) for t, i in self._markers.items()}
            self._ascii_ids = bytes(self._stoi.get(chr(code), _NOT_IN_ALPHABET) for code in range(128)) + bytes([_NOT_IN_ALPHABET]) * 128

    # ------------------------------------------------------------------ properties
    @property
    def pad_id(self) -> int:
        return _PAD_ID

    @property
    def bos_id(self) -> int:
        return _BOS_ID

    @property
    def eos_id(self) -> int:
        return _EOS_ID

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def alphabet(self) -> str:
        """The characters (sorted, unique) as one string."""
        return self._alphabet

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, where: str = "") -> list[int]:
        """Ids of ``text``'s characters, no specials (in chat mode, role tokens and ``<eos>`` are read as tokens).
        Raises :class:`UnknownCharacterError`."""
        require_text(text, where)
        fast = self._encode_ascii(text)
        if fast is not None:
            return fast
        if self._markers:
            ids, offset = [], 0
            for piece in _CHAT_SPLIT.split(text):
                if piece in self._markers:
                    ids.append(self._markers[piece])
                else:
                    try:
                        ids += self._encode_chars(piece, where)
                    except UnknownCharacterError as e:
                        raise UnknownCharacterError(e.char, e.index + offset, where, self._alphabet) from None
                offset += len(piece)
            return ids
        return self._encode_chars(text, where)

    def _encode_ascii(self, text: str) -> list[int] | None:
        """`encode` of an ASCII text in a few C passes (long texts: SFT on large files); None for a text that is not
        ASCII or has a character outside the alphabet, which the general path encodes or reports."""
        if self._ascii_ids is None or not text.isascii():
            return None
        if self._markers:  # split on the markers: every odd piece is one
            pieces = _CHAT_SPLIT.split(text)
            ids = b"".join(self._marker_bytes[p] if i % 2 else p.encode("ascii").translate(self._ascii_ids) for i, p in enumerate(pieces))
        else:
            ids = text.encode("ascii").translate(self._ascii_ids)
        return None if _NOT_IN_ALPHABET in ids else list(ids)

    def _encode_chars(self, text: str, where: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            for i, c in enumerate(text):
                if c not in stoi:
                    raise UnknownCharacterError(c, i, where, self._alphabet) from None
            raise  # pragma: no cover - unreachable

    def encode_prompt(self, text: str, where: str = "") -> list[int]:
        """``[bos] + encode(text)``."""
        return [_BOS_ID] + self.encode(text, where)

    def encode_completion(self, text: str, where: str = "") -> list[int]:
        """``encode(text) + [eos]``."""
        return self.encode(text, where) + [_EOS_ID]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: stops at the first EOS, drops PAD and BOS."""
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        itos = self._itos
        n = len(itos)
        out: list[str] = []
        for raw in ids:
            i = int(raw)
            if i == _EOS_ID:
                break
            if i == _PAD_ID or i == _BOS_ID:
                continue
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {n}")
            out.append(itos[i])
        return "".join(out)

    def token_text(self, i: int) -> str:
        """The token of id `i` as text, specials included (for error messages)."""
        return self._itos[i]

    # ------------------------------------------------------------------ chat
    def render_chat(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The text of a conversation under the chat template (see `tokenizer.chat_template`)."""
        if self.template is None:
            raise ValueError("the character tokenizer renders conversations only with its chat vocabulary: set chat: true in its description")
        return render_chat(self.template, list(messages), add_generation_prompt, eos_token="<eos>", bos_token="")

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        if not self.chat:
            return {"type": "char", "alphabet": self._alphabet}
        return {"type": "char", "alphabet": self._alphabet, "chat": True, "template": self.template, "template_sha256": template_sha256(self.template)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CharTokenizer":
        d = require_mapping(d)
        kind = d.get("type")
        if kind != "char":
            raise ValueError(f"tokenizer description has type {kind!r}; expected 'char'")
        if "alphabet" not in d:
            raise ValueError("tokenizer description lacks 'alphabet'")
        alphabet = d["alphabet"]
        if not isinstance(alphabet, (str, list, tuple)):
            raise ValueError(f"tokenizer 'alphabet' must be a string or a list, got {type(alphabet).__name__}")
        template = d.get("template")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"tokenizer 'template' must be a string, got {type(template).__name__}")
        if template is not None and d.get("template_sha256") not in (None, template_sha256(template)):
            raise ValueError("tokenizer 'template_sha256' is not the SHA-256 of its 'template': the description was altered")
        return cls(alphabet, bool(d.get("chat", False)), template)

    # ------------------------------------------------------------------ comparison
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return (self._alphabet, self.template) == (other._alphabet, other.template)

    def __hash__(self) -> int:
        return hash(("char", self._alphabet, self.template))

    def __repr__(self) -> str:
        chat = ", chat=True" if self.chat else ""
        return f"CharTokenizer(alphabet={self._alphabet!r}{chat})"
