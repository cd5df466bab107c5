"""Configuration parsing and its error messages; recipient routing and grouping. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from postflow.config import ConfigError, load_config, parse_config
from postflow.models import Recipient
from postflow.routing import plan_groups, transport_for

ROOT = Path(__file__).resolve().parent.parent


def _problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return err.value.problems


def test_issue_example_error_line() -> None:
    problems = _problems({"transports": {"default": {}, "x": {"retry_delays": "60,abc"}}})
    assert problems == ['transports.x.retry_delays: "60,abc": not a list of minutes']


def test_one_line_per_problem_and_unknown_keys() -> None:
    problems = _problems(
        {
            "transports": {
                "default": {"retry_count": -1, "tls": "maybe"},
                "x": {"destination": "lookup-mx:zon=a", "bogus": 1},
            },
            "ingset": {},
        }
    )
    assert len(problems) == 5
    assert "ingset: unknown key" in problems
    assert "transports.x.bogus: unknown key" in problems
    assert any(p.startswith("transports.default.retry_count: -1: ") for p in problems)
    assert any(p.startswith('transports.default.tls: "maybe": ') for p in problems)
    assert any("unknown option 'zon'" in p for p in problems)


def test_minutes_as_text_or_toml_list_and_the_seed_schedule() -> None:
    text = parse_config({"transports": {"default": {"retry_delays": "60, 120,180"}}})
    listed = parse_config({"transports": {"default": {"retry_delays": [60, 120, 180]}}})
    assert text.transport("default").retry_delays == [60, 120, 180]
    assert listed.transport("default").schedule == text.transport("default").schedule
    assert text.transport("default").schedule.describe() == (
        "31 attempts, gives up 87 h 0 min after the first (60, 120, 180, 180, ...)"
    )


def test_default_transport_is_required_and_routes_must_name_a_transport() -> None:
    assert any("transports.default is required" in p for p in _problems({"transports": {}}))
    problems = _problems({"routes": [{"domains": ["a.test"], "transport": "nope"}]})
    assert any("routes.0.transport: 'nope': no such transport" in p for p in problems)


def test_durations() -> None:
    config = parse_config({"transports": {"default": {"max_age": "5d"}}})
    assert config.transport("default").max_age.total_seconds() == 5 * 86400
    assert any("not a duration" in p for p in _problems({"smtp": {"connect_timeout": "5x"}}))


def test_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POSTFLOW_CONFIG", raising=False)
    assert load_config().transport("default").destination == "lookup-mx"  # no file: defaults
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[transports.default\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    # The repository's own default configuration is valid.
    shipped = load_config(ROOT / "postflow.toml")
    assert transport_for(shipped, "example.test") == "local-sink"


def test_routes_exact_and_subdomain() -> None:
    config = parse_config(
        {
            "transports": {"default": {}, "corp": {"destination": "server:10.0.0.7"}},
            "routes": [{"domains": ["example.com", ".example.net"], "transport": "corp"}],
        }
    )
    assert transport_for(config, "example.com") == "corp"
    assert transport_for(config, "EXAMPLE.COM.") == "corp"
    assert transport_for(config, "mail.example.net") == "corp"
    assert transport_for(config, "example.net") == "default"  # the dot means subdomains only
    assert transport_for(config, "sub.example.com") == "default"


def test_grouping_by_transport_and_domain() -> None:
    config = parse_config(
        {
            "transports": {
                "default": {"retry_delays": "60"},
                "slow": {
                    "destination": "server:10.0.0.7",
                    "retry_delays": "5,10",
                    "retry_count": 2,
                },
            },
            "routes": [{"domains": ["b.test"], "transport": "slow"}],
        }
    )
    groups = plan_groups(
        config,
        [
            Recipient(address="x@a.test"),
            Recipient(address="y@B.test"),
            Recipient(address="z@a.test"),
            Recipient(address="x@a.test"),  # a repeated RCPT is delivered once
        ],
    )
    assert [(g.transport, g.domain, [r.address for r in g.recipients]) for g in groups] == [
        ("default", "a.test", ["x@a.test", "z@a.test"]),
        ("slow", "b.test", ["y@B.test"]),
    ]
    assert groups[1].schedule.delays == [5, 10]
    assert groups[1].schedule.count == 2
