"""Tables of typed columns: one definition of how a report's table reads as markdown (the Prefect
UI, the run summary), as aligned text (the CLI) and as CSV (`reports.write_csv`, the values as they
are). A column's `Kind` says how its values read: text, code, a count, a number, a percent (of a
fraction) or seconds.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from visionflow.config import flatten

MAX_LISTED = 10  # list items (classes, issues) shown in a cell or in markdown before "... and N more"

Unit = Literal["text", "code", "count", "number", "percent", "seconds"]


@dataclass(frozen=True)
class Kind:
    """How a column's values read: a unit and its decimals (a percent of 0.1234 at 2 decimals is 12.34%)."""

    unit: Unit
    decimals: int = 0

    def format(self, value: Any) -> str:
        """``value`` as a cell: "-" for None or an empty list, yes/no, the first MAX_LISTED items of a
        list, else by unit."""
        if value is None or (isinstance(value, (list, tuple)) and not value):
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, (list, tuple)):
            shown = ", ".join(str(item) for item in value[:MAX_LISTED])
            return shown + (f", ... ({len(value)} in all)" if len(value) > MAX_LISTED else "")
        if self.unit == "code":
            return f"`{value}`"
        if self.unit == "text" or not isinstance(value, numbers.Real):  # a placeholder such as "n/a" stays
            return str(value)
        return {
            "count": f"{value:,}",
            "number": f"{value:.{self.decimals}f}",
            "percent": f"{value:.{self.decimals}%}",
            "seconds": f"{value:.{self.decimals}f} s",
        }[self.unit]


TEXT, CODE, COUNT = Kind("text"), Kind("code"), Kind("count")
NUMBER = Kind("number", 4)  # precision, recall, loss: four decimals tell runs apart
PERCENT = Kind("percent", 2)  # fractions such as accuracy: 61.23%
SECONDS = Kind("seconds", 1)


def kind_of(value: Any) -> Kind:
    """The kind of an untyped column's value: a count for an int, a number for a float, else text."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return COUNT
    return NUMBER if isinstance(value, numbers.Real) and not isinstance(value, bool) else TEXT


@dataclass(frozen=True)
class Table:
    """Named, typed columns and rows of plain values: what a report writes as CSV (the values as
    they are), markdown or aligned text (each cell formatted by its column's `Kind`), or a Prefect
    table artifact. (Not pandas: its import costs 0.3-1 s, and a fully cached run publishes tables.)"""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    kinds: tuple[Kind, ...] = ()  # one per column; none given: each value's own (`kind_of`)

    @classmethod
    def of(cls, columns: Sequence[str] | Mapping[str, Kind], records: Iterable[Mapping[str, Any]]) -> Table:
        """A table of ``columns`` (names, or names -> kinds) from row dicts (a missing key is an empty cell)."""
        kinds = tuple(columns.values()) if isinstance(columns, Mapping) else ()
        rows = tuple(tuple(record.get(name) for name in columns) for record in records)
        return cls(tuple(columns), rows, kinds)

    def records(self) -> list[dict[str, Any]]:
        """One dict per row, keys in column order."""
        return [dict(zip(self.columns, row)) for row in self.rows]

    def column(self, name: str) -> list[Any]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]

    def cells(self) -> list[list[str]]:
        """Every row's values formatted by their column's kind."""
        kinds = self.kinds or (None,) * len(self.columns)
        return [[(kind or kind_of(v)).format(v) for v, kind in zip(row, kinds)] for row in self.rows]


def markdown_table(table: Table) -> str:
    """``table`` as a GitHub-flavoured markdown table."""

    def line(cells: Iterable[str]) -> str:
        # A pipe would end the markdown cell early; a newline would end the row.
        return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    return "\n".join([line(table.columns), "|" + "---|" * len(table.columns), *map(line, table.cells())])


def text_table(table: Table) -> str:
    """``table`` as aligned plain text for a terminal: columns padded to their widest cell, numbers
    (typed columns of counts, numbers, percents, seconds) right-aligned."""
    lines = [list(table.columns), *table.cells()]
    widths = [max(len(cell) for cell in column) for column in zip(*lines)]
    right = [kind.unit not in ("text", "code") for kind in table.kinds] or [False] * len(widths)
    return "\n".join(
        "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(line, widths, right)).rstrip() for line in lines
    )


def field_kind(key: str, value: Any) -> Kind:
    """The kind of a record's field from its (dotted) name: seconds, a fraction as a percent, a
    throughput, else the value's own."""
    name = key.rsplit(".", 1)[-1]
    if name.endswith("seconds"):
        return SECONDS
    if "accuracy" in name or name.endswith(("top5", "_rate")):
        return PERCENT
    return Kind("number", 1) if name.endswith("per_second") else kind_of(value)


def key_value_table(values: Mapping[str, Any], header: tuple[str, str] = ("field", "value")) -> Table:
    """A two-column table of (flattened) ``values``, each formatted by `field_kind`."""
    rows = tuple((key, field_kind(key, value).format(value)) for key, value in flatten(values).items())
    return Table(header, rows, (TEXT, TEXT))
