"""A send's check in a process of its own (``compose.checking``): the child's problems
are the check's, the variants it hands back make the very messages the sending process
would have made itself, an error in the child comes back as itself, a child that does
not answer is one line, and a real ``send`` never loads the CSS inliner."""

from __future__ import annotations

import itertools
import re
import stat
import sys
from pathlib import Path

import pytest

from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.compose.checking import CheckRun, check_and_prepare
from clara_mailer.compose.render import RecipientView, Renderer, check_campaign
from clara_mailer.core.errors import MailerError, NotFound
from clara_mailer.core.settings import Settings
from clara_mailer.store.database import Database
from tests.send_helpers import add_recipients
from tests.test_campaigns import copy_templates, local_settings
from tests.test_imports import _modules_after
from tests.test_render import CAMPAIGNS, SETTINGS, SIGNER

_DATE = re.compile(rb"^Date: [^\r]*\r\n", re.MULTILINE)


def _message(renderer: Renderer, view: RecipientView) -> bytes:
    head, body = renderer.render_parts(view, smtputf8=False, message_id="<m@clara.example>")
    return _DATE.sub(b"", b"".join([head, *body]))  # the Date header is the clock's


@pytest.mark.parametrize("slug", CAMPAIGNS)
def test_the_childs_variants_make_the_messages_the_parent_would(slug: str) -> None:
    segments = ("local-police", "associations")
    problems, variants = CheckRun.start(SETTINGS, slug, segments).result()
    assert problems == []
    defn = load_campaign(SETTINGS, slug)
    # Every variant a send to these segments can meet: each language, segment and
    # optional field present or not (the check itself renders only four of eight).
    assert set(variants) >= {
        (language, segment, *presence)
        for language, segment in itertools.product(defn.languages, segments)
        for presence in itertools.product((True, False), repeat=3)
    }
    adopted = Renderer(defn, SETTINGS, SIGNER, 12)
    adopted.adopt(variants)
    own = Renderer(defn, SETTINGS, SIGNER, 12)
    compared = 0
    for language, segment, name, org, source in variants:
        view = RecipientView(
            7,
            "ines.garcia@policia-getafe.example",
            "Inés García" if name else "",
            "Policía Local de Getafe" if org else "",
            language,
            segment,
            "registro CLARA" if source else "",
        )
        assert _message(adopted, view) == _message(own, view), (language, segment)
        compared += 1
    assert compared == len(variants)
    assert adopted.prepared().keys() == variants.keys()  # none was prepared again


def test_the_child_finds_what_the_check_finds(tmp_path: Path) -> None:
    settings = local_settings(copy_templates(tmp_path))
    layout = Path(settings.templates_dir) / "layout.html.j2"
    layout.write_text(layout.read_text().replace('href="{{ unsubscribe_url }}"', 'href="#"'))
    slug, segments = "conference-2022-02-04", ("local-police",)
    problems, _ = CheckRun.start(settings, slug, segments).result()
    assert problems and any("no unsubscribe link in the HTML" in p for p in problems)
    own = Renderer(load_campaign(settings, slug), settings, SIGNER, 0)
    expected = check_campaign(settings, slug, own, segments)
    assert problems == expected
    assert check_and_prepare(settings, slug, segments)[0] == expected


def test_an_error_in_the_child_comes_back_as_itself() -> None:
    with pytest.raises(NotFound) as in_process:
        load_campaign(SETTINGS, "no-such-campaign")
    with pytest.raises(NotFound) as from_child:
        CheckRun.start(SETTINGS, "no-such-campaign", ()).result()
    assert str(from_child.value) == str(in_process.value)


def test_a_child_that_does_not_answer_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dying = tmp_path / "python"
    dying.write_text("#!/bin/sh\ncat >/dev/null\necho 'Fatal: cannot import jinja2' >&2\nexit 3\n")
    dying.chmod(dying.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(dying))
    run = CheckRun.start(SETTINGS, "newsletter-2022-01", ())
    with pytest.raises(MailerError) as caught:
        run.result()
    assert str(caught.value) == (
        "the check of 'newsletter-2022-01' stopped: Fatal: cannot import jinja2"
    )
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\ncat >/dev/null\nexit 9\n")
    silent.chmod(silent.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(silent))
    with pytest.raises(MailerError, match=r"stopped: exit status 9$"):
        CheckRun.start(SETTINGS, "newsletter-2022-01", ()).result()


def test_a_check_that_cannot_start_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(MailerError) as caught:
        CheckRun.start(SETTINGS, "newsletter-2022-01", ())
    assert str(caught.value) == (
        f"cannot start the check of 'newsletter-2022-01' ({tmp_path / 'no-python'}): "
        "No such file or directory"
    )


def test_a_send_never_loads_the_css_inliner(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """The sending process of a real send (to the outbox) loads neither premailer nor
    lxml nor cssutils, and its messages have their CSS inlined all the same."""
    add_recipients(db, 6, "local-police")
    names, _ = _modules_after(
        ["send", "newsletter-2022-01", "--segment", "local-police", "--yes"], settings, tmp_path
    )
    sent = sorted(Path(settings.outbox_dir).glob("newsletter-2022-01/*.eml"))
    assert len(sent) == 6
    assert all(m.read_bytes().count(b"style=3D") > 10 for m in sent)  # inlined, QP-encoded
    assert "clara_mailer.compose" in names  # it did render
    assert not {"premailer", "lxml", "cssutils"} & {n.split(".")[0] for n in names}
