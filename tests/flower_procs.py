"""Start and stop Flower processes (SuperLink, SuperNodes, the flwr CLI) for the deployment
tests, leaving nothing behind.

Every process is started in its own session (``start_new_session=True``) with an environment
that carries a per-test tag (``FEDMOMENTUM_FLOWER_TEST_TAG``) and a private ``FLWR_HOME``.
Flower starts more processes of its own (``flower-superexec`` in a new session,
``flwr-serverapp`` / ``flwr-clientapp`` / ``flwr-simulation``, Ray workers, the CLI's managed local
SuperLink, detached): they inherit the environment, so :meth:`Procs.stop_all` finds every one
of them by the tag in ``/proc/<pid>/environ``, whatever its session, and kills them all
(SIGTERM, a bounded wait, then SIGKILL).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import pytest

TAG_VAR = "FEDMOMENTUM_FLOWER_TEST_TAG"
BIN = Path(sys.executable).parent

def _flwr_at_least(major: int, minor: int) -> bool:
    import flwr
    m = re.match(r"(\d+)\.(\d+)", getattr(flwr, "__version__", "0.0"))
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (major, minor)


# the CLI, SuperLink and SuperNode flags used here are flwr 1.42's (HTTP --host/--port, config.toml)
NEEDS_FLWR_142 = pytest.mark.skipif(not _flwr_at_least(1, 42), reason="needs flwr >= 1.42")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    """No socket listens on ``port`` any more (connections in TIME_WAIT do not count: a new
    server binds with SO_REUSEADDR, as Flower's do)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def tagged_pids(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``TAG_VAR=tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            out.append(int(d.name))
    return sorted(out)


def ps_lines(tag: Optional[str] = None) -> list[str]:
    """``pid cmdline`` of the tagged processes (or of every flower/flwr process)."""
    pids = tagged_pids(tag) if tag else [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if tag or any(w in cmd for w in ("flower-", "flwr", "ray::", "raylet", "gcs_server")):
            lines.append(f"{pid} {cmd[:160]}")
    return lines


class Procs:
    """The processes of one test; use as a context manager (or call ``stop_all`` in a finally)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.tag = uuid.uuid4().hex
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({
            TAG_VAR: self.tag,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # use the installed fedmomentum; never `uv sync` the app's dependencies from an index
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "RAY_DEDUP_LOGS": "0",
        })
        self.env.pop("PYTHONPATH", None)
        self.popens: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    # ------------------------------------------------------------------ start
    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as fh:
            p = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=self.env, cwd=self.workdir,
                                 start_new_session=True)
        self.popens[name] = p
        return p

    def run(self, argv: Sequence[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run a short command (the flwr CLI) to completion, bounded by ``timeout``."""
        p = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env,
                             cwd=self.workdir, start_new_session=True, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"{' '.join(argv)} did not finish in {timeout} s:\n{out}\n{err}")
        res = subprocess.CompletedProcess(argv, p.returncode, out, err)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n{out}\n{err}")
        return res

    def run_json(self, argv: Sequence[str], timeout: float = 120) -> dict:
        res = self.run([*argv, "--format", "json"], timeout=timeout)
        start = res.stdout.find("{")
        assert start >= 0, (res.stdout, res.stderr)
        return json.loads(res.stdout[start:])

    # ------------------------------------------------------------------ stop
    @staticmethod
    def _kill_group(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self, name: str, timeout: float = 10) -> None:
        """SIGKILL one started process and its whole process group (a crash, not a shutdown)."""
        p = self.popens[name]
        self._kill_group(p.pid, signal.SIGKILL)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self, timeout: float = 15) -> list[str]:
        """Stop every process of this test; returns what was still alive after SIGKILL (empty)."""
        for p in self.popens.values():
            if p.poll() is None:
                self._kill_group(p.pid, signal.SIGTERM)
        for pid in tagged_pids(self.tag):
            self._kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (tagged_pids(self.tag)
                                               or any(p.poll() is None for p in self.popens.values())):
            time.sleep(0.2)
        for pid in tagged_pids(self.tag):
            self._kill_group(pid, signal.SIGKILL)
        for p in self.popens.values():
            if p.poll() is None:
                self._kill_group(p.pid, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and tagged_pids(self.tag):
            time.sleep(0.1)
        return ps_lines(self.tag)

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def tail(self, n: int = 40) -> str:
        parts = []
        for name, log in self.logs.items():
            try:
                lines = log.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                lines = []
            parts.append(f"--- {name} ---\n" + "\n".join(lines))
        return "\n".join(parts)


def wait_for(pred, timeout: float, what: str, procs: Optional[Procs] = None, interval: float = 0.25):
    """Poll ``pred()`` until truthy (returned) or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + (f"\n{procs.tail()}" if procs else ""))
