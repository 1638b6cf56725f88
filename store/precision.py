"""When ``amp`` (bf16 autocast) is on: the one rule of ``train`` and ``pformer`` (``tune``
keeps float32 on CPU: bf16 autocast was no faster there).

On a CUDA GPU, always (as every loop did before). On a CPU only where the CPU computes bf16 in
hardware, x86's AVX512-BF16 or AMX-BF16: there a step of the demo's conv tower is ~1.5x faster
than in float32 (AMD EPYC with AVX512-BF16, 2 cores: resnet10t 64 px, batch 32, forward +
backward 0.155 s float32, 0.132 s channels-last, 0.087 s channels-last + bf16); where the CPU
lacks them oneDNN emulates bf16 and gains nothing, so float32 stays. Arm's BF16 extension is
not assumed (not measured). ``FACETCLIP_CPU_BF16=0`` (or ``1``) overrides the CPU's answer for
every loop, e.g. to train bit for bit what a machine without bf16 trains. Each Ray worker
decides on its own node, so a cluster of mixed CPUs trains its ranks in mixed precision.

``import torch`` is not needed here: importing store/ stays cheap.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

# /proc/cpuinfo flags of CPUs with bf16 arithmetic (dot products accumulated in float32).
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ENV = "FACETCLIP_CPU_BF16"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags in a /proc/cpuinfo text (x86 "flags", Arm "Features" lines)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


@functools.cache
def cpu_has_bf16_hardware() -> bool:
    """What /proc/cpuinfo says, whatever the override (False where it cannot be read)."""
    try:
        return bool(cpu_flags(Path("/proc/cpuinfo").read_text()) & CPU_BF16_FLAGS)
    except OSError:  # not Linux: unknown, so float32
        return False


def cpu_computes_bf16() -> bool:
    """True when this machine's CPU has bf16 arithmetic, or ``FACETCLIP_CPU_BF16=1``."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_has_bf16_hardware()


def use_bf16_autocast(amp: bool, device) -> bool:
    """Whether a loop with ``amp`` on runs under ``torch.autocast(dtype=bfloat16)`` on
    ``device`` (a torch.device or its type name)."""
    kind = str(getattr(device, "type", device)).split(":")[0]  # "cuda:1" -> "cuda"
    return bool(amp) and (kind == "cuda" or (kind == "cpu" and cpu_computes_bf16()))
