"""The relay moves bytes without counting them per chunk: the bytes metric comes from the kernel's
counts of each client connection, for sessions still open and for those that ended."""

from __future__ import annotations

import re

from tests.proxy.harness import Harness


def _bytes(harness: Harness, direction: str) -> int:
    m = re.search(rf'^lakelet_proxy_bytes_total\{{branch="main",direction="{direction}"\}} ([0-9.e+]+)$',
                  harness.metric("lakelet_proxy_bytes_total"), re.M)
    return int(float(m.group(1))) if m else 0


async def test_bytes_moved_are_counted_live_and_after_the_session(harness: Harness) -> None:
    before_in, before_out = _bytes(harness, "in"), _bytes(harness, "out")
    conn = await harness.apg()
    try:
        rows = await conn.fetch("SELECT pad FROM big WHERE id <= 20000")  # about 2.2 MB to the client
        assert len(rows) == 20000
        text = "y" * 40000  # 40 kB from the client
        assert await conn.fetchval("SELECT length($1::text)", text) == 40000
        live_in, live_out = _bytes(harness, "in"), _bytes(harness, "out")
        assert live_out - before_out >= 20000 * 100
        assert live_in - before_in >= 40000
    finally:
        await conn.close()
    after_in, after_out = _bytes(harness, "in"), _bytes(harness, "out")
    assert after_out >= live_out and after_in >= live_in  # a counter: the session's bytes stay counted
