"""Write a bundle: export every component into a temporary folder, check parity, hash, seal, then rename.

An interrupted export leaves no half bundle: everything is written under ``.<name>.tmp-*`` beside the
destination, and only a complete, sealed folder is moved into place (an existing bundle is replaced only
once the new one is complete, in one atomic exchange; a folder that is not a bundle is never overwritten).
One export per destination at a time; leftovers of an export killed with SIGKILL are cleaned by the next one
(``swap.py``).
"""
from __future__ import annotations

import errno
import os
import platform
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from safeclip.descriptors import load_descriptor_set
from safeclip.runtime.contract import DecoderGraph, GateConfig, VisionGraph
from safeclip.runtime.gate import DEFAULT_INSTRUCTION, GATE_VARIANTS, VIEW_MODES, check_policy, verdict_from_probs
from safeclip.runtime.graph_spec import VisionNames, vision_spec
from safeclip.runtime.manifest import MANIFEST, SCHEMA_VERSION, sha256_file, write_manifest
from safeclip.runtime.tolerances import export_tolerance

from .parity import ParityResult

FEATURE_ATOL = export_tolerance("vision_gate", "float32", "image_features").atol     # runtime/tolerances.py
PROB_ATOL = export_tolerance("vision_gate", "float32", "class_probs").atol
NEWLINE_FILE = "image_newline.npy"              # anyres: the learned newline row (graphs.vision_gate.image_newline)


@dataclass
class ExportOptions:
    model: str = "demo"
    clip: str | None = None
    vision_tower: str | None = None
    descriptors: str = "default"
    gate: str = "reference"
    threshold: float | None = None
    policy: str = "instruct"
    views: str = "any"                           # anyres models: how per-view verdicts combine
    target: str = "cpu"
    out: Path | None = None
    name: str | None = None
    with_decoder: bool = True
    weights: str | None = None                   # None: the target's float precision; int8 | int4 (export/quant.py)
    block_size: int | None = None
    symmetric: bool = True
    quant_method: str = "rtn"
    quantize_lm_head: bool | None = None         # None: export/quant.py's LM_HEAD_DEFAULT for the bit width
    lm_head_bits: int | None = None              # a quantised lm_head's bit width (None: LM_HEAD_DEFAULT / the body's)
    max_batch: int | None = None                 # TensorRT targets: decode profile size (None: the target's)
    fused_ops: bool | None = None                # decoder of ONNX Runtime's fused operators (None: the target's)
    sign_key: Path | None = None                 # Ed25519 private key (PEM): sign the manifest (runtime/signing.py)
    text_embeds_override: object = None          # tests: a controlled gate ([S, E] tensor)


@dataclass
class ExportReport:
    bundle: Path
    parity: list[ParityResult] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


class BundleExistsError(FileExistsError):
    pass


class DiskFullError(OSError):
    """The disk filled up during an export (the temporary folder is removed; nothing else is touched)."""


def _bytes_needed(src) -> int | None:
    """About what a bundle of ``src`` takes on disk: its weights at the checkpoint's width."""
    w = getattr(src, "weights", None)
    return w.nbytes() if w is not None and hasattr(w, "nbytes") else None


def default_name(opts: ExportOptions) -> str:
    base = opts.model if opts.model in ("demo", "demo-next") else Path(opts.model.rstrip("/")).name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base) or "bundle"


def _files_entry(root: Path) -> dict:
    return {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST}


def vision_gate_from_sources(src, dset, variant: str, text_embeds=None, model=None, weights=None):
    """Build the torch :class:`VisionGate` for a loaded LLaVA + CLIP and a descriptor set.

    ``model`` (default ``src.llava``) provides the tower and projector; the gate head's projection is a copy
    of CLIP's ``visual_projection``, so exporting the gate never changes ``src.clip``.
    """
    import copy

    from .descriptors import logit_scale_of, text_embeddings
    from .vision_gate import VisionGate

    parts = src.arch.vision_parts(model if model is not None else src.llava, weights)
    te = text_embeds if text_embeds is not None else text_embeddings(src.clip, src.clip_path, dset)
    return VisionGate(parts.tower, parts.projector, parts.feature_layer, parts.select_strategy, variant,
                      copy.deepcopy(src.clip.visual_projection), te, dset.class_index, len(dset.classes),
                      logit_scale_of(src.clip)).eval()


def _parity_inputs(size: int, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(1234)
    # pixel_values in the normalised range the processor produces (about [-1.8, 2.2])
    return rng.uniform(-1.8, 2.1, size=(batch, 3, size, size)).astype(np.float32)


def skeleton_and_weights(src):
    """(meta-device LLaVA, where its weights are read from) for streamed or loaded sources.

    Exporting a graph moves the skeleton's parts to the meta device for good, so a model held in memory gets
    a fresh skeleton for each export (a streamed checkpoint's skeleton is exported once)."""
    from .weights import ModuleWeights, is_meta, meta_twin

    if is_meta(src.llava):
        return src.llava, src.weights
    return meta_twin(src.llava), ModuleWeights(src.llava)


def export_vision_gate(src, dset, variant: str, tmp: Path, text_embeds=None,
                       precision: str = "float32", release: bool = False, image_newline: str | None = None,
                       progress: Callable[[str], None] = lambda s: None) -> tuple[dict, ParityResult]:
    """Export the vision+gate graph and check it against the fp32 PyTorch module (a build gate).

    Tolerances (``runtime/tolerances.py``), fp32: max abs error <= 1e-4 on image features and <= 1e-5 on
    probabilities. fp16 (GPU targets; LayerNorms and the gate head stay fp32): features within
    2e-2 x max(1, max|ref|), probabilities within 1e-3. In both cases the verdicts at several thresholds must
    equal those of the fp32 reference.

    The graph is traced on the meta device and its weights streamed from ``src`` (a checkpoint or a model in
    memory) into ``vision_gate.onnx.data``; the fp32 reference runs one encoder layer at a time. ``release=True``
    frees CLIP's text tower once the descriptor embeddings exist (``src`` is then only good for the
    language-model export). ``image_newline``: the anyres newline file the bundle will hold. Returns the
    manifest's ``graphs.vision_gate`` (a :class:`~safeclip.runtime.contract.VisionGraph`'s JSON).
    """
    import torch

    from .onnx import block_progress, onnx_from_meta_module, weight_progress
    from .parity import ParityError, compare, run_onnx
    from .vision_gate import HalfVisionGate
    from .weights import Materialized, fqn_of_params

    if precision not in ("float32", "float16"):
        raise ValueError(f"unknown precision '{precision}' (supported: float32, float16)")
    skeleton, weights = skeleton_and_weights(src)
    module = vision_gate_from_sources(src, dset, variant, text_embeds, model=skeleton, weights=weights)
    if release:
        src.clip.text_model = None                                       # embeddings are baked into `module`
    layers_computed = len(module.layers)
    vcfg = skeleton.config.vision_config
    size = vcfg.image_size
    sample = torch.from_numpy(_parity_inputs(size))                      # pixel_values [2, 3, S, S]
    fqn_of = fqn_of_params(skeleton)
    blocks = [module.embeddings, module.pre_layrnorm, *module.layers, module.projector,
              *([module.post_layernorm] if module.post_layernorm is not None else [])]
    progress("vision: parity reference (fp32, layer by layer)")
    with Materialized(blocks, fqn_of, weights, block_progress(progress, "vision")), torch.no_grad():
        feats, probs = module(sample)                                    # the fp32 reference
    ref = {VisionNames.image_features: feats.numpy(), VisionNames.class_probs: probs.numpy()}
    exported = module if precision == "float32" else HalfVisionGate(module, inplace=True).eval()
    real = {n: t.detach().clone() for n, t in [*exported.named_parameters(), *exported.named_buffers()]
            if t.device.type != "meta"}                                  # gate head, descriptors, position ids
    from_ckpt = {n: fqn_of[id(p)] for n, p in exported.named_parameters(remove_duplicate=False)
                 if p.device.type == "meta"}
    exported.to("meta")
    path = tmp / "vision_gate.onnx"
    axes = vision_spec(size).dynamic_axes(lambda s: torch.export.Dim(s, min=1, max=64), None)

    def tensor(name):
        return real[name] if name in real else weights.read(from_ckpt[name]) if name in from_ckpt else None

    tick = weight_progress(progress, "vision")

    progress("vision: tracing (meta device)")
    onnx_from_meta_module(exported, (sample.to("meta"),), path, [VisionNames.pixel_values],
                          [VisionNames.image_features, VisionNames.class_probs], tensor,
                          dynamic_shapes={"pixel_values": axes[VisionNames.pixel_values]}, progress=tick)
    del exported, module, real
    progress("vision: parity (ONNX Runtime vs the fp32 reference)")
    outputs = VisionNames().outputs                                      # image_features, class_probs
    got = run_onnx(path, {VisionNames.pixel_values: sample.numpy()}, list(outputs))
    tol = {n: export_tolerance("vision_gate", precision, n).of(ref[n]) for n in outputs}
    result = compare(f"vision_gate[{precision}]", ref, got, tol)
    # Verdicts from the graph must equal the reference rule applied to the fp32 module's output.
    for t in sorted({dset.default_threshold, 0.0, 0.3, 0.6}):
        for a, b in zip(ref[VisionNames.class_probs], got[VisionNames.class_probs]):
            va = verdict_from_probs(a, list(dset.classes), list(dset.safe_classes), t)
            vb = verdict_from_probs(b, list(dset.classes), list(dset.safe_classes), t)
            if (va.flagged, va.category) != (vb.flagged, vb.category):
                raise ParityError(f"vision_gate parity failed: verdicts differ at threshold {t}")
    n_tokens, d_lm = feats.shape[1], feats.shape[2]
    spec = vision_spec(size, n_tokens, d_lm, len(dset.classes), precision)
    graph = VisionGraph(file="vision_gate.onnx",
                        data="vision_gate.onnx.data" if (tmp / "vision_gate.onnx.data").exists() else None,
                        precision=precision, names=VisionNames(), inputs=spec.inputs_by_name,
                        outputs=spec.outputs_by_name, encoder_layers_computed=layers_computed,
                        encoder_layers_total=vcfg.num_hidden_layers, image_newline=image_newline)
    return graph.to_json(), result


def gate_self_test(folder: Path, vgraph: dict) -> dict:
    """``gate.self_test``: the exported vision+gate graph's answers on the fixed probes, from ONNX Runtime (CPU),
    which every load compares with the serving backend's (``runtime/selftest.py``)."""
    from safeclip.runtime.backends.ort import make_session
    from safeclip.runtime.selftest import record

    names = VisionNames(**(vgraph.get("names") or {}))
    sess = make_session(folder / vgraph["file"], "cpu")

    def run(pv):                                                   # pixel_values [1, 3, S, S]
        out = sess.run({names.pixel_values: pv})
        return out[names.image_features], out[names.class_probs]

    return record(run, int(vgraph["inputs"][names.pixel_values]["shape"][-1]), vgraph.get("precision", "float32"))


def _tokenizer_and_prompt(src, tmp: Path) -> tuple[dict, dict]:
    """The tokenizer file and the chat template, proven to render on the device as transformers renders it
    (:func:`~safeclip.export.templates.check_template`; a template that does not is refused, naming its file)."""
    from transformers import AutoTokenizer

    from .templates import chat_template_from_checkpoint, check_template

    tok = AutoTokenizer.from_pretrained(src.llava_path)
    image_token = getattr(tok, "image_token", None) or "<image>"
    template, source = chat_template_from_checkpoint(src.llava_path)
    check_template(template, str(Path(src.llava_path) / source), tok, image_token=image_token)
    tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    # every special token the template may print, as transformers hands them to it (special_tokens_map)
    specials = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, (str, list))}
    return ({"file": "tokenizer.json", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
             "pad_token": tok.pad_token, "special_tokens": specials},
            {"chat_template": template, "image_token": image_token, "template_source": source})


def export_bundle(opts: ExportOptions, progress: Callable[[str], None] = lambda s: None) -> ExportReport:
    """Export ``opts.model`` into a sealed bundle folder; returns where it went and the parity figures."""
    from .checkpoint import open_sources

    t0 = time.perf_counter()
    if opts.gate not in GATE_VARIANTS:
        raise ValueError(f"unknown gate variant '{opts.gate}' (supported: {', '.join(GATE_VARIANTS)})")
    if opts.views not in VIEW_MODES:
        raise ValueError(f"unknown view aggregation '{opts.views}' (supported: {', '.join(VIEW_MODES)})")
    check_policy(opts.policy)
    if opts.threshold is not None and not 0.0 <= opts.threshold < 1.0:
        raise ValueError(f"--threshold must be in [0, 1) (1 would never flag), got {opts.threshold}")
    sign_key = None
    if opts.sign_key is not None:                  # before any long work: a bad key fails at once
        from safeclip.runtime.signing import load_signing_key
        sign_key = load_signing_key(opts.sign_key)
    from .targets import target as target_preset
    tgt = target_preset(opts.target)
    if opts.max_batch is not None:
        from .targets import MAX_BATCH_LIMIT
        if tgt.build_engines == "never":
            raise ValueError(f"--max-batch sizes the TensorRT decode profile: it goes with --target jetson or "
                             f"datacenter (the {opts.target} target batches any number of sequences)")
        if isinstance(opts.max_batch, bool) or not 1 <= int(opts.max_batch) <= MAX_BATCH_LIMIT:
            raise ValueError(f"--max-batch must be 1..{MAX_BATCH_LIMIT}, got {opts.max_batch}")
    if opts.fused_ops and tgt.build_engines != "never":
        raise ValueError(f"the fused decoder (ONNX Runtime's contrib operators) goes with --target cpu: TensorRT "
                         f"does not parse them (the {opts.target} target keeps the standard operators)")
    from .quant import QuantError, scheme_for
    quant = scheme_for(opts.weights, tgt, opts.block_size, opts.symmetric, opts.quant_method,
                       opts.quantize_lm_head, opts.lm_head_bits)
    if quant is not None and not opts.with_decoder:
        raise QuantError(f"--weights {opts.weights} quantises the decoder; it cannot go with --no-decoder")
    dset = load_descriptor_set(opts.descriptors)
    out = Path(opts.out) if opts.out else Path("engines") / (opts.name or default_name(opts))
    if out.exists() and not (out / MANIFEST).is_file():
        raise BundleExistsError(f"{out} exists and is not a bundle; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    from .swap import OutputSlot
    slot = OutputSlot.acquire(out)               # one export per --out; cleans what a killed export left
    for note in slot.recovered:
        progress(note)
    if out.exists() and not (out / MANIFEST).is_file():
        slot.release()
        raise BundleExistsError(f"{out} exists and is not a bundle; choose another --out")
    tmp = slot.new_tmp()
    try:
        progress("loading checkpoints")
        src = open_sources(opts.model, opts.clip, tmp / "_work", vision_tower=opts.vision_tower)
        progress("checking the chat template (runtime vs transformers) and writing the tokenizer")
        tok_entry, prompt = _tokenizer_and_prompt(src, tmp)                  # before any long work
        progress("exporting vision + gate graph")
        newline = src.arch.vision_parts(src.llava, src.weights).image_newline
        vgraph, vparity = export_vision_gate(src, dset, opts.gate, tmp, opts.text_embeds_override,
                                             precision=tgt.precision, release=True, progress=progress,
                                             image_newline=None if newline is None else NEWLINE_FILE)
        parity = [vparity]
        graphs = {"vision_gate": vgraph}
        progress("recording the gate's self-test answers (runtime/selftest.py)")
        self_test = gate_self_test(tmp, vgraph)
        extra: dict = {}
        if opts.with_decoder:
            from .decoder import export_decoder
            progress("exporting language model (decoder with KV cache)")
            frag = export_decoder(src.llava, tmp, dtype=tgt.precision, weights=src.weights, progress=progress,
                                  quant=quant, ort_fusions=tgt.build_engines == "never",
                                  fused=tgt.fused_ops if opts.fused_ops is None else opts.fused_ops)
            graphs.update(frag["graphs"])
            extra = {k: v for k, v in frag.items() if k not in ("graphs", "files", "parity")}
            parity.extend(frag.get("parity", []))
        if tgt.build_engines != "never":
            # TensorRT targets: every graph must parse with the oldest TensorRT we support (JetPack 6: 10.3)
            # and the newest (11.x) before a device ever sees the bundle.
            from .trt_check import assert_tensorrt_compatible
            progress("checking graphs against TensorRT's ONNX parser (10.3, 11.4)")
            for g in graphs.values():
                for version in ("10.3", "11.4"):
                    assert_tensorrt_compatible(tmp / g["file"], version)
        progress("writing preprocessing and manifest")
        from .architectures import read_preprocessor_config
        preprocess = src.arch.preprocess_spec(read_preprocessor_config(src.llava_path), src.llava.config)
        if newline is not None:                         # anyres: packed between rows of tiles by the runtime
            np.save(tmp / NEWLINE_FILE, newline.astype(np.float32))
        shutil.rmtree(tmp / "_work", ignore_errors=True)
        import onnx
        import torch
        import transformers

        from .descriptors import logit_scale_of
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": out.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": opts.target,
            "architecture": src.arch.model_type,
            "source": {"model": opts.model, "model_revision": src.model_revision,
                       "clip": src.clip_id, "clip_revision": src.clip_revision,
                       "vision_tower": src.vision_tower_id or opts.model,
                       "vision_tower_revision": src.vision_tower_revision if src.vision_tower_id else src.model_revision},
            "producer": {"safeclip_edge": _version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "onnx": onnx.__version__,
                         "python": platform.python_version()},
            "files": _files_entry(tmp),
            "graphs": graphs,                                   # VisionGraph / DecoderGraph JSON (contract.py)
            "preprocess": preprocess,
            "gate": GateConfig(                                 # written through the contract that reads it
                variant=opts.gate, classes=tuple(dset.classes), safe_classes=tuple(dset.safe_classes),
                threshold=float(opts.threshold if opts.threshold is not None else dset.default_threshold),
                aggregation="sum", logit_scale=logit_scale_of(src.clip),
                views=opts.views if newline is not None else None,
                policy=opts.policy, instruction=DEFAULT_INSTRUCTION, refusals=dict(dset.refusals),
                descriptors={"name": dset.name, "version": dset.version, "sha256": dset.sha256,
                             "source": dset.source, "description": dset.description,
                             "sentences": {c: list(s) for c, s in zip(dset.classes, dset.sentences)}},
                history=[], self_test=self_test).to_json(),
            "tokenizer": tok_entry,
            "prompt": prompt,
            **extra,
            "build": {"target": opts.target, "precision": tgt.precision,
                      "context": min(tgt.context, int(extra.get("model", {}).get("context_length", tgt.context))),
                      "parity": {r.component: r.max_abs_err for r in parity},
                      "plan": build_plan(tgt, graphs, extra.get("model", {}), preprocess, opts.max_batch),
                      "engines": {}},
        }
        write_manifest(tmp, manifest, sign_key=sign_key)
        slot.put_in_place(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            need = _bytes_needed(src) if "src" in locals() else None
            hint = (f" (the bundle needs about {need / 1e9:.1f} GB)" if need and need >= 1e9 else
                    f" (the bundle needs about {need / 1e6:.1f} MB)" if need else "")
            raise DiskFullError(f"no space left on the disk of {out.parent.resolve()} while writing the bundle"
                                f"{hint}; nothing was written, an existing {out.name} is untouched") from None
        raise
    finally:
        slot.release()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return ExportReport(out, parity, time.perf_counter() - t0, peak)


def build_plan(tgt, graphs: dict, model: dict, preprocess: dict | None = None, max_batch: int | None = None) -> dict:
    """What ``safeclip-build`` does on the device: per graph, its optimisation profiles, precision, workspace
    (``max_batch``: the decoder's decode profile, default the target's)."""
    if tgt.build_engines == "never":
        return {}
    vg = graphs["vision_gate"]
    vnames = VisionNames(**(vg.get("names") or {}))
    size = vg["inputs"][vnames.pixel_values]["shape"][-1]
    views = 1
    if preprocess and preprocess.get("anyres"):
        from safeclip.runtime.anyres import max_views
        views = max_views(preprocess["anyres"]["grid_pinpoints"], preprocess["anyres"]["tile_size"])
    plan = {"vision_gate": {"profiles": tgt.vision_profiles(size, views, vnames), "precision": tgt.precision,
                            "workspace_bytes": tgt.workspace_bytes}}
    if graphs.get("decoder"):
        dec = DecoderGraph.from_json(graphs["decoder"])
        kv, hidden = dec.kv, dec.inputs[dec.names.inputs_embeds].shape[-1]
        from .targets import DECODER_PROFILE_NAMES

        profiles = tgt.decoder_profiles(hidden, kv.num_layers, kv.num_kv_heads, kv.head_dim,
                                        model.get("context_length", tgt.context), kv=kv, names=dec.names,
                                        max_batch=max_batch)
        plan["decoder"] = {"profiles": profiles, "precision": tgt.precision, "workspace_bytes": tgt.workspace_bytes,
                           "profile_names": list(DECODER_PROFILE_NAMES[:len(profiles)])}
    return plan


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("safeclip-edge")
    except Exception:
        return "unknown"
