"""The failure classifier, from a table: reply or trouble, stage, policy -> verdict."""

from __future__ import annotations

import pytest

from postflow.models import RecipientState
from postflow.replies import (
    Policy,
    Stage,
    Trouble,
    clean_text,
    enhanced_code,
    judge_reply,
    judge_trouble,
)

D, F, OK = RecipientState.DEFERRED, RecipientState.FAILED, RecipientState.DELIVERED
SOFT = Policy(soft_bounce=True)
BOUNCE_AUTH = Policy(auth_failure="bounce")
SOFT_ALL = Policy(soft_bounce=True, auth_failure="bounce")

# code, text, stage, policy, state, enhanced, next host?
REPLIES = [
    (250, "2.0.0 Ok: queued as 4Zk", Stage.DATA, Policy(), OK, "2.0.0", False),
    (550, "5.1.1 <gone@dest.test>: user unknown", Stage.RCPT, Policy(), F, "5.1.1", False),
    (550, "user unknown", Stage.RCPT, Policy(), F, "5.0.0", False),
    (451, "4.7.1 greylisted", Stage.RCPT, Policy(), D, "4.7.1", False),
    (452, "too many recipients", Stage.RCPT, Policy(), D, "4.0.0", False),
    # The enhanced code must agree with the basic code's class, else it is derived.
    (550, "4.7.1 try later", Stage.RCPT, Policy(), F, "5.0.0", False),
    (421, "4.3.2 shutting down", Stage.RCPT, Policy(), D, "4.3.2", True),
    (421, "too busy", Stage.GREETING, Policy(), D, "4.0.0", True),
    # A refusal before the transaction is about the host: next host, then wait.
    (554, "5.7.1 no service for you", Stage.GREETING, Policy(), D, "4.7.1", True),
    (550, "not today", Stage.EHLO, Policy(), D, "4.0.0", True),
    (454, "4.7.0 TLS not available", Stage.TLS, Policy(), D, "4.7.0", True),
    # AUTH: 535 defers by default (credentials get fixed), bounces when configured.
    (535, "5.7.8 Authentication credentials invalid", Stage.AUTH, Policy(), D, "4.7.8", True),
    (535, "5.7.8 Authentication credentials invalid", Stage.AUTH, BOUNCE_AUTH, F, "5.7.8", True),
    (454, "4.7.0 temporary auth failure", Stage.AUTH, BOUNCE_AUTH, D, "4.7.0", True),
    (535, "5.7.8 bad", Stage.AUTH, SOFT_ALL, D, "4.7.8", True),
    # MAIL: 4xx tries the next host, 5xx fails every recipient of the transaction.
    (451, "4.3.0 try again", Stage.MAIL, Policy(), D, "4.3.0", True),
    (553, "5.7.1 sender rejected", Stage.MAIL, Policy(), F, "5.7.1", False),
    (554, "5.6.0 content rejected", Stage.DATA, Policy(), F, "5.6.0", False),
    (451, "4.3.0 queue full", Stage.DATA, Policy(), D, "4.3.0", False),
    # soft_bounce: every permanent answer becomes a deferral with a class 4 status.
    (550, "5.1.1 user unknown", Stage.RCPT, SOFT, D, "4.1.1", False),
    (554, "5.6.0 content rejected", Stage.DATA, SOFT, D, "4.6.0", False),
    # Nonsense codes are a protocol problem of this host.
    (199, "what", Stage.RCPT, Policy(), D, "4.5.0", True),
]


@pytest.mark.parametrize(("code", "text", "stage", "policy", "state", "enhanced", "nxt"), REPLIES)
def test_judge_reply(
    code: int,
    text: str,
    stage: Stage,
    policy: Policy,
    state: RecipientState,
    enhanced: str,
    nxt: bool,
) -> None:
    verdict = judge_reply(code, text, stage, policy)
    assert (verdict.state, verdict.enhanced, verdict.next_host) == (state, enhanced, nxt)
    assert verdict.code == code
    assert verdict.stage == stage
    # The server's own words stay in the text, whatever we concluded.
    assert clean_text(text) in verdict.text


# trouble, stage, policy, state, enhanced, next host?
TROUBLES = [
    (Trouble.CONNECT_FAILED, Stage.CONNECT, Policy(), D, "4.4.1", True),
    (Trouble.TIMEOUT, Stage.GREETING, Policy(), D, "4.4.2", True),
    (Trouble.LOST, Stage.DATA, Policy(), D, "4.4.2", True),
    (Trouble.PROTOCOL, Stage.RCPT, Policy(), D, "4.5.0", True),
    (Trouble.TLS_NOT_OFFERED, Stage.TLS, Policy(), D, "4.7.4", True),
    (Trouble.TLS_FAILED, Stage.TLS, Policy(), D, "4.7.5", True),
    (Trouble.TLS_UNVERIFIED, Stage.TLS, Policy(), D, "4.7.5", True),
    (Trouble.AUTH_NOT_ENCRYPTED, Stage.AUTH, Policy(), D, "4.7.11", True),
    (Trouble.AUTH_NOT_OFFERED, Stage.AUTH, Policy(), D, "4.7.0", True),
    (Trouble.AUTH_NO_MECHANISM, Stage.AUTH, Policy(), D, "4.7.0", True),
    (Trouble.LOCAL_CONFIG, Stage.CONNECT, Policy(), D, "4.3.5", False),
    (Trouble.TOO_BIG, Stage.MAIL, Policy(), F, "5.3.4", False),
    (Trouble.NEEDS_SMTPUTF8, Stage.MAIL, Policy(), F, "5.6.7", False),
    (Trouble.BAD_ADDRESS, Stage.RCPT, Policy(), F, "5.1.3", False),
    (Trouble.TOO_BIG, Stage.MAIL, SOFT, D, "4.3.4", False),
    (Trouble.NO_HOSTS, Stage.CONNECT, Policy(), D, "4.4.4", False),
]


@pytest.mark.parametrize(("trouble", "stage", "policy", "state", "enhanced", "nxt"), TROUBLES)
def test_judge_trouble(
    trouble: Trouble,
    stage: Stage,
    policy: Policy,
    state: RecipientState,
    enhanced: str,
    nxt: bool,
) -> None:
    verdict = judge_trouble(trouble, stage, "some detail", policy)
    assert (verdict.state, verdict.enhanced, verdict.next_host) == (state, enhanced, nxt)
    assert verdict.code is None
    assert verdict.text == f"{enhanced} {trouble.value}: some detail"


def test_every_trouble_has_a_row() -> None:
    assert {row[0] for row in TROUBLES} == set(Trouble)


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (250, "2.1.5 Ok", "2.1.5"),
        (451, "4.7.1 Try again", "4.7.1"),
        (550, "5.1.10 null MX", "5.1.10"),
        (550, "no enhanced code", "5.0.0"),
        (250, "Ok", "2.0.0"),
        (354, "go ahead", "4.0.0"),
        (451, "5.1.1 mismatched class", "4.0.0"),
    ],
)
def test_enhanced_code(code: int, text: str, expected: str) -> None:
    assert enhanced_code(code, text) == expected


def test_outcome_carries_where_and_what() -> None:
    verdict = judge_reply(550, "5.1.1 <x@dest.test>: no such user\nsecond line", Stage.RCPT)
    out = verdict.outcome("x@dest.test", "mx.dest.test", "127.0.0.1")
    assert out.model_dump() == {
        "address": "x@dest.test",
        "state": RecipientState.FAILED,
        "code": 550,
        "enhanced": "5.1.1",
        "text": "550 5.1.1 <x@dest.test>: no such user second line",
        "remote_host": "mx.dest.test",
        "remote_ip": "127.0.0.1",
        "stage": "rcpt",
    }
