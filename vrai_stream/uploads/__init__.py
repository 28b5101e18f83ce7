"""Uploads that survive a dropped connection (draft-ietf-httpbis-resumable-upload), and
requests that are safe to retry (draft-ietf-httpapi-idempotency-key-header)."""
