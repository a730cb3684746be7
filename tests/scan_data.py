"""Sources of every kind safeclip-scan reads, built from the controlled bundle's red (flagged 'gun') and blue
(clean) test images with noise: a folder, a file list, Parquet shards (image bytes; a path column) and a
WebDataset tar shard, with broken entries of each kind. ``truth`` maps (source, key) to 'gun', 'safe' or
'error'; ``image_of`` to what the item holds (a path or bytes), for the per-image oracle ``Pipeline.gate``."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _noisy(src: Path, rng, fmt: str = "PNG") -> bytes:
    base = np.asarray(Image.open(src).convert("RGB"), dtype=np.int16)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def build_sources(root: Path, test_images: Path, n_per_class: int = 4, crash_key: str | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    red, blue = test_images / "red.png", test_images / "blue.jpg"
    truth, image_of = {}, {}
    imgs = root / "imgs"
    imgs.mkdir()
    for kind, src in (("gun", red), ("safe", blue)):
        for i in range(n_per_class):
            name = f"{kind}_{i}.png"
            (imgs / name).write_bytes(_noisy(src, rng))
            truth[(str(imgs), name)], image_of[(str(imgs), name)] = kind, imgs / name
    if crash_key:                                   # the item whose first worker dies (test_scan_ray)
        (imgs / crash_key).write_bytes(_noisy(red, rng))
        truth[(str(imgs), crash_key)], image_of[(str(imgs), crash_key)] = "gun", imgs / crash_key
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truth[(str(imgs), "broken.png")] = "error"

    lst = root / "list.txt"
    lst.write_text("# a file list\nimgs/gun_0.png\n\nimgs/safe_0.png\nmissing.png\n")
    for key, t in (("imgs/gun_0.png", "gun"), ("imgs/safe_0.png", "safe"), ("missing.png", "error")):
        truth[(str(lst), key)] = t
        if t != "error":
            image_of[(str(lst), key)] = root / key

    shard = root / "bytes.parquet"
    cells = [("g1", _noisy(red, rng, "JPEG"), "gun"), ("s1", _noisy(blue, rng), "safe"), ("bad", b"not an image", "error")]
    pq.write_table(pa.table({"key": [k for k, _, _ in cells],
                             "image": [{"bytes": b, "path": None} for _, b, _ in cells]}), shard)
    for k, b, t in cells:
        truth[(str(shard), k)], image_of[(str(shard), k)] = t, b

    paths = root / "paths.parquet"
    pq.write_table(pa.table({"path": ["imgs/gun_1.png", "imgs/safe_1.png"]}), paths)
    for p, t in (("imgs/gun_1.png", "gun"), ("imgs/safe_1.png", "safe")):
        truth[(str(paths), p)], image_of[(str(paths), p)] = t, root / p

    tar = root / "shard-000.tar"
    samples = [("s0", "jpg", _noisy(red, rng, "JPEG"), "gun"), ("s1", "png", _noisy(blue, rng), "safe"),
               ("s2", "txt", b"a caption only", "error")]
    with tarfile.open(tar, "w") as t:
        for key, ext, data, kind in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.json", b'{"caption": "x"}')):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
            truth[(str(tar), key)] = kind
            if kind != "error":
                image_of[(str(tar), key)] = data
    sources = [str(imgs), str(lst), str(shard), str(paths), str(tar)]
    return sources, truth, image_of


def check_rows(rows, truth, image_of, oracle):
    """Every listed item exactly once; verdicts as the per-image Pipeline.gate gives them; errors as errors."""
    ids = [(r["source"], r["key"]) for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) == set(truth)
    for r in rows:
        t = truth[(r["source"], r["key"])]
        if t == "error":
            assert r["error"] and r["flagged"] is None, r
            continue
        assert r["error"] is None, r
        v = oracle.gate(image_of[(r["source"], r["key"])])
        assert (r["flagged"], r["category"]) == (v.flagged, v.category)
        assert r["score"] == pytest.approx(v.score, abs=1e-5)
        assert list(r["probs"]) == oracle.classes
        assert list(r["probs"].values()) == pytest.approx([v.probs[c] for c in oracle.classes], abs=1e-5)
        assert r["flagged"] == (t == "gun") and (t != "gun" or r["category"] == "gun")


def interrupt_on_second_batch(monkeypatch, gating):
    """Make ``gating.gate_items`` raise KeyboardInterrupt on its second call (a scan stopped midway: the first
    batch's rows are written); returns the real function, to put back for the resume."""
    real, calls = gating.gate_items, []

    def dies_on_second(pipe, items, reader):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(pipe, items, reader)

    monkeypatch.setattr(gating, "gate_items", dies_on_second)
    return real
