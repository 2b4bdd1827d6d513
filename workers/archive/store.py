"""Where the archive's segments live: a local directory, or any S3-compatible object store.

``REFSTREAM_ARCHIVE_URL`` picks one: ``file://path`` (or a plain path; the default is
``file://.refstream-archive``) or ``s3://bucket/prefix`` (through obstore, the Python
binding of Rust's object_store crate: small, async-native, no botocore;
``REFSTREAM_ARCHIVE_S3_ENDPOINT`` for MinIO, R2, Ceph or an emulator, credentials from the
usual ``AWS_*`` variables).

A ``put`` returns only once the segment is durable: locally a temporary file written,
fsynced, renamed into place, and the directory fsynced; on S3 the PUT completed. Readers
never see part of a segment: a crash leaves at most a ``.tmp-*`` file, which ``list``
skips and a later write to the same directory removes once it is ten minutes old.

``lock(name)`` is held by an archiver from its last look at its claims to its upload's
landing (``workers/archive/archiver.py``), so that no other archiver of the partition
looks at the archive or writes in between. Locally it is an exclusive ``flock`` on
``.locks/<name>.lock`` under the root: a stopped archiver keeps it until it goes on or
dies (the kernel lets go of a dead process's locks), however long its claims idle
meanwhile. On S3 it is no lock at all (the store has none an archiver could be fenced
with): there an archiver stopped in its upload for longer than ``claim_idle_ms``, while
another takes its entries over and writes them, can leave a second line of them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlparse

from ingest.contract.errors import Outage
from ingest.contract.settings import Settings

TMP = ".tmp-"
STALE_S = 600
LOCKS = ".locks"  # under a local store's root, beside the prefixes: never listed
LOCK_POLL_S = 0.02


class ArchiveUnavailable(Outage):
    """The object store (or the disk) refused or failed an operation: an outage, waited out."""


class ArchiveLocked(ArchiveUnavailable):
    """Another archiver held the partition's lock for as long as this one would wait: it is
    writing (or stopped while writing); the segment is held and tried again."""


class Store(Protocol):
    url: str

    def lock(self, name: str, wait_s: float) -> AbstractAsyncContextManager[None]: ...

    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def head(self, key: str, n: int) -> bytes: ...

    async def list(self, prefix: str) -> list[str]: ...


class LocalStore:
    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.url = f"file://{root}"

    @contextlib.asynccontextmanager
    async def lock(self, name: str, wait_s: float) -> AsyncIterator[None]:
        """``name``'s exclusive lock (any archiver's, on any host that shares the disk and
        its locks), waited for up to ``wait_s``, then ``ArchiveLocked``."""
        path = self.root / LOCKS / f"{quote(name, safe='')}.lock"
        try:
            fd = await asyncio.to_thread(_open_lock, path)
        except OSError as exc:
            raise ArchiveUnavailable(f"{self.url}: {exc}") from exc
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ArchiveLocked(f"{self.url}: {name} is locked by another archiver") from None
                    await asyncio.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(fd)  # lets go of the lock

    async def put(self, key: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._put, key, data)
        except OSError as exc:
            raise ArchiveUnavailable(f"{self.url}: {exc}") from exc

    def _put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TMP}{secrets.token_hex(6)}-{path.name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
        _sweep(path.parent, path.stat().st_mtime)

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread((self.root / key).read_bytes)
        except OSError as exc:
            raise ArchiveUnavailable(f"{self.url}: {exc}") from exc

    async def head(self, key: str, n: int) -> bytes:
        """The first ``n`` bytes (fewer when the segment is shorter)."""

        def read() -> bytes:
            with open(self.root / key, "rb") as f:
                return f.read(n)

        try:
            return await asyncio.to_thread(read)
        except OSError as exc:
            raise ArchiveUnavailable(f"{self.url}: {exc}") from exc

    async def list(self, prefix: str) -> list[str]:
        try:
            return await asyncio.to_thread(self._list, prefix)
        except OSError as exc:
            raise ArchiveUnavailable(f"{self.url}: {exc}") from exc

    def _list(self, prefix: str) -> builtins.list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != LOCKS]
            for f in files:
                if not f.startswith(TMP):
                    out.append(str(Path(dirpath, f).relative_to(self.root)))
        return sorted(out)


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _sweep(directory: Path, now: float) -> None:
    """Remove what a crashed write left behind: temporary files older than ``STALE_S`` (a
    younger one may be another archiver's write in progress). ``now`` is the disk's clock
    (the mtime of the segment just written), as the leftovers' mtimes are: never this
    process's, which may be off (docs/guarantees.md: one clock decides)."""
    for leftover in directory.glob(f"{TMP}*"):
        try:
            if now - leftover.stat().st_mtime > STALE_S:
                leftover.unlink()
        except FileNotFoundError:
            pass


class ObjectStore:
    """An S3-compatible bucket (and optional key prefix) through obstore."""

    def __init__(self, url: str, *, endpoint: str | None, region: str) -> None:
        from obstore.store import S3Store

        self.url = url
        config: dict[str, object] = {"region": region}
        if endpoint:
            config["endpoint"] = endpoint
        client = {
            "timeout": timedelta(seconds=30),
            "connect_timeout": timedelta(seconds=5),
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
        }
        # a few quick retries inside obstore; a longer outage is the archiver's to wait out
        retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}
        self._store = S3Store.from_url(url, config=config, client_options=client, retry_config=retry)  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def lock(self, name: str, wait_s: float) -> AsyncIterator[None]:
        """No lock: S3 has none (the module's docstring says what that leaves)."""
        yield

    async def put(self, key: str, data: bytes) -> None:
        import obstore

        try:
            await obstore.put_async(self._store, key, data)
        except Exception as exc:
            raise ArchiveUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def get(self, key: str) -> bytes:
        import obstore

        try:
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())
        except Exception as exc:
            raise ArchiveUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def head(self, key: str, n: int) -> bytes:
        import obstore

        try:
            meta = await obstore.head_async(self._store, key)
            return bytes(await obstore.get_range_async(self._store, key, start=0, end=min(n, int(meta["size"]))))
        except Exception as exc:
            raise ArchiveUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def list(self, prefix: str) -> list[str]:
        import obstore

        out: list[str] = []
        try:
            async for chunk in obstore.list(self._store, prefix, chunk_size=1000):
                out.extend(str(meta["path"]) for meta in chunk)
        except Exception as exc:
            raise ArchiveUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        return sorted(out)


def open_store(settings: Settings) -> Store:
    """The store ``REFSTREAM_ARCHIVE_URL`` names."""
    url = settings.archive_url
    scheme = urlparse(url).scheme
    if scheme == "s3":
        return ObjectStore(url, endpoint=settings.archive_s3_endpoint, region=settings.archive_s3_region)
    if scheme in ("", "file"):
        return LocalStore(url.removeprefix("file://"))
    raise ValueError(f"REFSTREAM_ARCHIVE_URL: file://path, a path or s3://bucket/prefix, not {url!r}")
