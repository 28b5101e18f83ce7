"""The shared state of a fleet: one bucket, the leases this machine renews, keys, answers and
webhooks on their way."""

from __future__ import annotations

import anyio.abc

from vrai_stream.background import BackgroundWork
from vrai_stream.s3_client import LazyS3Client
from vrai_stream.settings import Settings
from vrai_stream.state.answers import SharedAnswers
from vrai_stream.state.bucket import StateBucket
from vrai_stream.state.claims import SharedKeys
from vrai_stream.state.leases import Leases
from vrai_stream.state.outbox import SharedOutbox


class SharedState:
    def __init__(self, settings: Settings, bucket: str, s3: LazyS3Client) -> None:
        self.bucket = StateBucket(bucket, s3, timeout_seconds=settings.state_timeout_seconds)
        self.leases = Leases(settings.state_lease_seconds)
        self.work = BackgroundWork()
        """Writes no request waits for: records of running jobs, answers, freed keys."""
        self.keys = SharedKeys(
            self.bucket, self.leases, ttl_seconds=settings.idempotency_ttl_seconds
        )
        self.answers = SharedAnswers(
            self.bucket, self.leases, self.work, ttl_seconds=settings.result_ttl_seconds
        )
        self.outbox = SharedOutbox(self.bucket, self.leases)

    def start(self, background: anyio.abc.TaskGroup) -> None:
        self.work.start(background)
        background.start_soon(self.bucket.check)
        background.start_soon(self.leases.renew_forever)


def create_shared_state(settings: Settings, s3: LazyS3Client) -> SharedState | None:
    """The bucket's state, or None: with no bucket, keys and answers stay on their machine."""
    bucket = settings.state_bucket or settings.debug_bucket
    return SharedState(settings, bucket, s3) if bucket else None
