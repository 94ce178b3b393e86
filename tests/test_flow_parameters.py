"""The public flow's parameters as Prefect sees them: one per field, merged with a deployment's.

Prefect merges a run's parameters into its deployment's at the top level only (the server's
``create_flow_run_from_deployment``: ``deployment.parameters.update(run parameters)``; the UI's
form and ``prefect deployment run --param`` both send run parameters), so every field a user
sets is a parameter of its own. The schema tests need no Prefect API; the runs use the session's
test harness (a real Prefect API) and register deployments nobody serves: the flow runs they
create stay scheduled, and their parameters are what the server merged.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
import uuid

import pytest
from prefect.utilities.callables import parameter_schema

from deployments import DeploymentSettings, build_deployments, on_demand
from flows.polygons_to_masks import polygons_to_masks, polygons_to_masks_params
from polyburn.params import FLAT_FIELDS, INTERNAL_FIELDS, MaskOptions, Mode, RunParameters
from tests.support.oracle import EXAMPLES

#: Raw HTML in a description: the Prefect UI renders descriptions as markdown and drops it
#: (``dataloop://<dataset-id>`` showed as ``dataloop://``).
HTML_TAG = re.compile(r"</?[A-Za-z][\w-]*[^>]*>")


def schema_of(flow) -> dict:
    """The parameter schema a deployment of ``flow`` gets (what the UI form is built from)."""
    return parameter_schema(flow).model_dump_for_openapi()


def descriptions(schema: dict) -> list[str]:
    """Every description in a JSON schema, nested ones included."""
    found = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "description" and isinstance(value, str):
                found.append(value)
            else:
                found += descriptions(value)
    elif isinstance(schema, list):
        for value in schema:
            found += descriptions(value)
    return found


def test_every_field_a_user_sets_is_a_parameter_of_the_public_flow_internal_ones_are_not():
    """A field added to RunParameters or MaskOptions fails here until the flow takes it (or it
    is declared internal)."""
    public = [f for f in RunParameters.model_fields if f not in {*INTERNAL_FIELDS, "options"}]
    assert set(FLAT_FIELDS) == set(public) | set(MaskOptions.model_fields)
    hints = typing.get_type_hints(polygons_to_masks.fn)
    assert list(polygons_to_masks.parameters.properties) == list(FLAT_FIELDS)
    for name in FLAT_FIELDS:
        model = MaskOptions if name in MaskOptions.model_fields else RunParameters
        field = model.model_fields[name]
        assert hints[name] == field.annotation, name
        if name not in ("source", "destination"):
            default = polygons_to_masks.parameters.properties[name]["default"]
            assert default == field.default, name
            assert polygons_to_masks.parameters.properties[name]["description"] == (
                field.description
            ), name


def test_the_form_cannot_drop_source_or_destination_nor_show_internal_fields():
    schema = schema_of(polygons_to_masks)
    properties = schema["properties"]
    assert schema["required"] == ["source", "destination"]
    for name in ("source", "destination"):
        assert properties[name]["type"] == "string", name  # no anyOf: no "None" choice
        assert "anyOf" not in properties[name] and "default" not in properties[name], name
        described = " ".join(properties[name]["description"].split())  # from the docstring
        assert described == RunParameters.model_fields[name].description, name
    assert not {*INTERNAL_FIELDS, "params", "options"} & set(properties)
    assert "null" not in json.dumps({k: properties[k] for k in ("source", "destination")})
    # the fields' limits and choices are in the form too
    assert properties["batch_size"]["minimum"] == 1 and properties["batch_size"]["maximum"] > 1
    assert properties["modes"]["minItems"] == 1
    assert properties["modes"]["items"]["enum"] == list(typing.get_args(Mode))
    assert {"semantic", "instance", "binary", "coco"} <= set(typing.get_args(Mode))
    assert properties["instance_id"]["enum"] == ["object", "shape"]
    assert "objectId" in properties["instance_id"]["description"]
    assert all(p.get("description") for p in properties.values())


def test_no_description_the_ui_shows_holds_an_html_tag():
    texts = descriptions(schema_of(polygons_to_masks))
    texts += descriptions(schema_of(polygons_to_masks_params))  # the shard deployment's form
    texts += [polygons_to_masks.description, polygons_to_masks_params.description]
    for deployment in build_deployments(DeploymentSettings()):
        texts.append(deployment.description or "")
        texts += [trigger.description or "" for trigger in deployment.triggers]
    assert any("dataloop://DATASET_ID" in text for text in texts)  # the placeholder, kept
    assert [t for t in texts if HTML_TAG.search(t)] == []


@pytest.fixture
def deployment_name(prefect_api, tmp_path):
    """An ``on-demand`` deployment as ``polyburn serve`` registers it, under a name of its own,
    with a source and destination of its own and two modes; nobody serves it."""
    settings = DeploymentSettings(
        source=str(EXAMPLES / "export"),
        destination=str(tmp_path / "masks"),
        modes=("semantic", "binary"),
    )
    deployment = on_demand(settings)
    deployment.name = f"on-demand-{uuid.uuid4().hex[:8]}"
    deployment.apply()
    return f"{deployment.flow_name}/{deployment.name}", settings


def test_a_run_overriding_one_parameter_keeps_the_deployments_others(deployment_name):
    """What the UI's custom run and ``run_deployment`` send: the parameters to change."""
    from prefect.deployments import run_deployment

    name, settings = deployment_name
    run = run_deployment(name, parameters={"modes": ["instance"]}, timeout=0, as_subflow=False)
    assert run.parameters == {
        "source": settings.source,
        "destination": settings.destination,
        "modes": ["instance"],
    }
    run = run_deployment(name, parameters={"skip_empty": True}, timeout=0, as_subflow=False)
    assert run.parameters == {**settings.base_parameters(), "skip_empty": True}
    assert RunParameters.from_flat(run.parameters).options.modes == ["semantic", "binary"]


def test_prefect_deployment_run_param_overrides_one_field(deployment_name, tmp_path):
    """``prefect deployment run --param`` (the real CLI): one field changed, the rest kept."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    name, settings = deployment_name
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", name]
        + ["--param", 'modes=["coco"]', "--param", "batch_size=7"],
        env={
            **_environment(),
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "PREFECT_HOME": str(tmp_path / "home"),
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(run_id))
    assert run.parameters == {
        "source": settings.source,
        "destination": settings.destination,
        "modes": ["coco"],
        "batch_size": 7,
    }


def _environment() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"
    }
