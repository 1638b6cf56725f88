"""The transformers engine (CPU and CUDA): facet-decoupled packing in one forward pass.

Each item (one caption's context + K facets) is one row; rows of similar length share a
forward pass up to a token budget. The custom 4D mask and per-facet position ids come from
``embed.packing``; transformers passes a 4D mask through unchanged to every attention
implementation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from embed.engine import EngineConfig, check_device, check_layer, inspect_model, load_tokenizer
from embed.packing import (
    PromptIds,
    additive_mask,
    caption_mean_weights,
    facet_allowed,
    last_token_index,
    pack_batch,
    token_budget_batches,
)
from store.errors import InputError

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_decoder(path, n_layers: int, final_norm: bool, dtype: torch.dtype, device: str):
    """The base decoder (no LM head) truncated to its first ``n_layers`` layers.

    Truncating is exact for hidden_states[n_layers] (layers after it cannot influence it)
    and saves their compute and memory, like vLLM's ``num_hidden_layers`` override.
    """
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise InputError(f"cannot load model weights from {path}: {e}") from None
    model = getattr(model, "language_model", model)
    cfg = model.config
    if n_layers < cfg.num_hidden_layers:
        model.layers = model.layers[:n_layers]
        cfg.num_hidden_layers = n_layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:n_layers]
    if not final_norm:
        model.norm = torch.nn.Identity()
    return model.to(device).eval()


class HFEngine:
    name = "hf"

    def __init__(self, cfg: EngineConfig, model=None, pad_id: int | None = None):
        """Load ``cfg.model`` from disk; or wrap an already built ``model`` (e.g. random
        weights from a config for benchmarks) with ``pad_id`` — see ``from_model``."""
        self.cfg = cfg
        device = check_device(cfg.device)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = _TORCH_DTYPES[cfg.dtype]
        if model is None:
            info = inspect_model(cfg.model)
            self.n_layers = check_layer(cfg.layer, info.num_layers)
            model = load_decoder(info.path, self.n_layers, cfg.final_norm, self.dtype, device)
            tok = load_tokenizer(info.path)
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        else:
            self.n_layers = model.config.num_hidden_layers
            model = model.to(self.device, self.dtype).eval()
        self.model = model
        self.hidden_size = int(model.config.hidden_size)
        self.pad_id = 0 if pad_id is None else pad_id
        # Counters for reports and benchmarks: tokens that carry data vs tokens computed.
        self.real_tokens = 0
        self.computed_tokens = 0
        self.forward_seconds = 0.0

    @classmethod
    def from_model(cls, model, pad_id: int, cfg: EngineConfig) -> HFEngine:
        """An engine over an in-memory base decoder (``AutoModel``), already truncated to the
        wanted layer; ``cfg.model`` is only a label then."""
        return cls(cfg, model=model, pad_id=pad_id)

    def close(self) -> None:
        """Free the model (the pipeline calls this when it is done)."""
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def embed(self, items: Sequence[PromptIds]) -> np.ndarray:
        if not items:
            return np.zeros((0, self.hidden_size), np.float32)
        outputs: list[np.ndarray | None] = [None] * len(items)
        for batch in token_budget_batches(
            [it.packed_length for it in items], self.cfg.token_budget
        ):
            vectors = self._forward([items[i] for i in batch])
            for j, i in enumerate(batch):
                outputs[i] = vectors[j]
        return np.concatenate(outputs, axis=0)

    @torch.inference_mode()
    def _forward(self, items: Sequence[PromptIds]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        packed = pack_batch(items, self.pad_id)
        seg = packed["segment_ids"].to(self.device)
        allowed = facet_allowed(seg)
        if getattr(self.model.config, "_attn_implementation", None) == "sdpa":
            mask = allowed[:, None]  # SDPA takes a boolean mask: a quarter of the memory
        else:
            mask = additive_mask(allowed, self.dtype)  # eager attention adds the mask
        out = self.model(
            input_ids=packed["input_ids"].to(self.device),
            position_ids=packed["position_ids"].to(self.device),
            attention_mask=mask,
            use_cache=False,
        )
        hidden = out.last_hidden_state.float()  # [B, L, D]
        if self.cfg.pooling == "mean":
            w = caption_mean_weights(items, hidden.shape[1]).to(self.device)
            pooled = torch.einsum("bl,bld->bd", w, hidden)
            per_item = [pooled[b : b + 1] for b in range(len(items))]
        else:
            rows, cols = last_token_index(items)
            flat = hidden[rows.to(self.device), cols.to(self.device)]
            splits = [len(it.facets) for it in items]
            per_item = list(torch.split(flat, splits))
        self.real_tokens += sum(it.packed_length for it in items)
        self.computed_tokens += seg.numel()
        self.forward_seconds += time.perf_counter() - t0
        return [v.cpu().numpy() for v in per_item]
