"""Prefect's part: parameters, caching and resumption, artifacts, incremental runs, task runners.
All on a real Prefect API (the session's test harness)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from prefect.artifacts import Artifact
from prefect.exceptions import ParameterTypeError
from prefect.variables import Variable
from pydantic import ValidationError

from flows.polygons_to_masks import polygons_to_masks, polygons_to_masks_params, watermark_name
from polyburn.batching import batches_of
from polyburn.destinations.local import LocalDestination
from polyburn.params import MaskOptions, RunParameters
from polyburn.sources import open_source
from polyburn.state import current_records, unfinished_items
from tests.support.oracle import EXAMPLES, same_output

pytestmark = pytest.mark.usefixtures("prefect_api")


def run(**kwargs):
    state = polygons_to_masks_params(RunParameters(**kwargs), return_state=True)
    return state, state.result(raise_on_failure=False)


@pytest.fixture
def export(tmp_path):
    source = tmp_path / "export"
    shutil.copytree(EXAMPLES / "export", source)
    return source


def test_bad_parameters_are_rejected_before_any_work_naming_the_field(tmp_path):
    bad = {
        "source": str(EXAMPLES / "export"),
        "destination": str(tmp_path / "m"),
        "options": {"modes": ["semantic", "rainbow"]},
    }
    with pytest.raises(ParameterTypeError, match="modes"):
        polygons_to_masks_params(params=bad)
    with pytest.raises(ParameterTypeError, match="batch_size"):
        polygons_to_masks_params(params={**bad, "options": {}, "batch_size": 0})
    # The public flow: a wrong type or choice is Prefect's parameter error, a value out of the
    # field's limits the model's, both before any work.
    where = {"source": bad["source"], "destination": bad["destination"]}
    with pytest.raises(ParameterTypeError, match="modes"):
        polygons_to_masks(**where, modes=["semantic", "rainbow"])
    with pytest.raises(ValidationError, match="batch_size"):
        polygons_to_masks(**where, batch_size=0)
    assert not (tmp_path / "m").exists()


def test_the_public_flow_takes_each_field_as_a_parameter_and_runs_it(tmp_path):
    """Flat parameters reach the run as one RunParameters: the mask options among them."""
    state = polygons_to_masks(
        source=str(EXAMPLES / "export"),
        destination=str(tmp_path / "m"),
        modes=["instance"],
        instance_id="shape",
        item_ids=["street/scene_001"],
        return_state=True,
    )
    summary = state.result()
    assert (summary["items"], summary["ok"]) == (1, 1)
    assert (tmp_path / "m" / "instance" / "street" / "scene_001.png").is_file()
    assert not (tmp_path / "m" / "semantic").exists()


def test_the_instance_id_choice_is_part_of_the_batch_cache_key():
    from polyburn.model import ItemRef
    from tasks.masks import batch_cache_key

    def key(options: MaskOptions) -> str | None:
        parameters = {
            "refs": [ItemRef("i1", "street/scene_001", "json/street/scene_001.json", "rev-1")],
            "source_uri": "src",
            "destination_uri": "dst",
            "options": options,
            "label_map": {"car": 1},
        }
        return batch_cache_key(None, parameters)

    default = MaskOptions(modes=["instance"])
    assert key(default) == key(MaskOptions(modes=["instance"], instance_id="object"))
    assert key(default) != key(MaskOptions(modes=["instance"], instance_id="shape"))


def batches(export: Path, size: int) -> list[tuple[str, ...]]:
    """The run's batches of the export, as tuples of item paths."""
    refs = sorted(open_source(str(export)).list_items(), key=lambda ref: ref.path)
    return [tuple(ref.path for ref in batch) for batch in batches_of(refs, size)]


def test_rerun_is_served_from_cache_and_redoes_only_what_changed(export, tmp_path):
    dest = tmp_path / "masks"
    _, first = run(source=str(export), destination=str(dest), batch_size=4)
    assert first["cached_batches"] == 0 and first["outputs_written"] > 0
    assert len(batches(export, 4)) >= 3

    # what such a re-run costs: bench/cached_rerun.py
    _, second = run(source=str(export), destination=str(dest), batch_size=4)
    assert second["cached_batches"] == len(batches(export, 4)) and second["outputs_written"] == 0
    assert second["items"] == 13 and second["failed"] == 0

    # One changed item: only its batch runs again, and only its record and mask change.
    before = {r["path"]: r for r in third_records(dest)}
    item = export / "json" / "street" / "scene_002.json"
    item.write_text(item.read_text().replace('"x": 280,', '"x": 279,'))
    _, third = run(source=str(export), destination=str(dest), batch_size=4)
    assert third["cached_batches"] == len(batches(export, 4)) - 1
    assert third["outputs_written"] == 1
    after = {r["path"]: r for r in third_records(dest)}
    assert [p for p in after if content(after[p]) != content(before[p])] == ["street/scene_002"]
    (output,) = after["street/scene_002"]["outputs"]
    assert (
        output["written"] and output["sha256"] != before["street/scene_002"]["outputs"][0]["sha256"]
    )

    # An item added before all others: batch boundaries follow the item paths, not positions,
    # so the later batches are the same and come from the cache (how few batches change at
    # realistic sizes: tests/test_batching.py).
    old = batches(export, 4)
    added = export / "json" / "aaa" / "added.json"
    added.parent.mkdir()
    added.write_text(item.read_text())
    new = batches(export, 4)
    kept = [batch for batch in new if batch in old]
    assert kept and new[0][0] == "aaa/added"
    _, fifth = run(source=str(export), destination=str(dest), batch_size=4)
    assert fifth["cached_batches"] == len(kept) and fifth["items"] == 14
    assert (dest / "semantic" / "aaa" / "added.png").exists()
    added.unlink()
    added.parent.rmdir()

    # A wiped destination is refilled, not taken from the cache.
    shutil.rmtree(dest)
    _, fourth = run(source=str(export), destination=str(dest), batch_size=4)
    assert fourth["cached_batches"] == 0
    assert (dest / "semantic" / "street" / "scene_002.png").exists()


def content(record: dict) -> dict:
    """A record without what changes whenever its item is processed again (time, written)."""
    outputs = [{k: v for k, v in o.items() if k != "written"} for o in record.get("outputs", [])]
    return {**{k: v for k, v in record.items() if k != "seconds"}, "outputs": outputs}


def third_records(dest):
    return [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]


def test_run_artifacts_show_counts_failures_progress_and_previews(tmp_path):
    state, summary = run(
        source=str(EXAMPLES / "broken"),
        destination=str(tmp_path / "m"),
        labels=str(EXAMPLES / "broken" / "labels.json"),
    )
    flow_run_id = state.state_details.flow_run_id
    table = Artifact.get("polyburn-summary")
    assert table.flow_run_id == flow_run_id
    rows = {row["metric"]: row["value"] for row in json.loads(table.data)}
    assert rows["items"] == 4 and rows["items failed"] == 3 and rows["annotations rejected"] == 1
    failures = Artifact.get("polyburn-failures")
    assert "`no_size`" in failures.data and "image width is missing" in failures.data
    assert "manifest.jsonl" in failures.data
    progress = Artifact.get("polyburn-progress")
    assert progress.type == "progress" and float(progress.data) == 100.0
    preview = Artifact.get("polyburn-preview").data  # all four items, the failed ones too
    assert preview.count("\n### `") == 4
    assert preview.count(" semantic](data:image/png;base64,") == 1  # the one item that burned
    assert "### `ok_item`\n\n| semantic | labels |" in preview
    assert preview.count("Failed: no masks (see the polyburn-failures artifact).") == 3


def test_incremental_runs_process_only_changed_items(export, tmp_path):
    dest = tmp_path / "masks"
    name = watermark_name(str(export), str(dest))
    _, first = run(source=str(export), destination=str(dest), incremental=True)
    assert first["items"] == 13
    mark = Variable.get(name)
    assert mark is not None
    time.sleep(0.05)
    item = export / "json" / "indoor" / "room_001.json"
    item.write_text(item.read_text())  # touched: changed since the watermark
    _, second = run(source=str(export), destination=str(dest), incremental=True)
    assert second["items"] == 1
    assert Variable.get(name) > mark
    assert not (dest / "manifest.jsonl").exists()  # only full runs write it by default

    # the nightly's setting: the dataset files follow the item's new subset
    data = json.loads(item.read_text())
    data["metadata"]["system"]["tags"] = {"validation": True}
    item.write_text(json.dumps(data))
    _, third = run(
        source=str(export), destination=str(dest), incremental=True, refresh_dataset_files=True
    )
    assert third["items"] == 1
    assert "indoor/room_001" in (dest / "splits/validation.txt").read_text().splitlines()
    assert len((dest / "manifest.jsonl").read_text().splitlines()) == 13
    assert len(list((dest / "splits").glob("*.txt"))) == 4


def test_item_ids_limit_a_run_to_those_items(tmp_path):
    _, summary = run(
        source=str(EXAMPLES / "export"),
        destination=str(tmp_path / "m"),
        item_ids=["street/scene_003", "fields/plot_001"],
    )
    assert summary["items"] == 2
    assert sorted(p.name for p in (tmp_path / "m" / "semantic").rglob("*.png")) == [
        "plot_001.png",
        "scene_003.png",
    ]


def test_dask_runner_gives_output_identical_to_threads(tmp_path):
    pytest.importorskip("prefect_dask")
    from distributed import LocalCluster

    options = MaskOptions(modes=["semantic", "instance", "binary"])
    _, threads = run(
        source=str(EXAMPLES / "export"),
        destination=str(tmp_path / "threads"),
        options=options,
        batch_size=3,
    )
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        _, dask = run(
            source=str(EXAMPLES / "export"),
            destination=str(tmp_path / "dask"),
            options=options,
            batch_size=3,
            task_runner="dask",
            dask_address=cluster.scheduler_address,
        )
    assert dask["failed"] == threads["failed"] == 0

    def tree(root: Path) -> list[Path]:  # but the staging folders, named after their process
        return sorted(
            p.relative_to(root)
            for p in root.rglob("*")
            if p.relative_to(root).parts[:2] != (".polyburn", "tmp")
        )

    a, b = tree(tmp_path / "threads"), tree(tmp_path / "dask")
    assert a == b
    for rel in a:
        if rel.suffix == ".png" or rel.name.endswith(".json") and "instance" in rel.parts:
            threads_bytes = (tmp_path / "threads" / rel).read_bytes()
            assert same_output(rel.name, (tmp_path / "dask" / rel).read_bytes(), threads_bytes)


def test_failed_items_of_a_cached_batch_are_processed_again(export, tmp_path):
    """A failure that is not in the input must not be replayed from the cache once the cause is
    gone. Here the item's file cannot be read as JSON during the first run while its listing
    (size and mtime: the revision its batch's cache key holds) stays the same, as a read error
    would; it fails before any of its outputs is touched, so its batch is cached with its failed
    record and nothing marks it unfinished."""
    dest = tmp_path / "masks"
    item = export / "json" / "fields" / "plot_001.json"
    original, listed = item.read_bytes(), item.stat()
    item.write_bytes(b" " * len(original))
    os.utime(item, ns=(listed.st_atime_ns, listed.st_mtime_ns))
    _, first = run(source=str(export), destination=str(dest))
    assert [f["path"] for f in first["failures"]] == ["fields/plot_001"]
    assert "invalid or truncated JSON" in first["failures"][0]["error"]
    assert not (dest / "semantic" / "fields" / "plot_001.png").exists()
    assert unfinished_items(LocalDestination(dest)) == set()

    item.write_bytes(original)
    os.utime(item, ns=(listed.st_atime_ns, listed.st_mtime_ns))
    _, second = run(source=str(export), destination=str(dest))
    assert second["cached_batches"] == len(batches(export, 100)) == 1  # with its failed record
    assert second["failed"] == 0 and second["ok"] == 13
    assert (dest / "semantic" / "fields" / "plot_001.png").is_file()
    assert second["outputs_written"] == 1  # its mask; the other items' came from the cache
    record = {r["path"]: r for r in third_records(dest)}["fields/plot_001"]
    assert record["status"] == "ok" and record["outputs"][0]["written"]
    # and the preview artifact shows it as this run left it (it is among the first four)
    preview = Artifact.get("polyburn-preview").data
    assert "### `fields/plot_001`\n\n| semantic |" in preview and "Failed" not in preview


def test_an_item_that_failed_while_writing_its_outputs_is_burned_again_not_cached(tmp_path):
    """An item that failed after its outputs started to change (here: its mask's path was
    blocked) leaves its lease abandoned, so it counts as unfinished and its batch is burned
    again rather than taken from the cache."""
    dest = tmp_path / "masks"
    blocker = dest / "semantic" / "street" / "scene_001.png"
    blocker.mkdir(parents=True)
    _, first = run(source=str(EXAMPLES / "export"), destination=str(dest))
    assert [f["path"] for f in first["failures"]] == ["street/scene_001"]
    assert unfinished_items(LocalDestination(dest)) == {"street/scene_001"}
    blocker.rmdir()
    _, second = run(source=str(EXAMPLES / "export"), destination=str(dest))
    assert second["cached_batches"] == 0
    assert second["failed"] == 0 and blocker.is_file()
    records = {r["path"]: r for r in third_records(dest)}
    assert records["street/scene_001"]["status"] == "ok"


def test_partial_runs_update_the_current_manifest_and_forget_deleted_items(export, tmp_path):
    dest = tmp_path / "masks"
    run(source=str(export), destination=str(dest))
    snapshot = (dest / "manifest.jsonl").read_bytes()
    (export / "json" / "street" / "scene_005.json").unlink()
    _, summary = run(
        source=str(export), destination=str(dest), item_ids=["street/scene_001", "street/scene_005"]
    )
    assert summary["items"] == 1 and summary["removed_items"] == ["street/scene_005"]
    assert (dest / "manifest.jsonl").read_bytes() == snapshot  # only full runs write it
    with current_records(LocalDestination(dest), tmp_path) as spool:
        spool.write_manifest(tmp_path / "current.jsonl")
    lines = (tmp_path / "current.jsonl").read_text().splitlines()
    paths = [json.loads(line)["path"] for line in lines]
    assert len(paths) == 12 and "street/scene_005" not in paths and "street/scene_006" in paths
    assert not (dest / "semantic" / "street" / "scene_005.png").exists()


def burn_tags(state) -> list[list[str]]:
    """The tags of the burn-batch task runs of the flow run behind ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    return [sorted(r.tags) for r in runs if r.name.startswith("burn-batch")]


def test_burn_batches_take_concurrency_slots_only_when_an_operator_set_a_limit(tmp_path):
    from prefect.client.orchestration import get_client

    from tasks.masks import BURN_TAG

    state, summary = run(source=str(EXAMPLES / "export"), destination=str(tmp_path / "a"))
    assert summary["ok"] == 13 and burn_tags(state) == [[]]
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=BURN_TAG, concurrency_limit=1)
    try:
        state, summary = run(
            source=str(EXAMPLES / "export"), destination=str(tmp_path / "b"), batch_size=5
        )
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag(BURN_TAG)
    assert summary["ok"] == 13
    assert burn_tags(state) == [[BURN_TAG]] * 3


def test_a_cached_rerun_restores_outputs_deleted_by_hand(tmp_path):
    """The batch cache does not hide a mask deleted at the destination: its item is burned
    again, the rest stays cached."""
    dest = tmp_path / "masks"
    _, first = run(source=str(EXAMPLES / "export"), destination=str(dest), batch_size=4)
    mask = dest / "semantic" / "street" / "scene_002.png"
    original = mask.read_bytes()
    before = {r["path"]: r for r in third_records(dest)}
    mask.unlink()
    _, second = run(source=str(EXAMPLES / "export"), destination=str(dest), batch_size=4)
    assert second["cached_batches"] == len(batches(EXAMPLES / "export", 4))
    assert second["failed"] == 0
    assert same_output(mask.name, mask.read_bytes(), original)
    assert second["outputs_written"] == 1
    after = {r["path"]: r for r in third_records(dest)}
    assert after == before  # the restored item's record already said what is stored again
