"""Image loading with hostile-input guards, and CLIP/LLaVA preprocessing in numpy + Pillow only.

``load_image`` returns an 8-bit RGB ``PIL.Image`` or raises ``ImageError`` (a ``ValueError``) with one line
naming the source and the problem; no Pillow/OS exception escapes. Supported:

* sources: a path, ``bytes``, or a ``PIL.Image``; file formats JPEG (incl. MPO), PNG (incl. APNG), GIF, WEBP, BMP,
  TIFF only (``FORMATS``). Others (EPS, which runs Ghostscript, ICO, PSD, ...) are refused.
* decompression bombs: width*height is checked against ``max_pixels`` from the header, before any pixel is
  decoded. Pillow's own DecompressionBombWarning is raised as an error inside this call only when
  ``max_pixels`` is within Pillow's limit (the caller's larger limit wins otherwise), and
  DecompressionBombError always becomes ImageError. Pillow's globals (``MAX_IMAGE_PIXELS``,
  ``ImageFile.LOAD_TRUNCATED_IMAGES``) are never written. ``warnings.catch_warnings`` is used for the
  duration of a load; it is process-wide, so a concurrent thread's Pillow warnings may be filtered meanwhile.
* truncated or corrupt files are rejected (Pillow raises on them because LOAD_TRUNCATED_IMAGES stays False).
* EXIF orientation is applied. Animated images (GIF, APNG, WEBP): only the FIRST frame is decoded and
  returned; the other frames are never read.
* modes: RGB; L, 1, P, CMYK, YCbCr -> RGB via Pillow; I;16* and I are taken as 16-bit ([0, 65535] -> [0, 255],
  Pillow's own conversion would clip everything above 255 to white); F is taken as [0, 1] when all values
  lie there (else clipped to [0, 255], the same rule as transformers' ``_rescale_for_pil_conversion``);
  NaN/inf is refused. Transparency (RGBA, LA, PA, La, RGBa, palette or L/RGB with a ``transparency`` key) is
  composited onto WHITE: that is what transformers' ``convert_to_rgb`` does, so the gate sees exactly what the
  reference pipeline (and our parity tests) feed the model, and it is what a viewer on a light page sees. Just
  dropping alpha would show the model whatever RGB hides under transparent pixels (often black, or content
  planted there) that the user never sees, and vice versa.

``preprocess_spec_from_config`` turns a CLIP or LLaVA ``preprocessor_config.json`` (transformers
``CLIPImageProcessor`` / ``LlavaImageProcessor``, also the legacy ``CLIPFeatureExtractor`` form with int
sizes) into an explicit JSON-able spec; anything else raises ``ValueError`` naming the key.
``preprocess`` follows the spec and reproduces transformers' PIL backend (``PilBackend._preprocess`` and
``LlavaImageProcessorPil``) step for step: pad-to-square (LLaVA ``do_pad``) -> Pillow resize on uint8 ->
center crop (zero padding when the image is smaller) -> float64 rescale cast to float32 -> float32 normalize.
Intermediate images (padded or resized) are limited to 2 * max(MAX_PIXELS, input pixels) so a 1 x 40M strip
cannot blow up into a huge square or resize.
"""
from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from .error_text import one_line

MAX_PIXELS = 40_000_000
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL codes
PIL_RESAMPLE = {name: code for code, name in RESAMPLE.items()}          # the spec's name -> PIL code
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SPEC_KEYS = ("resize", "resample", "center_crop", "rescale_factor", "normalize", "image_mean", "image_std",
             "pad_to_square", "pad_color")


class ImageError(ValueError):
    """An image that cannot be used: unreadable, not an image, truncated, too large, unsupported."""


def load_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``source`` as an 8-bit RGB image with EXIF orientation applied (first frame if animated).

    Raises ImageError for anything unusable, including more than ``max_pixels`` pixels (checked before decoding).
    """
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        return _finish(source, "<PIL image>", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        if len(source) == 0:
            raise ImageError(f"{name}: empty (0 bytes)")
        return _decode(io.BytesIO(bytes(source)), name, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"<{type(source).__name__}>: unsupported image source type (path, bytes or PIL image)")
    name = os.fsdecode(source)
    try:
        if os.stat(source).st_size == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
        with open(source, "rb") as fp:
            return _decode(fp, name, max_pixels)
    except OSError as exc:  # missing, a directory, permission denied, I/O error
        raise ImageError(f"{name}: cannot read file ({one_line(exc)})") from exc


def _decode(fp, name: str, max_pixels: int) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS  # read only
    bomb_warning = "error" if limit is not None and max_pixels <= limit else "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter(bomb_warning, Image.DecompressionBombWarning)
        try:
            with Image.open(fp, formats=FORMATS) as im:  # parses the header only
                _check_pixels(im, name, max_pixels)
                im.load()  # decodes the first frame; raises on truncated data
                return _finish(im, name, max_pixels)
        except ImageError:
            raise
        except Image.UnidentifiedImageError as exc:
            raise ImageError(f"{name}: not an image in a supported format ({', '.join(FORMATS)})") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name}: too many pixels (Pillow decompression-bomb guard: {one_line(exc)})") from exc
        except Exception as exc:  # Pillow plugins raise many types on corrupt input
            raise ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {one_line(exc)})") from exc


def _check_pixels(im: Image.Image, name: str, max_pixels: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                         f"(decompression-bomb guard)")


def _finish(im: Image.Image, name: str, max_pixels: int) -> Image.Image:
    _check_pixels(im, name, max_pixels)
    try:
        im = ImageOps.exif_transpose(im)  # a new (loaded) image; the caller's is never modified
    except Exception as exc:  # a lazily opened PIL image may fail to decode here, or its EXIF may be corrupt
        raise ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {one_line(exc)})") from exc
    return to_rgb(im, name)


def to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency composited onto white (see module docstring)."""
    try:
        if im.mode in _SIXTEEN_BIT:
            a = np.asarray(im).astype(np.float64)
            im = Image.fromarray(np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8))
        elif im.mode == "F":
            a = np.asarray(im).astype(np.float64)
            if not np.isfinite(a).all():
                raise ImageError(f"{name}: float image contains NaN or infinity")
            if a.min() >= 0.0 and a.max() <= 1.0:
                a = a * 255.0
            im = Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8))
        bands = im.getbands()
        if "A" in bands or "a" in bands or im.info.get("transparency") is not None:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im if im.mode == "RGB" else im.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # e.g. a mode Pillow cannot convert to RGB
        raise ImageError(f"{name}: cannot convert to RGB ({type(exc).__name__}: {one_line(exc)})") from exc


# ----------------------------------------------------------------------------------------------------------
# preprocessor_config.json -> spec
_PAD_TO_SQUARE = {  # image_processor_type -> does `do_pad` mean LLaVA's pad-to-square?
    "CLIPImageProcessor": False, "CLIPImageProcessorFast": False, "CLIPImageProcessorPil": False,
    "CLIPFeatureExtractor": False,
    "LlavaImageProcessor": True, "LlavaImageProcessorFast": True, "LlavaImageProcessorPil": True,
}
# Class defaults, identical for CLIPImageProcessor and LlavaImageProcessor (transformers 5.x), used for absent keys.
_DEFAULTS = {"do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
             "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
             "do_convert_rgb": True, "do_pad": False}
_IGNORED = {"image_processor_type", "feature_extractor_type", "processor_class", "_processor_class"}


def preprocess_spec_from_config(cfg: dict) -> dict:
    """A CLIP/LLaVA preprocessor config dict -> explicit JSON-able spec for ``preprocess``.

    Raises ValueError naming the key for unsupported processors, sizes, resampling or options.
    ``do_convert_rgb`` is accepted either way: ``load_image`` always yields RGB, where both settings agree.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"preprocessor config must be a dict, got {type(cfg).__name__}")
    kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
    if kind not in _PAD_TO_SQUARE:
        raise ValueError(f"preprocessor config: image_processor_type {kind!r} is not supported "
                         f"(supported: {', '.join(_PAD_TO_SQUARE)})")
    for key, value in cfg.items():
        if key not in _DEFAULTS and key not in _IGNORED and value not in (None, False):
            raise ValueError(f"preprocessor config: key {key!r} = {value!r} is not supported")

    def get(key):
        value = cfg.get(key, _DEFAULTS[key])
        if value is None:
            raise ValueError(f"preprocessor config: {key!r} is null")
        return value

    def flag(key) -> bool:
        value = get(key)
        if not isinstance(value, bool):
            raise ValueError(f"preprocessor config: {key!r} must be true or false, got {value!r}")
        return value

    spec: dict = {"resize": None, "resample": None, "center_crop": None, "rescale_factor": 1.0,
                  "normalize": False, "image_mean": None, "image_std": None, "pad_to_square": False,
                  "pad_color": None}
    flag("do_convert_rgb")
    if flag("do_resize"):
        spec["resize"] = _size(get("size"), "size", legacy_int="shortest_edge")
        resample = get("resample")
        if isinstance(resample, bool) or not isinstance(resample, int) or int(resample) not in RESAMPLE:
            raise ValueError(f"preprocessor config: 'resample' {resample!r} is not a Pillow filter code "
                             f"{sorted(RESAMPLE)}")
        spec["resample"] = RESAMPLE[int(resample)]
    if flag("do_center_crop"):
        spec["center_crop"] = _size(get("crop_size"), "crop_size", legacy_int="square")
        if "shortest_edge" in spec["center_crop"]:
            raise ValueError("preprocessor config: 'crop_size' needs height and width")
    if flag("do_rescale"):
        spec["rescale_factor"] = _positive(get("rescale_factor"), "rescale_factor")
    mean = _triple(get("image_mean"), "image_mean")
    if flag("do_normalize"):
        spec.update(normalize=True, image_mean=mean, image_std=_triple(get("image_std"), "image_std"))
        if any(s == 0 for s in spec["image_std"]):
            raise ValueError("preprocessor config: 'image_std' contains 0")
    if flag("do_pad"):
        if not _PAD_TO_SQUARE[kind]:
            raise ValueError(f"preprocessor config: 'do_pad' on {kind} pads a batch to a common size; "
                             "not supported")
        # LlavaImageProcessor: background_color = tuple(int(x * 255) for x in image_mean), as original LLaVA.
        spec.update(pad_to_square=True, pad_color=[int(x * 255) for x in mean])
    return spec


def _positive(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"preprocessor config: {key!r} must be a positive number, got {value!r}")
    return float(value)


def _size(value, key: str, legacy_int: str) -> dict:
    if isinstance(value, int) and not isinstance(value, bool):  # legacy CLIPFeatureExtractor form
        value = {"shortest_edge": value} if legacy_int == "shortest_edge" else {"height": value, "width": value}
    if not isinstance(value, dict):
        raise ValueError(f"preprocessor config: {key!r} = {value!r} is not supported")
    given = {k: v for k, v in value.items() if v is not None}
    if set(given) not in ({"shortest_edge"}, {"height", "width"}):
        raise ValueError(f"preprocessor config: {key!r} = {value!r} is not supported "
                         "(only {shortest_edge} or {height, width})")
    for k, v in given.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"preprocessor config: {key}.{k} must be a positive int, got {v!r}")
    return {k: int(v) for k, v in given.items()}


def _triple(value, key: str) -> list[float]:
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or len(values) != 3 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"preprocessor config: {key!r} must be 3 finite numbers, got {value!r}")
    return [float(v) for v in values]


# ----------------------------------------------------------------------------------------------------------
# spec -> pixel_values
def check_spec(spec: dict) -> None:
    """Raise ValueError (naming the key) if ``spec`` is not a well-formed preprocessing spec."""
    if not isinstance(spec, dict):
        raise ValueError(f"preprocess spec must be a dict, got {type(spec).__name__}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"preprocess spec: missing key(s) {missing}")
    resize, crop = spec["resize"], spec["center_crop"]
    if resize is not None:
        _size(resize, "resize", legacy_int="shortest_edge")
        if spec["resample"] not in PIL_RESAMPLE:
            raise ValueError(f"preprocess spec: 'resample' {spec['resample']!r} not in {sorted(PIL_RESAMPLE)}")
    if crop is not None and set(_size(crop, "center_crop", legacy_int="square")) != {"height", "width"}:
        raise ValueError("preprocess spec: 'center_crop' needs height and width")
    _positive(spec["rescale_factor"], "rescale_factor")
    if spec["normalize"] not in (True, False) or spec["pad_to_square"] not in (True, False):
        raise ValueError("preprocess spec: 'normalize' and 'pad_to_square' must be booleans")
    if spec["normalize"]:
        _triple(spec["image_mean"], "image_mean")
        if 0 in _triple(spec["image_std"], "image_std"):
            raise ValueError("preprocess spec: 'image_std' contains 0")
    color = spec["pad_color"]
    if spec["pad_to_square"] and not (isinstance(color, (list, tuple)) and len(color) == 3 and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)):
        raise ValueError(f"preprocess spec: 'pad_color' must be 3 ints in [0, 255], got {color!r}")


def _resized_hw(h: int, w: int, resize: dict) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False) / fixed (height, width)."""
    if "shortest_edge" not in resize:
        return resize["height"], resize["width"]
    size = resize["shortest_edge"]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (new_long, size) if w <= h else (size, new_long)


def _center_crop(a: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers.image_transforms.center_crop on [H, W, C]: zero-pads (ceil-centred) where too small."""
    h, w = a.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return a[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    top_pad, left_pad = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas = np.zeros((nh, nw) + a.shape[2:], dtype=a.dtype)
    canvas[top_pad:top_pad + h, left_pad:left_pad + w] = a
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def preprocess(image: Image.Image, spec: dict) -> np.ndarray:
    """PIL image -> pixel_values float32 [1, 3, H, W], C-contiguous, following ``spec``."""
    check_spec(spec)
    if not isinstance(image, Image.Image):
        raise ImageError(f"<{type(image).__name__}>: preprocess needs a PIL image (use load_image)")
    name = "<PIL image>"
    image = to_rgb(image, name)
    w, h = image.size
    budget = 2 * max(MAX_PIXELS, w * h)  # intermediate images may not grow beyond this

    def guard(hh: int, ww: int, what: str) -> None:
        if hh * ww > budget:
            raise ImageError(f"{name}: {w}x{h} image would need a {ww}x{hh} {what} intermediate "
                             f"(over {budget} pixels)")

    if spec["pad_to_square"] and w != h:  # LLaVA expand2square, centred, before resize
        side = max(w, h)
        guard(side, side, "padded")
        canvas = Image.new("RGB", (side, side), tuple(spec["pad_color"]))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    if spec["resize"] is not None:
        oh, ow = _resized_hw(image.height, image.width, spec["resize"])
        guard(oh, ow, "resized")
        image = image.resize((ow, oh), resample=PIL_RESAMPLE[spec["resample"]])
    a = np.asarray(image)  # [H, W, 3] uint8
    if spec["center_crop"] is not None:
        a = _center_crop(a, spec["center_crop"]["height"], spec["center_crop"]["width"])
    # Same arithmetic as transformers: rescale in float64 then cast, normalize in float32.
    x = (a.astype(np.float64) * spec["rescale_factor"]).astype(np.float32)  # [H, W, 3]
    if spec["normalize"]:
        x = (x - np.asarray(spec["image_mean"], np.float32)) / np.asarray(spec["image_std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # pixel_values: [1, 3, H, W]
