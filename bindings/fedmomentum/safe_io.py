"""Safe output folders: the rules that keep a command from losing a user's data.

Every folder a fedmomentum command writes (the aggregated adapter, the merged base model) goes
through an :class:`OutputTransaction`:

* **Up-front checks** (:func:`check_output_target`), before any input is read: the target is not
  a file, not a symbolic link, not the current folder (or one of its parents), not ``/``, does not
  overlap (is, contains or lies inside) any input folder, the base model or another output of the
  same run (paths resolved, symlinks followed), its parent is a writable folder, and an existing
  non-empty target is replaced only when it is **our own earlier output** (it holds
  :data:`MARKER_FILE`, or a legacy ``fedmomentum_report.json``) **and** ``overwrite=True``.
  A foreign non-empty folder is never replaced; an empty folder is used.
* **A lock per target** (``fcntl.flock`` on ``.<name>.lock`` next to it): a second concurrent run on
  the same target fails at once with a message naming the other run's pid (or waits up to
  ``lock_wait`` seconds). The lock file is removed when the run ends.
* **Stale temporaries** of a killed run (``.<name>.tmp-*``, ``.<name>.old-*``) are removed by the
  next run on the same target (under its lock); a target that a kill left missing between the two
  renames of the fallback install is restored from its ``.old-*`` copy first.
* **Temporary sibling + rename**: outputs are written into ``.<name>.tmp-<hex>`` (mode from the
  umask, like ``mkdir``) and installed with an atomic exchange (``renameat2(RENAME_EXCHANGE)`` on
  Linux; elsewhere two renames, old copy kept as ``.<name>.old-<hex>`` until the new one is in).
* **One transaction for several folders**: every folder of one run carries :data:`MARKER_FILE`
  with the same ``round_id`` (and its partner's path). :meth:`OutputTransaction.commit` installs
  them one by one and, when a later install fails, puts the earlier ones back (both old). A kill
  between two installs cannot be undone by anyone, so it is *detected*: :func:`verify_outputs`
  (the ``fedmomentum verify`` command), and every later run that reads or replaces the pair, see
  the two round ids differ and say how to recover (rerun the round with ``--overwrite``).

Marker file (``fedmomentum_output.json``), one JSON object::

    {"format": "fedmomentum-output/1", "round_id": "<32 hex>", "role": "adapter" | "merged_base",
     "partner": {"role": ..., "path": "<absolute path>"} | null, "created": "<UTC ISO time>",
     "pid": 123, "version": "0.1.0", "files": {"<name>": <size in bytes>, ...}}

``files`` lists every regular file of the folder (top level and below, relative paths) with its
size, so that :func:`verify_outputs` can tell a complete folder from a damaged one.

Test hook: ``FEDMOMENTUM_TEST_PAUSE_AT=<phase>`` makes :func:`pause_for_tests` print
``fedmomentum-test: paused at <phase>`` to stderr and sleep (the kill tests SIGKILL the process
there). It is read at each call; unset, it costs one ``os.environ`` lookup.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

__all__ = ["MARKER_FILE", "MARKER_FORMAT", "LEGACY_REPORT_FILE", "OutputError", "new_round_id",
           "read_marker", "is_own_output", "write_marker", "check_output_target", "check_input_folder",
           "make_tmp_dir", "install_dir", "remove_stale", "TargetLock", "OutputTransaction",
           "verify_outputs", "input_warnings", "pause_for_tests", "describe_os_error"]

MARKER_FILE = "fedmomentum_output.json"
MARKER_FORMAT = "fedmomentum-output/1"
LEGACY_REPORT_FILE = "fedmomentum_report.json"

PathLike = Union[str, os.PathLike]
log = logging.getLogger("fedmomentum")


class OutputError(ValueError):
    """An output folder cannot be written safely; the message is one line naming the path."""


# ----------------------------------------------------------------------------- small helpers

def pause_for_tests(phase: str) -> None:
    """Test hook: sleep at ``phase`` when ``FEDMOMENTUM_TEST_PAUSE_AT`` names it (see module doc)."""
    want = os.environ.get("FEDMOMENTUM_TEST_PAUSE_AT")
    if want and want == phase:
        print(f"fedmomentum-test: paused at {phase}", file=sys.stderr, flush=True)
        time.sleep(3600)


def new_round_id() -> str:
    return uuid.uuid4().hex


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: what failed and the path(s) it names."""
    what = e.strerror or str(e)
    paths = [p for p in (e.filename, getattr(e, "filename2", None)) if p]
    if e.errno == errno.ENOSPC:
        what = "no space left on device"
    return f"{what}: {' -> '.join(map(str, paths))}" if paths else what


def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _inside(a: Path, b: Path) -> bool:
    """a == b or a lies inside b (both resolved)."""
    return a == b or b in a.parents


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _writable_dir(d: Path) -> bool:
    """Writable folder: access() says so and, for root (which access() always lets through), some
    write bit is set (a folder made read-only with chmod 555 is respected even by root)."""
    if not os.access(d, os.W_OK | os.X_OK):
        return False
    if _is_root():
        return bool(os.stat(d).st_mode & 0o222)
    return True


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ----------------------------------------------------------------------------- markers

def read_marker(folder: PathLike) -> Optional[dict]:
    """The marker of an output folder, or None when it has none (or an unreadable one)."""
    f = Path(folder) / MARKER_FILE
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != MARKER_FORMAT or not isinstance(m.get("round_id"), str):
        return None
    return m


def _legacy_own(folder: Path) -> bool:
    """An adapter folder written by fedmomentum before markers existed (report JSON + config)."""
    try:
        rep = json.loads((folder / LEGACY_REPORT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rep, dict) and "method" in rep and "modules" in rep and (folder / "adapter_config.json").is_file()


def is_own_output(folder: PathLike) -> bool:
    """True when ``folder`` holds an earlier fedmomentum output (marker file, or a legacy report)."""
    d = Path(folder)
    return d.is_dir() and (read_marker(d) is not None or _legacy_own(d))


def _file_sizes(folder: Path) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if rel != MARKER_FILE and not p.is_symlink():
                out[rel] = p.stat().st_size
    return dict(sorted(out.items()))


_LEGACY_FILES = {"adapter_model.safetensors", "adapter_config.json", "residual.safetensors", LEGACY_REPORT_FILE}


def _foreign_files(folder: Path) -> list[str]:
    """Files in an earlier output folder that its writer did not record (added by someone else)."""
    m = read_marker(folder)
    known = set((m or {}).get("files") or {}) if m is not None else set(_LEGACY_FILES)
    known.add(MARKER_FILE)
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel not in known:
                found.append(rel)
    return sorted(found)


def write_marker(folder: PathLike, round_id: str, role: str, partner: Optional[Mapping[str, str]] = None,
                 extra: Optional[Mapping] = None) -> dict:
    """Write :data:`MARKER_FILE` into ``folder`` (call it last: it records the files' sizes)."""
    from . import __version__

    d = Path(folder)
    m = {"format": MARKER_FORMAT, "round_id": round_id, "role": role,
         "partner": dict(partner) if partner else None, "created": _utc_now(), "pid": os.getpid(),
         "version": __version__, "files": _file_sizes(d)}
    if extra:
        m.update(extra)
    (d / MARKER_FILE).write_text(json.dumps(m, indent=1))
    return m


# ----------------------------------------------------------------------------- checks

def check_input_folder(folder: PathLike, what: str) -> None:
    """Refuse an input folder (e.g. the base model of the next round) that is one half of a
    mismatched output pair: its recorded partner exists but is from another round (an interrupted
    run). A partner that is missing only gives a warning (the folders may have been moved)."""
    d = Path(folder)
    m = read_marker(d)
    if m is None or not m.get("partner"):
        return
    msg = _pair_problem(d, m)
    if not msg:
        return
    if not os.path.lexists((m.get("partner") or {}).get("path", "")):
        log.warning("fedmomentum: warning: %s %r: %s", what, str(d), msg)
        return
    raise OutputError(f"{what} {str(d)!r}: {msg}")


def check_output_target(target: PathLike, *, inputs: Iterable[tuple[str, PathLike]] = (),
                        others: Iterable[tuple[str, PathLike]] = (), overwrite: bool = False,
                        flag: str = "--out") -> Path:
    """Check that ``target`` may be (re)written; return its resolved path. Raises :class:`OutputError`.

    ``inputs``: (label, path) of every folder the run reads (clients, base model): the target may
    not be, contain or lie inside any of them. ``others``: other outputs of the same run (same rule).
    ``overwrite``: allow replacing an earlier fedmomentum output (never a foreign folder).
    """
    raw = os.fspath(target)
    if not str(raw).strip():
        raise OutputError(f"{flag} is empty")
    shown = str(raw)
    if os.path.islink(raw):
        raise OutputError(f"{flag} {shown!r} is a symbolic link; give the folder itself")
    real = _real(raw)
    if real.parent == real:
        raise OutputError(f"{flag} {shown!r} is the root folder")
    cwd = _real(os.getcwd())
    if _inside(cwd, real):
        raise OutputError(f"{flag} {shown!r} is the current folder or one of its parents; "
                          "give a new folder name, e.g. ./aggregated")
    for label, p in inputs:
        rp = _real(p)
        if _inside(real, rp) or _inside(rp, real):
            rel = "is" if real == rp else ("lies inside" if _inside(real, rp) else "contains")
            raise OutputError(f"{flag} {shown!r} {rel} the {label} {str(p)!r}; choose a folder outside "
                              "the inputs")
    for label, p in others:
        rp = _real(p)
        if _inside(real, rp) or _inside(rp, real):
            raise OutputError(f"{flag} {shown!r} overlaps {label} {str(p)!r}; they must be separate folders")
    if os.path.lexists(real):
        if not real.is_dir():
            raise OutputError(f"{flag} {shown!r} exists and is not a folder")
        try:
            entries = os.listdir(real)
        except OSError as e:
            raise OutputError(f"{flag} {shown!r} cannot be read ({describe_os_error(e)})") from None
        if entries:
            if not is_own_output(real):
                raise OutputError(f"{flag} {shown!r} exists, is not empty and is not a fedmomentum output; "
                                  "refusing to replace it (choose a new folder, or remove it yourself)")
            if not overwrite:
                m = read_marker(real) or {}
                when = f" written {m['created']}" if m.get("created") else ""
                raise OutputError(f"{flag} {shown!r} holds an earlier fedmomentum output{when}; pass "
                                  "--overwrite to replace it, or choose a new folder")
            if not _writable_dir(real):
                raise OutputError(f"{flag} {shown!r} is read-only; refusing to replace it")
            extra = _foreign_files(real)
            if extra:
                more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
                raise OutputError(f"{flag} {shown!r} holds an earlier fedmomentum output plus files fedmomentum did "
                                  f"not write ({', '.join(extra[:3])}{more}); move them out first, --overwrite "
                                  "replaces only what fedmomentum wrote")
    parent = real.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {shown!r}: {str(parent)!r} is not a folder")
    if not _writable_dir(parent):
        raise OutputError(f"{flag} {shown!r}: cannot write in {str(parent)!r} (read-only or no permission)")
    return real


# ----------------------------------------------------------------------------- install primitives

_STALE = r"^\.{name}\.(tmp|old)-[A-Za-z0-9_]+$"


def make_tmp_dir(target: PathLike, kind: str = "tmp") -> Path:
    """A new empty folder ``.<name>.<kind>-<hex>`` next to ``target`` (mode from the umask)."""
    t = Path(target)
    for _ in range(100):
        p = t.parent / f".{t.name}.{kind}-{uuid.uuid4().hex[:12]}"
        try:
            os.mkdir(p, 0o777)
            return p
        except FileExistsError:
            continue
    raise OutputError(f"cannot create a temporary folder next to {str(t)!r}")  # pragma: no cover


_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _renameat2
    if not sys.platform.startswith("linux") or os.environ.get("FEDMOMENTUM_NO_EXCHANGE"):
        return False
    if _renameat2 is None:
        import ctypes
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            f = libc.renameat2
            f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            f.restype = ctypes.c_int
            _renameat2 = f
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    import ctypes
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    r = _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def install_dir(tmp: PathLike, target: PathLike) -> Optional[Path]:
    """Put the finished folder ``tmp`` at ``target``. Returns the folder now holding the previous
    ``target`` (to delete once the run is committed, or to give to :func:`uninstall_dir`), or None
    when there was none. ``target`` is never missing and never partial, except between the two
    renames of the non-Linux fallback (the next run restores it from ``.<name>.old-*``)."""
    tmp, target = Path(tmp), Path(target)
    if os.path.lexists(target):
        if _exchange(tmp, target):
            return tmp
        old = make_tmp_dir(target, "old")
        os.rmdir(old)
        os.rename(target, old)
        try:
            pause_for_tests("between-renames")
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        return old
    os.rename(tmp, target)
    return None


def uninstall_dir(target: Path, held: Optional[Path], new_home: Path) -> None:
    """Undo :func:`install_dir`: the new folder goes back to ``new_home``, the old one (``held``)
    back to ``target`` (or ``target`` disappears when there was none)."""
    if held is None:
        os.rename(target, new_home)
        return
    if held == new_home and _exchange(held, target):
        return
    os.rename(target, new_home)
    os.rename(held, target)


def remove_stale(target: PathLike) -> list[str]:
    """Remove a killed run's ``.<name>.tmp-*`` / ``.<name>.old-*`` siblings of ``target`` (call it
    holding the target's lock). A target left missing by a kill between the two renames of the
    fallback install is first restored from its newest ``.old-*`` that holds an output of ours.
    Returns what it did."""
    t = Path(target)
    if not t.parent.is_dir():
        return []
    pat = re.compile(_STALE.format(name=re.escape(t.name)))
    stale = [t.parent / n for n in os.listdir(t.parent) if pat.match(n)]
    done = []
    olds = sorted((p for p in stale if ".old-" in p.name and is_own_output(p)), key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(t):
        os.rename(olds[-1], t)
        stale.remove(olds[-1])
        done.append(f"restored {str(t)!r} from {olds[-1].name} (left by an interrupted run)")
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass
        done.append(f"removed {p.name} (left by an interrupted run)")
    return done


# ----------------------------------------------------------------------------- locking

class TargetLock:
    """Exclusive lock for one output target: ``fcntl.flock`` on ``.<name>.lock`` in its parent.

    Fails with :class:`OutputError` naming the holder's pid when another run holds it (after
    waiting up to ``wait`` seconds). The lock file is removed on release (safely: a run that
    locked a file already unlinked retries on the new one). Where ``fcntl`` is missing the lock
    falls back to ``O_EXCL`` creation with a pid staleness check.
    """

    def __init__(self, target: PathLike, wait: float = 0.0, flag: str = "--out"):
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.wait = float(wait)
        self.flag = flag
        self._fd: Optional[int] = None

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f" (pid {pid})" if pid else ""

    def acquire(self) -> "TargetLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self._acquire_excl()
        deadline = time.monotonic() + self.wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if time.monotonic() >= deadline:
                    raise OutputError(f"{self.flag} {str(self.target)!r} is being written by another fedmomentum "
                                      f"run{self._holder()}; wait for it to finish or choose another folder") from None
                time.sleep(0.05)
                continue
            try:  # the file we locked must still be the one at self.path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._fd = fd
            return self

    def _acquire_excl(self) -> "TargetLock":  # pragma: no cover - not POSIX
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                os.write(fd, str(os.getpid()).encode())
                self._fd = fd
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                    os.kill(pid, 0)
                    alive = True
                except (ValueError, OSError):
                    alive = False
                if not alive:
                    try:
                        self.path.unlink()
                    except OSError:
                        pass
                    continue
                if time.monotonic() >= deadline:
                    raise OutputError(f"{self.flag} {str(self.target)!r} is being written by another fedmomentum "
                                      f"run{self._holder()}") from None
                time.sleep(0.05)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------- the transaction

class OutputTransaction:
    """Write one or more output folders as one transaction (see the module docstring).

    >>> with OutputTransaction({"adapter": out, "merged_base": merged}, inputs=[...]) as txn:
    ...     fill(txn.tmp("adapter")); fill(txn.tmp("merged_base"))
    ...     txn.commit()

    Construction runs every check, takes the locks (in path order), removes a killed run's stale
    temporaries and re-checks under the locks; nothing is written before. ``commit`` writes the
    markers (same ``round_id``, each naming its partner) and installs the folders in the order
    given in ``targets`` reversed (the merged base first, the adapter last, so that an adapter is
    never newer than its base); a failure puts every installed folder back. Leaving the ``with``
    block without ``commit`` (an error) removes the temporaries and creates nothing.
    """

    def __init__(self, targets: Mapping[str, PathLike], *, inputs: Sequence[tuple[str, PathLike]] = (),
                 overwrite: bool = False, lock_wait: Optional[float] = None,
                 flags: Optional[Mapping[str, str]] = None, round_id: Optional[str] = None):
        if lock_wait is None:
            try:
                lock_wait = float(os.environ.get("FEDMOMENTUM_LOCK_WAIT", "0") or 0)
            except ValueError:
                lock_wait = 0.0
        self.lock_wait = float(lock_wait)
        self.roles = list(targets)
        self.given = {r: Path(p) for r, p in targets.items()}
        default_flags = {"adapter": "--out", "merged_base": "--merged-out"}
        self.flags = {r: (flags or {}).get(r, default_flags.get(r, f"--{r.replace('_', '-')}")) for r in self.roles}
        self.inputs = list(inputs)
        self.overwrite = overwrite
        self.round_id = round_id or new_round_id()
        self.notes: list[str] = []
        self._tmps: dict[str, Path] = {}
        self._locks: list[TargetLock] = []
        self._created_parents: list[Path] = []
        self._committed = False
        self.paths = self._check()
        try:
            self._lock_and_clean()
            self.paths = self._check()  # again, under the locks
            self._check_pairs()
        except BaseException:
            self._release()
            raise
        pause_for_tests("locked")

    # -- checks
    def _check(self) -> dict[str, Path]:
        out = {}
        for r in self.roles:
            others = [(self.flags[o], self.given[o]) for o in self.roles if o != r]
            out[r] = check_output_target(self.given[r], inputs=self.inputs, others=others,
                                         overwrite=self.overwrite, flag=self.flags[r])
        return out

    def _lock_and_clean(self) -> None:
        for r in sorted(self.roles, key=lambda r: str(self.paths[r])):
            p = self.paths[r]
            self._make_parents(p.parent)
            lk = TargetLock(p, self.lock_wait, self.flags[r])
            lk.acquire()
            self._locks.append(lk)
            for note in remove_stale(p):
                self.notes.append(f"{self.flags[r]} {str(self.given[r])!r}: {note}")

    def _make_parents(self, d: Path) -> None:
        missing = []
        while not os.path.lexists(d):
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            os.mkdir(m, 0o777)
            self._created_parents.append(m)

    def _check_pairs(self) -> None:
        """An existing output that is half of a mismatched pair: say so (this run replaces it)."""
        for r in self.roles:
            p = self.paths[r]
            m = read_marker(p) if p.is_dir() else None
            if m and m.get("partner"):
                msg = _pair_problem(p, m)
                if msg:
                    partner = Path(m["partner"]["path"])
                    fixed = any(partner == self.paths[o] for o in self.roles if o != r)
                    self.notes.append(f"{self.flags[r]} {str(self.given[r])!r}: {msg.split(';')[0]}; "
                                      + ("this run replaces both" if fixed else
                                         f"this run replaces only this folder, {str(partner)!r} stays as it is"))

    # -- writing
    def tmp(self, role: str) -> Path:
        """The temporary folder where ``role``'s output is written (created on first call)."""
        if role not in self._tmps:
            self._tmps[role] = make_tmp_dir(self.paths[role])
        return self._tmps[role]

    def commit(self, extra: Optional[Mapping[str, Mapping]] = None) -> str:
        """Write the markers and install every folder (all or none); returns the round id."""
        partner_of = {}
        if len(self.roles) == 2:
            a, b = self.roles
            partner_of = {a: {"role": b, "path": str(self.paths[b])}, b: {"role": a, "path": str(self.paths[a])}}
        for r in self.roles:
            write_marker(self.tmp(r), self.round_id, r, partner_of.get(r), (extra or {}).get(r))
        pause_for_tests("filled")
        installed: list[tuple[str, Optional[Path]]] = []
        try:
            for r in reversed(self.roles):
                held = install_dir(self._tmps[r], self.paths[r])
                installed.append((r, held))
                pause_for_tests(f"installed:{r}")
        except BaseException:
            for r, held in reversed(installed):
                try:
                    uninstall_dir(self.paths[r], held, self._tmps[r])
                except OSError:  # pragma: no cover - the next verify/run reports the mismatch
                    pass
            raise
        self._committed = True
        pause_for_tests("committed")
        for r, held in installed:
            del self._tmps[r]
            if held is not None:
                shutil.rmtree(held, ignore_errors=True)
        return self.round_id

    # -- end
    def _release(self) -> None:
        for t in self._tmps.values():
            shutil.rmtree(t, ignore_errors=True)
        self._tmps = {}
        for lk in reversed(self._locks):
            lk.release()
        self._locks = []
        if not self._committed:
            for d in reversed(self._created_parents):
                try:
                    os.rmdir(d)
                except OSError:
                    break
        self._created_parents = []

    def close(self) -> None:
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._release()


# ----------------------------------------------------------------------------- verification

_RECOVER = ("a run was interrupted between installing the two folders; rerun the same "
            "`fedmomentum aggregate ... --overwrite` (the inputs are unchanged) to write a matching pair")


def _pair_problem(folder: Path, m: dict) -> Optional[str]:
    """Why ``folder`` (marker ``m``) and its recorded partner do not belong together, or None."""
    partner = m.get("partner") or {}
    pp = Path(partner.get("path", ""))
    pm = read_marker(pp) if partner.get("path") else None
    if pm is None:
        if not os.path.lexists(pp):
            return (f"its {partner.get('role', 'partner')} {str(pp)!r} (same round {m['round_id'][:8]}) is missing; "
                    + _RECOVER)
        return (f"its {partner.get('role', 'partner')} {str(pp)!r} carries no fedmomentum marker; " + _RECOVER)
    if pm["round_id"] != m["round_id"]:
        return (f"mismatched pair: it is from round {m['round_id'][:8]} ({m.get('created', '?')}) but its "
                f"{partner.get('role', 'partner')} {str(pp)!r} is from round {pm['round_id'][:8]} "
                f"({pm.get('created', '?')}); " + _RECOVER)
    return None


def _check_files(folder: Path, m: dict, what: str) -> None:
    for rel, size in (m.get("files") or {}).items():
        p = folder / rel
        if not p.is_file():
            raise OutputError(f"{what} {str(folder)!r} is damaged: {rel} is missing")
        if p.stat().st_size != size:
            raise OutputError(f"{what} {str(folder)!r} is damaged: {rel} has {p.stat().st_size} bytes, "
                              f"{size} were written")
        if rel.endswith(".safetensors"):
            try:
                from safetensors import safe_open
                with safe_open(str(p), framework="pt") as f:
                    list(f.keys())
            except Exception as e:  # noqa: BLE001 - SafetensorError has no stable name
                raise OutputError(f"{what} {str(folder)!r} is damaged: {rel} cannot be read "
                                  f"({' '.join(str(e).split())})") from None
        elif rel.endswith(".json"):
            try:
                json.loads(p.read_text())
            except ValueError:
                raise OutputError(f"{what} {str(folder)!r} is damaged: {rel} is not valid JSON") from None


def verify_outputs(adapter_dir: PathLike, merged_out: Optional[PathLike] = None) -> str:
    """Check an output adapter folder (and its merged base): complete, and from the same round.

    Raises :class:`OutputError` (one line, with how to recover) on a missing, damaged, foreign or
    mismatched folder; returns a one-line summary when all is well. The merged base checked is
    ``merged_out`` if given, else the partner the adapter's marker records (if any).
    """
    a = Path(adapter_dir)
    if not a.is_dir():
        raise OutputError(f"adapter folder {str(a)!r} does not exist")
    m = read_marker(a)
    if m is None:
        if _legacy_own(a):
            raise OutputError(f"adapter folder {str(a)!r} was written by an older fedmomentum without a round "
                              f"marker ({MARKER_FILE}); it cannot be verified")
        raise OutputError(f"adapter folder {str(a)!r} is not a fedmomentum output (no {MARKER_FILE})")
    if m.get("role") not in (None, "adapter"):
        raise OutputError(f"{str(a)!r} is a {str(m.get('role')).replace('_', ' ')} folder, not an adapter folder; "
                          "give the adapter folder (--out of `fedmomentum aggregate`)")
    _check_files(a, m, "adapter folder")
    partner = merged_out if merged_out is not None else (m.get("partner") or {}).get("path")
    stale = _stale_names(a) + (_stale_names(Path(partner)) if partner else [])
    tail = (f" (stale temporaries of an interrupted run: {', '.join(stale)}; the next aggregate run on "
            "this folder removes them)") if stale else ""
    if partner is None:
        return f"ok: adapter {str(a)!r}, round {m['round_id']}{tail}"
    pdir = Path(partner)
    if not pdir.is_dir():
        raise OutputError(f"merged base {str(pdir)!r} of adapter {str(a)!r} (round {m['round_id'][:8]}) is missing; "
                          + _RECOVER)
    pm = read_marker(pdir)
    if pm is None:
        raise OutputError(f"merged base {str(pdir)!r} is not a fedmomentum output (no {MARKER_FILE})")
    if pm["round_id"] != m["round_id"]:
        raise OutputError(f"mismatched pair: adapter {str(a)!r} is from round {m['round_id'][:8]} "
                          f"({m.get('created', '?')}) but merged base {str(pdir)!r} is from round "
                          f"{pm['round_id'][:8]} ({pm.get('created', '?')}); " + _RECOVER)
    _check_files(pdir, pm, "merged base")
    return f"ok: adapter {str(a)!r} and merged base {str(pdir)!r}, round {m['round_id']}{tail}"


def _stale_names(t: Path) -> list[str]:
    if not t.parent.is_dir():
        return []
    pat = re.compile(_STALE.format(name=re.escape(t.name)))
    return sorted(n for n in os.listdir(t.parent) if pat.match(n))


# ----------------------------------------------------------------------------- input warnings

#: bytes hashed at each end of a weights file in the cheap first pass of :func:`input_warnings`
_SAMPLE_BYTES = 64 << 10


def _digest(p: Path, sample: bool = False) -> Optional[str]:
    """blake2b of a file; ``sample=True``: of its first and last 64 KiB only (a cheap first pass:
    two trained clients differ there already, so only true duplicates are read in full; the
    check then costs well under a millisecond per client instead of a second read of the inputs)."""
    import hashlib
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(p, "rb") as f:
            if sample:
                h.update(f.read(_SAMPLE_BYTES))
                size = os.fstat(f.fileno()).st_size
                if size > 2 * _SAMPLE_BYTES:
                    f.seek(size - _SAMPLE_BYTES)
                    h.update(f.read(_SAMPLE_BYTES))
                elif size > _SAMPLE_BYTES:
                    h.update(f.read())
            else:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def input_warnings(adapter_dirs: Sequence[PathLike], weights_file: str = "adapter_model.safetensors",
                   config_file: str = "adapter_config.json") -> list[str]:
    """Warnings about the client folders (they do not stop the run): the same folder given twice
    (same resolved path), two clients with identical tensors (byte-identical weights files) and
    clients whose ``base_model_name_or_path`` differ."""
    warns = []
    dirs = [Path(d) for d in adapter_dirs]
    seen: dict[Path, int] = {}
    for k, d in enumerate(dirs):
        r = _real(d)
        if r in seen:
            warns.append(f"client {k} {str(d)!r} is the same folder as client {seen[r]} "
                         f"{str(dirs[seen[r]])!r}; it is counted twice")
        else:
            seen[r] = k
    by_size: dict[int, list[int]] = {}
    for r, k in seen.items():
        f = r / weights_file
        if f.is_file():
            by_size.setdefault(f.stat().st_size, []).append(k)
    for ks in by_size.values():
        if len(ks) < 2:
            continue
        by_sample: dict[Optional[str], list[int]] = {}
        for k in ks:
            by_sample.setdefault(_digest(dirs[k] / weights_file, sample=True), []).append(k)
        ks = sorted(k for sm, group in by_sample.items() if sm is not None and len(group) > 1 for k in group)
        digests: dict[str, int] = {}
        for k in ks:
            dg = _digest(dirs[k] / weights_file)
            if dg is None:
                continue
            if dg in digests:
                j = digests[dg]
                warns.append(f"client {k} {str(dirs[k])!r} has the same tensors as client {j} "
                             f"{str(dirs[j])!r} (identical {weights_file}); is it the same client twice?")
            else:
                digests[dg] = k
    names: dict[str, list[int]] = {}
    for k, d in enumerate(dirs):
        try:
            cfg = json.loads((d / config_file).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and cfg.get("base_model_name_or_path"):
            names.setdefault(str(cfg["base_model_name_or_path"]), []).append(k)
    if len(names) > 1:
        parts = "; ".join(f"{n!r} (client{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))})"
                          for n, ks in names.items())
        warns.append(f"the clients name different base models in base_model_name_or_path: {parts}; "
                     "adapters trained on different bases should not be aggregated")
    return warns
