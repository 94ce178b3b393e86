"""Every loss is named: rejected annotations and items with nothing to burn, in the CLI summary,
``--json``, the failures artifact's markdown and the records; ``--skip-empty`` leaves such items
without masks. The runs go through the real CLI on the Prefect test harness."""

from __future__ import annotations

import io
import json
from importlib.metadata import version
from pathlib import Path

import pytest
from prefect.artifacts import Artifact

from flows.polygons_to_masks import polygons_to_masks_params
from polyburn import parallel
from polyburn.cli import main
from polyburn.losses import MAX_LISTED_LOSSES, RejectionLog
from polyburn.manifest import RunCounts
from polyburn.params import MaskOptions, RunParameters
from polyburn.records import ItemRecord
from polyburn.report import LISTED_LOSSES, failures_markdown, losses_text, write_json_summary

HOSTILE_REJECTS = LISTED_LOSSES + 5  # more than a summary names
VERSION = version("polyburn")  # the installed package's (tests/test_version.py: pyproject's)


def _item(path: str, annotations: list[dict], width: int = 32, height: int = 24) -> dict:
    return {
        "id": f"id-{path}",
        "filename": f"/{path}.jpg",
        "name": f"{path}.jpg",
        "metadata": {"system": {"width": width, "height": height}},
        "annotations": annotations,
    }


def _square(annotation_id: str, label: str, x: float = 2, y: float = 2, size: float = 8) -> dict:
    ring = [{"x": x, "y": y}, {"x": x + size, "y": y}, {"x": x + size, "y": y + size}]
    ring.append({"x": x, "y": y + size})
    return {"id": annotation_id, "type": "segment", "label": label, "coordinates": [ring]}


def _degenerate(annotation_id: str, label: str) -> dict:
    """Two distinct vertices: rejected, never burned."""
    ring = [{"x": 1, "y": 1}, {"x": 5, "y": 5}, {"x": 1, "y": 1}]
    return {"id": annotation_id, "type": "segment", "label": label, "coordinates": [ring]}


def _other(annotation_id: str, kind: str) -> dict:
    return {"id": annotation_id, "type": kind, "label": "car", "coordinates": []}


@pytest.fixture()
def hostile_export(tmp_path: Path) -> Path:
    """good: one square; hostile: a square and HOSTILE_REJECTS degenerate polygons; boxes: a
    box and a point only; bare: no annotation at all."""
    root = tmp_path / "export"
    items = {
        "good": [_square("g1", "car")],
        "hostile": [_square("h-ok", "road")]
        + [_degenerate(f"h{k:02d}", f"lbl{k % 3}") for k in range(HOSTILE_REJECTS)],
        "boxes": [_other("b1", "box"), _other("b2", "point")],
        "bare": [],
    }
    for path, annotation_list in items.items():
        file = root / "json" / f"{path}.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(_item(path, annotation_list)))
    return root


def _manifest(dest: Path) -> dict[str, dict]:
    lines = (dest / "manifest.jsonl").read_text().splitlines()
    return {record["path"]: record for record in map(json.loads, lines)}


def _record(path: str, problems: int = 0, shapes: int = 1, **extra) -> ItemRecord:
    problem = {"annotation": "a", "field": "coordinates", "label": "car", "reason": "degenerate"}
    return ItemRecord(
        path,
        status="ok",
        error=None,
        shapes=shapes,
        problems=[dict(problem, annotation=f"{path}-{k}") for k in range(problems)],
        **extra,
    )


@pytest.mark.usefixtures("prefect_api")
def test_cli_summary_names_each_rejection_and_each_item_with_nothing_to_burn(
    hostile_export, tmp_path, capsys, monkeypatch
):
    dest = tmp_path / "masks"
    code = main(["run", str(hostile_export), str(dest), "--no-progress", "--mode", "semantic"])
    out = capsys.readouterr().out
    assert code == 0
    rejected = [line for line in out.splitlines() if line.startswith("REJECTED ")]
    assert len(rejected) == LISTED_LOSSES
    for k in range(LISTED_LOSSES):  # path, annotation id, label, field and reason
        assert (
            f"REJECTED hostile annotation h{k:02d} (lbl{k % 3}) [coordinates]: exterior ring 0 "
            "has 2 distinct" in out
        )
    more = HOSTILE_REJECTS - LISTED_LOSSES
    assert (
        f"... and {more} more rejected annotations, see the manifest {dest}/manifest.jsonl" in out
    )
    assert f"{HOSTILE_REJECTS} rejected" in out
    nothing = next(line for line in out.splitlines() if line.startswith("NOTHING TO BURN"))
    assert "in 2 item(s), all-background masks written" in nothing
    assert "bare (no annotation)" in nothing and "boxes (box 1, point 1)" in nothing
    assert (dest / "semantic" / "boxes.png").exists() and (dest / "semantic" / "bare.png").exists()
    records = _manifest(dest)
    assert [p["label"] for p in records["hostile"]["problems"]][:3] == ["lbl0", "lbl1", "lbl2"]
    assert not records["boxes"].get("skipped_empty")

    # --json carries every rejection, streamed from the run's records: also past what the run
    # keeps in memory for its summary
    monkeypatch.setattr("polyburn.manifest.MAX_LISTED_LOSSES", 5)
    assert main(["run", str(hostile_export), str(dest), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rejected"] == HOSTILE_REJECTS == len(summary["rejections"])
    assert [r["annotation"] for r in summary["rejections"]] == [
        f"h{k:02d}" for k in range(HOSTILE_REJECTS)
    ]
    assert {r["path"] for r in summary["rejections"]} == {"hostile"}
    assert summary["empty_items"] == 2 and summary["empty_items_skipped"] == 0
    assert [e["path"] for e in summary["empty"]] == ["bare", "boxes"]
    assert summary["polyburn_version"] == VERSION
    monkeypatch.undo()

    # --skip-empty: no masks for them, the earlier ones removed, the record says why
    code = main(["run", str(hostile_export), str(dest), "--no-progress", "--skip-empty"])
    out = capsys.readouterr().out
    assert code == 0
    assert "NOTHING TO BURN in 2 item(s), no masks written (skip-empty)" in out
    assert not (dest / "semantic" / "boxes.png").exists()
    assert not (dest / "semantic" / "bare.png").exists()
    assert (dest / "semantic" / "good.png").exists() and (
        dest / "semantic" / "hostile.png"
    ).exists()
    records = _manifest(dest)
    for path in ("boxes", "bare"):
        assert records[path]["status"] == "ok" and records[path]["skipped_empty"] is True
        assert records[path]["outputs"] == []
    assert "skipped_empty" not in records["good"] and records["good"]["outputs"]


@pytest.fixture()
def no_pool_left():
    """Discard the shared burn pool this test started, so later tests start with none."""
    yield
    if parallel._pool is not None:
        parallel._discard_pool(parallel._pool)


@pytest.mark.usefixtures("prefect_api", "no_pool_left")
def test_skip_empty_holds_in_the_burn_pool_and_the_artifacts_name_every_loss(
    hostile_export, tmp_path
):
    """Items burned in worker processes get the option too (it crosses as a plain tuple); the
    run's summary table and failures artifact count and name the losses."""
    state = polygons_to_masks_params(
        RunParameters(
            source=str(hostile_export),
            destination=str(tmp_path / "masks"),
            workers=2,
            options=MaskOptions(skip_empty=True),
        ),
        return_state=True,
    )
    summary = state.result()
    assert summary["empty_items_skipped"] == summary["empty_items"] == 2
    records = _manifest(tmp_path / "masks")
    assert records["boxes"]["skipped_empty"] and records["bare"]["skipped_empty"]
    # records written in the worker processes name the version too
    assert {r["polyburn_version"] for r in records.values()} == {VERSION}
    assert sorted(p.name for p in (tmp_path / "masks" / "semantic").iterdir()) == [
        "good.png",
        "hostile.png",
    ]

    # the run's artifacts on the Prefect API say the same
    table = Artifact.get("polyburn-summary")
    assert table.flow_run_id == state.state_details.flow_run_id
    rows = {row["metric"]: row["value"] for row in json.loads(table.data)}
    assert rows["annotations rejected"] == HOSTILE_REJECTS
    assert rows["items with nothing to burn"] == rows["items left without masks (skip_empty)"] == 2
    assert rows["polyburn version"] == VERSION
    failures = Artifact.get("polyburn-failures").data
    assert failures.count("| `hostile` | `h") == LISTED_LOSSES
    assert f"… and {HOSTILE_REJECTS - LISTED_LOSSES} more, see the manifest." in failures
    assert "* `bare (no annotation)`" in failures and "* `boxes (box 1, point 1)`" in failures


def test_counts_keep_a_capped_list_and_forget_a_replaced_record():
    counts = RunCounts()
    items = MAX_LISTED_LOSSES // 2 + 10
    for k in range(items):
        counts.add(_record(f"item{k:05d}", problems=3))
    counts.add(_record("empty", shapes=0, skipped={"box": 2}, skipped_empty=True))
    summary = counts.as_dict(1.0)
    assert summary["rejected"] == 3 * items
    assert len(summary["rejections"]) == MAX_LISTED_LOSSES
    assert summary["rejections"][0] == {
        "path": "item00000",
        "annotation": "item00000-0",
        "label": "car",
        "field": "coordinates",
        "reason": "degenerate",
    }
    assert summary["empty_items"] == 1 and summary["empty_items_skipped"] == 1
    assert summary["empty"] == [
        {"path": "empty", "skipped": {"box": 2}, "rejected": 0, "skipped_empty": True}
    ]

    replaced = _record("item00000", problems=3)
    counts.add(replaced, sign=-1)
    counts.add(_record("item00000", problems=0))
    summary = counts.as_dict(1.0)
    assert summary["rejected"] == 3 * items - 3
    assert all(r["path"] != "item00000" for r in summary["rejections"])
    counts.add(_record("empty", shapes=0, skipped={"box": 2}, skipped_empty=True), sign=-1)
    assert counts.as_dict(1.0)["empty"] == [] and counts.as_dict(1.0)["empty_items"] == 0


def test_the_failures_markdown_lists_rejections_then_counts_the_rest():
    counts = RunCounts()
    counts.add(_record("a", problems=LISTED_LOSSES + 7))
    counts.add(_record("b", shapes=0, skipped={"point": 1}))
    summary = counts.summary(1.0)
    markdown = failures_markdown(summary, "masks/manifest.jsonl")
    rows = [line for line in markdown.splitlines() if line.startswith("| `a` |")]
    assert len(rows) == LISTED_LOSSES
    assert "| `a` | `a-0` | car | degenerate [coordinates] |" in markdown
    assert "… and 7 more, see the manifest." in markdown
    assert "## Items with nothing to burn: 1" in markdown and "* `b (point 1)`" in markdown
    lines = losses_text(summary, "masks/manifest.jsonl", limit=5)
    assert [line.startswith("REJECTED a annotation a-") for line in lines[:5]] == [True] * 5
    assert lines[5] == (
        f"... and {LISTED_LOSSES + 2} more rejected annotations, see the manifest "
        "masks/manifest.jsonl"
    )


def test_json_summary_streams_every_rejection_from_the_log():
    records = [_record(f"p{k}", problems=k) for k in range(6)]
    log = RejectionLog()
    log.take(iter(records))
    counts = RunCounts()
    for record in records:
        counts.add(record)
    summary = counts.as_dict(2.0)
    out = io.StringIO()
    write_json_summary(summary, log, out)
    log.close()
    parsed = json.loads(out.getvalue())
    assert parsed == summary  # under the cap the listed rejections are all of them
    assert len(parsed["rejections"]) == sum(range(6))
    empty = io.StringIO()
    write_json_summary({}, [], empty)
    assert json.loads(empty.getvalue()) == {"rejections": []}

    # streamed: each rejection is written before the next one is asked for
    streamed = io.StringIO()

    def rejections():
        for k in range(3):
            if k:
                assert f'"annotation": "a{k - 1}"' in streamed.getvalue()
            yield {"path": "p", "annotation": f"a{k}"}

    write_json_summary(summary, rejections(), streamed)
    assert [r["annotation"] for r in json.loads(streamed.getvalue())["rejections"]] == [
        "a0",
        "a1",
        "a2",
    ]
