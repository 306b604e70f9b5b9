"""Which kernel sets (``JAXATTN_ISA``) this CPU can run, and which one cc/dispatch.cc picks.

Read from /proc/cpuinfo and, for AMX, from Linux: the tile state must be granted to the
process (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``), as dispatch.cc asks.
"""

from __future__ import annotations

import ctypes
import functools
import platform

AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni",
                "f16c", "fma"}
AMX_FLAGS = {"amx_tile", "amx_bf16"}

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_GET_XCOMP_PERM, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 0x1022, 0x1023, 18


def cpu_info(field: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    return set(cpu_info("flags").split())


@functools.cache
def amx_tile_state_granted() -> bool:
    """Whether Linux grants this process the AMX tile data state (asks for it, as dispatch.cc
    does; a child process would ask for itself)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    features = ctypes.c_ulong(0)
    libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(features)) != 0:
        return False
    return bool(features.value & (1 << _XFEATURE_XTILEDATA))


def skip_reason(isa: str) -> str | None:
    """Why this CPU cannot run kernel set ``isa`` (None: it can)."""
    flags = cpu_flags()
    if isa == "avx2" and not {"avx2", "fma", "f16c"} <= flags:
        return "this CPU has no AVX2/FMA/F16C"
    if isa in ("avx512", "avx512bf16", "amx") and not AVX512_FLAGS <= flags:
        return "this CPU has no AVX-512 with BF16"
    if isa == "amx" and not AMX_FLAGS <= flags:
        return "this CPU has no AMX-BF16 (amx_tile, amx_bf16)"
    if isa == "amx" and not amx_tile_state_granted():
        return "Linux does not grant this process the AMX tile state"
    return None


def default_isa() -> str:
    """What cc/dispatch.cc picks without JAXATTN_ISA on this CPU."""
    flags = cpu_flags()
    if AVX512_FLAGS <= flags:
        if cpu_info("vendor_id") == "AuthenticAMD":
            return "avx512bf16"  # vdpbf16ps outruns FMAs there
        return "amx" if skip_reason("amx") is None else "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "generic"
