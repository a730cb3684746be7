"""The language-model half of a LLaVA bundle: decoder graph with an explicit KV cache, plus embedding table.

Supported: ``LlavaForConditionalGeneration`` whose language model is a Llama-style decoder (LLaVA-1.5;
``model.model.language_model`` + ``model.lm_head``), with multi-head or grouped-query attention, in fp32
or fp16. Batch, sequence and past length are dynamic; a past length of 0 (prefill) works in the same graph.
Not supported: sliding-window attention (its cache drops old rows, which the runtime's append-only arena
does not); such a model is refused with a ``ValueError``.
The ``cpu`` target writes instead the graph of ONNX Runtime's fused operators (``fused=True``:
``export/fused_decoder.py``, KV form "shared"), through the same weight streaming, quantisation and parity gate.

Graph ``decoder.onnx`` (opset 18, weights in ``decoder.onnx.data``)::

    inputs_embeds            [B, S, D]        float   token embeddings, image features spliced in
    attention_mask           [B, P+S]         int64   1 = attend: left padding, and 0 on past rows the
                                                      runtime binds beyond a sequence's valid length
    position_ids             [B, S]           int64
    past_key_values.{i}.key  [B, KVH, P, Hd]  float   one pair per layer, P may be 0
    past_key_values.{i}.value
    -> logits                [B, 1, V]        float   last position only: all generation needs, and it
                                                      saves the [S, V] head matmul on prefill
    -> present.{i}.key       [B, KVH, S, Hd]  float   this call's keys and values ONLY (``kv.form`` "new"):
    -> present.{i}.value                              the runtime writes them into its one KV arena
                                                      (``runtime/backends/arena.py``), so no step rewrites
                                                      the cache

Why these choices:

* The token embedding table is *not* in the graph: it is written as ``embed_tokens.npy`` [V, D] and the
  runtime gathers rows with numpy. Generation needs one row per step (a 2*D-byte read) and the prompt
  needs image features spliced in anyway, so a graph call per token (or an embedding graph with a second
  [V, D] copy of the weights on the device) costs more than it saves; on Jetson the host and the GPU share
  memory, and on a discrete GPU one [1, 1, D] upload per step is negligible.
* Attention is exported through our own function (:func:`_attention_fp32_softmax`): transformers' cache
  layer is replaced by one that keeps past and new apart (:func:`_split_layer_class`), and the attention
  takes Q.K^T over each part, one softmax over the concatenated scores (small: [B, KVH, g*S, P+S]), and
  weights.V per part. No Concat of cache-sized tensors, and grouped-query attention reshapes Q to
  [B, KVH, g*S, Hd] instead of repeating K/V to H heads. The past feeds only MatMuls (the key's Transpose is
  folded into ONNX Runtime's FusedMatMul / TensorRT's matrix multiply; ``tests/test_decoder.py`` checks
  the graph). The scores, mask and softmax are explicitly fp32 (see the function for the onnxscript
  behaviour this avoids); Llama's RMSNorm already reduces in fp32. So the fp16 graph keeps those
  reductions in fp32 (TensorRT fp16 overflows in them otherwise), and :func:`export_decoder` checks it.
* torch.export specialises sample sizes 0 and 1, so the sample batch, sequence and past are all >= 2; the
  parity gate then runs the graph with P = 0 (prefill) and S = 1 (decode). ``attention_mask``'s length
  is P+S, which ``dynamic_shapes`` cannot express as ``Dim + Dim``: it gets its own ``Dim.DYNAMIC``.
* Parity is a build gate: ONNX Runtime vs transformers' own attention and cache (the reference keeps
  transformers' concatenating cache and returns the new rows by slicing) on a prefill (P = 0), a decode
  step whose past is that prefill's cache, and that step and a 3-token extension with the past padded the
  way the runtime binds it (bucket rows beyond the valid length, masked out; the extension's reference is
  the prefill itself, so the reference costs two passes over the weights). Tolerance is relative to the output's magnitude (floor 1):
  ``1e-4 * max(1, max|ref|)`` for fp32; for fp16 ``2e-2 * max(1, max|ref|)``, measured against the fp32
  reference (what the user would have got), not against fp16 PyTorch.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from safeclip.runtime.contract import DecoderGraph, ModelFacts
from safeclip.runtime.graph_spec import KV_FORM, KV_SHARED, DecoderNames, GraphSpec, KVSpec, decoder_spec
from safeclip.runtime.manifest import atomic_write
from safeclip.runtime.tolerances import export_tolerance

from .ort_fusions import SPLIT_MAX_BYTES
from .parity import ParityError, compare, run_onnx

__all__ = ["decoder_for_export", "export_decoder", "decoder_names", "ATOL"]

DTYPES = ("float32", "float16")
ATOL = {p: export_tolerance("decoder", p).atol for p in DTYPES}   # times max(1, max|ref|): runtime/tolerances.py
FP32_OPS = ("Softmax", "ReduceMean", "Pow", "Sqrt", "Reciprocal")    # must compute in fp32 in an fp16 graph


def _spec(layers: int, kv_heads: int = 1, head_dim: int = 1, hidden: int = 1, vocab: int = 1,
          dtype: str = "float32") -> GraphSpec:
    """The decoder's graph spec (``runtime/graph_spec.py``): names, dtypes, dimensions in positional order."""
    return decoder_spec(hidden, vocab, KVSpec(layers, kv_heads, head_dim, dtype), DecoderNames())


def decoder_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in positional order."""
    spec = _spec(num_layers)
    return spec.input_names, spec.output_names


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the [export] extra installs it
        raise ImportError("exporting needs torch: pip install 'safeclip-edge[export]'") from e
    return torch


def decoder_for_export(language_model, lm_head):
    """Llama-style language model + LM head with the KV cache as flat tensors (see the module docstring)."""
    return _wrapper_class()(language_model, lm_head)


@functools.lru_cache(maxsize=1)
def _wrapper_class():
    torch = _torch()

    class DecoderForExport(torch.nn.Module):
        def __init__(self, language_model, lm_head):
            super().__init__()
            self.language_model, self.lm_head = language_model, lm_head
            self.num_layers = language_model.config.num_hidden_layers

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            from transformers import DynamicCache

            # past: 2 * num_layers tensors [B, KVH, P, Hd], (key, value) per layer
            split = self.language_model.config._attn_implementation == ATTENTION
            cache = DynamicCache(config=self.language_model.config)
            if split:                                    # export: past and new stay apart (no cache-sized Concat)
                cache.layers = [_split_layer_class()(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
            else:                                        # reference: transformers' own cache and attention
                for i in range(self.num_layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=True)
            logits = self.lm_head(out.last_hidden_state[:, -1:, :])          # [B, 1, V]
            p, new = past[0].shape[2], []
            for layer in cache.layers:                                       # [B, KVH, S, Hd] each
                new += [layer.new_keys, layer.new_values] if split else [layer.keys[:, :, p:], layer.values[:, :, p:]]
            return (logits, *new)

    return DecoderForExport


ATTENTION = "safeclip_fp32_softmax"


class _Split(tuple):
    """(past, new) keys or values of one layer: [B, KVH, P, Hd] and [B, KVH, S, Hd], never concatenated."""


@functools.lru_cache(maxsize=1)
def _split_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SplitLayer(DynamicLayer):
        """A cache layer holding the graph's ``past`` input; ``update`` keeps the call's new keys and values
        apart and hands the attention a :class:`_Split` pair instead of ``cat(past, new)``."""

        def __init__(self, keys, values):
            super().__init__()
            self.keys, self.values, self.is_initialized = keys, values, True
            self.device, self.new_keys, self.new_values = keys.device, None, None

        def update(self, key_states, value_states, *args, **kwargs):
            self.new_keys, self.new_values = key_states, value_states
            return _Split((self.keys, key_states)), _Split((self.values, value_states))

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]                   # the bound past, padding rows included

    return SplitLayer


def _attention_fp32_softmax(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention over the past and the new keys apart, one fp32 softmax over their concatenated scores.

    ``key``/``value`` are :class:`_Split` pairs (past [B, KVH, P, Hd], new [B, KVH, S, Hd]). The query
    [B, H, S, Hd] is reshaped to [B, KVH, g*S, Hd] (g = H / KVH query heads per KV head, which are adjacent
    in Llama's head order), so grouped-query attention reads each KV head once instead of materialising
    ``repeat_kv``'s [B, H, P, Hd] copy. Only the scores [B, KVH, g*S, P+S] are concatenated: no tensor of
    the cache's size is written. ``attention_mask`` is the additive [B, 1, S, P+S] mask: padding rows of the
    past (the runtime's bucket rows beyond the valid length) get the dtype's minimum there.

    The scores, mask and softmax are explicitly fp32: eager attention calls ``softmax(x, dtype=torch.float32)``,
    which onnxscript's torchlib translates as Softmax in the input dtype followed by a Cast (onnxscript 0.7.2,
    ``aten_softmax``), i.e. an fp16 softmax in an fp16 graph. Casting the scores first keeps the fp32 island.
    """
    import torch

    (past_k, new_k), (past_v, new_v) = key, value
    b, h, s, hd = query.shape
    kvh = new_k.shape[1]
    g = h // kvh
    q = query.reshape(b, kvh, g * s, hd)                                       # [B, KVH, g*S, Hd]
    scores = torch.cat([torch.matmul(q, past_k.transpose(2, 3)),               # [B, KVH, g*S, P]
                        torch.matmul(q, new_k.transpose(2, 3))], dim=-1)       # [B, KVH, g*S, S]
    scores = scores.float() * scaling                                          # [B, KVH, g*S, P+S] fp32
    if attention_mask is not None:                                             # [B, 1, S, P+S]
        n = scores.shape[-1]
        scores = (scores.reshape(b, kvh, g, s, n) + attention_mask[:, :, None].float()).reshape(b, kvh, g * s, n)
    weights = torch.softmax(scores, dim=-1).to(query.dtype)
    p = past_k.shape[2]
    out = torch.matmul(weights[..., :p], past_v) + torch.matmul(weights[..., p:], new_v)   # [B, KVH, g*S, Hd]
    return out.reshape(b, h, s, hd).transpose(1, 2).contiguous(), None         # [B, S, H, Hd]


class _ExportAttention:
    """Route the language model through :func:`_attention_fp32_softmax` (eager masks), then restore.

    Registers the function under :data:`ATTENTION` in transformers' attention and mask registries (a
    name of our own; nothing existing is replaced).
    """

    def __init__(self, *configs):
        self.configs, self.saved = configs, []

    def __enter__(self):
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(ATTENTION, _attention_fp32_softmax)
        AttentionMaskInterface.register(ATTENTION, eager_mask)
        self.saved = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            c._attn_implementation = ATTENTION

    def __exit__(self, *exc):
        for c, v in zip(self.configs, self.saved):
            c._attn_implementation = v


def _kv_dims(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    kvh = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kvh, hd


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _first(*values):
    return next((v for v in values if v is not None), None)


def _model_facts(llava_model, tokenizer) -> ModelFacts:
    cfg, tcfg = llava_model.config, llava_model.config.get_text_config(decoder=True)
    gen = getattr(llava_model, "generation_config", None)
    eos: list[int] = []
    for v in (_ids(getattr(gen, "eos_token_id", None)) + _ids(getattr(tcfg, "eos_token_id", None))):
        if v not in eos:
            eos.append(v)
    image_token_id = _first(getattr(cfg, "image_token_id", None), getattr(cfg, "image_token_index", None))
    if image_token_id is None:
        raise ValueError("the model config names no image token (image_token_id / image_token_index)")
    if tokenizer is None:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(llava_model.name_or_path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"cannot load the tokenizer of '{llava_model.name_or_path}' to name the image token; "
                             "pass tokenizer= to export_decoder") from e
    image_token = tokenizer.convert_ids_to_tokens(int(image_token_id))
    if not image_token:
        raise ValueError(f"the tokenizer has no token for the image token id {image_token_id}")
    pad = _first(getattr(gen, "pad_token_id", None), getattr(tcfg, "pad_token_id", None),
                 getattr(cfg, "pad_token_id", None))
    bos = _first(getattr(gen, "bos_token_id", None), getattr(tcfg, "bos_token_id", None))
    return ModelFacts(vocab_size=int(tcfg.vocab_size), hidden_size=int(tcfg.hidden_size),
                      num_layers=int(tcfg.num_hidden_layers), context_length=int(tcfg.max_position_embeddings),
                      bos_token_id=None if bos is None else int(bos), eos_token_ids=tuple(eos),
                      pad_token_id=None if pad is None else int(pad), image_token_id=int(image_token_id),
                      image_token=image_token, image_seq_length=int(cfg.image_seq_length))


def _sample_args(torch, embed, b: int, s: int, p: int, kvh: int, hd: int, layers: int, dtype, gen):
    """Inputs for one call: real token embeddings (realistic scale) and random past of matching scale."""
    ids = torch.randint(0, embed.shape[0], (b, s), generator=gen)
    x = embed[ids].to(dtype)                                             # [B, S, D]
    mask = torch.ones(b, p + s, dtype=torch.int64)                       # [B, P+S]
    pos = torch.arange(p, p + s, dtype=torch.int64)[None].repeat(b, 1)   # [B, S]
    past = [torch.randn(b, kvh, p, hd, generator=gen).to(dtype) for _ in range(2 * layers)]
    return (x, mask, pos, *past)


def _np(t) -> np.ndarray:
    return t.detach().float().numpy() if t.dtype.is_floating_point else t.detach().numpy()


def _check_fp32_islands(onnx_path: Path) -> None:
    """In an fp16 graph, softmax and RMSNorm's reductions must compute in fp32 (TensorRT overflow)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in FP32_OPS
                  and types.get(n.input[0]) == onnx.TensorProto.FLOAT16})
    if bad:
        raise ParityError(f"fp16 decoder computes {', '.join(bad)} in fp16; they must stay fp32")


def _padded(torch, past, rows: int, gen) -> list:
    """``past`` followed by ``rows`` random rows: the runtime's bucket rows beyond the valid length."""
    return [torch.cat([t, torch.randn(*t.shape[:2], rows, t.shape[3], generator=gen).to(t.dtype)], dim=2)
            for t in past]


def _parity_cases(ref_wrapper, embed, kv: tuple[int, int, int]) -> list[tuple[str, tuple, tuple]]:
    """(name, inputs, reference) for: a prefill (P = 0, S = 7, B = 1); one decode step on that prefill's
    cache; the same step with the past bound as the runtime binds it, padded to a bucket of 12 rows whose
    last 5 are masked out (reference: the unpadded step's); the prefill's last 3 tokens as an extension of its
    first 4 rows, padded to a bucket of 8 (reference: the prefill's logits and rows 4..6, as causal attention
    makes them). Two reference passes in all, so each weight is read twice for the reference.

    The reference runs the model's own attention over transformers' concatenated cache; the graph's
    attention keeps past and new apart, so the check also covers the export attention.
    """
    torch = _torch()
    layers, kvh, hd = kv
    gen = torch.Generator().manual_seed(0)
    prefill = _sample_args(torch, embed, 1, 7, 0, kvh, hd, layers, torch.float32, gen)
    ids = torch.randint(0, embed.shape[0], (1, 1), generator=gen)
    ones = functools.partial(torch.ones, dtype=torch.int64)
    with torch.no_grad():
        ref = ref_wrapper(*prefill)                                      # new rows [1, KVH, 7, Hd]
        step = (embed[ids], ones(1, 8), torch.tensor([[7]]), *ref[1:])
        ref_step = ref_wrapper(*step)
    bucket = (step[0], torch.cat([ones(1, 7), 0 * ones(1, 5), ones(1, 1)], 1), step[2], *_padded(torch, ref[1:], 5, gen))
    ext = (prefill[0][:, 4:], torch.cat([ones(1, 4), 0 * ones(1, 4), ones(1, 3)], 1), torch.tensor([[4, 5, 6]]),
           *_padded(torch, [t[:, :, :4] for t in ref[1:]], 4, gen))
    ref_ext = (ref[0], *(t[:, :, 4:] for t in ref[1:]))
    return [("prefill", prefill, ref), ("decode", step, ref_step), ("decode, bucketed past", bucket, ref_step),
            ("extend, bucketed past", ext, ref_ext)]


def _parity(onnx_path: Path, cases, layers: int, dtype: str, names=None, run=run_onnx) -> list:
    """ONNX Runtime vs the fp32 reference on each case; raises ParityError (see the module docstring).
    ``names``: the graph's (inputs, outputs) (default: the traced graph's); ``run(path, feeds, outputs)``."""
    torch = _torch()
    tdtype = torch.float16 if dtype == "float16" else torch.float32
    in_names, out_names = names or decoder_names(layers)
    results = []
    for name, args, reference in cases:
        feeds = {n: (a.to(tdtype) if a.dtype.is_floating_point else a).numpy() for n, a in zip(in_names, args)}
        refs = {n: _np(r) for n, r in zip(out_names, reference)}
        got = run(onnx_path, feeds, out_names)
        atol = {n: export_tolerance("decoder", dtype, n).of(r) for n, r in refs.items()}
        results.append(compare(f"decoder[{dtype}] {name}", refs, got, atol))
    return results


def export_decoder(llava_model, out_dir: Path, dtype: str = "float32", tokenizer=None, weights=None,
                   progress=lambda msg: None, quant=None, ort_fusions: bool = False,
                   split_max_bytes: int = SPLIT_MAX_BYTES, fused: bool = False) -> dict:
    """Write ``decoder.onnx`` (+ ``.data``) and ``embed_tokens.npy`` into ``out_dir``; check parity.

    ``llava_model`` is either a model held in memory or a meta-device skeleton whose tensors ``weights`` (a
    :class:`~safeclip.export.weights.CheckpointWeights`) reads from the checkpoint. Either way the graph is traced
    on the meta device and the weights are streamed into the graph's data file one tensor at a time, converted
    to ``dtype``; the fp32 parity reference runs one decoder layer at a time (:class:`Materialized`), so the
    memory needed is one layer in fp32 plus ONNX Runtime's memory-mapped view of the written graph.

    Returns the manifest fragment ``{"graphs": {"decoder": ...}, "embeddings": ..., "model": ...}`` plus two
    keys that are not manifest sections: ``files`` (the paths written) and ``parity`` (the
    :class:`~safeclip.export.parity.ParityResult` of the prefill and decode checks). Raises
    :class:`~safeclip.export.parity.ParityError` when ONNX Runtime and PyTorch disagree beyond tolerance.
    ``tokenizer`` (a transformers tokenizer) names the image token; by default it is loaded from the
    model's own folder. ``quant`` (a :class:`~safeclip.export.quant.QuantScheme`) quantises the linear layers'
    weights as they are streamed; the reference then runs with the same dequantised weights and the gate is
    ``export/quant_parity.py``'s. ``ort_fusions`` (ONNX Runtime targets only) replaces each RMSNorm by ONNX
    Runtime's fused operator (:mod:`~safeclip.export.ort_fusions`) before the parity gate runs, and splits
    float MatMul weights larger than ``split_max_bytes`` (default ``SPLIT_MAX_BYTES``, 64 MiB: the fp32
    ``lm_head``) into column chunks so that ONNX Runtime's load-time prepacking never holds one of them twice;
    the manifest records the counts under ``fusions`` and ``split_weights``. ``fused`` (the cpu target) writes
    the graph of ONNX Runtime's fused operators instead (:mod:`~safeclip.export.fused_decoder`, KV form
    ``"shared"``; its weights take the same quantisation and splitting) when the model allows it, else says why
    through ``progress`` and writes the traced graph.
    """
    torch = _torch()
    from .onnx import block_progress, onnx_from_meta_module, weight_progress
    from .weights import Materialized, ModuleWeights, fqn_of_params, is_meta, meta_twin

    if dtype not in DTYPES:
        raise ValueError(f"unknown decoder dtype '{dtype}' (supported: {', '.join(DTYPES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm_cfg = llava_model.model.language_model.config
    layer_types = getattr(lm_cfg, "layer_types", None) or []
    if getattr(lm_cfg, "sliding_window", None) or "sliding_attention" in layer_types:
        raise ValueError("sliding-window attention is not supported by the decoder export (present != past + new)")
    layers, kvh, hd = _kv_dims(lm_cfg)
    facts = _model_facts(llava_model, tokenizer)
    tdtype = torch.float16 if dtype == "float16" else torch.float32
    if weights is None:
        if is_meta(llava_model):
            raise ValueError("a meta-device model needs weights= (where its tensors are read from)")
        weights = ModuleWeights(llava_model)
    skeleton = llava_model if is_meta(llava_model) else meta_twin(llava_model)
    fqn_of = fqn_of_params(skeleton)
    lm, head = skeleton.model.language_model, skeleton.lm_head
    wrapper = decoder_for_export(lm, head).eval()
    embed_fqn = fqn_of[id(lm.get_input_embeddings().weight)]
    if quant is not None:                            # int8/int4: the reference reads the dequantised weights
        from .quant_parity import bind
        quant, weights = bind(quant, lm, head, fqn_of, weights)

    # The fp32 reference, one block at a time: [V, D] embeddings only to draw realistic sample inputs.
    progress("decoder: parity reference (fp32, layer by layer)")
    embed = weights.read(embed_fqn, torch.float32)
    with Materialized([*lm.layers, lm.norm, head], fqn_of, weights, block_progress(progress, "decoder")):
        cases = _parity_cases(wrapper, embed, (layers, kvh, hd))
    if quant is not None:                            # the unquantised model on its own inputs: the error report
        with Materialized([*lm.layers, lm.norm, head], fqn_of, weights.base, block_progress(progress, "decoder")):
            base_cases = _parity_cases(wrapper, embed, (layers, kvh, hd))
    del embed

    why = None
    if fused:
        from . import fused_decoder as fd
        why = fd.unsupported(lm_cfg, dtype)
        if why:
            progress(f"decoder: writing the traced graph: the fused cpu graph does not take {why}")
        else:
            caches = fd.rope_caches(lm.rotary_emb, facts.context_length, torch)   # fp32, before the meta move
    fused = fused and why is None

    # Trace on the meta device in the target dtype; RoPE frequencies stay fp32 (Module.to would round them:
    # a relative error of ~5e-4 in a frequency is an angle error of ~2 rad at position 4096).
    buffers = {n: b.detach().clone() for n, b in wrapper.named_buffers()}
    for p in wrapper.parameters():                   # parameters only: buffers keep their dtype
        p.data = p.data.to(tdtype)
    wrapper.to("meta")
    in_names, out_names = decoder_names(layers)
    Dim = torch.export.Dim
    axes = _spec(layers).dynamic_axes(Dim, Dim.DYNAMIC)            # {name: {axis: Dim}}; past+seq: DYNAMIC
    dynamic = {arg: axes[n] for arg, n in zip(("inputs_embeds", "attention_mask", "position_ids"), in_names)}
    dynamic["past"] = tuple(axes[n] for n in in_names[3:])         # forward(inputs_embeds, mask, positions, *past)
    # sample sizes >= 2 everywhere: torch.export specialises 0 and 1
    gen = torch.Generator().manual_seed(1)
    sample = _sample_args(torch, torch.zeros(8, facts.hidden_size), 2, 5, 3, kvh, hd, layers, tdtype, gen)
    sample = tuple(t.to("meta") for t in sample)
    wrapper_fqn = {n: fqn_of[id(p)] for n, p in wrapper.named_parameters(remove_duplicate=False)}

    def tensor(name):
        if name in buffers:
            return buffers[name]
        return weights.read(wrapper_fqn[name]) if name in wrapper_fqn else None

    tick = weight_progress(progress, "decoder")

    onnx_path = out / "decoder.onnx"
    progress("decoder: tracing (meta device)")
    quant_pass, fusions, split = None, {}, {}
    if quant is not None:
        from .quant import QuantPass
        quant_pass = QuantPass(quant, weights.base.read, weights.fqns, wrapper_fqn)

    def graph_pass(model, jobs):
        if ort_fusions:
            from .ort_fusions import RMS_NORM_OP, fuse_rms_norm
            fusions[RMS_NORM_OP] = n = fuse_rms_norm(model)
            if n != 2 * layers + 1:                        # input + post-attention norm per layer, final norm
                progress(f"decoder: {n} of {2 * layers + 1} RMSNorms fused (the others keep the traced form)")
        if quant_pass is not None:
            jobs = quant_pass(model, jobs)
        if ort_fusions:                                    # float weights only: after the quantised ones are taken
            from .ort_fusions import split_wide_weights
            jobs, found = split_wide_weights(model, jobs, tensor, split_max_bytes, onnx_path.name)
            split.update({wrapper_fqn.get(k, k): v for k, v in found.items()})
        return jobs

    kv_spec = KVSpec(layers, kvh, hd, dtype)
    names, io_names, run = DecoderNames(), decoder_names(layers), run_onnx
    if fused:
        files, spec, names = fd.write_fused(lm_cfg, kv_spec, caches, facts.hidden_size, facts.vocab_size,
                                            onnx_path, tensor, wrapper_fqn, quant_pass, split_max_bytes, tick,
                                            fusions, split)
        io_names = (spec.input_names, spec.output_names)
        cases = fd.shared_cases(cases, torch)
        base_cases = fd.shared_cases(base_cases, torch) if quant is not None else None
        run = fd.shared_outputs(run_onnx, names.inputs_embeds, names.seqlens_k)
    else:
        with _ExportAttention(lm.config):
            files = onnx_from_meta_module(wrapper, sample, onnx_path, in_names, out_names, tensor,
                                          dynamic_shapes=dynamic, progress=tick, graph_pass=graph_pass)
    if dtype == "float16":
        _check_fp32_islands(onnx_path)
    progress("decoder: parity (ONNX Runtime vs the fp32 reference, prefill and decode)")
    if quant is None:
        parity = _parity(onnx_path, cases, layers, dtype, io_names, run)
    else:
        from .quant_parity import check
        parity, quant_report = check(onnx_path, cases, base_cases, io_names, dtype, quant, weights, run)

    data_name = files[1].name if len(files) > 1 else None
    emb_path = out / "embed_tokens.npy"
    table = weights.read(embed_fqn, tdtype).numpy()                      # [V, D]
    atomic_write(emb_path, lambda f: np.save(f, table))
    files.append(emb_path)

    spec = spec if fused else _spec(layers, kvh, hd, facts.hidden_size, facts.vocab_size, dtype)
    quantization = None
    if quant is not None:
        shared_input = quant_pass.fused if quant.fuse_shared_input else None      # not the graph's form
        quantization = {**quant.manifest(quant_pass.done, shared_input), "error": quant_report}
    graph = DecoderGraph(file=onnx_path.name, data=data_name, names=names, inputs=spec.inputs_by_name,
                         outputs=spec.outputs_by_name, kv=KVSpec(layers, kvh, hd, dtype), quantization=quantization,
                         fusions=fusions or None, kv_form=KV_SHARED if fused else KV_FORM,
                         split_weights=split or None)   # checkpoint FQN -> column chunks (ort_fusions.split_wide_weights)
    return {"graphs": {"decoder": graph.to_json()},
            "embeddings": {"file": emb_path.name, "dtype": dtype, "shape": list(table.shape)},
            "model": facts.to_json(), "files": files, "parity": parity}
