"""Stage-two configuration: small dataclasses, a TOML file users edit, CLI overrides.

```toml
# train.toml — every field optional; shown with its default
steps = 1000              # optimiser steps
batch_size = 256          # global batch (split evenly over workers)
loss = "mp-sigmoid"       # mp-sigmoid | clip | siglip
num_facets = 6            # S: facets sampled per image per step (mp-sigmoid)
facet_mode = "sample"     # clip/siglip: one sampled facet, or "mean" of all
facets = []               # vectors to train on (default: all in the cache)
seed = 0

[model]                   # train.model.ModelConfig
tower = "vit_base_patch16_224"
image_head = "token-mlp"  # token-mlp | linear | mlp
text_head = "none"        # none | linear | adapter
center_text = false

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
amp = true                # bf16 autocast on GPU (ignored on CPU)
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
class TrainConfig(TomlConfig):
    images: str = ""
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

    def validate(self) -> None:
        """Checks that need no data and no Ray (the cache/images checks come in train.loop)."""
        self.model.loss = self.loss  # the loss decides the logit scale/bias initialisation
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
