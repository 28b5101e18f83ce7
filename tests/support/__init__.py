"""The tests' harness: real processes and real media, shared by `tests/` and `bench/`.

Import from the module that holds a helper (`from .support.server import start_server`);
this package re-exports nothing. `tests/README.md` says what each module provides.
"""
