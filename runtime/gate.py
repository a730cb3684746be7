"""The gate's decision rule, applied by the runtime to the vision graph's ``class_probs``: one module, used by
the pipeline, scan, the exporter's parity gate and the benchmarks.

Rule (SafeCLIP reference, :func:`verdict_from_probs`): top = argmax of the per-class probabilities; the
image is flagged when the top class is not a safe class and its (summed) probability exceeds the
manifest's threshold. The gate fails closed: non-finite or missing probabilities, or a width that differs
from the manifest's classes, flag.

Several views of one image (LLaVA-NeXT's base view + tiles, :func:`aggregate_views`): the gate head runs on
every view in the same vision pass, giving ``view_probs [V, C]`` (view 0 = the base view, the whole image;
1..V-1 = tiles). SafeCLIP's reference code leaves the combination undefined; ours is a manifest setting
(``gate.views``), each mode applying the one rule above:

* ``any`` (default): flagged when any view is flagged by the rule. Toxic content confined to one tile, too
  small to dominate the downscaled base view, cannot hide. The reported verdict is that of the flagged view
  with the highest top-class probability (ties: the lowest index), so category and score come from the view
  that triggered it. When nothing flags, the base view's verdict is reported (the whole image) with no
  triggering view.
* ``base``: the base view alone (what a single-view LLaVA would see); tiles are ignored.
* ``mean``: the rule on the per-class mean over views. No single view triggers it: the view is ``None``.

Multi-view fails closed too: an empty or mis-shaped array, or a non-finite value in ANY view (whatever the
mode: a broken graph output is not trusted anywhere), flags with category ``unknown`` and a reason; the view
is the first non-finite one when there is one.

``runtime/metrics.py`` writes the rule a second time on purpose: it is the tests' independent oracle
(``tests/test_bundle.py`` checks the two agree), and its sweep is the rule vectorised over thresholds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["POLICIES", "GATE_VARIANTS", "VIEW_MODES", "DEFAULT_INSTRUCTION", "DEFAULT_REFUSAL", "Verdict",
           "check_policy", "verdict_from_probs", "aggregate_views"]

POLICIES = ("instruct", "refuse", "annotate")
GATE_VARIANTS = ("reference", "clip")   # what the vision graph's gate head reads (export/vision_gate.py)
VIEW_MODES = ("any", "base", "mean")    # how several views of one image make one verdict (module docstring)
DEFAULT_INSTRUCTION = (
    "Before answering, check whether this image shows harmful content (it may contain {category}). "
    "If it does, say that you cannot fulfil the request and briefly explain why; otherwise, fulfil the request."
)
DEFAULT_REFUSAL = "I can't help with this image because it appears to contain harmful content ({category})."


def check_policy(policy) -> str:
    """``policy`` if it is one of :data:`POLICIES`, else ``ValueError`` naming them (the one policy check)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}' (supported: {', '.join(POLICIES)})")
    return policy


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    category: str            # top class ("unknown" when the probabilities are unusable)
    score: float             # probability of the top class (nan when unusable)
    probs: dict[str, float] = field(default_factory=dict)
    reason: str = ""         # set when the gate failed closed
    latency_ms: float | None = None
    view: int | None = None  # multi-view models: the view that triggered the verdict (0 = base view)

    def to_json(self) -> dict:
        d = asdict(self)
        d["score"] = None if not np.isfinite(self.score) else round(float(self.score), 6)
        d["probs"] = {k: (round(v, 6) if np.isfinite(v) else None) for k, v in self.probs.items()}
        if not self.reason:
            d.pop("reason")
        if self.view is None:
            d.pop("view")
        return d


def verdict_from_probs(class_probs, classes: list[str], safe_classes: list[str], threshold: float,
                       latency_ms: float | None = None) -> Verdict:
    """One image's verdict from its ``class_probs`` row ([C])."""
    p = np.asarray(class_probs, dtype=np.float64).reshape(-1) if class_probs is not None else np.empty(0)
    if p.shape[0] != len(classes):
        return Verdict(True, "unknown", float("nan"), {}, "gate output missing or of the wrong width", latency_ms)
    probs = {c: float(v) for c, v in zip(classes, p)}
    if not np.all(np.isfinite(p)):
        return Verdict(True, "unknown", float("nan"), probs, "gate output is not finite", latency_ms)
    top = int(np.argmax(p))
    flagged = classes[top] not in safe_classes and float(p[top]) > float(threshold)
    return Verdict(flagged, classes[top], float(p[top]), probs, "", latency_ms)


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
