"""An item's recipe digest: everything its outputs depend on, so a run can tell from the item's
record alone whether burning it again would change anything.

The digest of an item is a sha256 over:

* the run's part (:func:`run_recipe`): polyburn's code version (a hash of its source files,
  :func:`code_version`), the options that change output bytes (every
  :class:`~polyburn.params.MaskOptions` field but ``verify``) and the semantic masks' dtype
  (it follows the label map's largest id);
* the item's part (:func:`item_recipe`): its revision as the source lists it
  (:attr:`~polyburn.model.ItemRef.revision`) and, for each label the item itself uses, its id,
  its colour and its class index (its position in label-map order).

A label added to the map for other items changes none of these, so items without it keep
their digest and are not burned again; a label whose id or colour changes re-burns exactly the
items that carry it. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

RECIPE_VERSION = 1
"""Bumped when what goes into the digest changes (every item is then burned once more)."""


@cache
def code_version() -> str:
    """A hash of polyburn's own code (``polyburn/`` and ``tasks/`` sources): a change of code
    changes every item's recipe. 16 hex digits."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for folder in ("polyburn", "tasks"):
        for file in sorted((root / folder).rglob("*.py")):
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def run_recipe(options: Mapping[str, Any], semantic_dtype: str, code: str | None = None) -> str:
    """The part of every item's digest that the run sets: ``options`` (a
    :class:`~polyburn.params.MaskOptions` dumped to JSON; ``verify`` is left out: it changes
    what is compared, not what is written), the semantic dtype's name and the code version."""
    lasting = {k: v for k, v in options.items() if k != "verify"}
    payload = [RECIPE_VERSION, code or code_version(), semantic_dtype, lasting]
    return _sha256(payload)


def item_recipe(
    run: str,
    revision: str | None,
    labels: Iterable[str],
    label_map: Mapping[str, int],
    colours: Mapping[str, Any] | None,
) -> str | None:
    """The digest of one item (module docstring): ``run`` from :func:`run_recipe`, the item's
    listed ``revision`` and the ``labels`` it uses. None when it cannot be known (no revision,
    or a label missing from the map): such an item is always burned."""
    used = sorted(set(labels))
    if not revision or any(label not in label_map for label in used):
        return None
    ranks = {label: k for k, label in enumerate(sorted(label_map, key=label_map.__getitem__))}
    colour_of = colours or {}
    per_label = [
        [label, label_map[label], list(colour_of.get(label) or ()), ranks[label]] for label in used
    ]
    return _sha256([run, revision, per_label])


def _sha256(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
