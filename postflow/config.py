"""Loads and validates `postflow.toml`; the only module that knows the file's keys.

An invalid file fails with one line per problem naming the key and the bad value, e.g.
`transports.x.retry_delays: "60,abc": not a list of minutes`. Unknown keys are errors.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from postflow.destination import (
    DestinationError,
    is_hostname,
    parse_destination,
    parse_host_port,
)
from postflow.schedule import RetrySchedule

__all__ = [
    "Config",
    "ConfigError",
    "PriorityRule",
    "TransportSettings",
    "default_config_path",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG = "postflow.toml"


class ConfigError(Exception):
    """One or more problems in a configuration file; `problems` holds one line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _minutes_list(value: Any) -> Any:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError("not a list of minutes")
        return [int(p) for p in parts]
    return value


_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# Longer than any sane timeout or queue lifetime, short of timedelta's overflow.
_MAX_DURATION = timedelta(days=3650)


def parse_duration(value: Any) -> Any:
    """`"90s"`, `"30m"`, `"4h"`, `"5d"`, or a number of seconds; positive, at most 10 years."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("not a duration (e.g. 30s, 10m, 4h, 5d)")
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match or not match[1].isascii():
            raise ValueError("not a duration (e.g. 30s, 10m, 4h, 5d)")
        seconds = int(match[1]) * _UNITS[match[2]]
    else:
        seconds = value
    if not seconds > 0 or seconds > _MAX_DURATION.total_seconds():
        raise ValueError("must be more than 0 and at most 3650d")
    return timedelta(seconds=seconds)


# At most 10 years a wait: beyond that timers overflow, and no admin means it.
Minutes = Annotated[list[Annotated[int, Field(gt=0, le=5_256_000)]], BeforeValidator(_minutes_list)]
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _check_listen(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("needs a string host:port")
    try:
        hp = parse_host_port(value, 0)
    except DestinationError as exc:
        raise ValueError(str(exc)) from None
    if hp.port == 0:
        raise ValueError("needs host:port")
    return value


Listen = Annotated[str, BeforeValidator(_check_listen)]


def _check_hostname(value: str) -> str:
    """A name we announce on the wire (EHLO, greeting): a host name or an address literal."""
    if value.startswith("[") and value.endswith("]"):
        try:
            parse_host_port(value, 25)
            return value
        except DestinationError:
            pass
    elif is_hostname(value):
        return value
    raise ValueError("not a host name or [address] literal")


HostName = Annotated[str, AfterValidator(_check_hostname)]


class TemporalSettings(_Strict):
    address: str = "127.0.0.1:7233"
    namespace: str = "default"
    ui_port: int = Field(8233, gt=0, lt=65536)
    # Used by `postflow up` only: the dev server's SQLite file.
    db_filename: str = "var/temporal.db"


class IngestSettings(_Strict):
    listen: Listen = "127.0.0.1:2525"
    hostname: HostName | None = None
    max_message_size: int = Field(50 * 1024 * 1024, gt=0)
    max_recipients: int = Field(1000, gt=0)
    max_sessions: int = Field(500, gt=0)
    idle_timeout: Duration = timedelta(minutes=5)
    allow_networks: list[str] = ["127.0.0.0/8", "::1/128"]
    # Port-587 style listener: AUTH (after STARTTLS) required for every message.
    listen_submission: Listen | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    users_file: str | None = None  # made by `postflow passwd USER`
    drain_timeout: Duration = timedelta(seconds=60)

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not a network (e.g. 192.0.2.0/24)") from None
        return value

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> IngestSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.users_file and not self.tls_cert_file:
            raise ValueError("users_file needs tls_cert_file: AUTH is offered only after STARTTLS")
        if self.listen_submission and not self.users_file:
            raise ValueError("listen_submission needs users_file: AUTH is required there")
        return self


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env_name(value: str | None) -> str | None:
    if value is not None and not _ENV_NAME.match(value):
        raise ValueError("not an environment variable name")
    return value


def _check_endpoint(value: str | None) -> str | None:
    from urllib.parse import urlsplit

    if value is None:
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("not a URL (e.g. http://127.0.0.1:8333)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL")
    return value


EnvName = Annotated[str | None, BeforeValidator(_check_env_name)]


class SpoolSettings(_Strict):
    """Where bodies live: a directory, or a bucket on an S3-compatible store (several hosts)."""

    backend: Literal["fs", "s3"] = "fs"
    path: str = "var/spool"
    # backend = "s3": no endpoint means AWS S3 in `region`.
    endpoint: Annotated[str | None, BeforeValidator(_check_endpoint)] = None
    bucket: str | None = None
    prefix: str = ""
    region: str = "us-east-1"
    # Names of environment variables holding the keys, never the keys; give both or
    # neither (then the AWS default chain: AWS_* variables, instance or pod identity).
    access_key_env: EnvName = None
    secret_key_env: EnvName = None
    max_connections: int = Field(50, gt=0)

    @model_validator(mode="after")
    def _s3(self) -> SpoolSettings:
        if self.backend == "s3" and not self.bucket:
            raise ValueError('bucket: required when backend = "s3"')
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise ValueError("give both access_key_env and secret_key_env, or neither")
        return self


class SmtpSettings(_Strict):
    """Outbound SMTP client settings shared by every transport (RFC 5321 §4.5.3.2 timeouts)."""

    helo_name: HostName = Field(default_factory=socket.getfqdn)
    # Other names of this MTA besides helo_name: lookup-mx drops MX records at the
    # preference of any of them and higher, so mail never loops back (RFC 5321 §5.1).
    my_hostnames: list[HostName] = []
    connect_timeout: Duration = timedelta(seconds=30)
    greeting_timeout: Duration = timedelta(seconds=300)
    command_timeout: Duration = timedelta(seconds=300)
    data_timeout: Duration = timedelta(seconds=120)
    block_timeout: Duration = timedelta(seconds=180)
    final_timeout: Duration = timedelta(seconds=600)
    # RFC 2920: send MAIL, RCPT... and DATA together when the server offers PIPELINING.
    pipelining: bool = True


class SaslSettings(_Strict):
    username: str
    password_env: str | None = None
    password_file: str | None = None
    mechanisms: list[Literal["PLAIN", "LOGIN", "CRAM-MD5"]] | None = None
    allow_plaintext: bool = False
    auth_failure: Literal["defer", "bounce"] = "defer"

    @model_validator(mode="after")
    def _one_secret(self) -> SaslSettings:
        if (self.password_env is None) == (self.password_file is None):
            raise ValueError("give exactly one of password_env or password_file")
        return self


class TransportSettings(_Strict):
    destination: str = "lookup-mx"
    retry_delays: Minutes = [60, 120, 180]
    retry_count: int = Field(30, ge=0)
    on_give_up: Literal["dsn", "discard"] = "dsn"
    max_age: Duration | None = None
    delay_warning_after: Duration | None = None
    tls: Literal["none", "opportunistic", "required", "verify"] = "opportunistic"
    tls_ca_file: str | None = None
    tls_verify_names: list[str] | None = None
    tls_fingerprints: list[str] | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_min_version: Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    sasl: SaslSettings | None = None
    nxdomain: Literal["bounce", "defer"] = "bounce"
    ip_version: Literal["any", "ipv4", "ipv6"] = "any"
    max_mx_hosts: int = Field(5, gt=0)
    # Per DNS query, all servers and retries included; capped so that a whole resolution
    # fits the workflow's 60 s limit for the resolve activity.
    dns_timeout: Duration = Field(timedelta(seconds=10), gt=timedelta(0), le=timedelta(seconds=15))

    @field_validator("destination")
    @classmethod
    def _destination(cls, value: str) -> str:
        try:
            parse_destination(value)
        except DestinationError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("tls_fingerprints")
    @classmethod
    def _fingerprints(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            digits = item.strip().lower().removeprefix("sha256:").replace(":", "")
            if not re.fullmatch(r"[0-9a-f]{64}", digits):
                raise ValueError(f'"{item}" is not a SHA-256 fingerprint (sha256:AB:CD:...)')
        return value

    @model_validator(mode="after")
    def _tls_consistent(self) -> TransportSettings:
        if self.tls != "verify":
            for key in ("tls_ca_file", "tls_verify_names", "tls_fingerprints"):
                if getattr(self, key) is not None:
                    raise ValueError(f'{key} is only used with tls = "verify", not "{self.tls}"')
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_key_file needs tls_cert_file")
        if self.sasl and self.tls == "none" and not self.sasl.allow_plaintext:
            raise ValueError(
                'sasl with tls = "none" would send the password in clear: '
                "use TLS or set sasl.allow_plaintext = true"
            )
        return self

    @property
    def schedule(self) -> RetrySchedule:
        return RetrySchedule(delays=self.retry_delays, count=self.retry_count)


class Route(_Strict):
    domains: list[str] = Field(min_length=1)
    transport: str

    @field_validator("domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        if any(not d.isprintable() for d in value):
            raise ValueError("a domain holds control characters")
        domains = [d.strip().lower() for d in value]
        for domain in domains:
            if not is_hostname(domain.removeprefix(".")):
                raise ValueError(f"{domain!r} is not a domain (or .domain for subdomains)")
        return domains


_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext: printable, no colon


class PriorityRule(_Strict):
    """One `[[priority]]` rule: a message matching every criterion given here is prioritized."""

    sender_domains: list[str] | None = Field(None, min_length=1)
    recipient_domains: list[str] | None = Field(None, min_length=1)
    transports: list[str] | None = Field(None, min_length=1)
    header: str | None = None
    match: str | None = None
    max_size: int | None = Field(None, gt=0)

    @field_validator("sender_domains", "recipient_domains")
    @classmethod
    def _lower(cls, value: list[str] | None) -> list[str] | None:
        return [d.strip().lower().rstrip(".") for d in value] if value is not None else None

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is not None and not _HEADER_NAME.fullmatch(value):
            raise ValueError("not a header name (printable ASCII, no colon or space)")
        return value

    @field_validator("match")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _criteria(self) -> PriorityRule:
        if self.match is not None and self.header is None:
            raise ValueError("match needs header: the header whose value it matches")
        criteria = (self.sender_domains, self.recipient_domains, self.transports, self.header)
        if all(c is None for c in criteria):
            raise ValueError(
                "a rule needs at least one of sender_domains, recipient_domains, transports, "
                "header (a rule matching every message would make every message prioritized, "
                "which is the same as no rules)"
            )
        return self


class SinkSettings(_Strict):
    """`postflow sink`: a capture SMTP server, started by `postflow up` when configured."""

    listen: Listen = "127.0.0.1:2526"
    path: str = "var/sink"


class WorkerSettings(_Strict):
    identity: str | None = None
    max_concurrent_activities: int = Field(200, gt=0)
    max_concurrent_workflow_tasks: int = Field(50, gt=0)
    max_cached_workflows: int = Field(2000, ge=0)
    priority_slots: int = Field(20, gt=0)
    # Temporal's workflow sandbox re-imports the workflow module for every message and
    # costs about 20 ms of worker CPU each (bench/throughput.py: 35 -> 15 ms/message).
    # Tests and the replay test run with it, which is where its checks pay off.
    workflow_sandbox: bool = False


class DeliverySettings(_Strict):
    soft_bounce: bool = False


class DsnSettings(_Strict):
    """Delivery status notifications (RFC 3464) that Postflow sends to senders."""

    # RET=FULL returns the whole message only up to this size, else its headers
    # (Postfix's bounce_size_limit).
    return_size_limit: int = Field(50_000, ge=0)


class Config(_Strict):
    temporal: TemporalSettings = TemporalSettings()
    ingest: IngestSettings = IngestSettings()
    spool: SpoolSettings = SpoolSettings()
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    delivery: DeliverySettings = DeliverySettings()
    dsn: DsnSettings = DsnSettings()
    worker: WorkerSettings = WorkerSettings()
    transports: dict[str, TransportSettings] = {"default": TransportSettings()}
    routes: list[Route] = []
    sink: SinkSettings | None = None
    priority: list[PriorityRule] = []

    @model_validator(mode="after")
    def _references(self) -> Config:
        if "default" not in self.transports:
            raise ValueError("transports.default is required: it serves unrouted domains")
        for i, route in enumerate(self.routes):
            if route.transport not in self.transports:
                raise ValueError(
                    f"routes.{i}.transport: {route.transport!r}: no such transport "
                    f"(known: {', '.join(sorted(self.transports))})"
                )
        for i, rule in enumerate(self.priority):
            for name in rule.transports or []:
                if name not in self.transports:
                    raise ValueError(
                        f"priority.{i}.transports: {name!r}: no such transport "
                        f"(known: {', '.join(sorted(self.transports))})"
                    )
        return self

    def transport(self, name: str) -> TransportSettings:
        return self.transports[name]


def default_config_path() -> Path:
    return Path(os.environ.get("POSTFLOW_CONFIG", DEFAULT_CONFIG))


def _format(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key")
            continue
        if item["type"] == "missing":
            lines.append(f"{where}: required key is missing")
            continue
        value = item.get("input")
        shown = f"{value!r}: " if not isinstance(value, dict) else ""
        shown = shown.replace("'", '"') if isinstance(value, str) else shown
        lines.append(f"{where}: {shown}{message}" if where else message)
    return lines


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _format(exc)) from None


def load_config(path: str | Path | None = None) -> Config:
    """Reads the file; a missing default file means every setting takes its default."""
    explicit = path is not None or "POSTFLOW_CONFIG" in os.environ
    file = Path(path) if path is not None else default_config_path()
    if not file.exists():
        if explicit:
            raise ConfigError(str(file), ["file not found"])
        return Config()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file), [f"not valid TOML: {exc}"]) from None
    return parse_config(data, str(file))
