"""What a synced table is: a Delta source kept as a read-only Postgres table on one branch.

A spec is checked here, before anything touches the source or a compute, so bad input is refused
with one line that names the remedy and nothing is registered.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED_SCHEMAS = {"lakelet_synced", "information_schema"}
DEFAULT_DATABASE = "postgres"


class Mode(StrEnum):
    """snapshot: a full copy per run; triggered: incremental from the change data feed, on
    ``refresh``; continuous: triggered by every new Delta version, found by watching the log."""

    SNAPSHOT = "snapshot"
    TRIGGERED = "triggered"
    CONTINUOUS = "continuous"


class SpecError(ValueError):
    """A synced-table definition Lakelet will not accept; the message says what to change."""


def check_identifier(what: str, name: str) -> str:
    if not IDENT.match(name):
        raise SpecError(f"{what} {name!r} is not allowed: use lower-case letters, digits and _ "
                        "(starting with a letter or _), at most 63 characters")
    return name


def parse_target(target: str) -> tuple[str, str]:
    """``schema.table`` (or ``table``, in ``public``)."""
    schema, _, table = target.rpartition(".")
    schema = schema or "public"
    check_identifier("schema", schema)
    check_identifier("table", table)
    if schema in RESERVED_SCHEMAS or schema.startswith("pg_"):
        raise SpecError(f"schema {schema!r} is reserved: choose another --target schema")
    return schema, table


def check_column(name: str) -> str:
    """Delta column names are kept as they are (quoted in SQL); Postgres truncates identifiers
    longer than 63 bytes, which could silently merge two columns, so those are refused."""
    if not name or len(name.encode()) > 63 or "\x00" in name:
        raise SpecError(f"column {name!r} cannot be a Postgres column name (1 to 63 bytes): rename it in the source")
    return name


@dataclass(frozen=True)
class SyncedTableSpec:
    source: str
    branch: str
    database: str
    schema: str
    table: str
    primary_key: tuple[str, ...]
    mode: Mode
    timeseries_key: str | None = None

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def key(self) -> tuple[str, str, str]:
        """Unique per branch and database."""
        return (self.branch, self.database, self.name)

    @classmethod
    def make(cls, *, source: str, branch: str, target: str, primary_key: str | list[str] | tuple[str, ...],
             mode: str, timeseries_key: str | None = None, database: str | None = None) -> SyncedTableSpec:
        if not source:
            raise SpecError("a source is needed: pass a Delta table path or s3:// URI")
        if not branch:
            raise SpecError("a branch is needed: pass --branch")
        schema, table = parse_target(target or "")
        keys = [k.strip() for k in primary_key.split(",")] if isinstance(primary_key, str) else list(primary_key)
        keys = [k for k in keys if k]
        if not keys:
            raise SpecError("a primary key is needed: pass --primary-key col[,col]")
        if len(set(keys)) != len(keys):
            raise SpecError(f"primary key {','.join(keys)} names a column twice")
        for k in keys:
            check_column(k)
        if timeseries_key is not None:
            check_column(timeseries_key)
            if timeseries_key in keys:
                raise SpecError(f"--timeseries-key {timeseries_key!r} is part of the primary key: "
                                "choose another column")
        try:
            parsed = Mode(mode)
        except ValueError:
            raise SpecError(f"mode {mode!r} is not one of snapshot, triggered, continuous") from None
        return cls(source=source, branch=branch, database=check_identifier("database", database or DEFAULT_DATABASE),
                   schema=schema, table=table, primary_key=tuple(keys), mode=parsed,
                   timeseries_key=timeseries_key or None)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mode"] = self.mode.value
        out["primary_key"] = list(self.primary_key)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SyncedTableSpec:
        return cls(source=data["source"], branch=data["branch"], database=data["database"], schema=data["schema"],
                   table=data["table"], primary_key=tuple(data["primary_key"]), mode=Mode(data["mode"]),
                   timeseries_key=data.get("timeseries_key"))
