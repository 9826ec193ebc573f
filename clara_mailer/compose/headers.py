"""Header bytes built directly: recipient addresses and display names, per message.

``email.policy`` folds correctly but costs ~100 µs a header; these helpers do the one
case the renderer needs per recipient (``To``) in a few µs, and match what the email
package decodes: plain atoms, a quoted-string, or RFC 2047 encoded-words (≤ 75 chars
each) for non-ASCII text, anything that looks like an encoded-word, or long names.
"""

from __future__ import annotations

import base64
import re

from clara_mailer.core.errors import NeedsSMTPUTF8, UnsendableRecipient

_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+$")
_ATEXT_UTF8 = re.compile(r"^(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
# What an address may hold here: no spaces, controls, brackets or quotes (the registry
# stores addresses validated by email-validator, which refuses quoted local parts).
_ADDRESS = re.compile(r"^[^\x00-\x20\x7f<>()\[\],;:\\\"@]+@[^\x00-\x20\x7f<>()\[\],;:\\\"@]+$")
_MAX_LINE = 78
_WORD_BYTES = 45  # 45 bytes -> 60 base64 chars -> "=?utf-8?b?...?=" is 72 chars


def wire_address(address: str, *, smtputf8: bool) -> str:
    """The address as it goes on the wire, or UnsendableRecipient saying why not."""
    if len(address) > 320 or not _ADDRESS.match(address):
        raise UnsendableRecipient(f"address {address[:80]!r} cannot be used in a message")
    local, _, domain = address.rpartition("@")
    if smtputf8:
        return address
    if not local.isascii():
        raise NeedsSMTPUTF8(
            f"address {address!r} has a non-ASCII local part and the server "
            "did not announce SMTPUTF8"
        )
    if not domain.isascii():
        import idna  # on first use: its tables cost ~1.5 MB a process

        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise UnsendableRecipient(f"address {address!r}: bad domain ({exc})") from None
    return f"{local}@{domain}"


def encoded_words(text: str) -> list[str]:
    """RFC 2047 'B' encoded-words for ``text``, split on character boundaries."""
    data = text.encode("utf-8")
    if len(data) <= _WORD_BYTES:  # the usual case: one word
        return [f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?="]
    words: list[str] = []
    chunk = bytearray()
    for ch in text:
        b = ch.encode("utf-8")
        if len(chunk) + len(b) > _WORD_BYTES:
            words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
            chunk = bytearray()
        chunk += b
    if chunk:
        words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
    return words


def ascii_header(field: str, text: str) -> bytes | None:
    """``Field: text`` folded at spaces to 78 columns, for printable ASCII ``text`` (the
    stdlib folds a long one onto a line of its own, and readers then see a leading space);
    None when ``text`` needs encoding."""
    if not _PRINTABLE.match(text) or "=?" in text:
        return None
    lines: list[str] = []
    line = f"{field}:"
    for word in text.split(" "):
        if len(line) + 1 + len(word) > _MAX_LINE and line.strip() and line != f"{field}:":
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _phrase(name: str, smtputf8: bool) -> list[str]:
    """Display-name tokens: atoms, one quoted-string, or encoded-words."""
    atext = _ATEXT_UTF8 if smtputf8 else _ATEXT
    if "=?" not in name:
        words = name.split(" ")
        if all(atext.match(w) and len(w.encode()) <= 60 for w in words):
            return words
        if (smtputf8 or _PRINTABLE.match(name)) and len(name.encode()) <= 60:
            return [_quoted(name)]
    # Mixed: plain words stay atoms and only runs of the other words are
    # encoded, split between words with the space inside the earlier word, so that no
    # decoder joins two words or splits one ("Xenofo bia") at an encoded-word boundary.
    tokens: list[str] = []
    run: list[str] = []
    for word in name.split(" "):
        plain = word and "=?" not in word and len(word.encode()) <= 60
        if plain and atext.match(word):
            tokens.extend(_encoded_run(run))
            tokens.append(word)
            run = []
        else:
            run.append(word)
    tokens.extend(_encoded_run(run))
    return tokens


def _encoded_run(words: list[str]) -> list[str]:
    """Encoded-words for consecutive words, breaking between words where possible."""
    out: list[str] = []
    chunk = ""
    for i, word in enumerate(words):
        piece = word + (" " if i < len(words) - 1 else "")
        if chunk and len((chunk + piece).encode()) > _WORD_BYTES:
            out.extend(encoded_words(chunk))
            chunk = ""
        chunk += piece
    if chunk:
        out.extend(encoded_words(chunk))
    return out


def address_header(field: str, name: str, address: str, *, smtputf8: bool) -> bytes:
    """``Field: Name <address>`` folded to 78 columns, CRLF-terminated.

    ``name`` must already be one line (render.clean_field); ``address`` the wire form.
    """
    tokens = ([*_phrase(name, smtputf8)] if name else []) + [f"<{address}>"]
    lines: list[str] = []
    line = f"{field}:"
    for token in tokens:
        if len(line) + 1 + len(token.encode()) > _MAX_LINE and line != f"{field}:":
            lines.append(line)
            line = ""
        line += " " + token
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
