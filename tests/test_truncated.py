"""Uploads cut short: the answer says so, where the container declares its length.

A faststart M4A cut at 30% used to come back 200 with 3 s of a 10 s recording and no sign
that the rest was missing.  Now the answer is still 200 with the words that did arrive, and
`truncated: true` with `declaredSeconds` (and `X-Truncated: true` on an MP3 answer or the
OpenAI-compatible endpoint's), in JSON, in events and on the legacy form alike.  A
window that ends before the cut is whole, and so is an uncut file.  Real server, real
ffmpeg, real speech recognition.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from .support.client import chunked, form_body
from .support.phone_media import CLIP_SECONDS, PhoneFile, phone_files
from .support.server import Server
from .support.sse import parse_events

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def phones(media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhoneFile]:
    return phone_files(tmp_path_factory.getbasetemp() / "phones", media / "sentence.wav")


async def post(server: Server, data: bytes, query: str = "", mp3: bool = False) -> httpx.Response:
    headers = {"Accept": "audio/mpeg"} if mp3 else {}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        return await client.post(
            f"/v1/transcriptions{query}", content=chunked(data), headers=headers
        )


@pytest.mark.parametrize("name", ["m4a-faststart", "wav", "caf-aac-pakt-first", "caf-lpcm"])
async def test_a_file_cut_at_30_percent_says_it_is_truncated(
    server: Server, phones: dict[str, PhoneFile], name: str
) -> None:
    data = phones[name].read()
    cut = data[: int(len(data) * 0.3)]
    response = await post(server, cut)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["truncated"] is True, body
    assert body["declaredSeconds"] == pytest.approx(CLIP_SECONDS, abs=0.2)
    assert body["duration"] < 0.5 * CLIP_SECONDS
    logged = server.request_log(body["requestId"])
    assert logged["truncated"] is True and logged["declaredSeconds"] == pytest.approx(
        CLIP_SECONDS, abs=0.2
    )
    server.wait_idle()


async def test_the_mp3_answer_of_a_cut_file_says_so_in_a_header(
    server: Server, phones: dict[str, PhoneFile]
) -> None:
    data = phones["m4a-faststart"].read()
    response = await post(server, data[: len(data) // 2], mp3=True)
    assert response.status_code == 200
    assert response.headers["x-truncated"] == "true"
    whole = await post(server, data, mp3=True)
    assert "x-truncated" not in whole.headers
    server.wait_idle()


@pytest.mark.parametrize(
    ("share", "query", "truncated"),
    [
        (1.0, "", False),  # the whole file
        (0.6, "?fromTime=0&toTime=2", False),  # the window ends before the cut
        (0.6, "?fromTime=0&toTime=9", True),
    ],
)
async def test_truncated_only_when_the_window_wanted_what_never_came(
    server: Server, phones: dict[str, PhoneFile], share: float, query: str, truncated: bool
) -> None:
    data = phones["wav"].read()
    response = await post(server, data[: int(len(data) * share)], query, mp3=True)
    assert response.status_code == 200
    assert ("x-truncated" in response.headers) is truncated


async def test_a_container_that_declares_no_length_is_never_called_truncated(
    server: Server, phones: dict[str, PhoneFile]
) -> None:
    data = phones["ogg-opus"].read()
    response = await post(server, data[: int(len(data) * 0.5)])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["truncated"] is False and body["declaredSeconds"] is None


BOUNDARY = "vrai-truncated-boundary"


async def test_every_way_of_answering_says_a_file_was_cut(
    server: Server, phones: dict[str, PhoneFile]
) -> None:
    """Events carry it in `done`, the legacy form in its body, the OpenAI-compatible endpoint
    (whose bodies have no field for it) in `X-Truncated`."""
    data = phones["m4a-faststart"].read()
    cut = data[: int(len(data) * 0.3)]
    form = form_body(BOUNDARY, {"fromTime": "0", "toTime": "9"}, "audio", cut,
                     filename="note.m4a", content_type="audio/mp4")  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        streamed = await client.post(
            "/v1/transcriptions", content=chunked(cut), headers={"Accept": "text/event-stream"}
        )
        legacy = await client.post(
            "/trim-and-transcribe-multipart",
            content=chunked(form),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
    done = parse_events(streamed.text)[-1]
    assert done.name == "done" and done.data["truncated"] is True, done
    assert legacy.status_code == 200, legacy.text
    assert legacy.json()["truncated"] is True
    client_ = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    raw = await client_.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("note.m4a", cut, "audio/mp4")
    )
    await client_.close()
    assert raw.headers["x-truncated"] == "true"
    server.wait_idle()
