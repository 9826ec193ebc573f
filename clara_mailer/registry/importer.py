"""The recipient registry: CSV import (validate, normalise, de-duplicate, reject file),
segments, listing and showing recipients.

Import streams: rows are read, checked and de-duplicated in one tight loop, in chunks,
so a file of a million rows needs the memory of a few chunks. A chunk's new recipients
and their segments are written in a few statements, on a thread beside the parser
(``_Writer``): SQLite, multi-row ``INSERT ... VALUES ... ON CONFLICT DO NOTHING`` with
the ids the file's write lock lets us give; PostgreSQL, one look-up of the chunk's
addresses, then ``COPY`` of the new rows (ids from the sequence) and of their
memberships. Rows whose address is there already (imported before, or earlier in the
file) are resolved afterwards, chunk by chunk in file order: segments gained,
``--update``, the counts. Each file is one transaction: an interrupted, failed or
``--strict``-refused file leaves the registry exactly as it was.
"""

from __future__ import annotations

import csv
import functools
import gc
import itertools
import os
import queue
import re
import sqlite3
import sys
import threading
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, TextIO

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    any_,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from clara_mailer.core.csvsafe import safe_cell
from clara_mailer.core.errors import DatabaseError, InputError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import PERSONAL_OPT_OUTS
from clara_mailer.registry.addresses import AddressError, AddressValidator, email_key
from clara_mailer.registry.csvinput import CsvTable
from clara_mailer.store.database import Database
from clara_mailer.store.tables import recipient_segments as MEMBERS
from clara_mailer.store.tables import recipients as RECIPIENTS
from clara_mailer.store.tables import segments as SEGMENTS
from clara_mailer.store.tables import suppressions as SUPPRESSIONS
from clara_mailer.store.tables import utcnow

FIELDS = (
    "email",
    "name",
    "organisation",
    "segment",
    "language",
    "country",
    "consent_basis",
    "consent_source",
)
CONSENT_BASES = (
    "consent",
    "contract",
    "legal-obligation",
    "vital-interests",
    "public-task",
    "legitimate-interest",
)
REJECTS_SUFFIX = ".rejects.csv"
SAMPLE_REJECTS = 20
SUPPRESSIONS_IN_MEMORY = 100_000


@functools.lru_cache(maxsize=4096)  # cell values repeat: es, en, ES, local-police...
def header_key(text: str) -> str:
    """A header or value folded for matching: case, accents, ``-``/``_`` and spaces."""
    folded = unicodedata.normalize("NFKD", text.strip().casefold())
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    return re.sub(r"[\s_\-.:/]+", " ", folded).strip()


_HEADER_ALIASES: dict[str, tuple[str, ...]] = {
    "email": (
        "email",
        "e-mail",
        "email address",
        "e-mail address",
        "mail",
        "correo",
        "correo electrónico",
        "correo-e",
        "dirección de correo",
        "dirección de correo electrónico",
        "email_address",
    ),
    "name": (
        "name",
        "full name",
        "contact",
        "contact name",
        "nombre",
        "contacto",
        "nombre y apellidos",
        "persona de contacto",
    ),
    "organisation": (
        "organisation",
        "organization",
        "organización",
        "organizacion",
        "entidad",
        "institución",
        "institution",
        "organismo",
        "org",
    ),
    "segment": ("segment", "segments", "segmento", "segmentos", "list", "lista"),
    "language": ("language", "lang", "idioma", "lengua"),
    "country": ("country", "país", "pais", "country code"),
    "consent_basis": (
        "consent basis",
        "legal basis",
        "consent_basis",
        "base jurídica",
        "base legal",
        "base de legitimación",
        "legitimación",
    ),
    "consent_source": ("source", "consent source", "consent_source", "origen", "fuente"),
}
HEADER_ALIASES = {
    header_key(alias): name for name, aliases in _HEADER_ALIASES.items() for alias in aliases
}
_FIELD_NAMES = {header_key(n): n for n in FIELDS} | {
    "organization": "organisation",
    "source": "consent_source",
    "basis": "consent_basis",
    "address": "email",
}
_LANGUAGE_VALUES = {
    **{header_key(v): "es" for v in ("es", "spa", "es-ES", "español", "castellano", "spanish")},
    **{header_key(v): "en" for v in ("en", "eng", "en-GB", "en-US", "english", "inglés")},
}
_COUNTRY_NAMES = {header_key(v): "ES" for v in ("España", "Spain", "Espana")}
_BASIS_VALUES = {header_key(v): v for v in CONSENT_BASES} | {
    header_key("interés legítimo"): "legitimate-interest",
    header_key("consentimiento"): "consent",
    header_key("interés público"): "public-task",
    header_key("misión de interés público"): "public-task",
    header_key("contrato"): "contract",
    header_key("obligación legal"): "legal-obligation",
}


# --- import --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportOptions:
    segment: str | None = None
    dry_run: bool = False
    strict: bool = False
    columns: Mapping[str, str] = field(default_factory=dict)  # field -> header
    create_segments: bool = False
    update: bool = False
    chunk_size: int = 5000
    #: Where rejected rows go: a folder (``<input name>.rejects.csv`` in it) or, for a
    #: single input, a file; None: no rejects file (the report still lists them). The
    #: CLI's default is the working directory, never beside the input (which may be
    #: read-only, or someone else's).
    rejects: Path | None = None


@dataclass(frozen=True)
class Reject:
    line: int
    reason: str


@dataclass
class ImportReport:
    """What one file's import did. ``read`` = added + updated + gained_segment +
    unchanged + duplicates + rejected."""

    path: Path
    encoding: str = ""
    delimiter: str = ""
    read: int = 0
    added: int = 0
    updated: int = 0
    gained_segment: int = 0
    unchanged: int = 0
    duplicates: int = 0
    rejected: int = 0
    committed: bool = False
    dry_run: bool = False
    strict: bool = False
    rejects_path: Path | None = None
    sample_rejects: list[Reject] = field(default_factory=list)
    created_segments: list[str] = field(default_factory=list)
    skipped: str | None = None


class ImportProgress(Protocol):
    def start(self, path: Path, total_bytes: int) -> None: ...

    def advance(self, position: int) -> None: ...

    def finish(self, report: ImportReport) -> None: ...


def _parse_column_options(columns: Mapping[str, str]) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for raw_field, header in columns.items():
        name = _FIELD_NAMES.get(header_key(raw_field))
        if name is None:
            raise InputError(
                f"--column {raw_field}={header}: unknown field {raw_field!r} "
                f"(fields: {', '.join(FIELDS)})"
            )
        chosen[name] = header
    return chosen


def map_columns(table: CsvTable, columns: Mapping[str, str]) -> dict[str, int]:
    """field -> column index, from the header (English or Spanish) and ``--column``."""
    header = table.format.header
    where = dict(path=table.name, line=table.format.header_line or None)
    keys = [header_key(h) for h in header]
    found: dict[str, int] = {}
    for index, key in enumerate(keys):
        name = HEADER_ALIASES.get(key)
        if name is None:
            continue
        if name in found and name not in columns:
            raise InputError(
                f"both {header[found[name]]!r} and {header[index]!r} look like the {name} "
                f"column: choose one with --column {name}=HEADER",
                **where,  # type: ignore[arg-type]
            )
        found.setdefault(name, index)
    for name, wanted in _parse_column_options(columns).items():
        try:
            found[name] = keys.index(header_key(wanted))
        except ValueError:
            raise InputError(
                f"--column {name}={wanted}: no such column (found: {', '.join(header)})",
                **where,  # type: ignore[arg-type]
            ) from None
    if "email" not in found:
        shown = ", ".join(repr(h) for h in header) or "none"
        raise InputError(
            f"no address column (email, e-mail, correo, correo electrónico...); "
            f"found {shown}; name it with --column email=HEADER",
            **where,  # type: ignore[arg-type]
        )
    return found


def slugify(text: str) -> str:
    return header_key(text).replace(" ", "-")


#: What a segment slug may be: users type it on the command line.
SLUG_SHAPE = re.compile(r"[a-z0-9-]{1,64}")
#: Line and paragraph breaks become a space: a name is one line of a greeting.
_BREAKS = frozenset("\r\n\t\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
#: Bidirectional controls (U+202E turns "evil" into "live" on screen): dropped.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e") | frozenset(
    "\u2066\u2067\u2068\u2069"
)


def clean_text(text: str) -> str:
    """A name or organisation without control characters: breaks become one space,
    other C0/C1 controls and bidi controls are dropped."""
    if text.isprintable():  # the common case: nothing to clean
        return text
    out = []
    for char in text:
        if char in _BREAKS:
            out.append(" ")
        elif char in _BIDI_CONTROLS or unicodedata.category(char) == "Cc":
            continue
        else:
            out.append(char)
    return re.sub(r" {2,}", " ", "".join(out)).strip()


def rejects_path(source: Path, where: Path) -> Path:
    """The rejects file of ``source``: in ``where`` when it is a folder, or ``where``
    itself when it names a file."""
    name = source.name.removesuffix(".csv") + REJECTS_SUFFIX
    return where.resolve() / name if where.is_dir() else where


class _RejectsWriter:
    """Rejected rows, original columns + line + reason, beside the input.

    Written to a temporary name and renamed at the end, so a failed import leaves no
    half-written rejects file."""

    def __init__(self, table: CsvTable, where: Path) -> None:
        self.path = rejects_path(table.path, where)
        if self.path.resolve() == table.path.resolve():
            raise InputError("refusing to overwrite the input with its rejects", path=table.name)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._header = table.format.header
        self._delimiter = table.format.delimiter
        self._stream: TextIO | None = None
        self._writer: Any = None

    def write(self, line: int, fields: list[str], reason: str) -> None:
        if self._writer is None:
            self._stream = self._tmp.open("w", encoding="utf-8-sig", newline="")
            self._writer = csv.writer(
                self._stream, delimiter=self._delimiter, lineterminator="\r\n"
            )
            self._writer.writerow([*self._header, "line", "reason"])
        width = len(self._header)
        cells = (fields + [""] * width)[:width]
        self._writer.writerow([safe_cell(c) for c in (*cells, line, reason)])

    def finish(self) -> Path | None:
        if self._stream is None:
            return None
        self._stream.close()
        self._tmp.replace(self.path)
        return self.path

    def discard(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._tmp.unlink(missing_ok=True)


#: A row once parsed: a list, so that a duplicate later in the chunk can add segments.
_KEY, _EMAIL, _NAME, _ORG, _LANGUAGE, _COUNTRY, _BASIS, _SOURCE, _SEGMENTS, _LINE, _FIELDS = range(
    11
)
_Row = list[Any]
#: How many rows may wait, found in the registry, for ``_resolve`` (bounded memory).
_DEFERRED_ROWS = 20_000
#: Distinct (language, country, basis, segment) cells remembered: a few in real files.
_ATTRIBUTE_CACHE = 4096
#: Insert whole chunks when at most this share of a chunk was already in the registry;
#: above it (importing a file again) look the chunk's addresses up first.
_LOOKUP_FIRST_SHARE = 0.25
#: The switch interval while the writer runs (see ``_Writer``): 30 µs, not 5 ms.
_SWITCH_INTERVAL = 30e-6


class _Writer:
    """The file's inserts, run in order on one thread beside the parser.

    The parser (the calling thread) turns CSV rows into ready-made statements; the
    database works through them meanwhile (SQLite's engine and PostgreSQL's server wait
    without the GIL). The connection belongs to the writer while jobs are queued: the
    caller calls ``sync()`` before it uses the connection itself. At most two jobs wait,
    so memory stays that of a few chunks. ``threaded=False`` runs each job at once.

    The writer is the slower of the two, and it needs the GIL back each time SQLite
    returns (to bind the next statement's values). By default the parser keeps the GIL
    for up to 5 ms before it must hand it over: the writer spent ~40% of its time
    waiting for it, and the two threads ran one at a time. While the writer runs, the
    interpreter's switch interval is ``_SWITCH_INTERVAL`` (restored by ``close``): a
    1,000,000-row SQLite import took 7.3-8.6 s instead of 9.7-10.3 (interleaved runs)."""

    def __init__(self, threaded: bool) -> None:
        self._jobs: queue.Queue[Callable[[], Any] | None] = queue.Queue(maxsize=2)
        self._done: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._waiting: deque[Callable[[Any], None]] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._interval = sys.getswitchinterval()
        if threaded:
            sys.setswitchinterval(_SWITCH_INTERVAL)
            self._thread = threading.Thread(target=self._work, name="clara-import", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        failed = False
        while (job := self._jobs.get()) is not None:
            if failed or self._stopping:
                continue  # drained, so that submit() never waits for ever
            try:
                self._done.put((True, job()))
            except BaseException as exc:  # handed to the caller, raised there
                failed = True
                self._done.put((False, exc))

    def submit(self, job: Callable[[], Any], then: Callable[[Any], None]) -> None:
        """Run ``job`` after those before it; ``then(result)`` runs on the caller's thread
        (in ``collect`` or ``sync``), in order."""
        if self._thread is None:
            then(job())
            return
        self._waiting.append(then)
        self._jobs.put(job)
        self.collect(wait=False)

    def collect(self, *, wait: bool) -> None:
        """Hand finished results to their ``then``; with ``wait``, until none is left."""
        while self._waiting and (wait or not self._done.empty()):
            ok, result = self._done.get()
            then = self._waiting.popleft()
            if not ok:
                raise result
            then(result)

    def sync(self) -> None:
        self.collect(wait=True)

    def close(self) -> None:
        """Stop the thread: after ``sync()``, or to abandon queued jobs on an error."""
        if self._thread is None:
            return
        self._stopping = True
        self._jobs.put(None)
        self._thread.join()
        self._thread = None
        sys.setswitchinterval(self._interval)


class _FileImport:
    """One file in one transaction."""

    def __init__(
        self,
        conn: Connection,
        table: CsvTable,
        columns: dict[str, int],
        options: ImportOptions,
        signer: TokenSigner,
        validator: AddressValidator,
        report: ImportReport,
        rejects: _RejectsWriter | None,
    ) -> None:
        self.conn, self.table, self.columns = conn, table, columns
        self.options, self.signer, self.validator = options, signer, validator
        self.report, self.rejects = report, rejects
        self.width = len(table.format.header)
        self.field_indexes = [columns.get(name, -1) for name in FIELDS]  # -1: the sentinel
        self.now = utcnow()
        dialect = conn.dialect.name
        self.postgresql = dialect == "postgresql"
        self.batch = options.chunk_size if self.postgresql else 1000  # keys per look-up
        # The driver gets the timestamp as SQLAlchemy would store it: SQLite keeps text.
        self.now_param: Any = self.now
        if dialect == "sqlite":
            self.now_param = self.now.isoformat(sep=" ", timespec="microseconds")
        self.default_source = f"import of {table.path.name}"
        # Segments: parsing resolves cells to slugs (and notes new ones to create);
        # flushing a chunk turns slugs into ids, creating segments in the transaction.
        self.segments: dict[str, int] = {}
        self.segment_names: dict[str, str] = {}
        for seg_id, slug, name in conn.execute(
            select(SEGMENTS.c.id, SEGMENTS.c.slug, SEGMENTS.c.name)
        ):
            self.segments[slug] = seg_id
            self.segment_names[header_key(name)] = slug
        self.known_slugs = frozenset(self.segments)
        self.new_segment_names: dict[str, str] = {}
        self._cell_segments: dict[str, frozenset[str]] = {}
        self._slug_ids: dict[frozenset[str], frozenset[int]] = {}
        self._attributes: dict[tuple[str, str, str, str], tuple[Any, ...] | str] = {}
        # Recipients with a larger id were added by this file: a second sighting is a
        # duplicate within the file, found without keeping every key in memory.
        self.max_id_before: int = conn.scalar(select(func.max(RECIPIENTS.c.id))) or 0
        # SQLite: the file's transaction holds the write lock (BEGIN IMMEDIATE), so new
        # rows get their ids here, next after the largest, as SQLite itself would.
        self.next_id = self.max_id_before + 1
        # Few suppressions (the usual case): one query per file instead of one per chunk.
        # An opt-out arriving during the import is still caught when a send is planned.
        self.suppressed: dict[str, str] | None = None
        active = SUPPRESSIONS.c.lifted_at.is_(None)
        if (conn.scalar(select(func.count()).where(active)) or 0) <= SUPPRESSIONS_IN_MEMORY:
            self.suppressed = {}
            for address_hash, reason in conn.execute(
                select(SUPPRESSIONS.c.address_hash, SUPPRESSIONS.c.reason).where(active)
            ):
                self.suppressed.setdefault(address_hash, reason)
        driver: Any = conn.connection.driver_connection
        self.driver = driver
        if self.postgresql:
            # New rows get their ids here, from the column's own sequence, so that the
            # chunk's memberships can be copied alongside them.
            self.id_sequence = conn.scalar(select(func.pg_get_serial_sequence("recipients", "id")))
            self.now_text = self.now.isoformat(sep=" ", timespec="microseconds")
        else:
            # A larger page cache for this connection: keys arrive in random order, so
            # the unique index on email_key touches pages all over (~15% faster).
            conn.exec_driver_sql("PRAGMA cache_size = -32000")
            limit = driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            self.rows_per_insert = max(1, (limit - 2) // 8)
            self.pairs_per_insert = max(1, limit // 2)
            self._values_sql: dict[tuple[str, int], str] = {}
        self.default_segments: frozenset[str] = frozenset()
        if options.segment is not None:
            try:
                self.default_segments = frozenset({self._segment_slug(options.segment)})
            except ValueError:
                raise InputError(
                    f"--segment {options.segment[:80]!r}: a new segment's slug is 1 to 64 "
                    "lowercase letters, digits and hyphens"
                ) from None
        self.writer = _Writer(threaded=THREADED_WRITES)
        #: PostgreSQL: the membership table's foreign keys, set aside for a large file
        #: (``_set_checks_aside``); None until the first chunk decides, [] when kept.
        self.checks_aside: list[tuple[str, str]] | None = None if self.postgresql else []
        #: Rows found in the registry, waiting for ``_resolve``: one list per chunk.
        self.deferred: list[list[_Row]] = []
        self.deferred_rows = 0
        self.lookup_first = False

    # -- rows ----------------------------------------------------------------------

    def reject(self, line: int, fields: list[str], reason: str) -> None:
        report = self.report
        report.rejected += 1
        if len(report.sample_rejects) < SAMPLE_REJECTS:
            report.sample_rejects.append(Reject(line, reason))
        if self.rejects is not None:
            self.rejects.write(line, fields, reason)

    def _segment_slug(self, value: str) -> str:
        """The slug a segment cell value names (by slug or name); KeyError if unknown."""
        slug = slugify(value)
        if slug in self.known_slugs:
            return slug
        named = self.segment_names.get(header_key(value))
        if named is not None:
            return named
        if not self.options.create_segments or not slug:
            raise KeyError(value)
        if not SLUG_SHAPE.fullmatch(slug):
            raise ValueError(value)
        self.new_segment_names.setdefault(slug, clean_text(value.strip()))
        return slug

    def _segment_cell(self, cell: str) -> frozenset[str]:
        """Slugs named in one cell (``a;b`` or ``a|b``); KeyError for an unknown one."""
        slugs = self._cell_segments.get(cell)
        if slugs is None:
            found = {self._segment_slug(v) for v in re.split(r"[;|]", cell) if v.strip()}
            slugs = self._cell_segments[cell] = frozenset(found)
        return slugs

    def segment_ids(self, slugs: frozenset[str]) -> frozenset[int]:
        ids = self._slug_ids.get(slugs)
        if ids is None:
            ids = self._slug_ids[slugs] = frozenset(self._segment_id(s) for s in slugs)
        return ids

    def _segment_id(self, slug: str) -> int:
        """The id of a slug, creating a segment that parsing noted as new."""
        seg_id = self.segments.get(slug)
        if seg_id is None:
            self.writer.sync()  # the connection is the writer's while jobs are queued
            name = self.new_segment_names[slug]
            seg_id = int(
                self.conn.execute(
                    insert(SEGMENTS)
                    .values(slug=slug, name=name, created_at=self.now)
                    .returning(SEGMENTS.c.id)
                ).scalar_one()
            )
            self.segments[slug] = seg_id
            self.report.created_segments.append(slug)
        return seg_id

    def attributes(
        self, language_raw: str, country: str, basis_raw: str, segment_cell: str
    ) -> tuple[Any, ...] | str:
        """(language, country, consent basis, segment slugs) from the trimmed cells, or
        the reason the row is rejected; checked in this order."""
        language = _LANGUAGE_VALUES.get(header_key(language_raw)) if language_raw else "es"
        if language is None:
            return f"unknown language {language_raw!r} (use es or en)"
        if country:
            country = _COUNTRY_NAMES.get(header_key(country), country)
            if len(country) != 2 or not country.isascii() or not country.isalpha():
                return f"country {country!r} is not a two-letter ISO code"
            country = country.upper()
        basis = _BASIS_VALUES.get(header_key(basis_raw)) if basis_raw else "legitimate-interest"
        if basis is None:
            return f"unknown consent basis {basis_raw!r} (use one of {', '.join(CONSENT_BASES)})"
        if segment_cell:
            try:
                segments = self._segment_cell(segment_cell)
            except KeyError as exc:
                hint = "" if self.options.create_segments else " (add --create-segments)"
                return f"unknown segment {exc.args[0].strip()!r}{hint}"
            except ValueError as exc:
                return (
                    f"segment {exc.args[0].strip()[:80]!r} cannot be a new segment: a slug is "
                    "1 to 64 lowercase letters, digits and hyphens"
                )
        else:
            segments = self.default_segments
        if not segments:
            return "no segment: add a segment column or use --segment"
        return (language, country, basis, segments)

    def run(self, progress: ImportProgress | None) -> None:
        # The loop makes millions of short-lived lists that reference counting frees;
        # the cyclic collector's passes over them (and over every long-lived object)
        # cost ~7% of an import, so it pauses for the file.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._run(progress)
            self.writer.sync()
            self._resolve_deferred()
            self._restore_checks()
        finally:
            if collecting:
                gc.enable()
            self.writer.close()

    def _run(self, progress: ImportProgress | None) -> None:
        """Read, check and de-duplicate rows; hand each chunk to ``flush``.

        Everything a row needs is done here in one loop with local names: at a million
        rows, each attribute look-up or call costs a measurable share of the import."""
        report, width, size, table = self.report, self.width, self.options.chunk_size, self.table
        get_cells = itemgetter(*self.field_indexes)
        normalise, key_of, reject = self.validator.normalise, email_key, self.reject
        attribute_cache, attributes = self._attributes, self.attributes
        default_source = self.default_source
        email_index = self.columns["email"]
        chunk: dict[str, _Row] = {}
        read = parsed = duplicates = 0
        with table.reader() as reader:
            line = next_line = reader.line_num + 1
            try:
                for fields in reader:
                    line, next_line = next_line, reader.line_num + 1
                    count = len(fields)
                    if count != width or not fields[email_index].strip():
                        # Rare: blank, short, long, or without an address.
                        if not "".join(fields).strip():
                            continue  # a blank row: not counted
                        if count < width:
                            read += 1
                            reject(line, fields, f"too few columns: {count} of {width}")
                            continue
                        if count > width and "".join(fields[width:]).strip():
                            read += 1
                            reject(line, fields, f"too many columns: {count} of {width}")
                            continue
                    read += 1
                    fields.append("")  # what an absent column's index (-1) points at
                    raw, name, organisation, segment_cell, language, country, basis, source = (
                        get_cells(fields)
                    )
                    raw = raw.strip()
                    if not raw:
                        reject(line, fields, "no address")
                        continue
                    try:
                        email = normalise(raw)
                    except AddressError as exc:
                        reject(line, fields, f"bad address {raw!r}: {exc}")
                        continue
                    cells = (language, country, basis, segment_cell)
                    found = attribute_cache.get(cells)
                    if found is None:
                        if len(attribute_cache) >= _ATTRIBUTE_CACHE:
                            attribute_cache.clear()
                        found = attribute_cache[cells] = attributes(
                            language.strip(), country.strip(), basis.strip(), segment_cell.strip()
                        )
                    if isinstance(found, str):
                        reject(line, fields, found)
                        continue
                    name = name.strip()
                    if not name.isprintable():
                        name = clean_text(name)
                    organisation = organisation.strip()
                    if not organisation.isprintable():
                        organisation = clean_text(organisation)
                    source = source.strip()
                    if not source.isprintable():
                        source = clean_text(source)
                    key = key_of(email)
                    first = chunk.get(key)
                    parsed += 1
                    language, country, basis, segments = found
                    if first is None:
                        chunk[key] = [
                            key,
                            email,
                            name,
                            organisation,
                            language,
                            country,
                            basis,
                            source or default_source,
                            segments,
                            line,
                            fields,
                        ]
                    else:
                        duplicates += 1
                        first[_SEGMENTS] = first[_SEGMENTS] | segments
                    if parsed >= size:
                        report.read += read
                        report.duplicates += duplicates
                        read = parsed = duplicates = 0
                        self.flush(chunk)
                        chunk = {}
                        if progress is not None:
                            progress.advance(table.position())
            except csv.Error as exc:
                raise table.csv_error(exc, next_line) from None
        report.read += read
        report.duplicates += duplicates
        self.flush(chunk)
        if progress is not None:
            progress.advance(table.size)

    # -- chunks --------------------------------------------------------------------

    def flush(self, chunk: dict[str, _Row]) -> None:
        """Write one chunk's rows: opt-outs rejected, then the new ones inserted in one go
        (the writer's job) and those already in the registry resolved one by one."""
        if not chunk:
            return
        if self.suppressed != {}:
            hashes = {self.signer.address_hash(row[_EMAIL]): key for key, row in chunk.items()}
            if self.suppressed is None:
                from clara_mailer.optouts.suppressions import active_suppressions

                self.writer.sync()
                opted = active_suppressions(self.conn, hashes)
            else:
                opted = {h: self.suppressed[h] for h in hashes.keys() & self.suppressed.keys()}
            for address_hash, key in hashes.items():  # in file order
                reason = opted.get(address_hash)
                if reason is None:
                    continue
                row = chunk.pop(key)
                why = "opted out" if reason in PERSONAL_OPT_OUTS else f"suppressed ({reason})"
                self.reject(row[_LINE], row[_FIELDS], why)
        rows = sorted(chunk.values(), key=itemgetter(_KEY))  # the unique index's pages in order
        if self.lookup_first:
            # Most rows were already there (a file imported again): look them up first.
            self.writer.sync()
            self._resolve_deferred()
            before = len(rows)
            rows = self._resolve(rows)
            self.lookup_first = (before - len(rows)) > before * _LOOKUP_FIRST_SHARE
            if not rows:
                return
        for slugs in set(map(itemgetter(_SEGMENTS), rows)):
            self.segment_ids(slugs)  # creates new segments now, not in the writer
        if self.postgresql:
            self._insert_postgresql(rows)
        else:
            self._insert_sqlite(rows)

    def _inserted(self, rows: list[_Row], conflicts: list[int]) -> None:
        """A chunk's insert is done: rows at ``conflicts`` were already in the registry."""
        self.report.added += len(rows) - len(conflicts)
        if not conflicts:
            return
        # (PostgreSQL's job looks the chunk up first anyway.)
        self.lookup_first = not self.postgresql and len(conflicts) > len(rows) * _LOOKUP_FIRST_SHARE
        self.deferred.append([rows[i] for i in conflicts])
        self.deferred_rows += len(conflicts)
        if self.deferred_rows >= _DEFERRED_ROWS:
            self.writer.sync()
            self._resolve_deferred()

    def _resolve_deferred(self) -> None:
        """Resolve the rows found in the registry, chunk by chunk in file order (as if each
        chunk had been written whole before the next was read)."""
        deferred, self.deferred, self.deferred_rows = self.deferred, [], 0
        for rows in deferred:
            if self._resolve(rows):
                raise _Concurrent

    def _insert_sqlite(self, rows: list[_Row]) -> None:
        first = self.next_id
        self.next_id += len(rows)
        now, per, values_sql = self.now_param, self.rows_per_insert, self._sqlite_values
        statements = []
        start = 0
        head = itemgetter(slice(0, 8))
        for size in _statement_sizes(len(rows), per):
            part = rows[start : start + size]
            # ?1 the time, ?2 the part's first id (the SQL adds each row's offset)
            params = [now, first + start, *itertools.chain.from_iterable(map(head, part))]
            start += size
            statements.append((values_sql("recipients", len(part)), params))
        members: list[int] = []
        segment_ids = self._slug_ids
        for rid, seg_ids in zip(
            itertools.count(first), map(segment_ids.__getitem__, map(itemgetter(_SEGMENTS), rows))
        ):
            for seg in seg_ids:
                members += (rid, seg)
        driver, pairs = self.driver, self.pairs_per_insert

        def job() -> list[int]:
            cursor = driver.cursor()
            try:
                inserted = 0
                for sql, params in statements:
                    cursor.execute(sql, params)
                    inserted += cursor.rowcount
                conflicts: list[int] = []
                wanted = members
                if inserted != len(rows):  # some addresses were already there
                    present = {
                        rid
                        for (rid,) in cursor.execute(
                            "SELECT id FROM recipients WHERE id BETWEEN ? AND ?",
                            (first, first + len(rows) - 1),
                        )
                    }
                    conflicts = [i for i in range(len(rows)) if first + i not in present]
                    wanted = []
                    for i in range(0, len(members), 2):
                        if members[i] in present:
                            wanted += members[i : i + 2]
                start = 0
                for size in _statement_sizes(len(wanted) // 2, pairs):
                    part = wanted[start : start + 2 * size]
                    start += 2 * size
                    cursor.execute(values_sql("recipient_segments", size), part)
                return conflicts
            finally:
                cursor.close()

        self.writer.submit(job, lambda conflicts: self._inserted(rows, conflicts))

    def _sqlite_values(self, table: str, count: int) -> str:
        """``INSERT ... VALUES`` for ``count`` rows: one statement, so SQLite does the
        work of many rows in one call, without the GIL (the parser goes on meanwhile)."""
        sql = self._values_sql.get((table, count))
        if sql is None:
            if table == "recipients":
                # ?1 is the time, ?2 the first row's id; then 8 values a row. Only
                # anonymous ``?`` besides: SQLite takes quadratic time to prepare
                # thousands of distinct ``?NNN``.
                values = ",".join(f"(?2+{i},?1,?1,?,?,?,?,?,?,?,?)" for i in range(count))
                sql = (
                    f"INSERT INTO recipients ({_SQLITE_COLUMNS}) VALUES {values} "
                    "ON CONFLICT (email_key) DO NOTHING"
                )
            else:
                values = ",".join(["(?,?)"] * count)
                sql = f"INSERT INTO recipient_segments (recipient_id, segment_id) VALUES {values}"
            self._values_sql[(table, count)] = sql
        return sql

    def _insert_postgresql(self, rows: list[_Row]) -> None:
        """One job: look the chunk's addresses up (one query), then COPY the new rows,
        with ids drawn from the sequence, and their memberships. COPY fails as a whole on
        a duplicate key, so rows already there are found first; another process adding
        the same address in between makes the file fail (and roll back) as a whole."""
        if self.checks_aside is None:
            self.writer.sync()  # the first chunk: nothing is queued yet
            self.checks_aside = self._set_checks_aside()
        arrays, now, lines, keys = self._slug_ids, self.now_text, [], []
        memberships: list[frozenset[int]] = []
        for row in rows:
            key, email, name, organisation, language, country, basis, source, slugs = row[:9]
            text_line = (
                f"{email}\t{key}\t{name}\t{organisation}\t{language}\t{country}\t{basis}"
                f"\t{source}\t{now}\t{now}\n"
            )
            if (
                "\\" in text_line
                or "\r" in text_line
                or text_line.count("\t") != 9
                or text_line.count("\n") != 1
            ):
                values = (email, key, name, organisation, language, country, basis, source)
                text_line = "\t".join([*map(_copy_escape, values), now, now]) + "\n"
            lines.append(text_line)
            keys.append(key)
            memberships.append(arrays[slugs])
        joined = "\n".join(keys)
        if '"' in joined or "\\" in joined:
            keys_array = "{" + ",".join(_array_item(k) for k in keys) + "}"
        else:
            keys_array = '{"' + '","'.join(keys) + '"}'
        driver, sequence = self.driver, self.id_sequence

        def job() -> list[int]:
            with driver.cursor() as cursor:
                cursor.execute(_PG_LOOKUP, (keys_array,))
                found = {key for (key,) in cursor.fetchall()}
                conflicts = [i for i, key in enumerate(keys) if key in found] if found else []
                new = [i for i, key in enumerate(keys) if key not in found]
                if not new:
                    return conflicts
                cursor.execute(_PG_IDS, (sequence, len(new)))
                ids = [rid for (rid,) in cursor.fetchall()]
                with cursor.copy(_PG_COPY_RECIPIENTS) as copy:
                    copy.write(
                        "".join([f"{rid}\t{lines[i]}" for rid, i in zip(ids, new, strict=True)])
                    )
                members = [
                    f"{rid}\t{seg}\n"
                    for rid, i in zip(ids, new, strict=True)
                    for seg in memberships[i]
                ]
                with cursor.copy(_PG_COPY_MEMBERS) as copy:
                    copy.write("".join(members))
                return conflicts

        self.writer.submit(job, lambda conflicts: self._inserted(rows, conflicts))

    def _set_checks_aside(self) -> list[tuple[str, str]]:
        """PostgreSQL checks a foreign key row by row: each membership copied costs two
        look-ups (its recipient and its segment) and a row lock, ~9 µs; at 1,000,000
        rows, three quarters of the memberships' COPY (12.0 s, 2.6 s without). Re-adding the keys after the
        load checks the whole table in one join, ~0.8 µs a row, as PostgreSQL's manual
        advises for bulk loads ("Populating a Database": remove foreign key constraints).

        So a file estimated at ``_BULK_ROWS`` rows or more, and at least a quarter of the
        registry, drops the membership table's foreign keys (``_restore_checks`` adds the same
        definitions back, by name, before the commit). The transaction makes it atomic:
        no other session ever sees the table without them; instead they wait for the
        import's commit to read the registry (the lock the drop takes). The drop waits
        at most ``_BULK_LOCK_WAIT`` for a busy table, and a role that does not own the
        table cannot drop: either way the import checks row by row, as for small files.
        Returns the keys set aside, ``[]`` when kept."""
        conn, read, position = self.conn, self.report.read, self.table.position()
        estimate = read * self.table.size // position if position else read
        if estimate < max(_BULK_ROWS, self.max_id_before // 4):
            return []
        keys = [
            (name, definition)
            for name, definition in conn.execute(
                text(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = 'recipient_segments'::regclass AND contype = 'f' "
                    "ORDER BY conname"
                )
            )
        ]
        if not keys:
            return []
        quote = conn.dialect.identifier_preparer.quote
        try:
            with conn.begin_nested():
                waited = conn.scalar(text("SELECT current_setting('lock_timeout')"))
                conn.execute(
                    text("SELECT set_config('lock_timeout', :wait, true)"),
                    {"wait": _BULK_LOCK_WAIT},
                )
                drops = ", ".join(f"DROP CONSTRAINT {quote(name)}" for name, _ in keys)
                conn.exec_driver_sql(f"ALTER TABLE recipient_segments {drops}")
                conn.execute(
                    text("SELECT set_config('lock_timeout', :wait, true)"), {"wait": waited}
                )
        except DBAPIError:
            return []  # busy, or not the owner: row by row (the savepoint undid it all)
        return keys

    def _restore_checks(self) -> None:
        """Add the foreign keys set aside back; PostgreSQL checks every row as it does."""
        if not self.checks_aside:
            return
        quote = self.conn.dialect.identifier_preparer.quote
        adds = ", ".join(
            f"ADD CONSTRAINT {quote(name)} {definition}" for name, definition in self.checks_aside
        )
        self.conn.exec_driver_sql(f"ALTER TABLE recipient_segments {adds}")
        self.checks_aside = []

    # -- rows already in the registry ----------------------------------------------

    def in_list(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """``column IN (...)`` for a batch bound at execution; one array on PostgreSQL,
        whose planner is much slower with thousands of separate parameters."""
        if self.postgresql:
            return column == any_(bindparam(name, type_=ARRAY(column.type)))
        return column.in_(bindparam(name, expanding=True))

    def _resolve(self, rows: list[_Row]) -> list[_Row]:
        """Rows (of one chunk) whose address may be in the registry: gained segments,
        ``--update``, the counts; returns the rows not found. The caller owns the
        connection (the writer is idle)."""
        report, conn = self.report, self.conn
        existing: dict[str, tuple[int, str, str]] = {}
        keys = [row[_KEY] for row in rows]
        for start in range(0, len(keys), self.batch):
            query = select(
                RECIPIENTS.c.email_key,
                RECIPIENTS.c.id,
                RECIPIENTS.c.name,
                RECIPIENTS.c.organisation,
            ).where(self.in_list(RECIPIENTS.c.email_key, "keys"))
            batch = {"keys": keys[start : start + self.batch]}
            for key, rid, name, organisation in conn.execute(query, batch):
                existing[key] = (rid, name, organisation)
        members: dict[int, set[int]] = {}
        member_id: int
        member_segment: int
        ids = [rid for rid, _, _ in existing.values()]
        for start in range(0, len(ids), self.batch):
            query = select(MEMBERS.c.recipient_id, MEMBERS.c.segment_id).where(
                self.in_list(MEMBERS.c.recipient_id, "ids")
            )
            batch_ids = {"ids": ids[start : start + self.batch]}
            for member_id, member_segment in conn.execute(query, batch_ids):
                members.setdefault(member_id, set()).add(member_segment)
        missing: list[_Row] = []
        member_rows: list[dict[str, int]] = []
        updates: list[dict[str, Any]] = []
        for row in rows:
            found = existing.get(row[_KEY])
            if found is None:
                missing.append(row)
                continue
            rid, name, organisation = found
            wanted = self.segment_ids(row[_SEGMENTS])
            gained = wanted - members.get(rid, set())
            member_rows.extend({"recipient_id": rid, "segment_id": s} for s in gained)
            if rid > self.max_id_before:
                report.duplicates += 1
                continue
            new_name = row[_NAME] or name
            new_organisation = row[_ORG] or organisation
            if self.options.update and (new_name, new_organisation) != (name, organisation):
                updates.append({"rid": rid, "new_name": new_name, "new_org": new_organisation})
                report.updated += 1
            elif gained:
                report.gained_segment += 1
            else:
                report.unchanged += 1
        if member_rows:
            conn.execute(insert(MEMBERS), member_rows)
        if updates:
            conn.execute(
                update(RECIPIENTS)
                .where(RECIPIENTS.c.id == bindparam("rid"))
                .values(
                    name=bindparam("new_name"),
                    organisation=bindparam("new_org"),
                    updated_at=self.now,
                ),
                updates,
            )
        return missing


#: Parse and write at the same time (see ``_Writer``); False runs each job in turn.
THREADED_WRITES = True

_SQLITE_COLUMNS = (
    "id, created_at, updated_at, email_key, email, name, organisation, language, country, "
    "consent_basis, consent_source"
)
#: A PostgreSQL import of this many rows or more checks its memberships' foreign keys
#: in bulk (``_set_checks_aside``): the re-check of the whole table then costs less.
_BULK_ROWS = 50_000
#: How long that waits for the membership table's lock before checking row by row.
_BULK_LOCK_WAIT = "1s"
_PG_LOOKUP = "SELECT email_key FROM recipients WHERE email_key = ANY(%s::text[])"
_PG_IDS = "SELECT nextval(%s::regclass) FROM generate_series(1, %s)"
_PG_COPY_RECIPIENTS = (
    "COPY recipients (id, email, email_key, name, organisation, language, country, "
    "consent_basis, consent_source, created_at, updated_at) FROM STDIN"
)
_PG_COPY_MEMBERS = "COPY recipient_segments (recipient_id, segment_id) FROM STDIN"


def _statement_sizes(count: int, most: int) -> Iterator[int]:
    """Rows per statement for ``count`` rows: as many of ``most`` as fit, then sizes from
    a short fixed list, so that a file needs only a few distinct statements (each one is
    prepared once, and a prepared statement of thousands of values is large)."""
    for size in (most, *(s for s in (1024, 256, 64, 16, 4, 1) if s < most)):
        while count >= size:
            yield size
            count -= size


def _array_item(value: str) -> str:
    """A value inside a PostgreSQL array literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _copy_escape(value: str) -> str:
    """A value in COPY's text format."""
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


class _Concurrent(Exception):
    """A row refused as already there is not there: another writer at the same time."""


def _check_segment_option(db: Database, options: ImportOptions) -> None:
    if options.segment is None or options.create_segments:
        return
    with db.engine.connect() as conn:
        slugs = list(conn.scalars(select(SEGMENTS.c.slug).order_by(SEGMENTS.c.slug)))
        names = {header_key(n) for n in conn.scalars(select(SEGMENTS.c.name))}
    if slugify(options.segment) not in slugs and header_key(options.segment) not in names:
        raise InputError(
            f"--segment {options.segment}: unknown segment (known: {', '.join(slugs)}); "
            "add --create-segments to create it"
        )


def import_files(
    db: Database,
    settings: Settings,
    signer: TokenSigner,
    paths: Sequence[Path],
    options: ImportOptions,
    progress: ImportProgress | None = None,
) -> list[ImportReport]:
    """Import each file in its own transaction.

    A file that cannot be read as a table (UnreadableFile / InputError, when sniffed or
    mid-way) imports nothing and the others are still imported; then the error is raised:
    the file's own, or an InputError with one line per file, each naming it.
    """
    _parse_column_options(options.columns)
    _check_segment_option(db, options)
    if options.rejects is not None and not options.rejects.is_dir():
        if len(paths) > 1:
            raise InputError(
                f"--rejects {options.rejects}: with several files, name a folder (each "
                "file's rejects are written there as NAME.rejects.csv)"
            )
        if not options.rejects.parent.is_dir():
            raise InputError(f"--rejects {options.rejects}: no folder {options.rejects.parent}")
    validator = AddressValidator()
    reports = []
    failed: list[tuple[Path, InputError]] = []
    for path in paths:
        if path.name.endswith(REJECTS_SUFFIX):
            report = ImportReport(path, skipped="a rejects file written by an earlier import")
        else:
            try:
                table = CsvTable(path)
                columns = map_columns(table, options.columns)
                report = _import_table(db, table, columns, options, signer, validator, progress)
            except InputError as exc:
                failed.append((path, exc))
                continue
        reports.append(report)
        if progress is not None:
            progress.finish(report)
    if len(failed) == 1 and str(failed[0][1]).startswith(str(failed[0][0])):
        raise failed[0][1]
    if failed:
        raise InputError(
            "\n".join(
                str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
                for path, exc in failed
            )
        )
    return reports


@contextmanager
def _keys_kept_by_the_import(conn: Connection) -> Iterator[None]:
    """SQLite: the file's transaction without the driver's foreign-key checks.

    Each membership row would look its recipient and its segment up again (~12% of the
    writing thread's time at a million rows), yet the import makes only memberships whose
    keys it has just read or written: recipients it inserted or found, segments it found
    or created, all in this one transaction, which holds the database's write lock from
    its first statement (BEGIN IMMEDIATE), so nothing else can delete them meanwhile; the
    import deletes nothing. PostgreSQL sets its keys aside only for large files and checks
    them again (``_FileImport._set_checks_aside``). The pragma is a no-op inside a
    transaction, so it is set before the file's begins; it is set back afterwards, and a
    connection that cannot take it back is discarded, never returned to the pool."""
    if conn.dialect.name != "sqlite":
        yield
        return
    driver: Any = conn.connection.driver_connection
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        try:
            driver.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error:
            conn.invalidate()


def _import_table(
    db: Database,
    table: CsvTable,
    columns: dict[str, int],
    options: ImportOptions,
    signer: TokenSigner,
    validator: AddressValidator,
    progress: ImportProgress | None,
) -> ImportReport:
    report = ImportReport(
        table.path,
        encoding=table.format.encoding_label,
        delimiter=table.format.delimiter_label,
        dry_run=options.dry_run,
        strict=options.strict,
    )
    rejects = (
        None
        if options.dry_run or options.rejects is None
        else _RejectsWriter(table, options.rejects)
    )
    if progress is not None:
        progress.start(table.path, table.size)
    concurrent = DatabaseError(
        f"{table.name}: another process changed the same recipients at the same time; "
        "nothing was imported from this file, run the import again"
    )
    try:
        with db.engine.connect() as conn, _keys_kept_by_the_import(conn):
            transaction = conn.begin()
            try:
                dbapi_error = conn.dialect.loaded_dbapi.Error
                try:
                    _FileImport(
                        conn, table, columns, options, signer, validator, report, rejects
                    ).run(progress)
                except (IntegrityError, _Concurrent):
                    raise concurrent from None
                except dbapi_error as exc:  # raised by the driver itself (the writer's jobs)
                    if isinstance(exc, conn.dialect.loaded_dbapi.IntegrityError):
                        raise concurrent from None
                    reason = " ".join(str(exc).split())
                    raise DatabaseError(
                        f"{table.name}: the database refused the import ({reason}); "
                        "nothing was imported from this file"
                    ) from None
                if options.dry_run or (options.strict and report.rejected):
                    transaction.rollback()
                else:
                    transaction.commit()
                    report.committed = True
            finally:
                if transaction.is_active:
                    transaction.rollback()
    except BaseException:
        if rejects is not None:
            rejects.discard()
        raise
    if rejects is not None:
        report.rejects_path = rejects.finish()
    return report
