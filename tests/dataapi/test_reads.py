"""Reads through real HTTP against a real compute: vertical and horizontal filtering, ordering,
pagination and counts, media types, embedding, functions, errors — PostgREST's documented behaviour."""

from __future__ import annotations

import time

import pytest

from tests.dataapi.conftest import SECRET, Api, token, user_token

pytestmark = pytest.mark.timeout(240)


def titles(body: object) -> list[str]:
    assert isinstance(body, list), body
    return [r["title"] for r in body]


# -- vertical filtering ----------------------------------------------------------------------------

async def test_select_columns_aliases_casts_and_json_paths(api: Api) -> None:
    status, headers, body = await api.get("books?select=id,name:title,price::text&id=eq.1")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body == [{"id": 1, "name": "The Left Hand of Darkness", "price": "9.99"}]
    status, _, body = await api.get("authors?select=name,meta->genre,hugo:meta->awards->>hugo&id=eq.1")
    assert body == [{"name": "Ursula K. Le Guin", "genre": "sf", "hugo": "5"}]
    status, _, body = await api.get("books?select=*&id=eq.6")
    assert status == 200 and set(body[0]) >= {"id", "title", "author_id", "price", "labels", "window_years"}


async def test_aggregates_grouped_by_an_embedding(api: Api) -> None:
    _, _, body = await api.get("books?select=n:count(),total:price.sum(),authors(country)&author_id=in.(1,2,3)")
    assert sorted(body, key=lambda r: r["authors"]["country"]) == [
        {"n": 2, "total": 12.0, "authors": {"country": "GB"}}, {"n": 2, "total": 8.0, "authors": {"country": "PL"}},
        {"n": 2, "total": 22.49, "authors": {"country": "US"}}]


async def test_aggregates_group_by_the_other_columns(api: Api) -> None:
    status, _, body = await api.get("books?select=author_id,n:count(),total:price.sum(),newest:year.max()"
                                    "&author_id=in.(1,2)&order=author_id")
    assert status == 200
    assert body == [{"author_id": 1, "n": 2, "total": 22.49, "newest": 1974},
                    {"author_id": 2, "n": 2, "total": 8.0, "newest": 1965}]


# -- horizontal filtering --------------------------------------------------------------------------

@pytest.mark.parametrize(("query", "expected"), [
    ("year=eq.1961", ["Solaris"]),
    ("year=neq.1961&author_id=eq.2", ["The Cyberiad"]),
    ("year=gt.1969", ["The Dispossessed"]),
    ("year=gte.1969", ["The Left Hand of Darkness", "The Dispossessed"]),
    ("year=lt.1814", ["Pride and Prejudice"]),
    ("year=lte.1815", ["Pride and Prejudice", "Emma"]),
    ("title=like.*Dis*", ["The Dispossessed"]),
    ("title=ilike.*SOLARIS*", ["Solaris"]),
    ("title=match.^The [CD]", ["The Dispossessed", "The Cyberiad"]),
    ("title=imatch.^emma$", ["Emma"]),
    ("id=in.(2,3,99)", ["The Dispossessed", "Solaris"]),
    ('title=in.("Emma","Solaris")', ["Solaris", "Emma"]),
    ("price=is.null", ["The Cyberiad"]),
    ("labels=not.is.null&year=lt.1900", ["Pride and Prejudice"]),
    ("published=is.true&year=lt.1814", ["Pride and Prejudice"]),
    ("price=isdistinct.9.99&year=gt.1960&year=lt.1970", ["Solaris", "The Cyberiad"]),
    ("search=fts(english).darkness", ["The Left Hand of Darkness"]),
    ("search=plfts.left hand", ["The Left Hand of Darkness"]),
    ("search=phfts(english).left hand", ["The Left Hand of Darkness"]),
    ("search=wfts(english).pride -emma", ["Pride and Prejudice"]),
    ("title=fts.emma", ["Emma"]),
    ("labels=cs.{classic,sf}", ["The Left Hand of Darkness", "Solaris"]),
    ("labels=cd.{sf,humor,classic}&year=gt.1964", ["The Left Hand of Darkness", "The Dispossessed", "The Cyberiad"]),
    ("labels=ov.{romance,humor}", ["The Cyberiad", "Pride and Prejudice"]),
    ("window_years=sl.[1900,1965)", ["Pride and Prejudice"]),
    ("window_years=sr.[1900,1965)", ["The Dispossessed"]),
    ("window_years=nxr.[1800,1812)", []),
    ("window_years=nxl.[1970,1990)", ["The Dispossessed"]),
    ("window_years=adj.[1980,1990)", ["The Dispossessed"]),
    ("year=not.gt.1900", ["Pride and Prejudice", "Emma"]),
    ("title=not.like.The*&year=gt.1900", ["Solaris"]),
    ("year=eq(any).{1961,1965}", ["Solaris", "The Cyberiad"]),
    ("title=like(any).{*Emma*,*Solaris*}", ["Solaris", "Emma"]),
    ("title=like(all).{The*,*Dark*}", ["The Left Hand of Darkness"]),
    ("year=gt(all).{1960,1968}", ["The Left Hand of Darkness", "The Dispossessed"]),
    ("or=(year.lt.1814,price.gt.10)", ["The Dispossessed", "Pride and Prejudice"]),
    ("or=(year.eq.1961,and(author_id.eq.1,year.not.eq.1969))", ["The Dispossessed", "Solaris"]),
    ("and=(year.gt.1960,or(price.is.null,price.lt.9))", ["Solaris", "The Cyberiad"]),
    ("not.or=(year.gt.1900,price.is.null)", ["Pride and Prejudice", "Emma"]),
    ("not.and=(author_id.eq.3,year.gt.1814)&year=lt.1900", ["Pride and Prejudice"]),
    ("or=(title.in.(Emma,Solaris),id.eq.1)", ["The Left Hand of Darkness", "Solaris", "Emma"]),
])
async def test_operators(api: Api, query: str, expected: list[str]) -> None:
    status, _, body = await api.get(f"books?select=title&order=id&{query}")
    assert status == 200, body
    assert titles(body) == expected


async def test_json_path_filters(api: Api) -> None:
    _, _, body = await api.get("authors?select=name&meta->>genre=eq.sf&meta->awards->>hugo=gt.1")
    assert body == [{"name": "Ursula K. Le Guin"}]
    _, _, body = await api.get("authors?select=name&meta->awards=cs.{\"hugo\":0}")
    assert body == [{"name": "Stanislaw Lem"}]


# -- ordering, pagination, counting ----------------------------------------------------------------

async def test_order_with_nulls_and_several_terms(api: Api) -> None:
    _, _, body = await api.get("books?select=title&order=price.desc.nullsfirst&limit=2")
    assert titles(body) == ["The Cyberiad", "The Dispossessed"]
    _, _, body = await api.get("books?select=title&order=price.asc.nullslast,id&offset=4")
    assert titles(body) == ["The Dispossessed", "The Cyberiad"]
    _, _, body = await api.get("books?select=title&order=author_id.desc,year.asc&limit=3")
    assert titles(body) == ["Pride and Prejudice", "Emma", "Solaris"]


async def test_limit_offset_range_and_content_range(api: Api) -> None:
    status, headers, body = await api.get("books?select=id&order=id&limit=2&offset=1")
    assert status == 200 and [r["id"] for r in body] == [2, 3] and headers["Content-Range"] == "1-2/*"
    status, headers, body = await api.get("books?select=id&order=id", headers={"Range": "0-2", "Range-Unit": "items",
                                                                                "Prefer": "count=exact"})
    assert status == 206 and headers["Content-Range"] == "0-2/6" and len(body) == 3
    assert "count=exact" in headers["Preference-Applied"]
    status, headers, body = await api.get("books?select=id", headers={"Prefer": "count=exact"})
    assert status == 200 and headers["Content-Range"] == "0-5/6"
    status, headers, body = await api.get("books?select=id&offset=10", headers={"Prefer": "count=exact"})
    assert status == 416 and body["code"] == "PGRST103" and headers["Content-Range"] == "*/6"
    status, headers, body = await api.get("books?select=id", headers={"Range": "5-2"})
    assert status == 416 and body["code"] == "PGRST103"
    status, headers, body = await api.get("books?id=eq.999")
    assert status == 200 and body == [] and headers["Content-Range"] == "*/*"
    assert headers["Content-Location"] == "/books?id=eq.999"
    _, headers, body = await api.get("books?select=id&id=in.(   )")
    assert body == [] and headers["Content-Location"] == "/books?id=in.%28%20%20%20%29&select=id"


async def test_planned_and_estimated_counts(api: Api) -> None:
    for mode in ("planned", "estimated"):
        status, headers, _ = await api.get("books?select=id&limit=1", headers={"Prefer": f"count={mode}"})
        assert status in (200, 206)
        total = headers["Content-Range"].split("/")[1]
        assert total.isdigit() and int(total) > 0


async def test_max_rows_caps_a_read(api: Api) -> None:
    await api.admin("INSERT INTO kv (k, v) SELECT 'row' || n, n FROM generate_series(1, 1100) n "
                    "ON CONFLICT DO NOTHING")
    status, headers, body = await api.get("kv?select=k")
    assert status == 200 and len(body) == 1000 and headers["Content-Range"].startswith("0-999/")
    await api.admin("DELETE FROM kv WHERE k LIKE 'row%'")


# -- media types -----------------------------------------------------------------------------------

async def test_singular_object_and_its_errors(api: Api) -> None:
    obj = {"Accept": "application/vnd.pgrst.object+json"}
    status, headers, body = await api.get("books?select=id,title&id=eq.3", headers=obj)
    assert status == 200 and body == {"id": 3, "title": "Solaris"}
    assert headers["Content-Type"].startswith("application/vnd.pgrst.object+json")
    status, _, body = await api.get("books?select=id&id=gt.3", headers=obj)
    assert status == 406 and body["code"] == "PGRST116" and body["details"] == "The result contains 3 rows"
    status, _, body = await api.get("books?id=eq.999", headers=obj)
    assert status == 406 and body["details"] == "The result contains 0 rows"


async def test_csv(api: Api) -> None:
    status, headers, body = await api.get("books?select=id,title,price&id=in.(3,4)&order=id",
                                          headers={"Accept": "text/csv"})
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert body == "id,title,price\n3,Solaris,8.0\n4,The Cyberiad,\n"


async def test_unknown_media_type_is_406(api: Api) -> None:
    status, _, body = await api.get("books", headers={"Accept": "text/xml"})
    assert status == 415 and body == {"code": "PGRST107", "details": None, "hint": None,
                                      "message": "None of these Content-Types are available: text/xml"}
    status, headers, _ = await api.get("books?select=id", headers={"Accept": "text/xml, */*"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    status, headers, _ = await api.get("books?select=id", headers={"Accept": "text/csv; version=1, application/json"})
    assert status == 200 and headers["Content-Type"] == "text/csv; charset=utf-8"


# -- embedding -------------------------------------------------------------------------------------

async def test_many_to_one_one_to_many_and_one_to_one(api: Api) -> None:
    _, _, body = await api.get("books?select=title,authors(name,country)&id=eq.3")
    assert body == [{"title": "Solaris", "authors": {"name": "Stanislaw Lem", "country": "PL"}}]
    _, _, body = await api.get("authors?select=name,books(title)&id=eq.3&books.order=year.desc")
    assert body == [{"name": "Jane Austen", "books": [{"title": "Emma"}, {"title": "Pride and Prejudice"}]}]
    _, _, body = await api.get("authors?select=name,author_profiles(bio)&id=in.(1,3)&order=id")
    assert body == [{"name": "Ursula K. Le Guin", "author_profiles": {"bio": "Wrote Earthsea"}},
                    {"name": "Jane Austen", "author_profiles": None}]
    _, _, body = await api.get("books?select=title,writer:author_id(name)&id=eq.5")
    assert body == [{"title": "Pride and Prejudice", "writer": {"name": "Jane Austen"}}]


async def test_many_to_many_through_the_junction(api: Api) -> None:
    _, _, body = await api.get("books?select=title,tags(name)&id=in.(1,2)&order=id&tags.order=name")
    assert body == [{"title": "The Left Hand of Darkness", "tags": [{"name": "favourite"}, {"name": "reread"}]},
                    {"title": "The Dispossessed", "tags": []}]
    _, _, body = await api.get("tags?select=name,books(title)&name=eq.favourite&books.order=id")
    assert body == [{"name": "favourite", "books": [{"title": "The Left Hand of Darkness"}, {"title": "Solaris"}]}]


async def test_inner_left_and_filters_on_embedded(api: Api) -> None:
    _, _, body = await api.get("authors?select=name,books!inner(title)&books.year=lt.1900")
    assert body == [{"name": "Jane Austen", "books": [{"title": "Pride and Prejudice"}, {"title": "Emma"}]}]
    _, _, body = await api.get("authors?select=name,books!left(title)&books.year=lt.1900&order=id&limit=2")
    assert body == [{"name": "Ursula K. Le Guin", "books": []}, {"name": "Stanislaw Lem", "books": []}]
    _, _, body = await api.get("authors?select=name,books(title)&books=is.null&order=id&id=lt.5")
    assert [r["name"] for r in body] == ["Anonymous"]
    _, headers, body = await api.get("authors?select=name,books()&books.title=eq.Solaris&books=not.is.null",
                                     headers={"Prefer": "count=exact"})
    assert body == [{"name": "Stanislaw Lem"}] and headers["Content-Range"] == "0-0/1"
    _, _, body = await api.get("authors?select=name,books(title)&id=eq.1&books.limit=1&books.order=year.desc")
    assert body == [{"name": "Ursula K. Le Guin", "books": [{"title": "The Dispossessed"}]}]
    _, _, body = await api.get("authors?select=name,books(title)&id=eq.1&books.or=(year.eq.1969,year.eq.1800)")
    assert body == [{"name": "Ursula K. Le Guin", "books": [{"title": "The Left Hand of Darkness"}]}]


async def test_nested_embedding_and_spread(api: Api) -> None:
    _, _, body = await api.get("authors?select=name,books(title,publishers(name),tags(name))&id=eq.1"
                               "&books.order=id")
    assert body == [{"name": "Ursula K. Le Guin", "books": [
        {"title": "The Left Hand of Darkness", "publishers": {"name": "Ace"},
         "tags": [{"name": "favourite"}, {"name": "reread"}]},
        {"title": "The Dispossessed", "publishers": {"name": "Ace"}, "tags": []}]}]
    _, _, body = await api.get("books?select=title,...authors(author:name,country)&id=eq.5")
    assert body == [{"title": "Pride and Prejudice", "author": "Jane Austen", "country": "GB"}]
    _, _, body = await api.get("authors?select=name,...books(title,year)&id=in.(2,4)&order=id&books.order=year")
    assert body == [{"name": "Stanislaw Lem", "title": ["Solaris", "The Cyberiad"], "year": [1961, 1965]},
                    {"name": "Anonymous", "title": [], "year": []}]
    _, _, body = await api.get("authors?select=name,...books!inner(title)&books.year=lt.1814")
    assert body == [{"name": "Jane Austen", "title": ["Pride and Prejudice"]}]
    _, _, body = await api.get("books?select=title,...authors!inner(name,country)&authors.country=is.null")
    assert body == []
    status, _, body = await api.get("authors?select=name,...books(...publishers(name))")
    assert status == 400 and body["code"] == "PGRST119"


async def test_order_by_a_to_one_relation(api: Api) -> None:
    _, _, body = await api.get("books?select=title&order=authors(name).asc,id.desc&limit=3")
    assert titles(body) == ["Emma", "Pride and Prejudice", "The Cyberiad"]
    status, _, body = await api.get("authors?select=name&order=books(title)")
    assert status == 400 and body["code"] == "PGRST118"


async def test_hints_and_ambiguity(api: Api) -> None:
    status, _, body = await api.get("employees?select=name,employees(name)")
    assert status == 300 and body["code"] == "PGRST201" and len(body["details"]) == 2
    assert "employees!employees_manager_id_fkey" in body["hint"]
    _, _, body = await api.get("employees?select=name,boss:employees!manager_id(name)&id=eq.2")
    assert body == [{"name": "alice", "boss": {"name": "boss"}}]
    status, _, body = await api.get("books?select=title,nothing(*)")
    assert status == 400 and body["code"] == "PGRST200"
    status, _, body = await api.get("books?select=title&authors.name=eq.x")
    assert status == 400 and body == {
        "code": "PGRST108", "details": None,
        "message": "Cannot apply filter because 'authors' is not an embedded resource in this request",
        "hint": "Verify that 'authors' is included in the 'select' query parameter."}
    status, _, body = await api.get("authors?select=name,books(title)&books.tags2.name=eq.x")
    assert status == 400 and "'tags2'" in body["message"]
    status, _, body = await api.get("authors?select=name,books(title)&books=eq.1")
    assert status == 400 and body["code"] == "PGRST120"


# -- functions -------------------------------------------------------------------------------------

async def test_rpc_scalar_setof_table_and_composite(api: Api) -> None:
    assert (await api.get("rpc/add?a=2&b=3"))[2] == 5
    status, _, body = await api.request("POST", "rpc/add", json={"a": 2})
    assert status == 200 and body == 12
    _, _, body = await api.get("rpc/years?limit=2")
    assert body == [1813, 1815]
    status, _, body = await api.request("POST", "rpc/books_after?select=title&title=like.*Dis*", json={"y": 1900})
    assert status == 200 and body == [{"title": "The Dispossessed"}]
    _, headers, body = await api.get("rpc/author_counts?n=gt.0&order=author.asc&select=author")
    assert body == [{"author": "Jane Austen"}, {"author": "Stanislaw Lem"}, {"author": "Ursula K. Le Guin"}]
    _, _, body = await api.get("rpc/one_author?aid=2&select=name")
    assert body == {"name": "Stanislaw Lem"}
    _, _, body = await api.get("rpc/books_after?y=1970", headers={"Accept": "application/vnd.pgrst.object+json"})
    assert body["title"] == "The Dispossessed"


async def test_rpc_errors(api: Api) -> None:
    status, _, body = await api.get("rpc/nope")
    assert status == 404 and body["code"] == "PGRST202"
    status, _, body = await api.get("rpc/add?b=1")
    assert status == 404 and body["code"] == "PGRST202"
    status, _, body = await api.request("PATCH", "rpc/add")
    assert status == 405 and body["code"] == "PGRST101"
    status, _, body = await api.get("rpc/bump_volatile")
    assert status == 405 and body["code"] == "25006"
    status, _, body = await api.request("POST", "rpc/pay")
    assert status == 402 and body == {"code": "PT402", "details": "Quota exceeded", "hint": "Upgrade",
                                      "message": "Payment Required"}


async def test_functions_set_response_status_and_headers(api: Api) -> None:
    status, headers, body = await api.request("POST", "rpc/teapot")
    assert status == 418 and headers["X-Tea"] == "earl grey"
    status, _, body = await api.request("POST", "rpc/bad_headers", token=user_token())
    assert status == 500 and body["code"] == "PGRST111"
    assert not await api.admin("SELECT 1 FROM kv WHERE k = 'bad-headers'")  # rolled back


async def test_request_settings_reach_the_database(api: Api) -> None:
    _, _, body = await api.get("rpc/request_info", headers={"X-Custom": "hello"})
    assert body == {"method": "GET", "path": "/rpc/request_info", "custom": "hello", "role": "web_anon"}
    _, _, body = await api.get("rpc/whoami", token=user_token("carol"))
    assert body == "web_user:carol"


# -- errors ----------------------------------------------------------------------------------------

async def test_postgrest_errors(api: Api) -> None:
    cases = [
        ("nope", 404, "PGRST205"), ("books?nope=eq.1", 400, "42703"), ("books?select=nope", 400, "42703"),
        ("books?id=eq.abc", 400, "22P02"), ("books?id=bogus.1", 400, "PGRST100"), ("books?id=eq", 400, "PGRST104"),
        ("books?select=title,", 400, "PGRST100"), ("books?id=0", 400, "PGRST104"),
        ("books?order=id.sideways", 400, "PGRST100"),
        ("books?limit=-1", 400, "PGRST100"), ("books?or=(id.eq.1", 400, "PGRST100"),
        ("books?id=in.1,2", 400, "PGRST100"), ("books?price=is.maybe", 400, "PGRST100"),
    ]
    for path, status_, code in cases:
        status, headers, body = await api.get(path)
        assert (status, body["code"]) == (status_, code), (path, body)
        assert set(body) == {"code", "details", "hint", "message"}
        assert headers["Content-Type"].startswith("application/json")
    status, _, body = await api.get("books", headers={"Accept-Profile": "secret"})
    assert status == 406 and body["code"] == "PGRST106"


async def test_bad_paths_and_methods(api: Api) -> None:
    async with api.session.get(f"{api.base}/main/postgres/nope") as r:
        assert r.status == 404 and (await r.json())["code"] == "PGRST125"
    status, _, body = await api.get("books", branch="no_such_branch")
    assert status == 404 and body["code"] == "PGRST125" and "no_such_branch" in body["message"]
    async with api.session.get(f"{api.base}/main/no_such_db/rest/v1/books") as r:
        assert r.status == 404 and (await r.json())["code"] == "3D000"
    async with api.session.options(api.url("books")) as r:
        assert r.status == 200 and "PATCH" in r.headers["Allow"]


async def test_openapi_at_the_base_url(api: Api) -> None:
    status, headers, body = await api.get("")
    assert status == 200 and headers["Content-Type"].startswith("application/openapi+json")
    assert body["swagger"] == "2.0" and "/books" in body["paths"] and "/rpc/add" in body["paths"]
    assert body["definitions"]["books"]["properties"]["year"]["type"] == "integer"
    assert "title" in body["definitions"]["books"]["required"]


# -- authentication and row-level security ---------------------------------------------------------

async def test_roles_and_rls(api: Api) -> None:
    _, _, body = await api.get("notes?select=body&order=id", token=user_token("alice"))
    assert [r["body"] for r in body] == ["alice 1", "alice 2"]
    _, _, body = await api.get("notes?select=body", token=user_token("bob"))
    assert [r["body"] for r in body] == ["bob 1"]
    status, headers, body = await api.get("notes")
    assert status == 401 and body["code"] == "42501" and headers["WWW-Authenticate"] == "Bearer"
    status, _, body = await api.request("POST", "notes", token=user_token("bob"), json={"owner": "alice", "body": "x"})
    assert status == 403 and body["code"] == "42501"
    status, _, body = await api.request("POST", "kv", json={"k": "anon"})
    assert status == 401 and body["code"] == "42501"


async def test_bad_tokens_are_401_with_www_authenticate(api: Api) -> None:
    expired = token({"role": "web_user", "exp": int(time.time()) - 3600})
    status, headers, body = await api.get("books", token=expired)
    assert status == 401 and body["code"] == "PGRST303" and body["message"] == "JWT expired"
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token", error_description="JWT expired"'
    forged = token({"role": "web_user"}, secret="another-secret-that-is-long-enough-to-use")
    status, headers, body = await api.get("books", token=forged)
    assert status == 401 and body["code"] == "PGRST301"
    assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    status, _, body = await api.get("books", token="not.a.jwt.at.all")
    assert status == 401 and body["code"] == "PGRST301"
    status, _, body = await api.get("books", token=token({"role": "web_super"}))
    assert status == 403 and body["code"] == "42501"
    status, _, body = await api.get("books", token=token({"role": "lakelet_admin"}))
    assert status == 403
    status, _, body = await api.get("books", token=token({"role": "pg_read_server_files"}))
    assert status == 403 and body["code"] == "42501"
    status, _, body = await api.get("books", token=token({"role": "nobody_at_all"}))
    assert status == 400 and body["code"] == "22023"
    # No role claim: the anonymous role; a role claim path of another shape is honoured elsewhere.
    status, _, body = await api.get("rpc/whoami", token=token({"sub": "x"}))
    assert status == 200 and body == "web_anon:x"
    assert SECRET


# -- hostile input: PostgREST's 4xx, never a 500, never SQL from raw text ----------------------------

async def test_injection_attempts_are_values_or_unknown_names(api: Api) -> None:
    before = await api.admin("SELECT count(*) AS n FROM books")
    hostile = [
        ("books?title=eq.'; DROP TABLE books; --", 200, None),
        ("books?title=in.(\"x'); DROP TABLE books; --\",y)", 200, None),
        ("books?title=like.%'; DELETE FROM books; --", 200, None),
        ("books?select=id,title;DROP TABLE books", 400, "42703"),  # one name, spaces and all: no such column
        ("books?select=id,title;DROP", 400, "42703"),
        ('books?select="title"" FROM books; DROP TABLE books; --"', 400, "PGRST100"),  # text after the quotes
        ("books?select=id::text);DROP TABLE books;--", 400, "PGRST100"),
        ("books?order=id;DROP TABLE books", 400, "42703"),  # one (unknown) name with spaces
        ("books?id);DROP TABLE books;--=eq.1", 400, None),
        ("authors?meta->>x');DROP TABLE books;--=eq.1", 200, None),
        ("books?search=fts(english'); DROP TABLE books;--).x", 400, "PGRST100"),
        ("books%22;DROP TABLE books", 404, "PGRST205"),
        ("books?title=eq.%00", 400, None),
        ("books?select=author_id,n:count()&author_id=eq.1;select 1", 400, "22P02"),
    ]
    for path, status_, code in hostile:
        status, _, body = await api.get(path)
        assert status == status_, (path, status, body)
        if status == 200:
            assert body == []
        else:
            assert set(body) == {"code", "details", "hint", "message"}
            if code:
                assert body["code"] == code, (path, body)
    status, _, body = await api.get("books?select=id&limit=99999999999999999999999")  # capped by max_rows
    assert status == 200 and len(body) == before[0]["n"]
    after = await api.admin("SELECT count(*) AS n FROM books")
    assert before[0]["n"] == after[0]["n"]


async def test_huge_in_list_is_one_bound_array(api: Api) -> None:
    ids = ",".join(str(n) for n in range(5000))
    status, _, body = await api.get(f"books?select=id&id=in.({ids})&order=id")
    assert status == 200 and [r["id"] for r in body] == [1, 2, 3, 4, 5, 6]
    many = ",".join(f"id.eq.{n}" for n in range(2000))
    status, _, body = await api.get(f"books?select=id&or=({many})&limit=2&order=id")
    assert status == 200 and [r["id"] for r in body] == [1, 2]


async def test_deep_nesting_is_refused_not_crashed(api: Api) -> None:
    deep = "or=" + "(and(" * 200 + "id.eq.1" + "))" * 200
    status, _, body = await api.get(f"books?{deep}")
    assert status == 400 and body["code"] == "PGRST100"
    deep_select = "select=" + "authors(" * 40 + "id" + ")" * 40
    status, _, body = await api.get(f"books?{deep_select}")
    assert status == 400 and body["code"] in ("PGRST100", "PGRST200")
    status, _, body = await api.get("books?or=" + "(" * 5000)
    assert status == 400 and body["code"] == "PGRST100"


async def test_bad_and_oversized_bodies(api: Api) -> None:
    from tests.dataapi.conftest import MAX_BODY
    tok = token({"role": "web_user", "sub": "z"})
    status, _, body = await api.request("POST", "kv", token=tok, data=b"[" * 100_000,
                                        headers={"Content-Type": "application/json"})
    assert status == 400 and body["code"] == "PGRST102"
    big = b'{"k": "big", "note": "' + b"x" * (MAX_BODY + 10) + b'"}'
    status, _, body = await api.request("POST", "kv", token=tok, data=big, headers={"Content-Type": "application/json"})
    assert status == 413 and body["code"] == "PGRST102"
    status, _, body = await api.request("POST", "kv", token=tok, data=b'{"k": 1, "k": {"a": [}',
                                        headers={"Content-Type": "application/json"})
    assert status == 400 and body["code"] == "PGRST102"
    status, _, body = await api.request("TRACE", "kv", token=tok)
    assert status == 405 and body["code"] == "PGRST117"


async def test_head_csv_functions_and_embedding_on_function_results(api: Api) -> None:
    status, headers, body = await api.request("HEAD", "books?select=id", headers={"Prefer": "count=exact"})
    assert status == 200 and headers["Content-Range"] == "0-5/6" and body == ""
    status, headers, body = await api.get("rpc/years?limit=3", headers={"Accept": "text/csv"})
    assert status == 200 and body == "years\n1813\n1815\n1961\n"
    _, _, body = await api.get("rpc/books_after?y=1970&select=title,authors(name)")
    assert body == [{"title": "The Dispossessed", "authors": {"name": "Ursula K. Le Guin"}}]
    _, _, body = await api.get("authors?select=name,books(n:count())&id=eq.1")
    assert body == [{"name": "Ursula K. Le Guin", "books": [{"n": 2}]}]
    _, _, body = await api.get("books?select=title,...authors!inner(name)&authors.country=eq.PL&order=id")
    assert body == [{"title": "Solaris", "name": "Stanislaw Lem"}, {"title": "The Cyberiad", "name": "Stanislaw Lem"}]


async def test_rpc_arguments_filters_and_pagination_as_postgrest_reads_them(api: Api) -> None:
    status, _, body = await api.get("rpc/add?a=1&b=2&smthelse=blabla")
    assert status == 404 and body == {
        "code": "PGRST202", "message": "Could not find the function public.add(a, b, smthelse) in the schema cache",
        "details": "Searched for the function public.add with parameters a, b, smthelse, but no matches were "
                   "found in the schema cache.",
        "hint": "Perhaps you meant to call the function public.add(a, b)"}
    status, _, body = await api.get("rpc/whoami?nam=x")
    assert status == 404 and body["message"] == "Could not find the function public.whoami(nam) in the schema cache"
    status, headers, body = await api.get("rpc/add?a=3&b=4", headers={"Prefer": "count=exact"})
    assert (status, body, headers["Content-Range"]) == (200, 7, "0-0/1")
    status, headers, body = await api.request("POST", "rpc/books_after?select=id&limit=1&offset=1&order=id",
                                              json={"y": 1900}, headers={"Prefer": "count=exact"})
    assert status == 206 and body == [{"id": 2}] and headers["Content-Range"] == "1-1/4"
    status, headers, body = await api.get("rpc/books_after?y=1900&id=gt.3&select=id")
    assert status == 200 and body == [{"id": 4}]


async def test_pre_request_function(api: Api) -> None:
    status, _, body = await api.get("books?id=eq.1", headers={"X-Block": "yes"})
    assert status == 403 and body["message"] == "Blocked by the pre-request function"
    status, headers, body = await api.get("books?select=id&id=eq.1", headers={"X-Mark": "1"})
    assert status == 200 and headers["X-Pre-Request"] == "web_anon" and body == [{"id": 1}]


async def test_requests_are_counted_in_metrics(api: Api) -> None:
    await api.get("books?id=eq.1")
    await api.get("nope")
    await api.get("books", branch="not_a_branch")
    samples = {(s.labels["branch"], s.labels["status"]): s.value
               for metric in api.api.metrics.requests.collect() for s in metric.samples if s.name.endswith("_total")}
    assert samples[("main", "200")] >= 1 and samples[("main", "404")] >= 1
    assert samples[("-", "404")] >= 1 and not any(b == "not_a_branch" for b, _ in samples)


async def test_schemas_by_profile_headers(api: Api) -> None:
    _, _, body = await api.get("books?select=title&id=eq.1", headers={"Accept-Profile": "extra"})
    assert body == [{"title": "Only in extra"}]
    status, _, body = await api.get("gadgets")
    assert status == 404 and body["code"] == "PGRST205"
    status, _, body = await api.request("POST", "gadgets?select=name", token=user_token(),
                                        json={"id": 2, "name": "cog"},
                                        headers={"Content-Profile": "extra", "Prefer": "return=representation"})
    assert status == 201 and body == [{"name": "cog"}]
    status, _, body = await api.get("gadgets", headers={"Accept-Profile": "public2"})
    assert status == 406 and body["code"] == "PGRST106" and body["hint"].endswith(": public, extra")


async def test_random_query_strings_never_500(api: Api) -> None:
    """Hundreds of generated query strings (seeded, so a failure repeats): every answer is a 2xx/3xx
    or a PostgREST-shaped 4xx."""
    import random
    from urllib.parse import quote

    rnd = random.Random(15)
    keys = ["select", "order", "or", "and", "not.or", "id", "title", "year", "price", "labels", "meta->>genre",
            "meta->awards", "authors.name", "books.order", "books.limit", "limit", "offset", "window_years",
            "search", "columns", "on_conflict", "x"]
    pieces = ["eq.", "neq.", "in.(", "is.", "not.", "like.", "fts(english).", "cs.{", "ov.", "adj.[", "(", ")",
              ",", ".", "*", "!inner", "authors", "books", "tags", "id", "title", "::text", "->", "->>", "\"",
              "'", ";", "1", "abc", "null", "desc", "nullslast", "count()", ".sum()", "...", ":", "{", "}", "%00",
              "\\", "or(", "and(", " "]
    for _ in range(400):
        parts = []
        for _ in range(rnd.randint(1, 3)):
            key = rnd.choice(keys)
            value = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 8)))
            parts.append(f"{key}={quote(value, safe='')}")
        table = rnd.choice(["books", "authors", "rpc/add", "rpc/books_after", "tags"])
        status, _, body = await api.get(f"{table}?{'&'.join(parts)}")
        assert status < 500, (table, parts, body)
        if status >= 400:
            assert isinstance(body, dict) and set(body) == {"code", "details", "hint", "message"}, (parts, body)


async def test_embedding_through_views(api: Api) -> None:
    _, _, body = await api.get("shelves?select=label,shelf_books(books(title))&order=id&shelf_books.order=id")
    assert body == [{"label": "front", "shelf_books": [{"books": {"title": "The Left Hand of Darkness"}},
                                                       {"books": {"title": "Solaris"}}]},
                    {"label": "back", "shelf_books": [{"books": {"title": "Pride and Prejudice"}}]}]
    _, _, body = await api.get("books?select=title,shelf_books(shelves(label))&id=eq.5")
    assert body == [{"title": "Pride and Prejudice", "shelf_books": [{"shelves": {"label": "back"}}]}]
    _, _, body = await api.get("book_titles?select=name,authors(name)&id=eq.3")
    assert body == [{"name": "Solaris", "authors": {"name": "Stanislaw Lem"}}]
    _, _, body = await api.get("book_refs?select=headline,authors(name),tags(name)&ref=eq.1")
    assert body == [{"headline": "The Left Hand of Darkness", "authors": {"name": "Ursula K. Le Guin"},
                     "tags": [{"name": "favourite"}, {"name": "reread"}]}]
    _, _, body = await api.get("authors?select=name,book_refs(headline)&id=eq.2&book_refs.order=ref")
    assert body == [{"name": "Stanislaw Lem", "book_refs": [{"headline": "Solaris"}, {"headline": "The Cyberiad"}]}]
    _, _, body = await api.get("shelf_books_v2?select=id,books(title),shelves(label)&order=id")
    assert body == [{"id": 2, "books": {"title": "Solaris"}, "shelves": {"label": "front"}},
                    {"id": 3, "books": {"title": "Pride and Prejudice"}, "shelves": {"label": "back"}}]


async def test_aliased_embeddings_filtered_by_alias_or_relation(api: Api) -> None:
    _, _, body = await api.get("authors?select=name,old:books(title),new:books(title)&id=eq.1"
                               "&old.year=lt.1970&new.year=gte.1970")
    assert body == [{"name": "Ursula K. Le Guin", "old": [{"title": "The Left Hand of Darkness"}],
                     "new": [{"title": "The Dispossessed"}]}]
    _, _, body = await api.get("authors?select=name,written:books(title)&id=eq.1&books.order=year.desc")
    assert body == [{"name": "Ursula K. Le Guin", "written": [{"title": "The Dispossessed"},
                                                              {"title": "The Left Hand of Darkness"}]}]


async def test_computed_fields(api: Api) -> None:
    _, _, body = await api.get("books?select=id,label,age:age_at_publication&id=eq.3")
    assert body == [{"id": 3, "label": "Solaris (1961)", "age": 40}]
    _, _, body = await api.get("books?select=title&age_at_publication=lt.40&order=age_at_publication.desc")
    assert body == [{"title": "Pride and Prejudice"}]  # 1813 - 1775 = 38; Emma is 40
    _, _, body = await api.get("authors?select=name,books(label)&id=eq.3&books.order=year")
    assert body == [{"name": "Jane Austen", "books": [{"label": "Pride and Prejudice (1813)"},
                                                      {"label": "Emma (1815)"}]}]


async def test_function_of_one_json_argument_takes_the_body(api: Api) -> None:
    status, _, body = await api.request("POST", "rpc/echo_total", json={"a": 1, "b": [1, 2]})
    assert status == 200 and body == {"keys": 2, "doc": {"a": 1, "b": [1, 2]}}
    status, _, body = await api.request("POST", "rpc/echo_total", data=b"{nope",
                                        headers={"Content-Type": "application/json"})
    assert status == 400 and body["code"] == "PGRST102"


async def test_column_names_with_dashes_and_quotes(api: Api) -> None:
    _, _, body = await api.get('odd_names?select=id,field-with_sep,"Mixed Case"&field-with_sep=eq.7')
    assert body == [{"id": 1, "field-with_sep": 7, "Mixed Case": "x"}]
    status, _, body = await api.get("books?select=title,nothing(*)")
    assert status == 400 and body["details"] is None and body["hint"].startswith("Verify that 'books' and 'nothing'")


async def test_raw_text_and_binary_output(api: Api) -> None:
    status, headers, body = await api.get("books?select=title&id=eq.3", headers={"Accept": "text/plain"})
    assert (status, body, headers["Content-Type"]) == (200, "Solaris", "text/plain; charset=utf-8")
    async with api.session.get(api.url("blobs?select=data&order=id"),
                               headers={"Accept": "application/octet-stream"}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/octet-stream"
        assert await r.read() == bytes.fromhex("89504e47") + bytes.fromhex("0001ff")
    status, _, body = await api.get("blobs?select=data,label", headers={"Accept": "application/octet-stream"})
    assert status == 406 and body["code"] == "PGRST502"


async def test_computed_relationships(api: Api) -> None:
    _, _, body = await api.get("authors?select=name,classics(title),first_book(year)&id=in.(1,3)&order=id")
    assert body == [{"name": "Ursula K. Le Guin", "classics": [{"title": "The Left Hand of Darkness"}],
                     "first_book": {"year": 1969}},
                    {"name": "Jane Austen", "classics": [{"title": "Pride and Prejudice"}, {"title": "Emma"}],
                     "first_book": {"year": 1813}}]
    _, _, body = await api.get("authors?select=name&order=first_book(year).desc.nullslast&limit=2")
    assert body == [{"name": "Ursula K. Le Guin"}, {"name": "Stanislaw Lem"}]
    _, _, body = await api.get("authors?select=name,classics!inner(title)&classics.year=gt.1960&order=id")
    assert body == [{"name": "Ursula K. Le Guin", "classics": [{"title": "The Left Hand of Darkness"}]},
                    {"name": "Stanislaw Lem", "classics": [{"title": "Solaris"}, {"title": "The Cyberiad"}]}]


async def test_fts_on_a_domain_over_tsvector_is_not_wrapped_in_to_tsvector(api: Api) -> None:
    """A column whose type is a domain (or a domain of a domain) over tsvector is searched as it is;
    only other types go through ``to_tsvector()`` (PostgREST resolves the base type)."""
    for column in ("vec", "vec2"):
        status, _, body = await api.get(f"memos?select=id&{column}=fts(simple).the")
        assert (status, body) == (200, [{"id": 1}]), body
    status, _, body = await api.get("memos?select=id&body=plfts.dog")  # text: through to_tsvector()
    assert (status, body) == (200, [{"id": 2}])


async def test_a_volatile_computed_field_is_a_computed_field(api: Api) -> None:
    """PostgREST takes any function of a table's row type as a computed field, whatever its
    volatility (a function declared without one is VOLATILE)."""
    status, _, body = await api.get("memos?select=id,shouted&shouted=like.*DOG*")
    assert (status, body) == (200, [{"id": 2, "shouted": "A DOG RAN"}]), body


async def test_error_bodies_and_headers_as_postgrest_words_them(api: Api) -> None:
    """PostgREST's own wording for its errors, and ``Proxy-Status: Lakelet; error=<code>`` on every
    error response (PostgreSQL's errors name their SQLSTATE there)."""
    status, headers, body = await api.request("DELETE", "rpc/add")
    assert (status, body["message"]) == (405, "Cannot use the DELETE method on RPC")
    assert headers["Proxy-Status"] == "Lakelet; error=PGRST101"
    status, headers, body = await api.get("gadgets", headers={"Accept-Profile": "nowhere"})
    assert (status, body) == (406, {"code": "PGRST106", "message": "Invalid schema: nowhere", "details": None,
                                    "hint": "Only the following schemas are exposed: public, extra"})
    async with api.session.get(f"{api.base}/main/postgres/rest/v1/a/b") as r:
        assert r.status == 404 and await r.json() == {"code": "PGRST125", "details": None, "hint": None,
                                                      "message": "Invalid path specified in request URL"}
        assert r.headers["Proxy-Status"] == "Lakelet; error=PGRST125"
    status, _, body = await api.get("nothing_like_this")
    assert (status, body["code"], body["hint"]) == (404, "PGRST205", None)
    status, _, body = await api.get("author")  # one letter off: PostgREST suggests the near name
    assert (status, body["hint"]) == (404, "Perhaps you meant the table 'public.authors'")
    status, headers, body = await api.get("books?id=eq.nope")
    assert status == 400 and headers["Proxy-Status"] == "Lakelet; error=22P02"


async def test_content_profile_names_the_schema_when_there_is_a_choice(api: Api) -> None:
    """With more than one exposed schema, every response says which one it served (PostgREST's
    ``Content-Profile``), asked for or not."""
    _, headers, _ = await api.get("books?select=title&id=eq.1")
    assert headers["Content-Profile"] == "public"
    _, headers, _ = await api.get("books?select=title&id=eq.1", headers={"Accept-Profile": "extra"})
    assert headers["Content-Profile"] == "extra"
    status, headers, _ = await api.get("", headers={"Accept-Profile": "extra"})  # the OpenAPI description
    assert status == 200 and headers["Content-Profile"] == "extra"
    status, headers, _ = await api.request("POST", "gadgets", token=user_token(), json={"id": 7, "name": "nut"},
                                           headers={"Content-Profile": "extra", "Prefer": "tx=rollback"})
    assert status == 201 and headers["Content-Profile"] == "extra"


async def test_embedding_looks_only_in_its_own_schema_and_takes_a_foreign_key_name(api: Api) -> None:
    """Relationships are keyed as PostgREST keys them: a view of the same base tables in another
    exposed schema is no second candidate; and a to-one target may be named by its foreign key."""
    for profile in ("public", "extra"):
        status, headers, body = await api.get("shelves?select=label,shelf_books(id)&id=eq.1&shelf_books.order=id",
                                              headers={"Accept-Profile": profile})
        assert status == 200 and body == [{"label": "front", "shelf_books": [{"id": 1}, {"id": 2}]}], body
    status, _, body = await api.get("books?select=title,books_author_id_fkey(name)&id=eq.1")
    assert (status, body) == (200, [{"title": "The Left Hand of Darkness",
                                     "books_author_id_fkey": {"name": "Ursula K. Le Guin"}}]), body


async def test_options_lists_what_the_resource_takes(api: Api) -> None:
    """``OPTIONS`` answers from the schema cache as PostgREST does: a table takes every method, a view
    only what Postgres can write through it, a volatile function only POST, the root reads only;
    an unknown table is 404."""
    async def allow(path: str) -> tuple[int, str | None]:
        async with api.session.options(api.url(path)) as r:
            return r.status, r.headers.get("Allow")
    assert await allow("books") == (200, "OPTIONS,GET,HEAD,POST,PUT,PATCH,DELETE")
    assert await allow("book_titles") == (200, "OPTIONS,GET,HEAD,POST,PUT,PATCH,DELETE")  # its key traced
    assert await allow("book_years") == (200, "OPTIONS,GET,HEAD")  # DISTINCT: Postgres writes nothing through it
    assert await allow("rpc/bump_volatile") == (200, "OPTIONS,POST")
    assert await allow("rpc/add") == (200, "OPTIONS,GET,HEAD,POST")
    assert await allow("") == (200, "OPTIONS,GET,HEAD")
    assert (await allow("no_such_table"))[0] == 404
    assert (await allow("rpc/no_such_function"))[0] == 404


async def test_spaces_and_reserved_characters_in_names_over_http(api: Api) -> None:
    status, _, body = await api.get('Order%20Items?select=Unit%20Price,%22a.b(c)%22&Unit%20Price=lt.200')
    assert (status, body) == (200, [{"Unit Price": 150, "a.b(c)": "cheap"}]), body
    status, _, body = await api.get('Order%20Items?select=id&%22a.b(c)%22=eq.dear')
    assert (status, body) == (200, [{"id": 2}]), body


async def test_naming_an_aliased_embedding_by_its_relation_is_served_with_a_warning(api: Api) -> None:
    """As PostgREST 13+: the request still works, and a ``Warning: 299`` header says to use the alias."""
    status, headers, body = await api.get("authors?select=name,written:books(title)&id=eq.1&books.order=year.desc")
    assert status == 200 and body[0]["written"][0] == {"title": "The Dispossessed"}
    assert headers["Warning"].startswith("299 ") and headers["Warning"].endswith(
        '"Embedded resource was referenced by relation name even though it has an alias. This is deprecated '
        "and will stop working in a future release. Update `books` to `written` in query string filters, "
        'orders or limits."')
    _, headers, _ = await api.get("authors?select=name,written:books(title)&id=eq.1&written.order=year.desc")
    assert "Warning" not in headers
