"""An index-last upload framed from its spool while the body still arrives.

The body goes to disk at the network's pace; the framer follows the file as it grows and
hands ffmpeg what `media.index_last` makes of it.  Framing AAC costs CPU (about 0.2 ms an
access unit): reading it from the spool, not from the request, keeps that cost off the
upload, so a slow framer never holds the client back nor delays its idle timeout.
"""

from __future__ import annotations

import anyio
import anyio.to_thread

from vrai_stream.media.ffmpeg_process import FfmpegProcess
from vrai_stream.media.index_last import IndexLastStream
from vrai_stream.spool import FileSpool

FRAMING_SLICE_BYTES = 16 * 1024
"""New bytes that wake the framer (~1 s of AAC at 128 kbit/s): a paced upload is framed a
second at a time, never a chunk at a time."""
FRAMING_READ_BYTES = 128 * 1024
"""The most framed in one hand-over to a worker thread: a fast upload costs the event loop a
hand-over per 128 KiB, not per 16 KiB, and ffmpeg still gets its first frames early."""


class Arrivals:
    """The spool's writer tells its framer that bytes arrived, or that the body ended.

    The framer is woken for a slice's worth of new bytes, not for every chunk: each wake-up
    costs a hand-over to a worker thread on the event loop, and a request body can come in
    pieces of a few hundred bytes.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._unseen = 0
        self.ended = False

    def more(self, count: int) -> None:
        self._unseen += count
        if self._unseen >= FRAMING_SLICE_BYTES:
            self._event.set()

    def end(self) -> None:
        self.ended = True
        self._event.set()

    def expect(self) -> None:
        """Before looking for bytes: a slice written after this wakes `wait`."""
        self._unseen = 0
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


async def frame_spool(
    stream: IndexLastStream, source: FileSpool, arrivals: Arrivals, ffmpeg: FfmpegProcess
) -> None:
    """Frame `source` from its start as it is written, into ffmpeg, to the body's end."""
    with source.path.open("rb") as reader:

        def next_framed() -> tuple[bytes, bool]:
            piece = reader.read(FRAMING_READ_BYTES)
            return stream.feed(piece), bool(piece)

        while True:
            # Both before reading: a byte written after this wakes `wait`, and once the body
            # had ended before a read that found nothing, nothing is left to find.
            ended = arrivals.ended
            arrivals.expect()
            if not ffmpeg.reading:
                stream.stop_output()  # ffmpeg has its window: only the check is left
            framed, read = await anyio.to_thread.run_sync(next_framed)
            if framed:
                await ffmpeg.feed(framed)
            if read:
                continue
            if ended:
                break
            await arrivals.wait()
    framed = await anyio.to_thread.run_sync(stream.finish)
    if framed:
        await ffmpeg.feed(framed)
