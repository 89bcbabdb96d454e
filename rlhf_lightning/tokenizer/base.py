"""What every tokenizer is: the `Tokenizer` protocol, and the errors and checks tokenizers share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["Tokenizer", "UnknownCharacterError", "require_text"]


@runtime_checkable
class Tokenizer(Protocol):
    """Text in, ids out. A prompt is BOS + text, a completion is text + EOS; `decode` stops at the first EOS.

    `to_dict()` is plain JSON-able values (it travels inside checkpoints); `load_tokenizer` rebuilds from it.
    """

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, where: str = "") -> list[int]: ...

    def encode_prompt(self, text: str, where: str = "") -> list[int]: ...

    def encode_completion(self, text: str, where: str = "") -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def require_mapping(d: object) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f"tokenizer description must be a mapping, got {type(d).__name__}")
    return d


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


