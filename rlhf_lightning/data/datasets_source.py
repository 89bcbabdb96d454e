"""Local sources read through the `datasets` library (the `[data]` extra): json, jsonl, parquet, csv and arrow files,
and `save_to_disk` folders. `datasets` itself is imported on first use. Nothing is downloaded: a path that is not a local file or folder is refused as such.

A CSV file is read as text (its cells are strings: answers such as "3" stay strings; it holds flat records only).
Files are converted once into `datasets`' Arrow cache and memory-mapped, as a `save_to_disk` folder is. Rows become
Python objects only when read, through Arrow's own conversion (`pyarrow.Table.to_pylist`) on every path: all of them
in order (`iter_rows`), one by index (`ArrowRows[k]`, through the memory map), or every row of the split streamed in
batches from its Arrow files (`scan`: plain reads, so a pass over a large source leaves none of it resident in the
process). Errors are `DataError`s naming the file, and the row or field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from rlhf_lightning.data.jsonl import DataError

__all__ = ["ArrowRows", "DATASETS_SUFFIXES", "SourceOptions", "open_dataset"]

DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


@dataclass(frozen=True)
class SourceOptions:
    """How a `datasets` source is read: the `split`, a mapping of record fields to the source's columns (e.g.
    {"messages": "conversation"}), and a shuffle seed (None: the source's order)."""

    split: str = "train"
    fields: Mapping[str, str] | None = None
    shuffle_seed: int | None = None


def _import_datasets():
    # local files only: `datasets` must not reach the Hub (set before its import, which reads it)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise DataError("reading this source needs the `datasets` library: pip install 'rlhf-lightning[data]'") from None
    datasets.disable_progress_bars()
    return datasets


class ArrowRows:
    """A memory-mapped `datasets.Dataset` and where it came from: `len`, rows by index (`self[k]`: the row's index in
    the split and the row) in the source's or the shuffled order, and `scan`, every row of the split in its order."""

    def __init__(self, dataset: Any, path: str, indices: Any = None, split: Any = None, columns: Mapping[str, str] | None = None) -> None:
        self.dataset, self.path, self.indices = dataset, path, indices  # indices: the shuffled rows' places in the split
        self.split = dataset if split is None else split  # the split in its own order (columns renamed)
        self.columns = dict(columns or {})  # record field -> the column of the source's files it was renamed from
        self._rows = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> tuple[int, dict[str, Any]]:
        """(row index in the split, row) of the k-th row, read through the memory map alone."""
        return self.row_index(k), self._rows[k].to_pylist()[0]

    def first_row(self) -> dict[str, Any]:
        """The split's first row (in its own order, shuffled or not): what decides a file's form."""
        return self.split.with_format("arrow")[0].to_pylist()[0]

    def row_index(self, k: int) -> int:
        return int(self.indices[k]) if self.indices is not None else int(k)

    def iter_rows(self, batch_rows: int = 1000) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row index, row) in the source's (or the shuffled) order; the index is the row's place in the split."""
        k = 0
        for batch in self._rows.iter(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield self.row_index(k), row
                k += 1

    def scan(self, batch_rows: int = 1000) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row index, row) for every row of the split in its own order, `batch_rows` rows in memory at a time.

        Read from the split's Arrow files with plain reads, not through the memory map: pages of a memory-mapped
        file count in the process's resident memory once touched, so a pass over a source of several GB through
        it would hold the whole file resident. A split whose table is not its files' (none, or transformed in
        memory) is read through its table."""
        files = [f["filename"] for f in self.split.cache_files]
        if not files or _stream_rows(files) != len(self.split):
            yield from enumerate(row for batch in self.split.with_format("arrow").iter(batch_size=batch_rows) for row in batch.to_pylist())
            return
        import pyarrow as pa

        names = self.split.column_names
        sources = [self.columns.get(name, name) for name in names]
        index = 0
        for filename in files:
            with pa.OSFile(filename) as f:
                for batch in pa.ipc.open_stream(f):
                    batch = batch.select(sources).rename_columns(names)
                    for start in range(0, batch.num_rows, batch_rows):
                        for row in batch.slice(start, batch_rows).to_pylist():
                            yield index, row
                            index += 1


def _stream_rows(files: list[str]) -> int:
    """Rows of Arrow stream files (the format of `datasets`' cache files and `save_to_disk` folders), from their
    batches' headers; -1 where one is not a stream file."""
    import pyarrow as pa

    total = 0
    try:
        for filename in files:
            with pa.memory_map(filename) as f:  # batch headers only: the data's pages are never touched
                reader = pa.ipc.open_stream(f)
                total += sum(b.num_rows for b in reader)
    except (OSError, pa.ArrowInvalid):
        return -1
    return total


def open_dataset(path: str | os.PathLike[str], options: SourceOptions) -> ArrowRows:
    """The split `options.split` of a local file or `save_to_disk` folder, its columns renamed by `options.fields`
    (record field -> column) and shuffled by `options.shuffle_seed`."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(
            "no such local file or folder (sources are read offline, from local files and save_to_disk folders only: "
            "nothing is downloaded; download a Hub dataset first and point at the folder)", path=path,
        )
    datasets = _import_datasets()
    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:  # the library raises FileNotFoundError, ValueError, ArrowInvalid ... for broken folders
            raise DataError(f"cannot read as a datasets folder (save_to_disk): {_first_line(e)}", path=path) from None
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    else:
        builder = DATASETS_SUFFIXES.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise DataError(f"unknown file type; expected one of {', '.join(sorted(DATASETS_SUFFIXES))} or a save_to_disk folder", path=path)
        try:
            splits = {"train": datasets.load_dataset(builder, data_files=path, split="train", **_builder_options(datasets, builder, path))}
        except Exception as e:
            raise DataError(f"cannot read as {builder}: {_first_line(e)}", path=path) from None
    if options.split not in splits:
        raise DataError(f"no split {options.split!r}; the source has: {', '.join(sorted(splits))}", path=path, field="split")
    dataset = splits[options.split]
    renamed = {}  # record field -> the files' column
    for name, column in (options.fields or {}).items():
        if column not in dataset.column_names:
            raise DataError(f"no column {column!r} (fields maps {name!r} to it); columns: {', '.join(dataset.column_names)}", path=path, field=name)
        if column != name:
            if name in dataset.column_names:
                dataset = dataset.remove_columns(name)
            dataset = dataset.rename_column(column, name)
            renamed[name] = column
    split, indices = dataset, None
    if options.shuffle_seed is not None:
        import numpy as np

        indices = np.random.default_rng(options.shuffle_seed).permutation(len(dataset))
        dataset = dataset.select(indices)  # an indices mapping over the same memory-mapped table
    return ArrowRows(dataset, path, indices, split, renamed)


def _builder_options(datasets, builder: str, path: str) -> dict[str, Any]:
    """Options of the `datasets` builder reading a file: a CSV file as text; a Parquet file read a row group at a
    time without pre-buffering (Arrow's pre-buffered reads keep what they read: converting a 1 GB file peaked at
    1.2 GB of RSS, 0.3 GB without)."""
    if builder == "csv":
        return {"features": _text_columns(datasets, path), "keep_default_na": False}
    if builder == "parquet":
        import pyarrow.dataset as pds

        return {"fragment_scan_options": pds.ParquetFragmentScanOptions(pre_buffer=False)}
    return {}


def _text_columns(datasets, path: str):
    """Every column of a CSV file as text (a cell such as "3" stays the string "3")."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
