"""The sans-I/O parts of transaction pooling: which statements the pooler reads, and the
statement names it owns."""

from __future__ import annotations

import struct

from proxy.statements import (
    DEALLOCATE,
    DISCARD,
    OTHER,
    RESET,
    SET,
    BackendStatements,
    StatementNames,
    apply_sql,
    deallocate_target,
    first_word,
    is_discard_all,
    parse_options,
    startup_settings,
    tracked_set,
    with_setting,
)


class Sink:
    """A transport that keeps what is written (native pooler classes refuse fake objects, not this)."""

    def __init__(self) -> None:
        self.out = b""

    def write(self, data: bytes) -> None:
        self.out += bytes(data)

    def is_closing(self) -> bool:
        return False


def msg(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", 4 + len(payload)) + payload



def test_first_word() -> None:
    assert first_word(b"SELECT 1") == OTHER
    assert first_word(b"  set work_mem = 1") == SET
    assert first_word(b"/* hi */ -- there\n RESET ALL") == RESET
    assert first_word(b"Deallocate x") == DEALLOCATE
    assert first_word(b"DISCARD ALL") == DISCARD
    assert first_word(b"settle") == OTHER
    assert first_word(b"") == OTHER


def test_tracked_set() -> None:
    assert tracked_set(b"SET work_mem = '64MB';") == ("work_mem", b"SET work_mem = '64MB'")
    assert tracked_set(b"set session search_path to a, b") == ("search_path", b"set session search_path to a, b")
    assert tracked_set(b"SET TIME ZONE 'UTC'") == ("timezone", b"SET TIME ZONE 'UTC'")
    assert tracked_set(b'SET "DateStyle" = ISO') == ("datestyle", b'SET "DateStyle" = ISO')
    assert tracked_set(b"RESET work_mem") == ("work_mem", None)
    assert tracked_set(b"RESET ALL") == ("all", None)
    assert tracked_set(b"SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")[0] == "session characteristics"
    for untracked in (b"SET LOCAL work_mem = 1", b"SET TRANSACTION READ ONLY", b"SET a = 1; SET b = 2",
                      b"SET a = $$x;y$$", b"SET a = 1 -- x"):
        assert tracked_set(untracked) is None, untracked


def test_settings_replay() -> None:
    s = startup_settings({"user": "u", "database": "d", "application_name": "it's"}, [("search_path", "a,b")])
    assert [n for n, _ in s] == ["application_name", "search_path"]
    assert b"set_config('application_name', 'it''s', false)" in dict(s)["application_name"]
    s2 = with_setting(s, "work_mem", b"SET work_mem = 1")
    assert with_setting(s2, "work_mem", None) == s
    assert with_setting(s2, "all", None) == ()
    assert apply_sql(s2).startswith(b"RESET ALL; ")
    assert parse_options("-c a=1 --b-c=2 -cd=x\\ y") == [("a", "1"), ("b_c", "2"), ("d", "x y")]
    assert parse_options("-B 100") is None


def test_deallocate_and_discard() -> None:
    assert deallocate_target(b"DEALLOCATE ALL") == b"ALL"
    assert deallocate_target(b"deallocate prepare _pg3_1;") == b"_pg3_1"
    assert deallocate_target(b'DEALLOCATE "Mine"') == b"Mine"
    assert deallocate_target(b"DEALLOCATE a; SELECT 1") is None
    assert is_discard_all(b" discard all ;")
    assert not is_discard_all(b"DISCARD PLANS")


def test_statement_names_and_lru() -> None:
    names = StatementNames(limit=2)
    a = names.get(b"SELECT 1\x00\x00\x00")
    assert names.get(b"SELECT 1\x00\x00\x00") is a
    b = names.get(b"SELECT 2\x00\x00\x00")
    names.get(b"SELECT 3\x00\x00\x00")  # a is dropped from the table...
    a2 = names.get(b"SELECT 1\x00\x00\x00")
    assert a2.name not in (a.name, b.name)  # ...and never gets an old name back
    assert a.parse.startswith(b"P") and a.name + b"\x00SELECT 1" in a.parse
    lru = BackendStatements(2)
    assert lru.add(b"x") == [] and lru.add(b"y") == []
    assert lru.use(b"x")
    assert lru.add(b"z") == [b"y"]  # least recently used goes
    assert b"x" in lru and b"y" not in lru


def test_clients_waiting_for_a_backend_are_load_for_the_autoscaler() -> None:
    from compute.autoscaler import PolicyConfig, PolicyState, Sample, decide

    cfg = PolicyConfig(min_cu=0.25, max_cu=2.0, up_after=3)
    state = PolicyState(0.25)
    # Idle CPU, nothing running: only a line of 3 pooled clients waiting for a backend.
    for _ in range(3):
        d = decide(state, Sample(cpu_cores=0.05, active_backends=0, waiting=3), cfg)
        state = d.state
    assert d.direction == "up" and d.cu > 0.25
    state = PolicyState(0.25)
    for _ in range(3):
        d = decide(state, Sample(cpu_cores=0.05, active_backends=0, waiting=0), cfg)
        state = d.state
    assert d.direction == "hold"


def test_the_pooled_url_names_the_branch_and_the_mode() -> None:
    from urllib.parse import parse_qs, urlsplit

    from proxy.connstr import pooled_url

    url = pooled_url("postgresql://lakelet:p%40ss@localhost:5432/postgres?sslmode=verify-full"
                     "&sslrootcert=%2Ftmp%2Fca.pem", "main")
    assert url.startswith("postgresql://lakelet:p%40ss@localhost:5432/postgres?")
    query = parse_qs(urlsplit(url).query)
    assert query == {"sslmode": ["verify-full"], "sslrootcert": ["/tmp/ca.pem"],
                     "options": ["endpoint=main pool=transaction"]}
    url = pooled_url("postgresql://u@h:1/postgres?options=endpoint%3Dfeature%20pool%3Dsession%20-c%20work_mem%3D1MB",
                     "feature")
    assert parse_qs(urlsplit(url).query)["options"] == ["endpoint=feature pool=transaction -c work_mem=1MB"]


async def test_an_answer_that_only_looks_finished_keeps_the_backend() -> None:
    """The fast path hands over a chunk ending in ReadyForQuery I only when the header walk lands
    on it: a DataRow cut by the chunk boundary right after bytes that spell ReadyForQuery I (bytea
    in binary can) must not end the lend. Real pool objects (compiled or not), byte sinks for
    sockets."""

    from compute import LoadSignals
    from proxy.pooled_client import PooledClient
    from proxy.pooled_server import BIND_ENTRY, DESCRIBE_ENTRY, EXECUTE_ENTRY, SYNC_ENTRY, PooledServer
    from proxy.pooler import PoolConfig, Pooler

    signals = LoadSignals()
    pool = Pooler(PoolConfig(mode="transaction", size=2), wake=None, signals=lambda _: signals).pool("b", "r", "d")  # type: ignore[arg-type]
    for split_inside_row in (True, False):
        server = PooledServer(pool, Sink(), None, b"", 0, 10)  # type: ignore[arg-type]
        server.where = 1  # in use, as lent by the pool
        client = PooledClient(pool, Sink(), (), 1, 1)  # type: ignore[arg-type]
        server.client = client
        client.server = server
        server.expect.extend([BIND_ENTRY, DESCRIBE_ENTRY, EXECUTE_ENTRY, SYNC_ENTRY])
        value = b"\x01Z\x00\x00\x00\x05I" + b"\x02" * 20
        row = msg(b"D", struct.pack("!hi", 1, len(value)) + value)
        answer = (msg(b"2", b"") + msg(b"n", b"") + row + msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I"))
        cut = answer.index(b"Z\x00\x00\x00\x05I") + 6 if split_inside_row else len(answer) - 3
        server.data_received(answer[:cut])
        assert client.server is server and server.expect[-1] is SYNC_ENTRY  # still the client's
        server.data_received(answer[cut:])
        assert client.server is None and server.client is None and not server.expect  # released
        assert client.transport.out == answer  # type: ignore[attr-defined]


def test_the_inline_check_never_passes_a_statement_the_pooler_reads() -> None:
    """``_plain_sql`` lets a query or unnamed Parse through without the full reading: it must say
    "plain" only for statements that are none of SET/RESET/DEALLOCATE/DISCARD, and should say so
    for the everyday ones."""
    from proxy.pooled_client import _plain_sql
    from proxy.statements import OTHER, first_word

    texts = [b"SET x = 1", b"set x to 1", b"ReSeT ALL", b"reset", b"DEALLOCATE a", b"deallocate all",
             b"DISCARD ALL", b"discard", b" set x=1", b"\tSET x=1", b"\nset x=1", b"--c\nSET x=1", b"/* c */ set x=1",
             b"SELECT 1", b"select 1", b"DELETE FROM t", b"RELEASE s", b"ROLLBACK", b"SAVEPOINT s", b"DO $$ $$",
             b"SHOW x", b"DROP TABLE t", b"S", b"se", b"d", b"INSERT INTO t VALUES (1)", b"(SELECT 1)",
             b"with x as (select 1) select 1"]
    for text in texts:
        buf = b"Q" + text + b"\x00"
        if _plain_sql(buf, 1):
            assert first_word(text) == OTHER, text
    assert all(_plain_sql(b"Q" + t + b"\x00", 1) for t in (b"SELECT 1", b"select 1", b"INSERT INTO t VALUES (1)",
                                                            b"DELETE FROM t", b"RELEASE s", b"ROLLBACK", b"DO $$ $$"))
    assert not any(_plain_sql(b"Q" + t + b"\x00", 1) for t in (b"SET x = 1", b"reset", b"Deallocate a", b"discard all",
                                                                b" set x=1", b"--c\nSET x=1"))


async def test_equal_settings_are_one_object_per_pool() -> None:
    """Clients with the same startup settings share one settings object (a backend is matched to
    a client by identity first); the table is bounded, and what is past it is still compared by
    value."""
    from compute import LoadSignals
    from proxy import pooler as pooler_module
    from proxy.pooler import PoolConfig, Pooler
    from proxy.statements import startup_settings

    signals = LoadSignals()
    pool = Pooler(PoolConfig(mode="transaction", size=2), wake=None, signals=lambda _: signals).pool("b", "r", "d")  # type: ignore[arg-type]
    a = startup_settings({"user": "u", "application_name": "app"}, [])
    b = startup_settings({"user": "u", "application_name": "app"}, [])
    assert a == b and a is not b
    assert pool.intern(a) is pool.intern(b) is a
    for i in range(pooler_module.INTERNED + 10):
        pool.intern(startup_settings({"application_name": f"app{i}"}, []))
    late = startup_settings({"application_name": "late"}, [])
    assert pool.intern(late) is late and pool.intern(startup_settings({"application_name": "late"}, [])) == late


def test_the_answers_owed_keep_their_order_and_count_the_ready_ones() -> None:
    """``Expect`` (a list read from a head index, compacted as it empties) gives entries back in
    order through a long pipeline, and counts those a ReadyForQuery answers, which the common
    answer's shortcut relies on."""
    from proxy.pooled_server import (
        BIND_ENTRY,
        E_QUERY,
        E_SYNC,
        EXECUTE_ENTRY,
        QUERY_ENTRY,
        SYNC_ENTRY,
        Entry,
        Expect,
    )

    expect = Expect()
    assert not expect and len(expect) == 0 and expect.first_code() == 0 and expect.last() is None
    entries = []
    for i in range(1000):  # a pipeline: Bind, Execute, Sync per statement, plus a query now and then
        batch = [BIND_ENTRY, EXECUTE_ENTRY, SYNC_ENTRY if i % 7 else Entry(E_SYNC, [("x", b"SET x = 1")])]
        if i % 5 == 0:
            batch.append(QUERY_ENTRY)
        entries.extend(batch)
        expect.extend(batch)
    assert len(expect) == len(entries) and expect.last() is entries[-1] and expect[0] is entries[0]
    assert expect.readies == sum(e.code in (E_SYNC, E_QUERY) for e in entries)
    taken = []
    while len(taken) < 2000:
        taken.append(expect.popleft())
    expect.append(SYNC_ENTRY)  # appended while partly read: still after the rest
    entries.append(SYNC_ENTRY)
    while expect:
        assert expect.first_code() == expect[0].code
        taken.append(expect.popleft())
    assert taken == entries and expect.readies == 0 and len(expect) == 0
    expect.extend([BIND_ENTRY, SYNC_ENTRY])
    expect.clear()
    assert not expect and expect.readies == 0


async def test_a_query_answered_before_a_pipelined_batch_keeps_the_backend() -> None:
    """A simple query followed, before its answer, by an extended batch: the query's answer ends
    in ReadyForQuery I but the batch is still owed, so the backend stays with the client (two
    ReadyForQuery are owed, not one), and goes back after the batch's answer."""

    from compute import LoadSignals
    from proxy.pooled_client import PooledClient
    from proxy.pooled_server import (
        BIND_ENTRY,
        EXECUTE_ENTRY,
        PARSE_UNNAMED_ENTRY,
        QUERY_ENTRY,
        SYNC_ENTRY,
        PooledServer,
    )
    from proxy.pooler import PoolConfig, Pooler

    signals = LoadSignals()
    pool = Pooler(PoolConfig(mode="transaction", size=2), wake=None, signals=lambda _: signals).pool("b", "r", "d")  # type: ignore[arg-type]
    server = PooledServer(pool, Sink(), None, b"", 0, 10)  # type: ignore[arg-type]
    server.where = 1  # in use, as lent by the pool
    client = PooledClient(pool, Sink(), (), 1, 1)  # type: ignore[arg-type]
    server.client = client
    client.server = server
    server.expect.extend([QUERY_ENTRY, PARSE_UNNAMED_ENTRY, BIND_ENTRY, EXECUTE_ENTRY, SYNC_ENTRY])
    first = msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I")
    server.data_received(first)
    assert client.server is server and server.client is client and len(server.expect) == 4
    second = msg(b"1", b"") + msg(b"2", b"") + msg(b"C", b"SELECT 1\x00") + msg(b"Z", b"I")
    server.data_received(second)
    assert client.server is None and server.client is None and not server.expect
    assert client.transport.out == first + second  # type: ignore[attr-defined]
