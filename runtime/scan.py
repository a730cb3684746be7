"""What ``safeclip-scan`` screens and how: sources listed as small items, images read and gated in batches.

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
without reading an image; ``(source, key)`` identifies it in the output (``scan_out``). Images are read
where they are gated (``ItemReader``: a worker keeps the last shard it read open; for a Parquet shard that
is its image column in memory, so shards of about 1 GB, as img2dataset writes them, suit it).

``gate_items`` gates a batch with the bundle's vision+gate graph: every readable image is preprocessed, the
batch goes through the graph in one run (its batch dimension is dynamic), and each row of ``class_probs``
becomes a verdict through ``gate.verdict_from_probs``, the rule the pipeline itself applies. Multi-view
(anyres) bundles are gated one image at a time through ``Pipeline.gate`` (their views aggregate per image);
a batch the graph refuses (a TensorRT profile smaller than the batch) is retried one image at a time. An
image that cannot be read or decoded gives an error result, never an exception.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from .gate import Verdict, verdict_from_probs
from .messages import one_line

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
        lines = p.read_text(encoding="utf-8-sig").splitlines()
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
        f = pq.ParquetFile(p)
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
        with tarfile.open(p) as t:
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
    """Reads an item's image (a path or bytes), keeping the last Parquet/tar shard open; not thread-safe."""

    def __init__(self, allow_private_hosts: bool = False, fetch_timeout_s: float = 30.0):
        self.allow_private, self.fetch_timeout_s = allow_private_hosts, fetch_timeout_s
        self._shard: tuple[str, object] | None = None

    def read(self, item: dict):
        kind, loc = item["kind"], item["loc"]
        if kind == "file":
            if not loc and not item["path"]:
                raise ValueError("no path")
            return Path(item["path"] or loc)
        if kind == "url":
            from .serve.fetch import fetch_image
            return fetch_image(loc, max_bytes=MAX_FETCH_BYTES, timeout_s=self.fetch_timeout_s,
                               allow_private=self.allow_private)
        if kind == "tar":
            if not loc:
                raise ValueError("the sample has no image member")
            t = self._open(item["source"], lambda s: tarfile.open(s))
            f = t.extractfile(loc)
            if f is None:
                raise ValueError(f"tar member '{loc}' is not a file")
            return f.read()
        if kind == "parquet":
            col = self._open(item["source"], _read_image_column)
            v = col[int(loc)]
            if isinstance(v, dict):
                v = v.get("bytes")
            if not v:
                raise ValueError("empty image cell")
            return bytes(v)
        raise ValueError(f"unknown item kind '{kind}'")

    def _open(self, source: str, opener):
        if self._shard is None or self._shard[0] != source:
            self.close()
            self._shard = (source, opener(source))
        return self._shard[1]

    def close(self) -> None:
        if self._shard is not None and hasattr(self._shard[1], "close"):
            self._shard[1].close()
        self._shard = None


def _read_image_column(source: str) -> list:
    pq = _pq()
    f = pq.ParquetFile(source)
    _, col, _ = parquet_columns(f.schema_arrow.names)
    return f.read(columns=[col]).column(col).to_pylist()


def gate_items(pipe, items: list[dict], reader: ItemReader) -> list[tuple[Verdict | None, str | None]]:
    """(verdict, None) or (None, error message) for each item, in order (see the module docstring)."""
    out: list = [None] * len(items)
    ready: list[tuple[int, np.ndarray]] = []
    for i, it in enumerate(items):
        try:
            image = reader.read(it)
            if pipe.anyres is not None:
                v = pipe.gate(image)
                out[i] = (_no_latency(v), None)
            else:
                ready.append((i, pipe.pixel_values(image)))                       # [1, 3, H, W]
        except Exception as e:               # one bad image never stops the scan
            out[i] = (None, one_line(e))
    if ready:
        for i, v in zip([i for i, _ in ready], _gate_batch(pipe, [pv for _, pv in ready])):
            out[i] = v
    return out


def _gate_batch(pipe, pvs: list[np.ndarray]) -> list:
    names = pipe.names
    try:
        probs = pipe.vision.run({names.pixel_values: np.concatenate(pvs)}).get(names.class_probs)   # [B, C]
    except Exception as e:
        if len(pvs) == 1:
            return [(None, f"vision graph failed ({one_line(e)})")]
        return [r for pv in pvs for r in _gate_batch(pipe, [pv])]
    return [(verdict_from_probs(None if probs is None else probs[j], pipe.classes, pipe.safe_classes,
                                pipe.threshold), None) for j in range(len(pvs))]


def _no_latency(v: Verdict) -> Verdict:
    from dataclasses import replace
    return replace(v, latency_ms=None)


def json_record(item: dict, verdict: Verdict | None, error: str | None) -> dict:
    """What ``safeclip-scan`` prints for one item: ``{"path", flagged, category, score, probs, ...}`` or an error."""
    rec: dict = {"path": display_name(item)}
    if error is not None:
        rec["error"] = error
    else:
        rec.update(verdict.to_json())
        rec.pop("latency_ms", None)
    return rec


def crash_hook_for_tests(items: list[dict]) -> None:
    """TEST ONLY (tests/test_scan_ray.py): with ``SAFECLIP_SCAN_TEST_CRASH=KEY:MARKER`` set, the first worker to
    meet an item with key KEY creates the file MARKER and dies (``os._exit``), so Ray's actor restart and task
    retry are exercised. Unset (always, outside that test) it does nothing."""
    spec = os.environ.get("SAFECLIP_SCAN_TEST_CRASH")
    if not spec:
        return
    key, _, marker = spec.partition(":")
    if any(it["key"] == key for it in items):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(17)
