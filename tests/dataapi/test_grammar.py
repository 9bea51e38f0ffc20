"""The request grammar on its own (no database): what parses into which plan, and what is refused
with which PGRST code, including property tests that no input escapes as anything but an ApiError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataapi.auth import Authenticator, ConfigError, parse_claim_path
from dataapi.errors import ApiError, from_postgres, pg_status
from dataapi.request import (
    Column,
    Embed,
    Field,
    Filter,
    JsonStep,
    Logic,
    Star,
    negotiate,
    parse_order,
    parse_prefer,
    parse_query,
    parse_range,
    parse_select,
)


def test_select_items() -> None:
    items = parse_select("id,name:title,price::text,meta->a->>b,n:amount.sum(),count(),"
                         "writer:authors!books_author_id_fkey!inner(name,books(*)),...publishers(pub:name)")
    assert items[0] == Column(Field("id"))
    assert items[1] == Column(Field("title"), alias="name")
    assert items[2] == Column(Field("price"), cast="text")
    assert items[3] == Column(Field("meta", (JsonStep("->", "a"), JsonStep("->>", "b"))))
    assert items[3].field.default_alias == "b"
    assert items[4] == Column(Field("amount"), alias="n", aggregate="sum")
    assert items[5] == Column(Field(""), aggregate="count")
    embed = items[6]
    assert isinstance(embed, Embed) and embed.relation == "authors" and embed.alias == "writer"
    assert embed.hint == "books_author_id_fkey" and embed.join == "inner" and not embed.spread
    assert embed.select[1] == Embed("books", None, None, None, False, [Star()])
    spread = items[7]
    assert isinstance(spread, Embed) and spread.spread and spread.select == [Column(Field("name"), alias="pub")]


def test_filters_logic_and_paths() -> None:
    q = parse_query([("id", "not.in.(1,\"2,3\")"), ("books.year", "gte.2000"), ("data->>k", "eq.v"),
                     ("or", "(a.eq.1,and(b.not.is.null,c.like(any).{x*,y*}))"), ("not.and", "(a.eq.1,b.eq.2)"),
                     ("title", "fts(english).cat"), ("books.order", "year.desc.nullslast"), ("books.limit", "2")])
    assert q.conditions[()][0] == Filter(Field("id"), "in", ("1", "2,3"), negate=True)
    assert q.conditions[("books",)] == [Filter(Field("year"), "gte", "2000")]
    assert q.conditions[()][1] == Filter(Field("data", (JsonStep("->>", "k"),)), "eq", "v")
    tree = q.conditions[()][2]
    assert isinstance(tree, Logic) and tree.op == "or" and isinstance(tree.children[1], Logic)
    assert tree.children[1].children[0] == Filter(Field("b"), "is", "null", negate=True)
    assert tree.children[1].children[1] == Filter(Field("c"), "like", ("x*", "y*"), quantifier="any")
    assert q.conditions[()][3] == Logic("and", (Filter(Field("a"), "eq", "1"), Filter(Field("b"), "eq", "2")),
                                        negate=True)
    assert q.conditions[()][4] == Filter(Field("title"), "fts", "cat", language="english")
    assert q.order[("books",)][0].desc and q.order[("books",)][0].nulls == "last"
    assert q.limit[("books",)] == 2


def test_rpc_arguments_are_not_filters() -> None:
    q = parse_query([("a", "1"), ("b", "eq.2")], frozenset({"a"}))
    assert q.rpc_args == {"a": "1"} and q.conditions[()] == [Filter(Field("b"), "eq", "2")]


def test_order_terms() -> None:
    terms = parse_order("a,b.desc,c.nullsfirst,authors(name).desc")
    assert [(t.field.name, t.desc, t.nulls, t.relation) for t in terms] == [
        ("a", False, None, None), ("b", True, None, None), ("c", False, "first", None), ("name", True, None, "authors")]


@pytest.mark.parametrize("params", [
    [("id", "bogus.1")], [("id", "in.1,2")], [("id", "is.maybe")], [("id", "eq(some).{1}")],
    [("or", "(a.eq.1")], [("or", "a.eq.1")], [("or", "()")], [("select", "a,,b")], [("select", "a::int;drop")],
    [("select", "...a")], [("order", "a.up")], [("limit", "x")], [("offset", "-1")], [("or", "(" * 100 + ")" * 100)],
    [("title", "fts(bad lang).x")],
])
def test_grammar_errors_are_pgrst100(params: list[tuple[str, str]]) -> None:
    with pytest.raises(ApiError) as e:
        parse_query(params)
    assert e.value.status == 400 and e.value.code == "PGRST100"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["select", "order", "or", "id", "not.and", "books.limit", "x->>y"]),
                          st.text(alphabet="abc.,()!:*\"{}-><_ 0123456789", max_size=40)), max_size=4))
def test_any_query_string_parses_or_is_a_400(params: list[tuple[str, str]]) -> None:
    try:
        parse_query(params)
    except ApiError as e:
        assert e.status == 400 and e.code in ("PGRST100", "PGRST104")


def test_a_filter_without_operator_is_pgrst104() -> None:
    with pytest.raises(ApiError) as e:
        parse_query([("id", "0")])
    assert (e.value.code, e.value.message, e.value.details) == (
        "PGRST104", "Unexpected param or filter missing operator", 'Failed to parse [("id","0")]')


def test_prefer_range_and_accept() -> None:
    p = parse_prefer(["return=representation, count=exact", "resolution=merge-duplicates,tx=rollback,foo=bar"])
    assert (p.return_, p.count, p.resolution, p.tx) == ("representation", "exact", "merge-duplicates", "rollback")
    with pytest.raises(ApiError) as e:
        parse_prefer(["handling=strict, foo=bar"])
    assert e.value.code == "PGRST122"
    assert parse_range("0-9") == (0, 10) and parse_range("items=5-") == (5, None) and parse_range("junk") is None
    with pytest.raises(ApiError) as e:
        parse_range("9-3")
    assert e.value.status == 416
    assert negotiate("text/csv;q=0.5, application/json") == "application/json"
    assert negotiate("application/vnd.pgrst.object") == "application/vnd.pgrst.object+json"
    with pytest.raises(ApiError):
        negotiate("image/png")


def test_status_from_sqlstate() -> None:
    assert [pg_status(s, authenticated=True) for s in ("23505", "23503", "42P01", "42883", "25006", "P0001",
                                                        "P0002", "53300", "53400", "08006", "22P02", "PT418")] == [
        409, 409, 404, 404, 405, 400, 500, 503, 500, 503, 400, 418]
    assert pg_status("42501", authenticated=False) == 401 and pg_status("42501", authenticated=True) == 403

    class Raised(Exception):
        sqlstate = "PGRST"
        message = '{"code":"123","message":"Payment Required","details":"Quota","hint":"Upgrade"}'
        detail = '{"status":402,"headers":{"X-Powered-By":"Nerd Rage"}}'
        hint = None

    err = from_postgres(Raised(), authenticated=True)
    assert (err.status, err.code, err.headers) == (402, "123", {"X-Powered-By": "Nerd Rage"})
    Raised.detail = "not json"
    assert from_postgres(Raised(), authenticated=True).code == "PGRST121"


def test_role_claim_paths() -> None:
    assert parse_claim_path(".role") == ("role",)
    assert parse_claim_path("role") == ("role",)
    assert parse_claim_path('.app.roles[1]."https://x.io/r"') == ("app", "roles", 1, "https://x.io/r")
    import jwt
    secret = "s" * 40
    auth = Authenticator(secret, None, ".app.roles[1]")
    ident = auth.authenticate("Bearer " + jwt.encode({"app": {"roles": ["a", "web_user"]}}, secret, "HS256"))
    assert ident.role == "web_user" and ident.authenticated
    with pytest.raises(ApiError) as e:
        auth.authenticate(None)
    assert e.value.code == "PGRST302" and e.value.headers == {"WWW-Authenticate": "Bearer"}
    with pytest.raises(ConfigError):
        Authenticator("short", None)


def test_jwks_file_with_an_rsa_key(tmp_path) -> None:  # noqa: ANN001
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    auth = Authenticator(str(path), "anon")
    tok = jwt.encode({"role": "web_user"}, key, algorithm="RS256", headers={"kid": "k1"})
    assert auth.authenticate(f"Bearer {tok}").role == "web_user"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"role": "web_user"}, other, algorithm="RS256", headers={"kid": "k1"})
    with pytest.raises(ApiError) as e:
        auth.authenticate(f"Bearer {forged}")
    assert e.value.status == 401 and e.value.code == "PGRST301"


def test_jwks_file_with_an_ec_key(tmp_path) -> None:  # noqa: ANN001
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    auth = Authenticator(str(path), None)
    tok = jwt.encode({"role": "web_user", "exp": 4102444800}, key, algorithm="ES256")
    assert auth.authenticate(f"Bearer {tok}").role == "web_user"
    hs = jwt.encode({"role": "web_user"}, "x" * 40, algorithm="HS256")
    with pytest.raises(ApiError) as e:
        auth.authenticate(f"Bearer {hs}")  # an HMAC token cannot pass for a JWKS key
    assert e.value.code == "PGRST301"


AUD_SECRET = "an-audience-test-secret-long-enough-for-hs256"


@pytest.mark.parametrize(("aud", "ok"), [
    ("youraudience", True), ("notyouraudience", False), ("", False),
    (["youraudience"], True), (["notyouraudience", "youraudience", "anotheraudience"], True),
    (["notyouraudience"], False), (["notyouraudience", "stillnotyouraudience"], False),
    ([], True), (None, True), ("absent", True)])
def test_jwt_audience_as_postgrest_checks_it(aud: object, ok: bool) -> None:
    """PostgREST's AudienceJwtSecretSpec: with jwt-aud set, a token's aud must name it (absent, null
    and [] pass); a mismatch is 401 PGRST303 "JWT not in audience". Without jwt-aud, aud is ignored."""
    import jwt

    claims: dict[str, object] = {"role": "web_user", "exp": 9999999999}
    if aud != "absent":
        claims["aud"] = aud
    tok = "Bearer " + jwt.encode(claims, AUD_SECRET, algorithm="HS256")
    checked = Authenticator(AUD_SECRET, None, audience="youraudience")
    if ok:
        assert checked.authenticate(tok).role == "web_user"
    else:
        with pytest.raises(ApiError) as e:
            checked.authenticate(tok)
        assert (e.value.status, e.value.code, e.value.message, e.value.details) == (
            401, "PGRST303", "JWT not in audience", None)
        assert e.value.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert Authenticator(AUD_SECRET, None).authenticate(tok).role == "web_user"


async def test_jwks_from_a_url_with_kid_selection_and_rotation() -> None:
    """A JWKS URL: fetched on first use, the key picked by kid; a rotated key (a kid it has not
    seen) is fetched again; an unknown kid does not refetch more often than JWKS_RETRY."""
    import json

    import jwt
    from aiohttp import web
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    from dataapi import auth as auth_module

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())

    def jwk(alg: type, key: object, kid: str) -> dict:
        out = json.loads(alg.to_jwk(key.public_key()))  # type: ignore[attr-defined]
        out["kid"] = kid
        return out

    served = {"keys": [jwk(RSAAlgorithm, rsa_key, "r1")]}
    fetches = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        return web.json_response(served)

    app = web.Application()
    app.router.add_get("/jwks.json", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        auth = Authenticator(f"http://127.0.0.1:{port}/jwks.json", None)
        tok = "Bearer " + jwt.encode({"role": "web_user"}, rsa_key, algorithm="RS256", headers={"kid": "r1"})
        await auth.refresh(tok)
        assert auth.authenticate(tok).role == "web_user" and fetches == 1
        await auth.refresh(tok)
        assert fetches == 1  # fresh and holding r1: no fetch
        # The issuer rotates to an EC key; a token naming it makes the next request fetch again.
        served = {"keys": [jwk(RSAAlgorithm, rsa_key, "r1"), jwk(ECAlgorithm, ec_key, "e2")]}
        auth._fetched_at -= auth_module.JWKS_RETRY
        ec_tok = "Bearer " + jwt.encode({"role": "ec_user"}, ec_key, algorithm="ES256", headers={"kid": "e2"})
        await auth.refresh(ec_tok)
        assert auth.authenticate(ec_tok).role == "ec_user" and fetches == 2
        # Forged kids right after a fetch: no new fetch, and a 401.
        forged = "Bearer " + jwt.encode({"role": "x"}, ec_key, algorithm="ES256", headers={"kid": "nope"})
        await auth.refresh(forged)
        assert fetches == 2
        with pytest.raises(ApiError) as e:
            auth.authenticate(forged)
        assert e.value.status == 401 and e.value.code == "PGRST301"
        # An HS token signed with the public key's text is refused (algorithm confusion).
        hs = "Bearer " + jwt.encode({"role": "web_user"}, "x" * 40, algorithm="HS256", headers={"kid": "r1"})
        with pytest.raises(ApiError) as e:
            auth.authenticate(hs)
        assert e.value.code == "PGRST301"
    finally:
        await runner.cleanup()
    unreachable = Authenticator(f"http://127.0.0.1:{port}/jwks.json", None)  # the server is gone now
    await unreachable.refresh(tok)
    with pytest.raises(ApiError) as e:
        unreachable.authenticate(tok)
    assert e.value.status == 500 and e.value.code == "PGRST300" and "could not be fetched" in (e.value.details or "")
    with pytest.raises(ConfigError):
        Authenticator("http://keys.example.com/jwks.json", None)  # only https:// from elsewhere


def test_verified_tokens_are_cached_until_they_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgREST's JWT cache: a token seen again is not verified again, but its entry never outlives
    the token's exp (plus the leeway): past it, the token is verified again (and so refused once
    PyJWT's clock agrees it expired)."""
    import time

    import jwt

    from dataapi import auth as auth_module

    auth = Authenticator(AUD_SECRET, None)
    now = time.time()
    tok = "Bearer " + jwt.encode({"role": "web_user", "exp": int(now) + 60}, AUD_SECRET, algorithm="HS256")
    calls = 0
    real_decode = jwt.decode

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(auth_module.jwt, "decode", counting)
    first = auth.authenticate(tok)
    assert auth.authenticate(tok) is first and calls == 1
    monkeypatch.setattr(auth_module.time, "time", lambda: now + 60 + auth_module.LEEWAY_SECONDS + 1)
    auth.authenticate(tok)  # PyJWT's own clock still says valid; ours says the entry is over
    assert calls == 2
    expired = "Bearer " + jwt.encode({"role": "web_user", "exp": int(now) - 3600}, AUD_SECRET, algorithm="HS256")
    for _ in range(2):  # a refused token is never cached
        with pytest.raises(ApiError) as e:
            auth.authenticate(expired)
        assert (e.value.status, e.value.code) == (401, "PGRST303")


def test_names_with_spaces_and_quoted_names_with_reserved_characters() -> None:
    """PostgREST reads an unquoted name with inner spaces as it is, and a double-quoted name may hold
    its reserved characters (``, . : ( ) *``) in select, in filter keys and before a cast or arrow."""
    assert parse_select("Unit Price,x:Unit Price::text") == [
        Column(Field("Unit Price")), Column(Field("Unit Price"), "x", "text")]
    assert parse_select('":a->b::c","(in,side)","a.b"::text,"q"->>k') == [
        Column(Field(":a->b::c")), Column(Field("(in,side)")), Column(Field("a.b"), None, "text"),
        Column(Field("q", (JsonStep("->>", "k"),)))]
    q = parse_query([('"*id*"', "eq.1"), ("Unit Price", "lt.200"), ('"a.b"', "is.null")])
    assert [f.field.name for f in q.conditions[()]] == ["*id*", "Unit Price", "a.b"]  # type: ignore[union-attr]
    for bad in ('"a"b', " ", '"unclosed'):
        with pytest.raises(ApiError) as e:
            parse_select(bad)
        assert e.value.code == "PGRST100"


def test_json_path_keys_and_indexes_as_postgrest_names_them() -> None:
    """A selected JSON path is named after its last key, array indexes skipped; a negative index is
    ``-`` and digits, anything else after a ``-`` is a parse error (PGRST100)."""
    names = [c.field.default_alias for c in parse_select("data->>0,data->1->c->>2,meta->a->-1,x")]  # type: ignore[union-attr]
    assert names == ["data", "c", "a", "x"]
    with pytest.raises(ApiError) as e:
        parse_select("data->>--34")
    assert (e.value.code, e.value.details) == ("PGRST100", 'unexpected "-" expecting digit')
