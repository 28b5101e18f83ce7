"""Webhooks: a request's answer POSTed to the `callbackUrl` it named, for a backend that
cannot wait on the client's connection.

Signed as Standard Webhooks sign (`signing`), saying how the transcription ended and holding
the answer the client got (`payload`), sent only where the operator allows and never into a
private network (`destinations`, checked again on the address each delivery connects to:
`network`), in the background and retried until it lands or its attempts run out
(`delivery`).  This package knows nothing of HTTP servers: the web layer hands it a URL to
vet and, once the answer is over, the answer.
"""
