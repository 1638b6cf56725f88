"""The trained tower for inference, without Ray and without the LLM.

```
RUN/model/
  model.safetensors   FacetCLIP: tower + image head + text head + logit scale/bias + text_mean
                      (center_text's offset: encode_text subtracts it, as in training)
  tower.safetensors   the tower alone, a plain timm state dict (timm.create_model(...).load_state_dict)
  config.json         model config, text_dim, image preprocessing, the cache's recipe and facets
```

```python
from train.export import load
m = load("runs/demo/model")
img = m.encode_image([PIL.Image.open("cat.jpg")])      # [1, D] unit vectors
txt = m.encode_text(cached_vectors)                    # cached LLM vectors -> [.., D]
```
Text queries go through the same recipe and engine as the cache (`facetclip embed`), then
``encode_text``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from store.cache import Cache
from store.errors import CacheError, InputError
from store.runs import load_checkpoint
from train.config import TrainConfig
from train.model import FacetCLIP, ModelConfig, build_model
from train.transforms import CLIP_MEAN, CLIP_STD, ImageTransform, eval_transform

MODEL_DIR = "model"


def export_model(run: Path, checkpoint: Path) -> Path:
    """Write RUN/model/ from a checkpoint (atomically: a temp folder renamed into place)."""
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    cfg = TrainConfig.from_dict(state["config"])
    model = build_model(cfg.model, state["text_dim"])
    load_checkpoint(checkpoint, model)
    try:  # the recipe travels with the model: eval embeds its text queries with it
        recipe = Cache.open(cfg.cache).recipe
    except CacheError:
        recipe = {}
    out = Path(run) / MODEL_DIR
    tmp = out.with_name(".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file(
        {k: v.contiguous() for k, v in model.tower.state_dict().items()}, tmp / "tower.safetensors"
    )
    meta = {
        "model": asdict(cfg.model),
        "text_dim": state["text_dim"],
        "step": state["step"],
        "image_size": cfg.data.image_size,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "facets": cfg.facets,
        "loss": cfg.loss,
        "recipe": recipe,
    }
    (tmp / "config.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class TrainedModel:
    """A loaded export: ``encode_image`` and ``encode_text`` on the CPU or a GPU."""

    def __init__(self, model: FacetCLIP, meta: dict, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.meta = meta
        self.device = torch.device(device)

    @property
    def facets(self) -> list[str]:
        return self.meta["facets"]

    @torch.no_grad()
    def encode_image(self, images) -> np.ndarray:
        """PIL images (resized and centre-cropped here) or a float tensor [B, 3, H, W] already
        normalised -> [B, D] float32 unit vectors."""
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(self.preprocess(images))
        return self.model.encode_image(images.to(self.device)).float().cpu().numpy()

    @torch.no_grad()
    def encode_text(self, vectors) -> np.ndarray:
        """Cached LLM vectors [..., text_dim] -> [..., D] float32 unit vectors (a center_text
        model subtracts its ``text_mean`` buffer inside, exactly as in training)."""
        v = torch.as_tensor(np.asarray(vectors, dtype=np.float32), device=self.device)
        return self.model.encode_text(v).float().cpu().numpy()

    def preprocess(self, images) -> np.ndarray:
        """PIL images -> [B, 3, S, S] float32, the evaluation transform of training's data."""
        t = ImageTransform(image_size=self.meta["image_size"], train=False,
                           mean=tuple(self.meta["image_mean"]), std=tuple(self.meta["image_std"]))  # fmt: skip
        return np.stack([eval_transform(im, t) for im in images])


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if (path / MODEL_DIR / "config.json").is_file():
        path = path / MODEL_DIR  # a run directory
    if not (path / "config.json").is_file():
        raise InputError(
            f"{path} is not an exported model (no config.json); train writes RUN/model/"
        )
    return path


def load_meta(path: str | Path) -> dict:
    """An export's config.json (model config, preprocessing, facets, recipe), without weights."""
    return json.loads((_model_dir(path) / "config.json").read_text())


def load(path: str | Path, device: str = "cpu") -> TrainedModel:
    path = _model_dir(path)
    meta = load_meta(path)
    model = build_model(ModelConfig(**meta["model"]), meta["text_dim"])
    model.load_state_dict(load_file(path / "model.safetensors"))
    return TrainedModel(model, meta, device)
