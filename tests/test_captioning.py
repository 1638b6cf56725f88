"""Stage two's prompt losses (prompt-align, caption-lm), the prompt head, captioning through the
frozen LLM and its metrics (issue 14, papers.md §3). Losses and metrics are checked against
hand computations; generation against a hand-written greedy loop over plain forward passes."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from embed.pformer_model import PredictorConfig, new_predictor, save_predictor
from embed.pipeline import EmbedConfig, run_embed
from eval.captioning import (
    CaptionConfig,
    bleu4,
    caption_images,
    decode,
    generate,
    image_rows,
    main_mention,
    naming_rates,
    summarise,
    words,
)
from eval.synth import COLORS, SHAPES
from store.errors import InputError
from store.prompting import IGNORE
from store.prompts import (
    iter_prompts,
    prompt_shape,
    prompt_stats,
    read_head,
    rows_to_prompts,
)
from store.runs import save_checkpoint
from train.config import TrainConfig
from train.export import export_model, load
from train.model import ModelConfig, build_model
from train.prompt_head import PromptHead
from train.prompt_losses import caption_lm_loss, compute_prompt_loss, prompt_align_loss, prompt_mse

N_PROMPTS = 4
COLOURS = tuple(COLORS)


# --- fixtures: an untrained predictor, its caches in both forms --------------------------------


@pytest.fixture(scope="module")
def llm(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory, train_data, llm, tiny_model):
    """(synth folder, pformer cache, pformer-code cache) of an untrained, seeded predictor."""
    synth, _ = train_data
    model, tok = llm
    root = tmp_path_factory.mktemp("prompt-data")
    torch.manual_seed(0)
    cfg = PredictorConfig(width=32, layers=1, heads=2, ffn=64, n_prompts=N_PROMPTS, proj_dim=16,
                          max_caption_tokens=12)  # fmt: skip
    pf, enc_tok = new_predictor(cfg, tok, model.config.hidden_size)
    predictor = save_predictor(root / "predictor", pf, enc_tok,
                               {"llm": str(tiny_model), "llm_width": 64, "steps": 0})  # fmt: skip
    for form in ("pformer", "pformer-code"):
        run_embed(EmbedConfig(synth / "captions.parquet", str(predictor), root / form,
                              recipe=form), progress=False)  # fmt: skip
    return synth, root / "pformer", root / "pformer-code"


def tiny_model_config(n: int = N_PROMPTS) -> ModelConfig:
    return ModelConfig(tower="resnet10t", image_head="prompt", text_head="linear", embed_dim=16,
                       loss="prompt-align", prompt_tokens=n, prompt_width=32, prompt_layers=1,
                       prompt_heads=2)  # fmt: skip


# --- the losses, by hand --------------------------------------------------------------------------


def hand_clip(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Symmetric InfoNCE written out with loops: -log softmax of the diagonal, both ways."""
    n = len(image)
    sim = [[scale * float(image[i] @ text[j]) for j in range(n)] for i in range(n)]
    i2t = -sum(sim[i][i] - math.log(sum(math.exp(s) for s in sim[i])) for i in range(n)) / n
    cols = [[sim[i][j] for i in range(n)] for j in range(n)]
    t2i = -sum(cols[j][j] - math.log(sum(math.exp(s) for s in cols[j])) for j in range(n)) / n
    return (i2t + t2i) / 2


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_prompt_mse_is_the_mean_of_squared_differences():
    pred = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])
    target = torch.tensor([[[0.0, 2.0], [2.0, 1.0]]])
    # (1-0)^2 + 0 + (0-2)^2 + (-1-1)^2 = 1 + 0 + 4 + 4 = 9 over 4 elements
    assert float(prompt_mse(pred, target)) == pytest.approx(9 / 4)


def test_prompt_align_is_w_times_mse_plus_the_contrastive_term():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    image, text = unit(torch.randn(3, 4)), unit(torch.randn(3, 4))
    out = prompt_align_loss(pred, target, image, text, torch.tensor(7.0), weight=10.0,
                            contrastive_weight=0.5)  # fmt: skip
    mse = sum(float((pred[b, i, d] - target[b, i, d]) ** 2)
              for b in range(3) for i in range(2) for d in range(5)) / 30  # fmt: skip
    con = hand_clip(image, text, 7.0)
    assert float(out["loss_align"]) == pytest.approx(mse, rel=1e-5)
    assert float(out["loss_contrastive"]) == pytest.approx(con, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(10 * mse + 0.5 * con, rel=1e-5)
    # standardised: the MSE in units of the prompts' variance (spread 0.05 -> / 0.0025)
    std = prompt_align_loss(pred, target, image, text, torch.tensor(7.0), weight=10.0,
                            contrastive_weight=0.5, spread=0.05)  # fmt: skip
    assert float(std["loss_align"]) == pytest.approx(mse / 0.0025, rel=1e-5)
    assert float(std["loss"]) == pytest.approx(10 * mse / 0.0025 + 0.5 * con, rel=1e-5)


def test_caption_lm_is_the_caption_tokens_cross_entropy_plus_the_contrastive_term():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 6)
    targets = torch.tensor([[2, 5, IGNORE], [0, IGNORE, IGNORE]])
    image, text = unit(torch.randn(2, 4)), unit(torch.randn(2, 4))
    out = caption_lm_loss(logits, targets, image, text, torch.tensor(3.0), weight=1.0,
                          contrastive_weight=2.0)  # fmt: skip
    kept = [(0, 0, 2), (0, 1, 5), (1, 0, 0)]
    ce = -sum(float(logits[b, t, y]) - math.log(sum(math.exp(float(v)) for v in logits[b, t]))
              for b, t, y in kept) / len(kept)  # fmt: skip
    assert float(out["loss_lm"]) == pytest.approx(ce, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(ce + 2.0 * hand_clip(image, text, 3.0), rel=1e-5)
    assert "loss_align" not in out
    # P-Former's recipe: the alignment term added, standardised by the prompts' spread
    pred, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    both = caption_lm_loss(logits, targets, image, text, torch.tensor(3.0), weight=1.0,
                           contrastive_weight=2.0, prompts=pred, target=target,
                           align_weight=5.0, spread=0.5)  # fmt: skip
    mse = sum(float((pred[b, i, d] - target[b, i, d]) ** 2)
              for b in range(2) for i in range(3) for d in range(4)) / 24  # fmt: skip
    assert float(both["loss_align"]) == pytest.approx(mse / 0.25, rel=1e-5)
    assert float(both["loss"]) == pytest.approx(float(out["loss"]) + 5.0 * mse / 0.25, rel=1e-5)


def test_the_step_loss_in_one_process_is_the_pure_loss():
    torch.manual_seed(2)
    pred, target = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    image, text = unit(torch.randn(4, 5)), unit(torch.randn(4, 5))
    scale = torch.tensor(5.0)
    got = compute_prompt_loss("prompt-align", image, text, scale, 10.0, 1.0, prompts=pred,
                              target=target, spread=0.3)  # fmt: skip
    want = prompt_align_loss(pred, target, image, text, scale, 10.0, 1.0, spread=0.3)
    assert all(torch.allclose(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="not a prompt loss"):
        compute_prompt_loss("clip", image, text, scale, 1.0, 1.0)


# --- the prompt head and the model -------------------------------------------------------------------


def test_prompt_head_makes_n_prompts_of_the_llm_width_per_image():
    head = PromptHead(in_dim=24, out_dim=64, n_prompts=5, width=32, layers=2, heads=4)
    assert head(torch.randn(3, 7, 24)).shape == (3, 5, 64)
    assert head.n_prompts == 5


def test_the_model_pools_its_prompts_through_the_text_head_like_cached_prompts():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(), text_dim=64).eval()
    images = torch.randn(2, 3, 32, 32)
    cached = torch.randn(2, 64)
    out = model(images, cached)
    prompts = model.prompt_tokens(images)
    assert out["prompts"].shape == prompts.shape == (2, N_PROMPTS, 64)
    assert torch.allclose(out["prompts"], prompts)
    # image features: the mean prompt through the same text head as the cached side
    want = F.normalize(model.text_head(prompts.mean(1)), dim=-1)
    assert torch.allclose(out["image_features"], want, atol=1e-6)
    assert torch.allclose(model.encode_image(images), want, atol=1e-6)
    assert torch.allclose(out["text_features"], F.normalize(model.text_head(cached), dim=-1))
    out["prompts"].sum().backward()  # the gradient reaches the tower through the head
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tower.parameters())


def test_config_ties_the_prompt_head_to_the_prompt_losses():
    cfg = TrainConfig(images="x", loss="prompt-align")
    cfg.validate()
    assert cfg.model.image_head == "prompt" and cfg.prompt_weight() == 10.0
    lm = TrainConfig(images="x", loss="caption-lm")
    with pytest.raises(InputError, match="prompt.llm"):
        lm.validate()
    lm.prompt.llm, lm.prompt.captions = "x", "y"
    lm.validate()
    assert lm.prompt_weight() == 1.0
    bad = TrainConfig(images="x", loss="clip")
    bad.model.image_head = "prompt"
    with pytest.raises(InputError, match="prompt-align or caption-lm"):
        bad.validate()
    heads_only = TrainConfig(image_cache="icache", loss="prompt-align")  # a frozen tower's tokens
    heads_only.validate()
    assert heads_only.model.image_head == "prompt"
    lm.prompt.align = 2.0  # caption-lm + the alignment term (P-Former's recipe)
    lm.validate()
    align = TrainConfig(images="x", loss="prompt-align")
    align.prompt.align = 2.0
    with pytest.raises(InputError, match="prompt.align adds the alignment term to caption-lm"):
        align.validate()
    lm.prompt.align = -1.0
    with pytest.raises(InputError, match="must be >= 0"):
        lm.validate()
    d = TrainConfig(images="x", loss="prompt-align").override(["prompt.weight=3.0"]).to_dict()
    assert TrainConfig.from_dict(d).prompt.weight == 3.0


# --- prompt caches as stage two reads them ------------------------------------------------------------


def test_both_cache_forms_give_stage_two_the_same_prompts(prompt_data):
    from store.cache import Cache
    from store.reader import iter_batches

    _, full, code = prompt_data
    assert prompt_shape(full) == prompt_shape(code) == (N_PROMPTS, 64)
    names = Cache.open(full).manifest.layout["vector_names"]
    keys, rows = next(iter_batches(Cache.open(full), names, batch_rows=16))
    full_rows = np.stack([rows[n] for n in names], axis=1)  # [n, K = N, D], as train reads
    _, code_rows = next(iter_batches(Cache.open(code), ["code"], batch_rows=16))
    head = read_head(Cache.open(code))
    a = rows_to_prompts(full_rows, None)
    b = rows_to_prompts(code_rows["code"][:, None], head)
    np.testing.assert_allclose(a, b, atol=2e-3)  # the full form stores float16
    every = np.concatenate([p for _, p in iter_prompts(full)])
    mean, scale = prompt_stats(full)
    # each slot's mean prompt (the head's output offset); center_text subtracts their mean
    np.testing.assert_allclose(mean, every.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean.mean(axis=0), every.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
    # the prompt head's output scale: RMS deviation from each slot's mean, in both forms
    spread = float(np.sqrt(((every - every.mean(axis=0)) ** 2).mean()))
    assert scale == pytest.approx(spread, rel=1e-5)
    assert prompt_stats(code)[1] == pytest.approx(spread, rel=2e-2)  # full stores float16


def test_the_prompt_head_fits_targets_at_the_scale_of_llm_embeddings():
    """Targets vary by ~0.05 around slot means far from zero (an LLM's input embeddings): with
    ``out_scale`` and ``out_mean`` set to their spread and slot means the head learns them
    (toy data: 9 patch-token patterns -> 9 prompt sets); loading a state dict saved before
    these buffers existed gives scale 1 and mean 0, what it was trained with."""
    torch.manual_seed(0)
    offset = torch.randn(N_PROMPTS, 16) * 0.5
    classes, targets = torch.randn(9, 4, 32), offset + torch.randn(9, N_PROMPTS, 16) * 0.05
    head = PromptHead(32, 16, N_PROMPTS, width=32, layers=1, heads=2)
    head.out_scale.fill_(0.05)
    head.out_mean.copy_(targets.mean(0))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        y = torch.randint(0, 9, (32,))
        loss = F.mse_loss(head(classes[y] + 0.5 * torch.randn(32, 4, 32)), targets[y])
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = torch.arange(9).repeat(20)
    with torch.no_grad():
        residual = F.mse_loss(head(classes[y] + 0.5 * torch.randn(len(y), 4, 32)), targets[y])
    assert residual < 0.1 * targets[y].var(0).mean()  # > 90% of the variance explained
    old = {k: v for k, v in head.state_dict().items() if k not in ("out_scale", "out_mean")}
    fresh = PromptHead(32, 16, N_PROMPTS, width=32, layers=1, heads=2)
    fresh.out_scale.fill_(0.5)
    fresh.out_mean.fill_(0.5)
    fresh.load_state_dict(old)
    assert float(fresh.out_scale) == 1.0 and not fresh.out_mean.any()


def test_the_alignment_mse_is_standardised_unless_switched_off():
    from train.prompt_step import PromptStep

    cfg = TrainConfig(images="x", loss="prompt-align")
    loop = {"prompt_form": "pformer", "prompt_scale": 0.05}
    assert PromptStep(cfg, loop, torch.device("cpu")).spread == 0.05
    cfg.prompt.standardize = False  # BLIText's raw MSE
    assert PromptStep(cfg, loop, torch.device("cpu")).spread == 1.0
    cfg.prompt.standardize = True  # a cache that is not a prompt cache has no spread
    assert PromptStep(cfg, {**loop, "prompt_scale": None}, torch.device("cpu")).spread == 1.0


def test_a_prompt_run_saved_before_standardize_resumes_on_the_raw_mse():
    from train.loop import keep_saved_behaviour

    cfg = TrainConfig(images="x", cache="c", out="r", loss="prompt-align")
    new = cfg.to_toml()
    assert "standardize = true" in new
    old = new.replace("standardize = true\n", "")  # a config.toml saved before the option
    for saved, want in ((new, True), (old, False)):
        run = TrainConfig(images="x", cache="c", out="r", loss="prompt-align")
        keep_saved_behaviour(run, saved)
        assert run.prompt.standardize is want


def test_prompt_targets_must_fit_the_head():
    model = build_model(tiny_model_config(), text_dim=16)
    model.set_prompt_targets(torch.full((N_PROMPTS, 16), 0.3), 0.05)
    assert float(model.image_head.out_mean[0, 0]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="prompt mean must have shape"):
        model.set_prompt_targets(torch.zeros(N_PROMPTS + 1, 16), 0.05)
    with pytest.raises(ValueError, match="finite and > 0"):
        model.set_prompt_targets(torch.zeros(N_PROMPTS, 16), 0.0)


def test_prompt_align_needs_a_prompt_cache(train_data, tiny_model, tmp_path):
    from train.loop import check_config

    synth, flame_cache = train_data
    cfg = TrainConfig(images=str(synth / "images"), cache=str(flame_cache), out=str(tmp_path),
                      loss="prompt-align")  # fmt: skip
    cfg.model = tiny_model_config()
    with pytest.raises(InputError, match="--recipe pformer"):
        check_config(cfg)
    # so does caption-lm's alignment term (caption-lm alone trains on any cache)
    cfg.loss, cfg.prompt.llm, cfg.prompt.captions = "caption-lm", str(tiny_model), "captions"
    cfg.prompt.align = 1.0
    with pytest.raises(InputError, match="give caption-lm a pformer cache"):
        check_config(cfg)


def test_a_prompt_run_trains_on_every_prompt_slot_in_order(prompt_data, tmp_path):
    from store.cache import Cache
    from train.loop import check_config

    synth, full, _ = prompt_data
    names = list(Cache.open(full).manifest.layout["vector_names"])
    for facets in (names[:2], names[::-1]):
        cfg = TrainConfig(images=str(synth / "images"), cache=str(full), out=str(tmp_path),
                          loss="prompt-align", facets=facets)  # fmt: skip
        cfg.model = tiny_model_config()
        with pytest.raises(InputError, match="leave facets unset"):
            check_config(cfg)


# --- metrics, by hand -----------------------------------------------------------------------------


def test_bleu4_matches_a_hand_computation():
    hyp = "the cat sat on the mat"
    ref = "the cat is on the mat"
    # clipped matches / totals: 1-grams 5/6 (all but "sat"), 2-grams 3/5 (the cat, on the,
    # the mat), 3-grams 1/4 (on the mat), 4-grams 0/3 -> BLEU 0 without smoothing
    assert bleu4([hyp], [ref]) == 0.0
    hyp2, ref2 = "a red star above a blue circle", "a red star above a blue square"
    # 1-grams 6/7, 2-grams 5/6, 3-grams 4/5, 4-grams 3/4; equal lengths: no brevity penalty
    p = (6 / 7) * (5 / 6) * (4 / 5) * (3 / 4)
    assert bleu4([hyp2], [ref2]) == pytest.approx(p**0.25)
    # corpus level: counts add up over pairs; a short hypothesis pays exp(1 - r/c)
    hyp3, ref3 = "a red star above", "a red star above a blue square"
    m = [6 + 4, 5 + 3, 4 + 2, 3 + 1]
    t = [7 + 4, 6 + 3, 5 + 2, 4 + 1]
    c, r = 7 + 4, 7 + 7
    want = math.exp(1 - r / c) * math.exp(
        sum(math.log(a / b) for a, b in zip(m, t, strict=True)) / 4
    )
    assert bleu4([hyp2, hyp3], [ref2, ref3]) == pytest.approx(want)
    # clipping: a repeated word counts at most as often as in the reference
    assert words("Star, star!") == ["star", ",", "star", "!"]
    assert bleu4(["star star star star star"], ["star star star star star"]) == pytest.approx(1.0)


def test_comparison_table_shows_every_rate_beside_its_chance_and_image_blind_score():
    from eval.captioning import comparison_table

    row = {"loss": "prompt-align", "llm_in_loop": False, "pairs": 3912, "steps": 150,
           "steps_per_s": 0.476, "images": 200, "shape": 0.075, "shape_chance": 1 / 9,
           "shape_blind": 0.05, "colour": 0.09, "colour_chance": 1 / 9, "colour_blind": 0.11,
           "bleu4": 0.151, "bleu4_blind": 0.155, "reference_shape": 1.0}  # fmt: skip
    lm = dict(row, loss="caption-lm", llm_in_loop=True, shape=0.5)
    md = comparison_table([row, lm])
    assert ("| prompt-align | no | 3,912 | 150 | 0.48 | 0.075 (0.111, 0.050) | "
            "0.090 (0.111, 0.110) | 15.1 (15.5) |") in md  # fmt: skip
    assert "| caption-lm | yes | 3,912 | 150 | 0.48 | 0.500 (0.111, 0.050) |" in md
    assert "200 held-out images" in md and "first in 100% of cases" in md


def test_both_sides_of_the_comparison_share_everything_but_the_loss(tmp_path):
    from eval.captioning import CompareConfig, compare_train_config

    cfg = CompareConfig(out=tmp_path / "runs", images=tmp_path / "images",
                        prompt_cache=tmp_path / "cache", captions=tmp_path / "captions.parquet",
                        llm="llm", eval_data=tmp_path / "eval", steps=7, workers=1,
                        cpus_per_worker=2, tower_run=tmp_path / "flame")  # fmt: skip
    align, lm = (compare_train_config(cfg, loss) for loss in ("prompt-align", "caption-lm"))
    assert (align.loss, lm.loss) == ("prompt-align", "caption-lm")
    for t in (align, lm):
        # one worker with the demo's cores (eval.demo_captioning), on the frozen tower's tokens
        assert (t.run.workers, t.run.cpus_per_worker, t.steps) == (1, 2, 7)
        assert t.image_cache == str(cfg.image_cache) and t.images == ""
    assert lm.prompt.llm == "llm" and align.prompt.llm != "llm"
    assert compare_train_config(CompareConfig(**{**vars(cfg), "cpus_per_worker": 1}),
                                "prompt-align").run.cpus_per_worker == 1  # fmt: skip


def test_main_mention_takes_the_first_shape_and_its_nearest_colour_in_the_sentence():
    def mm(text):
        return main_mention(text, SHAPES, COLOURS)

    assert mm("The centre of attention is a huge triangle in pink, shown as an outline.") == (
        "triangle", "pink")  # fmt: skip
    assert mm("A red star above a blue circle.") == ("star", "red")
    assert mm("Behind the shapes lies a cream backdrop. Two green hearts.") == ("heart", "green")
    assert mm("Green here. A square alone.") == ("square", None)  # colour of another sentence
    assert mm("Nothing but light.") == (None, None)
    rates = naming_rates(["a red star.", "a blue circle.", "a heart."], ["star", "square", "heart"],
                         ["red", "blue", "pink"], SHAPES, COLOURS)  # fmt: skip
    assert rates == pytest.approx({"shape": 2 / 3, "colour": 2 / 3, "shape_and_colour": 1 / 3})


def test_blind_scores_pair_each_caption_with_the_next_images_truth():
    caps = ["a red star.", "a blue circle.", "a green heart."]
    m = summarise(caps, caps, ["star", "circle", "heart"], ["red", "blue", "green"], SHAPES,
                  COLOURS)  # fmt: skip
    assert m["shape"] == m["colour"] == m["reference_shape"] == 1.0 and m["shape_blind"] == 0.0
    assert m["bleu4"] == pytest.approx(1.0)
    assert m["bleu4_blind"] == bleu4(caps, caps[1:] + caps[:1])


# --- generation and the caption command ----------------------------------------------------------


def test_generate_is_greedy_decoding_over_prompts_then_bos(llm):
    model, tok = llm
    torch.manual_seed(3)
    prompts = torch.randn(2, 3, 64)
    got = generate(model, tok, prompts, beams=1, max_new_tokens=6)
    # by hand: append the argmax of a plain forward pass, token by token
    emb = model.get_input_embeddings()
    for b in range(2):
        x = torch.cat([prompts[b : b + 1], emb(torch.tensor([[tok.bos_token_id]]))], dim=1)
        ids = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(inputs_embeds=x).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
                x = torch.cat([x, emb(torch.tensor([[nxt]]))], dim=1)
        assert got[b] == tok.decode(ids, skip_special_tokens=True).strip()
    beams = generate(model, tok, prompts, beams=3, max_new_tokens=6)
    assert len(beams) == 2 and all(isinstance(c, str) for c in beams)


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory, prompt_data, tiny_model):
    """An exported prompt-align model, never trained (checkpoint written by hand: no Ray)."""
    synth, full, _ = prompt_data
    run = tmp_path_factory.mktemp("runs") / "untrained"
    cfg = TrainConfig(images=str(synth / "images"), cache=str(full), out=str(run),
                      loss="prompt-align", steps=1)  # fmt: skip
    cfg.model = tiny_model_config()
    cfg.data.image_size = 32
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg.model, 64)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(run, model, opt, {"step": 0, "text_dim": 64, "config": cfg.to_dict()})
    export_model(run, ckpt)
    return run


def test_caption_writes_one_json_line_per_image_with_its_key(untrained_run, prompt_data, tmp_path):
    synth, _, _ = prompt_data
    images = synth / "eval" / "retrieval" / "images"
    out = tmp_path / "caps.jsonl"
    r = caption_images(CaptionConfig(run=untrained_run, images=images, out=out,
                                     max_new_tokens=5, batch_size=3, progress=False))  # fmt: skip
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    want = sorted(p.name.partition(".")[0] for p in images.iterdir())
    assert [x["key"] for x in lines] == want and r.captions == len(want) and not r.skipped
    # the same captions as the model's prompts through `generate` (the JSONL is that, per key)
    model = load(untrained_run)
    from eval.captioning import load_llm

    lm, tok = load_llm(r.llm)
    from PIL import Image

    first = [Image.open(images / f"{k}.jpg").convert("RGB") for k in want[:3]]
    assert [x["caption"] for x in lines[:3]] == generate(lm, tok, model.prompt_tokens(first),
                                                         max_new_tokens=5)  # fmt: skip


def one_line(args: list[str], code: int = 2) -> str:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    return " ".join(r.output.split())


def test_caption_on_an_empty_folder_or_a_corrupt_image_gets_one_line(untrained_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images found" in one_line(["caption", str(untrained_run), str(empty)])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    msg = one_line(["caption", str(untrained_run), str(bad)])
    assert "bad.jpg is not an image that can be decoded" in msg
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "zz.jpg").write_bytes(b"broken")
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(mixed / "a.jpg")
    out = one_line(["caption", str(untrained_run), str(mixed), "--max-tokens", "3",
                    "--no-progress"], code=0)  # fmt: skip
    assert "skipped 1 unreadable image(s): zz (not an image format PIL can decode)" in out
    lines = (untrained_run / "captions" / "mixed.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a"]
    flame_run = tmp_path / "flame"
    (flame_run / "model").mkdir(parents=True)
    meta = json.loads((untrained_run / "model" / "config.json").read_text())
    meta["model"]["image_head"], meta["loss"] = "token-mlp", "mp-sigmoid"
    (flame_run / "model" / "config.json").write_text(json.dumps(meta))
    assert "only runs trained with --loss prompt-align" in one_line(
        ["caption", str(flame_run), str(mixed)]
    )


def test_eval_captioning_reports_rates_beside_chance(untrained_run, prompt_data):
    from eval.evaluation import EvalConfig, evaluate

    synth, _, _ = prompt_data
    r = evaluate(EvalConfig(run=untrained_run, task="captioning",
                            data=synth / "eval" / "retrieval", max_new_tokens=6))  # fmt: skip
    assert r.chance["shape"] == pytest.approx(1 / 9) and r.counts["images"] == 8
    rows = [json.loads(x) for x in r.files[2].read_text().splitlines()]
    labels = pq.read_table(synth / "labels.parquet").to_pylist()
    truth = {x["key"]: x["main_shape"] for x in labels}
    assert all(row["main_shape"] == truth[row["key"]] for row in rows)
    want = naming_rates([x["caption"] for x in rows], [x["main_shape"] for x in rows],
                        [x["main_color"] for x in rows], SHAPES, COLOURS)  # fmt: skip
    assert r.metrics["shape"] == want["shape"]
    assert r.metrics["bleu4"] == bleu4([x["caption"] for x in rows], [x["reference"] for x in rows])
    assert "| shape |" in r.files[1].read_text()


# --- through Ray: both losses train, export and caption -----------------------------------------------


def train_prompt_run(out, source: dict, cache, loss: str, llm, synth, align: float = 0.0):
    """Train a 3-step prompt run from ``source`` (images or image_cache) through Ray, check what
    every prompt run must hold (every step logged with a finite loss; the exported head's offset
    and scale are the cache's slot means and prompt spread; `caption` works on the held-out
    images) and return its metrics rows."""
    from train.loop import train

    cfg = TrainConfig(**source, cache=str(cache), out=str(out), loss=loss, steps=3, batch_size=8)
    cfg.model = tiny_model_config()
    cfg.data.image_size = 32  # a heads-only run takes the image cache's instead
    cfg.optim.warmup_steps, cfg.run.log_every = 1, 1
    if loss == "caption-lm":  # prompt-align never loads an LLM
        cfg.prompt.llm, cfg.prompt.captions = str(llm), str(synth / "captions.parquet")
        cfg.prompt.align = align
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)
    exported = load_file(out / "model" / "model.safetensors")
    mean, spread = prompt_stats(cache)
    assert float(exported["image_head.out_scale"]) == pytest.approx(spread)
    np.testing.assert_allclose(exported["image_head.out_mean"].numpy(), mean, rtol=1e-6)
    c = caption_images(CaptionConfig(run=out, images=synth / "eval" / "retrieval",
                                     max_new_tokens=4, progress=False))  # fmt: skip
    assert c.captions == 8
    return rows


@pytest.mark.slow
def test_prompt_align_and_caption_lm_train_on_ray_and_caption(prompt_data, tiny_model, tmp_path,
                                                             ray_session):  # fmt: skip
    synth, full, code = prompt_data
    for name, cache, loss in (("align", code, "prompt-align"), ("lm", full, "caption-lm")):
        rows = train_prompt_run(tmp_path / name, {"images": str(synth / "images")}, cache, loss,
                                tiny_model, synth)  # fmt: skip
        assert ("loss_align" if loss == "prompt-align" else "loss_lm") in rows[-1]
    # prompt-align was given no LLM; captioning finds it through the predictor of its cache
    from eval.captioning import run_llm

    assert run_llm(tmp_path / "align") == run_llm(tmp_path / "lm") == str(tiny_model)


@pytest.mark.slow
def test_prompt_losses_train_heads_only_on_a_frozen_tower_cache(prompt_data, tiny_model, tmp_path,
                                                                 ray_session):  # fmt: skip
    """BLIP-2's setting: the tower frozen, its patch tokens cached once (`embed-images --grid`),
    only the prompt head trained. Both losses run on the cached tokens (caption-lm, with
    P-Former's alignment term added, finds each row's caption by key); the export puts the
    cache's tower back in front of the head, so prompts from pixels equal the head on the cached
    tokens, and `caption` works on images."""
    from train.image_cache import (
        ImageCacheConfig,
        cached_features,
        open_image_cache,
        run_embed_images,
    )
    from train.loop import check_config

    synth, full, code = prompt_data
    icache = tmp_path / "icache"
    run_embed_images(ImageCacheConfig(images=synth / "images", out=icache, tower="resnet10t",
                                      random_init=True, image_size=32, grid=1), progress=False)  # fmt: skip
    pooled = tmp_path / "pooled"  # the pooled feature only: no tokens for the head to read
    run_embed_images(ImageCacheConfig(images=synth / "images", out=pooled, tower="resnet10t",
                                      random_init=True, image_size=32), progress=False)  # fmt: skip
    cfg = TrainConfig(image_cache=str(pooled), cache=str(code), out=str(tmp_path / "p"),
                      loss="prompt-align")  # fmt: skip
    cfg.model = tiny_model_config()
    with pytest.raises(InputError, match="embed the images with --grid"):
        check_config(cfg)
    for name, cache, loss in (("align", code, "prompt-align"), ("lm", full, "caption-lm")):
        rows = train_prompt_run(tmp_path / name, {"image_cache": str(icache)}, cache, loss,
                                tiny_model, synth, align=1.0)  # fmt: skip
        terms = ["loss_align"] + (["loss_lm"] if loss == "caption-lm" else [])
        assert all(np.isfinite(r[t]) for r in rows for t in terms)
        model = load(tmp_path / name)
        assert model.meta["image_cache"] == str(icache)
        keys, read = image_rows(synth / "images", "auto")
        keys, pixels = keys[:4], [decode(b)[0] for b in read(0, 4)]
        head = model.model.image_head
        mean, spread = prompt_stats(cache)  # the fixed offset and scale survive the loaded export
        np.testing.assert_allclose(head.out_mean.numpy(), mean, rtol=1e-6)
        assert float(head.out_scale) == pytest.approx(spread)
        from_pixels = model.prompt_tokens(pixels)
        tokens = torch.from_numpy(cached_features(open_image_cache(icache), keys, token_grid=1))
        with torch.no_grad():
            from_cache = head(tokens)
        # compared in the head's own units (what it learnt, not the offset), float16 cache
        torch.testing.assert_close((from_pixels - head.out_mean) / head.out_scale,
                                   (from_cache - head.out_mean) / head.out_scale,
                                   atol=2e-2, rtol=1e-2)  # fmt: skip


def test_caption_lm_refuses_missing_captions_before_ray(prompt_data, tiny_model, tmp_path):
    from train.loop import prepare_run

    synth, full, _ = prompt_data
    cfg = TrainConfig(images=str(synth / "images"), cache=str(full), out=str(tmp_path / "r"),
                      loss="caption-lm")  # fmt: skip
    cfg.model = tiny_model_config()
    cfg.prompt.llm = str(tiny_model)
    cfg.prompt.captions = str(synth / "captions.parquet")
    cfg.prompt.caption_column = "caption"
    cut = tmp_path / "few.parquet"
    pq.write_table(pq.read_table(synth / "captions.parquet").slice(0, 5), cut)
    cfg.prompt.captions = str(cut)
    with pytest.raises(InputError, match="have no 'caption'"):
        prepare_run(cfg)
