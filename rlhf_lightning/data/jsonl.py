"""Validated JSONL reading and atomic JSONL writing.

Every problem is a :class:`DataError` naming the file, the 1-based line and the field, e.g.::

    data/prefs.jsonl:7: field 'chosen': expected a non-empty string, got 3

Readers skip blank lines, ignore unknown fields and accept duplicate records.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_lightning.files import atomic_write_text

__all__ = ["DataError", "read_jsonl", "write_jsonl"]


class DataError(ValueError):
    """Bad input data. Attributes ``path``, ``line`` (1-based) and ``field`` are ``None`` where not applicable;
    ``problem`` is the message without the location."""

    def __init__(
        self,
        problem: str,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        location = ""
        if self.path is not None:
            location = self.path if line is None else f"{self.path}:{line}"
        elif line is not None:
            location = f"line {line}"
        parts = [location] if location else []
        if field is not None:
            parts.append(f"field {field!r}")
        parts.append(problem)
        super().__init__(": ".join(parts))

    def __reduce__(self):  # keep the exception picklable (e.g. across worker processes)
        return (type(self), (self.problem, self.path, self.line, self.field))


def _show(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) else repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _type_names(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list", dict: "object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _matches(value: Any, expected: type | tuple[type, ...]) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):  # bool is an int subclass: accept it only where asked for
        return bool in types
    if float in types and isinstance(value, int):  # JSON writes 1.0 as 1 sometimes
        return True
    return isinstance(value, types)


def read_jsonl(
    path: str | os.PathLike[str],
    required: Sequence[str],
    optional: Mapping[str, type | tuple[type, ...]] | None = None,
    *,
    non_empty: bool = True,
) -> list[tuple[int, dict[str, Any]]]:
    """Read ``path`` as JSONL and return ``(line_number, record)`` pairs (1-based line numbers).

    Each record keeps only the ``required`` fields (each must be a string; non-empty after strip when
    ``non_empty``) and those ``optional`` fields present (each of the given type; ``int``/``float`` reject
    booleans and non-finite numbers). Blank lines are skipped, unknown fields dropped, duplicates kept.
    Raises :class:`DataError` naming file, line and field for every problem, and for a file with no records.
    """
    if isinstance(required, str):
        required = (required,)
    optional = dict(optional or {})
    shown_path = str(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError("file not found", shown_path) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a JSONL file", shown_path) from None
    except OSError as e:
        raise DataError(f"cannot open: {e.strerror or e}", shown_path) from None

    records: list[tuple[int, dict[str, Any]]] = []
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", shown_path, lineno) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"invalid JSON: {e.msg} (column {e.colno})", shown_path, lineno
                ) from None
            except RecursionError:
                raise DataError("invalid JSON: nested too deeply", shown_path, lineno) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"expected a JSON object, got {_json_kind(obj)} {_show(obj)}", shown_path, lineno
                )
            record: dict[str, Any] = {}
            for name in required:
                if name not in obj:
                    raise DataError("missing required field", shown_path, lineno, name)
                value = obj[name]
                wanted = "a non-empty string" if non_empty else "a string"
                if not isinstance(value, str):
                    raise DataError(f"expected {wanted}, got {_show(value)}", shown_path, lineno, name)
                if non_empty and not value.strip():
                    raise DataError(f"expected {wanted}, got {_show(value)}", shown_path, lineno, name)
                record[name] = value
            for name, expected in optional.items():
                if name not in obj:
                    continue
                value = obj[name]
                if not _matches(value, expected):
                    raise DataError(
                        f"expected {_type_names(expected)}, got {_show(value)}", shown_path, lineno, name
                    )
                if isinstance(value, float) and not math.isfinite(value):
                    raise DataError(f"expected a finite number, got {_show(value)}", shown_path, lineno, name)
                record[name] = value
            records.append((lineno, record))
    if not records:
        raise DataError("no records (the file is empty or has only blank lines)", shown_path)
    return records


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null"
    return type(value).__name__


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``records`` one JSON object per line, atomically (see `atomic_write_text`).

    Non-finite floats are rejected. Returns the final path.
    """

    def lines():
        for i, rec in enumerate(records):
            if not isinstance(rec, Mapping):
                raise TypeError(f"record {i} is a {type(rec).__name__}, not a mapping")
            yield json.dumps(dict(rec), ensure_ascii=False, allow_nan=False) + "\n"

    return atomic_write_text(path, lines())
