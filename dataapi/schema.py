"""The schema cache: what the exposed schemas hold, read once from ``pg_catalog`` into one immutable
value, swapped whole on reload (PostgREST's shape).

It answers the planner's questions — does this table exist, what are its columns and their types
(values are cast to them), its keys, how two tables relate (for embedding), what a function takes
and returns — without a round trip. It is loaded on the first request for a (branch, database) and
reloaded when the ``pgrst`` channel says ``reload schema``: an event trigger installed on first use
sends that after every DDL command, and users can send it themselves, as with PostgREST.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Literal

import asyncpg

from dataapi.errors import ApiError

NOTIFY_CHANNEL = "pgrst"

# Installed once per database when missing: every DDL command ends with NOTIFY pgrst; and the check,
# made as the admin role at the start of every request, that the token's role is no superuser and no
# predefined pg_ role (pg_read_server_files, pg_execute_server_program, … would reach the OS).
INSTALLED_SQL = """
SELECT to_regprocedure('lakelet_dataapi.check_role(text)') IS NOT NULL
   AND (SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'lakelet_dataapi_%') = 2
"""
INSTALL_SQL = """
CREATE SCHEMA IF NOT EXISTS lakelet_dataapi;
REVOKE ALL ON SCHEMA lakelet_dataapi FROM PUBLIC;
CREATE OR REPLACE FUNCTION lakelet_dataapi.notify_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('pgrst', 'reload schema'); END $$;
CREATE OR REPLACE FUNCTION lakelet_dataapi.check_role(wanted text) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN
  IF wanted LIKE 'pg\\_%' OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = wanted AND rolsuper) THEN
    RAISE EXCEPTION 'permission denied to set role "%"', wanted USING ERRCODE = '42501',
      HINT = 'The Data API runs requests neither as a superuser nor as a predefined pg_ role';
  END IF;
END $$;
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'lakelet_dataapi_ddl') THEN
    CREATE EVENT TRIGGER lakelet_dataapi_ddl ON ddl_command_end
      EXECUTE FUNCTION lakelet_dataapi.notify_ddl();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'lakelet_dataapi_drop') THEN
    CREATE EVENT TRIGGER lakelet_dataapi_drop ON sql_drop
      EXECUTE FUNCTION lakelet_dataapi.notify_ddl();
  END IF;
END $$;
"""


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str            # regtype text: safe to splice after ``::`` (Postgres quotes it)
    nullable: bool
    default: str | None  # the default expression, as Postgres prints it
    generated: bool = False
    base: str = ""       # for a domain, the type its chain of domains ends at (PostgREST's base type)


@dataclass(frozen=True)
class TableInfo:
    schema: str
    name: str
    kind: str                     # r, v, m, f, p (relkind), or "c" for a function's result type
    columns: dict[str, ColumnInfo]
    pk: tuple[str, ...] = ()
    uniques: tuple[tuple[str, ...], ...] = ()
    description: str | None = None
    events: int = 28  # pg_relation_is_updatable: UPDATE 4, INSERT 8, DELETE 16 (a view may allow fewer)
    # Computed fields: functions of this table's row type (full_name(authors) → select=full_name),
    # name → (function schema, function name, return type). Filled once, while loading.
    computed: dict[str, tuple[str, str, str]] = field(default_factory=dict, compare=False)

    @property
    def qualified(self) -> tuple[str, str]:
        return (self.schema, self.name)

    def allow(self) -> str:
        """The methods an ``OPTIONS`` request lists, as PostgREST derives them: reads always; a write
        when the relation takes it (a view may not); PUT needs a primary key too."""
        insert, update, delete = self.events & 8, self.events & 4, self.events & 16
        return ",".join(["OPTIONS,GET,HEAD"] + ["POST"] * bool(insert) + ["PUT"] * bool(insert and update and self.pk)
                        + ["PATCH"] * bool(update) + ["DELETE"] * bool(delete))


@dataclass(frozen=True)
class ForeignKey:
    name: str
    table: tuple[str, str]
    columns: tuple[str, ...]
    ref_table: tuple[str, str]
    ref_columns: tuple[str, ...]


@dataclass(frozen=True)
class Relationship:
    """How ``source`` reaches ``target``. ``pairs`` are (source column, target column) for a direct
    relationship; for many-to-many, ``junction`` with (junction column, source column) pairs in
    ``source_pairs`` and (junction column, target column) pairs in ``target_pairs``."""
    kind: Literal["m2o", "o2m", "o2o", "m2m"]
    source: TableInfo
    target: TableInfo
    constraint: str
    pairs: tuple[tuple[str, str], ...] = ()
    junction: TableInfo | None = None
    source_pairs: tuple[tuple[str, str], ...] = ()
    target_pairs: tuple[tuple[str, str], ...] = ()
    function: tuple[str, str] | None = None   # a computed relationship: fn(source row) returns target rows

    @property
    def to_one(self) -> bool:
        return self.kind in ("m2o", "o2o")

    def describe(self) -> dict[str, str]:
        card = {"m2o": "many-to-one", "o2m": "one-to-many", "o2o": "one-to-one", "m2m": "many-to-many"}[self.kind]
        rel = self.constraint if self.junction is None else f"{self.junction.schema}.{self.junction.name}"
        return {"cardinality": card, "embedding": f"{self.source.name} with {self.target.name}", "relationship": rel}


@dataclass(frozen=True)
class FunctionArg:
    name: str
    type: str
    has_default: bool
    variadic: bool = False   # VARIADIC: repeated GET parameters, or a JSON array, make the array


@dataclass(frozen=True)
class FunctionInfo:
    schema: str
    name: str
    args: tuple[FunctionArg, ...]
    returns: str
    retset: bool
    kind: Literal["scalar", "composite", "void"]
    volatility: Literal["i", "s", "v"]
    result: TableInfo | None = None   # the columns of a composite/table result
    single_json: bool = False         # one unnamed json/jsonb parameter: a POST body is the argument

    @property
    def arg_names(self) -> frozenset[str]:
        return frozenset(a.name for a in self.args)

    @property
    def json_arg(self) -> FunctionArg | None:
        """The one json/jsonb parameter of a function that takes only that (``params=single-object``)."""
        if len(self.args) == 1 and self.args[0].type in ("json", "jsonb"):
            return self.args[0]
        return None

    @property
    def required(self) -> frozenset[str]:
        return frozenset(a.name for a in self.args if not a.has_default)


@dataclass(frozen=True)
class SchemaCache:
    schemas: tuple[str, ...]
    tables: dict[tuple[str, str], TableInfo]
    foreign_keys: tuple[ForeignKey, ...]
    functions: dict[tuple[str, str], tuple[FunctionInfo, ...]] = field(default_factory=dict)
    # Computed relationships: (source schema, source table) → function name → (schema, target, to_one).
    computed_rels: dict[tuple[str, str], dict[str, tuple[str, TableInfo, bool]]] = field(default_factory=dict)

    # -- lookups ---------------------------------------------------------------------------------

    def table(self, schema: str, name: str) -> TableInfo:
        info = self.tables.get((schema, name))
        if info is None:
            near = difflib.get_close_matches(name, [t for s, t in self.tables if s == schema], 1, 0.75)
            raise ApiError(404, "PGRST205", f"Could not find the table '{schema}.{name}' in the schema cache",
                           None, f"Perhaps you meant the table '{schema}.{near[0]}'" if near else None)
        return info

    def function(self, schema: str, name: str, given: frozenset[str]) -> FunctionInfo:
        overloads = self.functions.get((schema, name), ())
        fits = [f for f in overloads if f.required <= given <= f.arg_names]
        if len(fits) == 1:
            return fits[0]
        if len(fits) > 1:
            exact = [f for f in fits if f.arg_names == given]
            if len(exact) == 1:
                return exact[0]
            raise ApiError(300, "PGRST203", "Could not choose the best candidate function between: "
                           + ", ".join(f"{f.schema}.{f.name}({', '.join(a.name + ' => ' + a.type for a in f.args)})"
                                       for f in fits),
                           None, "Try renaming the parameters or the function itself in the database so "
                                 "function overloading can be resolved")
        args = ", ".join(sorted(given))
        signature = f"{schema}.{name}({args})" if given else f"{schema}.{name} without parameters"
        searched = (f"with parameter{'s' if len(given) > 1 else ''} {args}" if given else "without parameters")
        hint = None
        if overloads:
            best = overloads[0]
            hint = f"Perhaps you meant to call the function {schema}.{name}({', '.join(a.name for a in best.args)})"
        raise ApiError(404, "PGRST202", f"Could not find the function {signature} in the schema cache",
                       f"Searched for the function {schema}.{name} {searched}, but no matches were found in the "
                       "schema cache.", hint)

    def relationship(self, source: TableInfo, name: str, hint: str | None) -> Relationship:
        # As PostgREST keys its relationships: only targets in the source's own schema, named by the
        # target, by the foreign key's column, or (without a hint) by the foreign key's name.
        candidates = [r for r in self._relationships(source) if r.target.schema == source.schema and (
            r.target.name == name or _by_column(r, name)
            or (hint is None and r.junction is None and r.constraint == name))]
        computed = self.computed_rels.get(source.qualified, {}).get(name)
        if computed is not None:
            fn_schema, target, to_one = computed
            candidates = [Relationship("m2o" if to_one else "o2m", source, target, name, function=(fn_schema, name))]
        if hint is not None:
            candidates = [r for r in candidates if _matches_hint(r, hint)]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ApiError(400, "PGRST200", f"Could not find a relationship between '{source.name}' and '{name}' "
                           "in the schema cache", None,
                           f"Verify that '{source.name}' and '{name}' exist in the schema '{source.schema}' and that "
                           "there is a foreign key relationship between them. If a new relationship was created, "
                           "try reloading the schema cache.")
        options = [f"'{name}!{r.constraint if r.junction is None else r.junction.name}'" for r in candidates]
        raise ApiError(300, "PGRST201",
                       f"Could not embed because more than one relationship was found for '{source.name}' and "
                       f"'{name}'",
                       [r.describe() for r in candidates],  # type: ignore[arg-type]
                       f"Try changing '{name}' to one of the following: {', '.join(options)}. Find the desired "
                       "relationship in the 'details' key.")

    def _relationships(self, source: TableInfo) -> list[Relationship]:
        out: list[Relationship] = []
        here = source.qualified
        for fk in self.foreign_keys:
            if fk.table == here and fk.ref_table in self.tables:
                target = self.tables[fk.ref_table]
                out.append(Relationship("m2o", source, target, fk.name, tuple(zip(fk.columns, fk.ref_columns,
                                                                                 strict=True))))
            if fk.ref_table == here and fk.table in self.tables:
                target = self.tables[fk.table]
                unique = fk.columns == target.pk or fk.columns in target.uniques
                out.append(Relationship("o2o" if unique else "o2m", source, target, fk.name,
                                        tuple(zip(fk.ref_columns, fk.columns, strict=True))))
        # Many-to-many: a junction with one key to the source and one to the target, both inside its
        # primary key.
        for junction in self.tables.values():
            keys = [fk for fk in self.foreign_keys if fk.table == junction.qualified]
            for a in keys:
                if a.ref_table != here or not set(a.columns) <= set(junction.pk):
                    continue
                for b in keys:
                    if b is a or b.ref_table not in self.tables or not set(b.columns) <= set(junction.pk):
                        continue
                    out.append(Relationship(
                        "m2m", source, self.tables[b.ref_table], b.name, junction=junction,
                        source_pairs=tuple(zip(a.columns, a.ref_columns, strict=True)),
                        target_pairs=tuple(zip(b.columns, b.ref_columns, strict=True))))
        return out


def _by_column(r: Relationship, name: str) -> bool:
    """PostgREST lets a many-to-one be named by its foreign key column (``select=author_id(*)``)."""
    return r.kind == "m2o" and len(r.pairs) == 1 and r.pairs[0][0] == name


def _matches_hint(r: Relationship, hint: str) -> bool:
    if r.constraint == hint or (r.junction is not None and r.junction.name == hint):
        return True
    # A column hint names a column on the embedding (source) side, as PostgREST reads it: for a
    # self-reference, !manager_id is the many-to-one, not the one-to-many.
    return r.junction is None and any(src == hint for src, _ in r.pairs)


# -- loading --------------------------------------------------------------------------------------

_TABLES = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text, obj_description(c.oid, 'pg_class'),
       pg_relation_is_updatable(c.oid, true)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
"""
_COLUMNS = """
SELECT a.attrelid, a.attname, a.atttypid::regtype::text, NOT a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid), a.attgenerated <> '',
       CASE WHEN ty.typtype = 'd' THEN (
           WITH RECURSIVE chain(oid, base) AS (
               SELECT ty.oid, ty.typbasetype
               UNION ALL SELECT t.oid, t.typbasetype FROM pg_type t JOIN chain ON t.oid = chain.base)
           SELECT oid::regtype::text FROM chain WHERE base = 0) ELSE '' END
FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
     LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""
_CONSTRAINTS = """
SELECT con.conname, con.contype::text, con.conrelid, con.confrelid,
       ARRAY(SELECT attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute ON attrelid = con.conrelid AND attnum = k.n ORDER BY k.i),
       ARRAY(SELECT attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
             JOIN pg_attribute ON attrelid = con.confrelid AND attnum = k.n ORDER BY k.i)
FROM pg_constraint con
WHERE con.contype IN ('p', 'u', 'f') AND con.conrelid = ANY($1::oid[]) AND con.conparentid = 0
"""
# Where each view column comes from: the view's rewrite rule records, for every output column, the
# table and column it was taken from (resorigtbl/resorigcol, as PostgREST reads them), renamed or not.
# A base table's keys and foreign keys carry over to the view through these columns.
_VIEW_RULES = """
SELECT ev_class, ev_action::text FROM pg_rewrite WHERE ev_class = ANY($1::oid[]) AND rulename = '_RETURN'
"""
_ATTNAMES = """
SELECT attrelid, attnum, attname FROM pg_attribute WHERE attrelid = ANY($1::oid[]) AND attnum > 0
"""
_TARGET_ENTRY = re.compile(r":resname ((?:\\.|[^\s\\])+) :ressortgroupref \d+ :resorigtbl (\d+) :resorigcol (\d+)")


def _view_sources(rule: str, view_columns: dict[str, ColumnInfo]) -> dict[str, tuple[int, int]]:
    """View column → (table oid, attnum) from a rewrite rule's node tree. The top-level target list
    comes after the range table (subqueries) in the tree, so the last entry of a name wins."""
    found: dict[str, tuple[int, int]] = {}
    for name, table, attnum in _TARGET_ENTRY.findall(rule):
        name = re.sub(r"\\(.)", r"\1", name)
        if name in view_columns and int(table):
            found[name] = (int(table), int(attnum))
    return found


_FUNCTIONS = """
SELECT n.nspname, p.proname, p.provolatile::text, p.proretset, p.prorettype::regtype::text, t.typtype::text, t.typrelid,
       coalesce(p.proargnames, '{}'), coalesce(p.proargmodes::text[], '{}'),
       coalesce(p.proallargtypes::regtype[]::text[], p.proargtypes::oid[]::regtype[]::text[]),
       p.pronargs, p.pronargdefaults,
       CASE WHEN p.pronargs = 1 THEN (SELECT typrelid FROM pg_type WHERE oid = p.proargtypes[0]) END
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_type t ON t.oid = p.prorettype
WHERE n.nspname = ANY($1::text[]) AND p.prokind = 'f'
"""


async def load(conn: asyncpg.Connection, schemas: tuple[str, ...]) -> SchemaCache:
    rels = await conn.fetch(_TABLES, list(schemas))
    funcs = await conn.fetch(_FUNCTIONS, list(schemas))
    type_rels = {f[6] for f in funcs if f[6]} - {r[0] for r in rels}
    oids = [r[0] for r in rels] + list(type_rels)
    columns: dict[int, dict[str, ColumnInfo]] = {}
    for oid, name, typ, nullable, default, generated, base in await conn.fetch(_COLUMNS, oids):
        columns.setdefault(oid, {})[name] = ColumnInfo(name, typ, nullable, default, generated, base)
    view_oids = [r[0] for r in rels if r[3] in ("v", "m")]
    sources: dict[int, dict[str, tuple[int, int]]] = {}
    for view, rule in (await conn.fetch(_VIEW_RULES, view_oids)) if view_oids else []:
        sources[view] = _view_sources(rule, columns.get(view, {}))
    source_rels = list({t for per in sources.values() for t, _ in per.values()})
    attnames = {(rel, num): name for rel, num, name in (await conn.fetch(_ATTNAMES, source_rels))} \
        if source_rels else {}
    reads: dict[int, dict[int, dict[str, str]]] = {}  # view -> source relation -> {source column: view column}
    for view, per in sources.items():
        for view_col, (rel, num) in per.items():
            if (rel, num) in attnames:
                reads.setdefault(view, {}).setdefault(rel, {})[attnames[(rel, num)]] = view_col
    bases = {b for per_view in reads.values() for b in per_view} - set(oids)
    pks: dict[int, tuple[str, ...]] = {}
    uniques: dict[int, list[tuple[str, ...]]] = {}
    fk_rows = []
    for conname, contype, conrelid, confrelid, cols, refcols in await conn.fetch(_CONSTRAINTS, oids + list(bases)):
        if contype == "p":
            pks[conrelid] = tuple(cols)
        elif contype == "u":
            uniques.setdefault(conrelid, []).append(tuple(cols))
        else:
            fk_rows.append((conname, conrelid, confrelid, tuple(cols), tuple(refcols)))
    # Every exposed relation standing for a base table: {base column: its column} for what it carries.
    stands_for: dict[int, list[tuple[int, dict[str, str]]]] = {
        oid: [(oid, {c: c for c in columns.get(oid, {})})] for oid in oids}
    for view, per_base in reads.items():
        for base, mapping in per_base.items():
            stands_for.setdefault(base, []).append((view, dict(mapping)))
    for _ in range(4):  # views over views (an exposed view reading another exposed view)
        grown = False
        for entries in stands_for.values():
            for rel, carried in list(entries):
                for reader, per_base in reads.items():
                    if rel in per_base and all(r != reader for r, _ in entries):
                        through = per_base[rel]
                        entries.append((reader, {b: through[c] for b, c in carried.items() if c in through}))
                        grown = True
        if not grown:
            break
    for base, entries in stands_for.items():
        for rel, carried in entries:
            if base in pks and rel not in pks and all(c in carried for c in pks[base]):
                pks[rel] = tuple(carried[c] for c in pks[base])
    by_oid: dict[int, TableInfo] = {}
    tables: dict[tuple[str, str], TableInfo] = {}
    for oid, nspname, relname, relkind, description, events in rels:
        info = TableInfo(nspname, relname, relkind, columns.get(oid, {}), pks.get(oid, ()),
                         tuple(uniques.get(oid, ())), description, events=events)
        by_oid[oid] = info
        tables[info.qualified] = info
    seen: set[tuple[str, int, int]] = set()
    fk_list: list[ForeignKey] = []
    for name, rel, ref, cols, refcols in fk_rows:
        for src, src_map in stands_for.get(rel, []):
            for dst, dst_map in stands_for.get(ref, []):
                if (src in by_oid and dst in by_oid and all(c in src_map for c in cols)
                        and all(c in dst_map for c in refcols) and (name, src, dst) not in seen):
                    seen.add((name, src, dst))
                    fk_list.append(ForeignKey(name, by_oid[src].qualified, tuple(src_map[c] for c in cols),
                                              by_oid[dst].qualified, tuple(dst_map[c] for c in refcols)))
    fks = tuple(fk_list)
    functions: dict[tuple[str, str], list[FunctionInfo]] = {}
    computed_rels: dict[tuple[str, str], dict[str, tuple[str, TableInfo, bool]]] = {}
    for (nspname, proname, volatility, retset, rettype, typtype, typrelid, argnames, argmodes, argtypes,
         nargs, ndefaults, row_of) in funcs:
        if row_of in by_oid:
            if typtype == "c" and typrelid in by_oid:
                if volatility in ("i", "s"):
                    # fn(parent) RETURNS [SETOF] target: a computed relationship, embedded like a foreign key.
                    computed_rels.setdefault(by_oid[row_of].qualified, {}).setdefault(
                        proname, (nspname, by_oid[typrelid], not retset))
            # A computed field may be volatile too: PostgREST does not look at volatility for them.
            elif not retset and rettype not in ("void", "record"):
                by_oid[row_of].computed.setdefault(proname, (nspname, proname, rettype))
        modes = list(argmodes) or ["i"] * len(argtypes)
        inputs = [(argnames[i] if i < len(argnames) else "", argtypes[i], m == "v") for i, m in enumerate(modes)
                  if m in ("i", "b", "v")]
        single_json = len(inputs) == 1 and not inputs[0][0] and inputs[0][1] in ("json", "jsonb")
        if any(not name for name, _, _ in inputs) and not single_json:
            continue  # unnamed parameters cannot be called with named arguments
        args = tuple(FunctionArg(name, typ, i >= nargs - ndefaults, variadic)
                     for i, (name, typ, variadic) in enumerate(inputs))
        outs = [(argnames[i], argtypes[i]) for i, m in enumerate(modes) if m in ("o", "b", "t")]
        result: TableInfo | None = None
        kind: Literal["scalar", "composite", "void"]
        if rettype == "void":
            kind = "void"
        elif outs and (len(outs) > 1 or retset and any(m == "t" for m in modes)):
            kind = "composite"
            result = TableInfo(nspname, proname, "c", {n: ColumnInfo(n, t, True, None) for n, t in outs})
        elif typtype == "c" and typrelid:
            kind = "composite"
            base = by_oid.get(typrelid)
            result = base or TableInfo(nspname, rettype, "c", columns.get(typrelid, {}))
        else:
            kind = "scalar"
        functions.setdefault((nspname, proname), []).append(
            FunctionInfo(nspname, proname, args, rettype, retset, kind, volatility, result, single_json))
    return SchemaCache(schemas, tables, fks, {k: tuple(v) for k, v in functions.items()}, computed_rels)
