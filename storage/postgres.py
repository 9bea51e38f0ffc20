"""Finding PostgreSQL's programs and running them as the service user.

Every room that runs a Postgres program (initdb, postgres, pg_ctl, pg_receivewal, pg_waldump,
pg_controldata) goes through here, so "which binaries" and "as whom" are decided once.

Postgres refuses to run as root. When Lakelet itself runs as root, Postgres programs run as an
unprivileged service user (``postgres`` where it exists, else one we create); otherwise they run
as the current user.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MIN_MAJOR = 15
# util-linux: drops to the service user after exec (see ServiceUser.command).
SETPRIV = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")


class PostgresNotFound(RuntimeError):
    """No usable PostgreSQL server binaries (15 or newer) on this machine."""


@dataclass(frozen=True)
class PgBinaries:
    bindir: Path
    major: int

    def __getitem__(self, program: str) -> str:
        return str(self.bindir / program)


def _major_of(bindir: Path) -> int | None:
    postgres = bindir / "postgres"
    if not os.access(postgres, os.X_OK):
        return None
    try:
        out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(m.group(1)) if m else None


@cache
def find_binaries(hint: str | None = None) -> PgBinaries:
    """The newest PostgreSQL ≥ 15 server bindir: ``hint`` (config or LAKELET_PG_BINDIR) first."""
    candidates: list[Path] = []
    hint = hint or os.environ.get("LAKELET_PG_BINDIR")
    if hint:
        candidates.append(Path(hint))
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")), reverse=True)
    candidates += [Path(p) for p in glob.glob("/usr/pgsql-*/bin")]
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
            if bindir:
                candidates.append(Path(bindir))
        except OSError:
            pass
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    best: PgBinaries | None = None
    for bindir in candidates:
        major = _major_of(bindir)
        if major is not None and major >= MIN_MAJOR and (best is None or major > best.major):
            best = PgBinaries(bindir, major)
    if best is None:
        raise PostgresNotFound(
            "PostgreSQL server 15 or newer not found: install it (Debian/Ubuntu: "
            "apt-get install postgresql) or set LAKELET_PG_BINDIR to its bin directory"
        )
    return best


@dataclass(frozen=True)
class ServiceUser:
    """The OS user Postgres programs run as."""

    name: str
    uid: int
    gid: int
    home: str

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()

    def preexec(self) -> None:
        """Drop to this user in a child before exec (no-op when it is us already)."""
        if self.is_current:
            return
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)

    def command(self, argv: Sequence[str]) -> tuple[list[str], bool]:
        """``argv`` run as this user: (the command, whether a ``preexec`` must still drop to it).
        With ``setpriv`` the drop happens after exec, so Python can start the child with vfork
        instead of forking (copying the page tables of) the whole calling process."""
        if self.is_current:
            return list(argv), False
        if SETPRIV is None:
            return list(argv), True
        return [SETPRIV, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv], False

    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "LC_ALL": "C.UTF-8"})
        if extra:
            env.update(extra)
        return env

    def own(self, path: Path, mode: int | None = None) -> None:
        """Give ``path`` to this user (when we are root) and set its mode."""
        if os.geteuid() == 0 and not self.is_current:
            os.chown(path, self.uid, self.gid)
        if mode is not None:
            os.chmod(path, mode)

    def share_dir(self, path: Path) -> None:
        """A directory of ours this user must pass through but not read: owned by us, group of
        this user, mode 0710 (0700 when this user is us). Nobody else can even enter it."""
        if os.geteuid() == 0 and not self.is_current:
            os.chown(path, os.geteuid(), self.gid)
            os.chmod(path, 0o710)
        else:
            os.chmod(path, 0o700)

    def own_tree(self, root: Path) -> None:
        if os.geteuid() != 0 or self.is_current:
            return
        for dirpath, dirnames, filenames in os.walk(root):
            os.chown(dirpath, self.uid, self.gid)
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), self.uid, self.gid)


DEFAULT_SERVICE_USER = "lakelet"


def resolve_service_user(configured: str | None = None) -> ServiceUser:
    """As root: the configured user, else a dedicated ``lakelet`` system user (created when
    missing). Not root: the current user (a configured one must then be the current user).

    Not the shared ``postgres`` user: computes trust every connection on their private socket,
    so whoever runs as the service user can reach every branch's data. Other clusters on the
    host (and their extensions, archive commands, …) run as ``postgres``."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        if configured and configured != entry.pw_name:
            raise PermissionError(
                f"compute_user = {configured!r} needs Lakelet to run as root; "
                f"running as {entry.pw_name!r}, remove compute_user from the config"
            )
        return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    name = configured or DEFAULT_SERVICE_USER
    try:
        entry = pwd.getpwnam(name)
        return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/")
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
         "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )
    entry = pwd.getpwnam(name)
    return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid, "/")


def repair_tree(root: Path, *, owner: ServiceUser | None = None) -> None:
    """Make everything under ``root`` private: directories 0700, files 0600, owned by ``owner``
    when given (and we are root). Data dirs made before Lakelet kept them private, or by hand,
    are put right at open."""
    chown = owner is not None and os.geteuid() == 0 and not owner.is_current
    if not root.is_dir():
        _fix(str(root), 0o600, owner if chown else None)
        return
    for dirpath, _, filenames in os.walk(root):
        _fix(dirpath, 0o700, owner if chown else None)
        for name in filenames:
            _fix(os.path.join(dirpath, name), 0o600, owner if chown else None)


def _fix(path: str, mode: int, owner: ServiceUser | None) -> None:
    try:
        st = os.lstat(path)
        if owner is not None and (st.st_uid, st.st_gid) != (owner.uid, owner.gid):
            os.lchown(path, owner.uid, owner.gid)
        if not os.path.islink(path) and st.st_mode & 0o7777 & ~mode:
            os.chmod(path, st.st_mode & mode)
    except FileNotFoundError:
        pass  # removed meanwhile


def make_reachable(path: Path, user: ServiceUser) -> None:
    """Let ``user`` traverse every ancestor of ``path`` (o+x), as a data dir under /root needs."""
    if user.is_current:
        return
    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        if st.st_mode & 0o001 == 0:
            os.chmod(parent, st.st_mode | 0o001)


def run(
    argv: Sequence[str],
    user: ServiceUser,
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a Postgres program as ``user``; on failure raise with the program's own last line."""
    command, needs_preexec = user.command(argv)
    proc = subprocess.run(
        command, capture_output=True, text=True, preexec_fn=user.preexec if needs_preexec else None,
        env=user.child_env(env), timeout=timeout, cwd=cwd or "/",
    )
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc


async def run_async(
    argv: Sequence[str], user: ServiceUser, *, env: dict[str, str] | None = None, check: bool = True
) -> tuple[int, str, str]:
    """``run`` without blocking the event loop (in a thread: under uvloop an asyncio subprocess
    is always a full fork of the calling process)."""
    proc = await asyncio.to_thread(run, argv, user, env=env, check=False)
    rc = proc.returncode or 0
    if check and rc != 0:
        raise subprocess.CalledProcessError(rc, list(argv), proc.stdout, proc.stderr)
    return rc, proc.stdout, proc.stderr


def quote_literal(value: str) -> str:
    """A Postgres string literal (also a configuration-file value): the one quoting helper."""
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """A Postgres identifier, always quoted."""
    return '"' + name.replace('"', '""') + '"'


def last_error_line(text: str) -> str:
    """The line of Postgres output that explains a failure (FATAL/ERROR/PANIC first)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("PANIC:", "FATAL:", "ERROR:"):
        for ln in reversed(lines):
            if marker in ln:
                return ln
    return lines[-1] if lines else "(no output)"
