"""Rows with their origin, and the error that names where a row went wrong."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignkit.errors import AlignkitError


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
    """One record and its origin: ``index`` is the 1-based line for JSONL and CSV (``unit="line"``; a
    CSV row's first line), else the 0-based row index."""

    data: dict[str, Any]
    source: str
    index: int
    unit: str = "row index"

    def where(self) -> str:
        return f"{self.source} {self.unit} {self.index}"

    def with_data(self, data: dict[str, Any]) -> Row:
        return Row(data, self.source, self.index, self.unit)


def rename_fields(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """``record`` with its fields renamed old -> new, as ``DataSource.columns`` does."""
    data = dict(record)
    moved = {new: data.pop(old) for old, new in columns.items() if old in data}
    data.update(moved)
    return data
