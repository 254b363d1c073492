"""The Flower App in examples/flower: its run config (pyproject.toml and its checks), the
ServerApp stopping on a bad config before any message goes out, and ``flwr run examples/flower``
in the local simulation (the CLI's managed local SuperLink, Ray backend) as a user types it.

The deployment (SuperLink + SuperNodes, dropouts) is tests/test_flower_deployment.py."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("peft")

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.config import flatten_dict  # noqa: E402

from flower_procs import NEEDS_FLWR_142, Procs, ps_lines  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower"
if str(APP) not in sys.path:
    sys.path.insert(0, str(APP))

from fedmomentum_app import config as app_config  # noqa: E402
from fedmomentum_app import server_app  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def pyproject_run_config() -> dict:
    doc = tomllib.loads((APP / "pyproject.toml").read_text())
    return flatten_dict(doc["tool"]["flwr"]["app"]["config"])


def test_pyproject_is_a_flower_app_and_defaults_agree():
    doc = tomllib.loads((APP / "pyproject.toml").read_text())
    comps = doc["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "fedmomentum_app.server_app:app",
                     "clientapp": "fedmomentum_app.client_app:app"}
    assert "federations" not in doc["tool"]["flwr"]   # flwr 1.42 would rewrite the file
    assert any(d.startswith("fedmomentum[flower]") for d in doc["project"]["dependencies"])
    run_config = pyproject_run_config()
    assert set(run_config) == set(app_config.KEYS)
    cfg = app_config.parse_run_config(run_config)
    assert cfg == app_config.AppConfig()             # the dataclass defaults are the file's


@pytest.mark.parametrize("override, message", [
    ({"strategy.method": "fedmomentumm"}, "strategy.method = 'fedmomentumm': unknown method; choose one of"),
    ({"model.lora.peft-lora-r": 0}, "model.lora.peft-lora-r = 0: the LoRA rank must be >= 1"),
    ({"strategy.residual": "shipp"}, "strategy.residual = 'shipp': choose one of ['ship', 'server']"),
    ({"strategy.solver": "svd"}, "strategy.solver = 'svd'"),
    ({"num-server-rounds": 0}, "num-server-rounds = 0"),
    ({"strategy.fraction-train": 1.5}, "strategy.fraction-train = 1.5"),
    ({"strategy.accept-failures": "yes"}, "strategy.accept-failures = 'yes': expected bool"),
    ({"model.lora.peft-lora-r": 2.5}, "model.lora.peft-lora-r = 2.5: expected int"),
    ({"train.local-steps": True}, "train.local-steps = True: expected int"),
])
def test_bad_run_config_clear_message(override, message):
    with pytest.raises(ValueError) as e:
        app_config.parse_run_config({**pyproject_run_config(), **override})
    assert message in str(e.value)
    assert "bad run config" in str(e.value)


def test_bad_run_config_lists_every_bad_key():
    with pytest.raises(ValueError) as e:
        app_config.parse_run_config({"strategy.method": "x", "model.lora.peft-lora-r": -1,
                                     "strategy.residual": "later"})
    text = str(e.value)
    assert "strategy.method" in text and "peft-lora-r" in text and "strategy.residual" in text


class RecordingGrid:
    """A Grid stand-in that records every call: the ServerApp must not touch it."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*a, **k):
            self.calls.append(name)
            raise AssertionError(f"grid.{name} called")
        return record


def test_server_app_stops_before_any_message_on_bad_config():
    grid = RecordingGrid()
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={**pyproject_run_config(), "strategy.residual": "later"})
    with pytest.raises(ValueError, match="strategy.residual = 'later'"):
        server_app.main(grid, ctx)
    assert grid.calls == []


# ----------------------------------------------------------------------------- flwr run (simulation)

@pytest.mark.slow
@NEEDS_FLWR_142
def test_flwr_run_local_simulation(tmp_path):
    """``flwr run examples/flower --stream`` in the local simulation: exit 0, the run completes and
    the clients' effective weights equal the server's aggregate; a bad run config fails at
    start-up with its message in the run's log and no client ever runs."""
    from flower_procs import free_ports
    before = ps_lines()
    procs = Procs(tmp_path)
    http_port, control_port = free_ports(2)
    procs.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    procs.env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    t0 = time.monotonic()
    try:
        out = tmp_path / "out"
        res = procs.run(["flwr", "run", str(APP), "--stream", "--run-config",
                         f'output-dir="{out}" train.local-steps=2'], timeout=300)
        assert res.returncode == 0
        assert "Successfully started run" in res.stdout, res.stdout[-3000:]
        done = json.loads((out / "server" / "done.json").read_text())
        assert done["aggregated-rounds"] == [1, 2]
        assert all(float(v) <= 1e-5 for v in done["max-abs-diff"].values()) and done["max-abs-diff"]
        run_cfg = json.loads((out / "server" / "run.json").read_text())
        import fedmomentum
        assert run_cfg["fedmomentum-file"] == fedmomentum.__file__    # the installed library
        assert "max |client effective weight - server base+residuals+s*B*A|" in res.stdout

        bad = tmp_path / "bad"
        res = procs.run(["flwr", "run", str(APP), "--stream", "--run-config",
                         f'strategy.method="fedmomentumm" output-dir="{bad}"'], timeout=300)
        assert "strategy.method = 'fedmomentumm': unknown method" in res.stdout, res.stdout[-3000:]
        assert not bad.exists()
        runs = procs.run_json(["flwr", "ls", "local"], timeout=60)["runs"]
        status = sorted(r["status"] for r in runs)
        assert status == ["finished:completed", "finished:failed"], runs
        print(f"flwr run simulation test: {time.monotonic() - t0:.1f} s")
    finally:
        ours = ps_lines(procs.tag)
        left = procs.stop_all()
        print("flower processes before (any session):", *before,
              "this test's processes before teardown (incl. the detached local SuperLink):", *ours,
              "this test's processes after teardown:", *left,
              "flower processes after (any session):", *ps_lines(), sep="\n  ")
    assert left == [], left
