"""The SMTP transport against a real aiosmtpd server, and the outbox/memory transports."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from clara_mailer.core.errors import ConfigError, TransportError
from clara_mailer.core.settings import Settings
from clara_mailer.core.vocabulary import Outcome
from clara_mailer.transport import (
    MemoryTransport,
    OutboxTransport,
    SendResult,
    SMTPTransport,
    dot_stuff,
    outbox_filename,
    transport_from_settings,
)
from clara_mailer.transport.outbox import message_id_of
from tests.smtp_server import (
    DROP_AFTER_DATA,
    DROP_AFTER_RCPT,
    SLOW_AFTER_DATA,
    Faults,
    RecordingSMTPServer,
)

from .conftest import REPO_ROOT

SENDER = "bounces@clara.example"
PASSWORD = "s3cret-Pa55"


def make_message(to: str = "anna@policia.example", body: str = "Hola Anna,\r\n") -> bytes:
    return (
        "From: CLARA <news@clara.example>\r\n"
        f"To: {to}\r\n"
        "Subject: CLARA results\r\n"
        f"Message-ID: <n1.{abs(hash(to))}@clara.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n" + body
    ).encode()


def send_all(
    transport: SMTPTransport | OutboxTransport | MemoryTransport,
    items: list[tuple[str, bytes]],
) -> list[SendResult]:
    """Send each (recipient, message) over one connection, in order."""

    async def run() -> list[SendResult]:
        connection = await transport.connect()
        try:
            return [await connection.send(SENDER, rcpt, msg) for rcpt, msg in items]
        finally:
            await connection.close()

    return asyncio.run(run())


def plain(server: RecordingSMTPServer, **kwargs: float) -> SMTPTransport:
    return SMTPTransport.from_url(server.url(), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def server() -> Iterator[RecordingSMTPServer]:
    yield from RecordingSMTPServer.fixture()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"cert": folder / "cert.pem", "key": folder / "key.pem", "ca": folder / "ca.pem"}
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    return {k: str(v) for k, v in files.items()} | {"other_ca": str(folder / "other-ca.pem")}


# --- what arrives ---------------------------------------------------------------------


def test_message_arrives_byte_identical_with_dots_crlf_and_utf8(
    server: RecordingSMTPServer,
) -> None:
    body = ".starts with a dot\r\n..two dots\r\n.\r\nmiddle . dot\r\nÁlvaro, Pamplona, Málaga ✓\r\n"
    message = make_message(body=body)
    [result] = send_all(plain(server), [("anna@policia.example", message)])
    assert result == SendResult(Outcome.SENT, 250, "2.0.0 OK queued")
    [received] = server.messages
    assert received.data == message
    assert received.recipients == ["anna@policia.example"]
    assert received.mail_from == SENDER
    assert "BODY=8BITMIME" in received.mail_options  # 8-bit body, server announced 8BITMIME
    assert "SMTPUTF8" not in received.mail_options  # ASCII addresses and headers


def test_message_starting_with_a_dot_and_lacking_final_crlf() -> None:
    assert dot_stuff(b".x\r\n.y") == b"..x\r\n..y\r\n.\r\n"
    assert dot_stuff(b"a\r\n") == b"a\r\n.\r\n"


def test_ascii_message_is_sent_without_body_parameter(server: RecordingSMTPServer) -> None:
    send_all(plain(server), [("anna@policia.example", make_message(body="plain\r\n"))])
    assert server.messages[0].mail_options == []


def test_one_connection_carries_many_transactions(server: RecordingSMTPServer) -> None:
    items = [(f"r{i}@policia.example", make_message(f"r{i}@policia.example")) for i in range(5)]
    results = send_all(plain(server), items)
    assert [r.outcome for r in results] == [Outcome.SENT] * 5
    assert server.connections == 1
    assert [m.recipients for m in server.messages] == [[rcpt] for rcpt, _ in items]


@pytest.mark.parametrize("message", [b"Subject: x\n\nbody\n", b"Subject: x\r\n\r\nbo\rdy\r\n"])
def test_bare_cr_or_lf_is_refused_before_sending(
    server: RecordingSMTPServer, message: bytes
) -> None:
    [result] = send_all(plain(server), [("anna@policia.example", message)])
    assert result.outcome is Outcome.FAILED and "bare CR or LF" in result.reply
    assert server.messages == []


# --- classification of each fault -------------------------------------------------------


def test_scripted_550_fails_and_keeps_the_connection() -> None:
    faults = Faults(replies={"bad@policia.example": (550, "5.1.1 no such user")})
    with RecordingSMTPServer(faults=faults) as server:
        results = send_all(
            plain(server),
            [("bad@policia.example", make_message()), ("ok@policia.example", make_message())],
        )
        assert results[0] == SendResult(Outcome.FAILED, 550, "5.1.1 no such user")
        assert results[1].outcome is Outcome.SENT
        assert server.connections == 1  # RSET kept the session usable
        assert [m.recipients for m in server.messages] == [["ok@policia.example"]]


def test_scripted_452_is_deferred_not_broken() -> None:
    faults = Faults(replies={"full@policia.example": (452, "4.2.2 mailbox full")})
    with RecordingSMTPServer(faults=faults) as server:
        [result] = send_all(plain(server), [("full@policia.example", make_message())])
        assert result == SendResult(Outcome.DEFERRED, 452, "4.2.2 mailbox full")


def test_greylisting_defers_first_attempt_then_accepts() -> None:
    with RecordingSMTPServer(faults=Faults(greylist=True)) as server:
        first, second = send_all(
            plain(server),
            [("grey@policia.example", make_message())] * 2,
        )
        assert first.outcome is Outcome.DEFERRED and first.code == 451
        assert first.reply.startswith("4.7.1") and not first.connection_broken
        assert second.outcome is Outcome.SENT
        assert len(server.messages) == 1


def test_421_defers_and_breaks_the_connection() -> None:
    with RecordingSMTPServer(faults=Faults(p421=1.0)) as server:
        [result] = send_all(plain(server), [("anna@policia.example", make_message())])
        assert result.outcome is Outcome.DEFERRED and result.code == 421
        assert result.connection_broken
        assert server.messages == []


def test_seeded_random_421_is_reproducible() -> None:
    def outcomes() -> list[Outcome]:
        with RecordingSMTPServer(faults=Faults(p421=0.5, seed=42)) as server:
            items = [(f"r{i}@policia.example", make_message()) for i in range(8)]
            results = send_all(plain(server), items)
            return [r.outcome for r in results]

    first = outcomes()
    assert first == outcomes()
    assert Outcome.SENT in first and Outcome.DEFERRED in first


def test_drop_after_rcpt_is_deferred_with_broken_connection() -> None:
    with RecordingSMTPServer(faults=Faults(replies={"x@policia.example": DROP_AFTER_RCPT})) as s:
        first, second = send_all(
            plain(s), [("x@policia.example", make_message()), ("y@policia.example", make_message())]
        )
        assert first.outcome is Outcome.DEFERRED and first.code == 0
        assert first.connection_broken and "before the message was sent" in first.reply
        # The next send reconnects by itself.
        assert second.outcome is Outcome.SENT
        assert s.connections == 2


def test_drop_after_data_body_is_unknown() -> None:
    with RecordingSMTPServer(faults=Faults(replies={"x@policia.example": DROP_AFTER_DATA})) as s:
        [result] = send_all(plain(s), [("x@policia.example", make_message())])
        assert result.outcome is Outcome.UNKNOWN and result.code == 0
        assert result.connection_broken and "may have accepted" in result.reply


def test_slow_reply_after_data_is_unknown_though_the_server_accepted_it() -> None:
    faults = Faults(replies={"slow@policia.example": SLOW_AFTER_DATA}, slow_seconds=1.5)
    with RecordingSMTPServer(faults=faults) as server:
        transport = plain(server, data_timeout=0.3)
        [result] = send_all(transport, [("slow@policia.example", make_message())])
        assert result.outcome is Outcome.UNKNOWN and "Timed out" in result.reply
        assert [m.recipients for m in server.messages] == [["slow@policia.example"]]


def test_random_drops_at_rcpt_are_deferred() -> None:
    faults = Faults(drop_stage="rcpt", p_drop=1.0)
    with RecordingSMTPServer(faults=faults) as server:
        [result] = send_all(plain(server), [("a@policia.example", make_message())])
        assert result.outcome is Outcome.DEFERRED and result.connection_broken


def test_max_per_connection_gives_421_then_reconnects() -> None:
    with RecordingSMTPServer(faults=Faults(max_per_connection=2)) as server:
        items = [(f"r{i}@policia.example", make_message()) for i in range(4)]
        results = send_all(plain(server), items)
        assert [r.outcome for r in results] == [
            Outcome.SENT,
            Outcome.SENT,
            Outcome.DEFERRED,
            Outcome.SENT,
        ]
        assert results[2].code == 421 and results[2].connection_broken
        assert server.connections == 2


def test_reconnects_after_n_messages(server: RecordingSMTPServer) -> None:
    transport = SMTPTransport.from_url(server.url(), reconnect_after=2)
    items = [(f"r{i}@policia.example", make_message()) for i in range(5)]
    assert [r.outcome for r in send_all(transport, items)] == [Outcome.SENT] * 5
    assert server.connections == 3
    assert [m.connection for m in server.messages] == [1, 1, 2, 2, 3]


def test_refused_connection_raises_transport_error_on_connect() -> None:
    with RecordingSMTPServer() as server:
        url = server.url()
    transport = SMTPTransport.from_url(url)
    with pytest.raises(TransportError, match=r"cannot connect to smtp://127\.0\.0\.1"):
        send_all(transport, [])


# --- SMTPUTF8 ----------------------------------------------------------------------------


def test_non_ascii_local_part_uses_smtputf8_when_offered(server: RecordingSMTPServer) -> None:
    rcpt = "josé.núñez@ayuntamiento.example"
    message = make_message(to=rcpt)  # raw UTF-8 To: header (RFC 6532)
    [result] = send_all(plain(server), [(rcpt, message)])
    assert result.outcome is Outcome.SENT
    [received] = server.messages
    assert received.recipients == [rcpt] and received.data == message
    assert "SMTPUTF8" in received.mail_options


def test_non_ascii_local_part_fails_without_smtputf8() -> None:
    with RecordingSMTPServer(smtputf8=False) as server:
        rcpt = "josé@ayuntamiento.example"
        results = send_all(plain(server), [(rcpt, make_message(to="jose@ayuntamiento.example"))])
        assert results[0].outcome is Outcome.FAILED and results[0].code == 0
        assert results[0].reply.startswith("server does not support SMTPUTF8")
        assert server.messages == []


def test_utf8_headers_fail_without_smtputf8() -> None:
    with RecordingSMTPServer(smtputf8=False) as server:
        rcpt = "jose@ayuntamiento.example"
        [result] = send_all(
            plain(server), [(rcpt, make_message(to="José <jose@ayuntamiento.example>"))]
        )
        assert result.outcome is Outcome.FAILED and "raw UTF-8 headers" in result.reply


def test_idn_domain_goes_as_a_labels_without_smtputf8() -> None:
    with RecordingSMTPServer(smtputf8=False) as server:
        [result] = send_all(
            plain(server),
            [("info@policía.example", make_message(to="info@xn--polica-7va.example"))],
        )
        assert result.outcome is Outcome.SENT
        assert server.messages[0].recipients == ["info@xn--polica-7va.example"]


# --- TLS and AUTH ------------------------------------------------------------------------


def test_starttls_with_verified_certificate(tls_files: dict[str, str]) -> None:
    with RecordingSMTPServer(starttls=(tls_files["cert"], tls_files["key"])) as server:
        transport = SMTPTransport.from_url(server.url(query=f"ca_file={tls_files['ca']}"))
        assert transport.description.endswith("(STARTTLS)")
        [result] = send_all(transport, [("anna@policia.example", make_message())])
        assert result.outcome is Outcome.SENT  # server has require_starttls: TLS was used


def test_starttls_required_but_not_offered(server: RecordingSMTPServer) -> None:
    transport = SMTPTransport.from_url(server.url(query=""))
    with pytest.raises(TransportError, match="does not offer STARTTLS") as info:
        send_all(transport, [])
    assert "\n" not in str(info.value)
    assert server.messages == []


def test_implicit_tls(tls_files: dict[str, str]) -> None:
    with RecordingSMTPServer(implicit_tls=(tls_files["cert"], tls_files["key"])) as server:
        transport = SMTPTransport.from_url(
            server.url(scheme="smtps", query=f"ca_file={tls_files['ca']}")
        )
        assert transport.description == f"smtps://127.0.0.1:{server.port} (TLS)"
        [result] = send_all(transport, [("anna@policia.example", make_message())])
        assert result.outcome is Outcome.SENT


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_untrusted_certificate_is_refused(tls_files: dict[str, str], mode: str) -> None:
    pair = (tls_files["cert"], tls_files["key"])
    kwargs = {"starttls": pair} if mode == "starttls" else {"implicit_tls": pair}
    with RecordingSMTPServer(**kwargs) as server:  # type: ignore[arg-type]
        scheme = "smtps" if mode == "implicit" else "smtp"
        transport = SMTPTransport.from_url(
            server.url(scheme=scheme, query=f"ca_file={tls_files['other_ca']}")
        )
        with pytest.raises(TransportError, match="certificate verify failed"):
            send_all(transport, [])
        assert server.messages == []


def test_ssl_cert_file_environment_is_honoured(
    tls_files: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", tls_files["ca"])
    with RecordingSMTPServer(implicit_tls=(tls_files["cert"], tls_files["key"])) as server:
        transport = SMTPTransport.from_url(server.url(scheme="smtps", query=""))
        [result] = send_all(transport, [("anna@policia.example", make_message())])
        assert result.outcome is Outcome.SENT


def test_auth_succeeds_and_password_is_never_shown(tls_files: dict[str, str]) -> None:
    pair = (tls_files["cert"], tls_files["key"])
    with RecordingSMTPServer(starttls=pair, auth=("clara", PASSWORD)) as server:
        url = server.url(query=f"ca_file={tls_files['ca']}", user=f"clara:{PASSWORD}")
        transport = SMTPTransport.from_url(url)
        assert PASSWORD not in transport.description and PASSWORD not in repr(transport)
        assert transport.description.startswith("smtp://clara@127.0.0.1")
        [result] = send_all(transport, [("anna@policia.example", make_message())])
        assert result.outcome is Outcome.SENT


def test_auth_failure_is_a_transport_error_without_the_password(tls_files: dict[str, str]) -> None:
    pair = (tls_files["cert"], tls_files["key"])
    with RecordingSMTPServer(starttls=pair, auth=("clara", PASSWORD)) as server:
        url = server.url(query=f"ca_file={tls_files['ca']}", user="clara:wrong-Pa55")
        with pytest.raises(TransportError) as info:
            send_all(SMTPTransport.from_url(url), [])
        assert "wrong-Pa55" not in str(info.value) and "535" in str(info.value)
        assert server.messages == []


def test_auth_required_without_credentials_fails_every_message(tls_files: dict[str, str]) -> None:
    pair = (tls_files["cert"], tls_files["key"])
    with RecordingSMTPServer(starttls=pair, auth=("clara", PASSWORD)) as server:
        transport = SMTPTransport.from_url(server.url(query=f"ca_file={tls_files['ca']}"))
        [result] = send_all(transport, [("anna@policia.example", make_message())])
        assert result.outcome is Outcome.FAILED and result.code == 530


# --- URLs and settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://relay.example", "unknown scheme 'ftp'"),
        ("smtp://relay.example:notaport", "is not a valid URL"),
        ("smtp://", "names no host"),
        ("smtp://relay.example?tls=maybe", "tls must be starttls or none"),
        ("smtps://relay.example?tls=none", "smtps:// always uses TLS"),
        ("smtp://relay.example?colour=blue", "unknown parameter 'colour'"),
        ("smtp://relay.example/inbox", "unexpected path"),
        ("smtp://relay.example?ca_file=/nonexistent/ca.pem", "is not a file"),
        (f"ftp://clara:{PASSWORD}@relay.example", "clara:***@relay.example"),
        (f"smtp://clara:{PASSWORD}@relay.example:99999", "is not a valid URL"),
    ],
)
def test_bad_urls_give_one_clear_config_error(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        SMTPTransport.from_url(url)
    text = str(info.value)
    assert expected in text and "\n" not in text and PASSWORD not in text


def test_url_defaults() -> None:
    assert SMTPTransport.from_url("smtp://relay.example").port == 587
    assert SMTPTransport.from_url("smtps://relay.example").port == 465
    plain_25 = SMTPTransport.from_url("smtp://relay.example:25?tls=none")
    assert plain_25.description == "smtp://relay.example:25 (no TLS)" and plain_25.network
    quoted = SMTPTransport.from_url("smtp://us%40er:p%3Ass@relay.example")
    assert quoted.description == "smtp://us@er@relay.example:587 (STARTTLS)"


def test_transport_from_settings(tmp_path: Path) -> None:
    smtp = transport_from_settings(
        Settings(smtp_url="smtp://relay.example", smtp_timeout=5, smtp_data_timeout=50), "n1"
    )
    assert isinstance(smtp, SMTPTransport) and (smtp.timeout, smtp.data_timeout) == (5, 50)
    outbox = transport_from_settings(Settings(outbox_dir=tmp_path), "newsletter-2022-01")
    assert isinstance(outbox, OutboxTransport) and not outbox.network
    assert outbox.directory == tmp_path / "newsletter-2022-01"
    with pytest.raises(ConfigError, match="cannot name an outbox folder"):
        transport_from_settings(Settings(outbox_dir=tmp_path), "../escape")


# --- outbox and memory -------------------------------------------------------------------


def test_outbox_writes_parseable_eml_files(tmp_path: Path) -> None:
    transport = OutboxTransport(tmp_path / "outbox" / "newsletter-2022-01")
    rcpts = ["anna@policia.example", "Anna@policia.example", "josé@ayuntamiento.example"]
    results = send_all(transport, [(r, make_message(to=r)) for r in rcpts])
    assert [r.outcome for r in results] == [Outcome.SENT] * 3
    files = sorted(transport.directory.iterdir())
    assert len(files) == 3 and all(f.suffix == ".eml" for f in files)
    for rcpt in rcpts:
        path = transport.directory / outbox_filename(rcpt, message_id_of(make_message(to=rcpt)))
        assert path.read_bytes() == make_message(to=rcpt)
        parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert parsed["To"] == rcpt and parsed["Subject"] == "CLARA results"


def test_outbox_resend_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    transport = OutboxTransport(tmp_path)
    send_all(transport, [("anna@policia.example", make_message(body="first\r\n"))])
    send_all(transport, [("anna@policia.example", make_message(body="second\r\n"))])
    [only] = list(tmp_path.iterdir())
    assert only.read_bytes().endswith(b"second\r\n")


def test_outbox_write_failure_is_deferred_and_leaves_nothing(tmp_path: Path) -> None:
    transport = OutboxTransport(tmp_path)
    name = outbox_filename("anna@policia.example", message_id_of(make_message()))
    (tmp_path / name).mkdir()  # rename onto a folder fails
    [result] = send_all(transport, [("anna@policia.example", make_message())])
    assert result.outcome is Outcome.DEFERRED and "cannot write" in result.reply
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_memory_transport_records_and_scripts() -> None:
    memory = MemoryTransport(replies={"bad@policia.example": (550, "5.1.1 no such user")})
    results = send_all(
        memory, [("ok@policia.example", make_message()), ("bad@policia.example", make_message())]
    )
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.FAILED]
    assert memory.sent == [(SENDER, "ok@policia.example", make_message())]
    assert memory.connections == 1 and not memory.network


def test_memory_transport_without_smtputf8_fails_like_a_server() -> None:
    memory = MemoryTransport(smtputf8=False)
    [result] = send_all(memory, [("josé@ayuntamiento.example", make_message())])
    assert result.outcome is Outcome.FAILED and "SMTPUTF8" in result.reply


# --- the server as a subprocess ----------------------------------------------------------


def test_subprocess_server_records_json_lines_and_stops_on_sigterm(tmp_path: Path) -> None:
    record = tmp_path / "accepted.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.smtp_server", "--port", "0", "--record", str(record)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        transport = SMTPTransport.from_url(f"smtp://127.0.0.1:{port}?tls=none")
        message = make_message()
        results = send_all(transport, [("anna@policia.example", message)] * 2)
        assert [r.outcome for r in results] == [Outcome.SENT] * 2
        rows = [json.loads(x) for x in record.read_text().splitlines()]
        assert len(rows) == 2
        assert rows[0]["recipients"] == ["anna@policia.example"]
        assert rows[0]["mail_from"] == SENDER
        assert rows[0]["message_id"].startswith("<n1.")
        assert rows[0]["sha256"] == hashlib.sha256(message).hexdigest()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        if process.stdout is not None:
            process.stdout.close()
