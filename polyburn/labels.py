"""Label maps: which id each label burns as.

A label map is a JSON object ``{"label": id, ...}`` with integer ids in ``0..65535``; 0 is the
background, and a label may map to an ignore id such as 255. Without a user map, ids come from the
sorted set of labels, 1-based, as Dataloop's ``instance_map`` numbers them. A map already written
at the destination is reused and only extended (new labels get the next free ids), so the ids of a
destination never change between runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from polyburn.errors import ConfigError

MAX_ID = 65535


def validate_label_map(data: Any, origin: str = "label map") -> dict[str, int]:
    """Check a decoded label map; raises ConfigError naming the offending entry."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin}: must be a JSON object {{label: id}}, not {type(data).__name__}"
        )
    checked: dict[str, int] = {}
    for label, value in data.items():
        if not isinstance(label, str) or not label:
            raise ConfigError(f"{origin}: labels must be non-empty strings, got {label!r}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{origin}: id of {label!r} must be an integer, not {value!r}")
        if not 0 <= value <= MAX_ID:
            raise ConfigError(f"{origin}: id of {label!r} is {value}, outside 0..{MAX_ID}")
        checked[label] = value
    return checked


def load_label_map(path: str | Path) -> dict[str, int]:
    """Read a label map file; raises ConfigError with the file name on any problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read label map {path}: {exc.strerror}") from None
    return parse_label_map(text, str(path))


def parse_label_map(text: str, origin: str) -> dict[str, int]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{origin}: invalid JSON: {exc.msg} at line {exc.lineno}") from None
    return validate_label_map(data, origin)


def extend_label_map(existing: Mapping[str, int], labels: Iterable[str]) -> dict[str, int]:
    """Keep every existing id; give each new label (sorted) the next id after the largest one.

    The next id skips 255 when the map is still below it, so the conventional ignore id is never
    handed out implicitly.
    """
    result = dict(existing)
    next_id = max((v for v in result.values() if v != 255), default=0) + 1
    for label in sorted(set(labels) - set(result)):
        if next_id == 255:
            next_id += 1
        if next_id > MAX_ID:
            raise ConfigError(f"label map: more than {MAX_ID} labels")
        result[label] = next_id
        next_id += 1
    return result


def dump_label_map(label_map: Mapping[str, int]) -> str:
    """The label map as written beside the masks: sorted by id, then label."""
    ordered = dict(sorted(label_map.items(), key=lambda kv: (kv[1], kv[0])))
    return json.dumps(ordered, indent=2, ensure_ascii=False) + "\n"


def semantic_dtype(label_map: Mapping[str, int]) -> np.dtype:
    """uint8 when every id fits in 0..255, else uint16."""
    return np.dtype(np.uint8) if max(label_map.values(), default=0) <= 255 else np.dtype(np.uint16)


def palette(
    label_map: Mapping[str, int], colours: Mapping[str, tuple[int, int, int]] | None = None
) -> list[int]:
    """A 256-entry RGB palette (flat list of 768 ints) for palette-mode PNGs.

    Index i gets the PASCAL VOC colour of i, except where a label with id i has a colour in
    ``colours`` (e.g. from a Dataloop ontology). Index 0 stays black.
    """
    flat = list(_VOC_PALETTE)
    for label, i in label_map.items():
        if colours and label in colours and 0 < i < 256:
            flat[3 * i : 3 * i + 3] = [int(c) & 0xFF for c in colours[label]]
    return flat


def voc_colour(index: int) -> tuple[int, int, int]:
    """PASCAL VOC's bit-interleaved colour for a class index (255 gives (224, 224, 192))."""
    r = g = b = 0
    c = index
    for shift in range(7, -1, -1):
        r |= ((c >> 0) & 1) << shift
        g |= ((c >> 1) & 1) << shift
        b |= ((c >> 2) & 1) << shift
        c >>= 3
    return r, g, b


_VOC_PALETTE = tuple(c for i in range(256) for c in voc_colour(i))  # built once, not per mask
