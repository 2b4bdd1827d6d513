"""The lines of a file that ``refstream import`` reads, each with its number, in bounded
memory: the file is read in chunks, never whole, and a line longer than the row bound is
refused with its number without being kept (its bytes are skipped up to its newline).

A UTF-8 byte order mark at the start of the file (Excel writes one) is dropped; a line that
is not UTF-8 is refused with its number, never read with replacement characters (a wrong
byte in an id would derive another event id). A line ends at ``\\n``, and a ``\\r`` before
it is dropped. What a line refused here becomes is the reader's business
(``import_formats``): a ``Bad`` row of its own, or the end of a CSV record it was inside.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

MAX_LINE = 64 * 1024  # bytes: a row (a line; a CSV record, whatever its lines) longer than this is refused
CHUNK = 64 * 1024  # bytes read at a time
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Line:
    number: int  # 1 is the first line
    text: str  # without its line end


@dataclass(frozen=True, slots=True)
class Bad:
    """A row refused before Postgres, with the line it starts on."""

    line: int
    reason: str  # "invalid": a row that cannot be read as any type
    detail: str


class Lines:
    """The file's lines as ``Line``, or ``Bad`` for one that cannot be read; ``bytes`` is how
    far into the file it has read (for the progress bar)."""

    def __init__(self, f: BinaryIO, max_line: int = MAX_LINE, chunk: int = CHUNK) -> None:
        self.f, self.max_line, self.chunk = f, max_line, chunk
        self.bytes = 0

    def __iter__(self) -> Iterator[Line | Bad]:
        n = 0
        held = bytearray()  # the current line's bytes so far, never more than max_line
        over = False  # the current line passed max_line: the rest of it is skipped
        first = True
        read = getattr(self.f, "read1", self.f.read)  # a pipe's rows as they come, not 64 KiB at a time
        while True:
            chunk = read(self.chunk)
            if not chunk:
                break
            self.bytes += len(chunk)
            if first and len(held) + len(chunk) < len(BOM) and BOM.startswith(bytes(held) + chunk):
                held += chunk  # a BOM may still be coming, a byte at a time (a pipe)
                continue
            if first:
                chunk, held, first = _without_bom(bytes(held) + chunk), bytearray(), False
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                n += 1
                yield self._line(n, held, chunk[start:end], over)
                held, over, start = bytearray(), False, end + 1
            if not over:
                if len(held) + len(chunk) - start > self.max_line:
                    held, over = bytearray(), True
                else:
                    held += chunk[start:]
        if held or over:
            n += 1
            yield self._line(n, held, b"", over)

    def _line(self, n: int, held: bytearray, tail: bytes, over: bool) -> Line | Bad:
        if over or len(held) + len(tail) > self.max_line:
            return Bad(n, "invalid", f"longer than {self.max_line:,} bytes")
        raw = bytes(held) + tail if held else tail
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            return Line(n, raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return Bad(n, "invalid", f"not UTF-8 (byte {exc.start + 1} of the line)")


def _without_bom(data: bytes) -> bytes:
    return data[len(BOM) :] if data.startswith(BOM) else data
