"""safeclip.runtime: load a safeclip-edge bundle and run gated vision-language inference.

Needs numpy, onnxruntime (or TensorRT), tokenizers, pillow and jinja2 only: never torch, transformers or
the exporter. ``manifest.json`` inside a bundle is the only contract with the exporter.
"""
__version__ = "0.1.0"
