"""Cross-origin requests (CORS), so that a web page on another origin can call the Data API.

Browsers send ``Origin`` on a cross-origin request and, before one that is not "simple" (a JSON
body, an ``Authorization`` or ``Prefer`` header, a PATCH), a preflight ``OPTIONS`` carrying
``Access-Control-Request-Method``. The policy is PostgREST's: with no origins configured every
origin is allowed (``Access-Control-Allow-Origin: *``); with a list, only those origins, each
echoed back with ``Access-Control-Allow-Credentials: true``. A request from another origin is
not refused here — it is served without CORS headers, and the browser keeps the answer from the
page. A request with no ``Origin`` is not a CORS request and gets no CORS headers.

Pure functions of the request's headers: ``preflight`` answers a preflight without touching a
database; ``decorate`` adds the headers to any other response, errors included (a page must be
able to read a 401's body)."""

from __future__ import annotations

from collections.abc import Mapping

from dataapi.http_server import Response

METHODS = "GET, POST, PATCH, PUT, DELETE, OPTIONS, HEAD"
# Request headers a page may always send (the CORS safelist), allowed beside the ones it asks for.
SAFELISTED = ("Accept", "Accept-Language", "Content-Language", "Content-Type")
# Response headers a page may read beyond the safelisted ones: the paging and location headers
# PostgREST's clients read (a count in Content-Range, an insert's Location).
EXPOSED = ("Content-Encoding, Content-Location, Content-Range, Content-Type, Date, Location, Server, "
           "Transfer-Encoding, Range-Unit")
MAX_AGE = "86400"  # a day: the browser asks once per (origin, URL, method, headers)


class CorsPolicy:
    """Which origins may read the Data API's answers: all (``origins`` empty) or the ones named."""

    __slots__ = ("origins",)

    def __init__(self, origins: tuple[str, ...] = ()) -> None:
        self.origins = frozenset(o.strip() for o in origins if o.strip())

    @classmethod
    def parse(cls, text: str) -> CorsPolicy:
        """``"https://a.example, https://b.example"``; empty = every origin."""
        return cls(tuple(text.split(",")))

    def _allow(self, origin: str) -> dict[str, str] | None:
        if not self.origins:
            return {"Access-Control-Allow-Origin": "*"}
        if origin in self.origins:
            return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}
        return None

    def preflight(self, method: str, headers: Mapping[str, str]) -> Response | None:
        """The answer to a preflight request, or None when this is not one (or its origin is not
        allowed: then it is served as a plain OPTIONS, with no CORS headers)."""
        if method != "OPTIONS":
            return None
        origin = headers.get("Origin")
        if origin is None or headers.get("Access-Control-Request-Method") is None:
            return None
        allow = self._allow(origin)
        if allow is None:
            return None
        asked = [h.strip() for h in headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
        names: list[str] = []
        seen: set[str] = set()
        for name in ("Authorization", *asked, *SAFELISTED):
            if name.lower() not in seen:
                seen.add(name.lower())
                names.append(name)
        allow |= {"Access-Control-Allow-Methods": METHODS, "Access-Control-Allow-Headers": ", ".join(names),
                  "Access-Control-Max-Age": MAX_AGE}
        return Response(status=200, headers=allow)

    def decorate(self, headers: Mapping[str, str], response: Response) -> None:
        """Let a page on an allowed origin read ``response``."""
        origin = headers.get("Origin")
        if origin is None:
            return
        allow = self._allow(origin)
        if allow is not None:
            response.headers.update(allow)
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
