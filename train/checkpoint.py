"""Checkpoints: one directory per step, written atomically, nanoGPT-style explicit contents.

```
RUN/checkpoints/step_0000500/
  model.safetensors     FacetCLIP weights (tower + heads + logit scale/bias + text mean)
  optimizer.pt          AdamW state
  state.json            step, epoch, batches consumed in that epoch, text_dim, config
```
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step_{step:07d}"


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint (temp directories of a killed save are ignored)."""
    root = Path(run) / CHECKPOINTS
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(
    run: Path, model: torch.nn.Module, optimizer, state: dict, keep: int = 3
) -> Path:
    final = checkpoint_dir(run, state["step"])
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a checkpoint is either complete or absent
    for old in sorted((Path(run) / CHECKPOINTS).glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer=None, device="cpu") -> dict:
    model.load_state_dict(load_file(Path(path) / "model.safetensors", device=str(device)))
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(Path(path) / "optimizer.pt", map_location=device, weights_only=True)
        )
    return json.loads((Path(path) / "state.json").read_text())
