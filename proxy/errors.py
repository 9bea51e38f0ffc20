"""Each stage of a session fails with its own error; each carries what the client is told."""

from __future__ import annotations


class SessionError(Exception):
    """Sent to the client as a FATAL ErrorResponse with ``sqlstate``, then the session closes."""

    sqlstate = "08000"
    outcome = "error"

    def __init__(self, message: str, sqlstate: str | None = None, *, hint: str | None = None) -> None:
        super().__init__(message)
        if sqlstate:
            self.sqlstate = sqlstate
        self.hint = hint


class HandshakeError(SessionError):
    sqlstate = "08P01"
    outcome = "protocol_error"


class InvalidStartupPacket(HandshakeError):
    """Bytes that are not a startup packet at all: logged and counted, the socket closed quietly,
    as Postgres does — a client that already gave up must not read an error as its own."""

    outcome = "invalid_startup_packet"


class RoutingError(SessionError):
    sqlstate = "3D000"
    outcome = "unknown_endpoint"


class AuthError(SessionError):
    sqlstate = "28P01"
    outcome = "auth_failed"


class WakeTimeout(SessionError):
    sqlstate = "57P03"
    outcome = "wake_failed"


class ConnectError(SessionError):
    sqlstate = "08006"
    outcome = "connect_failed"


class TooManyConnections(SessionError):
    sqlstate = "53300"
    outcome = "too_many_connections"


class PoolTimeout(SessionError):
    """A pooled client waited pool_timeout for a backend (transaction pooling)."""

    sqlstate = "53300"
    outcome = "pool_timeout"
