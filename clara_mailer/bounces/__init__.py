"""Bounces: read the bounce mailbox and apply what the bounces say.

- ``mailboxes``: where the messages come from (mbox, Maildir, IMAP) and how a handled
  one is marked;
- ``parse``: one message read (no database): bounce, auto-reply or neither, and for a
  bounce each failed address with its status and ``BounceKind``;
- ``apply``: each bounce matched to its delivery, recorded once, and the policy applied
  (the delivery marked bounced through the delivery log, the address suppressed); and
  each ``List-Unsubscribe`` mailto request (Subject ``unsubscribe-TOKEN``) applied once,
  as the one-click POST would.
"""

from __future__ import annotations

from clara_mailer.bounces.apply import (
    BounceReport,
    PolicyWarning,
    Unmatched,
    import_bounces,
    match_delivery,
    record_message,
    record_unsubscribe_request,
    unsubscribe_token,
)
from clara_mailer.bounces.mailboxes import BounceSource, MailboxMessage
from clara_mailer.bounces.parse import (
    BounceEvent,
    ParsedMessage,
    bounce_kind,
    is_auto_reply,
    normalise_status,
    parse_bounce,
)

__all__ = [
    "BounceEvent",
    "BounceReport",
    "BounceSource",
    "MailboxMessage",
    "ParsedMessage",
    "PolicyWarning",
    "Unmatched",
    "bounce_kind",
    "import_bounces",
    "is_auto_reply",
    "match_delivery",
    "normalise_status",
    "parse_bounce",
    "record_message",
    "record_unsubscribe_request",
    "unsubscribe_token",
]
