"""CSV records for ``refstream import``: a header, then one record per row, each with the
line it starts on, in bounded memory; a record that does not read is refused and reading
goes on at the next one.

The standard library's reader parses (strict: a stray quote is an error, not a guess); it
pulls the file's lines from a feed this module controls, so that

- a record's line is the first line the reader pulled for it, however many lines its
  quoted cells span (the reader's own ``line_num`` counts the lines it pulled in all);
- a record longer than the row bound (``MAX_LINE``, over all its lines) is cut off there:
  a quote opened and never closed, or a cell of 128 KiB, never takes the rest of the file;
- after a refusal the reader starts afresh on the line after the refused record's first
  (it resets its state at each record): where the record spanned lines (a quote that never
  closed within the bound or the file, or closed in the wrong place) the lines it took
  after its first are read again as records of their own. The quote was the first line's
  fault, and the rows after it are rows. Those lines are held (at most the bound) until
  the record closes.
"""

from __future__ import annotations

import csv
from collections import deque
from collections.abc import Iterable, Iterator

from ingest.contract.errors import Refused
from workers.ops.import_lines import MAX_LINE, Bad, Line

csv.field_size_limit(max(csv.field_size_limit(), 4 * MAX_LINE))  # the record's bound decides, not the cell's


class _Unclosed(Refused):
    """The record's quote did not close within the bound, or before a line that is refused
    (``bad``) or the end of the file."""

    def __init__(self, why: str, bad: Bad | None = None) -> None:
        super().__init__(why)
        self.why, self.bad = why, bad


class _Feed:
    """The lines the CSV reader pulls, counted per record."""

    def __init__(self, lines: Iterable[Line | Bad], max_bytes: int) -> None:
        self.source = iter(lines)
        self.again: deque[Line] = deque()  # lines to read again after a record whose quote never closed
        self.record: list[Line] = []  # the lines pulled for the record being read
        self.size = 0
        self.skipped: list[Bad] = []  # lines refused between records, said before the next record
        self.ended = False
        self.max_bytes = max_bytes

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while True:
            item = self.again.popleft() if self.again else next(self.source, None)
            if item is None:
                self.ended = True
                if self.record:
                    raise _Unclosed("a quoted cell opened here is not closed by the end of the file")
                raise StopIteration
            if isinstance(item, Bad):
                if self.record:
                    raise _Unclosed(f"a quoted cell opened here runs into line {item.line}, which is refused", item)
                self.skipped.append(item)
                continue
            self.size += len(item.text) + 1
            self.record.append(item)
            if self.size > self.max_bytes:
                raise _Unclosed(f"longer than {self.max_bytes:,} bytes (a quoted cell not closed?)")
            return item.text + "\n"

    def next_record(self) -> None:
        self.record, self.size = [], 0


def records(lines: Iterable[Line | Bad], max_bytes: int = MAX_LINE) -> Iterator[tuple[int, dict[str, str]] | Bad]:
    """``(line, {column: cell})`` for each row (empty cells left out), or ``Bad`` with the
    line a refused record starts on."""
    feed = _Feed(lines, max_bytes)
    reader = csv.reader(feed, strict=True)
    header: list[str] | None = None
    while True:
        feed.next_record()
        try:
            cells = next(reader)
        except StopIteration:
            yield from feed.skipped
            return
        except _Unclosed as exc:
            yield from _said(feed)
            first, rest = feed.record[0], feed.record[1:]
            yield Bad(first.number, "invalid", f"CSV: {exc.why}")
            feed.again.extendleft(reversed(rest))  # the rows after the broken quote are rows
            if exc.bad is not None:
                yield exc.bad
            if feed.ended and not feed.again:
                return
            continue
        except csv.Error as exc:
            yield from _said(feed)
            yield Bad(feed.record[0].number if feed.record else 0, "invalid", f"CSV: {exc}")
            feed.again.extendleft(reversed(feed.record[1:]))  # a quote that closed in the wrong place
            continue
        yield from _said(feed)
        if not cells:
            continue  # a blank line
        n = feed.record[0].number
        if header is None:
            header = cells
            continue
        if len(cells) > len(header):
            yield Bad(n, "invalid", "more cells than the header names")
            continue
        yield n, {k: v for k, v in zip(header, cells, strict=False) if k and v != ""}


def _said(feed: _Feed) -> list[Bad]:
    out, feed.skipped = feed.skipped, []
    return out
