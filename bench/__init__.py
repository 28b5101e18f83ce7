"""Benchmark scripts, run as modules from the repository's root: `python -m bench.memory`.

Run that way, `tests` is importable too, so the scripts share the tests' harness
(`tests.support`) with no `sys.path` edits. See bench/README.md.
"""
