"""Names or paths for the pieces a user swaps without forking Grove.

A rollout workflow, a prompt sampler and a weight transport are each given in the config
as a registered name, a dotted path (`pkg.mod:Name` or `pkg.mod.Name`) or a file
(`path/to/file.py:Name`, relative to the launch directory), as rewards are.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any


def load_plugin(field: str, spec: str, registry: Mapping[str, Any], cwd: str | None = None) -> Any:
    """The object `spec` names; `field` is the config key, for error messages."""
    if spec in registry:
        return registry[spec]
    left, sep, name = spec.rpartition(":")
    if not sep:
        left, _, name = spec.rpartition(".")
    if not left or not name:
        raise ValueError(f"{field}={spec!r} is not one of {sorted(registry)}, nor 'pkg.module:Name' "
                         "or 'path/to/file.py:Name'")
    cwd = os.path.abspath(cwd or os.getcwd())
    if left.endswith(".py") or os.sep in left:
        module = _load_file(field, spec, os.path.join(cwd, os.path.expanduser(left)))
    else:
        if cwd not in sys.path:
            sys.path.append(cwd)
        try:
            module = importlib.import_module(left)
        except ImportError as err:
            raise ValueError(f"{field}={spec!r}: cannot import {left!r}: {err}") from err
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"{field}={spec!r}: {left!r} has no attribute {name!r}") from None


def _load_file(field: str, spec: str, path: str):
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{field}={spec!r}: file {path!r} not found")
    module_name = "grove_plugin_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
