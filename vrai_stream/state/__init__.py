"""What must outlive a machine, kept in the S3-compatible bucket every machine shares.

Idempotency claims and finished answers live under `state/` in `VRAI_STATE_BUCKET`.  A
claim is a conditional create (`If-None-Match: *`), so two machines never both run a key;
a running job's records carry a lease its machine renews, so a machine that dies holding
one frees it once the lease runs out.  Nothing here knows HTTP: `http/` decides what to
record and sends what it finds.
"""
