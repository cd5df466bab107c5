"""SASL against aiosmtpd with AUTH on loopback: mechanisms, 535 soft and hard, AUTH refused
in plaintext, passwords read by reference, and never in results, history or logs."""

from __future__ import annotations

import base64
import json
import logging
import secrets
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from postflow.models import RecipientState
from tests.certs import pki
from tests.conftest import make_config, running_worker
from tests.helpers import submit
from tests.smtp_peers_tls import PeerOptions, SmtpTestPeer, mx, run_send

ENV = "POSTFLOW_TEST_RELAY_PASSWORD"


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "pw-" + secrets.token_urlsafe(16)
    monkeypatch.setenv(ENV, value)
    return value


def _config(tmp_path: Path, tls: str = "required", **sasl: object):
    settings = {"username": "relay", "password_env": ENV, **sasl}
    return make_config(tmp_path, transports={"default": {"tls": tls, "sasl": settings}})


def _relay(password: str, **options: object) -> SmtpTestPeer:
    opts = {"tls": pki().valid, "users": {"relay": password}, **options}
    return SmtpTestPeer(options=PeerOptions(**opts))  # type: ignore[arg-type]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
async def test_each_pinned_mechanism_authenticates(
    tmp_path: Path, password: str, mechanism: str
) -> None:
    async with _relay(password) as peer:
        result, beats = await run_send(_config(tmp_path, mechanisms=[mechanism]), [mx(peer)])
    assert result.recipients[0].state == RecipientState.DELIVERED
    assert result.tries[0].auth_mechanism == mechanism
    assert peer.seen.auth == [(mechanism, "relay", True)]
    assert password not in result.model_dump_json()
    assert not any(password in b for b in beats)


async def test_unpinned_uses_aiosmtplib_preference(tmp_path: Path, password: str) -> None:
    async with _relay(password, auth_exclude=["CRAM-MD5"]) as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)])
    assert result.recipients[0].state == RecipientState.DELIVERED
    assert result.tries[0].auth_mechanism == "PLAIN"
    assert "AUTH LOGIN PLAIN" in result.tries[0].extensions


async def test_no_common_mechanism_defers_without_trying(tmp_path: Path, password: str) -> None:
    async with _relay(password, auth_exclude=["CRAM-MD5"]) as peer:
        result, _ = await run_send(_config(tmp_path, mechanisms=["CRAM-MD5"]), [mx(peer)])
    out = result.recipients[0]
    assert (out.state, out.enhanced, out.stage) == (RecipientState.DEFERRED, "4.7.0", "auth")
    assert "server offers LOGIN PLAIN; allowed CRAM-MD5" in out.text
    assert peer.seen.auth == [] and peer.received == []


@pytest.mark.parametrize(
    ("auth_failure", "state", "enhanced"),
    [("defer", RecipientState.DEFERRED, "4.7.8"), ("bounce", RecipientState.FAILED, "5.7.8")],
)
async def test_535_is_soft_by_default_and_hard_when_configured(
    tmp_path: Path, password: str, auth_failure: str, state: RecipientState, enhanced: str
) -> None:
    async with _relay("another-password") as peer:
        result, _ = await run_send(
            _config(tmp_path, auth_failure=auth_failure),
            [mx(peer)],
            recipients=["a@x.test", "b@x.test"],
        )
    for out in result.recipients:
        assert (out.state, out.code, out.enhanced, out.stage) == (state, 535, enhanced, "auth")
        assert out.text.startswith("535 5.7.8")
        assert (out.remote_host, out.remote_ip) == ("mx.dest.test", "127.0.0.1")
    # Wrong credentials end the attempt: no second mechanism tried with the same password.
    assert len(peer.seen.auth) == 1 and not peer.seen.auth[0][2]
    assert peer.received == []
    assert password not in result.model_dump_json()


async def test_auth_is_refused_on_a_plaintext_connection(tmp_path: Path, password: str) -> None:
    options = {"tls": None, "auth_require_tls": False}
    async with _relay(password, **options) as peer:
        refused, _ = await run_send(_config(tmp_path, tls="opportunistic"), [mx(peer)])
        allowed, _ = await run_send(
            _config(tmp_path, tls="opportunistic", allow_plaintext=True), [mx(peer)]
        )
    out = refused.recipients[0]
    assert (out.state, out.enhanced, out.stage) == (RecipientState.DEFERRED, "4.7.11", "auth")
    assert "unencrypted" in out.text
    assert allowed.recipients[0].state == RecipientState.DELIVERED
    # The refused session never sent AUTH; the allowed one did, once.
    assert peer.seen.auth == [("PLAIN", "relay", True)] or peer.seen.auth[0][0] == "CRAM-MD5"
    assert len(peer.seen.auth) == 1 and len(peer.received) == 1


async def test_password_from_a_file(tmp_path: Path) -> None:
    secret = "file-" + secrets.token_urlsafe(12)
    path = tmp_path / "relay.secret"
    path.write_text(secret + "\n")
    config = make_config(
        tmp_path,
        transports={
            "default": {
                "tls": "required",
                "sasl": {"username": "relay", "password_file": str(path)},
            }
        },
    )
    async with _relay(secret) as peer:
        result, _ = await run_send(config, [mx(peer)])
    assert result.recipients[0].state == RecipientState.DELIVERED
    assert peer.seen.auth[-1][2]


async def test_missing_secret_defers_naming_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    async with _relay("whatever") as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)])
    out = result.recipients[0]
    assert (out.state, out.enhanced) == (RecipientState.DEFERRED, "4.3.5")
    assert out.text.endswith(
        f"transports.default.sasl.password_env: environment variable {ENV} is not set"
    )
    assert peer.seen.helo_names == []  # no connection for a session that cannot log in


async def test_password_is_absent_from_the_whole_history(
    ts_env: WorkflowEnvironment,
    tmp_path: Path,
    password: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with _relay(password) as peer:
        config = make_config(
            tmp_path,
            transports={
                "default": {
                    "destination": peer.destination,
                    "tls": "required",
                    "sasl": {"username": "relay", "password_env": ENV},
                }
            },
        )
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, ["bob@dest.test"])
            report = await handle.result()
            history = (await handle.fetch_history()).to_json()
    assert report.recipients[0].state == RecipientState.DELIVERED
    assert peer.seen.auth == [("CRAM-MD5", "relay", True)]
    # Payloads are base64 in the JSON: search them decoded as well.
    everything = history + _decoded_payloads(json.loads(history))
    assert password not in everything
    assert password not in caplog.text
    # The attempt record, with its TLS outcome and the secret's name, is in the history.
    assert pki().valid.sha256 in everything
    assert '"auth_mechanism":"CRAM-MD5"' in everything
    assert '"policy":"required"' in everything


def _decoded_payloads(node: object) -> str:
    """Every payload's `data` in a history (JSON form), decoded, concatenated."""
    found: list[str] = []
    if isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, str) and "metadata" in node:
            found.append(base64.b64decode(data).decode("utf-8", "replace"))
        found.extend(_decoded_payloads(v) for v in node.values())
    elif isinstance(node, list):
        found.extend(_decoded_payloads(v) for v in node)
    return "\n".join(found)
