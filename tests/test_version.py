"""Which polyburn wrote what: the version comes from one place (``pyproject.toml``, through the
installed package's metadata), ``polyburn --version`` prints it, and every item record and
manifest line written since names it; records of earlier versions, without it, are still read.
No Prefect: the run-level places (summary, ``--json``, artifact, ``/healthz``) are checked where
those already run (test_losses, test_orchestration, test_events)."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

import polyburn
from polyburn.cli import main
from polyburn.destinations.local import LocalDestination
from polyburn.params import MaskOptions
from polyburn.pipeline import process_item, scan_labels
from polyburn.sources import open_source
from polyburn.state import read_record, write_record
from tests.support.oracle import EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
DECLARED = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_polyburn_version_prints_the_version_pyproject_declares(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"polyburn {DECLARED}\n"
    assert polyburn.version() == polyburn.__version__ == DECLARED


def test_the_changelog_has_a_section_for_the_declared_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.MULTILINE)
    dated = rf"^## \[{re.escape(DECLARED)}\] - \d{{4}}-\d{{2}}-\d{{2}}$"
    assert re.search(dated, changelog, flags=re.MULTILINE), f"no '## [{DECLARED}] - <date>'"
    assert headings[0] == "Unreleased"  # where the next changes go, above the releases


def test_records_and_manifest_lines_name_the_version_and_older_records_are_still_read(
    tmp_path, capsys
):
    export = tmp_path / "export"
    shutil.copytree(EXAMPLES / "export", export)
    source = open_source(str(export))
    refs = {ref.path: ref for ref in source.list_items()}
    dest = tmp_path / "masks"
    destination = LocalDestination(dest)
    options = MaskOptions(modes=["semantic", "coco"])
    found = scan_labels(refs.values(), source, options.max_pixels)
    labels = {label: k for k, label in enumerate(sorted(found), 1)}
    for path in ("street/scene_001", "street/scene_002", "clips/crossing_001"):
        record = process_item(refs[path], source, destination, options, labels)
        assert record.status == "ok", record.error
        assert record.polyburn_version == DECLARED
        assert read_record(destination.state, path).polyburn_version == DECLARED
    # a record as polyburn 0.1.0 stored it: no version field, and none is made up for it
    older = read_record(destination.state, "street/scene_002")
    older.polyburn_version = None
    write_record(destination.state, older)

    assert main(["manifest", str(dest)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [
        "clips/crossing_001",
        "street/scene_001",
        "street/scene_002",
    ]
    assert [line.get("polyburn_version") for line in lines] == [DECLARED, DECLARED, None]

    # the dataset files are assembled from both kinds of record
    assert main(["dataset", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"{dest}/manifest.jsonl: 3 item records" in out
    manifest = [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]
    assert [line.get("polyburn_version") for line in manifest] == [DECLARED, DECLARED, None]
    coco = json.loads((dest / "coco" / "instances.json").read_text())
    assert {"scene_001", "scene_002"} <= {Path(i["file_name"]).stem for i in coco["images"]}
