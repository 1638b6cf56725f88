"""`facetclip demo` end to end at toy sizes: every step runs, the report holds what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from embed.pformer import LossConfig, PFormerConfig
from eval.demo import COMPARE, EVALS, DemoConfig, final_report, run_demo
from eval.demo_captioning import CaptionDemoConfig
from eval.synth import COLORS, SHAPES
from store.errors import InputError
from train.export import load_meta


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # A relative --out, as `make demo` passes it (`--out demo-out`): every path the demo hands
    # on (the LM folder to tune's and caption-lm's Ray workers) is relative then. The module's
    # tests run in that directory, where the report's relative paths hold.
    # Untrained LM and a few steps: this checks the plumbing, not the figures (the README
    # and the closing notes hold those of a full-size run).
    cfg = DemoConfig(out=Path("out"), n=200, llm_steps=0, steps=10, batch_size=16, workers=1,
                     tune_steps=4)  # fmt: skip
    cfg.caption = CaptionDemoConfig(pformer_steps=4, pformer_batch=8, steps=4, batch_size=16,
                                    max_new_tokens=6, limit=40, compare=True)  # fmt: skip
    # The context undoes the chdir however the demo ends (a failed one included).
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("demo"))
        yield cfg, run_demo(cfg)


@pytest.mark.slow
def test_demo_runs_every_step_and_reports_against_chance(demo):
    cfg, report = demo
    assert set(report.results) == set(COMPARE)
    assert set(report.results["flame"]) == {name for name, *_ in EVALS}
    for recipe, results in report.results.items():
        retrieval = results["retrieval"]
        # one caption per held-out image: chance R@1 is 1 / images, both directions
        images = retrieval.counts["images"]
        assert images == 200
        assert retrieval.chance["i2t_R@1"] == pytest.approx(1 / images)
        assert retrieval.chance["t2i_R@1"] == pytest.approx(1 / images)
        zs = results["zeroshot_shape"]
        assert zs.chance["top1"] == pytest.approx(1 / zs.counts["classes"])
        # every eval left its JSON in the run, with the same figures the report shows
        for name, r in results.items():
            saved = json.loads((cfg.out / "runs" / recipe / "eval" / f"{name}.json").read_text())
            assert saved["metrics"]["top1" if r.task == "zeroshot" else "i2t_R@1"] == pytest.approx(
                r.metrics["top1" if r.task == "zeroshot" else "i2t_R@1"]
            )

    md = (cfg.out / "REPORT.md").read_text()
    assert md == final_report(report, cfg)
    flame = report.results["flame"]["retrieval"]
    v, c = flame.metrics["i2t_R@1"], flame.chance["i2t_R@1"]
    assert f"| retrieval | i2t_R@1 | {v:.3f} | {c:.3f} | {v / c:.1f} |" in md
    for recipe in COMPARE:
        assert f"| {recipe} |" in md
    # llm2clip is embedded with the LM after its caption-contrastive tuning, CRA in the report
    from embed.engine import model_fingerprint
    from embed.tune import cra_rows

    tuned = report.paths["tuned model (llm2clip)"]
    recipe_toml = (cfg.out / "cache" / "llm2clip" / "recipe.toml").read_text()
    assert model_fingerprint(tuned) in recipe_toml
    assert model_fingerprint(cfg.out / "model") not in recipe_toml
    assert report.cra["pairs"] == cfg.n // 4
    assert "| llm2clip | tiny, CC-tuned |" in md
    for name, base, tuned_acc, chance in cra_rows(report.cra):
        assert f"| {name} | {base:.3f} | {tuned_acc:.3f} | {chance:.3f} |" in md
    # every path the report lists exists
    for path in report.paths.values():
        assert path.exists(), path


@pytest.mark.slow
def test_demo_caches_hold_every_training_caption(demo):
    cfg, _ = demo
    captions = pd.read_parquet(cfg.out / "data" / "captions.parquet")
    labels = pd.read_parquet(cfg.out / "data" / "labels.parquet")
    assert len(captions) == cfg.n
    for recipe in COMPARE:
        keys = pd.read_parquet(cfg.out / "cache" / recipe / "shards", columns=["key"])["key"]
        assert sorted(keys) == sorted(captions["key"])  # failed images still have captions
    assert set(labels.loc[labels["split"] == "train", "key"]) == set(captions["key"])


@pytest.mark.slow
def test_demo_captions_held_out_images_with_both_prompt_losses(demo):
    cfg, report = demo
    rows = {r["loss"]: r for r in report.captioning}
    assert set(rows) == {"prompt-align", "caption-lm"}
    for loss, r in rows.items():
        assert r["llm_in_loop"] == (loss == "caption-lm")
        assert r["steps"] == cfg.caption.steps and r["images"] == cfg.caption.limit
        assert r["shape_chance"] == pytest.approx(1 / len(SHAPES))
        assert r["colour_chance"] == pytest.approx(1 / len(COLORS))
        # the figures the report shows are the eval's own, saved in the run
        saved = json.loads(
            (cfg.out / "runs" / loss / "eval" / "retrieval_captioning.json").read_text()
        )
        assert saved["metrics"]["shape"] == pytest.approx(r["shape"])
        # both sides joined the same images to the same cache
        assert r["pairs"] == rows["prompt-align"]["pairs"]
        # ... and trained the prompt head alone, on the FLAME run's frozen tower's tokens
        meta = load_meta(cfg.out / "runs" / loss)
        assert meta["image_cache"] == str(report.paths["image cache (frozen tower)"])
        assert r["tower"].startswith("frozen (flame run's")
    md = (cfg.out / "REPORT.md").read_text()
    assert "## Captioning through the frozen LM" in md
    r = rows["prompt-align"]
    assert f"| prompt-align | no | {r['pairs']:,} | {r['steps']} |" in md
    # P-Former's text-only check, on the held-out captions, in the report as measured
    recon = report.reconstruction
    assert set(recon["conditions"]) == {"predicted", "shuffled", "random", "none"}
    assert recon["captions"] == cfg.caption.limit and recon["n_prompts"] == cfg.caption.n_prompts
    assert f"## P-Former on text alone ({cfg.caption.limit} held-out captions" in md
    c = recon["conditions"]["predicted"]
    assert f"| predicted | {c['token_acc']:.3f} | {c['loss']:.3f} |" in md
    assert (cfg.out / "cache" / "pformer" / "manifest.json").is_file()
    # the predictor trained with the demo's loss settings, not pformer's published defaults
    loss = PFormerConfig.from_toml(cfg.out / "pformer" / "config.toml").loss
    published = LossConfig()
    assert (loss.views, loss.pair_column) == (cfg.caption.views, cfg.caption.pair_column)
    assert loss.contrastive == cfg.caption.contrastive != published.contrastive
    assert loss.mask_prob == cfg.caption.mask_prob != published.mask_prob
    # in float32 (bf16 autocast slowed the tiny LM in the loop), on one worker
    run = PFormerConfig.from_toml(cfg.out / "pformer" / "config.toml").run
    assert run.amp is False and run.workers == 1 and run.cpus_per_worker == cfg.workers


def test_demo_refuses_a_non_empty_out_without_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="--overwrite"):
        run_demo(DemoConfig(out=tmp_path))
    assert (tmp_path / "keep.txt").exists()


@pytest.mark.parametrize("recipes", [("llm2clip",), ("flame", "flame"), ("flame", "clip"), ()])
def test_bad_recipe_lists_are_refused_before_any_work(tmp_path, recipes):
    with pytest.raises(InputError, match="give flame first"):
        run_demo(DemoConfig(out=tmp_path / "out", recipes=recipes))
    assert not (tmp_path / "out").exists()


def test_recipes_are_refused_when_nothing_is_compared(tmp_path):
    with pytest.raises(InputError, match="comparing is off"):
        run_demo(DemoConfig(out=tmp_path / "out", compare=False, recipes=("flame", "prompteol")))
    assert not (tmp_path / "out").exists()


def test_the_cli_reads_a_recipe_list_with_spaces_and_refuses_a_bad_one(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--recipes", " flame , clip "])
    assert result.exit_code == 2, result.output  # an input error: one line, no traceback
    assert "Traceback" not in result.output
    assert "--recipes flame,clip: give flame first" in " ".join(result.output.split())
    assert not out.exists()
