"""The bundle manifest: schema, integrity, file verification. Written once here; the exporter imports it.

A bundle is a folder holding ``manifest.json`` and the files it lists. Loading verifies, and refuses with
a one-line :class:`BundleError`:

* the schema version is one this runtime knows;
* the manifest's own ``integrity`` digest (sha256 of its canonical JSON without that field) matches, so an
  edited threshold, class list or policy is caught;
* every listed file exists with the recorded size and sha256 (large files may be checked through a cache
  keyed on path, size, mtime and inode; ``full_verify=True`` or ``SAFECLIP_VERIFY=full`` hashes all);
* the gate section is complete and consistent with the vision graph's declared outputs, and every typed
  view of ``contract.py`` builds: gate policy and view mode are known ones, the graphs' tensor names and
  the KV layout name declared tensors, the model facts generation needs are there.

The runtime reads a manifest only through :class:`Manifest`'s typed properties (``vision``, ``decoder``,
``gate_config``, ``model_facts``, ``files``, ``engines``, ...); ``data`` stays for the tools that rewrite
the JSON (``safeclip-build``, ``safeclip-calibrate``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .backends.base import DecoderNames, VisionNames
from .contract import (ContractError, DecoderGraph, GateConfig, ModelFacts, VisionGraph, WeightQuantization,
                       matmulnbits_available)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GATE_OUTPUT = VisionNames.class_probs            # the default names (bundles name their own: graphs.*.names)
FEATURES_OUTPUT = VisionNames.image_features
CACHE_MIN_BYTES = 16 << 20          # files at least this big may be verified through the cache

__all__ = ["BundleError", "Manifest", "DecoderNames", "VisionNames", "load_manifest", "write_manifest", "sha256_file", "integrity_of",
           "SCHEMA_VERSION", "MANIFEST", "GATE_OUTPUT", "FEATURES_OUTPUT", "atomic_write_text", "atomic_write_bytes"]


class BundleError(Exception):
    """A bundle that must not serve: tampered, incomplete, unknown schema, or gate missing."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def integrity_of(manifest: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "integrity"})).hexdigest()


def atomic_write_bytes(path: str | Path, data) -> None:
    """Write ``data`` (bytes-like: bytes, a numpy buffer, TensorRT's ``IHostMemory``, not copied) so that readers
    see the old or the new file, never a half-written one: a temporary file in the same folder, fsync, rename.
    The folder is created if needed; the file is readable by all (0644), as a bundle served by another user
    must be. The one atomic writer of the project: manifests, plans, timing caches, reports."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Seal (integrity digest) and write ``manifest.json`` atomically; returns the sealed dict."""
    manifest = dict(manifest)
    manifest["schema_version"] = manifest.get("schema_version", SCHEMA_VERSION)
    manifest["integrity"] = integrity_of(manifest)
    atomic_write_text(Path(bundle_dir) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """A verified manifest. ``data`` is the whole JSON; the properties name the parts the runtime uses."""
    root: Path
    data: dict

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def graphs(self) -> dict[str, dict]:
        return self.data["graphs"]

    @property
    def gate(self) -> dict:
        return self.data["gate"]

    @property
    def preprocess(self) -> dict:
        return self.data["preprocess"]

    @property
    def model(self) -> dict:
        return self.data.get("model", {})

    @property
    def prompt(self) -> dict:
        return self.data.get("prompt", {})

    @property
    def tokenizer(self) -> dict:
        return self.data.get("tokenizer", {})

    # -- typed views (contract.py); load_manifest builds each once, so a bad value refuses to load ----------
    @cached_property
    def vision(self) -> VisionGraph:
        return _typed(VisionGraph.from_json, self.graphs.get("vision_gate"))

    @cached_property
    def decoder(self) -> DecoderGraph | None:
        g = self.graphs.get("decoder")
        return None if g is None else _typed(DecoderGraph.from_json, g)

    @cached_property
    def decoder_quantization(self) -> WeightQuantization | None:
        """The decoder's int8/int4 weight scheme (None: float weights). A MatMulNBits bundle refuses to load
        on an ONNX Runtime build without that operator, here rather than on the first request."""
        q = (self.graphs.get("decoder") or {}).get("quantization")
        if q is None:
            return None
        scheme = _typed(WeightQuantization.from_json, q)
        if scheme.form == "MatMulNBits" and not matmulnbits_available():
            import onnxruntime
            raise BundleError(f"{self.root}: the decoder has int{scheme.bits} weights in com.microsoft.MatMulNBits, "
                              f"which this ONNX Runtime build ({onnxruntime.__version__}) lacks; install the "
                              "standard onnxruntime package, or re-export without --weights")
        return scheme

    @cached_property
    def gate_config(self) -> GateConfig:
        return _typed(GateConfig.from_json, self.gate)

    @cached_property
    def model_facts(self) -> ModelFacts:
        return _typed(ModelFacts.from_json, self.model)

    @property
    def files(self) -> dict[str, dict]:
        return self.data["files"]

    @property
    def build(self) -> dict:
        return self.data.get("build") or {}

    @property
    def build_plan(self) -> dict[str, dict]:
        """TensorRT build plan per graph (targets jetson and datacenter); empty for cpu bundles."""
        return self.build.get("plan") or {}

    @property
    def engines(self) -> dict[str, dict]:
        """Records of the TensorRT engines built for this bundle (``safeclip-build``), per graph."""
        return self.build.get("engines") or {}

    @property
    def default_context(self) -> int | None:
        """The export target's KV capacity (same for every backend); None: the model's context length."""
        return self.build.get("context")

    @property
    def embeddings_file(self) -> str | None:
        return (self.data.get("embeddings") or {}).get("file")

    @property
    def created(self) -> Any:
        return self.data.get("created")

    def file_bytes(self, names) -> int:
        """Bytes on disk of the named bundle files (a graph and its external data, say)."""
        return sum(self.path(f).stat().st_size for f in names if f)


def _typed(parse, section):
    try:
        return parse(section if section is not None else {})
    except ContractError as e:
        raise BundleError(f"manifest: {e}") from None


def _require(d: Any, keys: list[str], where: str) -> None:
    if not isinstance(d, dict):
        raise BundleError(f"manifest: '{where}' must be an object")
    missing = [k for k in keys if k not in d]
    if missing:
        raise BundleError(f"manifest: '{where}' lacks {', '.join(missing)}")


def _check_gate(m: dict) -> None:
    gate = m.get("gate")
    if gate is None:
        raise BundleError("manifest has no gate section: a bundle without its gate must not serve")
    _require(gate, ["variant", "classes", "safe_classes", "threshold", "policy", "descriptors"], "gate")
    cfg = _typed(GateConfig.from_json, gate)
    vg = m.get("graphs", {}).get("vision_gate")
    if not vg:
        raise BundleError("manifest lists no vision_gate graph")
    if _typed(VisionGraph.from_json, vg).gate_width != len(cfg.classes):
        raise BundleError("vision_gate graph's class_probs width differs from gate.classes")


class _VerifyCache:
    """sha256 results keyed on (realpath, size, mtime_ns, inode): a file unchanged on disk is not rehashed."""

    def __init__(self) -> None:
        base = os.environ.get("SAFECLIP_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "safeclip")
        self.path = Path(base) / "verified.json"
        try:
            self.entries = json.loads(self.path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    @staticmethod
    def key(p: Path, st: os.stat_result) -> str:
        return f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"

    def get(self, p: Path, st: os.stat_result) -> str | None:
        return self.entries.get(self.key(p, st))

    def put(self, p: Path, st: os.stat_result, digest: str) -> None:
        self.entries[self.key(p, st)] = digest
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries))
        except OSError:
            pass                     # a read-only home only costs a re-hash next time


def verify_files(root: Path, files: dict, full_verify: bool = False) -> dict[str, bool]:
    """Check size and sha256 of every listed file; returns {name: came_from_cache}."""
    if not isinstance(files, dict) or not files:
        raise BundleError("manifest lists no files")
    full_verify = full_verify or os.environ.get("SAFECLIP_VERIFY", "").lower() == "full"
    cache = None if full_verify else _VerifyCache()
    cached: dict[str, bool] = {}
    for name, entry in files.items():
        _require(entry, ["sha256", "size"], f"files.{name}")
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"manifest: file name '{name}' leaves the bundle")
        try:
            st = p.stat()
        except OSError:
            raise BundleError(f"bundle is incomplete: '{name}' is missing") from None
        if st.st_size != entry["size"]:
            raise BundleError(f"bundle is tampered or truncated: '{name}' is {st.st_size} bytes, "
                              f"manifest says {entry['size']}")
        digest = cache.get(p, st) if (cache and st.st_size >= CACHE_MIN_BYTES) else None
        cached[name] = digest is not None
        if digest is None:
            digest = sha256_file(p)
            if cache and st.st_size >= CACHE_MIN_BYTES and digest == entry["sha256"]:
                cache.put(p, st, digest)
        if digest != entry["sha256"]:
            raise BundleError(f"bundle is tampered: sha256 of '{name}' does not match the manifest")
    if cache:
        cache.save()
    return cached


def load_manifest(bundle_dir: str | Path, full_verify: bool = False, verify: bool = True) -> Manifest:
    """Read and verify a bundle's manifest and files. Raises :class:`BundleError` with a one-line reason."""
    root = Path(bundle_dir)
    mpath = root / MANIFEST
    if root.is_file():               # e.g. engines/demo/manifest.json: the bundle is the folder around it
        raise BundleError(f"{root} is a file, not a bundle folder: give the folder that holds {MANIFEST} "
                          f"({root.parent if root.name == MANIFEST else 'engines/<name>'})")
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{root}: not a bundle (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({type(e).__name__})") from None
    if not isinstance(m, dict):
        raise BundleError(f"{mpath}: manifest is not a JSON object")
    sv = m.get("schema_version")
    if sv != SCHEMA_VERSION:
        raise BundleError(f"{mpath}: unknown schema version {sv!r} (this runtime reads {SCHEMA_VERSION}); "
                          "re-export the bundle or upgrade safeclip-edge")
    if m.get("integrity") != integrity_of(m):
        raise BundleError(f"{mpath}: manifest integrity check failed (edited by hand or corrupted); "
                          "use safeclip-calibrate to change thresholds")
    _check_gate(m)
    _require(m, ["name", "target", "files", "graphs", "preprocess"], "manifest")
    for gname, g in m["graphs"].items():
        _require(g, ["file", "inputs", "outputs"], f"graphs.{gname}")
        for f in [g["file"], *([g["data"]] if g.get("data") else [])]:
            if f not in m["files"]:
                raise BundleError(f"manifest: graph '{gname}' file '{f}' is not hashed in files")
    manifest = Manifest(root=root, data=m)
    for view in ("vision", "gate_config",
                 *(("decoder", "model_facts", "decoder_quantization") if "decoder" in m["graphs"] else ())):
        getattr(manifest, view)                              # typed views: a bad value refuses here
    if verify:
        verify_files(root, m["files"], full_verify=full_verify)
    return manifest
