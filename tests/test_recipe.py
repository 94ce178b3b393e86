"""An item's record decides whether it is burned again: the recipe digest (polyburn.recipe), the
items it skips, and the items a run burns once more (with the run's own workers)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time

import pytest
from prefect.variables import Variable

from flows.polygons_to_masks import polygons_to_masks_params, watermark_name
from polyburn import parallel, pipeline
from polyburn.destinations.local import LocalDestination
from polyburn.params import MaskOptions, RunParameters
from polyburn.recipe import item_recipe, run_recipe
from polyburn.sources import open_source
from polyburn.state import read_record, settle_label_map, write_record
from tests.support.oracle import EXAMPLES

RUN = run_recipe(MaskOptions().model_dump(mode="json"), "uint8", code="c0de")
LABELS = {"building": 1, "road": 2, "tree": 3}


def test_a_label_the_item_does_not_use_leaves_its_digest_alone():
    digest = item_recipe(RUN, "rev-1", ["building", "road"], LABELS, None)
    assert digest == item_recipe(RUN, "rev-1", ["road", "building"], {**LABELS, "car": 9}, None)
    assert digest != item_recipe(RUN, "rev-2", ["building", "road"], LABELS, None)
    assert digest != item_recipe(RUN, "rev-1", ["building"], LABELS, None)


def test_the_id_colour_or_class_index_of_a_used_label_changes_the_digest():
    digest = item_recipe(RUN, "r", ["road"], LABELS, None)
    assert digest != item_recipe(RUN, "r", ["road"], {**LABELS, "road": 7}, None)
    assert digest != item_recipe(RUN, "r", ["road"], LABELS, {"road": (1, 2, 3)})
    # "a" takes index 0: road's class index moves although its id does not
    assert digest != item_recipe(RUN, "r", ["road"], {**LABELS, "a": 0}, None)
    assert digest == item_recipe(RUN, "r", ["road"], LABELS, {"tree": (1, 2, 3)})


def test_the_options_and_code_enter_the_digest_but_verify_does_not():
    options = MaskOptions().model_dump(mode="json")
    assert run_recipe({**options, "verify": True}, "uint8", "c0de") == RUN
    assert run_recipe({**options, "format": "tif"}, "uint8", "c0de") != RUN
    assert run_recipe(options, "uint16", "c0de") != RUN
    assert run_recipe(options, "uint8", "beef") != RUN


def test_an_item_without_revision_or_with_an_unmapped_label_has_no_digest():
    assert item_recipe(RUN, None, ["road"], LABELS, None) is None
    assert item_recipe(RUN, "r", ["sky"], LABELS, None) is None


@pytest.fixture
def export(tmp_path):
    source = tmp_path / "export"
    shutil.copytree(EXAMPLES / "export", source)
    return source


def _burned_paths(monkeypatch) -> list[str]:
    """The paths of the items burned in this process from now on (build_masks still runs)."""
    burned: list[str] = []
    lock = threading.Lock()
    real = pipeline.build_masks

    def counting(item, *args, **kwargs):
        with lock:
            burned.append(item.path)
        return real(item, *args, **kwargs)

    monkeypatch.setattr(pipeline, "build_masks", counting)
    return burned


def test_a_colour_change_reburns_only_the_items_with_that_label(export, tmp_path, monkeypatch):
    source = open_source(str(export))
    refs = sorted(source.list_items(), key=lambda ref: ref.path)
    destination = LocalDestination(tmp_path / "masks")
    label_map = settle_label_map(destination.state, parallel.collect_labels(refs, source, 10**8))
    first = parallel.process_items(refs, source, destination, MaskOptions(), label_map)
    assert first.unchanged == 0 and all(r.status == "ok" for r in first)
    images = [r for r in first if "crossing" not in r.path]
    assert all(r.recipe for r in images)

    burned = _burned_paths(monkeypatch)
    again = parallel.process_items(refs, source, destination, MaskOptions(), label_map)
    assert again.unchanged == len(refs) and burned == []
    assert [r.recipe for r in again] == [r.recipe for r in first]
    assert all(not o["written"] for r in again for o in r.outputs)

    label = "road"
    carry = sorted(r.path for r in first if label in r.labels)
    assert 0 < len(carry) < len(refs)
    colours = {label: (1, 2, 3)}
    third = parallel.process_items(refs, source, destination, MaskOptions(), label_map, colours)
    frames = [p for p in burned if "crossing" in p]
    assert sorted(set(burned) - set(frames)) == [p for p in carry if "crossing" not in p]
    assert third.unchanged == len(refs) - len(carry)
    # the re-burned items' records now hold the new digest
    for path in carry:
        assert read_record(destination.state, path).recipe != next(
            r.recipe for r in first if r.path == path
        )


def test_verify_or_a_failed_record_burns_the_item_again(export, tmp_path, monkeypatch):
    source = open_source(str(export))
    images = [ref for ref in source.list_items() if "clips/" not in ref.path]  # no video
    refs = sorted(images, key=lambda ref: ref.path)[:4]
    destination = LocalDestination(tmp_path / "masks")
    label_map = settle_label_map(destination.state, parallel.collect_labels(refs, source, 10**8))
    parallel.process_items(refs, source, destination, MaskOptions(), label_map)
    stored = read_record(destination.state, refs[1].path)
    failed = dataclasses.replace(stored, status="failed", error="x", recipe=None)
    write_record(destination.state, failed)  # as a failed run left it
    burned = _burned_paths(monkeypatch)
    records = parallel.process_items(refs, source, destination, MaskOptions(), label_map, None, 1)
    assert burned == [refs[1].path]  # the failed one
    assert records.unchanged == 3 and records[1].status == "ok"
    assert records.previews == {refs[0].path: {}}  # asked for one: nothing burned, no picture
    burned.clear()
    verify = MaskOptions(verify=True)
    assert parallel.process_items(refs, source, destination, verify, label_map).unchanged == 0
    assert sorted(burned) == sorted(ref.path for ref in refs)


@pytest.mark.usefixtures("prefect_api")
def test_a_full_run_after_one_new_label_burns_only_the_items_that_carry_it(
    export, tmp_path, monkeypatch
):
    destination = tmp_path / "masks"
    params = RunParameters(source=str(export), destination=str(destination), batch_size=4)
    first = polygons_to_masks_params(params)
    assert first["failed"] == 0 and first["unchanged_items"] == 0
    # a new label on one item: the label map grows, so every batch misses Prefect's cache
    item = export / "json" / "street" / "scene_002.json"
    data = json.loads(item.read_text())
    added = dict(data["annotations"][0], id="6650a1f0c0ffee00000000ff", label="kiosk")
    data["annotations"].append(added)
    item.write_text(json.dumps(data))
    burned = _burned_paths(monkeypatch)
    second = polygons_to_masks_params(params)
    assert "kiosk" in second["label_map"] and len(second["label_map"]) > len(first["label_map"])
    assert second["cached_batches"] == 0 and second["failed"] == 0
    assert second["unchanged_items"] == second["items"] - 1
    assert burned == ["street/scene_002"]
    assert "kiosk" in read_record(LocalDestination(destination).state, "street/scene_002").labels


@pytest.mark.usefixtures("prefect_api")
def test_items_burned_again_after_the_batches_use_the_runs_workers(export, tmp_path, monkeypatch):
    """An output deleted by hand is found missing after the batches; its item is burned again
    through the same batch path, with the run's worker processes (not one process)."""
    destination = tmp_path / "masks"
    params = RunParameters(source=str(export), destination=str(destination), workers=2)
    assert polygons_to_masks_params(params)["failed"] == 0
    (destination / "semantic" / "street" / "scene_004.png").unlink()
    seen: list[tuple[list[str], int, bool]] = []
    real = parallel.process_items

    def recording(refs, source, destination, options, *args, **kwargs):
        records = real(refs, source, destination, options, *args, **kwargs)
        workers = args[3] if len(args) > 3 else kwargs.get("workers", 1)
        seen.append(([ref.path for ref in refs], workers, options.verify))
        return records

    monkeypatch.setattr("tasks.masks.process_items", recording)
    summary = polygons_to_masks_params(params)
    assert summary["failed"] == 0
    assert (destination / "semantic" / "street" / "scene_004.png").exists()
    redone = [entry for entry in seen if entry[2]]
    assert redone == [(["street/scene_004"], 2, True)]


@pytest.mark.usefixtures("prefect_api")
def test_the_watermark_moves_past_a_failed_item_which_every_later_run_tries_again(export, tmp_path):
    destination = tmp_path / "masks"
    state = LocalDestination(destination).state
    params = RunParameters(source=str(export), destination=str(destination), incremental=True)
    name = watermark_name(str(export), str(destination))
    item = export / "json" / "street" / "scene_003.json"
    good = item.read_text()
    item.write_text(good.replace('"annotations"', '"annotations" ::'))  # JSON no parser takes

    first = polygons_to_masks_params(params)
    assert (first["items"], first["failed"]) == (13, 1)
    assert read_record(state, "street/scene_003").status == "failed"
    mark = Variable.get(name)
    assert mark is not None  # moved on although an item failed

    time.sleep(0.05)
    second = polygons_to_masks_params(params)  # nothing changed: the failed item alone, again
    assert (second["items"], second["failed"]) == (1, 1)
    assert second["failures"][0]["path"] == "street/scene_003"
    assert Variable.get(name) > mark

    item.write_text(good)
    third = polygons_to_masks_params(params)
    assert (third["items"], third["failed"]) == (1, 0)
    assert read_record(state, "street/scene_003").status == "ok"
    assert polygons_to_masks_params(params)["items"] == 0  # its mark is gone with the failure
