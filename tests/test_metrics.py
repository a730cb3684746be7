"""Tests for safeclip.runtime.metrics: expected figures are worked out by hand in the comments, random cases
are checked against brute force built on verdict(), so the oracles are independent of the code under test."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from safeclip.runtime.metrics import (CalibrationError, LabelsError, calibrate, confusion_text, evaluate,
                                      fpr_upper_bound, is_toxic_label, plot_sweep, read_labels, sweep,
                                      sweep_inputs, verdict)

CLASSES = ["neutral", "porn", "blood", "gun"]
SAFE = ["neutral"]


def _json_ok(obj) -> None:
    json.dumps(obj, allow_nan=False)     # raises on NaN / numpy scalars


# ------------------------------------------------------------------------------------------------ verdict

def test_verdict_rule():
    assert verdict(np.array([0.1, 0.2, 0.05, 0.65]), CLASSES, SAFE, 0.6) == (True, "gun", 0.65)
    # strict ">": equal to the threshold is not flagged
    assert verdict(np.array([0.1, 0.2, 0.1, 0.6]), CLASSES, SAFE, 0.6)[0] is False
    # a safe top class is never flagged, however low the threshold
    assert verdict(np.array([0.97, 0.01, 0.01, 0.01]), CLASSES, SAFE, 0.0) == (False, "neutral", 0.97)
    # [1, C] as the graph emits it
    assert verdict(np.array([[0.0, 0.9, 0.05, 0.05]], np.float32), CLASSES, SAFE, 0.5)[:2] == (True, "porn")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_verdict_non_finite_fails_closed(bad):
    flagged, cat, score = verdict(np.array([0.9, bad, 0.0, 0.0]), CLASSES, SAFE, 0.6)
    assert flagged is True and cat == "unknown" and math.isnan(score)


def test_verdict_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        verdict(np.zeros(3), CLASSES, SAFE, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        verdict(np.zeros(4), CLASSES, SAFE, 1.5)
    with pytest.raises(ValueError, match="safe classes"):
        verdict(np.zeros(4), CLASSES, ["cat"], 0.5)


def test_is_toxic_label():
    assert is_toxic_label("gun", SAFE) and is_toxic_label("toxic", SAFE)
    assert not is_toxic_label("neutral", SAFE) and not is_toxic_label("safe", SAFE)


# --------------------------------------------------------------------------------------------- evaluate

def _rec(path, label, flagged, category):
    return {"path": path, "label": label, "flagged": flagged, "category": category, "probs": None}


HAND = [
    _rec("a", "gun", True, "gun"),          # TP, right category
    _rec("b", "gun", True, "blood"),        # TP, wrong category
    _rec("c", "gun", False, "neutral"),     # FN
    _rec("d", "porn", True, "porn"),        # TP, right category
    _rec("e", "toxic", True, "unknown"),    # TP by failing closed
    _rec("f", "neutral", False, "neutral"),  # TN
    _rec("g", "neutral", True, "gun"),      # FP
    _rec("h", "safe", False, "neutral"),    # TN
    _rec("i", "safe", False, "gun"),        # TN (top gun, under the threshold)
    _rec("j", "toxic", False, "neutral"),   # FN
]


def test_evaluate_hand_example():
    m = evaluate(HAND, CLASSES, SAFE)
    _json_ok(m)
    # toxic: a b c d e j = 6, safe: f g h i = 4; tp a b d e, fn c j, fp g, tn f h i
    assert (m["n"], m["n_toxic"], m["n_safe"]) == (10, 6, 4)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (4, 1, 3, 2)
    assert m["dsr"] == pytest.approx(4 / 6)
    assert m["fpr"] == pytest.approx(1 / 4)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))     # = 2PR/(P+R) = 2*.8*.6667/1.4667
    assert m["accuracy"] == pytest.approx(7 / 10)
    # class-labelled toxic images flagged: a (gun, right), b (gun, wrong), d (porn, right) -> 2/3
    assert m["category_accuracy"] == pytest.approx(2 / 3)
    assert m["n_unknown"] == 1
    pc = m["per_class"]
    assert list(pc) == ["neutral", "porn", "gun", "safe", "toxic"]
    assert pc["gun"] == {"kind": "toxic", "n": 3, "flagged": 2, "dsr": pytest.approx(2 / 3),
                         "category_correct": 1, "category_accuracy": 0.5}
    assert pc["porn"] == {"kind": "toxic", "n": 1, "flagged": 1, "dsr": 1.0,
                          "category_correct": 1, "category_accuracy": 1.0}
    assert pc["neutral"] == {"kind": "safe", "n": 2, "flagged": 1, "fpr": 0.5}
    assert pc["safe"] == {"kind": "safe", "n": 2, "flagged": 0, "fpr": 0.0}
    assert pc["toxic"] == {"kind": "toxic", "n": 2, "flagged": 1, "dsr": 0.5}
    cm = m["confusion"]
    assert cm["labels"] == ["neutral", "porn", "gun", "safe", "toxic"]
    assert cm["predicted"] == ["porn", "blood", "gun", "unknown", "not flagged"]
    assert cm["matrix"] == [[0, 0, 1, 0, 1],
                            [1, 0, 0, 0, 0],
                            [0, 1, 1, 0, 1],
                            [0, 0, 0, 0, 2],
                            [0, 0, 0, 1, 1]]
    text = confusion_text(cm).splitlines()
    assert len(text) == 6 and "not flagged" in text[0] and text[3].split() == ["gun", "0", "1", "1", "0", "1"]


def test_evaluate_zero_denominators_are_none():
    empty = evaluate([], CLASSES, SAFE)
    for k in ("dsr", "fpr", "precision", "f1", "accuracy", "category_accuracy"):
        assert empty[k] is None, k
    assert empty["confusion"]["matrix"] == []
    # only safe images, nothing flagged: FPR 0, accuracy 1, the rest unmeasurable
    only_safe = evaluate([_rec("x", "neutral", False, "neutral"), _rec("y", "safe", False, "neutral")],
                         CLASSES, SAFE)
    assert (only_safe["fpr"], only_safe["accuracy"]) == (0.0, 1.0)
    assert only_safe["dsr"] is None and only_safe["precision"] is None and only_safe["f1"] is None
    # only toxic, all missed: DSR 0, F1 = 0/(0+0+2) = 0, no flags -> precision None, no safe -> FPR None
    missed = evaluate([_rec("x", "gun", False, "neutral"), _rec("y", "toxic", False, "neutral")], CLASSES, SAFE)
    assert (missed["dsr"], missed["f1"], missed["accuracy"]) == (0.0, 0.0, 0.0)
    assert missed["precision"] is None and missed["fpr"] is None
    assert missed["per_class"]["gun"]["category_accuracy"] is None     # never flagged
    _json_ok(missed)


def test_evaluate_rejects_inconsistent_records():
    with pytest.raises(ValueError, match="unknown label"):
        evaluate([_rec("x", "cat", False, "neutral")], CLASSES, SAFE)
    with pytest.raises(ValueError, match="not an unsafe class"):
        evaluate([_rec("x", "gun", True, "neutral")], CLASSES, SAFE)
    with pytest.raises(ValueError, match="bool"):
        evaluate([_rec("x", "gun", "yes", "gun")], CLASSES, SAFE)


# ------------------------------------------------------------------------------------------------ sweep

def test_sweep_hand_example():
    # A .9 unsafe toxic | B .7 unsafe safe | C .7 unsafe toxic | D .4 unsafe toxic
    # E .95 safe-top safe | F .8 safe-top toxic (never flagged) | G nan safe (always flagged)
    s = [0.9, 0.7, 0.7, 0.4, 0.95, 0.8, np.nan]
    u = [True, True, True, True, False, False, False]
    y = [True, False, True, True, False, True, False]
    rows = sweep(s, u, y)
    _json_ok(rows)
    assert [r["threshold"] for r in rows] == [0.0, 0.4, 0.7, 0.9, 1.0]
    # t=0: A B C D G; t=.4: A B C G; t=.7: A G; t=.9 and 1: G
    assert [r["tp"] for r in rows] == [3, 2, 1, 0, 0]
    assert [r["fp"] for r in rows] == [2, 2, 1, 1, 1]
    assert [r["dsr"] for r in rows] == [0.75, 0.5, 0.25, 0.0, 0.0]
    assert [r["fpr"] for r in rows] == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert all(r["tp"] + r["fn"] == 4 and r["fp"] + r["tn"] == 3 for r in rows)

    # need ceil(1/0.34) = 3 safe images: OK. Feasible rows .7 .9 1 (FPR 1/3); best tp 1 at .7
    cal = calibrate(rows, max_fpr=0.34, n_safe=3, n_toxic=4)
    _json_ok(cal)
    assert cal["threshold"] == 0.7 and cal["threshold_range"] == [0.7, 0.9]
    assert (cal["dsr"], cal["fpr"], cal["tp"], cal["fp"]) == (0.25, pytest.approx(1 / 3), 1, 1)
    assert cal["min_safe"] == 3 and cal["bound_confident"] is False      # 1 of 3 proves nothing
    # a loose bound (need 2): everything feasible, best at t=0
    assert calibrate(rows, max_fpr=0.7, n_safe=3, n_toxic=4)["threshold"] == 0.0


def test_calibrate_tie_goes_to_higher_threshold():
    # toxic .5; safe .3 and .8 -> t=0: tp1 fp2 | t=.3: tp1 fp1 | t=.5: tp0 fp1 | t=.8, 1: tp0 fp0
    rows = sweep([0.5, 0.3, 0.8], [True] * 3, [True, False, False])
    cal = calibrate(rows, max_fpr=1.0, n_safe=2, n_toxic=1)
    assert (cal["threshold"], cal["dsr"], cal["fpr"]) == (0.3, 1.0, 0.5)
    assert calibrate(rows, max_fpr=0.5, n_safe=2, n_toxic=1)["threshold"] == 0.3


def test_calibrate_refuses_too_few_images():
    rows = sweep([0.9, 0.2, 0.7], [True] * 3, [True, False, False])
    with pytest.raises(CalibrationError, match=r"2 labelled safe images are too few.*at least 20"):
        calibrate(rows, max_fpr=0.05, n_safe=2, n_toxic=1)
    with pytest.raises(CalibrationError, match="at least 10"):       # min_safe is stricter
        calibrate(rows, max_fpr=0.9, n_safe=2, n_toxic=1, min_safe=10)
    no_toxic = sweep([0.2, 0.7], [True, True], [False, False])
    with pytest.raises(CalibrationError, match="no labelled toxic"):
        calibrate(no_toxic, max_fpr=0.5, n_safe=2, n_toxic=0)
    with pytest.raises(ValueError, match="counts"):                 # n_safe disagrees with the rows
        calibrate(rows, max_fpr=0.5, n_safe=3, n_toxic=1)
    with pytest.raises(ValueError, match="max_fpr"):
        calibrate(rows, max_fpr=0.0, n_safe=2, n_toxic=1)
    # 1/0.01 must ask for 100, not 101
    assert calibrate(sweep([0.9] + [0.1] * 100, [True] * 101, [True] + [False] * 100),
                     max_fpr=0.01, n_safe=100, n_toxic=1)["min_safe"] == 100


def test_calibrate_refuses_when_nan_safe_images_break_the_bound():
    # two safe images fail closed at every threshold: FPR >= 2/4 everywhere
    rows = sweep([np.nan, np.nan, 0.1, 0.2, 0.9], [False, False, True, True, True], [False] * 4 + [True])
    assert min(r["fp"] for r in rows) == 2
    with pytest.raises(CalibrationError, match="no threshold keeps FPR <= 0.25"):
        calibrate(rows, max_fpr=0.25, n_safe=4, n_toxic=1)


def _random_case(rng, n):
    """Records with random float32 class probabilities (some with NaN or missing) and random labels."""
    labels = CLASSES + ["safe", "toxic"]
    records = []
    for i in range(n):
        alpha = np.full(len(CLASSES), 0.5)
        alpha[rng.integers(len(CLASSES))] = 3.0
        p = rng.dirichlet(alpha).astype(np.float32)
        if rng.random() < 0.3:                      # coarse scores: many ties
            p = np.round(p, 1).astype(np.float32)
        r = rng.random()
        probs = None if r < 0.03 else ([float("nan")] * len(CLASSES) if r < 0.06 else p.tolist())
        records.append({"path": str(i), "label": labels[rng.integers(len(labels))], "probs": probs})
    return records


def _brute_counts(records, t):
    """Flags by verdict() itself at threshold t (missing probs fail closed): (tp, fp, n_toxic, n_safe)."""
    tp = fp = nt = ns = 0
    for r in records:
        toxic = is_toxic_label(r["label"], SAFE)
        probs = np.full(len(CLASSES), np.nan) if r["probs"] is None else np.asarray(r["probs"], np.float32)
        flagged = verdict(probs, CLASSES, SAFE, t)[0]
        tp += flagged and toxic
        fp += flagged and not toxic
        nt += toxic
        ns += not toxic
    return tp, fp, nt, ns


def test_sweep_monotone_and_matches_verdict_random():
    rng = np.random.default_rng(1234)
    for _ in range(25):
        records = _random_case(rng, int(rng.integers(1, 40)))
        rows = sweep(*sweep_inputs(records, CLASSES, SAFE))
        th = [r["threshold"] for r in rows]
        assert th[0] == 0.0 and th[-1] == 1.0 and all(a < b for a, b in zip(th, th[1:]))
        for a, b in zip(rows, rows[1:]):
            assert b["tp"] <= a["tp"] and b["fp"] <= a["fp"]
            assert (a["dsr"] is None) or b["dsr"] <= a["dsr"]
            assert (a["fpr"] is None) or b["fpr"] <= a["fpr"]
        # each row's counts hold at its threshold and anywhere before the next row
        probes = [(r, r["threshold"]) for r in rows] + \
                 [(a, (a["threshold"] + b["threshold"]) / 2) for a, b in zip(rows, rows[1:])]
        for row, t in probes:
            tp, fp, nt, ns = _brute_counts(records, t)
            assert (row["tp"], row["fp"], row["tp"] + row["fn"], row["fp"] + row["tn"]) == (tp, fp, nt, ns)


def test_calibrate_is_best_under_bound_random():
    rng = np.random.default_rng(99)
    grid = np.linspace(0.0, 1.0, 201).tolist()
    checked = 0
    for _ in range(40):
        records = _random_case(rng, int(rng.integers(20, 60)))
        s, u, y = sweep_inputs(records, CLASSES, SAFE)
        rows = sweep(s, u, y)
        n_toxic, n_safe = int(y.sum()), int((~y).sum())
        max_fpr = float(rng.choice([0.05, 0.1, 0.2, 0.3, 0.5]))
        try:
            cal = calibrate(rows, max_fpr, n_safe, n_toxic)
        except CalibrationError:
            # must be a genuine refusal: too few images, or no threshold meets the bound by brute force
            fp_min = min(_brute_counts(records, t)[1] for t in grid + [1.0])
            assert n_toxic < 1 or n_safe < math.ceil(1 / max_fpr - 1e-9) or fp_min / n_safe > max_fpr
            continue
        checked += 1
        # the bound holds when the chosen threshold is applied with verdict()
        tp, fp, _, _ = _brute_counts(records, cal["threshold"])
        assert (tp, fp) == (cal["tp"], cal["fp"]) and fp / n_safe <= max_fpr
        # no threshold at all (all flip points, midpoints and a fine grid) does better under the bound
        cands = sorted(set(grid + s[np.isfinite(s)].astype(float).tolist()))
        best = max(c[0] for c in (_brute_counts(records, t) for t in cands) if c[1] / n_safe <= max_fpr)
        assert cal["tp"] == best
        # and it is the highest threshold of its kind: from the next flip point on, DSR is lower
        nxt = cal["threshold_range"][1]
        if nxt is not None:
            assert all(_brute_counts(records, t)[0] < best for t in cands if t >= nxt)
    assert checked >= 10


def test_fpr_upper_bound():
    # fp = 0: closed form 1 - 0.05**(1/n); about 3/n (rule of three)
    assert fpr_upper_bound(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    # fp = 2 of 50: at the bound, P(X <= 2) = 0.05 (binomial CDF written out)
    p = fpr_upper_bound(2, 50)
    cdf = sum(math.comb(50, i) * p ** i * (1 - p) ** (50 - i) for i in range(3))
    assert cdf == pytest.approx(0.05, rel=1e-6) and p > 2 / 50
    assert fpr_upper_bound(5, 5) == 1.0 and fpr_upper_bound(0, 0) is None
    assert fpr_upper_bound(1, 1000) < fpr_upper_bound(2, 1000)


# ----------------------------------------------------------------------------------------------- labels

@pytest.fixture
def images(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def _write(folder, text, name="labels.csv"):
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p


def test_read_labels_good(images, tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    csv_text = ("\ufeffLabel,note,Path\n"            # BOM, any column order and case, extra column
                f"GUN,first,a.jpg\n\n"
                f"Safe,,{images / 'b.jpg'}\n"       # absolute path
                "neutral,\"x, y\",./c.jpg\n"
                "gun,again,a.jpg\n")                # same label twice: accepted
    got = read_labels(_write(images, csv_text), CLASSES, SAFE)
    assert got == {str((images / "a.jpg").resolve()): "gun", str((images / "b.jpg").resolve()): "safe",
                   str((images / "c.jpg").resolve()): "neutral"}
    # base_dir: relative paths resolve against it, not the CSV's folder
    got = read_labels(_write(sub, "path,label\n../a.jpg,toxic\n"), CLASSES, SAFE, base_dir=sub)
    assert got == {str((images / "a.jpg").resolve()): "toxic"}


@pytest.mark.parametrize("text, pattern", [
    ("", r"empty file"),
    ("\n\n", r"empty file"),
    ("path,label\n", r"header but no labelled rows"),
    ("path,class\na.jpg,gun\n", r"line 1: header lacks column 'label'"),
    ("a.jpg,gun\nb.jpg,safe\n", r"line 1: header lacks column 'path'"),           # no header
    ("path,label,label\na.jpg,gun,gun\n", r"line 1: header repeats column 'label'"),
    ("path,label\na.jpg,gun\nb.jpg,cat\n", r"line 3: unknown label 'cat' \(expected one of: neutral, porn"),
    ("path,label\na.jpg,gun\nmissing.jpg,gun\n", r"line 3: image 'missing.jpg' not found"),
    ("path,label\na.jpg,gun\n\na.jpg,porn\n", r"line 4: 'a.jpg' labelled 'porn' but 'gun' on line 2"),
    ("path,label\na.jpg,\n", r"line 2: empty label cell"),
    ("path,label\na.jpg\n", r"line 2: empty label cell"),
])
def test_read_labels_errors(images, text, pattern):
    p = _write(images, text)
    with pytest.raises(LabelsError, match=pattern) as e:
        read_labels(p, CLASSES, SAFE)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg


def test_read_labels_missing_file_and_bad_bytes(tmp_path):
    with pytest.raises(LabelsError, match="labels file not found"):
        read_labels(tmp_path / "nope.csv", CLASSES, SAFE)
    (tmp_path / "bin.csv").write_bytes(b"path,label\n\xff\xfe,gun\n")
    with pytest.raises(LabelsError, match="not UTF-8"):
        read_labels(tmp_path / "bin.csv", CLASSES, SAFE)


def test_read_labels_refuses_ambiguous_class_names(images):
    p = _write(images, "path,label\na.jpg,safe\n")
    with pytest.raises(ValueError, match="label 'safe' means safe"):
        read_labels(p, ["neutral", "safe"], ["neutral"])
    with pytest.raises(ValueError, match="differ only in case"):
        read_labels(p, ["neutral", "Gun", "gun"], ["neutral"])


# ------------------------------------------------------------------------------------------ plot, deps

def test_plot_sweep_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (optional [eval] extra)")
    rows = sweep([0.9, 0.7, 0.7, 0.4, 0.95], [True, True, True, True, False], [True, False, True, True, False])
    out = plot_sweep(rows, tmp_path / "sweep.png", chosen=0.7)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plot_sweep_without_matplotlib_hints_install(tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match=r"\[eval\]"):
        plot_sweep(sweep([0.5, 0.2], [True, True], [True, False]), tmp_path / "x.png")


def test_metrics_imports_nothing_heavy():
    code = ("import sys, safeclip.runtime.metrics; "
            "bad = [m for m in ('torch', 'transformers', 'onnx', 'matplotlib', 'safeclip.export') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
