"""The polygons-to-masks flow on a real Prefect API (the test harness), end to end."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from flows.polygons_to_masks import PREVIEW_ITEMS, polygons_to_masks_params
from polyburn.batching import batches_of
from polyburn.cli import main
from polyburn.encode import decode_mask
from polyburn.params import MaskOptions, RunParameters
from polyburn.sources import open_source
from tests.support.oracle import (
    EXAMPLES,
    decode_binary,
    expected_instance,
    expected_semantic,
    load_export,
    rasterio_oracle,
    raw_rings,
)

pytestmark = pytest.mark.usefixtures("prefect_api")
ALL_MODES = ["semantic", "instance", "binary"]
BATCH_SIZE = 3  # the example run's; its first batch holds fewer items than get a preview


def run(source, dest, **kwargs):
    options = MaskOptions(**kwargs.pop("options", {"modes": ALL_MODES}))
    state = polygons_to_masks_params(
        RunParameters(source=str(source), destination=str(dest), options=options, **kwargs),
        return_state=True,
    )
    return state, state.result(raise_on_failure=False)


def manifest(dest):
    return [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    dest = tmp_path_factory.mktemp("example-masks")
    state, summary = run(EXAMPLES / "export", dest, batch_size=BATCH_SIZE)
    return dest, state, summary


def test_example_run_completes_with_every_item_ok(example_run):
    dest, state, summary = example_run
    assert state.is_completed()
    assert summary["items"] == 13 and summary["failed"] == 0
    assert summary["repairs_by_kind"].keys() >= {
        "made_valid",
        "non_finite_vertices",
        "clipped",
        "duplicate_vertices",
        "degenerate_hole",
    }
    assert summary["skipped_by_type"] == {"box": 1, "class": 1, "ellipse": 1, "point": 1}


def artifact_data(state, key: str) -> str:
    """The data of the artifact ``key`` of the flow run behind ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    wanted = ArtifactFilter(
        key=ArtifactFilterKey(any_=[key]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
    )
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=wanted)
    return artifact.data


def test_the_preview_artifact_shows_the_runs_first_items_whatever_their_kind(example_run):
    """The example's first four items, though the run's batches are smaller than that: the
    video by its first frame written, then three images; each with its semantic picture, the
    legend of exactly the labels its mask holds, and its instance picture."""
    dest, state, _ = example_run
    refs = list(open_source(str(EXAMPLES / "export")).list_items())
    assert len(batches_of(refs, BATCH_SIZE)[0]) < PREVIEW_ITEMS == 4
    markdown = artifact_data(state, "polyburn-preview")
    sections = markdown.split("\n### ")[1:]
    headings = [section.split("\n", 1)[0] for section in sections]
    assert headings == [
        "`clips/crossing_001` (frame 0)",
        "`fields/plot_001`",
        "`fields/plot_002`",
        "`fields/plot_003`",
    ]
    names = {i: label for label, i in json.loads((dest / "label_map.json").read_text()).items()}
    for heading, section in zip(headings, sections, strict=True):
        path = heading.split("`")[1]
        key = f"semantic/{path}/000000.png" if path.startswith("clips/") else f"semantic/{path}.png"
        written = decode_mask((dest / key).read_bytes(), "png")
        legend = re.findall(r"\) (\S+) \((\d+)\)", section)
        assert legend == [(names[i], str(i)) for i in np.unique(written) if i], path
        assert section.count(f"![{path} semantic](data:image/png;base64,") == 1
        assert section.count(f"![{path} instance](data:image/png;base64,") == 1


def test_label_map_is_the_sorted_labels_one_based(example_run):
    dest, _, _ = example_run
    label_map = json.loads((dest / "label_map.json").read_text())
    items = load_export(EXAMPLES / "export")
    labels = sorted(
        {
            a["label"]
            for i in items.values()
            for a in i["annotations"]
            if a["type"] in ("segment", "binary")
        }
    )
    assert label_map == {label: k for k, label in enumerate(labels, start=1)}


def test_semantic_masks_are_pixel_exact_against_the_rasterio_oracle(example_run):
    dest, _, _ = example_run
    label_map = json.loads((dest / "label_map.json").read_text())
    for path, item_json in load_export(EXAMPLES / "export", frames=True).items():
        got = decode_mask((dest / "semantic" / f"{path}.png").read_bytes(), "png")
        assert (got == expected_semantic(item_json, label_map)).all(), path


def test_instance_masks_hold_object_ids_and_binary_masks_are_pixel_exact(example_run):
    dest, _, _ = example_run
    for path, item_json in load_export(EXAMPLES / "export", frames=True).items():
        h = item_json["metadata"]["system"]["height"]
        w = item_json["metadata"]["system"]["width"]
        instance = decode_mask((dest / "instance" / f"{path}.png").read_bytes(), "png")
        table = json.loads((dest / "instance" / f"{path}.json").read_text())["instances"]
        expected, members = expected_instance(item_json)
        assert (instance == expected).all(), path
        assert {row["id"]: row["annotations"] for row in table} == members, path
        per_label: dict[str, np.ndarray] = {}
        for a in item_json["annotations"]:
            if a["type"] == "segment":
                mask = rasterio_oracle(raw_rings(a), h, w)
            elif a["type"] == "binary":
                mask = decode_binary(a["coordinates"])
            else:
                continue
            per_label[a["label"]] = per_label.get(a["label"], np.zeros((h, w), bool)) | mask
        for label, mask in per_label.items():
            got = decode_mask((dest / "binary" / label / f"{path}.png").read_bytes(), "png")
            assert (got == mask).all(), (path, label)


def test_manifest_lists_every_item_with_checksummed_outputs(example_run):
    import hashlib

    dest, _, _ = example_run
    records = manifest(dest)
    assert [r["path"] for r in records] == sorted(load_export(EXAMPLES / "export"))
    for record in records:
        assert record["status"] == "ok" and record["revision"]
        for output in record["outputs"]:
            data = (dest / output["key"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == output["sha256"]
            assert len(data) == output["bytes"]
    nan_item = next(r for r in records if r["path"] == "street/scene_004")
    assert [r["kind"] for r in nan_item["repairs"]] == ["non_finite_vertices"] * 2
    assert not list(dest.rglob("*.part"))


def test_rerun_writes_nothing_and_a_changed_item_rewrites_only_itself(tmp_path, example_run):
    source = tmp_path / "export"
    shutil.copytree(EXAMPLES / "export", source)
    dest = tmp_path / "masks"
    _, first = run(source, dest)
    assert first["outputs_written"] > 0
    before = {r["path"]: r for r in manifest(dest)}
    _, second = run(source, dest)
    assert second["outputs_written"] == 0 and second["failed"] == 0
    assert {r["path"]: r for r in manifest(dest)} == before  # not even a record rewritten

    # Drop the only person annotation of scene_003: its masks change, its person mask goes.
    path = source / "json" / "street" / "scene_003.json"
    item = json.loads(path.read_text())
    item["annotations"] = [a for a in item["annotations"] if a["label"] != "person"]
    path.write_text(json.dumps(item))
    assert (dest / "binary/person/street/scene_003.png").exists()
    _, third = run(source, dest)
    after = {r["path"]: r for r in manifest(dest)}
    assert [p for p in after if after[p] != before[p]] == ["street/scene_003"]
    assert all(o["written"] for o in after["street/scene_003"]["outputs"])
    assert third["outputs_written"] == len(after["street/scene_003"]["outputs"])
    assert not (dest / "binary/person/street/scene_003.png").exists()
    assert json.loads((dest / "label_map.json").read_text())["person"] == 5  # ids stay put


def test_broken_items_fail_alone_and_are_reported(tmp_path):
    dest = tmp_path / "masks"
    state, summary = run(
        EXAMPLES / "broken",
        dest,
        labels=str(EXAMPLES / "broken" / "labels.json"),
        options={"modes": ["semantic"]},
    )
    assert state.is_completed()
    errors = {f["path"]: f["error"] for f in summary["failures"]}
    assert set(errors) == {"no_size", "truncated", "unknown_label"}
    assert errors["no_size"] == "no_size [metadata.system.width]: image width is missing"
    assert errors["truncated"].startswith("truncated: invalid or truncated JSON")
    assert "'spaceship'" in errors["unknown_label"]
    records = {r["path"]: r for r in manifest(dest)}
    assert records["ok_item"]["status"] == "ok"
    assert records["ok_item"]["problems"][0]["reason"].startswith("exterior ring 0 has 2 distinct")
    assert (dest / "semantic" / "ok_item.png").exists()
    assert len(records) == 4


def test_strict_mode_fails_the_flow_run(tmp_path):
    state, summary = run(
        EXAMPLES / "broken", tmp_path / "m", strict=True, options={"modes": ["semantic"]}
    )
    assert state.is_failed()
    assert summary["failed"] == 2  # without a label map every label gets an id


def test_cli_run_exit_codes_and_summary(tmp_path, capsys):
    assert main(["run", str(EXAMPLES / "export"), str(tmp_path / "a"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "13 items: 13 ok, 0 failed" in out and "repairs:" in out
    code = main(
        [
            "run",
            str(EXAMPLES / "broken"),
            str(tmp_path / "b"),
            "--no-progress",
            "--labels",
            str(EXAMPLES / "broken" / "labels.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED no_size [metadata.system.width]: image width is missing" in out
    assert "Traceback" not in out


def test_cli_rejects_bad_options_before_starting_anything(tmp_path, capsys):
    assert main(["run", str(EXAMPLES / "export"), str(tmp_path), "--mode", "semantic,rainbow"]) == 2
    assert "invalid options.modes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["run", str(EXAMPLES / "export"), str(tmp_path), "--instance-id", "label"])
    assert exited.value.code == 2 and "invalid choice: 'label'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "labels.json").write_text('{"car": "one"}')
    assert (
        main(
            [
                "run",
                str(EXAMPLES / "export"),
                str(tmp_path),
                "--labels",
                str(tmp_path / "labels.json"),
            ]
        )
        == 2
    )
    assert "id of 'car' must be an integer" in capsys.readouterr().err


def test_cli_passes_the_instance_id_choice_to_the_run_parameters():
    from polyburn.cli import _parameters, _parser

    def options(*extra):
        return _parameters(_parser().parse_args(["run", "src", "dst", *extra])).options

    assert options().instance_id == "object"
    assert options("--instance-id", "shape").instance_id == "shape"


def test_cli_validate_reports_without_writing(tmp_path, capsys, monkeypatch):
    shutil.copytree(EXAMPLES / "broken", tmp_path / "broken")
    monkeypatch.chdir(tmp_path)  # where a default output folder would go

    def tree() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")}

    before = tree()
    assert main(["validate", "broken"]) == 1
    assert tree() == before
    out = capsys.readouterr().out
    assert "FAILED truncated: invalid or truncated JSON" in out
    assert "REJECTED ok_item annotation" in out
    assert "4 items: 2 failed, 1 annotations rejected" in out


@pytest.mark.parametrize("fmt", ["tif", "npy"])
def test_other_formats_hold_the_same_pixels(tmp_path, example_run, fmt):
    dest, _, _ = example_run
    _, summary = run(
        EXAMPLES / "export", tmp_path / fmt, options={"modes": ["semantic"], "format": fmt}
    )
    assert summary["failed"] == 0
    for png in (dest / "semantic").rglob("*.png"):
        rel = png.relative_to(dest / "semantic").with_suffix(f".{fmt}")
        got = decode_mask((tmp_path / fmt / "semantic" / rel).read_bytes(), fmt)
        assert (got == decode_mask(png.read_bytes(), "png")).all()


def test_label_scan_in_the_worker_pool_finds_what_the_serial_scan_finds(tmp_path):
    """Labels are collected in the burn pool, 50 items per job; a label that only one item far
    down the listing has is found, and an unreadable item is skipped (reported when burned)."""
    import json as _json

    from polyburn import parallel
    from polyburn.pipeline import scan_labels
    from polyburn.sources.local import LocalSource
    from tests.support.generate import write_export

    root = write_export(tmp_path / "export", 130, seed=3)
    files = sorted((root / "json").rglob("*.json"))
    rare = _json.loads(files[117].read_text())
    rare["annotations"][0]["label"] = "only-here"
    files[117].write_text(_json.dumps(rare))
    files[5].write_text("{ not json")
    source = LocalSource(root)
    refs = list(source.list_items())
    serial = scan_labels(refs, source, 10**8)
    pooled = parallel.collect_labels(refs, source, 10**8, workers=2)
    assert pooled == serial and "only-here" in pooled and len(pooled) > 2


@pytest.mark.parametrize("instance_id", ["object", "shape"])
def test_instance_id_option_reaches_the_burn_workers(tmp_path, instance_id):
    """``options.instance_id`` crosses into the worker processes: a car in two parts (objectId
    40) is one instance there, or two with ``shape``; the records carry the objectId reports."""
    from polyburn import parallel
    from polyburn.destinations.local import LocalDestination
    from polyburn.sources.local import LocalSource

    def polygon(aid, x0, x1, object_id):
        ring = [{"x": x0, "y": 0}, {"x": x1, "y": 0}, {"x": x1, "y": 4}, {"x": x0, "y": 4}]
        return {
            "id": aid,
            "type": "segment",
            "label": "car",
            "coordinates": [ring],
            "metadata": {"system": {"objectId": object_id}},
        }

    for n in range(3):
        item = {
            "id": f"item{n}",
            "metadata": {"system": {"width": 8, "height": 4}},
            "annotations": [
                polygon("left", 0, 3, "40"),
                polygon("right", 4, 7, 40),
                polygon("odd", 7, 8, -1),
            ],
        }
        path = tmp_path / "export" / "json" / f"img_{n}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(item))
    source, dest = LocalSource(tmp_path / "export"), LocalDestination(tmp_path / "masks")
    options = MaskOptions(modes=["instance"], instance_id=instance_id)
    records = parallel.process_items(
        list(source.list_items()), source, dest, options, {"car": 1}, workers=2
    )
    assert [r.status for r in records] == ["ok"] * 3
    row = {"object": [40, 40, 40, 0, 40, 40, 40, 41], "shape": [1, 1, 1, 0, 2, 2, 2, 3]}
    for n in range(3):
        instance = decode_mask((tmp_path / f"masks/instance/img_{n}.png").read_bytes(), "png")
        assert (instance == row[instance_id]).all()
    kinds = [[r["kind"] for r in record.repairs] for record in records]
    assert kinds == ([["object_id_unusable"]] if instance_id == "object" else [[]]) * 3
