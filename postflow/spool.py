"""The message store: bodies live here, workflows carry only the key. Never talks to Temporal.

Two backends with one contract (`Spool`): `FsSpool`, a directory (shared filesystem for
several hosts), and `S3Spool`, a bucket on any S3-compatible store. `store` is durable
when it returns; `read` returns the whole body; `delete` says whether there was one;
`keys` lists what is stored, with modification times, for the orphan sweep. Every method
has an awaitable twin (`astore`, `aread`, `aexists`, `adelete`) for async callers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from postflow.config import SpoolSettings

__all__ = ["FsSpool", "S3Spool", "Spool", "SpoolError", "new_queue_id", "open_spool"]

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
_SUFFIX = ".eml"
T = TypeVar("T")


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


def _check_key(key: str) -> str:
    if not key or "/" in key or "\\" in key or key.startswith(".") or not key.isprintable():
        raise SpoolError(f"bad spool key {key!r}")
    return key


@runtime_checkable
class Spool(Protocol):
    """What every backend offers; the sync methods are safe to call from any thread."""

    def store(self, key: str, data: bytes) -> None: ...
    def read(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> bool: ...
    def keys(self) -> Iterator[tuple[str, float]]: ...
    def akeys(self) -> AsyncIterator[tuple[str, float]]: ...
    async def astore(self, key: str, data: bytes) -> None: ...
    async def aread(self, key: str) -> bytes: ...
    async def aexists(self, key: str) -> bool: ...
    async def adelete(self, key: str) -> bool: ...
    def close(self) -> None: ...


def open_spool(settings: SpoolSettings, environ: Mapping[str, str] | None = None) -> Spool:
    """The backend `[spool]` names; S3 credentials are read from the named variables now."""
    if settings.backend == "s3":
        return S3Spool(settings, environ=os.environ if environ is None else environ)
    return FsSpool(settings.path)


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

    def __repr__(self) -> str:
        return f"FsSpool({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / f"{_check_key(key)}{_SUFFIX}"

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
        for entry in self.root.glob(f"*{_SUFFIX}"):
            try:
                yield entry.stem, entry.stat().st_mtime
            except FileNotFoundError:
                continue

    # File I/O blocks: async callers get it on a thread so the event loop keeps serving.
    async def astore(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self.store, key, data)

    async def aread(self, key: str) -> bytes:
        return await asyncio.to_thread(self.read, key)

    async def aexists(self, key: str) -> bool:
        return await asyncio.to_thread(self.exists, key)

    async def adelete(self, key: str) -> bool:
        return await asyncio.to_thread(self.delete, key)

    async def akeys(self) -> AsyncIterator[tuple[str, float]]:
        for item in await asyncio.to_thread(list, self.keys()):
            yield item

    def close(self) -> None:
        """Nothing to release; here so both backends close alike."""


class S3Spool:
    """Objects `<prefix>/<key>.eml` in one bucket of an S3-compatible store (aiobotocore).

    The client lives on a private event loop in its own thread, so the sync methods work
    from any thread (callers using `asyncio.to_thread`) and the async ones from any loop,
    with one connection pool per process. A PUT is acknowledged only once the store has
    the whole object, and an object is never visible half-written.
    """

    # Objects per listing request; S3's maximum. Tests lower it to exercise paging.
    page_size = 1000

    def __init__(self, settings: SpoolSettings, *, environ: Mapping[str, str]) -> None:
        if not settings.bucket:
            raise SpoolError('spool.bucket: required when backend = "s3"')
        if importlib.util.find_spec("aiobotocore") is None:
            raise SpoolError('spool.backend = "s3" needs aiobotocore: pip install "postflow[s3]"')
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/")
        self.endpoint = settings.endpoint
        self._settings = settings
        self._credentials = _credentials(settings, environ)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._exit: contextlib.AsyncExitStack | None = None

    def __repr__(self) -> str:
        where = self.endpoint or f"aws:{self._settings.region}"
        return f"S3Spool({where}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _object(self, key: str) -> str:
        name = f"{_check_key(key)}{_SUFFIX}"
        return f"{self.prefix}/{name}" if self.prefix else name

    # -- the private loop --------------------------------------------------------------

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="postflow-s3-spool", daemon=True
                )
                thread.start()
                try:
                    asyncio.run_coroutine_threadsafe(self._open(), loop).result()
                except BaseException:
                    loop.call_soon_threadsafe(loop.stop)
                    raise
                self._loop, self._thread = loop, thread
            return self._loop

    async def _open(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        s = self._settings
        config = AioConfig(
            region_name=s.region,
            # Custom endpoints (MinIO, SeaweedFS, Ceph RGW) rarely have wildcard DNS for
            # virtual-hosted buckets; AWS itself picks the style per bucket.
            s3={"addressing_style": "path" if s.endpoint else "auto"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=s.max_connections,
        )
        self._exit = contextlib.AsyncExitStack()
        self._client = await self._exit.enter_async_context(
            get_session().create_client(
                "s3", endpoint_url=s.endpoint, config=config, **self._credentials
            )
        )

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._start())

    def _call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self._loop is not None and threading.current_thread() is self._thread:
            raise RuntimeError("S3Spool's sync methods cannot run on its own loop")
        return self._submit(make()).result()

    async def _await(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return await asyncio.wrap_future(self._submit(make()))

    def close(self) -> None:
        """Closes the connection pool and stops the private loop; idempotent."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        if self._exit is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._exit.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    # -- operations, run on the private loop ---------------------------------------------

    def _error(self, action: str, key: str, exc: Exception) -> SpoolError:
        # Names the bucket, object and the store's error code; never a credential.
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            detail = f"{error.get('Code', '?')} {error.get('Message', '')}".strip()
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return SpoolError(f"spool {action} s3://{self.bucket}/{self._object(key)}: {detail}")

    @staticmethod
    def _missing(exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(exc, ClientError):
            return False
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return error.get("Code") in ("NoSuchKey", "404", "NotFound") or status == 404

    async def _store(self, key: str, data: bytes) -> None:
        try:
            await self._client.put_object(
                Bucket=self.bucket, Key=self._object(key), Body=data, ContentType="message/rfc822"
            )
        except Exception as exc:
            raise self._error("write", key, exc) from exc

    async def _read(self, key: str) -> bytes:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=self._object(key))
            async with response["Body"] as body:
                return bytes(await body.read())
        except Exception as exc:
            if self._missing(exc):
                raise SpoolError(f"spool entry {key!r} not found") from None
            raise self._error("read", key, exc) from exc

    async def _exists(self, key: str) -> bool:
        try:
            await self._client.head_object(Bucket=self.bucket, Key=self._object(key))
        except Exception as exc:
            if self._missing(exc):
                return False
            raise self._error("check", key, exc) from exc
        return True

    async def _delete(self, key: str) -> bool:
        # S3 answers 204 whether or not the object existed: ask first, so the result
        # means the same as on a filesystem.
        existed = await self._exists(key)
        if existed:
            try:
                await self._client.delete_object(Bucket=self.bucket, Key=self._object(key))
            except Exception as exc:
                raise self._error("delete", key, exc) from exc
        return existed

    async def _list_page(self, token: str | None) -> tuple[list[tuple[str, float]], str | None]:
        start = f"{self.prefix}/" if self.prefix else ""
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": start, "MaxKeys": self.page_size}
        if not self.prefix:
            args["Delimiter"] = "/"
        if token:
            args["ContinuationToken"] = token
        try:
            page = await self._client.list_objects_v2(**args)
        except Exception as exc:
            raise self._error("list", "*", exc) from exc
        found = []
        for item in page.get("Contents", []):
            name = item["Key"][len(start) :]
            if "/" in name or not name.endswith(_SUFFIX):
                continue
            found.append((name[: -len(_SUFFIX)], item["LastModified"].timestamp()))
        more = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        return found, more

    # -- the contract ---------------------------------------------------------------------

    def store(self, key: str, data: bytes) -> None:
        """Durable on return: the store acknowledged the whole object."""
        self._object(key)
        self._call(lambda: self._store(key, data))

    def read(self, key: str) -> bytes:
        self._object(key)
        return self._call(lambda: self._read(key))

    def exists(self, key: str) -> bool:
        self._object(key)
        return self._call(lambda: self._exists(key))

    def delete(self, key: str) -> bool:
        self._object(key)
        return self._call(lambda: self._delete(key))

    def keys(self) -> Iterator[tuple[str, float]]:
        """Every stored key with its modification time, one listing page at a time."""
        token: str | None = None
        while True:
            found, token = self._call(lambda t=token: self._list_page(t))
            yield from found
            if not token:
                return

    async def akeys(self) -> AsyncIterator[tuple[str, float]]:
        token: str | None = None
        while True:
            found, token = await self._await(lambda t=token: self._list_page(t))
            for item in found:
                yield item
            if not token:
                return

    async def astore(self, key: str, data: bytes) -> None:
        self._object(key)
        await self._await(lambda: self._store(key, data))

    async def aread(self, key: str) -> bytes:
        self._object(key)
        return await self._await(lambda: self._read(key))

    async def aexists(self, key: str) -> bool:
        self._object(key)
        return await self._await(lambda: self._exists(key))

    async def adelete(self, key: str) -> bool:
        self._object(key)
        return await self._await(lambda: self._delete(key))


def _credentials(settings: SpoolSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """Keys from the variables `[spool]` names; none named means botocore's own chain
    (AWS_* variables, shared files, instance or pod identity)."""
    if settings.access_key_env is None and settings.secret_key_env is None:
        return {}
    found = {}
    for field, var, arg in (
        ("access_key_env", settings.access_key_env, "aws_access_key_id"),
        ("secret_key_env", settings.secret_key_env, "aws_secret_access_key"),
    ):
        value = environ.get(var or "")
        if not value:
            raise SpoolError(f'spool.{field}: environment variable "{var}" is not set')
        found[arg] = value
    return found
