"""The request, parsed: PostgREST's URL grammar, its headers and ``Prefer``, as typed values.

Nothing here touches the database or the schema; ``query.py`` builds SQL from these values only.
Everything a client can send is checked here against the grammar, and anything outside it is a
``PGRST100`` (query string), ``PGRST102`` (body) or ``PGRST122`` (strict preferences) error, so
raw text never reaches SQL.

Grammar, as PostgREST documents it:
- ``select=a,alias:b,c::text,d->x->>y,rel!hint!inner(a,b),...spread(c),sum_b:b.sum(),count()``
- ``col=[not.]op[(any|all)].value``; ``or=(a.eq.1,and(b.gt.2,c.is.null))``; ``not.or=(...)``
- ``order=a.desc.nullslast,b``; ``limit``/``offset``; each may be prefixed by an embedding path
  (``books.order=year``, ``books.title=eq.X``)
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Literal

from dataapi.errors import ApiError, parse_error

# -- the plan's leaves ---------------------------------------------------------------------------

OPERATORS = {
    "eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "like": "LIKE", "ilike": "ILIKE",
    "match": "~", "imatch": "~*", "cs": "@>", "cd": "<@", "ov": "&&", "sl": "<<", "sr": ">>", "nxr": "&<",
    "nxl": "&>", "adj": "-|-",
}
QUANTIFIABLE = {"eq", "neq", "gt", "gte", "lt", "lte", "like", "ilike", "match", "imatch"}
FTS = {"fts": "to_tsquery", "plfts": "plainto_tsquery", "phfts": "phraseto_tsquery", "wfts": "websearch_to_tsquery"}
IS_VALUES = {"null": "NULL", "not_null": "NOT NULL", "true": "TRUE", "false": "FALSE", "unknown": "UNKNOWN"}
AGGREGATES = {"count", "sum", "avg", "max", "min"}
MAX_LOGIC_DEPTH = 32
MAX_SELECT_DEPTH = 16

# A dash is allowed (field-with_sep), and inner spaces ("Unit Price", as PostgREST reads an unquoted
# name); arrows are split off before. Any other character goes in double quotes ("a.b", "x(y)").
IDENT = r"[^\s,.:()!\">](?:[^,.:()!\">]*[^\s,.:()!\">])?"
_IDENT_RE = re.compile(IDENT)
_CAST_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ]*(\[\])?$")
_JSON_OP = re.compile(r"(->>|->)")


@dataclass(frozen=True)
class JsonStep:
    arrow: Literal["->", "->>"]
    key: str | int


@dataclass(frozen=True)
class Field:
    """A column, possibly followed by JSON arrows (``data->a->>b``)."""
    name: str
    path: tuple[JsonStep, ...] = ()

    @property
    def default_alias(self) -> str:
        """The JSON key a selected field gets: PostgREST names it after the last key of its path,
        skipping array indexes (``data->1->c->>2`` is ``c``, ``data->>0`` is ``data``)."""
        keys = [s.key for s in self.path if isinstance(s.key, str)]
        return keys[-1] if keys else self.name


@dataclass(frozen=True)
class Column:
    field: Field
    alias: str | None = None
    cast: str | None = None
    aggregate: str | None = None      # count/sum/avg/max/min; field.name == "" for a bare count()
    aggregate_cast: str | None = None


@dataclass(frozen=True)
class Star:
    pass


@dataclass
class Embed:
    relation: str
    alias: str | None
    hint: str | None
    join: Literal["inner", "left"] | None
    spread: bool
    select: list[SelectItem]

    @property
    def key(self) -> str:
        return self.alias or self.relation


SelectItem = Column | Star | Embed


@dataclass(frozen=True)
class Filter:
    field: Field
    op: str                                  # a key of OPERATORS, "in", "is", "isdistinct", or an FTS op
    value: str | tuple[str, ...]
    negate: bool = False
    quantifier: Literal["any", "all"] | None = None
    language: str | None = None


@dataclass(frozen=True)
class Logic:
    op: Literal["and", "or"]
    children: tuple[Condition, ...]
    negate: bool = False


Condition = Filter | Logic


@dataclass(frozen=True)
class OrderTerm:
    field: Field
    relation: str | None = None               # order=rel(col) for a to-one embedding
    desc: bool = False
    nulls: Literal["first", "last"] | None = None


@dataclass
class Preferences:
    return_: Literal["minimal", "representation", "headers-only"] | None = None
    count: Literal["exact", "planned", "estimated"] | None = None
    resolution: Literal["merge-duplicates", "ignore-duplicates"] | None = None
    missing: Literal["default", "null"] | None = None
    handling: Literal["strict", "lenient"] | None = None
    tx: Literal["commit", "rollback"] | None = None
    max_affected: int | None = None
    timezone: str | None = None                       # SET LOCAL timezone for the request
    params: Literal["single-object"] | None = None    # RPC: the body is the one json argument


Path = tuple[str, ...]  # the embedding path a filter/order/limit applies to; () = the top level


@dataclass
class Query:
    """Everything the query string says, keyed by embedding path."""
    select: list[SelectItem] = field(default_factory=lambda: [Star()])
    conditions: dict[Path, list[Condition]] = field(default_factory=dict)
    order: dict[Path, list[OrderTerm]] = field(default_factory=dict)
    limit: dict[Path, int] = field(default_factory=dict)
    offset: dict[Path, int] = field(default_factory=dict)
    columns: list[str] | None = None
    on_conflict: list[str] | None = None
    rpc_args: dict[str, str] = field(default_factory=dict)
    select_text: str = "*"   # select= as sent: the parsed tree's key (embeddings are not hashable)


# -- small parsers --------------------------------------------------------------------------------

def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside parentheses, braces (array literals) and double quotes (PostgREST's
    list syntax)."""
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch in "({":
            depth += 1
        elif ch in ")}":
            depth -= 1
            if depth < 0:
                raise parse_error(f'"failed to parse" ({text})', "unexpected \")\"")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if depth != 0 or quoted:
        raise parse_error(f'"failed to parse" ({text})', "unbalanced parentheses or quotes")
    parts.append(text[start:])
    return parts


def unquote(item: str) -> str:
    if len(item) >= 2 and item[0] == '"' and item[-1] == '"':
        return re.sub(r"\\(.)", r"\1", item[1:-1])
    return item


def parse_list(text: str, what: str) -> tuple[str, ...]:
    """``(a,"b,c",d)`` → ("a", "b,c", "d")."""
    if not (text.startswith("(") and text.endswith(")")):
        raise parse_error(f'"failed to parse filter ({what})"', f"expected a list in parentheses, got {text!r}")
    inner = text[1:-1]
    if inner.strip() == "":
        return ()
    return tuple(unquote(p.strip()) for p in split_top(inner))


def _closing_quote(text: str) -> int:
    """Where the double-quoted name ``text`` starts with ends (backslash escapes); -1 if it does not."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 1
        elif text[i] == '"':
            return i
        i += 1
    return -1


@functools.lru_cache(maxsize=1024)
def parse_field(text: str) -> Field:
    """A column name with JSON arrows (kept: a table's few column names recur on every request). A
    double-quoted name may hold any character, PostgREST's reserved ones included."""
    text = text.strip()
    if text.startswith('"') and (end := _closing_quote(text)) > 0:
        parts = _JSON_OP.split(text[end + 1:])
        if parts[0].strip():
            raise parse_error(f'"failed to parse" ({text})', f"{text!r} is not a column name")
        name = re.sub(r"\\(.)", r"\1", text[1:end])
    else:
        parts = _JSON_OP.split(text)
        name = parts[0].strip()
    if not name or not _IDENT_RE.fullmatch(name) and not text.startswith('"'):
        raise parse_error(f'"failed to parse" ({text})', f"{text!r} is not a column name")
    steps: list[JsonStep] = []
    for arrow, key in zip(parts[1::2], parts[2::2], strict=True):
        if key == "":
            raise parse_error(f'"failed to parse" ({text})', "a JSON arrow needs a key after it")
        if key.startswith("-") and not re.fullmatch(r"-\d+", key):
            raise parse_error(f'"failed to parse" ({text})', 'unexpected "-" expecting digit')
        k: str | int = int(key) if re.fullmatch(r"-?\d+", key) else unquote(key)
        steps.append(JsonStep(arrow, k))  # type: ignore[arg-type]
    return Field(name, tuple(steps))


def _cast(text: str) -> str:
    if not _CAST_RE.match(text):
        raise parse_error(f'"failed to parse select parameter" ({text})', f"{text!r} is not a type name")
    return text


# -- select ---------------------------------------------------------------------------------------

def parse_select(text: str, depth: int = 0) -> list[SelectItem]:
    if depth > MAX_SELECT_DEPTH:
        raise parse_error('"failed to parse select parameter"', f"embedding nested deeper than {MAX_SELECT_DEPTH}")
    items: list[SelectItem] = []
    for raw in split_top(text):
        item = raw.strip()
        if not item:
            raise parse_error(f'"failed to parse select parameter" ({text})', "empty item in select")
        items.append(_select_item(item, depth))
    return items


@functools.lru_cache(maxsize=1024)
def _select_cached(text: str) -> tuple[SelectItem, ...]:
    """``select=`` strings repeat (a client sends the same few); parsing one costs more than the
    rest of a request's planning, so the parsed tree (never mutated) is kept."""
    return tuple(parse_select(text))


def _select_item(item: str, depth: int) -> SelectItem:
    if item == "*":
        return Star()
    spread = item.startswith("...")
    if spread:
        item = item[3:]
    alias = None
    m = re.match(r"^([^:()!\"]+):(?!:)(.*)$", item, re.S)
    if m and not spread:
        alias, item = m.group(1).strip(), m.group(2).strip()
    paren = item.find("(")
    if paren > 0 and item.endswith(")") and not re.search(r"\.\w+\(\)(::[\w ]+)?$", item) and item != "count()":
        head, body = item[:paren], item[paren + 1:-1]
        names = head.split("!")
        relation = names[0].strip()
        if not _IDENT_RE.fullmatch(relation):
            raise parse_error(f'"failed to parse select parameter" ({item})', f"{relation!r} is not a name")
        hint = None
        join: Literal["inner", "left"] | None = None
        for extra in names[1:]:
            if extra in ("inner", "left"):
                join = extra  # type: ignore[assignment]
            elif _IDENT_RE.fullmatch(extra) and hint is None:
                hint = extra
            else:
                raise parse_error(f'"failed to parse select parameter" ({item})', f"bad embedding hint {extra!r}")
        sub = parse_select(body, depth + 1) if body.strip() else []
        return Embed(relation, alias, hint, join, spread, sub)
    if spread:
        raise parse_error(f'"failed to parse select parameter" ({item})', "... must precede an embedded resource")
    aggregate = None
    aggregate_cast = None
    m = re.match(r"^(.*)\.(\w+)\(\)(?:::(.+))?$", item)
    if item.startswith("count()"):
        aggregate = "count"
        rest = item[len("count()"):]
        if rest:
            if not rest.startswith("::"):
                raise parse_error(f'"failed to parse select parameter" ({item})')
            aggregate_cast = _cast(rest[2:])
        return Column(Field(""), alias, None, aggregate, aggregate_cast)
    if m and m.group(2) in AGGREGATES:
        item, aggregate = m.group(1), m.group(2)
        aggregate_cast = _cast(m.group(3)) if m.group(3) else None
    cast = None
    after = _closing_quote(item) + 1 if item.startswith('"') else 0  # a quoted name may hold "::"
    if "::" in item[after:]:
        item, c = item.rsplit("::", 1)
        cast = _cast(c.strip())
    return Column(parse_field(item.strip()), alias, cast, aggregate, aggregate_cast)


# -- filters and logic trees ----------------------------------------------------------------------

_OP_RE = re.compile(r"^(\w+)(?:\((any|all|[\w\-]+)\))?$")


def parse_filter_value(field_: Field, text: str) -> Filter:
    """``[not.]op[(q)].value`` → Filter."""
    negate = False
    if text.startswith("not."):
        negate, text = True, text[4:]
    op_text, dot, value = text.partition(".")
    if not dot:
        raise ApiError(400, "PGRST104", "Unexpected param or filter missing operator",
                       f"Failed to parse [({json.dumps(field_.name)},{json.dumps(text)})]",
                       "A filter is operator.value, for example id=eq.5")
    m = _OP_RE.match(op_text)
    if not m:
        raise parse_error(f'"failed to parse filter ({text})"', f"unknown operator {op_text!r}")
    op, arg = m.group(1), m.group(2)
    quantifier = None
    language = None
    if op in FTS:
        language = arg
        if arg is not None and not re.fullmatch(r"[\w\-]+", arg):
            raise parse_error(f'"failed to parse filter ({text})"', f"bad text search configuration {arg!r}")
        return Filter(field_, op, value, negate, None, language)
    if arg is not None:
        if arg not in ("any", "all") or op not in QUANTIFIABLE:
            raise parse_error(f'"failed to parse filter ({text})"', f"{op}({arg}) is not an operator")
        quantifier = arg
        items = value[1:-1] if value.startswith("{") and value.endswith("}") else None
        if items is None:
            raise parse_error(f'"failed to parse filter ({text})"', "any/all take a list in braces: {a,b}")
        vals = tuple(unquote(p.strip()) for p in split_top(items)) if items else ()
        return Filter(field_, op, vals, negate, quantifier)  # type: ignore[arg-type]
    if op == "in":
        return Filter(field_, "in", parse_list(value, text), negate)
    if op == "is":
        if value.lower() not in IS_VALUES:
            raise parse_error(f'"failed to parse filter ({text})"',
                              "is takes null, not_null, true, false or unknown")
        return Filter(field_, "is", value.lower(), negate)
    if op == "isdistinct" or op in OPERATORS:
        return Filter(field_, op, value, negate)
    raise parse_error(f'"failed to parse filter ({text})"', f"unknown operator {op!r}")


_FILTER_RE = re.compile(r"^(?:not\.)?(\w+)(?:\([^)]*\))?\.")


def looks_like_filter(value: str) -> bool:
    """``op.value`` with a known operator: for a GET function call, PostgREST reads such a parameter
    as a filter on the result, and anything else as an argument."""
    m = _FILTER_RE.match(value)
    return bool(m) and (m.group(1) in OPERATORS or m.group(1) in FTS or m.group(1) in ("in", "is", "isdistinct"))


RESERVED = {"select", "order", "limit", "offset", "columns", "on_conflict", "or", "and", "not.or", "not.and"}


def parse_logic(op: str, text: str, negate: bool, depth: int = 0) -> Logic:
    if depth > MAX_LOGIC_DEPTH:
        raise parse_error('"failed to parse logic tree"', f"and/or nested deeper than {MAX_LOGIC_DEPTH} levels")
    if not (text.startswith("(") and text.endswith(")")):
        raise parse_error(f'"failed to parse logic tree ({text})"', "and/or take a list in parentheses")
    children: list[Condition] = []
    for raw in split_top(text[1:-1]):
        item = raw.strip()
        m = re.match(r"^(not\.)?(and|or)(\(.*\))$", item, re.S)
        if m:
            children.append(parse_logic(m.group(2), m.group(3), bool(m.group(1)), depth + 1))
            continue
        name, dot, rest = item.partition(".")
        if not dot:
            raise parse_error(f'"failed to parse logic tree ({text})"', f"{item!r} is not field.operator.value")
        children.append(parse_filter_value(parse_field(name), rest))
    if not children:
        raise parse_error(f'"failed to parse logic tree ({text})"', "an empty and/or")
    return Logic(op, tuple(children), negate)  # type: ignore[arg-type]


# -- order ----------------------------------------------------------------------------------------

def parse_order(text: str) -> list[OrderTerm]:
    terms = []
    for raw in split_top(text):
        item = raw.strip()
        relation = None
        m = re.match(r"^([^().]+)\(([^()]+)\)(.*)$", item)
        if m:
            relation, item = m.group(1), m.group(2) + m.group(3)
        parts = item.split(".")
        col, mods = parts[0], parts[1:]
        desc = False
        nulls: Literal["first", "last"] | None = None
        for mod in mods:
            if mod in ("asc", "desc"):
                desc = mod == "desc"
            elif mod in ("nullsfirst", "nullslast"):
                nulls = "first" if mod == "nullsfirst" else "last"
            else:
                raise parse_error(f'"failed to parse order ({text})"',
                                  f"{mod!r}: use asc, desc, nullsfirst or nullslast")
        terms.append(OrderTerm(parse_field(col), relation, desc, nulls))
    return terms


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit():
        raise parse_error(f'"failed to parse {name} parameter ({value})"', f"{name} must be a non-negative integer")
    return int(value)


def parse_query(params: list[tuple[str, str]], rpc_arg_names: frozenset[str] = frozenset()) -> Query:
    """The whole query string; ``rpc_arg_names`` are the parameters a GET function call takes as
    arguments rather than as filters on its result."""
    q = Query()
    for key, value in params:
        if key == "select":
            q.select = list(_select_cached(value)) if value.strip() else [Star()]
            q.select_text = value
            continue
        if key == "columns":
            q.columns = [unquote(c.strip()) for c in split_top(value)]
            if not all(q.columns):
                raise parse_error(f'"failed to parse columns parameter ({value})"')
            continue
        if key == "on_conflict":
            q.on_conflict = [unquote(c.strip()) for c in split_top(value)]
            continue
        if key in rpc_arg_names:
            q.rpc_args[key] = value
            continue
        if key in ("not.or", "not.and") or key.endswith((".not.or", ".not.and")):
            *pre, _, op = key.split(".")
            q.conditions.setdefault(tuple(pre), []).append(parse_logic(op, value, True))
            continue
        if '"' in key:  # a quoted column name may hold dots and arrows: split outside the quotes
            *pre, last = split_top(key, ".")
            path = tuple(pre)
        elif "->" in key:
            # JSON arrows: the embedding path is what precedes the column, split on dots there.
            head, arrow, tail = key.partition("->")
            *pre, col = head.split(".")
            path, last = tuple(pre), col + arrow + tail
        else:
            *pre, last = key.split(".")
            path = tuple(pre)
        if last == "order":
            q.order[path] = parse_order(value)
        elif last == "limit":
            q.limit[path] = _non_negative("limit", value)
        elif last == "offset":
            q.offset[path] = _non_negative("offset", value)
        elif last in ("or", "and"):
            q.conditions.setdefault(path, []).append(parse_logic(last, value, False))
        else:
            q.conditions.setdefault(path, []).append(parse_filter_value(parse_field(last), value))
    return q


# -- headers --------------------------------------------------------------------------------------

_PREFER_VALUES: dict[str, set[str]] = {
    "return": {"minimal", "representation", "headers-only"},
    "count": {"exact", "planned", "estimated"},
    "resolution": {"merge-duplicates", "ignore-duplicates"},
    "missing": {"default", "null"},
    "handling": {"strict", "lenient"},
    "tx": {"commit", "rollback"},
    "params": {"single-object"},
}


def parse_prefer(values: list[str]) -> Preferences:
    prefs = Preferences()
    invalid: list[str] = []
    tokens = [t.strip() for v in values for t in v.split(",") if t.strip()]
    for token in tokens:
        name, _, val = token.partition("=")
        name, val = name.strip(), val.strip()
        if name in _PREFER_VALUES and val in _PREFER_VALUES[name]:
            setattr(prefs, "return_" if name == "return" else name, val)
        elif name == "max-affected" and val.isdigit():
            prefs.max_affected = int(val)
        elif name == "timezone" and val:
            prefs.timezone = val  # checked by Postgres: an unknown zone is its 22023, as in PostgREST
        else:
            invalid.append(token)
    if prefs.handling == "strict" and invalid:
        raise ApiError(400, "PGRST122", "Invalid preferences given with handling=strict",
                       "Invalid preferences: " + ", ".join(invalid))
    return prefs


_RANGE_RE = re.compile(r"^(?:items=)?\s*(\d+)-(\d*)\s*$")


def parse_range(value: str | None) -> tuple[int, int | None] | None:
    """``Range: 0-9`` → (offset 0, limit 10); ``10-`` → (10, None)."""
    if not value:
        return None
    m = _RANGE_RE.match(value)
    if not m:
        return None  # PostgREST ignores a Range it cannot read
    lower = int(m.group(1))
    if m.group(2) == "":
        return lower, None
    upper = int(m.group(2))
    if upper < lower:
        raise ApiError(416, "PGRST103", "Requested range not satisfiable",
                       "The lower boundary must be lower than or equal to the upper boundary in the Range header.")
    return lower, upper - lower + 1


MEDIA_JSON = "application/json"
MEDIA_OBJECT = "application/vnd.pgrst.object+json"
MEDIA_CSV = "text/csv"
MEDIA_OPENAPI = "application/openapi+json"
MEDIA_TEXT = "text/plain"
MEDIA_BINARY = "application/octet-stream"
RAW_MEDIA = (MEDIA_TEXT, MEDIA_BINARY)  # one selected column, values concatenated
_PRODUCED = (MEDIA_JSON, MEDIA_OBJECT, MEDIA_CSV, MEDIA_OPENAPI, *RAW_MEDIA)


MEDIA_PLAN = "application/vnd.pgrst.plan"
PLAN_OPTIONS = ("analyze", "verbose", "settings", "buffers", "wal")


@dataclass(frozen=True)
class PlanRequest:
    """``Accept: application/vnd.pgrst.plan[+json|+text]; for="…"; options=a|b``: answer with the
    statement's EXPLAIN instead of running it (PostgREST's ``db-plan-enabled``)."""
    format: Literal["json", "text"]
    for_media: str | None           # the media type the plan is for (object → the singular query)
    options: tuple[str, ...]

    @property
    def content_type(self) -> str:
        out = f"{MEDIA_PLAN}+{self.format}"
        if self.for_media:
            out += f'; for="{self.for_media}"'
        if self.options:
            out += "; options=" + "|".join(self.options)
        return out + "; charset=utf-8"


def parse_plan(accept: str | None) -> PlanRequest | None:
    """The plan media type when ``Accept`` asks for it (first), else None."""
    if not accept or MEDIA_PLAN not in accept.lower():
        return None
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        media = media.lower()
        if media not in (MEDIA_PLAN, MEDIA_PLAN + "+json", MEDIA_PLAN + "+text"):
            continue
        fmt: Literal["json", "text"] = "json" if media.endswith("+json") else "text"
        for_media = None
        options: list[str] = []
        for p in params:
            key, _, value = p.partition("=")
            key, value = key.strip().lower(), value.strip().strip('"')
            if key == "for" and value:
                for_media = MEDIA_OBJECT if value == "application/vnd.pgrst.object" else value
            elif key == "options":
                options = [o for o in value.split("|") if o in PLAN_OPTIONS]  # others ignored, as PostgREST does
        return PlanRequest(fmt, for_media, tuple(options))
    return None


def negotiate(accept: str | None, *, openapi: bool = False) -> str:
    """Pick the response media type from ``Accept`` (q-values honoured); 406 when none fits."""
    if not accept:
        return MEDIA_OPENAPI if openapi else MEDIA_JSON
    offers: list[tuple[float, int, str]] = []
    for i, part in enumerate(accept.split(",")):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        offers.append((-q, i, media.lower()))
    for negq, _, media in sorted(offers):
        if negq == 0:
            continue
        if media in ("*/*", "application/*"):
            return MEDIA_OPENAPI if openapi else MEDIA_JSON
        if media == "application/vnd.pgrst.object":
            return MEDIA_OBJECT
        if media in _PRODUCED and (openapi or media != MEDIA_OPENAPI):
            return media
    raise ApiError(415, "PGRST107", f"None of these Content-Types are available: {accept}")
