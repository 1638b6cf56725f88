"""`facetclip plan`: its token counts are the engines' own, its math matches hand computations,
and bad input gets a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from embed.packing import facet_allowed, pack_item
from embed.pipeline import EmbedConfig, run_embed
from embed.plan import (
    ModelShape,
    PlanConfig,
    cache_bytes,
    forward_flops,
    gpu_hours,
    make_plan,
    naive_attention_pairs,
    packed_attention_pairs,
    safetensors_layer_params,
    vector_bytes,
)
from embed.prompts import get_recipe
from embed.tokenize import PromptTokenizer
from store.errors import InputError


@pytest.fixture(scope="module")
def captions(synth_data):
    return synth_data / "captions.parquet"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, captions, tiny_model):
    """The hf engine's own run over every caption (float16 cache)."""
    out = tmp_path_factory.mktemp("caches") / "flame"
    summary = run_embed(
        EmbedConfig(captions, str(tiny_model), out, recipe="flame", shard_rows=1000),
        progress=False,
    )
    return out, summary


@pytest.fixture(scope="module")
def whole(captions, tiny_model):
    return make_plan(PlanConfig(captions, str(tiny_model), "flame"))


def test_token_counts_are_the_engines_own(captions, tiny_model, embedded, whole):
    _, summary = embedded
    frame = pd.read_parquet(captions)
    recipe = get_recipe("flame")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [[r[g.column] for g in recipe.groups] for r in frame.to_dict("records")]
    items = [it for e in PromptTokenizer(tok, recipe).encode(rows) for it in e.items]

    # Packed: what `embed` reports as tokens computed, and each item's packed length.
    assert whole.rows == whole.sample.rows == whole.total.embedded == len(frame)
    assert whole.sample.packed == summary.tokens == sum(it.packed_length for it in items)

    # Naive: every facet's standalone sequence BOS + prefix + caption + suffix + facet,
    # tokenised here as one string, straight from the recipe's strings.
    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    naive = 0
    for r in frame.to_dict("records"):
        for g in recipe.groups:
            caption = r[g.column].strip()
            caption = (caption if caption[-1] in ".?\"'" else caption + ".").replace('"', "'")
            naive += sum(1 + len(ids(g.prefix + caption + g.suffix + f)) for f in g.facets.values())
    assert whole.sample.naive == naive
    assert naive > 3 * whole.sample.packed  # 11 facets: packing saves most of the tokens
    print(f"\ntokens on {len(frame)} synthetic captions: packed {summary.tokens}, naive {naive}")


def test_attention_pairs_count_the_mask(captions, tiny_model):
    """The attention term's pair count equals the allowed entries of the engines' own mask."""
    from transformers import AutoTokenizer

    recipe = get_recipe("flame")
    frame = pd.read_parquet(captions).head(3)
    rows = [[r[g.column] for g in recipe.groups] for r in frame.to_dict("records")]
    tokenizer = PromptTokenizer(AutoTokenizer.from_pretrained(tiny_model), recipe)
    for e in tokenizer.encode(rows):
        for it in e.items:
            _, seg, _ = pack_item(it)
            allowed = facet_allowed(torch.tensor([seg]))
            assert packed_attention_pairs(it) == int(allowed.sum())
            standalone = [len(it.standalone(k)) for k in range(len(it.facets))]
            causal = sum(int(torch.ones(n, n).tril().sum()) for n in standalone)
            assert naive_attention_pairs(it) == causal


def test_cache_size_matches_a_real_cache(embedded, whole):
    out, summary = embedded
    files = sorted((out / "shards").glob("*.parquet"))
    vector_cols = set(get_recipe("flame").vector_names)
    vec = 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                if col.path_in_schema.split(".")[0] in vector_cols:
                    vec += col.total_compressed_size
    est_vec = summary.rows * 11 * vector_bytes("float16", 64)
    # Only Parquet's list levels and page headers come on top (0.05 % at D = 5120).
    assert est_vec <= vec <= 1.05 * est_vec
    # Texts are counted uncompressed, so the estimate bounds the real files from above.
    real = sum(f.stat().st_size for f in files)
    assert real <= whole.cache_bytes["float16"] <= 1.6 * real


def test_params_from_config_headers_and_weights_agree(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = ModelShape.from_config(AutoConfig.from_pretrained(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    in_layers = sum(
        p.numel() for n, p in model.named_parameters() if ".layers." in n and p.ndim == 2
    )
    assert shape.num_layers * shape.active_params_per_layer() == in_layers
    assert safetensors_layer_params(tiny_model, shape.num_layers) == in_layers
    assert safetensors_layer_params(tiny_model, 2) == in_layers // shape.num_layers * 2
    assert shape.total_params() == sum(p.numel() for p in model.parameters())  # tied: once


def test_mistral_nemo_by_hand():
    # config.json of mistralai/Mistral-Nemo-Instruct-2407
    cfg = SimpleNamespace(hidden_size=5120, num_hidden_layers=40, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                          vocab_size=131072, tie_word_embeddings=False)  # fmt: skip
    shape = ModelShape.from_config(cfg)
    attention = 5120 * 4096 + 2 * 5120 * 1024 + 4096 * 5120  # q, k, v (8 kv heads), o
    mlp = 3 * 5120 * 14336
    assert shape.active_params_per_layer() == attention + mlp == 272_629_760
    embeddings_and_head = 2 * 131072 * 5120
    assert shape.total_params() == 40 * (attention + mlp + 2 * 5120) + 5120 + embeddings_and_head
    assert shape.total_params() == 12_247_782_400  # "12B"
    assert shape.attention_width == 4096


def test_cost_math_by_hand():
    # 2 FLOPs per weight per token + 4 FLOPs per attended pair per unit of width per layer
    assert forward_flops(tokens=1000, pairs=5000, params=10, layers=2, attention_width=8) == (
        2 * 10 * 1000 + 4 * 2 * 8 * 5000
    )
    # 989 TFLOP/s x 0.4 x 3600 s = 1.42416e18 FLOPs per GPU-hour
    assert gpu_hours(2.5 * 1.42416e18, "h100", 0.4) == pytest.approx(2.5)
    assert gpu_hours(2.5 * 1.42416e18, "h200", 0.4) == pytest.approx(2.5)
    assert gpu_hours(312e12 * 3600, "a100", 1.0) == pytest.approx(1.0)
    assert [vector_bytes(d, 5120) for d in ("float32", "float16", "int8")] == [20480, 10240, 5124]
    # two rows of 11 float16 vectors, 3 int32 token counts and a flag; 18 key + 100 text bytes
    assert cache_bytes("float16", 5120, 11, 2, 18, 100, 3) == 2 * (11 * 10240 + 12 + 1) + 118


def test_sample_extrapolates(captions, tiny_model, whole):
    half = make_plan(PlanConfig(captions, str(tiny_model), "flame", sample=60))
    assert (half.rows, half.rows_from, half.sample.rows) == (120, "Parquet footers", 60)
    assert half.total.packed == round(half.sample.packed * 2)
    assert half.total.packed == pytest.approx(whole.total.packed, rel=0.05)
    assert half.flops == pytest.approx(whole.flops, rel=0.05)


def test_jsonl_needs_rows_unless_read_whole(tmp_path, captions, tiny_model):
    frame = pd.read_parquet(captions)
    frame.loc[5, "long_caption"] = "  "  # embed skips it; so must plan
    jsonl = tmp_path / "caps.jsonl"
    frame.to_json(jsonl, orient="records", lines=True)
    with pytest.raises(InputError, match="--rows"):
        make_plan(PlanConfig(jsonl, str(tiny_model), "flame", sample=50))
    p = make_plan(PlanConfig(jsonl, str(tiny_model), "flame", sample=50, rows=1000))
    assert (p.rows, p.rows_from, p.total.rows) == (1000, "--rows", 1000)
    p = make_plan(PlanConfig(jsonl, str(tiny_model), "flame"))
    assert (p.rows, p.rows_from, p.sample.embedded) == (120, "whole input read", 119)


def test_plans_without_weights(tmp_path, captions, tiny_model, whole):
    """config.json and the tokenizer suffice; the count then comes from the config."""
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    p = make_plan(PlanConfig(captions, str(bare), "flame"))
    assert (p.params_from, whole.params_from) == ("config.json", "safetensors headers")
    assert p.params_per_token == whole.params_per_token
    assert p.flops == whole.flops


def test_layer_truncates_the_cost(captions, tiny_model, whole):
    p = make_plan(PlanConfig(captions, str(tiny_model), "flame", layer=2))
    assert (p.layers_run, whole.layers_run) == (2, 4)
    assert p.flops == pytest.approx(whole.flops / 2)


def test_cli_json_and_table(captions, tiny_model, whole):
    runner = CliRunner()
    args = ["plan", str(captions), "--model", str(tiny_model), "--recipe", "flame"]
    r = runner.invoke(app, [*args, "--gpu", "h200", "--gpus", "8", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["total"]["packed"] == whole.total.packed and d["gpu"] == "h200"
    assert d["wall_hours"] == pytest.approx(d["gpu_hours"] / 8)
    assert set(d["cache_bytes"]) == {"float16", "float32", "int8"}
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    per_row = f"{whole.sample.packed / whole.sample.embedded:,.1f} per row"
    for text in ("tokens, packed", "naive K passes", "GPU-hours", "cache, int8", per_row):
        assert text in r.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gpu", "v100"], "unknown --gpu 'v100'; choose one of h100, h200, a100"),
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--mfu", "1.5"], "--mfu is a fraction"),
        (["--sample", "0"], "--sample must be at least 1"),
        (["--recipe", "nope"], "unknown recipe 'nope'"),
        (["--column", "nope=x"], "not columns of recipe"),
    ],
)
def test_cli_bad_options(captions, tiny_model, extra, message):
    r = CliRunner().invoke(app, ["plan", str(captions), "--model", str(tiny_model), *extra])
    assert r.exit_code == 2
    assert message in _stderr(r) and "Traceback" not in r.output


def _stderr(r) -> str:
    return " ".join(r.stderr.split())  # rich wraps long lines


def test_cli_bad_inputs(tmp_path, tiny_model):
    runner = CliRunner()
    r = runner.invoke(app, ["plan", str(tmp_path / "missing.parquet"), "--model", str(tiny_model)])
    assert r.exit_code == 2 and "does not exist" in _stderr(r)
    other = tmp_path / "other.parquet"
    pd.DataFrame({"key": ["a"], "text": ["A star."]}).to_parquet(other)
    r = runner.invoke(app, ["plan", str(other), "--model", str(tiny_model)])
    assert r.exit_code == 2 and "not found" in _stderr(r) and "--column" in _stderr(r)
    mapped = ["--recipe", "prompteol", "--column", "long_caption=text"]
    r = runner.invoke(app, ["plan", str(other), "--model", str(tiny_model), *mapped, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["vectors_per_row"] == 1
    r = runner.invoke(app, ["plan", str(other), "--model", str(tmp_path / "no-model"), *mapped])
    assert r.exit_code == 2 and "no-model" in _stderr(r)
    empty = Path(tmp_path / "empty.jsonl")
    empty.write_text("")
    r = runner.invoke(app, ["plan", str(empty), "--model", str(tiny_model), "--recipe", "flame"])
    assert r.exit_code == 2 and "not found" in _stderr(r)
