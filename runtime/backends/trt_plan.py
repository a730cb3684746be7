"""TensorRT plan bookkeeping for the runtime: pure logic, no TensorRT, CUDA or GPU needed.

* :func:`check_plan_compatible` refuses a plan built for another TensorRT version or GPU. TensorRT
  engines run only with the TensorRT version that built them (NVIDIA: "By default, TensorRT engines are
  compatible only with the version of TensorRT used to build them"; version-compatible builds are not
  used here because they can be slower), so the full recorded version string must match, build number
  included. They are not portable across GPU architectures either, and NVIDIA advises building on the
  exact GPU model, so compute capability and GPU name must match too. The error names the rebuild
  command.
* :func:`select_profile` picks the optimization profile for the shapes of one call: among the profiles
  whose [min, max] cover every shape, the one whose ``opt`` is nearest (a one-token decode step picks
  the decode profile, a long prompt the prefill one).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .base import BackendError

REBUILD = "safeclip-build --bundle {bundle}"
DEVICE_FIELDS = ("tensorrt_version", "compute_capability", "gpu_name")

__all__ = ["PlanMismatchError", "ProfileSelectionError", "check_plan_compatible", "select_profile", "REBUILD"]


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
    labels = {"tensorrt_version": "TensorRT", "compute_capability": "compute capability", "gpu_name": "GPU"}
    for key in DEVICE_FIELDS:
        built, here = str(plan_record[key]).strip(), str(device[key]).strip()
        if built != here:
            diffs.append(f"{labels[key]} {built} (plan) vs {here} (this device)")
    if diffs:
        raise PlanMismatchError(f"{name} was built for another setup: {'; '.join(diffs)}. "
                                f"Rebuild the engines on this device: {rebuild}")


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
