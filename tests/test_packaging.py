"""A wheel that works: built from the project and installed non-editable into a fresh venv,
``clara-mail`` migrates a database, lists the campaigns and sends to the outbox from a
directory that is not the checkout, with the templates and migrations the wheel carries.

Offline: the wheel is built with this environment's setuptools (``--no-build-isolation``,
from the ``test`` extra), and the fresh venv borrows this environment's installed
dependencies through a ``.pth`` file of plain paths, so the only clara_mailer it can
import is the wheel's. The ``wheel`` and ``installed_venv`` fixtures are
tests/install_helpers.py's, built once per session (tests/conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.install_helpers import run as _run

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SHIPPED = ("templates", "migrations")
CAMPAIGN = "newsletter-2022-01"

pytestmark = pytest.mark.packaging


def _shipped_files() -> set[str]:
    """The files of templates/ and migrations/ as the wheel must carry them."""
    return {
        "clara_mailer/_shipped/" + path.relative_to(REPO).as_posix()
        for top in SHIPPED
        for path in (REPO / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_pyproject_lists_every_package() -> None:
    """pyproject lists its packages (find cannot map the shipped folders in): every package
    under clara_mailer/ must be there, and every folder of templates/ and migrations/ that
    Python would take for a package (setuptools warns about those it is not told of)."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    code = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "clara_mailer").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    shipped = set()
    for top in SHIPPED:
        for folder in [REPO / top, *(p for p in (REPO / top).rglob("*") if p.is_dir())]:
            parts = folder.relative_to(REPO).parts
            if all(part.isidentifier() for part in parts) and "__pycache__" not in parts:
                shipped.add(".".join(("clara_mailer", "_shipped", *parts)))
    missing, extra = sorted((code | shipped) - listed), sorted(listed - (code | shipped))
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    assert not extra, f"remove from [tool.setuptools] packages in pyproject.toml: {extra}"


def test_the_wheel_carries_the_shipped_files_and_no_bytecode(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "clara-mail = clara_mailer.cli:run" in whl.read(entry_points).decode()
    assert {n for n in names if n.startswith("clara_mailer/_shipped/")} == _shipped_files()
    assert "clara_mailer/_shipped/migrations/env.py" in names
    assert any(n.startswith("clara_mailer/_shipped/migrations/versions/0001") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "templates/"))]


def test_the_installed_wheel_migrates_lists_and_sends_from_any_directory(
    installed_venv: Path, tmp_path: Path
) -> None:
    venv = installed_venv
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CLARA_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return _run([venv / "bin" / "clara-mail", *args], cwd=work, env=env)

    where = _run(
        [
            venv / "bin" / "python",
            "-c",
            "import clara_mailer, clara_mailer.core.resources as r; "
            "print(clara_mailer.__file__); print(r.TEMPLATES); print(r.MIGRATIONS)",
        ],
        cwd=work,
        env=env,
    ).stdout.split()
    package, templates, migrations = (Path(line).resolve() for line in where)
    assert package.is_relative_to(venv.resolve()), package
    assert templates == package.parent / "_shipped" / "templates"
    assert migrations == package.parent / "_shipped" / "migrations"
    config = run("config").stdout
    assert f"templates_dir = {templates / 'email'}" in config

    run("db", "upgrade")
    assert (work / "clara-mail.db").is_file()
    assert CAMPAIGN in run("campaigns", "--format", "csv").stdout

    (work / "partners.csv").write_text(
        "email,name,organisation,segment,language\n"
        "ana@policia-getafe.example,Ana,Policía Local de Getafe,local-police,es\n"
        "ben@association.example,Ben,An Association,associations,en\n",
        encoding="utf-8",
    )
    run("import", "partners.csv")
    run("send", CAMPAIGN, "--segment", "local-police", "--segment", "associations", "--yes")
    sent = sorted((work / "outbox" / CAMPAIGN).glob("*.eml"))
    assert len(sent) == 2, run("report", CAMPAIGN).stdout
    assert any(b"ana@policia-getafe.example" in path.read_bytes() for path in sent)
