"""P-Former (issue 14): the three loss terms against hand computations, the prompted forward
pass against a model whose embedding rows are the prompts, the predictor's ids against the
embed tokenizer's, `embed --recipe pformer` (both forms) deterministic and resumable, and bad
input getting one line. Small untrained models throughout; Ray training runs are marked slow."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from embed.pformer_model import (
    IGNORE,
    PredictorConfig,
    caption_token_ids,
    contrastive_loss,
    llm_target_ids,
    load_predictor,
    mask_tokens,
    nearest_row_loss,
    new_predictor,
    pad_batch,
    prompted_logits,
    reconstruction_loss,
    save_predictor,
    shifted_targets,
)
from embed.pipeline import EmbedConfig, run_embed
from embed.prompts import RecipeError, get_recipe
from store.prompts import expand_codes, iter_prompts

REPO = Path(__file__).parents[1]
TEXTS = [
    "A red star above a blue circle.",
    "The image shows a huge green square with stripes, placed near the centre of the frame.",
    'A "tiny" heart.',
]


@pytest.fixture(scope="module")
def llm(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_model)


def small_config(**kw) -> PredictorConfig:
    return PredictorConfig(
        width=32, layers=1, heads=2, ffn=64, n_prompts=4, proj_dim=16, max_caption_tokens=12, **kw
    )


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, llm, tiny_model):
    """An untrained (seeded) predictor saved the way `facetclip pformer` exports one."""
    model, tok = llm
    torch.manual_seed(0)
    pf, enc_tok = new_predictor(small_config(), tok, model.config.hidden_size)
    out = tmp_path_factory.mktemp("pf") / "predictor"
    return save_predictor(out, pf, enc_tok, {"llm": str(tiny_model), "llm_width": 64, "steps": 0})


@pytest.fixture(scope="module")
def captions(synth_data):
    return synth_data / "captions.parquet"


# --- the loss terms, by hand ------------------------------------------------------------------


def test_reconstruction_loss_is_the_mean_cross_entropy_of_the_kept_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 4, IGNORE], [0, IGNORE, IGNORE]])
    terms = []
    for b in range(2):
        for t in range(3):
            if targets[b, t] != IGNORE:
                row = logits[b, t].tolist()
                lse = math.log(sum(math.exp(x) for x in row))
                terms.append(lse - row[targets[b, t]])
    assert reconstruction_loss(logits, targets).item() == pytest.approx(sum(terms) / 3, rel=1e-6)


def test_shifted_targets_predict_the_next_token_and_ignore_padding():
    ids, mask = pad_batch([[1, 7, 8, 2], [1, 9, 2]], pad_id=0)
    assert shifted_targets(ids, mask).tolist() == [[7, 8, 2], [9, 2, IGNORE]]


def test_contrastive_loss_matches_smoothed_cross_entropy_by_hand():
    torch.manual_seed(1)
    a = torch.nn.functional.normalize(torch.randn(2, 3), dim=-1)
    b_all = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    temp, offset, eps = 0.1, 2, 0.1
    total = 0.0
    for i in range(2):
        s = [float(a[i] @ b_all[j]) / temp for j in range(4)]
        lse = math.log(sum(math.exp(x) for x in s))
        logp = [x - lse for x in s]
        # label smoothing: (1 - eps) on the positive, eps spread evenly over all M classes
        total += -((1 - eps) * logp[offset + i] + eps / 4 * sum(logp))
    got = contrastive_loss(a, b_all, torch.tensor(temp), offset, eps)
    assert got.item() == pytest.approx(total / 2, rel=1e-5)


def test_nearest_row_loss_pulls_each_prompt_to_its_nearest_row_only():
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]], requires_grad=True)
    prompts = torch.tensor([[[0.9, 0.2], [0.1, 1.4], [-0.3, 0.1]]], requires_grad=True)
    nearest = [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]  # by Euclidean distance, worked out by hand
    sq = [(p - r) ** 2 for pv, rv in zip(prompts[0].tolist(), nearest, strict=True)
          for p, r in zip(pv, rv, strict=True)]  # fmt: skip
    loss = nearest_row_loss(prompts, table)
    assert loss.item() == pytest.approx(sum(sq) / len(sq), rel=1e-6)
    loss.backward()
    want = 2 * (prompts.detach() - torch.tensor([nearest])) / len(sq)
    assert torch.allclose(prompts.grad, want)
    assert table.grad is None  # the LLM's rows are targets, never moved


def test_masking_hits_caption_tokens_only():
    cfg = small_config()
    cfg.prefix_ids, cfg.suffix_ids, cfg.mask_id = [100], [101], 102
    ids, mask = pad_batch([[100, 5, 6, 7, 101], [100, 8, 101]], pad_id=0)
    out = mask_tokens(ids, mask, cfg, 0.999999, torch.Generator().manual_seed(0))
    assert out.tolist() == [[100, 102, 102, 102, 101], [100, 102, 101, 0, 0]]
    assert torch.equal(mask_tokens(ids, mask, cfg, 0.0, torch.Generator()), ids)
    rate = mask_tokens(torch.full((200, 50), 5), torch.ones(200, 50, dtype=torch.long), cfg, 0.25,
                       torch.Generator().manual_seed(1))  # fmt: skip
    assert 0.23 < float((rate[:, 1:-1] == 102).float().mean()) < 0.27


# --- the prompted forward pass ----------------------------------------------------------------


def test_prompts_as_inputs_embeds_equal_a_model_whose_embedding_rows_are_the_prompts(llm):
    model, tok = llm
    emb = model.get_input_embeddings().weight
    vocab, d = emb.shape
    n = 3
    torch.manual_seed(2)
    prompts = torch.randn(2, n, d) * emb.std()
    caption_ids = caption_token_ids(tok, TEXTS[:2], "flame", 40)[0]
    ids, mask = pad_batch(llm_target_ids(tok, caption_ids), tok.pad_token_id)
    got = prompted_logits(model, prompts, ids, mask)
    for b in range(2):
        # An equivalent model: N extra embedding rows holding caption b's prompts, read by id.
        ref = copy.deepcopy(model)
        table = torch.nn.Embedding(vocab + n, d)
        table.weight.data = torch.cat([emb.detach(), prompts[b]])
        ref.set_input_embeddings(table)
        length = int(mask[b].sum())
        seq = torch.tensor([[*range(vocab, vocab + n), *ids[b, :length].tolist()]])
        want = ref(input_ids=seq).logits[0, n : n + length - 1]
        assert torch.allclose(got[b, : length - 1], want, atol=1e-5), b


def test_no_prompt_equals_the_plain_forward_pass(llm):
    model, tok = llm
    ids, mask = pad_batch(llm_target_ids(tok, caption_token_ids(tok, TEXTS[:1], "flame", 40)[0]), 0)
    got = prompted_logits(model, torch.zeros(1, 0, 64), ids, mask)
    assert torch.allclose(got, model(input_ids=ids).logits[:, :-1], atol=1e-5)


# --- the predictor -----------------------------------------------------------------------------


def test_numpy_head_expands_codes_like_the_predictor(predictor):
    pf = load_predictor(predictor)
    codes = pf.predict_codes(TEXTS)
    head = {k: v.numpy() for k, v in pf.model.head_state().items()}
    want = pf.predict_prompts(TEXTS).numpy()
    assert want.shape == (3, 4, 64)
    assert np.allclose(expand_codes(codes.numpy(), head), want, atol=1e-5)


def test_a_captions_prompts_do_not_depend_on_its_batch_mates(predictor):
    pf = load_predictor(predictor)
    together = pf.predict_prompts(TEXTS)
    alone = torch.cat([pf.predict_prompts([t]) for t in TEXTS])
    assert torch.allclose(together, alone, atol=1e-5)


def test_training_and_embed_tokenise_captions_identically(predictor):
    from embed.tokenize import PromptTokenizer

    pf = load_predictor(predictor)
    recipe = replace(get_recipe("pformer"), cleanup=pf.cfg.cleanup,
                     max_caption_tokens=pf.cfg.max_caption_tokens, prompts=4)  # fmt: skip
    encoded = PromptTokenizer(pf.tokenizer, recipe).encode([[t] for t in TEXTS])
    spans = [list(e.items[0].context[slice(*e.items[0].caption_span)]) for e in encoded]
    assert spans == pf.token_ids(TEXTS)
    assert any(e.truncated for e in encoded)  # the 12-token limit cut the long caption


def test_gradient_reaches_the_predictor_through_the_frozen_llm(llm):
    """A few steps on one batch: the reconstruction loss falls, the gradient reaches the
    encoder's first layer, and the LLM's weights never change."""
    model, tok = llm
    torch.manual_seed(3)
    pf, _ = new_predictor(small_config(dropout=0.0), tok, model.config.hidden_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = caption_token_ids(tok, TEXTS, "flame", 12)[0]
    enc, enc_mask = pf.encoder_batch(ids)
    llm_ids, llm_mask = pad_batch(llm_target_ids(tok, ids), 0)
    opt = torch.optim.Adam(pf.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        prompts = pf(enc, enc_mask)["prompts"]
        loss = reconstruction_loss(prompted_logits(model, prompts, llm_ids, llm_mask),
                                   shifted_targets(llm_ids, llm_mask))  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < min(losses[:5])
    assert pf.encoder.tokens.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batch_rows_are_disjoint_across_workers_and_cover_an_epoch():
    from embed.pformer import batch_rows

    n, bs, world = 50, 8, 2
    per_epoch = n // bs
    seen = []
    for step in range(per_epoch):
        parts = [batch_rows(n, bs, 7, step, r, world) for r in range(world)]
        assert all(len(p) == bs // world for p in parts)
        seen += [int(i) for p in parts for i in p]
    assert len(set(seen)) == len(seen) == per_epoch * bs  # no row twice in an epoch
    assert np.array_equal(batch_rows(n, bs, 7, 3, 1, 2), batch_rows(n, bs, 7, 3, 1, 2))
    assert not np.array_equal(batch_rows(n, bs, 7, per_epoch, 0, 1), batch_rows(n, bs, 7, 0, 0, 1))


def test_config_round_trips_through_toml_and_set(tmp_path):
    from embed.pformer import PFormerConfig

    cfg = PFormerConfig(captions="c.parquet", model="m", out="o").override(
        ["loss.nearest=0", "predictor.n_prompts=8", "loss.views=self", "run.fault_step=3"]
    )
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    back = PFormerConfig.from_toml(tmp_path / "c.toml")
    assert back == cfg and back.loss.nearest == 0 and back.predictor.n_prompts == 8
    with pytest.raises(Exception, match="unknown field"):
        cfg.override(["loss.nope=1"])


# --- recipes and the cache ----------------------------------------------------------------------


def test_pformer_recipes_validate_and_leave_other_recipes_unchanged():
    assert "prompts" not in get_recipe("flame").to_dict()  # old caches' recipe.toml still match
    assert get_recipe("pformer").to_dict()["prompts"] == 0
    assert replace(get_recipe("pformer"), prompts=32).vector_names[31] == "prompt_31"
    assert get_recipe("pformer-code").vector_names == ["code"]
    with pytest.raises(RecipeError, match="normalize = false"):
        replace(get_recipe("pformer"), normalize=True)
    with pytest.raises(RecipeError, match="column only"):
        g = get_recipe("pformer").groups[0]
        replace(get_recipe("pformer"), groups=(replace(g, prefix="Caption: "),))


def embed(captions, predictor, out, recipe="pformer", **kw):
    cfg = EmbedConfig(captions=captions, model=str(predictor), out=out, recipe=recipe, **kw)
    return run_embed(cfg, progress=False)


@pytest.fixture(scope="module")
def prompt_caches(tmp_path_factory, captions, predictor):
    root = tmp_path_factory.mktemp("caches")
    embed(captions, predictor, root / "full", shard_rows=40)
    embed(captions, predictor, root / "code", recipe="pformer-code", shard_rows=40)
    return root / "full", root / "code"


def test_cached_prompts_are_the_predictors_in_both_forms(prompt_caches, captions, predictor):
    full, code = prompt_caches
    table = pq.read_table(captions, columns=["key", "long_caption"])
    pf = load_predictor(predictor)
    want = pf.predict_prompts(table.column("long_caption").to_pylist()).numpy()
    for cache in (full, code):
        keys, prompts = zip(*iter_prompts(cache), strict=True)
        assert sum(keys, []) == table.column("key").to_pylist()
        got = np.concatenate(prompts)
        assert got.shape == want.shape == (len(table), 4, 64)
        # float16 storage: the full form rounds each prompt, the compact form each code.
        assert np.allclose(got, want, atol=2e-3 * np.abs(want).max()), cache
    # Read back independently: DuckDB sees one FLOAT[64] column per prompt.
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{full}/shards/*.parquet') "
                   "WHERE len(prompt_03) = 64").fetchall()[0][0]  # fmt: skip
    assert n == len(table)
    recipe = (full / "recipe.toml").read_text()
    assert "prompts = 4" in recipe and pf.cfg.cleanup in recipe and "sha256:" in recipe


def test_inspect_sql_verify_neighbors_work_on_prompt_caches(prompt_caches):
    runner = CliRunner()
    for cache in prompt_caches:
        for args in (["verify", str(cache)], ["inspect", str(cache)],
                     ["sql", str(cache), "SELECT count(*) AS n FROM embeddings"]):  # fmt: skip
            r = runner.invoke(app, args)
            assert r.exit_code == 0, (args, r.output)
        key = pq.read_table(next((cache / "shards").glob("*.parquet")), columns=["key"])[0][0]
        r = runner.invoke(app, ["neighbors", str(cache), str(key), "-k", "2"])
        assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_embed_pformer_is_deterministic_and_a_killed_run_resumes_to_the_same_cache(
    tmp_path, captions, predictor, prompt_caches
):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "cli", "embed", str(captions), "--model", str(predictor), "--out", str(out),
           "--recipe", "pformer", "--shard-rows", "40", "--no-progress"]  # fmt: skip
    env = {**os.environ, "FACETCLIP_KILL_AFTER_SHARDS": "1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, cwd=REPO)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 1
    env.pop("FACETCLIP_KILL_AFTER_SHARDS")
    done = subprocess.run(cmd, env=env, capture_output=True, cwd=REPO)
    assert done.returncode == 0, done.stderr.decode()
    assert "rows from earlier runs" in done.stdout.decode()

    def frame(cache):
        return duckdb.sql(
            f"SELECT * FROM read_parquet('{cache}/shards/*.parquet') ORDER BY key"
        ).df()

    got, clean = frame(out), frame(prompt_caches[0])  # the killed run vs a clean in-process run
    assert list(got["key"]) == list(clean["key"])
    for name in ("prompt_00", "prompt_03"):
        assert np.array_equal(np.stack(got[name]), np.stack(clean[name]))


# --- bad input: one line --------------------------------------------------------------------------


def one_line_error(args: list[str]) -> str:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return " ".join(r.output.split())  # rich wraps a long line at the terminal width


def test_bad_input_gets_one_line(tmp_path, captions, predictor, tiny_model):
    out = str(tmp_path / "c")
    msg = one_line_error(["embed", str(captions), "--model", str(tiny_model), "--out", out,
                          "--recipe", "pformer"])  # fmt: skip
    assert "is not a P-Former predictor" in msg
    msg = one_line_error(["embed", str(captions), "--model", str(predictor), "--out", out,
                          "--recipe", "pformer", "--engine", "vllm"])  # fmt: skip
    assert "not vLLM" in msg
    base = ["pformer", str(captions), "--model", str(tiny_model), "--out", str(tmp_path / "pf")]
    assert "not found" in one_line_error([*base, "--column", "nope"])
    assert "needs at least" in one_line_error([*base, "--batch-size", "1000"])
    assert "views must be one of" in one_line_error([*base, "--views", "both"])
    assert "--pair-column" in one_line_error([*base, "--views", "column"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in one_line_error(
        ["pformer", str(captions), "--model", str(empty), "--out", str(tmp_path / "pf2")]
    )
    assert "nothing to resume" in one_line_error(["pformer", "--resume", str(tmp_path)])


# --- training through Ray --------------------------------------------------------------------------


def tiny_run(captions, model, out, **kw):
    from embed.pformer import PFormerConfig

    cfg = PFormerConfig(captions=str(captions), model=str(model), out=str(out), steps=6,
                        batch_size=8, val_rows=8, predictor=small_config())  # fmt: skip
    cfg.run.checkpoint_every, cfg.run.log_every = 3, 1
    for k, v in kw.items():
        section, _, name = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, v)
    return cfg


@pytest.mark.slow
def test_training_runs_resumes_after_a_killed_worker_and_exports(tmp_path, captions, tiny_model):
    from embed.pformer import train_pformer

    clean = train_pformer(tiny_run(captions, tiny_model, tmp_path / "a"), progress=False)
    faulty = train_pformer(tiny_run(captions, tiny_model, tmp_path / "b", run__fault_step=3),
                           progress=False)  # fmt: skip
    assert (tmp_path / "b" / ".fault_injected").is_file()  # a worker really died at step 3
    assert clean.steps == faulty.steps == 6
    a, b = load_predictor(clean.predictor), load_predictor(faulty.predictor)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # the replayed steps logged once
    assert {"loss_lm", "loss_contrastive", "loss_nearest", "val_token_acc"} <= set(rows[-1])
    assert (tmp_path / "a" / "plots" / "loss.png").is_file()
    assert a.predict_prompts(TEXTS).shape == (3, 4, 64)
    from rich.console import Console

    from embed.pformer import render_pformer

    console = Console(record=True, width=120)
    console.print(render_pformer(clean))
    assert "held-out token accuracy" in console.export_text()
    # --resume with more steps continues from the last checkpoint
    from embed.pformer import PFormerConfig

    more = train_pformer(PFormerConfig(out=str(tmp_path / "a"), steps=8), resume=True,
                         progress=False)  # fmt: skip
    assert more.steps == 8


def test_plan_states_both_forms_per_row_as_the_caches_store_them(
    prompt_caches, captions, predictor
):
    from embed.plan import PlanConfig, make_plan

    plan = make_plan(PlanConfig(captions=captions, model=str(predictor), recipe="pformer"))
    assert (plan.vectors_per_row, plan.dim) == (4, 64)
    per_row = dict(zip(("full", "code", "head"), plan.prompt_forms.values(), strict=True))
    assert per_row["full"] == 4 * 64 * 2 and per_row["code"] == 32 * 2
    # The vector columns as written (uncompressed, float16): the same bytes per row, plus
    # what Parquet adds: run-length repetition levels of each list (a few bytes per vector)
    # and page headers (at most a few hundred bytes per column chunk).
    for cache, names, want, n_vec in ((prompt_caches[0], "prompt_", per_row["full"], 4),
                                      (prompt_caches[1], "code", per_row["code"], 1)):  # fmt: skip
        size = rows = chunks = 0
        for shard in (cache / "shards").glob("*.parquet"):
            meta = pq.ParquetFile(shard).metadata
            rows += meta.num_rows
            for g in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    col = meta.row_group(g).column(c)
                    if col.path_in_schema.startswith(names):
                        size += col.total_uncompressed_size
                        chunks += 1
        assert 0 <= size - rows * want <= 4 * n_vec * rows + 200 * chunks, (cache, size / rows)
    head = (prompt_caches[1] / "pformer_head.safetensors").stat().st_size
    assert per_row["head"] <= head < per_row["head"] + 2048  # + the safetensors header


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, captions):
    """A small untrained BERT with a WordPiece tokenizer ([CLS], [SEP], [MASK]) in HF format:
    what `--encoder bert-base-uncased` loads, minus the download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    texts = pq.read_table(captions, columns=["long_caption"]).column(0).to_pylist()
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials)
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))  # fmt: skip
    out = tmp_path_factory.mktemp("bert") / "bert"
    bert.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_hugging_face_encoder_reads_its_own_tokens_and_reloads_from_its_config(
    tmp_path, tiny_bert, llm, tiny_model, captions
):
    model, tok = llm
    cfg = small_config(encoder=str(tiny_bert))
    pf, enc_tok = new_predictor(cfg, tok, model.config.hidden_size)
    assert cfg.width == 32 and cfg.prefix_ids == [enc_tok.cls_token_id]
    assert cfg.suffix_ids == [enc_tok.sep_token_id] and cfg.mask_id == enc_tok.mask_token_id
    pf.eval()
    ids = caption_token_ids(enc_tok, TEXTS, cfg.cleanup, cfg.max_caption_tokens)[0]
    enc, mask = pf.encoder_batch(ids)
    assert (
        enc[0, 0] == enc_tok.cls_token_id and enc[0, int(mask[0].sum()) - 1] == enc_tok.sep_token_id
    )
    want = pf.expand(pf.encode(enc, mask)).detach()
    path = save_predictor(tmp_path / "pf", pf, enc_tok, {"llm": str(tiny_model), "llm_width": 64})
    loaded = load_predictor(path)  # rebuilt from predictor.json, weights from safetensors
    assert torch.allclose(loaded.predict_prompts(TEXTS), want, atol=1e-5)
    embed(captions, path, tmp_path / "cache", limit=10)
    got = np.concatenate([p for _, p in iter_prompts(tmp_path / "cache")])
    texts = pq.read_table(captions, columns=["long_caption"]).column(0).to_pylist()[:10]
    assert np.allclose(got, loaded.predict_prompts(texts).numpy(), atol=2e-3)


@pytest.mark.parametrize("views", ["masked", "self", "column"])
def test_a_training_step_sums_the_three_terms_with_their_weights(llm, views):
    from embed.pformer import PFormerConfig, Ragged, make_batch, step_losses

    model, tok = llm
    torch.manual_seed(4)
    pf, _ = new_predictor(small_config(), tok, model.config.hidden_size)
    ids = caption_token_ids(tok, TEXTS, "flame", 12)[0]
    pair = caption_token_ids(tok, ["a star.", "a square.", "a heart."], "flame", 12)[0]
    data = {"enc_ids": Ragged.of(ids), "llm_ids": Ragged.of(llm_target_ids(tok, ids)),
            "pair_ids": Ragged.of(pair)}  # fmt: skip
    cfg = PFormerConfig(predictor=pf.cfg)
    cfg.loss.views, cfg.loss.lm, cfg.loss.contrastive, cfg.loss.nearest = views, 2.0, 0.5, 3.0
    batch = make_batch(data, [0, 1, 2], cfg, pf.cfg, 0, torch.Generator().manual_seed(0), "cpu")
    first = batch["enc_ids"]
    if views == "self":
        assert "view_ids" not in batch
    elif views == "masked":  # the same captions, masked independently
        assert torch.equal(batch["view_mask"], batch["enc_mask"])
        assert not torch.equal(batch["view_ids"], first)
    else:  # the paired column's captions
        assert batch["view_ids"].shape[1] < first.shape[1]
    pf.eval()  # no dropout: the terms can be recomputed here exactly
    got = step_losses(pf, model, model.get_input_embeddings().weight, batch, cfg, offset=0)
    want = 2.0 * got["loss_lm"] + 0.5 * got["loss_contrastive"] + 3.0 * got["loss_nearest"]
    assert torch.allclose(got["loss"], want)
    out = pf(batch["enc_ids"], batch["enc_mask"], batch.get("view_ids"), batch.get("view_mask"))
    positives = out["proj"] if views == "self" else out["view_proj"]
    con = contrastive_loss(out["proj"], positives, out["temp"], 0, 0.1)
    assert torch.allclose(got["loss_contrastive"], con)


def test_reconstruction_check_against_a_plain_forward_pass(predictor, synth_data, tiny_model):
    """The no-prompt condition, recomputed with input ids through a plain forward pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.prompt_reconstruction import CONDITIONS, reconstruction_check

    split = synth_data / "eval" / "retrieval" / "captions.parquet"
    r = reconstruction_check(predictor, split, synth_data / "labels.parquet", n=6, batch_size=4)
    assert set(r.conditions) == set(CONDITIONS) and r.captions == 6
    assert r.chance_main_object == pytest.approx(1 / 9)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    texts = pq.read_table(split, columns=["long_caption"]).column(0).to_pylist()[:6]
    correct = total = 0
    for ids in caption_token_ids(tok, texts, "flame", 12)[0]:
        seq = torch.tensor([[tok.bos_token_id, *ids]])
        pred = model(input_ids=seq).logits[0, :-1].argmax(-1)
        correct += int((pred == seq[0, 1:]).sum())
        total += len(ids)
    assert r.conditions["none"]["token_acc"] == pytest.approx(correct / total)
    assert "| predicted |" in r.table()
