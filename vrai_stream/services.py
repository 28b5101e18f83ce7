"""The composition root: builds the parts every request shares, once per process."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from vrai_stream.admission import Admission
from vrai_stream.auth.authenticator import create_authenticator
from vrai_stream.auth.principal import Authenticator
from vrai_stream.debug_store import create_store
from vrai_stream.debug_store.base import DebugStore
from vrai_stream.memory_plan import MemoryPlan, detect_memory_limit, plan_memory
from vrai_stream.pipeline import Pipeline
from vrai_stream.s3_client import LazyS3Client
from vrai_stream.settings import Settings
from vrai_stream.speech.summarize import Summarizer
from vrai_stream.speech.transcribers import create_transcriber
from vrai_stream.speech.transcribers.base import Transcriber
from vrai_stream.spool import Budget, usable_tmp_dir
from vrai_stream.state.shared import SharedState, create_shared_state
from vrai_stream.uploads.idempotency import IdempotencyKeys
from vrai_stream.uploads.registry import MACHINE_ID, Uploads
from vrai_stream.uploads.results import Results
from vrai_stream.warmup import Lazy
from vrai_stream.webhooks.delivery import Webhooks

logger = logging.getLogger("vrai_stream.services")

LOCAL_MACHINE = "local"


def machine_id() -> str:
    """This machine's id on Fly.io, which routes a resumed upload back to it; `local` elsewhere."""
    found = os.environ.get("FLY_MACHINE_ID", "")
    return found if MACHINE_ID.fullmatch(found) else LOCAL_MACHINE


@dataclass
class Services:
    """What every request shares; built once by the lifespan."""

    settings: Settings
    plan: MemoryPlan
    admission: Admission
    pipeline: Pipeline
    transcriber: Lazy[Transcriber]
    s3: LazyS3Client
    """One S3 client for the process: debug copies and the state bucket share its pool."""
    debug: DebugStore
    summarizer: Summarizer
    auth: Authenticator
    uploads: Uploads
    idempotency: IdempotencyKeys
    results: Results
    webhooks: Webhooks
    state: SharedState | None
    """Keys and answers every machine sees, in the bucket; None: they stay on this machine."""

    @classmethod
    def create(cls, settings: Settings, ffmpeg: str) -> Services:
        transcriber: Lazy[Transcriber] = Lazy(lambda: create_transcriber(settings))
        s3 = LazyS3Client(settings.debug_s3_timeout_seconds)
        debug = create_store(settings, s3)
        state = create_shared_state(settings, s3)
        plan = plan_memory(settings, *detect_memory_limit(settings))
        logger.info("memory plan", extra={"plan": plan.describe()})
        return cls(
            settings=settings,
            plan=plan,
            admission=Admission(
                max_jobs=plan.max_jobs,
                max_queue=plan.max_queue,
                queue_timeout_seconds=settings.queue_timeout_seconds,
                retry_after_seconds=settings.retry_after_seconds,
            ),
            pipeline=Pipeline(
                settings,
                ffmpeg=ffmpeg,
                memory=Budget(plan.spool_memory_total_bytes),
                disk=Budget(settings.spool_disk_total_bytes),
                transcriber=transcriber.get,
                debug=debug,
                tmp_dir=usable_tmp_dir(settings.tmp_dir),
            ),
            transcriber=transcriber,
            s3=s3,
            debug=debug,
            summarizer=Summarizer(settings),
            auth=create_authenticator(settings.auth),
            uploads=Uploads(
                machine=machine_id(),
                grace_seconds=settings.resume_grace_seconds,
                max_waiting=settings.resume_max_waiting,
                idle_timeout_seconds=settings.idle_timeout_seconds,
            ),
            idempotency=IdempotencyKeys(settings.idempotency_ttl_seconds),
            results=Results(settings.result_ttl_seconds),
            webhooks=Webhooks(settings, outbox=state.outbox if state else None),
            state=state,
        )

    @property
    def on_fly(self) -> bool:
        return self.uploads.machine != LOCAL_MACHINE

    async def aclose(self) -> None:
        await self.debug.aclose()
        await self.s3.aclose()
        await self.summarizer.aclose()
        await self.auth.aclose()
        await self.webhooks.aclose()
        if self.transcriber.ready:
            await (await self.transcriber.get()).aclose()
