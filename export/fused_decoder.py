"""The cpu target's decoder graph, written directly with ONNX Runtime's fused contrib operators.

Supported: the Llama-style language models ``export/decoder.py`` exports (LLaVA-1.5's Llama/Mistral without
sliding windows), fp32, SiLU MLP without biases, no attention biases, a head size that is a multiple of 16
(``GroupQueryAttention`` with rotary requires it), RoPE whose frequencies do not depend on the sequence length
(default, linear, llama3, yarn, longrope-free: ``dynamic`` is refused). A model outside this set keeps the traced
graph of ``export/decoder.py`` (:func:`unsupported` says why); the export reports which form it wrote.

Per layer, as onnxruntime-genai's model builder (``builder.py``, ``make_layernorm`` / ``make_attention`` with
``GroupQueryAttention``) emits it::

    SkipSimplifiedLayerNormalization(x, residual)  (layer 0: SimplifiedLayerNormalization(x))
    MatMul q, k, v            -> one MatMul of the three weights side by side (fp32: pack_float_qkv), or one
                                 MatMulNBits (int8/int4: QuantPass fuses them); GQA takes it as packed QKV
    GroupQueryAttention       rotary inside (do_rotary, cos/sin caches [context, rotary_dim/2]),
                              past/present [B, KVH, C, Hd] bound to the same buffer: the new rows are written in place
    MatMul o
    SkipSimplifiedLayerNormalization(o, residual)
    MatMul gate, up -> Sigmoid, Mul, Mul (SiLU(gate) * up) -> MatMul down

then the final norm, the last position only (``Slice``) and ``lm_head``. Graph I/O (:func:`~safeclip.runtime.
graph_spec.shared_decoder_spec`, KV form ``"shared"``)::

    inputs_embeds            [B, S, D]     float
    seqlens_k                [B]           int32   each sequence's total length - 1 (after this call)
    total_sequence_length    []            int32   max over the batch of the total lengths
    past_key_values.{i}.key  [B, KVH, C, Hd]       the KV buffer of capacity C (rows beyond a sequence's
    past_key_values.{i}.value                      length are never read)
    -> logits                [B, 1, V]
    -> present.{i}.key       [B, KVH, C, Hd]       the same buffer, this call's rows written at
    -> present.{i}.value                           seqlens_k+1-S .. seqlens_k

Why written directly rather than rewritten from the traced graph: the traced attention (rotary as
Slice/Neg/Concat, GQA grouping as Reshape/Transpose, the mask arithmetic) is ~50 nodes a layer whose exact form
depends on the torch and transformers versions; matching it back to ``GroupQueryAttention`` would be a pattern
as brittle as that. A Llama layer is 9 operators, written here in ~100 lines; the parity gate against
transformers' own model (``decoder.py``) checks the result exactly as it checks the traced graph.
"""
from __future__ import annotations

import numpy as np

__all__ = ["unsupported", "fused_graph", "rope_caches", "pack_qkv", "pack_float_qkv", "write_fused", "shared_cases",
           "shared_outputs", "GQA_OP", "SKIP_NORM_OP", "NORM_OP"]

GQA_OP, SKIP_NORM_OP, NORM_OP = "GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"
MS = "com.microsoft"
OPSET = 18
STATIC_ROPE = ("default", "linear", "llama3", "yarn")     # frequencies fixed at export: one cos/sin cache


def unsupported(cfg, dtype: str) -> str | None:
    """Why the language model ``cfg`` cannot take the fused graph (None: it can)."""
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    checks = [(dtype != "float32", f"dtype {dtype} (the fused cpu graph is fp32)"),
              (getattr(cfg, "hidden_act", "silu") != "silu", f"activation {getattr(cfg, 'hidden_act', None)}"),
              (bool(getattr(cfg, "attention_bias", False)), "attention biases"),
              (bool(getattr(cfg, "mlp_bias", False)), "MLP biases"),
              (hd % 16 != 0, f"head size {hd} (GroupQueryAttention with rotary needs a multiple of 16)"),
              (rope_type not in STATIC_ROPE, f"RoPE type '{rope_type}' (supported: {', '.join(STATIC_ROPE)})")]
    return next((why for bad, why in checks if bad), None)


def rope_caches(rotary_emb, context: int, torch) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [context, rotary_dim/2] fp32 from the model's own rotary embedding (its scaling and
    ``attention_scaling`` included): transformers' cos is ``cat(freqs, freqs)``, GQA's cache is one half."""
    pos = torch.arange(context, dtype=torch.int64)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary_emb(probe, pos)                                 # [1, context, rotary_dim] each
    half = cos.shape[-1] // 2
    return (np.ascontiguousarray(cos[0, :, :half].float().numpy()),
            np.ascontiguousarray(sin[0, :, :half].float().numpy()))


def fused_graph(cfg, names: dict, kv, caches: tuple[np.ndarray, np.ndarray], vocab: int, param_names: set[str]):
    """The fused decoder as an ``onnx_ir`` model and its weight jobs (``onnx.write_streamed``'s form: init name ->
    (value, source parameter name, permutation)); the cos/sin caches are jobs producing their arrays.

    ``names``: ``{"inputs_embeds", "seqlens_k", "total_sequence_length", "logits"}`` tensor names; ``kv`` the
    :class:`KVSpec` (past/present name patterns); ``param_names``: the export wrapper's parameter names, which
    the weight sources must be (``DecoderForExport``: ``language_model.*``, ``lm_head.weight``)."""
    import onnx_ir as ir

    F, I32 = ir.DataType.FLOAT, ir.DataType.INT32
    L, H, KVH = cfg.num_hidden_layers, cfg.num_attention_heads, kv.num_kv_heads
    hd, D, eps = kv.head_dim, cfg.hidden_size, float(cfg.rms_norm_eps)
    nodes, jobs = [], {}

    def value(name, shape, dtype=F):
        return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))

    def weight(source, shape, perm=None):
        if source not in param_names:
            raise ValueError(f"the export wrapper has no parameter '{source}'")
        v = value(source, shape)
        jobs[source] = (v, source, perm)
        return v

    def linear(x, module, k, n, tag):                    # torch Linear [N, K] -> MatMul weight [K, N]
        return node("", "MatMul", [x, weight(f"{module}.weight", [k, n], (1, 0))], name=tag)

    def node(domain, op, ins, attrs=(), name=None, outs=1):
        n = ir.Node(domain, op, ins, list(attrs), num_outputs=outs, name=name)
        nodes.append(n)
        return n.outputs[0] if outs == 1 else n.outputs

    x = value(names["inputs_embeds"], ["batch", "seq", D])                # [B, S, D]
    seqlens = value(names["seqlens_k"], ["batch"], I32)                   # [B]
    total = value(names["total_sequence_length"], [], I32)                # scalar
    cos_v, sin_v = (value(n, list(c.shape)) for n, c in zip(("rope.cos_cache", "rope.sin_cache"), caches))
    for v, c in zip((cos_v, sin_v), caches):
        jobs[v.name] = (v, (lambda c=c: c), None)
    pasts, presents = [], []
    eps_attr = ir.AttrFloat32("epsilon", eps)
    gqa_attrs = [ir.AttrInt64("num_heads", H), ir.AttrInt64("kv_num_heads", KVH), ir.AttrInt64("do_rotary", 1),
                 ir.AttrInt64("rotary_interleaved", 0), ir.AttrFloat32("scale", hd ** -0.5),
                 ir.AttrInt64("local_window_size", -1)]
    h, residual, block_out = None, x, None
    for i in range(L):
        p = f"language_model.layers.{i}"
        w_in = weight(f"{p}.input_layernorm.weight", [D])
        if i == 0:
            h = node("", NORM_OP, [x, w_in], [ir.AttrInt64("axis", -1), eps_attr, ir.AttrInt64("stash_type", 1)],
                     name=f"{p}.input_layernorm")
        else:
            h, _, _, residual = node(MS, SKIP_NORM_OP, [block_out, residual, w_in], [eps_attr],
                                     name=f"{p}.input_layernorm", outs=4)
        q = linear(h, f"{p}.self_attn.q_proj", D, H * hd, f"{p}.q_proj")            # [B, S, H*Hd]
        k = linear(h, f"{p}.self_attn.k_proj", D, KVH * hd, f"{p}.k_proj")          # [B, S, KVH*Hd]
        v = linear(h, f"{p}.self_attn.v_proj", D, KVH * hd, f"{p}.v_proj")
        pk = value(kv.past_key.format(i=i), ["batch", KVH, "past", hd])
        pv = value(kv.past_value.format(i=i), ["batch", KVH, "past", hd])
        pasts += [pk, pv]
        attn, ok, ov = node(MS, GQA_OP, [q, k, v, pk, pv, seqlens, total, cos_v, sin_v], gqa_attrs,
                            name=f"{p}.attn", outs=3)
        ok.name, ov.name = kv.present_key.format(i=i), kv.present_value.format(i=i)
        for o in (ok, ov):
            o.shape, o.type = ir.Shape(["batch", KVH, "past", hd]), ir.TensorType(F)
        presents += [ok, ov]
        o = linear(attn, f"{p}.self_attn.o_proj", H * hd, D, f"{p}.o_proj")
        w_post = weight(f"{p}.post_attention_layernorm.weight", [D])
        h2, _, _, residual = node(MS, SKIP_NORM_OP, [o, residual, w_post], [eps_attr],
                                  name=f"{p}.post_attention_layernorm", outs=4)
        inter = cfg.intermediate_size
        g = linear(h2, f"{p}.mlp.gate_proj", D, inter, f"{p}.gate_proj")
        u = linear(h2, f"{p}.mlp.up_proj", D, inter, f"{p}.up_proj")
        act = node("", "Mul", [node("", "Mul", [g, node("", "Sigmoid", [g], name=f"{p}.sigmoid")], name=f"{p}.silu"),
                               u], name=f"{p}.gated")
        block_out = linear(act, f"{p}.mlp.down_proj", inter, D, f"{p}.down_proj")
    w_norm = weight("language_model.norm.weight", [D])
    normed = node(MS, SKIP_NORM_OP, [block_out, residual, w_norm], [eps_attr], name="language_model.norm", outs=4)[0]
    consts = {n: ir.Value(name=n, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                          const_value=ir.tensor(np.asarray([a], np.int64), name=n))
              for n, a in (("last.start", -1), ("last.end", np.iinfo(np.int64).max), ("last.axis", 1))}
    last = node("", "Slice", [normed, consts["last.start"], consts["last.end"], consts["last.axis"]],
                name="last_position")                                                   # [B, 1, D]
    logits = linear(last, "lm_head", D, vocab, "lm_head")                             # [B, 1, V]
    logits.name, logits.shape, logits.type = names["logits"], ir.Shape(["batch", 1, vocab]), ir.TensorType(F)
    graph = ir.Graph([x, seqlens, total, *pasts], [logits, *presents], nodes=nodes,
                     initializers=list(consts.values()), opset_imports={"": OPSET, MS: 1}, name="decoder")
    return ir.Model(graph, ir_version=10, producer_name="safeclip-export"), jobs


def pack_qkv(model) -> int:
    """GQA nodes whose q, k, v are the outputs 0, 1, 2 of one ``Split`` (QuantPass's fused q/k/v MatMulNBits)
    take the Split's input as packed QKV instead (``key``/``value`` omitted): one node and one copy fewer a
    layer, as onnxruntime-genai's builder packs them. Returns how many."""
    graph, n = model.graph, 0
    for node in list(graph):
        if node.op_type != GQA_OP or node.domain != MS:
            continue
        q, k, v = node.inputs[:3]
        split = q.producer() if q is not None else None
        if (split is None or split.op_type != "Split" or k is None or v is None or k.producer() is not split
                or v.producer() is not split or list(split.outputs) != [q, k, v]
                or any(len(list(o.uses())) != 1 for o in split.outputs)):
            continue
        sizes = split.inputs[1] if len(split.inputs) > 1 else None        # the split sizes, an initializer
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        graph.remove(split, safe=True)
        if sizes is not None and sizes.is_initializer() and not list(sizes.uses()):
            del graph.initializers[sizes.name]
        n += 1
    return n


def pack_float_qkv(model, jobs: dict, read, graph_name: str) -> tuple[dict, int]:
    """GQA nodes whose q, k, v are three float ``MatMul``s of one input with streamed weights (the fp32 graph,
    which no quantisation pass fused) take one ``MatMul`` of the three weights side by side [K, Nq+Nk+Nv] as
    packed QKV (``key``/``value`` omitted), as onnxruntime-genai's builder packs its float q/k/v: two MatMuls a
    layer fewer, each small k/v product no longer a kernel launch and a thread-pool hand-off of its own. The
    packed weight is a job that reads the three (``read``, the export's reader) when it is written, so one
    layer's q/k/v are in memory at a time. Returns (the jobs, the packed weight in the first one's place; how
    many nodes were packed)."""
    import onnx_ir as ir

    from .onnx import streamed_weight

    graph, packed, replaced = model.graph, 0, {}      # weight name -> (new name, new job), None: dropped
    for node in list(graph):
        if node.op_type != GQA_OP or node.domain != MS or node.inputs[1] is None or node.inputs[2] is None:
            continue
        outs = node.inputs[:3]
        mms = [t.producer() for t in outs]
        if any(m is None or m.op_type != "MatMul" or m.domain != "" for m in mms):
            continue
        x, ws = mms[0].inputs[0], [m.inputs[1] for m in mms]
        if (any(m.inputs[0] is not x for m in mms) or any(len(list(t.uses())) != 1 for t in (*outs, *ws))
                or any(w.name not in jobs or callable(jobs[w.name][1]) for w in ws)):
            continue
        k, ns = int(ws[0].shape[0]), [int(w.shape[1]) for w in ws]
        name = ws[0].name.replace(".q_proj.", ".qkv_proj.")
        w = ir.Value(name=name if name != ws[0].name else f"{ws[0].name}.qkv", shape=ir.Shape([k, sum(ns)]),
                     type=ws[0].type)
        parts = [jobs[v.name] for v in ws]

        def produce(parts=parts):
            return np.concatenate([streamed_weight(graph_name, read, v, src, perm).numpy()
                                   for v, src, perm in parts], axis=1)
        mm = ir.Node("", "MatMul", [x, w], name=mms[0].name.replace(".q_proj", ".qkv_proj"))
        graph.insert_before(mms[0], [mm])
        mm.outputs[0].type = outs[0].type
        mm.outputs[0].shape = ir.Shape([*list(outs[0].shape)[:-1], sum(ns)]) if outs[0].shape is not None else None
        node.replace_input_with(0, mm.outputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        for m in mms:
            graph.remove(m, safe=True)
        replaced[ws[0].name] = (w.name, (w, produce, None))
        replaced.update({v.name: None for v in ws[1:]})
        packed += 1
    out = {}
    for init_name, job in jobs.items():
        new = replaced.get(init_name, (init_name, job))
        if new is not None:
            out[new[0]] = new[1]
    return out, packed


def write_fused(cfg, kv, caches, hidden: int, vocab: int, onnx_path, read, source_of: dict, quant_pass,
                split_max_bytes: int, progress, fusions: dict, split: dict):
    """Build the fused graph and write it with its weights (``onnx.write_streamed``): the quantisation pass
    (``quant_pass``, or None), :func:`pack_qkv` (quantised q/k/v) or :func:`pack_float_qkv` (float ones), then
    ``ort_fusions.split_wide_weights`` on the float weights left. ``read(name)`` reads a wrapper parameter;
    ``source_of``: wrapper parameter name -> checkpoint FQN.
    Fills ``fusions`` (operator counts) and ``split`` (checkpoint FQN -> column chunks); returns (files written,
    the graph's spec, its ``SharedDecoderNames``)."""
    from dataclasses import asdict

    from safeclip.runtime.graph_spec import SharedDecoderNames, shared_decoder_spec

    from .onnx import write_streamed
    from .ort_fusions import split_wide_weights

    names = SharedDecoderNames()
    layers = kv.num_layers
    model, jobs = fused_graph(cfg, asdict(names), kv, caches, vocab, set(source_of))

    def graph_pass(model, jobs):
        jobs = quant_pass(model, jobs) if quant_pass is not None else jobs
        n = pack_qkv(model)
        jobs, n_float = pack_float_qkv(model, jobs, read, onnx_path.name)
        fusions.update({GQA_OP: layers, SKIP_NORM_OP: 2 * layers, NORM_OP: 1, "packed_qkv": n + n_float})
        jobs, found = split_wide_weights(model, jobs, read, split_max_bytes, onnx_path.name)
        split.update({source_of.get(k, k): v for k, v in found.items()})
        return jobs

    files = write_streamed(model, jobs, onnx_path, read, progress, graph_pass)
    return files, shared_decoder_spec(hidden, vocab, kv, names), names


def shared_cases(cases, torch, rows: int = 16, seed: int = 0) -> list:
    """``decoder.py``'s parity cases (inputs in the traced graph's order: embeddings, mask, positions, past
    [B, KVH, P', Hd]) as the fused graph takes them: each past's valid rows (the first P, P = the first position)
    at the start of a KV buffer of ``max(rows, P+S)`` rows whose other rows are large random values (a row the
    kernel should not read would show in the outputs), ``seqlens_k`` = P+S-1, ``total_sequence_length`` = P+S.
    The references are unchanged: logits and the call's new rows, which :func:`shared_outputs` cuts from the
    present buffers."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, args, reference in cases:
        x, _mask, pos, *past = args
        B, S = x.shape[0], x.shape[1]
        P = int(pos[0, 0])
        cap = max(rows, P + S)
        bufs = []
        for t in past:
            buf = 100 * torch.randn(B, t.shape[1], cap, t.shape[3], generator=gen).to(t.dtype)
            buf[:, :, :P] = t[:, :, :P]
            bufs.append(buf)
        lens = torch.full((B,), P + S - 1, dtype=torch.int32)
        out.append((name, (x, lens, torch.tensor(P + S, dtype=torch.int32), *bufs), reference))
    return out


def shared_outputs(run, embeds: str, seqlens: str):
    """``run(path, feeds, outputs) -> {name: array}`` whose KV outputs are cut to the call's new rows
    [B, KVH, S, Hd] (rows seqlens_k+1-S .. seqlens_k of each sequence), what the parity references hold."""
    def cut(path, feeds, outputs):
        got = run(path, feeds, outputs)
        S, lens = feeds[embeds].shape[1], feeds[seqlens]
        for n in outputs[1:]:
            got[n] = np.stack([got[n][b, :, int(n1) + 1 - S:int(n1) + 1] for b, n1 in enumerate(lens)])
        return got
    return cut
