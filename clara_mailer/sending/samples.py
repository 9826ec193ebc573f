"""Test sends: one sample per variant to a person on the team; the log is untouched."""

from __future__ import annotations

import hashlib
import secrets

from clara_mailer.compose.campaigns import CampaignDef
from clara_mailer.compose.render import RecipientView
from clara_mailer.core.errors import InputError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.plan.plan import checked_campaign
from clara_mailer.registry.addresses import AddressError, AddressValidator
from clara_mailer.sending.worker import run_async
from clara_mailer.store.database import Database
from clara_mailer.transport import SendResult, Transport, transport_from_settings


def send_test(
    db: Database,
    settings: Settings,
    signer: TokenSigner,
    slug: str,
    address: str,
    segments: tuple[str, ...] = (),
    *,
    transport: Transport | None = None,
) -> list[tuple[str, str, SendResult]]:
    """Send one sample per variant (language x segment) to ``address``; log untouched.

    Each sample gets its own Message-ID (so mail clients do not fold the variants into
    one and an outbox keeps one file per sample), fresh on every run."""
    try:
        AddressValidator().normalise(address)
    except AddressError as exc:
        raise InputError(f"--test-to {address!r} is not an email address: {exc}") from None
    checked = checked_campaign(db, settings, signer, slug, segments)
    defn = checked.defn
    chosen = [name for _, name in checked.segments]
    renderer = checked.renderer
    transport = transport or transport_from_settings(settings, f"{slug}-test")
    results: list[tuple[str, str, SendResult]] = []
    nonce = secrets.token_hex(6)

    async def main() -> None:
        conn = await transport.connect()
        try:
            for language in defn.languages:
                for segment in chosen:
                    view = RecipientView(0, address, "", "", language, segment)
                    data = renderer.render(
                        view,
                        smtputf8=not address.rpartition("@")[0].isascii(),
                        message_id=sample_message_id(defn, language, segment, nonce),
                    )
                    result = await conn.send(defn.sender, address, data)
                    results.append((language, segment, result))
        finally:
            await conn.close()

    run_async(main())
    return results


def sample_message_id(defn: CampaignDef, language: str, segment: str, nonce: str) -> str:
    """A test sample's Message-ID: one per variant and run, never a real delivery's."""
    digest = hashlib.sha256(f"{defn.slug}\0{language}\0{segment}\0{nonce}".encode()).hexdigest()
    return f"<test.{digest[:20]}.{defn.slug}@{defn.sender_domain}>"
