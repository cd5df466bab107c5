"""What an SMTP reply or a session failure means for a recipient. Pure, like Postfix's
smtp_trouble.c: one place decides between delivered, deferred and failed."""

from __future__ import annotations

import re
from enum import IntEnum

from postflow.models import RecipientOutcome, RecipientState

__all__ = ["ReplyCode", "clean_text", "enhanced_code", "outcome_from_reply"]

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
MAX_TEXT = 512


class ReplyCode(IntEnum):
    READY = 220
    CLOSING = 221
    AUTH_OK = 235
    OK = 250
    START_DATA = 354
    SERVICE_UNAVAILABLE = 421
    MAILBOX_BUSY = 450
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    MAILBOX_UNAVAILABLE = 550
    EXCEEDED_STORAGE = 552
    TRANSACTION_FAILED = 554


def clean_text(text: str) -> str:
    """A server's reply text made safe for history, logs and report headers."""
    text = _CONTROL.sub(" ", text).strip()
    return text[:MAX_TEXT]


def enhanced_code(code: int, text: str) -> str:
    """The RFC 3463 code from the reply, or one derived from the basic code's class."""
    match = _ENHANCED.match(text)
    if match and match[1] == str(code)[0]:
        return f"{match[1]}.{match[2]}.{match[3]}"
    klass = str(code)[0]
    if klass == "2":
        return "2.0.0"
    return f"{klass}.0.0" if klass in "45" else "4.0.0"


def outcome_from_reply(
    address: str,
    code: int,
    text: str,
    *,
    stage: str,
    host: str | None,
    ip: str | None,
    soft_bounce: bool = False,
) -> RecipientOutcome:
    text = clean_text(text)
    enhanced = enhanced_code(code, text)
    if 200 <= code < 300:
        state = RecipientState.DELIVERED
    elif 500 <= code < 600 and not soft_bounce:
        state = RecipientState.FAILED
    else:
        state = RecipientState.DEFERRED
    if soft_bounce and 500 <= code < 600:
        enhanced = "4" + enhanced[1:]
    body = _ENHANCED.sub("", text, count=1).strip()
    return RecipientOutcome(
        address=address,
        state=state,
        code=code,
        enhanced=enhanced,
        text=f"{code} {enhanced} {body}".strip(),
        remote_host=host,
        remote_ip=ip,
        stage=stage,
    )
