"""Every failure a client can see: an HTTP status and a stable, machine-readable code.

Errors carry data (a retry delay, an authentication challenge); `http.responses` turns it
into headers.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A failure that maps to one JSON error response.

    `code` is part of the public contract: clients branch on it, so it never changes meaning.
    `message` is for people and must never carry secrets.
    """

    status: int = 500
    code: str = "internal_error"
    keeps_debug_copies: bool = True
    """False where the upload was refused or cut short: there is nothing whole to keep."""

    def __init__(self, message: str, *, retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_seconds = retry_after_seconds
        """When the same request may succeed later: how many seconds to wait first."""
        self.debug_files: dict[str, str] | None = None

    def body(self, request_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "success": False,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "requestId": request_id,
        }
        if self.debug_files:
            body["debugFiles"] = self.debug_files
        return body


class RefusedRequest(ServiceError):
    """Refused before or while the body arrived: no whole recording to keep copies of."""

    keeps_debug_copies = False


class InvalidHttp(RefusedRequest):
    """Not a well-formed HTTP/1.1 request: refused by the server's parser, before the app."""

    status, code = 400, "invalid_http"


class HeadersTooLarge(RefusedRequest):
    """The request line and headers together exceed the server's limit."""

    status, code = 431, "headers_too_large"


class InvalidParameters(RefusedRequest):
    status, code = 400, "invalid_parameters"


class LanguageNotSupported(RefusedRequest):
    """`language` names one the configured model cannot transcribe (`tiny.en`: English)."""

    status, code = 400, "language_not_supported"


class InvalidWindow(RefusedRequest):
    status, code = 400, "invalid_window"


class EmptyBody(RefusedRequest):
    status, code = 400, "empty_body"


class MissingAudioPart(RefusedRequest):
    """A form without the part that carries the recording (`audio`, or OpenAI's `file`)."""

    status, code = 400, "missing_audio_part"


class BodyNotAudio(RefusedRequest):
    """A form or JSON body sent where the recording itself is the body."""

    status, code = 415, "body_not_audio"


class InvalidJson(RefusedRequest):
    """The body is not the JSON object the legacy endpoint takes."""

    status, code = 400, "invalid_json"


class InvalidBase64(RefusedRequest):
    """The legacy body's `fileBlob` is not base64."""

    status, code = 400, "invalid_base64"


class InvalidMultipart(RefusedRequest):
    """Not a well-formed multipart/form-data request, or no usable boundary."""

    status, code = 400, "invalid_multipart"


class Unauthorized(RefusedRequest):
    status, code = 401, "unauthorized"

    def __init__(self, message: str, *, challenge: str) -> None:
        super().__init__(message)
        self.challenge = challenge
        """How to authenticate, and what was wrong: RFC 6750's `Bearer realm="...", error=...`."""


class AuthUnavailable(RefusedRequest):
    """The signing keys cannot be fetched and none are cached: our fault, not the user's."""

    status, code = 503, "auth_unavailable"


class NotFound(RefusedRequest):
    status, code = 404, "not_found"


class MethodNotAllowed(RefusedRequest):
    status, code = 405, "method_not_allowed"


class UploadTimeout(RefusedRequest):
    status, code = 408, "upload_timeout"


class BodyTooLarge(RefusedRequest):
    status, code = 413, "body_too_large"


class FieldTooLarge(RefusedRequest):
    """A text field of a form or legacy JSON body over its cap (fields are kept in memory)."""

    status, code = 413, "field_too_large"


class UndecodableAudio(ServiceError):
    status, code = 422, "undecodable_audio"


class UnsupportedFormat(ServiceError):
    status, code = 422, "unsupported_format"


class NoAudioInWindow(ServiceError):
    status, code = 422, "no_audio_in_window"


class TranscodeTimeout(ServiceError):
    status, code = 422, "transcode_timeout"


class ClientDisconnected(RefusedRequest):
    """The client went away; nobody reads this response, but logs and metrics do."""

    status, code = 499, "client_disconnected"


class TranscodeInterrupted(ServiceError):
    """ffmpeg was killed by a signal the service did not send (the kernel's OOM killer, an
    operator): the machine's fault, not the recording's; worth a retry."""

    status, code = 503, "transcode_interrupted"


class TranscriptionFailed(ServiceError):
    status, code = 502, "transcription_failed"


class Busy(RefusedRequest):
    status, code = 503, "busy"


class SharedStateUnavailable(RefusedRequest):
    """The bucket holding what every machine shares did not answer."""

    status, code = 503, "state_unavailable"


class TranscriberUnavailable(ServiceError):
    status, code = 503, "transcriber_unavailable"


class SummaryUnavailable(ServiceError):
    status, code = 503, "summary_unavailable"


class SummaryFailed(ServiceError):
    """Never an error response: a failed summary comes back as `summaryError`."""

    status, code = 502, "summary_failed"


class TranscriptionTimeout(ServiceError):
    status, code = 504, "transcription_timeout"


class DiskFull(RefusedRequest):
    status, code = 507, "disk_full"


class InternalError(ServiceError):
    status, code = 500, "internal_error"


class UploadNotFound(RefusedRequest):
    """No resumable upload with this id here: never made, another user's, or on a machine
    that has stopped.  The client must send the whole recording again."""

    status, code = 404, "upload_not_found"


class UploadExpired(RefusedRequest):
    """The upload was given up (not resumed in time, cancelled, or evicted)."""

    status, code = 410, "upload_expired"


class UploadOffsetMismatch(RefusedRequest):
    """A resumption that does not start where the upload stands; `Upload-Offset` says where."""

    status, code = 409, "upload_offset_mismatch"

    def __init__(self, message: str, *, fields: dict[str, str]) -> None:
        super().__init__(message)
        self.fields = fields
        """The draft's fields that say where the upload stands, sent as headers."""


class IdempotencyKeyReused(RefusedRequest):
    """The same Idempotency-Key was sent with a different request."""

    status, code = 422, "idempotency_key_reused"


class IdempotencyKeyInUse(RefusedRequest):
    """The first request with this key ended without an answer to repeat; try again."""

    status, code = 409, "idempotency_key_in_use"


class CallbackNotAllowed(RefusedRequest):
    """A `callbackUrl` this server will not POST to: not http(s), a host not allowed, an
    address inside a private network, or no webhook secret configured."""

    status, code = 400, "callback_not_allowed"


ALL_ERRORS: tuple[type[ServiceError], ...] = (
    InvalidHttp,
    HeadersTooLarge,
    InvalidParameters,
    LanguageNotSupported,
    InvalidWindow,
    EmptyBody,
    MissingAudioPart,
    BodyNotAudio,
    InvalidJson,
    InvalidBase64,
    InvalidMultipart,
    Unauthorized,
    AuthUnavailable,
    NotFound,
    MethodNotAllowed,
    UploadTimeout,
    BodyTooLarge,
    FieldTooLarge,
    UndecodableAudio,
    UnsupportedFormat,
    NoAudioInWindow,
    TranscodeTimeout,
    TranscodeInterrupted,
    ClientDisconnected,
    TranscriptionFailed,
    Busy,
    TranscriberUnavailable,
    SummaryUnavailable,
    SummaryFailed,
    TranscriptionTimeout,
    DiskFull,
    InternalError,
    UploadNotFound,
    UploadExpired,
    UploadOffsetMismatch,
    IdempotencyKeyReused,
    IdempotencyKeyInUse,
    CallbackNotAllowed,
    SharedStateUnavailable,
)


def first_service_error(group: BaseExceptionGroup[BaseException]) -> ServiceError | None:
    """The first `ServiceError` in a task group's exceptions, however deeply nested."""
    for exc in group.exceptions:
        if isinstance(exc, ServiceError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = first_service_error(exc)
            if found is not None:
                return found
    return None
