"""The pgoutput decoder without a server: every message round-trips through encode → parse, the
transaction state machine refuses out-of-order messages, and truncated input is an error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lakehouse import pgoutput as p
from lakehouse.values import parse_array

lsns = st.integers(0, 2**64 - 1)
oids = st.integers(1, 2**32 - 1)
texts = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20)
times = st.integers(-(10**15), 10**15).map(lambda us: p.PG_EPOCH + timedelta(microseconds=us))
values = st.one_of(st.none(), st.just(p.UNCHANGED), st.text(st.characters(blacklist_categories=("Cs",)),
                                                             max_size=50))
tuples = st.lists(values, max_size=8).map(tuple)
columns = st.builds(p.RelationColumn, texts, oids, st.integers(-1, 2**31 - 1), st.booleans())

messages = st.one_of(
    st.builds(p.Begin, lsns, times, st.integers(0, 2**32 - 1)),
    st.builds(p.Commit, st.just(0), lsns, lsns, times),
    st.builds(p.Origin, lsns, texts),
    st.builds(p.Relation, oids, texts, texts, st.sampled_from("dnfi"), st.lists(columns, max_size=6).map(tuple)),
    st.builds(p.Type, oids, texts, texts),
    st.builds(p.Insert, oids, tuples),
    st.builds(p.Update, oids, tuples, st.none() | tuples, st.booleans()).map(
        lambda u: u if u.old is not None else p.Update(u.relation_oid, u.new)),
    st.builds(p.Delete, oids, tuples, st.booleans()),
    st.builds(p.Truncate, st.integers(0, 3), st.lists(oids, max_size=5).map(tuple)),
    st.builds(p.LogicalMessage, st.booleans(), lsns, texts, st.binary(max_size=40)),
)


@given(messages)
def test_round_trip(msg: p.Message) -> None:
    assert p.parse(p.encode(msg)) == msg


@given(messages, st.data())
def test_truncated_message_is_an_error(msg: p.Message, data: st.DataObject) -> None:
    raw = p.encode(msg)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(p.DecodeError):
        p.parse(raw[:cut])


@given(messages, st.binary(min_size=1, max_size=4))
def test_trailing_bytes_are_an_error(msg: p.Message, extra: bytes) -> None:
    raw = p.encode(msg)
    try:
        parsed = p.parse(raw + extra)
    except p.DecodeError:
        return
    # Only a message ending in a variable-length part could swallow the extra bytes; none does.
    raise AssertionError(f"{parsed!r} accepted trailing bytes")


REL = p.Relation(16384, "public", "t", "f", (p.RelationColumn("id", 23, -1, True), p.RelationColumn("v", 25, -1)))
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@st.composite
def transactions(draw: st.DrawFn) -> list[tuple[p.Message, ...]]:
    """A stream of well-formed transactions, each a Begin, changes, and a matching Commit."""
    out = []
    lsn = 1000
    for xid in range(draw(st.integers(1, 5))):
        changes: list[p.Message] = [REL] if xid == 0 else []
        for _ in range(draw(st.integers(0, 5))):
            row = (str(draw(st.integers(0, 99))), draw(values))
            kind = draw(st.sampled_from(["I", "U", "D", "T"]))
            changes.append({"I": p.Insert(REL.oid, row), "U": p.Update(REL.oid, row, row), "D": p.Delete(REL.oid, row),
                            "T": p.Truncate(0, (REL.oid,))}[kind])
        lsn += 100
        out.append((p.Begin(lsn, T0, xid), *changes, p.Commit(0, lsn, lsn + 8, T0)))
    return out


@given(transactions())
def test_decoder_tags_every_change_with_its_transaction(stream: list[tuple[p.Message, ...]]) -> None:
    decoder = p.Decoder()
    for tx in stream:
        begin = tx[0]
        assert isinstance(begin, p.Begin)
        events = [decoder.feed(p.encode(m), lsn=7) for m in tx]
        changes = [e for e in events if isinstance(e, p.RowChange | p.TruncateChange)]
        assert [c.seq for c in changes] == list(range(len(changes)))
        assert all(c.tx.commit_lsn == begin.final_lsn and c.tx.xid == begin.xid for c in changes)
        end = events[-1]
        assert isinstance(end, p.TransactionEnd) and end.changes == len(changes)
        assert decoder.state is p.TxState.IDLE


def test_out_of_order_messages_are_refused() -> None:
    insert = p.encode(p.Insert(REL.oid, ("1", "x")))
    with pytest.raises(p.DecodeError, match="not allowed idle"):
        p.Decoder().feed(insert)
    d = p.Decoder()
    d.feed(p.encode(p.Begin(10, T0, 1)))
    with pytest.raises(p.DecodeError, match="before its Relation"):
        d.feed(insert)
    with pytest.raises(p.DecodeError, match="not allowed in transaction"):
        d.feed(p.encode(p.Begin(20, T0, 2)))
    d.feed(p.encode(REL))
    with pytest.raises(p.DecodeError, match="has 1 columns"):
        d.feed(p.encode(p.Insert(REL.oid, ("1",))))
    with pytest.raises(p.DecodeError, match="began"):
        d.feed(p.encode(p.Commit(0, 11, 12, T0)))
    with pytest.raises(p.DecodeError, match="unknown pgoutput message"):
        p.parse(b"S\0\0\0\1")


@given(st.lists(st.none() | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                                    max_size=10), max_size=6))
def test_array_literals_parse_back(items: list[str | None]) -> None:
    def quote(v: str | None) -> str:
        return "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    assert parse_array("{" + ",".join(quote(v) for v in items) + "}") == items


def test_the_insert_fast_path_checks_like_parse() -> None:
    d = p.Decoder()
    d.feed(p.encode(p.Begin(10, T0, 1)))
    d.feed(p.encode(REL))
    raw = p.encode(p.Insert(REL.oid, ("1", "x")))
    change = d.feed(raw, lsn=5)
    assert isinstance(change, p.RowChange) and change.new == ("1", "x") and change.lsn == 5
    for bad in (raw[:-1], raw + b"\0", raw[:5] + b"X" + raw[6:], raw[:3]):
        with pytest.raises(p.DecodeError):
            d.feed(bad)
    with pytest.raises(p.DecodeError, match="before its Relation"):
        d.feed(p.encode(p.Insert(999, ("1", "x"))))


# -- the bulk insert path ---------------------------------------------------------------------------

row_values = st.one_of(st.none(), st.text(st.characters(blacklist_categories=("Cs",)), max_size=30))
insert_rows = st.lists(st.tuples(row_values, row_values), min_size=0, max_size=3 * p.BULK_MIN)


def _rows_of(events: list[p.Event]) -> list[tuple[int, int, tuple[p.Value, ...]]]:
    """(seq, lsn, values) of every inserted row, whichever path decoded it."""
    out = []
    for e in events:
        if isinstance(e, p.RowChange):
            assert e.new is not None
            out.append((e.seq, e.lsn, e.new))
        elif isinstance(e, p.InsertRun):
            texts = [c.to_pylist() for c in e.columns]
            out.extend((e.seq + k, lsn, tuple(col[k] for col in texts)) for k, lsn in enumerate(e.lsns))
    return out


@given(st.lists(insert_rows, min_size=1, max_size=3))
def test_bulk_inserts_decode_like_one_by_one(txs: list[list[tuple[str | None, str | None]]]) -> None:
    """feed_many (insert runs decoded column by column) yields the very rows feed yields one by one."""
    stream: list[bytes] = []
    for i, rows in enumerate(txs):
        stream += [p.encode(p.Begin(100 * (i + 1), T0, i)), p.encode(REL)]
        stream += [p.encode(p.Insert(REL.oid, r)) for r in rows]
        stream.append(p.encode(p.Commit(0, 100 * (i + 1), 100 * (i + 1) + 8, T0)))
    lsns = list(range(len(stream)))
    scalar = p.Decoder()
    one_by_one = [e for e in (scalar.feed(m, lsn) for m, lsn in zip(stream, lsns, strict=True)) if e]
    bulk = list(p.Decoder().feed_many(stream, lsns))
    expected = []
    for rows, first in zip(txs, [i for i, m in enumerate(stream) if m[:1] == b"B"], strict=True):
        expected += [(k, first + 2 + k, r) for k, r in enumerate(rows)]
    assert _rows_of(bulk) == _rows_of(one_by_one) == expected
    if any(len(rows) >= p.BULK_MIN for rows in txs):
        assert any(isinstance(e, p.InsertRun) for e in bulk)
    assert [type(e) for e in bulk if not isinstance(e, p.RowChange | p.InsertRun)] == \
        [type(e) for e in one_by_one if not isinstance(e, p.RowChange)]


@given(st.data())
def test_a_bad_message_in_a_bulk_run_is_the_same_error(data: st.DataObject) -> None:
    """One malformed insert among many: the bulk path hands the run back to the scalar path, which
    names the problem, as it would have for that message alone."""
    rows = [(str(i), "x" * (i % 7)) for i in range(2 * p.BULK_MIN)]
    msgs = [p.encode(p.Insert(REL.oid, r)) for r in rows]
    at = data.draw(st.integers(0, len(msgs) - 1))
    raw = msgs[at]
    bad = data.draw(st.sampled_from([raw[:-1], raw + b"\0", raw[:5] + b"X" + raw[6:], raw[:8] + b"u" + raw[9:],
                                     raw[:6] + b"\0\3" + raw[8:], raw[:9] + b"\x7f\xff\xff\xff" + raw[13:],
                                     raw[:10] + b"\xff\xfe" + raw[12:], raw[:13] + b"\xff" + raw[14:]]))
    msgs[at] = bad
    head = [p.encode(p.Begin(10, T0, 1)), p.encode(REL)]
    expected: BaseException | None = None
    d = p.Decoder()
    for m in head:
        d.feed(m)
    try:
        d.feed(bad)
    except (p.DecodeError, UnicodeDecodeError) as e:
        expected = e
    assert expected is not None
    with pytest.raises(type(expected), match=str(expected)[:20].replace("(", r"\(").replace("[", r"\[")):
        list(p.Decoder().feed_many(head + msgs, list(range(len(head) + len(msgs)))))
