"""Reading sources: file types, folders, column mapping, limits, errors that name file and line."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

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
    path = tmp_path / "d.json"
    path.write_text(json.dumps([RECORDS[0], "oops", RECORDS[1]]))
    with pytest.raises(DataError, match="d.json row index 1: expected a JSON object, got str"):
        read_source(DataSource(str(path)))
    skipped = []
    rows = read_source(DataSource(str(path)), on_bad_row="skip", skipped=skipped)
    assert [r.index for r in rows] == [0, 2] and [e.row for e in skipped] == [1]


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


# ---- CSV: quoting rule, field counts, header --------------------------------------------------------

def read(path, on_bad_row="error", **source):
    skipped = []
    rows = read_source(DataSource(str(path), **source), on_bad_row=on_bad_row, skipped=skipped)
    return rows, skipped


def test_csv_multiline_quoted_fields_are_rows_at_their_first_line(tmp_path):
    import csv

    records = [["1", "Dear Bob,\nthanks, see you", 'she said "hi"'], ["2", "one line", "x"],
               ["3", "a\r\nb", "5\" screen"]]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "note"])
        w.writerows(records)
    rows, _ = read(path)
    assert [list(r.data.values()) for r in rows] == records
    assert [r.where() for r in rows] == [f"{path} line 2", f"{path} line 4", f"{path} line 5"]


@pytest.mark.parametrize("text, line, message", [
    # the stray quote never closes: every later row would become part of one field
    ('id,text,label\n1,ok,pos\n2,"hello, world,pos\n3,fine,neg\n4,ok,pos\n', 3,
     "the quote opening the field at column 3 never closes, so the rest of the file (2 more lines)"),
    # it closes at a later field's opening quote, which is followed by text
    ('id,text,label\n1,"hello, world,pos\n2,fine,neg\n3,"ok",pos\n', 2,
     "the field quoted at column 3 closes only on line 4"),
    # on one line: text after a closing quote (non-strict CSV would silently drop the quotes)
    ('id,text,label\n1,"5" screen,pos\n', 2, "the field quoted at column 3 has text after its closing quote"),
    # it closes cleanly but the row has the wrong number of fields
    ('id,text,label\n1,"hello\n2,fine,neg\n3,5",pos,x\n4,a,b\n', 2, "has 4 fields but the header has 3 and spans "
                                                                    "lines 2-4: the field quoted at line 2, column 3"),
])
def test_csv_stray_quote_names_where_it_opened_even_when_skipping(tmp_path, text, line, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as e:
            read(path, on_bad_row=mode)
        assert str(e.value).startswith(f"{path} line {line}: ") and message in str(e.value)
        assert 'double the quote (e.g. "5"" screen"' in str(e.value) and e.value.row == line


def test_csv_wrong_field_count_on_one_line_is_a_row_error(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("a\tb\n1\t2\t3\n4\t5\n\n6\n")
    with pytest.raises(DataError, match=r"d.tsv line 2: the row has 3 fields but the header has 2. Quote fields "
                                        r"that contain the delimiter \('\\t'\)"):
        read(path)
    rows, skipped = read(path, on_bad_row="skip")
    assert [r.data for r in rows] == [{"a": "4", "b": "5"}]  # the blank line 4 is not a row
    assert [e.row for e in skipped] == [2, 5]


def test_csv_duplicate_header_and_limit(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("q,a,q\n1,2,3\n")
    with pytest.raises(DataError, match="d.csv line 1, field 'q': column 'q' appears twice in the header"):
        read(path)
    path.write_text("q,a\n" + "".join(f"{i},x\n" for i in range(5)) + "bad\n")
    rows, skipped = read(path, on_bad_row="skip", limit=3)
    assert [r.data["q"] for r in rows] == ["0", "1", "2"] and not skipped  # rows past the limit are not read


def test_csv_byte_order_mark_and_blank_lines_before_the_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffq,a\n1,2\n".encode())
    assert read(path)[0][0].data == {"q": "1", "a": "2"}
    path.write_text("\n\nq,a\n1,2\n")
    (row,), _ = read(path)
    assert row.data == {"q": "1", "a": "2"} and row.index == 4


# ---- encodings -----------------------------------------------------------------------------------

def test_non_utf8_jsonl_line_names_line_column_and_byte_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(RECORDS[0]).encode() + b"\n"
    path.write_bytes(good + b'{"prompt": "caf\xe9", "completion": "x"}\n' + good)
    with pytest.raises(DataError) as e:
        read(path)
    assert str(e.value).startswith(f"{path} line 2: not UTF-8 text: byte 0xe9 at column 16 (byte offset "
                                   f"{len(good) + 15}) cannot be decoded. Re-encode the file as UTF-8")
    rows, skipped = read(path, on_bad_row="skip")
    assert [r.index for r in rows] == [1, 3] and [e.row for e in skipped] == [2]


@pytest.mark.parametrize("name", ["d.json", "d.csv", "d.json.gz", "d.csv.gz"])
def test_non_utf8_whole_file_is_fatal_even_when_skipping(tmp_path, name):
    import gzip

    raw = b'[{"prompt": "ok",\n  "completion": "caf\xe9"}]' if ".json" in name else b"prompt,completion\nok,caf\xe9\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(DataError) as e:
        read(path, on_bad_row="skip")
    assert f"{path} line 2: not UTF-8 text: byte 0xe9" in str(e.value)
    assert "on_bad_row=skip cannot drop only part of it" in str(e.value)


def test_utf16_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode("utf-16"))
    with pytest.raises(DataError, match="d.jsonl: the file is UTF-16 .* `iconv -f utf-16 -t utf-8"):
        read(path, on_bad_row="skip")


# ---- JSON: duplicate keys and error positions ------------------------------------------------------

def test_duplicate_keys_name_line_column_and_key(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(RECORDS[0]) + '\n{"prompt": "a", "completion": "b", "prompt": "c"}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 2: duplicate key 'prompt' at column 36 \(JSON readers keep "
                                        "only its last value\\)"):
        read(jsonl)
    assert [r.index for r in read(jsonl, on_bad_row="skip")[0]] == [1]

    whole = tmp_path / "d.json"
    whole.write_text('[\n  {"messages": [{"role": "user", "content": "a"},\n'
                     '                {"role": "assistant", "content": "b", "role": "user"}]}\n]\n')
    with pytest.raises(DataError, match="d.json line 3: duplicate key 'role' at column 55"):
        read(whole, on_bad_row="skip")
    # the same key in different objects is fine
    whole.write_text(json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]))
    assert len(read(whole)[0]) == 1


@pytest.mark.parametrize("text, message", [
    # a line cut short: the error is at the end of that line, not "column 1" of a next one
    ('{"prompt": "x", "completion": \n', "line 1: not valid JSON (Expecting value) at the end of the line"),
    ('{"prompt": "x", "completion": "y"}\n{"prompt": "x" "completion": "y"}\n',
     "line 2: not valid JSON (Expecting ',' delimiter) at column 16"),
])
def test_jsonl_error_positions(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{path} {message}")):
        read(path)


@pytest.mark.parametrize("text, message", [
    # a missing comma between records belongs at the end of the first one, not the start of the next
    ('[\n  {"a": 1}\n  {"a": 2}\n]\n', "line 2: not valid JSON (Expecting ',' delimiter) at column 11"),
    # a file cut short: the last line with content, not a line after the trailing newline
    ('[\n  {"a": 1},\n', "line 2: not valid JSON (Expecting value) at column 12, the end of the file"),
    ('[\n  {"a": 1}\n]\n]\n', "line 4: not valid JSON (extra data after the first value) at column 1"),
    ('[{"a": "x\ty"}]', "line 1: not valid JSON (Invalid control character at) at column 10"),
])
def test_whole_file_json_error_positions(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{path} {message}")):
        read(path, on_bad_row="skip")


def test_json_nested_too_deeply_is_a_data_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        read(path)


# ---- gzip variants, Parquet, folders of files ----------------------------------------------------

@pytest.mark.parametrize("name", ["d.json.gz", "d.jsonl.gz", "d.csv.gz", "d.tsv.gz", "d.parquet.gz"])
def test_gzipped_variants(tmp_path, name):
    import gzip
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = name.split(".")[1]
    if kind == "json":
        raw = json.dumps(RECORDS).encode()
    elif kind == "jsonl":
        raw = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()
    elif kind == "parquet":
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(RECORDS), buffer)
        raw = buffer.getvalue()
    else:
        sep = "\t" if kind == "tsv" else ","
        raw = ("prompt" + sep + "completion\n" + "".join(f"{r['prompt']}{sep}{r['completion']}\n" for r in RECORDS)).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw))
    assert data_of(read(path)[0]) == RECORDS
    path.write_bytes(gzip.compress(raw)[:-20])  # truncated
    with pytest.raises(DataError, match=f"{name}: cannot decompress the file"):
        read(path, on_bad_row="skip")


def test_damaged_parquet_and_duplicate_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="d.parquet: cannot read Parquet"):
        read(path)
    pq.write_table(pa.table([[1], [2]], names=["a", "a"]), path)
    with pytest.raises(DataError, match="d.parquet, field 'a': column 'a' appears twice"):
        read(path)


def test_folder_of_data_files_uses_alignkit_readers(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", RECORDS[:3])
    write_jsonl(folder / "test.jsonl", RECORDS[3:])
    assert data_of(read(folder)[0]) == RECORDS[:3]
    rows, _ = read(folder, split="test", limit=1)
    assert data_of(rows) == RECORDS[3:4] and rows[0].where() == f"{folder / 'test.jsonl'} line 1"
    with pytest.raises(DataError, match="no data files for split 'validation'; splits found: train, test"):
        read(folder, split="validation")
    (folder / "test.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=re.escape(f"{folder / 'test.jsonl'} line 2: not valid JSON")):
        read(folder, split="test")


def test_columns_never_overwrite_a_column_that_stays(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "prompt": "old", "answer": "a"}])
    with pytest.raises(DataError, match="`columns` renames 'question' -> 'prompt', but the data already has a column "
                                        "'prompt', whose values would be lost"):
        read(path, columns={"question": "prompt"})
    rows, _ = read(path, columns={"question": "prompt", "prompt": "context"})  # a swap-out is fine
    assert rows[0].data == {"answer": "a", "prompt": "q", "context": "old"}
    with pytest.raises(DataError, match="`columns` renames several columns to 'prompt'"):
        read(path, columns={"question": "prompt", "answer": "prompt"})


# ---- LLaMA-Factory dataset_info.json -------------------------------------------------------------
# tests/data/llamafactory holds a few records copied from LLaMA-Factory 0.9.5's demo data and the real
# dataset_info.json entries for them.

LF_DIR = Path(__file__).parent / "llamafactory"


@pytest.mark.parametrize("name, rows_read, first", [
    ("alpaca_en_demo", 2, {"messages": [{"role": "user", "content": "Sum up the numbers.\n3, 2, 5"},
                                        {"role": "assistant", "content": "The sum of the numbers is 10."}]}),
    ("c4_demo", 2, {"text": "Y.M. Molding Industry Mfg. Inc."}),
    ("kto_en_demo", 2, {"messages": [{"role": "user", "content": "What is the result of 660-549695? Only respond "
                                                                 "with math and no words."},
                                     {"role": "assistant", "content": "660 - 549695 = -549035"}], "label": True}),
])
def test_dataset_info_entries(name, rows_read, first):
    rows, skipped = read(f"{LF_DIR / 'dataset_info.json'}#{name}")
    assert len(rows) == rows_read and not skipped and rows[0].data == first
    assert rows[0].where().startswith(str(LF_DIR / ""))  # rows point at the data file itself


def test_dataset_info_sharegpt_ranking_and_folder_syntax():
    (rows, _), (same, _) = read(f"{LF_DIR / 'dataset_info.json'}#dpo_en_demo"), read(f"{LF_DIR}#dpo_en_demo")
    assert data_of(rows) == data_of(same)
    assert rows[0].data["prompt"][0] == {"role": "system", "content": "You are a helpful assistant, who always "
                                         "provide explanation. Think like you are answering to a five year old."}
    assert rows[0].data["chosen"][0]["role"] == "assistant" and len(rows[0].data["chosen"]) == 1


def test_dataset_info_tool_rows_are_counted_skips():
    with pytest.raises(DataError, match=r"glaive_toolcall_en_demo.json row index 0, field 'tools': tool "
                                        "descriptions are not supported"):
        read(f"{LF_DIR}#glaive_toolcall_en_demo")
    rows, skipped = read(f"{LF_DIR}#glaive_toolcall_en_demo", on_bad_row="skip")
    assert [r.index for r in rows] == [1] and [e.row for e in skipped] == [0]  # tools "[]" means none


def write_registry(tmp_path, entry, records=None):
    (tmp_path / "data.json").write_text(json.dumps(records or [{"instruction": "q", "output": "a"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "data.json", **entry}}))
    return f"{tmp_path}#mine"


@pytest.mark.parametrize("entry, message", [
    ({"num_samples": 10}, "field 'num_samples': num_samples is not supported. Use `limit:`"),
    ({"ms_hub_url": "x/y"}, "ModelScope datasets ('ms_hub_url') are not supported"),
    ({"colums": {}}, "unknown entry key 'colums'. did you mean 'columns'?"),
    ({"columns": {"prompt": "instruction", "image": "img"}}, "unknown column 'image'. did you mean 'images'?"),
    ({"columns": {"messages": "conversations", "images": "images"}, "formatting": "sharegpt"},
     "multimodal columns (images) are not supported"),
    ({"formatting": "chatml"}, "formatting 'chatml' is not one of alpaca, sharegpt, openai"),
])
def test_dataset_info_entry_errors(tmp_path, entry, message):
    with pytest.raises(DataError, match=re.escape(message)):
        read(write_registry(tmp_path, entry))


def test_dataset_info_path_errors(tmp_path):
    path = write_registry(tmp_path, {})
    with pytest.raises(DataError, match=r"no dataset 'mien' \(did you mean 'mine'\?\); datasets in it: mine"):
        read(path.replace("#mine", "#mien"))
    with pytest.raises(DataError, match="no dataset name after '#'"):
        read(path.replace("#mine", "#"))
    with pytest.raises(DataError, match=r"nowhere#mine: no such file: .*nowhere\. Name a LLaMA-Factory registry"):
        read(f"{tmp_path}/nowhere#mine")
    with pytest.raises(DataError, match="`columns` cannot be combined with a dataset_info.json entry"):
        read(path, columns={"a": "b"})
