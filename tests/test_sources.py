"""Sources through the `datasets` library: the same records from JSONL, Parquet, CSV, JSON and a `save_to_disk` folder
give identical batches; splits, field mapping, shuffling; and the bad sources' one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.preferences import PreferenceDataModule
from rlhf_lightning.data.preferences.sources import JsonlPairs
from rlhf_lightning.data.prompts import load_prompts
from rlhf_lightning.data.sft import SFTDataModule
from rlhf_lightning.options import ConfigError
from rlhf_lightning.tasks.chat import CHAT_ALPHABET
from rlhf_lightning.tokenizer import CharTokenizer

datasets = pytest.importorskip("datasets", reason="needs the [data] extra")

TOK = CharTokenizer(CHAT_ALPHABET, chat=True)
SYSTEM = {"role": "system", "content": "Solve."}


def conversation(a, b, second=False):
    turns = [SYSTEM, {"role": "user", "content": f"Q: {a}+{b}=\nA:"}, {"role": "assistant", "content": str(a + b)}]
    if second:
        turns += [{"role": "user", "content": f"Q: {b}+{a}=\nA:"}, {"role": "assistant", "content": str(a + b)}]
    return turns


SFT_ROWS = [{"messages": conversation(a, b, second=a % 2 == 0), "group": f"g{a % 2}"} for a, b in [(1, 2), (3, 40), (12, 5), (6, 6), (9, 31)]]
PAIR_ROWS = [
    {"prompt": conversation(a, b)[:2], "chosen": [{"role": "assistant", "content": str(a + b)}], "rejected": [{"role": "assistant", "content": str(a + b + 1)}]}
    for a, b in [(1, 2), (3, 40), (12, 5)]
]


def write_all(folder, rows):
    """The rows as JSONL, Parquet, JSON (one array) and a save_to_disk folder."""
    folder.mkdir(exist_ok=True)
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(folder / "d.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(folder / "disk"))
    return [str(folder / n) for n in ("d.jsonl", "d.parquet", "d.json", "disk")]


def sft_batch(path, **options):
    dm = SFTDataModule(train_file=path, batch_size=8, max_val_prompts=1, tokenizer=TOK, max_length=64, **options)
    dm.setup("fit")
    return dm.train_set.collate([dm.train_set[i] for i in range(len(dm.train_set))])


def test_sft_batches_are_identical_from_every_source(tmp_path):
    batches = [sft_batch(p) for p in write_all(tmp_path, SFT_ROWS)]
    for b in batches[1:]:
        assert b.keys() == batches[0].keys() and all(torch.equal(b[k], batches[0][k]) for k in b)
    assert batches[0]["loss_mask"].sum(1).tolist() == [2, 3, 6, 6, 3]


def test_preference_batches_are_identical_from_every_source(tmp_path):
    def batch(path):
        dm = PreferenceDataModule(JsonlPairs(path, val_file=path), tokenizer=TOK, max_length=64)
        dm.setup("fit")
        return dm.train_set.collate([dm.train_set[i] for i in range(len(dm.train_set))])

    batches = [batch(p) for p in write_all(tmp_path, PAIR_ROWS)]
    for b in batches[1:]:
        assert all(torch.equal(b[k], batches[0][k]) for k in b)


def test_split_fields_and_shuffle(tmp_path):
    rows = [{"conv": r["messages"], "kind": r["group"]} for r in SFT_ROWS]
    disk = write_all(tmp_path, rows)[3]
    plain = sft_batch(write_all(tmp_path / "plain", SFT_ROWS)[3])
    mapped = sft_batch(disk, fields={"messages": "conv", "group": "kind"})
    assert torch.equal(mapped["input_ids"], plain["input_ids"])
    assert len(sft_batch(disk, split="test", fields={"messages": "conv"})["input_ids"]) == 1
    shuffled = sft_batch(disk, fields={"messages": "conv"}, shuffle_seed=3)
    assert sorted(map(tuple, shuffled["input_ids"].tolist())) == sorted(map(tuple, plain["input_ids"].tolist()))
    assert not torch.equal(shuffled["input_ids"], plain["input_ids"])
    # CSV holds flat records, every cell read as text
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,completion\n"Q: 1+2=\nA:",3\n')
    assert [(r.prompt, r.gold, r.where) for r in load_prompts(path=str(csv))] == [("Q: 1+2=\nA:", "3", f"{csv}:row 0")]


def test_bad_sources_name_the_file_and_row(tmp_path):
    disk = write_all(tmp_path, SFT_ROWS)[3]
    with pytest.raises(DataError, match=r"disk: field 'split': no split 'validation'; the source has: test, train$"):
        sft_batch(disk, split="validation")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset_info.json").write_text("{")
    with pytest.raises(DataError, match=r"broken: cannot read as a datasets folder \(save_to_disk\): "):
        sft_batch(str(broken))
    with pytest.raises(DataError, match=r"org/name.parquet: no such local file or folder \(sources are read offline.*nothing is downloaded"):
        sft_batch("org/name.parquet")
    wrong = tmp_path / "wrong.parquet"
    datasets.Dataset.from_list([{"prompt": "Q: 1+2=\nA:", "completion": 3}]).to_parquet(str(wrong))
    with pytest.raises(DataError, match=r"wrong.parquet:row 0: field 'completion': expected a non-empty string, got 3$"):
        sft_batch(str(wrong))
    messages_as_text = tmp_path / "text.parquet"
    datasets.Dataset.from_list([{"messages": "hello"}]).to_parquet(str(messages_as_text))
    with pytest.raises(DataError, match=r"text.parquet:row 0: field 'messages': expected a list of messages"):
        sft_batch(str(messages_as_text))
    bad_role = tmp_path / "role.parquet"
    datasets.Dataset.from_list([{"messages": [{"role": "bot", "content": "x"}]}]).to_parquet(str(bad_role))
    with pytest.raises(DataError, match=r"role.parquet:row 0: field 'messages\[0\].role': unknown role \"bot\""):
        sft_batch(str(bad_role))
    with pytest.raises(DataError, match=r"disk: field 'nope': no column 'x'"):
        sft_batch(disk, fields={"nope": "x"})
    with pytest.raises(ConfigError, match=r"data.init_args.shuffle_seed"):
        SFTDataModule(shuffle_seed=-1)


def test_a_datasets_source_stays_in_its_arrow_table(tmp_path, monkeypatch):
    """SFT on a `datasets` source keeps no Python list of its rows: setup streams each row once from the split's Arrow
    files (never through the memory map), keeping its token count; an example is read and tokenized when drawn, and
    is the one the strict JSONL path tokenizes up front, in the shuffled order and with the stratum weights too."""
    from rlhf_lightning.data.datasets_source import ArrowRows
    from rlhf_lightning.data.sft import ArrowSFTDataset, SFTDataset

    rows = [{"conv": r["messages"], "kind": r["group"]} for r in SFT_ROWS] * 3
    jsonl, _, _, folder = write_all(tmp_path, [{"messages": r["conv"], "group": r["kind"]} for r in rows])
    write_all(tmp_path / "mapped", rows)
    mapped = str(tmp_path / "mapped" / "disk")
    touched = []
    read = ArrowRows.__getitem__
    monkeypatch.setattr(ArrowRows, "__getitem__", lambda self, k: touched.append(k) or read(self, k))
    options = dict(fields={"messages": "conv", "group": "kind"}, stratum_weights={"g0": 3.0}, batch_size=4, max_val_prompts=1)
    lazy = SFTDataModule(train_file=mapped, shuffle_seed=5, tokenizer=TOK, max_length=64, **options)
    lazy.setup("fit")
    assert isinstance(lazy.train_set, ArrowSFTDataset) and touched == []  # checked by streaming, nothing read by index
    assert lazy.train_set.lengths.tolist() == [len(SFTDataset(TOK, [(r["conv"], "x")], 64)[0][0]) for r in rows]
    eager = SFTDataModule(train_file=jsonl, tokenizer=TOK, max_length=64, **{**options, "fields": None})
    eager.setup("fit")
    assert isinstance(eager.train_set, SFTDataset)
    order = lazy.train_set.rows.table.indices.tolist()
    assert sorted(order) == list(range(len(rows))) and order != sorted(order)
    assert [lazy.train_set[k] for k in range(len(rows))] == [eager.train_set[i] for i in order]
    assert touched == list(range(len(rows)))
    assert torch.equal(lazy.train_sampler.weights, eager.train_sampler.weights[order])
    assert sorted(set(lazy.train_sampler.weights.tolist())) == [1.0, 3.0]
    # a plain source (no shuffle, no field mapping) and a folder read the same
    plain = SFTDataModule(train_file=folder, tokenizer=TOK, max_length=64, **{**options, "fields": None})
    plain.setup("fit")
    assert [plain.train_set[k] for k in range(len(rows))] == [eager.train_set[i] for i in range(len(rows))]


def test_streaming_a_split_reads_its_files_as_the_table_does(tmp_path):
    from rlhf_lightning.data.datasets_source import ArrowRows, SourceOptions, open_dataset

    rows = [{"a": i, "b": f"x{i}", "c": [i, i + 1]} for i in range(2500)]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds, "other": ds.select(range(7))}).save_to_disk(str(tmp_path / "d"), max_shard_size="20KB")
    table = open_dataset(str(tmp_path / "d"), SourceOptions(fields={"z": "b"}, shuffle_seed=1))
    assert len(table.split.cache_files) > 1  # several shards, streamed in order
    streamed = list(table.scan(batch_rows=300))
    assert streamed == [(i, {"a": i, "z": f"x{i}", "c": [i, i + 1]}) for i in range(2500)]
    assert [table[k] for k in (0, 1, 2499)] == [(int(table.indices[k]), streamed[int(table.indices[k])][1]) for k in (0, 1, 2499)]
    assert list(table.iter_rows()) == [table[k] for k in range(len(table))]
    # a split with no files of its own (in memory, or rows selected from its files) is read through its table
    assert ArrowRows(ds, "memory").split.cache_files == [] and list(ArrowRows(ds.select([5, 3]), "memory").scan()) == [(0, rows[5]), (1, rows[3])]
    on_disk = open_dataset(str(tmp_path / "d"), SourceOptions()).split.select([9, 4])
    assert list(ArrowRows(on_disk, "d").scan()) == [(0, rows[9]), (1, rows[4])]
