"""`create_authenticator`: the authenticator that `AuthConfig.kind` names.

Building one is cheap and fetches nothing; `jwt`, `httpx` and `cryptography` stay unimported
until a JWKS authenticator runs.
"""

from __future__ import annotations

from vrai_stream.auth.config import AuthConfig
from vrai_stream.auth.jwks import JwksCache
from vrai_stream.auth.jwt import FIREBASE_ISSUER_PREFIX, FIREBASE_JWKS_URL, JwtAuthenticator
from vrai_stream.auth.principal import Authenticator
from vrai_stream.auth.tokens import OffAuthenticator, TokenAuthenticator


def create_authenticator(config: AuthConfig) -> Authenticator:
    """The authenticator for `config.kind`; cheap, fetches nothing until `warm_up` or use."""
    if config.kind == "off":
        return OffAuthenticator()
    if config.kind == "token":
        return TokenAuthenticator(config.tokens)
    if config.kind == "firebase":
        assert config.firebase_project_id
        url = config.jwks_url or FIREBASE_JWKS_URL
        issuer = FIREBASE_ISSUER_PREFIX + config.firebase_project_id
        audience: tuple[str, ...] = (config.firebase_project_id,)
        algorithms: tuple[str, ...] = ("RS256",)
        user_claim = "sub"
    else:
        assert config.jwks_url and config.issuer
        url, issuer, audience = config.jwks_url, config.issuer, config.audience
        algorithms, user_claim = config.algorithms, config.user_claim
    keys = JwksCache(
        url,
        timeout_seconds=config.jwks_timeout_seconds,
        min_ttl_seconds=config.jwks_cache_min_seconds,
        max_ttl_seconds=config.jwks_cache_max_seconds,
        refresh_interval_seconds=config.jwks_refresh_interval_seconds,
    )
    return JwtAuthenticator(
        kind=config.kind,
        keys=keys,
        issuer=issuer,
        audience=audience,
        algorithms=algorithms,
        user_claim=user_claim,
        leeway_seconds=config.leeway_seconds,
    )
