"""The demo's P-Former block (issue 14, papers.md §3): captions from images through the frozen LM.

pformer (a prompt predictor trained on the synthetic captions alone; then the text-only check,
eval.prompt_reconstruction: does the frozen LM say a held-out caption's main object from its
predicted prompts?) -> embed --recipe pformer
(each training caption's N prompts cached) -> embed-images (the training images' patch tokens
through the FLAME run's tower, frozen) -> train --loss prompt-align (the prompt image head alone,
pulled towards the cached prompts; no LLM in the loop) -> eval --task captioning on the held-out
retrieval images: the share of generated captions naming the main object's true shape and
colour, beside chance and an image-blind baseline, and BLEU-4.

Sizes are the demo's, not the method's: a small predictor and few steps so that the block takes
a few minutes on 2 CPU cores (``CaptionDemoConfig``); the README gives the full-size figures.
``compare`` (on by default) adds the caption-lm run (the same head trained through the frozen LM)
at equal pairs and steps, the BLIP-2-style baseline. Both train the prompt head alone on the
FLAME run's frozen tower (``frozen_tower``), as BLIP-2 and P-Former train theirs on a frozen
pretrained image encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CaptionDemoConfig:
    # stage one: the prompt predictor (a fraction of `facetclip pformer`'s default size)
    # held-out main-object word said from the predicted prompts (chance 0.11), 2026-11-30, on
    # a 1-thread tiny LM: 150 steps 0.14, 300 steps 0.51, 600 steps 0.83 (the demo's 2-thread
    # LM of the same day, 600 steps: 0.56; after its rows were regrouped, another draw: 0.755)
    pformer_steps: int = 600
    # The contrastive term's positives: each long caption's short caption of the same image
    # (synth writes both). With masked copies of one caption as positives, the pooled code
    # carried everything but the main object (nearest-centroid probe 0.12, chance 0.11)
    # and the LM named it at chance; with the short caption it carries it (0.85).
    views: str = "column"
    pair_column: str = "short_caption"
    # The contrastive term's weight (the CLI's default: 1, equal weights as published) and the
    # share of encoder input tokens masked (BLIText: 0.25). A predictor this small, trained
    # from scratch for 600 steps, learnt the main object late or not at all with the published
    # values, and prompt-align follows the predictor. 2026-12-01, the demo's LM, predictor seeds
    # 0 / 1 / 2; text only: held-out main-object word (chance 0.111); images: prompt-align's
    # captions naming the true shape (300 steps, frozen FLAME tower, 200 held-out images):
    #   contrastive 1, mask 0.25:   text 0.605 / 0.195 / 0.635, images 0.475 / 0.235 / 0.680
    #   contrastive 3, mask 0.25:   text 0.685 / 0.325 / 0.695, images 0.765 / 0.280 / 0.660
    #   contrastive 10, mask 0.25:  text 0.695 / 0.445 / 0.735, images 0.720 / 0.395 / 0.715
    #   contrastive 1, mask 0:      text 0.830 / 0.140 / -
    #   contrastive 10, mask 0:     text 0.820 / 0.685 / 0.820, images 0.880 / 0.695 / 0.905
    # (another LM draw, tiny-llm seed 1, predictor seed 0: text 0.520 -> 0.785, images 0.390
    # -> 0.900 from the first row's settings to the last's)
    # The short caption shares only what the image shows, so weighting its pull makes the code,
    # and the prompts expanded from it, about the scene rather than the wording; unmasked, the
    # encoder always sees the object word it must carry.
    contrastive: float = 10.0
    mask_prob: float = 0.0
    pformer_batch: int = 32
    n_prompts: int = 8
    # The encoder's width and heads (ffn 2x width). At width 64 with 2 heads the code carried
    # one attribute of the scene, whichever the LM rewarded first: a ridge probe read the main
    # shape 0.86 / colour 0.11 from it with the 1,200-step LM, which cannot be steered to the
    # colour, and 0.26 / 0.85 with the LM that learns every facet, so that LM's predicted
    # prompts named the colour and the shape at chance (text-only 0.085). Twice as wide with
    # 4 heads the code holds both (0.87 / 0.63) and the text-only check gives 0.770 (predictor
    # seed 1: 0.565); the 1,200-step LM 0.760 (0.810 at width 64). 2026-12-01.
    width: int = 128
    heads: int = 4
    layers: int = 2
    max_caption_tokens: int = 32
    # stage two and captioning. frozen_tower: the prompt head trains on the FLAME run's tower,
    # frozen and its tokens cached once (BLIP-2's and P-Former's setting: a pretrained image
    # encoder); False trains a tower from scratch with the head, which on this data learns
    # nothing usable (300 steps: captions naming the true shape 0.085, image-blind 0.085).
    # On the demo's data and LM (2026-11-30, 200 held-out images, chance 0.111), captions naming
    # the true shape with the frozen FLAME tower: prompt-align 0.420 after 300 steps, 0.430
    # after 600; caption-lm 0.485 / 0.560 (at 0.5x prompt-align's steps/s).
    frozen_tower: bool = True
    steps: int = 300
    batch_size: int = 64
    max_new_tokens: int = 24  # the main object is named in the first sentence
    limit: int | None = None  # held-out images captioned (None: all 200)
    compare: bool = True  # also caption-lm (the LLM in the loop): ~70 s more


def caption_block(
    data: Path,
    model: Path,
    out: Path,
    cfg: CaptionDemoConfig,
    step: Callable,
    first: int,
    seed: int = 0,
    workers: int = 1,
    tower_run: Path | None = None,
) -> tuple[list[dict], dict, dict[str, Path]]:
    """Run the block inside `run_demo` (``step(i, name, fn)`` times and announces each part;
    ``first`` is the first step number; ``tower_run``: the run whose tower is frozen under the
    prompt head when ``cfg.frozen_tower``, the demo's FLAME run; ``workers``: the demo's cores,
    the threads of the one Ray worker that trains the predictor, and of the one that trains
    the prompt head). Returns
    ``eval.captioning.demo_rows`` rows, the text-only check (``eval.prompt_reconstruction``, as
    a dict) and the paths to list in the report."""
    from embed.pformer import PFormerConfig, train_pformer
    from embed.pformer_model import PredictorConfig
    from embed.pipeline import EmbedConfig, run_embed
    from eval.captioning import CompareConfig, demo_rows
    from eval.prompt_reconstruction import reconstruction_check

    pf_out, cache = out / "pformer", out / "cache" / "pformer"
    pcfg = PFormerConfig(captions=str(data / "captions.parquet"), model=str(model),
                         out=str(pf_out), steps=cfg.pformer_steps, batch_size=cfg.pformer_batch,
                         seed=seed)  # fmt: skip
    pcfg.predictor = PredictorConfig(width=cfg.width, layers=cfg.layers, heads=cfg.heads,
                                     ffn=2 * cfg.width, n_prompts=cfg.n_prompts,
                                     proj_dim=64, max_caption_tokens=cfg.max_caption_tokens)  # fmt: skip
    pcfg.loss.views, pcfg.loss.pair_column = cfg.views, cfg.pair_column
    pcfg.loss.contrastive, pcfg.loss.mask_prob = cfg.contrastive, cfg.mask_prob
    pcfg.optim.lr, pcfg.optim.warmup_steps = 2e-3, 20
    pcfg.run.log_every, pcfg.run.checkpoint_every = 25, cfg.pformer_steps
    # One worker on the demo's cores: on one core a third of the 2-core machine stood idle
    # (2026-12-07, 600 steps: 1 worker x 1 thread 101 s, 1 x 2 threads 80 s, 2 workers x 1
    # thread 84 s; the text-only check 0.455 / 0.495 / 0.380, draws of one predictor)
    pcfg.run.cpus_per_worker = workers
    # float32: bf16 autocast (on by default where the CPU computes bf16) slowed this step, a
    # small predictor and the tiny LM, whose matrices are too small to gain from it
    # (2026-12-07, the demo's data, 600 steps, side by side: 261 -> 290 captions/s, 94.7 ->
    # 86.6 s with Ray's start; held-out main-object word 0.495 -> 0.565, one draw each)
    pcfg.run.amp = False
    retrieval = data / "eval" / "retrieval"

    def pformer_and_check():
        pf = train_pformer(pcfg, overwrite=True, progress=True)
        # The text-only claim, on the held-out captions: do the predicted prompts make the LM
        # say the caption, and name its main object, better than random or another's prompts?
        return pf, reconstruction_check(pf.predictor, retrieval / "captions.parquet",
                                        data / "labels.parquet", n=cfg.limit or 200,
                                        seed=seed)  # fmt: skip

    pf, recon = step(first, f"pformer: prompt predictor on the captions alone ({cfg.pformer_steps} "
                            "steps) + text-only check", pformer_and_check)  # fmt: skip
    step(first + 1, "embed: recipe pformer (N prompts per caption)", lambda: run_embed(
        EmbedConfig(captions=data / "captions.parquet", model=str(pf.predictor), out=cache,
                    recipe="pformer"), progress=True))  # fmt: skip
    losses = ("prompt-align", "caption-lm") if cfg.compare else ("prompt-align",)
    # The prompt head trains on one worker with the demo's cores too: on cached tower tokens a
    # step's compute is small, and with two 1-thread workers the machine was 13 % in the
    # kernel and 12 % idle through it (vmstat), with one 2-thread worker faster (2026-12-07, the
    # demo's data, 300 steps each, Ray starting first: 2 workers x 1 thread 116 s for both
    # runs and their captioning, prompt-align 14.3 steps/s, caption-lm 5.6; 1 x 2 threads 96 s,
    # 22.4 and 6.4 steps/s; captions naming the true shape / colour 0.330 / 0.610 and 0.175 /
    # 0.520 -> 0.340 / 0.630 and 0.175 / 0.520)
    ccfg = CompareConfig(out=out / "runs", images=data / "images", prompt_cache=cache,
                         captions=data / "captions.parquet", llm=str(model),
                         eval_data=retrieval, steps=cfg.steps,
                         batch_size=cfg.batch_size, workers=1, cpus_per_worker=workers, seed=seed,
                         max_new_tokens=cfg.max_new_tokens, limit=cfg.limit, losses=losses,
                         tower_run=tower_run if cfg.frozen_tower else None)  # fmt: skip
    where = f" on the frozen {tower_run.name} tower" if ccfg.tower_run is not None else ""
    rows = step(first + 2, f"train --loss {' / '.join(losses)} ({cfg.steps} steps{where}) + eval "
                           "captioning", lambda: demo_rows(ccfg, progress=True))  # fmt: skip
    paths = {"P-Former predictor": Path(pf.predictor), "cache (pformer)": cache}
    if ccfg.image_cache is not None:
        paths["image cache (frozen tower)"] = ccfg.image_cache
    paths |= {f"run ({loss})": out / "runs" / loss for loss in losses}
    return rows, recon.to_dict(), paths


def report_lines(rows: list[dict], recon: dict | None = None) -> list[str]:
    """REPORT.md's P-Former sections: the text-only check, then captioning."""
    from eval.captioning import comparison_table
    from eval.prompt_reconstruction import ReconstructionReport

    lines = []
    if recon:
        r = ReconstructionReport(**recon)
        lines += ["", f"## P-Former on text alone ({r.captions} held-out captions, "
                      f"{r.n_prompts} prompts ahead of BOS)", "", r.table()]  # fmt: skip
    if not rows:
        return lines
    return lines + ["", "## Captioning through the frozen LM (P-Former, held-out images)", "",
            comparison_table(rows), "",
            f"Example (first held-out image, {rows[0]['loss']}): \"{rows[0]['example']}\""]  # fmt: skip
