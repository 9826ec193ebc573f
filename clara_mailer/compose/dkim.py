"""Optional DKIM signing of final message bytes (dkimpy, relaxed/relaxed).

The signed bytes are the bytes sent: the transport never re-serialises a message.
dkimpy's default header list omits List-Unsubscribe-Post, which RFC 8058 section 4
wants signed, so we name the headers ourselves.

From, Subject, List-Unsubscribe and List-Unsubscribe-Post are over-signed: named once
more than the message has them (RFC 6376 section 8.15), so a copy added anywhere later
breaks the signature instead of being shown above the signed one. Reply-To is signed
whether present or not: signing an absent header means one added later breaks it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from clara_mailer.core.errors import ConfigError
from clara_mailer.core.settings import Settings

SIGNED_HEADERS = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"reply-to",
)
#: Each occurs at most once in a message we build: a second h= entry signs its absence.
OVER_SIGNED = (b"from", b"subject", b"list-unsubscribe", b"list-unsubscribe-post")


@dataclass(frozen=True)
class DkimSigner:
    domain: str
    selector: str
    private_key: bytes  # PEM; never printed (repr=False below)

    def __repr__(self) -> str:
        return f"DkimSigner(domain={self.domain!r}, selector={self.selector!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> DkimSigner | None:
        """A signer when CLARA_DKIM_DOMAIN, _SELECTOR and _KEY_FILE are all set, else None."""
        values = {
            "dkim_domain": settings.dkim_domain,
            "dkim_selector": settings.dkim_selector,
            "dkim_key_file": settings.dkim_key_file,
        }
        if not any(values.values()):
            return None
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise ConfigError(
                f"DKIM needs {', '.join(missing)} too (or none of the dkim_ settings)"
            )
        assert settings.dkim_domain and settings.dkim_selector and settings.dkim_key_file
        try:
            key = settings.dkim_key_file.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"{settings.dkim_key_file}: cannot read DKIM key: {exc.strerror}"
            ) from None
        from dkim.crypto import UnparsableKeyError, parse_pem_private_key

        try:
            parse_pem_private_key(key)
        except UnparsableKeyError as exc:
            raise ConfigError(
                f"{settings.dkim_key_file}: not a PEM RSA private key ({exc})"
            ) from None
        return cls(settings.dkim_domain, settings.dkim_selector, key)

    def sign(self, message: bytes) -> bytes:
        """The message with a DKIM-Signature header prepended."""
        import dkim

        signature: bytes = dkim.sign(
            message,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[*SIGNED_HEADERS, *OVER_SIGNED],
        )
        return signature + message
