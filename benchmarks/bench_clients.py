"""Peer baselines: how fast plain Python clients push the newsletter into an SMTP sink.

Three ways, one per ``--mode``:

``smtplib-emailmessage``
    stdlib ``smtplib``, one connection, an ``EmailMessage`` built per recipient.
``aiosmtplib-emailmessage``
    aiosmtplib, ``--connections`` connections, an ``EmailMessage`` built per recipient.
``aiosmtplib-bytes``
    aiosmtplib, ``--connections`` connections, the message bytes prepared once in
    advance; per recipient only the ``To:`` line and the envelope change.

The per-recipient ``EmailMessage`` loop is what a naive mailer does: copy the rendered
text and HTML, put the name in, let the ``email`` package serialise. It is a reference
point, not clara-mail's code path. Prints one JSON line: messages, seconds, rate.

Example:
    python benchmarks/bench_clients.py --mode aiosmtplib-bytes --port 25999 \\
        --message newsletter.eml --recipients 20000 --connections 4
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import smtplib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

import aiosmtplib

SENDER = "newsletter@clara.example"
MODES = ("smtplib-emailmessage", "aiosmtplib-emailmessage", "aiosmtplib-bytes")


def recipient_address(index: int) -> str:
    return f"person{index}@recipients.example"


@dataclass(frozen=True)
class Newsletter:
    """The rendered newsletter, taken apart so a naive client can rebuild it."""

    subject: str
    text: str
    html: str
    raw: bytes

    @classmethod
    def load(cls, path: Path) -> Newsletter:
        raw = path.read_bytes()
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        text_part = parsed.get_body(preferencelist=("plain",))
        html_part = parsed.get_body(preferencelist=("html",))
        if text_part is None or html_part is None:
            raise SystemExit(f"{path}: needs a text/plain and a text/html part")
        return cls(
            subject=str(parsed["Subject"] or "CLARA newsletter"),
            text=text_part.get_content(),
            html=html_part.get_content(),
            raw=raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
        )

    def build(self, index: int) -> EmailMessage:
        """One recipient's message, built the naive way with the ``email`` package."""
        name = f"Persona {index}"
        msg = EmailMessage()
        msg["From"] = f"CLARA <{SENDER}>"
        msg["To"] = f"{name} <{recipient_address(index)}>"
        msg["Subject"] = self.subject
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain="clara.example")
        msg["List-Unsubscribe"] = f"<https://clara.example/u/{index:08x}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.set_content(self.text.replace("Persona", name, 1))
        msg.add_alternative(self.html.replace("Persona", name, 1), subtype="html")
        return msg

    def prepared(self) -> tuple[bytes, bytes]:
        """The raw message split around its ``To:`` header, for per-recipient splicing."""
        head, sep, body = self.raw.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"to:")]
        return b"\r\n".join(lines) + b"\r\n", sep + body


def run_smtplib(letter: Newsletter, port: int, count: int) -> int:
    sent = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("bench.clara.example")
        for index in range(count):
            refused = client.send_message(letter.build(index))
            sent += not refused
    return sent


async def run_aiosmtplib(
    letter: Newsletter, port: int, count: int, connections: int, *, prepared: bool
) -> int:
    indices: Iterator[int] = iter(range(count))
    head, body = letter.prepared()

    async def worker() -> int:
        sent = 0
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await client.connect()
        try:
            for index in indices:  # shared iterator: each index is taken by one worker
                address = recipient_address(index)
                if prepared:
                    data = head + b"To: " + address.encode() + b"\r\n" + body
                    await client.sendmail(SENDER, [address], data)
                else:
                    await client.send_message(letter.build(index))
                sent += 1
        finally:
            await client.quit()
        return sent

    results = await asyncio.gather(*(worker() for _ in range(connections)))
    return sum(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--port", type=int, required=True, help="sink port on 127.0.0.1")
    parser.add_argument("--message", type=Path, required=True, help="the newsletter .eml")
    parser.add_argument("--recipients", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args(argv)
    letter = Newsletter.load(args.message)

    started = time.perf_counter()
    if args.mode == "smtplib-emailmessage":
        sent = run_smtplib(letter, args.port, args.recipients)
    else:
        prepared = args.mode == "aiosmtplib-bytes"
        sent = asyncio.run(
            run_aiosmtplib(letter, args.port, args.recipients, args.connections, prepared=prepared)
        )
    seconds = time.perf_counter() - started
    print(json.dumps({"messages": sent, "seconds": seconds, "rate": sent / seconds}))
    return 0 if sent == args.recipients else 1


if __name__ == "__main__":
    sys.exit(main())
