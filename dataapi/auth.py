"""JWT authentication the way PostgREST does it: the token's role claim names the database role the
request runs as; no token means the anonymous role; a bad or expired token is a 401 carrying
``WWW-Authenticate: Bearer error="invalid_token", error_description=…``.

Keys: an HS256/384/512 secret, or a JWKS file (RS*/ES*/PS*/EdDSA keys picked by ``kid``), verified by
PyJWT. The role claim is addressed by PostgREST's JSON path (``.role``, ``.app.roles[0]``,
``."https://example.com/role"``).
"""

from __future__ import annotations

import functools
import json
import re
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
    def __init__(self, secret: str, anon_role: str | None, role_claim: str = ".role") -> None:
        self.anon_role = anon_role or None
        self.claim_path = parse_claim_path(role_claim)
        self._anon = Identity(self.anon_role or "", {"role": self.anon_role}, False)
        self._hmac: bytes | None = None
        self._jwks: jwt.PyJWKSet | None = None
        if secret:
            path = Path(secret)
            if secret.endswith(".json") or (len(secret) < 4096 and path.is_file()):
                try:
                    self._jwks = jwt.PyJWKSet.from_json(path.read_text())
                except (OSError, jwt.PyJWTError, ValueError) as e:
                    raise ConfigError(f"data_api_jwt_secret {secret!r} is not a readable JWKS file: {e}") from None
            else:
                if len(secret) < 32:
                    raise ConfigError("data_api_jwt_secret must be at least 32 characters (or a JWKS file path)")
                self._hmac = secret.encode()

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
        claims = self._verify(token)
        role = self._role(claims)
        if role is None:
            if self.anon_role is None:
                raise ApiError(401, "PGRST302", "Anonymous access is disabled", None, None,
                               {"WWW-Authenticate": "Bearer"})
            role = self.anon_role
        return Identity(role, claims, True)

    def _verify(self, token: str) -> dict[str, Any]:
        parts = token.count(".") + 1
        if parts != 3:
            raise _invalid(f"Expected 3 parts in JWT; got {parts}")
        if self._hmac is None and self._jwks is None:
            raise ApiError(500, "PGRST300", "Server lacks JWT secret", None,
                           "Set data_api_jwt_secret to verify tokens")
        try:
            if self._hmac is not None:
                key: Any = self._hmac
                algorithms = HMAC_ALGORITHMS
            else:
                assert self._jwks is not None
                kid = jwt.get_unverified_header(token).get("kid")
                keys = [k for k in self._jwks.keys if kid is None or k.key_id == kid]
                if not keys:
                    raise _invalid("No suitable key or wrong key type")
                key = keys[0].key
                # Only the key's own algorithm: an HS256 token must not be checked against an RSA or
                # EC public key (the classic algorithm-confusion attack).
                algorithms = KEY_ALGORITHMS.get(keys[0].key_type, [keys[0].algorithm_name])
            claims = jwt.decode(token, key, algorithms=algorithms, leeway=LEEWAY_SECONDS,
                                options={"verify_aud": False, "require": []})
        except jwt.ExpiredSignatureError:
            raise _invalid("JWT expired", "PGRST303") from None
        except jwt.ImmatureSignatureError as e:
            raise _invalid("JWT not yet valid" if "nbf" in str(e) else "JWT issued at future", "PGRST303") from None
        except jwt.InvalidSignatureError:
            raise _invalid("JWT cryptographic operation failed") from None
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise _invalid(f"JWT invalid: {e}") from None
        if not isinstance(claims, dict):
            raise _invalid("JWT claims are not a JSON object")
        return claims

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
