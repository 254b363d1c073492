"""The checkout's kernels/ folder must not shadow the installed PyPI package `kernels`.

transformers >= 5.25 imports Hugging Face's `kernels` package. Run from the checkout root
(`python -m pytest`, `python -m fedmomentum`, Ray workers of a Flower simulation), the folder
kernels/ is found first; kernels/__init__.py then hands the name over to the installed package
(kernels/_shadow.py). Each check runs in a fresh interpreter started in the checkout root."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS_DIR = (ROOT / "kernels").resolve()


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _installed_kernels() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_folder_without_installed_package_fails_clearly():
    # hide site-packages after torch is loaded: the folder is then the only `kernels` around
    out = _run("import sys, torch\n"
               "sys.path[:] = [''] + [p for p in sys.path if p and 'site-packages' not in p]\n"
               "try:\n"
               "    import kernels\n"
               "except ImportError as e:\n"
               "    print('ERR', e); print(sorted(k for k in sys.modules if k.startswith('kernels')))\n"
               "else:\n"
               "    print('IMPORTED', kernels.__file__)\n")
    assert out.returncode == 0, out.stderr
    assert "ERR no installed package 'kernels'" in out.stdout, out.stdout
    assert "fedmomentum_kernels" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"   # nothing of the folder left behind


def test_fedmomentum_kernels_unaffected_in_the_root():
    out = _run("import json, fedmomentum_kernels as fk\n"
               "print(json.dumps({'file': fk.__file__, 'name': fk.__name__}))\n")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(res["file"]).resolve().parent == KERNELS_DIR and res["name"] == "fedmomentum_kernels"


@pytest.mark.skipif(not _installed_kernels(),
                    reason="PyPI package `kernels` not installed (older transformers): nothing shadowed")
def test_installed_kernels_package_wins_over_the_folder():
    out = _run("import json, sys, kernels\n"
               "print(json.dumps({'file': kernels.__file__, 'sub': sorted(\n"
               "    m.__file__ or '' for k, m in sys.modules.items() if k.startswith('kernels.'))}))\n")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(res["file"]).resolve().parent != KERNELS_DIR, res
    assert all(Path(f).resolve().parent != KERNELS_DIR for f in res["sub"] if f), res
    # and what failed before the hand-over: transformers' import of the kernel hub
    out = _run("import transformers.integrations.hub_kernels as h; print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
