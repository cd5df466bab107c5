"""The ingest's SMTP AUTH users: a file of salted scrypt hashes, one `user:hash` a line.

Written by `postflow passwd USER`; read by the ingest, which notices when it changes.
Passwords never leave this module, not even in error messages.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

__all__ = ["PasswordFile", "PasswordFileError", "hash_password", "valid_username", "verify"]

# scrypt with N=2^14, r=8, p=1: 16 MiB and about 50 ms per check, OWASP's minimum.
_N, _R, _P = 2**14, 8, 1
_SCHEME = "scrypt"
_USER = re.compile(r"^[^\s:\x00-\x1f\x7f]{1,256}$")


class PasswordFileError(Exception):
    """The users file cannot be read or has a malformed line; says which line."""


def valid_username(user: str) -> bool:
    return bool(_USER.match(user))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """`scrypt$16384$8$1$<salt>$<key>`, with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"{_SCHEME}${_N}${_R}${_P}${_b64(salt)}${_b64(key)}"


def verify(password: bytes, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, key = encoded.split("$")
        if scheme != _SCHEME:
            return False
        want = base64.b64decode(key, validate=True)
        got = hashlib.scrypt(
            password,
            salt=base64.b64decode(salt, validate=True),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
            maxmem=64 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(got, want)


@functools.cache
def _dummy() -> str:
    """Unknown users are checked against this, so both answers take the same time."""
    return hash_password(secrets.token_urlsafe(16))


class PasswordFile:
    """`user:hash` lines; `check` reloads the file when its modification time changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._users: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None

    def load(self) -> dict[str, str]:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise PasswordFileError(f"{self.path}: {exc.strerror}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._users = self._parse(self.path.read_text(encoding="utf-8"))
            self._stamp = stamp
        return self._users

    def _parse(self, text: str) -> dict[str, str]:
        users: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            user, colon, encoded = line.partition(":")
            if not colon or not valid_username(user) or encoded.count("$") != 5:
                raise PasswordFileError(f"{self.path}:{number}: not 'user:scrypt$...'")
            users[user] = encoded
        return users

    def check(self, user: str, password: bytes) -> bool:
        """Slow on purpose (scrypt): call it from a thread."""
        encoded = self.load().get(user)
        ok = verify(password, encoded or _dummy())
        return ok and encoded is not None

    def set(self, user: str, password: str) -> None:
        self._write({**self._existing(), user: hash_password(password)})

    def remove(self, user: str) -> bool:
        users = self._existing()
        if users.pop(user, None) is None:
            return False
        self._write(users)
        return True

    def _existing(self) -> dict[str, str]:
        return self.load() if self.path.exists() else {}

    def _write(self, users: dict[str, str]) -> None:
        """Atomically, readable by its owner only: a reader never sees half a file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
        text = "".join(f"{u}:{h}\n" for u, h in sorted(users.items()))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._stamp = None
