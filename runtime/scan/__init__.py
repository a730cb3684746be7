"""``safeclip-scan``: screen many images with a bundle's vision+gate graph (no language model), locally or on Ray.

* ``cli.py``: the command line (``safeclip-scan``, ``main``);
* ``job.py``: the driver: list, skip what the output holds, gate, print or write, ``--labels``/``--safe-out``,
  exit status;
* ``sources.py``: what a SOURCE lists (folders, file lists, Parquet and WebDataset shards, URLs) as small
  items, reading an item's bytes, and whether an item still holds what was gated (provenance);
* ``gating.py``: a batch of items through the vision+gate graph, one verdict or error each;
* ``output.py``: the JSON line per item, and ``--output``'s Parquet rows (resumable, exactly once, complete
  only at the end) and ``--safe-out``;
* ``ray_workers.py``: ``--ray``, the same gating in Ray Data actors (needs the ``[ray]`` extra).

Importing this package imports none of them (pyarrow and Ray load only where they are used).
"""
