"""Run a kernel body on the CPU: its Metal source compiled as C++ against our shim (metal_shim.h).

The call has `mx.fast.metal_kernel`'s shape, so the host-side wrappers run unchanged; tests only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..sources import Kernel

SHIM = Path(__file__).with_name("metal_shim.h")

# The thread attributes a body may name, as mx.fast.metal_kernel passes them, and how the
# emulation computes each from a fiber (t) and the launch (tpg: threads per threadgroup,
# ntg: threadgroups per grid).
ATTRIBUTES = {
    "simdgroup_index_in_threadgroup": ("uint", "t.index / emu::SIMD"),
    "simdgroups_per_threadgroup": ("uint", "(tpg.x * tpg.y * tpg.z + emu::SIMD - 1) / emu::SIMD"),
    "thread_execution_width": ("uint", "uint(emu::SIMD)"),
    "thread_index_in_simdgroup": ("uint", "t.index % emu::SIMD"),
    "thread_index_in_threadgroup": ("uint", "t.index"),
    "thread_position_in_grid": ("uint3", "t.grid_pos"),
    "thread_position_in_threadgroup": ("uint3", "t.t_pos"),
    "threadgroup_position_in_grid": ("uint3", "t.tg_pos"),
    "threadgroups_per_grid": ("uint3", "ntg"),
    "threads_per_grid": ("uint3", "uint3{tpg.x * ntg.x, tpg.y * ntg.y, tpg.z * ntg.z}"),
    "threads_per_simdgroup": ("uint", "uint(emu::SIMD)"),
    "threads_per_threadgroup": ("uint3", "tpg"),
}
C_TYPES = {mx.float32: "float", mx.bfloat16: "bfloat16_t", mx.uint32: "uint32_t",
           mx.int32: "int32_t", mx.uint16: "uint16_t", mx.uint8: "uint8_t"}
# Host buffers: bf16 travels as its 16 bits.
HOST = {mx.float32: np.float32, mx.bfloat16: np.uint16, mx.uint32: np.uint32,
        mx.int32: np.int32, mx.uint16: np.uint16, mx.uint8: np.uint8}


class EmulationUnavailable(RuntimeError):
    """No C++ compiler: the emulation cannot be built here."""


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def translate(kernel: Kernel, in_dtypes: Sequence[mx.Dtype], out_dtypes: Sequence[mx.Dtype],
              template: Sequence[tuple[str, object]]) -> str:
    """The C++ translation unit: shim, header, template values, the body as a function."""
    for suffix in ("_shape", "_strides", "_ndim"):
        if any(n + suffix in kernel.source for n in kernel.inputs):
            raise ValueError(f"emulation: {kernel.name} uses an input's {suffix[1:]}: unsupported")
    lines = ['#include "metal_shim.h"', kernel.header, "namespace {"]
    for name, value in template:
        if isinstance(value, mx.Dtype):
            lines.append(f"typedef {C_TYPES[value]} {name};")
        elif isinstance(value, bool):
            lines.append(f"constexpr bool {name} = {'true' if value else 'false'};")
        else:
            lines.append(f"constexpr int {name} = {int(value)};")
    params = [f"const device {C_TYPES[d]}* {n}" for n, d in zip(kernel.inputs, in_dtypes)]
    params += [f"device {C_TYPES[d]}* {n}" for n, d in zip(kernel.outputs, out_dtypes)]
    used = [a for a in ATTRIBUTES if a in kernel.source]
    params += [f"{ATTRIBUTES[a][0]} {a}" for a in used]
    lines.append(f"void body({', '.join(params)}) {{\n{kernel.source}\n}}")
    args = [f"(const {C_TYPES[d]}*)b[{i}]" for i, d in enumerate(in_dtypes)]
    args += [f"({C_TYPES[d]}*)b[{len(in_dtypes) + i}]" for i, d in enumerate(out_dtypes)]
    args += [ATTRIBUTES[a][1] for a in used]
    lines.append("void entry(void** b, const emu::Thread& t, const uint3& tpg, const uint3& ntg) {")
    lines.append("  (void)tpg; (void)ntg;")
    lines.append(f"  body({', '.join(args)});")
    lines.append("}")
    lines.append("}  // namespace")
    lines.append('extern "C" const char* emu_launch(void** b, const unsigned* grid, '
                 "const unsigned* tg) { return emu::launch(entry, b, grid, tg); }")
    return "\n".join(lines) + "\n"


class Emulator:
    """Compiles each (kernel, dtypes, template) once into `cache_dir`, keyed by a source hash."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / f"mlx-kernels-emu-{os.getuid()}")
        self._libs: dict[str, ctypes.CDLL] = {}

    def library(self, source: str) -> ctypes.CDLL:
        shim = SHIM.read_text()
        digest = hashlib.sha256((shim + source).encode()).hexdigest()[:20]
        lib = self._libs.get(digest)
        if lib is not None:
            return lib
        so = self.cache_dir / f"kernel-{digest}.so"
        if not so.exists():
            cxx = compiler()
            if cxx is None:
                raise EmulationUnavailable("no C++ compiler (g++ or c++) on PATH")
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            cpp = self.cache_dir / f"kernel-{digest}.cpp"
            cpp.write_text(source)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{SHIM.parent}",
                   str(cpp), "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"emulation: {cpp} does not compile:\n{done.stderr}")
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
        lib.emu_launch.restype = ctypes.c_char_p
        lib.emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint)]
        self._libs[digest] = lib
        return lib

    def __call__(self, kernel: Kernel, *, inputs: Sequence[mx.array],
                 template: Sequence[tuple[str, object]], grid: tuple[int, int, int],
                 threadgroup: tuple[int, int, int], output_shapes: Sequence[Sequence[int]],
                 output_dtypes: Sequence[mx.Dtype]) -> list[mx.array]:
        """Run `kernel` as `mx.fast.metal_kernel(...)(inputs=..., ...)` would; outputs start zeroed."""
        in_dtypes = [a.dtype for a in inputs]
        lib = self.library(translate(kernel, in_dtypes, output_dtypes, template))
        host_in = [np.ascontiguousarray(np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16
                                                 else a)) for a in inputs]
        host_out = [np.zeros(tuple(s), HOST[d]) for s, d in zip(output_shapes, output_dtypes)]
        bufs = (ctypes.c_void_p * (len(host_in) + len(host_out)))(
            *[a.ctypes.data for a in host_in + host_out])
        err = lib.emu_launch(bufs, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*threadgroup))
        if err:
            raise RuntimeError(f"{kernel.name}: {err.decode()}")
        return [mx.array(o).view(mx.bfloat16) if d == mx.bfloat16 else mx.array(o)
                for o, d in zip(host_out, output_dtypes)]
