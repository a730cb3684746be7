"""``safeclip-calibrate`` (no torch needed): choose the gate threshold on labelled images and write it into the
bundle.

    safeclip-calibrate --bundle engines/demo --labels labels.csv --max-fpr 0.03 [--dry-run]

The threshold that maximises the defense success rate under a false-positive bound (``metrics.calibrate``)
is written into the manifest, re-sealed atomically (re-signed with ``--sign-key`` for a signed bundle), the
old value kept in the gate's history. An image that cannot be read is skipped and reported.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .error_text import EXIT_INTERRUPTED, EXIT_USAGE, fail, one_line
from .signing import TRUSTED_KEY_HELP

PROG = "safeclip-calibrate"


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


def main(argv: list[str] | None = None) -> int:
    args = calibrate_parser().parse_args(argv)
    if not 0.0 < args.max_fpr <= 1.0:
        return fail(PROG, "--max-fpr must be in (0, 1]", EXIT_USAGE)
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
    except KeyboardInterrupt:
        return fail(PROG, "interrupted; nothing was written", EXIT_INTERRUPTED, label=None)
    except (BundleError, LabelsError, CalibrationError, RuntimeError, ValueError, OSError) as e:
        return fail(PROG, e, EXIT_USAGE)
    old = pipe.threshold
    if choice["threshold"] >= 1.0:       # the rule is p > threshold: a bundle with 1 would never flag (and not load)
        return fail(PROG, f"no threshold below 1 catches any labelled toxic image within FPR {pct(args.max_fpr)}: "
                          "the gate would never flag; nothing written", EXIT_USAGE)
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
    data, g = dict(m.data), m.gate_config
    if args.descriptors_out and g.descriptors is None:          # before anything is written
        return fail(PROG, f"{args.bundle}: its gate records no descriptor set: --descriptors-out cannot be "
                          "written; nothing written", EXIT_USAGE)
    gate = replace(g, threshold=float(choice["threshold"]), history=list(g.history or []) + [{
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "old_threshold": old, "new_threshold": choice["threshold"], "max_fpr": args.max_fpr,
        "labels": str(args.labels), "labels_sha256": hashlib.sha256(args.labels.read_bytes()).hexdigest(),
        "n_safe": choice["n_safe"], "n_toxic": choice["n_toxic"], "dsr": choice["dsr"], "fpr": choice["fpr"]}])
    data["gate"] = {**m.gate, **gate.to_json()}          # through the contract; keys it does not know stay
    write_manifest(args.bundle, data, sign_key=args.sign_key)
    print(f"wrote threshold {old:g} -> {choice['threshold']:.6g} into {args.bundle / 'manifest.json'}")
    if args.descriptors_out:
        from safeclip.descriptors import DescriptorSet

        from .manifest import atomic_write_text
        d = gate.descriptors
        dset = DescriptorSet(name=d["name"], version=d["version"], classes=tuple(d["sentences"]),
                             sentences=tuple(tuple(s) for s in d["sentences"].values()),
                             safe_classes=gate.safe_classes, default_threshold=gate.threshold,
                             description=d.get("description", ""), refusals=dict(gate.refusals))
        atomic_write_text(args.descriptors_out, json.dumps(dset.to_json(), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.descriptors_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
