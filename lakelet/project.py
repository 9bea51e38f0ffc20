"""The project a data dir holds: root branch ``main`` and the ``lakelet`` login role.

First start creates both; later starts reuse them. The role's password is ``LAKELET_PASSWORD``
when set, else generated and printed once; either way it is kept in ``<data-dir>/credentials``
(mode 0600) so ``lakelet connstr`` can hand out a working URL.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from compute import Endpoints

log = logging.getLogger("lakelet.project")

LOGIN_ROLE = "lakelet"
ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # fullmatch: ``$`` would allow a final newline
RESERVED_ROLES = {"lakelet_admin"}
OWNER_GRANTS = ("pg_checkpoint", "pg_read_all_stats", "pg_signal_backend")


class RoleError(ValueError):
    """A role name or password Lakelet will not use."""


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


def credentials_file(data_dir: Path) -> Path:
    return data_dir / "credentials"


def read_credentials(data_dir: Path) -> Credentials | None:
    try:
        lines = credentials_file(data_dir).read_text().splitlines()
    except OSError:
        return None
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    if "user" not in values or "password" not in values:
        return None
    return Credentials(values["user"], values["password"])


def write_credentials(data_dir: Path, creds: Credentials) -> None:
    path = credentials_file(data_dir)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"user={creds.user}\npassword={creds.password}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_role_name(name: str) -> None:
    if not isinstance(name, str) or not ROLE_NAME.fullmatch(name):
        raise RoleError(f"role name {name!r} is not allowed: use lower-case letters, digits and _ "
                        "(starting with a letter or _), at most 63 characters")
    if name in RESERVED_ROLES or name.startswith("pg_"):
        raise RoleError(f"role name {name!r} is reserved: choose another name")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


async def create_role(endpoints: Endpoints, branch: str, name: str, password: str, *,
                      owner: bool = False, superuser: bool = False) -> None:
    """Create (or re-password) a login role on a branch's compute, then refresh the proxy's
    verifiers. The password is hashed by Postgres (SCRAM-SHA-256); Lakelet never stores it."""
    check_role_name(name)
    if not password:
        raise RoleError("an empty password is not allowed: pass --password or omit it to generate one")
    node = await endpoints.node(branch)
    conn = await node.connect()
    try:
        attrs = "LOGIN" + (" CREATEDB CREATEROLE" if owner else "") + (" SUPERUSER" if superuser else "")
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
        verb = "ALTER" if exists else "CREATE"
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute(f"{verb} ROLE {quote_ident(name)} {attrs} PASSWORD {quote_literal(password)}")
        if owner:
            await conn.execute(f"GRANT {', '.join(OWNER_GRANTS)} TO {quote_ident(name)}")
            # Postgres 15 gives CREATE on public only to the database owner: the project's owner
            # role owns the default database, so it can build its schema there.
            await conn.execute(f"ALTER DATABASE postgres OWNER TO {quote_ident(name)}")
    finally:
        await conn.close()
    await node.sync_roles()


async def ensure_project(endpoints: Endpoints, data_dir: Path, *, superuser: bool) -> Credentials | None:
    """Make sure the ``lakelet`` role exists with known credentials. Returns the credentials when
    they were created now (the caller prints them once), None when the project already existed."""
    existing = read_credentials(data_dir)
    if existing is not None:
        return None
    password = os.environ.get("LAKELET_PASSWORD") or secrets.token_urlsafe(18)
    await create_role(endpoints, "main", LOGIN_ROLE, password, owner=True, superuser=superuser)
    creds = Credentials(LOGIN_ROLE, password)
    write_credentials(data_dir, creds)
    log.info("project created", extra={"branch": "main", "role": LOGIN_ROLE})
    return creds
