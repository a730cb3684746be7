"""Exporter memory and time at real checkpoint sizes: ``safeclip-export`` on random real-shape checkpoints.

    python scripts/bench_export.py                     # the default cases (below); checkpoints cached in --work
    python scripts/bench_export.py --quick             # the tiny shape only (1-2 minutes): checks the benchmark
    python scripts/bench_export.py --cases tinyllava-1.5b/jetson --rev HEAD~3    # the exporter as of a revision
    python scripts/bench_export.py --write-only --cases llava-1.5-7b/jetson     # only write (time) the checkpoint

A case is ``SHAPE/TARGET[/DTYPE[/LAYOUT]]``: SHAPE from ``scripts/realshape.py`` (``tinyllava-1.5b``,
``llava-1.5-7b``, ``tiny``), TARGET an exporter target (cpu, jetson, datacenter), DTYPE of the source
checkpoint (fp16 default, bf16), LAYOUT of its weight names (legacy default, transformers5). Default cases:
tinyllava-1.5b/jetson, tinyllava-1.5b/cpu, tinyllava-1.5b/jetson/bf16, llava-1.5-7b/jetson (the last needs
about 15 GB of disk for the checkpoint and, with the pre-streaming exporter, more memory than 24 GiB).

Per case: the LLaVA checkpoint (and the ViT-L CLIP for ``--clip``) is written by ``realshape.py`` in a child
process (its own wall time and peak RSS recorded) or reused from ``--work`` when its stamp matches; then
``safeclip-export --model DIR --clip CLIPDIR --target T --out OUT`` runs in a child process and is measured:

* wall time, and peak RSS = the child's ``ru_maxrss`` from ``os.wait4`` in a per-run wrapper process (the
  kernel's figure: it sees every page, however short-lived; it counts file-backed pages too, e.g. a
  memory-mapped checkpoint; the wrapper keeps this process's own RSS out of it, see ``WRAPPER``);
* a timeline sampled from ``/proc/<pid>/status`` every ``--sample-s`` (VmRSS, VmHWM, RssAnon, RssFile; the
  RSS of any descendants; bytes under the output folder), and the child's stdout/stderr lines with their
  times. The exporter's progress lines (``[  12.3s] step ...``) split the run into stages; the peak stage is
  the one in which VmHWM reached its final value (to within one sampling interval);
* the bundle's bytes (every file under OUT), peak RSS / bundle bytes (target: <= 1.3x), the source bytes,
  the exit status and, on failure, the last error line. The bundle is deleted afterwards unless ``--keep``.

Guards: a case whose disk need (checkpoints still to write + the bundle, estimated from the parameter count
and the target's precision, +10%) exceeds the free space of ``--work`` is refused with the numbers; the
export is killed (status ``killed``) when its RSS passes ``--rss-limit-gb`` (default: MemAvailable at the
case's start minus 2 GiB, so the benchmark, not the kernel's OOM killer, picks the victim on a shared
machine). Prints a Markdown table; writes JSON to ``--json`` (default ``WORK/bench_export.json``).
``tests/test_bench_export.py`` runs ``--quick`` (marked slow) and tests the measuring code.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import realshape  # noqa: E402
from bench_lib import machine_facts  # noqa: E402

TARGET_RATIO = 1.3                                       # peak RSS / bundle bytes the streaming exporter aims at
DEFAULT_CASES = ["tinyllava-1.5b/jetson", "tinyllava-1.5b/cpu", "tinyllava-1.5b/jetson/bf16", "llava-1.5-7b/jetson"]
QUICK_CASES = ["tiny/jetson", "tiny/cpu", "tiny/jetson/bf16/transformers5"]
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
TARGET_ITEMSIZE = {"cpu": 4, "jetson": 2, "datacenter": 2}  # bytes per weight in the bundle (export/targets.py)
PROGRESS = re.compile(r"^\[\s*[\d.]+s\]\s+(.*?)(?:\s+\.\.\.)?\s*$")
GB = 1e9


@dataclass(frozen=True)
class Case:
    shape: str
    target: str
    dtype: str = "fp16"
    layout: str = "legacy"

    @property
    def name(self) -> str:
        return "/".join([self.shape, self.target, self.dtype] + ([self.layout] if self.layout != "legacy" else []))


def parse_case(text: str) -> Case:
    parts = text.strip().split("/")
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"case '{text}': expected SHAPE/TARGET[/DTYPE[/LAYOUT]]")
    case = Case(*parts)
    realshape.shape_of(case.shape)
    for value, allowed, what in ((case.target, TARGET_ITEMSIZE, "target"), (case.dtype, DTYPES, "dtype"),
                                 (case.layout, realshape.LAYOUTS, "layout")):
        if value not in allowed:
            raise ValueError(f"case '{text}': unknown {what} '{value}' (supported: {', '.join(allowed)})")
    return case


# -- a measured child process --------------------------------------------------------------------------------
def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _descendants(pid: int) -> list[int]:
    kids, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    found = [int(x) for x in f.read().split()]
                kids += found
                todo += found
        except OSError:
            pass
    return kids


def _tree_bytes(path: Path | None) -> int:
    total = 0
    if path is None or not path.exists():
        return 0
    for root, _, files in os.walk(path):
        for n in files:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


# The measured command runs under a fresh, nearly empty interpreter (``python -S``, stdlib only) that spawns it
# and reads its rusage with os.wait4. Linux carries the RSS high-water mark across exec (``exec_mmap`` ->
# ``setmax_mm_hiwater_rss``), so a command forked from this process, which holds torch and transformers, would
# report at least this process's RSS as its ``ru_maxrss``; spawned from the wrapper it inherits the wrapper's
# VmHWM, ~10 MB (recorded as ``inherited_floor_bytes``).
WRAPPER = """
import json, os, sys
floor = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")).split()[1])   # what exec passes on
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"pid": pid, "status": status, "ru_maxrss_kib": ru.ru_maxrss, "floor_kib": floor}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def measure_child(cmd: list[str], env: dict, log: Path, sample_s: float = 0.2, rss_limit: int | None = None,
                  watch: Path | None = None) -> dict:
    """Run ``cmd``; wall time, its ``ru_maxrss`` (os.wait4 in the wrapper), a /proc timeline of it and its
    descendants, and its output lines with their times. Past ``rss_limit`` bytes it is killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-S", "-c", WRAPPER, str(result), *cmd], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, bufsize=1, start_new_session=True)
    lines: list[tuple[float, str, str]] = []
    samples: list[dict] = []
    state = {"done": False, "killed": None}
    lock = threading.Lock()

    def reader(stream, tag):
        for text in stream:
            with lock:
                lines.append((time.perf_counter() - t0, tag, text.rstrip("\n")))

    def sampler():
        last_du = -1.0
        while not state["done"]:
            now = time.perf_counter() - t0
            kids = _descendants(p.pid)                        # [the command, its descendants...]
            s = _status(kids[0]) if kids else {}
            if s:
                s["tree_rss"] = s.get("VmRSS", 0) + sum(_status(k).get("VmRSS", 0) for k in kids[1:])
                if watch is not None and now - last_du >= 1.0:
                    s["out_bytes"], last_du = _tree_bytes(watch), now
                samples.append({"t": round(now, 3), **s})
                if rss_limit and s["tree_rss"] > rss_limit and state["killed"] is None:
                    state["killed"] = f"RSS {s['tree_rss'] / GB:.2f} GB over the limit {rss_limit / GB:.2f} GB"
                    for k in kids:                            # not the wrapper: it reports the rusage
                        try:
                            os.kill(k, signal.SIGKILL)
                        except OSError:
                            pass
            time.sleep(sample_s)

    threads = [threading.Thread(target=reader, args=(p.stdout, "out"), daemon=True),
               threading.Thread(target=reader, args=(p.stderr, "err"), daemon=True),
               threading.Thread(target=sampler, daemon=True)]
    for t in threads:
        t.start()
    try:
        p.wait()
    except BaseException:                                        # Ctrl-C: the child has its own session
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    wall = time.perf_counter() - t0
    state["done"] = True
    for t in threads:
        t.join(timeout=10)
    try:
        ru = json.loads(result.read_text())
        code, maxrss = os.waitstatus_to_exitcode(ru["status"]), ru["ru_maxrss_kib"] * 1024
        floor = ru["floor_kib"] * 1024
    except (OSError, ValueError, KeyError):                      # the wrapper itself died
        code, maxrss, floor = p.returncode, max((x.get("VmHWM", 0) for x in samples), default=0), None
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.writelines(f"{t:9.3f} {tag} {text}\n" for t, tag, text in lines)
    return {"cmd": cmd, "exit_code": code, "wall_s": wall, "ru_maxrss_bytes": maxrss,
            "inherited_floor_bytes": floor, "killed": state["killed"], "samples": samples, "lines": lines,
            "log": str(log)}


def stages_of(run: dict) -> tuple[list[dict], dict]:
    """Split the timeline at the progress lines; the stage in which VmHWM reached its final value."""
    marks = [(t, m.group(1)) for t, _, text in run["lines"] if (m := PROGRESS.match(text))]
    if not marks or marks[0][0] > 0:
        marks.insert(0, (0.0, "(start-up: interpreter, imports)"))
    samples, stages = run["samples"], []
    for i, (start, name) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else run["wall_s"]
        ins = [s for s in samples if start <= s["t"] < end]
        stages.append({"name": name, "start_s": round(start, 2), "seconds": round(end - start, 2),
                       "max_rss_bytes": max((s.get("VmRSS", 0) for s in ins), default=None),
                       "max_anon_bytes": max((s.get("RssAnon", 0) for s in ins), default=None),
                       "hwm_end_bytes": ins[-1].get("VmHWM") if ins else None})
    hwm = [s.get("VmHWM", 0) for s in samples]
    peak = {"stage": None, "sampled_hwm_bytes": max(hwm, default=0), "certain": False}
    if hwm and peak["sampled_hwm_bytes"] >= 0.98 * run["ru_maxrss_bytes"]:
        i = hwm.index(peak["sampled_hwm_bytes"])
        lo = samples[i - 1]["t"] if i else 0.0                     # VmHWM rose within (lo, t]
        at = [st["name"] for st in stages if st["start_s"] <= samples[i]["t"]]
        peak["stage"] = at[-1] if at else stages[0]["name"]
        peak["certain"] = not any(lo < st["start_s"] <= samples[i]["t"] for st in stages)
    elif stages:
        peak["stage"] = f"after the last sample ({stages[-1]['name']})"
    return stages, peak


# -- checkpoints ---------------------------------------------------------------------------------------------
def llava_dir(work: Path, case: Case) -> Path:
    return work / "ckpt" / f"{case.shape}-{case.dtype}-{case.layout}"


def clip_dir(work: Path, case: Case) -> Path:
    return work / "ckpt" / f"clip-{realshape.shape_of(case.shape).clip}-fp16"


def _writer_cmd(case: Case, out: Path, kind: str) -> list[str]:
    dtype = DTYPES[case.dtype] if kind == "llava" else "float16"
    return [sys.executable, str(HERE / "realshape.py"), "--kind", kind, "--shape", case.shape, "--dtype", dtype,
            "--layout", case.layout, "--out", str(out)]


def ensure_checkpoint(work: Path, case: Case, kind: str, sample_s: float) -> dict:
    """Reuse the folder when its stamp matches, else (re)write it in a measured child process."""
    folder = llava_dir(work, case) if kind == "llava" else clip_dir(work, case)
    spec = (realshape.llava_spec(case.shape, DTYPES[case.dtype], case.layout, None, 0) if kind == "llava"
            else realshape.clip_spec(case.shape, "float16", 0))
    info = {"path": str(folder), "cached": realshape.stamp_matches(folder, spec)}
    if not info["cached"]:
        old = realshape.read_stamp(folder)
        if old is not None:                   # written by another writer version or spec: say why it goes
            diff = sorted(k for k, v in spec.items() if old.get(k) != v)
            print(f"bench_export: rewriting {folder} (its stamp differs in {', '.join(diff)})", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        log = work / "logs" / f"write-{folder.name}-{_stamp()}.log"
        run = measure_child(_writer_cmd(case, folder, kind), dict(os.environ), log, sample_s)
        if run["exit_code"] != 0:
            raise RuntimeError(f"writing {folder} failed (exit {run['exit_code']}): {_last_error(run)}")
        info["write"] = {"wall_s": round(run["wall_s"], 2), "peak_rss_bytes": run["ru_maxrss_bytes"],
                         "sampled_vmhwm_bytes": max((x.get("VmHWM", 0) for x in run["samples"]), default=0)}
    info["bytes"] = realshape.read_stamp(folder)["bytes"]
    return info


def disk_need(work: Path, case: Case, write_only: bool = False) -> dict:
    """Bytes still to be written for ``case`` (checkpoints not cached + bundle estimate) and the free space."""
    ckpt = 0
    if not realshape.stamp_matches(llava_dir(work, case),
                                   realshape.llava_spec(case.shape, DTYPES[case.dtype], case.layout, None, 0)):
        ckpt += 2 * realshape.params(case.shape, "llava") + (20 << 20)
    if not realshape.stamp_matches(clip_dir(work, case), realshape.clip_spec(case.shape, "float16", 0)):
        ckpt += 2 * realshape.params(case.shape, "clip") + (10 << 20)
    bundle = 0 if write_only else int(1.1 * TARGET_ITEMSIZE[case.target] * realshape.params(case.shape)) + (50 << 20)
    work.mkdir(parents=True, exist_ok=True)
    return {"checkpoints_bytes": ckpt, "bundle_estimate_bytes": bundle, "need_bytes": ckpt + bundle,
            "free_bytes": shutil.disk_usage(work).free}


# -- the exporter under test ---------------------------------------------------------------------------------
def exporter_env(work: Path, rev: str | None) -> tuple[dict, dict]:
    """The child's environment and what it runs: the installed package, or ``rev`` of this repository
    (``git archive`` of export/, runtime/, descriptors/ as a ``safeclip`` namespace portion on PYTHONPATH)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    git = ["git", "-C", str(REPO)]
    info: dict = {"rev": rev}
    if rev:
        commit = subprocess.run(git + ["rev-parse", "--verify", rev + "^{commit}"], capture_output=True, text=True)
        if commit.returncode != 0:
            raise ValueError(f"--rev {rev}: not a commit of {REPO}")
        info["commit"] = commit.stdout.strip()
        root = work / "exporter" / info["commit"][:12]
        if not (root / "safeclip" / "export" / "cli.py").is_file():
            tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            for pkg in ("export", "runtime", "descriptors"):
                (tmp / "safeclip" / pkg).mkdir(parents=True)
                archive = subprocess.run(git + ["archive", info["commit"], pkg], capture_output=True, check=True)
                subprocess.run(["tar", "-x", "-C", str(tmp / "safeclip" / pkg), "--strip-components=1"],
                               input=archive.stdout, check=True)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    else:
        head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "export", "runtime", "descriptors"],
                               capture_output=True, text=True)
        info.update(commit=head.stdout.strip() or None, uncommitted=dirty.stdout.splitlines())
    probe = subprocess.run([sys.executable, "-c", "import safeclip.export.cli as c; print(c.__file__)"],
                           capture_output=True, text=True, env=env)
    info["module"] = probe.stdout.strip() or probe.stderr.strip().splitlines()[-1:]
    exe = Path(sys.executable).with_name("safeclip-export")
    info["command"] = [str(exe)] if exe.is_file() else [sys.executable, "-m", "safeclip.export.cli"]
    return env, info


def _stamp() -> str:
    """Log names carry the start time: a later run of the same case keeps the earlier log."""
    return time.strftime("%Y%m%d-%H%M%S")


def _last_error(run: dict) -> str | None:
    text = [t for _, _, t in run["lines"] if t.strip()]
    errs = [t for t in text if "error" in t.lower()]
    return (errs or text or [None])[-1]


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))


def run_case(case: Case, args, env: dict, exporter: dict) -> dict:
    res: dict = {"case": case.name, **asdict(case), "status": None}
    disk = disk_need(args.work, case, args.write_only)
    res["disk"] = disk
    if disk["need_bytes"] > disk["free_bytes"]:
        res["status"] = "refused"
        res["error"] = (f"needs {disk['need_bytes'] / GB:.1f} GB of disk (checkpoints "
                        f"{disk['checkpoints_bytes'] / GB:.1f} + bundle ~{disk['bundle_estimate_bytes'] / GB:.1f}) "
                        f"but {args.work} has {disk['free_bytes'] / GB:.1f} GB free")
        return res
    res["checkpoint"] = ensure_checkpoint(args.work, case, "llava", args.sample_s)
    res["clip"] = ensure_checkpoint(args.work, case, "clip", args.sample_s)
    res["source_bytes"] = res["checkpoint"]["bytes"]
    if args.write_only:
        res["status"] = "written"
        return res
    case_dir = args.work / "out" / case.name.replace("/", "-")
    shutil.rmtree(case_dir, ignore_errors=True)
    out = case_dir / "bundle"
    limit = int(args.rss_limit_gb * GB) if args.rss_limit_gb is not None else _mem_available() - (2 << 30)
    cmd = exporter["command"] + ["--model", res["checkpoint"]["path"], "--clip", res["clip"]["path"],
                                 "--target", case.target, "--out", str(out)]
    print(f"bench_export: {case.name}: {' '.join(cmd[-8:])}", file=sys.stderr, flush=True)
    run = measure_child(cmd, env, args.work / "logs" / f"export-{case_dir.name}-{_stamp()}.log", args.sample_s,
                        limit if limit > 0 else None, watch=case_dir)
    stages, peak = stages_of(run)
    ok = run["exit_code"] == 0 and (out / "manifest.json").is_file()
    bundle = _tree_bytes(out) if ok else None
    samples = run["samples"]
    res.update(
        status="ok" if ok else ("killed" if run["killed"] else "failed"), exit_code=run["exit_code"],
        error=None if ok else (run["killed"] or _last_error(run)), wall_s=round(run["wall_s"], 2),
        peak_rss_bytes=run["ru_maxrss_bytes"], peak_rss_inherited_floor_bytes=run["inherited_floor_bytes"],
        bundle_bytes=bundle,
        peak_over_bundle=run["ru_maxrss_bytes"] / bundle if bundle else None,
        target_met=run["ru_maxrss_bytes"] <= TARGET_RATIO * bundle if bundle else None,
        peak_stage=peak, stages=stages, rss_limit_bytes=limit if limit > 0 else None,
        sampled={k: max((s.get(k, 0) for s in samples), default=0)
                 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "tree_rss", "out_bytes")},
        timeline=samples[::max(1, len(samples) // 600)], log=run["log"],
        output_tail=[f"{t:.1f}s {tag}: {text}" for t, tag, text in run["lines"][-12:]])
    if not args.keep:
        shutil.rmtree(case_dir, ignore_errors=True)
    else:
        res["bundle_path"] = str(out)
    return res


# -- report --------------------------------------------------------------------------------------------------
def _gb(x) -> str:
    if x is None:
        return ""
    return f"{x / GB:.2f} GB" if x >= 0.1 * GB else f"{x / 1e6:.1f} MB"


def table(results: dict) -> str:
    rows = ["| case | source checkpoint | status | wall | peak RSS | peak RssAnon (sampled) | bundle | peak / bundle "
            f"| <= {TARGET_RATIO}x | peak stage |", "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in results["cases"]:
        if r["status"] in ("refused", "written"):
            w = r.get("checkpoint", {}).get("write")
            note = r.get("error") or (f"written in {w['wall_s']:.0f} s, writer peak RSS {_gb(w['peak_rss_bytes'])}"
                                      if w else "cached")
            rows.append(f"| {r['case']} | {_gb(r.get('source_bytes'))} | {r['status']} | | | | | | | {note} |")
            continue
        ratio = f"{r['peak_over_bundle']:.2f}x" if r["peak_over_bundle"] else ""
        met = "" if r["target_met"] is None else ("yes" if r["target_met"] else "**no**")
        stage = r["peak_stage"]["stage"] or ""
        if stage and not r["peak_stage"]["certain"]:
            stage += " (at a stage boundary)"
        if r["status"] != "ok":
            stage = f"{stage}; {r['status']}: {r['error']}"
        rows.append(f"| {r['case']} | {_gb(r['source_bytes'])} | {r['status']} (exit {r['exit_code']}) | "
                    f"{r['wall_s']:.1f} s | {_gb(r['peak_rss_bytes'])} | {_gb(r['sampled']['RssAnon'])} | "
                    f"{_gb(r['bundle_bytes'])} | {ratio} | {met} | {stage} |")
    m, e = results["machine"], results["exporter"]
    what = f"--rev {e['rev']} = {e['commit'][:12]}" if e.get("rev") else (
        f"the installed package (HEAD {str(e.get('commit'))[:12]}"
        + (f", {len(e['uncommitted'])} uncommitted file(s) in export/runtime/descriptors)" if e.get("uncommitted")
           else ", clean)"))
    rows += ["", f"Exporter: {what}. Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs, "
             f"{m['mem_total_gib']} GiB. Load average (1 min) {results['loadavg_start'][0]:.2f} at start, "
             f"{results['loadavg_end'][0]:.2f} at end. Peak RSS = the child's ru_maxrss; GB = 1e9 bytes. "
             f"{results['date']}; `{results['command']}`."]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("--cases", default=None, help=f"comma-separated SHAPE/TARGET[/DTYPE[/LAYOUT]] "
                    f"(default: {','.join(DEFAULT_CASES)})")
    ap.add_argument("--quick", action="store_true", help=f"the tiny shape only: {','.join(QUICK_CASES)}")
    ap.add_argument("--work", type=Path, default=Path("/work/bench_ckpt"), help="checkpoint cache, logs, outputs "
                    "(keep it outside the repository)")
    ap.add_argument("--json", type=Path, default=None, help="JSON output (default: WORK/bench_export.json)")
    ap.add_argument("--keep", action="store_true", help="keep the exported bundles under WORK/out")
    ap.add_argument("--rev", default=None, help="measure the exporter of this git revision "
                    "(default: the installed package)")
    ap.add_argument("--write-only", action="store_true", help="write the checkpoints (timed), export nothing")
    ap.add_argument("--rss-limit-gb", type=float, default=None, help="kill an export over this RSS in GB "
                    "(default: MemAvailable at its start - 2 GiB; 0: no limit)")
    ap.add_argument("--sample-s", type=float, default=0.2, help="/proc sampling interval")
    args = ap.parse_args(argv)
    try:
        names = args.cases.split(",") if args.cases else (QUICK_CASES if args.quick else DEFAULT_CASES)
        cases = [parse_case(n) for n in names if n.strip()]
        if args.quick and any(c.shape != "tiny" for c in cases):
            raise ValueError("--quick runs the tiny shape only")
        if args.sample_s <= 0:
            raise ValueError("--sample-s must be > 0")
        args.work = args.work.resolve()
        env, exporter = exporter_env(args.work, args.rev)
    except ValueError as e:
        ap.error(str(e))
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {"date": started.isoformat(timespec="seconds"), "command": " ".join(["python"] + sys.argv),
               "machine": machine_facts(64), "loadavg_start": list(os.getloadavg()), "exporter": exporter,
               "target_ratio": TARGET_RATIO, "settings": {k: str(v) if isinstance(v, Path) else v
                                                          for k, v in vars(args).items()}, "cases": []}
    failed = False
    for case in cases:
        try:
            r = run_case(case, args, env, exporter)
        except (RuntimeError, OSError) as e:
            r = {"case": case.name, **asdict(case), "status": "failed", "error": str(e).splitlines()[0]}
        failed |= r["status"] not in ("ok", "written")
        results["cases"].append(r)
        print(f"bench_export: {case.name}: {r['status']}"
              + (f", {r['wall_s']:.1f} s, peak RSS {_gb(r['peak_rss_bytes'])}" if "wall_s" in r else "")
              + (f" ({r['error']})" if r.get("error") else ""), file=sys.stderr, flush=True)
    results["loadavg_end"] = list(os.getloadavg())
    out = args.json or args.work / "bench_export.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\nJSON: {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
