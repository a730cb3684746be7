#!/usr/bin/env python3
"""Conversation TTFT: a text follow-up about the same image against the first turn (vision pass + full prefill).

Per repeat, a new conversation on a new image (the image cache emptied, so the first turn pays for the vision
pass): turn 1 "image + question", then turn 2 a text follow-up (KV reuse: only its new tokens are prefilled),
then the same follow-up with the cache invalidated (what it would cost without reuse). TTFT is wall time from
``ask()`` to the first token (``max_new_tokens=1``: the stream ends at the first token). Medians of
``--repeat``; prints a table and writes JSON.

    python scripts/bench_chat.py [--bundle DIR] [--repeat 5] [--threads N] [--out bench-results/chat.json]

Without ``--bundle`` the demo bundle is exported into a temporary folder first (torch needed for that only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _ttft(chat, text, image=None) -> tuple[float, dict]:
    t0 = time.perf_counter()
    s = chat.ask(text, image, max_new_tokens=1)
    for _ in s:
        pass
    return (time.perf_counter() - t0) * 1e3, s.result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, default=Path("bench-results/chat.json"))
    a = ap.parse_args()

    from PIL import Image

    from safeclip.runtime.pipeline import Pipeline

    work = Path(tempfile.mkdtemp(prefix="safeclip-chat-"))
    bundle = a.bundle
    if bundle is None:
        os.environ.setdefault("SAFECLIP_CACHE_DIR", str(work / "cache"))
        from safeclip.export.bundle import ExportOptions, export_bundle
        bundle = export_bundle(ExportOptions(model="demo", out=work / "demo")).bundle
    pipe = Pipeline.load(bundle, threads=a.threads)
    rng = np.random.default_rng(0)
    rows = {"first": [], "follow_up": [], "follow_up_no_reuse": []}
    detail = []
    for r in range(a.repeat + 1):                                   # the first repeat warms up, not counted
        img = Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))
        pipe.image_cache.clear()
        chat = pipe.chat(system="You are a helpful assistant.")
        first, res1 = _ttft(chat, "What is in the picture? Describe it.", img)
        follow, res2 = _ttft(chat, "How old is it?")
        chat.undo()                                                 # ask the same follow-up again, no reuse
        pipe.language_model.owner = None                            # the decoder's cache is nobody's
        cold, res3 = _ttft(chat, "How old is it?")
        assert res2.token_ids == res3.token_ids, "reuse changed the answer"
        if r:
            for k, v in zip(rows, (first, follow, cold)):
                rows[k].append(v)
            detail.append({"first_prompt_tokens": res1.prompt_tokens, "follow_up_prompt_tokens": res2.prompt_tokens,
                           "follow_up_cached_tokens": res2.cached_tokens})
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["follow_up"] / med["first"]
    out = {"bundle": str(bundle), "backend": pipe.backend, "repeat": a.repeat, "threads": a.threads,
           "ttft_ms_median": med, "ttft_ms": rows, "follow_up_over_first": ratio,
           "follow_up_no_reuse_over_first": med["follow_up_no_reuse"] / med["first"], "turns": detail[-1]}
    print(f"bundle {bundle} ({pipe.backend}), medians of {a.repeat}")
    print("| turn | prompt tokens | prefilled | TTFT ms |\n|---|---:|---:|---:|")
    d = detail[-1]
    n1 = d["first_prompt_tokens"]
    print(f"| first (image + question) | {n1} | {n1} | {med['first']:.1f} |")
    print(f"| text follow-up (KV reuse) | {d['follow_up_prompt_tokens']} | "
          f"{d['follow_up_prompt_tokens'] - d['follow_up_cached_tokens']} | {med['follow_up']:.1f} |")
    print(f"| text follow-up, no reuse | {d['follow_up_prompt_tokens']} | {d['follow_up_prompt_tokens']} | "
          f"{med['follow_up_no_reuse']:.1f} |")
    print(f"follow-up / first TTFT: {ratio:.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
