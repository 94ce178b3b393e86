"""Label maps, safe destination keys and encoders."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from polyburn.encode import FORMATS, decode_mask, encode_mask, row_buffer, scanline_mask
from polyburn.errors import ConfigError, ItemError
from polyburn.keys import item_path_from_filename, safe_relpath, safe_segment
from polyburn.labels import (
    dump_label_map,
    extend_label_map,
    load_label_map,
    palette,
    semantic_dtype,
    validate_label_map,
    voc_colour,
)


def test_default_ids_are_sorted_and_one_based_like_dataloop():
    assert extend_label_map({}, ["road", "car", "car.sedan"]) == {
        "car": 1,
        "car.sedan": 2,
        "road": 3,
    }


def test_existing_ids_never_change_and_new_labels_are_appended():
    assert extend_label_map({"road": 1, "car": 2}, ["bike", "car", "road", "area"]) == {
        "road": 1,
        "car": 2,
        "area": 3,
        "bike": 4,
    }
    assert extend_label_map({"a": 254, "void": 255}, ["b"])["b"] == 256


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1], "JSON object"),
        ({"a": "1"}, "integer"),
        ({"a": True}, "integer"),
        ({"a": 70000}, "outside"),
        ({"": 1}, "non-empty"),
        ({"a": -1}, "outside"),
    ],
)
def test_bad_label_maps_name_the_entry(data, message):
    with pytest.raises(ConfigError, match=message):
        validate_label_map(data, "labels.json")


def test_label_map_file_round_trip(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(dump_label_map({"void": 255, "car": 1}))
    assert load_label_map(path) == {"car": 1, "void": 255}
    assert list(json.loads(path.read_text())) == ["car", "void"]
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="bad.json: invalid JSON"):
        load_label_map(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_label_map(tmp_path / "missing.json")


def test_semantic_dtype_grows_only_when_needed():
    assert semantic_dtype({"a": 1, "ignore": 255}) == np.uint8
    assert semantic_dtype({"a": 256}) == np.uint16


def test_palette_uses_voc_colours_and_ontology_colours():
    flat = palette({"car": 1, "road": 2}, {"road": (1, 2, 3)})
    assert len(flat) == 768
    assert tuple(flat[3:6]) == voc_colour(1) == (128, 0, 0)
    assert tuple(flat[6:9]) == (1, 2, 3)
    assert tuple(flat[0:3]) == (0, 0, 0)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a/b", "a/b"),
        ("/a//b/", "a/b"),
        ("../../etc/passwd", "%2E%2E/%2E%2E/etc/passwd"),
        ("a\\..\\b", "a/%2E%2E/b"),
        ("x\n\x00y", "x%0A%00y"),
        ("50%/ü", "50%25/ü"),
    ],
)
def test_keys_never_escape_the_prefix(path, expected):
    assert safe_relpath(path) == expected


def test_empty_path_is_an_item_error_and_long_segments_are_shortened():
    with pytest.raises(ItemError):
        safe_relpath("/./")
    long = safe_segment("é" * 300)
    assert len(long.encode()) <= 200 and long != safe_segment("é" * 301)
    assert safe_segment("a/b") == "a%2Fb" and safe_segment("..") == "%2E%2E"
    assert safe_segment("bad\udc80name") == "bad%DC80name"  # a lone surrogate (broken UTF-8)


def test_item_path_from_filename():
    assert item_path_from_filename("/dir/img_001.jpg") == "dir/img_001"
    assert item_path_from_filename("/a.b/c") == "a.b/c"
    assert item_path_from_filename("x.tar.gz") == "x.tar"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_encoders_round_trip(fmt, dtype):
    rng = np.random.default_rng(1)
    mask = rng.integers(0, np.iinfo(dtype).max, (17, 23), endpoint=True).astype(dtype)
    data = encode_mask(mask, fmt, palette({"a": 1}) if dtype == np.uint8 else None)
    back = decode_mask(data, fmt)
    assert back.dtype == dtype and (back == mask).all()
    assert encode_mask(mask, fmt) == encode_mask(mask, fmt)  # deterministic bytes


def test_semantic_png_is_palette_mode_and_instance_png_is_16_bit():
    mask8 = np.array([[0, 1], [2, 255]], np.uint8)
    with Image.open(io.BytesIO(encode_mask(mask8, "png", palette({"a": 1})))) as image:
        assert image.mode == "P" and image.getpalette()[3:6] == [128, 0, 0]
    with Image.open(io.BytesIO(encode_mask(mask8.astype(np.uint16) * 300, "png"))) as image:
        assert image.mode == "I;16"


def test_encoder_refuses_other_dtypes():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_mask(np.zeros((2, 2), np.int32), "png")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mask_burned_in_its_png_rows_encodes_as_a_plain_array(fmt):
    """A uint8 mask of scanline_mask lives beside its PNG filter bytes and is encoded without a
    copy; the bytes are the same as for the same ids in a plain array, in every format. A
    buffer whose prefix byte is not zero (written by hand) falls back to the copy."""
    rng = np.random.default_rng(1)
    mask = scanline_mask(37, 53, np.uint8)
    mask[...] = rng.integers(0, 4, (37, 53))
    buffer, offset = row_buffer(mask)
    assert offset == 1 and buffer.shape == (37, 54) and not buffer[:, 0].any()
    palette = [k % 256 for k in range(768)]
    plain = np.ascontiguousarray(mask)
    assert encode_mask(mask, fmt, palette) == encode_mask(plain, fmt, palette)
    buffer[3, 0] = 9
    assert (decode_mask(encode_mask(mask, fmt, palette), fmt) == plain).all()
    assert row_buffer(plain) is None and row_buffer(mask[1:]) is None
    assert scanline_mask(5, 6, np.uint16).flags.c_contiguous  # only 1-byte masks get the prefix
