"""The command-line shell: each command parses, calls one ``Mailer`` method and presents.

Every ``MailerError`` becomes one line on stderr and its exit code; no traceback.
"""

from clara_mailer.cli import admin, campaigns, registry, report, send  # noqa: F401  (commands)
from clara_mailer.cli.app import main

__all__ = ["main"]
