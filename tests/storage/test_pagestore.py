"""The page store on its own: pages come back byte for byte whatever their encoding in the pack,
including packs written with zlib before pages were stored with zstd."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.objectstore import LocalObjectStore
from storage.pagestore import PAGE_SIZE, RAW, ZLIB, ZSTD, PageStore, digest_of

pages = st.one_of(
    st.just(bytes(PAGE_SIZE)),
    st.integers(0, 2**32).map(lambda seed: random.Random(seed).randbytes(PAGE_SIZE)),  # incompressible
    st.binary(min_size=1, max_size=64).map(lambda b: (b * PAGE_SIZE)[:PAGE_SIZE]),
)


def _store(tmp: Path) -> PageStore:
    return PageStore(LocalObjectStore(tmp / "objects"), tmp / "pages.db")


@settings(max_examples=25, deadline=None)
@given(st.lists(pages, min_size=1, max_size=12))
def test_pages_round_trip_and_each_is_stored_once(tmp_path_factory: object, batch: list[bytes]) -> None:
    tmp = tmp_path_factory.mktemp("pages")  # type: ignore[attr-defined]
    store = _store(tmp)
    try:
        digests, _ = store.put_pages(batch)
        assert store.get_pages(digests) == batch
        _, again = store.put_pages(batch)
        assert again == 0  # nothing new: every page was already there
        codecs = dict(store.db.execute("SELECT digest, compressed FROM pages"))
        assert len(codecs) == len(set(batch))
        assert set(codecs.values()) <= {RAW, ZSTD}  # new pages are never written with zlib
    finally:
        store.close()


def test_compressible_pages_use_zstd_and_random_ones_are_kept_raw(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        zeros, noise = bytes(PAGE_SIZE), os.urandom(PAGE_SIZE)
        store.put_pages([zeros, noise])
        codecs = dict(store.db.execute("SELECT digest, compressed FROM pages"))
        assert codecs == {digest_of(zeros): ZSTD, digest_of(noise): RAW}
        assert store.stored_bytes() < 2 * PAGE_SIZE
    finally:
        store.close()


def test_pages_written_with_zlib_stay_readable(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        page = (b"zlib-era page " * PAGE_SIZE)[:PAGE_SIZE]
        raw = os.urandom(PAGE_SIZE)
        packed = zlib.compress(page, 1)
        store.objects.put("packs/legacy.pack", packed + raw)
        store.db.executemany("INSERT INTO pages VALUES (?, ?, ?, ?, ?)", [
            (digest_of(page), "packs/legacy.pack", 0, len(packed), ZLIB),
            (digest_of(raw), "packs/legacy.pack", len(packed), len(raw), RAW),
        ])
        assert store.get_pages([digest_of(raw), digest_of(page)]) == [raw, page]
        # A new page next to them goes to a zstd pack; all three read back together.
        fresh = (b"new " * PAGE_SIZE)[:PAGE_SIZE]
        (d,), _ = store.put_pages([fresh])
        assert store.get_pages([d, digest_of(page)]) == [fresh, page]
    finally:
        store.close()
