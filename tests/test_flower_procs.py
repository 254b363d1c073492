"""tests/flower_procs.py, the clean-up the Flower deployment tests rely on: a failing test body
still leaves no process behind, including a detached grandchild in a session of its own (what
`flwr run` does with its local SuperLink and what the SuperLink does with flower-superexec), and
a listening port is released."""
from __future__ import annotations

import socket
import sys
import time

import pytest

from flower_procs import Procs, free_ports, port_is_free, tagged_pids, wait_for

DETACH = r"""
import socket, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
time.sleep(300)
"""


def test_stop_all_kills_detached_descendants_even_when_the_body_fails(tmp_path):
    (port,) = free_ports(1)
    procs = Procs(tmp_path)
    (tmp_path / "detach.py").write_text(DETACH)
    with pytest.raises(RuntimeError, match="the test body failed"):
        with procs:
            procs.start("parent", [f"python{sys.version_info[0]}", str(tmp_path / "detach.py"), str(port)])
            wait_for(lambda: len(tagged_pids(procs.tag)) >= 2 and not port_is_free(port), 30,
                     "the parent and its detached child", procs)
            raise RuntimeError("the test body failed")
    t0 = time.monotonic()
    assert tagged_pids(procs.tag) == []
    assert wait_for(lambda: port_is_free(port), 10, "the port to be released")
    assert time.monotonic() - t0 < 10
    with socket.socket() as s:               # a new server can take the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
