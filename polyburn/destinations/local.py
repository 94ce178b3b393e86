"""A local folder destination with atomic writes (a temp file renamed into place)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from polyburn.destinations.base import (
    FileDestination,
    OutputRecord,
    StoredEntry,
    file_sha256,
)
from polyburn.processes import host_name, pid_alive

STAGING = ".polyburn/tmp"
"""Temp files are written in ``STAGING/<host>-<pid>/`` and renamed into place, so cleaning up
after killed writers lists this folder only, never the whole destination."""
_MUTEX = ".polyburn/cas.lock"


class LocalDestination(FileDestination):
    """Writes under ``root``; a crash never leaves a half-written file at a final name.

    Masks and item records are renamed into place without ``fsync`` (safe against a killed
    process; a power loss may lose the newest ones). Text objects (label map, manifest) are
    fsynced before the rename. Conditional writes (:meth:`create`, :meth:`replace`,
    :meth:`remove_if`) are atomic between processes of any host that share the folder through a
    filesystem with working ``link`` and ``flock`` (local disks, NFSv4).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.uri = str(self.root)
        # what every key's file name starts with (string checks: pathlib costs ~30 µs a key)
        self._prefix = os.path.join(self.uri, "")

    def _path(self, key: str) -> Path:
        """The file of ``key``; raises ValueError for a key that would leave the folder (``..``
        segments, an absolute path). Lexical: a symlink placed inside the folder is followed."""
        path = os.path.normpath(os.path.join(self.uri, key))
        if not path.startswith(self._prefix) or len(path) == len(self._prefix):
            raise ValueError(f"key {key!r} escapes the destination folder")
        return Path(path)

    def _key(self, path: str) -> str:
        """The key of a file under the folder (inverse of :meth:`_path`)."""
        key = path[len(self._prefix) :]
        return key if os.sep == "/" else key.replace(os.sep, "/")

    def put(self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]) -> bool:
        path = self._path(key)
        if _same_content(path, data):
            return False
        with self._temp_for(path) as (handle, _):
            handle.write(data)
            if not metadata:  # label map and manifest: make them durable
                handle.flush()
                os.fsync(handle.fileno())
        return True

    def put_new(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        """Write ``data`` at ``key`` without reading what is there first."""
        with self._temp_for(self._path(key)) as (handle, _):
            handle.write(data)

    def put_record(self, key: str, data: bytes) -> None:
        """Replace ``key`` by ``data`` atomically, without comparing first and without fsync."""
        with self._temp_for(self._path(key)) as (handle, _):
            handle.write(data)

    # ------------------------------------------------------------------ conditional writes
    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                return handle.read(), _tag(os.fstat(handle.fileno()))
        except FileNotFoundError:
            return None

    def create(self, key: str, data: bytes) -> str | None:
        """Store ``data`` at ``key`` only if nothing is there (``link`` of a complete temp
        file: atomic, and the file is never seen half-written)."""
        path = self._path(key)
        with self._temp_for(path, install=False) as (handle, tmp):
            handle.write(data)
            handle.flush()
            try:
                _link(tmp, path)
            except FileExistsError:
                return None
            return _tag(os.fstat(handle.fileno()))

    def replace(self, key: str, data: bytes, tag: str) -> str | None:
        path = self._path(key)
        with self._mutex():
            if _tag_of(path) != tag:
                return None
            with self._temp_for(path) as (handle, _):
                handle.write(data)
            return _tag_of(path)

    def remove_if(self, key: str, tag: str) -> bool:
        """Delete ``key`` if it still has ``tag``. The check and the delete are not one atomic
        step: only a lease's holder removes it, and another writer replaces a lease only once it
        is stale (its holder gone or past its expiry), so nothing else races this."""
        path = self._path(key)
        if _tag_of(path) != tag:
            return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True

    def entries(self, prefix: str) -> list[StoredEntry]:
        folder = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        found = []
        for top, dirs, names in os.walk(folder):
            dirs.sort()
            for name in names:
                path = os.path.join(top, name)
                key = self._key(path)
                if not key.startswith(prefix):
                    continue
                try:
                    stat = os.stat(path)
                except FileNotFoundError:  # removed since it was listed
                    continue
                found.append(StoredEntry(key, _tag(stat), stat.st_mtime, stat.st_size))
        return sorted(found)

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        """An exclusive ``flock`` on one file of the destination: released by the kernel when
        the holder dies, so a killed run never leaves it held."""
        path = self._path(_MUTEX)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _temp_for(self, path: Path, install: bool = True) -> Iterator[tuple[BinaryIO, str]]:
        """A temp file in this process's staging folder, renamed to ``path`` when the block ends
        without error (``install``) and deleted in every other case."""
        fd, tmp = self._mkstemp(path.name)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle, tmp
            if install:
                try:
                    os.replace(tmp, path)
                except FileNotFoundError:  # its folder does not exist yet
                    path.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, path)
                return
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

    def _mkstemp(self, name: str) -> tuple[int, str]:
        """A new temp file in this process's staging folder (created on first use)."""
        staging = self.root / STAGING / _writer_name()
        for attempt in (1, 2):
            try:
                return tempfile.mkstemp(dir=staging, prefix=f"{name[:80]}.", suffix=_TEMP_SUFFIX)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                staging.mkdir(parents=True, exist_ok=True)
        raise AssertionError("unreachable")

    def read_file(self, key: str, target: Path) -> bool:
        try:
            shutil.copyfile(self._path(key), target)
        except FileNotFoundError:
            return False
        return True

    def write_file(self, key: str, source: Path) -> OutputRecord:
        """Copy ``source`` to ``key`` atomically and durably (temp file, fsync, rename), unless
        the file there already has the same bytes."""
        path, digest, size = self._path(key), file_sha256(source), source.stat().st_size
        if path.is_file() and path.stat().st_size == size and file_sha256(path) == digest:
            return OutputRecord(key, digest, size, False)
        with self._temp_for(path) as (handle, _):
            with open(source, "rb") as original:
                shutil.copyfileobj(original, handle, 1 << 20)
            handle.flush()
            os.fsync(handle.fileno())
        return OutputRecord(key, digest, size, True)

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def recover(self) -> None:
        """Delete the staging folders of writers of this host that are no longer running (a
        killed run's temp files); costs one listing of the staging folder, whatever the size
        of the destination. Folders of other hosts are theirs to clean."""
        staging = self.root / STAGING
        if not staging.is_dir():
            return
        host = host_name()
        for folder in staging.iterdir():
            owner, _, pid = folder.name.rpartition("-")
            if owner == host and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)

    def missing(self, keys: Sequence[str]) -> set[str]:
        gone = set()
        for key in keys:
            try:
                if not self._path(key).is_file():
                    gone.add(key)
            except ValueError:  # not a key of ours (a hand-edited manifest): not our business
                continue
        return gone

    def keys(self, prefix: str) -> list[str]:
        """Keys of the files whose key starts with ``prefix``; temp files left out."""
        return [e.key for e in self.entries(prefix) if not e.key.endswith(_TEMP_SUFFIX)]

    def remove(self, keys: Sequence[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()


_TEMP_SUFFIX = ".part"


def _link(source: str, target: Path) -> None:
    """``os.link``, creating the target's folder when it does not exist yet."""
    try:
        os.link(source, target)
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)


def _writer_name() -> str:
    """``<host>-<pid>``: the staging folder of this process."""
    return f"{host_name()}-{os.getpid()}"


def _tag(stat: os.stat_result) -> str:
    """A version tag of a file: a rename or a rewrite gives another inode, size or mtime."""
    return f"{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}"


def _tag_of(path: Path) -> str | None:
    try:
        return _tag(path.stat())
    except FileNotFoundError:
        return None


def _same_content(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    except FileNotFoundError:
        return False
