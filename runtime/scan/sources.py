"""What ``safeclip-scan`` screens: sources listed as small items, each item's bytes read where it is gated.

Sources (each SOURCE argument):

* a folder: its image files, recursively, in sorted order (``IMAGE_EXTS``); key = the path inside it;
* a file list (``.txt``, ``.lst``, ``.list``): one image path or http(s) URL a line (blank lines and ``#``
  comments skipped; relative paths are relative to the list's folder); key = the line as written;
* a Parquet shard (``.parquet``): one image a row, from the first of the columns ``image`` (bytes, or a
  struct with a ``bytes`` field as Hugging Face datasets writes it), ``bytes``, ``jpg``, ``png``, ``img``,
  else a ``path`` or ``url`` column; key = a ``key``/``__key__``/``id`` column, else the path or URL, else
  the row number;
* a WebDataset shard (``.tar``): one sample a key (the member name up to the first dot of its base name),
  its first image member (by extension) gated; key = the sample key;
* anything else: one image file, gated whatever its extension (key = the path as given).

An item is a small dict (``source``, ``key``, ``path``, ``kind``, ``loc``), so a job lists millions of them
without reading an image; ``(source, key)`` identifies it in the output (``output.py``). Images are read
where they are gated (``ItemReader``: a worker keeps the last shard it read open; for a Parquet shard that
is its image column in memory, so shards of about 1 GB, as img2dataset writes them, suit it).

Provenance (what makes a resumed scan and ``--safe-out`` trustworthy): ``gating.gate_items`` gates the very
bytes it read and records in each item their sha256 and the identity of the file that held them (the image file, or the
Parquet/tar shard: device, inode, size, mtime and ctime in ns, read with ``fstat`` on the open file; ctime cannot
be set back by an unprivileged edit). ``unchanged`` tells whether an item still holds what was gated: same
identity, or else the same sha256 when its bytes are read again. Every file is opened without blocking and
refused unless it is a regular file (a FIFO given as a list, shard or image would otherwise hang the scan).
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path

from ..error_text import one_line

LIST_EXTS = {".txt", ".lst", ".list"}
BYTES_COLUMNS = ("image", "bytes", "jpg", "png", "img")
KEY_COLUMNS = ("key", "__key__", "id")
MAX_FETCH_BYTES = 64 << 20


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


def iter_images(paths: list[str]):
    """Files as given (any extension), folders recursively (image extensions only), in sorted order."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for f in sorted(files):
                    if Path(f).suffix.lower() in IMAGE_EXTS:
                        yield Path(root) / f
        else:
            yield path


class SourceError(ValueError):
    """A SOURCE that cannot be listed: missing, unreadable list or shard, a Parquet shard without image column."""


def open_regular(path) -> "io.BufferedReader":
    """``path`` opened for reading, refused with OSError unless it is a regular file; never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"not a regular file (a FIFO, device or socket): {os.fsdecode(path)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_identity(st: os.stat_result) -> str:
    """What an in-place edit changes even when it restores the mtime: ctime (plus device, inode, size, mtime)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def holder_of(item: dict) -> str | None:
    """The local file holding an item's bytes (the image, or its shard); None for a URL."""
    if item["kind"] == "url":
        return None
    return (item["path"] or item["loc"]) if item["kind"] == "file" else item["source"]


def current_identity(item: dict) -> str | None:
    """The identity of the item's holder now (None: a URL, or the file is gone or unreadable)."""
    holder = holder_of(item)
    try:
        return None if holder is None else file_identity(os.stat(holder))
    except OSError:
        return None


def unchanged(row: dict, item: dict, reader: "ItemReader") -> bool:
    """Whether ``item`` still holds what ``row`` recorded as gated (see the module docstring); a URL's content
    cannot be checked again and counts as unchanged."""
    if item["kind"] == "url":
        return True
    now = current_identity(item)
    if now == row.get("stat"):
        return True
    if now is None or row.get("sha256") is None:
        return False
    try:
        data, _ = reader.read_bytes(item)
    except Exception:
        return False
    return hashlib.sha256(data).hexdigest() == row["sha256"]


def _item(source, key, path=None, kind="file", loc=None) -> dict:
    return {"source": str(source), "key": str(key), "path": None if path is None else str(path), "kind": kind,
            "loc": "" if loc is None else str(loc)}


def display_name(item: dict) -> str:
    """The path (or URL) of an item, else ``shard#key``: what the JSON lines and the safe file list show."""
    return item["path"] or f"{item['source']}#{item['key']}"


def list_items(sources: list[str]):
    """Yield the items of every SOURCE, in order (see the module docstring)."""
    for s in sources:
        p = Path(s)
        if p.is_dir():
            for f in iter_images([s]):
                yield _item(s, f.relative_to(p).as_posix(), f)
        elif p.suffix.lower() in LIST_EXTS:
            yield from _list_file(p)
        elif p.suffix.lower() == ".parquet":
            yield from _list_parquet(p)
        elif p.suffix.lower() == ".tar":
            yield from _list_tar(p)
        else:
            yield _item(s, s, p)


def _list_file(p: Path):
    try:
        with open_regular(p) as f:
            lines = f.read().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{p}: cannot read the file list ({one_line(e)})") from None
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith(("http://", "https://")):
            yield _item(p, entry, entry, "url", entry)
        else:
            path = Path(entry) if Path(entry).is_absolute() else p.parent / entry
            yield _item(p, entry, path)


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError("Parquet needs pyarrow: pip install 'safeclip-edge[ray]' (or pyarrow)") from None
    return pq


def parquet_columns(names: list[str]) -> tuple[str, str, str | None]:
    """(kind, column holding the image, key column or None) for a Parquet shard's column names."""
    lower = {n.lower(): n for n in names}
    key = next((lower[c] for c in KEY_COLUMNS if c in lower), None)
    for c in BYTES_COLUMNS:
        if c in lower:
            return "parquet", lower[c], key
    for c, kind in (("path", "file"), ("url", "url")):
        if c in lower:
            return kind, lower[c], key
    raise SourceError(f"no image column (one of {', '.join(BYTES_COLUMNS + ('path', 'url'))}) among "
                      f"{', '.join(names) or 'no columns'}")


def _list_parquet(p: Path):
    pq = _pq()
    try:
        with open_regular(p) as fp:
            f = pq.ParquetFile(fp)
            kind, col, key = parquet_columns(f.schema_arrow.names)
            wanted = [c for c in (col if kind != "parquet" else None, key) if c]
            table = f.read(columns=wanted) if wanted else None
            n = f.metadata.num_rows
    except SourceError as e:
        raise SourceError(f"{p}: {e}") from None
    except Exception as e:
        raise SourceError(f"{p}: cannot read the Parquet shard ({one_line(e)})") from None
    keys = table.column(key).to_pylist() if key else None
    refs = table.column(col).to_pylist() if kind != "parquet" else None
    for i in range(n):
        ref = None if refs is None else refs[i]
        k = keys[i] if keys else (ref if ref is not None else i)
        if kind == "parquet":
            yield _item(p, k, None, "parquet", i)
        elif kind == "url":
            yield _item(p, k, ref, "url", ref)
        else:
            path = None if ref is None else (Path(ref) if Path(ref).is_absolute() else p.parent / ref)
            yield _item(p, k, path, "file", path)


def _sample_key(name: str) -> tuple[str, str]:
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _list_tar(p: Path):
    seen: dict[str, str | None] = {}
    try:
        with open_regular(p) as fp, tarfile.open(fileobj=fp) as t:
            for m in t:
                if not m.isfile():
                    continue
                key, ext = _sample_key(m.name)
                if f".{ext.rsplit('.', 1)[-1]}" in IMAGE_EXTS:
                    if seen.get(key) is None:
                        seen[key] = m.name
                else:
                    seen.setdefault(key, None)
    except (OSError, tarfile.TarError) as e:
        raise SourceError(f"{p}: cannot read the WebDataset shard ({one_line(e)})") from None
    for key, member in seen.items():
        yield _item(p, key, None, "tar", member or "")


class ItemReader:
    """Reads an item's image bytes, keeping the last Parquet/tar shard open; not thread-safe."""

    def __init__(self, allow_private_hosts: bool = False, fetch_timeout_s: float = 30.0):
        self.allow_private, self.fetch_timeout_s = allow_private_hosts, fetch_timeout_s
        self._shard: tuple[str, object, str] | None = None

    def read(self, item: dict) -> bytes:
        return self.read_bytes(item)[0]

    def read_bytes(self, item: dict) -> tuple[bytes, str | None]:
        """(the item's bytes, the identity of the file that held them, None for a URL)."""
        kind, loc = item["kind"], item["loc"]
        if kind == "file":
            if not loc and not item["path"]:
                raise ValueError("no path")
            with open_regular(item["path"] or loc) as f:
                ident = file_identity(os.fstat(f.fileno()))
                return f.read(), ident
        if kind == "url":
            from ..fetch import fetch_image
            return fetch_image(loc, max_bytes=MAX_FETCH_BYTES, timeout_s=self.fetch_timeout_s,
                               allow_private=self.allow_private), None
        if kind == "tar":
            if not loc:
                raise ValueError("the sample has no image member")
            t, ident = self._open(item["source"], _open_tar)
            f = t.extractfile(loc)
            if f is None:
                raise ValueError(f"tar member '{loc}' is not a file")
            return f.read(), ident
        if kind == "parquet":
            col, ident = self._open(item["source"], _read_image_column)
            v = col[int(loc)]
            if isinstance(v, dict):
                v = v.get("bytes")
            if not v:
                raise ValueError("empty image cell")
            return bytes(v), ident
        raise ValueError(f"unknown item kind '{kind}'")

    def _open(self, source: str, opener):
        if self._shard is None or self._shard[0] != source:
            self.close()
            self._shard = (source, *opener(source))
        return self._shard[1], self._shard[2]

    def close(self) -> None:
        if self._shard is not None and hasattr(self._shard[1], "close"):
            self._shard[1].close()
        self._shard = None


class _TarShard:
    """A tar shard opened through :func:`open_regular` (``tarfile`` does not close a file object it was given)."""

    def __init__(self, source: str):
        self.fp = open_regular(source)
        try:
            self.ident = file_identity(os.fstat(self.fp.fileno()))
            self.tar = tarfile.open(fileobj=self.fp)
        except BaseException:
            self.fp.close()
            raise

    def extractfile(self, member: str):
        return self.tar.extractfile(member)

    def close(self) -> None:
        self.tar.close()
        self.fp.close()


def _open_tar(source: str):
    shard = _TarShard(source)
    return shard, shard.ident


def _read_image_column(source: str) -> tuple[list, str]:
    pq = _pq()
    with open_regular(source) as fp:
        ident = file_identity(os.fstat(fp.fileno()))
        f = pq.ParquetFile(fp)
        _, col, _ = parquet_columns(f.schema_arrow.names)
        return f.read(columns=[col]).column(col).to_pylist(), ident
