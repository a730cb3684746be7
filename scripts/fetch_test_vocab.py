"""Fetch and convert the real tokenizer vocabularies that the tests use (``tests/test_real_vocab.py``).

Idempotent; ``.ci/run`` runs it after installing the ``[dev]`` extra. Two steps:

1. extract llama.cpp's ``ggml-vocab-llama-bpe.gguf`` (Llama-3) and ``ggml-vocab-qwen2.gguf`` (with their
   ``.inp``/``.out`` test vectors and llama.cpp's MIT licence) from llama-cpp-python's PyPI sdist
   (``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``, ~77 MB, once) into the cache
   folder (``$SAFECLIP_TEST_VOCAB_DIR``, default ``~/.cache/safeclip-edge/llama-cpp-python-0.3.36-vocab``);
2. convert every vocabulary (those committed under ``tests/data/vocab`` too) to a ``tokenizer.json`` with
   transformers, cached beside them keyed by source sha256 and transformers version (the GGUF converter
   takes 10-30 s per big vocabulary; tests would otherwise pay that every session).

Usage: ``python scripts/fetch_test_vocab.py [--no-convert]``
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _vocab  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--no-convert", action="store_true", help="only fetch the files")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        dest = _vocab.fetch(quiet=True)
    except Exception as e:             # pip or PyPI unavailable, or the sdist changed layout
        print(f"fetch_test_vocab: cannot fetch llama-cpp-python {_vocab.LLAMA_CPP_PYTHON}'s vocabularies: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"fetch_test_vocab: vocabularies in {dest} ({time.perf_counter() - t0:.1f} s)")
    if not args.no_convert:
        t1 = time.perf_counter()
        names = _vocab.convert_all()
        print(f"fetch_test_vocab: converted {', '.join(names)} ({time.perf_counter() - t1:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
