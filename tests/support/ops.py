"""The scripts of ops/ (not a package), imported from their files for tests of their functions."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from support import REPO_ROOT

OPS = REPO_ROOT / "ops"


def load_ops(name: str) -> ModuleType:
    """ops/<name>.py as a module (its own imports of sibling scripts resolve from ops/, as when it runs)."""
    if str(OPS) not in sys.path:
        sys.path.append(str(OPS))
    spec = importlib.util.spec_from_file_location(f"ops_{name}", OPS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module
