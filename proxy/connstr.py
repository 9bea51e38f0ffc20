"""The pooled connection string: a branch's URL with ``pool=transaction`` in its ``options``.

``lakelet connstr --pooled`` prints it, as Neon and Lakebase hand every endpoint a pooled string
next to the direct one. The branch is named in ``options`` (``endpoint=NAME``) even for ``main``,
so the string says plainly where it goes and how.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit


def pooled_url(url: str, branch: str) -> str:
    """``url`` (a ``postgresql://`` URL) with ``options=endpoint=BRANCH pool=transaction``; other
    words already in its options (``-c name=value``) are kept, an ``endpoint=`` or ``pool=`` replaced."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept: list[str] = []
    for key, value in query:
        if key == "options":
            kept += [w for w in value.split(" ") if w and not w.startswith(("endpoint=", "pool="))]
    options = " ".join([f"endpoint={branch}", "pool=transaction", *kept])
    rest = [(k, v) for k, v in query if k != "options"] + [("options", options)]
    return urlunsplit(parts._replace(query=urlencode(rest, quote_via=quote)))
