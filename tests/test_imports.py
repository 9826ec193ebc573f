"""What a command loads is part of its speed and memory (issue 18): ``report`` and ``send``
work with SQLAlchemy Core alone (the ORM costs ~6 MB and ~0.1 s of imports, and a send
must peak under 64 MB), a campaign without Markdown never loads markdown-it, and CSS
inlining never loads ``requests`` (premailer imports it only to fetch stylesheets, which
we never let it do). Each command runs for real in a fresh interpreter, which then lists
the modules it holds."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from clara_mailer.compose.render import _ImportedOnFirstUse
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.optouts import suppressions
from clara_mailer.store.database import Database
from clara_mailer.store.tables import deliveries, schedules, utcnow
from tests.conftest import REPO_ROOT, settings_env
from tests.report_helpers import NEWSLETTER, build_newsletter_log
from tests.send_helpers import add_recipients

# Runs the CLI in-process, then prints the top-level and second-level module names, and
# every module of clara_mailer by its full name.
_PROBE = """
import json, sys
from clara_mailer.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    sys.stdout.flush()
    names = {".".join(m.split(".")[:2]) for m in sys.modules}
    names = sorted(names | {m for m in sys.modules if m.startswith("clara_mailer.")})
    real = {m: type(sys.modules[m]).__name__ for m in ("requests",) if m in sys.modules}
    sys.stderr.write("\\nMODULES " + json.dumps({"names": names, "real": real}) + "\\n")
"""


def _modules_after(
    args: list[str], settings: Settings, cwd: Path
) -> tuple[set[str], dict[str, str]]:
    # The checkout under test, also where the venv's editable install names another one.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), **settings_env(settings)}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
        timeout=120,
    )
    line = [x for x in result.stderr.splitlines() if x.startswith("MODULES ")]
    assert result.returncode == 0 and line, result.stderr
    data = json.loads(line[-1].removeprefix("MODULES "))
    return set(data["names"]), data["real"]


def test_report_needs_no_orm(db: Database, settings: Settings, tmp_path: Path) -> None:
    build_newsletter_log(db, settings, tmp_path)
    names, _ = _modules_after(["report", NEWSLETTER], settings, tmp_path)
    assert "sqlalchemy.engine" in names  # it did read the log
    assert "sqlalchemy.orm" not in names
    assert "clara_mailer.store.models" not in names


def test_send_needs_no_orm(db: Database, settings: Settings, tmp_path: Path) -> None:
    addresses = add_recipients(db, 6, "local-police")
    signer = TokenSigner(db.secret_key(settings))
    with db.session() as s:  # opted out: the plan skips it, having hashed every address
        suppressions.suppress(s, signer, addresses[0], reason="manual", source="test")
    # --where and --rate take the send through the filters and the campaign's rate window.
    args = ["send", NEWSLETTER, "--segment", "local-police", "--where", "language=es,en"]
    names, _ = _modules_after([*args, "--rate", "1000", "--yes"], settings, tmp_path)
    assert "clara_mailer.sending.worker" in names  # it did send
    assert "sqlalchemy.orm" not in names
    assert "clara_mailer.store.models" not in names
    outbox = settings.outbox_dir / NEWSLETTER
    assert len(list(outbox.glob("*.eml"))) == 5
    with db.reading() as conn:
        query = select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
        statuses = Counter({str(status): n for status, n in conn.execute(query)})
    assert statuses == {"sent": 5, "skipped": 1}


def test_a_scheduled_send_needs_no_orm(db: Database, settings: Settings, tmp_path: Path) -> None:
    add_recipients(db, 3, "local-police")
    args = ["send", NEWSLETTER, "--segment", "local-police", "--at", "2099-01-01T09:00+01:00"]
    names, _ = _modules_after(args, settings, tmp_path)
    assert "clara_mailer.audience.schedule" in names
    assert "sqlalchemy.orm" not in names
    with db.writing() as conn:  # its time has come
        conn.execute(update(schedules).values(due_at=utcnow() - dt.timedelta(seconds=1)))
    names, _ = _modules_after(["scheduled", "run"], settings, tmp_path)
    assert "clara_mailer.sending.worker" in names
    assert "sqlalchemy.orm" not in names
    assert "clara_mailer.store.models" not in names
    assert len(list((settings.outbox_dir / NEWSLETTER).glob("*.eml"))) == 3
    with db.reading() as conn:
        assert conn.scalar(select(schedules.c.state)) == "done"


def test_rendering_a_campaign_loads_neither_requests_nor_markdown_it(
    settings: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "sample.eml"
    names, real = _modules_after(
        ["preview", NEWSLETTER, "--format", "eml", "--output", str(out)], settings, tmp_path
    )
    assert out.read_bytes().count(b"style=") > 10  # premailer inlined the CSS
    assert "premailer" in names
    assert "markdown_it" not in names  # the newsletter is HTML, not Markdown
    assert "urllib3" not in names
    assert real == {"requests": "_ImportedOnFirstUse"}


def test_the_stand_in_imports_the_module_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "clara_probe_mod.py").write_text("VALUE = 42\ndef twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stand_in = _ImportedOnFirstUse("clara_probe_mod")
    monkeypatch.setitem(sys.modules, "clara_probe_mod", stand_in)
    import clara_probe_mod  # what premailer's `import requests` does: gets the stand-in

    assert clara_probe_mod is stand_in
    assert clara_probe_mod.VALUE == 42  # first use: the real module is imported
    real = sys.modules["clara_probe_mod"]
    assert isinstance(real, types.ModuleType) and real is not stand_in
    assert clara_probe_mod.twice(4) == 8 and real.twice(5) == 10
