"""Stage 2: SCRAM-SHA-256 at the proxy, against the role's verifier from the control plane.

Nothing is woken for a wrong password or an unknown role, and repeated failures from one address
are answered more and more slowly.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

from proxy import codec
from proxy.errors import AuthError, HandshakeError
from proxy.pipe import Side
from proxy.scram import MECHANISM, MECHANISM_PLUS, ScramError, ScramServer, Verifier

MAX_DELAY = 5.0
FORGET_AFTER = 300.0


class FailureThrottle:
    """Per client address: after N recent failures, the next failure answers after 0.1·2^(N-1) s."""

    def __init__(self) -> None:
        self._failures: dict[str, tuple[int, float]] = {}

    def delay(self, address: str) -> float:
        count, last = self._failures.get(address, (0, 0.0))
        if not count or time.monotonic() - last > FORGET_AFTER:
            return 0.0
        return min(MAX_DELAY, 0.1 * 2 ** (count - 1))

    def failed(self, address: str) -> None:
        count, last = self._failures.get(address, (0, 0.0))
        if time.monotonic() - last > FORGET_AFTER:
            count = 0
        self._failures[address] = (count + 1, time.monotonic())
        if len(self._failures) > 100_000:  # bounded memory under a spray of addresses
            self._failures.clear()

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


@functools.lru_cache(maxsize=4096)
def _parse_verifier(text: str) -> Verifier | None:
    """Parsed once per verifier text (three base64 decodes on every connection otherwise); an MD5 or
    empty password gives None: not accepted here, it fails like a wrong one."""
    try:
        return Verifier.parse(text)
    except ScramError:
        return None


async def authenticate(side: Side, *, role: str, verifier_text: str | None, cert_hash: bytes | None,
                       throttle: FailureThrottle, address: str, on_failure: Callable[[], None]) -> bytes:
    """Run the SCRAM exchange. On success, return SASLFinal + AuthenticationOk for the caller to
    send together with the compute's greeting: one write instead of two per connection, and a
    client never hears "ok" for a session the compute then fails to open."""
    failed_as = AuthError(f'password authentication failed for user "{role}"')
    verifier = _parse_verifier(verifier_text) if verifier_text else None
    mechanisms = [MECHANISM_PLUS, MECHANISM] if cert_hash is not None else [MECHANISM]
    side.write(codec.auth_sasl(mechanisms))
    try:
        initial = codec.parse_sasl_initial(await side.read_message(codec.MAX_AUTH_MESSAGE))
        if initial.mechanism not in mechanisms:
            raise HandshakeError(f"SASL mechanism {initial.mechanism!r} is not offered")
        server = ScramServer(verifier or Verifier.dummy(role), mechanism=initial.mechanism, cert_hash=cert_hash)
        side.write(codec.auth_sasl_continue(server.first(initial.data)))
        final = server.final(codec.parse_sasl_response(await side.read_message(codec.MAX_AUTH_MESSAGE)))
        if verifier is None:
            raise ScramError("unknown role")
    except codec.ProtocolError as e:
        raise HandshakeError(str(e), e.sqlstate) from None
    except ScramError:
        on_failure()
        delay = throttle.delay(address)
        throttle.failed(address)
        if delay:
            await asyncio.sleep(delay)
        raise failed_as from None
    throttle.succeeded(address)
    return codec.auth_sasl_final(final) + codec.auth_ok()
