"""Inputs the benchmark generates: a stand-in newsletter and recipient CSVs.

The stand-in newsletter is used only until ``clara-mail preview newsletter-2022-01
--format eml`` works; it has the size and shape of the real one (26 kB, bilingual,
multipart/alternative with inlined CSS), so the SMTP figures are comparable.
"""

from __future__ import annotations

import csv
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

SEGMENTS = ("national-authorities", "local-police", "associations")

_ITEMS = [
    (
        "Informe de resultados CLAP",
        "CLAP results report",
        "Las conclusiones del proyecto sobre delitos de odio y la respuesta policial local.",
        "The project's findings on hate crime and the local police response.",
    ),
    (
        "Productos en el portal",
        "Products on the portal",
        "Guías, protocolos y materiales de formación para las policías locales.",
        "Guides, protocols and training materials for local police forces.",
    ),
    (
        "Vídeo resumen",
        "Video summary",
        "Cinco minutos sobre lo que hemos aprendido en Elche, Fuenlabrada y Getafe.",
        "Five minutes on what we learnt in Elche, Fuenlabrada and Getafe.",
    ),
    (
        "Conferencia final",
        "Final Conference",
        "Madrid, 4 de febrero de 2022, de 10:30 a 13:50: seis puntos en el programa.",
        "Madrid, 4 February 2022, 10:30-13:50: six items on the programme.",
    ),
]


def _html(target_bytes: int) -> str:
    style = "font-family:Arial,sans-serif;font-size:15px;line-height:1.5;color:#1d2733;"
    blocks: list[str] = []
    n = 0
    while sum(len(b) for b in blocks) < target_bytes:
        es_title, en_title, es_text, en_text = _ITEMS[n % len(_ITEMS)]
        blocks.append(
            f'<tr><td style="padding:16px 24px;{style}">'
            f'<h2 style="margin:0 0 8px;font-size:20px;color:#0b4f8a;">{es_title} / {en_title}</h2>'
            f'<p style="margin:0 0 8px;{style}">{es_text}</p>'
            f'<p style="margin:0 0 8px;{style}"><em>{en_text}</em></p>'
            f'<a href="https://clara.example/productos/{n}" style="color:#0b4f8a;">'
            f"Leer más / Read more</a></td></tr>\n"
        )
        n += 1
    return (
        '<!doctype html><html lang="es"><head><meta charset="utf-8">'
        '<title>Boletín CLARA</title></head><body style="margin:0;background:#f3f5f7;">'
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0">'
        f'<tr><td style="padding:24px;{style}">Estimada Persona:</td></tr>\n'
        + "".join(blocks)
        + '<tr><td style="padding:24px;font-size:12px;color:#5b6670;">'
        '<a href="https://clara.example/u/TOKEN">Darse de baja / Unsubscribe</a>'
        "</td></tr></table></body></html>"
    )


def _text(target_bytes: int) -> str:
    lines = ["Estimada Persona:", ""]
    n = 0
    while sum(len(line) + 1 for line in lines) < target_bytes:
        es_title, en_title, es_text, en_text = _ITEMS[n % len(_ITEMS)]
        lines += [
            f"{es_title} / {en_title}",
            es_text,
            en_text,
            f"https://clara.example/productos/{n}",
            "",
        ]
        n += 1
    lines += ["Darse de baja / Unsubscribe: https://clara.example/u/TOKEN"]
    return "\n".join(lines) + "\n"


def write_sample_newsletter(path: Path, size: int = 26_000) -> Path:
    """Write a bilingual multipart/alternative newsletter of about ``size`` bytes (CRLF)."""
    msg = EmailMessage()
    msg["From"] = "CLARA <newsletter@clara.example>"
    msg["To"] = "Persona <persona@recipients.example>"
    msg["Subject"] = "Boletín CLARA: resultados del proyecto / CLARA results newsletter"
    msg["Message-ID"] = "<sample.newsletter-2022-01@clara.example>"
    msg["Date"] = "Mon, 10 Jan 2022 09:00:00 +0000"
    # Quoted-printable expands accented text a little; aim the parts below the target.
    msg.set_content(_text(size * 29 // 100), cte="quoted-printable")
    msg.add_alternative(_html(size * 58 // 100), subtype="html", cte="quoted-printable")
    path.write_bytes(msg.as_bytes(policy=SMTP))
    return path


def write_lf_copy(eml: Path, out: Path) -> Path:
    """``smtp-source -F`` appends CRLF to each line itself: it wants LF line endings."""
    out.write_bytes(eml.read_bytes().replace(b"\r\n", b"\n"))
    return out


def write_recipients_csv(path: Path, count: int, *, start: int = 0) -> Path:
    """``count`` distinct recipients at reserved ``.example`` domains, both languages."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["email", "name", "organisation", "language", "country", "segments"])
        for i in range(start, start + count):
            writer.writerow(
                [
                    f"person{i}@recipients.example",
                    f"Persona Núñez {i}",
                    f"Policía Local {i % 97}",
                    "es" if i % 3 else "en",
                    "ES",
                    SEGMENTS[i % len(SEGMENTS)],
                ]
            )
    return path
