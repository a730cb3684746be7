"""Warm worker processes of ``scripts/bench_peers.py``: one engine and one model per process, driven over a pipe.

``python scripts/peer_workers.py ENGINE FOLDER --threads N --capacity C`` loads the model once, answers
``{"ready": ...}``, then one JSON line per request read from stdin (the answers go to the original stdout; the
engines' own prints are sent to stderr):

* ``{"op": "decode", "prompt": [ids], "n": N}``: greedy decode of ``N`` tokens after the prompt; answers the
  token ids and the per-token time stamps (tokens/s = (N - 1) / (last - first), as ``bench_generate``);
* ``{"op": "prefill", "ids": [ids]}``: the prompt alone on an empty cache, timed;
* ``{"op": "quit"}``.

Engines (``ENGINES``): ``ours`` (``OrtDecoder`` + ``generate`` as ``runtime/pipeline.py`` loads a bundle),
``llama.cpp`` (llama-cpp-python's ``Llama``: ``eval`` + argmax of its logits) and ``genai``
(onnxruntime-genai's ``Generator``, greedy). The parent side (:class:`Worker`) reads each worker's per-thread
CPU time from ``/proc/PID/task/*/stat`` around every request (how many threads were busy) and its ``VmHWM``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# -- the engines (worker side) -----------------------------------------------------------------------------------
class Ours:
    def __init__(self, folder: Path, threads: int, capacity: int):
        sys.path.insert(0, str(HERE))
        from bench_quant import Runtime

        info = {**json.loads((folder / "bundle.json").read_text()), "dir": str(folder)}
        self.rt = Runtime(folder, info, threads, capacity)

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        from safeclip.runtime.generate import embed_prompt, generate

        stamps: list[float] = []
        emb = embed_prompt(self.rt.table, np.asarray(prompt), dtype=self.rt.decoder.dtype)
        res = generate(self.rt.decoder, self.rt.table, emb, max_new_tokens=n, eos_token_ids=[],
                       tokenizer=self.rt.tok, on_token=lambda t, piece: stamps.append(time.perf_counter()))
        return [int(t) for t in res.token_ids], stamps

    def prefill(self, ids: list[int]) -> float:
        from safeclip.runtime.generate import embed_prompt

        t0 = time.perf_counter()
        self.rt.decoder.prefill(embed_prompt(self.rt.table, np.asarray(ids), dtype=self.rt.decoder.dtype))
        return time.perf_counter() - t0


class LlamaCpp:
    def __init__(self, folder: Path, threads: int, capacity: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(folder / "model.gguf"), n_ctx=capacity, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, n_ubatch=512, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def last_logits(self) -> np.ndarray:
        """The last evaluated position's logits, from llama.cpp's context (``llama_get_logits_ith``):
        llama-cpp-python 0.3.36 no longer copies them into ``Llama.scores`` unless ``logits_all`` (``Llama.eval``
        in ``llama_cpp/llama.py``: the copy is commented out, "logits are only needed for logprobs"), so that
        array stays zero (every greedy token was 0 until 2026-12-06)."""
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        llm, tokens, stamps = self.llm, [], []
        llm.reset()
        llm.eval(prompt)
        for _ in range(n):
            tok = int(np.argmax(self.last_logits()))
            tokens.append(tok)
            stamps.append(time.perf_counter())
            if len(tokens) < n:
                llm.eval([tok])
        return tokens, stamps

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0


class Genai:
    def __init__(self, folder: Path, threads: int, capacity: int):
        import onnxruntime_genai as og

        self.og, self.capacity = og, capacity
        self.model = og.Model(str(folder))

    def _generator(self):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.capacity, do_sample=False)
        return self.og.Generator(self.model, params)

    def decode(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        gen, tokens, stamps = self._generator(), [], []
        gen.append_tokens(np.asarray(prompt, np.int32))
        for _ in range(n):
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        return tokens, stamps

    def prefill(self, ids: list[int]) -> float:
        gen = self._generator()
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, np.int32))
        return time.perf_counter() - t0


ENGINES = {"ours": Ours, "llama.cpp": LlamaCpp, "genai": Genai}


def serve(engine: str, folder: Path, threads: int, capacity: int) -> int:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                # the engines' own prints go to stderr
    t0 = time.perf_counter()
    impl = ENGINES[engine](folder, threads, capacity)
    answers.write(json.dumps({"ready": True, "load_s": time.perf_counter() - t0}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        if req["op"] == "decode":
            tokens, stamps = impl.decode(req["prompt"], req["n"])
            ans = {"tokens": tokens, "tps": (len(stamps) - 1) / (stamps[-1] - stamps[0])}
        else:
            s = impl.prefill(req["ids"])
            ans = {"s": s, "tps": len(req["ids"]) / s}
        answers.write(json.dumps(ans) + "\n")
    return 0


# -- the parent side -----------------------------------------------------------------------------------------------
def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of ``pid`` (``/proc/PID/task/TID/stat`` fields 14-15)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:                                   # the thread ended meanwhile
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def busy_threads(before: dict[int, float], after: dict[int, float], wall: float) -> dict:
    """Threads that were on a CPU for at least half of ``wall``, and the CPU seconds per wall second."""
    deltas = [after[t] - before.get(t, 0.0) for t in after]
    return {"busy": sum(d >= 0.5 * wall for d in deltas), "cpus": sum(deltas) / wall if wall > 0 else 0.0}


class Worker:
    """One warm worker process (``serve``) with per-request busy-thread accounting."""

    def __init__(self, engine: str, folder: Path, threads: int, capacity: int, log: Path):
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, engine, str(folder), "--threads", str(threads),
                                      "--capacity", str(capacity)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1)
        self.ready = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[2]} {self.proc.args[3]} exited "
                               f"(rc {self.proc.wait()}); see {self.log.name}")
        return json.loads(line)

    def request(self, **req) -> dict:
        before, t0 = thread_cpu_s(self.proc.pid), time.perf_counter()
        self.proc.stdin.write(json.dumps(req) + "\n")
        ans = self._answer()
        wall = time.perf_counter() - t0
        return {**ans, "wall_s": wall, **busy_threads(before, thread_cpu_s(self.proc.pid), wall)}

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise OSError(f"/proc/{self.proc.pid}/status has no VmHWM")

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine", choices=list(ENGINES))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=512)
    a = ap.parse_args(argv)
    return serve(a.engine, a.folder, a.threads, a.capacity)


if __name__ == "__main__":
    sys.exit(main())
