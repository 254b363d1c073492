"""Issue 15 fuzz: 225 seeded cases of bad files, bad configs, bad tensors, bad flags and bad targets.

Each case calls ``fedmomentum.cli.main([...])`` in-process (200 CLI processes would take minutes)
and checks the contract of the command line:

* exit code != 0  ⇒  exactly one line on stderr, starting ``fedmomentum``, no traceback, and
  nothing written: the sandbox (clients, an unrelated folder, the --out target's parent) holds
  exactly what it held before (no --out, no temporary folder, no lock file);
* exit code == 0  ⇒  the exact result: Σ_k p_k s_k B_k A_k (float64, read back from the client
  files as they are after the mutation) == s·B·A + residual (read back from --out), the output
  carries its marker, and nothing else appeared.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
from pathlib import Path

import torch

from fedmomentum import safe_io
from fedmomentum.cli import main as cli_main
from safety_helpers import listing, make_adapter, max_rel_err, output_delta, reference_delta

N_CASES = 225
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}


# ----------------------------------------------------------------------------- case builders

def _header_len(f: Path) -> int:
    return struct.unpack("<Q", f.read_bytes()[:8])[0]


def _rewrite(f: Path, fn) -> None:
    from safetensors.torch import load_file, save_file
    save_file(fn(load_file(str(f))), str(f), metadata={"format": "pt"})


def _cfg(d: Path, fn) -> None:
    f = d / "adapter_config.json"
    cfg = json.loads(f.read_text())
    res = fn(cfg)
    f.write_text(res if isinstance(res, str) else json.dumps(cfg if res is None else res))


def _pick_key(rng, f: Path, part: str) -> str:
    from safetensors import safe_open
    with safe_open(str(f), "pt") as h:
        keys = sorted(k for k in h.keys() if f".{part}." in k)
    return rng.choice(keys)


def m_truncate(rng, dirs, flags):
    f = rng.choice(dirs) / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: rng.randrange(0, len(data))])


def m_garble_header(rng, dirs, flags):
    f = rng.choice(dirs) / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    end = 8 + _header_len(f)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(0, end)
        data[i] = rng.choice([rng.randrange(256), ord(rng.choice('{}[]",:0123456789abcFU '))])
    f.write_bytes(bytes(data))


def m_garble_data(rng, dirs, flags):
    """Flip low mantissa bits of some tensor bytes: still a valid file, other numbers (exact result)."""
    f = rng.choice(dirs) / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    start = 8 + _header_len(f)
    for _ in range(rng.randint(1, 20)):
        i = start + rng.randrange(0, (len(data) - start) // 4) * 4  # fp32: byte 0 = low mantissa
        data[i] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))


def m_nonfinite(rng, dirs, flags):
    f = rng.choice(dirs) / "adapter_model.safetensors"
    key = _pick_key(rng, f, rng.choice(["lora_A", "lora_B"]))
    val = rng.choice([float("nan"), float("inf"), float("-inf")])

    def fn(sd):
        t = sd[key].clone()
        t.view(-1)[rng.randrange(t.numel())] = val
        sd[key] = t
        return sd
    _rewrite(f, fn)


def m_bad_tensor(rng, dirs, flags):
    f = rng.choice(dirs) / "adapter_model.safetensors"
    kind = rng.choice(["shape_a", "shape_b", "int", "drop_b", "drop_a", "one_d", "zero_rank", "extra_module",
                       "transpose"])
    key = _pick_key(rng, f, "lora_A")
    bkey = key.replace("lora_A", "lora_B")

    def fn(sd):
        a, b = sd[key], sd[bkey]
        if kind == "shape_a":
            sd[key] = torch.randn(a.shape[0] + 1, a.shape[1])
        elif kind == "shape_b":
            sd[bkey] = torch.randn(b.shape[0], b.shape[1] + 1)
        elif kind == "int":
            sd[key] = (a * 100).to(torch.int32)
        elif kind == "drop_b":
            del sd[bkey]
        elif kind == "drop_a":
            del sd[key]
        elif kind == "one_d":
            sd[key] = a.reshape(-1)
        elif kind == "zero_rank":
            sd[key], sd[bkey] = a[:0].contiguous(), b[:, :0].contiguous()
        elif kind == "extra_module":
            sd["base_model.model.model.layers.9.self_attn.k_proj.lora_A.weight"] = torch.randn(2, 16)
            sd["base_model.model.model.layers.9.self_attn.k_proj.lora_B.weight"] = torch.randn(16, 2)
        elif kind == "transpose":
            sd[key], sd[bkey] = b.t().contiguous(), a.t().contiguous()
        return sd
    _rewrite(f, fn)


_CONFIG_MUTATIONS = [
    lambda c: c.pop("r"), lambda c: c.pop("lora_alpha"), lambda c: c.update(r="four"), lambda c: c.update(r=0),
    lambda c: c.update(r=-2), lambda c: c.update(r=4.5), lambda c: c.update(lora_alpha=None),
    lambda c: c.update(lora_alpha="x"), lambda c: c.update(lora_alpha=12.5), lambda c: c.update(use_rslora="yes"),
    lambda c: c.update(use_rslora=True), lambda c: c.update(peft_type="IA3"), lambda c: c.update(peft_type=None),
    lambda c: "{not json", lambda c: json.dumps(c)[:-5], lambda c: "[1, 2]", lambda c: "", lambda c: "null",
    lambda c: c.update(rank_pattern={"q_proj": 99}), lambda c: c.update(rank_pattern="q_proj"),
    lambda c: c.update(alpha_pattern={"down_proj": 3}), lambda c: c.update(alpha_pattern={"q_proj": "x"}),
    lambda c: c.update(target_modules=["nothing"]), lambda c: c.update(lora_alpha=float("nan")),
    lambda c: c.update(base_model_name_or_path=["a"]), lambda c: c.update(r=True),
    lambda c: c.update(lora_alpha=-8),
]


def m_config(rng, dirs, flags):
    _cfg(rng.choice(dirs), rng.choice(_CONFIG_MUTATIONS))


def m_remove(rng, dirs, flags):
    d = rng.choice(dirs)
    what = rng.choice(["adapter_model.safetensors", "adapter_config.json", "folder"])
    if what == "folder":
        shutil.rmtree(d)
    else:
        (d / what).unlink()


_BAD_FLAGS = [
    ["--weights", "0,0"], ["--weights", "-1,2"], ["--weights", "nan,1"], ["--weights", "inf,1"],
    ["--weights", "1"], ["--weights", ""], ["--weights", "a,b"], ["--weights", "1,2,3,4,5,6,7"],
    ["--rank", "0"], ["--rank", "-3"], ["--rank", "abc"], ["--rank", "1000"], ["--method", "bogus"],
    ["--solver", "bogus"], ["--residual", "bogus"], ["--bogus-flag"], ["--merged-out", "MERGED"],
    ["--base-model", "BASE"], ["--residual", "merge"], ["--residual", "merge", "--base-model", "BASE"],
    ["--weights", "1,,1"], ["--weights", "1e-300,1"], ["--weights", "0,1"], ["--rank", "1"],
    ["--method", "flora", "--residual", "discard"], ["--out"], ["--residual", "merge", "--base-model", "CLIENT0",
                                                                   "--merged-out", "MERGED"],
]


def m_flags(rng, dirs, flags):
    extra = list(rng.choice(_BAD_FLAGS))
    flags.extend(extra)


def m_target(rng, dirs, flags):
    """A bad --out (replaces the default one)."""
    root = dirs[0].parent.parent
    kind = rng.choice(["file", "client", "inside_client", "parent_of_clients", "foreign", "empty_string",
                       "symlink"])
    if kind == "file":
        (root / "target.bin").write_bytes(b"x")
        flags.append(str(root / "target.bin"))
    elif kind == "client":
        flags.append(str(dirs[-1]))
    elif kind == "inside_client":
        flags.append(str(dirs[0] / "sub"))
    elif kind == "parent_of_clients":
        flags.append(str(dirs[0].parent))
    elif kind == "foreign":
        (root / "foreign").mkdir()
        (root / "foreign" / "keep.txt").write_text("keep")
        flags.append(str(root / "foreign"))
    elif kind == "empty_string":
        flags.append("")
    elif kind == "symlink":
        (root / "lnk").symlink_to(dirs[0], target_is_directory=True)
        flags.append(str(root / "lnk" / "o"))
    return "target"


def m_duplicate(rng, dirs, flags):
    dirs.append(dirs[0])


def m_none(rng, dirs, flags):
    pass


MUTATIONS = ([m_none] * 30 + [m_truncate] * 25 + [m_garble_header] * 20 + [m_garble_data] * 20
             + [m_nonfinite] * 20 + [m_bad_tensor] * 25 + [m_config] * 35 + [m_remove] * 10 + [m_flags] * 27
             + [m_target] * 8 + [m_duplicate] * 5)


def _weights(text):
    return [float(x) for x in text.split(",") if x.strip()]


def _case(i: int, root: Path):
    rng = random.Random(1000 + i)
    mut = MUTATIONS[i % len(MUTATIONS)]
    K = rng.choice([1, 2, 2, 3, 4])
    dtype = rng.choice([torch.float32] * 4 + [torch.float16, torch.bfloat16])
    if mut is m_garble_data:
        dtype = torch.float32
    ranks = [rng.choice([1, 2, 4]) for _ in range(K)]
    dirs = [make_adapter(root / "clients" / f"c{k}", seed=100 * i + k, r=ranks[k], alpha=rng.choice([4, 8, 16]),
                         use_rslora=rng.random() < 0.2, dtype=dtype) for k in range(K)]
    (root / "unrelated").mkdir()
    (root / "unrelated" / "data.txt").write_text("do not touch")
    flags: list[str] = []
    if rng.random() < 0.5:
        flags += ["--weights", ",".join(str(rng.randint(1, 5)) for _ in range(K))]
    if rng.random() < 0.3:
        flags += ["--rank", str(rng.choice([1, 2, 3]))]
    if rng.random() < 0.3:
        flags += ["--solver", rng.choice(["exact", "dense"])]
    dirs = list(dirs)
    target_flags: list[str] = []
    kind = mut(rng, dirs, target_flags if mut is m_target else flags)
    out = root / "out"
    if kind == "target":
        out_arg = target_flags[0]
    else:
        out_arg = str(out)
    subs = {"MERGED": str(root / "merged"), "BASE": str(root / "base"), "CLIENT0": str(dirs[0])}
    flags = [subs.get(f, f) for f in flags]
    argv = ["aggregate", *map(str, dirs), "--out", out_arg, "--no-progress", *flags]
    return argv, dirs, out_arg, flags, dtype, mut.__name__


def test_fuzz_one_line_errors_or_exact_results(tmp_path, capsys):
    counts = {"ok": 0, "error": 0}
    for i in range(N_CASES):
        root = tmp_path / f"case{i}"
        root.mkdir()
        argv, dirs, out_arg, flags, dtype, name = _case(i, root)
        before = listing(root)
        contents = {p: (root / p).read_bytes() for p in before if (root / p).is_file() and not (root / p).is_symlink()}
        capsys.readouterr()
        rc = cli_main(argv)
        cap = capsys.readouterr()
        where = f"case {i} ({name}): fedmomentum {' '.join(argv)}"
        assert "Traceback" not in cap.err and "Traceback" not in cap.out, f"{where}\n{cap.err}"
        if rc != 0:
            counts["error"] += 1
            lines = [ln for ln in cap.err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("fedmomentum"), f"{where}\n{cap.err}"
            assert listing(root) == before, f"{where}: wrote {sorted(set(listing(root)) - set(before))}"
            assert {p: (root / p).read_bytes() for p in contents} == contents, where
            continue
        counts["ok"] += 1
        out = Path(out_arg)
        assert out.is_dir() and safe_io.read_marker(out), where
        new = sorted(set(listing(root)) - set(before))
        assert all(p == "out" or p.startswith("out" + os.sep) for p in new), f"{where}: {new}"
        w = None
        if "--weights" in flags:
            w = _weights(flags[len(flags) - 1 - flags[::-1].index("--weights") + 1])  # argparse: the last wins
        ref = reference_delta(dirs, w)
        err = max_rel_err(output_delta(out), ref)
        assert err <= TOL[dtype], f"{where}: relative error {err:.2e}"
        assert not any(math.isnan(float(v.norm())) for v in ref.values()), where
    assert counts["ok"] >= 40 and counts["error"] >= 120, counts
