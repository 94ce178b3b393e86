"""Video items: Dataloop tracks (frame, endFrame, snapshots_) burned frame by frame.

The masks are checked against independent oracles: rasterio over the raw coordinates of the
state each frame should show, and the oracle's naive per-frame expansion of the video
(tests/support/oracle.py ``video_frames``) burned as image items.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polyburn.dataloop_json import parse_item
from polyburn.destinations.local import LocalDestination
from polyburn.encode import decode_mask
from polyburn.losses import rejections_of
from polyburn.manifest import output_keys
from polyburn.params import MaskOptions
from polyburn.pipeline import process_item
from polyburn.report import PREVIEW_WIDTH, rejection_line
from polyburn.sources.local import LocalSource
from polyburn.video import MAX_FRAME, frame_count
from tests.support.oracle import (
    EXAMPLES,
    expected_instance,
    expected_semantic,
    load_export,
    rasterio_oracle,
)

W, H = 32, 24
MODES = ["semantic", "instance", "binary"]
LABELS = {"car": 1, "person": 2, "truck": 3}


def ring(x0, y0, x1, y1) -> list[list[dict]]:
    return [[{"x": x0, "y": y0}, {"x": x1, "y": y0}, {"x": x1, "y": y1}, {"x": x0, "y": y1}]]


def snap(frame, coords=None, visible=True, label="car", **extra) -> dict:
    entry = {"frame": frame, "objectVisible": visible, "label": label, "type": "segment"}
    entry["data"] = coords if coords is not None else ring(0, 0, 4, 4)
    entry.update(extra)
    return entry


def track(aid, coords, frame=0, end=None, snapshots=(), label="car", oid=None, kind="segment"):
    system: dict = {"frame": frame, "snapshots_": list(snapshots)}
    if end is not None:
        system["endFrame"] = end
    if oid is not None:
        system["objectId"] = oid
    return {
        "id": aid,
        "type": kind,
        "label": label,
        "coordinates": coords,
        "metadata": {"system": system},
    }


def video(annotations, **system) -> dict:
    meta = {"width": W, "height": H, "mimetype": "video/webm", **system}
    return {
        "id": "vid",
        "filename": "/clips/v.webm",
        "metadata": {"system": meta},
        "annotations": annotations,
    }


def burn(tmp_path: Path, items: dict[str, dict], dest: Path | None = None, **options):
    """Write ``items`` as an export and process each with a local destination; the records."""
    root = tmp_path / "export"
    for path, data in items.items():
        file = root / "json" / f"{path}.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(data))
    source = LocalSource(root)
    destination = LocalDestination(dest or tmp_path / "masks")
    opts = MaskOptions(modes=options.pop("modes", MODES), **options)
    return {
        ref.path: process_item(ref, source, destination, opts, LABELS)
        for ref in source.list_items()
    }


def mask(root: Path, key: str) -> np.ndarray:
    return decode_mask((root / key).read_bytes(), "png")


def frames_written(root: Path, mode="semantic", path="clips/v") -> list[int]:
    return sorted(int(p.stem) for p in (root / mode / path).glob("*.png"))


def box(x0, y0, x1, y1) -> np.ndarray:
    return rasterio_oracle([np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], float)], H, W)


def test_states_hold_between_snapshots_hide_reappear_and_end_inclusively(tmp_path):
    car = track(
        "a",
        ring(0, 0, 8, 8),
        frame=0,
        end=9,
        snapshots=[
            snap(3, ring(4, 4, 12, 12)),
            snap(5, visible=False),
            snap(7, ring(10, 2, 20, 10), label="truck"),
        ],
        oid=3,
    )
    person = track("b", ring(20, 10, 30, 20), frame=2, end=4, label="person", oid=5)
    record = burn(tmp_path, {"clips/v": video([car, person])})["clips/v"]
    root = tmp_path / "masks"
    assert record.status == "ok" and record.problems == []
    assert frames_written(root) == list(range(0, 10))  # span: first frame 0 .. endFrame 9
    want_car = {f: box(0, 0, 8, 8) for f in (0, 1, 2)}
    want_car |= {f: box(4, 4, 12, 12) for f in (3, 4)}  # held from frame 3
    want_car |= {f: np.zeros((H, W), bool) for f in (5, 6)}  # hidden
    want_car |= {f: box(10, 2, 20, 10) for f in (7, 8, 9)}  # back, now a truck
    for f in range(10):
        semantic = mask(root, f"semantic/clips/v/{f:06d}.png")
        instance = mask(root, f"instance/clips/v/{f:06d}.png")
        want = np.zeros((H, W), np.uint8)
        want[want_car[f]] = 3 if f >= 7 else 1
        if 2 <= f <= 4:  # endFrame 4 is inclusive
            want[box(20, 10, 30, 20)] = 2
        assert (semantic == want).all(), f
        assert set(np.unique(instance[want_car[f]])) <= {3}, f  # objectId 3 in every frame
        assert (instance[semantic == 2] == 5).all(), f
    assert (root / "binary/truck/clips/v/000007.png").exists()
    assert not (root / "binary/truck/clips/v/000006.png").exists()
    assert record.video == {
        "tracks": 2,
        "frame_count": None,
        "frame_count_source": None,
        "frames": [0, 9],
    }


def test_frames_all_writes_every_frame_and_a_rerun_with_span_removes_the_extra_ones(tmp_path):
    item = video([track("a", ring(0, 0, 8, 8), frame=3, end=5)], nb_frames=8)
    first = burn(tmp_path, {"clips/v": item}, frames="all")["clips/v"]
    root = tmp_path / "masks"
    assert frames_written(root) == list(range(8))
    assert not mask(root, "semantic/clips/v/000000.png").any()  # background, not missing
    assert len(output_keys(first)) == 8 * 3 + 3  # semantic, instance png + json; car in 3..5
    second = burn(tmp_path, {"clips/v": item}, frames="span")["clips/v"]
    assert frames_written(root) == [3, 4, 5]
    assert {o["key"] for o in second.outputs} <= set(output_keys(first))


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"system": {"nb_frames": 120, "ffmpeg": {"nb_read_frames": "99"}}}, (120, "nb_frames")),
        ({"system": {"nb_frames": None, "ffmpeg": {"nb_read_frames": "125"}}}, (125, "nb_read")),
        ({"system": {"nb_frames": None, "ffmpeg": {"nb_frames": 50}}}, (50, "ffmpeg.nb_frames")),
        ({"fps": 25, "system": {"nb_frames": None, "duration": 4.96}}, (124, "fps")),
        (
            {"fps": None, "system": {"duration": 5, "ffmpeg": {"nb_read_frames": "N/A"}}},
            (None, None),
        ),
        ({"system": {"nb_frames": True, "ffmpeg": None}}, (None, None)),
    ],
)
def test_frame_count_comes_from_the_first_source_that_has_one(metadata, expected):
    count, source = frame_count(metadata)
    assert count == expected[0]
    assert (source is None) if expected[1] is None else (expected[1] in source)


def test_instance_ids_are_numbered_once_per_video(tmp_path):
    """Fresh ids (no usable objectId) do not change when objects enter or leave the frame."""
    annotations = [
        track("big", ring(0, 0, 6, 6), frame=0, end=3, oid=40),  # leaves after frame 3
        track("none", ring(10, 0, 16, 6), frame=0, end=7),  # no objectId: a fresh id
        track("bad", ring(20, 0, 26, 6), frame=2, end=7, oid="x7"),  # unusable: a fresh id
        track("p1", ring(0, 10, 6, 16), frame=1, end=7, oid=9),  # two parts of object 9
        track("p2", ring(8, 10, 14, 16), frame=1, end=7, oid=9),
    ]
    record = burn(tmp_path, {"clips/v": video(annotations)})["clips/v"]
    root = tmp_path / "masks"
    seen: dict[str, set[int]] = {}
    for f in range(8):
        table = json.loads((root / f"instance/clips/v/{f:06d}.json").read_text())["instances"]
        for row in table:
            for annotation in row["annotations"]:
                seen.setdefault(annotation, set()).add(row["id"])
    assert seen == {"big": {40}, "none": {41}, "bad": {42}, "p1": {9}, "p2": {9}}
    assert [(r["kind"], r["annotation"]) for r in record.repairs] == [("object_id_unusable", "bad")]


def test_per_frame_masks_equal_the_oracles_frames_burned_as_images(tmp_path):
    """The shipped example video against the oracle's naive frame model, as image items."""
    items = load_export(EXAMPLES / "export")
    clip = items["clips/crossing_001"]
    record = burn(tmp_path, {"clips/crossing_001": clip})["clips/crossing_001"]
    root = tmp_path / "masks"
    frames = {
        p: i for p, i in load_export(EXAMPLES / "export", frames=True).items() if "clips/" in p
    }
    assert len(frames) == 16 and record.video["frames"] == [0, 15]
    for path, image in frames.items():
        assert (mask(root, f"semantic/{path}.png") == expected_semantic(image, LABELS)).all(), path
        expected, members = expected_instance(image)
        assert (mask(root, f"instance/{path}.png") == expected).all(), path
        table = json.loads((root / f"instance/{path}.json").read_text())["instances"]
        assert {row["id"]: row["annotations"] for row in table} == members, path


def test_a_box_only_video_writes_nothing_and_counts_as_skipped(tmp_path):
    boxes = [
        {**track("b1", [{"x": 1, "y": 1}, {"x": 5, "y": 5}], end=30), "type": "box"},
        {**track("p1", [{"x": 1, "y": 1}], end=30), "type": "point"},
    ]
    record = burn(tmp_path, {"clips/v": video(boxes)})["clips/v"]
    assert record.status == "ok" and record.skipped_empty is True
    assert record.outputs == [] and record.skipped == {"box": 1, "point": 1}
    assert not (tmp_path / "masks" / "semantic").exists()


def test_hostile_frame_data_is_reported_per_annotation_and_never_crashes(tmp_path):
    annotations = [
        track(
            "a",
            ring(0, 0, 8, 8),
            frame=0,
            end=6,
            snapshots=[
                snap(5, ring(2, 2, 10, 10)),
                snap(2, ring(1, 1, 9, 9)),  # out of order
                snap(2, ring(3, 3, 9, 9)),  # duplicated: the later one wins (dtlpy)
                snap(-4),  # negative
                snap(10**12),  # huge
                snap(2.5),  # not a whole number
                snap("3"),  # a string
                snap(4, [[{"x": "no", "y": None}]]),  # a broken state: rejected in frame 4
                "not a snapshot",
            ],
        ),
        track("b", ring(0, 0, 4, 4), frame="x"),  # no usable first frame: left out
        track("c", ring(12, 0, 16, 4), frame=5, end=2),  # endFrame before frame
        track("d", ring(20, 0, 24, 4), frame=1, end=10**15),  # endFrame beyond the video
        track("e", ring(24, 8, 28, 12), frame=1, end=-3),  # negative endFrame
    ]
    record = burn(tmp_path, {"clips/v": video(annotations, nb_frames=12)})["clips/v"]
    assert record.status == "ok", record.error
    problems = {(p["annotation"], p.get("frame"), p["reason"]) for p in record.problems}
    reasons = " | ".join(sorted(r for _, _, r in problems))
    for text in ("frame -4 is negative", "is beyond the video's last frame 11", "2.5", "'3'"):
        assert text in reasons
    assert ("a", 4) in {(a, f) for a, f, _ in problems}  # the broken state, with its frame
    lines = [rejection_line(r) for r in rejections_of(record)]
    assert any(line.startswith("clips/v annotation a (car) frame 4 [") for line in lines)
    assert any(a == "b" and "first frame 'x'" in r for a, _, r in problems)
    kinds = {(r["kind"], r["annotation"]) for r in record.repairs}
    assert kinds >= {
        ("snapshots_unordered", "a"),
        ("duplicate_snapshot", "a"),
        ("end_frame_before_frame", "c"),
        ("end_frame_clipped", "d"),
        ("end_frame_invalid", "e"),
    }
    root = tmp_path / "masks"
    assert frames_written(root) == list(range(0, 12))  # d is clipped to the video's 12 frames
    frame2 = mask(root, "semantic/clips/v/000002.png")[:12, :12]  # a alone there
    assert (frame2 == box(3, 3, 9, 9)[:12, :12]).all()  # the later of the two states at 2
    frame4 = mask(root, "semantic/clips/v/000004.png")
    assert not frame4[box(0, 0, 8, 8)].any()  # a's state at 4 was rejected: not drawn there
    e = box(24, 8, 28, 12)  # e: endFrame -3 ignored, it ends at its only state, frame 1
    assert mask(root, "semantic/clips/v/000001.png")[e].all() and not frame4[e].any()
    assert (mask(root, "semantic/clips/v/000005.png")[box(12, 0, 16, 4)] == 1).all()
    assert not mask(root, "semantic/clips/v/000006.png")[box(12, 0, 16, 4)].any()


def test_frame_numbers_beyond_the_cap_never_run_a_long_loop():
    item = parse_item(
        video([track("a", ring(0, 0, 4, 4), frame=0, end=10**9, snapshots=[snap(10**9 + 1)])]),
        "clips/v",
    )
    (t,) = item.video.tracks
    assert t.end == 0 and len(t.states) == 1
    assert f"beyond {MAX_FRAME}" in item.problems[0].reason
    assert [r.kind for r in item.video.repairs] == ["end_frame_invalid"]
    assert item.video.frames("all") == range(0, 1)


def test_video_detection_follows_dtlpy():
    no_mime = video([track("a", ring(0, 0, 4, 4), end=3)])
    del no_mime["metadata"]["system"]["mimetype"]
    assert parse_item(no_mime, "v").video is not None  # endFrame > 0
    no_mime["annotations"][0]["metadata"]["system"]["endFrame"] = 0
    assert parse_item(no_mime, "v").video is None
    image = video([track("a", ring(0, 0, 4, 4), end=3)], mimetype="image/jpeg")
    assert parse_item(image, "v").video is None  # the mimetype decides


@pytest.mark.usefixtures("prefect_api")
def test_a_video_and_image_items_in_one_cli_run(tmp_path, capsys):
    from polyburn.cli import main

    export = tmp_path / "export" / "json"
    export.mkdir(parents=True)
    clip = video([track("a", ring(0, 0, 8, 8), frame=1, end=4, oid=2)])
    (export / "clip.json").write_text(json.dumps(clip))
    image = {
        "id": "img",
        "filename": "/still.jpg",
        "metadata": {"system": {"width": W, "height": H, "mimetype": "image/jpeg"}},
        "annotations": [track("s", ring(4, 4, 12, 12), label="person")],
    }
    (export / "still.json").write_text(json.dumps(image))
    dest = tmp_path / "masks"
    code = main(["run", str(tmp_path / "export"), str(dest), "--mode", "semantic,instance"])
    assert code == 0, capsys.readouterr()
    assert "2 items: 2 ok, 0 failed" in capsys.readouterr().out
    assert frames_written(dest, path="clip") == [1, 2, 3, 4]
    assert (dest / "semantic" / "still.png").is_file()
    records = {
        r["path"]: r for r in map(json.loads, (dest / "manifest.jsonl").read_text().splitlines())
    }
    assert len(records["clip"]["outputs"]) == 4 * 3 and len(records["still"]["outputs"]) == 3

    # the preview artifact shows both, the video by its first frame written
    from prefect.artifacts import Artifact

    preview = Artifact.get("polyburn-preview").data
    assert preview.count("### `") == 2
    assert "### `clip` (frame 1)" in preview and "### `still`\n" in preview
    assert preview.count("![clip semantic](") == preview.count("![clip instance](") == 1
    assert preview.count("![still semantic](") == preview.count("![still instance](") == 1


def test_a_video_asked_for_a_preview_shows_its_first_written_frame(tmp_path):
    """The preview artifact's pictures of a video item: its first frame written, in the colours
    the written palette PNG has; one colour per object in the instance picture; a legend of the
    labels that frame shows, in the same colours."""
    annotations = [
        track("a", ring(0, 0, 8, 8), frame=3, end=6, oid=7),
        track("b", ring(10, 2, 20, 12), frame=3, end=6, label="truck", oid=8),
        track("c", ring(4, 14, 12, 22), frame=4, end=6, label="person"),  # not in frame 3
        track("d", ring(22, 2, 30, 10), frame=3, end=6, oid=7 + 256),  # 7 in a 256 palette
    ]
    root = tmp_path / "export" / "json"
    root.mkdir(parents=True)
    (root / "v.json").write_text(json.dumps(video(annotations)))
    source = LocalSource(tmp_path / "export")
    (ref,) = source.list_items()
    masks = tmp_path / "masks"
    options = MaskOptions(modes=MODES)
    record = process_item(ref, source, LocalDestination(masks), options, LABELS, preview=True)
    preview = record.preview
    assert record.status == "ok" and frames_written(masks, path="v")[0] == 3
    assert preview["frame"] == 3

    def picture(data: str, scale: int) -> np.ndarray:
        image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        assert image.size == (W * scale, H * scale)  # a small frame is scaled by whole pixels
        return np.asarray(image)[::scale, ::scale]

    scale = PREVIEW_WIDTH // W
    with Image.open(masks / "semantic/v/000003.png") as written:
        assert (picture(preview["semantic"], scale) == np.asarray(written.convert("RGB"))).all()
        colours = written.getpalette()
    assert preview["legend"] == [
        [i, label, "#{:02x}{:02x}{:02x}".format(*colours[3 * i : 3 * i + 3])]
        for label, i in sorted(LABELS.items(), key=lambda item: item[1])
        if label in ("car", "truck")
    ]
    ids = mask(masks, "instance/v/000003.png")
    shown = picture(preview["instance"], scale).reshape(-1, 3)
    pairs = {(int(i), tuple(c)) for i, c in zip(ids.ravel(), shown, strict=True)}
    assert {i for i, _ in pairs} == {0, 7, 8, 263}
    assert len(pairs) == len({c for _, c in pairs}) == 4  # one colour per object, and each its own
    assert (0, (0, 0, 0)) in pairs


def test_validate_reports_every_state_without_writing(tmp_path):
    clip = video(
        [
            track(
                "a",
                ring(0, 0, 8, 8),
                end=9,
                snapshots=[
                    snap(3, [[{"x": 1, "y": 1}, {"x": 2, "y": 2}]]),
                    snap(6, ring(-4, 0, 8, 8)),
                ],
            )
        ]
    )
    root = tmp_path / "export" / "json"
    root.mkdir(parents=True)
    (root / "v.json").write_text(json.dumps(clip))
    source = LocalSource(tmp_path / "export")
    (ref,) = source.list_items()
    record = process_item(ref, source, None, MaskOptions(), LABELS)
    assert record.status == "ok" and "outputs" not in record.to_dict()
    assert [(p["annotation"], p["frame"]) for p in record.problems] == [("a", 3)]
    assert [(r["kind"], r["frame"]) for r in record.repairs] == [("clipped", 6)]
    assert record.shapes == 2


def test_the_frames_choice_reaches_the_burn_jobs_the_cache_key_and_the_cli(tmp_path):
    from polyburn.cli import _parameters, _parser
    from polyburn.model import ItemRef
    from polyburn.parallel import process_items
    from tasks.masks import batch_cache_key

    root = tmp_path / "export" / "json"
    root.mkdir(parents=True)
    clip = video([track("a", ring(0, 0, 8, 8), frame=2, end=3)], nb_frames=6)
    (root / "v.json").write_text(json.dumps(clip))
    source, destination = LocalSource(tmp_path / "export"), LocalDestination(tmp_path / "m")
    options = MaskOptions(frames="all")
    (record,) = process_items(list(source.list_items()), source, destination, options, LABELS)
    assert record.video["frames"] == [0, 5]
    assert frames_written(tmp_path / "m", path="v") == list(range(6))

    def key(options: MaskOptions) -> str | None:
        ref = ItemRef("i1", "v", "json/v.json", "rev-1")
        parameters = {"refs": [ref], "source_uri": "s", "destination_uri": "d"}
        return batch_cache_key(None, {**parameters, "options": options, "label_map": LABELS})

    assert key(MaskOptions()) == key(MaskOptions(frames="span")) != key(options)
    args = _parser().parse_args(["run", "src", "dst", "--frames", "all"])
    assert _parameters(args).options.frames == "all"


def test_a_video_stops_when_another_run_took_its_lease_over(tmp_path, monkeypatch):
    """Leases are renewed while held (tests/test_overlap.py); a video checks after each frame
    that its lease is still its own and stops with a transient error when it is not."""
    from polyburn.errors import TransientError
    from polyburn.state import ItemLease, lease_key

    record = burn(tmp_path, {"clips/v": video([track("a", ring(0, 0, 8, 8), end=5)])})["clips/v"]
    assert record.status == "ok" and frames_written(tmp_path / "masks") == list(range(6))
    assert not (tmp_path / "masks" / lease_key("clips/v")).exists()  # released at the end

    monkeypatch.setenv("POLYBURN_LEASE_SECONDS", "0.3")
    store = LocalDestination(tmp_path / "state")
    mine, theirs = ItemLease(store, "clips/v"), ItemLease(store, "clips/v")
    mine.acquire()
    mine.check()
    store.replace(mine.key, theirs._body(), mine.tag)  # another run took the item over
    mine.renew()
    with pytest.raises(TransientError, match="took the item over"):
        mine.check()


def test_the_summary_says_which_empty_items_got_no_masks():
    from polyburn.records import RunSummary
    from polyburn.report import failures_markdown, losses_text

    summary = RunSummary(rejections=[], rejected=0, empty_items=2, empty_items_skipped=1)
    summary.empty = [
        {"path": "clips/v", "skipped": {"box": 1}, "rejected": 0, "skipped_empty": True},
        {"path": "still", "skipped": {"point": 1}, "rejected": 0, "skipped_empty": False},
    ]
    (line,) = losses_text(summary, "masks/manifest.jsonl")
    assert line.startswith("NOTHING TO BURN in 2 item(s), 1 left without masks (videos")
    summary.ok, summary.failed, summary.items, summary.failures = 2, 0, 2, []
    assert "1 left without masks (videos, or skip_empty)" in failures_markdown(summary, "m")
