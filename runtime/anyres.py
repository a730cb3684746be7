"""LLaVA-NeXT "anyres" in numpy + Pillow: split an image into views, and pack the views' features.

Reproduces, for ONE image, what transformers 5.x does (oracles in ``tests/test_llava_next.py``):

* :func:`anyres_views` = ``LlavaNextImageProcessorPil`` (the PIL backend): the best grid pinpoint is chosen
  (:func:`select_best_resolution`), the image is resized to fit it keeping its aspect ratio (Pillow, on
  uint8), centred on a black canvas of the pinpoint's size and cut row by row into ``tile_size`` squares. The
  base view is the whole image resized (aspect NOT kept) to ``base_size``. Every view then goes through the
  ordinary per-view spec (resize, centre crop, rescale, normalize: :func:`safeclip.runtime.image.preprocess`).
  Output ``pixel_values [1 + T, 3, S, S]``: view 0 is the base, views 1..T the tiles in row-major order.
* :func:`pack_features` = ``LlavaNextModel.pack_image_features`` with ``image_newline``: the tiles' patch
  features are laid out as one big grid, the rows/columns that only show the black padding are cut off
  (``unpad_image``), one ``image_newline`` vector ends every row, and the base view's features come first.
* :func:`num_image_tokens` = the ``<image>`` expansion count of ``LlavaNextProcessor`` (one per packed
  feature), computed from the image size alone.

Supported: ``vision_feature_select_strategy == "default"`` (the CLS position dropped, as every released
LLaVA-NeXT does). ``"full"`` is refused: transformers' own packing cannot reshape features that carry a CLS.
Grid pinpoints must be multiples of the tile size (all released checkpoints; otherwise transformers' processor
and model disagree on the tile count). Image sizes are ``(height, width)`` throughout, as transformers'
``image_sizes``.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .image import PIL_RESAMPLE, ImageError, check_spec, preprocess, preprocess_spec_from_config, to_rgb

__all__ = ["select_best_resolution", "grid_shape", "anyres_spec_from_config", "check_anyres_spec",
           "anyres_views", "pack_features", "num_image_tokens", "features_for_image", "max_views",
           "ANYRES_PROCESSORS"]

ANYRES_PROCESSORS = ("LlavaNextImageProcessor", "LlavaNextImageProcessorPil", "LlavaNextImageProcessorFast")
# transformers' LlavaNextImageProcessor default (used when the config has no image_grid_pinpoints)
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_ANYRES_ONLY_KEYS = ("image_grid_pinpoints", "aspect_ratio_setting", "do_pad")


def _hw(image_size, what: str = "image_size") -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (height, width), got {image_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} must be positive, got {image_size!r}")
    return h, w


def select_best_resolution(image_size, grid_pinpoints) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` that keeps the most image pixels, then wastes the fewest.

    Same arithmetic and tie-breaking (first wins) as ``transformers.image_processing_utils.select_best_resolution``.
    """
    oh, ow = _hw(image_size)
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in grid_pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    if best is None:
        raise ValueError(f"no usable grid pinpoint for an image of {oh}x{ow} (pinpoints {grid_pinpoints})")
    return best


def grid_shape(image_size, grid_pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of ``image_size`` (transformers' ``get_anyres_image_grid_shape``)."""
    h, w = select_best_resolution(image_size, grid_pinpoints)
    return h // tile_size, w // tile_size


def max_views(grid_pinpoints, tile_size: int) -> int:
    """The largest view count (base + tiles) any image can produce: the vision graph's batch upper bound."""
    return 1 + max((h // tile_size) * (w // tile_size) for h, w in grid_pinpoints)


# ---------------------------------------------------------------------------------------------------------
# preprocessor_config.json -> spec
def _check_pinpoints(pinpoints, tile_size: int) -> list[list[int]]:
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ValueError(f"anyres: grid_pinpoints must be a non-empty list of [height, width], got {pinpoints!r}")
    out = []
    for p in pinpoints:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p)):
            raise ValueError(f"anyres: grid pinpoint {p!r} is not [height, width] in positive ints")
        if p[0] % tile_size or p[1] % tile_size:
            raise ValueError(f"anyres: grid pinpoint {list(p)} is not a multiple of the tile size {tile_size}")
        out.append([int(p[0]), int(p[1])])
    return out


def anyres_spec_from_config(cfg: dict, tile_size: int, patch_size: int, grid_pinpoints=None) -> dict:
    """A ``LlavaNextImageProcessor`` config dict -> preprocessing spec with an ``anyres`` section.

    ``tile_size``/``patch_size`` are the vision tower's ``image_size``/``patch_size``; ``grid_pinpoints`` the
    model config's ``image_grid_pinpoints`` (must equal the processor's when given). The per-view keys are
    those of :func:`safeclip.runtime.image.preprocess_spec_from_config`. Raises ValueError naming the key.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"preprocessor config must be a dict, got {type(cfg).__name__}")
    kind = cfg.get("image_processor_type")
    if kind not in ANYRES_PROCESSORS:
        raise ValueError(f"preprocessor config: image_processor_type {kind!r} is not an anyres processor "
                         f"(supported: {', '.join(ANYRES_PROCESSORS)})")
    if cfg.get("aspect_ratio_setting", "anyres") != "anyres":
        raise ValueError(f"preprocessor config: aspect_ratio_setting {cfg['aspect_ratio_setting']!r} is not supported")
    for key, value in (("tile_size", tile_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"anyres: {key} must be a positive int, got {value!r}")
    if tile_size % patch_size:
        raise ValueError(f"anyres: tile size {tile_size} is not a multiple of the patch size {patch_size}")
    pinpoints = _check_pinpoints(cfg.get("image_grid_pinpoints") or DEFAULT_PINPOINTS, tile_size)
    if grid_pinpoints is not None and _check_pinpoints(grid_pinpoints, tile_size) != pinpoints:
        raise ValueError(f"anyres: the processor's image_grid_pinpoints {pinpoints} differ from the model's "
                         f"{grid_pinpoints}")
    # The per-view steps are CLIPImageProcessor's; `do_pad` here pads a batch of images to one tile count,
    # which never changes a single image.
    view_cfg = {k: v for k, v in cfg.items() if k not in _ANYRES_ONLY_KEYS}
    view_cfg["image_processor_type"] = "CLIPImageProcessor"
    spec = preprocess_spec_from_config(view_cfg)
    if spec["resize"] is None:
        raise ValueError("preprocessor config: 'do_resize' false is not supported for anyres")
    if spec["center_crop"] != {"height": tile_size, "width": tile_size}:
        raise ValueError(f"preprocessor config: anyres needs do_center_crop with crop_size {tile_size}x{tile_size} "
                         f"(the vision tower's image size), got {spec['center_crop']}")
    r = spec["resize"]
    base = [r["shortest_edge"]] * 2 if "shortest_edge" in r else [r["height"], r["width"]]
    spec["anyres"] = {"grid_pinpoints": pinpoints, "tile_size": tile_size, "base_size": base,
                      "patch_size": patch_size}
    check_anyres_spec(spec)
    return spec


def check_anyres_spec(spec: dict) -> None:
    """Raise ValueError if ``spec`` is not a per-view spec with a well-formed ``anyres`` section."""
    check_spec(spec)
    a = spec.get("anyres")
    if not isinstance(a, dict):
        raise ValueError("preprocess spec: no 'anyres' section")
    missing = [k for k in ("grid_pinpoints", "tile_size", "base_size", "patch_size") if k not in a]
    if missing:
        raise ValueError(f"preprocess spec: anyres lacks {missing}")
    for key in ("tile_size", "patch_size"):
        if isinstance(a[key], bool) or not isinstance(a[key], int) or a[key] <= 0:
            raise ValueError(f"preprocess spec: anyres.{key} must be a positive int, got {a[key]!r}")
    if a["tile_size"] % a["patch_size"]:
        raise ValueError("preprocess spec: anyres.tile_size is not a multiple of anyres.patch_size")
    _check_pinpoints(a["grid_pinpoints"], a["tile_size"])
    _hw(a["base_size"], "anyres.base_size")


# ---------------------------------------------------------------------------------------------------------
# image -> views
def _fit_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """transformers' get_patch_output_size: aspect-keeping size that fits (th, tw), rounding up."""
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def anyres_views(image: Image.Image, spec: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """PIL image -> (pixel_values float32 [1 + T, 3, S, S], image_size (height, width)).

    View 0 is the base (whole image), views 1..T the tiles of the best pinpoint, row-major.
    """
    check_anyres_spec(spec)
    if not isinstance(image, Image.Image):
        raise ImageError(f"<{type(image).__name__}>: anyres_views needs a PIL image (use load_image)")
    if image.mode != "RGB":
        image = to_rgb(image, "<PIL image>")
    a = spec["anyres"]
    tile, resample = a["tile_size"], PIL_RESAMPLE[spec["resample"]]
    w, h = image.size
    th, tw = select_best_resolution((h, w), a["grid_pinpoints"])
    nh, nw = _fit_size(h, w, th, tw)
    fitted = np.asarray(image.resize((nw, nh), resample=resample))              # [nh, nw, 3] uint8
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas = np.zeros((th, tw, 3), np.uint8)                                     # black, like np.pad(0)
    canvas[top:top + nh, left:left + nw] = fitted
    bh, bw = a["base_size"]
    views = [image.resize((bw, bh), resample=resample)]
    views += [Image.fromarray(canvas[i:i + tile, j:j + tile]) for i in range(0, th, tile) for j in range(0, tw, tile)]
    view_spec = {k: v for k, v in spec.items() if k != "anyres"}
    pv = np.concatenate([preprocess(v, view_spec) for v in views])              # [1 + T, 3, S, S]
    if pv.shape[-2:] != (tile, tile):
        raise ValueError(f"anyres: views came out {pv.shape[-2]}x{pv.shape[-1]}, the tower needs {tile}x{tile}")
    return pv, (h, w)


# ---------------------------------------------------------------------------------------------------------
# view features -> packed features
def _unpadded(image_size, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) bounds of the patch grid [rows, cols] that show the image (``unpad_image``)."""
    oh, ow = image_size
    if ow / oh > cols / rows:
        new_h = int(round(oh * (cols / ow), 7))
        pad = (rows - new_h) // 2
        return pad, rows - pad, 0, cols
    new_w = int(round(ow * (rows / oh), 7))
    pad = (cols - new_w) // 2
    return 0, rows, pad, cols - pad


def _check_strategy(strategy: str) -> None:
    if strategy != "default":
        raise ValueError(f"anyres packing supports vision_feature_select_strategy 'default' only, got {strategy!r} "
                         "(transformers cannot pack features that keep the CLS position either)")


def num_image_tokens(image_size, grid_pinpoints, tile_size: int, patch_size: int,
                     strategy: str = "default") -> int:
    """Image-token count for one image: base view + unpadded grid + one newline per grid row."""
    _check_strategy(strategy)
    image_size = _hw(image_size)
    side = tile_size // patch_size
    rows, cols = grid_shape(image_size, grid_pinpoints, tile_size)
    top, bottom, left, right = _unpadded(image_size, rows * side, cols * side)
    return side * side + (bottom - top) * (right - left + 1)


def pack_features(features: np.ndarray, image_size, grid_pinpoints, tile_size: int, patch_size: int,
                  image_newline: np.ndarray | None, strategy: str = "default") -> np.ndarray:
    """Per-view features [1 + T, N, D] -> the image's packed features [L, D] (``pack_image_features``)."""
    _check_strategy(strategy)
    image_size = _hw(image_size)
    f = np.asarray(features)
    if f.ndim != 3 or f.shape[0] < 1:
        raise ValueError(f"anyres: features must be [views, positions, dim], got shape {f.shape}")
    d = f.shape[-1]
    newline = None if image_newline is None else np.asarray(image_newline, dtype=f.dtype).reshape(-1)
    if newline is not None and newline.shape[0] != d:
        raise ValueError(f"anyres: image_newline has {newline.shape[0]} values, features are {d} wide")
    if f.shape[0] == 1:                                                          # no tiles
        return f[0] if newline is None else np.concatenate([f[0], newline[None]])
    side = tile_size // patch_size
    rows, cols = grid_shape(image_size, grid_pinpoints, tile_size)
    if f.shape[1] != side * side or f.shape[0] != 1 + rows * cols:
        raise ValueError(f"anyres: features {f.shape} do not fit a {rows}x{cols} grid of {side}x{side} patches "
                         f"plus a base view (image {image_size[0]}x{image_size[1]})")
    grid = f[1:].reshape(rows, cols, side, side, d).transpose(0, 2, 1, 3, 4)   # [rows, side, cols, side, D]
    grid = grid.reshape(rows * side, cols * side, d)                           # [H', W', D]
    top, bottom, left, right = _unpadded(image_size, rows * side, cols * side)
    grid = grid[top:bottom, left:right]                                          # [h, w, D]
    if newline is not None:
        col = np.broadcast_to(newline, (grid.shape[0], 1, d))
        grid = np.concatenate([grid, col], axis=1)                               # [h, w + 1, D]
    return np.concatenate([f[0], grid.reshape(-1, d)])                           # [N + h * (w + 1), D]


def features_for_image(view_features: np.ndarray, image_size, spec: dict, image_newline: np.ndarray) -> np.ndarray:
    """:func:`pack_features` with the geometry of a bundle's anyres ``spec``: [1 + T, N, D] -> [1, L, D]."""
    a = spec["anyres"]
    return pack_features(view_features, image_size, a["grid_pinpoints"], a["tile_size"], a["patch_size"],
                         image_newline)[None]
