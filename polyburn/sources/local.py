"""A folder in Dataloop's JSON export layout (``json/<dir>/<name>.json``) or a folder of item
JSON files. Item paths are the file paths relative to the ``json`` folder (or to the given
folder), without the ``.json`` extension; they are what the outputs mirror."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np

from polyburn.dataloop_json import decode_json, parse_item
from polyburn.errors import ConfigError, ItemError
from polyburn.model import Item, ItemRef


class LocalSource:
    def __init__(self, root: str | os.PathLike, updated_since: datetime | None = None) -> None:
        path = Path(root)
        self.updated_since = updated_since.timestamp() if updated_since else None
        if not path.is_dir():
            raise ConfigError(f"source folder {root} does not exist or is not a folder")
        self.root = path / "json" if (path / "json").is_dir() else path
        self.uri = str(path)

    def list_items(self) -> Iterator[ItemRef]:
        files = []
        for folder, dirs, names in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files.extend(
                Path(folder, n) for n in names if n.endswith(".json") and not n.startswith(".")
            )
        for file in sorted(files):
            ref = self._ref(file)
            if ref is not None:
                yield ref

    def find(self, paths: Iterable[str]) -> list[ItemRef]:
        """The items at these item paths (as :meth:`list_items` names them), sorted, without
        walking the export: paths with no file, or outside the export, are left out."""
        refs = []
        for path in sorted(set(paths)):
            file = self.root / f"{path}.json"
            if (
                path
                and not any(part.startswith(".") for part in Path(path).parts)
                and file.resolve().is_relative_to(self.root.resolve())
            ):
                ref = self._ref(file)
                if ref is not None:
                    refs.append(ref)
        return refs

    def _ref(self, file: Path) -> ItemRef | None:
        try:
            stat = file.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if self.updated_since is not None and stat.st_mtime <= self.updated_since:
            return None
        rel = file.relative_to(self.root).as_posix()[: -len(".json")]
        revision = f"{stat.st_size}-{stat.st_mtime_ns}"
        return ItemRef(item_id="", path=rel, locator=str(file), revision=revision)

    def load(self, ref: ItemRef, max_pixels: int) -> Item:
        try:
            raw = Path(ref.locator).read_bytes()
        except OSError as exc:
            raise ItemError(ref.path, f"cannot read {ref.locator}: {exc.strerror}") from None
        data = decode_json(raw, ref.path)
        return parse_item(
            data, ref.path, revision=hashlib.sha256(raw).hexdigest(), max_pixels=max_pixels
        )

    def labels(self) -> None:
        return None

    def image(self, ref: ItemRef) -> np.ndarray | None:
        """The item's image as (H, W, 3) uint8 when the export has it beside the JSON
        (``items/<path>.<ext>``, Dataloop's download layout), else None."""
        items = self.root.parent / "items" if self.root.name == "json" else None
        if items is None or not items.is_dir():
            return None
        from PIL import Image  # previews only: burn workers never need it

        for candidate in sorted(items.glob(f"{glob.escape(ref.path)}.*")):
            with Image.open(candidate) as image:
                return np.asarray(image.convert("RGB"))
        return None
