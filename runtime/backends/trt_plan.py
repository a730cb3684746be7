"""TensorRT plan bookkeeping for the runtime: pure logic, no TensorRT, CUDA or GPU needed.

* :func:`check_plan_compatible` refuses a plan built for another TensorRT version or GPU. TensorRT
  engines run only with the TensorRT version that built them (NVIDIA: "By default, TensorRT engines are
  compatible only with the version of TensorRT used to build them"; version-compatible builds are not
  used here because they can be slower), so the full recorded version string must match, build number
  included. They are not portable across GPU architectures either, and NVIDIA advises building on the
  exact GPU model, so compute capability, GPU name, SM count and memory class must match too (every Orin
  module's GPU is "Orin" 8.7; ``cuda.CudaRuntime.device_facts``). The error names the rebuild command.
* :func:`plan_prefill`, :func:`plan_capacity` and :func:`plan_extend`: what a decoder plan's profiles cover,
  given the shapes the runtime binds (``arena.py``): a prefill of S = 1..chunk tokens on past 0 (a longer prompt
  goes on in extensions: chunked prefill, ``export/targets.py``); one-token steps whose past is the arena's
  bucket, any length 0..C (a bucket is at least the cached length and at most the capacity); and extensions
  of S >= 2 tokens on a bucket of 1..C rows (chunked at :func:`plan_extend` tokens).
* :func:`plan_batch`: how many sequences one batched decode step may take (``slots.py``): the largest N such
  that a one-token step of every batch 1..N on every bucket of 0..C rows lies in some profile.
* :func:`select_profile` picks the optimization profile for the shapes of one call: among the profiles
  whose [min, max] cover every shape, the one whose ``opt`` is nearest (a one-token decode step picks
  the decode profile, a long prompt the prefill one).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ..graph_spec import DecoderNames, decoder_spec
from .base import BackendError

REBUILD = "safeclip-build --bundle {bundle}"
DEVICE_FIELDS = ("tensorrt_version", "compute_capability", "gpu_name", "sm_count", "memory_class_gib")

__all__ = ["PlanMismatchError", "ProfileSelectionError", "check_plan_compatible", "select_profile", "REBUILD",
           "decoder_shapes", "plan_prefill", "plan_capacity", "plan_extend", "plan_batch"]


class PlanMismatchError(BackendError):
    """A TensorRT plan was built for another TensorRT version or GPU and must be rebuilt on this device."""


class ProfileSelectionError(BackendError):
    """No optimization profile of a plan covers the requested input shapes."""


def check_plan_compatible(plan_record: Mapping[str, Any], device: Mapping[str, Any],
                          bundle: str = "DIR") -> None:
    """Raise :class:`PlanMismatchError` unless ``plan_record`` (from the manifest) was built here.

    ``device`` holds this machine's ``tensorrt_version``, ``compute_capability`` and ``gpu_name``.
    """
    rebuild = REBUILD.format(bundle=bundle)
    name = plan_record.get("file", "plan")
    for key in DEVICE_FIELDS:
        if not device.get(key):
            raise ValueError(f"device facts lack '{key}'")
    missing = [k for k in DEVICE_FIELDS if not plan_record.get(k)]
    if missing:
        raise PlanMismatchError(f"{name} does not record {', '.join(missing)}; rebuild it on this device: {rebuild}")
    diffs = []
    labels = {"tensorrt_version": "TensorRT", "compute_capability": "compute capability", "gpu_name": "GPU",
              "sm_count": "SMs", "memory_class_gib": "memory class (GiB)"}
    for key in DEVICE_FIELDS:
        built, here = str(plan_record[key]).strip(), str(device[key]).strip()
        if built != here:
            diffs.append(f"{labels[key]} {built} (plan) vs {here} (this device)")
    if diffs:
        raise PlanMismatchError(f"{name} was built for another setup: {'; '.join(diffs)}. "
                                f"Rebuild the engines on this device: {rebuild}")


def decoder_shapes(kv, hidden: int, past: int, seq: int, batch: int = 1,
                   names: DecoderNames = DecoderNames()) -> dict[str, tuple[int, ...]]:
    """Input shapes of one decoder call: embeddings, mask, positions and every past key/value (the graph
    spec's dimensions at these sizes, ``runtime/graph_spec.py``); ``past`` is the bound bucket length."""
    return decoder_spec(hidden, None, kv, names).shapes(batch=batch, seq=seq, past=past)


def _interval(profile: Mapping, family: Callable[[int], Mapping[str, Sequence[int]]]) -> tuple[int, int] | None:
    """The x range for which ``family(x)`` (each dim constant or x plus a constant) lies in ``profile``."""
    at0, at1 = family(0), family(1)
    lo, hi = 0, 1 << 62
    for name, spec in profile.items():
        for d0, d1, mn, mx in zip(at0[name], at1[name], spec["min"], spec["max"]):
            if d1 == d0:                                            # constant dim
                if not mn <= d0 <= mx:
                    return None
            else:                                                   # d = d0 + x
                lo, hi = max(lo, mn - d0), min(hi, mx - d0)
    return (lo, hi) if lo <= hi else None


def _covered_to(intervals: Sequence[tuple[int, int] | None], start: int) -> int:
    """The largest x such that every integer in [start, x] lies in one of ``intervals`` (start-1 if none)."""
    x, grew = start, True
    while grew:
        grew = False
        for iv in intervals:
            if iv is not None and iv[0] <= x <= iv[1]:
                x, grew = iv[1] + 1, True
    return x - 1


def _fits(kv, hidden, batch, names):
    def fits(p, past, seq):
        return {n: s for n, s in decoder_shapes(kv, hidden, past, seq, batch, names).items() if n in p}
    return fits


def plan_prefill(profiles: Sequence[Mapping], kv, hidden: int, batch: int = 1,
                 names: DecoderNames = DecoderNames()) -> int:
    """The most tokens one prefill call (past 0) takes: every S = 1..that lies in some profile (0 when not
    even one token does). Longer prompts continue through extensions (chunked prefill)."""
    fits = _fits(kv, hidden, batch, names)
    return max(0, _covered_to([_interval(p, lambda x: fits(p, 0, x)) for p in profiles], 1))


def plan_capacity(profiles: Sequence[Mapping], kv, hidden: int, batch: int = 1,
                  names: DecoderNames = DecoderNames()) -> int:
    """The largest capacity C for which a prompt of any length 1..C can be run and then decoded: a prefill of
    at least one token (:func:`plan_prefill`; longer prompts go on in extensions, which one-token steps can
    always make) and a one-token step on every bucket of 0..C rows (C = 1 needs no step beyond past 0); 0 when
    even a one-token prompt is not covered."""
    if plan_prefill(profiles, kv, hidden, batch, names) < 1:
        return 0
    fits = _fits(kv, hidden, batch, names)
    decode = _covered_to([_interval(p, lambda x: fits(p, x, 1)) for p in profiles], 0)
    return max(0, decode if decode >= 1 else decode + 1)


def plan_extend(profiles: Sequence[Mapping], kv, hidden: int, capacity: int, limit: int,
                batch: int = 1, names: DecoderNames = DecoderNames()) -> int:
    """The most tokens E <= ``limit`` such that an extension of every S = 2..E tokens on every bucket of
    1..``capacity`` rows lies in some profile; 1 when none does (extensions then go token by token)."""
    fits = _fits(kv, hidden, batch, names)
    e = 1
    for s in range(2, min(limit, capacity) + 1):
        if _covered_to([_interval(p, lambda x: fits(p, x, s)) for p in profiles], 1) < capacity:
            break
        e = s
    return e


def plan_batch(profiles: Sequence[Mapping], kv, hidden: int, capacity: int, limit: int = 1024,
               names: DecoderNames = DecoderNames()) -> int:
    """The largest N <= ``limit`` such that a one-token decode step at every batch B = 1..N on every bucket of
    0..``capacity`` rows lies in some profile (1 when only batch 1 does, 0 when not even that)."""
    n = 0
    for b in range(1, limit + 1):
        fits = _fits(kv, hidden, b, names)
        if _covered_to([_interval(p, lambda x: fits(p, x, 1)) for p in profiles], 0) < capacity:
            break
        n = b
    return n


def _covers(spec: Mapping[str, Sequence[int]], shape: tuple[int, ...]) -> bool:
    lo, hi = tuple(spec["min"]), tuple(spec["max"])
    return len(shape) == len(lo) == len(hi) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))


def select_profile(profiles: Sequence[Mapping[str, Mapping[str, Sequence[int]]]],
                   shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the profile to run ``shapes`` ({input: shape}) with.

    Every input a profile describes must be given. Among covering profiles the smallest total
    |shape - opt| wins; ties go to the lower index. Raises :class:`ProfileSelectionError` if none covers.
    """
    if not profiles:
        raise ProfileSelectionError("the plan has no optimization profiles")
    want = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    best, best_cost = None, None
    for i, prof in enumerate(profiles):
        unknown = sorted(set(want) - set(prof))
        if unknown:
            raise ValueError(f"inputs {unknown} are not in profile {i} (it has {sorted(prof)})")
        absent = sorted(set(prof) - set(want))
        if absent:
            raise ValueError(f"shapes for {absent} are needed to choose a profile")
        if not all(_covers(prof[n], s) for n, s in want.items()):
            continue
        cost = sum(abs(s - o) for n, shp in want.items() for s, o in zip(shp, prof[n]["opt"]))
        if best_cost is None or cost < best_cost:
            best, best_cost = i, cost
    if best is None:
        ranges = "; ".join(f"{i}: " + ", ".join(f"{n} {list(p[n]['min'])}..{list(p[n]['max'])}" for n in p)
                           for i, p in enumerate(profiles))
        asked = ", ".join(f"{n} {list(s)}" for n, s in want.items())
        raise ProfileSelectionError(f"no optimization profile covers {asked} (profiles {ranges})")
    return best
