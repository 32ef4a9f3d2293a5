"""Read a data source into rows that remember where they came from.

A :class:`~alignkit.config.DataSource` names a named asset, a local file (.json, .jsonl, .parquet, .csv,
.tsv; optionally .gz), a folder written by ``datasets`` (``save_to_disk``), or a hub dataset. Every row
keeps its origin (file and line or row index) so that errors anywhere later can point at it.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.config import DataSource
from alignkit.errors import AlignkitError

logger = logging.getLogger("alignkit")

FILE_TYPES = (".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".csv", ".tsv")


class DataError(AlignkitError, ValueError):
    """A data row or source is unusable. The message names the source, row and field, and the fix."""

    def __init__(self, problem: str, *, origin: Row | None = None, source: str | None = None,
                 field: str | None = None, fix: str = ""):
        self.problem, self.field, self.fix = problem, field, fix
        self.source = origin.source if origin is not None else source
        self.row = origin.index if origin is not None else None
        where = origin.where() if origin is not None else (source or "")
        head = ", ".join(x for x in (where, f"field {field!r}" if field else "") if x)
        text = f"{head}: {problem}" if head else problem
        if fix:
            text = f"{text.rstrip('.')}. {fix}"
        super().__init__(text)

    def at(self, origin: Row) -> DataError:
        """The same error located at ``origin`` (for errors raised by code that only saw the record)."""
        if self.source is not None:
            return self
        return DataError(self.problem, origin=origin, field=self.field, fix=self.fix)


@dataclass
class Row:
    """One record and its origin: ``index`` is the 1-based line for JSONL, else the 0-based row index."""

    data: dict[str, Any]
    source: str
    index: int
    unit: str = "row index"  # "line" for JSONL

    def where(self) -> str:
        return f"{self.source} {self.unit} {self.index}"

    def with_data(self, data: dict[str, Any]) -> Row:
        return Row(data, self.source, self.index, self.unit)


def read_source(src: DataSource, *, on_bad_row: str = "error", skipped: list[DataError] | None = None) -> list[Row]:
    """Rows of ``src`` after column renaming and ``limit``.

    Resolution order: a named asset (``alignkit.assets.resolve_data``), a local file or folder, a hub
    dataset. With ``on_bad_row="skip"`` a malformed JSONL line is logged, appended to ``skipped`` and
    dropped instead of raising.
    """
    path = _resolve_asset(src.path) or Path(src.path).expanduser()
    if path.is_dir():
        rows = _read_dataset_folder(path, src)
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


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_file(path: Path, src: DataSource, on_bad_row: str, skipped: list[DataError] | None) -> list[Row]:
    kind = Path(path.name.lower().removesuffix(".gz")).suffix
    name = str(path)
    if kind in (".jsonl", ".ndjson"):
        with _open_text(path) as f:
            return _read_jsonl(f, name, src.limit, on_bad_row, skipped)
    if kind == ".json":
        with _open_text(path) as f:
            text = f.read()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # one JSON object per line saved as .json
                return _read_jsonl(text.splitlines(), name, src.limit, on_bad_row, skipped)
            raise DataError(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", source=name,
                            fix="Fix the JSON, or save one record per line as .jsonl.") from e
        return _json_records(obj, name)
    if kind in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"cannot read Parquet ({type(e).__name__}: {e})", source=name,
                            fix="Check that the file is a complete Parquet file.") from e
        return [Row(r, name, i) for i, r in enumerate(records)]
    if kind in (".csv", ".tsv"):
        with _open_text(path) as f:
            reader = csv.DictReader(f, delimiter="\t" if kind == ".tsv" else ",")
            return [Row({k: _csv_cell(v) for k, v in r.items() if k is not None}, name, i)
                    for i, r in enumerate(reader)]
    raise DataError(f"unsupported file type {path.suffix!r}", source=name,
                    fix=f"Use one of {', '.join(FILE_TYPES)} (optionally .gz), or a folder saved by `datasets`.")


def _read_jsonl(lines, name: str, limit: int | None, on_bad_row: str, skipped: list[DataError] | None) -> list[Row]:
    rows: list[Row] = []
    for lineno, line in enumerate(lines, start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        origin = Row({}, name, lineno, "line")
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", origin=origin,
                                fix="Each line must be one record like {\"messages\": [...]}.")
        except (json.JSONDecodeError, DataError) as e:
            err = e if isinstance(e, DataError) else DataError(
                f"not valid JSON ({e.msg} at column {e.colno})", origin=origin,
                fix="Fix or remove this line (each line must be one complete JSON object), "
                    "or set data.on_bad_row=skip to drop malformed rows.")
            if on_bad_row != "skip":
                raise err from None
            logger.warning("skipping bad row: %s", err)
            if skipped is not None:
                skipped.append(err)
            continue
        rows.append(origin.with_data(record))
    return rows


def _json_records(obj: Any, name: str) -> list[Row]:
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
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", origin=Row({}, name, i),
                            fix="Each record must be an object like {\"messages\": [...]}.")
        rows.append(Row(record, name, i))
    return rows


def _csv_cell(value: str | None) -> Any:
    # Message lists do not fit in a CSV cell except as JSON; decode those so conversations work.
    if value and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in parsed):
            return parsed
    return value


def _read_dataset_folder(path: Path, src: DataSource) -> list[Row]:
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
    else:  # a plain folder of data files: let `datasets` find and read them
        try:
            ds = datasets.load_dataset(str(path), split=src.split)
        except Exception as e:
            raise DataError(f"cannot read this folder as a dataset ({type(e).__name__}: {e})", source=name,
                            fix="Point at a data file, or a folder written by `Dataset.save_to_disk`.") from e
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    return [Row(r, f"{name} [{src.split}]", i) for i, r in enumerate(ds.to_list())]


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
    for row in rows:
        data = dict(row.data)
        moved = {new: data.pop(old) for old, new in src.columns.items() if old in data}
        data.update(moved)
        row.data = data
