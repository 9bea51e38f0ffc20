"""The proxy room: the one Postgres endpoint. Sans-I/O wire codec, TLS, SCRAM, routing, wake,
relay, cancel keys, metrics and load signals."""

from proxy.backend import ComputeProvider
from proxy.server import Proxy, ProxyConfig

__all__ = ["ComputeProvider", "Proxy", "ProxyConfig"]
