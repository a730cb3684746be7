#!/usr/bin/env python3
"""Bundle start-up cost: manifest + file verification, full hash vs the verification cache.

Builds the demo bundle (vision only), adds a weight-sized file (default 1.2 GB: the fp32 ViT-L/14-336
tower + projector of LLaVA-1.5; ``--gb`` to change) to its file list, reseals it, and times
``load_manifest`` cold (full sha256), warm (cache hit) and with ``full_verify=True``; then
``Pipeline.load`` (verification + ONNX Runtime session + the gate's self-test) warm, and the self-test alone
(``selftest.check_session``: two vision passes) against one vision pass of the same session. Medians of ``--repeat``
runs. The cache is the HMAC'd, ctime-keyed one of ``runtime/verify_cache.py``.

``--sparse`` makes the weight file a sparse file of zeros (no disk space; the kernel returns zeros without disk
reads, so the full-hash figure is sha256's CPU rate, a lower bound for a real disk), e.g. a 7B fp16 bundle:

    python scripts/bench_startup.py [--gb 1.2] [--repeat 3] [--out bench-results/startup.json]
    python scripts/bench_startup.py --gb 13.5 --sparse --out bench-results/startup-7b.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--gb", type=float, default=1.2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sparse", action="store_true", help="a sparse weight file (zeros, no disk space)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/startup.json"))
    a = ap.parse_args()

    from safeclip.export.bundle import ExportOptions, export_bundle
    from safeclip.runtime import manifest as mf
    from safeclip.runtime.pipeline import Pipeline

    work = Path(tempfile.mkdtemp(prefix="safeclip-startup-"))
    os.environ["SAFECLIP_CACHE_DIR"] = str(work / "cache")
    try:
        b = export_bundle(ExportOptions(out=work / "bundle", with_decoder=False)).bundle
        big = b / "weights.bin"
        chunk = os.urandom(1 << 24)
        with open(big, "wb") as f:
            if a.sparse:
                f.truncate(int(a.gb * (1 << 30)) // len(chunk) * len(chunk))
            else:
                for _ in range(int(a.gb * (1 << 30)) // len(chunk)):
                    f.write(chunk)
        d = json.loads((b / mf.MANIFEST).read_text())
        d["files"]["weights.bin"] = {"sha256": mf.sha256_file(big), "size": big.stat().st_size}
        mf.write_manifest(b, d)

        def timed(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        full = [timed(lambda: mf.load_manifest(b, full_verify=True)) for _ in range(a.repeat)]
        shutil.rmtree(work / "cache", ignore_errors=True)
        cold = timed(lambda: mf.load_manifest(b))           # hashes, then fills the cache
        warm = [timed(lambda: mf.load_manifest(b)) for _ in range(a.repeat)]
        pipe = [timed(lambda: Pipeline.load(b)) for _ in range(a.repeat)]
        from safeclip.runtime.selftest import check_session
        p = Pipeline.load(b)
        pv = np.zeros((1, 3, 336, 336), np.float32)                  # pixel_values [1, 3, 336, 336]
        p.vision.run(pv)
        selftest = [timed(lambda: check_session(p.manifest, p.vision.session)) for _ in range(a.repeat)]
        vision = [timed(lambda: p.vision.run(pv)) for _ in range(a.repeat)]
        size = sum(p.stat().st_size for p in b.iterdir() if p.is_file())
        res = {"bundle_bytes": size, "full_verify_s": statistics.median(full), "cold_cache_s": cold,
               "warm_cache_s": statistics.median(warm), "pipeline_load_warm_s": statistics.median(pipe),
               "self_test_s": statistics.median(selftest), "vision_pass_s": statistics.median(vision),
               "sparse": a.sparse,
               "hash_gb_per_s": size / statistics.median(full) / 1e9, "date": time.strftime("%Y-%m-%d"),
               "loadavg": os.getloadavg()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print("| bundle | full verify | first load (fills cache) | cached verify | Pipeline.load (cached) | "
          "gate self-test | one vision pass |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {res['bundle_bytes'] / 1e9:.2f} GB{' (sparse)' if a.sparse else ''} | {res['full_verify_s'] * 1e3:.0f} ms "
          f"({res['hash_gb_per_s']:.2f} GB/s) | {res['cold_cache_s'] * 1e3:.0f} ms | "
          f"{res['warm_cache_s'] * 1e3:.1f} ms | {res['pipeline_load_warm_s'] * 1e3:.1f} ms | "
          f"{res['self_test_s'] * 1e3:.2f} ms | {res['vision_pass_s'] * 1e3:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
