"""Jetson Orin modules: DRAM, SM count and the memory a bundle may use on each (standard library only).

Supported: the six production Orin modules. Figures from NVIDIA's Jetson Orin module data sheets and the Jetson
module comparison (developer.nvidia.com/embedded/jetson-modules): GPU CUDA cores (Ampere, 128 per SM) and LPDDR5
capacity. The exporter's ``--device`` refuses a bundle that cannot fit the named module
(``export/device_memory.py``). A TensorRT plan's device key records the SM count and memory class CUDA reports
(``backends/cuda.py`` ``device_facts``), which tell AGX Orin, Orin NX and Orin Nano apart; :func:`identify` names
the module(s) such facts fit.

Orin NX 8GB and Orin Nano 8GB have the same GPU configuration (8 SMs, 1024 cores) and the same 8 GB of LPDDR5;
they differ in clocks and memory bandwidth only, which CUDA's device properties do not reliably report (JetPack
6.2's "super" modes raise Orin Nano's clocks), so :func:`identify` returns both for such a device: for a
TensorRT plan they are the same GPU (same SM count and architecture), and for memory they are the same budget.

Usable memory is an assumption (NVIDIA publishes none): the module's DRAM less :data:`OS_RESERVE_GIB` for a
headless JetPack (kernel, firmware carve-outs, services, about 1 GiB) and the CUDA/TensorRT context and
libraries (about 1 GiB). CPU and GPU share this DRAM, so host buffers (the embedding table, the parser's weights
during a build) count against the same budget as device memory.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OrinModule", "MODULES", "OS_RESERVE_GIB", "module", "identify", "GiB"]

GiB = 1 << 30
OS_RESERVE_GIB = 2.0


@dataclass(frozen=True)
class OrinModule:
    key: str                 # what --device takes
    name: str                # as NVIDIA names the module
    dram_gib: int            # LPDDR5 on the module
    sm_count: int            # CUDA cores / 128 (Ampere SM)
    cuda_cores: int
    bandwidth_gbs: float     # memory bandwidth, GB/s (data sheet; Orin Nano at its JetPack 6.0 clocks)

    @property
    def usable_bytes(self) -> int:
        return int((self.dram_gib - OS_RESERVE_GIB) * GiB)


MODULES: dict[str, OrinModule] = {m.key: m for m in (
    OrinModule("agx-orin-64gb", "AGX Orin 64GB", 64, 16, 2048, 204.8),
    OrinModule("agx-orin-32gb", "AGX Orin 32GB", 32, 14, 1792, 204.8),
    OrinModule("orin-nx-16gb", "Orin NX 16GB", 16, 8, 1024, 102.4),
    OrinModule("orin-nx-8gb", "Orin NX 8GB", 8, 8, 1024, 102.4),
    OrinModule("orin-nano-8gb", "Orin Nano 8GB", 8, 8, 1024, 68.0),
    OrinModule("orin-nano-4gb", "Orin Nano 4GB", 4, 4, 512, 34.0),
)}


def module(key: str) -> OrinModule:
    """The module named ``key`` (a :data:`MODULES` key or NVIDIA's name); ValueError listing the keys."""
    k = str(key).strip().lower().replace(" ", "-")
    for m in MODULES.values():
        if k in (m.key, m.name.lower().replace(" ", "-")):
            return m
    raise ValueError(f"unknown --device '{key}' (supported: {', '.join(MODULES)})")


def identify(sm_count: int, total_bytes: int) -> list[OrinModule]:
    """The modules a CUDA device with ``sm_count`` SMs (``multiProcessorCount``) and ``total_bytes`` of memory
    (``totalGlobalMem`` or ``cudaMemGetInfo``'s total: the DRAM the OS sees, a little less than the module's) can
    be: those with that SM count and the smallest DRAM at least ``total_bytes``. Empty: not an Orin module."""
    same = sorted((m for m in MODULES.values() if m.sm_count == int(sm_count) and m.dram_gib * GiB >= int(total_bytes)),
                  key=lambda m: m.dram_gib)
    return [m for m in same if m.dram_gib == same[0].dram_gib] if same else []
