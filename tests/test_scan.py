"""safeclip-scan and safeclip-calibrate on a bundle whose gate is controlled (descriptor embeddings made to
point at chosen images), run as a user would: through the console entry points."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from safeclip.runtime import calibrate
from safeclip.runtime.scan import cli as scan_cli
from safeclip.runtime.manifest import load_manifest

from conftest import controlled_text_embeds


@pytest.fixture(scope="module")
def controlled(tmp_path_factory, demo_sources, test_images, cache_dir):
    """A bundle where red-ish images score 'gun' and blue-ish images 'neutral', plus labelled variants."""
    from safeclip.descriptors import load_descriptor_set
    from safeclip.export.bundle import ExportOptions, export_bundle
    from safeclip.runtime.image import load_image, preprocess, preprocess_spec_from_config

    root = tmp_path_factory.mktemp("controlled")
    spec = preprocess_spec_from_config(json.loads((demo_sources.llava_path / "preprocessor_config.json").read_text()))
    toxic_pv = preprocess(load_image(test_images / "red.png"), spec)
    clean_pv = preprocess(load_image(test_images / "blue.jpg"), spec)
    dset = load_descriptor_set("default")
    te = controlled_text_embeds(demo_sources, dset, toxic_pv, clean_pv, "gun")
    bundle = export_bundle(ExportOptions(out=root / "bundle", with_decoder=False, text_embeds_override=te)).bundle
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    rows = []
    for kind, src in (("gun", "red.png"), ("safe", "blue.jpg")):
        base = np.asarray(Image.open(test_images / src).convert("RGB"), dtype=np.int16)
        for i in range(8):
            arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
            name = f"{kind}_{i}.png"
            Image.fromarray(arr).save(data / name)
            rows.append((name, kind))
    with open(data / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return bundle, data


def test_scan_reports_every_image_and_goes_on_after_bad_ones(controlled, tmp_path, capsys):
    bundle, data = controlled
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    rc = scan_cli.main(["--bundle", str(bundle), str(data), str(tmp_path)])
    out, err = capsys.readouterr()
    recs = [json.loads(l) for l in out.splitlines()]
    assert rc == 3                      # finished, some items could not be gated (README: exit status)
    assert len(recs) == 18
    errors = [r for r in recs if "error" in r]
    assert {r["path"].rsplit("/", 1)[-1] for r in errors} == {"broken.png", "empty.jpg"}
    good = {r["path"].rsplit("/", 1)[-1]: r for r in recs if "error" not in r}
    assert all(good[f"gun_{i}.png"]["flagged"] and good[f"gun_{i}.png"]["category"] == "gun" for i in range(8))
    assert not any(good[f"safe_{i}.png"]["flagged"] for i in range(8))
    assert "gated 16 of 18 items" in err and "; 2 failed" in err
    assert "18 items: 16 gated (8 flagged), 2 failed" in err


def test_threshold_override_reaches_every_verdict(controlled, test_images, monkeypatch):
    """safeclip-scan's --threshold (and calibrate's) sets ``pipe.threshold``: it must reach the rule that the
    vision gate applies, in ``gate`` and in ``gate_batch`` (on the code where it set a copy that VisionGate
    never read, the image stayed flagged). The graph's probabilities are fixed here, 0.7 for 'gun'."""
    from safeclip.runtime.pipeline import Pipeline

    bundle, _ = controlled
    pipe = Pipeline.load(bundle, language_model=False)
    classes, real = pipe.classes, pipe.vision.session.run

    def run(feed):                                                     # the real features, fixed probabilities
        out = dict(real(feed))
        p = np.full((len(feed[pipe.names.pixel_values]), len(classes)), 0.3 / (len(classes) - 1), np.float32)
        p[:, classes.index("gun")] = 0.7
        out[pipe.names.class_probs] = p
        return out

    monkeypatch.setattr(pipe.vision.session, "run", run)
    pv = pipe.pixel_values(test_images / "red.png")
    for t, flagged in ((0.5, True), (0.8, False), (0.65, True)):
        pipe.threshold = t
        assert pipe.vision.threshold == t
        assert pipe.gate(test_images / "red.png").flagged is flagged
        assert [v.flagged for v in pipe.vision.gate_batch([pv, pv])] == [flagged, flagged]


def test_scan_with_labels_metrics(controlled, tmp_path, capsys):
    bundle, data = controlled
    report = tmp_path / "r.json"
    rc = scan_cli.main(["--bundle", str(bundle), str(data), "--labels", str(data / "labels.csv"),
                        "--report", str(report)])
    out, err = capsys.readouterr()
    assert rc == 0
    r = json.loads(report.read_text())
    m = r["metrics"]
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (8, 0, 0, 8)
    assert m["dsr"] == 1.0 and m["fpr"] == 0.0 and m["precision"] == 1.0
    assert "DSR 100.0%" in err and "FPR 0.0%" in err
    ths = [row["threshold"] for row in r["sweep"]]
    assert ths == sorted(ths) and ths[0] == 0.0


def test_scan_bad_labels_and_bad_bundle_are_one_line_errors(controlled, tmp_path, capsys):
    bundle, data = controlled
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,gun\n")
    assert scan_cli.main(["--bundle", str(bundle), str(data), "--labels", str(bad)]) == 2
    bad.write_text("path,label\nx.png,dragon\n")
    assert scan_cli.main(["--bundle", str(bundle), str(data), "--labels", str(bad)]) == 2
    assert scan_cli.main(["--bundle", str(tmp_path), str(data)]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("safeclip-scan: error")]
    assert len(lines) == 3 and "Traceback" not in err


def test_calibrate_writes_threshold_and_history(controlled, tmp_path, capsys):
    import shutil
    bundle, data = controlled
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    old = load_manifest(b).gate["threshold"]
    # 8 safe images: a 0.05 bound is not measurable -> refused, nothing written
    assert calibrate.main(["--bundle", str(b), "--labels", str(data / "labels.csv"), "--max-fpr", "0.05"]) == 2
    assert "too few" in capsys.readouterr().err
    assert load_manifest(b).gate["threshold"] == old
    rc = calibrate.main(["--bundle", str(b), "--labels", str(data / "labels.csv"), "--max-fpr", "0.125",
                             "--descriptors-out", str(tmp_path / "d.json")])
    assert rc == 0
    g = load_manifest(b, full_verify=True).gate
    assert g["history"][-1]["old_threshold"] == old and g["history"][-1]["new_threshold"] == g["threshold"]
    from safeclip.descriptors import load_descriptor_set
    assert load_descriptor_set(tmp_path / "d.json").default_threshold == g["threshold"]
    # the written threshold reproduces the calibrated decisions: every toxic flagged, FPR within bound
    capsys.readouterr()
    scan_cli.main(["--bundle", str(b), str(data)])
    recs = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    fp = sum(r["flagged"] for r in recs if "safe_" in r["path"])
    tp = sum(r["flagged"] for r in recs if "gun_" in r["path"])
    assert fp / 8 <= 0.125 and tp == 8
