"""PostgREST features beyond the core grammar, with the expectations of PostgREST's own spec files
(TimezoneSpec, PlanSpec, RpcSpec's variadic and single-object cases): ``Prefer: timezone``, the
EXPLAIN media type behind ``db-plan-enabled``, variadic functions, ``Prefer: params=single-object``."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import asyncpg
import pytest

from tests.dataapi.conftest import Api

pytestmark = pytest.mark.timeout(240)

PLAN_JSON = "application/vnd.pgrst.plan+json"


@contextlib.contextmanager
def plans_enabled(api: Api, enabled: bool = True) -> Iterator[None]:
    before = api.api.config
    api.api.config = dataclasses.replace(before, plan_enabled=enabled)
    try:
        yield
    finally:
        api.api.config = before


# -- Prefer: timezone ---------------------------------------------------------------------------

async def test_timezone_preference_changes_the_output_and_is_applied(api: Api) -> None:
    status, headers, body = await api.get("stamps?order=id", headers={"Prefer": "timezone=America/Los_Angeles"})
    assert status == 200, body
    assert body == [{"id": 1, "t": "2023-10-18T05:37:59.611-07:00"}, {"id": 2, "t": "2023-10-18T07:37:59.611-07:00"}]
    assert headers["Preference-Applied"] == "timezone=America/Los_Angeles"
    status, headers, _ = await api.get("stamps?order=id", headers={
        "Prefer": "handling=strict, timezone=America/Los_Angeles"})
    assert status == 200 and headers["Preference-Applied"] == "handling=strict, timezone=America/Los_Angeles"
    # POSIX offsets, as PostgreSQL reads them (+05:30 is five and a half hours west of Greenwich).
    _, headers, body = await api.get("stamps?id=eq.1", headers={"Prefer": "timezone=+05:30"})
    assert body == [{"id": 1, "t": "2023-10-18T07:07:59.611-05:30"}]
    assert headers["Preference-Applied"] == "timezone=+05:30"
    _, _, body = await api.get("stamps?id=eq.1", headers={"Prefer": "timezone=-4"})
    assert body == [{"id": 1, "t": "2023-10-18T08:37:59.611-04:00"}]
    # The setting is the transaction's: the next requests on the same pooled connections see UTC.
    for _ in range(12):
        _, headers, body = await api.get("stamps?id=eq.1")
        assert body == [{"id": 1, "t": "2023-10-18T12:37:59.611+00:00"}] and "Preference-Applied" not in headers


@pytest.mark.parametrize("prefer", ["timezone=Invalid/Timezone", "handling=strict, timezone=Invalid/Timezone",
                                    "handling=lenient, timezone=Invalid/Timezone"])
async def test_an_unknown_timezone_is_postgres_22023(api: Api, prefer: str) -> None:
    status, _, body = await api.get("stamps", headers={"Prefer": prefer})
    assert status == 400
    assert body == {"code": "22023", "details": None, "hint": None,
                    "message": 'invalid value for parameter "TimeZone": "Invalid/Timezone"'}


async def test_a_timezone_with_leap_seconds_is_refused(api: Api) -> None:
    status, _, body = await api.get("stamps", headers={"Prefer": "timezone=05:30:15"})
    assert status == 400
    assert body == {"code": "22023", "details": "PostgreSQL does not support leap seconds.", "hint": None,
                    "message": 'time zone "05:30:15" appears to use leap seconds'}


# -- variadic functions and params=single-object -------------------------------------------------

async def test_variadic_functions_by_get_and_post(api: Api) -> None:
    status, _, body = await api.get("rpc/join_words?words=hello&words=variadic&words=world")
    assert (status, body) == (200, "hello variadic world")
    _, _, body = await api.get("rpc/join_words?words=alone")
    assert body == "alone"
    status, _, body = await api.request("POST", "rpc/join_words", json={"words": ["from", "a", "body"]})
    assert (status, body) == (200, "from a body")
    _, _, body = await api.get("rpc/sum_of?v=1&v=2&v=39")
    assert body == 42
    status, _, body = await api.get("rpc/sum_of?v=1&v=two")
    assert status == 400 and body["code"] == "22P02"  # a value that is not an int: Postgres says so


async def test_params_single_object_passes_the_body_as_the_json_argument(api: Api) -> None:
    status, _, body = await api.request("POST", "rpc/total_of", json={"a": 1, "b": 2.5, "c": 4},
                                        headers={"Prefer": "params=single-object"})
    assert (status, body) == (200, 7.5)
    # Without the preference the body's keys are the arguments, as usual.
    status, _, body = await api.request("POST", "rpc/total_of", json={"payload": {"x": 2}})
    assert (status, body) == (200, 2)
    status, _, body = await api.request("POST", "rpc/add", json={"a": 1}, headers={"Prefer": "params=single-object"})
    assert status == 404 and body["code"] == "PGRST202"
    status, _, body = await api.request("POST", "rpc/total_of", data=b"{not json",
                                        headers={"Prefer": "params=single-object",
                                                 "Content-Type": "application/json"})
    assert status == 400 and body["code"] == "PGRST102"


# -- the EXPLAIN media type ---------------------------------------------------------------------

async def test_plans_are_415_unless_enabled(api: Api) -> None:
    for method, path in (("GET", "books?id=in.(1,2,3)"), ("GET", "rpc/years"), ("DELETE", "kv?k=eq.nothing")):
        status, _, body = await api.request(method, path, headers={"Accept": "application/vnd.pgrst.plan"})
        assert status == 415 and body["code"] == "PGRST107", (method, path, body)


async def test_read_plans_in_json_and_text(api: Api) -> None:
    with plans_enabled(api):
        status, headers, body = await api.get("books?id=in.(1,2,3)", headers={"Accept": PLAN_JSON})
        assert status == 200, body
        assert headers["Content-Type"] == "application/vnd.pgrst.plan+json; charset=utf-8"
        assert isinstance(body[0]["Plan"]["Total Cost"], int | float)
        status, headers, text = await api.get("books?id=in.(1,2,3)", headers={"Accept": "application/vnd.pgrst.plan"})
        assert status == 200 and headers["Content-Type"] == "application/vnd.pgrst.plan+text; charset=utf-8"
        assert isinstance(text, str) and text.startswith("Aggregate") and "cost=" in text
        _, headers, body = await api.get("books?select=title,authors(name)&id=eq.1",
                                         headers={"Accept": f"{PLAN_JSON}; options=verbose"})
        assert headers["Content-Type"] == "application/vnd.pgrst.plan+json; options=verbose; charset=utf-8"
        assert "Output" in body[0]["Plan"]
        _, headers, body = await api.get("books", headers={
            "Accept": f'{PLAN_JSON}; for="application/vnd.pgrst.object"; options=analyze|buffers'})
        assert headers["Content-Type"] == ('application/vnd.pgrst.plan+json; for="application/vnd.pgrst.object+json"; '
                                           "options=analyze|buffers; charset=utf-8")
        assert "Actual Rows" in body[0]["Plan"] and "Execution Time" in body[0]
        status, _, body = await api.get("rpc/years", headers={"Accept": PLAN_JSON})
        assert status == 200 and body[0]["Plan"]["Total Cost"] > 0
        status, _, body = await api.get("nothing_here", headers={"Accept": PLAN_JSON})
        assert status == 404 and body["code"] == "PGRST205"


async def test_write_plans_change_nothing(api: Api) -> None:
    await api.admin("INSERT INTO kv (k, v) VALUES ('planned', 1) ON CONFLICT (k) DO UPDATE SET v = 1;")
    with plans_enabled(api):
        for method, path, body_ in (("DELETE", "kv?k=eq.planned", None), ("PATCH", "kv?k=eq.planned", {"v": 99}),
                                    ("POST", "kv", {"k": "planned-too", "v": 5})):
            status, headers, body = await api.request(method, path, json=body_, token=None, headers={
                "Accept": f"{PLAN_JSON}; options=analyze", "Authorization": f"Bearer {_user()}"})
            assert status == 200, (method, body)
            assert headers["Content-Type"].startswith("application/vnd.pgrst.plan+json")
            assert body[0]["Plan"]["Node Type"] in ("ModifyTable", "Aggregate", "CTE Scan", "Limit"), body
    rows = await api.admin("SELECT k, v FROM kv WHERE k LIKE 'planned%' ORDER BY k")
    assert [(r["k"], r["v"]) for r in rows] == [("planned", 1)]  # analyzed, then rolled back


def _user() -> str:
    from tests.dataapi.conftest import user_token
    return user_token()


# -- read templates: a kept shape builds exactly what the builder builds ------------------------

SHAPES = [
    "id=eq.{a}", "id=gt.{a}&select=title,authors(name)", "author_id=neq.{a}&order=id&limit=3",
    "id=not.eq.{a}&id=lte.{b}", "title=eq.{a}&year=gte.{b}&select=id,title,book_tags(tag_id)",
    "id=lt.{a}&or=(id.eq.1,title.eq.{b})", "id=in.({a},2)", "title=like.*{a}*&id=eq.{b}",
    "select=id,authors!inner(name)&authors.name=eq.{a}&id=gt.{b}",
    "authors:select=name,books(title)&books.year=gt.{b}&books.order=year.desc&id=eq.{a}",
    "authors:meta->>genre=eq.{a}&id=gte.{b}",
]
VALUES = [("1", "2"), ("7", "1999"), ("it's", "x\\y"), ("NULL", ""), ("\x00pgrst-slot-0\x00", "3")]


async def test_read_templates_build_what_the_builder_builds(api: Api) -> None:
    from urllib.parse import parse_qsl

    from dataapi.query import Builder, ReadShape, ReadTemplates, qualified
    from dataapi.request import parse_query

    status, _, _ = await api.get("books?id=eq.1")
    assert status == 200
    db = api.api.databases.get("main", "postgres")
    assert db is not None and db.cache is not None
    cache = db.cache
    templates = ReadTemplates()
    for shape_text in SHAPES:
        name, _, text = shape_text.partition(":") if shape_text.startswith("authors:") else ("books", "", shape_text)
        table = cache.table("public", name)
        for a, b in VALUES:
            q = parse_query(parse_qsl(text.format(a=a, b=b), keep_blank_values=True))
            shape = ReadShape(table, qualified(table.schema, table.name), 10, 0, None)
            kept = templates.read(cache, q, shape)
            built = Builder(cache, q).read(shape, q.select)
            assert (kept.sql, kept.params) == (built.sql, built.params), (shape_text, a, b)
    # One entry per shape, whatever the values in its slots.
    fresh = ReadTemplates()
    table = cache.table("public", "books")
    shape = ReadShape(table, qualified(table.schema, table.name), 10, 0, None)
    for v in ("1", "2", "3"):
        q = parse_query([("select", "title,authors(name)"), ("id", f"eq.{v}"), ("year", f"gt.{v}")])
        assert fresh.read(cache, q, shape).params[-2:] == [v, v]
    assert len(fresh._kept) == 1
    # Same shape, other values: other rows (the slot carries the value, not the first request's).
    _, _, one = await api.get("books?select=id&id=eq.1")
    _, _, two = await api.get("books?select=id&id=eq.2")
    assert one == [{"id": 1}] and two == [{"id": 2}]


# -- a read's implicit transaction -----------------------------------------------------------------

async def test_a_read_is_read_committed_read_only_and_as_the_role_whatever_the_defaults(api: Api) -> None:
    """A one-statement read runs as the implicit transaction of one pipeline (no BEGIN): it must
    still be READ COMMITTED when the database's default is SERIALIZABLE, read only, and run as the
    request's role with its settings."""
    await api.admin("CREATE DATABASE isotest")
    await api.admin("ALTER DATABASE isotest SET default_transaction_isolation = 'serializable'")
    addr = await api.endpoints.ensure_ready("main")
    conn = await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database="isotest")
    try:
        assert await conn.fetchval("SHOW default_transaction_isolation") == "serializable"
        await conn.execute("""
            CREATE FUNCTION pre_request() RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$;  -- the fixture's
            CREATE TABLE marks (n int);
            GRANT SELECT, INSERT ON marks TO web_anon;
            CREATE FUNCTION tx() RETURNS json STABLE LANGUAGE sql AS $$
              SELECT json_build_object('isolation', current_setting('transaction_isolation'),
                                       'read_only', current_setting('transaction_read_only'),
                                       'user', current_user, 'method', current_setting('request.method')) $$;
            CREATE FUNCTION mark() RETURNS int VOLATILE LANGUAGE sql AS $$ INSERT INTO marks VALUES (1) RETURNING n $$;
        """)
    finally:
        await conn.close()
    async with api.session.get(api.url("rpc/tx", database="isotest")) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"isolation": "read committed", "read_only": "on", "user": "web_anon",
                                  "method": "GET"}
    async with api.session.get(api.url("rpc/mark", database="isotest")) as r:  # a write in a GET
        assert r.status == 405 and (await r.json())["code"] == "25006"
    async with api.session.post(api.url("rpc/tx", database="isotest")) as r:  # POST: BEGIN … COMMIT
        assert r.status == 200 and (await r.json())["isolation"] == "read committed"
    async with api.session.get(api.url("rpc/tx", database="isotest")) as r:  # the settings did not stay
        assert (await r.json())["user"] == "web_anon"
