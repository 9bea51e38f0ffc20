"""The change-feed reduction (``lakehouse.synced.changes``) is pure: property-tested against a
model. Random versions of inserts, updates, deletes and overwrites are written as Delta writes
its change data feed (pre/post images, an overwrite as every old row deleted and every new one
inserted); applying the net change per key to the state before must give the state after."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lakehouse.synced.changes import DuplicateKey, changed_keys, net_changes, newest_per_key

KEYS = ("k1", "k2")
COLUMNS = ["k1", "k2", "v"]
key = st.tuples(st.integers(0, 4), st.sampled_from(["a", "b"]))
version_ops = st.lists(st.tuples(st.sampled_from(["insert", "update", "delete"]), key, st.integers(0, 99)),
                       max_size=6)
versions = st.lists(st.one_of(version_ops, st.tuples(st.just("overwrite"), st.lists(st.tuples(key, st.integers(0, 99)),
                                                                                        max_size=5))), max_size=6)


def feed_of(start: dict, history: list) -> tuple[pa.Table, dict]:
    """The change data feed of ``history`` applied to ``start``, and the state it ends in."""
    state = dict(start)
    rows: list[dict] = []

    def row(k: tuple, v: int, kind: str, version: int) -> None:
        rows.append({"k1": k[0], "k2": k[1], "v": v, "_change_type": kind, "_commit_version": version,
                     "_commit_timestamp": 0})

    for version, ops in enumerate(history, start=1):
        if isinstance(ops, tuple):  # overwrite: every old row deleted, every new one inserted
            new = dict(ops[1])
            for k, v in state.items():
                row(k, v, "delete", version)
            for k, v in new.items():
                row(k, v, "insert", version)
            state = new
            continue
        touched = set()
        for kind, k, v in ops:
            if k in touched:
                continue  # one change per key per version, as one Delta commit writes them
            touched.add(k)
            if kind == "insert" and k not in state:
                row(k, v, "insert", version)
                state[k] = v
            elif kind == "update" and k in state:
                row(k, state[k], "update_preimage", version)
                row(k, v, "update_postimage", version)
                state[k] = v
            elif kind == "delete" and k in state:
                row(k, state[k], "delete", version)
                del state[k]
    random.Random(len(rows)).shuffle(rows)  # the feed comes in no particular order
    schema = pa.schema([("k1", pa.int64()), ("k2", pa.string()), ("v", pa.int64()), ("_change_type", pa.string()),
                        ("_commit_version", pa.int64()), ("_commit_timestamp", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema), state


@settings(max_examples=300, deadline=None)
@given(start=st.dictionaries(key, st.integers(0, 99), max_size=6), history=versions)
def test_net_changes_take_any_state_to_the_next(start: dict, history: list) -> None:
    feed, expected = feed_of(start, history)
    net = net_changes(feed, KEYS, COLUMNS)
    state = dict(start)
    deleted = [(r["k1"], r["k2"]) for r in net.deletes.to_pylist()]
    upserted = {(r["k1"], r["k2"]): r["v"] for r in net.upserts.to_pylist()}
    assert not set(deleted) & set(upserted)
    assert len(upserted) == net.upserts.num_rows  # one row per key
    for k in deleted:
        state.pop(k, None)
    state.update(upserted)
    assert state == expected


def test_a_key_inserted_twice_in_one_version_is_named() -> None:
    feed = pa.table({"k1": [1, 1], "k2": ["a", "a"], "v": [1, 2], "_change_type": ["insert", "insert"],
                     "_commit_version": [3, 3], "_commit_timestamp": [0, 0]})
    with pytest.raises(DuplicateKey, match=r"version 3 has two rows with key \(k1, k2\)=\(1, a\)"):
        net_changes(feed, KEYS, COLUMNS)


def test_null_keys_are_dropped_and_counted() -> None:
    feed = pa.table({"k1": [1, None], "k2": ["a", "a"], "v": [1, 2], "_change_type": ["insert", "insert"],
                     "_commit_version": [1, 1], "_commit_timestamp": [0, 0]})
    net = net_changes(feed, KEYS, COLUMNS)
    assert (net.upserts.num_rows, net.null_keys) == (1, 1)
    keys, nulls = changed_keys(feed, KEYS)
    assert (keys.num_rows, nulls) == (1, 1)


@given(rows=st.lists(st.tuples(st.integers(0, 3), st.one_of(st.none(), st.integers(0, 5))), max_size=12))
def test_newest_per_key_keeps_the_greatest_timeseries_value(rows: list) -> None:
    table = pa.table({"k1": pa.array([r[0] for r in rows], pa.int64()), "k2": ["a"] * len(rows),
                      "ts": pa.array([r[1] for r in rows], pa.int64())})
    got = {r["k1"]: r["ts"] for r in newest_per_key(table, KEYS, "ts").to_pylist()}
    want: dict = {}
    for k, ts in rows:
        if k not in want or (ts is not None and (want[k] is None or ts > want[k])):
            want[k] = ts
    assert got == want
