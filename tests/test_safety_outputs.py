"""Issue 15, "never lose a user's data": what ``fedmomentum aggregate`` may replace, and how.

Each test pins one defect of the old write path (which replaced whatever folder --out/--merged-out
named, installed the merged base before the adapter, had no lock, left stale temporaries, made
0700 folders, raised tracebacks for OS errors, and said nothing about duplicated clients).
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmomentum import safe_io
from fedmomentum.cli import main as cli_main
from safety_helpers import listing, make_adapter, max_rel_err, output_delta, reference_delta

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sb(tmp_path):
    """A sandbox: sb/clients/c0..c2 (synthetic adapters) plus an unrelated file next to them."""
    clients = tmp_path / "clients"
    dirs = [make_adapter(clients / f"c{k}", seed=k) for k in range(3)]
    (clients / "notes.txt").write_text("my notes")
    return tmp_path, dirs


def _agg(dirs, out, *extra):
    return cli_main(["aggregate", *map(str, dirs), "--out", str(out), "--no-progress", *extra])


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("fedmomentum "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- defect 1: what --out may replace

@pytest.mark.parametrize("where", ["clients", "clients/c1", "clients/c0/sub", "."])
def test_out_overlapping_inputs_is_refused_before_any_work(sb, capsys, monkeypatch, where):
    root, dirs = sb
    before = {p: (root / p).read_bytes() for p in listing(root) if (root / p).is_file()}
    monkeypatch.chdir(root)
    rc = _agg(dirs, where, "--overwrite")
    assert rc != 0
    _one_error_line(capsys, "--out")
    assert {p: (root / p).read_bytes() for p in listing(root) if (root / p).is_file()} == before


def test_out_through_a_symlink_into_an_input_is_refused(sb, capsys):
    root, dirs = sb
    (root / "link").symlink_to(dirs[0], target_is_directory=True)
    assert _agg(dirs, root / "link" / "new") != 0
    _one_error_line(capsys, "lies inside the client")
    assert _agg(dirs, root / "link") != 0  # --out itself a symlink
    _one_error_line(capsys, "symbolic link")
    assert _agg([root / "link", dirs[1]], dirs[0] / "x") != 0  # client given through the link
    _one_error_line(capsys, "lies inside the client")
    assert not (dirs[0] / "x").exists() and not (dirs[0] / "new").exists()


def test_foreign_folder_is_never_replaced(sb, capsys):
    root, dirs = sb
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        assert _agg(dirs, mine, *extra) != 0
        _one_error_line(capsys, "not a fedmomentum output")
        assert os.listdir(mine) == ["thesis.tex"]


def test_empty_folder_is_used_and_own_output_needs_overwrite(sb, capsys):
    root, dirs = sb
    out = root / "out"
    out.mkdir()
    assert _agg(dirs, out) == 0
    m1 = safe_io.read_marker(out)
    assert m1 and m1["role"] == "adapter" and len(m1["round_id"]) == 32
    assert _agg(dirs, out, "--weights", "1,2,3") != 0  # our own earlier output: only with --overwrite
    _one_error_line(capsys, "--overwrite")
    assert safe_io.read_marker(out)["round_id"] == m1["round_id"]
    assert _agg(dirs, out, "--weights", "1,2,3", "--overwrite") == 0
    assert safe_io.read_marker(out)["round_id"] != m1["round_id"]
    assert max_rel_err(output_delta(out), reference_delta(dirs, [1, 2, 3])) < 1e-5
    assert sorted(os.listdir(root)) == ["clients", "out"]


def test_overwrite_replaces_only_what_fedmomentum_wrote(sb, capsys):
    root, dirs = sb
    out = root / "out"
    assert _agg(dirs, out) == 0
    (out / "my_eval_notes.md").write_text("results of round 1")  # added by the user afterwards
    assert _agg(dirs, out, "--overwrite") != 0
    _one_error_line(capsys, "files fedmomentum did not write", "my_eval_notes.md")
    assert (out / "my_eval_notes.md").read_text() == "results of round 1"


def test_read_only_own_output_is_not_replaced(sb, capsys):
    root, dirs = sb
    out = root / "out"
    assert _agg(dirs, out) == 0
    rid = safe_io.read_marker(out)["round_id"]
    out.chmod(0o555)
    try:
        assert _agg(dirs, out, "--overwrite") != 0
        _one_error_line(capsys, "read-only")
        assert safe_io.read_marker(out)["round_id"] == rid
    finally:
        out.chmod(0o755)


def test_file_as_out_is_refused_before_reading_the_inputs(sb, capsys):
    root, dirs = sb
    f = root / "out.bin"
    f.write_bytes(b"data")
    (dirs[2] / "adapter_config.json").write_text("{broken")  # the output check comes first
    assert _agg(dirs, f) != 0
    _one_error_line(capsys, "not a folder", "out.bin")
    assert f.read_bytes() == b"data"


# ----------------------------------------------------------------------------- defect 3: merge = one transaction

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft_helpers import build_clients, build_llama_base

    root = tmp_path_factory.mktemp("safety_llama")
    base = build_llama_base(root / "base")
    dirs = build_clients(base, root / "clients", [dict(r=4, lora_alpha=8)] * 2, seed=5)
    return base, dirs


def _merge(llama, out, merged, *extra):
    base, dirs = llama
    return cli_main(["aggregate", *map(str, dirs), "--out", str(out), "--residual", "merge", "--base-model",
                     str(base), "--merged-out", str(merged), "--no-progress", *extra])


def test_merge_base_inside_or_equal_to_output_is_refused(llama, tmp_path, capsys):
    base, dirs = llama
    assert _merge(llama, tmp_path / "out", base) != 0
    _one_error_line(capsys, "--merged-out", "base model")
    assert _merge(llama, base / "adapter", tmp_path / "m") != 0
    _one_error_line(capsys, "--out", "base model")
    assert _merge(llama, tmp_path / "x", tmp_path / "x" / "m") != 0
    _one_error_line(capsys, "overlaps")
    assert sorted(os.listdir(tmp_path)) == []


def test_merge_with_a_file_as_out_creates_no_merged_base(llama, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    assert _merge(llama, tmp_path / "out", tmp_path / "merged") != 0
    _one_error_line(capsys, "not a folder")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_adapter_install_rolls_the_merged_base_back(llama, tmp_path, capsys, monkeypatch):
    out, merged = tmp_path / "out", tmp_path / "merged"
    # first round, no earlier outputs: a failure leaves nothing
    real = safe_io.install_dir
    calls = []

    def flaky(tmp, target):
        calls.append(Path(target).name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(target))
        return real(tmp, target)

    monkeypatch.setattr(safe_io, "install_dir", flaky)
    assert _merge(llama, out, merged) != 0
    _one_error_line(capsys, "no space left", "out")
    assert calls == ["merged", "out"] and sorted(os.listdir(tmp_path)) == []
    # with an earlier round: both stay the earlier round's
    monkeypatch.setattr(safe_io, "install_dir", real)
    assert _merge(llama, out, merged) == 0
    capsys.readouterr()
    r1 = safe_io.read_marker(out)["round_id"]
    assert safe_io.read_marker(merged)["round_id"] == r1
    calls.clear()
    monkeypatch.setattr(safe_io, "install_dir", flaky)
    assert _merge(llama, out, merged, "--overwrite", "--weights", "1,3") != 0
    _one_error_line(capsys, "no space left")
    assert safe_io.read_marker(out)["round_id"] == r1 == safe_io.read_marker(merged)["round_id"]
    assert sorted(os.listdir(tmp_path)) == ["merged", "out"]
    assert cli_main(["verify", str(out)]) == 0


def test_mismatched_pair_is_detected_and_repaired(llama, tmp_path, capsys, caplog):
    base, dirs = llama
    out, merged = tmp_path / "out", tmp_path / "merged"
    assert _merge(llama, out, merged) == 0
    shutil.copytree(out, tmp_path / "saved")
    assert _merge(llama, out, merged, "--overwrite", "--weights", "1,3") == 0
    assert cli_main(["verify", str(out)]) == 0
    assert "ok:" in capsys.readouterr().out
    shutil.rmtree(out)
    shutil.move(str(tmp_path / "saved"), out)  # what a kill between the two installs leaves
    assert cli_main(["verify", str(out)]) != 0
    _one_error_line(capsys, "mismatched pair", "--overwrite")
    assert cli_main(["verify", str(out), "--merged-out", str(merged)]) != 0
    _one_error_line(capsys, "mismatched pair")
    # the next round must not build on a base whose adapter is from another round
    assert cli_main(["aggregate", *map(str, dirs), "--out", str(tmp_path / "o2"), "--residual", "merge",
                     "--base-model", str(merged), "--merged-out", str(tmp_path / "m2"), "--no-progress"]) != 0
    _one_error_line(capsys, "mismatched pair")
    # rerunning the round repairs the pair (and says what it replaces)
    with caplog.at_level(logging.WARNING, logger="fedmomentum"):
        assert _merge(llama, out, merged, "--overwrite") == 0
    assert "replaces both" in caplog.text
    assert cli_main(["verify", str(out)]) == 0
    # a merged base whose adapter is gone (moved, or a kill before the adapter's first install):
    # verify says so; a next round on it only warns (the pair may simply have been moved)
    shutil.rmtree(out)
    capsys.readouterr()
    assert cli_main(["verify", str(out), "--merged-out", str(merged)]) != 0
    _one_error_line(capsys, "does not exist")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmomentum"):
        assert cli_main(["aggregate", *map(str, dirs), "--out", str(tmp_path / "o3"), "--residual", "merge",
                         "--base-model", str(merged), "--merged-out", str(tmp_path / "m3"), "--no-progress"]) == 0
    assert "is missing" in caplog.text


# ----------------------------------------------------------------------------- defect 6: concurrency, leftovers, modes

def test_second_run_on_a_locked_target_fails_clearly(sb, capsys):
    root, dirs = sb
    out = root / "out"
    with safe_io.TargetLock(out):
        assert _agg(dirs, out) != 0
        _one_error_line(capsys, "being written by another fedmomentum run", f"pid {os.getpid()}")
    assert not out.exists()
    assert _agg(dirs, out) == 0
    assert sorted(os.listdir(root)) == ["clients", "out"]  # the lock file is gone too


def test_two_concurrent_processes_never_both_write(sb, capsys):
    root, dirs = sb
    out = root / "out"
    env = dict(os.environ, FEDMOMENTUM_TEST_PAUSE_AT="filled")
    p = subprocess.Popen([sys.executable, "-m", "fedmomentum", "aggregate", *map(str, dirs), "--out", str(out),
                          "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        line = ""
        while "paused at filled" not in line:
            line = p.stderr.readline()
            assert line or p.poll() is None, "first run ended without pausing"
            assert time.time() - t0 < 120
        assert _agg(dirs, out) != 0  # the first run holds the target, has written its temporary folder
        _one_error_line(capsys, "being written by another fedmomentum run", f"pid {p.pid}")
    finally:
        p.kill()
        p.wait()
    assert not out.exists()
    assert _agg(dirs, out) == 0  # the killed run's lock died with it; its temporary folder is removed
    assert sorted(os.listdir(root)) == ["clients", "out"]


def test_stale_temporaries_are_removed_by_the_next_run(sb, capsys, caplog):
    root, dirs = sb
    for name in (".out.tmp-k1ll3d", ".out.old-abc123", ".out.tmp-x9"):
        (root / name).mkdir()
        (root / name / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    (root / ".other.tmp-abc").mkdir()  # not ours: another target's name
    with caplog.at_level(logging.WARNING, logger="fedmomentum"):
        assert _agg(dirs, root / "out") == 0
    assert "interrupted run" in caplog.text
    assert sorted(os.listdir(root)) == [".other.tmp-abc", "clients", "out"]


def test_output_folder_mode_follows_the_umask(sb):
    root, dirs = sb
    old = os.umask(0o022)
    try:
        assert _agg(dirs, root / "out") == 0
        assert stat.S_IMODE(os.stat(root / "out").st_mode) == 0o755
        os.umask(0o002)
        assert _agg(dirs, root / "out2") == 0
        assert stat.S_IMODE(os.stat(root / "out2").st_mode) == 0o775
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- defect 7: messages and warnings

def test_read_only_parent_is_one_line(sb, capsys):
    root, dirs = sb
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _agg(dirs, ro / "out") != 0
        _one_error_line(capsys, "ro", "read-only")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_os_errors_while_writing_are_one_line_and_leave_nothing(sb, capsys, monkeypatch):
    root, dirs = sb

    def full(folder, *a, **k):
        raise OSError(28, "No space left on device", str(Path(folder) / "adapter_model.safetensors"))

    monkeypatch.setattr(safe_io, "write_marker", full)
    assert _agg(dirs, root / "out") != 0
    _one_error_line(capsys, "no space left on device", "adapter_model.safetensors")

    def denied(folder, *a, **k):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(safe_io, "write_marker", denied)
    assert _agg(dirs, root / "out") != 0
    _one_error_line(capsys, "Permission denied")
    assert sorted(os.listdir(root)) == ["clients"]


def test_duplicate_clients_and_different_bases_warn(sb, caplog, monkeypatch):
    root, dirs = sb
    monkeypatch.chdir(root / "clients")
    (root / "clients" / "x").mkdir()
    with caplog.at_level(logging.WARNING, logger="fedmomentum"):
        assert _agg(["./c0", "x/../c0", "c1"], root / "o1") == 0
    assert "same folder" in caplog.text and "counted twice" in caplog.text
    caplog.clear()
    shutil.copytree(dirs[0], root / "copy")
    with caplog.at_level(logging.WARNING, logger="fedmomentum"):
        assert _agg([dirs[0], root / "copy", dirs[1]], root / "o2") == 0
    assert "same tensors" in caplog.text
    caplog.clear()
    make_adapter(root / "other", seed=9, base="another/base-model")
    with caplog.at_level(logging.WARNING, logger="fedmomentum"):
        assert _agg([dirs[0], root / "other"], root / "o3") == 0
    assert "different base models" in caplog.text and "another/base-model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmomentum"):
        assert _agg(dirs, root / "o4") == 0
    assert "warning" not in caplog.text.lower()


def test_warnings_reach_stderr_of_the_cli(sb):
    root, dirs = sb
    p = subprocess.run([sys.executable, "-m", "fedmomentum", "aggregate", str(dirs[0]), str(dirs[0]),
                        "--out", str(root / "o"), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "counted twice" in p.stderr and "Traceback" not in p.stderr


def test_verify_reports_missing_damaged_and_foreign(sb, capsys):
    root, dirs = sb
    out = root / "out"
    assert cli_main(["verify", str(out)]) != 0
    _one_error_line(capsys, "does not exist")
    assert cli_main(["verify", str(dirs[0])]) != 0
    _one_error_line(capsys, "not a fedmomentum output")
    assert _agg(dirs, out) == 0
    capsys.readouterr()
    assert cli_main(["verify", str(out)]) == 0
    f = out / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    assert cli_main(["verify", str(out)]) != 0
    _one_error_line(capsys, "damaged", "adapter_model.safetensors")
