"""Burn repaired shapes into label arrays.

Pixel convention: coordinates are continuous image coordinates, (0, 0) the top-left corner of
pixel (row 0, column 0); a pixel is set iff its centre is inside the polygon, with GDAL's tie-break
(a centre on a left or bottom edge is out, on a right or top edge is in), so polygons that share an
edge partition its pixels exactly. This is ``rasterio.features.rasterize`` with the identity
transform, ``all_touched=False`` and ``MergeAlg.replace``; holes stay holes. Shapes are painted in
the order given, later wins. Binary (mask) shapes are painted in the same order.

The fast path is :mod:`polyburn.kernel` (a numba scanline proven identical to rasterio on the
conformance suite and on thousands of randomized, tie-heavy polygons; 5-10x faster than
rasterio on full images); rasterio is the reference, and the fallback for coordinates the kernel
does not reproduce GDAL on (``kernel.needs_reference``). ``POLYBURN_ENGINE=rasterio`` forces it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import shapely

from polyburn import settings as config
from polyburn.encode import row_buffer, scanline_mask
from polyburn.model import Shape

DrawOrder = Literal["file", "area"]

ENGINES = ("kernel", "rasterio")


def order_shapes(shapes: Sequence[Shape], order: DrawOrder = "file") -> list[Shape]:
    """Shapes in draw order: ``file`` keeps annotation order; ``area`` draws larger areas first
    (so small objects stay visible on top), ties in file order."""
    if order == "file":
        return list(shapes)
    if order == "area":
        return sorted(shapes, key=lambda s: -s.area)
    raise ValueError(f"draw order must be 'file' or 'area', not {order!r}")


def check_values_fit(values: Sequence[int], dtype: np.dtype, what: str) -> None:
    """Raise ValueError when an id does not fit ``dtype``; never wrap or saturate."""
    info = np.iinfo(dtype)
    for value in values:
        if not info.min <= value <= info.max:
            raise ValueError(f"{what} {value} does not fit {np.dtype(dtype).name}")


def burn(
    shapes: Sequence[Shape],
    values: Sequence[int],
    height: int,
    width: int,
    dtype: np.dtype | type = np.uint8,
    engine: str | None = None,
) -> np.ndarray:
    """Paint ``shapes`` with ``values`` (same length) onto a zero (height, width) array.

    Raises ValueError when a value does not fit ``dtype``.
    """
    if len(shapes) != len(values):
        raise ValueError("shapes and values differ in length")
    dtype = np.dtype(dtype)
    check_values_fit(values, dtype, "burn value")
    out = scanline_mask(height, width, dtype)  # uint8: ready to be a PNG's rows, no copy
    run: list[tuple[shapely.Geometry, int]] = []
    for shape, value in zip(shapes, values, strict=True):
        if shape.geometry is not None:
            run.append((shape.geometry, value))
            continue
        if run:
            burn_geometries(out, run, engine)
            run = []
        out[shape.mask] = value
    if run:
        burn_geometries(out, run, engine)
    return out


def burn_geometries(
    out: np.ndarray, pairs: Sequence[tuple[shapely.Geometry, int]], engine: str | None = None
) -> np.ndarray:
    """Paint (geometry, value) pairs into ``out`` in order; one call for all of them."""
    engine = engine or config.settings().engine
    if engine == "kernel":
        from polyburn import kernel as _kernel

        geometries = np.empty(len(pairs), dtype=object)
        geometries[:] = [geometry for geometry, _ in pairs]
        polygons, index = shapely.get_parts(geometries, return_index=True)
        values = np.fromiter((value for _, value in pairs), dtype=np.int64, count=len(pairs))
        coords, ring_offsets, polygon_ring_offsets = _kernel.polygons_to_arrays(polygons)
        if not _kernel.needs_reference(coords):
            canvas, offset = _contiguous_canvas(out)
            _kernel.burn_polygons(
                canvas, coords, ring_offsets, polygon_ring_offsets, values[index], offset
            )
            if offset == 0 and canvas is not out:  # burned a copy: put it back
                out[...] = canvas
            return out
    if out.flags.c_contiguous:
        return _rasterize(out, pairs)
    out[...] = _rasterize(np.ascontiguousarray(out), pairs)
    return out


def _contiguous_canvas(out: np.ndarray) -> tuple[np.ndarray, int]:
    """(C-contiguous array, column offset k) whose columns from k on are ``out``: out itself
    (k = 0), the row buffer ``out`` is a view of (:func:`~polyburn.encode.scanline_mask`, k >
    0), or else a copy of ``out`` (k = 0, not ``out``: the caller writes it back)."""
    if out.flags.c_contiguous:
        return out, 0
    return row_buffer(out) or (np.ascontiguousarray(out), 0)


def _rasterize(out: np.ndarray, pairs: Sequence[tuple[shapely.Geometry, int]]) -> np.ndarray:
    """rasterio's burn (the reference), imported on first use: burn workers on the kernel's
    path never load rasterio (and the boto3 it imports)."""
    from affine import Affine
    from rasterio import features
    from rasterio.enums import MergeAlg
    from rasterio.errors import NotGeoreferencedWarning

    # Pixel space is meant: the identity transform is not a forgotten georeference.
    warnings.filterwarnings(
        "ignore", category=NotGeoreferencedWarning, module=r"rasterio\.features"
    )
    return features.rasterize(
        pairs,
        out=out,
        transform=Affine.identity(),
        all_touched=False,
        merge_alg=MergeAlg.replace,
    )
