"""A sans-I/O decoder for ``pgoutput``, Postgres' built-in logical decoding output (protocol 1).

One message goes in (the payload of an XLogData frame, as the replication connection hands it
over), typed events come out; nothing here touches a socket, so it is tested without one.

``Decoder`` is the transaction state machine, in the style of h11: two states and one table of
legal moves. ``Begin`` opens a transaction, ``Relation``/``Type``/``Origin``/``Insert``/``Update``
/``Delete``/``Truncate`` may only come inside one, and ``Commit`` closes it; anything else raises
``DecodeError`` at once instead of mislabelling a change. It also keeps the relation cache
(pgoutput sends each relation's description once, before its first change and again after DDL),
so every row event it emits carries the column list it was written with, and the commit LSN,
xid and commit time of its transaction (all known from ``Begin``).

Values stay in their Postgres text form (``str``), ``None`` for NULL, or ``UNCHANGED`` for a
TOASTed value an UPDATE left alone; turning them into Arrow values is ``lakehouse.values``' job.

Bulk loads are long runs of inserts into one table. ``Decoder.feed_many`` hands such a run over as
one ``InsertRun`` whose values are decoded column by column (``decode_insert_columns``: NumPy over
the joined messages, one Arrow string array per column) instead of one Python ``str`` per value.
Anything that path does not accept exactly is decoded message by message by the scalar path,
which raises the precise ``DecodeError``: the scalar path is the reference, the bulk one only an
accelerator for what it is sure about.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_I16_AT = _I16.unpack_from
_I32_AT = _I32.unpack_from


class DecodeError(Exception):
    """A pgoutput message that is malformed or out of order; the message says which."""


class _Unchanged:
    """The value of a TOASTed column an UPDATE did not touch (pgoutput sends no data for it)."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = _Unchanged()
Value = str | None | _Unchanged


def pg_time(micros: int) -> datetime:
    """A Postgres TimestampTz (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


def pg_micros(when: datetime) -> int:
    delta = when - PG_EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


# -- messages ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    final_lsn: int  # the LSN of the transaction's commit record
    commit_time: datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True)
class RelationColumn:
    name: str
    type_oid: int
    typmod: int
    key: bool = False


@dataclass(frozen=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True)
class Type:
    oid: int
    namespace: str
    name: str


@dataclass(slots=True)
class Insert:
    relation_oid: int
    new: tuple[Value, ...]


@dataclass(slots=True)
class Update:
    relation_oid: int
    new: tuple[Value, ...]
    old: tuple[Value, ...] | None = None  # present with REPLICA IDENTITY FULL ('O') or a changed key ('K')
    old_is_key: bool = False  # 'K': only the key columns of ``old`` are set, the rest are None


@dataclass(slots=True)
class Delete:
    relation_oid: int
    old: tuple[Value, ...]
    old_is_key: bool = False


@dataclass(frozen=True)
class Truncate:
    options: int  # 1 = CASCADE, 2 = RESTART IDENTITY
    relation_oids: tuple[int, ...]


@dataclass(frozen=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage


# -- reading ----------------------------------------------------------------------------------------


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 1

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise DecodeError(f"pgoutput {chr(self.buf[0])!r} message truncated at byte {self.pos}")

    def unpack(self, s: struct.Struct) -> tuple[int, ...]:
        self.need(s.size)
        out = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return out

    def byte(self) -> int:
        self.need(1)
        self.pos += 1
        return self.buf[self.pos - 1]

    def cstring(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise DecodeError(f"pgoutput {chr(self.buf[0])!r} message: unterminated string")
        text = self.buf[self.pos:end].decode()
        self.pos = end + 1
        return text

    def take(self, n: int) -> bytes:
        self.need(n)
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def tuple_data(self) -> tuple[Value, ...]:
        values, self.pos = _tuple_at(self.buf, self.pos)
        return values

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise DecodeError(f"pgoutput {chr(self.buf[0])!r} message: {len(self.buf) - self.pos} trailing bytes")


def _tuple_at(buf: bytes, pos: int) -> tuple[tuple[Value, ...], int]:
    """TupleData at ``pos`` → (values, position after it). The hot loop of the decoder: locals
    only, no method calls per column; reading past the end raises (IndexError / struct.error),
    turned into one DecodeError."""
    size = len(buf)
    values: list[Value] = []
    append = values.append
    try:
        (ncols,) = _I16_AT(buf, pos)
        pos += 2
        for _ in range(ncols):
            kind = buf[pos]
            if kind == 0x74:  # 't'
                (length,) = _I32_AT(buf, pos + 1)
                start = pos + 5
                pos = start + length
                if length < 0 or pos > size:
                    raise DecodeError("pgoutput tuple: value length beyond the message")
                append(buf[start:pos].decode())
            elif kind == 0x6E:  # 'n'
                pos += 1
                append(None)
            elif kind == 0x75:  # 'u'
                pos += 1
                append(UNCHANGED)
            else:
                raise DecodeError(f"pgoutput tuple: unknown column kind {kind!r} (binary mode is not requested)")
    except (IndexError, struct.error):
        raise DecodeError("pgoutput tuple truncated") from None
    return tuple(values), pos


def parse(payload: bytes) -> Message:
    """Decode one pgoutput message (the whole payload of one XLogData frame)."""
    if not payload:
        raise DecodeError("empty pgoutput message")
    r = _Reader(payload)
    kind = payload[0]
    msg: Message
    if kind == 0x42:  # 'B'
        final_lsn, ts, xid = r.unpack(_BEGIN)
        msg = Begin(final_lsn, pg_time(ts), xid)
    elif kind == 0x43:  # 'C'
        flags, commit_lsn, end_lsn, ts = r.unpack(_COMMIT)
        msg = Commit(flags, commit_lsn, end_lsn, pg_time(ts))
    elif kind == 0x4F:  # 'O'
        (lsn,) = r.unpack(_U64)
        msg = Origin(lsn, r.cstring())
    elif kind == 0x52:  # 'R'
        (oid,) = r.unpack(_U32)
        namespace, name = r.cstring(), r.cstring()
        ident = chr(r.byte())
        (ncols,) = r.unpack(_I16)
        cols = []
        for _ in range(ncols):
            flags = r.byte()
            col_name = r.cstring()
            type_oid, typmod = r.unpack(_U32)[0], r.unpack(_I32)[0]
            cols.append(RelationColumn(col_name, type_oid, typmod, bool(flags & 1)))
        msg = Relation(oid, namespace, name, ident, tuple(cols))
    elif kind == 0x59:  # 'Y'
        (oid,) = r.unpack(_U32)
        msg = Type(oid, r.cstring(), r.cstring())
    elif kind == 0x49:  # 'I'
        (oid,) = r.unpack(_U32)
        if r.byte() != 0x4E:
            raise DecodeError("pgoutput insert: expected 'N' before the new tuple")
        msg = Insert(oid, r.tuple_data())
    elif kind == 0x55:  # 'U'
        (oid,) = r.unpack(_U32)
        tag = r.byte()
        old: tuple[Value, ...] | None = None
        is_key = False
        if tag in (0x4B, 0x4F):  # 'K', 'O'
            is_key = tag == 0x4B
            old = r.tuple_data()
            tag = r.byte()
        if tag != 0x4E:
            raise DecodeError("pgoutput update: expected 'N' before the new tuple")
        msg = Update(oid, r.tuple_data(), old, is_key)
    elif kind == 0x44:  # 'D'
        (oid,) = r.unpack(_U32)
        tag = r.byte()
        if tag not in (0x4B, 0x4F):
            raise DecodeError("pgoutput delete: expected 'K' or 'O' before the old tuple")
        msg = Delete(oid, r.tuple_data(), tag == 0x4B)
    elif kind == 0x54:  # 'T'
        (nrels,) = r.unpack(_I32)
        options = r.byte()
        if nrels < 0:
            raise DecodeError("pgoutput truncate: negative relation count")
        msg = Truncate(options, tuple(r.unpack(_U32)[0] for _ in range(nrels)))
    elif kind == 0x4D:  # 'M'
        flags = r.byte()
        (lsn,) = r.unpack(_U64)
        prefix = r.cstring()
        (length,) = r.unpack(_I32)
        msg = LogicalMessage(bool(flags & 1), lsn, prefix, r.take(length))
    else:
        raise DecodeError(f"unknown pgoutput message type {chr(kind)!r}: request proto_version 1 without streaming")
    r.done()
    return msg


# -- writing (what a walsender would send; the tests and the benchmark build streams with it) ------


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _tuple(values: tuple[Value, ...]) -> bytes:
    out = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            out.append(b"n")
        elif v is UNCHANGED:
            out.append(b"u")
        else:
            data = str(v).encode()
            out.append(b"t" + _I32.pack(len(data)) + data)
    return b"".join(out)


def encode(msg: Message) -> bytes:
    if isinstance(msg, Begin):
        return b"B" + _BEGIN.pack(msg.final_lsn, pg_micros(msg.commit_time), msg.xid)
    if isinstance(msg, Commit):
        return b"C" + _COMMIT.pack(msg.flags, msg.commit_lsn, msg.end_lsn, pg_micros(msg.commit_time))
    if isinstance(msg, Origin):
        return b"O" + _U64.pack(msg.lsn) + _cstr(msg.name)
    if isinstance(msg, Relation):
        cols = b"".join(bytes([int(c.key)]) + _cstr(c.name) + _U32.pack(c.type_oid) + _I32.pack(c.typmod)
                        for c in msg.columns)
        return (b"R" + _U32.pack(msg.oid) + _cstr(msg.namespace) + _cstr(msg.name)
                + msg.replica_identity.encode() + _I16.pack(len(msg.columns)) + cols)
    if isinstance(msg, Type):
        return b"Y" + _U32.pack(msg.oid) + _cstr(msg.namespace) + _cstr(msg.name)
    if isinstance(msg, Insert):
        return b"I" + _U32.pack(msg.relation_oid) + b"N" + _tuple(msg.new)
    if isinstance(msg, Update):
        old = b"" if msg.old is None else (b"K" if msg.old_is_key else b"O") + _tuple(msg.old)
        return b"U" + _U32.pack(msg.relation_oid) + old + b"N" + _tuple(msg.new)
    if isinstance(msg, Delete):
        return b"D" + _U32.pack(msg.relation_oid) + (b"K" if msg.old_is_key else b"O") + _tuple(msg.old)
    if isinstance(msg, Truncate):
        return (b"T" + _I32.pack(len(msg.relation_oids)) + bytes([msg.options])
                + b"".join(_U32.pack(o) for o in msg.relation_oids))
    return (b"M" + bytes([int(msg.transactional)]) + _U64.pack(msg.lsn) + _cstr(msg.prefix)
            + _I32.pack(len(msg.content)) + msg.content)


# -- the transaction state machine ------------------------------------------------------------------


class TxState(enum.Enum):
    IDLE = "idle"
    IN_TRANSACTION = "in transaction"


# (state, message type) → next state. Everything not listed is illegal.
TRANSITIONS: dict[tuple[TxState, type], TxState] = {
    (TxState.IDLE, Begin): TxState.IN_TRANSACTION,
    (TxState.IDLE, LogicalMessage): TxState.IDLE,  # non-transactional messages come outside
    **{(TxState.IN_TRANSACTION, t): TxState.IN_TRANSACTION
       for t in (Origin, Relation, Type, Insert, Update, Delete, Truncate, LogicalMessage)},
    (TxState.IN_TRANSACTION, Commit): TxState.IDLE,
}


@dataclass(frozen=True)
class Transaction:
    """What every change of one transaction shares."""

    xid: int
    commit_lsn: int
    commit_time: datetime


@dataclass(slots=True)
class RowChange:
    """One row event, resolved against the relation description it was written with."""

    tx: Transaction
    seq: int  # position inside the transaction: (commit_lsn, seq) orders every change
    kind: str  # 'insert' | 'update' | 'delete'
    relation: Relation
    new: tuple[Value, ...] | None
    old: tuple[Value, ...] | None
    old_is_key: bool
    lsn: int  # WAL position of the change (from the XLogData frame; 0 when unknown)


@dataclass(slots=True)
class InsertRun:
    """Consecutive inserts into one relation inside one transaction, decoded column by column:
    ``columns[i]`` is an Arrow string array (text form, null for NULL) of the relation's i-th column.
    The k-th row is at position ``seq + k`` of the transaction and WAL position ``lsns[k]``."""

    tx: Transaction
    seq: int
    relation: Relation
    columns: list[pa.Array]
    lsns: list[int]


@dataclass(frozen=True)
class TruncateChange:
    tx: Transaction
    seq: int
    relations: tuple[Relation, ...]
    lsn: int


@dataclass(frozen=True)
class TransactionEnd:
    tx: Transaction
    end_lsn: int
    changes: int


Event = RowChange | InsertRun | TruncateChange | TransactionEnd | Relation | Transaction

# Below this many consecutive inserts the scalar path is cheaper than the NumPy set-up.
BULK_MIN = 16


def _be32(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Big-endian signed int32s at the byte positions ``at`` of ``buf``."""
    b = [buf[at + k].astype(np.int64) for k in range(4)]
    value = (b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]
    return np.where(value >= 1 << 31, value - (1 << 32), value)


def _string_column(buf: np.ndarray, start: np.ndarray, length: np.ndarray, valid: np.ndarray) -> pa.Array | None:
    """Arrow strings from the byte ranges ``[start, start + length)`` of ``buf`` (null where not
    ``valid``); None when the data is too large for 32-bit offsets or not UTF-8."""
    n = len(start)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(length, out=offsets[1:])
    total = int(offsets[-1])
    if total >= 1 << 31:
        return None
    # Every value's bytes gathered into one buffer: byte j of value i is at start[i] + j.
    data = buf[np.repeat(start - offsets[:-1], length) + np.arange(total)]
    nulls = n - int(np.count_nonzero(valid))
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    array = pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data), bitmap,
                                        nulls)
    try:
        array.validate(full=True)  # UTF-8, as str.decode would insist on
    except pa.ArrowInvalid:
        return None
    return array


def decode_insert_columns(relation: Relation, payloads: Sequence[bytes]) -> list[pa.Array] | None:
    """Insert messages of ``relation`` → one Arrow string array per column, all rows at once.

    Checks what the scalar path checks ('N' tag, column count, 't'/'n' kinds only, lengths inside
    the message, no trailing bytes) on every message; returns None if any message fails one (the
    caller then decodes message by message and gets the precise error)."""
    lengths = np.fromiter(map(len, payloads), np.int64, len(payloads))
    ends = np.cumsum(lengths)
    return _decode_columns(relation, np.frombuffer(b"".join(payloads), np.uint8), ends - lengths, ends)


def _decode_columns(relation: Relation, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[pa.Array] | None:
    """``decode_insert_columns`` for the messages at ``buf[starts[k]:ends[k]]``."""
    n = len(starts)
    ncols = len(relation.columns)
    if n == 0 or int((ends - starts).min()) < 8:
        return None
    if (buf[starts + 5] != 0x4E).any():  # 'N'
        return None
    if ((buf[starts + 6].astype(np.int64) << 8 | buf[starts + 7]) != ncols).any():
        return None
    pos = starts + 8
    columns: list[pa.Array] = []
    for _ in range(ncols):
        if (pos >= ends).any():
            return None
        kind = buf[pos]
        text = kind == 0x74  # 't'; the other legal kind in an insert is 'n' (NULL)
        if not (text | (kind == 0x6E)).all():
            return None
        length = np.zeros(n, np.int64)
        at = pos[text]
        if len(at):
            if (at + 5 > ends[text]).any():
                return None
            length[text] = _be32(buf, at + 1)
            if (length < 0).any():
                return None
        nxt = np.where(text, pos + 5 + length, pos + 1)
        if (nxt > ends).any():
            return None
        column = _string_column(buf, pos + 5, length, text)
        if column is None:
            return None
        columns.append(column)
        pos = nxt
    if (pos != ends).any():
        return None
    return columns


@dataclass
class Decoder:
    """pgoutput messages in, ``Event``s out. ``feed`` returns what one message produced:

    - ``Transaction`` for a Begin (every change until the ``TransactionEnd`` belongs to it),
    - ``Relation`` when a relation's description arrives (new, or changed by DDL),
    - ``RowChange`` / ``TruncateChange`` for changes, ``TransactionEnd`` for a Commit.
    """

    state: TxState = TxState.IDLE
    relations: dict[int, Relation] = field(default_factory=dict)
    tx: Transaction | None = None
    seq: int = 0

    def _move(self, msg: Message) -> None:
        nxt = TRANSITIONS.get((self.state, type(msg)))
        if nxt is None:
            raise DecodeError(f"pgoutput {type(msg).__name__} is not allowed {self.state.value}")
        self.state = nxt

    def _relation(self, oid: int) -> Relation:
        rel = self.relations.get(oid)
        if rel is None:
            raise DecodeError(f"pgoutput change for relation {oid} before its Relation message")
        return rel

    def _check_width(self, rel: Relation, values: tuple[Value, ...] | None) -> None:
        if values is not None and len(values) != len(rel.columns):
            raise DecodeError(f"pgoutput tuple for {rel.namespace}.{rel.name} has {len(values)} columns, "
                              f"its Relation message {len(rel.columns)}")

    def feed(self, payload: bytes, lsn: int = 0) -> Event | None:
        if payload[:1] == b"I" and self.state is TxState.IN_TRANSACTION:
            return self._insert(payload, lsn)
        msg = parse(payload)
        self._move(msg)
        if isinstance(msg, Begin):
            self.tx = Transaction(msg.xid, msg.final_lsn, msg.commit_time)
            self.seq = 0
            return self.tx
        tx = self.tx
        if isinstance(msg, Commit):
            assert tx is not None
            if msg.commit_lsn != tx.commit_lsn:
                raise DecodeError(f"pgoutput Commit at {msg.commit_lsn:X} for a transaction that began "
                                  f"with final LSN {tx.commit_lsn:X}")
            self.tx = None
            return TransactionEnd(tx, msg.end_lsn, self.seq)
        if isinstance(msg, Relation):
            self.relations[msg.oid] = msg
            return msg
        if isinstance(msg, Insert | Update | Delete):
            assert tx is not None
            rel = self._relation(msg.relation_oid)
            if isinstance(msg, Insert):
                change = RowChange(tx, self.seq, "insert", rel, msg.new, None, False, lsn)
            elif isinstance(msg, Update):
                change = RowChange(tx, self.seq, "update", rel, msg.new, msg.old, msg.old_is_key, lsn)
            else:
                change = RowChange(tx, self.seq, "delete", rel, None, msg.old, msg.old_is_key, lsn)
            self._check_width(rel, change.new)
            self._check_width(rel, change.old)
            self.seq += 1
            return change
        if isinstance(msg, Truncate):
            assert tx is not None
            rels = tuple(self._relation(o) for o in msg.relation_oids)
            event = TruncateChange(tx, self.seq, rels, lsn)
            self.seq += 1
            return event
        return None  # Origin, Type, LogicalMessage: nothing the sync needs

    def feed_many(self, payloads: Sequence[bytes], lsns: Sequence[int]) -> Iterator[Event]:
        """``feed`` for a batch of messages (as read off the stream), yielding what each produced,
        except that a run of at least ``BULK_MIN`` consecutive inserts into one relation comes out
        as one ``InsertRun`` (IN_TRANSACTION —Insert→ IN_TRANSACTION, once per row). The runs are
        found on the joined batch at once (each message's first five bytes: 'I' and the OID)."""
        n = len(payloads)
        if n < BULK_MIN:
            yield from self._feed_each(payloads, lsns, 0, n)
            return
        lengths = np.fromiter(map(len, payloads), np.int64, n)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        buf = np.frombuffer(b"".join(payloads), np.uint8)
        key = np.full(n, -1, np.int64)  # the relation OID of an insert, -1 for anything else
        maybe = np.flatnonzero(lengths >= 8)
        inserts = maybe[buf[starts[maybe]] == 0x49]  # 'I'
        key[inserts] = _be32(buf, starts[inserts] + 1) & 0xFFFFFFFF
        bounds = [0, *(np.flatnonzero(key[1:] != key[:-1]) + 1).tolist(), n]
        for i, j in zip(bounds, bounds[1:], strict=False):
            rel = self.relations.get(int(key[i])) if key[i] >= 0 and j - i >= BULK_MIN else None
            if rel is None or self.state is not TxState.IN_TRANSACTION:
                yield from self._feed_each(payloads, lsns, i, j)
                continue
            columns = _decode_columns(rel, buf, starts[i:j], ends[i:j])
            if columns is None:  # one of them is not what the bulk path expects: the scalar path says which
                yield from self._feed_each(payloads, lsns, i, j)
                continue
            assert self.tx is not None
            yield InsertRun(self.tx, self.seq, rel, columns, list(lsns[i:j]))
            self.seq += j - i

    def _feed_each(self, payloads: Sequence[bytes], lsns: Sequence[int], i: int, j: int) -> Iterator[Event]:
        for k in range(i, j):
            event = self.feed(payloads[k], lsns[k])
            if event is not None:
                yield event

    def _insert(self, payload: bytes, lsn: int) -> RowChange:
        """The hot path (bulk loads are inserts): the same checks as ``parse`` + ``feed``, without
        the intermediate ``Insert``. (IN_TRANSACTION, Insert) → IN_TRANSACTION per the table."""
        if len(payload) < 6:
            raise DecodeError("pgoutput 'I' message truncated at byte 1")
        oid = _U32.unpack_from(payload, 1)[0]
        if payload[5] != 0x4E:
            raise DecodeError("pgoutput insert: expected 'N' before the new tuple")
        values, end = _tuple_at(payload, 6)
        if end != len(payload):
            raise DecodeError(f"pgoutput 'I' message: {len(payload) - end} trailing bytes")
        rel = self.relations.get(oid)
        if rel is None:
            raise DecodeError(f"pgoutput change for relation {oid} before its Relation message")
        if len(values) != len(rel.columns):
            self._check_width(rel, values)
        assert self.tx is not None
        change = RowChange(self.tx, self.seq, "insert", rel, values, None, False, lsn)
        self.seq += 1
        return change
