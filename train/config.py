"""Stage-two configuration: small dataclasses, a TOML file users edit, CLI overrides.

```toml
# train.toml — every field optional; shown with its default
steps = 1000              # optimiser steps
batch_size = 256          # global batch (split evenly over workers)
loss = "mp-sigmoid"       # mp-sigmoid | clip | siglip | prompt-align | caption-lm
num_facets = 6            # S: facets sampled per image per step (mp-sigmoid)
facet_mode = "sample"     # clip/siglip: one sampled facet, or "mean" of all
facets = []               # vectors to train on (default: all in the cache)
seed = 0
# images = "data/images"  # end to end: the tower trains on these images, or
# image_cache = "icache"  # heads only: features of a frozen tower (`facetclip embed-images`)

[model]                   # train.model.ModelConfig
tower = "vit_base_patch16_224"
image_head = "token-mlp"  # token-mlp | linear | mlp | glu | prompt (set by the prompt losses)
text_head = "none"        # none | linear | adapter | glu
center_text = false

[prompt]                  # the prompt losses (P-Former, papers.md §3)
# weight                  # prompt-align: w in w·MSE/σ² (default 10, BLIText's w); caption-lm:
                          # the cross-entropy's weight (default 1)
standardize = true        # the alignment MSE over the cache's prompt variance (false: raw)
align = 0.0               # caption-lm: + align x that MSE (P-Former's recipe proper: its
                          # alignment term added to BLIP-2's loss; needs a pformer cache)
contrastive_weight = 1.0  # CLIP term on pooled prompts vs the pooled cached vectors
llm = ""                  # caption-lm: the frozen LLM the prompts feed (loaded in the workers)
captions = ""             # caption-lm: a key + caption table (Parquet, JSONL, CSV, webdataset)
caption_column = "long_caption"
max_caption_tokens = 0    # caption-lm: 0 = the pformer cache's (the predictor's), else 32
cleanup = ""              # caption-lm: "" = the pformer cache's, else flame | none

[optim]
lr = 5e-4
betas = [0.9, 0.95]
weight_decay = 0.5        # none on 1-D params
warmup_steps = 100
min_lr = 0.0
grad_clip = 1.0

[data]
image_size = 224
crop_scale = [0.9, 1.0]

[run]
workers = 1
gpus_per_worker = 0
cpus_per_worker = 1
amp = true                # bf16 autocast on GPU and on CPUs with bf16 arithmetic
checkpoint_every = 500
log_every = 10
max_failures = 1          # worker restarts from the latest checkpoint
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

from store.config import TomlConfig
from store.errors import InputError
from train.model import IMAGE_HEADS, TEXT_HEADS, ModelConfig


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.5
    warmup_steps: int = 100
    min_lr: float = 0.0
    grad_clip: float = 1.0  # 0: off


@dataclass
class DataOptions:
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.9, 1.0)
    image_format: str = "auto"


@dataclass
class RunOptions:
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: int = 1
    ray_address: str | None = None
    amp: bool = True
    checkpoint_every: int = 500
    log_every: int = 10
    max_failures: int = 1
    # Fault injection for tests: at this step the last worker kills itself, once per run.
    fault_step: int | None = None


@dataclass
class PromptOptions:
    """The prompt losses (``prompt-align``, ``caption-lm``; train.prompt_losses)."""

    weight: float | None = None  # None: 10 (prompt-align's w, as published), 1 (caption-lm)
    standardize: bool = True  # the alignment MSE / the cache's prompt variance (prompt_losses)
    align: float = 0.0  # caption-lm: + align x prompt-align's MSE term (P-Former's recipe)
    contrastive_weight: float = 1.0
    llm: str = ""  # caption-lm only: a Hugging Face causal LM folder
    captions: str = ""  # caption-lm only: captions by key
    caption_column: str = "long_caption"
    caption_key_column: str = "key"
    max_caption_tokens: int = 0  # 0: the pformer cache recipe's, else 32
    cleanup: str = ""  # "": the pformer cache recipe's, else "flame"


@dataclass
class TrainConfig(TomlConfig):
    images: str = ""  # end to end: the tower trains on these images
    image_cache: str = ""  # heads only: an image cache (embed-images) instead of images
    cache: str = ""
    out: str = ""
    steps: int = 1000
    batch_size: int = 256
    loss: str = "mp-sigmoid"
    num_facets: int = 6
    facet_mode: str = "sample"
    facets: list[str] = field(default_factory=list)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataOptions = field(default_factory=DataOptions)
    run: RunOptions = field(default_factory=RunOptions)
    prompt: PromptOptions = field(default_factory=PromptOptions)

    def prompt_weight(self) -> float:
        """The prompt term's weight: ``prompt.weight``, else the loss's default."""
        from train.prompt_losses import ALIGN_WEIGHT

        if self.prompt.weight is not None:
            return float(self.prompt.weight)
        return ALIGN_WEIGHT if self.loss == "prompt-align" else 1.0

    def validate(self) -> None:
        """Checks that need no data and no Ray (the cache/images checks come in train.loop)."""
        self.model.loss = self.loss  # the loss decides the logit scale/bias initialisation
        if bool(self.images) == bool(self.image_cache):
            raise InputError(
                "give either images (train the tower end to end) or image_cache (train the "
                "heads on a frozen tower's cached features), not both or neither"
            )
        from train.prompt_losses import PROMPT_LOSSES

        if self.loss in PROMPT_LOSSES:
            # The prompt losses train the prompt head; nothing else can feed them.
            self.model.image_head = "prompt"
            if self.loss == "caption-lm" and not self.prompt.llm:
                raise InputError(
                    "loss caption-lm runs the frozen LLM in the loop: name it with "
                    "--set prompt.llm=PATH, and the captions with --set prompt.captions=TABLE"
                )
            if self.loss == "caption-lm" and not self.prompt.captions:
                raise InputError(
                    "loss caption-lm trains on caption text: name the table with "
                    "--set prompt.captions=TABLE (key + caption column)"
                )
            if min(self.prompt.weight or 0, self.prompt.contrastive_weight, self.prompt.align) < 0:
                raise InputError(
                    "prompt.weight, prompt.contrastive_weight and prompt.align must be >= 0"
                )
            if self.prompt.align and self.loss != "caption-lm":
                raise InputError(
                    "prompt.align adds the alignment term to caption-lm; prompt-align's own "
                    "weight is prompt.weight"
                )
        elif self.model.image_head == "prompt":
            raise InputError(
                f"image head 'prompt' makes prompts for an LLM; train it with --loss "
                f"prompt-align or caption-lm (not {self.loss!r})"
            )
        if self.steps < 1:
            raise InputError("steps must be >= 1")
        if self.batch_size < 2:
            raise InputError("batch_size must be >= 2 (a contrastive loss needs negatives)")
        if self.run.workers < 1:
            raise InputError("run.workers must be >= 1")
        if self.batch_size % self.run.workers:
            raise InputError(
                f"batch_size {self.batch_size} must divide evenly over {self.run.workers} workers"
            )
        if self.model.image_head not in IMAGE_HEADS:
            raise InputError(f"model.image_head must be one of {IMAGE_HEADS}")
        if self.model.text_head not in TEXT_HEADS:
            raise InputError(f"model.text_head must be one of {TEXT_HEADS}")
        if not 0 < self.optim.lr < 1:
            raise InputError("optim.lr must be in (0, 1)")
        if self.optim.warmup_steps < 0 or self.run.checkpoint_every < 1 or self.run.log_every < 1:
            raise InputError(
                "warmup_steps >= 0, checkpoint_every >= 1 and log_every >= 1 are required"
            )
        if not 16 <= self.data.image_size <= 4096:
            raise InputError("data.image_size must be in 16..4096")
