"""The words clara-mail uses, once: every state, reason, scope and kind is one of these
enums. They are ``StrEnum``s, so they are stored, compared and printed as their values
(``Status.SENT == "sent"``), and the models type their columns with them.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """A delivery's state (see ARCHITECTURE.md for the state machine), in report order."""

    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    BOUNCED = "bounced"
    UNKNOWN = "unknown"
    SKIPPED = "skipped"
    QUEUED = "queued"
    SENDING = "sending"


#: States that still have work to do: a campaign is finished when none is left.
OPEN_STATUSES = frozenset({Status.QUEUED, Status.DEFERRED, Status.SENDING})
#: States whose last SMTP reply explains a problem.
PROBLEM_STATUSES = (Status.FAILED, Status.DEFERRED, Status.BOUNCED, Status.UNKNOWN)
#: States a message has not left in: a changed template may still be sent.
UNTOUCHED_STATUSES = (Status.QUEUED, Status.SKIPPED)


class Outcome(StrEnum):
    """What one SMTP transaction (or outbox write) came to."""

    SENT = "sent"
    DEFERRED = "deferred"  # 4xx, 421, lost before the end of DATA: try again later
    FAILED = "failed"  # 5xx, or a message that cannot be sent to this address
    UNKNOWN = "unknown"  # no reply after the end of DATA: the server may have it


class OptOutReason(StrEnum):
    """Why an address is suppressed."""

    UNSUBSCRIBE = "unsubscribe"  # the page's button
    ONE_CLICK = "one-click"  # RFC 8058 POST from the mail client
    MANUAL = "manual"  # recorded by the team (optout add)
    COMPLAINT = "complaint"  # a spam complaint
    HARD_BOUNCE = "hard-bounce"
    SOFT_BOUNCES = "soft-bounces"  # too many soft bounces in the window
    ERASED = "erased"  # GDPR erasure: only the keyed hash is kept


#: Reasons that are a person's choice (the rest are bounces and erasures).
PERSONAL_OPT_OUTS = frozenset(
    {OptOutReason.UNSUBSCRIBE, OptOutReason.ONE_CLICK, OptOutReason.MANUAL, OptOutReason.COMPLAINT}
)
#: Reasons a recipient may record themselves, through the web pages (and undo there).
SELF_SERVICE_OPT_OUTS = frozenset({OptOutReason.UNSUBSCRIBE, OptOutReason.ONE_CLICK})


class CampaignKind(StrEnum):
    NEWSLETTER = "newsletter"
    INVITATION = "invitation"
    ANNOUNCEMENT = "announcement"


class OptOutScope(StrEnum):
    """What a suppression stops: every campaign, or one kind."""

    ALL = "all"
    NEWSLETTER = "newsletter"
    INVITATION = "invitation"
    ANNOUNCEMENT = "announcement"


class BounceKind(StrEnum):
    HARD = "hard"  # the address does not exist: suppress at once
    SOFT = "soft"  # temporary: suppress after several in a window
    POLICY = "policy"  # 5.7.x: the receiver refused the sender; warn, never suppress
    DELAYED = "delayed"  # a delay notice, not a bounce


class Language(StrEnum):
    """The languages every campaign is written in and every recipient reads."""

    ES = "es"
    EN = "en"


LANGUAGES: tuple[str, ...] = tuple(Language)


#: The segments every registry starts with (seeded by the migrations), slug -> name.
STANDARD_SEGMENTS = {
    "national-authorities": "National authorities",
    "local-police": "Local police forces",
    "associations": "Associations and social entities",
    "city-networks": "European networks against racism (ENAR, ECCAR)",
    "media": "Media and press offices",
}


class RsvpAnswer(StrEnum):
    YES = "yes"
    NO = "no"


def choices(enum: type[StrEnum]) -> str:
    """``a, b, c``: the values of ``enum``, for error messages and help."""
    return ", ".join(member.value for member in enum)
