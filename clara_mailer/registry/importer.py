"""The recipient registry: CSV import (validate, normalise, de-duplicate, reject file),
segments, listing and showing recipients.

Import streams: rows are read, checked and written in chunks with Core statements
(one look-up of existing keys per chunk, executemany inserts), so a file of a million
rows needs the memory of one chunk. Each file is one transaction: an interrupted or
``--strict``-refused file leaves the registry exactly as it was.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO, cast

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Table,
    any_,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clara_mailer.core.csvsafe import safe_cell
from clara_mailer.core.errors import DatabaseError, InputError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import PERSONAL_OPT_OUTS
from clara_mailer.optouts.suppressions import active_suppressions
from clara_mailer.registry.addresses import AddressError, AddressValidator, email_key
from clara_mailer.registry.csvinput import CsvTable
from clara_mailer.store.database import Database
from clara_mailer.store.models import Recipient, Segment, Suppression, recipient_segments, utcnow

RECIPIENTS = cast(Table, Recipient.__table__)
SEGMENTS = cast(Table, Segment.__table__)
MEMBERS = recipient_segments

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


@dataclass(slots=True)
class _Row:
    line: int
    fields: list[str]
    email: str
    key: str
    name: str
    organisation: str
    language: str
    country: str
    consent_basis: str
    consent_source: str
    segments: frozenset[str]  # slugs


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


_NEW_RECIPIENT_COLUMNS = (
    "email",
    "email_key",
    "name",
    "organisation",
    "language",
    "country",
    "consent_basis",
    "consent_source",
    "created_at",
    "updated_at",
)


class _FileImport:
    """One file in one transaction."""

    def __init__(
        self,
        session: Session,
        table: CsvTable,
        columns: dict[str, int],
        options: ImportOptions,
        signer: TokenSigner,
        validator: AddressValidator,
        report: ImportReport,
        rejects: _RejectsWriter | None,
    ) -> None:
        self.session, self.table, self.columns = session, table, columns
        self.options, self.signer, self.validator = options, signer, validator
        self.report, self.rejects = report, rejects
        self.width = len(table.format.header)
        self.field_indexes = [columns.get(name, -1) for name in FIELDS]  # -1: the sentinel
        self.now = utcnow()
        dialect = session.get_bind().dialect.name
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
        for seg_id, slug, name in session.execute(select(Segment.id, Segment.slug, Segment.name)):
            self.segments[slug] = seg_id
            self.segment_names[header_key(name)] = slug
        self.known_slugs = frozenset(self.segments)
        self.new_segment_names: dict[str, str] = {}
        self._cell_segments: dict[str, frozenset[str]] = {}
        self._slug_ids: dict[frozenset[str], frozenset[int]] = {}
        # Recipients with a larger id were added by this file: a second sighting is a
        # duplicate within the file, found without keeping every key in memory.
        self.max_id_before: int = session.scalar(select(func.max(RECIPIENTS.c.id))) or 0
        # Few suppressions (the usual case): one query per file instead of one per chunk.
        # An opt-out arriving during the import is still caught when a send is planned.
        self.suppressed: dict[str, str] | None = None
        active = Suppression.lifted_at.is_(None)
        if (session.scalar(select(func.count()).where(active)) or 0) <= SUPPRESSIONS_IN_MEMORY:
            self.suppressed = {}
            for address_hash, reason in session.execute(
                select(Suppression.address_hash, Suppression.reason).where(active)
            ):
                self.suppressed.setdefault(address_hash, reason)
        if dialect == "sqlite":
            # A larger page cache for this connection: keys arrive in random order, so
            # the unique index on email_key touches pages all over (~15% faster).
            session.execute(text("PRAGMA cache_size = -32000"))
        self.default_segments: frozenset[str] = frozenset()
        if options.segment is not None:
            try:
                self.default_segments = frozenset({self._segment_slug(options.segment)})
            except ValueError:
                raise InputError(
                    f"--segment {options.segment[:80]!r}: a new segment's slug is 1 to 64 "
                    "lowercase letters, digits and hyphens"
                ) from None

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
            name = self.new_segment_names[slug]
            seg_id = int(
                self.session.scalars(
                    insert(SEGMENTS)
                    .values(slug=slug, name=name, created_at=self.now)
                    .returning(SEGMENTS.c.id)
                ).one()
            )
            self.segments[slug] = seg_id
            self.report.created_segments.append(slug)
        return seg_id

    def cells(self, fields: list[str]) -> list[str]:
        """The eight FIELDS of a row, trimmed ("" for a column the file lacks)."""
        fields.append("")  # what absent columns point at
        try:
            return [fields[i].strip() for i in self.field_indexes]
        finally:
            fields.pop()

    def parse(self, line: int, fields: list[str]) -> _Row | None:
        if len(fields) < self.width:
            self.reject(line, fields, f"too few columns: {len(fields)} of {self.width}")
            return None
        if len(fields) > self.width and any(f.strip() for f in fields[self.width :]):
            self.reject(line, fields, f"too many columns: {len(fields)} of {self.width}")
            return None
        raw, name, organisation, segment_cell, language_raw, country, basis_raw, source = (
            self.cells(fields)
        )
        if not raw:
            self.reject(line, fields, "no address")
            return None
        try:
            email = self.validator.normalise(raw)
        except AddressError as exc:
            self.reject(line, fields, f"bad address {raw!r}: {exc}")
            return None
        language = _LANGUAGE_VALUES.get(header_key(language_raw)) if language_raw else "es"
        if language is None:
            self.reject(line, fields, f"unknown language {language_raw!r} (use es or en)")
            return None
        if country:
            country = _COUNTRY_NAMES.get(header_key(country), country)
            if len(country) != 2 or not country.isascii() or not country.isalpha():
                self.reject(line, fields, f"country {country!r} is not a two-letter ISO code")
                return None
            country = country.upper()
        basis = _BASIS_VALUES.get(header_key(basis_raw)) if basis_raw else "legitimate-interest"
        if basis is None:
            self.reject(
                line,
                fields,
                f"unknown consent basis {basis_raw!r} (use one of {', '.join(CONSENT_BASES)})",
            )
            return None
        if segment_cell:
            try:
                segments = self._segment_cell(segment_cell)
            except KeyError as exc:
                hint = "" if self.options.create_segments else " (add --create-segments)"
                self.reject(line, fields, f"unknown segment {exc.args[0].strip()!r}{hint}")
                return None
            except ValueError as exc:
                self.reject(
                    line,
                    fields,
                    f"segment {exc.args[0].strip()[:80]!r} cannot be a new segment: a slug is "
                    "1 to 64 lowercase letters, digits and hyphens",
                )
                return None
        else:
            segments = self.default_segments
        if not segments:
            self.reject(line, fields, "no segment: add a segment column or use --segment")
            return None
        return _Row(
            line=line,
            fields=fields,
            email=email,
            key=email_key(email),
            name=clean_text(name),
            organisation=clean_text(organisation),
            language=language,
            country=country,
            consent_basis=basis,
            consent_source=clean_text(source) or self.default_source,
            segments=segments,
        )

    # -- chunks --------------------------------------------------------------------

    def flush(self, chunk: list[_Row]) -> None:
        report, session = self.report, self.session
        by_key: dict[str, _Row] = {}
        for row in chunk:
            first = by_key.get(row.key)
            if first is None:
                by_key[row.key] = row
            else:
                first.segments = first.segments | row.segments
                report.duplicates += 1
        if not by_key:
            return
        if self.suppressed == {}:
            hashes: dict[str, str] = {}  # nothing is suppressed: no need to hash
        else:
            hashes = {self.signer.address_hash(row.email): key for key, row in by_key.items()}
        if self.suppressed is None:
            opted = active_suppressions(session, hashes)
        else:
            opted = {h: self.suppressed[h] for h in hashes.keys() & self.suppressed.keys()}
        for address_hash, reason in opted.items():
            row = by_key.pop(hashes[address_hash])
            why = "opted out" if reason in PERSONAL_OPT_OUTS else f"suppressed ({reason})"
            self.reject(row.line, row.fields, why)

        existing: dict[str, tuple[int, str, str]] = {}
        keys = list(by_key)
        for start in range(0, len(keys), self.batch):
            query = select(
                RECIPIENTS.c.email_key,
                RECIPIENTS.c.id,
                RECIPIENTS.c.name,
                RECIPIENTS.c.organisation,
            ).where(self.in_list(RECIPIENTS.c.email_key, "keys"))
            batch = {"keys": keys[start : start + self.batch]}
            for key, rid, name, organisation in session.execute(query, batch):
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
            for member_id, member_segment in session.execute(query, batch_ids):
                members.setdefault(member_id, set()).add(member_segment)

        new_rows: list[tuple[Any, ...]] = []
        new_segments: dict[str, frozenset[int]] = {}
        member_rows: list[tuple[int, int]] = []
        updates: list[dict[str, Any]] = []
        for key, row in by_key.items():
            found = existing.get(key)
            if found is None:
                new_rows.append(
                    (
                        row.email,
                        key,
                        row.name,
                        row.organisation,
                        row.language,
                        row.country,
                        row.consent_basis,
                        row.consent_source,
                        self.now_param,
                        self.now_param,
                    )
                )
                new_segments[key] = self.segment_ids(row.segments)
                continue
            rid, name, organisation = found
            wanted = self.segment_ids(row.segments)
            gained = wanted - members.get(rid, set())
            member_rows.extend((rid, s) for s in gained)
            if rid > self.max_id_before:
                report.duplicates += 1
                continue
            new_name = row.name or name
            new_organisation = row.organisation or organisation
            if self.options.update and (new_name, new_organisation) != (name, organisation):
                updates.append({"rid": rid, "new_name": new_name, "new_org": new_organisation})
                report.updated += 1
            elif gained:
                report.gained_segment += 1
            else:
                report.unchanged += 1
        if new_rows:
            new_rows.sort(key=lambda r: str(r[1]))  # the unique index's pages in order
            self.insert_many(RECIPIENTS, _NEW_RECIPIENT_COLUMNS, new_rows)
            keys = [r[1] for r in new_rows]
            for start in range(0, len(keys), self.batch):
                query = select(RECIPIENTS.c.id, RECIPIENTS.c.email_key).where(
                    self.in_list(RECIPIENTS.c.email_key, "keys")
                )
                for rid, key in session.execute(query, {"keys": keys[start : start + self.batch]}):
                    member_rows.extend((rid, s) for s in new_segments[key])
            report.added += len(new_rows)
        if member_rows:
            self.insert_many(MEMBERS, ("recipient_id", "segment_id"), member_rows)
        if updates:
            session.execute(
                update(RECIPIENTS)
                .where(RECIPIENTS.c.id == bindparam("rid"))
                .values(
                    name=bindparam("new_name"),
                    organisation=bindparam("new_org"),
                    updated_at=self.now,
                ),
                updates,
            )

    def in_list(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """``column IN (...)`` for a batch bound at execution; one array on PostgreSQL,
        whose planner is much slower with thousands of separate parameters."""
        if self.postgresql:
            return column == any_(bindparam(name, type_=ARRAY(column.type)))
        return column.in_(bindparam(name, expanding=True))

    def insert_many(
        self, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]]
    ) -> None:
        """executemany at the driver: the import's hot path.

        Core's executemany spends more time building parameters per row than SQLite
        spends inserting them; the driver takes plain tuples (PostgreSQL: COPY).
        Table and column names come from models.py, never from input."""
        connection = self.session.connection()
        if connection.dialect.driver == "psycopg":
            # PostgreSQL: COPY in this transaction, several times faster than executemany.
            driver = connection.connection.driver_connection
            copy_sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
            with driver.cursor() as cursor, cursor.copy(copy_sql) as copy:  # type: ignore[union-attr]
                for row in rows:
                    copy.write_row(row)
            return
        mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
        sql = (
            f"INSERT INTO {table.name} ({', '.join(columns)}) "
            f"VALUES ({', '.join([mark] * len(columns))})"
        )
        connection.exec_driver_sql(sql, rows)

    def run(self, progress: ImportProgress | None) -> None:
        chunk: list[_Row] = []
        size = self.options.chunk_size
        for line, fields in self.table.records():
            self.report.read += 1
            row = self.parse(line, fields)
            if row is None:
                continue
            chunk.append(row)
            if len(chunk) >= size:
                self.flush(chunk)
                chunk = []
                if progress is not None:
                    progress.advance(self.table.position())
        self.flush(chunk)
        if progress is not None:
            progress.advance(self.table.size)


def _check_segment_option(db: Database, options: ImportOptions) -> None:
    if options.segment is None or options.create_segments:
        return
    with db.session() as session:
        slugs = list(session.scalars(select(Segment.slug).order_by(Segment.slug)))
        names = {header_key(n) for n in session.scalars(select(Segment.name))}
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
    try:
        with db.sessionmaker() as session:
            session.begin()
            try:
                _FileImport(
                    session, table, columns, options, signer, validator, report, rejects
                ).run(progress)
            except IntegrityError:
                raise DatabaseError(
                    f"{table.name}: another process changed the same recipients at the same "
                    "time; nothing was imported from this file, run the import again"
                ) from None
            if options.dry_run or (options.strict and report.rejected):
                session.rollback()
            else:
                session.commit()
                report.committed = True
    except BaseException:
        if rejects is not None:
            rejects.discard()
        raise
    if rejects is not None:
        report.rejects_path = rejects.finish()
    return report
