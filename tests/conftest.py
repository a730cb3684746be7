"""Shared fixtures: the demo checkpoints are built once per test session, offline, with random weights."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cache")
    os.environ["SAFECLIP_CACHE_DIR"] = str(d)
    return d


@pytest.fixture(scope="session")
def demo_sources(tmp_path_factory):
    pytest.importorskip("torch")
    from safeclip.export.checkpoint import load_sources
    return load_sources("demo", None, tmp_path_factory.mktemp("demo_src"))


def images_dir(root: Path) -> Path:
    """A few small synthetic RGB images of different sizes and contents."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    specs = {"red.png": (400, 300, (220, 30, 30)), "blue.jpg": (300, 500, (20, 40, 210)),
             "noise.png": (336, 336, None), "wide.png": (800, 200, (240, 240, 240))}
    for name, (w, h, colour) in specs.items():
        if colour is None:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            arr = np.zeros((h, w, 3), np.uint8) + np.array(colour, np.uint8)
            arr[h // 4: h // 2, w // 4: w // 2] = 255 - np.array(colour, np.uint8)
        Image.fromarray(arr).save(root / name)
    return root


@pytest.fixture(scope="session")
def test_images(tmp_path_factory) -> Path:
    return images_dir(tmp_path_factory.mktemp("images"))


def gate_embedding(sources, pixel_values, variant: str = "reference"):
    """Oracle: the gate's image embedding computed with plain transformers calls."""
    import torch

    with torch.no_grad():
        out = sources.llava.model.vision_tower(torch.as_tensor(pixel_values), output_hidden_states=True)
        if variant == "reference":
            cls = out.hidden_states[sources.llava.config.vision_feature_layer][:, 0]
        else:
            cls = sources.llava.model.vision_tower.post_layernorm(out.hidden_states[-1][:, 0])
        e = sources.clip.visual_projection(cls)
    return (e / e.norm(dim=-1, keepdim=True)).numpy()


def controlled_text_embeds(sources, dset, toxic_pv, clean_pv, toxic_class: str, variant="reference", seed=0):
    """Descriptor embeddings that make ``toxic_pv`` land in ``toxic_class`` and ``clean_pv`` in the safe class."""
    import torch

    rng = np.random.default_rng(seed)
    et = gate_embedding(sources, toxic_pv, variant)[0]
    ec = gate_embedding(sources, clean_pv, variant)[0]
    rows = []
    for cls, group in zip(dset.classes, dset.sentences):
        for _ in group:
            base = et if cls == toxic_class else ec if cls in dset.safe_classes else rng.normal(size=et.shape)
            v = base + 0.01 * rng.normal(size=et.shape)
            rows.append(v / np.linalg.norm(v))
    return torch.tensor(np.stack(rows), dtype=torch.float32)


@pytest.fixture(scope="session")
def vision_bundle(tmp_path_factory, cache_dir) -> Path:
    """A demo bundle with the vision+gate graph only (fast to export)."""
    pytest.importorskip("torch")
    from safeclip.export.bundle import ExportOptions, export_bundle
    out = tmp_path_factory.mktemp("bundles") / "demo-vision"
    return export_bundle(ExportOptions(model="demo", out=out, with_decoder=False)).bundle


def copy_bundle(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory, cache_dir) -> Path:
    """The full demo bundle (vision+gate and language model), as `safeclip-export` writes it."""
    pytest.importorskip("torch")
    from safeclip.export.bundle import ExportOptions, export_bundle
    out = tmp_path_factory.mktemp("bundles") / "demo"
    return export_bundle(ExportOptions(model="demo", out=out)).bundle


@pytest.fixture(scope="session")
def demo_bundle_traced(tmp_path_factory, cache_dir) -> Path:
    """The demo bundle with the traced decoder (KV form "new": the graph returns the new rows and the runtime's
    bucketed arena holds them), as the TensorRT targets write it, in fp32 for ONNX Runtime: what the arena,
    stand-in and CUDA-arena tests exercise (the cpu target's default is the fused graph, ``demo_bundle``)."""
    pytest.importorskip("torch")
    from safeclip.export.bundle import ExportOptions, export_bundle
    out = tmp_path_factory.mktemp("bundles") / "demo_traced"
    return export_bundle(ExportOptions(model="demo", out=out, fused_ops=False)).bundle


@pytest.fixture(scope="session")
def demo_decoder_parts(demo_bundle_traced):
    """The demo bundle's manifest, decoder KV layout and embedding table [V, D]: what decoder tests build on."""
    from safeclip.runtime.graph_spec import KVSpec
    from safeclip.runtime.manifest import load_manifest

    m = load_manifest(demo_bundle_traced)
    kv = KVSpec.from_manifest(m.graphs["decoder"]["kv"])
    return m, kv, np.load(m.path(m.data["embeddings"]["file"]))


@pytest.fixture(scope="session")
def controlled_bundle(tmp_path_factory, demo_sources, test_images, cache_dir) -> Path:
    """The full demo bundle with a controlled gate: red.png is flagged 'gun', blue.jpg is clean."""
    import json

    from safeclip.descriptors import load_descriptor_set
    from safeclip.export.bundle import ExportOptions, export_bundle
    from safeclip.runtime.image import load_image, preprocess, preprocess_spec_from_config

    spec = preprocess_spec_from_config(json.loads((demo_sources.llava_path / "preprocessor_config.json").read_text()))
    te = controlled_text_embeds(demo_sources, load_descriptor_set("default"),
                                preprocess(load_image(test_images / "red.png"), spec),
                                preprocess(load_image(test_images / "blue.jpg"), spec), "gun")
    out = tmp_path_factory.mktemp("controlled") / "bundle"
    return export_bundle(ExportOptions(model="demo", out=out, text_embeds_override=te)).bundle


RAY_PIECE_DELAY_S = 0.03    # Ray workers pause this long before each answer's text piece: answers last a while


def ray_worker_hook(key: str, marker: str, piece_delay_s: float):
    """A Ray ``worker_process_setup_hook`` (Ray's own seam: it runs in every worker process as it starts) that
    (1) wraps ``safeclip.runtime.scan.gating.gate_items`` there: the first worker to meet an item keyed ``key``
    creates the file ``marker`` and dies (``os._exit``), so Ray's actor restart and task retry are exercised
    (tests/test_scan_ray.py); (2) pauses ``piece_delay_s`` before each text piece of every answer
    (``AnswerStream.__iter__``), so a test can stop a Serve replica mid-answer (tests/test_serve_ray.py). A nested
    function: Ray's cloudpickle ships it by value, so the workers need not import this file; the driver's own
    scan and answers are untouched."""
    def install() -> None:
        import time

        from safeclip.runtime import answer
        from safeclip.runtime.scan import gating

        real = gating.gate_items

        def gate_items(pipe, items, reader):
            if any(it["key"] == key for it in items):
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:                  # died once already: gate it this time
                    pass
                else:
                    os.close(fd)
                    os._exit(17)
            return real(pipe, items, reader)

        gating.gate_items = gate_items
        pieces = answer.AnswerStream.__iter__

        def slow_pieces(self):
            for piece in pieces(self):
                time.sleep(piece_delay_s)
                yield piece

        answer.AnswerStream.__iter__ = slow_pieces

    return install


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One small local Ray runtime for the session's Ray tests (test_scan_ray.py, test_serve_ray.py), shut down at
    the end. Its workers run ``ray_worker_hook``: the first worker to meet an item keyed ``crash_me.png`` dies
    once (the fixture's value is the marker file it leaves), and answers pause before each text piece."""
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install -e '.[ray]')")
    marker = tmp_path_factory.mktemp("ray") / "crashed"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": ray_worker_hook("crash_me.png", str(marker),
                                                                        RAY_PIECE_DELAY_S)})
    try:
        yield marker
    finally:
        import sys
        if "ray.serve" in sys.modules:              # only a session that served (importing it warns)
            sys.modules["ray.serve"].shutdown()
        ray.shutdown()
