"""Writes through real HTTP: inserts (single, bulk, columns=, missing=default), upserts (resolution,
on_conflict, PUT), updates and deletes with filters, Prefer return=/tx=, nested inserts; then the
schema cache reloading on DDL, the Data API waking a suspended branch and counting as its load,
and its connections closing when idle."""

from __future__ import annotations

import asyncio

import pytest

from dataapi import DataAPI, DataAPIConfig
from dataapi.local import LocalComputes
from tests.conftest import poll_until
from tests.dataapi.conftest import IDLE_TIMEOUT, SECRET, Api, user_token

pytestmark = pytest.mark.timeout(240)

REPR = {"Prefer": "return=representation"}


async def kv(api: Api) -> dict[str, int]:
    rows = await api.admin("SELECT k, v FROM kv WHERE k NOT LIKE 'row%'")
    return {r["k"]: r["v"] for r in rows}


async def test_tx_end_rollback_ends_every_transaction_so(api: Api) -> None:
    """``tx_end = rollback`` (PostgREST's db-tx-end) rolls every write back and ignores ``Prefer: tx=``
    (not echoed in Preference-Applied); ``rollback-allow-override`` lets ``tx=commit`` through."""
    tok = user_token()
    for tx_end, committed in (("rollback", False), ("rollback-allow-override", True)):
        other = DataAPI(LocalComputes(api.endpoints), DataAPIConfig(anon_role="web_anon", jwt_secret=SECRET,
                                                                    tx_end=tx_end))
        await other.start("127.0.0.1", 0)
        try:
            key = f"txend-{tx_end}"
            url = f"http://127.0.0.1:{other.port}/main/postgres/rest/v1/kv?select=k"
            async with api.session.post(url, json={"k": key}, headers={
                    "Authorization": f"Bearer {tok}", "Prefer": "return=representation, tx=commit"}) as r:
                assert r.status == 201 and await r.json() == [{"k": key}]
                applied = r.headers.get("Preference-Applied", "")
            assert ("tx=commit" in applied) == committed
            assert (key in await kv(api)) == committed
        finally:
            await other.close()


async def test_insert_single_bulk_and_minimal(api: Api) -> None:
    tok = user_token()
    status, headers, body = await api.request("POST", "kv", token=tok, json={"k": "c", "v": 3})
    assert status == 201 and body == "" and headers["Content-Range"] == "*/*"
    status, _, body = await api.request("POST", "kv?select=k,v", token=tok, headers=REPR,
                                        json=[{"k": "d", "v": 4}, {"k": "e", "v": 5}])
    assert status == 201 and body == [{"k": "d", "v": 4}, {"k": "e", "v": 5}]
    status, headers, body = await api.request("POST", "kv", token=tok, headers={"Prefer": "return=headers-only"},
                                              json={"k": "f", "v": 6})
    assert status == 201 and headers["Location"] == "/kv?k=eq.f"
    assert {k: v for k, v in (await kv(api)).items() if k in "cdef"} == {"c": 3, "d": 4, "e": 5, "f": 6}


async def test_insert_columns_and_missing_default(api: Api) -> None:
    tok = user_token()
    status, _, body = await api.request("POST", "kv?columns=k,v&select=k,v,note", token=tok, headers=REPR,
                                        json=[{"k": "g", "v": 1, "note": "ignored"}, {"k": "h", "v": 2}])
    assert status == 201 and body == [{"k": "g", "v": 1, "note": None}, {"k": "h", "v": 2, "note": None}]
    # Without missing=default a missing key is NULL (and v is NOT NULL): nothing is inserted.
    status, _, body = await api.request("POST", "kv?columns=k,v", token=tok, json=[{"k": "h2", "v": 1}, {"k": "h3"}])
    assert status == 400 and body["code"] == "23502"
    assert "h2" not in await kv(api)
    status, _, body = await api.request("POST", "kv?columns=k,v&select=k,v", token=tok,
                                        headers={"Prefer": "return=representation,missing=default"},
                                        json=[{"k": "i", "v": 9}, {"k": "j"}])
    assert status == 201 and body == [{"k": "i", "v": 9}, {"k": "j", "v": 7}]
    status, _, body = await api.request("POST", "kv", token=tok, json=[{"k": "x1"}, {"k": "x2", "v": 1}])
    assert status == 400 and body["code"] == "PGRST102"
    status, _, body = await api.request("POST", "kv", token=tok, json={"k": "x3", "nope": 1})
    assert status == 400 and body["code"] == "PGRST204"
    status, _, body = await api.request("POST", "kv?columns=k,nope", token=tok, json={"k": "x3"})
    assert status == 400 and body["code"] == "PGRST204"


async def test_insert_conflicts_and_upserts(api: Api) -> None:
    tok = user_token()
    status, _, body = await api.request("POST", "kv", token=tok, json={"k": "a", "v": 100})
    assert status == 409 and body["code"] == "23505"
    status, headers, body = await api.request(
        "POST", "kv?select=k,v", token=tok, json=[{"k": "a", "v": 100}, {"k": "u1", "v": 1}],
        headers={"Prefer": "return=representation,resolution=merge-duplicates"})
    assert status == 201 and body == [{"k": "a", "v": 100}, {"k": "u1", "v": 1}]
    assert "resolution=merge-duplicates" in headers["Preference-Applied"]
    status, _, body = await api.request(
        "POST", "kv?select=k,v", token=tok, json=[{"k": "a", "v": 5}, {"k": "u2", "v": 2}],
        headers={"Prefer": "return=representation,resolution=ignore-duplicates"})
    assert status == 201 and body == [{"k": "u2", "v": 2}]
    assert (await kv(api))["a"] == 100
    status, _, body = await api.request("POST", "publishers?on_conflict=name&select=name", token=tok,
                                        json={"name": "Ace"},
                                        headers={"Prefer": "return=representation,resolution=merge-duplicates"})
    assert status == 201 and body == [{"name": "Ace"}]
    status, _, body = await api.request("POST", "kv", token=tok, json={"k": "a", "v": None})
    assert status == 400 and body["code"] == "23502"


async def test_put_upserts_one_row_by_primary_key(api: Api) -> None:
    tok = user_token()
    status, _, body = await api.request("PUT", "kv?k=eq.p&select=k,v", token=tok, headers=REPR,
                                        json={"k": "p", "v": 1})
    assert status == 200 and body == [{"k": "p", "v": 1}]
    status, _, body = await api.request("PUT", "kv?k=eq.p&select=k,v", token=tok, headers=REPR,
                                        json={"k": "p", "v": 2})
    assert status == 200 and body == [{"k": "p", "v": 2}]
    status, _, body = await api.request("PUT", "kv?k=eq.p", token=tok, json={"k": "q", "v": 2})
    assert status == 400 and body["code"] == "PGRST115"
    status, _, body = await api.request("PUT", "kv?v=eq.2", token=tok, json={"k": "p", "v": 2})
    assert status == 405 and body["code"] == "PGRST105"
    status, _, body = await api.request("PUT", "kv?k=eq.p&limit=1", token=tok, json={"k": "p", "v": 2})
    assert status == 400 and body["code"] == "PGRST114"


async def test_update_and_delete_with_filters(api: Api) -> None:
    tok = user_token()
    status, _, body = await api.request("PATCH", "kv?k=in.(c,d)", token=tok, json={"v": 30})
    assert status == 204 and body == ""
    status, headers, body = await api.request("PATCH", "kv?k=eq.e&select=k,v", token=tok, headers=REPR,
                                              json={"v": 50, "note": "patched"})
    assert status == 200 and body == [{"k": "e", "v": 50}]
    rows = await kv(api)
    assert rows["c"] == rows["d"] == 30 and rows["e"] == 50 and rows["f"] == 6
    status, _, body = await api.request("PATCH", "kv?k=eq.e", token=tok, json={"nope": 1})
    assert status == 400 and body["code"] == "PGRST204"
    status, _, body = await api.request("DELETE", "kv?or=(k.eq.c,v.eq.50)&select=k", token=tok, headers=REPR)
    assert status == 200 and sorted(r["k"] for r in body) == ["c", "e"]
    assert "c" not in await kv(api) and "d" in await kv(api)
    status, _, _ = await api.request("DELETE", "kv?k=eq.d", token=tok)
    assert status == 204 and "d" not in await kv(api)


async def test_limited_update_and_delete(api: Api) -> None:
    tok = user_token()
    await api.admin("INSERT INTO kv (k, v) VALUES ('lim1', 1), ('lim2', 2), ('lim3', 3)")
    status, _, body = await api.request("PATCH", "kv?k=like.lim*&order=v.desc&limit=2&select=k", token=tok,
                                        json={"note": "top2"}, headers=REPR)
    assert status == 200 and sorted(r["k"] for r in body) == ["lim2", "lim3"], body
    status, _, body = await api.request("DELETE", "kv?k=like.lim*&limit=1", token=tok)
    assert status == 400 and body["code"] == "PGRST109"
    status, _, body = await api.request("DELETE", "kv?k=like.lim*&order=v&limit=1&offset=1&select=k", token=tok,
                                        headers=REPR)
    assert status == 200 and body == [{"k": "lim2"}]
    rows = await api.admin("SELECT k, note FROM kv WHERE k LIKE 'lim%' ORDER BY k")
    assert [(r["k"], r["note"]) for r in rows] == [("lim1", None), ("lim3", "top2")]


async def test_singular_write_rolls_back_when_not_one_row(api: Api) -> None:
    tok = user_token()
    status, _, body = await api.request("PATCH", "kv?k=in.(f,i)", token=tok, json={"v": 0},
                                        headers={"Accept": "application/vnd.pgrst.object+json"})
    assert status == 406 and body["code"] == "PGRST116"
    rows = await kv(api)
    assert rows["f"] == 6 and rows["i"] == 9


async def test_tx_rollback_and_strict_handling(api: Api) -> None:
    tok = user_token()
    status, headers, body = await api.request("POST", "kv?select=k", token=tok, json={"k": "rolled", "v": 1},
                                              headers={"Prefer": "return=representation,tx=rollback"})
    assert status == 201 and body == [{"k": "rolled"}] and "tx=rollback" in headers["Preference-Applied"]
    assert "rolled" not in await kv(api)
    status, _, body = await api.request("POST", "kv", token=tok, json={"k": "s"},
                                        headers={"Prefer": "handling=strict, return=everything"})
    assert status == 400 and body["code"] == "PGRST122"
    status, _, body = await api.request("DELETE", "kv?v=gte.0", token=tok,
                                        headers={"Prefer": "handling=strict, max-affected=1"})
    assert status == 400 and body["code"] == "PGRST124"
    assert "f" in await kv(api)


async def test_form_bodies_empty_objects_and_counts(api: Api) -> None:
    tok = user_token()
    status, headers, body = await api.request("POST", "kv?select=k,v", token=tok, data=b"k=form&v=12",
                                              headers={"Content-Type": "application/x-www-form-urlencoded",
                                                       "Prefer": "return=representation, count=exact"})
    assert status == 201 and body == [{"k": "form", "v": 12}] and headers["Content-Range"] == "*/1"
    status, headers, body = await api.request("POST", "publishers?select=name", token=tok, json=[{}, {}],
                                              headers=REPR)
    assert status == 400 and body["code"] == "23502"  # name is NOT NULL: the two default rows are refused
    status, headers, body = await api.request("POST", "tags", token=tok, json=[])
    assert status == 201 and "Content-Type" not in headers
    for payload in ({}, [], [{}]):
        status, headers, body = await api.request("PATCH", "kv", token=tok, json=payload)
        assert status == 204 and headers["Content-Range"] == "*/*" and body == ""
    status, headers, body = await api.request("PATCH", "kv?k=eq.zzz", token=tok, json={"v": 1}, headers=REPR)
    assert status == 200 and body == []
    status, headers, _ = await api.request("PATCH", "kv?k=in.(form,f)", token=tok, json={"note": "two"})
    assert status == 204 and headers["Content-Range"] == "0-1/*" and "Content-Type" not in headers


async def test_concurrent_writes_and_reads(api: Api) -> None:
    """More requests at once than the pool has connections: each is its own transaction, none is
    lost or answered for another."""
    tok = user_token()
    writes = [api.request("POST", "kv?select=k,v", token=tok, headers=REPR, json={"k": f"c{n}", "v": n})
              for n in range(60)]
    reads = [api.get(f"kv?select=v&k=eq.c{n}") for n in range(60)]
    results = await asyncio.gather(*writes, *reads)
    for n, (status, _, body) in enumerate(results[:60]):
        assert status == 201 and body == [{"k": f"c{n}", "v": n}]
    assert all(status == 200 and body in ([], [{"v": n}]) for n, (status, _, body) in enumerate(results[60:]))
    rows = await api.admin("SELECT count(*) AS n, sum(v) AS total FROM kv WHERE k ~ '^c[0-9]+$'")
    assert rows[0]["n"] == 60 and rows[0]["total"] == sum(range(60))


async def test_csv_bodies(api: Api) -> None:
    tok = user_token()
    status, _, body = await api.request("POST", "kv?select=k,v,note", token=tok, headers={
        "Content-Type": "text/csv", "Prefer": "return=representation"},
        data=b'k,v,note\ncsv1,1,"hello, world"\ncsv2,2,NULL\n')
    assert status == 201 and body == [{"k": "csv1", "v": 1, "note": "hello, world"},
                                      {"k": "csv2", "v": 2, "note": None}]
    status, _, body = await api.request("POST", "kv", token=tok, headers={"Content-Type": "text/csv"},
                                        data=b"k,v\ncsv3\n")
    assert status == 400 and body["code"] == "PGRST102"


async def test_rls_on_writes(api: Api) -> None:
    status, _, body = await api.request("POST", "notes?select=owner,body", token=user_token("bob"), headers=REPR,
                                        json={"body": "from bob"})
    assert status == 201 and body == [{"owner": "bob", "body": "from bob"}]
    status, _, _ = await api.request("PATCH", "notes", token=user_token("bob"), json={"body": "all mine"})
    assert status == 204
    rows = await api.admin("SELECT owner, body FROM notes ORDER BY id")
    assert [(r["owner"], r["body"]) for r in rows if r["owner"] == "alice"] == [("alice", "alice 1"),
                                                                                  ("alice", "alice 2")]
    assert {r["body"] for r in rows if r["owner"] == "bob"} == {"all mine"}
    status, _, _ = await api.request("DELETE", "notes", token=user_token("bob"))
    assert status == 204
    assert len(await api.admin("SELECT 1 FROM notes WHERE owner = 'alice'")) == 2


async def test_volatile_function_by_post(api: Api) -> None:
    status, _, body = await api.request("POST", "rpc/add_kv?select=k,v", token=user_token(),
                                        json={"key": "fn", "val": 42})
    assert status == 200 and body == {"k": "fn", "v": 42}
    assert (await kv(api))["fn"] == 42


async def test_bad_bodies(api: Api) -> None:
    tok = user_token()
    for raw in (b"", b"{", b"[1, 2]", b'"text"', b"\xff\xfe"):
        status, _, body = await api.request("POST", "kv", token=tok, data=raw,
                                            headers={"Content-Type": "application/json"})
        assert status == 400 and body["code"] == "PGRST102", (raw, body)
    status, _, body = await api.request("POST", "kv", token=tok, data=b"<k>v</k>",
                                        headers={"Content-Type": "application/xml"})
    assert status == 415 and body["code"] == "PGRST107"
    status, _, body = await api.request("POST", "kv", token=tok, json=[{"k": "m"}, 5])
    assert (status, body) == (400, {"code": "PGRST102", "details": None, "hint": None,
                                    "message": "All object keys must match"})
    status, _, body = await api.request("POST", "kv", token=tok, json={"k": "t", "v": "not a number"})
    assert status == 400 and body["code"] == "22P02"
    status, _, body = await api.request("POST", "rpc/add", json=[1, 2])
    assert status == 400 and body["code"] == "PGRST102"


# -- nested inserts --------------------------------------------------------------------------------

async def test_nested_insert_one_to_many_many_to_one_and_many_to_many(api: Api) -> None:
    tok = user_token()
    payload = {"name": "Octavia E. Butler", "country": "US",
               "books": [{"title": "Kindred", "year": 1979, "publishers": {"name": "Doubleday"},
                          "tags": [{"name": "nested-a"}, {"name": "nested-b"}]},
                         {"title": "Dawn", "year": 1987}],
               "author_profiles": [{"bio": "Parable"}]}
    status, _, body = await api.request(
        "POST", "authors?select=name,books(title,year,publishers(name),tags(name)),author_profiles(bio)"
                "&books.order=year", token=tok, headers=REPR, json=payload)
    assert status == 201, body
    assert body == [{"name": "Octavia E. Butler",
                     "books": [{"title": "Kindred", "year": 1979, "publishers": {"name": "Doubleday"},
                                "tags": [{"name": "nested-a"}, {"name": "nested-b"}]},
                               {"title": "Dawn", "year": 1987, "publishers": None, "tags": []}],
                     "author_profiles": {"bio": "Parable"}}]
    rows = await api.admin("SELECT b.title, a.name AS author, p.name AS publisher FROM books b "
                           "JOIN authors a ON a.id = b.author_id LEFT JOIN publishers p ON p.id = b.publisher_id "
                           "WHERE a.name = 'Octavia E. Butler' ORDER BY b.year")
    assert [(r["title"], r["publisher"]) for r in rows] == [("Kindred", "Doubleday"), ("Dawn", None)]
    tags = await api.admin("SELECT t.name FROM book_tags bt JOIN tags t ON t.id = bt.tag_id "
                           "JOIN books b ON b.id = bt.book_id WHERE b.title = 'Kindred' ORDER BY t.name")
    assert [r["name"] for r in tags] == ["nested-a", "nested-b"]


async def test_nested_insert_is_one_transaction(api: Api) -> None:
    before = await api.admin("SELECT count(*) AS n FROM authors")
    status, _, body = await api.request(
        "POST", "authors?select=name,books(title)", token=user_token(), headers=REPR,
        json={"name": "Half Written", "books": [{"title": "ok"}, {"title": None}]})
    assert status == 400 and body["code"] == "23502"
    after = await api.admin("SELECT count(*) AS n FROM authors")
    assert before[0]["n"] == after[0]["n"]
    assert not await api.admin("SELECT 1 FROM books WHERE title = 'ok'")


# -- schema cache, wake, load, idle ----------------------------------------------------------------

async def test_schema_cache_reloads_on_ddl(api: Api) -> None:
    status, _, body = await api.get("fresh")
    assert status == 404 and body["code"] == "PGRST205"
    await api.admin("CREATE TABLE fresh (id int PRIMARY KEY, label text); INSERT INTO fresh VALUES (1, 'new');"
                    "GRANT SELECT ON fresh TO web_anon")
    seen: list[object] = []

    async def probe() -> None:
        seen.append(await api.get("fresh?select=label"))

    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        await probe()
        if seen[-1][0] == 200:
            break
        await asyncio.sleep(0.2)
    assert seen[-1][0] == 200 and seen[-1][2] == [{"label": "new"}]
    await api.admin("ALTER TABLE fresh ADD COLUMN extra int DEFAULT 5")
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        status, _, body = await api.get("fresh?select=extra")
        if status == 200:
            break
        await asyncio.sleep(0.2)
    assert (status, body) == (200, [{"extra": 5}])


async def test_requests_count_as_load(api: Api) -> None:
    signals = api.endpoints.signals("main")
    task = asyncio.create_task(api.get("rpc/slow?seconds=1.5"))
    await poll_until(lambda: signals.sessions >= 1, "an in-flight request counted as a session",
                     timeout=30, every=0.02)
    status, _, _ = await task
    assert status == 200
    await poll_until(lambda: signals.sessions == 0, "the session released", timeout=30, every=0.05)


async def test_idle_connections_close(api: Api) -> None:
    await api.get("books?limit=1")
    db = api.api.databases.get("main", "postgres")
    assert db is not None and db.pool is not None
    await poll_until(lambda: db.pool is None, "the idle pool closed", timeout=IDLE_TIMEOUT * 6, every=0.2)
    # A closed connection's backend leaves pg_stat_activity a moment after the client hangs up.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        rows = await api.admin("SELECT count(*) AS n FROM pg_stat_activity "
                               "WHERE application_name LIKE 'lakelet-data-api%'")
        if rows[0]["n"] == 0 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert rows[0]["n"] == 0
    status, _, body = await api.get("books?select=id&id=eq.1")
    assert status == 200 and body == [{"id": 1}]


async def test_suspended_branch_wakes_on_request(api: Api) -> None:
    await api.endpoints.suspend("main")
    assert next(s for s in api.endpoints.status() if s.branch == "main").state == "suspended"
    results = await asyncio.gather(*(api.get("books?select=title&id=eq.3") for _ in range(4)))
    assert all(r[0] == 200 and r[2] == [{"title": "Solaris"}] for r in results)
    assert next(s for s in api.endpoints.status() if s.branch == "main").state == "active"
    status, _, body = await api.request("POST", "kv?select=k", token=user_token(), headers=REPR,
                                        json={"k": "after-wake", "v": 1})
    assert status == 201 and body == [{"k": "after-wake"}]


async def test_branch_scales_to_zero_after_http_traffic_and_wakes_again(api: Api) -> None:
    from compute import EndpointConfig

    eps = api.endpoints
    before = eps.endpoint("main").config
    eps.configure("main", EndpointConfig(suspend_timeout=2, min_cu=before.min_cu, max_cu=before.max_cu,
                                         durability=before.durability))
    try:
        for _ in range(5):
            status, _, _ = await api.get("books?select=id&limit=1")
            assert status == 200
        await poll_until(lambda: next(s for s in eps.status() if s.branch == "main").state == "suspended",
                         "main scaled to zero after the HTTP traffic stopped", timeout=60, every=0.2)
        status, _, body = await api.get("books?select=title&id=eq.5")
        assert status == 200 and body == [{"title": "Pride and Prejudice"}]
    finally:
        eps.configure("main", before)


async def test_preference_applied_echoes_only_what_was_applied(api: Api) -> None:
    """PostgREST echoes ``return=`` only for writes to a table, ``missing=`` only for inserts and
    updates, ``max-affected=`` for updates, deletes and functions; count, tx and handling always."""
    _, headers, _ = await api.get("books?select=id&id=eq.1", headers={"Prefer": "return=representation, count=exact"})
    assert headers["Preference-Applied"] == "count=exact"
    status, headers, _ = await api.request("POST", "rpc/add", json={"a": 1, "b": 2},
                                           headers={"Prefer": "return=minimal, missing=default"})
    assert status == 200 and "Preference-Applied" not in headers
    status, headers, _ = await api.request("DELETE", "kv?k=eq.nothing-here", token=user_token(),
                                           headers={"Prefer": "return=minimal, max-affected=5, handling=strict"})
    assert status == 204 and headers["Preference-Applied"] == "return=minimal, handling=strict, max-affected=5"
