"""``safeclip-scan --output``: Parquet results, resumable, each item written exactly once, complete only at the end.

One row per item: ``source``, ``key``, ``path`` (null for shard members), ``flagged``, ``category``,
``score`` (null when not finite), ``probs`` (a struct, one float64 field per manifest class, in order:
exact scores, for threshold sweeps), ``reason`` (set when the gate failed closed), ``error`` (set, and the
verdict columns null, when the image could not be read), ``sha256`` (of the bytes gated) and ``stat`` (the
identity of the file that held them, ``sources.file_identity``; both null when nothing was read).
``(source, key)`` identifies an item.

While a job runs, rows go to ``OUT.partial/`` in parts (``part-NNNNNN-<id>.parquet``, each written under a
temporary name and renamed, so a part is whole or absent), next to ``_job.json`` (the bundle's integrity
digest and the threshold: a rerun with another bundle or threshold refuses to mix rows) and a lock (one job
per output at a time). A rerun of an interrupted job reads the parts, skips the items they hold, and writes
the rest; rows for an item already written (a batch retried after a worker died) are dropped, so no item is
written twice. Before it resumes, the driver checks every row written against the files as they are now
(``sources.unchanged``) and ``drop`` removes from the parts the rows of items gone from the listing and of items
whose content changed, which are then gated again. When every listed item has its row, the job finishes:
``OUT`` ending in ``.parquet`` becomes one file (rows in listing order) written under a temporary name and renamed; any other ``OUT`` is the parts
folder itself, renamed from ``OUT.partial`` (with a ``_SUCCESS`` file). ``OUT`` therefore exists only complete.
It keeps the job description (the file's schema metadata ``safeclip_job``, or the folder's ``_job.json``):
a complete ``OUT`` is reused (``--labels``, ``--safe-out``) only by the same job.

``write_safe`` writes the safe subset (no error, not flagged) as a file list (one path a line; shard members
as ``shard#key``) or, for a ``.parquet`` name, as Parquet rows (source, key, path, category, score, sha256: of
the bytes gated, so a pipeline can check what it loads). Without ``--output``, ``json_record`` is the JSON
object printed on stdout for each item.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import uuid
from pathlib import Path

from .sources import display_name


class OutputError(ValueError):
    """An output that cannot be used: another job's rows, locked by a running job, unwritable, incomplete."""


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OutputError("--output needs pyarrow: pip install 'safeclip-edge[ray]' (or pyarrow)") from None
    return pa, pq


def schema(classes: list[str]):
    pa, _ = _pa()
    return pa.schema([("source", pa.string()), ("key", pa.string()), ("path", pa.string()),
                      ("flagged", pa.bool_()), ("category", pa.string()), ("score", pa.float64()),
                      ("probs", pa.struct([(c, pa.float64()) for c in classes])),
                      ("reason", pa.string()), ("error", pa.string()), ("sha256", pa.string()),
                      ("stat", pa.string())])


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


def make_row(item: dict, verdict, error: str | None) -> dict:
    row = {"source": item["source"], "key": item["key"], "path": item["path"], "flagged": None, "category": None,
           "score": None, "probs": None, "reason": None, "error": error, "sha256": item.get("sha256"),
           "stat": item.get("stat")}
    if verdict is not None:
        row.update(flagged=bool(verdict.flagged), category=verdict.category, score=_finite(verdict.score),
                   probs={c: _finite(p) for c, p in verdict.probs.items()} or None, reason=verdict.reason or None)
    return row


def rows_table(rows: list[dict], classes: list[str]):
    pa, _ = _pa()
    return pa.Table.from_pylist(rows, schema=schema(classes))


def item_id(row: dict) -> tuple[str, str]:
    return row["source"], row["key"]


class ScanOutput:
    """``OUT`` and its ``OUT.partial`` folder for one job description ``job`` (a JSON-able dict)."""

    def __init__(self, out: str | Path, job: dict, classes: list[str]):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.job, self.classes = job, list(classes)
        self.done: set[tuple[str, str]] = set()
        self.written: dict[tuple[str, str], dict] = {}      # id -> {"sha256", "stat"} of the row in the parts
        self._lock_fd: int | None = None
        self._seq = 0

    @property
    def complete(self) -> bool:
        return self.out.exists()

    def check_complete(self) -> None:
        """OutputError unless the complete ``OUT`` was written by this job (same bundle and threshold)."""
        _, pq = _pa()
        try:
            if self.out.is_dir():
                old = json.loads((self.out / "_job.json").read_text())
            else:
                old = json.loads((pq.read_schema(self.out).metadata or {})[b"safeclip_job"])
        except (OSError, KeyError, ValueError) as e:
            raise OutputError(f"{self.out}: not a complete safeclip-scan output ({e})") from None
        if old != self.job:
            diff = ", ".join(k for k in sorted(set(old) | set(self.job)) if old.get(k) != self.job.get(k))
            raise OutputError(f"{self.out} holds the rows of another job (differs in: {diff})")

    def open(self) -> dict[tuple[str, str], dict]:
        """Create or reopen ``OUT.partial``; returns the ids already written there, each with the ``sha256`` and
        ``stat`` its row recorded."""
        _pa()
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.partial / "_lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise OutputError(f"{self.partial}: cannot create the output folder ({e.strerror or e})") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise OutputError(f"{self.out}: another scan is writing this output now") from None
        meta = self.partial / "_job.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old != self.job:
                self.close()
                diff = ", ".join(k for k in sorted(set(old) | set(self.job)) if old.get(k) != self.job.get(k))
                raise OutputError(f"{self.partial} holds rows of another job (differs in: {diff}); use another "
                                  "--output or remove it")
        else:
            from ..manifest import atomic_write_text
            atomic_write_text(meta, json.dumps(self.job, indent=1, sort_keys=True) + "\n")
        for part in self._parts():
            self._seq = max(self._seq, int(part.name.split("-")[1]) + 1)
            t = _pa()[1].read_table(part, columns=["source", "key", "sha256", "stat"])
            for r in t.to_pylist():
                self.written[item_id(r)] = {"sha256": r["sha256"], "stat": r["stat"]}
        self.done = set(self.written)
        return dict(self.written)

    def drop(self, ids: set[tuple[str, str]]) -> None:
        """Remove the rows of ``ids`` from the parts (each part rewritten atomically, or deleted when emptied)."""
        ids = set(ids) & self.done
        if not ids:
            return
        pa, pq = _pa()
        for part in self._parts():
            t = pq.read_table(part, schema=schema(self.classes))
            keep = [item_id(r) not in ids for r in t.select(["source", "key"]).to_pylist()]
            if all(keep):
                continue
            if not any(keep):
                part.unlink()
                continue
            tmp = self.partial / f".{part.name}.tmp"
            pq.write_table(t.filter(pa.array(keep)), tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, part)
        self.done -= ids
        for i in ids:
            self.written.pop(i, None)

    def _parts(self) -> list[Path]:
        return sorted(self.partial.glob("part-*.parquet"))

    def write(self, rows: list[dict]) -> int:
        """Write the rows of items not yet written as one part (atomically); returns how many were new."""
        fresh, ids = [], set()
        for r in rows:
            i = item_id(r)
            if i not in self.done and i not in ids:
                ids.add(i)
                fresh.append(r)
        if not fresh:
            return 0
        _, pq = _pa()
        name = f"part-{self._seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.partial / f".{name}.tmp"
        pq.write_table(rows_table(fresh, self.classes), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.partial / name)
        self._seq += 1
        self.done |= ids
        return len(fresh)

    def finish(self, expected: list[tuple[str, str]]) -> None:
        """Make ``OUT`` once every id in ``expected`` (listing order) is written; OutputError if any is missing."""
        missing = [i for i in expected if i not in self.done]
        if missing:
            raise OutputError(f"{len(missing)} of {len(expected)} items have no row yet (first: "
                              f"{missing[0][0]}#{missing[0][1]}); run the same command again to finish")
        if self.out.suffix.lower() == ".parquet":
            pa, pq = _pa()
            parts = [pq.read_table(p, schema=schema(self.classes)) for p in self._parts()]
            table = pa.concat_tables(parts) if parts else rows_table([], self.classes)
            order = {i: n for n, i in enumerate(expected)}
            ids = zip(table.column("source").to_pylist(), table.column("key").to_pylist())
            ids = list(ids)
            idx = sorted((n for n in range(table.num_rows) if ids[n] in order), key=lambda n: order[ids[n]])
            table = table.take(pa.array(idx, type=pa.int64()))
            table = table.replace_schema_metadata({"safeclip_job": json.dumps(self.job, sort_keys=True)})
            tmp = self.out.with_name(f".{self.out.name}.{uuid.uuid4().hex[:8]}.tmp")
            pq.write_table(table, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.out)
            self.close()
            shutil.rmtree(self.partial, ignore_errors=True)
        else:
            (self.partial / "_SUCCESS").write_text("")
            self.close()
            (self.partial / "_lock").unlink(missing_ok=True)
            os.rename(self.partial, self.out)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def read_rows(out: str | Path) -> list[dict]:
    """The rows of a complete output (one file or a parts folder)."""
    _, pq = _pa()
    out = Path(out)
    files = sorted(out.glob("part-*.parquet")) if out.is_dir() else [out]
    rows: list[dict] = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def write_safe(rows: list[dict], path: str | Path) -> int:
    """Write the safe subset (see the module docstring); returns its size."""
    safe = [r for r in rows if r["error"] is None and r["flagged"] is False]
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        pa, pq = _pa()
        cols = ("source", "key", "path", "category", "score", "sha256")
        t = pa.Table.from_pylist([{k: r.get(k) for k in cols} for r in safe],
                                 schema=pa.schema([("source", pa.string()), ("key", pa.string()),
                                                   ("path", pa.string()), ("category", pa.string()),
                                                   ("score", pa.float64()), ("sha256", pa.string())]))
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        pq.write_table(t, tmp)
        os.replace(tmp, path)
    else:
        from ..manifest import atomic_write_text
        atomic_write_text(path, "".join(display_name(r) + "\n" for r in safe))
    return len(safe)


def json_record(item: dict, verdict: Verdict | None, error: str | None) -> dict:
    """What ``safeclip-scan`` prints for one item: ``{"path", flagged, category, score, probs, ...}`` or an error."""
    rec: dict = {"path": display_name(item)}
    if error is not None:
        rec["error"] = error
    else:
        rec.update(verdict.to_json())
        rec.pop("latency_ms", None)
    return rec
