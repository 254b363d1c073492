"""Hand the top-level name ``kernels`` over to the installed PyPI package of that name.

This folder is imported as ``fedmomentum_kernels`` (package-dir mapping in pyproject.toml).
When a source checkout's root is on ``sys.path`` (``python -m pytest`` or ``python -m
fedmomentum`` run there, a script kept there, Ray/Flower workers started there), ``import
kernels`` finds this folder before Hugging Face's ``kernels`` package, which recent
transformers imports (``cannot import name 'CUDAProperties' from 'kernels'``). The package's
``__init__`` calls :func:`hand_over` when it finds itself imported under that name: the
import then returns the installed package, or fails with a message saying what this folder is.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _is_checkout_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == HERE.parent
    except (OSError, ValueError):
        return False


def _ours(name: str) -> bool:
    mod = sys.modules.get(name)
    f = getattr(mod, "__file__", None)
    try:
        return bool(f) and Path(f).resolve().parent == HERE
    except (OSError, ValueError):
        return False


def hand_over(name: str = "kernels") -> None:
    """Replace ``sys.modules[name]`` (this folder) with the installed package ``name``."""
    for key in [k for k in list(sys.modules) if k == name or k.startswith(name + ".")]:
        if _ours(key):
            del sys.modules[key]
    search = [p for p in sys.path if not _is_checkout_root(p)]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"no installed package {name!r}: the folder {name}/ in this checkout holds "
            f"fedmomentum's kernels, importable only as 'fedmomentum_kernels'", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
