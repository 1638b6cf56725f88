"""Contrastive losses over features. Every loss sees only features (open_clip's interface) and
returns a dict of named losses with the total under "loss"; a new loss is one new function
plus one entry in LOSSES.

A training step reads, top to bottom:

    text_in = select_facets(vectors, cfg.loss, cfg.facet_mode, cfg.num_facets, generator)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = model(images, text_in)               # through DDP's forward, so gradients sync
    losses = compute_loss(cfg.loss, **out)         # gathers across workers; float32
    losses["loss"].backward()

Which text each image is paired with:
- ``mp-sigmoid`` (FLAME): S facets drawn at random, without replacement, from the K cached
  ones, per image and per step (``sample_facets``); text features are [N, S, D].
- ``clip`` / ``siglip``: one text per image, [N, D]. ``facet_mode="sample"`` draws one random
  facet per image per step (a different view each epoch); ``facet_mode="mean"`` averages the K
  cached vectors (FLAME's retrieval query, and exactly the vector of a K = 1 cache).
"""

from __future__ import annotations

import difflib

import torch
import torch.nn.functional as F

from store.collective import gather_features
from store.errors import InputError

FACET_MODES = ("sample", "mean")


# --- losses: features in, dict of named losses out -------------------------------------------


def mp_sigmoid_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> dict[str, torch.Tensor]:
    """FLAME's multi-positive sigmoid loss.

    image [N, D] and text [N, S, D], both L2-normalised; ``logit_scale`` is the multiplier
    (already exponentiated: ``model.logit_scale_value()``). Every image is scored against all
    N·S texts; its own S facets are positives, the other (N−1)·S texts negatives.
    """
    n, s, d = text.shape
    logits = logit_scale * image @ text.reshape(n * s, d).T + logit_bias  # [N, N·S]
    # label[i, j·S + k] = +1 if j == i (caption of image i, facet k) else −1
    labels = 2 * torch.eye(n, device=image.device).repeat_interleave(s, dim=1) - 1
    # −log σ(label · logit) per pair; logsigmoid is stable for large |logit|. Normalised by N·S
    # (the number of positives), as FLAME does, not by the N²·S pairs.
    return {"loss": -F.logsigmoid(labels * logits).sum() / (n * s)}


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias=None
) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE (CLIP): image [N, D], text [N, D]; text i is image i's positive.
    ``logit_bias`` is accepted and ignored (softmax is shift-invariant)."""
    logits = logit_scale * image @ text.T  # [N images, N texts]
    target = torch.arange(image.shape[0], device=image.device)
    i2t = F.cross_entropy(logits, target)  # each image picks its text among all texts
    t2i = F.cross_entropy(logits.T, target)  # each text picks its image among all images
    return {"loss": (i2t + t2i) / 2, "loss_i2t": i2t, "loss_t2i": t2i}


def siglip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> dict[str, torch.Tensor]:
    """SigLIP: image [N, D], text [N, D]; −Σ log σ(label · logit) / N, label +1 on the diagonal."""
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2 * torch.eye(image.shape[0], device=image.device) - 1
    return {"loss": -F.logsigmoid(labels * logits).sum() / image.shape[0]}


LOSSES = {"mp-sigmoid": mp_sigmoid_loss, "clip": clip_loss, "siglip": siglip_loss}


# --- which cached vectors each image is paired with ------------------------------------------


def sample_facets(
    vectors: torch.Tensor, num: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[N, K, D] → [N, num, D]: for each image, ``num`` of its K facets at random, without
    replacement (FLAME keeps 6 of 11 per step). ``generator`` may live on another device."""
    n, k, _ = vectors.shape
    device = generator.device if generator is not None else vectors.device
    # argsort of uniform noise is a uniformly random permutation of each row
    order = torch.rand(n, k, generator=generator, device=device).argsort(dim=1)[:, :num]
    return torch.take_along_dim(vectors, order.to(vectors.device)[..., None], dim=1)


def mean_facet(vectors: torch.Tensor) -> torch.Tensor:
    """[N, K, D] → [N, D]: the mean of the K cached vectors (FLAME's retrieval query)."""
    return vectors.float().mean(dim=1)


def select_facets(
    vectors: torch.Tensor,
    loss: str,
    facet_mode: str = "sample",
    num_facets: int = 6,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The text input of one step for ``loss``: [N, S, D] for mp-sigmoid, else [N, D]."""
    if loss == "mp-sigmoid":
        return sample_facets(vectors, num_facets, generator)
    if facet_mode == "mean":
        return mean_facet(vectors)
    return sample_facets(vectors, 1, generator)[:, 0]


def validate_loss_config(
    loss: str, num_facets: int, num_cached: int, facet_mode: str = "sample"
) -> None:
    """Raise InputError for a loss the cache cannot feed; the trainer calls this before Ray."""
    if loss not in LOSSES:
        close = difflib.get_close_matches(loss, list(LOSSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown loss {loss!r}{hint}; choose one of {', '.join(LOSSES)}")
    if facet_mode not in FACET_MODES:
        raise InputError(f"facet_mode must be one of {', '.join(FACET_MODES)}; got {facet_mode!r}")
    if loss == "mp-sigmoid":
        if facet_mode != "sample":
            raise InputError(
                "mp-sigmoid samples facets; with averaged facets use loss 'siglip' "
                "(mp-sigmoid with one text per image is siglip)"
            )
        if not 1 <= num_facets <= num_cached:
            raise InputError(
                f"mp-sigmoid samples {num_facets} facets per image but the cache holds "
                f"{num_cached}; set num_facets between 1 and {num_cached}, or use a cache "
                "with more facets (recipe 'flame' has 11)"
            )


def compute_loss(
    name: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Loss ``name`` over the global batch: features of all workers, on every worker.

    Why this gives exactly the single-process gradient. W workers, local features x_r, global
    loss L(x_1..x_W) computed identically on every worker. all_gather's backward sums, over all
    W workers, the gradient each computed for slot r, and returns it to worker r:
        g_r = Σ_q ∂L/∂x_r = W · ∂L/∂x_r        (every worker computed the same L)
    so worker r's parameter gradient is W · ∂L/∂x_r · ∂x_r/∂θ. DDP then averages over workers:
        (1/W) Σ_r W · ∂L/∂x_r · ∂x_r/∂θ = Σ_r ∂L/∂x_r · ∂x_r/∂θ = dL/dθ,
    the gradient of one process on the concatenated batch. logit_scale and logit_bias enter L
    after the gather, so every worker already holds the full dL/dscale; DDP's mean of W equal
    copies leaves it unchanged. (Each worker computes all W·n rows of logits: W× redundant
    but tiny next to the tower, and it keeps this math exact.)
    """
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        # at least float32: logsigmoid/softmax of logits up to ±110 lose precision in bf16
        image = gather_features(_at_least_float32(image_features))
        text = gather_features(_at_least_float32(text_features))
        bias = None if logit_bias is None else _at_least_float32(logit_bias)
        return LOSSES[name](image, text, _at_least_float32(logit_scale), bias)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
