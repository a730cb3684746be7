"""``safeclip-scan``'s command line (no torch needed).

    safeclip-scan --bundle engines/demo photos/ extra.jpg          # one JSON line per image on stdout
    safeclip-scan --bundle engines/demo data/ --labels labels.csv   # + DSR, FPR, precision, confusion
    safeclip-scan --bundle engines/demo shards/*.tar --output scan.parquet --safe-out safe.txt
    safeclip-scan --bundle engines/demo shards/*.parquet --ray --workers 8 --output scan/   # on Ray Data

A bad file is reported as ``{"path": ..., "error": ...}`` (an error row with ``--output``) and the scan goes
on; a bundle that does not verify stops everything before any image is read. The driver is ``job.py``; what
stops it (``job.ScanStop``) is reported here, in one line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..backends.pick import BACKEND_CHOICES, BACKEND_HELP
from ..error_text import fail
from ..signing import TRUSTED_KEY_HELP


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
    o = p.add_argument_group("output (resumable, each image once, OUT appears only when complete)")
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


def main(argv: list[str] | None = None) -> int:
    from .job import ScanStop, run_scan

    args = scan_parser().parse_args(argv)
    try:
        return run_scan(args)
    except ScanStop as e:
        return fail("safeclip-scan", str(e), e.code, e.label)


if __name__ == "__main__":
    sys.exit(main())
