"""The scripts in `.ci/`, imported as modules so their rules can be tested."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

CI = Path(__file__).resolve().parents[2] / ".ci"


def load(name: str) -> ModuleType:
    """`.ci/NAME.py` as the module `NAME` (dataclasses need it in `sys.modules`)."""
    spec = importlib.util.spec_from_file_location(name, CI / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
