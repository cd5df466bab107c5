"""The message store: bodies live here, workflows carry only the key. Never talks to Temporal."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FsSpool", "SpoolError", "new_queue_id"]

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


def new_queue_id() -> str:
    """Time-ordered and unique across hosts, like Postfix's long queue ids: `4Zk...`."""
    micros = time.time_ns() // 1000
    head = ""
    while micros:
        micros, digit = divmod(micros, len(_ALPHABET))
        head = _ALPHABET[digit] + head
    return head + secrets.token_hex(5).upper()


class SpoolError(OSError):
    """The spool could not store or read a body."""


class FsSpool:
    """A directory of `<key>.eml` files written atomically (temp file, fsync, rename).

    Works on a shared filesystem too: a key is unique across hosts and a file is only
    visible once complete.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise SpoolError(f"bad spool key {key!r}")
        return self.root / f"{key}.eml"

    def store(self, key: str, data: bytes) -> None:
        """Durable on return: the body and its directory entry are on disk."""
        final = self._path(key)
        tmp = self._tmp / f"{key}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise SpoolError(exc.errno, f"spool write failed: {exc.strerror}") from exc

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise SpoolError(f"spool entry {key!r} not found") from None

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def keys(self) -> Iterator[tuple[str, float]]:
        """Every stored key with its modification time, for the orphan sweep."""
        for entry in self.root.glob("*.eml"):
            try:
                yield entry.stem, entry.stat().st_mtime
            except FileNotFoundError:
                continue
