"""TLS policies against real STARTTLS servers on loopback, with the test PKI's certificates:
every policy x (valid, expired, wrong name, unknown CA, no STARTTLS), pinning, names,
client certificates, and the plaintext retry after a failed opportunistic handshake."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from postflow.config import ConfigError
from postflow.models import RecipientState, SendResult
from postflow.tls_policy import name_matches, normalize_fingerprint
from tests.certs import Pki, pki
from tests.conftest import make_config
from tests.helpers import MESSAGE
from tests.smtp_peers_tls import PeerOptions, SmtpTestPeer, mx, run_send

DELIVERED, DEFERRED = RecipientState.DELIVERED, RecipientState.DEFERRED


@pytest.fixture(scope="module")
def certs() -> Pki:
    return pki()


def _config(tmp_path: Path, **transport: object):
    return make_config(tmp_path, transports={"default": transport})


def _only(result: SendResult):
    assert len(result.recipients) == 1
    return result.recipients[0]


# server certificate -> expected (state, tls error) for tls = "verify" with the test CA
VERIFY = {
    "valid": (DELIVERED, None),
    "expired": (DEFERRED, "expired"),
    "wrong_name": (DEFERRED, "name mismatch"),
    "unknown_ca": (DEFERRED, "unknown CA"),
    None: (DEFERRED, "STARTTLS not offered"),
}


@pytest.mark.parametrize("level", ["none", "opportunistic", "required", "verify"])
@pytest.mark.parametrize("cert", ["valid", "expired", "wrong_name", "unknown_ca", None])
async def test_policy_matrix(tmp_path: Path, certs: Pki, level: str, cert: str | None) -> None:
    issued = getattr(certs, cert) if cert else None
    extra = {"tls_ca_file": str(certs.ca)} if level == "verify" else {}
    config = _config(tmp_path, tls=level, **extra)
    async with SmtpTestPeer(options=PeerOptions(tls=issued)) as peer:
        result, _ = await run_send(config, [mx(peer)])
    out = _only(result)
    (attempt,) = result.tries
    if level == "verify":
        state, error = VERIFY[cert]
    elif level == "required" and cert is None:
        state, error = DEFERRED, "STARTTLS not offered"
    else:
        state, error = DELIVERED, None
    assert out.state == state, out.text
    encrypted = level != "none" and issued is not None and state == DELIVERED
    assert peer.seen.tls_sessions == (1 if encrypted else 0)
    assert len(peer.received) == (1 if state == DELIVERED else 0)
    if level == "none" or (level == "opportunistic" and cert is None):
        assert attempt.tls is None
        return
    assert attempt.tls is not None
    assert attempt.tls.policy == level
    if error is None:
        assert attempt.tls.error is None
    else:
        assert (attempt.tls.error or "").startswith(error)
    assert attempt.tls.verified == (level == "verify" and state == DELIVERED)
    if state == DEFERRED:
        assert (out.stage, out.remote_host, out.remote_ip) == ("tls", "mx.dest.test", "127.0.0.1")
        assert out.enhanced == ("4.7.4" if cert is None else "4.7.5")
        assert (error if cert else "does not offer STARTTLS") in out.text
        assert (attempt.stage, attempt.enhanced) == ("tls", out.enhanced)
    if encrypted or cert == "wrong_name":
        assert attempt.tls.protocol in ("TLSv1.2", "TLSv1.3")
        assert attempt.tls.cipher
        assert attempt.tls.peer_subject == issued.subject
        assert attempt.tls.peer_sha256 == issued.sha256


async def test_verify_tries_the_next_host_after_a_bad_certificate(
    tmp_path: Path, certs: Pki
) -> None:
    config = _config(tmp_path, tls="verify", tls_ca_file=str(certs.ca))
    async with (
        SmtpTestPeer(options=PeerOptions(tls=certs.expired)) as bad,
        SmtpTestPeer("127.0.0.2", options=PeerOptions(tls=certs.valid)) as good,
    ):
        result, _ = await run_send(config, [mx(bad), mx(good)])
    out = _only(result)
    assert out.state == DELIVERED
    assert out.remote_ip == "127.0.0.2"
    assert [t.ip for t in result.tries] == ["127.0.0.1", "127.0.0.2"]
    assert result.tries[0].tls.error == "expired"
    assert result.tries[1].tls.verified
    assert bad.received == [] and len(good.received) == 1


async def test_verify_matches_the_server_ip_and_listed_names(tmp_path: Path, certs: Pki) -> None:
    async with SmtpTestPeer(options=PeerOptions(tls=certs.valid)) as peer:
        # A `server:127.0.0.1` destination: the certificate's IP address SAN matches.
        config = _config(tmp_path, tls="verify", tls_ca_file=str(certs.ca))
        by_ip, _ = await run_send(config, [mx(peer, name="127.0.0.1")])
        # Another name than the host's: only the listed names count.
        listed = _config(
            tmp_path, tls="verify", tls_ca_file=str(certs.ca), tls_verify_names=["other.example"]
        )
        refused, _ = await run_send(listed, [mx(peer)])
    assert _only(by_ip).state == DELIVERED
    assert by_ip.tries[0].tls.verified
    assert _only(refused).state == DEFERRED
    assert "wanted other.example" in refused.tries[0].tls.error
    async with SmtpTestPeer(options=PeerOptions(tls=certs.wrong_name)) as peer:
        named = _config(
            tmp_path, tls="verify", tls_ca_file=str(certs.ca), tls_verify_names=[".example"]
        )
        result, _ = await run_send(named, [mx(peer)])
    assert _only(result).state == DELIVERED


async def test_verify_by_pinned_fingerprint_instead_of_a_ca(tmp_path: Path, certs: Pki) -> None:
    pin = certs.unknown_ca.sha256
    plain_hex = "sha256:" + pin.replace(":", "").lower()
    async with SmtpTestPeer(options=PeerOptions(tls=certs.unknown_ca)) as peer:
        pinned, _ = await run_send(
            _config(tmp_path, tls="verify", tls_fingerprints=[plain_hex]), [mx(peer)]
        )
        wrong, _ = await run_send(
            _config(tmp_path, tls="verify", tls_fingerprints=[certs.valid.sha256]), [mx(peer)]
        )
    assert _only(pinned).state == DELIVERED
    assert pinned.tries[0].tls.verified and pinned.tries[0].tls.peer_sha256 == pin
    assert _only(wrong).state == DEFERRED
    assert wrong.tries[0].tls.error.startswith("fingerprint mismatch")
    assert len(peer.received) == 1


async def test_opportunistic_handshake_failure_retries_in_plaintext(
    tmp_path: Path, certs: Pki
) -> None:
    options = PeerOptions(tls=certs.valid, tls_max_version=ssl.TLSVersion.TLSv1_2)
    async with SmtpTestPeer(options=options) as peer:
        result, _ = await run_send(
            _config(tmp_path, tls="opportunistic", tls_min_version="TLSv1.3"), [mx(peer)]
        )
        required, _ = await run_send(
            _config(tmp_path, tls="required", tls_min_version="TLSv1.3"), [mx(peer)]
        )
    assert _only(result).state == DELIVERED
    first, second = result.tries
    assert first.tls.error and not first.plaintext_fallback
    assert first.enhanced == "4.7.5"
    assert second.plaintext_fallback and second.tls is None and second.error is None
    assert peer.seen.tls_sessions == 0 and len(peer.received) == 1
    # Required TLS never falls back: the host is deferred.
    assert _only(required).state == DEFERRED
    assert len(required.tries) == 1 and _only(required).enhanced == "4.7.5"


async def test_client_certificate(tmp_path: Path, certs: Pki) -> None:
    options = PeerOptions(tls=certs.valid, require_client_cert=True)
    config = _config(
        tmp_path,
        tls="required",
        tls_cert_file=str(certs.client.cert),
        tls_key_file=str(certs.client.key),
    )
    async with SmtpTestPeer(options=options) as peer:
        result, _ = await run_send(config, [mx(peer)])
    assert _only(result).state == DELIVERED
    (seen,) = peer.seen.client_certs
    assert dict(x[0] for x in seen["subject"])["commonName"] == "client.postflow.test"
    assert peer.received[0].data == MESSAGE


async def test_unreadable_ca_file_defers_naming_the_setting(tmp_path: Path, certs: Pki) -> None:
    missing = tmp_path / "nope.pem"
    async with SmtpTestPeer(options=PeerOptions(tls=certs.valid)) as peer:
        result, _ = await run_send(
            _config(tmp_path, tls="verify", tls_ca_file=str(missing)), [mx(peer)]
        )
    out = _only(result)
    assert (out.state, out.enhanced) == (DEFERRED, "4.3.5")
    assert f"transports.default.tls_ca_file: '{missing}'" in out.text
    assert result.tries == [] and peer.seen.helo_names == []


@pytest.mark.parametrize(
    ("names", "ips", "wanted", "ok"),
    [
        (["mx.dest.test"], [], "MX.dest.test.", True),
        (["*.dest.test"], [], "mx.dest.test", True),
        (["*.dest.test"], [], "a.b.dest.test", False),
        (["*.test"], [], "test", False),
        (["mx.dest.test"], [], ".dest.test", True),
        (["dest.test"], [], ".dest.test", False),
        (["*.dest.test"], [], ".dest.test", True),
        ([], ["127.0.0.1"], "127.0.0.1", True),
        (["127.0.0.1"], [], "127.0.0.1", False),
        (["other.example"], [], "mx.dest.test", False),
    ],
)
def test_name_matches(names: list[str], ips: list[str], wanted: str, ok: bool) -> None:
    assert name_matches(names, ips, wanted) is ok


def test_fingerprint_forms() -> None:
    hexed = "ab" * 32
    assert normalize_fingerprint("sha256:" + ":".join(["AB"] * 32)) == hexed
    assert normalize_fingerprint(hexed.upper()) == hexed
    with pytest.raises(ValueError):
        normalize_fingerprint("sha256:abcd")


@pytest.mark.parametrize(
    ("transport", "problem"),
    [
        (
            {"tls": "required", "tls_ca_file": "/x.pem"},
            'tls_ca_file is only used with tls = "verify"',
        ),
        ({"tls": "verify", "tls_fingerprints": ["sha256:12"]}, "not a SHA-256 fingerprint"),
        ({"tls": "verify", "tls_key_file": "/k.pem"}, "tls_key_file needs tls_cert_file"),
        ({"tls": "verify", "tls_min_version": "SSLv3"}, "tls_min_version"),
    ],
)
def test_tls_config_errors_name_the_key(
    tmp_path: Path, transport: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, **transport)
    assert any(p.startswith("transports.default") and problem in p for p in err.value.problems)
