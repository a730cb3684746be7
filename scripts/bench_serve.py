#!/usr/bin/env python3
"""Continuous batching through the HTTP server: concurrent streaming clients against ``safeclip-serve``.

Starts ``safeclip-serve --max-batch B`` on a free loopback port (a subprocess, as deployed) and runs rounds of
N concurrent streaming clients (``--clients 1,4,8``), each with its own text question (mixed prompt
lengths), greedy, ``max_tokens`` each with EOS ignored by asking for a length the demo/real models reach
(the finish reason is reported). Per round: TTFT p50/p95 (request sent -> first content chunk, at the
client), aggregate decode tokens/s (every client's tokens after its first, over the span from the first
client's first token to the last client's last one: prefills of later arrivals stall it), the same within the
server's decode steps only (``/health``'s batch counters: tokens decoded / seconds in decode steps, and the
mean batch), wall time. Every client's text is checked against its
solo answer (the same question alone, the first round). ``--openai N`` adds a round of N concurrent openai
clients (streamed and plain, no retries): every request must be answered (200) or cleanly refused (503 with
Retry-After); any other status is counted as a failure. Prints a table and writes JSON.

    python scripts/bench_serve.py --bundle DIR [--clients 1,4,8] [--max-batch 8] [--max-tokens 48]
        [--threads N] [--context C] [--openai 50] [--out bench-results/serve.json]
    python scripts/bench_serve.py --bundle DIR --steps [--max-batch 8]     # one decode step at B = 1..8

``--steps`` times the batched decoder alone (no server): a decode step of B running sequences (each with a
``--past``-token cache) for B = 1..max-batch, median of ``--repeat``; the "all slots, idle ones masked"
alternative costs what the B = max-batch row costs at every step.

Without ``--bundle`` the demo bundle is exported into a temporary folder first (torch needed for that only).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

QUESTIONS = ["Hi", "What is a kiosk?", "Name three colours of the rainbow and say why the sky looks blue.",
             "Write one sentence about a cat.", "Tell me about the history of bicycles in a few words, please.",
             "What is 2 + 2?", "Describe a quiet morning at the beach, with the sound of the waves and the gulls.",
             "Why do leaves fall in autumn?", "Give me a short tip for learning a new language.",
             "What does a lighthouse do?", "Explain what a CPU cache is to a child.", "Say hello in French."]


def _start_server(bundle: Path, max_batch: int, max_queue: int, threads: int | None, context: int | None):
    cmd = [sys.executable, "-m", "safeclip.runtime.serve.cli", "--bundle", str(bundle), "--port", "0",
           "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--max-connections", "128",
           "--log-level", "warning", "--max-tokens", "4096"]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--context", str(context)] if context else []
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    if "serving" not in line:
        p.kill()
        raise SystemExit(f"bench_serve: the server did not start: {line.strip()} {p.stderr.read()[-2000:]}")
    port = int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()     # keep draining
    return p, port


def _stream_one(port: int, question: str, max_tokens: int) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        return {"status": r.status, "text": r.read().decode(errors="replace")}
    text, first, tokens, finish = [], None, 0, None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        for ch in ev.get("choices", []):
            piece = ch.get("delta", {}).get("content")
            if piece:
                if first is None:
                    first = time.perf_counter()
                text.append(piece)
            finish = ch.get("finish_reason") or finish
    end = time.perf_counter()
    c.close()
    return {"status": 200, "text": "".join(text), "t0": t0, "first": first or end, "end": end,
            "tokens": tokens, "finish": finish}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _round(port: int, n: int, max_tokens: int) -> dict:
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    before = json.loads(_get(port, "/health")).get("batch")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        rows = list(pool.map(lambda q: _stream_one(port, q, max_tokens), qs))
    wall = time.perf_counter() - t0
    bad = [r for r in rows if r["status"] != 200]
    if bad:
        raise SystemExit(f"bench_serve: {len(bad)} of {n} streams failed: {bad[0]}")
    ttft = [(r["first"] - r["t0"]) * 1e3 for r in rows]
    span = max(r["end"] for r in rows) - min(r["first"] for r in rows)
    decode = sum(max(0, r["tokens"] - 1) for r in rows)
    after = json.loads(_get(port, "/health")).get("batch")
    steps = {}
    if before and after:                                   # the server's own counters: decode steps only
        d_s, d_tok = after["decode_s"] - before["decode_s"], after["decoded_tokens"] - before["decoded_tokens"]
        steps = {"step_tokens_per_s": round(d_tok / d_s, 2) if d_s > 0 else 0.0,
                 "prefill_s": round(after["prefill_s"] - before["prefill_s"], 2), "decode_s": round(d_s, 2),
                 "mean_batch": round(d_tok / max(1, after["steps"] - before["steps"]), 2)}
    return {"clients": n, **steps, "wall_s": round(wall, 2), "ttft_p50_ms": round(_pct(ttft, 0.5), 1),
            "ttft_p95_ms": round(_pct(ttft, 0.95), 1), "completion_tokens": sum(r["tokens"] for r in rows),
            "decode_tokens_per_s": round(decode / span, 2) if span > 0 else 0.0,
            "finish": sorted({r["finish"] for r in rows}), "texts": dict(zip(qs, (r["text"] for r in rows)))}


def _openai_round(port: int, n: int, model: str) -> dict:
    import openai

    cl = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)

    def one(i):
        kw = dict(model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=8)
        try:
            if i % 2:
                text = "".join(c.choices[0].delta.content or "" for c in cl.chat.completions.create(stream=True, **kw)
                               if c.choices)
            else:
                text = cl.chat.completions.create(**kw).choices[0].message.content
            return 200, bool(text is not None)
        except openai.APIStatusError as e:
            return e.status_code, e.status_code == 503 and int(e.response.headers.get("retry-after", 0)) >= 1
        except Exception as e:                               # noqa: BLE001 - a failure to count, not to hide
            return type(e).__name__, False

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        res = list(pool.map(one, range(n)))
    statuses = {}
    for s, _ in res:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    clean = all(ok for _, ok in res)
    return {"clients": n, "wall_s": round(time.perf_counter() - t0, 2), "statuses": statuses,
            "all_answered_or_cleanly_refused": clean,
            "server_errors": sum(v for k, v in statuses.items() if k.isdigit() and int(k) >= 500 and k != "503")}


def _steps(bundle: Path, slots: int, past: int, repeat: int, threads: int | None) -> dict:
    import numpy as np

    from safeclip.runtime.backends.slots import SlotDecoder
    from safeclip.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=threads, context=past + repeat + 8)
    lm = pipe.language_model
    dec = SlotDecoder.sharing(lm.decoder, slots)
    rng = np.random.default_rng(0)
    for s in range(slots):
        dec.prefill(s, np.asarray(lm.table[rng.integers(3, lm.table.shape[0], past)], dec.dtype))
    rows = []
    for b in range(1, slots + 1):
        x = np.asarray(lm.table[rng.integers(3, lm.table.shape[0], b)], dec.dtype)
        times = []
        dec.decode(x)                                          # warm-up (not counted)
        dec.lengths[:b] -= 1
        for _ in range(repeat):
            t = time.perf_counter()
            dec.decode(x)
            times.append(time.perf_counter() - t)
            dec.lengths[:b] -= 1                               # the same past every repeat
        ms = sorted(times)[len(times) // 2] * 1e3
        rows.append({"batch": b, "step_ms": round(ms, 2), "tokens_per_s": round(b / ms * 1e3, 2)})
        print(f"  B={b}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"bundle": str(bundle), "past": past, "repeat": repeat, "threads": threads, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--context", type=int)
    ap.add_argument("--openai", type=int, default=0, help="also a round of this many openai clients")
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve.json"))
    ap.add_argument("--steps", action="store_true", help="time the batched decoder's step at B = 1..max-batch")
    ap.add_argument("--past", type=int, default=64, help="--steps: cached tokens per sequence")
    ap.add_argument("--repeat", type=int, default=7, help="--steps: steps timed per B (median)")
    a = ap.parse_args()
    bundle = a.bundle
    if bundle is None:
        work = Path(tempfile.mkdtemp(prefix="safeclip-serve-"))
        os.environ.setdefault("SAFECLIP_CACHE_DIR", str(work / "cache"))
        from safeclip.export.bundle import ExportOptions, export_bundle
        bundle = export_bundle(ExportOptions(model="demo", out=work / "demo")).bundle
    if a.steps:
        out = _steps(bundle, a.max_batch, a.past, a.repeat, a.threads)
        one = out["rows"][0]["step_ms"]
        print(f"\nbatched decode step, {a.past} cached tokens per sequence (median of {a.repeat})")
        print(f"{'B':>3} {'step ms':>9} {'x B=1 step':>10} {'tokens/s':>9}")
        for r in out["rows"]:
            print(f"{r['batch']:>3} {r['step_ms']:>9} {r['step_ms'] / one:>10.2f} {r['tokens_per_s']:>9}")
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2))
        return 0
    counts = [int(c) for c in a.clients.split(",") if c]
    load0 = os.getloadavg()
    proc, port = _start_server(bundle, a.max_batch, a.max_queue, a.threads, a.context)
    try:
        model = json.loads(_get(port, "/v1/models"))["data"][0]["id"]
        solo = {}
        for q in QUESTIONS[:max(counts)]:                    # each question alone: the reference answers
            solo[q] = _stream_one(port, q, a.max_tokens)["text"]
        rounds = []
        for n in counts:
            r = _round(port, n, a.max_tokens)
            r["equal_to_solo"] = all(t == solo[q] for q, t in r.pop("texts").items())
            rounds.append(r)
            print(f"  {n} clients: {r}", file=sys.stderr, flush=True)
        base = next((r["decode_tokens_per_s"] for r in rounds if r["clients"] == 1), None)
        for r in rounds:
            r["speedup_vs_1"] = round(r["decode_tokens_per_s"] / base, 2) if base else None
            one = next((x.get("step_tokens_per_s") for x in rounds if x["clients"] == 1), None)
            has = one and "step_tokens_per_s" in r
            r["step_speedup_vs_1"] = round(r["step_tokens_per_s"] / one, 2) if has else None
        oa = _openai_round(port, a.openai, model) if a.openai else None
        health = json.loads(_get(port, "/health"))
    finally:
        proc.terminate()
        proc.wait(30)
    out = {"load_average_before": load0, "load_average_after": os.getloadavg(), "bundle": str(bundle), "model": model, "max_batch": a.max_batch, "max_tokens": a.max_tokens,
           "threads": a.threads, "cpus": os.cpu_count(), "rounds": rounds, "openai": oa, "health_after": health}
    print(f"\nsafeclip-serve --max-batch {a.max_batch}, {model}, {a.max_tokens} tokens per client, greedy "
          f"(load average {load0[0]:.1f} before, {out['load_average_after'][0]:.1f} after)")
    print(f"{'clients':>7} {'decode tok/s':>12} {'x vs 1':>7} {'in steps':>9} {'x vs 1':>7} {'mean B':>6} "
          f"{'prefill s':>9} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} {'wall s':>7} {'= solo':>6}")
    for r in rounds:
        print(f"{r['clients']:>7} {r['decode_tokens_per_s']:>12} {r['speedup_vs_1']:>7} "
              f"{r.get('step_tokens_per_s', '-'):>9} {r.get('step_speedup_vs_1') or '-':>7} "
              f"{r.get('mean_batch', '-'):>6} {r.get('prefill_s', '-'):>9} {r['ttft_p50_ms']:>12} "
              f"{r['ttft_p95_ms']:>12} {r['wall_s']:>7} {'yes' if r['equal_to_solo'] else 'NO':>6}")
    if oa:
        print(f"openai x{oa['clients']}: statuses {oa['statuses']}, answered or cleanly refused: "
              f"{oa['all_answered_or_cleanly_refused']}, wall {oa['wall_s']} s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    ok = all(r["equal_to_solo"] for r in rounds) and (oa is None or oa["all_answered_or_cleanly_refused"])
    return 0 if ok else 1


def _get(port: int, path: str) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    return c.getresponse().read().decode()


if __name__ == "__main__":
    sys.exit(main())
