"""One verdict from several views of one image (LLaVA-NeXT's base view + tiles), and which view triggered it.

The gate head runs on every view in the same vision pass, giving ``view_probs [V, C]`` (view 0 = the base
view, the whole image; 1..V-1 = tiles). SafeCLIP's reference code leaves the combination undefined; ours is
a manifest setting:

* ``any`` (default): flagged when any view is flagged by the usual rule (``gate.verdict_from_probs``). Toxic
  content confined to one tile, too small to dominate the downscaled base view, cannot hide. The reported
  verdict is that of the flagged view with the highest top-class probability (ties: the lowest index), so
  category and score come from the view that triggered it. When nothing flags, the base view's verdict is
  reported (the whole image) with no triggering view.
* ``base``: the base view alone (what a single-view LLaVA would see); tiles are ignored.
* ``mean``: the rule on the per-class mean over views. No single view triggers it: the view is ``None``.

Fails closed: an empty or mis-shaped array, or a non-finite value in ANY view (whatever the mode: a broken
graph output is not trusted anywhere), flags with category ``unknown`` and a reason; the view is the first
non-finite one when there is one.
"""
from __future__ import annotations

import numpy as np

from .gate import Verdict, verdict_from_probs

__all__ = ["VIEW_MODES", "aggregate_views"]

VIEW_MODES = ("any", "base", "mean")


def aggregate_views(view_probs, classes: list[str], safe_classes: list[str], threshold: float,
                    mode: str = "any", latency_ms: float | None = None) -> tuple[Verdict, int | None]:
    """(verdict, index of the view that triggered it or None) for one image's ``view_probs [V, C]``."""
    if mode not in VIEW_MODES:
        raise ValueError(f"unknown view aggregation '{mode}' (supported: {', '.join(VIEW_MODES)})")
    p = None if view_probs is None else np.asarray(view_probs, dtype=np.float64)
    if p is None or p.ndim != 2 or p.shape[0] < 1 or p.shape[1] != len(classes):
        shape = None if p is None else p.shape
        return Verdict(True, "unknown", float("nan"), {}, f"gate output missing or of the wrong shape {shape}",
                       latency_ms), None
    bad = np.flatnonzero(~np.isfinite(p).all(axis=1))
    if bad.size:
        i = int(bad[0])
        probs = {c: float(v) for c, v in zip(classes, p[i])}
        return Verdict(True, "unknown", float("nan"), probs, f"gate output is not finite (view {i})",
                       latency_ms), i

    def rule(row) -> Verdict:
        return verdict_from_probs(row, classes, safe_classes, threshold, latency_ms=latency_ms)

    if mode == "base":
        v = rule(p[0])
        return v, (0 if v.flagged else None)
    if mode == "mean":
        return rule(p.mean(axis=0)), None
    verdicts = [rule(row) for row in p]
    flagged = [i for i, v in enumerate(verdicts) if v.flagged]
    if not flagged:
        return verdicts[0], None
    best = max(flagged, key=lambda i: (verdicts[i].score, -i))
    return verdicts[best], best
