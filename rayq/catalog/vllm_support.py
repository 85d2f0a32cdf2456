"""What the vLLM engine serves, per precision and device, and why not where it does not.

Torch-free and vllm-free: `rayq plan` consults it before anything starts. The rules follow
vLLM 0.32/0.33 (shared/reference/vllm.md; docs/engines.md holds the matrix and what was
verified where). A refusal is a sentence a user can act on.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import mmap
import os
import platform
import struct
from pathlib import Path

from rayq.catalog import precisions

# The CPU backend's KV cache, GiB (VLLM_CPU_KVCACHE_SPACE), reserved when the engine starts;
# unset, vLLM takes 92% of the node's RAM. Placement adds it to a CPU host's memory request.
CPU_KV_CACHE_GIB = 1

# rayq's dense precisions and the dtype vLLM is given for each.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# bitsandbytes precisions vLLM can run, with the vllm-bnb-plugin, on NVIDIA GPUs: its in-flight
# quantization is NF4 with double quantization, hard-coded (compress_statistics=True).
BNB_IN_FLIGHT = {"bnb-nf4-dq"}

_BNB_WHY = {
    "bnb-nf4": "vLLM's in-flight bitsandbytes quantization always double-quantizes: use bnb-nf4-dq",
    "bnb-fp4": "vLLM quantizes bitsandbytes in flight to NF4 only; FP4 loads only from a pre-quantized checkpoint",
    "bnb-fp4-dq": "vLLM quantizes bitsandbytes in flight to NF4 only; FP4 loads only from a pre-quantized checkpoint",
    "bnb-int8": "vLLM runs LLM.int8 only from pre-quantized checkpoints; it has no in-flight 8-bit quantization",
}


def refusal(precision: str, device: str) -> str | None:
    info = precisions.get(precision)
    if info.scheme is not None:
        return (
            "quantization schemes (sim-*, -a, -kv, -qkv) hook transformers' modules and cache; "
            "vLLM runs its own kernels: use engine transformers"
        )
    if info.name in DTYPES:
        return None
    if info.family == "bnb":
        if info.name not in BNB_IN_FLIGHT:
            return _BNB_WHY.get(info.name, "vLLM serves bitsandbytes only as in-flight NF4 (bnb-nf4-dq)")
        if device != "cuda":
            return "vLLM runs bitsandbytes on NVIDIA GPUs only (the vllm-bnb-plugin), not on a CPU"
        return None
    if info.family == "gptq":
        return None  # rayq's GPTQModel checkpoint, 4-bit; option_refusal checks its settings
    return f"the vLLM engine has no rule for precision family {info.family!r}"


def machine_refusal(precision: str, device: str) -> str | None:
    """Why this machine's vLLM cannot run `precision` on `device`, served by the rules above; None when it can.

    Asks the installation, not a table: on a CPU, GPTQ needs the W4A16 kernel that vLLM's CPU
    build compiles for AVX-512 only (`gptq_cpu_kernel_problem`).
    """
    if device == "cpu" and precisions.get(precision).family == "gptq":
        return gptq_cpu_kernel_problem()
    return None


# vLLM's GPTQ kernels (Marlin on CUDA, CPUWNA16 on x86 CPUs) take symmetric 4-bit weights in
# groups of these sizes (-1: one group per row); act-order (desc_act) is supported.
GPTQ_GROUP_SIZES = (-1, 32, 64, 128)


def option_refusal(precision: str, options: dict[str, object]) -> str | None:
    """Why vLLM cannot run `precision` with these `precision_options`; None when it can."""
    if precisions.get(precision).family != "gptq":
        return None
    if options.get("sym") is False:
        return "vLLM's GPTQ kernels take symmetric weights only (sym: true)"
    group = options.get("group_size", "auto")
    if group != "auto" and group not in GPTQ_GROUP_SIZES:
        return f"vLLM's GPTQ kernels take group_size {', '.join(map(str, GPTQ_GROUP_SIZES))} (got {group})"
    return None


# The kernel library vLLM's CPU platform imports (vllm/platforms/cpu.py::import_kernels): on x86,
# _C (AVX-512 with BF16), _C_AVX512 (AVX-512) or _C_AVX2; elsewhere _C. torch calls a CPU
# AVX-512 when it has these flags (at::cpu::is_avx512_supported), in /proc/cpuinfo's words.
AVX512_FLAGS = frozenset({"avx512vl", "avx512bw", "avx512dq", "fma"})
# The op GPTQ's CPUWNA16 kernel calls, `torch.ops._C.cpu_gemm_wna16`, as its schema is
# registered: the library that lacks this text lacks the op (vllm-project/vllm#55613).
GPTQ_CPU_OP = b"cpu_gemm_wna16("
# For tests only: this machine's CPU flags, space- or comma-separated, instead of /proc/cpuinfo's.
CPU_FLAGS_ENV = "RAYQ_ASSUME_CPU_FLAGS"


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags (/proc/cpuinfo, or RAYQ_ASSUME_CPU_FLAGS); None where they cannot be read."""
    assumed = os.environ.get(CPU_FLAGS_ENV)
    if assumed is not None:
        return frozenset(assumed.replace(",", " ").split())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def kernel_library(flags: frozenset[str] | None) -> str:
    """The module name of the kernel library vLLM's CPU platform imports on a CPU with `flags`."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    if not x86 or flags is None:  # unknown flags: the library vLLM would try first
        return "_C"
    if AVX512_FLAGS <= flags:
        return "_C" if "avx512_bf16" in flags else "_C_AVX512"
    return "_C_AVX2"


def gptq_cpu_kernel_problem() -> str | None:
    """Why vLLM's GPTQ kernel cannot run on this CPU with the vLLM installed here; None when it can.

    Reads the CPU's flags, picks the kernel library vLLM would import, and looks for the op in
    that file's read-only data (a few MB read once per process; vllm and torch are not imported).
    None when vllm is not installed: that is the engine's missing package, said on its own.
    """
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    flags = cpu_flags()
    name = kernel_library(flags)
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = [folder / f"{name}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    found = next((f for f in files if f.is_file()), None)
    cpu = "this CPU" + (" without AVX-512" if name == "_C_AVX2" else "")
    if found is None:
        return (
            f"the vLLM installed here has no CPU kernel library {name} for {cpu} (a CUDA build?): "
            "use engine transformers"
        )
    st = found.stat()
    if _holds(str(found), st.st_size, st.st_mtime_ns, GPTQ_CPU_OP):
        return None
    return (
        f"the vLLM installed here lacks cpu_gemm_wna16, its GPTQ W4A16 CPU kernel, on {cpu} ({found.name}; "
        "vllm-project/vllm#55613): every row would fail; use engine transformers, or a CPU with AVX-512"
    )


@functools.cache
def _holds(path: str, size: int, mtime_ns: int, needle: bytes) -> bool:
    """Whether the shared library at `path` holds `needle` in its read-only data (the whole file if not ELF64).

    `size` and `mtime_ns` are the cache's key: a reinstalled vLLM is read again.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for start, length in _elf_sections(data, (b".rodata", b".dynstr")) or [(0, size)]:
            if data.find(needle, start, start + length) >= 0:
                return True
    return False


def _elf_sections(data: mmap.mmap, names: tuple[bytes, ...]) -> list[tuple[int, int]]:
    """(offset, size) of the named sections of a little-endian ELF64 file; [] for anything else."""
    if data[:6] != b"\x7fELF\x02\x01":
        return []
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if not shoff or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        return []

    def header(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size)
        base = shoff + i * shentsize
        (name,) = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, strtab, _ = header(shstrndx)
    out = []
    for i in range(shnum):
        name, offset, size = header(i)
        end = data.find(b"\0", strtab + name)
        if data[strtab + name : end] in names and offset + size <= len(data):
            out.append((offset, size))
    return out
