"""JWT authentication the way PostgREST does it: the token's role claim names the database role the
request runs as; no token means the anonymous role; a bad or expired token is a 401 carrying
``WWW-Authenticate: Bearer error="invalid_token", error_description=…``.

Keys: an HS256/384/512 secret, or a JWKS (RS*/ES*/PS*/EdDSA keys picked by ``kid``) from a file or
an ``https://`` URL, verified by PyJWT. A URL's key set is fetched on first use, kept for
``JWKS_TTL`` seconds, and fetched again at once (at most every ``JWKS_RETRY`` seconds) when a token
names a ``kid`` it does not hold — so a rotated key is picked up without a restart. The audience is
checked as PostgREST's ``jwt-aud`` does. The role claim is addressed by PostgREST's JSON path
(``.role``, ``.app.roles[0]``, ``."https://example.com/role"``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from dataapi.errors import ApiError

HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
# Per JWK key type, the algorithms a token signed with that key may name.
KEY_ALGORITHMS = {"RSA": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"], "EC": ["ES256", "ES384", "ES512"],
                  "OKP": ["EdDSA"], "oct": HMAC_ALGORITHMS}
LEEWAY_SECONDS = 30  # PostgREST allows the same clock skew
JWKS_TTL = 300.0      # a fetched key set is used this long before it is fetched again
JWKS_RETRY = 10.0     # an unknown kid fetches at most this often (a flood of forged kids fetches nothing)
JWKS_TIMEOUT = 5.0
# Verified tokens are kept (PostgREST's JWT cache): a token seen again skips the signature check
# until its exp (with the leeway) or JWT_CACHE_SECONDS, whichever comes first.
JWT_CACHE_ENTRIES = 1000
JWT_CACHE_SECONDS = 300.0
JWT_CACHE_TOKEN_CHARS = 4096

log = logging.getLogger("lakelet.dataapi")

_STEP = re.compile(r'\.(?:"((?:[^"\\]|\\.)*)"|([^."\[]+))|\[(\d+)\]')


class ConfigError(ValueError):
    """A Data API authentication setting Lakelet cannot use."""


def parse_claim_path(text: str) -> tuple[str | int, ...]:
    text = text.strip()
    if not text.startswith((".", "[")):
        text = "." + text
    steps: list[str | int] = []
    pos = 0
    while pos < len(text):
        m = _STEP.match(text, pos)
        if not m:
            raise ConfigError(f"data_api_jwt_role_claim = {text!r} is not a claim path like .role or .app.roles[0]")
        if m.group(3) is not None:
            steps.append(int(m.group(3)))
        else:
            steps.append(m.group(1) if m.group(1) is not None else m.group(2))
        pos = m.end()
    return tuple(steps)


@dataclass(frozen=True)
class Identity:
    role: str
    claims: dict[str, Any]
    authenticated: bool

    @functools.cached_property
    def claims_text(self) -> str:
        """``request.jwt.claims`` as sent to the database (the anonymous identity is one shared
        object, so this is computed once for it)."""
        return json.dumps(self.claims)


def _invalid(message: str, code: str = "PGRST301") -> ApiError:
    description = message.replace('"', "'")
    return ApiError(401, code, message, None, None,
                    {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'})


class Authenticator:
    def __init__(self, secret: str, anon_role: str | None, role_claim: str = ".role", audience: str = "") -> None:
        self.anon_role = anon_role or None
        self.audience = audience or None
        self.claim_path = parse_claim_path(role_claim)
        self._anon = Identity(self.anon_role or "", {"role": self.anon_role}, False)
        self._hmac: bytes | None = None
        self._jwks: jwt.PyJWKSet | None = None
        self.jwks_url: str | None = None
        self._fetched_at = 0.0
        self._fetch_lock = asyncio.Lock()
        self._fetch_error = ""
        self._verified: dict[str, tuple[Identity, float]] = {}   # token → (identity, until), oldest first
        if secret.startswith(("https://", "http://")):
            host = secret.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
            if secret.startswith("http://") and host not in ("127.0.0.1", "localhost", "[::1]"):
                raise ConfigError(f"data_api_jwt_secret {secret!r}: fetch a JWKS over https:// (http:// only "
                                  "from this machine)")
            self.jwks_url = secret
        elif secret:
            path = Path(secret)
            if secret.endswith(".json") or (len(secret) < 4096 and path.is_file()):
                try:
                    self._jwks = jwt.PyJWKSet.from_json(path.read_text())
                except (OSError, jwt.PyJWTError, ValueError) as e:
                    raise ConfigError(f"data_api_jwt_secret {secret!r} is not a readable JWKS file: {e}") from None
            else:
                if len(secret) < 32:
                    raise ConfigError("data_api_jwt_secret must be at least 32 characters (or a JWKS file path "
                                      "or URL)")
                self._hmac = secret.encode()

    async def refresh(self, authorization: str | None) -> None:
        """With a JWKS URL: make sure the key set is fresh enough for this request's token (fetch
        when never fetched, older than ``JWKS_TTL``, or missing the token's ``kid``)."""
        if self.jwks_url is None or not authorization:
            return
        now = time.monotonic()
        stale = self._jwks is None or now - self._fetched_at > JWKS_TTL
        if not stale:
            try:
                kid = jwt.get_unverified_header(authorization.strip().partition(" ")[2].strip()).get("kid")
            except jwt.PyJWTError:
                return  # authenticate() answers the malformed token
            assert self._jwks is not None
            stale = kid is not None and all(k.key_id != kid for k in self._jwks.keys)
            if stale and now - self._fetched_at < JWKS_RETRY:
                return
        if stale:
            async with self._fetch_lock:
                if time.monotonic() - self._fetched_at >= min(JWKS_RETRY, JWKS_TTL) or self._jwks is None:
                    await self._fetch()

    async def _fetch(self) -> None:
        import aiohttp

        assert self.jwks_url is not None
        self._fetched_at = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.jwks_url) as r:
                if r.status != 200:
                    raise ValueError(f"HTTP {r.status}")
                text = await r.text()
            self._jwks = jwt.PyJWKSet.from_json(text)
            self._fetch_error = ""
        except (OSError, TimeoutError, ValueError, jwt.PyJWTError, aiohttp.ClientError) as e:
            self._fetch_error = f"{type(e).__name__}: {e}"
            log.warning("could not fetch the JWKS; keeping the keys fetched before, if any",
                        extra={"url": self.jwks_url, "error": self._fetch_error})

    def authenticate(self, authorization: str | None) -> Identity:
        token = None
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        if token is None:
            if self.anon_role is None:
                raise ApiError(401, "PGRST302", "Anonymous access is disabled", None, None,
                               {"WWW-Authenticate": "Bearer"})
            return self._anon
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None:
            if now < cached[1]:
                return cached[0]
            del self._verified[token]
        claims = self._verify(token)
        role = self._role(claims)
        if role is None:
            if self.anon_role is None:
                raise ApiError(401, "PGRST302", "Anonymous access is disabled", None, None,
                               {"WWW-Authenticate": "Bearer"})
            role = self.anon_role
        identity = Identity(role, claims, True)
        if len(token) <= JWT_CACHE_TOKEN_CHARS:
            exp = claims.get("exp")
            until = now + JWT_CACHE_SECONDS
            if isinstance(exp, int | float) and not isinstance(exp, bool):
                until = min(until, exp + LEEWAY_SECONDS)  # never past the moment verifying would refuse it
            if len(self._verified) >= JWT_CACHE_ENTRIES:
                self._verified.pop(next(iter(self._verified)))
            self._verified[token] = (identity, until)
        return identity

    def _verify(self, token: str) -> dict[str, Any]:
        parts = token.count(".") + 1
        if parts != 3:
            raise _invalid(f"Expected 3 parts in JWT; got {parts}")
        if self._hmac is None and self._jwks is None:
            if self.jwks_url is not None:
                raise ApiError(500, "PGRST300", "Server lacks JWT secret",
                               f"The JWKS at {self.jwks_url} could not be fetched: {self._fetch_error}",
                               "Check that data_api_jwt_secret's URL serves a JWKS; it is fetched again on "
                               "the next request")
            raise ApiError(500, "PGRST300", "Server lacks JWT secret", None,
                           "Set data_api_jwt_secret to verify tokens")
        try:
            if self._hmac is not None:
                candidates: list[tuple[Any, list[str]]] = [(self._hmac, HMAC_ALGORITHMS)]
            else:
                assert self._jwks is not None
                kid = jwt.get_unverified_header(token).get("kid")
                keys = [k for k in self._jwks.keys if kid is None or k.key_id == kid]
                if not keys:
                    raise _invalid("No suitable key or wrong key type")
                # Only each key's own algorithms: an HS256 token must not be checked against an RSA or
                # EC public key (the classic algorithm-confusion attack). Without a kid, every key
                # is tried in turn.
                candidates = [(k.key, KEY_ALGORITHMS.get(k.key_type, [k.algorithm_name])) for k in keys]
            claims: Any = None
            for i, (key, algorithms) in enumerate(candidates):
                try:
                    claims = jwt.decode(token, key, algorithms=algorithms, leeway=LEEWAY_SECONDS,
                                        options={"verify_aud": False, "require": []})
                    break
                except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
                    if i == len(candidates) - 1:
                        raise
        except jwt.ExpiredSignatureError:
            raise _invalid("JWT expired", "PGRST303") from None
        except jwt.ImmatureSignatureError as e:
            raise _invalid("JWT not yet valid" if "nbf" in str(e) else "JWT issued at future", "PGRST303") from None
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
            raise _invalid("JWT cryptographic operation failed") from None
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise _invalid(f"JWT invalid: {e}") from None
        if not isinstance(claims, dict):
            raise _invalid("JWT claims are not a JSON object")
        if self.audience is not None and not self._audience_ok(claims.get("aud")):
            raise _invalid("JWT not in audience", "PGRST303")
        return claims

    def _audience_ok(self, aud: Any) -> bool:
        """PostgREST's ``jwt-aud``: no audience (absent, null, []) passes; a string must be the
        configured one; a list must contain it."""
        if aud is None or aud == []:
            return True
        if isinstance(aud, str):
            return aud == self.audience
        if isinstance(aud, list):
            return self.audience in aud
        return False

    def _role(self, claims: dict[str, Any]) -> str | None:
        value: Any = claims
        for step in self.claim_path:
            if isinstance(step, int):
                if not isinstance(value, list) or step >= len(value):
                    return None
                value = value[step]
            else:
                if not isinstance(value, dict) or step not in value:
                    return None
                value = value[step]
        return value if isinstance(value, str) and value else None


def claims_json(identity: Identity) -> str:
    return identity.claims_text
