"""Images → tensors: the training augmentation and the evaluation transform, pure functions
of (bytes or PIL image, ``ImageTransform``, seed, epoch). Training (Ray Data tasks), export
and eval all call these, so an exported tower sees exactly the pixels it was trained on.

    t = ImageTransform(image_size=224, train=False)
    pixels = eval_transform(PIL.Image.open("cat.jpg"), t)          # [3, 224, 224] float32
    out = decode_batch({"key": keys, IMAGE_BYTES: jpegs}, ImageTransform(224, seed=0), epoch=3)
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from store.errors import InputError

IMAGE_BYTES = "image_bytes"  # the column decode_batch decodes (and drops)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    """How encoded images become normalised float32 [3, S, S] pixels.

    image_size:   output side S.
    train:        RandomResizedCrop (``crop_scale`` area fraction, ``crop_ratio`` aspect, FLAME:
                  scale 0.9-1.0); False: the centre square of the shorter side, resized.
    mean / std:   per-channel normalisation of [0, 1] pixels (CLIP's by default).
    seed:         with the epoch and the sample's key, fixes every random crop.
    """

    image_size: int = 64
    train: bool = True
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise InputError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise InputError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError("mean and std need 3 values each (R, G, B), std > 0")
        if self.image_size < 1:
            raise InputError(f"image_size must be at least 1, got {self.image_size}")


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """A sample's augmentation generator: a function of (seed, epoch, key) only."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``; 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return x, y, x + w, y + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of the shorter side: resize-shorter-side + centre-crop in one box."""
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    return x, y, x + side, y + side


def decode_image(data: bytes, t: ImageTransform, rng: random.Random) -> np.ndarray:
    """uint8 [S, S, 3]; raises on anything unreadable."""
    size = t.image_size
    img = Image.open(io.BytesIO(data))
    if t.train:
        # The smallest crop side is about sqrt(min scale * min aspect) of the image's side;
        # JPEG DCT scaling may shrink the image while that crop still covers `size` pixels.
        shortest = math.sqrt(t.crop_scale[0] * min(t.crop_ratio[0], 1 / t.crop_ratio[1]))
        need = math.ceil(size / shortest)
    else:
        need = size
    img.draft("RGB", (need, need))  # a no-op for PNG/WebP
    img = img.convert("RGB")  # forces the full decode: truncated data raises here
    w, h = img.size
    box = (random_resized_crop_box(w, h, t.crop_scale, t.crop_ratio, rng) if t.train
           else center_box(w, h))  # fmt: skip
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box))


def normalizer(t: ImageTransform) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with (x / 255 - mean) / std == x * scale - shift, per channel."""
    scale = (1.0 / (255.0 * np.asarray(t.std, np.float32)))[:, None, None]
    shift = (np.asarray(t.mean, np.float32) / np.asarray(t.std, np.float32))[:, None, None]
    return scale, shift


def eval_transform(image: Image.Image, t: ImageTransform) -> np.ndarray:
    """A PIL image -> normalised float32 [3, S, S], exactly as evaluation decodes image bytes
    (centre square, bicubic resize): inference on exported towers uses this."""
    size = t.image_size
    img = image.convert("RGB")
    pixels = np.asarray(
        img.resize((size, size), Image.Resampling.BICUBIC, box=center_box(*img.size))
    )
    scale, shift = normalizer(t)
    out = pixels.transpose(2, 0, 1).astype(np.float32)
    out *= scale
    out -= shift
    return out


def decode_batch(batch: dict[str, Any], t: ImageTransform, epoch: int = 0) -> dict[str, Any]:
    """Decode ``batch[IMAGE_BYTES]`` (JPEG/PNG/WebP bytes, or None) into normalised float32
    images [n, 3, S, S]: RandomResizedCrop when ``t.train``, else a centre resize.

    Pure (what Ray Data tasks call; testable without Ray). Every other column passes through.
    Each sample's crop comes from ``sample_rng(t.seed, epoch, key)``. Bytes that cannot be
    decoded (corrupt, truncated, None) never raise: that row gets ``valid=False`` and zeros.

    >>> out = decode_batch({"key": ["a"], IMAGE_BYTES: [jpeg]}, ImageTransform(64))  # doctest: +SKIP
    >>> out["image"].shape, out["valid"]
    ((1, 3, 64, 64), array([ True]))
    """
    keys = [str(k) for k in batch["key"]]
    blobs = batch[IMAGE_BYTES]
    # (x / 255 - mean) / std as one multiply and one subtract, in place, image by image:
    # a whole-batch expression would allocate several float temporaries of the batch's size.
    scale, shift = normalizer(t)
    images = np.zeros((len(keys), 3, t.image_size, t.image_size), np.float32)
    valid = np.zeros(len(keys), bool)
    for i, (key, data) in enumerate(zip(keys, blobs, strict=True)):
        if data is None:
            continue
        try:
            pixels = decode_image(bytes(data), t, sample_rng(t.seed, epoch, key))
        except Exception:  # noqa: BLE001
            # Decoders raise many types on bad bytes (OSError, ValueError, SyntaxError, EOFError,
            # struct.error, DecompressionBombError...); one bad image must never stop a run.
            continue  # the row stays valid=False and is counted downstream
        image = images[i]
        image[...] = pixels.transpose(2, 0, 1)  # channels first, as timm expects
        image *= scale
        image -= shift
        valid[i] = True
    out = {k: v for k, v in batch.items() if k != IMAGE_BYTES}
    out["image"] = images
    out["valid"] = valid
    return out


def drop_invalid(batch: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The batch without its ``valid=False`` rows, and how many were dropped (numpy arrays,
    torch tensors, or lists in the columns)."""
    valid = batch["valid"]
    mask = np.asarray(valid.cpu() if hasattr(valid, "cpu") else valid, dtype=bool)
    dropped = int((~mask).sum())
    if not dropped:
        return batch, 0
    index = np.flatnonzero(mask)
    out = {}
    for name, column in batch.items():
        if isinstance(column, list):
            out[name] = [column[i] for i in index]
        elif hasattr(column, "cpu"):  # a torch tensor, possibly on the GPU
            out[name] = column[valid.to(column.device).bool()]
        else:
            out[name] = column[mask]
    return out, dropped
