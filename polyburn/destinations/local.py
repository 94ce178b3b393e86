"""A local folder destination with atomic writes (temp file in the same folder + rename)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from polyburn.destinations.base import FileDestination, OutputRecord, file_sha256


class LocalDestination(FileDestination):
    """Writes under ``root``; a crash never leaves a half-written file at a final name.

    Masks are renamed into place without ``fsync`` (safe against a killed process; a power loss
    may lose the newest masks, which the manifest then does not list). Text objects (label map,
    manifest) are fsynced before the rename.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"key {key!r} escapes the destination folder")
        return path

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

    @contextlib.contextmanager
    def _temp_for(self, path: Path) -> Iterator[tuple[BinaryIO, str]]:
        """A temp file beside ``path`` (named with this pid, for :meth:`recover`), renamed to
        ``path`` when the block ends without error and deleted otherwise."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=_TEMP_SUFFIX
        )
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle, tmp
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

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
        """Delete temp files of writers that are no longer running (a killed run's leftovers).

        Temp files carry the writer's pid; files of a live process on this host are kept.
        """
        if not self.root.is_dir():
            return
        for folder, _, names in os.walk(self.root):
            for name in names:
                if name.startswith(".") and name.endswith(_TEMP_SUFFIX):
                    pid = _writer_pid(name)
                    if pid is None or not _alive(pid):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(folder, name))

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
        folder = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        found = []
        for path in folder.rglob("*") if folder.is_dir() else ():
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and key.startswith(prefix) and not path.name.endswith(_TEMP_SUFFIX):
                found.append(key)
        return sorted(found)

    def remove(self, keys: Sequence[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()


_TEMP_SUFFIX = ".part"


def _writer_pid(name: str) -> int | None:
    parts = name.split(".")
    for part in parts[2:]:
        if part.isdigit():
            return int(part)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_content(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    except FileNotFoundError:
        return False
