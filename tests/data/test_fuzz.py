"""Fuzzing the readers: whatever a file holds, only DataError escapes, and no row is lost silently (rows
read = rows returned + rows skipped; through build_datasets, rows_read = rows_used + skipped per source).

Each test draws a bounded number of examples with a deadline, so the whole file runs in seconds.
"""

from __future__ import annotations

import csv
import gzip
import io
import json

import pyarrow  # noqa: F401  (imported once here, so the first example's deadline does not pay for it)
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.config import DataConfig, DataSource
from alignkit.data import DataError, build_datasets, read_source
from alignkit.testing import tiny_tokenizer

FAST = settings(max_examples=40, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

FIELDS = ["messages", "prompt", "completion", "chosen", "rejected", "label", "text", "role", "content"]
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=3),
                           max_leaves=8)
records = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=4)


def no_newline(raw: bytes) -> bytes:
    return raw.replace(b"\n", b" ")


# One JSONL line: a record, any JSON value, any text or any bytes.
jsonl_lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=30).map(lambda t: t.encode()),
    st.binary(max_size=30),
).map(no_newline)


def read(path, on_bad_row):
    skipped: list[DataError] = []
    rows = read_source(DataSource(str(path)), on_bad_row=on_bad_row, skipped=skipped)
    return rows, skipped


def write(path, raw: bytes):
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def nonblank_lines(lines: list[bytes]) -> int:
    first = [lines[0].removeprefix(b"\xef\xbb\xbf")] if lines else []  # a UTF-8 byte-order mark is not content
    return sum(bool(line.strip()) for line in first + lines[1:])


@FAST
@given(lines=st.lists(jsonl_lines, max_size=8), name=st.sampled_from(["d.jsonl", "d.jsonl.gz", "d.json"]))
def test_jsonl_every_line_is_a_row_or_a_skip(tmp_path, lines, name):
    path = write(tmp_path / name, b"\n".join(lines))
    expected = nonblank_lines(lines)
    try:
        rows, skipped = read(path, "skip")
    except DataError:  # fatal problems: a UTF-16 file, or (.json) a document that is not JSON Lines
        return
    if name != "d.json" or len(lines) > 1:
        assert len(rows) + len(skipped) == expected
    try:
        rows, _ = read(path, "error")
    except DataError:
        return
    assert name == "d.json" or len(rows) == expected


json_documents = st.one_of(
    st.lists(records, max_size=5).map(json.dumps),  # a list of records
    st.lists(records | json_values, max_size=5).map(json.dumps),  # a list of records and other values
    st.dictionaries(st.sampled_from(FIELDS), st.lists(json_values, min_size=2, max_size=2), max_size=3).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=40),
)


@FAST
@given(document=json_documents, cut=st.integers(0, 60), junk=st.binary(max_size=3),
       name=st.sampled_from(["d.json", "d.json.gz"]))
def test_json_documents_only_data_errors(tmp_path, document, cut, junk, name):
    raw = document.encode()
    raw = raw[:cut] + junk + raw[cut:] if junk else raw
    write(tmp_path / name, raw)
    try:
        rows, skipped = read(tmp_path / name, "skip")
    except DataError:
        return
    try:
        parsed = json.loads(raw)  # it read, so it is JSON without duplicate keys: the rows are its records
    except ValueError:  # JSON Lines saved as .json: every line is a row or a skip
        assert len(rows) + len(skipped) == nonblank_lines(raw.split(b"\n"))
        return
    if isinstance(parsed, list):  # every element is a row, or a skip when it is not an object
        assert [r.data for r in rows] == [x for x in parsed if isinstance(x, dict)]
        assert len(rows) + len(skipped) == len(parsed)
    else:
        assert not skipped


@FAST
@given(record=records.filter(bool), jsonl=st.booleans())
def test_duplicate_keys_are_always_named(tmp_path, record, jsonl):
    key = next(iter(record))
    text = json.dumps(record)[:-1] + f", {json.dumps(key)}: 0}}"
    path = tmp_path / ("d.jsonl" if jsonl else "d.json")
    path.write_text(text if jsonl else f"[\n{text}\n]")
    with pytest.raises(DataError) as e:
        read(path, "error")
    assert f"line {1 if jsonl else 2}: duplicate key {key!r}" in str(e.value)


# CSV cells: any text, including quotes, delimiters and line breaks (but not a JSON message list, which
# alignkit decodes on purpose).
cells = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12).filter(
    lambda c: not c.lstrip().startswith("[{"))


@st.composite
def tables(draw):
    header = draw(st.lists(cells.filter(lambda c: not c.startswith("\ufeff")), min_size=1, max_size=4, unique=True))
    body = draw(st.lists(st.lists(cells, min_size=len(header), max_size=len(header)), max_size=6))
    return header, body


def csv_text(header, body, delimiter=","):
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter)
    writer.writerow(header)
    starts = []
    for row in body:
        starts.append(len(io.StringIO(out.getvalue(), newline="").readlines()) + 1)
        writer.writerow(row)
    return out.getvalue(), starts


@FAST
@given(table=tables(), name=st.sampled_from(["d.csv", "d.tsv", "d.csv.gz"]))
def test_csv_written_by_a_csv_writer_reads_back_exactly(tmp_path, table, name):
    header, body = table
    text, starts = csv_text(header, body, "\t" if ".tsv" in name else ",")
    path = write(tmp_path / name, text.encode())
    for mode in ("error", "skip"):
        rows, skipped = read(path, mode)
        assert [list(r.data.values()) for r in rows] == body and not skipped
        assert [r.index for r in rows] == starts  # each row points at its first line


@FAST
@given(table=tables(), edits=st.lists(st.tuples(st.integers(0, 200), st.sampled_from(['"', ",", "\n", "\r", ""])),
                                      min_size=1, max_size=3))
def test_damaged_csv_only_data_errors_and_no_lost_fields(tmp_path, table, edits):
    text, _ = csv_text(*table)
    for pos, char in edits:  # insert a quote, delimiter or line break, or delete a character
        pos = min(pos, len(text))
        text = text[:pos] + char + text[pos + (char == ""):]
    path = write(tmp_path / "d.csv", text.encode())
    try:
        rows, skipped = read(path, "skip")
    except DataError:
        return
    header_width = len(next(r for r in csv.reader(io.StringIO(text, newline="")) if r))  # blank lines are no header
    assert all(len(r.data) == header_width for r in rows)  # no row loses or gains fields silently
    assert len(rows) + len(skipped) <= len(io.StringIO(text, newline="").readlines()) - 1


@FAST
@given(raw=st.binary(max_size=200), name=st.sampled_from(["d.parquet", "d.parquet.gz", "d.jsonl.gz", "d.csv.gz"]))
def test_garbage_binaries_only_data_errors(tmp_path, raw, name):
    (tmp_path / name).write_bytes(raw)  # not compressed even when named .gz
    try:
        read(tmp_path / name, "skip")
    except DataError:
        pass


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# Lines of an SFT file: good rows, and rows that fail when read, when normalised or when tokenized.
sft_lines = st.one_of(
    st.builds(chat, st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10)).map(json.dumps),
    st.builds(lambda t: {"text": t}, st.text(max_size=10)).map(json.dumps),
    records.map(json.dumps),
    st.just('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}'),
    st.just('{"text": "x", "text": "y"}'),
    st.text(max_size=20),
).map(lambda line: line.replace("\n", " ").replace("\r", " "))


@settings(FAST, max_examples=25, deadline=5000)
@given(lines=st.lists(sft_lines, min_size=1, max_size=8))
def test_build_rows_read_equal_rows_used_plus_skipped(tmp_path, tok, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    expected = nonblank_lines([line.encode() for line in lines])
    try:
        splits = build_datasets(DataConfig(train=[DataSource(str(path))], on_bad_row="skip", max_length=32), tok,
                                "sft")
    except DataError as e:
        assert expected == 0 or "no usable rows" in str(e)
        return
    (source,) = splits.stats["sources"]
    assert source["rows_read"] == expected == source["rows_used"] + source["skipped"]
    assert splits.stats["train_rows"] == source["rows_used"] and splits.stats["skipped"] == source["skipped"]
