"""Mailbox readers for bounce processing: an mbox file, a Maildir, or an IMAP folder.

Each reader yields raw messages and is told, after the database has committed what a
message meant, whether it was handled: IMAP flags handled messages ``\\Seen`` plus the
``$ClaraProcessed`` keyword (or moves or deletes them when asked); messages that are
not bounces only get the keyword, so a person still sees them as unread. File
mailboxes are never changed: reading them twice is harmless because each bounce is
recorded once by its own key.
"""

from __future__ import annotations

import contextlib
import imaplib
import mailbox
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol
from urllib.parse import unquote, urlsplit

from clara_mailer.core.errors import BounceError
from clara_mailer.core.settings import mask_url

PROCESSED_KEYWORD = "$ClaraProcessed"
IMAP_TIMEOUT = 30.0


@dataclass(frozen=True)
class BounceSource:
    """Where to read bounces: ``kind`` is ``mbox``, ``maildir`` or ``imap``."""

    kind: str
    location: str
    folder: str = "INBOX"
    move_to: str | None = None
    delete: bool = False

    def describe(self) -> str:
        if self.kind == "imap":
            return f"{mask_url(self.location)} folder {self.folder}"
        return f"{self.kind} {self.location}"


@dataclass(frozen=True)
class MailboxMessage:
    """One raw message and where it came from (``ref``: mbox index, file key or IMAP UID)."""

    ref: str
    raw: bytes


class Mailbox(Protocol):
    def messages(self) -> Iterator[MailboxMessage]: ...

    def done(self, message: MailboxMessage, *, handled: bool) -> None: ...

    def close(self) -> None: ...


class _FileMailbox:
    """mbox and Maildir: read-only."""

    def __init__(self, box: mailbox.Mailbox[mailbox.Message], label: str) -> None:
        self._box = box
        self._label = label

    def messages(self) -> Iterator[MailboxMessage]:
        for number, key in enumerate(self._keys(), start=1):
            raw = self._box.get_bytes(key)
            yield MailboxMessage(ref=f"{self._label}#{number}", raw=raw)

    def _keys(self) -> list[str]:
        keys = list(self._box.keys())
        # Maildir keys carry no order: read oldest first (by file name: time.pid.host).
        return sorted(keys) if isinstance(self._box, mailbox.Maildir) else keys

    def done(self, message: MailboxMessage, *, handled: bool) -> None:
        pass

    def close(self) -> None:
        self._box.close()


def open_mbox(path: Path) -> _FileMailbox:
    """An mbox file; raises BounceError naming the file when it is not one."""
    if not path.is_file():
        raise BounceError(f"{path}: no such mbox file")
    with path.open("rb") as fh:
        head = fh.read(4096)
    if b"\0" in head:
        raise BounceError(f"{path}:1:1: not an mbox mailbox (binary data)")
    if head and not head.startswith(b"From "):
        raise BounceError(
            f"{path}:1:1: not an mbox mailbox (the first line must start with 'From ')"
        )
    return _FileMailbox(mailbox.mbox(path, create=False), path.name)


def open_maildir(path: Path) -> _FileMailbox:
    """A Maildir folder (cur/, new/, tmp/); raises BounceError when it is not one."""
    if not path.is_dir():
        raise BounceError(f"{path}: no such Maildir directory")
    missing = [sub for sub in ("cur", "new", "tmp") if not (path / sub).is_dir()]
    if missing:
        raise BounceError(f"{path}: not a Maildir (no {', '.join(s + '/' for s in missing)})")
    return _FileMailbox(mailbox.Maildir(path, factory=None, create=False), path.name)


def _quote_mailbox(name: str) -> str:
    """An IMAP mailbox name as a quoted string (ASCII names only)."""
    if not name.isascii() or any(c in name for c in "\r\n"):
        raise BounceError(f"IMAP folder name {name!r} must be plain ASCII")
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _reason(exc: BaseException) -> str:
    """imaplib puts the server's bytes in its exceptions: make them text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    first = exc.args[0] if exc.args else exc
    return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)


def _imap_text(data: Sequence[object]) -> str:
    parts = [d.decode("utf-8", "replace") if isinstance(d, bytes) else str(d) for d in data]
    return " ".join(p for p in parts if p and p != "None")


class ImapMailbox:
    """One folder on an IMAP server, read with stdlib imaplib."""

    def __init__(self, source: BounceSource, *, readonly: bool) -> None:
        try:
            url = urlsplit(source.location)
        except ValueError as exc:  # e.g. an unclosed [IPv6 literal
            raise BounceError(f"IMAP URL {mask_url(source.location)!r}: {exc}") from None
        if url.scheme not in ("imap", "imaps") or not url.hostname:
            raise BounceError(
                f"IMAP URL must look like imap://user:pass@host:port, not {mask_url(source.location)!r}"
            )
        self.source = source
        self.readonly = readonly
        self.host = url.hostname
        try:
            self.port = url.port or (993 if url.scheme == "imaps" else 143)
        except ValueError:
            raise BounceError(f"IMAP URL has a bad port: {mask_url(source.location)!r}") from None
        self.where = f"{self.host}:{self.port}"
        self._deleted = False
        user, password = unquote(url.username or ""), unquote(url.password or "")
        if not user:
            raise BounceError(f"IMAP URL names no user: {mask_url(source.location)!r}")
        try:
            if url.scheme == "imaps":
                self.imap: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    self.host,
                    self.port,
                    ssl_context=ssl.create_default_context(),
                    timeout=IMAP_TIMEOUT,
                )
            else:
                self.imap = imaplib.IMAP4(self.host, self.port, timeout=IMAP_TIMEOUT)
        except (OSError, imaplib.IMAP4.error) as exc:
            raise BounceError(
                f"cannot connect to IMAP server {self.where}: {_reason(exc)}"
            ) from None
        try:
            self.imap.login(user, password)
        except (imaplib.IMAP4.error, OSError) as exc:
            self._disconnect()
            raise BounceError(
                f"IMAP login to {self.where} as {user!r} failed: {_reason(exc)}"
            ) from None
        try:
            typ, data = self.imap.select(_quote_mailbox(source.folder), readonly=readonly)
            if typ != "OK":
                raise BounceError(
                    f"IMAP folder {source.folder!r} on {self.where} cannot be opened: "
                    f"{_imap_text(data)}"
                )
            if source.move_to and not readonly:
                self._ensure_folder(source.move_to)
        except BounceError:
            self.close()
            raise
        except (imaplib.IMAP4.error, OSError) as exc:
            self.close()
            raise BounceError(f"IMAP server {self.where}: {_reason(exc)}") from None
        self.can_move = "MOVE" in self.imap.capabilities

    def _ensure_folder(self, name: str) -> None:
        typ, data = self.imap.list('""', _quote_mailbox(name))
        if typ == "OK" and any(d for d in data if d):
            return
        typ, data = self.imap.create(_quote_mailbox(name))
        if typ != "OK":
            raise BounceError(
                f"IMAP folder {name!r} cannot be created on {self.where}: {_imap_text(data)}"
            )

    def _check(self, typ: str, data: list[object], what: str) -> None:
        if typ != "OK":
            raise BounceError(f"IMAP {what} failed on {self.where}: {_imap_text(data)}")

    def messages(self) -> Iterator[MailboxMessage]:
        try:
            typ, data = self.imap.uid("SEARCH", "UNKEYWORD", PROCESSED_KEYWORD)
            self._check(typ, data, "SEARCH")
            uids = [u.decode() for u in (data[0] or b"").split()] if data else []
            for uid in uids:
                typ, fetched = self.imap.uid("FETCH", uid, "(BODY.PEEK[])")
                self._check(typ, fetched, f"FETCH of UID {uid}")
                raw = next((item[1] for item in fetched if isinstance(item, tuple)), None)
                if raw is None:
                    continue  # expunged by someone else meanwhile
                yield MailboxMessage(ref=f"{self.source.folder} UID {uid}", raw=raw)
        except (imaplib.IMAP4.error, OSError) as exc:
            raise BounceError(f"IMAP server {self.where}: {_reason(exc)}") from None

    def done(self, message: MailboxMessage, *, handled: bool) -> None:
        if self.readonly:
            return
        uid = message.ref.rsplit(" ", 1)[1]
        flags = f"(\\Seen {PROCESSED_KEYWORD})" if handled else f"({PROCESSED_KEYWORD})"
        try:
            typ, data = self.imap.uid("STORE", uid, "+FLAGS.SILENT", flags)
            self._check(typ, data, f"STORE of UID {uid}")
            if not handled:
                return  # not a bounce: left in place for a person to read
            if self.source.move_to:
                target = _quote_mailbox(self.source.move_to)
                if self.can_move:
                    typ, data = self.imap.uid("MOVE", uid, target)
                    self._check(typ, data, f"MOVE of UID {uid}")
                else:
                    typ, data = self.imap.uid("COPY", uid, target)
                    self._check(typ, data, f"COPY of UID {uid}")
                    self._mark_deleted(uid)
            elif self.source.delete:
                self._mark_deleted(uid)
        except (imaplib.IMAP4.error, OSError) as exc:
            raise BounceError(f"IMAP server {self.where}: {_reason(exc)}") from None

    def _mark_deleted(self, uid: str) -> None:
        typ, data = self.imap.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
        self._check(typ, data, f"STORE of UID {uid}")
        self._deleted = True

    def close(self) -> None:
        try:
            if self._deleted:
                self.imap.expunge()
            if self.imap.state == "SELECTED":
                self.imap.close()
        except (imaplib.IMAP4.error, OSError):
            pass  # closing a broken connection: nothing left to save
        self._disconnect()

    def _disconnect(self) -> None:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            self.imap.logout()


class OpenMailbox:
    """Context manager around a reader, so the connection or file is always closed."""

    def __init__(self, source: BounceSource, *, readonly: bool = False) -> None:
        self.source = source
        self.readonly = readonly
        self.box: Mailbox | None = None

    def __enter__(self) -> Mailbox:
        if self.source.kind == "mbox":
            self.box = open_mbox(Path(self.source.location))
        elif self.source.kind == "maildir":
            self.box = open_maildir(Path(self.source.location))
        elif self.source.kind == "imap":
            self.box = ImapMailbox(self.source, readonly=self.readonly)
        else:
            raise BounceError(f"unknown mailbox kind {self.source.kind!r}")
        return self.box

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if self.box is not None:
            self.box.close()
