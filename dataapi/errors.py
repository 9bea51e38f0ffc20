"""Errors as PostgREST gives them: an HTTP status and a body ``{"code","details","hint","message"}``.

Two sources: PostgREST's own (``PGRSTgxx`` codes, raised here as ``ApiError``) and PostgreSQL's
(passed through with the status PostgREST derives from the SQLSTATE, ``pg_status``). Every
failure a request can meet becomes one of these; nothing reaches the client as a bare 500.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class ApiError(Exception):
    status: int
    code: str
    message: str
    details: str | None = None
    hint: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        return json.dumps({"code": self.code, "details": self.details, "hint": self.hint,
                           "message": self.message}).encode()

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def parse_error(message: str, details: str | None = None) -> ApiError:
    """PGRST100: a query-string parameter that does not follow the grammar."""
    return ApiError(400, "PGRST100", message, details)


def body_error(message: str, details: str | None = None) -> ApiError:
    """PGRST102: an empty, malformed or mis-shaped request body."""
    return ApiError(400, "PGRST102", message, details)


# SQLSTATE class (or full code) → HTTP status, PostgREST's table. Longest match wins.
_STATUS: dict[str, int] = {
    "08": 503, "09": 500, "0L": 403, "0P": 403, "23503": 409, "23505": 409, "25006": 405, "25": 500,
    "28": 403, "2D": 500, "38": 500, "39": 500, "3B": 500, "40": 500, "53400": 500, "53": 503,
    "54": 500, "55": 500, "57": 500, "58": 500, "F0": 500, "HV": 500, "P0001": 400, "P0": 500,
    "XX": 500, "42883": 404, "42P01": 404, "42P17": 500,
}


def pg_status(sqlstate: str, *, authenticated: bool) -> int:
    """The HTTP status PostgREST answers a PostgreSQL error with."""
    if sqlstate == "42501":
        return 403 if authenticated else 401
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
        return int(sqlstate[2:])
    if sqlstate in _STATUS:
        return _STATUS[sqlstate]
    return _STATUS.get(sqlstate[:2], 400)


def from_postgres(exc: BaseException, *, authenticated: bool) -> ApiError:
    """Turn a server error (``pgwire.PgError``, or asyncpg's) into PostgREST's response, including
    ``RAISE SQLSTATE 'PGRST'`` with a JSON message and a ``{"status","headers"}`` detail, as
    PostgREST reads them."""
    sqlstate = getattr(exc, "sqlstate", None) or "XX000"
    message = getattr(exc, "message", None) or str(exc)
    details = getattr(exc, "detail", None)
    hint = getattr(exc, "hint", None)
    if sqlstate == "PGRST":
        try:
            body = json.loads(message)
            extra = json.loads(details) if details else {}
            status = int(extra["status"])
            headers = {str(k): str(v) for k, v in (extra.get("headers") or {}).items()}
            return ApiError(status, str(body["code"]), str(body["message"]), body.get("details"),
                            body.get("hint"), headers)
        except (ValueError, KeyError, TypeError, AttributeError):
            return ApiError(500, "PGRST121", "Could not parse JSON in the \"RAISE SQLSTATE 'PGRST'\" error",
                            f"Invalid JSON in message or detail: {message!r}", None)
    status = pg_status(sqlstate, authenticated=authenticated)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return ApiError(status, sqlstate, message, details, hint, headers)
