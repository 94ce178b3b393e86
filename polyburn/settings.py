"""polyburn's settings: every ``POLYBURN_*`` and ``DATALOOP_*`` environment variable, in one model.

Contract
--------
* **One model.** :class:`Settings` is a ``pydantic-settings`` model, the way Prefect configures
  itself: each field is one environment variable, ``POLYBURN_<FIELD>``, except the Dataloop ones,
  which keep the names Dataloop users already have (``DATALOOP_API_KEY``, ``DATALOOP_GATE_URL``,
  ``DATALOOP_PATH``, ...). Each field has a type, a default, bounds and a description; the table
  in ``docs/configuration.md`` is generated from them (``tests/test_settings.py`` fails when it
  differs). An unset or empty variable keeps the default (except ``POLYBURN_DATALOOP_LIMIT``,
  where empty means "no throttling"). Secrets are :class:`~pydantic.SecretStr`: their repr,
  ``str`` and the model's repr show ``**********``.
* **Read once per process.** :func:`settings` reads the environment the first time it is called
  and returns the same object afterwards; nothing in polyburn reads these variables at import
  time or anywhere else. :func:`reset` forgets it (tests that change the environment call it).
  A bad value raises :class:`~polyburn.errors.ConfigError`, one line that names the variable and
  what it must be, never the value of a secret. The burn pool's worker processes are given the
  parent's object when they start (:mod:`polyburn.parallel`), so they see the same values.
* **One credential resolver.** :func:`credential` resolves all four credentials by one
  precedence:

  1. the Prefect block named by the ``*_BLOCK`` variable (``DATALOOP_API_KEY_BLOCK``,
     ``POLYBURN_AWS_CREDENTIALS_BLOCK``, ``POLYBURN_WEBHOOK_SECRET_BLOCK``,
     ``POLYBURN_WEBHOOK_TOKEN_BLOCK``), when it is set;
  2. else the value of the variable itself (``DATALOOP_API_KEY``, ``POLYBURN_WEBHOOK_SECRET``,
     ``POLYBURN_WEBHOOK_TOKEN``; AWS keys are no polyburn setting);
  3. else the library's default: boto3's own credential chain for S3, nothing for the others
     (the Dataloop source then fails with ConfigError, the receiver with "no webhook
     credentials").

  A named block wins because naming it is the deliberate, central choice (a deployment or a
  work pool sets it); a value beside it is ignored with a warning. A block that cannot be loaded
  is a ConfigError naming the variable and the block, never a fallback to the value.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_core import PydanticUseDefault
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from polyburn.errors import ConfigError

log = logging.getLogger("polyburn.settings")

PREFIX = "POLYBURN_"
MODES = ("semantic", "instance", "binary", "coco")


def _alias(name: str) -> AliasChoices:
    return AliasChoices(name)


def _section(name: str) -> dict[str, Any]:
    return {"section": name}


class Settings(BaseSettings):
    """Every ``POLYBURN_*``/``DATALOOP_*`` variable polyburn reads; see the module docstring."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        case_sensitive=False,  # names are matched case-insensitively, as pydantic-settings does
        extra="ignore",
        frozen=True,
        str_strip_whitespace=True,
        validate_default=True,
    )

    # ------------------------------------------------------------------------------ Dataloop
    dataloop_api_key: SecretStr | None = Field(
        None,
        validation_alias=_alias("DATALOOP_API_KEY"),
        description="Dataloop API key (a JWT). Ignored when `DATALOOP_API_KEY_BLOCK` is set.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_api_key_block: str | None = Field(
        None,
        validation_alias=_alias("DATALOOP_API_KEY_BLOCK"),
        description="Name of a Prefect `Secret` block holding the Dataloop API key; wins over "
        "`DATALOOP_API_KEY`.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_gate_url: str | None = Field(
        None,
        validation_alias=_alias("DATALOOP_GATE_URL"),
        description="Gate of a private Dataloop deployment (`https://host` or "
        "`https://host/api/v1`); unset: the SDK's `prod` gate.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_path: str | None = Field(
        None,
        validation_alias=_alias("DATALOOP_PATH"),
        description="The `dtlpy` SDK's home (cookie file with tokens, logs); unset: a private "
        "0700 temporary folder, removed at exit.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_attempts: int = Field(
        6,
        ge=1,
        description="Attempts per Dataloop request.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_backoff_base: float = Field(
        0.5,
        ge=0,
        description="Seconds of backoff after the first failed attempt (doubles per attempt).",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_backoff_max: float = Field(
        20.0,
        ge=0,
        description="Cap on one backoff, seconds.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_max_retry_after: float = Field(
        60.0,
        ge=0,
        description="Longest `Retry-After` honoured, seconds.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_timeout: float = Field(
        60.0,
        gt=0,
        description="Read timeout of one Dataloop request, seconds (connect: 10 s).",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_limit: str = Field(
        "dataloop-api",
        description="Prefect global concurrency limit every Dataloop call takes a slot of "
        "(when it exists); empty: no throttling.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_limit_ttl: float = Field(
        60.0,
        ge=0,
        description="Seconds a look-up of that limit is reused.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_limit_batch: int | None = Field(
        None,
        ge=1,
        description="Rate-limit slots taken per Prefect round trip; unset: a quarter of the "
        "limit, at most 10.",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_concurrency: int = Field(
        8,
        ge=1,
        description="Dataloop requests one process keeps in flight (`polyburn run "
        "--dataloop-concurrency`).",
        json_schema_extra=_section("Dataloop"),
    )
    dataloop_page_size: int = Field(
        1000,
        ge=1,
        le=1000,
        description="Items per page when listing a dataset.",
        json_schema_extra=_section("Dataloop"),
    )
    state_dir: str | None = Field(
        None,
        description="Where a `dataloop://` destination keeps its label map and manifest; "
        "unset: `$XDG_CACHE_HOME/polyburn` (`~/.cache/polyburn`).",
        json_schema_extra=_section("Dataloop"),
    )

    # ------------------------------------------------------------------------------------ S3
    aws_credentials_block: str | None = Field(
        None,
        description="Prefect `AwsCredentials` block (or `<block-type-slug>/<name>`) for S3; "
        "unset: boto3's default credential chain. Needs `prefect-aws`.",
        json_schema_extra=_section("S3"),
    )
    s3_max_attempts: int = Field(
        5,
        ge=1,
        description="Attempts per S3 request (botocore `standard` retries).",
        json_schema_extra=_section("S3"),
    )
    s3_connect_timeout: float = Field(
        10.0, gt=0, description="S3 connect timeout, seconds.", json_schema_extra=_section("S3")
    )
    s3_read_timeout: float = Field(
        60.0, gt=0, description="S3 read timeout, seconds.", json_schema_extra=_section("S3")
    )
    s3_max_pool: int = Field(
        32, ge=1, description="S3 connections pooled per client.", json_schema_extra=_section("S3")
    )
    s3_concurrency: int | None = Field(
        None,
        ge=1,
        description="S3 requests one process keeps in flight; unset: `POLYBURN_S3_MAX_POOL`.",
        json_schema_extra=_section("S3"),
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] | None = Field(
        None,
        description="`auto`, `path` or `virtual`; unset: path-style for a custom endpoint, "
        "boto3's choice for AWS.",
        json_schema_extra=_section("S3"),
    )

    # ------------------------------------------------------------------------------ receiver
    webhook_secret: SecretStr | None = Field(
        None,
        description="HMAC secret of signed Dataloop webhook calls (at least 16 bytes).",
        json_schema_extra=_section("Events"),
    )
    webhook_secret_block: str | None = Field(
        None,
        description="Prefect `Secret` block holding the webhook secret; wins over "
        "`POLYBURN_WEBHOOK_SECRET`.",
        json_schema_extra=_section("Events"),
    )
    webhook_token: SecretStr | None = Field(
        None,
        description="Token webhook calls carry in the URL or an `Authorization: Bearer` header.",
        json_schema_extra=_section("Events"),
    )
    webhook_token_block: str | None = Field(
        None,
        description="Prefect `Secret` block holding the webhook token; wins over "
        "`POLYBURN_WEBHOOK_TOKEN`.",
        json_schema_extra=_section("Events"),
    )

    # ------------------------------------------------------------------------------ burning
    engine: Literal["kernel", "rasterio"] = Field(
        "kernel",
        description="Burn engine: polyburn's kernel, or `rasterio` to force GDAL.",
        json_schema_extra=_section("Runs"),
    )
    item_retry_delay: float = Field(
        1.0,
        ge=0,
        description="Seconds before the first retry of an item that failed transiently "
        "(doubles per retry, jittered).",
        json_schema_extra=_section("Runs"),
    )
    lease_seconds: float = Field(
        300.0,
        gt=0,
        description="Lifetime of an item's (or batch's) lease; renewed every third of it.",
        json_schema_extra=_section("Runs"),
    )
    lease_wait_seconds: float = Field(
        600.0,
        ge=0,
        description="How long a run waits for another run's lease before giving the item up.",
        json_schema_extra=_section("Runs"),
    )
    shard_poll_seconds: float = Field(
        5.0,
        gt=0,
        description="How often a sharded run polls its shard runs, seconds.",
        json_schema_extra=_section("Runs"),
    )
    shard_start_timeout: float = Field(
        900.0,
        gt=0,
        description="A shard run no worker started within this many seconds is cancelled "
        "(and run in-process with `shard_fallback`).",
        json_schema_extra=_section("Runs"),
    )

    # -------------------------------------------------------------------------- deployments
    source: str = Field(
        "examples/export",
        description="Source of every deployment: a local export folder or "
        "`dataloop://<dataset-id>`.",
        json_schema_extra=_section("Deployments"),
    )
    destination: str = Field(
        "masks",
        description="Destination of every deployment: a folder, `s3://bucket/prefix` or "
        "`dataloop://[<dataset-id>]`.",
        json_schema_extra=_section("Deployments"),
    )
    modes: Annotated[tuple[str, ...], NoDecode] = Field(
        ("semantic",),
        description="Comma-separated masks the deployments write.",
        json_schema_extra=_section("Deployments"),
    )
    nightly_cron: str = Field(
        "0 2 * * *", description="Schedule of `nightly`.", json_schema_extra=_section("Deployments")
    )
    timezone: str = Field(
        "UTC",
        description="IANA time zone of that schedule.",
        json_schema_extra=_section("Deployments"),
    )
    debounce_seconds: int = Field(
        60,
        ge=10,
        description="Quiet period of `on-annotation` (Prefect's proactive triggers need >= 10).",
        json_schema_extra=_section("Deployments"),
    )
    serve_limit: int = Field(
        4,
        ge=0,
        description="Flow runs `polyburn serve` runs at once (`0`: no limit).",
        json_schema_extra=_section("Deployments"),
    )

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any, info: Any) -> Any:
        """An empty variable keeps the default (``POLYBURN_DATALOOP_LIMIT``: '' disables)."""
        if isinstance(value, str) and not value.strip() and info.field_name != "dataloop_limit":
            raise PydanticUseDefault()
        return value

    @field_validator("modes", mode="before")
    @classmethod
    def _split_modes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(m.strip() for m in value.split(",") if m.strip())
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: Any,
        env_settings: Any,
        dotenv_settings: Any,
        file_secret_settings: Any,
    ) -> tuple[Any, ...]:
        """Arguments, then the environment (or the mapping :meth:`from_env` was given); no
        ``.env`` file, no secrets directory."""
        mapping = _ENVIRON.get()
        if mapping is not None:
            env_settings = _MappingSource(settings_cls, mapping)
        return (init_settings, env_settings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``env`` (``os.environ`` when None), checked; ConfigError when a value
        is wrong (one line naming the variable, never a secret's value)."""
        token = _ENVIRON.set(env)
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(_message(exc)) from None
        finally:
            _ENVIRON.reset(token)

    # ------------------------------------------------------------------------------ derived
    @property
    def dataloop_state_root(self) -> Path:
        """``POLYBURN_STATE_DIR``, else ``$XDG_CACHE_HOME/polyburn`` (``~/.cache/polyburn``)."""
        if self.state_dir:
            return Path(self.state_dir)
        cache = os.environ.get("XDG_CACHE_HOME", "").strip()
        return Path(cache or os.path.join(os.path.expanduser("~"), ".cache")) / "polyburn"


_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("polyburn_settings_env", default=None)


class _MappingSource(EnvSettingsSource):
    """The environment source, reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], mapping: Mapping[str, str]) -> None:
        self._mapping = mapping
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._mapping.items()}


# ---------------------------------------------------------------------------- names, errors
def env_name(field: str) -> str:
    """The environment variable of a :class:`Settings` field."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return PREFIX + field.upper()


def _is_secret(field: str) -> bool:
    return "SecretStr" in str(Settings.model_fields[field].annotation)


_MUST = {
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
}


def _message(exc: ValidationError) -> str:
    """One line for the first error: the variable, what it must be, and (not for a secret)
    the value given."""
    error = exc.errors()[0]
    loc = error["loc"]
    field = str(loc[0]) if loc else ""
    if field not in Settings.model_fields:  # reported under its alias
        field = next((f for f in Settings.model_fields if env_name(f) == field), field)
    name = env_name(field) if field in Settings.model_fields else field
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind in _MUST:
        must = _MUST[kind]
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": ("at least", "ge"),
            "greater_than": ("more than", "gt"),
            "less_than_equal": ("at most", "le"),
            "less_than": ("less than", "lt"),
        }[kind]
        must = f"must be {words[0]} {ctx.get(words[1])}"
    elif kind == "literal_error":
        must = f"must be {ctx.get('expected')}"
    else:
        must = "is invalid: " + str(error["msg"]).split("\n")[0]
    if field in Settings.model_fields and _is_secret(field):
        return f"{name} {must}"
    return f"{name} {must}, not {str(error.get('input'))[:80]!r}"


# ----------------------------------------------------------------------------- the accessor
_lock = threading.Lock()
_current: Settings | None = None


def settings() -> Settings:
    """The process's settings: read from the environment on first use, then kept."""
    current = _current
    if current is not None:
        return current
    with _lock:
        if _current is None:
            _install(Settings.from_env())
        assert _current is not None
        return _current


def _install(value: Settings) -> None:
    global _current
    _current = value


def use(value: Settings) -> None:
    """Make ``value`` the process's settings (a burn worker gets its parent's this way)."""
    with _lock:
        _install(value)


def override(**changes: Any) -> Settings:
    """Replace some fields of the process's settings (checked as the environment would be),
    e.g. ``polyburn run --dataloop-concurrency``; returns the new settings."""
    current = settings()
    values = {env_name(f): v for f, v in changes.items()}
    merged = {
        env_name(f): _raw(getattr(current, f))
        for f in Settings.model_fields
        if f not in changes and getattr(current, f) is not None
    }
    merged.update({k: str(v) for k, v in values.items()})
    updated = Settings.from_env(merged)
    use(updated)
    return updated


def _raw(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def reset() -> None:
    """Forget the settings: the next :func:`settings` reads the environment again (tests)."""
    with _lock:
        _install(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- credentials
Credential = Literal["dataloop_api_key", "aws", "webhook_secret", "webhook_token"]

# credential -> (the field holding a value or None, the field naming a block, block type)
_CREDENTIALS: dict[str, tuple[str | None, str, str]] = {
    "dataloop_api_key": ("dataloop_api_key", "dataloop_api_key_block", "Secret"),
    "aws": (None, "aws_credentials_block", "AwsCredentials"),
    "webhook_secret": ("webhook_secret", "webhook_secret_block", "Secret"),
    "webhook_token": ("webhook_token", "webhook_token_block", "Secret"),
}


@dataclass(frozen=True)
class Resolved:
    """Where a credential came from: ``secret`` (a Secret block's or the variable's value),
    ``block`` (the loaded AWS credentials block), both None when nothing is configured.
    ``origin`` says where, for messages ("Prefect Secret block 'x'", "DATALOOP_API_KEY")."""

    secret: SecretStr | None = None
    block: Any = None
    origin: str = ""

    def __repr__(self) -> str:
        return f"Resolved(origin={self.origin!r})"


def credential(which: Credential, current: Settings | None = None) -> Resolved:
    """Resolve one of the four credentials by the precedence of the module docstring: the
    Prefect block named by its ``*_BLOCK`` setting, else its value, else nothing (the caller's
    default: boto3's chain for ``aws``). ConfigError when a named block cannot be loaded."""
    current = current or settings()
    value_field, block_field, block_type = _CREDENTIALS[which]
    block_name = getattr(current, block_field)
    value = getattr(current, value_field) if value_field else None
    if block_name:
        if value is not None:
            log.warning(
                "%s is ignored: %s names a Prefect block, which wins",
                env_name(value_field or ""),
                env_name(block_field),
            )
        if block_type == "AwsCredentials":
            return Resolved(
                block=_load_aws_block(block_name), origin=f"the Prefect block {block_name!r}"
            )
        return Resolved(
            secret=SecretStr(_load_secret_block(block_name, env_name(block_field))),
            origin=f"Prefect Secret block {block_name!r}",
        )
    if value is not None:
        return Resolved(secret=value, origin=env_name(value_field or ""))
    return Resolved()


def _load_secret_block(name: str, variable: str) -> str:
    try:
        from prefect.blocks.system import Secret

        value = Secret.load(name).get()
    except Exception as exc:  # noqa: BLE001 - any failure to read the block is a config error
        raise ConfigError(
            f"cannot read {variable} from Prefect Secret block {name!r}: {type(exc).__name__}"
        ) from None
    return str(value or "").strip()


def _load_aws_block(name: str) -> Any:
    variable = env_name("aws_credentials_block")
    try:
        from prefect_aws import AwsCredentials
    except ImportError:
        raise ConfigError(
            f"{variable}={name} needs the prefect-aws package (pip install prefect-aws), "
            "or unset it to use boto3's default credential chain"
        ) from None
    try:
        if "/" in name:
            from prefect.blocks.core import Block

            block = Block.load(name)
        else:
            block = AwsCredentials.load(name)
    except Exception as exc:  # noqa: BLE001 - prefect raises ValueError or HTTP errors
        raise ConfigError(
            f"cannot load the AWS credentials block {name!r}: {type(exc).__name__}"
        ) from None
    if getattr(block, "get_boto3_session", None) is None:
        raise ConfigError(f"block {name!r} is not an AWS credentials block")
    return block


# ------------------------------------------------------------------------------- the docs
def markdown_table() -> str:
    """The reference table of ``docs/configuration.md``: one section per group, one row per
    variable (name, type, default, meaning)."""
    sections: dict[str, list[str]] = {}
    for field, info in Settings.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        section = str(extra.get("section", "Other"))
        default = info.default
        if isinstance(default, tuple):
            default = ",".join(default)
        shown = "–" if default is None else f"`{default}`"
        bounds = [
            f"{symbol} {getattr(m, attr)}"
            for m in info.metadata
            for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
            if getattr(m, attr, None) is not None
        ]
        kind = _type_name(info.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
        row = f"| `{env_name(field)}` | {kind} | {shown} | {info.description} |"
        sections.setdefault(section, []).append(row)
    out: list[str] = []
    for section, rows in sections.items():
        out += [
            f"### {section}",
            "",
            "| variable | type | default | meaning |",
            "|---|---|---|---|",
        ]
        out += rows + [""]
    return "\n".join(out).rstrip() + "\n"


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pydantic.types.", "")
    text = text.replace("<class '", "").replace("'>", "").replace(" | None", "")
    text = text.replace("Optional[", "").replace("Annotated[tuple[str, ...], NoDecode]", "list")
    if "Literal" in text:
        return "one of " + text[text.index("[") + 1 :].split("]")[0].replace("'", "")
    if "tuple" in text:
        return "comma-separated list"
    return {"SecretStr": "secret", "str": "text", "int": "integer", "float": "number"}.get(
        text.rstrip("]"), text
    )


__all__ = [
    "Resolved",
    "Settings",
    "credential",
    "env_name",
    "markdown_table",
    "override",
    "reset",
    "settings",
    "use",
]
