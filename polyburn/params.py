"""The typed parameters of a polyburn run: one model for the CLI, the flows and the Prefect UI.

The public flow ``polygons-to-masks`` takes the fields of :class:`RunParameters` as parameters of
their own (:data:`FLAT_FIELDS`: ``options`` spread out, :data:`INTERNAL_FIELDS` left out), so that
a deployment run overriding one of them keeps the deployment's others; it builds the model with
:meth:`RunParameters.from_flat`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from polyburn import formats
from polyburn.dataloop_json import DEFAULT_MAX_PIXELS
from polyburn.instances import InstanceIds

Mode = Literal[formats.names()]  # type: ignore[valid-type] - the registry's names
Format = Literal["png", "tif", "npy"]
DrawOrder = Literal["file", "area"]
Frames = Literal["span", "all"]
TaskRunner = Literal["threads", "dask"]


class MaskOptions(BaseModel):
    """How masks are burned and encoded; everything that changes the output bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modes: list[Mode] = Field(
        default=["semantic"],
        min_length=1,
        description="Outputs to write, one or more of: "
        + "; ".join(f"{f.name}: {f.summary}" for f in formats.registry().values())
        + ".",
    )
    format: Format = Field(
        default="png",
        description="png: palette PNG (semantic, uint8) or 16-bit PNG; tif: GeoTIFF; npy: numpy.",
    )
    draw_order: DrawOrder = Field(
        default="file",
        description="Overlaps: 'file' paints in annotation order (later wins); 'area' paints "
        "larger areas first so small objects stay on top.",
    )
    instance_id: InstanceIds = Field(
        default="object",
        description="What an instance mask pixel holds: 'object' the Dataloop objectId (1 to "
        "65535; annotations with the same objectId and label are one instance; others get fresh "
        "ids above the item's largest objectId, reported when they had one); 'shape' the "
        "shape's number in draw order (1, 2, 3...).",
    )
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        gt=0,
        description="Largest width x height accepted for an item (guards memory).",
    )
    skip_empty: bool = Field(
        default=False,
        description="Write no masks for an item with nothing to burn (no polygon or binary "
        "annotation left: only boxes, points, classes...) and remove those an earlier run wrote "
        "for it; default: an all-background mask. Such items are listed in the summary either "
        "way.",
    )

    verify: bool = Field(
        default=False,
        description="Compare every output with what the destination stores (a request per "
        "output on S3) instead of trusting each item's record, and write again what differs or "
        "is gone (outputs deleted or changed by hand).",
    )
    frames: Frames = Field(
        default="span",
        description="Video items: which frames get masks. 'span': from the first frame where any "
        "object exists to the last; 'all': every frame of the video, 0 to its frame count - 1.",
    )

    @field_validator("modes")
    @classmethod
    def _unique_modes(cls, modes: list[str]) -> list[str]:
        return list(dict.fromkeys(modes))


class ShardOf(BaseModel):
    """What a sharded run tells each of its shard runs (set by polyburn, not by users)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str = Field(description="The parent flow run's id: keys the shard runs' idempotency.")
    index: int = Field(ge=0, description="This shard's number, from 0.")
    count: int = Field(ge=2, description="How many shards the parent run made.")
    label_map: dict[str, int] = Field(description="The parent run's label map, used as is.")


DEFAULT_SHARD_DEPLOYMENT = "polygons-to-masks/shard"


class RunParameters(BaseModel):
    """A whole run: where from, where to, and how."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        default="examples/export",
        description="A local Dataloop JSON export folder, or dataloop://DATASET_ID.",
    )
    destination: str = Field(
        default="masks",
        description="A local folder, s3://bucket/prefix, or dataloop://[DATASET_ID] (without "
        "DATASET_ID: the source's dataset).",
    )
    labels: str | None = Field(
        default=None,
        description="Path of a JSON label map {label: id}; default: reuse the destination's, "
        "else the sorted labels, 1-based.",
    )
    options: MaskOptions = Field(default_factory=MaskOptions)
    item_filter: str | None = Field(
        default=None,
        description="Dataloop sources: a DQL filter (JSON) ANDed with the item query.",
    )
    updated_since: datetime | None = Field(
        default=None,
        description="Only items whose annotations changed after this time (incremental runs).",
    )
    item_ids: list[str] | None = Field(
        default=None,
        description="Only these items (Dataloop item ids, or item paths of a local export); "
        "used by event-triggered runs.",
    )
    incremental: bool = Field(
        default=False,
        description="Only items changed since the last successful incremental run of this "
        "source and destination (a watermark kept in a Prefect Variable).",
    )
    refresh_dataset_files: bool = Field(
        default=False,
        description="After a run over part of the source (incremental, item_ids, filter) "
        "that processed items, rewrite manifest.jsonl, the splits and the COCO files from every "
        "item's record, as `polyburn dataset` does (a read of every record: it costs the "
        "destination's size). Full runs always write them. The nightly deployment sets it.",
    )
    task_runner: TaskRunner = Field(
        default="threads",
        description="threads: this process; dask: a distributed cluster (see dask_address).",
    )
    dask_address: str | None = Field(
        default=None,
        description="Scheduler address of an existing Dask cluster (tcp://host:8786); without it "
        "a local cluster is started.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Processes burning items in parallel on this machine; default: one per CPU "
        "core for runs of 100 items or more, else burn in the flow's threads.",
    )
    batch_size: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Items per Prefect task run, on average (from half to twice as many: "
        "batches end where the item paths say, so an added item changes one batch, not all "
        "the later ones, and the others still come from the cache).",
    )
    strict: bool = Field(
        default=False,
        description="Fail the run when any item fails (default: complete and report failures).",
    )
    shards: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="Split the items into this many runs of shard_deployment, which Prefect "
        "workers on any machine pick up; this run lists the items, waits for the shards and "
        "writes the manifest. 0 or 1: no sharding. Needs a destination every worker reaches "
        "(s3:// or a shared folder).",
    )
    shard_deployment: str = Field(
        default=DEFAULT_SHARD_DEPLOYMENT,
        description="The deployment (flow/name) that runs the shards of a sharded run.",
    )
    shard_fallback: bool = Field(
        default=True,
        description="Run a shard that no worker started within POLYBURN_SHARD_START_TIMEOUT "
        "in this run's own process (else its items are reported failed).",
    )
    shard_of: ShardOf | None = Field(
        default=None,
        description="Set by a sharded run on its shard runs; leave empty.",
    )

    @model_validator(mode="after")
    def _shardable(self) -> RunParameters:
        if self.shards > 1 and self.destination.startswith("dataloop://"):
            raise ValueError(
                "shards: a dataloop:// destination keeps its run state on the machine of the "
                "run, so shards on other workers cannot hand back their records; write to "
                "s3:// or a shared folder, or set shards to 0"
            )
        kind = formats.destination_kind(self.destination)
        for output_format in formats.in_order(self.options.modes):
            if kind not in output_format.destinations:
                raise ValueError(_not_accepted(output_format, kind))
        if self.shards > 1 and self.shard_of is not None:
            raise ValueError("shards: a shard run cannot be sharded again")
        return self

    @field_validator("source", "destination")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> RunParameters:
        """The run of a flow whose parameters are flat (:data:`FLAT_FIELDS`): the
        :class:`MaskOptions` fields among ``values`` become ``options``, the rest stay fields."""
        options = {k: v for k, v in values.items() if k in MaskOptions.model_fields}
        rest = {k: v for k, v in values.items() if k not in MaskOptions.model_fields}
        return cls.model_validate({**rest, "options": options})


#: Fields set by polyburn itself (a sharded run on its shard runs), never by a user: the public
#: flow ``polygons-to-masks`` does not take them, the Prefect UI form does not show them.
INTERNAL_FIELDS: tuple[str, ...] = ("shard_of", "shard_deployment")

#: The parameters of the public flow, in its order: every user-settable field of
#: :class:`RunParameters`, with the :class:`MaskOptions` fields in place of ``options``.
FLAT_FIELDS: tuple[str, ...] = tuple(
    name
    for field in RunParameters.model_fields
    if field not in INTERNAL_FIELDS
    for name in (MaskOptions.model_fields if field == "options" else (field,))
)

#: JSON-schema keywords of a field's constraints (``ge``, ``le``, ``gt``, ``min_length``...).
_CONSTRAINTS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
)


def flat_parameter_fields() -> dict[str, FieldInfo]:
    """Each of :data:`FLAT_FIELDS` as the default of a flow parameter: its model field's default
    and description, plus the field's JSON-schema constraints, which Prefect copies into the
    deployment's parameter schema so the UI form and the server check them too (Prefect reads a
    ``Field`` default's default, description and ``json_schema_extra``, nothing else)."""
    fields: dict[str, FieldInfo] = {}
    for model in (RunParameters, MaskOptions):
        schema = model.model_json_schema()["properties"]
        for name, field in model.model_fields.items():
            if name not in FLAT_FIELDS:
                continue
            constraints = {k: v for k, v in schema[name].items() if k in _CONSTRAINTS}
            fields[name] = Field(
                default=field.default,
                description=field.description,
                json_schema_extra=constraints or None,
            )
    return fields


def _not_accepted(output_format: formats.OutputFormat, kind: str) -> str:
    names = {"folder": "a folder", "s3": "s3://", "dataloop": "a dataloop:// destination"}
    kinds = formats.DESTINATION_KINDS
    accepted = " or ".join(names[k] for k in kinds if k in output_format.destinations)
    what = names[kind]
    return (
        f"options.modes: {output_format.name} writes {output_format.writes}, which {what} cannot "
        f"hold; write to {accepted}, or leave {output_format.name} out"
    )
