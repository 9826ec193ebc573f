"""Where the files that ship with clara-mail live: the e-mail templates (the shared layout
and the example campaigns), the web and report page templates, and the Alembic migrations.

In a checkout (an editable install) they are the repository's top-level ``templates/`` and
``migrations/`` folders; a wheel carries the same folders inside the package, under
``clara_mailer/_shipped/`` (mapped in by ``pyproject.toml``).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def shipped(name: str) -> Path:
    """The shipped folder ``name`` (``templates`` or ``migrations``)."""
    inside = _PACKAGE / "_shipped" / name
    return inside if inside.is_dir() else _PACKAGE.parent / name


TEMPLATES = shipped("templates")
EMAIL_TEMPLATES = TEMPLATES / "email"
WEB_TEMPLATES = TEMPLATES / "web"
REPORT_TEMPLATES = TEMPLATES / "report"
MIGRATIONS = shipped("migrations")
