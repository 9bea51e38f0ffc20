"""The OpenAPI (Swagger 2.0) description served at the base URL, built from the schema cache the way
PostgREST builds it: a path per table and view, a path per function under ``/rpc/``, and a
definition per table with its columns, their types and which are required."""

from __future__ import annotations

from typing import Any

from yarl import URL

from dataapi.schema import ColumnInfo, SchemaCache

_TYPES = {
    "integer": ("integer", "integer"), "bigint": ("integer", "bigint"), "smallint": ("integer", "smallint"),
    "numeric": ("number", "numeric"), "real": ("number", "real"), "double precision": ("number", "double precision"),
    "boolean": ("boolean", "boolean"), "json": ("object", "json"), "jsonb": ("object", "jsonb"),
}


def _property(col: ColumnInfo) -> dict[str, Any]:
    if col.type.endswith("[]"):
        return {"type": "array", "format": col.type, "items": {"type": "string"}}
    kind, fmt = _TYPES.get(col.type, ("string", col.type))
    prop: dict[str, Any] = {"type": kind, "format": fmt}
    if col.default is not None:
        prop["default"] = col.default
    return prop


def describe(cache: SchemaCache, schema: str, origin: URL, base_path: str) -> dict[str, Any]:
    paths: dict[str, Any] = {"/": {"get": {"produces": ["application/openapi+json", "application/json"],
                                           "responses": {"200": {"description": "OK"}},
                                           "summary": "OpenAPI description (this document)"}}}
    definitions: dict[str, Any] = {}
    for (sch, name), table in sorted(cache.tables.items()):
        if sch != schema:
            continue
        ref = {"$ref": f"#/definitions/{name}"}
        ops: dict[str, Any] = {"get": {"tags": [name], "responses": {"200": {"description": "OK", "schema": {
            "type": "array", "items": ref}}, "206": {"description": "Partial Content"}}}}
        if table.kind in ("r", "p", "v", "f"):
            ops["post"] = {"tags": [name], "responses": {"201": {"description": "Created"}}}
            ops["patch"] = {"tags": [name], "responses": {"204": {"description": "No Content"}}}
            ops["delete"] = {"tags": [name], "responses": {"204": {"description": "No Content"}}}
        if table.description:
            ops["get"]["summary"] = table.description
        paths[f"/{name}"] = ops
        required = [c.name for c in table.columns.values() if not c.nullable and c.default is None
                    and not c.generated]
        definition: dict[str, Any] = {"type": "object",
                                      "properties": {c.name: _property(c) for c in table.columns.values()}}
        if required:
            definition["required"] = required
        if table.description:
            definition["description"] = table.description
        definitions[name] = definition
    for (sch, name), overloads in sorted(cache.functions.items()):
        if sch != schema:
            continue
        fn = overloads[0]
        props = {a.name: _property(ColumnInfo(a.name, a.type, True, None)) for a in fn.args}
        body = {"in": "body", "name": "args", "required": True,
                "schema": {"type": "object", "properties": props,
                           "required": [a.name for a in fn.args if not a.has_default]}}
        paths[f"/rpc/{name}"] = {
            "post": {"tags": ["(rpc) " + name], "parameters": [body], "responses": {"200": {"description": "OK"}}},
            "get": {"tags": ["(rpc) " + name], "parameters": [
                {"in": "query", "name": a.name, "required": not a.has_default, **_property(
                    ColumnInfo(a.name, a.type, True, None))} for a in fn.args],
                "responses": {"200": {"description": "OK"}}},
        }
    return {
        "swagger": "2.0",
        "info": {"title": "Lakelet Data API", "description": "PostgREST-compatible API", "version": "v1"},
        "host": origin.host + (f":{origin.port}" if origin.port else ""),
        "basePath": base_path.rstrip("/") or "/",
        "schemes": [origin.scheme],
        "consumes": ["application/json", "application/vnd.pgrst.object+json", "text/csv"],
        "produces": ["application/json", "application/vnd.pgrst.object+json", "text/csv"],
        "paths": paths,
        "definitions": definitions,
    }
