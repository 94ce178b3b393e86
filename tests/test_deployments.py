"""The deployments, ``prefect.yaml`` and the webhook receiver in the whole chain.

The first part needs no Prefect server: settings, the trigger's shape and templates, and the
``prefect.yaml`` file against the code (the receiver's own tests are in ``tests/test_events.py``).

The second part runs against ONE real ``prefect server start`` (SQLite in a temporary
PREFECT_HOME, the session's ``prefect_server`` from conftest), with ``polyburn serve`` and
``polyburn events`` in subprocesses pointed at it; the example export is the source, so no
Dataloop is needed. It does not use the session ``prefect_api`` harness, and this process's
Prefect settings point at the server only inside :func:`api`.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from deployments import (
    ANNOTATION_EVENTS,
    DeploymentSettings,
    annotation_trigger,
    build_deployments,
)
from polyburn.errors import ConfigError
from polyburn.events import SIGNATURE_HEADER
from tests.support.oracle import describe_difference
from tests.support.prefect_server import PrefectServer, stop_process
from tests.support.processes import start_cli, start_events, wait_for, wait_healthy
from tests.support.s3_fixtures import aws_env, stored_objects
from tests.support.webhook_load import signed

REPO = Path(__file__).resolve().parents[1]
EXPORT = REPO / "examples" / "export"
SECRET = "hmac-secret-for-tests-0123456789"
TOKEN = "static-token-for-tests-0123456789"
DEBOUNCE = 10  # seconds; the smallest Prefect allows for a proactive trigger
FLOW = "polygons-to-masks"


@pytest.fixture(autouse=True)
def _no_harness(request):
    """This module brings its own server; the session harness must stay off here."""
    assert "prefect_api" not in request.fixturenames


# ============================================================== no server: deployments


def test_settings_come_from_the_environment_and_are_checked():
    settings = DeploymentSettings.from_env(
        {
            "POLYBURN_SOURCE": "dataloop://ds-1",
            "POLYBURN_DESTINATION": "s3://bucket/masks",
            "POLYBURN_MODES": "semantic, instance",
            "POLYBURN_NIGHTLY_CRON": "30 3 * * 1-5",
            "POLYBURN_TIMEZONE": "Europe/Berlin",
            "POLYBURN_DEBOUNCE_SECONDS": "45",
            "POLYBURN_SERVE_LIMIT": "0",
        }
    )
    assert settings.dataset_id == "ds-1"
    assert settings.modes == ("semantic", "instance")
    assert settings.serve_limit is None
    assert DeploymentSettings.from_env({}) == DeploymentSettings()
    for bad, message in [
        ({"POLYBURN_NIGHTLY_CRON": "every night"}, "POLYBURN_NIGHTLY_CRON"),
        ({"POLYBURN_TIMEZONE": "Mars/Olympus"}, "POLYBURN_TIMEZONE"),
        ({"POLYBURN_MODES": "rainbow"}, "options.modes"),
        ({"POLYBURN_DEBOUNCE_SECONDS": "5"}, "at least 10"),
        ({"POLYBURN_DEBOUNCE_SECONDS": "soon"}, "integer"),
        ({"POLYBURN_SOURCE": "exports/{{ evil }}"}, "braces"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            DeploymentSettings.from_env(bad)


def test_four_deployments_of_the_flow_with_schedule_and_trigger():
    settings = DeploymentSettings(timezone="Europe/Berlin", nightly_cron="0 1 * * *")
    nightly, on_demand, on_annotation, shard = build_deployments(settings)
    assert [d.name for d in (nightly, on_demand, on_annotation, shard)] == [
        "nightly",
        "on-demand",
        "on-annotation",
        "shard",
    ]
    assert not shard.schedules and not shard.triggers
    for d in (nightly, on_demand, on_annotation, shard):
        assert d.flow_name == FLOW
    for d in (nightly, on_demand, on_annotation):  # the public flow: one parameter per field
        assert d.entrypoint == "flows/polygons_to_masks.py:polygons_to_masks"
    assert shard.entrypoint == "flows/polygons_to_masks.py:polygons_to_masks_params"
    (schedule,) = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 1 * * *", "Europe/Berlin")
    assert nightly.parameters["incremental"] is True
    assert nightly.parameters["refresh_dataset_files"] is True
    assert nightly.concurrency_limit == 1
    assert not on_demand.schedules and not on_demand.triggers
    assert on_demand.parameters == settings.base_parameters()
    assert on_demand.parameters == {
        "source": "examples/export",
        "destination": "masks",
        "modes": ["semantic"],
    }
    assert shard.parameters == {
        "params": {
            "source": "examples/export",
            "destination": "masks",
            "options": {"modes": ["semantic"]},
        }
    }
    assert not on_annotation.schedules and len(on_annotation.triggers) == 1


def test_trigger_debounces_per_item_and_templates_the_item_and_source():
    trigger = annotation_trigger(DeploymentSettings(debounce_seconds=30))
    assert trigger.posture == "Proactive"
    assert trigger.expect == trigger.after == set(ANNOTATION_EVENTS)
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.threshold == 1 and trigger.within == timedelta(seconds=30)
    assert trigger.match.model_dump() == {"prefect.resource.id": "dataloop.item.*"}

    local = {"prefect.resource.id": "dataloop.item.street/scene_001"}
    # the rest (destination, modes...) is the deployment's: Prefect merges them
    assert render_parameters(trigger.parameters, local) == {
        "source": "examples/export",
        "item_ids": ["street/scene_001"],
    }
    dataloop_event = {
        "prefect.resource.id": "dataloop.item.64f0aa",
        "dataloop.item.id": "64f0aa",
        "dataloop.dataset.id": "ds-9",
    }
    params = render_parameters(trigger.parameters, dataloop_event)
    assert (params["source"], params["item_ids"]) == ("dataloop://ds-9", ["64f0aa"])
    without_label = {"prefect.resource.id": "dataloop.item.64f0aa"}
    assert render_parameters(trigger.parameters, without_label)["item_ids"] == ["64f0aa"]

    dataloop = annotation_trigger(DeploymentSettings(source="dataloop://ds-9"))
    assert dataloop.match.model_dump() == {
        "prefect.resource.id": "dataloop.item.*",
        "dataloop.dataset.id": "ds-9",
    }


def render_parameters(parameters: dict, resource: dict[str, str]) -> dict:
    """Render a trigger's parameters for an event on ``resource`` the way the Prefect server's
    run-deployment action does (v1 template upgrade, then hydration with Jinja)."""
    import copy

    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    event = ReceivedEvent(
        occurred=datetime.now(UTC),
        event="dataloop.annotation.updated",
        resource=resource,
        id=uuid.uuid4(),
    )
    parameters = copy.deepcopy(parameters)
    RunDeployment._upgrade_v1_templates(parameters)
    context = HydrationContext(
        raise_on_error=True, render_jinja=True, jinja_context={"event": event}
    )
    return hydrate(parameters, context)


def test_prefect_yaml_declares_the_same_deployments_as_the_code(monkeypatch):
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.utilities.templating import apply_values

    env = {
        "POLYBURN_SOURCE": str(EXPORT),
        "POLYBURN_DESTINATION": "/srv/masks",
        "POLYBURN_WORKDIR": "/opt/polyburn",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)  # what `prefect deploy` validates
    assert model.pull == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $POLYBURN_WORKDIR }}"
            }
        }
    ]
    assert apply_values(model.pull, {}, remove_notset=False)[0][
        "prefect.deployments.steps.set_working_directory"
    ] == {"directory": "/opt/polyburn"}

    code = {d.name: d for d in build_deployments(DeploymentSettings.from_env(env))}
    declared = {d.name: d for d in model.deployments}
    assert list(declared) == ["nightly", "on-demand", "on-annotation", "shard"] == list(code)
    for name, spec in declared.items():
        # `prefect deploy` substitutes {{ $VARS }} from the environment this way.
        spec = apply_values(spec.model_dump(exclude_unset=True), {}, remove_notset=False)
        assert spec["entrypoint"] == code[name].entrypoint
        assert spec["work_pool"]["name"] == "polyburn-process"
        assert spec["parameters"] == code[name].parameters, name
        assert spec.get("concurrency_limit") == code[name].concurrency_limit, name
        schedules = [(s["cron"], s["timezone"]) for s in spec.get("schedules") or []]
        expected = [(s.schedule.cron, s.schedule.timezone) for s in code[name].schedules]
        assert schedules == expected, name
        triggers = _initialize_deployment_triggers(name, spec.get("triggers") or [])
        assert [t.model_dump() for t in triggers] == [
            t.model_dump() for t in code[name].triggers
        ], name

    # The entrypoint resolves to the flow.
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(str(REPO / code["nightly"].entrypoint))
    assert flow.name == FLOW


# ============================================================== a real Prefect server


@pytest.fixture(scope="module")
def server(prefect_server) -> PrefectServer:
    """The session's ``prefect server start`` (conftest)."""
    return prefect_server


@contextmanager
def api(server: PrefectServer):
    """A sync Prefect client of ``server``; this process's settings point at it only inside."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def served(server, weed_server, tmp_path_factory):
    """``polyburn serve`` against the server: (deployment ids by name, event destination, log)."""
    root = tmp_path_factory.mktemp("serve")
    destination = root / "event-masks"
    log = root / "serve.log"
    env = server.client_env(
        {
            "PREFECT_HOME": str(root / "home"),
            "POLYBURN_SOURCE": str(EXPORT),
            "POLYBURN_DESTINATION": str(destination),
            "POLYBURN_DEBOUNCE_SECONDS": str(DEBOUNCE),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            **aws_env(weed_server),
        }
    )
    process = start_cli(["serve"], env, log)
    try:

        def registered():
            assert process.poll() is None, log.read_text(errors="replace")
            with api(server) as client:
                found = {d.name: d.id for d in client.read_deployments()}
                automations = client.read_automations()
            names = {"nightly", "on-demand", "on-annotation", "shard"}
            return found if names <= set(found) and automations else None

        ids = wait_for("the three deployments", registered, timeout=120, every=1, log=log)
        yield ids, destination, log
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def events_receiver(server, tmp_path_factory):
    """``polyburn events`` against the server (HMAC and token): its hook URL."""
    credentials = {"POLYBURN_WEBHOOK_SECRET": SECRET, "POLYBURN_WEBHOOK_TOKEN": TOKEN}
    env = server.client_env(credentials)
    process, port, log = start_events(env, tmp_path_factory.mktemp("events"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/healthz", process, log)
        yield f"{base}/dataloop", log
    finally:
        stop_process(process)


def runs_of(server: PrefectServer, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with api(server) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def final_state(server: PrefectServer, run_id, timeout: float = 120, log: Path | None = None):
    def done():
        with api(server) as client:
            run = client.read_flow_run(run_id)
        return run if run.state and run.state.is_final() else None

    return wait_for(f"flow run {run_id} to finish", done, timeout=timeout, log=log)


def test_serve_registers_four_deployments_and_the_nightly_schedule(server, served):
    ids, _, _ = served
    with api(server) as client:
        nightly = client.read_deployment_by_name(f"{FLOW}/nightly")
        (automation,) = automations_of(client, ids["on-annotation"])
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert nightly.parameters["incremental"] is True
    assert nightly.parameters["refresh_dataset_files"] is True
    assert limit_of(nightly) == 1
    assert automation.name == "polyburn-on-annotation"
    assert automation.trigger.posture == "Proactive"
    assert automation.trigger.for_each == {"prefect.resource.id"}
    assert automation.trigger.within == timedelta(seconds=DEBOUNCE)


def automations_of(client, deployment_id) -> list:
    """The automations whose action runs ``deployment_id``."""
    return [
        a
        for a in client.read_automations()
        if any(getattr(action, "deployment_id", None) == deployment_id for action in a.actions)
    ]


def test_prefect_deploy_all_registers_what_serve_registers(server, served, tmp_path):
    """The real ``prefect deploy --all`` on prefect.yaml (names prefixed ``yaml-`` so they do not
    replace the served ones) creates the same parameters, schedule and trigger."""
    from prefect.client.schemas.actions import WorkPoolCreate

    ids, destination, _ = served
    text = (REPO / "prefect.yaml").read_text()
    for name in ("nightly", "on-demand", "on-annotation", "shard"):
        text = text.replace(f"  - name: {name}\n", f"  - name: yaml-{name}\n")
    copy = tmp_path / "prefect.yaml"
    copy.write_text(text)
    with api(server) as client:
        client.create_work_pool(WorkPoolCreate(name="polyburn-process", type="process"))
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
        + ["--prefect-file", str(copy)],
        cwd=REPO,
        env=server.client_env(
            {
                "PREFECT_HOME": str(tmp_path / "home"),
                "POLYBURN_SOURCE": str(EXPORT),
                "POLYBURN_DESTINATION": str(destination),
                "POLYBURN_WORKDIR": str(REPO),
            }
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with api(server) as client:
        for name in ("nightly", "on-demand", "on-annotation", "shard"):
            served_one = client.read_deployment(ids[name])
            deployed = client.read_deployment_by_name(f"{FLOW}/yaml-{name}")
            assert deployed.work_pool_name == "polyburn-process"
            assert deployed.entrypoint == served_one.entrypoint
            assert deployed.parameters == served_one.parameters, name
            assert deployed.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
            ]
            assert [(s.schedule.cron, s.schedule.timezone) for s in deployed.schedules] == [
                (s.schedule.cron, s.schedule.timezone) for s in served_one.schedules
            ]
            assert limit_of(deployed) == limit_of(served_one), name
            (mine,) = automations_of(client, served_one.id) or [None]
            theirs = automations_of(client, deployed.id)
            if mine is None:
                assert theirs == []
                continue
            (theirs,) = theirs
            # Same trigger and parameters; only the quiet period differs (DEBOUNCE in the tests).
            assert theirs.trigger.within == timedelta(seconds=60)
            assert theirs.trigger.model_dump(exclude={"id", "within"}) == mine.trigger.model_dump(
                exclude={"id", "within"}
            )
            assert theirs.actions[0].parameters == mine.actions[0].parameters


def limit_of(deployment) -> int | None:
    gcl = deployment.global_concurrency_limit
    return gcl.limit if gcl else None


def test_on_demand_run_from_the_ui_writes_masks_and_manifest(server, served, tmp_path):
    """Two fields set in the run; the source is the deployment's (POLYBURN_SOURCE)."""
    ids, _, log = served
    destination = tmp_path / "masks"
    parameters = {"destination": str(destination), "modes": ["semantic", "instance"]}
    with api(server) as client:  # what the UI's "Run" button does
        run = client.create_flow_run_from_deployment(ids["on-demand"], parameters=parameters)
    assert run.parameters == {"source": str(EXPORT), **parameters}
    run = final_state(server, run.id, log=log)
    assert run.state.is_completed(), run.state
    assert run.state.message == "13 ok, 0 failed"
    records = [
        json.loads(line) for line in (destination / "manifest.jsonl").read_text().splitlines()
    ]
    assert len(records) == 13 and {r["status"] for r in records} == {"ok"}
    assert (destination / "semantic" / "street" / "scene_001.png").is_file()
    assert (destination / "instance" / "street" / "scene_001.png").is_file()
    assert json.loads((destination / "label_map.json").read_text())


BURST_ITEM = "street/scene_002"
HOOK_ITEM = "fields/plot_001"
REJECTED_ITEM = "street/scene_005"


def prefect_event(name: str, item: str) -> dict:
    return {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": f"dataloop.item.{item}", "dataloop.item.id": item},
        "payload": {},
        "related": [],
    }


#: Seconds after the first event at which the burst's events are sent: a quick flurry, then
#: two late edits. Every gap is shorter than DEBOUNCE but the burst is longer, so a trigger
#: that fired on the first event and ignored the rest of its window would fire twice.
BURST_AT = (0.0, 0.3, 0.6, 6.0, 12.0)


@pytest.fixture(scope="module")
def fired(server, served, events_receiver):
    """Send everything at once so the debounce windows overlap: one signed webhook call (then its
    replay) and rejected calls to ``polyburn events``, then a burst of events for another item
    straight to the Prefect API (``POST /api/events``, as any external system can).
    Returns the webhook calls' HTTP statuses and the time of the burst's last event."""
    hook, _ = events_receiver
    body = json.dumps({"id": HOOK_ITEM, "name": "plot_001.json"}).encode()
    headers = signed(body, SECRET)
    statuses = {"signed": httpx.post(hook, content=body, headers=headers).status_code}
    statuses["replayed"] = httpx.post(hook, content=body, headers=headers).status_code
    bad = json.dumps({"id": REJECTED_ITEM}).encode()
    statuses["unsigned"] = httpx.post(hook, content=bad).status_code
    statuses["bad signature"] = httpx.post(
        hook, content=bad, headers={**signed(bad, SECRET), SIGNATURE_HEADER: "sha256=" + "0" * 64}
    ).status_code
    statuses["stale"] = httpx.post(
        hook, content=bad, headers=signed(bad, SECRET, at=time.time() - 600)
    ).status_code
    statuses["bad token"] = httpx.post(f"{hook}?token=guess", content=bad).status_code

    names = ["dataloop.annotation.created"] * 3 + [
        "dataloop.annotation.updated",
        "dataloop.item.annotated",
    ]
    start = time.monotonic()
    for at, name in zip(BURST_AT, names, strict=True):
        time.sleep(max(0.0, start + at - time.monotonic()))
        event = prefect_event(name, BURST_ITEM)
        response = httpx.post(f"{server.api_url}/events", json=[event])
        assert response.status_code == 204, response.text
    return statuses, datetime.fromisoformat(event["occurred"])


def item_runs(server: PrefectServer, deployment_id, item: str) -> list:
    return [r for r in runs_of(server, deployment_id) if r.parameters.get("item_ids") == [item]]


def test_a_burst_of_events_for_one_item_starts_exactly_one_run(server, served, fired):
    """Debounced: one run, started once the item has been quiet for DEBOUNCE seconds."""
    ids, destination, log = served
    _, last_event = fired
    (run,) = wait_for(
        "the on-annotation run",
        lambda: item_runs(server, ids["on-annotation"], BURST_ITEM),
        90,
        every=1,
        log=log,
    )
    assert run.parameters["source"] == str(EXPORT)
    assert run.parameters["destination"] == str(destination)
    assert run.created - last_event >= timedelta(seconds=DEBOUNCE - 0.5)  # trailing edge
    run = final_state(server, run.id, log=log)
    assert run.state.is_completed(), run.state
    assert run.state.message == "1 ok, 0 failed"  # only the event's item
    assert (destination / "semantic" / f"{BURST_ITEM}.png").is_file()
    # The window has passed long ago: no second run for the burst.
    time.sleep(3)
    assert len(item_runs(server, ids["on-annotation"], BURST_ITEM)) == 1


def events_for(server: PrefectServer, item: str) -> list[dict]:
    response = httpx.post(
        f"{server.api_url}/events/filter",
        json={"filter": {"resource": {"id": [f"dataloop.item.{item}"]}}, "limit": 50},
    )
    response.raise_for_status()
    return response.json()["events"]


def test_a_signed_webhook_starts_one_run_and_rejected_calls_start_none(server, served, fired):
    ids, destination, log = served
    assert fired[0] == {
        "signed": 202,
        "replayed": 401,
        "unsigned": 401,
        "bad signature": 401,
        "stale": 401,
        "bad token": 401,
    }
    (run,) = wait_for(
        "the webhook's run",
        lambda: item_runs(server, ids["on-annotation"], HOOK_ITEM),
        90,
        every=1,
        log=log,
    )
    run = final_state(server, run.id, log=log)
    assert run.state.is_completed(), run.state
    assert run.state.message == "1 ok, 0 failed"
    assert (destination / "semantic" / f"{HOOK_ITEM}.png").is_file()
    (event,) = wait_for("the webhook's event", lambda: events_for(server, HOOK_ITEM), 30)
    assert event["event"] == "dataloop.item.annotated"
    assert events_for(server, REJECTED_ITEM) == []
    assert item_runs(server, ids["on-annotation"], REJECTED_ITEM) == []


RETRY_PROBE = """
import sys

from prefect import flow

import tasks.publish as publish
from polyburn.errors import TransientError

calls = []
settle = publish.resolve_label_map


def flaky(labels_file, destination, found, declared=None):
    calls.append(1)
    if len(calls) < 3:
        raise TransientError("injected: connection reset by peer")
    return settle(labels_file, destination, found, declared)


publish.resolve_label_map = flaky


@flow(name="polyburn-retry-probe")
def probe(destination: str) -> int:
    publish.publish_label_map.with_options(retry_delay_seconds=1)(destination, None, ["car"])
    return len(calls)


state = probe(sys.argv[1], return_state=True)
print(state.state_details.flow_run_id, state.type.value, state.result())
"""


def test_a_transient_failure_shows_as_retries_in_the_task_run_history(server, tmp_path):
    """publish-label-map (retries=3, retry only transient errors) fails twice, then succeeds."""
    script = tmp_path / "retry_probe.py"
    script.write_text(RETRY_PROBE)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "masks")],
        cwd=REPO,
        env=server.client_env({"PREFECT_HOME": str(tmp_path / "home")}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_id, state, calls = done.stdout.split()[-3:]
    assert (state, calls) == ("COMPLETED", "3")
    assert json.loads((tmp_path / "masks" / "label_map.json").read_text()) == {"car": 1}

    def history():
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with api(server) as client:
            (task_run,) = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(run_id)]))
            )
            states = client.read_task_run_states(task_run.id)
        names = [s.name for s in sorted(states, key=lambda s: s.timestamp)]
        return names if names and names[-1] == "Completed" else None

    names = wait_for("the task run's states", history, timeout=30)
    assert names == [
        "Pending",
        "Running",
        "AwaitingRetry",
        "Retrying",
        "AwaitingRetry",
        "Retrying",
        "Completed",
    ]


# ============================================================== sharded runs


@pytest.fixture(scope="module")
def second_machine(server, served, weed_server, tmp_path_factory):
    """Another "machine" taking shards: ``polyburn serve --deployment shard`` in its own process
    and Prefect home (``served`` is the first; both take one run at a time)."""
    root = tmp_path_factory.mktemp("machine-2")
    log = root / "serve.log"
    env = server.client_env(
        {
            "PREFECT_HOME": str(root / "home"),
            "POLYBURN_SOURCE": str(EXPORT),
            "POLYBURN_DESTINATION": str(root / "unused"),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            **aws_env(weed_server),
        }
    )
    process = start_cli(["serve", "--deployment", "shard"], env, log)
    try:
        wait_for(
            "the second machine to serve",
            lambda: process.poll() is None and "serving shard" in log.read_text(errors="replace"),
            timeout=60,
            log=log,
        )
        yield log
    finally:
        stop_process(process)


def polyburn_run(
    server: PrefectServer, home: Path, *args: str, **env: str
) -> tuple[int, dict, str]:
    """``polyburn run ARGS --json`` against the server: exit code, summary, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "polyburn.cli", "run", *args, "--json", "--no-progress"],
        cwd=REPO,
        env=server.client_env(
            {"PREFECT_HOME": str(home), "POLYBURN_SHARD_POLL_SECONDS": "0.5", **env}
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        summary = json.loads(done.stdout)
    except json.JSONDecodeError:
        summary = {}
    return done.returncode, summary, done.stderr


def files_of(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".polyburn" not in p.parts and p.name != "manifest.jsonl"
    }


def manifest_of(root: Path) -> list[dict]:
    return manifest_records(
        (root / "manifest.jsonl").read_text(), lambda key: (root / key).read_bytes()
    )


def manifest_records(text: str, read: Callable[[str], bytes]) -> list[dict]:
    """Manifest records without timings; each output's sha256 and size are checked against the
    stored object (``read(key)``) and then left out (the same mask may be stored as another
    deflate stream, see ``same_output``)."""
    records = []
    for line in text.splitlines():
        record = {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for output in record.get("outputs", []):
            data = read(output["key"])
            assert (output.pop("sha256"), output.pop("bytes")) == (
                hashlib.sha256(data).hexdigest(),
                len(data),
            )
        records.append(record)
    return records


def test_a_sharded_run_spreads_its_items_over_shard_runs_and_writes_one_manifest(
    server, served, second_machine, tmp_path
):
    ids, _, serve_log = served
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    code, summary, err = polyburn_run(
        server, tmp_path / "home", str(EXPORT), str(sharded), "--shards", "3"
    )
    assert code == 0, err[-3000:]
    assert (summary["items"], summary["ok"], summary["failed"]) == (13, 13, 0)
    assert [(s["shard"], s["state"], s["items"]) for s in summary["shards"]] == [
        (0, "Completed", 5),
        (1, "Completed", 4),
        (2, "Completed", 4),
    ]
    code, _, err = polyburn_run(server, tmp_path / "home", str(EXPORT), str(plain))
    assert code == 0, err[-3000:]

    # The same masks and the same manifest as an unsharded run; no item lease left behind.
    assert describe_difference(files_of(sharded), files_of(plain)) == ""
    assert len(files_of(plain)) == 12 + 16 + 1 + 4  # images, video frames, label map, splits
    assert manifest_of(sharded) == manifest_of(plain)
    assert not [p for p in (sharded / ".polyburn" / "leases").rglob("*") if p.is_file()]

    # Three runs of the shard deployment, subflows of one parent, each with its own items.
    runs = [r for r in runs_of(server, ids["shard"]) if r.parameters["params"].get("shard_of")]
    mine = [r for r in runs if r.parameters["params"]["destination"] == str(sharded)]
    assert len(mine) == 3
    assert {r.state.name for r in mine} == {"Completed"}
    assert len({r.parameters["params"]["shard_of"]["group"] for r in mine}) == 1
    assert all(r.parent_task_run_id is not None for r in mine)
    items = [i for r in mine for i in r.parameters["params"]["item_ids"]]
    assert len(items) == len(set(items)) == 13
    assert {r.parameters["params"]["shard_of"]["index"] for r in mine} == {0, 1, 2}

    # The parent shows its progress per finished shard, ending at 100 %.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with api(server) as client:
        parent = client.read_task_run(mine[0].parent_task_run_id).flow_run_id
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[parent]))
        )
    (bar,) = [a for a in artifacts if a.type == "progress"]
    assert bar.data == 100.0 and "3 shards" in bar.description


def test_a_sharded_run_into_s3_stores_what_a_folder_run_stores(
    server, served, second_machine, weed_server, s3_bucket, tmp_path
):
    """Shards on two "machines" write their records to S3 and the parent compacts them there:
    the bucket ends with the masks and manifest of a plain folder run, and no item lease."""
    prefix = "sharded"
    code, summary, err = polyburn_run(
        server,
        tmp_path / "home",
        str(EXPORT),
        f"s3://{s3_bucket}/{prefix}",
        "--shards",
        "3",
        **aws_env(weed_server),
    )
    assert code == 0, err[-3000:]
    assert (summary["items"], summary["ok"], summary["failed"]) == (13, 13, 0)
    assert [s["state"] for s in summary["shards"]] == ["Completed"] * 3
    plain = tmp_path / "plain"
    code, _, err = polyburn_run(server, tmp_path / "home", str(EXPORT), str(plain))
    assert code == 0, err[-3000:]

    stored = stored_objects(weed_server, s3_bucket, prefix)
    assert not [k for k in stored if k.startswith(".polyburn/leases/")]
    masks = {k: v for k, v in stored.items() if not k.startswith(".polyburn/")}
    manifest = masks.pop("manifest.jsonl").decode()
    assert describe_difference(masks, files_of(plain)) == ""
    assert manifest_records(manifest, stored.__getitem__) == manifest_of(plain)


@pytest.mark.parametrize(
    ("deployment", "why"),
    [("nowhere", "does not exist"), ("flat", "does not take one 'params'")],
    ids=["missing", "public-flow"],
)
def test_a_sharded_run_without_its_shard_deployment_fails_fast_and_says_why(
    server, tmp_path, deployment, why
):
    """No such deployment, or one of the public flow (one parameter per field, no shard_of)."""
    from flows.polygons_to_masks import polygons_to_masks

    if deployment == "flat":
        with api(server) as client:
            client.create_deployment(
                flow_id=client.create_flow_from_name(FLOW),
                name=deployment,
                parameter_openapi_schema=polygons_to_masks.parameters.model_dump_for_openapi(),
            )
    params = {
        "source": str(EXPORT),
        "destination": str(tmp_path / "masks"),
        "shards": 2,
        "shard_deployment": f"{FLOW}/{deployment}",
    }
    script = (
        "import json, sys\n"
        "from flows.polygons_to_masks import polygons_to_masks_params\n"
        "from polyburn.params import RunParameters\n"
        "params = RunParameters(**json.loads(sys.argv[1]))\n"
        "state = polygons_to_masks_params(params, return_state=True)\n"
        "print(state.type.value, state.message)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(params)],
        cwd=REPO,
        env=server.client_env({"PREFECT_HOME": str(tmp_path / "home")}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED"), done.stderr[-3000:]
    assert f"{FLOW}/{deployment}' {why}" in last
    assert not (tmp_path / "masks" / "manifest.jsonl").exists()


@pytest.mark.parametrize("fallback", [True, False], ids=["run-here", "no-fallback"])
def test_a_shard_no_worker_starts_is_cancelled_then_run_here_or_reported(
    server, tmp_path, fallback
):
    """A shard deployment nobody serves: each shard run waits POLYBURN_SHARD_START_TIMEOUT and
    is cancelled. Then the parent runs it itself (default), or, with --no-shard-fallback, every
    item of it becomes a failed record: none is lost either way."""
    from flows.polygons_to_masks import polygons_to_masks_params

    schema = polygons_to_masks_params.parameters.model_dump_for_openapi()
    with api(server) as client:
        flow_id = client.create_flow_from_name(FLOW)
        client.create_deployment(flow_id=flow_id, name="unserved", parameter_openapi_schema=schema)
    code, summary, err = polyburn_run(
        server,
        tmp_path / "home",
        str(EXPORT),
        str(tmp_path / "masks"),
        *["--shards", "2", "--shard-deployment", f"{FLOW}/unserved"],
        *([] if fallback else ["--no-shard-fallback"]),
        POLYBURN_SHARD_START_TIMEOUT="2",
    )
    records = manifest_of(tmp_path / "masks")
    assert len(records) == 13
    if fallback:
        assert code == 0, err[-3000:]
        assert (summary["items"], summary["ok"]) == (13, 13)
        assert [(s["state"], s["ran_here"]) for s in summary["shards"]] == [("Completed", True)] * 2
        assert "running it in this process" in err
        assert {r["status"] for r in records} == {"ok"}
    else:
        assert code == 1, err[-3000:]
        assert (summary["items"], summary["failed"]) == (13, 13)
        assert [(s["state"], s["ran_here"]) for s in summary["shards"]] == [
            ("Cancelled", False)
        ] * 2
        assert {r["status"] for r in records} == {"failed"}
        assert all("no worker started it within 2 s" in r["error"] for r in records)
