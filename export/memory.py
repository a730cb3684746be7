"""Memory estimate for ``safeclip-export --dry-run``: will this LLaVA model fit this Jetson Orin module?

Counted, for a LLaVA / LLaVA-NeXT config (``config.json`` as a dict, a transformers config, or a name in
:data:`MODELS`):

* weights: the whole CLIP vision tower (the reference gate computes one layer fewer; counted anyway, a
  conservative bound), the gate head (CLIP's visual projection; the descriptor embeddings are a few
  hundred rows and left out), the projector (+ LLaVA-NeXT's ``image_newline``), the language model with
  its embedding table (the runtime keeps it in host memory: on a Jetson that is the same DRAM) and
  ``lm_head``, all at the graph precision (fp16: 2 bytes, fp32: 4);
* the KV cache as the runtime allocates it: 2 (key, value) x layers x KV heads x head_dim x context x
  bytes, once (one arena written in place, ``runtime/backends/arena.py``; its one-call extension scratch,
  at most 512 positions, is left out as the activations are);
* activations, order of magnitude only: the vision tower on its largest batch of views (1 for LLaVA-1.5,
  5 for LLaVA-NeXT's default pinpoints), each layer holding tokens x (4 hidden + intermediate) values plus
  heads x tokens^2 attention scores; the decoder's prefill at the full context, tokens x (4 hidden +
  2 intermediate) values (attention fused, as TensorRT does for fp16).

* int8 / int4 weights (``--weights``, ``export/quant.py``): the language model's linear layers (q/k/v/o,
  gate/up/down) at 1 or 0.5 bytes per weight plus their scales (int4: one scale per block of
  :data:`QUANT_BLOCK` weights; int8 on TensorRT targets: one per output channel), at the graph precision's
  width; the embedding table, ``lm_head``, norms, projector and vision tower stay at the graph precision
  (the exporter's defaults). The KV cache and activations do not change.

fp8 and nf4 raise :class:`UnsupportedPrecision` (Jetson Orin, sm_87, has no FP8).

Usable memory per module is an assumption, stated in :data:`USABLE_ASSUMPTION`: the module's DRAM minus
2 GiB for a headless JetPack and the CUDA/TensorRT runtime. CPU and GPU share that DRAM.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

GiB = 1 << 30
BYTES = {"fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
WEIGHT_BITS = {"int8": 8, "int4": 4}
QUANT_BLOCK = 128                 # the exporter's default int4 block size
KV_ARENAS = 1                     # KV cache sets the runtime allocates (one arena: runtime/backends/arena.py)
UNSUPPORTED = ("fp8", "nf4")
OS_RESERVE_GIB = 2.0

# Module DRAM as NVIDIA names the modules (GB of LPDDR5 on the module).
ORIN_MODULES: dict[str, float] = {"AGX Orin 64GB": 64, "AGX Orin 32GB": 32, "Orin NX 16GB": 16, "Orin NX 8GB": 8,
                                  "Orin Nano 8GB": 8, "Orin Nano 4GB": 4}
USABLE_ASSUMPTION = (f"usable memory = module DRAM - {OS_RESERVE_GIB:g} GiB: a headless JetPack (kernel, firmware "
                     "carve-outs, services, about 1 GiB) plus the CUDA/TensorRT context and libraries (about 1 GiB); "
                     "with the desktop running, count about 1 GiB less. CPU and GPU share this memory.")

# LLaVA's default CLIP ViT-L/14-336 tower (transformers LlavaConfig / LlavaNextConfig default vision_config,
# the tower of every llava-hf checkpoint below).
_CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 336, "patch_size": 14, "projection_dim": 768}
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava(text: dict, next_: bool = False) -> dict:
    cfg = {"model_type": "llava_next" if next_ else "llava", "vision_config": dict(_CLIP_L_336),
           "text_config": {"tie_word_embeddings": False, **text}, "vision_feature_layer": -2}
    if next_:
        cfg["image_grid_pinpoints"] = _NEXT_PINPOINTS
    return cfg


# Architecture dims of the llava-hf checkpoints, from their config.json. The converters
# (transformers' convert_llava_weights_to_hf.py / convert_llava_next_weights_to_hf.py) take text_config from
# the base LM's config.json (lmsys/vicuna-7b-v1.5 and -13b-v1.5, mistralai/Mistral-7B-Instruct-v0.2,
# NousResearch/Nous-Hermes-2-Yi-34B) and resize the vocabulary by the added tokens, padded to a multiple of
# 64: 32000 + 2 -> 32064, and 64000 + 3 -> 64064 for the 34B.
MODELS: dict[str, dict] = {
    "llava-1.5-7b": _llava({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                            "max_position_embeddings": 4096}),
    "llava-1.5-13b": _llava({"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                             "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32064,
                             "max_position_embeddings": 4096}),
    "llava-v1.6-mistral-7b": _llava({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064,
                                     "max_position_embeddings": 32768}, next_=True),
    "llava-v1.6-vicuna-13b": _llava({"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                                     "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32064,
                                     "max_position_embeddings": 4096}, next_=True),
    "llava-v1.6-34b": _llava({"hidden_size": 7168, "intermediate_size": 20480, "num_hidden_layers": 60,
                              "num_attention_heads": 56, "num_key_value_heads": 8, "vocab_size": 64064,
                              "max_position_embeddings": 4096}, next_=True),
}
MODEL_SOURCES = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf (text: lmsys/vicuna-7b-v1.5)",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf (text: lmsys/vicuna-13b-v1.5)",
    "llava-v1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf (text: mistralai/Mistral-7B-Instruct-v0.2)",
    "llava-v1.6-vicuna-13b": "llava-hf/llava-v1.6-vicuna-13b-hf (text: lmsys/vicuna-13b-v1.5)",
    "llava-v1.6-34b": "llava-hf/llava-v1.6-34b-hf (text: NousResearch/Nous-Hermes-2-Yi-34B)",
}
# Hugging Face ids -> the table's names, so `--dry-run --model llava-hf/llava-1.5-7b-hf` works offline.
MODEL_IDS = {src.split(" ")[0]: name for name, src in MODEL_SOURCES.items()}
# transformers defaults for keys a sparse config.json leaves out (LlamaConfig, LlavaConfig)
_TEXT_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}

__all__ = ["UnsupportedPrecision", "MemoryEstimate", "estimate", "export_needs", "param_counts", "dry_run_table", "family_table",
           "MODELS", "MODEL_IDS", "MODEL_SOURCES", "ORIN_MODULES", "USABLE_ASSUMPTION", "usable_bytes", "model_config",
           "text_config"]


class UnsupportedPrecision(ValueError):
    """A precision this exporter cannot produce (fp8, nf4)."""


@dataclass(frozen=True)
class MemoryEstimate:
    name: str
    precision: str
    context: int
    params: dict[str, int]          # vision_tower, gate_head, projector, language_model
    weight_bytes: int
    kv_bytes: int
    vision_act_bytes: int
    decoder_act_bytes: int
    views: int
    kv_formula: str
    weights: str = ""               # fp16 | fp32 | int8 | int4 (the language model's linear layers)
    lm_weight_bytes: int = 0        # the language model's share of weight_bytes (embedding table included)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.vision_act_bytes + self.decoder_act_bytes


def _bytes_per(precision: str) -> int:
    p = str(precision).lower()
    if p in UNSUPPORTED:
        raise UnsupportedPrecision(f"{precision} weights are not supported by this exporter (Jetson Orin, sm_87, "
                                   "has no FP8; use int8 or int4)")
    if p not in BYTES:
        raise ValueError(f"unknown precision '{precision}' (supported: fp16, fp32, int8, int4)")
    return BYTES[p]


def linear_params(t: Mapping) -> tuple[int, int]:
    """(weights, output channels) of the language model's quantisable linear layers (q k v o gate up down)."""
    Ht, It, L = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    heads = t["num_attention_heads"]
    kvh = t.get("num_key_value_heads") or heads
    hd = t.get("head_dim") or Ht // heads
    weights = Ht * heads * hd + 2 * Ht * kvh * hd + heads * hd * Ht + 3 * Ht * It
    outputs = heads * hd + 2 * kvh * hd + Ht + 2 * It + Ht
    return L * weights, L * outputs


def _quant_bytes(t: Mapping, weights: str, b: int, per_channel_int8: bool = True) -> int:
    """Bytes saved by ``weights`` (int8/int4) on the linear layers, relative to ``b``-byte floats."""
    lin, outs = linear_params(t)
    bits = WEIGHT_BITS[weights]
    scales = outs * b if (bits == 8 and per_channel_int8) else lin // QUANT_BLOCK * b
    return lin * b - (lin * bits // 8 + scales)


def model_config(config_or_name: Any) -> tuple[str, dict]:
    """(name, config dict) of a table model name or id, a folder or config.json path, a config object or dict."""
    if isinstance(config_or_name, str) and config_or_name in MODEL_IDS:
        config_or_name = MODEL_IDS[config_or_name]
    if isinstance(config_or_name, str) and config_or_name in MODELS:
        return config_or_name, MODELS[config_or_name]
    if isinstance(config_or_name, (str, Path)):
        p = Path(config_or_name)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise ValueError(f"'{config_or_name}' is neither a known model ({', '.join(MODELS)}) nor a config.json")
        return p.parent.name, json.loads(p.read_text())
    if hasattr(config_or_name, "to_dict"):
        d = config_or_name.to_dict()
        return str(d.get("_name_or_path") or d.get("model_type") or "model"), d
    if isinstance(config_or_name, Mapping):
        return str(config_or_name.get("_name_or_path") or config_or_name.get("model_type") or "model"), dict(config_or_name)
    raise TypeError(f"expected a model name, a config dict or a config.json path, got {type(config_or_name).__name__}")


def text_config(cfg: Mapping) -> dict:
    """The language model's config of a LLaVA config, LLaVA-1.5's values where it leaves one out."""
    return {**_TEXT_DEFAULTS, **(cfg.get("text_config") or {})}


def _max_views(cfg: Mapping, tile: int) -> int:
    pins = cfg.get("image_grid_pinpoints")
    if not pins:
        return 1
    return 1 + max((h // tile) * (w // tile) for h, w in pins)


def param_counts(cfg: Mapping) -> dict[str, int]:
    """Parameters per component of a LLaVA / LLaVA-NeXT config (formulas in the module docstring)."""
    v = {**_CLIP_L_336, **(cfg.get("vision_config") or {})}
    t = text_config(cfg)
    H, I, n = v["hidden_size"], v["intermediate_size"], (v["image_size"] // v["patch_size"]) ** 2
    embeddings = 3 * v["patch_size"] ** 2 * H + H + (n + 1) * H          # patch conv (no bias), class, positions
    layer = 4 * (H * H + H) + 2 * 2 * H + (H * I + I) + (I * H + H)     # q k v o, 2 LayerNorms, fc1, fc2
    vision = embeddings + 2 * H + v["num_hidden_layers"] * layer + 2 * H  # + pre- and post-LayerNorm
    Ht, It, L = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    heads = t["num_attention_heads"]
    kvh = t.get("num_key_value_heads") or heads
    hd = t.get("head_dim") or Ht // heads
    lm_layer = Ht * heads * hd + 2 * Ht * kvh * hd + heads * hd * Ht + 3 * Ht * It + 2 * Ht
    vocab = t["vocab_size"]
    lm = vocab * Ht + L * lm_layer + Ht + (0 if t.get("tie_word_embeddings") else vocab * Ht)
    projector = H * Ht + Ht + Ht * Ht + Ht + (Ht if cfg.get("image_grid_pinpoints") else 0)   # + image_newline
    return {"vision_tower": vision, "gate_head": v.get("projection_dim", 768) * H, "projector": projector,
            "language_model": lm}


def estimate(config_or_name: Any, context: int, precision: str = "fp16", weights: str | None = None) -> MemoryEstimate:
    """Weights, KV cache and activation estimate of one model at ``context`` tokens; ``weights`` int8/int4
    quantises the language model's linear layers (``precision`` int8/int4: fp16 graphs with those weights)."""
    name, cfg = model_config(config_or_name)
    if str(precision).lower() in WEIGHT_BITS:
        precision, weights = "fp16", str(precision).lower()
    if weights is not None and weights not in WEIGHT_BITS:
        _bytes_per(weights)                          # fp8/nf4: UnsupportedPrecision; else unknown
        if weights not in BYTES:
            raise ValueError(f"unknown weights '{weights}' (supported: int8, int4)")
        weights = None
    b = _bytes_per(precision)
    v = {**_CLIP_L_336, **(cfg.get("vision_config") or {})}
    t = text_config(cfg)
    max_ctx = int(t["max_position_embeddings"])
    if not 1 <= int(context) <= max_ctx:
        raise ValueError(f"context {context} outside 1..{max_ctx}, the model's max_position_embeddings")
    params = param_counts(cfg)
    heads, L = t["num_attention_heads"], t["num_hidden_layers"]
    kvh = t.get("num_key_value_heads") or heads
    hd = t.get("head_dim") or t["hidden_size"] // heads
    kv = 2 * L * kvh * hd * int(context) * b * KV_ARENAS
    views = _max_views(cfg, v["image_size"])
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    H, I = v["hidden_size"], v["intermediate_size"]
    vision_act = views * b * (tokens * (4 * H + I) + v["num_attention_heads"] * tokens * tokens)
    dec_act = int(context) * b * (4 * t["hidden_size"] + 2 * t["intermediate_size"]) + 4 * t["vocab_size"]
    saved = _quant_bytes(t, weights, b) if weights else 0
    pname = "fp16" if b == 2 else "fp32"
    return MemoryEstimate(name, pname, int(context), params, sum(params.values()) * b - saved, kv,
                          vision_act, dec_act, views,
                          f"2 x {L} layers x {kvh} KV heads x {hd} x {context} tokens x {b} B, one arena",
                          weights or pname, params["language_model"] * b - saved)


def longest_context(config_or_name: Any, module: str, precision: str = "fp16", weights: str | None = None) -> int:
    """The longest context (tokens, at most the model's) whose estimate fits ``module``; 0: none does."""
    _, cfg = model_config(config_or_name)
    t = text_config(cfg)
    top = int(t["max_position_embeddings"])
    one, full = estimate(cfg, 1, precision, weights), estimate(cfg, top, precision, weights)
    per_token = (full.total_bytes - one.total_bytes) / max(top - 1, 1)          # KV + activations are linear
    room = usable_bytes(module) - one.total_bytes
    return 0 if room < 0 else min(top, 1 + int(room // per_token) if per_token else top)


# The streaming exporter's own memory (scripts/bench_export.py): Python, torch, transformers and CLIP's text
# tower, measured at about 0.65 GiB anonymous memory beside the weights at TinyLLaVA-1.5B and llava-1.5-7b shapes.
EXPORT_BASE_GIB = 0.7


def export_needs(e: MemoryEstimate, text: Mapping) -> tuple[int, int]:
    """(disk bytes, peak memory bytes) of exporting one model with the streaming exporter.

    Disk: the bundle, i.e. the weights at the graph precision (the temporary folder is renamed, not copied).
    Memory: the parity check of the largest graph (the decoder) runs ONNX Runtime on its memory-mapped weights,
    which are resident while it runs, plus two of the largest matrices in fp32 (an fp16 weight's Cast on the
    CPU, or one layer of the fp32 reference), plus the exporter itself. Weights are never held twice.
    """
    b = BYTES[e.precision]
    vocab, hidden = int(text["vocab_size"]), int(text["hidden_size"])
    decoder = (e.lm_weight_bytes or e.params["language_model"] * b) - vocab * hidden * b   # embeddings: not in it
    vision = (e.params["vision_tower"] + e.params["projector"]) * b
    largest = max(vocab * hidden, hidden * int(text["intermediate_size"])) * 4
    return e.weight_bytes, int(EXPORT_BASE_GIB * GiB) + max(decoder, vision) + 2 * largest


def usable_bytes(module: str, reserve_gib: float = OS_RESERVE_GIB) -> int:
    return int((ORIN_MODULES[module] - reserve_gib) * GiB)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _variants(precision: str, offer_int8: bool = True) -> list[tuple[str, str | None]]:
    """(label, weights) columns: the graph precision's floats, then int8 (unless not offered: TensorRT targets,
    ``export/quant.py``) and int4."""
    base = "fp16" if BYTES[str(precision).lower()] == 2 else "fp32"
    return [(base, None)] + ([("int8", "int8")] if offer_int8 else []) + [("int4", "int4")]


def dry_run_table(config_or_name: Any, context: int, precision: str = "fp16", weights: str | None = None,
                  offer_int8: bool = True) -> str:
    """Markdown: the estimate's breakdown (``weights``: int8/int4 linear layers), then, for float, int8 and int4
    weights, fits / does not fit for every Orin module at ``context`` and the longest context each fits."""
    e = estimate(config_or_name, context, precision, weights)
    b = BYTES[e.precision]
    rows = [("vision tower (CLIP ViT, all layers)", e.params["vision_tower"], None),
            ("gate head (visual projection)", e.params["gate_head"], None),
            ("projector" + (" + image_newline" if e.views > 1 else ""), e.params["projector"], None),
            ("language model (embedding table, layers, lm_head)" +
             (f"; linear layers {e.weights}" if e.weights != e.precision else ""), e.params["language_model"],
             e.lm_weight_bytes)]
    out = [f"### {e.name}: {e.weights} weights, {e.context} tokens of context", "",
           "| part | parameters | GiB |", "|---|---:|---:|"]
    out += [f"| {label} | {p / 1e6:,.1f} M | {_gib(nb if nb is not None else p * b)} |" for label, p, nb in rows]
    out += [f"| **weights** | {sum(e.params.values()) / 1e6:,.1f} M | {_gib(e.weight_bytes)} |",
            f"| KV cache ({e.kv_formula}) | | {_gib(e.kv_bytes)} |",
            f"| vision activations (order of magnitude, {e.views} view{'s' if e.views > 1 else ''}) | | "
            f"{_gib(e.vision_act_bytes)} |",
            f"| decoder activations at a {e.context}-token prefill (order of magnitude) | | {_gib(e.decoder_act_bytes)} |",
            f"| **total** | | **{_gib(e.total_bytes)}** |", ""]
    variants = _variants(precision, offer_int8)
    est = {label: estimate(config_or_name, context, precision, w) for label, w in variants}
    out += [f"Needed GiB at {context} tokens, and whether it fits:", "",
            "| module | usable GiB | " + " | ".join(f"{v} GiB | {v} fits" for v, _ in variants) + " |",
            "|---|---:|" + "---:|---|" * len(variants)]
    for module in ORIN_MODULES:
        u = usable_bytes(module)
        cells = [f"{_gib(est[v].total_bytes)} | {'yes' if est[v].total_bytes <= u else 'no'}" for v, _ in variants]
        out.append(f"| {module} | {_gib(u)} | " + " | ".join(cells) + " |")
    out += ["", "Longest context (tokens) that fits, up to the model's maximum ('-': none):", "",
            "| module | " + " | ".join(v for v, _ in variants) + " |", "|---|" + "---:|" * len(variants)]
    for module in ORIN_MODULES:
        cells = [longest_context(config_or_name, module, precision, w) for _, w in variants]
        out.append(f"| {module} | " + " | ".join(str(c) if c else "-" for c in cells) + " |")
    disk, peak = export_needs(e, text_config(model_config(config_or_name)[1]))
    out += ["", f"Exporting it (safeclip-export on the host, {e.weights} weights): about {_gib(disk)} GiB of disk for "
            f"the bundle and a peak of about {_gib(peak)} GiB of memory (weights are streamed from the checkpoint "
            "tensor by tensor; the parity check memory-maps the largest graph's weights)."]
    out += ["", f"Assumption: {USABLE_ASSUMPTION}",
            f"int8/int4: weight-only, linear layers of the language model (int4: blocks of {QUANT_BLOCK}"
            + (", int8: one scale per output channel" if offer_int8 else "; int8 is not offered on TensorRT targets")
            + "); embedding table, lm_head and vision tower at the graph precision; KV cache unchanged.",
            "Building the engines on the device (safeclip-build): see the TensorRT section (export/device_memory.py) "
            "for the build's peak per module."]
    return "\n".join(out) + "\n"


def family_table(context: int = 4096, precision: str = "fp16") -> str:
    """Markdown: every model of :data:`MODELS` against every Orin module at one context, for float, int8 and
    int4 weights (a cell lists the weights that fit)."""
    mods = list(ORIN_MODULES)
    variants = _variants(precision)
    out = [f"Needed GiB (weights + KV cache + activations) at {context} tokens for {', '.join(v for v, _ in variants)} "
           "weights; a module's cell lists the weights that fit its usable memory.", "",
           "| model | " + " | ".join(f"{v} GiB" for v, _ in variants) + " | " + " | ".join(mods) + " |",
           "|---|" + "---:|" * len(variants) + "---|" * len(mods)]
    for name in MODELS:
        est = [(v, estimate(name, context, precision, w)) for v, w in variants]
        cells = [", ".join(v for v, e in est if e.total_bytes <= usable_bytes(m)) or "no" for m in mods]
        out.append(f"| {name} | " + " | ".join(_gib(e.total_bytes) for _, e in est) + " | " + " | ".join(cells) + " |")
    out += ["", f"Assumption: {USABLE_ASSUMPTION}", "Model dims: " + "; ".join(f"{k}: {v}" for k, v in MODEL_SOURCES.items())]
    return "\n".join(out) + "\n"
