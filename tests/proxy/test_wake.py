"""Issue #12 (2): a woken compute takes sessions before its WAL receiver streams — which is safe
only because, with durability = "store", the receiver is the synchronous standby: a commit made
right after the wake is acknowledged only once the store holds it."""

from __future__ import annotations

import asyncpg

from tests.proxy.harness import PASSWORD, Harness


async def test_a_commit_right_after_a_wake_is_in_the_store_when_acknowledged(harness: Harness) -> None:
    for _ in range(3):
        await harness.endpoints.suspend("feature")
        conn = await asyncpg.connect(host="127.0.0.1", port=harness.proxy.port, user="app", password=PASSWORD,
                                     database="postgres", ssl=False,
                                     server_settings={"options": "endpoint=feature"})
        try:
            # The first statement of the woken compute, autocommitted: its row's WAL position is
            # before its commit record, which the store must hold once this returns.
            lsn = await conn.fetchval("INSERT INTO big (id, pad) VALUES (-1, 'wake') "
                                      "RETURNING pg_current_wal_insert_lsn()::text")
        finally:
            await conn.close()
        node = harness.endpoints.active_node("feature")
        assert node is not None
        admin = await node.connect()
        try:
            durable = await admin.fetchval(
                "SELECT flush_lsn >= $1::text::pg_lsn FROM pg_stat_replication WHERE application_name = 'lakelet_wal'",
                lsn)
            mode = await admin.fetchval("SHOW synchronous_standby_names")
        finally:
            await admin.close()
        assert mode == "lakelet_wal"
        assert durable is True
