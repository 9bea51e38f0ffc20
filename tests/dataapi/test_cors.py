"""Cross-origin requests from web pages: preflights answered without a database round trip, CORS
headers on every answer to a page of an allowed origin (errors included), none for other origins
or for requests that carry no Origin — PostgREST's policy (dataapi/cors.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from dataapi.cors import CorsPolicy
from tests.dataapi.conftest import Api, user_token

pytestmark = pytest.mark.timeout(120)

PAGE = "http://app.example.com"


@contextlib.contextmanager
def origins(api: Api, text: str) -> Iterator[None]:
    before = api.api.cors
    api.api.cors = CorsPolicy.parse(text)
    try:
        yield
    finally:
        api.api.cors = before


def lower(headers: dict) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


async def test_a_preflight_is_answered_for_any_origin_by_default(api: Api) -> None:
    status, headers, body = await api.request("OPTIONS", "books", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, prefer, content-type, x-app-id"})
    h = lower(headers)
    assert status == 200 and body == ""
    assert h["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in h
    assert "PATCH" in h["access-control-allow-methods"].split(", ")
    allowed = [v.lower() for v in h["access-control-allow-headers"].split(", ")]
    for name in ("authorization", "prefer", "content-type", "x-app-id", "accept"):
        assert allowed.count(name) == 1, allowed
    assert h["access-control-max-age"] == "86400"


async def test_a_preflight_for_a_table_that_does_not_exist_still_succeeds(api: Api) -> None:
    """The browser asks before it knows; the real request then gets the 404 it should, readable."""
    status, headers, _ = await api.request("OPTIONS", "no_such_table", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "GET"})
    assert status == 200 and lower(headers)["access-control-allow-origin"] == "*"
    status, headers, body = await api.get("no_such_table", headers={"Origin": PAGE})
    h = lower(headers)
    assert status == 404 and body["code"] == "PGRST205"  # type: ignore[index]
    assert h["access-control-allow-origin"] == "*"


async def test_answers_to_a_page_expose_the_paging_headers(api: Api) -> None:
    status, headers, body = await api.get("authors?select=id&order=id&limit=1", headers={
        "Origin": PAGE, "Prefer": "count=exact"})
    h = lower(headers)
    assert status == 206 and len(body) == 1  # type: ignore[arg-type]  # a part of a counted whole
    assert h["access-control-allow-origin"] == "*"
    exposed = h["access-control-expose-headers"].split(", ")
    assert "Content-Range" in exposed and "Location" in exposed
    assert h["content-range"].startswith("0-0/")


async def test_an_error_for_a_page_is_readable_too(api: Api) -> None:
    status, headers, body = await api.get("notes", headers={"Origin": PAGE, "Authorization": "Bearer not-a-jwt"})
    assert status == 401 and body["code"] == "PGRST301"  # type: ignore[index]
    assert lower(headers)["access-control-allow-origin"] == "*"


async def test_no_origin_no_cors_headers(api: Api) -> None:
    status, headers, _ = await api.get("authors?select=id&limit=1")
    assert status == 200
    assert not [k for k in lower(headers) if k.startswith("access-control-")]
    # A plain OPTIONS (no Origin) is the resource's own answer: which methods it takes.
    status, headers, _ = await api.request("OPTIONS", "authors")
    h = lower(headers)
    assert status == 200 and "PATCH" in h["allow"]
    assert not [k for k in h if k.startswith("access-control-")]


async def test_configured_origins_are_echoed_with_credentials_and_others_get_nothing(api: Api) -> None:
    with origins(api, "https://shop.example.com, http://localhost:5173"):
        status, headers, _ = await api.request("OPTIONS", "books", headers={
            "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"})
        h = lower(headers)
        assert status == 200
        assert h["access-control-allow-origin"] == "http://localhost:5173"
        assert h["access-control-allow-credentials"] == "true"
        status, headers, _ = await api.get("books?select=id&limit=1", token=user_token(),
                                           headers={"Origin": "https://shop.example.com"})
        h = lower(headers)
        assert status == 200 and h["access-control-allow-origin"] == "https://shop.example.com"
        # Another origin: served (the browser, not the server, keeps the answer from the page),
        # but with nothing that lets its page read it; its preflight is a plain OPTIONS.
        status, headers, body = await api.get("books?select=id&limit=1", headers={"Origin": "https://evil.example"})
        assert status == 200 and isinstance(body, list)
        assert not [k for k in lower(headers) if k.startswith("access-control-")]
        status, headers, _ = await api.request("OPTIONS", "books", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        h = lower(headers)
        assert status == 200 and "POST" in h["allow"]
        assert not [k for k in h if k.startswith("access-control-")]
