"""The verification cache: sha256 results of large bundle files, so a warm start does not re-read gigabytes.

An entry vouches only for what was hashed, and cannot be forged by whoever can write the bundle or the cache file:

* it is keyed on the file's identity as an unprivileged user cannot restore it: real path, device, inode, size,
  mtime **and ctime** (``utime`` can put mtime back after an in-place edit; only the kernel sets ctime, to now, on
  every write, chmod or rename);
* it is authenticated: HMAC-SHA256 of (key, digest) with a 32-byte per-device secret, ``verify.key`` in the cache
  folder, created 0600 and used only when it is a regular file owned by this user and unreadable to others. A
  forged or edited ``verified.json`` entry fails its HMAC and the file is hashed in full.

When the secret cannot be trusted or created (a shared or read-only cache folder), nothing is read from or written
to the cache: every file is hashed (fails closed, costs only time). Location: ``$SAFECLIP_CACHE_DIR``, else
``$XDG_CACHE_HOME/safeclip``, else ``~/.cache/safeclip``.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

SECRET = "verify.key"
ENTRIES = "verified.json"

__all__ = ["VerifyCache", "cache_dir"]


def cache_dir() -> Path:
    return Path(os.environ.get("SAFECLIP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "safeclip"))


def _secret(base: Path) -> bytes | None:
    """The per-device secret, created on first use; None when it is not ours alone (then no caching)."""
    path = base / SECRET
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077
                    or st.st_size != 32):
                return None
            secret = os.read(fd, 33)
        finally:
            os.close(fd)
    except OSError:
        return None
    return secret if len(secret) == 32 else None


class VerifyCache:
    """sha256 digests keyed on (realpath, dev, inode, size, mtime_ns, ctime_ns), each entry HMAC'd (module doc)."""

    def __init__(self, base: Path | None = None) -> None:
        self.base = cache_dir() if base is None else Path(base)
        self.path = self.base / ENTRIES
        self.entries: dict = {}
        self.dirty = False
        self._secret: bytes | None = None
        self._opened = False

    @property
    def secret(self) -> bytes | None:
        """Read (or create) the secret and the entries on first use: a bundle of small files touches nothing."""
        if not self._opened:
            self._opened = True
            self._secret = _secret(self.base)
            if self._secret is not None:
                try:
                    loaded = json.loads(self.path.read_text())
                    self.entries = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError, RecursionError):
                    self.entries = {}
        return self._secret

    @property
    def usable(self) -> bool:
        return self.secret is not None

    @staticmethod
    def key(p: Path, st: os.stat_result) -> str:
        return (f"{os.path.realpath(p)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}")

    def _mac(self, key: str, digest: str) -> str:
        return hmac.new(self.secret, f"{key}\0{digest}".encode(), hashlib.sha256).hexdigest()

    def get(self, p: Path, st: os.stat_result) -> str | None:
        if self.secret is None:
            return None
        key = self.key(p, st)
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return None
        if not hmac.compare_digest(str(entry.get("hmac", "")), self._mac(key, entry["sha256"])):
            return None
        return entry["sha256"]

    def put(self, p: Path, st: os.stat_result, digest: str) -> None:
        if self.secret is None:
            return
        key = self.key(p, st)
        self.entries[key] = {"sha256": digest, "hmac": self._mac(key, digest)}
        self.dirty = True

    def save(self, atomic_write_text) -> None:
        """Write the entries with ``atomic_write_text`` (``manifest.py``'s, passed in: no import cycle)."""
        if not self.dirty or self.secret is None:
            return
        try:
            kept = {k: v for k, v in self.entries.items() if isinstance(v, dict)}   # older unauthenticated ones go
            atomic_write_text(self.path, json.dumps(kept))
            os.chmod(self.path, 0o600)
        except OSError:
            pass                     # a read-only cache folder only costs a re-hash next time
