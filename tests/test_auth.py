"""Authentication, unit by unit: static tokens, Firebase ID tokens and any issuer's JWTs.

JWTs are signed with keys the tests make, and the authenticator fetches them for real, over
HTTP, from a JWKS served on loopback (`jwks_server`): caching, refetching on an unknown
`kid`, rate-limiting those refetches and riding out an outage are all seen from the fetch
count of that server.  No HTTP server of ours runs here; the routes' tests check the 401s
that reach a client.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning

from vrai_stream import errors
from vrai_stream.auth.__main__ import main
from vrai_stream.auth.authenticator import create_authenticator
from vrai_stream.auth.config import AuthConfig, hash_token, parse_token_table
from vrai_stream.auth.jwks import cache_ttl
from vrai_stream.auth.jwt import FIREBASE_ISSUER_PREFIX, FIREBASE_JWKS_URL, JwtAuthenticator
from vrai_stream.auth.tokens import OffAuthenticator, TokenAuthenticator
from vrai_stream.settings import ANONYMOUS

from .support.jwks_server import (
    JwksServer,
    SigningKey,
    b64url,
    claims_from,
    hand_made,
    hs256,
    jwks_server,
)

pytestmark = pytest.mark.anyio

ISSUER = "https://issuer.example"
AUDIENCE = "vrai-app"
PROJECT = "vrai-notes-test"
FIREBASE_ISSUER = FIREBASE_ISSUER_PREFIX + PROJECT
PLAIN_CHALLENGE = 'Bearer realm="vrai-stream"'
INVALID_CHALLENGE = 'Bearer realm="vrai-stream", error="invalid_token", error_description="'

Build = Callable[..., JwtAuthenticator]
TIMED = {"exp", "nbf", "iat", "auth_time"}
"""The claims that are times: the parametrized cases give them in seconds from now."""


# --- keys, servers, tokens -------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_a() -> SigningKey:
    return SigningKey.rsa("key-a")


@pytest.fixture(scope="module")
def key_b() -> SigningKey:
    return SigningKey.rsa("key-b")


@pytest.fixture(scope="module")
def key_ec() -> SigningKey:
    return SigningKey.ec("key-ec")


@pytest.fixture
def jwks(key_a: SigningKey) -> Iterator[JwksServer]:
    """Publishes `key_a` only; each test gets its own server, so its own fetch count."""
    with jwks_server(key_a) as server:
        yield server


@pytest.fixture
async def build(jwks: JwksServer) -> AsyncIterator[Build]:
    """Makes JWKS authenticators against `jwks` (settings as keywords); closed afterwards."""
    made: list[JwtAuthenticator] = []

    def make(kind: str = "jwt", **overrides: Any) -> JwtAuthenticator:
        values: dict[str, Any] = {
            "jwks_url": jwks.url,
            "jwks_refresh_interval_seconds": 60.0,
            "jwks_timeout_seconds": 2.0,
        }
        if kind == "jwt":
            values.update(issuer=ISSUER, audience=AUDIENCE)
        else:
            values.update(firebase_project_id=PROJECT)
        values.update(overrides)
        authenticator = create_authenticator(AuthConfig.parse(kind, **values))
        assert isinstance(authenticator, JwtAuthenticator)
        made.append(authenticator)
        return authenticator

    yield make
    for authenticator in made:
        await authenticator.aclose()


def claims(**changes: Any) -> dict[str, Any]:
    """Valid `jwt`-mode claims; a change to `None` drops that claim."""
    return claims_from(ISSUER, AUDIENCE, "user-1", **changes)


def firebase_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return claims(**{"iss": FIREBASE_ISSUER, "aud": PROJECT, "auth_time": now - 3600, **changes})


def from_now(changes: dict[str, Any]) -> dict[str, Any]:
    """Times given as seconds from now become timestamps, so a case means the same every run."""
    now = int(time.time())
    return {
        name: now + value
        if name in TIMED and isinstance(value, int) and not isinstance(value, bool)
        else value
        for name, value in changes.items()
    }


def bearer(token: str) -> str:
    return f"Bearer {token}"


async def refused(authenticator: Any, header: str | None) -> errors.Unauthorized:
    """The 401 for `header`; its message and challenge never carry the token."""
    with pytest.raises(errors.Unauthorized) as caught:
        await authenticator.authenticate(header)
    failure = caught.value
    assert (failure.status, failure.code) == (401, "unauthorized")
    challenge = failure.challenge
    if header:
        token = header.partition(" ")[2].strip()
        if len(token) > 3:
            assert token not in failure.message
            assert token not in challenge
    return failure


async def invalid(authenticator: Any, header: str | None, words: str) -> None:
    failure = await refused(authenticator, header)
    challenge = failure.challenge
    assert challenge.startswith(INVALID_CHALLENGE), challenge
    assert challenge.endswith('"')
    assert words in failure.message, failure.message
    assert words in challenge


# --- configuration ---------------------------------------------------------------------------


def test_off_is_the_default() -> None:
    assert AuthConfig().kind == "off"
    assert isinstance(create_authenticator(AuthConfig()), OffAuthenticator)


@pytest.mark.parametrize(
    ("kind", "values", "words"),
    [
        ("magic", {}, "VRAI_AUTH must be one of"),
        ("token", {}, "VRAI_AUTH_TOKENS"),
        ("firebase", {}, "VRAI_FIREBASE_PROJECT_ID"),
        ("firebase", {"firebase_project_id": "a/b"}, "VRAI_FIREBASE_PROJECT_ID"),
        ("jwt", {}, "VRAI_JWKS_URL, VRAI_JWT_ISSUER, VRAI_JWT_AUDIENCE"),
        ("jwt", {"jwks_url": "https://x.example/k", "issuer": ISSUER}, "VRAI_JWT_AUDIENCE"),
    ],
)
def test_a_mode_without_its_settings_is_refused(
    kind: str, values: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        AuthConfig.parse(kind, **values)


@pytest.mark.parametrize(
    ("algorithms", "words"),
    [
        ("none", "never allowed"),
        ("RS256,none", "never allowed"),
        ("HS256", "shared secret"),
        ("RS256, HS512", "shared secret"),
        ("RS1024", "is not one of"),
    ],
)
def test_algorithms_are_pinned_to_public_key_ones(algorithms: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        AuthConfig.parse(
            "jwt",
            jwks_url="https://issuer.example/jwks.json",
            issuer=ISSUER,
            audience=AUDIENCE,
            algorithms=algorithms,
        )


def test_jwt_config_reads_lists() -> None:
    config = AuthConfig.parse(
        "jwt",
        jwks_url="https://issuer.example/jwks.json",
        issuer=ISSUER,
        audience="app-one, app-two",
        algorithms="RS256,ES256",
        user_claim="uid",
    )
    assert config.audience == ("app-one", "app-two")
    assert config.algorithms == ("RS256", "ES256")
    assert config.user_claim == "uid"


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://issuer.example/jwks.json", True),
        ("http://127.0.0.1:8000/jwks.json", True),
        ("http://localhost/jwks.json", True),
        ("http://issuer.example/jwks.json", False),
        ("file:///etc/jwks.json", False),
        ("jwks.json", False),
    ],
)
def test_keys_come_over_https_except_on_loopback(url: str, accepted: bool) -> None:
    def parse() -> AuthConfig:
        return AuthConfig.parse("jwt", jwks_url=url, issuer=ISSUER, audience=AUDIENCE)

    if accepted:
        assert parse().jwks_url == url
    else:
        with pytest.raises(ValueError, match="VRAI_JWKS_URL"):
            parse()


def test_firebase_derives_everything_from_the_project_id() -> None:
    authenticator = create_authenticator(
        AuthConfig.parse("firebase", firebase_project_id=PROJECT, algorithms="ES256")
    )
    assert isinstance(authenticator, JwtAuthenticator)
    assert authenticator.kind == "firebase"
    assert authenticator.keys.url == FIREBASE_JWKS_URL
    assert authenticator.keys.attempts == 0  # nothing is fetched before warm-up or use


def test_numbers_are_checked() -> None:
    base: dict[str, Any] = {
        "jwks_url": "https://i.example/k",
        "issuer": ISSUER,
        "audience": AUDIENCE,
    }
    with pytest.raises(ValueError, match="VRAI_AUTH_LEEWAY_SECONDS"):
        AuthConfig.parse("jwt", leeway_seconds=-1, **base)
    with pytest.raises(ValueError, match="VRAI_JWKS_CACHE_MIN_SECONDS"):
        AuthConfig.parse("jwt", jwks_cache_min_seconds=10, jwks_cache_max_seconds=5, **base)
    with pytest.raises(ValueError, match="VRAI_JWKS_TIMEOUT_SECONDS"):
        AuthConfig.parse("jwt", jwks_timeout_seconds=0, **base)


# --- the Authorization header, whatever the mode --------------------------------------------


async def test_off_lets_everyone_in_as_anonymous() -> None:
    authenticator = OffAuthenticator()
    for header in (None, "", "Bearer whatever", "Basic dXNlcjpwYXNz"):
        principal = await authenticator.authenticate(header)
        assert (principal.user_id, principal.kind) == (ANONYMOUS, "off")


@pytest.mark.parametrize("header", [None, "", "   ", "Basic dXNlcjpwYXNz", "Token abc"])
async def test_no_bearer_token_gets_a_plain_challenge(header: str | None) -> None:
    authenticator = TokenAuthenticator(parse_token_table(f"alice:{hash_token('s3cret')}"))
    failure = await refused(authenticator, header)
    assert failure.challenge == PLAIN_CHALLENGE
    assert "bearer token" in failure.message
    assert not failure.keeps_debug_copies


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ("Bearer", "empty"),
        ("Bearer    ", "empty"),
        ("Bearer two words", "malformed"),
        ("Bearer caf\u00e9", "malformed"),
        ("Bearer " + "x" * 9000, "too long"),
    ],
)
async def test_a_malformed_bearer_header_is_invalid(header: str, words: str) -> None:
    authenticator = TokenAuthenticator(parse_token_table(f"alice:{hash_token('s3cret')}"))
    await invalid(authenticator, header, words)


# --- static tokens ---------------------------------------------------------------------------

ALICE_TOKEN = "alice-" + "a" * 40
ALICE_SPARE = "alice-spare-" + "c" * 40
BOB_TOKEN = "bob-" + "b" * 40


@pytest.fixture
def tokens() -> TokenAuthenticator:
    table = ",".join(
        (
            f"alice:{hash_token(ALICE_TOKEN)}",
            f" bob:{hash_token(BOB_TOKEN)} ",
            f"alice:{hash_token(ALICE_SPARE).upper().replace('SHA256', 'sha256')}",
        )
    )
    authenticator = create_authenticator(AuthConfig.parse("token", tokens=table))
    assert isinstance(authenticator, TokenAuthenticator)
    return authenticator


async def test_each_static_token_names_its_own_user(tokens: TokenAuthenticator) -> None:
    assert (await tokens.authenticate(bearer(ALICE_TOKEN))).user_id == "alice"
    assert (await tokens.authenticate(bearer(BOB_TOKEN))).user_id == "bob"
    assert (await tokens.authenticate(bearer(ALICE_SPARE))).user_id == "alice"
    assert (await tokens.authenticate(f"bearer  {BOB_TOKEN} ")).kind == "token"


async def test_a_wrong_static_token_is_refused(tokens: TokenAuthenticator) -> None:
    for wrong in (ALICE_TOKEN + "x", ALICE_TOKEN[:-1], hash_token(ALICE_TOKEN), "alice"):
        await invalid(tokens, bearer(wrong), "not recognized")


def test_the_setting_holds_hashes_only() -> None:
    entry = parse_token_table(f"alice:{hash_token(ALICE_TOKEN)}")[0]
    assert hash_token(ALICE_TOKEN) == "sha256:" + hashlib.sha256(ALICE_TOKEN.encode()).hexdigest()
    assert entry.digest == hashlib.sha256(ALICE_TOKEN.encode()).digest()
    assert ALICE_TOKEN not in repr(AuthConfig.parse("token", tokens=f"alice:{hash_token('x')}"))


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ("alice", "user:sha256:<64 hex digits>"),
        ("alice:" + "ab" * 32, "user:sha256:<64 hex digits>"),
        ("alice:md5:" + "ab" * 16, "user:sha256:<64 hex digits>"),
        ("alice:sha256:" + "zz" * 32, "user:sha256:<64 hex digits>"),
        ("alice:sha256:" + "ab" * 31, "user:sha256:<64 hex digits>"),
        ("al\tice:sha256:" + "ab" * 32, "user id"),
        ("alice :sha256:" + "ab" * 32, "user id"),
        (":sha256:" + "ab" * 32, "user id"),
        (f"alice:sha256:{'ab' * 32},bob:sha256:{'AB' * 32}", "listed twice"),
        (" , ", "no tokens"),
    ],
)
def test_a_bad_token_table_is_refused_at_start_up(table: str, words: str) -> None:
    with pytest.raises(ValueError, match="VRAI_AUTH_TOKENS") as caught:
        parse_token_table(table)
    assert words in str(caught.value)


async def test_the_helper_makes_entries_the_setting_accepts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["hash-token", "s3cret"]) == 0
    assert capsys.readouterr().out.strip() == hash_token("s3cret")

    monkeypatch.setattr("sys.stdin", _Stdin("s3cret\n"))
    assert main(["hash-token"]) == 0
    assert capsys.readouterr().out.strip() == hash_token("s3cret")

    assert main(["new-token", "carol"]) == 0
    lines = capsys.readouterr().out.splitlines()
    token = lines[0].rsplit(" ", 1)[1]
    entry = lines[1].rsplit(" ", 1)[1]
    authenticator = TokenAuthenticator(parse_token_table(entry))
    assert (await authenticator.authenticate(bearer(token))).user_id == "carol"


class _Stdin:
    def __init__(self, text: str) -> None:
        self._text = text

    def readline(self) -> str:
        return self._text


# --- JWTs: what verifies and what does not ---------------------------------------------------


async def test_a_valid_token_names_its_subject(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    authenticator = build()
    principal = await authenticator.authenticate(bearer(key_a.sign(claims())))
    assert (principal.user_id, principal.kind) == ("user-1", "jwt")
    # cached: the next tokens verify without another fetch
    for n in range(5):
        token = key_a.sign(claims(sub=f"user-{n}"))
        assert (await authenticator.authenticate(bearer(token))).user_id == f"user-{n}"
    assert jwks.fetches == 1


async def test_a_configured_claim_names_the_user(build: Build, key_a: SigningKey) -> None:
    authenticator = build(user_claim="uid")
    token = key_a.sign(claims(uid="u-42"))
    assert (await authenticator.authenticate(bearer(token))).user_id == "u-42"
    await invalid(authenticator, bearer(key_a.sign(claims())), "lacks the uid claim")


async def test_any_listed_audience_is_accepted(build: Build, key_a: SigningKey) -> None:
    authenticator = build(audience="web, vrai-app")
    token = key_a.sign(claims(aud=["other", "vrai-app"]))
    assert (await authenticator.authenticate(bearer(token))).user_id == "user-1"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"exp": -120}, "has expired"),
        ({"nbf": 600}, "not valid yet"),
        ({"iat": 600}, "not valid yet"),
        ({"aud": "someone-else"}, "another audience"),
        ({"aud": ["a", "b"]}, "another audience"),
        ({"iss": "https://evil.example"}, "another issuer"),
        ({"iss": ISSUER + "/"}, "another issuer"),
        ({"exp": None}, "lacks the exp claim"),
        ({"iat": None}, "lacks the iat claim"),
        ({"aud": None}, "lacks the aud claim"),
        ({"iss": None}, "lacks the iss claim"),
        ({"sub": None}, "lacks the sub claim"),
        ({"sub": ""}, "no usable user"),
        ({"sub": "x" * 256}, "no usable user"),
        ({"sub": "line\nbreak"}, "no usable user"),
        ({"sub": 12345}, "malformed"),
        ({"exp": "tomorrow"}, "malformed"),
    ],
)
async def test_claims_are_checked(
    build: Build, key_a: SigningKey, changes: dict[str, Any], words: str
) -> None:
    await invalid(build(), bearer(key_a.sign(claims(**from_now(changes)))), words)


async def test_clock_leeway_is_a_setting(build: Build, key_a: SigningKey) -> None:
    token = key_a.sign(claims(exp=int(time.time()) - 10, iat=int(time.time()) - 100))
    assert (await build().authenticate(bearer(token))).user_id == "user-1"  # 30 s by default
    await invalid(build(leeway_seconds=0), bearer(token), "has expired")


async def test_alg_none_is_refused_without_a_fetch(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    authenticator = build()
    for alg in ("none", "None", "NONE"):
        token = hand_made({"alg": alg, "typ": "JWT", "kid": key_a.kid}, claims())
        await invalid(authenticator, bearer(token), "algorithm is not accepted")
    assert jwks.fetches == 0
    stripped = key_a.sign(claims()).rsplit(".", 1)[0] + "."  # a real token, signature dropped
    await invalid(authenticator, bearer(stripped), "signature is invalid")


async def test_hs256_signed_with_the_public_key_is_refused(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    """The HS/RS confusion: an attacker MACs a token with the (public) PEM of the RSA key."""
    authenticator = build()
    for secret in (key_a.public_pem(), key_a.public_pem().strip()):
        token = hs256(claims(), secret, key_a.kid)
        await invalid(authenticator, bearer(token), "algorithm is not accepted")
    # not even when the JWKS also carries a symmetric key under that kid, or under its own
    jwks.publish(
        key_a,
        extra=[
            {"kty": "oct", "kid": "shared", "k": b64url(b"shared-secret"), "alg": "HS256"},
            {"kty": "oct", "kid": key_a.kid, "k": b64url(key_a.public_pem())},
        ],
    )
    wider = build(algorithms="RS256,ES256")
    for token in (hs256(claims(), b"shared-secret", "shared"), hs256(claims(), b"x", "key-a")):
        await invalid(wider, bearer(token), "algorithm is not accepted")


async def test_an_algorithm_must_match_its_key(
    build: Build, jwks: JwksServer, key_a: SigningKey, key_ec: SigningKey
) -> None:
    jwks.publish(key_a, key_ec)
    authenticator = build(algorithms="RS256,ES256,PS256")
    assert (await authenticator.authenticate(bearer(key_ec.sign(claims())))).user_id == "user-1"
    # an EC signature claiming to be by the RSA key, and the other way round
    await invalid(authenticator, bearer(key_ec.sign(claims(), kid="key-a")), "match its key")
    await invalid(
        authenticator, bearer(key_a.sign(claims(), kid="key-ec", alg="RS256")), "match its key"
    )
    # the JWK pins RS256: PS256 is refused for that key even though PS256 is allowed
    await invalid(authenticator, bearer(key_a.sign(claims(), alg="PS256")), "match its key")
    # only the algorithms the settings allow, whatever the key could do
    await invalid(build(), bearer(key_a.sign(claims(), alg="RS384")), "algorithm is not accepted")


async def test_a_forged_signature_is_refused(
    build: Build, key_a: SigningKey, key_b: SigningKey
) -> None:
    forged = key_b.sign(claims(), kid=key_a.kid)
    await invalid(build(), bearer(forged), "signature is invalid")
    good = key_a.sign(claims())
    head, _, signature = good.split(".")
    other_body = b64url(json.dumps(claims(sub="admin")).encode())
    await invalid(build(), bearer(f"{head}.{other_body}.{signature}"), "signature is invalid")


@pytest.mark.parametrize(
    ("token", "words"),
    [
        ("garbage", "malformed"),
        ("a.b.c", "malformed"),
        ("a.b", "malformed"),
        ("a.b.c.d", "malformed"),
        ("e30.e30.", "algorithm is not accepted"),  # {} as header: no alg at all
        (b64url(b'{"alg":"RS256"}') + ".e30.c2ln", "does not name its signing key"),
        (b64url(b'{"alg":"RS256","kid":7}') + ".e30.c2ln", "malformed"),
        (b64url(b"[1,2]") + ".e30.c2ln", "malformed"),
    ],
)
async def test_garbage_is_refused(build: Build, jwks: JwksServer, token: str, words: str) -> None:
    await invalid(build(), bearer(token), words)
    assert jwks.fetches == 0


async def test_a_signed_payload_that_is_not_claims_is_malformed(
    build: Build, key_a: SigningKey
) -> None:
    authenticator = build()
    for payload in (b"not json", b"[1, 2]", b'"a string"'):
        token = jwt.PyJWS().encode(
            payload, key_a.private_key, algorithm="RS256", headers={"kid": key_a.kid}
        )
        await invalid(authenticator, bearer(token), "malformed")


async def test_missing_and_basic_get_a_plain_challenge(build: Build) -> None:
    authenticator = build()
    for header in (None, "Basic dXNlcjpwYXNz"):
        failure = await refused(authenticator, header)
        assert failure.challenge == PLAIN_CHALLENGE


# --- Firebase ID tokens ----------------------------------------------------------------------


async def test_a_firebase_id_token_names_its_uid(build: Build, key_a: SigningKey) -> None:
    authenticator = build("firebase")
    token = key_a.sign(firebase_claims(sub="fb-uid-1", email="a@example.com"))
    principal = await authenticator.authenticate(bearer(token))
    assert (principal.user_id, principal.kind) == ("fb-uid-1", "firebase")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"auth_time": 3600}, "sign-in time is in the future"),
        ({"auth_time": None}, "lacks the auth_time claim"),
        ({"auth_time": "yesterday"}, "sign-in time is malformed"),
        ({"auth_time": True}, "sign-in time is malformed"),
        ({"sub": "x" * 129}, "no usable user"),
        ({"sub": ""}, "no usable user"),
        ({"aud": "another-project"}, "another audience"),
        ({"iss": "https://securetoken.google.com/another-project"}, "another issuer"),
        ({"iss": ISSUER}, "another issuer"),
        ({"iat": 3600}, "not valid yet"),
        ({"exp": -3600}, "has expired"),
    ],
)
async def test_firebase_rules(
    build: Build, key_a: SigningKey, changes: dict[str, Any], words: str
) -> None:
    token = key_a.sign(firebase_claims(**from_now(changes)))
    await invalid(build("firebase"), bearer(token), words)


async def test_firebase_accepts_rs256_only(
    build: Build, jwks: JwksServer, key_a: SigningKey, key_ec: SigningKey
) -> None:
    jwks.publish(key_a, key_ec)
    authenticator = build("firebase", algorithms="RS256,ES256,RS512")  # ignored for firebase
    assert (await authenticator.authenticate(bearer(key_a.sign(firebase_claims())))).user_id
    await invalid(
        authenticator, bearer(key_ec.sign(firebase_claims())), "algorithm is not accepted"
    )
    await invalid(
        authenticator,
        bearer(key_a.sign(firebase_claims(), alg="RS512")),
        "algorithm is not accepted",
    )
    token = key_a.sign(firebase_claims(sub="x" * 128))
    assert (await authenticator.authenticate(bearer(token))).user_id == "x" * 128


# --- the JWKS: refetching, rotation, rate limits, outages ------------------------------------

INTERVAL = 0.5
"""The refresh interval where a test counts fetches: what happens within it must not refetch,
so it leaves room for a loaded machine's scheduling hiccups."""


async def test_an_unknown_kid_refetches_once_and_a_rotated_key_then_verifies(
    build: Build, jwks: JwksServer, key_a: SigningKey, key_b: SigningKey
) -> None:
    authenticator = build(jwks_refresh_interval_seconds=INTERVAL)
    by_a, by_b = bearer(key_a.sign(claims())), bearer(key_b.sign(claims()))
    assert await authenticator.authenticate(by_a)
    assert jwks.fetches == 1
    await anyio.sleep(INTERVAL)

    # key-b is not published: one refetch, then 401; the same kid again fetches nothing
    await invalid(authenticator, by_b, "unknown key")
    assert jwks.fetches == 2
    await invalid(authenticator, by_b, "unknown key")
    assert jwks.fetches == 2

    # the issuer rotates to key-b; once the interval has passed, key-b verifies
    jwks.publish(key_b)
    await anyio.sleep(INTERVAL)
    assert (await authenticator.authenticate(by_b)).user_id == "user-1"
    assert jwks.fetches == 3
    # and key-a, gone from the JWKS, no longer does
    await invalid(authenticator, by_a, "unknown key")
    assert jwks.fetches == 3
    assert authenticator.keys.kids == {"key-b"}


async def test_a_flood_of_unknown_kids_costs_one_fetch(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    # signed beforehand: the flood must fit well within one refresh interval
    flood = [bearer(key_a.sign(claims(), kid=secrets.token_hex(8))) for _ in range(200)]
    authenticator = build(jwks_refresh_interval_seconds=INTERVAL)
    await authenticator.warm_up()
    assert jwks.fetches == 1
    await anyio.sleep(INTERVAL)

    outcomes: list[str] = []

    async def attempt(header: str) -> None:
        try:
            await authenticator.authenticate(header)
            outcomes.append("ok")
        except errors.Unauthorized:
            outcomes.append("401")

    async with anyio.create_task_group() as group:
        for header in flood[:100]:
            group.start_soon(attempt, header)
    for header in flood[100:]:
        await attempt(header)
    assert outcomes == ["401"] * 200
    assert jwks.fetches == 2
    # the real key still verifies throughout, from the cache
    assert await authenticator.authenticate(bearer(key_a.sign(claims())))
    assert jwks.fetches == 2


async def test_concurrent_first_requests_share_one_fetch(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    authenticator = build()
    jwks.delay_seconds = 0.2
    users: list[str] = []

    async def one(n: int) -> None:
        token = key_a.sign(claims(sub=f"user-{n}"))
        users.append((await authenticator.authenticate(bearer(token))).user_id)

    async with anyio.create_task_group() as group:
        group.start_soon(authenticator.warm_up)
        for n in range(20):
            group.start_soon(one, n)
    assert sorted(users) == sorted(f"user-{n}" for n in range(20))
    assert jwks.fetches == 1


async def test_warm_up_prefetches_and_never_raises(
    build: Build, jwks: JwksServer, key_a: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    authenticator = build()
    await authenticator.warm_up()
    assert jwks.fetches == 1
    assert authenticator.keys.kids == {"key-a"}
    assert await authenticator.authenticate(bearer(key_a.sign(claims())))
    assert jwks.fetches == 1

    jwks.stop()
    cold = build()
    await cold.warm_up()
    assert "could not fetch the JWKS" in caplog.text


async def test_an_outage_with_keys_in_the_cache_keeps_verifying(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    authenticator = build(
        jwks_cache_min_seconds=0.1, jwks_cache_max_seconds=0.1, jwks_refresh_interval_seconds=0
    )
    await authenticator.warm_up()
    jwks.status = 500
    await anyio.sleep(0.15)  # the cache has expired: the next use tries to refresh
    assert (await authenticator.authenticate(bearer(key_a.sign(claims())))).user_id == "user-1"
    assert jwks.fetches == 2

    jwks.stop()  # and when the endpoint does not even answer
    await anyio.sleep(0.15)
    assert (await authenticator.authenticate(bearer(key_a.sign(claims())))).user_id == "user-1"
    assert authenticator.keys.attempts == 3


@pytest.mark.parametrize("outage", ["refused", "http-500", "not-json", "no-usable-keys"])
async def test_no_keys_at_all_is_auth_unavailable(
    build: Build, jwks: JwksServer, key_a: SigningKey, outage: str
) -> None:
    if outage == "refused":
        jwks.stop()
    elif outage == "http-500":
        jwks.status = 500
    elif outage == "not-json":
        jwks.raw_body = b"<html>maintenance</html>"
    else:
        jwks.publish(extra=[{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}, {"kid": "x"}])
    authenticator = build(jwks_refresh_interval_seconds=5)
    with pytest.raises(errors.AuthUnavailable) as caught:
        await authenticator.authenticate(bearer(key_a.sign(claims())))
    failure = caught.value
    assert (failure.status, failure.code) == (503, "auth_unavailable")
    assert failure.retry_after_seconds == 5
    assert not isinstance(failure, errors.Unauthorized)
    assert not failure.keeps_debug_copies


async def test_the_jwks_comes_back_after_an_outage(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    authenticator = build(jwks_refresh_interval_seconds=INTERVAL)
    token = bearer(key_a.sign(claims()))
    jwks.status = 503
    with pytest.raises(errors.AuthUnavailable):
        await authenticator.authenticate(token)
    with pytest.raises(errors.AuthUnavailable):  # within the interval: no second fetch
        await authenticator.authenticate(token)
    assert jwks.fetches == 1
    jwks.status = 200
    await anyio.sleep(INTERVAL)
    assert (await authenticator.authenticate(token)).user_id == "user-1"
    assert jwks.fetches == 2


async def test_a_hung_jwks_endpoint_times_out(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    authenticator = build(jwks_timeout_seconds=0.3)
    jwks.delay_seconds = 3
    started = time.monotonic()
    with pytest.raises(errors.AuthUnavailable):
        await authenticator.authenticate(bearer(key_a.sign(claims())))
    assert time.monotonic() - started < 1.5


async def assert_fetches_around(
    authenticator: JwtAuthenticator, token: str, jwks: JwksServer, fetches: tuple[int, int]
) -> None:
    """The JWKS fetch count within INTERVAL (twice authenticated) and after it: the cache's life."""
    await authenticator.authenticate(token)
    await authenticator.authenticate(token)
    assert jwks.fetches == fetches[0]
    await anyio.sleep(INTERVAL)
    await authenticator.authenticate(token)
    assert jwks.fetches == fetches[1]


async def test_cache_control_is_followed_within_bounds(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    token = bearer(key_a.sign(claims()))
    # max-age=0 is raised to the floor: no refetch within it, one after it
    jwks.cache_control = "max-age=0"
    floor = build(jwks_cache_min_seconds=INTERVAL, jwks_refresh_interval_seconds=0)
    await assert_fetches_around(floor, token, jwks, (1, 2))

    # a day's max-age is cut to the ceiling
    jwks.cache_control = "public, max-age=86400"
    ceiling = build(
        jwks_cache_min_seconds=0, jwks_cache_max_seconds=INTERVAL, jwks_refresh_interval_seconds=0
    )
    await assert_fetches_around(ceiling, token, jwks, (3, 4))


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 300),
        ("public, max-age=3600, must-revalidate", 3600),
        ("max-age=10", 300),
        ("max-age=999999", 21600),
        ('max-age="7200"', 7200),
        ("max-age=soon", 300),
        ("no-store", 300),
        ("public, no-cache", 300),
        ("private", 300),
    ],
)
def test_cache_ttl(header: str | None, seconds: float) -> None:
    assert cache_ttl(header, 300, 21600) == seconds


async def test_unusable_keys_in_the_jwks_are_skipped(
    build: Build, jwks: JwksServer, key_a: SigningKey
) -> None:
    weak = SigningKey.rsa("weak", bits=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        weak_token = weak.sign(claims())
    encryption = {**SigningKey.rsa("enc").jwk(), "use": "enc"}
    jwks.publish(
        key_a,
        weak,
        extra=[
            encryption,
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            {"kty": "RSA", "kid": "", **{k: v for k, v in key_a.jwk().items() if k != "kid"}},
            "not an object",
        ],
    )
    authenticator = build()
    await authenticator.warm_up()
    assert authenticator.keys.kids == {"key-a"}
    await invalid(authenticator, bearer(weak_token), "unknown key")
