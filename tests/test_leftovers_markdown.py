"""A runtime Jinja error in a Markdown body names the body file and its line, from
``check``, ``preview`` and ``send`` (through the CLI, on a project made by ``init``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from clara_mailer.cli import main

pytestmark = pytest.mark.usefixtures("clean_environment")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def body(tmp_path: Path) -> Path:
    """``campaigns/spring-2022/body.es.md`` of a new project (``init``, ``new``)."""
    assert run("init", "p").exit_code == 0
    os.chdir(tmp_path / "p")
    assert run("new", "spring-2022", "--kind", "newsletter").exit_code == 0
    path = Path("campaigns", "spring-2022", "body.es.md").resolve()
    assert run("check", "spring-2022").exit_code == 0
    return path


def _with_line(path: Path, number: int, text: str) -> None:
    """Replace line ``number`` (1-based) of ``path``; the file keeps its line count."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= number
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _problem_line(result: Result, body: Path) -> str:
    """The one line of the output naming the body file (no traceback anywhere)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    named = [line.strip() for line in result.output.splitlines() if str(body) in line]
    assert len(named) == 1, result.output
    return named[0]


@pytest.mark.parametrize(
    ("line", "text", "message"),
    [
        (12, "Total: {{ 1/0 }}", "division by zero"),
        (14, "- Un punto {{ name.missing() }}", "has no attribute 'missing'"),
        (5, "# Boletín {{ project.nope.x }}", "has no attribute 'nope'"),  # the masthead
        (9, "{% for x in 1/0 %}{{ x }}{% endfor %}", "division by zero"),  # a block of its own
    ],
)
def test_a_runtime_error_names_the_markdown_line(
    body: Path, line: int, text: str, message: str
) -> None:
    _with_line(body, line, text)
    for args in (
        ("check", "spring-2022"),
        ("preview", "spring-2022", "--language", "es", "--segment", "local-police"),
        ("send", "spring-2022", "--segment", "local-police", "--yes"),
    ):
        named = _problem_line(run(*args), body)
        assert named.startswith(f"{body}:{line}: ") or named.startswith(
            f"Error: {body}:{line}: "
        ), (args, named)
        assert message in named, (args, named)


def test_an_error_inside_a_tag_of_several_lines_names_its_own_line(body: Path) -> None:
    lines = body.read_text(encoding="utf-8").splitlines()
    lines[11:12] = ["Total: {{", "  name", "  ~ (1/0) }}"]  # lines 12-14
    body.write_text("\n".join(lines) + "\n", encoding="utf-8")
    named = _problem_line(run("check", "spring-2022"), body)
    assert any(named.startswith(f"{body}:{n}: ") for n in (12, 13, 14)), named
    assert "division by zero" in named
