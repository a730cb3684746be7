"""What a TensorRT bundle needs on each Jetson Orin module: running it, and building its engines on the device.

For a LLaVA config (a name in ``memory.MODELS``, a config dict or ``config.json``), a TensorRT target
(``targets.py``: jetson, datacenter) and fp16 or int4 weights, counted per module of ``runtime/devices.py``:

* **weights**: ``memory.estimate`` (vision tower, gate head, projector, language model with its embedding
  table, which the runtime keeps in host memory: on a Jetson the same DRAM);
* **KV arena**: one arena of the target's context (clamped to the model's), as ``memory.estimate``;
* **TensorRT context memory** (activations): for every decoder optimization profile the target plans
  (``Target.decoder_profiles``: computed from its output, never from fixed sizes, so a change of the profiles
  shows here) the live intermediates of one call at the profile's max batch B, tokens S and past P, by
  :func:`call_context_bytes`; the decoder's context holds the largest of them (TensorRT's default
  ``ExecutionContextAllocationStrategy.STATIC`` allocates the maximum over all profiles for the context's life;
  ``ON_PROFILE_CHANGE`` reallocates per profile, whose peak is the same maximum while that profile runs). The
  vision engine's context is counted beside it (both engines' contexts exist at once);
* **the device build's peak** (``safeclip-build``, one engine at a time): onnx-tensorrt's parser holds a host
  copy of every initializer until it is destroyed, the builder puts the engine's weights on the device, and
  ``build_serialized_network`` ends by serialising the plan (the weights once more) while the engine exists:
  2 x W + max(context + workspace, W) for an engine with W bytes of weights. The part that cannot be swapped
  out is what the GPU holds: W + context + workspace (the parser's copy and the plan are ordinary host memory,
  which swap can take on a Jetson). TensorRT's own share (all but the parser's copy) must fit its
  ``TACTIC_DRAM`` pool, 75% of the memory by default on embedded devices (:data:`TACTIC_DRAM_DEFAULT`; the
  builder takes a larger one), and a module whose usable memory is below that share is counted as unable to
  build (swap does not help a budget measured against the device's memory). A weight-stripped plan (``BuilderFlag.STRIP_PLAN`` with ``REFIT_IDENTICAL``,
  TensorRT 10.0+) would drop the last W, but needs the runtime to refit the engine from the bundle's weights
  (``OnnxParserRefitter``), which it does not do yet: not counted as available.

The context model (:func:`call_context_bytes`, in elements times bytes, for one decoder layer at a time, as
TensorRT reuses dead activations): attention scores B x H x S x (P+S) at fp32 in and out of the softmax plus
the graph-precision product (8 + b bytes each; the exported graphs keep softmax in fp32), the layer's keys and
values over P+S positions, the hidden states B x S x (4 hidden + 2 intermediate) and the fp32 logits row. On
the demo decoder it stays above what the TensorRT stand-in's liveness walk measures (tests/_fake_trt_shapes.py,
checked in tests/test_device_memory.py), within 3x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from safeclip.runtime.graph_spec import DecoderNames, KVSpec
from safeclip.runtime.devices import MODULES, GiB, OrinModule, module as find_module

from .memory import BYTES, estimate, model_config, text_config
from .targets import VOLUME_LIMIT, Target       # NvInfer.h: a tensor's volume must be below 2^31 elements

__all__ = ["DeviceFitError", "TrtMemory", "call_context_bytes", "trt_memory", "check_device", "device_table",
           "trt_family_table", "TABLE_MODELS", "VOLUME_LIMIT"]

TABLE_MODELS = ("llava-1.5-7b", "llava-1.5-13b", "llava-v1.6-mistral-7b")
NOT_OFFERED = "int8 (not offered on TensorRT: export/quant.py)"


class DeviceFitError(ValueError):
    """The plan cannot fit the named module."""


@dataclass(frozen=True)
class TrtMemory:
    name: str
    weights: str                     # fp16 | int4
    context: int
    weight_bytes: int
    kv_bytes: int
    vision_context_bytes: int
    decoder_context_bytes: int
    decoder_context_profile: str     # the profile whose context is largest, with its max (B, S, P)
    graph_weights: dict              # vision_gate / decoder: bytes of each engine's weights
    workspace_bytes: int
    largest_scores: int = 0          # elements of the largest attention-score tensor B x H x S x (P+S)
    largest_scores_profile: str = ""

    @property
    def runtime_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.vision_context_bytes + self.decoder_context_bytes

    def _build(self, graph: str) -> tuple[int, int]:
        w = self.graph_weights[graph]
        ctx = self.decoder_context_bytes if graph == "decoder" else self.vision_context_bytes
        return 2 * w + max(ctx + self.workspace_bytes, w), w + ctx + self.workspace_bytes

    @property
    def build_peak_bytes(self) -> int:
        return max(self._build(g)[0] for g in self.graph_weights)

    @property
    def build_device_bytes(self) -> int:
        return max(self._build(g)[1] for g in self.graph_weights)

    @property
    def build_trt_bytes(self) -> int:
        """What TensorRT itself allocates during the largest build (all but the parser's copy): the
        ``MemoryPoolType.TACTIC_DRAM`` budget must hold it."""
        return max(self._build(g)[0] - self.graph_weights[g] for g in self.graph_weights)


def call_context_bytes(text: Mapping, batch: int, seq: int, past: int, b: int) -> int:
    """Context memory of one decoder call at batch ``batch``, ``seq`` new tokens on ``past`` cached ones, with
    ``b``-byte graph tensors (the model in the module docstring)."""
    heads, hidden = int(text["num_attention_heads"]), int(text["hidden_size"])
    kvh = int(text.get("num_key_value_heads") or heads)
    hd = int(text.get("head_dim") or hidden // heads)
    total = past + seq
    scores = batch * heads * seq * total * (8 + b)
    kv = 2 * batch * total * kvh * hd * b
    states = batch * seq * (4 * hidden + 2 * int(text["intermediate_size"])) * b
    return scores + kv + states + 4 * batch * int(text["vocab_size"])


def _decoder_context(text: Mapping, target: Target, context: int, b: int) -> tuple[int, str, int, str]:
    heads, hidden, L = int(text["num_attention_heads"]), int(text["hidden_size"]), int(text["num_hidden_layers"])
    kvh = int(text.get("num_key_value_heads") or heads)
    hd = int(text.get("head_dim") or hidden // heads)
    kv = KVSpec(L, kvh, hd, "float16" if b == 2 else "float32")
    names = DecoderNames()
    profiles = target.decoder_profiles(hidden, L, kvh, hd, context, kv=kv, names=names, num_heads=heads)
    from .targets import DECODER_PROFILE_NAMES

    best, label, scores, where = 0, "", 0, ""
    for k, prof in enumerate(profiles):
        B, S, _ = prof[names.inputs_embeds]["max"]
        P = prof[kv.past_key.format(i=0)]["max"][2]
        name = DECODER_PROFILE_NAMES[k] if k < len(DECODER_PROFILE_NAMES) else f"profile {k}"
        n = call_context_bytes(text, B, S, P, b)
        if n > best:
            best, label = n, f"{name} (B={B}, S={S}, past={P})"
        if B * heads * S * (P + S) > scores:
            scores, where = B * heads * S * (P + S), f"{name} (B={B}, S={S}, past={P})"
    return best, label, scores, where


def trt_memory(config_or_name: Any, target: Target, weights: str | None = None,
               context: int | None = None) -> TrtMemory:
    """The accounting of the module docstring for ``target`` (a TensorRT target) and ``weights`` (None/fp16 or
    int4; int8 raises: TensorRT targets do not offer it, ``export/quant.py``)."""
    if target.build_engines == "never":
        raise ValueError(f"target '{target.name}' builds no TensorRT engines")
    if weights == "int8":
        raise ValueError("--weights int8 is not offered for TensorRT targets (export/quant.py): use int4 or fp16")
    name, cfg = model_config(config_or_name)
    t = text_config(cfg)
    ctx = min(int(context or target.context), int(t["max_position_embeddings"]))
    precision = "fp16" if target.precision == "float16" else "fp32"
    b = BYTES[precision]
    e = estimate(cfg, ctx, precision, None if weights in (None, "fp16", "fp32") else weights)
    dec_ctx, label, scores, where = _decoder_context(t, target, ctx, b)
    embed = int(t["vocab_size"]) * int(t["hidden_size"]) * b              # host table, not in the decoder graph
    graphs = {"vision_gate": (e.params["vision_tower"] + e.params["gate_head"] + e.params["projector"]) * b,
              "decoder": e.lm_weight_bytes - embed}
    return TrtMemory(name, e.weights, ctx, e.weight_bytes, e.kv_bytes, e.vision_act_bytes, dec_ctx, label, graphs,
                     int(target.workspace_bytes), scores, where)


def check_device(config_or_name: Any, target: Target, weights: str | None, device: str) -> TrtMemory:
    """Raise :class:`DeviceFitError` (one line) when the bundle cannot run on ``device`` or its engines cannot be
    built there (the GPU's share of the build); returns the accounting otherwise."""
    m = find_module(device)
    acc = trt_memory(config_or_name, target, weights)
    if acc.largest_scores >= VOLUME_LIMIT:
        raise DeviceFitError(f"{acc.name}: the {acc.largest_scores_profile} profile's attention scores have "
                             f"{acc.largest_scores} elements; TensorRT refuses tensors of 2^31 or more (NvInfer.h), so "
                             f"no engine builds for --target {target.name} at {acc.context} tokens")
    u = m.usable_bytes
    fix = ("use --weights int4 or a larger module" if acc.weights != "int4" else "use a larger module") + \
        " (safeclip-export --dry-run --target " + target.name + " lists what fits where)"
    if acc.runtime_bytes > u:
        raise DeviceFitError(f"{acc.name} ({acc.weights} weights, {acc.context} tokens) needs {_gib(acc.runtime_bytes)} "
                             f"GiB to run, {m.name} has {_gib(u)} GiB usable: {fix}")
    if acc.build_device_bytes > u or acc.build_trt_bytes > u:
        need = max(acc.build_device_bytes, acc.build_trt_bytes)
        raise DeviceFitError(f"{acc.name} ({acc.weights} weights) fits {m.name} to run, but building its engines "
                             f"there needs {_gib(need)} GiB of TensorRT's own memory ({_gib(u)} GiB usable): {fix}")
    return acc


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


# NvInfer.h (10.3, 11.x), MemoryPoolType::kTACTIC_DRAM: "On embedded devices, where host and device memory are
# unified, this includes all host memory required by TensorRT to build the network ... This defaults to 75% of
# totalGlobalMem". totalGlobalMem is taken as the module's DRAM (an upper bound: the OS sees a little less).
TACTIC_DRAM_DEFAULT = 0.75


def _cell(acc: TrtMemory, m: OrinModule) -> str:
    u = m.usable_bytes
    if acc.largest_scores >= VOLUME_LIMIT:
        return "no (2^31)"
    if acc.runtime_bytes > u or acc.build_device_bytes > u or acc.build_trt_bytes > u:
        return "no"
    notes = []
    if acc.build_peak_bytes > u:
        notes.append(f"{_gib(acc.build_peak_bytes - u)} GiB swap")
    if acc.build_trt_bytes > TACTIC_DRAM_DEFAULT * m.dram_gib * GiB:
        notes.append(f"TACTIC_DRAM {_gib(acc.build_trt_bytes)} GiB")
    return "yes" if not notes else f"yes (build: {', '.join(notes)})"


def device_table(config_or_name: Any, target: Target, weights: str | None = None) -> str:
    """Markdown: the accounting for ``weights`` (None: fp16 and int4), and whether it runs and builds on each
    module."""
    variants = [weights] if weights else ["fp16", "int4"]
    accs = [trt_memory(config_or_name, target, w) for w in variants]
    a0 = accs[0]
    out = [f"### {a0.name} on TensorRT ({target.name}): {a0.context} tokens of context", "",
           "| GiB | " + " | ".join(a.weights for a in accs) + " |", "|---|" + "---:|" * len(accs)]
    rows = [("weights (host embedding table included)", "weight_bytes"), ("KV arena", "kv_bytes"),
            ("vision engine context memory", "vision_context_bytes"),
            (f"decoder context memory: largest profile {a0.decoder_context_profile}", "decoder_context_bytes"),
            ("**to run**", "runtime_bytes"), ("device build peak (2 x W + max(context + workspace, W))", "build_peak_bytes"),
            ("of which on the GPU (W + context + workspace)", "build_device_bytes")]
    out += [f"| {label} | " + " | ".join(_gib(getattr(a, key)) for a in accs) + " |" for label, key in rows]
    out += ["", f"Largest attention-score tensor: {a0.largest_scores:,} elements at the {a0.largest_scores_profile} "
            f"profile (TensorRT refuses 2^31 = {VOLUME_LIMIT:,} or more)."]
    out += ["", "| module | usable GiB | " + " | ".join(f"{a.weights}: runs and builds" for a in accs) + " |",
            "|---|---:|" + "---|" * len(accs)]
    for m in MODULES.values():
        out.append(f"| {m.name} | {_gib(m.usable_bytes)} | " + " | ".join(_cell(a, m) for a in accs) + " |")
    out += ["", f"{NOT_OFFERED}. Build notes: swap for the parser's host copy of the weights and the serialized "
            "plan (the GPU's share cannot be swapped); TACTIC_DRAM: TensorRT's own build allocations exceed its "
            "default budget on embedded devices (75% of the memory), raise it with trt_build's tactic_dram_bytes "
            "(export/device_memory.py)."]
    return "\n".join(out) + "\n"


def trt_family_table(target: Target, models=TABLE_MODELS) -> str:
    """Markdown for README: every model at fp16 and int4 against every module (runs and builds, GiB to run, peak
    of the build)."""
    mods = list(MODULES.values())
    out = [f"| model | weights | run GiB | build peak GiB (GPU part) | " + " | ".join(m.name for m in mods) + " |",
           "|---|---|---:|---:|" + "---|" * len(mods)]
    for name in models:
        for w in ("fp16", "int4"):
            a = trt_memory(name, target, w)
            out.append(f"| {name} | {w} | {_gib(a.runtime_bytes)} | {_gib(a.build_peak_bytes)} "
                       f"({_gib(a.build_device_bytes)}) | " + " | ".join(_cell(a, m) for m in mods) + " |")
    a = trt_memory(models[0], target)
    out += ["", "'no (2^31)': an attention-score tensor of the largest profile reaches 2^31 elements, which "
            "TensorRT refuses (NvInfer.h), whatever the module.",
            f"Context {a.context} tokens (the {target.name} target's, at most the model's); decoder context memory "
            f"from its largest profile ({a.decoder_context_profile}); workspace {_gib(target.workspace_bytes)} GiB; "
            f"{NOT_OFFERED}."]
    return "\n".join(out) + "\n"
