"""The Flower App (examples/flower) in a real deployment: one ``flower-superlink`` and two
``flower-supernode`` processes on free loopback ports (insecure), runs submitted with the ``flwr``
CLI exactly as a user types them, results checked from the files the run writes
(``output-dir``, see examples/flower/fedmomentum_app/artifacts.py).

One deployment, one run (the bad-run-config and simulation runs are in test_flower_app.py):
a 4-round FedMomentum run (``residual="ship"``, exact solver): rounds 1-2 with both nodes;
  in round 3 node A is SIGKILLed in the middle of its training (the ``pause-round`` drill) and a
  new SuperNode A' with the same data partition joins; round 3 aggregates what arrived (B
  alone, weight renormalised to 1), A' receives every residual shipped so far and from then on
  holds the current global weights. Evaluation is off (``strategy.fraction-evaluate=0``): each
  client records its effective weights when a train message arrives, i.e. the global weights of
  the round before, which is what a client starts training from.

Checked from the run's outputs: (a) every round's global adapter + residual equals
``fedmomentum.aggregate`` on the replies that reached the server (and the float64 sum
Σ p_k s B_k A_k with p renormalised over them); (b) every client's effective weight after
``apply_server_update`` equals base + Σ residuals + s·B·A of the server (fp32 tolerance);
(c) every process is gone at the end, also when the test fails, and the ports are free.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

import fedmomentum  # noqa: E402

from flower_procs import NEEDS_FLWR_142, Procs, free_ports, port_is_free, ps_lines, wait_for  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower"
# Generous: a surviving node must always make it, even on a loaded 2-core machine. The dropout
# round does not wait for it: the SuperLink answers for the killed node once its heartbeat has
# expired (Flower: 2 x 30 s after its last heartbeat), and the round ends then.
ROUND_TIMEOUT = 150.0
pytestmark = [pytest.mark.slow, NEEDS_FLWR_142]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def _status(procs: Procs, run_id: str) -> str:
    out = procs.run_json(["flwr", "ls", "deployment", "--run-id", run_id], timeout=60)
    runs = out.get("runs", [])
    return runs[0]["status"] if runs else ""


def _submit(procs: Procs, *overrides: str) -> str:
    argv = ["flwr", "run", str(APP), "deployment"]
    for o in overrides:
        argv += ["--run-config", o]
    out = procs.run_json(argv, timeout=120)
    assert out.get("success"), out
    return out["run-id"]


def _wait_finished(procs: Procs, run_id: str, timeout: float) -> str:
    return wait_for(lambda: (s := _status(procs, run_id)).startswith("finished") and s,
                    timeout, f"run {run_id} to finish", procs, interval=1.0)


@pytest.fixture
def deployment(tmp_path):
    """SuperLink + SuperNodes A (partition 0, pauses in round 3) and B (partition 1)."""
    before = ps_lines()
    procs = Procs(tmp_path)
    link, node_a, node_b, node_a2 = free_ports(4)
    procs.ports = {"link": link, "a": node_a, "b": node_b, "a2": node_a2}
    (procs.home / "config.toml").write_text(
        '[superlink]\ndefault = "deployment"\n\n'
        f'[superlink.deployment]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    try:
        procs.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                  "--port", str(link), "--disable-runtime-dependency-installation"])
        wait_for(lambda: _healthy(link), 60, "the SuperLink's /health", procs)
        procs.start("supernode-a", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
            "--port", str(node_a),
            "--node-config", "partition-id=0 num-partitions=2 pause-round=3 pause-seconds=300"])
        procs.start("supernode-b", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
            "--port", str(node_b), "--node-config", "partition-id=1 num-partitions=2"])
        yield procs
    finally:
        ours = ps_lines(procs.tag)
        left = procs.stop_all()
        print("flower processes before (any session):", *before,
              "this test's processes before teardown:", *ours,
              "this test's processes after teardown:", *left,
              "flower processes after (any session, e.g. a concurrent pytest):", *ps_lines(),
              sep="\n  ")
        assert left == [], f"processes left behind: {left}"
        for name, port in procs.ports.items():
            assert wait_for(lambda: port_is_free(port), 10, f"port {port} ({name}) to be released")


# ----------------------------------------------------------------------------- output readers

def _load_round(out: Path, r: int):
    d = out / "server" / f"round-{r:03d}"
    meta = json.loads((d / "round.json").read_text())
    replies = {int(n): load_file(str(d / "replies" / f"node-{n}.safetensors"))
               for n in meta["nodes"]["aggregated"]}
    weights = {int(n): float(w) for n, w in meta["weights"].items()}
    glob = load_file(str(d / "global.safetensors"))
    res = load_file(str(d / "residual.safetensors")) if (d / "residual.safetensors").exists() else {}
    return meta, replies, weights, glob, res


def _modules(sd) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k})


def _dense(sd, name, s):
    return s * (sd[f"{name}.lora_B.weight"].double() @ sd[f"{name}.lora_A.weight"].double())


def _residual(res, name):
    if f"{name}.residual_left" not in res:
        return 0.0
    return res[f"{name}.residual_left"].double() @ res[f"{name}.residual_right"].double()


def _check_rounds(out: Path, rounds: int, run_cfg: dict):
    """(a): each round's global adapter and residual against fedmomentum.aggregate on the
    replies that reached the server, and against the float64 sum with renormalised weights."""
    s = run_cfg["scale"]
    from fedmomentum_app.task import lora_config  # the example's adapter config
    cfg = lora_config(run_cfg["lora_r"], run_cfg["lora_alpha"])
    globals_, residuals, nodes = {}, {}, {}
    for r in range(1, rounds + 1):
        meta, replies, weights, glob, res = _load_round(out, r)
        assert meta["aggregated"], (r, meta)
        ids = sorted(replies)
        agg = fedmomentum.aggregate([replies[i] for i in ids], [weights[i] for i in ids],
                                    configs=cfg, method=run_cfg["method"], rank=run_cfg["lora_r"],
                                    solver=run_cfg["solver"])
        p = torch.tensor([weights[i] for i in ids], dtype=torch.float64)
        p = p / p.sum()
        for name in _modules(glob):
            got = _dense(glob, name, s) + _residual(res, name)
            ref = sum(p[k] * _dense(replies[i], name, s) for k, i in enumerate(ids))
            scale = max(1.0, float(ref.abs().max()))
            assert float((got - ref).abs().max()) <= 2e-5 * scale, (r, name, "exact sum")
            want_lr = {k: v for k, v in agg.state_dict.items()}
            want = _dense(want_lr, name, s)
            lr = (agg.residuals or {}).get(name)
            if lr is not None and lr.rank > 0:
                want = want + lr.to_dense(torch.float64)
            assert float((got - want).abs().max()) <= 2e-5 * scale, (r, name, "aggregate()")
            assert float((_dense(glob, name, s) - _dense(want_lr, name, s)).abs().max()) <= 2e-5 * scale
        globals_[r], residuals[r], nodes[r] = glob, res, meta["nodes"]
    return globals_, residuals, nodes


def _check_clients(out: Path, globals_: dict, residuals: dict, s: float) -> dict:
    """(b): base + residuals through R + s·B_R·A_R for every client record (R = the round for an
    evaluate message, the round before for a train message). Returns {node: [(round, kind)]}."""
    base = load_file(str(out / "server" / "base-initial.safetensors"))
    globals_ = {0: load_file(str(out / "server" / "global-initial.safetensors")), **globals_}
    seen: dict[int, list] = {}
    for f in sorted((out / "clients").glob("node-*/round-*.safetensors")):
        meta = json.loads(f.with_suffix(".json").read_text())
        rnd, kind = int(meta["server-round"]), meta["kind"]
        upto = rnd if kind == "evaluate" else rnd - 1
        eff = load_file(str(f))
        assert set(eff) == set(base), f
        for name, w in eff.items():
            want = base[name].double() + _dense(globals_[upto], name, s)
            for r in range(1, upto + 1):
                want = want + _residual(residuals[r], name)
            err = float((w.double() - want).abs().max())
            assert err <= 2e-5 * max(1.0, float(want.abs().max())), (f.name, name, err)
        seen.setdefault(int(meta["node-id"]), []).append((rnd, kind))
    return seen


# ----------------------------------------------------------------------------- the test

def test_deployment_ship_two_nodes_dropout_and_rejoin(deployment, tmp_path, monkeypatch):
    procs = deployment
    t0 = time.monotonic()
    monkeypatch.syspath_prepend(str(APP))

    # four rounds, node A killed in the middle of round 3, A' joins
    out = tmp_path / "out"
    rid = _submit(procs, 'num-server-rounds=4 strategy.solver="exact" strategy.residual="ship" '
                         f'strategy.round-timeout={ROUND_TIMEOUT} train.local-steps=3 '
                         'strategy.fraction-evaluate=0.0',
                  f'output-dir="{out}"')
    paused = wait_for(lambda: sorted(out.glob("clients/node-*/round-003-paused")), 180,
                      "node A to start round 3", procs)
    node_a = int(paused[0].parent.name.split("-", 1)[1])
    procs.kill("supernode-a")                                   # a crash in the middle of the round
    procs.start("supernode-a2", [
        "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{procs.ports['link']}",
        "--port", str(procs.ports["a2"]), "--node-config", "partition-id=0 num-partitions=2"])
    status = _wait_finished(procs, rid, 200)
    assert status == "finished:completed", (status, procs.tail())
    run_cfg = json.loads((out / "server" / "run.json").read_text())
    assert run_cfg["fedmomentum-file"] == fedmomentum.__file__      # the installed library

    globals_, residuals, nodes = _check_rounds(out, 4, run_cfg)
    assert len(nodes[1]["aggregated"]) == len(nodes[2]["aggregated"]) == 2
    # A: no reply (round timeout) or the SuperLink's "node unavailable" error on its behalf
    assert node_a in nodes[3]["missing"] + nodes[3]["failed"], nodes[3]
    assert len(nodes[3]["aggregated"]) == 1          # B alone, its weight renormalised to 1
    logs = procs.run(["flwr", "log", rid, "deployment", "--show"], timeout=60).stdout
    assert (f"round 3: no reply from node(s) [{node_a}]" in logs
            or f"dropping error reply for node {node_a}: " in logs), logs[-3000:]
    seen = _check_clients(out, globals_, residuals, run_cfg["scale"])
    rejoined = [n for n in seen if n not in nodes[1]["aggregated"]]
    assert len(rejoined) == 1, seen
    a2 = rejoined[0]
    # A' came back after the kill: its first message carried every residual shipped so far, and
    # its round-4 update started from the current global weights (checked above for each record)
    assert (4, "train") in seen[a2] and a2 in nodes[4]["aggregated"], (seen, nodes[4])
    print(f"deployment test: {time.monotonic() - t0:.1f} s; nodes per round: {nodes}")
