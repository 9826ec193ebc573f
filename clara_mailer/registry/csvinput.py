"""Reading the tables people actually export: sniffing encoding and delimiter, then streaming.

Spreadsheets save CSV as UTF-8 (with or without a BOM) or, in a Spanish Excel, as
Windows-1252; separated by commas, semicolons (where the decimal mark is a comma) or
tabs. ``sniff_table`` decides all that once, by scanning the whole file in binary
chunks (fast, and a bad byte on the last line is found before anything is imported);
``CsvTable.records`` then streams the rows with their line numbers (``CsvTable.reader``
hands the csv module's reader itself to a loop that keeps its own count, for speed).
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clara_mailer.core.errors import UnreadableFile

DELIMITERS = (",", ";", "\t")
DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab"}
_SCAN_CHUNK = 1 << 20
_UTF8_BOM = codecs.BOM_UTF8
_HIGH_BYTES = bytes(range(0x80, 0x100))


@dataclass(frozen=True)
class TableFormat:
    """How a file is encoded and separated, and what its header says."""

    encoding: str  # a Python codec name: utf-8, utf-8-sig or cp1252
    delimiter: str
    header: list[str]
    header_line: int  # physical line of the header (blank lines before it are skipped)

    @property
    def encoding_label(self) -> str:
        return {
            "utf-8": "UTF-8",
            "utf-8-sig": "UTF-8 with BOM",
            "cp1252": "Windows-1252 (detected)",
        }[self.encoding]

    @property
    def delimiter_label(self) -> str:
        return DELIMITER_NAMES[self.delimiter]


def _position(data: bytes, offset: int, line_before: int) -> tuple[int, int]:
    """(line, column), both 1-based, of byte ``offset`` in a chunk starting on a new line."""
    line = line_before + data.count(b"\n", 0, offset) + 1
    start = data.rfind(b"\n", 0, offset) + 1
    return line, offset - start + 1


def detect_encoding(path: Path) -> str:
    """utf-8-sig, utf-8 or cp1252, or UnreadableFile for a binary or empty file."""
    name = str(path)
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise UnreadableFile(f"cannot open: {exc.strerror}", path=name) from None
    with stream:
        head = stream.read(4)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise UnreadableFile(
                "UTF-16 text (Excel 'Unicode text'): save it as 'CSV UTF-8' instead", path=name
            )
        if head.startswith(b"PK\x03\x04"):
            raise UnreadableFile(
                "a ZIP file (an .xlsx or .ods workbook?): save it as CSV first", path=name
            )
        stream.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        utf8_error: tuple[int, int] | None = None
        lines_before, seen_text, first = 0, False, True
        while True:
            chunk = stream.read(_SCAN_CHUNK)
            final = not chunk
            if first and chunk.startswith(_UTF8_BOM):
                chunk = chunk[len(_UTF8_BOM) :]
            nul = chunk.find(b"\0")
            if nul >= 0:
                line, column = _position(chunk, nul, lines_before)
                raise UnreadableFile(
                    "binary data (a NUL byte), not a text table",
                    path=name,
                    line=line,
                    column=column,
                )
            if not seen_text and chunk.strip():
                seen_text = True
            if utf8_error is None:
                try:
                    decoder.decode(chunk, final)
                except UnicodeDecodeError as exc:
                    utf8_error = _position(chunk, max(exc.start, 0), lines_before)
            lines_before += chunk.count(b"\n")
            first = False
            if final:
                break
        if not seen_text:
            raise UnreadableFile("the file is empty", path=name)
        stream.seek(0)
        bom = stream.read(3) == _UTF8_BOM
    if utf8_error is None:
        return "utf-8-sig" if bom else "utf-8"
    # Not UTF-8: a Spanish Excel writes Windows-1252. Five byte values are undefined
    # there; a file using them is neither encoding. A file whose non-ASCII characters are
    # mostly well-formed UTF-8 is UTF-8 with some lines pasted from elsewhere: reading it
    # as Windows-1252 would garble every UTF-8 name (José -> JosÃ©), so it is refused.
    utf8_chars = stray_bytes = 0
    try:
        with path.open("rb") as stream:
            cp_decoder = codecs.getincrementaldecoder("cp1252")()
            lines_before = 0
            while chunk := stream.read(_SCAN_CHUNK):
                try:
                    cp_decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    line, column = _position(chunk, exc.start, lines_before)
                    raise UnreadableFile(
                        "neither UTF-8 nor Windows-1252 text", path=name, line=line, column=column
                    ) from None
                # Decoded as UTF-8 with U+FFFD for each stray byte: every other non-ASCII
                # character was a well-formed UTF-8 sequence.
                ascii_bytes = len(chunk.translate(None, _HIGH_BYTES))
                as_utf8 = chunk.decode("utf-8", "replace")
                stray = as_utf8.count("\ufffd")
                stray_bytes += stray
                utf8_chars += len(as_utf8) - ascii_bytes - stray
                lines_before += chunk.count(b"\n")
    except OSError as exc:  # pragma: no cover - the file vanished between two reads
        raise UnreadableFile(f"cannot read: {exc.strerror}", path=name) from None
    if utf8_chars >= stray_bytes:
        line, column = utf8_error
        raise UnreadableFile(
            "mixed encodings: the file is mostly UTF-8 but this line is not "
            "(Windows-1252?); fix the line or save the whole file as 'CSV UTF-8'",
            path=name,
            line=line,
            column=column,
        )
    return "cp1252"


def guess_delimiter(line: str) -> str:
    """The candidate that occurs most often outside quotes in the header line."""
    counts = dict.fromkeys(DELIMITERS, 0)
    quoted = False
    for char in line:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _csv_error(exc: csv.Error, path: str, line: int) -> UnreadableFile:
    text = str(exc)
    if "unexpected end of data" in text:
        reason = 'unterminated quoted field (a " opened here is never closed)'
    elif "field larger than field limit" in text:
        reason = "a field longer than 131072 characters (an unterminated quote?)"
    else:
        reason = f"malformed CSV: {text}"
    return UnreadableFile(reason, path=path, line=line)


class CsvTable:
    """One sniffed file; ``records()`` streams (line, fields) after the header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        try:
            self.size = path.stat().st_size
        except OSError as exc:
            raise UnreadableFile(f"cannot open: {exc.strerror}", path=self.name) from None
        encoding = detect_encoding(path)
        self._binary: io.BufferedReader | None = None
        with path.open(encoding=encoding, newline="") as text:
            first_line = ""
            for raw_line in text:
                if raw_line.strip():
                    first_line = raw_line
                    break
        delimiter = guess_delimiter(first_line)
        header: list[str] = []
        header_line = 0
        rows = self._read(encoding, delimiter)
        try:
            for line, fields in rows:
                if any(f.strip() for f in fields):
                    header, header_line = [f.strip() for f in fields], line
                    break
        finally:
            rows.close()
        self.format = TableFormat(encoding, delimiter, header, header_line)

    def _read(self, encoding: str, delimiter: str) -> Generator[tuple[int, list[str]], None, None]:
        binary = self.path.open("rb")
        self._binary = binary
        try:
            text = io.TextIOWrapper(binary, encoding=encoding, newline="")
            reader = csv.reader(text, delimiter=delimiter, strict=True)
            line = 1
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise _csv_error(exc, self.name, line) from None
                yield line, fields
                line = reader.line_num + 1
        finally:
            binary.close()

    @contextmanager
    def reader(self) -> Iterator[Any]:
        """The csv module's reader over the rows after the header (blank rows included).

        For a tight loop: the physical line a row starts on is ``line_num + 1`` of the
        reader before that row was read. A ``csv.Error`` raised while iterating becomes
        ``csv_error(exc, line)``."""
        fmt = self.format
        binary = self.path.open("rb")
        self._binary = binary
        try:
            text = io.TextIOWrapper(binary, encoding=fmt.encoding, newline="")
            rows = csv.reader(text, delimiter=fmt.delimiter, strict=True)
            try:
                while rows.line_num < fmt.header_line:  # blank lines, then the header
                    next(rows)
            except StopIteration:
                pass
            except csv.Error as exc:
                raise self.csv_error(exc, rows.line_num + 1) from None
            yield rows
        finally:
            binary.close()

    def csv_error(self, exc: csv.Error, line: int) -> UnreadableFile:
        """The one-line error for a malformed row starting on ``line``."""
        return _csv_error(exc, self.name, line)

    def records(self) -> Iterator[tuple[int, list[str]]]:
        """(line, fields) for each row after the header, blank lines skipped."""
        fmt = self.format
        for line, fields in self._read(fmt.encoding, fmt.delimiter):
            if line <= fmt.header_line:
                continue
            if not fields or not any(f.strip() for f in fields):
                continue
            yield line, fields

    def position(self) -> int:
        """Bytes read so far by ``records()`` (for a progress bar)."""
        binary = self._binary
        if binary is None or binary.closed:
            return self.size
        return binary.tell()
