"""What an SMTP reply or a session failure means for a recipient; pure, like Postfix's
smtp_trouble.c: the one place that decides delivered, deferred or failed, and whether
another host is worth trying. Never does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Literal

from postflow.models import RecipientOutcome, RecipientState

__all__ = [
    "Policy",
    "ReplyCode",
    "Stage",
    "Trouble",
    "Verdict",
    "clean_text",
    "enhanced_code",
    "judge_reply",
    "judge_trouble",
    "outcome_from_reply",
]

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
MAX_TEXT = 512


class ReplyCode(IntEnum):
    READY = 220
    CLOSING = 221
    AUTH_OK = 235
    OK = 250
    WILL_FORWARD = 251
    AUTH_CONTINUE = 334
    START_DATA = 354
    SERVICE_UNAVAILABLE = 421
    MAILBOX_BUSY = 450
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    AUTH_FAILED = 535
    MAILBOX_UNAVAILABLE = 550
    EXCEEDED_STORAGE = 552
    TRANSACTION_FAILED = 554


class Stage(StrEnum):
    """The step of the session that failed or answered; it decides who the answer concerns."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    TLS = "tls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class Trouble(StrEnum):
    """A failure that is not an SMTP reply: something we saw on the wire or decided here."""

    CONNECT_FAILED = "cannot connect"
    TIMEOUT = "timed out"
    LOST = "connection lost"
    PROTOCOL = "protocol error"
    TLS_NOT_OFFERED = "TLS is required but the server does not offer STARTTLS"
    TLS_FAILED = "TLS handshake failed"
    TLS_UNVERIFIED = "server certificate not trusted"
    AUTH_NOT_OFFERED = "SASL is configured but the server does not offer AUTH"
    AUTH_NOT_ENCRYPTED = "AUTH refused on an unencrypted connection (allow_plaintext = false)"
    AUTH_NO_MECHANISM = "no SASL mechanism in common"
    LOCAL_CONFIG = "local configuration problem"
    TOO_BIG = "message too big for the server"
    NEEDS_SMTPUTF8 = "SMTPUTF8 is required but the server does not offer it"
    BAD_ADDRESS = "bad address syntax"
    NO_HOSTS = "no host to try"


# Enhanced code (RFC 3463) and whether another host may do better. Our own problems and
# the message's own properties do not improve at the next host; session trouble might.
_TROUBLE: dict[Trouble, tuple[str, bool]] = {
    Trouble.CONNECT_FAILED: ("4.4.1", True),
    Trouble.TIMEOUT: ("4.4.2", True),
    Trouble.LOST: ("4.4.2", True),
    Trouble.PROTOCOL: ("4.5.0", True),
    Trouble.TLS_NOT_OFFERED: ("4.7.4", True),
    Trouble.TLS_FAILED: ("4.7.5", True),
    Trouble.TLS_UNVERIFIED: ("4.7.5", True),
    Trouble.AUTH_NOT_OFFERED: ("4.7.0", True),
    Trouble.AUTH_NOT_ENCRYPTED: ("4.7.11", True),
    Trouble.AUTH_NO_MECHANISM: ("4.7.0", True),
    Trouble.LOCAL_CONFIG: ("4.3.5", False),
    Trouble.TOO_BIG: ("5.3.4", False),
    Trouble.NEEDS_SMTPUTF8: ("5.6.7", False),
    Trouble.BAD_ADDRESS: ("5.1.3", False),
    Trouble.NO_HOSTS: ("4.4.4", False),
}

# Before the transaction a refusal is about this host, not the message (Postfix's
# smtp_skip_5xx_greeting): the next host is tried and, at the end, the mail waits.
_HOST_STAGES = frozenset({Stage.CONNECT, Stage.GREETING, Stage.EHLO, Stage.TLS, Stage.AUTH})


@dataclass(frozen=True)
class Policy:
    """The operator's switches that turn permanent failures into deferrals."""

    soft_bounce: bool = False
    auth_failure: Literal["defer", "bounce"] = "defer"


@dataclass(frozen=True)
class Verdict:
    """What one reply or failure means for the recipients it concerns."""

    state: RecipientState
    enhanced: str
    text: str
    stage: Stage
    code: int | None = None
    next_host: bool = False

    def outcome(self, address: str, host: str | None, ip: str | None) -> RecipientOutcome:
        return RecipientOutcome(
            address=address,
            state=self.state,
            code=self.code,
            enhanced=self.enhanced,
            text=self.text,
            remote_host=host,
            remote_ip=ip,
            stage=self.stage.value,
        )


def clean_text(text: str) -> str:
    """A server's reply text made safe for history, logs and report headers."""
    # aiosmtplib decodes invalid UTF-8 into lone surrogates, which no payload can carry.
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
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


def _soften(state: RecipientState, enhanced: str) -> tuple[RecipientState, str]:
    if state == RecipientState.FAILED:
        return RecipientState.DEFERRED, "4" + enhanced[1:]
    return state, enhanced


def judge_reply(code: int, text: str, stage: Stage, policy: Policy = Policy()) -> Verdict:
    """What the server's reply `code text` at `stage` means for the recipients it concerns."""
    text = clean_text(text)
    enhanced = enhanced_code(code, text)
    said = f"{code} {text}".strip()
    if 200 <= code < 300:
        return Verdict(RecipientState.DELIVERED, enhanced, said, stage, code)
    if not 400 <= code < 600:
        said = f"unexpected reply: {said}"
        return Verdict(RecipientState.DEFERRED, "4.5.0", said, stage, code, next_host=True)
    state = RecipientState.FAILED if code >= 500 else RecipientState.DEFERRED
    # 421: the server is closing this session, whatever the command was.
    next_host = code == ReplyCode.SERVICE_UNAVAILABLE
    if stage in _HOST_STAGES:
        next_host = True
        if not (stage == Stage.AUTH and policy.auth_failure == "bounce"):
            state, enhanced = _soften(state, enhanced)
    elif stage == Stage.MAIL and code < 500:
        next_host = True
    if policy.soft_bounce:
        state, enhanced = _soften(state, enhanced)
    return Verdict(state, enhanced, said, stage, code, next_host)


def judge_trouble(
    trouble: Trouble, stage: Stage, detail: str = "", policy: Policy = Policy()
) -> Verdict:
    """What a failure without a reply means: its code, and whether the next host may help."""
    enhanced, next_host = _TROUBLE[trouble]
    state = RecipientState.FAILED if enhanced[0] == "5" else RecipientState.DEFERRED
    if policy.soft_bounce:
        state, enhanced = _soften(state, enhanced)
    detail = clean_text(detail)
    text = f"{enhanced} {trouble.value}" + (f": {detail}" if detail else "")
    return Verdict(state, enhanced, text, stage, None, next_host)


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
    """One recipient's outcome from one reply (the per-recipient shortcut of judge_reply)."""
    verdict = judge_reply(code, text, Stage(stage), Policy(soft_bounce=soft_bounce))
    return verdict.outcome(address, host, ip)
