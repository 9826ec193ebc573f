"""SMTP client cost per message: aiosmtplib ``sendmail`` against clara-mail's DATA path.

Sends ``--messages`` copies of a prepared 26 kB newsletter over ``--connections``
connections to a minimal asyncio sink (a subprocess that answers 250 to everything, so
the sink's own CPU is not counted). For each client it prints one JSON line: messages
per second (wall clock) and client CPU microseconds per message (process time of the
sending process only). Every message is counted by the sink, so a client that drops
messages cannot post a fast figure.

Example:
    python benchmarks/bench_transport.py --messages 20000 --connections 4 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inputs import write_sample_newsletter

SENDER = "bounces@clara.example"


# --- the sink ---------------------------------------------------------------------------


class Sink(asyncio.Protocol):
    """Answers 250 to every command (pipelined or not) and 250 after each DATA body."""

    accepted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        self.search_from = 0
        transport.write(b"220 sink.example ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n", self.search_from)
                if end < 0:
                    self.search_from = max(0, len(self.buffer) - 4)
                    break
                self.buffer = self.buffer[end + 5 :]
                self.in_data, self.search_from = False, 0
                Sink.accepted += 1
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                break
            command = self.buffer[:4].upper()
            self.buffer = self.buffer[line_end + 2 :]
            if command == b"EHLO":
                out.append(
                    b"250-sink.example\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n"
                )
            elif command == b"DATA":
                # The sink sees the body from the next byte on: treat a leading
                # "<CRLF>" as part of the search window by prepending one.
                self.in_data = True
                self.buffer = b"\r\n" + self.buffer
                out.append(b"354 go ahead\r\n")
            elif command == b"QUIT":
                out.append(b"221 bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 2.1.0 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))


async def run_sink(port_file: Path) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", 0)
    port_file.write_text(str(server.sockets[0].getsockname()[1]))
    while True:
        await asyncio.sleep(0.2)
        Path(str(port_file) + ".count").write_text(str(Sink.accepted))


# --- the clients ------------------------------------------------------------------------


async def with_aiosmtplib(port: int, message: bytes, count: int, connections: int) -> None:
    import aiosmtplib

    async def worker(share: int) -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, local_hostname="bench.example"
        )
        await client.connect()
        for i in range(share):
            await client.sendmail(SENDER, [f"r{i}@recipients.example"], message)
        await client.quit()

    await asyncio.gather(*(worker(count // connections) for _ in range(connections)))


async def with_clara(port: int, message: bytes, count: int, connections: int) -> None:
    from clara_mailer.core.vocabulary import Outcome
    from clara_mailer.transport import SMTPTransport

    transport = SMTPTransport.from_url(
        f"smtp://127.0.0.1:{port}?tls=none&ehlo=bench.example", reconnect_after=10**9
    )

    async def worker(share: int) -> None:
        connection = await transport.connect()
        for i in range(share):
            result = await connection.send(SENDER, f"r{i}@recipients.example", message)
            assert result.outcome is Outcome.SENT, result
        await connection.close()

    await asyncio.gather(*(worker(count // connections) for _ in range(connections)))


CLIENTS = {"aiosmtplib-sendmail": with_aiosmtplib, "clara-transport": with_clara}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    parser.add_argument("--client", choices=sorted(CLIENTS), action="append")
    parser.add_argument("--sink", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        asyncio.run(run_sink(args.sink))
        return 0

    with tempfile.TemporaryDirectory() as folder:
        message = write_sample_newsletter(Path(folder) / "newsletter.eml").read_bytes()
        port_file = Path(folder) / "port"
        sink = subprocess.Popen([sys.executable, __file__, "--sink", str(port_file)])
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.05)
            port = int(port_file.read_text())
            count_file = Path(str(port_file) + ".count")
            total = 0
            for name in args.client or list(CLIENTS):
                count = args.messages // args.connections * args.connections
                run = CLIENTS[name](port, message, count, args.connections)
                cpu, wall = time.process_time(), time.perf_counter()
                if args.uvloop:
                    import uvloop

                    uvloop.run(run)
                else:
                    asyncio.run(run)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                total += count
                while not count_file.exists() or int(count_file.read_text() or 0) < total:
                    time.sleep(0.05)
                print(
                    json.dumps(
                        {
                            "client": name,
                            "loop": "uvloop" if args.uvloop else "asyncio",
                            "messages": count,
                            "bytes_per_message": len(message),
                            "connections": args.connections,
                            "rate": round(count / wall),
                            "cpu_us_per_message": round(cpu / count * 1e6, 1),
                        }
                    ),
                    flush=True,
                )
        finally:
            sink.terminate()
            sink.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
