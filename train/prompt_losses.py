"""The two prompt losses of stage two (papers.md §3): features and prompts in, a dict of named
losses out, the total under "loss" (the interface of ``train.losses``).

- ``prompt-align`` (P-Former / BLIText): the image head's N prompt vectors are pulled towards
  the cached P-Former prompts of the paired caption, ``w · MSE`` (w = 10 as published for the
  representation stage; the MSE standardised by the prompts' variance unless
  ``prompt.standardize`` is off), plus a CLIP contrastive term on pooled prompts, so the same run also
  retrieves. The LLM is never loaded: the targets come from the cache.
- ``caption-lm`` (the BLIP-2-style baseline): the same head, trained with the generative loss
  through the frozen LLM (prompts as ``inputs_embeds`` ahead of the caption, cross-entropy on
  the caption's tokens, ``store.prompting``), plus the same contrastive term; with
  ``prompt.align`` > 0 also prompt-align's MSE term: P-Former's recipe, the alignment added to
  BLIP-2's generative loss.

The contrastive term pairs the pooled (mean over N) predicted prompts with the pooled cached
vectors of the caption, both through the model's one text head (``FacetCLIP.encode_text``).

Gradients over workers: the contrastive features are gathered with gradient (the argument
of ``train.losses.compute_loss``'s docstring holds), the MSE and the cross-entropy are this worker's
means; with equal batches on every worker DDP's gradient mean is the global batch's gradient
(exactly for the MSE; for the cross-entropy, the mean of the workers' token means).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.losses import PROMPT_LOSSES, clip_loss

__all__ = ["PROMPT_LOSSES", "caption_lm_loss", "compute_prompt_loss", "prompt_align_loss",
           "prompt_mse"]  # fmt: skip
ALIGN_WEIGHT = 10.0  # P-Former's w in the representation stage (100 in the generative stage)


def prompt_mse(prompts: torch.Tensor, target: torch.Tensor, spread: float = 1.0) -> torch.Tensor:
    """The alignment term: mean squared error over every element of [B, N, D] (``F.mse_loss``'s
    mean, as in BLIText), divided by ``spread``² (``prompt_align_loss`` says why; 1: raw)."""
    return F.mse_loss(prompts.float(), target.float()) / spread**2


def prompt_align_loss(
    prompts: torch.Tensor,
    target: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    weight: float = ALIGN_WEIGHT,
    contrastive_weight: float = 1.0,
    spread: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``weight · MSE(prompts, target) / spread² + contrastive_weight · CLIP(image, text)``.

    prompts/target [B, N, D]: predicted and cached prompts; image/text [M, E]: L2-normalised
    pooled features (M ≥ B when gathered over workers); ``logit_scale`` exponentiated.

    ``spread``: the cached prompts' spread (``store.prompts.prompt_stats``) to standardise the
    MSE by, so that it reads as the share of the prompts' variance left unexplained (about 1
    at the mean prompt) whatever the LLM's embedding scale; 1 is BLIText's raw MSE. Why: in
    raw units an LLM's input embeddings are small (the tiny LM's prompts: spread 0.046, MSE at
    the mean 0.0021), so w = 10 gave the MSE a fiftieth of the contrastive term's weight and
    the head learnt mostly the contrastive term (README, P-Former)."""
    align = prompt_mse(prompts, target, spread)
    con = clip_loss(image, text, logit_scale)["loss"]
    return {"loss": weight * align + contrastive_weight * con, "loss_align": align,
            "loss_contrastive": con}  # fmt: skip


def caption_lm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    weight: float = 1.0,
    contrastive_weight: float = 1.0,
    prompts: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    align_weight: float = 0.0,
    spread: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``weight · CE(logits, targets) + contrastive_weight · CLIP(image, text)``: logits
    [B, L, V] of the frozen LLM at the caption positions (``store.prompting.prompted_logits``),
    targets [B, L] with IGNORE at padding; the mean over the batch's caption tokens.

    With ``align_weight`` > 0, P-Former's recipe proper: the alignment term added to the
    generative loss, ``+ align_weight · MSE(prompts, target) / spread²`` (as in
    ``prompt_align_loss``)."""
    from store.prompting import reconstruction_loss

    lm = reconstruction_loss(logits, targets)
    con = clip_loss(image, text, logit_scale)["loss"]
    out = {"loss": weight * lm + contrastive_weight * con, "loss_lm": lm, "loss_contrastive": con}
    if align_weight > 0:
        align = prompt_mse(prompts, target, spread)
        out["loss"], out["loss_align"] = out["loss"] + align_weight * align, align
    return out


def compute_prompt_loss(
    name: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    weight: float,
    contrastive_weight: float,
    prompts: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    spread: float = 1.0,
    align_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Loss ``name`` of one step: the contrastive term over the global batch (the features of
    all workers, gathered with gradient and in float32, as ``train.losses.compute_loss`` does),
    the prompt term (``prompts``/``target`` or ``logits``/``targets``) over this worker's rows;
    ``spread`` standardises the MSE (``prompt_align_loss``); ``align_weight`` adds it to
    caption-lm (``caption_lm_loss``)."""
    from store.collective import gather_features

    with torch.autocast(device_type=image_features.device.type, enabled=False):
        image = gather_features(image_features.float())
        text = gather_features(text_features.float())
        scale = logit_scale.float()
        if name == "prompt-align":
            return prompt_align_loss(prompts, target, image, text, scale, weight,
                                     contrastive_weight, spread)  # fmt: skip
        if name == "caption-lm":
            return caption_lm_loss(logits, targets, image, text, scale, weight,
                                   contrastive_weight, prompts, target, align_weight, spread)  # fmt: skip
    raise ValueError(f"not a prompt loss: {name!r}")
