"""The text/plain part, derived from the inlined HTML so that both say the same.

Lines are not wrapped: wrapping would make the text depend on the length of a
recipient's name, and the fast renderer substitutes names after conversion.
Hidden elements (the preheader, ``display:none``) are left out.
"""

from __future__ import annotations

import re

import lxml.html
from lxml.etree import _Element

_WS = re.compile(r"[ \t\n\r\f]+")  # HTML whitespace only: keep no-break spaces
_SPACES = re.compile(r" {2,}")
_DISPLAY_BLOCK = re.compile(r"display\s*:\s*block", re.IGNORECASE)
_HIDDEN = re.compile(r"display\s*:\s*none|mso-hide\s*:\s*all", re.IGNORECASE)
_SKIP = {"head", "style", "script", "title", "template"}
_BLOCK = {
    "p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "table", "tbody", "thead", "tfoot",
    "tr", "ul", "ol", "li", "blockquote", "section", "header", "footer",
    "article", "address", "center", "dl", "dt", "dd", "hr", "body", "html", "pre",
}  # fmt: skip


class _Builder:
    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.parts: list[str] = []
        self.prefix: list[str] = []

    def add(self, text: str | None) -> None:
        if text:
            self.parts.append(_WS.sub(" ", text))

    def line_break(self) -> None:
        self.parts.append("\n")

    def flush(self) -> None:
        lines = [_SPACES.sub(" ", line).strip() for line in "".join(self.parts).split("\n")]
        text = "\n".join(line for line in lines if line)
        if text:
            if self.prefix:
                text = self.prefix.pop() + text
            self.blocks.append(text)
        self.parts = []

    def result(self) -> str:
        self.flush()
        return "\n\n".join(self.blocks) + "\n"


def _hidden(el: _Element) -> bool:
    classes = (el.get("class") or "").split()
    return "preheader" in classes or bool(_HIDDEN.search(el.get("style") or ""))


def _walk(el: _Element, out: _Builder, ordinal: list[int]) -> None:
    tag = el.tag if isinstance(el.tag, str) else ""
    if not tag or tag in _SKIP or _hidden(el):
        return
    if tag == "br":
        out.line_break()
        return
    if tag == "img":
        out.add(el.get("alt"))
        return
    block = tag in _BLOCK or bool(_DISPLAY_BLOCK.search(el.get("style") or ""))
    if block:
        out.flush()
    if tag == "hr":
        out.blocks.append("-" * 40)
        return
    depth = len(out.prefix)
    if tag == "li":
        if ordinal:
            ordinal[-1] += 1
            out.prefix.append(f"{ordinal[-1]}. ")
        else:
            out.prefix.append("- ")
    if tag == "a":
        start = len(out.parts)
        out.add(el.text)
        for child in el:
            _walk(child, out, ordinal)
            out.add(child.tail)
        label = _WS.sub(" ", "".join(out.parts[start:])).strip()
        href = (el.get("href") or "").strip()
        if href.startswith("mailto:"):
            href = href[len("mailto:") :].split("?", 1)[0]
        if href and not href.startswith("#") and href != label:
            out.add(f" ({href})" if label else href)
        return
    if tag in ("td", "th"):
        out.add(" ")  # cells of a row share a line; blocks inside them still break
    nested = [0] if tag == "ol" else ([] if tag == "ul" else None)
    inner = ordinal if nested is None else nested
    out.add(el.text)
    for child in el:
        _walk(child, out, inner)
        out.add(child.tail)
    if block:
        out.flush()
    del out.prefix[depth:]  # an empty list item leaves no bullet behind


def html_to_text(html: str) -> str:
    """Plain text that says what ``html`` says: paragraphs, lists, links with their URLs."""
    root = lxml.html.document_fromstring(html)
    out = _Builder()
    _walk(root, out, [])
    return out.result()
