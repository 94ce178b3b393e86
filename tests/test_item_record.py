"""Item records as a typed value (polyburn.records.ItemRecord): the bytes stored stay the bytes
polyburn wrote before records were typed, records of other versions survive a round trip, and
what only travels with a record (previews, Dataloop's cleanup) is never stored."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from polyburn import pipeline
from polyburn.destinations.local import LocalDestination
from polyburn.errors import TransientError
from polyburn.manifest import manifest_line, pack_records, unpack_records
from polyburn.parallel import process_items
from polyburn.params import MaskOptions
from polyburn.pipeline import process_item
from polyburn.records import ItemRecord
from polyburn.sources.local import LocalSource
from polyburn.state import record_key
from tests.support.oracle import EXAMPLES

LABELS = {"building": 1, "car": 2, "person": 3, "road": 4, "tree": 5, "truck": 6}

# What polyburn wrote for these items before item records were typed (captured from main at
# 54dfbf7, seconds and version pinned; recipe digests, sha256s and Dataloop ids replaced below).
GOLDEN = {
    "ok image": (
        b'{"annotations": 4, "error": null, "file_name": "street/scene_001.jpg", '
        b'"height": 240, "item": "6650a1f0c0ffee0000000007", "labels": ["car", "person", '
        b'"road"], "outputs": [{"bytes": 1666, "key": "semantic/street/scene_001.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 1363, '
        b'"key": "instance/street/scene_001.png", "sha256": "<sha256>", "written": true}, '
        b'{"bytes": 525, "key": "instance/street/scene_001.json", "sha256": "<sha256>", '
        b'"written": true}], "path": "street/scene_001", "polyburn_version": "9.9.9", '
        b'"problems": [], "recipe": "<recipe>", "repairs": [], '
        b'"revision": "f409fd09b981795f86301fb749ad6d4a65031db060353cc76f045d0f5de80c97", '
        b'"seconds": 0.0, "shapes": 4, "skipped": {"box": 1, "point": 1}, "status": "ok", '
        b'"subset": "train", "width": 320}\n'
    ),
    "failed, transient, keeps outputs": (
        b'{"error": "street/scene_001: HTTP 503: slow down", "item": "", '
        b'"outputs": [{"bytes": 1666, "key": "semantic/street/scene_001.png", '
        b'"sha256": "<sha256>", "written": false}, {"bytes": 1363, '
        b'"key": "instance/street/scene_001.png", "sha256": "<sha256>", "written": false}, '
        b'{"bytes": 525, "key": "instance/street/scene_001.json", "sha256": "<sha256>", '
        b'"written": false}], "path": "street/scene_001", "polyburn_version": "9.9.9", '
        b'"retries": 3, "seconds": 0.0, "status": "failed", "transient": true}\n'
    ),
    "empty, skipped": (
        b'{"annotations": 0, "error": null, "file_name": "misc/boxes.jpg", "height": 6, '
        b'"item": "only-boxes", "labels": [], "outputs": [], "path": "misc/boxes", '
        b'"polyburn_version": "9.9.9", "problems": [], "recipe": "<recipe>", "repairs": [], '
        b'"revision": "6f7fe9ed5e726f538fe76b0e52ea8996a43dda16f318d7b408fc8cd39b9f16f8", '
        b'"seconds": 0.0, "shapes": 0, "skipped": {"box": 1}, "skipped_empty": true, '
        b'"status": "ok", "subset": null, "width": 8}\n'
    ),
    "unreadable": (
        b'{"error": "misc/broken: invalid or truncated JSON: Expecting property name '
        b"enclosed in double quotes (line 1, "
        b'column 2)", "item": "", "path": "misc/broken", "polyburn_version": "9.9.9", '
        b'"seconds": 0.0, "status": "failed"}\n'
    ),
    "video": (
        b'{"annotations": 4, "error": null, "file_name": "clips/crossing_001.webm", '
        b'"height": 48, "item": "6650a1f0c0ffee000000f004", "labels": ["car", "person"], '
        b'"outputs": [{"bytes": 883, "key": "semantic/clips/crossing_001/000000.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 107, '
        b'"key": "instance/clips/crossing_001/000000.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 173, "key": "instance/clips/crossing_001/000000.json", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 883, '
        b'"key": "semantic/clips/crossing_001/000001.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 107, "key": "instance/clips/crossing_001/000001.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 173, '
        b'"key": "instance/clips/crossing_001/000001.json", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 929, "key": "semantic/clips/crossing_001/000002.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 157, '
        b'"key": "instance/clips/crossing_001/000002.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 291, "key": "instance/clips/crossing_001/000002.json", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 929, '
        b'"key": "semantic/clips/crossing_001/000003.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 156, "key": "instance/clips/crossing_001/000003.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 291, '
        b'"key": "instance/clips/crossing_001/000003.json", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 941, "key": "semantic/clips/crossing_001/000004.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 193, '
        b'"key": "instance/clips/crossing_001/000004.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 438, "key": "instance/clips/crossing_001/000004.json", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 940, '
        b'"key": "semantic/clips/crossing_001/000005.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 194, "key": "instance/clips/crossing_001/000005.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 438, '
        b'"key": "instance/clips/crossing_001/000005.json", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 940, "key": "semantic/clips/crossing_001/000006.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 193, '
        b'"key": "instance/clips/crossing_001/000006.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 438, "key": "instance/clips/crossing_001/000006.json", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 893, '
        b'"key": "semantic/clips/crossing_001/000007.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 153, "key": "instance/clips/crossing_001/000007.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 323, '
        b'"key": "instance/clips/crossing_001/000007.json", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 894, "key": "semantic/clips/crossing_001/000008.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 153, '
        b'"key": "instance/clips/crossing_001/000008.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 323, "key": "instance/clips/crossing_001/000008.json", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 898, '
        b'"key": "semantic/clips/crossing_001/000009.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 151, "key": "instance/clips/crossing_001/000009.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 320, '
        b'"key": "instance/clips/crossing_001/000009.json", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 898, "key": "semantic/clips/crossing_001/000010.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 151, '
        b'"key": "instance/clips/crossing_001/000010.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 320, "key": "instance/clips/crossing_001/000010.json", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 898, '
        b'"key": "semantic/clips/crossing_001/000011.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 151, "key": "instance/clips/crossing_001/000011.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 320, '
        b'"key": "instance/clips/crossing_001/000011.json", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 883, "key": "semantic/clips/crossing_001/000012.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 109, '
        b'"key": "instance/clips/crossing_001/000012.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 173, "key": "instance/clips/crossing_001/000012.json", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 883, '
        b'"key": "semantic/clips/crossing_001/000013.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 109, "key": "instance/clips/crossing_001/000013.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 173, '
        b'"key": "instance/clips/crossing_001/000013.json", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 883, "key": "semantic/clips/crossing_001/000014.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 109, '
        b'"key": "instance/clips/crossing_001/000014.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 173, "key": "instance/clips/crossing_001/000014.json", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 883, '
        b'"key": "semantic/clips/crossing_001/000015.png", "sha256": "<sha256>", '
        b'"written": true}, {"bytes": 109, "key": "instance/clips/crossing_001/000015.png", '
        b'"sha256": "<sha256>", "written": true}, {"bytes": 173, '
        b'"key": "instance/clips/crossing_001/000015.json", "sha256": "<sha256>", '
        b'"written": true}], "path": "clips/crossing_001", "polyburn_version": "9.9.9", '
        b'"problems": [], "recipe": "<recipe>", "repairs": [], '
        b'"revision": "abaf0b6e5dfcc5f1f5d47ff92a7697475d0ebe22340088129dbcce7036d4fb68", '
        b'"seconds": 0.0, "shapes": 11, "skipped": {}, "status": "ok", "subset": null, '
        b'"video": {"frame_count": 16, '
        b'"frame_count_source": "metadata.system.ffmpeg.nb_read_frames", "frames": [0, 15], '
        b'"tracks": 4}, "width": 64}\n'
    ),
    "validated only": (
        b'{"annotations": 2, "error": null, "file_name": "street/scene_002.jpg", '
        b'"height": 240, "item": "6650a1f0c0ffee000000000a", "labels": ["building", "tree"], '
        b'"path": "street/scene_002", "polyburn_version": "9.9.9", "problems": [], '
        b'"repairs": [], '
        b'"revision": "29ac477f8e388b59c996c5c3a3d92a214d94a5dbd6b7507493634cba9af3dd2e", '
        b'"seconds": 0.0, "shapes": 2, "skipped": {}, "status": "ok", "subset": "train", '
        b'"width": 320}\n'
    ),
    "dataloop": (
        b'{"annotations": 1, "error": null, "file_name": "street/a.png", "height": 6, '
        b'"item": "<item>", "labels": ["car"], "outputs": [{"bytes": 94, '
        b'"key": "instance/street/a/1", "sha256": "<sha256>", "written": true}], '
        b'"path": "street/a", "polyburn_version": "9.9.9", "problems": [], '
        b'"recipe": "<recipe>", "repairs": [], "revision": "<revision>", "seconds": 0.0, '
        b'"shapes": 1, "skipped": {"binary (written by polyburn)": 1}, "status": "ok", '
        b'"subset": "train", "width": 8}\n'
    ),
}


def normalised(line: bytes, ids: dict[str, str] | None = None) -> bytes:
    """``line`` with what changes between runs or code versions replaced by placeholders."""
    text = line.decode("utf-8")
    text = re.sub(r'"recipe": "[0-9a-f]+"', '"recipe": "<recipe>"', text)
    text = re.sub(r'"sha256": "[0-9a-f]{64}"', '"sha256": "<sha256>"', text)
    for value, name in (ids or {}).items():
        text = text.replace(value, name)
    return text.encode("utf-8")


@pytest.fixture
def pinned(monkeypatch):
    """Records that do not depend on the clock or the installed version."""
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: 100.0)
    monkeypatch.setattr(pipeline, "version", lambda: "9.9.9")


class FlakySource(LocalSource):
    """A local export whose items in ``flaky`` always fail with a transient error."""

    flaky: set[str] = set()

    def load(self, ref, max_pixels):
        if ref.path in self.flaky:
            raise TransientError("HTTP 503: slow down")
        return super().load(ref, max_pixels)


def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    shutil.copytree(EXAMPLES / "export", root)
    boxes = {
        "id": "only-boxes",
        "filename": "/misc/boxes.jpg",
        "metadata": {"system": {"width": 8, "height": 6}},
        "annotations": [
            {"id": "b1", "type": "box", "label": "car", "coordinates": [{"x": 1, "y": 1}] * 2}
        ],
    }
    (root / "json" / "misc").mkdir()
    (root / "json" / "misc" / "boxes.json").write_text(json.dumps(boxes))
    (root / "json" / "misc" / "broken.json").write_text("{not json")
    return root


def stored(destination: LocalDestination, path: str) -> bytes:
    return destination.state.get(record_key(path))


def golden_lines(tmp_path: Path) -> dict[str, bytes]:
    """The stored record of one item of each kind, burned through the batch path."""
    root = export(tmp_path)
    source = FlakySource(root)
    destination = LocalDestination(tmp_path / "masks")
    refs = {ref.path: ref for ref in source.list_items()}
    options = MaskOptions(modes=["semantic", "instance"], skip_empty=True)
    wanted = ["street/scene_001", "misc/boxes", "misc/broken", "clips/crossing_001"]
    process_items([refs[p] for p in wanted], source, destination, options, LABELS, previews=1)
    FlakySource.flaky = {"street/scene_001"}
    again = options.model_copy(update={"verify": True})  # not taken unchanged: burned, and fails
    try:
        process_items([refs["street/scene_001"]], source, destination, again, LABELS)
        lines = {"failed, transient, keeps outputs": stored(destination, "street/scene_001")}
    finally:
        FlakySource.flaky = set()
    process_items([refs["street/scene_001"]], source, destination, options, LABELS)
    lines["ok image"] = stored(destination, "street/scene_001")
    lines["empty, skipped"] = stored(destination, "misc/boxes")
    lines["unreadable"] = stored(destination, "misc/broken")
    lines["video"] = stored(destination, "clips/crossing_001")
    checked = process_item(refs["street/scene_002"], source, None, options, LABELS)
    lines["validated only"] = manifest_line(checked)
    return {name: normalised(line) for name, line in lines.items()}


def test_records_are_stored_byte_for_byte_as_before(tmp_path, pinned):
    lines = golden_lines(tmp_path)
    for name, line in lines.items():
        assert line == GOLDEN[name], name


@pytest.fixture
def dataloop(fake_gate, fake_gate_token, tmp_path, monkeypatch):
    """polyburn pointed at the fake Dataloop gate, with a private state folder."""
    from polyburn import dataloop_api

    monkeypatch.setenv("DATALOOP_GATE_URL", fake_gate.api_url)
    monkeypatch.setenv("DATALOOP_API_KEY", fake_gate_token)
    monkeypatch.delenv("DATALOOP_API_KEY_BLOCK", raising=False)
    monkeypatch.setenv("POLYBURN_DATALOOP_LIMIT", "")
    monkeypatch.setenv("POLYBURN_STATE_DIR", str(tmp_path / "state"))
    dataloop_api.reset_session()
    yield fake_gate
    dataloop_api.reset_session()


def dataloop_line(gate) -> bytes:
    """The stored record of a Dataloop item burned twice (the second burn replaces its masks:
    its record carried the replaced ids to the batch's end, which are not stored)."""
    from polyburn.destinations.dataloop import DataloopDestination
    from polyburn.pipeline import write_label_map
    from polyburn.sources.dataloop import DataloopSource

    ds = gate.add_dataset("golden-records", labels={"car": "#ff0000", "road": "#808080"})
    square = [{"x": 1, "y": 1}, {"x": 5, "y": 1}, {"x": 5, "y": 4}, {"x": 1, "y": 4}]
    item = gate.add_item(
        ds,
        "/street/a.png",
        8,
        6,
        [{"type": "segment", "label": "car", "coordinates": [square]}],
        metadata={"system": {"tags": {"train": True}}},
    )
    source = DataloopSource.from_uri(f"dataloop://{ds}")
    destination = DataloopDestination.from_uri("dataloop://", source_dataset=source.uri)
    labels = {"car": 1, "road": 2}
    write_label_map(destination, labels)
    refs = list(source.list_items())
    process_items(refs, source, destination, MaskOptions(modes=["semantic"]), labels)
    process_items(refs, source, destination, MaskOptions(modes=["instance"]), labels)
    line = destination.state.get(record_key(refs[0].path))
    line = re.sub(rb'"revision": "[^"]*"', b'"revision": "<revision>"', line)
    return re.sub(rb"[0-9a-f]{24}", b"<id>", normalised(line, {item["id"]: "<item>"}))


def test_a_dataloop_record_is_stored_byte_for_byte_as_before(dataloop, pinned):
    assert dataloop_line(dataloop) == GOLDEN["dataloop"]


OLDER_AND_NEWER = [
    # before 0.2.0: no polyburn_version, subset, labels, file_name or recipe
    {"item": "i", "path": "a", "status": "ok", "error": None, "annotations": 2, "shapes": 2,
     "repairs": [], "problems": [], "skipped": {}, "revision": "r", "width": 4, "height": 3,
     "outputs": [{"key": "semantic/a.png", "sha256": "0" * 64, "bytes": 9, "written": True}],
     "seconds": 0.01},
    # subset and labels, no file_name yet
    {"item": "i", "path": "b", "status": "ok", "error": None, "subset": None, "labels": ["x"]},
    # a failed item never read: no subset at all
    {"item": "", "path": "c", "status": "failed", "error": "c: gone", "seconds": 1},
    # a newer writer: fields this polyburn does not know, and known ones set to null
    {"item": "i", "path": "d", "status": "ok", "error": None, "subset": "train",
     "shapes": None, "retries": None, "frames_seen": [1, 2], "owner": {"team": "é"}},
    # a foreign line that only names a path
    {"path": "e"},
]  # fmt: skip


@pytest.mark.parametrize("data", OLDER_AND_NEWER, ids=lambda d: d["path"])
def test_a_record_of_another_version_is_written_back_as_it_was_read(data):
    line = (json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    record = ItemRecord.from_json(line)
    assert record.path == data["path"]
    if "status" in data:
        assert record.to_dict() == data
        assert record.to_json() == line == manifest_line(record)
    else:  # no status: not ok, and says so when written back
        assert not record.ok and record.to_dict() == {
            "item": None, "path": "e", "status": "failed", "error": None
        }  # fmt: skip


def test_golden_lines_read_back_byte_for_byte():
    for name, line in GOLDEN.items():
        record = ItemRecord.from_json(line)
        assert record.to_json() == line, name
        assert not record.extra, name  # every field of today's records is a typed one


def test_fields_are_typed_and_unknown_ones_kept():
    record = ItemRecord.from_dict(OLDER_AND_NEWER[3] | {"status": "failed", "transient": True})
    assert record.subset == "train" and record.transient and not record.ok
    assert record.shapes is None and record.extra == {
        "shapes": None, "retries": None, "frames_seen": [1, 2], "owner": {"team": "é"}
    }  # fmt: skip
    record.shapes = 3  # a value set wins over the null it was read with
    assert record.to_dict()["shapes"] == 3
    assert ItemRecord.from_dict(OLDER_AND_NEWER[1]).subset is None  # null: no subset
    assert not ItemRecord.from_dict(OLDER_AND_NEWER[2]).subset  # absent
    assert "subset" not in ItemRecord.from_dict(OLDER_AND_NEWER[2]).to_dict()


@pytest.mark.parametrize(
    "line", [b"not json", b"[1, 2]", b"{}", b'{"item": "x"}', b'{"path": 3}', b"\xff"]
)
def test_a_line_that_is_no_record_is_refused(line):
    with pytest.raises(ValueError):
        ItemRecord.from_json(line)


def test_preview_and_cleanup_travel_with_a_record_and_are_never_stored():
    record = ItemRecord("a", "i", preview={"semantic": "png"}, cleanup=["old-id"])
    assert "preview" not in record.to_dict() and "cleanup" not in record.to_dict()
    assert record.to_json() == ItemRecord("a", "i").to_json()
    travelled = pickle.loads(pickle.dumps(record))  # from a burn worker to its batch
    assert travelled == record and travelled.cleanup == ["old-id"]
    assert travelled.to_json() == record.to_json()  # no subset (ABSENT) still writes none
    (packed,) = unpack_records(pack_records([record]))  # a batch's result
    assert packed == ItemRecord("a", "i")


def test_a_burned_record_carries_its_cleanup_to_the_batch_end_but_not_to_the_store(
    tmp_path, pinned
):
    """A destination that leaves cleanup work (Dataloop's replaced annotations): the record
    process_item returns carries it, the stored one never does."""

    class Leaving(LocalDestination):
        def take_cleanup(self, path):
            return [f"{path}-old"]

    source = LocalSource(EXAMPLES / "export")
    destination = Leaving(tmp_path / "masks")
    ref = next(r for r in source.list_items() if r.path == "street/scene_001")
    options = MaskOptions(modes=["semantic"])
    record = process_item(ref, source, destination, options, LABELS, preview=True)
    assert record.ok and record.cleanup == ["street/scene_001-old"] and record.preview
    line = stored(destination, ref.path)
    assert b"cleanup" not in line and b"preview" not in line
    assert line == record.to_json() and ItemRecord.from_json(line).cleanup is None
