"""`GET /openapi.json`: it describes what the app serves, and a fuzzer run against it finds no 5xx.

The fuzzing is schemathesis's, driven by the document the live server serves: every
operation gets generated requests (valid and invalid query parameters, bodies and headers),
sent to a real server, and no answer may be a 5xx; every error must be the service's JSON
error shape.  The server has an OpenAI key pointing at `FakeOpenAI`, so a summary is always
possible: with no key, `summarizationType=summarize` would be a 503 by design.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from starlette.routing import Route

import vrai_stream
from vrai_stream import errors
from vrai_stream.http.app import create_app
from vrai_stream.http.openapi import build_openapi
from vrai_stream.settings import Settings

from .support.fake_openai import FakeOpenAI
from .support.server import Server, start_server

UPSTREAM_KEY = f"sk-openapi-{secrets.token_hex(8)}"
AUDIO_OPERATIONS = (
    "/v1/transcriptions",
    "/trim-and-transcribe",
    "/trim-and-transcribe-multipart",
    "/v1/audio/transcriptions",
)
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory, upstream: FakeOpenAI) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("openapi"),
        {
            **upstream.server_env(),
            "VRAI_OPENAI_MAX_RETRIES": "0",
        },
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def document(api_server: Server) -> dict[str, Any]:
    response = httpx.get(f"{api_server.url}/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    served: dict[str, Any] = response.json()
    return served


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def every_service_error() -> set[type[errors.ServiceError]]:
    """Every `ServiceError` the package defines, wherever it is defined."""
    for module in pkgutil.walk_packages(vrai_stream.__path__, "vrai_stream."):
        importlib.import_module(module.name)
    found: set[type[errors.ServiceError]] = set()
    pending = [errors.ServiceError]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass.__module__.startswith("vrai_stream."):
                found.add(subclass)
            pending.append(subclass)
    return found


# --- the document -----------------------------------------------------------------------------


def test_the_served_document_is_the_built_one(document: dict[str, Any]) -> None:
    assert document == json.loads(json.dumps(build_openapi()))
    assert document["openapi"].startswith("3.1")


def test_every_route_the_app_serves_is_described(document: dict[str, Any]) -> None:
    app = create_app(Settings.from_env({}))
    served = {
        (route.path, method)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD" or "GET" not in (route.methods or ())  # Starlette adds it to GETs
    }
    assert served, "the app has no routes?"
    missing = served - operations(document)
    assert not missing, f"served but not described: {sorted(missing)}"
    assert operations(document) <= served, "described but not served"


def test_every_error_code_is_in_the_error_schema(document: dict[str, Any]) -> None:
    """`ALL_ERRORS`, and any `ServiceError` defined anywhere in the package: a code a client
    can be answered with, missing from the schema, makes that answer contradict it."""
    documented = set(document["components"]["schemas"]["Error"]["properties"]["code"]["enum"])
    assert {error.code for error in errors.ALL_ERRORS} <= documented
    defined = {error.code for error in every_service_error()}
    assert {"invalid_json", "invalid_base64", "invalid_multipart", "field_too_large"} <= defined
    assert defined - documented == set(), "defined in the package, missing from the document"


COMMON_ERRORS: tuple[type[errors.ServiceError], ...] = (
    errors.InvalidParameters,
    errors.InvalidWindow,
    errors.EmptyBody,
    errors.Unauthorized,
    errors.AuthUnavailable,  # authentication comes first, and the issuer's keys may be out of reach
    errors.UploadTimeout,
    errors.BodyTooLarge,
    errors.UndecodableAudio,
    errors.UnsupportedFormat,
    errors.NoAudioInWindow,
    errors.TranscodeTimeout,
    errors.TranscriptionFailed,
    errors.Busy,
    errors.TranscriberUnavailable,
    errors.TranscriptionTimeout,
    errors.DiskFull,
    errors.InternalError,
)
OPERATION_ERRORS: dict[str, tuple[type[errors.ServiceError], ...]] = {
    "/v1/transcriptions": (errors.SummaryUnavailable, errors.BodyNotAudio),
    "/trim-and-transcribe": (
        errors.SummaryUnavailable,
        errors.InvalidJson,
        errors.InvalidBase64,
        errors.FieldTooLarge,
    ),
    "/trim-and-transcribe-multipart": (
        errors.SummaryUnavailable,
        errors.InvalidMultipart,
        errors.MissingAudioPart,
        errors.FieldTooLarge,
    ),
    "/v1/audio/transcriptions": (
        errors.InvalidMultipart,
        errors.MissingAudioPart,
        errors.FieldTooLarge,
    ),
}


@pytest.mark.parametrize("path", AUDIO_OPERATIONS)
def test_each_audio_operation_lists_the_codes_it_can_answer(
    document: dict[str, Any], path: str
) -> None:
    responses = document["paths"][path]["post"]["responses"]
    missing = []
    for error in (*COMMON_ERRORS, *OPERATION_ERRORS[path]):
        described = responses.get(str(error.status), {}).get("description", "")
        if f"`{error.code}`" not in described:
            missing.append(f"{error.status} {error.code}")
    assert not missing, f"POST {path} does not list: {', '.join(missing)}"
    for status, response in responses.items():
        if status.startswith(("4", "5")):
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}


# --- no 5xx, whatever is sent -----------------------------------------------------------------


# The document the server serves is `build_openapi()` (the first test checks it), so the
# cases are generated from it at import time and sent to the live server.  (schemathesis's
# lazy `from_fixture` loader, which could fetch it from the server, needs a pytest private
# attribute that pytest 9.2 no longer has.)
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(build_openapi())))
# The recordings' media types: bodies of bytes, as `application/octet-stream` is sent.
schemathesis.serializer.alias(
    [
        media
        for media in build_openapi()["paths"]["/v1/transcriptions"]["post"]["requestBody"][
            "content"
        ]
        if media != "application/octet-stream"
    ],
    "application/octet-stream",
)
schemathesis.serializer.alias("application/partial-upload", "application/octet-stream")


def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Any 4xx is the service's JSON error shape, its status and code included (a HEAD's
    answer has no body, by HTTP's rules)."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), (
        response.headers
    )
    body = json.loads(response.content)
    assert body["success"] is False, body
    assert body["status"] == response.status_code, body
    assert isinstance(body["code"], str) and body["code"], body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body["requestId"], str), body
    return None


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_5xx(case: Any, api_server: Server) -> None:
    case.call_and_validate(
        base_url=api_server.url,
        timeout=30,
        checks=[not_a_server_error, error_shape],
    )
