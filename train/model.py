"""The trainable model of stage two: a timm vision tower with an image head, and a small text
head over cached LLM vectors (the LLM itself is never loaded here).

    from train.model import ModelConfig, build_model
    model = build_model(ModelConfig(tower="vit_base_patch16_224"), text_dim=5120)   # FLAME
    out = model(images, vectors)      # {"image_features", "text_features", "logit_scale", "logit_bias"}

FLAME (papers.md §1): image head ``token-mlp`` maps every patch token into the LLM's hidden
space, text head ``none``, loss ``mp-sigmoid``. LLM2CLIP (§2): image head ``linear``, text head
``adapter``, loss ``clip``. P-Former (§3): image head ``prompt`` (learned queries over the patch
tokens -> N soft prompts for the LLM, ``train.prompt_head``), losses ``prompt-align`` and
``caption-lm`` (``train.prompt_losses``). SAIL (§5): a frozen tower, image and text heads ``glu``.

Heads only (``build_model(cfg, text_dim, image_dim=D)``): no tower is built and the model
reads what the image head would read from the tower — the pooled feature, or patch tokens
pooled to a grid — out of an image cache (train.image_cache writes it with ``tower_outputs``,
the very function ``encode_image`` runs), so a head trained on cached features is the same
model once the frozen tower is put back in front of it (train.export).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from store.errors import InputError
from train.prompt_head import PromptHead

# Initial (log logit scale, logit bias) per loss. Sigmoid losses start with a strong negative
# bias because almost every pair is a negative: with bias −10 the initial loss is not swamped by
# N² − N easy negatives (SigLIP; FLAME uses the same). CLIP's softmax is shift-invariant, so it
# has no bias, and starts at temperature 0.07.
LOGIT_INIT = {
    "mp-sigmoid": (math.log(10.0), -10.0),
    "siglip": (math.log(10.0), -10.0),
    "clip": (math.log(1 / 0.07), None),
    # The prompt losses' contrastive term is CLIP's.
    "prompt-align": (math.log(1 / 0.07), None),
    "caption-lm": (math.log(1 / 0.07), None),
}
MAX_LOG_LOGIT_SCALE = math.log(100.0)  # scale ≤ 100, as in CLIP, SigLIP and FLAME


@dataclass
class ModelConfig:
    """What to build. ``text_dim`` is not here: the cache decides it (``build_model``'s argument).

    tower:        a timm model name ("vit_base_patch16_224", "resnet50", ...); never downloaded.
    tower_kwargs: extra ``timm.create_model`` arguments, e.g. a tiny test ViT:
                  ``{"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}``.
    pretrained_path: a local timm-format state dict (.safetensors / .pth) for the tower, or None.
    image_head:   "token-mlp" (FLAME) | "linear" | "mlp" | "glu" (SAIL) (these three on the
                  pooled feature) | "prompt" (N soft prompts for the LLM; the prompt losses set it).
    text_head:    "none" (FLAME: images live in the LLM width) | "linear" | "adapter" (LLM2CLIP)
                  | "glu" (SAIL).
    adapter_blocks: residual blocks of the "adapter" text head.
    glu_width:    hidden width of a "glu" head, as a multiple of its input width (SAIL: 8).
    token_grid:   "token-mlp" and "prompt" read the patch tokens average-pooled to a G x G
                  grid (0: every token); an image cache made with ``--grid G`` holds exactly
                  those G² tokens.
    embed_dim:    the shared embedding width when text_head != "none" (ignored otherwise).
    loss:         the loss the model trains with; decides the logit scale/bias initialisation.
    logit_scale_init / logit_bias_init: override LOGIT_INIT (log scale; bias) when not None.
    prompt_tokens / prompt_width / prompt_layers / prompt_heads: the "prompt" head's N queries
                  (prompt-align takes N from the cache), its width, blocks and attention heads.
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
    glu_width: int = 8
    token_grid: int = 0
    embed_dim: int = 512
    loss: str = "mp-sigmoid"
    logit_scale_init: float | None = None
    logit_bias_init: float | None = None
    grad_checkpointing: bool = False
    center_text: bool = False
    prompt_tokens: int = 32
    prompt_width: int = 256
    prompt_layers: int = 2
    prompt_heads: int = 4


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


class GLU(nn.Module):
    """SAIL's alignment layer (its public code's "star" MLP): LayerNorm, two Linear(d→w·d)
    branches, ReLU6(a) ⊙ b, Linear(w·d→out). The gate lets a frozen feature's directions be
    switched on and off per sample, which a linear map cannot."""

    def __init__(self, in_dim: int, out_dim: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.gate = nn.Linear(in_dim, width * in_dim)
        self.value = nn.Linear(in_dim, width * in_dim)
        self.out = nn.Linear(width * in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.out(F.relu6(self.gate(x)) * self.value(x))


# Heads by name: (input width, output width, config) -> module. The image head reads the
# tower's pooled feature, except token-mlp (and "prompt"), which read patch tokens
# (``image_inputs``).
IMAGE_HEAD_BUILDERS: dict[str, Callable[[int, int, ModelConfig], nn.Module]] = {
    "token-mlp": lambda i, o, cfg: TokenMLP(i, o),
    "linear": lambda i, o, cfg: nn.Linear(i, o),
    "mlp": lambda i, o, cfg: nn.Sequential(nn.Linear(i, o), nn.GELU(), nn.Linear(o, o)),
    "glu": lambda i, o, cfg: GLU(i, o, cfg.glu_width),
    # N soft prompts in the LLM's input space (o = the LLM's width), over patch tokens
    "prompt": lambda i, o, cfg: PromptHead(
        i, o, cfg.prompt_tokens, cfg.prompt_width, cfg.prompt_layers, cfg.prompt_heads
    ),  # fmt: skip
}
PATCH_TOKEN_HEADS = ("token-mlp", "prompt")  # the heads that read patch tokens, not the pool
TEXT_HEAD_BUILDERS: dict[str, Callable[[int, int, ModelConfig], nn.Module]] = {
    "none": lambda i, o, cfg: nn.Identity(),
    "linear": lambda i, o, cfg: nn.Linear(i, o),
    "adapter": lambda i, o, cfg: Adapter(i, o, cfg.adapter_blocks),
    "glu": lambda i, o, cfg: GLU(i, o, cfg.glu_width),
}
IMAGE_HEADS = tuple(IMAGE_HEAD_BUILDERS)
TEXT_HEADS = tuple(TEXT_HEAD_BUILDERS)


# --- what a tower gives the heads (shared by encode_image and the image cache) ------------------


def feature_tokens(
    feats: torch.Tensor, num_prefix_tokens: int, channels_last: bool
) -> torch.Tensor:
    """``forward_features`` output as tokens [B, L, C]: each position of a feature map, or a
    ViT's tokens without its prefix (CLS, register, distillation) tokens."""
    if feats.ndim == 4:  # a feature map: each spatial position is one token
        return feats.flatten(1, 2) if channels_last else feats.flatten(2).transpose(1, 2)
    return feats[:, num_prefix_tokens:]


def grid_tokens(
    feats: torch.Tensor, grid: int, num_prefix_tokens: int, channels_last: bool
) -> torch.Tensor:
    """``forward_features`` output average-pooled to a ``grid`` x ``grid`` map of tokens
    [B, grid², C], row by row. A ViT's L patch tokens are read as a square sqrt(L)² map (the
    evaluation transform's images are square)."""
    if feats.ndim == 4:
        fmap = feats.permute(0, 3, 1, 2) if channels_last else feats
    else:
        tokens = feats[:, num_prefix_tokens:]
        b, n, c = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise InputError(f"{n} patch tokens do not form a square map; use token_grid = 0")
        fmap = tokens.transpose(1, 2).reshape(b, c, side, side)
    return F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)


def tower_outputs(
    tower: nn.Module, images: torch.Tensor, grid: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pooled feature [B, P], grid tokens [B, grid², C] or None) of one forward pass: what
    the pooled heads and a grid token-mlp read, and what an image cache stores."""
    feats = tower.forward_features(images)
    pooled = tower.forward_head(feats, pre_logits=True)
    if not grid:
        return pooled, None
    prefix = getattr(tower, "num_prefix_tokens", 0)
    channels_last = getattr(tower, "output_fmt", "NCHW") == "NHWC"
    return pooled, grid_tokens(feats, grid, prefix, channels_last)


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), however it was
    loaded: the same weights from a .pth, a .safetensors or a run give the same print."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


class FacetCLIP(nn.Module):
    """Vision tower + image head, text head over cached vectors, logit scale (and bias).

    Call it through ``forward`` when wrapped in DistributedDataParallel (DDP synchronises
    gradients only for work done inside its own forward); ``encode_image``/``encode_text`` are
    for evaluation and export.

    ``tower=None`` builds the heads only (``image_dim``: the width of the cached image
    features); ``forward`` then takes those features where pixels would go.
    """

    def __init__(
        self, cfg: ModelConfig, text_dim: int, tower: nn.Module | None, image_dim: int | None = None
    ):
        super().__init__()
        self.cfg, self.text_dim = cfg, text_dim
        self.embed_dim = text_dim if cfg.text_head == "none" else cfg.embed_dim
        self.tower = tower
        # ViTs put CLS/register/distillation tokens first; the token-mlp averages patches only.
        self.num_prefix_tokens = getattr(tower, "num_prefix_tokens", 0)
        # Swin and friends return NHWC feature maps, most CNNs NCHW.
        self.channels_last = getattr(tower, "output_fmt", "NCHW") == "NHWC"

        if tower is None:
            if image_dim is None:
                raise ValueError("a model without a tower needs image_dim (the features' width)")
            in_dim = image_dim
        elif cfg.image_head in PATCH_TOKEN_HEADS:
            in_dim = tower.num_features
        else:
            in_dim = getattr(tower, "head_hidden_size", tower.num_features)
        self.image_dim = in_dim
        out_dim = text_dim if cfg.image_head == "prompt" else self.embed_dim
        self.image_head = IMAGE_HEAD_BUILDERS[cfg.image_head](in_dim, out_dim, cfg)
        self.text_head = TEXT_HEAD_BUILDERS[cfg.text_head](text_dim, self.embed_dim, cfg)

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
        """The tower's output positions as tokens [B, L, C], without prefix (CLS etc.) tokens;
        pooled to ``token_grid``² tokens when that is set."""
        feats = self.tower.forward_features(images)
        if self.cfg.token_grid:
            return grid_tokens(feats, self.cfg.token_grid, self.num_prefix_tokens,
                               self.channels_last)  # fmt: skip
        return feature_tokens(feats, self.num_prefix_tokens, self.channels_last)

    def image_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels → what the image head reads: patch tokens [B, L, C] (token-mlp, prompt) or the
        tower's pooled feature [B, P] (the other heads). An image cache holds these."""
        if self.cfg.image_head in PATCH_TOKEN_HEADS:
            return self.patch_tokens(images)
        return tower_outputs(self.tower, images)[0]

    def prompt_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The "prompt" head's N soft prompts for the LLM: [B, 3, H, W] → [B, N, text_dim]."""
        return self.image_head(self.patch_tokens(images))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → [B, embed_dim], L2-normalised."""
        if self.cfg.image_head == "prompt":
            # The pooled prompts go through the text head: predicted and cached prompts share
            # one space, so the head that embeds a caption's pooled prompts embeds an image's.
            return self.encode_text(self.prompt_tokens(images).mean(dim=1))
        return self.encode_image_features(self.image_inputs(images))

    def encode_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """What the image head reads (``image_inputs``, or the same read from an image cache)
        → [B, embed_dim], L2-normalised."""
        return F.normalize(self.image_head(features.float()), dim=-1)

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
        """Features for a loss: ``compute_loss(name, **model(images, text_vectors))``. The
        "prompt" head also returns its ``prompts`` [B, N, text_dim] (and pools them into the
        image features), for ``train.prompt_losses.compute_prompt_loss``. A heads-only model
        (no tower) takes cached image features as ``images``."""
        if self.cfg.image_head == "prompt":
            # heads only: the image cache's grid tokens stand where the patch tokens would
            prompts = (self.image_head(images.float()) if self.tower is None
                       else self.prompt_tokens(images))  # fmt: skip
            return {
                "image_features": self.encode_text(prompts.mean(dim=1)),
                "text_features": self.encode_text(text_vectors),
                "logit_scale": self.logit_scale_value(),
                "logit_bias": self.logit_bias,
                "prompts": prompts,
            }
        image = (self.encode_image_features(images) if self.tower is None
                 else self.encode_image(images))  # fmt: skip
        return {
            "image_features": image,
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

    @torch.no_grad()
    def set_prompt_targets(self, mean, scale: float) -> None:
        """Set the "prompt" head's fixed output offset and scale: the per-slot mean [N, D] and
        the spread of the prompts it is trained towards (``train.prompt_head`` says why)."""
        if self.cfg.image_head != "prompt":
            raise ValueError(
                f"only the prompt head has an output offset and scale, not {self.cfg.image_head!r}"
            )
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"prompt scale must be finite and > 0, got {scale}")
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if mean.shape != self.image_head.out_mean.shape:
            raise ValueError(f"prompt mean must have shape {list(self.image_head.out_mean.shape)}, "
                             f"got {list(mean.shape)}")  # fmt: skip
        self.image_head.out_scale.fill_(scale)
        self.image_head.out_mean.copy_(mean)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.tower is not None:  # heads alone keep no activations worth recomputing
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


def check_tower_name(name: str) -> None:
    """InputError naming close matches when timm has no model ``name``."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise InputError(
            f"unknown timm model {name!r}.{hint} `timm.list_models('*pattern*')` lists all."
        )


def create_tower(cfg: ModelConfig) -> nn.Module:
    """The timm tower of ``cfg`` (no classifier), with ``pretrained_path``'s weights if set."""
    check_tower_name(cfg.tower)
    try:
        tower = timm.create_model(cfg.tower, pretrained=False, num_classes=0, **cfg.tower_kwargs)
    except TypeError as e:
        raise InputError(f"timm model {cfg.tower!r} rejected tower_kwargs: {e}") from e
    if cfg.pretrained_path:
        load_tower_weights(tower, Path(cfg.pretrained_path))
    return tower


def load_tower_weights(tower: nn.Module, path: Path) -> None:
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


def build_model(cfg: ModelConfig, text_dim: int, image_dim: int | None = None) -> FacetCLIP:
    """The model for a cache of ``text_dim``-wide vectors; with ``image_dim``, the heads only,
    for image features of that width read from an image cache (no tower is built).

    >>> m = build_model(ModelConfig(tower="resnet18", image_head="linear", text_head="adapter",
    ...                             embed_dim=256, loss="clip"), text_dim=4096)   # LLM2CLIP-style
    >>> h = build_model(ModelConfig(tower="resnet18", image_head="glu", text_head="glu",
    ...                             loss="siglip"), text_dim=4096, image_dim=512)  # SAIL-style
    """
    for name, value, allowed in (
        ("image_head", cfg.image_head, IMAGE_HEADS),
        ("text_head", cfg.text_head, TEXT_HEADS),
        ("loss", cfg.loss, tuple(LOGIT_INIT)),
    ):
        if value not in allowed:
            raise InputError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    if cfg.glu_width < 1 or cfg.token_grid < 0:
        raise InputError("glu_width must be >= 1 and token_grid >= 0")
    if image_dim is not None:
        check_tower_name(cfg.tower)
        return FacetCLIP(cfg, text_dim, None, image_dim)
    return FacetCLIP(cfg, text_dim, create_tower(cfg))


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)  # 0 → 1 over the decay
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


# Devices with PyTorch's fused AdamW kernel (one pass over each parameter tensor instead of a
# chain of elementwise ops per tensor).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(
    model: FacetCLIP,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    device: torch.device | str = "cpu",
) -> torch.optim.AdamW:
    """AdamW over ``model.param_groups(weight_decay)``, fused where the device has the kernel.

    The fused kernel computes the same update as the per-tensor loop (to rounding; see
    tests/test_optimizer.py) and keeps the same state, so a checkpoint of either resumes in the
    other. Why fused: in the demo's CPU step (resnet10t at 64 px, batch 32 per worker) the
    per-tensor loop took 13 % of a worker's time under py-spy; ``python -m tests.bench --only
    optimizer`` measures the two side by side.

    >>> opt = make_optimizer(model, 3e-3, (0.9, 0.95), 0.05, "cpu")  # doctest: +SKIP
    """
    fused = torch.device(device).type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(
        model.param_groups(weight_decay), lr=lr, betas=tuple(betas), fused=fused
    )
