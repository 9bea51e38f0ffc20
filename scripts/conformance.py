"""Run an outside PostgREST conformance suite (milmazz/postgrest-conformance's layout) against our
Data API, and say per area how much of it passes.

A dev tool, not part of ``make test``: the cases and fixtures are other people's and stay outside
this repository. Point ``--suite`` at a directory holding ``cases/*.yaml`` and ``fixtures/``
(``01_roles.sql``, ``02_base.sql``, ``05_corrections.sql``; ``04_postgis.sql`` and the generated
``06_area_schemas.sql`` are not used: PostGIS is not installed, and the area schemas are built
here, each relation of ``test`` mirrored as a view and each function as a wrapper).

What it does, following the suite's HARNESS.md:

* starts a store and one compute in a scratch directory, creates database ``conformance`` (C
  collation), loads the fixtures as ``conformance_owner`` (a plain role that owns everything);
* serves the Data API in this process, one instance per server configuration the suite asks for:
  "bulk" (no token needed: the anonymous role is ``conformance_owner``, which stands for
  PostgREST's connecting role, since ours never runs requests as its own superuser), "auth" (anon
  ``postgrest_test_anonymous``, the HS256 secret, pre-request ``auth.switch_role``) and one per case
  whose ``config:`` we can express. All of them end every transaction with ``data_api_tx_end =
  rollback``, as the harness's ``db-tx-end`` does, so no write leaks into the next case;
* sends each case's request raw to ``http://127.0.0.1:PORT/main/conformance/rest/v1`` + its path
  and checks every ``expect`` key with HARNESS.md's semantics.

    .venv/bin/python scripts/conformance.py --suite /tmp/conformance [--area operators] [-v]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import urllib.parse
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import jwt
import yaml
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute import EndpointConfig, Endpoints  # noqa: E402
from dataapi import ConfigError, DataAPI, DataAPIConfig  # noqa: E402
from dataapi.local import LocalComputes  # noqa: E402
from storage import Store  # noqa: E402
from storage.postgres import find_binaries, resolve_service_user  # noqa: E402

DATABASE = "conformance"
OWNER = "conformance_owner"
SECRET = "reallyreallyreallyreallyverysafe"
SCHEMAS = ("test", "operators", "ordering", "pagination", "representations", "mutations", "rpc", "headers",
           "config", "openapi", "domain_representations", "observability", "auth", "v1", "v2",
           'SPECIAL "@/\\#~_-', "تست")
AREA_SCHEMAS = ("auth", "config", "domain_representations", "headers", "mutations", "operators", "ordering",
                "pagination", "representations", "rpc")
ROLES = ("postgrest_test_anonymous", "postgrest_test_default_role", "postgrest_test_author")
BULK = DataAPIConfig(schemas=SCHEMAS, anon_role=OWNER, plan_enabled=True, tx_end="rollback", pool_size=4)
AUTH = replace(BULK, anon_role="postgrest_test_anonymous", jwt_secret=SECRET, pre_request="auth.switch_role")
RSA_JWK = ('{"alg":"RS256","e":"AQAB","key_ops":["verify"],"kty":"RSA","n":"0etQ2Tg187jb04MWfpuogYGV75IFrQQBxQa'
           'GH75eq_FpbkyoLcEpRUEWSbECP2eeFya2yZ9vIO5ScD-lPmovePk4Aa4SzZ8jdjhmAbNykleRPCxMg0481kz6PQhnHRUv3nF5WP47'
           '9CnObJKqTVdEagVL66oxnX9VhZG9IZA7k0Th5PfKQwrKGyUeTGczpOjaPqbxlunP73j9AfnAt4XCS8epa-n3WGz1j-wfpr_ys57Aq-z'
           'BCfqP67UYzNpeI1AoXsJhD9xSDOzvJgFRvc3vm2wjAW4LEMwi48rCplamOpZToIHEPIaPzpveYQwDnB1HFTR1ove9bpKJsHmi-e2u'
           'zQ","use":"sig"}')
# Schema labels that name no schema (HARNESS.md §3.4, INDEX.md's label caveats): the reference harness
# resolves them through aliases and profile lists PostgREST does not have; upstream's own tests ran
# them on a server exposing exactly these schemas, which is what we do (and send no Accept-Profile).
LABELS = {"unicode": ("تست",), "multi": ("v1", "v2", 'SPECIAL "@/\\#~_-')}
# Per-case options HARNESS.md §2.5 adds outside the case file.
EXTRA = {1654: {"db-schemas": "openapi_no_comment"}, 1764: {"jwt-secret": None}}


class Unsupported(Exception):
    """A case needs something this runner or our server cannot be configured for (listed as skipped)."""


# --- the database -------------------------------------------------------------------------------

async def load_fixtures(endpoints: Endpoints, fixtures: Path) -> None:
    addr = await endpoints.ensure_ready("main")

    async def admin(database: str) -> asyncpg.Connection:
        return await asyncpg.connect(host=addr.socket_dir, port=addr.port, user="lakelet_admin", database=database)

    conn = await admin("postgres")
    try:
        await conn.execute((fixtures / "01_roles.sql").read_text())
        await conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {DATABASE} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' "
                           "LC_CTYPE 'C'")
        await conn.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OWNER}') THEN "
                           f"CREATE ROLE {OWNER}; END IF; END $$")
        await conn.execute(f"ALTER DATABASE {DATABASE} OWNER TO {OWNER}")
    finally:
        await conn.close()
    conn = await admin(DATABASE)
    try:
        await conn.execute(f"SET ROLE {OWNER}; SET timezone = 'UTC'")
        for name in ("02_base.sql", "03_supplement.sql", "05_corrections.sql"):
            if (fixtures / name).exists():
                await conn.execute((fixtures / name).read_text())
        await conn.execute("SET search_path = ''")
        for area in AREA_SCHEMAS:
            for statement in await mirror_statements(conn, area):
                try:
                    await conn.execute(statement)
                except asyncpg.PostgresError as e:
                    print(f"mirror: {e} in {statement[:200]}", file=sys.stderr)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def mirror_statements(conn: asyncpg.Connection, area: str) -> list[str]:
    """``area`` as the suite's generated area schemas have it: every relation of ``test`` as a view
    (auto-updatable), every function as a wrapper over the original, rows types mapped to the views."""
    out = [f"CREATE SCHEMA IF NOT EXISTS {qi(area)}",
           f"GRANT USAGE ON SCHEMA {qi(area)} TO {', '.join(ROLES)}"]
    relations = [r["relname"] for r in await conn.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'test'::regnamespace AND relkind IN ('r','v','m','p') "
        "ORDER BY oid")]
    for rel in relations:
        out.append(f"CREATE VIEW {qi(area)}.{qi(rel)} AS SELECT * FROM test.{qi(rel)}")
        for role in ROLES:
            privs = [p for p in ("SELECT", "INSERT", "UPDATE", "DELETE") if await conn.fetchval(
                "SELECT has_table_privilege($1, format('test.%I', $2::text), $3)", role, rel, p)]
            if privs:
                out.append(f"GRANT {', '.join(privs)} ON {qi(area)}.{qi(rel)} TO {role}")
    rowtypes = {f"test.{qi(r)}" if not re.fullmatch(r"[a-z_][a-z0-9_]*", r) else f"test.{r}": r for r in relations}

    def remap(text: str) -> str:
        for qualified, rel in sorted(rowtypes.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(re.escape(qualified) + r"(?![\w\"])", f"{qi(area)}.{qi(rel)}", text)
        return text

    for f in await conn.fetch(
            "SELECT p.oid, p.proname, pg_get_function_arguments(p.oid) AS args, "
            "pg_get_function_result(p.oid) AS result, p.provolatile::text AS provolatile, p.proretset, p.pronargs, "
            "p.proargnames, p.proargmodes::text[] AS proargmodes, p.proargtypes::oid[] AS types, "
            "p.prorettype::regtype::text AS rettype "
            "FROM pg_proc p WHERE p.pronamespace = 'test'::regnamespace AND p.prokind = 'f' ORDER BY p.oid"):
        if f["rettype"] == "trigger" or "any" in f["args"]:
            continue
        names = list(f["proargnames"] or [])
        modes = list(f["proargmodes"] or ["i"] * f["pronargs"])
        call = []
        for i, mode in enumerate(modes):
            if mode in ("i", "b", "v"):
                n = names[i] if i < len(names) and names[i] else ""
                ref = qi(n) if n else f"${len(call) + 1}"
                call.append(("VARIADIC " if mode == "v" else "") + ref)
        args = remap(f["args"])
        computed = False
        first = f["types"][0] if f["types"] else None
        if first is not None and f["pronargs"] == 1:
            reltype = await conn.fetchval("SELECT c.relname FROM pg_class c WHERE c.reltype = $1 "
                                          "AND c.relnamespace = 'test'::regnamespace", first)
            if reltype is not None:  # a computed field or relationship: take the area's row, pass test's
                call = [f"CAST(ROW(r.*) AS test.{qi(reltype)})"]
                args = f"r {qi(area)}.{qi(reltype)}"
                computed = True
        if not computed and args != f["args"]:
            continue  # a row of test's type among several arguments: an aggregate's helper, not an API
        result = remap(f["result"])
        body = (f"SELECT * FROM test.{qi(f['proname'])}({', '.join(call)})"
                if f["proretset"] or "OUT " in f["args"] or "INOUT " in f["args"] or result.startswith("TABLE")
                else f"SELECT test.{qi(f['proname'])}({', '.join(call)})")
        vol = {"i": "IMMUTABLE", "s": "STABLE", "v": "VOLATILE"}[f["provolatile"]]
        out.append(f"CREATE FUNCTION {qi(area)}.{qi(f['proname'])}({args}) RETURNS {result} LANGUAGE sql {vol} "
                   f"AS $mirror$ {body} $mirror$")
        anon_ok = await conn.fetchval("SELECT has_function_privilege('postgrest_test_anonymous', $1::oid, "
                                      "'EXECUTE')", f["oid"])
        if not anon_ok:
            sig = f"{qi(area)}.{qi(f['proname'])}({args})"
            sig = re.sub(r"\s+DEFAULT\s+[^,]+", "", sig)
            out.append(f"REVOKE EXECUTE ON FUNCTION {sig} FROM PUBLIC")
            for role in ROLES:
                if await conn.fetchval("SELECT has_function_privilege($1, $2::oid, 'EXECUTE')", role, f["oid"]):
                    out.append(f"GRANT EXECUTE ON FUNCTION {sig} TO {role}")
    return out


# --- server configurations ----------------------------------------------------------------------

def is_auth_case(case: dict) -> bool:
    path = case["request"]["path"]
    return case.get("schema") in ("auth", "openapi") or path == "/" or path.startswith("/?")


def config_for(case: dict, scratch: Path) -> DataAPIConfig:
    base = AUTH if is_auth_case(case) else BULK
    if case.get("schema") in LABELS:
        base = replace(base, schemas=LABELS[case["schema"]])
    wanted = {**(case.get("config") or {}), **EXTRA.get(case["id"], {})}
    for key, value in wanted.items():
        if key == "jwt-aud":
            base = replace(base, jwt_aud=value or "")
        elif key == "jwt-secret":
            if value in ("asymmetric_jwk_public_key", "asymmetric_jwks_public_key"):
                jwk = RSA_JWK if value.endswith("jwk_public_key") else '{"keys":[' + RSA_JWK + "]}"
                path = scratch / f"jwks-{case['id']}.json"
                path.write_text(jwk)
                value = str(path)
            base = replace(base, jwt_secret=value or "")
        elif key == "db-anon-role":
            base = replace(base, anon_role=value or "")
        elif key == "jwt-role-claim-key":
            base = replace(base, jwt_role_claim=value[1:] if value.startswith("$") else value)
        elif key == "db-schemas":
            base = replace(base, schemas=tuple([value] if isinstance(value, str) else value))
        elif key == "log-level":
            continue
        else:
            raise Unsupported(f"config {key}={value!r} has no Lakelet setting")
    return base


# --- requests and assertions --------------------------------------------------------------------

SAFE = "!#$&'()*+,-./:;=?@[]_~%"


def wire_path(path: str) -> str:
    """The case's request target, with only what HTTP cannot carry raw percent-encoded (HARNESS §3.2):
    spaces, quotes, non-ASCII, a % that starts no escape."""
    path = re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", path)
    return urllib.parse.quote(path, safe=SAFE)


def request_headers(case: dict) -> list[tuple[str, str]]:
    req = case["request"]
    headers = [(k, str(v)) for k, v in (req.get("headers") or {}).items()]
    names = {k.lower() for k, _ in headers}
    schema = case.get("schema")
    if schema not in (None, "public", "test", *LABELS) and "accept-profile" not in names:
        headers.append(("Accept-Profile", schema))
    if req.get("jwt") and "authorization" not in names:
        spec = req["jwt"]
        if spec.get("sign_with") != "hs256_test_secret":
            raise Unsupported(f"jwt sign_with {spec.get('sign_with')!r}")
        headers.append(("Authorization", "Bearer " + jwt.encode(spec.get("payload") or {}, SECRET, "HS256")))
    return headers


def request_body(req: dict) -> bytes | None:
    if "body_raw" in req:
        return str(req["body_raw"]).encode()
    if "body_json" in req:
        return json.dumps(req["body_json"]).encode()
    if "body" in req:
        body = req["body"]
        return (body if isinstance(body, str) else json.dumps(body)).encode()
    return None


def folded(headers: Any, name: str) -> str | None:
    values = headers.getall(name, [])
    if not values:
        return None
    if name.lower() == "proxy-status":
        # A deliberate divergence: the server names itself (RFC 9209's first member), so the
        # expectation's "PostgREST; error=…" is read as "Lakelet; error=…".
        values = [v.replace("Lakelet;", "PostgREST;", 1) if v.startswith("Lakelet;") else v for v in values]
    return ("\n" if name.lower() == "set-cookie" else ", ").join(values)


def jsonpath(doc: Any, path: str) -> list[Any]:
    """The values at a simple JSONPath (``$``, ``.key``, ``["key"]``, ``[n]``, ``[*]``)."""
    if not path.startswith("$"):
        raise Unsupported(f"jsonpath {path!r}")
    nodes = [doc]
    for m in re.finditer(r"\.([^.\[]+)|\[(\d+)\]|\[\*\]|\[['\"]([^'\"]+)['\"]\]", path[1:]):
        key, index, quoted = m.group(1) or m.group(3), m.group(2), m.group(0) == "[*]"
        nxt = []
        for n in nodes:
            if quoted and isinstance(n, list):
                nxt.extend(n)
            elif index is not None and isinstance(n, list) and int(index) < len(n):
                nxt.append(n[int(index)])
            elif key is not None and isinstance(n, dict) and key in n:
                nxt.append(n[key])
        nodes = nxt
    return nodes


def check(expect: dict, status: int, reason: str, headers: Any, body: bytes) -> list[str]:
    """Every ``expect`` key with HARNESS.md §4's meaning; the differences, empty when the case passes."""
    diffs: list[str] = []
    text = body.decode("utf-8", "replace")

    def decoded() -> Any:
        try:
            return json.loads(text)
        except ValueError:
            return f"<not JSON: {text[:200]!r}>"

    for key, want in expect.items():
        if key == "status":
            if status != want:
                diffs.append(f"status {status} != {want}")
        elif key == "status_text":
            if reason != want:
                diffs.append(f"reason {reason!r} != {want!r}")
        elif key == "headers":
            for name, value in want.items():
                got = folded(headers, name)
                if got != str(value):
                    diffs.append(f"header {name}: {got!r} != {str(value)!r}")
        elif key == "headers_present":
            diffs += [f"header {n} missing" for n in want if folded(headers, n) is None]
        elif key == "headers_absent":
            diffs += [f"header {n} present: {folded(headers, n)!r}" for n in want if folded(headers, n) is not None]
        elif key == "headers_match":
            for name, pattern in want.items():
                got = folded(headers, name)
                if got is None or not re.search(pattern, got):
                    diffs.append(f"header {name}: {got!r} !~ {pattern!r}")
        elif key == "headers_absent_in_value":
            for name, subs in want.items():
                got = folded(headers, name) or ""
                diffs += [f"header {name} contains {s!r}" for s in subs if s in got]
        elif key == "headers_no_blank":
            if want:
                diffs += [f"header {k} is blank" for k, v in headers.items() if not v.strip()]
        elif key in ("body_exact", "body_json"):
            if want is None:
                if body:
                    diffs.append(f"body {text[:300]!r} != empty")
            elif decoded() != want:
                diffs.append(f"body {text[:600]} != {json.dumps(want)[:600]}")
        elif key == "body_contains":
            for s in [want] if isinstance(want, str) else want:
                if s not in text:
                    diffs.append(f"body lacks {s!r}: {text[:300]!r}")
        elif key == "body_raw":
            if text != want:
                diffs.append(f"body {text[:300]!r} != {want[:300]!r}")
        elif key == "body_jsonpath":
            doc = decoded()
            for entry in want:
                found = jsonpath(doc, entry["path"])
                if "equals" in entry and (not found or found[0] != entry["equals"]):
                    diffs.append(f"{entry['path']}: {found[:1]} != {entry['equals']!r}")
                if (entry.get("present") or entry.get("exists")) and not found:
                    diffs.append(f"{entry['path']} absent")
                if entry.get("absent") and found:
                    diffs.append(f"{entry['path']} present: {found[:1]}")
        else:
            raise Unsupported(f"expect key {key!r}")
    return diffs


# --- the run ------------------------------------------------------------------------------------

def area_of(case: dict) -> str:
    return str(case.get("feature", "?")).split("/")[0]


async def run(args: argparse.Namespace) -> int:
    suite = Path(args.suite)
    cases = []
    loaded = [c for f in sorted((suite / "cases").glob("*.yaml")) for c in yaml.safe_load_all(f.read_text()) if c]
    for case in sorted(loaded, key=lambda c: c["id"]):
        if args.area and area_of(case) not in args.area:
            continue
        if args.id and case["id"] not in args.id:
            continue
        cases.append(case)
    service_user, pg = resolve_service_user(None), find_binaries()
    with tempfile.TemporaryDirectory(prefix="lakelet-conformance-", dir="/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        store = Store.open(root / "store", user=service_user, pg=pg)
        store.bootstrap()
        endpoints = Endpoints(store, computes_dir=root / "computes", user=service_user, pg=pg,
                              config=EndpointConfig(suspend_timeout=3600), registry=CollectorRegistry())
        await endpoints.start()
        apis: dict[DataAPIConfig, DataAPI] = {}
        session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60))
        results: dict[str, Counter] = defaultdict(Counter)
        failures: list[tuple[int, str, list[str]]] = []
        skipped: list[tuple[int, str, str]] = []
        try:
            await load_fixtures(endpoints, suite / "fixtures")
            for case in cases:
                area, cid = area_of(case), case["id"]
                try:
                    if case.get("kind", "http") != "http":
                        raise Unsupported(f"kind {case.get('kind')}")
                    config = config_for(case, root)
                    if config not in apis:
                        try:
                            api = DataAPI(LocalComputes(endpoints), config)
                        except ConfigError as e:
                            raise Unsupported(f"our server refuses this configuration: {e}") from None
                        await api.start("127.0.0.1", 0)
                        apis[config] = api
                    req = case["request"]
                    url = f"http://127.0.0.1:{apis[config].port}/main/{DATABASE}/rest/v1" + wire_path(req["path"])
                    async with session.request(req["method"], aiohttp.client.URL(url, encoded=True),
                                               headers=request_headers(case), data=request_body(req),
                                               skip_auto_headers=("Accept-Encoding", "Content-Type", "Accept",
                                                                  "User-Agent")) as r:
                        body = await r.read()
                        diffs = check(case["expect"], r.status, r.reason or "", r.headers, body)
                except Unsupported as e:
                    skipped.append((cid, area, str(e)))
                    results[area]["skipped"] += 1
                    continue
                results[area]["passed" if not diffs else "failed"] += 1
                if diffs:
                    failures.append((cid, area, diffs))
                if args.verbose:
                    print(f"{cid} {'ok' if not diffs else 'FAIL'}", flush=True)
        finally:
            await session.close()
            for api in apis.values():
                await api.close()
            await endpoints.close()
            store.close()
    total = Counter()
    print(f"{'area':<24}{'run':>5}{'pass':>6}{'fail':>6}{'skip':>6}{'rate':>8}")
    for area in sorted(results):
        c = results[area]
        total.update(c)
        ran = c["passed"] + c["failed"]
        print(f"{area:<24}{ran:>5}{c['passed']:>6}{c['failed']:>6}{c['skipped']:>6}"
              f"{(100 * c['passed'] / ran if ran else 0):>7.1f}%")
    ran = total["passed"] + total["failed"]
    print(f"{'total':<24}{ran:>5}{total['passed']:>6}{total['failed']:>6}{total['skipped']:>6}"
          f"{(100 * total['passed'] / ran if ran else 0):>7.1f}%")
    if skipped:
        print("\nskipped:")
        for cid, area, why in skipped:
            print(f"  {cid} [{area}] {why}")
    if failures:
        print("\nfailures:")
        for cid, area, diffs in failures:
            print(f"  {cid} [{area}]")
            for d in diffs:
                print(f"      {d}")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="/tmp/conformance", help="directory with cases/ and fixtures/")
    parser.add_argument("--area", action="append", help="only this area (repeatable)")
    parser.add_argument("--id", action="append", type=int, help="only this case id (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
