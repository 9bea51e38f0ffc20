"""The Data API room: PostgREST-compatible HTTP for every branch and database, woken on request.

``request`` parses, ``query`` builds SQL, ``schema`` caches the catalog, ``auth`` checks tokens,
``actions`` run inside one transaction, ``databases`` holds pools per (branch, database) and is the
one place that talks to the compute room, ``server`` is the HTTP face (over ``http_server``).
"""

from dataapi.auth import ConfigError
from dataapi.server import DataAPI, DataAPIConfig

__all__ = ["ConfigError", "DataAPI", "DataAPIConfig"]
