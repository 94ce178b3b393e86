"""What the deployments read from the environment (:mod:`polyburn.settings`), checked once, before
anything is registered.

=============================  ===================  ============================================
variable                       default              meaning
=============================  ===================  ============================================
``POLYBURN_SOURCE``            ``examples/export``  source of every deployment: a local export
                                                    folder or ``dataloop://DATASET_ID``
``POLYBURN_DESTINATION``       ``masks``            folder, ``s3://bucket/prefix`` or
                                                    ``dataloop://[DATASET_ID]``
``POLYBURN_MODES``             ``semantic``         comma-separated masks to write
``POLYBURN_NIGHTLY_CRON``      ``0 2 * * *``        schedule of ``nightly``
``POLYBURN_TIMEZONE``          ``UTC``              IANA time zone of that schedule
``POLYBURN_DEBOUNCE_SECONDS``  ``60``               quiet period of ``on-annotation`` (>= 10)
``POLYBURN_SERVE_LIMIT``       ``4``                flow runs ``polyburn serve`` runs at once
                                                    (``0``: no limit)
=============================  ===================  ============================================

Relative local paths are relative to the working directory of the process that runs the flow
(``polyburn serve``'s, or the one the ``prefect.yaml`` pull step sets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from polyburn.errors import ConfigError

#: The shortest quiet period Prefect accepts for a proactive trigger.
MIN_DEBOUNCE_SECONDS = 10


@dataclass(frozen=True)
class DeploymentSettings:
    """The operator's choices for the four deployments; see the module docstring."""

    source: str = "examples/export"
    destination: str = "masks"
    modes: tuple[str, ...] = ("semantic",)
    nightly_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    debounce_seconds: int = 60
    serve_limit: int | None = 4

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DeploymentSettings:
        """Settings from ``POLYBURN_*`` variables (``os.environ`` by default); unset or empty
        variables keep the defaults. Raises ConfigError naming the variable that is wrong."""
        from polyburn import settings as config

        current = config.settings() if env is None else config.Settings.from_env(env)
        settings = cls(
            source=current.source,
            destination=current.destination,
            modes=current.modes,
            nightly_cron=current.nightly_cron,
            timezone=current.timezone,
            debounce_seconds=current.debounce_seconds,
            serve_limit=current.serve_limit or None,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raise ConfigError when a value cannot work (the flow parameters, the cron string, the
        time zone, the quiet period)."""
        from pydantic import ValidationError

        from polyburn.params import RunParameters

        try:
            RunParameters.from_flat(self.base_parameters())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"POLYBURN_* setting {where}: {first['msg']}") from None
        for name, value in (
            ("POLYBURN_SOURCE", self.source),
            ("POLYBURN_DESTINATION", self.destination),
        ):
            if "{" in value or "}" in value:
                # Both end up in Jinja templates of the event trigger.
                raise ConfigError(f"{name} must not contain braces: {value!r}")
        try:
            from prefect.schedules import Cron

            Cron(self.nightly_cron, timezone=self.timezone)
        except ValueError as exc:
            raise ConfigError(f"POLYBURN_NIGHTLY_CRON: {exc}".splitlines()[0]) from None
        try:
            ZoneInfo(self.timezone)
        except (ValueError, ZoneInfoNotFoundError):
            raise ConfigError(f"POLYBURN_TIMEZONE: unknown time zone {self.timezone!r}") from None
        if self.debounce_seconds < MIN_DEBOUNCE_SECONDS:
            raise ConfigError(
                f"POLYBURN_DEBOUNCE_SECONDS must be at least {MIN_DEBOUNCE_SECONDS} "
                f"(got {self.debounce_seconds})"
            )
        if self.serve_limit is not None and self.serve_limit < 1:
            raise ConfigError("POLYBURN_SERVE_LIMIT must be 0 (no limit) or positive")

    @property
    def dataset_id(self) -> str | None:
        """The Dataloop dataset of the source, or None for a local source."""
        prefix = "dataloop://"
        if self.source.startswith(prefix):
            return self.source[len(prefix) :].strip("/") or None
        return None

    def base_parameters(self) -> dict[str, Any]:
        """The flow parameters every deployment of the public flow shares (JSON-ready)."""
        return {"source": self.source, "destination": self.destination, "modes": list(self.modes)}

    def shard_parameters(self) -> dict[str, Any]:
        """The same as one ``RunParameters`` (JSON-ready), the ``params`` of the shard
        deployment's flow; a parent run replaces it whole with its shard's."""
        from polyburn.params import RunParameters

        run = RunParameters.from_flat(self.base_parameters())
        return run.model_dump(mode="json", exclude_unset=True)
