"""From a Delta change data feed to the net change per key: pure functions over Arrow tables.

The feed lists every change of every version in ``start..end``: ``insert``, ``delete``, and an
``update_preimage``/``update_postimage`` pair per updated row (an overwrite is every old row
deleted and every new one inserted in one version). Only the last change of each key matters to a
table that holds the latest state: a key whose last change is a delete is deleted, any other is
upserted with its last row. Within one version a delete sorts before an insert, so an overwrite
that rewrites a key keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

CHANGE_TYPE, VERSION, TIMESTAMP = "_change_type", "_commit_version", "_commit_timestamp"
META = (CHANGE_TYPE, VERSION, TIMESTAMP)


class DuplicateKey(ValueError):
    """Two rows with one key where the table needs one; the message names the key and the remedy."""


@dataclass(frozen=True)
class NetChanges:
    upserts: pa.Table  # source columns, one row per key
    deletes: pa.Table  # key columns only
    null_keys: int  # change rows skipped because a key column was NULL


def key_text(table: pa.Table, keys: tuple[str, ...], row: int) -> str:
    values = ", ".join(str(table.column(k)[row].as_py()) for k in keys)
    return f"({', '.join(keys)})=({values})"


def drop_null_keys(table: pa.Table, keys: tuple[str, ...]) -> tuple[pa.Table, int]:
    valid = None
    for k in keys:
        v = pc.is_valid(table.column(k))
        valid = v if valid is None else pc.and_(valid, v)
    if valid is None:
        return table, 0
    kept = table.filter(valid)
    return kept, table.num_rows - kept.num_rows


def _same_key_as_next(table: pa.Table, keys: tuple[str, ...]) -> pa.Array:
    """For each row of a key-sorted table: does the next row have the same key (False for the last)?"""
    n = table.num_rows
    if n == 0:
        return pa.array([], pa.bool_())
    same = None
    for k in keys:
        col = table.column(k)
        eq = pc.equal(col.slice(0, n - 1), col.slice(1))
        same = eq if same is None else pc.and_(same, eq)
    assert same is not None
    return pa.concat_arrays([pa.chunked_array(same).combine_chunks(), pa.array([False])])


def net_changes(feed: pa.Table, keys: tuple[str, ...], columns: list[str]) -> NetChanges:
    """The last change per key of a change data feed; raises ``DuplicateKey`` when one version
    inserts one key twice (the source breaks the primary key)."""
    feed = feed.filter(pc.not_equal(feed.column(CHANGE_TYPE), "update_preimage"))
    feed, nulls = drop_null_keys(feed, keys)
    rank = pc.cast(pc.not_equal(feed.column(CHANGE_TYPE), "delete"), pa.int8())  # delete 0, insert/post 1
    feed = feed.append_column("_rank", rank).append_column("_i", pa.array(range(feed.num_rows), pa.int64()))
    order = [(k, "ascending") for k in keys] + [(VERSION, "ascending"), ("_rank", "ascending"), ("_i", "ascending")]
    feed = feed.sort_by(order)
    same_next = _same_key_as_next(feed, keys)
    if feed.num_rows > 1:
        versions, ranks = feed.column(VERSION), feed.column("_rank")
        n = feed.num_rows
        twice = pc.and_(pc.and_(same_next.slice(0, n - 1), pc.equal(versions.slice(0, n - 1), versions.slice(1))),
                        pc.and_(pc.equal(ranks.slice(0, n - 1), 1), pc.equal(ranks.slice(1), 1)))
        hits = pc.indices_nonzero(twice)
        if len(hits):
            row = hits[0].as_py()
            raise DuplicateKey(f"source version {versions[row].as_py()} has two rows with key "
                               f"{key_text(feed, keys, row)}: make the primary key unique in the source, "
                               "or pass --timeseries-key to keep the newest")
    last = feed.filter(pc.invert(same_next))
    is_delete = pc.equal(last.column("_rank"), 0)
    return NetChanges(upserts=last.filter(pc.invert(is_delete)).select(columns),
                      deletes=last.filter(is_delete).select(list(keys)), null_keys=nulls)


def changed_keys(feed: pa.Table, keys: tuple[str, ...]) -> tuple[pa.Table, int]:
    """Every distinct non-NULL key the feed touches (for sources with a timeseries key, whose
    current row per key is re-read from the source rather than derived from the feed)."""
    table, nulls = drop_null_keys(feed.select(list(keys)), keys)
    return table.group_by(list(keys)).aggregate([]), nulls


def newest_per_key(table: pa.Table, keys: tuple[str, ...], timeseries_key: str) -> pa.Table:
    """One row per key: the one with the greatest ``timeseries_key`` (NULL counts as oldest)."""
    if table.num_rows == 0:
        return table
    # Descending with NULLs at the end (Arrow's default placement): each key's first row wins.
    ordered = table.sort_by([(k, "ascending") for k in keys] + [(timeseries_key, "descending")])
    same_next = _same_key_as_next(ordered, keys)
    first = pa.concat_arrays([pa.array([True]), pc.invert(same_next.slice(0, ordered.num_rows - 1))])
    return ordered.filter(first)
