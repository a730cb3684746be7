"""The architecture registry: a checkpoint's ``model_type`` -> how to export it.

Supported:

* ``llava`` (LLaVA-1.5, ``LlavaForConditionalGeneration``): one view per image, CLIP-style preprocessing
  (``LlavaImageProcessor`` pad-to-square or ``CLIPImageProcessor``).
* ``llava_next`` (LLaVA-NeXT / v1.6, ``LlavaNextForConditionalGeneration``): "anyres": a base view plus
  tiles per image (``safeclip.runtime.anyres``), the tiles' features packed with the model's
  ``image_newline`` by the runtime in numpy; the gate runs on every view (``safeclip.runtime.gate.aggregate_views``).

Both keep the vision tower at ``model.vision_tower`` and the projector at ``model.multi_modal_projector``
and read ``vision_feature_layer`` / ``vision_feature_select_strategy`` from the top-level config, so one
:class:`VisionGate` serves both; the spec says where each part lives rather than branching on the type.
Every entry names a tiny test-model builder; ``tests/test_llava_next.py`` fails when one is missing.
An unknown ``model_type`` raises ValueError listing the supported ones.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .demo import build_demo
from .demo_next import build_demo_next

__all__ = ["ArchSpec", "VisionParts", "ARCHITECTURES", "spec_for", "read_preprocessor_config"]

PREPROCESS_KINDS = ("clip", "anyres")


@dataclass(frozen=True)
class VisionParts:
    tower: object                    # CLIPVisionModel
    projector: object                # multi_modal_projector (nn.Module)
    feature_layer: int | list[int]
    select_strategy: str
    image_newline: object | None     # numpy float32 [D_lm] for anyres models, else None


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    model_class: str                             # transformers class name
    preprocess: str                              # "clip" | "anyres"
    anyres: bool
    tiny_test_model: Callable[[Path], tuple[Path, Path]]   # out_dir -> (model_dir, clip_dir)
    vision_tower: str = "model.vision_tower"     # attribute paths on the loaded model
    projector: str = "model.multi_modal_projector"
    image_newline: str | None = None
    feature_layer_key: str = "vision_feature_layer"          # keys of the top-level config
    select_strategy_key: str = "vision_feature_select_strategy"
    select_strategies: tuple[str, ...] = ("default", "full")

    def model_cls(self):
        """The transformers class (imported lazily)."""
        try:
            import transformers
        except ImportError as e:
            raise ImportError(f"exporting needs transformers ({e}); install with: pip install 'safeclip-edge[export]'") from None
        return getattr(transformers, self.model_class)

    def vision_parts(self, model, weights=None) -> VisionParts:
        """Tower, projector, feature layer, strategy and (anyres) ``image_newline`` of a model; on a meta-device
        skeleton ``weights`` (see ``safeclip.export.weights``) reads ``image_newline``."""
        cfg = model.config
        strategy = getattr(cfg, self.select_strategy_key)
        if strategy not in self.select_strategies:
            raise ValueError(f"{self.model_type}: {self.select_strategy_key} '{strategy}' is not supported "
                             f"(supported: {', '.join(self.select_strategies)})")
        newline = None
        if self.image_newline is not None:
            value = _attr(model, self.image_newline)
            if value.device.type == "meta":
                value = weights.read(self.image_newline)
            newline = value.detach().float().cpu().numpy().reshape(-1)
        return VisionParts(_attr(model, self.vision_tower), _attr(model, self.projector),
                           getattr(cfg, self.feature_layer_key), strategy, newline)

    def preprocess_spec(self, preprocessor_config: dict, model_config) -> dict:
        """The manifest's ``preprocess`` section from the checkpoint's image processor and model configs."""
        if self.preprocess == "anyres":
            from safeclip.runtime.anyres import anyres_spec_from_config
            v = model_config.vision_config
            return anyres_spec_from_config(preprocessor_config, v.image_size, v.patch_size,
                                           getattr(model_config, "image_grid_pinpoints", None))
        from safeclip.runtime.image import preprocess_spec_from_config
        return preprocess_spec_from_config(preprocessor_config)


def _attr(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


ARCHITECTURES: dict[str, ArchSpec] = {
    "llava": ArchSpec(model_type="llava", model_class="LlavaForConditionalGeneration", preprocess="clip",
                      anyres=False, tiny_test_model=build_demo),
    "llava_next": ArchSpec(model_type="llava_next", model_class="LlavaNextForConditionalGeneration",
                           preprocess="anyres", anyres=True, tiny_test_model=build_demo_next,
                           image_newline="model.image_newline", select_strategies=("default",)),
}


def spec_for(model_type: str | None) -> ArchSpec:
    """The registry entry for ``model_type``; ValueError listing the supported types otherwise."""
    try:
        return ARCHITECTURES[model_type]
    except (KeyError, TypeError):
        raise ValueError(f"model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))})") from None


def read_preprocessor_config(model_dir: str | Path) -> dict:
    """The image processor config of a checkpoint folder: ``preprocessor_config.json``, or the
    ``image_processor`` entry of ``processor_config.json`` (where transformers 5 saves it with a processor)."""
    d = Path(model_dir)
    p = d / "preprocessor_config.json"
    if p.is_file():
        return json.loads(p.read_text())
    q = d / "processor_config.json"
    if q.is_file():
        cfg = json.loads(q.read_text()).get("image_processor")
        if isinstance(cfg, dict):
            return cfg
    raise FileNotFoundError(f"{d}: no preprocessor_config.json (nor an image_processor in processor_config.json)")
