"""Configuration: defaults < config file < LAKELET_* environment < command-line flags.

Every setting has one name (``suspend_timeout``), one TOML place (``[compute] suspend_timeout``),
one environment variable (``LAKELET_SUSPEND_TIMEOUT``) and, for the common ones, one flag
(``--suspend-timeout``). The table below is the single list of them.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from compute import sizes

REPO_DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "lakelet.toml"


class ConfigError(ValueError):
    """A setting has a value Lakelet cannot use; the message names it and what is allowed."""


@dataclass
class Config:
    data_dir: Path = Path("./data")
    log_format: str = "text"
    log_level: str = "info"
    http: str = "127.0.0.1:55480"
    listen: str = "127.0.0.1:55432"
    require_tls: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    auth_timeout: float = 60.0
    wake_timeout: float = 30.0
    max_client_connections: int = 10000
    max_unauthenticated_per_address: int = 100
    warm_backends: int = 32
    pool_mode: str = "session"  # transaction pooling: the default for connections that do not choose
    pool_size: int = 0  # backends per (branch, role, database); 0 = from the compute size
    pool_branch_size: int = 0  # backends per branch, all its (role, database) pools together; 0 = from the compute
    pool_timeout: float = 30.0
    pool_idle_transaction_timeout: float = 0.0  # >0: Postgres ends a pooled transaction left idle this long
    suspend_timeout: float = 300.0
    min_cu: float = 0.25
    max_cu: float = 2.0
    durability: str = "store"
    user: str = ""
    retention_days: float = 7.0
    gc_interval: float = 600.0
    store_uri: str = ""
    wal_upload_interval: float = 1.0
    cache_size: str = "10GB"
    superuser: bool = False
    data_api: str = "127.0.0.1:55433"
    data_api_schemas: str = "public"
    data_api_anon_role: str = ""
    data_api_jwt_secret: str = ""
    data_api_jwt_role_claim: str = ".role"
    data_api_max_rows: int = 0
    data_api_pre_request: str = ""
    data_api_pool_size: int = 10
    data_api_idle_timeout: float = 60.0
    data_api_jwt_aud: str = ""
    data_api_plan_enabled: bool = False
    data_api_workers: int = 0  # Data API worker processes; 0 = one per CPU
    data_api_tx_end: str = "commit-allow-override"  # PostgREST's db-tx-end
    data_api_cors_origins: str = ""  # origins whose web pages may call the Data API; empty = any
    # Where lakehouse sync writes Delta tables: a path or s3://bucket/prefix (AWS_* settings from
    # the environment); empty = <data_dir>/lakehouse.
    lakehouse_uri: str = ""

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def computes_dir(self) -> Path:
        return self.data_dir / "computes"

    @property
    def lakehouse(self) -> str:
        return self.lakehouse_uri or str(self.data_dir / "lakehouse")

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.listen, "listen")

    @property
    def http_addr(self) -> tuple[str, int]:
        return parse_hostport(self.http, "http")


SECTIONS: dict[str, str] = {
    "data_dir": "lakelet", "log_format": "lakelet", "log_level": "lakelet", "http": "lakelet",
    "listen": "proxy", "require_tls": "proxy", "tls_cert": "proxy", "tls_key": "proxy",
    "auth_timeout": "proxy", "wake_timeout": "proxy", "max_client_connections": "proxy",
    "max_unauthenticated_per_address": "proxy", "warm_backends": "proxy",
    "pool_mode": "proxy", "pool_size": "proxy", "pool_timeout": "proxy", "pool_idle_transaction_timeout": "proxy",
    "pool_branch_size": "proxy",
    "suspend_timeout": "compute", "min_cu": "compute", "max_cu": "compute", "durability": "compute",
    "user": "compute", "retention_days": "storage", "gc_interval": "storage", "superuser": "project",
    "store_uri": "storage", "wal_upload_interval": "storage", "cache_size": "storage",
    **{name: "data_api" for name in ("data_api", "data_api_schemas", "data_api_anon_role", "data_api_jwt_secret",
                                     "data_api_jwt_role_claim", "data_api_max_rows", "data_api_pre_request",
                                     "data_api_pool_size", "data_api_idle_timeout", "data_api_jwt_aud",
                                     "data_api_plan_enabled", "data_api_workers", "data_api_tx_end",
                                     "data_api_cors_origins")},
    "lakehouse_uri": "lakehouse",
}
ENV_NAMES = {name: "LAKELET_" + name.upper() for name in SECTIONS} | {"user": "LAKELET_COMPUTE_USER"}


def parse_hostport(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} = {value!r} is not HOST:PORT (for example 127.0.0.1:55432)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _coerce(name: str, raw: Any, origin: str) -> Any:
    kind = {f.name: f.type for f in fields(Config)}[name]
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(str(raw)).expanduser()
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} = {raw!r} (from {origin}) is not a valid {kind}") from None


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing file to --config") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
        for key, value in table.items():
            if SECTIONS.get(key) != section:
                where = f"[{SECTIONS[key]}]" if key in SECTIONS else "no section (unknown setting)"
                raise ConfigError(f"{path}: [{section}] {key} is not a setting here; it belongs in {where}")
            out[key] = _coerce(key, value, str(path))
    return out


def load(config_file: Path | None = None, overrides: dict[str, Any] | None = None,
         env: dict[str, str] | None = None) -> Config:
    """Build the effective configuration; ``overrides`` are command-line values (None = unset)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if REPO_DEFAULTS.exists():
        values.update(_from_toml(REPO_DEFAULTS))
    if config_file is None and env.get("LAKELET_CONFIG"):
        config_file = Path(env["LAKELET_CONFIG"])
    if config_file is not None:
        values.update(_from_toml(config_file))
    for name, var in ENV_NAMES.items():
        if env.get(var, "") != "":
            values[name] = _coerce(name, env[var], var)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    config = Config(**values)
    validate(config)
    return config


def validate(c: Config) -> None:
    if c.log_format not in ("text", "json"):
        raise ConfigError(f"log_format = {c.log_format!r}: use 'text' or 'json'")
    if c.durability not in ("store", "local"):
        raise ConfigError(f"durability = {c.durability!r}: use 'store' or 'local'")
    if c.suspend_timeout < 1:
        raise ConfigError(f"suspend_timeout = {c.suspend_timeout}: must be at least 1 second")
    if not 0 <= c.retention_days <= 35:
        raise ConfigError(f"retention_days = {c.retention_days}: must be between 0 and 35")
    if c.gc_interval < 1:
        raise ConfigError(f"gc_interval = {c.gc_interval}: must be at least 1 (seconds)")
    for name in ("min_cu", "max_cu"):
        try:
            sizes.validate_cu(getattr(c, name))
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None
    if c.min_cu > c.max_cu:
        raise ConfigError(f"min_cu = {c.min_cu} is above max_cu = {c.max_cu}: lower min_cu or raise max_cu")
    if c.auth_timeout <= 0 or c.wake_timeout <= 0:
        raise ConfigError("auth_timeout and wake_timeout must be positive numbers of seconds")
    if c.max_client_connections < 1:
        raise ConfigError("max_client_connections must be at least 1")
    if c.max_unauthenticated_per_address < 1:
        raise ConfigError("max_unauthenticated_per_address must be at least 1")
    if c.warm_backends < 0:
        raise ConfigError("warm_backends must be 0 (off) or more")
    if c.pool_mode not in ("session", "transaction"):
        raise ConfigError(f"pool_mode = {c.pool_mode!r}: use 'session' or 'transaction'")
    if c.pool_size < 0 or c.pool_branch_size < 0 or c.pool_timeout <= 0 or c.pool_idle_transaction_timeout < 0:
        raise ConfigError("pool_size and pool_branch_size must be 0 (from the compute size) or more, pool_timeout "
                          "a positive number of seconds, pool_idle_transaction_timeout 0 (off) or more")
    if bool(c.tls_cert) != bool(c.tls_key):
        raise ConfigError("tls_cert and tls_key go together: set both, or neither for a self-signed certificate")
    parse_hostport(c.listen, "listen")
    parse_hostport(c.http, "http")
    if c.data_api:
        parse_hostport(c.data_api, "data_api")
    if not [s for s in c.data_api_schemas.split(",") if s.strip()]:
        raise ConfigError("data_api_schemas is empty: name at least one schema (for example public)")
    if c.data_api_tx_end not in ("commit", "commit-allow-override", "rollback", "rollback-allow-override"):
        raise ConfigError("data_api_tx_end must be commit, commit-allow-override, rollback or "
                          "rollback-allow-override (PostgREST's db-tx-end)")
    if c.data_api_workers < 0:
        raise ConfigError("data_api_workers must be >= 0 (0 = one worker process per CPU)")
    if c.data_api_max_rows < 0 or c.data_api_pool_size < 1 or c.data_api_idle_timeout <= 0:
        raise ConfigError("data_api_max_rows must be >= 0 (0 = no limit), data_api_pool_size >= 1 and "
                          "data_api_idle_timeout > 0 seconds")
    _validate_store(c)


def _validate_store(c: Config) -> None:
    from storage.bucket import parse_size

    if c.store_uri and not c.store_uri.startswith(("file://", "s3://")):
        raise ConfigError(f"store_uri = {c.store_uri!r}: use file:///PATH or s3://BUCKET/PREFIX "
                          "(empty: <data_dir>/store)")
    if c.wal_upload_interval <= 0:
        raise ConfigError(f"wal_upload_interval = {c.wal_upload_interval}: must be a positive number of seconds")
    try:
        parse_size(c.cache_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
