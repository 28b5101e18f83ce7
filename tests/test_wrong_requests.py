"""Mistakes a new user makes, through the real server: each answer says what to do instead.

- a query parameter `/v1/transcriptions` does not take (`from_time=2&to_time=5` used to be
  ignored, and the whole file transcribed): `400 invalid_parameters`, naming it and the
  parameters the endpoint takes, before the body is read;
- a form endpoint's or the JSON endpoint's fields put in the query string: the same;
- a multipart form or a JSON body sent to `/v1/transcriptions`, which takes the recording
  itself: `415 body_not_audio`, naming the endpoint that takes that shape (by the
  Content-Type's boundary before the body is read, else by the body's first bytes); real
  audio is never refused, whatever its Content-Type says;
- a form without its audio part: `400 missing_audio_part`, naming the part it must carry;
- a language the model cannot do (`language=fr` with the English-only `tiny.en`, which would
  answer in English and say `en`): `400 language_not_supported`, naming the model and what it
  speaks, before the body is read (or, on the OpenAI endpoint's form, before the recording).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .support.audio import SENTENCE_WORDS, has_words
from .support.client import chunked, form_body
from .support.server import Server
from .test_errors import (
    ENDPOINT,
    assert_error_response,
    assert_raw_error,
    raw_connection,
    read_response,
    request_head,
)

pytestmark = pytest.mark.anyio

BOUNDARY = "------------------------d74496d66958873e"  # curl's kind
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


async def refused_unread(
    server: Server, path: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Declare a large body and send none of it: only the request head can be answered."""
    async with raw_connection(server) as stream:
        await stream.send(request_head(path, {"Content-Length": "50000000", **(headers or {})}))
        response = await read_response(stream, within=5)
    assert response.headers.get("connection") == "close", response.headers
    body: dict[str, Any] = response.json()
    body["_status"] = response.status
    return body


# --- query parameters -----------------------------------------------------------------------


async def test_unknown_query_parameters_are_400_naming_them_before_the_body_is_read(
    server: Server,
) -> None:
    async with raw_connection(server) as stream:
        await stream.send(
            request_head(f"{ENDPOINT}?from_time=2&to_time=5", {"Content-Length": "50000000"})
        )
        response = await read_response(stream, within=5)
    assert_raw_error(response, expected=400, code="invalid_parameters")
    message = response.json()["message"]
    assert "'from_time' (did you mean fromTime?)" in message, message
    assert "'to_time' (did you mean toTime?)" in message, message
    assert "takes fromTime, toTime, summarizationType" in message, message
    server.wait_idle()


async def test_one_unknown_parameter_among_good_ones_is_refused(
    server: Server, media: Path
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(
            f"{ENDPOINT}?fromTime=0&toTime=2&speaker=2", content=chunked(audio)
        )
        # The parameters it takes still work, alone.
        fine = await client.post(
            f"{ENDPOINT}?fromTime=0&toTime=2&summarizationType=none",
            content=chunked(audio),
            headers={"Accept": "audio/mpeg"},
        )
    assert_error_response(response, expected=400, code="invalid_parameters")
    message = response.json()["message"]
    assert message.startswith("Unknown query parameter 'speaker';"), message
    assert "did you mean" not in message
    assert fine.status_code == 200, fine.text
    server.wait_idle()


@pytest.mark.parametrize(
    ("path", "where", "fields"),
    [
        ("/trim-and-transcribe", "JSON body", "fileBlob, fromTime, toTime, summarizationType"),
        ("/trim-and-transcribe-multipart", "form", "audio, fromTime, toTime, summarizationType"),
        ("/v1/audio/transcriptions", "form", "file, model, language"),
    ],
)
async def test_body_fields_in_the_query_string_are_400_before_the_body_is_read(
    server: Server, path: str, where: str, fields: str
) -> None:
    body = await refused_unread(server, f"{path}?fromTime=2&to_time=5", {"Content-Type": "x/y"})
    assert (body["_status"], body["code"]) == (400, "invalid_parameters"), body
    message = body["message"]
    assert f"parameters from the {where}, not the query string" in message, message
    assert "move fromTime, toTime (sent as 'to_time') into the" in message, message
    assert fields in message, message
    server.wait_idle()


async def test_other_query_parameters_on_the_form_endpoints_pass(
    server: Server, media: Path
) -> None:
    """Apps in the field and SDKs may add their own (Azure's `api-version`): not refused."""
    client = openai.AsyncOpenAI(
        base_url=server.url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=60,
        default_query={"api-version": "2024-06-01"},
    )
    async with client:
        result = await client.audio.transcriptions.create(
            model="whisper-1", file=("note.wav", (media / "sentence.wav").read_bytes())
        )
    assert has_words(result.text, SENTENCE_WORDS, at_least=4), result.text
    server.wait_idle()


# --- a form or JSON sent where the recording is the body -------------------------------------


async def test_a_form_content_type_on_the_raw_endpoint_is_415_before_the_body_is_read(
    server: Server,
) -> None:
    body = await refused_unread(
        server, f"{ENDPOINT}?fromTime=0&toTime=5", {"Content-Type": FORM_TYPE}
    )
    assert (body["_status"], body["code"]) == (415, "body_not_audio"), body
    message = body["message"]
    assert "not a multipart form" in message, message
    assert "/trim-and-transcribe-multipart (file part 'audio')" in message, message
    assert "/v1/audio/transcriptions (file part 'file'" in message, message
    assert "--data-binary" in message, "it should say how to send the recording itself"
    server.wait_idle()


def _curl_form(audio: bytes) -> bytes:
    return form_body(
        BOUNDARY,
        {"fromTime": "0", "toTime": "5"},
        "audio",
        audio,
        filename="note.wav",
        content_type="audio/wav",
    )


def _legacy_json(audio: bytes) -> bytes:
    return json.dumps(
        {"fromTime": 0, "toTime": 5, "fileBlob": base64.b64encode(audio).decode()}
    ).encode()


@pytest.mark.parametrize(
    ("shape", "content_type", "names"),
    [
        ("form", None, "/trim-and-transcribe-multipart"),
        ("form", "application/octet-stream", "/v1/audio/transcriptions"),
        ("json", "application/json", "/trim-and-transcribe"),
        ("json", None, "'fileBlob'"),
        ("json", "application/x-www-form-urlencoded", "/trim-and-transcribe"),  # curl -d's
    ],
)
async def test_a_form_or_json_body_on_the_raw_endpoint_is_415_by_its_first_bytes(
    server: Server, media: Path, shape: str, content_type: str | None, names: str
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    data = _curl_form(audio) if shape == "form" else _legacy_json(audio)
    headers = {"Content-Type": content_type} if content_type else {}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(
            f"{ENDPOINT}?fromTime=0&toTime=5", content=chunked(data), headers=headers
        )
    assert response.request.headers.get("content-type") == content_type
    assert_error_response(response, expected=415, code="body_not_audio")
    message = response.json()["message"]
    assert ("not a multipart form" if shape == "form" else "not JSON") in message, message
    assert names in message, message
    logged = [
        entry
        for entry in server.request_logs()
        if entry["requestId"] == response.json()["requestId"]
    ]
    assert logged and logged[0]["code"] == "body_not_audio", logged
    server.wait_idle()


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/x-www-form-urlencoded", "text/plain"],
)
async def test_real_audio_is_never_refused_whatever_its_content_type(
    server: Server, media: Path, content_type: str | None
) -> None:
    """The bytes decide: an app that labels every request JSON still gets its transcript."""
    audio = (media / "sentence.wav").read_bytes()
    headers = {"Accept": "audio/mpeg", **({"Content-Type": content_type} if content_type else {})}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(
            f"{ENDPOINT}?fromTime=0&toTime=2", content=chunked(audio, chunk_size=7), headers=headers
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/mpeg"
    server.wait_idle()


# --- a form without its audio part -----------------------------------------------------------


def _form_with_file_in(file_field: str, audio: bytes, *fields: tuple[str, str]) -> bytes:
    """A form whose recording is in `file_field`, plus text `fields`."""
    return form_body(
        BOUNDARY,
        dict(fields),
        file_field,
        audio,
        filename="note.wav",
        content_type="audio/wav",
    )


async def test_a_legacy_form_without_its_audio_part_is_missing_audio_part(
    server: Server, media: Path
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    body = _form_with_file_in("file", audio, ("fromTime", "0"), ("toTime", "5"))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(
            "/trim-and-transcribe-multipart?v=2",  # a query of the app's own is no mistake
            content=chunked(body),
            headers={"Content-Type": FORM_TYPE},
        )
    assert_error_response(response, expected=400, code="missing_audio_part")
    message = response.json()["message"]
    assert "no 'audio' part" in message and "a file part named 'audio'" in message, message
    assert "other parts: 'file'" in message, message
    server.wait_idle()


async def test_an_openai_form_without_its_file_part_is_missing_audio_part(
    server: Server, media: Path
) -> None:
    audio = (media / "sentence.wav").read_bytes()
    body = _form_with_file_in("audio", audio, ("model", "whisper-1"))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(
            "/v1/audio/transcriptions", content=chunked(body), headers={"Content-Type": FORM_TYPE}
        )
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["code"] == "missing_audio_part", answer
    assert "a file part named 'file'" in answer["message"], answer
    assert "other parts: 'audio'" in answer["message"], answer
    # OpenAI's own error object, which the SDKs read, says the same.
    assert answer["error"]["code"] == "missing_audio_part"
    assert answer["error"]["message"] == answer["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    server.wait_idle()


# --- a language the model cannot do -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (f"{ENDPOINT}?language=fr", {}),
        (f"{ENDPOINT}?language=french", {"Accept": "text/event-stream"}),
    ],
)
async def test_a_language_the_model_cannot_do_is_400_before_the_body_is_read(
    server: Server, path: str, headers: dict[str, str]
) -> None:
    body = await refused_unread(server, path, headers)
    assert (body["_status"], body["code"]) == (400, "language_not_supported"), body
    assert "tiny.en" in body["message"] and "English only" in body["message"], body
    server.wait_idle()


async def test_english_is_taken_by_the_english_model(server: Server, media: Path) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        response = await client.post(
            f"{ENDPOINT}?language=en", content=chunked((media / "sentence.wav").read_bytes())
        )
    assert response.status_code == 200, response.text
    assert has_words(response.json()["transcription"], SENTENCE_WORDS, at_least=3)


async def test_the_openai_endpoint_refuses_it_through_the_sdk(server: Server, media: Path) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        await client.audio.transcriptions.create(
            model="whisper-1", file=("note.wav", (media / "sentence.wav").read_bytes()),
            language="fr",
        )  # fmt: skip
    assert raised.value.body["code"] == "language_not_supported"  # type: ignore[index]
    await client.close()
