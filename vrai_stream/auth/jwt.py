"""Signed JWTs checked against the issuer's JWKS: Firebase ID tokens, or any issuer's.

The token's header only ever chooses a key by `kid` from our own JWKS, and only among the
algorithms we allow for that key's type: `alg: none`, HMAC algorithms (the HS/RS confusion),
and embedded `jwk`/`jku`/`x5u` headers are never trusted.  `jwt` (PyJWT) is imported only
when a token is checked.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from vrai_stream.auth.bearer import bearer_token, invalid_token
from vrai_stream.auth.config import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_LEEWAY_SECONDS,
    FIREBASE_MAX_USER_ID,
    AuthKind,
    usable_user_id,
)
from vrai_stream.auth.jwks import JwksCache, VerificationKey
from vrai_stream.auth.principal import Principal

FIREBASE_JWKS_URL = (
    "https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com"
)
FIREBASE_ISSUER_PREFIX = "https://securetoken.google.com/"

MAX_USER_ID = 255

_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class JwtAuthenticator:
    """Signed JWTs (Firebase ID tokens, or any issuer's) checked against a JWKS."""

    def __init__(
        self,
        *,
        kind: Literal["firebase", "jwt"],
        keys: JwksCache,
        issuer: str,
        audience: tuple[str, ...],
        algorithms: tuple[str, ...],
        user_claim: str = "sub",
        leeway_seconds: float = DEFAULT_LEEWAY_SECONDS,
    ) -> None:
        self.kind: AuthKind = kind
        self.keys = keys
        self._issuer = issuer
        self._audience = list(audience)
        self._algorithms = frozenset(algorithms) & frozenset(ASYMMETRIC_ALGORITHMS)
        self._user_claim = user_claim
        self._leeway = leeway_seconds
        self._firebase = kind == "firebase"
        self._max_user_id = FIREBASE_MAX_USER_ID if self._firebase else MAX_USER_ID
        required = {"exp", "iat", "iss", "aud", user_claim}
        if self._firebase:
            required.add("auth_time")
        self._required = sorted(required)

    async def authenticate(self, authorization_header: str | None) -> Principal:
        import jwt

        token = bearer_token(authorization_header)
        if not _JWT_SHAPE.fullmatch(token):
            raise invalid_token("The token is malformed")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise invalid_token("The token is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise invalid_token("The token's signing algorithm is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise invalid_token("The token does not name its signing key")
        key = await self.keys.key(kid)
        if alg not in key.algorithms:
            raise invalid_token("The token's signing algorithm does not match its key")
        claims = self._decode(token, key, alg)
        user_id = claims.get(self._user_claim)
        if not isinstance(user_id, str) or not usable_user_id(user_id, self._max_user_id):
            raise invalid_token("The token names no usable user")
        if self._firebase:
            auth_time = claims.get("auth_time")
            if not isinstance(auth_time, int | float) or isinstance(auth_time, bool):
                raise invalid_token("The token's sign-in time is malformed")
            if auth_time > time.time() + self._leeway:
                raise invalid_token("The token's sign-in time is in the future")
        return Principal(user_id=user_id, kind=self.kind)

    def _decode(self, token: str, key: VerificationKey, alg: str) -> dict[str, Any]:
        """Signature, then `exp`, `nbf`, `iat`, `iss` and `aud`, each failure in its own words."""
        import jwt

        try:
            return jwt.decode(
                token,
                key.public_key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": self._required},
            )
        except jwt.ExpiredSignatureError:
            raise invalid_token("The token has expired") from None
        except jwt.ImmatureSignatureError:
            raise invalid_token("The token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise invalid_token("The token is meant for another audience") from None
        except jwt.InvalidIssuerError:
            raise invalid_token("The token comes from another issuer") from None
        except jwt.InvalidSignatureError:
            raise invalid_token("The token's signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise invalid_token(f"The token lacks the {exc.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise invalid_token("The token's signing algorithm is not accepted") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise invalid_token("The token is malformed") from None

    async def warm_up(self) -> None:
        await self.keys.warm_up()

    async def aclose(self) -> None:
        await self.keys.aclose()
