"""Dataset screening throughput: the local scan and ``safeclip-scan --ray`` with 1 and 2 workers, one command.

    python scripts/bench_scan.py --bundle engines/demo                              # ~2 min on 2 loaded cores
    python scripts/bench_scan.py --bundle engines/demo --bundle /tmp/vitl --images 400 --images 24
    python scripts/bench_scan.py --quick --bundle engines/demo                      # seconds: checks the script

For each bundle: ``--images`` synthetic images (noise and shapes, JPEG, ``--size`` px) in a temporary folder,
then, each run on CPU with one ONNX Runtime thread per worker so the workers do not fight over threads:

* ``per-image``: the scan as it was before batching (``Pipeline.gate`` one image at a time): the reference
  verdicts, and images/s;
* ``local``: ``gating.gate_items`` in batches of ``--batch-size`` in this process (what ``safeclip-scan
  --output`` runs without ``--ray``);
* ``ray-1``, ``ray-2``: ``ray_workers.ray_rows`` on a local Ray (``num_cpus=2``) with 1 and 2 actors of 1 CPU
  each. ``total`` counts from submitting the job to its last row at the driver (Ray Data start, actor start
  and bundle load included); ``steady`` counts from the first batch's start to the last batch's end on the
  workers (each batch stamps its wall-clock span), the rate a long job runs at once its actors are up.

The scaling ratio is ray-2 / ray-1 (steady). ``CPU ms/image`` is the CPU time the gating process(es) used
per image (``time.process_time``; for Ray summed over the batches), and ``cores used`` that CPU time over the
steady wall time: how many of the machine's cores the workers actually got. Verdicts: every image's (flagged, category) of each run equals
the per-image reference, and the largest score difference is reported. ``os.getloadavg()`` is recorded at
start and end: other processes share the machine's cores. Prints a Markdown table; writes JSON (default
``bench-results/bench_scan.json``). Needs the ``[ray]`` extra.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        c = rng.integers(0, 256, 3, dtype=np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        arr[y0: y0 + size // 3, x0: x0 + size // 3] = c
        p = folder / f"img_{i:05d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def per_image(bundle: str, paths: list[Path]) -> dict:
    from safeclip.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=1, language_model=False)
    pipe.gate(paths[0])                                            # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    verdicts = {str(p): pipe.gate(p) for p in paths}
    dt = time.perf_counter() - t0
    return {"seconds": dt, "images_per_s": len(paths) / dt,
            "cpu_ms_per_image": 1e3 * (time.process_time() - c0) / len(paths),
            "verdicts": {k: (v.flagged, v.category, v.score) for k, v in verdicts.items()}}


def local(bundle: str, items: list[dict], batch: int) -> dict:
    from safeclip.runtime.pipeline import Pipeline
    from safeclip.runtime.scan.gating import gate_items
    from safeclip.runtime.scan.sources import ItemReader

    pipe = Pipeline.load(bundle, threads=1, language_model=False)
    reader = ItemReader()
    gate_items(pipe, items[:1], reader)                            # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    out = {}
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        for it, (v, e) in zip(chunk, gate_items(pipe, chunk, reader)):
            out[it["path"]] = None if v is None else (v.flagged, v.category, v.score)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "images_per_s": len(items) / dt,
            "cpu_ms_per_image": 1e3 * (time.process_time() - c0) / len(items), "verdicts": out}


def timed_worker():
    """A GateWorker that stamps each batch's rows with its wall-clock start and end (this class is defined in
    ``__main__``, so Ray ships it by value) in an extra ``bench`` column the driver strips again."""
    from safeclip.runtime.scan.ray_workers import GateWorker

    class TimedWorker(GateWorker):
        def __call__(self, batch):
            import pyarrow as pa
            t0, c0 = time.time(), time.process_time()
            out = super().__call__(batch)
            stamp = json.dumps([t0, time.time(), os.getpid(), time.process_time() - c0])
            return out.append_column("bench", pa.array([stamp] * out.num_rows))

    return TimedWorker


def on_ray(bundle: str, items: list[dict], workers: int, batch: int) -> dict:
    from safeclip.runtime.scan.ray_workers import ray_rows

    t0 = time.perf_counter()
    out, stamps = {}, set()
    for rows in ray_rows(bundle, items, workers=workers, cpus_per_worker=1.0, batch_size=batch,
                         worker=timed_worker()):
        for r in rows:
            stamps.add(r.pop("bench"))
            out[r["path"]] = None if r["error"] else (r["flagged"], r["category"], r["score"])
    t1 = time.perf_counter()
    spans = [json.loads(s) for s in stamps]
    gating = max(e for _, e, _, _ in spans) - min(s for s, _, _, _ in spans)
    cpu = sum(c for *_, c in spans)
    return {"seconds": t1 - t0, "images_per_s": len(items) / (t1 - t0),
            "gating_s": gating, "steady_images_per_s": len(items) / gating, "batches": len(spans),
            "worker_pids": len({p for _, _, p, _ in spans}), "worker_cpu_s": cpu,
            "cpu_ms_per_image": 1e3 * cpu / len(items), "cores_used": cpu / gating, "verdicts": out}


def compare(ref: dict, got: dict) -> dict:
    same = all(got.get(k) is not None and got[k][:2] == v[:2] for k, v in ref.items())
    diff = max((abs(got[k][2] - v[2]) for k, v in ref.items() if got.get(k)), default=0.0)
    return {"verdicts_identical": bool(same and len(got) == len(ref)), "max_score_diff": float(diff)}


def bench_bundle(bundle: str, n: int, size: int, batch: int, work: Path) -> dict:
    from safeclip.runtime.manifest import load_manifest
    from safeclip.runtime.scan.sources import list_items

    m = load_manifest(bundle)
    folder = work / f"images-{m.name}"
    paths = make_images(folder, n, size)
    items = list(list_items([str(folder)]))
    res = {"bundle": bundle, "name": m.name, "images": n, "image_px": size, "batch_size": batch,
           "vision_graph_bytes": sum(os.path.getsize(m.path(f)) for f in m.files if f.startswith("vision"))}
    print(f"[{m.name}] per-image reference ...", file=sys.stderr, flush=True)
    ref = per_image(bundle, paths)
    runs = {"per-image": ref}
    print(f"[{m.name}] local batched ...", file=sys.stderr, flush=True)
    runs["local"] = local(bundle, items, batch)
    for w in (1, 2):
        print(f"[{m.name}] ray, {w} worker(s) ...", file=sys.stderr, flush=True)
        runs[f"ray-{w}"] = on_ray(bundle, items, w, batch)
    ref_verdicts = ref["verdicts"]
    for r in runs.values():
        r.update(compare(ref_verdicts, r.pop("verdicts")))
    a, b = runs["ray-1"].get("steady_images_per_s"), runs["ray-2"].get("steady_images_per_s")
    res["runs"] = runs
    res["scaling_ratio_steady"] = b / a if a and b else None
    res["scaling_ratio_total"] = runs["ray-2"]["images_per_s"] / runs["ray-1"]["images_per_s"]
    return res


def table(results: list[dict]) -> str:
    lines = ["| bundle | run | images | total s | images/s (total) | images/s (steady) | gating s | "
             "CPU ms/image | cores used | verdicts = per-image | max score diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for name, r in res["runs"].items():
            steady, first = r.get("steady_images_per_s"), r.get("gating_s")
            steady = "" if steady is None else f"{steady:.2f}"
            first = "" if first is None else f"{first:.1f}"
            same = "yes" if r["verdicts_identical"] else "NO"
            cores = "" if "cores_used" not in r else f"{r['cores_used']:.2f}"
            lines.append(f"| {res['name']} | {name} | {res['images']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} "
                         f"| {steady} | {first} | {r['cpu_ms_per_image']:.0f} | {cores} | {same} | "
                         f"{r['max_score_diff']:.2g} |")
        s = res["scaling_ratio_steady"]
        s = "" if s is None else f"{s:.2f}x"
        lines.append(f"| {res['name']} | ray-2 / ray-1 | | | {res['scaling_ratio_total']:.2f}x | {s} | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", action="append", required=True, help="bundle folder (repeat for more)")
    p.add_argument("--images", type=int, action="append", help="images per bundle (repeat, in --bundle order; "
                   "default 240)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="24 images: checks the script, not a measurement")
    p.add_argument("--out", type=Path, default=Path("bench-results/bench_scan.json"))
    args = p.parse_args(argv)
    counts = args.images or []
    counts = [24 if args.quick else (counts[i] if i < len(counts) else (counts[-1] if counts else 240))
              for i in range(len(args.bundle))]
    import ray

    load0 = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_scan-") as tmp:
            for bundle, n in zip(args.bundle, counts):
                results.append(bench_bundle(bundle, n, args.size, args.batch_size, Path(tmp)))
    finally:
        ray.shutdown()
    doc = {"machine": {"cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg()},
           "ray": ray.__version__, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(results))
    print(f"\nload average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load0)}, at end "
          f"{tuple(round(x, 2) for x in doc['machine']['loadavg_end'])} on {os.cpu_count()} CPUs; "
          f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
