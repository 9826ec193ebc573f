"""The command-line shell: each command parses, calls one ``Mailer`` method and presents.

Every ``MailerError`` becomes one line on stderr and its exit code; no traceback.
"""

import gc

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


def run() -> None:
    """The ``clara-mail`` program (its console script and ``python -m clara_mailer``):
    ``main``, in a process that ends with it.

    Once the command is done, nothing is left to free: the database is closed (the
    context's ``App.close``), the output flushed, the workers joined. Yet the
    interpreter's exit still runs a last garbage collection over every object the
    command made (the renderer's variants, SQLAlchemy, the imported modules): ~0.2 s
    after a send, for memory the system takes back anyway. ``gc.freeze`` leaves those
    objects out of it; the exit's flushes and ``atexit`` handlers run as before. Only
    here, never in ``main``: a test runs ``main`` in its own process, many times."""
    try:
        main()
    finally:
        gc.freeze()


__all__ = ["main", "run"]
