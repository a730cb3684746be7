"""``safeclip-build``: TensorRT engines for a bundle, built on the device that will run them.

    safeclip-build --bundle engines/llava [--timing-cache FILE] [--force] [--no-parity]

Runtime code: it runs on the device (a Jetson, a serving GPU), where only the runtime (numpy,
onnxruntime), TensorRT and cuda-python are installed; it never imports torch, transformers, onnx or the
exporter. The build steps are ``backends/trt_build.py``; the parity check runs the very backends that
will serve the engines (``backends/trt.py``) against ONNX Runtime (``backends/ort.py``).

For each graph in ``manifest["build"]["plan"]`` (``vision_gate``, ``decoder``) it builds an engine with
``backends.trt_build.engine_from_onnx``, using the plan's optimization profiles and workspace. The
graphs carry their own precision (fp16 with fp32 LayerNorm/softmax/gate islands, or fp32), so engines are
built *strongly typed* on TensorRT 10 and 11 alike: TensorRT keeps the exported types instead of demoting
the fp32 islands as ``BuilderFlag.FP16`` would (and TensorRT 11 has no such flag). Each engine is then
checked against ONNX Runtime on the same graph (a build gate, ``--no-parity`` skips it), written as
``<graph>.plan``, and recorded in ``manifest["build"]["engines"][graph]`` with the TensorRT version, GPU
name, compute capability, precision, profiles, size and sha256; the plan files join ``files`` and the
manifest is re-sealed atomically. An engine whose record matches this device, the graph and the build
settings (``cache_key``) is kept unless ``--force``.

Signed bundles (``signing.py``): rewriting the manifest invalidates the publisher's signature, so a signed bundle
is built only with ``--sign-key DEVICE.pem``, a device key whose public half the device trusts (in
``SAFECLIP_TRUSTED_KEYS`` beside the publisher's). The chain of trust: ``safeclip-build`` first verifies the
publisher's signature against the trusted keys (with ``--trusted-key`` or ``SAFECLIP_TRUSTED_KEYS`` set), and every
input file's hash; it then adds the plans, re-signs the whole manifest with the device key and records the
publisher's key id in ``build.signed_from``. The device key vouches only for what this device built on top of what
the publisher signed; keep it readable only by the user who builds (``chmod 600``).

Plans are built under temporary names and moved into place together just before the manifest is
rewritten; a crash in that instant leaves plans that do not match the manifest, which loading reports
and a re-run of ``safeclip-build`` repairs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import trt_build
from .backends.base import BackendError
from .backends.ort import OrtDecoder, make_session
from .manifest import BundleError, Manifest, load_manifest, sha256_file, verify_files, write_manifest
from .error_text import EXIT_INTERRUPTED, EXIT_USAGE, fail
from .host_memory import available_bytes
from .signing import TRUSTED_KEY_HELP
from .tolerances import engine_tolerance

PROG = "safeclip-build"
GRAPH_PRECISION = {"float16": "strongly_typed", "float32": "strongly_typed"}

__all__ = ["BuildError", "BuildReport", "BuildOutcome", "build_engines", "maybe_build_engines", "engine_parity",
           "main"]


class BuildError(RuntimeError):
    """The bundle cannot be built (no plan, unknown precision) or an engine failed its parity check."""


@dataclass
class BuildReport:
    bundle: Path
    built: dict[str, dict] = field(default_factory=dict)      # graph -> engine record
    kept: list[str] = field(default_factory=list)             # graphs whose engine was up to date
    seconds: float = 0.0


@dataclass
class BuildOutcome:
    built: bool
    message: str
    report: BuildReport | None = None


def graph_precision(graph: dict, fallback: str = "float32") -> str:
    """The precision a graph was exported in: its own record, else its KV cache dtype (decoder)."""
    return graph.get("precision") or (graph.get("kv") or {}).get("dtype") or fallback


def _compare(where: str, ref: np.ndarray, got: np.ndarray, precision: str) -> float:
    ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
    if ref.shape != got.shape:
        raise BuildError(f"{where}: engine output shape {list(got.shape)} differs from ONNX Runtime's {list(ref.shape)}")
    err, tol = float(np.abs(ref - got).max()) if ref.size else 0.0, engine_tolerance(precision).of(ref)
    if not np.isfinite(got).all() or err > tol:
        raise BuildError(f"{where}: engine differs from ONNX Runtime by {err:.3g} (tolerance {tol:.3g})")
    return err


def engine_parity(name: str, plan_path: Path, manifest: dict, root: Path, device: dict) -> dict[str, float]:
    """Max abs error of the engine against ONNX Runtime (CPU) on the same graph; raises :class:`BuildError`.

    vision_gate: one random image batch of the plan's opt size. decoder: a 6-token prompt of embedding-table
    rows, then 3 greedy decode steps, logits compared at every step (KV cache included). The decoder check
    is skipped (``{"skipped": reason}``) when ONNX Runtime's CPU reference would not fit next to the engine.
    """
    from .backends.trt import TrtDecoder, TrtVisionSession

    m = Manifest(Path(root), manifest)                  # the typed views of the manifest being built
    graph = manifest["graphs"][name]
    precision = graph_precision(graph, m.build.get("precision", "float32"))
    rng = np.random.default_rng(0)
    if name == "vision_gate":
        vision = m.vision
        ref = make_session(m.path(vision.file), "cpu")
        eng = TrtVisionSession(plan_path)
        try:
            pixels = vision.names.pixel_values
            shape = list(m.build_plan[name]["profiles"][0][pixels]["opt"])
            pv = rng.uniform(-1.8, 2.1, size=shape).astype(np.float32)           # pixel_values [B, 3, H, W]
            want, got = ref.run({pixels: pv}), eng.run({pixels: pv})
            return {k: _compare(f"{name} {k}", want[k], got[k], precision) for k in want}
        finally:
            eng.close()
    if name == "decoder":
        dec = m.decoder
        need, have = 3 * m.file_bytes(dec.files) + plan_path.stat().st_size, available_bytes()
        if have is not None and need > have:      # ORT CPU may hold fp32 copies of fp16 weights next to the engine
            return {"skipped": f"ONNX Runtime reference needs about {need / 2**30:.1f} GiB, "
                               f"{have / 2**30:.1f} GiB available"}
        table = np.load(m.path(m.embeddings_file), mmap_mode="r")    # [V, D]
        ref = OrtDecoder(m.path(dec.file), dec.kv, capacity=16, names=dec.names)
        eng = TrtDecoder(plan_path, dec.kv, capacity=16, names=dec.names)
        try:
            prompt = np.asarray(table[rng.integers(0, table.shape[0], 6)])        # [6, D]
            a, b = ref.prefill(prompt).copy(), eng.prefill(prompt).copy()
            worst = _compare(f"{name} prefill logits", a, b, precision)
            for step in range(3):
                tok = int(np.argmax(a))
                a, b = ref.decode_one_token(table[tok]).copy(), eng.decode_one_token(table[tok]).copy()
                worst = max(worst, _compare(f"{name} decode step {step + 1} logits", a, b, precision))
            return {"logits": worst}
        finally:
            eng.close()
    raise BuildError(f"no parity check for graph '{name}'")


def build_engines(bundle: str | Path, *, timing_cache: str | Path | None = None, force: bool = False,
                  parity: bool = True, progress: Callable[[str], None] = lambda s: None,
                  build_engine: Callable | None = None, device: dict | None = None,
                  check_parity: Callable | None = None, sign_key=None, trusted_keys=None) -> BuildReport:
    """Build every planned engine of ``bundle`` on this device and re-seal its manifest (module docstring).

    ``build_engine`` (default ``trt_build.engine_from_onnx``), ``device`` (default
    ``trt_build.device_key``) and ``check_parity`` (default :func:`engine_parity`) are
    parameters so the bookkeeping can be tested without a GPU.
    """
    t0 = time.perf_counter()
    m = load_manifest(bundle, verify=False, trusted_keys=trusted_keys)   # integrity, signature, schema; files below
    root, data = m.root, dict(m.data)
    if sign_key is not None:
        from .signing import load_signing_key
        sign_key = sign_key if hasattr(sign_key, "private") else load_signing_key(sign_key)
    elif m.signed_by:
        raise BuildError(f"{root}: the bundle is signed and adding engines rewrites its manifest: give --sign-key "
                         "DEVICE_KEY.pem (a key this device trusts) to re-sign it")
    build = dict(data.get("build") or {})
    plan = build.get("plan") or {}
    plans = {f"{g}.plan" for g in plan}
    verify_files(root, {k: v for k, v in data["files"].items() if k not in plans})   # graphs, tokenizer, ...
    if not plan:
        raise BuildError(f"{root}: target '{data.get('target')}' has no TensorRT build plan; "
                         "export with --target jetson or --target datacenter")
    device = dict(device) if device is not None else trt_build.device_key()
    build_engine = build_engine or trt_build.engine_from_onnx
    check_parity = check_parity or engine_parity
    engines, files = dict(build.get("engines") or {}), dict(data["files"])
    report, staged = BuildReport(root), []
    try:
        for name, spec in plan.items():
            graph = data["graphs"].get(name)
            if graph is None:
                raise BuildError(f"{root}: the build plan names '{name}', which the bundle does not have")
            gprec = graph_precision(graph, spec.get("precision", "float32"))   # what the graph really is
            if gprec not in GRAPH_PRECISION:
                raise BuildError(f"{name}: unknown graph precision '{gprec}' (supported: {', '.join(GRAPH_PRECISION)})")
            precision, onnx_sha = GRAPH_PRECISION[gprec], files[graph["file"]]["sha256"]
            key = trt_build.plan_cache_key(onnx_sha, device, precision, spec["profiles"], spec.get("workspace_bytes"))
            old, final = engines.get(name) or {}, f"{name}.plan"
            if not force and old.get("cache_key") == key and old.get("file") == final and _intact(root, files, final):
                progress(f"{name}: engine up to date ({final})")
                report.kept.append(name)
                continue
            tmp = root / f".{final}.building"
            staged.append(tmp)
            t1 = time.perf_counter()
            progress(f"{name}: building {precision} engine from {graph['file']} "
                     f"({len(spec['profiles'])} profile(s), workspace {spec.get('workspace_bytes')})")
            rec = build_engine(root / graph["file"], tmp, spec["profiles"], precision=precision,
                               workspace_bytes=spec.get("workspace_bytes"), timing_cache=timing_cache,
                               progress=lambda s, n=name: progress(f"{n}: {s}"), device=device)
            seconds = time.perf_counter() - t1
            errors = {}
            if parity:
                progress(f"{name}: checking the engine against ONNX Runtime")
                errors = check_parity(name, tmp, data, root, device)
                if "skipped" in errors:
                    progress(f"{name}: parity check skipped: {errors['skipped']}")
            report.built[name] = {**rec, "file": final, "graph": graph["file"], "onnx_sha256": onnx_sha,
                                  "graph_precision": gprec, "precision": precision, "cache_key": key,
                                  "profile_names": spec.get("profile_names") or [f"profile{i}" for i in range(len(spec["profiles"]))],
                                  "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "build_seconds": round(seconds, 1), "parity": errors}
            progress(f"{name}: built {rec['bytes'] / 2**20:.1f} MiB in {seconds:.1f}s")
        for name, rec in report.built.items():                     # move into place, hash, record
            path = root / rec["file"]
            os.replace(root / f".{rec['file']}.building", path)
            digest, size = sha256_file(path), path.stat().st_size
            if size != rec["bytes"] or digest != rec["sha256"]:
                raise BuildError(f"{path.name}: written plan ({size} bytes) differs from the built one ({rec['bytes']})")
            files[rec["file"]] = {"sha256": digest, "size": size}
            engines[name] = rec
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    if report.built:
        data["files"], data["build"] = files, {**build, "engines": engines}
        if m.signed_by:
            data["build"]["signed_from"] = m.signed_by             # the publisher key the device key builds on
        write_manifest(root, data, sign_key=sign_key)
    report.seconds = time.perf_counter() - t0
    return report


def _intact(root: Path, files: dict, name: str) -> bool:
    """The plan file is present and matches its manifest hash (a stale or half-moved plan is rebuilt)."""
    if name not in files:
        return False
    try:
        verify_files(root, {name: files[name]})
    except BundleError:
        return False
    return True


def maybe_build_engines(bundle: str | Path, progress: Callable[[str], None] = lambda s: None,
                        **kw) -> BuildOutcome:
    """For ``safeclip-export --target datacenter``: build at once when TensorRT and a GPU are here, else say
    what to run on the serving machine. Build failures (a bad graph, a parity failure) still raise."""
    try:
        device = trt_build.device_key()
    except trt_build.TensorRTUnavailable as e:
        return BuildOutcome(False, f"engines not built here ({str(e).split(':')[0]}); on the serving machine run: "
                                   f"safeclip-build --bundle {bundle}")
    report = build_engines(bundle, progress=progress, device=device, **kw)
    return BuildOutcome(True, f"engines built for {device['gpu_name']} (TensorRT {device['tensorrt_version']}) "
                              f"in {report.seconds:.0f}s", report)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safeclip-build", description="Build a bundle's TensorRT engines on this device "
                                "(TensorRT and cuda-python needed; no torch).")
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder written by safeclip-export")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="TensorRT timing cache file: read if present, written after the build (speeds up rebuilds)")
    p.add_argument("--force", action="store_true", help="rebuild engines even when they are up to date")
    p.add_argument("--no-parity", action="store_true", help="skip the engine vs ONNX Runtime check")
    p.add_argument("--sign-key", type=Path, default=None, metavar="DEVICE_KEY.pem",
                   help="re-sign the manifest with this Ed25519 key after adding engines (needed for signed bundles)")
    p.add_argument("--trusted-key", action="append", type=Path, default=None, metavar="PEM",
                   help=TRUSTED_KEY_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        report = build_engines(args.bundle, timing_cache=args.timing_cache, force=args.force,
                               parity=not args.no_parity, progress=progress, sign_key=args.sign_key,
                               trusted_keys=args.trusted_key)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted; the manifest was not changed", EXIT_INTERRUPTED, label=None)
    except trt_build.TensorRTUnavailable as e:                  # what to install on this machine
        return fail(PROG, e, EXIT_USAGE, label=None)
    except (BundleError, BuildError, BackendError, trt_build.EngineBuildError, trt_build.ProfileError,
            OSError, ValueError) as e:
        return fail(PROG, e)
    for name, rec in report.built.items():
        par = rec.get("parity", {})
        err = par.get("skipped") or ", ".join(f"{k} {v:.2e}" for k, v in par.items()) or "not checked"
        print(f"built   {name:12s} {rec['file']:18s} {rec['bytes'] / 2**20:9.1f} MiB  {rec['build_seconds']:7.1f}s  "
              f"parity: {err}", file=sys.stderr)
    for name in report.kept:
        print(f"kept    {name:12s} (up to date; --force rebuilds)", file=sys.stderr)
    print(report.bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
