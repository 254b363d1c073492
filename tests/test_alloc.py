"""The CLI's allocator policy (fedmomentum.cli.alloc): freed round buffers stay with the process
instead of going back to the kernel. Checked in subprocesses, since the policy is process-wide."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedmomentum.cli.alloc import cli_allocator_setup, reuse_freed_memory

_PROBE = r"""
import json, sys
import torch
from fedmomentum.cli.alloc import reuse_freed_memory, allocator_policy
from fedmomentum_core.profiling import current_rss_bytes
applied = reuse_freed_memory("1GiB") if sys.argv[1] == "reuse" else False
n = 20 * 2 ** 20 // 4            # a 20 MiB buffer: a Llama-70B gate module's stack
x = torch.empty(n); x.fill_(1.0)
before_free = current_rss_bytes()
del x
after_free = current_rss_bytes()
print(json.dumps({"applied": applied, "policy": allocator_policy(),
                  "dropped_on_free": before_free - after_free}))
"""


def _probe(mode: str) -> dict:
    env = dict(os.environ, FEDMOMENTUM_MALLOC="system")
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt policy (Linux)")
def test_reuse_keeps_and_recycles_freed_buffers():
    sysd = _probe("system")
    reuse = _probe("reuse")
    mib = 2 ** 20
    # glibc default: a fresh 20 MiB buffer is mmap-ed and handed back to the kernel on free
    assert sysd["applied"] is False and sysd["dropped_on_free"] > 15 * mib
    assert reuse["applied"] is True
    assert reuse["policy"] == {"mmap_threshold": 32 * mib, "trim_threshold": 2 ** 30}
    # with the policy the buffer comes from the heap and its pages stay with the process when freed
    # (whether the very next buffer lands on exactly those pages is up to malloc's bins, so that
    # is not asserted; benchmarks/results/round_cpu.md has the effect on a round)
    assert reuse["dropped_on_free"] < 2 * mib


def test_bad_settings_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="keep must be a size.*'lots'"):
        reuse_freed_memory("lots")
    with pytest.raises(TypeError, match="keep must be a size.*True"):
        reuse_freed_memory(True)
    with pytest.raises(ValueError, match="keep must be"):
        reuse_freed_memory(None)
    monkeypatch.setenv("FEDMOMENTUM_MALLOC", "sometimes")
    with pytest.raises(ValueError, match="FEDMOMENTUM_MALLOC"):
        cli_allocator_setup()
    monkeypatch.setenv("FEDMOMENTUM_MALLOC", "system")
    assert cli_allocator_setup() is False


_CLI = r"""
import json, sys
from fedmomentum.cli import main
from fedmomentum.cli.alloc import allocator_policy
rc = main(["demo", "--size", "128", "--clients", "3", "--rank", "4", "--no-full-svd"])
print(json.dumps({"rc": rc, "policy": allocator_policy()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt policy (Linux)")
@pytest.mark.parametrize("mode", [None, "system"])
def test_cli_applies_the_policy_unless_told_not_to(mode):
    env = {k: v for k, v in os.environ.items() if k != "FEDMOMENTUM_MALLOC"}
    if mode:
        env["FEDMOMENTUM_MALLOC"] = mode
    out = subprocess.run([sys.executable, "-c", _CLI], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0
    if mode == "system":
        assert got["policy"] is None
    else:
        assert got["policy"] == {"mmap_threshold": 32 * 2 ** 20, "trim_threshold": 2 ** 30}
