"""Shared fixtures: a synthetic dataset and an untrained small LM, built once per test session
by the project's own commands' functions (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

# Test models are tiny: one thread is faster than two (OpenMP spin-waits cost more than the
# matmuls), and immune to a busy second core.
torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    """``make test``'s vLLM suite sets FACETCLIP_REQUIRE_VLLM=1: there a skipped test fails
    the run (the vLLM tests must run, not skip, in .venv-vllm)."""
    if os.environ.get("FACETCLIP_REQUIRE_VLLM") != "1" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        print(f"\nFACETCLIP_REQUIRE_VLLM=1: {len(skipped)} test(s) skipped; none may skip here")
        session.exitstatus = 1


def pytest_configure(config):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """An untrained 4-layer Llama (weights random, tokenizer trained): right for engine math."""
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_llm(
        out,
        TinyLLMConfig(
            steps=0,
            hidden_size=64,
            intermediate_size=128,
            n_captions=400,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    from eval.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("data") / "synth"
    write_synth(
        out,
        SynthConfig(n=120, seed=0, n_retrieval=10, n_zeroshot_per_class=1, shard_size=50),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, tiny_model):
    """(synth folder, flame-long cache) at 32 px for stage-two runs of a few steps; read-only."""
    from embed.pipeline import EmbedConfig, run_embed
    from eval.synth import SynthConfig, write_synth

    root = tmp_path_factory.mktemp("train-data")
    synth = root / "synth"
    write_synth(
        synth,
        SynthConfig(n=96, seed=1, image_size=32, n_retrieval=8, n_zeroshot_per_class=1),
        progress=False,
    )
    cache = root / "cache"
    run_embed(
        EmbedConfig(synth / "captions.parquet", str(tiny_model), cache, recipe="flame-long"),
        progress=False,
    )
    return synth, cache


@pytest.fixture(scope="module", autouse=True)
def _no_ray_across_modules():
    """Each test module starts and ends without a Ray in this process: ``train()`` leaves the
    Ray it started running (the demo reuses it across runs), and a module that starts its own
    (``ray_session``) or sizes a local one (sweeps) must not find another module's."""
    yield
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for one module, with more logical CPUs than this machine's 2 cores, started
    as the commands start theirs (store.cluster.init_ray)."""
    import ray

    from store.cluster import init_ray

    ray.shutdown()  # a no-op unless something in this module started one
    init_ray(None, 2, num_cpus=4)
    yield
    ray.shutdown()
