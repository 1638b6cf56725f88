"""Stage two end to end on the synthetic dataset: validation before Ray, resume, a killed
worker, export without Ray. One local Ray session for the module (Ray on 2 cores: more
logical CPUs than cores, or Ray Data starves behind the training workers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embed.pipeline import EmbedConfig, run_embed
from eval.synth import SynthConfig, write_synth
from store.errors import InputError
from store.runs import METRICS_FILE, latest_checkpoint, load_checkpoint
from train.config import TrainConfig
from train.loop import FAULT_MARKER, TrainError, prepare_run, train
from train.model import build_model

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def data(train_data):
    return train_data


def config(data, out: Path, **kw) -> TrainConfig:
    synth, cache = data
    cfg = TrainConfig(
        images=str(synth / "images"),
        cache=str(cache),
        out=str(out),
        steps=4,
        batch_size=16,
        num_facets=3,
    )
    cfg.model.tower = "vit_tiny_patch16_224"
    cfg.model.tower_kwargs = dict(TINY_VIT)
    cfg.data.image_size = 32
    cfg.optim.warmup_steps = 1
    cfg.run.log_every = 1
    cfg.run.checkpoint_every = 2
    for k, v in kw.items():
        section, _, name = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, v)
    return cfg


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


# --- checks before Ray ------------------------------------------------------------------------


def test_config_file_round_trip_and_overrides(tmp_path):
    cfg = TrainConfig(images="i", cache="c", out="o")
    path = tmp_path / "train.toml"
    path.write_text(cfg.to_toml())
    again = TrainConfig.from_toml(path)
    assert again == cfg
    changed = again.override(
        ["optim.lr=1e-3", "model.tower=resnet18", "run.workers=2", "facets=['a', 'b']"]
    )
    assert (changed.optim.lr, changed.model.tower, changed.run.workers, changed.facets) == (
        1e-3,
        "resnet18",
        2,
        ["a", "b"],
    )
    with pytest.raises(InputError, match="unknown field"):
        cfg.override(["optim.lrr=1"])
    with pytest.raises(InputError, match="unknown config field"):
        TrainConfig.from_dict({"model": {"towr": "x"}})


def test_bad_runs_are_refused_before_ray(data, tmp_path):
    import ray

    assert not ray.is_initialized()
    with pytest.raises(InputError, match="did you mean|close matches|vit_tiny_patch16_224"):
        prepare_run(config(data, tmp_path / "a", model__tower="vit_tiny_patch16_2244"))
    with pytest.raises(InputError, match="samples 9 facets per image but the cache holds 7"):
        prepare_run(config(data, tmp_path / "b", num_facets=9))
    with pytest.raises(InputError, match="must divide evenly over 3 workers"):
        prepare_run(config(data, tmp_path / "c", run__workers=3))
    synth, _ = data
    retrieval = synth / "eval" / "retrieval"  # held-out images: no key in the training cache
    with pytest.raises(InputError, match="no key"):
        prepare_run(config(data, tmp_path / "d", images=str(retrieval)))
    assert not ray.is_initialized()


# --- runs on Ray ------------------------------------------------------------------------------


def test_resume_ends_with_the_same_weights(data, tmp_path, ray_session):
    straight = tmp_path / "straight"
    train(config(data, straight), progress=False)
    broken = tmp_path / "broken"
    # killed right after the checkpoint at step 2, with no restarts allowed: the run fails...
    with pytest.raises(TrainError, match="--resume"):
        train(config(data, broken, run__fault_step=2, run__max_failures=0), progress=False)
    assert latest_checkpoint(broken).name == "step_0000002"
    # ...and `--resume` continues it from that checkpoint.
    result = train(TrainConfig(out=str(broken)), resume=True, progress=False)
    assert result.steps == 4
    a, b = weights(straight), weights(broken)
    # Same data order (a function of seed and epoch), same facet samples (seed, step, rank),
    # same arithmetic on one CPU thread (bf16 autocast where the CPU has bf16 arithmetic, both
    # runs alike): equal to float32 rounding.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (broken / METRICS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the steps after the checkpoint are not logged twice


def test_a_killed_worker_is_restarted_from_its_checkpoint(data, tmp_path, ray_session):
    run = tmp_path / "fault"
    result = train(
        config(data, run, run__workers=2, run__fault_step=3, run__max_failures=1), progress=False
    )
    assert (run / FAULT_MARKER).read_text() == "3"  # the last worker really died at step 3
    assert result.steps == 4 and latest_checkpoint(run).name == "step_0000004"
    for name in (
        "config.toml",
        "metrics.jsonl",
        "plots/loss.png",
        "plots/lr.png",
        "model/model.safetensors",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir())


def test_export_loads_without_ray_and_matches_the_checkpoint(data, tmp_path, ray_session):
    run = tmp_path / "export"
    train(config(data, run), progress=False)
    synth, _ = data
    images = sorted((synth / "eval" / "retrieval" / "images").glob("*.jpg"))[:4]
    # The reference: the checkpoint loaded into a fresh model, images through the same transform.
    cfg = TrainConfig.from_toml(run / "config.toml")
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    model = build_model(cfg.model, state["text_dim"]).eval()
    load_checkpoint(latest_checkpoint(run), model)
    from PIL import Image

    from train.export import load

    exported = load(run)
    pixels = torch.from_numpy(exported.preprocess([Image.open(p) for p in images]))
    with torch.no_grad():
        want = model.encode_image(pixels).numpy()
    script = f"""
import sys, numpy as np
sys.modules["ray"] = None  # importing ray now fails: the export must not need it
from PIL import Image
from train.export import load
m = load({str(run)!r})
np.save({str(tmp_path / "feats.npy")!r}, m.encode_image([Image.open(p) for p in {[str(p) for p in images]!r}]))
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])
    np.testing.assert_allclose(np.load(tmp_path / "feats.npy"), want, atol=1e-5)
    # the tower alone loads into the plain timm model
    import timm

    tower = timm.create_model(
        cfg.model.tower, pretrained=False, num_classes=0, **cfg.model.tower_kwargs
    )
    tower.load_state_dict(load_file(run / "model" / "tower.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(
            tower.forward_features(pixels), model.tower.forward_features(pixels)
        )


def test_center_text_offset_is_the_one_training_used(data, tmp_path, ray_session):
    """center_text: the offset training subtracts is the cache's mean over rows and trained
    facets (computed here with pyarrow alone), it is saved with the weights, and the export's
    encode_text equals what the loss saw for the same cached vectors: the checkpointed model's
    forward on the raw vectors."""
    import pyarrow.parquet as pq

    from train.export import load

    synth, cache = data
    run = tmp_path / "centred"
    cfg = config(data, run, steps=2)
    cfg.model.center_text = True
    train(cfg, progress=False)
    facets = TrainConfig.from_toml(run / "config.toml").facets
    table = pq.read_table(sorted((cache / "shards").glob("part-*.parquet")), columns=facets)
    by_facet = [np.stack(table.column(f).to_numpy(zero_copy_only=False)) for f in facets]
    mean = np.mean([v.astype(np.float64).mean(axis=0) for v in by_facet], axis=0)

    exported = load(run)
    np.testing.assert_allclose(exported.model.text_mean.numpy(), mean, atol=1e-5)
    raw = torch.from_numpy(np.stack([v[:5] for v in by_facet], axis=1).astype(np.float32))
    ckpt_model = build_model(cfg.model, raw.shape[-1]).eval()
    load_checkpoint(latest_checkpoint(run), ckpt_model)
    images = torch.zeros(5, 3, 32, 32)
    with torch.no_grad():
        seen = ckpt_model(images, raw)["text_features"]  # what compute_loss receives
    np.testing.assert_allclose(exported.encode_text(raw.numpy()), seen.numpy(), atol=1e-6)
    # text_head "none": the exported text features are the centred vectors, normalised
    centred = raw.double() - torch.from_numpy(mean)
    want = (centred / centred.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(exported.encode_text(raw.numpy()), want, atol=1e-5)


def test_short_training_lifts_held_out_retrieval_above_chance(tmp_path, tiny_model, ray_session):
    """300 steps on 400 synthetic images lift image→text retrieval of 300 held-out pairs above
    chance; text queries = the mean of the vectors of the facets it trained on (FLAME's query).

    conftest's LM is untrained: its last-token vectors carry mostly the prompt and little of
    what an image shows, so at this size R@1 is a lottery on the tokenizer (i2t 0.00-0.07 on
    100 pairs across LM seeds and tokenizer versions, chance 0.01; with a trained LM the demo
    reaches 0.4). The test asks instead for the statistic with the power to check the claim
    here: the true caption's mean rank, scaled to [0, 1] (chance 0.5, standard error of the
    mean 0.289 / sqrt(n)), at least 4 standard errors better than chance. Measured: 0.34-0.38
    (7-10 standard errors) across LM seeds and tokenizer versions.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    from eval.metrics import retrieval_recall
    from store.reader import KeyIndex
    from train.export import load

    synth = tmp_path / "synth"
    write_synth(
        synth,
        SynthConfig(n=400, seed=2, image_size=32, n_retrieval=300, n_zeroshot_per_class=1),
        progress=False,
    )
    cache, held_out = tmp_path / "cache", tmp_path / "held_out"
    run_embed(
        EmbedConfig(synth / "captions.parquet", str(tiny_model), cache, recipe="flame-long"),
        progress=False,
    )
    pairs = synth / "eval" / "retrieval"
    run_embed(
        EmbedConfig(pairs / "captions.parquet", str(tiny_model), held_out, recipe="flame-long"),
        progress=False,
    )

    cfg = config((synth, cache), tmp_path / "run", steps=300, batch_size=64, num_facets=6)
    cfg.optim.warmup_steps, cfg.run.log_every, cfg.run.checkpoint_every = 30, 50, 300
    cfg.model.center_text = True  # the untrained LM's vectors sit in a narrow cone
    train(cfg, progress=False)

    model = load(tmp_path / "run")
    table = pq.read_table(pairs / "captions.parquet").to_pandas()
    n = len(table)
    images = model.encode_image([Image.open(pairs / p) for p in table["image"]])
    vectors = KeyIndex.load(held_out).vectors(table["key"].tolist())
    texts = model.encode_text(np.mean([vectors[f] for f in model.facets], axis=0))
    sim = images @ texts.T
    # 0-based rank of each image's own caption among all n; a tie counts against the model
    rank = (sim >= np.diag(sim)[:, None]).sum(axis=1) - 1
    scaled, chance, stderr = rank.mean() / (n - 1), 0.5, (1 / 12) ** 0.5 / n**0.5
    recall = retrieval_recall(images, texts, np.arange(n))
    print(
        f"held-out mean rank {scaled:.3f} (chance 0.5, {(chance - scaled) / stderr:.1f} "
        f"standard errors); R@1 i2t {recall['i2t_R@1']:.3f} t2i {recall['t2i_R@1']:.3f} "
        f"(chance {1 / n:.4f})"
    )
    assert scaled <= chance - 4 * stderr


def test_eval_writes_reports_and_reuses_its_text_cache(data, tmp_path, ray_session):
    from eval.evaluation import EvalConfig, evaluate
    from eval.metrics import retrieval_recall

    run = tmp_path / "evalrun"
    train(config(data, run), progress=False)
    synth, _ = data
    cfg = EvalConfig(run=run, task="retrieval", data=synth / "eval" / "retrieval", name="ret")
    first = evaluate(cfg)
    assert {p.name for p in first.files} >= {
        "ret.json",
        "ret.md",
        "ret_recall.png",
        "ret_retrieved.png",
    }
    assert first.counts == {"images": 8, "captions": 8, "query": "facets"}
    assert first.chance["t2i_R@1"] == pytest.approx(1 / 8)
    images, texts = first.features
    assert (
        first.metrics["i2t_R@1"] == retrieval_recall(images, texts, np.arange(8), (1,))["i2t_R@1"]
    )
    caches = sorted((run / "eval" / "text").iterdir())
    second = evaluate(cfg)  # the caption vectors come from the text cache: no new embedding
    assert sorted((run / "eval" / "text").iterdir()) == caches
    assert second.metrics == first.metrics
    zs = evaluate(
        EvalConfig(run=run, task="zeroshot", data=synth / "eval" / "zeroshot_shape", name="zs")
    )
    assert zs.counts["classes"] == 9 and zs.chance["top1"] == pytest.approx(1 / 9)
    assert set(zs.metrics["per_class_top1"]) == set(
        (synth / "eval" / "zeroshot_shape" / "classes.txt").read_text().split()
    )
    assert (
        json.loads((run / "eval" / "zs.json").read_text())["metrics"]["top1"] == zs.metrics["top1"]
    )


def test_zeroshot_query_facets_averages_every_trained_facet_of_each_class_prompt(
    data, tmp_path, ray_session
):
    """``--query facets`` for zero-shot: each class prompt (class x template) goes through every
    facet the run trained, as retrieval's captions do; the class vector is the exported text
    side of the facets' mean, averaged over templates. Reference: one plain transformers
    forward pass per standalone sequence ``BOS + prefix + prompt + suffix + facet``. The
    default stays FLAME's raw prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.evaluation import TEMPLATES, EvalConfig, evaluate, run_recipe
    from tests.test_hf_engine import reference_vectors
    from train.export import load

    synth, _ = data
    run = tmp_path / "zsrun"
    cfg = config(data, run, steps=2)
    cfg.model.center_text = True  # the exported text side holds an offset: it must be applied
    train(cfg, progress=False)
    folder = synth / "eval" / "zeroshot_shape"
    facets = evaluate(EvalConfig(run=run, task="zeroshot", data=folder, name="zsf", query="facets"))
    raw = evaluate(EvalConfig(run=run, task="zeroshot", data=folder, name="zsr"))
    assert facets.counts["query"] == "facets" and raw.counts["query"] == "raw"
    assert json.loads((run / "eval" / "zsf.json").read_text())["counts"]["query"] == "facets"

    recipe = run_recipe(run)
    (group,) = recipe.groups  # flame-long: the 7 long facets, every one trained here
    assert recipe.layer == -1 and recipe.pooling == "last"
    exported = load(run)
    assert set(exported.facets) == set(group.facets)
    llm = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(recipe.model)
    classes = (folder / "classes.txt").read_text().split()
    rows = [{group.column: t.format(c)} for c in classes for t in TEMPLATES]
    # one row per (class, template), one vector per facet in the group's order
    states = reference_vectors((llm, tok), recipe, rows, recipe.layer)
    states = states.reshape(len(classes), len(TEMPLATES), len(group.facets), -1)
    if recipe.normalize:
        states = states / np.linalg.norm(states, axis=-1, keepdims=True)
    per_template = exported.encode_text(states.mean(axis=2).reshape(len(rows), -1))
    want = per_template.reshape(len(classes), len(TEMPLATES), -1).mean(axis=1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    images, got = facets.features
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the raw prompt gives other class vectors, and top-1 follows each set of vectors
    assert np.abs(raw.features[1] - got).max() > 1e-2
    labels = np.array([classes.index(p.parent.name) for p in sorted(folder.glob("*/*.jpg"))])
    assert len(labels) == len(images)
    assert facets.metrics["top1"] == pytest.approx(
        float(((images @ got.T).argmax(1) == labels).mean())
    )
