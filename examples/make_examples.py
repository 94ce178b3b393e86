"""Regenerate the shipped example exports (run by hand; the output is committed).

``examples/export``  a dozen items in Dataloop's JSON export layout with holes, overlaps,
                     self-intersections, NaN vertices and more — every problem repairable — and
                     a short video item with per-frame snapshots.
``examples/broken``  items that show how failures are reported: an unknown label (with
                     ``examples/broken/labels.json``), a truncated file, a missing image size,
                     a degenerate annotation.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent
DATASET = "6650a1f0c0ffee0000000001"
_counter = iter(range(1, 10_000))


def oid() -> str:
    return f"6650a1f0c0ffee{next(_counter):010x}"


def ring(points) -> list[dict]:
    return [{"x": x, "y": y, "z": 0} for x, y in points]


def ann(kind, label, coordinates, object_id=None, **extra) -> dict:
    system = {
        "status": None,
        "startTime": 0,
        "endTime": 1,
        "frame": 0,
        "automated": False,
        "attributes": {},
        "isOpen": False,
    }
    if object_id is not None:
        system["objectId"] = object_id
    record = {
        "id": oid(),
        "datasetId": DATASET,
        "type": kind,
        "label": label,
        "attributes": [],
        "coordinates": coordinates,
        "metadata": {"system": system, "user": {}},
        "creator": "annotator@example.com",
        "createdAt": "2026-11-01T10:00:00.000Z",
        "updatedBy": "annotator@example.com",
        "updatedAt": "2026-11-02T10:00:00.000Z",
        "source": "ui",
    }
    record.update(extra)
    return record


def polygon(label, *rings, object_id=None) -> dict:
    return ann("segment", label, [ring(r) for r in rings], object_id)


def binary(label, mask: np.ndarray, colour=(0, 255, 0), object_id=None) -> dict:
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[mask] = (*colour, 255)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return ann("binary", label, uri, object_id)


def item(filename, width, height, annotations, id_key="id") -> dict:
    item_id = oid()
    return {
        id_key: item_id,
        "datasetId": DATASET,
        "filename": filename,
        "dir": filename.rsplit("/", 1)[0] or "/",
        "name": filename.rsplit("/", 1)[1],
        "type": "file",
        "hidden": False,
        "annotated": True,
        "metadata": {
            "system": {
                "width": width,
                "height": height,
                "mimetype": "image/jpeg",
                "channels": 3,
                "originalname": filename.rsplit("/", 1)[1],
            }
        },
        "createdAt": "2026-11-01T09:00:00.000Z",
        "annotations": annotations,
    }


def star(cx, cy, r_out, r_in, n=7, phase=0.0):
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = phase + math.pi * k / n
        pts.append((round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)))
    return pts


def export_items() -> dict[str, dict]:
    items = {}
    # 1: overlaps in file order, plus non-pixel annotations that are skipped and counted.
    items["street/scene_001"] = item(
        "/street/scene_001.jpg",
        320,
        240,
        [
            polygon("road", [(0, 150), (320, 140), (320, 240), (0, 240)], object_id=1),
            polygon("car", [(40.5, 120.5), (140.5, 118), (150, 170.25), (35, 172)], object_id="2"),
            polygon("car", [(110, 130), (200, 125.5), (205, 180), (105, 182)], object_id=3),
            polygon("person", [(230, 90), (250, 90), (252, 160), (228, 160)]),
            ann("box", "car", [{"x": 10, "y": 10, "z": 0}, {"x": 50, "y": 40, "z": 0}]),
            ann("point", "person", {"x": 240, "y": 80, "z": 0}),
        ],
    )
    # 2: a building with a courtyard (a hole) and a closed exterior ring (closing duplicate).
    items["street/scene_002"] = item(
        "/street/scene_002.jpg",
        320,
        240,
        [
            polygon(
                "building",
                [(40, 30), (280, 30), (280, 210), (40, 210), (40, 30)],
                [(100, 80), (100, 160), (220, 160), (220, 80)],
                object_id=1,
            ),
            polygon("tree", [(140, 100), (180, 100), (180, 140), (140, 140)], object_id=2),
        ],
    )
    # 3: a bowtie (self-intersecting ring): filled even-odd, two triangles.
    items["street/scene_003"] = item(
        "/street/scene_003.jpg",
        320,
        240,
        [
            polygon("car", [(20, 20), (200, 200), (200, 20), (20, 200)], object_id=1),
            polygon("person", star(260, 120, 50, 20, n=5), object_id=2),
        ],
    )
    # 4: a NaN vertex and a null vertex (both dropped and reported).
    items["street/scene_004"] = item(
        "/street/scene_004.jpg",
        320,
        240,
        [
            polygon("car", [(30, 30), (150, 35), (float("nan"), 80), (160, 120), (25, 110)]),
            ann(
                "segment",
                "road",
                [
                    [
                        {"x": 0, "y": 180},
                        {"x": None, "y": 5},
                        {"x": 320, "y": 170},
                        {"x": 320, "y": 240},
                        {"x": 0, "y": 240},
                    ]
                ],
            ),
        ],
    )
    # 5: partly outside the image, negative coordinates (clipped in the record).
    items["street/scene_005"] = item(
        "/street/scene_005.jpg",
        320,
        240,
        [
            polygon("road", [(-50, 200), (400, 180), (400, 300), (-50, 300)]),
            polygon("car", [(-20.5, -10), (60, -10), (60, 50.5), (-20.5, 50.5)], object_id=4),
        ],
    )
    # 6: a binary (brush) annotation under a polygon of another label.
    yy, xx = np.mgrid[0:240, 0:320]
    blob = (xx - 120) ** 2 / 80**2 + (yy - 110) ** 2 / 50**2 <= 1
    items["street/scene_006"] = item(
        "/street/scene_006.jpg",
        320,
        240,
        [
            binary("tree", blob, (0, 200, 0), object_id=1),
            polygon("person", [(100, 60), (140, 60), (140, 200), (100, 200)], object_id=2),
        ],
    )
    # 7: many small polygons; objectId as int, digit string and missing.
    rng = np.random.default_rng(7)
    small = []
    for k in range(24):
        cx, cy = rng.uniform(20, 300), rng.uniform(20, 220)
        oid_value = [k + 1, str(k + 1), None][k % 3]
        small.append(polygon("plant", star(cx, cy, 14, 6, n=6, phase=k / 3), object_id=oid_value))
    items["fields/plot_001"] = item("/fields/plot_001.png", 320, 240, small)
    # 8: a spike (the ring doubles back on itself) and duplicate vertices.
    items["fields/plot_002"] = item(
        "/fields/plot_002.png",
        320,
        240,
        [
            polygon(
                "plant",
                [(50, 50), (150, 50), (150, 50), (150, 120), (250, 120), (150, 120), (50, 120)],
            ),
            polygon("weed", [(200, 150), (260, 150), (260, 150), (260, 210), (200, 210)]),
        ],
    )
    # 9: a hole touching the exterior, and a hole partly outside its exterior.
    items["fields/plot_003"] = item(
        "/fields/plot_003.png",
        320,
        240,
        [
            polygon(
                "plant",
                [(20, 20), (140, 20), (140, 140), (20, 140)],
                [(20, 60), (80, 40), (80, 100)],
            ),
            polygon(
                "weed",
                [(170, 20), (300, 20), (300, 140), (170, 140)],
                [(250, 60), (330, 60), (330, 100), (250, 100)],
            ),
        ],
    )
    # 10: the older export shape: `_id`, legacy flat coordinates (one ring, no nesting).
    items["fields/plot_004"] = item(
        "/fields/plot_004.png",
        320,
        240,
        [
            {
                **polygon("plant", [(10, 10), (100, 10), (55, 90)]),
                "coordinates": ring([(10, 10), (100, 10), (55, 90)]),
            },
            {
                k if k != "id" else "_id": v
                for k, v in polygon(
                    "weed", [(150.5, 150.5), (250.5, 150.5), (250.5, 200.5), (150.5, 200.5)]
                ).items()
            },
        ],
        id_key="_id",
    )
    # 11: a degenerate hole (two distinct vertices) that is dropped, half-pixel edges.
    items["fields/plot_005"] = item(
        "/fields/plot_005.png",
        320,
        240,
        [
            polygon(
                "plant",
                [(10.5, 10.5), (200.5, 10.5), (200.5, 150.5), (10.5, 150.5)],
                [(50, 50), (60, 60), (50, 50)],
            ),
        ],
    )
    # 12: polygons sharing an edge (partition exactly), a class and an ellipse (skipped).
    items["indoor/room_001"] = item(
        "/indoor/room_001.jpg",
        320,
        240,
        [
            polygon("floor", [(0, 160), (160, 160), (160, 240), (0, 240)], object_id=1),
            polygon("carpet", [(160, 160), (320, 160), (320, 240), (160, 240)], object_id=2),
            polygon("wall", [(0, 0), (320, 0), (320, 160), (0, 160)], object_id=3),
            ann("class", "indoor", []),
            ann(
                "ellipse",
                "lamp",
                {"center": {"x": 50, "y": 50, "z": 0}, "rx": 10, "ry": 5, "angle": 0},
            ),
        ],
    )
    # 13: a short video (16 frames, 8 fps): a car moving right, hidden behind something in
    # frames 7-8; a person that leaves at frame 8; a second car seen as two parts (objectId 4).
    items["clips/crossing_001"] = video_item()
    return items


_video_ids = iter(range(0xF000, 0xFFFF))


def track(label, object_id, frame, end_frame, states) -> dict:
    """A video annotation: ``states`` maps frame -> list of rings (or None: hidden)."""
    first = states[frame]
    snapshots = [
        {
            "frame": f,
            "fixed": True,
            "objectVisible": rings is not None,
            "label": label,
            "type": "segment",
            "attributes": {},
            "data": [ring(r) for r in (rings or first)],
        }
        for f, rings in sorted(states.items())
        if f != frame
    ]
    record = {
        "id": f"6650a1f0c0ffee{next(_video_ids):010x}",
        "datasetId": DATASET,
        "type": "segment",
        "label": label,
        "attributes": [],
        "coordinates": [ring(r) for r in first],
        "metadata": {
            "system": {
                "status": None,
                "startTime": frame / 8,
                "endTime": end_frame / 8,
                "frame": frame,
                "endFrame": end_frame,
                "objectId": object_id,
                "automated": False,
                "attributes": {},
                "isOpen": False,
                "snapshots_": snapshots,
            },
            "user": {},
        },
        "creator": "annotator@example.com",
        "createdAt": "2026-11-01T10:00:00.000Z",
        "updatedBy": "annotator@example.com",
        "updatedAt": "2026-11-02T10:00:00.000Z",
        "source": "ui",
    }
    return record


def box(x0, y0, x1, y1):
    return [[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]]


def video_item() -> dict:
    car = {f: box(2 + 3 * f, 20, 14 + 3 * f, 30) for f in (0, 3, 6, 9, 12)}
    car[7] = None  # hidden in frames 7 and 8, back at frame 9
    person = {2: box(50, 8, 56, 24), 5: box(46, 8, 52, 24)}
    front = {4: box(20, 34, 28, 44), 8: box(28, 34, 36, 44)}
    back = {4: box(31, 34, 40, 44), 8: box(39, 34, 48, 44)}
    annotations = [
        track("car", 1, 0, 15, car),
        track("person", 2, 2, 8, person),
        track("car", 4, 4, 11, front),
        track("car", 4, 4, 11, back),
    ]
    return {
        "id": f"6650a1f0c0ffee{next(_video_ids):010x}",
        "datasetId": DATASET,
        "filename": "/clips/crossing_001.webm",
        "dir": "/clips",
        "name": "crossing_001.webm",
        "type": "file",
        "hidden": False,
        "annotated": True,
        "metadata": {
            "fps": 8,
            "system": {
                "width": 64,
                "height": 48,
                "mimetype": "video/webm",
                "duration": 2,
                "nb_frames": None,
                "nb_frames_estimation": 16,
                "ffmpeg": {"nb_read_frames": "16", "avg_frame_rate": "8/1", "codec_name": "vp9"},
                "originalname": "crossing_001.webm",
            },
        },
        "createdAt": "2026-11-01T09:00:00.000Z",
        "annotations": annotations,
    }


def broken_items() -> dict[str, str]:
    good = item(
        "/ok_item.jpg",
        64,
        48,
        [
            polygon("car", [(4, 4), (40, 4), (40, 30), (4, 30)]),
            polygon("car", [(50, 5), (50, 5), (60, 5)]),  # degenerate: rejected, item still ok
        ],
    )
    unknown = item("/unknown_label.jpg", 64, 48, [polygon("spaceship", [(1, 1), (9, 1), (9, 9)])])
    no_size = item("/no_size.jpg", 64, 48, [polygon("car", [(1, 1), (9, 1), (9, 9)])])
    del no_size["metadata"]["system"]["width"]
    truncated = json.dumps(item("/truncated.jpg", 64, 48, [polygon("car", [(1, 1), (9, 1)])]))
    return {
        "ok_item": json.dumps(good, indent=2),
        "unknown_label": json.dumps(unknown, indent=2),
        "no_size": json.dumps(no_size, indent=2),
        "truncated": truncated[: len(truncated) // 2],
    }


def main() -> None:
    export = HERE / "export"
    shutil.rmtree(export, ignore_errors=True)
    for path, data in export_items().items():
        target = export / "json" / f"{path}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2) + "\n")
    broken = HERE / "broken"
    shutil.rmtree(broken, ignore_errors=True)
    for name, text in broken_items().items():
        target = broken / "json" / f"{name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    (broken / "labels.json").write_text(json.dumps({"car": 1, "person": 2}, indent=2) + "\n")


if __name__ == "__main__":
    main()
