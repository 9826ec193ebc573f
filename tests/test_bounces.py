"""Bounce processing: parsing real MTA formats, matching, policy, idempotence, the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select

from clara_mailer.bounces.mailboxes import BounceSource
from clara_mailer.bounces.parse import bounce_kind, normalise_status, parse_bounce
from clara_mailer.core.errors import BounceError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.mailer import Mailer
from clara_mailer.store.database import Database
from clara_mailer.store.models import Bounce, Delivery, Suppression
from tests.bounces_helpers import (
    RECIPIENTS,
    all_samples,
    bounce_rows,
    delivery_status,
    sample,
    seed,
    suppression_reasons,
    write_mbox,
)

# --- classification and parsing (no database) ----------------------------------------------


@pytest.mark.parametrize(
    ("status", "action", "kind"),
    [
        ("5.1.1", "failed", "hard"),
        ("5.1.2", "failed", "hard"),
        ("5.1.3", "failed", "hard"),
        ("5.1.10", "failed", "hard"),
        ("5.2.1", "failed", "hard"),
        ("5.2.2", "failed", "soft"),
        ("4.2.2", "failed", "soft"),  # flufl.bounce would call this permanent
        ("4.4.7", "failed", "soft"),
        ("5.7.1", "failed", "policy"),
        ("5.7.26", "failed", "policy"),
        ("4.4.1", "delayed", "delayed"),
        ("2.0.0", "delivered", None),
        ("5.0.0", "failed", "soft"),
        ("", "failed", "soft"),
        ("5.1.1 (bad destination mailbox address)", "Failed", "hard"),
    ],
)
def test_bounce_kind(status: str, action: str, kind: str | None) -> None:
    assert bounce_kind(status, action) == kind


def test_normalise_status_reads_codes_inside_text() -> None:
    assert normalise_status("smtp; 550 5.1.10 RESOLVER.ADR.RecipientNotFound") == "5.1.10"
    assert normalise_status("Sorry, no mailbox here by that name. (#5.1.1)") == "5.1.1"
    assert normalise_status("host 192.0.2.10 said: 550 go away") == ""


EXPECTED = {
    # sample: (category, address, action, status, kind, original Message-ID)
    "postfix-5.1.1.eml": (
        "lost.user@policia-local.example", "failed", "5.1.1", "hard",
        "<newsletter-2022-01.r1@clara.example>",
    ),
    "exim-5.2.2.eml": (
        "buzon.lleno@asociacion.example", "failed", "5.2.2", "soft",
        "<newsletter-2022-01.r2@clara.example>",
    ),
    "exim-plain-5.1.1.eml": (
        "ex.concejal@ayuntamiento.example", "failed", "5.0.0", "soft",
        "<invitation-2022.r5@clara.example>",
    ),
    "office365-5.1.10.eml": (
        "nobody@oberaxe.example", "failed", "5.1.10", "hard",
        "<newsletter-2022-01.r3@clara.example>",
    ),
    "exchange-4.4.7-expired.eml": (
        "archivo@leganes.example", "failed", "4.4.7", "soft",
        "<newsletter-2022-01.r9@clara.example>",
    ),
    "gmail-5.1.1.eml": (
        "gone.away@gmail.example", "failed", "5.1.1", "hard",
        "<newsletter-2022-01.r4@clara.example>",
    ),
    "qmail-5.1.1.txt": (
        "vecino@ayto-elche.example", "failed", "5.1.1", "hard",
        "<164328663912.1402.7741@old-sender.clara.example>",
    ),
    "postfix-delayed-4.4.1.eml": (
        "policia@fuenlabrada.example", "delayed", "4.4.1", "delayed",
        "<newsletter-2022-01.r6@clara.example>",
    ),
    "postfix-5.7.1-policy.eml": ("prensa@getafe.example", "failed", "5.7.1", "policy", None),
    "unknown-recipient-5.1.1.eml": ("desconocido@nowhere.example", "failed", "5.1.1", "hard", None),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parse_real_mta_formats(name: str) -> None:
    address, action, status, kind, original_id = EXPECTED[name]
    parsed = parse_bounce(sample(name))
    assert parsed.category == "bounce"
    assert [(e.address, e.action, e.status, e.kind) for e in parsed.events] == [
        (address, action, status, kind)
    ]
    assert parsed.original_message_id == original_id
    assert parsed.events[0].diagnostic  # says why, in the MTA's words


def test_every_sample_is_covered() -> None:
    names = {p.name for p in (Path(__file__).parent / "bounce_samples").iterdir()}
    assert names == {*EXPECTED, "out-of-office-es.eml"}


def test_out_of_office_is_not_a_bounce() -> None:
    parsed = parse_bounce(sample("out-of-office-es.eml"))
    assert parsed.category == "auto-reply"
    assert parsed.events == []


@pytest.mark.parametrize(
    "headers",
    [
        "Subject: Fuera de la oficina\n",
        "Subject: =?utf-8?q?Respuesta_autom=C3=A1tica=3A_Bolet=C3=ADn?=\n",
        "Subject: Out of Office: CLARA newsletter\n",
        "Subject: Re: CLARA newsletter\nX-Autoreply: yes\n",
        "Subject: Re: CLARA newsletter\nPrecedence: auto_reply\n",
        "Subject: Re: CLARA newsletter\nAuto-Submitted: auto-replied (vacation)\n",
    ],
)
def test_auto_reply_signals(headers: str) -> None:
    raw = (
        "From: someone@pamplona.example\nTo: bounces@clara.example\n"
        f"Message-ID: <a1@pamplona.example>\n{headers}\nI am away until Monday.\n"
    )
    assert parse_bounce(raw.encode()).category == "auto-reply"


def test_a_plain_reply_is_neither_bounce_nor_auto_reply() -> None:
    raw = (
        b"From: someone@pamplona.example\nTo: bounces@clara.example\n"
        b"Subject: Re: CLARA newsletter\nMessage-ID: <r1@pamplona.example>\n\nThanks!\n"
    )
    assert parse_bounce(raw).category == "other"


def test_message_key_without_message_id_is_a_content_hash() -> None:
    raw = sample("qmail-5.1.1.txt")
    without_id = re.sub(rb"(?m)^Message-ID: <2022[^\n]*\n", b"", raw, count=1)
    key = parse_bounce(without_id).message_key
    assert key.startswith("sha256:")
    assert parse_bounce(without_id.replace(b"\n", b"\r\n")).message_key == key
    assert parse_bounce(without_id + b"more\n").message_key != key


# --- import: matching, policy, idempotence (both backends) -----------------------------------


def _import(db: Database, settings: Settings, path: Path, **kw: object) -> object:
    return Mailer(settings, database=db).import_bounces(BounceSource("mbox", str(path)), **kw)  # type: ignore[arg-type]


def test_import_all_samples(db: Database, settings: Settings, tmp_path: Path) -> None:
    seed(db)
    mbox = write_mbox(tmp_path / "bounces.mbox", all_samples())
    report = Mailer(settings, database=db).import_bounces(BounceSource("mbox", str(mbox)))

    assert report.counts() == {
        "read": 11,
        "bounces": 10,
        "hard": 5,
        "soft": 3,
        "policy": 1,
        "delayed": 1,
        "auto-replies ignored": 1,
        "not bounces": 0,
        "unmatched": 1,
        "already seen": 0,
        "addresses suppressed": 4,
    }
    assert report.matched_by == {"verp": 6, "message-id": 2, "address": 1}
    assert [u.address for u in report.unmatched] == ["desconocido@nowhere.example"]
    assert [(w.address, w.status) for w in report.warnings] == [("prensa@getafe.example", "5.7.1")]

    status = delivery_status(db)
    # Failed deliveries are bounced (hard, soft and policy alike); delayed and the
    # auto-replied one stay sent.
    assert status == {
        1: "bounced", 2: "bounced", 3: "bounced", 4: "bounced", 5: "bounced",
        6: "sent", 7: "bounced", 8: "sent", 9: "bounced", 10: "bounced",
    }  # fmt: skip
    with db.session() as s:
        d1 = s.get(Delivery, 1)
        assert d1 is not None
        assert d1.smtp_code == 550
        assert d1.smtp_reply is not None and d1.smtp_reply.startswith("bounce 5.1.1 550 5.1.1")
        signer = TokenSigner(settings.secret_key or "")
        suppressed = dict(s.execute(select(Suppression.address_hash, Suppression.reason)).all())
        by_address = {signer.address_hash(RECIPIENTS[i]): i for i in RECIPIENTS}
        assert sorted(by_address[h] for h in suppressed) == [1, 3, 4, 10]
        assert set(suppressed.values()) == {"hard-bounce"}
        kinds = dict(s.execute(select(Bounce.delivery_id, Bounce.kind)).all())
        assert kinds[6] == "delayed" and kinds[7] == "policy" and kinds[9] == "soft"


def test_import_twice_changes_nothing(db: Database, settings: Settings, tmp_path: Path) -> None:
    seed(db)
    mbox = write_mbox(tmp_path / "bounces.mbox", all_samples())
    Mailer(settings, database=db).import_bounces(BounceSource("mbox", str(mbox)))
    before = (bounce_rows(db), delivery_status(db), suppression_reasons(db))

    again = Mailer(settings, database=db).import_bounces(BounceSource("mbox", str(mbox)))

    assert (bounce_rows(db), delivery_status(db), suppression_reasons(db)) == before
    assert again.bounces == 0 and again.already_seen == 10 and again.suppressed == 0
    assert again.auto_replies == 1 and again.unmatched == []


def test_the_same_bounce_twice_in_one_mailbox(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    seed(db)
    mbox = write_mbox(tmp_path / "dup.mbox", [sample("postfix-5.1.1.eml")] * 2)
    report = Mailer(settings, database=db).import_bounces(BounceSource("mbox", str(mbox)))
    assert (report.hard, report.already_seen, len(bounce_rows(db))) == (1, 1, 1)


def test_dry_run_writes_nothing(db: Database, settings: Settings, tmp_path: Path) -> None:
    seed(db)
    mbox = write_mbox(tmp_path / "bounces.mbox", all_samples())
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(mbox)), dry_run=True
    )
    assert report.hard == 5 and report.suppressed == 4
    assert bounce_rows(db) == [] and suppression_reasons(db) == []
    assert set(delivery_status(db).values()) == {"sent"}


def _soft(n: int, day: int) -> bytes:
    """The Exim 5.2.2 (mailbox full) bounce, as the n-th one received on January ``day``."""
    raw = sample("exim-5.2.2.eml")
    raw = raw.replace(
        b"<E1nCI9v-0003Ls-9x@relay.clara.example>", f"<soft{n}@relay.example>".encode()
    )
    return raw.replace(
        b"Date: Tue, 25 Jan 2022 11:03:27 +0100",
        f"Date: {day:02d} Jan 2022 11:03:27 +0100".encode(),
    )


def test_three_soft_bounces_in_the_window_suppress(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    seed(db)
    first = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(write_mbox(tmp_path / "a", [_soft(1, 3), _soft(2, 10)]))),
    )
    assert (first.soft, first.suppressed, suppression_reasons(db)) == (2, 0, [])
    third = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(write_mbox(tmp_path / "b", [_soft(3, 20)])))
    )
    assert (third.soft, third.suppressed, suppression_reasons(db)) == (1, 1, ["soft-bounces"])


def test_soft_bounces_outside_the_window_do_not_suppress(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    seed(db)
    spread = [_soft(1, 1), _soft(2, 17), _soft(3, 31), _soft(4, 31)]
    # Days 1, 17, 31: never three within 30 days counting back from 31 (1 is 30 days before).
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(write_mbox(tmp_path / "s", spread[:3])))
    )
    assert (report.soft, report.suppressed) == (3, 0)
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(write_mbox(tmp_path / "t", spread[3:])))
    )
    assert (report.soft, report.suppressed, suppression_reasons(db)) == (1, 1, ["soft-bounces"])


def test_policy_bounce_never_suppresses(db: Database, settings: Settings, tmp_path: Path) -> None:
    seed(db)
    policy = sample("postfix-5.7.1-policy.eml")
    copies = [policy.replace(b"4JjwK21bQvz9sWs@", f"copy{i}@".encode()) for i in range(4)]
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(write_mbox(tmp_path / "p", copies)))
    )
    assert (report.policy, report.suppressed, len(report.warnings)) == (4, 0, 4)
    assert suppression_reasons(db) == []


def test_delayed_changes_nothing_but_is_recorded(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    seed(db)
    mbox = write_mbox(tmp_path / "d", [sample("postfix-delayed-4.4.1.eml")])
    report = Mailer(settings, database=db).import_bounces(BounceSource("mbox", str(mbox)))
    assert (report.delayed, report.matched_by) == (1, {"verp": 1})
    assert delivery_status(db)[6] == "sent" and suppression_reasons(db) == []
    assert [(r[1], r[2], r[3]) for r in bounce_rows(db)] == [(6, "delayed", "4.4.1")]


def test_forged_verp_token_matches_nothing(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    seed(db)
    raw = sample("postfix-5.7.1-policy.eml")
    # Our token with one character altered (an HMAC failure, not a wrong delivery).
    forged = raw.replace(b"aedyc3bnnqedv6o5szbgrv3bsqrry", b"aedyc3bnnqedv6o5szbhrv3bsqrry")
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(write_mbox(tmp_path / "f", [forged])))
    )
    # A token that does not verify is never trusted, nor replaced by the address.
    assert report.matched_by == {} and report.matched == 0
    assert len(report.unmatched) == 1


def test_campaign_restricts_address_matching(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    seed(db)
    mbox = write_mbox(tmp_path / "q", [sample("qmail-5.1.1.txt")])
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("mbox", str(mbox)), campaign="invitation-2022-02"
    )
    assert [u.address for u in report.unmatched] == ["vecino@ayto-elche.example"]
    assert delivery_status(db)[10] == "sent" and suppression_reasons(db) == []


# --- bad input: one clear line each -----------------------------------------------------------


def test_not_an_mbox(db: Database, settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "recipients.csv"
    path.write_text("email,name\nana@clara.example,Ana\n")
    with pytest.raises(BounceError, match=r"recipients\.csv:1:1: not an mbox mailbox"):
        Mailer(settings, database=db).import_bounces(BounceSource("mbox", str(path)))
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    with pytest.raises(BounceError, match=r"image\.png:1:1: not an mbox mailbox \(binary data\)"):
        Mailer(settings, database=db).import_bounces(BounceSource("mbox", str(binary)))


def test_not_a_maildir(db: Database, settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "box" / "new").mkdir(parents=True)
    with pytest.raises(BounceError, match=r"box: not a Maildir \(no cur/, tmp/\)"):
        Mailer(settings, database=db).import_bounces(BounceSource("maildir", str(tmp_path / "box")))


def test_maildir_import(db: Database, settings: Settings, tmp_path: Path) -> None:
    seed(db)
    box = __import__("mailbox").Maildir(tmp_path / "Maildir", create=True)
    for raw in all_samples():
        box.add(raw)
    report = Mailer(settings, database=db).import_bounces(
        BounceSource("maildir", str(tmp_path / "Maildir"))
    )
    assert (report.read, report.hard, report.suppressed) == (11, 5, 4)


def test_unreachable_imap_server(db: Database, settings: Settings) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"imap://bounces:secret@127.0.0.1:{port}"
    with pytest.raises(BounceError, match=rf"cannot connect to IMAP server 127\.0\.0\.1:{port}: "):
        Mailer(settings, database=db).import_bounces(BounceSource("imap", url))


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_import_prints_summary(cli, db: Database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed(db)
    mbox = write_mbox(tmp_path / "bounces.mbox", all_samples())
    result = cli("bounces", "import", "--mbox", str(mbox))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"mbox {mbox}"
    assert "  hard:                 5" in lines
    assert "  auto-replies ignored: 1" in lines
    assert "  unmatched:            1" in lines
    assert any(
        line.startswith("Warning:") and "5.7.1 for prensa@getafe.example" in line for line in lines
    )
    assert any(
        line.startswith("Unmatched:") and "desconocido@nowhere.example" in line for line in lines
    )

    again = cli("bounces", "import", "--mbox", str(mbox))
    assert "  already seen:         10" in again.output.splitlines()


def test_cli_bad_input_is_one_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    result = cli("bounces", "import", "--mbox", str(path))
    assert result.exit_code == 2
    assert (
        result.output
        == f"Error: {path}:1:1: not an mbox mailbox (the first line must start with 'From ')\n"
    )

    result = cli("bounces", "import", "--mbox", str(path), "--maildir", str(tmp_path))
    assert (
        result.exit_code == 2 and "give exactly one of --mbox, --maildir or --imap" in result.output
    )
    assert "Traceback" not in result.output


def test_cli_help_has_an_example(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("bounces", "import", "--help")
    assert result.exit_code == 0
    assert "clara-mail bounces import --mbox" in result.output
