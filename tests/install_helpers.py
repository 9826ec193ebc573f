"""A non-editable install for tests, shared: the project's wheel built offline from a copy
of the checkout, installed into a fresh venv that borrows this environment's dependencies
through a ``.pth`` file of plain paths (so the only clara_mailer it can import is the
wheel's). Session-scoped: built and installed once for tests/test_packaging.py and
tests/test_project.py; use the fixtures by importing them into a test module
(``from tests.install_helpers import installed_venv, wheel``)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("templates", "migrations")


def run(
    args: Sequence[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output unless it exits 0."""
    command = [str(arg) for arg in args]
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


def clean_env(venv: Path) -> dict[str, str]:
    """The environment without CLARA_*, PYTHON* and VIRTUAL_ENV, with the venv first on PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CLARA_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the checkout (so the build leaves nothing
    in it). The copy keeps any __pycache__ folders: the wheel must leave them out."""
    if int(version("setuptools").split(".")[0]) < 77:
        pytest.fail("setuptools>=77 is needed to build the wheel: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("clara_mailer", *SHIPPED):
        shutil.copytree(REPO / name, source / name)
    dist = root / "dist"
    run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("--no-index", "-w", dist, source),
        ]
    )
    (built,) = dist.glob("clara_mail-*.whl")
    return built


@pytest.fixture(scope="session")
def installed_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (not editable) and this environment's
    dependencies visible after its own site-packages."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--clear", venv])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
    purelib = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    # Plain paths: the .pth files in them (the checkout's editable install) are not run.
    (Path(purelib) / "clara-mail-test-dependencies.pth").write_text(
        "".join(f"{path}\n" for path in site.getsitepackages())
    )
    return venv
