"""Per-recipient cost of rendering both campaigns: fast path vs EmailMessage reference.

Run: .venv/bin/python benchmarks/bench_render.py [--recipients 20000] [--reference 200]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.compose.render import RecipientView, Renderer
from clara_mailer.core.resources import EMAIL_TEMPLATES
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner

SEGMENTS = ("national-authorities", "local-police", "associations")
NAMES = ("Inés García Muñoz", "John Smith", "", "Ana María Pérez de la Fuente")
ORGS = ("Policía Local de Leganés", "OBERAXE", "", "Asociación Nakera")


def recipients(n: int) -> list[RecipientView]:
    return [
        RecipientView(
            i + 1,
            f"persona{i}@municipio{i % 50}.example",
            NAMES[i % 4],
            ORGS[(i // 4) % 4],
            "es" if i % 3 else "en",
            SEGMENTS[i % 3],
        )
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument("--reference", type=int, default=200)
    args = parser.parse_args()
    settings = Settings(
        secret_key="bench-secret-0123456789abcdef",
        base_url="https://clara.example",
        templates_dir=EMAIL_TEMPLATES,
    )
    signer = TokenSigner(settings.secret_key or "")
    people = recipients(args.recipients)
    print(f"{'campaign':24} {'variants':>8} {'prepare s':>9} {'fast µs':>8} "
          f"{'reference µs':>12} {'speed-up':>8} {'avg kB':>7} {'peak MB':>7}")  # fmt: skip
    for slug in ("newsletter-2022-01", "conference-2022-02-04"):
        r = Renderer(load_campaign(settings, slug), settings, signer, 1)
        t0 = time.perf_counter()
        for p in people[:200]:  # first use of each variant prepares it
            r.render(p)
        prepare = time.perf_counter() - t0
        total = 0
        t0 = time.perf_counter()
        for p in people:
            total += len(r.render(p))
        fast = (time.perf_counter() - t0) / len(people)
        # Memory in a separate pass: tracemalloc slows the loop down several times.
        tracemalloc.start()
        for p in people[:5000]:
            r.render(p)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t0 = time.perf_counter()
        for p in people[: args.reference]:
            r.render_reference(p)
        reference = (time.perf_counter() - t0) / args.reference
        print(
            f"{slug:24} {len(r._variants):>8} {prepare:>9.2f} {fast * 1e6:>8.1f} "
            f"{reference * 1e6:>12.0f} {reference / fast:>7.0f}x {total / len(people) / 1024:>7.1f} "
            f"{peak / 1e6:>7.1f}"
        )
    print(f"({args.recipients} recipients fast, {args.reference} reference; peak MB: "
          "tracemalloc over 5000 renders after preparation)")  # fmt: skip


if __name__ == "__main__":
    main()
