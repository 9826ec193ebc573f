"""The command-line shell: parses, calls the library through ``Mailer`` and presents."""

from clara_mailer.cli.commands import main

__all__ = ["main"]
