"""The command-line shell: each command parses, calls one ``Mailer`` method and presents.

Every ``MailerError`` becomes one line on stderr and its exit code; no traceback.
"""

from clara_mailer.cli import (  # noqa: F401  (commands)
    admin,
    archive,
    campaigns,
    manage,
    project,
    registry,
    report,
    schedule,
    send,
    users,
)
from clara_mailer.cli.app import main

__all__ = ["main"]
