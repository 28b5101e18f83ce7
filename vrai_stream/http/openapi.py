"""The OpenAPI 3.1 description served at `/openapi.json`.

Written out by hand rather than inferred from handlers: the handlers stream their bodies,
so nothing could infer it, and the contract is worth reading in one place.  Error codes
come from `errors.ALL_ERRORS`, so a new error cannot be left out.
"""

from __future__ import annotations

from typing import Any

from vrai_stream import errors
from vrai_stream.http.upload_draft import VERSIONS
from vrai_stream.speech.formats import RESPONSE_FORMATS
from vrai_stream.speech.summarize import SummarizationType

_AUDIO_TYPES = (
    "audio/x-caf",
    "audio/mp4",
    "audio/3gpp",
    "audio/webm",
    "audio/ogg",
    "audio/wav",
    "audio/mpeg",
    "audio/flac",
    "audio/aac",
    "application/octet-stream",
)


def _error_responses(*codes: type[errors.ServiceError]) -> dict[str, Any]:
    """One response per HTTP status, listing the stable codes it may carry."""
    by_status: dict[int, list[str]] = {}
    for error in codes:
        by_status.setdefault(error.status, []).append(error.code)
    return {
        str(status): {
            "description": "Error: " + ", ".join(f"`{code}`" for code in sorted(names)),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status, names in sorted(by_status.items())
        if status != errors.ClientDisconnected.status
    }


_BODY_ERRORS = (
    errors.InvalidParameters,
    errors.InvalidWindow,
    errors.EmptyBody,
    errors.Unauthorized,
    errors.AuthUnavailable,
    errors.UploadTimeout,
    errors.BodyTooLarge,
    errors.UndecodableAudio,
    errors.UnsupportedFormat,
    errors.NoAudioInWindow,
    errors.TranscodeTimeout,
    errors.TranscriptionFailed,
    errors.Busy,
    errors.TranscriberUnavailable,
    errors.SummaryUnavailable,
    errors.TranscriptionTimeout,
    errors.DiskFull,
    errors.InternalError,
    errors.CallbackNotAllowed,
)

_RAW_ERRORS = (*_BODY_ERRORS, errors.BodyNotAudio)
_JSON_ERRORS = (*_BODY_ERRORS, errors.InvalidJson, errors.InvalidBase64, errors.FieldTooLarge)
_FORM_ERRORS = (
    *_BODY_ERRORS,
    errors.InvalidMultipart,
    errors.MissingAudioPart,
    errors.FieldTooLarge,
)

_SECONDS = {"type": "number", "minimum": 0}
_EVENTS = {
    "schema": {
        "type": "string",
        "description": "Server-Sent Events: each an `event:` line and one line of JSON `data:`.",
    }
}


def _window_parameters() -> list[dict[str, Any]]:
    return [
        {
            "name": "fromTime",
            "in": "query",
            "description": "Start of the window, seconds.",
            "schema": {**_SECONDS, "default": 0},
        },
        {
            "name": "toTime",
            "in": "query",
            "description": "End of the window, seconds; default fromTime + the longest window.",
            "schema": _SECONDS,
        },
        {
            "name": "summarizationType",
            "in": "query",
            "schema": {"enum": [kind.value for kind in SummarizationType], "default": "none"},
        },
    ]


_LANGUAGE = {
    "type": "string",
    "description": "ISO 639-1 code of one of Whisper's languages; default: detected.",
}


def _model_parameters() -> list[dict[str, Any]]:
    return [
        {"name": "language", "in": "query", "schema": _LANGUAGE},
        {"name": "prompt", "in": "query", "schema": {"type": "string"}},
        {
            "name": "keywords",
            "in": "query",
            "description": "Words and names the speech may hold, comma-separated.",
            "schema": {"type": "string"},
        },
    ]


def _callback_parameter() -> dict[str, Any]:
    """`callbackUrl`, taken by every audio endpoint in its query string."""
    return {
        "name": "callbackUrl",
        "in": "query",
        "description": "Also POST the answer here when the job ends, signed as Standard "
        "Webhooks sign (`webhook-id`, `webhook-timestamp`, `webhook-signature`), even if the "
        "client has left after its last byte. Only to hosts the server allows, on public "
        "addresses unless listed exactly; else `callback_not_allowed`.",
        "schema": {"type": "string", "format": "uri", "maxLength": 2048},
    }


def _legacy_fields() -> dict[str, Any]:
    return {
        "fromTime": {"type": ["number", "string"]},
        "toTime": {"type": ["number", "string"]},
        "summarizationType": {"enum": [kind.value for kind in SummarizationType]},
    }


def _body_operation(
    summary: str,
    media_type: str,
    schema: dict[str, Any],
    answers: dict[str, Any],
    failures: tuple[type[errors.ServiceError], ...],
) -> dict[str, Any]:
    """A POST whose body carries the recording and its fields."""
    return {
        "post": {
            "summary": summary,
            "parameters": [_callback_parameter()],
            "requestBody": {"required": True, "content": {media_type: {"schema": schema}}},
            "responses": {
                "200": {"description": "The transcript", "content": answers},
                **_error_responses(*failures),
            },
        },
        "options": _upload_options(),
    }


def _upload_options() -> dict[str, Any]:
    """`OPTIONS` on an audio endpoint: the resumable-upload draft's discovery."""
    headers = {
        "Accept-Patch": "`application/partial-upload`: resumable uploads are taken",
        "Upload-Limit": "`max-size` (the endpoint's body limit) and `max-age` (the grace)",
        "Upload-Draft-Interop-Version": "The interop versions spoken",
    }
    return {
        "summary": "Whether, and within what limits, uploads here are resumable.",
        "security": [],
        "responses": {
            "204": {
                "description": "Resumable uploads are taken",
                "headers": {
                    name: {"description": text, "schema": {"type": "string"}}
                    for name, text in headers.items()
                },
            }
        },
    }


_UPLOAD_FIELDS = {
    "Upload-Draft-Interop-Version": "3 (iOS 17), 5 or 6 (iOS 18), 7 or 8 (the current text)",
    "Upload-Length": "The whole upload's length, when the client gave it (interop 7 and 8)",
    "Upload-Limit": "`max-size` and `max-age` (interop 7 and 8)",
    "Upload-Offset": "Bytes of the body received so far",
    "Upload-Complete": "?1 once every byte has arrived (interop 5, 6)",
    "Upload-Incomplete": "?0 once every byte has arrived (interop 3)",
}
_UPLOAD_ERRORS = (
    errors.InvalidParameters,
    errors.Unauthorized,
    errors.AuthUnavailable,
    errors.UploadNotFound,
    errors.UploadExpired,
)


def _upload_resource() -> dict[str, Any]:
    """A resumable upload (draft-ietf-httpbis-resumable-upload), made by a `POST` to an
    audio endpoint that carries `Upload-Draft-Interop-Version` and is announced by a 104."""
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in ("machine", "upload_id")
    ]
    state = {
        name: {"description": text, "schema": {"type": "string"}}
        for name, text in _UPLOAD_FIELDS.items()
    }
    version = {
        "name": "Upload-Draft-Interop-Version",
        "in": "header",
        "schema": {"enum": [str(version) for version in VERSIONS]},
    }
    return {
        "parameters": parameters,
        "head": {
            "summary": "How far the upload has come: `Upload-Offset`, `Upload-Complete`.",
            "parameters": [version],
            "responses": {
                "204": {"description": "Where the upload stands", "headers": state},
                **_error_responses(*_UPLOAD_ERRORS),
            },
        },
        "patch": {
            "summary": "Send the rest of the body from `Upload-Offset`; the request that "
            "completes the upload gets the audio endpoint's answer.",
            "parameters": [
                version,
                {
                    "name": "Upload-Offset",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 0},
                },
                {"name": "Upload-Complete", "in": "header", "schema": {"enum": ["?0", "?1"]}},
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/partial-upload": {"schema": {"type": "string", "format": "binary"}}
                },
            },
            "responses": {
                "200": {
                    "description": "Complete: the answer the request that began it would have had",
                    "headers": state,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/Transcription"}
                        }
                    },
                },
                "204": {
                    "description": "Appended; the upload is not complete yet",
                    "headers": state,
                },
                "421": {
                    "description": "Another machine holds the upload (`fly-replay` sends it there)"
                },
                **_error_responses(*_UPLOAD_ERRORS, errors.UploadOffsetMismatch),
            },
        },
        "delete": {
            "summary": "Give the upload up: its job ends and nothing of it is kept.",
            "parameters": [version],
            "responses": {
                "204": {"description": "Cancelled"},
                **_error_responses(*_UPLOAD_ERRORS),
            },
        },
    }


_TIMINGS = {
    "receive": "the body's last byte arrived",
    "transcode": "ffmpeg ended: the window is decoded",
    "transcribe": "the last segment was transcribed (0 for an MP3 answer)",
    "total": "the answer was ready",
}


def build_openapi() -> dict[str, Any]:
    success_ref = {"$ref": "#/components/schemas/Transcription"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "vrai-stream",
            "version": "1",
            "description": "Streams voice-note uploads through ffmpeg into a transcript.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["success", "status", "code", "message", "requestId"],
                    "properties": {
                        "success": {"const": False},
                        "status": {"type": "integer"},
                        "code": {"enum": [error.code for error in errors.ALL_ERRORS]},
                        "message": {"type": "string"},
                        "requestId": {"type": "string"},
                        "debugFiles": {
                            "type": "object",
                            "additionalProperties": {"type": "string", "format": "uri"},
                        },
                    },
                },
                "Transcription": {
                    "type": "object",
                    "required": [
                        "success",
                        "requestId",
                        "transcription",
                        "duration",
                        "fromTime",
                        "toTime",
                        "fileSize",
                        "inputSize",
                    ],
                    "properties": {
                        "success": {"const": True},
                        "requestId": {"type": "string"},
                        "transcription": {"type": "string"},
                        "language": {"type": ["string", "null"]},
                        "duration": {"type": "number"},
                        "fromTime": {"type": "number"},
                        "fileSize": {"type": "integer"},
                        "inputSize": {"type": "integer"},
                        "format": {"type": ["string", "null"]},
                        "mode": {"enum": ["stream", "speculative", "seekable", None]},
                        "truncated": {"type": "boolean"},
                        "declaredSeconds": {"type": ["number", "null"]},
                        "toTime": {
                            "type": "number",
                            "description": "The window's actual end: the asked toTime, or "
                            "where the recording ends before it",
                        },
                        "timings": {
                            "type": "object",
                            "description": "Seconds since the job was admitted when each "
                            "stage ended (the wait after the last byte: total - receive)",
                            "properties": {
                                stage: {"type": "number", "description": text}
                                for stage, text in _TIMINGS.items()
                            },
                        },
                        "summary": {"type": "string"},
                        "summaryError": {"type": "string"},
                    },
                },
            },
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/": {
                "get": {
                    "summary": "A page to try the service: pick or record a file, see its words.",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The page (HTML, script and style inline)",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Liveness: 200 as soon as the process listens.",
                    "security": [],
                    "responses": {"200": {"description": "Alive"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This description.",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1 JSON"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics.",
                    "security": [],
                    "responses": {"200": {"description": "Prometheus text format"}},
                }
            },
            "/v1/transcriptions": {
                "post": {
                    "summary": "Transcribe a window of the recording sent as the raw body.",
                    "parameters": [
                        *_window_parameters(),
                        *_model_parameters(),
                        _callback_parameter(),
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            media: {"schema": {"type": "string", "format": "binary"}}
                            for media in _AUDIO_TYPES
                        },
                    },
                    "responses": {
                        "200": {
                            "description": (
                                "The transcript, or with `Accept: audio/mpeg` the MP3, or with "
                                "`Accept: text/event-stream` events: `progress`, `segment`, "
                                "`summary`, then `done` (this body) or `error` (the error body)."
                            ),
                            "content": {
                                "application/json": {"schema": success_ref},
                                "audio/mpeg": {"schema": {"type": "string", "format": "binary"}},
                                "text/event-stream": _EVENTS,
                            },
                        },
                        **_error_responses(*_RAW_ERRORS),
                    },
                },
                "options": _upload_options(),
            },
            "/v1/transcriptions/{request_id}": {
                "parameters": [
                    {
                        "name": "request_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "get": {
                    "summary": "A finished answer again, by its `requestId`, to the user it is "
                    "for, for `VRAI_RESULT_TTL_SECONDS`, from any machine that shares the "
                    "state bucket.",
                    "responses": {
                        "200": {
                            "description": "The answer as it was given; an answer given as "
                            "events: the body of its `done` event",
                            "content": {"application/json": {"schema": success_ref}},
                        },
                        "202": {
                            "description": "The job is still running",
                            "headers": {
                                "Retry-After": {
                                    "description": "Seconds before asking again",
                                    "schema": {"type": "integer"},
                                }
                            },
                        },
                        **_error_responses(
                            errors.NotFound,
                            errors.Unauthorized,
                            errors.AuthUnavailable,
                            errors.SharedStateUnavailable,
                        ),
                    },
                },
            },
            "/v1/uploads/{machine}/{upload_id}": _upload_resource(),
            "/trim-and-transcribe": _body_operation(
                "Legacy: JSON body with the recording as base64 in `fileBlob`.",
                "application/json",
                {
                    "type": "object",
                    "required": ["fileBlob", "fromTime", "toTime"],
                    "properties": {
                        "fileBlob": {"type": "string", "contentEncoding": "base64"},
                        **_legacy_fields(),
                    },
                },
                {"application/json": {"schema": success_ref}, "text/event-stream": _EVENTS},
                _JSON_ERRORS,
            ),
            "/trim-and-transcribe-multipart": _body_operation(
                "Legacy: multipart body with the recording in the `audio` field.",
                "multipart/form-data",
                {
                    "type": "object",
                    "required": ["audio", "fromTime", "toTime"],
                    "properties": {
                        "audio": {"type": "string", "format": "binary"},
                        **_legacy_fields(),
                    },
                },
                {"application/json": {"schema": success_ref}, "text/event-stream": _EVENTS},
                _FORM_ERRORS,
            ),
            "/v1/audio/transcriptions": _body_operation(
                "OpenAI-compatible transcription (point an OpenAI SDK here).",
                "multipart/form-data",
                {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "model": {"type": "string"},
                        "language": _LANGUAGE,
                        "languages[]": {**_LANGUAGE, "description": "The same, as OpenAI's array"},
                        "prompt": {"type": "string"},
                        "keywords[]": {
                            "type": "string",
                            "description": "One keyword; one field per keyword",
                        },
                        "response_format": {"enum": list(RESPONSE_FORMATS)},
                        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
                        "stream": {
                            "type": "boolean",
                            "description": "OpenAI's `transcript.text.delta` and "
                            "`transcript.text.done` events (response_format json or text).",
                        },
                        "fromTime": _SECONDS,
                        "toTime": _SECONDS,
                    },
                },
                {
                    "application/json": {"schema": {"type": "object"}},
                    "text/plain": {"schema": {"type": "string"}},
                    "text/vtt": {"schema": {"type": "string"}},
                    "text/event-stream": _EVENTS,
                },
                _FORM_ERRORS,
            ),
        },
    }
