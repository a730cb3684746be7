"""``safeclip-serve``: an OpenAI-compatible HTTP server and an offline kiosk page for one bundle.

Needs the ``[serve]`` extra (FastAPI + uvicorn); the rest of the runtime does not. Importing this package
imports neither: ``create_app`` loads them on first use, so ``safeclip.runtime`` stays importable without.

    from safeclip.runtime.pipeline import Pipeline
    from safeclip.runtime.serve import create_app
    app = create_app(Pipeline.load("engines/demo"))          # then: uvicorn.run(app, host="127.0.0.1")
"""
from __future__ import annotations

__all__ = ["create_app", "PROG"]

PROG = "safeclip-serve"                          # every line the server and its command print starts with it


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
