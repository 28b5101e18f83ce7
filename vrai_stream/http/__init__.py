"""HTTP: the Starlette app, its routes and responses, OpenAPI, and the uvicorn server."""
