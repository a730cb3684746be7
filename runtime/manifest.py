"""The bundle manifest: schema, integrity, signature, file verification. Written once here; the exporter imports it.

A bundle is a folder holding ``manifest.json`` and the files it lists. Loading verifies, and refuses with
a one-line :class:`BundleError`:

* ``manifest.json`` is a regular file inside the bundle (a FIFO, a device or a symlink leading out of the
  folder is refused without blocking), of at most 64 MiB;
* the schema version is one this runtime knows;
* the manifest's own ``integrity`` digest (sha256 of its canonical JSON without that field) matches, so an
  edited threshold, class list or policy is caught -- by accident only: anyone can recompute it;
* with trusted keys (``$SAFECLIP_TRUSTED_KEYS``, ``trusted_keys=``; ``signing.py``), an Ed25519 signature by one
  of them over the manifest: this is what stops a deliberate edit (unsigned or badly signed: refused);
* gate sanity, signed or not: threshold in [0, 1) (the rule is ``p > threshold``, so 1 never fires), at least one
  unsafe class, a class list as wide as the vision graph's gate output;
* every file the runtime opens (graphs and their data, tokenizer, embedding table, anyres newline, engine plans)
  is listed in ``files`` with its size and sha256, by a plain relative name that stays inside the bundle;
* every listed file is a regular file inside the bundle with the recorded size and sha256 (large files may be
  checked through the HMAC'd cache of ``verify_cache.py``; ``full_verify=True`` or ``SAFECLIP_VERIFY=full``
  hashes all);
* every typed view of ``contract.py`` builds: gate policy and view mode are known ones, the graphs' tensor
  names and the KV layout name declared tensors, the model facts generation needs are there.

``Pipeline.load`` then runs the gate's known-answer self-test (``selftest.py``) on the opened backend.

The runtime reads a manifest only through :class:`Manifest`'s typed properties (``vision``, ``decoder``,
``gate_config``, ``model_facts``, ``files``, ``engines``, ...); ``data`` stays for the tools that rewrite
the JSON (``safeclip-build``, ``safeclip-calibrate``).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .backends.ort import matmulnbits_available
from .contract import ContractError, DecoderGraph, GateConfig, ModelFacts, VisionGraph, WeightQuantization
from .signing import SigningError, TrustedKeys, load_signing_key, sign, trusted_keys
from .verify_cache import VerifyCache

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CACHE_MIN_BYTES = 16 << 20          # files at least this big may be verified through the cache
MAX_MANIFEST_BYTES = 64 << 20

__all__ = ["BundleError", "Manifest", "load_manifest", "write_manifest", "sha256_file", "integrity_of",
           "SCHEMA_VERSION", "MANIFEST", "atomic_write", "atomic_write_text", "atomic_write_bytes",
           "signing_payload", "open_in_bundle", "referenced_files"]


class BundleError(Exception):
    """A bundle that must not serve: tampered, incomplete, unknown schema, or gate missing."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_fd(fd: int, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, chunk):
        h.update(block)
    return h.hexdigest()


def open_in_bundle(root: Path, name: str) -> tuple[int, os.stat_result]:
    """(fd, fstat) of bundle file ``name``, read-only: a plain relative name whose real path stays inside the
    bundle's real path, opened with O_NONBLOCK (a FIFO is not waited on) and refused unless it is a regular file.
    Raises BundleError; the caller closes the fd."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise BundleError(f"manifest: file name {name!r} leaves the bundle")
    top = os.path.realpath(root)
    path = os.path.join(top, name)
    real = os.path.realpath(path)
    if os.path.commonpath([top, real]) != top:
        raise BundleError(f"{root}: '{name}' is a link leading out of the bundle")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise BundleError(f"bundle is incomplete: '{name}' is missing") from None
    except OSError as e:
        raise BundleError(f"{root}: cannot open '{name}' ({e.strerror or type(e).__name__})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BundleError(f"{root}: '{name}' is not a regular file")
    return fd, st


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def integrity_of(manifest: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "integrity"})).hexdigest()


def signing_payload(manifest: dict) -> bytes:
    """What a bundle signature covers: the canonical manifest without ``integrity`` and ``signature``."""
    return _canonical({k: v for k, v in manifest.items() if k not in ("integrity", "signature")})


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file through ``write(f)`` (``f`` a binary file: ``np.save`` streams into it) so that readers see
    the old or the new file, never a half-written one: a temporary file in the same folder, fsync, rename.
    The folder is created if needed; the file is readable by all (0644), as a bundle served by another user
    must be. The one atomic writer of the project: manifests, plans, embedding tables, timing caches,
    reports."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data) -> None:
    """:func:`atomic_write` of ``data`` (bytes-like: bytes, a numpy buffer, TensorRT's ``IHostMemory``; not
    copied)."""
    atomic_write(path, lambda f: f.write(memoryview(data)))


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_manifest(bundle_dir: Path, manifest: dict, sign_key=None) -> dict:
    """Seal (integrity digest) and write ``manifest.json`` atomically; returns the sealed dict. ``sign_key`` (a
    PEM path or a loaded ``signing.SigningKey``) signs it; without one, any old signature is dropped (it would
    not match the new content)."""
    manifest = dict(manifest)
    manifest.pop("signature", None)
    manifest["schema_version"] = manifest.get("schema_version", SCHEMA_VERSION)
    if sign_key is not None:
        if not hasattr(sign_key, "private"):
            sign_key = load_signing_key(sign_key)
        manifest["signature"] = sign(signing_payload(manifest), sign_key)
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

    @property
    def signed_by(self) -> str | None:
        """The key id of the bundle's signature (verified against the trusted keys when any were set)."""
        sig = self.data.get("signature")
        return sig.get("key_id") if isinstance(sig, dict) else None

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


def referenced_files(m: dict) -> list[tuple[str, str]]:
    """(where, name) of every bundle file the runtime opens by a name the manifest gives."""
    out = []
    for gname, g in (m.get("graphs") or {}).items():
        if isinstance(g, dict):
            out += [(f"graphs.{gname}.{k}", g[k]) for k in ("file", "data", "image_newline") if g.get(k)]
    for section in ("tokenizer", "embeddings"):
        if isinstance(m.get(section), dict) and "file" in m[section]:
            out.append((f"{section}.file", m[section]["file"]))
    engines = ((m.get("build") or {}).get("engines") or {}) if isinstance(m.get("build"), dict) else {}
    for gname, rec in engines.items() if isinstance(engines, dict) else ():
        if isinstance(rec, dict) and rec.get("file"):
            out.append((f"build.engines.{gname}.file", rec["file"]))
    return out


def _check_referenced(m: dict) -> None:
    files = m["files"]
    for where, name in referenced_files(m):
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"manifest: {where} {name!r} leaves the bundle")
        if name not in files:
            raise BundleError(f"manifest: {where} '{name}' is not hashed in files")


def verify_files(root: Path, files: dict, full_verify: bool = False) -> dict[str, bool]:
    """Check size and sha256 of every listed file (each a regular file inside the bundle, opened once and hashed
    through that descriptor); returns {name: came_from_cache}."""
    if not isinstance(files, dict) or not files:
        raise BundleError("manifest lists no files")
    full_verify = full_verify or os.environ.get("SAFECLIP_VERIFY", "").lower() == "full"
    cache = None if full_verify else VerifyCache()
    cached: dict[str, bool] = {}
    for name, entry in files.items():
        _require(entry, ["sha256", "size"], f"files.{name}")
        fd, st = open_in_bundle(root, name)
        try:
            if st.st_size != entry["size"]:
                raise BundleError(f"bundle is tampered or truncated: '{name}' is {st.st_size} bytes, "
                                  f"manifest says {entry['size']}")
            use = cache is not None and st.st_size >= CACHE_MIN_BYTES
            p = root / name
            digest = cache.get(p, st) if use else None
            cached[name] = digest is not None
            if digest is None:
                try:
                    digest = _sha256_fd(fd)
                except OSError as e:
                    raise BundleError(f"{root}: cannot read '{name}' ({e.strerror or type(e).__name__})") from None
                if use and digest == entry["sha256"] and _same(st, os.fstat(fd)):
                    cache.put(p, st, digest)
        finally:
            os.close(fd)
        if digest != entry["sha256"]:
            raise BundleError(f"bundle is tampered: sha256 of '{name}' does not match the manifest")
    if cache:
        cache.save(atomic_write_text)
    return cached


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    """Unchanged while it was hashed (size, mtime, ctime): only then may the digest be cached."""
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def _read_manifest(root: Path) -> dict:
    mpath = root / MANIFEST
    if root.is_file():               # e.g. engines/demo/manifest.json: the bundle is the folder around it
        raise BundleError(f"{root} is a file, not a bundle folder: give the folder that holds {MANIFEST} "
                          f"({root.parent if root.name == MANIFEST else 'engines/<name>'})")
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder")
    if not os.path.lexists(mpath):
        raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
    fd, st = open_in_bundle(root, MANIFEST)
    try:
        if st.st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mpath}: {st.st_size} bytes is too big for a manifest")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        m = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({type(e).__name__})") from None
    finally:
        os.close(fd)
    if not isinstance(m, dict):
        raise BundleError(f"{mpath}: manifest is not a JSON object")
    return m


def load_manifest(bundle_dir: str | Path, full_verify: bool = False, verify: bool = True,
                  trusted_keys: "TrustedKeys | list | str | Path | None" = None) -> Manifest:
    """Read and verify a bundle's manifest and files. Raises :class:`BundleError` with a one-line reason.
    ``trusted_keys`` (PEM paths or a ``signing.TrustedKeys``) adds to ``$SAFECLIP_TRUSTED_KEYS``: with any
    trusted key, the manifest must be signed by one of them."""
    try:
        return _load_manifest(Path(bundle_dir), full_verify, verify, trusted_keys)
    except RecursionError:          # JSON nested just under the parser's limit, then walked deeper (digest, views)
        raise BundleError(f"{bundle_dir}: manifest nests too deeply (RecursionError)") from None


def _load_manifest(root: Path, full_verify: bool, verify: bool, trusted_keys) -> Manifest:
    mpath = root / MANIFEST
    m = _read_manifest(root)
    sv = m.get("schema_version")
    if sv != SCHEMA_VERSION:
        raise BundleError(f"{mpath}: unknown schema version {sv!r} (this runtime reads {SCHEMA_VERSION}); "
                          "re-export the bundle or upgrade safeclip-edge")
    if m.get("integrity") != integrity_of(m):
        raise BundleError(f"{mpath}: manifest integrity check failed (edited by hand or corrupted); "
                          "use safeclip-calibrate to change thresholds")
    try:
        keys = _trusted(trusted_keys)
        if keys is not None:
            keys.verify(signing_payload(m), m.get("signature"))
    except SigningError as e:
        raise BundleError(f"{mpath}: {e}") from None
    _check_gate(m)
    _require(m, ["name", "target", "files", "graphs", "preprocess"], "manifest")
    if not isinstance(m["files"], dict):
        raise BundleError("manifest: 'files' must be an object")
    for gname, g in m["graphs"].items():
        _require(g, ["file", "inputs", "outputs"], f"graphs.{gname}")
    _check_referenced(m)
    manifest = Manifest(root=root, data=m)
    for view in ("vision", "gate_config",
                 *(("decoder", "model_facts", "decoder_quantization") if "decoder" in m["graphs"] else ())):
        getattr(manifest, view)                              # typed views: a bad value refuses here
    if verify:
        verify_files(root, m["files"], full_verify=full_verify)
    return manifest


def _trusted(given) -> TrustedKeys | None:
    return trusted_keys(given)
