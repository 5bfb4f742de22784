"""Schema of ``node.yaml``: the node itself, who may store to it, where it sends, and how hard it retries."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "AcceptEntry",
    "ConfigError",
    "Destination",
    "NodeConfig",
    "NodeSettings",
    "OutboxSettings",
    "WorkerSettings",
    "format_validation_errors",
    "load_node_config",
    "parse_peer",
]

# AE titles: 1-16 characters of the Default Character Repertoire, no backslash or control characters.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

AeTitle = Annotated[str, Field(min_length=1, max_length=16, description="AE title, 1-16 characters")]


def _check_ae(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"must be 1-16 printable characters without backslash, got {value!r}")
    return value.strip()


class ConfigError(Exception):
    """A configuration file is missing, unreadable or invalid; ``problems`` lists 'key.path: message' lines."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Strict):
    ae_title: AeTitle = Field("DICOMNODE", description="This node's AE title; associations must call it.")
    host: str = Field("0.0.0.0", description="Address the DICOM listener binds to.")
    port: int = Field(11112, ge=1, le=65535, description="TCP port of the DICOM listener.")
    storage: Path = Field(
        Path("./var/storage"), description="Folder for received instances, outputs and quarantine."
    )
    database: str = Field(
        "sqlite:///./var/node.db", description="SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://..."
    )
    series_stable_seconds: float = Field(
        10, gt=0, le=86400, description="A series is complete after this many seconds without a new instance."
    )
    structure_set_wait_seconds: float = Field(
        0, ge=0, le=86400, description="When a rule tests has_structure_set, a quiet image series without an "
        "RTSTRUCT referencing it waits up to this many more seconds for one (a planner's seed sent after the "
        "images); 0 = no wait."
    )
    max_pdu_size: int = Field(
        0, ge=0, description="Largest PDU we accept (bytes); 0 = unlimited, which is fastest on a LAN."
    )
    max_associations: int = Field(16, ge=1, le=512, description="Simultaneous associations the listener serves.")
    network_timeout: float = Field(60, gt=0, description="Seconds of silence after which an association is dropped.")

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("database")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql")):
            raise ValueError(f"must be a sqlite:/// or postgresql:// URL, got {value!r}")
        return value


class AcceptEntry(_Strict):
    ae_title: AeTitle = Field(description="Calling AE title allowed to open associations.")
    host: str | None = Field(None, description="If set, the association must also come from this IP address.")

    _ae = field_validator("ae_title")(_check_ae)


class Destination(_Strict):
    ae_title: AeTitle = Field(description="The peer's AE title (the called AE title we use).")
    host: str = Field(description="The peer's host name or IP address.")
    port: int = Field(ge=1, le=65535, description="The peer's DICOM port.")

    _ae = field_validator("ae_title")(_check_ae)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class OutboxSettings(_Strict):
    max_attempts: int = Field(8, ge=1, le=1000, description="Send attempts before an outgoing instance is failed.")
    backoff_seconds: float = Field(5, gt=0, description="Delay before the first retry; doubles on each attempt.")
    backoff_max_seconds: float = Field(600, gt=0, description="Upper bound of the retry delay.")
    poll_seconds: float = Field(1, gt=0, le=60, description="How often the sender looks for due sends.")


class WorkerSettings(_Strict):
    count: int = Field(1, ge=1, le=64, description="Pipeline jobs run at the same time.")
    threads: int = Field(2, ge=1, le=256, description="CPU threads each job may use (torch, NumPy).")
    max_attempts: int = Field(3, ge=1, le=100, description="Attempts of a job that fails for a non-input reason.")
    retry_seconds: float = Field(30, gt=0, description="Delay before a failed job is tried again.")


class NodeConfig(_Strict):
    node: NodeSettings = Field(default_factory=NodeSettings, description="The node itself.")
    accept: list[AcceptEntry] = Field(
        default_factory=list, description="Calling AEs allowed to store; an empty list rejects everyone."
    )
    destinations: dict[str, Destination] = Field(
        default_factory=dict, description="Named peers we send to (C-STORE SCU)."
    )
    forward: list[str] = Field(
        default_factory=list, description="Destination names every complete series is forwarded to."
    )
    outbox: OutboxSettings = Field(default_factory=OutboxSettings, description="Retry policy for sends.")
    rules: Path | None = Field(None, description="Routing rules file (YAML), relative to this file.")
    workers: WorkerSettings = Field(default_factory=WorkerSettings, description="The pipeline job workers.")

    @field_validator("destinations")
    @classmethod
    def _names(cls, value: dict[str, Destination]) -> dict[str, Destination]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"destination name {name!r} must be 1-64 of letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _cross_references(self) -> NodeConfig:
        problems = _unknown_destinations(self.forward, self.destinations)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def resolve(self, base: Path) -> NodeConfig:
        """Return a copy whose relative storage and SQLite paths are anchored at ``base`` (the file's folder)."""
        storage = self.node.storage if self.node.storage.is_absolute() else base / self.node.storage
        database = self.node.database
        prefix = "sqlite:///"
        if database.startswith(prefix) and not database.startswith(prefix + "/") and database != "sqlite://":
            database = prefix + str(base / database[len(prefix) :])
        node = self.node.model_copy(update={"storage": storage.resolve(), "database": database})
        rules = self.rules if self.rules is None or self.rules.is_absolute() else (base / self.rules).resolve()
        return self.model_copy(update={"node": node, "rules": rules})


def _unknown_destinations(names: Any, destinations: Any) -> list[str]:
    if not isinstance(names, list) or not isinstance(destinations, dict):
        return []
    known = ", ".join(sorted(map(str, destinations))) or "none defined"
    return [
        f"forward.{i}: unknown destination {name!r}; known: {known}"
        for i, name in enumerate(names)
        if name not in destinations
    ]


def format_validation_errors(error: ValidationError, readme_section: str = "Configuration") -> list[str]:
    """One line per problem, ``key.path: message (got value)``; an unknown key points to the README section that
    lists the known ones. Every config loader reports through this, so all config errors read alike."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # model-level checks already name their key paths
            problems.extend(message.split("\n"))
            continue
        path = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            message = f"unknown key (check spelling; see README '{readme_section}')"
        elif item["type"] != "missing" and "got" not in message and not isinstance(item.get("input"), dict):
            message += f" (got {item.get('input')!r})"
        problems.append(f"{path}: {message}")
    return problems


def parse_config(data: Any, source: str = "<config>") -> NodeConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): must be a mapping, got {type(data).__name__}"])
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        problems = format_validation_errors(exc)
        # The cross-reference check runs only once every field is valid; report its findings now too.
        if not any(p.startswith("forward.") for p in problems):
            problems += _unknown_destinations(data.get("forward"), data.get("destinations") or {})
        raise ConfigError(source, problems) from None


def load_node_config(path: str | Path) -> NodeConfig:
    """Read, validate and cross-check a node config; relative paths are taken from the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"(file): cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"(yaml): {exc}"]) from None
    return parse_config(data, str(path)).resolve(path.parent.resolve())


def parse_peer(text: str) -> Destination | None:
    """Parse 'AE@HOST:PORT' into a Destination, or None if ``text`` is not of that form."""
    match = re.fullmatch(r"(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})", text)
    if not match:
        return None
    return Destination(ae_title=match["ae"], host=match["host"], port=int(match["port"]))
