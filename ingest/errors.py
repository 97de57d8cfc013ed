"""Problems found in the input: one row of the catalog's `errors` table each.

With `--on-error fail` a problem that loses data raises `IngestError`; with `skip` it becomes a
row with action "skipped" and the run goes on. Problems that ingest repairs (a box clamped to
the frame) are rows with action "fixed" in both modes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")


@dataclass(frozen=True)
class ErrorRow:
    source: str  # the file the problem is in
    id: str | None  # e.g. "annotation 17", "image 4", "video 001-001"
    field: str | None
    reason: str  # short stable code
    detail: str
    action: str = "skipped"

    def message(self) -> str:
        where = self.source
        if self.id:
            where += f": {self.id}"
        if self.field:
            where += f", field {self.field!r}"
        return f"{where}: {self.detail} [{self.reason}]"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


class IngestError(Exception):
    """Input that ingest cannot use; the message names the file, id and field."""

    def __init__(self, row: ErrorRow) -> None:
        super().__init__(row.message())
        self.row = row

    def __reduce__(self):  # keep the row when the error crosses a process boundary
        return (IngestError, (self.row,))


class ErrorSink:
    """Collects error rows; raises on data-losing problems when `on_error == "fail"`."""

    def __init__(self, on_error: str = "fail") -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        self.on_error = on_error
        self.rows: list[ErrorRow] = []

    def report(self, row: ErrorRow) -> None:
        if row.action == "skipped" and self.on_error == "fail":
            raise IngestError(row)
        log.debug("%s", row.message())
        self.rows.append(row)

    def skip(self, source: str, id: str | None, field: str | None, reason: str, detail: str) -> None:
        self.report(ErrorRow(source, id, field, reason, detail, "skipped"))

    def fixed(self, source: str, id: str | None, field: str | None, reason: str, detail: str) -> None:
        self.report(ErrorRow(source, id, field, reason, detail, "fixed"))


def count_by_reason(rows: list[ErrorRow] | list[dict]) -> dict[str, int]:
    """{"reason (action)": items}, sorted by reason: the items the rows stand for (a row of a
    converter's report such as "47 boxes dropped" has `items` 47; every other row is one item)."""
    counts: Counter[str] = Counter()
    for r in rows:
        reason, action = (r["reason"], r["action"]) if isinstance(r, dict) else (r.reason, r.action)
        items = r.get("items", 1) if isinstance(r, dict) else 1
        counts[f"{reason} ({action})"] += items if isinstance(items, int) and items >= 0 else 1
    return dict(sorted(counts.items()))


class IngestRefused(Exception):
    """The run did not start: the message says why and what to do."""
