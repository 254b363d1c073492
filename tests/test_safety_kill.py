"""Issue 15: SIGKILL a ``fedmomentum aggregate --residual merge`` run anywhere; nothing is lost.

Victims are real processes killed with SIGKILL. Starting 25 CLI processes (transformers import
≈ 3-5 s each) would not fit CI, so a *fork server* (one subprocess that imports fedmomentum,
transformers and safetensors once, and runs no torch op) forks one child per kill point; the child
runs ``fedmomentum.cli.main([...])`` exactly as the console script does. Kill points:

* every named phase of the run (``FEDMOMENTUM_TEST_PAUSE_AT``: under the locks, after planning,
  after aggregating, temporaries complete, between the merged-base and the adapter installs, after
  both, and between the two renames of the non-Linux fallback install), from an earlier complete
  round and from no earlier output;
* random moments spread over the measured run time.

After each kill: a folder at a final name is complete (its marker's file list checks out), and the
pair is either verified and equal, as a whole, to the earlier round's or to the new round's pair,
or ``verify`` reports the mismatch/missing half with how to recover (rerun with --overwrite), and
a next round that would build on the half-written base refuses. Then the next run (``--overwrite``)
completes, verify is ok, and no stale temporary or lock file remains.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedmomentum import safe_io  # noqa: E402
from fedmomentum.cli import main as cli_main  # noqa: E402
from peft_helpers import build_clients, build_llama_base  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SERVER = r"""
import json, os, sys
import fedmomentum.cli, fedmomentum.peft, fedmomentum.safe_io, fedmomentum.cli.aggregate
import fedmomentum.distributed
import safetensors.torch, transformers
from transformers import AutoConfig, LlamaForCausalLM  # resolve transformers' lazy modules now
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            rc = 99
            try:
                os.environ.update(req["env"])
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                rc = fedmomentum.cli.main(req["argv"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"status": status}), flush=True)
"""

PHASES = ["locked", "planned", "aggregated", "filled", "installed:merged_base", "installed:adapter", "committed"]


class ForkServer:
    def __init__(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", FEDMOMENTUM_MALLOC="system")
        self.p = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, cwd=str(REPO), env=env)
        assert self.p.stdout.readline().strip() == "ready"

    def _ask(self, req: dict) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def start(self, argv, log: Path, env=None) -> int:
        return self._ask({"op": "run", "argv": [str(a) for a in argv], "log": str(log), "env": env or {}})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"op": "wait", "pid": pid})["status"]

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (OSError, IndexError):
        return False


def _pair_tensors(out: Path, merged: Path) -> tuple[dict, dict]:
    return (load_file(str(out / "adapter_model.safetensors")),
            load_file(str(next(merged.glob("*.safetensors")))))


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def _complete(folder: Path) -> None:
    """A folder at a final name is never partial: marker present, files as recorded."""
    m = safe_io.read_marker(folder)
    assert m is not None, f"{folder} exists without a marker: partial"
    safe_io._check_files(folder, m, "output")


def test_sigkill_anywhere_never_leaves_a_silent_mismatch(tmp_path, capsys):
    base = build_llama_base(tmp_path / "base")
    dirs = build_clients(base, tmp_path / "clients", [dict(r=4, lora_alpha=8)] * 2, seed=11)
    work = tmp_path / "round"
    work.mkdir()
    out, merged = work / "adapter", work / "merged"
    X, Y = "1,1", "1,4"  # the earlier round's weights, the killed round's weights

    def argv(weights, o=out, m=merged):
        return ["aggregate", *dirs, "--out", o, "--residual", "merge", "--base-model", base, "--merged-out", m,
                "--weights", weights, "--overwrite", "--no-progress"]

    def rerun(weights):
        rc = cli_main([str(a) for a in argv(weights)])
        err = capsys.readouterr().err
        assert rc == 0, err
        return err

    server = ForkServer()
    try:
        # the two complete pairs a killed run may leave: the earlier round's (X) and its own (Y)
        rerun(X)
        pair_x = _pair_tensors(out, merged)
        scratch = tmp_path / "scratch"
        t0 = time.perf_counter()
        pid = server.start(argv(Y, scratch / "a", scratch / "m"), tmp_path / "calib.log")
        assert server.wait(pid) == 0, (tmp_path / "calib.log").read_text()
        run_time = time.perf_counter() - t0
        pair_y = _pair_tensors(scratch / "a", scratch / "m")
        assert not _same(pair_x[0], pair_y[0]) and not _same(pair_x[1], pair_y[1])

        rng = random.Random(15)
        points = [(ph, None, True, False) for ph in PHASES]                       # from an earlier round
        points += [(ph, None, False, False) for ph in PHASES[1:]]                 # from no earlier output
        points += [("between-renames", None, True, True), ("installed:merged_base", None, True, True)]  # fallback
        points += [(None, rng.uniform(0.0, 1.1) * run_time, rng.random() < 0.7, rng.random() < 0.3)
                   for _ in range(10)]
        outcomes = {}
        for i, (phase, delay, earlier, fallback) in enumerate(points):
            if not earlier:
                shutil.rmtree(out)
                shutil.rmtree(merged)
            env = {"FEDMOMENTUM_NO_EXCHANGE": "1"} if fallback else {}
            if phase:
                env["FEDMOMENTUM_TEST_PAUSE_AT"] = phase
            log = tmp_path / f"victim{i}.log"
            pid = server.start(argv(Y), log, env)
            if phase:
                deadline = time.time() + 60
                while f"paused at {phase}" not in (log.read_text() if log.exists() else ""):
                    assert time.time() < deadline and not _exited(pid), (phase, log.read_text())
                    time.sleep(0.01)
            else:
                time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # pragma: no cover - already reaped (cannot happen before wait)
                pass
            status = server.wait(pid)
            killed = os.WIFSIGNALED(status)
            assert killed or os.WEXITSTATUS(status) == 0, log.read_text()

            # 1. nothing partial at a final name
            for d in (out, merged):
                if d.exists():
                    _complete(d)
            # 2. a verified pair is one round's pair as a whole; otherwise verify says so
            try:
                msg = safe_io.verify_outputs(out, merged)
                pair = _pair_tensors(out, merged)
                state = "old" if _same(pair[0], pair_x[0]) and _same(pair[1], pair_x[1]) else \
                    "new" if _same(pair[0], pair_y[0]) and _same(pair[1], pair_y[1]) else None
                assert state, f"point {i} ({phase or delay}): verify said {msg!r} for a pair of no single round"
            except safe_io.OutputError as e:
                text = str(e)
                assert ("mismatched pair" in text or "missing" in text or "does not exist" in text), text
                if out.exists() or merged.exists():
                    state = "reported"
                    if merged.exists() and safe_io.read_marker(merged).get("partner"):
                        # a next round must not build on the half of an interrupted pair
                        rc = cli_main(["aggregate", *map(str, dirs), "--out", str(work / "next_a"),
                                       "--residual", "merge", "--base-model", str(merged),
                                       "--merged-out", str(work / "next_m"), "--no-progress"])
                        err = capsys.readouterr().err
                        mm = safe_io.read_marker(merged)
                        if out.exists() and safe_io._pair_problem(merged, mm):  # the other round's adapter
                            assert rc != 0 and "mismatched pair" in err, err
                        else:  # its adapter is missing (moved?): a warning, see test_safety_outputs
                            assert rc == 0, err
                        shutil.rmtree(work / "next_a", ignore_errors=True)
                        shutil.rmtree(work / "next_m", ignore_errors=True)
                else:
                    state = "nothing"
                    assert not earlier, f"point {i}: the earlier round's pair is gone"
            outcomes[(phase or f"t={delay:.2f}s", earlier, fallback)] = state
            # 3. the next run completes and leaves nothing behind
            rerun(X)
            assert safe_io.verify_outputs(out, merged).startswith("ok")
            assert _same(_pair_tensors(out, merged)[0], pair_x[0])
            assert sorted(os.listdir(work)) == ["adapter", "merged"], os.listdir(work)
    finally:
        server.close()
    # the named phases reach every outcome class
    assert outcomes[("installed:merged_base", True, False)] == "reported"
    assert outcomes[("locked", True, False)] == "old" and outcomes[("committed", True, False)] == "new"
    assert outcomes[("installed:merged_base", False, False)] == "reported"
    assert outcomes[("planned", False, False)] == "nothing"
    assert len(points) >= 20
