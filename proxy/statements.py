"""Transaction pooling, sans I/O: prepared statements, session settings and the few SQL commands
the pooler answers itself.

A client's prepared statement lives in a backend it holds for one transaction only. So the pooler
keeps the client's statements (name → what it parsed), names every distinct text once under a
server-side name it owns (``lakelet_s<N>``: one name per text and parameter types, shared by every
client, never reused for another text), and keeps per backend an LRU of the server names prepared
there. A Bind or Describe of a statement the backend lacks is preceded by the Parse, whose
ParseComplete the client never sees; a Parse of a text the backend has is answered by the pooler.
ParameterDescription and RowDescription always come from the backend.

Session settings follow the client the same way: its startup parameters (and ``-c`` options) and
each ``SET``/``RESET`` it runs alone outside a transaction block are kept as statements to replay,
and a backend lent to a client whose settings differ from what the backend last had gets
``RESET ALL`` plus the client's statements first. Other SETs (inside a transaction block, in a
multi-statement query, in a Parse) make the backend's settings unknown: it is reset before its
next client, and the SET lasts until that transaction ends.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict

from proxy.codec import encode_message

PARSE_COMPLETE = encode_message(b"1")
CLOSE_COMPLETE = encode_message(b"3")
_I32 = struct.Struct("!i")

# -- what a simple query is, by its first word -----------------------------------------------------

OTHER, SET, RESET, DEALLOCATE, DISCARD = range(5)
PREFIXES = frozenset({b"set", b"res", b"dea", b"dis"})
_WORD = re.compile(rb"\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*([A-Za-z]+)", re.S)
_KINDS = {b"set": SET, b"reset": RESET, b"deallocate": DEALLOCATE, b"discard": DISCARD}


def first_word(sql: bytes | bytearray | memoryview) -> int:
    """SET, RESET, DEALLOCATE, DISCARD or OTHER, from the first keyword of ``sql`` (leading
    whitespace and comments skipped). A byte comparison for almost every query."""
    i = 0
    n = len(sql)
    while i < n and sql[i] in b" \t\r\n":
        i += 1
    if i < n and sql[i] not in b"-/" and bytes(sql[i:i + 3]).lower() not in PREFIXES:
        return OTHER  # SELECT, INSERT, BEGIN…: decided by three bytes
    m = _WORD.match(bytes(sql[:256]))
    return _KINDS.get(m.group(1).lower(), OTHER) if m else OTHER


def single_statement(sql: bytes) -> bytes | None:
    """``sql`` without its trailing semicolons and whitespace when it is one statement with no
    quoting or comments to mislead a split (else None: the pooler does not guess)."""
    text = sql.rstrip().rstrip(b";").rstrip()
    if not text or any(c in text for c in (b";", b"$", b"--", b"/*")):
        return None
    return text


_SET = re.compile(rb"\s*set\s+(?:session\s+(?!characteristics|authorization)\s*)?"
                  rb"(time\s+zone|\"(?:[^\"]|\"\")+\"|[a-z_][a-z0-9_.$]*)(\s+|=|$)", re.I)
_NOT_SESSION = re.compile(rb"\s*set\s+(local|transaction|constraints)\b", re.I)
_RESET = re.compile(rb"\s*reset\s+(all|time\s+zone|\"(?:[^\"]|\"\")+\"|[a-z_][a-z0-9_.$]*)\s*$", re.I)
_SESSION_WIDE = re.compile(rb"\s*set\s+session\s+(characteristics|authorization)\b", re.I)


def _setting_name(raw: bytes) -> str:
    if raw.startswith(b'"'):
        return raw[1:-1].replace(b'""', b'"').decode(errors="replace").lower()
    name = raw.decode(errors="replace").lower()
    return "timezone" if name.replace(" ", "").replace("\t", "") == "timezone" else name


def tracked_set(sql: bytes) -> tuple[str, bytes | None] | None:
    """A SET or RESET the pooler can replay: (setting name, the statement) for SET, (name, None)
    for RESET (name ``all`` for RESET ALL); None for a SET LOCAL / SET TRANSACTION (transaction
    scoped, nothing to keep) or anything it cannot read with certainty."""
    text = single_statement(sql)
    if text is None or _NOT_SESSION.match(text):
        return None
    m = _SESSION_WIDE.match(text)
    if m:
        return "session " + m.group(1).decode().lower(), text
    m = _SET.match(text)
    if m:
        return _setting_name(m.group(1)), text
    m = _RESET.match(text)
    if m:
        return _setting_name(m.group(1)), None
    return None


def is_transaction_scoped_set(sql: bytes) -> bool:
    """SET LOCAL, SET TRANSACTION, SET CONSTRAINTS: nothing outlives the transaction."""
    return _NOT_SESSION.match(bytes(sql[:64])) is not None


_DEALLOCATE = re.compile(rb"\s*deallocate\s+(?:prepare\s+)?(all|\"(?:[^\"]|\"\")+\"|[a-z_][a-z0-9_$]*)\s*$", re.I)
_DISCARD_ALL = re.compile(rb"\s*discard\s+all\s*$", re.I)


def deallocate_target(sql: bytes) -> bytes | None:
    """The statement name a ``DEALLOCATE`` names (``b"ALL"`` for all), or None."""
    text = single_statement(sql)
    m = _DEALLOCATE.match(text) if text is not None else None
    if m is None:
        return None
    raw = m.group(1)
    if raw.startswith(b'"'):
        return raw[1:-1].replace(b'""', b'"')
    return b"ALL" if raw.lower() == b"all" else raw.lower()


def is_discard_all(sql: bytes) -> bool:
    text = single_statement(sql)
    return text is not None and _DISCARD_ALL.match(text) is not None


def command_complete(tag: str) -> bytes:
    return encode_message(b"C", tag.encode() + b"\x00")


# -- settings --------------------------------------------------------------------------------------

Settings = tuple[tuple[str, bytes], ...]  # (name, statement) sorted by name: comparable, hashable
NO_SETTINGS: Settings = ()
NOT_STARTUP = frozenset({"user", "database", "replication", "options"})


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def startup_settings(params: dict[str, str], options: list[tuple[str, str]]) -> Settings:
    """A client's startup parameters and ``-c name=value`` options as statements to replay:
    ``set_config`` takes the value as a startup parameter gives it (lists such as search_path
    included), so the client's session starts as it would on Postgres."""
    found = {k.lower(): v for k, v in params.items() if k not in NOT_STARTUP}
    found.update((k.lower(), v) for k, v in options)
    return tuple(sorted(
        (name, f"SELECT pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)".encode())
        for name, value in found.items()))


# Errors of a statement planned before DDL changed what it was inferred from ("cache lookup failed
# for type", "cached plan must not change result type", a statement gone): the client's statements
# get new server names, so its re-prepare (drivers retry so) is parsed afresh.
STALE_STATEMENT_CODES = frozenset({b"XX000", b"0A000", b"26000"})


def error_code(message: bytes | bytearray | memoryview) -> bytes:
    """The SQLSTATE of an ErrorResponse message (header included); b"" if it has none."""
    pos, end = 5, len(message)
    while pos < end and message[pos]:
        stop = bytes(message[pos + 1:end]).index(b"\x00") + pos + 1
        if message[pos] == 0x43:  # 'C'
            return bytes(message[pos + 1:stop])
        pos = stop + 1
    return b""


# Settings Postgres reports with ParameterStatus that a session can SET: followed when the backend
# reports a change during a client's transaction, so they survive on the client's next backend.
REPORTED_SETTABLE = frozenset({"application_name", "client_encoding", "datestyle", "intervalstyle", "timezone",
                               "standard_conforming_strings"})


def reported_setting(message: bytes) -> tuple[str, bytes] | None:
    """A ParameterStatus message as a tracked setting (name, replay statement); None when the
    parameter is not one a session can set."""
    end = message.index(b"\x00", 5)
    name = message[5:end].decode(errors="replace").lower()
    if name not in REPORTED_SETTABLE:
        return None
    value = message[end + 1:message.index(b"\x00", end + 1)].decode(errors="replace")
    return name, f"SELECT pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)".encode()


def with_setting(settings: Settings, name: str, statement: bytes | None) -> Settings:
    """``settings`` after a tracked SET (statement) or RESET (None; name ``all`` clears all)."""
    if statement is None and name == "all":
        return NO_SETTINGS
    kept = [(n, s) for n, s in settings if n != name]
    if statement is not None:
        kept.append((name, statement))
    return tuple(sorted(kept))


def apply_sql(settings: Settings) -> bytes:
    """One simple query that turns any backend of the pool into one with exactly ``settings``."""
    return b"; ".join([b"RESET ALL", *(s for _, s in settings)])


def parse_options(options: str) -> list[tuple[str, str]] | None:
    """``-c name=value`` / ``--name=value`` pairs from the ``options`` startup parameter; None when
    it holds anything else (command-line switches cannot be replayed on a shared backend)."""
    words = options.replace("\\ ", "\x00").split()
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            w = "--" + words[i + 1]
            i += 1
        elif w.startswith("-c") and len(w) > 2:
            w = "--" + w[2:]
        if not w.startswith("--") or "=" not in w:
            return None
        name, value = w[2:].split("=", 1)
        out.append((name.replace("-", "_"), value.replace("\x00", " ")))
        i += 1
    return out


# -- prepared statements ----------------------------------------------------------------------------


class ServerStatement:
    """One text (with its parameter types) under the pooler's name: ``parse`` is the whole Parse
    message that prepares it on a backend."""

    __slots__ = ("name", "parse")

    def __init__(self, name: bytes, parse: bytes) -> None:
        self.name = name
        self.parse = parse


class StatementNames:
    """Text → server name, shared by every pool of the proxy. Names come from a counter and are
    never reused, so dropping an old entry (bounded memory) cannot make a backend run the wrong
    text: a client holds its ServerStatement, and a dropped text just gets a new name next time."""

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self._by_body: OrderedDict[bytes, ServerStatement] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._by_body)

    def get(self, body: bytes) -> ServerStatement:
        """``body``: a Parse payload after the statement name (query, NUL, parameter types)."""
        found = self._by_body.get(body)
        if found is not None:
            return found
        self._next += 1
        name = b"lakelet_s%d" % self._next
        stmt = ServerStatement(name, encode_message(b"P", name + b"\x00" + body))
        self._by_body[body] = stmt
        if len(self._by_body) > self.limit:
            self._by_body.popitem(last=False)
        return stmt

    def retire(self, stmt: ServerStatement) -> None:
        """A client deallocated ``stmt``: the next Parse of its text gets a new name, so it is
        parsed afresh on every backend (as a re-prepare on Postgres is, after DDL changed the
        types it was inferred from) instead of reusing a server statement planned before."""
        body = stmt.parse[5 + len(stmt.name) + 1:]
        if self._by_body.get(body) is stmt:
            del self._by_body[body]


class BackendStatements:
    """Server names prepared on one backend, least recently used first."""

    __slots__ = ("_names", "limit")

    def __init__(self, limit: int) -> None:
        self._names: OrderedDict[bytes, None] = OrderedDict()
        self.limit = limit

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: bytes) -> bool:
        return name in self._names

    def use(self, name: bytes) -> bool:
        """True if prepared here (now the most recently used)."""
        if name in self._names:
            self._names.move_to_end(name)
            return True
        return False

    def add(self, name: bytes) -> list[bytes]:
        """Record ``name`` as prepared; return the names to close to stay within the limit."""
        self._names[name] = None
        evicted: list[bytes] = []
        while len(self._names) > self.limit:
            evicted.append(self._names.popitem(last=False)[0])
        return evicted

    def discard(self, name: bytes) -> None:
        self._names.pop(name, None)

    def clear(self) -> None:
        self._names.clear()


def close_statement(name: bytes) -> bytes:
    return encode_message(b"C", b"S" + name + b"\x00")


def split_cstring(payload: bytes, start: int = 0) -> tuple[bytes, int]:
    """The NUL-terminated string at ``start`` and where what follows it begins."""
    end = payload.find(b"\x00", start)
    if end < 0:
        raise ValueError("unterminated string in a message")
    return payload[start:end], end + 1


def rename_bind(payload: bytes, stmt_at: int, stmt_end: int, server_name: bytes) -> bytes:
    """A Bind message (type byte and length included) with its statement name replaced."""
    body = payload[:stmt_at] + server_name + payload[stmt_end - 1:]
    return b"B" + _I32.pack(4 + len(body)) + body
