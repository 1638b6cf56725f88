"""The trainable model of stage two: a timm vision tower with an image head, and a small text
head over cached LLM vectors (the LLM itself is never loaded here).

    from train.model import ModelConfig, build_model
    model = build_model(ModelConfig(tower="vit_base_patch16_224"), text_dim=5120)   # FLAME
    out = model(images, vectors)      # {"image_features", "text_features", "logit_scale", "logit_bias"}

FLAME (papers.md §1): image head ``token-mlp`` maps every patch token into the LLM's hidden
space, text head ``none``, loss ``mp-sigmoid``. LLM2CLIP (§2): image head ``linear``, text head
``adapter``, loss ``clip``.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from store.errors import InputError

IMAGE_HEADS = ("token-mlp", "linear", "mlp")
TEXT_HEADS = ("none", "linear", "adapter")

# Initial (log logit scale, logit bias) per loss. Sigmoid losses start with a strong negative
# bias because almost every pair is a negative: with bias −10 the initial loss is not swamped by
# N² − N easy negatives (SigLIP; FLAME uses the same). CLIP's softmax is shift-invariant, so it
# has no bias, and starts at temperature 0.07.
LOGIT_INIT = {
    "mp-sigmoid": (math.log(10.0), -10.0),
    "siglip": (math.log(10.0), -10.0),
    "clip": (math.log(1 / 0.07), None),
}
MAX_LOG_LOGIT_SCALE = math.log(100.0)  # scale ≤ 100, as in CLIP, SigLIP and FLAME


@dataclass
class ModelConfig:
    """What to build. ``text_dim`` is not here: the cache decides it (``build_model``'s argument).

    tower:        a timm model name ("vit_base_patch16_224", "resnet50", ...); never downloaded.
    tower_kwargs: extra ``timm.create_model`` arguments, e.g. a tiny test ViT:
                  ``{"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}``.
    pretrained_path: a local timm-format state dict (.safetensors / .pth) for the tower, or None.
    image_head:   "token-mlp" (FLAME) | "linear" | "mlp" (the last two on the pooled feature).
    text_head:    "none" (FLAME: images live in the LLM width) | "linear" | "adapter" (LLM2CLIP).
    adapter_blocks: residual blocks of the "adapter" text head.
    embed_dim:    the shared embedding width when text_head != "none" (ignored otherwise).
    loss:         the loss the model trains with; decides the logit scale/bias initialisation.
    logit_scale_init / logit_bias_init: override LOGIT_INIT (log scale; bias) when not None.
    grad_checkpointing: recompute the tower's activations in backward (less memory, ~30% slower).
    center_text:  ``encode_text`` subtracts ``text_mean``, a buffer the trainer sets before the
                  first step to the cache's mean vector (over rows and trained facets,
                  train.loop.text_mean); it is saved with the weights, so training, checkpoints
                  and the export all centre with the same offset.
    """

    tower: str = "vit_base_patch16_224"
    tower_kwargs: dict = field(default_factory=dict)
    pretrained_path: str | None = None
    image_head: str = "token-mlp"
    text_head: str = "none"
    adapter_blocks: int = 4
    embed_dim: int = 512
    loss: str = "mp-sigmoid"
    logit_scale_init: float | None = None
    logit_bias_init: float | None = None
    grad_checkpointing: bool = False
    center_text: bool = False


class TokenMLP(nn.Module):
    """FLAME's image head: every patch token → Linear(C→D) → GELU → Linear(D→D) → LayerNorm,
    then the mean over tokens. Input [B, L, C] (prefix tokens already removed) → [B, D]."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(tokens)))).mean(dim=1)


class AdapterBlock(nn.Module):
    """LLM2CLIP's residual block: x + Linear(2d→d)(GELU(Linear(d→2d)(LN(x))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Adapter(nn.Module):
    """LLM2CLIP's text head: L2-normalise, N residual blocks, LayerNorm, Linear(d→embed_dim)."""

    def __init__(self, dim: int, out_dim: int, blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*[AdapterBlock(dim) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.blocks(F.normalize(x, dim=-1))))


class FacetCLIP(nn.Module):
    """Vision tower + image head, text head over cached vectors, logit scale (and bias).

    Call it through ``forward`` when wrapped in DistributedDataParallel (DDP synchronises
    gradients only for work done inside its own forward); ``encode_image``/``encode_text`` are
    for evaluation and export.
    """

    def __init__(self, cfg: ModelConfig, text_dim: int, tower: nn.Module):
        super().__init__()
        self.cfg, self.text_dim = cfg, text_dim
        self.embed_dim = text_dim if cfg.text_head == "none" else cfg.embed_dim
        self.tower = tower
        # ViTs put CLS/register/distillation tokens first; the token-mlp averages patches only.
        self.num_prefix_tokens = getattr(tower, "num_prefix_tokens", 0)
        # Swin and friends return NHWC feature maps, most CNNs NCHW.
        self.channels_last = getattr(tower, "output_fmt", "NCHW") == "NHWC"

        if cfg.image_head == "token-mlp":
            self.image_head = TokenMLP(tower.num_features, self.embed_dim)
        else:
            pooled = getattr(tower, "head_hidden_size", tower.num_features)
            if cfg.image_head == "linear":
                self.image_head = nn.Linear(pooled, self.embed_dim)
            else:  # "mlp"
                self.image_head = nn.Sequential(
                    nn.Linear(pooled, self.embed_dim),
                    nn.GELU(),
                    nn.Linear(self.embed_dim, self.embed_dim),
                )

        if cfg.text_head == "none":
            self.text_head = nn.Identity()
        elif cfg.text_head == "linear":
            self.text_head = nn.Linear(text_dim, self.embed_dim)
        else:  # "adapter"
            self.text_head = Adapter(text_dim, self.embed_dim, cfg.adapter_blocks)

        # Always registered (zeros unless set), so a checkpoint has the same keys either way.
        self.register_buffer("text_mean", torch.zeros(text_dim))

        scale, bias = LOGIT_INIT[cfg.loss]
        scale = cfg.logit_scale_init if cfg.logit_scale_init is not None else scale
        bias = cfg.logit_bias_init if cfg.logit_bias_init is not None else bias
        self.logit_scale = nn.Parameter(torch.tensor(float(scale)))
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor(float(bias)))

        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    # --- encoders ------------------------------------------------------------------------------

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's output positions as tokens [B, L, C], without prefix (CLS etc.) tokens."""
        feats = self.tower.forward_features(images)
        if feats.ndim == 4:  # a feature map: each spatial position is one token
            return feats.flatten(1, 2) if self.channels_last else feats.flatten(2).transpose(1, 2)
        return feats[:, self.num_prefix_tokens :]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → [B, embed_dim], L2-normalised."""
        if self.cfg.image_head == "token-mlp":
            x = self.image_head(self.patch_tokens(images))
        else:
            feats = self.tower.forward_features(images)
            x = self.image_head(self.tower.forward_head(feats, pre_logits=True))
        return F.normalize(x, dim=-1)

    def encode_text(self, vectors: torch.Tensor) -> torch.Tensor:
        """Cached vectors [..., text_dim] (any leading shape, e.g. [N, S, text_dim]) →
        [..., embed_dim], L2-normalised."""
        x = vectors.float()  # caches store float16/int8-dequantised; heads run in float32/AMP
        if self.cfg.center_text:
            # LLM hidden states share a large common component (anisotropy): unit vectors sit in
            # a narrow cone, so all cosines are ≈ equally high. With no text head nothing can
            # learn to remove it; subtracting the cache's mean does, before normalisation.
            x = x - self.text_mean
        return F.normalize(self.text_head(x), dim=-1)

    def logit_scale_value(self) -> torch.Tensor:
        """exp(logit_scale), clamped to ≤ 100 (a larger scale makes the loss unstable)."""
        return self.logit_scale.clamp(max=MAX_LOG_LOGIT_SCALE).exp()

    def forward(self, images: torch.Tensor, text_vectors: torch.Tensor) -> dict:
        """Features for a loss: ``compute_loss(name, **model(images, text_vectors))``."""
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(text_vectors),
            "logit_scale": self.logit_scale_value(),
            "logit_bias": self.logit_bias,
        }

    # --- training helpers ----------------------------------------------------------------------

    @torch.no_grad()
    def set_text_mean(self, mean: torch.Tensor) -> None:
        """Set the vector ``center_text`` subtracts: the cache's mean, averaged over facets."""
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if mean.shape != (self.text_dim,):
            raise ValueError(f"text mean must have shape [{self.text_dim}], got {list(mean.shape)}")
        self.text_mean.copy_(mean)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups. No weight decay on 0-/1-D parameters (biases, norm gains,
        logit scale and bias): decaying them only shrinks offsets and gains (FLAME, open_clip)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]


def _create_tower(cfg: ModelConfig) -> nn.Module:
    if not timm.is_model(cfg.tower):
        close = difflib.get_close_matches(cfg.tower, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise InputError(
            f"unknown timm model {cfg.tower!r}.{hint} `timm.list_models('*pattern*')` lists all."
        )
    try:
        tower = timm.create_model(cfg.tower, pretrained=False, num_classes=0, **cfg.tower_kwargs)
    except TypeError as e:
        raise InputError(f"timm model {cfg.tower!r} rejected tower_kwargs: {e}") from e
    if cfg.pretrained_path:
        _load_tower_weights(tower, Path(cfg.pretrained_path))
    return tower


def _load_tower_weights(tower: nn.Module, path: Path) -> None:
    """Load a local timm-format state dict. The classifier (absent with num_classes=0) is
    dropped; timm's own per-architecture filter (e.g. resampling a ViT's position embedding to
    another image size) is applied when the architecture has one."""
    if not path.is_file():
        raise InputError(
            f"pretrained weights {path} not found (a local file; nothing is downloaded)"
        )
    state = timm.models.load_state_dict(str(path))
    classifier = tower.pretrained_cfg.get("classifier") or "head"
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    filter_fn = getattr(sys.modules[type(tower).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, tower)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{path} does not match timm model {type(tower).__name__}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )


def build_model(cfg: ModelConfig, text_dim: int) -> FacetCLIP:
    """The model for a cache of ``text_dim``-wide vectors.

    >>> m = build_model(ModelConfig(tower="resnet18", image_head="linear", text_head="adapter",
    ...                             embed_dim=256, loss="clip"), text_dim=4096)   # LLM2CLIP-style
    """
    for name, value, allowed in (
        ("image_head", cfg.image_head, IMAGE_HEADS),
        ("text_head", cfg.text_head, TEXT_HEADS),
        ("loss", cfg.loss, tuple(LOGIT_INIT)),
    ):
        if value not in allowed:
            raise InputError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return FacetCLIP(cfg, text_dim, _create_tower(cfg))


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)  # 0 → 1 over the decay
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)
