"""The proxy room: the one Postgres endpoint. Sans-I/O wire codec, TLS, SCRAM, routing, wake,
relay, cancel keys, metrics and load signals."""

from proxy import native  # noqa: F401 - first: loads the pooler's compiled modules when built (proxy/native.py)
from proxy.backend import ComputeProvider
from proxy.server import Proxy, ProxyConfig

__all__ = ["ComputeProvider", "Proxy", "ProxyConfig"]
