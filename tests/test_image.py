"""runtime/image.py: parity with transformers' own image processors, and every hostile input it must guard.

Parity oracle: transformers' PIL backend (CLIPImageProcessorPil, LlavaImageProcessorPil). The runtime does the
same Pillow resize on uint8 and the same float64->float32 arithmetic, so the tolerance is 1e-6 (observed: 0.0).
"""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

import safeclip.runtime.image as image_module
from safeclip.runtime.image import (MAX_PIXELS, ImageError, check_spec, load_image, preprocess,
                                    preprocess_spec_from_config)

ATOL = 1e-6
SIZES = [(336, 336), (640, 480), (480, 640), (100, 37), (1, 1), (3, 2), (2000, 300)]  # (width, height)
PIL_DEFAULT_MAX = Image.MAX_IMAGE_PIXELS


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    if mode in ("RGBA", "LA"):
        a[: h // 2, ..., -1] = 0  # fully transparent top half, partly transparent elsewhere
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode=None)


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h RGB pixels, followed by a few bytes of (invalid) image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def processors():
    tf = pytest.importorskip("transformers")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    assert tf.__version__
    sq336 = {"height": 336, "width": 336}
    return {
        "clip336": CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=sq336),  # LLaVA-1.5 tower
        "clip224": CLIPImageProcessorPil(),
        "hw_resize_bilinear_crop_pads": CLIPImageProcessorPil(
            size={"height": 99, "width": 401}, crop_size={"height": 224, "width": 224}, resample=2,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
        "hw_no_crop_no_norm": CLIPImageProcessorPil(size={"height": 200, "width": 300}, do_center_crop=False,
                                                    do_normalize=False, resample=1),
        "llava_pad_square": LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size=sq336, do_pad=True),
    }


@pytest.fixture(scope="module")
def procs():
    return processors()


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", ["clip336", "clip224", "hw_resize_bilinear_crop_pads", "hw_no_crop_no_norm",
                                  "llava_pad_square"])
def test_parity_with_transformers(procs, name):
    proc = procs[name]
    spec = json.loads(json.dumps(preprocess_spec_from_config(proc.to_dict())))  # as stored in the manifest
    for i, (w, h) in enumerate(SIZES):
        img = noise(w, h, seed=i)
        ref = proc(images=img, return_tensors="np")["pixel_values"]
        out = preprocess(load_image(encoded(img, "PNG")), spec)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == ref.shape, (w, h)
        err = float(np.abs(out - ref).max())
        assert err <= ATOL, f"{name} {w}x{h}: max abs error {err}"


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P"])
def test_parity_for_other_modes(procs, mode):
    """transformers composites alpha onto white too; grey and palette images go through the same conversion."""
    proc = procs["clip336"]
    spec = preprocess_spec_from_config(proc.to_dict())
    img = noise(320, 200, "RGB" if mode == "P" else mode, seed=3)
    if mode == "P":
        img = img.quantize(16)
        img.info["transparency"] = 0
    ref = proc(images=img, return_tensors="np")["pixel_values"]
    assert np.abs(preprocess(load_image(img), spec) - ref).max() <= ATOL
    assert np.abs(preprocess(img, spec) - ref).max() <= ATOL  # preprocess converts non-RGB itself


def test_llava_pad_really_pads(procs):
    """The pad-to-square spec must differ from plain CLIP on a non-square image (else the parity proves nothing)."""
    img = noise(640, 300)
    clip = preprocess(img, preprocess_spec_from_config(procs["clip336"].to_dict()))
    spec = preprocess_spec_from_config(procs["llava_pad_square"].to_dict())
    assert spec["pad_to_square"] and spec["pad_color"] == [122, 116, 104]
    assert np.abs(preprocess(img, spec) - clip).max() > 0.5


def test_spec_from_hub_style_json_and_legacy_form():
    cfg = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
           "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
           "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor",
           "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}
    spec = preprocess_spec_from_config(cfg)
    assert spec == {"resize": {"shortest_edge": 336}, "resample": "bicubic",
                    "center_crop": {"height": 336, "width": 336}, "rescale_factor": 0.00392156862745098,
                    "normalize": True, "image_mean": cfg["image_mean"], "image_std": cfg["image_std"],
                    "pad_to_square": False, "pad_color": None}
    legacy = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": cfg["image_mean"],
              "image_std": cfg["image_std"], "resample": 3, "size": 336}  # openai/clip-vit-large-patch14-336
    assert preprocess_spec_from_config(legacy) == spec
    check_spec(spec)


@pytest.mark.parametrize("change, key", [
    ({"image_processor_type": "SiglipImageProcessor"}, "image_processor_type"),
    ({"image_processor_type": None}, "image_processor_type"),
    ({"image_grid_pinpoints": [[336, 672]]}, "image_grid_pinpoints"),
    ({"size": {"shortest_edge": 336, "longest_edge": 600}}, "size"),
    ({"do_pad": True}, "do_pad"),
    ({"resample": 9}, "resample"),
    ({"resample": None}, "resample"),
    ({"image_std": [0.2, 0.0, 0.2]}, "image_std"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"crop_size": {"shortest_edge": 336}}, "crop_size"),
    ({"do_resize": "yes"}, "do_resize"),
])
def test_spec_rejects_unsupported_config_naming_the_key(change, key):
    cfg = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336}, **change}
    with pytest.raises(ValueError, match=key):
        preprocess_spec_from_config(cfg)


def test_check_spec_rejects_malformed_spec():
    good = preprocess_spec_from_config({"image_processor_type": "LlavaImageProcessor", "do_pad": True})
    check_spec(good)
    for key, bad in [("resample", "cubic"), ("center_crop", {"height": 3}), ("pad_color", [1, 2, 300]),
                     ("rescale_factor", 0)]:
        with pytest.raises(ValueError, match=key):
            check_spec({**good, key: bad})
    with pytest.raises(ValueError, match="normalize"):
        check_spec({k: v for k, v in good.items() if k != "normalize"})


# ---------------------------------------------------------------------------------------------- hostile inputs
def assert_rejected(source, *fragments, **kw) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f.lower() in msg.lower(), msg
    return msg


def test_unreadable_empty_and_non_images(tmp_path):
    assert_rejected(tmp_path / "missing.jpg", "missing.jpg", "cannot read")
    assert_rejected(tmp_path, str(tmp_path), "cannot read")  # a directory
    (tmp_path / "empty.png").write_bytes(b"")
    assert_rejected(tmp_path / "empty.png", "empty.png", "0 bytes")
    assert_rejected(b"", "<bytes>", "0 bytes")
    (tmp_path / "notes.jpg").write_text("hello, I am not a picture\n")
    assert_rejected(str(tmp_path / "notes.jpg"), "notes.jpg", "not an image")
    assert_rejected(12345, "unsupported")


def test_unsupported_format_is_refused(tmp_path):
    (tmp_path / "icon.ico").write_bytes(encoded(noise(32, 32), "ICO"))
    assert Image.open(tmp_path / "icon.ico").size == (32, 32)  # Pillow itself would open it
    assert_rejected(tmp_path / "icon.ico", "icon.ico", "not an image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_rejected_not_half_decoded(tmp_path, fmt):
    data = encoded(noise(256, 256), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data)
    assert load_image(path).size == (256, 256)  # the whole file is fine
    path.write_bytes(data[: len(data) // 2])
    assert_rejected(path, "cut.", "cannot decode")
    assert_rejected(data[: len(data) // 2], "<bytes>")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False and Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_MAX


def test_decompression_bombs(tmp_path, monkeypatch):
    (tmp_path / "huge.png").write_bytes(png_claiming(100_000, 100_000))  # Pillow's own error threshold
    assert_rejected(tmp_path / "huge.png", "huge.png", "pixels")
    assert_rejected(png_claiming(8000, 8000), "8000x8000", "exceeds the limit")  # ours, below Pillow's
    # Between Pillow's warning and error thresholds with a raised limit: no warning escapes, the bad data is caught.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert_rejected(png_claiming(10_000, 10_000), "cannot decode", max_pixels=150_000_000)
        assert_rejected(png_claiming(10_000, 10_000), "pixels")
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    # The size check happens before any pixel is decoded.
    ok = encoded(noise(100, 100), "PNG")
    assert load_image(ok, max_pixels=10_000).size == (100, 100)

    def no_decoding(self):
        raise AssertionError("pixels decoded before the size check")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert_rejected(ok, "exceeds the limit of 9999", max_pixels=9999)
    monkeypatch.undo()
    assert Image.MAX_IMAGE_PIXELS == PIL_DEFAULT_MAX and ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert MAX_PIXELS < PIL_DEFAULT_MAX


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    im = load_image(tmp_path / "cmyk.jpg")
    assert im.mode == "RGB" and np.abs(np.asarray(im, int)[16, 16] - (255, 0, 0)).max() <= 3


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    a = (np.arange(64, dtype=np.uint16) * 1040).reshape(8, 8)  # 0 .. 65520
    Image.fromarray(a).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    got = np.asarray(load_image(tmp_path / "deep.png"))
    assert got.shape == (8, 8, 3) and (got[..., 0] == got[..., 2]).all()
    assert np.abs(got[..., 0].astype(int) - np.rint(a / 257)).max() == 0


def test_float_image(tmp_path):
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(a).save(tmp_path / "float.tif")
    got = np.asarray(load_image(tmp_path / "float.tif"))[..., 1].astype(int)
    assert np.abs(got - np.rint(a * 255)).max() == 0
    a[0, 0] = np.nan
    assert_rejected(Image.fromarray(a), "NaN")


def test_grey_and_grey_alpha(tmp_path):
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(tmp_path / "grey.png")
    assert np.asarray(load_image(tmp_path / "grey.png")).tolist() == [[[77] * 3] * 4] * 4
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 1] = 0  # fully transparent black
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert (np.asarray(load_image(tmp_path / "la.png")) == 255).all()


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0] = (0, 0, 0, 0)  # hidden content under full transparency
    a[0, 1] = (200, 0, 0, 128)
    a[1, :] = (10, 20, 30, 255)
    Image.fromarray(a, mode="RGBA").save(tmp_path / "rgba.png")
    got = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert np.abs(got[0, 1] - np.rint(np.array([200, 0, 0]) * 128 / 255 + 255 * 127 / 255)).max() <= 1
    assert got[1, 0].tolist() == [10, 20, 30]


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    p.putpixel((3, 3), 1)
    p.save(tmp_path / "pal.png", transparency=0)
    got = np.asarray(load_image(tmp_path / "pal.png"))
    assert got[0, 0].tolist() == [255, 255, 255] and got[3, 3].tolist() == [255, 0, 0]


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_animated_image_gives_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(path), "n_frames", 1) == 3
    assert np.asarray(load_image(path))[8, 8].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)   # left half red
    a[:, 20:] = (0, 0, 255)   # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)
    got = np.asarray(load_image(tmp_path / "rot.jpg")).astype(int)
    assert got.shape == (40, 20, 3)  # now portrait
    assert np.abs(got[5, 10] - (255, 0, 0)).max() < 40 and np.abs(got[34, 10] - (0, 0, 255)).max() < 40


def test_pil_input_is_not_modified():
    img = noise(10, 6, "RGBA")
    out = load_image(img)
    assert img.mode == "RGBA" and out.mode == "RGB" and out.size == (10, 6)
    assert_rejected(img, "exceeds the limit", max_pixels=59)


# ---------------------------------------------------------------------------------------------- preprocess guards
def test_thin_strip_cannot_explode_in_resize_or_pad(monkeypatch):
    """A 1-pixel-high strip (a few KB as PNG) would resize or pad into billions of pixels; the budget is
    2 * max(MAX_PIXELS, input pixels). MAX_PIXELS is lowered here so that an unguarded run fails cleanly."""
    clip = preprocess_spec_from_config({"image_processor_type": "CLIPImageProcessor", "size": 32, "crop_size": 32})
    llava = preprocess_spec_from_config({"image_processor_type": "LlavaImageProcessor", "do_pad": True,
                                         "do_resize": False, "crop_size": 32})
    strip = Image.new("RGB", (2000, 5), (9, 9, 9))
    assert preprocess(strip, clip).shape == preprocess(strip, llava).shape == (1, 3, 32, 32)  # default budget
    monkeypatch.setattr(image_module, "MAX_PIXELS", 100_000)  # budget 200k: resized 12800x32, padded 2000x2000
    for spec, what in ((clip, "resized"), (llava, "padded")):
        with pytest.raises(ImageError, match=what):
            preprocess(strip, spec)
    assert preprocess(Image.new("RGB", (300, 200)), clip).shape == (1, 3, 32, 32)


def test_module_imports_no_heavy_packages():
    code = ("import sys, safeclip.runtime.image; "
            "bad = [m for m in ('torch', 'transformers', 'onnx', 'safeclip.export') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
