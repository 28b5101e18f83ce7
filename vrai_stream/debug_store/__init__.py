"""Debug copies of what the phone sent and the MP3 it became, so a bad transcript can be replayed.

Three stores: S3 (any S3 API: AWS, Tigris, R2, MinIO), a local folder held to a byte cap
and a maximum age (only when asked for), or none: with no bucket, nothing is kept.  A store
hands each job a `DebugCopies`, which the pipeline feeds as the job goes.  Feeding never
blocks and never fails the job: a store that falls behind abandons its copy instead.
"""

from __future__ import annotations

import logging

from vrai_stream.debug_store.base import DebugStore, OffStore
from vrai_stream.s3_client import LazyS3Client
from vrai_stream.settings import Settings

logger = logging.getLogger("vrai_stream.debug_store")


def create_store(settings: Settings, s3: LazyS3Client) -> DebugStore:
    """The configured store; S3's SDK is imported only when S3 is configured, and the S3
    client (`s3`, the process's one) made only once it is used."""
    if settings.debug_store == "s3":
        from vrai_stream.debug_store.s3 import S3Store

        return S3Store(settings, s3)
    if settings.debug_store == "dir":
        from vrai_stream.debug_store.folder import FolderStore

        try:
            return FolderStore(settings)
        except OSError as exc:
            # A read-only folder must not stop the service: it runs without copies.
            logger.warning(
                "debug folder is not writable; debug copies are off",
                extra={"folder": str(settings.debug_dir), "error": exc.strerror},
            )
            return OffStore(f"the folder {settings.debug_dir} is not writable")
    return OffStore()
