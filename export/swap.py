"""Putting a finished bundle at ``--out``: one export per ``--out`` at a time, never a moment without a bundle,
and what a killed export left behind cleaned by the next one.

Supported and why:

- **A lock per --out**: ``.<name>.lock`` beside the bundle, held with ``fcntl.flock`` for the whole export (the
  kernel drops it when the process dies, even by ``kill -9``). A second export to the same ``--out`` refuses at
  once with one line naming the holder's pid (:class:`BundleBusyError`): waiting behind an export that takes an
  hour is not what someone who typed the command expects. The file is removed on a clean exit; a holder checks
  after locking that the path still names the file it locked, so removing it never lets two exports in.
- **A journal of the temporary names**: before it creates anything, an export writes into its lock file (fsync)
  the two names it may leave beside the bundle (``.<name>.tmp-<hex>``, the new bundle being written, and
  ``.<name>.old-<hex>``, used by the fallback below). The next export to that ``--out`` (holding the lock, so no
  running export owns them) removes exactly those folders: only ours, and only dead ones. Folders of that shape
  not named in a journal (another tool's, or left by an export older than this file) are never touched.
- **The swap**: on Linux, ``renameat2(RENAME_EXCHANGE)`` through libc (kernel 3.15, glibc 2.28; ext4, xfs,
  btrfs, tmpfs, overlayfs on those) swaps the old and the new folder in one step: at every instant the path is
  a complete bundle. macOS: ``renamex_np(RENAME_SWAP)``. Elsewhere, or where the file system refuses the exchange
  (EINVAL: NFS, FUSE, vfat), two renames (bundle -> ``.old``, new -> bundle) with a window between them; the
  journal names the ``.old`` folder, and the next export puts it back if the bundle is missing.
  Why not a versioned folder behind a symlink swapped with ``rename``: the bundle would become a symlink, and
  bundles are copied, rsynced and bind-mounted into containers as plain folders (a symlink breaks all three);
  the exchange keeps ``--out`` a plain folder and every reader unchanged.

TEST ONLY: ``SAFECLIP_EXPORT_TEST_KILL_AT=<point>`` (``tmp``, ``swap``, ``renamed``, ``swapped``) makes the
export SIGKILL itself there, and ``SAFECLIP_EXPORT_TEST_STOP_AT`` SIGSTOPs it (tests/test_bundle_swap.py);
unset, as always outside those tests, they do nothing.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
from pathlib import Path

MANIFEST = "manifest.json"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2           # linux/fs.h
_RENAME_SWAP, _RENAME_EXCL = 2, 4                    # macOS sys/stdio.h (renamex_np)
_AT_FDCWD = -100


class BundleBusyError(RuntimeError):
    """Another export is writing the same ``--out``."""


def _test_point(point: str) -> None:
    for var, sig in (("SAFECLIP_EXPORT_TEST_STOP_AT", signal.SIGSTOP),
                     ("SAFECLIP_EXPORT_TEST_KILL_AT", signal.SIGKILL)):
        if os.environ.get(var) == point:
            os.kill(os.getpid(), sig)


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _rename_flags(src: Path, dst: Path, flags_linux: int, flags_mac: int) -> bool:
    """renameat2 / renamex_np with flags; False where neither exists or the file system refuses the flags."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None and sys.platform.startswith("linux") else None
    mac = getattr(libc, "renamex_np", None) if libc is not None and sys.platform == "darwin" else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags_linux)
    elif mac is not None:
        mac.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = mac(os.fsencode(src), os.fsencode(dst), flags_mac)
    else:
        return False
    if rc == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, f"{os.strerror(e)}: cannot move {src.name} to {dst}")


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where this system or file system cannot (see the docstring)."""
    return _rename_flags(a, b, _RENAME_EXCHANGE, _RENAME_SWAP)


class OutputSlot:
    """The lock and journal of one ``--out`` (see the module docstring); :meth:`acquire` to take it."""

    def __init__(self, out: Path, fd: int, lock: Path):
        self.out, self._fd, self.lock = out, fd, lock
        self.recovered: list[str] = []             # what the previous, killed export's leftovers became

    @classmethod
    def acquire(cls, out: Path) -> "OutputSlot":
        """Lock ``out`` (BundleBusyError when another export holds it) and clean up after a killed export."""
        out = Path(out)
        lock = out.with_name(f".{out.name}.lock")
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _journal(fd).get("pid", "?")
                os.close(fd)
                raise BundleBusyError(f"{out}: another export (pid {pid}) is writing this bundle now; wait for it "
                                      "to finish or choose another --out") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)                            # removed by a holder that finished in between: take the new one
        slot = cls(out, fd, lock)
        try:
            slot._recover(_journal(fd))
            slot._write({"pid": os.getpid()})
        except BaseException:
            slot.release(clean=False)
            raise
        return slot

    def _write(self, entry: dict) -> None:
        data = json.dumps(entry).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _ours(self, name) -> Path | None:
        """A journalled name, only if it has the shape this module gives (never a path elsewhere)."""
        if not isinstance(name, str) or "/" in name or not name.startswith((f".{self.out.name}.tmp-",
                                                                             f".{self.out.name}.old-")):
            return None
        return self.out.with_name(name)

    def _recover(self, journal: dict) -> None:
        tmp, old = self._ours(journal.get("tmp")), self._ours(journal.get("old"))
        if old is not None and not self.out.exists() and (old / MANIFEST).is_file():
            os.rename(old, self.out)                # killed between the fallback's two renames: the old bundle back
            self.recovered.append(f"restored {self.out.name} from {old.name} (an export was killed mid-swap)")
        for p in (tmp, old):
            if p is not None and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                self.recovered.append(f"removed {p.name} (left by a killed export)")

    def new_tmp(self) -> Path:
        """Journal, then create, the folder the new bundle is written into (beside ``out``, same file system)."""
        while True:
            token = secrets.token_hex(4)
            tmp = self.out.with_name(f".{self.out.name}.tmp-{token}")
            self._old = self.out.with_name(f".{self.out.name}.old-{token}")
            if not tmp.exists() and not self._old.exists():
                break
        self._write({"pid": os.getpid(), "tmp": tmp.name, "old": self._old.name})
        os.mkdir(tmp, 0o700)
        _test_point("tmp")
        return tmp

    def put_in_place(self, tmp: Path, use_exchange: bool = True) -> None:
        """Make the complete folder ``tmp`` the bundle at ``out``; the one it replaces is removed afterwards."""
        os.chmod(tmp, 0o755)
        _test_point("swap")
        if not self.out.exists():
            if not _rename_flags(tmp, self.out, _RENAME_NOREPLACE, _RENAME_EXCL):
                os.rename(tmp, self.out)
            return
        if use_exchange and exchange(tmp, self.out):
            _test_point("swapped")
            shutil.rmtree(tmp)                      # now the previous bundle
            return
        os.rename(self.out, self._old)              # fallback: the journal names _old, see _recover
        _test_point("renamed")
        os.rename(tmp, self.out)
        _test_point("swapped")
        shutil.rmtree(self._old)

    def release(self, clean: bool = True) -> None:
        """Unlock; the lock file (and its journal) goes too unless something it names is still there."""
        if self._fd is None:
            return
        j = _journal(self._fd)
        left = [p for p in (self._ours(j.get("tmp")), self._ours(j.get("old"))) if p is not None and os.path.lexists(p)]
        if clean and not left:
            self.lock.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _journal(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
