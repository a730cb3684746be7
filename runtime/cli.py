"""Runtime command-line tools (no torch needed): ``safeclip-scan`` and ``safeclip-calibrate``.

    safeclip-scan --bundle engines/demo photos/ extra.jpg          # one JSON line per image on stdout
    safeclip-scan --bundle engines/demo data/ --labels labels.csv   # + DSR, FPR, precision, confusion
    safeclip-scan --bundle engines/demo shards/*.tar --output scan.parquet --safe-out safe.txt
    safeclip-scan --bundle engines/demo shards/*.parquet --ray --workers 8 --output scan/   # on Ray Data

A bad file is reported as ``{"path": ..., "error": ...}`` (an error row with ``--output``) and the scan goes
on; a bundle that does not verify stops everything before any image is read. Sources: ``scan.py``;
Parquet output, resuming and exactly-once: ``scan_out.py``; the driver: ``scan_job.py``; Ray: ``scan_ray.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .backends.pick import BACKEND_CHOICES, BACKEND_HELP
from .error_text import one_line
from .signing import TRUSTED_KEY_HELP
from .scan import IMAGE_EXTS, iter_images  # noqa: F401  (they live in scan.py; re-exported here)


class _DeprecatedFlag(argparse.Action):
    """A flag's old name: it still works (scripts keep running) and says on stderr which name replaces it."""

    def __init__(self, option_strings, dest, new: str, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, True)


def scan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safeclip-scan", description="Gate images with a bundle's vision graph "
                                "(no language model): one JSON object per image on stdout (or Parquet rows with "
                                "--output), a summary on stderr.")
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder (engines/<name>)")
    p.add_argument("paths", nargs="+", metavar="SOURCE", help="image files, folders (recursive), file lists "
                   "(.txt/.lst), Parquet (.parquet) or WebDataset (.tar) shards")
    p.add_argument("--labels", type=Path, help="CSV with columns path,label (label: a class, or safe/toxic)")
    p.add_argument("--report", type=Path, help="with --labels: write the metrics and threshold sweep as JSON")
    p.add_argument("--plot", type=Path, help="with --labels: write the DSR/FPR threshold sweep as a PNG")
    p.add_argument("--threshold", type=float, help="override the bundle's threshold for this scan")
    p.add_argument("--full-verify", action="store_true", help="hash every bundle file (no verification cache)")
    p.add_argument("--trusted-key", action="append", type=Path, default=None, metavar="PEM", help=TRUSTED_KEY_HELP)
    o = p.add_argument_group("output (scan_out: resumable, each image once, OUT appears only when complete)")
    o.add_argument("--output", metavar="OUT", help="write Parquet rows: OUT.parquet = one file, else a folder of "
                   "parts; an interrupted job run again resumes")
    o.add_argument("--safe-out", metavar="FILE", help="write the safe subset: a file list, or Parquet for a "
                   ".parquet name")
    o.add_argument("--part-rows", type=int, default=4096, help="rows per output part (default %(default)d)")
    r = p.add_argument_group("execution")
    r.add_argument("--batch-size", type=int, default=16, help="images per vision-graph run (default %(default)d)")
    r.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    r.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (local scan)")
    # one name with safeclip-serve's flag; the old --allow-private-hosts still works and warns
    r.add_argument("--allow-private-image-hosts", dest="allow_private_hosts", action="store_true",
                   help="URL items: also fetch from loopback and private addresses (refused by default)")
    r.add_argument("--allow-private-hosts", dest="allow_private_hosts", action=_DeprecatedFlag,
                   new="--allow-private-image-hosts", default=False, help=argparse.SUPPRESS)
    r.add_argument("--ray", action="store_true", help="gate on Ray Data (needs the [ray] extra and --output)")
    r.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a "
                   "local Ray)")
    r.add_argument("--workers", type=int, default=1, help="--ray: gate actors (default %(default)d)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="--ray: CPUs per actor (default %(default)g)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="--ray: GPUs per actor (default %(default)g)")
    return p


def scan_main(argv: list[str] | None = None) -> int:
    from .scan_job import run_scan
    return run_scan(scan_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(scan_main())


# --- safeclip-calibrate ---------------------------------------------------------------------------------
def calibrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safeclip-calibrate", description="Choose the gate threshold that maximises "
                                "the defense success rate under a false-positive bound, on your labelled images, "
                                "and write it into the bundle (re-sealed atomically, old value kept in history).")
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder (engines/<name>) whose threshold "
                   "is calibrated and written")
    p.add_argument("--labels", required=True, type=Path, help="CSV with columns path,label; an image that cannot "
                   "be read is skipped and reported")
    p.add_argument("--max-fpr", required=True, type=float, help="largest false-positive rate allowed, in (0, 1], "
                   "e.g. 0.03")
    p.add_argument("--compare", type=Path, help="a bundle of the other gate variant (--gate at export): report "
                   "its calibrated result; a bundle of the same variant is refused")
    p.add_argument("--descriptors-out", type=Path, help="also write the descriptor set with this threshold as "
                                                        "its default_threshold to FILE")
    p.add_argument("--dry-run", action="store_true", help="print the choice, change nothing")
    p.add_argument("--trusted-key", action="append", type=Path, default=None, metavar="PEM", help=TRUSTED_KEY_HELP)
    p.add_argument("--sign-key", type=Path, default=None, metavar="KEY.pem",
                   help="re-sign the manifest with this Ed25519 key (needed to change a signed bundle)")
    return p


def _gate_labelled(pipe, labels: dict[str, str]) -> list[dict]:
    """Each labelled image's record; one that cannot be read is skipped with a line on stderr (as scan does)."""
    from .image import ImageError

    records, skipped = [], 0
    for path, label in labels.items():
        try:
            v = pipe.gate(path)
        except (ImageError, OSError) as e:
            msg = one_line(e)          # an image error names its file already
            print(f"safeclip-calibrate: skipped {msg if path in msg else f'{path}: {msg}'}", file=sys.stderr)
            skipped += 1
            continue
        records.append({"path": path, "label": label, **v.to_json(),
                        "probs": [v.probs[c] for c in pipe.classes] if v.probs else None})
    if skipped:
        print(f"safeclip-calibrate: skipped {skipped} of {len(labels)} labelled images that cannot be read",
              file=sys.stderr)
    if not records:
        raise RuntimeError(f"none of the {len(labels)} labelled images could be read")
    return records


def _calibrated(pipe, labels, max_fpr):
    from .metrics import calibrate, evaluate, sweep, sweep_inputs

    records = _gate_labelled(pipe, labels)
    m = evaluate(records, pipe.classes, pipe.safe_classes)
    rows = sweep(*sweep_inputs(records, pipe.classes, pipe.safe_classes))
    return calibrate(rows, max_fpr, m["n_safe"], m["n_toxic"]), m


def calibrate_main(argv: list[str] | None = None) -> int:
    args = calibrate_parser().parse_args(argv)
    if not 0.0 < args.max_fpr <= 1.0:
        print("safeclip-calibrate: error: --max-fpr must be in (0, 1]", file=sys.stderr)
        return 2
    from .manifest import BundleError, load_manifest, write_manifest
    from .metrics import CalibrationError, LabelsError, read_labels
    from .pipeline import Pipeline

    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"
    try:
        if args.sign_key is not None:
            from .signing import load_signing_key
            args.sign_key = load_signing_key(args.sign_key)           # a bad key fails before any gating
        pipe = Pipeline.load(args.bundle, language_model=False, trusted_keys=args.trusted_key)   # the gate only
        if pipe.manifest.signed_by and args.sign_key is None and not args.dry_run:
            raise ValueError("the bundle is signed and a new threshold rewrites its manifest: give --sign-key KEY.pem "
                             "(a key the devices trust) to re-sign it, or --dry-run")
        labels = read_labels(args.labels, pipe.classes, pipe.safe_classes)
        choice, before = _calibrated(pipe, labels, args.max_fpr)
        alt = None
        if args.compare:
            other = Pipeline.load(args.compare, language_model=False, trusted_keys=args.trusted_key)
            if other.manifest.gate_config.variant == pipe.manifest.gate_config.variant:
                raise ValueError(f"--compare {args.compare}: its gate variant is "
                                 f"'{other.manifest.gate_config.variant}', the same as --bundle's; compare with a "
                                 "bundle exported with the other --gate")
            alt = (other.manifest.gate_config.variant, *_calibrated(other, read_labels(
                args.labels, other.classes, other.safe_classes), args.max_fpr))
    except (BundleError, LabelsError, CalibrationError, RuntimeError, ValueError, OSError) as e:
        print(f"safeclip-calibrate: error: {one_line(e)}", file=sys.stderr)
        return 2
    old = pipe.threshold
    if choice["threshold"] >= 1.0:       # the rule is p > threshold: a bundle with 1 would never flag (and not load)
        print(f"safeclip-calibrate: error: no threshold below 1 catches any labelled toxic image within FPR "
              f"{pct(args.max_fpr)}: the gate would never flag; nothing written", file=sys.stderr)
        return 2
    variant = pipe.manifest.gate_config.variant
    print(f"gate {variant}: {choice['n_toxic']} toxic / {choice['n_safe']} safe labelled images")
    print(f"  current threshold {old:g}: DSR {pct(before['dsr'])}, FPR {pct(before['fpr'])}")
    print(f"  chosen  threshold {choice['threshold']:.6g}: DSR {pct(choice['dsr'])}, FPR {pct(choice['fpr'])} "
          f"(bound {pct(args.max_fpr)}; 95% upper FPR {pct(choice['fpr_upper95'])})")
    if not choice["bound_confident"]:
        print("  note: the bound holds on these images but not with 95% confidence: label more safe images")
    if alt:
        print(f"  compare gate {alt[0]}: threshold {alt[1]['threshold']:.6g}, DSR {pct(alt[1]['dsr'])}, "
              f"FPR {pct(alt[1]['fpr'])}")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    import datetime
    import hashlib

    m = load_manifest(args.bundle, trusted_keys=args.trusted_key)         # re-verify right before writing
    data = dict(m.data)
    gate = dict(data["gate"])
    gate["history"] = list(gate.get("history", [])) + [{
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "old_threshold": old, "new_threshold": choice["threshold"], "max_fpr": args.max_fpr,
        "labels": str(args.labels), "labels_sha256": hashlib.sha256(args.labels.read_bytes()).hexdigest(),
        "n_safe": choice["n_safe"], "n_toxic": choice["n_toxic"], "dsr": choice["dsr"], "fpr": choice["fpr"]}]
    gate["threshold"] = float(choice["threshold"])
    data["gate"] = gate
    write_manifest(args.bundle, data, sign_key=args.sign_key)
    print(f"wrote threshold {old:g} -> {choice['threshold']:.6g} into {args.bundle / 'manifest.json'}")
    if args.descriptors_out:
        from safeclip.descriptors import DescriptorSet

        from .manifest import atomic_write_text
        d = gate["descriptors"]
        dset = DescriptorSet(name=d["name"], version=d["version"], classes=tuple(d["sentences"]),
                             sentences=tuple(tuple(s) for s in d["sentences"].values()),
                             safe_classes=tuple(gate["safe_classes"]), default_threshold=gate["threshold"],
                             description=d.get("description", ""), refusals=dict(gate.get("refusals") or {}))
        atomic_write_text(args.descriptors_out, json.dumps(dset.to_json(), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.descriptors_out}")
    return 0
