"""`GET /`: the page to try the service, in headless Chromium against a real server.

The browser is Debian's `chromium`, driven over its DevTools protocol (`support.chromium`); its
microphone is a fake one that plays a sentence spoken by espeak-ng.  The page uploads with
`fetch` and `Accept: text/event-stream`, and shows segments, then the transcript.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .support.audio import SENTENCE_WORDS, has_words, speak
from .support.chromium import Chromium, Page, chromium, fake_microphone
from .support.server import Server

MICROPHONE_WORDS = ("morning", "coffee", "garden")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    folder = tmp_path_factory.mktemp("chromium")
    microphone = speak("Good morning. I drink my coffee in the garden.", folder / "mic.wav")
    with chromium(folder / "profile", *fake_microphone(microphone)) as running:
        yield running


@pytest.fixture
def page(browser: Chromium, server: Server) -> Page:
    opened = browser.new_page()
    opened.open(server.url + "/")
    return opened


def text_of(page: Page, element_id: str) -> str:
    value = page.evaluate(f"document.getElementById({json.dumps(element_id)}).textContent")
    return str(value)


def visible(element_id: str) -> str:
    return f"!document.getElementById({json.dumps(element_id)}).hidden"


def test_the_page_is_served_whole_with_a_strict_policy(server: Server) -> None:
    response = httpx.get(server.url + "/", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'$", policy.split(";")[1]), policy
    assert "connect-src 'self'" in policy
    # Nothing from elsewhere: no external script, style, font or image.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", response.text)


def test_a_chosen_file_is_transcribed_segment_by_segment(
    page: Page, server: Server, media: Path
) -> None:
    page.set_files("#file", media / "padded.wav")
    page.wait_for(visible("resultCard"))
    transcript = text_of(page, "transcript")
    assert has_words(transcript, SENTENCE_WORDS, at_least=4), transcript
    assert text_of(page, "status") == "Done."
    segments = page.evaluate(
        "[...document.querySelectorAll('#segments li')].map(li => li.textContent)"
    )
    assert segments, "no segment was shown"
    assert has_words(" ".join(segments), SENTENCE_WORDS, at_least=4), segments
    assert re.match(r"\d:\d\d\.\d\u2013\d:\d\d\.\d", segments[0]), segments
    assert "s of audio" in text_of(page, "facts")
    assert page.evaluate("document.getElementById('bar').value") == 1
    assert page.evaluate(visible("error")) is False

    # The copy button puts the transcript on the clipboard.
    page.grant(server.url, "clipboardReadWrite", "clipboardSanitizedWrite")
    page.call("Emulation.setFocusEmulationEnabled", enabled=True)
    page.evaluate("document.getElementById('copy').click()")
    page.wait_for("document.getElementById('copy').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == transcript

    assert page.console_errors() == []
    server.wait_idle()


def test_a_recording_from_the_microphone_is_transcribed(page: Page, server: Server) -> None:
    page.evaluate("document.getElementById('record').click()")
    page.wait_for("document.getElementById('record').textContent === 'Stop'", timeout=10)
    page.wait_for("document.getElementById('clock').textContent >= '0:03.0'", timeout=10)
    page.evaluate("document.getElementById('record').click()")
    page.wait_for(visible("resultCard"))
    transcript = text_of(page, "transcript")
    assert has_words(transcript, MICROPHONE_WORDS, at_least=2), transcript
    assert page.evaluate("document.getElementById('record').textContent") == "Record"
    assert page.console_errors() == []
    line = server.request_logs()[-1]
    assert (line["code"], line["answer"], line["format"]) == ("ok", "events", "webm"), line
    server.wait_idle()


def test_errors_are_shown_readably(page: Page, server: Server, tmp_path: Path) -> None:
    """A bad recording (an `error` event), and options refused before the job (plain JSON)."""
    garbage = tmp_path / "note.m4a"
    garbage.write_bytes(b"this is not audio at all\n" * 1000)
    page.set_files("#file", garbage)
    page.wait_for(visible("error"))
    assert text_of(page, "errorText") == (
        "The upload is not a recognizable audio file (undecodable_audio)"
    )
    assert text_of(page, "errorDetail").startswith("HTTP 422 · request ")
    assert page.evaluate(visible("resultCard")) is False

    page.evaluate("document.getElementById('fromTime').value = '5'")
    page.evaluate("document.getElementById('toTime').value = '2'")
    page.evaluate("document.getElementById('error').hidden = true")
    page.set_files("#file", garbage)
    page.wait_for(visible("error"))
    assert text_of(page, "errorText").endswith("(invalid_window)")
    assert text_of(page, "errorDetail").startswith("HTTP 400 · request ")
    server.wait_idle()
