"""Where masks go. A destination is one module; :func:`open_destination` picks it from a URI."""

from __future__ import annotations

from polyburn.destinations.base import Destination, OutputRecord


def open_destination(uri: str, **options) -> Destination:
    """``s3://bucket/prefix`` → S3, ``dataloop://dataset`` → Dataloop, anything else → a folder."""
    if uri.startswith("s3://"):
        from polyburn.destinations.s3 import S3Destination

        return S3Destination.from_uri(uri, **options)
    if uri.startswith("dataloop://"):
        from polyburn.destinations.dataloop import DataloopDestination

        return DataloopDestination.from_uri(uri, **options)
    from polyburn.destinations.local import LocalDestination

    return LocalDestination(uri)


def resolve_destination_uri(uri: str, source_uri: str) -> str:
    """``dataloop://`` alone means the source's own Dataloop dataset; other URIs are unchanged.

    Raises ConfigError when the source is not a Dataloop dataset.
    """
    if uri.strip().rstrip("/") not in ("dataloop:", "dataloop:/"):
        return uri
    if not source_uri.startswith("dataloop://") or not source_uri[11:].strip("/"):
        from polyburn.errors import ConfigError

        raise ConfigError(
            "destination dataloop:// means the source's dataset, but the source is not "
            "dataloop://<dataset-id>"
        )
    return "dataloop://" + source_uri[11:].strip("/")


__all__ = ["Destination", "OutputRecord", "open_destination", "resolve_destination_uri"]
