"""Character-level tokenizer with BOS/EOS/PAD specials.

Ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``; the characters of the alphabet (sorted, unique) follow.
A prompt is encoded as BOS + text, a completion as text + EOS. The tokenizer is described by plain
JSON-able values (:meth:`CharTokenizer.to_dict`), so it can travel inside a checkpoint's hyperparameters.

>>> tok = CharTokenizer("0123456789")
>>> tok.encode_prompt("12"), tok.decode(tok.encode_completion("12"))
([1, 4, 5], '12')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rlhf_lightning.tokenizer.base import UnknownCharacterError, require_mapping, require_text

__all__ = ["CharTokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
_PAD_ID, _BOS_ID, _EOS_ID = 0, 1, 2


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
        d = require_mapping(d)
        kind = d.get("type")
        if kind != "char":
            raise ValueError(f"tokenizer description has type {kind!r}; expected 'char'")
        if "alphabet" not in d:
            raise ValueError("tokenizer description lacks 'alphabet'")
        alphabet = d["alphabet"]
        if not isinstance(alphabet, (str, list, tuple)):
            raise ValueError(f"tokenizer 'alphabet' must be a string or a list, got {type(alphabet).__name__}")
        return cls(alphabet)

    # ------------------------------------------------------------------ comparison
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self._alphabet == other._alphabet

    def __hash__(self) -> int:
        return hash(("char", self._alphabet))

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self._alphabet!r})"
