"""Weight-only int8 / int4 quantisation of the decoder's linear layers, inside the streaming export.

Supported (``safeclip-export --weights int8|int4``):

* block-wise round-to-nearest (``--quant-method rtn``) over the language model's linear layers: q/k/v/o
  and gate/up/down of every decoder layer; ``lm_head`` per :data:`LM_HEAD_DEFAULT` unless
  ``--quantize-lm-head`` / ``--no-quantize-lm-head`` / ``--lm-head-bits`` says otherwise: on ONNX Runtime
  targets the head is quantised to **int8 under both int8 and int4 bodies** (its own bit width,
  :meth:`QuantScheme.of`; TensorRT targets keep it at the graph precision). The head is one matrix whose errors
  land directly on the logits; measured at TinyLlama shape by ``scripts/bench_peers.py`` (BENCHMARKS.md,
  "lm_head"): an int8 head moves the logits far less than the int8 body already does (0.0066 mean |dlogits|
  against the fp32 head, top token kept at 98% of positions) and decodes 1.23x (int8 body) / 1.31x (int4
  body) faster than the fp32 head; an int4 head moves them 11x more than an int8 one and flips the top token at
  a fifth of positions for 3% more speed, which is why llama.cpp keeps its output layer at Q6_K under Q4_0 and
  why int4 bodies get an int8 head here. A head tied to the token embeddings is never quantised by default.
  The token embedding table is not quantised (``embeddings: "float"`` in the manifest): the runtime gathers
  one row of it per token from host memory, so it costs memory, not bandwidth, and a quantised table would
  need a dequantising gather in the runtime. The vision tower keeps its precision.
* block size 32, 64 or 128 along the input (reduction) dimension K, which must divide K of every quantised
  layer (else one :class:`QuantError` line naming the layer; nothing is written). Default: 128, or the
  largest of 64/32 that divides every layer (the demo's MLP has K = 160).
* symmetric (default) or with zero points (``--zero-point``; ONNX Runtime only: TensorRT's
  ``DequantizeLinear`` takes zero zero-points only).
* activation-aware methods (``awq``, ``gptq``) are refused with one line: the well-kept implementations
  (AutoAWQ, nvidia-modelopt's AWQ, onnxruntime's GPTQ/``NVAWQ`` configs) need the whole model in memory and a
  calibration pass over the full-precision ONNX or torch model, which the streaming exporter does not hold.
  onnxruntime's calibration-free ``HQQWeightOnlyQuantizer`` does work per tensor, but is not offered: measured
  on a [2048, 5632] weight (block 128, int4), its relative reconstruction error is 0.0975 against RTN's 0.1006
  with zero points (Gaussian weights) and 0.1406 against 0.1451 (Student-t, 4 degrees of freedom: heavy
  tails), a 3% gain, for 16.7-18.5 s per matrix on this 2-core CPU (another job sharing it) (about 3 h for a 7B model, against seconds
  for RTN) and float zero points; rounding its zero points to the uint8 ones MatMulNBits packs loses the gain
  (0.1006, 0.1451).

Graph forms:

* ONNX Runtime targets (``cpu``): ``com.microsoft.MatMulNBits`` (bits 4 and 8, ``block_size``, fp32
  activations, scales in the activation dtype). ``accuracy_level`` 4 (int8 compute) on the CPU: measured at
  TinyLlama MLP shapes with onnxruntime 1.32 (2 threads), bits=8 without it runs through a dequantise-each-call
  fallback about 14x slower than fp32, and int4 is 1.5x faster with it. Its cost is that activations are
  rounded to int8 per block inside the kernel: not gated (``runtime/tolerances.py``), measured by
  ``scripts/bench_quant.py``. Weights that read the same input with the same K (q/k/v, gate/up) are fused
  (``fuse_shared_input``) into one ``MatMulNBits`` whose N is their sum (the packed blocks, scales and zero
  points concatenated along N: the same bytes) followed by a ``Split``, as onnxruntime-genai's model builder
  packs them: 4 weight nodes per layer instead of 7, and the small k/v products (N = KVH*Hd) do not each
  pay a kernel launch and a thread-pool hand-off. Measured at TinyLlama shape (``scripts/profile_decode.py``,
  BENCHMARKS.md). The manifest lists the fused groups (``fused``).
* TensorRT targets (``jetson``, ``datacenter``): ``DequantizeLinear`` (opset 21) feeding ``MatMul``, fp16
  scales, int4 block-wise (``axis=0``, ``block_size``; TensorRT supports block quantisation for INT4 only). The
  graph's opset becomes 21. Checked by ``trt_check`` (block rules in ``trt_ops.json``). ``--weights int8`` is
  refused there (:data:`TRT_INT8_REFUSAL`): NVIDIA documents weight-only quantization for INT4 only. TensorRT's
  "Working with Quantized Types" (10.x and 11.0) lists "INT8 (signed 8-bit integer)" beside "INT4 (signed 4-bit
  integer, weight-only quantization)"; its INT8 GEMMs are explicit quantization with both inputs quantized
  (W8A8: a Q/DQ pair on the activation with a calibrated scale, which this calibration-free exporter does not
  produce), NvInfer.h (release/10.3) allows block quantization "for DataType::kINT4 only", and no INT8
  weight-only (W8A16) GEMM kernel is documented for sm_87: TensorRT-LLM ships its own plugin for exactly that
  (``WeightOnlyQuantMatmulPlugin``). A per-channel INT8 ``DequantizeLinear -> MatMul`` with fp16 activations
  therefore has no INT8 kernel to fuse into, and the memory saving in the engine is not something this project
  can promise (the dequantised weight may be folded to fp16 at build time). The graph form itself (int8 per
  output channel, ``axis=1``) is still checked by ``trt_check`` and produced by :func:`_int8_per_channel` for
  the day it is measured on a device.

Packing: onnxruntime's own quantizer, one tensor at a time. ``MatMulNBitsQuantizer`` walks a loaded
``ModelProto`` whose weights are all in memory (it reads each MatMul's initializer with ``get_initializer`` and
appends the packed tensors to the graph), which would break the exporter's one-tensor-at-a-time memory bound.
Its per-tensor packing function, ``DefaultWeightOnlyQuantizer.qbits_block_quant`` (the C++ kernels
``quantize_matmul_4bits`` / ``quantize_matmul_8bits`` for the MatMulNBits layout and
``quantize_qdq_matmul_4bits`` for the DequantizeLinear layout), takes one fp32 [K, N] array, so it is called here
as each weight is streamed. int8 per channel (TensorRT) has no helper there (MLAS block sizes stop at 256): it is
``round(w / (max|w| / 127))`` per column, written out in :func:`_int8_per_channel`.

The parity reference uses the *same* dequantised weights (:class:`DequantizedWeights`: the packed arrays
unpacked back to floats), so the gate checks the graph; the error against the unquantised model is measured
separately (``quant_parity.py``) next to the weights' own reconstruction error.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["QuantError", "QuantScheme", "scheme_for", "quantize", "dequantize", "DequantizedWeights",
           "QuantPass", "linear_fqns", "WEIGHT_CHOICES", "BLOCK_SIZES", "METHODS"]

WEIGHT_CHOICES = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = (32, 64, 128)
METHODS = ("rtn", "awq", "gptq")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MATMULNBITS, DQ = "MatMulNBits", "DequantizeLinear"
DQ_OPSET = 21                      # DequantizeLinear's block_size attribute and int4 inputs


class QuantError(ValueError):
    """An unsupported quantisation request, or a layer the scheme cannot quantise."""


@dataclass(frozen=True)
class QuantScheme:
    bits: int
    block_size: int | None         # None: per output channel (TensorRT int8) or "pick per model" before bind
    symmetric: bool = True
    method: str = "rtn"
    form: str = MATMULNBITS         # MatMulNBits | DequantizeLinear
    scale_dtype: str = "float32"    # the graph's activation dtype
    accuracy_level: int = 0         # MatMulNBits only
    lm_head: bool | None = False    # None: on by default (LM_HEAD_DEFAULT), off where tied to the embeddings
    layers: tuple[str, ...] = LINEARS
    fuse_shared_input: bool = False  # MatMulNBits only: one node per group of weights that read the same input
    lm_head_bits: int | None = None  # a quantised head's bit width when it differs from ``bits`` (MatMulNBits)
    head: str = ""                   # the head's checkpoint FQN (resolve_lm_head), for :meth:`of`

    def of(self, fqn: str) -> "QuantScheme":
        """The scheme one weight is quantised with: the head's own bit width for the head, else this one."""
        from dataclasses import replace

        if self.lm_head_bits is not None and self.lm_head_bits != self.bits and fqn == self.head:
            return replace(self, bits=self.lm_head_bits, lm_head_bits=None)
        return self

    def manifest(self, chosen: list[str] | None = None, fused: list[tuple[str, ...]] | None = None) -> dict:
        d = asdict(self)
        d.pop("head")
        if d["lm_head_bits"] is None:
            d.pop("lm_head_bits")
        d["layers"] = list(self.layers) + (["lm_head"] if self.lm_head else [])
        d["block_size"] = self.block_size if self.block_size else "per-channel"
        d.update({"weight_only": True, "embeddings": "float", "vision_tower": "unquantised",
                  "packing": "onnxruntime.quantization.matmul_nbits_quantizer (per tensor)"})
        if chosen is not None:
            d["quantized_tensors"] = len(chosen)
        if fused is not None:                        # e.g. [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]
            d["fused"] = [list(g) for g in sorted({tuple(f.rsplit(".", 2)[-2] for f in g) for g in fused})]
            d["fused_nodes"] = len(fused)
        return d


# The lm_head's bit width by the body's (``--weights``) on ONNX Runtime targets (MatMulNBits), None: kept at the
# float precision; TensorRT targets keep the head at the graph precision. From scripts/bench_peers.py at
# TinyLlama shape (module docstring, BENCHMARKS.md).
LM_HEAD_DEFAULT: dict[int, int | None] = {8: 8, 4: 8}
HEAD_BITS = (4, 8)


# One line: why --weights int8 is refused for TensorRT targets (module docstring, "TensorRT targets").
TRT_INT8_REFUSAL = ("--weights int8 is not offered for --target {target}: TensorRT documents weight-only quantization "
                    "for INT4 only (its INT8 GEMMs need calibrated INT8 activations too), so an int8 engine would not "
                    "be known to keep int8 weights on Orin; use --weights int4 or the default fp16")


def scheme_for(weights: str | None, target, block_size: int | None = None, symmetric: bool = True,
               method: str = "rtn", lm_head: bool | None = None, lm_head_bits: int | None = None
               ) -> QuantScheme | None:
    """Validate a ``--weights`` request for ``target`` (a :class:`~safeclip.export.targets.Target`); None for
    float weights. ``lm_head`` None: :data:`LM_HEAD_DEFAULT`; True: quantised, with ``lm_head_bits`` bits
    (default: the body's); ``lm_head_bits`` alone implies True. Raises :class:`QuantError` (one line) for
    anything unsupported."""
    float_name = "fp32" if target.precision == "float32" else "fp16"
    if weights in (None, float_name):
        if block_size is not None or not symmetric or method != "rtn" or lm_head or lm_head_bits is not None:
            raise QuantError("--block-size, --zero-point, --quant-method, --quantize-lm-head and --lm-head-bits "
                             "need --weights int8 or int4")
        return None
    if weights not in WEIGHT_CHOICES:
        raise QuantError(f"unsupported --weights '{weights}' (supported: {float_name}, int8, int4); "
                         "fp8 is not offered: Jetson Orin (sm_87) has no FP8")
    if weights in ("fp32", "fp16"):
        raise QuantError(f"--weights {weights} does not match --target {target.name}, whose graphs are "
                         f"{float_name} (use {float_name}, int8 or int4)")
    bits = int(weights[3:])
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise QuantError(f"unsupported --block-size {block_size} (supported: "
                         f"{', '.join(map(str, BLOCK_SIZES))})")
    if method not in METHODS:
        raise QuantError(f"unknown --quant-method '{method}' (supported: rtn)")
    if method != "rtn":
        raise QuantError(f"--quant-method {method} is not available: the maintained implementations need the "
                         "whole model in memory and a calibration pass, which the streaming export does not "
                         "hold; use rtn")
    trt = target.build_engines != "never"
    if trt and not symmetric:
        raise QuantError(f"--zero-point is not supported for --target {target.name}: TensorRT's "
                         "DequantizeLinear takes only zero zero-points (symmetric quantisation)")
    if trt and bits == 8:
        raise QuantError(TRT_INT8_REFUSAL.format(target=target.name))
    form = DQ if trt else MATMULNBITS
    per_channel = trt and bits == 8
    if lm_head_bits is not None:
        if isinstance(lm_head_bits, bool) or lm_head_bits not in HEAD_BITS:
            raise QuantError(f"unsupported --lm-head-bits {lm_head_bits} (supported: "
                             f"{', '.join(map(str, HEAD_BITS))})")
        if lm_head is False:
            raise QuantError("--lm-head-bits quantises lm_head; it cannot go with --no-quantize-lm-head")
        if trt and lm_head_bits != bits:
            raise QuantError(f"--lm-head-bits {lm_head_bits} is not offered for --target {target.name}: "
                             f"TensorRT targets quantise only int4 block-wise (the head stays fp16 by default)")
        lm_head = True
    elif lm_head is None:
        lm_head_bits = None if trt else LM_HEAD_DEFAULT[bits]
        lm_head = None if lm_head_bits else False
    return QuantScheme(bits, None if per_channel else block_size, symmetric, method, form, target.precision,
                       0 if trt else 4, lm_head, fuse_shared_input=not trt,
                       lm_head_bits=None if lm_head_bits in (None, bits) else lm_head_bits)


def linear_fqns(language_model, lm_head, fqn_of: dict[int, str], scheme: QuantScheme) -> set[str]:
    """Checkpoint FQNs of the weights the scheme quantises (the decoder layers' linear layers, lm_head if
    chosen)."""
    out = set()
    for name, mod in language_model.named_modules():
        if name.rsplit(".", 1)[-1] in scheme.layers and hasattr(mod, "weight"):
            out.add(fqn_of[id(mod.weight)])
    if scheme.lm_head is not False:
        head = fqn_of[id(lm_head.weight)]
        if head != fqn_of[id(language_model.get_input_embeddings().weight)]:
            out.add(head)
        elif scheme.lm_head:
            raise QuantError("lm_head is tied to the token embeddings, which stay unquantised; "
                             "leave --quantize-lm-head out for this model")
    return out


def resolve_lm_head(scheme: QuantScheme, fqns: set[str], lm_head, fqn_of: dict[int, str]) -> QuantScheme:
    """The scheme with ``lm_head`` True or False as :func:`linear_fqns` chose it (None: the default), and the
    head's FQN (:meth:`QuantScheme.of`); a head left float has no bit width of its own."""
    from dataclasses import replace

    head = fqn_of[id(lm_head.weight)]
    chosen = head in fqns
    return replace(scheme, lm_head=chosen, head=head, lm_head_bits=scheme.lm_head_bits if chosen else None)


def pick_block_size(scheme: QuantScheme, shapes: dict[str, tuple[int, int]]) -> QuantScheme:
    """The scheme with its block size fixed: the requested one, checked to divide K of every layer
    (``shapes``: FQN -> torch weight shape [N, K]), or the largest that divides all of them."""
    from dataclasses import replace

    if scheme.form == DQ and scheme.bits == 8:
        return scheme
    if scheme.block_size is not None:
        for fqn, (n, k) in sorted(shapes.items()):
            if k % scheme.block_size:
                fits = [b for b in BLOCK_SIZES if k % b == 0]
                hint = f" (--block-size {fits[-1]} divides it)" if fits else ""
                raise QuantError(f"layer '{fqn}' has K={k} input features, not divisible by the block size "
                                 f"{scheme.block_size}{hint}")
        return scheme
    for b in reversed(BLOCK_SIZES):
        if all(k % b == 0 for _, k in shapes.values()):
            return replace(scheme, block_size=b)
    fqn, (n, k) = min(shapes.items(), key=lambda kv: kv[1][1])
    raise QuantError(f"layer '{fqn}' has K={k} input features, not divisible by any block size "
                     f"({', '.join(map(str, BLOCK_SIZES))})")


def _np_dtype(name: str):
    return np.float16 if name == "float16" else np.float32


def quantize(w_kn: np.ndarray, scheme: QuantScheme) -> dict[str, np.ndarray]:
    """One weight [K, N] (fp32) -> the arrays the graph stores: ``packed``, ``scales`` (+ ``zero_points``)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    w_kn = np.ascontiguousarray(w_kn, dtype=np.float32)
    if scheme.form == DQ and scheme.bits == 8:
        return _int8_per_channel(w_kn, scheme)
    fmt = QuantFormat.QDQ if scheme.form == DQ else QuantFormat.QOperator
    cfg = DefaultWeightOnlyQuantConfig(block_size=scheme.block_size, is_symmetric=scheme.symmetric,
                                       bits=scheme.bits, quant_format=fmt)
    packed, scales, zp = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(w_kn)
    out = {"packed": packed, "scales": scales.astype(_np_dtype(scheme.scale_dtype))}
    if not scheme.symmetric:
        out["zero_points"] = zp
    return out


def _int8_per_channel(w_kn: np.ndarray, scheme: QuantScheme) -> dict[str, np.ndarray]:
    amax = np.abs(w_kn).max(axis=0)                                      # [N]
    scales = (np.where(amax > 0, amax, 1.0) / 127.0).astype(_np_dtype(scheme.scale_dtype))
    q = np.clip(np.rint(w_kn / scales.astype(np.float32)), -127, 127).astype(np.int8)
    return {"packed": q, "scales": scales}


def _nibbles(b: np.ndarray) -> np.ndarray:
    """uint8 bytes -> their 4-bit halves, low nibble first (ONNX and MatMulNBits packing)."""
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)


def dequantize(arrays: dict[str, np.ndarray], k: int, n: int, scheme: QuantScheme) -> np.ndarray:
    """The float32 [K, N] weight the graph computes with: the packed arrays unpacked (the parity oracle)."""
    s = arrays["scales"].astype(np.float32)
    if scheme.form == DQ and scheme.bits == 8:
        return arrays["packed"].astype(np.float32) * s[None, :]
    b, kb = scheme.block_size, k // scheme.block_size
    if scheme.form == DQ:                                                # int4 [K, N] row-major, signed
        q = _nibbles(arrays["packed"].reshape(1, -1))[0, :k * n].astype(np.int16)
        q = np.where(q > 7, q - 16, q).reshape(k, n).astype(np.float32)
        return (q.reshape(kb, b, n) * s[:, None, :]).reshape(k, n)
    packed = arrays["packed"]                                            # [N, kb, blob]
    q = (_nibbles(packed) if scheme.bits == 4 else packed).reshape(n, kb, b).astype(np.float32)
    if scheme.symmetric:
        z = np.full((n, kb), 8.0 if scheme.bits == 4 else 128.0, np.float32)
    else:
        zp = arrays["zero_points"]
        z = (_nibbles(zp)[:, :kb] if scheme.bits == 4 else zp.reshape(n, kb)).astype(np.float32)
    w_nk = ((q - z[..., None]) * s[..., None]).reshape(n, k)
    return np.ascontiguousarray(w_nk.T)


class DequantizedWeights:
    """A weights reader (``read(fqn, dtype)``) whose quantised layers come back dequantised.

    The fp32 parity reference reads through it, so PyTorch runs with exactly the weights the graph holds.
    One tensor at a time, like the reader it wraps; ``base`` is the unquantised reader.
    """

    def __init__(self, base, scheme: QuantScheme, fqns: set[str]):
        self.base, self.scheme, self.fqns = base, scheme, set(fqns)

    def read(self, fqn: str, dtype=None):
        import torch

        if fqn not in self.fqns:
            return self.base.read(fqn, dtype)
        w = self.base.read(fqn, torch.float32)                           # [N, K]
        n, k = w.shape
        sch = self.scheme.of(fqn)
        deq = dequantize(quantize(w.numpy().T, sch), k, n, sch)
        t = torch.from_numpy(np.ascontiguousarray(deq.T))
        return t.to(dtype) if dtype is not None else t

    def nbytes(self, prefix: str = "") -> int:
        return self.base.nbytes(prefix)


def replace_output(graph, node, out) -> None:
    """``out`` takes the place (name, shape, uses, graph output) of ``node``'s output; ``node`` goes."""
    y = node.outputs[0]
    name, y.name = y.name, None
    out.name, out.shape, out.type = name, y.shape, y.type
    if y in graph.outputs:                                               # a graph output keeps its name
        graph.outputs[graph.outputs.index(y)] = out
    y.replace_all_uses_with(out)
    graph.remove(node, safe=True)


@dataclass
class QuantPass:
    """The graph pass for :func:`~safeclip.export.onnx.onnx_from_meta_module`: every ``MatMul`` whose weight
    (a streamed initializer, already transposed to [K, N]) is one of ``fqns`` becomes ``MatMulNBits`` or
    ``DequantizeLinear`` + ``MatMul``; its jobs then stream the packed tensors, computed from the original
    weight (``read(fqn)``, fp32) when the first of them is written.

    ``source_of``: initializer source name (the traced module's parameter name) -> checkpoint FQN.
    """
    scheme: QuantScheme
    read: object
    fqns: set[str]
    source_of: dict[str, str]
    done: list[str] = field(default_factory=list)
    fused: list[tuple[str, ...]] = field(default_factory=list)
    _memo: dict = field(default_factory=dict)

    def __call__(self, model, jobs: dict) -> dict:
        import onnx_ir as ir

        graph, out = model.graph, {}
        sch = self.scheme
        arrays = ["packed", "scales"] + ([] if sch.symmetric else ["zero_points"])
        found = {}                                                       # init name -> (fqn, k, n, MatMul uses)
        for init_name, (value, source, _) in jobs.items():
            fqn = self.source_of.get(source)
            if fqn not in self.fqns:
                continue
            uses = list(value.uses())
            if len(value.shape) != 2 or not uses or any(u.op_type != "MatMul" or i != 1 for u, i in uses):
                raise QuantError(f"weight '{fqn}' is not used as a MatMul weight in the traced graph; "
                                 "cannot quantise it")
            found[init_name] = (fqn, *(int(d) for d in value.shape), [u for u, _ in uses])
        groups = self._groups(graph, found)
        for init_name, job in jobs.items():
            if init_name not in found:
                out[init_name] = job
                continue
            group = groups.get(init_name)
            if group is None:                                            # a later member of a fused group
                continue
            fqns = [found[i][0] for i in group]
            g = sch.of(fqns[0])                                          # the head may have its own bit width
            k, ns = found[group[0]][1], [found[i][2] for i in group]
            name = group[0] if len(group) == 1 else self._fused_name(group)
            shapes, dtypes = self._layout(k, sum(ns), g)
            vals = {a: ir.Value(name=f"{name}.q{g.bits}.{a}", shape=ir.Shape(shapes[a]),
                                type=ir.TensorType(dtypes[a])) for a in arrays}
            if len(group) == 1:
                for node in found[init_name][3]:
                    self._rewrite(graph, node, vals, k, ns[0], g)
            else:
                self._rewrite_fused(graph, [found[i][3][0] for i in group], vals, k, ns, name, g)
                self.fused.append(tuple(fqns))
            for a in arrays:
                out[vals[a].name] = (vals[a], self._producer(tuple(fqns), a, arrays, k, ns, g), None)
            self.done.extend(fqns)
        opsets = model.opset_imports
        if sch.form == MATMULNBITS:
            opsets["com.microsoft"] = 1
        else:
            opsets[""] = max(DQ_OPSET, opsets.get("", 0))
        return out

    def _groups(self, graph, found: dict) -> dict[str, list[str]]:
        """First member's init name -> the init names computed by one node: weights with one MatMul use each
        that share that MatMul's input and K (q/k/v, gate/up) when the scheme fuses, else each alone."""
        if not (self.scheme.fuse_shared_input and self.scheme.form == MATMULNBITS):
            return {i: [i] for i in found}
        order = {id(node): j for j, node in enumerate(graph)}
        by_input: dict[tuple, list[str]] = {}
        for init_name, (fqn, k, n, uses) in found.items():
            key = (id(uses[0].inputs[0]), k, self.scheme.of(fqn).bits) if len(uses) == 1 else ("alone", init_name)
            by_input.setdefault(key, []).append(init_name)
        return {g[0]: g for g in (sorted(g, key=lambda i: order[id(found[i][3][0])]) for g in by_input.values())}

    @staticmethod
    def _fused_name(group: list[str]) -> str:
        """``a.b.q_proj.weight`` + ``a.b.k_proj.weight`` -> ``a.b.q_proj+k_proj.weight``."""
        parts = [g.split(".") for g in group]
        if all(len(p) == len(parts[0]) and p[:-2] == parts[0][:-2] and p[-1] == parts[0][-1] for p in parts):
            return ".".join(parts[0][:-2] + ["+".join(p[-2] for p in parts), parts[0][-1]])
        return "+".join(group)

    def _rewrite_fused(self, graph, nodes: list, vals: dict, k: int, ns: list[int], name: str,
                       sch: QuantScheme) -> None:
        """One MatMulNBits with N = sum(ns) over the MatMuls ``nodes`` (same input), then a Split into their
        outputs, inserted where the first of them was."""
        import onnx_ir as ir

        x = nodes[0].inputs[0]
        attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", sum(ns)), ir.AttrInt64("bits", sch.bits),
                 ir.AttrInt64("block_size", sch.block_size)]
        if sch.accuracy_level:
            attrs.append(ir.AttrInt64("accuracy_level", sch.accuracy_level))
        ins = [x, vals["packed"], vals["scales"]] + ([vals["zero_points"]] if "zero_points" in vals else [])
        mm = ir.Node("com.microsoft", "MatMulNBits", ins, attrs, name=f"{nodes[0].name}_Q{sch.bits}_fused")
        split = ir.Value(name=f"{name}.split", shape=ir.Shape([len(ns)]), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(np.asarray(ns, np.int64), name=f"{name}.split"))
        graph.register_initializer(split)
        sp = ir.Node("", "Split", [mm.outputs[0], split], [ir.AttrInt64("axis", -1)], num_outputs=len(ns),
                     name=f"{nodes[0].name}_split")
        graph.insert_before(nodes[0], [mm, sp])
        y0 = nodes[0].outputs[0]
        mm.outputs[0].type = y0.type
        if y0.shape is not None:
            mm.outputs[0].shape = ir.Shape([*list(y0.shape)[:-1], sum(ns)])
        for node, out in zip(nodes, sp.outputs):
            replace_output(graph, node, out)


    @staticmethod
    def _layout(k: int, n: int, sch: QuantScheme):
        import onnx_ir as ir

        fdt = ir.DataType.FLOAT16 if sch.scale_dtype == "float16" else ir.DataType.FLOAT
        if sch.form == DQ and sch.bits == 8:
            return {"packed": [k, n], "scales": [n]}, {"packed": ir.DataType.INT8, "scales": fdt}
        kb = k // sch.block_size
        if sch.form == DQ:
            return ({"packed": [k, n], "scales": [kb, n]}, {"packed": ir.DataType.INT4, "scales": fdt})
        blob = sch.block_size * sch.bits // 8
        zp = [n, (kb + 1) // 2] if sch.bits == 4 else [n, kb]
        return ({"packed": [n, kb, blob], "scales": [n, kb], "zero_points": zp},
                {"packed": ir.DataType.UINT8, "scales": fdt, "zero_points": ir.DataType.UINT8})

    @staticmethod
    def _rewrite(graph, node, vals: dict, k: int, n: int, sch: QuantScheme) -> None:
        import onnx_ir as ir

        x = node.inputs[0]
        if sch.form == MATMULNBITS:
            attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", sch.bits),
                     ir.AttrInt64("block_size", sch.block_size)]
            if sch.accuracy_level:
                attrs.append(ir.AttrInt64("accuracy_level", sch.accuracy_level))
            ins = [x, vals["packed"], vals["scales"]] + ([vals["zero_points"]] if "zero_points" in vals else [])
            new = [ir.Node("com.microsoft", "MatMulNBits", ins, attrs, name=f"{node.name}_Q{sch.bits}")]
        else:
            attrs = [ir.AttrInt64("axis", 1 if sch.bits == 8 else 0)]
            if sch.bits == 4:
                attrs.append(ir.AttrInt64("block_size", sch.block_size))
            dq = ir.Node("", "DequantizeLinear", [vals["packed"], vals["scales"]], attrs, name=f"{node.name}_DQ")
            new = [dq, ir.Node("", "MatMul", [x, dq.outputs[0]], name=f"{node.name}_Q{sch.bits}")]
        graph.insert_before(node, new)
        replace_output(graph, node, new[-1].outputs[0])

    def _producer(self, fqns: tuple[str, ...], which: str, arrays: list[str], k: int, ns: list[int],
                  sch: QuantScheme):
        """The array ``which`` of the weights ``fqns`` (one, or a fused group concatenated along N), quantised
        from the original weights when the first of its arrays is written and dropped after the last."""
        def produce():
            import torch

            if fqns not in self._memo:
                parts = [quantize(self.read(f, torch.float32).numpy().T, sch) for f in fqns]  # [N, K] each
                self._memo[fqns] = {a: np.concatenate([p[a] for p in parts]) if len(parts) > 1 else parts[0][a]
                                    for a in arrays}
            a = self._memo[fqns][which]
            if which == arrays[-1]:
                del self._memo[fqns]                                     # one group's arrays at a time
            return np.ascontiguousarray(a)
        return produce
