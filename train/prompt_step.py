"""What the prompt losses add to `facetclip train` (papers.md §3): the checks before Ray, and
the loss of one training step in a worker.

- ``prompt-align``: the cache is a P-Former cache (``embed --recipe pformer`` or
  ``pformer-code``); each batch's cached rows become its target prompts [B, N, D]
  (``store.prompts.rows_to_prompts``: the rows themselves, or codes expanded with the cache's
  head). The LLM is never loaded.
- ``caption-lm``: the frozen LLM (``prompt.llm``) is loaded in each worker; each batch's keys
  find their captions (``prompt.captions``, tokenised once on the driver exactly as P-Former
  tokenised them: the pformer cache's clean-up and truncation); the loss is the cross-entropy
  of the caption's tokens after the image's prompts. Any cache joins the images (so both
  losses see the same image-text pairs in the same order); its pooled vectors feed the
  contrastive term and must then be as wide as the LLM.

Both add the CLIP term on the pooled prompts (``FacetCLIP.forward`` with the "prompt" head).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from store.errors import InputError
from train.config import TrainConfig

DEFAULT_MAX_CAPTION_TOKENS = 32  # P-Former's public code truncates captions to 32 tokens


@dataclass
class PromptLayout:
    """What the checks found: the prompts' shape and where they come from."""

    n_prompts: int
    width: int  # D: the LLM's input-embedding width
    form: str | None  # "pformer" | "pformer-code" | None (another recipe: caption-lm only)
    cache_dim: int


def check_prompt_config(cfg: TrainConfig, layout: dict) -> PromptLayout:
    """The prompt losses' checks that need no Ray: the cache's form and the prompts' shape.
    Sets ``cfg.model.prompt_tokens`` to the cache's N for prompt-align."""
    from store.cache import Cache
    from store.prompts import prompt_shape

    cache = Cache.open(cfg.cache)
    pooling = cache.recipe.get("pooling")
    form = pooling if pooling in ("pformer", "pformer-code") else None
    names = list(cache.manifest.layout["vector_names"])
    if form is not None and list(cfg.facets or names) != names:
        # the rows are the N prompts (or the code) in slot order; the head's per-slot mean and
        # the MSE pair slot i with column i
        raise InputError(
            f"a P-Former cache's vectors are one caption's prompts in slot order; train on all "
            f"of them (leave facets unset), not {cfg.facets}"
        )
    if cfg.loss == "prompt-align":
        if form is None:
            raise InputError(
                f"loss prompt-align pulls the image's prompts towards cached P-Former prompts, "
                f"but {cfg.cache} holds {cache.recipe.get('name')!r} vectors; make a prompt "
                "cache with `facetclip embed CAPTIONS --model PF --recipe pformer`"
            )
        n, width = prompt_shape(cache)
        cfg.model.prompt_tokens = n
        return PromptLayout(n, width, form, int(layout["dim"]))
    # caption-lm: the LLM decides the width; N is the model's (the pformer cache's when it has one)
    width = llm_width(cfg.prompt.llm)
    if cfg.prompt.align and form is None:
        raise InputError(
            f"prompt.align pulls the prompts towards cached P-Former prompts, but {cfg.cache} "
            f"holds {cache.recipe.get('name')!r} vectors; give caption-lm a pformer cache"
        )
    if form is not None:
        n, cached_width = prompt_shape(cache)
        cfg.model.prompt_tokens = n
    else:
        cached_width = int(layout["dim"])
    if cached_width != width:
        raise InputError(
            f"{cfg.cache} holds {cached_width}-wide vectors but the LLM {cfg.prompt.llm} is "
            f"{width} wide; caption-lm's contrastive term pairs pooled prompts with them. Use a "
            "cache made for this LLM (e.g. its pformer cache)"
        )
    return PromptLayout(cfg.model.prompt_tokens, width, form, int(layout["dim"]))


def llm_width(llm: str) -> int:
    """The LLM's input-embedding width, from its config alone (no weights are read)."""
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(llm)
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot read the LLM config of {llm!r} ({e}); give a model folder"
        ) from None
    return int(conf.get_text_config().hidden_size)


def prompt_statistics(cfg: TrainConfig, form: str | None) -> dict:
    """What a prompt run takes from its cache, in one pass (``store.prompts.prompt_stats``):
    ``text_mean``, center_text's offset (the mean prompt; None when center_text is off), and
    the "prompt" head's fixed output offset and scale, ``prompt_mean`` (each slot's mean
    prompt, float32 [N, D]) and ``prompt_scale`` (the prompts' spread). All None when the cache is not
    a prompt cache (caption-lm against another cache): then train's own mean, offset 0, scale 1."""
    if form is None:
        return {"text_mean": None, "prompt_mean": None, "prompt_scale": None}
    from store.prompts import prompt_stats

    slot_mean, spread = prompt_stats(cfg.cache)
    return {"text_mean": slot_mean.mean(axis=0).tolist() if cfg.model.center_text else None,
            "prompt_mean": slot_mean, "prompt_scale": spread}  # fmt: skip


def caption_ids(cfg: TrainConfig, keys: list[str]) -> dict[str, list[int]]:
    """caption-lm's LLM input per key (BOS + caption + EOS), tokenised as P-Former tokenised
    its captions; InputError when a joined key has no caption."""
    from transformers import AutoTokenizer

    from store.cache import Cache
    from store.prompting import caption_token_ids, llm_target_ids
    from store.tables import CaptionSource, iter_caption_batches

    recipe = Cache.open(cfg.cache).recipe
    cleanup = cfg.prompt.cleanup or recipe.get("cleanup") or "flame"
    max_tokens = cfg.prompt.max_caption_tokens
    if max_tokens <= 0:
        max_tokens = int(recipe.get("max_caption_tokens") or DEFAULT_MAX_CAPTION_TOKENS)
    tok = AutoTokenizer.from_pretrained(cfg.prompt.llm)
    wanted = set(keys)
    out: dict[str, list[int]] = {}
    source = CaptionSource(Path(cfg.prompt.captions), key_column=cfg.prompt.caption_key_column)
    for batch in iter_caption_batches(source, [cfg.prompt.caption_column]):
        rows = [(k, t) for k, t in zip(batch.keys, batch.columns[cfg.prompt.caption_column],
                                       strict=True) if k in wanted and t]  # fmt: skip
        ids = caption_token_ids(tok, [t for _, t in rows], cleanup, max_tokens)[0]
        out.update(zip([k for k, _ in rows], llm_target_ids(tok, ids), strict=True))
    missing = [k for k in keys if k not in out]
    if missing:
        raise InputError(
            f"{len(missing)} of the {len(keys)} images joined to the cache have no "
            f"{cfg.prompt.caption_column!r} in {cfg.prompt.captions} (e.g. {missing[:3]}); "
            "caption-lm needs every image's caption"
        )
    return out


class PromptStep:
    """One worker's prompt-loss step: ``losses = step(model, images, vectors, keys)``."""

    def __init__(self, cfg: TrainConfig, loop_cfg: dict, device):
        import torch

        from store.cache import Cache
        from store.prompts import read_head

        self.cfg, self.device = cfg, device
        self.form = loop_cfg["prompt_form"]
        self.head = read_head(Cache.open(cfg.cache)) if self.form == "pformer-code" else None
        self.weight = cfg.prompt_weight()
        # prompt-align's MSE in units of the cached prompts' variance (train.prompt_losses)
        scale = loop_cfg.get("prompt_scale")
        self.spread = float(scale) if cfg.prompt.standardize and scale else 1.0
        self.llm = None
        if cfg.loss == "caption-lm":
            import ray
            from transformers import AutoModelForCausalLM, AutoTokenizer

            # The frozen LLM: eval mode (no dropout), no gradient for its weights; the
            # gradient flows through it into the prompts.
            self.llm = AutoModelForCausalLM.from_pretrained(cfg.prompt.llm, dtype=torch.float32)
            self.llm.to(device).eval().requires_grad_(False)
            tok = AutoTokenizer.from_pretrained(cfg.prompt.llm)
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
            self.ids = ray.get(loop_cfg["caption_ids"])

    def targets(self, vectors) -> tuple:
        """(target prompts [B, N, D] or None, pooled text input [B, D]) of a batch's rows."""
        import torch

        if self.form is None:  # caption-lm over another recipe's cache: its facets' mean
            return None, vectors.float().mean(dim=1)
        if self.head is not None:
            from store.prompts import rows_to_prompts

            vectors = torch.from_numpy(rows_to_prompts(vectors.cpu().numpy(), self.head))
            vectors = vectors.to(self.device)
        return vectors, vectors.float().mean(dim=1)

    def __call__(self, model, images, vectors, keys: list[str], amp: bool) -> dict:
        import torch

        from store.prompting import pad_batch, prompted_logits, shifted_targets
        from train.prompt_losses import compute_prompt_loss

        target, pooled = self.targets(vectors)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(images, pooled)  # through DDP's forward, so gradients sync
        common = {
            "image_features": out["image_features"], "text_features": out["text_features"],
            "logit_scale": out["logit_scale"], "weight": self.weight,
            "contrastive_weight": self.cfg.prompt.contrastive_weight,
        }  # fmt: skip
        if self.llm is None:
            return compute_prompt_loss("prompt-align", prompts=out["prompts"], target=target,
                                       spread=self.spread, **common)  # fmt: skip
        ids, mask = pad_batch([self.ids[k] for k in keys], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = prompted_logits(self.llm, out["prompts"], ids, mask)
        return compute_prompt_loss("caption-lm", logits=logits,
                                   targets=shifted_targets(ids, mask), prompts=out["prompts"],
                                   target=target, align_weight=self.cfg.prompt.align,
                                   spread=self.spread, **common)  # fmt: skip
