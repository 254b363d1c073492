"""fedmomentum.peft + ``fedmomentum aggregate`` with real transformers/peft objects built from configs.

Oracle: the base model with Σ_k p_k ΔW_k merged in float64, ΔW_k from PEFT's own
``get_delta_weight`` (peft_helpers.reference_model). Acceptance: logits of
merged_out + PeftModel(out_dir) match it to relative error ≤ 1e-4 in fp32.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PeftModel  # noqa: E402

import fedmomentum as fm  # noqa: E402
from fedmomentum.cli import main as cli_main  # noqa: E402
from fedmomentum.peft import aggregate_adapters, load_residuals, merge_residuals_  # noqa: E402
from fedmomentum.safe_io import MARKER_FILE, write_marker  # noqa: E402
from peft_helpers import (build_clients, build_gpt2_base, build_llama_base, input_ids, load_base,  # noqa: E402
                          logits, reference_model, rel_err)

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base and 3 clients (r=4, α=8, LoRA on q,k,v,o,gate,up,down), plus two odd clients:
    one with other target_modules, one trained on a base with another intermediate size."""
    root = tmp_path_factory.mktemp("llama")
    base = build_llama_base(root / "base")
    dirs = build_clients(base, root / "clients", [dict(r=4, lora_alpha=8)] * 3, seed=1)
    odd_tm = build_clients(base, root / "odd_tm", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])], seed=2)[0]
    base96 = build_llama_base(root / "base96", intermediate=96)
    odd_shape = build_clients(base96, root / "odd_shape", [dict(r=4, lora_alpha=8)], seed=3)[0]
    return {"base": base, "dirs": dirs, "odd_tm": odd_tm, "odd_shape": odd_shape}


def _peft_logits(merged_dir, adapter_dir, ids):
    return logits(PeftModel.from_pretrained(load_base(merged_dir), str(adapter_dir)).eval(), ids)


def test_cli_merge_logits_match_direct_sum(llama, tmp_path, capsys):
    base, dirs = llama["base"], llama["dirs"]
    out, merged = tmp_path / "out", tmp_path / "merged"
    rc = cli_main(["aggregate", *map(str, dirs), "--out", str(out), "--weights", "1,2,3",
                   "--residual", "merge", "--base-model", str(base), "--merged-out", str(merged)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "14 modules" in printed and "layers.1.mlp.down_proj" in printed
    ids = input_ids()
    ref = logits(reference_model(base, dirs, [1, 2, 3]), ids)
    got = _peft_logits(merged, out, ids)
    assert rel_err(got, ref) <= TOL
    assert rel_err(logits(load_base(base), ids), ref) > 1e-2  # the update is not negligible
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and not (out / "residual.safetensors").exists()
    rep = json.loads((out / "fedmomentum_report.json").read_text())
    assert len(rep["modules"]) == 14 and all(m["residual_rank"] == 8 for m in rep["modules"])
    assert sorted(os.listdir(tmp_path)) == ["merged", "out"]  # no temporary folders left


def test_subprocess_save_then_load_residuals(llama, tmp_path):
    base, dirs = llama["base"], llama["dirs"]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-m", "fedmomentum", "aggregate", *map(str, dirs), "--out", str(out),
                           "--rank", "2", "--weights", "3,1,1"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "14 modules" in proc.stdout and "residual.safetensors" in proc.stdout
    res = load_residuals(out / "residual.safetensors")
    assert len(res) == 14 and all(r.rank == 10 for r in res.values())
    ids = input_ids()
    ref = logits(reference_model(base, dirs, [3, 1, 1]), ids)
    model = merge_residuals_(load_base(base), res)  # plain transformers model, dict of LowRank
    got = logits(PeftModel.from_pretrained(model, str(out)).eval(), ids)
    assert rel_err(got, ref) <= TOL
    # a PeftModel and the residual file's path work too
    pm = PeftModel.from_pretrained(load_base(base), str(out)).eval()
    merge_residuals_(pm, out / "residual.safetensors")
    assert rel_err(logits(pm, ids), ref) <= TOL
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_rslora_patterns_heterogeneous_ranks(llama, tmp_path):
    base = llama["base"]
    cfgs = [dict(r=4, lora_alpha=8),
            dict(r=8, lora_alpha=16, use_rslora=True),
            dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 6, "layers.1.mlp.down_proj": 2},
                 alpha_pattern={"v_proj": 3})]
    dirs = build_clients(base, tmp_path / "clients", cfgs, seed=4)
    out, merged = tmp_path / "out", tmp_path / "merged"
    agg = aggregate_adapters(dirs, out, [2, 1, 1], rank=5, residual="merge", base_model=base, merged_out=merged)
    q = next(r for r in agg.report if r.name.endswith("layers.0.self_attn.q_proj"))
    d = next(r for r in agg.report if r.name.endswith("layers.1.mlp.down_proj"))
    assert q.ranks == (4, 8, 6) and d.ranks == (4, 8, 2) and q.rank == 5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["use_rslora"] is False and cfg["alpha_pattern"]  # scalings differ per module
    ids = input_ids()
    ref = logits(reference_model(base, dirs, [2, 1, 1]), ids)
    assert rel_err(_peft_logits(merged, out, ids), ref) <= TOL


def test_all_rslora_clients_give_rslora_output(llama, tmp_path):
    base = llama["base"]
    dirs = build_clients(base, tmp_path / "clients", [dict(r=4, lora_alpha=8, use_rslora=True),
                                                        dict(r=4, lora_alpha=8, use_rslora=True)], seed=5)
    out = tmp_path / "out"
    aggregate_adapters(dirs, out, rank=4)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == 8
    ids = input_ids()
    model = merge_residuals_(load_base(base), out / "residual.safetensors")
    got = logits(PeftModel.from_pretrained(model, str(out)).eval(), ids)
    assert rel_err(got, logits(reference_model(base, dirs), ids)) <= TOL


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    base = build_gpt2_base(tmp_path / "gpt2")
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    dirs = build_clients(base, tmp_path / "clients", [kw] * 3, seed=6)
    out, merged = tmp_path / "out", tmp_path / "merged"
    agg = aggregate_adapters(dirs, out, [1, 1, 2], rank=3, residual="merge", base_model=base, merged_out=merged)
    r = agg.residuals["base_model.model.transformer.h.0.attn.c_attn"]
    assert r.shape == (32, 96)  # Conv1D weight is in x out
    assert all(rep.kind == "conv1d" for rep in agg.report)
    ids = input_ids(vocab=100)
    ref = logits(reference_model(base, dirs, [1, 1, 2]), ids)
    assert rel_err(_peft_logits(merged, out, ids), ref) <= TOL


def test_embedding_lora(llama, tmp_path):
    base = llama["base"]
    kw = dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "v_proj"])
    dirs = build_clients(base, tmp_path / "clients", [kw] * 3, seed=7)
    out, merged = tmp_path / "out", tmp_path / "merged"
    agg = aggregate_adapters(dirs, out, rank=2, residual="merge", base_model=base, merged_out=merged)
    emb = "base_model.model.model.embed_tokens"
    assert agg.residuals[emb].shape == (128, 64) and f"{emb}.lora_embedding_A" in agg.state_dict
    # PEFT saved the frozen embedding weight in each adapter; it must not reach the output
    assert agg.skipped_keys == [f"{emb}.base_layer.weight"] and f"{emb}.base_layer.weight" not in agg.state_dict
    ids = input_ids()
    ref = logits(reference_model(base, dirs), ids)
    assert rel_err(_peft_logits(merged, out, ids), ref) <= TOL


def test_method_outputs_written(llama, tmp_path):
    base, dirs = llama["base"], llama["dirs"]
    out = tmp_path / "fedsa"
    aggregate_adapters(dirs, out, method="fedsa_lora")
    from safetensors import safe_open
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 14 and all(".lora_A." in k for k in f.keys())
    agg = aggregate_adapters(dirs, tmp_path / "florist", method="florist", tau=0.5, residual="discard")
    cfg = json.loads((tmp_path / "florist" / "adapter_config.json").read_text())
    from peft.utils.other import get_pattern_key
    for rep in agg.report:
        rel = rep.name[len("base_model.model."):]
        assert cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), rel), cfg["r"]) == rep.rank
    assert not (tmp_path / "florist" / "residual.safetensors").exists()
    # flora: fresh adapter (B = 0) + the whole update in the residual
    out = tmp_path / "flora"
    aggregate_adapters(dirs, out, method="flora")
    ids = input_ids()
    model = merge_residuals_(load_base(base), out / "residual.safetensors")
    got = logits(PeftModel.from_pretrained(model, str(out)).eval(), ids)
    assert rel_err(got, logits(reference_model(base, dirs), ids)) <= TOL
    with pytest.raises(ValueError, match="flora"):
        aggregate_adapters(dirs, tmp_path / "x", method="flora", residual="discard")


# ----------------------------------------------------------------------------- bad inputs

def _copy_clients(llama, tmp_path):
    dirs = []
    for k, d in enumerate(llama["dirs"]):
        dst = tmp_path / "in" / f"c{k}"
        shutil.copytree(d, dst)
        dirs.append(dst)
    return dirs


def _rewrite(path: Path, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path))
    save_file(fn(sd), str(path))


def _missing_module(dirs, llama):
    _rewrite(dirs[1] / "adapter_model.safetensors",
             lambda sd: {k: v for k, v in sd.items() if "layers.1.self_attn.v_proj" not in k})
    return dirs, [r"c1", r"layers\.1\.self_attn\.v_proj"]


def _other_targets(dirs, llama):
    return [dirs[0], dirs[1], llama["odd_tm"]], [r"odd_tm", r"mlp\.down_proj", "target_modules"]


def _other_shapes(dirs, llama):
    return [dirs[0], llama["odd_shape"], dirs[2]], [r"odd_shape", r"layers\.0\.mlp\.down_proj", "different shapes"]


def _missing_config(dirs, llama):
    (dirs[2] / "adapter_config.json").unlink()
    return dirs, [r"c2", "adapter_config.json"]


def _corrupt_file(dirs, llama):
    f = dirs[0] / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return dirs, [r"c0", "adapter_model.safetensors", "corrupt"]


def _nan_late(dirs, llama):
    def fn(sd):
        k = next(k for k in sd if "layers.1.self_attn.v_proj.lora_B" in k)
        sd[k][0, 0] = float("nan")
        return sd
    _rewrite(dirs[2] / "adapter_model.safetensors", fn)
    return dirs, [r"c2", r"layers\.1\.self_attn\.v_proj", "NaN"]


def _config_mismatch(dirs, llama):
    f = dirs[1] / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg["rank_pattern"] = {"k_proj": 8}
    f.write_text(json.dumps(cfg))
    return dirs, [r"c1", r"k_proj", "rank_pattern"]


@pytest.mark.parametrize("case", [_missing_module, _other_targets, _other_shapes, _missing_config,
                                  _corrupt_file, _nan_late, _config_mismatch])
def test_bad_inputs_clear_error_nothing_written(llama, tmp_path, case):
    dirs, patterns = case(_copy_clients(llama, tmp_path), llama)
    out = tmp_path / "round" / "out"
    out.mkdir(parents=True)
    (out / "previous.txt").write_text("round 1")  # an existing out_dir must stay as it was
    write_marker(out, "round1", "adapter")  # an earlier output of ours: replaceable with overwrite=True
    merged = tmp_path / "round" / "merged"
    with pytest.raises(ValueError) as ei:
        aggregate_adapters(dirs, out, residual="merge", base_model=llama["base"], merged_out=merged, overwrite=True)
    msg = str(ei.value)
    for pat in patterns:
        assert re.search(pat, msg), (pat, msg)
    assert sorted(os.listdir(out)) == [MARKER_FILE, "previous.txt"] and (out / "previous.txt").read_text() == "round 1"
    assert sorted(os.listdir(tmp_path / "round")) == ["out"]  # no merged_out, no temporary folders


def test_cli_reports_errors(llama, tmp_path, capsys):
    rc = cli_main(["aggregate", str(llama["dirs"][0]), str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "nope" in err and "does not exist" in err and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="needs base_model"):
        aggregate_adapters(llama["dirs"], tmp_path / "o", residual="merge")
    assert cli_main(["aggregate", *map(str, llama["dirs"]), "--out", str(tmp_path / "o"), "--weights", "1,x"]) == 1
    assert "comma-separated" in capsys.readouterr().err
    assert cli_main(["aggregate", *map(str, llama["dirs"]), "--out", str(tmp_path / "o"), "--weights", "1,2"]) == 1
    assert "expected 3 weights" in capsys.readouterr().err


def test_merge_residuals_checks_before_touching(llama):
    model = load_base(llama["base"])
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    good = fm.LowRank(torch.ones(64, 1), torch.ones(1, 64))
    bad = fm.LowRank(torch.ones(64, 1), torch.ones(1, 32))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj.*64 x 32.*\(32, 64\)"):
        merge_residuals_(model, {"base_model.model.model.layers.0.self_attn.q_proj": good,
                                 "base_model.model.model.layers.0.self_attn.k_proj": bad})
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w0)
    with pytest.raises(ValueError, match="no such module"):
        merge_residuals_(model, {"model.layers.9.q_proj": good})
    merge_residuals_(model, {"model.layers.0.self_attn.q_proj": good})  # prefix-less names work too
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, w0 + 1)


def test_streamed_residuals_equal_kept_ones(llama, tmp_path):
    dirs = llama["dirs"]
    kept = aggregate_adapters(dirs, tmp_path / "a", [1, 2, 3], rank=2)
    streamed = aggregate_adapters(dirs, tmp_path / "b", [1, 2, 3], rank=2, keep_residuals=False)
    assert streamed.residuals == {} and streamed.residual_mode == "factored"
    ra, rb = load_residuals(tmp_path / "a"), load_residuals(tmp_path / "b")
    assert set(ra) == set(rb) == set(kept.residuals) and len(ra) == 14
    for name in ra:
        assert torch.equal(ra[name].left, rb[name].left) and torch.equal(ra[name].right, rb[name].right)
        assert torch.equal(ra[name].left, kept.residuals[name].left)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_stream_writer_format(tmp_path):
    from safetensors.torch import load_file

    from fedmomentum.peft import SafetensorsStreamWriter
    ts = {"x.residual_left": torch.randn(5, 3), "y": torch.randn(2, 7, dtype=torch.float64),
          "z": torch.randn(4, 1).to(torch.bfloat16), "empty": torch.zeros(3, 0)}
    w = SafetensorsStreamWriter(tmp_path / "f.safetensors", metadata={"format": "pt"})
    for k, v in ts.items():
        w.add(k, v)
    w.close()
    back = load_file(str(tmp_path / "f.safetensors"))
    assert set(back) == set(ts) and all(torch.equal(back[k], v) for k, v in ts.items())
    assert os.listdir(tmp_path) == ["f.safetensors"]
    w = SafetensorsStreamWriter(tmp_path / "g.safetensors")
    w.add("a", torch.ones(2))
    w.abort()
    assert os.listdir(tmp_path) == ["f.safetensors"]


def test_streamed_merge_and_late_error(llama, tmp_path):
    base, dirs = llama["base"], llama["dirs"]
    out, merged = tmp_path / "out", tmp_path / "merged"
    agg = aggregate_adapters(dirs, out, rank=3, residual="merge", base_model=base, merged_out=merged,
                             keep_residuals=False)
    assert agg.residuals == {}
    ids = input_ids()
    assert rel_err(_peft_logits(merged, out, ids), logits(reference_model(base, dirs), ids)) <= TOL
    bad, _ = _nan_late(_copy_clients(llama, tmp_path / "bad"), llama)
    with pytest.raises(ValueError, match=r"c2.*NaN"):
        aggregate_adapters(bad, tmp_path / "o2", residual="merge", base_model=base, merged_out=tmp_path / "m2",
                           keep_residuals=False)
    with pytest.raises(ValueError, match=r"c2.*NaN"):
        aggregate_adapters(bad, tmp_path / "o3", keep_residuals=False)
    assert sorted(os.listdir(tmp_path)) == ["bad", "merged", "out"]


def test_in_memory_state_dicts_match_folders(llama, tmp_path):
    """fedmomentum.aggregate on get_peft_model_state_dict / live state_dict() == aggregate_adapters."""
    from peft import get_peft_model_state_dict
    dirs = llama["dirs"]
    ref = aggregate_adapters(dirs, tmp_path / "o", [1, 2, 3], rank=3, solver="exact")
    pms = [PeftModel.from_pretrained(load_base(llama["base"]), str(d)) for d in dirs]
    cfgs = [pm.peft_config["default"] for pm in pms]
    saved = fm.aggregate([get_peft_model_state_dict(pm) for pm in pms], [1, 2, 3], configs=cfgs, rank=3,
                         solver="exact")
    live = fm.aggregate([pm.state_dict() for pm in pms], [1, 2, 3], configs=cfgs, rank=3, solver="exact")
    for agg in (saved, live):
        assert set(agg.state_dict) == set(ref.state_dict)
        for k, v in ref.state_dict.items():
            torch.testing.assert_close(agg.state_dict[k], v, rtol=1e-5, atol=1e-7)
    assert any(k.endswith("base_layer.weight") for k in live.skipped_keys)
    assert "base_model.model.model.norm.weight" in live.skipped_keys
