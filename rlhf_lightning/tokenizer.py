"""Character-level tokenizer with BOS/EOS/PAD specials.

Ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``; the characters of the alphabet (sorted, unique) follow.
A prompt is encoded as BOS + text, a completion as text + EOS. The tokenizer is described by plain
JSON-able values (:meth:`CharTokenizer.to_dict`), so it can travel inside a checkpoint's hyperparameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["CharTokenizer", "UnknownCharacterError", "SPECIAL_TOKENS", "load_tokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
_PAD_ID, _BOS_ID, _EOS_ID = 0, 1, 2


def require_text(text: object, where: str = "") -> None:
    """Raise TypeError (prefixed by `where`) unless `text` is a string: what every tokenizer's `encode` checks."""
    if not isinstance(text, str):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}expected a string to encode, got {type(text).__name__}")


class UnknownCharacterError(ValueError):
    """A character that is not in the tokenizer's alphabet.

    Attributes: ``char`` (the character), ``index`` (its position in the text) and ``where``
    (the caller-supplied location, or ``""``).
    """

    def __init__(self, char: str, index: int, where: str = "", alphabet: str = "") -> None:
        self.char = char
        self.index = index
        self.where = where
        self.alphabet = alphabet
        prefix = f"{where}: " if where else ""
        shown = alphabet if len(alphabet) <= 120 else alphabet[:120] + "..."
        message = (
            f"{prefix}unknown character {char!r} at index {index} of the text "
            f"(not in the tokenizer's alphabet {shown!r})"
        )
        super().__init__(message)

    def __reduce__(self):  # keep the exception picklable (e.g. across worker processes)
        return (type(self), (self.char, self.index, self.where, self.alphabet))


class CharTokenizer:
    """Maps characters of a fixed alphabet to ids, after three specials (pad=0, bos=1, eos=2)."""

    def __init__(self, alphabet: Iterable[str]) -> None:
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
        """Ids of ``text``'s characters, no specials. Raises :class:`UnknownCharacterError`."""
        require_text(text, where)
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

    def check(self, text: str, where: str = "") -> None:
        """Raise :class:`UnknownCharacterError` if ``text`` has a character outside the alphabet."""
        self.encode(text, where)

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

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "alphabet": self._alphabet}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CharTokenizer":
        if not isinstance(d, Mapping):
            raise ValueError(f"tokenizer description must be a mapping, got {type(d).__name__}")
        kind = d.get("type")
        if kind != "char":
            raise ValueError(f"tokenizer description has type {kind!r}; expected 'char'")
        if "alphabet" not in d:
            raise ValueError("tokenizer description lacks 'alphabet'")
        alphabet = d["alphabet"]
        if not isinstance(alphabet, (str, list, tuple)):
            raise ValueError(f"tokenizer 'alphabet' must be a string or a list, got {type(alphabet).__name__}")
        return cls(alphabet)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON (via a temporary file renamed into place)."""
        from rlhf_lightning.data.jsonl import atomic_write_text

        atomic_write_text(path, [json.dumps(self.to_dict(), ensure_ascii=False, indent=2), "\n"])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "CharTokenizer":
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: tokenizer file not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid tokenizer JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # ------------------------------------------------------------------ comparison
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self._alphabet == other._alphabet

    def __hash__(self) -> int:
        return hash(("char", self._alphabet))

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self._alphabet!r})"


def load_tokenizer(d: Mapping[str, Any]):
    """A tokenizer from its `to_dict()` description, by `type`: "char" (`CharTokenizer`) or "hf" (`HFTokenizer`)."""
    kind = d.get("type") if isinstance(d, Mapping) else None
    if kind == "hf":
        from rlhf_lightning.hf_tokenizer import HFTokenizer  # imported on use: needs the [hf] extra

        return HFTokenizer.from_dict(d)
    return CharTokenizer.from_dict(d)  # "char", or a clear error naming the unknown type
