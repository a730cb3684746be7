"""``safeclip-scan``'s driver: list the sources, gate them locally or on Ray, print or write the results.

Without ``--output`` the scan prints one JSON object per image on stdout (batches of
``--batch-size`` through the vision graph; the verdicts are the per-image ones). With ``--output OUT`` the
rows go to Parquet (``output.py``: resumable, exactly once, ``OUT`` appears only when complete) and stdout
stays quiet; ``--ray`` gates on Ray Data (``ray_workers.py``) with the same rows and the same output. An ``OUT``
that is already complete is not scanned again: its rows feed ``--labels`` and ``--safe-out`` directly.
``--safe-out FILE`` writes the safe subset (``output.write_safe``): only items still listed whose content is
what was gated (``sources.unchanged``); an image changed or gone since is left out and counted on stderr. A
resumed ``--output`` first drops the rows of items gone from the listing and gates again those whose content
changed. A ``--safe-out`` folder that cannot be written is one line and exit 1, checked before any gating.
Progress goes to stderr as items finish (``runtime/progress.py``: a tqdm bar on a terminal, a plain line every
10 s otherwise). Exit status (``EXIT_*``; README "safeclip-scan"): 0 every item was gated; 3 the scan finished
but some items could not be gated (each reported with its error, counted apart in the summary); 1 the job
stopped before finishing, or there was nothing to gate; 2 a usage or input error; 130 interrupted (the rows
written so far stay; the same command resumes).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from ..error_text import EXIT_INTERRUPTED, one_line
from ..progress import Progress, plural

EXIT_OK, EXIT_STOPPED, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2, 3


@dataclass
class GateInfo:
    """What the driver needs of a bundle when the workers hold the graph (``--ray``)."""
    manifest: object
    classes: list
    safe_classes: list
    threshold: float


class ScanStop(Exception):
    """Why a scan stops before its end: the one line ``safeclip-scan``'s ``main()`` reports through
    ``error_text.fail`` (``label=None``: not an error of the input, e.g. Ctrl-C) and the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE, label: str | None = "error"):
        super().__init__(message)
        self.code, self.label = code, label


def _batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def run_scan(args) -> int:
    from ..manifest import BundleError, load_manifest
    from .sources import SourceError, list_items
    from .output import OutputError, ScanOutput, read_rows

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ScanStop("--threshold must be in [0, 1]")
    if (args.report or args.plot) and not args.labels:
        raise ScanStop("--report and --plot need --labels")
    if args.ray and not args.output:
        raise ScanStop("--ray needs --output (the rows go to Parquet, not stdout)")
    for name in ("workers", "batch_size", "part_rows"):
        if getattr(args, name) < 1:
            raise ScanStop(f"--{name.replace('_', '-')} must be at least 1")
    if args.cpus_per_worker <= 0 or args.gpus_per_worker < 0:
        raise ScanStop("--cpus-per-worker must be positive and --gpus-per-worker not negative")
    if args.safe_out and (problem := _unwritable(args.safe_out)):
        raise ScanStop(f"--safe-out {args.safe_out}: {problem}", 1)
    try:
        if args.ray:
            m = load_manifest(args.bundle, full_verify=args.full_verify, trusted_keys=args.trusted_key)
            g = m.gate_config
            gate = pipe = GateInfo(m, list(g.classes), list(g.safe_classes), g.threshold)
        else:
            from ..pipeline import Pipeline
            pipe = Pipeline.load(args.bundle, backend=args.backend, full_verify=args.full_verify,
                                 threads=args.threads, language_model=False, trusted_keys=args.trusted_key)
            gate = pipe
    except (BundleError, OSError, RuntimeError) as e:
        raise ScanStop(one_line(e))
    if args.threshold is not None:
        gate.threshold = args.threshold
    labels = None
    if args.labels:
        from ..metrics import LabelsError, read_labels
        try:
            labels = read_labels(args.labels, gate.classes, gate.safe_classes)
        except LabelsError as e:
            raise ScanStop(one_line(e))

    out = None
    if args.output:
        job = {"bundle": gate.manifest.data.get("integrity"), "bundle_name": gate.manifest.name,
               "threshold": float(gate.threshold), "rows": ROWS_VERSION}
        out = ScanOutput(args.output, job, gate.classes)
    if out is not None and out.complete:
        try:
            out.check_complete()
            rows = read_rows(args.output)
        except OutputError as e:
            raise ScanStop(one_line(e))
        except Exception as e:
            raise ScanStop(f"{args.output}: cannot read ({one_line(e)})")
        print(f"safeclip-scan: {args.output} is complete already: nothing to scan", file=sys.stderr)
        try:
            items = list(list_items(args.paths)) if args.safe_out else []
        except SourceError as e:
            raise ScanStop(one_line(e))
        return _finish(args, gate, rows, labels, items)
    try:
        items = list(list_items(args.paths))
        if out is not None:
            _drop_stale(out, out.open(), items, args.allow_private_hosts)
        done = out.done if out is not None else set()
    except (SourceError, OutputError) as e:
        raise ScanStop(one_line(e))
    except OSError as e:
        raise ScanStop(f"{args.output}: cannot update the partial output ({one_line(e)})")
    todo = [it for it in items if (it["source"], it["key"]) not in done]
    if out is not None and done:
        print(f"safeclip-scan: resuming {args.output}: {len(items) - len(todo)} of {len(items)} items already "
              "written", file=sys.stderr)
    t0 = time.perf_counter()
    progress = Progress(len(todo), "safeclip-scan")
    try:
        if out is None:
            rows = _scan_to_stdout(pipe, todo, args.batch_size, args.allow_private_hosts, progress)
        else:
            (_scan_ray if args.ray else _scan_local)(args, pipe, todo, out, progress)
            out.finish([(it["source"], it["key"]) for it in items])
            rows = read_rows(args.output)
    except KeyboardInterrupt:
        if out is not None:
            out.close()
            raise ScanStop(f"interrupted: {len(out.done)} rows are in {out.partial}; run the same command "
                           "again to resume", EXIT_INTERRUPTED, None) from None
        raise ScanStop("interrupted", EXIT_INTERRUPTED, None) from None
    except OutputError as e:
        raise ScanStop(one_line(e), 1, None) from None
    except Exception as e:              # Ray failures, a full disk: one line, the rows written so far stay
        if out is not None:
            out.close()
        raise ScanStop(one_line(e), 1) from None
    finally:
        progress.close()
    dt = time.perf_counter() - t0
    if todo:                            # this run's items; _finish counts every row of the output
        failed = f"; {progress.failed} failed" if progress.failed else ""
        print(f"safeclip-scan: gated {len(todo) - progress.failed} of {plural(len(todo), 'item')} in {dt:.1f} s "
              f"({len(todo) / max(dt, 1e-9):.1f} items/s){failed}"
              + (f"; wrote {args.output}" if out is not None else ""), file=sys.stderr)
    return _finish(args, gate, rows, labels, items)


ROWS_VERSION = 2                     # rows carry sha256 + stat (output.py); older partial outputs are not mixed in


def _unwritable(path: str) -> str | None:
    """Why a new file cannot be created beside ``path`` (tried: a permission check is wrong for root), or None."""
    import os
    import tempfile
    from pathlib import Path

    folder = Path(path).parent
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".probe", dir=folder)
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror or one_line(e)})"
    os.close(fd)
    os.unlink(probe)
    return None


def _drop_stale(out, written: dict, items: list[dict], allow_private_hosts: bool) -> None:
    """Before resuming: drop the rows of items no longer listed, and of items whose content is not what was
    gated (they are gated again)."""
    from .sources import ItemReader, unchanged

    listed = {(it["source"], it["key"]): it for it in items}
    reader = ItemReader(allow_private_hosts=allow_private_hosts)
    try:
        gone = {i for i in written if i not in listed}
        changed = {i for i, r in written.items() if i in listed and not unchanged(r, listed[i], reader)}
    finally:
        reader.close()
    if gone or changed:
        out.drop(gone | changed)
        print(f"safeclip-scan: {len(gone)} rows of items no longer listed dropped; {len(changed)} items changed "
              "since they were gated: gating them again", file=sys.stderr)


def _current_safe(rows: list[dict], items: list[dict], allow_private_hosts: bool) -> tuple[list[dict], int]:
    """The rows ``--safe-out`` may list: safe, still listed, content unchanged; and how many safe rows were not."""
    from .sources import ItemReader, unchanged

    listed = {(it["source"], it["key"]): it for it in items}
    reader = ItemReader(allow_private_hosts=allow_private_hosts)
    keep, left_out = [], 0
    try:
        for r in rows:
            if r["error"] is not None or r["flagged"] is not False:
                continue
            it = listed.get((r["source"], r["key"]))
            if it is not None and unchanged(r, it, reader):
                keep.append(r)
            else:
                left_out += 1
    finally:
        reader.close()
    return keep, left_out


def _tick(progress, rows: list[dict]) -> None:
    progress.add(len(rows), sum(r["error"] is not None for r in rows))


def _scan_to_stdout(pipe, items: list, batch_size: int, allow_private_hosts: bool, progress) -> list[dict]:
    from . import gating
    from .output import json_record, make_row
    from .sources import ItemReader

    reader, rows = ItemReader(allow_private_hosts=allow_private_hosts), []
    for batch in _batches(items, batch_size):
        new = []
        for it, (v, e) in zip(batch, gating.gate_items(pipe, batch, reader)):
            progress.write(json.dumps(json_record(it, v, e)))
            new.append(make_row(it, v, e))
        rows.extend(new)
        _tick(progress, new)
    reader.close()
    return rows


def _scan_local(args, pipe, items: list, out, progress) -> None:
    from . import gating
    from .output import make_row
    from .sources import ItemReader

    reader, buf = ItemReader(allow_private_hosts=args.allow_private_hosts), []
    try:
        for batch in _batches(items, args.batch_size):
            new = [make_row(it, v, e) for it, (v, e) in zip(batch, gating.gate_items(pipe, batch, reader))]
            buf.extend(new)
            _tick(progress, new)
            if len(buf) >= args.part_rows:
                out.write(buf)
                buf = []
    finally:                         # also on Ctrl-C: the verdicts already computed are kept
        out.write(buf)
        reader.close()


def _scan_ray(args, gate, items: list, out, progress) -> None:
    from .ray_workers import ray_rows
    from ..signing import trusted_keys                # read here; the actors get the keys, not paths

    buf = []
    try:
        for rows in ray_rows(args.bundle, items, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                             gpus_per_worker=args.gpus_per_worker, batch_size=args.batch_size,
                             threshold=args.threshold, backend=args.backend, address=args.ray_address,
                             allow_private_hosts=args.allow_private_hosts,
                             trusted_keys=trusted_keys(args.trusted_key)):
            buf.extend(rows)
            _tick(progress, rows)
            if len(buf) >= args.part_rows:
                out.write(buf)
                buf = []
    finally:
        out.write(buf)


def _finish(args, gate, rows: list[dict], labels, items: list[dict]) -> int:
    from .output import write_safe

    n = len(rows)
    n_err = sum(r["error"] is not None for r in rows)
    n_flag = sum(bool(r["flagged"]) for r in rows)
    print(f"safeclip-scan: {plural(n, 'item')}: {n - n_err} gated ({n_flag} flagged), {n_err} failed "
          f"(threshold {gate.threshold:g})", file=sys.stderr)
    code = EXIT_OK if n and not n_err else EXIT_SOME_FAILED if n else EXIT_STOPPED
    if args.safe_out:
        safe, left_out = _current_safe(rows, items, args.allow_private_hosts)
        if left_out:
            print(f"safeclip-scan: {left_out} images gated safe have changed or are gone since: left out of "
                  f"{args.safe_out} (scan them again)", file=sys.stderr)
        try:
            k = write_safe(safe, args.safe_out)
        except OSError as e:
            raise ScanStop(f"cannot write --safe-out {args.safe_out} ({one_line(e)})", 1) from None
        print(f"safeclip-scan: wrote the {k} safe images to {args.safe_out}", file=sys.stderr)
    if labels is not None:
        from .sources import display_name
        records = []
        for r in rows:
            rec = {"path": display_name(r)}
            if r["error"] is not None:
                rec["error"] = r["error"]
            else:
                probs = r["probs"] or {}
                rec.update(flagged=r["flagged"], category=r["category"], score=r["score"],
                           probs=[float("nan") if probs.get(c) is None else probs[c] for c in gate.classes]
                           if probs else None)
            records.append(rec)
        return report_labels(args, gate, records, labels) or code
    return code


def report_labels(args, pipe, records: list[dict], labels: dict[str, str]) -> int:
    """Join the scan's records with the labels by resolved path; print and write the metrics."""
    from pathlib import Path

    from ..metrics import confusion_text, evaluate, sweep, sweep_inputs

    by_path = {str(Path(r["path"]).resolve()): r for r in records if "error" not in r}
    joined = []
    for path, label in labels.items():
        r = by_path.get(str(Path(path).resolve()))
        if r is not None:
            joined.append({**r, "label": label})
    missing = len(labels) - len(joined)
    if not joined:
        raise ScanStop("no scanned image appears in the labels file", 1)
    m = evaluate(joined, pipe.classes, pipe.safe_classes)
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    print(f"labelled {m['n']} (toxic {m['n_toxic']}, safe {m['n_safe']}); not scanned: {missing}", file=sys.stderr)
    print(f"DSR {pct(m['dsr'])}  FPR {pct(m['fpr'])}  precision {pct(m['precision'])}  F1 {pct(m['f1'])}",
          file=sys.stderr)
    print("confusion (rows: label, columns: verdict)", file=sys.stderr)
    print(confusion_text(m["confusion"]), file=sys.stderr)
    rows = sweep(*sweep_inputs(joined, pipe.classes, pipe.safe_classes))
    if args.report:
        from ..manifest import atomic_write_text
        atomic_write_text(args.report, json.dumps({"bundle": str(args.bundle), "threshold": pipe.threshold,
                                                   "metrics": m, "sweep": rows}, indent=2) + "\n")
    if args.plot:
        from ..metrics import plot_sweep
        try:
            plot_sweep(rows, args.plot, title=f"{pipe.manifest.name}: DSR / FPR by threshold")
        except ImportError as e:
            raise ScanStop(one_line(e), EXIT_USAGE) from None
    return 0
