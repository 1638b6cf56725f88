"""The vllm engine: its pure helpers everywhere, and on a CUDA GPU with vLLM installed its
vectors against the hf engine's (the hf engine is itself tested against plain transformers
forward passes in test_hf_engine.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embed.engine import EngineConfig
from embed.hf_engine import HFEngine
from embed.packing import PromptIds
from embed.prompts import BUILTIN_RECIPES
from embed.tokenize import PromptTokenizer
from embed.vllm_engine import (
    VLLMEngine,
    expected_cached_tokens,
    facet_requests,
    keeps_weight,
    mean_requests,
    span_mean,
    truncated_config,
    write_truncated_checkpoint,
)
from store.errors import InputError

# --- Pure helpers (no vLLM, no GPU) -----------------------------------------------------------


def test_facet_requests_are_standalone_sequences_in_item_then_facet_order():
    a = PromptIds((1, 5, 6, 2), ((7,), (8, 9)), (1, 3))
    b = PromptIds((1, 4, 2), ((7,), (8, 9), (10,)), (1, 2))
    assert facet_requests([a, b]) == [
        [1, 5, 6, 2, 7],
        [1, 5, 6, 2, 8, 9],
        [1, 4, 2, 7],
        [1, 4, 2, 8, 9],
        [1, 4, 2, 10],
    ]


def test_mean_requests_stop_at_the_caption_end():
    a = PromptIds((1, 3, 5, 6, 2, 2), (), (2, 4))  # BOS, prefix, caption 5 6, suffix
    empty = PromptIds((1, 3, 2), (), (2, 2))
    assert mean_requests([a, empty]) == [[1, 3, 5, 6], None]


def test_span_mean_averages_the_caption_tokens_only():
    hidden = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(span_mean(hidden, (1, 3)), hidden[1:3].mean(0))
    np.testing.assert_array_equal(span_mean(hidden, (2, 2)), np.zeros(3, np.float32))


def test_keeps_weight_drops_only_later_decoder_layers():
    assert keeps_weight("model.layers.1.self_attn.q_proj.weight", 2)
    assert not keeps_weight("model.layers.2.self_attn.q_proj.weight", 2)
    assert not keeps_weight("model.layers.12.mlp.up_proj.weight", 2)
    assert not keeps_weight("language_model.model.layers.5.mlp.up_proj.weight", 2)
    assert not keeps_weight("model.language_model.layers.5.mlp.up_proj.weight", 2)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert keeps_weight(name, 2)
    # a vision tower's layers are not the language model's
    assert keeps_weight("vision_tower.encoder.layers.30.mlp.fc1.weight", 2)


def test_truncated_config_cuts_the_language_model():
    cfg = {"num_hidden_layers": 4, "layer_types": ["a", "b", "a", "b"], "hidden_size": 8}
    out = truncated_config(cfg, 2)
    assert out == {"num_hidden_layers": 2, "layer_types": ["a", "b"], "hidden_size": 8}
    assert cfg["num_hidden_layers"] == 4  # the input is not modified
    mm = {"text_config": {"num_hidden_layers": 4}, "vision_config": {"num_hidden_layers": 9}}
    out = truncated_config(mm, 3)
    assert out["text_config"]["num_hidden_layers"] == 3
    assert out["vision_config"]["num_hidden_layers"] == 9


def test_expected_cached_tokens_counts_whole_shared_blocks():
    bs = 4
    ctx = list(range(100, 110))  # 10 tokens: 2 full blocks + 2 tokens
    reqs = [ctx + [1], ctx + [2, 3], ctx + [4]]
    # the first request fills the cache; each later one reuses the 2 full context blocks
    assert expected_cached_tokens(reqs, bs) == 2 * 8
    # identical requests: at most len - 1 tokens, in whole blocks
    assert expected_cached_tokens([list(range(8)), list(range(8))], bs) == 4
    assert expected_cached_tokens([list(range(9)), list(range(9))], bs) == 8
    # a different first block breaks the chain even if later blocks match
    assert (
        expected_cached_tokens([[0, 0, 0, 0, 5, 5, 5, 5, 9], [1, 0, 0, 0, 5, 5, 5, 5, 9]], bs) == 0
    )


def test_truncated_checkpoint_serves_an_earlier_layer(tiny_model, tmp_path):
    """The truncated copy, run to its last layer, equals the original at that layer."""
    out = write_truncated_checkpoint(tiny_model, 2, tmp_path / "cut")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert (out / "tokenizer.json").is_symlink()
    from transformers import AutoTokenizer

    recipe = BUILTIN_RECIPES["flame-long"]
    tok = PromptTokenizer(AutoTokenizer.from_pretrained(out), recipe)
    texts = ["a red star above a small blue circle.", "a calm grey square."]
    items = [e.items[0] for e in tok.encode([[t] for t in texts])]
    want = HFEngine(EngineConfig(str(tiny_model), layer=2, device="cpu")).embed(items)
    got = HFEngine(EngineConfig(str(out), device="cpu")).embed(items)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


class FakeLLM:
    """Stands in for ``vllm.LLM`` with ``LLM.encode``'s contract (vllm/entrypoints/pooling/
    offline.py): one ``PoolingRequestOutput``-like result per prompt, in prompt order. Its
    "hidden state" of token t at position p is [t, p, 1]; LAST returns the last token's."""

    def __init__(self, task: str, cached: int = 3):
        self.task = task
        self.cached = cached
        self.model_config = SimpleNamespace(max_model_len=64)
        self.llm_engine = SimpleNamespace(
            vllm_config=SimpleNamespace(cache_config=SimpleNamespace(block_size=16))
        )
        self.prompts: list[list[int]] = []

    def encode(self, prompts, pooling_task, use_tqdm):
        assert pooling_task == self.task and use_tqdm is False
        outputs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            self.prompts.append(ids)
            hidden = torch.tensor([[t, pos, 1.0] for pos, t in enumerate(ids)])
            data = hidden[-1] if self.task == "embed" else hidden
            outputs.append(
                SimpleNamespace(
                    outputs=SimpleNamespace(data=data.to(torch.bfloat16)),
                    prompt_token_ids=ids,
                    num_cached_tokens=self.cached,
                )
            )
        return outputs


def fake_engine(pooling: str) -> tuple[VLLMEngine, FakeLLM]:
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.cfg = EngineConfig("unused", pooling=pooling)
    engine.hidden_size = 3
    llm = FakeLLM("embed" if pooling == "last" else "token_embed")
    engine._attach(llm)
    return engine, llm


def test_last_pooling_sends_one_request_per_facet_and_keeps_their_order():
    engine, llm = fake_engine("last")
    a = PromptIds((1, 5, 6, 2), ((7,), (8, 9)), (1, 3))
    b = PromptIds((1, 4, 2), ((10,), (11,), (12, 13)), (1, 2))
    got = engine.embed([a, b])
    assert llm.prompts == facet_requests([a, b])
    # row = the last token of context + facet_k, and its position
    want = [[7, 4, 1], [9, 5, 1], [10, 3, 1], [11, 3, 1], [13, 4, 1]]
    np.testing.assert_array_equal(got, np.array(want, np.float32))
    assert got.dtype == np.float32
    assert engine.requests == 5 and engine.prompt_tokens == 5 + 6 + 4 + 4 + 5
    assert engine.cached_tokens == 5 * 3
    assert engine.computed_tokens == engine.prompt_tokens - 15
    assert engine.real_tokens == a.packed_length + b.packed_length


def test_mean_pooling_averages_each_caption_span_and_skips_empty_ones():
    engine, llm = fake_engine("mean")
    a = PromptIds((1, 3, 5, 7, 2, 2), (), (2, 4))
    empty = PromptIds((1, 3, 2), (), (2, 2))
    b = PromptIds((1, 3, 9, 2), (), (2, 3))
    got = engine.embed([a, empty, b])
    assert llm.prompts == [[1, 3, 5, 7], [1, 3, 9]]  # stops at the caption's end
    want = [[6, 2.5, 1], [0, 0, 0], [9, 2, 1]]
    np.testing.assert_array_equal(got, np.array(want, np.float32))


def test_prompts_longer_than_the_model_are_refused():
    engine, _ = fake_engine("last")
    long = PromptIds(tuple(range(70)), ((1,),), (1, 69))
    with pytest.raises(InputError, match="max_caption_tokens"):
        engine.embed([long])


def test_refuses_what_vllm_cannot_compute_before_loading_anything(tiny_model):
    with pytest.raises(InputError, match="final norm"):
        VLLMEngine(EngineConfig(str(tiny_model), final_norm=False))
    with pytest.raises(InputError, match="CUDA_VISIBLE_DEVICES"):
        VLLMEngine(EngineConfig(str(tiny_model), device="cpu"))
    with pytest.raises(InputError, match="out of range"):
        VLLMEngine(EngineConfig(str(tiny_model), layer=99))


def test_gpu_check_random_hf_engine_mirrors_hf_engine(tiny_model, tmp_path):
    """gpu_check builds the hf engine of its throughput test from a config alone; saved and
    loaded back through HFEngine, the same random weights give the same vectors."""
    import shutil

    from tests.gpu_check import decoder_params, random_hf_engine

    config_dir = tmp_path / "config-only"
    config_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / f, config_dir / f)
    cfg = EngineConfig(str(config_dir), device="cpu")
    random_engine = random_hf_engine(cfg, config_dir)
    saved = tmp_path / "saved"
    random_engine.model.save_pretrained(saved)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # config: CausalLM arch
        shutil.copy(tiny_model / f, saved / f)
    from transformers import AutoTokenizer

    tok = PromptTokenizer(AutoTokenizer.from_pretrained(saved), BUILTIN_RECIPES["flame-long"])
    items = [e.items[0] for e in tok.encode([["a red star."], ["a calm grey square."]])]
    loaded = HFEngine(EngineConfig(str(saved), device="cpu"))
    np.testing.assert_allclose(random_engine.embed(items), loaded.embed(items), atol=1e-6)
    c = json.loads((tiny_model / "config.json").read_text())
    n_params = sum(p.numel() for n, p in loaded.model.named_parameters() if "embed" not in n)
    assert decoder_params(c) == n_params


# --- vLLM on a GPU --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_gpu():
    pytest.importorskip(
        "vllm", reason="vLLM is not installed (pip install -e '.[vllm]'; needs a CUDA machine)"
    )
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the vllm engine runs on CUDA only")


@pytest.fixture(scope="module")
def gpu_model(vllm_gpu, tmp_path_factory):
    """An untrained 4-layer Llama with head size 64 (the conftest model's head size 16 is
    below what some of vLLM's attention kernels take)."""
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm

    out = tmp_path_factory.mktemp("models") / "tiny-h64"
    build_tiny_llm(
        out,
        TinyLLMConfig(
            steps=0,
            hidden_size=256,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=512,
            n_captions=400,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def caption_rows(synth_data):
    rows = pq.read_table(synth_data / "captions.parquet").slice(0, 60).to_pylist()
    for i in range(0, 60, 10):  # a few very long captions among them
        rows[i]["long_caption"] = " ".join([rows[i]["long_caption"]] * 3)
    return rows


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "recipe_name,layer", [("flame-long", -1), ("flame-long", 2), ("llm2clip", -1)]
)
def test_vllm_agrees_with_hf_engine(gpu_model, caption_rows, recipe_name, layer):
    from transformers import AutoTokenizer

    recipe = BUILTIN_RECIPES[recipe_name]
    tok = PromptTokenizer(AutoTokenizer.from_pretrained(gpu_model), recipe)
    encoded = tok.encode([[row[g.column] for g in recipe.groups] for row in caption_rows])
    items = [it for e in encoded for it in e.items]

    def cfg(dtype, **kw):
        return EngineConfig(str(gpu_model), pooling=recipe.pooling, layer=layer, dtype=dtype, **kw)

    # enforce_eager: no torch.compile / CUDA-graph capture, for a quick start in tests.
    with VLLMEngine(cfg("bfloat16", gpu_memory_utilization=0.3), enforce_eager=True) as engine:
        got = engine.embed(items)
        if recipe.pooling == "last":
            # the context was computed once per caption, not K times
            ideal = expected_cached_tokens(facet_requests(items), engine.block_size)
            assert engine.cached_tokens >= 0.9 * ideal > 0
    reference = HFEngine(cfg("float32", device="cuda")).embed(items)
    hf_bf16 = HFEngine(cfg("bfloat16", device="cuda")).embed(items)
    assert got.shape == reference.shape == (len(caption_rows) * len(recipe.vector_names), 256)
    assert cosine(got, reference).min() >= 0.999
    assert cosine(got, hf_bf16).min() >= 0.999
