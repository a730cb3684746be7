"""Evaluation and threshold calibration for the toxic-image gate: numpy and the standard library only.

Supported:

* :func:`verdict` -- the gate's decision rule on one probability vector (the reference rule of SafeCLIP):
  ``top = argmax(probs)``; flagged when ``top`` is not a safe class AND ``probs[top] > threshold`` (strict).
  Any non-finite probability fails closed: ``(True, "unknown", nan)``. Written apart from the serving rule
  (``gate.py``) as the tests' independent oracle for it.
* :func:`read_labels` -- a ground-truth CSV with a header naming ``path`` and ``label`` (extra columns are
  ignored). A label is a class name (case-insensitive; returned in the gate's spelling) or one of the words
  ``safe`` / ``toxic``. A safe class means safe; any other class means toxic.
* :func:`evaluate` -- confusion counts, DSR (defense success rate = recall on toxic images), FPR, precision,
  F1, accuracy, per-label figures and a human-readable confusion matrix.
* :func:`sweep_inputs` / :func:`sweep` -- DSR and FPR at every threshold that changes a decision.
* :func:`calibrate` -- the threshold with the best DSR under an FPR bound, refusing label sets too small
  for the bound to mean anything.
* :func:`plot_sweep` -- a PNG of the sweep (needs matplotlib: the optional ``[eval]`` extra).

Zero denominators: every ratio whose denominator is zero is ``None`` (JSON ``null``), never 0 or NaN, so
"not measurable" cannot be read as "perfect" or "zero". The definitions:

* ``dsr = tp / (tp + fn)`` (toxic images flagged), ``None`` without toxic images;
* ``fpr = fp / (fp + tn)`` (safe images flagged), ``None`` without safe images;
* ``precision = tp / (tp + fp)``, ``None`` when nothing was flagged;
* ``f1 = 2 tp / (2 tp + fp + fn)`` (equal to the harmonic mean of precision and DSR where both exist),
  ``None`` only when that denominator is zero (no toxic images and no flags);
* ``accuracy = (tp + tn) / n``, ``None`` for no images.

Every dict these functions return holds only str, int, float (finite), bool, None, list and dict, so
``json.dumps(..., allow_nan=False)`` accepts it.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["LabelsError", "CalibrationError", "verdict", "read_labels", "is_toxic_label", "evaluate",
           "confusion_text", "sweep_inputs", "sweep", "calibrate", "fpr_upper_bound", "plot_sweep",
           "SAFE", "TOXIC", "UNKNOWN", "NOT_FLAGGED"]

SAFE, TOXIC = "safe", "toxic"          # generic ground-truth labels besides class names
UNKNOWN = "unknown"                    # category of a fail-closed verdict (non-finite probabilities)
NOT_FLAGGED = "not flagged"            # confusion-matrix column of images the gate let through
SCORE_SLACK = 1e-4                     # a summed float32 probability may exceed 1 by rounding


class LabelsError(ValueError):
    """A ground-truth labels file that cannot be used; the message names the file, line and problem."""


class CalibrationError(ValueError):
    """No threshold can be chosen honestly: too few labelled images, or none meets the FPR bound."""


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def _check_classes(classes: Sequence[str], safe_classes: Iterable[str]) -> set[str]:
    safe = set(safe_classes)
    if not safe <= set(classes):
        raise ValueError(f"safe classes {sorted(safe - set(classes))} are not among the classes {list(classes)}")
    return safe


def verdict(probs: np.ndarray, classes: list[str], safe_classes: list[str],
            threshold: float) -> tuple[bool, str, float]:
    """The gate's decision on one image: ``(flagged, top_class, top_prob)``, written independently of the
    serving rule (``gate.verdict_from_probs``) on purpose: it is the tests' oracle for that rule and for
    :func:`sweep` (``tests/test_bundle.py``, ``tests/test_metrics.py``). The runtime never calls it; a change
    of the rule is made in both, and the tests fail until they agree.

    ``probs``: [C] or [1, C] class probabilities in ``classes`` order (the vision graph's ``class_probs``).
    Ties in the argmax go to the first class in ``classes`` order (``np.argmax``). The comparison is
    strict and exact: ``float(probs[top]) > threshold``, the same value the sweep uses, so a threshold
    taken from :func:`calibrate` reproduces the calibrated decisions bit for bit.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2 and p.shape[0] == 1:
        p = p[0]                                   # [1, C] -> [C]
    if p.ndim != 1 or p.shape[0] != len(classes):
        raise ValueError(f"probs must have shape [{len(classes)}] or [1, {len(classes)}], got {list(np.shape(probs))}")
    safe = _check_classes(classes, safe_classes)
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        t = float("nan")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not np.all(np.isfinite(p)):
        return True, UNKNOWN, float("nan")         # fail closed
    top = int(np.argmax(p))
    score = float(p[top])
    return (classes[top] not in safe and score > t), classes[top], score


# ---------------------------------------------------------------------------------------------- labels

def _label_table(classes: Sequence[str], safe_classes: Iterable[str]) -> dict[str, str]:
    """{lower-cased accepted label: canonical label}; refuses class names that would make labels ambiguous."""
    safe = _check_classes(classes, safe_classes)
    table: dict[str, str] = {}
    for name in list(classes):
        key = name.lower()
        if key in table:
            raise ValueError(f"class names {table[key]!r} and {name!r} differ only in case: labels would be ambiguous")
        table[key] = name
    if SAFE in table and table[SAFE] not in safe:
        raise ValueError(f"class {table[SAFE]!r} is not a safe class, but the label 'safe' means safe")
    if TOXIC in table and table[TOXIC] in safe:
        raise ValueError(f"class {table[TOXIC]!r} is a safe class, but the label 'toxic' means toxic")
    table.setdefault(SAFE, SAFE)
    table.setdefault(TOXIC, TOXIC)
    return table


def is_toxic_label(label: str, safe_classes: Iterable[str]) -> bool:
    """True unless ``label`` is the word ``safe`` or a safe class. Validation is :func:`read_labels`' job."""
    return not (label == SAFE or label in set(safe_classes))


def read_labels(csv_path: str | Path, classes: list[str], safe_classes: list[str],
                base_dir: str | Path | None = None) -> dict[str, str]:
    """Read ground truth: ``{str(resolved image path): canonical label}``.

    The CSV (UTF-8, optional BOM) must start with a header line naming the columns ``path`` and ``label``
    (any case, any order, extra columns allowed). Blank lines are skipped. Relative paths are resolved
    against ``base_dir`` (default: the CSV's folder) with ``Path.resolve()``: resolve the scanned images'
    paths the same way to look them up. The same path twice with the same label is accepted once.
    Raises :class:`LabelsError` naming the file and line for: missing file, empty file, header without
    a needed column, header only, empty cell, unknown label, conflicting duplicate, image not on disk.
    """
    csv_path = Path(csv_path)
    table = _label_table(classes, safe_classes)
    if not csv_path.is_file():
        raise LabelsError(f"{csv_path}: labels file not found")
    base = Path(base_dir) if base_dir is not None else csv_path.parent
    allowed = ", ".join(list(classes) + [SAFE, TOXIC])
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = None
            for row in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue                                    # blank line
                if header is None:
                    header = [cell.strip().lower() for cell in row]
                    for col in ("path", "label"):
                        if header.count(col) != 1:
                            what = "lacks" if col not in header else "repeats"
                            raise LabelsError(f"{csv_path} line {line}: header {what} column '{col}' "
                                              f"(found: {', '.join(row)}); a header naming 'path' and 'label' is required")
                    i_path, i_label = header.index("path"), header.index("label")
                    continue
                raw_path = row[i_path].strip() if i_path < len(row) else ""
                raw_label = row[i_label].strip() if i_label < len(row) else ""
                if not raw_path or not raw_label:
                    raise LabelsError(f"{csv_path} line {line}: empty {'path' if not raw_path else 'label'} cell")
                label = table.get(raw_label.lower())
                if label is None:
                    raise LabelsError(f"{csv_path} line {line}: unknown label '{raw_label}' (expected one of: {allowed})")
                p = Path(raw_path)
                resolved = (p if p.is_absolute() else base / p).resolve()
                if not resolved.is_file():
                    raise LabelsError(f"{csv_path} line {line}: image '{raw_path}' not found (looked for {resolved})")
                key = str(resolved)
                if key in out and out[key] != label:
                    raise LabelsError(f"{csv_path} line {line}: '{raw_path}' labelled '{label}' but "
                                      f"'{out[key]}' on line {first_line[key]}")
                out.setdefault(key, label)
                first_line.setdefault(key, line)
    except UnicodeDecodeError as e:
        raise LabelsError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise LabelsError(f"{csv_path} line {reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise LabelsError(f"{csv_path}: empty file (expected a header line 'path,label' and one row per image)")
    if not out:
        raise LabelsError(f"{csv_path}: header but no labelled rows")
    return out


# ------------------------------------------------------------------------------------------ evaluation

def evaluate(records: list[dict], classes: list[str], safe_classes: list[str]) -> dict[str, Any]:
    """Score gate verdicts against ground truth.

    ``records``: ``[{"path", "label", "flagged": bool, "category": str, "probs": list | None}]``; ``label``
    is a canonical label (a class name, ``safe`` or ``toxic``); ``category`` of a flagged record is an
    unsafe class or ``unknown`` (fail-closed). ``probs`` is not used here (see :func:`sweep_inputs`).

    Returns counts and ratios (see the module docstring for the None rule), ``category_accuracy`` (of the
    flagged images labelled with an unsafe class, the fraction flagged under that very class), ``per_class``
    for each label present -- ``{"kind": "toxic", "n", "flagged", "dsr"[, "category_correct",
    "category_accuracy"]}`` or ``{"kind": "safe", "n", "flagged", "fpr"}`` -- and ``confusion``:
    ``{"labels": true labels (rows), "predicted": unsafe classes + "unknown" + "not flagged" (columns),
    "matrix": counts [rows][columns]}``; rows list only labels present, in class order then safe, toxic.
    """
    safe = _check_classes(classes, safe_classes)
    if UNKNOWN in classes or NOT_FLAGGED in classes:
        raise ValueError(f"class names '{UNKNOWN}' and '{NOT_FLAGGED}' are reserved for the confusion matrix")
    known = set(classes) | {SAFE, TOXIC}
    unsafe = [c for c in classes if c not in safe]
    columns = unsafe + [UNKNOWN, NOT_FLAGGED]
    col_of = {c: j for j, c in enumerate(columns)}
    rows: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        label, flagged, cat = r.get("label"), r.get("flagged"), r.get("category")
        where = f"record {i} ({r.get('path', '?')})"
        if label not in known:
            raise ValueError(f"{where}: unknown label {label!r}")
        if not isinstance(flagged, (bool, np.bool_)):
            raise ValueError(f"{where}: 'flagged' must be a bool, got {flagged!r}")
        if flagged and cat not in unsafe and cat != UNKNOWN:
            raise ValueError(f"{where}: flagged with category {cat!r}, which is not an unsafe class nor '{UNKNOWN}'")
        rows.setdefault(label, [0] * len(columns))[col_of[cat] if flagged else col_of[NOT_FLAGGED]] += 1

    order = [c for c in list(classes) + [SAFE, TOXIC] if c in rows]
    tp = fp = tn = fn = cat_ok = cat_flagged = n_unknown = 0
    per_class: dict[str, dict[str, Any]] = {}
    for label in order:
        counts = rows[label]
        n, missed = sum(counts), counts[col_of[NOT_FLAGGED]]
        flagged = n - missed
        n_unknown += counts[col_of[UNKNOWN]]
        if is_toxic_label(label, safe):
            tp, fn = tp + flagged, fn + missed
            entry: dict[str, Any] = {"kind": "toxic", "n": n, "flagged": flagged, "dsr": _ratio(flagged, n)}
            if label in unsafe:                            # a class name: was the category right?
                ok = counts[col_of[label]]
                cat_ok, cat_flagged = cat_ok + ok, cat_flagged + flagged
                entry.update(category_correct=ok, category_accuracy=_ratio(ok, flagged))
        else:
            fp, tn = fp + flagged, tn + missed
            entry = {"kind": "safe", "n": n, "flagged": flagged, "fpr": _ratio(flagged, n)}
        per_class[label] = entry
    n = tp + fp + tn + fn
    return {
        "n": n, "n_toxic": tp + fn, "n_safe": fp + tn, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "dsr": _ratio(tp, tp + fn), "fpr": _ratio(fp, fp + tn), "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn), "accuracy": _ratio(tp + tn, n),
        "category_accuracy": _ratio(cat_ok, cat_flagged), "n_unknown": n_unknown,
        "per_class": per_class,
        "confusion": {"labels": order, "predicted": columns, "matrix": [rows[l] for l in order]},
    }


def confusion_text(confusion: dict) -> str:
    """The confusion matrix of :func:`evaluate` as an aligned plain-text table (rows: true label)."""
    head = ["true \\ predicted"] + list(confusion["predicted"])
    body = [[lab] + [str(v) for v in row] for lab, row in zip(confusion["labels"], confusion["matrix"])]
    widths = [max(len(r[j]) for r in [head] + body) for j in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
    return "\n".join(fmt(r) for r in [head] + body)


# ------------------------------------------------------------------------------- sweep and calibration

def sweep_inputs(records: list[dict], classes: list[str],
                 safe_classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build :func:`sweep`'s inputs from records: ``(scores [N] float64, top_unsafe [N] bool, is_toxic [N] bool)``.

    ``score`` is the top class's probability exactly as :func:`verdict` compares it; missing (``None``) or
    non-finite probabilities give ``nan``, which the sweep flags at every threshold (fail closed).
    """
    safe = _check_classes(classes, safe_classes)
    n = len(records)
    scores, top_unsafe, toxic = np.full(n, np.nan), np.zeros(n, bool), np.zeros(n, bool)
    for i, r in enumerate(records):
        toxic[i] = is_toxic_label(r["label"], safe)
        if r.get("probs") is None:
            continue
        _, top, score = verdict(np.asarray(r["probs"]), classes, safe_classes, 0.0)
        scores[i], top_unsafe[i] = score, top not in safe
    return scores, top_unsafe, toxic


def sweep(scores: Sequence[float] | np.ndarray, top_unsafe: Sequence[bool] | np.ndarray,
          is_toxic: Sequence[bool] | np.ndarray) -> list[dict[str, Any]]:
    """DSR and FPR at every threshold that changes a decision.

    Inputs, one entry per image: ``scores`` [N] -- the top class's (summed) probability; ``top_unsafe`` [N]
    -- whether the top class is an unsafe class; ``is_toxic`` [N] -- the ground truth. At threshold ``t``
    an image is flagged iff ``top_unsafe and score > t``, or its score is non-finite (fail closed: flagged
    at every threshold). An image whose top class is safe is never flagged.

    Decisions only change at the scores themselves, so the rows are at ``{0, 1}`` plus every distinct
    score of a top-unsafe image strictly inside (0, 1); a row's decisions hold for every threshold from its
    own up to (excluding) the next row's. Rows are sorted by threshold; tp, fp (hence DSR, FPR) never
    increase along them. Each row: ``threshold, tp, fp, fn, tn, n_flagged, dsr, fpr, precision``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    u = np.asarray(top_unsafe, dtype=bool).reshape(-1)
    y = np.asarray(is_toxic, dtype=bool).reshape(-1)
    if not s.shape == u.shape == y.shape:
        raise ValueError(f"scores, top_unsafe and is_toxic must have one entry per image: {s.size}, {u.size}, {y.size}")
    bad = ~np.isfinite(s)
    fin = s[~bad]
    if fin.size and (fin.min() < 0.0 or fin.max() > 1.0 + SCORE_SLACK):
        raise ValueError(f"scores must be probabilities in [0, 1]; got range [{fin.min()}, {fin.max()}]")
    can_flag = u & ~bad
    inner = s[can_flag & (s > 0.0) & (s < 1.0)]
    thresholds = np.unique(np.concatenate([[0.0, 1.0], inner]))          # [T], sorted
    tox = np.sort(s[can_flag & y])
    ok = np.sort(s[can_flag & ~y])
    # flagged at t: score > t  ->  count = len - (number of scores <= t)
    tp = int((bad & y).sum()) + tox.size - np.searchsorted(tox, thresholds, side="right")   # [T]
    fp = int((bad & ~y).sum()) + ok.size - np.searchsorted(ok, thresholds, side="right")    # [T]
    n_toxic, n_safe = int(y.sum()), int((~y).sum())
    out = []
    for t, a, b in zip(thresholds.tolist(), tp.tolist(), fp.tolist()):
        out.append({"threshold": t, "tp": a, "fp": b, "fn": n_toxic - a, "tn": n_safe - b, "n_flagged": a + b,
                    "dsr": _ratio(a, n_toxic), "fpr": _ratio(b, n_safe), "precision": _ratio(a, a + b)})
    return out


def fpr_upper_bound(fp: int, n_safe: int, confidence: float = 0.95) -> float | None:
    """One-sided exact (Clopper-Pearson) upper confidence bound on a rate seen as ``fp`` out of ``n_safe``.

    The largest ``p`` with ``P(X <= fp | n_safe, p) >= 1 - confidence``; for ``fp = 0`` this is
    ``1 - (1 - confidence) ** (1 / n_safe)`` (about 3 / n_safe at 95 %: the "rule of three").
    """
    if n_safe <= 0:
        return None
    if not 0 <= fp <= n_safe:
        raise ValueError(f"fp must be in [0, n_safe={n_safe}], got {fp}")
    if fp == n_safe:
        return 1.0
    alpha = 1.0 - confidence
    log_c = [math.lgamma(n_safe + 1) - math.lgamma(i + 1) - math.lgamma(n_safe - i + 1) for i in range(fp + 1)]

    def cdf(p: float) -> float:
        lp, lq = math.log(p), math.log1p(-p)
        return math.fsum(math.exp(c + i * lp + (n_safe - i) * lq) for i, c in enumerate(log_c))

    lo, hi = fp / n_safe if fp else 0.0, 1.0
    for _ in range(60):                         # cdf falls as p rises: bisect cdf(p) = alpha
        mid = 0.5 * (lo + hi)
        if mid <= 0.0 or cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def calibrate(sweep_rows: list[dict], max_fpr: float, n_safe: int, n_toxic: int,
              min_safe: int | None = None) -> dict[str, Any]:
    """Pick the threshold with the highest DSR whose FPR on the labelled safe images is <= ``max_fpr``.

    Ties in DSR go to the highest threshold: the same toxic images are caught with the fewest flags
    (FPR never rises with the threshold). The row's threshold is exact (a flip point, see :func:`sweep`);
    ``threshold_range`` gives the interval ``[threshold, next)`` over which the decisions are identical.

    Refusal rule (:class:`CalibrationError`): with ``n_safe`` safe images FPR moves in steps of
    ``1 / n_safe``, so a bound below that step can only be met as "no false positive at all" and says
    nothing about the rate asked for. We require ``n_safe >= ceil(1 / max_fpr)`` -- enough safe images
    that one false positive is observable without breaking the bound -- or ``min_safe`` when that is
    stricter (it cannot loosen the rule), and at least one toxic image. Also refused: no threshold meets
    the bound (possible when safe images with non-finite probabilities are flagged at every threshold).

    The result reports ``fpr_upper95``, the 95 % one-sided upper bound on the true FPR given the observed
    count (:func:`fpr_upper_bound`), and ``bound_confident``: whether that bound is itself <= ``max_fpr``.
    A calibration that meets the bound on paper but not with confidence should be shown as such.
    """
    if not (isinstance(max_fpr, (int, float)) and 0.0 < max_fpr <= 1.0):
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr!r}")
    need = math.ceil(1.0 / max_fpr - 1e-9)     # 1 / 0.01 is 100.00000000000001 in some spellings
    if min_safe is not None:
        need = max(need, int(min_safe))
    if n_toxic < 1:
        raise CalibrationError("no labelled toxic image: DSR cannot be measured, nothing to calibrate for")
    if n_safe < need:
        raise CalibrationError(f"{n_safe} labelled safe images are too few to bound FPR at {max_fpr}: need at "
                               f"least {need} (with n safe images the smallest non-zero FPR is 1/n)")
    if not sweep_rows:
        raise ValueError("empty sweep: nothing to choose from")
    for r in sweep_rows:
        if r["tp"] + r["fn"] != n_toxic or r["fp"] + r["tn"] != n_safe:
            raise ValueError(f"sweep row at threshold {r['threshold']} counts {r['tp'] + r['fn']} toxic / "
                             f"{r['fp'] + r['tn']} safe images, not {n_toxic} / {n_safe}")
    rows = sorted(sweep_rows, key=lambda r: r["threshold"])
    feasible = [i for i, r in enumerate(rows) if r["fp"] / n_safe <= max_fpr]
    if not feasible:
        lowest = min(r["fp"] for r in rows)
        raise CalibrationError(f"no threshold keeps FPR <= {max_fpr}: at best {lowest} of {n_safe} safe images are "
                               f"flagged (images with non-finite probabilities are flagged at every threshold)")
    best_tp = max(rows[i]["tp"] for i in feasible)
    k = max(i for i in feasible if rows[i]["tp"] == best_tp)      # highest threshold among the best
    r = rows[k]
    upper = fpr_upper_bound(r["fp"], n_safe)
    return {
        "threshold": r["threshold"],
        "threshold_range": [r["threshold"], rows[k + 1]["threshold"] if k + 1 < len(rows) else None],
        "dsr": r["tp"] / n_toxic, "fpr": r["fp"] / n_safe,
        "tp": r["tp"], "fp": r["fp"], "fn": r["fn"], "tn": r["tn"],
        "n_safe": n_safe, "n_toxic": n_toxic, "max_fpr": max_fpr, "min_safe": need,
        "fpr_upper95": upper, "bound_confident": upper <= max_fpr,
    }


def plot_sweep(rows: list[dict], png_path: str | Path, title: str = "SafeCLIP gate: threshold sweep",
               chosen: float | None = None) -> Path:
    """Write a PNG: DSR against FPR (left) and DSR, FPR against the threshold (right).

    ``chosen`` marks a threshold (e.g. the calibrated one). Needs matplotlib (the ``[eval]`` extra);
    uses the object-oriented Agg API, so no global pyplot state is touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_sweep needs matplotlib: pip install 'safeclip-edge[eval]' "
                          "(or pip install matplotlib)") from e
    if not rows or any(r["dsr"] is None or r["fpr"] is None for r in rows):
        raise ValueError("plot_sweep needs sweep rows with both safe and toxic labelled images")
    rows = sorted(rows, key=lambda r: r["threshold"])
    t = [r["threshold"] for r in rows]
    dsr = [r["dsr"] for r in rows]
    fpr = [r["fpr"] for r in rows]
    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    roc, thr = fig.subplots(1, 2)
    roc.plot(fpr[::-1], dsr[::-1], "-", marker=".", markersize=3, color="tab:blue")   # operating points
    roc.set(xlabel="false-positive rate (safe images flagged)", ylabel="defense success rate (toxic flagged)",
            xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title="DSR vs FPR")
    thr.step(t, dsr, where="post", label="DSR")
    thr.step(t, fpr, where="post", label="FPR")
    thr.set(xlabel="threshold (top-class summed probability)", ylabel="rate", xlim=(0, 1), ylim=(-0.02, 1.02),
            title="rates vs threshold")
    if chosen is not None:
        thr.axvline(chosen, color="k", linestyle="--", linewidth=1, label=f"chosen {chosen:.4g}")
    thr.legend(loc="upper right")
    for ax in (roc, thr):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, format="png", dpi=100)
    return png_path
