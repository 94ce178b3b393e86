"""polyburn: Dataloop polygon annotations to exact segmentation masks.

The package holds the Prefect-free core (parsing, geometry repair, burning, encoding, sources and
destinations). The Prefect tasks live in the top-level ``tasks`` package and the flows in ``flows``.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

UNKNOWN_VERSION = "0+unknown"
""":func:`version` of a polyburn run from a source tree that was never installed."""


@cache
def version() -> str:
    """The installed polyburn's version, read once from its package metadata.

    ``project.version`` in ``pyproject.toml`` is the one place the number is written; an install
    (``pip install -e .``, ``make``) copies it into the metadata. Without an install,
    ``UNKNOWN_VERSION``.
    """
    try:
        return _distribution_version("polyburn")
    except PackageNotFoundError:
        return UNKNOWN_VERSION


def __getattr__(name: str) -> str:
    """``polyburn.__version__``, computed on first use (no second copy of the number)."""
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
