"""Issue 17's baselines through the model-level entry points: state dicts (``fedmomentum.aggregate``)
with method options, per-client adapters (flexlora/hetlora) and a per-module reference (fedrot_lora)."""
from __future__ import annotations

import pytest
import torch

import fedmomentum as fm

MODS = {"base_model.model.layers.0.q_proj": (24, 16), "base_model.model.layers.0.down_proj": (16, 40)}


def state_dicts(ranks, *, shared_A=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sds = [{} for _ in ranks]
    A0 = {name: torch.randn(max(ranks), n, generator=g) for name, (m, n) in MODS.items()}
    for sd, r in zip(sds, ranks):
        for name, (m, n) in MODS.items():
            sd[f"{name}.lora_B.weight"] = torch.randn(m, r, generator=g)
            sd[f"{name}.lora_A.weight"] = A0[name][:r].clone() if shared_A else torch.randn(r, n, generator=g)
    return sds


def test_flexlora_state_dicts_give_one_adapter_per_client():
    ranks = [2, 4, 3]
    sds = state_dicts(ranks)
    agg = fm.aggregate(sds, [1, 2, 3], method="flexlora", solver="exact")
    assert len(agg.per_client) == 3
    for k, rk in enumerate(ranks):
        for name in MODS:
            b, a = agg.per_client[k][f"{name}.lora_B.weight"], agg.per_client[k][f"{name}.lora_A.weight"]
            assert b.shape[1] == rk and a.shape[0] == rk
            one = fm.aggregate_lora([sd[f"{name}.lora_B.weight"] for sd in sds],
                                    [sd[f"{name}.lora_A.weight"] for sd in sds], [1, 2, 3],
                                    method="flexlora", solver="exact")
            assert torch.allclose(b @ a, one.info["per_client"][k][0] @ one.info["per_client"][k][1], atol=1e-5)
    for rep in agg.report:
        assert "per_client" not in rep.info and rep.info["client_ranks"] == ranks  # report stays JSON-able
    assert agg.state_dict[f"{next(iter(MODS))}.lora_A.weight"].shape[0] == 4


def test_hetlora_and_client_ranks_option_through_state_dicts():
    agg = fm.aggregate(state_dicts([2, 4, 3]), method="hetlora", method_options={"client_ranks": [1, 1, 4]})
    assert [d[f"{next(iter(MODS))}.lora_A.weight"].shape[0] for d in agg.per_client] == [1, 1, 4]
    assert fm.aggregate(state_dicts([2, 2]), method="fedit").per_client == []


def test_rolora_and_fedsvd_through_state_dicts():
    sds = state_dicts([3, 3, 3], shared_A=True)
    agg = fm.aggregate(sds, [1, 1, 2], method="rolora", method_options={"round": 1})
    name = next(iter(MODS))
    assert torch.equal(agg.state_dict[f"{name}.lora_A.weight"], sds[0][f"{name}.lora_A.weight"])
    with pytest.raises(ValueError, match="needs the option 'round'"):
        fm.aggregate(sds, method="rolora")
    agg = fm.aggregate(sds, method="fedsvd")
    a = agg.state_dict[f"{name}.lora_A.weight"]
    assert torch.allclose(a @ a.T, torch.eye(3), atol=1e-5)


def test_fedrot_lora_reference_per_module_name():
    sds = state_dicts([3, 3])
    prev = state_dicts([3], seed=5)[0]
    ref = {name: (prev[f"{name}.lora_B.weight"], prev[f"{name}.lora_A.weight"]) for name in MODS}
    agg = fm.aggregate(sds, method="fedrot_lora", method_options={"round": 1, "reference": ref})
    for name in MODS:
        one = fm.aggregate_lora([sd[f"{name}.lora_B.weight"] for sd in sds], [sd[f"{name}.lora_A.weight"] for sd in sds],
                                method="fedrot_lora", method_options={"round": 1, "reference": ref[name]})
        assert torch.allclose(agg.state_dict[f"{name}.lora_B.weight"], one.B, atol=1e-6)
    with pytest.raises(ValueError, match="no entry for layer"):
        fm.aggregate(sds, method="fedrot_lora", method_options={"round": 1, "reference": {"x": ref[name]}})


# ---- adapter folders and the CLI --------------------------------------------------------------

def test_cli_method_options_and_reference_folder(tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from fedmomentum.cli import main
    from fedmomentum.cli.aggregate import reference_adapter
    from safety_helpers import PREFIX, make_adapter

    dirs = [make_adapter(tmp_path / f"c{k}", seed=k) for k in range(3)]
    prev = make_adapter(tmp_path / "prev", seed=9)
    out = tmp_path / "out"
    rc = main(["aggregate", *map(str, dirs), "--out", str(out), "--method", "fedrot_lora", "--round", "1",
               "--lam", "0.7", "--reference", str(prev), "--no-progress"])
    assert rc == 0
    got = load_file(str(out / "adapter_model.safetensors"))
    ref = reference_adapter(prev)
    name = f"{PREFIX}model.layers.0.self_attn.q_proj"
    sds = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    one = fm.aggregate_lora([sd[f"{name}.lora_B.weight"] for sd in sds], [sd[f"{name}.lora_A.weight"] for sd in sds],
                            method="fedrot_lora", method_options={"round": 1, "reference": ref[name], "lam": 0.7})
    assert torch.allclose(got[f"{name}.lora_B.weight"], one.B, atol=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    capsys.readouterr()
    rc = main(["aggregate", *map(str, dirs), "--out", str(tmp_path / "o2"), "--method", "rolora", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "needs the option 'round'" in err and not (tmp_path / "o2").exists()
    rc = main(["aggregate", *map(str, dirs), "--out", str(tmp_path / "o3"), "--method", "flexlora", "--round", "2",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "'flexlora' does not accept the option(s) ['round']" in err


def test_adapter_folders_one_output_per_distinct_client_rank(tmp_path):
    import json

    from safetensors.torch import load_file

    from fedmomentum.peft import aggregate_adapters
    from safety_helpers import PREFIX, make_adapter

    dirs = [make_adapter(tmp_path / "c0", seed=0, r=2, alpha=4), make_adapter(tmp_path / "c1", seed=1, r=4, alpha=8),
            make_adapter(tmp_path / "c2", seed=2, r=4, alpha=8)]
    out = tmp_path / "out"
    agg = aggregate_adapters(dirs, out, [1, 2, 3], method="flexlora", solver="exact")
    rep = json.loads((out / "fedmomentum_report.json").read_text())
    assert rep["per_client_dirs"] == {"rank_2": [0], "rank_4": [1, 2]}
    name = f"{PREFIX}model.layers.0.mlp.down_proj"
    sds = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    one = fm.aggregate_lora([sd[f"{name}.lora_B.weight"] for sd in sds], [sd[f"{name}.lora_A.weight"] for sd in sds],
                            [1, 2, 3], scalings=2.0, method="flexlora", solver="exact")
    for folder, k in (("rank_2", 0), ("rank_4", 1)):
        cfg = json.loads((out / folder / "adapter_config.json").read_text())
        sd = load_file(str(out / folder / "adapter_model.safetensors"))
        rk = 2 if k == 0 else 4
        assert cfg["r"] == rk and cfg["lora_alpha"] == 2 * rk and cfg["fedmomentum_clients"] == rep["per_client_dirs"][folder]
        b, a = sd[f"{name}.lora_B.weight"], sd[f"{name}.lora_A.weight"]
        bk, ak = one.info["per_client"][k]
        assert b.shape[1] == rk and torch.allclose(b @ a, bk @ ak, atol=1e-5)
    assert len(agg.per_client) == 3
    # an overwrite of this output is allowed: the per-client folders are fedmomentum's own files
    aggregate_adapters(dirs, out, [1, 2, 3], method="hetlora", overwrite=True)
    assert json.loads((out / "fedmomentum_report.json").read_text())["method"] == "hetlora"
