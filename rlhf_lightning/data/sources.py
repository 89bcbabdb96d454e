"""Where a DataModule's records come from: a JSONL file (the strict reader, `file:line` in errors) or a local
`datasets` source (json, jsonl, parquet, csv files and `save_to_disk` folders; the `[data]` extra; `file:row N`
in errors), in flat or conversational form, detected per file from its first record.

`read_rows(path, spec)` returns `Rows`: whether the file is conversational, and `(where, record)` pairs with the
spec's fields only, of the spec's types. A `datasets` source is read through Arrow: a Parquet file or a
`save_to_disk` folder is memory-mapped, and its rows become Python objects one at a time (then all held in `Rows`).
`LazyRows` keeps a `datasets` source's rows in the memory-mapped table instead and checks a row when it is read
(SFT's training files, which may be larger than memory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlhf_lightning.data.datasets_source import DATASETS_SUFFIXES, SourceOptions, open_dataset
from rlhf_lightning.data.jsonl import DataError, _matches, _show, _type_names, read_jsonl

__all__ = ["LazyRows", "RecordSpec", "Rows", "SourceOptions", "check_row", "data_error", "read_rows", "through_datasets"]


@dataclass(frozen=True)
class RecordSpec:
    """The fields of one kind of record: flat (strings) and conversational (lists of messages where a field is one).

    `flat_required` are non-empty strings (strings only, with `non_empty=False`); `optional` fields may appear in
    either form; `chat_required` must be present in a conversational record (one of them, for `chat_any`)."""

    flat_required: tuple[str, ...]
    chat_required: tuple[str, ...]
    optional: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)
    chat_fields: tuple[str, ...] = ()  # fields whose list value marks a conversational record
    chat_any: bool = False
    non_empty: bool = True


@dataclass
class Rows:
    conversational: bool
    rows: list[tuple[str, dict[str, Any]]]


def data_error(problem: str, where: str, field: str | None = None) -> DataError:
    """A `DataError` at a row's `where`: "file:line" keeps the file and the line apart (as the JSONL reader's errors
    do), "file:row N" is the location as it is."""
    path, _, line = where.rpartition(":")
    return DataError(problem, path, int(line), field) if path and line.isdigit() else DataError(problem, where, None, field)


def is_datasets_source(path: str | os.PathLike[str]) -> bool:
    """A folder or a non-JSONL file of a format `datasets` reads (JSONL files keep the strict reader)."""
    path = str(path)
    return os.path.isdir(path) or os.path.splitext(path)[1].lower() in set(DATASETS_SUFFIXES) - {".jsonl"}


def through_datasets(path: str | os.PathLike[str], options: SourceOptions) -> bool:
    """Whether `path` is read through `datasets`: a `datasets` source, or a JSONL file with `fields` or
    `shuffle_seed` (options only `datasets` applies)."""
    return is_datasets_source(path) or bool(options.fields) or options.shuffle_seed is not None


def read_rows(path: str | os.PathLike[str], spec: RecordSpec, options: SourceOptions | None = None) -> Rows:
    """The records of `path`: JSONL through the strict reader, anything else through `datasets`."""
    options = options or SourceOptions()
    if through_datasets(path, options):
        table = open_dataset(path, options)
        return _check_rows(str(path), spec, ((f"{path}:row {i}", r) for i, r in table.iter_rows()), typed=False)
    _check_file_split(path, options)
    if _first_is_conversational(path, spec):
        rows = read_jsonl(path, required=(), optional={**spec.optional, **{k: (str, list) for k in spec.chat_required + spec.chat_fields}})
        return _check_rows(str(path), spec, ((f"{path}:{n}", r) for n, r in rows), typed=True, conversational=True)
    rows = read_jsonl(path, required=spec.flat_required, optional=spec.optional, non_empty=spec.non_empty)
    return Rows(False, [(f"{path}:{n}", r) for n, r in rows])


def _check_file_split(path: str | os.PathLike[str], options: SourceOptions) -> None:
    """A JSONL file read by the strict reader is one split, `train`: naming another is refused, as `datasets`
    sources refuse a split they do not have."""
    if options.split != "train":
        raise DataError(f"no split {options.split!r}; the source has: train (a file is one split)", path=str(path), field="split")


class LazyRows:
    """The records of a `datasets` source left in its memory-mapped Arrow table: `len`, `self[k]` -> (where, record)
    of the k-th row (in the shuffled order with `shuffle_seed`), and `scan()`, every row of the split in its own order,
    streamed. Each row is checked as `read_rows` checks it, when it is read; the form (flat or conversational) is
    the split's first row's."""

    def __init__(self, path: str | os.PathLike[str], spec: RecordSpec, options: SourceOptions | None = None) -> None:
        self.path, self.spec = str(path), spec
        self.table = open_dataset(path, options or SourceOptions())
        if len(self.table) == 0:
            raise DataError("no records", path=self.path)
        self.conversational = _conversational(self.table.first_row(), spec)

    def __len__(self) -> int:
        return len(self.table)

    def where(self, index: int) -> str:
        """A row's location in errors, from its index in the split."""
        return f"{self.path}:row {index}"

    def __getitem__(self, k: int) -> tuple[str, dict[str, Any]]:
        index, raw = self.table[k]
        return self.where(index), check_row(self.spec, self.where(index), raw, self.conversational)

    def scan(self, batch_rows: int = 1000) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """(row index in the split, where, record) of every row, in the split's order."""
        for index, raw in self.table.scan(batch_rows):
            yield index, self.where(index), check_row(self.spec, self.where(index), raw, self.conversational)


def _first_is_conversational(path: str | os.PathLike[str], spec: RecordSpec) -> bool:
    """Whether the first record of a JSONL file has a list in a conversational field (False on anything the strict
    reader will report)."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    obj = json.loads(raw.decode("utf-8-sig"))
                    return isinstance(obj, dict) and _conversational(obj, spec)
    except (OSError, ValueError):
        return False
    return False


def _conversational(record: Mapping[str, Any], spec: RecordSpec) -> bool:
    """A list in a conversational field, or a conversational field (e.g. `messages`) in place of the flat ones."""
    chat = [k for k in spec.chat_required + spec.chat_fields if k not in spec.flat_required]
    if any(isinstance(record.get(k), (list, tuple)) for k in spec.chat_required + spec.chat_fields):
        return True
    return any(record.get(k) is not None for k in chat) and not all(record.get(k) is not None for k in spec.flat_required)


def _check_rows(path: str, spec: RecordSpec, rows: Iterator[tuple[str, dict]], typed: bool, conversational: bool | None = None) -> Rows:
    """Every row of the file's form (its first row's), with the spec's fields only; `typed`: the reader checked the
    optional fields' types already."""
    out: list[tuple[str, dict[str, Any]]] = []
    for where, raw in rows:
        if conversational is None:
            conversational = _conversational(raw, spec)
        out.append((where, check_row(spec, where, raw, conversational, typed)))
    if not out:
        raise DataError("no records", path=path)
    return Rows(bool(conversational), out)


def check_row(spec: RecordSpec, where: str, raw: Mapping[str, Any], conversational: bool, typed: bool = False) -> dict[str, Any]:
    """A row as a record of the spec's fields only, of the spec's types, in the file's form (`conversational`);
    `typed`: the reader checked the optional fields' types already."""
    wanted = spec.chat_required if conversational else spec.flat_required
    record: dict[str, Any] = {}
    present = [name for name in wanted if raw.get(name) is not None]
    if spec.chat_any and conversational:
        if not present:
            raise DataError(f"missing required field (one of {', '.join(wanted)})", path=where, field=wanted[0])
    else:
        for name in wanted:
            if raw.get(name) is None:
                raise DataError("missing required field", path=where, field=name)
    for name in present:
        value = raw[name]
        if conversational and name in spec.chat_required + spec.chat_fields:
            value = _message_list(value, where, name)
        elif not isinstance(value, str) or spec.non_empty and not value.strip():
            kind = "a non-empty string" if spec.non_empty else "a string"
            hint = " (the file's first record is flat)" if isinstance(value, (list, tuple)) else ""
            raise DataError(f"expected {kind}{hint}, got {_show(value)}", path=where, field=name)
        record[name] = value
    for name in spec.chat_fields if conversational else ():
        if raw.get(name) is not None:
            record[name] = _message_list(raw[name], where, name)
    for name, expected in spec.optional.items():
        value = raw.get(name)
        if value is None:
            continue
        if not typed and not _matches(value, expected):
            raise DataError(f"expected {_type_names(expected)}, got {_show(value)}", path=where, field=name)
        record[name] = value
    return record


def _message_list(value: Any, where: str, name: str) -> list:
    """A conversational field's messages as a list of dicts, or the one-line error of a file whose first record is
    conversational."""
    if not isinstance(value, (list, tuple)):
        raise DataError(f"expected a list of messages (the file's first record is conversational), got {_show(value)}", path=where, field=name)
    return [dict(m) if isinstance(m, Mapping) else m for m in value]
