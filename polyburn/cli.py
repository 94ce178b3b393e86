"""``polyburn run`` / ``validate`` / ``manifest`` / ``dataset`` / ``serve`` / ``events``: the
command line.

``run`` starts the Prefect flow on whatever Prefect API is configured (``PREFECT_API_URL``), or on
Prefect's ephemeral API when none is (no server to start; ~15 s of start-up). ``validate`` needs no
Prefect at all. Exit codes: 0 all items ok, 1 some item failed, 2 bad options or input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from polyburn import formats, version
from polyburn.errors import ConfigError, PolyburnError

if TYPE_CHECKING:
    from polyburn.records import RunSummary


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, PolyburnError) as exc:
        print(f"polyburn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polyburn: interrupted", file=sys.stderr)
        return 130


def _option(name: str):
    """The :class:`~polyburn.params.MaskOptions` field ``name``: one declaration for the CLI,
    the flow and the UI."""
    from polyburn.params import MaskOptions

    return MaskOptions.model_fields[name]


def _choices(name: str) -> dict[str, Any]:
    """``default`` and ``choices`` of a CLI option from its Literal-typed MaskOptions field."""
    field = _option(name)
    return {"default": field.default, "choices": list(get_args(field.annotation))}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyburn", description="Dataloop polygon annotations to exact segmentation masks."
    )
    parser.add_argument(
        "--version", action="version", version=f"polyburn {version()}", help="print the version"
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="burn masks from SOURCE into DEST")
    run.add_argument("source", metavar="SOURCE", help="export folder or dataloop://<dataset>")
    run.add_argument("dest", metavar="DEST", help="folder, s3://bucket/prefix or dataloop://")
    run.add_argument(
        "--mode",
        default=",".join(_option("modes").default),
        help=f"comma-separated, one or more of: {','.join(formats.names())}",
    )
    run.add_argument("--labels", metavar="FILE", help="label map JSON {label: id}")
    run.add_argument("--filter", metavar="DQL-JSON", help="Dataloop: extra DQL item filter")
    run.add_argument(
        "--updated-since", metavar="ISO-TIME", help="only items changed after this time"
    )
    run.add_argument(
        "--item",
        action="append",
        metavar="ID_OR_PATH",
        help="only this item (repeatable): a Dataloop item id, or the item path as the manifest "
        "writes it (e.g. street/scene_001)",
    )
    run.add_argument("--format", **_choices("format"))
    run.add_argument("--draw-order", **_choices("draw_order"))
    run.add_argument(
        "--instance-id",
        **_choices("instance_id"),
        help="what an instance mask pixel holds: the Dataloop objectId (parts of one object "
        "share it) or the shape's number in draw order",
    )
    run.add_argument(
        "--frames",
        **_choices("frames"),
        help="video items: masks for the frames from the first object's first frame to the last "
        "object's last frame (span), or for every frame of the video (all)",
    )
    run.add_argument("--batch-size", type=int, default=100)
    run.add_argument("--max-pixels", type=int, default=None)
    run.add_argument("--strict", action="store_true", help="fail the flow run on any failure")
    run.add_argument(
        "--skip-empty",
        action="store_true",
        help="write no masks for items with nothing to burn (only boxes, points, classes...) "
        "and remove those an earlier run wrote",
    )
    run.add_argument(
        "--verify",
        action="store_true",
        help="compare every output with what the destination stores instead of trusting each "
        "item's record; writes again what was deleted or changed by hand",
    )
    run.add_argument(
        "--shards",
        type=int,
        default=0,
        help="split the run into this many runs of the shard deployment (needs a Prefect "
        "server whose workers serve it)",
    )
    run.add_argument(
        "--no-shard-fallback",
        action="store_true",
        help="report the items of a shard no worker starts as failed instead of running it here",
    )
    run.add_argument(
        "--shard-deployment",
        default=None,
        help="the deployment that runs the shards (default polygons-to-masks/shard)",
    )
    run.add_argument(
        "--dataloop-concurrency",
        type=int,
        metavar="N",
        help="Dataloop requests in flight per process (default 8; env "
        "POLYBURN_DATALOOP_CONCURRENCY)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.set_defaults(handler=_run)

    validate = sub.add_parser("validate", help="report geometry problems without writing masks")
    validate.add_argument("source", metavar="SOURCE", help="export folder or dataloop://<dataset>")
    validate.add_argument("--max-pixels", type=int, default=None)
    validate.add_argument("--json", action="store_true", help="one JSON record per item")
    validate.set_defaults(handler=_validate)

    manifest = sub.add_parser(
        "manifest", help="print every item's current record of DEST (JSON lines, by path)"
    )
    manifest.add_argument(
        "dest", metavar="DEST", help="folder, s3://bucket/prefix or dataloop://<id>"
    )
    manifest.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    manifest.add_argument(
        "--compact",
        action="store_true",
        help="also rewrite DEST/manifest.jsonl from the current records (nothing is burned)",
    )
    manifest.set_defaults(handler=_manifest)

    dataset = sub.add_parser(
        "dataset",
        help="rewrite the dataset files of DEST (manifest.jsonl, splits/*.txt, coco/*.json) "
        "from its current records and COCO fragments, burning nothing",
    )
    dataset.add_argument("dest", metavar="DEST", help="folder or s3://bucket/prefix")
    dataset.set_defaults(handler=_dataset)

    serve = sub.add_parser(
        "serve", help="serve the nightly, on-demand, on-annotation and shard deployments"
    )
    serve.add_argument(
        "--limit",
        type=int,
        default=None,
        help="flow runs at once (default: POLYBURN_SERVE_LIMIT, else 4; 0: no limit)",
    )
    serve.add_argument(
        "--deployment",
        action="append",
        choices=["nightly", "on-demand", "on-annotation", "shard"],
        help="serve only this deployment (repeatable); e.g. `--deployment shard` on the extra "
        "machines of sharded runs",
    )
    serve.set_defaults(handler=_serve)

    events = sub.add_parser("events", help="receive Dataloop webhooks and emit Prefect events")
    events.add_argument("--host", default="127.0.0.1", help="address to listen on")
    events.add_argument("--port", type=int, default=8787, help="port to listen on")
    events.add_argument(
        "--ssl-certfile", type=Path, help="serve HTTPS with this PEM certificate (chain)"
    )
    events.add_argument(
        "--ssl-keyfile", type=Path, help="the certificate's PEM private key (if not in it)"
    )
    events.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest request body; larger ones get 413 without being read (default 1000000)",
    )
    events.add_argument(
        "--request-timeout",
        type=float,
        help="seconds a client may take to send its headers, and again its body (default 15)",
    )
    events.add_argument(
        "--shutdown-timeout",
        type=float,
        help="on SIGTERM/SIGINT, seconds accepted requests may take to finish (default 30)",
    )
    events.add_argument(
        "--max-connections",
        type=int,
        help="connections served at once; more get 503 (default 500)",
    )
    events.set_defaults(handler=_events)
    return parser


def _parameters(args: argparse.Namespace):
    from pydantic import ValidationError

    from polyburn.params import RunParameters

    options: dict[str, Any] = {
        "modes": [m.strip() for m in args.mode.split(",") if m.strip()],
        "format": args.format,
        "draw_order": args.draw_order,
        "instance_id": args.instance_id,
        "skip_empty": args.skip_empty,
        "verify": args.verify,
        "frames": args.frames,
    }
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels
    try:
        return RunParameters(
            source=args.source,
            destination=args.dest,
            labels=args.labels,
            options=options,
            batch_size=args.batch_size,
            item_filter=args.filter,
            updated_since=args.updated_since,
            item_ids=args.item,
            strict=args.strict,
            shards=args.shards,
            shard_fallback=not args.no_shard_fallback,
            **({"shard_deployment": args.shard_deployment} if args.shard_deployment else {}),
        )
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc)) from None


def _validation_message(exc) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "parameters"
    return f"invalid {where} ({first.get('input')!r:.60}): {first['msg']}"


def _run(args: argparse.Namespace) -> int:
    params = _parameters(args)
    if args.dataloop_concurrency is not None:
        if args.dataloop_concurrency < 1:
            raise ConfigError("--dataloop-concurrency must be at least 1")
        from polyburn import settings as config

        # the burn workers this run starts are handed these settings (polyburn.parallel)
        config.override(dataloop_concurrency=args.dataloop_concurrency)
    _check_before_prefect(params)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from flows.polygons_to_masks import polygons_to_masks_params
    from polyburn import progress
    from polyburn.losses import RejectionLog
    from polyburn.records import RunSummary
    from polyburn.report import write_json_summary

    bar = None if args.no_progress or not sys.stderr.isatty() else _ProgressBar()
    progress.set_listener(bar.update if bar else None)
    rejections = RejectionLog() if args.json else None  # --json lists every one of them
    progress.set_records_listener(rejections.take if rejections else None)
    started = time.perf_counter()
    try:
        state = polygons_to_masks_params(params, return_state=True)
    finally:
        progress.set_listener(None)
        progress.set_records_listener(None)
        if bar:
            bar.close()
    try:
        result = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - the flow crashed before producing a summary
        print(f"polyburn: run failed: {exc}", file=sys.stderr)
        return 2
    if not isinstance(result, dict):
        print(f"polyburn: run failed: {state.message or result}", file=sys.stderr)
        return 2
    summary = RunSummary.from_dict(result)  # the flow's result is the summary's dict form
    if rejections is not None:
        with closing(rejections):
            every = rejections if rejections.taken else summary.rejections
            write_json_summary(summary.as_dict(), every, sys.stdout)
    else:
        _print_summary(summary, params.destination, time.perf_counter() - started)
    return 1 if summary.failed else 0


def _check_before_prefect(params) -> None:
    """Fail in a second, not after Prefect's start-up, on a missing source or a bad label map."""
    from polyburn.labels import load_label_map
    from polyburn.sources import open_source

    if params.labels:
        load_label_map(params.labels)
    source = open_source(params.source, params.item_filter, params.updated_since)
    check = getattr(source, "check", None)  # Dataloop: login, dataset and filter, in a second
    if check is not None:
        check()
    if params.destination.startswith(("dataloop://", "s3://")):  # S3: bucket, credentials
        from polyburn.destinations import open_destination, resolve_destination_uri

        open_destination(resolve_destination_uri(params.destination, params.source))


def _print_summary(summary: RunSummary, destination: str, seconds: float) -> None:
    from polyburn.destinations.base import MANIFEST_KEY
    from polyburn.report import losses_text

    print(
        f"{summary.items} items: {summary.ok} ok, {summary.failed} failed | "
        f"{summary.annotations} annotations, {summary.repairs} repairs, "
        f"{summary.rejected} rejected, {sum(summary.skipped_by_type.values())} skipped "
        f"(not polygon/binary) | {summary.outputs_written} files written | {seconds:.1f} s"
    )
    if summary.repairs_by_kind:
        kinds = ", ".join(f"{k} {v}" for k, v in summary.repairs_by_kind.items())
        print(f"repairs: {kinds}")
    for failure in summary.failures:
        print(f"FAILED {failure['error']}")
    manifest = f"{destination.rstrip('/')}/{MANIFEST_KEY}"
    for line in losses_text(summary, manifest):
        print(line)
    print(f"masks, label_map.json and manifest.jsonl in {destination}")


def _validate(args: argparse.Namespace) -> int:
    from polyburn.dataloop_json import DEFAULT_MAX_PIXELS
    from polyburn.losses import rejections_of
    from polyburn.params import MaskOptions
    from polyburn.pipeline import process_item
    from polyburn.report import at_frame, rejection_line
    from polyburn.sources import open_source

    source = open_source(args.source)
    options = MaskOptions(max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    failed = problems = repairs = items = 0
    for ref in source.list_items():
        record = process_item(ref, source, None, options, {})
        items += 1
        failed += not record.ok
        if args.json:
            print(json.dumps(record.to_dict(), ensure_ascii=False, sort_keys=True))
            continue
        if record.error:
            print(f"FAILED {record.error}")
        for rejection in rejections_of(record):
            problems += 1
            print(f"REJECTED {rejection_line(rejection)}")
        for repair in record.repairs or ():
            repairs += 1
            area = ""
            if repair["area_before"] is not None:
                area = f" (area {repair['area_before']} -> {repair['area_after']})"
            print(
                f"REPAIRED {record.path} annotation {repair['annotation']}{at_frame(repair)}: "
                f"{repair['kind']}{area} {repair['detail']}".rstrip()
            )
    if not args.json:
        print(f"{items} items: {failed} failed, {problems} annotations rejected, {repairs} repairs")
    return 1 if failed or problems else 0


def _manifest(args: argparse.Namespace) -> int:
    """Stream the destination's current manifest; with ``--compact`` also store it as
    ``manifest.jsonl``. Needs no Prefect."""
    import shutil
    import tempfile
    from pathlib import Path

    from polyburn.destinations import open_destination
    from polyburn.state import current_records, write_snapshot

    destination = open_destination(args.dest)
    try:
        with tempfile.TemporaryDirectory(prefix="polyburn-manifest-") as folder:
            scratch = Path(folder)
            read = write_snapshot if args.compact else current_records
            with read(destination.state, scratch) as spool:
                target = Path(args.output) if args.output else scratch / "manifest.jsonl"
                spool.write_manifest(target)
                items = len(spool)
            if not args.output:
                with open(target, "rb") as handle:
                    shutil.copyfileobj(handle, sys.stdout.buffer)
                sys.stdout.flush()
    finally:
        destination.close()
    where = f" and {args.dest.rstrip('/')}/manifest.jsonl" if args.compact else ""
    print(
        f"polyburn: {items} item records{' to ' + args.output if args.output else ''}{where}",
        file=sys.stderr,
    )
    return 0


def _dataset(args: argparse.Namespace) -> int:
    """Bring the dataset-level files up to date after partial or event-driven runs."""
    import tempfile

    from polyburn.dataset import write_dataset_files
    from polyburn.destinations import open_destination
    from polyburn.state import write_snapshot

    if args.dest.startswith("dataloop://"):
        raise ConfigError(
            "polyburn dataset writes files (splits, COCO JSON) to a folder or s3:// destination; "
            "for a dataloop:// destination use polyburn manifest DEST --compact"
        )
    destination = open_destination(args.dest)
    written: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="polyburn-dataset-") as folder:
            scratch = Path(folder)

            def dataset_files(spool) -> None:
                written.update(write_dataset_files(destination.state, spool, scratch))

            with write_snapshot(destination.state, scratch, dataset_files) as spool:
                items = len(spool)
    finally:
        destination.close()
    root = args.dest.rstrip("/")
    print(f"{root}/manifest.jsonl: {items} item records")
    for key, count in written.items():
        print(f"{root}/{key}: {count} items")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve the four deployments from this process until interrupted."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from deployments import DeploymentSettings, build_deployments

    settings = DeploymentSettings.from_env()
    limit = settings.serve_limit if args.limit is None else (args.limit or None)
    if not _prefect_api_url():
        print(
            "polyburn: note: PREFECT_API_URL is not set, so this serves against Prefect's "
            "ephemeral API inside this process. It has no scheduler (the nightly schedule "
            "never fires), no UI, and nothing outside this process can start runs or send "
            "events to it. For real use run `prefect server start` and export "
            "PREFECT_API_URL=http://<host>:4200/api.",
            file=sys.stderr,
        )
    deployments = build_deployments(settings)
    if args.deployment:
        deployments = [d for d in deployments if d.name in args.deployment]
    print(
        f"polyburn: serving {', '.join(d.name for d in deployments)} "
        f"(source {settings.source}, destination {settings.destination}, "
        f"at most {limit or 'unlimited'} run(s) at once)",
        file=sys.stderr,
    )
    from prefect import serve

    serve(*deployments, limit=limit)
    return 0


def _events(args: argparse.Namespace) -> int:
    """Run the Dataloop webhook receiver until SIGTERM or SIGINT, then shut down gracefully."""
    import logging

    if not _prefect_api_url():
        raise ConfigError(
            "polyburn events needs PREFECT_API_URL (the Prefect server that runs the "
            "on-annotation deployment); an ephemeral API would swallow the events"
        )
    from polyburn.events import load_verifier
    from polyburn.receiver import create_app, serve

    options = _receiver_options(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    verifier = load_verifier()
    app = create_app(verifier, options=options)
    modes = [m for m, on in (("HMAC", verifier.secret), ("token", verifier.token)) if on]

    def ready(url: str) -> None:
        print(
            f"polyburn: receiving Dataloop webhooks on {url} "
            f"({' and '.join(modes)} authentication)",
            file=sys.stderr,
            flush=True,
        )

    serve(app, options, on_ready=ready)
    return 0


def _receiver_options(args: argparse.Namespace):
    """The receiver's options from the command line (unset ones keep ReceiverOptions'
    defaults); ConfigError for impossible ones."""
    from polyburn.receiver import ReceiverOptions

    if args.ssl_keyfile and not args.ssl_certfile:
        raise ConfigError("--ssl-keyfile needs --ssl-certfile")
    for path in (args.ssl_certfile, args.ssl_keyfile):
        if path is not None and not path.is_file():
            raise ConfigError(f"no such file: {path}")
    tuning = {
        name: getattr(args, name)
        for name in ("max_body_bytes", "request_timeout", "shutdown_timeout", "max_connections")
        if getattr(args, name) is not None
    }
    for name, value in tuning.items():
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    return ReceiverOptions(
        host=args.host,
        port=args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        **tuning,
    )


def _prefect_api_url() -> str | None:
    """The Prefect API configured by environment or profile, None when Prefect would start an
    ephemeral one."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


class _ProgressBar:
    """A rich progress bar on stderr (rich comes with Prefect)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._task = self._progress.add_task("burning", total=None)
        self._progress.start()

    def update(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        self._progress.stop()


if __name__ == "__main__":
    sys.exit(main())
