"""Cleanup and summary of a transcript, with the `openai` SDK's chat completions.

The prompts are text files in `vrai_stream/speech/prompts/`; a file of the same name in
`VRAI_PROMPTS_DIR` replaces the bundled one, so a prompt changes without a release.
"""

from __future__ import annotations

import enum
from importlib import resources
from typing import Any

import anyio

from vrai_stream import errors
from vrai_stream.settings import Settings


class SummarizationType(enum.Enum):
    NONE = "none"
    SUMMARIZE = "summarize"
    SIMPLE_CLEANUP = "simple-cleanup"
    WHATSAPP_CLEANUP = "whatsapp-cleanup"

    @classmethod
    def parse(cls, raw: str | None) -> SummarizationType:
        if raw is None or raw.strip() == "":
            return cls.NONE
        try:
            return cls(raw.strip().lower())
        except ValueError:
            allowed = ", ".join(kind.value for kind in cls)
            raise errors.InvalidParameters(
                f"summarizationType must be one of {allowed}; got {raw[:40]!r}"
            ) from None


class Summarizer:
    """Turns a transcript into a summary or a cleaned-up text."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: Any = None
        self._lock = anyio.Lock()

    @property
    def available(self) -> bool:
        return self._settings.openai_api_key is not None

    def check(self, kind: SummarizationType) -> None:
        """Refuse early what cannot be done: a summary with no OpenAI key configured."""
        if kind is not SummarizationType.NONE and not self.available:
            raise errors.SummaryUnavailable(
                "Summaries need an OpenAI API key, and this server has none; "
                "ask with summarizationType=none"
            )

    def prompt(self, kind: SummarizationType) -> str:
        name = f"{kind.value}.txt"
        folder = self._settings.prompts_dir
        if folder is not None and (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")
        return resources.files("vrai_stream.speech").joinpath("prompts", name).read_text("utf-8")

    async def run(self, kind: SummarizationType, transcript: str) -> str:
        """The summary's text; raises `SummaryFailed` with a message safe to show."""
        self.check(kind)
        client = await self._openai()
        import openai

        try:
            with anyio.fail_after(self._settings.openai_deadline_seconds):
                completion = await client.chat.completions.create(
                    model=self._settings.summary_model,
                    messages=[
                        {"role": "system", "content": self.prompt(kind)},
                        {"role": "user", "content": transcript},
                    ],
                    temperature=0.2,
                )
        except TimeoutError:
            raise errors.SummaryFailed("The summary service did not answer in time") from None
        except openai.APITimeoutError:
            raise errors.SummaryFailed("The summary service did not answer in time") from None
        except openai.APIStatusError as exc:
            raise errors.SummaryFailed(f"The summary service answered {exc.status_code}") from None
        except openai.APIError:
            raise errors.SummaryFailed("The summary service could not be reached") from None
        content = completion.choices[0].message.content if completion.choices else None
        if not content:
            raise errors.SummaryFailed("The summary service returned no text")
        return str(content).strip()

    async def _openai(self) -> Any:
        """One SDK client, created on first use: importing `openai` takes about a second."""
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await anyio.to_thread.run_sync(self._create_client)
        return self._client

    def _create_client(self) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=self._settings.openai_api_key,
            base_url=self._settings.openai_base_url,
            timeout=self._settings.openai_timeout_seconds,
            max_retries=self._settings.openai_max_retries,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
