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
