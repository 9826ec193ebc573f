"""Issue 14 item 16: a token has exactly one valid spelling."""

from __future__ import annotations

import pytest

from clara_mailer.core.errors import TokenError
from clara_mailer.core.tokens import TokenSigner

_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def _flip_low_bit(token: str) -> str:
    last = _ALPHABET.index(token[-1])
    return token[:-1] + _ALPHABET[last ^ 1]


@pytest.mark.parametrize("purpose", ["u", "r", "b"])
@pytest.mark.parametrize(("campaign_id", "recipient_id"), [(0, 1), (3, 17), (200, 123456)])
def test_flipping_the_low_bit_of_the_last_character_is_rejected(
    purpose: str, campaign_id: int, recipient_id: int
) -> None:
    signer = TokenSigner("k" * 32)
    token = signer.sign(purpose, campaign_id, recipient_id)
    assert signer.verify(purpose, token).recipient_id == recipient_id
    # Only tokens whose length leaves padding bits in the last character are at risk;
    # every flipped spelling must fail either way.
    with pytest.raises(TokenError):
        signer.verify(purpose, _flip_low_bit(token))


def test_no_other_spelling_of_the_last_character_verifies() -> None:
    signer = TokenSigner("k" * 32)
    for recipient_id in range(1, 40):
        token = signer.sign("u", 5, recipient_id)
        accepted = [c for c in _ALPHABET if _try(signer, token[:-1] + c) is not None]
        assert accepted == [token[-1]]


def test_upper_case_token_still_verifies_for_case_folding_mail_servers() -> None:
    signer = TokenSigner("k" * 32)
    token = signer.sign("b", 4, 9)
    assert signer.verify("b", token.upper()).recipient_id == 9


def _try(signer: TokenSigner, token: str) -> int | None:
    try:
        return signer.verify("u", token).recipient_id
    except TokenError:
        return None
