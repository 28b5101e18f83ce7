"""Who is asking: the bearer token, checked before one byte of a request's body is read.

`VRAI_AUTH` picks one of four modes:

- `off`: everyone is `anonymous` (the embedded default, for local use).
- `token`: static tokens mapped to user ids, stored in the setting as SHA-256 hashes, so the
  environment never holds a usable token; compared in constant time.
- `firebase`: Firebase ID tokens, RS256 against Google's published keys, with Firebase's own
  rules for `iss`, `aud`, `auth_time` and `sub`.
- `jwt`: any issuer that publishes a JWKS, with the algorithms pinned by a setting.

A missing or bad token is a 401 whose `WWW-Authenticate` says what is wrong in fixed words,
never echoing the token.  Keys that cannot be fetched are a 503 `auth_unavailable`: the user
did nothing wrong, so a 401 would send the app to its sign-in screen for no reason.

The parts: `config` (the settings' `AuthConfig` and the static token table), `principal`
(`Principal` and the `Authenticator` protocol), `bearer` (the `Authorization` header and its
401s), `tokens` (the `off` and `token` modes), `jwks` (fetching and caching the issuer's
keys), `jwt` (JWT checks, for `firebase` and `jwt`), `authenticator` (`create_authenticator`)
and `__main__` (`python -m vrai_stream.auth`, to make and hash static tokens).

This file imports nothing: `vrai_stream.settings` imports `vrai_stream.auth.config`, which
runs this file first, and the settings must not pull in the authenticators.
"""
