"""Typed, validated views of a bundle manifest's sections: what the runtime reads, and nothing else.

``Manifest`` (``manifest.py``) hands these out (``m.vision``, ``m.decoder``, ``m.gate_config``, ...); loading
a bundle builds every one of them, so a manifest whose gate policy, view mode, tensor names or KV layout is
unusable refuses to serve with a one-line ``BundleError`` instead of failing on the first request.

Supported: schema version 1 with decoder contract 2: ``graphs.decoder.kv.form`` is ``"new"`` (``KV_FORM``), i.e.
the decoder's KV outputs are the call's new rows [B, KVH, S, Hd], which the runtime writes into its one KV
arena (``backends/arena.py``), or ``"shared"`` (``graph_spec.KV_SHARED``: the cpu target's fused graph,
``export/fused_decoder.py``), whose past and present KV are one buffer [B, KVH, C, Hd] that ONNX Runtime's
GroupQueryAttention writes in place (``backends/ort_shared.py``); its names are ``SharedDecoderNames``. A decoder without it (contract 1: ``present = concat(past, new)``, bundles
exported before the one-arena runtime) is refused with one line saying to re-export: serving it would
need a second, ping-pong arena this runtime does not have, and a re-export is the only step (the bundle's
other graphs are unchanged); a bundle without a decoder is not concerned. Graph tensor names come from
``graphs.<graph>.names`` (roles to names) and ``graphs.decoder.kv``; a bundle written before ``names``
existed gets the defaults of :class:`~safeclip.runtime.graph_spec.VisionNames` / ``DecoderNames``. Every
named tensor must be among the graph's declared inputs or outputs.

The graph sections are written through the same classes that read them: the exporter builds a
:class:`VisionGraph` / :class:`DecoderGraph` and writes its ``to_json()`` (every field that is not ``None``,
in field order), so a new field is one edit here. Tensors are the graph spec's ``TensorDecl``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Mapping

from .graph_spec import KV_FORM, KV_FORMS, DecoderNames, KVSpec, TensorDecl, VisionNames
from .gate import POLICIES, VIEW_MODES

DECODER_CONTRACT = 2            # bumped from 1 when the decoder's KV outputs became the new rows only

__all__ = ["DECODER_CONTRACT", "ContractError", "VisionGraph", "DecoderGraph", "GateConfig", "ModelFacts"]


class ContractError(ValueError):
    """A manifest section does not hold what the runtime needs (``manifest.py`` turns it into a BundleError)."""


def _json(value: Any) -> Any:
    """A section field as the manifest holds it: typed values through their ``to_json``, names by role."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, tuple):                  # as JSON reads it back: a list
        return [_json(v) for v in value]
    return value


def section_json(section) -> dict[str, Any]:
    """A typed manifest section as JSON: every field that is not ``None``, in field order."""
    return {f.name: _json(v) for f in fields(section) if (v := getattr(section, f.name)) is not None}


_KINDS = {str: "a text", int: "an int", Mapping: "an object"}


def _optional(graph: Mapping, key: str, kind: type, where: str):
    """``graph[key]`` when present (``None`` if not), refused with one line if it is not of ``kind``."""
    v = graph.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, kind)):
        raise ContractError(f"{where}.{key} must be {_KINDS[kind]}, got {v!r}")
    return v


def _tensors(graph: Mapping, key: str, where: str) -> dict[str, TensorDecl]:
    io = graph.get(key)
    if not isinstance(io, Mapping):
        raise ContractError(f"{where}.{key} must be an object of tensors")
    out = {}
    for name, spec in io.items():
        if not isinstance(spec, Mapping) or not isinstance(spec.get("shape"), list):
            raise ContractError(f"{where}.{key}.{name} needs a shape list")
        out[str(name)] = TensorDecl(str(name), tuple(spec["shape"]), str(spec.get("dtype", "")))
    return out


def _names(cls, graph: Mapping, where: str, inputs: Mapping, outputs: Mapping):
    given = graph.get("names") or {}
    if not isinstance(given, Mapping):
        raise ContractError(f"{where}.names must be an object of role: tensor name")
    roles = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(roles))
    if unknown:
        raise ContractError(f"{where}.names has unknown roles {unknown} (known: {', '.join(roles)})")
    names = cls(**{k: str(v) for k, v in given.items()})
    for n in names.inputs:
        if n not in inputs:
            raise ContractError(f"{where}: input '{n}' named in the manifest is not among the graph's inputs")
    for n in names.outputs:
        if n not in outputs:
            raise ContractError(f"{where}: output '{n}' named in the manifest is not among the graph's outputs")
    return names


@dataclass(frozen=True)
class VisionGraph:
    """``graphs.vision_gate``."""
    file: str
    data: str | None                         # external weights, when the graph has them
    precision: str | None                    # float32 / float16 (bundles written before it: None)
    names: VisionNames
    inputs: dict[str, TensorDecl]
    outputs: dict[str, TensorDecl]
    encoder_layers_computed: int | None = None      # the tower's layers the graph runs (up to the feature layer)
    encoder_layers_total: int | None = None
    image_newline: str | None = None         # anyres: the learned newline row, a hashed .npy

    @classmethod
    def from_json(cls, graph: Mapping, where: str = "graphs.vision_gate") -> "VisionGraph":
        if not isinstance(graph, Mapping) or not graph.get("file"):
            raise ContractError(f"{where} must name its file")
        ins, outs = _tensors(graph, "inputs", where), _tensors(graph, "outputs", where)
        return cls(file=graph["file"], data=_optional(graph, "data", str, where),
                   precision=_optional(graph, "precision", str, where),
                   names=_names(VisionNames, graph, where, ins, outs), inputs=ins, outputs=outs,
                   encoder_layers_computed=_optional(graph, "encoder_layers_computed", int, where),
                   encoder_layers_total=_optional(graph, "encoder_layers_total", int, where),
                   image_newline=_optional(graph, "image_newline", str, where))

    def to_json(self) -> dict[str, Any]:
        return section_json(self)

    @property
    def gate_width(self) -> Any:
        """The last dimension of the gate output: one probability per class."""
        return self.outputs[self.names.class_probs].shape[-1]


@dataclass(frozen=True)
class DecoderGraph:
    """``graphs.decoder``. ``quantization``, ``fusions`` and ``split_weights`` are carried as written (the
    exporter's records; the runtime's typed view of the first is :class:`WeightQuantization`)."""
    file: str
    data: str | None
    names: DecoderNames
    inputs: dict[str, TensorDecl]
    outputs: dict[str, TensorDecl]
    kv: KVSpec
    quantization: dict | None = None         # export/quant.py's scheme and error report
    fusions: dict | None = None              # ONNX Runtime fusions applied: {op: count}
    split_weights: dict | None = None        # checkpoint FQN -> column chunks (export/ort_fusions.py)
    kv_form: str = KV_FORM                   # a key of graph_spec.KV_FORMS, written as kv.form

    @classmethod
    def from_json(cls, graph: Mapping, where: str = "graphs.decoder") -> "DecoderGraph":
        if not isinstance(graph, Mapping) or not graph.get("file"):
            raise ContractError(f"{where} must name its file")
        ins, outs = _tensors(graph, "inputs", where), _tensors(graph, "outputs", where)
        kv = graph.get("kv")
        need = ("num_layers", "num_kv_heads", "head_dim", "dtype")
        if not isinstance(kv, Mapping) or any(k not in kv for k in need):
            raise ContractError(f"{where}.kv must give {', '.join(need)}")
        for k in need[:3]:
            if isinstance(kv[k], bool) or not isinstance(kv[k], int) or kv[k] < 1:
                raise ContractError(f"{where}.kv.{k} must be a positive int, got {kv[k]!r}")
        form = kv.get("form")
        if form is not None and form not in KV_FORMS:
            raise ContractError(f"{where}.kv.form '{form}' is not one this runtime reads "
                                f"({', '.join(KV_FORMS)}); re-export the bundle with this version's safeclip-export")
        if form is None:
            raise ContractError(f"{where}: this decoder returns past+new KV (decoder contract 1, exported before "
                                f"the one-arena runtime); re-export the bundle with safeclip-export "
                                f"(this runtime reads decoder contract {DECODER_CONTRACT}, kv.form "
                                f"{' or '.join(repr(f) for f in KV_FORMS)})")
        spec = KVSpec.from_manifest(kv)
        missing = [p for p, _ in spec.names() if p not in ins] + [o for _, o in spec.names() if o not in outs]
        if missing:
            raise ContractError(f"{where}: KV tensors {', '.join(missing[:4])} are not among the graph's I/O")
        extra = {k: _optional(graph, k, Mapping, where) for k in ("quantization", "fusions", "split_weights")}
        return cls(file=graph["file"], data=_optional(graph, "data", str, where),
                   names=_names(KV_FORMS[form], graph, where, ins, outs), inputs=ins, outputs=outs, kv=spec,
                   **{k: None if v is None else dict(v) for k, v in extra.items()}, kv_form=form)

    def to_json(self) -> dict[str, Any]:
        out = section_json(self)
        out["kv"]["form"] = out.pop("kv_form", KV_FORM)                   # KVSpec.to_json writes the default form
        return out

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.file, self.data) if f)


@dataclass(frozen=True)
class GateConfig:
    """``gate``: the gate's rule and where it came from, as the exporter writes it (:meth:`to_json`) and the
    runtime reads it (:meth:`from_json`); ``safeclip-calibrate`` changes ``threshold`` and appends to
    ``history``. Optional fields left at ``None`` are not written (``views``: single-view bundles; read as
    :attr:`view_rule` "any")."""
    variant: str
    classes: tuple[str, ...]
    safe_classes: tuple[str, ...]
    threshold: float
    aggregation: str | None = None           # how descriptor similarities become a class probability ("sum")
    logit_scale: float | None = None         # CLIP's, applied to the similarities (export/vision_gate.py)
    views: str | None = None                 # anyres: how views are combined, one of gate.VIEW_MODES
    policy: str = "instruct"                 # one of gate.POLICIES: the bundle's default for flagged images
    instruction: str | None = None
    refusals: dict[str, str] = field(default_factory=dict)
    descriptors: dict | None = None          # the descriptor set: name, version, sha256, source, sentences
    history: list | None = None              # safeclip-calibrate's changes of the threshold
    self_test: dict | None = None            # the gate's known-answer probes and answers (selftest.py)

    @property
    def view_rule(self) -> str:
        return self.views or "any"

    def to_json(self) -> dict[str, Any]:
        return section_json(self)

    @classmethod
    def from_json(cls, gate: Mapping) -> "GateConfig":
        classes, safe = gate.get("classes"), gate.get("safe_classes")
        if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
            raise ContractError("gate.classes must list at least two class names")
        if not isinstance(safe, list) or not safe or any(s not in classes for s in safe):
            raise ContractError("gate.safe_classes must name classes of gate.classes")
        if len(set(classes)) != len(classes):
            raise ContractError("gate.classes names a class twice")
        if set(safe) >= set(classes):              # every class safe: nothing could ever be flagged
            raise ContractError("gate.safe_classes covers every class: the gate could never flag an image")
        t = gate.get("threshold")
        # the rule is p > threshold with p <= 1: a threshold of 1 (or more) never fires, so it is refused
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) < 1.0:
            raise ContractError(f"gate.threshold must be a number in [0, 1), got {t!r} "
                                "(the gate flags p > threshold: 1 would never fire)")
        policy, views = gate.get("policy", "instruct"), gate.get("views")
        if policy not in POLICIES:
            raise ContractError(f"gate.policy '{policy}' is not one of {', '.join(POLICIES)}")
        if views is not None and views not in VIEW_MODES:
            raise ContractError(f"gate.views '{views}' is not one of {', '.join(VIEW_MODES)}")
        refusals = gate.get("refusals") or {}
        if not isinstance(refusals, Mapping) or not all(isinstance(v, str) for v in refusals.values()):
            raise ContractError("gate.refusals must map categories to texts")
        instruction = _optional(gate, "instruction", str, "gate")
        scale = gate.get("logit_scale")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise ContractError(f"gate.logit_scale must be a number, got {scale!r}")
        history = gate.get("history")
        if history is not None and not isinstance(history, list):
            raise ContractError("gate.history must be a list")
        return cls(str(gate.get("variant")), tuple(classes), tuple(safe), float(t),
                   _optional(gate, "aggregation", str, "gate"), None if scale is None else float(scale), views,
                   policy, instruction or None, dict(refusals), _optional(gate, "descriptors", Mapping, "gate"),
                   history, _optional(gate, "self_test", Mapping, "gate"))


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """``model``: what generation needs from the checkpoint (checked when the bundle has a decoder), as the
    exporter writes it (:meth:`to_json`, in this field order) and the runtime reads it. ``context_length``,
    ``eos_token_ids``, ``image_token_id`` and ``image_seq_length`` are required; the others describe the
    checkpoint (``None``: not written)."""
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    context_length: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None = None
    image_token_id: int
    image_token: str | None = None
    image_seq_length: int

    def to_json(self) -> dict[str, Any]:
        return section_json(self)

    @classmethod
    def from_json(cls, model: Mapping) -> "ModelFacts":
        for key in ("image_token_id", "image_seq_length", "eos_token_ids", "context_length"):
            if key not in model:
                raise ContractError(f"'model' lacks {key}")
        opt = {k: _optional(model, k, int, "model") for k in ("vocab_size", "hidden_size", "num_layers",
                                                                "bos_token_id", "pad_token_id")}
        return cls(context_length=int(model["context_length"]), image_token_id=int(model["image_token_id"]),
                   image_seq_length=int(model["image_seq_length"]),
                   eos_token_ids=tuple(int(i) for i in model["eos_token_ids"]), **opt,
                   image_token=_optional(model, "image_token", str, "model"))


@dataclass(frozen=True)
class WeightQuantization:
    """``graphs.decoder.quantization``: the weight-only scheme of an int8/int4 decoder (``export/quant.py``).

    ``form`` says which operator carries the weights: ``MatMulNBits`` (an ONNX Runtime contrib operator, CPU
    and CUDA providers) or ``DequantizeLinear`` (standard ONNX, opset 21; TensorRT targets). A bundle without
    the section has float weights. Whether this ONNX Runtime can run ``MatMulNBits`` is the ONNX Runtime
    backend's to say (``backends/ort.py``: ``matmulnbits_available``); this class only declares the scheme.
    """
    bits: int
    block_size: int | None                  # None: per output channel
    symmetric: bool
    method: str
    form: str
    layers: tuple[str, ...]
    lm_head: bool
    lm_head_bits: int | None = None         # a quantised head's own bit width (None: ``bits``)

    FORMS = ("MatMulNBits", "DequantizeLinear")

    @classmethod
    def from_json(cls, q: Mapping) -> "WeightQuantization":
        if not isinstance(q, Mapping):
            raise ContractError("graphs.decoder.quantization must be an object")
        bits, block, form = q.get("bits"), q.get("block_size"), q.get("form")
        if bits not in (4, 8) or isinstance(bits, bool):
            raise ContractError(f"graphs.decoder.quantization.bits must be 4 or 8, got {bits!r}")
        if form not in cls.FORMS:
            raise ContractError(f"graphs.decoder.quantization.form '{form}' is not one of {', '.join(cls.FORMS)}")
        if block != "per-channel" and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ContractError(f"graphs.decoder.quantization.block_size must be a positive int or "
                                f"'per-channel', got {block!r}")
        layers = q.get("layers") or []
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise ContractError("graphs.decoder.quantization.layers must list layer names")
        head_bits = q.get("lm_head_bits")
        if head_bits is not None and (head_bits not in (4, 8) or isinstance(head_bits, bool)
                                      or not q.get("lm_head") or form != "MatMulNBits"):
            raise ContractError(f"graphs.decoder.quantization.lm_head_bits must be 4 or 8 on a quantised "
                                f"MatMulNBits lm_head, got {head_bits!r}")
        return cls(int(bits), None if block == "per-channel" else int(block), bool(q.get("symmetric", True)),
                   str(q.get("method", "rtn")), str(form), tuple(layers), bool(q.get("lm_head", False)),
                   None if head_bits is None else int(head_bits))

