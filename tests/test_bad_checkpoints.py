"""Bad checkpoints and a full disk: one clear line, nothing left behind, an existing bundle untouched.

Every case is run through the library (``export_bundle`` raises a typed one-line error: ``WeightError`` /
``CheckpointError`` naming the file by its full path, and the tensor where there is one) and through the CLI
(``safeclip.export.cli.main``: exit code 1, one ``safeclip-export: error: ...`` line on stderr, no traceback).
In both, ``--out`` names an existing bundle, which must keep byte-identical files, and no ``.<name>.tmp-*``
(or ``.<name>.old-*``) folder may remain beside it.

The checkpoint is the demo LLaVA re-saved by ``save_pretrained(max_shard_size=...)`` (several shards and an
index), then damaged: a shard cut in half, a corrupt header (garbage JSON; an impossible header length), a
shard named in the index that is missing, an index naming a tensor that is not in its shard (or in none), a
tensor rewritten with a wrong shape, a tensor missing from the checkpoint, a pickled-only
``pytorch_model.bin`` (never unpickled). The full disk is simulated by monkeypatching the writes of the
streamed weights (``export/onnx.py``), of the graph (``onnx.save_model``) and of the manifest to fail with
``ENOSPC`` part-way (no small tmpfs can be mounted here).
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from safeclip.export import cli  # noqa: E402
from safeclip.export.bundle import DiskFullError, ExportOptions, export_bundle  # noqa: E402
from safeclip.export.checkpoint import CheckpointError  # noqa: E402
from safeclip.export.weights import WeightError  # noqa: E402

INDEX = "model.safetensors.index.json"
SHAPE_KEY = "language_model.model.layers.1.mlp.down_proj.weight"
MISSING_KEY = "language_model.model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="session")
def sharded_demo(tmp_path_factory) -> tuple[Path, Path]:
    """(the demo LLaVA in several save_pretrained shards + index, its CLIP folder)."""
    from transformers import LlavaForConditionalGeneration

    from safeclip.export.demo import build_demo

    root = tmp_path_factory.mktemp("bad")
    demo_dir, clip_dir = build_demo(root / "demo")
    folder = root / "llava"
    LlavaForConditionalGeneration.from_pretrained(demo_dir, dtype=torch.float32).save_pretrained(
        folder, max_shard_size="300KB")
    for f in demo_dir.iterdir():
        if not (folder / f.name).exists() and f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    assert len(set(_index(folder).values())) >= 3
    return folder, clip_dir


def _index(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def _header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data, the header's tensor entries) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _rewrite_shard(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")))


@pytest.fixture
def existing(vision_bundle, tmp_path) -> tuple[Path, dict]:
    """An existing bundle at the --out of the failing export, and its files' digests."""
    out = shutil.copytree(vision_bundle, tmp_path / "out" / "bundle")
    return out, snapshot(out)


def assert_untouched(out: Path, before: dict) -> None:
    assert snapshot(out) == before, "the existing bundle was modified"
    assert leftovers(out) == [], f"left behind beside --out: {leftovers(out)}"


def cli_error(capsys, argv: list[str]) -> str:
    """Run safeclip-export; the one error line it printed (after checking the exit code and no traceback)."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("safeclip-export: error: ")]
    assert len(lines) == 1, err
    return lines[0][len("safeclip-export: error: "):]


# -- damaged checkpoints --------------------------------------------------------------------------------------
def _shard_of(folder: Path, key: str) -> Path:
    return folder / _index(folder)[key]


def truncate_shard(folder: Path):
    shard = _shard_of(folder, SHAPE_KEY)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    base, header = _header(shard)                                     # still readable: the cut is in the data

    def check(msg):
        key = re.search(r"tensor '([^']+)'", msg).group(1)          # a tensor of that shard, cut by the half
        return (msg.startswith(f"{shard}: truncated") and key in header
                and base + header[key]["data_offsets"][1] > size // 2)
    return WeightError, check


def corrupt_header_json(folder: Path):
    shard = _shard_of(folder, SHAPE_KEY)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"#" * 32                                           # the header's first bytes: not JSON
    shard.write_bytes(bytes(data))
    return WeightError, lambda msg: msg == f"{shard}: corrupt safetensors header (not JSON)"


def corrupt_header_length(folder: Path):
    shard = _shard_of(folder, SHAPE_KEY)
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)                            # claims a 1 TB header
    shard.write_bytes(bytes(data))
    return WeightError, lambda msg: msg.startswith(f"{shard}: truncated or corrupt safetensors header (claims {1 << 40} bytes")


def missing_shard(folder: Path):
    shard = _shard_of(folder, SHAPE_KEY)
    shard.unlink()
    return WeightError, lambda msg: msg == f"{folder / INDEX}: shard {shard.name} named in the index is missing"


def index_names_tensor_not_in_its_shard(folder: Path):
    index = json.loads((folder / INDEX).read_text())
    wm = index["weight_map"]
    other = next(f for f in sorted(set(wm.values())) if f != wm[SHAPE_KEY])
    wm[SHAPE_KEY] = other
    (folder / INDEX).write_text(json.dumps(index))
    return WeightError, lambda msg: msg == f"{folder / other}: tensor '{SHAPE_KEY}' named in the index is not in that shard"


def index_names_tensor_in_no_shard(folder: Path):
    index = json.loads((folder / INDEX).read_text())
    shard = index["weight_map"][SHAPE_KEY]
    index["weight_map"]["language_model.model.layers.7.mlp.up_proj.weight"] = shard
    (folder / INDEX).write_text(json.dumps(index))
    return WeightError, lambda msg: msg == (f"{folder / shard}: tensor 'language_model.model.layers.7.mlp.up_proj.weight' "
                                            "named in the index is not in that shard")


def wrong_shape(folder: Path):
    shard = _shard_of(folder, SHAPE_KEY)
    shape = []

    def change(t):
        shape.extend(t[SHAPE_KEY].shape)
        t[SHAPE_KEY] = torch.zeros(shape[0], shape[1] // 2)
    _rewrite_shard(shard, change)
    return WeightError, lambda msg: msg == (f"{shard}: tensor '{SHAPE_KEY}' has shape [{shape[0]}, {shape[1] // 2}], "
                                            f"the model expects {shape}")


def integer_weight(folder: Path):
    shard = _shard_of(folder, SHAPE_KEY)

    def change(t):
        t[SHAPE_KEY] = t[SHAPE_KEY].to(torch.int32)
    _rewrite_shard(shard, change)
    return WeightError, lambda msg: msg == (f"{shard}: tensor '{SHAPE_KEY}' is stored as I32, "
                                            "the model expects a float tensor")


def missing_tensor(folder: Path):
    _rewrite_shard(_shard_of(folder, MISSING_KEY), lambda t: t.pop(MISSING_KEY))
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"][MISSING_KEY]
    (folder / INDEX).write_text(json.dumps(index))
    fqn = "model.language_model.layers.1.self_attn.o_proj.weight"  # the parameter, in transformers 5's names
    return WeightError, lambda msg: msg == (f"model '{folder}': checkpoint has no tensor for '{fqn}' (in this "
                                            f"checkpoint's naming: '{MISSING_KEY}')")


def pickled_only(folder: Path):
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
        f.unlink()
    (folder / INDEX).unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    return WeightError, lambda msg: msg == (f"{folder}: no model.safetensors or {INDEX} (found pytorch_model.bin: "
                                            "pickled checkpoints are not supported; convert it to safetensors)")


DAMAGE = [truncate_shard, corrupt_header_json, corrupt_header_length, missing_shard,
          index_names_tensor_not_in_its_shard, index_names_tensor_in_no_shard, wrong_shape, integer_weight,
          missing_tensor, pickled_only]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_damaged_checkpoint_one_line_nothing_left_behind(damage, sharded_demo, existing, tmp_path, capsys,
                                                         monkeypatch):
    src, clip_dir = sharded_demo
    folder = shutil.copytree(src, tmp_path / "llava")
    kind, check = damage(folder)
    out, before = existing

    def no_unpickling(*a, **k):
        raise AssertionError("the exporter must never unpickle a checkpoint")
    monkeypatch.setattr(torch, "load", no_unpickling)

    with pytest.raises(CheckpointError) as ei:                       # WeightError is a CheckpointError
        export_bundle(ExportOptions(model=str(folder), clip=str(clip_dir), out=out, with_decoder=False))
    assert type(ei.value) is kind
    msg = str(ei.value)
    assert "\n" not in msg and check(msg), msg
    assert_untouched(out, before)

    line = cli_error(capsys, ["--model", str(folder), "--clip", str(clip_dir), "--out", str(out), "--no-decoder"])
    assert line == msg
    assert_untouched(out, before)


@pytest.mark.parametrize("which", ["clip", "vision_tower"])
def test_damaged_clip_or_tower_is_named_by_its_path(which, sharded_demo, existing, tmp_path, capsys):
    """LLaVA, CLIP and a swapped tower may all hold a ``model.safetensors``: the line says which one."""
    from transformers import CLIPVisionModel, LlavaConfig

    src, clip_dir = sharded_demo
    if which == "clip":
        folder = shutil.copytree(clip_dir, tmp_path / "clip")
    else:
        folder = tmp_path / "tower"
        CLIPVisionModel(LlavaConfig.from_pretrained(src).vision_config).save_pretrained(folder)
    shard = folder / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    out, before = existing
    argv = ["--model", str(src), "--clip", str(folder if which == "clip" else clip_dir), "--out", str(out),
            "--no-decoder"] + (["--vision-tower", str(folder)] if which == "vision_tower" else [])
    line = cli_error(capsys, argv)
    assert line.startswith(f"{shard}: truncated: tensor '"), line
    assert_untouched(out, before)


# -- the disk fills up ----------------------------------------------------------------------------------------
class FullDisk:
    """``open`` whose files accept ``budget`` bytes in all, then raise ENOSPC as a full disk does (the bytes
    that fit are written)."""

    def __init__(self, budget: int):
        self.left, self.hit = budget, False

    def open(self, file, mode="r", *args, **kw):
        f = builtins.open(file, mode, *args, **kw)
        return _Limited(f, self) if any(c in mode for c in "wax+") else f

    def take(self, n: int) -> int:
        fit = min(n, self.left)
        self.left -= fit
        if fit < n:
            self.hit = True
        return fit


class _Limited:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, b):
        part = b if isinstance(b, str) else memoryview(b).cast("B")   # text files: counted in characters
        fit = self._disk.take(len(part))
        if fit < len(part):
            self._f.write(part[:fit])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fill_weights(monkeypatch, vision_bundle):
    """The streamed weights (export/onnx.py's writes of vision_gate.onnx.data) fill the disk half-way."""
    from safeclip.export import onnx as onnx_mod

    size = json.loads((vision_bundle / "manifest.json").read_text())["files"]["vision_gate.onnx.data"]["size"]
    disk = FullDisk(size // 2)
    monkeypatch.setattr(onnx_mod, "open", disk.open, raising=False)
    return disk


def _fill_graph(monkeypatch, vision_bundle):
    """The graph file (onnx.save_model) gets half its bytes, then the disk is full."""
    import onnx

    disk = FullDisk(0)
    real = onnx.save_model

    def save_model(proto, f, *a, **k):
        data = proto.SerializeToString()
        disk.left = len(data) // 2
        with disk.open(f, "wb") as fh:
            fh.write(data)
        return real(proto, f, *a, **k)                                # not reached
    monkeypatch.setattr(onnx, "save_model", save_model)
    return disk


def _fill_manifest(monkeypatch, vision_bundle):
    """The last write before the bundle is moved into place, manifest.json, gets half its bytes."""
    import safeclip.runtime.manifest as manifest_mod

    disk = FullDisk(0)

    def atomic_write_text(path, text):
        disk.left = len(text) // 2
        with disk.open(path, "w", encoding="utf-8") as f:
            f.write(text)
    monkeypatch.setattr(manifest_mod, "atomic_write_text", atomic_write_text)
    return disk


FILL = {"weights": _fill_weights, "graph": _fill_graph, "manifest": _fill_manifest}


@pytest.mark.parametrize("stage", list(FILL))
def test_disk_full_during_export(stage, sharded_demo, existing, vision_bundle, capsys, monkeypatch):
    folder, clip_dir = sharded_demo
    out, before = existing
    disk = FILL[stage](monkeypatch, vision_bundle)
    line = cli_error(capsys, ["--model", str(folder), "--clip", str(clip_dir), "--out", str(out), "--no-decoder"])
    assert disk.hit, f"the simulated full disk was never reached at the {stage} stage"
    assert "no space left" in line.lower(), f"the message does not say the disk is full: {line!r}"
    assert str(out.parent.resolve()) in line, f"the message does not name where it was writing: {line!r}"
    assert_untouched(out, before)


def test_disk_full_library_raises_disk_full_error(sharded_demo, existing, vision_bundle, monkeypatch):
    folder, clip_dir = sharded_demo
    out, before = existing
    disk = _fill_weights(monkeypatch, vision_bundle)
    with pytest.raises(DiskFullError) as ei:                          # an OSError, one line, naming the folder
        export_bundle(ExportOptions(model=str(folder), clip=str(clip_dir), out=out, with_decoder=False))
    assert disk.hit
    msg = str(ei.value)
    assert "\n" not in msg and "no space left" in msg.lower() and str(out.parent.resolve()) in msg, msg
    assert_untouched(out, before)
