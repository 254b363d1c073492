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


class _Net(torch.nn.Module):
    """One Linear and one GPT-2 Conv1D (weight stored in x out, LoRA with fan_in_fan_out)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        g = torch.Generator().manual_seed(3)
        self.lin = torch.nn.Linear(20, 12)
        self.conv = Conv1D(9, 12)                      # 12 -> 9, weight 12 x 9
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(12, 20, generator=g))
            self.conv.weight.copy_(torch.randn(12, 9, generator=g))

    def forward(self, x):
        return self.conv(torch.tanh(self.lin(x)))


def _peft_net(target, r, fifo, use_rslora=False):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=6, target_modules=[target], fan_in_fan_out=fifo, use_rslora=use_rslora)
    return peft.get_peft_model(_Net().double(), cfg)


@pytest.mark.parametrize("target, fifo, use_rslora", [("lin", False, False), ("conv", True, True)])
def test_initialise_method_ilora_on_a_peft_model(target, fifo, use_rslora):
    """ilora's init through a PeftModel: the output is unchanged, s·B·A is the projection of W0 onto
    its first r columns' span (the unique part of QR, fp64 restatement), B has orthonormal columns,
    and the layer's own (rsLoRA) scaling is used."""
    from fedmomentum.peft import initialise_method_

    r = 3
    model = _peft_net(target, r, fifo, use_rslora)
    layer = dict(model.named_modules())[f"base_model.model.{target}"]
    W0 = layer.get_base_layer().weight.detach().clone()
    W0 = W0.T if fifo else W0                          # out x in
    x = torch.randn(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = model(x).detach()
    done = initialise_method_(model, "ilora")
    assert done == [f"base_model.model.{target}"]
    s = float(layer.scaling["default"])
    assert s == pytest.approx(6 / r ** 0.5 if use_rslora else 6 / r)
    B = layer.lora_B["default"].weight.detach()
    A = layer.lora_A["default"].weight.detach()
    W = layer.get_base_layer().weight.detach()
    W = W.T if fifo else W
    Q = torch.linalg.qr(W0[:, :r]).Q
    assert torch.allclose(s * B @ A, Q @ Q.T @ W0, atol=1e-10)
    assert torch.allclose(W + s * B @ A, W0, atol=1e-10)
    assert torch.allclose(B.T @ B, torch.eye(r, dtype=B.dtype), atol=1e-10)
    assert torch.allclose(model(x), before, atol=1e-10)


def test_initialise_method_errors_leave_the_model_unchanged():
    from fedmomentum.peft import initialise_method_

    model = _peft_net("lin", 3, False)
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'fedmomentum' has no round-0 initialisation"):
        initialise_method_(model, "fedmomentum")
    with pytest.raises(ValueError, match="no LoRA layers for adapter 'other'"):
        initialise_method_(model, "ilora", adapter_name="other")
    with pytest.raises(ValueError, match="unknown method|not_a_method"):
        initialise_method_(model, "not_a_method")
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k
