"""Dashboard accounts: a name and an argon2id hash of the password, nothing else.

Passwords are hashed with argon2-cffi's defaults (argon2id, RFC 9106 low-memory
profile); a hash made with older parameters is replaced at the next good login.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.store.database import Database
from clara_mailer.store.models import User, utcnow

#: What a user name may be: short, printable, no spaces (it is shown in the audit table).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024

_hasher = PasswordHasher()
#: Verified against when the name is unknown, so a wrong name costs as long as a wrong
#: password (the response time does not tell which names exist).
_DUMMY_HASH = _hasher.hash("clara-mail: no such user")


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise InputError(
            f"not a valid user name: {name!r} (letters, digits and . _ @ -, at most 64)"
        )
    return name


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InputError(f"the password is too short (at least {MIN_PASSWORD} characters)")
    if len(password) > MAX_PASSWORD:
        raise InputError(f"the password is too long (at most {MAX_PASSWORD} characters)")


def add_user(db: Database, name: str, password: str) -> dict[str, Any]:
    """A new account; InputError when the name is taken or the password too short."""
    check_name(name)
    check_password(password)
    hashed = _hasher.hash(password)
    try:
        with db.session() as s:
            if s.scalar(select(User.id).where(User.name == name)) is not None:
                raise InputError(f"a user {name!r} exists already")
            user = User(name=name, password_hash=hashed, created_at=utcnow())
            s.add(user)
            s.flush()
            return _row(user)
    except IntegrityError:
        raise InputError(f"a user {name!r} exists already") from None


def list_users(db: Database) -> list[dict[str, Any]]:
    with db.session() as s:
        return [_row(u) for u in s.scalars(select(User).order_by(User.name))]


def remove_user(db: Database, name: str) -> None:
    """Delete the account (its sessions stop working at their next request)."""
    with db.session() as s:
        if not s.execute(delete(User).where(User.name == name)).rowcount:  # type: ignore[attr-defined]
            raise NotFound(f"no user {name!r}")


def authenticate(db: Database, name: str, password: str) -> bool:
    """Whether ``password`` is ``name``'s; as slow for an unknown name as for a known one."""
    with db.session() as s:
        user = s.scalars(select(User).where(User.name == name)).first()
        stored = user.password_hash if user is not None else _DUMMY_HASH
        try:
            _hasher.verify(stored, password[:MAX_PASSWORD])
        except (VerificationError, InvalidHashError):
            return False
        if user is None:
            return False
        if _hasher.check_needs_rehash(stored):
            user.password_hash = _hasher.hash(password)
        return True


def session_valid_after(db: Database, name: str) -> tuple[bool, dt.datetime | None]:
    """(whether the user exists, the time before which their sessions are void)."""
    with db.session() as s:
        row = s.execute(select(User.id, User.sessions_valid_after).where(User.name == name)).first()
        return (row is not None, row[1] if row is not None else None)


def end_sessions(db: Database, name: str, at: dt.datetime | None = None) -> None:
    """Void every session of ``name`` issued until now (logging out)."""
    with db.session() as s:
        user = s.scalars(select(User).where(User.name == name)).first()
        if user is not None:
            user.sessions_valid_after = at or utcnow()


def _row(user: User) -> dict[str, Any]:
    return {"name": user.name, "created_at": user.created_at.isoformat(sep=" ", timespec="seconds")}
