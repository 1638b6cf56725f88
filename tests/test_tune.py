"""`facetclip tune` (LLM2CLIP's caption-contrastive LoRA stage): the loss against a
hand-computed reference, its gradient through the cross-worker gather against one process,
what is tuned against what the hf engine embeds, the merged model against base + adapter,
resume after a kill, and bad input refused in one line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from embed.tune import (
    ADAPTER_DIR,
    CRA_FILE,
    RUN_DIR,
    TuneConfig,
    TuneError,
    average_gradients,
    caption_contrastive_loss,
    length_groups,
    retrieval_accuracy,
    run_tune,
    step_batch,
)


def _config(captions, model, out, **over) -> TuneConfig:
    """A few steps on the 120-row synthetic set; a high lr so the adapters move visibly."""
    cfg = TuneConfig(captions=str(captions), model=str(model), out=str(out), steps=4,
                     batch_size=8, eval_pairs=16, seed=3)  # fmt: skip
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 1
    cfg.run.log_every, cfg.run.checkpoint_every = 1, 2
    for k, v in over.items():
        section, _, name = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, v)
    return cfg


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, synth_data, tiny_model, ray_session):
    out = tmp_path_factory.mktemp("tune") / "tuned"
    result = run_tune(_config(synth_data / "captions.parquet", tiny_model, out), progress=False)
    return out, result


# --- the loss ---------------------------------------------------------------------------------


def test_loss_equals_a_hand_computed_reference():
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    cos = [[np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for b in p] for a in q]
    s = 50.0

    def nll(rows):  # mean over i of -log softmax(row i)[i]
        return np.mean(
            [-s * r[i] + math.log(sum(math.exp(s * x) for x in r)) for i, r in enumerate(rows)]
        )

    expected_q2p = nll(cos)
    expected_p2q = nll([list(col) for col in zip(*cos, strict=True)])
    got = caption_contrastive_loss(torch.tensor(q), torch.tensor(p), scale=s)
    assert float(got["loss_q2p"]) == pytest.approx(expected_q2p, rel=1e-5)
    assert float(got["loss_p2q"]) == pytest.approx(expected_p2q, rel=1e-5)
    assert float(got["loss"]) == pytest.approx((expected_q2p + expected_p2q) / 2, rel=1e-5)
    best = np.argmax(cos, axis=1)
    assert float(got["accuracy"]) == pytest.approx(np.mean(best == np.arange(5)))


def _grad_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of two gloo processes: half the batch, gathered negatives, averaged gradients."""
    import torch.distributed as dist

    from store.collective import gather_features

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    model, x_q, x_p = _grad_problem()
    n = x_q.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    q = gather_features(model(x_q[mine]))
    p = gather_features(model(x_p[mine]))
    caption_contrastive_loss(q, p)["loss"].backward()
    average_gradients(list(model.parameters()))
    if rank == 0:
        torch.save({k: v.grad for k, v in model.named_parameters()}, out)
    dist.destroy_process_group()
    # The result is on disk. Leave without interpreter teardown: on torch 2.11 (CPU) a spawned
    # gloo worker aborts there in about 1 run of 3 ("terminate called without an active
    # exception", after destroy_process_group returned), which is not what this test checks.
    os._exit(0)


def _grad_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    return (
        model.double(),
        torch.randn(8, 6, dtype=torch.float64),
        torch.randn(8, 6, dtype=torch.float64),
    )


def test_gradient_through_the_gather_on_two_workers_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grads.pt"
    mp.spawn(_grad_worker, args=(2, port, str(out)), nprocs=2, join=True)
    distributed = torch.load(out)

    model, x_q, x_p = _grad_problem()
    caption_contrastive_loss(model(x_q), model(x_p))["loss"].backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(distributed[name], param.grad, rtol=1e-10, atol=1e-12)


def test_retrieval_accuracy_counts_ties_against_the_right_answer():
    eye = np.eye(4)
    assert retrieval_accuracy(eye, eye) == {"top1": 1.0, "top5": 1.0}
    same = np.ones((4, 3))  # a collapsed encoder: every target ties
    assert retrieval_accuracy(same, same, ks=(1, 4)) == {"top1": 0.0, "top4": 1.0}
    # query 0 is closest to target 1: wrong at top 1, right at top 2
    q = np.array([[1.0, 0.2], [0.0, 1.0]])
    t = np.array([[0.5, 0.5], [1.0, 0.1]])
    assert retrieval_accuracy(q, t, ks=(1, 2)) == {"top1": 0.0, "top2": 1.0}


def test_batches_are_a_pure_function_of_seed_and_step():
    a, swap_a = step_batch(100, 8, seed=1, step=13)
    b, swap_b = step_batch(100, 8, seed=1, step=13)
    assert (a == b).all() and (swap_a == swap_b).all()
    epoch0 = np.concatenate([step_batch(100, 8, 1, s)[0] for s in range(12)])
    assert len(set(epoch0.tolist())) == 96  # one epoch: 12 full batches, no pair twice
    assert not (step_batch(100, 8, 1, 12)[0] == step_batch(100, 8, 1, 0)[0]).all()  # reshuffled


def test_length_groups_cover_every_caption_once_within_budget_and_ratio():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(10, 20, 40)) + list(rng.integers(150, 200, 40))
    groups = length_groups(lengths, token_budget=2000, max_ratio=1.5)
    assert sorted(i for g in groups for i in g) == list(range(80))
    for g in groups:
        longest, shortest = max(lengths[i] for i in g), min(lengths[i] for i in g)
        assert longest * len(g) <= 2000 or len(g) == 1
        assert longest <= 1.5 * shortest
    assert not any({lengths[i] < 100 for i in g} == {True, False} for g in groups)  # short apart


def test_bidirectional_attention_sees_later_tokens_and_never_padding(tiny_model):
    from transformers import AutoModelForCausalLM

    from embed.tune import CaptionEncoder

    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    texts = ["A red star.", "A red star on a blue ground, small and bright."]
    ptok, items = _llm2clip_items(tiny_model, texts)
    cpu = torch.device("cpu")
    with torch.no_grad():
        causal = CaptionEncoder(lm, bidirectional=False)(items, ptok.pad_id, cpu)
        both = CaptionEncoder(lm, bidirectional=True)(items, ptok.pad_id, cpu)
        alone = CaptionEncoder(lm, bidirectional=True)(items[:1], ptok.pad_id, cpu)
        # reference: the plain decoder with an all-visible mask over the caption alone
        ids = torch.tensor([items[0].context])
        mask = torch.ones(1, 1, len(items[0].context), len(items[0].context), dtype=torch.bool)
        hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state[0]
    s, e = items[0].caption_span
    torch.testing.assert_close(both[0], hidden[s:e].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)  # padding never seen
    assert (both - causal).abs().max() > 1e-3


def test_adding_lora_says_nothing_a_user_cannot_act_on(tiny_model):
    """peft wraps the model by reading transformers' deprecated `is_gradient_checkpointing`;
    `tune` printed its FutureWarning every run. The adapters still land on every target."""
    import warnings

    from transformers import AutoModelForCausalLM

    from embed.tune import LoraOptions, add_lora

    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_lm = add_lora(lm, LoraOptions(), seed=0)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    lora = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1]
        for n, _ in peft_lm.named_parameters()
        if ".lora_A" in n
    }
    assert lora == set(LoraOptions().target_modules)


# --- what is tuned is what stage one embeds ------------------------------------------------------


def _texts(synth_data, n=6):
    t = pq.read_table(synth_data / "captions.parquet").to_pydict()
    return t["short_caption"][:n] + t["long_caption"][:n]


def _llm2clip_items(model_dir, texts):
    from transformers import AutoTokenizer

    from embed.prompts import get_recipe
    from embed.tokenize import PromptTokenizer

    ptok = PromptTokenizer(AutoTokenizer.from_pretrained(model_dir), get_recipe("llm2clip"))
    return ptok, [e.items[0] for e in ptok.encode([[t] for t in texts])]


def _hf_engine_vectors(decoder, pad_id, items):
    from embed.engine import EngineConfig
    from embed.hf_engine import HFEngine

    cfg = EngineConfig(model="in-memory", pooling="mean", dtype="float32", device="cpu")
    return HFEngine.from_model(decoder, pad_id, cfg).embed(items)


def _with_adapter(tiny_model, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def test_the_tuned_vectors_are_the_hf_engines_llm2clip_vectors(tiny_model, synth_data, tuned):
    """The training forward (CaptionEncoder) and the hf engine agree on base + adapter."""
    from embed.tune import CaptionEncoder

    out, _ = tuned
    texts = _texts(synth_data)
    ptok, items = _llm2clip_items(tiny_model, texts)
    lm = _with_adapter(tiny_model, out / ADAPTER_DIR)
    ours = CaptionEncoder(lm).embed_texts(ptok, texts, torch.device("cpu"))
    engine = _hf_engine_vectors(lm.get_base_model().get_decoder(), ptok.pad_id, items)
    np.testing.assert_allclose(ours, engine, atol=1e-5, rtol=1e-5)


def test_merged_weights_give_the_hidden_states_of_base_plus_adapter(tiny_model, tuned):
    from transformers import AutoModelForCausalLM

    out, _ = tuned
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        h_merged = merged.model(input_ids=ids).last_hidden_state
        h_base = base.model(input_ids=ids).last_hidden_state
        h_adapter = (
            _with_adapter(tiny_model, out / ADAPTER_DIR)
            .get_base_model()
            .model(input_ids=ids)
            .last_hidden_state
        )
    assert (h_adapter - h_base).abs().max() > 1e-3  # the adapters changed the model...
    assert (h_merged - h_adapter).abs().max() <= 1e-5  # ...and merging kept that change exactly


def test_embed_on_the_merged_model_equals_base_plus_adapter(
    tiny_model, synth_data, tuned, tmp_path
):
    from embed.engine import inspect_model, model_fingerprint
    from embed.pipeline import EmbedConfig, run_embed
    from store.reader import iter_batches

    out, result = tuned
    captions = synth_data / "captions.parquet"
    cache = tmp_path / "cache"
    run_embed(EmbedConfig(captions, str(out), cache, recipe="llm2clip", engine="hf",
                          compute_dtype="float32", dtype="float32", device="cpu"), progress=False)  # fmt: skip
    keys, vectors = [], []
    for batch_keys, vecs in iter_batches(cache, ["mean"]):
        keys += list(batch_keys)
        vectors.append(vecs["mean"])
    cached = np.concatenate(vectors)

    rows = pq.read_table(captions).to_pydict()
    by_key = dict(zip(rows["key"], rows["long_caption"], strict=True))
    ptok, items = _llm2clip_items(tiny_model, [by_key[k] for k in keys])
    lm = _with_adapter(tiny_model, out / ADAPTER_DIR)
    in_memory = _hf_engine_vectors(lm.get_base_model().get_decoder(), ptok.pad_id, items)
    in_memory /= np.linalg.norm(in_memory, axis=1, keepdims=True)  # the recipe normalises
    np.testing.assert_allclose(cached, in_memory, atol=1e-5)

    # a normal causal LM whose fingerprint says it is not the base model
    assert inspect_model(str(out)).model_type == "llama"
    assert model_fingerprint(out) == result.fingerprint != model_fingerprint(Path(tiny_model))
    assert json.loads((out / "config.json").read_text())["facetclip_tune"]["recipe"] == "llm2clip"


def test_tune_reports_caption_retrieval_for_base_and_tuned(tuned):
    out, result = tuned
    cra = json.loads((out / CRA_FILE).read_text())
    assert cra == result.cra and cra["pairs"] == 16
    assert cra["chance"] == {"top1": 1 / 16, "top5": 5 / 16}
    for model in ("base", "tuned"):
        for direction in ("short_to_long", "long_to_short"):
            acc = cra[model][direction]
            assert 0 <= acc["top1"] <= acc["top5"] <= 1
    metrics = [json.loads(x) for x in (out / RUN_DIR / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert (out / RUN_DIR / "plots" / "loss.png").is_file()
    assert any((out / RUN_DIR / "tb").iterdir())


# --- resume -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_model, synth_data, tuned, tmp_path):
    uninterrupted, _ = tuned
    broken = tmp_path / "broken"
    captions = synth_data / "captions.parquet"
    # the worker SIGKILLs itself after the checkpoint of step 2, and may not be restarted...
    with pytest.raises(TuneError, match="--resume"):
        run_tune(
            _config(captions, tiny_model, broken, run__fault_step=3, run__max_failures=0),
            progress=False,
        )
    assert not (broken / "config.json").exists()
    # ...so `--resume` continues it from step 2
    run_tune(TuneConfig(out=str(broken)), resume=True, progress=False)
    a = load_file(uninterrupted / ADAPTER_DIR / "adapter_model.safetensors")
    b = load_file(broken / ADAPTER_DIR / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    steps = [json.loads(x) for x in (broken / RUN_DIR / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]


# --- bad input, one clear line --------------------------------------------------------------------


def _cli(*args):
    from cli import app

    result = CliRunner().invoke(app, ["tune", *map(str, args), "--no-progress"])
    return result.exit_code, result.output.strip()


def _one_line(code, output, *needles):
    """Exit 2 and one error message (rich wraps it to the terminal's width), no traceback."""
    assert code == 2, output
    text = " ".join(output.split())
    assert text.startswith("error:") and text.count("error:") == 1, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in text, output


def test_one_caption_column_is_refused(tmp_path, tiny_model):
    data = tmp_path / "one.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "caption": ["A red star.", "A blue cube."]}), data)
    code, output = _cli(data, "--model", tiny_model, "--out", tmp_path / "o")
    _one_line(code, output, "short_caption", "--pair")
    code, output = _cli(data, "--model", tiny_model, "--out", tmp_path / "o", "--pair", "caption")
    _one_line(code, output, "two caption columns")


def test_no_pairs_is_refused(tmp_path, tiny_model):
    data = tmp_path / "empty.parquet"
    table = pa.table({"key": ["a", "b"], "short_caption": ["A star.", None],
                      "long_caption": [None, "A long text."]})  # fmt: skip
    pq.write_table(table, data)
    code, output = _cli(data, "--model", tiny_model, "--out", tmp_path / "o")
    _one_line(code, output, "no caption pairs")


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path, synth_data):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(bert)
    code, output = _cli(synth_data / "captions.parquet", "--model", bert, "--out", tmp_path / "o")
    _one_line(code, output, "not a causal LM")


@pytest.mark.parametrize("option", [("--lora-r", "0"), ("--set", "lora.r=-2")])
def test_a_lora_rank_below_one_is_refused(tmp_path, synth_data, tiny_model, option):
    code, output = _cli(
        synth_data / "captions.parquet", "--model", tiny_model, "--out", tmp_path / "o", *option
    )
    _one_line(code, output, "lora.r must be >= 1")
    assert not (tmp_path / "o").exists()


def test_unknown_lora_targets_name_the_models_layers(tmp_path, synth_data, tiny_model):
    code, output = _cli(synth_data / "captions.parquet", "--model", tiny_model, "--out", tmp_path / "o",
                        "--set", 'lora.target_modules=["query"]')  # fmt: skip
    _one_line(code, output, "['query']", "q_proj")


def test_an_earlier_tune_is_not_overwritten_silently(tmp_path, synth_data, tiny_model, tuned):
    out, _ = tuned
    code, output = _cli(synth_data / "captions.parquet", "--model", tiny_model, "--out", out)
    _one_line(code, output, "--resume")
    code, output = _cli(synth_data / "captions.parquet", "--model", tiny_model, "--out", tiny_model)
    _one_line(code, output, "base model")


def test_config_round_trips_through_toml(tmp_path):
    cfg = TuneConfig(captions="c", model="m", out="o").override(
        ["lora.r=8", "optim.lr=1e-3", "bidirectional=true", 'pair=["a", "b"]']
    )
    path = tmp_path / "tune.toml"
    path.write_text(cfg.to_toml())
    assert TuneConfig.from_toml(path) == cfg
    assert (cfg.lora.r, cfg.optim.lr, cfg.bidirectional, cfg.pair) == (8, 1e-3, True, ["a", "b"])
