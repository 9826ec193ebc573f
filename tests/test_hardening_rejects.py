"""Issue 14, item 14: the rejects file goes to the working directory or --rejects PATH,
never beside a (possibly read-only) input; --strict says what it did."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from click.testing import Result

Cli = Callable[..., Result]

HEADER = "email,name,segment"
GOOD = "ana@policia-elche.example,Ana,local-police"
BAD = "not-an-address,Nadie,local-police"


def _input(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "police.csv"
    path.write_text(f"{HEADER}\n{GOOD}\n{BAD}\n", encoding="utf-8")
    return path


def test_rejects_default_to_the_working_directory_not_beside_the_input(
    cli: Cli, tmp_path: Path
) -> None:
    source = _input(tmp_path / "elsewhere")
    result = cli("import", str(source))  # the cli fixture runs in tmp_path
    assert result.exit_code == 1, result.output
    assert not (source.parent / "police.rejects.csv").exists()
    rejects = tmp_path / "police.rejects.csv"
    assert "not-an-address" in rejects.read_text(encoding="utf-8-sig")
    assert f"written to {rejects}" in result.output


def test_rejects_option_names_a_file_or_a_folder(cli: Cli, tmp_path: Path) -> None:
    source = _input(tmp_path / "in")
    target = tmp_path / "fix-me.csv"
    assert cli("import", str(source), "--rejects", str(target)).exit_code == 1
    assert "not-an-address" in target.read_text(encoding="utf-8-sig")
    folder = tmp_path / "rejects"
    folder.mkdir()
    again = _input(tmp_path / "in2")
    assert cli("import", str(again), "--rejects", str(folder)).exit_code == 1
    assert (folder / "police.rejects.csv").is_file()
    # Several inputs and one file: refused in one line, before anything is imported.
    many = cli("import", str(source), str(again), "--rejects", str(tmp_path / "x.csv"))
    assert many.exit_code == 2 and many.output.count("\n") == 1
    assert "name a folder" in many.output


def test_help_says_where_rejects_go(cli: Cli) -> None:
    text = " ".join(cli("import", "--help").output.split())
    assert "NAME.rejects.csv in the working directory" in text
    assert "beside each input" not in text


def test_strict_says_nothing_was_imported_and_why(cli: Cli, tmp_path: Path) -> None:
    source = _input(tmp_path / "in")
    result = cli("import", str(source), "--strict")
    assert result.exit_code == 1
    line = next(x for x in result.output.splitlines() if x.startswith(str(source)))
    assert "nothing imported: --strict and 1 row(s) rejected" in line
    assert "had they been fixed" in line
    listed = cli("recipients", "list", "--format", "json")
    assert "ana@policia-elche.example" not in listed.output
