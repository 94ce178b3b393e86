"""SIGKILL a run at several points, run it again: the destination equals a clean run's.

No partial files, no manifest entry for a missing object, nothing missing. The killed runs are
real `polyburn run` processes talking to the session's Prefect API.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.polygons_to_masks import polygons_to_masks_params
from polyburn.params import MaskOptions, RunParameters
from tests.support.generate import write_export
from tests.support.oracle import describe_difference, same_output

pytestmark = pytest.mark.usefixtures("prefect_api")
MODES = ["semantic", "instance", "binary"]


@pytest.fixture(scope="module")
def big_export(tmp_path_factory):
    return write_export(
        tmp_path_factory.mktemp("crash-export"),
        160,
        seed=3,
        width=640,
        height=480,
        polygons=30,
        vertices=24,
    )


@pytest.fixture(scope="module")
def clean_run(big_export, tmp_path_factory, prefect_api):
    dest = tmp_path_factory.mktemp("clean")
    run_in_process(big_export, dest)
    return dest


def run_in_process(source: Path, dest: Path) -> dict:
    state = polygons_to_masks_params(
        RunParameters(
            source=str(source),
            destination=str(dest),
            batch_size=10,
            options=MaskOptions(modes=MODES),
        ),
        return_state=True,
    )
    return state.result()


def outputs(dest: Path) -> dict[str, bytes]:
    """Every file at a final name (temp files start with a dot) but the manifest and token."""
    return {
        p.relative_to(dest).as_posix(): p.read_bytes()
        for p in dest.rglob("*")
        if p.is_file()
        and p.name != "manifest.jsonl"
        and ".polyburn" not in p.parts
        and not p.name.startswith(".")
    }


def manifest_outputs(dest: Path) -> dict[str, str]:
    lines = (dest / "manifest.jsonl").read_text().splitlines()
    return {o["key"]: o["sha256"] for line in lines for o in json.loads(line)["outputs"]}


def start_run(source: Path, dest: Path) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polyburn.cli",
            "run",
            str(source),
            str(dest),
            "--mode",
            ",".join(MODES),
            "--batch-size",
            "10",
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("kill point never reached")
        time.sleep(0.005)


def children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def mask_count(dest: Path) -> int:
    return sum(1 for _ in dest.glob("semantic/**/*.png")) if dest.exists() else 0


KILL_POINTS = {
    "while starting and listing": lambda dest, proc: time.sleep(1.0) or True,
    "after the label map": lambda dest, proc: (dest / "label_map.json").exists(),
    "mid-batch (20 items)": lambda dest, proc: mask_count(dest) >= 20,
    "late (120 items)": lambda dest, proc: mask_count(dest) >= 120,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_equals_a_clean_run(point, big_export, clean_run, tmp_path):
    dest = tmp_path / "masks"
    process = start_run(big_export, dest)
    try:
        wait_until(lambda: KILL_POINTS[point](dest, process) or process.poll() is not None)
        workers = children(process.pid)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # The run's burn workers die with it instead of lingering as orphans.
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=10)
    # Whatever sits at a final name is complete: the clean run's file (or the same mask).
    reference = outputs(clean_run)
    for key, data in outputs(dest).items() if dest.exists() else []:
        if key in reference:
            assert same_output(key, data, reference[key]), key
    if (dest / "manifest.jsonl").exists():  # written last: everything it lists exists
        for key in manifest_outputs(dest):
            assert (dest / key).is_file(), key

    summary = run_in_process(big_export, dest)
    assert summary["failed"] == 0 and summary["items"] == 160
    assert describe_difference(outputs(dest), reference) == ""
    listed = manifest_outputs(dest)
    assert listed.keys() == manifest_outputs(clean_run).keys()
    assert {k: hashlib.sha256((dest / k).read_bytes()).hexdigest() for k in listed} == listed
    assert not list(dest.rglob("*.part"))
