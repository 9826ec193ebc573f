"""Markdown bodies: ``body.<language>.md`` instead of ``<language>.html.j2``.

An author writes CommonMark (markdown-it-py) with a front matter for the subject and the
preheader, and Jinja for the recipient's fields; the file becomes a Jinja template that
extends the shared ``layout.html.j2``, so the author writes no table and no style. The
renderer loads it through ``MarkdownLoader`` and treats it as any other template: the
fast per-variant renderer, the text part and every check apply unchanged.

::

    ---
    subject = "Boletín de primavera"          # TOML, or simple  subject: Boletín...
    preheader = "Lo que ha pasado este trimestre"
    ---
    # Boletín de primavera                      (a first "# heading" is the masthead)

    {% if name %}Hola, {{ name }}:{% else %}Hola:{% endif %}

    Un párrafo con [un enlace](https://proyectoclara.es/) y una lista:

    - uno
    - dos

    ![Cartel de la conferencia](https://proyectoclara.es/cartel.png)   (alt text required)

    [[Descargar el informe]](https://proyectoclara.es/informe.pdf)     (a button)

Jinja: ``{{ ... }}`` and ``{% ... %}`` pass through Markdown untouched (in text, link
targets and buttons). A line holding only ``{% ... %}`` / ``{# ... #}`` tags is a block of
its own (``{% if segment == "local-police" %}`` ... ``{% endif %}`` around paragraphs).
"""

from __future__ import annotations

import functools
import html
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from clara_mailer.core.errors import CampaignError

if TYPE_CHECKING:  # imported on first use (_md)
    from markdown_it import MarkdownIt

#: What the front matter may set, each one line of text.
FRONT_MATTER_KEYS = ("subject", "preheader")
_FENCE = "---"
_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
_STATEMENTS_ONLY = re.compile(r"^[ \t]*(?:(?:\{%(?:(?!%\}).)*%\}|\{#(?:(?!#\}).)*#\})[ \t]*)+$")
# [[Button text]](https://...): after the Jinja is protected, so the target has no space.
_BUTTON = re.compile(r"\[\[([^\]\n]+)\]\]\(([^)\s]+)\)")
_EMPTY_ALT_IMAGE = re.compile(r"!\[\s*\]")


@functools.cache
def _md() -> MarkdownIt:
    """The CommonMark parser, made on first use: a campaign without Markdown never
    imports markdown-it."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark")


def body_file(folder: Path, language: str) -> Path:
    """``body.<language>.md`` in a campaign folder."""
    return folder / f"body.{language}.md"


# -- front matter -----------------------------------------------------------------------


def split_front_matter(text: str, path: Path) -> tuple[dict[str, str], str, int]:
    """(front matter, Markdown, lines before the Markdown) of a body file's text.

    The front matter sits between two ``---`` lines at the very top: TOML
    (``subject = "..."``) or simple ``key: value`` lines.
    """
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != _FENCE:
        return {}, text, 0
    for end in range(1, len(lines)):
        if lines[end].strip() == _FENCE:
            break
    else:
        raise CampaignError(f"{path}:1: the front matter opened by --- is never closed by ---")
    block = "".join(lines[1:end])
    meta = _parse_front_matter(block, path)
    return meta, "".join(lines[end + 1 :]), end + 1


def _parse_front_matter(block: str, path: Path) -> dict[str, str]:
    raw: dict[str, Any]
    try:
        raw = tomllib.loads(block)
    except tomllib.TOMLDecodeError:
        raw = {}
        for number, line in enumerate(block.splitlines(), start=2):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, colon, value = line.partition(":")
            if not colon or not key.strip():
                raise CampaignError(
                    f"{path}:{number}: front matter lines are key: value "
                    f'(or TOML key = "value"), not {line.strip()!r}'
                ) from None
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            raw[key.strip()] = value
    meta: dict[str, str] = {}
    for key, value in raw.items():
        if key not in FRONT_MATTER_KEYS:
            raise CampaignError(
                f"{path}: front matter: unknown key {key!r} (known: {', '.join(FRONT_MATTER_KEYS)})"
            )
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise CampaignError(f"{path}: front matter: {key} must be one line of text")
        meta[key] = value.strip()
    return meta


def read_front_matter(path: Path) -> dict[str, str]:
    """The front matter of a body file (subject, preheader), errors naming the file."""
    return split_front_matter(_read(path), path)[0]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CampaignError(f"{path}: not UTF-8 text") from None


def apply_front_matter(
    folder: Path,
    languages: tuple[str, ...],
    subjects: dict[str, str],
    preheaders: dict[str, str],
    toml_path: Path,
) -> None:
    """Take subject and preheader from each language's body file into ``subjects`` and
    ``preheaders`` (campaign.toml's values); one place each, else a CampaignError."""
    for language in languages:
        path = body_file(folder, language)
        if not path.is_file():
            continue
        if (folder / f"{language}.html.j2").is_file():
            raise CampaignError(f"{path}: give {language}.html.j2 or body.{language}.md, not both")
        for key, given in (("subject", subjects), ("preheader", preheaders)):
            value = read_front_matter(path).get(key)
            if value is None:
                continue
            if language in given:
                raise CampaignError(
                    f"{path}: {key} is given here and in {toml_path} "
                    f"(languages.{language}.{key}): keep one"
                )
            given[language] = value


# -- Markdown to a Jinja template ----------------------------------------------------------


def missing_alt_text(markdown: str, path: Path, first_line: int = 1) -> list[str]:
    """``file:line`` problems for each image without alt text (``![](...)``)."""
    problems: list[str] = []
    lines = markdown.splitlines()
    for token in _md().parse(markdown):
        if token.type != "inline" or not token.children or token.map is None:
            continue
        empty = [
            t
            for t in token.children
            if t.type == "image" and not (t.content.strip() or _JINJA.search(t.content))
        ]
        if not empty:
            continue
        start, end = token.map
        found = [n for n in range(start, end) for _ in _EMPTY_ALT_IMAGE.findall(lines[n])]
        for index, image in enumerate(empty):
            number = (found[index] if index < len(found) else start) + first_line
            src = image.attrGet("src") or ""
            problems.append(
                f"{path}:{number}: image {src} has no alt text: write ![what it shows]({src}) "
                "(read aloud and shown when images are off)"
            )
    return problems


class _Protected:
    """Jinja tags and buttons swapped for plain words markdown-it leaves alone."""

    def __init__(self) -> None:
        self.saved: list[str] = []
        #: the Markdown line (0-based) of each saved Jinja tag; -1 for a button
        self.lines: list[int] = []

    #: A button alone in its paragraph loses the paragraph; a tag-only line its comment.
    _KEPT = re.compile(r"<p>(CLARAMDB\d+Z)</p>|<!--(CLARAMDJ\d+Z)-->|CLARAMD[JB]\d+Z")

    def keep(self, text: str, kind: str = "J", line: int = -1) -> str:
        self.saved.append(text)
        self.lines.append(line)
        return f"CLARAMD{kind}{len(self.saved) - 1}Z"

    def restore(self, rendered: str) -> str:
        return self._restore(rendered, marked=False)

    def restore_with_lines(self, rendered: str) -> tuple[str, list[tuple[int, int, int]]]:
        """The restored HTML and, for each Jinja tag in it, (its HTML line, its Markdown
        line, its line count - 1), lines 0-based."""
        text = self._restore(rendered, marked=True)
        places: list[tuple[int, int, int]] = []
        html_line, last = 0, 0
        for match in _MARK.finditer(text):
            html_line += text.count("\n", last, match.start())
            last = match.start()
            index = int(match.group(1))
            if self.lines[index] >= 0:
                places.append((html_line, self.lines[index], self.saved[index].count("\n")))
        return _MARK.sub("", text), places  # the marks hold no newline: lines unchanged

    def _restore(self, rendered: str, *, marked: bool) -> str:
        # Until nothing changes: a button keeps the Jinja of its label and target inside.
        swap = self._swap_marked if marked else self._swap
        while True:
            new = self._KEPT.sub(swap, rendered)
            if new == rendered:
                return new
            rendered = new

    def _index(self, match: re.Match[str]) -> int:
        word = match.group(1) or match.group(2) or match.group(0)
        return int(word[len("CLARAMDJ") : -1])

    def _swap(self, match: re.Match[str]) -> str:
        return self.saved[self._index(match)]

    def _swap_marked(self, match: re.Match[str]) -> str:
        index = self._index(match)
        return f"\x00{index}\x01{self.saved[index]}"


#: Where a restored tag came from, while its line is looked up (``restore_with_lines``).
_MARK = re.compile("\x00(\\d+)\x01")


def _button(protected: _Protected) -> Callable[[re.Match[str]], str]:
    def make(match: re.Match[str]) -> str:
        label = _md().renderInline(match.group(1))
        href = html.escape(match.group(2), quote=True)
        return protected.keep(
            '<table class="button" role="presentation" cellpadding="0" cellspacing="0">'
            f'<tr><td class="button"><a href="{href}">{label}</a></td></tr></table>',
            "B",
        )

    return make


def markdown_to_html(markdown: str) -> str:
    """The HTML of a Markdown body, its Jinja tags intact (for the template)."""
    protected, text = _protect(markdown)
    return protected.restore(_md().render(text))


def _protect(markdown: str) -> tuple[_Protected, str]:
    """The Markdown with its Jinja tags and buttons swapped for plain words."""
    protected = _Protected()
    lines = []
    for number, line in enumerate(markdown.splitlines()):
        if _STATEMENTS_ONLY.match(line):
            # A block of its own: an HTML comment interrupts a paragraph and ends a list.
            lines.append(f"<!--{protected.keep(line.strip(), line=number)}-->")
        else:
            lines.append(line)
    text = "\n".join(lines)
    number, last = 0, 0

    def keep(match: re.Match[str]) -> str:
        nonlocal number, last
        number += text.count("\n", last, match.start())
        last = match.start()
        return protected.keep(match.group(0), line=number)

    text = _JINJA.sub(keep, text)
    return protected, _BUTTON.sub(_button(protected), text)


def _html_with_lines(markdown: str) -> tuple[str, list[tuple[int, int, int]]]:
    """``markdown_to_html`` and where its Jinja tags are (``restore_with_lines``)."""
    protected, text = _protect(markdown)
    return protected.restore_with_lines(_md().render(text))


def markdown_template(text: str, path: Path) -> str:
    """The Jinja source of a body file: it extends the shared layout; a first ``# heading``
    is the masthead (else the subject is), the rest the content. An image without alt
    text is a CampaignError naming file:line."""
    return _template_with_lines(text, path)[0]


def _template_with_lines(text: str, path: Path) -> tuple[str, dict[int, int]]:
    """``markdown_template`` and, for each line of it holding Jinja, the body file's line
    that Jinja came from (both 1-based): a runtime error is reported there."""
    _, markdown, offset = split_front_matter(text, path)
    problems = missing_alt_text(markdown, path, offset + 1)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CampaignError(problems[0] + more)
    masthead = "<h1>{{ subject }}</h1>"
    heading: list[tuple[int, int, int]] = []
    lines = markdown.splitlines()
    first = next((n for n, line in enumerate(lines) if line.strip()), None)
    if first is not None and re.match(r"^# +\S", lines[first]):
        masthead, heading = _html_with_lines(lines[first])
        masthead = masthead.strip()
        heading = [(0, first, span) for _, _, span in heading]
        lines[first] = ""
    content, places = _html_with_lines("\n".join(lines))
    head = '{% extends "layout.html.j2" %}{% block masthead %}' + masthead
    head += "{% endblock %}{% block content %}\n"
    origin: dict[int, int] = {}
    for start, places_of in ((1, heading), (1 + head.count("\n"), places)):
        for html_line, md_line, span in places_of:
            for k in range(span + 1):
                origin.setdefault(start + html_line + k, offset + md_line + k + 1)
    return head + content + "{% endblock %}\n", origin


def markdown_location(filename: str, line: int | None) -> str:
    """``file:line`` in a body file for ``line`` of its Jinja template (what a runtime
    error's traceback names), or ``file`` when it cannot be told."""
    path = Path(filename)
    try:
        origin = _template_with_lines(_read(path), path)[1]
    except (OSError, CampaignError):
        return filename
    # The line itself holds the tag; else the nearest one above it (a tag's inside).
    above = [generated for generated in origin if line is not None and generated <= line]
    return f"{filename}:{origin[max(above)]}" if above else filename


class MarkdownLoader(jinja2.FileSystemLoader):
    """The campaign's templates, with each ``*.md`` body given as its Jinja template.

    A Jinja syntax error is reported against the Markdown file's own lines."""

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        if not template.endswith(".md"):
            return source, filename, uptodate
        path = Path(filename or template)
        meta_lines = split_front_matter(source, path)[2]
        # Syntax first, on the file as written (front matter blanked): right line numbers.
        blanked = "\n" * meta_lines + "".join(source.splitlines(keepends=True)[meta_lines:])
        environment.parse(blanked, template, str(path))
        return markdown_template(source, path), filename, uptodate
