"""The syncer: one branch's schema, from a logical replication slot into Delta history tables.

It is blocking code (psycopg2's replication connection is): it runs in its own process
(``lakehouse.worker``), never on an event loop. One run goes:

1. **Prepare** (a normal connection): the publication (``FOR TABLES IN SCHEMA`` or ``FOR TABLE``),
   ``REPLICA IDENTITY FULL`` on every table in scope that lacks it (said in status), partitioned
   tables refused in status.
2. **Snapshot**, unless this slot already finished one: the slot is created with an exported
   snapshot; every table is copied under it (``SET TRANSACTION SNAPSHOT``) as ``insert`` rows at
   the slot's consistent point, each table replaced (overwrite) in one Delta commit tagged with
   that LSN; then ``progress.json`` records the snapshot as done for this slot.
3. **Stream** from the slot's confirmed position: pgoutput → ``Decoder`` → per-table buffers;
   every ``flush_interval`` (between transactions) each table with changes gets one Delta commit
   tagged with its greatest commit LSN, and only then is the slot confirmed. Redelivered
   transactions (a crash after Delta committed, before the slot was confirmed) are recognised by
   the recorded version and dropped.

Why psycopg2 rather than an own replication client: it is the maintained one, already a
dependency, and the decoding cost is ours either way (the stream is read in C; bench/lakehouse_sync.py
compares it to the raw rate).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras
from psycopg2 import sql as psql

from lakehouse import location, pgoutput
from lakehouse.history import HistoryTable, Pending, TableSyncError, history_uri
from lakehouse.pgoutput import InsertRun, Relation, RelationColumn, RowChange, TransactionEnd, TruncateChange

log = logging.getLogger("lakelet.lakehouse")

# Every value crosses in its text form under these settings (lakehouse.values relies on them).
SESSION_OPTIONS = "-c DateStyle=ISO -c TimeZone=UTC -c bytea_output=hex -c IntervalStyle=postgres"
SNAPSHOT_BATCH = 50_000
BACKPRESSURE = 4  # × max_buffered_rows buffered while a commit is in flight: then wait for it
READ_BATCH = 10_000  # messages read off the stream before they are decoded as one batch
TX_BOUNDARY = (b"C", b"M")  # after a Commit (or a non-transactional message) a batch may end
BEHIND = 1.0  # seconds: reading transactions committed longer ago than this is catching up

# A schema-wide sync picks up tables created later; this event trigger gives each of them REPLICA
# IDENTITY FULL in the same transaction that creates it (a table in a schema some lakelet_sync
# publication covers), so not even its first update lacks the old row.
IDENTITY_TRIGGER = """
CREATE SCHEMA IF NOT EXISTS lakelet_sync;
GRANT USAGE ON SCHEMA lakelet_sync TO PUBLIC;
CREATE OR REPLACE FUNCTION lakelet_sync.replica_identity_full() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT objid FROM pg_event_trigger_ddl_commands()
           WHERE command_tag = 'CREATE TABLE' AND object_type = 'table' LOOP
    IF EXISTS (SELECT 1 FROM pg_class c
               JOIN pg_publication_namespace pn ON pn.pnnspid = c.relnamespace
               JOIN pg_publication p ON p.oid = pn.pnpubid
               WHERE c.oid = r.objid AND c.relkind = 'r' AND p.pubname LIKE 'lakelet\\_sync\\_%') THEN
      EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', r.objid::regclass);
    END IF;
  END LOOP;
END $$;
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'lakelet_sync_replica_identity') THEN
    CREATE EVENT TRIGGER lakelet_sync_replica_identity ON ddl_command_end WHEN TAG IN ('CREATE TABLE')
      EXECUTE FUNCTION lakelet_sync.replica_identity_full();
  END IF;
END $$;
"""
STATUS_EVERY = 0.5


def slot_name(branch_id: int, database: str, schema: str) -> str:
    """The slot (also the publication and the Delta app id) of one sync: per branch *id*, so a
    restored or reset branch (a new id under the old name) never reuses its predecessor's slot."""
    digest = hashlib.sha1(f"{database}/{schema}".encode()).hexdigest()[:8]
    return f"lakelet_sync_{branch_id}_{digest}"


def fmt_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


@dataclass
class SyncSpec:
    """Everything a worker needs; written as JSON by whoever starts it."""

    branch: str
    database: str
    schema: str
    tables: list[str] | None
    lakehouse_uri: str
    slot: str
    host: str
    port: int
    user: str
    state_dir: str
    flush_interval: float = 0.25
    max_buffered_rows: int = 200_000
    storage_options: dict[str, str] | None = None

    @property
    def base_uri(self) -> str:
        return f"{self.lakehouse_uri.rstrip('/')}/{self.branch}/{self.database}/{self.schema}"

    def dsn(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "dbname": self.database,
                "application_name": "lakelet_sync", "options": SESSION_OPTIONS}

    @classmethod
    def load(cls, path: Path) -> SyncSpec:
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        _write_json(path, asdict(self))


def _write_json(path: Path, data: object, *, durable: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, default=str)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class TableStatus:
    state: str = "streaming"  # snapshotting | streaming | error
    error: str | None = None
    last_lsn: str | None = None
    rows: int = 0
    bytes: int = 0
    lag_seconds: float = 0.0
    note: str | None = None


@dataclass
class Status:
    state: str = "starting"  # starting | snapshotting | streaming | stopped | error
    error: str | None = None
    pid: int = field(default_factory=os.getpid)
    slot: str = ""
    consistent_lsn: str | None = None
    confirmed_lsn: str | None = None
    received_lsn: str | None = None
    drained_lsn: str | None = None
    snapshot_note: str | None = None
    updated_at: float = 0.0
    tables: dict[str, TableStatus] = field(default_factory=dict)


class StopSync(Exception):
    pass


class Syncer:
    def __init__(self, spec: SyncSpec) -> None:
        self.spec = spec
        self.state_dir = Path(spec.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.status = Status(slot=spec.slot)
        self.tables: dict[str, HistoryTable] = {}
        self.storage_options = (spec.storage_options if spec.storage_options is not None
                                else location.storage_options(spec.lakehouse_uri))
        self.decoder = pgoutput.Decoder()
        self.confirmed = 0
        self.last_end = 0
        self.drain_target: int | None = None
        self.stop_requested = False
        self._buffer_since: float | None = None
        self._status_written = 0.0
        self._identity_fixed: set[int] = set()
        self._lost_limit = ""
        self._last_commit_at = 0.0  # commit time (epoch) of the last transaction read
        self.scope: list[str] = []
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="delta-flush")
        self._inflight: Future[tuple[int, list[tuple[str, int, int, str | None]]]] | None = None

    # -- status and progress ----------------------------------------------------------------------

    def _table_status(self, name: str) -> TableStatus:
        st = self.status.tables.get(name)
        if st is None:
            st = self.status.tables[name] = TableStatus()
        return st

    def write_status(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._status_written < STATUS_EVERY:
            return
        for name, table in self.tables.items():
            st = self._table_status(name)
            st.lag_seconds = (round(now - table.first_commit_time.timestamp(), 3)
                              if table.first_commit_time is not None else 0.0)
            if table.committed is not None:
                st.last_lsn = fmt_lsn(table.committed)
        self.status.updated_at = now
        self._status_written = now
        _write_json(self.state_dir / "status.json", asdict(self.status), durable=False)

    def _progress(self) -> dict[str, Any]:
        try:
            return json.loads((self.state_dir / "progress.json").read_text())
        except (OSError, ValueError):
            return {}

    # -- tables -----------------------------------------------------------------------------------

    def _table(self, name: str) -> HistoryTable:
        table = self.tables.get(name)
        if table is None:
            table = HistoryTable(history_uri(self.spec.base_uri, name), self.spec.slot,
                                 storage_options=self.storage_options)
            self.tables[name] = table
            self._table_status(name)
        return table

    def _fail_table(self, name: str, error: str) -> None:
        table = self._table(name)
        table.error = error
        table.clear()
        st = self._table_status(name)
        st.state, st.error = "error", error
        log.warning(f"lakehouse sync of {self.spec.schema}.{name} stopped: {error}")

    # -- prepare ----------------------------------------------------------------------------------

    def _connect(self) -> psycopg2.extensions.connection:
        conn = psycopg2.connect(**self.spec.dsn())
        conn.autocommit = True
        return conn

    def prepare(self, conn: psycopg2.extensions.connection) -> None:
        spec = self.spec
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (spec.schema,))
            if cur.fetchone() is None:
                raise StopSync(f"schema {spec.schema!r} does not exist in database {spec.database!r}: "
                               "create it or enable the sync for another --schema")
            cur.execute("SELECT c.relname, c.relkind, c.relreplident FROM pg_class c "
                        "JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p')",
                        (spec.schema,))
            found = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
            if spec.tables is not None:
                missing = [t for t in spec.tables if t not in found]
                if missing:
                    raise StopSync(f"table {spec.schema}.{missing[0]} does not exist: create it or leave it out "
                                   "of --tables")
            scope = spec.tables if spec.tables is not None else sorted(found)
            for name in scope:
                kind, ident = found[name]
                if kind == "p":
                    self._fail_table(name, "partitioned tables are not synced as one: each partition is synced "
                                           "as its own table (lb_<partition>_history); list partitions in --tables")
                    continue
                if ident != "f":
                    cur.execute(psql.SQL("ALTER TABLE {}.{} REPLICA IDENTITY FULL").format(
                        psql.Identifier(spec.schema), psql.Identifier(name)))
                    self._table_status(name).note = "REPLICA IDENTITY set to FULL (update and delete history " \
                                                    "needs the whole old row)"
                    log.info(f"lakehouse sync: set REPLICA IDENTITY FULL on {spec.schema}.{name}")
            if spec.tables is None:
                cur.execute(IDENTITY_TRIGGER)
            cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (spec.slot,))
            if cur.fetchone() is None:
                if spec.tables is None:
                    cur.execute(psql.SQL("CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}").format(
                        psql.Identifier(spec.slot), psql.Identifier(spec.schema)))
                else:
                    names = [n for n in scope if found[n][0] == "r"]
                    cur.execute(psql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                        psql.Identifier(spec.slot),
                        psql.SQL(", ").join(psql.Identifier(spec.schema, n) for n in names)))
        self.scope = [n for n in scope if found[n][0] == "r"]

    def _relation(self, cur: psycopg2.extensions.cursor, name: str) -> Relation:
        cur.execute(
            "SELECT c.oid, c.relreplident, a.attname, a.atttypid, a.atttypmod, "
            "       coalesce(a.attnum = ANY(i.indkey), false) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "     AND a.attgenerated = '' "
            "LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary "
            "WHERE n.nspname = %s AND c.relname = %s ORDER BY a.attnum", (self.spec.schema, name))
        rows = cur.fetchall()
        cols = tuple(RelationColumn(r[2], r[3], r[4], r[5]) for r in rows)
        return Relation(rows[0][0], self.spec.schema, name, rows[0][1], cols)

    # -- snapshot ---------------------------------------------------------------------------------

    def _slot_state(self, conn: psycopg2.extensions.connection) -> str | None:
        """None (no slot), 'lost' (Postgres invalidated it: it held more WAL than
        ``max_slot_wal_keep_size`` while no one read it), 'gone' (WAL it needs was found missing by
        the last run) or 'ok' (``confirmed`` set from it)."""
        with conn.cursor() as cur:
            cur.execute("SELECT confirmed_flush_lsn::text, wal_status FROM pg_replication_slots "
                        "WHERE slot_name = %s", (self.spec.slot,))
            row = cur.fetchone()
            if row is not None and row[1] == "lost":
                cur.execute("SHOW max_slot_wal_keep_size")
                self._lost_limit = str(cur.fetchone()[0])  # type: ignore[index]
                return "lost"
        if row is not None and self._progress().get("wal_gone"):
            return "gone"
        if row is not None and row[0]:
            self.confirmed = parse_lsn(row[0])
        return None if row is None else "ok"

    def snapshot(self, conn: psycopg2.extensions.connection, repl: Any, reason: str | None) -> None:
        spec = self.spec
        self.status.state = "snapshotting"
        self.status.snapshot_note = reason
        for name in self.scope:
            self._table_status(name).state = "snapshotting"
        self.write_status(force=True)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                        (spec.slot,))
        repl.execute(f"CREATE_REPLICATION_SLOT {spec.slot} LOGICAL pgoutput (SNAPSHOT 'export')")
        _, consistent_text, snapshot_name, _ = repl.fetchone()
        consistent = parse_lsn(consistent_text)
        self.status.consistent_lsn = consistent_text
        taken = datetime.now(UTC)
        snap = psycopg2.connect(**spec.dsn())
        try:
            snap.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with snap.cursor() as cur:
                cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_name,))
                relations = {name: self._relation(cur, name) for name in self.scope}
            for rel in relations.values():
                self._snapshot_table(snap, rel, consistent, taken)
            snap.rollback()
        finally:
            snap.close()
        _write_json(self.state_dir / "progress.json",
                    {"slot": spec.slot, "consistent_lsn": consistent_text, "snapshot_done": True,
                     "tables": self.scope})
        self.confirmed = consistent
        self.last_end = consistent

    def _snapshot_table(self, snap: psycopg2.extensions.connection, rel: Relation, consistent: int,
                        taken: datetime) -> None:
        table = self._table(rel.name)
        table.clear()
        table.declare(rel)
        cols = psql.SQL(", ").join(psql.SQL("{}::text").format(psql.Identifier(c.name)) for c in rel.columns)
        first = True
        seq = 0
        with snap.cursor(name=f"snap_{rel.oid}") as cur:
            cur.itersize = SNAPSHOT_BATCH
            cur.execute(psql.SQL("SELECT {} FROM ONLY {}.{}").format(
                cols, psql.Identifier(rel.namespace), psql.Identifier(rel.name)))
            while True:
                rows = cur.fetchmany(SNAPSHOT_BATCH)
                for row in rows:
                    table.add(rel, row, "insert", lsn=consistent, xid=None, commit_lsn=consistent, seq=seq,
                              commit_time=taken)
                    seq += 1
                if rows or first:
                    self._commit(rel.name, table, consistent, overwrite=first, check=first)
                    first = False
                if len(rows) < SNAPSHOT_BATCH:
                    break
        self._table_status(rel.name).state = "streaming"

    # -- stream -----------------------------------------------------------------------------------

    def _commit(self, name: str, table: HistoryTable, version: int, *, overwrite: bool = False,
                check: bool = True) -> None:
        rows = table.rows
        if not check:
            table.committed = None  # a later chunk of the same snapshot commit: same version
        nbytes = table.commit(version, overwrite=overwrite)
        st = self._table_status(name)
        st.rows += rows
        st.bytes += nbytes

    def flush(self, repl: Any, *, wait: bool = False) -> None:
        """Hand every table's buffer to the flush thread (one Delta commit per table); the slot is
        confirmed through the flushed transactions once all of those commits landed (``_collect``).

        One flush is in flight at a time, so Delta commits stay in LSN order, while the next
        transactions are decoded meanwhile: Parquet encoding and the commit run without the GIL."""
        self._collect(repl, block=True)
        pending = [(name, t.detach()) for name, t in self.tables.items() if t.rows and t.error is None]
        self._buffer_since = None
        end = self.last_end
        if not pending:
            self._confirm(repl, end, force_status=False)
            return
        self._inflight = self._flusher.submit(self._write, pending, end)
        if wait:
            self._collect(repl, block=True)

    @staticmethod
    def _write(pending: list[tuple[str, Pending]], end: int) -> tuple[int, list[tuple[str, int, int, str | None]]]:
        out: list[tuple[str, int, int, str | None]] = []
        for name, batch in pending:
            try:
                out.append((name, batch.rows, batch.commit(batch.max_commit_lsn), None))
            except TableSyncError as e:
                out.append((name, 0, 0, str(e)))
        return end, out

    def _collect(self, repl: Any, *, block: bool) -> None:
        """Take the in-flight flush's outcome (waiting for it when ``block``) and confirm the slot.
        Any failure other than a table's own stops the worker before confirming anything: the
        next run redoes the flush from the slot, and the Delta versions drop what did land."""
        f = self._inflight
        if f is None or (not block and not f.done()):
            return
        self._inflight = None
        end, results = f.result()
        for name, rows, nbytes, error in results:
            if error is not None:
                self._fail_table(name, error)
                continue
            st = self._table_status(name)
            st.rows += rows
            st.bytes += nbytes
        self._confirm(repl, end, force_status=True)

    def _confirm(self, repl: Any, end: int, *, force_status: bool) -> None:
        if end > self.confirmed:
            self.confirmed = end
        repl.send_feedback(write_lsn=self.confirmed, flush_lsn=self.confirmed)
        self.status.confirmed_lsn = fmt_lsn(self.confirmed)
        self.write_status(force=force_status)

    def _note_relation(self, rel: Relation) -> None:
        if rel.namespace != self.spec.schema:
            return
        table = self._table(rel.name)
        if table.error is not None:
            return
        try:
            for c in rel.columns:
                table._column(c.name, c.type_oid, c.typmod)
        except TableSyncError as e:
            self._fail_table(rel.name, str(e))
            return
        if rel.replica_identity != "f" and rel.oid not in self._identity_fixed:
            self._identity_fixed.add(rel.oid)
            self._table_status(rel.name).note = (
                "REPLICA IDENTITY was not FULL when its first change arrived: update preimages before "
                "this point hold only the key columns; set to FULL now")
            with contextlib.suppress(psycopg2.Error), self._connect() as conn, conn.cursor() as cur:
                cur.execute(psql.SQL("ALTER TABLE {}.{} REPLICA IDENTITY FULL").format(
                    psql.Identifier(rel.namespace), psql.Identifier(rel.name)))

    def handle(self, payloads: list[bytes], lsns: list[int], repl: Any) -> None:
        """Decode a batch of messages read off the stream into the tables' buffers; between
        transactions, take a finished flush's outcome and start the next flush when one is due."""
        for event in self.decoder.feed_many(payloads, lsns):
            kind = type(event)
            if kind is RowChange:
                self._row(event)  # type: ignore[arg-type]
            elif kind is InsertRun:
                self._inserts(event)  # type: ignore[arg-type]
            elif kind is TransactionEnd:
                self.last_end = event.end_lsn  # type: ignore[union-attr]
                self._last_commit_at = event.tx.commit_time.timestamp()  # type: ignore[union-attr]
                if self._inflight is not None:
                    self._collect(repl, block=False)
                if self._flush_due(idle=False):
                    self.flush(repl)
            else:
                self._event(event)
        if self.last_end:
            self.status.received_lsn = fmt_lsn(self.last_end)

    def _inserts(self, run: InsertRun) -> None:
        tx = run.tx
        table = self._live(run.relation, tx.commit_lsn)
        if table is not None:
            table.add_inserts(run.relation, run.columns, run.lsns, 2 * run.seq, tx.xid, tx.commit_lsn,
                              tx.commit_time)

    def _event(self, event: pgoutput.Event | None) -> None:
        if isinstance(event, Relation):
            self._note_relation(event)
        elif isinstance(event, TruncateChange):
            for rel in event.relations:
                table = self._live(rel, event.tx.commit_lsn)
                if table is not None:
                    table.add(rel, None, "truncate", lsn=event.lsn, xid=event.tx.xid,
                              commit_lsn=event.tx.commit_lsn, seq=2 * event.seq, commit_time=event.tx.commit_time)

    def _live(self, rel: Relation, commit_lsn: int) -> HistoryTable | None:
        if rel.namespace != self.spec.schema:
            return None
        table = self.tables.get(rel.name) or self._table(rel.name)
        if table.error is not None or (table.committed is not None and commit_lsn <= table.committed):
            return None  # stopped, or already in Delta (a transaction redelivered after a restart)
        if self._buffer_since is None:
            self._buffer_since = time.monotonic()
        return table

    def _row(self, c: RowChange) -> None:
        tx = c.tx
        table = self._live(c.relation, tx.commit_lsn)
        if table is None:
            return
        try:
            # _sort_by positions are 2 × the change's place in its transaction, + 1 for an update's
            # postimage: the preimage sorts first.
            if c.kind == "insert":
                assert c.new is not None
                table.add_insert(c.relation, c.new, c.lsn, 2 * c.seq, tx.xid, tx.commit_lsn, tx.commit_time)
            elif c.kind == "delete":
                table.add(c.relation, c.old, "delete", lsn=c.lsn, xid=tx.xid, commit_lsn=tx.commit_lsn,
                          seq=2 * c.seq, commit_time=tx.commit_time)
            else:
                old = c.old
                if old is None:  # key unchanged and not REPLICA IDENTITY FULL: the key is all we know
                    assert c.new is not None
                    old = tuple(v if col.key else None for v, col in zip(c.new, c.relation.columns, strict=True))
                table.add(c.relation, old, "update_preimage", lsn=c.lsn, xid=tx.xid, commit_lsn=tx.commit_lsn,
                          seq=2 * c.seq, commit_time=tx.commit_time)
                table.add(c.relation, c.new, "update_postimage", lsn=c.lsn, xid=tx.xid,
                          commit_lsn=tx.commit_lsn, seq=2 * c.seq + 1, commit_time=tx.commit_time, fill=c.old)
        except TableSyncError as e:
            self._fail_table(c.relation.name, str(e))

    def _flush_due(self, idle: bool) -> bool:
        """Between transactions: every ``flush_interval`` while the stream is idle (low lag under a
        light load); while changes keep arriving or the sync is catching up (the last transaction
        read committed more than ``BEHIND`` seconds ago), at most once a second or every
        ``max_buffered_rows`` — fewer, larger Delta commits."""
        if self.decoder.state is not pgoutput.TxState.IDLE:
            return False
        if self._buffer_since is None:  # nothing buffered: only the slot position to move on
            return self.last_end > self.confirmed and self._inflight is None and self.drain_target is None
        if self._inflight is not None and not self._inflight.done():
            # The previous commit is still being written: keep decoding (the next commit grows
            # meanwhile), unless the buffer is this large, then wait for it (bounded memory).
            return self._buffered() >= BACKPRESSURE * self.spec.max_buffered_rows
        age = time.monotonic() - self._buffer_since
        if age >= max(1.0, self.spec.flush_interval) or self._buffered() >= self.spec.max_buffered_rows:
            return True
        return idle and age >= self.spec.flush_interval and time.time() - self._last_commit_at < BEHIND

    def _buffered(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def stream(self, repl: Any) -> None:
        self.status.state = "streaming"
        self.status.confirmed_lsn = fmt_lsn(self.confirmed)
        self.write_status(force=True)
        repl.start_replication(slot_name=self.spec.slot, decode=False, status_interval=5,
                               options={"proto_version": "1", "publication_names": self.spec.slot})
        last_ping = 0.0
        read = repl.read_message
        payloads: list[bytes] = []
        lsns: list[int] = []
        while not self.stop_requested:
            # What has arrived (up to READ_BATCH messages) is read first, then decoded as one batch:
            # runs of inserts are decoded column by column (pgoutput.feed_many), which pays off
            # on long runs.
            while len(payloads) < READ_BATCH:
                msg = read()
                if msg is None:
                    break
                payloads.append(msg.payload)
                lsns.append(msg.data_start)
            if payloads and len(payloads) < READ_BATCH and payloads[-1][:1] not in TX_BOUNDARY:
                # Inside a transaction: pgoutput sends one only once it committed, so the rest is
                # on its way. Wait for it instead of decoding a small batch (nothing of it could
                # be flushed before its Commit anyway).
                with contextlib.suppress(InterruptedError):
                    select.select([repl], [], [], 0.05)
                continue
            if payloads:
                self.handle(payloads, lsns, repl)
                full = len(payloads) >= READ_BATCH
                payloads, lsns = [], []
                if full:
                    continue
            self._collect(repl, block=False)
            if self._flush_due(idle=True):
                self.flush(repl)
            if self.drain_target is not None and self.decoder.state is pgoutput.TxState.IDLE:
                reached = max(self.last_end, repl.wal_end or 0)
                if reached >= self.drain_target:
                    self.last_end = max(self.last_end, reached)
                    self.flush(repl, wait=True)
                    self.status.drained_lsn = fmt_lsn(self.drain_target)
                    self.drain_target = None
                    self.write_status(force=True)
                elif time.monotonic() - last_ping > 0.1:
                    repl.send_feedback(reply=True)
                    last_ping = time.monotonic()
            self.write_status()
            with contextlib.suppress(InterruptedError):
                select.select([repl], [], [], 0.05)
        self._collect(repl, block=True)

    def _resnapshot_reason(self, progress: dict[str, Any], slot: str | None) -> str | None:
        if not progress.get("snapshot_done"):
            return None  # the first snapshot (or one a crash interrupted)
        if progress.get("slot") != self.spec.slot:
            return (f"the branch was restored or reset (now slot {self.spec.slot}, was {progress.get('slot')}): "
                    "history replaced by a fresh snapshot")
        if slot == "lost":
            return (f"slot {self.spec.slot} was invalidated by Postgres: it held more than max_slot_wal_keep_size "
                    f"({self._lost_limit}) of WAL that no worker read (the sync was failing or stopped): "
                    "history replaced by a fresh snapshot")
        if slot == "gone":
            return (f"WAL that slot {self.spec.slot} needs is gone ({progress.get('wal_gone')}): "
                    "history replaced by a fresh snapshot")
        if slot is None:
            return (f"slot {self.spec.slot} was lost (the compute was rebuilt from an image without it): "
                    "history replaced by a fresh snapshot")
        return None

    # -- run --------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            location.check(self.spec.lakehouse_uri)
        except location.LocationError as e:
            if e.transient:
                raise
            raise StopSync(str(e)) from None
        conn = self._connect()
        try:
            self.prepare(conn)
            progress = self._progress()
            slot = self._slot_state(conn)
            repl_conn = psycopg2.connect(connection_factory=psycopg2.extras.LogicalReplicationConnection,
                                         **self.spec.dsn())
            try:
                repl = repl_conn.cursor()
                if not (slot == "ok" and progress.get("slot") == self.spec.slot and progress.get("snapshot_done")):
                    self.snapshot(conn, repl, self._resnapshot_reason(progress, slot))
                conn.close()
                try:
                    self.stream(repl)
                except psycopg2.Error as e:
                    # The slot is there but WAL it needs is not (a data dir rebuilt from an image whose
                    # slot is older than the archive GC kept, say): the next run starts over, and says why.
                    if "has already been removed" not in str(e):
                        raise
                    progress["wal_gone"] = str(e).strip().splitlines()[0]
                    _write_json(self.state_dir / "progress.json", progress)
                    raise
            finally:
                repl_conn.close()
        finally:
            if not conn.closed:
                conn.close()
        self.status.state = "stopped"
        self.write_status(force=True)
