"""Write the name lists that pin the TensorRT/cuda-python stand-in (tests/_fake_trt.py) to the real bindings.

    python scripts/trt_api_names.py WHEEL [WHEEL ...]      # writes tests/data/api_names/<dist>-<version>.json

Nothing is imported: TensorRT's libraries are not on PyPI (only its bindings are), so the extension cannot
load here. The names are read from the wheel's files instead:

* ``tensorrt-cu12-bindings`` (``tensorrt_bindings/tensorrt.so``, pybind11): every NUL-terminated identifier
  that the extension's code loads with a RIP-relative ``lea`` (found with ``objdump -d``) — the class, method,
  property, argument and enum-member names it hands to pybind11 (string tail merging means a plain
  ``strings`` listing would miss names such as ``INT8``, stored as the tail of ``UINT8``); plus the names
  ``tensorrt_bindings/__init__.py`` defines (``nptype``, ``Logger.Severity``...). A flat set: which class
  a name belongs to is not recorded.
* ``cuda-python`` / ``cuda-bindings`` (``cuda/bindings/runtime.cpp``, Cython): the identifier string
  constants (``__pyx_k_*``) and the property names of its extension types (``cudaDeviceProp.name``...).

Download the wheels with ``pip download --no-deps tensorrt-cu12-bindings==10.3.0`` (etc.); needs binutils.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "api_names"
IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\0")


def _sections(elf: bytes) -> dict[str, tuple[int, int, int]]:
    """ELF64 section name -> (address, file offset, size)."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    base = hdrs[shstrndx][4]
    return {elf[base + h[0]: elf.index(b"\0", base + h[0])].decode(): (h[3], h[4], h[5]) for h in hdrs}


def pybind_names(so: Path) -> set[str]:
    elf = so.read_bytes()
    addr, off, size = _sections(elf)[".rodata"]
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                         check=True).stdout
    names = set()
    for m in re.finditer(r"\blea\s+-?0x[0-9a-f]+\(%rip\),%\w+\s+# ([0-9a-f]+)", asm):
        a = int(m.group(1), 16)
        if addr <= a < addr + size and (s := IDENT.match(elf, off + a - addr)):
            names.add(s.group(0)[:-1].decode())
    return names


def init_names(src: str) -> set[str]:
    """Names a package ``__init__.py`` defines: functions, assignments, attributes set on its classes."""
    names = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.col_offset == 0:
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    names.add(t.id)
                elif isinstance(t, ast.Attribute):
                    names.add(t.attr)
    return {n for n in names if not n.startswith("_")}


def cython_names(cpp: str) -> set[str]:
    names = set(re.findall(r'__pyx_k_\w+\[\] = "([A-Za-z_][A-Za-z0-9_]*)";', cpp))
    names |= set(re.findall(r'\{(?:\(char \*\))?"([A-Za-z_][A-Za-z0-9_]*)", __pyx_getprop_', cpp))
    return names


def names_from_wheel(wheel: Path) -> tuple[str, str, set[str], list[str]]:
    dist, version = wheel.name.split("-")[:2]
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        files = z.namelist()
        if "tensorrt_bindings/tensorrt.so" in files:
            z.extract("tensorrt_bindings/tensorrt.so", tmp)
            read = ["tensorrt_bindings/tensorrt.so", "tensorrt_bindings/__init__.py"]
            names = pybind_names(Path(tmp) / read[0]) | init_names(z.read(read[1]).decode())
        elif "cuda/bindings/runtime.cpp" in files:
            read = ["cuda/bindings/runtime.cpp"]
            names = cython_names(z.read(read[0]).decode(errors="replace"))
        else:
            raise SystemExit(f"{wheel.name}: neither tensorrt_bindings/tensorrt.so nor cuda/bindings/runtime.cpp")
    return dist.replace("_", "-"), version, names, read


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    for w in map(Path, argv):
        dist, version, names, read = names_from_wheel(w)
        out = OUT / f"{dist}-{version}.json"
        out.write_text(json.dumps({
            "source": f"{w.name} from PyPI (pip download --no-deps {dist}=={version}); read: {', '.join(read)}",
            "wheel_sha256": hashlib.sha256(w.read_bytes()).hexdigest(), "generated_by": "scripts/trt_api_names.py",
            "names": sorted(names)}, indent=0) + "\n")
        print(f"{out}: {len(names)} names")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
