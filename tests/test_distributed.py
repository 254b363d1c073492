"""fedmomentum.distributed: sharded aggregation on torch.distributed (2 gloo processes on 127.0.0.1).

Claim tested: the per-module math is the single-process code, so the sharded output files are
*bitwise* identical to ``fedmomentum.peft.aggregate_adapters`` (adapter_model.safetensors,
residual.safetensors, adapter_config.json, merged model weights; the report json equal except
timings; for flexlora/hetlora also every rank_<r>/ per-client folder). Independent oracle for the
content: Σ_k p_k s_k B_k A_k in float64 equals s·B·A + residual per module. A rank that fails
makes every rank exit non-zero and leaves no output.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch.distributed as tdist  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from fedmomentum import distributed as fdist  # noqa: E402
from fedmomentum.cli import main as cli_main  # noqa: E402
from fedmomentum.peft import aggregate_adapters, load_residuals, plan_adapters  # noqa: E402
from peft_helpers import build_clients, build_llama_base  # noqa: E402

if not tdist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TIMEOUT = 180
WEIGHTS = [1.0, 2.0, 3.0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base and 3 clients (r=4, α=8; the third with r=6, α=12) on all 7 projections."""
    root = tmp_path_factory.mktemp("dllama")
    base = build_llama_base(root / "base")
    dirs = build_clients(base, root / "clients", [dict(r=4, lora_alpha=8)] * 2 + [dict(r=6, lora_alpha=12)], seed=4)
    return {"base": base, "dirs": dirs}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _spawn(code: str, world: int, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run ``code`` in ``world`` python processes with torchrun's env (127.0.0.1, a free port)."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = _child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=r, LOCAL_RANK=r, WORLD_SIZE=world)
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=str(cwd), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "fedmomentum", *args]
    return subprocess.run(cmd, cwd=str(cwd), env=_child_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _same_bytes(fa: Path, fb: Path) -> None:
    """Byte equality; for safetensors the header is compared as JSON (the Rust writer's metadata
    map has no fixed key order, even between two single-process runs) and the data bytes exactly."""
    ba, bb = fa.read_bytes(), fb.read_bytes()
    if fa.suffix != ".safetensors":
        assert ba == bb, f"{fa.name} differs"
        return
    na, nb = struct.unpack("<Q", ba[:8])[0], struct.unpack("<Q", bb[:8])[0]
    assert json.loads(ba[8:8 + na]) == json.loads(bb[8:8 + nb]), f"{fa.name}: headers differ"
    assert ba[8 + na:] == bb[8 + nb:], f"{fa.name}: tensor bytes differ"


def _same_files(a: Path, b: Path, names=("adapter_model.safetensors", "adapter_config.json",
                                          "residual.safetensors")) -> None:
    for name in names:
        assert (a / name).is_file() == (b / name).is_file(), name
        if (a / name).is_file():
            _same_bytes(a / name, b / name)
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert list(ta) and set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ra = json.loads((a / "fedmomentum_report.json").read_text())
    rb = json.loads((b / "fedmomentum_report.json").read_text())
    timing = ("seconds", "read_seconds", "info")
    strip = [{k: v for k, v in m.items() if k not in timing} for m in ra["modules"]]
    assert strip == [{k: v for k, v in m.items() if k not in timing} for m in rb["modules"]]
    assert ra["method"] == rb["method"] and ra["residual"] == rb["residual"]


def _no_leftovers(folder: Path, expected: set[str]) -> None:
    assert set(os.listdir(folder)) == expected, sorted(os.listdir(folder))


def _check_against_fp64(dirs, out: Path, weights) -> None:
    """Independent oracle: s·B·A + residual == Σ_k p_k s_k B_k A_k (float64) for every module."""
    aplan = plan_adapters(dirs, weights)
    cfg = json.loads((out / "adapter_config.json").read_text())
    new = load_file(str(out / "adapter_model.safetensors"))
    res = load_residuals(out)
    clients = [load_file(str(Path(d) / "adapter_model.safetensors")) for d in dirs]
    for spec in aplan.modules:
        ref = sum(p * s * (c[lk.b_key].double() @ c[lk.a_key].double())
                  for p, s, c, lk in zip(aplan.plan.p, spec.scalings, clients, spec.keys))
        r = cfg["rank_pattern"].get(spec.rel_name, cfg["r"])
        alpha = cfg["alpha_pattern"].get(spec.rel_name, cfg["lora_alpha"])
        got = (alpha / r) * (new[f"{spec.name}.lora_B.weight"].double() @ new[f"{spec.name}.lora_A.weight"].double())
        got = got + res[spec.name].left.double() @ res[spec.name].right.double()
        assert float((got - ref).norm() / ref.norm()) < 1e-5, spec.name


# ----------------------------------------------------------------------------- two processes

_API_SCRIPT = textwrap.dedent("""
    import json
    import torch.distributed as dist
    from fedmomentum import distributed as fd
    dirs, out, merged, base = {args}
    agg = fd.aggregate_adapters(dirs, out, {weights}, rank=3)
    agg2 = fd.aggregate_adapters(dirs, out + "_merge", {weights}, rank=3, residual="merge",
                                 base_model=base, merged_out=merged, keep_residuals=False)
    kept = dist.is_initialized()  # the group made from the environment is kept for later calls
    released = fd.release_process_group()
    print(json.dumps({{"report": [r.name for r in agg.report], "residuals": sorted(agg.residuals),
                      "state": sorted(agg.state_dict), "merge_residuals": len(agg2.residuals),
                      "kept": kept, "released": released, "initialized_after": dist.is_initialized()}}))
""")


def test_two_ranks_bitwise_equal_single_process(llama, tmp_path):
    dirs, base = [str(d) for d in llama["dirs"]], str(llama["base"])
    out, merged = tmp_path / "dist" / "out", tmp_path / "dist" / "merged"
    (tmp_path / "dist").mkdir()
    code = _API_SCRIPT.format(args=repr((dirs, str(out), str(merged), base)), weights=WEIGHTS)
    runs = _spawn(code, 2, tmp_path)
    for r, run in enumerate(runs):
        assert run.returncode == 0, f"rank {r}:\n{run.stderr[-3000:]}"
    info = [json.loads(run.stdout.strip().splitlines()[-1]) for run in runs]

    lout, lmerged = tmp_path / "local" / "out", tmp_path / "local" / "merged"
    local = aggregate_adapters(dirs, lout, WEIGHTS, rank=3)
    aggregate_adapters(dirs, str(lout) + "_merge", WEIGHTS, rank=3, residual="merge", base_model=base,
                       merged_out=lmerged, keep_residuals=False)
    _same_files(out, lout)
    _same_files(Path(str(out) + "_merge"), Path(str(lout) + "_merge"))
    _same_bytes(merged / "model.safetensors", lmerged / "model.safetensors")
    assert json.loads((merged / "config.json").read_text()) == json.loads((lmerged / "config.json").read_text())
    _check_against_fp64(dirs, out, WEIGHTS)

    # rank 0 returns the whole aggregation, rank 1 its own shard (the LPT assignment)
    names = [r.name for r in local.report]
    assert info[0]["report"] == names and info[0]["residuals"] == sorted(local.residuals)
    assert info[0]["state"] == sorted(local.state_dict)
    shards = fdist.shard_modules(plan_adapters(dirs).modules, 2, rank=3)
    assert info[1]["report"] == [names[i] for i in shards[1]] and 0 < len(shards[1]) < len(names)
    assert info[1]["residuals"] == sorted(names[i] for i in shards[1])
    assert info[0]["merge_residuals"] == 0  # keep_residuals=False: merged on rank 0, none kept
    for i in info:  # the group it made was kept across the two calls, then released
        assert i["kept"] and i["released"] and not i["initialized_after"]
    _no_leftovers(tmp_path / "dist", {"out", "out_merge", "merged"})


def test_torchrun_cli_equals_single_process_cli(llama, tmp_path):
    dirs = [str(d) for d in llama["dirs"]]
    run = _torchrun(["aggregate", *dirs, "--out", str(tmp_path / "dist"), "--weights", "3,1,1", "--rank", "2"],
                    tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("14 modules") == 1  # only rank 0 prints the summary
    assert cli_main(["aggregate", *dirs, "--out", str(tmp_path / "local"), "--weights", "3,1,1", "--rank", "2"]) == 0
    _same_files(tmp_path / "dist", tmp_path / "local")
    _check_against_fp64(dirs, tmp_path / "dist", [3, 1, 1])
    _no_leftovers(tmp_path, {"dist", "local"})


def test_failing_shard_fails_every_rank_and_writes_nothing(llama, tmp_path):
    import shutil

    dirs = []
    for d in llama["dirs"]:
        dirs.append(tmp_path / "in" / Path(d).name)
        shutil.copytree(d, dirs[-1])
    aplan = plan_adapters(dirs)
    shards = fdist.shard_modules(aplan.modules, 2, rank=2)
    bad = aplan.modules[shards[1][-1]]  # a module only rank 1 reads
    f = dirs[1] / "adapter_model.safetensors"
    t = load_file(str(f))
    t[f"{bad.name}.lora_B.weight"][1, 0] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"
    run = _torchrun(["aggregate", *map(str, dirs), "--out", str(out), "--rank", "2"], tmp_path)
    assert run.returncode != 0
    # both ranks report it and exit 1 (their stderr lines may interleave: count, do not split lines)
    head = "fedmomentum aggregate: error: rank 1 of 2 failed while aggregating"
    assert run.stderr.count(head) == 2, run.stderr[-3000:]
    msg = run.stderr[run.stderr.index(head):]
    assert f"layer '{bad.name}': client 1 ({dirs[1]}): B (shape" in msg and "NaN" in msg
    assert "exitcode  : 1" in run.stderr and "rank      : 0" in run.stderr and "rank      : 1" in run.stderr
    _no_leftovers(tmp_path / "work", set())


def test_bad_out_refused_while_planning_before_any_aggregation(llama, tmp_path):
    """A foreign non-empty --out is refused by rank 0's up-front check, reported by every rank as a
    planning failure (not after the aggregation), and the folder is left exactly as it was."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    run = _torchrun(["aggregate", *llama["dirs"], "--out", str(out), "--rank", "2"], tmp_path)
    assert run.returncode != 0
    head = "fedmomentum aggregate: error: rank 0 of 2 failed while planning"
    assert run.stderr.count(head) == 2, run.stderr[-3000:]
    assert str(out) in run.stderr[run.stderr.index(head):]
    assert "aggregating" not in run.stderr
    _no_leftovers(out, {"notes.txt"})
    assert (out / "notes.txt").read_text() == "a user's file"


# ----------------------------------------------------------------------------- in-process

def test_single_process_falls_back_to_local(llama, tmp_path, monkeypatch):
    dirs = llama["dirs"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not fdist.is_distributed()
    a = fdist.aggregate_adapters(dirs, tmp_path / "a", WEIGHTS, rank=2, keep_residuals=False)
    aggregate_adapters(dirs, tmp_path / "b", WEIGHTS, rank=2, keep_residuals=False)
    _same_files(tmp_path / "a", tmp_path / "b")
    assert len(a.report) == 14
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not fdist.is_distributed()
    fdist.aggregate_adapters(dirs, tmp_path / "c", WEIGHTS, rank=2, keep_residuals=False)
    _same_files(tmp_path / "c", tmp_path / "b")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        fdist.aggregate_adapters(dirs, tmp_path / "d", WEIGHTS)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="is not set; start with torchrun"):
        fdist.aggregate_adapters(dirs, tmp_path / "d", WEIGHTS)
    with pytest.raises(ValueError, match="residual must be one of"):
        fdist.aggregate_adapters(dirs, tmp_path / "d", WEIGHTS, residual="keep")
    assert not (tmp_path / "d").exists() and not tdist.is_initialized()


def test_shard_modules_lpt_deterministic_and_balanced(llama):
    mods = plan_adapters(llama["dirs"]).modules
    for world in (1, 2, 3, 5, 20):
        shards = fdist.shard_modules(mods, world, rank=2)
        assert shards == fdist.shard_modules(mods, world, rank=2)  # same on every rank
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(len(mods)))  # each module exactly once
        costs = [fdist.module_cost(s, 2) for s in mods]
        loads = [sum(costs[i] for i in s) for s in shards]
        # LPT: no rank exceeds the lightest by more than one module's cost, nor the 4/3 bound
        assert max(loads) - min(loads) <= max(costs) + 1e-6
        lower = max(sum(costs) / world, max(costs))
        assert max(loads) <= 4 / 3 * lower + 1e-6
    # costs follow the shapes: a 128x64 gate_proj costs more than a 32x64 k_proj
    by = {s.rel_name.split(".")[-1] + s.rel_name.split(".")[2]: fdist.module_cost(s, 2) for s in mods}
    assert by["gate_proj0"] > by["k_proj0"] > 0
    with pytest.raises(ValueError, match="world_size"):
        fdist.shard_modules(mods, 0)


# ----------------------------------------------------------------------------- method traits

_PER_CLIENT_SCRIPT = textwrap.dedent("""
    import json
    from fedmomentum import distributed as fd
    dirs, out, runs = {args}
    info = {{}}
    for method, mo in runs:
        agg = fd.aggregate_adapters(dirs, out + "_" + method, {weights}, method=method, method_options=mo)
        info[method] = {{"per_client": [sorted(d) for d in agg.per_client], "report": [r.name for r in agg.report]}}

    def boom(*a, **k):  # writing the rank_<r>/ folders fails on rank 0: nothing may be installed
        raise OSError("disk full (test)")

    fd._peft.write_per_client_dirs = boom
    try:
        fd.aggregate_adapters(dirs, out + "_fail", {weights}, method="flexlora")
    except Exception as e:
        info["fail"] = type(e).__name__ + ": " + str(e)
    fd.release_process_group()
    print(json.dumps(info))
""")


def _same_per_client_dirs(a: Path, b: Path) -> dict:
    """The ``rank_<r>/`` folders of two outputs are equal (tensors bitwise, configs as dicts)."""
    ra = json.loads((a / "fedmomentum_report.json").read_text())
    rb = json.loads((b / "fedmomentum_report.json").read_text())
    assert "per_client_dirs" in ra and ra["per_client_dirs"] == rb["per_client_dirs"]
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in ra["per_client_dirs"]:
        assert sorted(os.listdir(a / name)) == sorted(os.listdir(b / name)) == [
            "adapter_config.json", "adapter_model.safetensors"]
        _same_bytes(a / name / "adapter_model.safetensors", b / name / "adapter_model.safetensors")
        ta, tb = (load_file(str(x / name / "adapter_model.safetensors")) for x in (a, b))
        assert list(ta) and set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), name
        ca = json.loads((a / name / "adapter_config.json").read_text())
        assert ca == json.loads((b / name / "adapter_config.json").read_text())
        assert ca["fedmomentum_clients"] == ra["per_client_dirs"][name]
    return ra["per_client_dirs"]


def test_per_client_methods_two_ranks_equal_single_process(llama, tmp_path):
    """flexlora / hetlora (the per_client trait) on clients of ranks 4, 4, 6: the sharded output,
    its rank_<r>/ folders included, equals one process; rank 1 returns its shard's per-client keys.
    A failure while rank 0 writes those folders fails both ranks and installs nothing."""
    dirs = [str(d) for d in llama["dirs"]]
    runs = [("flexlora", None), ("hetlora", {"client_ranks": [2, 2, 6]})]
    (tmp_path / "dist").mkdir()
    code = _PER_CLIENT_SCRIPT.format(args=repr((dirs, str(tmp_path / "dist" / "out"), runs)), weights=WEIGHTS)
    procs = _spawn(code, 2, tmp_path)
    for r, run in enumerate(procs):
        assert run.returncode == 0, f"rank {r}:\n{run.stderr[-3000:]}"
    info = [json.loads(run.stdout.strip().splitlines()[-1]) for run in procs]
    shard1 = {plan_adapters(dirs).modules[i].name for i in fdist.shard_modules(plan_adapters(dirs).modules, 2)[1]}
    expected_dirs = {"flexlora": {"rank_4": [0, 1], "rank_6": [2]}, "hetlora": {"rank_2": [0, 1], "rank_6": [2]}}
    for method, mo in runs:
        dist_out, local_out = tmp_path / "dist" / f"out_{method}", tmp_path / "local" / method
        local = aggregate_adapters(dirs, local_out, WEIGHTS, method=method, method_options=mo)
        _same_files(dist_out, local_out)
        assert _same_per_client_dirs(dist_out, local_out) == expected_dirs[method]
        assert len(local.per_client) == 3
        assert info[0][method]["per_client"] == [sorted(d) for d in local.per_client]
        # a worker returns K dicts of its own modules' per-client factors only
        assert info[1][method]["per_client"] == [
            sorted(k for k in d if k.rsplit(".lora_", 1)[0] in shard1) for d in local.per_client]
        assert 0 < len(info[1][method]["report"]) < len(info[0][method]["report"])
    assert info[0]["fail"] == "OSError: disk full (test)"
    assert info[1]["fail"].startswith("RuntimeError: rank 0 of 2 failed while assembling and writing the output: "
                                      "disk full (test)")
    _no_leftovers(tmp_path / "dist", {"out_flexlora", "out_hetlora"})  # no out_fail, no temporary folder


def test_torchrun_fedrot_lora_reference_equals_single_process(llama, tmp_path):
    """method_options reach every rank: fedrot_lora round 1 with a reference adapter folder."""
    import fedmomentum as fm
    from fedmomentum.cli.aggregate import reference_adapter

    dirs = [str(d) for d in llama["dirs"][:2]]  # fedrot_lora needs equal client ranks (4, 4)
    prev = tmp_path / "prev"
    aggregate_adapters(dirs, prev, rank=4, residual="discard")  # the "previous global adapter"
    args = ["aggregate", *dirs, "--weights", "1,3", "--method", "fedrot_lora", "--round", "1", "--lam", "0.7",
            "--reference", str(prev), "--no-progress"]
    run = _torchrun([*args, "--out", str(tmp_path / "dist")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert cli_main([*args, "--out", str(tmp_path / "local")]) == 0
    _same_files(tmp_path / "dist", tmp_path / "local")
    # the reference was used: one module of rank 1's shard against the layer-level call
    aplan = plan_adapters(dirs)
    spec = aplan.modules[fdist.shard_modules(aplan.modules, 2)[1][0]]
    sds = [load_file(str(Path(d) / "adapter_model.safetensors")) for d in dirs]
    lk = spec.keys
    one = fm.aggregate_lora([sd[k.b_key] for sd, k in zip(sds, lk)], [sd[k.a_key] for sd, k in zip(sds, lk)],
                            [1, 3], scalings=2.0, method="fedrot_lora",
                            method_options={"round": 1, "reference": reference_adapter(prev)[spec.name], "lam": 0.7})
    got = load_file(str(tmp_path / "dist" / "adapter_model.safetensors"))
    assert torch.allclose(got[f"{spec.name}.lora_B.weight"], one.B, atol=1e-6)
    _no_leftovers(tmp_path, {"prev", "dist", "local"})
