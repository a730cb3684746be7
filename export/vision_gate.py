"""The vision+gate module: LLaVA's vision tower and projector, plus the SafeCLIP gate head, in one graph.

``pixel_values [B,3,H,W]`` -> ``image_features [B,N,D_lm]`` (exactly what LLaVA feeds its language model)
and ``class_probs [B,C]`` (the gate's per-class probabilities). Supported: CLIP vision towers
(``CLIPVisionModel``), ``vision_feature_layer`` as an int or a list, select strategies ``default`` (drop
CLS) and ``full``.

Gate variants (``SAFECLIP.md``):

* ``reference``: CLS of ``hidden_states[vision_feature_layer]`` (the vector LLaVA discards), no
  post-LayerNorm, as the paper's code does;
* ``clip``: CLS of the last layer after ``post_layernorm``: the canonical CLIP image embedding.

Both then apply ``visual_projection`` of the ``--clip`` checkpoint, L2-normalise, take
``logit_scale * image_embed @ text_embeds.T`` over all descriptor sentences, softmax over all sentences,
and sum the probabilities per class (a proper distribution over classes; for equal sentence counts the
summed probability is exactly the reference's ``mean x sentences_per_class``). The decision rule with its
threshold is applied by the runtime, so re-calibration needs no rebuild.

Only the encoder layers that some output needs are kept: with the ``reference`` variant and
``vision_feature_layer = -2`` the last encoder layer is never computed.
"""
from __future__ import annotations

import torch
from torch import nn

from safeclip.runtime.gate import GATE_VARIANTS


def _layer_count(feature_layer: int, num_layers: int) -> int:
    """Number of encoder layers whose output is ``hidden_states[feature_layer]`` (hidden_states[0] = embeddings)."""
    idx = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= idx <= num_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is out of range for {num_layers} layers")
    return idx


class VisionGate(nn.Module):
    def __init__(self, tower, projector: nn.Module, feature_layer: int | list[int], select_strategy: str,
                 variant: str, visual_projection: nn.Linear, text_embeds: torch.Tensor,
                 class_index: list[int], num_classes: int, logit_scale: float):
        super().__init__()
        if variant not in GATE_VARIANTS:
            raise ValueError(f"unknown gate variant '{variant}' (supported: {', '.join(GATE_VARIANTS)})")
        if select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy '{select_strategy}'")
        n_layers = len(tower.encoder.layers)
        layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        self.feature_idx = [_layer_count(l, n_layers) for l in layers]
        # reference: the CLS of the feature layer (with several feature layers, the last one); clip: the last layer
        self.gate_idx = self.feature_idx[-1] if variant == "reference" else n_layers
        keep = max(self.feature_idx + [self.gate_idx])
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.layers = nn.ModuleList(list(tower.encoder.layers)[:keep])
        self.post_layernorm = tower.post_layernorm if variant == "clip" else None
        self.projector = projector
        self.drop_cls = select_strategy == "default"
        self.variant = variant
        self.visual_projection = visual_projection
        # text_embeds: [S, E], L2-normalised descriptor sentence embeddings (baked in as a constant)
        te = text_embeds.detach().float()
        te = te / te.norm(dim=-1, keepdim=True)
        self.register_buffer("text_embeds_t", te.t().contiguous())                # [E, S]
        onehot = torch.zeros(te.shape[0], num_classes)
        onehot[torch.arange(te.shape[0]), torch.tensor(class_index)] = 1.0
        self.register_buffer("class_matrix", onehot)                               # [S, C]
        self.logit_scale = float(logit_scale)

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_features [B, N, D_lm], gate CLS [B, Dv]) from pixel_values [B, 3, H, W]."""
        h = self.pre_layrnorm(self.embeddings(pixel_values))                      # [B, 1+P, Dv]
        states = {0: h}
        for i, layer in enumerate(self.layers, start=1):
            h = layer(h, None)
            states[i] = h
        feats = [states[i] for i in self.feature_idx]
        if self.drop_cls:
            feats = [f[:, 1:] for f in feats]
        selected = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        return self.projector(selected), states[self.gate_idx][:, 0]

    def head(self, cls: torch.Tensor) -> torch.Tensor:
        """class_probs [B, C] from the gate CLS [B, Dv]."""
        if self.post_layernorm is not None:
            cls = self.post_layernorm(cls)
        emb = self.visual_projection(cls)                                          # [B, E]
        emb = emb / emb.norm(dim=-1, keepdim=True)
        logits = self.logit_scale * (emb @ self.text_embeds_t)                     # [B, S]
        probs = torch.softmax(logits, dim=-1)
        return probs @ self.class_matrix                                           # [B, C]

    def forward(self, pixel_values: torch.Tensor):
        image_features, cls = self.encode(pixel_values)
        return image_features, self.head(cls)


class _Fp32LayerNorm(nn.Module):
    """LayerNorm computed in fp32 inside a half-precision graph (fp16 norms overflow in TensorRT)."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.ln = ln.float()

    def forward(self, x):
        return self.ln(x.float()).to(x.dtype)


class HalfVisionGate(nn.Module):
    """fp16 tower and projector; LayerNorms, the gate head and its probabilities stay fp32.

    Input ``pixel_values`` stays float32 (the runtime's preprocessing output); ``image_features`` are fp16
    (what an fp16 decoder consumes); ``class_probs`` are fp32 so the threshold compares exact values.
    """

    def __init__(self, gate: VisionGate, inplace: bool = False):
        super().__init__()
        import copy

        g = gate if inplace else copy.deepcopy(gate)
        for parent in list(g.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.LayerNorm):
                    setattr(parent, name, _Fp32LayerNorm(child))
        g.embeddings.half()
        g.layers.half()
        g.projector.half()
        for m in g.layers.modules():                 # half() above also halved the norms' weights
            if isinstance(m, _Fp32LayerNorm):
                m.ln.float()
        g.pre_layrnorm.float()
        self.gate = g

    def forward(self, pixel_values: torch.Tensor):
        image_features, cls = self.gate.encode(pixel_values.half())               # fp16 tower and projector
        return image_features, self.gate.head(cls.float())                        # gate head in fp32
