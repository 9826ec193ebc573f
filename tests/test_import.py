"""``clara-mail import``: dialects, encodings, bad input, de-duplication, all-or-nothing.

Every test runs on a real SQLite file and a fresh PostgreSQL database (conftest).
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from clara_mailer.core.errors import UnreadableFile
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.mailer import Mailer
from clara_mailer.optouts import suppressions
from clara_mailer.registry.addresses import email_key
from clara_mailer.registry.importer import ImportOptions, ImportReport
from clara_mailer.store.database import Database

from .conftest import REPO_ROOT
from .registry_helpers import members_of, recipient, registry_state, write

Cli = Callable[..., Result]

HEADER = "email,name,organisation,segment,language"
GOOD = (
    "ana@policia-elche.example,Ana Pérez Núñez,Policía Local de Elche,local-police,es\n"
    "john@oberaxe.example,John Smith,OBERAXE,national-authorities,en\n"
)


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --- dialects and encodings ----------------------------------------------------------


@pytest.mark.parametrize(
    ("delimiter", "encoding", "newline", "label"),
    [
        (",", "utf-8", "\n", "UTF-8, comma"),
        (";", "utf-8", "\r\n", "UTF-8, semicolon"),
        ("\t", "utf-8", "\n", "UTF-8, tab"),
        (";", "utf-8-sig", "\r\n", "UTF-8 with BOM, semicolon"),
        (";", "cp1252", "\r\n", "Windows-1252 (detected), semicolon"),
    ],
)
def test_dialects_and_encodings(
    cli: Cli, db: Database, tmp_path: Path, delimiter: str, encoding: str, newline: str, label: str
) -> None:
    text = (
        f"Correo electrónico{delimiter}Nombre{delimiter}Entidad{delimiter}Segmento\n"
        f"maria@policia-malaga.example{delimiter}María Ibáñez{delimiter}"
        f"Policía Local de Málaga{delimiter}local-police\n"
        f"jose@accem.example{delimiter}José Muñoz{delimiter}Accem{delimiter}associations\n"
    )
    path = write(tmp_path, "contactos.csv", text, encoding=encoding, newline=newline)
    result = cli("import", str(path))
    assert result.exit_code == 0, result.output
    assert label.replace(", ", " ") in result.output.replace(", ", " ").replace("-separated", "")
    maria = recipient(db, "maria@policia-malaga.example")
    assert maria is not None
    assert (maria.name, maria.organisation) == ("María Ibáñez", "Policía Local de Málaga")
    assert members_of(db, "associations") == ["jose@accem.example"]


def test_quoted_fields_with_delimiters_and_line_breaks(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    text = (
        "email;name;organisation;segment\r\n"
        'info@felgtb.example;"Área de Delitos; de Odio";"Federación Estatal de Lesbianas,\r\n'
        'Gais, Trans y Bisexuales";associations\r\n'
        'ines@cear.example;"Inés ""la de CEAR""";CEAR;associations\r\n'
    )
    path = write(tmp_path, "quoted.csv", text)
    result = cli("import", str(path))
    assert result.exit_code == 0, result.output
    felgtb = recipient(db, "info@felgtb.example")
    assert felgtb is not None and felgtb.name == "Área de Delitos; de Odio"
    assert felgtb.organisation == "Federación Estatal de Lesbianas, Gais, Trans y Bisexuales"
    ines = recipient(db, "ines@cear.example")
    assert ines is not None and ines.name == 'Inés "la de CEAR"'


def test_spanish_and_english_headers_column_option_and_multi_segments(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    text = (
        "Dirección,Contacto,Organización,Segmentos,Idioma,País,Base jurídica,Origen\n"
        "Eva@Rights.example,Eva,Rights International Spain,associations|national-authorities,"
        "English,Spain,consentimiento,formulario web\n"
    )
    path = write(tmp_path, "es.csv", text)
    refused = cli("import", str(path))
    assert refused.exit_code == 2
    assert "no address column" in refused.output and "'Dirección'" in refused.output
    result = cli("import", str(path), "--column", "email=dirección")
    assert result.exit_code == 0, result.output
    eva = recipient(db, "eva@rights.example")
    assert eva is not None
    assert eva.email == "Eva@rights.example"  # local part kept, domain normalised
    assert (eva.language, eva.country, eva.consent_basis, eva.consent_source) == (
        "en",
        "ES",
        "consent",
        "formulario web",
    )
    assert members_of(db, "associations") == members_of(db, "national-authorities") == [eva.email]


def test_internationalised_domain_is_normalised_and_keyed(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    rows = "maria@CORREO.ÑANDÚ.example,associations\nGroße.Straße@Ñandú.EXAMPLE,associations\n"
    path = write(tmp_path, "idn.csv", "email,segment\n" + rows)
    result = cli("import", str(path))
    assert result.exit_code == 0, result.output
    found = recipient(db, "maria@correo.ñandú.example")
    assert found is not None and found.email == "maria@correo.ñandú.example"
    # The stored key is email_key of the stored address (ß folds to ss).
    found = recipient(db, "große.straße@ñandú.example")
    assert found is not None and found.email == "Große.Straße@ñandú.example"
    assert found.email_key == email_key(found.email) == "grosse.strasse@ñandú.example"


# --- files that are not tables: exit 2, one line, nothing written --------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("binary.csv", b"email,segment\nx@y.example,ass\x00ociations\n", "binary.csv:2:16: binary"),
        ("empty.csv", b"", "empty.csv: the file is empty"),
        ("blank.csv", b"\xef\xbb\xbf\r\n  \r\n", "blank.csv: the file is empty"),
        ("book.csv", b"PK\x03\x04rest-of-a-zip", "book.csv: a ZIP file"),
        (
            "quote.csv",
            b'email,name,segment\na@b.example,Ana,associations\nc@d.example,"Unclosed,local-police\n',
            "quote.csv:3: unterminated quoted field",
        ),
        (
            "neither.csv",
            b"email,segment\nx@y.example,caf\xc3\xa9\n\x81@y.example,a\n",
            "neither.csv:3:1: neither UTF-8 nor Windows-1252",
        ),
    ],
)
def test_unreadable_files_exit_2_with_one_line_and_write_nothing(
    cli: Cli, db: Database, tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    before = registry_state(db)
    result = cli("import", name)
    no_traceback(result)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), result.output
    assert registry_state(db) == before
    assert not list(tmp_path.glob("*rejects*"))


def test_a_bad_second_file_is_named_and_the_good_one_imported(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    good = write(tmp_path, "good.csv", HEADER + "\n" + GOOD)
    (tmp_path / "bad.csv").write_bytes(b"\x00\x01")
    before = registry_state(db)
    result = cli("import", str(good), "bad.csv")
    assert result.exit_code == 2 and "bad.csv" in result.output
    assert len(registry_state(db)["recipients"]) > len(before["recipients"])


# --- rows it cannot take: exit 1, file:line + reason, rejects file -------------------


def test_rejected_rows_are_reported_and_written_to_the_working_directory(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    text = (
        HEADER + ",country\n"
        "ok@policia-getafe.example,Ok,Policía Local de Getafe,local-police,es,ES\n"
        "not-an-address,Bad,X,local-police,es,ES\n"
        "fr@asso.example,Fr,X,associations,fr,FR\n"
        "who@asso.example,Who,X,unknown-list,es,ES\n"
        "short@asso.example,Short\n"
        "bad2,=SUM(A1:A9),X,associations,es,ES\n"
        "nos@asso.example,NoSeg,X,,es,ES\n"
        "far@asso.example,Far,X,associations,es,Spain and Portugal\n"
        "extra@asso.example,Extra,X,associations,es,ES,surplus\n"
        "trailing@asso.example,Trailing,X,associations,es,ES,,\n"
    )
    path = write(tmp_path, "local-police.csv", text)
    result = cli("import", str(path))
    no_traceback(result)
    assert result.exit_code == 1
    out = result.output
    assert f"{path}:3: bad address 'not-an-address'" in out
    assert f"{path}:4: unknown language 'fr' (use es or en)" in out
    assert f"{path}:5: unknown segment 'unknown-list' (add --create-segments)" in out
    assert f"{path}:6: too few columns: 2 of 6" in out
    assert f"{path}:8: no segment" in out
    assert f"{path}:9: country 'Spain and Portugal'" in out
    assert f"{path}:10: too many columns: 7 of 6" in out
    assert "2 added" in out and "8 rejected" in out
    rejects = tmp_path / "local-police.rejects.csv"
    assert f"written to {rejects}" in out
    with rejects.open(encoding="utf-8-sig", newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == [
        "email",
        "name",
        "organisation",
        "segment",
        "language",
        "country",
        "line",
        "reason",
    ]
    assert [r[6] for r in rows[1:]] == ["3", "4", "5", "6", "7", "8", "9", "10"]
    assert rows[4][:2] == ["short@asso.example", "Short"]
    # A cell that a spreadsheet would run as a formula is neutralised in the rejects file.
    assert rows[5][:2] == ["bad2", "'=SUM(A1:A9)"]
    assert members_of(db, "local-police") == ["ok@policia-getafe.example"]
    assert members_of(db, "associations") == ["trailing@asso.example"]  # empty extra cells

    # A later `import *.csv` skips the rejects file instead of importing it.
    again = cli("import", str(path), str(rejects))
    assert f"{rejects}: skipped (a rejects file written by an earlier import)" in again.output


def test_unknown_segment_can_be_created(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "email,segment\nv@asso.example,Víctimas y Testigos\n")
    result = cli("import", str(path), "--create-segments")
    assert result.exit_code == 0, result.output
    assert "created segment(s) victimas-y-testigos" in result.output
    assert members_of(db, "victimas-y-testigos") == ["v@asso.example"]


def test_segment_option_and_its_validation(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", "correo,nombre\nu@asso.example,U\n")
    unknown = cli("import", str(path), "--segment", "nope")
    assert unknown.exit_code == 2 and "--segment nope: unknown segment" in unknown.output
    result = cli("import", str(path), "--segment", "associations")
    assert result.exit_code == 0, result.output
    assert members_of(db, "associations") == ["u@asso.example"]


def test_opted_out_address_is_rejected_and_not_re_added(
    cli: Cli, db: Database, settings: Settings, tmp_path: Path
) -> None:
    signer = TokenSigner(db.secret_key(settings))
    with db.session() as s:
        suppressions.suppress(s, signer, "Gone@Asso.example", reason="unsubscribe")
    path = write(
        tmp_path,
        "a.csv",
        "email,segment\ngone@asso.example,associations\nstay@asso.example,associations\n",
    )
    result = cli("import", str(path))
    assert result.exit_code == 1
    assert f"{path}:2: opted out" in result.output
    assert recipient(db, "gone@asso.example") is None
    assert members_of(db, "associations") == ["stay@asso.example"]


def test_strict_imports_nothing_from_a_file_with_a_rejected_row(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    path = write(tmp_path, "s.csv", HEADER + "\n" + GOOD + "bad@,X,Y,associations,es\n")
    before = registry_state(db)
    result = cli("import", str(path), "--strict")
    assert result.exit_code == 1
    assert "nothing imported: --strict" in result.output
    assert registry_state(db) == before
    assert (tmp_path / "s.rejects.csv").is_file()  # so the rows can be fixed


def test_dry_run_writes_nothing(cli: Cli, db: Database, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "d.csv",
        HEADER + "\n" + GOOD + "x@asso.example,X,Y,new-seg,es\nbad,X,Y,associations,es\n",
    )
    before = registry_state(db)
    result = cli("import", str(path), "--dry-run", "--create-segments")
    assert result.exit_code == 1
    assert "3 added" in result.output and "1 rejected" in result.output
    assert "dry run: nothing written" in result.output
    assert registry_state(db) == before
    assert not list(tmp_path.glob("*rejects*"))


# --- de-duplication and updates ------------------------------------------------------


def test_duplicates_within_a_file_across_chunks(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    text = (
        "email,name,segment\n"
        "Ana@Asso.example,Ana,associations\n"
        "b@asso.example,B,associations\n"
        "c@asso.example,C,associations\n"
        " ana@ASSO.example ,Ana 2,local-police\n"  # third chunk: found in the database
        "B@asso.example,B 2,associations\n"
        "b@asso.example,B 3,associations\n"  # same chunk as the line above
    )
    path = write(tmp_path, "dup.csv", text)
    [report] = Mailer(settings, database=db).import_files([path], ImportOptions(chunk_size=2))
    assert (report.read, report.added, report.duplicates, report.rejected) == (6, 3, 3, 0)
    ana = recipient(db, "ana@asso.example")
    assert ana is not None and ana.email == "Ana@asso.example" and ana.name == "Ana"
    assert members_of(db, "local-police") == ["Ana@asso.example"]


def test_existing_recipients_gain_segments_and_update_only_when_asked(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    first = write(tmp_path, "one.csv", HEADER + "\n" + GOOD)
    assert cli("import", str(first)).exit_code == 0
    again = write(
        tmp_path,
        "two.csv",
        HEADER + "\n"
        "ANA@policia-elche.example,Ana P.,Ayuntamiento de Elche,associations,es\n"
        "john@oberaxe.example,John Smith,OBERAXE,national-authorities,en\n"
        "new@asso.example,New,Asso,associations,es\n",
    )
    result = cli("import", str(again))
    assert result.exit_code == 0, result.output
    assert "1 added, 0 updated, 1 gained a segment, 1 unchanged" in result.output
    ana = recipient(db, "ana@policia-elche.example")
    assert ana is not None and ana.name == "Ana Pérez Núñez"
    assert members_of(db, "associations") == ["ana@policia-elche.example", "new@asso.example"]

    updated = cli("import", str(again), "--update")
    assert updated.exit_code == 0, updated.output
    assert "0 added, 1 updated, 0 gained a segment, 2 unchanged" in updated.output
    ana = recipient(db, "ana@policia-elche.example")
    assert ana is not None
    assert (ana.name, ana.organisation) == ("Ana P.", "Ayuntamiento de Elche")


def test_report_counts_add_up(db: Database, settings: Settings, tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", HEADER + "\n" + GOOD + GOOD + "bad,X,Y,associations,es\n")
    [report] = Mailer(settings, database=db).import_files([path], ImportOptions())
    parts = (
        report.added,
        report.updated,
        report.gained_segment,
        report.unchanged,
        report.duplicates,
        report.rejected,
    )
    assert parts == (2, 0, 0, 0, 2, 1) and sum(parts) == report.read == 5


# --- all or nothing ------------------------------------------------------------------


class InterruptAfterFirstChunk:
    """A progress callback that interrupts the import like Ctrl-C after one chunk."""

    def __init__(self) -> None:
        self.advanced = 0

    def start(self, path: Path, total_bytes: int) -> None:
        pass

    def advance(self, position: int) -> None:
        self.advanced += 1
        raise KeyboardInterrupt

    def finish(self, report: ImportReport) -> None:
        pass


def many_rows(count: int) -> str:
    return "".join(f"user{n}@asso.example,User {n},Asso,associations,es\n" for n in range(count))


def test_interrupted_import_leaves_registry_as_it_was(
    cli: Cli, db: Database, settings: Settings, tmp_path: Path
) -> None:
    assert cli("import", str(write(tmp_path, "one.csv", HEADER + "\n" + GOOD))).exit_code == 0
    before = registry_state(db)
    path = write(tmp_path, "big.csv", HEADER + "\n" + many_rows(50) + "bad,X,Y,associations,es\n")
    progress = InterruptAfterFirstChunk()
    with pytest.raises(KeyboardInterrupt):
        Mailer(settings, database=db).import_files([path], ImportOptions(chunk_size=10), progress)
    assert progress.advanced == 1
    assert registry_state(db) == before
    assert not list(tmp_path.glob("*rejects*"))


def test_unterminated_quote_after_many_chunks_rolls_back_the_file(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    before = registry_state(db)
    path = write(
        tmp_path,
        "late.csv",
        HEADER + "\n" + many_rows(40) + 'z@asso.example,"Z,Y,associations,es\n',
    )
    with pytest.raises(UnreadableFile) as caught:
        Mailer(settings, database=db).import_files([path], ImportOptions(chunk_size=7))
    assert caught.value.line == 42 and "unterminated" in str(caught.value)
    assert registry_state(db) == before


def pooled_foreign_keys(db: Database) -> list[int]:
    """``PRAGMA foreign_keys`` of every connection the pool holds, each checked out."""
    with contextlib.ExitStack() as stack:
        conns = [
            stack.enter_context(db.engine.connect()) for _ in range(db.engine.pool.checkedin())
        ]
        return [c.exec_driver_sql("PRAGMA foreign_keys").scalar_one() for c in conns]


def test_sqlite_imports_leave_keys_checked_and_consistent(
    cli: Cli, db: Database, settings: Settings, tmp_path: Path
) -> None:
    # The import turns the driver's foreign-key checks off for its own transaction (its
    # memberships use keys it holds under the write lock): they are on again after a
    # committed, a failed and a dry-run import, and every row it wrote has its keys.
    if db.dialect != "sqlite":
        pytest.skip("SQLite only")
    mailer = Mailer(settings, database=db)
    first = write(tmp_path, "one.csv", HEADER + "\n" + GOOD)
    mailer.import_files([first])
    again = write(
        tmp_path,
        "two.csv",
        HEADER + "\n" + GOOD.replace("local-police", "brand-new") + many_rows(30),
    )
    [report] = mailer.import_files(
        [again], ImportOptions(chunk_size=7, create_segments=True, dry_run=True)
    )
    assert report.added == 30 and not report.committed
    [report] = mailer.import_files([again], ImportOptions(chunk_size=7, create_segments=True))
    assert report.added == 30 and report.gained_segment > 0 and report.committed
    late = write(tmp_path, "late.csv", HEADER + "\n" + 'z@asso.example,"Z,Y,associations,es\n')
    with pytest.raises(UnreadableFile):
        mailer.import_files([late])
    pooled = pooled_foreign_keys(db)
    assert pooled and set(pooled) == {1}
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
        orphans = conn.exec_driver_sql(
            "SELECT COUNT(*) FROM recipient_segments m LEFT JOIN segments s "
            "ON s.id = m.segment_id LEFT JOIN recipients r ON r.id = m.recipient_id "
            "WHERE s.id IS NULL OR r.id IS NULL"
        ).scalar_one()
    assert orphans == 0


# --- the seed registry ---------------------------------------------------------------


def test_seed_registry_imports_with_its_counts(cli: Cli, db: Database) -> None:
    seeds = sorted((REPO_ROOT / "recipients").glob("*.csv"))
    assert [p.name for p in seeds] == [
        "associations.csv",
        "city-networks.csv",
        "local-police.csv",
        "media.csv",
        "national-authorities.csv",
    ]
    expected: dict[str, int] = {}
    addresses = set()
    for path in seeds:
        with path.open(encoding="utf-8", newline="") as stream:
            rows = list(csv.DictReader(stream))
        assert rows
        for row in rows:
            addresses.add(row["Correo electrónico"].lower())
            assert row["Correo electrónico"].endswith(".example")
            for slug in row["Segmento"].split("|"):
                expected[slug] = expected.get(slug, 0) + 1
    result = cli("import", *map(str, seeds))
    assert result.exit_code == 0, result.output
    counts = {
        row["slug"]: row["members"]
        for row in __import__("json").loads(cli("segments", "--format", "json").output)
    }
    assert counts == expected
    # Section 5.3 of the report: 9 national authorities, 23 local police organisations,
    # 59 associations and social entities (the list has 59 entries).
    assert (counts["national-authorities"], counts["local-police"]) == (9, 23)
    assert counts["associations"] == 59
    assert len(registry_state(db)["recipients"]) == len(addresses)


def test_missing_file_and_bad_column_options(cli: Cli, tmp_path: Path) -> None:
    missing = cli("import", "nope.csv")
    assert missing.exit_code == 2
    assert missing.output.strip() == "Error: nope.csv: cannot open: No such file or directory"
    path = write(tmp_path, "p.csv", HEADER + "\n" + GOOD)
    unknown = cli("import", str(path), "--column", "phone=Teléfono")
    assert unknown.exit_code == 2 and "unknown field 'phone'" in unknown.output
    shapeless = cli("import", str(path), "--column", "email")
    assert shapeless.exit_code == 2 and "use FIELD=HEADER" in shapeless.output
    absent = cli("import", str(path), "--column", "email=Correo-e")
    assert absent.exit_code == 2
    assert "--column email=Correo-e: no such column (found: email, name" in absent.output
