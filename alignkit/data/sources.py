"""Read a data source into rows that remember where they came from.

A :class:`~alignkit.config.DataSource` names a named asset, a local file (.json, .jsonl, .parquet, .csv,
.tsv; optionally .gz), a folder (written by ``datasets``' ``save_to_disk``, or holding data files), a
dataset of a LLaMA-Factory ``dataset_info.json`` (``path: data/dataset_info.json#name``) or a hub
dataset. Every row keeps its origin (file and line or row index) so that errors anywhere later can
point at it.

No row is lost silently: every record a reader meets is either returned or, with
``on_bad_row="skip"``, appended to ``skipped`` (and logged), so rows read = rows returned + rows skipped.
Problems that make the rest of a file untrustworthy (bad encoding or invalid JSON in a whole-file format,
a CSV quote that swallows rows) stop the read even when skipping.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import difflib
import gzip
import io
import json
import logging
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from alignkit.config import DataSource
from alignkit.data.formats import from_llamafactory, llamafactory_format
from alignkit.data.reasoning_gym import is_reasoning_gym_path, read_reasoning_gym
from alignkit.data.rows import DataError, Row, rename_fields

logger = logging.getLogger("alignkit")

FILE_TYPES = (".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".csv", ".tsv")
DATASET_INFO = "dataset_info.json"

# A CSV cell may hold a whole document; the csv module's default cap (128 KiB) would reject it.
_CSV_FIELD_LIMIT = 2**31 - 1
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_WHOLE_FILE_NOTE = "(the file is read as a whole, so data.on_bad_row=skip cannot drop only part of it)"
_REENCODE = "Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT` if it is Latin-1"


def read_source(src: DataSource, *, on_bad_row: str = "error", skipped: list[DataError] | None = None) -> list[Row]:
    """Rows of ``src`` after column renaming and ``limit``.

    Resolution order: a reasoning-gym task (``reasoning_gym:TASK?size=N&seed=S``, :mod:`.reasoning_gym`), a
    named asset (``alignkit.assets.resolve_data``), a LLaMA-Factory dataset
    (``dataset_info.json#name``), a local file or folder, a hub dataset. With ``on_bad_row="skip"`` a
    bad row (a malformed JSONL line, a CSV row with the wrong number of fields, a LLaMA-Factory record
    that does not convert) is logged, appended to ``skipped`` and dropped instead of raising.
    """
    if is_reasoning_gym_path(src.path):
        rows = read_reasoning_gym(src)  # generated up to src.limit
        if src.columns:
            _rename_columns(rows, src)
        return rows
    registry_entry = _split_registry_path(src.path)
    if registry_entry is not None:
        return _read_registry_dataset(*registry_entry, src, on_bad_row, skipped)
    path = _resolve_asset(src.path) or Path(src.path).expanduser()
    if path.is_dir():
        rows = _read_folder(path, src, on_bad_row, skipped)
    elif path.is_file():
        rows = _read_file(path, src, on_bad_row, skipped)
    elif _looks_like_local_path(src.path):
        raise DataError("no such file", source=src.path,
                        fix="Check the path (relative paths are resolved from the current directory "
                            f"{Path.cwd()}).")
    else:
        rows = _read_hub(src)
    if src.limit is not None:
        rows = rows[: src.limit]
    if src.columns:
        _rename_columns(rows, src)
    return rows


def _skip_or_raise(err: DataError, on_bad_row: str, skipped: list[DataError] | None) -> None:
    if on_bad_row != "skip":
        raise err
    logger.warning("skipping bad row: %s", err)
    if skipped is not None:
        skipped.append(err)


def _resolve_asset(name: str) -> Path | None:
    try:
        from alignkit.assets import resolve_data  # written elsewhere; optional
    except ImportError:
        return None
    found = resolve_data(name)
    return Path(found) if found is not None else None


def _looks_like_local_path(name: str) -> bool:
    suffixes = [s.lower() for s in Path(name).suffixes]
    return (any(s in FILE_TYPES or s == ".gz" for s in suffixes) or name.startswith((".", "/", "~"))
            or "\\" in name or name.count("/") > 1)


def _file_type(path: Path) -> str:
    return Path(path.name.lower().removesuffix(".gz")).suffix


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _read_file(path: Path, src: DataSource, on_bad_row: str, skipped: list[DataError] | None) -> list[Row]:
    kind, name = _file_type(path), str(path)
    if kind in (".jsonl", ".ndjson"):
        return _read_jsonl(_binary_lines(path), name, src.limit, on_bad_row, skipped)
    if kind == ".json":
        return _read_json(path, src.limit, on_bad_row, skipped)
    if kind in (".parquet", ".pq"):
        return _read_parquet(path)
    if kind in (".csv", ".tsv"):
        return _read_csv(path, "\t" if kind == ".tsv" else ",", src.limit, on_bad_row, skipped)
    raise DataError(f"unsupported file type {path.suffix!r}", source=name,
                    fix=f"Use one of {', '.join(FILE_TYPES)} (optionally .gz), or a folder saved by `datasets`.")


# --------------------------------------------------------------------------------------------------
# Bytes and text: gzip, UTF-8 with the line and byte offset of a bad byte
# --------------------------------------------------------------------------------------------------


def _unreadable(path: Path, e: Exception) -> DataError:
    what = "decompress" if _is_gz(path) else "read"
    return DataError(f"cannot {what} the file ({type(e).__name__}: {e})", source=str(path),
                     fix="Check that it is complete" + (" and really gzip-compressed." if _is_gz(path) else "."))


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if _is_gz(path) else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise _unreadable(path, e) from e


def _binary_lines(path: Path) -> Iterator[bytes]:
    """The file's lines (split at b"\\n" only, endings kept), decompressed on the fly for .gz."""
    try:
        with (gzip.open(path, "rb") if _is_gz(path) else open(path, "rb")) as f:
            yield from f
    except (OSError, EOFError, zlib.error) as e:
        raise _unreadable(path, e) from e


def _check_not_utf16(raw: bytes, name: str) -> None:
    if raw.startswith(_UTF16_BOMS):
        raise DataError("the file is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8", source=name,
                        fix="Save it as UTF-8, e.g. `iconv -f utf-16 -t utf-8 IN > OUT`.")


def _decode(raw: bytes, name: str, first_line: int = 1, byte_offset: int = 0, *, whole_file: bool) -> str:
    """``raw`` (one line, or a whole file starting at ``first_line``) as text; a DataError naming the line,
    column and byte offset of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        column = len(raw[line_start:e.start].decode("utf-8", "replace")) + 1
        fix = f"{_REENCODE} {_WHOLE_FILE_NOTE}." if whole_file else \
            f"{_REENCODE}, or set data.on_bad_row=skip to drop such lines."
        raise DataError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {column} (byte offset "
                        f"{byte_offset + e.start}) cannot be decoded", origin=Row({}, name, line, "line"),
                        fix=fix) from None


def _read_text(path: Path) -> str:
    """The whole file as text (gzip and a UTF-8 byte-order mark handled)."""
    raw = _read_bytes(path)
    _check_not_utf16(raw, str(path))
    return _decode(raw, str(path), whole_file=True).removeprefix("\ufeff")


def _line_col(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of character offset ``pos``."""
    line_start = text.rfind("\n", 0, pos) + 1
    return text.count("\n", 0, pos) + 1, pos - line_start + 1


# --------------------------------------------------------------------------------------------------
# JSON and JSON Lines
# --------------------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    pass


class _BadJSON(Exception):
    """Why a JSON text does not parse and where (a character offset; ``at_end``: the text ends there)."""

    def __init__(self, problem: str, pos: int, *, note: str = "", at_end: bool = False, extra_data: bool = False):
        super().__init__(problem)
        self.problem, self.pos, self.note, self.at_end, self.extra_data = problem, pos, note, at_end, extra_data

    def located(self, where: str) -> str:
        return f"{self.problem} at {where}" + (f" ({self.note})" if self.note else "")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) < len(pairs):  # JSON itself keeps the last value and drops the others silently
        raise _DuplicateKey
    return record


_JSON_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]]', re.S)
_COLON_NEXT = re.compile(r"\s*:")


def _find_duplicate_key(text: str) -> tuple[int, str] | None:
    """Offset and name of the first key that repeats inside one JSON object (only called once the parser
    has seen one, so ``text`` is valid up to there)."""
    open_containers: list[set[str] | None] = []  # seen keys per open object; None for an array
    for m in _JSON_STRING_OR_BRACKET.finditer(text):
        token = m.group()
        if token in ("{", "["):
            open_containers.append(set() if token == "{" else None)
        elif token in ("}", "]"):
            if open_containers:
                open_containers.pop()
        elif open_containers and open_containers[-1] is not None and _COLON_NEXT.match(text, m.end()):
            try:
                key = json.loads(token)
            except ValueError:
                continue
            if key in open_containers[-1]:
                return m.start(), key
            open_containers[-1].add(key)
    return None


def _parse_json(text: str) -> Any:
    """``json.loads`` that rejects duplicate keys and turns every failure into a located _BadJSON."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey:
        pos, key = _find_duplicate_key(text) or (0, "?")
        raise _BadJSON(f"duplicate key {key!r}", pos, note="JSON readers keep only its last value") from None
    except json.JSONDecodeError as e:
        raise _located_decode_error(text, e) from None
    except RecursionError:
        raise _BadJSON("not valid JSON (nested too deeply to parse)", 0) from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise _BadJSON(f"not valid JSON ({e})", 0) from None


def _located_decode_error(text: str, e: json.JSONDecodeError) -> _BadJSON:
    """The parser reports where it stopped, after skipping whitespace; a missing value or delimiter belongs
    at the end of the content before it (the end of the previous line, not the start of the next)."""
    if e.msg == "Extra data":  # JSON Lines when the first value is one record on one line
        first_value = text[: e.pos].strip()
        json_lines = first_value.startswith("{") and "\n" not in first_value
        return _BadJSON("not valid JSON (extra data after the first value)", e.pos, extra_data=json_lines)
    problem = f"not valid JSON ({e.msg})"
    if not text[e.pos:].strip():
        return _BadJSON(problem, len(text.rstrip()), at_end=True)
    before = text[: e.pos]
    if e.msg.startswith(("Expecting ',' delimiter", "Expecting ':' delimiter")) and "\n" in before[len(before.rstrip()):]:
        return _BadJSON(problem, len(before.rstrip()))
    return _BadJSON(problem, e.pos)


def _read_jsonl(lines: Iterable[bytes], name: str, limit: int | None, on_bad_row: str,
                skipped: list[DataError] | None) -> list[Row]:
    rows: list[Row] = []
    offset = 0
    for lineno, raw in enumerate(lines, start=1):
        if limit is not None and len(rows) >= limit:
            break
        start, offset = offset, offset + len(raw)
        if lineno == 1:
            _check_not_utf16(raw, name)
            if raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue  # blank lines are not rows
        origin = Row({}, name, lineno, "line")
        try:
            record = _jsonl_record(_decode(raw, name, lineno, start, whole_file=False), origin)
        except DataError as err:
            _skip_or_raise(err, on_bad_row, skipped)
            continue
        rows.append(origin.with_data(record))
    return rows


def _jsonl_record(line: str, origin: Row) -> dict[str, Any]:
    try:
        record = _parse_json(line)
    except _BadJSON as e:
        raise DataError(e.located("the end of the line" if e.at_end else f"column {e.pos + 1}"), origin=origin,
                        fix="Fix or remove this line (each line must be one complete JSON object), "
                            "or set data.on_bad_row=skip to drop malformed rows.") from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", origin=origin,
                        fix="Each line must be one record like {\"messages\": [...]}.")
    return record


def _read_json(path: Path, limit: int | None, on_bad_row: str, skipped: list[DataError] | None) -> list[Row]:
    name = str(path)
    text = _read_text(path)
    try:
        obj = _parse_json(text)
    except _BadJSON as e:
        if e.extra_data:  # one JSON object per line, saved as .json
            return _read_jsonl(io.BytesIO(_read_bytes(path)), name, limit, on_bad_row, skipped)
        raise _whole_file_json_error(text, e, name, fix="Fix the JSON there, or save one record per line as "
                                                         ".jsonl") from None
    return _json_records(obj, name, on_bad_row, skipped)


def _whole_file_json_error(text: str, e: _BadJSON, name: str, fix: str) -> DataError:
    line, col = _line_col(text, e.pos)
    where = f"column {col}" + (", the end of the file" if e.at_end else "")
    return DataError(e.located(where), origin=Row({}, name, line, "line"),
                     fix=f"{fix} {_WHOLE_FILE_NOTE}.")


def _json_records(obj: Any, name: str, on_bad_row: str, skipped: list[DataError] | None) -> list[Row]:
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        lengths = {len(v) for v in obj.values()}
        if len(lengths) != 1:
            raise DataError(f"a dict of columns must have equal-length lists; got lengths "
                            f"{ {k: len(v) for k, v in obj.items()} }", source=name,
                            fix="Give every column the same number of values, or use a list of records.")
        keys = list(obj)
        obj = [dict(zip(keys, values)) for values in zip(*obj.values())]
    if not isinstance(obj, list):
        raise DataError(f"expected a list of records, got a JSON {type(obj).__name__}", source=name,
                        fix='Use [{...}, {...}], {"data": [{...}, ...]} or a dict of equal-length column lists.')
    rows = []
    for i, record in enumerate(obj):
        if isinstance(record, dict):
            rows.append(Row(record, name, i))
            continue
        _skip_or_raise(DataError(f"expected a JSON object, got {type(record).__name__}", origin=Row({}, name, i),
                                 fix="Each record must be an object like {\"messages\": [...]}, or set "
                                     "data.on_bad_row=skip to drop other values."), on_bad_row, skipped)
    return rows


# --------------------------------------------------------------------------------------------------
# CSV and TSV
#
# The rule: standard CSV quoting, read strictly. A field may span lines only inside quotes; a quote that
# opens a field must close, followed by the delimiter or the end of the line; every row has as many
# fields as the header. A stray quote (a field starting with `"` that was meant as text) breaks one of
# these unless it happens to close, in the same column, just before a delimiter further down; the error
# points at the line and column where it opened. Rows spanning several lines are counted in the log.
# --------------------------------------------------------------------------------------------------

_QUOTE_FIX = ('If that quote is part of the text, quote the whole field and double the quote (e.g. '
              '"5"" screen" or "she said ""hi"""), or remove it; a field may span lines only inside a quote '
              'that closes right before the delimiter or the end of a line')


class _RecordLines:
    """Feeds csv.reader one physical line at a time and keeps the lines of the record being read."""

    def __init__(self, text: str):
        self._lines = iter(io.StringIO(text, newline=""))
        self.count = 0
        self.current: list[str] = []

    def __iter__(self) -> _RecordLines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.count += 1
        self.current.append(line)
        return line

    @property
    def first(self) -> int:
        """Line number of the record being read."""
        return self.count - len(self.current) + 1

    def next_record(self) -> None:
        self.current = []


def _read_csv(path: Path, delimiter: str, limit: int | None, on_bad_row: str,
              skipped: list[DataError] | None) -> list[Row]:
    name = str(path)
    lines = _RecordLines(_read_text(path))
    old_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        header = _next_csv_record(reader, lines, name, delimiter)
        while header == []:  # blank lines before the header
            header = _next_csv_record(reader, lines, name, delimiter)
        if header is None:
            return []
        _check_csv_header(header, name, lines.count)
        lines.next_record()
        rows: list[Row] = []
        spanning = 0
        while limit is None or len(rows) < limit:
            fields = _next_csv_record(reader, lines, name, delimiter)
            if fields is None:
                break
            first, last = lines.first, lines.count
            if fields:  # a blank line is not a row
                if len(fields) != len(header) and last > first:
                    # Fatal even when skipping: rows a stray quote swallowed would vanish uncounted.
                    raise _swallowed_rows_error(fields, header, name, first, last, lines.current, delimiter)
                try:
                    rows.append(_csv_row(fields, header, name, first, delimiter))
                    spanning += last > first
                except DataError as err:
                    _skip_or_raise(err, on_bad_row, skipped)
            lines.next_record()
    finally:
        csv.field_size_limit(old_limit)
    if spanning:
        logger.info("%s: %d rows from %d lines (%d rows have quoted fields spanning lines)", name, len(rows),
                    lines.count, spanning)
    return rows


def _next_csv_record(reader, lines: _RecordLines, name: str, delimiter: str) -> list[str] | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        raise _csv_syntax_error(e, lines, name, delimiter) from None


def _check_csv_header(header: list[str], name: str, line: int) -> None:
    seen: set[str] = set()
    for column in header:
        if column in seen:
            raise DataError(f"column {column!r} appears twice in the header", origin=Row({}, name, line, "line"),
                            field=column, fix="Rename one of them (the second would overwrite the first).")
        seen.add(column)


def _csv_row(fields: list[str], header: list[str], name: str, line: int, delimiter: str) -> Row:
    origin = Row({}, name, line, "line")
    if len(fields) != len(header):
        raise DataError(f"the row has {len(fields)} fields but the header has {len(header)}", origin=origin,
                        fix=f"Quote fields that contain the delimiter ({delimiter!r}), or fix the row; "
                            "data.on_bad_row=skip drops such rows.")
    return origin.with_data({k: _csv_cell(v) for k, v in zip(header, fields)})


def _swallowed_rows_error(fields: list[str], header: list[str], name: str, first: int, last: int,
                          record_lines: list[str], delimiter: str) -> DataError:
    """A row with the wrong number of fields that spans lines: the quoted field that spans them is where
    a stray quote would have opened."""
    text = "".join(record_lines)
    line, col = _line_col(text, _quote_spanning_lines(text, delimiter) or 0)
    return DataError(f"the row starting here has {len(fields)} fields but the header has {len(header)} and spans "
                     f"lines {first}-{last}: the field quoted at line {first + line - 1}, column {col} runs over line "
                     "breaks, so a stray quote there may have swallowed the rows after it",
                     origin=Row({}, name, first, "line"),
                     fix=f"{_QUOTE_FIX} (this stops the read even with data.on_bad_row=skip, which would lose the "
                         "swallowed rows uncounted).")


def _csv_syntax_error(e: csv.Error, lines: _RecordLines, name: str, delimiter: str) -> DataError:
    text = "".join(lines.current)
    opened = _unclosed_or_misclosed_quote(text, delimiter)
    if opened is None:
        return DataError(f"not valid CSV ({e})", origin=Row({}, name, lines.count, "line"),
                         fix=f"Fix the line {_WHOLE_FILE_NOTE}.")
    line, col = _line_col(text, opened)
    origin = Row({}, name, lines.first + line - 1, "line")
    swallowed = lines.count - origin.index
    if "unexpected end of data" in str(e):
        problem = (f"the quote opening the field at column {col} never closes, so the rest of the file "
                   f"({swallowed} more lines) would be read as that one field")
    elif swallowed:
        problem = (f"the field quoted at column {col} closes only on line {lines.count}, swallowing the line "
                   f"breaks in between, and its closing quote is followed by text instead of {delimiter!r}")
    else:
        problem = f"the field quoted at column {col} has text after its closing quote instead of {delimiter!r}"
    return DataError(problem, origin=origin, fix=f"{_QUOTE_FIX} {_WHOLE_FILE_NOTE}.")


def _quote_scan(text: str, delimiter: str) -> tuple[int | None, int | None]:
    """Scan one record's text the way strict CSV does. Returns (offset of the opening quote of the field
    that breaks quoting: never closed, or text after its closing quote; offset of the first quoted field
    that contains a line break)."""
    opened: int | None = None
    multiline: int | None = None
    field_start = True
    i = 0
    while i < len(text):
        c = text[i]
        if opened is None:
            if c == '"' and field_start:
                opened = i
            field_start = c in (delimiter, "\n", "\r")
        elif c in "\r\n":
            multiline = opened if multiline is None else multiline
        elif c == '"':
            after = text[i + 1: i + 2]
            if after == '"':
                i += 1  # a doubled quote is a literal quote
            elif after not in (delimiter, "\n", "\r", ""):
                return opened, multiline
            else:
                opened = None
        i += 1
    return opened, multiline


def _unclosed_or_misclosed_quote(text: str, delimiter: str) -> int | None:
    return _quote_scan(text, delimiter)[0]


def _quote_spanning_lines(text: str, delimiter: str) -> int | None:
    return _quote_scan(text, delimiter)[1]


def _csv_cell(value: str | None) -> Any:
    # Message lists do not fit in a CSV cell except as JSON; decode those so conversations work.
    if value and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in parsed):
            return parsed
    return value


# --------------------------------------------------------------------------------------------------
# Parquet, folders, the hub
# --------------------------------------------------------------------------------------------------


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    try:
        # ParquetFile, not read_table: it reads duplicate column names, which the check below reports clearly
        table = pq.ParquetFile(pa.BufferReader(_read_bytes(path)) if _is_gz(path) else name).read()
        _check_unique_columns(table.column_names, name)
        records = table.to_pylist()
    except DataError:
        raise
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise DataError(f"cannot read Parquet ({type(e).__name__}: {e})", source=name,
                        fix="Check that the file is a complete Parquet file.") from e
    return [Row(r, name, i) for i, r in enumerate(records)]


def _check_unique_columns(columns: list[str], name: str) -> None:
    seen: set[str] = set()
    for column in columns:
        if column in seen:
            raise DataError(f"column {column!r} appears twice", source=name, field=column,
                            fix="Rename one of them (the second would overwrite the first in every row).")
        seen.add(column)


def _read_folder(path: Path, src: DataSource, on_bad_row: str, skipped: list[DataError] | None) -> list[Row]:
    import datasets

    name = str(path)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"cannot load the saved dataset ({type(e).__name__}: {e})", source=name,
                            fix="Check that the folder was written completely by `save_to_disk`.") from e
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"the saved DatasetDict has no split {src.split!r}; splits: {', '.join(ds)}",
                                source=name, fix="Set `split:` of this data source to one of them.")
            ds = ds[src.split]
    else:
        files = _split_files(path, src.split)
        if files is not None:  # data files alignkit reads itself, with its checks and locations
            rows: list[Row] = []
            for file in files:
                left = None if src.limit is None else src.limit - len(rows)
                if left == 0:
                    break
                rows += _read_file(file, dataclasses.replace(src, limit=left), on_bad_row, skipped)
            return rows
        try:  # other file types: let `datasets` find and read them
            ds = datasets.load_dataset(str(path), split=src.split)
        except Exception as e:
            raise DataError(f"cannot read this folder as a dataset ({type(e).__name__}: {e})", source=name,
                            fix="Point at a data file, or a folder written by `Dataset.save_to_disk`.") from e
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    return [Row(r, f"{name} [{src.split}]", i) for i, r in enumerate(ds.to_list())]


def _split_files(path: Path, split: str) -> list[Path] | None:
    """The data files of ``split`` in a plain folder, found by the rules of ``datasets.load_dataset``
    (file names like train.jsonl / test-00000.csv; all files are "train" when none names a split), or
    None when some are of a type alignkit does not read itself."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        by_split = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except EmptyDatasetError as e:
        raise DataError("the folder holds no data files", source=str(path),
                        fix=f"Put data files ({', '.join(FILE_TYPES)}) in it, or point at a file.") from e
    if split not in by_split:
        raise DataError(f"no data files for split {split!r}; splits found: {', '.join(map(str, by_split))}", source=str(path),
                        fix="Set `split:` of this data source to one of them (file names like train.jsonl, "
                            "test.jsonl name the splits).")
    files = sorted(Path(f) for f in by_split[split])
    return files if all(_file_type(f) in FILE_TYPES for f in files) else None


def _read_hub(src: DataSource) -> list[Row]:
    import datasets

    label = f"hub dataset {src.path!r}" + (f" ({src.subset})" if src.subset else "") + f" [{src.split}]"
    try:
        ds = datasets.load_dataset(src.path, src.subset, split=src.split)
    except Exception as e:
        raise DataError(
            f"not found locally (no such file or folder, and not a named asset) nor loadable from the "
            f"Hugging Face Hub ({type(e).__name__}: {e})", source=src.path,
            fix="Check the path or the hub name, subset and split; `alignkit assets` lists offline data.",
        ) from e
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    return [Row(r, label, i) for i, r in enumerate(ds.to_list())]


def _rename_columns(rows: list[Row], src: DataSource) -> None:
    if not rows:
        return
    present = list(rows[0].data)
    for old in src.columns:
        if old not in rows[0].data:
            close = difflib.get_close_matches(old, present, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"`columns` renames {old!r} -> {src.columns[old]!r} but the data has no column "
                            f"{old!r}{hint}; columns present: {', '.join(present)}",
                            origin=rows[0], field=old, fix="Fix the `columns:` mapping of this data source.")
    targets = list(src.columns.values())
    for new in targets:
        if targets.count(new) > 1:
            raise DataError(f"`columns` renames several columns to {new!r}", source=src.path, field="columns",
                            fix="Map each column to a different name.")
    for row in rows:
        kept = [new for new in targets if new in row.data and new not in src.columns]
        if kept:  # renaming onto a column that stays would overwrite its values
            old = next(o for o, n in src.columns.items() if n == kept[0])
            raise DataError(f"`columns` renames {old!r} -> {kept[0]!r}, but the data already has a column "
                            f"{kept[0]!r}, whose values would be lost", origin=row, field=kept[0],
                            fix=f"Also rename or drop {kept[0]!r} (e.g. `columns: {{{kept[0]}: old_{kept[0]}}}`), "
                                "or map another column.")
        row.data = rename_fields(row.data, src.columns)


# --------------------------------------------------------------------------------------------------
# LLaMA-Factory's dataset_info.json: `path: data/dataset_info.json#name` or `path: data#name`
# --------------------------------------------------------------------------------------------------

# Where an entry's data may be that alignkit cannot read (in LLaMA-Factory's order of precedence).
_UNSUPPORTED_LOCATIONS = {"ms_hub_url": "ModelScope datasets", "om_hub_url": "Modelers datasets",
                          "script_url": "loading scripts", "cloud_file_name": "cloud files"}


def _split_registry_path(path: str) -> tuple[Path, str] | None:
    """(dataset_info.json, dataset name) for ``FILE#name`` or ``FOLDER#name``; None for other paths."""
    if "#" not in path or Path(path).expanduser().exists():
        return None
    base, name = path.rsplit("#", 1)
    info = Path(base).expanduser()
    if info.is_dir():
        info = info / DATASET_INFO
    if not info.is_file():
        raise DataError(f"no such file: {info}", source=path,
                        fix=f"Name a LLaMA-Factory registry as `path: data/{DATASET_INFO}#my_dataset` "
                            "(or `data#my_dataset` for the folder that holds it).")
    if not name:
        raise DataError("no dataset name after '#'", source=path, fix=f"Write `path: {base}#my_dataset`.")
    return info, name


def _read_registry_dataset(info: Path, name: str, src: DataSource, on_bad_row: str,
                           skipped: list[DataError] | None) -> list[Row]:
    where = f"{info}#{name}"
    entry = _registry_entry(info, name)
    if src.columns:
        raise DataError("`columns` cannot be combined with a dataset_info.json entry", source=where,
                        field="columns", fix=f"Put the mapping in the entry's \"columns\" in {info}.")
    fmt = llamafactory_format(entry, where)
    inner = dataclasses.replace(src, path=_registry_location(entry, info, where), columns={},
                                subset=entry.get("subset", src.subset), split=entry.get("split", src.split))
    rows = []
    for row in read_source(inner, on_bad_row=on_bad_row, skipped=skipped):
        try:
            rows.append(row.with_data(from_llamafactory(row.data, fmt)))
        except DataError as e:
            _skip_or_raise(e.at(row), on_bad_row, skipped)
    return rows


def _registry_entry(info: Path, name: str) -> dict[str, Any]:
    text = _read_text(info)
    try:
        registry = _parse_json(text)
    except _BadJSON as e:
        raise _whole_file_json_error(text, e, str(info), fix="Fix the JSON there") from None
    if not isinstance(registry, dict):
        raise DataError(f"expected a JSON object of datasets, got a JSON {type(registry).__name__}", source=str(info),
                        fix='Use LLaMA-Factory\'s layout: {"my_dataset": {"file_name": "data.json", ...}}.')
    entry = registry.get(name)
    if not isinstance(entry, dict):
        close = difflib.get_close_matches(name, list(registry), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problem = f"no dataset {name!r}{hint}" if entry is None else f"the entry {name!r} is not a JSON object"
        shown = ", ".join(list(registry)[:10]) + (", ..." if len(registry) > 10 else "")
        raise DataError(f"{problem}; datasets in it: {shown}", source=str(info),
                        fix="Name one of them after '#', or add the entry.")
    return entry


def _registry_location(entry: dict[str, Any], info: Path, where: str) -> str:
    """The file, folder or hub name an entry points at, by LLaMA-Factory's precedence: hub URLs, then
    script_url, then cloud_file_name, then file_name."""
    if "num_samples" in entry:
        raise DataError("num_samples is not supported", source=where, field="num_samples",
                        fix="Use `limit:` (the first N rows) or `ratio:` (a share of the mix) on the data source.")
    download = "Download the data and set \"file_name\" to the local file or folder."
    if "hf_hub_url" in entry:
        if "folder" in entry:
            raise DataError("hub sub-folders (\"folder\") are not supported", source=where, field="folder",
                            fix=download)
        return str(entry["hf_hub_url"])
    for key, what in _UNSUPPORTED_LOCATIONS.items():
        if key in entry:
            raise DataError(f"{what} ({key!r}) are not supported", source=where, field=key, fix=download)
    if "file_name" in entry:
        file = Path(str(entry["file_name"]))
        return str(file if file.is_absolute() else info.parent / file)
    raise DataError("the entry has no \"file_name\" or \"hf_hub_url\"", source=where,
                    fix="Set \"file_name\" to the data file or folder (relative to the dataset_info.json folder).")
