"""Static check of an ONNX graph against TensorRT's ONNX parser, without TensorRT or a GPU.

What is checked, against the operator list kept as data in ``trt_ops.json`` (transcribed from
onnx/onnx-tensorrt ``docs/operators.md``, with the source commit recorded there):

* the default-domain opset lies in the parser's opset range;
* every node's operator is in the list and marked supported; nodes in other domains are flagged unless
  they call a model-local function (the parser inlines those, so the function body is checked instead);
  ``If``/``Loop``/``Scan`` bodies are checked too;
* operators added after the target TensorRT version are flagged, per the parser Changelog kept in the
  same file: no list older than 10.8 could be read, and JetPack 6's TensorRT is 10.3;
* inputs the parser needs at build time: ``Reduce*`` axes, ``CumSum`` axis and ``OneHot`` depth are
  initializers or ``Constant`` outputs; ``Squeeze``/``Unsqueeze`` axes too before 10.7, from 10.7 they
  may be computed from constants ("resolvable to a constant"); ``Slice`` axes before 10.3 and ``Pad``
  axes before 10.4 are initializers, later any tensor. ``Slice`` starts/ends/steps may be tensors in
  every list read (8.4 to 11.0; TensorRT's slice layer takes them at run time, and decoders need it), and
  ``TopK``'s K may be a tensor since 8.6 ("dynamic `K` values"), so neither is flagged; a known K must be
  below 3840 and ``sorted`` must be 1;
* ``QuantizeLinear``/``DequantizeLinear`` zero points are constant zeros (symmetric only);
* weight-only ``DequantizeLinear`` (``trt_ops.json`` ``block_quantization``, quoted with sources): INT4 needs
  TensorRT 10.0+, is a constant weight with an even last dimension, and is block-quantised; a scale of the
  input's rank (block quantisation) only with INT4, 2-D, one blocked axis with an integer block size equal to
  ``block_size`` and ``axis``; a constant scale; blocks of a weight feeding ``MatMul``'s B along K (axis 0);
* ``Attention`` (opset 23, parser 10.14+) has no past key/value, ``nonpad_kv_seqlen`` or
  present/``qk_matmul_output`` outputs; ``LayerNormalization`` uses only its first output;
* the element type of each node's main tensor (first input, or output for ``Constant``-like nodes) is
  one of the listed types, where ONNX shape inference knows it (DOUBLE is allowed: the parser casts it
  down).

What cannot be checked without building (shape-dependent restrictions, kernel availability, memory)
is left to ``safeclip-build`` on the device. Models are loaded with ``load_external_data=False``, so big
weights are never read; a tiny external tensor (a zero point, a K) is read alone when its value matters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

DEFAULT_TARGET = "10.3"   # JetPack 6.1/6.2, the oldest TensorRT this project supports
TOPK_MAX_K = 3840         # operators.md: "`K` input must be less than 3840"

# ONNX TensorProto element types -> the type names used in operators.md.
_ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4"}
_TYPE_TYPOS = {"INF64": "INT64"}  # 10.8 ConstantOfShape row; the 11.0 list spells it INT64
_OUTPUT_TYPED = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike"}
_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}

# Inputs the parser needs at build time: op -> (input index, input name). The 10.8 and 11.0 lists: Reduce*
# "`axes` must be an initializer", CumSum "`axis` must be a build-time constant", OneHot "`depth` must be a
# build-time constant", Squeeze/Unsqueeze "`axes` must be resolvable to a constant". Before the versions
# the Changelog names (trt_ops.json), Slice and Pad axes had to be initializers and Squeeze/Unsqueeze axes
# could not be computed. TopK's K may be a tensor since 8.6 (Changelog: "dynamic `K` values"), so only a
# known K is checked against 3840.
_CONST_INPUTS: dict[str, tuple[int, str]] = {
    **{op: (1, "axes") for op in _REDUCE}, "OneHot": (1, "depth"), "CumSum": (1, "axis"),
    "Slice": (3, "axes"), "Pad": (3, "axes"), "Squeeze": (1, "axes"), "Unsqueeze": (1, "axes"),
}
_WEIGHTS, _FOLDED = "weights", "folded"   # markers in the constants map (TensorProto when the value is known)
_WHY = {"Multinomial": "sampling must stay outside the graph"}


class TensorRTCompatibilityError(ValueError):
    """An ONNX graph uses something TensorRT's ONNX parser does not accept."""


@dataclass(frozen=True)
class Issue:
    node: str
    op_type: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.problem}" if self.op_type else f"{self.node}: {self.problem}"


@dataclass(frozen=True)
class OpInfo:
    supported: bool
    types: tuple[str, ...]
    restrictions: str


@dataclass(frozen=True)
class OpTable:
    """One parser's operator list plus the TensorRT version the graph must build with."""
    version: str                          # the list's version, e.g. "10.8"
    opset_min: int
    opset_max: int
    operators: Mapping[str, OpInfo]
    target: str = DEFAULT_TARGET          # the TensorRT version the engine will be built with
    added_after: Mapping[str, str] = field(default_factory=dict)         # op -> version that added it
    tensor_inputs_from: Mapping[str, str] = field(default_factory=dict)  # op -> version accepting tensors
    resolvable_inputs_from: Mapping[str, str] = field(default_factory=dict)  # op -> version folding inputs


def _version(v: str) -> tuple[int, int]:
    parts = [int(p) for p in str(v).split(".")[:2]]
    return (parts[0], parts[1] if len(parts) > 1 else 0)


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(resources.files("safeclip.export").joinpath("trt_ops.json").read_text(encoding="utf-8"))


def list_versions() -> list[str]:
    return sorted(_data()["versions"], key=_version)


def load_ops(target: str = DEFAULT_TARGET, version: str | None = None) -> OpTable:
    """The operator list for building with TensorRT ``target``: the list of ``version`` if given, else
    the newest stored list not newer than the target, or the oldest stored list for an older target
    (10.3: the 10.8 list, corrected by the 10.4-10.8 Changelog entries)."""
    data = _data()
    versions = list_versions()
    if version is None:
        at_or_below = [v for v in versions if _version(v) <= _version(target)]
        version = at_or_below[-1] if at_or_below else versions[0]
    if version not in data["versions"]:
        raise ValueError(f"no TensorRT operator list for {version}; stored: {', '.join(versions)}")
    entry = data["versions"][version]
    ops = {name: OpInfo(o["supported"], tuple(_TYPE_TYPOS.get(t, t) for t in o["types"]), o["restrictions"])
           for name, o in entry["operators"].items()}
    changes = data["changelog_10_3_to_10_8"]["entries"]
    added = {op: ch["version"] for ch in changes for op in ch.get("ops_added", [])}
    tensors = {op: ch["version"] for ch in changes for op in ch.get("tensor_inputs_from", {})}
    folded = {op: ch["version"] for ch in changes for op in ch.get("resolvable_inputs_from", {})}
    return OpTable(version, entry["opset_min"], entry["opset_max"], ops, target, added, tensors, folded)


def _load(model) -> tuple[object, Path | None]:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    return onnx.load(str(path), load_external_data=False), path.parent


def _types(model) -> dict[str, int]:
    """Element type of every tensor whose type ONNX shape inference knows (main graph only)."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # inference is a help here, not a gate: fall back to what the file declares
        pass
    g = model.graph
    out = {t.name: t.data_type for t in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


class _Checker:
    def __init__(self, model, base_dir: Path | None, table: OpTable):
        self.model, self.base_dir, self.t = model, base_dir, table
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.types = _types(model)
        self.in_function = 0      # tensor names inside a function body are local: no type lookups there
        self.prefix = ""          # "<If node>/" or "<function>/" for nodes of a subgraph or function body
        self.issues: list[Issue] = []
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((n, i))

    def add(self, node, problem: str) -> None:
        name = node.name or (node.output[0] if node.output else "?")
        self.issues.append(Issue(self.prefix + name, node.op_type, problem))

    # -- constants ------------------------------------------------------------------------------------
    def value(self, name: str, consts: Mapping[str, object]):
        """numpy value of a constant tensor, or None when it is not known statically."""
        import onnx
        from onnx import numpy_helper

        t = consts.get(name)
        if t is None or not isinstance(t, onnx.TensorProto):
            return None
        if t.data_location == onnx.TensorProto.EXTERNAL:
            if self.base_dir is None:
                return None
            t2 = onnx.TensorProto()
            t2.CopyFrom(t)
            try:
                onnx.external_data_helper.load_external_data_for_tensor(t2, str(self.base_dir))
            except OSError:
                return None
            t = t2
        return numpy_helper.to_array(t)

    # -- the walk -------------------------------------------------------------------------------------
    def graph(self, g, outer: Mapping[str, object]) -> None:
        consts: dict[str, object] = dict(outer)
        consts.update({t.name: t for t in g.initializer})      # name -> TensorProto | _WEIGHTS | _FOLDED
        self.nodes(g.node, consts)

    def nested(self, prefix: str, walk) -> None:
        saved, self.prefix = self.prefix, self.prefix + prefix + "/"
        try:
            walk()
        finally:
            self.prefix = saved

    def nodes(self, nodes: Iterable, consts: dict) -> None:
        for node in nodes:
            self.node(node, consts)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = {a.name: a for a in node.attribute}
                consts[node.output[0]] = attr["value"].t if "value" in attr else _WEIGHTS
            elif (node.input and node.op_type not in _NONDETERMINISTIC
                  and all((not i) or i in consts for i in node.input)):
                consts.update({o: _FOLDED for o in node.output if o})   # computable at build time

    def node(self, node, consts: dict) -> None:
        if node.domain not in ("", "ai.onnx"):
            fn = self.functions.get((node.domain, node.op_type))
            if fn is None:
                self.add(node, f"custom domain '{node.domain}': the TensorRT parser needs a plugin named "
                               f"'{node.op_type}' for it")
                return
            inner = dict(consts)
            for formal, actual in zip(fn.input, node.input):
                if actual in consts:
                    inner[formal] = consts[actual]
            self.in_function += 1
            self.nested(node.name or node.op_type, lambda: self.nodes(fn.node, inner))
            self.in_function -= 1
            return
        info = self.t.operators.get(node.op_type)
        if info is None:
            self.add(node, f"not in TensorRT {self.t.version}'s ONNX operator list")
            return
        if not info.supported:
            why = f" ({_WHY[node.op_type]})" if node.op_type in _WHY else ""
            self.add(node, f"not supported by TensorRT's ONNX parser{why}")
            return
        added = self.t.added_after.get(node.op_type)
        if added and _version(added) > _version(self.t.target):
            self.add(node, f"parser support added in TensorRT {added}; target is {self.t.target}")
        self.inputs_constant(node, consts)
        self.op_rules(node, consts)
        self.dtype(node, info)
        for a in node.attribute:
            for sub in ([a.g] if a.type == a.GRAPH else list(a.graphs) if a.type == a.GRAPHS else []):
                self.nested(node.name or node.op_type, lambda sub=sub: self.graph(sub, consts))

    def inputs_constant(self, node, consts) -> None:
        idx, name = _CONST_INPUTS.get(node.op_type, (None, ""))
        if idx is None or len(node.input) <= idx or not node.input[idx]:
            return
        target, op = _version(self.t.target), node.op_type
        since = self.t.tensor_inputs_from.get(op)
        if since is not None and target >= _version(since):
            return
        got = consts.get(node.input[idx])
        folding = self.t.resolvable_inputs_from.get(op)
        if folding is not None and target >= _version(folding):
            if got is None:
                self.add(node, f"input `{name}` ('{node.input[idx]}') must be resolvable to a constant")
        elif got is None or got == _FOLDED:
            when = f" before TensorRT {since or folding}" if since or folding else ""
            self.add(node, f"input `{name}` ('{node.input[idx]}') must be an initializer or Constant{when}")

    def op_rules(self, node, consts) -> None:
        op = node.op_type
        attrs = {a.name: a for a in node.attribute}
        if op == "TopK":
            if "sorted" in attrs and attrs["sorted"].i != 1:
                self.add(node, "`sorted` must be 1")
            k = self.value(node.input[1], consts) if len(node.input) > 1 else None
            if k is not None and int(k.reshape(-1)[0]) >= TOPK_MAX_K:
                self.add(node, f"K={int(k.reshape(-1)[0])} must be less than {TOPK_MAX_K}")
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            if op == "DequantizeLinear":
                self.dq_rules(node, consts, attrs)
            which = "y_zero_point" if op == "QuantizeLinear" else "x_zero_point"
            if len(node.input) > 2 and node.input[2]:
                zp = self.value(node.input[2], consts)
                if zp is None:
                    self.add(node, f"`{which}` must be a constant zero (only symmetric quantization); "
                                   "its value is not known statically")
                elif zp.astype("float64").any():
                    self.add(node, f"`{which}` must be zero (only symmetric quantization)")
        elif op == "Attention":
            for idx, name in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
                if len(node.input) > idx and node.input[idx]:
                    self.add(node, f"input `{name}` is unsupported by the TensorRT parser")
            for idx, name in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
                if len(node.output) > idx and node.output[idx]:
                    self.add(node, f"output `{name}` is unsupported by the TensorRT parser")
            for name in ("qk_matmul_output_mode", "softcap"):
                if name in attrs:
                    self.add(node, f"attribute `{name}` is unsupported by the TensorRT parser")
        elif op == "LayerNormalization":
            if any(o for o in node.output[1:]):
                self.add(node, "only the first output `Y` is supported")

    def dq_rules(self, node, consts, attrs) -> None:
        """Weight-only DequantizeLinear: the ``block_quantization`` rules of ``trt_ops.json``."""
        import onnx

        bq = _data()["block_quantization"]
        x = consts.get(node.input[0])
        s = consts.get(node.input[1]) if len(node.input) > 1 else None
        int4 = _ONNX_TYPES.get(self.types.get(node.input[0], 0)) == "INT4"
        if not isinstance(s, onnx.TensorProto) and s is not _WEIGHTS:
            self.add(node, "`x_scale` must be an initializer or Constant (TensorRT needs a build-time scale)")
        if int4:
            if _version(self.t.target) < _version(bq["int4_from"]):
                self.add(node, f"INT4 weights need TensorRT {bq['int4_from']} or later; target is {self.t.target}")
            if not isinstance(x, onnx.TensorProto):
                self.add(node, "INT4 input must be a constant weight (TensorRT's INT4 is weight-only)")
        xd = list(x.dims) if isinstance(x, onnx.TensorProto) else None
        sd = list(s.dims) if isinstance(s, onnx.TensorProto) else None
        if xd is None or sd is None:
            return
        if int4 and xd and xd[-1] % 2:
            self.add(node, f"INT4 input has an odd last dimension ({xd[-1]})")
        blocked = len(sd) == len(xd) and len(xd) > 0 and sd != [1] * len(sd)
        if not blocked:
            if int4:
                self.add(node, "INT4 weights must be block-quantised (a scale of the input's rank)")
            return
        if not int4:
            self.add(node, "block quantisation (a scale of the input's rank) is supported for INT4 only")
        if len(xd) != 2:
            self.add(node, f"block quantisation needs a 2-D weight and scale, got rank {len(xd)}")
            return
        axes = [i for i in range(2) if xd[i] != sd[i]]
        if len(axes) != 1 or sd[axes[0]] == 0 or xd[axes[0]] % sd[axes[0]]:
            self.add(node, f"block quantisation needs exactly one blocked axis with an integer block size "
                           f"(weight {xd}, scale {sd})")
            return
        ax, size = axes[0], xd[axes[0]] // sd[axes[0]]
        if "block_size" in attrs and attrs["block_size"].i != size:
            self.add(node, f"`block_size` {attrs['block_size'].i} differs from the block the shapes give ({size})")
        axis = attrs["axis"].i if "axis" in attrs else 1
        if axis % 2 != ax:
            self.add(node, f"`axis` {axis} is not the blocked axis {ax}")
        for user, idx in self.consumers.get(node.output[0], []):
            if user.op_type == "MatMul" and idx == 1 and ax != 0:
                self.add(node, "blocks of a MatMul weight [K, N] must run along K (axis 0)")

    def dtype(self, node, info: OpInfo) -> None:
        if not info.types or self.in_function:
            return
        names = [node.output[0]] if node.op_type in _OUTPUT_TYPED or not node.input else [node.input[0]]
        if node.op_type == "Cast" and node.output:
            names.append(node.output[0])
        for name in names:
            code = self.types.get(name)
            tname = _ONNX_TYPES.get(code) if code else None
            if code and tname is None:
                self.add(node, f"tensor '{name}' has ONNX element type {code}, which TensorRT does not support")
            elif tname and tname != "DOUBLE" and tname not in info.types:
                self.add(node, f"tensor '{name}' is {tname}; TensorRT {self.t.version} lists "
                               f"{', '.join(info.types)} for {node.op_type}")


def check_onnx_for_tensorrt(model, ops: OpTable | str | None = None) -> list[Issue]:
    """Every problem TensorRT's ONNX parser would have with ``model`` (a ModelProto or a path).

    ``ops``: an :class:`OpTable`, a target TensorRT version such as ``"10.3"`` or ``"11.4"``, or None
    for :data:`DEFAULT_TARGET`.
    """
    table = ops if isinstance(ops, OpTable) else load_ops(ops or DEFAULT_TARGET)
    model, base_dir = _load(model)
    issues: list[Issue] = []
    opsets = {o.domain: o.version for o in model.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset is None:
        issues.append(Issue("<model>", "", "no default-domain opset import"))
    elif not table.opset_min <= opset <= table.opset_max:
        issues.append(Issue("<model>", "", f"opset {opset} is outside TensorRT {table.version}'s parser range "
                                           f"{table.opset_min}-{table.opset_max}"))
    checker = _Checker(model, base_dir, table)
    checker.graph(model.graph, {})
    return issues + checker.issues


def assert_tensorrt_compatible(path, ops: OpTable | str | None = None) -> None:
    """Raise :class:`TensorRTCompatibilityError` listing every problem on one line."""
    issues = check_onnx_for_tensorrt(path, ops)
    if issues:
        name = Path(path).name if not hasattr(path, "graph") else (path.graph.name or "model")
        raise TensorRTCompatibilityError(
            f"{name}: {len(issues)} TensorRT parser problem(s): " + "; ".join(str(i) for i in issues))
