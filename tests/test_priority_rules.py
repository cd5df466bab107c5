"""`[[priority]]` rules: each criterion, combinations, header regex, size limit, bad config."""

from __future__ import annotations

import pytest

from postflow.config import Config, ConfigError, parse_config
from postflow.models import Recipient
from postflow.priority import PriorityRules, fairness_key
from postflow.routing import plan_groups

TRANSPORTS = {
    "default": {"destination": "lookup-mx"},
    "internal": {"destination": "server:127.0.0.1:2526"},
}
ROUTES = [{"domains": ["intranet.test", ".intranet.test"], "transport": "internal"}]


def _config(*rules: dict[str, object]) -> Config:
    return parse_config({"transports": TRANSPORTS, "routes": ROUTES, "priority": list(rules)})


def _message(headers: str = "", body: str = "Hello.\r\n") -> bytes:
    head = "From: a@x.test\r\nTo: b@y.test\r\nSubject: hi\r\n" + headers
    return (head + "\r\n" + body).encode()


def _decide(
    config: Config, mail_from: str, rcpts: list[str], data: bytes | None = None
) -> int | None:
    """As `Submitter` decides: envelope, the planned groups' domains and transports, headers."""
    groups = plan_groups(config, [Recipient(address=r) for r in rcpts])
    return PriorityRules(config.priority).match(
        mail_from,
        {g.domain for g in groups},
        {g.transport for g in groups},
        _message() if data is None else data,
    )


def test_no_rules_means_every_message_is_ordinary() -> None:
    config = _config()
    assert not PriorityRules(config.priority)
    assert _decide(config, "ceo@corp.test", ["x@partner.test"]) is None


def test_sender_domain_exact_and_subdomains() -> None:
    config = _config({"sender_domains": ["Corp.Test", ".eu.corp.test"]})
    assert _decide(config, "ceo@corp.test", ["x@else.test"]) == 0
    assert _decide(config, "ceo@CORP.TEST", ["x@else.test"]) == 0
    assert _decide(config, "a@paris.eu.corp.test", ["x@else.test"]) == 0
    # Exact names do not cover subdomains, and a look-alike suffix is not a subdomain.
    assert _decide(config, "a@mail.corp.test", ["x@else.test"]) is None
    assert _decide(config, "a@notcorp.test", ["x@else.test"]) is None
    assert _decide(config, "", ["x@else.test"]) is None  # the null sender has no domain


def test_recipient_domain_any_recipient_is_enough() -> None:
    config = _config({"recipient_domains": ["partner.test"]})
    assert _decide(config, "a@news.test", ["x@partner.test"]) == 0
    assert _decide(config, "a@news.test", ["y@other.test", "x@Partner.Test"]) == 0
    assert _decide(config, "a@news.test", ["y@other.test"]) is None
    # The envelope decides, not the To: header.
    data = _message().replace(b"To: b@y.test", b"To: x@partner.test")
    assert _decide(config, "a@news.test", ["y@other.test"], data) is None


def test_transport_is_the_one_routing_chose() -> None:
    config = _config({"transports": ["internal"]})
    assert _decide(config, "a@news.test", ["x@intranet.test"]) == 0
    assert _decide(config, "a@news.test", ["x@hr.intranet.test", "y@out.test"]) == 0
    assert _decide(config, "a@news.test", ["y@out.test"]) is None


def test_header_regex_searches_each_occurrence_of_the_header() -> None:
    config = _config({"header": "X-Priority", "match": "^[12]"})
    assert _decide(config, "a@n.test", ["x@o.test"], _message("X-Priority: 1 (Highest)\r\n")) == 0
    assert _decide(config, "a@n.test", ["x@o.test"], _message("x-priority: 2\r\n")) == 0
    assert _decide(config, "a@n.test", ["x@o.test"], _message("X-Priority: 3\r\n")) is None
    assert _decide(config, "a@n.test", ["x@o.test"], _message("X-Priority: 5 1\r\n")) is None
    assert _decide(config, "a@n.test", ["x@o.test"], _message()) is None
    two = _message("X-Priority: 3\r\nX-Priority: 1\r\n")
    assert _decide(config, "a@n.test", ["x@o.test"], two) == 0
    # A header in the body is not a header.
    in_body = _message(body="X-Priority: 1\r\n")
    assert _decide(config, "a@n.test", ["x@o.test"], in_body) is None


def test_header_value_is_unfolded_and_decoded() -> None:
    config = _config({"header": "Subject", "match": "(?i)urgent: board"})
    folded = _message().replace(b"Subject: hi", b"Subject: Urgent:\r\n board meeting")
    word = b"=?utf-8?q?URGENT=3A_board_=C3=A9t=C3=A9?="
    encoded = _message().replace(b"Subject: hi", b"Subject: " + word)
    assert _decide(config, "a@n.test", ["x@o.test"], folded) == 0
    assert _decide(config, "a@n.test", ["x@o.test"], encoded) == 0


def test_header_without_match_means_present() -> None:
    config = _config({"header": "X-Corp-Internal"})
    assert _decide(config, "a@n.test", ["x@o.test"], _message("X-Corp-Internal: yes\r\n")) == 0
    assert _decide(config, "a@n.test", ["x@o.test"], _message()) is None


def test_size_limit_is_inclusive() -> None:
    config = _config({"sender_domains": ["corp.test"], "max_size": 1000})
    small = _message(body="x" * 100 + "\r\n")
    exact = _message(body="x" * (1000 - len(_message(body=""))))
    assert len(exact) == 1000
    assert _decide(config, "a@corp.test", ["x@o.test"], small) == 0
    assert _decide(config, "a@corp.test", ["x@o.test"], exact) == 0
    assert _decide(config, "a@corp.test", ["x@o.test"], exact + b"x") is None


def test_all_criteria_of_a_rule_must_match() -> None:
    config = _config(
        {"sender_domains": ["corp.test"], "recipient_domains": ["partner.test"]},
        {"transports": ["internal"], "header": "X-Priority", "match": "^1"},
    )
    assert _decide(config, "a@corp.test", ["x@partner.test"]) == 0
    assert _decide(config, "a@corp.test", ["x@else.test"]) is None
    assert _decide(config, "a@news.test", ["x@partner.test"]) is None
    urgent = _message("X-Priority: 1\r\n")
    assert _decide(config, "a@news.test", ["x@intranet.test"], urgent) == 1
    assert _decide(config, "a@news.test", ["x@intranet.test"]) is None
    assert _decide(config, "a@news.test", ["x@out.test"], urgent) is None


def test_any_rule_prioritizes_and_the_first_match_is_reported() -> None:
    config = _config(
        {"sender_domains": ["corp.test"]},
        {"recipient_domains": ["partner.test"]},
        {"transports": ["internal"]},
    )
    assert _decide(config, "a@corp.test", ["x@intranet.test"]) == 0
    assert _decide(config, "a@news.test", ["x@partner.test", "y@intranet.test"]) == 1
    assert _decide(config, "a@news.test", ["x@intranet.test"]) == 2
    assert _decide(config, "a@news.test", ["x@other.test"]) is None


def test_fairness_key_is_the_sender_domain() -> None:
    assert fairness_key("Bulk@News.Example.") == "news.example"
    assert fairness_key("") is None
    assert len(fairness_key("a@" + "d" * 200 + ".test").encode()) == 64  # Temporal's limit


@pytest.mark.parametrize(
    ("rules", "problem"),
    [
        (
            [{"sender_domains": ["a.test"]}, {"sender_domains": ["b.test"]},
             {"header": "X-Priority", "match": "^["}],
            'priority.2.match: "^[": bad regular expression: unterminated character set',
        ),
        ([{"match": "^1"}], "priority.0: match needs header"),
        ([{"max_size": 1000}], "priority.0: a rule needs at least one of sender_domains"),
        ([{}], "priority.0: a rule needs at least one of"),
        ([{"transports": ["nope"]}], "priority.0.transports: 'nope': no such transport"),
        ([{"header": "X Priority:"}], 'priority.0.header: "X Priority:": not a header name'),
        ([{"sender_domains": []}], "priority.0.sender_domains: []: List should have at least 1"),
        ([{"header": "X-P", "max_size": 0}], "priority.0.max_size: 0: Input should be greater"),
        ([{"sender_domain": ["a.test"]}], "priority.0.sender_domain: unknown key"),
    ],
)  # fmt: skip
def test_bad_rules_are_config_errors_naming_the_rule(
    rules: list[dict[str, object]], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"transports": TRANSPORTS, "priority": rules})
    assert any(line.startswith(problem) for line in info.value.problems), info.value.problems
