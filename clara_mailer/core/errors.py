"""One tree of errors for the whole library.

The CLI turns any ``MailerError`` into one line on stderr and its ``exit_code``;
nothing else escapes as a traceback.

::

    MailerError
    ├── ConfigError              bad setting or clara-mail.toml
    ├── DatabaseError
    │   └── SchemaOutdated       database behind the newest migration
    ├── InputError               bad input at file:line:column
    │   └── UnreadableFile       not a table at all (binary, empty, unterminated quote)
    ├── NotFound                 unknown recipient, segment or campaign
    ├── CampaignError            campaign definition or template problem
    │   └── CheckFailed          ``clara-mail check`` found problems
    ├── TokenError               forged, altered or unknown token
    ├── UnsendableRecipient      this recipient's message cannot be built (delivery fails)
    │   └── NeedsSMTPUTF8        non-ASCII local part, server lacks SMTPUTF8
    ├── TransportError           SMTP URL or connection problem before any message
    ├── SendError                a send that must not start or resume
    └── BounceError              a mailbox that cannot be read
"""

from __future__ import annotations


class MailerError(Exception):
    """Base of every error clara-mail raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(MailerError):
    exit_code = 2


class DatabaseError(MailerError):
    exit_code = 2


class SchemaOutdated(DatabaseError):
    pass


class InputError(MailerError):
    """Bad input; the message names where (file:line:column) when it is known."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        where = ":".join(str(p) for p in (path, line, column) if p is not None)
        super().__init__(f"{where}: {message}" if where else message)
        self.path, self.line, self.column = path, line, column
        self.reason = message


class UnreadableFile(InputError):
    exit_code = 2


class NotFound(MailerError):
    exit_code = 1


class CampaignError(MailerError):
    exit_code = 2


class CheckFailed(CampaignError):
    """Raised with every problem found, one per line in ``problems``."""

    def __init__(self, slug: str, problems: list[str]) -> None:
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(
            f"campaign {slug!r} failed its check ({len(problems)} problem(s)):\n{lines}"
        )
        self.problems = problems


class TokenError(MailerError):
    pass


class UnsendableRecipient(MailerError):
    """One recipient's message cannot be built; the sender records a ``failed`` delivery."""


class NeedsSMTPUTF8(UnsendableRecipient):
    """The address has a non-ASCII local part and the server did not announce SMTPUTF8."""


class TransportError(MailerError):
    exit_code = 3


class SendError(MailerError):
    exit_code = 2


class BounceError(MailerError):
    exit_code = 2
