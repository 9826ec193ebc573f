"""A real Postfix SMTP server takes a chained send (RFC 2920): each message's end of DATA
goes out with the next message's MAIL, RCPT and DATA, and Postfix's smtpd, told to refuse
improper pipelining (``reject_unauth_pipelining``), accepts every message once. Postfix
then relays them to an aiosmtpd server, which shows what arrived. Skips only without
Postfix or root (tests/postfix_mta.py)."""

from __future__ import annotations

import re
import socket
import time
from collections import Counter

import pytest

from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.plan.plan import SendOptions
from clara_mailer.store.database import Database
from tests.postfix_mta import PostfixInstance, postfix_available
from tests.send_helpers import add_recipients, check_received_once
from tests.smtp_server import RecordingSMTPServer

pytestmark = pytest.mark.skipif(postfix_available() is not None, reason=str(postfix_available()))

CAMPAIGN = "newsletter-2022-01"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"Postfix's smtpd did not listen on 127.0.0.1:{port}")


def test_postfix_smtpd_takes_a_chained_send(db: Database, settings: Settings) -> None:
    addresses = add_recipients(db, 30)
    port = _free_port()
    with RecordingSMTPServer() as relay, PostfixInstance(relay.port, smtpd_port=port) as mta:
        _wait_for_port(port)
        values = {**vars(settings), "smtp_url": f"smtp://127.0.0.1:{port}?tls=none"}
        postfix = Settings(**values)  # type: ignore[arg-type]
        options = SendOptions(segments=("local-police",), concurrency=2)
        mailer = Mailer(postfix, database=db)
        summary = mailer.send(mailer.plan(CAMPAIGN, options), options, handle_signals=False)
        assert summary.counts == {"sent": 30}, summary.counts
        deadline = time.monotonic() + 60
        while len(relay.messages) < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
        log = mta.log()
    received = Counter(r for m in relay.messages for r in m.recipients)
    assert check_received_once(db, received, 30) == {"sent": 30}
    assert sorted(received) == sorted(addresses)
    assert "improper command pipelining" not in log and "reject:" not in log
    # Two sessions (the two connections), each carrying a chain of messages.
    per_session = [int(n) for n in re.findall(r"disconnect from \S+ ehlo=1 mail=(\d+)", log)]
    assert sum(per_session) == 30 and len(per_session) == 2, per_session
