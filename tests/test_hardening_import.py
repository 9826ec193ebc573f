"""Issue 14 items 9, 13, 14 and 15: what import refuses, cleans and reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from clara_mailer.core.errors import UnreadableFile
from clara_mailer.registry.csvinput import detect_encoding
from clara_mailer.store.database import Database
from tests.registry_helpers import registry_state

Cli = Callable[..., Result]

HEADER = "email,name,organisation,segment,language\n"


def _utf8_rows(n: int) -> bytes:
    return "".join(
        f"p{i}@policia-elche.example,José Núñez {i},Policía Local de Elche,local-police,es\n"
        for i in range(n)
    ).encode("utf-8")


# --- 9: a file mixing UTF-8 and Windows-1252 ------------------------------------------


def test_mixed_utf8_and_windows_1252_is_refused_naming_the_line(
    cli: Cli, db: Database, tmp_path: Path
) -> None:
    pasted = "maria@accem.example,María Ibáñez,Accem,associations,es\n".encode("cp1252")
    data = HEADER.encode() + _utf8_rows(5) + pasted + _utf8_rows(3)
    (tmp_path / "mixed.csv").write_bytes(data)
    before = registry_state(db)
    result = cli("import", "mixed.csv")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: mixed.csv:7:"), result.output
    assert "mixed encodings" in lines[0] and "UTF-8" in lines[0]
    assert registry_state(db) == before


def test_windows_1252_file_with_a_stray_pair_is_still_windows_1252(tmp_path: Path) -> None:
    # Mostly Windows-1252, so an accidental well-formed pair (Ã© in cp1252) does not win.
    text = HEADER + "".join(
        f"p{i}@x.example,José Muñoz,Policía Local,local-police,es\n" for i in range(20)
    )
    path = tmp_path / "cp.csv"
    path.write_bytes(text.encode("cp1252") + "a@b.example,Ã©,x,y,es\n".encode("cp1252"))
    assert detect_encoding(path) == "cp1252"


def test_pure_utf8_and_pure_windows_1252_are_unchanged(tmp_path: Path) -> None:
    utf8 = tmp_path / "u.csv"
    utf8.write_bytes(HEADER.encode() + _utf8_rows(50))
    cp = tmp_path / "c.csv"
    cp.write_bytes(HEADER.encode() + _utf8_rows(50).decode().encode("cp1252"))
    assert detect_encoding(utf8) == "utf-8"
    assert detect_encoding(cp) == "cp1252"


def test_mixed_file_error_has_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(HEADER.encode() + _utf8_rows(2) + b"z@x.example,Jos\xe9,x,y,es\n")
    with pytest.raises(UnreadableFile) as caught:
        detect_encoding(path)
    assert str(caught.value).startswith(f"{path}:4:16: mixed encodings")


# --- 13: control characters and segment slugs -----------------------------------------


def _recipients(db: Database) -> dict[str, tuple[str, str]]:
    return {row[0]: (row[2], row[3]) for row in registry_state(db)["recipients"]}


def test_names_lose_line_breaks_and_bidi_controls(cli: Cli, db: Database, tmp_path: Path) -> None:
    text = (
        HEADER + '"mallory@x.example","Mallory\r\nBcc: evil@x.example","Org\u2028Two",'
        "local-police,en\n"
        'ana@x.example,"Ana \u202eezeréP\u202c","Policía\tLocal\x07",local-police,es\n'
    )
    (tmp_path / "ctl.csv").write_bytes(text.encode("utf-8"))
    result = cli("import", "ctl.csv")
    assert result.exit_code == 0, result.output
    found = _recipients(db)
    assert found["mallory@x.example"] == ("Mallory Bcc: evil@x.example", "Org Two")
    assert found["ana@x.example"] == ("Ana ezeréP", "Policía Local")
    for name, organisation in found.values():
        for value in (name, organisation):
            assert value.isprintable(), value


@pytest.mark.parametrize("slug", ["=1+1", "<script>x</script>", "a" * 65, "50%"])
def test_create_segments_refuses_slugs_outside_the_shape(
    cli: Cli, db: Database, tmp_path: Path, slug: str
) -> None:
    cell = '"' + slug.replace('"', '""') + '"'
    text = HEADER + f"ok@x.example,Ok,Org,new-segment,es\nbad@x.example,Bad,Org,{cell},es\n"
    (tmp_path / "seg.csv").write_text(text, encoding="utf-8")
    result = cli("import", "seg.csv", "--create-segments")
    assert "Traceback" not in result.output
    state = registry_state(db)
    assert "new-segment" in state["segments"]
    assert all(
        len(s) <= 64 and set(s) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
        for s in state["segments"]
    ), state["segments"]
    assert "bad@x.example" not in _recipients(db)
    assert "1 rejected" in result.output, result.output
    assert "seg.csv:3: segment " in result.output and "cannot be a new segment" in result.output


def test_segment_option_with_a_bad_slug_is_one_line(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text(HEADER.replace(",segment", "") + "a@x.example,A,O,es\n")
    result = cli("import", "s.csv", "--segment", "<b>x</b>", "--create-segments")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
