"""``safeclip-scan --ray``: the same scan on Ray Data, one actor per worker (needs the ``[ray]`` extra).

The driver lists the items (``sources.list_items``: paths and shard references, no image bytes), leaves out
those the output already holds (``output.py``), and hands the rest to Ray Data as a dataset of items.
``map_batches`` runs them through a pool of ``GateWorker`` actors (``--workers`` of them, each with
``--cpus-per-worker`` CPUs and ``--gpus-per-worker`` GPUs): an actor opens the bundle once, vision+gate
graph only (``Pipeline.load(..., language_model=False)``), reads its batch's images itself (paths, shard
members, URLs: the workers must see the same paths as the driver, e.g. a shared file system), gates them
with ``gating.gate_items`` (the local scan's code) and returns result rows. The driver writes the rows it
receives as parts of the output (``ScanOutput.write``), so an interrupted job resumes where it stopped.

Failures: an unreadable image is an error row. A worker process that dies is restarted by Ray and the
batch it held is retried (Ray Data gives its actors ``max_restarts=-1`` and ``max_task_retries=-1``;
tests/test_scan_ray.py kills one mid-job); a batch's rows reach the driver once, and ``ScanOutput``
drops any row for an item already written.

Ray: ``address=None`` joins the cluster named by ``RAY_ADDRESS`` or starts a local one; an already
initialised Ray (a test, a notebook) is used as it is. The driver keeps the item list in memory (about
300 bytes an item): split a dataset of hundreds of millions of images into jobs of a few million (a
shard range each).
"""
from __future__ import annotations

import math
from pathlib import Path


class GateWorker:
    """A Ray Data actor: one vision+gate session, ``__call__(items: pyarrow.Table) -> rows: pyarrow.Table``."""

    def __init__(self, bundle: str, threshold: float | None = None, threads: int | None = None,
                 backend: str = "auto", allow_private_hosts: bool = False, trusted_keys=None):
        from ..pipeline import Pipeline
        from .sources import ItemReader

        self.pipe = Pipeline.load(bundle, backend=backend, threads=threads, language_model=False,
                                  trusted_keys=trusted_keys)
        if threshold is not None:
            self.pipe.threshold = threshold
        self.reader = ItemReader(allow_private_hosts)

    def __call__(self, batch):
        from . import gating
        from .output import make_row, rows_table

        items = batch.to_pylist()
        results = gating.gate_items(self.pipe, items, self.reader)
        return rows_table([make_row(it, v, e) for it, (v, e) in zip(items, results)], self.pipe.classes)


def ray_rows(bundle: str | Path, items: list[dict], *, workers: int = 1, cpus_per_worker: float = 1.0,
             gpus_per_worker: float = 0.0, batch_size: int = 16, threshold: float | None = None,
             backend: str = "auto", address: str | None = None, allow_private_hosts: bool = False,
             progress: bool = False, worker: type = GateWorker, trusted_keys=None):
    """Yield lists of result rows (``output.make_row`` dicts) for ``items``, gated on Ray. ``worker``: the
    actor class (a ``GateWorker`` subclass; ``scripts/bench_scan.py`` times batches with one)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'safeclip-edge[ray]'") from None
    if not items:
        return
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.verbose_stats_logs = False
    # enough blocks to keep every actor busy; at most 16 batches a block, so a retried block (a worker died)
    # redoes little and rows reach the driver (and the output's parts) as the job goes
    blocks = max(1, min(len(items) // batch_size, 32 * workers), math.ceil(len(items) / (16 * batch_size)))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    threads = max(1, math.floor(cpus_per_worker)) if gpus_per_worker == 0 else None
    ds = ds.map_batches(worker, batch_format="pyarrow", batch_size=batch_size,
                        fn_constructor_kwargs=dict(bundle=str(Path(bundle).resolve()), threshold=threshold,
                                                   threads=threads, backend=backend,
                                                   allow_private_hosts=allow_private_hosts,
                                                   trusted_keys=trusted_keys),
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
                        num_gpus=gpus_per_worker or None)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield table.to_pylist()
