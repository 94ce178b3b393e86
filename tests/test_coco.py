"""COCO instances and ML-subset splits (issue #12), with pycocotools as the oracle.

In-process tests on small items first; then the real CLI and flow on a copy of the example
export (a full run, then an ``--item`` run and ``polyburn dataset``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pydantic import ValidationError

from polyburn.cli import main
from polyburn.coco import instance_annotations
from polyburn.dataloop_json import parse_item
from polyburn.destinations.base import mask_files
from polyburn.encode import decode_mask
from polyburn.geometry import repair_item
from polyburn.masks import build_masks
from polyburn.params import RunParameters
from tests.support.oracle import EXAMPLES, load_export, rasterio_oracle, raw_rings

LABELS = {"building": 1, "car": 2, "tree": 3}
# pycocotools 2.0.11's decode passes copy=False to numpy 2 (its own code, harmless here)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def ring(*points):
    return [{"x": x, "y": y} for x, y in points]


def box(x0, y0, x1, y1):
    return ring((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def segment(aid, label, rings, object_id=None):
    annotation = {"id": aid, "type": "segment", "label": label, "coordinates": rings}
    if object_id is not None:
        annotation["metadata"] = {"system": {"objectId": object_id}}
    return annotation


def item_json(annotations, width=40, height=30, tags=None):
    system = {"width": width, "height": height}
    if tags is not None:
        system["tags"] = tags
    return {
        "id": "item-1",
        "filename": "/d/photo.jpg",
        "metadata": {"system": system},
        "annotations": annotations,
    }


def burn(data, modes=("instance", "coco"), instance_ids="object"):
    item = parse_item(data, "d/photo")
    shapes, _, problems = repair_item(item)
    assert not problems
    masks = build_masks(item, shapes, list(modes), LABELS, np.dtype(np.uint8), "file", instance_ids)
    return item, masks


def decode(segmentation):
    rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return coco_mask.decode(rle).astype(bool)


DONUT = segment("donut", "building", [box(2, 2, 18, 16), box(6, 5, 12, 11)], "1")
PART_A = segment("car-front", "car", [box(22, 3, 27, 9)], 2)
PART_B = segment("car-back", "car", [box(31, 3, 38, 9)], 2)  # a pole in between: one car
OVER = segment("tree", "tree", [box(14, 12, 26, 24)], "5")  # drawn over the donut's corner
NO_ID = segment("bush", "tree", [box(30, 20, 36, 27)])


# ------------------------------------------------------------------------------ fragments
def test_every_annotation_decodes_to_exactly_its_objects_pixels():
    item, m = burn(item_json([DONUT, PART_A, PART_B, OVER, NO_ID]))
    fragment = m.coco
    assert fragment["image"] == {
        "path": "d/photo",
        "file_name": "d/photo.jpg",
        "width": 40,
        "height": 30,
        "dataloop_id": "item-1",
    }
    ids = sorted(int(v) for v in np.unique(m.instance) if v)
    assert [a["instance_id"] for a in fragment["annotations"]] == ids == [1, 2, 5, 6]
    for annotation in fragment["annotations"]:
        pixels = m.instance == annotation["instance_id"]
        assert annotation["segmentation"]["size"] == [30, 40]
        assert np.array_equal(decode(annotation["segmentation"]), pixels)
        assert annotation["area"] == pixels.sum()
        rows, cols = np.nonzero(pixels)
        x, y = cols.min(), rows.min()
        assert annotation["bbox"] == [x, y, cols.max() + 1 - x, rows.max() + 1 - y]
        rle = {"size": [30, 40], "counts": annotation["segmentation"]["counts"].encode()}
        assert coco_mask.toBbox(rle).tolist() == annotation["bbox"]
        assert coco_mask.area(rle) == annotation["area"]
        assert annotation["iscrowd"] == 0
    by_id = {a["instance_id"]: a for a in fragment["annotations"]}
    assert (by_id[1]["category_id"], by_id[2]["category_id"], by_id[5]["category_id"]) == (1, 2, 3)
    assert by_id[6]["object_id"] is None and by_id[6]["label"] == "tree"


def test_a_donut_keeps_its_hole_and_a_two_part_object_is_one_annotation():
    _, m = burn(item_json([DONUT, PART_A, PART_B]))
    donut, car = m.coco["annotations"]
    decoded = decode(donut["segmentation"])
    outer = rasterio_oracle(raw_rings(DONUT)[:1], 30, 40)
    hole = rasterio_oracle(raw_rings(DONUT)[1:], 30, 40)
    assert hole.sum() == 36 and not (decoded & hole).any()
    assert np.array_equal(decoded, outer & ~hole) and donut["area"] == 16 * 14 - 36
    front = rasterio_oracle(raw_rings(PART_A), 30, 40)
    back = rasterio_oracle(raw_rings(PART_B), 30, 40)
    assert car["object_id"] == 2 and car["area"] == front.sum() + back.sum() == 30 + 42
    assert np.array_equal(decode(car["segmentation"]), front | back)
    assert car["bbox"] == [22, 3, 16, 6]


def test_an_object_drawn_over_entirely_has_no_annotation_but_stays_in_the_table():
    hidden = segment("small", "car", [box(4, 4, 8, 8)], 9)
    cover = segment("big", "building", [box(0, 0, 20, 20)], 3)
    _, m = burn(item_json([hidden, cover]))
    assert [row["id"] for row in m.instance_table] == [3, 9]
    assert [a["instance_id"] for a in m.coco["annotations"]] == [3]


def test_bad_object_ids_give_separate_annotations_never_a_merge_across_labels():
    annotations = [
        segment("c1", "car", [box(0, 0, 5, 5)], 3),
        segment("r1", "building", [box(6, 0, 11, 5)], "3"),  # objectId 3 used by two labels
        segment("c2", "car", [box(12, 0, 17, 5)], 3),  # the car's other part
        segment("x", "tree", [box(18, 0, 23, 5)], "abc"),
        segment("z", "tree", [box(24, 0, 29, 5)], 0),
        segment("n", "tree", [box(30, 0, 35, 5)], -2),
        segment("h", "tree", [box(0, 10, 5, 15)], 10**12),
    ]
    _, m = burn(item_json(annotations))
    assert (
        sorted(r.kind for r in m.repairs) == ["object_id_conflict"] * 3 + ["object_id_unusable"] * 4
    )
    coco = m.coco["annotations"]
    assert len(coco) == len(m.instance_table) == 6
    for annotation in coco:
        assert np.array_equal(
            decode(annotation["segmentation"]), m.instance == annotation["instance_id"]
        )
    car = next(a for a in coco if a["label"] == "car")
    assert car["object_id"] == 3 and car["area"] == 50 and car["category_id"] == 2
    building = next(a for a in coco if a["label"] == "building")
    assert building["object_id"] == 3 and building["instance_id"] != car["instance_id"]


def test_coco_alone_burns_the_instance_mask_without_writing_it():
    item, m = burn(item_json([DONUT, PART_A]), modes=["semantic", "coco"])
    assert m.instance is None and m.instance_table == [] and m.semantic is not None
    keys = [key for key, _, _ in mask_files(item, m, "png", None)]
    assert keys == ["semantic/d/photo.png", "coco/items/d/photo.json"]
    _, with_instance = burn(item_json([DONUT, PART_A]))
    assert m.coco == with_instance.coco


def test_shape_numbering_gives_one_annotation_per_shape():
    _, m = burn(item_json([DONUT, PART_A, PART_B]), instance_ids="shape")
    assert [(a["instance_id"], a["area"]) for a in m.coco["annotations"]] == [
        (1, 188),
        (2, 30),
        (3, 42),
    ]


def test_rle_is_byte_for_byte_what_pycocotools_encodes_from_the_whole_image():
    """The fragment's counts come from the instance's bounding box only; they must be exactly
    ``pycocotools.mask.encode`` of the full-size binary mask, whatever the shapes."""
    rng = np.random.default_rng(7)
    table = [{"id": k, "object_id": k, "label": "car"} for k in (1, 2, 3)]
    checked = 0
    for trial in range(300):
        h, w = (int(n) for n in rng.integers(1, 16, 2))
        mask = rng.integers(0, 4, size=(h, w)).astype(np.uint16)
        if trial % 3 == 0:  # mostly one instance, touching the last pixel
            mask = np.where(rng.random((h, w)) < 0.9, 1, mask).astype(np.uint16)
        for annotation in instance_annotations(mask, table, LABELS):
            full = np.asfortranarray(mask == annotation["instance_id"], dtype=np.uint8)
            want = coco_mask.encode(full)["counts"].decode("ascii")
            assert annotation["segmentation"]["counts"] == want, (mask, annotation)
            checked += 1
    assert checked > 500


def test_looking_in_each_instances_region_finds_what_the_whole_image_holds():
    """The boxes from the shapes' bounds (what items use) give the same annotations as looking
    for every instance in the whole image; shapes touching the border, off-pixel edges."""
    rng = np.random.default_rng(5)
    annotations = []
    for k in range(25):
        x0, y0 = rng.uniform(-2, 38), rng.uniform(-2, 28)
        rings = [box(x0, y0, x0 + rng.uniform(2.5, 9), y0 + rng.uniform(2.5, 7))]
        annotations.append(segment(f"a{k}", "car", rings, k % 9 + 1))
    _, m = burn(item_json(annotations))
    whole = instance_annotations(m.instance, m.instance_table, LABELS)
    assert m.coco["annotations"] == whole and len(whole) > 5


# ------------------------------------------------------------------------------ seed semantics
def test_distinct_object_ids_give_the_seed_loops_mask_under_the_pixel_rule():
    """Dataloop's guide: ``image = np.where(seg == 1, annotation.object_id, image)`` for each
    annotation in turn; ``seg`` here is the exact pixel rule (rasterio's centre fill) of the
    raw rings, not the SDK's OpenCV fill."""
    rng = np.random.default_rng(12)
    annotations = []
    for k in range(12):
        x0, y0 = rng.uniform(0, 50), rng.uniform(0, 30)
        w, h = rng.uniform(4, 25), rng.uniform(4, 18)
        rings = [box(x0, y0, x0 + w, y0 + h)]
        if k % 3 == 0:  # a hole
            rings.append(box(x0 + w / 4, y0 + h / 4, x0 + w / 2, y0 + h / 2))
        object_id = int(rng.integers(1, 65535))
        annotations.append(
            segment(
                f"a{k}",
                ["building", "car", "tree"][k % 3],
                rings,
                [object_id, str(object_id)][k % 2],
            )
        )
    ids = [int(a["metadata"]["system"]["objectId"]) for a in annotations]
    assert len(set(ids)) == len(ids)
    data = item_json(annotations, width=64, height=48)
    image = np.zeros((48, 64), dtype=np.uint16)
    for annotation, object_id in zip(annotations, ids, strict=True):
        seg = rasterio_oracle(raw_rings(annotation), 48, 64).astype(np.uint8)
        image = np.where(seg == 1, object_id, image)
    _, m = burn(data)
    assert m.repairs == []
    assert np.array_equal(m.instance, image)
    assert sorted(a["instance_id"] for a in m.coco["annotations"]) == sorted(
        int(v) for v in np.unique(image) if v
    )


# ------------------------------------------------------------------------------ subsets
@pytest.mark.parametrize(
    ("tags", "subset"),
    [
        ({"train": True}, "train"),
        ({"validation": True, "other": True}, "validation"),
        ({"test": True, "train": False}, "test"),
        ({"train": "yes"}, None),
        ({}, None),
        (["train"], None),
        (None, None),
    ],
)
def test_the_subset_comes_from_metadata_system_tags(tags, subset):
    item = parse_item(item_json([], tags=tags), "d/photo")
    assert item.subset == subset and item.problems == []


def test_an_item_tagged_with_two_subsets_is_reported_and_gets_none():
    item = parse_item(item_json([DONUT], tags={"test": True, "train": True}), "d/photo")
    assert item.subset is None and len(item.annotations) == 1
    (problem,) = item.problems
    assert problem.annotation_id is None and problem.field == "metadata.system.tags"
    assert "ML subsets train and test" in problem.reason and "unassigned" in problem.reason


def test_coco_to_a_dataloop_destination_is_a_configuration_error():
    with pytest.raises(ValidationError, match="coco writes COCO JSON files"):
        RunParameters(destination="dataloop://abc", options={"modes": ["semantic", "coco"]})
    RunParameters(destination="dataloop://abc", options={"modes": ["semantic", "instance"]})


# ------------------------------------------------------------------------------ flow and CLI
def _copy_export(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    shutil.copytree(EXAMPLES / "export", export)
    # one item tagged twice: reported, unassigned
    path = export / "json/indoor/room_001.json"
    data = json.loads(path.read_text())
    data["metadata"]["system"]["tags"] = {"train": True, "test": True}
    path.write_text(json.dumps(data))
    return export


def _dataset_files(dest: Path) -> dict[str, bytes]:
    return {
        p.relative_to(dest).as_posix(): p.read_bytes()
        for folder in ("splits", "coco")
        for p in sorted((dest / folder).glob("*.*"))
    }


def _expected_splits(export: Path) -> dict[str, list[str]]:
    """The splits straight from the raw export JSON (every example item burns ok)."""
    splits = {"train": [], "validation": [], "test": [], "unassigned": []}
    for path, data in load_export(export).items():
        tags = data["metadata"]["system"].get("tags") or {}
        marked = [s for s in ("train", "validation", "test") if tags.get(s) is True]
        splits[marked[0] if len(marked) == 1 else "unassigned"].append(path)
    return {name: sorted(paths) for name, paths in splits.items()}


@pytest.mark.usefixtures("prefect_api")
def test_full_run_writes_coco_and_splits_and_the_dataset_command_rebuilds_them(tmp_path, capsys):
    export = _copy_export(tmp_path)
    full, partial = tmp_path / "full", tmp_path / "partial"
    modes = "semantic,instance,coco"
    assert main(["run", str(export), str(full), "--mode", modes, "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    raw = load_export(export)
    assert summary["items"] == len(raw) == 13 and summary["failed"] == 0
    twice = [r for r in summary["rejections"] if r["field"] == "metadata.system.tags"]
    assert [(r["path"], r["annotation"]) for r in twice] == [("indoor/room_001", None)]

    # splits: every item in exactly one list, sorted, as the export's tags say
    expected = _expected_splits(export)
    assert expected["train"] and expected["validation"] and expected["test"]
    assert "indoor/room_001" in expected["unassigned"]
    for name, paths in expected.items():
        assert (full / f"splits/{name}.txt").read_text().splitlines() == paths

    # COCO: loads with pycocotools; every annotation is exactly its object's pixels
    coco = COCO(str(full / "coco/instances.json"))
    label_map = json.loads((full / "label_map.json").read_text())
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {
        i: label for label, i in label_map.items()
    }
    images = coco.loadImgs(coco.getImgIds())
    # one image per image item, one per frame written of the video item (clips/crossing_001)
    video = "clips/crossing_001"
    frames = sorted(p.stem for p in (full / "instance" / video).glob("*.png"))
    assert len(frames) == 16
    paths = sorted(p for p in raw if p != video) + [f"{video}/{f}" for f in frames]
    assert [im["path"] for im in images] == sorted(paths)
    assert [im["id"] for im in images] == list(range(1, len(paths) + 1))
    annotated = 0
    for image in images:
        item = raw[image["path"].rpartition("/")[0] if "frame_index" in image else image["path"]]
        if "frame_index" in image:  # a frame: named where ffmpeg's %06d.jpg would put it
            assert image["file_name"] == f"{image['path']}.jpg"
            assert image["video"] == item["filename"].lstrip("/")
            assert f"{image['frame_index']:06d}" == image["path"].rpartition("/")[2]
        else:
            assert image["file_name"] == item["filename"].lstrip("/")
        assert image["dataloop_id"] in (item.get("id"), item.get("_id"))
        instance = decode_mask((full / f"instance/{image['path']}.png").read_bytes(), "png")
        assert (image["height"], image["width"]) == instance.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert sorted(a["instance_id"] for a in anns) == [int(v) for v in np.unique(instance) if v]
        for annotation in anns:
            assert np.array_equal(
                coco.annToMask(annotation).astype(bool), instance == annotation["instance_id"]
            )
            assert annotation["category_id"] == label_map[annotation["label"]]
        annotated += len(anns)
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert ann_ids == list(range(1, annotated + 1)) and annotated > 12

    # one file per subset present, with the ids of the whole file
    for subset in ("train", "validation", "test"):
        part = json.loads((full / f"coco/instances_{subset}.json").read_text())
        in_subset = [p for p in paths if p.rpartition("/")[0] in expected[subset]]
        in_subset += [p for p in paths if p in expected[subset]]
        assert [im["path"] for im in part["images"]] == sorted(in_subset)
        whole = {im["id"]: im for im in coco.dataset["images"]}
        assert all(whole[im["id"]] == im for im in part["images"])
        assert {a["image_id"] for a in part["annotations"]} <= {im["id"] for im in part["images"]}

    # the same export into another destination: a full run, then one item edited and run
    # alone, then `polyburn dataset`: the same files as a full run of the edited export
    assert main(["run", str(export), str(partial), "--mode", modes, "--no-progress"]) == 0
    edited = export / "json/street/scene_002.json"
    data = json.loads(edited.read_text())
    data["annotations"] = data["annotations"][:-1]
    data["metadata"]["system"]["tags"] = {"test": True}
    edited.write_text(json.dumps(data))
    args = ["run", str(export), str(partial), "--mode", modes, "--no-progress"]
    assert main([*args, "--item", "street/scene_002"]) == 0
    stale = _dataset_files(partial)
    capsys.readouterr()
    assert main(["dataset", str(partial)]) == 0
    printed = capsys.readouterr().out
    assert f"{partial}/splits/test.txt: {len(expected['test']) + 1} items" in printed
    assert main(["run", str(export), str(full), "--mode", modes, "--no-progress"]) == 0
    rebuilt, reference = _dataset_files(partial), _dataset_files(full)
    assert rebuilt == reference and rebuilt != stale
    assert "street/scene_002" in (full / "splits/test.txt").read_text().splitlines()

    # a full run without coco removes the COCO files its records no longer back
    assert main(["run", str(export), str(full), "--mode", "semantic", "--no-progress"]) == 0
    assert not list((full / "coco").rglob("*.json")) and (full / "splits/train.txt").is_file()


def test_the_dataset_command_refuses_a_dataloop_destination(capsys):
    assert main(["dataset", "dataloop://abc"]) == 2
    assert "folder or s3://" in capsys.readouterr().err
