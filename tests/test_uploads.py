"""`read_submission`: fields first streams the audio; audio first goes through a disk spool.

The spools are real `FileSpool`s in a temp folder, so the tests can see that a spool file
exists while it should and is gone after the audio is read, after an early close, after a
decoder error and after a cancellation.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vrai_stream import errors
from vrai_stream.bodies.forms import Submission, read_submission
from vrai_stream.bodies.legacy_json import LegacyJsonDecoder
from vrai_stream.bodies.multipart import MultipartDecoder
from vrai_stream.errors import InvalidJson
from vrai_stream.spool import Budget, FileSpool

pytestmark = pytest.mark.anyio

SCALE = int(os.environ.get("VRAI_FUZZ_SCALE", "1"))
PAYLOAD = os.urandom(300_000)
TIMES = ("fromTime", "toTime")
BOUNDARY = "vrai-test-boundary"


class Body:
    """Body chunks as an async iterator that counts what was read, and may hang at the end."""

    def __init__(self, data: bytes, *, chunk: int = 4096, hang: bool = False) -> None:
        self.chunks = [data[k : k + chunk] for k in range(0, len(data), chunk)]
        self.read = 0
        self.hang = hang

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.read += 1
            yield chunk
            await anyio.lowlevel.checkpoint()
        if self.hang:
            await anyio.sleep_forever()

    @property
    def done(self) -> bool:
        return self.read == len(self.chunks)


def legacy(*order: str, payload: bytes = PAYLOAD, tail: bytes = b"") -> bytes:
    values = {
        "fromTime": 1.5,
        "toTime": "30",
        "summarizationType": "summarize",
        "fileBlob": base64.b64encode(payload).decode(),
    }
    return json.dumps({name: values[name] for name in order}).encode() + tail


def multipart(*order: str, payload: bytes = PAYLOAD) -> bytes:
    """A form with the parts in `order`; `name=value` overrides a field's usual value."""
    values = {"fromTime": "1.5", "toTime": "30", "summarizationType": "summarize"}
    parts = []
    for item in order:
        name, given, value = item.partition("=")
        if given:
            values[name] = value
        if name == "audio":
            head = 'Content-Disposition: form-data; name="audio"; filename="a.m4a"\r\n'
            parts.append(head.encode() + b"\r\n" + payload)
        else:
            head = f'Content-Disposition: form-data; name="{name}"\r\n'
            parts.append(head.encode() + b"\r\n" + values[name].encode())
    delimiter = f"--{BOUNDARY}".encode()
    return b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts) + delimiter + b"--\r\n"


def multipart_decoder() -> MultipartDecoder:
    return MultipartDecoder(f"multipart/form-data; boundary={BOUNDARY}")


def spools(folder: Path) -> Callable[[], FileSpool]:
    def make() -> FileSpool:
        return FileSpool(disk=Budget(None), tmp_dir=folder)

    return make


def kept_spools(folder: Path) -> tuple[list[FileSpool], Callable[[], FileSpool]]:
    """Spools in `folder` and the list of those made, to check later that each was closed."""
    made: list[FileSpool] = []

    def make() -> FileSpool:
        made.append(spools(folder)())
        return made[-1]

    return made, make


def no_spool() -> FileSpool:
    raise AssertionError("the audio should have streamed, without a spool")


def listing(folder: Path) -> list[Path]:
    return list(folder.iterdir())


async def read_all(upload: Submission) -> bytes:
    return b"".join([chunk async for chunk in upload.audio])


# --- fields first: streaming ------------------------------------------------------------------


async def test_fields_first_streams_without_touching_disk() -> None:
    body = Body(legacy("fromTime", "toTime", "fileBlob", "summarizationType"))
    upload = await read_submission(
        aiter(body), LegacyJsonDecoder(), required=TIMES, make_spool=no_spool
    )
    async with upload:
        assert not upload.spooled
        assert upload.fields == {"fromTime": "1.5", "toTime": "30"}
        assert body.read == 1  # the times were in the first chunk
        received = bytearray()
        async for chunk in upload.audio:
            if not received:
                assert body.read < len(body.chunks) / 10  # the audio flows as the body arrives
            received += chunk
        assert bytes(received) == PAYLOAD
        assert body.done
        # Fields after the audio are there once the audio is exhausted.
        assert upload.fields["summarizationType"] == "summarize"


async def test_multipart_fields_first_and_after() -> None:
    body = Body(multipart("toTime", "fromTime", "audio", "summarizationType"))
    async with await read_submission(
        aiter(body), multipart_decoder(), required=TIMES, make_spool=no_spool
    ) as upload:
        assert upload.start.filename == "a.m4a"
        assert await read_all(upload) == PAYLOAD
        assert upload.fields == {
            "fromTime": "1.5",
            "toTime": "30",
            "summarizationType": "summarize",
        }


async def test_nothing_required_always_streams() -> None:
    """The OpenAI-compatible endpoint: `model` and the rest may follow the file."""
    body = Body(multipart("audio", "summarizationType"))
    async with await read_submission(
        aiter(body), multipart_decoder(), required=(), make_spool=no_spool
    ) as upload:
        assert upload.fields == {}
        assert await read_all(upload) == PAYLOAD
        assert upload.fields == {"summarizationType": "summarize"}


async def test_an_error_after_streamed_audio_surfaces_from_the_audio() -> None:
    body = Body(legacy("fromTime", "toTime", "fileBlob", tail=b" trailing garbage"))
    async with await read_submission(
        aiter(body), LegacyJsonDecoder(), required=TIMES, make_spool=no_spool
    ) as upload:
        with pytest.raises(InvalidJson, match="after the end of the object"):
            await read_all(upload)


async def test_a_time_may_not_change_after_the_audio_started() -> None:
    same = Body(multipart("fromTime", "toTime", "audio", "fromTime"))
    async with await read_submission(
        aiter(same), multipart_decoder(), required=TIMES, make_spool=no_spool
    ) as upload:
        assert await read_all(upload) == PAYLOAD
    changed = Body(multipart("fromTime", "toTime", "audio", "fromTime=9"))
    async with await read_submission(
        aiter(changed), multipart_decoder(), required=TIMES, make_spool=no_spool
    ) as upload:
        with pytest.raises(errors.InvalidParameters, match="fromTime is given twice"):
            await read_all(upload)


@pytest.mark.parametrize("audio_first", [False, True])
async def test_repeated_fields_are_all_kept_in_order(tmp_path: Path, audio_first: bool) -> None:
    """Array fields come one per item (`keywords[]`, as OpenAI's SDKs send them)."""
    items = ("keywords[]=fox", "fromTime", "keywords[]=lazy dog", "toTime")
    order = ("audio", *items) if audio_first else (*items, "audio", "keywords[]=a")
    body = Body(multipart(*order))
    async with await read_submission(
        aiter(body), multipart_decoder(), required=TIMES, make_spool=spools(tmp_path)
    ) as upload:
        assert upload.spooled is audio_first
        assert await read_all(upload) == PAYLOAD
        expected = ["fox", "lazy dog"] if audio_first else ["fox", "lazy dog", "a"]
        assert upload.fields.every("keywords[]") == expected
        assert upload.fields["keywords[]"] == expected[-1]  # one value: the last, as before
        assert upload.fields.every("fromTime") == ["1.5"]
        assert upload.fields.every("languages[]") == []


# --- audio first: the disk spool --------------------------------------------------------------


async def test_audio_first_spools_to_disk_then_reads_back(tmp_path: Path) -> None:
    body = Body(legacy("fileBlob", "summarizationType", "toTime", "fromTime"))
    upload = await read_submission(
        aiter(body),
        LegacyJsonDecoder(),
        required=TIMES,
        make_spool=spools(tmp_path),
        read_size=50_000,
    )
    async with upload:
        assert upload.spooled
        assert body.done  # the whole body was read before returning
        assert upload.fields == {
            "fromTime": "1.5",
            "toTime": "30",
            "summarizationType": "summarize",
        }
        (spooled,) = listing(tmp_path)
        assert spooled.read_bytes() == PAYLOAD
        chunks = [chunk async for chunk in upload.audio]
        assert b"".join(chunks) == PAYLOAD
        assert max(map(len, chunks)) == 50_000
        assert listing(tmp_path) == []  # deleted once read


async def test_multipart_fields_after_the_file_spool(tmp_path: Path) -> None:
    body = Body(multipart("fromTime", "audio", "toTime"))
    async with await read_submission(
        aiter(body), multipart_decoder(), required=TIMES, make_spool=spools(tmp_path)
    ) as upload:
        assert upload.spooled and upload.fields == {"fromTime": "1.5", "toTime": "30"}
        assert await read_all(upload) == PAYLOAD
    assert listing(tmp_path) == []


async def test_the_spool_goes_on_early_close(tmp_path: Path) -> None:
    disk = Budget(None)
    body = Body(legacy("fileBlob", "fromTime", "toTime"))
    upload = await read_submission(
        aiter(body),
        LegacyJsonDecoder(),
        required=TIMES,
        make_spool=lambda: FileSpool(disk=disk, tmp_dir=tmp_path),
    )
    async with upload:
        async for _ in upload.audio:
            break
        assert len(listing(tmp_path)) == 1
    assert listing(tmp_path) == []
    assert disk.reserved_bytes == 0
    await upload.aclose()  # twice is fine


async def test_the_spool_goes_when_reading_back_is_cancelled(tmp_path: Path) -> None:
    body = Body(legacy("fileBlob", "fromTime", "toTime"))
    upload = await read_submission(
        aiter(body), LegacyJsonDecoder(), required=TIMES, make_spool=spools(tmp_path)
    )
    assert await upload.audio.__anext__()  # the spool is open for reading now
    with anyio.CancelScope() as scope:
        scope.cancel()
        await upload.audio.__anext__()
    assert scope.cancelled_caught
    assert listing(tmp_path) == []
    assert not [fd for fd in open_files() if fd.startswith(str(tmp_path))]
    await upload.aclose()


def open_files() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return targets


async def test_the_spool_goes_when_the_audio_is_never_read(tmp_path: Path) -> None:
    body = Body(legacy("fileBlob", "fromTime", "toTime"))
    async with await read_submission(
        aiter(body), LegacyJsonDecoder(), required=TIMES, make_spool=spools(tmp_path)
    ):
        assert len(listing(tmp_path)) == 1
    assert listing(tmp_path) == []


async def test_the_spool_goes_on_a_decoder_error(tmp_path: Path) -> None:
    made, make = kept_spools(tmp_path)
    body = Body(legacy("fileBlob", "fromTime", "toTime", tail=b"}"))
    with pytest.raises(InvalidJson):
        await read_submission(aiter(body), LegacyJsonDecoder(), required=TIMES, make_spool=make)
    assert made and made[0].closed
    assert listing(tmp_path) == []


async def test_the_spool_goes_on_cancellation(tmp_path: Path) -> None:
    made, make = kept_spools(tmp_path)
    body = Body(legacy("fileBlob", "fromTime", "toTime")[:-30], hang=True)
    with anyio.move_on_after(0.5) as scope:
        await read_submission(aiter(body), LegacyJsonDecoder(), required=TIMES, make_spool=make)
    assert scope.cancelled_caught
    assert made and made[0].closed and made[0].size > 0
    assert listing(tmp_path) == []


async def test_a_full_disk_is_a_507_and_leaves_nothing(tmp_path: Path) -> None:
    disk = Budget(100_000)
    body = Body(legacy("fileBlob", "fromTime", "toTime"))
    with pytest.raises(errors.DiskFull):
        await read_submission(
            aiter(body),
            LegacyJsonDecoder(),
            required=TIMES,
            make_spool=lambda: FileSpool(disk=disk, tmp_dir=tmp_path),
        )
    assert listing(tmp_path) == [] and disk.reserved_bytes == 0


async def test_no_audio_is_an_empty_body() -> None:
    with pytest.raises(errors.EmptyBody, match="no fileBlob"):
        await read_submission(
            aiter(Body(legacy("fromTime", "toTime"))),
            LegacyJsonDecoder(),
            required=TIMES,
            make_spool=no_spool,
        )


# --- any order, any chunking ------------------------------------------------------------------


@settings(
    max_examples=40 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    order=st.permutations(["fromTime", "toTime", "summarizationType", "fileBlob"]),
    present=st.sets(st.sampled_from(["fromTime", "toTime", "summarizationType"])),
    chunk=st.integers(1, 5000),
    payload=st.binary(min_size=1, max_size=20_000),
)
def test_any_order_and_chunking(
    tmp_path: Path, order: list[str], present: set[str], chunk: int, payload: bytes
) -> None:
    keys = [name for name in order if name == "fileBlob" or name in present]
    before_audio = keys[: keys.index("fileBlob")]
    folder = tmp_path / os.urandom(4).hex()
    folder.mkdir()

    async def run() -> None:
        body = Body(legacy(*keys, payload=payload), chunk=chunk)
        async with await read_submission(
            aiter(body), LegacyJsonDecoder(), required=TIMES, make_spool=spools(folder)
        ) as upload:
            assert upload.spooled == (not all(name in before_audio for name in TIMES))
            assert await read_all(upload) == payload
            assert set(upload.fields) == set(keys) - {"fileBlob"}
        assert listing(folder) == []

    anyio.run(run)


async def test_hostile_json_never_blocks_the_event_loop_long() -> None:
    """A megabyte of `0,0,0,...` in one chunk is decoded a slice at a time, with turns between."""
    dense = (
        b'{"x": [' + b"0," * (1024 * 1024) + b'0], "fromTime": 0, "toTime": 1, "fileBlob": "QUJD"}'
    )
    gaps: list[float] = []

    # CPU time of this thread, not wall time: a busy machine preempting the test must not
    # look like the decoder holding the loop.
    async def ticker() -> None:
        last = time.thread_time()
        while True:
            await anyio.lowlevel.checkpoint()
            now = time.thread_time()
            gaps.append(now - last)
            last = now

    started = time.thread_time()
    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        body = Body(dense, chunk=1024 * 1024)
        async with await read_submission(
            aiter(body), LegacyJsonDecoder(), required=TIMES, make_spool=no_spool
        ) as upload:
            assert await read_all(upload) == b"ABC"
        group.cancel_scope.cancel()
    took = time.thread_time() - started
    # 2 MiB in 16 KiB slices: 128 turns for the loop, each a small part of the whole.
    assert len(gaps) >= 128
    assert max(gaps) < max(took / 16, 0.02), (max(gaps), took)
