"""Reading sources: file types, folders, column mapping, limits, errors that name file and line."""

from __future__ import annotations

import json
import sys
import types

import pytest

from alignkit.config import DataSource
from alignkit.data import DataError, read_source

RECORDS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(5)]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def data_of(rows):
    return [r.data for r in rows]


def test_jsonl(tmp_path):
    rows = read_source(DataSource(str(write_jsonl(tmp_path / "d.jsonl", RECORDS))))
    assert data_of(rows) == RECORDS
    assert [r.index for r in rows] == [1, 2, 3, 4, 5]  # 1-based lines
    assert rows[2].where().endswith("d.jsonl line 3")


@pytest.mark.parametrize("layout", ["list", "data", "columns", "lines"])
def test_json_layouts(tmp_path, layout):
    path = tmp_path / "d.json"
    if layout == "list":
        path.write_text(json.dumps(RECORDS))
    elif layout == "data":
        path.write_text(json.dumps({"data": RECORDS}))
    elif layout == "columns":
        path.write_text(json.dumps({k: [r[k] for r in RECORDS] for k in RECORDS[0]}))
    else:  # JSON Lines saved with a .json name
        write_jsonl(path, RECORDS)
    assert data_of(read_source(DataSource(str(path)))) == RECORDS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 2
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    rows = read_source(DataSource(str(tmp_path / "d.parquet")))
    assert data_of(rows) == records
    assert rows[1].where().endswith("d.parquet row index 1")


def test_csv_and_tsv(tmp_path):
    msgs = [{"role": "user", "content": "hi, you"}, {"role": "assistant", "content": "yo"}]
    import csv

    for name, delim in (("d.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["prompt", "completion", "messages"])
            w.writerow(["a, b", "c\nd", json.dumps(msgs)])
        (row,) = read_source(DataSource(str(tmp_path / name)))
        # message lists stored as JSON in a cell are decoded
        assert row.data == {"prompt": "a, b", "completion": "c\nd", "messages": msgs}


def test_datasets_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    assert data_of(read_source(DataSource(str(tmp_path / "ds")))) == RECORDS

    DatasetDict({"train": Dataset.from_list(RECORDS[:3]), "test": Dataset.from_list(RECORDS[3:])}).save_to_disk(
        str(tmp_path / "dd"))
    assert data_of(read_source(DataSource(str(tmp_path / "dd"), split="test"))) == RECORDS[3:]
    with pytest.raises(DataError, match="no split 'validation'; splits: train, test"):
        read_source(DataSource(str(tmp_path / "dd"), split="validation"))


def test_columns_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "id": i} for i in range(10)])
    rows = read_source(DataSource(str(path), columns={"question": "prompt", "answer": "completion"}, limit=4))
    assert data_of(rows) == [{"id": i, "prompt": "q", "completion": "a"} for i in range(4)]

    with pytest.raises(DataError) as e:
        read_source(DataSource(str(path), columns={"questions": "prompt"}))
    msg = str(e.value)
    assert "'questions'" in msg and "did you mean 'question'" in msg and "columns present: question, answer, id" in msg


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"prompt": "x", "completion": \n' + json.dumps(RECORDS[1]))
    with pytest.raises(DataError) as e:
        read_source(DataSource(str(path)))
    assert "broken.jsonl line 3" in str(e.value) and "not valid JSON" in str(e.value)
    assert e.value.row == 3

    skipped = []
    rows = read_source(DataSource(str(path)), on_bad_row="skip", skipped=skipped)
    assert data_of(rows) == RECORDS[:2] and len(skipped) == 1 and [r.index for r in rows] == [1, 4]


def test_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('[1, 2]\n')
    with pytest.raises(DataError, match="d.jsonl line 1: expected a JSON object"):
        read_source(DataSource(str(path)))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_source(DataSource(str(tmp_path / "nope.jsonl")))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_source(DataSource(str(tmp_path / "d.txt")))


def test_hub_name_not_found_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    def fail(*args, **kwargs):
        raise FileNotFoundError("Dataset 'someone/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="not found locally .* nor loadable from the Hugging Face Hub"):
        read_source(DataSource("someone/nothing"))


def test_named_asset_resolves_first(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "demo.jsonl", RECORDS)
    assets = types.ModuleType("alignkit.assets")
    assets.resolve_data = lambda name: path if name == "alpaca-demo" else None
    monkeypatch.setitem(sys.modules, "alignkit.assets", assets)
    assert data_of(read_source(DataSource("alpaca-demo"))) == RECORDS


def test_gzipped_jsonl(tmp_path):
    import gzip

    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in RECORDS))
    assert data_of(read_source(DataSource(str(tmp_path / "d.jsonl.gz")))) == RECORDS
